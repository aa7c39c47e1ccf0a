"""Load models: MONAI bundles (Model Zoo layout) or bare TorchScript files.

A bundle folder holds::

    configs/metadata.json     name, version, labels, task, input description ...
    configs/inference.json    network_def, preprocessing, inferer, postprocessing
    models/model.pt           state dict for network_def   (and/or)
    models/model.ts           TorchScript

``model.pt`` + ``network_def`` is preferred (an eager module supports Grad-CAM
hooks); ``model.ts`` is the fallback. A bare TorchScript file ``x.ts`` needs a
JSON sidecar ``x.ts.json`` (or ``x.json``) with at least ``labels``; optional
keys: ``name``, ``version``, ``task``, ``spatial_size``, ``gradcam_target_layer``,
``gradcam_guided``, ``gradcam_guided_sigma`` (see :mod:`pipeline.explain`),
``preprocessing`` (a MONAI bundle-syntax transform list).

Every failure is a :class:`BundleError` whose message names the offending file.
Nothing here knows about particular models.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.settings import ModelSpec

__all__ = ["ASPECT_NOTE_RATIO", "BundleError", "LoadedModel", "ModelRegistry", "channels_last",
           "describe", "frozen_trace", "load_model", "resolve_device"]

log = logging.getLogger(__name__)


# A 2-D classifier's result notes an image whose long side is more than this many times
# its short one (see LoadedModel.aspect_note). The demo chest model, trained on square
# phantoms, already misreads a normal chest fitted (padded or squashed) from 1.125:1 (a
# 14 x 17 in cassette is 1.21:1), so the note starts below a usual radiograph's proportions.
ASPECT_NOTE_RATIO = 1.1


class BundleError(Exception):
    """A model bundle or TorchScript file is missing, incomplete or corrupt."""


@dataclass
class LoadedModel:
    """A model ready for inference, with what the pipeline needs to feed it."""

    name: str
    version: str
    task: str  # "classify" or "segment"
    labels: list[str]
    spatial_size: tuple[int, ...] | None
    network: torch.nn.Module
    path: Path
    source: str  # "state_dict" or "torchscript"
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    inferer: dict[str, Any] | None = None
    postprocessing: list[dict[str, Any]] = field(default_factory=list)
    gradcam_layer: str | list[str] | None = None  # several layers: maps are averaged
    gradcam_guided: bool = False  # Guided Grad-CAM: times the guided-backprop saliency
    gradcam_sigma: float = 0.0  # Gaussian smoothing of that saliency, in input pixels
    # a 2-D classifier's image is padded to a square (its minimum, centred) before its
    # preprocessing, so that a resize to a square input keeps the aspect ratio
    # (``pad_to_square`` in the metadata; see :meth:`square_frame`)
    pad_to_square: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    # Model Zoo style: the transforms work on dictionaries (``keys``), from the input
    # key to the output key of ``network_data_format`` (see :meth:`prepare`); None for
    # transforms on bare arrays.
    io_keys: tuple[str, str] | None = None
    # inference.json as written, for references between its sections (``@preprocessing``
    # in an Invertd, ``@bundle_root``) when dictionary transforms are built
    inference_config: dict[str, Any] = field(default_factory=dict, repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # On CPU, run the network as a frozen TorchScript trace (see :func:`frozen_trace`).
    optimize: bool = True
    _pre: Callable[[Any], Any] | None = field(default=None, repr=False)
    # a dictionary bundle's preprocessing and postprocessing, built together (see
    # _build_dictionary_transforms): one attribute, so a caller never pairs one build's
    # preprocessing with another's Invertd
    _pair: tuple[Callable[[Any], Any], Callable[[Any], Any] | None] | None = field(
        default=None, repr=False)
    _inferer: Any = field(default=None, repr=False)
    # the frozen trace (see network_for); tried once, None when refused
    _fast: _Traced | None = field(default=None, repr=False)
    _fast_tried: bool = field(default=False, repr=False)
    _fast_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes (from spatial_size, else from the task)."""
        if self.spatial_size is not None:
            return len(self.spatial_size)
        return 2 if self.task == "classify" else 3

    @functools.cached_property
    def in_channels(self) -> int:
        """The channels the network takes (``num_channels`` of the input in
        ``network_data_format``; 1 when not declared)."""
        try:
            n = self.metadata["network_data_format"]["inputs"]["image"]["num_channels"]
        except (KeyError, TypeError):
            return 1
        return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1

    def uninverted_geometry(self) -> list[str]:
        """The transforms of a Model Zoo bundle's preprocessing that reorient, flip or
        resample the image (Orientationd, Spacingd ...) when its postprocessing has no
        Invertd to undo them: its predictions would land mirrored or displaced on the
        series. Empty when there are none, or they are inverted, or the transforms take
        arrays (the node itself gives those an axial volume and takes the result back).
        """
        if self.io_keys is None or any(_target(t) in _INVERTERS for t in self.postprocessing):
            return []
        return [_target(t) for t in self.preprocessing if _target(t) in _REGRIDDERS]

    @property
    def no_heatmap(self) -> str:
        """Why Grad-CAM cannot explain this model's findings, in a few words ('' when it
        can): no layer named in its metadata, or a TorchScript network (no hooks)."""
        if self.task != "classify":
            return ""
        if not self.gradcam_layer:
            return "no Grad-CAM layer in the model's metadata"
        if self.source == "torchscript":
            return "Grad-CAM needs model.pt, not TorchScript"
        return ""

    def check_gradcam_layers(self) -> None:
        """Raise BundleError when a ``gradcam_target_layer`` is not a layer of the network
        (a typo failed every study that was not Normal), naming the closest ones."""
        if self.no_heatmap or not self.gradcam_layer:
            return
        names = [n for n, _ in self.network.named_modules() if n]
        wanted = [self.gradcam_layer] if isinstance(self.gradcam_layer, str) \
            else list(self.gradcam_layer)
        for layer in wanted:
            if layer not in names:
                close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
                raise BundleError(
                    f"{self.path}: Grad-CAM target layer {layer!r} (gradcam_target_layer) is "
                    f"not a layer of the network; closest: {', '.join(close) or 'none'}")

    @functools.cached_property
    def activation(self) -> str:
        """How a classifier's outputs become probabilities: ``softmax`` (one class of
        several: they sum to 1) or ``sigmoid`` (each finding on its own, the default).
        From the output's ``activation`` in ``network_data_format``, else from an
        Activations(d) in the postprocessing."""
        try:
            outputs = self.metadata["network_data_format"]["outputs"]
            declared = next(iter(outputs.values())).get("activation")
        except (KeyError, TypeError, AttributeError, StopIteration):
            declared = None
        if declared in ("softmax", "sigmoid"):
            return str(declared)
        for t in self.postprocessing:
            if _target(t) in ("Activations", "Activationsd", "ActivationsD", "ActivationsDict"):
                if t.get("softmax") is True:
                    return "softmax"
                if t.get("sigmoid") is True:
                    return "sigmoid"
        return "sigmoid"

    def to(self, device: torch.device | str) -> LoadedModel:
        """Move the network to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        self.network.to(self.device)
        self._fast, self._fast_tried = None, False
        return self

    def without_trace(self) -> LoadedModel:
        """A shallow copy that runs the eager network (hooks, e.g. Grad-CAM, see it)."""
        clone = copy.copy(self)
        clone.optimize = False
        clone._fast, clone._fast_tried = None, False
        clone._fast_lock = threading.Lock()
        return clone

    def preprocess(self, array: np.ndarray[Any, Any], *,
                   pixel_aspect: float = 1.0) -> torch.Tensor:
        """Apply the declared preprocessing to one channel-less image/volume -> C x ....
        ``pixel_aspect``: an image's pixel height over width (see :meth:`square_frame`)."""
        return self.prepare(array, pixel_aspect=pixel_aspect)[0]

    def square_frame(self, rows: int, columns: int, pixel_aspect: float = 1.0,
                     ) -> tuple[int, int, int, int] | None:
        """The frame a rows x columns image is padded to before the preprocessing, as
        (frame rows, frame columns, top, left): when :attr:`pad_to_square` is set (a 2-D
        classifier) and the image is not square, the square (in millimetres: pixels
        ``pixel_aspect`` times as high as wide make a frame of fewer rows) it lies
        centred in, so that the resize to a square input keeps its proportions. None
        when nothing is padded. A heatmap at the input's size maps back onto the image
        through it (:func:`pipeline.explain.gradcam`)."""
        if not self.pad_to_square or self.task != "classify" or rows < 1 or columns < 1:
            return None
        aspect = pixel_aspect if pixel_aspect > 0 else 1.0
        side = max(rows * aspect, float(columns))  # in column spacings
        frame_rows = max(rows, round(side / aspect))
        frame_columns = max(columns, round(side))
        if (frame_rows, frame_columns) == (rows, columns):
            return None
        return (frame_rows, frame_columns, (frame_rows - rows) // 2,
                (frame_columns - columns) // 2)

    def size_refusal(self, rows: int, columns: int) -> str:
        """Why a rows x columns image is too small for this classifier ('' when it is
        not, or the model declares no input size): a side shorter than half the edge of
        the model's input. Such an image (a 32 x 32 thumbnail for a 128 x 128 model) would
        be enlarged several times over into something the model never saw."""
        size = self.spatial_size
        if self.task != "classify" or not size or len(size) != 2:
            return ""
        need = -(-min(size) // 2)  # half the shorter edge, rounded up
        if min(rows, columns) >= need:
            return ""
        return (f"{rows} x {columns} pixels, fewer than {need} a side: less than half the "
                f"{size[0]} x {size[1]} input of model {self.name!r}, too small to classify")

    def aspect_note(self, rows: int, columns: int, pixel_aspect: float = 1.0) -> str:
        """A note for the result when a rows x columns image (of pixels ``pixel_aspect``
        times as high as wide) is far from square, its long side more than
        :data:`ASPECT_NOTE_RATIO` times its short one, and the model's input is a fixed
        size: how the image was made to fit ('' otherwise)."""
        size = self.spatial_size
        if self.task != "classify" or not size or len(size) != 2 or not rows or not columns:
            return ""
        height = rows * (pixel_aspect if pixel_aspect > 0 else 1.0)
        ratio = max(height, columns) / min(height, columns)
        if ratio <= ASPECT_NOTE_RATIO:
            return ""
        shape = f"{rows} x {columns} pixels (aspect ratio {ratio:.2f})"
        if self.pad_to_square:
            return (f"{shape}, padded to a square with its own background (keeping its "
                    f"proportions) before the resize to the model's {size[0]} x {size[1]} "
                    "input: a model trained on square images may read it less reliably")
        return (f"{shape}, resized to the model's {size[0]} x {size[1]} input without keeping "
                "its proportions (squashed): the model may read it less reliably")

    def prepare(self, array: np.ndarray[Any, Any],
                affine: np.ndarray[Any, Any] | None = None, *,
                pixel_aspect: float = 1.0) -> tuple[torch.Tensor, Any]:
        """The declared preprocessing of one channel-less image (rows x columns) or volume
        (slices x rows x columns): the network's input (C x ...) and what
        :meth:`finish` needs to undo it.

        A grey image becomes as many identical channels as the network takes
        (:attr:`in_channels`). A Model Zoo bundle's dictionary transforms get what MONAI's
        ``LoadImaged`` would have given them for the same DICOM: the array indexed
        (column, row[, slice]) and, for a volume, ``affine`` (the node's voxel-to-LPS
        matrix, in that index order) as MONAI's RAS affine, so that its Orientationd and
        Spacingd see the geometry. The bundle's own loader is left out: the node reads
        the DICOM. A model with :attr:`pad_to_square` gets a non-square image (pixels
        ``pixel_aspect`` times as high as wide) padded to a square first.
        """
        self.build_transforms()
        if array.ndim == 2 and (frame := self.square_frame(
                int(array.shape[0]), int(array.shape[1]), pixel_aspect)) is not None:
            array = _padded_frame(array, *frame)
        if self.io_keys is None:
            assert self._pre is not None
            return self._channels(_plain(self._pre(array))), None
        assert self._pair is not None
        pre, post = self._pair
        loaded = _as_loaded(array, affine)
        original = loaded.affine.clone()  # the series' own, for finish to compare with
        data = pre({self.io_keys[0]: loaded})
        return self._channels(_plain(data[self.io_keys[0]])), (data, post, original)

    def build_transforms(self) -> None:
        """Instantiate the declared pre- (and a Model Zoo bundle's post-) processing now,
        rather than with the first image, so that a transform it cannot make fails the
        model at start. Raises BundleError naming the section."""
        if self.io_keys is None:
            if self._pre is None:
                self._pre = _build_transforms(self.preprocessing, self.path)
        elif self._pair is None:
            self._pair = _build_dictionary_transforms(self)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """A one-channel image repeated into the three channels of a network that takes
        colour (an ImageNet-style classifier gets a grey radiograph as R = G = B). Other
        counts are distinct inputs (four MR sequences): the runner refuses those."""
        return x.repeat(3, *([1] * (x.dim() - 1))) if x.shape[0] == 1 and \
            self.in_channels == 3 else x

    def finish(self, output: torch.Tensor, context: Any) -> torch.Tensor:
        """A Model Zoo bundle's postprocessing of the network's ``output`` (C x ...) for
        the input :meth:`prepare` gave ``context`` for, back in the node's index order
        (C x slices x rows x columns); ``output`` as it is for array transforms.

        Its writers are left out (the node writes its own outputs); an ``Invertd`` in it
        brings the prediction back onto the image's own grid. Raises BundleError when the
        prediction's affine is not the input's (its preprocessing reoriented, flipped or
        resampled the image and nothing brought the prediction back): labels on the
        wrong side of the patient are worse than none.
        """
        if self.io_keys is None or context is None:
            return output
        from monai.data.meta_tensor import MetaTensor

        prepared, post, original = context
        image = prepared[self.io_keys[0]]
        pred: Any = output
        if post is not None:
            data = dict(prepared)
            data[self.io_keys[1]] = MetaTensor(output, meta=dict(image.meta))
            pred = post(data)[self.io_keys[1]]
        got = pred.affine if isinstance(pred, MetaTensor) else getattr(image, "affine", None)
        if got is not None and not _same_affine(got, original):
            steps = ", ".join(_target(t) for t in self.preprocessing
                              if _target(t) not in _LOADERS) or "its preprocessing"
            raise BundleError(
                f"{self.path}: its prediction is not on the series' grid (its affine "
                f"{_affine_text(got)} is not the series' {_affine_text(original)}): its "
                f"preprocessing ({steps}) reorients or resamples the image and its "
                "postprocessing does not undo it; it needs an Invertd in its "
                "postprocessing to bring the prediction back")
        plain = _plain(pred)
        # (C, column, row[, slice]) -> (C, [slice,] row, column)
        result: torch.Tensor = plain.permute(0, *range(plain.dim() - 1, 0, -1))
        return result

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the network (through the declared inferer, e.g. a sliding window) -> logits."""
        if self._inferer is None and self.inferer is not None:
            config = self.inference_config or {"inferer": dict(self.inferer)}
            root = self.path if self.path.is_dir() else None
            self._inferer = _parse(config, self.path, "inferer", root)
        batch = batch.to(self.device)
        with torch.no_grad():
            network = self.network_for(batch)
            out = network(batch) if self._inferer is None else self._inferer(batch, network)
        if not isinstance(out, torch.Tensor):
            raise BundleError(f"{self.path}: network returned {type(out).__name__}, not a tensor")
        return out

    def network_for(self, batch: torch.Tensor) -> torch.nn.Module:
        """The module to run ``batch`` through: on CPU, the frozen trace where there is one.

        The trace is taken once, on the first batch, for the sample shape the network
        sees then (a sliding-window inferer's patch, else the batch's sample shape), and
        used only for inputs of that shape: anything else runs the eager network.
        """
        if not self.optimize or self.device.type != "cpu":
            return self.network
        if not self._fast_tried:
            with self._fast_lock:
                if not self._fast_tried:
                    example = self._example(batch)
                    frozen = frozen_trace(self.network, example,
                                          name=f"{self.name}:{self.version}")
                    if frozen is not None:
                        self._fast = _Traced(frozen, self.network, tuple(example.shape[1:]))
                    self._fast_tried = True
        return self.network if self._fast is None else self._fast

    def _example(self, batch: torch.Tensor) -> torch.Tensor:
        """An input of the shape the network itself will see for ``batch``."""
        roi = (self.inferer or {}).get("roi_size")
        if (self._inferer is not None and isinstance(roi, list)
                and len(roi) == batch.dim() - 2
                and all(isinstance(r, int) and r > 0 for r in roi)):
            return batch.new_zeros((1, batch.shape[1], *roi))
        return batch[:1]


class _Traced(torch.nn.Module):
    """A frozen trace for inputs of the sample shape it was checked on, else the network."""

    def __init__(self, frozen: torch.nn.Module, network: torch.nn.Module,
                 sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.frozen, self.network, self.sample_shape = frozen, network, sample_shape

    def forward(self, x: torch.Tensor) -> Any:
        if tuple(x.shape[1:]) == self.sample_shape:
            return self.frozen(x)
        return self.network(x)


def frozen_trace(network: torch.nn.Module, example: torch.Tensor, *,
                 name: str = "model") -> torch.nn.Module | None:
    """``network`` traced on ``example`` and frozen, or None when that is not safe.

    On CPU a frozen trace of the demo classifier runs a forward pass in about 0.55-0.7
    of the eager time (``bench/pipeline.py``): weights become constants and TorchScript
    drops the per-layer Python. A trace records one path through the code, so the result
    is compared with the eager network on random inputs of two batch sizes and refused
    (the eager network is used, with a log line) if it differs or tracing fails.
    """
    generator = torch.Generator().manual_seed(0)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings: the comparison below decides
            traced = torch.jit.trace(network, example, check_trace=False)  # type: ignore[no-untyped-call]
            frozen = torch.jit.freeze(traced.eval())
            for size in (1, 3):
                x = torch.rand((size, *example.shape[1:]), generator=generator,
                               dtype=example.dtype).to(example.device)
                want, got = network(x), frozen(x)
                if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
                    raise TypeError("the network does not return a tensor")
                scale = max(1.0, float(want.abs().max()))
                if want.shape != got.shape or not torch.allclose(
                        got, want, rtol=1e-3, atol=1e-3 * scale):
                    raise ValueError(f"the trace differs from the network at batch size {size}")
    except Exception as exc:
        log.warning("model %s runs eagerly: no frozen trace (%s: %s)", name,
                    type(exc).__name__, exc)
        return None
    log.info("model %s runs as a frozen TorchScript trace", name)
    return frozen  # type: ignore[no-any-return]


def channels_last(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` with its convolution weights in channels-last order (in place).

    oneDNN's convolutions run faster on NHWC/NDHWC data: 20-30 % off a forward pass
    of both demo networks on CPU, with the same results to float rounding. Applied by
    :func:`load_model` for CPU devices only: on GPUs it was not measured.
    """
    ranks = {p.dim() for p in network.parameters()}
    if 5 in ranks:
        network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    elif 4 in ranks:
        network.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return network


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu (:func:`pipeline.engine.select_device`).
    Raises BundleError for a device this machine does not have: moving a model there
    would fail with torch's assertion instead."""
    from pipeline.engine import EngineError, select_device

    try:
        return select_device(device)
    except (EngineError, ValueError) as exc:
        raise BundleError(str(exc)) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BundleError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"corrupt JSON in {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _parser(config: dict[str, Any], root: Path | None) -> Any:
    """A MONAI ConfigParser over a copy of ``config`` (an inference.json), so that its
    sections can refer to each other (``@image_key``, ``@displayable_configs#pixdim``);
    ``@bundle_root`` is the bundle's folder. Only what a parsed section refers to is
    instantiated (its data lists, evaluators and handlers are not)."""
    from monai.bundle.config_parser import ConfigParser

    cfg = copy.deepcopy(config)
    cfg["imports"] = [*cfg.get("imports", []), "$import torch", "$import monai"]
    if root is not None:
        cfg["bundle_root"] = str(root)
    return ConfigParser(cfg)


def _instantiate(parser: Any, key: str, where: Path) -> Any:
    try:
        return parser.get_parsed_content(key)
    except Exception as exc:
        raise BundleError(f"{where}: cannot instantiate '{key}': {exc}") from exc


def _parse(config: dict[str, Any], where: Path, key: str, root: Path | None = None) -> Any:
    """Instantiate section ``key`` of ``config`` (see :func:`_parser`)."""
    return _instantiate(_parser(config, root), key, where)


def _build_transforms(transforms: list[dict[str, Any]], where: Path) -> Callable[[Any], Any]:
    # The node hands the transforms bare arrays (no affine, nothing to invert later)
    # and keeps only the plain tensor they give back, so MONAI's MetaTensor
    # bookkeeping is pure cost: ~40 % of a radiograph's preprocessing. The switch is
    # MONAI's and process-wide, so it stays on once a Model Zoo bundle is built: its
    # Orientationd, Spacingd and Invertd read the geometry from the meta.
    from monai.data.meta_obj import set_track_meta

    with _meta_lock:
        if not _meta_needed:
            set_track_meta(False)
    return _parse(  # type: ignore[no-any-return]
        {"preprocessing": {"_target_": "Compose", "transforms": transforms}}, where,
        "preprocessing")


def _padded_frame(array: np.ndarray[Any, Any], rows: int, columns: int, top: int,
                  left: int) -> np.ndarray[Any, Any]:
    """``array`` placed at (top, left) in a rows x columns frame of its own minimum (the
    background of a radiograph in display convention: air and the unexposed border)."""
    out = np.full((rows, columns), array.min() if array.size else 0, dtype=array.dtype)
    out[top:top + array.shape[0], left:left + array.shape[1]] = array
    return out


def _transform_list(section: Any) -> list[dict[str, Any]]:
    if section is None:
        return []
    if isinstance(section, dict) and "transforms" in section:
        return list(section["transforms"])
    if isinstance(section, list):
        return list(section)
    return [section]


def _plain(value: Any) -> torch.Tensor:
    if hasattr(value, "as_tensor"):  # MetaTensor -> plain tensor
        value = value.as_tensor()
    return torch.as_tensor(value).float()


# A Model Zoo bundle's transforms run from a file loader to a file writer. The node reads
# the DICOM and writes its own outputs, so those are left out; the rest runs as written.
_LOADERS = frozenset({"LoadImage", "LoadImaged", "LoadImageD", "LoadImageDict"})
_WRITERS = frozenset({"SaveImage", "SaveImaged", "SaveImageD", "SaveImageDict"})
# Preprocessing that changes which way the array's axes run, or its spacing, with the
# image's shape possibly unchanged (a flip): without an Invertd a prediction keeps it.
_REGRIDDERS = frozenset(f"{name}{suffix}" for name in ("Orientation", "Spacing", "Flip",
                                                      "Rotate90")
                        for suffix in ("d", "D", "Dict"))
_INVERTERS = frozenset({"Invertd", "InvertD", "InvertDict"})
_meta_lock = threading.Lock()
_meta_needed = False  # once a dictionary bundle is built, MetaTensors stay tracked


def _target(transform: Any) -> str:
    """A transform's class name (``LoadImaged`` from ``monai.transforms.LoadImaged``)."""
    target = transform.get("_target_") if isinstance(transform, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else ""


def _uses_dictionaries(transforms: list[dict[str, Any]]) -> bool:
    return any(isinstance(t, dict) and "keys" in t for t in transforms)


def _io_keys(meta: dict[str, Any]) -> tuple[str, str]:
    """The input and output keys a dictionary bundle names (``image`` and ``pred``)."""
    fmt = meta.get("network_data_format") if isinstance(meta, dict) else None
    keys = []
    for side, default in (("inputs", "image"), ("outputs", "pred")):
        names = list((fmt or {}).get(side) or {}) if isinstance(fmt, dict) else []
        keys.append(str(names[0]) if names else default)
    return keys[0], keys[1]


def _as_loaded(array: np.ndarray[Any, Any], affine: np.ndarray[Any, Any] | None) -> Any:
    """``array`` (rows x columns, or slices x rows x columns) as MONAI's LoadImage gives a
    DICOM image: indexed (column, row[, slice]), no channel, with a RAS affine."""
    from monai.data.meta_tensor import MetaTensor

    loaded = np.transpose(np.asarray(array))  # a view: the transforms copy as they go
    spatial = loaded.ndim
    if affine is None:
        affine = np.eye(4)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)  # LPS->RAS
    if spatial == 2:  # a plane: MONAI's 2-D affine is 3 x 3
        ras = ras[np.ix_([0, 1, 3], [0, 1, 3])]
    tensor = torch.from_numpy(loaded)
    return MetaTensor(tensor, affine=torch.as_tensor(ras), meta={
        "original_channel_dim": float("nan"), "original_affine": ras.copy(),
        "spatial_shape": np.asarray(loaded.shape), "space": "RAS",
        "filename_or_obj": "dicom"})


def _affine_array(affine: Any) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine,
                      np.float64)


def _same_affine(a: Any, b: Any) -> bool:
    """Two affines map voxels to the same places, to a thousandth of a millimetre per
    voxel (float rounding of an inverted resampling)."""
    x, y = _affine_array(a), _affine_array(b)
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-4, atol=1e-3))


def _affine_text(affine: Any) -> str:
    """An affine's rotation-and-spacing part in one line: ``[[-1, 0, 0], ...]``."""
    m = _affine_array(affine)
    n = m.shape[0] - 1
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in np.round(row[:n], 3)) + "]"
                           for row in m[:n]) + "]"


def _build_dictionary_transforms(
        model: LoadedModel) -> tuple[Callable[[Any], Any], Callable[[Any], Any] | None]:
    """A dictionary bundle's preprocessing and postprocessing, from one parser of its
    inference.json so that ``@preprocessing`` in the postprocessing is the very object
    that ran (an Invertd undoes what that object did, and only that)."""
    global _meta_needed
    from monai.data.meta_obj import set_track_meta

    with _meta_lock:  # Orientationd, Spacingd and Invertd read the tensors' meta
        _meta_needed = True
        set_track_meta(True)
    pre = [t for t in model.preprocessing if _target(t) not in _LOADERS]
    post = [t for t in model.postprocessing if _target(t) not in _WRITERS]
    parser = _parser({**model.inference_config,
                      "preprocessing": {"_target_": "Compose", "transforms": pre},
                      "postprocessing": {"_target_": "Compose", "transforms": post}},
                     model.path)
    where = model.path / "configs" / "inference.json"
    return (_instantiate(parser, "preprocessing", where),
            _instantiate(parser, "postprocessing", where) if post else None)


def _labels_from(meta: dict[str, Any]) -> list[str]:
    labels = meta.get("labels")
    if isinstance(labels, list) and all(isinstance(x, str) for x in labels):
        return list(labels)
    try:
        cdef = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        return [str(cdef[k]) for k in sorted(cdef, key=int)]
    except (KeyError, TypeError, ValueError):
        return []


def _spatial_from(meta: dict[str, Any]) -> tuple[int, ...] | None:
    size = meta.get("spatial_size")
    if size is None:
        try:
            size = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
        except (KeyError, TypeError):
            return None
    try:
        return tuple(int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bad spatial size {size!r}") from exc


def _task_from(meta: dict[str, Any]) -> str:
    task = str(meta.get("task", "")).lower()
    if task in ("classify", "classification"):
        return "classify"
    if task in ("segment", "segmentation"):
        return "segment"
    try:
        fmt = meta["network_data_format"]["outputs"]["pred"]["format"]
        return "segment" if fmt == "segmentation" else "classify"
    except (KeyError, TypeError):
        return "classify"


def _node_options(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """The node's own settings of a metadata file (Grad-CAM, ``pad_to_square``),
    validated."""
    layer = meta.get("gradcam_target_layer")
    if layer is not None and not (isinstance(layer, str) or (
            isinstance(layer, list) and layer and all(isinstance(x, str) for x in layer))):
        raise BundleError(f"{where}: 'gradcam_target_layer' must be a layer name or a "
                          f"non-empty list of names, not {layer!r}")
    guided = meta.get("gradcam_guided", False)
    if not isinstance(guided, bool):
        raise BundleError(f"{where}: 'gradcam_guided' must be true or false, not {guided!r}")
    sigma = meta.get("gradcam_guided_sigma", 0.0)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma <= 64:
        raise BundleError(f"{where}: 'gradcam_guided_sigma' must be a number of input "
                          f"pixels in [0, 64], not {sigma!r}")
    pad = meta.get("pad_to_square", False)
    if not isinstance(pad, bool):
        raise BundleError(f"{where}: 'pad_to_square' must be true or false, not {pad!r}")
    return {"gradcam_layer": layer, "gradcam_guided": guided, "gradcam_sigma": float(sigma),
            "pad_to_square": pad}


def _load_torchscript(path: Path) -> torch.nn.Module:
    if not path.is_file():
        raise BundleError(f"missing file: {path}")
    try:
        module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location="cpu")
    except Exception as exc:
        raise BundleError(f"corrupt TorchScript file {path}: {exc}") from exc
    return module


def _load_error(exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` says went wrong, without its advice to load
    with ``weights_only=False`` (running a file's pickled code: the node never does)."""
    text = str(exc).strip()
    if "Weights only load failed" not in text:
        return text.splitlines()[0] if text else type(exc).__name__
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    # Its first sentence: the rest is torch's advice on allowing the global.
    reason = detail[0].strip().split(". ")[0] if detail and "WeightsUnpickler" in text else ""
    return ("not a state dict of tensors that can be loaded without running code"
            + (f" ({reason})" if reason else ""))


def _load_bundle(folder: Path) -> LoadedModel:
    meta_path = folder / "configs" / "metadata.json"
    inf_path = folder / "configs" / "inference.json"
    meta = _read_json(meta_path)
    inference = _read_json(inf_path) if inf_path.is_file() else {}
    pt, ts = folder / "models" / "model.pt", folder / "models" / "model.ts"
    network: torch.nn.Module
    if pt.is_file() and "network_def" in inference:
        network = _parse(inference, inf_path, "network_def", folder)
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BundleError(f"corrupt weights file {pt}: {_load_error(exc)}") from exc
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if isinstance(state, dict) and state and all(
                isinstance(k, str) and k.startswith("module.") for k in state):
            # saved from a DataParallel / DistributedDataParallel wrapper
            state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            network.load_state_dict(state)
        except Exception as exc:
            raise BundleError(f"{pt} does not match network_def of {inf_path}: {exc}") from exc
        source = "state_dict"
    elif ts.is_file():
        network = _load_torchscript(ts)
        source = "torchscript"
    elif pt.is_file():
        raise BundleError(f"{pt} needs 'network_def' in {inf_path}")
    else:
        raise BundleError(f"missing file: {folder / 'models'} has neither model.pt nor model.ts")
    labels = _labels_from(meta)
    if not labels:
        raise BundleError(f"{meta_path}: no 'labels' (or output channel_def)")
    pre = _transform_list(inference.get("preprocessing"))
    return LoadedModel(
        name=str(meta.get("name") or folder.name),
        version=str(meta.get("version", "0")),
        task=_task_from(meta),
        labels=labels,
        spatial_size=_spatial_from(meta),
        network=network.eval(),
        path=folder,
        source=source,
        preprocessing=pre,
        inferer=inference.get("inferer"),
        postprocessing=_transform_list(inference.get("postprocessing")),
        metadata=meta,
        io_keys=_io_keys(meta) if _uses_dictionaries(pre) else None,
        inference_config=inference,
        **_node_options(meta, meta_path),
    )


def _default_preprocessing(task: str, size: tuple[int, ...] | None) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = [{"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"}]
    if task == "classify" and size:
        steps.append({"_target_": "Resize", "spatial_size": list(size), "mode": "area"})
    steps.append({"_target_": "ScaleIntensity", "minv": 0.0, "maxv": 1.0})
    return steps


def _sidecar(path: Path) -> Path:
    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file() and path.with_suffix(".json").is_file():
        sidecar = path.with_suffix(".json")
    return sidecar


def describe(path: str | Path) -> tuple[str, str | None]:
    """A bundle folder's or TorchScript file's task (``classify`` or ``segment``) and
    the input modality its metadata names (``CT``), if any, read without loading it.

    Raises BundleError when it has no metadata to read.
    """
    path = Path(path)
    meta = _read_json(path / "configs" / "metadata.json" if path.is_dir() else _sidecar(path))
    try:
        modality = meta["network_data_format"]["inputs"]["image"]["modality"]
    except (KeyError, TypeError):
        modality = None
    return _task_from(meta), str(modality).upper() if isinstance(modality, str) else None


def _load_file(path: Path) -> LoadedModel:
    sidecar = _sidecar(path)
    meta = _read_json(sidecar)
    network = _load_torchscript(path)
    labels = _labels_from(meta)
    if not labels:
        raise BundleError(f"{sidecar}: no 'labels'")
    task = _task_from(meta)
    size = _spatial_from(meta)
    pre = meta.get("preprocessing")
    return LoadedModel(
        name=str(meta.get("name") or path.stem),
        version=str(meta.get("version", "0")),
        task=task,
        labels=labels,
        spatial_size=size,
        network=network.eval(),
        path=path,
        source="torchscript",
        preprocessing=_transform_list(pre) if pre else _default_preprocessing(task, size),
        inferer=meta.get("inferer"),
        metadata=meta,
        **_node_options(meta, sidecar),
    )


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a bundle folder or a TorchScript file (with JSON sidecar) onto ``device``."""
    path = Path(path)
    if path.is_dir():
        model = _load_bundle(path)
    elif path.is_file():
        model = _load_file(path)
    else:
        raise BundleError(f"missing file: {path} (neither a bundle folder nor a model file)")
    if torch.device(device).type == "cpu":  # measured there; GPUs not (none to hand)
        channels_last(model.network)
    return model.to(device)


_VERSION_PART = re.compile(r"(\d+)|([^\d.]+)")


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(n)) if n else (1, s) for n, s in _VERSION_PART.findall(version))


class ModelRegistry:
    """Holds :class:`ModelSpec` s and loads them on first use (several versions per name).

    The default version of a name is the one whose spec says ``default`` (the
    last such spec wins); without one, the highest version.
    """

    def __init__(self, specs: Iterable[ModelSpec] = (),
                 loader: Callable[[Path, torch.device], LoadedModel] | None = None) -> None:
        self._loader = loader or (lambda p, d: load_model(p, d))
        self._specs: dict[str, list[ModelSpec]] = {}
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._versions: dict[tuple[str, int], str] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: ModelSpec) -> None:
        """Register ``spec`` (not loaded yet)."""
        self._specs.setdefault(spec.name, []).append(spec)

    def names(self) -> list[str]:
        """Registered model names."""
        return sorted(self._specs)

    def _specs_of(self, name: str) -> list[ModelSpec]:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {self.names()}") from None

    def _spec_version(self, spec: ModelSpec) -> str:
        if spec.version is not None:
            return spec.version
        key = (spec.name, id(spec))
        if key not in self._versions:
            model = self._load_spec(spec)
            self._versions[key] = model.version
            self._loaded.setdefault((spec.name, model.version), model)
        return self._versions[key]

    def versions(self, name: str) -> list[str]:
        """All versions registered for ``name``, oldest first."""
        return sorted({self._spec_version(s) for s in self._specs_of(name)}, key=_version_key)

    def default_version(self, name: str) -> str:
        """The version served when a request names none."""
        specs = self._specs_of(name)
        defaults = [s for s in specs if s.default]
        if defaults:
            return self._spec_version(defaults[-1])
        return self.versions(name)[-1]

    def spec(self, name: str, version: str | None = None) -> ModelSpec:
        """The spec of ``name`` at ``version`` (default version when None)."""
        version = version or self.default_version(name)
        for s in reversed(self._specs_of(name)):
            if self._spec_version(s) == version:
                return s
        raise KeyError(f"model {name!r} has no version {version!r}; known: "
                       f"{self.versions(name)}")

    def _load_spec(self, spec: ModelSpec) -> LoadedModel:
        model = self._loader(spec.path, resolve_device(spec.device))
        if spec.version is not None:
            model.version = spec.version
        model.name = spec.name
        model.optimize = spec.optimize
        return model

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model (loading it on first use)."""
        return self.load(self.spec(name, version))

    def load(self, spec: ModelSpec) -> LoadedModel:
        """The loaded model of exactly this registered spec (loading it on first use),
        whatever version it turns out to be: how a runner loads every configured one."""
        key = (spec.name, self._spec_version(spec))
        if key not in self._loaded:
            self._loaded[key] = self._load_spec(spec)
        return self._loaded[key]

    def load_all(self) -> list[LoadedModel]:
        """Load every registered version (e.g. at start-up); raises on the first failure."""
        return [self.get(n, v) for n in self.names() for v in self.versions(n)]
