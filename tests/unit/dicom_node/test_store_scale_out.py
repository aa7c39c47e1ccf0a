"""Several machines on one PostgreSQL store: each node re-assembles the instances it
received, runs the jobs whose files it holds, and leases run out by the database's clock.

Two ``Store`` objects on one URL stand for two machines (``serve_as`` names each)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

import dicom_node.store as store_module
from dicom_node.store import InstanceRecord, JobState, NewJob, Store, utcnow

TABLES = ("jobs, job_events, artifacts, exports, instances, watch_inputs, studies, "
          "study_called_aes, integer_ids, batches, batch_sources, nodes")


def rec(sop: str, path: Path | None = None, study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid=study, series_instance_uid=study + ".4",
                          path=path or Path(f"/nowhere/{sop}.dcm"), size_bytes=10,
                          source="dimse", called_ae="DICOMNODE")


@pytest.fixture
def machines(postgres_url: str) -> Iterator[tuple[Store, Store]]:
    """Node A's and node B's stores on one fresh PostgreSQL database."""
    a = Store(postgres_url).open()
    with a.engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    b = Store(postgres_url).open()
    a.serve_as("node-a")
    b.serve_as("node-b")
    yield a, b
    a.close()
    b.close()


def _sops(records: list[InstanceRecord]) -> list[str]:
    return [r.sop_instance_uid for r in records]


def test_a_node_reassembles_only_the_instances_it_received(
        machines: tuple[Store, Store]) -> None:
    a, b = machines
    a.record_instance(rec("1.1"))
    a.add_instance(rec("1.2"))
    b.record_instances([rec("2.1", study="2.3")])
    # node B (re)starting while node A's study is still arriving there leaves it to A
    assert _sops(b.recoverable_instances("node-b", alive_s=60)) == ["2.1"]
    assert _sops(a.recoverable_instances("node-a", alive_s=60)) == ["1.1", "1.2"]
    assert _sops(a.recoverable_instances("node-a", alive_s=60)) == ["1.1", "1.2"]


def test_instances_recorded_before_receiving_nodes_go_to_the_node_holding_their_files(
        machines: tuple[Store, Store], tmp_path: Path) -> None:
    a, b = machines
    held = tmp_path / "held.dcm"
    held.write_bytes(b"x")
    for sop, path in (("1.1", held), ("1.2", None)):
        a.record_instance(rec(sop, path))
    with a.engine.begin() as conn:  # as migration 8 leaves them
        conn.execute(sa.text("UPDATE instances SET received_by = NULL"))
    assert _sops(b.recoverable_instances("node-b", alive_s=60)) == ["1.1"]
    assert a.recoverable_instances("node-a", alive_s=60) == []  # taken once only


def test_a_dead_nodes_instances_are_taken_over_only_with_shared_storage_and_late(
        machines: tuple[Store, Store]) -> None:
    a, b = machines
    old = utcnow() - timedelta(hours=1)
    a.record_instance(dataclasses.replace(rec("1.1"), received_at=old))
    a.record_instance(rec("1.2", study="1.5"))  # just received
    assert b.recoverable_instances("node-b", alive_s=60) == []  # no shared storage
    a.node_alive("node-a", 60)
    assert b.recoverable_instances("node-b", alive_s=60, take_over_after_s=600) == []
    with a.engine.begin() as conn:  # node A died: its liveness runs out
        conn.execute(sa.text("UPDATE nodes SET alive_until = now() - interval '1 second' "
                             "WHERE name = 'node-a'"))
    assert a.live_nodes() == ["node-b"]
    taken = b.recoverable_instances("node-b", alive_s=60, take_over_after_s=600)
    assert _sops(taken) == ["1.1"]
    assert _sops(a.recoverable_instances("node-a", alive_s=60)) == ["1.2"]


def test_a_group_job_waits_for_the_node_holding_its_files(
        machines: tuple[Store, Store]) -> None:
    a, b = machines
    a.record_instance(rec("1.1"))
    [job] = a.create_group_jobs([NewJob(pipeline="p", input={"instances": ["1.1"]})],
                                ["1.1"])
    assert job.home == "node-a"
    assert "only node-a runs it" in (a.events(job.id)[0].message or "")
    acr = b.create_job(NewJob(pipeline="p", kind="acr"))  # retrieves: no home
    assert acr.home is None
    claimed = b.claim_next("node-b#1", 60, node="node-b")
    assert claimed is not None and claimed.id == acr.id
    assert b.claim_next("node-b#1", 60, node="node-b") is None
    mine = a.claim_next("node-a#1", 60, node="node-a")
    assert mine is not None and mine.id == job.id
    # node A dies: its lease runs out and B queues the job again, for A
    with a.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET lease_expires = now() - interval '1 second' "
                             "WHERE id = :id"), {"id": job.id})
    assert b.requeue_expired() == [job.id]
    assert "only node-a runs it" in (b.events(job.id)[-1].message or "")
    assert b.claim_next("node-b#1", 60, node="node-b") is None
    # a retry (from any machine) also leaves it to A
    b.transition(job.id, JobState.FAILED, message="given up")
    b.retry(job.id)
    assert b.claim_next("node-b#1", 60, node="node-b") is None
    again = a.claim_next("node-a#1", 60, node="node-a")
    assert again is not None and again.id == job.id


def test_group_jobs_have_no_home_with_shared_storage_or_on_sqlite(
        machines: tuple[Store, Store], sqlite_store: Store) -> None:
    a, b = machines
    a.serve_as("node-a", shared_storage=True)
    a.record_instance(rec("1.1"))
    [job] = a.create_group_jobs([NewJob(pipeline="p")], ["1.1"])
    assert job.home is None
    assert b.claim_next("node-b#1", 60, node="node-b") is not None
    sqlite_store.serve_as("node-a")
    sqlite_store.record_instance(rec("1.1"))
    [job] = sqlite_store.create_group_jobs([NewJob(pipeline="p")], ["1.1"])
    assert job.home is None  # one machine: a renamed node still runs it
    assert _sops(sqlite_store.recoverable_instances("node-b", alive_s=60)) == []  # queued


def test_leases_run_out_by_the_databases_clock(
        machines: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = machines
    job = a.create_job(NewJob(pipeline="p"))
    real = utcnow
    monkeypatch.setattr(store_module, "utcnow", lambda: real() - timedelta(seconds=90))
    claimed = a.claim_next("node-a#1", 60, node="node-a")  # a clock 90 s behind
    assert claimed is not None and claimed.lease_expires is not None
    assert claimed.lease_expires > real()
    monkeypatch.setattr(store_module, "utcnow", lambda: real() + timedelta(seconds=90))
    # a node whose clock is 90 s ahead takes no live lease
    assert b.requeue_expired() == []
    assert b.requeue_interrupted("node-b#1") == []
    assert b.live_lease_owners() == {"node-a#1": 1}
    monkeypatch.setattr(store_module, "utcnow", lambda: real() - timedelta(seconds=90))
    assert [j for j, _ in a.renew_leases("node-a#1", 60)] == [job.id]
    assert a.get_job(job.id).lease_expires > real()  # type: ignore[operator]


def test_a_version_7_store_gets_receiving_nodes_homes_and_liveness(store: Store) -> None:
    store.record_instance(rec("1.1"))
    job = store.create_job(NewJob(pipeline="p"))
    with store.engine.begin() as conn:  # back to what version 7 made
        conn.exec_driver_sql("DROP INDEX ix_jobs_claim")  # (migration 9's, on jobs.home)
        conn.exec_driver_sql("ALTER TABLE instances DROP COLUMN received_by")
        conn.exec_driver_sql("ALTER TABLE jobs DROP COLUMN home")
        conn.exec_driver_sql("DROP TABLE nodes")
        conn.exec_driver_sql("UPDATE schema_info SET version = 7")
    assert store.migrate() == 7  # the version it found
    assert store.schema_version() == store_module.SCHEMA_VERSION >= 8
    assert store.get_job(job.id).home is None
    assert _sops(store.pending_instances()) == ["1.1"]
    store.node_alive("node-a", 60)
    assert store.live_nodes() == ["node-a"]


def test_a_batch_job_runs_on_the_node_that_received_its_study(
        machines: tuple[Store, Store]) -> None:
    a, b = machines
    a.record_instances([rec("1.1"), rec("1.2")])
    b.record_instance(rec("2.1", study="2.3"))
    batch = b.create_batch(  # asked of node B's API
        group_name="g", owner=None, project_id=1, pipeline="p", output_layer_id=1,
        sources=[(1, NewJob(pipeline="p", kind="batch", input={"instances": ["1.1", "1.2"]})),
                 (2, NewJob(pipeline="p", kind="batch", input={"instances": ["2.1"]}))])
    assert [job.home for _, job in batch.sources] == ["node-a", "node-b"]
    claimed = b.claim_next("node-b#1", 60, node="node-b")
    assert claimed is not None and claimed.id == batch.sources[1][1].id
    assert b.claim_next("node-b#1", 60, node="node-b") is None


def test_retention_leaves_another_nodes_studies_to_it(machines: tuple[Store, Store]) -> None:
    """Node B's retention deleted the records of a study node A received and left its
    files on A's disk for good (nothing would find them again); now B's sweep and
    `studies delete` leave it to A, whose sweep deletes files and records together."""
    a, b = machines
    a.record_instance(rec("1.1"))
    b.record_instance(rec("2.1", study="2.3"))
    a.create_group_jobs([], ["1.1"])  # both queued: nothing still needs them
    b.create_group_jobs([], ["2.1"])
    later = utcnow() + timedelta(days=1)
    assert b.expired_studies(later, node_name="node-b") == ["2.3"]
    assert a.expired_studies(later, node_name="node-a") == ["1.2.3"]
    assert sorted(a.expired_studies(later)) == ["1.2.3", "2.3"]  # one machine: all
    assert b.received_by_others("1.2.3", "node-b") == ["node-a"]
    assert b.received_by_others("2.3", "node-b") == []


def test_studies_delete_on_another_node_says_where_to_delete(
        machines: tuple[Store, Store], postgres_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node import studies_view
    from dicom_node.config import Settings

    a, b = machines
    a.record_instance(rec("1.1"))
    a.create_group_jobs([], ["1.1"])
    settings = Settings.model_validate({
        "node_name": "node-b", "storage": {"data_dir": str(tmp_path),
                                            "database_url": postgres_url}})
    assert studies_view.delete_study(settings, b, "1.2.3", results=False, yes=True) == 1
    assert "was received by node-a (its files are on that node's disk): delete it there" \
        in capsys.readouterr().err
    assert b.get_instance("1.1") is not None  # nothing forgotten
