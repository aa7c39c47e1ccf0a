"""Study assembly: group received instances per called AE title (or drop folder) into jobs.

A group (called AE title + study, or + series) is complete when every association
that fed it has been released (when the AE title says ``complete_on_release``),
or after ``timeout_s`` without a new instance, whichever comes first. An
instance arriving for a group that already completed starts a new group, so it
becomes a later job and is never lost. Everything here runs on the asyncio loop;
the SCP's threads reach it only through :meth:`Assembler.instance_received` and
:meth:`Assembler.association_ended`, which hop over with ``call_soon_threadsafe``.

Drop folders (``dicom_node.watch``) feed the same path through
:meth:`Assembler.watched_instance`: their grouping, timeout and pipelines come
from the folder's :class:`WatchSettings`, their groups complete on the timeout
only (there is no association to release), and their jobs are ``kind="watch"``
with the folder's ``output_dir`` and ``destinations`` in the input. While a folder
still has inputs it has not taken yet (a file still being copied, or one waiting
to be tried again after a full disk), the watcher holds its groups
(:meth:`Assembler.hold`): their timeout does not complete them, so a study is not
cut into a part and the rest.

A complete group's jobs and the record that its instances are queued go to the
store in one transaction (``queue_group``, the node's
:meth:`~dicom_node.scheduler.Scheduler.submit_group`): a node that dies at any
moment leaves either both or neither, so a restart never queues a group twice.
When that transaction fails (the store is down), the group is tried again with a
growing pause, up to a minute, until the store answers or the assembler stops; its
instances stay pending meanwhile, so a stop leaves them to the next start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dicom_node.config import AETitleSettings, Grouping, Settings, WatchSettings
from dicom_node.logs import get_logger
from dicom_node.scp import AssociationEnd, ReceivedInstance
from dicom_node.store import NewJob

__all__ = ["Assembler", "CompletedGroup", "GroupPolicy", "QueueGroup"]

# How long a group the store refused to queue waits before its next try: doubling
# from the first pause up to the last.
QUEUE_RETRY_FIRST_S = 1.0
QUEUE_RETRY_MAX_S = 60.0

Submit = Callable[[NewJob], Awaitable[Any]]
class QueueGroup(Protocol):
    """Queues a complete group's jobs (possibly none) and records its instances as
    queued, all or nothing. ``again``: an earlier call for this group failed, and may
    have committed before it failed; queue only if its instances are still pending."""

    def __call__(self, news: list[NewJob], group: CompletedGroup, *,
                 again: bool = False) -> Awaitable[Any]: ...


# origin ("ae:<called AE>" or "watch:<name>"), study UID, series UID (series grouping)
GroupKey = tuple[str, str, str | None]


@dataclass(frozen=True)
class GroupPolicy:
    """How one intake (a called AE title or a drop folder) groups instances into jobs."""

    pipelines: tuple[str, ...]
    grouping: Grouping
    timeout_s: float
    complete_on_release: bool = True
    kind: str = "dimse"
    watch: str | None = None  # the drop folder's name
    extra_input: Mapping[str, Any] = field(default_factory=dict)  # merged into job inputs

    @classmethod
    def for_ae(cls, ae: AETitleSettings) -> GroupPolicy:
        """The policy of a called AE title."""
        return cls(tuple(ae.pipelines), ae.grouping, ae.timeout_s, ae.complete_on_release)

    @classmethod
    def for_watch(cls, watch: WatchSettings, output_dir: str) -> GroupPolicy:
        """The policy of a drop folder; its jobs carry ``output_dir`` and ``destinations``."""
        return cls(tuple(watch.pipelines), watch.grouping, watch.timeout_s,
                   complete_on_release=False, kind="watch", watch=watch.name,
                   extra_input={"output_dir": output_dir,
                                "destinations": list(watch.destinations),
                                "watch": watch.name})


@dataclass
class _Group:
    key: GroupKey
    settings: GroupPolicy
    called_ae: str
    calling_ae: str
    instances: dict[str, None] = field(default_factory=dict)  # ordered set of SOP UIDs
    open_associations: set[int] = field(default_factory=set)
    aborted: bool = False
    recovered: bool = False  # found pending at start-up
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True)
class CompletedGroup:
    """A complete group, as handed to the scheduler."""

    called_ae: str
    calling_ae: str
    study_instance_uid: str
    series_instance_uid: str | None
    instances: list[str]
    # "released", "timeout", "recovered", or "shutdown" (an intake that keeps no record)
    reason: str
    completed_at: float  # time.monotonic()
    watch: str | None = None  # the drop folder it came from, if any


class Assembler:
    """Groups instances and submits one job per pipeline of the AE title per complete group."""

    def __init__(
        self,
        settings: Settings,
        submit: Submit,
        *,
        on_complete: Callable[[CompletedGroup], None] | None = None,
        queue_group: QueueGroup | None = None,
    ) -> None:
        """``queue_group`` (the node's) queues a complete group's jobs and records its
        instances as queued in one transaction, so that a restart finds pending only
        what never became jobs. Without it (an intake that keeps no record) each job
        goes to ``submit`` on its own."""
        self.settings = settings
        self._submit = submit
        self._on_complete = on_complete
        self._queue_group = queue_group
        self.log = get_logger("dimse.assembler")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[GroupKey, _Group] = {}
        self._by_association: dict[int, set[GroupKey]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[str, Callable[[], int]] = {}  # per drop folder (see hold)
        self._stopping = asyncio.Event()  # ends the waits of groups the store refused
        self._unqueued = 0  # complete groups the store refused, waiting to try again

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()

    async def stop(self) -> None:
        """Stop assembling, then wait for submits.

        A group still open (no release, no timeout yet) is not complete: its sender may
        still be sending, and a job now would cover part of the study, its rest another
        job later. When the assembler records what it queues (``queue_group``: the
        node's DICOM, STOW-RS and drop-folder intake), its instances stay pending in the
        store and the next start assembles them again, with whatever arrived after this
        stop, as one group. Without such a record a group becomes a job now
        (``shutdown``), as nothing would find it again.
        """
        left = list(self._groups.values()) if self._queue_group is not None else []
        for group in left:
            self._groups.pop(group.key, None)
            if group.timer is not None:
                group.timer.cancel()
            for assoc_id in group.open_associations:
                self._by_association.get(assoc_id, set()).discard(group.key)
        if left:
            self.log.info("groups still open at stop: their instances wait for the next "
                          "start", groups=len(left),
                          instances=sum(len(g.instances) for g in left))
        for key in list(self._groups):
            self._complete(key, "shutdown")
        self._stopping.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._loop = None

    async def __aenter__(self) -> Assembler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def open_groups(self) -> int:
        return len(self._groups)

    @property
    def groups_waiting_for_store(self) -> int:
        """Complete groups whose jobs the store refused to queue, waiting to try again."""
        return self._unqueued

    def hold(self, watch: str, waiting: Callable[[], int] | None) -> None:
        """Hold drop folder ``watch``'s groups while ``waiting()``, the number of inputs
        it has seen and not yet taken, is not 0 (None: no longer).

        When such a group's timeout runs out while ``waiting()`` is not 0, the group is
        not completed: its timeout starts again. A study whose files are held up (still
        being written, or to be tried again after a full disk) is then not cut into a
        job for the part taken and another for the rest. The watcher registers each
        folder at its start. Call on the loop; ``waiting`` runs on the loop.
        """
        if waiting is None:
            self._held.pop(watch, None)
        else:
            self._held[watch] = waiting

    # -- thread-safe entry points ----------------------------------------------------------

    def instance_received(self, inst: ReceivedInstance,
                          policy: GroupPolicy | None = None) -> None:
        """Called from an association thread (or STOW-RS) for every stored instance.

        ``policy`` overrides the called AE title's (STOW-RS makes ``kind="stow"`` jobs);
        ``inst.association_id`` still ties the group to :meth:`association_ended`.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            self.log.warning("instance stored while assembly is stopped; no job made",
                             sop_instance_uid=inst.sop_instance_uid)
            return
        loop.call_soon_threadsafe(self._add, inst, policy)

    def watched_instance(self, inst: ReceivedInstance, policy: GroupPolicy) -> None:
        """Called from a drop folder's worker thread for every instance it stored."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.log.warning("instance stored while assembly is stopped; no job made",
                             sop_instance_uid=inst.sop_instance_uid, watch=policy.watch)
            return
        loop.call_soon_threadsafe(self._add, inst, policy)

    def recover(self, pending: list[tuple[ReceivedInstance, GroupPolicy | None]]) -> int:
        """Group instances that were stored but never became jobs (the node stopped or
        died before their group completed), as they would have been grouped. Their
        groups start open, for their timeout: a sender cut off by the stop sends the
        rest again once the node is back, and that joins the same group (one job for
        the study, not a part and then the rest). Call on the loop, after :meth:`start`.
        Each instance comes with its policy (STOW-RS's), or None for its called AE
        title's. Returns the number of groups."""
        keys: dict[GroupKey, None] = {}
        for inst, policy in pending:
            keys[self._add(inst, policy, associated=False)] = None
        for key in keys:
            self._groups[key].recovered = True
        return len(keys)

    def association_ended(self, end: AssociationEnd) -> None:
        """Called from an association thread when it is released or aborted."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._ended, end)

    # -- on the loop ---------------------------------------------------------------------

    def _settings_for(self, called_ae: str) -> GroupPolicy:
        found = self.settings.ae_title(called_ae)
        return GroupPolicy.for_ae(found if found is not None
                                  else AETitleSettings(ae_title=called_ae))

    def _add(self, inst: ReceivedInstance, policy: GroupPolicy | None = None,
             associated: bool = True) -> GroupKey:
        ae = policy if policy is not None else self._settings_for(inst.called_ae)
        series = inst.series_instance_uid if ae.grouping is Grouping.SERIES else None
        origin = f"watch:{ae.watch}" if ae.watch is not None else f"ae:{inst.called_ae}"
        key: GroupKey = (origin, inst.study_instance_uid, series)
        group = self._groups.get(key)
        if group is None:
            group = _Group(key, ae, inst.called_ae, inst.calling_ae)
            self._groups[key] = group
        group.instances[inst.sop_instance_uid] = None
        # drop-folder and recovered instances come from no association
        if ae.watch is None and associated:
            group.open_associations.add(inst.association_id)
            self._by_association.setdefault(inst.association_id, set()).add(key)
        if group.timer is not None:
            group.timer.cancel()
        assert self._loop is not None
        group.timer = self._loop.call_later(ae.timeout_s, self._timed_out, key)
        return key

    def _timed_out(self, key: GroupKey) -> None:
        group = self._groups.get(key)
        if group is None:
            return
        waiting = self._held.get(group.settings.watch or "")
        if waiting is not None and waiting() > 0:
            assert self._loop is not None
            group.timer = self._loop.call_later(group.settings.timeout_s, self._timed_out, key)
            return
        self._complete(key, "timeout")

    def _ended(self, end: AssociationEnd) -> None:
        for key in self._by_association.pop(end.association_id, set()):
            group = self._groups.get(key)
            if group is None:
                continue
            group.open_associations.discard(end.association_id)
            if not end.released:
                group.aborted = True  # only the timeout completes it now
            elif (group.settings.complete_on_release and not group.open_associations
                  and not group.aborted):
                self._complete(key, "released")

    def _complete(self, key: GroupKey, reason: str) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        for assoc_id in group.open_associations:
            keys = self._by_association.get(assoc_id)
            if keys is not None:
                keys.discard(key)
        _, study, series = key
        policy = group.settings
        if group.recovered and reason == "timeout":
            reason = "recovered"
        done = CompletedGroup(group.called_ae, group.calling_ae, study, series,
                              list(group.instances), reason, time.monotonic(), policy.watch)
        self.log.info("group complete", called_ae=group.called_ae,
                      calling_ae=group.calling_ae, watch=policy.watch,
                      study_uid=study, series_uid=series, instances=len(done.instances),
                      reason=reason, pipelines=list(policy.pipelines))
        if self._on_complete is not None:
            self._on_complete(done)
        if self._queue_group is None:
            for pipeline in policy.pipelines:
                self._spawn(self._make_job(pipeline, done, policy))
        else:
            self._spawn(self._queue(done, policy, self._queue_group))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _queue(self, group: CompletedGroup, policy: GroupPolicy,
                     queue_group: QueueGroup) -> None:
        """Queue every pipeline's job and record the group queued, all or nothing; while
        the store fails, try again (its instances stay pending) until it answers or the
        assembler stops."""
        news = [self._new_job(p, group, policy) for p in policy.pipelines]
        failures = 0
        try:
            while not await self._queued(news, group, queue_group, failures, policy):
                if failures == 0:
                    self._unqueued += 1
                failures += 1
                pause = min(QUEUE_RETRY_MAX_S, QUEUE_RETRY_FIRST_S * 2 ** (failures - 1))
                # Nothing of it was recorded: a stop now leaves its instances pending
                # for the next start to assemble again.
                if await self._stopping_within(pause):
                    return
        finally:
            if failures:
                self._unqueued -= 1

    async def _queued(self, news: list[NewJob], group: CompletedGroup,
                      queue_group: QueueGroup, failures: int, policy: GroupPolicy) -> bool:
        """One try at queuing a group; False (logged) when the store refused it."""
        try:
            await queue_group(news, group, again=failures > 0)
        except Exception:
            where = dict(watch=policy.watch, study_uid=group.study_instance_uid,
                         pipelines=list(policy.pipelines), tries=failures + 1)
            if failures == 0:
                self.log.exception("cannot queue the jobs of a complete group; its "
                                   "instances stay pending, trying again", **where)
            else:
                self.log.warning("still cannot queue the jobs of a complete group", **where)
            return False
        if failures:
            self.log.info("queued the jobs of a complete group after the store answered "
                          "again", study_uid=group.study_instance_uid, tries=failures + 1)
        return True

    async def _stopping_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _new_job(self, pipeline: str, group: CompletedGroup, policy: GroupPolicy) -> NewJob:
        payload: dict[str, Any] = {
            "instances": group.instances,
            "study_instance_uid": group.study_instance_uid,
            # every pipeline this intake feeds the group to: a job whose pipeline cannot
            # read the study fails only when none of them can (else it skips it)
            "intake_pipelines": list(policy.pipelines),
            # how long the intake waits for more of a group: how long a study that
            # stopped arriving may still be completed by another group
            "group_timeout_s": policy.timeout_s,
        }
        if group.series_instance_uid is not None:
            payload["series_instance_uid"] = group.series_instance_uid
        payload.update(policy.extra_input)
        return NewJob(pipeline=pipeline, kind=policy.kind, input=payload,
                      study_instance_uid=group.study_instance_uid,
                      called_ae=group.called_ae or None, calling_ae=group.calling_ae or None)

    async def _make_job(self, pipeline: str, group: CompletedGroup,
                        policy: GroupPolicy) -> bool:
        new = self._new_job(pipeline, group, policy)
        try:
            await self._submit(new)
        except Exception:
            # The instances are stored; a person can re-run the study from the store.
            self.log.exception("cannot queue the job for a complete group",
                               pipeline=pipeline, study_uid=group.study_instance_uid)
            return False
        return True
