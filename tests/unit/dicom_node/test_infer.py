"""``dicom-node infer``: the demo models on the sample files, through the command line.

The command runs as a user runs it, in its own process (it sets up logging for itself).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import generate_uid

SAMPLES = Path(__file__).resolve().parents[3] / "samples"
DICOM_NODE = Path(sys.executable).parent / "dicom-node"


def infer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DICOM_NODE), "infer", *args], cwd=cwd, capture_output=True,
                          text=True, check=False)


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


def test_infer_runs_each_study_through_the_pipelines_that_suit_it(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    out = tmp_path / "results"
    done = infer(str(root), "--out", str(out), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # stdout is the JSON alone: progress went to stderr
    assert "skipped 1 file(s)" in done.stderr and "README.txt" in done.stderr
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


def test_plain_output_says_where_the_results_are(tmp_path: Path) -> None:
    cr = tmp_path / "effusion.dcm"
    shutil.copy(SAMPLES / "cxr" / "pleural-effusion.dcm", cr)
    done = infer("effusion.dcm", cwd=tmp_path)  # default --out: ./dicom-node-results
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "dicom-node-results" / "cxr-findings" / "SAMPLE-CXR-PLEURAL-EFFUSION"
    assert "Abnormal: Pleural Effusion" in done.stdout
    assert f"results in {folder}" in done.stdout
    assert f"1 result(s) under {tmp_path / 'dicom-node-results'}" in done.stdout
    assert (folder / "SAMPLE-CXR-PLEURAL-EFFUSION_predictions.json").is_file()


def test_a_named_model_that_does_not_suit_the_study_says_why(tmp_path: Path) -> None:
    cr = tmp_path / "normal.dcm"
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cr)
    done = infer(str(cr), "--model", "ct-organs", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED  ct-organs" in done.stderr
    assert "modality CR not in ['CT']" in done.stderr
    assert "1 failed" in done.stdout


def test_bad_usage_is_exit_2_with_the_reason(tmp_path: Path) -> None:
    cr = tmp_path / "normal.dcm"
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cr)
    done = infer(str(cr), "--model", "nope", cwd=tmp_path)
    assert done.returncode == 2
    assert "--model 'nope': no such pipeline or model" in done.stderr
    assert "cxr-findings" in done.stderr
    done = infer(str(tmp_path / "missing"), cwd=tmp_path)
    assert done.returncode == 2 and "no such file or folder" in done.stderr


def test_an_output_folder_that_cannot_be_is_exit_2(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    cr = str(SAMPLES / "cxr" / "normal.dcm")
    done = infer(cr, "--out", str(tmp_path / "afile"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"--out {tmp_path / 'afile'}: a file, not a folder" in done.stderr
    done = infer(cr, "--out", "/proc/x", cwd=tmp_path)
    assert done.returncode == 2 and "--out /proc/x:" in done.stderr


def test_a_cd_by_its_dicomdir_and_a_copied_folder_run_once(tmp_path: Path) -> None:
    """A DICOMDIR named by itself reads the files beside it; a folder copied twice (or
    linked) is read once, by SOP Instance UID, instead of failing as two slices at one
    position."""
    if shutil.which("dcmmkdir") is None:
        pytest.skip("dcmtk's dcmmkdir is not installed")
    cd = tmp_path / "cd"
    (cd / "IMAGES").mkdir(parents=True)
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cd / "IMAGES" / "IM1")
    subprocess.run(["dcmmkdir", "+r", "+I", "IMAGES"], cwd=cd, check=True,
                   capture_output=True)
    done = infer(str(cd / "DICOMDIR"), "--out", str(tmp_path / "o"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["ok"] for r in json.loads(done.stdout)["results"]] == [True]

    shutil.copytree(SAMPLES / "ct" / "abdomen", tmp_path / "ct")
    (tmp_path / "ct-link").symlink_to(tmp_path / "ct", target_is_directory=True)
    done = infer(str(tmp_path / "ct"), str(tmp_path / "ct-link"), "--out",
                 str(tmp_path / "o2"), "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [(r["pipeline"], r["ok"]) for r in results] == [("ct-organs", True)]
    slices = len(list((tmp_path / "ct").iterdir()))
    assert f"skipped {slices} file(s) holding an instance already read" in done.stderr


def test_nothing_to_run_is_exit_1(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    done = infer(str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1 and "no DICOM files under" in done.stdout


def test_a_file_without_a_usable_patient_id_is_named_after_itself(tmp_path: Path) -> None:
    """Anonymised files may carry no PatientID, or one that cannot name a folder: the
    results are named after the file (or the ID's safe characters) and say so."""
    ds = pydicom.dcmread(SAMPLES / "cxr" / "normal.dcm")
    del ds.PatientID
    ds.save_as(tmp_path / "anon-1.dcm")
    ds = pydicom.dcmread(SAMPLES / "cxr" / "cardiomegaly.dcm")
    ds.PatientID = "12/34"
    ds.save_as(tmp_path / "slashed.dcm")
    done = infer("anon-1.dcm", "slashed.dcm", "--out", "o", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(patient (no Patient ID), results named anon-1)" in done.stdout
    assert "(patient 12/34, results named 12_34)" in done.stdout
    for pid in ("anon-1", "12_34"):
        data = json.loads((tmp_path / "o" / "cxr-findings" / pid
                           / f"{pid}_predictions.json").read_text())
        assert data["metadata"]["patient_id"] == pid


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # writing the file
def test_odd_values_in_a_file_warn_in_one_line_and_run(tmp_path: Path) -> None:
    """A radiograph with a one-component name and an ISO birth date (as some devices
    write them): it runs, and the library's warnings read as one line each, not a
    source path, a line number and a line of library code."""
    ds = pydicom.dcmread(SAMPLES / "cxr" / "normal.dcm")
    ds.PatientName, ds.PatientBirthDate = "John Doe", "1958-01-01"
    ds.save_as(tmp_path / "odd.dcm")
    done = infer("odd.dcm", "--model", "cxr-findings", "--out", "o", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1 result(s)" in done.stdout
    assert "warning: The string \"John Doe\" is unlikely" in done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr


def test_a_value_pydicom_cannot_read_warns_in_one_line_and_fails_clearly(
        tmp_path: Path) -> None:
    """Number of Frames '1A' (as in pydicom's badVR.dcm): read while the series are
    chosen, before any run, it warns in one line; the run fails saying why."""
    ds = pydicom.dcmread(SAMPLES / "cxr" / "normal.dcm")
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    ds.save_as(tmp_path / "odd.dcm")  # written raw: pydicom refuses to set it
    for model in (["--model", "cxr-findings"], []):
        done = infer("odd.dcm", *model, "--out", "o", cwd=tmp_path)
        assert done.returncode == 1
        assert "warning: Invalid value for VR IS: '1A'" in done.stderr
        assert "cannot decode the pixel data" in done.stderr
        assert "UserWarning" not in done.stderr and ".py:" not in done.stderr


def test_a_study_no_pipeline_suits_says_what_keeps_it_out(tmp_path: Path) -> None:
    """Without --model: a CT of two slices is named with its reason (too few for
    ct-organs), an MR with the modalities the pipelines take."""
    for i, name in enumerate(sorted((SAMPLES / "ct" / "abdomen").iterdir())[:2]):
        shutil.copy(name, tmp_path / f"ct{i}.dcm")
    mr = pydicom.dcmread(SAMPLES / "cxr" / "normal.dcm")
    mr.Modality, mr.StudyInstanceUID = "MR", generate_uid()
    mr.save_as(tmp_path / "mr.dcm")
    done = infer(str(tmp_path), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    ct = lines.index(next(line for line in lines if "(patient SAMPLE-CT" in line))
    assert "no series suits cxr-findings or ct-organs; nothing run" in lines[ct]
    assert lines[ct + 1].strip().startswith("ct-organs: series ")
    assert "2 image(s), fewer than the" in lines[ct + 1]
    assert "no pipeline takes MR (cxr-findings takes CR, DX; ct-organs takes CT)" in done.stdout


def test_a_bundle_folder_can_be_tried_by_its_path(tmp_path: Path) -> None:
    """An AI engineer tries a bundle on files before configuring it: ``--model`` takes
    its folder; the task and the modality come from its metadata (named, it runs every
    study, and says why a radiograph does not suit a CT model). A folder that is no
    bundle says what is missing."""
    from tests.unit.pipeline.test_runner import make_zoo_bundle

    bundle = make_zoo_bundle(tmp_path / "my bundle")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["modality"] = "CT"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    root = _tree(tmp_path)
    done = infer(str(root / "ct"), "--model", str(bundle), "--out", str(tmp_path / "r"),
                 "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert [(r["pipeline"], r["ok"]) for r in results] == [("my-bundle", True)]
    assert [s["name"] for s in results[0]["segments"]] == ["tissue"]
    assert (tmp_path / "r" / "my-bundle").is_dir()
    mixed = infer(str(root), "--model", str(bundle), "--out", str(tmp_path / "r"),
                  cwd=tmp_path)
    assert mixed.returncode == 1
    assert "modality CR not in ['CT']" in mixed.stderr

    bad = infer(str(root), "--model", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2
    assert "configs/metadata.json" in bad.stderr


def test_the_shipped_bundles_can_be_tried_by_their_paths(tmp_path: Path) -> None:
    """The README's `infer --model FOLDER` on the only bundles a newcomer has: the CT one
    failed as "already loaded" (its name clashed with the configured model), the chest
    one refused every shipped sample (its metadata says DX; the samples are CR). A copy
    under the configured name elsewhere is loaded beside it, under another name."""
    models = Path(__file__).resolve().parents[3] / "pipeline" / "models"
    cr = tmp_path / "normal.dcm"
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cr)
    done = infer(str(cr), "--model", str(models / "cxr-findings"), "--json", "--out",
                 str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["pipeline"] for r in json.loads(done.stdout)["results"]] == ["cxr-findings"]

    copy = tmp_path / "elsewhere" / "cxr-findings"
    shutil.copytree(models / "cxr-findings", copy)
    meta = json.loads((copy / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "DX"
    done = infer(str(cr), "--model", str(copy), "--json", "--out", str(tmp_path / "o2"),
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # a CR image, a bundle that says DX
    assert [r["pipeline"] for r in json.loads(done.stdout)["results"]] == ["cxr-findings-2"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_the_machine_lacks_is_exit_2_with_the_reason(tmp_path: Path) -> None:
    """``--device cuda`` without CUDA ended in torch's AssertionError; it is bad usage."""
    cr = tmp_path / "normal.dcm"
    shutil.copy(SAMPLES / "cxr" / "normal.dcm", cr)
    done = infer(str(cr), "--device", "cuda", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "--device cuda: device cuda is not available on this machine" in done.stderr
    assert "Traceback" not in done.stderr


def test_plain_output_shows_the_result_notes(tmp_path: Path) -> None:
    """A note on the result (which frame of a multi-frame radiograph was read) was only
    in the JSON; a person reading the plain output sees it under the result too."""
    ds = pydicom.dcmread(SAMPLES / "cxr" / "normal.dcm")
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = b"".join([frame.tobytes(), frame.tobytes()])
    ds.save_as(tmp_path / "two-frames.dcm")
    done = infer("two-frames.dcm", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # both frames are read (identical here: the first is shown)
    assert ("    note: classified 2 images of the study (series 1 image 1 (PA) frame 1 of 2; "
            "series 1 image 1 (PA) frame 2 of 2); each finding is given at its highest "
            "probability across them; the image shown and referenced is series 1 image 1 "
            "(PA) frame 1 of 2\n") in done.stdout
