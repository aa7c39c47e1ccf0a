"""The composition root: builds every service from the settings and runs them in one loop.

Each long-lived part starts and stops as a pair inside one ``AsyncExitStack``:
parts stop in reverse order (intake first, then the scheduler with its grace
period, then the store), and a part that failed to start is not stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dicom_node import __version__, retention, runtime_config, serve_lock
from dicom_node.assembler import Assembler, CompletedGroup, GroupPolicy
from dicom_node.config import Settings
from dicom_node.disk import short_of_space
from dicom_node.errors import Conflict, NodeError
from dicom_node.logs import get_logger
from dicom_node.scheduler import Scheduler, load_handler
from dicom_node.scp import InstanceWriter, ReceivedInstance, StorageSCP
from dicom_node.scu import DicomClient
from dicom_node.secrets import ensure_jwt_secret, read_jwt_secret
from dicom_node.store import SCHEMA_VERSION, NewJob, Store
from dicom_node.tls import TlsFileError
from dicom_node.watch import Watcher

HTTP_SHUTDOWN_S = 15.0

if TYPE_CHECKING:
    from pipeline.runner import PipelineRunner
    from rest.auth import Authenticator
    from rest.connections import ConnectionGuard


class Node:
    """One running node. ``await node.run()`` until a signal or ``request_stop()``."""

    def __init__(self, settings: Settings, *, freeze_startup_objects: bool = False) -> None:
        """``freeze_startup_objects``: once started, exempt what start-up built from the
        garbage collector (``gc.freeze``); for a process that runs one node (``serve``)."""
        self.file_settings = settings  # as loaded; runtime config objects apply on top
        self.freeze_startup_objects = freeze_startup_objects
        self.settings = settings
        self.settings_listeners: list[Callable[[Settings], None]] = []
        self.log = get_logger("node", node=settings.node_name)
        self.store: Store | None = None
        self.scheduler: Scheduler | None = None
        self.runner: PipelineRunner | None = None
        self.assembler: Assembler | None = None
        self.scp: StorageSCP | None = None
        self.watch: Watcher | None = None  # drop folders
        self.dicom: DicomClient | None = None  # C-ECHO / export / retrieval for other parts
        self.http_connections: ConnectionGuard | None = None  # the HTTP server's, while up
        self.parts: dict[str, str] = {}
        self.lock: serve_lock.ServeLock | None = None  # held while the node runs
        self._stop = asyncio.Event()
        self._signals = 0
        self.started = asyncio.Event()
        # Stored config API objects left out at start because they do not validate:
        # shown by the API as invalid until a PUT fixes or a DELETE removes them.
        self.config_skipped: list[runtime_config.SkippedObject] = []
        # One runtime config change at a time: each builds on the settings the last one
        # left, so ten changes at once must not each start from the same old settings.
        self._config_lock = asyncio.Lock()

    def authenticator(self) -> Authenticator:
        """Checks HTTP credentials against this node's secret, public key and API keys."""
        from rest.auth import Authenticator

        auth = self.settings.auth
        secret = None
        if "HS256" in auth.algorithms:
            secret = read_jwt_secret(self.settings.jwt_secret_file)
        public = self.settings.path(auth.jwt_public_key_file) if auth.jwt_public_key_file \
            else None
        return Authenticator(auth, secret, public)

    async def change_config(self, kind: str, name: str, body: dict[str, Any] | None, *,
                            create: bool = False) -> Settings:
        """Validate, persist and apply one runtime config change; tell the listeners."""
        assert self.store is not None
        async with self._config_lock:
            invalid = self.invalid_config(kind, name)
            live = name in runtime_config.objects_of(self.settings, kind)
            if invalid is not None and create:
                raise Conflict(f"{kind} {name!r} already exists (stored, but invalid: not "
                               "in force); use PUT to fix it or DELETE to remove it")
            if invalid is not None and not live and body is None:
                new = self.settings  # not in force: nothing depends on it
            else:
                # not in force, PUT: checked as a new object would be
                new = runtime_config.change(self.settings, kind, name, body,
                                            create=create or (invalid is not None and not live))
            stored = None if body is None else runtime_config.objects_of(new, kind)[name]
            await asyncio.to_thread(self.store.put_config_object, kind, name, stored)
            rest = [o for o in self.config_skipped if (o.kind, o.name) != (kind, name)]
            new, self.config_skipped = runtime_config.reapply(new, rest)
            self.settings = new
            for listener in self.settings_listeners:
                listener(new)
        self.log.info("configuration changed", kind=kind, name=name,
                      action="create" if create else "delete" if body is None else "update")
        return new

    def invalid_config(self, kind: str, name: str) -> runtime_config.SkippedObject | None:
        """The stored object ``kind``/``name`` when it was left out as invalid."""
        return next((o for o in self.config_skipped if (o.kind, o.name) == (kind, name)),
                    None)

    def dicom_client(self) -> DicomClient:
        """The DIMSE client (with the SCP when it runs, so C-MOVE to ourselves works)."""
        if self.dicom is not None:
            return self.dicom
        return DicomClient(self.settings, self.store, None)

    def instance_writer(self) -> InstanceWriter:
        """Places instances that arrive by other ways (STOW-RS, WADO-RS, drop folders)."""
        if self.scp is not None:
            return self.scp.writer
        assert self.store is not None
        return InstanceWriter(self.settings, self.store)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # SIGHUP too (a closed terminal or SSH session): it killed the node on the spot,
        # without a log line or the grace period for running jobs.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, self._on_signal, sig)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._part("lock", self._lock()))
            await stack.enter_async_context(self._part("store", self._store()))
            for warning in self.settings.warnings():  # with the runtime config applied
                self.log.warning("configuration: " + warning)
            await stack.enter_async_context(self._part("secrets", self._secrets()))
            await stack.enter_async_context(self._part("models", self._models()))
            await stack.enter_async_context(self._part("scheduler", self._scheduler()))
            # After the scheduler, so that on the way out DICOM intake stops first and the
            # assembler then hands its open groups to a scheduler that is still running.
            await stack.enter_async_context(self._part("assembler", self._assembler()))
            if self.settings.storage.retention_days is not None:
                await stack.enter_async_context(self._part("retention", self._retention()))
            # Drop folders feed the assembler: started after it, stopped before it.
            await stack.enter_async_context(self._part("watch", self._watch()))
            await stack.enter_async_context(self._part("dicom", self._dicom()))
            if self.settings.rest.enabled:
                await stack.enter_async_context(self._part("http", self._http()))
            if self.freeze_startup_objects:
                # Models, libraries and the app live as long as the node; pynetdicom forces
                # a full collection every 60 turns of its accept loop (every 30 s when
                # idle), and walking those ~360k objects held every thread for 70-100 ms.
                gc.collect()
                gc.freeze()
            self.log.info("node started", version=__version__, schema=SCHEMA_VERSION,
                          dicom_port=self.settings.dimse.port,
                          http_port=self.settings.rest.port,
                          data_dir=str(self.settings.data_dir.resolve()))
            self.started.set()
            await self._stop.wait()
            self.log.info("stopping: intake first, then running jobs")
            # At once, not when the unwinding reaches them: HTTP closes first and waits
            # for its requests, and meanwhile the DICOM port took studies and the workers
            # started queued jobs that the grace period then cut off.
            if self.scp is not None:
                await asyncio.to_thread(self.scp.stop_listening)
            if self.scheduler is not None:
                self.scheduler.stop_claiming()
        self.log.info("node stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("second signal: exiting now; running jobs are re-queued at start")
            os._exit(1)
        self.log.info("signal received; stopping", signal=sig.name)
        if sig is signal.SIGHUP:
            self.log.info("SIGHUP stops the node like SIGTERM; settings are read at start, "
                          "so restart it to apply a changed file")
        self._stop.set()

    @asynccontextmanager
    async def _part(self, name: str, cm: Any) -> AsyncIterator[None]:
        self.parts[name] = "starting"
        try:
            await cm.__aenter__()
        except BaseException:
            self.parts[name] = "failed"
            raise
        self.parts[name] = "running"
        try:
            yield
        finally:
            self.parts[name] = "stopping"
            try:
                await cm.__aexit__(None, None, None)
            finally:
                self.parts[name] = "stopped"

    # -- parts ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _lock(self) -> AsyncIterator[None]:
        """One ``serve`` per data directory (see dicom_node.serve_lock)."""
        lock = await asyncio.to_thread(serve_lock.acquire, self.settings.data_dir,
                                       self.settings.node_name)
        self.lock = lock
        try:
            yield
        finally:
            self.lock = None
            lock.release()

    @asynccontextmanager
    async def _store(self) -> AsyncIterator[None]:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = await asyncio.to_thread(Store(self.settings.database_url).open)
        self.store = store
        if store.migrated is not None:
            found, now = store.migrated
            if found:
                self.log.warning("store schema upgraded", from_version=found, to_version=now,
                                 note="one way: older versions of dicom-node now refuse "
                                 "this store")
            else:
                self.log.info("store schema created", version=now)
        settings, count, skipped = await asyncio.to_thread(runtime_config.with_stored,
                                                           self.file_settings, store)
        self.config_skipped = skipped
        if count:
            self.settings = settings
            self.log.info("runtime configuration applied", objects=count,
                          skipped=len(skipped))
        try:
            yield
        finally:
            await asyncio.to_thread(store.close)

    @asynccontextmanager
    async def _secrets(self) -> AsyncIterator[None]:
        path = self.settings.jwt_secret_file
        _, created = await asyncio.to_thread(ensure_jwt_secret, path)
        if created:
            self.log.info("created a JWT secret (mode 0600); `dicom-node token` reads it",
                          path=str(path.resolve()))
        yield

    @asynccontextmanager
    async def _models(self) -> AsyncIterator[None]:
        from pipeline.runner import PipelineRunner

        runner = PipelineRunner(self.settings.models, self.settings.pipelines,
                                self.settings.model_path)
        await asyncio.to_thread(runner.start)  # loads and warms every model
        for name, problem in runner.failed.items():
            self.log.error("model failed to load; its pipelines will fail", model=name,
                           error=problem)
        for name, problem in runner.mismatched().items():
            self.log.error("pipeline does not suit its model; its jobs will fail",
                           pipeline=name, error=problem)
        if self.settings.models:
            self.log.info("models ready", models=[m.name for m in self.settings.models],
                          failed=sorted(runner.failed))
        self.runner = runner
        try:
            yield
        finally:
            await asyncio.to_thread(runner.close)

    @asynccontextmanager
    async def _retention(self) -> AsyncIterator[None]:
        """Sweep expired studies and results now and every ``storage.retention_check_s``."""
        assert self.store is not None
        store = self.store

        stop = threading.Event()  # seen by the sweep's thread
        stopping = asyncio.Event()  # wakes the wait between sweeps

        async def loop() -> None:
            while not stop.is_set():
                try:
                    await asyncio.to_thread(retention.sweep, self.settings, store, stop=stop)
                except Exception:  # a failed sweep is retried next time; the node goes on
                    self.log.exception("retention sweep failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(),
                                           self.settings.storage.retention_check_s)

        self.log.info("retention on", days=self.settings.storage.retention_days,
                      check_every_s=self.settings.storage.retention_check_s)
        task = asyncio.create_task(loop(), name="retention")
        try:
            yield
        finally:
            stop.set()  # a sweep under way ends after its current study
            stopping.set()
            await task

    @asynccontextmanager
    async def _scheduler(self) -> AsyncIterator[None]:
        assert self.store is not None and self.lock is not None
        owner = self.lock.owner(self.settings.node_name)
        await self._warn_of_namesakes(owner)
        handler = load_handler(self)
        results = self.settings.results_dir
        scheduler = Scheduler(self.store, handler, self.settings.executor,
                              owner=owner, work_root=results / "work",
                              paused=lambda: short_of_space(self.settings, results))
        await scheduler.start()
        self.scheduler = scheduler
        try:
            yield
        finally:
            await scheduler.stop()

    async def _warn_of_namesakes(self, owner: str) -> None:
        """Another live node with our node_name on this store (several machines sharing a
        database, each with its own data directory): its jobs stay its own, but logs and
        job histories cannot tell the two apart.

        A lease held by the bare node name is not a namesake's: versions before the
        ``<node_name>#<id>`` owners wrote that, and it is this node's dead predecessor's
        (an upgrade after a crash); the scheduler takes those jobs back at start."""
        assert self.store is not None
        name = self.settings.node_name
        leases = await asyncio.to_thread(self.store.live_lease_owners)
        namesakes = {o: n for o, n in leases.items()
                     if o != owner and o.startswith(f"{name}#")}
        if namesakes:
            self.log.warning("another node with this node_name holds live jobs in the "
                             "store; they are left to it. Give each node sharing a "
                             "database its own node_name", node_name=name,
                             lease_owners=sorted(namesakes), jobs=sum(namesakes.values()))

    @asynccontextmanager
    async def _assembler(self) -> AsyncIterator[None]:
        assert self.scheduler is not None
        assembler = Assembler(self.settings, self.scheduler.submit,
                              queue_group=self._queue_group)
        async with assembler:
            self.assembler = assembler
            await self._recover_groups(assembler)
            self.settings_listeners.append(self._update_assembler)
            try:
                yield
            finally:
                self.settings_listeners.remove(self._update_assembler)

    async def _queue_group(self, news: list[NewJob], group: CompletedGroup, *,
                           again: bool = False) -> None:
        """A complete group (DICOM, STOW-RS or drop folder): its jobs and the record that
        its instances (and drop-folder inputs) are no longer pending, in one commit."""
        assert self.scheduler is not None
        await self.scheduler.submit_group(news, group.instances, watch=group.watch,
                                          only_pending=again)

    async def _recover_groups(self, assembler: Assembler) -> None:
        """Instances acknowledged before the last stop whose group never became jobs (a
        study still arriving at a stop, or the node died, or its store failed, first) are
        grouped again before intake opens; each group becomes jobs after its timeout,
        with what its sender sends again meanwhile.

        Only this node's instances (several nodes on one database: another node's study
        may still be arriving there, and its files are on that node's disk). With
        ``storage.shared`` also those of a node that is not alive any more, once they
        have waited twice its longest group timeout or lease. From here on, what this
        process stores is recorded as received by this node (intake opens after)."""
        assert self.store is not None
        settings = self.settings
        self.store.serve_as(settings.node_name, shared_storage=settings.storage.shared)
        lease_s = settings.executor.lease_s
        longest = max([lease_s, settings.stow_ae().timeout_s,
                       *(a.timeout_s for a in settings.ae_titles)])
        pending = await asyncio.to_thread(
            self.store.recoverable_instances, settings.node_name, alive_s=lease_s,
            take_over_after_s=2 * longest if settings.storage.shared else None)
        if not pending:
            return
        stow = self.settings.stow_ae()
        stow_policy = dataclasses.replace(GroupPolicy.for_ae(stow), kind="stow")
        received = [(ReceivedInstance(r.sop_instance_uid, r.sop_class_uid,
                                      r.study_instance_uid, r.series_instance_uid, r.path,
                                      r.called_ae, r.calling_ae, association_id=0),
                     stow_policy if r.source == "stow" else None)
                    for r in pending]
        groups = assembler.recover(received)
        self.log.warning("instances received before the last stop had no job yet; "
                         "assembled again", instances=len(received), groups=groups)

    def _update_assembler(self, settings: Settings) -> None:
        """A live AE title change (timeout, pipelines, grouping) applies to new groups."""
        if self.assembler is not None:
            self.assembler.settings = settings
        if self.scp is not None:
            self.scp.settings = settings
            self.scp._sources = {s.name: s for s in settings.sources}

    @asynccontextmanager
    async def _watch(self) -> AsyncIterator[None]:
        assert self.store is not None and self.assembler is not None
        watcher = Watcher(self.settings, self.store, self.assembler)
        async with watcher:
            self.watch = watcher
            try:
                yield
            finally:
                self.watch = None

    @asynccontextmanager
    async def _dicom(self) -> AsyncIterator[None]:
        assert self.store is not None and self.assembler is not None
        scp = StorageSCP(self.settings, self.store,
                         on_instance=self.assembler.instance_received,
                         on_association_end=self.assembler.association_ended)
        dimse = self.settings.dimse
        try:
            with _naming_the_port("DICOM", dimse.host, dimse.port):
                await asyncio.to_thread(scp.start)
        except TlsFileError as exc:  # checked with the settings; changed since
            raise NodeError(f"dimse.tls.{exc}") from None
        self.scp = scp
        self.dicom = DicomClient(self.settings, self.store, scp)
        try:
            yield
        finally:
            self.dicom = None
            await asyncio.to_thread(scp.stop)

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[None]:
        from rest.app import create_app
        from rest.connections import ConnectionGuard

        rest = self.settings.rest
        # Requests in hand get HTTP_SHUTDOWN_S to finish when the node stops (aiohttp's
        # default, 60 s, let one slow upload hold the whole shutdown past systemd's 90 s)
        runner = web.AppRunner(create_app(self), access_log=None, handle_signals=False,
                               shutdown_timeout=HTTP_SHUTDOWN_S)
        await runner.setup()
        guard = ConnectionGuard(rest.max_connections, rest.request_head_timeout_s)
        assert runner.server is not None
        guard.install(runner.server)
        self.http_connections = guard
        try:
            site = web.TCPSite(runner, rest.host, rest.port, reuse_address=True)
            with _naming_the_port("HTTP", rest.host, rest.port):
                await site.start()
            self.log.info("HTTP listening", host=rest.host, port=rest.port)
            async with guard.running():
                yield
        finally:
            await runner.cleanup()


@contextlib.contextmanager
def _naming_the_port(what: str, host: str, port: int) -> Iterator[None]:
    """An OSError while opening a listening socket says which one: two ports, one error.

    An ssl.SSLError is an OSError too, but it is about certificate files, not the
    port: it passes unchanged.
    """
    try:
        yield
    except ssl.SSLError:
        raise
    except OSError as exc:
        where = f"{what} port {port}" + (f" on {host}" if host not in ("", "0.0.0.0") else "")
        raise OSError(exc.errno, f"{where}: {exc.strerror or exc}") from exc
