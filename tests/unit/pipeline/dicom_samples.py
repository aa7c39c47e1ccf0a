"""Helpers for the pipeline unit tests: pydicom's bundled files and synthetic DICOM."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
# Files of ours, made from pydicom's where pydicom ships none (tests/support/files/make_*.py)
OWN_FILES = Path(__file__).resolve().parents[2] / "support" / "files"


def bundled(name: str) -> Path:
    """A file pydicom ships in its wheel (never downloaded), or one of ``OWN_FILES``;
    skips when absent."""
    path = OWN_FILES / name if (OWN_FILES / name).exists() else TEST_FILES / name
    if not path.exists():
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return path


def make_image(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    series_uid: str | None = None,
    sop_class: UID = CTImageStorage,
    **attrs: Any,
) -> Dataset:
    """A minimal single-frame monochrome image dataset around ``pixels`` (int array)."""
    pixels = np.asarray(pixels)
    signed = pixels.dtype.kind == "i"
    bits = pixels.dtype.itemsize * 8
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID = "P1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(s) for s in pixels.shape)
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_slice(
    position: Sequence[float],
    value: float,
    *,
    series_uid: str,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    size: tuple[int, int] = (8, 8),
    spacing: tuple[float, float] = (0.7, 0.7),
    instance: int = 1,
    **attrs: Any,
) -> Dataset:
    """A CT slice whose HU are all ``value`` (stored with intercept -1024)."""
    stored = np.full(size, round(value + 1024), dtype=np.uint16)
    defaults: dict[str, Any] = {
        "SliceThickness": 2.5, "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "BodyPartExamined": "CHEST"}
    return make_image(
        stored,
        series_uid=series_uid,
        ImageOrientationPatient=list(orientation),
        ImagePositionPatient=list(position),
        PixelSpacing=list(spacing),
        RescaleSlope=1,
        RescaleIntercept=-1024,
        InstanceNumber=instance,
        **{**defaults, **attrs},
    )


@pytest.fixture
def write_series(tmp_path: Path) -> Callable[..., list[Path]]:
    """Write one axial CT series at z positions; each slice's HU = 10 * z."""

    def _write(
        zs: Sequence[float],
        *,
        series_uid: str | None = None,
        folder: str = "series",
        order: Sequence[int] | None = None,
        **attrs: Any,
    ) -> list[Path]:
        uid = series_uid or generate_uid()
        paths = []
        idx = list(order) if order is not None else list(range(len(zs)))
        for n, i in enumerate(idx):
            ds = ct_slice(
                (-10.0, -20.0, zs[i]), 10 * zs[i], series_uid=uid, instance=n + 1, **attrs
            )
            paths.append(save(ds, tmp_path / folder / f"im{n:03d}.dcm"))
        return paths

    return _write


def enhanced_ct(slices: Sequence[Dataset], **attrs: Any) -> Dataset:
    """Single-frame CT slices turned into one multi-frame object by highdicom's converter
    (Legacy Converted Enhanced CT): a frame per slice, placed by per-frame functional
    groups, rescale per frame where the slices differ. It lists frames from the highest
    position to the lowest, the reverse of the order a volume needs."""
    ds = hd.legacy.LegacyConvertedEnhancedCTImage(
        list(slices), series_instance_uid=generate_uid(), series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def coronal_reformat(slices: Sequence[Dataset]) -> list[Dataset]:
    """An axial series (unit row/column directions along x and y) resliced into coronal
    slices, as a scanner's MPR writes them: one slice per row of the axial images, each
    image running right to left and head to feet (Image Orientation 1\\0\\0\\0\\0\\-1)."""
    axial = sorted(slices, key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.stack([ds.pixel_array for ds in axial])  # z, y, x
    first = axial[0]
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    dz = float(axial[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)
    top = z0 + (len(axial) - 1) * dz
    series = generate_uid()
    out = []
    for r in range(volume.shape[1]):
        ds = pydicom.dcmread(first.filename) if getattr(first, "filename", None) else \
            first.copy()
        image = np.ascontiguousarray(volume[::-1, r, :])
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [x0, y0 + r * row_mm, top]
        ds.PixelSpacing = [dz, col_mm]
        ds.SliceThickness = row_mm
        ds.Rows, ds.Columns = image.shape
        ds.PixelData = image.tobytes()
        ds.InstanceNumber = r + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
        out.append(ds)
    return out
