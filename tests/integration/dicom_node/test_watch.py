"""Drop folders with the whole node running: real files on a real filesystem.

The node runs in the test's loop with the test job handler, so jobs are created
(and run to nothing) but no model runs. No assertion has a wall-clock limit:
``wait_until`` polls until a condition holds; pytest-timeout guards hangs.

Unreadable inputs: the tests run as root, so a ``chmod 000`` file stays readable.
Two honest stand-ins are used instead: a named pipe (a path that cannot be read as
a file), and ``dicom_node.watch._open_input`` patched to raise ``PermissionError``
for one file, exactly what ``open`` raises for a file without read permission.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import jwt
import pytest
from aiohttp.test_utils import TestClient

import dicom_node.watch as watch_module
from dicom_node.node import Node
from dicom_node.retention import SweepResult, delete_study, inputs_to_forget
from dicom_node.store import Job
from rest.app import create_app
from tests.support.dicom_factory import make_cr_study, make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port

pytestmark = pytest.mark.timeout(180)


def settings_for(tmp_path: Path, **watch: Any) -> Any:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    folder = {"name": "inbox", "path": str(inbox), "pipelines": ["demo"], "settle_s": 0.3,
              "timeout_s": 1.0, **watch}
    return node_settings(
        tmp_path / "data", watch=[folder],
        dimse={"host": "127.0.0.1", "port": free_port()},
        models=[{"name": "demo-model", "path": "unused"}],
        pipelines=[{"name": "demo", "model": "demo-model", "task": "classify"}],
        destinations=[{"name": "out", "type": "folder", "path": str(tmp_path / "out")}],
    )


async def wait_until(cond: Callable[[], Awaitable[bool] | bool], step: float = 0.05) -> None:
    while True:
        value = cond()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        await asyncio.sleep(step)


async def watch_jobs(node: Node) -> list[Job]:
    assert node.store is not None
    jobs = await asyncio.to_thread(node.store.list_jobs, None, 10_000)
    return [j for j in jobs if j.kind == "watch"]


async def instance_count(node: Node) -> int:
    assert node.store is not None
    return await asyncio.to_thread(node.store.count_instances)


def files_in(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def reason(tmp_path: Path, name: str) -> str:
    return (tmp_path / "inbox" / "failed" / f"{name}.reason.txt").read_text()


async def test_study_copied_file_by_file_gives_one_job(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "src", seed="watch-study", slices=6)
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        for p in study.paths:
            shutil.copy(p, inbox / p.name)
            await asyncio.sleep(0.05)

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        await wait_until(lambda: len(files_in(inbox / "done")) == 6)
        job = (await watch_jobs(node))[0]
        assert sorted(job.input["instances"]) == sorted(study.sop_uids)
        assert job.input["study_instance_uid"] == study.study_uid
        assert job.input["output_dir"] == str((tmp_path / "data" / "results" / "inbox")
                                              .resolve())
        assert job.input["destinations"] == []
        assert job.pipeline == "demo"
        assert [p.name for p in inbox.iterdir() if p.is_file()] == []
        assert await instance_count(node) == 6
        assert node.watch is not None
        assert node.watch.status()["inbox"]["state"] == "watching"


async def test_output_and_destinations_come_from_the_folder(tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-out")
    settings = settings_for(tmp_path, output=str(tmp_path / "results-here"),
                            destinations=["out"], grouping="series")
    async with running_node(settings) as node:
        shutil.copy(cr.paths[0], tmp_path / "inbox" / "image")  # no extension: content counts

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        job = (await watch_jobs(node))[0]
        assert job.input["output_dir"] == str((tmp_path / "results-here").resolve())
        assert job.input["destinations"] == ["out"]
        assert job.input["series_instance_uid"] == cr.series_uid


async def test_slow_copy_is_not_taken_early(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "src", seed="watch-slow", slices=1, size=256)
    data = study.paths[0].read_bytes()
    target = tmp_path / "inbox" / "slow.dcm"
    async with running_node(settings_for(tmp_path, settle_s=2.0)) as node:
        chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
        with open(target, "wb") as out:  # one handle, like cp: no close-write until the end
            for chunk in chunks:
                out.write(chunk)
                out.flush()
                await asyncio.sleep(0.08)  # ~3 s in all, far more than settle_s
                assert await instance_count(node) == 0
                assert not (tmp_path / "inbox" / "failed").exists()
        await wait_until(lambda: files_in(tmp_path / "inbox" / "done") == ["slow.dcm"])
        assert await instance_count(node) == 1
        assert not (tmp_path / "inbox" / "failed").exists()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return path


async def test_zip_of_a_study_is_unpacked_and_bad_zips_refused(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "src", seed="watch-zip", slices=4)
    members = {f"DICOM/IM{i}": p.read_bytes() for i, p in enumerate(study.paths)}
    members["README.TXT"] = b"exported by a CD burner"
    good = _zip(tmp_path / "study.zip", members)
    slip = _zip(tmp_path / "slip.zip", {"../../escaped.dcm": study.paths[0].read_bytes()})
    bomb = _zip(tmp_path / "bomb.zip", {"zeros.dcm": bytes(300 << 20)})
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        for z in (good, slip, bomb):
            shutil.copy(z, inbox / z.name)

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        await wait_until(lambda: files_in(inbox / "failed") == [
            "bomb.zip", "bomb.zip.reason.txt", "slip.zip", "slip.zip.reason.txt"])
        job = (await watch_jobs(node))[0]
        assert sorted(job.input["instances"]) == sorted(study.sop_uids)
        assert files_in(inbox / "done") == ["study.zip", "study.zip.skipped.txt"]
        assert "README.TXT: not DICOM" in (inbox / "done" / "study.zip.skipped.txt").read_text()
        assert "outside the folder" in reason(tmp_path, "slip.zip")
        assert "zip bomb" in reason(tmp_path, "bomb.zip")
        assert not (tmp_path / "escaped.dcm").exists()
        assert not (tmp_path.parent / "escaped.dcm").exists()
        assert await instance_count(node) == 4


async def test_non_dicom_fails_and_temporary_names_wait(tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-temp")
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        (inbox / "notes.dcm").write_text("this is not an image\n")
        (inbox / ".hidden").write_bytes(cr.paths[0].read_bytes())
        shutil.copy(cr.paths[0], inbox / "copying.part")
        (inbox / "backup~").write_text("editor backup")
        await wait_until(lambda: files_in(inbox / "failed") == ["notes.dcm",
                                                                "notes.dcm.reason.txt"])
        assert "not DICOM" in reason(tmp_path, "notes.dcm")
        assert await instance_count(node) == 0
        assert (inbox / ".hidden").exists() and (inbox / "copying.part").exists()
        assert (inbox / "backup~").exists()
        os.rename(inbox / "copying.part", inbox / "copied.dcm")  # the copy tool finished
        await wait_until(lambda: files_in(inbox / "done") == ["copied.dcm"])
        assert await instance_count(node) == 1
        assert (inbox / ".hidden").exists() and (inbox / "backup~").exists()


async def test_unreadable_inputs_go_to_failed(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-locked")
    real_open = watch_module._open_input

    def deny(path: str) -> BinaryIO:
        if path.endswith("locked.dcm"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path)

    monkeypatch.setattr(watch_module, "_open_input", deny)
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        shutil.copy(cr.paths[0], inbox / "locked.dcm")
        os.mkfifo(inbox / "pipe.dcm")
        await wait_until(lambda: files_in(inbox / "failed") == [
            "locked.dcm", "locked.dcm.reason.txt", "pipe.dcm.reason.txt"])
        assert (inbox / "failed" / "pipe.dcm").exists()
        assert "cannot be read" in reason(tmp_path, "locked.dcm")
        assert "Permission denied" in reason(tmp_path, "locked.dcm")
        assert "not a regular file" in reason(tmp_path, "pipe.dcm")
        assert await instance_count(node) == 0


async def test_restart_mid_drop_processes_every_file_once(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "src", seed="watch-200", slices=200, size=16)
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path, settle_s=0.2, timeout_s=0.5)
    for p in study.paths:  # present before the node starts: the start-up scan takes them
        shutil.copy(p, inbox / p.name)
    async with running_node(settings) as node:
        async def some_stored() -> bool:
            return await instance_count(node) >= 20
        await wait_until(some_stored, step=0.01)
    left = len([p for p in inbox.iterdir() if p.is_file()])
    print(f"stopped with {left} of 200 files not yet taken")
    # A crash after recording but before moving leaves a taken file in place:
    done = sorted((inbox / "done").iterdir())
    shutil.copy(done[0], inbox / done[0].name)
    async with running_node(settings) as node:
        await wait_until(lambda: len(files_in(inbox / "done")) == 201 and not any(
            p.is_file() for p in inbox.iterdir()))

        async def all_in_jobs() -> bool:
            return sum(len(j.input["instances"]) for j in await watch_jobs(node)) >= 200
        await wait_until(all_in_jobs)
        await asyncio.sleep(1.5)  # longer than timeout_s: a duplicate group would show now
        jobs = await watch_jobs(node)
        sops = [s for j in jobs for s in j.input["instances"]]
        assert sorted(sops) == sorted(study.sop_uids)  # each exactly once
        assert await instance_count(node) == 200
        assert node.store is not None
        counts = await asyncio.to_thread(node.store.count_watch_inputs, "inbox")
        assert counts == {"queued": 200}
        assert node.watch is not None and node.watch.status()["inbox"]["known"] == 1


async def test_on_done_delete(tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-delete")
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path, on_done="delete")) as node:
        shutil.copy(cr.paths[0], inbox / "a.dcm")

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        await wait_until(lambda: not (inbox / "a.dcm").exists())
        assert not (inbox / "done").exists()
        assert node.store is not None
        rec = await asyncio.to_thread(node.store.get_instance, cr.sop_uids[0])
        assert rec is not None and rec.path.exists() and rec.source == "watch"


async def test_on_done_keep_takes_each_file_once_across_restarts(tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-keep")
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path, on_done="keep")
    async with running_node(settings) as node:
        shutil.copy(cr.paths[0], inbox / "a.dcm")

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        assert (inbox / "a.dcm").exists()
    async with running_node(settings) as node:
        assert node.watch is not None
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["known"] == 1)
        await asyncio.sleep(1.5)  # longer than timeout_s
        assert len(await watch_jobs(node)) == 1
        assert (inbox / "a.dcm").exists() and not (inbox / "done").exists()
        assert await instance_count(node) == 1


async def test_a_keep_folder_does_not_read_its_files_again_at_each_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start used to copy and hash every file a keep folder holds (and log a line for
    each) to recognise it; now the files taken before the stop are known by size, times
    and inode (``<studies>/.watch-seen``), and only a changed one is read."""
    first = make_cr_study(tmp_path / "src", seed="watch-keep-seen-1")
    second = make_cr_study(tmp_path / "src", seed="watch-keep-seen-2")
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path, on_done="keep")
    opened: list[str] = []
    real_open = watch_module._open_input

    def open_input(path: str) -> BinaryIO:
        opened.append(os.path.basename(path))
        return real_open(path)

    monkeypatch.setattr(watch_module, "_open_input", open_input)
    async with running_node(settings) as node:
        shutil.copy(first.paths[0], inbox / "a.dcm")
        shutil.copy(second.paths[0], inbox / "b.dcm")

        async def two_jobs() -> bool:
            return len(await watch_jobs(node)) == 2
        await wait_until(two_jobs)
    seen = settings.studies_dir / ".watch-seen" / "inbox.json"
    assert seen.stat().st_mode & 0o777 == 0o600
    assert set(json.loads(seen.read_text())["inputs"]) == {str(inbox.resolve() / "a.dcm"),
                                                           str(inbox.resolve() / "b.dcm")}
    shutil.copy(first.paths[0], inbox / "b.dcm")  # b changed while the node was down
    opened.clear()
    async with running_node(settings) as node:
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["known"] == 2)
        await asyncio.sleep(1.5)  # longer than timeout_s
        assert len(await watch_jobs(node)) == 2  # b's new content is a's: known by hash
    assert "a.dcm" not in opened and "b.dcm" in opened


async def test_a_deleted_study_dropped_again_is_taken_again(tmp_path: Path) -> None:
    """`dicom-node studies delete` and retention forget the content hashes of a deleted
    study's files (loose or in an archive) in folders that move or delete what they
    take: the same files dropped again are a new drop. A ``keep`` folder's are kept."""
    cr = make_cr_study(tmp_path / "src", seed="watch-again-cr")
    ct = make_ct_study(tmp_path / "src", seed="watch-again-ct", slices=2)
    archive = _zip(tmp_path / "ct.zip", {p.name: p.read_bytes() for p in ct.paths})
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path)
    assert inputs_to_forget(settings) == ["inbox"]
    assert inputs_to_forget(settings_for(tmp_path, on_done="keep")) == []
    async with running_node(settings) as node:
        store = node.store
        assert store is not None

        async def drop_both(jobs: int) -> None:
            shutil.copy(cr.paths[0], inbox / "cr.dcm")
            shutil.copy(archive, inbox / "ct.zip")

            async def all_jobs() -> bool:
                return len(await watch_jobs(node)) == jobs
            await wait_until(all_jobs)
            await wait_until(lambda: not (inbox / "cr.dcm").exists()
                             and not (inbox / "ct.zip").exists())

        await drop_both(2)
        assert await instance_count(node) == 3
        for study in (cr.study_uid, ct.study_uid):
            await asyncio.to_thread(delete_study, store, study,
                                    settings.studies_dir.resolve(), SweepResult(),
                                    forget_inputs_of=inputs_to_forget(settings))
        assert await instance_count(node) == 0
        await drop_both(4)
        assert await instance_count(node) == 3
        sops = sorted(s for j in (await watch_jobs(node))[:2] for s in j.input["instances"])
        assert sops == sorted([*cr.sop_uids, *ct.sop_uids])
        assert node.watch is not None and node.watch.status()["inbox"]["known"] == 0


async def test_a_keep_folder_forgets_files_removed_from_it(tmp_path: Path) -> None:
    """What a keep folder remembers of the files it holds goes when they are removed
    (found by the next full sweep), so that it does not grow for months."""
    cr = make_cr_study(tmp_path / "src", seed="watch-keep-forget")
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path, on_done="keep", rescan_s=1)) as node:
        shutil.copy(cr.paths[0], inbox / "a.dcm")

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        assert node.watch is not None
        folder = node.watch.folders["inbox"]
        await wait_until(lambda: str(inbox / "a.dcm") in folder._handled)
        (inbox / "a.dcm").unlink()
        await wait_until(lambda: not folder._handled)


async def test_symlink_to_outside_is_not_followed(tmp_path: Path) -> None:
    outside = make_cr_study(tmp_path / "outside", seed="watch-outside")
    inside = make_cr_study(tmp_path / "src", seed="watch-inside")
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        os.symlink(outside.paths[0], inbox / "link.dcm")
        shutil.copy(inside.paths[0], inbox / "real.dcm")
        assert node.watch is not None
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["ignored"] == 1)
        await wait_until(lambda: files_in(inbox / "done") == ["real.dcm"])
        assert node.store is not None
        assert await asyncio.to_thread(node.store.get_instance, outside.sop_uids[0]) is None
        assert (inbox / "link.dcm").is_symlink() and outside.paths[0].exists()


async def test_folder_deleted_and_recreated(tmp_path: Path, aiohttp_client: Any) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-gone")
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        client: TestClient = await aiohttp_client(create_app(node))
        assert node.watch is not None
        shutil.rmtree(inbox)
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["state"] == "missing")
        body = await (await client.get("/health")).json()
        assert body["watch"]["inbox"]["state"] == "missing"
        assert body["watch"]["inbox"]["message"]
        # an open route does not tell anyone where the server's folders are; an admin sees
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        assert "path" not in body["watch"]["inbox"]
        for scope, shown in (("read", False), ("admin", True)):
            token = jwt.encode({"sub": "ops", "scope": scope, "exp": int(time.time()) + 300},
                               secret, algorithm="HS256")
            seen = await (await client.get("/health", headers={
                "Authorization": f"Bearer {token}"})).json()
            assert seen["watch"]["inbox"].get("path") == (str(inbox) if shown else None)
        wrong = await client.get("/health", headers={"Authorization": "Bearer not-a-token"})
        assert wrong.status == 200 and "path" not in (await wrong.json())["watch"]["inbox"]
        inbox.write_text("a file where the folder was")
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["state"] == "unreadable")
        assert "not a folder" in node.watch.status()["inbox"]["message"]
        inbox.unlink()
        inbox.mkdir()
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["state"] == "watching")
        shutil.copy(cr.paths[0], inbox / "back.dcm")
        await wait_until(lambda: files_in(inbox / "done") == ["back.dcm"])
        body = await (await client.get("/health")).json()
        assert body["watch"]["inbox"]["state"] == "watching"


async def test_bare_dataset_without_preamble_is_taken(tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "src", seed="watch-bare")
    from pydicom import dcmread

    ds = dcmread(cr.paths[0])
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM"
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path)) as node:
        (inbox / "IM000001").write_bytes(raw)
        await wait_until(lambda: files_in(inbox / "done") == ["IM000001"])
        assert node.store is not None
        rec = await asyncio.to_thread(node.store.get_instance, cr.sop_uids[0])
        assert rec is not None
        assert dcmread(rec.path).SOPInstanceUID == cr.sop_uids[0]


async def test_instances_a_crash_left_without_a_job_are_assembled_at_start(
        tmp_path: Path) -> None:
    from dicom_node.scp import InstanceWriter
    from dicom_node.store import Store

    cr = make_cr_study(tmp_path / "src", seed="watch-crash")
    settings = settings_for(tmp_path)
    (tmp_path / "data").mkdir(exist_ok=True)
    store = Store(settings.database_url).open()
    try:  # what a crash after recording, before the group became a job, leaves behind
        staged = tmp_path / "staged.dcm"
        shutil.copy(cr.paths[0], staged)
        InstanceWriter(settings, store).write(staged, called_ae="", calling_ae="",
                                              association_id=0, source="watch")
        store.add_watch_inputs("inbox", [("0" * 64, cr.sop_uids[0])])
    finally:
        store.close()
    async with running_node(settings) as node:
        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        assert (await watch_jobs(node))[0].input["instances"] == cr.sop_uids
        assert node.store is not None

        async def queued() -> bool:
            assert node.store is not None
            counts = await asyncio.to_thread(node.store.count_watch_inputs, "inbox")
            return counts == {"queued": 1}
        await wait_until(queued)


async def test_files_inotify_never_reports_are_found_by_the_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a network share written from another host (or after inotify's queue
    # overflowed): watchdog reports nothing, so only the periodic sweep can find it.
    monkeypatch.setattr(watch_module._Handler, "dispatch", lambda self, event: None)
    study = make_cr_study(tmp_path / "src", seed="share")
    inbox = tmp_path / "inbox"
    async with running_node(settings_for(tmp_path, rescan_s=1)) as node:
        await wait_until(lambda: node.watch is not None
                         and node.watch.status()["inbox"]["state"] == "watching")
        for p in study.paths:
            shutil.copy(p, inbox / p.name)

        async def one_job() -> bool:
            return len(await watch_jobs(node)) == 1
        await wait_until(one_job)
        assert len(files_in(inbox / "done")) == len(study.paths)


# -- what the log says -------------------------------------------------------------------

PHI_NAME = "DOE^JOHN_1950"  # a CD export names files after the patient


def names_in_logs(logs: list[dict[str, Any]], marker: str = PHI_NAME) -> list[dict[str, Any]]:
    return [e for e in logs if marker in repr(e)]


async def test_file_names_never_reach_the_log(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog

    cr = make_cr_study(tmp_path / "src", seed="watch-phi")
    real_open = watch_module._open_input

    def flaky(path: str) -> BinaryIO:
        if path.endswith("io-error.dcm"):  # an I/O error names the file it happened to
            raise OSError(5, "Input/output error", path)
        return real_open(path)

    monkeypatch.setattr(watch_module, "_open_input", flaky)
    slip = _zip(tmp_path / "slip.zip", {f"../{PHI_NAME}.dcm": cr.paths[0].read_bytes()})
    inbox = tmp_path / "inbox"
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings_for(tmp_path)) as node:
            assert node.watch is not None
            shutil.copy(cr.paths[0], inbox / f"{PHI_NAME}-io-error.dcm")
            shutil.copy(slip, inbox / f"{PHI_NAME}.zip")
            (inbox / f"{PHI_NAME}.txt").write_text("not an image\n")
            await wait_until(lambda: len(files_in(inbox / "failed")) == 4)
            await wait_until(lambda: any(e["event"].startswith("cannot take a file")
                                         for e in logs))
    assert names_in_logs(logs) == []
    io_error = next(e for e in logs if e["event"].startswith("cannot take a file"))
    assert io_error["error"] == "EIO: Input/output error"


async def test_long_names_are_refused_with_a_reason_and_taken_twice(tmp_path: Path) -> None:
    import structlog

    cr = make_cr_study(tmp_path / "src", seed="watch-long")
    inbox = tmp_path / "inbox"
    junk = "j" * 246 + ".txt"  # 250 bytes: '<name>.reason.txt' would be 261
    image = "i" * 250 + ".dcm"  # 254 bytes: a second one in done/ cannot be '<stem>-1.dcm'
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings_for(tmp_path)) as node:
            (inbox / junk).write_text("not an image\n")
            (inbox / "other.txt").write_text("not an image either\n")
            await wait_until(lambda: len(files_in(inbox / "failed")) == 4)
            shutil.copy(cr.paths[0], inbox / image)
            await wait_until(lambda: files_in(inbox / "done") == [image])
            shutil.copy(cr.paths[0], inbox / image)  # the same image dropped again
            await wait_until(lambda: len(files_in(inbox / "done")) == 2)
            assert node.watch is not None
            assert node.watch.status()["inbox"]["known"] == 1
    failed = files_in(inbox / "failed")
    notes = [n for n in failed if n.endswith(".reason.txt") and n.startswith("jjjj")]
    assert junk in failed and len(notes) == 1 and len(notes[0].encode()) <= 255
    assert "not DICOM" in (inbox / "failed" / notes[0]).read_text()
    again = next(n for n in files_in(inbox / "done") if n != image)
    assert again.startswith("iiii") and again.endswith("-1.dcm")
    assert len(again.encode()) <= 255
    refused = [e for e in logs if e["event"].startswith("input refused")]
    assert [e["event"] for e in refused] == ["input refused; moved to failed/"] * 2
    assert all("not DICOM" in e["reason"] for e in refused)
    assert len({e["sha256"] for e in refused}) == 2  # tell the two apart without names
    assert not [e for e in logs if e["event"].startswith("cannot take a file")]


def _immutable(folder: Path) -> None:
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)],
                                        capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a filesystem with the immutable flag")


@pytest.mark.parametrize("blocker", ["immutable subfolder", "file in done/"])
async def test_a_taken_input_that_cannot_be_moved_is_left_in_place_once(
        tmp_path: Path, blocker: str) -> None:
    import structlog

    cr = make_cr_study(tmp_path / "src", seed="watch-stuck")
    other = make_cr_study(tmp_path / "src2", seed="watch-stuck-2")
    settings = settings_for(tmp_path, rescan_s=1)
    inbox = tmp_path / "inbox"
    sub = inbox / "sub"
    sub.mkdir()
    shutil.copy(cr.paths[0], sub / "a.dcm")
    if blocker == "file in done/":  # where done/sub/ must go
        (inbox / "done").mkdir()
        (inbox / "done" / "sub").write_text("in the way")
    else:
        _immutable(sub)
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_node(settings) as node:
                async def one_job() -> bool:
                    return len(await watch_jobs(node)) == 1
                await wait_until(one_job)
                await wait_until(lambda: any("cannot be moved" in e["event"] for e in logs))
                shutil.copy(other.paths[0], inbox / "b.dcm")  # the folder still takes others
                await wait_until(lambda: files_in(inbox / "done") == (
                    ["b.dcm"] if blocker != "file in done/" else ["b.dcm", "sub"]))
                await asyncio.sleep(3)  # several sweeps and retry delays
                assert (sub / "a.dcm").exists()
                assert len(await watch_jobs(node)) == 2
    finally:
        subprocess.run(["chattr", "-i", str(sub)], capture_output=True)
    stuck = [e for e in logs if "cannot be moved" in e["event"]]
    assert len(stuck) == 1 and stuck[0]["log_level"] == "warning" and stuck[0]["sha256"]
    assert stuck[0]["error"].startswith(("EPERM", "ENOTDIR", "EEXIST"))
    assert not [e for e in logs if e["event"].startswith(("cannot take a file",
                                                          "input already taken"))]


@pytest.mark.parametrize("name", ["done", "failed"])
async def test_a_file_named_done_or_failed_pauses_the_folder(
        tmp_path: Path, name: str, aiohttp_client: Any) -> None:
    import structlog

    cr = make_cr_study(tmp_path / "src", seed=f"watch-misconf-{name}")
    settings = settings_for(tmp_path)
    inbox = tmp_path / "inbox"
    (inbox / name).write_text("a file where the node's folder goes")
    shutil.copy(cr.paths[0], inbox / "a.dcm")
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            client: TestClient = await aiohttp_client(create_app(node))
            assert node.watch is not None
            status = node.watch.status()["inbox"]
            assert status["state"] == "misconfigured"  # said at start, before any file
            assert f"'{name}'" in status["message"]
            body = await (await client.get("/health")).json()
            assert body["watch"]["inbox"]["state"] == "misconfigured"
            await asyncio.sleep(2)  # inputs wait where they are
            assert (inbox / "a.dcm").exists() and await instance_count(node) == 0
            (inbox / name).unlink()
            await wait_until(lambda: files_in(inbox / "done") == ["a.dcm"])
            assert node.watch.status()["inbox"]["state"] == "watching"
    warned = [e for e in logs if e["event"] == "drop folder misconfigured"]
    assert len(warned) == 1
    assert not [e for e in logs if e["event"].startswith("cannot take a file")]


async def test_non_dicom_is_refused_without_being_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog

    from dicom_node.watch import Watcher

    cr = make_cr_study(tmp_path / "src", seed="watch-sniff")
    staged: list[str] = []
    real_stage = Watcher.stage

    def stage(self: Watcher, path: str) -> tuple[str, str]:
        staged.append(os.path.basename(path))  # the real copy, only noted
        return real_stage(self, path)

    monkeypatch.setattr(Watcher, "stage", stage)
    movie = os.urandom(8 << 20)
    bomb = _zip(tmp_path / "bomb.zip", {"zeros.dcm": bytes(300 << 20)})
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path)
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            (inbox / "video.mp4").write_bytes(movie)
            shutil.copy(bomb, inbox / "bomb.zip")
            shutil.copy(cr.paths[0], inbox / "a.dcm")
            await wait_until(lambda: files_in(inbox / "failed") == [
                "bomb.zip", "bomb.zip.reason.txt", "video.mp4", "video.mp4.reason.txt"])
            await wait_until(lambda: files_in(inbox / "done") == ["a.dcm"])
            assert await instance_count(node) == 1
    assert staged == ["a.dcm"]
    assert "not DICOM" in reason(tmp_path, "video.mp4")
    assert "zip bomb" in reason(tmp_path, "bomb.zip")
    sha = hashlib.sha256(movie).hexdigest()
    assert f"sha256: {sha}" in reason(tmp_path, "video.mp4")
    refused = [e for e in logs if e["event"] == "input refused; moved to failed/"]
    assert sha[:16] in [e["sha256"] for e in refused]


# -- disk space ----------------------------------------------------------------------------


async def test_intake_waits_while_disk_space_is_under_the_reserve(
        tmp_path: Path, aiohttp_client: Any) -> None:
    import structlog

    study = make_ct_study(tmp_path / "src", seed="watch-full", slices=3)
    inbox = tmp_path / "inbox"
    # a reserve larger than any disk: the same as a disk filled up to it
    base = settings_for(tmp_path)
    settings = base.model_copy(update={"storage": base.storage.model_copy(
        update={"min_free_mb": 10**9})})
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            client: TestClient = await aiohttp_client(create_app(node))
            for p in study.paths:
                shutil.copy(p, inbox / p.name)
            assert node.watch is not None
            await wait_until(lambda: node.watch is not None
                             and node.watch.status()["inbox"]["held"] == 3)
            body = await (await client.get("/health")).json()
            assert body["watch"]["inbox"]["state"] == "paused"
            assert "storage.min_free_mb" in body["watch"]["inbox"]["message"]
            await asyncio.sleep(2)  # polls and sweeps: still nothing taken
            assert await instance_count(node) == 0
            assert sorted(p.name for p in inbox.iterdir()) == sorted(
                p.name for p in study.paths)
            assert not list((settings.studies_dir / ".watch-staging").iterdir())
    paused = [e for e in logs if e["event"] == "drop folder paused"]
    assert len(paused) == 1 and paused[0]["log_level"] == "warning"


async def test_a_folder_short_of_inodes_stays_paused_and_says_so(tmp_path: Path) -> None:
    """With bytes to spare and inodes short, the folder paused on inodes but resumed on
    bytes every few seconds (three log lines a turn, ~100,000 a day), its message
    blaming megabytes; it now stays paused, says inodes, and resumes once they are back."""
    import structlog

    from dicom_node.disk import MIN_FREE_INODES, free_inodes
    from tests.support.disk import small_disk

    study = make_ct_study(tmp_path / "src", seed="watch-inodes", slices=1)
    inbox = tmp_path / "inbox"
    with small_disk(tmp_path / "disk", 40, inodes=MIN_FREE_INODES + 300) as disk:
        base = settings_for(tmp_path)
        settings = base.model_copy(update={"storage": base.storage.model_copy(
            update={"data_dir": disk / "data", "min_free_mb": 1})})
        with structlog.testing.capture_logs() as logs:
            async with running_node(settings) as node:
                crumbs = disk / "crumbs"
                crumbs.mkdir()
                n = 0
                while (free_inodes(disk) or 0) >= MIN_FREE_INODES:
                    (crumbs / str(n)).touch()
                    n += 1
                shutil.copy(study.paths[0], inbox / "IM1")
                assert node.watch is not None
                await wait_until(lambda: node.watch is not None
                                 and node.watch.status()["inbox"]["held"] == 1)
                await asyncio.sleep(3)  # several polls: it stays paused
                status = node.watch.status()["inbox"]
                assert status["state"] == "paused", status
                assert "inodes (files) free" in status["message"]
                shutil.rmtree(crumbs)
                await wait_until(lambda: len(files_in(inbox / "done")) == 1)
                assert await instance_count(node) == 1
    events = [e["event"] for e in logs]
    assert events.count("drop folder paused") == 1
    assert events.count("disk space is back: taking inputs again") == 1


async def test_intake_resumes_when_disk_space_returns(tmp_path: Path) -> None:
    import structlog

    from tests.support.disk import fill, small_disk

    study = make_ct_study(tmp_path / "src", seed="watch-resume", slices=2)
    inbox = tmp_path / "inbox"
    with small_disk(tmp_path / "disk", 40) as disk:
        base = settings_for(tmp_path)
        settings = base.model_copy(update={"storage": base.storage.model_copy(
            update={"data_dir": disk / "data", "min_free_mb": 10})})
        with structlog.testing.capture_logs() as logs:
            async with running_node(settings) as node:
                filler = fill(disk, 6 << 20)  # under the 10 MB reserve
                for p in study.paths:
                    shutil.copy(p, inbox / p.name)
                assert node.watch is not None
                await wait_until(lambda: node.watch is not None
                                 and node.watch.status()["inbox"]["state"] == "paused")
                assert await instance_count(node) == 0
                filler.unlink()
                await wait_until(lambda: len(files_in(inbox / "done")) == 2)
                assert node.watch.status()["inbox"]["state"] == "watching"
                assert await instance_count(node) == 2
    events = [e["event"] for e in logs]
    assert events.count("drop folder paused") == 1
    assert events.count("disk space is back: taking inputs again") == 1


async def test_skipped_zip_entries_are_listed_beside_the_archive(tmp_path: Path) -> None:
    import structlog

    study = make_ct_study(tmp_path / "src", seed="watch-skip", slices=2)
    good, other = (p.read_bytes() for p in study.paths)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("IM9", other)
    archive = _zip(tmp_path / "a.zip", {"good.dcm": good, f"{PHI_NAME}.dcm": other[:-500],
                                        "inner.zip": inner.getvalue()})
    lost = _zip(tmp_path / "lost.zip", {"inner.zip": inner.getvalue()})
    inbox = tmp_path / "inbox"
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings_for(tmp_path)) as node:
            shutil.copy(archive, inbox / "a.zip")
            shutil.copy(lost, inbox / "lost.zip")
            await wait_until(lambda: files_in(inbox / "done") == ["a.zip", "a.zip.skipped.txt"])
            await wait_until(lambda: len(files_in(inbox / "failed")) == 2)
            assert await instance_count(node) == 1
    note = (inbox / "done" / "a.zip.skipped.txt").read_text()
    assert f"{PHI_NAME}.dcm: " in note and "truncated" in note
    assert "inner.zip: nested archive: not unpacked" in note
    assert "good.dcm" not in note
    assert "inner.zip: nested archive" in reason(tmp_path, "lost.zip")
    warned = [e for e in logs if e["event"].startswith("archive taken, some entries skipped")]
    assert len(warned) == 1 and warned[0]["skipped_entries"] == 2
    assert names_in_logs(logs) == []


_UNREADABLE_SCRIPT = """
import asyncio, json, shutil, sys
from pathlib import Path
import structlog
from tests.integration.dicom_node.test_watch import settings_for, wait_until, files_in
from tests.support.dicom_factory import make_cr_study
from tests.support.inproc import running_node

async def main(tmp: Path) -> None:
    cr = make_cr_study(tmp / "src", seed="watch-unreadable")
    settings = settings_for(tmp, rescan_s=1)
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            shutil.copy(cr.paths[0], tmp / "inbox" / "a.dcm")
            await wait_until(lambda: files_in(tmp / "inbox" / "done") == ["a.dcm"])
            await wait_until(lambda: node.watch.status()["inbox"]["unreadable_subfolders"] > 0)
            status = node.watch.status()["inbox"]
    print(json.dumps({"status": status, "logs": [
        {k: str(v) for k, v in e.items()} for e in logs]}))

asyncio.run(main(Path(sys.argv[1])))
"""


def test_unreadable_subfolders_are_counted_and_warned_once(tmp_path: Path) -> None:
    """As a node that is not root sees a ``chmod 000`` subfolder: as root, the script runs
    without the capabilities that bypass file permissions."""
    inbox = tmp_path / "inbox"
    locked = inbox / PHI_NAME
    locked.mkdir(parents=True)
    (locked / "b.dcm").write_bytes(b"unseen")
    locked.chmod(0)
    prefix: list[str] = []
    if os.geteuid() == 0:
        capsh = shutil.which("capsh")
        if capsh is None:
            pytest.skip("as root, reading a chmod 000 folder needs capsh to be refused")
        prefix = [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--"]
    script = tmp_path / "unreadable.py"
    script.write_text(_UNREADABLE_SCRIPT)
    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, str(script), str(tmp_path)]
    if prefix:
        cmd = [*prefix, "-c", shlex.join(cmd)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=150,
                             env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        locked.chmod(0o755)
    if res.returncode != 0 and "Operation not permitted" in res.stderr and prefix:
        pytest.skip(f"cannot drop capabilities here: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["status"]["state"] == "watching"
    assert out["status"]["unreadable_subfolders"] == 1
    warned = [e for e in out["logs"] if e["event"].startswith("subfolders cannot be read")]
    assert len(warned) == 1 and warned[0]["unreadable_subfolders"] == "1"
    assert names_in_logs(out["logs"]) == []
    assert (locked / "b.dcm").exists()


# -- writers that pause ------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["one handle", "reopened per chunk"])
async def test_a_writer_pausing_mid_file_is_waited_for(tmp_path: Path, writer: str) -> None:
    study = make_ct_study(tmp_path / "src", seed=f"watch-pause-{writer}", slices=1, size=256)
    data = study.paths[0].read_bytes()
    target = tmp_path / "inbox" / "paused.dcm"
    half = len(data) // 2
    async with running_node(settings_for(tmp_path, settle_s=0.3)) as node:
        if writer == "one handle":
            with open(target, "wb") as out:
                out.write(data[:half])
                out.flush()
                await asyncio.sleep(2)  # far more than settle_s: it reads as truncated
                out.write(data[half:])
        else:
            for piece in (data[:half // 2], data[half // 2:half], data[half:]):
                with open(target, "ab") as out:  # each close is a close-write
                    out.write(piece)
                await asyncio.sleep(1.5)
        await wait_until(lambda: files_in(tmp_path / "inbox" / "done") == ["paused.dcm"])
        assert await instance_count(node) == 1
        assert not (tmp_path / "inbox" / "failed").exists()


async def test_a_truncated_file_is_refused_after_its_grace(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "src", seed="watch-cut", slices=1, size=64)
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path, settle_s=0.2, truncated_grace_s=1)
    async with running_node(settings) as node:
        (inbox / "cut.dcm").write_bytes(study.paths[0].read_bytes()[:-100])
        (inbox / "notes.txt").write_text("not DICOM at all\n")
        await wait_until(lambda: "notes.txt" in files_in(inbox / "failed"))
        await wait_until(lambda: "cut.dcm" in files_in(inbox / "failed"))
        assert "truncated" in reason(tmp_path, "cut.dcm")
        assert await instance_count(node) == 0


async def test_a_truncated_file_held_open_is_not_refused(tmp_path: Path) -> None:
    study = make_ct_study(tmp_path / "src", seed="watch-held", slices=1, size=64)
    data = study.paths[0].read_bytes()
    inbox = tmp_path / "inbox"
    settings = settings_for(tmp_path, settle_s=0.2, truncated_grace_s=0.5)
    async with running_node(settings) as node:
        with open(inbox / "held.dcm", "wb") as out:
            out.write(data[:-100])
            out.flush()
            await asyncio.sleep(3)  # several times the grace, the file still open
            assert not (inbox / "failed").exists()
            out.write(data[-100:])
        await wait_until(lambda: files_in(inbox / "done") == ["held.dcm"])
        assert await instance_count(node) == 1
