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
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import time
import traceback
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
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from dicom_node.assembler import Assembler, GroupPolicy
from dicom_node.config import Settings, WatchSettings
from dicom_node.disk import short_of_space
from dicom_node.errors import InvalidInput, StoreError
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
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
NAME_MAX = 255  # bytes in one file name, on the filesystems a node runs on


def is_temporary_name(name: str) -> bool:
    """Hidden files and names that copy tools use while writing; taken once renamed."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


@dataclass(frozen=True)
class ZipLimits:
    """What an archive may unpack to; beyond it the archive is refused as a zip bomb.

    The total size and the entry count are the limits that bound the harm. The ratio
    only applies past ``ratio_from_bytes`` (the whole archive, and each entry): real
    images compress up to deflate's ~1000:1 (a 2048x2048 all-black CR, 8 MB, zips to
    9 KB), but 1 GB of zeros in an 1 MB archive is an attack.
    """

    max_total_bytes: int = 8 << 30  # uncompressed, all entries together
    max_ratio: float = 200.0  # uncompressed / compressed, past ratio_from_bytes
    ratio_from_bytes: int = 256 << 20
    max_entries: int = 100_000


class FolderState(StrEnum):
    STARTING = "starting"
    WATCHING = "watching"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    PAUSED = "paused"  # disk space under storage.min_free_mb: inputs wait where they are
    MISCONFIGURED = "misconfigured"  # a file named done or failed where a folder must be
    STOPPED = "stopped"


Signature = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


class _Refused(Exception):
    """The input cannot be taken; ``reason`` goes into ``<name>.reason.txt``.

    ``logged`` is what the log may say: the same without names (an archive's entry
    names, like file names, may be a patient's).
    """

    def __init__(self, reason: str, logged: str | None = None, *,
                 incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.logged = reason if logged is None else logged
        self.incomplete = incomplete  # reads as cut short: most likely still being written


@dataclass
class _Entry:
    """A path the loop knows about: waiting to settle, queued or being processed."""

    state: str = "waiting"  # waiting, queued, running
    sig: Signature | None = None
    since: float = 0.0  # when ``sig`` was first seen: unchanged since then
    incomplete: Signature | None = None  # read as truncated at this signature
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
    outcome: str  # gone, wait, done, known, failed, skipped, retry, stopped, paused
    sig: Signature | None = None
    need: int = 0  # paused: the bytes it would write


class _NoSpace(Exception):
    """Taking the input would write ``need`` bytes into storage.min_free_mb's reserve."""

    def __init__(self, need: int) -> None:
        super().__init__(f"{need} bytes needed")
        self.need = need


@dataclass
class _Taken:
    """What one input gave: instances to hand on, hashes to record."""

    instances: list[ReceivedInstance] = field(default_factory=list)
    records: list[tuple[str, str | None]] = field(default_factory=list)  # (sha256, SOP UID)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # archive entry, why


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
        # Of those, inputs taken and left in place (``keep``): remembered across restarts
        # (see load_seen), so that a start does not copy and hash each one again.
        self._taken_in_place: set[str] = set()
        self._seen_saved = True  # _taken_in_place as the seen file holds it
        self._restored: set[str] = set()  # known from the seen file, not yet found again
        self._held: dict[str, int] = {}  # path -> bytes it needs, while disk space is short
        self.unreadable_subfolders = 0  # as the last full sweep found
        self._opened: dict[str, int] = {}  # path -> opens not yet closed, as inotify says
        grace = settings.truncated_grace_s
        self.grace_s = max(60.0, 10 * settings.settle_s) if grace is None else grace
        self._observer: Any = None
        self._identity: tuple[int, int] | None = None
        self._last_scan = 0.0
        self._lock = threading.Lock()  # guards _handled across worker threads

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``state``, ``message``, ``path`` and counts: pending, held (waiting for disk
        space), taken, known, failed, ignored, unreadable_subfolders (their files are
        not taken)."""
        return {
            "state": self.state.value, "message": self.message, "path": str(self.root),
            "pending": len(self._pending), "held": len(self._held),
            "taken": self.counters.taken,
            "known": self.counters.known, "failed": self.counters.failed,
            "ignored": self.counters.ignored,
            "unreadable_subfolders": self.unreadable_subfolders,
        }

    def waiting(self) -> int:
        """Inputs seen and not yet taken: settling, being taken, or held for disk space."""
        return len(self._pending) + len(self._held)

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
        # A file where done/ or failed/ must go would fail every input the same way:
        # intake waits (the inputs stay where they are) until it is out of the way.
        for sub in (DONE_DIR, FAILED_DIR) if self.settings.on_done == "move" else (FAILED_DIR,):
            if os.path.lexists(self.root / sub) and not os.path.isdir(self.root / sub):
                return FolderState.MISCONFIGURED, f"'{sub}' in the folder is not a folder: " \
                    f"inputs cannot be moved to {sub}/; remove or rename it", None
        return FolderState.WATCHING, "watching", (st.st_dev, st.st_ino)

    async def poll(self) -> None:
        """Follow the folder's presence: (re)start watching when it (re)appears."""
        state, message, identity = await asyncio.to_thread(self.probe)
        loop = asyncio.get_running_loop()
        if state is not FolderState.WATCHING:
            if self._observer is not None:
                await asyncio.to_thread(self._stop_observer)
            self._identity = None
            self._held.clear()  # the sweep after it comes back finds them
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
                self._set_state(FolderState.UNREADABLE,
                                f"cannot watch the folder: {_describe(exc)}")
                return
            self._identity = identity
            self._held.clear()  # the sweep below finds them again
            self._set_state(FolderState.WATCHING, "watching")
        elif self._held:
            await self._check_space()
        now = time.monotonic()
        if restart or now - self._last_scan >= self.settings.rescan_s:
            # A sweep finds what inotify may have dropped (queue overflow), missed while
            # the folder was being re-created, or never sees (another host's writes to a
            # network share).
            self._last_scan = now
            self.watcher.pool_submit(self._scan, loop, self.root)

    def _hold(self, path: str, need: int) -> None:
        """Leave an input where it is until there is disk space for it (loop)."""
        self._held[path] = need
        if self.state is FolderState.WATCHING:
            # (how much is free comes with the next poll: no disk access on the loop)
            self._set_state(FolderState.PAUSED, self._space_message(None, need))

    async def _check_space(self) -> None:
        """Resume once the smallest held input fits above the reserve (loop)."""
        need = min(self._held.values())
        free = await asyncio.to_thread(self.watcher.free_bytes)
        # the test has_room pauses by, inodes included: bytes alone resumed a folder
        # short of inodes every few seconds, three log lines a turn
        if not await asyncio.to_thread(self.watcher.has_room, need):
            self._set_state(FolderState.PAUSED, self._space_message(free, need))
            return
        held, self._held = list(self._held), {}
        self.log.info("disk space is back: taking inputs again", inputs=len(held),
                      free_mb=free >> 20)
        self._set_state(FolderState.WATCHING, "watching")
        self._events(held, False)

    def _space_message(self, free: int | None, need: int) -> str:
        inodes = short_of_space(self.watcher.settings, self.watcher.staging_dir) \
            if free is not None and free - need >= self.watcher.reserve_bytes() else None
        if inodes:  # bytes to spare: the inodes are what is short
            return f"disk space under the reserve: {inodes}; inputs wait where they are"
        known = "" if free is None else f"{free >> 20} MB free, "
        return (f"disk space under storage.min_free_mb: {known}"
                f"{self.watcher.reserve_bytes() >> 20} MB kept free, the next input needs "
                f"{-(-need >> 20)} MB; inputs wait where they are")

    def _start_observer(self, loop: asyncio.AbstractEventLoop) -> None:
        observer = Observer()
        observer.schedule(
            _Handler(self, loop), str(self.root), recursive=self.settings.recursive,
            event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent,
                          FileOpenedEvent, FileClosedNoWriteEvent,
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
        unreadable: list[str] = []
        for path in self._walk(top, unreadable):
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
                    self._restored.discard(path)
                    if path in self._taken_in_place:
                        self._taken_in_place.discard(path)
                        self._seen_saved = False
                before, self.unreadable_subfolders = self.unreadable_subfolders, len(unreadable)
            # Counted, not named: a subfolder may be named after a patient too.
            if len(unreadable) > before:
                self.log.warning("subfolders cannot be read; files in them are not taken",
                                 unreadable_subfolders=len(unreadable))
            elif before and not unreadable:
                self.log.info("subfolders can all be read again")
            self.save_seen()

    # -- inputs taken and left in place, across restarts (worker thread) -----------------

    def _seen_file(self) -> Path:
        return self.watcher.seen_dir / f"{self.name}.json"

    def load_seen(self) -> None:
        """Know again the inputs taken and left in place before the last stop (a ``keep``
        folder: all of them) as they were then. One unchanged since (same size, times
        and inode) is not copied and hashed again; one that changed is looked at as new.
        A missing or unreadable file only costs that reading."""
        try:
            saved = json.loads(self._seen_file().read_text("utf-8"))
            if saved.get("root") != str(self.root):
                return  # the folder moved: its paths mean nothing now
            entries = {str(path): tuple(int(v) for v in sig)
                       for path, sig in saved["inputs"].items() if len(sig) == 4}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            self.log.warning("cannot read the list of inputs taken before; each is hashed "
                             "again to recognise it", error=_describe(exc))
            return
        root = str(self.root)
        with self._lock:
            for path, sig in entries.items():
                if _inside(path, root):
                    self._handled[path] = sig  # type: ignore[assignment]
                    self._taken_in_place.add(path)
                    self._restored.add(path)

    def save_seen(self) -> None:
        """Write the inputs taken and left in place, when that changed (owner-only: the
        names may name patients)."""
        with self._lock:
            if self._seen_saved:
                return
            inputs = {p: list(self._handled[p]) for p in self._taken_in_place
                      if p in self._handled}
            self._seen_saved = True
        target = self._seen_file()
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")  # 0600
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"root": str(self.root), "inputs": inputs}, f)
            os.replace(tmp, target)
        except OSError as exc:
            with self._lock:
                self._seen_saved = False  # tried again after the next sweep
            self.log.warning("cannot save the list of inputs taken; a restart hashes them "
                             "again", error=_describe(exc))

    def _walk(self, top: Path, unreadable: list[str]) -> Iterator[str]:
        """Candidate files under ``top``; subfolders that cannot be listed go to
        ``unreadable`` (the root's state is the poll's to report)."""
        stack = [str(top)]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue  # vanished meanwhile
            except OSError:
                if directory != str(top):
                    unreadable.append(directory)
                continue
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

    def _open_event(self, path: str, delta: int) -> None:
        """Follow opens and closes (a reader's as well as a writer's: inotify does not
        say which), so that a truncated file someone still holds open is not refused."""
        count = self._opened.get(path, 0) + delta
        if count > 0:
            self._opened[path] = count
        else:
            self._opened.pop(path, None)  # (a close without its open: opened before we watched)

    def _writer_holds(self, path: str) -> bool:
        return self._opened.get(path, 0) > 0  # read from a worker: a dict lookup is atomic

    def _directory_event(self, path: str) -> None:
        if self.settings.recursive and self.accepts(path) and not self.watcher.stopping:
            self.watcher.pool_submit(self._scan, asyncio.get_running_loop(), Path(path))

    def _dispatch(self, path: str, entry: _Entry, fast: bool) -> None:
        entry.state = "queued"
        entry.timer = None
        fut = self.watcher.pool_submit(self._work, path, fast, entry.sig, entry.since,
                                       entry.incomplete)
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
        except Exception as exc:
            # Not log.exception: the message of an error about a file names the file.
            self.log.error("unexpected error while taking a file; will try again",
                           error=_describe(exc), where=_where(exc))
            result = _Result("retry")
        if result.outcome == "stopped":
            self._pending.pop(path, None)
            return
        if result.outcome == "paused":
            self._pending.pop(path, None)
            self._hold(path, result.need)
            return
        loop = asyncio.get_running_loop()
        if result.outcome in ("wait", "retry", "incomplete"):
            if result.outcome == "retry":
                entry.attempts += 1
                delay = min(60.0, 0.5 * 2 ** min(entry.attempts, 7))
            else:
                if result.sig is None or result.sig != entry.sig:
                    entry.sig, entry.since = result.sig, time.monotonic()
                if result.outcome == "incomplete":
                    entry.incomplete = result.sig
                # (an incomplete file is looked at every settle_s too, but only stat'ed
                # until it changes or its grace is over: see _work)
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

    def _work(self, path: str, fast: bool, prev: Signature | None, since: float,
              incomplete: Signature | None = None) -> _Result:
        if self.watcher.stopping or self.state is FolderState.MISCONFIGURED:
            return _Result("stopped")  # found again by the sweep once it can be taken
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return _Result("gone")
        except OSError as exc:
            return self._refuse(path, None, f"cannot be read: {_describe(exc)}")
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
                if path in self._restored:  # taken before the last stop: known again
                    self._restored.discard(path)
                    self.counters.known += 1
                return _Result("known", sig)
        unchanged = prev == sig and prev is not None
        now = time.monotonic()
        if not fast and (not unchanged or now - since < self.settings.settle_s):
            return _Result("wait", sig)
        # A file that read as cut short may be refused only once it has not changed for the
        # grace and no writer that the watch saw open it still holds it (decided before
        # our own reads open it again).
        judge = unchanged and now - since >= self.grace_s and (
            not self._writer_holds(path) or now - since >= 10 * self.grace_s)
        if incomplete == sig and not judge:
            return _Result("incomplete", sig)
        if not stat.S_ISREG(st.st_mode):
            return self._refuse(path, sig, "cannot be read: not a regular file")
        try:
            if not self.watcher.has_room(st.st_size):
                return _Result("paused", sig, st.st_size)
            return self._take(path, sig, fast, judge)
        except _NoSpace as exc:
            return _Result("paused", sig, exc.need)
        except (StoreError, OSError) as exc:
            if isinstance(exc, OSError) and not os.path.exists(path):
                return _Result("gone")
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                return _Result("paused", sig, st.st_size)  # the reserve is 0, or too small
            self.log.warning("cannot take a file now; will try again",
                             error=_describe(exc))
            return _Result("retry", sig)

    def _take(self, path: str, sig: Signature, fast: bool, judge: bool) -> _Result:
        watcher = self.watcher
        try:
            # Judged from the original before anything is copied: a 400 MB movie is
            # refused without growing the staging folder (or filling the disk) first.
            _precheck(path, watcher.zip_limits)
        except PermissionError as exc:
            return self._refuse(path, sig, f"cannot be read: {_describe(exc)}")
        except _Refused as exc:
            if exc.incomplete and not judge:
                return _Result("incomplete", sig)
            if fast:  # right after a close-write: let it settle before judging it
                return _Result("wait", sig)
            return self._refuse(path, sig, exc.reason, exc.logged, sha=_hash_input(path))
        try:
            staged, sha = watcher.stage(path)
        except PermissionError as exc:
            return self._refuse(path, sig, f"cannot be read: {_describe(exc)}")
        try:
            if _sig(os.stat(path)) != sig:  # written to while we copied: not complete
                return _Result("wait", None)
            if watcher.store.watch_input_known(self.name, sha):
                # Taken before (a restart between recording and moving, or dropped again).
                with self._lock:
                    self.counters.known += 1
                self.log.info("input already taken; finishing it", sha256=sha[:16])
                self._finish(path, sig, sha)
                return _Result("known", sig)
            try:
                taken = self._read_input(staged, sha)
            except _Refused as exc:
                if exc.incomplete and not judge:
                    return _Result("incomplete", sig)
                if fast:  # right after a close-write: let it settle before judging it
                    return _Result("wait", sig)
                return self._refuse(path, sig, exc.reason, exc.logged, sha=sha)
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
                      skipped_entries=len(taken.skipped),
                      sop_instance_uid=taken.instances[0].sop_instance_uid
                      if len(taken.instances) == 1 else None)
        moved = self._finish(path, sig, sha)
        if taken.skipped:
            self._note_skipped(path, moved, sha, taken.skipped)
        return _Result("done", sig)

    def _read_input(self, staged: str, sha: str) -> _Taken:
        """Store what ``staged`` holds; raises :class:`_Refused` when it is nothing usable."""
        with open(staged, "rb") as fh:
            head = fh.read(132)
        if _kind(head) == "zip":
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
            cut = "truncated" in str(exc) or isinstance(exc.__cause__, EOFError)
            raise _Refused(f"not a usable DICOM file: {exc}", incomplete=cut) from exc

    def _take_zip(self, staged: str, sha: str) -> _Taken:
        taken = _Taken()
        need = _declared_size(staged)
        if not self.watcher.has_room(need):
            raise _NoSpace(need + os.path.getsize(staged))  # the staged copy goes with it
        with tempfile.TemporaryDirectory(dir=self.watcher.private_dir) as tmp:
            files = _unpack(staged, Path(tmp), self.watcher.zip_limits)
            for member in files:
                member_sha = _sha256_file(member)
                if self.watcher.store.watch_input_known(self.name, member_sha):
                    continue  # taken before, loose or in another archive
                entry = member.relative_to(tmp).as_posix()
                with open(member, "rb") as fh:
                    nested = _kind(fh.read(132)) == "zip"
                if nested:  # one level only: limits that hold per archive stay simple
                    taken.skipped.append((entry, "nested archive: not unpacked"))
                    continue
                try:
                    inst = self._take_dicom(str(member))
                except _Refused as exc:
                    taken.skipped.append((entry, exc.reason))
                    continue
                if inst is not None:
                    taken.instances.append(inst)
                taken.records.append((member_sha, inst.sop_instance_uid if inst else None))
        if not taken.records and taken.skipped:
            n = len(taken.skipped)
            raise _Refused(f"the archive holds no DICOM file ({n} other entries)\n"
                           + _skipped_text(taken.skipped),
                           f"the archive holds no DICOM file ({n} other entries)")
        taken.records.append((sha, None))
        return taken

    # -- after taking (worker thread) ----------------------------------------------------

    def _finish(self, path: str, sig: Signature, sha: str) -> Path | None:
        """Apply ``on_done`` to a taken input.

        An input that cannot be moved or deleted (a read-only subfolder, a file where
        ``done/`` needs a folder) is left where it is: it is recorded and queued, so
        trying again would only repeat the error. It is not looked at again until it
        changes (after a restart its hash is recognised and the move tried once more).
        """
        on_done = self.settings.on_done
        try:
            if on_done == "delete":
                os.unlink(path)
                return None
            if on_done == "move":
                target = _free_name(self.done_dir / os.path.relpath(path, self.root))
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(path, target)
                return target
        except FileNotFoundError:
            return None  # removed meanwhile: nothing left to do
        except OSError as exc:
            self.log.warning(f"input taken, but cannot be "
                             f"{'deleted' if on_done == 'delete' else 'moved to done/'}; "
                             "left in place", sha256=_short(sha), error=_describe(exc))
        with self._lock:
            self._handled[path] = sig
            self._taken_in_place.add(path)
            self._seen_saved = False
        return None

    def _note_skipped(self, path: str, moved: Path | None, sha: str,
                      skipped: list[tuple[str, str]]) -> None:
        """Say which entries of a taken archive were not taken, and why, in
        ``done/<archive>.skipped.txt`` (entry names, like file names, stay out of the log)."""
        where = moved or self.done_dir / os.path.relpath(path, self.root)
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            _write_note(where, ".skipped.txt", f"sha256: {sha}\n" + _skipped_text(skipped))
        except OSError as exc:
            self.log.error("cannot write the note of an archive's skipped entries",
                           sha256=_short(sha), error=_describe(exc))
        self.log.warning("archive taken, some entries skipped: see <archive>.skipped.txt "
                         "in done/", sha256=_short(sha), skipped_entries=len(skipped))

    def _refuse(self, path: str, sig: Signature | None, reason: str,
                logged: str | None = None, *, sha: str | None = None) -> _Result:
        """Move the input to ``failed/`` with ``<name>.reason.txt`` beside it.

        ``reason`` goes into the file; ``logged`` (default: ``reason``) into the log,
        with the content hash (when known) to tell refusals apart without a name.
        """
        logged = reason if logged is None else logged
        try:
            target = _free_name(self.failed_dir / os.path.relpath(path, self.root))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        except FileNotFoundError:
            return _Result("gone")
        except OSError as exc:
            # Left where it is and not looked at again until it changes.
            with self._lock:
                self.counters.failed += 1
                if sig is not None:
                    self._handled[path] = sig
            self.log.error("input refused; cannot move it to failed/, left in place",
                           reason=logged, sha256=_short(sha), error=_describe(exc))
            return _Result("failed", sig)
        with self._lock:
            self.counters.failed += 1
        text = f"{reason}\n" + (f"sha256: {sha}\n" if sha else "")
        try:
            _write_note(target, ".reason.txt", text)
        except OSError as exc:
            self.log.error("cannot write the reason file of a refused input",
                           sha256=_short(sha), error=_describe(exc))
        self.log.warning("input refused; moved to failed/", reason=logged, sha256=_short(sha))
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
        if kind in ("opened", "closed_no_write", "closed") and not event.is_directory:
            path = os.fsdecode(event.src_path)
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopping
                self.loop.call_soon_threadsafe(self.folder._open_event, path,
                                               1 if kind == "opened" else -1)
        if kind not in ("created", "moved", "closed"):
            return  # deletions, opens, closes after reading and moves out need nothing
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
        self.seen_dir = settings.studies_dir / ".watch-seen"  # see DropFolder.load_seen
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
        for folder in self.folders.values():
            await asyncio.to_thread(folder.load_seen)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="watch")
        for folder in self.folders.values():
            # a study is not cut into jobs while files of the folder still wait to be taken
            self.assembler.hold(folder.name, folder.waiting)
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
            folder._held.clear()
            await asyncio.to_thread(folder.save_seen)

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
                except Exception as exc:
                    folder.log.error("cannot check the drop folder", error=_describe(exc),
                                     where=_where(exc))

    def reserve_bytes(self) -> int:
        """storage.min_free_mb in bytes: what intake leaves free on the studies disk."""
        return self.settings.storage.min_free_mb << 20

    def free_bytes(self) -> int:
        """Free space on the studies disk (staging, unpacking and the store share it)."""
        return shutil.disk_usage(self.staging_dir).free

    def has_room(self, need: int) -> bool:
        """Whether ``need`` more bytes leave the reserve free, as the listener requires
        before it accepts an association."""
        if self.free_bytes() - need < self.reserve_bytes():
            return False
        return not self.reserve_bytes() or short_of_space(self.settings, self.staging_dir) is None

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


def _describe(exc: BaseException) -> str:
    """An error for the log without the path an :class:`OSError` carries."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{name}: {exc.strerror or os.strerror(exc.errno)}"
    if isinstance(exc, OSError):
        return type(exc).__name__  # no errno: its text may be anything, a path included
    if isinstance(exc, StoreError):
        return f"{type(exc).__name__}: {exc}"  # our own text: no file names
    return type(exc).__name__


def _where(exc: BaseException) -> list[str]:
    """Where an unexpected error came from: code locations, not the message."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return [f"{f.filename}:{f.lineno} {f.name}" for f in frames]


def _sig(st: os.stat_result) -> Signature:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _skipped_text(skipped: list[tuple[str, str]]) -> str:
    return "entries not taken:\n" + "".join(f"{entry}: {why}\n" for entry, why in skipped)


def _short(sha: str | None) -> str | None:
    return sha[:16] if sha else None


def _fit(stem: str, tail: str) -> str:
    """``stem + tail``, the stem cut short when the whole would not fit in NAME_MAX bytes."""
    room = NAME_MAX - len(os.fsencode(tail))
    raw = os.fsencode(stem)
    if len(raw) <= room:
        return stem + tail
    cut = raw[:max(room, 1)]
    for _ in range(3):  # do not leave half a UTF-8 character at the end
        try:
            cut.decode("utf-8")
            break
        except UnicodeDecodeError:
            cut = cut[:-1]
    return os.fsdecode(cut) + tail


def _free_name(target: Path) -> Path:
    """``target``, or ``name-1.ext``… when a file of that name is already there (the
    name cut short, its extension kept, when ``-1`` would make it too long)."""
    if not os.path.lexists(target):
        return target
    suffix = target.suffix if len(target.suffix) <= 16 else ""
    stem = target.name[:len(target.name) - len(suffix)]
    for n in range(1, 100_000):
        candidate = target.with_name(_fit(stem, f"-{n}{suffix}"))
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(errno.EEXIST, "no free name", str(target))


def _note_name(name: str, tail: str) -> str:
    """``<name><tail>``; a name too long for that is cut, a hash of it keeping notes of
    names that differ only after the cut apart."""
    if len(os.fsencode(name + tail)) <= NAME_MAX:
        return name + tail
    tag = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
    return _fit(name, f"~{tag}{tail}")


def _write_note(target: Path, tail: str, text: str) -> Path:
    """Write ``text`` to ``<target's name><tail>`` beside ``target``; written aside under
    a short name and renamed, so that whoever reads the folder never sees half a note."""
    note = target.with_name(_note_name(target.name, tail))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".note-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # as a file the node writes anywhere (mkstemp's is 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, note)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return note


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


NOT_DICOM = "not DICOM: no DICM preamble and no DICOM dataset at the start"


def _kind(head: bytes) -> str | None:
    """What a file's first 132 bytes say it is: ``dicom`` (the ``DICM`` preamble),
    ``bare`` (a dataset without preamble), ``zip``, or None (none of those)."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    # A bare dataset starts with a group 0002 or 0008 tag; anything else is not tried,
    # so a large non-DICOM file is never handed to a forced parse.
    if head[:2] and not {int.from_bytes(head[:2], "little"),
                         int.from_bytes(head[:2], "big")}.isdisjoint({0x0002, 0x0008}):
        return "bare"
    return None


def _precheck(path: str, limits: ZipLimits) -> None:
    """Refuse what is neither DICOM nor a zip, and a zip whose central directory is
    beyond ``limits``, reading only the original's start and directory (no copy)."""
    with _open_input(path) as fh:
        head = fh.read(132)
        kind = _kind(head)
        if kind is None:
            # nothing yet, or only the start of a preamble: a writer may still be at it
            raise _Refused(NOT_DICOM, incomplete=len(head) < 132 and not head.strip(b"\0"))
        if kind == "zip":
            try:
                with zipfile.ZipFile(fh) as zf:
                    _check_declared(zf.infolist(), limits)
            except _Refused:
                raise
            except zipfile.BadZipFile as exc:  # no central directory (yet): written last
                raise _bad_zip(exc, incomplete=True) from exc
            except (zipfile.LargeZipFile, EOFError, ValueError,
                    NotImplementedError, RuntimeError) as exc:
                raise _bad_zip(exc) from exc


def _hash_input(path: str) -> str | None:
    """The sha256 of an input in place (a refused one is not copied); None if unreadable."""
    digest = hashlib.sha256()
    try:
        with _open_input(path) as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _ensure_part10(path: str) -> bool | None:
    """Make ``path`` a Part 10 file; None for a DICOMDIR. Raises :class:`_Refused`.

    A file with the ``DICM`` preamble is left as it is. A bare dataset (no preamble,
    as some old exports write) that pydicom can read and that carries its UIDs gets
    a preamble and file meta group put in front; the dataset's bytes are not touched.
    """
    with open(path, "rb") as fh:
        head = fh.read(132)
        if _kind(head) == "dicom":
            try:
                meta = read_file_meta_info(path)
            except Exception as exc:
                raise _Refused(f"not a usable DICOM file ({type(exc).__name__})",
                               incomplete=True) from exc  # the file meta cut short
            if str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                return None
            return True
        if _kind(head) != "bare":
            raise _Refused(NOT_DICOM)
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
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
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
            _check_declared(infos, limits)
            root = str(into.resolve())
            written = 0
            for info in infos:
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if (name.startswith("/") or ".." in parts or (parts and ":" in parts[0])):
                    raise _Refused(f"zip refused: entry {name!r} points outside the folder",
                                   "zip refused: an entry points outside the folder")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise _Refused(f"zip refused: entry {name!r} is a link",
                                   "zip refused: an entry is a link")
                if info.flag_bits & 0x1:
                    raise _Refused("zip refused: encrypted entries")
                if info.is_dir() or any(is_temporary_name(p) for p in parts) \
                        or "__MACOSX" in parts:
                    continue
                target = into.joinpath(*parts)
                if not _inside(str(target.resolve()), root):
                    raise _Refused(f"zip refused: entry {name!r} points outside the folder",
                                   "zip refused: an entry points outside the folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                size = 0
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        size += len(chunk)
                        written += len(chunk)
                        if size > info.file_size or written > limits.max_total_bytes or (
                                size > limits.ratio_from_bytes and size > limits.max_ratio
                                * max(info.compress_size, 1)):
                            raise _Refused("zip refused as a zip bomb: an entry unpacks to "
                                           "more than it declares or than allowed")
                        out.write(chunk)
                files.append(target)
    except _Refused:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
            NotImplementedError, RuntimeError) as exc:
        raise _bad_zip(exc) from exc
    return files


def _declared_size(archive: str) -> int:
    """What a zip says it unpacks to; 0 when it cannot be read (unpacking refuses it)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError):
        return 0


def _bad_zip(exc: Exception, *, incomplete: bool = False) -> _Refused:
    # zipfile's messages may quote an entry's name: the log gets the error's type only
    return _Refused(f"not a readable zip archive ({type(exc).__name__}: {exc})",
                    f"not a readable zip archive ({type(exc).__name__})",
                    incomplete=incomplete)


def _check_declared(infos: list[zipfile.ZipInfo], limits: ZipLimits) -> None:
    """Refuse an archive on the sizes its central directory declares (before unpacking;
    :func:`_unpack` checks again while writing, since headers can lie)."""
    if len(infos) > limits.max_entries:
        raise _Refused(f"zip refused: {len(infos)} entries, more than the "
                       f"{limits.max_entries} allowed")
    declared = sum(i.file_size for i in infos)
    compressed = sum(i.compress_size for i in infos)
    if declared > limits.max_total_bytes:
        raise _Refused(f"zip refused as a zip bomb: {declared} bytes uncompressed, "
                       f"more than the {limits.max_total_bytes} allowed")
    if declared > limits.max_ratio * max(compressed, 1) and declared > limits.ratio_from_bytes:
        raise _Refused(f"zip refused as a zip bomb: compression ratio "
                       f"{declared / max(compressed, 1):.0f}, more than "
                       f"{limits.max_ratio:.0f} for {declared} bytes")
    for i in infos:  # one huge entry hidden among many that do not compress
        if i.file_size > limits.ratio_from_bytes \
                and i.file_size > limits.max_ratio * max(i.compress_size, 1):
            raise _Refused(f"zip refused as a zip bomb: an entry's compression ratio is "
                           f"{i.file_size / max(i.compress_size, 1):.0f}, more than "
                           f"{limits.max_ratio:.0f} for {i.file_size} bytes")
