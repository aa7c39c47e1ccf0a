"""Two nodes (own node_name, own data directory) on one PostgreSQL database, as two
machines: a study is queued once, by the node that received it, and runs where its
files are; with shared storage a dead node's pending study is taken over."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import Settings
from dicom_node.store import JobState, Store, utcnow
from tests.integration.dicom_node.test_watch import wait_until
from tests.support.dicom_factory import make_cr_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import storescu
from tests.unit.dicom_node.test_store_scale_out import TABLES

pytestmark = pytest.mark.timeout(180)


def _settings(tmp_path: Path, name: str, url: str, timeout_s: float,
              **storage: Any) -> Settings:
    return node_settings(
        tmp_path / name,
        node_name=name,
        storage={"data_dir": str(tmp_path / name), "database_url": url, **storage},
        ae_titles=[{"ae_title": "DICOMNODE", "pipelines": ["demo"], "timeout_s": timeout_s,
                    "complete_on_release": False}],
        models=[{"name": "demo-model", "path": "unused"}],
        pipelines=[{"name": "demo", "model": "demo-model", "task": "classify"}],
    )


def _fresh(url: str) -> Store:
    store = Store(url).open()
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    return store


async def test_a_study_still_arriving_at_one_node_is_queued_once_and_runs_there(
        tmp_path: Path, postgres_url: str) -> None:
    study = make_cr_study(tmp_path / "src", seed="two-machines")
    a = _settings(tmp_path, "node-a", postgres_url, timeout_s=60)
    b = _settings(tmp_path, "node-b", postgres_url, timeout_s=0.5)
    store = _fresh(postgres_url)
    try:
        async with running_node(a):
            await asyncio.to_thread(storescu, a.dimse.port, study.paths, "DICOMNODE", "CT")
            await wait_until(lambda: len(store.pending_instances()) == 1)
            async with running_node(b) as node_b:
                # B (re)started while A's study is still arriving: it is A's
                assert node_b.assembler is not None
                assert node_b.assembler.open_groups == 0
        # A stopped with the study still open; B starting again leaves it to A too
        async with running_node(b) as node_b:
            assert node_b.assembler is not None
            assert node_b.assembler.open_groups == 0
            assert len(store.pending_instances()) == 1 and not store.list_jobs()
            # A starts again, with its disk too full to run jobs: the study becomes a job
            # there, which B, without the file, must leave to A
            full = _settings(tmp_path, "node-a", postgres_url, timeout_s=0.5,
                             min_free_mb=10**9)
            async with running_node(full):
                await wait_until(lambda: bool(store.list_jobs()))
                [job] = store.list_jobs()
                assert job.home == "node-a"
                await asyncio.sleep(1)  # B's workers poll every 0.05 s meanwhile
                assert store.get_job(job.id).state is JobState.QUEUED
            async with running_node(a):  # A with room: it runs its job
                await wait_until(lambda: store.get_job(job.id).state.final)
        assert store.get_job(job.id).state is JobState.SUCCEEDED
        attempts = [e.message for e in store.events(job.id) if e.message and
                    e.message.startswith("attempt ")]
        assert attempts and all(" on node-a#" in m for m in attempts), attempts
        assert len(store.list_jobs()) == 1
    finally:
        store.close()


async def test_with_shared_storage_a_dead_nodes_pending_study_is_taken_over(
        tmp_path: Path, postgres_url: str) -> None:
    shared = {"shared": True, "studies_dir": str(tmp_path / "shared" / "studies"),
              "results_dir": str(tmp_path / "shared" / "results")}
    study = make_cr_study(tmp_path / "shared" / "studies", seed="taken-over")
    b = _settings(tmp_path, "node-b", postgres_url, timeout_s=0.5, **shared)
    store = _fresh(postgres_url)
    try:
        dead = Store(postgres_url).open()  # node A received it an hour ago, then died
        dead.serve_as("node-a", shared_storage=True)
        from tests.unit.dicom_node.test_store_scale_out import rec

        dead.record_instance(dataclasses.replace(
            rec(study.sop_uids[0], study.paths[0], study.study_uid),
            series_instance_uid=study.series_uids[0],
            received_at=utcnow() - timedelta(hours=1)))
        dead.node_alive("node-a", -1)
        dead.close()
        async with running_node(b) as node_b:
            await wait_until(lambda: bool(store.list_jobs())
                             and store.list_jobs()[0].state.final)
            [job] = store.list_jobs()
            assert job.home is None and job.state is JobState.SUCCEEDED
            assert node_b.assembler is not None
        assert store.pending_instances() == []
    finally:
        store.close()
