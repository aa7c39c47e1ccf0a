"""The inference engine: device choice, one model instance per device, dynamic batching.

Each registered model gets a :class:`BatchedModel`: the module is moved to its
device once, put in eval mode, optionally warmed up with a dummy batch, and
served by one batcher thread. Callers from any thread (:meth:`BatchedModel.submit`,
:meth:`BatchedModel.infer`) or from asyncio (:meth:`BatchedModel.infer_async`)
put single samples (no batch dimension) on the model's queue; the batcher
gathers up to ``max_batch`` samples of the same shape and dtype, waiting at
most ``max_delay_ms`` after the first one, stacks them, runs ONE forward pass
under :func:`torch.inference_mode` (and :func:`torch.autocast` on CUDA) and
hands every caller its own row of the output - or, when the forward pass
fails, the same exception. The thread keeps serving after a failure.

Statistics follow the Triton / seed-003 ``modelStats`` model: per request
(``inferenceStats``) the counts and cumulative nanoseconds of success, fail,
queue, compute_input, compute_infer and compute_output - each request of a
batch is charged the batch's compute durations, as Triton does - and per batch
size (``batchStats``) the number of executions and their durations.
:func:`model_stats_json` turns a snapshot into the seed's JSON entry. Work done
with a model outside its batcher is counted in the same figures
(:meth:`BatchedModel.record_unbatched`, :meth:`BatchedModel.record_failure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from pipeline.settings import ModelSpec

__all__ = [
    "BatchSizeStats",
    "BatchedModel",
    "DeviceUnavailableError",
    "Duration",
    "EngineClosedError",
    "EngineError",
    "InferenceEngine",
    "ModelNotFoundError",
    "ModelStatistics",
    "device_problem",
    "model_stats_json",
    "select_device",
]

log = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda"]
AutocastDtype = Literal["float16", "bfloat16"] | None
Preprocess = Callable[[Any], torch.Tensor]
Postprocess = Callable[[Any], Any]


# --------------------------------------------------------------------------- errors


class EngineError(Exception):
    """Base of the engine's own errors (a model's exceptions reach callers unchanged)."""


class DeviceUnavailableError(EngineError):
    """A device was requested that this machine does not have."""


class EngineClosedError(EngineError):
    """The model or engine was closed; no more requests are accepted."""


class ModelNotFoundError(EngineError, KeyError):
    """No model of that name (and version) is registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


# --------------------------------------------------------------------------- devices


def device_problem(device: str) -> str | None:
    """Why ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) cannot be used on this
    machine, or None when it can."""
    name = device.strip().lower()
    if name in ("auto", "cpu"):
        return None
    if name != "cuda" and not name.startswith("cuda:"):
        return f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'"
    if not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
               else f"no GPU found by torch {torch.__version__} (CUDA {torch.version.cuda})")
        return (f"device {device} is not available on this machine (CUDA is not available: "
                f"{why}); set device to 'auto' or 'cpu'")
    index = torch.device(name).index
    if index is not None and index >= torch.cuda.device_count():
        return (f"device {device} is not available on this machine (it has "
                f"{torch.cuda.device_count()} CUDA device(s)); set device to 'auto', 'cpu' "
                "or an index below that")
    return None


def select_device(requested: str = "auto") -> torch.device:
    """Map a configured device to a :class:`torch.device`.

    ``auto`` gives ``cuda`` when :func:`torch.cuda.is_available`, else
    ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are honoured.

    Raises:
        DeviceUnavailableError: CUDA was requested and is not available, or
            the index is out of range.
        ValueError: an unknown device name.
    """
    name = requested.strip().lower()
    problem = device_problem(requested)
    if problem is not None:
        if name.startswith("cuda"):
            raise DeviceUnavailableError(problem)
        raise ValueError(problem)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Duration:
    """A count and the cumulative nanoseconds of one kind of event."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchSizeStats:
    """Executions of one batch size: count and cumulative durations of each phase."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStatistics:
    """A snapshot of one model version's statistics (see :func:`model_stats_json`).

    ``last_inference_ms`` is the completion time of the last batch in ms since
    the epoch (``None`` before any); ``inference_count`` counts requests that
    succeeded, ``execution_count`` forward passes (batches).
    """

    name: str
    version: str
    last_inference_ms: int | None
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration
    batch_stats: tuple[BatchSizeStats, ...]


def _duration_json(d: Duration) -> dict[str, str | None]:
    if d.count == 0:
        return {"count": None, "ns": None}
    return {"count": str(d.count), "ns": str(d.ns)}


def model_stats_json(stats: ModelStatistics) -> dict[str, Any]:
    """One entry of seed 003's ``/metrics`` ``modelStats`` list.

    Counts and nanoseconds are decimal strings; a statistic never recorded is
    ``{"count": null, "ns": null}``, and ``lastInference``,
    ``inferenceCount``, ``executionCount`` and ``batchStats`` are ``null``
    while zero/empty - exactly as in the seed.
    """
    return {
        "name": stats.name,
        "version": stats.version,
        "lastInference": (
            str(stats.last_inference_ms) if stats.last_inference_ms is not None else None
        ),
        "inferenceCount": str(stats.inference_count) if stats.inference_count else None,
        "executionCount": str(stats.execution_count) if stats.execution_count else None,
        "inferenceStats": {
            "success": _duration_json(stats.success),
            "fail": _duration_json(stats.fail),
            "queue": _duration_json(stats.queue),
            "compute_input": _duration_json(stats.compute_input),
            "compute_infer": _duration_json(stats.compute_infer),
            "compute_output": _duration_json(stats.compute_output),
            "cache_hit": _duration_json(stats.cache_hit),
            "cache_miss": _duration_json(stats.cache_miss),
        },
        "batchStats": [
            {
                "batchSize": str(b.batch_size),
                "computeInput": _duration_json(b.compute_input),
                "computeInfer": _duration_json(b.compute_infer),
                "computeOutput": _duration_json(b.compute_output),
            }
            for b in stats.batch_stats
        ]
        or None,
    }


class _Counter:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def freeze(self) -> Duration:
        return Duration(self.count, self.ns)


class _Stats:
    """Mutable, lock-protected statistics of one model version."""

    _NAMES = (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    )

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.lock = threading.Lock()
        self.counters = {n: _Counter() for n in self._NAMES}
        self.batches: dict[int, tuple[_Counter, _Counter, _Counter]] = {}
        self.last_inference_ms: int | None = None
        self.inference_count = 0
        self.execution_count = 0

    def snapshot(self) -> ModelStatistics:
        with self.lock:
            c = {n: k.freeze() for n, k in self.counters.items()}
            batches = tuple(
                BatchSizeStats(size, a.freeze(), b.freeze(), o.freeze())
                for size, (a, b, o) in sorted(self.batches.items())
            )
            return ModelStatistics(
                name=self.name,
                version=self.version,
                last_inference_ms=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=self.execution_count,
                success=c["success"],
                fail=c["fail"],
                queue=c["queue"],
                compute_input=c["compute_input"],
                compute_infer=c["compute_infer"],
                compute_output=c["compute_output"],
                cache_hit=c["cache_hit"],
                cache_miss=c["cache_miss"],
                batch_stats=batches,
            )


# --------------------------------------------------------------------------- batching


_STOP = object()


@dataclass
class _Request:
    tensor: torch.Tensor
    future: Future[Any]
    key: tuple[Any, ...]
    t_submit: int  # perf_counter_ns when the caller called submit
    t_enqueue: int  # perf_counter_ns when it entered the queue
    input_ns: int  # caller-side preprocessing / conversion


def _to_cpu_rows(out: Any, n: int, dtype_fix: bool) -> list[Any]:
    """Bring a batched output to the host and split it into ``n`` per-sample outputs."""
    if isinstance(out, torch.Tensor):
        if out.ndim == 0 or out.shape[0] != n:
            raise EngineError(
                f"the model returned a tensor of shape {tuple(out.shape)} for a batch of {n}; "
                "its first dimension must be the batch"
            )
        host = out.detach().to("cpu")
        if dtype_fix and host.dtype in (torch.float16, torch.bfloat16):
            host = host.float()
        if n == 1:  # the row is the whole output: a view, not a copy (a CT's logits: GBs)
            return [host[0]]
        # separate copies, so that a caller keeping its row does not keep the whole batch
        return [row.clone() for row in host.unbind(0)]
    if isinstance(out, Mapping):
        per_key = {k: _to_cpu_rows(v, n, dtype_fix) for k, v in out.items()}
        return [{k: v[i] for k, v in per_key.items()} for i in range(n)]
    if isinstance(out, (list, tuple)):
        parts = [_to_cpu_rows(v, n, dtype_fix) for v in out]
        return [
            type(out)(p[i] for p in parts) if isinstance(out, tuple) else [p[i] for p in parts]
            for i in range(n)
        ]
    raise EngineError(
        f"the model returned {type(out).__name__}; expected a tensor, or a tuple, list or "
        "dict of tensors batched along dimension 0"
    )


class BatchedModel:
    """One model version on one device, served by a dynamic-batching thread.

    Args:
        name, version: how statistics and the engine name the model.
        model: any :class:`torch.nn.Module` (TorchScript included). It is moved
            to the device and put in eval mode once, here.
        device: ``auto``, ``cpu`` or ``cuda`` (see :func:`select_device`).
        max_batch: most samples per forward pass.
        max_delay_ms: longest time the first request of a batch waits for others.
            A request that finds nothing else in flight (no other request queued, no
            batch computing) runs at once: no caller is there to join it, so waiting
            would only add latency for a lone caller.
        warmup: run one dummy batch (and one of ``max_batch``) at start when
            ``sample_shape`` is known.
        sample_shape: the shape of one input sample, without batch dimension,
            used for warm-up.
        sample_dtype: dtype of the warm-up sample.
        autocast: reduced precision used under :func:`torch.autocast` on CUDA
            (``None`` disables it); ignored on CPU. Half-precision outputs are
            returned as float32.
        preprocess: optional callable run in the caller's thread on what is
            passed to :meth:`submit`; its time counts as compute_input.
        postprocess: optional callable run on each caller's output row (in the
            batcher thread, counted as compute_output).
        workers: batcher threads sharing the queue and the one model instance
            (no copies): while one runs a forward pass, the next gathers and runs
            the following batch. On CPU several workers with few torch threads
            each use the cores better than one worker with many (as
            TorchServe's workers or Triton's instance count).
        threads: torch intra-op threads of each worker thread (``None``: torch's
            default).

    Raises:
        DeviceUnavailableError: the device is not available.
        EngineError: warm-up failed (the model cannot run on its sample shape).
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        *,
        version: str = "1",
        device: str = "auto",
        max_batch: int = 8,
        max_delay_ms: float = 5.0,
        warmup: bool = True,
        sample_shape: Sequence[int] | None = None,
        sample_dtype: torch.dtype = torch.float32,
        autocast: AutocastDtype = "float16",
        preprocess: Preprocess | None = None,
        postprocess: Postprocess | None = None,
        workers: int = 1,
        threads: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms must not be negative")
        self.name = name
        self.version = version
        self.device = select_device(device)
        self.max_batch = max_batch
        self.max_delay_ns = int(max_delay_ms * 1_000_000)
        self.preprocess = preprocess
        self.postprocess = postprocess
        self._autocast_dtype: torch.dtype | None = None
        if self.device.type == "cuda" and autocast is not None:
            self._autocast_dtype = torch.float16 if autocast == "float16" else torch.bfloat16
        self.model = model.to(self.device).eval()
        self._stats = _Stats(name, version)
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._pending: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._computing = 0  # workers running a batch now (under _lock)
        self.workers = workers
        self.threads = threads
        # One worker at a time gathers a batch; the others are computing theirs.
        self._gather_lock = threading.Lock()
        self._stopping = False  # the stop marker was taken (under _gather_lock)
        self._finished = False  # queue drained after the stop marker (under _gather_lock)
        if warmup:
            if sample_shape is None:
                log.info("no sample_shape for model %s:%s; warm-up skipped", name, version)
            else:
                self._warmup(tuple(sample_shape), sample_dtype)
        self._threads = [
            threading.Thread(target=self._run, name=f"batcher-{name}-{version}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # ----------------------------------------------------------------- public

    def submit(self, sample: Any) -> Future[Any]:
        """Queue one sample (no batch dimension); returns a Future of its output.

        ``sample`` is a tensor or numpy array, or whatever ``preprocess``
        accepts. The Future raises the model's exception when the batch's
        forward pass failed, an :class:`EngineError` when the output cannot be
        split per sample, or the preprocessing's exception.

        Raises:
            EngineClosedError: :meth:`close` was called.
        """
        t_submit = time.perf_counter_ns()
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise EngineClosedError(f"model {self.name}:{self.version} is closed")
        try:
            x = self.preprocess(sample) if self.preprocess is not None else sample
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(np.ascontiguousarray(x))
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"model {self.name} takes a tensor or numpy array per sample, "
                    f"got {type(x).__name__}"
                )
        except Exception as exc:
            self.record_failure(time.perf_counter_ns() - t_submit)
            future.set_exception(exc)
            return future
        now = time.perf_counter_ns()
        request = _Request(
            tensor=x,
            future=future,
            key=(tuple(x.shape), x.dtype),
            t_submit=t_submit,
            t_enqueue=now,
            input_ns=now - t_submit,
        )
        with self._lock:  # so that no request lands after the stop marker
            if self._closed:
                raise EngineClosedError(f"model {self.name}:{self.version} is closed")
            self._queue.put(request)
        return future

    def infer(self, sample: Any, timeout: float | None = None) -> Any:
        """Run one sample through the batcher and wait for its output.

        Raises:
            EngineClosedError: the model is closed.
            TimeoutError: ``timeout`` seconds passed without a result.
            Exception: the model's own exception for this batch.
        """
        return self.submit(sample).result(timeout)

    async def infer_async(self, sample: Any) -> Any:
        """Like :meth:`infer` for asyncio: awaits the result without blocking the loop.

        Preprocessing, if any, runs in the loop's default executor.
        """
        loop = asyncio.get_running_loop()
        if self.preprocess is not None:
            future = await loop.run_in_executor(None, self.submit, sample)
        else:
            future = self.submit(sample)
        return await asyncio.wrap_future(future)

    def statistics(self) -> ModelStatistics:
        """A consistent snapshot of this model's statistics."""
        return self._stats.snapshot()

    def record_unbatched(self, *, queue_ns: int, input_ns: int, infer_ns: int,
                         output_ns: int) -> None:
        """Count one sample that ran on this model's network outside the batcher (an
        embedding runs alone on a private copy) as the batcher counts its own: one
        request that succeeded in the sum of its phases, one execution of batch size 1,
        and the last inference time. Without this /metrics would not show the work."""
        now_ms = time.time_ns() // 1_000_000
        stats = self._stats
        with stats.lock:
            c = stats.counters
            c["queue"].add(queue_ns)
            c["compute_input"].add(input_ns)
            c["compute_infer"].add(infer_ns)
            c["compute_output"].add(output_ns)
            c["success"].add(queue_ns + input_ns + infer_ns + output_ns)
            stats.last_inference_ms = now_ms
            stats.inference_count += 1
            stats.execution_count += 1
            b = stats.batches.setdefault(1, (_Counter(), _Counter(), _Counter()))
            b[0].add(input_ns)
            b[1].add(infer_ns)
            b[2].add(output_ns)

    def record_failure(self, ns: int) -> None:
        """Count one request of this model that failed without a forward pass of the
        batcher (its input refused or not preprocessable, or a run outside the batcher
        failed), ``ns`` after it came."""
        with self._stats.lock:
            self._stats.counters["fail"].add(ns)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def alive(self) -> bool:
        """True while every batcher thread runs."""
        return all(t.is_alive() for t in self._threads)

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish those already queued, stop the thread.

        Idempotent. Waits up to ``timeout`` seconds (forever when ``None``)
        for the batcher threads to end.
        """
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> BatchedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _compute(self) -> Iterator[None]:
        with torch.inference_mode():
            if self._autocast_dtype is not None:
                with torch.autocast(device_type="cuda", dtype=self._autocast_dtype):
                    yield
            else:
                yield

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warmup(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        sizes = sorted({1, self.max_batch})
        try:
            for size in sizes:
                x = torch.zeros((size, *shape), dtype=dtype, device=self.device)
                with self._compute():
                    out = self.model(x)
                _to_cpu_rows(out, size, True)
            self._sync()
        except Exception as exc:
            raise EngineError(
                f"warm-up of model {self.name}:{self.version} on {self.device} with a batch "
                f"of shape {(sizes[-1], *shape)} failed: {exc.__class__.__name__}: {exc}"
            ) from exc

    def _take(self, block: bool, timeout: float | None = None) -> _Request | object | None:
        try:
            if not block:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _next_batch(self, stopping: bool) -> tuple[list[_Request], bool]:
        """Gather the next batch; returns (batch, stopping)."""
        if self._pending:
            head: _Request = self._pending.popleft()
        else:
            if stopping:
                return [], True
            item = self._take(True)
            if item is _STOP:
                return [], True
            assert isinstance(item, _Request)
            head = item
        batch = [head]
        # same-shape requests that were set aside earlier go first, in order
        keep: deque[_Request] = deque()
        while self._pending:
            r = self._pending.popleft()
            (batch if r.key == head.key and len(batch) < self.max_batch else keep).append(r)
        self._pending = keep
        if len(batch) == 1 and not self._pending and not self._computing \
                and self._queue.empty():
            return batch, stopping  # nothing else in flight: see max_delay_ms
        deadline = head.t_enqueue + self.max_delay_ns
        set_aside = 0
        while len(batch) < self.max_batch and not stopping:
            remaining = deadline - time.perf_counter_ns()
            if remaining <= 0 and set_aside >= 4 * self.max_batch:
                break  # a flood of other shapes must not delay this batch forever
            item = self._take(remaining > 0, max(remaining, 0) / 1e9)
            if item is None:
                break
            if item is _STOP:
                stopping = True
                break
            assert isinstance(item, _Request)
            if item.key == head.key:
                batch.append(item)
            else:
                self._pending.append(item)
                set_aside += 1
        return batch, stopping

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this thread's intra-op threads
        while True:
            with self._gather_lock:
                if self._finished:
                    return
                try:
                    batch, self._stopping = self._next_batch(self._stopping)
                except Exception:  # pragma: no cover - defensive, the loop must survive
                    log.exception("batcher of %s:%s failed to gather a batch", self.name,
                                  self.version)
                    continue
                if not batch:
                    if self._stopping and not self._pending:
                        self._finished = True
                        return
                    continue
            with self._lock:
                self._computing += 1
            try:
                self._execute(batch)
            finally:
                with self._lock:
                    self._computing -= 1

    def _execute(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter_ns()
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not batch:
            return
        n = len(batch)
        t_in = t_inf = t_out = 0
        error: BaseException | None = None
        results: list[Any] = []
        try:
            x = torch.stack([r.tensor for r in batch]).to(self.device, non_blocking=True)
            self._sync()
            t1 = time.perf_counter_ns()
            t_in = t1 - t0
            with self._compute():
                out = self.model(x)
            self._sync()
            t2 = time.perf_counter_ns()
            t_inf = t2 - t1
            results = _to_cpu_rows(out, n, True)
            if self.postprocess is not None:
                results = [self.postprocess(r) for r in results]
            t_out = time.perf_counter_ns() - t2
        except BaseException as exc:
            error = exc
        end = time.perf_counter_ns()
        now_ms = time.time_ns() // 1_000_000
        stats = self._stats
        with stats.lock:
            c = stats.counters
            stats.last_inference_ms = now_ms
            stats.execution_count += 1
            for r in batch:
                c["queue"].add(t0 - r.t_enqueue)
                c["compute_input"].add(r.input_ns + t_in)
                if error is None:
                    c["compute_infer"].add(t_inf)
                    c["compute_output"].add(t_out)
                    c["success"].add(end - r.t_submit)
                else:
                    c["fail"].add(end - r.t_submit)
            if error is None:
                stats.inference_count += n
                b = stats.batches.setdefault(n, (_Counter(), _Counter(), _Counter()))
                b[0].add(t_in)
                b[1].add(t_inf)
                b[2].add(t_out)
        if error is not None:
            log.warning(
                "batch of %d for model %s:%s failed: %s: %s",
                n,
                self.name,
                self.version,
                error.__class__.__name__,
                error,
            )
            for r in batch:
                r.future.set_exception(error)
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit
                raise error
            return
        for r, res in zip(batch, results, strict=True):
            r.future.set_result(res)


# --------------------------------------------------------------------------- engine


class InferenceEngine:
    """A registry of :class:`BatchedModel` s by name and version.

    Each (name, version) is loaded once on its device. Requests name a model
    and optionally a version; without a version the model's default is used
    (the first version registered with ``default=True``, else the first).
    Usable as a context manager; :meth:`close` stops every batcher.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], BatchedModel] = {}
        self._defaults: dict[str, str] = {}
        self._explicit: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def add_model(
        self,
        name: str,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        *,
        version: str = "1",
        default: bool = True,
        **options: Any,
    ) -> BatchedModel:
        """Load and register one model version; returns its :class:`BatchedModel`.

        ``model`` is a module or a zero-argument factory (called once here).
        ``options`` are :class:`BatchedModel`'s keyword arguments (device,
        max_batch, max_delay_ms, warmup, sample_shape, autocast, preprocess,
        postprocess...).

        Raises:
            EngineClosedError: the engine is closed.
            ValueError: that name and version are already registered.
            DeviceUnavailableError, EngineError: see :class:`BatchedModel`.
        """
        with self._lock:
            if self._closed:
                raise EngineClosedError("the inference engine is closed")
            if (name, version) in self._models:
                raise ValueError(f"model {name}:{version} is already loaded")
        module = model if isinstance(model, torch.nn.Module) else model()
        batched = BatchedModel(name, module, version=version, **options)
        with self._lock:
            if self._closed or (name, version) in self._models:
                batched.close()
                if self._closed:
                    raise EngineClosedError("the inference engine is closed")
                raise ValueError(f"model {name}:{version} is already loaded")
            self._models[(name, version)] = batched
            if name not in self._defaults or (default and name not in self._explicit):
                self._defaults[name] = version
                if default:
                    self._explicit.add(name)
        return batched

    def add_spec(
        self,
        spec: ModelSpec,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        **options: Any,
    ) -> BatchedModel:
        """Register a model described by a :class:`~pipeline.settings.ModelSpec`.

        Device, max_batch, max_delay_ms and warmup come from the spec; the
        version is ``spec.version`` or ``"1"``. Raises as :meth:`add_model`.
        """
        return self.add_model(
            spec.name,
            model,
            version=spec.version or "1",
            default=spec.default,
            device=spec.device,
            max_batch=spec.max_batch,
            max_delay_ms=spec.max_delay_ms,
            warmup=spec.warmup,
            **{"workers": spec.workers or 1, "threads": spec.threads, **options},
        )

    def get(self, name: str, version: str | None = None) -> BatchedModel:
        """The model registered under ``name`` (and ``version``, else the default).

        Raises:
            ModelNotFoundError: no such model or version.
        """
        with self._lock:
            ver = version if version is not None else self._defaults.get(name)
            model = self._models.get((name, ver)) if ver is not None else None
            if model is None:
                known = sorted(f"{n}:{v}" for n, v in self._models)
                raise ModelNotFoundError(
                    f"model {name}{':' + version if version else ''} is not loaded "
                    f"(loaded: {', '.join(known) or 'none'})"
                )
            return model

    def remove(self, name: str, version: str) -> None:
        """Close and forget one model version (one that loaded but turned out unusable);
        nothing when it is not registered."""
        with self._lock:
            model = self._models.pop((name, version), None)
            if model is not None and self._defaults.get(name) == version:
                others = [v for n, v in self._models if n == name]
                if others:
                    self._defaults[name] = others[0]
                else:
                    del self._defaults[name]
                    self._explicit.discard(name)
        if model is not None:
            model.close()

    def models(self) -> list[BatchedModel]:
        """Every registered model version, in registration order."""
        with self._lock:
            return list(self._models.values())

    def submit(self, name: str, sample: Any, *, version: str | None = None) -> Future[Any]:
        """:meth:`BatchedModel.submit` on the named model."""
        return self.get(name, version).submit(sample)

    def infer(
        self, name: str, sample: Any, *, version: str | None = None, timeout: float | None = None
    ) -> Any:
        """:meth:`BatchedModel.infer` on the named model."""
        return self.get(name, version).infer(sample, timeout)

    async def infer_async(self, name: str, sample: Any, *, version: str | None = None) -> Any:
        """:meth:`BatchedModel.infer_async` on the named model."""
        return await self.get(name, version).infer_async(sample)

    def statistics(self) -> list[ModelStatistics]:
        """Snapshots of every model version's statistics."""
        return [m.statistics() for m in self.models()]

    def metrics_json(self) -> dict[str, Any]:
        """``{"modelStats": [...]}`` as seed 003's ``GET /metrics`` returns it."""
        return {"modelStats": [model_stats_json(s) for s in self.statistics()]}

    def close(self, timeout: float | None = None) -> None:
        """Close every model (finishing queued requests) and refuse new ones. Idempotent."""
        with self._lock:
            self._closed = True
            models = list(self._models.values())
        for m in models:
            m.close(timeout)

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
