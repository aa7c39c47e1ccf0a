"""``dicom-node studies list|show`` on a store with received instances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.store import InstanceRecord, JobState, NewJob, Store
from dicom_node.studies_view import size_text

STUDY = "1.2.826.0.1.3680043.8.498.1"


def _store(data: Path) -> Store:
    data.mkdir(parents=True, exist_ok=True)
    return Store(f"sqlite:///{data / 'node.db'}").open()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    store = _store(data)
    for i in range(3):
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{STUDY}.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=STUDY, series_instance_uid=f"{STUDY}.1", path=Path(f"/x/{i}"),
            size_bytes=500_000, source="dimse", patient_id="PAT-7", modality="CT",
            transfer_syntax_uid="1.2.840.10008.1.2.4.70", called_ae="DICOMNODE",
            calling_ae="CT_SCANNER", study_date="20250314"))
    store.record_instance(InstanceRecord(
        sop_instance_uid="1.2.826.0.1.3680043.8.498.2.1.1", sop_class_uid="1.2",
        study_instance_uid="1.2.826.0.1.3680043.8.498.2", series_instance_uid="1.9",
        path=Path("/x/y"), size_bytes=900, source="watch", patient_id="OTHER", modality="CR"))
    store.create_job(NewJob(pipeline="ct-organs", study_instance_uid=STUDY))
    store.close()
    return data


def test_list_shows_what_arrived_newest_first(data: Path, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    assert main(["studies", "list", "--data-dir", str(data)]) == 0
    head, newest, older = capsys.readouterr().out.splitlines()
    assert head.split() == ["LAST", "RECEIVED", "PATIENT", "ID", "MODALITY", "SER", "INST",
                            "SIZE", "FROM", "STUDY", "UID"]
    assert newest.split()[2:] == ["OTHER", "CR", "1", "1", "900", "B", "watch",
                                  "1.2.826.0.1.3680043.8.498.2"]
    assert older.split()[2:] == ["PAT-7", "CT", "1", "3", "1.5", "MB", "CT_SCANNER", "->",
                                 "DICOMNODE", STUDY]


def test_list_shows_long_patient_ids_whole_and_cuts_only_what_cannot_fit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A patient ID of 27 characters is shown whole (it was cut to 16, silently, and
    then matched nothing in --patient); one of 64 is cut with an ellipsis."""
    store = _store(tmp_path / "data")
    for n, pid in enumerate(["SAMPLE-CXR-PLEURAL-EFFUSION", "P" * 64]):
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{STUDY}.{n}", sop_class_uid="1.2", study_instance_uid=f"{STUDY}{n}",
            series_instance_uid=f"{STUDY}.{n}.1", path=Path(f"/x/{n}"), size_bytes=1,
            source="dimse", patient_id=pid, modality="CR", called_ae="DICOMNODE",
            calling_ae="A_MODALITY_WITH_16"))
    store.close()
    assert main(["studies", "list", "--data-dir", str(tmp_path / "data")]) == 0
    _, longest, long_id = capsys.readouterr().out.splitlines()
    assert longest.split()[2] == "P" * 31 + "…"
    assert long_id.split()[2] == "SAMPLE-CXR-PLEURAL-EFFUSION"
    assert "A_MODALITY_WITH_16 -> DICOMNODE" in long_id


def test_list_filters_by_patient_and_speaks_json(data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["studies", "list", "--patient", "PAT-7", "--json", "--data-dir",
                 str(data)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert row["study_instance_uid"] == STUDY
    assert (row["series"], row["instances"], row["size_bytes"]) == (1, 3, 1_500_000)
    assert row["senders"] == ["CT_SCANNER -> DICOMNODE"]
    assert main(["studies", "list", "--patient", "NOBODY", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == "no studies of patient 'NOBODY'"


def test_show_gives_the_series_and_the_jobs(data: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    assert main(["studies", "show", STUDY, "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "held                 3 instance(s) in 1 series, 1.5 MB" in out
    assert "study_date           2025-03-14" in out
    assert f"  {STUDY}.1\n" in out
    assert "CT           3 instance(s)    1.5 MB" in out
    assert "from CT_SCANNER -> DICOMNODE" in out
    assert "JPEG Lossless, Non-Hierarchical, First-Order Prediction" in out
    assert "ct-organs" in out.split("jobs:")[1]
    assert main(["studies", "show", STUDY, "--json", "--data-dir", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["series"][0]["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.70"]
    assert [j["pipeline"] for j in shown["jobs"]] == ["ct-organs"]


def test_show_takes_the_start_of_a_uid_and_says_when_it_is_not_enough(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["studies", "show", "1.2.826.0.1.3680043.8.498.2", "--data-dir",
                 str(data)]) == 0  # whole UID, although it also starts nothing else
    assert "OTHER" in capsys.readouterr().out
    assert main(["studies", "show", "1.2.826.0.1.3680043.8.498", "--data-dir", str(data)]) == 1
    assert "starts more than one study UID" in capsys.readouterr().err
    assert main(["studies", "show", "9.9", "--data-dir", str(data)]) == 1
    assert "no study '9.9'" in capsys.readouterr().err


def test_size_text() -> None:
    assert [size_text(n) for n in (0, 999, 1000, 1_500_000, 2_000_000_000, 5 * 10**12)] == [
        "0 B", "999 B", "1.0 KB", "1.5 MB", "2.0 GB", "5000.0 GB"]


def _held(data: Path, study: str, n: int, *, source: str = "dimse") -> list[Path]:
    """``n`` instance files of ``study`` in the studies folder, recorded as ``source``."""
    store = _store(data)
    paths = []
    for i in range(n):
        path = data / "studies" / study / f"{study}.1" / f"{study}.1.{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{study}.1.{i}", sop_class_uid="1.2", study_instance_uid=study,
            series_instance_uid=f"{study}.1", path=path, size_bytes=1000, source=source,
            patient_id="P", modality="CT"))
        paths.append(path)
    store.close()
    return paths


def test_delete_removes_the_files_and_records_and_optionally_the_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    paths = _held(data, "1.2.5", 3, source="watch")  # a drop folder's: never pending
    store = _store(data)
    job = store.create_job(NewJob(pipeline="p", study_instance_uid="1.2.5"))
    claimed = store.claim_next("cli-test", 30)
    assert claimed is not None
    store.transition(job.id, JobState.SUCCEEDED, token=claimed.lease_token)
    store.close()
    results = data / "results" / job.id / "P"
    results.mkdir(parents=True)
    (results / "P_report.pdf").write_bytes(b"%PDF")
    kept = _held(data, "1.2.6", 1, source="watch")
    argv = ["studies", "delete", "1.2.5", "--data-dir", str(data)]
    assert main(argv) == 1  # not a terminal and no --yes: it only says what it would do
    assert "would delete 3 instance(s), 3.0 KB, of study 1.2.5 (patient P); add --yes" in (
        capsys.readouterr().err)
    assert all(p.exists() for p in paths)
    assert main([*argv, "--results", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == (
        "deleted 3 instance(s), 3.0 KB, of study 1.2.5, and 1 results folder(s)")
    assert not any(p.exists() for p in paths) and not (data / "studies" / "1.2.5").exists()
    assert not (data / "results" / job.id).exists()
    assert kept[0].exists()
    store = _store(data)
    assert [s.study_instance_uid for s, _ in store.received_studies()] == ["1.2.6"]
    assert store.get_job(job.id).state is JobState.SUCCEEDED  # the job's record stays
    store.close()


def test_delete_is_refused_while_the_study_is_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    paths = _held(data, "1.2.7", 2)  # received over DIMSE, not yet part of a job
    argv = ["studies", "delete", "1.2.7", "--yes", "--data-dir", str(data)]
    assert main(argv) == 1
    assert "still arriving (2 instance(s) not yet part of a job)" in capsys.readouterr().err
    store = _store(data)
    store.mark_queued(["1.2.7.1.0", "1.2.7.1.1"])
    job = store.create_job(NewJob(pipeline="p", study_instance_uid="1.2.7"))
    store.close()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"has jobs queued or running ({job.id}); cancel them first " \
        f"(dicom-node jobs cancel {job.id})" in err
    store = _store(data)
    store.create_job(NewJob(pipeline="q", study_instance_uid="1.2.7"))
    store.close()
    assert main(argv) == 1
    assert f"({job.id} and 1 more)" in capsys.readouterr().err  # a batch made many
    assert all(p.exists() for p in paths)


def test_a_study_date_is_shown_as_a_date_only_in_ascii_digits() -> None:
    """A StudyDate comes from the sender's file: other scripts' digits are shown as they
    are, not cut into a date."""
    from dicom_node.studies_view import _date

    assert _date("20250314") == "2025-03-14"
    assert _date("\u0662\u0660\u0662\u0665\u0660\u0663\u0661\u0664") == (
        "\u0662\u0660\u0662\u0665\u0660\u0663\u0661\u0664")
    assert _date("2025031\u00b9") == "2025031\u00b9"
