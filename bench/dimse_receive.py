"""Benchmark: C-STORE receive throughput of the node's SCP against dcmtk ``storescp``.

N synthetic CT instances (512x512 int16, ~0.5 MB each) are pushed in ONE association
by dcmtk ``storescu`` into (a) the node (``dicom-node serve``, full durability: fsync,
rename, store record before Success) and (b) dcmtk ``storescp +B`` writing to disk,
alternately, ``--runs`` times each. Three phases, in one run:

1. idle: nothing else runs; prints the median throughput of both and the ratio
   node/storescp.
2. under inference: the node also serves the cxr-findings demo model, and
   ``--inference-clients`` threads keep posting radiographs to its
   ``/predictions/cxr-findings`` while each receiver (node, then storescp) is pushed to,
   so both receive on a machine equally busy with the node's inference.
3. memory: one multi-frame object of ``--multiframe-mb`` MB (512x512 int16 frames)
   pushed to the node (and to storescp, for the time); prints the node's peak RSS
   increase while receiving it and checks the stored file's size.

4. a default sender: ``--default-sender-count`` small instances (128x128, 32 KB) from
   ``storescu`` without ``TCP_NODELAY``, as dcmtk ships it (Nagle's algorithm on), to
   both receivers: what a modality or PACS that never tuned its sockets sees.

The node's peak resident memory increase is printed for every push. Not a test: the
numbers depend on the machine and its load.

    PYTHONPATH=. python bench/dimse_receive.py --count 500 --runs 3
    PYTHONPATH=. python bench/dimse_receive.py --inference-clients 0 --multiframe-mb 0
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
MODEL = "cxr-findings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"peer exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def make_instances(directory: Path, count: int, size: int = 512) -> tuple[list[Path], int]:
    """Write ``count`` CT instances of one study/series; returns paths and total bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    base = rng.integers(-1000, 2000, size=(size, size), dtype=np.int16)
    paths, total = [], 0
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality, ds.InstanceNumber = "BENCH", "CT", i + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        p = directory / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
        total += p.stat().st_size
    return paths, total


def make_multiframe(directory: Path, megabytes: int) -> Path:
    """Write one multi-frame secondary capture of about ``megabytes`` MB (512x512 int16)."""
    directory.mkdir(parents=True, exist_ok=True)
    frames = max(1, round(megabytes * 1e6 / (512 * 512 * 2)))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid(), generate_uid(), generate_uid())
    ds.PatientID, ds.Modality, ds.InstanceNumber = "BENCH", "OT", 1
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    frame = np.random.default_rng(11).integers(0, 4096, size=(512, 512), dtype=np.int16)
    ds.PixelData = np.broadcast_to(frame, (frames, 512, 512)).tobytes()
    path = directory / "multiframe.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def same_dataset(sent: Path, studies: Path) -> bool:
    """Whether the node kept ``sent``: a file named by its SOP Instance UID whose dataset
    (everything after the file meta, which each receiver writes itself) has the same
    length and ends with the same bytes."""
    src = dcmread(sent, stop_before_pixels=True)
    kept = list(studies.rglob(f"{src.SOPInstanceUID}.dcm"))
    if len(kept) != 1:
        return False

    def dataset_bytes(path: Path) -> int:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        # preamble + "DICM" + the group length element (12 bytes) + the group
        return path.stat().st_size - (132 + 12 + int(meta.FileMetaInformationGroupLength))

    if dataset_bytes(sent) != dataset_bytes(kept[0]):
        return False
    tail = 1 << 20
    with sent.open("rb") as a, kept[0].open("rb") as b:
        a.seek(-tail, os.SEEK_END)
        b.seek(-tail, os.SEEK_END)
        return a.read() == b.read()


def make_pngs(count: int) -> list[bytes]:
    """Small 8-bit radiograph-like PNGs (a bright body, darker lungs, noise)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256]
    bodies = []
    for i in range(count):
        img = 180 - 60 * (((xx - 90 - i) ** 2 + (yy - 128) ** 2) < 50 ** 2)
        img = img - 60 * (((xx - 166 + i) ** 2 + (yy - 128) ** 2) < 50 ** 2)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    return bodies


class InferenceLoad:
    """Client threads posting radiographs to the node's model in a closed loop."""

    def __init__(self, base: str, token: str, clients: int) -> None:
        self.url = f"{base}/predictions/{MODEL}"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
        self.bodies = make_pngs(8)
        self.clients = clients
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(clients)]
        self.seconds = 0.0

    def post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, headers=self.headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            json.loads(resp.read())

    def _run(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            try:
                self.post(self.bodies[i % len(self.bodies)])
            except (OSError, urllib.error.HTTPError, ValueError) as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
                continue
            i += 1
            with self._lock:
                self.done += 1

    def __enter__(self) -> InferenceLoad:
        self.done = 0
        self._stop.clear()
        self._t0 = time.perf_counter()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.seconds = time.perf_counter() - self._t0
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(self.clients)]

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


def push(port: int, called: str, files_dir: Path, nodelay: bool = True) -> float:
    """Send every file in ``files_dir`` with storescu in one association; seconds taken.

    ``nodelay`` sets ``TCP_NODELAY=1`` for storescu (Nagle's algorithm off); without it
    storescu runs as dcmtk ships it, Nagle on.
    """
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    cmd = ["storescu", "-aec", called, "-aet", "BENCHSCU", "+sd", "+r",
           "127.0.0.1", str(port), str(files_dir)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"storescu failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
    return elapsed


class RssSampler:
    """Peak resident memory of a process while a block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Node:
    """``dicom-node serve`` receiving on a free port; with ``model`` it also serves the
    cxr-findings demo model over HTTP (``/predictions``) for the inference phase."""

    def __init__(self, root: Path, *, model: bool) -> None:
        self.root = root
        self.port = free_port()
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env["PYTHONPATH"] = str(REPO)
        self.env = env
        # Receiving only: no pipelines, so no job competes for the CPU with the next run
        # (the default configuration would segment each received CT study between runs).
        models = ([{"name": MODEL, "path": str(REPO / "pipeline/models" / MODEL),
                    "device": "cpu"}] if model else [])
        self.config = root / "node.yaml"
        self.config.write_text(json.dumps({  # JSON is YAML
            "storage": {"min_free_mb": 0},
            "dimse": {"host": "127.0.0.1", "port": self.port},
            "ae_titles": [{"ae_title": "DICOMNODE", "pipelines": []}],
            "rest": {"enabled": model, "host": "127.0.0.1", "port": self.http_port},
            "models": models, "pipelines": [], "watch": [],
            "logging": {"level": "warning", "format": "json"},
        }, indent=1), encoding="utf-8")
        self.data = root / "node"
        self.log = (root / "node.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config),
             "--data-dir", str(self.data)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.token = ""
        try:
            wait_port(self.port, self.proc, 180)
            if model:
                self._wait_http()
                out = subprocess.run(
                    [sys.executable, "-m", "dicom_node.cli", "token", "--config",
                     str(self.config), "--data-dir", str(self.data), "--expires", "4h",
                     "--scope", "infer"], env=env, capture_output=True, text=True, check=True)
                self.token = out.stdout.strip().splitlines()[-1]
        except BaseException:
            self.stop()
            raise

    def _wait_http(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the node exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("the node's HTTP API did not come up")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def start_storescp(out: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "+B", "-od", str(out), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port, proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def median_ratio(node_s: list[float], dcmtk_s: list[float]) -> str:
    per_run = [b / a for a, b in zip(node_s, dcmtk_s, strict=True)]
    n, d = statistics.median(node_s), statistics.median(dcmtk_s)
    return (f"{d / n:.2f} (of the medians); per run " + ", ".join(f"{r:.2f}" for r in per_run))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--count", type=int, default=500, help="instances per run (default 500)")
    ap.add_argument("--runs", type=int, default=3, help="runs per receiver (default 3)")
    ap.add_argument("--size", type=int, default=512, metavar="PIXELS",
                    help="rows and columns of each CT instance (default 512: ~0.5 MB; a "
                         "small size shows the per-message cost)")
    ap.add_argument("--inference-clients", type=int, default=2, metavar="N",
                    help="client threads keeping the node's model busy in phase 2 "
                         "(default 2; 0 skips the phase)")
    ap.add_argument("--multiframe-mb", type=int, default=1024, metavar="MB",
                    help="size of the multi-frame object of phase 3 (default 1024; 0 skips)")
    ap.add_argument("--default-sender-count", type=int, default=200, metavar="N",
                    help="small instances sent in phase 4 by storescu with Nagle's algorithm "
                         "on, as dcmtk ships it (default 200; 0 skips)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    for exe in ("storescu", "storescp"):
        if shutil.which(exe) is None:
            print(f"{exe} (dcmtk) is not installed", file=sys.stderr)
            return 2

    print(f"load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    root = Path(tempfile.mkdtemp(prefix="dimse-bench-"))
    rss_mb: list[float] = []

    def push_node(node: Node, label: str, files: Path, mb: float, count: int,
                  nodelay: bool = True) -> float:
        with RssSampler(node.pid) as rss:
            t = push(node.port, "DICOMNODE", files, nodelay)
        rss_mb.append((rss.peak - rss.before) / 2**20)
        print(f"{label}: node     {mb / t:7.1f} MB/s {count / t:7.1f} inst/s "
              f"(peak RSS +{rss_mb[-1]:.1f} MiB)", flush=True)
        return t

    def push_storescp(label: str, files: Path, mb: float, count: int,
                      nodelay: bool = True) -> float:
        out = root / "storescp"
        scp, scp_port = start_storescp(out)
        try:
            t = push(scp_port, "STORESCP", files, nodelay)
        finally:
            stop(scp)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label}: storescp {mb / t:7.1f} MB/s {count / t:7.1f} inst/s", flush=True)
        return t

    try:
        print(f"writing {args.count} synthetic CT instances ({args.size}x{args.size} int16)...",
              flush=True)
        _, total = make_instances(root / "src", args.count, args.size)
        mb = total / 1e6
        print(f"  {mb:.1f} MB in {root / 'src'}", flush=True)
        node_s: list[float] = []
        dcmtk_s: list[float] = []
        busy_node: list[float] = []
        busy_dcmtk: list[float] = []
        busy_rates: list[float] = []
        errors: list[str] = []
        mf: dict[str, float] = {}
        small_node: list[float] = []
        small_dcmtk: list[float] = []
        node = Node(root, model=args.inference_clients > 0)
        try:
            print("\nphase 1: idle", flush=True)
            for run in range(1, args.runs + 1):
                # Re-sent instances overwrite (the default duplicate policy): same work.
                node_s.append(push_node(node, f"run {run}", root / "src", mb, args.count))
                dcmtk_s.append(push_storescp(f"run {run}", root / "src", mb, args.count))
            if args.inference_clients > 0:
                load = InferenceLoad(node.base, node.token, args.inference_clients)
                load.post(load.bodies[0])  # fails loudly if the model is not served
                print(f"\nphase 2: while {args.inference_clients} clients keep the node's "
                      f"{MODEL} model busy (POST /predictions)", flush=True)
                for run in range(1, args.runs + 1):
                    with load:
                        busy_node.append(push_node(node, f"run {run}", root / "src", mb,
                                                   args.count))
                    busy_rates.append(load.rate)
                    with load:
                        busy_dcmtk.append(push_storescp(f"run {run}", root / "src", mb,
                                                        args.count))
                    busy_rates.append(load.rate)
                    print(f"run {run}: inference {busy_rates[-2]:.1f} / {busy_rates[-1]:.1f} "
                          "req/s during the node / storescp pushes", flush=True)
                errors = load.errors
            if args.multiframe_mb > 0:
                print(f"\nphase 3: one {args.multiframe_mb} MB multi-frame object", flush=True)
                path = make_multiframe(root / "mf", args.multiframe_mb)
                size = path.stat().st_size
                before = len(rss_mb)
                mf["node_s"] = push_node(node, "multi-frame", root / "mf", size / 1e6, 1)
                mf["rss"] = rss_mb[before]
                mf["storescp_s"] = push_storescp("multi-frame", root / "mf", size / 1e6, 1)
                mf["stored"] = float(same_dataset(path, node.data / "studies"))
                mf["mb"] = size / 1e6
            if args.default_sender_count > 0:
                n_small = args.default_sender_count
                print(f"\nphase 4: {n_small} small instances (128x128, 32 KB) from storescu "
                      "as dcmtk ships it (Nagle's algorithm on)", flush=True)
                _, small_total = make_instances(root / "small", n_small, 128)
                small_mb = small_total / 1e6
                for run in range(1, args.runs + 1):
                    small_node.append(push_node(node, f"run {run}", root / "small", small_mb,
                                                n_small, nodelay=False))
                    small_dcmtk.append(push_storescp(f"run {run}", root / "small", small_mb,
                                                     n_small, nodelay=False))
        finally:
            node.stop()
        n, d = statistics.median(node_s), statistics.median(dcmtk_s)
        print()
        print(f"median over {args.runs} runs, {args.count} instances, {mb:.1f} MB, "
              "one association each:")
        print(f"  idle:      node SCP {mb / n:7.1f} MB/s {args.count / n:7.1f} inst/s   "
              f"storescp +B {mb / d:7.1f} MB/s {args.count / d:7.1f} inst/s")
        print(f"  ratio node/storescp (idle)  {median_ratio(node_s, dcmtk_s)}   "
              "(target >= 0.5)")
        if busy_node:
            bn, bd = statistics.median(busy_node), statistics.median(busy_dcmtk)
            print(f"  inference: node SCP {mb / bn:7.1f} MB/s {args.count / bn:7.1f} inst/s   "
                  f"storescp +B {mb / bd:7.1f} MB/s {args.count / bd:7.1f} inst/s   "
                  f"model {statistics.median(busy_rates):.1f} req/s")
            print(f"  ratio node/storescp (both under the node's inference load)  "
                  f"{median_ratio(busy_node, busy_dcmtk)}   (target >= 0.4)")
            print(f"  ratio node under inference / idle storescp  {d / bn:.2f}")
            if errors:
                print(f"  inference errors: {len(errors)}, first: {errors[0]}")
        if mf:
            print(f"  multi-frame {mf['mb']:.0f} MB: node {mf['mb'] / mf['node_s']:.1f} MB/s, "
                  f"storescp {mf['mb'] / mf['storescp_s']:.1f} MB/s, ratio "
                  f"{mf['storescp_s'] / mf['node_s']:.2f}; node peak RSS increase "
                  f"{mf['rss']:.1f} MiB (target <= 150); stored intact: "
                  f"{'yes' if mf['stored'] else 'NO'}")
        if small_node:
            sn, sd = statistics.median(small_node), statistics.median(small_dcmtk)
            k = args.default_sender_count
            print(f"  default sender, {k} x 32 KB: node SCP {k / sn:7.1f} inst/s   "
                  f"storescp +B {k / sd:7.1f} inst/s   ratio node/storescp "
                  f"{median_ratio(small_node, small_dcmtk)}")
        print(f"  load average at the end: {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs (other work on the machine skews both sides)")
        print(f"  node peak RSS increase while receiving, any push: max {max(rss_mb):.1f} MiB, "
              f"median {statistics.median(rss_mb):.1f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
