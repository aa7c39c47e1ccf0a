from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pipeline.artifacts import (
    SeriesInfo,
    build_classification_sr,
    build_segmentation_sr,
    write_classification_report,
    write_encapsulated_pdf,
    write_secondary_capture,
    write_segmentation,
    write_sr,
)
from pipeline.artifacts.images import heatmap_overlay
from pipeline.settings import SecondaryCaptureSpec
from pipeline.types import ClassificationResult, PatientStudy, Segment, SegmentationResult

INFO = SeriesInfo(series_description="AI test", series_number=77, software_version="9.9.9")


def _common(ds: Dataset, source: Dataset, sop_class: str) -> None:
    assert ds.SOPClassUID == sop_class
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SOPInstanceUID != source.SOPInstanceUID
    for kw in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyDate",
    ):
        assert ds[kw].value == source[kw].value, kw
    assert ds.Manufacturer == "dicom-node"
    assert ds.SoftwareVersions == "9.9.9"
    # PS3.10: the file meta names the node, which wrote the file (not pydicom, highdicom)
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert ds.SeriesNumber == 77
    assert ds.SeriesDescription == "AI test"


def _content_items(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    stack = list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        out.append(item)
        stack.extend(item.get("ContentSequence", []))
    return out


def test_classification_sr(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult, dciodvfy: Callable[[Path], str]
) -> None:
    sr = build_classification_sr(tb_result, dx_ds, INFO)
    art = write_sr(sr, tmp_path / "sr.dcm")
    assert (art.kind, art.media_type) == ("sr", "application/dicom")
    ds = pydicom.dcmread(art.path)
    assert art.sop_instance_uid == ds.SOPInstanceUID
    _common(ds, dx_ds, ComprehensiveSRStorage)
    assert ds.Modality == "SR"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == dx_ds.SOPInstanceUID
    items = _content_items(ds)
    nums = [i for i in items if i.ValueType == "NUM"]
    assert len(nums) == len(tb_result.findings)
    values = sorted(float(n.MeasuredValueSequence[0].NumericValue) for n in nums)
    assert values == pytest.approx(sorted(100 * f.confidence for f in tb_result.findings),
                                   abs=1e-3)
    present = [
        i
        for i in items
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning == "Present"
    ]
    assert {i.ConceptNameCodeSequence[0].CodeMeaning for i in present} == {
        "Tuberculosis",
        "Consolidation of lung",
    }
    images = [i for i in items if i.ValueType == "IMAGE"]
    assert images and all(
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == dx_ds.SOPInstanceUID for i in images
    )
    # highdicom parses it back as a TID 1500 report: overall result + one group per finding.
    report = hd.sr.srread(art.path).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 1 + len(tb_result.findings)
    tb = groups[1]
    assert tb.finding_type.meaning == "Tuberculosis"
    (confidence,) = tb.get_measurements()
    assert confidence.value == pytest.approx(87.0)  # percent, as TID 4104 has it
    assert confidence.name.value == "111012"
    assert (confidence.unit.value, confidence.unit.scheme_designator) == ("%", "UCUM")
    dciodvfy(art.path)


def test_secondary_capture(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult, dciodvfy: Callable[[Path], str]
) -> None:
    assert tb_result.heatmap is not None
    img = heatmap_overlay(tb_result.image, tb_result.heatmap)
    art = write_secondary_capture(img, dx_ds, tmp_path / "sc.dcm", INFO)
    ds = pydicom.dcmread(art.path)
    _common(ds, dx_ds, SecondaryCaptureImageStorage)
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel) == ("RGB", 3)
    assert ds.pixel_array.shape == (64, 48, 3)
    assert np.array_equal(ds.pixel_array, np.asarray(img))
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == dx_ds.SOPInstanceUID
    assert art.kind == "sc" and art.sop_instance_uid == ds.SOPInstanceUID
    dciodvfy(art.path)


@pytest.mark.parametrize("max_size", [None, 64])
def test_secondary_capture_as_jpeg(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult,
    dciodvfy: Callable[[Path], str], max_size: int | None,
) -> None:
    """JPEG Baseline, 4:2:2 (YBR_FULL_422), marked lossy; optionally scaled down."""
    assert tb_result.heatmap is not None
    img = heatmap_overlay(tb_result.image, tb_result.heatmap).resize((96, 128))
    spec = SecondaryCaptureSpec(compression="jpeg", quality=95, max_size=max_size)
    art = write_secondary_capture(img, dx_ds, tmp_path / "sc.dcm", INFO, encoding=spec)
    ds = pydicom.dcmread(art.path)
    _common(ds, dx_ds, SecondaryCaptureImageStorage)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert float(ds.LossyImageCompressionRatio) > 1
    assert "JPEG Baseline, quality 95" in ds.DerivationDescription
    expected = img if max_size is None else img.resize((48, 64), Image.Resampling.LANCZOS)
    assert (ds.Rows, ds.Columns) == (expected.height, expected.width)
    decoded = ds.pixel_array.astype(np.int16)  # pydicom converts YBR back to RGB
    assert decoded.shape == (expected.height, expected.width, 3)
    assert np.abs(decoded - np.asarray(expected, dtype=np.int16)).mean() < 4  # lossy, close
    dciodvfy(art.path)


def test_secondary_capture_scaled_stays_uncompressed(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult
) -> None:
    assert tb_result.heatmap is not None
    img = heatmap_overlay(tb_result.image, tb_result.heatmap)
    spec = SecondaryCaptureSpec(max_size=64)  # 48 x 64, already within: kept as it is
    ds = pydicom.dcmread(write_secondary_capture(img, dx_ds, tmp_path / "sc.dcm", INFO,
                                                 encoding=spec).path)
    assert ds.LossyImageCompression == "00" and ds.PhotometricInterpretation == "RGB"
    assert np.array_equal(ds.pixel_array, np.asarray(img))


def test_encapsulated_pdf(
    tmp_path: Path,
    dx_ds: Dataset,
    tb_result: ClassificationResult,
    study: PatientStudy,
    dciodvfy: Callable[[Path], str],
) -> None:
    pdf = write_classification_report(tb_result, study, tmp_path / "r.pdf")
    art = write_encapsulated_pdf(pdf.path, dx_ds, tmp_path / "r.dcm", INFO)
    ds = pydicom.dcmread(art.path)
    _common(ds, dx_ds, EncapsulatedPDFStorage)
    assert ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    raw = pdf.path.read_bytes()
    assert ds.EncapsulatedDocumentLength == len(raw)
    assert bytes(ds.EncapsulatedDocument)[: len(raw)] == raw
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == dx_ds.SOPInstanceUID
    assert art.kind == "encapsulated_pdf"
    dciodvfy(art.path)


def test_encapsulated_pdf_rejects_non_pdf(tmp_path: Path, dx_ds: Dataset) -> None:
    bad = tmp_path / "x.pdf"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError):
        write_encapsulated_pdf(bad, dx_ds, tmp_path / "x.dcm", INFO)


def test_segmentation_and_volume_sr(
    tmp_path: Path,
    ct_series: list[Dataset],
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    art, seg_ds = write_segmentation(seg_result, ct_series, tmp_path / "seg.dcm", INFO)
    ds = pydicom.dcmread(art.path)
    _common(ds, ct_series[0], SegmentationStorage)
    assert ds.SegmentationType == "BINARY"
    assert ds.FrameOfReferenceUID == ct_series[0].FrameOfReferenceUID
    segs = ds.SegmentSequence
    assert [s.SegmentLabel for s in segs] == ["Liver", "Spleen", "Blob organ"]
    assert [s.SegmentNumber for s in segs] == [1, 2, 3]
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in segs]
    assert (types[0].CodingSchemeDesignator, types[0].CodeValue) == ("SCT", "10200004")
    assert (types[1].CodingSchemeDesignator, types[1].CodeValue) == ("SCT", "78961009")
    assert types[2].CodingSchemeDesignator == "99DCMNODE"
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in segs)
    refs = ds.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == ct_series[0].SeriesInstanceUID
    # Round trip of the label map through highdicom.
    seg = hd.seg.segread(art.path)
    source_uids = [(str(d.SOPInstanceUID)) for d in ct_series]
    labelmap = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids,
        combine_segments=True,
        ignore_spatial_locations=True,
        skip_overlap_checks=True,
    )
    assert np.array_equal(labelmap, seg_result.labels)
    dciodvfy(art.path)

    sr = build_segmentation_sr(seg_result, ct_series, INFO, seg_ds=seg_ds)
    sr_art = write_sr(sr, tmp_path / "sr.dcm")
    sr_ds = pydicom.dcmread(sr_art.path)
    _common(sr_ds, ct_series[0], ComprehensiveSRStorage)
    items = _content_items(sr_ds)
    nums = [i for i in items if i.ValueType == "NUM"]
    assert sorted(float(n.MeasuredValueSequence[0].NumericValue) for n in nums) == pytest.approx(
        sorted(s.volume_ml for s in seg_result.segments), abs=1e-3
    )
    assert all(
        n.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mL" for n in nums
    )
    segrefs = [
        i
        for i in items
        if i.ValueType == "IMAGE"
        and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg_ds.SOPInstanceUID
    ]
    assert len(segrefs) == 3
    assert sorted(i.ReferencedSOPSequence[0].ReferencedSegmentNumber for i in segrefs) == [1, 2, 3]
    # each segment's source is the CT series, named once (TID 1411), not slice by slice
    series_refs = [i for i in items if i.ValueType == "UIDREF"
                   and i.ConceptNameCodeSequence[0].CodeValue == "121232"]
    assert [i.UID for i in series_refs] == [ct_series[0].SeriesInstanceUID] * 3
    assert not [i for i in items if i.ValueType == "IMAGE"
                and i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID != seg_ds.SOPInstanceUID]
    evidence_series = {
        s.SeriesInstanceUID
        for e in sr_ds.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
    }
    assert evidence_series == {ct_series[0].SeriesInstanceUID, seg_ds.SeriesInstanceUID}
    volumetric = hd.sr.srread(sr_art.path).content.get_volumetric_roi_measurement_groups()
    assert [g.get_measurements()[0].unit.value for g in volumetric] == ["mL"] * 3
    dciodvfy(sr_art.path)


def test_volume_sr_without_seg(
    tmp_path: Path,
    ct_series: list[Dataset],
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    sr = build_segmentation_sr(seg_result, ct_series, INFO)
    art = write_sr(sr, tmp_path / "sr.dcm")
    dciodvfy(art.path)


def test_segmentation_rejects_mismatched_series(
    tmp_path: Path, ct_series: list[Dataset], seg_result: SegmentationResult
) -> None:
    with pytest.raises(ValueError, match="does not match"):
        write_segmentation(seg_result, ct_series[:-1], tmp_path / "seg.dcm", INFO)


def test_empty_segment_and_empty_labelmap(
    tmp_path: Path,
    ct_series: list[Dataset],
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    extra = dataclasses.replace(
        seg_result, segments=[*seg_result.segments, Segment(9, "Kidney", 0.0)]
    )
    art, seg_ds = write_segmentation(extra, ct_series, tmp_path / "seg.dcm", INFO)
    assert len(pydicom.dcmread(art.path).SegmentSequence) == 4
    dciodvfy(art.path)
    sr_art = write_sr(
        build_segmentation_sr(extra, ct_series, INFO, seg_ds=seg_ds), tmp_path / "sr.dcm"
    )
    dciodvfy(sr_art.path)
    segrefs = [i for i in _content_items(pydicom.dcmread(sr_art.path)) if i.ValueType == "IMAGE"
               and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]]
    # the empty Kidney (no frames in the SEG) refers to the images instead
    assert sorted(i.ReferencedSOPSequence[0].ReferencedSegmentNumber for i in segrefs) == [1, 2, 3]

    empty = dataclasses.replace(seg_result, labels=np.zeros_like(seg_result.labels))
    art, seg_ds = write_segmentation(empty, ct_series, tmp_path / "seg0.dcm", INFO)
    dciodvfy(art.path)
    sr_art = write_sr(
        build_segmentation_sr(empty, ct_series, INFO, seg_ds=seg_ds), tmp_path / "sr0.dcm"
    )
    dciodvfy(sr_art.path)


def test_a_model_of_one_structure_gets_its_seg_and_sr(
    tmp_path: Path,
    ct_series: list[Dataset],
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    """A model that segments one organ (MONAI's spleen bundle) makes a SEG of one
    segment, whose frames highdicom identifies once, in the shared functional groups:
    the volumes SR read each frame's and failed every such job."""
    one = dataclasses.replace(seg_result, labels=(seg_result.labels == 2).astype(np.uint8),
                              segments=[Segment(1, "Spleen", 1.25)])
    art, seg_ds = write_segmentation(one, ct_series, tmp_path / "seg.dcm", INFO)
    assert "SegmentIdentificationSequence" in seg_ds.SharedFunctionalGroupsSequence[0]
    dciodvfy(art.path)
    sr_art = write_sr(build_segmentation_sr(one, ct_series, INFO, seg_ds=seg_ds),
                      tmp_path / "sr.dcm")
    segrefs = [i for i in _content_items(pydicom.dcmread(sr_art.path)) if i.ValueType == "IMAGE"
               and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]]
    assert [i.ReferencedSOPSequence[0].ReferencedSegmentNumber for i in segrefs] == [1]
    dciodvfy(sr_art.path)


ANONYMISED_AWAY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                   "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def test_sources_without_patient_and_study_attributes(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult, ct_series: list[Dataset],
    seg_result: SegmentationResult, dciodvfy: Callable[[Path], str],
) -> None:
    """An anonymiser may drop the Type 2 patient and study attributes altogether:
    highdicom read them from the source (AttributeError). They are written empty, the
    objects stay valid, and the caller's datasets are not touched."""
    for ds in [dx_ds, *ct_series]:
        for keyword in ANONYMISED_AWAY:
            if keyword in ds:
                delattr(ds, keyword)
    sr = read_back(write_sr(build_classification_sr(tb_result, dx_ds, INFO),
                            tmp_path / "sr.dcm"), dciodvfy)
    art, seg_ds = write_segmentation(seg_result, ct_series, tmp_path / "seg.dcm", INFO)
    seg = read_back(art, dciodvfy)
    vol = read_back(write_sr(build_segmentation_sr(seg_result, ct_series, INFO, seg_ds=seg_ds),
                             tmp_path / "vol.dcm"), dciodvfy)
    for out in (sr, seg, vol):
        assert out.PatientID == "" and out.AccessionNumber == ""
    assert all("PatientID" not in ds for ds in [dx_ds, *ct_series])


def read_back(art: Any, dciodvfy: Callable[[Path], str]) -> Dataset:
    dciodvfy(art.path)
    return pydicom.dcmread(art.path)


def test_highdicom_iod_lookups_are_remembered_and_unchanged() -> None:
    """The SEG writer memoizes highdicom's IOD table walk; answers stay highdicom's."""
    from highdicom import _standard_utils as standard

    import pipeline.artifacts.seg  # noqa: F401  (installs the memo)

    memo = standard.is_attribute_in_iod
    assert hasattr(memo, "cache_info")
    ct, enhanced_ct, seg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", \
        "1.2.840.10008.5.1.4.1.1.66.4"
    for _ in range(2):  # the second round comes from the cache
        assert memo("PerFrameFunctionalGroupsSequence", ct) is False
        assert memo("PerFrameFunctionalGroupsSequence", enhanced_ct) is True
        assert memo("PerFrameFunctionalGroupsSequence", seg) is True
        assert memo("PixelData", ct, exclude_path_elements=["IconImageSequence"]) is True
    assert memo.cache_info().hits >= 4
    with pytest.raises(KeyError):  # an unknown SOP class is still an error
        memo("PixelData", "1.2.3.4")


def test_names_that_are_not_ascii_make_the_seg_and_sr_utf8(
    tmp_path: Path, ct_series: list[Dataset], seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    """A model's labels in German or Japanese, on a CT with no Specific Character Set
    (ASCII): the SEG and the volumes SR declare UTF-8 and hold the names as written."""
    names = ["Lungenflügel", "肝臓", "Blob organ"]
    result = dataclasses.replace(seg_result, segments=[
        dataclasses.replace(s, name=n) for s, n in zip(seg_result.segments, names, strict=True)])
    art, seg_ds = write_segmentation(result, ct_series, tmp_path / "seg.dcm", INFO)
    seg = read_back(art, dciodvfy)
    assert seg.SpecificCharacterSet == "ISO_IR 192"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names
    sr = read_back(write_sr(build_segmentation_sr(result, ct_series, INFO, seg_ds=seg_ds),
                            tmp_path / "sr.dcm"), dciodvfy)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    texts = {i.TextValue for i in _content_items(sr) if i.ValueType == "TEXT"}
    assert {"Lungenflügel", "肝臓"} <= texts


@pytest.mark.parametrize("finding", ["Pleuraerguss (Flüssigkeit)", "Effusion"])
@pytest.mark.parametrize(("charset", "name", "kept"), [
    (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎",
     ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    # the form Japanese modalities send (an empty first value), which highdicom refused
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう",
     ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    # Korean: a code extension highdicom does not know, so the SR goes to UTF-8
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "ISO_IR 192"),
    ("ISO_IR 100", "Müller^Jürgen", "ISO_IR 100"),
])
def test_a_source_in_another_character_set_keeps_its_names(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult, finding: str,
    charset: str | list[str], name: str, kept: str | list[str],
    dciodvfy: Callable[[Path], str],
) -> None:
    """A source in ISO 2022 (Japanese, Korean) or Latin-1: with ASCII findings the SR
    keeps the source's character set where highdicom takes it; with a finding name it
    cannot hold, the SR is UTF-8. Either way the patient's name reads back as it was."""
    dx_ds.SpecificCharacterSet = charset
    dx_ds.PatientName = name
    source = tmp_path / "source.dcm"
    dx_ds.save_as(source, enforce_file_format=True)
    read = pydicom.dcmread(source)  # as the node has it: raw values in the source's encoding
    before = read.SpecificCharacterSet
    findings = [dataclasses.replace(tb_result.findings[0], name=finding), *tb_result.findings[1:]]
    result = dataclasses.replace(tb_result, findings=findings)
    sr = read_back(write_sr(build_classification_sr(result, read, INFO), tmp_path / "sr.dcm"),
                   dciodvfy)
    expected = "ISO_IR 192" if finding != "Effusion" else kept
    assert sr.SpecificCharacterSet == expected
    assert str(sr.PatientName) == name
    assert read.SpecificCharacterSet == before  # the caller's dataset as it was


def test_a_ct_in_japanese_iso_2022_gets_its_seg_and_sr(
    tmp_path: Path, ct_series: list[Dataset], seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    """A CT series whose slices say ``\\ISO 2022 IR 87``: the SEG and the volumes SR are
    written (highdicom refused that form, failing the job) with the patient's name."""
    name = "Yamada^Tarou=山田^太郎"
    for ds in ct_series:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = name
    art, seg_ds = write_segmentation(seg_result, ct_series, tmp_path / "seg.dcm", INFO)
    seg = read_back(art, dciodvfy)
    assert seg.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert str(seg.PatientName) == name
    sr = read_back(write_sr(build_segmentation_sr(seg_result, ct_series, INFO, seg_ds=seg_ds),
                            tmp_path / "sr.dcm"), dciodvfy)
    assert str(sr.PatientName) == name
    assert ct_series[0].SpecificCharacterSet == ["", "ISO 2022 IR 87"]


NON_CONFORMANT = {  # as some devices send them: value -> what the outputs carry
    "PatientBirthDate": ("1958-01-01", "19580101"),
    "StudyDate": ("2024/07/11", "20240711"),
    "StudyTime": ("10:30:00", "103000"),
    "PatientSex": ("male", "M"),
}


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # pydicom's, meant
def test_non_conformant_source_dates_time_and_sex_do_not_fail_the_outputs(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult, study: PatientStudy,
    ct_series: list[Dataset], seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    """highdicom refused such values (the whole job failed); now every output is
    written, dciodvfy-clean, with them in the DICOM form, and the sources are untouched."""
    for source in (dx_ds, *ct_series):
        for keyword, (sent, _) in NON_CONFORMANT.items():
            setattr(source, keyword, sent)
    assert tb_result.heatmap is not None
    outputs = [
        write_sr(build_classification_sr(tb_result, dx_ds, INFO), tmp_path / "sr.dcm"),
        write_secondary_capture(heatmap_overlay(tb_result.image, tb_result.heatmap), dx_ds,
                                tmp_path / "sc.dcm", INFO),
        write_encapsulated_pdf(write_classification_report(tb_result, study,
                                                           tmp_path / "r.pdf").path,
                               dx_ds, tmp_path / "r.dcm", INFO),
    ]
    seg_art, seg_ds = write_segmentation(seg_result, ct_series, tmp_path / "seg.dcm", INFO)
    outputs += [seg_art, write_sr(build_segmentation_sr(seg_result, ct_series, INFO,
                                                        seg_ds=seg_ds), tmp_path / "vol.dcm")]
    for art in outputs:
        out = read_back(art, dciodvfy)
        for keyword, (_, written) in NON_CONFORMANT.items():
            assert out.get(keyword) == written, (art.kind, keyword)
    assert dx_ds.PatientBirthDate == "1958-01-01" and ct_series[0].PatientSex == "male"
    dx_ds.PatientBirthDate = "unknown"  # no form to rewrite it to: left empty
    out = read_back(write_sr(build_classification_sr(tb_result, dx_ds, INFO),
                             tmp_path / "sr2.dcm"), dciodvfy)
    assert out.PatientBirthDate == ""
