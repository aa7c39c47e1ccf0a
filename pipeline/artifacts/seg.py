"""DICOM Segmentation (highdicom, BINARY) of a label map over the source CT series."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pipeline.artifacts._common import SeriesInfo, lateralized_concept, utc_now
from pipeline.artifacts._dicom import (
    declare_private_scheme,
    declare_utf8_for,
    distinct,
    for_highdicom,
    info_texts,
    save,
    set_times,
)
from pipeline.artifacts.images import segment_color
from pipeline.io import number_of_frames
from pipeline.types import Artifact, SegmentationResult

__all__ = ["SegmentCoding", "build_segmentation", "segment_codes", "write_segmentation"]


def _remember_iod_lookups() -> None:
    """Memoize highdicom's ``is_attribute_in_iod``.

    To build a SEG, highdicom asks of every source image whether its SOP class is a
    multi-frame IOD, each time walking the standard's module tables (~0.25 ms: 75 ms
    for a 300-slice CT). The answer depends only on the arguments and on the tables
    highdicom ships, so it is computed once per SOP class.
    """
    try:
        from highdicom import _standard_utils as standard
    except ImportError:  # another highdicom layout: nothing to speed up
        return
    original = getattr(standard, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "cache_info"):
        return

    @functools.lru_cache(maxsize=4096)
    def lookup(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid,
                             list(exclude) if exclude is not None else None))

    def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                            exclude_path_elements: Sequence[str] | None = None) -> bool:
        exclude = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return lookup(attribute, str(sop_class_uid), exclude)

    memo: Any = is_attribute_in_iod
    memo.cache_info = lookup.cache_info
    standard.is_attribute_in_iod = memo


_remember_iod_lookups()


class SegmentCoding(NamedTuple):
    """How a structure is coded: Segmented Property Category and Type, and the type's
    laterality (a Segmented Property Type Modifier in the SEG, the finding site's
    laterality in the SR), or None."""

    category: Code
    type: Code
    laterality: Code | None = None


def segment_codes(
    name: str, overrides: Mapping[str, tuple[Code, Code]] | None = None
) -> SegmentCoding:
    """The codes of a structure: standard (SCT) where known, "right kidney" as Kidney
    with laterality Right (see :func:`lateralized_concept`), else ``99DCMNODE``.

    ``overrides`` maps a structure name to explicit (category, type) codes and wins
    over the lookup (no laterality: an override names the structure whole).
    """
    if overrides and name in overrides:
        category, kind = overrides[name]
        return SegmentCoding(category, kind)
    kind, side = lateralized_concept(name, "SCT")
    return SegmentCoding(codes.SCT.AnatomicalStructure, kind, side)


def build_segmentation(
    result: SegmentationResult,
    source_datasets: Sequence[Dataset],
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    instance_number: int = 1,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
    when: datetime | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG, one segment per structure of ``result``.

    ``source_datasets`` are the CT instances in the order of the label map's slices (a
    multi-frame object's header once per frame, with ``result.source_frames``).
    Segment numbers are 1..N in the order of ``result.segments``. ``when`` (default:
    now) is its creation and content time, written as :func:`set_times` says.

    Raises:
        ValueError: when there are no segments, the slice count differs from the
            label map, or a segment label repeats.
    """
    labels = np.asarray(result.labels)
    if not result.segments:
        raise ValueError("the segmentation has no segments")
    if labels.ndim != 3 or labels.shape[0] != len(source_datasets):
        raise ValueError(
            f"label map {labels.shape} does not match {len(source_datasets)} source slices"
        )
    if len({s.label for s in result.segments}) != len(result.segments):
        raise ValueError("segment labels must be unique")
    mask = np.zeros(labels.shape, dtype=np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model_name[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=result.model_version[:64] or "unknown",
    )
    descriptions = []
    for number, seg in enumerate(result.segments, start=1):
        mask[labels == seg.label] = number
        coding = segment_codes(seg.name, codes_by_name)
        r, g, b = segment_color(number - 1)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg.name[:64],
            segmented_property_category=coding.category,
            segmented_property_type=coding.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=seg.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(r, g, b),
        )
        if coding.laterality is not None:  # PS3.3 C.8.20.2: Kidney, modified by Right
            kind = description.SegmentedPropertyTypeCodeSequence[0]
            kind.SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(coding.laterality)]
        descriptions.append(description)
    sources = distinct(source_datasets)
    if any(result.source_frames):
        mask = _in_frame_order(mask, result.source_frames, sources)
    seg_ds = hd.seg.Segmentation(
        source_images=for_highdicom(sources),
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid or generate_uid(),
        series_number=info.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=info.manufacturer,
        manufacturer_model_name=info.manufacturer_model_name,
        software_versions=info.software_version,
        device_serial_number=info.device_serial_number,
        content_description=f"{result.model_name} {result.model_version}"[:64],
        content_label="SEGMENTATION",
        series_description=info.series_description,
    )
    set_times(seg_ds, when or utc_now(), sources[0])
    declare_private_scheme(seg_ds)
    declare_utf8_for(seg_ds, [*(s.name for s in result.segments), result.model_name,
                              result.model_version, *info_texts(info)])
    return seg_ds


def seg_can_reference(source_datasets: Sequence[Dataset],
                      frames: Sequence[int | None]) -> bool:
    """Whether a SEG can reference these slices (a header per slice, with the frame each
    comes from) one to one: single-frame slices, or every frame of one multi-frame
    object, which is all highdicom can pair with a SEG's frames."""
    if not any(frames):
        return True
    sources = distinct(source_datasets)
    count = number_of_frames(sources[0]) if sources else 0
    return len(sources) == 1 and sorted(f or 0 for f in frames) == list(range(1, count + 1))


def _in_frame_order(mask: np.ndarray, frames: Sequence[int | None],
                    sources: Sequence[Dataset]) -> np.ndarray:
    """``mask``'s slices (in position order) put in the frame order of their multi-frame
    source: highdicom pairs the SEG's frames with the source's frames one to one."""
    if not seg_can_reference(sources, frames):
        raise ValueError("a SEG over multi-frame sources needs every frame of exactly one "
                         f"object; got {len(frames)} slice(s) of {len(sources)} object(s)")
    out = np.empty_like(mask)
    out[np.asarray(frames, dtype=np.intp) - 1] = mask
    return out


def write_segmentation(
    result: SegmentationResult,
    source_datasets: Sequence[Dataset],
    path: Path,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
    when: datetime | None = None,
) -> tuple[Artifact, hd.seg.Segmentation]:
    """Write the SEG to ``path``; return its artifact (kind ``seg``) and the dataset
    (``when``: see :func:`build_segmentation`).

    Raises:
        ValueError: see :func:`build_segmentation`. OSError: when writing fails.
    """
    seg_ds = build_segmentation(
        result, source_datasets, info, series_uid=series_uid, codes_by_name=codes_by_name,
        when=when,
    )
    save(seg_ds, Path(path))
    art = Artifact(
        kind="seg",
        path=Path(path),
        media_type="application/dicom",
        sop_instance_uid=str(seg_ds.SOPInstanceUID),
    )
    return art, seg_ds
