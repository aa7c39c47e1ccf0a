"""Small helpers shared by the phantom generators and the training scripts."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Root of the deterministic UIDs written into phantom DICOM files
#: (``2.25`` = UUID-derived root, so no organisation root is claimed).
UID_ROOT = "2.25."


def deterministic_uid(*parts: object) -> str:
    """A valid DICOM UID derived from ``parts`` (same parts -> same UID)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def gaussian_kernel(sigma: float) -> npt.NDArray[np.float32]:
    """A normalised 1D Gaussian kernel of radius ``ceil(3 sigma)``."""
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    out: npt.NDArray[np.float32] = (k / k.sum()).astype(np.float32)
    return out


def blur(img: npt.NDArray[np.float32], sigma: float) -> npt.NDArray[np.float32]:
    """Separable Gaussian blur along every axis (reflect padding), pure numpy."""
    if sigma <= 0:
        return img.astype(np.float32, copy=True)
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = img.astype(np.float32, copy=True)
    for axis in range(out.ndim):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, w in enumerate(k):
            acc += w * np.take(p, np.arange(i, i + n), axis=axis)
        out = acc
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and make torch deterministic."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


#: Phantom seeds used for training are ``TRAIN_SEED_START + i`` (``i < n_train``,
#: at most ``MAX_TRAIN``), for the validation split during training
#: ``VAL_SEED_START + i``, and for the held-out evaluation ``EVAL_SEED_START + i``.
#: The three ranges never overlap.
TRAIN_SEED_START = 0
MAX_TRAIN = 1_000_000
VAL_SEED_START = 5_000_000
EVAL_SEED_START = 10_000_000


def write_bundle(out: str | Path, *, network: Any, example: Any, metadata: dict[str, Any],
                 inference: dict[str, Any], readme: str) -> Path:
    """Write a MONAI Model Zoo layout bundle: configs/, models/model.pt + model.ts, docs/."""
    import json

    import torch

    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    network = network.eval().cpu()
    torch.save(network.state_dict(), out / "models" / "model.pt")
    with torch.no_grad():
        traced = torch.jit.trace(  # type: ignore[no-untyped-call]
            network, example.cpu(), check_trace=False)
    traced.save(str(out / "models" / "model.ts"))
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "configs" / "inference.json").write_text(json.dumps(inference, indent=2) + "\n")
    (out / "docs" / "README.md").write_text(readme)
    return out
