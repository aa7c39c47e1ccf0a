"""Synthetic inputs for the artifact writers: a DX image, a CT series, results."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pipeline.types import (
    ClassificationResult,
    Finding,
    PatientStudy,
    Segment,
    SegmentationResult,
)

from .dicom_check import assert_dciodvfy_clean, dciodvfy_executable

LABELS = [
    "Tuberculosis",
    "Cardiomegaly",
    "Pleural Thickening",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Atelectasis",
    "Nodule Mass",
    "Fibrosis",
    "Infiltration",
    "Calcification",
]
STUDY_UID = generate_uid()


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient_study(ds: Dataset) -> None:
    ds.PatientName = "Doe^John"
    ds.PatientID = "PAT001"
    ds.PatientBirthDate = "19800115"
    ds.PatientSex = "M"
    ds.PatientAge = "045Y"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20250314"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Smith^Anna"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC12345"
    ds.StudyDescription = "CHEST PA"


@pytest.fixture
def dx_ds() -> Dataset:
    """A 64 x 48 DX For Presentation chest image."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _meta(DigitalXRayImageStorageForPresentation, uid)
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = uid
    _patient_study(ds)
    ds.Modality = "DX"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "ACME"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns = 64, 48
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 4096, (64, 48), dtype=np.uint16).tobytes()
    return ds


@pytest.fixture
def study() -> PatientStudy:
    return PatientStudy(
        patient_id="PAT001",
        patient_name="Doe^John",
        patient_sex="M",
        patient_age="045Y",
        patient_birth_date="19800115",
        study_instance_uid=STUDY_UID,
        study_date="20250314",
        accession_number="ACC12345",
        study_description="CHEST PA",
    )


def _image() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:48].astype(np.float32)
    img = 0.2 + 0.6 * np.exp(-(((x - 24) / 14) ** 2 + ((y - 32) / 22) ** 2))
    return img.astype(np.float32)


def make_classification(result: str, dx: Dataset) -> ClassificationResult:
    rng = np.random.default_rng(1)
    probs = rng.uniform(0.01, 0.4, len(LABELS))
    if result != "Normal":
        probs[0], probs[5] = 0.87, 0.72
    findings = [Finding(n, bool(p >= 0.5), float(p)) for n, p in zip(LABELS, probs, strict=True)]
    heat = None
    if result != "Normal":
        y, x = np.mgrid[0:16, 0:12].astype(np.float32)
        heat = np.exp(-(((x - 4) / 3) ** 2 + ((y - 5) / 3) ** 2)).astype(np.float32)
    return ClassificationResult(
        model_name="cxr-findings",
        model_version="v1.0.1",
        result=result,
        findings=findings,
        image=_image(),
        heatmap=heat,
        sop_instance_uid=str(dx.SOPInstanceUID),
        series_instance_uid=str(dx.SeriesInstanceUID),
    )


@pytest.fixture
def tb_result(dx_ds: Dataset) -> ClassificationResult:
    return make_classification("TB Presumptive", dx_ds)


@pytest.fixture
def normal_result(dx_ds: Dataset) -> ClassificationResult:
    return make_classification("Normal", dx_ds)


@pytest.fixture
def ct_series() -> list[Dataset]:
    """Eight 32 x 32 axial CT slices, in slice order."""
    series_uid, frame_uid = generate_uid(), generate_uid()
    out = []
    for i in range(8):
        uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _meta(CTImageStorage, uid)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = uid
        _patient_study(ds)
        ds.StudyDescription = "CT ABDOMEN"
        ds.BodyPartExamined = "ABDOMEN"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "ACME"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-80.0, -80.0, 10.0 + 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [5.0, 5.0]
        ds.SliceThickness = 5.0
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.Rows = ds.Columns = 32
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = np.full((32, 32), 1024, dtype=np.int16).tobytes()
        out.append(ds)
    return out


@pytest.fixture
def seg_result(ct_series: list[Dataset]) -> SegmentationResult:
    z, y, x = np.mgrid[0:8, 0:32, 0:32]
    labels = np.zeros((8, 32, 32), dtype=np.uint8)
    labels[((x - 10) ** 2 + (y - 14) ** 2 < 36) & (z >= 1) & (z <= 6)] = 1
    labels[((x - 22) ** 2 + (y - 18) ** 2 < 16) & (z >= 2) & (z <= 5)] = 2
    labels[((x - 16) ** 2 + (y - 26) ** 2 < 6) & (z >= 3) & (z <= 4)] = 3
    volume = np.where(labels > 0, 60.0, -100.0).astype(np.float32)
    voxel_ml = 5.0 * 5.0 * 5.0 / 1000.0
    names = {1: "Liver", 2: "Spleen", 3: "Blob organ"}
    segments = [Segment(k, v, float((labels == k).sum() * voxel_ml)) for k, v in names.items()]
    return SegmentationResult(
        model_name="ct-organs",
        model_version="v0.3.0",
        labels=labels,
        segments=segments,
        volume=volume,
        spacing=(5.0, 5.0, 5.0),
        series_instance_uid=str(ct_series[0].SeriesInstanceUID),
    )


@pytest.fixture
def dciodvfy() -> Callable[[Path], str]:
    """``dciodvfy`` as a checker: skips (or fails with REQUIRE_PEERS=1) when missing."""
    dciodvfy_executable()
    return assert_dciodvfy_clean


@pytest.fixture
def host_time_zone() -> Iterator[Callable[[str], None]]:
    """Set the process's local time zone (``TZ`` + ``time.tzset``); restored after."""
    before = os.environ.get("TZ")

    def use(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield use
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()
