"""``dicom-node jobs list`` on a store with jobs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.store import NewJob, Store


def test_list_shows_long_pipeline_names_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pipeline names longer than 16 characters were cut silently, so two pipelines
    that start alike read the same; now they are whole (an ellipsis past 32)."""
    data = tmp_path / "data"
    data.mkdir()
    store = Store(f"sqlite:///{data / 'node.db'}").open()
    names = ["chest-xray-findings-v2", "chest-xray-findings-v3", "c" * 40]
    for name in names:
        store.create_job(NewJob(pipeline=name, study_instance_uid="1.2.3"))
    store.close()
    assert main(["jobs", "list", "--data-dir", str(data)]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head.split()[:6] == ["JOB", "ID", "STATE", "PRI", "TRY", "PIPELINE"]
    shown = sorted(row.split()[4] for row in rows)
    assert shown == sorted(["chest-xray-findings-v2", "chest-xray-findings-v3",
                            "c" * 31 + "…"])
    assert all(row.split()[1] == "queued" for row in rows)


def test_a_listing_cut_off_by_head_ends_quietly(tmp_path: Path) -> None:
    """`dicom-node jobs list | head -1`: the reader goes away after one line; the
    command ends with SIGPIPE's status and no traceback."""
    data = tmp_path / "data"
    data.mkdir()
    store = Store(f"sqlite:///{data / 'node.db'}").open()
    for n in range(1500):  # more than a pipe holds, so that a write meets the closed end
        store.create_job(NewJob(pipeline=f"pipeline-{n}", study_instance_uid="1.2.3"))
    store.close()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dicom-node"), "jobs", "list", "--data-dir",
         str(data), "--limit", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"JOB ID")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize("command", [["jobs", "list"], ["studies", "list"]])
def test_a_listing_without_a_store_says_so_and_makes_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    """Run from the wrong folder, the listings made an empty ./data/node.db and said
    'no jobs'; now they say there is no store there, and leave nothing behind."""
    data = tmp_path / "data"
    assert main([*command, "--data-dir", str(data)]) == 1
    assert f"no store at {data / 'node.db'}" in capsys.readouterr().err
    assert not data.exists()


def test_dicom_node_config_names_the_settings_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "elsewhere"
    data.mkdir()
    Store(f"sqlite:///{data / 'node.db'}").open().close()
    config = tmp_path / "node.yaml"
    config.write_text(f"storage:\n  data_dir: {data}\n")
    monkeypatch.setenv("DICOM_NODE_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)  # ./data is not the node's
    assert main(["jobs", "list"]) == 0
    assert "no jobs" in capsys.readouterr().out


def test_retry_of_a_study_job_says_how_many_instances_it_gained(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`jobs retry` of a drop-folder job that ran on part of a series: it now runs on
    all of the series the store holds, and says so."""
    import dataclasses

    from dicom_node.store import InstanceRecord, JobState

    data = tmp_path / "data"
    data.mkdir()
    store = Store(f"sqlite:///{data / 'node.db'}").open()
    base = InstanceRecord(sop_instance_uid="", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid="7", series_instance_uid="7.1",
                          path=Path("/x.dcm"), size_bytes=1, source="watch")
    held = [dataclasses.replace(base, sop_instance_uid=f"7.1.{i}") for i in range(200)]
    store.add_watch_inputs("inbox", [(f"{i:064x}", r.sop_instance_uid)
                                     for i, r in enumerate(held)], instances=held)
    job = store.create_job(NewJob(pipeline="ct", kind="watch", study_instance_uid="7",
                                  input={"instances": [r.sop_instance_uid for r in held[:122]],
                                         "study_instance_uid": "7", "watch": "inbox"}))
    store.request_cancel(job.id)
    store.close()
    assert main(["jobs", "retry", job.id[:8], "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{job.id}: queued again with 200 instances, 78 more than the failed run")
    store = Store(f"sqlite:///{data / 'node.db'}").open()
    try:
        again = store.get_job(job.id)
        assert again.state is JobState.QUEUED and len(again.input["instances"]) == 200
        store.request_cancel(job.id)
    finally:
        store.close()
    assert main(["jobs", "retry", job.id, "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == f"{job.id}: queued again"  # nothing more


def test_a_store_that_fails_a_write_is_one_line_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a full disk `jobs cancel` printed SQLAlchemy's forty-line traceback; it is now
    one line saying what failed and what to do."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 8) as disk:
        data = disk / "data"
        data.mkdir()
        held = Store(f"sqlite:///{data / 'node.db'}").open()  # a running node's hold
        try:
            job = held.create_job(NewJob(pipeline="p"))
            fill(disk, 0)
            with contextlib.suppress(OSError), open(disk / "crumbs", "wb") as f:
                while f.write(b"\0" * 512):  # to the last byte
                    f.flush()
            code = main(["jobs", "cancel", job.id, "--data-dir", str(data)])
        finally:
            held.close()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.startswith("dicom-node: the job store failed: ")
    assert "free space on the disk of the data directory" in err


def test_check_config_on_a_full_disk_is_ok_with_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config printed "OK", then the store's error, and exited 1: the systemd unit
    runs it before each start, so the node restarted in a loop blamed on its settings.
    The settings are valid; the store's trouble is a warning, serve's to report."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 8) as disk:
        data = disk / "data"
        data.mkdir()
        Store(f"sqlite:///{data / 'node.db'}").open().close()
        fill(disk, 0)
        with contextlib.suppress(OSError), open(disk / "crumbs", "wb") as f:
            while f.write(b"\0" * 512):  # to the last byte
                f.flush()
        config = tmp_path / "node.yaml"
        config.write_text(f"storage: {{data_dir: {data}}}\n")
        code = main(["check-config", str(config)])
    out, err = capsys.readouterr()
    assert code == 0 and f"{config}: OK" in out
    assert "config API      not read: the store cannot be opened" in out
    assert "warning: the store's config API objects cannot be read: " in err
    assert "the disk holding it is full" in err
