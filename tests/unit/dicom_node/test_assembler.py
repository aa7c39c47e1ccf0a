"""Study assembly on the event loop: grouping, completion and jobs (no network)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from dicom_node.assembler import Assembler, CompletedGroup
from dicom_node.config import AETitleSettings, Settings
from dicom_node.scp import AssociationEnd, ReceivedInstance
from dicom_node.store import NewJob
from pipeline.settings import ModelSpec, PipelineSpec


def settings(**ae: object) -> Settings:
    return Settings(
        ae_titles=[
            AETitleSettings(**{"ae_title": "AI", "pipelines": ["p1", "p2"], "timeout_s": 0.2,
                               **ae}),
            AETitleSettings(ae_title="STORE"),
        ],
        models=[ModelSpec(name="m", path=Path("unused"))],
        pipelines=[PipelineSpec(name="p1", model="m", task="classify"),
                   PipelineSpec(name="p2", model="m", task="segment")],
        watch=[],
    )


def inst(n: int, assoc: int = 1, study: str = "1.2.3", series: str = "1.2.3.1",
         called: str = "AI") -> ReceivedInstance:
    return ReceivedInstance(f"1.2.3.9.{n}", "1.2.840.10008.5.1.4.1.1.2", study, series,
                            Path(f"/x/{n}.dcm"), called, "CT1", assoc)


class Jobs:
    def __init__(self) -> None:
        self.jobs: list[NewJob] = []
        self.at: list[float] = []
        self.queued: list[CompletedGroup] = []  # groups queued through queue_group

    async def submit(self, new: NewJob) -> None:
        self.jobs.append(new)
        self.at.append(time.monotonic())

    async def queue_group(self, news: list[NewJob], group: CompletedGroup, *,
                          again: bool = False) -> None:
        """As the node's: a group's jobs and its record, all at once."""
        self.jobs.extend(news)
        self.at.extend(time.monotonic() for _ in news)
        self.queued.append(group)


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


async def test_release_completes_the_study_one_job_per_pipeline() -> None:
    jobs = Jobs()
    async with Assembler(settings(timeout_s=30), jobs.submit) as asm:
        for i in range(3):
            asm.instance_received(inst(i))
        asm.instance_received(inst(3, series="1.2.3.2"))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
        await settle()
        assert asm.open_groups == 0
    assert [j.pipeline for j in jobs.jobs] == ["p1", "p2"]
    job = jobs.jobs[0]
    assert job.kind == "dimse" and job.study_instance_uid == "1.2.3"
    assert job.called_ae == "AI" and job.calling_ae == "CT1"
    assert job.input == {"instances": [f"1.2.3.9.{i}" for i in range(4)],
                         "study_instance_uid": "1.2.3", "intake_pipelines": ["p1", "p2"],
                         "group_timeout_s": 30.0}


async def test_timeout_completes_without_release() -> None:
    jobs = Jobs()
    async with Assembler(settings(), jobs.submit) as asm:
        asm.instance_received(inst(1))
        await settle(0.6)
        assert len(jobs.jobs) == 2
        assert asm.open_groups == 0


async def test_no_release_completion_when_disabled() -> None:
    jobs = Jobs()
    async with Assembler(settings(complete_on_release=False, timeout_s=30), jobs.submit) as asm:
        asm.instance_received(inst(1))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
        await settle()
        assert jobs.jobs == [] and asm.open_groups == 1
    # stop() hands open groups over rather than dropping them
    assert len(jobs.jobs) == 2


async def test_late_instance_starts_a_new_group() -> None:
    jobs = Jobs()
    async with Assembler(settings(timeout_s=30), jobs.submit) as asm:
        asm.instance_received(inst(1, assoc=1))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
        await settle()
        asm.instance_received(inst(2, assoc=2))
        asm.association_ended(AssociationEnd(2, "AI", "CT1", released=True))
        await settle()
    assert [j.input["instances"] for j in jobs.jobs if j.pipeline == "p1"] == [
        ["1.2.3.9.1"], ["1.2.3.9.2"]]


async def test_group_fed_by_two_associations_waits_for_both() -> None:
    jobs = Jobs()
    async with Assembler(settings(timeout_s=30), jobs.submit) as asm:
        asm.instance_received(inst(1, assoc=1))
        asm.instance_received(inst(2, assoc=2))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
        await settle()
        assert jobs.jobs == []
        asm.association_ended(AssociationEnd(2, "AI", "CT1", released=True))
        await settle()
        assert len(jobs.jobs[0].input["instances"]) == 2


async def test_aborted_association_completes_on_timeout_only() -> None:
    jobs = Jobs()
    async with Assembler(settings(), jobs.submit) as asm:
        asm.instance_received(inst(1))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=False))
        await settle()
        assert jobs.jobs == []
        await settle(0.6)
        assert len(jobs.jobs) == 2


async def test_series_grouping_names_the_series() -> None:
    jobs = Jobs()
    async with Assembler(settings(grouping="series", timeout_s=30), jobs.submit) as asm:
        asm.instance_received(inst(1, series="1.2.3.1"))
        asm.instance_received(inst(2, series="1.2.3.2"))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
        await settle()
    p1 = sorted((j.input["series_instance_uid"], j.input["instances"])
                for j in jobs.jobs if j.pipeline == "p1")
    assert p1 == [("1.2.3.1", ["1.2.3.9.1"]), ("1.2.3.2", ["1.2.3.9.2"])]


async def test_ae_title_without_pipelines_only_stores() -> None:
    jobs = Jobs()
    done: list[CompletedGroup] = []
    async with Assembler(settings(), jobs.submit, on_complete=done.append) as asm:
        asm.instance_received(inst(1, called="STORE"))
        asm.association_ended(AssociationEnd(1, "STORE", "CT1", released=True))
        await settle()
    assert jobs.jobs == [] and len(done) == 1


async def test_release_to_queued_for_a_300_instance_study(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Instances arrive from a foreign thread, as from the SCP; prints the latency."""
    jobs = Jobs()
    async with Assembler(settings(timeout_s=30), jobs.submit) as asm:
        released: list[float] = []

        def association() -> None:
            for i in range(300):
                asm.instance_received(inst(i))
            released.append(time.monotonic())
            asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))

        t = threading.Thread(target=association)
        t.start()
        await asyncio.to_thread(t.join)
        while len(jobs.jobs) < 2:
            await settle(0.005)
    assert len(jobs.jobs[0].input["instances"]) == 300
    with capsys.disabled():
        print(f"\n300-instance study: release -> jobs queued in "
              f"{(max(jobs.at) - released[0]) * 1000:.1f} ms (target 200 ms)")


async def test_instances_after_stop_are_not_lost_silently() -> None:
    jobs = Jobs()
    asm = Assembler(settings(), jobs.submit)
    await asm.start()
    await asm.stop()
    asm.instance_received(inst(1))  # logs a warning; the instance is in the store already
    assert asm.open_groups == 0


async def test_drop_folder_groups_use_the_folder_policy() -> None:
    from dicom_node.assembler import GroupPolicy
    from dicom_node.config import WatchSettings

    jobs = Jobs()
    folder = WatchSettings(name="cd", path=Path("cd"), pipelines=["p2"], grouping="series",
                           timeout_s=0.2)
    policy = GroupPolicy.for_watch(folder, "/out/cd")
    async with Assembler(settings(timeout_s=30), jobs.submit,
                         queue_group=jobs.queue_group) as asm:
        for n in (1, 2):
            asm.watched_instance(ReceivedInstance(
                f"1.2.3.9.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.1",
                Path(f"/x/{n}.dcm"), "", "", 0), policy)
        asm.instance_received(inst(3, assoc=0))  # same study over DICOM: a separate group
        asm.association_ended(AssociationEnd(0, "AI", "CT1", released=True))
        await settle()
        assert [j.kind for j in jobs.jobs] == ["dimse", "dimse"]  # the drop folder waits
        await settle(0.5)
    watch_jobs = [j for j in jobs.jobs if j.kind == "watch"]
    assert len(watch_jobs) == 1
    job = watch_jobs[0]
    assert job.pipeline == "p2" and job.called_ae is None and job.calling_ae is None
    assert job.input == {"instances": ["1.2.3.9.1", "1.2.3.9.2"], "study_instance_uid": "1.2.3",
                         "series_instance_uid": "1.2.3.1", "output_dir": "/out/cd",
                         "destinations": [], "watch": "cd", "intake_pipelines": ["p2"],
                         "group_timeout_s": 0.2}
    assert [g.watch for g in jobs.queued if g.watch] == ["cd"]
    assert jobs.queued[-1].reason == "timeout"


async def test_groups_left_pending_by_a_crash_are_recovered_after_their_timeout() -> None:
    """Instances stored before the node died, never queued: grouped as they would have
    been, open for their timeout (what the sender sends again joins them), then
    completed and reported queued."""
    import dataclasses

    from dicom_node.assembler import GroupPolicy

    jobs = Jobs()
    stow = dataclasses.replace(GroupPolicy.for_ae(AETitleSettings(ae_title="AI",
                                                                  pipelines=["p1"])),
                               kind="stow", timeout_s=0.3)
    base = settings(timeout_s=0.3)
    quick = base.model_copy(update={"ae_titles": [base.ae_titles[0], AETitleSettings(
        ae_title="STORE", timeout_s=0.3)]})
    async with Assembler(quick, jobs.submit, queue_group=jobs.queue_group) as asm:
        pending = [(inst(1, assoc=0), None), (inst(2, assoc=0), None),
                   (inst(3, assoc=0, study="1.2.4", called="STORE"), None),
                   (inst(4, assoc=0, study="1.2.5"), stow)]
        assert asm.recover(pending) == 3
        await settle()
        assert asm.open_groups == 3
        asm.instance_received(inst(5, assoc=7))  # the sender sends the rest again
        await settle(0.6)
        assert asm.open_groups == 0
    assert sorted((j.study_instance_uid, j.pipeline, j.kind) for j in jobs.jobs) == [
        ("1.2.3", "p1", "dimse"), ("1.2.3", "p2", "dimse"), ("1.2.5", "p1", "stow")]
    by_study = {g.study_instance_uid: g for g in jobs.queued}
    assert set(by_study) == {"1.2.3", "1.2.4", "1.2.5"}  # STORE has no pipelines: queued too
    assert by_study["1.2.3"].instances == ["1.2.3.9.1", "1.2.3.9.2", "1.2.3.9.5"]
    assert {g.reason for g in jobs.queued} == {"recovered"}


async def test_a_group_is_queued_in_one_call_with_all_its_jobs() -> None:
    """Every pipeline's job and the group go to ``queue_group`` together (the node's
    commits them in one transaction); a failure there is logged, and the assembler goes
    on with the next group."""
    calls: list[tuple[list[str], list[str]]] = []

    async def queue_group(news: list[NewJob], group: CompletedGroup, *,
                          again: bool = False) -> None:
        calls.append(([n.pipeline for n in news], group.instances))
        if len(calls) == 1:
            raise RuntimeError("the store is down")

    async def submit(new: NewJob) -> None:
        raise AssertionError("jobs of a group are never submitted one by one")

    async with Assembler(settings(), submit, queue_group=queue_group) as asm:
        for n, assoc in ((1, 1), (2, 2)):
            asm.instance_received(inst(n, assoc=assoc))
            asm.association_ended(AssociationEnd(assoc, "AI", "CT1", released=True))
            await settle()
    assert calls == [(["p1", "p2"], ["1.2.3.9.1"]), (["p1", "p2"], ["1.2.3.9.2"])]


async def test_groups_still_open_at_stop_stay_pending_when_their_intake_records_it() -> None:
    """A study still arriving when the node stops is not cut into a job: its instances
    stay pending (the node finds them at its next start); one whose intake keeps no
    record still becomes a job."""
    jobs = Jobs()
    async with Assembler(settings(complete_on_release=False, timeout_s=30), jobs.submit,
                         queue_group=jobs.queue_group) as asm:
        asm.instance_received(inst(1))
        asm.instance_received(inst(2))
        await settle()
        assert asm.open_groups == 1
    assert jobs.jobs == [] and jobs.queued == [] and asm.open_groups == 0


async def test_a_drop_folder_with_inputs_still_waiting_holds_its_groups() -> None:
    """While the folder has inputs it has not taken (a file held up by a full disk), its
    groups outlive their timeout; once none wait, they complete as usual. Other
    intakes' groups are not held."""
    from dicom_node.assembler import GroupPolicy
    from dicom_node.config import WatchSettings

    jobs = Jobs()
    waiting = {"cd": 1}
    folder = WatchSettings(name="cd", path=Path("cd"), pipelines=["p2"], timeout_s=0.1)
    policy = GroupPolicy.for_watch(folder, "/out/cd")
    async with Assembler(settings(), jobs.submit, queue_group=jobs.queue_group) as asm:
        asm.hold("cd", lambda: waiting["cd"])
        asm.watched_instance(ReceivedInstance("1.2.3.9.1", "1.2.840.10008.5.1.4.1.1.2",
                                              "1.2.3", "1.2.3.1", Path("/x/1.dcm"), "", "",
                                              0), policy)
        asm.instance_received(inst(2, study="1.2.4"))  # over DICOM: its own timeout (0.2 s)
        while not jobs.queued:
            await settle()
        await settle(0.5)  # several of the folder's timeouts
        assert [g.study_instance_uid for g in jobs.queued] == ["1.2.4"]
        assert asm.open_groups == 1
        waiting["cd"] = 0  # the held-up file was taken (or refused)
        while asm.open_groups:
            await settle()
    assert [(g.study_instance_uid, g.reason) for g in jobs.queued] == [
        ("1.2.4", "timeout"), ("1.2.3", "timeout")]


async def test_a_group_the_store_refused_is_queued_once_it_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store failing at a group's queuing no longer leaves it to the next start: the
    group is tried again, with a growing pause, and says on each retry that an earlier
    try may have committed (``again``); it counts as waiting meanwhile."""
    monkeypatch.setattr("dicom_node.assembler.QUEUE_RETRY_FIRST_S", 0.02)
    tries: list[bool] = []
    store_down = [True]
    jobs = Jobs()

    async def queue_group(news: list[NewJob], group: CompletedGroup, *,
                          again: bool = False) -> None:
        tries.append(again)
        if store_down[0]:
            raise RuntimeError("the store is down")
        await jobs.queue_group(news, group)

    async with Assembler(settings(), jobs.submit, queue_group=queue_group) as asm:
        asm.instance_received(inst(1))
        asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
        while len(tries) < 3:
            await settle(0.01)
        assert asm.groups_waiting_for_store == 1 and jobs.jobs == []
        store_down[0] = False
        while not jobs.queued:
            await settle(0.01)
        assert asm.groups_waiting_for_store == 0
    assert tries[:2] == [False, True] and all(tries[1:])
    assert [j.pipeline for j in jobs.jobs] == ["p1", "p2"]
    assert [g.instances for g in jobs.queued] == [["1.2.3.9.1"]]


async def test_a_stop_ends_the_wait_of_a_group_the_store_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping does not wait out a refused group's pause (up to a minute); its
    instances stay pending for the next start."""
    monkeypatch.setattr("dicom_node.assembler.QUEUE_RETRY_FIRST_S", 3600.0)
    tries: list[bool] = []

    async def queue_group(news: list[NewJob], group: CompletedGroup, *,
                          again: bool = False) -> None:
        tries.append(again)
        raise RuntimeError("the store is down")

    asm = Assembler(settings(), Jobs().submit, queue_group=queue_group)
    await asm.start()
    asm.instance_received(inst(1))
    asm.association_ended(AssociationEnd(1, "AI", "CT1", released=True))
    while not tries:
        await settle(0.01)
    await asyncio.wait_for(asm.stop(), 10)
    assert tries == [False] and asm.groups_waiting_for_store == 0
