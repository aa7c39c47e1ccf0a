"""InstanceWriter: durable placement for received instances, fsync-free for retrievals."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicom_node import scp
from dicom_node.config import Settings
from dicom_node.store import Store
from tests.support.dicom_factory import make_cr_study


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                    "models": [], "pipelines": [], "watch": []})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    yield store
    store.close()


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 2), (False, 0)])
def test_placement_fsyncs_only_when_durable(
    tmp_path: Path, settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch,
    durable: bool, fsyncs: int,
) -> None:
    study = make_cr_study(tmp_path / "src")
    spooled = tmp_path / "spooled.dcm"
    shutil.copyfile(study.paths[0], spooled)
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(scp.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    got = scp.InstanceWriter(settings, store).write(
        spooled, called_ae="NODE", calling_ae="PACS", association_id=1, source="retrieve",
        durable=durable)
    assert len(calls) == fsyncs
    assert got.path.read_bytes() == study.paths[0].read_bytes()
    assert not spooled.exists()
    rec = store.get_instance(study.sop_uids[0])
    assert rec is not None and Path(rec.path) == got.path


@pytest.mark.parametrize("cut", [1, 1000, 5000])
def test_a_file_cut_short_is_refused_whether_its_pixels_are_read_or_skipped(
        tmp_path: Path, settings: Settings, store: Store, cut: int) -> None:
    """Pixel values over 4 KiB are skipped (not read) by the parse: a dataset cut off
    inside them is caught from the declared extent; a short read value by its length."""
    study = make_cr_study(tmp_path / "src")
    data = study.paths[0].read_bytes()
    assert len(data) > 5000 + 4096  # the pixels are deferred
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


def test_a_kept_header_names_the_stored_file_and_serves_the_series_selection(
        tmp_path: Path, settings: Settings, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrieval keeps the header the writer read: it points at the stored file, holds
    no pixel values, and the pipeline's series selection takes it without reading the
    file again (the loaders then read the pixels from the path)."""
    from pipeline.io import select_series
    from pipeline.settings import SeriesRules
    from tests.support.dicom_factory import make_ct_study

    ct = make_ct_study(tmp_path / "src", slices=8)
    writer = scp.InstanceWriter(settings, store)
    got = []
    for i, path in enumerate(ct.paths):
        spooled = tmp_path / f"spooled-{i}.dcm"
        shutil.copyfile(path, spooled)
        got.append(writer.write(spooled, called_ae="NODE", calling_ae="PACS",
                                association_id=1, source="retrieve", durable=False,
                                keep_header=True))
    plain = writer.write(shutil.copyfile(ct.paths[0], tmp_path / "again.dcm"),
                         called_ae="NODE", calling_ae="PACS", association_id=1)
    assert plain.header is None  # only when asked: a push keeps nothing in memory
    headers = [g.header for g in got]
    assert all(h is not None for h in headers)
    for g, h in zip(got, headers, strict=True):
        assert h is not None and Path(h.filename) == g.path
        assert h.SOPInstanceUID == g.sop_instance_uid
        # over 4 KiB: declared, never read
        assert h.get_item("PixelData", keep_deferred=True).value is None
    import pipeline.io

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file was read again")

    monkeypatch.setattr(pipeline.io.pydicom, "dcmread", no_reads)
    selected = select_series(headers, SeriesRules(modalities=["CT"], min_instances=8))
    # the loaders get the kept headers themselves (they read only the pixels from them)
    assert {id(s) for s in selected.sources} == {id(h) for h in headers}
    assert sorted(Path(s.filename) for s in selected.sources) == sorted(g.path for g in got)


def test_placed_now_recorded_together(tmp_path: Path, settings: Settings, store: Store) -> None:
    from dicom_node.config import DuplicatePolicy
    from tests.support.dicom_factory import make_ct_study

    ct = make_ct_study(tmp_path / "src", slices=4)
    writer = scp.InstanceWriter(settings, store)
    placed = []
    for i, path in enumerate(ct.paths):
        spooled = shutil.copyfile(path, tmp_path / f"spooled-{i}.dcm")
        placed.append(writer.write(spooled, called_ae="NODE", calling_ae="DICOMWEB",
                                   association_id=0, source="retrieve", durable=False,
                                   record=False))
    assert all(p.path.is_file() for p in placed)
    assert all(store.get_instance(p.sop_instance_uid) is None for p in placed)
    writer.record(placed, durable=False)
    for p in placed:
        rec = store.get_instance(p.sop_instance_uid)
        assert rec is not None and Path(rec.path) == p.path and rec.source == "retrieve"
    later = datetime.now(UTC) + timedelta(days=1)
    assert store.expired_studies(later) == [placed[0].study_instance_uid]  # its study row
    with pytest.raises(ValueError, match="OVERWRITE only"):
        writer.write(shutil.copyfile(ct.paths[0], tmp_path / "again.dcm"),
                     called_ae="NODE", calling_ae="X", association_id=0,
                     duplicates=DuplicatePolicy.KEEP_FIRST, record=False)


def test_an_instance_after_its_retrieval_ended_records_itself(
    tmp_path: Path, settings: Settings, store: Store,
) -> None:
    """C-MOVE's instances are recorded by the retrieval when it ends; one whose C-STORE
    was still being handled then (a C-MOVE that broke off) must not stay unrecorded."""
    from tests.support.dicom_factory import make_ct_study

    ct = make_ct_study(tmp_path / "src", slices=2)
    listener = scp.StorageSCP(settings, store)

    def placed(i: int) -> scp.ReceivedInstance:
        return listener.writer.write(
            shutil.copyfile(ct.paths[i], tmp_path / f"spooled-{i}.dcm"), called_ae="NODE",
            calling_ae="PACS", association_id=1, source="retrieve", durable=False,
            record=False)

    with listener.collect_from("PACS", 7) as batch:
        collector = listener._collectors[0]
        early = placed(0)
        listener._deliver(early, collector)
        assert store.get_instance(early.sop_instance_uid) is None  # the retrieval's to record
        assert batch.end() == [early]
    assert store.get_instance(early.sop_instance_uid) is not None
    late = placed(1)
    listener._deliver(late, collector)  # its C-STORE finished after the C-MOVE
    assert batch.end() == [early]
    assert store.get_instance(late.sop_instance_uid) is not None


def test_an_instance_moved_to_another_study_leaves_nothing_behind(
        tmp_path: Path, settings: Settings, store: Store,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The modality corrects a study (same SOP Instance UID, new Study UID) and sends the
    instance again: the overwrite moves it, so the old file, its empty folders and the
    old study's record go; `studies list` shows the new study only."""
    import pydicom

    from dicom_node.studies_view import list_studies

    study = make_cr_study(tmp_path / "src")
    writer = scp.InstanceWriter(settings, store)
    first = writer.write(study.paths[0].rename(tmp_path / "a.dcm"), called_ae="NODE",
                         calling_ae="CR", association_id=1)
    ds = pydicom.dcmread(first.path)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    ds.save_as(tmp_path / "b.dcm")
    moved = writer.write(tmp_path / "b.dcm", called_ae="NODE", calling_ae="CR",
                         association_id=2)
    assert moved.path != first.path and moved.path.exists()
    assert not first.path.exists()
    assert not (settings.studies_dir.resolve() / study.study_uid).exists()
    assert [s.study_instance_uid for s, _ in store.received_studies()] == [
        "1.2.826.0.1.3680043.8.498.999"]
    assert list_studies(store, limit=20, patient_id=None, as_json=False) == 0
    out = capsys.readouterr().out
    assert "1.2.826.0.1.3680043.8.498.999" in out and study.study_uid not in out


def test_a_study_record_left_without_instances_is_listed_with_none(
        tmp_path: Path, settings: Settings, store: Store,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A store written before the fix may hold a study with no instance left: the list
    shows it with 0 instead of failing for every study."""
    from dicom_node.store import studies
    from dicom_node.studies_view import list_studies

    study = make_cr_study(tmp_path / "src")
    scp.InstanceWriter(settings, store).write(study.paths[0], called_ae="NODE",
                                              calling_ae="CR", association_id=1)
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(studies.insert().values(study_instance_uid="1.2.3.4", created_at=now,
                                             updated_at=now + timedelta(seconds=1)))
    assert list_studies(store, limit=20, patient_id=None, as_json=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1].endswith("1.2.3.4") and " 0 " in lines[1]
    assert study.study_uid in lines[2]


def test_an_instance_the_store_refused_leaves_no_file(
        tmp_path: Path, settings: Settings, store: Store) -> None:
    """Answered 0xA700 and in no record, the file stayed in studies/ for good: no
    command or retention pass could find it. One already recorded is left alone."""
    import sqlite3

    import sqlalchemy as sa

    from dicom_node.errors import StoreError

    cr = make_cr_study(tmp_path / "src", seed="refused")
    writer = scp.InstanceWriter(settings, store)
    first, second = (shutil.copyfile(p, tmp_path / f"spooled-{i}.dcm")
                     for i, p in enumerate([cr.paths[0], cr.paths[0]]))
    kept = writer.write(first, called_ae="NODE", calling_ae="MOD", association_id=0)
    sa.event.listen(store.engine, "connect",  # the node waits 30 s for a lock
                    lambda conn, _: conn.execute("PRAGMA busy_timeout=50"))
    store.engine.dispose()
    holder = sqlite3.connect(tmp_path / "node.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):  # the same instance again: its file stays
            writer.write(second, called_ae="NODE", calling_ae="MOD", association_id=1)
        assert kept.path.is_file()
        other = make_cr_study(tmp_path / "src2", seed="refused-2")
        with pytest.raises(StoreError):
            writer.write(shutil.copyfile(other.paths[0], tmp_path / "spooled-new.dcm"),
                         called_ae="NODE", calling_ae="MOD", association_id=2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [p.name for p in settings.studies_dir.rglob("*.dcm")] == [kept.path.name]
