"""The pipeline runner: DICOM files in, results and artifacts out.

It wires the steps in one place — select the series, load it, run the model
through the batching engine, explain, write artifacts — so the same code serves
node jobs, the HTTP APIs, drop folders and ``dicom-node infer FILE``. Each step
is a plain function of the modules it calls; this class only holds the loaded
models.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from pipeline import artifacts as art
from pipeline.bundle import BundleError, LoadedModel, ModelRegistry, load_model
from pipeline.engine import EngineError, InferenceEngine
from pipeline.explain import gradcam
from pipeline.io import (
    Image2D,
    ImageSizeError,
    InputError,
    Source,
    StudyImage,
    Volume,
    check_one_patient,
    load_ct_volume,
    load_image_2d,
    number_of_frames,
    pixel_aspect,
    select_series,
    study_images,
)
from pipeline.resources import memory_left
from pipeline.settings import ModelSpec, Output, PipelineSpec, Task
from pipeline.types import (
    Artifact,
    ClassificationResult,
    Finding,
    PatientStudy,
    Segment,
    SegmentationResult,
)

log = logging.getLogger(__name__)

NORMAL = "Normal"
ABNORMAL = "Abnormal"
# Seed 001's overall result: a finding that, when present, names the result.
PRESUMPTIVE = {"Tuberculosis": "TB Presumptive"}


class PipelineError(Exception):
    """A pipeline cannot run on this input; the message says what to send instead."""


class NotEnoughMemory(RuntimeError):
    """Too little memory is free now to segment this series (other jobs hold it): a job
    failure the scheduler retries later, unlike :class:`PipelineError`."""


#: Memory a segmentation takes beyond the process's own, per voxel of its series: the
#: volume in float32, the model's preprocessed copy, the label map and the SEG. Measured
#: with bench/pipeline.py on 512 x 512 CTs: 805 MB peak at 100 slices, 1611 MB at 300,
#: so ~4 MB a slice, 15.4 bytes a voxel.
SEGMENT_BYTES_PER_VOXEL = 16


def check_memory(headers: Sequence[Any]) -> None:
    """Refuse a series whose segmentation would not fit in the memory left (see
    :func:`pipeline.resources.memory_left`) instead of having the kernel kill the node.

    Raises:
        PipelineError: it needs more than the machine (or container) has at all.
        NotEnoughMemory: more than is free now.
    """
    left = memory_left()
    if left is None or not headers:
        return
    rows, cols = (int(headers[0].get(k) or 0) for k in ("Rows", "Columns"))
    slices = sum(number_of_frames(h) for h in headers)
    need = rows * cols * slices * SEGMENT_BYTES_PER_VOXEL
    available, total = left
    what = (f"segmenting this series ({slices} slices of {rows} x {cols}) takes about "
            f"{need / 1e9:.1f} GB of memory")
    if need > total:
        raise PipelineError(f"{what}, more than the {total / 1e9:.1f} GB this machine (or "
                            "container) has; send a thicker reconstruction of the study, or "
                            "give the node more memory")
    if need > available:
        raise NotEnoughMemory(f"{what} and {available / 1e9:.1f} GB is free now; the job "
                              "is tried again later")


@dataclass(frozen=True)
class Prediction:
    """A classifier's answer on one image, before any artifact is written."""

    model: LoadedModel
    labels: list[str]
    probabilities: list[float]


@dataclass(frozen=True)
class RunOutput:
    """What one pipeline run produced."""

    result: ClassificationResult | SegmentationResult
    study: PatientStudy
    artifacts: list[Artifact]
    # Seconds spent loading the input (load_s), in the model (compute_s: forward passes,
    # and Grad-CAM for a classifier) and writing artifacts (write_s).
    timings: dict[str, float] = field(default_factory=dict)


class _Network(torch.nn.Module):
    """Serves a loaded model (network plus its declared inferer) to the batching engine."""

    def __init__(self, model: LoadedModel) -> None:
        super().__init__()
        self.model = model
        # the shape of one sample's output, from the first forward pass (the warm-up)
        self.sample_output: tuple[int, ...] | None = None

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model.infer(batch)
        if self.sample_output is None and out.dim() >= 1:
            self.sample_output = tuple(int(n) for n in out.shape[1:])
        return out


def _output_mismatch(model: LoadedModel, sample_output: tuple[int, ...]) -> str:
    """Why a network's output (one sample's shape) does not fit the labels its metadata
    names ('' when it does): a classifier gives a score per label, a segmenter a channel
    per label, background included (a Model Zoo bundle may give one sigmoid channel for
    background and one label: its postprocessing thresholds it). A mismatch silently
    dropped scores, or named labels after the wrong channels."""
    n = len(model.labels)
    if model.task == "classify":
        outputs = int(np.prod(sample_output)) if sample_output else 1
        if outputs != n:
            return (f"the network gives {outputs} outputs, its metadata names {n} labels "
                    f"({', '.join(model.labels)})")
    elif sample_output and sample_output[0] != n and not (
            # one sigmoid channel that a Model Zoo bundle's postprocessing thresholds
            sample_output[0] == 1 and n == 2 and model.io_keys is not None):
        return (f"the network gives {sample_output[0]} output channels, its metadata names "
                f"{n} labels, background included ({', '.join(model.labels)})")
    return ""


#: Modalities whose several images in one series are slices of one volume.
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT", "NM"})


def _slice_stack(headers: Sequence[Any]) -> bool:
    """Whether a series' images are slices of a volume (a CT series, an enhanced MR, or
    images at different positions) rather than separate views (PA and lateral) or the
    frames of a radiograph."""
    if str(headers[0].get("Modality", "") or "").upper() in _CROSS_SECTIONAL:
        return True
    positions = {tuple(round(float(v), 2) for v in h.ImagePositionPatient)
                 for h in headers if h.get("ImagePositionPatient") is not None
                 and len(h.ImagePositionPatient) == 3}
    return len(positions) > 1


def _check_channels(model: LoadedModel, output: torch.Tensor) -> None:
    """Raise PipelineError when a segmenter's output (C x ...) has not a channel per
    label (checked at start when a warm-up ran)."""
    if why := _output_mismatch(model, tuple(int(n) for n in output.shape)):
        raise PipelineError(f"model {model.name!r}: {why}")


def _network_spatial_dims(model: LoadedModel) -> int:
    """The image dimensions the model works on: its network_def's ``spatial_dims`` when it
    says, else :attr:`~LoadedModel.spatial_dims` (its declared input size)."""
    net = model.inference_config.get("network_def")
    dims = net.get("spatial_dims") if isinstance(net, dict) else None
    if isinstance(dims, int) and not isinstance(dims, bool) and dims in (2, 3):
        return dims
    return model.spatial_dims


def _channel_names(model: LoadedModel) -> str:
    """`` (t1c, t1, t2, flair)``: what a bundle says its input channels are, if it does."""
    try:
        names = model.metadata["network_data_format"]["inputs"]["image"]["channel_def"]
        return f" ({', '.join(str(names[k]) for k in sorted(names, key=int))})"
    except (KeyError, TypeError, ValueError, AttributeError):
        return ""


def _probabilities(model: LoadedModel, logits: Any) -> list[float]:
    """A classifier's outputs as probabilities, by its :attr:`~LoadedModel.activation`:
    a sigmoid per finding (multi-label), or a softmax over classes that exclude each
    other (a breast density grade)."""
    x = torch.as_tensor(logits).float().reshape(-1)
    probs = torch.softmax(x, 0) if model.activation == "softmax" else torch.sigmoid(x)
    return [float(p) for p in probs.tolist()]


def parallelism(spec: ModelSpec, model: LoadedModel,
                cpus: int | None = None) -> tuple[int, int | None]:
    """Batcher threads and torch threads per thread for a model (spec values win).

    On CPU a classifier gets min(2, CPUs) workers that split the CPUs: a small
    network's intra-op parallelism scales poorly, and on a busy machine threads
    of one forward pass wait for each other; two single-threaded workers keep
    both cores busy (TorchServe's default layout). A segmentation model runs one
    large volume at a time, so it keeps one worker with all threads; on a GPU
    one worker feeds the device.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    if spec.workers is not None:
        workers = spec.workers
    elif model.device.type == "cpu" and model.task == "classify":
        workers = max(1, min(2, cpus))
    else:
        workers = 1
    threads = spec.threads
    if threads is None and model.device.type == "cpu" and workers > 1:
        threads = max(1, cpus // workers)
    return workers, threads


def label_map(logits: torch.Tensor, slab: int = 16) -> npt.NDArray[np.uint8]:
    """The argmax over the channels (C x Z x ...) as a uint8 label map, ``slab`` slices
    at a time: a whole-volume argmax makes an int64 map first, 8 bytes a voxel (0.6 GB
    for a 512 x 512 x 300 CT)."""
    if logits.shape[0] > 256:
        raise PipelineError(f"{logits.shape[0]} output channels do not fit a uint8 label map")
    out = torch.empty(tuple(logits.shape[1:]), dtype=torch.uint8)
    for z in range(0, int(logits.shape[1]), slab):
        channel_argmax(logits[:, z:z + slab], out[z:z + slab])
    result: npt.NDArray[np.uint8] = out.numpy()
    return result


def channel_argmax(scores: torch.Tensor, out: torch.Tensor) -> None:
    """``scores.argmax(dim=0)`` written into the uint8 ``out``, the first maximum winning
    as in torch. A running maximum over the channels: torch's own argmax over the
    outermost dimension of a C x Z x Y x X tensor strides through memory and took
    0.2 s for a 5 x 300 x 96 x 96 map (this: 0.03 s; 6 s against 0.8 s at 512 x 512)."""
    best = scores[0].clone()
    out.zero_()
    for c in range(1, int(scores.shape[0])):
        out.masked_fill_(scores[c] > best, c)
        torch.maximum(best, scores[c], out=best)


@dataclass(frozen=True)
class AxialView:
    """How a volume's array (slice, row, column) becomes the order volume models are
    trained on, axial slices with every index growing along a patient axis (LPS): z
    from feet to head, then y from anterior to posterior, then x from right to left.

    ``axes``: the array axis that becomes each of (z, y, x); ``flips``: the axes, after
    the transpose, that run backwards. An axial series as scanners write it needs
    neither; a coronal or sagittal series (a reformat sent on its own) needs both, and
    without them the model saw the body on its side.
    """

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, ...] = ()

    @classmethod
    def of(cls, direction: Sequence[Sequence[float]]) -> AxialView:
        """From a volume's ``direction`` (row direction, column direction, normal):
        each array axis goes to the patient axis it runs closest to. An orientation
        where two axes are closest to the same patient axis is left as it is."""
        # array axis 0 runs along the normal, 1 along the column direction, 2 along the row
        along = [np.asarray(direction[2], float), np.asarray(direction[1], float),
                 np.asarray(direction[0], float)]
        patient = [int(np.argmax(np.abs(v))) for v in along]  # 0 x, 1 y, 2 z
        if sorted(patient) != [0, 1, 2]:
            return cls()
        axes = (patient.index(2), patient.index(1), patient.index(0))
        flips = tuple(k for k, a in enumerate(axes) if along[a][patient[a]] < 0)
        return cls(axes, flips)

    @property
    def identity(self) -> bool:
        return self.axes == (0, 1, 2) and not self.flips

    def apply(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``array`` in the models' order (a copy, unless nothing changes)."""
        if self.identity:
            return array
        return np.ascontiguousarray(np.flip(np.transpose(array, self.axes), self.flips))

    def undo(self, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """An array in the models' order (a label map) back in the volume's order."""
        if self.identity:
            return array
        return np.ascontiguousarray(
            np.transpose(np.flip(array, self.flips), np.argsort(self.axes)))

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        return (float(spacing[self.axes[0]]), float(spacing[self.axes[1]]),
                float(spacing[self.axes[2]]))


def model_spacing(model: LoadedModel) -> tuple[float, float, float] | None:
    """The voxel spacing (z, y, x) in mm the model was trained at, from its metadata
    (``network_data_format.inputs.image.pixdim_zyx_mm``), or None when not declared."""
    try:
        image = model.metadata["network_data_format"]["inputs"]["image"]
        z, y, x = (float(v) for v in image["pixdim_zyx_mm"])
    except (KeyError, TypeError, ValueError):
        return None
    return (z, y, x) if min(z, y, x) > 0 else None


def model_grid(shape: tuple[int, ...], spacing: Sequence[float],
               trained: tuple[float, float, float] | None,
               tolerance: float = 0.1) -> tuple[int, int, int] | None:
    """The Z x Y x X shape that puts a ``shape`` volume of ``spacing`` mm at the model's
    training spacing, or None when it is already within ``tolerance`` (relative) of it
    or the model declares none."""
    if trained is None or len(shape) != 3:
        return None
    if all(abs(s - t) <= tolerance * t for s, t in zip(spacing, trained, strict=True)):
        return None
    return tuple(max(1, round(n * s / t))  # type: ignore[return-value]
                 for n, s, t in zip(shape, spacing, trained, strict=True))


def resample(tensor: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """C x Z x Y x X to C x ``grid``: area averaging where it shrinks (no aliasing of
    fine detail), trilinear where it grows."""
    x = tensor.float()[None]
    smaller = tuple(min(g, int(n)) for g, n in zip(grid, x.shape[2:], strict=True))
    if smaller != tuple(x.shape[2:]):
        x = torch.nn.functional.interpolate(x, size=smaller, mode="area")
    if smaller != grid:
        x = torch.nn.functional.interpolate(x, size=grid, mode="trilinear",
                                            align_corners=False)
    return x[0]


def resampled_label_map(logits: torch.Tensor, shape: tuple[int, ...],
                        slab: int = 8) -> npt.NDArray[np.uint8]:
    """The label map at the source ``shape`` (Z x Y x X) of C x z x y x x ``logits``
    made at the model's grid: linear along z at the model's in-plane size first (cheap),
    then bilinear in-plane and argmax ``slab`` output slices at a time (trilinear is
    separable, so the order changes nothing), so the full-size C x Z x Y x X float map
    never exists (1.6 GB for five labels on a 512 x 512 x 300 CT)."""
    if logits.shape[0] > 256:
        raise PipelineError(f"{logits.shape[0]} output channels do not fit a uint8 label map")
    nz, ny, nx = (int(v) for v in shape)
    columns = torch.nn.functional.interpolate(  # C x Z x y x x
        logits.float()[None], size=(nz, int(logits.shape[2]), int(logits.shape[3])),
        mode="trilinear", align_corners=False)[0]
    out = torch.empty((nz, ny, nx), dtype=torch.uint8)
    for z0 in range(0, nz, slab):
        planes = torch.nn.functional.interpolate(  # slab x C x Y x X
            columns[:, z0:z0 + slab].transpose(0, 1), size=(ny, nx), mode="bilinear",
            align_corners=False)
        channel_argmax(planes.transpose(0, 1), out[z0:z0 + slab])
    result: npt.NDArray[np.uint8] = out.numpy()
    return result


def patient_study(header: Any, patient_id: str | None = None) -> PatientStudy:
    """Patient and study attributes of a source header (``patient_id`` overrides)."""

    def text(keyword: str) -> str:
        return str(header.get(keyword, "") or "").strip()

    return PatientStudy(
        patient_id=patient_id if patient_id is not None else text("PatientID"),
        patient_name=text("PatientName"),
        patient_sex=text("PatientSex"),
        patient_age=text("PatientAge"),
        patient_birth_date=text("PatientBirthDate"),
        study_instance_uid=text("StudyInstanceUID"),
        study_date=text("StudyDate"),
        accession_number=text("AccessionNumber"),
        study_description=text("StudyDescription"),
    )


def folder_patient_id(header: Any, path: Path | None = None) -> str | None:
    """The patient ID to name results by when the source's own cannot name a folder
    (none at all, as anonymised files may have, or one with a path separator or control
    character): the ID's safe characters, else the file's name. None when the source's
    PatientID will do."""
    pid = str(header.get("PatientID", "") or "").strip()
    try:
        art.validate_patient_id(pid)
        return None
    except ValueError:
        pass
    safe = _folder_safe(pid)
    if not safe and path is not None:
        safe = _folder_safe(path.stem)
    if len(safe) > art.MAX_PATIENT_ID:  # cut, with a hash that keeps two such IDs apart
        digest = hashlib.sha256(safe.encode()).hexdigest()[:12]
        safe = f"{safe[:art.MAX_PATIENT_ID - 13]}-{digest}"
    return safe or "no-patient-id"


def _folder_safe(text: str) -> str:
    """``text``'s safe characters; a run of dots becomes one, as the check refuses '..'
    anywhere (``SMITH..J`` named no folder, and its every job failed)."""
    return re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]+", "_", text)).strip("._")


def result_summary(result: ClassificationResult | SegmentationResult) -> dict[str, Any]:
    """A result as JSON: overall result and findings, or the segments' volumes."""
    notes = {"notes": list(result.notes)} if result.notes else {}
    if isinstance(result, ClassificationResult):
        return {"result": result.result,
                "findings": [{"name": f.name, "presence": f.presence,
                              "confidence": f.confidence} for f in result.findings], **notes}
    return {"segments": [{"name": s.name, "volume_ml": s.volume_ml} for s in result.segments],
            **notes}


def overall_result(findings: Sequence[Finding]) -> str:
    """``Normal`` when nothing is present, a presumptive label's result, else ``Abnormal``."""
    present = [f.name for f in findings if f.presence]
    if not present:
        return NORMAL
    for name, result in PRESUMPTIVE.items():
        if name in present:
            return result
    return ABNORMAL


class PipelineRunner:
    """Holds the models of the configured pipelines and runs them.

    ``start()`` loads and warms every model; ``close()`` stops the engine's
    threads. Thread-safe: many jobs and requests may run at once.
    """

    def __init__(
        self,
        models: Sequence[ModelSpec],
        pipelines: Sequence[PipelineSpec],
        resolve: Callable[[ModelSpec], Path] = lambda spec: spec.path,
    ) -> None:
        self.pipelines = {p.name: p for p in pipelines}
        self._specs = [s.model_copy(update={"path": resolve(s)}) for s in models]
        self.registry = ModelRegistry(self._specs, loader=lambda p, d: load_model(p, d))
        self.engine = InferenceEngine()
        self._explainers: dict[tuple[str, str], tuple[LoadedModel, threading.Lock]] = {}
        self._lock = threading.Lock()
        self.failed: dict[str, str] = {}
        # what a loaded model will not do, by model name (no heatmap): logged at start,
        # printed by check-config --models
        self.notes: dict[str, list[str]] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load every model version into the engine; a model that fails is reported in
        ``failed`` (and its pipelines fail their jobs) rather than stopping the node."""
        for spec in self._specs:
            try:
                # This spec's own model: with versions read from metadata.json
                # (spec.version None) get(name, None) would give every spec the default.
                model = self.registry.load(spec)
                if model.in_channels not in (1, 3):
                    raise BundleError(
                        f"{model.path}: its network takes {model.in_channels} channels"
                        f"{_channel_names(model)}; the node gives a model one series (a "
                        "grey image, or the same image in each of 3 colour channels)")
                model.build_transforms()
                if model.task == "segment" and model.spatial_dims != 3:
                    raise BundleError(
                        f"{model.path}: it segments {model.spatial_dims}-D images; the node "
                        "segments 3-D series (CT volumes), and classifies 2-D images")
                if model.task == "classify" and (dims := _network_spatial_dims(model)) != 2:
                    raise BundleError(
                        f"{model.path}: it classifies {dims}-D images; the node classifies "
                        "2-D images (one radiograph), and segments 3-D series")
                model.check_gradcam_layers()
                if model.task == "segment" and (regrid := model.uninverted_geometry()):
                    raise BundleError(
                        f"{model.path}: its preprocessing has {', '.join(regrid)} and its "
                        "postprocessing no Invertd: its labels would land mirrored or "
                        "displaced on the series. Add an Invertd of the prediction to its "
                        "postprocessing (as the Model Zoo's segmentation bundles have)")
                # One channel of the model's input size; a segmenter's (its sliding
                # window's patch) warms up the window and takes the CPU trace at start,
                # not during the first study.
                sample = None if model.spatial_size is None else (model.in_channels,
                                                                  *model.spatial_size)
                workers, threads = parallelism(spec, model)
                network = _Network(model)
                self.engine.add_model(
                    spec.name, network, version=model.version, default=spec.default,
                    device=spec.device, max_batch=spec.max_batch if model.task == "classify"
                    else 1, max_delay_ms=spec.max_delay_ms, warmup=spec.warmup,
                    sample_shape=sample, workers=workers, threads=threads,
                )
                # the warm-up's output (when there was one) against the labels
                if network.sample_output is not None and (
                        why := _output_mismatch(model, network.sample_output)):
                    self.engine.remove(spec.name, model.version)
                    raise BundleError(f"{model.path}: {why}")
            except (BundleError, EngineError, OSError, KeyError, ValueError,
                    RuntimeError) as exc:  # EngineError: it cannot run its own warm-up
                self.failed[spec.name] = f"{type(exc).__name__}: {exc}"
                continue
            if model.no_heatmap:
                note = f"findings come without a heatmap: {model.no_heatmap}"
                self.notes.setdefault(spec.name, []).append(note)
                log.info("model %s %s: %s", spec.name, model.version, note)

    def mismatched(self) -> dict[str, str]:
        """Pipelines whose task is not their loaded model's (a ``task: segment`` pipeline
        on a classifier), each with the reason: every job of theirs would fail."""
        out = {}
        for spec in self.pipelines.values():
            try:
                model = self.model(spec.model, spec.model_version)
            except KeyError:  # failed or unknown: reported as such
                continue
            if model.task != spec.task.value:
                out[spec.name] = (f"task {spec.task.value}, but model {spec.model!r} "
                                  f"{'classifies' if model.task == 'classify' else 'segments'}"
                                  " (its metadata)")
        return out

    def close(self) -> None:
        self.engine.close()

    @property
    def specs(self) -> list[ModelSpec]:
        """The configured model versions (paths resolved), loaded or not."""
        return list(self._specs)

    # -- models --------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        """A loaded model; raises KeyError naming what exists."""
        if name in self.failed:
            raise KeyError(f"model {name!r} failed to load: {self.failed[name]}")
        return self.registry.get(name, version)

    def _explainer(self, model: LoadedModel) -> tuple[LoadedModel, threading.Lock]:
        """A private eager copy for Grad-CAM: its hooks must not see the engine's batches."""
        key = (model.name, model.version)
        with self._lock:
            if key not in self._explainers:
                clone = model.without_trace()
                clone.network = copy.deepcopy(model.network).to(model.device).eval()
                clone._pre = None
                self._explainers[key] = (clone, threading.Lock())
            return self._explainers[key]

    def classifier(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model ``name`` (``version``, else its default) if it classifies.

        Raises KeyError (unknown or failed model, unknown version) or PipelineError.
        """
        model = self.model(name, version)
        if model.task != "classify":
            raise PipelineError(f"model {name!r} segments; it does not classify images")
        return model

    def predict(self, image: npt.NDArray[np.float32], name: str,
                version: str | None = None) -> Prediction:
        """Classify one H x W image in [0, 1] through the batching engine."""
        model = self.classifier(name, version)
        out = self.engine.infer(name, model.preprocess(image), version=model.version)
        return Prediction(model, list(model.labels), _probabilities(model, out))

    async def predict_async(self, model: LoadedModel, tensor: torch.Tensor) -> Prediction:
        """Classify one preprocessed sample (``model.preprocess``'s output) from asyncio.

        The sample joins the engine's next batch for that model; the loop is not blocked.
        """
        out = await self.engine.infer_async(model.name, tensor, version=model.version)
        return Prediction(model, list(model.labels), _probabilities(model, out))

    def embed(self, image: npt.NDArray[np.float32], name: str, version: str | None = None,
              *, pixel_aspect: float = 1.0) -> list[float]:
        """The classifier's penultimate features (the input of its last linear layer).

        They come from the Grad-CAM copy of the network (the batched one's forward pass
        cannot be hooked), and count in the model's statistics as any inference of it:
        one request of batch size 1 that succeeded, or one that failed.
        """
        model = self.model(name, version)
        served = self.engine.get(model.name, model.version)
        t0 = time.perf_counter_ns()
        try:
            clone, lock = self._explainer(model)
            last = [m for m in clone.network.modules() if isinstance(m, torch.nn.Linear)]
            if not last:
                raise PipelineError(f"model {name!r} has no linear output layer to embed with")
            captured: list[torch.Tensor] = []
            with lock:
                t1 = time.perf_counter_ns()  # until now: behind Grad-CAM or another embedding
                handle = last[-1].register_forward_hook(
                    lambda _m, inp, _out: captured.append(inp[0].detach()))
                try:
                    x = clone.preprocess(image, pixel_aspect=pixel_aspect)[None].to(
                        clone.device)
                    t2 = time.perf_counter_ns()
                    with torch.inference_mode():
                        clone.network(x)
                    features = captured[0].reshape(-1).cpu()  # waits for the device's work
                    t3 = time.perf_counter_ns()
                finally:
                    handle.remove()
            vector = [float(v) for v in features.tolist()]
        except Exception:
            served.record_failure(time.perf_counter_ns() - t0)
            raise
        served.record_unbatched(queue_ns=t1 - t0, input_ns=t2 - t1, infer_ns=t3 - t2,
                                output_ns=time.perf_counter_ns() - t3)
        return vector

    # -- pipelines -------------------------------------------------------------------------

    def spec(self, pipeline: str) -> PipelineSpec:
        try:
            return self.pipelines[pipeline]
        except KeyError:
            raise PipelineError(
                f"pipeline {pipeline!r} is not configured; configured: "
                f"{', '.join(sorted(self.pipelines)) or 'none'}") from None

    def run(
        self,
        pipeline: str,
        files: Sequence[Source],
        out_dir: Path,
        *,
        patient_id: str | None = None,
        outputs: Collection[Output] | None = None,
        cancelled: threading.Event | None = None,
    ) -> RunOutput:
        """Run ``pipeline`` on a study's files and write its artifacts under ``out_dir``.

        ``files`` are paths, or headers already read (``stop_before_pixels``) that keep
        their file name: the pixels are read from the file.

        Raises PipelineError or InputError (from :mod:`pipeline.io`) with a message a
        person can act on when the input cannot be used.
        """
        spec = self.spec(pipeline)
        if not files:
            raise PipelineError("the job has no input files")
        try:
            check_one_patient(files)
        except InputError as exc:  # IDs go to the job's error, not to the log
            log.warning("pipeline %s: the study's instances name more than one patient; "
                        "not run", spec.name)
            raise exc from None
        selected = select_series(list(files), spec.series)
        if patient_id is None:  # results go in <patient_id>/: it must name a folder
            patient_id = folder_patient_id(selected.headers[0], selected.paths[0])
        wanted = set(outputs) if outputs is not None else set(spec.outputs)
        if cancelled is not None and cancelled.is_set():
            raise PipelineError("cancelled")
        if spec.task is Task.CLASSIFY:
            images = sum(number_of_frames(h) for h in selected.headers)
            if images > 1 and _slice_stack(selected.headers):
                raise PipelineError(
                    f"model {spec.model!r} classifies one 2-D image (a radiograph); the "
                    f"series it was given is a stack of {images} "
                    f"{selected.modality or 'image'} slices. Send a single image, or give "
                    "the pipeline series rules (modalities) that leave such series out")
            model = self.classifier(spec.model, spec.model_version)
            read, unread = study_images(selected, spec.series.max_images,
                                        too_small=model.size_refusal)
            return self._classify(spec, read, unread, out_dir, patient_id, wanted)
        check_memory(selected.headers)
        return self._segment(spec, selected.sources, out_dir, patient_id, wanted)

    def classify(self, spec: PipelineSpec, image: Image2D, patient_id: str | None = None,
                 *, explain: bool = True) -> tuple[ClassificationResult, PatientStudy]:
        """Findings, overall result and heatmap for one loaded image.

        With ``explain=False`` Grad-CAM is skipped and ``heatmap`` is ``None`` even when
        the result is not Normal (for callers that need the findings only, or outputs
        that show no heatmap: the artifact writers refuse it for those that do). A model
        Grad-CAM cannot explain (:attr:`~LoadedModel.no_heatmap`) gives no heatmap
        either, and says why in ``heatmap_note``.
        """
        return self.classify_many(spec, [image], [patient_id], explain=explain)[0]

    def classify_many(
        self, spec: PipelineSpec, images: Sequence[Image2D],
        patient_ids: Sequence[str | None] | None = None, *, explain: bool = True,
    ) -> list[tuple[ClassificationResult, PatientStudy]]:
        """:meth:`classify` for several loaded images handed over together.

        Every image is preprocessed first and then submitted to the engine at once, so
        that they share forward passes (up to the model's ``max_batch``) instead of
        each waiting for its own. Results come back in the order of ``images``.
        Raises KeyError or PipelineError as :meth:`classifier`, or the model's error.
        """
        if patient_ids is None:
            patient_ids = [None] * len(images)
        if len(patient_ids) != len(images):
            raise ValueError(f"{len(patient_ids)} patient IDs given for {len(images)} images")
        model = self.classifier(spec.model, spec.model_version)
        for image in images:  # a thumbnail would be enlarged into what the model never saw
            if why := model.size_refusal(*image.pixels.shape[-2:]):
                raise ImageSizeError(f"{why}; send the full-size image", path=image.path)
        # Preprocess everything before the first submit: the batcher's max_delay_ms
        # starts with the first request, and must not be spent waiting for our own
        # preprocessing of the others.
        aspects = [pixel_aspect(image) for image in images]
        tensors = [model.preprocess(image.pixels, pixel_aspect=aspect)
                   for image, aspect in zip(images, aspects, strict=True)]
        futures = [self.engine.submit(model.name, t, version=model.version) for t in tensors]
        out: list[tuple[ClassificationResult, PatientStudy]] = []
        for image, aspect, pid, future in zip(images, aspects, patient_ids, futures,
                                              strict=True):
            probabilities = _probabilities(model, future.result())
            if len(probabilities) != len(model.labels):  # loaded without a warm-up
                raise PipelineError(f"model {model.name!r}: "
                                    f"{_output_mismatch(model, (len(probabilities),))}")
            findings = [Finding(label, p >= spec.threshold, round(p, 4))
                        for label, p in zip(model.labels, probabilities, strict=True)]
            result = overall_result(findings)
            heatmap = None
            if explain and result != NORMAL and not model.no_heatmap:
                top = max((f for f in findings if f.presence), key=lambda f: f.confidence)
                clone, lock = self._explainer(model)
                with lock:
                    heatmap = gradcam(clone, image.pixels, top.name, pixel_aspect=aspect)
            fitted = model.aspect_note(image.pixels.shape[-2], image.pixels.shape[-1], aspect)
            out.append((ClassificationResult(
                model_name=model.name, model_version=model.version, result=result,
                findings=findings, image=image.pixels, heatmap=heatmap, source_path=image.path,
                sop_instance_uid=image.sop_instance_uid,
                series_instance_uid=image.series_instance_uid,
                heatmap_note=model.no_heatmap if result != NORMAL else "",
                notes=[f"the image is {fitted}"] if fitted else [],
            ), patient_study(image.header, pid)))
        return out

    def _classify(self, spec: PipelineSpec, read: Sequence[StudyImage],
                  unread: Sequence[str], out_dir: Path, patient_id: str | None,
                  wanted: set[Output]) -> RunOutput:
        """Classify every image of ``read`` (the study's eligible frontal images, see
        :func:`~pipeline.io.study_images`) and report each finding at its highest
        probability across them, shown on the image that drove the result: the one
        with the highest probability of the leading finding present, else the first.
        ``unread`` (images left out, why) goes to the result's notes."""
        t0 = time.perf_counter()
        images = [load_image_2d(ref.source, modalities=spec.series.modalities or None,
                                frame=ref.frame) for ref in read]
        for image in images:
            if image.upright_from:  # the PNGs and the report then differ from the stored image
                log.info("image turned upright from Patient Orientation %s",
                         image.upright_from)
        t1 = time.perf_counter()
        each = self.classify_many(spec, images, [patient_id] * len(images), explain=False)
        findings = [
            Finding(first.name, any(r.findings[k].presence for r, _ in each),
                    max(r.findings[k].confidence for r, _ in each))
            for k, first in enumerate(each[0][0].findings)]
        result_name = overall_result(findings)
        shown = 0
        if result_name != NORMAL:
            top = max((f for f in findings if f.presence), key=lambda f: f.confidence)
            k = [f.name for f in findings].index(top.name)
            shown = max(range(len(each)), key=lambda i: (each[i][0].findings[k].confidence, -i))
        chosen, study = each[shown]
        image = images[shown]
        model = self.classifier(spec.model, spec.model_version)
        heatmap = None
        # Grad-CAM (a backward pass) only for outputs that show the heatmap
        if wanted & art.HEATMAP_OUTPUTS and result_name != NORMAL and not model.no_heatmap:
            top = max((f for f in findings if f.presence), key=lambda f: f.confidence)
            clone, lock = self._explainer(model)
            with lock:
                heatmap = gradcam(clone, image.pixels, top.name,
                                  pixel_aspect=pixel_aspect(image))
        notes: list[str] = []
        label = read[shown].label
        if len(read) > 1:
            notes.append(
                f"classified {len(read)} images of the study ({'; '.join(r.label for r in read)}); "
                "each finding is given at its highest probability across them; the image "
                f"shown and referenced is {label}")
        elif unread or image.number_of_frames > 1:  # which one, said (a 2-frame CR: frame 2)
            notes.append(f"classified {label}")
        if unread:
            notes.append(f"not read: {'; '.join(unread)}")
        # how an image was made ready for the model, where a person should know it (the
        # first of several windows, DICOM's default, clipped it)
        notes.extend(f"{ref.label}: {note}" for ref, loaded in zip(read, images, strict=True)
                     for note in loaded.notes)
        # an image far from square: how it was fitted to the model's input (each frame
        # of a multi-frame image has the same shape: one note names them together)
        aspects: dict[str, list[str]] = {}
        for ref, loaded in zip(read, images, strict=True):
            if aspect := model.aspect_note(loaded.pixels.shape[-2], loaded.pixels.shape[-1],
                                           pixel_aspect(loaded)):
                aspects.setdefault(aspect, []).append(ref.label)
        for aspect, labels in aspects.items():
            notes.append(f"the image is {aspect}" if len(read) == 1
                         else f"{'; '.join(labels)}: {aspect}")
        result = replace(
            chosen, result=result_name, findings=findings, heatmap=heatmap,
            heatmap_note=model.no_heatmap if result_name != NORMAL else "",
            frame_number=image.frame_index + 1 if image.number_of_frames > 1 else None,
            notes=notes)
        for note in notes:
            # an image of the study left unread is worth a warning: the result is not
            # from everything that was sent; so is one fitted to the model's input
            log.log(logging.WARNING if unread or aspects else logging.INFO,
                    "pipeline %s: %s", spec.name, note)
        t2 = time.perf_counter()
        # the SR names, for each finding, the image its confidence came from (the one
        # shown first when they tie)
        sources = {}
        if len(images) > 1:
            for k, f in enumerate(findings):
                i = max(range(len(each)), key=lambda i: (
                    each[i][0].findings[k].confidence, i == shown, -i))
                frame = images[i].frame_index + 1 if images[i].number_of_frames > 1 else None
                sources[f.name] = (images[i].header, frame)
        files = art.write_classification_artifacts(
            result, study, image.header, out_dir, wanted,
            series=self._series_info(result.model_name, result.model_version),
            sc=spec.secondary_capture, finding_sources=sources,
            sources=[i.header for i in images],
            finding_codes={label: c.to_code() for label, c in spec.codes.items()})
        timings = {"load_s": t1 - t0, "compute_s": t2 - t1, "write_s": time.perf_counter() - t2}
        return RunOutput(result, study, files, timings)

    def _segment(self, spec: PipelineSpec, sources: Sequence[Any], out_dir: Path,
                 patient_id: str | None, wanted: set[Output]) -> RunOutput:
        model = self.model(spec.model, spec.model_version)
        if model.task != "segment":
            raise PipelineError(f"model {spec.model!r} classifies; it does not segment")
        t0 = time.perf_counter()
        volume = load_ct_volume(list(sources),
                                modalities=spec.series.modalities or ("CT",))
        if model.io_keys is None:
            labels, t1 = self._labels_axial(spec, model, volume)
        else:
            labels, t1 = self._labels_by_bundle(spec, model, volume)
        t2 = time.perf_counter()
        if labels.shape != volume.array.shape:
            raise PipelineError(f"model {spec.model!r} returned a {labels.shape} label map "
                                f"for a {volume.array.shape} volume")
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        names = list(model.labels)
        segments = [Segment(i, names[i] if i < len(names) else f"label {i}",
                            round(float((labels == i).sum()) * voxel_ml, 2))
                    for i in range(1, max(len(names), int(labels.max()) + 1))]
        header = volume.headers[0]
        study = patient_study(header, patient_id)
        notes = []
        if Output.SEG in wanted and (volume.resampled or not art.seg_can_reference(
                volume.headers, volume.frames)):
            # A SEG references its source 1:1: slices that were interpolated cannot be
            # referenced, nor the frames of several multi-frame objects (one at most).
            wanted = wanted - {Output.SEG}
            why = ("the spacing between its slices varies by more than 1 %, so the series "
                   "was resampled to even slices and a SEG can only label the slices that "
                   "were sent" if volume.resampled else
                   "its frames come from several multi-frame objects, and a SEG references "
                   "the frames of one")
            notes.append(f"no SEG written: {why}; the volumes and other outputs are from "
                         "the resampled series" if volume.resampled else
                         f"no SEG written: {why}")
            log.warning("pipeline %s: %s", spec.name, notes[-1])
        result = SegmentationResult(
            model_name=model.name, model_version=model.version, labels=labels,
            segments=segments, volume=volume.array.astype(np.float32, copy=False),
            spacing=tuple(float(s) for s in volume.spacing),  # type: ignore[arg-type]
            source_paths=[Path(p) for p in volume.paths if p is not None],
            source_frames=volume.frames,
            series_instance_uid=volume.series_instance_uid, notes=notes,
        )
        files = art.write_segmentation_artifacts(
            result, study, volume.headers, out_dir, wanted,
            series=self._series_info(model.name, model.version), sc=spec.secondary_capture,
            codes_by_name={label: c.segment_codes() for label, c in spec.codes.items()})
        timings = {"load_s": t1 - t0, "compute_s": t2 - t1, "write_s": time.perf_counter() - t2}
        return RunOutput(result, study, files, timings)

    def _labels_axial(self, spec: PipelineSpec, model: LoadedModel,
                      volume: Volume) -> tuple[npt.NDArray[np.uint8], float]:
        """The label map of ``volume`` (its own slice order) from a model whose transforms
        take arrays: the volume in axial order, at the model's spacing when it declares
        one (``pixdim_zyx_mm``); and when the input was ready."""
        view = AxialView.of(volume.direction)
        axial = view.apply(volume.array)
        tensor = model.preprocess(axial)
        grid = model_grid(tuple(tensor.shape[1:]), view.spacing(volume.spacing),
                          model_spacing(model))
        if grid is not None:  # the model only knows organs at the size it was trained on
            tensor = resample(torch.as_tensor(tensor), grid)
        ready = time.perf_counter()
        logits = torch.as_tensor(self.engine.infer(spec.model, tensor,
                                                   version=model.version))
        del tensor
        _check_channels(model, logits)
        if grid is not None:
            labels = resampled_label_map(logits, tuple(axial.shape))
        else:
            labels = label_map(logits)
        del logits, axial  # C x the volume in float32: not kept while the artifacts are written
        return view.undo(labels), ready  # the source's slices, as the SEG references them

    def _labels_by_bundle(self, spec: PipelineSpec, model: LoadedModel,
                          volume: Volume) -> tuple[npt.NDArray[np.uint8], float]:
        """The label map of ``volume`` from a Model Zoo bundle (dictionary transforms):
        its own preprocessing orients and resamples the volume from its geometry, and its
        postprocessing (an Invertd) brings the prediction back; and when the input was
        ready."""
        tensor, context = model.prepare(volume.array, volume.affine())
        ready = time.perf_counter()
        out = torch.as_tensor(self.engine.infer(spec.model, tensor, version=model.version))
        del tensor
        _check_channels(model, out)
        try:
            pred = model.finish(out, context)
        except BundleError as exc:  # the prediction is not on the series' grid
            raise PipelineError(f"model {spec.model!r}: {exc}") from exc
        del out, context
        if tuple(pred.shape[1:]) != volume.shape:
            raise PipelineError(
                f"model {spec.model!r} gave a {tuple(pred.shape[1:])} prediction for a "
                f"{volume.shape} series: a bundle whose preprocessing reorients or resamples "
                "needs an Invertd in its postprocessing to bring the prediction back")
        if pred.shape[0] > 1:  # scores per channel
            return label_map(pred), ready
        labels: npt.NDArray[np.uint8] = (  # one channel: labels already (AsDiscreted)
            pred[0].round().clamp(0, 255).to(torch.uint8).numpy())
        return labels, ready

    @staticmethod
    def _series_info(model: str, version: str) -> art.SeriesInfo:
        return art.SeriesInfo(series_description=f"AI {model} {version}"[:64])


__all__ = [
    "SEGMENT_BYTES_PER_VOXEL",
    "InputError",
    "NotEnoughMemory",
    "PipelineError",
    "PipelineRunner",
    "Prediction",
    "RunOutput",
    "check_memory",
    "folder_patient_id",
    "label_map",
    "model_grid",
    "model_spacing",
    "overall_result",
    "patient_study",
    "resample",
    "resampled_label_map",
    "result_summary",
]
