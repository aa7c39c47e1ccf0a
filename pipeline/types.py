"""Typed domain objects that travel between pipeline steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class PatientStudy:
    """Patient and study attributes copied from the source for reports and outputs."""

    patient_id: str
    patient_name: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    patient_birth_date: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    accession_number: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class Finding:
    name: str
    presence: bool
    confidence: float


@dataclass(frozen=True)
class ClassificationResult:
    """Output of a classification model on one 2D image."""

    model_name: str
    model_version: str
    result: str  # "Normal", "TB Presumptive" or "Abnormal"
    findings: list[Finding]
    image: npt.NDArray[np.float32]  # the displayed source image, H x W, in [0, 1]
    heatmap: npt.NDArray[np.float32] | None  # H x W in [0, 1]; None when Normal
    source_path: Path | None = None
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    # why a result that is not Normal has no heatmap (the model cannot be explained by
    # Grad-CAM); the outputs then go without one. Empty: a heatmap is expected.
    heatmap_note: str = ""
    # what a person should know about how the result was made (which images were read,
    # which were not and why)
    notes: list[str] = field(default_factory=list)
    # the frame (1-based) of a multi-frame source the image shown is; None: single-frame
    frame_number: int | None = None


@dataclass(frozen=True)
class Segment:
    label: int
    name: str
    volume_ml: float


@dataclass(frozen=True)
class SegmentationResult:
    """Output of a segmentation model on one volume (Z x Y x X, label map)."""

    model_name: str
    model_version: str
    labels: npt.NDArray[np.uint8]  # Z x Y x X, 0 = background
    segments: list[Segment]
    volume: npt.NDArray[np.float32]  # Z x Y x X, Hounsfield units
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    source_paths: list[Path] = field(default_factory=list)  # in slice order
    # the frame number (1-based) of each slice in its multi-frame source; None for a
    # single-frame slice (empty: all single-frame)
    source_frames: list[int | None] = field(default_factory=list)
    series_instance_uid: str = ""
    # what a person should know about the result: an output asked for and left out, why
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Artifact:
    """A file a pipeline produced, to keep on disk and/or send to destinations."""

    kind: str  # json, png, pdf, sr, sc, encapsulated_pdf, seg
    path: Path
    media_type: str
    sop_instance_uid: str | None = None  # set for DICOM artifacts
