"""A process of its own for the slowest artifact writer (the DICOM SEG).

Building and encoding a SEG is pure Python (highdicom, pydicom): ~0.6 s for a 300-slice
CT, seconds for 512 x 512 slices, and the interpreter lock keeps every other thread of the
node waiting meanwhile. In a worker process it runs on another core while the job's thread
writes the JSON, PNG, PDF and SR.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

__all__ = ["WriterProcess"]

T = TypeVar("T")


def _import_writers() -> None:
    """Run once in the worker: the writers' imports (~1 s) before the first SEG."""
    import pipeline.artifacts.seg  # noqa: F401


def _ready() -> bool:
    return True


class WriterProcess(Executor):
    """One spawned worker process, replaced when it dies.

    Spawned, not forked: the node's threads (DICOM, HTTP, the engine's) hold locks a
    forked child would inherit locked. A worker that died (killed, out of memory) fails
    the futures it held with :class:`BrokenProcessPool` (callers write in-process then)
    and the next :meth:`submit` starts a new one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def start(self) -> None:
        """Start the worker now rather than at the first job (its imports take ~1 s)."""
        self.submit(_ready)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` in the worker; everything must pickle.

        Raises:
            RuntimeError: after :meth:`shutdown`.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer process is shut down")
            if self._pool is not None:
                try:
                    return self._pool.submit(fn, *args, **kwargs)
                except BrokenProcessPool:
                    self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_import_writers)
            return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)
