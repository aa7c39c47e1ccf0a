"""Benchmark: C-STORE receive throughput of the node's SCP against dcmtk ``storescp``.

N synthetic CT instances (512x512 int16, ~0.5 MB each) are pushed in ONE association
by dcmtk ``storescu`` into (a) the node (``dicom-node serve``, full durability: fsync,
rename, store record before Success) and (b) dcmtk ``storescp +B`` writing to disk,
alternately, ``--runs`` times each. Prints the median throughput of both, the ratio
node/storescp and the node's peak RSS increase while receiving. Not a test: the
numbers depend on the machine and its load.

    PYTHONPATH=. python bench/dimse_receive.py --count 500 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


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


def make_instances(directory: Path, count: int) -> tuple[list[Path], int]:
    """Write ``count`` CT instances of one study/series; returns paths and total bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    base = rng.integers(-1000, 2000, size=(512, 512), dtype=np.int16)
    paths, total = [], 0
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.Modality, ds.InstanceNumber = "BENCH", "CT", i + 1
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        p = directory / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
        total += p.stat().st_size
    return paths, total


def push(port: int, called: str, files_dir: Path) -> float:
    """Send every file in ``files_dir`` with storescu in one association; seconds taken."""
    env = {**os.environ, "TCP_NODELAY": "1"}
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


def start_node(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "DICOM_NODE_REST__ENABLED": "false",
        "DICOM_NODE_DIMSE__HOST": "127.0.0.1",
        "DICOM_NODE_LOGGING__LEVEL": "warning",
        "DICOM_NODE_LOGGING__FORMAT": "json",
        "DICOM_NODE_STORAGE__MIN_FREE_MB": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    # Receiving only: no pipelines, so no job competes for the CPU with the next run (the
    # default configuration would segment each received CT study between runs).
    config = root / "node.yaml"
    config.write_text("ae_titles:\n  - {ae_title: DICOMNODE, pipelines: []}\n"
                      "models: []\npipelines: []\nwatch: []\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config),
         "--data-dir", str(root / "node"), "--dicom-port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    wait_port(port, proc)
    return proc, port


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=500, help="instances per run (default 500)")
    ap.add_argument("--runs", type=int, default=3, help="runs per receiver (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    for exe in ("storescu", "storescp"):
        if shutil.which(exe) is None:
            print(f"{exe} (dcmtk) is not installed", file=sys.stderr)
            return 2

    print(f"load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    root = Path(tempfile.mkdtemp(prefix="dimse-bench-"))
    try:
        print(f"writing {args.count} synthetic CT instances (512x512 int16)...", flush=True)
        _, total = make_instances(root / "src", args.count)
        mb = total / 1e6
        print(f"  {mb:.1f} MB in {root / 'src'}", flush=True)
        node_s: list[float] = []
        dcmtk_s: list[float] = []
        rss_mb: list[float] = []
        node, node_port = start_node(root)
        try:
            for run in range(1, args.runs + 1):
                # The node: a fresh AE title each run is not needed; re-sent instances
                # overwrite (the default duplicate policy), doing the same work again.
                with RssSampler(node.pid) as rss:
                    t = push(node_port, "DICOMNODE", root / "src")
                node_s.append(t)
                rss_mb.append((rss.peak - rss.before) / 2**20)
                print(f"run {run}: node     {mb / t:7.1f} MB/s {args.count / t:7.1f} inst/s "
                      f"(peak RSS +{rss_mb[-1]:.1f} MiB)", flush=True)
                out = root / f"storescp{run}"
                scp, scp_port = start_storescp(out)
                try:
                    t = push(scp_port, "STORESCP", root / "src")
                finally:
                    stop(scp)
                shutil.rmtree(out, ignore_errors=True)
                dcmtk_s.append(t)
                print(f"run {run}: storescp {mb / t:7.1f} MB/s {args.count / t:7.1f} inst/s",
                      flush=True)
        finally:
            stop(node)
        n, d = statistics.median(node_s), statistics.median(dcmtk_s)
        print()
        print(f"median over {args.runs} runs, {args.count} instances, {mb:.1f} MB, "
              "one association each:")
        print(f"  node SCP      {mb / n:7.1f} MB/s  {args.count / n:7.1f} instances/s")
        print(f"  storescp +B   {mb / d:7.1f} MB/s  {args.count / d:7.1f} instances/s")
        per_run = [b / a for a, b in zip(node_s, dcmtk_s, strict=True)]
        print(f"  ratio node/storescp  {d / n:.2f} (of the medians); per run "
              + ", ".join(f"{r:.2f}" for r in per_run)
              + f" (median {statistics.median(per_run):.2f})")
        print(f"  load average at the end: {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs (other work on the machine skews both sides)")
        print(f"  node peak RSS increase while receiving: max {max(rss_mb):.1f} MiB, "
              f"median {statistics.median(rss_mb):.1f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
