"""Retention: expired studies and results folders go; everything still needed stays.

Real files written by the node's InstanceWriter into a real studies folder, a real
store on SQLite and PostgreSQL; ages are set in the store, not waited for.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import structlog.testing

from dicom_node.config import Settings
from dicom_node.errors import NotFound
from dicom_node.retention import sweep
from dicom_node.scp import InstanceWriter
from dicom_node.store import InstanceRecord, JobState, NewJob, Store, jobs, studies, utcnow
from tests.support.dicom_factory import make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port

DAYS = 30


def settings_for(tmp: Path, **storage: object) -> Settings:
    return node_settings(tmp / "data", storage={"retention_days": DAYS, **storage})


def receive(settings: Settings, store: Store, tmp: Path, seed: str) -> str:
    """Store a 3-slice CT study as C-STORE would; its study UID."""
    writer = InstanceWriter(settings, store)
    study = ""
    for p in make_ct_study(tmp / "src" / seed, seed=seed, slices=3).paths:
        sent = p.with_suffix(".sent")
        shutil.copy(p, sent)
        got = writer.write(sent, called_ae="DICOMNODE", calling_ae="CT", association_id=1)
        study = got.study_instance_uid
    return study


def age(store: Store, study: str, days: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(studies.update().where(studies.c.study_instance_uid == study)
                     .values(updated_at=utcnow() - timedelta(days=days)))


def finish(store: Store, job_id: str, days_ago: float) -> None:
    with store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(
            state=JobState.SUCCEEDED.value, finished_at=utcnow() - timedelta(days=days_ago)))


def test_sweep_deletes_only_what_expired(store: Store, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    studies_dir = settings.studies_dir.resolve()
    old, busy, recent, pending = (receive(settings, store, tmp_path, s)
                                  for s in ("old", "busy", "recent", "pending"))
    for study in (old, busy, recent):  # their groups became jobs
        store.mark_queued([r.sop_instance_uid for r in store.instances_of(study)])
    for study in (old, busy, pending):
        age(store, study, DAYS + 10)
    store.create_job(NewJob(pipeline="p", study_instance_uid=busy))  # still queued
    outside = tmp_path / "elsewhere.dcm"  # a record pointing outside the studies folder
    outside.write_bytes(b"not ours")
    store.record_instance(InstanceRecord(
        sop_instance_uid="1.2.3.999", sop_class_uid="1.2", study_instance_uid=old,
        series_instance_uid="1.2.3.999.1", path=outside, size_bytes=8, source="dimse"))
    store.mark_queued(["1.2.3.999"])
    age(store, old, DAYS + 10)

    results = settings.results_dir.resolve()
    done_long_ago = store.create_job(NewJob(pipeline="p"))
    done_lately = store.create_job(NewJob(pipeline="p"))
    finish(store, done_long_ago.id, DAYS + 1)
    finish(store, done_lately.id, 1)
    for job in (done_long_ago, done_lately):
        (results / job.id / "P1").mkdir(parents=True)
        (results / job.id / "P1" / "P1_predictions.json").write_text("{}")
    (results / "notes").mkdir()  # not a job's folder

    old_files = [Path(r.path) for r in store.instances_of(old) if Path(r.path) != outside]
    old_bytes = sum(p.stat().st_size for p in old_files)
    got = sweep(settings, store)

    assert (got.studies, got.instances, got.results, got.jobs) == (1, 4, 1, 1)
    assert got.left == 1  # the file outside, left where it is, is counted
    assert got.bytes == old_bytes > 0
    assert not any(p.exists() for p in old_files)
    assert not (studies_dir / old).exists()  # emptied folders pruned
    assert store.instances_of(old) == []
    assert outside.read_bytes() == b"not ours"  # never deleted outside the folder
    for study in (busy, recent, pending):  # a waiting job, too new, not yet a job
        kept = store.instances_of(study)
        assert len(kept) == 3 and all(Path(r.path).is_file() for r in kept)
    assert not (results / done_long_ago.id).exists()
    assert (results / done_lately.id / "P1" / "P1_predictions.json").is_file()
    with pytest.raises(NotFound):
        store.get_job(done_long_ago.id)
    assert store.get_job(done_lately.id).state is JobState.SUCCEEDED
    assert (results / "notes").is_dir()
    assert studies_dir.is_dir() and results.is_dir()
    assert sweep(settings, store).studies == 0  # nothing more to do


def test_job_records_expire_with_their_events_and_a_batch_only_whole(
        store: Store, tmp_path: Path) -> None:
    """A job record goes with its results folder: the job table does not grow for as
    long as the node runs. A batch expires once every one of its jobs is that old."""
    settings = settings_for(tmp_path)
    lone = store.create_job(NewJob(pipeline="p"))
    old_batch = store.create_batch(group_name="g", owner=None, project_id=1, pipeline="p",
                                   output_layer_id=1,
                                   sources=[(1, NewJob(pipeline="p")), (2, NewJob(pipeline="p"))])
    mixed = store.create_batch(group_name="g", owner=None, project_id=1, pipeline="p",
                               output_layer_id=1,
                               sources=[(1, NewJob(pipeline="p")), (2, NewJob(pipeline="p"))])
    for job in [lone, *(j for _, j in old_batch.sources), mixed.sources[0][1]]:
        finish(store, job.id, DAYS + 1)
        store.record_export(job.id, "pacs", "succeeded", attempts=1, sent=2)
    finish(store, mixed.sources[1][1].id, 1)  # ended lately: the whole batch stays

    got = sweep(settings, store)

    assert got.jobs == 3
    for job in (lone, *(j for _, j in old_batch.sources)):
        with pytest.raises(NotFound):
            store.get_job(job.id)
        assert store.exports_of(job.id) == []
    with pytest.raises(NotFound):
        store.get_batch(old_batch.id)
    assert [j.id for _, j in store.get_batch(mixed.id).sources] == [
        j.id for _, j in mixed.sources]
    assert len(store.exports_of(mixed.sources[0][1].id)) == 1
    assert sweep(settings, store).jobs == 0


def test_sweep_is_off_without_retention_days_and_stops_when_asked(
        store: Store, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    study = receive(settings, store, tmp_path, "s")
    store.mark_queued([r.sop_instance_uid for r in store.instances_of(study)])
    age(store, study, DAYS + 10)
    off = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"retention_days": None})})
    assert sweep(off, store).studies == 0
    stop = threading.Event()
    stop.set()
    assert sweep(settings, store, stop=stop).studies == 0
    assert len(store.instances_of(study)) == 3
    assert sweep(settings, store).studies == 1


def test_retention_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_days"):
        settings_for(tmp_path, retention_days=0)


async def test_the_node_sweeps_at_start(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, retention_check_s=3600)
    seed = Store(settings.database_url).open()
    try:
        study = receive(settings, seed, tmp_path, "s")
        seed.mark_queued([r.sop_instance_uid for r in seed.instances_of(study)])
        age(seed, study, DAYS + 1)
    finally:
        seed.close()
    async with running_node(settings) as node:
        assert node.parts.get("retention") == "running"
        assert node.store is not None
        while node.store.instances_of(study):  # no time limit: pytest-timeout guards
            await asyncio.sleep(0.05)
    assert not (settings.studies_dir / study).exists()


def test_a_moved_data_directory_is_cleaned(store: Store, tmp_path: Path) -> None:
    """The store keeps absolute paths: after ``mv data moved`` they name the old place.
    The sweep finds each file at the same ``<study>/<series>/<sop>.dcm`` under today's
    studies folder; it forgot the records and left the files, uncounted."""
    before = settings_for(tmp_path)
    study = receive(before, store, tmp_path, "m")
    store.mark_queued([r.sop_instance_uid for r in store.instances_of(study)])
    age(store, study, DAYS + 1)
    moved_to = tmp_path / "moved"
    before.data_dir.rename(moved_to)
    settings = node_settings(moved_to, storage={"retention_days": DAYS})
    studies_dir = settings.studies_dir.resolve()
    files = list((studies_dir / study).rglob("*.dcm"))
    assert len(files) == 3 and not any(Path(r.path).is_relative_to(studies_dir)
                                       for r in store.instances_of(study))
    size = sum(f.stat().st_size for f in files)

    got = sweep(settings, store)

    assert (got.studies, got.instances, got.left) == (1, 3, 0)
    assert got.bytes == size > 0
    assert not (studies_dir / study).exists() and studies_dir.is_dir()
    assert store.instances_of(study) == []


def test_a_file_that_cannot_be_deleted_does_not_stall_the_sweep(
        store: Store, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    first, second = (receive(settings, store, tmp_path, s) for s in ("a", "b"))
    for study, days in ((first, DAYS + 20), (second, DAYS + 10)):
        store.mark_queued([r.sop_instance_uid for r in store.instances_of(study)])
        age(store, study, days)
    stuck = Path(store.instances_of(first)[0].path)
    stuck.unlink()
    stuck.mkdir()  # unlink() of a directory fails, as a file on a read-only mount would
    got = sweep(settings, store)
    assert (got.studies, got.left) == (2, 1)  # the next study was still swept
    assert stuck.is_dir() and store.instances_of(first) == []
    assert store.instances_of(second) == []


def put(path: Path, *, modified: datetime, data: bytes = b"x") -> Path:
    """A file written beside ``path`` with that mtime, then renamed to ``path`` as the
    watcher moves a taken input into ``done/`` (a rename keeps the mtime)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.parent.parent / f".{path.name}.new"
    aside.write_bytes(data)
    os.utime(aside, (modified.timestamp(), modified.timestamp()))
    os.rename(aside, path)
    return path


def test_drop_folders_done_and_failed_lose_what_was_moved_there_long_ago(
        store: Store, tmp_path: Path) -> None:
    """With ``on_done: move`` every dropped file stayed in ``done/`` for good. Their
    age counts from the move (ctime), not from the dropped file's own mtime."""
    inbox, other, outside = tmp_path / "inbox", tmp_path / "other", tmp_path / "outside"
    settings = node_settings(tmp_path / "data", storage={"retention_days": DAYS}, watch=[
        {"name": "inbox", "path": str(inbox)}, {"name": "other", "path": str(other)}])
    long_ago = utcnow() - timedelta(days=3 * DAYS)
    later = utcnow() + timedelta(days=DAYS + 1)  # the sweep's "now", once all is old
    lately = later - timedelta(days=1)  # moved there a day before that sweep
    expired = [put(inbox / "done" / "s011.dcm", modified=long_ago, data=b"dicom"),
               put(inbox / "done" / "d1" / "d2" / "s012.dcm", modified=long_ago),
               put(inbox / "failed" / "junk.bin", modified=long_ago),
               put(inbox / "failed" / "junk.bin.reason.txt", modified=long_ago)]
    kept = [put(inbox / "s013.dcm", modified=long_ago),  # not taken yet
            put(inbox / "done" / "recent.dcm", modified=lately),
            put(inbox / "failed" / "new.bin", modified=lately),
            put(inbox / "failed" / "new.bin.reason.txt", modified=long_ago),  # its input stays
            put(outside / "target.dcm", modified=long_ago),
            put(outside / "sub" / "t.dcm", modified=long_ago)]
    (inbox / "done" / "link.dcm").symlink_to(outside / "target.dcm")
    (inbox / "done" / "linked").symlink_to(outside / "sub")
    (other / "done").parent.mkdir()
    (other / "done").symlink_to(outside)  # done/ itself a link: not followed
    (other / "failed" / "empty" / "tree").mkdir(parents=True)

    first = sweep(settings, store)  # the files' mtimes are old, but they came just now
    assert all(p.is_file() for p in expired + kept) and first.dropped == 0

    with structlog.testing.capture_logs() as logs:
        got = sweep(settings, store, now=later)

    assert not any(p.exists() for p in expired)
    assert all(p.is_file() for p in kept)
    assert (got.dropped, got.dropped_bytes) == (4, len(b"dicom") + 3)
    assert (inbox / "done" / "link.dcm").is_symlink() and (inbox / "done" / "linked").is_symlink()
    assert not (inbox / "done" / "d1").exists()  # emptied subfolders pruned
    assert (inbox / "done").is_dir() and (inbox / "failed").is_dir()
    assert not (other / "failed" / "empty").exists() and (other / "failed").is_dir()
    line = next(e for e in logs if e["event"] == "retention sweep")
    assert line["drop_folder_files"] == 4


async def test_a_file_the_watcher_moved_to_done_ages_from_the_move(tmp_path: Path) -> None:
    """The real watcher's move: a file dropped with a months-old mtime (``cp -p``)
    stays in ``done/`` for the retention period, then goes."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = node_settings(
        tmp_path / "data", storage={"retention_days": DAYS, "retention_check_s": 3600},
        dimse={"host": "127.0.0.1", "port": free_port()},
        watch=[{"name": "inbox", "path": str(inbox), "pipelines": ["demo"],
                "settle_s": 0.3, "timeout_s": 1.0}],
        models=[{"name": "demo-model", "path": "unused"}],
        pipelines=[{"name": "demo", "model": "demo-model", "task": "classify"}])
    source = make_ct_study(tmp_path / "src", seed="dropped", slices=1).paths[0]
    put(inbox / source.name, modified=utcnow() - timedelta(days=3 * DAYS),
        data=source.read_bytes())
    moved = inbox / "done" / source.name
    async with running_node(settings) as node:
        while not moved.is_file():  # no time limit: pytest-timeout guards
            await asyncio.sleep(0.05)
        assert node.store is not None
        await asyncio.to_thread(sweep, settings, node.store)
        assert moved.is_file()
        later = utcnow() + timedelta(days=DAYS + 1)
        got = await asyncio.to_thread(sweep, settings, node.store, later)
    assert not moved.exists() and (inbox / "done").is_dir()
    assert got.dropped == 1
