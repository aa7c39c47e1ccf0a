"""Benchmark: drop-folder ingestion against DICOM receive (C-STORE) of the same files.

N small synthetic CT instances (64x64, 16-bit) are (a) copied all at once into
a watched folder of a fresh node (``dicom-node serve``), timed from the first
copy until the store holds all N; and (b) pushed by dcmtk ``storescu`` in one
association to the SCP of another fresh node with the same settings, timed
until storescu exits (every instance is stored before its Success). Both nodes
keep full durability (fsync, rename, a store record per instance) and have no
pipeline, so this measures intake only. Prints files/s for both and the ratio
watch/SCP, and checks that every file is accounted for (count in the store,
inputs in ``done/``, nothing in ``failed/``). Not a test: the numbers depend on
the machine and its load.

    PYTHONPATH=. python bench/watch_ingest.py --count 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
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
            raise SystemExit(f"node exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def make_instances(directory: Path, count: int) -> list[Path]:
    """``count`` 64x64 CT instances, one study, 100 per series."""
    directory.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series = [generate_uid() for _ in range((count + 99) // 100)]
    rng = np.random.default_rng(7)
    base = rng.integers(0, 4096, size=(64, 64), dtype=np.uint16)
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series[i // 100]
        ds.PatientID, ds.Modality, ds.InstanceNumber = "BENCH", "CT", i + 1
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        p = directory / f"im{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
        if (i + 1) % 2000 == 0:
            print(f"  written {i + 1}/{count}", flush=True)
    return paths


def start_node(root: Path, name: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A fresh node with a drop folder and an AE title, neither with a pipeline."""
    port = free_port()
    data = root / name
    data.mkdir(parents=True)
    config = {
        "storage": {"data_dir": str(data), "min_free_mb": 0},
        "dimse": {"host": "127.0.0.1", "port": port, "ae_title": "DICOMNODE"},
        "ae_titles": [{"ae_title": "DICOMNODE"}],
        "rest": {"enabled": False},
        "watch": [{"name": "inbox", "path": "inbox", "settle_s": 1.0, "timeout_s": 5}],
        "logging": {"level": "warning", "format": "json"},
    }
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    wait_port(port, proc)
    return proc, port, data


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stored(data: Path, source: str) -> int:
    with sqlite3.connect(f"file:{data / 'node.db'}?mode=ro", uri=True, timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM instances WHERE source = ?",
                              (source,)).fetchone()[0])


def run_watch(root: Path, paths: list[Path]) -> float:
    node, _, data = start_node(root, "watch-node")
    inbox = data / "inbox"
    try:
        while not inbox.is_dir():
            time.sleep(0.05)
        n = len(paths)
        t0 = time.perf_counter()
        for p in paths:  # "dropped at once": copied in as fast as the disk allows
            shutil.copyfile(p, inbox / p.name)
        copied = time.perf_counter() - t0
        print(f"  copied {n} files into the drop folder in {copied:.1f} s", flush=True)
        last = 0.0
        while (count := stored(data, "watch")) < n:
            if node.poll() is not None:
                raise SystemExit(f"node exited with {node.returncode}")
            now = time.perf_counter()
            if now - last >= 2:
                print(f"  watch: {count}/{n} stored ({now - t0:.1f} s)", flush=True)
                last = now
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        deadline = time.monotonic() + 60  # the last moves to done/ follow the records
        while len(os.listdir(inbox / "done")) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        done = len(os.listdir(inbox / "done"))
        failed = len(os.listdir(inbox / "failed")) if (inbox / "failed").exists() else 0
        left = [e for e in os.listdir(inbox) if e not in ("done", "failed")]
        print(f"  watch: store {count}, done/ {done}, failed/ {failed}, left {len(left)}",
              flush=True)
        if (count, done, failed, len(left)) != (n, n, 0, 0):
            raise SystemExit("watch: not every file is accounted for")
        return elapsed
    finally:
        stop(node)


def run_scp(root: Path, src: Path, n: int) -> float:
    node, port, data = start_node(root, "scp-node")
    try:
        env = {**os.environ, "TCP_NODELAY": "1"}
        cmd = ["storescu", "-aec", "DICOMNODE", "-aet", "BENCHSCU", "+sd", "+r",
               "127.0.0.1", str(port), str(src)]
        print(f"  storescu: pushing {n} files in one association...", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"storescu failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
        count = stored(data, "dimse")
        print(f"  scp: store {count}", flush=True)
        if count != n:
            raise SystemExit("scp: not every file is accounted for")
        return elapsed
    finally:
        stop(node)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000, help="files (default 10000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if shutil.which("storescu") is None:
        print("storescu (dcmtk) is not installed", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="watch-bench-"))
    try:
        print(f"writing {args.count} synthetic CT instances (64x64)...", flush=True)
        paths = make_instances(root / "src", args.count)
        print("drop folder:", flush=True)
        w = run_watch(root, paths)
        print(f"  {args.count / w:.1f} files/s", flush=True)
        print("DICOM receive (storescu -> node SCP):", flush=True)
        s = run_scp(root, root / "src", args.count)
        print(f"  {args.count / s:.1f} files/s", flush=True)
        print()
        print(f"{args.count} files, fresh node each, full durability, no pipeline:")
        print(f"  drop folder  {args.count / w:8.1f} files/s  ({w:.1f} s)")
        print(f"  node SCP     {args.count / s:8.1f} files/s  ({s:.1f} s)")
        print(f"  ratio watch/SCP  {s / w:.2f}  (target >= 1.0)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
