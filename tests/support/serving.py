"""A live node serving the demo models over HTTP, tokens and test images for the serving APIs."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import numpy as np
from PIL import Image

from dicom_node.config import PROJECT_ROOT, Settings
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from tests.support.inproc import node_settings
from tests.support.node import RunningNode
from tests.support.peers import free_port

CXR = {"name": "cxr-findings", "path": "pipeline/models/cxr-findings", "device": "cpu",
       "max_batch": 8, "max_delay_ms": 5}
CT = {"name": "ct-organs", "path": "pipeline/models/ct-organs", "device": "cpu"}
CXR_LABELS = ["Tuberculosis", "Cardiomegaly", "Pleural Thickening", "Pleural Effusion",
              "Pneumothorax", "Consolidation", "Atelectasis", "Nodule Mass", "Fibrosis",
              "Infiltration", "Calcification"]


def serving_settings(data_dir: Path, models: list[dict[str, Any]] | None = None,
                     pipelines: list[dict[str, Any]] | None = None, **rest: Any) -> Settings:
    """A node on free loopback ports serving ``models`` (default: cxr-findings) over HTTP,
    with ``pipelines`` (default: none)."""
    return node_settings(
        data_dir,
        models=models if models is not None else [CXR],
        pipelines=pipelines or [],
        dimse={"host": "127.0.0.1", "port": free_port()},
        rest={"enabled": True, "host": "127.0.0.1", "port": free_port(), **rest},
        storage={"data_dir": str(data_dir), "min_free_mb": 0},
    )


@dataclass
class LiveNode:
    """A node running in its own thread with its HTTP listener, and how to call it."""

    running: RunningNode
    base_url: str
    secret: bytes

    @property
    def node(self) -> Any:
        return self.running.node

    def token(self, *, scope: str = "infer read", expires_in: float = 300,
              secret: bytes | None = None, sub: str = "tester") -> str:
        """A JWT for this node (``secret`` signs it with another key)."""
        claims = {"sub": sub, "scope": scope, "exp": int(time.time() + expires_in)}
        return jwt.encode(claims, secret if secret is not None else self.secret,
                          algorithm="HS256")

    def auth(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}


@contextlib.contextmanager
def live_node(settings: Settings) -> Iterator[LiveNode]:
    rn = RunningNode(settings).start()
    try:
        secret = settings.jwt_secret_file.read_bytes().strip()
        yield LiveNode(rn, f"http://127.0.0.1:{settings.rest.port}", secret)
    finally:
        rn.stop()


# -- images ------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray, bits: int = 8, mode: str | None = None) -> bytes:
    """``pixels`` in [0, 1] as an 8- or 16-bit grayscale PNG (or ``mode``, e.g. RGB)."""
    if bits == 16:
        img = Image.fromarray((np.clip(pixels, 0, 1) * 65535).round().astype(np.uint16))
    else:
        img = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), mode="L")
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def phantom(seed: int) -> Any:
    """A chest phantom outside the demo model's training seeds."""
    return make_cxr_phantom(20_000_000 + seed, size=256)


def phantom_png(seed: int) -> bytes:
    return png_bytes(phantom(seed).image)


def phantom_dicom(seed: int, folder: Path) -> bytes:
    path = write_dicom(phantom(seed), folder / f"cxr-{seed}.dcm", modality="CR")
    return path.read_bytes()


def sample(name: str) -> Path:
    return PROJECT_ROOT / "samples" / name
