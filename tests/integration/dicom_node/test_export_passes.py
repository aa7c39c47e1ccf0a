"""A job's export to real peers that are down, come up or are cancelled.

A whole node runs in the test's loop with the real job handler, a tiny random classifier
and one worker; a DIMSE destination that is down is a closed loopback port, and one that
comes up is dcmtk ``storescp`` started on that port. ``+uf`` makes storescp keep each
instance it receives in its own file, so a re-send shows as a second file.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node.store import JobState, NewJob, utcnow
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from tests.support.inproc import running_node
from tests.support.peers import free_port, storescp
from tests.unit.dicom_node.test_handler import CXR, _finished, _settings

pytestmark = pytest.mark.timeout(180)

PIPELINE = {**CXR, "threshold": 0.01, "outputs": ["json", "sr"]}


def _dimse(name: str, port: int, **retry: float) -> dict[str, Any]:
    return {"name": name, "type": "dimse", "ae_title": name.upper(), "host": "127.0.0.1",
            "port": port, "retry": {"max_attempts": 3, "backoff_s": 0.5, **retry}}


def _node(tmp_path: Path, destinations: list[dict[str, Any]]) -> Any:
    settings = _settings(tmp_path, [PIPELINE], destinations=destinations)
    return settings.model_copy(update={"executor": settings.executor.model_copy(
        update={"workers": 1, "immediate_slot": False})})


async def _submit(node: Any, tmp_path: Path, seed: int, destinations: list[str]) -> Any:
    src = write_dicom(make_cxr_phantom(seed, size=64), tmp_path / f"cr{seed}.dcm",
                      patient_id=f"P{seed}", modality="CR")
    sent = src.with_suffix(".sent")
    shutil.copy(src, sent)
    got = node.instance_writer().write(sent, called_ae="DICOMNODE", calling_ae="MODALITY",
                                       association_id=0)
    return await node.scheduler.submit(NewJob(
        pipeline="cxr", kind="api",
        input={"instances": [got.sop_instance_uid], "destinations": destinations}))


async def _waiting_for_export(node: Any, job: Any) -> Any:
    """``job`` once its first export pass is recorded and it is queued for the next (or
    it ended: the test's asserts say why)."""
    while True:  # no time limit: pytest-timeout guards the test
        job = node.store.get_job(job.id)
        if job.state.final or (job.state is JobState.QUEUED and node.store.exports_of(job.id)):
            return job
        await asyncio.sleep(0.05)


def _sr_uid(node: Any, job_id: str) -> str:
    (uid,) = [a.sop_instance_uid for a in node.store.artifacts_of(job_id) if a.kind == "sr"]
    return str(uid)


def _received(folder: Path) -> list[str]:
    """The SOP Instance UIDs of what a storescp received, one for each instance sent."""
    return sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                  for f in folder.iterdir() if f.is_file())


async def test_a_pacs_that_is_down_does_not_hold_the_worker(tmp_path: Path) -> None:
    """The only worker runs a second job while the first waits for its next attempt at
    the PACS; the folder destination got the first job's results in the first pass."""
    share = tmp_path / "share"
    settings = _node(tmp_path, [_dimse("pacs", free_port(), backoff_s=60),
                                {"name": "share", "type": "folder", "path": str(share)}])
    async with running_node(settings) as node:
        first = await _submit(node, tmp_path, 1, ["pacs", "share"])
        first = await _waiting_for_export(node, first)
        assert first.state is JobState.QUEUED, first.error
        assert "export to pacs failed" in (first.error or "")
        assert [(x.destination, x.state, x.attempts) for x in node.store.exports_of(first.id)] \
            == [("pacs", "retrying", 1), ("share", "succeeded", 1)]
        assert (share / first.id / "P1" / "P1_sr.dcm").is_file()
        second = await _finished(node, await _submit(node, tmp_path, 2, ["share"]))
        assert second.state is JobState.SUCCEEDED, second.error
        waiting = node.store.get_job(first.id)
        assert waiting.state is JobState.QUEUED
        assert waiting.not_before is not None and second.finished_at is not None
        assert second.finished_at < waiting.not_before  # ran while the first waited
        assert waiting.attempts == 0  # a pass for the PACS is not an attempt of the job
        assert node.store.request_cancel(first.id).state is JobState.CANCELLED


async def test_a_cancel_while_waiting_for_an_export_pass_sends_nothing_more(
        tmp_path: Path) -> None:
    """Both PACSes are down; the job is cancelled while queued for its next pass; the
    second PACS comes up: it gets nothing of the cancelled job, only a later job's SR,
    although the cancelled job was due before that job was queued (and older)."""
    pacs2_port = free_port()
    settings = _node(tmp_path, [_dimse("pacs", free_port(), max_attempts=5),
                                _dimse("pacs2", pacs2_port, max_attempts=5)])
    async with running_node(settings) as node:
        job = await _waiting_for_export(node, await _submit(node, tmp_path, 1,
                                                            ["pacs", "pacs2"]))
        assert job.state is JobState.QUEUED, job.error
        assert node.store.request_cancel(job.id).state is JobState.CANCELLED  # `jobs cancel`
        with storescp(tmp_path / "pacs2", "PACS2", "+uf", port=pacs2_port) as pacs2:
            assert job.not_before is not None
            while utcnow() <= job.not_before:  # until the cancelled job would be due
                await asyncio.sleep(0.05)
            later = await _finished(node, await _submit(node, tmp_path, 2, ["pacs2"]))
            assert later.state is JobState.SUCCEEDED, later.error
            assert _received(pacs2.directory) == [_sr_uid(node, later.id)]
        assert node.store.get_job(job.id).state is JobState.CANCELLED
        # neither destination says it will still be sent to
        assert [(x.state, (x.message or "").endswith("not tried again: the job was cancelled"))
                for x in node.store.exports_of(job.id)] == [("failed", True), ("failed", True)]


async def test_a_retried_job_sends_only_to_the_destination_that_missed_its_results(
        tmp_path: Path) -> None:
    """`jobs retry` after the PACS came back: the results the job made go to it, and
    only to it: no new run, no new UIDs, nothing again to the PACS that had them."""
    pacs_port = free_port()
    with storescp(tmp_path / "pacs2", "PACS2", "+uf") as pacs2:
        settings = _node(tmp_path, [_dimse("pacs", pacs_port, max_attempts=1),
                                    _dimse("pacs2", pacs2.port)])
        async with running_node(settings) as node:
            job = await _finished(node, await _submit(node, tmp_path, 1, ["pacs", "pacs2"]))
            assert job.state is JobState.FAILED
            assert "export to pacs failed" in (job.error or "")
            assert "after 1 attempts" in (job.error or "")
            sr = _sr_uid(node, job.id)
            assert _received(pacs2.directory) == [sr]
            runs = [e.state for e in node.store.events(job.id)].count(JobState.RUNNING)
            made = [(a.kind, a.path) for a in node.store.artifacts_of(job.id)]
            with storescp(tmp_path / "pacs", "PACS", "+uf", port=pacs_port) as pacs:
                node.store.retry(job.id)  # what `dicom-node jobs retry` does
                job = await _finished(node, job)
                assert job.state is JobState.SUCCEEDED, job.error
                assert _received(pacs.directory) == [sr]
            assert _received(pacs2.directory) == [sr]  # one set, not sent again
            events = [e.state for e in node.store.events(job.id)]
            assert events.count(JobState.RUNNING) == runs  # not run again
            assert [(a.kind, a.path) for a in node.store.artifacts_of(job.id)] == made
            assert [(x.destination, x.state) for x in node.store.exports_of(job.id)] == [
                ("pacs", "succeeded"), ("pacs2", "succeeded")]


async def test_a_job_whose_results_are_gone_runs_again_and_lists_them_once(
        tmp_path: Path) -> None:
    """Retried after its results were removed, the job runs again: its new results
    replace the recorded ones (each listed once), and the folder that got the first
    run's results does not get the new run's."""
    share = tmp_path / "share"
    settings = _node(tmp_path, [_dimse("pacs", free_port(), max_attempts=1),
                                {"name": "share", "type": "folder", "path": str(share)}])
    async with running_node(settings) as node:
        job = await _finished(node, await _submit(node, tmp_path, 1, ["pacs", "share"]))
        assert job.state is JobState.FAILED
        first_sr = _sr_uid(node, job.id)
        kinds = sorted(a.kind for a in node.store.artifacts_of(job.id))
        assert kinds.count("sr") == 1
        shutil.rmtree(settings.results_dir / job.id)
        node.store.retry(job.id)
        job = await _finished(node, job)
        assert job.state is JobState.FAILED and "export to pacs failed" in (job.error or "")
        assert [e.state for e in node.store.events(job.id)].count(JobState.RUNNING) == 2
        assert sorted(a.kind for a in node.store.artifacts_of(job.id)) == kinds  # once each
        assert _sr_uid(node, job.id) != first_sr  # a new run, new UIDs
        assert [(x.destination, x.state) for x in node.store.exports_of(job.id)] == [
            ("pacs", "failed"), ("share", "succeeded")]
        mirrored = pydicom.dcmread(share / job.id / "P1" / "P1_sr.dcm")
        assert mirrored.SOPInstanceUID == first_sr  # the share kept the first set alone


class FailingOnce:
    """A pynetdicom storage SCP on loopback whose first association fails at its second
    instance: ``refuse`` answers it 0xA700 (out of resources) and takes the rest,
    ``abort`` aborts the association there. Later associations take everything. It
    records the SOP Instance UIDs each association carried, the failed one included."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.associations: list[list[str]] = []
        self._lock = threading.Lock()
        self._seen: dict[int, int] = {}

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            index = self._seen.setdefault(id(event.assoc), len(self._seen))
            if index == len(self.associations):
                self.associations.append([])
            self.associations[index].append(uid)
            failing = index == 0 and len(self.associations[0]) == 2
        if failing and self.mode == "abort":
            event.assoc.abort()
            return 0xA700  # not sent: the association is gone
        return 0xA700 if failing else 0x0000

    @contextlib.contextmanager
    def running(self, port: int) -> Iterator[FailingOnce]:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        try:
            yield self
        finally:
            server.shutdown()


@pytest.mark.parametrize("mode", ["refuse", "abort"])
async def test_a_destination_that_failed_part_way_gets_only_what_it_lacks(
        tmp_path: Path, mode: str) -> None:
    """The PACS takes some of the job's objects, then refuses one (or drops the
    association): the next pass sends it only the objects it did not acknowledge, and
    the outcome says how many it already had."""
    port = free_port()
    settings = _node(tmp_path, [_dimse("pacs", port, backoff_s=0.2)])
    settings = settings.model_copy(update={"pipelines": [
        p.model_copy(update={"outputs": ["sr", "sc", "encapsulated_pdf"]})
        for p in settings.pipelines]})
    with FailingOnce(mode).running(port) as pacs:
        async with running_node(settings) as node:
            job = await _finished(node, await _submit(node, tmp_path, 1, ["pacs"]))
            assert job.state is JobState.SUCCEEDED, job.error
            made = sorted(str(a.sop_instance_uid) for a in node.store.artifacts_of(job.id)
                          if a.sop_instance_uid)
            assert len(made) == 3
            first, second = pacs.associations
            if mode == "refuse":
                assert sorted(first) == made  # the SCU went on after the refusal
                assert second == [first[1]]  # only the refused one, once
                already = 2
            else:
                assert len(first) == 2  # nothing more after the abort
                assert sorted(second) == sorted(set(made) - {first[0]})
                already = 1
            (record,) = node.store.exports_of(job.id)
            assert (record.state, record.attempts, record.sent) == ("succeeded", 2, 3)
            assert record.message == f"{already} already sent, {3 - already} sent now"
            assert record.acknowledged == frozenset()  # kept only while not done


class Gated:
    """A pynetdicom storage SCP on loopback that, in its first association, holds its
    answer to the second instance until ``gate`` is set (a slow PACS, or one that hangs);
    ``holding`` is set when it does. It records the SOP Instance UIDs each association
    carried."""

    def __init__(self) -> None:
        self.associations: list[list[str]] = []
        self.gate = threading.Event()
        self.holding = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[int, int] = {}

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            index = self._seen.setdefault(id(event.assoc), len(self._seen))
            if index == len(self.associations):
                self.associations.append([])
            self.associations[index].append(uid)
            hold = index == 0 and len(self.associations[0]) == 2
        if hold:
            self.holding.set()
            self.gate.wait(120)  # the test opens it; the bound only ends a broken test
        return 0x0000

    @contextlib.contextmanager
    def running(self, port: int) -> Iterator[Gated]:
        ae = AE(ae_title="SLOW")
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        try:
            yield self
        finally:
            self.gate.set()
            server.shutdown()


async def test_each_destination_is_recorded_as_it_settles_and_a_stop_resumes_from_there(
        tmp_path: Path) -> None:
    """Three destinations: a folder, a slow PACS and a second folder. While the PACS
    holds its answer to the second object, the store already records the first folder
    done, the object the PACS acknowledged, and the second folder pending, and the
    status shows them and the results (they were recorded only when the pass ended: a
    node that died then sent everything to every destination again at its next start).
    The node stops: the export stops before the next object, the destination cut short
    keeps what it acknowledged and its attempts, and the next start sends the PACS only
    what it lacks and the first folder nothing."""
    from rest.inference import export_entries, status_body

    port = free_port()
    share, share2 = tmp_path / "share", tmp_path / "share2"
    settings = _node(tmp_path, [{"name": "share", "type": "folder", "path": str(share)},
                                _dimse("slow", port, backoff_s=0.2),
                                {"name": "share2", "type": "folder", "path": str(share2)}])
    settings = settings.model_copy(update={"pipelines": [
        p.model_copy(update={"outputs": ["sr", "sc", "encapsulated_pdf"]})
        for p in settings.pipelines]})
    with Gated().running(port) as pacs:
        async with running_node(settings) as node:
            job = await _submit(node, tmp_path, 1, ["share", "slow", "share2"])
            while not pacs.holding.is_set():  # no time limit: pytest-timeout guards
                await asyncio.sleep(0.05)
            first_uid = pacs.associations[0][0]
            records = {x.destination: x for x in node.store.exports_of(job.id)}
            assert (records["share"].state, records["share"].attempts) == ("succeeded", 1)
            assert (records["slow"].state, records["slow"].attempts,
                    records["slow"].acknowledged) == ("sending", 0, frozenset({first_uid}))
            assert records["share2"].state == "pending"
            body = status_body(node.store.get_job(job.id),
                               export_entries(node.store.exports_of(job.id)))
            assert body["status"] == "InProgress"
            assert [(x["destination"], x["state"]) for x in body["exports"]] == [
                ("share", "succeeded"), ("slow", "sending"), ("share2", "pending")]
            assert body["results"] and body["results"][0]["study"]

            assert node.scheduler is not None
            await node.scheduler.stop(grace_s=0)  # as the grace period ends: re-queued
            assert node.store.get_job(job.id).state is JobState.QUEUED
            pacs.gate.set()  # the object in flight is answered; no other one is sent
            while node.store.exports_of(job.id)[1].state != "retrying":
                await asyncio.sleep(0.05)
            assert len(pacs.associations) == 1 and len(pacs.associations[0]) == 2
            slow = node.store.exports_of(job.id)[1]
            assert slow.attempts == 0  # cut short by the stop: not a failed attempt
            assert slow.acknowledged == frozenset(pacs.associations[0])
            assert node.store.exports_of(job.id)[2].state == "pending"  # not tried
            assert not share2.exists()
        (share / job.id).rename(tmp_path / "share-first")  # a re-send would show

        async with running_node(settings) as node:
            job = await _finished(node, job)
            assert job.state is JobState.SUCCEEDED, job.error
            made = {str(a.sop_instance_uid) for a in node.store.artifacts_of(job.id)
                    if a.sop_instance_uid}
            assert len(made) == 3
            first, second = pacs.associations
            assert second == sorted(made - set(first))  # only what it lacked
            assert not share.exists() or not any(share.iterdir())  # sent once, not again
            assert (share2 / job.id).is_dir()
            records = {x.destination: x for x in node.store.exports_of(job.id)}
            assert (records["slow"].state, records["slow"].attempts, records["slow"].message
                    ) == ("succeeded", 1, "2 already sent, 1 sent now")
            assert (records["share"].state, records["share"].attempts) == ("succeeded", 1)
