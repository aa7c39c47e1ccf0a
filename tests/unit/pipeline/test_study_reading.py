"""Which images of a study a classifier reads, and that every result says so.

The demo chest X-ray model (pipeline/models/cxr-findings) on the shipped phantoms of
known findings (samples/cxr): normal.dcm is Normal, pneumothorax.dcm shows a
Pneumothorax, pleural-effusion.dcm a Pleural Effusion.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from pipeline.io import PatientMismatchError
from pipeline.runner import PipelineRunner, result_summary
from pipeline.settings import ModelSpec, PipelineSpec, SeriesRules
from pipeline.types import ClassificationResult
from tests.unit.pipeline.artifacts.dicom_check import assert_dciodvfy_clean

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "samples" / "cxr"
CXR_RULES = {"modalities": ["CR", "DX"], "view_positions": ["PA", "AP"]}
OUTPUTS = ["json", "png", "pdf", "sr", "sc", "encapsulated_pdf"]
CR = "1.2.840.10008.5.1.4.1.1.1"
MULTIFRAME_SC = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
SEED_001_KEYS = {"result", "findings", "source_image", "heatmap", "metadata"}
SEED_001_METADATA = {"model_version", "patient_id", "patient_name", "sop_instance_uid",
                     "age", "sex"}


@pytest.fixture(scope="module")
def runner() -> Iterator[PipelineRunner]:
    r = PipelineRunner(
        [ModelSpec(name="cxr-findings", path=ROOT / "pipeline" / "models" / "cxr-findings")],
        [PipelineSpec(name="cxr", model="cxr-findings", task="classify", outputs=OUTPUTS,
                      series=SeriesRules(**CXR_RULES)),
         PipelineSpec(name="cxr-one", model="cxr-findings", task="classify", outputs=OUTPUTS,
                      series=SeriesRules(**CXR_RULES, max_images=1))],
    )
    r.start()
    yield r
    r.close()


def as_series(sample: str, folder: Path, *, study_uid: str, series_number: int,
              patient_id: str | None = None, issuer: str | None = None) -> Path:
    """A copy of a sample as a new series (new Series and SOP UIDs) of ``study_uid``."""
    ds = pydicom.dcmread(SAMPLES / sample)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.PatientID = patient_id or "S1-PAT"
    ds.PatientName = "Doe^Jane" if patient_id is None or patient_id.endswith("A") \
        else "Roe^Richard"
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{series_number}-{sample}"
    ds.save_as(path)
    return path


def pdf_text(pdf: Path) -> str:
    exe = shutil.which("pdftotext")
    if exe is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    out = subprocess.run([exe, str(pdf), "-"], check=True, capture_output=True, text=True,
                         timeout=120)
    return " ".join(out.stdout.split())


def sr_comments(sr: pydicom.Dataset) -> list[str]:
    """The text of every Comment (121106, DCM) item anywhere in the SR's content."""
    found: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "TEXT" and name and name[0].CodeValue == "121106":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def sr_frames(sr: pydicom.Dataset) -> set[tuple[str, tuple[int, ...]]]:
    """(Referenced SOP Instance UID, frame numbers) of every IMAGE item of the SR."""
    found: set[tuple[str, tuple[int, ...]]] = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                frames = ref.get("ReferencedFrameNumber")
                many = isinstance(frames, list | pydicom.multival.MultiValue)
                numbers = () if frames is None else tuple(
                    int(f) for f in (frames if many else [frames]))
                found.add((str(ref.ReferencedSOPInstanceUID), numbers))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def sr_group_sources(sr: pydicom.Dataset) -> dict[str, set[str]]:
    """Each measurement group's Tracking Identifier: the SOP Instance UIDs it references."""
    groups: dict[str, set[str]] = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            children = item.get("ContentSequence", [])
            names = [c.TextValue for c in children if c.get("ValueType") == "TEXT"
                     and c.ConceptNameCodeSequence[0].CodeValue == "112039"]
            if names:
                groups[str(names[0])] = {
                    str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                    for c in children if c.get("ValueType") == "IMAGE"}
            walk(children)

    walk(sr.ContentSequence)
    return groups


def finding(result: ClassificationResult, name: str) -> tuple[bool, float]:
    f = next(f for f in result.findings if f.name == name)
    return f.presence, f.confidence


def test_samples_are_what_the_tests_assume(runner: PipelineRunner, tmp_path: Path) -> None:
    for sample, expected in (("normal.dcm", "Normal"), ("pneumothorax.dcm", "Abnormal")):
        out = runner.run("cxr", [SAMPLES / sample], tmp_path / sample, outputs=["json"])
        assert out.result.result == expected  # type: ignore[union-attr]
        assert out.result.notes == []  # one image, one frame: nothing to say


@pytest.mark.parametrize("order", ["normal first", "pneumothorax first"])
def test_two_frontal_series_are_both_read_whatever_their_order(
        runner: PipelineRunner, tmp_path: Path, order: str) -> None:
    """Two PA series of one study: one was classified, which one by arrival order, and a
    "Normal" said nothing of the pneumothorax left unread. Both are read now, each
    finding at its highest probability, shown on the image that drove the result."""
    study = generate_uid()
    normal = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=1)
    ptx = as_series("pneumothorax.dcm", tmp_path / "in", study_uid=study, series_number=2)
    files = [normal, ptx] if order == "normal first" else [ptx, normal]
    out = runner.run("cxr", files, tmp_path / "out")
    result = out.result
    assert isinstance(result, ClassificationResult)
    assert result.result == "Abnormal"
    present, confidence = finding(result, "Pneumothorax")
    alone = runner.run("cxr", [ptx], tmp_path / "alone", outputs=["json"]).result
    assert present and confidence == finding(alone, "Pneumothorax")[1]  # type: ignore[arg-type]
    ptx_uid = pydicom.dcmread(ptx).SOPInstanceUID
    assert result.sop_instance_uid == ptx_uid

    folder = tmp_path / "out" / "S1-PAT"
    pred = json.loads((folder / "S1-PAT_predictions.json").read_text())
    assert set(pred) == SEED_001_KEYS and set(pred["metadata"]) == SEED_001_METADATA
    assert pred["metadata"]["sop_instance_uid"] == ptx_uid and pred["heatmap"]

    notes = result.notes
    assert len(notes) == 1 and notes[0].startswith(
        "classified 2 images of the study (series 2 image 1 (PA); series 1 image 1 (PA)); "
        "each finding is given at its highest probability across them; the image shown "
        "and referenced is series 2 image 1 (PA)")
    assert result_summary(result)["notes"] == notes
    assert notes[0] in pdf_text(folder / "S1-PAT_report.pdf")
    sr = pydicom.dcmread(folder / "S1-PAT_sr.dcm")
    assert sr_comments(sr) == notes
    assert sr_group_sources(sr)["Pneumothorax"] == {ptx_uid}
    assert pydicom.dcmread(folder / "S1-PAT_sc.dcm").SourceImageSequence[0] \
        .ReferencedSOPInstanceUID == ptx_uid
    # the report was derived from both images: its Encapsulated PDF lists both
    pdf = pydicom.dcmread(folder / "S1-PAT_report.dcm")
    assert {r.ReferencedSOPInstanceUID for r in pdf.SourceInstanceSequence} == {
        ptx_uid, pydicom.dcmread(normal).SOPInstanceUID}
    for name in ("S1-PAT_sr.dcm", "S1-PAT_sc.dcm", "S1-PAT_report.dcm"):
        assert_dciodvfy_clean(folder / name)


def test_each_finding_in_the_sr_references_the_image_it_came_from(
        runner: PipelineRunner, tmp_path: Path) -> None:
    """A pleural effusion in one series, a pneumothorax in the other: each finding's
    measurement group references the image its confidence came from (both are the SR's
    evidence), the overall result the image shown."""
    study = generate_uid()
    effusion = as_series("pleural-effusion.dcm", tmp_path / "in", study_uid=study,
                         series_number=1)
    ptx = as_series("pneumothorax.dcm", tmp_path / "in", study_uid=study, series_number=2)
    out = runner.run("cxr", [effusion, ptx], tmp_path / "out", outputs=["sr"])
    result = out.result
    assert isinstance(result, ClassificationResult)
    assert finding(result, "Pleural Effusion")[0] and finding(result, "Pneumothorax")[0]
    sr = pydicom.dcmread(tmp_path / "out" / "S1-PAT" / "S1-PAT_sr.dcm")
    uids = {p: str(pydicom.dcmread(p).SOPInstanceUID) for p in (effusion, ptx)}
    groups = sr_group_sources(sr)
    assert groups["Pleural Effusion"] == {uids[effusion]}
    assert groups["Pneumothorax"] == {uids[ptx]}
    assert groups["Overall result"] == {result.sop_instance_uid}
    evidence = {str(i.ReferencedSOPInstanceUID)
                for e in sr.CurrentRequestedProcedureEvidenceSequence
                for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
    assert evidence == set(uids.values())
    assert_dciodvfy_clean(tmp_path / "out" / "S1-PAT" / "S1-PAT_sr.dcm")


@pytest.mark.parametrize("order", ["series 1 first", "series 2 first"])
def test_past_the_image_limit_the_choice_is_fixed_and_the_rest_named(
        runner: PipelineRunner, tmp_path: Path, order: str) -> None:
    """With series.max_images 1, the same series is read whatever the arrival order (the
    highest Series Number when the images do not say when they were made), and the
    other is named as not read in the result, the report and the SR."""
    study = generate_uid()
    normal = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=1)
    ptx = as_series("pneumothorax.dcm", tmp_path / "in", study_uid=study, series_number=2)
    for path in (normal, ptx):  # nothing to tell them apart in time
        ds = pydicom.dcmread(path)
        ds.ContentDate = "20240713"
        ds.save_as(path)
    files = [normal, ptx] if order == "series 1 first" else [ptx, normal]
    out = runner.run("cxr-one", files, tmp_path / "out")
    assert out.result.result == "Abnormal"  # type: ignore[union-attr]
    assert out.result.notes == [  # type: ignore[union-attr]
        "classified series 2 image 1 (PA)",
        "not read: series 1 image 1 (PA) (more than the 1 images a study is read for: "
        "the pipeline's series.max_images)"]
    folder = tmp_path / "out" / "S1-PAT"
    text = pdf_text(folder / "S1-PAT_report.pdf")
    assert "not read: series 1 image 1 (PA)" in text
    assert sr_comments(pydicom.dcmread(folder / "S1-PAT_sr.dcm")) == out.result.notes


def test_the_later_series_is_read_first_when_the_images_say_when(
        runner: PipelineRunner, tmp_path: Path) -> None:
    study = generate_uid()
    early = as_series("pneumothorax.dcm", tmp_path / "in", study_uid=study, series_number=5)
    late = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=3)
    for path, when in ((early, "20240713080000"), (late, "20240713093000")):
        ds = pydicom.dcmread(path)
        ds.AcquisitionDateTime = when
        ds.save_as(path)
    out = runner.run("cxr-one", [early, late], tmp_path / "out", outputs=["json"])
    assert out.result.notes[0] == "classified series 3 image 1 (PA)"  # type: ignore[union-attr]
    assert out.result.result == "Normal"  # type: ignore[union-attr]
    assert "not read: series 5 image 1 (PA)" in out.result.notes[1]  # type: ignore[union-attr]


def test_a_study_of_two_patients_is_refused(runner: PipelineRunner, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """One Study Instance UID, instances of two Patient IDs (a merge error upstream): was
    run as the first patient's, the other's pleural effusion dropped. Refused now."""
    study = generate_uid()
    a = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=1,
                  patient_id="S1-PAT-A")
    b = as_series("pleural-effusion.dcm", tmp_path / "in", study_uid=study, series_number=2,
                  patient_id="S1-PAT-B")
    for files in ([a, b], [b, a]):
        with pytest.raises(PatientMismatchError) as caught:
            runner.run("cxr", files, tmp_path / "out")
        assert str(caught.value) == (
            "the study's instances carry 2 Patient IDs (S1-PAT-A, S1-PAT-B): one Study "
            "Instance UID holds images of different patients (a merge or registration "
            "error); fix the study on the sending system and send it again; not run")
    assert not (tmp_path / "out").exists()
    logged = caplog.text
    assert "Doe" not in logged and "Roe" not in logged


def test_the_same_patient_id_from_two_issuers_is_two_patients(
        runner: PipelineRunner, tmp_path: Path) -> None:
    study = generate_uid()
    a = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=1,
                  patient_id="S1-PAT", issuer="HOSPITAL-A")
    b = as_series("pneumothorax.dcm", tmp_path / "in", study_uid=study, series_number=2,
                  patient_id="S1-PAT", issuer="HOSPITAL-B")
    with pytest.raises(PatientMismatchError, match=r"carry 2 Patient IDs \(S1-PAT \(issuer "
                                                   r"HOSPITAL-A\), S1-PAT \(issuer HOSPITAL-B"):
        runner.run("cxr", [a, b], tmp_path / "out")
    # an instance that names no issuer is not another patient
    c = as_series("normal.dcm", tmp_path / "in2", study_uid=study, series_number=3,
                  patient_id="S1-PAT")
    out = runner.run("cxr", [a, c], tmp_path / "ok", outputs=["json"])
    assert out.study.patient_id == "S1-PAT"


def two_frame_cr(path: Path, sop_class: str) -> Path:
    """A radiograph of two frames: frame 1 the normal phantom, frame 2 the pneumothorax."""
    first = pydicom.dcmread(SAMPLES / "normal.dcm")
    second = pydicom.dcmread(SAMPLES / "pneumothorax.dcm")
    frames = np.stack([first.pixel_array, second.pixel_array])
    first.NumberOfFrames = 2
    first.PixelData = frames.tobytes()
    first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    first.SOPClassUID = first.file_meta.MediaStorageSOPClassUID = sop_class
    first.save_as(path)
    return path


@pytest.mark.parametrize("sop_class", [CR, MULTIFRAME_SC])
def test_a_multi_frame_radiograph_says_which_frame_everywhere(
        runner: PipelineRunner, tmp_path: Path, sop_class: str) -> None:
    """Two frames, the second a pneumothorax: "Abnormal", and nothing said frame 2; the SR
    and the SC referenced the whole object. Both frames are read; the result names the
    frame shown, the report and the summary say it, and the SR and SC reference it where
    the SOP class lets a reference name a frame (a CR's IOD has none: dciodvfy refuses a
    Referenced Frame Number to it, and the SR's comment names it)."""
    src = two_frame_cr(tmp_path / "cr2.dcm", sop_class)
    out = runner.run("cxr", [src], tmp_path / "out")
    result = out.result
    assert isinstance(result, ClassificationResult)
    assert result.result == "Abnormal" and finding(result, "Pneumothorax")[0]
    assert result.frame_number == 2
    assert result.notes == [
        "classified 2 images of the study (series 1 image 1 (PA) frame 1 of 2; series 1 "
        "image 1 (PA) frame 2 of 2); each finding is given at its highest probability "
        "across them; the image shown and referenced is series 1 image 1 (PA) frame 2 of 2"]
    assert result_summary(result)["notes"] == result.notes
    pid = out.study.patient_id
    folder = tmp_path / "out" / pid
    text = pdf_text(folder / f"{pid}_report.pdf")
    assert "Notes" in text and "frame 2 of 2" in text and "Source frame 2" in text
    uid = pydicom.dcmread(src).SOPInstanceUID
    sr = pydicom.dcmread(folder / f"{pid}_sr.dcm")
    frames = (2,) if sop_class == MULTIFRAME_SC else ()
    assert sr_frames(sr) == {(uid, frames)}
    assert sr_comments(sr) == result.notes
    ref = pydicom.dcmread(folder / f"{pid}_sc.dcm").SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == uid
    assert tuple(int(n) for n in [ref.get("ReferencedFrameNumber")] if n) == frames
    for name in (f"{pid}_sr.dcm", f"{pid}_sc.dcm"):
        assert_dciodvfy_clean(folder / name)


def test_a_lateral_beside_the_pa_is_named_as_not_read(runner: PipelineRunner,
                                                      tmp_path: Path) -> None:
    """One series, a PA and a lateral: only the log said "classified 1 image of the 2"."""
    study = generate_uid()
    pa = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=1)
    lateral = pydicom.dcmread(pa)
    lateral.ViewPosition = "LL"
    lateral.InstanceNumber = 2
    lateral.SOPInstanceUID = lateral.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    lateral.save_as(tmp_path / "in" / "lateral.dcm")
    rules = SeriesRules(modalities=["CR"])  # views not restricted: the lateral is eligible
    runner.pipelines["cxr-any-view"] = PipelineSpec(
        name="cxr-any-view", model="cxr-findings", task="classify", series=rules)
    out = runner.run("cxr-any-view", [tmp_path / "in" / "lateral.dcm", pa], tmp_path / "out",
                     outputs=["json"])
    assert out.result.notes == ["classified series 1 image 1 (PA)",  # type: ignore[union-attr]
                                "not read: series 1 image 2 (LL) (not a frontal view)"]


# -- through the node: the job a person sees -------------------------------------------


def _node_settings(tmp_path: Path) -> Any:
    from tests.support.inproc import node_settings
    from tests.support.peers import free_port

    return node_settings(
        tmp_path / "data", dimse={"host": "127.0.0.1", "port": free_port()}, watch=[],
        models=[{"name": "cxr-findings",
                 "path": str(ROOT / "pipeline" / "models" / "cxr-findings")}],
        pipelines=[{"name": "cxr", "model": "cxr-findings", "task": "classify",
                    "series": CXR_RULES, "outputs": ["json"]}],
        executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.05,
                  "grace_period_s": 5})


async def _job_of(node: Any, files: list[Path]) -> Any:
    from dicom_node.store import FINAL_STATES, NewJob

    sops = []
    for path in files:
        sent = path.with_suffix(".sent")
        shutil.copy(path, sent)
        sops.append(node.instance_writer().write(
            sent, called_ae="DICOMNODE", calling_ae="MODALITY",
            association_id=0).sop_instance_uid)
    job = await node.scheduler.submit(NewJob(pipeline="cxr", kind="api",
                                             input={"instances": sops}))
    while (job := node.store.get_job(job.id)).state not in FINAL_STATES:
        await asyncio.sleep(0.05)
    return job


@pytest.mark.timeout(180)
async def test_the_job_fails_once_on_two_patients_and_notes_two_series(
        tmp_path: Path) -> None:
    """The job of a two-patient study fails at once (no retry) with the IDs and what to
    do; the job of a two-series study carries the notes in its result."""
    from dicom_node.store import JobState
    from tests.support.inproc import running_node

    study = generate_uid()
    a = as_series("normal.dcm", tmp_path / "in", study_uid=study, series_number=1,
                  patient_id="S1-PAT-A")
    b = as_series("pleural-effusion.dcm", tmp_path / "in", study_uid=study, series_number=2,
                  patient_id="S1-PAT-B")
    other = generate_uid()
    normal = as_series("normal.dcm", tmp_path / "in2", study_uid=other, series_number=1)
    ptx = as_series("pneumothorax.dcm", tmp_path / "in2", study_uid=other, series_number=2)
    async with running_node(_node_settings(tmp_path)) as node:
        failed = await _job_of(node, [a, b])
        ran = await _job_of(node, [normal, ptx])
    assert failed.state is JobState.FAILED and failed.attempts == 1
    assert failed.error == (
        f"study {study}: the study's instances carry 2 Patient IDs (S1-PAT-A, S1-PAT-B): "
        "one Study Instance UID holds images of different patients (a merge or "
        "registration error); fix the study on the sending system and send it again; "
        "not run")
    assert ran.state is JobState.SUCCEEDED, ran.error
    (summary,) = ran.result["results"]
    assert summary["result"] == "Abnormal"
    assert summary["notes"][0].startswith("classified 2 images of the study (series 2 "
                                          "image 1 (PA); series 1 image 1 (PA))")
