"""Scheduler: priority order, retries with backoff, cancel, shutdown, on both stores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dicom_node.config import ExecutorSettings, RetrySettings
from dicom_node.errors import StoreError
from dicom_node.scheduler import Scheduler
from dicom_node.store import JobState, NewJob, Store
from pipeline.types import Artifact
from tests.support.handlers import RecordingHandler


def make(store: Store, tmp_path: Path, **kw: object) -> tuple[Scheduler, RecordingHandler]:
    handler = RecordingHandler()
    settings = ExecutorSettings(
        workers=int(kw.pop("workers", 1)),  # type: ignore[call-overload]
        poll_interval_s=0.05,
        retry=RetrySettings(max_attempts=int(kw.pop("max_attempts", 3)),  # type: ignore[call-overload]
                            backoff_s=0.05, backoff_max_s=0.2),
        grace_period_s=float(kw.pop("grace", 5)),  # type: ignore[arg-type]
        immediate_slot=bool(kw.pop("immediate_slot", True)),
    )
    return Scheduler(store, handler, settings, owner="test", work_root=tmp_path / "work"), handler


async def wait_state(store: Store, job_id: str, *states: JobState) -> JobState:
    while True:  # no time limit here: pytest-timeout guards the whole test
        job = await asyncio.to_thread(store.get_job, job_id)
        if job.state in states:
            return job.state
        await asyncio.sleep(0.02)


async def test_runs_jobs_by_priority_then_age(store: Store, tmp_path: Path) -> None:
    # one worker and no immediate slot: the queue's order is the order they run in
    sched, handler = make(store, tmp_path, immediate_slot=False)
    # queued before the scheduler starts, so the order is the queue's, not arrival's
    ids = []
    for name, pri in [("low", 5), ("normal-1", 128), ("now", 255), ("normal-2", 128)]:
        job = await asyncio.to_thread(store.create_job,
                                      NewJob(pipeline="p", priority=pri, input={"name": name}))
        ids.append(job.id)
    await sched.start()
    try:
        for job_id in ids:
            assert await wait_state(store, job_id, JobState.SUCCEEDED,
                                    JobState.FAILED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order == ["now", "normal-1", "normal-2", "low"]
    events = [e.state for e in store.events(ids[0])]
    assert events == [JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING, JobState.SUCCEEDED]
    assert store.artifacts_of(ids[0])[0].kind == "txt"
    assert store.exports_of(ids[0])[0].state == "succeeded"
    assert not any((tmp_path / "work").iterdir())  # each job's scratch went with it


async def test_transient_failures_retry_with_backoff(store: Store, tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path, max_attempts=3)
    await sched.start()
    try:
        ok = await sched.submit(NewJob(pipeline="p", input={"fail_times": 2}))
        assert await wait_state(store, ok.id, JobState.SUCCEEDED, JobState.FAILED) \
            is JobState.SUCCEEDED
        assert store.get_job(ok.id).attempts == 3
        hopeless = await sched.submit(NewJob(pipeline="p", input={"fail_times": 99}))
        assert await wait_state(store, hopeless.id, JobState.SUCCEEDED, JobState.FAILED) \
            is JobState.FAILED
    finally:
        await sched.stop()
    failed = store.get_job(hopeless.id)
    assert failed.attempts == 3 and "gave up after 3 attempts" in (failed.error or "")
    assert not any((tmp_path / "work").iterdir())  # failed attempts leave no scratch
    history = [e.state for e in store.events(hopeless.id)]
    assert history.count(JobState.RUNNING) == 3 and history.count(JobState.QUEUED) == 3


async def test_permanent_errors_do_not_retry(store: Store, tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"permanent": True}))
        assert await wait_state(store, job.id, JobState.FAILED) is JobState.FAILED
    finally:
        await sched.stop()
    failed = store.get_job(job.id)
    assert failed.attempts == 1 and failed.error == "this input can never work"


async def test_failed_export_fails_the_job_with_the_reason(store: Store, tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"export_fails": True}))
        assert await wait_state(store, job.id, JobState.FAILED) is JobState.FAILED
    finally:
        await sched.stop()
    assert "export to pacs failed: association rejected" in (store.get_job(job.id).error or "")


async def test_a_destination_that_is_down_frees_the_worker_between_export_passes(
        store: Store, tmp_path: Path) -> None:
    """The job is queued again for each export pass (not counted as an attempt, not run
    again), and the only worker runs another job meanwhile."""
    sched, handler = make(store, tmp_path, immediate_slot=False)
    await sched.start()
    try:
        waits = await sched.submit(NewJob(pipeline="p", input={
            "name": "waits", "pacs_down_passes": 2, "retry_in_s": 0.5}))
        while not (handler.exports or store.get_job(waits.id).state.final):
            await asyncio.sleep(0.02)
        other = await sched.submit(NewJob(pipeline="p", priority=200, input={"name": "other"}))
        assert await wait_state(store, waits.id, JobState.SUCCEEDED,
                                JobState.FAILED) is JobState.SUCCEEDED
        assert await wait_state(store, other.id, JobState.SUCCEEDED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order == ["waits", "other"]  # each ran once
    # the other job ran between the first export pass and the last
    assert handler.exports == ["waits", "other", "waits", "waits"]
    job = store.get_job(waits.id)
    assert job.attempts == 1 and job.result == {"artifacts": 1, "exports": 1}
    history = [e.state for e in store.events(waits.id)]
    assert history == [JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING,
                       JobState.QUEUED, JobState.EXPORTING, JobState.QUEUED,
                       JobState.EXPORTING, JobState.SUCCEEDED]
    assert [(x.destination, x.state, x.attempts) for x in store.exports_of(waits.id)] == [
        ("pacs", "succeeded", 3)]
    assert len(store.artifacts_of(waits.id)) == 1


async def test_a_cancel_while_queued_for_an_export_pass_ends_it(store: Store,
                                                                tmp_path: Path) -> None:
    sched, handler = make(store, tmp_path)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={
            "pacs_down_passes": 5, "retry_in_s": 60}))
        while not (store.exports_of(job.id) or store.get_job(job.id).state.final):
            await asyncio.sleep(0.02)
        assert await wait_state(store, job.id, JobState.QUEUED, JobState.FAILED,
                                JobState.SUCCEEDED) is JobState.QUEUED
        await asyncio.to_thread(store.request_cancel, job.id)  # what `jobs cancel` does
        assert store.get_job(job.id).state is JobState.CANCELLED
    finally:
        await sched.stop()
    assert len(handler.exports) == 1


async def test_a_job_interrupted_in_its_export_sends_its_results_after_a_restart(
        store: Store, tmp_path: Path) -> None:
    """The node died while the job was exporting: at start-up it is queued again, and its
    recorded results go out; it does not run again."""
    job = await asyncio.to_thread(store.create_job, NewJob(pipeline="p"))
    claimed = await asyncio.to_thread(store.claim_next, "test", 300)
    assert claimed is not None
    made = tmp_path / f"{job.id}.txt"
    made.write_text("ok")
    assert store.start_export(job.id, [Artifact("txt", made, "text/plain")],
                              token=claimed.lease_token)
    sched, handler = make(store, tmp_path)
    await sched.start()  # the same owner as the node that died
    try:
        assert await wait_state(store, job.id, JobState.SUCCEEDED,
                                JobState.FAILED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order == [] and handler.exports == [job.id]
    assert [e.state for e in store.events(job.id)] == [
        JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING, JobState.QUEUED,
        JobState.EXPORTING, JobState.SUCCEEDED]


async def test_cancel_queued_and_running(store: Store, tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path)
    await sched.start()
    try:
        running = await sched.submit(NewJob(pipeline="p", input={"sleep": 60}))
        assert await wait_state(store, running.id, JobState.RUNNING) is JobState.RUNNING
        queued = await sched.submit(NewJob(pipeline="p"))
        assert (await sched.cancel(queued.id)).state is JobState.CANCELLED
        await sched.cancel(running.id)
        assert await wait_state(store, running.id, JobState.CANCELLED, JobState.SUCCEEDED) \
            is JobState.CANCELLED
    finally:
        await sched.stop()


async def test_cancel_from_another_process_reaches_the_worker(store: Store,
                                                              tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"sleep": 60}))
        await wait_state(store, job.id, JobState.RUNNING)
        await asyncio.to_thread(store.request_cancel, job.id)  # what `jobs cancel` does
        assert await wait_state(store, job.id, JobState.CANCELLED) is JobState.CANCELLED
    finally:
        await sched.stop()


async def test_stop_requeues_jobs_that_outlive_the_grace_period(store: Store,
                                                                tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path, grace=0.1)
    await sched.start()
    job = await sched.submit(NewJob(pipeline="p", input={"sleep": 60}))
    await wait_state(store, job.id, JobState.RUNNING)
    await sched.stop()
    again = store.get_job(job.id)
    assert again.state is JobState.QUEUED and again.lease_owner is None


async def test_stop_stops_the_job_even_when_it_cannot_queue_it_again(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store failing as a job outliving the grace period is queued again: its thread
    was never told to stop (an export went on sending to its destinations)."""
    sched, _ = make(store, tmp_path, grace=0.1)
    await sched.start()
    job = await sched.submit(NewJob(pipeline="p", input={"sleep": 60}))
    await wait_state(store, job.id, JobState.RUNNING)
    while not sched._running:  # claimed ("running") a moment before its worker holds it
        await asyncio.sleep(0.01)
    (ctx, _task), = sched._running.values()
    real_transition = store.transition

    def transition(job_id: str, state: JobState, **kw: object) -> bool:
        if state is JobState.QUEUED:
            raise StoreError("database or disk is full")
        return real_transition(job_id, state, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "transition", transition)
    await sched.stop()
    assert ctx.cancelled.is_set()


async def test_stop_lets_short_jobs_finish(store: Store, tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path, grace=30)
    await sched.start()
    job = await sched.submit(NewJob(pipeline="p", input={"sleep": 0.3}))
    await wait_state(store, job.id, JobState.RUNNING)
    await sched.stop()
    assert store.get_job(job.id).state is JobState.SUCCEEDED


async def test_worker_slots_run_jobs_concurrently(sqlite_store: Store, tmp_path: Path) -> None:
    sched, _ = make(sqlite_store, tmp_path, workers=3)
    await sched.start()
    try:
        jobs = [await sched.submit(NewJob(pipeline="p", input={"sleep": 60})) for _ in range(3)]
        for j in jobs:
            await wait_state(sqlite_store, j.id, JobState.RUNNING)
        # All three are running at once. The store says so a moment before the worker
        # that claimed the last one lists it (its claim's thread returns to the loop
        # after ours may have): wait for that, no time limit (pytest-timeout guards).
        while len(sched.running_jobs) < 3:
            await asyncio.sleep(0.01)
        assert sorted(sched.running_jobs) == sorted(j.id for j in jobs)
        for j in jobs:
            await sched.cancel(j.id)
    finally:
        await sched.stop()


def test_new_job_validates_priority() -> None:
    with pytest.raises(ValueError, match="priority must be 0-255"):
        NewJob(pipeline="p", priority=300)


async def test_an_immediate_job_starts_while_every_worker_is_busy(
    sqlite_store: Store, tmp_path: Path
) -> None:
    """Priority 255 gets the immediate slot: it runs to the end beside a long job that
    holds the only worker, while a normal job waits its turn."""
    sched, handler = make(sqlite_store, tmp_path, workers=1)
    await sched.start()
    try:
        long = await sched.submit(NewJob(pipeline="p", input={"name": "long", "sleep": 60}))
        await wait_state(sqlite_store, long.id, JobState.RUNNING)
        normal = await sched.submit(NewJob(pipeline="p", priority=254, input={"name": "n"}))
        now = await sched.submit(NewJob(pipeline="p", priority=255, input={"name": "now"}))
        assert await wait_state(sqlite_store, now.id, JobState.SUCCEEDED,
                                JobState.FAILED) is JobState.SUCCEEDED
        assert sqlite_store.get_job(long.id).state is JobState.RUNNING
        assert sqlite_store.get_job(normal.id).state is JobState.QUEUED  # not the slot's
        await sched.cancel(long.id)
        assert await wait_state(sqlite_store, normal.id, JobState.SUCCEEDED,
                                JobState.FAILED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order[-2:] == ["now", "n"]


async def test_without_the_immediate_slot_255_waits_for_a_worker(
    sqlite_store: Store, tmp_path: Path
) -> None:
    sched, _ = make(sqlite_store, tmp_path, workers=1, immediate_slot=False)
    await sched.start()
    try:
        long = await sched.submit(NewJob(pipeline="p", input={"sleep": 60}))
        await wait_state(sqlite_store, long.id, JobState.RUNNING)
        now = await sched.submit(NewJob(pipeline="p", priority=255, input={"name": "now"}))
        await asyncio.sleep(0.3)  # several polls of the queue
        assert sqlite_store.get_job(now.id).state is JobState.QUEUED
        await sched.cancel(long.id)
        assert await wait_state(sqlite_store, now.id, JobState.SUCCEEDED,
                                JobState.FAILED) is JobState.SUCCEEDED
    finally:
        await sched.stop()


def test_claim_next_leaves_jobs_under_min_priority(store: Store) -> None:
    normal = store.create_job(NewJob(pipeline="p", priority=128))
    assert store.claim_next("me", 30, min_priority=255) is None
    urgent = store.create_job(NewJob(pipeline="p", priority=255))
    claimed = store.claim_next("me", 30, min_priority=255)
    assert claimed is not None and claimed.id == urgent.id
    assert store.get_job(normal.id).state is JobState.QUEUED


async def test_start_removes_scratch_a_crash_left(store: Store, tmp_path: Path) -> None:
    work = tmp_path / "work"
    elsewhere = await asyncio.to_thread(store.create_job, NewJob(pipeline="p"))
    await asyncio.to_thread(store.claim_next, "other-node", 300)  # running on another node
    assert store.get_job(elsewhere.id).state is JobState.RUNNING
    finished = await asyncio.to_thread(store.create_job, NewJob(pipeline="p"))
    assert store.request_cancel(finished.id).state is JobState.CANCELLED
    for name in (finished.id, elsewhere.id, "not-a-job"):
        (work / name / "retrieved").mkdir(parents=True)
        (work / name / "retrieved" / "x.dcm").write_bytes(b"x")
    sched, _ = make(store, tmp_path)
    await sched.start()
    await sched.stop()
    assert [p.name for p in work.iterdir()] == [elsewhere.id]


@pytest.mark.timeout(120)  # without the sweep the job would stay running forever
async def test_a_job_whose_node_died_is_run_by_a_live_one(store: Store, tmp_path: Path) -> None:
    """Several nodes on one database: a node that dies holding a job stops renewing its
    lease; a running node queues the job again once the lease runs out and runs it, with
    no restart of anything."""
    handler = RecordingHandler()
    settings = ExecutorSettings(workers=1, poll_interval_s=0.05, lease_s=1.5,
                                retry=RetrySettings(backoff_s=0.05, backoff_max_s=0.2))
    sched = Scheduler(store, handler, settings, owner="live", work_root=tmp_path / "work")
    job = store.create_job(NewJob(pipeline="p"))
    claimed = store.claim_next("dead#1", 1.5)  # the other node, which then dies
    assert claimed is not None and claimed.id == job.id
    await sched.start()  # its lease has not run out yet: start-up leaves it
    try:
        assert await wait_state(store, job.id, JobState.SUCCEEDED) is JobState.SUCCEEDED
        events = await asyncio.to_thread(store.events, job.id)
        assert any(e.message == "interrupted; queued again" for e in events)
    finally:
        await sched.stop()


def test_requeue_expired_takes_only_leases_that_ran_out(store: Store) -> None:
    import time

    a = store.create_job(NewJob(pipeline="p"))
    b = store.create_job(NewJob(pipeline="p"))
    assert store.claim_next("dead#1", 1.1) is not None
    assert store.claim_next("alive#2", 600) is not None
    time.sleep(1.2)
    assert store.requeue_expired() == [a.id]
    assert store.get_job(a.id).state is JobState.QUEUED
    assert store.get_job(b.id).state in (JobState.RUNNING, JobState.RETRIEVING)
    assert store.requeue_expired() == []  # done once, by whoever is first


async def test_a_store_failure_while_an_outcome_is_recorded_costs_no_worker(
        sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store failing as a job's end was written (a full disk, a database restart)
    killed the worker for good: the job stayed "running", nothing else ran, and its lease
    was renewed forever. Now the job goes back to the queue once the store answers, its
    results are sent on without a second run, and the worker goes on."""
    sched, handler = make(sqlite_store, tmp_path, immediate_slot=False)  # one worker
    real = sqlite_store.transition
    fail = {JobState.SUCCEEDED: 2, JobState.QUEUED: 1}  # the end twice, the re-queue once

    def flaky(job_id: str, state: JobState, **kw: object) -> bool:
        if fail.get(state):
            fail[state] -= 1
            raise StoreError("database or disk is full")
        return real(job_id, state, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_store, "transition", flaky)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"name": "first"}))
        assert await wait_state(sqlite_store, job.id, JobState.SUCCEEDED) is JobState.SUCCEEDED
        after = await sched.submit(NewJob(pipeline="p", input={"name": "after"}))
        assert await wait_state(sqlite_store, after.id, JobState.SUCCEEDED) \
            is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order == ["first", "after"]  # the results were made once
    assert sqlite_store.get_job(job.id).attempts == 1  # the store's failures cost none


async def test_an_export_the_store_failed_to_record_is_not_sent_again(
        sqlite_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store failing as an export pass's outcome was recorded: the job was queued
    again with no record of the destination that got the results, so the next pass sent
    them to it a second time. Now the outcome is recorded before the job is queued again,
    and the next pass finds the destination done."""
    sched, handler = make(sqlite_store, tmp_path, immediate_slot=False)
    real_record = sqlite_store.record_export
    down = [2]  # the record fails twice: in the pass, and the first try to queue it again
    seen: list[dict[str, str]] = []

    def record_export(*args: object, **kw: object) -> None:
        if down[0]:
            down[0] -= 1
            raise StoreError("database or disk is full")
        real_record(*args, **kw)  # type: ignore[arg-type]

    real_export = handler.export

    def export(ctx, artifacts):  # type: ignore[no-untyped-def]
        seen.append({d: r.state for d, r in ctx.exported.items()})
        return real_export(ctx, artifacts)

    monkeypatch.setattr(sqlite_store, "record_export", record_export)
    monkeypatch.setattr(handler, "export", export)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"name": "once"}))
        assert await wait_state(sqlite_store, job.id, JobState.SUCCEEDED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    # one pass sent the results; the one after the outage found "folder" done
    assert seen == [{}, {"folder": "succeeded"}]
    assert handler.order == ["once"]
    assert sqlite_store.get_job(job.id).attempts == 1  # the store's failure cost none


async def test_a_job_no_worker_holds_loses_its_lease_and_is_queued_again(
        store: Store, tmp_path: Path) -> None:
    """Only the jobs a worker here runs have their leases renewed: one left "running"
    under our name without a worker runs again once its lease is out."""
    orphan = store.create_job(NewJob(pipeline="p", input={"name": "orphan"}))
    assert store.claim_next("test", 0.3) is not None  # ours, but no worker runs it
    sched, handler = make(store, tmp_path)
    sched.settings = sched.settings.model_copy(update={"lease_s": 0.3})
    sched._stopping = False
    sched._loop = asyncio.get_running_loop()
    sched._wake = asyncio.Event()
    # start() would re-queue our own leases at once; the keeper and workers alone here
    sched._workers = [asyncio.create_task(sched._worker()),
                      asyncio.create_task(sched._keeper(), name="lease-keeper")]
    try:
        assert await wait_state(store, orphan.id, JobState.SUCCEEDED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order == ["orphan"]


async def test_a_graceful_stop_does_not_use_up_an_attempt(store: Store, tmp_path: Path) -> None:
    sched, _ = make(store, tmp_path, grace=0.1)
    await sched.start()
    job = await sched.submit(NewJob(pipeline="p", input={"sleep": 60}))
    await wait_state(store, job.id, JobState.RUNNING)
    await sched.stop()
    assert store.get_job(job.id).attempts == 0  # as after a crash (requeue_interrupted)


async def test_jobs_wait_while_the_results_disk_is_short_of_space(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A job started on a full results disk failed every attempt and was given up for
    good; now no job starts while ``paused`` gives a reason, and they run once it does
    not."""
    sched, handler = make(store, tmp_path)
    short: list[str] = ["12 MB free, under storage.min_free_mb (500 MB)"]
    sched.paused = lambda: short[0] if short else None
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"name": "waits"}))
        await asyncio.sleep(0.3)  # several turns of the workers' loop
        assert store.get_job(job.id).state is JobState.QUEUED and handler.order == []
        short.clear()
        sched.notify()
        assert await wait_state(store, job.id, JobState.SUCCEEDED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert store.get_job(job.id).attempts == 1


async def test_a_job_that_fills_a_disk_waits_for_space_instead_of_failing(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that filled while the job wrote its results (free space above the reserve
    when it started) used the job's retries up in 40 s and failed it for good; nothing
    ran it again once space was freed. It now waits for space, its attempts uncounted."""
    import dicom_node.scheduler as scheduler

    monkeypatch.setattr(scheduler, "DISK_FULL_RETRY_S", 0.1)
    sched, handler = make(store, tmp_path, max_attempts=1)
    await sched.start()
    try:
        job = await sched.submit(NewJob(pipeline="p", input={"name": "big",
                                                             "disk_full_runs": 3}))
        assert await wait_state(store, job.id, JobState.SUCCEEDED,
                                JobState.FAILED) is JobState.SUCCEEDED
    finally:
        await sched.stop()
    assert handler.order == ["big"] * 4 and store.get_job(job.id).attempts == 1
    waits = [e.message for e in store.events(job.id) if e.state is JobState.QUEUED][1:]
    assert len(waits) == 3 and all(
        (m or "").startswith("a disk is full (OSError: [Errno 28] No space left on device): "
                             "the job waits for space") for m in waits)


def test_a_failure_is_one_line_a_person_can_read() -> None:
    """A full disk while results were written put pydicom's whole traceback in the job's
    history, and a locked store the SQL statement with its parameters."""
    import errno
    import io
    import sqlite3

    import pydicom
    import sqlalchemy as sa
    from pydicom.data import get_testdata_file

    from dicom_node.scheduler import failure_message

    class FullDisk(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            if len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    with pytest.raises(OSError) as full:
        pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(FullDisk())
    assert "Traceback" in str(full.value)  # as pydicom raises it
    assert failure_message(full.value) == "OSError: [Errno 28] No space left on device"

    locked = sa.exc.OperationalError("UPDATE jobs SET state=?", ("exporting",),
                                     sqlite3.OperationalError("database is locked"))
    assert failure_message(locked) == "the job store failed: database is locked"
    assert failure_message(RuntimeError("transient")) == "RuntimeError: transient"
    assert failure_message(KeyError()) == "KeyError"


async def test_a_stop_waits_for_the_step_in_hand_before_the_store_closes(
        store: Store, tmp_path: Path) -> None:
    """After the grace period a job is queued again and its thread told to stop; the
    step in hand (an export waiting for a peer's answer) ended after the node had closed
    its store, and what it had to record was lost (the object was sent again)."""
    sched, _ = make(store, tmp_path, grace=0)
    marker = tmp_path / "marker.txt"
    await sched.start()
    job = await sched.submit(NewJob(pipeline="p", input={
        "sleep": 30, "linger_s": 0.5, "marker": str(marker)}))
    while not marker.exists():
        await asyncio.sleep(0.02)
    await sched.stop()
    assert "lingered" in marker.read_text()  # before stop() returned
    assert store.get_job(job.id).state is JobState.QUEUED
