"""The node's job handler: a job naming several studies of one patient.

A whole node runs in the test's loop with its own job handler, scheduler and store and a
tiny random classifier; the studies are placed with the node's InstanceWriter, as
C-STORE would place them, and the folder destination is a real folder.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from dicom_node.store import FINAL_STATES, Job, JobState, NewJob
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port
from tests.unit.pipeline.test_bundle import make_tiny_bundle

pytestmark = pytest.mark.timeout(180)

CXR = {"name": "cxr", "model": "tiny", "task": "classify",
       "series": {"modalities": ["CR", "DX"]}, "outputs": ["json"]}


def _settings(tmp_path: Path, pipelines: list[dict[str, Any]],
              models: list[dict[str, Any]] | None = None, **extra: Any) -> Any:
    """A node on loopback whose jobs run through the real handler (no drop folders); by
    default one tiny random classifier named "tiny"."""
    if models is None:
        models = [{"name": "tiny", "path": str(make_tiny_bundle(tmp_path / "bundles" / "tiny")),
                   "max_delay_ms": 0, "warmup": False}]
    return node_settings(
        tmp_path / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        watch=[],
        models=models,
        pipelines=pipelines,
        executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.05,
                  "grace_period_s": 5},
        **extra,
    )


async def _finished(node: Any, job: Job) -> Job:
    """``job`` once it reached a final state (no time limit: pytest-timeout guards)."""
    while (job := node.store.get_job(job.id)).state not in FINAL_STATES:
        await asyncio.sleep(0.05)
    return job


async def test_two_studies_of_one_patient_keep_their_own_results(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path, [{**CXR, "threshold": 0.01, "outputs": ["json", "sr"]}],
        destinations=[{"name": "share", "type": "folder", "path": str(tmp_path / "share")}])
    async with running_node(settings) as node:
        assert node.store is not None and node.scheduler is not None
        sops, studies = [], []
        for seed in (1, 2):  # two visits of patient P1: the same output file names
            src = write_dicom(make_cxr_phantom(seed, size=64), tmp_path / f"cr{seed}.dcm",
                              patient_id="P1", modality="CR")
            sent = src.with_suffix(".sent")
            shutil.copy(src, sent)
            got = node.instance_writer().write(sent, called_ae="DICOMNODE",
                                               calling_ae="MODALITY", association_id=0)
            sops.append(got.sop_instance_uid)
            studies.append(got.study_instance_uid)
        assert studies[0] != studies[1]
        job = await node.scheduler.submit(NewJob(
            pipeline="cxr", kind="api",
            input={"instances": sops, "destinations": ["share"]}))
        job = await _finished(node, job)
        assert job.state is JobState.SUCCEEDED, job.error

    results = settings.results_dir / job.id
    assert job.result is not None
    assert [r["study"] for r in job.result["results"]] == studies
    bodies = set()
    for study in studies:
        for name in ("P1_predictions.json", "P1_sr.dcm"):
            kept = results / study / "P1" / name
            assert kept.is_file(), kept
            mirrored = tmp_path / "share" / job.id / study / "P1" / name
            assert mirrored.read_bytes() == kept.read_bytes()
        bodies.add((results / study / "P1" / "P1_sr.dcm").read_bytes())
    assert len(bodies) == 2  # two different SRs, neither overwrote the other
    assert not (results / "P1").exists()  # several studies: no shared folder


def _basic_text_sr(path: Path, study: str | None = None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "SR", "P9", "Test^Report"
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    ds.save_as(path, enforce_file_format=True)
    return path


async def test_a_pushed_study_no_pipeline_of_the_intake_can_read_fails(tmp_path: Path) -> None:
    """An SR pushed to an AE title whose only pipeline classifies radiographs: the job
    fails saying why (not a silent success), and the worker runs the next job."""
    settings = _settings(tmp_path, [CXR])
    async with running_node(settings) as node:
        assert node.store is not None and node.scheduler is not None
        sr = node.instance_writer().write(_basic_text_sr(tmp_path / "sr.dcm"),
                                          called_ae="DICOMNODE", calling_ae="RIS",
                                          association_id=0)
        cr_src = write_dicom(make_cxr_phantom(3, size=64), tmp_path / "cr.dcm",
                             patient_id="P3", modality="CR")
        cr = node.instance_writer().write(cr_src, called_ae="DICOMNODE", calling_ae="CR1",
                                          association_id=0)
        jobs = []
        for got in (sr, cr):  # as the assembler queues a pushed group
            jobs.append(await node.scheduler.submit(NewJob(
                pipeline="cxr", kind="dimse", study_instance_uid=got.study_instance_uid,
                input={"instances": [got.sop_instance_uid],
                       "study_instance_uid": got.study_instance_uid,
                       "intake_pipelines": ["cxr"]})))
        done = [await _finished(node, job) for job in jobs]
    failed, ok = done
    assert failed.state is JobState.FAILED and failed.attempts == 1
    assert failed.error is not None and sr.study_instance_uid in failed.error
    assert "SR" in failed.error and "CR" in failed.error  # what it is, what would do
    assert ok.state is JobState.SUCCEEDED, ok.error


async def test_a_late_part_of_a_study_that_ran_is_skipped_not_failed(tmp_path: Path) -> None:
    """A radiograph, then in another association an SR of the same study (a dose
    report, the node's own results sent back by the PACS): the SR's job is skipped
    with the reason, not failed, since the study's image came in another group. An SR
    of a study the node holds no image of still fails."""
    settings = _settings(tmp_path, [CXR])
    async with running_node(settings) as node:
        assert node.store is not None and node.scheduler is not None
        cr_src = write_dicom(make_cxr_phantom(4, size=64), tmp_path / "cr.dcm",
                             patient_id="P4", modality="CR")
        cr = node.instance_writer().write(cr_src, called_ae="DICOMNODE", calling_ae="CR1",
                                          association_id=0)
        late = node.instance_writer().write(
            _basic_text_sr(tmp_path / "late.dcm", cr.study_instance_uid),
            called_ae="DICOMNODE", calling_ae="PACS", association_id=1)
        alone = node.instance_writer().write(_basic_text_sr(tmp_path / "alone.dcm"),
                                             called_ae="DICOMNODE", calling_ae="RIS",
                                             association_id=2)
        jobs = []
        for got in (cr, late, alone):  # as the assembler queues pushed groups
            jobs.append(await _finished(node, await node.scheduler.submit(NewJob(
                pipeline="cxr", kind="dimse", study_instance_uid=got.study_instance_uid,
                input={"instances": [got.sop_instance_uid],
                       "study_instance_uid": got.study_instance_uid,
                       "intake_pipelines": ["cxr"]}))))
    ran, skipped, failed = jobs
    assert ran.state is JobState.SUCCEEDED and ran.result and ran.result["results"]
    assert skipped.state is JobState.SUCCEEDED, skipped.error
    assert skipped.result is not None and not skipped.result["results"]
    assert skipped.result["outcome"].startswith(
        "skipped: the rest of the study came in another group; this part: ")
    assert "(SR, 1 instance(s))" in skipped.result["outcome"]
    assert failed.state is JobState.FAILED and "SR" in (failed.error or "")


async def test_a_scout_sent_before_its_series_waits_for_it_and_is_skipped(
        tmp_path: Path) -> None:
    """A modality sends the scout in one association and the series in the next: the
    scout's job (no pipeline reads a localizer) waits while the study is arriving,
    then is skipped once the series came, instead of failing a job per exam. The
    wait does not count as an attempt."""
    import pydicom

    settings = _settings(tmp_path, [CXR])
    async with running_node(settings) as node:
        assert node.store is not None and node.scheduler is not None
        image = write_dicom(make_cxr_phantom(5, size=64), tmp_path / "cr.dcm",
                            patient_id="P5", modality="CR")
        scout = pydicom.dcmread(image)
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.SeriesInstanceUID = scout.SeriesInstanceUID + ".1"
        scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = \
            scout.SOPInstanceUID + ".1"
        scout.save_as(tmp_path / "scout.dcm")
        store = node.store

        def still_arriving(job: Job) -> bool:
            return any(e.state is JobState.QUEUED and e.message
                       and "is still arriving" in e.message for e in store.events(job.id))

        jobs = []
        for path, association in ((tmp_path / "scout.dcm", 1), (image, 2)):
            got = node.instance_writer().write(path, called_ae="DICOMNODE",
                                               calling_ae="CT1", association_id=association)
            jobs.append(await node.scheduler.submit(NewJob(  # as the assembler queues them
                pipeline="cxr", kind="dimse", study_instance_uid=got.study_instance_uid,
                input={"instances": [got.sop_instance_uid],
                       "study_instance_uid": got.study_instance_uid,
                       "intake_pipelines": ["cxr"], "group_timeout_s": 1.0})))
            while len(jobs) == 1 and not still_arriving(jobs[0]) \
                    and store.get_job(jobs[0].id).state not in FINAL_STATES:
                await asyncio.sleep(0.05)  # the scout's job ran before the series came
        scout_job, series_job = [await _finished(node, job) for job in jobs]
    assert series_job.state is JobState.SUCCEEDED, series_job.error
    assert scout_job.state is JobState.SUCCEEDED, scout_job.error
    assert scout_job.result is not None and scout_job.result["outcome"].startswith(
        "skipped: the rest of the study came in another group; this part: ")
    assert "localizer" in scout_job.result["outcome"]
    assert scout_job.attempts == 1  # the wait was no failed attempt


async def test_bad_inputs_fail_their_jobs_with_a_reason_and_the_worker_goes_on(
        tmp_path: Path) -> None:
    """Through the node's own handler and worker: an SR sent to an image model, a wrong
    modality, pixel data shorter than the image, a 1-pixel image and a CT series with a
    missing slice each fail their job saying what is wrong; a good job after them runs."""
    import pydicom

    from pipeline.train.phantoms_ct import make_ct_phantom, write_dicom_series
    from tests.unit.pipeline.test_runner import make_tiny_seg_bundle

    bundles = tmp_path / "bundles"
    settings = _settings(
        tmp_path,
        [CXR, {"name": "organs", "model": "tinyseg", "task": "segment",
               "series": {"modalities": ["CT"], "min_instances": 4}, "outputs": ["json"]}],
        models=[{"name": "tiny", "path": str(make_tiny_bundle(bundles / "tiny")),
                 "max_delay_ms": 0, "warmup": False},
                {"name": "tinyseg", "path": str(make_tiny_seg_bundle(bundles / "seg")),
                 "warmup": False}])

    def cr(name: str, **change: object) -> Path:
        path = write_dicom(make_cxr_phantom(5, size=64), tmp_path / f"{name}.dcm",
                           patient_id="P5", modality="CR")
        ds = pydicom.dcmread(path)
        for key, value in change.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(path)
        return path

    short = cr("short")
    ds = pydicom.dcmread(short)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(short)
    one_pixel = cr("one", Rows=1, Columns=1)
    ds = pydicom.dcmread(one_pixel)
    ds.PixelData = ds.PixelData[:2]
    ds.save_as(one_pixel)
    ct = write_dicom_series(make_ct_phantom(3, shape=(10, 32, 32)), tmp_path / "ct")
    del ct[5]  # a missing slice in the middle
    cases = [  # (pipeline, files, words the error must hold)
        ("cxr", [_basic_text_sr(tmp_path / "sr.dcm")], ["SR"]),
        ("cxr", [cr("mr", Modality="MR")], ["MR", "CR"]),
        ("cxr", [short], ["pixel data"]),
        ("cxr", [one_pixel], ["1 x 1"]),
        ("organs", ct, ["missing"]),
        ("cxr", [cr("good")], []),  # the worker is still there
    ]
    async with running_node(settings) as node:
        assert node.store is not None and node.scheduler is not None
        jobs = []
        for pipeline, files, _ in cases:
            sops = [node.instance_writer().write(f, called_ae="DICOMNODE", calling_ae="X",
                                                 association_id=0).sop_instance_uid
                    for f in files]
            jobs.append(await node.scheduler.submit(NewJob(
                pipeline=pipeline, kind="api", input={"instances": sops})))
        done = [await _finished(node, job) for job in jobs]
    for job, (_, _, words) in zip(done, cases, strict=True):
        if not words:
            assert job.state is JobState.SUCCEEDED, job.error
            continue
        assert job.state is JobState.FAILED and job.attempts == 1, (job.state, job.error)
        for word in words:
            assert word.lower() in (job.error or "").lower(), (word, job.error)


async def test_a_drop_folders_jobs_never_overwrite_each_others_results(tmp_path: Path) -> None:
    """Two studies of one patient dropped into a folder: each job writes into its own
    folder under the folder's output, ``<job id>/P1/P1_*``, and its SR keeps its own
    study's UID (one shared ``P1/`` let the second study overwrite the first's)."""
    import pydicom

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    output = tmp_path / "drop-results"
    settings = node_settings(
        tmp_path / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        watch=[{"name": "inbox", "path": str(inbox), "pipelines": ["cxr"], "settle_s": 0.2,
                "timeout_s": 0.5, "output": str(output), "destinations": ["share"]}],
        models=[{"name": "tiny", "path": str(make_tiny_bundle(tmp_path / "bundles" / "tiny")),
                 "max_delay_ms": 0, "warmup": False}],
        pipelines=[{**CXR, "threshold": 0.01, "outputs": ["json", "sr"]}],
        destinations=[{"name": "share", "type": "folder", "path": str(tmp_path / "share")}],
        executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.05,
                  "grace_period_s": 5},
    )
    studies = []
    async with running_node(settings) as node:
        assert node.store is not None
        for seed in (1, 2):  # two visits of patient P1: the same output file names
            src = write_dicom(make_cxr_phantom(seed, size=64), tmp_path / f"cr{seed}.dcm",
                              patient_id="P1", modality="CR")
            studies.append(str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID))
            shutil.copy(src, inbox / f"visit{seed}.dcm")
            while len([j for j in node.store.list_jobs() if j.kind == "watch"]) < seed:
                await asyncio.sleep(0.05)  # one job each (no time limit: pytest-timeout)
        jobs = [await _finished(node, j) for j in node.store.list_jobs() if j.kind == "watch"]
        artifacts = {j.id: [Path(a.path) for a in node.store.artifacts_of(j.id)] for j in jobs}
    assert studies[0] != studies[1]
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [j.error for j in jobs]
    by_study = {j.study_instance_uid: j for j in jobs}
    assert set(by_study) == set(studies)
    for study, job in by_study.items():  # the SR each job lists is still its own study's
        (sr,) = [p for p in artifacts[job.id] if p.name == "P1_sr.dcm"]
        assert str(pydicom.dcmread(sr, stop_before_pixels=True).StudyInstanceUID) == study
    first, second = artifacts.values()
    assert not set(first) & set(second)
    for job in jobs:
        folder = output / job.id / "P1"
        assert job.result is not None and job.result["output_dir"] == str(output / job.id)
        assert {"P1_predictions.json", "P1_sr.dcm"} <= {p.name for p in folder.iterdir()}
        assert sorted(artifacts[job.id]) == sorted(folder.iterdir())  # what `jobs show` lists
        sr = folder / "P1_sr.dcm"
        mirrored = tmp_path / "share" / job.id / "P1" / "P1_sr.dcm"
        assert mirrored.read_bytes() == sr.read_bytes()
    assert not (output / "P1").exists()  # no folder shared by the patient's jobs


async def test_a_job_runs_on_its_instances_after_the_data_directory_moved(
        tmp_path: Path) -> None:
    """The store keeps absolute paths: after ``mv data moved`` a job failed with "none of
    the job's instances is available"; it finds them at the same place under the new
    studies folder."""
    settings = _settings(tmp_path, [CXR])
    async with running_node(settings) as node:
        src = write_dicom(make_cxr_phantom(3, size=64), tmp_path / "cr.dcm",
                          patient_id="P1", modality="CR")
        got = node.instance_writer().write(src, called_ae="DICOMNODE", calling_ae="MODALITY",
                                           association_id=0)
    moved = tmp_path / "moved"
    (tmp_path / "data").rename(moved)
    settings = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"data_dir": moved})})
    async with running_node(settings) as node:
        assert node.scheduler is not None
        job = await node.scheduler.submit(NewJob(
            pipeline="cxr", kind="api", input={"instances": [got.sop_instance_uid]}))
        job = await _finished(node, job)
    assert job.state is JobState.SUCCEEDED, job.error


async def test_a_rerun_removes_the_partial_files_an_interrupted_attempt_left(
        tmp_path: Path) -> None:
    """The node died while a result was being written: the temporary file it was written
    under stayed in the job's results folder for good (as large as a SEG can be)."""
    from dicom_node.store import Store

    settings = _settings(tmp_path, [CXR])
    src = write_dicom(make_cxr_phantom(3, size=64), tmp_path / "cr.dcm", patient_id="P1",
                      modality="CR")
    async with running_node(settings) as node:
        assert node.store is not None
        got = node.instance_writer().write(src, called_ae="DICOMNODE", calling_ae="MODALITY",
                                           association_id=0)
    store = Store(settings.database_url).open()  # the node is down: the job waits for it
    try:
        job = store.create_job(NewJob(pipeline="cxr", kind="api",
                                      input={"instances": [got.sop_instance_uid]}))
    finally:
        store.close()
    left = settings.results_dir / job.id / "P1" / ".P1_predictions.json.4242.0a1b2c3d4e5f.part"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a result")
    async with running_node(settings) as node:
        job = await _finished(node, job)
    assert job.state is JobState.SUCCEEDED, job.error
    assert not left.exists()
    assert (settings.results_dir / job.id / "P1" / "P1_predictions.json").is_file()
