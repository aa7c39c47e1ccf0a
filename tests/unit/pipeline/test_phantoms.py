"""Phantom generators: determinism, shapes, labels, boxes; DICOM writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.train.phantoms_ct import LABELS, make_ct_phantom, write_dicom_series
from pipeline.train.phantoms_cxr import FINDINGS, make_cxr_phantom, write_dicom


def test_cxr_deterministic() -> None:
    a, b = make_cxr_phantom(123), make_cxr_phantom(123)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.labels, b.labels)
    assert a.boxes == b.boxes
    assert not np.array_equal(a.image, make_cxr_phantom(124).image)


def test_cxr_shape_range_labels() -> None:
    p = make_cxr_phantom(7)
    assert p.image.shape == (256, 256) and p.image.dtype == np.float32
    assert p.image.min() >= 0.0 and p.image.max() <= 1.0
    assert p.labels.shape == (len(FINDINGS),)
    assert set(p.boxes) == {f for f, v in zip(FINDINGS, p.labels, strict=True) if v}


@pytest.mark.parametrize("finding", FINDINGS)
def test_cxr_each_finding_has_box_and_changes_image(finding: str) -> None:
    forced = {f: f == finding for f in FINDINGS}
    p = make_cxr_phantom(42, findings=forced)
    normal = make_cxr_phantom(42, findings={f: False for f in FINDINGS})
    assert p.labels[FINDINGS.index(finding)] == 1 and p.labels.sum() == 1
    x0, y0, x1, y1 = p.boxes[finding]
    assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    diff = np.abs(p.image - normal.image)
    inside = diff[y0:y1, x0:x1].mean()
    assert inside > 0.02, f"{finding} barely visible in its box"


def test_cxr_any_number_of_findings() -> None:
    counts = {int(make_cxr_phantom(s).labels.sum()) for s in range(60)}
    assert 0 in counts and max(counts) >= 3


def test_ct_deterministic_and_labels() -> None:
    a, b = make_ct_phantom(5), make_ct_phantom(5)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.labels, b.labels)
    assert a.volume.dtype == np.float32 and a.labels.dtype == np.uint8
    assert a.volume.shape == a.labels.shape == (48, 96, 96)
    assert set(np.unique(a.labels)) == set(range(len(LABELS)))
    assert a.volume.min() >= -1024 and a.volume.max() > 300  # air and bone
    liver = a.volume[a.labels == 1].mean()
    assert 80 < liver < 130
    assert not np.array_equal(a.volume, make_ct_phantom(6).volume)


def test_write_dicom_dx(tmp_path: Path) -> None:
    p = make_cxr_phantom(11)
    path = write_dicom(p, tmp_path / "cxr.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
    assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST"
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert ds.BitsAllocated == 16 and ds.WindowCenter == 2048 and ds.WindowWidth == 4096
    for kw in ("PatientID", "PatientName", "PatientSex", "PatientAge", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "AccessionNumber"):
        assert str(getattr(ds, kw)), kw
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert np.array_equal(ds.pixel_array, np.round(p.image * 4095).astype(np.uint16))
    again = pydicom.dcmread(write_dicom(p, tmp_path / "again.dcm"))
    assert again.SOPInstanceUID == ds.SOPInstanceUID  # deterministic UIDs
    assert pydicom.dcmread(write_dicom(p, tmp_path / "cr.dcm", modality="CR")).Modality == "CR"


def test_write_dicom_series_ct(tmp_path: Path) -> None:
    p = make_ct_phantom(3)
    paths = write_dicom_series(p, tmp_path / "ct")
    assert len(paths) == p.volume.shape[0]
    dss = [pydicom.dcmread(x) for x in paths]
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    d0 = dss[0]
    assert d0.SOPClassUID == pydicom.uid.CTImageStorage and d0.Modality == "CT"
    assert d0.BodyPartExamined == "ABDOMEN" and d0.AccessionNumber
    assert d0.RescaleSlope == 1 and d0.RescaleIntercept == -1024
    assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in d0.PixelSpacing] == [p.spacing[1], p.spacing[2]]
    assert float(d0.SliceThickness) == p.spacing[0]
    zs = [float(d.ImagePositionPatient[2]) for d in dss]
    assert np.allclose(np.diff(zs), p.spacing[0])
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in dss])
    assert np.abs(vol - np.round(p.volume)).max() <= 0.5
