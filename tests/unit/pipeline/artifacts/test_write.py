from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pydicom
import pytest
import structlog.testing
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.artifacts import (
    SeriesInfo,
    write_classification_artifacts,
    write_segmentation_artifacts,
)
from pipeline.artifacts.images import overlay_slices
from pipeline.settings import Output
from pipeline.types import Artifact, ClassificationResult, PatientStudy, SegmentationResult

ALL = set(Output)


def _all_valid(arts: list[Artifact], dciodvfy: Callable[[Path], str]) -> None:
    """Every DICOM object among ``arts`` passes dciodvfy."""
    for art in arts:
        if art.path.suffix == ".dcm":
            dciodvfy(art.path)


def test_classification_all_outputs(
    tmp_path: Path,
    dx_ds: Dataset,
    study: PatientStudy,
    tb_result: ClassificationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    arts = write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ALL)
    folder = tmp_path / "PAT001"
    names = sorted(a.path.name for a in arts)
    assert names == sorted(
        [
            "PAT001_predictions.json",
            "PAT001_source_image.png",
            "PAT001_heatmap.png",
            "PAT001_report.pdf",
            "PAT001_sr.dcm",
            "PAT001_sc.dcm",
            "PAT001_report.dcm",
        ]
    )
    assert sorted(p.name for p in folder.iterdir()) == names  # nothing else left behind
    assert all(a.path.parent == folder for a in arts)
    data = json.loads((folder / "PAT001_predictions.json").read_text())
    assert data["source_image"] == str(folder / "PAT001_source_image.png")
    assert data["heatmap"] == str(folder / "PAT001_heatmap.png")
    series = set()
    for art in arts:
        if art.path.suffix == ".dcm":
            assert art.sop_instance_uid
            ds = pydicom.dcmread(art.path)
            assert ds.StudyInstanceUID == dx_ds.StudyInstanceUID
            assert ds.SOPInstanceUID == art.sop_instance_uid
            series.add(ds.SeriesInstanceUID)
            dciodvfy(art.path)
        else:
            assert art.sop_instance_uid is None
    assert len(series) == 3 and dx_ds.SeriesInstanceUID not in series


def test_classification_normal(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, normal_result: ClassificationResult
) -> None:
    # A previous abnormal run left a heatmap behind.
    (tmp_path / "PAT001").mkdir()
    (tmp_path / "PAT001" / "PAT001_heatmap.png").write_bytes(b"old")
    arts = write_classification_artifacts(normal_result, study, dx_ds, tmp_path, ALL)
    assert not (tmp_path / "PAT001" / "PAT001_heatmap.png").exists()
    names = {a.path.name for a in arts}
    assert "PAT001_heatmap.png" not in names and "PAT001_sc.dcm" not in names
    data = json.loads((tmp_path / "PAT001" / "PAT001_predictions.json").read_text())
    assert data["result"] == "Normal" and data["heatmap"] == ""


def test_classification_subset_and_series_info(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, tb_result: ClassificationResult
) -> None:
    info = SeriesInfo(series_description="CXR AI", series_number=500, software_version="2.0")
    arts = write_classification_artifacts(
        tb_result, study, dx_ds, tmp_path, {Output.ENCAPSULATED_PDF, Output.SR}, series=info
    )
    assert [a.kind for a in arts] == ["encapsulated_pdf", "sr"]
    # The PDF was only an intermediate: not kept on disk.
    assert not (tmp_path / "PAT001" / "PAT001_report.pdf").exists()
    pdf_ds = pydicom.dcmread(arts[0].path)
    sr_ds = pydicom.dcmread(arts[1].path)
    assert (sr_ds.SeriesNumber, pdf_ds.SeriesNumber) == (500, 502)
    assert sr_ds.SeriesDescription == "CXR AI (SR) NOT FOR DIAGNOSTIC USE"
    assert pdf_ds.SoftwareVersions == "2.0"


def test_request_patient_id_names_folder(
    tmp_path: Path, dx_ds: Dataset, tb_result: ClassificationResult
) -> None:
    study = PatientStudy(patient_id="REQ-7", patient_name="Doe^John")
    arts = write_classification_artifacts(tb_result, study, dx_ds, tmp_path, {Output.JSON})
    assert {a.path.name for a in arts} == {
        "REQ-7_predictions.json",
        "REQ-7_source_image.png",
        "REQ-7_heatmap.png",
    }
    data = json.loads((tmp_path / "REQ-7" / "REQ-7_predictions.json").read_text())
    assert data["metadata"]["patient_id"] == "REQ-7"


@pytest.mark.parametrize("pid", ["", "..", "../x", "a/b", "a\\b", "a\x01b"])
def test_unsafe_patient_id_rejected(
    tmp_path: Path,
    dx_ds: Dataset,
    pid: str,
    tb_result: ClassificationResult,
    seg_result: SegmentationResult,
    ct_series: list[Dataset],
) -> None:
    study = PatientStudy(patient_id=pid)
    with pytest.raises(ValueError, match="Invalid patient_id"):
        write_classification_artifacts(tb_result, study, dx_ds, tmp_path / "o", ALL)
    with pytest.raises(ValueError, match="Invalid patient_id"):
        write_segmentation_artifacts(seg_result, study, ct_series, tmp_path / "o", ALL)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.*"))


def test_segmentation_all_outputs(
    tmp_path: Path,
    ct_series: list[Dataset],
    study: PatientStudy,
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    arts = write_segmentation_artifacts(seg_result, study, ct_series, tmp_path, ALL)
    names = sorted(a.path.name for a in arts)
    assert names == sorted(
        [
            "PAT001_volumes.json",
            "PAT001_overlay.png",
            "PAT001_report.pdf",
            "PAT001_seg.dcm",
            "PAT001_sr.dcm",
            "PAT001_sc.dcm",
            "PAT001_report.dcm",
        ]
    )
    vol = json.loads((tmp_path / "PAT001" / "PAT001_volumes.json").read_text())
    assert [s["name"] for s in vol["segments"]] == ["Liver", "Spleen", "Blob organ"]
    assert vol["segments"][0]["volume_ml"] == pytest.approx(seg_result.segments[0].volume_ml)
    by_kind = {a.kind: a for a in arts}
    seg_uid = by_kind["seg"].sop_instance_uid
    sr = pydicom.dcmread(by_kind["sr"].path)
    evidence = {
        r.ReferencedSOPInstanceUID
        for e in sr.CurrentRequestedProcedureEvidenceSequence
        for s in e.ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert seg_uid in evidence
    assert {str(d.SOPInstanceUID) for d in ct_series} <= evidence
    _all_valid(arts, dciodvfy)


def test_segmentation_requires_sources(
    tmp_path: Path, study: PatientStudy, seg_result: SegmentationResult
) -> None:
    with pytest.raises(ValueError, match="no source"):
        write_segmentation_artifacts(seg_result, study, [], tmp_path, ALL)


def test_outputs_accept_names_and_reject_unknown(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, tb_result: ClassificationResult
) -> None:
    arts = write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ["sr", "pdf"])
    assert [a.kind for a in arts] == ["pdf", "sr"]
    with pytest.raises(ValueError):
        write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ["bogus"])


def test_relative_out_dir_gives_absolute_paths_and_quiet_logs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dx_ds: Dataset,
    study: PatientStudy,
    tb_result: ClassificationResult,
) -> None:
    monkeypatch.chdir(tmp_path)
    with structlog.testing.capture_logs() as logs:
        arts = write_classification_artifacts(tb_result, study, dx_ds, Path("out"), ALL)
    assert all(a.path.is_absolute() for a in arts)
    data = json.loads((tmp_path / "out" / "PAT001" / "PAT001_predictions.json").read_text())
    assert data["source_image"] == str(tmp_path / "out" / "PAT001" / "PAT001_source_image.png")
    assert logs and logs[-1]["event"] == "artifacts.written"
    text = repr(logs)
    assert "Doe" not in text and "John" not in text and "PAT001" not in text


def test_heatmap_png_and_secondary_capture_show_the_same_blend(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, tb_result: ClassificationResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The overlay is blended once (a full-size radiograph takes a while) and both the
    heatmap PNG and the Secondary Capture carry exactly it."""
    import numpy as np
    from PIL import Image

    import pipeline.artifacts.images as images
    import pipeline.artifacts.write as write

    calls = []
    real = images.heatmap_overlay
    for module in (images, write):
        monkeypatch.setattr(module, "heatmap_overlay",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
    write_classification_artifacts(tb_result, study, dx_ds, tmp_path,
                                   {Output.PNG, Output.SECONDARY_CAPTURE})
    assert len(calls) == 1
    folder = tmp_path / "PAT001"
    png = np.asarray(Image.open(folder / "PAT001_heatmap.png"))
    sc = pydicom.dcmread(folder / "PAT001_sc.dcm").pixel_array
    assert png.shape == sc.shape and (png == sc).all()


def test_a_png_that_cannot_be_written_fails_the_whole_write(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, tb_result: ClassificationResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PNGs are encoded beside the DICOM outputs; their failure is not lost."""
    import pipeline.artifacts.write as write

    def full_disk(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "write_source_png", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ALL)


def test_segmentation_overlay_is_drawn_once(
    tmp_path: Path, ct_series: list[Dataset], study: PatientStudy,
    seg_result: SegmentationResult, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PNG, the Secondary Capture and the report share one drawing of the overlay."""
    import pipeline.artifacts.report as report
    import pipeline.artifacts.write as write

    calls = []
    real = write.segmentation_overlay
    for module in (report, write):
        monkeypatch.setattr(module, "segmentation_overlay",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
    arts = write_segmentation_artifacts(
        seg_result, study, ct_series, tmp_path,
        {Output.PNG, Output.SECONDARY_CAPTURE, Output.PDF, Output.ENCAPSULATED_PDF})
    assert len(calls) == 1
    assert {a.kind for a in arts} >= {"png", "pdf", "encapsulated_pdf"}


def test_a_failed_write_leaves_none_of_its_files(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, tb_result: ClassificationResult,
    ct_series: list[Dataset], seg_result: SegmentationResult,
) -> None:
    """A source the Encapsulated PDF cannot be made for (no Study Instance UID): the
    PNGs and the PDF written before it are removed, so no report that reads like a
    result is left beside a failed job."""
    del dx_ds.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_classification_artifacts(tb_result, study, dx_ds, tmp_path / "cxr", ALL)
    assert list((tmp_path / "cxr" / "PAT001").iterdir()) == []
    broken = [ct_series[0].copy(), *ct_series[1:]]
    del broken[0].StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_segmentation_artifacts(seg_result, study, broken, tmp_path / "ct", ALL)
    assert list((tmp_path / "ct" / "PAT001").iterdir()) == []


def test_a_failed_write_keeps_the_files_of_an_earlier_run_it_did_not_replace(
    tmp_path: Path, dx_ds: Dataset, study: PatientStudy, tb_result: ClassificationResult,
) -> None:
    """The same patient's folder (a drop folder's output) holds an earlier run's
    results: a run that fails removes what it wrote itself, nothing else."""
    earlier = {a.path.name: a.path.stat().st_mtime_ns
               for a in write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ALL)}
    del dx_ds.StudyInstanceUID  # fails at the Encapsulated PDF, after the PNGs and PDF
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ALL)
    left = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "PAT001").iterdir()}
    assert set(left) == {"PAT001_predictions.json", "PAT001_sr.dcm", "PAT001_sc.dcm",
                         "PAT001_report.dcm"}
    assert all(left[name] == earlier[name] for name in left)


def _times(arts: list[Artifact]) -> set[tuple[str, ...]]:
    """Each DICOM output's creation and content date/time and time zone offset; the
    Contribution DateTime that highdicom stamps on its own equipment item must agree."""
    out = set()
    for art in arts:
        if art.path.suffix == ".dcm":
            ds = pydicom.dcmread(art.path)
            stamped = (ds.InstanceCreationDate, ds.InstanceCreationTime, ds.ContentDate,
                       ds.ContentTime, ds.get("TimezoneOffsetFromUTC"))
            out.add((art.kind, *stamped))
            for item in ds.get("ContributingEquipmentSequence", []):
                if "ContributionDateTime" in item:
                    assert item.ContributionDateTime == stamped[0] + stamped[1], art.kind
    return out


def _report_stamp(pdf: Path) -> str:
    """The "generated …" stamp printed in the report's footer."""
    exe = shutil.which("pdftotext")
    if exe is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    text = subprocess.run([exe, str(pdf), "-"], check=True, capture_output=True,
                          text=True, timeout=120).stdout
    found = re.search(r"generated (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                      r"(?:UTC(?:[+-]\d\d:\d\d)?|local time))", text)
    assert found, text
    return found.group(1)


def test_one_run_stamps_every_object_with_one_instant_in_the_studys_local_time(
    tmp_path: Path,
    dx_ds: Dataset,
    study: PatientStudy,
    tb_result: ClassificationResult,
    host_time_zone: Callable[[str], None],
    dciodvfy: Callable[[Path], str],
) -> None:
    """On a host not on UTC, the SR (highdicom) said local time while the Secondary
    Capture and the Encapsulated PDF said UTC: nine hours apart here. A source without
    Timezone Offset From UTC has its study time in local time: the run's objects say
    local time too, and no offset (which would apply to the copied Study Time as well)."""
    host_time_zone("Asia/Tokyo")
    assert "TimezoneOffsetFromUTC" not in dx_ds
    arts = write_classification_artifacts(tb_result, study, dx_ds, tmp_path, ALL)
    times = _times(arts)
    assert {t[0] for t in times} == {"sr", "sc", "encapsulated_pdf"}
    assert len({t[1:] for t in times}) == 1, times
    _, date, clock, _, _, offset = times.pop()
    assert offset is None
    stamp = datetime.strptime(date + clock, "%Y%m%d%H%M%S")
    pdf = next(a.path for a in arts if a.kind == "pdf")
    assert _report_stamp(pdf) == stamp.strftime("%Y-%m-%d %H:%M:%S local time")
    _all_valid(arts, dciodvfy)


def test_a_given_time_is_written_in_the_local_time_of_a_source_without_offset(
    tmp_path: Path,
    ct_series: list[Dataset],
    study: PatientStudy,
    seg_result: SegmentationResult,
    host_time_zone: Callable[[str], None],
    dciodvfy: Callable[[Path], str],
) -> None:
    host_time_zone("America/Los_Angeles")
    when = datetime(2026, 11, 25, 4, 3, 29, tzinfo=ZoneInfo("Asia/Tokyo"))  # 19:03:29 UTC
    arts = write_segmentation_artifacts(seg_result, study, ct_series, tmp_path, ALL,
                                        generated_at=when)
    times = _times(arts)
    assert {t[0] for t in times} == {"seg", "sr", "sc", "encapsulated_pdf"}
    # Los Angeles, 24 November 2026: UTC-8
    assert {t[1:] for t in times} == {("20261124", "110329", "20261124", "110329", None)}
    pdf = next(a.path for a in arts if a.kind == "pdf")
    assert _report_stamp(pdf) == "2026-11-24 11:03:29 local time"
    assert b"/CreationDate (D:20261124110329)" in pdf.read_bytes()
    enc = pydicom.dcmread(next(a.path for a in arts if a.kind == "encapsulated_pdf"))
    assert enc.AcquisitionDateTime == "20261124110329"
    _all_valid(arts, dciodvfy)


@pytest.mark.parametrize("offset", ["+0900", "-0330", "+0000"])
def test_a_source_with_an_offset_gets_every_time_in_that_offset(
    tmp_path: Path,
    ct_series: list[Dataset],
    study: PatientStudy,
    seg_result: SegmentationResult,
    host_time_zone: Callable[[str], None],
    dciodvfy: Callable[[Path], str],
    offset: str,
) -> None:
    """A study at 09:00 +0900 stays 09:00 +0900 in the results (it read 09:00 UTC when
    every output said +0000), and the run's time is given in that offset as well."""
    host_time_zone("America/Los_Angeles")
    for ds in ct_series:
        ds.TimezoneOffsetFromUTC = offset
    when = datetime(2026, 11, 24, 19, 3, 29, tzinfo=ZoneInfo("UTC"))
    local = {"+0900": ("20261125", "040329", "UTC+09:00"),
             "-0330": ("20261124", "153329", "UTC-03:30"),
             "+0000": ("20261124", "190329", "UTC")}[offset]
    arts = write_segmentation_artifacts(seg_result, study, ct_series, tmp_path, ALL,
                                        generated_at=when)
    times = _times(arts)
    assert {t[0] for t in times} == {"seg", "sr", "sc", "encapsulated_pdf"}
    assert {t[1:] for t in times} == {(local[0], local[1], local[0], local[1], offset)}
    for art in arts:
        if art.path.suffix == ".dcm":  # the copied study time, unchanged, in that offset
            ds = pydicom.dcmread(art.path)
            assert (ds.StudyDate, ds.StudyTime) == ("20250314", "101500")
            dciodvfy(art.path)
    pdf = next(a.path for a in arts if a.kind == "pdf")
    assert _report_stamp(pdf) == (f"{local[0][:4]}-{local[0][4:6]}-{local[0][6:]} "
                                  f"{local[1][:2]}:{local[1][2:4]}:{local[1][4:]} {local[2]}")


def test_the_ct_secondary_capture_is_described_as_contours_and_names_the_slices_shown(
    tmp_path: Path,
    ct_series: list[Dataset],
    study: PatientStudy,
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    """It was labelled a heatmap and referenced the first slice only."""
    arts = write_segmentation_artifacts(seg_result, study, ct_series, tmp_path,
                                        {Output.SECONDARY_CAPTURE})
    sc = pydicom.dcmread(arts[0].path)
    assert "heatmap" not in sc.DerivationDescription.lower()
    assert "heatmap" not in sc.SeriesDescription.lower()
    assert "contours" in sc.DerivationDescription and "(contours)" in sc.SeriesDescription
    shown = overlay_slices(seg_result.labels)
    assert len(shown) == 4
    assert [r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence] == [
        ct_series[z].SOPInstanceUID for z in shown]
    dciodvfy(arts[0].path)


def test_every_dicom_output_says_not_for_diagnostic_use_where_a_viewer_shows_it(
    tmp_path: Path,
    dx_ds: Dataset,
    ct_series: list[Dataset],
    study: PatientStudy,
    tb_result: ClassificationResult,
    seg_result: SegmentationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    long = SeriesInfo(series_description="AI " + "x" * 70)
    arts = [*write_classification_artifacts(tb_result, study, dx_ds, tmp_path / "c", ALL,
                                            series=long),
            *write_segmentation_artifacts(seg_result, study, ct_series, tmp_path / "s", ALL,
                                          series=long)]
    dicom = [a for a in arts if a.path.suffix == ".dcm"]
    assert sorted(a.kind for a in dicom) == ["encapsulated_pdf", "encapsulated_pdf", "sc",
                                             "sc", "seg", "sr", "sr"]
    for art in dicom:
        ds = pydicom.dcmread(art.path)
        assert ds.SeriesDescription.startswith("AI xxx"), art.kind
        assert ds.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE"), art.kind
        assert len(ds.SeriesDescription) <= 64
        if art.kind == "sc":
            assert "NOT FOR DIAGNOSTIC USE" in ds.ImageComments
        dciodvfy(art.path)


def test_the_encapsulated_pdf_lists_every_image_the_result_came_from(
    tmp_path: Path,
    dx_ds: Dataset,
    study: PatientStudy,
    tb_result: ClassificationResult,
    dciodvfy: Callable[[Path], str],
) -> None:
    other = copy.deepcopy(dx_ds)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    third = copy.deepcopy(dx_ds)
    third.SOPInstanceUID = third.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    arts = write_classification_artifacts(
        tb_result, study, dx_ds, tmp_path, {Output.ENCAPSULATED_PDF},
        finding_sources={"Consolidation": (other, None)}, sources=[dx_ds, other, third])
    ds = pydicom.dcmread(arts[0].path)
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence] == [
        dx_ds.SOPInstanceUID, other.SOPInstanceUID, third.SOPInstanceUID]
    dciodvfy(arts[0].path)
    # without ``sources``: the image shown and those the findings came from
    arts = write_classification_artifacts(
        tb_result, study, dx_ds, tmp_path / "b", {Output.ENCAPSULATED_PDF},
        finding_sources={"Consolidation": (other, None), "Tuberculosis": (dx_ds, None)})
    ds = pydicom.dcmread(arts[0].path)
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence] == [
        dx_ds.SOPInstanceUID, other.SOPInstanceUID]
