"""InstanceWriter: durable placement for received instances, fsync-free for retrievals."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dicom_node import scp
from dicom_node.config import Settings
from dicom_node.store import Store
from tests.support.dicom_factory import make_cr_study


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 2), (False, 0)])
def test_placement_fsyncs_only_when_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             durable: bool, fsyncs: int) -> None:
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "models": [], "pipelines": [], "watch": []})
    store = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    study = make_cr_study(tmp_path / "src")
    spooled = tmp_path / "spooled.dcm"
    shutil.copyfile(study.paths[0], spooled)
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(scp.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    try:
        got = scp.InstanceWriter(settings, store).write(
            spooled, called_ae="NODE", calling_ae="PACS", association_id=1, source="retrieve",
            durable=durable)
        assert len(calls) == fsyncs
        assert got.path.read_bytes() == study.paths[0].read_bytes()
        assert not spooled.exists()
        rec = store.get_instance(study.sop_uids[0])
        assert rec is not None and Path(rec.path) == got.path
    finally:
        store.close()


@pytest.mark.parametrize("cut", [1, 1000, 5000])
def test_a_file_cut_short_is_refused_whether_its_pixels_are_read_or_skipped(
        tmp_path: Path, cut: int) -> None:
    """Pixel values over 4 KiB are skipped (not read) by the parse: a dataset cut off
    inside them is caught from the declared extent; a short read value by its length."""
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "models": [], "pipelines": [], "watch": []})
    store = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    study = make_cr_study(tmp_path / "src")
    data = study.paths[0].read_bytes()
    assert len(data) > 5000 + 4096  # the pixels are deferred
    try:
        whole = tmp_path / "whole.dcm"
        whole.write_bytes(data)
        scp.InstanceWriter(settings, store).write(
            whole, called_ae="NODE", calling_ae="PACS", association_id=1)
        short = tmp_path / "short.dcm"
        short.write_bytes(data[:-cut])
        with pytest.raises(scp.InvalidInput, match="truncated"):
            scp.InstanceWriter(settings, store).write(
                short, called_ae="NODE", calling_ae="PACS", association_id=1)
        # a small dataset whose pixels are read, not skipped
        from pydicom import dcmread

        ds = dcmread(study.paths[0])
        ds.Rows, ds.Columns = 16, 16
        ds.PixelData = bytes(16 * 16 * (ds.BitsAllocated // 8))
        small = tmp_path / "small.dcm"
        ds.save_as(small)
        raw = small.read_bytes()
        small.write_bytes(raw[:-100])
        with pytest.raises(scp.InvalidInput, match="truncated"):
            scp.InstanceWriter(settings, store).write(
                small, called_ae="NODE", calling_ae="PACS", association_id=1)
    finally:
        store.close()
