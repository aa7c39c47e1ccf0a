"""Drop-folder helpers without a node: names, archive limits, bare datasets."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.identity import IMPLEMENTATION_CLASS_UID
from dicom_node.watch import (
    ZipLimits,
    _ensure_part10,
    _Refused,
    _unpack,
    is_temporary_name,
)
from tests.support.dicom_factory import make_cr_study


@pytest.mark.parametrize("name,temporary", [
    ("a.dcm", False), ("IM0001", False), ("study.zip", False), (".hidden", True),
    ("a.dcm.part", True), ("a.TMP", True), ("a.dcm~", True), ("x.crdownload", True),
])
def test_temporary_names(name: str, temporary: bool) -> None:
    assert is_temporary_name(name) is temporary


def make_zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return str(path)


def test_unpack_keeps_names_inside(tmp_path: Path) -> None:
    z = make_zip(tmp_path / "a.zip", {"DICOM/IM1": b"x", "IM2": b"y", "__MACOSX/._IM2": b"z"})
    out = tmp_path / "out"
    out.mkdir()
    files = _unpack(z, out, ZipLimits())
    assert sorted(p.relative_to(out).as_posix() for p in files) == ["DICOM/IM1", "IM2"]


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil", "C:/evil"])
def test_unpack_refuses_escaping_names(tmp_path: Path, name: str) -> None:
    z = make_zip(tmp_path / "a.zip", {name: b"x"})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(_Refused, match="outside the folder"):
        _unpack(z, out, ZipLimits())
    assert not (tmp_path / "evil").exists()


def test_unpack_refuses_links(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    (tmp_path / "out").mkdir()
    with pytest.raises(_Refused, match="is a link"):
        _unpack(str(path), tmp_path / "out", ZipLimits())


def test_unpack_refuses_bombs(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    ratio = make_zip(tmp_path / "ratio.zip", {"zeros": bytes(300 << 20)})
    with pytest.raises(_Refused, match="zip bomb"):
        _unpack(ratio, tmp_path / "out", ZipLimits())
    many = make_zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(5)})
    with pytest.raises(_Refused, match="entries"):
        _unpack(many, tmp_path / "out", ZipLimits(max_entries=4))
    big = make_zip(tmp_path / "big.zip", {"r": bytes(range(256)) * 64})
    with pytest.raises(_Refused, match="zip bomb"):
        _unpack(big, tmp_path / "out", ZipLimits(max_total_bytes=1000))


def test_unpack_refuses_corrupt_archives(tmp_path: Path) -> None:
    path = tmp_path / "bad.zip"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    (tmp_path / "out").mkdir()
    with pytest.raises(_Refused, match="not a readable zip"):
        _unpack(str(path), tmp_path / "out", ZipLimits())


def test_bare_dataset_gets_a_file_meta_group(tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path, seed="bare")
    ds = dcmread(cr.paths[0])
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = tmp_path / "bare"
    bare.write_bytes(buf.getvalue())
    assert _ensure_part10(str(bare)) is True
    again = dcmread(bare)
    assert again.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert again.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID  # who wrote it
    assert again.SOPInstanceUID == cr.sop_uids[0]
    assert bare.read_bytes().endswith(buf.getvalue())  # the dataset's bytes untouched


def test_text_is_not_dicom(tmp_path: Path) -> None:
    p = tmp_path / "notes.dcm"
    p.write_text("hello\n" * 100)
    with pytest.raises(_Refused, match="not DICOM"):
        _ensure_part10(str(p))


def test_a_mostly_black_image_is_no_zip_bomb(tmp_path: Path) -> None:
    # a 2048x2048 all-zero CR: 8 MB that deflate squeezes ~1000:1, as real images can
    cr = make_cr_study(tmp_path / "src", seed="black")
    ds = dcmread(cr.paths[0])
    ds.Rows = ds.Columns = 2048
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = bytes(2048 * 2048 * 2)
    buf = io.BytesIO()
    ds.save_as(buf)
    z = make_zip(tmp_path / "black.zip", {"IM1": buf.getvalue()})
    assert buf.tell() > 900 * Path(z).stat().st_size  # ratio close to 1000
    (tmp_path / "out").mkdir()
    files = _unpack(z, tmp_path / "out", ZipLimits())
    assert [p.read_bytes() == buf.getvalue() for p in files] == [True]


def test_a_gigabyte_of_zeros_is_refused_before_unpacking(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, \
            zf.open("zeros.dcm", "w", force_zip64=True) as out:
        chunk = bytes(1 << 20)
        for _ in range(1024):
            out.write(chunk)
    assert path.stat().st_size < 2 << 20
    (tmp_path / "out").mkdir()
    with pytest.raises(_Refused, match="zip bomb"):
        _unpack(str(path), tmp_path / "out", ZipLimits())
    assert list((tmp_path / "out").iterdir()) == []  # refused on what it declares
