"""The spool pynetdicom writes incoming datasets to: a full disk, leftovers, its folder."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest
from pynetdicom import dimse_messages

from dicom_node import spool
from dicom_node.spool import SpoolFile, install, received_path, sweep


class _Request:
    """What a C-STORE request primitive carries in chunked mode."""

    def __init__(self, f: SpoolFile) -> None:
        self._dataset_file = f
        self._dataset_path = Path(f.name)


def test_writes_reach_the_file_and_close_keeps_it(tmp_path: Path) -> None:
    f = SpoolFile(tmp_path)
    assert Path(f.name).parent == tmp_path and Path(f.name).name.startswith(".")
    assert f.write(b"\0" * 128) == 128
    assert f.write(memoryview(b"DICM")) == 4
    f.file.flush()
    f.close()
    f.close()  # pynetdicom may close twice; harmless
    assert Path(f.name).read_bytes() == b"\0" * 128 + b"DICM"
    assert received_path(_Request(f)) == Path(f.name)


def test_a_failed_write_is_remembered_not_raised(tmp_path: Path) -> None:
    """The kernel's own ENOSPC: the spool's descriptor is pointed at /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available")
    f = SpoolFile(tmp_path)
    assert f.write(b"meta") == 4
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, f._fd)
    finally:
        os.close(full)
    assert f.write(b"x" * 65536) == 65536  # pynetdicom goes on decoding the message
    assert f.write(b"y") == 1  # later fragments are dropped
    f.close()
    assert f.error is not None and f.error.errno == 28
    with pytest.raises(OSError, match="No space left on device"):
        received_path(_Request(f))


def test_a_file_no_handler_took_is_deleted_when_dropped(tmp_path: Path) -> None:
    """An association aborted mid-dataset: pynetdicom drops the message and its file."""
    f = SpoolFile(tmp_path)
    f.write(b"partial")
    name = Path(f.name)
    del f
    gc.collect()
    assert not name.exists()


def test_the_folder_is_made_again_when_removed(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    f = SpoolFile(folder)
    assert Path(f.name).parent == folder
    f.close()


def test_a_file_that_cannot_be_created_is_an_error_not_an_exception(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    f = SpoolFile(blocker)  # mkstemp in a file: ENOTDIR, as an inode shortage would be
    assert f.error is not None
    assert f.write(b"x") == 1
    f.close()
    with pytest.raises(OSError):
        received_path(_Request(f))


def test_sweep_deletes_only_stale_partial_files(tmp_path: Path) -> None:
    old, fresh, other = tmp_path / ".old.part", tmp_path / ".new.part", tmp_path / "keep.dcm"
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    long_ago = time.time() - 2 * spool.STALE_AFTER_S
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    assert sweep(tmp_path) == 1
    assert not old.exists() and fresh.exists() and other.exists()


def test_install_makes_pynetdicom_spool_beside_the_studies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # restored afterwards: other tests in this process run their own nodes
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(spool, "_spool_dir", None)
    studies = tmp_path / "studies"
    stale = studies / spool.SPOOL_DIR_NAME / ".crashed.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    os.utime(stale, (0, 0))
    folder = install(studies)
    assert folder == studies / spool.SPOOL_DIR_NAME and not stale.exists()
    # as pynetdicom's decoder calls it
    f = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    assert isinstance(f, SpoolFile) and Path(f.name).parent == folder
    f.close()
    assert install(studies) == folder  # again: nothing to do


@pytest.mark.parametrize(("shared", "kept"), [(False, False), (True, True)])
def test_a_crash_leftover_goes_at_the_next_start_unless_studies_are_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool, kept: bool
) -> None:
    """A node killed mid-instance left its partial file for an hour, across restarts (a
    crash loop piled them up): no other node uses its own studies folder, so they all
    go. Studies shared by several nodes keep a fresh one: it may be another's."""
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(spool, "_spool_dir", None)
    studies = tmp_path / "studies"
    fresh = studies / spool.SPOOL_DIR_NAME / ".killed.part"
    fresh.parent.mkdir(parents=True)
    fresh.write_bytes(b"x" * 1000)
    install(studies, shared=shared)
    assert fresh.exists() is kept
