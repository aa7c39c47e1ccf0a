"""Benchmark: the classification pipeline against the bare model, dynamic batching, memory.

Issue 4's benchmark. In ONE run, on the same ``--images`` phantom radiographs
(``pipeline/train/phantoms_cxr.py``, 256x256, written as CR and DX DICOM files, seeds
1000 on):

1. bare: the ``cxr-findings`` bundle loaded with ``pipeline.bundle.load_model``, every
   image loaded and preprocessed once, then the network as the engine runs it
   (``model.network_for(x)``: on CPU the frozen TorchScript trace the node serves, in
   channels-last order) under ``torch.inference_mode()`` at batch 1 and batch 8 (after
   a warm-up), per image. On
   CPU the forward passes run with the torch threads ONE engine worker gets (the
   runner's ``parallelism``: 2 single-threaded workers on 2 CPUs), so that the ratio
   below compares like with like (``--default-threads`` also times torch's default
   thread count, for information); on CUDA under float16 autocast, as the engine.
2. pipeline: per image from the DICOM file to the predictions JSON (seed-001 shape, no
   heatmap, no PNGs) through the code the node's ``/single_inference`` runs:
   ``pipeline.io.load_image_2d`` -> ``PipelineRunner.classify(explain=False)`` (the
   batching engine, ``max_batch`` 8, ``max_delay_ms`` 5) -> ``build_predictions`` ->
   ``write_json``. Batch 1: one file after the other. Batch 8: 8 files handed over
   together (``PipelineRunner.classify_many``: one engine batch of 8). Per image, and
   the ratio pipeline/bare at each; the engine's own statistics give the batch sizes
   it really ran. The pipeline's probabilities are checked against the bare model's.
3. throughput: 8 caller threads (``--callers``) each running the per-image path of (2)
   in a loop for ``--seconds`` (after ``--warmup`` s), with the engine's dynamic
   batching on (``max_batch`` 8) and off (``max_batch`` 1): requests/s and the ratio.
4. memory, each in its own subprocess so that the figure is that process's alone
   (``/proc/<pid>/status`` VmRSS and VmHWM):
   - the node: ``dicom-node serve`` with both demo models (cxr-findings, ct-organs),
     read once ``GET /ping`` says healthy (models loaded and warmed up); also a bare
     process holding only a started ``PipelineRunner`` with both models;
   - the peak (VmHWM) of a process that runs the ``ct-organs`` pipeline
     (``PipelineRunner.run``: load the series, the bundle's SlidingWindowInferer,
     artifacts json/png/pdf/seg as in ``configs/node.yaml``) on a 512x512x``--ct-slices``
     CT phantom. The phantom (``pipeline/train/phantoms_ct.py``) is drawn at 128x128
     in-plane, 3 mm pixels, and upsampled (trilinear, plus 10 HU noise) to 512x512,
     0.75 mm pixels: drawing it at full size needs ~11 GB. ``--skip-ct`` skips it.

Targets (issue 4): pipeline/bare <= 1.3 per image at batch 8; dynamic batching >= 1.5x
the unbatched throughput at 8 callers; node RSS <= 1.5 GB with both models (CPU); peak
<= 4 GB segmenting the 512x512x300 CT. Prints a table, the ratios and target met/MISSED;
``--json FILE`` writes everything. Not a test: the machine is shared and noisy; read
the ratios. With ``--device cuda`` (or ``auto`` on a GPU machine) the same phases run
on the GPU and the CT phase also reports the GPU's peak allocated memory.

    .venv/bin/python bench/pipeline.py                     # the full run
    .venv/bin/python bench/pipeline.py --images 16 --seconds 5 --ct-slices 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Before anything imports `pipeline`: this file's own folder would shadow the package.
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.artifacts.predictions import build_predictions, write_json  # noqa: E402
from pipeline.bundle import LoadedModel, load_model  # noqa: E402
from pipeline.engine import select_device  # noqa: E402
from pipeline.io import Image2D, load_image_2d  # noqa: E402
from pipeline.runner import PipelineRunner, parallelism  # noqa: E402
from pipeline.settings import ModelSpec, Output, PipelineSpec, SeriesRules  # noqa: E402

CXR = ROOT / "pipeline" / "models" / "cxr-findings"
CT = ROOT / "pipeline" / "models" / "ct-organs"
MODALITIES = ["CR", "DX"]
# As configs/node.yaml has them: the figures are the node's.
CT_OUTPUTS = [Output.JSON, Output.PNG, Output.PDF, Output.SEG, Output.SR]
TARGET_BATCH8 = 1.3
TARGET_BATCHING = 1.5
TARGET_RSS_MB = 1.5 * 1024
TARGET_CT_PEAK_MB = 4 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mb(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM... of a process in KiB, from ``/proc/<pid>/status``."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# -- inputs ----------------------------------------------------------------------------------


def write_radiographs(folder: Path, count: int) -> list[Path]:
    """``count`` chest phantoms as single-frame DICOM files, CR and DX alternately."""
    from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom

    paths = []
    for i in tqdm(range(count), desc="radiographs", unit="file", leave=False):
        modality = MODALITIES[i % 2]
        paths.append(write_dicom(make_cxr_phantom(1000 + i), folder / f"{i:03d}.dcm",
                                 modality=modality))
    return paths


def write_reference_bundle(folder: Path) -> Path:
    """A MONAI bundle of the issue's reference network: DenseNet121, 224 x 224, 11 outputs.

    Untrained (seeded random weights, saved as ``model.pt`` + ``network_def``): it is
    there to time the pipeline around a network of the size the issue's reference
    figures are for, through exactly the code the demo model runs.
    """
    labels = json.loads((CXR / "configs" / "metadata.json").read_text())["labels"]
    network_def = {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1,
                   "out_channels": len(labels)}
    inference = {
        "network_def": network_def,
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"},
            {"_target_": "Resize", "spatial_size": [224, 224], "mode": "area"},
            {"_target_": "ScaleIntensity", "minv": 0.0, "maxv": 1.0},
            {"_target_": "EnsureType", "dtype": "$torch.float32"}]},
        "inferer": {"_target_": "SimpleInferer"},
    }
    metadata = {"name": "densenet121-reference", "version": "0.0.1", "task": "classify",
                "labels": labels, "spatial_size": [224, 224],
                "description": "untrained DenseNet121 at 224x224, for timing only"}
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(parents=True, exist_ok=True)
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(labels))
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


# -- phase 1: the bare model -----------------------------------------------------------------


@dataclass
class Bare:
    threads: int
    ms_b1: float
    ms_b8: float
    probabilities: list[list[float]]


def time_bare(model: LoadedModel, xs: list[torch.Tensor], threads: int, batch: int,
              repeat: int) -> tuple[float, float, list[list[float]]]:
    """Median per-image ms of the model's network (as the engine runs it) at batch 1 and
    ``batch`` over ``repeat`` passes, and the probabilities it gives."""
    device = model.device
    one = [x[None].to(device) for x in xs]
    many = [torch.stack(list(c)).to(device) for c in chunks(xs, batch)]
    network = model.network_for(one[0])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # As the engine runs it: float16 autocast on CUDA (the node's default), fp32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
    try:
        with torch.inference_mode(), autocast:
            for _ in range(3):  # warm-up: allocator, kernels, OpenMP pool
                network(one[0])
                network(many[0])
            sync()
            b1, bn = [], []
            for _ in tqdm(range(repeat), desc=f"bare, {threads} thread(s)", leave=False):
                t0 = time.perf_counter()
                for x in one:
                    network(x)
                sync()
                b1.append((time.perf_counter() - t0) / len(xs))
                t0 = time.perf_counter()
                for x in many:
                    network(x)
                sync()
                bn.append((time.perf_counter() - t0) / len(xs))
            probs = torch.cat([torch.sigmoid(network(x).float()).cpu() for x in many])
    finally:
        torch.set_num_threads(before)
    return statistics.median(b1) * 1e3, statistics.median(bn) * 1e3, probs.tolist()


# -- phase 2 and 3: the pipeline ---------------------------------------------------------------


def cxr_runner(device: str, max_batch: int, bundle: Path = CXR) -> PipelineRunner:
    runner = PipelineRunner(
        [ModelSpec(name="cxr-findings", path=bundle, device=device,  # type: ignore[arg-type]
                   max_batch=max_batch, max_delay_ms=5.0)],
        [PipelineSpec(name="cxr-findings", model="cxr-findings", task="classify",
                      series=SeriesRules(modalities=MODALITIES), outputs=[Output.JSON])])
    runner.start()
    if runner.failed:
        raise SystemExit(f"cxr-findings failed to load: {runner.failed}")
    return runner


class Path2Json:
    """The per-image pipeline: DICOM file -> predictions JSON, timed by stage."""

    def __init__(self, runner: PipelineRunner, out: Path) -> None:
        self.runner = runner
        self.spec = runner.spec("cxr-findings")
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.stage_s = {"load": 0.0, "model": 0.0, "json": 0.0}
        self.probabilities: dict[Path, list[float]] = {}

    def _json(self, result: Any, study: Any) -> None:
        data = build_predictions(result, study, source_image="", heatmap="")
        write_json(data, self.out / f"{study.patient_id}_predictions.json")
        assert result.source_path is not None
        self.probabilities[result.source_path] = [f.confidence for f in result.findings]

    def one(self, path: Path) -> None:
        t0 = time.perf_counter()
        image = load_image_2d(path, modalities=MODALITIES)
        t1 = time.perf_counter()
        result, study = self.runner.classify(self.spec, image, explain=False)
        t2 = time.perf_counter()
        self._json(result, study)
        t3 = time.perf_counter()
        self._add(t1 - t0, t2 - t1, t3 - t2)

    def many(self, paths: Sequence[Path]) -> None:
        t0 = time.perf_counter()
        images: list[Image2D] = [load_image_2d(p, modalities=MODALITIES) for p in paths]
        t1 = time.perf_counter()
        results = self.runner.classify_many(self.spec, images, explain=False)
        t2 = time.perf_counter()
        for result, study in results:
            self._json(result, study)
        t3 = time.perf_counter()
        self._add(t1 - t0, t2 - t1, t3 - t2)

    def _add(self, load: float, model: float, js: float) -> None:
        self.stage_s["load"] += load
        self.stage_s["model"] += model
        self.stage_s["json"] += js


def engine_counts(runner: PipelineRunner) -> tuple[int, int]:
    s = runner.engine.get("cxr-findings").statistics()
    return s.inference_count, s.execution_count


def avg_batch(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    runs = after[1] - before[1]
    return round((after[0] - before[0]) / runs, 2) if runs else None


def time_pipeline(runner: PipelineRunner, files: list[Path], out: Path, batch: int,
                  repeat: int) -> dict[str, Any]:
    """Median per-image ms at batch 1 and ``batch`` over ``repeat`` passes."""
    work = Path2Json(runner, out)
    for p in files[:batch]:  # warm-up: the first calls import and build transforms
        work.one(p)
    work.many(files[:batch])
    work.stage_s = dict.fromkeys(work.stage_s, 0.0)
    b1, bn = [], []
    stages: dict[str, dict[str, float]] = {"1": {}, str(batch): {}}
    served = {"1": [0, 0], str(batch): [0, 0]}  # requests, forward passes
    for _ in tqdm(range(repeat), desc="pipeline", leave=False):
        for key, run, samples in (("1", work.one, files),
                                  (str(batch), work.many, list(chunks(files, batch)))):
            c0, s0 = engine_counts(runner), dict(work.stage_s)
            t0 = time.perf_counter()
            for item in samples:
                run(item)
            (b1 if key == "1" else bn).append((time.perf_counter() - t0) / len(files))
            c1 = engine_counts(runner)
            served[key][0] += c1[0] - c0[0]
            served[key][1] += c1[1] - c0[1]
            for name, total in work.stage_s.items():
                stages[key][name] = stages[key].get(name, 0.0) + (total - s0[name])
    n = len(files) * repeat
    return {
        "ms_b1": statistics.median(b1) * 1e3,
        "ms_bn": statistics.median(bn) * 1e3,
        "stages_ms": {k: {s: round(v / n * 1e3, 2) for s, v in st.items()}
                      for k, st in stages.items()},
        "engine_batch": {k: avg_batch((0, 0), (r, e)) for k, (r, e) in served.items()},
        "probabilities": work.probabilities,
    }


def throughput(device: str, max_batch: int, files: list[Path], out: Path, callers: int,
               seconds: float, warmup: float, bundle: Path = CXR) -> dict[str, Any]:
    """Requests/s of ``callers`` threads each running DICOM file -> JSON in a loop."""
    runner = cxr_runner(device, max_batch, bundle)
    try:
        stop = threading.Event()
        done = [0] * callers
        errors: list[BaseException] = []

        def caller(i: int) -> None:
            work = Path2Json(runner, out / f"caller{i}")
            k = i
            try:
                while not stop.is_set():
                    work.one(files[k % len(files)])
                    done[i] += 1
                    k += callers
            except BaseException as exc:  # reported below; the others keep going
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(i,), daemon=True)
                   for i in range(callers)]
        for t in threads:
            t.start()
        time.sleep(warmup)
        n0, c0, t0 = sum(done), engine_counts(runner), time.perf_counter()
        for _ in tqdm(range(max(1, round(seconds))), desc=f"{callers} callers, max_batch "
                      f"{max_batch}", unit="s", leave=False):
            time.sleep(seconds / max(1, round(seconds)))
        n1, c1, t1 = sum(done), engine_counts(runner), time.perf_counter()
        stop.set()
        for t in threads:
            t.join()
        if errors:
            raise SystemExit(f"a caller failed: {errors[0]!r}")
        return {"max_batch": max_batch, "requests": n1 - n0, "seconds": round(t1 - t0, 2),
                "rps": (n1 - n0) / (t1 - t0), "engine_batch": avg_batch(c0, c1)}
    finally:
        runner.close()


# -- phase 4: memory, in subprocesses ------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """The subprocess side of phase 4: prints one JSON line on stdout."""
    if args.child == "runner":
        before = proc_status()
        runner = PipelineRunner(
            [ModelSpec(name="cxr-findings", path=CXR, device=args.device),
             ModelSpec(name="ct-organs", path=CT, device=args.device)],
            [PipelineSpec(name="cxr-findings", model="cxr-findings", task="classify"),
             PipelineSpec(name="ct-organs", model="ct-organs", task="segment")])
        runner.start()
        after = proc_status()
        runner.close()
        print(json.dumps({"failed": runner.failed, "rss_imports_kib": before["VmRSS"],
                          "rss_kib": after["VmRSS"], "hwm_kib": after["VmHWM"]}))
    elif args.child == "make-ct":
        print(json.dumps(make_ct(args.ct_dir, args.ct_slices, args.ct_size)))
    elif args.child == "segment":
        print(json.dumps(segment(args.ct_dir, args.out_dir, args.device)))
    return 0


def make_ct(folder: Path, slices: int, size: int) -> dict[str, Any]:
    """A ``slices`` x ``size`` x ``size`` CT phantom series (see the module docstring)."""
    from pipeline.train.phantoms_ct import CTPhantom, make_ct_phantom, write_dicom_series

    low = min(size, 128)
    fov_mm, length_mm = 384.0, 240.0  # phantoms_ct's default field: 96 x 4 mm, 48 x 5 mm
    seed = 4242
    small = make_ct_phantom(seed, shape=(slices, low, low),
                            spacing=(length_mm / slices, fov_mm / low, fov_mm / low))
    vol = torch.nn.functional.interpolate(
        torch.from_numpy(small.volume)[None, None], size=(slices, size, size),
        mode="trilinear", align_corners=False)[0, 0].numpy()
    rng = np.random.default_rng(seed)
    for k in range(slices):  # the fine grain that interpolation smoothed away
        vol[k] += rng.normal(0, 10, (size, size)).astype(np.float32)
    spacing = (length_mm / slices, fov_mm / size, fov_mm / size)
    phantom = CTPhantom(seed=seed, volume=vol, labels=np.zeros((1, 1, 1), np.uint8),
                        spacing=spacing, sex=small.sex, age=small.age)
    write_dicom_series(phantom, folder, patient_id="BENCH-CT")
    voxel_ml = float(np.prod(small.spacing)) / 1000
    return {"shape": [slices, size, size], "spacing_mm": list(spacing),
            "truth_ml": {str(i): round(float((small.labels == i).sum()) * voxel_ml, 1)
                         for i in range(1, int(small.labels.max()) + 1)}}


def segment(folder: Path, out: Path, device: str) -> dict[str, Any]:
    runner = PipelineRunner(
        [ModelSpec(name="ct-organs", path=CT, device=device)],  # type: ignore[arg-type]
        [PipelineSpec(name="ct-organs", model="ct-organs", task="segment",
                      series=SeriesRules(modalities=["CT"], min_instances=8),
                      outputs=CT_OUTPUTS)])
    runner.start()
    if runner.failed:
        raise SystemExit(f"ct-organs failed to load: {runner.failed}")
    model = runner.model("ct-organs")
    loaded = proc_status()
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    files = sorted(folder.glob("*.dcm"))
    t0 = time.perf_counter()
    result = runner.run("ct-organs", files, out)
    wall = time.perf_counter() - t0
    peak = proc_status()
    runner.close()
    seg = result.result
    return {
        "instances": len(files),
        "inferer": model.inferer,
        "device": str(model.device),
        "rss_loaded_kib": loaded["VmRSS"],
        "hwm_kib": peak["VmHWM"],
        "gpu_peak_mib": (round(torch.cuda.max_memory_allocated(model.device) / 2**20, 1)
                         if model.device.type == "cuda" else None),
        "wall_s": round(wall, 2),
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "segments_ml": {s.name: s.volume_ml for s in getattr(seg, "segments", [])},
        "artifacts": sorted(a.kind for a in result.artifacts),
    }


def run_child(mode: str, extra: list[str], timeout: float = 3600) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} subprocess failed ({res.returncode}):\n{res.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return data


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def node_process(work: Path, device: str) -> Iterator[subprocess.Popen[bytes]]:
    """``dicom-node serve`` with both demo models; yields once ``GET /ping`` is healthy."""
    http_port, dicom_port = free_port(), free_port()
    config = work / "node.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "storage": {"min_free_mb": 0},
        "dimse": {"host": "127.0.0.1", "port": dicom_port},
        "rest": {"host": "127.0.0.1", "port": http_port},
        "ae_titles": [{"ae_title": "DICOMNODE", "pipelines": ["cxr-findings", "ct-organs"]}],
        "watch": [],
        "models": [{"name": "cxr-findings", "path": str(CXR), "device": device},
                   {"name": "ct-organs", "path": str(CT), "device": device}],
        "pipelines": [
            {"name": "cxr-findings", "model": "cxr-findings", "task": "classify",
             "series": {"modalities": MODALITIES}},
            {"name": "ct-organs", "model": "ct-organs", "task": "segment",
             "series": {"modalities": ["CT"], "min_instances": 8}}],
        "logging": {"level": "warning", "format": "json"},
    }, indent=1), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env["PYTHONPATH"] = str(ROOT)
    logfile = (work / "node.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config),
         "--data-dir", str(work / "node-data")],
        env=env, cwd=work, stdout=logfile, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited with {proc.returncode}: "
                                   f"{(work / 'node.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ping", timeout=5):
                    break  # 200: both models loaded and warmed up
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the node did not become healthy within 300 s")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()


def memory(work: Path, device: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        with node_process(work, device) as proc:
            time.sleep(2)  # let start-up garbage settle
            st = proc_status(proc.pid)
            out["node"] = {"rss_kib": st["VmRSS"], "hwm_kib": st["VmHWM"]}
    except RuntimeError as exc:
        log(f"  node: {exc}")
        out["node"] = {"error": str(exc)}
    out["runner"] = run_child("runner", ["--device", device])
    return out


# -- report --------------------------------------------------------------------------------------


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="phantom radiographs (default 64)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the models run (default auto: cuda when present)")
    ap.add_argument("--batch", type=int, default=8, help="the batch size compared with 1 "
                    "and the engine's max_batch (default 8)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed passes over the images in phases 1-2; medians (default 3)")
    ap.add_argument("--default-threads", action="store_true",
                    help="also time the bare model at torch's default thread count (on a "
                         "busy machine its batch-1 passes can take very long)")
    ap.add_argument("--callers", type=int, default=8,
                    help="concurrent caller threads in phase 3 (default 8)")
    ap.add_argument("--seconds", type=float, default=30.0,
                    help="measured seconds of each throughput run (default 30)")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="unmeasured seconds before each throughput run (default 3)")
    ap.add_argument("--ct-slices", type=int, default=300, help="CT slices (default 300)")
    ap.add_argument("--ct-size", type=int, default=512, help="CT rows = columns (default 512)")
    ap.add_argument("--skip-ct", action="store_true", help="skip the CT segmentation peak")
    ap.add_argument("--skip-memory", action="store_true",
                    help="skip phase 4 altogether (node and runner RSS, CT peak)")
    ap.add_argument("--reference-network", action="store_true",
                    help="phases 1-3 on an untrained DenseNet121 at 224x224 (the network the "
                         "issue's reference figures are for) instead of the demo model; "
                         "implies --skip-memory")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--child", choices=["runner", "make-ct", "segment"], help=argparse.SUPPRESS)
    ap.add_argument("--ct-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.images < args.batch or args.images % args.batch:
        ap.error(f"--images must be a multiple of --batch ({args.batch})")
    if args.ct_slices < 8 or args.ct_size < 16:
        ap.error("--ct-slices must be at least 8 and --ct-size at least 16")
    if args.reference_network:
        args.skip_memory = True
    try:
        device = select_device(args.device)
    except Exception as exc:
        ap.error(str(exc))
    dev = device.type
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    doc: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": cpus, "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if dev == "cuda" else None,
                    "load_avg_start": round(os.getloadavg()[0], 2)},
        "settings": {k: v for k, v in vars(args).items()
                     if k not in ("child", "ct_dir", "out_dir", "json")},
    }
    try:
        log(f"load average {os.getloadavg()[0]:.2f} on {cpus} CPUs; device {device}; "
            f"work dir {work}")
        files = write_radiographs(work / "cxr", args.images)
        bundle = write_reference_bundle(work / "densenet121") if args.reference_network \
            else CXR
        network = "DenseNet121 224x224 (untrained)" if args.reference_network \
            else "cxr-findings"
        doc["network"] = network

        # 1. bare
        model = load_model(bundle, device)
        workers, per_worker = parallelism(ModelSpec(name="cxr-findings", path=bundle), model)
        engine_threads = per_worker or torch.get_num_threads()
        xs = [model.preprocess(load_image_2d(p).pixels) for p in files]
        log(f"bare network (as the engine runs it): {args.images} images, "
            f"input {tuple(xs[0].shape)}")
        default_threads = torch.get_num_threads()
        b1, bn, bare_probs = time_bare(model, xs, engine_threads, args.batch, args.repeat)
        bare = Bare(engine_threads, b1, bn, bare_probs)
        info_b1 = info_bn = None
        if args.default_threads and dev == "cpu" and default_threads != engine_threads:
            info_b1, info_bn, _ = time_bare(model, xs, default_threads, args.batch, args.repeat)
        del model

        # 2. pipeline, per image
        log(f"pipeline DICOM -> predictions JSON: engine {workers} worker(s) x "
            f"{per_worker or 'default'} torch thread(s), max_batch {args.batch}")
        runner = cxr_runner(args.device, args.batch, bundle)
        try:
            pipe = time_pipeline(runner, files, work / "json", args.batch, args.repeat)
        finally:
            runner.close()
        diffs = [abs(a - b) for i, p in enumerate(files)
                 for a, b in zip(pipe["probabilities"][p], bare.probabilities[i], strict=True)]
        max_diff = max(diffs)  # the JSON rounds to 4 decimals: <= 5e-5 plus float noise
        if max_diff > (1e-3 if dev == "cpu" else 2e-2):  # float16 on CUDA
            raise SystemExit(f"the pipeline's probabilities differ from the bare model's by "
                             f"{max_diff:.4f}: not the same computation")
        ratio1, ratio_n = pipe["ms_b1"] / bare.ms_b1, pipe["ms_bn"] / bare.ms_b8

        # 3. throughput
        tp = {}
        for mb_ in (args.batch, 1):
            log(f"throughput: {args.callers} callers, max_batch {mb_}, {args.seconds:g} s")
            tp[mb_] = throughput(args.device, mb_, files, work / f"tp{mb_}", args.callers,
                                 args.seconds, args.warmup, bundle)
        tp_ratio = tp[args.batch]["rps"] / tp[1]["rps"] if tp[1]["rps"] else None

        # 4. memory
        mem: dict[str, Any] = {}
        ct: dict[str, Any] | None = None
        if not args.skip_memory:
            log("memory: dicom-node serve with both demo models; a runner-only process")
            mem = memory(work, args.device)
            if not args.skip_ct:
                log(f"CT phantom {args.ct_size}x{args.ct_size}x{args.ct_slices} ...")
                made = run_child("make-ct", ["--ct-dir", str(work / "ct"),
                                             "--ct-slices", str(args.ct_slices),
                                             "--ct-size", str(args.ct_size)])
                log("segmenting it with the ct-organs pipeline in a fresh process ...")
                ct = {**made, **run_child("segment", ["--ct-dir", str(work / "ct"),
                                                      "--out-dir", str(work / "ct-out"),
                                                      "--device", args.device])}
                shutil.rmtree(work / "ct", ignore_errors=True)

        # report
        n, b = args.images, args.batch
        print(f"\npipeline benchmark: {network} on {device}"
              f"{' (' + doc['machine']['gpu'] + ')' if doc['machine']['gpu'] else ''}, "
              f"{n} phantom radiographs (CR/DX 256x256 -> {tuple(xs[0].shape[1:])}), "
              f"medians of {args.repeat} passes")
        print(f"engine: {workers} worker(s) x {per_worker or 'default'} torch thread(s), "
              f"max_batch {b}, max_delay 5 ms; load average {os.getloadavg()[0]:.2f} "
              f"on {cpus} CPUs")
        print(f"\n{'ms per image':44s}{'batch 1':>10s}{'batch ' + str(b):>10s}")
        print(f"{'bare network, ' + str(bare.threads) + ' thread(s)':44s}"
              f"{bare.ms_b1:10.2f}{bare.ms_b8:10.2f}")
        if info_b1 is not None:
            print(f"{'  (info) bare, torch default ' + str(default_threads) + ' threads':44s}"
                  f"{info_b1:10.2f}{fmt(info_bn, '.2f'):>10s}")
        print(f"{'pipeline DICOM file -> predictions JSON':44s}"
              f"{pipe['ms_b1']:10.2f}{pipe['ms_bn']:10.2f}")
        for stage in ("load", "model", "json"):
            print(f"{'  ' + stage:44s}{pipe['stages_ms']['1'][stage]:10.2f}"
                  f"{pipe['stages_ms'][str(b)][stage]:10.2f}")
        print(f"{'  engine batch size (mean, from its stats)':44s}"
              f"{fmt(pipe['engine_batch']['1'], '.2f'):>10s}"
              f"{fmt(pipe['engine_batch'][str(b)], '.2f'):>10s}")
        print(f"{'pipeline - bare (overhead)':44s}{pipe['ms_b1'] - bare.ms_b1:10.2f}"
              f"{pipe['ms_bn'] - bare.ms_b8:10.2f}")
        print(f"{'ratio pipeline/bare':44s}{ratio1:10.2f}{ratio_n:10.2f}"
              f"   target <= {TARGET_BATCH8} at batch {b}: "
              f"{verdict(ratio_n, TARGET_BATCH8, False)}")
        print(f"  (pipeline probabilities = bare model's, max |diff| {max_diff:.1e})")
        print(f"\nthroughput, {args.callers} callers (threads), DICOM file -> JSON, "
              f"{args.seconds:g} s each")
        for mb_, label in ((b, f"dynamic batching (max_batch {b})"),
                           (1, "unbatched (max_batch 1)")):
            r = tp[mb_]
            print(f"  {label:40s}{r['rps']:8.1f} req/s   mean engine batch "
                  f"{fmt(r['engine_batch'], '.2f')}")
        print(f"  ratio batched/unbatched {fmt(tp_ratio, '.2f')}   target >= "
              f"{TARGET_BATCHING}: {verdict(tp_ratio, TARGET_BATCHING, True)}")
        if mem:
            node = mem["node"]
            run_ = mem["runner"]
            print("\nmemory (VmRSS / VmHWM of each process, MB)")
            if "rss_kib" in node:
                print(f"  dicom-node serve, both demo models, healthy   "
                      f"{mb(node['rss_kib']):8.1f}  (peak {mb(node['hwm_kib'])})   "
                      f"target <= {TARGET_RSS_MB:.0f}: "
                      f"{verdict(mb(node['rss_kib']), TARGET_RSS_MB, False)}")
            else:
                print(f"  dicom-node serve: FAILED ({node.get('error', '')[:200]})")
            print(f"  runner-only process, both models started      {mb(run_['rss_kib']):8.1f}"
                  f"  (after imports {mb(run_['rss_imports_kib'])})")
        if ct is not None:
            shape = "x".join(str(s) for s in ct["shape"][::-1])
            print(f"  segmenting a {shape} CT (ct-organs pipeline)  "
                  f"{mb(ct['hwm_kib']):8.1f}  peak   target <= {TARGET_CT_PEAK_MB:.0f}: "
                  f"{verdict(mb(ct['hwm_kib']), TARGET_CT_PEAK_MB, False)}")
            inf = ct["inferer"] or {}
            print(f"    {inf.get('_target_')} roi {inf.get('roi_size')} sw_batch "
                  f"{inf.get('sw_batch_size')} on {ct['device']}; run {ct['wall_s']} s "
                  f"({', '.join(f'{k} {v}' for k, v in ct['timings_s'].items())}); "
                  f"artifacts {', '.join(ct['artifacts'])}")
            if ct["gpu_peak_mib"] is not None:
                print(f"    GPU peak allocated {ct['gpu_peak_mib']} MB")
        doc.update({
            "bare": {"threads": bare.threads, "ms_per_image_b1": round(bare.ms_b1, 3),
                     f"ms_per_image_b{b}": round(bare.ms_b8, 3),
                     "default_threads": default_threads,
                     "default_threads_ms_b1": info_b1, f"default_threads_ms_b{b}": info_bn},
            "pipeline": {"workers": workers, "threads_per_worker": per_worker,
                         "ms_per_image_b1": round(pipe["ms_b1"], 3),
                         f"ms_per_image_b{b}": round(pipe["ms_bn"], 3),
                         "stages_ms": pipe["stages_ms"], "engine_batch": pipe["engine_batch"],
                         "max_probability_diff": max_diff,
                         "overhead_ms_b1": round(pipe["ms_b1"] - bare.ms_b1, 3),
                         f"overhead_ms_b{b}": round(pipe["ms_bn"] - bare.ms_b8, 3)},
            "ratios": {"pipeline_bare_b1": round(ratio1, 3),
                       f"pipeline_bare_b{b}": round(ratio_n, 3),
                       "batched_unbatched_rps": None if tp_ratio is None else round(tp_ratio, 3)},
            "throughput": {str(k): {**v, "rps": round(v["rps"], 2)} for k, v in tp.items()},
            "memory": mem, "ct": ct,
            "targets": {
                f"pipeline_bare_b{b}": verdict(ratio_n, TARGET_BATCH8, False),
                "batching": verdict(tp_ratio, TARGET_BATCHING, True),
                "node_rss": verdict(mb(mem.get("node", {}).get("rss_kib")), TARGET_RSS_MB,
                                    False) if mem else "n/a",
                "ct_peak": verdict(mb(ct["hwm_kib"]), TARGET_CT_PEAK_MB, False)
                if ct else "n/a"},
        })
        doc["machine"]["load_avg_end"] = round(os.getloadavg()[0], 2)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
            print(f"\nfigures written to {args.json}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
