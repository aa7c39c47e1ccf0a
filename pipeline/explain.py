"""Grad-CAM heatmaps for classifiers (``monai.visualize``).

The target layer comes from the model's metadata (``gradcam_target_layer``): one
layer name, or a list of names whose maps (each scaled to [0, 1]) are averaged
(multi-layer fusion). The deepest feature map is the most class-specific but
coarse (16 x 16 for the demo classifier); with ``gradcam_guided`` the map is
multiplied by the guided-backpropagation saliency of the same class (Guided
Grad-CAM, Selvaraju et al. 2017), whose magnitude is smoothed with a Gaussian
of ``gradcam_guided_sigma`` input pixels: the class evidence stays Grad-CAM's,
and the fine saliency puts its peak on the lesion rather than on a neighbouring
cell of the coarse grid. The heatmap is returned at the source image size,
scaled to [0, 1]; for a model that pads the image to a square first
(``pad_to_square``) it is the image's own part of the padded square, so it lies on
the image's pixels as the model saw them.
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


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] (all zeros when constant)."""
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)


def guided_saliency(model: LoadedModel, x: torch.Tensor, idx: int,
                    sigma: float) -> torch.Tensor:
    """|guided backpropagation| of class ``idx`` for a 1 x C x ... input, channels
    reduced by their maximum, smoothed with a Gaussian of ``sigma`` input pixels
    (none when 0) -> 1 x 1 x ... in [0, 1]."""
    from monai.networks.layers.simplelayers import GaussianFilter
    from monai.visualize.gradient_based import GuidedBackpropGrad

    per_net = _CAMS.setdefault(model.network, {})
    if "__guided__" not in per_net:
        _no_inplace(model.network)
        per_net["__guided__"] = GuidedBackpropGrad(model.network)
    with torch.enable_grad():
        grad = per_net["__guided__"](x.detach().clone(), index=idx)
    sal = grad.detach().abs().amax(dim=1, keepdim=True).float()
    if sigma > 0:
        sal = GaussianFilter(sal.ndim - 2, sigma).to(sal.device)(sal)
    return _unit(sal.cpu())


def gradcam(model: LoadedModel, image: npt.NDArray[Any], target: int | str,
            layer: str | Sequence[str] | None = None,
            input_tensor: torch.Tensor | None = None,
            guided: bool | None = None, sigma: float | None = None,
            pixel_aspect: float = 1.0,
            ) -> npt.NDArray[np.float32]:
    """Grad-CAM of class ``target`` (index or label) for one H x W source ``image``.

    ``layer``, ``guided`` and ``sigma`` default to the model's metadata
    (``gradcam_target_layer``, ``gradcam_guided``, ``gradcam_guided_sigma``).
    ``input_tensor`` (C x h x w, already preprocessed) skips the preprocessing.
    ``pixel_aspect``: the image's pixel height over width, for a model that pads the
    image to a square (:meth:`~pipeline.bundle.LoadedModel.square_frame`).
    Returns an H x W float32 heatmap in [0, 1] at the source image size.

    Raises:
        BundleError: no target layer, a layer the network lacks, or a TorchScript model.
        ValueError: an unknown label or class index.
    """
    layer = layer or model.gradcam_layer
    guided = model.gradcam_guided if guided is None else guided
    sigma = model.gradcam_sigma if sigma is None else sigma
    if not layer:
        raise BundleError(f"{model.path}: no 'gradcam_target_layer' in the metadata")
    if model.source == "torchscript":
        raise BundleError(f"{model.path}: Grad-CAM needs an eager network (model.pt + "
                          "network_def), not TorchScript")
    idx = _class_index(model, target)
    x = input_tensor if input_tensor is not None else model.preprocess(
        image, pixel_aspect=pixel_aspect)
    x = x[None].to(model.device).float()
    layers = [layer] if isinstance(layer, str) else list(layer)
    maps = []
    for name in layers:
        cam = _cam(model.network, name)
        with torch.enable_grad():
            heat = cam(x, class_idx=idx)  # 1 x 1 x h x w, upsampled to the input size
        maps.append(_unit(torch.as_tensor(heat).detach().float().cpu()))
    heat_t = torch.stack(maps).mean(0)
    if guided:
        heat_t = heat_t * guided_saliency(model, x, idx, sigma)
    if model.io_keys is not None:  # a Model Zoo bundle's input is indexed (column, row)
        heat_t = heat_t.transpose(-1, -2)
    rows, columns = (int(s) for s in np.asarray(image).shape[-2:])
    frame = model.square_frame(rows, columns, pixel_aspect)
    if frame is None:
        heat_t = torch.nn.functional.interpolate(heat_t, size=(rows, columns),
                                                 mode="bilinear", align_corners=False)[0, 0]
    else:  # the input was made from the image padded to a square: back onto the square,
        frame_rows, frame_columns, top, left = frame  # then the image's own part of it
        heat_t = torch.nn.functional.interpolate(
            heat_t, size=(frame_rows, frame_columns), mode="bilinear",
            align_corners=False)[0, 0][top:top + rows, left:left + columns]
    return _unit(heat_t).numpy().astype(np.float32)
