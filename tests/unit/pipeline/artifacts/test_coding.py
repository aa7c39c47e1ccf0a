"""How findings and structures are coded in the SR and SEG (standard codes first)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline.artifacts import (
    SeriesInfo,
    build_classification_sr,
    build_segmentation_sr,
    write_segmentation,
    write_sr,
)
from pipeline.artifacts._common import PRIVATE_SCHEME, concept_for_name, lateralized_concept
from pipeline.settings import LabelCodeSpec, PipelineSpec
from pipeline.types import ClassificationResult, Segment, SegmentationResult

INFO = SeriesInfo(series_description="AI test")

#: The codes the CXR model's labels get (scheme, value); None: private, none verifiable.
CXR_CODES = {
    "Tuberculosis": ("SCT", "56717001"),
    "Cardiomegaly": ("SCT", "287272002"),
    "Pleural Thickening": None,
    "Pleural Effusion": ("SCT", "60046008"),
    "Pneumothorax": ("SCT", "36118008"),
    "Consolidation": ("SCT", "95436008"),
    "Atelectasis": ("SCT", "46621007"),
    "Nodule Mass": ("SCT", "4147007"),
    "Fibrosis": ("SCT", "112674009"),
    "Infiltration": ("DCM", "112121"),
    "Calcification": ("SCT", "18115005"),
}


def test_every_cxr_finding_but_pleural_thickening_has_a_standard_code(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    assert [f.name for f in tb_result.findings] == list(CXR_CODES)
    art = write_sr(build_classification_sr(tb_result, dx_ds, INFO), tmp_path / "sr.dcm")
    groups = hd.sr.srread(art.path).content.get_image_measurement_groups()[1:]
    got = {g.tracking_identifier: g.finding_type for g in groups}
    for name, expected in CXR_CODES.items():
        code = got[name]
        if expected is None:
            assert code.scheme_designator == PRIVATE_SCHEME
        else:
            assert (code.scheme_designator, code.value) == expected, name
    dciodvfy(art.path)


def test_standard_codes_of_the_shipped_labels_come_from_pydicom_where_it_has_them() -> None:
    assert concept_for_name("Nodule Mass") == codes.SCT.Mass
    assert concept_for_name("Infiltration") == codes.DCM.Infiltrate
    assert concept_for_name("calcification") == codes.SCT.PathologicCalcification
    assert lateralized_concept("right kidney") == (codes.SCT.Kidney, codes.SCT.Right)
    assert lateralized_concept("Left Kidney") == (codes.SCT.Kidney, codes.SCT.Left)
    assert lateralized_concept("liver") == (codes.SCT.Liver, None)
    # a side before a name with no standard code is not split off
    code, side = lateralized_concept("left blob organ")
    assert code.scheme_designator == PRIVATE_SCHEME and side is None


def _kidneys(seg_result: SegmentationResult) -> SegmentationResult:
    names = ["liver", "spleen", "right kidney"]
    return dataclasses.replace(seg_result, segments=[
        Segment(s.label, n, s.volume_ml) for s, n in zip(seg_result.segments, names,
                                                         strict=True)])


def test_a_kidney_is_coded_kidney_with_its_laterality_in_seg_and_sr(
    tmp_path: Path, ct_series: list[Dataset], seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    result = _kidneys(seg_result)
    art, seg_ds = write_segmentation(result, ct_series, tmp_path / "seg.dcm", INFO)
    kidney = pydicom.dcmread(art.path).SegmentSequence[2]
    kind = kidney.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "64033007")
    side = kind.SegmentedPropertyTypeModifierCodeSequence[0]
    assert (side.CodingSchemeDesignator, side.CodeValue) == ("SCT", "24028007")
    assert "CodingSchemeIdentificationSequence" not in pydicom.dcmread(art.path)
    dciodvfy(art.path)
    sr_art = write_sr(build_segmentation_sr(result, ct_series, INFO, seg_ds=seg_ds),
                      tmp_path / "sr.dcm")
    groups = hd.sr.srread(sr_art.path).content.get_volumetric_roi_measurement_groups()
    assert groups[2].finding_type == codes.SCT.Kidney
    (site,) = groups[2].finding_sites
    assert site.value == codes.SCT.Kidney and site.laterality == codes.SCT.Right
    assert groups[0].finding_sites == []
    dciodvfy(sr_art.path)


def test_a_pipeline_may_set_a_labels_code() -> None:
    spec = PipelineSpec.model_validate({
        "name": "p", "model": "m", "task": "segment",
        "codes": {"right kidney": {"value": "9846003", "scheme": "SCT",
                                   "meaning": "Right kidney"}}})
    category, kind = spec.codes["right kidney"].segment_codes()
    assert category == codes.SCT.AnatomicalStructure
    assert (kind.value, kind.scheme_designator, kind.meaning) == ("9846003", "SCT",
                                                                  "Right kidney")
    with pytest.raises(ValueError, match="scheme"):
        LabelCodeSpec.model_validate({"value": "1", "scheme": "bad scheme", "meaning": "x"})


def test_a_structure_has_one_tracking_uid_in_the_seg_and_the_sr(
    tmp_path: Path, ct_series: list[Dataset], seg_result: SegmentationResult,
) -> None:
    """TID 1411: the SR's Tracking Unique Identifier of an ROI is its segment's
    Tracking UID in the SEG, so that a viewer can pair measurement and region."""
    art, seg_ds = write_segmentation(seg_result, ct_series, tmp_path / "seg.dcm", INFO)
    seg = hd.seg.segread(art.path)
    in_seg = {seg.get_segment_description(n).tracking_id:
              seg.get_segment_description(n).tracking_uid for n in seg.segment_numbers}
    sr_art = write_sr(build_segmentation_sr(seg_result, ct_series, INFO, seg_ds=seg_ds),
                      tmp_path / "sr.dcm")
    groups = hd.sr.srread(sr_art.path).content.get_volumetric_roi_measurement_groups()
    in_sr = {g.tracking_identifier: g.tracking_uid for g in groups}
    assert in_sr == in_seg
    assert len(set(in_sr.values())) == len(seg_result.segments)


def _comments(group: Any) -> list[str]:
    """The Comment items inside a measurement group's container (highdicom's group is
    a list holding that container)."""
    return [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeValue == "121106"]


def _top_level_items(path: Path) -> list[Dataset]:
    """The items of the Imaging Measurements container (126010) itself."""
    ds = pydicom.dcmread(path)
    (measurements,) = [i for i in ds.ContentSequence
                       if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


@pytest.mark.parametrize("with_seg", [True, False])
def test_an_organ_not_found_has_no_volume_but_a_comment_saying_so(
    tmp_path: Path, ct_series: list[Dataset], seg_result: SegmentationResult,
    with_seg: bool, dciodvfy: Callable[[Path], str],
) -> None:
    """A reporting system must not store "liver volume 0 mL" for a liver the model did
    not find."""
    missing = dataclasses.replace(
        seg_result, segments=[*seg_result.segments, Segment(9, "Kidney", 0.0)])
    seg_ds = None
    if with_seg:
        _, seg_ds = write_segmentation(missing, ct_series, tmp_path / "seg.dcm", INFO)
    art = write_sr(build_segmentation_sr(missing, ct_series, INFO, seg_ds=seg_ds),
                   tmp_path / "sr.dcm")
    content = hd.sr.srread(art.path).content
    groups = [*content.get_volumetric_roi_measurement_groups(),
              *content.get_image_measurement_groups()]
    by_name = {g.tracking_identifier: g for g in groups}
    assert by_name["Kidney"].get_measurements() == []
    assert _comments(by_name["Kidney"]) == ["not found in the field of view: no volume "
                                            "measured"]
    for name in ("Liver", "Spleen", "Blob organ"):
        (volume,) = by_name[name].get_measurements()
        assert volume.value > 0 and _comments(by_name[name]) == []
    assert all(i.ValueType == "CONTAINER" for i in _top_level_items(art.path))
    dciodvfy(art.path)


def test_the_results_notes_are_comments_inside_the_overall_result_group(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    notes = ["read 2 of 3 frontal images", "image 3 not read: lateral view"]
    result = dataclasses.replace(tb_result, notes=notes)
    art = write_sr(build_classification_sr(result, dx_ds, INFO), tmp_path / "sr.dcm")
    overall = hd.sr.srread(art.path).content.get_image_measurement_groups()[0]
    assert overall.tracking_identifier == "Overall result"
    assert _comments(overall) == notes
    # none beside the groups, in the Imaging Measurements container itself
    assert all(i.ValueType == "CONTAINER" for i in _top_level_items(art.path))
    dciodvfy(art.path)


def _device_uid(path: Path) -> str:
    items = [i for i in pydicom.dcmread(path).ContentSequence
             if i.ConceptNameCodeSequence[0].CodeValue == "121012"]  # Device Observer UID
    (item,) = items
    return str(item.UID)


def test_the_device_observer_uid_is_stable_per_model_name_and_version(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult,
    ct_series: list[Dataset], seg_result: SegmentationResult,
) -> None:
    first = write_sr(build_classification_sr(tb_result, dx_ds, INFO), tmp_path / "a.dcm")
    again = write_sr(build_classification_sr(tb_result, dx_ds, INFO), tmp_path / "b.dcm")
    newer = dataclasses.replace(tb_result, model_version="v1.0.2")
    other = write_sr(build_classification_sr(newer, dx_ds, INFO), tmp_path / "c.dcm")
    seg = write_sr(build_segmentation_sr(seg_result, ct_series, INFO), tmp_path / "d.dcm")
    uid = _device_uid(first.path)
    assert uid == _device_uid(again.path)
    assert pydicom.uid.UID(uid).is_valid and uid.startswith("2.25.")
    assert len({uid, _device_uid(other.path), _device_uid(seg.path)}) == 3


def test_the_procedure_reported_says_the_kind_of_imaging(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult,
    ct_series: list[Dataset], seg_result: SegmentationResult,
) -> None:
    cxr = write_sr(build_classification_sr(tb_result, dx_ds, INFO), tmp_path / "a.dcm")
    ct = write_sr(build_segmentation_sr(seg_result, ct_series, INFO), tmp_path / "b.dcm")
    assert _procedures(cxr.path) == [("413815006", "SCT")]  # Chest imaging
    assert _procedures(ct.path) == [("25045-6", "LN")]  # CT unspecified body region


def _procedures(path: Path) -> list[tuple[str, str]]:
    """The Procedure Reported (121058, DCM) items of an SR."""
    return [(i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator)
            for i in pydicom.dcmread(path).ContentSequence
            if i.ConceptNameCodeSequence[0].CodeValue == "121058"]


def test_the_encapsulated_pdf_has_a_document_title_code(
    tmp_path: Path, dx_ds: Dataset, dciodvfy: Callable[[Path], str],
) -> None:
    from pipeline.artifacts import write_encapsulated_pdf

    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%%EOF\n")
    art = write_encapsulated_pdf(pdf, dx_ds, tmp_path / "r.dcm", INFO)
    (title,) = pydicom.dcmread(art.path).ConceptNameCodeSequence
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("18748-4", "LN")
    dciodvfy(art.path)
