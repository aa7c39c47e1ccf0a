"""Grad-CAM heatmaps for classifiers (``monai.visualize.GradCAM``).

The target layer comes from the model's metadata (``gradcam_target_layer``): one
layer name, or a list of names whose maps (each scaled to [0, 1]) are averaged
(multi-layer fusion: a deep, coarse layer for class specificity with a
shallower, finer one for position). The heatmap is returned at the source
image size, scaled to [0, 1].
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from pipeline.bundle import BundleError, LoadedModel


def _class_index(model: LoadedModel, target: int | str) -> int:
    if isinstance(target, str):
        try:
            return model.labels.index(target)
        except ValueError:
            raise ValueError(f"{model.name} has no label {target!r}") from None
    if not 0 <= target < len(model.labels):
        raise ValueError(f"class index {target} out of range for {model.name}")
    return int(target)


def _no_inplace(net: torch.nn.Module) -> None:
    """Turn off in-place activations: they overwrite the tensors Grad-CAM's hooks keep."""
    for mod in net.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False  # type: ignore[assignment]


_CAMS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = (
    weakref.WeakKeyDictionary())


def _identity(x: Any) -> Any:
    return x


def _cam(net: torch.nn.Module, layer: str) -> Any:
    """One GradCAM per (network, layer): each instance registers hooks on the network."""
    from monai.visualize.class_activation_maps import GradCAM

    per_net = _CAMS.setdefault(net, {})
    if layer not in per_net:
        if layer not in dict(net.named_modules()):
            raise BundleError(f"Grad-CAM target layer {layer!r} not found in the network")
        _no_inplace(net)
        # identity postprocessing: MONAI's default normaliser flips magnitudes (max -> 0)
        per_net[layer] = GradCAM(nn_module=net, target_layers=layer, postprocessing=_identity)
    return per_net[layer]


def gradcam(model: LoadedModel, image: npt.NDArray[Any], target: int | str,
            layer: str | Sequence[str] | None = None,
            input_tensor: torch.Tensor | None = None) -> npt.NDArray[np.float32]:
    """Grad-CAM of class ``target`` (index or label) for one H x W source ``image``.

    ``input_tensor`` (C x h x w, already preprocessed) skips the preprocessing.
    Returns an H x W float32 heatmap in [0, 1] at the source image size.
    """
    layer = layer or model.gradcam_layer
    if not layer:
        raise BundleError(f"{model.path}: no 'gradcam_target_layer' in the metadata")
    if model.source == "torchscript":
        raise BundleError(f"{model.path}: Grad-CAM needs an eager network (model.pt + "
                          "network_def), not TorchScript")
    idx = _class_index(model, target)
    x = input_tensor if input_tensor is not None else model.preprocess(image)
    x = x[None].to(model.device).float()
    layers = [layer] if isinstance(layer, str) else list(layer)
    maps = []
    for name in layers:
        cam = _cam(model.network, name)
        with torch.enable_grad():
            heat = cam(x, class_idx=idx)  # 1 x 1 x h x w, upsampled to the input size
        m = torch.as_tensor(heat).detach().float().cpu()
        lo, hi = float(m.min()), float(m.max())
        maps.append((m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m))
    heat_t = torch.stack(maps).mean(0)
    out_size = tuple(int(s) for s in np.asarray(image).shape[-2:])
    heat_t = torch.nn.functional.interpolate(heat_t, size=out_size, mode="bilinear",
                                             align_corners=False)[0, 0]
    lo, hi = float(heat_t.min()), float(heat_t.max())
    h = (heat_t - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat_t)
    return h.numpy().astype(np.float32)
