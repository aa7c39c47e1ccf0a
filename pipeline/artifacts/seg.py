"""DICOM Segmentation (highdicom, BINARY) of a label map over the source CT series.

:func:`write_segmentation_file` is the same writer for another process, so that
building and encoding the SEG, the slowest artifact, can run beside the job's others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage, generate_uid

from pipeline.artifacts._common import SeriesInfo, concept_for_name
from pipeline.artifacts._dicom import declare_private_scheme, save, with_type2
from pipeline.artifacts.images import segment_color
from pipeline.io import read_dataset
from pipeline.types import Artifact, SegmentationResult

__all__ = [
    "build_segmentation",
    "segment_codes",
    "segmentation_reference",
    "segments_with_voxels",
    "write_segmentation",
    "write_segmentation_file",
]


def segment_codes(
    name: str, overrides: Mapping[str, tuple[Code, Code]] | None = None
) -> tuple[Code, Code]:
    """(category, type) codes of a structure: SCT where pydicom knows the name.

    ``overrides`` maps a structure name to explicit codes and wins over the lookup.
    """
    if overrides and name in overrides:
        return overrides[name]
    return codes.SCT.AnatomicalStructure, concept_for_name(name, "SCT")


def build_segmentation(
    result: SegmentationResult,
    source_datasets: Sequence[Dataset],
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM SEG, one segment per structure of ``result``.

    ``source_datasets`` are the CT instances in the order of the label map's slices.
    Segment numbers are 1..N in the order of ``result.segments``.

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
        category, kind = segment_codes(seg.name, codes_by_name)
        r, g, b = segment_color(number - 1)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=seg.name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=generate_uid(),
                tracking_id=seg.name[:64],
                display_color=hd.color.CIELabColor.from_rgb(r, g, b),
            )
        )
    seg_ds = hd.seg.Segmentation(
        source_images=[with_type2(ds) for ds in source_datasets],
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid or generate_uid(),
        series_number=info.series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=info.manufacturer,
        manufacturer_model_name=info.manufacturer_model_name,
        software_versions=info.software_version,
        device_serial_number=info.device_serial_number,
        content_description=f"{result.model_name} {result.model_version}"[:64],
        content_label="SEGMENTATION",
        series_description=info.series_description,
    )
    declare_private_scheme(seg_ds)
    return seg_ds


def write_segmentation(
    result: SegmentationResult,
    source_datasets: Sequence[Dataset],
    path: Path,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
) -> tuple[Artifact, hd.seg.Segmentation]:
    """Write the SEG to ``path``; return its artifact (kind ``seg``) and the dataset.

    Raises:
        ValueError: see :func:`build_segmentation`. OSError: when writing fails.
    """
    seg_ds = build_segmentation(
        result, source_datasets, info, series_uid=series_uid,
        sop_instance_uid=sop_instance_uid, codes_by_name=codes_by_name,
    )
    save(seg_ds, Path(path))
    art = Artifact(
        kind="seg",
        path=Path(path),
        media_type="application/dicom",
        sop_instance_uid=str(seg_ds.SOPInstanceUID),
    )
    return art, seg_ds


def write_segmentation_file(
    result: SegmentationResult,
    path: Path,
    info: SeriesInfo,
    *,
    series_uid: str,
    sop_instance_uid: str,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
) -> Artifact:
    """:func:`write_segmentation` over the headers of ``result.source_paths`` (the label
    map's slice order), read here: what a worker process runs, given UIDs chosen by the
    caller so that an SR can reference the SEG before it exists. Returns the artifact
    only (the SEG dataset would have to travel back).

    Raises:
        ValueError: see :func:`build_segmentation`. OSError: when a source cannot be
            read or the SEG cannot be written.
    """
    sources = [read_dataset(p, stop_before_pixels=True) for p in result.source_paths]
    art, _ = write_segmentation(
        result, sources, path, info, series_uid=series_uid,
        sop_instance_uid=sop_instance_uid, codes_by_name=codes_by_name,
    )
    return art


def segmentation_reference(study_uid: str, series_uid: str, sop_instance_uid: str) -> Dataset:
    """What an SR needs of a SEG it references (its UIDs), before the SEG is written."""
    ref = Dataset()
    ref.StudyInstanceUID = study_uid
    ref.SeriesInstanceUID = series_uid
    ref.SOPClassUID = SegmentationStorage
    ref.SOPInstanceUID = sop_instance_uid
    return ref


def segments_with_voxels(result: SegmentationResult) -> set[int]:
    """The SEG segment numbers (1..N, in the order of ``result.segments``) that will
    hold frames: those with at least one voxel (the SEG omits empty frames). A segment
    whose volume rounded to 0 mL is looked up in the label map; the others have voxels."""
    labels = np.asarray(result.labels)
    return {n for n, seg in enumerate(result.segments, start=1)
            if seg.volume_ml > 0 or bool((labels == seg.label).any())}
