"""Smoke test of ``bench/dimse_receive.py`` at tiny sizes: every phase runs and reports.

No figure is checked (the bench is not a test of speed); only that each phase ran
against the real node and dcmtk, that the inference load really reached the model, and
that the multi-frame object was kept intact.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.peers import require

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dimse_bench_runs_every_phase_at_tiny_sizes(tmp_path: Path) -> None:
    for exe in ("storescu", "storescp"):
        require(exe)
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dimse_receive.py"), "--count", "4",
         "--runs", "1", "--inference-clients", "1", "--multiframe-mb", "8",
         "--default-sender-count", "4"],
        cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = res.stdout
    for line in ("phase 1: idle", "phase 2: while 1 clients", "phase 3: one 8 MB",
                 "ratio node/storescp (idle)",
                 "ratio node/storescp (both under the node's inference load)",
                 "stored intact: yes", "phase 4: 4 small instances",
                 "default sender, 4 x 32 KB"):
        assert line in report, report
    assert "inference errors" not in report, report
    rates = [line for line in report.splitlines() if "req/s during" in line]
    assert rates and float(rates[0].split()[3]) > 0, report  # the model was busy


@pytest.mark.slow
def test_dimse_export_bench_runs_at_tiny_sizes(tmp_path: Path) -> None:
    for exe in ("storescu", "storescp"):
        require(exe)
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "dimse_export.py"), "--count", "4",
         "--size", "16", "--runs", "1"],
        cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ratio node/storescu" in res.stdout, res.stdout
