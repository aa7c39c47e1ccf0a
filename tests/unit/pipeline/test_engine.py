"""Tests of pipeline.engine: devices, dynamic batching, errors, statistics, shutdown.

No assertion depends on wall-clock time: where batching must be deterministic a
gated module holds the first forward pass until the other requests are queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.engine import (
    BatchedModel,
    DeviceUnavailableError,
    Duration,
    EngineClosedError,
    EngineError,
    InferenceEngine,
    ModelNotFoundError,
    ModelStatistics,
    model_stats_json,
    select_device,
)
from pipeline.settings import ModelSpec

CUDA = torch.cuda.is_available()


class Encode(torch.nn.Module):
    """Output row i = [sum of sample i, first value of sample i, batch size]."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.batch_sizes: list[int] = []
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.batch_sizes.append(int(x.shape[0]))
        flat = x.reshape(x.shape[0], -1).float() * self.scale
        n = torch.full((x.shape[0],), float(x.shape[0]), device=x.device)
        return torch.stack([flat.sum(1), flat[:, 0], n], dim=1)


class Gated(Encode):
    """Like Encode, but the first forward pass waits until ``release`` is set."""

    def __init__(self, fail_on: float | None = None) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait()
        if self.fail_on is not None and bool((x == self.fail_on).any()):
            self.calls += 1
            self.batch_sizes.append(int(x.shape[0]))
            raise ValueError(f"poisoned input {self.fail_on}")
        return super().forward(x)


def wait_queued(model: BatchedModel, n: int) -> None:
    """Block until ``n`` requests wait in the batcher's queue (no time limit: pytest's)."""
    while model._queue.qsize() < n:
        time.sleep(0.001)


def hold_first_batch(model: BatchedModel, gate: Gated) -> Future[Any]:
    """Submit one request and wait until the model is blocked computing it."""
    first = model.submit(torch.full((4,), -5.0))
    gate.entered.wait()
    return first


# --------------------------------------------------------------------------- devices


def test_select_device_auto_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if CUDA else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")


def test_cuda_requested_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="set device to 'auto' or 'cpu'"):
        BatchedModel("m", Encode(), device="cuda")


# --------------------------------------------------------------------------- batching


def test_each_caller_gets_its_own_row() -> None:
    with BatchedModel("enc", Encode(), max_batch=8, max_delay_ms=20, warmup=False) as model:
        out = model.infer(torch.tensor([1.0, 2.0, 3.0]))
        assert out.shape == (3,)
        assert out[0].item() == 6.0 and out[1].item() == 1.0
        arr = model.infer(np.arange(3, dtype=np.float32))  # numpy is accepted
        assert arr[0].item() == 3.0


class Keep(torch.nn.Module):
    """Doubles its input and keeps its outputs, to compare with what callers get."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.outputs.append(x * 2)
        return self.outputs[-1]


class GatedKeep(Keep):
    """Keep, whose first forward pass waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait()
        return super().forward(x)


def test_a_lone_request_gets_a_view_and_a_batch_gets_copies() -> None:
    net = GatedKeep()
    with BatchedModel("keep", net, max_batch=2, max_delay_ms=10_000, warmup=False,
                      workers=1) as model:
        blocker = model.submit(torch.zeros(3))
        net.entered.wait()  # computing: the next two wait for it and form one batch
        first, second = model.submit(torch.ones(3)), model.submit(torch.full((3,), 2.0))
        wait_queued(model, 2)
        net.release.set()
        rows = [first.result(), second.result()]
        blocker.result()
    # batch of 2: each row is its own copy, so that keeping one frees the batch
    assert [r.tolist() for r in rows] == [[2.0] * 3, [4.0] * 3]
    assert len(net.outputs) == 2 and net.outputs[1].shape == (2, 3)
    assert all(r.untyped_storage().data_ptr() != net.outputs[1].untyped_storage().data_ptr()
               for r in rows)
    net = Keep()
    with BatchedModel("keep", net, max_batch=1, warmup=False, workers=1) as model:
        row = model.infer(torch.ones(3))
    # batch of 1: the row is the whole output; a copy would double a CT's logits
    assert row.tolist() == [2.0] * 3
    assert row.untyped_storage().data_ptr() == net.outputs[0].untyped_storage().data_ptr()


def test_a_request_with_nothing_else_in_flight_does_not_wait_for_company() -> None:
    # max_delay is ten minutes: were a lone request held for company, this would hang
    enc = Encode()
    with BatchedModel("enc", enc, max_batch=8, max_delay_ms=600_000, warmup=False) as model:
        for i in range(3):
            assert model.infer(torch.full((2,), float(i)))[1].item() == float(i)
    assert enc.batch_sizes == [1, 1, 1]


def test_sixteen_threads_are_batched() -> None:
    gate = Gated()
    model = BatchedModel("enc", gate, max_batch=8, max_delay_ms=5, warmup=False)
    results: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        results[i] = model.infer(torch.full((4,), float(i)))

    first = hold_first_batch(model, gate)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    wait_queued(model, 16)
    gate.release.set()
    for t in threads:
        t.join()
    assert first.result()[0].item() == -20.0
    model.close()

    for i in range(16):
        assert results[i][0].item() == 4.0 * i  # its own sum
        assert results[i][1].item() == float(i)  # its own first value
    assert gate.batch_sizes == [1, 8, 8]
    stats = model.statistics()
    assert stats.inference_count == 17
    assert stats.execution_count == 3 < stats.inference_count
    sizes = {b.batch_size: b for b in stats.batch_stats}
    assert set(sizes) == {1, 8}
    assert sizes[8].compute_infer.count == 2
    assert stats.success.count == 17 and stats.fail.count == 0
    assert stats.queue.count == stats.compute_input.count == stats.compute_infer.count == 17
    assert stats.last_inference_ms is not None


def test_concurrent_threads_without_gate_share_forward_passes() -> None:
    enc = Encode()
    barrier = threading.Barrier(16)
    results: dict[int, torch.Tensor] = {}
    with BatchedModel("enc", enc, max_batch=8, max_delay_ms=500, warmup=False) as model:

        def call(i: int) -> None:
            barrier.wait()
            results[i] = model.infer(torch.full((2,), float(i)))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(results[i][1].item() == float(i) for i in range(16))
    stats = model.statistics()
    assert stats.inference_count == 16
    assert stats.execution_count < stats.inference_count
    assert max(b.batch_size for b in stats.batch_stats) > 1
    assert max(enc.batch_sizes) <= 8


def test_different_shapes_form_their_own_batches() -> None:
    gate = Gated()
    model = BatchedModel("enc", gate, max_batch=8, max_delay_ms=5, warmup=False)
    first = hold_first_batch(model, gate)
    futures = []
    for i in range(6):
        shape = (4,) if i % 2 == 0 else (2, 3)
        futures.append((i, shape, model.submit(torch.full(shape, float(i)))))
    wait_queued(model, 6)
    gate.release.set()
    first.result()
    for i, shape, fut in futures:
        out = fut.result()
        assert out[0].item() == float(i) * int(np.prod(shape))
        assert out[2].item() == 3.0  # batched with the two others of its shape
    model.close()
    assert gate.batch_sizes == [1, 3, 3]


def test_tuple_and_dict_outputs_are_split() -> None:
    class Multi(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return x * 2, {"neg": -x, "sum": x.sum(1)}

    with BatchedModel("multi", Multi(), max_batch=4, warmup=False) as model:
        futures = [model.submit(torch.full((3,), float(i))) for i in range(4)]
        for i, fut in enumerate(futures):
            doubled, extra = fut.result()
            assert torch.equal(doubled, torch.full((3,), 2.0 * i))
            assert torch.equal(extra["neg"], torch.full((3,), -float(i)))
            assert extra["sum"].item() == 3.0 * i


def test_async_callers_are_batched() -> None:
    enc = Encode()
    with BatchedModel("enc", enc, max_batch=8, max_delay_ms=500, warmup=False) as model:

        async def main() -> list[Any]:
            return await asyncio.gather(
                *(model.infer_async(torch.full((3,), float(i))) for i in range(12))
            )

        outs = asyncio.run(main())
    assert [o[1].item() for o in outs] == [float(i) for i in range(12)]
    stats = model.statistics()
    assert stats.inference_count == 12
    assert stats.execution_count < 12


def test_engine_async_with_preprocess() -> None:
    with InferenceEngine() as engine:
        engine.add_model(
            "enc",
            Encode(),
            warmup=False,
            preprocess=lambda values: torch.tensor(values, dtype=torch.float32),
        )

        async def main() -> Any:
            return await engine.infer_async("enc", [1.0, 2.0])

        out = asyncio.run(main())
        assert out[0].item() == 3.0


# --------------------------------------------------------------------------- failures


def test_forward_exception_reaches_every_caller_of_the_batch() -> None:
    gate = Gated(fail_on=99.0)
    model = BatchedModel("enc", gate, max_batch=8, max_delay_ms=5, warmup=False)
    first = hold_first_batch(model, gate)
    futures = [model.submit(torch.full((4,), v)) for v in (1.0, 2.0, 99.0, 3.0)]
    wait_queued(model, 4)
    gate.release.set()
    assert first.result()[0].item() == -20.0
    for fut in futures:
        with pytest.raises(ValueError, match="poisoned input"):
            fut.result()
    # The engine keeps working after the failure.
    assert model.infer(torch.full((4,), 5.0))[0].item() == 20.0
    stats = model.statistics()
    model.close()
    assert stats.fail.count == 4
    assert stats.success.count == 2
    assert stats.inference_count == 2
    assert stats.execution_count == 3
    assert {b.batch_size for b in stats.batch_stats} == {1}  # failed batches are not timed


def test_bad_output_batch_dimension_is_reported() -> None:
    class Scalar(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum()

    with (
        BatchedModel("scalar", Scalar(), warmup=False) as model,
        pytest.raises(EngineError, match="first dimension must be the batch"),
    ):
        model.infer(torch.ones(3))


def test_preprocess_failure_and_bad_input_fail_only_that_request() -> None:
    def preprocess(value: Any) -> torch.Tensor:
        if value == "bad":
            raise ValueError("cannot preprocess 'bad'")
        return torch.tensor([float(value)])

    with BatchedModel("p", Encode(), preprocess=preprocess, warmup=False) as model:
        with pytest.raises(ValueError, match="cannot preprocess"):
            model.infer("bad")
        assert model.infer(4)[0].item() == 4.0
        stats = model.statistics()
    assert stats.fail.count == 1 and stats.success.count == 1
    with (
        BatchedModel("q", Encode(), warmup=False) as model,
        pytest.raises(TypeError, match="tensor or numpy array"),
    ):
        model.infer([1, 2])


def test_postprocess_runs_per_caller() -> None:
    with BatchedModel("p", Encode(), postprocess=lambda row: float(row[0]), warmup=False) as model:
        assert model.infer(torch.tensor([2.0, 3.0])) == 5.0


# --------------------------------------------------------------------------- warm-up


def test_warmup_runs_before_serving_and_is_not_counted() -> None:
    enc = Encode()
    with BatchedModel("w", enc, max_batch=4, sample_shape=(3,)) as model:
        assert enc.batch_sizes == [1, 4]
        assert model.statistics().execution_count == 0
        model.infer(torch.ones(3))
    assert model.statistics().execution_count == 1


def test_warmup_failure_is_an_engine_error() -> None:
    class Picky(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, torch.ones(2, 5))

    with pytest.raises(EngineError, match="warm-up of model picky:1"):
        BatchedModel("picky", Picky(), sample_shape=(3,))


def test_warmup_without_shape_is_skipped() -> None:
    enc = Encode()
    with BatchedModel("w", enc, warmup=True) as model:
        assert enc.calls == 0
        assert model.infer(torch.ones(2))[0].item() == 2.0


# --------------------------------------------------------------------------- shutdown


def test_close_finishes_queued_requests_and_stops_the_thread() -> None:
    gate = Gated()
    model = BatchedModel("enc", gate, max_batch=2, max_delay_ms=5, warmup=False)
    first = hold_first_batch(model, gate)
    futures = [model.submit(torch.full((4,), float(i))) for i in range(5)]
    wait_queued(model, 5)
    closer = threading.Thread(target=model.close)
    closer.start()
    while not model.closed:
        time.sleep(0.001)
    with pytest.raises(EngineClosedError):
        model.submit(torch.ones(4))
    gate.release.set()
    closer.join()
    assert not model.alive
    assert first.result()[0].item() == -20.0
    assert [f.result()[1].item() for f in futures] == [0.0, 1.0, 2.0, 3.0, 4.0]
    model.close()  # idempotent


def test_engine_close_stops_every_batcher() -> None:
    engine = InferenceEngine()
    a = engine.add_model("a", Encode(), warmup=False)
    b = engine.add_model("b", Encode, warmup=False)  # a factory is called once
    assert a.alive and b.alive
    engine.close()
    assert not a.alive and not b.alive
    with pytest.raises(EngineClosedError):
        engine.infer("a", torch.ones(2))
    with pytest.raises(EngineClosedError):
        engine.add_model("c", Encode(), warmup=False)


class Blocking(torch.nn.Module):
    """Each forward pass records its thread's torch threads, then waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.running = threading.Semaphore(0)
        self.threads: list[int] = []
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.threads.append(torch.get_num_threads())
        self.running.release()
        self.release.wait()
        return x * 2


def test_workers_run_batches_side_by_side_on_one_model() -> None:
    net = Blocking()
    model = BatchedModel("b", net, max_batch=2, max_delay_ms=0, warmup=False, workers=2,
                         threads=1)
    assert model.alive and model.workers == 2
    first = model.submit(torch.ones(3))
    net.running.acquire()  # worker 1 holds its batch...
    second = model.submit(torch.full((3,), 2.0))
    net.running.acquire()  # ...and worker 2 runs the next one meanwhile (the same module)
    net.release.set()
    assert first.result()[0].item() == 2.0 and second.result()[0].item() == 4.0
    assert net.threads == [1, 1]  # each worker thread set its own torch threads
    model.close()
    assert not model.alive
    assert model.statistics().execution_count == 2


def test_close_with_workers_finishes_the_queue() -> None:
    net = Blocking()
    net.release.set()
    model = BatchedModel("b", net, max_batch=3, max_delay_ms=1, warmup=False, workers=3)
    futures = [model.submit(torch.full((2,), float(i))) for i in range(20)]
    model.close()
    assert not model.alive
    assert [f.result()[0].item() for f in futures] == [2.0 * i for i in range(20)]


def test_workers_and_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        BatchedModel("b", Encode(), warmup=False, workers=0)
    with pytest.raises(ValueError, match="threads"):
        BatchedModel("b", Encode(), warmup=False, threads=0)


# --------------------------------------------------------------------------- registry


def test_engine_versions_defaults_and_lookup() -> None:
    with InferenceEngine() as engine:
        engine.add_model("m", Encode(), version="1", default=False, warmup=False)
        engine.add_model("m", Encode(), version="2", warmup=False)
        engine.add_model("m", Encode(), version="3", warmup=False)
        assert engine.get("m").version == "2"
        assert engine.get("m", "3").version == "3"
        with pytest.raises(ValueError, match="already loaded"):
            engine.add_model("m", Encode(), version="2", warmup=False)
        with pytest.raises(ModelNotFoundError, match=r"model x is not loaded \(loaded: m:1"):
            engine.get("x")
        with pytest.raises(ModelNotFoundError, match="m:9"):
            engine.infer("m", torch.ones(2), version="9")
        assert engine.submit("m", torch.ones(2), version="1").result()[0].item() == 2.0


def test_add_spec_uses_the_spec_settings(tmp_path: Any) -> None:
    spec = ModelSpec(
        name="cxr",
        path=tmp_path,
        version="7",
        device="cpu",
        max_batch=3,
        max_delay_ms=1,
        warmup=True,
    )
    enc = Encode()
    with InferenceEngine() as engine:
        model = engine.add_spec(spec, enc, sample_shape=(2,))
        assert (model.name, model.version, model.max_batch) == ("cxr", "7", 3)
        assert model.device == torch.device("cpu")
        assert enc.batch_sizes == [1, 3]
        assert engine.infer("cxr", torch.ones(2))[0].item() == 2.0


# --------------------------------------------------------------------------- statistics JSON

_SEED_ENTRY_KEYS = [
    "name",
    "version",
    "lastInference",
    "inferenceCount",
    "executionCount",
    "inferenceStats",
    "batchStats",
]
_SEED_STAT_KEYS = [
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
]


def test_stats_json_before_any_inference_is_all_null() -> None:
    with InferenceEngine() as engine:
        engine.add_model("idle", Encode(), warmup=False)
        metrics = engine.metrics_json()
    (entry,) = metrics["modelStats"]
    assert list(entry) == _SEED_ENTRY_KEYS
    assert entry["name"] == "idle" and entry["version"] == "1"
    assert entry["lastInference"] is None
    assert entry["inferenceCount"] is None and entry["executionCount"] is None
    assert list(entry["inferenceStats"]) == _SEED_STAT_KEYS
    assert all(v == {"count": None, "ns": None} for v in entry["inferenceStats"].values())
    assert entry["batchStats"] is None


def test_stats_json_matches_seed_shape_after_inference() -> None:
    with InferenceEngine() as engine:
        engine.add_model("enc", Encode(), version="1", warmup=False)
        for _ in range(3):
            engine.infer("enc", torch.ones(2))
        (entry,) = engine.metrics_json()["modelStats"]
    assert list(entry) == _SEED_ENTRY_KEYS
    assert entry["inferenceCount"] == "3" and entry["executionCount"] == "3"
    assert entry["lastInference"].isdigit()
    assert int(entry["lastInference"]) > 1_600_000_000_000  # ms since the epoch
    stats = entry["inferenceStats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[key]["count"] == "3"
        assert isinstance(stats[key]["ns"], str) and stats[key]["ns"].isdigit()
    for key in ("fail", "cache_hit", "cache_miss"):
        assert stats[key] == {"count": None, "ns": None}
    (batch,) = entry["batchStats"]
    assert list(batch) == ["batchSize", "computeInput", "computeInfer", "computeOutput"]
    assert batch["batchSize"] == "1"
    assert batch["computeInfer"]["count"] == "3"
    assert batch["computeInput"]["ns"].isdigit()


def test_work_outside_the_batcher_counts_as_the_batchers_own() -> None:
    """An embedding runs on a private copy of the network: recorded, it is one request of
    batch size 1 beside the batcher's, and a failed one is a failure."""
    with BatchedModel("enc", Encode(), warmup=False) as model:
        model.infer(torch.ones(2))
        before = model.statistics()
        model.record_unbatched(queue_ns=1, input_ns=20, infer_ns=300, output_ns=4000)
        model.record_failure(50_000)
        after = model.statistics()
    assert after.inference_count == before.inference_count + 1 == 2
    assert after.execution_count == before.execution_count + 1 == 2
    assert after.success == Duration(2, before.success.ns + 4321)
    assert after.fail == Duration(1, 50_000)
    for phase, ns in (("queue", 1), ("compute_input", 20), ("compute_infer", 300),
                      ("compute_output", 4000)):
        assert getattr(after, phase) == Duration(2, getattr(before, phase).ns + ns)
    (size1,) = after.batch_stats
    assert size1.batch_size == 1
    assert size1.compute_infer == Duration(2, before.batch_stats[0].compute_infer.ns + 300)
    assert size1.compute_output == Duration(2, before.batch_stats[0].compute_output.ns + 4000)
    assert after.last_inference_ms is not None
    entry = model_stats_json(after)
    assert entry["inferenceCount"] == "2" and entry["inferenceStats"]["fail"] == {
        "count": "1", "ns": "50000"}


def test_a_lone_unbatched_record_fills_the_seed_entry() -> None:
    with InferenceEngine() as engine:
        model = engine.add_model("emb", Encode(), warmup=False)
        model.record_unbatched(queue_ns=0, input_ns=2, infer_ns=3, output_ns=5)
        (entry,) = engine.metrics_json()["modelStats"]
    assert entry["inferenceCount"] == "1" and entry["executionCount"] == "1"
    assert entry["lastInference"] is not None
    assert entry["inferenceStats"]["success"] == {"count": "1", "ns": "10"}
    assert entry["batchStats"] == [{"batchSize": "1", "computeInput": {"count": "1", "ns": "2"},
                                    "computeInfer": {"count": "1", "ns": "3"},
                                    "computeOutput": {"count": "1", "ns": "5"}}]


def test_model_stats_json_from_a_typed_snapshot() -> None:
    zero = Duration()
    snap = ModelStatistics(
        name="text_encoder",
        version="1",
        last_inference_ms=1756351592249,
        inference_count=48,
        execution_count=48,
        success=Duration(48, 7090273130),
        fail=zero,
        queue=Duration(48, 8507746),
        compute_input=Duration(48, 3113130),
        compute_infer=Duration(48, 7021648834),
        compute_output=Duration(48, 2755455),
        cache_hit=zero,
        cache_miss=zero,
        batch_stats=(),
    )
    entry = model_stats_json(snap)
    assert entry["lastInference"] == "1756351592249"
    assert entry["inferenceStats"]["success"] == {"count": "48", "ns": "7090273130"}
    assert entry["inferenceStats"]["fail"] == {"count": None, "ns": None}
    assert entry["batchStats"] is None


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_autocast_batching() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with BatchedModel("gpu", net, device="cuda", sample_shape=(4,), max_delay_ms=50) as model:
        assert next(model.model.parameters()).device.type == "cuda"
        futures = [model.submit(torch.full((4,), float(i))) for i in range(8)]
        outs = [f.result() for f in futures]
    expected = net.cpu()(torch.stack([torch.full((4,), float(i)) for i in range(8)]))
    for i, out in enumerate(outs):
        assert out.device.type == "cpu" and out.dtype == torch.float32
        torch.testing.assert_close(out, expected[i].detach(), atol=0.05, rtol=0.02)
