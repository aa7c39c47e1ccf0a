"""Comprehensive SR (TID 1500 Measurement Report) of classification and segmentation results."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForMeasurementGroup,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from pipeline.artifacts._common import SeriesInfo, concept_for_name, utc_now
from pipeline.artifacts._dicom import (
    declare_private_scheme,
    declare_utf8_for,
    distinct,
    for_highdicom,
    frame_reference,
    info_texts,
    save,
    set_times,
)
from pipeline.artifacts.seg import segment_codes
from pipeline.types import Artifact, ClassificationResult, SegmentationResult

__all__ = [
    "COMMENT",
    "CONFIDENCE",
    "MILLILITER",
    "NOT_FOUND",
    "OVERALL_RESULT",
    "PERCENT",
    "build_classification_sr",
    "build_segmentation_sr",
    "device_observer_uid",
    "procedure_reported",
    "write_sr",
]

#: Numeric confidence of a finding (CAD "Certainty of Finding"), in percent (0..100), as
#: the CAD templates (TID 4104, TID 4006) have it.
CONFIDENCE = codes.DCM.CertaintyOfFinding
#: UCUM percent, the unit of :data:`CONFIDENCE`.
PERCENT = codes.UCUM.Percent
#: UCUM millilitre.
MILLILITER = Code("mL", "UCUM", "milliliter")
#: Name of the qualitative evaluation that carries the overall result.
OVERALL_RESULT = codes.DCM.Impression
#: Name of the text items, in the overall result's group, that carry the result's notes.
COMMENT = codes.DCM.Comment
#: The Comment of a structure's group when the model found none of it.
NOT_FOUND = "not found in the field of view: no volume measured"
# Text Value (UT) holds up to 2^32-2 characters; a note is far shorter, but bounded.
_TEXT_MAX = 65536


#: Procedure Reported by the source's modality: CID 100 (Quantitative Diagnostic Imaging
#: Procedure) codes, from pydicom's dictionary. No code of "CT of abdomen" or "chest
#: radiograph" could be verified there; a radiograph of the chest is "Chest imaging".
_PROCEDURES: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
}


def procedure_reported(source: Dataset) -> Code:
    """The TID 1500 Procedure Reported of a result on ``source``: by its modality and,
    for a chest radiograph, its body part; the generic Imaging procedure otherwise."""
    modality = str(source.get("Modality") or "").upper()
    chest = str(source.get("BodyPartExamined") or "").upper() == "CHEST"
    code: Code = codes.SCT.ChestImaging if modality in ("CR", "DX") and chest \
        else _PROCEDURES.get(modality, codes.SCT.ImagingProcedure)
    return code


def device_observer_uid(model_name: str, model_version: str) -> str:
    """The Device Observer UID of a model version: the same for every document it makes
    (a new one per document made each SR look like the work of another device). A
    UUID-derived UID (root ``2.25``, as the node's other derived UIDs) of the name and
    version (a name-based UUID, RFC 4122 version 5), so no organisation root is
    claimed."""
    name = json.dumps(["dicom-node device observer", model_name, model_version])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def _observation_context(
    model_name: str, model_version: str, info: SeriesInfo
) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(model_name, model_version),
        name=f"{model_name} {model_version}"[:64],
        manufacturer_name=info.manufacturer,
        model_name=info.manufacturer_model_name,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _algorithm(model_name: str, model_version: str) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=model_name[:64],
        version=model_version[:64] or "unknown",
        family=codes.cid7162.ArtificialIntelligence,
    )


def _document(
    evidence: Sequence[Dataset],
    report: MeasurementReport,
    info: SeriesInfo,
    series_uid: str | None,
    instance_number: int,
    when: datetime | None,
) -> ComprehensiveSR:
    sr = ComprehensiveSR(
        evidence=for_highdicom(evidence),
        content=report,
        series_instance_uid=series_uid or generate_uid(),
        series_number=info.series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=info.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=info.institution_name,
    )
    sr.SeriesDescription = info.series_description
    sr.ManufacturerModelName = info.manufacturer_model_name
    sr.SoftwareVersions = info.software_version
    sr.DeviceSerialNumber = info.device_serial_number
    set_times(sr, when or utc_now(), evidence[0] if evidence else None)
    declare_private_scheme(sr)
    return sr


def build_classification_sr(
    result: ClassificationResult,
    source_ds: Dataset,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    instance_number: int = 1,
    finding_codes: Mapping[str, Code] | None = None,
    when: datetime | None = None,
    finding_sources: Mapping[str, tuple[Dataset, int | None]] | None = None,
) -> ComprehensiveSR:
    """Build a Comprehensive SR holding a TID 1500 report of ``result``.

    One measurement group per finding (model label order): a qualitative evaluation
    (finding: Present/Absent) and a numeric Certainty of Finding (percent, 0..100), each
    referencing the source image; plus a group with the overall result. Findings are
    standard-coded where a code is known (see :func:`concept_for_name`), else
    ``99DCMNODE``; ``finding_codes`` overrides per name. ``when`` (default: now) is the
    document's creation and content time, written as :func:`set_times` says.
    ``finding_sources`` (finding name: header and 1-based frame of the image its
    confidence came from, when several images were read) makes a
    finding's group reference that image instead of ``source_ds``; each is evidence.
    The result's notes are Comment items in the overall result's group.

    Raises:
        ValueError: when ``source_ds`` lacks study/instance UIDs (raised by highdicom).
    """
    # the frame read, of a multi-frame image, not the whole object (where its SOP class
    # lets a reference name one; the notes name it always)
    frame = frame_reference(source_ds, result.frame_number)
    source = SourceImageForMeasurementGroup.from_source_image(
        source_ds, referenced_frame_numbers=[frame] if frame else None)
    evidence = {str(source_ds.SOPInstanceUID): source_ds}

    def source_of(name: str) -> SourceImageForMeasurementGroup:
        if not finding_sources or name not in finding_sources:
            return source
        ds, number = finding_sources[name]
        evidence.setdefault(str(ds.SOPInstanceUID), ds)
        number = frame_reference(ds, number)
        return SourceImageForMeasurementGroup.from_source_image(
            ds, referenced_frame_numbers=[number] if number else None)

    algorithm = _algorithm(result.model_name, result.model_version)
    groups: list[MeasurementsAndQualitativeEvaluations] = []
    overall = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="Overall result"),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            QualitativeEvaluation(OVERALL_RESULT, concept_for_name(result.result, "SCT"))
        ],
        source_images=[source],
    )
    for note in result.notes:  # which images were read, which not: beside the result
        _comment(overall, note)
    groups.append(overall)
    for finding in result.findings:
        code = (finding_codes or {}).get(finding.name) or concept_for_name(finding.name, "SCT")
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=generate_uid(), identifier=finding.name[:64]
                ),
                finding_type=code,
                algorithm_id=algorithm,
                measurements=[
                    Measurement(
                        name=CONFIDENCE,
                        # the model's 0..1 probability as a percentage
                        value=round(float(finding.confidence) * 100, 4),
                        unit=PERCENT,
                        algorithm_id=algorithm,
                    )
                ],
                qualitative_evaluations=[
                    QualitativeEvaluation(
                        code, codes.SCT.Present if finding.presence else codes.SCT.Absent
                    )
                ],
                source_images=[source_of(finding.name)],
            )
        )
    report = MeasurementReport(
        observation_context=_observation_context(result.model_name, result.model_version, info),
        procedure_reported=procedure_reported(source_ds),
        imaging_measurements=groups,
    )
    sr = _document(list(evidence.values()), report, info, series_uid, instance_number, when)
    declare_utf8_for(sr, [result.result, result.model_name, result.model_version,
                          *(f.name for f in result.findings), *result.notes,
                          *info_texts(info)])
    return sr


def build_segmentation_sr(
    result: SegmentationResult,
    source_datasets: Sequence[Dataset],
    info: SeriesInfo,
    *,
    seg_ds: hd.seg.Segmentation | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
    when: datetime | None = None,
) -> ComprehensiveSR:
    """Build a Comprehensive SR (TID 1500) with the volume (mL) of every structure.

    With ``seg_ds`` each group is a volumetric ROI group referencing its segment of
    the SEG and, as TID 1411's "Source series for segmentation", the source series
    (not each of its images: for a 300-slice CT that made the SR ~9,000 content items
    and took seconds to build); without it, or for a segment with no voxels, the group
    references the source images directly. A structure with no voxel in the label map
    has no Volume: its group holds a Comment (:data:`NOT_FOUND`) instead, never a
    measured 0 mL. With ``seg_ds`` each group's Tracking Unique
    Identifier is its segment's Tracking UID in the SEG. ``when``: as in
    :func:`build_classification_sr`.

    Raises:
        ValueError: when there are no source datasets or a segment is missing in the SEG.
    """
    if not source_datasets:
        raise ValueError("no source datasets")
    source_datasets = distinct(source_datasets)  # a multi-frame object once
    algorithm = _algorithm(result.model_name, result.model_version)
    groups: list[
        VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    ] = []
    sources: list[SourceImageForMeasurementGroup] = []  # built only when a group needs them
    source_series = SourceSeriesForSegmentation(str(source_datasets[0].SeriesInstanceUID))
    in_seg = _segments_with_frames(seg_ds) if seg_ds is not None else set()
    tracking_uids = _segment_tracking_uids(seg_ds) if seg_ds is not None else {}
    present = _labels_present(result.labels)
    for number, seg in enumerate(result.segments, start=1):
        coding = segment_codes(seg.name, codes_by_name)
        kind = coding.type
        # "right kidney": Kidney, found in the right kidney (TID 1419 Finding Site)
        sites = None if coding.laterality is None else [
            FindingSite(anatomic_location=coding.type, laterality=coding.laterality)]
        # an organ the model did not find has no volume (not a measured 0 mL): its group
        # says so in a Comment instead
        found = seg.label in present
        measurements = [Measurement(
            name=codes.SCT.Volume,
            value=round(float(seg.volume_ml), 3),
            unit=MILLILITER,
            algorithm_id=algorithm,
        )] if found else None
        # one ROI, one Tracking UID: the segment's own in the SEG (TID 1411)
        tracking = TrackingIdentifier(uid=tracking_uids.get(number) or generate_uid(),
                                      identifier=seg.name[:64])
        referenced: ReferencedSegment | None = None
        if seg_ds is not None and number in in_seg:  # an empty segment has no frames
            referenced = ReferencedSegment(
                sop_class_uid=str(seg_ds.SOPClassUID),
                sop_instance_uid=str(seg_ds.SOPInstanceUID),
                segment_number=number,
                source_series=source_series,
            )
        if referenced is not None:
            groups.append(
                VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_segment=referenced,
                    finding_type=kind,
                    finding_sites=sites,
                    algorithm_id=algorithm,
                    measurements=measurements,
                )
            )
        else:
            sources = sources or [SourceImageForMeasurementGroup.from_source_image(ds)
                                  for ds in source_datasets]
            groups.append(
                MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=kind,
                    finding_sites=sites,
                    algorithm_id=algorithm,
                    measurements=measurements,
                    source_images=sources,
                )
            )
        if not found:
            _comment(groups[-1], NOT_FOUND)
    report = MeasurementReport(
        observation_context=_observation_context(result.model_name, result.model_version, info),
        procedure_reported=procedure_reported(source_datasets[0]),
        imaging_measurements=groups,
    )
    evidence = [*source_datasets, *([seg_ds] if seg_ds is not None else [])]
    sr = _document(evidence, report, info, series_uid, instance_number, when)
    declare_utf8_for(sr, [result.model_name, result.model_version,
                          *(s.name for s in result.segments), *info_texts(info)])
    return sr


def _labels_present(labels: npt.NDArray[np.uint8]) -> set[int]:
    """The labels that at least one voxel of ``labels`` holds (one pass, no sort)."""
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind != "u" or flat.dtype.itemsize > 2:
        return {int(v) for v in np.unique(flat)}
    return {int(v) for v in np.flatnonzero(np.bincount(flat))}


def _comment(group: Sequence[Dataset], text: str) -> None:
    """Add a Comment (121106) TEXT item inside a measurement group's container, where
    the group's readers (highdicom's ``get_..._measurement_groups()``) keep it; appended
    to the group's template list instead, it became a sibling of the groups."""
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=text[:_TEXT_MAX],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _segment_tracking_uids(seg_ds: Dataset) -> dict[int, str]:
    """Segment number -> the Tracking UID the SEG gives it."""
    return {int(item.SegmentNumber): str(item.TrackingUID)
            for item in seg_ds.get("SegmentSequence", []) if item.get("TrackingUID")}


def _segments_with_frames(seg_ds: Dataset) -> set[int]:
    """The segment numbers that at least one frame of a SEG holds."""
    shared = seg_ds.get("SharedFunctionalGroupsSequence")
    if shared and "SegmentIdentificationSequence" in shared[0]:
        # Every frame holds the same segment (a SEG of one segment): highdicom then puts
        # its identification in the shared functional groups, not in each frame's.
        frames = int(seg_ds.get("NumberOfFrames") or 0)
        number = int(shared[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        return {number} if frames else set()
    return {int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for frame in seg_ds.PerFrameFunctionalGroupsSequence
            if "SegmentIdentificationSequence" in frame}


def write_sr(sr: ComprehensiveSR, path: Path) -> Artifact:
    """Write an SR document to ``path`` and return its artifact (kind ``sr``).

    Raises:
        OSError: when writing fails.
    """
    save(sr, Path(path))
    return Artifact(
        kind="sr",
        path=Path(path),
        media_type="application/dicom",
        sop_instance_uid=str(sr.SOPInstanceUID),
    )
