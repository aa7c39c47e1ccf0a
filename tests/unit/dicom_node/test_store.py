"""Store round-trips on SQLite and PostgreSQL (a real server the tests start)."""

from __future__ import annotations

from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_node.errors import Conflict, NotFound
from dicom_node.store import (
    SCHEMA_VERSION,
    InstanceRecord,
    JobState,
    NewJob,
    Store,
    utcnow,
)


def rec(sop: str, study: str = "1.2.3", series: str = "1.2.3.4") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid=study, series_instance_uid=series,
                          path=Path(f"/x/{sop}.dcm"), size_bytes=10, source="dimse",
                          patient_id="P1", modality="CT", called_ae="DICOMNODE")


def test_schema_is_versioned_and_migration_is_idempotent(store: Store) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION
    assert store.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_info SET version = :v"), {"v": SCHEMA_VERSION + 1})
    with pytest.raises(Exception, match="newer than this program"):
        store.migrate()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_info SET version = :v"), {"v": SCHEMA_VERSION})


def test_instances_round_trip_and_duplicate_policy(store: Store) -> None:
    assert store.add_instance(rec("1.1")) is True
    assert store.add_instance(rec("1.2")) is True
    got = store.get_instance("1.1")
    assert got is not None and got.path == Path("/x/1.1.dcm") and got.modality == "CT"
    assert got.received_at.tzinfo is not None
    assert store.add_instance(rec("1.1"), overwrite=False) is False
    assert store.add_instance(rec("1.1"), overwrite=True) is False  # known, replaced
    assert [i.sop_instance_uid for i in store.instances_of("1.2.3")] == ["1.1", "1.2"]
    assert store.count_instances() == 2


def test_job_round_trip_with_utc_times(store: Store) -> None:
    job = store.create_job(NewJob(pipeline="p", priority=200, input={"instances": ["1", "2"]},
                                  study_instance_uid="1.2.3", transaction_id="t-1",
                                  owner="ris"))
    again = store.get_job(job.id)
    assert again == job
    assert again.state is JobState.QUEUED and again.input == {"instances": ["1", "2"]}
    assert again.created_at.tzinfo == UTC
    assert abs(again.created_at - utcnow()) < timedelta(minutes=1)
    assert store.find_job("t-1", owner="ris").id == job.id
    with pytest.raises(NotFound):
        store.find_job("t-1", owner="someone-else")
    with pytest.raises(Conflict, match="already used"):
        store.create_job(NewJob(pipeline="p", transaction_id="t-1", owner="ris"))
    # the same transactionID from another caller is fine
    store.create_job(NewJob(pipeline="p", transaction_id="t-1", owner="other"))


def test_claim_order_is_priority_then_age(store: Store) -> None:
    low = store.create_job(NewJob(pipeline="p", priority=10))
    normal1 = store.create_job(NewJob(pipeline="p"))
    urgent = store.create_job(NewJob(pipeline="p", priority=255))
    normal2 = store.create_job(NewJob(pipeline="p"))
    order = []
    while (job := store.claim_next("n", 30)) is not None:
        order.append(job.id)
        assert job.state is JobState.RUNNING and job.attempts == 1 and job.lease_token
    assert order == [urgent.id, normal1.id, normal2.id, low.id]


def test_transitions_are_recorded_and_guarded_by_the_lease(store: Store) -> None:
    store.create_job(NewJob(pipeline="p"))
    job = store.claim_next("n", 30)
    assert job is not None
    assert not store.transition(job.id, JobState.SUCCEEDED, token="not-the-token")
    assert store.transition(job.id, JobState.EXPORTING, token=job.lease_token)
    assert store.transition(job.id, JobState.SUCCEEDED, token=job.lease_token, message="done")
    done = store.get_job(job.id)
    assert done.state is JobState.SUCCEEDED and done.finished_at is not None
    assert [e.state for e in store.events(job.id)] == [
        JobState.QUEUED, JobState.RUNNING, JobState.EXPORTING, JobState.SUCCEEDED]


def test_requeue_interrupted_and_expired_leases(store: Store) -> None:
    a = store.create_job(NewJob(pipeline="p"))
    b = store.create_job(NewJob(pipeline="p"))
    store.claim_next("me", 600)
    store.claim_next("other", -1)  # already expired: its owner is gone
    ids = set(store.requeue_interrupted("me"))
    assert ids == {a.id, b.id}
    for j in (a, b):
        again = store.get_job(j.id)
        assert again.state is JobState.QUEUED and again.attempts == 0


def test_cancel_and_retry(store: Store) -> None:
    q = store.create_job(NewJob(pipeline="p"))
    assert store.request_cancel(q.id).state is JobState.CANCELLED
    with pytest.raises(Conflict):
        store.request_cancel(q.id)
    assert store.retry(q.id).state is JobState.QUEUED
    running = store.claim_next("n", 30)
    assert running is not None
    assert store.request_cancel(running.id).cancel_requested
    assert store.renew_leases("n", 30) == [(running.id, True)]
    with pytest.raises(Conflict, match="only failed or cancelled"):
        store.retry(running.id)


def test_delayed_jobs_wait_for_not_before(store: Store) -> None:
    store.create_job(NewJob(pipeline="p"))
    job = store.claim_next("n", 30)
    assert job is not None
    later = utcnow() + timedelta(seconds=60)
    store.transition(job.id, JobState.QUEUED, token=job.lease_token, message="x",
                     not_before=later)
    assert store.claim_next("n", 30) is None
    due = store.next_due()
    assert due is not None and abs(due - later) < timedelta(seconds=1)


def test_artifacts_and_exports(store: Store) -> None:
    job = store.create_job(NewJob(pipeline="p"))
    store.add_artifact(job.id, "sr", Path("/r/sr.dcm"), "application/dicom", "1.2.9")
    store.record_export(job.id, "pacs", "failed", 3, 0, "association rejected")
    assert store.artifacts_of(job.id)[0].sop_instance_uid == "1.2.9"
    assert store.exports_of(job.id)[0].message == "association rejected"
    counts = store.count_jobs()
    assert counts[JobState.QUEUED] == 1


def test_sqlite_uses_wal(sqlite_store: Store) -> None:
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="cannot open the store"):
        Store("postgresql://nobody@127.0.0.1:1/none").open()


def test_watch_inputs_record_once_and_track_jobs(store: Store) -> None:
    store.add_instance(rec("1.2.3.4.1"))
    store.add_instance(rec("1.2.3.4.2"))
    store.add_watch_inputs("inbox", [("a" * 64, "1.2.3.4.1"), ("b" * 64, "1.2.3.4.2"),
                                     ("c" * 64, None)])
    store.add_watch_inputs("inbox", [("a" * 64, "1.2.3.4.1")])  # seen again: left as is
    assert store.watch_input_known("inbox", "a" * 64)
    assert not store.watch_input_known("other", "a" * 64)  # per drop folder
    pending = store.pending_watch_instances("inbox")
    assert [r.sop_instance_uid for r in pending] == ["1.2.3.4.1", "1.2.3.4.2"]
    store.mark_watch_inputs("inbox", ["1.2.3.4.1"])
    assert [r.sop_instance_uid for r in store.pending_watch_instances("inbox")] == ["1.2.3.4.2"]
    assert store.count_watch_inputs("inbox") == {"queued": 1, "stored": 2}
