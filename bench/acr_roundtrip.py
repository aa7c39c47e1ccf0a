"""Benchmark: an ACR inference request's round trip against a real PACS (Orthanc), by stage.

A 1-instance CR chest phantom and a 300-instance CT phantom (``--ct-slices``) are
loaded into Orthanc. For each, ``POST /api/inference`` names the study by UID with a
DIMSE source (C-MOVE into the node) and a DIMSE output (C-STORE of the results back
to Orthanc), and ``GET /api/inference/status/{id}`` is polled (``--poll-ms``, 250)
until it says succeeded; ``--runs`` times each after ``--warmup`` unrecorded runs. The node runs as
``dicom-node serve`` with the demo models (cxr-findings, ct-organs) on this machine.

Per run: the wall time from the POST to the moment the node recorded success (the
status's ``finished``, so it does not depend on the polling pace), and the
stages from the job's status (``timings``): retrieve (C-MOVE, instances stored
with fsync), run (load the DICOM, the model, write the artifacts), export (C-STORE),
and inside the run the model itself (``compute_s``: forward passes and, for the
classifier, Grad-CAM). Non-compute = wall time - compute_s. Target: non-compute
<= 2 s for the 300-instance CT.

Baseline, measured in the same run: dcmtk ``movescu`` moving the same study from
Orthanc to a dcmtk ``storescp`` (what a plain DICOM peer needs for the retrieval);
the ratio node retrieve / movescu is printed. Not a test: the figures depend on the
machine and its load.

    .venv/bin/python bench/acr_roundtrip.py --runs 5
    .venv/bin/python bench/acr_roundtrip.py --runs 5 --interface dicomweb   # WADO-RS, STOW-RS
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.orthanc import DICOMWEB_PLUGIN, Orthanc, orthanc_server  # noqa: E402
from tests.support.peers import free_port, wait_port  # noqa: E402

NODE_AE, BASELINE_AE, MOVER_AE = "DICOMNODE", "STORESCP", "BENCHMOVE"
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's dcmtk stalls without it


@dataclass
class Study:
    name: str
    study_uid: str
    instances: int
    pipeline: str
    walls: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)


def make_studies(folder: Path, ct_slices: int, ct_size: int,
                 cr_size: int = 256) -> tuple[list[Path], list[Path]]:
    from pipeline.train.phantoms_ct import make_ct_phantom, write_dicom_series
    from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom

    cr = write_dicom(make_cxr_phantom(103, size=cr_size), folder / "cr" / "cr.dcm",
                     modality="CR")
    ct = write_dicom_series(make_ct_phantom(7, shape=(ct_slices, ct_size, ct_size)),
                            folder / "ct")
    return [cr], ct


def node_config(data: Path, dicom_port: int, http_port: int, pacs: Orthanc) -> dict[str, Any]:
    return {
        "storage": {"data_dir": str(data), "min_free_mb": 0},
        "dimse": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": dicom_port},
        "ae_titles": [{"ae_title": NODE_AE}],
        "sources": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                     "port": pacs.dicom_port, "dicomweb_url": pacs.dicomweb_url}],
        "destinations": [{"name": "pacs-out", "type": "dimse", "ae_title": pacs.aet,
                          "host": "127.0.0.1", "port": pacs.dicom_port}],
        "models": [{"name": "cxr-findings", "path": "pipeline/models/cxr-findings"},
                   {"name": "ct-organs", "path": "pipeline/models/ct-organs"}],
        "pipelines": [
            {"name": "cxr-findings", "model": "cxr-findings", "task": "classify",
             "series": {"modalities": ["CR", "DX"]},
             "outputs": ["json", "png", "pdf", "sr", "sc", "encapsulated_pdf"]},
            {"name": "ct-organs", "model": "ct-organs", "task": "segment",
             "series": {"modalities": ["CT"], "min_instances": 8},
             "outputs": ["json", "png", "pdf", "seg", "sr"]},
        ],
        "rest": {"host": "127.0.0.1", "port": http_port},
        "watch": [],
        "executor": {"poll_interval_s": 0.2},
        "logging": {"level": "warning", "format": "json"},
    }


def start_node(root: Path, config: dict[str, Any], http_port: int,
               ) -> tuple[subprocess.Popen[bytes], str]:
    """``dicom-node serve`` with ``config``; returns the process and an infer/read token."""
    cfg = root / "node.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = (root / "node.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config",
                             str(cfg)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (root / "node.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"the node exited with {proc.returncode}:\n{tail}")
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/health", timeout=1).ok:
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    else:
        raise SystemExit("the node did not answer /health within 180 s")
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "token", "--config",
                          str(cfg), "--scope", "infer", "--scope", "read", "--expires", "4h"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return proc, out.stdout.strip().splitlines()[-1]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def resources(interface: str, pacs: Orthanc) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request's source and output for ``--interface``: DIMSE or DICOMweb."""
    if interface == "dicomweb":
        web = {"uri": pacs.dicomweb_url, "authType": "None"}
        return ({"interface": "DICOMweb", "connectionDetails": web},
                {"interface": "DICOMweb", "connectionDetails": web})
    return ({"interface": "DIMSE", "connectionDetails": {"name": "pacs"}},
            {"interface": "DIMSE", "connectionDetails": {"name": "pacs-out"}})


def round_trip(url: str, token: str, study: Study, tx: str,
               peers: tuple[dict[str, Any], dict[str, Any]],
               poll_s: float) -> tuple[float, dict[str, Any]]:
    """POST one request and poll its status until final: (wall seconds, final status)."""
    headers = {"Authorization": f"Bearer {token}"}
    source, output = peers
    body = {
        "transactionID": tx,
        "priority": 128,
        "inputMetadata": {"details": {"type": "DICOM_UID",
                                      "studies": [{"StudyInstanceUID": study.study_uid}]}},
        "inputResources": [
            {"interface": "Algorithm", "connectionDetails": {"name": study.pipeline}}, source],
        "outputResources": [output],
    }
    with requests.Session() as http:
        t0 = time.time()  # the node's clock: it runs on this machine
        r = http.post(f"{url}/api/inference", json=body, headers=headers, timeout=60)
        if r.status_code != 200:
            raise SystemExit(f"POST /api/inference answered {r.status_code}: {r.text}")
        while True:
            st = http.get(f"{url}/api/inference/status/{tx}", headers=headers,
                          timeout=60).json()
            if st["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(poll_s)
    if st["state"] != "succeeded":
        raise SystemExit(f"{study.name}: the job ended {st['state']}: {st['message']}")
    # From the POST to the moment the node recorded success (the status's `finished`),
    # so the wall time does not depend on how often the status is polled.
    wall = datetime.fromisoformat(st["finished"]).timestamp() - t0
    return wall, st


def movescu(pacs: Orthanc, study_uid: str, received: Path, expected: int) -> float:
    """Seconds for dcmtk movescu to move the study from Orthanc to the storescp."""
    cmd = ["movescu", "-aet", MOVER_AE, "-aec", pacs.aet, "-aem", BASELINE_AE, "-S",
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
           "127.0.0.1", str(pacs.dicom_port)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=PEER_ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    got = sum(1 for p in received.rglob("*") if p.is_file())
    if res.returncode != 0 or got < expected:
        raise SystemExit(f"movescu failed ({res.returncode}, {got}/{expected} received): "
                         f"{res.stdout[-1500:]}{res.stderr[-1500:]}")
    return elapsed


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(studies: list[Study], runs: int) -> dict[str, Any]:
    print()
    print(f"medians over {runs} runs (seconds); non-compute = wall - model compute")
    head = (f"{'study':<16}{'wall':>8}{'retrieve':>10}{'run':>8}{'compute':>9}{'export':>8}"
            f"{'non-comp':>10}{'share':>7}{'movescu':>9}{'ratio':>7}")
    print(head)
    out: dict[str, Any] = {}
    for s in studies:
        def m(key: str, s: Study = s) -> float:
            return median([t.get(key, float("nan")) for t in s.timings])

        wall = median(s.walls)
        non = [w - t.get("compute_s", 0.0) for w, t in zip(s.walls, s.timings, strict=True)]
        base = median(s.baseline)
        ratio = m("retrieve_s") / base if base else float("nan")
        print(f"{s.name:<16}{wall:8.2f}{m('retrieve_s'):10.2f}{m('run_s'):8.2f}"
              f"{m('compute_s'):9.2f}{m('export_s'):8.2f}{median(non):10.2f}"
              f"{median(non) / wall:7.0%}{base:9.2f}{ratio:7.2f}")
        out[s.name] = {
            "instances": s.instances, "walls_s": s.walls, "timings": s.timings,
            "movescu_s": s.baseline, "median_wall_s": wall, "median_non_compute_s": median(non),
            "median_retrieve_s": m("retrieve_s"), "median_run_s": m("run_s"),
            "median_compute_s": m("compute_s"), "median_load_s": m("load_s"),
            "median_write_s": m("write_s"), "median_export_s": m("export_s"),
            "median_queued_s": m("queued_s"), "median_movescu_s": base,
            "retrieve_over_movescu": ratio,
        }
    print("ratio = the node's retrieve stage / dcmtk movescu of the same study "
          "(Orthanc -> storescp)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="recorded runs per study (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded runs first (default 1)")
    ap.add_argument("--ct-slices", type=int, default=300, help="CT instances (default 300)")
    ap.add_argument("--ct-size", type=int, default=96,
                    help="CT rows = columns (default 96: the model's training size)")
    ap.add_argument("--cr-size", type=int, default=256,
                    help="CR rows = columns (default 256; radiographs from a modality are "
                    "2,000-3,000: the heatmap, PNGs, Secondary Capture and report grow "
                    "with it)")
    ap.add_argument("--interface", choices=["dimse", "dicomweb"], default="dimse",
                    help="how the node fetches and stores back: C-MOVE and C-STORE "
                    "(default), or QIDO/WADO-RS and STOW-RS")
    ap.add_argument("--poll-ms", type=float, default=250,
                    help="how often the status is polled (default 250 ms, about a RIS's "
                    "pace; each poll is work the node does beside the job, and the wall "
                    "time comes from the status's `finished`, not from the poll)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "acr_roundtrip.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    for exe in ("Orthanc", "movescu", "storescp"):
        if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists():
            print(f"{exe} is not installed", file=sys.stderr)
            return 2
    if not Path(DICOMWEB_PLUGIN).exists():
        print(f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN})",
              file=sys.stderr)
        return 2

    print(f"load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    root = Path(tempfile.mkdtemp(prefix="acr-bench-"))
    node: subprocess.Popen[bytes] | None = None
    scp: subprocess.Popen[bytes] | None = None
    try:
        print(f"writing the phantoms (CR 1 instance {args.cr_size}^2, CT {args.ct_slices} x "
              f"{args.ct_size}^2)...", flush=True)
        cr_paths, ct_paths = make_studies(root / "src", args.ct_slices, args.ct_size,
                                          args.cr_size)
        import pydicom

        def uid(p: Path) -> str:
            return str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)

        studies = [Study("CR (1)", uid(cr_paths[0]), 1, "cxr-findings"),
                   Study(f"CT ({len(ct_paths)})", uid(ct_paths[0]), len(ct_paths), "ct-organs")]
        dicom_port, http_port, scp_port = free_port(), free_port(), free_port()
        modalities = {"NODE": (NODE_AE, "127.0.0.1", dicom_port),
                      "BASELINE": (BASELINE_AE, "127.0.0.1", scp_port),
                      "MOVER": (MOVER_AE, "127.0.0.1", free_port())}
        with orthanc_server(modalities=modalities) as pacs:
            print(f"loading them into Orthanc ({pacs.url})...", flush=True)
            pacs.upload([*cr_paths, *ct_paths])
            print("starting the node (loading and warming the models)...", flush=True)
            config = node_config(root / "node", dicom_port, http_port, pacs)
            node, token = start_node(root, config, http_port)
            url = f"http://127.0.0.1:{http_port}"
            received = root / "storescp"
            received.mkdir()
            scp = subprocess.Popen(["storescp", "-aet", BASELINE_AE, "-od", str(received),
                                    str(scp_port)], env=PEER_ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            wait_port(scp_port, scp)
            peers = resources(args.interface, pacs)
            print(f"source and output: {args.interface}", flush=True)
            for s in studies:
                for i in range(args.warmup):
                    round_trip(url, token, s, f"warmup-{s.pipeline}-{i}", peers,
                               args.poll_ms / 1000)
                for i in range(args.runs):
                    wall, st = round_trip(url, token, s, f"run-{s.pipeline}-{i}", peers,
                                          args.poll_ms / 1000)
                    s.walls.append(wall)
                    s.timings.append(st["timings"])
                    shutil.rmtree(received)
                    received.mkdir()
                    s.baseline.append(movescu(pacs, s.study_uid, received, s.instances))
                    t = st["timings"]
                    print(f"{s.name} run {i + 1}: wall {wall:.2f} s; retrieve "
                          f"{t.get('retrieve_s', 0):.2f}, run {t.get('run_s', 0):.2f} (compute "
                          f"{t.get('compute_s', 0):.2f}), export {t.get('export_s', 0):.2f}; "
                          f"movescu {s.baseline[-1]:.2f}", flush=True)
        results = report(studies, args.runs)
        print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
              "(other work on the machine skews both sides)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": args.runs, "interface": args.interface,
                                        "ct_slices": args.ct_slices,
                                        "ct_size": args.ct_size, "cr_size": args.cr_size,
                                        "studies": results},
                                       indent=2))
        print(f"results: {args.out}")
    finally:
        if scp is not None:
            stop(scp)
        if node is not None:
            stop(node)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
