"""Smoke test of ``bench/pipeline.py`` at tiny sizes: every phase runs and reports.

No figure is checked (the bench is not a test of speed); only that each phase ran on
the real code paths and that the report and the JSON say what they should.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pipeline_bench_runs_every_phase_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline.py"), "--images", "8", "--repeat", "1",
         "--callers", "2", "--seconds", "1", "--warmup", "0.2", "--ct-slices", "8",
         "--ct-size", "32", "--device", "cpu", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    report = res.stdout
    for line in ("ratio pipeline/bare", "ratio batched/unbatched", "dicom-node serve",
                 "segmenting a 32x32x8 CT"):
        assert line in report
    doc = json.loads(out.read_text())
    assert doc["pipeline"]["max_probability_diff"] < 1e-3  # the same computation as bare
    assert doc["pipeline"]["engine_batch"]["1"] == 1.0
    assert {k: doc["throughput"][k]["max_batch"] for k in ("8", "1")} == {"8": 8, "1": 1}
    assert all(v in ("met", "MISSED") for v in doc["targets"].values())
    assert doc["memory"]["node"]["rss_kib"] > 0 and doc["memory"]["runner"]["failed"] == {}
    ct = doc["ct"]
    assert ct["shape"] == [8, 32, 32] and ct["instances"] == 8
    assert ct["inferer"]["_target_"] == "SlidingWindowInferer"
    assert {"json", "seg"} <= set(ct["artifacts"])
    assert ct["hwm_kib"] >= ct["rss_loaded_kib"]
