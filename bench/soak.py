"""Soak: many studies through one running node; does its memory, fds or threads creep?

Starts ``dicom-node serve`` with the built-in defaults (both demo models, the default AE
title feeding both pipelines) on a temporary data directory, then pushes ``--studies``
chest radiographs with dcmtk ``storescu``, one association each, every one a new study
(the sample files under ``samples/cxr`` with fresh UIDs and patient IDs). After every
``--every`` pushes it waits until the node has finished every job so far (two per study:
cxr-findings runs, ct-organs skips) and prints the node's resident memory (VmRSS),
open file descriptors and threads, read from ``/proc/<pid>``. At the end: the growth
from the first checkpoint (after warm-up) to the last, per 100 studies.

A node that holds on to something per study or per job shows up as a steady climb; a
flat line after the first checkpoint is what a node left running for months needs.
Not a test: it takes minutes (about 0.5 s a study on 2 CPUs). Linux only (``/proc``).

    .venv/bin/python bench/soak.py --studies 700
    .venv/bin/python bench/soak.py --studies 100 --every 25
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.peers import free_port  # noqa: E402

FINISHED = ("succeeded", "failed", "cancelled")


def proc_figures(pid: int) -> dict[str, int]:
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss_mb"] = int(value.split()[0]) // 1024
        elif key == "Threads":
            out["threads"] = int(value)
    return out


def job_states(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    finally:
        conn.close()


def wait_http(port: int, proc: subprocess.Popen[bytes]) -> None:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"dicom-node serve exited with {proc.returncode}; see its log")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
            return
        except OSError:
            time.sleep(0.3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=700, help="studies to push (default 700)")
    ap.add_argument("--every", type=int, default=50,
                    help="print the figures every N studies (default 50)")
    ap.add_argument("--json", type=Path, help="also write the checkpoints to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = ap.parse_args(argv)
    if shutil.which("storescu") is None:
        raise SystemExit("dcmtk's storescu is needed (apt-get install dcmtk)")
    samples = sorted((ROOT / "samples" / "cxr").glob("*.dcm"))
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    data, push = tmp / "data", tmp / "push"
    push.mkdir()
    dicom_port, http_port = free_port(), free_port()
    log = open(tmp / "node.log", "wb")  # noqa: SIM115 - open for the node's lifetime
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "dicom-node"), "serve", "--data-dir", str(data),
         "--dicom-port", str(dicom_port), "--http-port", str(http_port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    checkpoints: list[dict[str, Any]] = []
    try:
        wait_http(http_port, proc)
        start = {"studies": 0, "seconds": 0.0, **proc_figures(proc.pid)}
        print(f"started: {start['rss_mb']} MB, {start['fds']} fds, {start['threads']} threads",
              flush=True)
        t0 = time.monotonic()
        for i in tqdm(range(args.studies), desc="studies", unit="study"):
            ds = pydicom.dcmread(samples[i % len(samples)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = f"SOAK{i:05d}"
            f = push / f"{i}.dcm"
            ds.save_as(f)
            res = subprocess.run(["storescu", "-aec", "DICOMNODE", "127.0.0.1",
                                  str(dicom_port), str(f)], capture_output=True, text=True,
                                 env={**os.environ, "TCP_NODELAY": "1"})
            f.unlink()
            if res.returncode != 0:
                raise SystemExit(f"storescu failed: {res.stderr.strip()[-300:]}")
            if (i + 1) % args.every and i + 1 != args.studies:
                continue
            while sum(job_states(data / "node.db").get(s, 0) for s in FINISHED) < 2 * (i + 1):
                time.sleep(0.2)
            point = {"studies": i + 1, "seconds": round(time.monotonic() - t0, 1),
                     **proc_figures(proc.pid), "jobs": job_states(data / "node.db")}
            checkpoints.append(point)
            tqdm.write(f"{point['studies']:5d} studies {point['seconds']:7.1f} s  "
                       f"RSS {point['rss_mb']:5d} MB  fds {point['fds']:3d}  "
                       f"threads {point['threads']:3d}  jobs {point['jobs']}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    first, last = checkpoints[0], checkpoints[-1]
    span = last["studies"] - first["studies"]
    per100 = (last["rss_mb"] - first["rss_mb"]) * 100 / span if span else 0.0
    print(f"\nafter warm-up ({first['studies']} studies) to the end ({last['studies']}): "
          f"RSS {first['rss_mb']} -> {last['rss_mb']} MB ({per100:+.1f} MB per 100 studies), "
          f"fds {first['fds']} -> {last['fds']}, threads {first['threads']} -> "
          f"{last['threads']}; peak RSS {max(p['rss_mb'] for p in checkpoints)} MB")
    failed = last["jobs"].get("failed", 0)
    if failed:
        print(f"{failed} job(s) failed: see {tmp / 'node.log'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"start": start, "checkpoints": checkpoints}, indent=2))
    if args.keep or failed:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
