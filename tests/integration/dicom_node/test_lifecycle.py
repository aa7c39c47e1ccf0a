"""The node as a real process: health, clean stop, crash recovery, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pydicom
import pytest

from dicom_node.store import Job, JobState, NewJob, Store
from tests.support.node_process import ROOT, NodeProcess
from tests.support.peers import storescu

TEST_EXECUTOR = {"runner": "tests.support.handlers:create_handler", "poll_interval_s": 0.1,
                 "grace_period_s": 2}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "data", {"executor": TEST_EXECUTOR})
    yield n
    n.stop()


def store_of(node: NodeProcess) -> Store:
    return Store(f"sqlite:///{(node.data_dir / 'node.db').resolve()}").open()


def wait_for(predicate, what: str, node: NodeProcess) -> None:  # type: ignore[no-untyped-def]
    while not predicate():  # no time limit: pytest-timeout guards the test
        if node.proc is not None and node.proc.poll() is not None:
            raise AssertionError(f"node died while waiting for {what}:\n{node.log()}")
        time.sleep(0.05)


def test_health_and_clean_stop_on_sigterm(node: NodeProcess) -> None:
    node.start()
    status, body = node.get("/health")
    assert status == 200 and body["status"] == "ok" and body["store"]["ok"] is True
    assert body["parts"]["scheduler"] == "running"
    secret = node.data_dir / "jwt_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    node.signal(signal.SIGTERM)
    assert node.wait() == 0
    assert "node stopped" in node.log()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_a_hang_up_stop_cleanly(node: NodeProcess, sig: signal.Signals) -> None:
    node.start()
    node.signal(sig)
    assert node.wait() == 0
    assert f'"signal": "{sig.name}"' in node.log() and "node stopped" in node.log()


def test_running_job_finishes_within_grace_on_sigterm(node: NodeProcess) -> None:
    node.start()
    marker = node.data_dir / "marker.txt"
    store = store_of(node)
    try:
        job = store.create_job(NewJob(pipeline="p", input={"sleep": 0.5, "marker": str(marker)}))
        wait_for(lambda: marker.exists(), "the job to start", node)
        node.signal(signal.SIGTERM)
        assert node.wait() == 0
        assert store.get_job(job.id).state is JobState.SUCCEEDED
    finally:
        store.close()


def test_a_stopping_node_takes_nothing_new_while_http_requests_finish(
        node: NodeProcess) -> None:
    """SIGTERM closes intake at once: the DICOM port refuses associations and no queued
    job starts, while the HTTP server gives its requests in hand time to finish. The
    port stayed open and the workers kept starting queued jobs for as long as HTTP
    waited (aiohttp's 60 s), and the grace period then cut those jobs off."""
    import socket

    from tests.support.node import NODE_AE
    from tests.support.peers import echoscu

    node.start()
    token = node.cli("token", "--scope", "admin").stdout.strip().splitlines()[-1]
    marker = node.data_dir / "marker.txt"
    store = store_of(node)
    slow = socket.create_connection(("127.0.0.1", node.http_port))
    try:
        running = store.create_job(NewJob(pipeline="p",
                                          input={"sleep": 1.5, "marker": str(marker)}))
        wait_for(lambda: marker.exists(), "the first job to start", node)
        queued = [store.create_job(NewJob(pipeline="p", input={"marker": str(marker)}))
                  for _ in range(3)]
        # a STOW-RS upload in progress: its handler waits for the rest of the body
        slow.sendall(b"POST /dicomweb/studies HTTP/1.1\r\nHost: node\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\n"
                     b'Content-Type: multipart/related; type="application/dicom"; '
                     b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n")
        time.sleep(0.5)
        node.signal(signal.SIGTERM)
        wait_for(lambda: "new associations are refused" in node.log(), "intake to close",
                 node)
        assert echoscu(node.dicom_port, NODE_AE).returncode != 0
        wait_for(lambda: "end" in marker.read_text(), "the running job to end", node)
        time.sleep(1.0)  # a worker polls every 0.1 s: it would have started another
        assert node.proc is not None and node.proc.poll() is None  # HTTP still waits
    finally:
        slow.close()
    try:
        assert node.wait() == 0
        assert store.get_job(running.id).state is JobState.SUCCEEDED
        assert [store.get_job(j.id).state for j in queued] == [JobState.QUEUED] * 3
        assert marker.read_text().count("start") == 1
    finally:
        store.close()


def start_with_a_running_job(node: NodeProcess) -> tuple[Store, Job, Path]:
    """Start the node and a 2 s job, and wait until the job has started; the marker
    file gets "start" and "end" lines from each run of it."""
    marker = node.data_dir / "marker.txt"
    node.start()
    store = store_of(node)
    job = store.create_job(NewJob(pipeline="p", input={"sleep": 2, "marker": str(marker)}))
    wait_for(lambda: marker.exists() and "start" in marker.read_text(), "start", node)
    return store, job, marker


def test_crash_mid_job_runs_it_exactly_once_more(node: NodeProcess) -> None:
    store, job, marker = start_with_a_running_job(node)
    try:
        node.signal(signal.SIGKILL)
        node.wait()
        assert store.get_job(job.id).state is JobState.RUNNING  # died holding it
        node.start()
        wait_for(lambda: store.get_job(job.id).state.final, "the job to finish", node)
        assert store.get_job(job.id).state is JobState.SUCCEEDED
        lines = marker.read_text().splitlines()
        assert [ln.split()[0] for ln in lines] == ["start", "start", "end"]
        assert any(e.message == "interrupted; queued again" for e in store.events(job.id))
        time.sleep(0.5)  # nothing runs it a third time
        assert len(marker.read_text().splitlines()) == 3
    finally:
        store.close()


def test_second_serve_on_the_same_data_dir_is_refused(node: NodeProcess,
                                                      tmp_path: Path) -> None:
    """A second `serve` on a running node's data directory (other ports, another
    node_name) exits at once,
    naming the directory and the pid that holds it; the running node's job runs once.
    The other commands keep working beside the running node."""
    import yaml

    store, job, marker = start_with_a_running_job(node)
    try:
        second = NodeProcess(tmp_path / "second", {"executor": TEST_EXECUTOR})
        cfg = yaml.safe_load(second.config_path.read_text())
        cfg["storage"]["data_dir"] = str(node.data_dir)
        # Another node_name too: two nodes on one data directory both took every file
        # dropped into its folders, whatever their names.
        cfg["node_name"] = "another-name"
        second.config_path.write_text(yaml.safe_dump(cfg))
        try:
            with pytest.raises(RuntimeError, match="node exited with 1"):
                second.start()  # without the lock it starts, and takes the job over
        finally:
            second.stop()
        last = second.log().splitlines()[-1]
        assert "cannot start" in last and str(node.data_dir.resolve()) in last
        assert node.proc is not None and f"pid {node.proc.pid}" in last
        assert "queued again" not in second.log()
        for args in (("jobs", "list"), ("studies", "list"), ("token",)):
            assert node.cli(*args).returncode == 0, (args, node.cli(*args).stderr)
        checked = subprocess.run([sys.executable, "-m", "dicom_node.cli", "check-config",
                                  str(node.config_path)], capture_output=True, text=True,
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert checked.returncode == 0, checked.stderr
        wait_for(lambda: store.get_job(job.id).state.final, "the job to finish", node)
        assert store.get_job(job.id).state is JobState.SUCCEEDED
        assert [ln.split()[0] for ln in marker.read_text().splitlines()] == ["start", "end"]
        assert "lease was lost" not in node.log()
        assert not any(e.message == "interrupted; queued again" for e in store.events(job.id))
    finally:
        store.close()


def test_namesakes_sharing_a_database_keep_their_own_jobs(tmp_path: Path) -> None:
    """Two nodes with the same node_name, each with its own data directory, on one
    database (as machines sharing PostgreSQL): the second does not take over the
    first's running job, and says that the name is shared."""
    db = f"sqlite:///{(tmp_path / 'shared.db').resolve()}"
    cfg = {"executor": TEST_EXECUTOR, "storage": {"database_url": db}, "models": [],
           "pipelines": [], "watch": []}
    a = NodeProcess(tmp_path / "a", cfg)
    b = NodeProcess(tmp_path / "b", cfg)
    marker = tmp_path / "marker.txt"
    try:
        a.start()
        store = Store(db).open()
        try:
            # long enough to outlast B's start on a loaded machine (4 s did not); it is
            # cancelled once B is up, not waited for
            job = store.create_job(NewJob(pipeline="p", input={"sleep": 600,
                                                                "marker": str(marker)}))
            wait_for(lambda: marker.exists() and "start" in marker.read_text(), "start", a)
            b.start()
            assert not store.get_job(job.id).state.final  # B started while A ran it
            assert "another node with this node_name holds live jobs" in b.log()
            store.request_cancel(job.id)  # A, which runs it, sees the cancel and ends it
            wait_for(lambda: store.get_job(job.id).state.final, "the job to end", a)
            assert store.get_job(job.id).state is JobState.CANCELLED
            # it ran once, on A: B neither took it nor started it again
            assert [ln.split()[0] for ln in marker.read_text().splitlines()] == ["start"]
            assert "lease was lost" not in a.log()
            assert "queued again" not in b.log()
        finally:
            store.close()
    finally:
        b.stop()
        a.stop()


def test_jobs_cli_list_show_cancel_retry(node: NodeProcess) -> None:
    store = store_of(node)
    try:
        broken = store.create_job(NewJob(pipeline="cxr", priority=1))
        claimed = store.claim_next("elsewhere", 30)
        assert claimed is not None and claimed.id == broken.id
        store.transition(broken.id, JobState.FAILED, token=claimed.lease_token,
                         message="PermanentJobError: series has 1 pixel")
        job = store.create_job(NewJob(pipeline="cxr", priority=200))
    finally:
        store.close()
    out = node.cli("jobs", "list")
    assert out.returncode == 0 and job.id in out.stdout and "queued" in out.stdout
    failed_line = next(ln for ln in out.stdout.splitlines() if ln.startswith(broken.id))
    assert failed_line.endswith("PermanentJobError: series has 1 pixel")  # why, at a glance
    out = node.cli("jobs", "cancel", job.id[:8])  # the start of an id, as people type it
    assert out.returncode == 0 and f"{job.id}: cancelled" in out.stdout
    listed_line = next(ln for ln in node.cli("jobs", "list").stdout.splitlines()
                       if ln.startswith(job.id))
    assert listed_line.split()[1] == "cancelled"
    out = node.cli("jobs", "show", job.id, "--json")
    data = json.loads(out.stdout)
    assert data["state"] == "cancelled" and [e["state"] for e in data["events"]] == [
        "queued", "cancelled"]
    assert node.cli("jobs", "retry", job.id).returncode == 0
    shown = node.cli("jobs", "show", job.id)
    assert "retry requested" in shown.stdout
    missing = node.cli("jobs", "show", "no-such-job")
    assert missing.returncode == 1 and "no job 'no-such-job'" in missing.stderr
    short = node.cli("jobs", "show", job.id[:2])
    assert short.returncode == 1 and "at least 4 characters" in short.stderr
    listed = node.cli("jobs", "list", "--state", "queued", "--json")
    assert json.loads(listed.stdout.splitlines()[0])["id"] == job.id


def test_studies_cli_shows_what_storescu_sent(node: NodeProcess) -> None:
    """What a PACS administrator checks after connecting a modality: the study arrived,
    all of it, from that AE title, as sent."""
    node.start()
    files = sorted((ROOT / "samples" / "ct" / "abdomen").glob("*.dcm"))
    storescu(node.dicom_port, files, "DICOMNODE", "CT_SCANNER")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    listed = node.cli("studies", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["study_instance_uid"], row["instances"], row["series"]) == (study, len(files), 1)
    assert row["senders"] == ["CT_SCANNER -> DICOMNODE"]
    stored = list((node.data_dir / "studies" / study).rglob("*.dcm"))
    assert row["size_bytes"] == sum(f.stat().st_size for f in stored)
    shown = node.cli("studies", "show", study[:20])
    assert shown.returncode == 0, shown.stderr
    assert f"{len(files)} instance(s) in 1 series" in shown.stdout
    assert "from CT_SCANNER -> DICOMNODE" in shown.stdout


def test_a_study_corrected_at_the_modality_moves_its_instance(node: NodeProcess,
                                                              tmp_path: Path) -> None:
    """An instance sent again with the same SOP Instance UID and a corrected Study UID
    (dcmodify, as at the modality) to an AE title that overwrites duplicates: `studies
    list` keeps working and shows the new study only; the old copy is gone from disk."""
    from tests.support.dicom_factory import make_cr_study
    from tests.support.peers import require

    node.start()
    study = make_cr_study(tmp_path / "src")
    storescu(node.dicom_port, study.paths[:1], "DICOMNODE", "CR_ROOM")
    old_files = list((node.data_dir / "studies" / study.study_uid).rglob("*.dcm"))
    assert len(old_files) == 1
    corrected = "1.2.826.0.1.3680043.8.498.4242"
    subprocess.run([require("dcmodify"), "-nb", "-m", f"(0020,000D)={corrected}",
                    str(study.paths[0])], check=True, capture_output=True)
    storescu(node.dicom_port, study.paths[:1], "DICOMNODE", "CR_ROOM")
    listed = node.cli("studies", "list")
    assert listed.returncode == 0, listed.stderr
    assert corrected in listed.stdout and study.study_uid not in listed.stdout
    assert not old_files[0].exists()
    assert not (node.data_dir / "studies" / study.study_uid).exists()
    assert len(list((node.data_dir / "studies" / corrected).rglob("*.dcm"))) == 1


def test_token_is_signed_with_the_node_secret(node: NodeProcess) -> None:
    node.start()
    out = node.cli("token", "--scope", "admin", "--expires", "15m")
    assert out.returncode == 0
    token = out.stdout.strip().splitlines()[-1]
    secret = (node.data_dir / "jwt_secret").read_bytes().strip()
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["scope"] == "admin" and 800 < claims["exp"] - claims["iat"] <= 900
    assert "group" not in claims
    # The batch API (seed 002) takes a token's group as its groupName.
    out = node.cli("token", "--group", "radiology")
    claims = jwt.decode(out.stdout.strip().splitlines()[-1], secret, algorithms=["HS256"])
    assert claims["group"] == "radiology" and claims["scope"] == "infer read"
    assert "group: radiology" in out.stderr
    assert "projects" not in claims  # every project
    # ... and a projects claim as the projects it has seed 002's Model Run permission on
    out = node.cli("token", "--group", "radiology", "--project", "AI_CXR", "--project",
                   "inbox", "--project", "AI_CXR")
    claims = jwt.decode(out.stdout.strip().splitlines()[-1], secret, algorithms=["HS256"])
    assert claims["projects"] == ["AI_CXR", "inbox"]
    assert "projects: AI_CXR, inbox" in out.stderr
    out = node.cli("token", "--group", "radiology", "--project", "2")  # by its id
    claims = jwt.decode(out.stdout.strip().splitlines()[-1], secret, algorithms=["HS256"])
    assert claims["projects"] == [2]


def test_token_before_first_start_says_what_to_do(node: NodeProcess) -> None:
    out = node.cli("token")
    assert out.returncode == 1 and "start the node once" in out.stderr


@pytest.mark.parametrize("taken", ["dimse", "rest"])
def test_port_in_use_is_a_clear_error(node: NodeProcess, tmp_path: Path, taken: str) -> None:
    """The message names the port that is taken: the node opens two."""
    node.start()
    other = NodeProcess(tmp_path / "other", {"executor": TEST_EXECUTOR})
    import yaml

    port = node.dicom_port if taken == "dimse" else node.http_port
    cfg = yaml.safe_load(other.config_path.read_text())
    cfg[taken]["port"] = port
    other.config_path.write_text(yaml.safe_dump(cfg))
    out = other.cli("serve")  # `serve --config …`
    assert out.returncode == 1 and "cannot start" in out.stderr
    what = "DICOM" if taken == "dimse" else "HTTP"
    assert f"{what} port {port} on 127.0.0.1: " in out.stderr.splitlines()[-1]


def test_instances_acknowledged_before_a_crash_become_a_job_after_restart(
        tmp_path: Path) -> None:
    """A study is acknowledged (Success) but its group is still open (no release
    completion, its timeout not reached) when the node is killed: the restarted node
    queues it after the timeout, exactly once."""
    from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
    from tests.support.peers import storescu
    from tests.unit.pipeline.test_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundles" / "tiny")
    node = NodeProcess(tmp_path / "data", {
        "models": [{"name": "tiny", "path": str(bundle), "max_delay_ms": 0, "warmup": False}],
        "pipelines": [{"name": "cxr", "model": "tiny", "task": "classify",
                       "series": {"modalities": ["CR", "DX"]}, "outputs": ["json"]}],
        "ae_titles": [{"ae_title": "DICOMNODE", "pipelines": ["cxr"], "timeout_s": 2,
                       "complete_on_release": False}],
        "watch": [],
        "executor": {"poll_interval_s": 0.1, "grace_period_s": 2},
    })
    src = write_dicom(make_cxr_phantom(5, size=64), tmp_path / "cr.dcm", patient_id="P5",
                      modality="CR")
    sop = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    try:
        node.start()
        storescu(node.dicom_port, [src], "DICOMNODE", "MODALITY")  # answered Success
        store = store_of(node)
        try:
            assert store.get_instance(sop) is not None
            node.signal(signal.SIGKILL)  # the group (2 s timeout) is still open
            node.wait()
            assert store.list_jobs() == []
            assert [r.sop_instance_uid for r in store.pending_instances()] == [sop]

            node.start()
            wait_for(lambda: any(j.state is JobState.SUCCEEDED for j in store.list_jobs()),
                     "the recovered job", node)
            (job,) = store.list_jobs()
            assert job.input["instances"] == [sop] and job.pipeline == "cxr"
            assert store.pending_instances() == []
            assert "had no job yet; assembled again" in node.log()
            node.signal(signal.SIGTERM)
            assert node.wait() == 0

            node.start()  # a further restart finds nothing pending: no second job
            assert len(store.list_jobs()) == 1
        finally:
            store.close()
    finally:
        node.stop()


FREEZE_PROBE = """
import asyncio, gc, sys
from pathlib import Path
from dicom_node.node import Node
from tests.support.inproc import node_settings

async def main() -> None:
    node = Node(node_settings(Path(sys.argv[1])), freeze_startup_objects=True)
    task = asyncio.create_task(node.run())
    await node.started.wait()
    print("gc", gc.get_freeze_count(), len(gc.get_objects()))
    node.request_stop()
    await task

asyncio.run(main())
"""


def test_serve_exempts_what_start_up_built_from_the_collector(tmp_path: Path) -> None:
    """A started node (as `serve` runs it) has frozen its start-up objects, so that the
    full collections pynetdicom forces walk only what was made since (a few, not
    hundreds of thousands: a 70-100 ms pause of every thread before)."""
    out = subprocess.run([sys.executable, "-c", FREEZE_PROBE, str(tmp_path / "data")],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("gc "))
    frozen, tracked = map(int, line.split()[1:])
    assert frozen > 10 * tracked


def test_sigterm_while_a_study_arrives_makes_one_job_for_all_of_it(tmp_path: Path) -> None:
    """SIGTERM while a 48-slice CT arrives one instance at a time: no job for the part
    received so far; after the restart what was acknowledged and what the sender sends
    again become one job with every slice."""
    import threading

    from pynetdicom import AE

    from tests.support.dicom_factory import make_ct_study
    from tests.unit.pipeline.test_bundle import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundles" / "tiny")
    node = NodeProcess(tmp_path / "data", {
        "models": [{"name": "tiny", "path": str(bundle), "max_delay_ms": 0, "warmup": False}],
        "pipelines": [{"name": "seg", "model": "tiny", "task": "classify",
                       "series": {"modalities": ["CT"]}, "outputs": ["json"]}],
        "ae_titles": [{"ae_title": "DICOMNODE", "pipelines": ["seg"], "timeout_s": 3,
                       "complete_on_release": False}],
        "watch": [], "executor": TEST_EXECUTOR,
    })
    study = make_ct_study(tmp_path / "ct", slices=48)
    acked: list[str] = []
    ended: list[str] = []

    def send(files: list[Path], pause: float) -> None:
        ae = AE(ae_title="CT_SCANNER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="DICOMNODE")
        if not assoc.is_established:
            return
        for f in files:
            ds = pydicom.dcmread(f)
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # no longer established: the node aborted it
                break
            if not status or status.Status != 0:
                break
            acked.append(str(ds.SOPInstanceUID))
            time.sleep(pause)
        if assoc.is_established:
            assoc.release()
        ended.append("aborted" if assoc.is_aborted else "released")

    try:
        node.start()
        sender = threading.Thread(target=send, args=(study.paths, 0.2))
        sender.start()
        wait_for(lambda: len(acked) >= 15, "15 instances", node)
        node.signal(signal.SIGTERM)
        assert node.wait() == 0
        sender.join()
        assert 15 <= len(acked) < 48  # cut off by the stop
        # An A-ABORT, which the sender's log understands, not a connection cut at exit.
        assert ended == ["aborted"]
        assert "aborting open associations: the node is stopping" in node.log()
        store = store_of(node)
        try:
            assert store.list_jobs() == []  # no job for a part of the study
            pending = {r.sop_instance_uid for r in store.pending_instances()}
            assert set(acked) <= pending  # nothing acknowledged is lost
            node.start()
            rest = [p for p, uid in zip(study.paths, study.sop_uids, strict=True)
                    if uid not in acked]
            send(rest, 0)  # the modality sends what was not acknowledged again
            wait_for(lambda: any(j.state.final for j in store.list_jobs()), "the job", node)
            (job,) = store.list_jobs()
            assert sorted(job.input["instances"]) == sorted(study.sop_uids)
            assert store.pending_instances() == []
        finally:
            store.close()
    finally:
        node.stop()
