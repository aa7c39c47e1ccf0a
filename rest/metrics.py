"""Health and metrics (seed 003): ``GET /health`` and ``GET /metrics``.

``/health`` (open) says that the server runs, and the state of the store, the
DICOM listener, the drop folders and each model; a drop folder's path on the server
only to a caller with the admin scope. It answers 503 only when the
store is unreachable (nothing works without it); a failed model, a stopped
listener, or studies whose jobs the store refused to queue (``store.groups_waiting``)
make ``status`` ``degraded``.

``/metrics`` answers seed 003's ``{"modelStats": [...]}`` from the inference
engine's statistics, as the seed shows it and its clients read it (ingrain sends
``Accept: */*``). An ``Accept`` that asks for ``text/plain`` or
``application/openmetrics-text`` before JSON (Prometheus' scraper always does) gets
the Prometheus text format (OpenMetrics when asked for) of the same figures plus
the DICOM listener's counters, the store's instance count and jobs by state. A
collector reads the live figures at each scrape into a registry of its own (never
prometheus-client's global one), so several nodes in one process never mix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import dicom_node
from dicom_node.disk import disk_health
from dicom_node.store import SCHEMA_VERSION, JobState
from pipeline.engine import BatchedModel, ModelStatistics
from rest.app import AUTH, NODE, Route
from rest.auth import AuthError
from rest.errors import without_paths

if TYPE_CHECKING:
    from dicom_node.node import Node

RUNNING_MESSAGE = "The inference server is running."
_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


# -- /health ---------------------------------------------------------------------------


def models_health(node: Node, *, with_paths: bool = True) -> dict[str, dict[str, Any]]:
    """Per configured model: ``state`` (loading, ready, failed, stopped) and details; a
    failed model's error names the files it lacks only ``with_paths``."""
    runner = node.runner
    if runner is None:
        state = node.parts.get("models", "starting")
        return {m.name: {"state": "loading" if state in ("starting", "running") else state}
                for m in node.settings.models}
    out: dict[str, dict[str, Any]] = {}
    served: dict[str, list[BatchedModel]] = {}
    for m in runner.engine.models():
        served.setdefault(m.name, []).append(m)
    for spec in runner.specs:
        if spec.name in out:
            continue
        if spec.name in runner.failed:
            error = runner.failed[spec.name]
            out[spec.name] = {"state": "failed",
                              "error": error if with_paths else without_paths(error)}
            continue
        versions = served.get(spec.name, [])
        alive = bool(versions) and all(v.alive for v in versions)
        out[spec.name] = {
            "state": "ready" if alive else "stopped",
            "versions": [v.version for v in versions],
            "default": runner.registry.default_version(spec.name),
            "device": versions[0].device.type if versions else None,
        }
    return out


def dicom_health(node: Node) -> dict[str, Any]:
    """The DICOM listener: state, AE title, port and open associations."""
    scp = node.scp
    body: dict[str, Any] = {"state": node.parts.get("dicom", "not started"),
                            "ae_title": node.settings.dimse.ae_title}
    if scp is not None:
        body["port"] = scp.port
        body["associations"] = scp.counters().active
        if not scp.running:
            body["state"] = "stopped"
    return body


def _admin_asks(request: web.Request) -> bool:
    """Whether the (optional) credentials of a request to the open /health have the
    admin scope."""
    header = request.headers.get("Authorization")
    if not header:
        return False
    try:
        request.app[AUTH].authenticate(header).require("admin")
    except AuthError:
        return False
    return True


def watch_health(node: Node, *, with_paths: bool) -> dict[str, dict[str, Any]]:
    """The drop folders by name; their filesystem paths only ``with_paths`` (an open
    route should not map the server's disks for anyone who asks)."""
    if node.watch is None:
        return {}
    folders = node.watch.status()
    if not with_paths:
        for status in folders.values():
            status.pop("path", None)
    return folders


async def health(request: web.Request) -> web.Response:
    """Open route: the server runs; the state of the store, the listener and each model
    (drop folders' paths only for a caller with the admin scope)."""
    node = request.app[NODE]
    store_ok = await asyncio.to_thread(node.store.ping) if node.store else False
    # A store that answers reads but refuses writes (a locked or read-only SQLite file)
    # refuses every instance: as down as one that does not answer.
    write_problem = node.store.writes.problem() if node.store else None
    store_ok = store_ok and write_problem is None
    admin = _admin_asks(request)
    models = models_health(node, with_paths=admin)
    dicom = dicom_health(node)
    disk = await asyncio.to_thread(disk_health, node.settings)
    watch = watch_health(node, with_paths=admin)
    # Under the reserve the node refuses studies and holds jobs back, and a drop folder
    # that is missing, paused or misconfigured takes nothing: each worth an alert.
    # Complete groups the store refused to queue: their studies wait for it to take
    # writes again (it may still answer the read above).
    waiting = node.assembler.groups_waiting_for_store if node.assembler else 0
    degraded = (not store_ok or waiting > 0 or dicom["state"] != "running" or not disk["ok"]
                or any(m["state"] != "ready" for m in models.values())
                or any(f.get("state") != "watching" for f in watch.values())
                or bool(node.config_skipped))
    body: dict[str, Any] = {
        "status": "degraded" if degraded else "ok",
        "message": RUNNING_MESSAGE,
        "version": dicom_node.__version__,
        "schema": SCHEMA_VERSION,  # the store schema this version uses
        "node": node.settings.node_name,
        "store": {"ok": store_ok, "backend": node.store.dialect if node.store else None,
                  "groups_waiting": waiting,
                  **({"error": write_problem} if write_problem else {})},
        "dicom": dicom,
        "disk": disk,
        # connections now, and those closed: over rest.max_connections, or no complete
        # request head within rest.request_head_timeout_s
        "http": node.http_connections.status() if node.http_connections else None,
        "models": models,
        "parts": dict(node.parts),
        # stored config API objects that do not validate and are not in force
        "config": {"invalid": len(node.config_skipped),
                   "objects": [{"kind": o.kind, "name": o.name} for o in node.config_skipped]},
        "watch": watch,
    }
    return web.json_response(body, status=200 if store_ok else 503)


# -- /metrics ----------------------------------------------------------------------------


# The types a Prometheus scraper asks for; a wildcard (*/*) does not count: it is any
# client's "whatever you have", answered with seed 003's JSON.
_PROMETHEUS_TYPES = frozenset({"text/plain", "application/openmetrics-text"})


def _accept_items(accept: str) -> list[tuple[str, float]]:
    """``(media type, q)`` of each item of an ``Accept`` header, in order; a q that is not
    a number is 0 (not acceptable)."""
    items = []
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        items.append((media.lower(), q))
    return items


def wants_json(accept: str) -> bool:
    """Whether ``/metrics`` answers JSON for this ``Accept`` header: yes unless it names
    ``text/plain`` or ``application/openmetrics-text`` with a higher q than
    ``application/json`` (an equal q: the one named first), or refuses JSON (``q=0``).
    No header, ``*/*`` and ``application/*`` get JSON."""
    as_json: tuple[float, int] | None = None  # (its highest q, where that was named)
    as_text: tuple[float, int] | None = None
    for i, (media, q) in enumerate(_accept_items(accept)):
        if media == "application/json" and (as_json is None or q > as_json[0]):
            as_json = (q, i)
        elif media in _PROMETHEUS_TYPES and (as_text is None or q > as_text[0]):
            as_text = (q, i)
    if as_text is None or as_text[0] == 0:
        return as_json is None or as_json[0] > 0  # JSON, unless refused outright
    if as_json is None or as_json[0] == 0:
        return False
    return as_json[0] > as_text[0] or (as_json[0] == as_text[0] and as_json[1] < as_text[1])


def _seconds(ns: int) -> float:
    return ns / 1e9


class NodeCollector(Collector):
    """Prometheus figures of one node, read from its engine, listener and store."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        yield from self._models()
        yield from self._dimse()
        yield from self._store()

    def _models(self) -> Iterable[Metric]:
        runner = self.node.runner
        stats: list[ModelStatistics] = runner.engine.statistics() if runner else []
        mv = ["model", "version"]
        requests = CounterMetricFamily(
            "dicom_node_inference_requests", "Inference requests by outcome",
            labels=[*mv, "outcome"])
        duration = CounterMetricFamily(
            "dicom_node_inference_request_duration_seconds",
            "Cumulative end-to-end time of inference requests, by outcome",
            labels=[*mv, "outcome"])
        inferences = CounterMetricFamily(
            "dicom_node_inference_count", "Samples inferred (a batch of n counts n)", labels=mv)
        executions = CounterMetricFamily(
            "dicom_node_inference_executions", "Forward passes (batches) run", labels=mv)
        phases = CounterMetricFamily(
            "dicom_node_inference_phase_duration_seconds",
            "Cumulative time requests spent in each phase (queue, compute_input, "
            "compute_infer, compute_output); each request of a batch is charged the batch's "
            "compute time", labels=[*mv, "phase"])
        cache = CounterMetricFamily(
            "dicom_node_inference_cache", "Response cache lookups by result",
            labels=[*mv, "result"])
        batches = CounterMetricFamily(
            "dicom_node_inference_batch_executions", "Forward passes by batch size",
            labels=[*mv, "batch_size"])
        batch_time = CounterMetricFamily(
            "dicom_node_inference_batch_duration_seconds",
            "Cumulative time of forward passes by batch size and phase",
            labels=[*mv, "batch_size", "phase"])
        last = GaugeMetricFamily(
            "dicom_node_inference_last_timestamp_seconds",
            "When the model's last batch finished (Unix time)", labels=mv)
        up = GaugeMetricFamily(
            "dicom_node_model_up", "1 when the model is loaded and its batcher runs",
            labels=mv)
        failed = GaugeMetricFamily(
            "dicom_node_model_load_failed", "1 for a configured model that failed to load",
            labels=["model"])
        for s in stats:
            lv = [s.name, s.version]
            for outcome, d in (("success", s.success), ("fail", s.fail)):
                requests.add_metric([*lv, outcome], d.count)
                duration.add_metric([*lv, outcome], _seconds(d.ns))
            inferences.add_metric(lv, s.inference_count)
            executions.add_metric(lv, s.execution_count)
            for phase in _PHASES:
                phases.add_metric([*lv, phase], _seconds(getattr(s, phase).ns))
            cache.add_metric([*lv, "hit"], s.cache_hit.count)
            cache.add_metric([*lv, "miss"], s.cache_miss.count)
            for b in s.batch_stats:
                size = str(b.batch_size)
                batches.add_metric([*lv, size], b.compute_infer.count)
                for phase, d in (("compute_input", b.compute_input),
                                 ("compute_infer", b.compute_infer),
                                 ("compute_output", b.compute_output)):
                    batch_time.add_metric([*lv, size, phase], _seconds(d.ns))
            if s.last_inference_ms is not None:
                last.add_metric(lv, s.last_inference_ms / 1000.0)
        if runner is not None:
            for m in runner.engine.models():
                up.add_metric([m.name, m.version], 1.0 if m.alive else 0.0)
            for name in runner.failed:
                failed.add_metric([name], 1.0)
        return [requests, duration, inferences, executions, phases, cache, batches, batch_time,
                last, up, failed]

    def _dimse(self) -> Iterable[Metric]:
        assoc = CounterMetricFamily(
            "dicom_node_dimse_associations", "DICOM associations by outcome (accepted, "
            "rejected, released, aborted)", labels=["outcome"])
        active = GaugeMetricFamily("dicom_node_dimse_active_associations",
                                   "DICOM associations open now")
        echo = CounterMetricFamily("dicom_node_dimse_c_echo", "C-ECHO requests answered")
        store = CounterMetricFamily("dicom_node_dimse_c_store",
                                    "C-STORE responses by status", labels=["status"])
        received = CounterMetricFamily("dicom_node_dimse_instances_received",
                                       "Instances received and written (duplicates kept as "
                                       "they were are not counted)")
        scp = self.node.scp
        if scp is not None:
            c = scp.counters()
            for outcome in ("accepted", "rejected", "released", "aborted"):
                assoc.add_metric([outcome], c.associations.get(outcome, 0))
            active.add_metric([], c.active)
            echo.add_metric([], c.c_echo)
            for status, n in sorted(c.c_store.items()):
                store.add_metric([status], n)
            received.add_metric([], c.instances_stored)
        return [assoc, active, echo, store, received]

    def _store(self) -> Iterable[Metric]:
        instances = GaugeMetricFamily("dicom_node_store_instances",
                                      "Instances recorded in the store")
        jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs in the store by state",
                                 labels=["state"])
        store = self.node.store
        if store is not None:
            instances.add_metric([], store.count_instances())
            counts = store.count_jobs()
            for state in JobState:
                jobs.add_metric([state.value], counts.get(state, 0))
        return [instances, jobs]


def prometheus_text(node: Node, accept: str | None) -> tuple[bytes, str]:
    """The node's figures in the format ``accept`` asks for; blocking (the store is read)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if wants_json(request.headers.get("Accept", "")):
        runner = node.runner
        response = web.json_response(runner.engine.metrics_json() if runner
                                     else {"modelStats": []})
    else:
        body, content_type = await asyncio.to_thread(prometheus_text, node,
                                                     request.headers.get("Accept"))
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
    response.headers["Vary"] = "Accept"  # one URL, two formats: caches must not mix them
    return response


def routes() -> list[Route]:
    return [
        Route("GET", "/health", health, scope=None),
        Route("GET", "/metrics", metrics, scope="read", anonymous=True),
    ]
