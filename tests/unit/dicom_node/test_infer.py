"""``dicom-node infer``: the demo models on the sample files, through the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.cli import main

SAMPLES = Path(__file__).resolve().parents[3] / "samples"


def _tree(tmp_path: Path) -> Path:
    """Two radiographs, a second study of one patient, a CT series and a text file."""
    root = tmp_path / "incoming"
    (root / "cxr").mkdir(parents=True)
    for name in ("normal.dcm", "pleural-effusion.dcm"):
        shutil.copy(SAMPLES / "cxr" / name, root / "cxr" / name)
    again = pydicom.dcmread(SAMPLES / "cxr" / "normal.dcm")
    again.StudyInstanceUID = generate_uid()
    again.SeriesInstanceUID = generate_uid()
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    again.save_as(root / "cxr" / "normal-followup.dcm")
    shutil.copytree(SAMPLES / "ct" / "abdomen", root / "ct")
    (root / "README.txt").write_text("not DICOM\n")
    return root


def test_infer_runs_each_study_through_the_pipelines_that_suit_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path)
    out = tmp_path / "results"
    assert main(["infer", str(root), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "skipped 1 file(s)" in captured.err and "README.txt" in captured.err
    assert summary["skipped_files"] == [str(root / "README.txt")]
    results = summary["results"]
    assert len(results) == 4 and all(r["ok"] for r in results)
    by_pipeline = {r["pipeline"] for r in results}
    assert by_pipeline == {"cxr-findings", "ct-organs"}  # each study to the one that suits it

    # A patient with one study: <out>/<pipeline>/<patient>/, seed 001's files.
    effusion = out / "cxr-findings" / "SAMPLE-CXR-PLEURAL-EFFUSION"
    pred = json.loads((effusion / "SAMPLE-CXR-PLEURAL-EFFUSION_predictions.json").read_text())
    assert pred["result"] == "Abnormal"
    assert "Pleural Effusion" in {f["name"] for f in pred["findings"] if f["presence"]}
    assert pred["heatmap"]
    assert (effusion / "SAMPLE-CXR-PLEURAL-EFFUSION_heatmap.png").stat().st_size > 0
    assert (effusion / "SAMPLE-CXR-PLEURAL-EFFUSION_report.pdf").stat().st_size > 0

    # Two studies of one patient: a folder per study, neither overwrites the other.
    normal = [r for r in results if r["output_dir"].endswith("SAMPLE-CXR-NORMAL")]
    assert len(normal) == 2
    assert len({r["output_dir"] for r in normal}) == 2
    for r in normal:
        folder = Path(r["output_dir"])
        assert folder.parent.name == r["study"]
        assert r["result"] == "Normal"
        data = json.loads((folder / "SAMPLE-CXR-NORMAL_predictions.json").read_text())
        assert data["result"] == "Normal" and data["heatmap"] == ""

    ct = next(r for r in results if r["pipeline"] == "ct-organs")
    assert {s["name"] for s in ct["segments"]} >= {"liver", "spleen"}
    assert all(s["volume_ml"] > 0 for s in ct["segments"])
    assert list(Path(ct["output_dir"]).glob("*_seg.dcm"))
    assert list(Path(ct["output_dir"]).glob("*_sr.dcm"))  # the volumes as an SR


def test_a_named_model_that_does_not_suit_the_study_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cr = tmp_path / "normal.dcm"
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cr)
    assert main(["infer", str(cr), "--model", "ct-organs", "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "FAILED  ct-organs" in captured.err
    assert "modality CR not in ['CT']" in captured.err
    assert "1 failed" in captured.out


def test_bad_usage_is_exit_2_with_the_reason(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cr = tmp_path / "normal.dcm"
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cr)
    assert main(["infer", str(cr), "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--model 'nope': no such pipeline or model" in err and "cxr-findings" in err
    assert main(["infer", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_nothing_to_run_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["infer", str(tmp_path)]) == 1
    assert "no DICOM files under" in capsys.readouterr().out
