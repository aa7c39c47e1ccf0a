"""The queries that run over every job or study (claiming, listing, retention) read only
the rows they return, through indexes (schema 9): checked on SQLite's query plans and on
the columns they read, never on timings; the migration on both backends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import dicom_node.store as store_module
from dicom_node.cli import main
from dicom_node.store import InstanceRecord, JobState, NewJob, Store, jobs, studies, utcnow

NEW_INDEXES = {"ix_jobs_claim", "ix_jobs_due", "ix_jobs_created_at", "ix_jobs_state_created_at",
               "ix_jobs_finished_at"}


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    yield s
    s.close()


class Statements:
    """The SQL a store runs, with its parameters, to explain or to read afterwards."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.run: list[tuple[str, Any]] = []

    def __enter__(self) -> Statements:
        sa.event.listen(self.store.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(self.store.engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, parameters: Any,
              *_: Any) -> None:
        self.run.append((statement, parameters))

    def selects(self, table: str) -> list[tuple[str, Any]]:
        return [(s, p) for s, p in self.run
                if s.lstrip().upper().startswith("SELECT") and f"FROM {table}" in s]

    def plans(self, table: str) -> list[list[str]]:
        with self.store.engine.connect() as conn:
            return [[str(r[-1]) for r in
                     conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {s}", p)]
                    for s, p in self.selects(table)]


def assert_served_by_index(plan: list[str], table: str) -> None:
    """No sort of the rows found and no read of the whole table (an index walked in
    order under a LIMIT, ``SCAN t USING INDEX``, stops after the rows it returns)."""
    assert not any("TEMP B-TREE" in line for line in plan), plan
    assert not any(re.fullmatch(rf"SCAN {table}", line) for line in plan), plan


def add_jobs(store: Store, n: int, **kw: Any) -> list[str]:
    uids = [f"1.2.3.{i}" for i in range(200)]  # a job's input: its instances
    return [store.create_job(NewJob(pipeline="p", input={"instances": uids}, **kw)).id
            for _ in range(n)]


def test_claiming_reads_ids_in_the_index_order_and_only_the_claimed_jobs_row(
        sqlite_store: Store) -> None:
    add_jobs(sqlite_store, 20)
    urgent = add_jobs(sqlite_store, 1, priority=200)[0]
    with Statements(sqlite_store) as seen:
        job = sqlite_store.claim_next("w", 60, node="node-a")
        sqlite_store.next_due()
    assert job is not None and job.id == urgent and len(job.input["instances"]) == 200
    plans = seen.plans("jobs")
    for plan in plans:
        assert_served_by_index(plan, "jobs")
    assert any("ix_jobs_claim" in line for plan in plans for line in plan), plans
    assert any("ix_jobs_due" in line for plan in plans for line in plan), plans
    candidates = [s for s, _ in seen.selects("jobs") if "LIMIT" in s]
    assert candidates and all("jobs.input" not in s for s in candidates)
    # the whole row (with input) only by id: the job being claimed
    full = [s for s, _ in seen.selects("jobs") if "jobs.input" in s]
    assert full and all("WHERE jobs.id = ?" in s for s in full)


def test_claiming_still_takes_the_most_urgent_oldest_runnable_job(store: Store) -> None:
    later = utcnow() + timedelta(hours=1)
    first, second = add_jobs(store, 2, priority=100)
    delayed = add_jobs(store, 1, priority=250)[0]
    with store.engine.begin() as conn:  # backing off after a failed attempt
        conn.execute(jobs.update().where(jobs.c.id == delayed).values(not_before=later))
    add_jobs(store, 1, priority=250, home="node-b")
    mine = add_jobs(store, 1, priority=90, home="node-a")[0]
    claimed = [store.claim_next("w", 60, node="node-a") for _ in range(4)]
    assert [j.id if j else None for j in claimed] == [first, second, mine, None]
    assert store.next_due() is not None


@pytest.mark.parametrize("states", [None, [JobState.QUEUED],
                                    [JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED]])
def test_listing_jobs_uses_an_index_and_reads_no_input(
        sqlite_store: Store, states: list[JobState] | None) -> None:
    add_jobs(sqlite_store, 5)
    with Statements(sqlite_store) as seen:
        listed = sqlite_store.list_jobs(states, limit=3, with_input=False)
    assert len(listed) == 3 and all(j.input == {} for j in listed)
    assert all("input" not in s for s, _ in seen.selects("jobs"))
    for plan in seen.plans("jobs"):
        assert_served_by_index(plan, "jobs")
        assert any("ix_jobs_created_at" in line or "ix_jobs_state_created_at" in line
                   for line in plan), plan


def test_several_states_are_listed_newest_first_across_states(store: Store) -> None:
    ids = add_jobs(store, 6)
    with store.engine.begin() as conn:  # ages apart, states alternating
        for n, job_id in enumerate(ids):
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                created_at=utcnow() - timedelta(minutes=n),
                state=(JobState.FAILED if n % 2 else JobState.CANCELLED).value))
    both = [JobState.FAILED, JobState.CANCELLED]
    assert [j.id for j in store.list_jobs(both, limit=10)] == ids
    assert [j.id for j in store.list_jobs(both, limit=3, offset=2)] == ids[2:5]
    assert [j.id for j in store.list_jobs([JobState.FAILED], limit=10)] == ids[1::2]
    assert store.list_jobs(both, limit=1)[0].input["instances"][0] == "1.2.3.0"


def test_an_id_prefix_is_found_through_the_primary_key(sqlite_store: Store) -> None:
    job_id = add_jobs(sqlite_store, 3)[0]
    with Statements(sqlite_store) as seen:
        assert sqlite_store.match_job(job_id[:8].upper()).id == job_id
    prefix_plans = [plan for (s, _), plan in zip(seen.selects("jobs"), seen.plans("jobs"),
                                                 strict=True) if "jobs.id >=" in s]
    assert prefix_plans
    for plan in prefix_plans:
        assert_served_by_index(plan, "jobs")


def test_listing_more_than_the_cap_is_refused_with_a_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Store(f"sqlite:///{data / 'node.db'}").open().close()
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "list", "--data-dir", str(data), "--limit", "10000"])
    assert exited.value.code == 2
    assert "list at most 1000 jobs at a time" in capsys.readouterr().err
    assert main(["jobs", "list", "--data-dir", str(data), "--limit", "1000"]) == 0
    # `studies list` reads each study's series too: the same cap, its own hint
    for wrong in ("5000", "0", "-3", "many"):
        with pytest.raises(SystemExit) as exited:
            main(["studies", "list", "--data-dir", str(data), "--limit", wrong])
        assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "list at most 1000 studies at a time (narrow it down with --patient)" in err
    assert "not a number: 'many'" in err
    assert main(["studies", "list", "--data-dir", str(data), "--limit", "1000"]) == 0


def rec(sop: str, study: str) -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid=study, series_instance_uid=study + ".4",
                          path=Path(f"/nowhere/{sop}.dcm"), size_bytes=10, source="dimse",
                          called_ae="DICOMNODE")


def test_retention_batches_go_on_where_the_last_stopped(store: Store) -> None:
    """Five old studies, the oldest still needed by a job: batches of two give the other
    four once each, oldest first, and the needed one is not read again by each batch."""
    uids = [f"9.{n}" for n in range(5)]
    for uid in uids:
        store.record_instance(rec(uid + ".1", uid))
    store.mark_queued([uid + ".1" for uid in uids])
    with store.engine.begin() as conn:
        for n, uid in enumerate(uids):
            conn.execute(studies.update().where(studies.c.study_instance_uid == uid)
                         .values(updated_at=utcnow() - timedelta(days=100 - n)))
    store.create_job(NewJob(pipeline="p", study_instance_uid=uids[0]))  # still queued
    cutoff = utcnow() - timedelta(days=30)
    batches = list(store.expired_study_batches(cutoff, limit=2))
    assert batches == [uids[1:3], uids[3:5]]
    assert store.expired_studies(cutoff, limit=10) == uids[1:]

    done = add_jobs(store, 5)
    with store.engine.begin() as conn:
        for n, job_id in enumerate(done):
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state=JobState.SUCCEEDED.value, finished_at=utcnow() - timedelta(days=90 - n)))
    expired = []
    for batch in store.expired_job_batches(cutoff, limit=2):
        expired.append(batch)
        store.forget_jobs(batch)
    assert expired == [done[0:2], done[2:4], done[4:5]]
    assert store.jobs_finished_before(cutoff) == []


def test_retention_queries_use_the_indexes(sqlite_store: Store) -> None:
    cutoff = utcnow() - timedelta(days=30)
    for uid in ("9.1", "9.2"):
        sqlite_store.record_instance(rec(uid + ".1", uid))
    sqlite_store.mark_queued(["9.1.1", "9.2.1"])
    done = add_jobs(sqlite_store, 2)
    with sqlite_store.engine.begin() as conn:
        conn.execute(studies.update().values(updated_at=utcnow() - timedelta(days=90)))
        conn.execute(jobs.update().values(state=JobState.SUCCEEDED.value,
                                          finished_at=utcnow() - timedelta(days=90)))
    with Statements(sqlite_store) as seen:  # batches of one: each after the first a keyset
        assert len(list(sqlite_store.expired_study_batches(cutoff, limit=1))) == 2
        assert len(list(sqlite_store.expired_job_batches(cutoff, limit=1))) == len(done)
        sqlite_store.received_studies(limit=20)
    plans = seen.plans("studies") + seen.plans("jobs")
    text = "\n".join(line for plan in plans for line in plan)
    assert "ix_studies_updated_at" in text and "ix_jobs_finished_at" in text, text
    assert "TEMP B-TREE" not in text, text
    assert not re.search(r"^SCAN (jobs|studies)$", text, re.M), text


def test_a_version_8_store_gets_the_indexes(store: Store) -> None:
    job = add_jobs(store, 1)[0]
    with store.engine.begin() as conn:  # back to what version 8 made
        for name in (*NEW_INDEXES, "ix_studies_updated_at"):
            conn.exec_driver_sql(f"DROP INDEX {name}")
        conn.exec_driver_sql("CREATE INDEX ix_jobs_queue ON jobs (state, priority, created_at)")
        conn.exec_driver_sql("UPDATE schema_info SET version = 8")
    assert store.migrate() == 8  # the version it found
    assert store.schema_version() == store_module.SCHEMA_VERSION == 9
    inspector = sa.inspect(store.engine)
    names = {ix["name"] for ix in inspector.get_indexes("jobs")}
    assert names >= NEW_INDEXES and "ix_jobs_queue" not in names
    assert "ix_studies_updated_at" in {ix["name"] for ix in inspector.get_indexes("studies")}
    claimed = store.claim_next("w", 60)
    assert claimed is not None and claimed.id == job
    assert store.migrate() == 9  # again: nothing to do
