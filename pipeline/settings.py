"""Typed settings for models and pipelines.

They live in the pipeline package so that the pipeline can run without the
node; ``dicom_node.config`` embeds them in the node's settings.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Task(StrEnum):
    """What a pipeline does with its model's output."""

    CLASSIFY = "classify"
    SEGMENT = "segment"


class Output(StrEnum):
    """Artifacts a pipeline can write."""

    JSON = "json"
    PNG = "png"
    PDF = "pdf"
    SR = "sr"
    SECONDARY_CAPTURE = "sc"
    ENCAPSULATED_PDF = "encapsulated_pdf"
    SEG = "seg"


class ModelSpec(_Frozen):
    """One loadable model version (a MONAI bundle folder or a TorchScript file)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    path: Path
    version: str | None = None
    default: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(default=8, ge=1, le=1024)
    max_delay_ms: float = Field(default=5.0, ge=0, le=10_000)
    warmup: bool = True
    # On CPU, run a frozen TorchScript trace of the network (checked against it at load)
    optimize: bool = True
    # Batcher threads sharing the model (no copies) and torch threads of each; None: chosen
    # by the runner (on CPU, classifiers get min(2, CPUs) workers splitting the CPUs).
    workers: int | None = Field(default=None, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1, le=1024)


class SeriesRules(_Frozen):
    """Which series of a study a pipeline can use; empty lists accept anything."""

    modalities: list[str] = Field(default_factory=list)
    # a "for processing" class here (DX 1.2.840.10008.5.1.4.1.1.1.1.1...) lets a study of
    # only raw detector images be read; without one such a study is refused
    sop_class_uids: list[str] = Field(default_factory=list)
    # Body Part Examined (0018,0015) terms, e.g. [CHEST]; an image that does not say is
    # judged by its Anatomic Region Sequence (a chest code is CHEST, a knee's KNEE), and
    # one that says neither is taken (both are optional), ranked after those that match
    body_parts: list[str] = Field(default_factory=list)
    # View Position (0018,5101) of the images, e.g. [PA, AP] for a frontal chest model:
    # a lateral view is left out (an image that does not say is taken); when it is empty,
    # the View Code Sequence's view ("left lateral" is LL; CID 4010 DX View)
    view_positions: list[str] = Field(default_factory=list)
    # fewest images: single-frame instances, or the frames of a multi-frame object
    min_instances: int = Field(default=1, ge=1)
    # Series Description patterns (shell-style, any case: "*ABD*", "*portal*"): only a
    # series whose description matches one is taken; exclude_...: none that matches one
    # ("*BONE*", "*LUNG*": a sharp-kernel reconstruction of the same slices)
    series_descriptions: list[str] = Field(default_factory=list)
    exclude_series_descriptions: list[str] = Field(default_factory=list)
    # [thinnest, thickest] Slice Thickness in mm (an image that does not say is taken)
    slice_thickness_mm: tuple[float, float] | None = None
    # a classifier reads every eligible frontal image of a study (each series the rules
    # accept, each frame): at most this many, the rest named in the result as not read
    max_images: int = Field(default=8, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> SeriesRules:
        if self.slice_thickness_mm is not None:
            low, high = self.slice_thickness_mm
            if not 0 <= low <= high:
                raise ValueError("slice_thickness_mm is [thinnest, thickest], 0 <= thinnest "
                                 "<= thickest")
        if any(not p.strip() for p in [*self.series_descriptions,
                                       *self.exclude_series_descriptions]):
            raise ValueError("a series description pattern is empty")
        return self


class SecondaryCaptureSpec(_Frozen):
    """How a pipeline's Secondary Capture (the heatmap or the overlay) is encoded."""

    # none: uncompressed RGB, lossless (a 2048x2048 radiograph's heatmap is 12.6 MB);
    # jpeg: JPEG Baseline, lossy (about 1 MB at quality 90), marked as lossy in the object
    compression: Literal["none", "jpeg"] = "none"
    quality: int = Field(default=90, ge=50, le=100)
    # the longest side in pixels: a larger image is scaled down to it (None: full size)
    max_size: int | None = Field(default=None, ge=64, le=65535)


class CodeSpec(_Frozen):
    """A coded concept (PS3.3 8.8): code value, coding scheme designator, code meaning."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.-]+$")
    meaning: str = Field(min_length=1, max_length=64)

    def to_code(self) -> Code:
        """This concept as pydicom's :class:`~pydicom.sr.coding.Code`."""
        return Code(self.value, self.scheme, self.meaning)


class LabelCodeSpec(CodeSpec):
    """The code of one model label, in place of the built-in one: the finding type in the
    SR of a classifier, the Segmented Property Type in the SEG and SR of a segmenter (with
    ``category``, its Segmented Property Category; default Anatomical structure)."""

    category: CodeSpec | None = None

    def segment_codes(self) -> tuple[Code, Code]:
        """(category, type) of a segment of this label."""
        category = (self.category.to_code() if self.category is not None
                    else dicom_codes.SCT.AnatomicalStructure)
        return category, self.to_code()


class PipelineSpec(_Frozen):
    """A named pipeline: a model, a task, series rules and the artifacts to write."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str
    model_version: str | None = None
    task: Task
    series: SeriesRules = Field(default_factory=SeriesRules)
    outputs: list[Output] = Field(default_factory=lambda: list(Output))
    threshold: float = Field(default=0.5, gt=0, lt=1)
    destinations: list[str] = Field(default_factory=list)
    secondary_capture: SecondaryCaptureSpec = Field(default_factory=SecondaryCaptureSpec)
    # model label -> its code in the DICOM results (e.g. a local code for a finding that
    # has no standard one, or SCT 9846003 "Right kidney" in place of Kidney + Right)
    codes: dict[str, LabelCodeSpec] = Field(default_factory=dict)
