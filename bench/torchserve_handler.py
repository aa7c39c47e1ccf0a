"""TorchServe handler for ``bench/serving.py``: a TorchScript multi-label image classifier.

Runs inside TorchServe's Python worker (the separate ``.venv-ts``), not in the node's
environment, so it imports only torch, Pillow and TorchServe. The archive holds:

* the TorchScript file (``--serialized-file``),
* ``model_meta.json`` (``--extra-files``): ``{"labels": [...], "spatial_size": [H, W],
  "torch_threads": N}``.

Per request: the raw body (PNG or JPEG; 8-bit, 16-bit or RGB) is decoded to a 1xHxW
float tensor in [0, 1] (divided by the type's maximum), resized with area interpolation
to the model's input size and min-max scaled to [0, 1] (what the node's default
preprocessing does: ``Resize(mode="area")`` then ``ScaleIntensity``). TorchServe's
batching hands the handler up to ``batch_size`` requests at once; they run as one batch,
and each request gets a sigmoid over the outputs as a list sorted by probability, top
class first: ``[{"class": "Cardiomegaly", "probability": 0.91}, ...]``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)


def decode_image(body: bytes | bytearray) -> torch.Tensor:
    """PNG/JPEG bytes -> float32 tensor (1, H, W) in [0, 1]."""
    with Image.open(io.BytesIO(body)) as img:
        img.load()
        w, h = img.size
        if img.mode in ("I;16", "I;16L", "I;16B"):
            if img.mode == "I;16B":
                img = img.convert("I;16")
            raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint16)
            t = raw.to(torch.float32) / 65535.0
        elif img.mode == "I":  # 32-bit signed; PNG 16-bit may decode to this
            raw32 = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.int32)
            t = raw32.to(torch.float32) / 65535.0
        else:
            if img.mode != "L":
                img = img.convert("L")
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).to(torch.float32)
            t = t / 255.0
    return t.view(1, h, w).clamp_(0.0, 1.0)


class ImageClassifierHandler(BaseHandler):  # type: ignore[misc]
    """Decode, resize, batch, sigmoid, sorted findings per request."""

    labels: list[str]
    size: tuple[int, int]

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = props["model_dir"]
        with open(os.path.join(model_dir, "model_meta.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        self.labels = [str(x) for x in meta["labels"]]
        h, w = (int(s) for s in meta["spatial_size"])
        self.size = (h, w)
        threads = int(meta.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.manifest = context.manifest
        self.map_location = "cpu"
        self.device = torch.device("cpu")
        serialized = self.manifest["model"]["serializedFile"]
        self.model = torch.jit.load(os.path.join(model_dir, serialized), map_location="cpu")
        self.model.eval()
        with torch.inference_mode():  # warm-up: first TorchScript calls optimise the graph
            for n in (1, 2):
                self.model(torch.zeros(n, 1, h, w))
        self.initialized = True
        logger.info("loaded %s: %d labels, input %s, torch threads %d", serialized,
                    len(self.labels), self.size, torch.get_num_threads())

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        images = []
        for row in data:
            body = row.get("data") if row.get("data") is not None else row.get("body")
            if isinstance(body, str):
                body = body.encode("latin-1")
            if not isinstance(body, bytes | bytearray):
                raise ValueError("expected the raw image as the request body")
            t = decode_image(body)
            t = F.interpolate(t.unsqueeze(0), size=self.size, mode="area")[0]
            lo, hi = t.min(), t.max()
            t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
            images.append(t)
        return torch.stack(images)

    def inference(self, data: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.model(data.to(self.device))
        return out

    def postprocess(self, data: torch.Tensor) -> list[list[dict[str, Any]]]:
        probs = torch.sigmoid(data.float()).cpu().tolist()
        results = []
        for row in probs:
            pairs = sorted(zip(self.labels, row, strict=True), key=lambda p: -p[1])
            results.append([{"class": c, "probability": float(p)} for c, p in pairs])
        return results
