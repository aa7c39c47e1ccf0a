"""Benchmark: model serving over HTTP, the node's ``POST /predictions/{model}`` against TorchServe.

In ONE run, the same TorchScript multi-label classifier is served by

(a) TorchServe 0.12, started from its own virtualenv (``--torchserve-venv``), with its
    dynamic batching on (``batch_size`` 8, ``max_batch_delay`` 5 ms, 2 workers) and the
    handler ``bench/torchserve_handler.py`` (decode PNG, resize, batch, sigmoid, findings
    sorted top class first);
(b) the node, ``dicom-node serve`` with a temporary data directory and free ports, hit
    at ``POST /predictions/<model>`` with ``Authorization: Bearer <token>`` (minted with
    ``dicom-node token`` after the node's first start). If that route answers 404 (not
    built yet), the node half is skipped with a message.

The servers run one after the other, never together. Both get the same 64 PNG images
(deterministic chest phantoms from ``pipeline/train/phantoms_cxr.py`` when present, else
synthetic 256x256 grayscale images), sent as the raw request body (``curl -T`` style)
by an asyncio/aiohttp closed-loop client at each concurrency (default 1 and 8) for
``--duration`` seconds after a warm-up. Every non-2xx answer counts as an error.

Prints requests/s, p50, p99 and errors per server and concurrency, the ratios
node/TorchServe, and writes everything to ``--out`` (JSON). Target for the node:
>= 1.5x TorchServe's throughput at concurrency 8 and a lower p99. Not a test: the
numbers depend on the machine and its load; read the ratios.

    .venv/bin/python bench/serving.py --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_TS = REPO / "pipeline" / "models" / "cxr-findings" / "models" / "model.ts"
HANDLER = Path(__file__).resolve().parent / "torchserve_handler.py"
FINDINGS = (
    "Tuberculosis", "Cardiomegaly", "Pleural Thickening", "Pleural Effusion", "Pneumothorax",
    "Consolidation", "Atelectasis", "Nodule Mass", "Fibrosis", "Infiltration", "Calcification",
)
STAND_IN_SIZE = (128, 128)


class BenchError(Exception):
    """A server could not be set up; the message says why."""


class NodeRouteMissing(BenchError):
    """The node answers 404 at /predictions/<model>: the route is not there yet."""


# -- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def wait_http(url: str, limit_s: float, proc: subprocess.Popen[bytes] | None = None,
              what: str = "server", any_status: bool = False) -> int:
    """Wait until ``url`` answers 200 (any HTTP status with ``any_status``); returns it.

    Gives up when ``proc`` exits or the time is up.
    """
    deadline = time.monotonic() + limit_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited early with status {proc.returncode}")
        try:
            status, body = http_get(url, 1.0)
            if status == 200 or any_status:
                return status
            last = f"{status} {body[:200]}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise BenchError(f"{what} did not answer 200 at {url} within {limit_s:.0f} s (last: {last})")


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 300) -> str:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:2])} failed ({res.returncode}):\n"
                         f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res.stdout


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- inputs: images and model --------------------------------------------------------------


def make_images(directory: Path, count: int) -> tuple[list[bytes], str]:
    """Write ``count`` deterministic 8-bit PNGs; returns their bytes and where they came from."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        from pipeline.train.phantoms_cxr import make_cxr_phantom
    except ImportError:
        make_cxr_phantom = None
    bodies: list[bytes] = []
    for i in range(count):
        if make_cxr_phantom is not None:
            arr = make_cxr_phantom(1000 + i, size=256).image
        else:
            rng = np.random.default_rng(1000 + i)
            yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
            arr = 0.5 + 0.25 * np.sin(6 * xx + i) * np.cos(4 * yy) + rng.normal(0, 0.05, (256, 256))
        img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (directory / f"img{i:03d}.png").write_bytes(buf.getvalue())
        bodies.append(buf.getvalue())
    source = ("chest phantoms from pipeline/train/phantoms_cxr.py (seeds 1000..)"
              if make_cxr_phantom is not None else "synthetic 256x256 grayscale (sine + noise)")
    return bodies, source


@dataclass
class ModelInfo:
    ts_path: Path  # the TorchScript file both servers load
    name: str
    labels: list[str]
    spatial_size: tuple[int, int]
    origin: str  # what was used, in words


def _bundle_meta(ts_path: Path) -> dict[str, Any]:
    """metadata.json of the MONAI bundle that holds ``ts_path`` (…/models/model.ts), if any."""
    meta_path = ts_path.parent.parent / "configs" / "metadata.json"
    for candidate in (Path(str(ts_path) + ".json"), ts_path.with_suffix(".json"), meta_path):
        if candidate.is_file():
            data: dict[str, Any] = json.loads(candidate.read_text(encoding="utf-8"))
            return data
    return {}


def _labels(meta: dict[str, Any]) -> list[str]:
    labels = meta.get("labels")
    if isinstance(labels, list) and labels:
        return [str(x) for x in labels]
    try:
        cdef = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        return [str(cdef[k]) for k in sorted(cdef, key=int)]
    except (KeyError, TypeError, ValueError):
        return []


def _spatial(meta: dict[str, Any]) -> tuple[int, int] | None:
    size = meta.get("spatial_size")
    if size is None:
        try:
            size = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
        except (KeyError, TypeError):
            return None
    h, w = (int(s) for s in size)
    return h, w


def build_stand_in(path: Path) -> None:
    """A small randomly initialised MONAI DenseNet (1 channel in, 11 logits out), scripted.

    Same architecture as ``pipeline/train/train_cxr.py``'s network, so its cost per image
    is that of the real demo model; its outputs mean nothing.
    """
    import torch
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    net = DenseNet(spatial_dims=2, in_channels=1, out_channels=len(FINDINGS), init_features=32,
                   growth_rate=16, block_config=(6, 10), bn_size=2).eval()
    try:
        scripted = torch.jit.script(net)
    except Exception:
        scripted = torch.jit.trace(net, torch.zeros(1, 1, *STAND_IN_SIZE))
    scripted.save(str(path))


def prepare_model(requested: Path | None, work: Path, name: str | None) -> ModelInfo:
    ts_copy = work / "model.ts"
    if requested is None and DEFAULT_MODEL_TS.is_file():
        requested = DEFAULT_MODEL_TS
    if requested is not None:
        if not requested.is_file():
            raise BenchError(f"--model-ts {requested}: no such file")
        meta = _bundle_meta(requested)
        labels = _labels(meta) or list(FINDINGS)
        size = _spatial(meta) or STAND_IN_SIZE
        shutil.copyfile(requested, ts_copy)
        info = ModelInfo(ts_copy, name or str(meta.get("name") or "cxr-findings"), labels, size,
                         f"TorchScript {requested}" + (" (labels/size from its metadata)"
                                                       if meta else " (no metadata found: "
                                                       "11 chest findings, 128x128 assumed)"))
    else:
        build_stand_in(ts_copy)
        info = ModelInfo(ts_copy, name or "cxr-findings", list(FINDINGS), STAND_IN_SIZE,
                         "STAND-IN: randomly initialised MONAI DenseNet (11 sigmoid outputs, "
                         f"128x128), scripted to a temp file ({DEFAULT_MODEL_TS.relative_to(REPO)}"
                         " does not exist; pass --model-ts)")
    # Sidecar for the node's bare-TorchScript loader (pipeline/bundle.py).
    sidecar = {"name": info.name, "version": "1.0", "task": "classify", "labels": info.labels,
               "spatial_size": list(info.spatial_size)}
    Path(str(ts_copy) + ".json").write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
    return info


# -- load generator ------------------------------------------------------------------------


@dataclass
class LoadResult:
    server: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    error_samples: list[str] = field(default_factory=list)


async def _closed_loop(url: str, headers: dict[str, str], bodies: list[bytes], concurrency: int,
                       duration_s: float) -> tuple[list[float], int, list[str], float]:
    latencies: list[float] = []
    errors = 0
    samples: list[str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += concurrency
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        payload = await resp.read()
                        ok = 200 <= resp.status < 300
                        if not ok and len(samples) < 5:
                            samples.append(f"HTTP {resp.status}: {payload[:200]!r}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ok = False
                    if len(samples) < 5:
                        samples.append(f"{type(exc).__name__}: {exc}")
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return latencies, errors, samples, elapsed


def measure(server: str, url: str, headers: dict[str, str], bodies: list[bytes],
            concurrency: int, duration_s: float, warmup_s: float) -> LoadResult:
    if warmup_s > 0:
        asyncio.run(_closed_loop(url, headers, bodies, concurrency, warmup_s))
    lat, errors, samples, elapsed = asyncio.run(
        _closed_loop(url, headers, bodies, concurrency, duration_s))
    ms = np.asarray(lat) * 1000.0
    res = LoadResult(
        server=server, concurrency=concurrency, duration_s=round(elapsed, 3),
        requests=len(lat), errors=errors, rps=round(len(lat) / elapsed, 2),
        p50_ms=round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        p99_ms=round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        mean_ms=round(float(ms.mean()), 2) if len(ms) else None,
        error_samples=samples,
    )
    print(f"  {server:10s} c={concurrency:<3d} {res.rps:8.1f} req/s  p50 {_fmt(res.p50_ms)} ms  "
          f"p99 {_fmt(res.p99_ms)} ms  errors {errors}", flush=True)
    for s in samples:
        print(f"      error: {s}", flush=True)
    return res


def _fmt(v: float | None) -> str:
    return f"{v:7.1f}" if v is not None else "    n/a"


def post_once(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode("utf-8", "replace")


def check_answer(server: str, status: int, text: str) -> Any:
    if not 200 <= status < 300:
        raise BenchError(f"{server}: probe request answered HTTP {status}: {text[:500]}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{server}: probe answer is not JSON: {text[:300]}") from exc
    top = data[0] if isinstance(data, list) and data else None
    if not (isinstance(top, dict) and "class" in top and "probability" in top):
        print(f"  warning: {server} answer is not [{{class, probability}}, ...]: {text[:300]}",
              flush=True)
    return data


# -- TorchServe ----------------------------------------------------------------------------


@contextlib.contextmanager
def torchserve(venv: Path, work: Path, model: ModelInfo, *, workers: int, batch_size: int,
               max_batch_delay_ms: int, threads: int) -> Iterator[str]:
    """Archive the model, start TorchServe, register it with batching; yields the base URL."""
    ts_bin, archiver = venv / "bin" / "torchserve", venv / "bin" / "torch-model-archiver"
    for exe in (ts_bin, archiver):
        if not exe.is_file():
            raise BenchError(f"{exe} not found: create the TorchServe venv (see bench/README.md) "
                             "or pass --torchserve-venv / TORCHSERVE_VENV")
    if shutil.which("java") is None:
        raise BenchError("java is not on PATH (TorchServe needs a JDK 17)")
    home = work / "torchserve"
    store, logs, tmp = home / "model-store", home / "logs", home / "tmp"
    for d in (store, logs, tmp):
        d.mkdir(parents=True, exist_ok=True)
    (home / "model_meta.json").write_text(json.dumps(
        {"labels": model.labels, "spatial_size": list(model.spatial_size),
         "torch_threads": threads}), encoding="utf-8")
    env = {**os.environ, "TMPDIR": str(tmp), "LOG_LOCATION": str(logs),
           "METRICS_LOCATION": str(logs), "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    run([str(archiver), "--model-name", model.name, "--version", "1.0",
         "--serialized-file", str(model.ts_path), "--handler", str(HANDLER),
         "--extra-files", str(home / "model_meta.json"), "--export-path", str(store), "-f"],
        env=env)
    ports = {k: free_port() for k in ("inference", "management", "metrics")}
    config = home / "config.properties"
    config.write_text("\n".join([
        f"inference_address=http://127.0.0.1:{ports['inference']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        "disable_token_authorization=true",
        "enable_model_api=true",
        "enable_envvars_config=true",
        "install_py_dep_per_model=false",
        f"default_workers_per_model={workers}",
        f"model_store={store}",
        "disable_system_metrics=true",
        f"vmargs=-Xmx1g -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir={tmp}",
    ]) + "\n", encoding="utf-8")
    pid_file = tmp / ".model_server.pid"
    started = False
    try:
        # `torchserve --start` forks the Java frontend and returns; the frontend inherits
        # the launcher's stdout/stderr, so they go to a file, not to pipes we would wait on.
        started = True  # from here on, always try to stop it
        with (logs / "launcher.log").open("wb") as out:
            res = subprocess.run([str(ts_bin), "--start", "--ncs", "--model-store", str(store),
                                  "--ts-config", str(config),
                                  "--log-config", _log_config(home, logs)],
                                 env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, timeout=120)
        if res.returncode != 0:
            raise BenchError(f"torchserve --start failed ({res.returncode})\n"
                             f"{_tail(logs / 'launcher.log')}")
        base = f"http://127.0.0.1:{ports['inference']}"
        try:
            wait_http(f"{base}/ping", 120, what="TorchServe")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{_tail(logs / 'ts_log.log')}") from None
        mgmt = f"http://127.0.0.1:{ports['management']}"
        query = (f"url={model.name}.mar&model_name={model.name}&batch_size={batch_size}"
                 f"&max_batch_delay={max_batch_delay_ms}&initial_workers={workers}"
                 "&synchronous=true")
        req = urllib.request.Request(f"{mgmt}/models?{query}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise BenchError(f"TorchServe model registration failed: HTTP {exc.code} "
                             f"{exc.read()[:500]!r}\n{_tail(logs / 'model_log.log')}") from None
        status, desc = http_get(f"{mgmt}/models/{model.name}", 10)
        try:
            d = json.loads(desc)[0]
            print(f"  TorchServe: model {model.name}: batchSize {d.get('batchSize')}, "
                  f"maxBatchDelay {d.get('maxBatchDelay')} ms, "
                  f"{len(d.get('workers', []))} workers, torch threads/worker {threads}",
                  flush=True)
        except (ValueError, LookupError, TypeError):
            print(f"  TorchServe: model description: HTTP {status} {desc[:300]}", flush=True)
        yield base
    finally:
        if started:
            _stop_torchserve(ts_bin, env, home, pid_file)


def _log_config(home: Path, logs: Path) -> str:
    """A log4j2 config that writes TorchServe's logs under ``logs`` only, at WARN/INFO."""
    xml = home / "log4j2.xml"
    xml.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <File name="ts_log" fileName="{logs}/ts_log.log">
      <PatternLayout pattern="%d %-5p %c - %m%n"/></File>
    <File name="model_log" fileName="{logs}/model_log.log"><PatternLayout pattern="%d %m%n"/></File>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off" additivity="false"/>
    <Logger name="MODEL_LOG" level="info" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="MODEL_METRICS" level="off" additivity="false"/>
    <Logger name="TS_METRICS" level="off" additivity="false"/>
    <Logger name="org.pytorch.serve" level="info" additivity="false">
      <AppenderRef ref="ts_log"/></Logger>
    <Logger name="io.netty" level="error" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Root level="warn"><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
""", encoding="utf-8")
    return str(xml)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return f"--- {path} (tail) ---\n" + path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} not readable)"


def _stop_torchserve(ts_bin: Path, env: dict[str, str], home: Path, pid_file: Path) -> None:
    pid: int | None = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([str(ts_bin), "--stop"], env=env, cwd=home, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if pid is None:
        return
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        print(f"  TorchServe (pid {pid}) did not stop: killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the node ------------------------------------------------------------------------------


@contextlib.contextmanager
def node(work: Path, model: ModelInfo, *, batch_size: int, max_batch_delay_ms: int
         ) -> Iterator[tuple[str, str]]:
    """Start ``dicom-node serve`` with the model configured; yields (base URL, bearer token)."""
    data = work / "node"
    data.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = work / "node.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "storage": {"min_free_mb": 0},
        "dimse": {"host": "127.0.0.1", "port": dicom_port},
        "rest": {"host": "127.0.0.1", "port": http_port},
        "watch": [],
        "models": [{"name": model.name, "path": str(model.ts_path), "version": "1.0",
                    "device": "cpu", "max_batch": batch_size,
                    "max_delay_ms": max_batch_delay_ms}],
        "logging": {"level": "warning", "format": "json"},
    }, indent=1), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in list(env):
        if k.startswith("DICOM_NODE_"):
            env.pop(k)
    cli = [sys.executable, "-m", "dicom_node.cli"]
    log = (work / "node.log").open("wb")
    proc = subprocess.Popen([*cli, "serve", "--config", str(config), "--data-dir", str(data),
                             "--http-port", str(http_port), "--dicom-port", str(dicom_port)],
                            env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{http_port}"
        try:
            # /ping is part of the seed-004 routes, which may not be there yet: any HTTP
            # answer means the server is up; the probe request then tells the rest.
            if wait_http(f"{base}/ping", 120, proc, what="the node", any_status=True) != 200:
                print("  node: GET /ping is not 200 (seed-004 routes missing?)", flush=True)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{_tail(work / 'node.log')}") from None
        token = run([*cli, "token", "--config", str(config), "--data-dir", str(data),
                     "--expires", "4h", "--scope", "infer"], env=env, cwd=work).strip()
        yield base, token.splitlines()[-1]
    finally:
        stop_process(proc)
        log.close()


# -- report --------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def report(results: list[LoadResult], concurrencies: list[int]) -> dict[str, Any]:
    by = {(r.server, r.concurrency): r for r in results}
    print()
    print(f"{'server':12s}{'conc':>5s}{'req/s':>10s}{'p50 ms':>10s}{'p99 ms':>10s}"
          f"{'errors':>8s}{'requests':>10s}")
    for r in results:
        print(f"{r.server:12s}{r.concurrency:5d}{r.rps:10.1f}{_fmt(r.p50_ms):>10s}"
              f"{_fmt(r.p99_ms):>10s}{r.errors:8d}{r.requests:10d}")
    ratios: dict[str, Any] = {}
    print()
    for c in concurrencies:
        n, t = by.get(("node", c)), by.get(("torchserve", c))
        if n is None or t is None:
            print(f"ratio node/TorchServe at c={c}: n/a (both servers are needed)")
            continue
        rr, pr = ratio(n.rps, t.rps), ratio(n.p99_ms, t.p99_ms)
        ratios[str(c)] = {"throughput": rr, "p99": pr}
        print(f"ratio node/TorchServe at c={c}: throughput {rr}x, p99 {pr}x")
    target: dict[str, Any] = {"throughput_ratio_c8_min": 1.5, "p99_ratio_c8_max": 1.0}
    r8 = ratios.get("8")
    if r8 and r8["throughput"] is not None and r8["p99"] is not None:
        met = r8["throughput"] >= 1.5 and r8["p99"] < 1.0
        target["met"] = met
        print(f"target (node >= 1.5x TorchServe req/s at c=8 and a lower p99): "
              f"{'MET' if met else 'NOT MET'}")
    else:
        target["met"] = None
        print("target (node >= 1.5x TorchServe req/s at c=8 and a lower p99): not measured")
    return {"ratios_node_over_torchserve": ratios, "target": target}


# -- main ----------------------------------------------------------------------------------


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _default_venv() -> Path:
    if os.environ.get("TORCHSERVE_VENV"):
        return Path(os.environ["TORCHSERVE_VENV"])
    for candidate in (REPO / "bench" / ".venv-ts", REPO / ".venv-ts"):
        if (candidate / "bin" / "torchserve").is_file():
            return candidate
    return REPO / "bench" / ".venv-ts"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 epilog=(__doc__ or "").split("\n\n", 1)[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-ts", type=Path, metavar="FILE",
                    help=f"TorchScript classifier (default: {DEFAULT_MODEL_TS.relative_to(REPO)} "
                         "if it exists, else a scripted stand-in DenseNet with 11 outputs)")
    ap.add_argument("--model-name", metavar="NAME",
                    help="name in /predictions/<name> (default: the bundle's name or "
                         "cxr-findings)")
    ap.add_argument("--torchserve-venv", type=Path, metavar="DIR",
                    default=_default_venv(),
                    help="virtualenv holding torchserve and torch-model-archiver "
                         "(default: $TORCHSERVE_VENV, else bench/.venv-ts, else .venv-ts "
                         "at the repo root)")
    ap.add_argument("--servers", default="torchserve,node",
                    help="which servers, comma-separated (default: torchserve,node)")
    ap.add_argument("--concurrency", default="1,8",
                    help="closed-loop concurrencies, comma-separated (default: 1,8)")
    ap.add_argument("--duration", type=float, default=30.0,
                    help="seconds measured per server and concurrency (default 30)")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds of unmeasured load before each measurement (default 5)")
    ap.add_argument("--images", type=int, default=64, help="number of input images (default 64)")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="max batch size on both servers (default 8)")
    ap.add_argument("--max-batch-delay-ms", type=int, default=5,
                    help="max batching delay on both servers, ms (default 5)")
    ap.add_argument("--ts-workers", type=int, default=2,
                    help="TorchServe workers (default 2)")
    ap.add_argument("--ts-threads", type=int, default=0,
                    help="torch threads per TorchServe worker (default: CPUs / workers, >= 1)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "serving.json",
                    help="JSON results file (default bench/out/serving.json)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in ("torchserve", "node"):
            ap.error(f"--servers: unknown server {s!r}")
    cpus = os.cpu_count() or 1
    threads = args.ts_threads or max(1, cpus // args.ts_workers)
    venv = args.torchserve_venv if args.torchserve_venv.is_absolute() \
        else (Path.cwd() / args.torchserve_venv)

    signal.signal(signal.SIGTERM, _sigterm)
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    results: list[LoadResult] = []
    notes: dict[str, str] = {}
    rc = 0
    try:
        print(f"load average at the start: {os.getloadavg()[0]:.2f} on {cpus} CPUs", flush=True)
        bodies, image_source = make_images(work / "images", args.images)
        print(f"inputs: {len(bodies)} PNGs from {image_source} in {work / 'images'}", flush=True)
        model = prepare_model(args.model_ts, work, args.model_name)
        print(f"model: {model.origin}\n  name {model.name!r}, {len(model.labels)} labels, "
              f"input {model.spatial_size[0]}x{model.spatial_size[1]}", flush=True)
        answers: dict[str, Any] = {}
        for server in servers:
            print(f"\n== {server} ==", flush=True)
            try:
                if server == "torchserve":
                    with torchserve(venv, work, model, workers=args.ts_workers,
                                    batch_size=args.batch_size,
                                    max_batch_delay_ms=args.max_batch_delay_ms,
                                    threads=threads) as base:
                        url = f"{base}/predictions/{model.name}"
                        headers = {"Content-Type": "image/png"}
                        answers[server] = check_answer(server, *post_once(url, bodies[0], headers))
                        for c in concurrencies:
                            results.append(measure(server, url, headers, bodies, c,
                                                   args.duration, args.warmup))
                else:
                    with node(work, model, batch_size=args.batch_size,
                              max_batch_delay_ms=args.max_batch_delay_ms) as (base, token):
                        url = f"{base}/predictions/{model.name}"
                        headers = {"Content-Type": "image/png",
                                   "Authorization": f"Bearer {token}"}
                        status, text = post_once(url, bodies[0], headers)
                        deadline = time.monotonic() + 120
                        while status == 503 and time.monotonic() < deadline:  # still loading
                            time.sleep(1)
                            status, text = post_once(url, bodies[0], headers)
                        if status == 404:
                            raise NodeRouteMissing(
                                f"node: POST /predictions/{model.name} answered 404 ({text[:200]})"
                                " - the node's predictions route (seed 004) is not there yet; "
                                "node half SKIPPED")
                        answers[server] = check_answer(server, status, text)
                        for c in concurrencies:
                            results.append(measure(server, url, headers, bodies, c,
                                                   args.duration, args.warmup))
            except NodeRouteMissing as exc:
                print(f"  {exc}", flush=True)
                notes[server] = str(exc)
            except (BenchError, subprocess.SubprocessError) as exc:
                print(f"  {server} FAILED: {exc}", file=sys.stderr, flush=True)
                notes[server] = f"failed: {exc}"
                rc = 1
        if "torchserve" in answers and "node" in answers:
            a, b = answers["torchserve"], answers["node"]
            same = (isinstance(a, list) and isinstance(b, list) and a and b
                    and a[0].get("class") == b[0].get("class"))
            print(f"\nfirst image: top class TorchServe {a[0].get('class')!r} "
                  f"node {b[0].get('class')!r} ({'same' if same else 'DIFFERENT'})", flush=True)
        summary = report(results, concurrencies)
        errors = sum(r.errors for r in results)
        if errors:
            print(f"\n{errors} requests failed (non-2xx or connection errors): see above",
                  flush=True)
            rc = rc or 1
        print(f"load average at the end: {os.getloadavg()[0]:.2f} on {cpus} CPUs "
              "(other work on the machine skews both sides)", flush=True)
        doc = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": cpus, "platform": platform.platform(),
                        "python": platform.python_version()},
            "inputs": {"count": len(bodies), "source": image_source, "format": "PNG 8-bit"},
            "model": {"name": model.name, "origin": model.origin, "labels": model.labels,
                      "spatial_size": list(model.spatial_size)},
            "settings": {"duration_s": args.duration, "warmup_s": args.warmup,
                         "concurrency": concurrencies, "batch_size": args.batch_size,
                         "max_batch_delay_ms": args.max_batch_delay_ms,
                         "torchserve_workers": args.ts_workers,
                         "torchserve_threads_per_worker": threads},
            "results": [asdict(r) for r in results],
            "notes": notes,
            "probe_answers": answers,
            **summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"results written to {args.out}", flush=True)
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        rc = 130
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
