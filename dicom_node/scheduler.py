"""The scheduler: a priority queue over the store, worker slots, retries, cancel, recovery.

The store is the source of truth. Workers claim the most urgent runnable job
with a conditional update, run it in a worker thread (never on the event loop,
never in a DIMSE handler), and record every state change. At start-up, jobs
that this node was running when it died are queued again.

A job goes ``queued → [retrieving →] running → exporting → succeeded``, or to
``failed``/``cancelled``. The work itself is done by a :class:`JobHandler`, so
the scheduler can be tested with a test handler before the pipeline exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import structlog
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import ExecutorSettings
from dicom_node.errors import Conflict, DeferJob, JobCancelled, NotFound, PermanentJobError
from dicom_node.logs import get_logger
from dicom_node.memory import release_free_memory
from dicom_node.store import (
    ACTIVE_STATES,
    EXPORT_FAILED,
    EXPORT_RETRYING,
    EXPORT_SUCCEEDED,
    PRIORITY_IMMEDIATE,
    ExportRecord,
    Job,
    JobState,
    NewJob,
    Store,
    utcnow,
)
from pipeline.types import Artifact

if TYPE_CHECKING:
    from dicom_node.node import Node

T = TypeVar("T")


@dataclass(frozen=True)
class ExportOutcome:
    """What happened when a job's artifacts were sent to one destination."""

    destination: str
    ok: bool
    attempts: int = 1  # at this destination so far, for the job (all passes)
    sent: int = 0
    message: str | None = None
    # Failed with attempts left: the job is queued again for a pass after this long.
    retry_in_s: float | None = None
    # Settled by an earlier pass (recorded in the store); nothing was sent now.
    recorded: bool = False
    # SOP Instance UIDs the destination has acknowledged, this pass and earlier ones: a
    # later pass sends only the others.
    acknowledged: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ExportProgress:
    """Where a destination stands while a pass is under way: ``pending`` (not yet tried
    in this pass), ``sending`` (with what it has acknowledged so far), or ``retrying``
    (the pass stopped before it was done: a cancel, a stopping node). ``attempts`` counts
    the finished attempts only: one cut short is not counted."""

    destination: str
    state: str
    attempts: int = 0
    sent: int = 0
    message: str | None = None
    acknowledged: frozenset[str] = frozenset()


def export_state(outcome: ExportOutcome) -> str:
    """The state a destination's outcome is recorded with."""
    return (EXPORT_SUCCEEDED if outcome.ok else
            EXPORT_RETRYING if outcome.retry_in_s is not None else EXPORT_FAILED)


@dataclass
class JobContext:
    """What a handler gets for one attempt at a job."""

    job: Job
    store: Store
    # Scratch for this attempt (e.g. a DICOMweb download before it is stored); removed
    # when the attempt ends, so nothing may be left here that must outlive it.
    work_dir: Path
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Handler-owned state for this attempt (e.g. the files a retrieval brought in) and
    # what to keep in the job's result (shown by the status APIs).
    data: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    # The job's exports so far, by destination (earlier passes, earlier runs): one that
    # succeeded is never sent to again.
    exported: dict[str, ExportRecord] = field(default_factory=dict)
    # Outcomes of this attempt's export pass not yet in the store (it failed while they
    # were recorded): recorded before the job is queued again, so that a destination
    # that got the results is not sent them a second time.
    unrecorded: list[ExportOutcome] = field(default_factory=list)
    # Outcomes of this pass that ``export_settled`` took (recorded, or kept in
    # ``unrecorded``): the scheduler does not record them a second time.
    settled: list[ExportOutcome] = field(default_factory=list)
    _set_state: Callable[[JobState, str | None], None] | None = None

    @property
    def log(self) -> Any:
        return get_logger("job", job_id=self.job.id, study_uid=self.job.study_instance_uid)

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when a cancel was requested; call between steps."""
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job.id} was cancelled")

    def publish(self, **values: Any) -> None:
        """Record progress in the job's result now, so status requests can show it."""
        self.result.update(values)
        self.store.update_result(self.job.id, self.result, token=self.job.lease_token)

    def export_settled(self, outcome: ExportOutcome) -> None:
        """Record one destination's outcome of the pass at once, before the next
        destination is tried: a node that dies (or stops) later in the pass must not send
        that destination the results again. Called from the export's thread. When the
        store fails, the outcome waits in ``unrecorded`` (recorded before the job is
        queued again, see ``Scheduler._requeue_when_possible``); never raises."""
        self.settled.append(outcome)
        if outcome.recorded:
            return
        if self.unrecorded:  # the store failed for an earlier one: keep their order
            self.unrecorded.append(outcome)
            return
        try:
            self.store.record_export(self.job.id, outcome.destination, export_state(outcome),
                                     outcome.attempts, outcome.sent, outcome.message,
                                     outcome.acknowledged)
        except Exception as exc:
            self.log.warning("cannot record an export outcome yet; it is recorded once the "
                             "store answers", destination=outcome.destination,
                             error=f"{type(exc).__name__}: {exc}")
            self.unrecorded.append(outcome)

    def export_progress(self, progress: ExportProgress) -> None:
        """Record where a destination stands in the pass (see :class:`ExportProgress`):
        what it acknowledged so far is not sent again after a crash, and status requests
        show it. Best effort: the outcome is recorded in any case; never raises."""
        if self.unrecorded:  # the store failed: the outcomes come first
            return
        try:
            self.store.record_export(self.job.id, progress.destination, progress.state,
                                     progress.attempts, progress.sent, progress.message,
                                     progress.acknowledged)
        except Exception as exc:
            self.log.warning("cannot record an export's progress",
                             destination=progress.destination,
                             error=f"{type(exc).__name__}: {exc}")

    def set_state(self, state: JobState, message: str | None = None) -> None:
        """Record a stage change (e.g. ``retrieving`` → ``running``)."""
        if self._set_state is not None:
            self._set_state(state, message)


class JobHandler(Protocol):
    """Does a job's work. Methods run in a worker thread and may block."""

    def needs_retrieval(self, job: Job) -> bool:
        """Whether the job's input must be fetched before it runs."""
        ...

    def retrieve(self, ctx: JobContext) -> None:
        """Fetch the job's input (C-MOVE, C-GET, WADO-RS)."""
        ...

    def run(self, ctx: JobContext) -> list[Artifact]:
        """Run the pipeline; raise PermanentJobError for input that can never work."""
        ...

    def export(self, ctx: JobContext, artifacts: list[Artifact]) -> list[ExportOutcome]:
        """One export pass: send the artifacts once to each of the job's destinations
        that ``ctx.exported`` does not record as done; an outcome with ``retry_in_s``
        asks for another pass then (the job is queued meanwhile, holding no worker)."""
        ...


HandlerFactory = Callable[["Node"], JobHandler]


def load_handler(node: Node) -> JobHandler:
    """Build the handler named by ``executor.runner`` (``module:factory``) for ``node``."""
    module_name, _, attr = node.settings.executor.runner.partition(":")
    module = importlib.import_module(module_name)
    factory: HandlerFactory = getattr(module, attr)
    return factory(node)


# After the grace period, how long a stopping node waits for the cancelled jobs' threads
# to end the step in hand (a peer's answer to the object in flight) and record it.
STOP_JOIN_S = 10.0


class _DaemonPool:
    """Worker threads that never keep the process alive.

    A job still running after the shutdown grace period is re-queued in the store;
    its thread must not block the interpreter's exit (ThreadPoolExecutor's would).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._count = 0
        self._live: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = loop.create_future()

        def target() -> None:
            try:
                result = fn()
            except BaseException as exc:  # delivered to the awaiting task
                deliver: Callable[[], object] = functools.partial(_set_exception, fut, exc)
            else:
                deliver = functools.partial(_set_result, fut, result)
            finally:
                with self._lock:
                    self._live.discard(threading.current_thread())
            # A job abandoned at shutdown may finish after the loop closed: nobody waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver)

        self._count += 1
        thread = threading.Thread(target=target, name=f"{self._name}-{self._count}",
                                  daemon=True)
        with self._lock:
            self._live.add(thread)
        thread.start()
        return fut

    def join(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` in all for the threads still running; how many are
        left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            live = list(self._live)
        for thread in live:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return len(self._live)


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class _OutcomeNotRecorded(Exception):
    """The store failed while an export pass's outcomes were recorded: not a failure of
    the job, which is queued again once they are recorded (Scheduler._run)."""


class _StoreTrouble:
    """Logs a failing store once with its traceback, then a line a minute at most, and
    once when it answers again: a store down for an hour wrote a traceback a second
    (onto the disk that was full)."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.since: float | None = None
        self.last = 0.0
        self.lock = threading.Lock()

    def report(self, log: Any, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self.lock:
            first = self.since is None
            if first:
                self.since = now
            elif now - self.last < self.every_s:
                return
            self.last = now
            since = self.since
        if first:
            log.error(what, exc_info=exc)
        else:
            log.error(f"{what} (the store has failed for {now - (since or now):.0f} s)",
                      error=f"{type(exc).__name__}: {exc}")

    def cleared(self, log: Any) -> None:
        with self.lock:
            since, self.since = self.since, None
        if since is not None:
            log.info("the store answers again", after_s=round(time.monotonic() - since, 1))


_PYDICOM_TAG_PREFIX = re.compile(r"^With tag \([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\) got exception: ")


DISK_FULL_RETRY_S = 30.0  # a job that filled a disk tries again this often (uncounted)


def _disk_full(exc: BaseException) -> OSError | None:
    """The disk-out-of-space (or quota) error ``exc`` is or was caused by, if any."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain, not a cycle
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def failure_message(exc: BaseException) -> str:
    """One line for a job's history from an unexpected error: a person reads it in `jobs
    show` and the APIs. pydicom's write errors carry a whole traceback in their text,
    and SQLAlchemy's the SQL statement with its parameters."""
    if isinstance(exc, SQLAlchemyError):
        cause = str(getattr(exc, "orig", None) or exc).splitlines()
        return "the job store failed: " + (cause[0] if cause else type(exc).__name__)
    lines = str(exc).splitlines()
    text = _PYDICOM_TAG_PREFIX.sub("", lines[0]) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Scheduler:
    """Runs queued jobs in ``workers`` slots until stopped."""

    def __init__(
        self,
        store: Store,
        handler: JobHandler,
        settings: ExecutorSettings,
        owner: str,
        work_root: Path,
        paused: Callable[[], str | None] | None = None,
        node_name: str | None = None,
    ) -> None:
        """``paused``: why no job should start now (the results' disk is full), or None.
        ``node_name``: the node's name (default: ``owner`` up to its ``#``); it claims
        only jobs without a home or whose home it is (see ``Store.claim_next``)."""
        self.store = store
        self.node_name = node_name or owner.rpartition("#")[0] or owner
        self.paused = paused
        self._pause: str | None = None  # the reason logged when the pause began
        self.handler = handler
        self.settings = settings
        self.owner = owner
        self.work_root = work_root
        self.log = get_logger("scheduler")
        self._pool = _DaemonPool("job")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, tuple[JobContext, asyncio.Task[None]]] = {}
        self._trouble = _StoreTrouble()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await asyncio.to_thread(self._alive)
        requeued = await asyncio.to_thread(self.store.requeue_interrupted, self.owner)
        for job_id in requeued:
            self.log.warning("job interrupted by a restart; queued again", job_id=job_id)
        await asyncio.to_thread(self._sweep_work_dirs)
        self._stopping = False
        self._workers = [
            asyncio.create_task(self._worker(), name=f"worker-{i}")
            for i in range(self.settings.workers)
        ]
        if self.settings.immediate_slot:
            self._workers.append(asyncio.create_task(
                self._worker(PRIORITY_IMMEDIATE), name="worker-immediate"))
        self._workers.append(asyncio.create_task(self._keeper(), name="lease-keeper"))
        self.log.info("scheduler started", workers=self.settings.workers,
                      immediate_slot=self.settings.immediate_slot, requeued=len(requeued))

    def stop_claiming(self) -> None:
        """Start no more jobs: the workers finish the job in hand and exit. The first
        step of a stopping node, long before :meth:`stop` gives the grace period: a job
        started while the rest of the node closes would only be cut off."""
        self._stopping = True
        self.notify()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming; let running jobs finish within the grace period, else re-queue them."""
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        self.stop_claiming()
        # Workers finish the job in hand (also one claimed just now) and then exit.
        workers = [w for w in self._workers if w.get_name() != "lease-keeper"]
        if self._running:
            self.log.info("waiting for running jobs", count=len(self._running), grace_s=grace)
        if workers:
            await asyncio.wait(workers, timeout=grace)
        abandoned = 0
        for job_id, (ctx, task) in list(self._running.items()):
            if task.done():
                continue
            abandoned += 1
            # Queue it again first, which ends its lease: only then ask the thread to stop,
            # or it could record its own end ("cancelled") before the re-queue landed.
            try:
                if await asyncio.to_thread(
                    self.store.transition, job_id, JobState.QUEUED, token=ctx.job.lease_token,
                    message="node stopped before the job finished; queued again",
                    uncount_attempt=True,  # as after a crash: restarts must not use up retries
                ):
                    self.log.warning("job re-queued at shutdown", job_id=job_id)
            except Exception as exc:  # its lease runs out instead; it runs at the next start
                self.log.warning("could not queue a job again as the node stopped",
                                 job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            finally:
                # The thread stops (an export before its next object or destination); with
                # its lease gone it cannot change the job, only record what it sent.
                ctx.cancelled.set()
            task.cancel()
        if abandoned:
            # The cancelled threads end the step in hand (an export's object in flight
            # gets its answer) and record it while the store is still open: an answer
            # recorded after the store closed was lost, and the object sent again.
            left = await asyncio.to_thread(self._pool.join, STOP_JOIN_S)
            if left:
                self.log.warning("job threads still busy as the node stops; what they do "
                                 "now is not recorded", threads=left)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self.log.info("scheduler stopped")

    def notify(self) -> None:
        """Wake idle workers; safe from any thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    async def submit(self, new: NewJob) -> Job:
        job = await asyncio.to_thread(self.store.create_job, new)
        self.log.info("job queued", job_id=job.id, pipeline=job.pipeline, priority=job.priority)
        self.notify()
        return job

    async def submit_group(self, news: list[NewJob], sop_instance_uids: list[str], *,
                           watch: str | None = None, only_pending: bool = False
                           ) -> list[Job]:
        """Queue a complete group's jobs and record its instances as queued, in one
        transaction (see :meth:`Store.create_group_jobs`)."""
        jobs = await asyncio.to_thread(self.store.create_group_jobs, news, sop_instance_uids,
                                       watch=watch, only_pending=only_pending)
        for job in jobs:
            self.log.info("job queued", job_id=job.id, pipeline=job.pipeline,
                          priority=job.priority)
        if jobs:
            self.notify()
        return jobs

    async def cancel(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.request_cancel, job_id)
        entry = self._running.get(job_id)
        if entry is not None:
            entry[0].cancelled.set()
        return job

    @property
    def running_jobs(self) -> list[str]:
        return list(self._running)

    # -- workers -------------------------------------------------------------------------

    async def _worker(self, min_priority: int = 0) -> None:
        """Claim and run jobs of ``min_priority`` or more, one at a time, until stopping."""
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()
            if self._waiting_for_space():
                await self._idle()
                continue
            try:
                job = await asyncio.to_thread(
                    self.store.claim_next, self.owner, self.settings.lease_s, self._first_state,
                    min_priority, self.node_name,
                )
                self._trouble.cleared(self.log)
            except Exception as exc:
                self._trouble.report(self.log, "cannot claim a job; will try again", exc)
                job = None
            if job is None:
                await self._idle()
                continue
            if self._stopping:  # claimed as the node began to stop: the next start runs it
                await self._unclaim(job)
                break
            ctx = JobContext(job=job, store=self.store, work_dir=self.work_root / job.id)
            ctx._set_state = self._state_setter(job)
            if job.cancel_requested:  # asked for while its last pass was ending
                ctx.cancelled.set()
            task = asyncio.create_task(self._run(ctx), name=f"job-{job.id}")
            self._running[job.id] = (ctx, task)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
            except Exception:  # _run handles its own; a worker must outlive any job
                self.log.exception("job ended with an unexpected error", job_id=job.id)
            finally:
                self._running.pop(job.id, None)
            await asyncio.to_thread(release_free_memory)  # see dicom_node.memory

    def _waiting_for_space(self) -> bool:
        """True while ``paused`` says no job should start; logged when it begins and ends."""
        why = self.paused() if self.paused is not None else None
        if why and self._pause is None:
            self.log.warning("jobs wait: the disk of the results is short of space",
                             reason=why)
        elif not why and self._pause is not None:
            self.log.info("jobs run again: the disk of the results has space")
        self._pause = why
        return why is not None

    def _sweep_work_dirs(self) -> None:
        """Remove scratch folders a crash left behind, except those of jobs running elsewhere."""
        if not self.work_root.is_dir():
            return
        for folder in self.work_root.iterdir():
            if not folder.is_dir():
                continue
            try:
                running = self.store.get_job(folder.name).state in ACTIVE_STATES
            except NotFound:
                running = False
            if not running:
                shutil.rmtree(folder, ignore_errors=True)

    def _first_state(self, job: Job) -> JobState:
        if self._recorded_artifacts(job.id):
            return JobState.EXPORTING  # its results are made: only their export is left
        return JobState.RETRIEVING if self.handler.needs_retrieval(job) else JobState.RUNNING

    def _recorded_artifacts(self, job_id: str) -> list[Artifact]:
        """The artifacts the job's last run recorded on reaching export, when each is
        still on disk; [] when there are none or one is gone (the job runs again)."""
        by_path = {Path(r.path): Artifact(r.kind, Path(r.path), r.media_type,
                                          r.sop_instance_uid)
                   for r in self.store.artifacts_of(job_id)}  # once each, also from old stores
        made = list(by_path.values())
        return made if made and all(a.path.is_file() for a in made) else []

    async def _idle(self) -> None:
        assert self._wake is not None
        timeout = self.settings.poll_interval_s
        try:
            due = await asyncio.to_thread(self.store.next_due)
        except Exception as exc:
            self._trouble.report(self.log, "cannot read when the next job is due", exc)
            due = None
        if due is not None:
            timeout = max(0.01, min(timeout, (due - utcnow()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _keeper(self) -> None:
        """Renew leases, pick up cancel requests made by other processes (the CLI), and
        queue again the jobs whose lease ran out: a node sharing the database died (or
        hangs) with them, and nothing else would run them until a node restarts."""
        interval = max(0.2, min(self.settings.lease_s / 3, self.settings.poll_interval_s))
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.settings.lease_s / 2
        next_alive = loop.time() + self.settings.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                # Only the jobs a worker here runs: a job no worker holds any more (its
                # outcome could not be recorded) must see its lease run out, so that
                # requeue_expired below gives it back to the queue.
                leases = await asyncio.to_thread(
                    self.store.renew_leases, self.owner, self.settings.lease_s,
                    list(self._running),
                )
                if loop.time() >= next_alive:
                    next_alive = loop.time() + self.settings.lease_s / 3
                    await asyncio.to_thread(self._alive)
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.settings.lease_s / 2
                    expired = await asyncio.to_thread(self.store.requeue_expired)
                    for job_id in expired:
                        self.log.warning("job's lease ran out (its node stopped renewing "
                                         "it); queued again", job_id=job_id)
                    if expired:
                        self.notify()
            except Exception as exc:
                self._trouble.report(self.log, "cannot renew job leases", exc)
                continue
            for job_id, cancel in leases:
                entry = self._running.get(job_id)
                if cancel and entry is not None and not entry[0].cancelled.is_set():
                    self.log.info("cancel requested", job_id=job_id)
                    entry[0].cancelled.set()

    def _alive(self) -> None:
        """Tell the nodes sharing the database that this one runs (see
        ``Store.node_alive``); renewed like a lease. SQLite: one machine, nobody to tell,
        except while the store's last write failed: this write then tells /health when
        the store takes writes again (an idle node wrote nothing else, and stayed 503)."""
        if self.store.dialect != "sqlite" or self.store.writes.problem() is not None:
            self.store.node_alive(self.node_name, self.settings.lease_s)

    def _state_setter(self, job: Job) -> Callable[[JobState, str | None], None]:
        def set_state(state: JobState, message: str | None) -> None:
            self.store.transition(job.id, state, token=job.lease_token, message=message)

        return set_state

    async def _in_thread(self, ctx: JobContext, fn: Callable[[], T]) -> T:
        """Run a step of the job in a worker thread, its log lines bound to the job."""
        assert self._loop is not None
        job = ctx.job

        def bound() -> T:
            with structlog.contextvars.bound_contextvars(job_id=job.id):
                return fn()

        return await self._pool.submit(self._loop, bound)

    async def _run(self, ctx: JobContext) -> None:
        job = ctx.job
        log = ctx.log.bind(pipeline=job.pipeline, attempt=job.attempts)
        log.info("job started", state=(await asyncio.to_thread(self.store.get_job, job.id))
                 .state.value)
        try:
            await self._attempt(ctx, log)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store failed while the attempt's outcome was being recorded (a full disk,
            # a database restart): the job is still ours and "running". It is queued again
            # as soon as the store answers, and this worker goes on with the queue.
            log.exception("the job's outcome could not be recorded; it is queued again "
                          "once the store answers")
            await self._requeue_when_possible(job, log, ctx.unrecorded)
        finally:
            await asyncio.to_thread(shutil.rmtree, ctx.work_dir, True)

    async def _unclaim(self, job: Job) -> None:
        try:
            await asyncio.to_thread(
                self.store.transition, job.id, JobState.QUEUED, token=job.lease_token,
                uncount_attempt=True, message="claimed as the node stopped; queued again")
        except Exception as exc:  # its lease runs out instead, and it is queued again then
            self.log.warning("could not queue a job again as the node stopped",
                             job_id=job.id, error=str(exc))

    async def _requeue_when_possible(self, job: Job, log: Any,
                                     unrecorded: list[ExportOutcome]) -> None:
        """Give ``job`` back to the queue, trying until the store takes it or the node
        stops (a stopping node's job is queued again at the next start); first the
        export outcomes of its pass that the store did not take (``unrecorded``)."""
        delay = 1.0
        while not self._stopping:
            try:
                await self._record_exports(job, unrecorded)
                if not await asyncio.to_thread(
                        self.store.transition, job.id, JobState.QUEUED,
                        token=job.lease_token, uncount_attempt=True,
                        message="the store failed while the job's outcome was recorded; "
                                "queued again"):
                    log.warning("job not queued again: its lease was lost")
                else:
                    log.warning("job queued again after the store failed")
                    self.notify()
                return
            except Exception as exc:
                self._trouble.report(log, "cannot queue the job again yet", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _attempt(self, ctx: JobContext, log: Any) -> None:
        job = ctx.job
        token = job.lease_token
        try:
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
            if job.state is JobState.EXPORTING:
                # Queued again for an export pass, retried after a failed export or
                # interrupted while exporting: the results it made are recorded and on
                # disk, so they are sent on as they are (no retrieval, no new run).
                produced = await asyncio.to_thread(self._recorded_artifacts, job.id)
                if not produced:
                    raise RuntimeError("the job's results are no longer on disk")
                ctx.result.update(job.result or {})
                log.info("export resumed", artifacts=len(produced))
            else:
                if self.handler.needs_retrieval(job):
                    await self._in_thread(ctx, lambda: self.handler.retrieve(ctx))
                    ctx.check_cancelled()
                    await asyncio.to_thread(self.store.transition, job.id, JobState.RUNNING,
                                            token=token, message="input retrieved")
                produced = await self._in_thread(ctx, lambda: self.handler.run(ctx))
                ctx.check_cancelled()
                # The artifacts replace any an earlier run recorded, with the state change.
                if not await asyncio.to_thread(self.store.start_export, job.id, produced,
                                               token=token,
                                               message=f"{len(produced)} artifacts"):
                    log.warning("job outcome not recorded: its lease was lost",
                                outcome=JobState.EXPORTING.value)
                    return
                # What the run made is shown while the results are sent (the status
                # APIs read the job's result; it was written only when the pass ended).
                try:
                    await asyncio.to_thread(self.store.update_result, job.id,
                                            {**ctx.result, "artifacts": len(produced)},
                                            token=token)
                except Exception as exc:  # progress only: the pass's end records it
                    self._trouble.report(log, "cannot record the job's results yet", exc)
            ctx.check_cancelled()
            ctx.exported = {x.destination: x for x in
                            await asyncio.to_thread(self.store.exports_of, job.id)}
            ctx.unrecorded, ctx.settled = [], []
            outcomes = await self._in_thread(ctx, lambda: self.handler.export(ctx, produced))
            # A handler records each destination's outcome as it settles (export_settled);
            # what it did not is recorded now.
            ctx.unrecorded += [o for o in outcomes if not o.recorded
                               and not any(o is s for s in ctx.settled)]
            try:
                await self._record_exports(job, ctx.unrecorded)
            except Exception as exc:
                # The results went out; the store failed, not the job (see _run).
                raise _OutcomeNotRecorded(str(exc)) from exc
            ctx.check_cancelled()  # a cancel during the pass: nothing more is sent
        except (asyncio.CancelledError, _OutcomeNotRecorded):
            raise
        except JobCancelled:
            await self._finish(job, JobState.CANCELLED, "cancelled", log)
            return
        except PermanentJobError as exc:
            await self._finish(job, JobState.FAILED, str(exc), log, result=ctx.result or None)
            return
        except DeferJob as exc:
            when = utcnow() + timedelta(seconds=exc.delay_s)
            await asyncio.to_thread(self.store.transition, job.id, JobState.QUEUED,
                                    token=job.lease_token, message=str(exc), not_before=when,
                                    uncount_attempt=True)
            log.info("job deferred", reason=str(exc), run_in_s=round(exc.delay_s, 1))
            self.notify()
            return
        except Exception as exc:
            if ctx.cancelled.is_set() and (await asyncio.to_thread(
                    self.store.get_job, job.id)).cancel_requested:
                await self._finish(job, JobState.CANCELLED, "cancelled", log)
                return
            if (full := _disk_full(exc)) is not None:
                await self._wait_for_space(job, full, log)
                return
            await self._failed_attempt(job, exc, log)
            return
        result = {**ctx.result, "artifacts": len(produced)}
        waiting = [o for o in outcomes if o.retry_in_s is not None]
        if waiting:
            await self._export_later(job, waiting, log, result)
            return
        failed = [o for o in outcomes if not o.ok]
        if failed:
            msg = "; ".join(f"export to {o.destination} failed: {o.message}" for o in failed)
            await self._finish(job, JobState.FAILED, msg, log, result=result)
        else:
            result["exports"] = len(outcomes)
            outcome = ctx.result.get("outcome")  # the handler's summary, when it gave one
            await self._finish(job, JobState.SUCCEEDED, str(outcome or "done"), log,
                               result=result)

    async def _record_exports(self, job: Job, unrecorded: list[ExportOutcome]) -> None:
        """Record each outcome, removing it from ``unrecorded`` once the store took it
        (a failure leaves the rest there for the next try)."""
        while unrecorded:
            o = unrecorded[0]
            await asyncio.to_thread(self.store.record_export, job.id, o.destination,
                                    export_state(o),
                                    o.attempts, o.sent, o.message, o.acknowledged)
            unrecorded.pop(0)

    async def _export_later(self, job: Job, waiting: list[ExportOutcome], log: Any,
                            result: dict[str, Any]) -> None:
        """Queue the job for its next export pass, when the first destination that failed
        is due again; the worker is free meanwhile, and the pass does not count as an
        attempt of the job (each destination counts its own)."""
        delay = min(o.retry_in_s or 0.0 for o in waiting)
        msg = "; ".join(f"export to {o.destination} failed: {o.message}" for o in waiting)
        await asyncio.to_thread(
            self.store.transition, job.id, JobState.QUEUED, token=job.lease_token,
            message=f"{msg}; next export attempt in {delay:g} s",
            not_before=utcnow() + timedelta(seconds=delay), uncount_attempt=True,
            result=result)
        log.warning("export pending; job queued for its next export attempt",
                    destinations=[o.destination for o in waiting], retry_in_s=delay)
        if (await asyncio.to_thread(self.store.get_job, job.id)).cancel_requested:
            # cancelled as the pass ended: it ends now, not at its next pass
            with contextlib.suppress(Conflict):
                await asyncio.to_thread(self.store.request_cancel, job.id)
            return
        self.notify()

    async def _finish(
        self, job: Job, state: JobState, message: str, log: Any,
        result: dict[str, Any] | None = None,
    ) -> None:
        ok = await asyncio.to_thread(self.store.transition, job.id, state,
                                     token=job.lease_token, message=message, result=result)
        if not ok:
            log.warning("job outcome not recorded: its lease was lost", outcome=state.value)
        elif state is JobState.SUCCEEDED:
            log.info("job succeeded")
        elif state is JobState.CANCELLED:
            log.info("job cancelled")
        else:
            log.error("job failed", error=message)

    async def _wait_for_space(self, job: Job, exc: OSError, log: Any) -> None:
        """A disk filled while the job wrote (above storage.min_free_mb, or with the check
        off): it waits for space like a job under the reserve, its attempt not counted.
        It was retried five times in 40 s and failed for good, and nothing ran it again
        once space was freed."""
        message = (f"a disk is full ({failure_message(exc)}): the job waits for space; "
                   f"next try in {DISK_FULL_RETRY_S:g} s")
        await asyncio.to_thread(
            self.store.transition, job.id, JobState.QUEUED, token=job.lease_token,
            message=message, not_before=utcnow() + timedelta(seconds=DISK_FULL_RETRY_S),
            uncount_attempt=True)
        log.warning("job waits: a disk is full", error=failure_message(exc),
                    retry_in_s=DISK_FULL_RETRY_S)
        self.notify()

    async def _failed_attempt(self, job: Job, exc: Exception, log: Any) -> None:
        message = failure_message(exc)
        retry = self.settings.retry
        if job.attempts >= min(job.max_attempts, retry.max_attempts):
            await self._finish(job, JobState.FAILED,
                               f"{message} (gave up after {job.attempts} attempts)", log)
            return
        delay = retry.delay_after(job.attempts)
        when = utcnow() + timedelta(seconds=delay)
        await asyncio.to_thread(self.store.transition, job.id, JobState.QUEUED,
                                token=job.lease_token, message=message, not_before=when)
        log.warning("job attempt failed; will retry", error=message, retry_in_s=delay)
        self.notify()
