"""A complete group becomes jobs exactly once, whatever moment the node dies at.

The node runs in the test's loop with the test job handler. The worst moment to die is
between writing a group's jobs and recording that its instances (and drop-folder
inputs) are queued: a restart then finds the instances pending and queues the study a
second time. A trigger in the real SQLite store makes that record fail, every time and
at exactly that point: the store is then as a ``kill -9`` there leaves it. The node is
stopped, the trigger dropped, and the node started again; or the trigger is dropped
while the node runs, as a store that comes back.
"""

from __future__ import annotations

import asyncio
import errno
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

import pytest
import sqlalchemy as sa

import dicom_node.watch as watch_module
from dicom_node.node import Node
from dicom_node.store import Store
from tests.integration.dicom_node.test_watch import wait_until
from tests.support.dicom_factory import make_cr_study, make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port, storescu

pytestmark = pytest.mark.timeout(180)

# Fail the "queued" record of instances and of drop-folder inputs (the SQL a node dying
# right there would never have committed); received instances and their inputs are
# still recorded as usual.
CRASH_ON_QUEUED = [
    """CREATE TRIGGER crash_instances BEFORE UPDATE OF queued_at ON instances
       WHEN NEW.queued_at IS NOT NULL BEGIN SELECT RAISE(ABORT, 'node died here'); END""",
    """CREATE TRIGGER crash_watch_inputs BEFORE UPDATE OF state ON watch_inputs
       WHEN NEW.state = 'queued' BEGIN SELECT RAISE(ABORT, 'node died here'); END""",
]


def _settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    return node_settings(
        tmp_path / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        ae_titles=[{"ae_title": "DICOMNODE", "pipelines": ["demo"], "timeout_s": 0.5}],
        watch=[{"name": "inbox", "path": str(inbox), "pipelines": ["demo"],
                "settle_s": 0.2, "timeout_s": 0.5}],
        models=[{"name": "demo-model", "path": "unused"}],
        pipelines=[{"name": "demo", "model": "demo-model", "task": "classify"}],
    )


def _jobs_by_instance(store: Store) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in store.list_jobs(None, 10_000):
        for sop in job.input.get("instances", []):
            counts[sop] = counts.get(sop, 0) + 1
    return counts


async def _settled(node: Node) -> bool:
    """Every group that arrived is complete and its queueing has ended."""
    assert node.assembler is not None
    return node.assembler.open_groups == 0 and not node.assembler._tasks


def _refused(node: Node, groups: int) -> bool:
    """Every group that arrived is complete, and ``groups`` of them wait for the store."""
    assert node.assembler is not None
    return (node.assembler.open_groups == 0
            and node.assembler.groups_waiting_for_store == groups)


def _crash_on_queued(store: Store) -> None:
    with store.engine.begin() as conn:
        for ddl in CRASH_ON_QUEUED:
            conn.execute(sa.text(ddl))


def _store_back(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER crash_instances"))
        conn.execute(sa.text("DROP TRIGGER crash_watch_inputs"))


async def test_a_group_is_queued_once_when_the_node_dies_before_recording_it(
        tmp_path: Path) -> None:
    pushed = make_cr_study(tmp_path / "src", seed="queue-once-dicom")
    dropped = make_cr_study(tmp_path / "src", seed="queue-once-watch")
    settings = _settings(tmp_path)
    (tmp_path / "data").mkdir()
    store = Store(settings.database_url).open()
    try:
        _crash_on_queued(store)
        inbox = tmp_path / "inbox"
        async with running_node(settings) as node:
            await asyncio.to_thread(storescu, settings.dimse.port, pushed.paths, "DICOMNODE",
                                    "MODALITY")
            shutil.copy(dropped.paths[0], inbox / "image.dcm")
            await wait_until(lambda: (inbox / "done" / "image.dcm").exists())
            await asyncio.sleep(0.05)  # one more turn of the loop: both groups are open
            await wait_until(lambda: _refused(node, 2))
        # what the first run left: as if it had died at the worst moment
        left_jobs = len(store.list_jobs())
        left_pending = (len(store.pending_instances())
                        + len(store.pending_watch_instances("inbox")))

        _store_back(store)
        async with running_node(settings) as node:
            async def recovered() -> bool:
                pending = await asyncio.to_thread(store.pending_instances)
                watch = await asyncio.to_thread(store.count_watch_inputs, "inbox")
                return not pending and watch == {"queued": 1} and await _settled(node)
            await wait_until(recovered)
            await wait_until(lambda: all(j.state.final for j in store.list_jobs()))

        # every instance is in exactly one job: no study ran twice
        assert _jobs_by_instance(store) == {pushed.sop_uids[0]: 1, dropped.sop_uids[0]: 1}
        # the failed record took the jobs with it: none were left without it
        assert (left_jobs, left_pending) == (0, 2)
    finally:
        store.close()


async def test_a_group_the_store_refused_becomes_jobs_once_it_takes_writes_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refusing a group's queuing (here the trigger; in life a database
    restarting, or a full disk) no longer leaves the study to the next start: /health
    says so meanwhile, and once the store takes writes the group becomes its jobs, once,
    without a restart."""
    monkeypatch.setattr("dicom_node.assembler.QUEUE_RETRY_FIRST_S", 0.05)
    monkeypatch.setattr("dicom_node.assembler.QUEUE_RETRY_MAX_S", 0.2)
    pushed = make_cr_study(tmp_path / "src", seed="queue-later")
    settings = _settings(tmp_path)
    (tmp_path / "data").mkdir()
    store = Store(settings.database_url).open()
    try:
        _crash_on_queued(store)
        async with running_node(settings) as node:
            await asyncio.to_thread(storescu, settings.dimse.port, pushed.paths, "DICOMNODE",
                                    "MODALITY")
            await wait_until(lambda: _refused(node, 1))
            assert store.list_jobs() == []
            _store_back(store)
            await wait_until(lambda: _settled(node))
            assert node.assembler is not None
            assert node.assembler.groups_waiting_for_store == 0
            await wait_until(lambda: all(j.state.final for j in store.list_jobs()))
        assert _jobs_by_instance(store) == {pushed.sop_uids[0]: 1}
        assert store.pending_instances() == []
    finally:
        store.close()


async def test_a_study_held_up_by_a_full_disk_still_becomes_one_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One file of a dropped CT series cannot be taken for a while ("no space left on
    device", as while a disk fills): the folder holds the study's group past its
    timeout, and once the file is taken the whole series is one job (before: a job for
    the part taken, which failed on the gap, and one for the rest)."""
    study = make_ct_study(tmp_path / "src", seed="held-up", slices=6, size=16)
    settings = _settings(tmp_path)
    inbox = tmp_path / "inbox"
    disk_full = threading.Event()
    disk_full.set()
    refusals: list[str] = []
    real_open = watch_module._open_input

    def open_input(path: str) -> BinaryIO:  # the seam test_watch.py uses for open()
        if path.endswith("slice3.dcm") and disk_full.is_set():
            refusals.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path)

    monkeypatch.setattr(watch_module, "_open_input", open_input)
    async with running_node(settings) as node:
        store = node.store
        assert store is not None
        for i, p in enumerate(study.paths):
            shutil.copy(p, inbox / f"slice{i}.dcm")
        await wait_until(lambda: len(list((inbox / "done").glob("*.dcm"))) == 5)
        await wait_until(lambda: len(refusals) >= 2)  # tried again after more than timeout_s
        disk_full.clear()  # space came back

        async def all_in_jobs() -> bool:
            counts = await asyncio.to_thread(_jobs_by_instance, store)
            return sum(counts.values()) >= 6
        await wait_until(all_in_jobs)
        jobs = [j for j in await asyncio.to_thread(store.list_jobs) if j.kind == "watch"]
        assert [sorted(j.input["instances"]) for j in jobs] == [sorted(study.sop_uids)]
        assert await asyncio.to_thread(store.count_watch_inputs, "inbox") == {"queued": 6}


async def test_a_series_that_came_in_parts_runs_whole(tmp_path: Path) -> None:
    """A CT series dropped without three of its middle slices fails on the gap, and the
    message says what to do; the three come in later (their own group), whose job runs
    on the whole series as the store now holds it. `jobs retry` of the failed job then
    gathers the whole series too, and finds it read by that run: no second result."""
    study = make_ct_study(tmp_path / "src", seed="in-parts", slices=12)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    organs = Path(__file__).resolve().parents[3] / "pipeline" / "models" / "ct-organs"
    settings = node_settings(
        tmp_path / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        watch=[{"name": "inbox", "path": str(inbox), "pipelines": ["ct-organs"],
                "settle_s": 0.2, "timeout_s": 0.5}],
        models=[{"name": "ct-organs", "path": str(organs), "warmup": False}],
        pipelines=[{"name": "ct-organs", "model": "ct-organs", "task": "segment",
                    "series": {"modalities": ["CT"], "min_instances": 8},
                    "outputs": ["json"]}],
        executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.05,
                  "grace_period_s": 5},
    )
    late = {5, 6, 7}
    async with running_node(settings) as node:
        store = node.store
        assert store is not None

        def watch_jobs() -> list:  # type: ignore[type-arg]
            return sorted((j for j in store.list_jobs() if j.kind == "watch"),
                          key=lambda j: j.created_at)

        def all_final(n: int) -> bool:
            jobs = watch_jobs()
            return len(jobs) == n and all(j.state.final for j in jobs)

        for i, p in enumerate(study.paths):
            if i not in late:
                shutil.copy(p, inbox / f"slice{i}.dcm")
        await wait_until(lambda: all_final(1))
        (first,) = watch_jobs()
        assert first.state.value == "failed" and len(first.input["instances"]) == 9
        assert "resend the complete series" in (first.error or "")
        assert f"or, once the missing instances are in, dicom-node jobs retry {first.id}" \
            in (first.error or "")

        for i in late:  # the rest comes in: a group of its own, too small to run alone
            shutil.copy(study.paths[i], inbox / f"slice{i}.dcm")
        await wait_until(lambda: all_final(2))
        rest = watch_jobs()[1]
        assert rest.state.value == "succeeded", rest.error
        assert rest.result is not None and rest.result["results"][0]["study"] == study.study_uid
        assert rest.result["whole_series"]["instances"] == 12

        retried = await asyncio.to_thread(store.retry, first.id)
        assert sorted(retried.input["instances"]) == sorted(study.sop_uids)
        assert store.events(first.id)[-1].message == (
            "retry requested with 12 instances, 3 more than the failed run")
        assert node.scheduler is not None
        node.scheduler.notify()
        await wait_until(lambda: store.get_job(first.id).state.final)
        done = store.get_job(first.id)
        assert done.state.value == "succeeded", done.error
        assert done.result is not None and done.result["covered_by"] == rest.id
        assert done.result["results"] == []
