"""Where pynetdicom streams an incoming C-STORE dataset before the node keeps it.

In chunked receive mode pynetdicom writes each dataset, PDU by PDU, to a file it opens
with :func:`tempfile.NamedTemporaryFile` in the system temp dir. Two things about that
do not suit a node that must answer every instance:

- a disk that fills while a dataset arrives makes pynetdicom's write raise inside its
  DIMSE decoder, which aborts the whole association; the standard answer is a C-STORE
  response with 0xA700 (out of resources) for that instance, the association going on;
- the temp dir may be on another filesystem than the studies, so every instance is
  copied instead of renamed into place, and a crash leaves partial files there.

:func:`install` swaps pynetdicom's file for a :class:`SpoolFile` in ``<studies>/.incoming``:
same filesystem as the studies, swept of stale partial files at start, and a write that
fails is remembered (and the partial data given back to the disk) instead of raised.
The C-STORE handlers ask :func:`received_path`, which raises the remembered error, so
that they answer 0xA700 as for any other failure to keep an instance.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import dimse_messages as _messages

from dicom_node.logs import get_logger

__all__ = ["SPOOL_DIR_NAME", "SpoolFile", "install", "received_path", "sweep"]

SPOOL_DIR_NAME = ".incoming"
# With studies shared by several nodes, a partial file untouched for this long belongs
# to no live association (pynetdicom's DIMSE and network timeouts are far shorter); an
# older one is a crash's leftover. A node with its own studies sweeps them all at start.
STALE_AFTER_S = 3600.0

log = get_logger("dimse.spool")
_lock = threading.Lock()
_spool_dir: Path | None = None


class SpoolFile:
    """A file pynetdicom writes an incoming dataset to, which survives a full disk.

    It offers what pynetdicom and pydicom use of a ``NamedTemporaryFile``: ``name``,
    ``write``, ``file.flush()`` and ``close``. The first write that fails (ENOSPC,
    EDQUOT, EIO...) is kept in :attr:`error`, the file is truncated to free its space,
    and later writes are dropped, so that pynetdicom goes on decoding the message and
    the handler can answer it. A file never handed to a handler (its association was
    aborted mid-dataset) is deleted when pynetdicom lets go of it.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.error: OSError | None = None
        self.file = self  # pynetdicom calls ``file.flush()`` after each fragment
        try:
            self._fd, self.name = _create(directory)
        except OSError as exc:  # no inode left: answered like a failed write
            self.error, self._fd = exc, -1
            self.name = os.path.join(directory or tempfile.gettempdir(), ".unwritten.part")
            self._finalizer = None
        else:
            self._finalizer = weakref.finalize(self, _discard, self._fd, self.name)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data``; after a failure, pretend to (see the class docstring)."""
        size = len(data)
        if self.error is None and not self.closed:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self.error = exc
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)  # give the space back to the others now
        return size

    def flush(self) -> None:
        """Nothing to flush: every write goes straight to the OS."""

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the file and keep it (its handler renamed it, or pynetdicom deletes it)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._finalizer is not None:
                self._finalizer.detach()
            os.close(fd)


def _create(directory: Path | None) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
    except FileNotFoundError:
        if directory is None:
            raise
        directory.mkdir(parents=True, exist_ok=True)  # removed while the node runs
        return tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")


def _discard(fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def _named_temporary_file(*_args: Any, **_kwargs: Any) -> SpoolFile:
    # pynetdicom asks for NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm").
    return SpoolFile(_spool_dir)


def install(studies_dir: Path, *, shared: bool = False) -> Path:
    """Make pynetdicom spool incoming datasets as :class:`SpoolFile` s under ``studies_dir``.

    Process-wide (pynetdicom has one decoder); the last node started in the process
    names the folder. Returns the folder, created and swept of partial files: all of
    them, since the serve lock says no other node uses this data directory, or only
    stale ones when the studies are ``shared`` with nodes that may be receiving now.
    """
    global _spool_dir
    folder = studies_dir / SPOOL_DIR_NAME
    with _lock:
        if _spool_dir == folder and folder.is_dir():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        sweep(folder, STALE_AFTER_S if shared else 0.0)
        _spool_dir = folder
        # pynetdicom looks the name up in its module at each dataset
        _messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined,assignment]
    return folder


def sweep(folder: Path, older_than_s: float = STALE_AFTER_S) -> int:
    """Delete partial files in ``folder`` not written to for ``older_than_s``; their count."""
    cutoff = time.time() - older_than_s
    removed = 0
    for path in folder.glob(".*.part"):
        with contextlib.suppress(OSError):
            if older_than_s <= 0 or path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    if removed:
        log.info("deleted partial files left by an earlier run", folder=str(folder),
                 files=removed)
    return removed


def received_path(request: Any) -> Path:
    """The file pynetdicom received a C-STORE request's dataset into.

    Raises the :class:`OSError` that stopped it being written whole (the disk filled),
    and ``AttributeError`` when the dataset was not received in chunked mode.
    """
    spool = getattr(request, "_dataset_file", None)
    if isinstance(spool, SpoolFile) and spool.error is not None:
        raise spool.error
    path = getattr(request, "_dataset_path", None)
    if not isinstance(path, Path):
        raise AttributeError("the dataset was not received into a file")
    return path
