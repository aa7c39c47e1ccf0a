"""Benchmark: C-STORE export, the node's DICOM client against dcmtk ``storescu``.

N synthetic CT instances (``--size`` pixels square, int16) are sent in one association
to the same dcmtk ``storescp +B`` by (a) the node's client (``DicomClient.store_instances``,
what a job's export to a DIMSE destination runs) and (b) dcmtk ``storescu`` with
``TCP_NODELAY=1``, alternately, ``--runs`` times each. Prints the median instances/s of
both and the ratio node/storescu. Not a test: the numbers depend on the machine and its
load.

    PYTHONPATH=. python bench/dimse_export.py --count 200 --size 128
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
# The repository first: run as a script, this folder (with its pipeline.py) is on the
# path and would shadow the ``pipeline`` package.
sys.path[:] = [str(BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH]

from dicom_node.config import Settings  # noqa: E402
from dicom_node.logs import configure_logging  # noqa: E402
from dicom_node.scu import DicomClient, Peer  # noqa: E402


def _receive_bench() -> ModuleType:
    """``dimse_receive.py`` beside this file: its instance writer, storescu and storescp."""
    spec = importlib.util.spec_from_file_location("dimse_receive", BENCH / "dimse_receive.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=200, help="instances per run (default 200)")
    ap.add_argument("--size", type=int, default=128, metavar="PIXELS",
                    help="rows and columns of each instance (default 128: 32 KB)")
    ap.add_argument("--runs", type=int, default=3, help="runs per sender (default 3)")
    args = ap.parse_args(argv)
    rb = _receive_bench()
    make_instances, push, start_storescp, stop = (rb.make_instances, rb.push,
                                                   rb.start_storescp, rb.stop)
    for exe in ("storescu", "storescp"):
        if shutil.which(exe) is None:
            print(f"{exe} (dcmtk) is not installed", file=sys.stderr)
            return 2
    configure_logging("warning")
    root = Path(tempfile.mkdtemp(prefix="dimse-export-"))
    try:
        paths, total = make_instances(root / "src", args.count, args.size)
        print(f"{args.count} instances of {args.size}x{args.size} int16, "
              f"{total / 1e6:.1f} MB", flush=True)
        settings = Settings.model_validate({"storage": {"data_dir": str(root / "node")},
                                            "logging": {"level": "warning"},
                                            "watch": [], "models": [], "pipelines": []})
        client = DicomClient(settings)
        node_s: list[float] = []
        dcmtk_s: list[float] = []
        for run in range(1, args.runs + 1):
            scp, port = start_storescp(root / "out")
            try:
                t0 = time.perf_counter()
                result = client.store_instances(Peer("STORESCP", "127.0.0.1", port), paths)
                node_s.append(time.perf_counter() - t0)
                if not result.ok:
                    raise SystemExit(f"the node's export failed: {result.message}")
                dcmtk_s.append(push(port, "STORESCP", root / "src"))
            finally:
                stop(scp)
                shutil.rmtree(root / "out", ignore_errors=True)
            print(f"run {run}: node {args.count / node_s[-1]:7.1f} inst/s   storescu "
                  f"{args.count / dcmtk_s[-1]:7.1f} inst/s", flush=True)
        n, d = statistics.median(node_s), statistics.median(dcmtk_s)
        print(f"median over {args.runs} runs: node client {args.count / n:.1f} inst/s, "
              f"storescu {args.count / d:.1f} inst/s, ratio node/storescu {d / n:.2f}")
        print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
