"""Store round-trips on SQLite and PostgreSQL (a real server the tests start)."""

from __future__ import annotations

import contextlib
import dataclasses
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from dicom_node.errors import Conflict, NotFound
from dicom_node.store import (
    CANCEL_PENDING,
    SCHEMA_VERSION,
    InstanceRecord,
    JobState,
    NewJob,
    Store,
    utcnow,
)
from pipeline.types import Artifact


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


def test_a_deferred_attempt_does_not_count_and_waits(store: Store) -> None:
    """A job queued again by a deferral (its study still arriving) keeps its attempts,
    says why, and is not claimed before its time; the study's last arrival is known."""
    from datetime import timedelta

    from dicom_node.store import InstanceRecord, utcnow

    assert store.study_last_received("1.2.3") is None
    before = utcnow()
    store.record_instance(InstanceRecord(
        sop_instance_uid="1.2.3.1", sop_class_uid="1.2", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.9", path=Path("/x/1"), size_bytes=1, source="dimse"))
    last = store.study_last_received("1.2.3")
    assert last is not None and last >= before - timedelta(seconds=1) and last.tzinfo
    store.create_job(NewJob(pipeline="p"))
    job = store.claim_next("n", 30)
    assert job is not None and job.attempts == 1
    assert store.transition(job.id, JobState.QUEUED, token=job.lease_token,
                            message="study 1.2.3 is still arriving",
                            not_before=utcnow() + timedelta(hours=1), uncount_attempt=True)
    waiting = store.get_job(job.id)
    assert waiting.attempts == 0 and waiting.error == "study 1.2.3 is still arriving"
    assert store.claim_next("n", 30) is None  # not before its time


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


def test_requeue_interrupted_takes_back_an_older_versions_bare_node_name_leases(
        store: Store) -> None:
    """Versions before ``<node_name>#<id>`` leased as the bare node name: after a kill -9
    and an upgrade, those jobs are the node's own and are queued at once, not after
    their lease; a namesake's (another id) and another node's stay theirs."""
    old = store.create_job(NewJob(pipeline="p"))
    namesake = store.create_job(NewJob(pipeline="p"))
    other = store.create_job(NewJob(pipeline="p"))
    store.claim_next("node-a", 600)  # as an older version of node-a wrote it
    store.claim_next("node-a#elsewhere", 600)
    store.claim_next("node-b", 600)
    assert store.requeue_interrupted("node-a#mine") == [old.id]
    assert store.get_job(old.id).state is JobState.QUEUED
    assert store.get_job(namesake.id).state is not JobState.QUEUED
    assert store.get_job(other.id).state is not JobState.QUEUED


def test_cancel_and_retry(store: Store) -> None:
    q = store.create_job(NewJob(pipeline="p"))
    assert store.request_cancel(q.id).state is JobState.CANCELLED
    with pytest.raises(Conflict):
        store.request_cancel(q.id)
    assert store.retry(q.id).state is JobState.QUEUED
    running = store.claim_next("n", 30)
    assert running is not None
    assert store.request_cancel(running.id).cancel_requested
    assert store.request_cancel(running.id).cancel_requested  # asked twice: said once
    # the history shows the pending cancel at once, not only when the worker stops
    assert [e.message for e in store.events(running.id)].count(CANCEL_PENDING) == 1
    assert store.renew_leases("n", 30) == [(running.id, True)]
    with pytest.raises(Conflict, match="only failed or cancelled"):
        store.retry(running.id)


def test_match_job_by_id_transaction_or_unique_prefix(store: Store) -> None:
    made = [store.create_job(NewJob(pipeline="p")) for _ in range(17)]
    tx = store.create_job(NewJob(pipeline="p", transaction_id="RIS-42", owner="ris"))
    first = made[0]
    assert store.match_job(first.id).id == first.id
    assert store.match_job("RIS-42").id == tx.id
    assert store.match_job(first.id[:12]).id == first.id
    assert store.match_job(first.id[:12].upper()).id == first.id
    # 17 ids over 16 hex digits: some first character starts two of them
    starts = [j.id[0] for j in made]
    shared = next(c for c in starts if starts.count(c) > 1)
    with pytest.raises(Conflict, match="more than one job"):
        store.match_job(shared, min_prefix=1)
    with pytest.raises(NotFound, match="at least 4 characters"):
        store.match_job(first.id[:3])
    with pytest.raises(NotFound, match="no job"):
        store.match_job("%_%_")  # LIKE wildcards are matched literally


def test_a_succeeded_job_keeps_no_credentials(store: Store) -> None:
    web = {"interface": "DICOMweb", "uri": "https://pacs/dicom-web", "authType": "Basic",
           "authId": "cmlzOnNlY3JldA=="}
    request = {"retrieve": {"sources": [web]}, "destinations": [dict(web), "pacs"]}
    ok = store.create_job(NewJob(pipeline="p", input=request))
    bad = store.create_job(NewJob(pipeline="p", input=request, priority=1))
    for job, to in ((ok, JobState.SUCCEEDED), (bad, JobState.FAILED)):
        claimed = store.claim_next("n", 30)
        assert claimed is not None and claimed.id == job.id
        assert store.transition(job.id, to, token=claimed.lease_token, message="x")
    kept = store.get_job(ok.id).input
    assert "cmlzOnNlY3JldA==" not in repr(kept)
    assert kept["retrieve"]["sources"][0]["uri"] == "https://pacs/dicom-web"
    assert kept["destinations"][1] == "pacs"
    # a failed job may be retried, so it keeps what it needs to run again
    assert store.get_job(bad.id).input == request


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


def test_a_job_that_ends_leaves_no_destination_saying_it_will_be_sent_to(
        store: Store) -> None:
    """A cancel cut the pass short: the destination being sent to and the one not yet
    tried said ``retrying`` and ``pending`` for good. They now say the job ended, and
    a retry sends only what was not acknowledged."""
    job = store.create_job(NewJob(pipeline="p"))
    claimed = store.claim_next("n", 30)
    assert claimed is not None
    store.record_export(job.id, "share", "succeeded", 1, 2)
    store.record_export(job.id, "pacs", "retrying", 0, 1, "stopped before it was done: 1 sent now",
                        acknowledged=["1.2.1"])
    store.record_export(job.id, "archive", "pending", 0, 0)
    assert store.transition(job.id, JobState.CANCELLED, token=claimed.lease_token)
    got = {x.destination: x for x in store.exports_of(job.id)}
    assert {d: x.state for d, x in got.items()} == {
        "share": "succeeded", "pacs": "failed", "archive": "failed"}
    assert got["archive"].message == "not sent: the job was cancelled before it was tried"
    assert got["pacs"].message == ("stopped before it was done: 1 sent now; "
                                   "not tried again: the job was cancelled")
    assert got["pacs"].acknowledged == {"1.2.1"} and got["share"].message is None
    store.retry(job.id)
    assert {x.destination: x.state for x in store.exports_of(job.id)} == {
        "share": "succeeded", "pacs": "retrying", "archive": "retrying"}
    assert {x.destination: x.acknowledged for x in store.exports_of(job.id)}["pacs"] == {
        "1.2.1"}


def test_a_job_cancelled_while_queued_for_its_next_export_pass_closes_its_exports(
        store: Store) -> None:
    job = store.create_job(NewJob(pipeline="p"))
    store.record_export(job.id, "pacs", "retrying", 1, 0, "refused (attempt 1 of 3)")
    store.request_cancel(job.id)
    (x,) = store.exports_of(job.id)
    assert (x.state, x.message) == (
        "failed", "refused (attempt 1 of 3); not tried again: the job was cancelled")


def test_a_new_run_replaces_the_artifacts_and_each_destination_keeps_its_latest(
        store: Store) -> None:
    """`jobs show` lists each artifact once and each destination's latest outcome, however
    often the job ran or was sent; a retry gives the unsent destinations their attempts
    afresh and leaves the one that got the results alone."""
    job = store.create_job(NewJob(pipeline="p"))
    first = [Artifact("sr", Path("/r/sr.dcm"), "application/dicom", "1.2.1"),
             Artifact("json", Path("/r/p.json"), "application/json")]
    for run, made in enumerate((first, [dataclasses.replace(first[0], sop_instance_uid="1.2.2")])):
        claimed = store.claim_next("n", 30)
        assert claimed is not None
        assert store.start_export(job.id, made, token=claimed.lease_token, message="made")
        assert store.get_job(job.id).state is JobState.EXPORTING
        store.record_export(job.id, "pacs", "retrying", 1, 0, "refused (attempt 1 of 2)")
        store.record_export(job.id, "share", "succeeded", 1, 2)
        store.record_export(job.id, "pacs", "failed", 2, 0, "refused (after 2 attempts)")
        store.transition(job.id, JobState.FAILED, token=claimed.lease_token, message="x")
        if run == 0:
            store.retry(job.id)
    assert [(a.kind, a.sop_instance_uid) for a in store.artifacts_of(job.id)] == [
        ("sr", "1.2.2")]
    assert [(x.destination, x.state, x.attempts) for x in store.exports_of(job.id)] == [
        ("pacs", "failed", 2), ("share", "succeeded", 1)]
    store.retry(job.id)
    assert [(x.destination, x.state, x.attempts) for x in store.exports_of(job.id)] == [
        ("pacs", "retrying", 0), ("share", "succeeded", 1)]
    # without the lease, nothing is recorded
    assert not store.start_export(job.id, first, token="not-the-lease")
    assert len(store.artifacts_of(job.id)) == 1


def test_sqlite_uses_wal_and_commits_to_disk(sqlite_store: Store) -> None:
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        # 2 = FULL: a recorded instance survives a power cut, as its fsynced file does
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2


def test_a_retrieved_instance_is_recorded_without_waiting_for_the_disk(store: Store) -> None:
    fetched = dataclasses.replace(rec("7.1"), source="retrieve")
    assert store.record_instance(fetched, durable=False) is True
    assert store.record_instance(fetched, overwrite=False, durable=False) is False
    got = store.get_instance("7.1")
    assert got is not None and got.source == "retrieve"
    assert [i.sop_instance_uid for i in store.instances_of("1.2.3")] == ["7.1"]
    # the relaxed setting was for that commit only: pooled connections commit to disk
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        else:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    assert store.record_instance(rec("7.2")) is True  # and durable ones still work
    # known and kept as it was: False on both backends (PostgreSQL said True, rowcount -1)
    assert store.record_instance(rec("7.2"), overwrite=False) is False
    assert store.record_instance(rec("7.2"), overwrite=True) is True


def test_instances_recorded_together(store: Store) -> None:
    batch = [dataclasses.replace(rec(f"8.{i}"), source="retrieve") for i in range(5)]
    assert store.record_instances([]) == []
    assert store.record_instance(batch[0]) is True
    # one known, kept as it was; the others new
    assert store.record_instances(batch, overwrite=False, durable=False) == [
        False, True, True, True, True]
    assert sorted(i.sop_instance_uid for i in store.instances_of("1.2.3")) == [
        f"8.{i}" for i in range(5)]
    assert store.record_instances(batch) == [True] * 5  # overwrite, durable


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


def test_a_groups_jobs_and_its_queued_marks_are_one_transaction(store: Store) -> None:
    """A complete group's jobs, its instances' queued mark and its drop-folder inputs'
    state commit together. A failure anywhere in between (here the last job's insert,
    after the marks and the first job were written) leaves none of it: the instances
    stay pending, so the next start queues the group once, not a second time."""
    for sop in ("7.1", "7.2"):  # a DICOM group
        store.record_instance(rec(sop, study="7"))
    watched = [dataclasses.replace(rec(sop, study="8"), source="watch") for sop in ("8.1", "8.2")]
    store.add_watch_inputs("inbox", [("7" * 64, "8.1"), ("8" * 64, "8.2")], instances=watched)
    store.create_job(NewJob(pipeline="p", transaction_id="taken", owner="ris"))

    def group(study: str, *, clash: bool) -> list[NewJob]:
        last = {"transaction_id": "taken", "owner": "ris"} if clash else {}
        return [NewJob(pipeline="p1", study_instance_uid=study),
                NewJob(pipeline="p2", study_instance_uid=study, **last)]  # type: ignore[arg-type]

    with pytest.raises(sa.exc.IntegrityError):
        store.create_group_jobs(group("7", clash=True), ["7.1", "7.2"])
    with pytest.raises(sa.exc.IntegrityError):
        store.create_group_jobs(group("8", clash=True), ["8.1", "8.2"], watch="inbox")
    assert len(store.list_jobs()) == 1  # the one made before
    assert [r.sop_instance_uid for r in store.pending_instances()] == ["7.1", "7.2"]
    assert [r.sop_instance_uid for r in store.pending_watch_instances("inbox")] == ["8.1", "8.2"]
    assert store.count_watch_inputs("inbox") == {"stored": 2}

    made = store.create_group_jobs(group("7", clash=False), ["7.1", "7.2"])
    assert [(j.pipeline, j.state) for j in made] == [("p1", JobState.QUEUED),
                                                     ("p2", JobState.QUEUED)]
    made = store.create_group_jobs(group("8", clash=False), ["8.1", "8.2"], watch="inbox")
    assert {j.study_instance_uid for j in made} == {"8"}
    assert store.pending_instances() == [] and store.pending_watch_instances("inbox") == []
    assert store.count_watch_inputs("inbox") == {"queued": 2}
    assert len(store.list_jobs()) == 5
    # an intake without pipelines: no job, the instances are no longer pending
    store.record_instance(rec("9.1", study="9"))
    assert store.create_group_jobs([], ["9.1"]) == []
    assert store.pending_instances() == []


def test_a_group_tried_again_is_not_queued_twice(store: Store) -> None:
    """A try after a failure (``only_pending``) queues nothing when the failed try had
    committed after all (every instance already queued), and queues as usual when it
    had not."""
    for sop in ("5.1", "5.2", "6.1"):
        store.record_instance(rec(sop, study=sop[0]))
    first = store.create_group_jobs([NewJob(pipeline="p", study_instance_uid="5")],
                                    ["5.1", "5.2"])
    assert store.create_group_jobs([NewJob(pipeline="p", study_instance_uid="5")],
                                   ["5.1", "5.2"], only_pending=True) == []
    assert [j.id for j in store.list_jobs()] == [first[0].id]
    again = store.create_group_jobs([NewJob(pipeline="p", study_instance_uid="6")],
                                    ["6.1"], only_pending=True)
    assert [j.study_instance_uid for j in again] == ["6"]
    assert store.pending_instances() == []


def test_a_dropped_file_and_its_instances_are_recorded_together(store: Store) -> None:
    """One transaction: an input is never known without its instances, nor the reverse."""
    store.add_watch_inputs("inbox", [("d" * 64, "5.1"), ("e" * 64, "5.2")],
                           instances=[rec("5.1", study="5"), rec("5.2", study="5")])
    assert store.watch_input_known("inbox", "d" * 64)
    assert [r.sop_instance_uid for r in store.pending_watch_instances("inbox")] == ["5.1", "5.2"]
    bad: list[tuple[str, str | None]] = [("f" * 64, "6.1"), (None, "6.2")]  # type: ignore[list-item]
    with pytest.raises(sa.exc.IntegrityError):  # sha256 is NOT NULL: the second row fails
        store.add_watch_inputs("inbox", bad, instances=[rec("6.1", study="6")])
    assert store.get_instance("6.1") is None
    assert not store.watch_input_known("inbox", "f" * 64)


# -- seed 002: integer ids, projects and batches ------------------------------------------


def test_integer_ids_are_stable_per_kind(store: Store) -> None:
    first = store.integer_ids("project:ae", ["AI_CXR", "DICOMNODE"])
    assert first["AI_CXR"] != first["DICOMNODE"]
    again = store.integer_ids("project:ae", ["DICOMNODE", "NEW", "AI_CXR"])
    assert {k: again[k] for k in first} == first and again["NEW"] not in first.values()
    layer = store.integer_ids("destination", ["AI_CXR"])["AI_CXR"]
    assert layer not in again.values()  # one sequence: an id names one thing
    assert store.name_of_id(["project:ae", "project:watch"], first["AI_CXR"]) == (
        "project:ae", "AI_CXR")
    assert store.name_of_id(["project:ae"], layer) is None
    assert store.integer_ids("destination", []) == {}


def test_project_studies_by_called_ae_and_drop_folder(store: Store) -> None:
    def with_ae(sop: str, study: str, ae: str, modality: str = "CR") -> InstanceRecord:
        r = rec(sop, study)
        return InstanceRecord(**{**r.__dict__, "called_ae": ae, "modality": modality})

    store.add_instance(with_ae("1.1", "9.1", "AI_CXR"))
    store.add_instance(with_ae("1.2", "9.1", "AI_CXR", "SR"))
    store.add_instance(with_ae("2.1", "9.2", "OTHER"))
    store.record_instance(with_ae("3.1", "9.3", ""))
    store.add_watch_inputs("inbox", [("ab" * 32, "3.1")])
    assert store.called_ae_titles() == ["AI_CXR", "OTHER"]
    assert store.watch_names() == ["inbox"]
    cxr = store.project_studies(called_ae="AI_CXR")
    assert [s.study_instance_uid for s in cxr] == ["9.1"]
    assert (cxr[0].modalities, cxr[0].instances, cxr[0].patient_id) == (["CR", "SR"], 2, "P1")
    inbox = store.project_studies(watch="inbox")
    assert [s.study_instance_uid for s in inbox] == ["9.3"]
    ids = [s.id for s in store.project_studies(called_ae="OTHER")]
    assert store.project_studies(called_ae="AI_CXR", ids=ids) == []
    assert store.project_studies(called_ae="OTHER", ids=ids)[0].id == ids[0]
    with pytest.raises(ValueError):
        store.project_studies()


def test_batches_queue_one_job_per_source(store: Store) -> None:
    batch = store.create_batch(
        group_name="radiology", owner="api_key:lab", project_id=3, pipeline="cxr",
        output_layer_id=5,
        sources=[(12, NewJob(pipeline="cxr", kind="batch", input={"instances": ["1"]})),
                 (7, NewJob(pipeline="cxr", kind="batch", input={"instances": ["2"]}))])
    assert isinstance(batch.id, int)
    assert [s for s, _ in batch.sources] == [12, 7]  # the order asked
    assert all(j.state is JobState.QUEUED and j.kind == "batch" for _, j in batch.sources)
    assert batch.created_at.tzinfo is not None
    claimed = store.claim_next("w", 30)
    assert claimed is not None and claimed.id == batch.sources[0][1].id
    again = store.get_batch(batch.id)
    assert again.sources[0][1].state is JobState.RUNNING
    assert (again.group_name, again.project_id, again.output_layer_id) == ("radiology", 3, 5)
    second = store.create_batch(group_name="g", owner=None, project_id=1, pipeline="p",
                                output_layer_id=1, sources=[(1, NewJob(pipeline="p"))])
    assert second.id > batch.id
    with pytest.raises(NotFound):
        store.get_batch(10_000)
    with pytest.raises(ValueError):
        store.create_batch(group_name="g", owner=None, project_id=1, pipeline="p",
                           output_layer_id=1, sources=[])


def test_a_version_3_store_is_migrated(tmp_path: Path) -> None:
    from dicom_node.store import MIGRATIONS, schema_info

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema_info.create(conn)
        conn.execute(schema_info.insert().values(version=3))
        for migration in MIGRATIONS[:3]:
            migration(conn)
    engine.dispose()
    s = Store(url).open()
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.integer_ids("destination", ["pacs"])["pacs"] == 1
        index_names = {i["name"] for i in sa.inspect(s.engine).get_indexes("instances")}
        assert "ix_instances_called_ae" in index_names
    finally:
        s.close()


def test_instances_wait_for_their_group_to_become_jobs(store: Store) -> None:
    store.record_instance(rec("1.1"))
    store.add_instance(rec("1.2"))
    store.record_instance(dataclasses.replace(rec("1.3"), source="retrieve"))
    store.record_instance(dataclasses.replace(rec("1.4"), source="stow"))
    assert [r.sop_instance_uid for r in store.pending_instances()] == ["1.1", "1.2", "1.4"]
    store.mark_queued(["1.1", "1.2"])
    assert [r.sop_instance_uid for r in store.pending_instances()] == ["1.4"]
    store.record_instance(rec("1.1"))  # sent again (overwrite): waits for its new group
    assert [r.sop_instance_uid for r in store.pending_instances()] == ["1.1", "1.4"]
    store.record_instance(rec("1.2"), overwrite=False)  # kept first: stays queued
    assert [r.sop_instance_uid for r in store.pending_instances(["stow"])] == ["1.4"]
    store.mark_queued([f"9.{i}" for i in range(1200)] + ["1.1", "1.4"])  # several IN lists
    assert store.pending_instances() == []


def test_a_version_4_store_gets_queued_at_with_old_instances_counted_queued(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    s = Store(url).open()
    s.record_instance(rec("1.1"))
    with s.engine.begin() as conn:  # back to what version 4 made
        conn.exec_driver_sql("DROP INDEX ix_instances_queued_at")
        conn.exec_driver_sql("ALTER TABLE instances DROP COLUMN queued_at")
        conn.exec_driver_sql("UPDATE schema_info SET version = 4")
    s.close()
    s = Store(url).open()
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.pending_instances() == []  # received before the upgrade: not re-run
        s.record_instance(rec("1.2"))
        assert [r.sop_instance_uid for r in s.pending_instances()] == ["1.2"]
        index_names = {i["name"] for i in sa.inspect(s.engine).get_indexes("instances")}
        assert "ix_instances_queued_at" in index_names
    finally:
        s.close()


def test_received_studies_newest_first_with_their_series(store: Store) -> None:
    """Each study with its series summed: counts, sizes, first and last arrival, who sent
    them and in which transfer syntax; the most recently received study first."""
    t0 = utcnow() - timedelta(hours=1)

    def put(sop: str, study: str, series: str, minutes: int, **kw: object) -> None:
        r = dataclasses.replace(rec(sop, study, series),
                                received_at=t0 + timedelta(minutes=minutes), **kw)
        store.record_instance(r)

    put("1", "1.2.3", "1.2.3.1", 0, calling_ae="CT01", transfer_syntax_uid="1.2.840.10008.1.2.1")
    put("2", "1.2.3", "1.2.3.1", 1, calling_ae="CT01", transfer_syntax_uid="1.2.840.10008.1.2")
    put("3", "1.2.3", "1.2.3.2", 2, calling_ae="", source="watch", modality="SR",
        size_bytes=5)
    put("4", "1.2.9", "1.2.9.1", 3, calling_ae="CR02", patient_id="P2", modality="CR")
    rows = store.received_studies()
    assert [s.study_instance_uid for s, _ in rows] == ["1.2.9", "1.2.3"]
    study, series = rows[1]
    assert (study.instances, study.modalities, study.patient_id) == (3, ["CT", "SR"], "P1")
    ct, sr = series  # in order of arrival
    assert (ct.series_instance_uid, ct.modality, ct.instances, ct.size_bytes) == (
        "1.2.3.1", "CT", 2, 20)
    assert ct.senders == ["CT01 -> DICOMNODE"]
    assert ct.transfer_syntaxes == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    assert ct.first_received < ct.last_received
    assert (sr.senders, sr.size_bytes) == (["watch"], 5)
    assert [s.study_instance_uid for s, _ in store.received_studies(patient_id="P2")] == ["1.2.9"]
    assert [s.study_instance_uid for s, _ in store.received_studies(uid_prefix="1.2.3")] == [
        "1.2.3"]
    assert [s.study_instance_uid for s, _ in store.received_studies(limit=1)] == ["1.2.9"]
    assert store.received_studies(uid_prefix="1.2.%") == []  # a prefix, not a pattern
    assert [s.study_instance_uid for s, _ in store.received_studies(uid="1.2.3")] == ["1.2.3"]
    assert store.received_studies(uid="1.2") == []


def test_jobs_of_one_study(store: Store) -> None:
    a = store.create_job(NewJob(pipeline="p", study_instance_uid="1.2.3"))
    store.create_job(NewJob(pipeline="p", study_instance_uid="1.2.4"))
    assert [j.id for j in store.list_jobs(study_instance_uid="1.2.3")] == [a.id]


def test_study_activity_names_unfinished_jobs_and_waiting_instances(store: Store) -> None:
    """What refuses `dicom-node studies delete`: a job of the study not yet final, and
    instances a sender was told were stored that are not yet part of a job."""
    store.record_instance(rec("a", "1.2.8"))
    store.record_instance(dataclasses.replace(rec("b", "1.2.8"), source="retrieve"))
    assert store.study_activity("1.2.8") == ([], 1)  # retrieved ones are the job's own
    store.mark_queued(["a"])
    job = store.create_job(NewJob(pipeline="p", study_instance_uid="1.2.8"))
    assert store.study_activity("1.2.8") == ([job.id], 0)
    claimed = store.claim_next("t", 30)
    assert claimed is not None
    store.transition(job.id, JobState.FAILED, token=claimed.lease_token, message="x")
    assert store.study_activity("1.2.8") == ([], 0)
    assert store.study_activity("9.9") == ([], 0)


def test_forgetting_a_study_forgets_its_drop_folder_inputs_only_where_asked(
        store: Store) -> None:
    store.record_instance(rec("a", "1.2.8"))
    store.record_instance(rec("b", "1.2.9"))
    for watch in ("moves", "keeps"):
        store.add_watch_inputs(watch, [("sha-a", "a"), ("sha-b", "b"), ("sha-zip", None)])
    assert store.forget_study("1.2.8", forget_inputs_of=["moves"]) == 1
    assert not store.watch_input_known("moves", "sha-a")
    assert not store.watch_input_known("moves", "sha-zip")  # archives: looked at again
    assert store.watch_input_known("moves", "sha-b")  # another study's
    assert all(store.watch_input_known("keeps", s) for s in ("sha-a", "sha-b", "sha-zip"))
    assert store.get_instance("a") is None and store.get_instance("b") is not None


def test_removed_credentials_leave_the_database_files(sqlite_store: Store,
                                                      tmp_path: Path) -> None:
    """Not only the row: SQLite's free pages and write-ahead log lose them too."""
    secret = "c2VjcmV0LXRva2VuLTEyMzQ1Njc4OQ=="
    web = {"interface": "DICOMweb", "uri": "https://pacs/dicom-web", "authId": secret}
    job = sqlite_store.create_job(NewJob(pipeline="p", input={"retrieve": {"sources": [web]}}))
    claimed = sqlite_store.claim_next("n", 30)
    assert claimed is not None
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("node.db*"))
    assert secret.encode() in raw  # kept while the job may still need it
    assert sqlite_store.transition(job.id, JobState.SUCCEEDED, token=claimed.lease_token)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("node.db*"))
    assert secret.encode() not in raw


def test_a_retrieval_of_a_held_instance_keeps_the_ae_title_it_came_in_on(store: Store) -> None:
    """A study sent to CT_AI, fetched again by a C-MOVE to the node's own AE title: it
    stays in CT_AI's project only. A new push to another AE title puts that title on the
    instance's record, and the study in that project too."""
    store.record_instance(dataclasses.replace(rec("8.1"), called_ae="CT_AI"))
    fetched = dataclasses.replace(rec("8.1"), source="retrieve", called_ae="DICOMNODE")
    assert store.record_instance(fetched, durable=False) is True
    got = store.get_instance("8.1")
    assert got is not None and got.called_ae == "CT_AI" and got.source == "retrieve"
    assert [s.study_instance_uid for s in store.project_studies(called_ae="CT_AI")] == ["1.2.3"]
    assert store.project_studies(called_ae="DICOMNODE") == []
    store.record_instance(dataclasses.replace(rec("8.1"), called_ae="MR_AI"))
    got = store.get_instance("8.1")
    assert got is not None and got.called_ae == "MR_AI"
    assert store.called_ae_titles() == ["CT_AI", "MR_AI"]


def test_a_study_stays_in_every_project_it_was_received_under(store: Store) -> None:
    """Sent to ARCHIVE, then the same instance dropped into a folder, then sent to
    CT_AI: each arrival overwrites the instance's record, and the study is in all
    three projects."""
    store.record_instance(dataclasses.replace(rec("8.1"), called_ae="ARCHIVE"))
    dropped = dataclasses.replace(rec("8.1"), source="watch", called_ae="")
    store.add_watch_inputs("inbox", [("ab" * 32, "8.1")], instances=[dropped])
    got = store.get_instance("8.1")
    assert got is not None and got.source == "watch" and got.called_ae == ""
    assert [s.study_instance_uid for s in store.project_studies(called_ae="ARCHIVE")] == [
        "1.2.3"]
    assert [s.study_instance_uid for s in store.project_studies(watch="inbox")] == ["1.2.3"]
    assert store.called_ae_titles() == ["ARCHIVE"]
    store.add_instance(dataclasses.replace(rec("8.1"), called_ae="CT_AI"))  # another way in
    for ae in ("ARCHIVE", "CT_AI"):
        (study,) = store.project_studies(called_ae=ae)
        assert (study.study_instance_uid, study.instances) == ("1.2.3", 1)
    assert store.called_ae_titles() == ["ARCHIVE", "CT_AI"]
    # kept first (not written): not received under that AE title
    assert store.record_instance(dataclasses.replace(rec("8.1"), called_ae="MR_AI"),
                                 overwrite=False) is False
    assert store.project_studies(called_ae="MR_AI") == []


def test_a_study_leaves_its_projects_with_its_last_instance(store: Store) -> None:
    """Forgotten, or emptied by an overwrite into another study: the study UID sent again
    later under another AE title is not in the old projects."""
    store.record_instance(dataclasses.replace(rec("8.1", "5.1"), called_ae="ARCHIVE"))
    store.record_instance(dataclasses.replace(rec("8.2", "5.2"), called_ae="ARCHIVE"))
    store.forget_study("5.1")
    store.record_instance(dataclasses.replace(rec("8.2", "5.3"), called_ae="CT_AI"))  # moved
    assert store.project_studies(called_ae="ARCHIVE") == []
    store.record_instance(dataclasses.replace(rec("8.3", "5.1"), called_ae="CT_AI"))
    store.record_instance(dataclasses.replace(rec("8.4", "5.2"), called_ae="CT_AI"))
    assert store.project_studies(called_ae="ARCHIVE") == []
    assert [s.study_instance_uid for s in store.project_studies(called_ae="CT_AI")] == [
        "5.3", "5.1", "5.2"]


def test_a_version_5_store_gets_each_studys_called_ae_titles(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    s = Store(url).open()
    s.record_instance(dataclasses.replace(rec("8.1", "5.1"), called_ae="ARCHIVE"))
    s.record_instance(dataclasses.replace(rec("8.2", "5.1"), called_ae="CT_AI"))
    s.record_instance(dataclasses.replace(rec("8.3", "5.2"), called_ae=""))
    with s.engine.begin() as conn:  # back to what version 5 made
        conn.exec_driver_sql("DROP TABLE study_called_aes")
        conn.exec_driver_sql("UPDATE schema_info SET version = 5")
    s.close()
    s = Store(url).open()
    try:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.called_ae_titles() == ["ARCHIVE", "CT_AI"]
        for ae in ("ARCHIVE", "CT_AI"):
            assert [x.study_instance_uid for x in s.project_studies(called_ae=ae)] == ["5.1"]
        s.add_watch_inputs("inbox", [("ab" * 32, "8.1")], instances=[
            dataclasses.replace(rec("8.1", "5.1"), source="watch", called_ae="")])
        assert [x.study_instance_uid for x in s.project_studies(called_ae="ARCHIVE")] == [
            "5.1"]
    finally:
        s.close()




def _failed(store: Store, new: NewJob) -> str:
    """A job that ran and failed (more urgent than those retried before it: it is the
    one claimed)."""
    job = store.create_job(dataclasses.replace(new, priority=200 + len(store.list_jobs())))
    claimed = store.claim_next("me", 30)
    assert claimed is not None and claimed.id == job.id
    store.transition(job.id, JobState.FAILED, token=claimed.lease_token, message="gap")
    return job.id


def test_retry_of_a_groups_job_takes_the_rest_of_its_study_that_came_the_same_way(
        store: Store) -> None:
    """A job made from a group runs again on every instance of its study (or series)
    now held that came the same way: a series split by a full disk runs whole."""
    def held(sop: str, series: str = "5.1", **how: str) -> InstanceRecord:
        return dataclasses.replace(rec(sop, study="5", series=series), **how)

    watched = [held(f"5.1.{i}", source="watch", called_ae="") for i in range(5)]
    store.add_watch_inputs("inbox", [(f"{i}" * 64, r.sop_instance_uid)
                                     for i, r in enumerate(watched)], instances=watched)
    other = held("5.1.9", source="watch", called_ae="")  # the same study, another folder
    store.add_watch_inputs("cd", [("f" * 64, "5.1.9")], instances=[other])
    store.record_instance(held("5.1.8"))  # the same study over DICOM
    store.record_instance(held("5.2.1", series="5.2"))  # another series, over DICOM
    watch_job = _failed(store, NewJob(pipeline="ct", kind="watch", study_instance_uid="5",
                                      input={"instances": ["5.1.0", "5.1.1", "5.1.2"],
                                             "study_instance_uid": "5", "watch": "inbox"}))
    store.add_artifact(watch_job, "json", Path("/r/P1_volumes.json"), "application/json")
    job = store.retry(watch_job)
    assert job.input["instances"] == ["5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.4"]
    assert job.input["watch"] == "inbox" and job.state is JobState.QUEUED
    assert store.events(watch_job)[-1].message == (
        "retry requested with 5 instances, 2 more than the failed run")
    assert store.artifacts_of(watch_job) == []  # made from three: the job runs again

    series_job = _failed(store, NewJob(
        pipeline="ct", kind="dimse", study_instance_uid="5", called_ae="DICOMNODE",
        input={"instances": ["5.2.1"], "study_instance_uid": "5",
               "series_instance_uid": "5.2"}))
    assert store.retry(series_job).input["instances"] == ["5.2.1"]  # nothing more came
    assert store.events(series_job)[-1].message == "retry requested"
    study_job = _failed(store, NewJob(pipeline="ct", kind="dimse", study_instance_uid="5",
                                      called_ae="DICOMNODE",
                                      input={"instances": ["5.2.1"],
                                             "study_instance_uid": "5"}))
    assert store.retry(study_job).input["instances"] == ["5.2.1", "5.1.8"]
    elsewhere = _failed(store, NewJob(pipeline="ct", kind="dimse", study_instance_uid="5",
                                      called_ae="ARCHIVE",
                                      input={"instances": ["5.2.1"],
                                             "study_instance_uid": "5"}))
    assert store.retry(elsewhere).input["instances"] == ["5.2.1"]  # sent to another AE
    asked = _failed(store, NewJob(pipeline="ct", kind="api",  # a request names its own
                                  input={"instances": ["5.1.0"], "study_instance_uid": "5"}))
    assert store.retry(asked).input["instances"] == ["5.1.0"]


def test_a_sqlite_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It holds destinations' credentials and patients' names: it was created 0644."""
    import os

    new = tmp_path / "new" / "node.db"
    Store(f"sqlite:///{new}").open().close()
    assert new.stat().st_mode & 0o777 == 0o600
    old = tmp_path / "old.db"
    Store(f"sqlite:///{old}").open().close()
    os.chmod(old, 0o644)  # made by an earlier version
    store = Store(f"sqlite:///{old}").open()
    try:
        store.create_job(NewJob(pipeline="p"))  # writes the WAL
        for path in (old, tmp_path / "old.db-wal"):
            assert path.stat().st_mode & 0o777 == 0o600, path
    finally:
        store.close()


def test_a_store_on_a_full_disk_says_so(tmp_path: Path) -> None:
    """SQLite cannot even read on a full disk (it makes its -wal and -shm files) and says
    "disk I/O error", which sent an operator looking for failing hardware; the node's
    message now starts with the full disk and where."""
    from dicom_node.errors import StoreError
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 8) as disk:
        url = f"sqlite:///{disk / 'node.db'}"
        Store(url).open().close()
        fill(disk, 0)
        with contextlib.suppress(OSError), open(disk / "crumbs", "wb") as f:
            while f.write(b"\0" * 512):  # to the last byte
                f.flush()
        with pytest.raises(StoreError) as refused:
            Store(url).open(migrate=False)
    assert "the disk holding it is full (0 KiB free on " in str(refused.value)
    assert "free space there, then start again" in str(refused.value)
