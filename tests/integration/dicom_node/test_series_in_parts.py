"""A CT series pushed in several associations gets one result made from the whole series.

A node runs the real ct-organs pipeline (the demo model) on a small synthetic CT sent
with dcmtk ``storescu``: in two parts, in two parts with a gap in the first, and one
slice per association. Before, each part's group became a job that ran on its part
only (two conflicting result sets), or, for parts too small to run, was skipped (no
result at all).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dicom_node.node import Node
from dicom_node.store import Job, Store
from tests.integration.dicom_node.test_watch import wait_until
from tests.support.dicom_factory import make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port, storescu

pytestmark = pytest.mark.timeout(240)

ORGANS = Path(__file__).resolve().parents[3] / "pipeline" / "models" / "ct-organs"


def _settings(tmp_path: Path, timeout_s: float = 1.0) -> Any:
    return node_settings(
        tmp_path / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        ae_titles=[{"ae_title": "DICOMNODE", "pipelines": ["ct-organs"],
                    "timeout_s": timeout_s}],
        models=[{"name": "ct-organs", "path": str(ORGANS), "warmup": False}],
        pipelines=[{"name": "ct-organs", "model": "ct-organs", "task": "segment",
                    "series": {"modalities": ["CT"], "min_instances": 8},
                    "outputs": ["json"]}],
        executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.05,
                  "grace_period_s": 5, "workers": 2},
    )


def _jobs(store: Store) -> list[Job]:
    return sorted((j for j in store.list_jobs(None, 10_000) if j.kind == "dimse"),
                  key=lambda j: j.created_at)


async def _all_final(store: Store, n: int) -> list[Job]:
    def done() -> bool:
        jobs = _jobs(store)
        return len(jobs) == n and all(j.state.final for j in jobs)
    await wait_until(done)
    return _jobs(store)


def _ran(job: Job) -> bool:
    return bool(job.result and job.result.get("results"))


def _send(node: Node, files: list[Path]) -> None:
    storescu(node.settings.dimse.port, files, "DICOMNODE", "MODALITY")


async def test_a_part_sent_after_its_first_part_ran_supersedes_it(tmp_path: Path) -> None:
    """The reviewer's case: the first half runs (it is all there is), then the second
    half comes. Its job runs on the whole series and says that it supersedes the first
    job's result; the first job's history says it was superseded."""
    study = make_ct_study(tmp_path / "src", seed="two-parts", slices=16, size=32)
    async with running_node(_settings(tmp_path)) as node:
        store = node.store
        assert store is not None
        await asyncio.to_thread(_send, node, study.paths[:8])
        (first,) = await _all_final(store, 1)
        assert first.state.value == "succeeded", first.error
        assert _ran(first) and first.result is not None
        assert first.result["whole_series"]["instances"] == 8

        await asyncio.to_thread(_send, node, study.paths[8:])
        first, second = await _all_final(store, 2)
        assert second.state.value == "succeeded", second.error
        assert second.result is not None and _ran(second)
        assert second.result["whole_series"] == {
            "series": study.series_uids, "instances": 16, "from_group": 8,
            "from_other_groups": 8, "supersedes": [first.id]}
        assert sorted(second.result["read"]) == sorted(study.sop_uids)
        outcome = store.events(second.id)[-1].message or ""
        assert outcome.startswith("ran on 16 instances of the series: 8 from this group, "
                                  "8 received in other groups; supersedes the result of "
                                  f"job {first.id}"), outcome
        assert any((e.message or "").startswith(f"superseded: job {second.id} ran on the "
                                                "whole series (16 instances)")
                   for e in store.events(first.id))


async def test_two_parts_back_to_back_give_one_whole_series_result(tmp_path: Path) -> None:
    """Two associations one after the other: whichever job runs first waits for the
    study to be quiet and runs on all of it; the other one's part was read by that run,
    so it ends skipped, naming it (no second result set)."""
    study = make_ct_study(tmp_path / "src", seed="back-to-back", slices=16, size=32)
    async with running_node(_settings(tmp_path, timeout_s=3.0)) as node:
        store = node.store
        assert store is not None
        await asyncio.to_thread(_send, node, study.paths[:8])
        await asyncio.to_thread(_send, node, study.paths[8:])
        jobs = await _all_final(store, 2)
        assert all(j.state.value == "succeeded" for j in jobs), [j.error for j in jobs]
        ran = [j for j in jobs if _ran(j)]
        assert len(ran) == 1, [store.events(j.id)[-1].message for j in jobs]
        (whole,) = ran
        assert whole.result is not None
        assert whole.result["whole_series"]["instances"] == 16
        (other,) = [j for j in jobs if j is not whole]
        assert other.result is not None and other.result.get("covered_by") == whole.id
        assert (store.events(other.id)[-1].message or "").startswith(
            "skipped: all 8 instance(s) of this group were read by job "
            f"{whole.id}'s run on the whole series (16 instances)")


async def test_the_missing_slices_sent_later_run_on_the_whole_series(tmp_path: Path) -> None:
    """A series sent with a gap fails on it; the missing slices, sent as the message
    says, make a job that runs on the whole series (before: on those slices alone)."""
    study = make_ct_study(tmp_path / "src", seed="gap-then-rest", slices=20, size=32)
    missing = set(range(6, 14))
    async with running_node(_settings(tmp_path)) as node:
        store = node.store
        assert store is not None
        await asyncio.to_thread(_send, node, [p for i, p in enumerate(study.paths)
                                              if i not in missing])
        (first,) = await _all_final(store, 1)
        assert first.state.value == "failed"
        assert f"dicom-node jobs retry {first.id}" in (first.error or "")

        await asyncio.to_thread(_send, node, [study.paths[i] for i in sorted(missing)])
        first, rest = await _all_final(store, 2)
        assert rest.state.value == "succeeded", rest.error
        assert rest.result is not None and _ran(rest)
        assert rest.result["whole_series"] == {
            "series": study.series_uids, "instances": 20, "from_group": 8,
            "from_other_groups": 12}  # the failed run's results went nowhere
        # a retry of the failed job now finds its instances read by that run
        await asyncio.to_thread(store.retry, first.id)
        assert node.scheduler is not None
        node.scheduler.notify()
        await wait_until(lambda: store.get_job(first.id).state.final)
        again = store.get_job(first.id)
        assert again.state.value == "succeeded" and not _ran(again)
        assert again.result is not None and again.result.get("covered_by") == rest.id


async def test_one_slice_per_association_gives_one_run_on_the_whole_series(
        tmp_path: Path) -> None:
    """A modality that sends each instance in its own association: every release
    completes a group of one slice. The series is one run on all of it; every other job
    ends skipped, naming that run (before: every job skipped, and no result at all)."""
    study = make_ct_study(tmp_path / "src", seed="one-per-association", slices=12, size=32)
    async with running_node(_settings(tmp_path, timeout_s=3.0)) as node:
        store = node.store
        assert store is not None
        for path in study.paths:  # storescu once per file: one association each
            await asyncio.to_thread(_send, node, [path])
        jobs = await _all_final(store, 12)
        assert all(j.state.value == "succeeded" for j in jobs), [j.error for j in jobs]
        ran = [j for j in jobs if _ran(j)]
        assert len(ran) == 1, [store.events(j.id)[-1].message for j in jobs]
        (whole,) = ran
        assert whole.result is not None
        assert whole.result["whole_series"]["instances"] == 12
        assert sorted(whole.result["read"]) == sorted(study.sop_uids)
        for job in jobs:
            if job is not whole:
                assert job.result is not None and job.result.get("covered_by") == whole.id


async def test_a_series_sent_again_after_its_run_runs_again(tmp_path: Path) -> None:
    """A whole series sent a second time (a deliberate resend) is not what the first
    run read: it runs again, and says that it supersedes the first result."""
    study = make_ct_study(tmp_path / "src", seed="sent-again", slices=10, size=32)
    async with running_node(_settings(tmp_path)) as node:
        store = node.store
        assert store is not None
        await asyncio.to_thread(_send, node, study.paths)
        (first,) = await _all_final(store, 1)
        assert first.state.value == "succeeded" and _ran(first), first.error
        assert (store.events(first.id)[-1].message or "") == "done"  # nothing to say

        await asyncio.to_thread(_send, node, study.paths)
        first, again = await _all_final(store, 2)
        assert again.state.value == "succeeded" and _ran(again), again.error
        assert again.result is not None
        assert again.result["whole_series"]["supersedes"] == [first.id]


def _other_series(study: Any, tmp_path: Path, n: int) -> list[Path]:
    """``n`` slices of ``study`` as a second series of it (as a reformat is): new series
    and instance UIDs, a later series number."""
    import pydicom
    from pydicom.uid import generate_uid

    series_uid, out = generate_uid(), []
    (tmp_path / "other").mkdir()
    for i, path in enumerate(study.paths[:n]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 99
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(tmp_path / "other" / f"{i}.dcm")
        ds.save_as(out[-1])
    return out


async def test_the_rest_of_a_series_the_pipeline_does_not_read_supersedes_nothing(
        tmp_path: Path) -> None:
    """A probe's case: the axial series and part of a second series in one association,
    the rest of the second series later. The later job claimed to run on "the whole
    series" and to supersede the axial result, with the second series' volumes. The
    pipeline reads one series of the study (the axial, ranked first): the axial run
    covers it, and the later job is skipped, saying so."""
    study = make_ct_study(tmp_path / "src", seed="axial-and-other", slices=16, size=32)
    other = _other_series(study, tmp_path, 10)
    async with running_node(_settings(tmp_path)) as node:
        store = node.store
        assert store is not None
        await asyncio.to_thread(_send, node, [*study.paths, *other[:6]])
        (first,) = await _all_final(store, 1)
        assert first.result is not None and _ran(first), first.error
        assert sorted(first.result["read"]) == sorted(study.sop_uids)  # the axial only
        await asyncio.to_thread(_send, node, other[6:])
        first, second = await _all_final(store, 2)
        outcome = store.events(second.id)[-1].message or ""
        assert not _ran(second) and second.state.value == "succeeded", outcome
        assert outcome == (f"skipped: job {first.id} ran on the whole series this pipeline "
                           "reads (16 instances); 0 of this group's 4 instance(s) are of "
                           "it, the rest of series it does not read")
        assert not any((e.message or "").startswith("superseded")
                       for e in store.events(first.id))


async def test_a_series_sent_to_two_ae_titles_in_parts_runs_whole_for_each(
        tmp_path: Path) -> None:
    """A probe's case: half the series to AI2, the whole to AI1, the other half to AI2.
    The store keeps one record an instance, naming the last AE title it came to, so
    AI2's second job found only its own half and ran on it: AI2 exported two half-series
    results and never a whole one. Now it runs on the whole series the node holds."""
    study = make_ct_study(tmp_path / "src", seed="two-aes", slices=16, size=32)
    settings = _settings(tmp_path)
    settings = settings.model_copy(update={"ae_titles": [
        *settings.ae_titles, settings.ae_titles[0].model_copy(update={"ae_title": "AI2"})]})
    async with running_node(settings) as node:
        store = node.store
        assert store is not None
        port = node.settings.dimse.port
        await asyncio.to_thread(storescu, port, study.paths[:8], "AI2", "MODALITY")
        await _all_final(store, 1)
        await asyncio.to_thread(storescu, port, study.paths, "DICOMNODE", "MODALITY")
        await _all_final(store, 2)
        await asyncio.to_thread(storescu, port, study.paths[8:], "AI2", "MODALITY")
        jobs = await _all_final(store, 3)
        ai2 = [j for j in jobs if j.called_ae == "AI2"]
        last = ai2[-1]
        assert last.result is not None and _ran(last), last.error
        assert last.result["whole_series"]["instances"] == 16
        assert last.result["whole_series"]["supersedes"] == [ai2[0].id]
        assert "made from part of it" in (store.events(last.id)[-1].message or "")
