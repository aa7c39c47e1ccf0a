"""Seed 003's /health and /metrics (JSON modelStats and the Prometheus text format)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rest.metrics import wants_json
from tests.support.serving import CXR, LiveNode, live_node, phantom_png, serving_settings

STAT_KEYS = ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
             "cache_hit", "cache_miss"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    data = tmp_path_factory.mktemp("metrics") / "data"
    with live_node(serving_settings(data, models=[{**CXR, "max_delay_ms": 50}])) as ln:
        yield ln


async def get(live: LiveNode, path: str, headers: dict[str, str] | None = None,
              auth: bool = True) -> tuple[int, str, str]:
    h = {**(live.auth() if auth else {}), **(headers or {})}
    async with aiohttp.ClientSession() as s, s.get(live.base_url + path, headers=h) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def predict(live: LiveNode, n: int) -> None:
    async with aiohttp.ClientSession(headers=live.auth()) as s:
        async def one(i: int) -> None:
            async with s.post(f"{live.base_url}/predictions/cxr-findings",
                              data=phantom_png(i)) as r:
                assert r.status == 200
        await asyncio.gather(*(one(i) for i in range(n)))


def echo(port: int) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


# -- /health -------------------------------------------------------------------------------


async def test_health_is_open_and_names_every_part(live: LiveNode) -> None:
    status, _, text = await get(live, "/health", auth=False)
    assert status == 200
    body = json.loads(text)
    assert body["status"] == "ok" and body["message"] == "The inference server is running."
    assert body["store"] == {"ok": True, "backend": "sqlite", "groups_waiting": 0}
    assert body["dicom"]["state"] == "running" and body["dicom"]["ae_title"] == "DICOMNODE"
    assert body["dicom"]["port"] == live.node.scp.port
    assert body["models"] == {"cxr-findings": {"state": "ready", "versions": ["1.0.0"],
                                               "default": "1.0.0", "device": "cpu"}}


async def test_health_reports_a_failed_model(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("health-broken")
    (root / "bad" / "models").mkdir(parents=True)  # no configs/metadata.json
    models = [CXR, {"name": "bad", "path": str(root / "bad"), "device": "cpu"}]
    with live_node(serving_settings(root / "data", models=models)) as ln:
        status, _, text = await get(ln, "/health", auth=False)
        _, _, admin = await get(ln, "/health", headers={
            "Authorization": f"Bearer {ln.token(scope='admin')}"}, auth=False)
    body = json.loads(text)
    assert status == 200 and body["status"] == "degraded"
    assert body["models"]["bad"]["state"] == "failed"
    assert "metadata.json" in body["models"]["bad"]["error"]
    # the open route gives the reason, not where the server keeps its models
    assert str(root) not in text and "…/metadata.json" in body["models"]["bad"]["error"]
    assert str(root / "bad") in json.loads(admin)["models"]["bad"]["error"]
    assert body["models"]["cxr-findings"]["state"] == "ready"


async def test_health_shows_the_disks_against_the_reserve(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under storage.min_free_mb the node refuses studies and holds jobs back, while
    /health said ok: now it shows the free space of both disks and is degraded."""
    root = tmp_path_factory.mktemp("health-disk")
    settings = serving_settings(root / "data", models=[])
    settings = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"min_free_mb": 10**9})})  # a petabyte: never free
    with live_node(settings) as ln:
        status, _, text = await get(ln, "/health", auth=False)
    body = json.loads(text)
    assert status == 200 and body["status"] == "degraded"
    disk = body["disk"]
    assert disk["ok"] is False and disk["reserve_mb"] == 10**9
    assert disk["studies_free_mb"] > 0 and disk["results_free_mb"] > 0


async def test_health_is_degraded_while_a_drop_folder_takes_nothing(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A missing (paused, misconfigured) drop folder showed in its own entry while the
    node's status read ok; a monitor reading the status alone never learnt of it."""
    from dicom_node.config import WatchSettings

    root = tmp_path_factory.mktemp("health-watch")
    inbox = root / "inbox"
    inbox.mkdir()
    settings = serving_settings(root / "data", models=[]).model_copy(update={
        "watch": [WatchSettings(name="inbox", path=inbox, settle_s=0.1)]})
    with live_node(settings) as ln:
        _, _, text = await get(ln, "/health", auth=False)
        assert json.loads(text)["status"] == "ok"
        inbox.rmdir()
        while True:  # no time limit: pytest-timeout guards the test
            _, _, text = await get(ln, "/health", auth=False)
            body = json.loads(text)
            if body["watch"]["inbox"]["state"] == "missing":
                break
            await asyncio.sleep(0.05)
        assert body["status"] == "degraded"


async def test_health_and_the_apis_say_so_when_the_store_cannot_be_read(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A database overwritten under the running node: /health answered 200 with the
    store ok (its probe was SELECT 1, which SQLite answers without the file) while every
    API that reads the store answered 500; now 503 from both, with the reason."""
    root = tmp_path_factory.mktemp("health-store")
    with live_node(serving_settings(root / "data", models=[])) as ln:
        db = root / "data" / "node.db"
        size = db.stat().st_size
        with db.open("r+b") as f:  # in place: the node's open connections see it
            f.write(b"\xa5" * size)
        for name in ("node.db-wal", "node.db-shm"):  # nor a cached page is trusted
            side = db.with_name(name)
            if side.exists():
                with side.open("r+b") as f:
                    f.write(b"\0" * side.stat().st_size)
        status, _, text = await get(ln, "/health", auth=False)
        assert status == 503
        assert json.loads(text)["store"]["ok"] is False
        status, _, text = await get(ln, "/api/inference/status/1")
        assert status == 503, text
        assert "job store is unavailable" in text
        db.unlink()  # let the node stop without a store to write to


async def test_health_counts_studies_the_store_refused_to_queue(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that answers reads but refuses a study's queuing: /health reads degraded
    and counts the study in store.groups_waiting until the store takes it."""
    import sqlalchemy as sa

    from tests.support.dicom_factory import make_cr_study
    from tests.support.peers import storescu

    monkeypatch.setattr("dicom_node.assembler.QUEUE_RETRY_FIRST_S", 0.05)
    monkeypatch.setattr("dicom_node.assembler.QUEUE_RETRY_MAX_S", 0.2)
    root = tmp_path_factory.mktemp("health-queue")
    study = make_cr_study(root / "src", seed="health-queue")
    with live_node(serving_settings(root / "data", models=[])) as ln:
        store = ln.node.store
        assert store is not None
        with store.engine.begin() as conn:
            conn.execute(sa.text(
                "CREATE TRIGGER refuse BEFORE UPDATE OF queued_at ON instances WHEN "
                "NEW.queued_at IS NOT NULL BEGIN SELECT RAISE(ABORT, 'refused'); END"))
        await asyncio.to_thread(storescu, ln.node.scp.port, study.paths, "DICOMNODE",
                                "MODALITY")

        async def health() -> dict[str, Any]:
            status, _, text = await get(ln, "/health", auth=False)
            assert status == 200
            return dict(json.loads(text))

        while (body := await health())["store"]["groups_waiting"] == 0:
            await asyncio.sleep(0.05)
        assert body["status"] == "degraded" and body["store"]["groups_waiting"] == 1
        with store.engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER refuse"))
        while (body := await health())["store"]["groups_waiting"]:
            await asyncio.sleep(0.05)
        assert body["status"] == "ok"
        assert store.pending_instances() == []


# -- /metrics JSON ---------------------------------------------------------------------------


async def test_metrics_json_in_seed_003_shape(live: LiveNode) -> None:
    await predict(live, 8)
    status, ctype, text = await get(live, "/metrics", {"Accept": "application/json"})
    assert status == 200 and ctype.startswith("application/json")
    stats = json.loads(text)["modelStats"]
    assert [s["name"] for s in stats] == ["cxr-findings"]
    s = stats[0]
    assert list(s) == ["name", "version", "lastInference", "inferenceCount", "executionCount",
                       "inferenceStats", "batchStats"]
    assert s["version"] == "1.0.0"
    assert list(s["inferenceStats"]) == STAT_KEYS
    n = int(s["inferenceCount"])
    assert n >= 8 and 1 <= int(s["executionCount"]) < n  # concurrent requests were batched
    assert s["inferenceStats"]["success"]["count"] == str(n)
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert s["inferenceStats"][key]["count"] == str(n)
        assert int(s["inferenceStats"][key]["ns"]) > 0
    for key in ("fail", "cache_hit", "cache_miss"):  # never recorded: null, as in the seed
        assert s["inferenceStats"][key] == {"count": None, "ns": None}
    assert int(s["lastInference"]) > 1_600_000_000_000  # ms since the epoch
    sizes = {int(b["batchSize"]): b for b in s["batchStats"]}
    assert sum(size * int(b["computeInfer"]["count"]) for size, b in sizes.items()) == n
    assert any(size > 1 for size in sizes)
    for b in s["batchStats"]:
        assert list(b) == ["batchSize", "computeInput", "computeInfer", "computeOutput"]
        assert all(isinstance(v, str) for v in b["computeInfer"].values())


async def test_metrics_need_credentials(live: LiveNode) -> None:
    status, _, _ = await get(live, "/metrics", {"Accept": "application/json"}, auth=False)
    assert status == 401


async def test_anonymous_read_lets_prometheus_scrape_without_a_token(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    data = tmp_path_factory.mktemp("metrics-open") / "data"
    settings = serving_settings(data, models=[CXR])
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(
        update={"anonymous_scopes": ["read"]})})
    with live_node(settings) as ln:
        status, ctype, text = await get(ln, "/metrics", {"Accept": PROMETHEUS_SCRAPE},
                                        auth=False)
        assert status == 200 and ctype.startswith("application/openmetrics-text")
        status, ctype, text = await get(ln, "/metrics", auth=False)  # seed 003's clients
        assert status == 200 and "modelStats" in json.loads(text)
        status, _, _ = await get(ln, "/models", auth=False)  # seed 004's listing: read too
        assert status == 200
        # wrong credentials are refused, not read as none
        status, _, _ = await get(ln, "/metrics", {"Authorization": "Bearer nonsense"},
                                 auth=False)
        assert status == 401
        # the stored studies are never open: the batch API's listings still need a token
        for path in ("/v1/projects", "/v1/sources?projectIdentifier=DICOMNODE",
                     "/dicomweb/studies/1.2.3"):
            status, _, _ = await get(ln, path, auth=False)
            assert status == 401, path
        # infer was not given: the serving routes answer as without the setting
        async with aiohttp.ClientSession() as s, s.post(
                ln.base_url + "/classify_image",
                json={"name": "cxr-findings", "image": "x"}) as r:
            assert r.status == 401 and (await r.json())["message"] == "Token missing"


# -- /metrics Prometheus ---------------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    for s in fams[name].samples:
        if (s.name.endswith("_total") or s.name == name) and all(
                s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


# Prometheus 2.x/3.x's own scrape Accept header
PROMETHEUS_SCRAPE = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                     "application/openmetrics-text;version=0.0.1;q=0.5,"
                     "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
                     "text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


@pytest.mark.parametrize("accept", [None, "*/*", "application/*", "application/json, */*"])
async def test_json_without_an_explicit_text_accept(live: LiveNode, accept: str | None) -> None:
    """Seed 003's clients get its JSON: ingrain's metrics() sends Accept: */*, others none."""
    status, ctype, text = await get(live, "/metrics", {"Accept": accept} if accept else {})
    assert status == 200 and ctype.startswith("application/json")
    assert [s["name"] for s in json.loads(text)["modelStats"]] == ["cxr-findings"]


@pytest.mark.parametrize("accept", ["text/plain", "text/plain;version=0.0.4",
                                    "text/plain, application/json;q=0.5",
                                    "text/plain, application/json"])
async def test_prometheus_text_when_asked(live: LiveNode, accept: str) -> None:
    await predict(live, 4)
    await asyncio.to_thread(echo, live.node.scp.port)
    status, ctype, text = await get(live, "/metrics", {"Accept": accept})
    assert status == 200 and ctype.startswith("text/plain")
    fams = families(text)
    mv = {"model": "cxr-findings", "version": "1.0.0"}
    ok = value(fams, "dicom_node_inference_requests", **mv, outcome="success")
    assert ok >= 4
    assert value(fams, "dicom_node_inference_count", **mv) == ok
    assert 1 <= value(fams, "dicom_node_inference_executions", **mv) <= ok
    assert value(fams, "dicom_node_inference_phase_duration_seconds", **mv,
                 phase="compute_infer") > 0
    assert value(fams, "dicom_node_model_up", **mv) == 1
    assert value(fams, "dicom_node_dimse_associations", outcome="accepted") >= 1
    assert value(fams, "dicom_node_dimse_associations", outcome="released") >= 1
    assert value(fams, "dicom_node_dimse_c_echo") >= 1
    assert value(fams, "dicom_node_dimse_active_associations") == 0
    for state in ("queued", "running", "succeeded", "failed"):
        assert value(fams, "dicom_node_jobs", state=state) == 0
    assert value(fams, "dicom_node_store_instances") == 0


async def test_prometheus_figures_match_the_json(live: LiveNode) -> None:
    await predict(live, 2)
    _, _, text = await get(live, "/metrics", {"Accept": "application/json"})
    stats = json.loads(text)["modelStats"][0]
    _, _, prom = await get(live, "/metrics", {"Accept": "text/plain"})
    fams = families(prom)
    mv = {"model": "cxr-findings", "version": "1.0.0"}
    # nothing ran between the two scrapes
    assert value(fams, "dicom_node_inference_count", **mv) == int(stats["inferenceCount"])
    assert value(fams, "dicom_node_inference_executions", **mv) == int(stats["executionCount"])
    for b in stats["batchStats"]:
        assert value(fams, "dicom_node_inference_batch_executions", **mv,
                     batch_size=b["batchSize"]) == int(b["computeInfer"]["count"])


@pytest.mark.parametrize("accept", ["application/openmetrics-text;version=1.0.0",
                                    PROMETHEUS_SCRAPE])
async def test_openmetrics_when_asked(live: LiveNode, accept: str) -> None:
    status, ctype, text = await get(live, "/metrics", {"Accept": accept})
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


@pytest.mark.parametrize("accept, expected", [
    ("application/json", True),
    ("Application/JSON; charset=utf-8", True),
    ("application/json, text/plain", True),
    ("text/plain, application/json", False),  # an equal q: the first named
    ("text/plain;q=0.5, application/json", True),
    ("text/plain, application/json;q=0.5", False),
    ("application/json;q=0", False),  # JSON refused
    ("application/json;q=0, */*", False),
    ("text/plain;q=0", True),  # text refused
    ("text/plain;q=nonsense", True),
    ("*/*", True),
    ("application/*", True),
    ("text/*", True),  # no explicit Prometheus type
    ("", True),
    ("text/plain", False),
    ("application/openmetrics-text;version=1.0.0,text/plain;q=0.5,*/*;q=0.1", False),
    (PROMETHEUS_SCRAPE, False),
])
def test_wants_json(accept: str, expected: bool) -> None:
    assert wants_json(accept) is expected


async def test_health_says_the_store_is_down_while_it_refuses_writes(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """A locked (or read-only) SQLite file still answers reads: /health said "ok" while
    every C-STORE was refused 0xA700. The last write failing makes it 503 with the
    error, until a write goes through again."""
    import sqlite3

    import sqlalchemy as sa

    from dicom_node.store import NewJob

    root = tmp_path_factory.mktemp("health-writes")
    settings = serving_settings(root / "data", models=[])
    # the scheduler's keeper checks every lease_s / 3 (20 s by default)
    settings = settings.model_copy(update={
        "executor": settings.executor.model_copy(update={"lease_s": 1.5})})
    with live_node(settings) as ln:
        store = ln.node.store
        assert store is not None
        # the node waits 30 s for a lock; a test need not
        sa.event.listen(store.engine, "connect",
                        lambda conn, _: conn.execute("PRAGMA busy_timeout=50"))
        store.engine.dispose()
        holder = sqlite3.connect(root / "data" / "node.db", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(sa.exc.OperationalError):
                await asyncio.to_thread(store.create_job, NewJob(pipeline="p", input={}))
            status, _, text = await get(ln, "/health", auth=False)
            body = json.loads(text)
            assert status == 503 and body["status"] == "degraded"
            assert body["store"]["ok"] is False
            assert "database is locked" in body["store"]["error"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # An idle node writes nothing else: the keeper's own write tells /health (it
        # stayed 503 until the next C-STORE, and a load balancer sent none)
        while (await get(ln, "/health", auth=False))[0] != 200:
            await asyncio.sleep(0.1)  # no time limit: pytest-timeout guards the test
        status, _, text = await get(ln, "/health", auth=False)
        assert status == 200 and "error" not in json.loads(text)["store"]
