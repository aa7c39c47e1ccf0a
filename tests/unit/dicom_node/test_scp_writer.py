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
