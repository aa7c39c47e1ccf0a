"""Drop folders: files copied into watched folders become stored instances and jobs.

Each configured folder (:class:`~dicom_node.config.WatchSettings`) is watched
with watchdog. The observer's thread only hands paths to the asyncio loop
(``call_soon_threadsafe``); the loop keeps one entry per path and sends work to
a small thread pool, which does every read, hash, write and move.

A file is taken once it is complete: at once after inotify's close-write or a
rename into the folder, otherwise once its size, mtime and ctime stayed the same
for ``settle_s``. A file that looks broken right after a close-write is given
the settle time too, so a writer that opens and closes the file per chunk is not
failed half-way. Temporary names (``.part``, ``.tmp``, ``~``, dot-files) wait
until they are renamed.

Content decides what a file is: DICOM (``DICM`` preamble, or a bare dataset that
pydicom reads and that carries the identifying UIDs), a zip archive (unpacked
into a private temporary folder within limits, its entries treated like files),
or anything else (moved to ``failed/`` with ``<name>.reason.txt``).

Nothing is processed twice: each input is identified by its content hash
(sha256) and SOP Instance UID, recorded in the store *before* the input is moved
or deleted. After a crash, a file found again is recognised by its hash and only
moved; instances recorded whose group never became a job are handed to the
assembler again at start-up. File names are never logged (a CD export may name
files after the patient); hashes and UIDs are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy.exc import SQLAlchemyError
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from dicom_node.assembler import Assembler, GroupPolicy
from dicom_node.config import Settings, WatchSettings
from dicom_node.errors import InvalidInput, StoreError
from dicom_node.logs import get_logger
from dicom_node.scp import InstanceWriter, ReceivedInstance, safe_uid
from dicom_node.store import Store

__all__ = [
    "DONE_DIR",
    "FAILED_DIR",
    "DropFolder",
    "FolderState",
    "Watcher",
    "ZipLimits",
    "is_temporary_name",
]

DONE_DIR = "done"
FAILED_DIR = "failed"
TEMPORARY_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".swp", "~")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: an index, not an instance
_CHUNK = 1 << 20


def is_temporary_name(name: str) -> bool:
    """Hidden files and names that copy tools use while writing; taken once renamed."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


@dataclass(frozen=True)
class ZipLimits:
    """What an archive may unpack to; beyond it the archive is refused as a zip bomb."""

    max_total_bytes: int = 8 << 30  # uncompressed, all entries together
    max_ratio: float = 200.0  # uncompressed / compressed, whole archive and each entry
    max_entries: int = 100_000


class FolderState(StrEnum):
    STARTING = "starting"
    WATCHING = "watching"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    STOPPED = "stopped"


Signature = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


class _Refused(Exception):
    """The input cannot be taken; the message goes into ``<name>.reason.txt``."""


@dataclass
class _Entry:
    """A path the loop knows about: waiting to settle, queued or being processed."""

    state: str = "waiting"  # waiting, queued, running
    sig: Signature | None = None
    sig_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    again: bool = False  # an event came while it was queued or running
    again_fast: bool = False  # ... and it said the writer is done (close-write, rename)
    attempts: int = 0


@dataclass
class _Counters:
    taken: int = 0
    known: int = 0
    failed: int = 0
    ignored: int = 0


@dataclass(frozen=True)
class _Result:
    outcome: str  # gone, wait, done, known, failed, skipped, retry, stopped
    sig: Signature | None = None


@dataclass
class _Taken:
    """What one input gave: instances to hand on, hashes to record."""

    instances: list[ReceivedInstance] = field(default_factory=list)
    records: list[tuple[str, str | None]] = field(default_factory=list)  # (sha256, SOP UID)
    skipped: int = 0  # archive entries that were not DICOM


def _open_input(path: str) -> BinaryIO:
    """Open an input for reading (a seam: tests make it fail like an unreadable file)."""
    return open(path, "rb")  # the caller closes it


class DropFolder:
    """One watched folder: its events, settle timers, processing and status."""

    def __init__(self, watcher: Watcher, settings: WatchSettings, root: Path,
                 output_dir: Path) -> None:
        self.watcher = watcher
        self.settings = settings
        self.name = settings.name
        self.root = root
        self.output_dir = output_dir
        self.done_dir = root / DONE_DIR
        self.failed_dir = root / FAILED_DIR
        self.log = get_logger("watch", watch=settings.name)
        self.policy = GroupPolicy.for_watch(settings, str(output_dir))
        self.state = FolderState.STARTING
        self.message = "starting"
        self.counters = _Counters()
        self._pending: dict[str, _Entry] = {}
        self._handled: dict[str, Signature] = {}  # kept or refused paths, as last seen
        self._observer: Any = None
        self._identity: tuple[int, int] | None = None
        self._last_scan = 0.0
        self._lock = threading.Lock()  # guards _handled across worker threads

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``state``, ``message``, ``path`` and counts: pending, taken, known, failed, ignored."""
        return {
            "state": self.state.value, "message": self.message, "path": str(self.root),
            "pending": len(self._pending), "taken": self.counters.taken,
            "known": self.counters.known, "failed": self.counters.failed,
            "ignored": self.counters.ignored,
        }

    def _set_state(self, state: FolderState, message: str) -> None:
        if state is not self.state:
            quiet = (FolderState.WATCHING, FolderState.STOPPED)
            log = self.log.info if state in quiet else self.log.warning
            log("drop folder " + state.value, path=str(self.root), message=message)
        self.state, self.message = state, message

    # -- folder presence (loop) ------------------------------------------------------

    def probe(self) -> tuple[FolderState, str, tuple[int, int] | None]:
        """Whether the folder is there and readable (runs in a thread: it touches disk)."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return FolderState.MISSING, "the folder does not exist", None
        except OSError as exc:
            return FolderState.UNREADABLE, f"cannot stat the folder: {exc.strerror}", None
        if not stat.S_ISDIR(st.st_mode):
            return FolderState.UNREADABLE, "the path is not a folder", None
        try:
            with os.scandir(self.root) as it:
                next(it, None)
        except OSError as exc:
            return FolderState.UNREADABLE, f"cannot list the folder: {exc.strerror}", None
        # A read-only folder (a mounted CD) is fine when inputs are kept where they are.
        need = os.R_OK | os.X_OK | (0 if self.settings.on_done == "keep" else os.W_OK)
        if not os.access(self.root, need):
            return FolderState.UNREADABLE, "no permission to read (or move files out of) " \
                "the folder", None
        return FolderState.WATCHING, "watching", (st.st_dev, st.st_ino)

    async def poll(self) -> None:
        """Follow the folder's presence: (re)start watching when it (re)appears."""
        state, message, identity = await asyncio.to_thread(self.probe)
        loop = asyncio.get_running_loop()
        if state is not FolderState.WATCHING:
            if self._observer is not None:
                await asyncio.to_thread(self._stop_observer)
            self._identity = None
            self._set_state(state, message)
            return
        restart = (self._observer is None or identity != self._identity
                   or not self._observer.is_alive())
        if restart:
            if self._observer is not None:
                await asyncio.to_thread(self._stop_observer)
            try:
                await asyncio.to_thread(self._start_observer, loop)
            except OSError as exc:
                self._set_state(FolderState.UNREADABLE, f"cannot watch the folder: {exc}")
                return
            self._identity = identity
            self._set_state(FolderState.WATCHING, "watching")
        now = time.monotonic()
        if restart or now - self._last_scan >= self.settings.rescan_s:
            # A sweep finds what inotify may have dropped (queue overflow), missed while
            # the folder was being re-created, or never sees (another host's writes to a
            # network share).
            self._last_scan = now
            self.watcher.pool_submit(self._scan, loop, self.root)

    def _start_observer(self, loop: asyncio.AbstractEventLoop) -> None:
        observer = Observer()
        observer.schedule(
            _Handler(self, loop), str(self.root), recursive=self.settings.recursive,
            event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent,
                          DirCreatedEvent, DirMovedEvent],
        )
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            with contextlib.suppress(Exception):  # a watch on a vanished folder may complain
                observer.stop()
            observer.join(10)

    # -- scanning (worker thread) ------------------------------------------------------

    def _scan(self, loop: asyncio.AbstractEventLoop, top: Path) -> None:
        """Hand every candidate file under ``top`` to the loop, in batches."""
        batch: list[str] = []
        seen: set[str] = set()
        for path in self._walk(top):
            batch.append(path)
            seen.add(path)
            if len(batch) >= 500:
                loop.call_soon_threadsafe(self._events, batch, False)
                batch = []
        if batch:
            loop.call_soon_threadsafe(self._events, batch, False)
        if top == self.root and os.access(self.root, os.R_OK | os.X_OK):
            # Forget kept or refused files that are gone: a keep folder emptied by hand
            # now and then would otherwise grow this for as long as the node runs. (Not
            # after a walk of a folder that has gone away: all would be read again.)
            with self._lock:
                for path in [p for p in self._handled if p not in seen]:
                    del self._handled[path]

    def _walk(self, top: Path) -> Iterator[str]:
        stack = [str(top)]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = list(it)
            except OSError:
                continue  # vanished or unreadable: the poll reports the root's state
            for e in sorted(entries, key=lambda e: e.name):
                if is_temporary_name(e.name):
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        if self.settings.recursive and self.accepts(e.path):
                            stack.append(e.path)
                        continue
                except OSError:
                    continue
                if self.accepts(e.path):
                    yield e.path

    def accepts(self, path: str) -> bool:
        """Inside the folder, outside ``done/`` and ``failed/``, not a temporary name."""
        try:
            rel = PurePosixPath(os.path.relpath(path, self.root))
        except ValueError:
            return False
        parts = rel.parts
        if not parts or parts[0] in ("..", ".") or parts[0] in (DONE_DIR, FAILED_DIR):
            return False
        if len(parts) > 1 and not self.settings.recursive:
            return False
        return not any(is_temporary_name(p) for p in parts)

    # -- events (loop) -----------------------------------------------------------------

    def _events(self, paths: list[str], fast: bool) -> None:
        for path in paths:
            self._event(path, fast)

    def _event(self, path: str, fast: bool) -> None:
        if self.watcher.stopping or not self.accepts(path):
            return
        entry = self._pending.get(path)
        if entry is None:
            entry = self._pending[path] = _Entry()
            self._dispatch(path, entry, fast)
        elif entry.state == "waiting":
            if fast:
                if entry.timer is not None:
                    entry.timer.cancel()
                self._dispatch(path, entry, fast)
        else:
            entry.again = True
            entry.again_fast = entry.again_fast or fast

    def _directory_event(self, path: str) -> None:
        if self.settings.recursive and self.accepts(path) and not self.watcher.stopping:
            self.watcher.pool_submit(self._scan, asyncio.get_running_loop(), Path(path))

    def _dispatch(self, path: str, entry: _Entry, fast: bool) -> None:
        entry.state = "queued"
        entry.timer = None
        fut = self.watcher.pool_submit(self._work, path, fast, entry.sig, entry.sig_at)
        if fut is None:
            self._pending.pop(path, None)
            return
        loop = asyncio.get_running_loop()
        fut.add_done_callback(
            lambda f: loop.call_soon_threadsafe(self._after, path, f)
            if not loop.is_closed() else None
        )

    def _after(self, path: str, fut: Future[_Result]) -> None:
        entry = self._pending.get(path)
        if entry is None:
            return
        if self.watcher.stopping or fut.cancelled():
            self._pending.pop(path, None)
            return
        try:
            result = fut.result()
        except Exception:
            self.log.exception("unexpected error while taking a file; will try again")
            result = _Result("retry")
        if result.outcome == "stopped":
            self._pending.pop(path, None)
            return
        loop = asyncio.get_running_loop()
        if result.outcome in ("wait", "retry"):
            if result.outcome == "retry":
                entry.attempts += 1
                delay = min(60.0, 0.5 * 2 ** min(entry.attempts, 7))
            else:
                entry.sig, entry.sig_at = result.sig, time.monotonic()
                delay = self.settings.settle_s
                if entry.again_fast:  # closed while we looked: no need to wait
                    entry.again = entry.again_fast = False
                    self._dispatch(path, entry, True)
                    return
            entry.state = "waiting"
            entry.again = entry.again_fast = False
            entry.timer = loop.call_later(delay, self._dispatch, path, entry, False)
            return
        if entry.again:  # it changed while we worked: look again once it settles
            entry.again = entry.again_fast = False
            entry.sig, entry.state = None, "waiting"
            entry.timer = loop.call_later(self.settings.settle_s, self._dispatch, path, entry,
                                          False)
            return
        self._pending.pop(path, None)

    # -- taking one file (worker thread) ----------------------------------------------

    def _work(self, path: str, fast: bool, prev: Signature | None, prev_at: float) -> _Result:
        if self.watcher.stopping:
            return _Result("stopped")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return _Result("gone")
        except OSError as exc:
            return self._refuse(path, None, f"cannot be read: {exc.strerror or exc}")
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if not _inside(real, str(self.root.resolve())):
                return self._skip(path, _sig(st), "a symbolic link to outside the folder; "
                                  "not followed")
            try:
                st = os.stat(path)
            except OSError:
                return _Result("gone")
        if stat.S_ISDIR(st.st_mode):
            return _Result("gone")  # directories come through their own events and scans
        sig = _sig(st)
        with self._lock:
            if self._handled.get(path) == sig:
                return _Result("known", sig)
        if not fast and (prev != sig or time.monotonic() - prev_at < self.settings.settle_s):
            return _Result("wait", sig)
        if not stat.S_ISREG(st.st_mode):
            return self._refuse(path, sig, "cannot be read: not a regular file")
        try:
            return self._take(path, sig, fast)
        except (StoreError, OSError) as exc:
            if isinstance(exc, OSError) and not os.path.exists(path):
                return _Result("gone")
            self.log.warning("cannot take a file now; will try again",
                             error=f"{type(exc).__name__}: {exc}")
            return _Result("retry", sig)

    def _take(self, path: str, sig: Signature, fast: bool) -> _Result:
        watcher = self.watcher
        try:
            staged, sha = watcher.stage(path)
        except PermissionError as exc:
            return self._refuse(path, sig, f"cannot be read: {exc.strerror or exc}")
        try:
            if _sig(os.stat(path)) != sig:  # written to while we copied: not complete
                return _Result("wait", None)
            if watcher.store.watch_input_known(self.name, sha):
                # Taken before (a restart between recording and moving, or dropped again).
                with self._lock:
                    self.counters.known += 1
                self.log.info("input already taken; finishing it", sha256=sha[:16])
                self._finish(path, sig)
                return _Result("known", sig)
            try:
                taken = self._read_input(staged, sha)
            except _Refused as exc:
                if fast:  # right after a close-write: let it settle before judging it
                    return _Result("wait", sig)
                return self._refuse(path, sig, str(exc))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
        # Record before the input is moved or deleted: a crash in between finds the
        # file again on restart, recognises its hash and only finishes the move.
        replaced: list[str] = []
        try:
            watcher.store.add_watch_inputs(
                self.name, taken.records,
                instances=[i.unrecorded for i in taken.instances if i.unrecorded is not None],
                replaced=replaced)
        except SQLAlchemyError as exc:  # placed, not recorded: taken again next time
            raise StoreError(f"cannot record the input: {type(exc).__name__}") from exc
        watcher.writer.discard_replaced(replaced)
        for inst in taken.instances:
            watcher.assembler.watched_instance(inst, self.policy)
        with self._lock:
            self.counters.taken += 1
        self.log.info("input taken", sha256=sha[:16], instances=len(taken.instances),
                      skipped_entries=taken.skipped,
                      sop_instance_uid=taken.instances[0].sop_instance_uid
                      if len(taken.instances) == 1 else None)
        self._finish(path, sig)
        return _Result("done", sig)

    def _read_input(self, staged: str, sha: str) -> _Taken:
        """Store what ``staged`` holds; raises :class:`_Refused` when it is nothing usable."""
        with open(staged, "rb") as fh:
            head = fh.read(132)
        if head[:4] == b"PK\x03\x04" and head[128:132] != b"DICM":
            return self._take_zip(staged, sha)
        inst = self._take_dicom(staged)
        taken = _Taken()
        if inst is not None:
            taken.instances.append(inst)
            taken.records.append((sha, inst.sop_instance_uid))
        else:
            taken.records.append((sha, None))  # a DICOMDIR: nothing to import
        return taken

    def _take_dicom(self, path: str) -> ReceivedInstance | None:
        """Place one DICOM file into the studies dir (consumes ``path``)."""
        part10 = _ensure_part10(path)
        if part10 is None:
            return None
        try:
            # recorded with the input in one commit (``_take``)
            return self.watcher.writer.write(Path(path), called_ae="", calling_ae="",
                                             association_id=0, source="watch", record=False)
        except InvalidInput as exc:
            raise _Refused(f"not a usable DICOM file: {exc}") from exc

    def _take_zip(self, staged: str, sha: str) -> _Taken:
        taken = _Taken()
        with tempfile.TemporaryDirectory(dir=self.watcher.private_dir) as tmp:
            files = _unpack(staged, Path(tmp), self.watcher.zip_limits)
            for member in files:
                member_sha = _sha256_file(member)
                if self.watcher.store.watch_input_known(self.name, member_sha):
                    continue  # taken before, loose or in another archive
                try:
                    inst = self._take_dicom(str(member))
                except _Refused:
                    taken.skipped += 1
                    continue
                if inst is not None:
                    taken.instances.append(inst)
                taken.records.append((member_sha, inst.sop_instance_uid if inst else None))
        if not taken.records and taken.skipped:
            raise _Refused(f"the archive holds no DICOM file ({taken.skipped} other entries)")
        taken.records.append((sha, None))
        return taken

    # -- after taking (worker thread) ----------------------------------------------------

    def _finish(self, path: str, sig: Signature) -> None:
        """Apply ``on_done`` to a taken input."""
        on_done = self.settings.on_done
        if on_done == "delete":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        elif on_done == "move":
            target = _free_name(self.done_dir / os.path.relpath(path, self.root))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        else:
            with self._lock:
                self._handled[path] = sig

    def _refuse(self, path: str, sig: Signature | None, reason: str) -> _Result:
        """Move the input to ``failed/`` with ``<name>.reason.txt`` beside it."""
        with self._lock:
            self.counters.failed += 1
        target = _free_name(self.failed_dir / os.path.relpath(path, self.root))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            # Written aside and renamed: whoever reads failed/ never sees a half reason.
            note = target.with_name(target.name + ".reason.txt")
            tmp = note.with_name(f".{note.name}.tmp")
            tmp.write_text(f"{reason}\n", encoding="utf-8")
            os.replace(tmp, note)
        except FileNotFoundError:
            return _Result("gone")
        except OSError as exc:
            self.log.error("cannot move a refused input to failed/", reason=reason,
                           error=exc.strerror)
            if sig is not None:
                with self._lock:
                    self._handled[path] = sig
        self.log.warning("input refused; moved to failed/", reason=reason)
        return _Result("failed", sig)

    def _skip(self, path: str, sig: Signature, reason: str) -> _Result:
        with self._lock:
            if self._handled.get(path) == sig:
                return _Result("skipped", sig)
            self._handled[path] = sig
            self.counters.ignored += 1
        self.log.warning("input ignored", reason=reason)
        return _Result("skipped", sig)


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's thread: hands paths to the loop, touches no file."""

    def __init__(self, folder: DropFolder, loop: asyncio.AbstractEventLoop) -> None:
        self.folder = folder
        self.loop = loop

    def dispatch(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind not in ("created", "moved", "closed"):
            return  # deletions, our own reads and moves out need nothing
        path = os.fsdecode(event.dest_path if kind == "moved" else event.src_path)
        if not path:
            return
        try:
            if event.is_directory:
                if kind in ("created", "moved"):
                    self.loop.call_soon_threadsafe(self.folder._directory_event, path)
                return
            # A close-write or a rename into the folder means the writer is done.
            fast = kind in ("closed", "moved")
            self.loop.call_soon_threadsafe(self.folder._event, path, fast)
        except RuntimeError:  # the loop is closed: the node is stopping
            pass


class Watcher:
    """Every drop folder of the node. ``start()`` / ``stop()`` as a pair, on the loop."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        assembler: Assembler,
        *,
        workers: int = 4,
        poll_s: float = 1.0,
        zip_limits: ZipLimits | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.assembler = assembler
        self.writer = InstanceWriter(settings, store)
        self.workers = workers
        self.poll_s = poll_s
        self.zip_limits = zip_limits or ZipLimits()
        self.log = get_logger("watch")
        # Staging and unpacking happen beside the studies dir, so placing is a rename.
        self.staging_dir = settings.studies_dir / ".watch-staging"
        self.private_dir = settings.studies_dir / ".watch-unpack"
        self.stopping = False
        self.folders: dict[str, DropFolder] = {}
        for w in settings.watch:
            root = settings.path(w.path).resolve()
            output = settings.path(w.output) if w.output else settings.results_dir / w.name
            self.folders[w.name] = DropFolder(self, w, root, output.resolve())
        self._pool: ThreadPoolExecutor | None = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Prepare folders, re-assemble instances a crash left without a job, start polling."""
        self.stopping = False
        await asyncio.to_thread(self._prepare)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="watch")
        for folder in self.folders.values():
            # a study is not cut into jobs while files of the folder still wait to be taken
            self.assembler.hold(folder.name, folder._pending.__len__)
            pending = await asyncio.to_thread(self.store.pending_watch_instances, folder.name)
            for rec in pending:
                self.assembler.watched_instance(
                    ReceivedInstance(rec.sop_instance_uid, rec.sop_class_uid,
                                     rec.study_instance_uid, rec.series_instance_uid,
                                     rec.path, "", "", 0), folder.policy)
            if pending:
                folder.log.info("instances without a job re-assembled", instances=len(pending))
            await folder.poll()
        self._poller = asyncio.create_task(self._poll_forever())

    def _prepare(self) -> None:
        for d in (self.staging_dir, self.private_dir):
            d.mkdir(parents=True, exist_ok=True)
            for leftover in d.iterdir():  # from a crash: the inputs are still in place
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        data_dir = self.settings.data_dir.resolve()
        for folder in self.folders.values():
            # Create a missing folder only inside the data dir (the default inbox): one on
            # an unmounted share must be reported, not silently replaced by a local one.
            if _inside(str(folder.root), str(data_dir)):
                folder.root.mkdir(parents=True, exist_ok=True)

    async def stop(self) -> None:
        """Stop observers and workers; what was not taken yet is found again at start-up."""
        self.stopping = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for folder in self.folders.values():
            for entry in folder._pending.values():
                if entry.timer is not None:
                    entry.timer.cancel()
            await asyncio.to_thread(folder._stop_observer)
            folder._set_state(FolderState.STOPPED, "stopped")
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        for folder in self.folders.values():
            folder._pending.clear()

    async def __aenter__(self) -> Watcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def status(self) -> dict[str, dict[str, Any]]:
        """Per folder: ``state`` (watching, missing, unreadable…), ``message`` and counts."""
        return {name: f.status() for name, f in self.folders.items()}

    def pool_submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        pool = self._pool
        if pool is None or self.stopping:
            return None
        try:
            return pool.submit(fn, *args)
        except RuntimeError:  # shut down meanwhile
            return None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            for folder in self.folders.values():
                try:
                    await folder.poll()
                except Exception:
                    folder.log.exception("cannot check the drop folder")

    def stage(self, path: str) -> tuple[str, str]:
        """Copy ``path`` to a private staging file while hashing it; (staged path, sha256)."""
        digest = hashlib.sha256()
        fd, staged = tempfile.mkstemp(dir=self.staging_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, _open_input(path) as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
        return staged, digest.hexdigest()


# -- helpers ---------------------------------------------------------------------------


def _sig(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _free_name(target: Path) -> Path:
    """``target``, or ``name-1.ext``… when a file of that name is already there."""
    if not target.exists():
        return target
    for n in range(1, 100_000):
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        if not candidate.exists():
            return candidate
    raise OSError(f"no free name for {target.name}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _ensure_part10(path: str) -> bool | None:
    """Make ``path`` a Part 10 file; None for a DICOMDIR. Raises :class:`_Refused`.

    A file with the ``DICM`` preamble is left as it is. A bare dataset (no preamble,
    as some old exports write) that pydicom can read and that carries its UIDs gets
    a preamble and file meta group put in front; the dataset's bytes are not touched.
    """
    with open(path, "rb") as fh:
        head = fh.read(132)
        if head[128:132] == b"DICM":
            try:
                meta = read_file_meta_info(path)
            except Exception as exc:
                raise _Refused(f"not a usable DICOM file ({type(exc).__name__})") from exc
            if str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                return None
            return True
        # A bare dataset starts with a group 0002 or 0008 tag; anything else is not tried,
        # so a large non-DICOM file is never handed to a forced parse.
        if not head[:2] or {int.from_bytes(head[:2], "little"),
                            int.from_bytes(head[:2], "big")}.isdisjoint({0x0002, 0x0008}):
            raise _Refused("not DICOM: no DICM preamble and no DICOM dataset at the start")
        fh.seek(0)
        try:
            ds = dcmread(fh, force=True, stop_before_pixels=True)
            sop_class = safe_uid(ds.get("SOPClassUID"), "SOPClassUID")
            sop = safe_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            safe_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            safe_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            implicit, little = ds.original_encoding
        except Exception as exc:
            raise _Refused("not DICOM: no DICM preamble and no readable dataset "
                           "with SOP, study and series UIDs") from exc
        fh.seek(0)
        body = fh.read()
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop)
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        out.write(buf.getvalue())
        out.write(body)
    return True


def _unpack(archive: str, into: Path, limits: ZipLimits) -> list[Path]:
    """Unpack a zip into ``into`` within ``limits``; raises :class:`_Refused`.

    Refused: more entries than allowed, too many bytes or too high a compression
    ratio (zip bombs, checked on the declared sizes first and again while
    writing, since headers can lie), entries whose names leave the folder
    (absolute, ``..``, drive letters), links, encrypted entries, corrupt archives.
    """
    files: list[Path] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_entries:
                raise _Refused(f"zip refused: {len(infos)} entries, more than the "
                               f"{limits.max_entries} allowed")
            declared = sum(i.file_size for i in infos)
            compressed = sum(i.compress_size for i in infos)
            if declared > limits.max_total_bytes:
                raise _Refused(f"zip refused as a zip bomb: {declared} bytes uncompressed, "
                               f"more than the {limits.max_total_bytes} allowed")
            if declared > limits.max_ratio * max(compressed, 1) and declared > 1 << 20:
                raise _Refused(f"zip refused as a zip bomb: compression ratio "
                               f"{declared / max(compressed, 1):.0f}, more than "
                               f"{limits.max_ratio:.0f}")
            root = str(into.resolve())
            written = 0
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if (name.startswith("/") or ".." in parts or (parts and ":" in parts[0])):
                    raise _Refused(f"zip refused: entry {name!r} points outside the folder")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise _Refused(f"zip refused: entry {name!r} is a link")
                if info.flag_bits & 0x1:
                    raise _Refused("zip refused: encrypted entries")
                if info.is_dir() or any(is_temporary_name(p) for p in parts) \
                        or "__MACOSX" in parts:
                    continue
                target = into.joinpath(*parts)
                if not _inside(str(target.resolve()), root):
                    raise _Refused(f"zip refused: entry {name!r} points outside the folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                size = 0
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if size > info.file_size or written > limits.max_total_bytes or (
                                size > 1 << 20 and size > limits.max_ratio
                                * max(info.compress_size, 1)):
                            raise _Refused("zip refused as a zip bomb: an entry unpacks to "
                                           "more than it declares or than allowed")
                        out.write(chunk)
                files.append(target)
    except _Refused:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        raise _Refused(f"not a readable zip archive ({type(exc).__name__}: {exc})") from exc
    return files
