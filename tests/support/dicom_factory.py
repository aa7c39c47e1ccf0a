"""Small synthetic DICOM studies for tests, built with pydicom only.

Every UID is derived from a seed, so the same seed gives the same study (and
different seeds never collide). Pixel data is deterministic too.

    cr = make_cr_study(tmp_path / "cr", seed="cr-1")
    ct = make_ct_study(tmp_path / "ct", seed="ct-1", slices=20)
    ct.paths, ct.study_uid, ct.series_uids, ct.sop_uids
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

UID_PREFIX = PYDICOM_ROOT_UID  # pydicom's root; generate_uid() hashes the seed under it


def seeded_uid(seed: str, *parts: object) -> str:
    """A valid, deterministic UID for ``seed`` and ``parts``."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[seed, *map(str, parts)]))


@dataclass
class SyntheticStudy:
    """What a builder wrote: the files and their UIDs."""

    study_uid: str
    patient_id: str
    accession_number: str
    modality: str
    paths: list[Path] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)

    @property
    def series_uid(self) -> str:
        """The (first) series' UID."""
        return self.series_uids[0]


def _base(seed: str, sop_class: str, sop_uid: str, modality: str, patient_id: str,
          accession: str, study_uid: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = f"Test^{seed}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyDescription = f"synthetic {modality}"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.Manufacturer = "dicom-node tests"
    return ds


def _image(ds: Dataset, pixels: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()


def _pixels(seed: str, index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(abs(hash_seed(seed, index)))
    return rng.integers(0, 4096, size=(size, size), dtype=np.uint16)


def hash_seed(seed: str, index: int) -> int:
    """A stable integer from a seed (Python's ``hash`` is salted per process)."""
    return int(seeded_uid(seed, "pixels", index).replace(".", "")[-18:])


def _save(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_cr_study(folder: Path, seed: str = "cr", *, patient_id: str | None = None,
                  accession_number: str | None = None) -> SyntheticStudy:
    """One CR instance, 256x256, 16-bit, in ``folder``."""
    patient_id = patient_id or f"PAT-{seed}"
    accession = accession_number or f"ACC-{seed}"[:16]
    study = SyntheticStudy(seeded_uid(seed, "study"), patient_id, accession, "CR")
    series_uid = seeded_uid(seed, "series", 0)
    sop_uid = seeded_uid(seed, "sop", 0, 0)
    ds = _base(seed, ComputedRadiographyImageStorage, sop_uid, "CR", patient_id, accession,
               study.study_uid, series_uid)
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PixelSpacing = [0.5, 0.5]
    _image(ds, _pixels(seed, 0, 256))
    study.paths.append(_save(ds, folder))
    study.series_uids.append(series_uid)
    study.sop_uids.append(sop_uid)
    return study


def make_ct_study(folder: Path, seed: str = "ct", slices: int = 20, *,
                  patient_id: str | None = None, accession_number: str | None = None,
                  size: int = 64) -> SyntheticStudy:
    """One CT series of ``slices`` axial 16-bit slices (``size`` square, 64 by default),
    2.5 mm apart, in ``folder``."""
    patient_id = patient_id or f"PAT-{seed}"
    accession = accession_number or f"ACC-{seed}"[:16]
    study = SyntheticStudy(seeded_uid(seed, "study"), patient_id, accession, "CT")
    series_uid = seeded_uid(seed, "series", 0)
    frame_uid = seeded_uid(seed, "frame", 0)
    study.series_uids.append(series_uid)
    for i in range(slices):
        sop_uid = seeded_uid(seed, "sop", 0, i)
        ds = _base(seed, CTImageStorage, sop_uid, "CT", patient_id, accession,
                   study.study_uid, series_uid)
        ds.FrameOfReferenceUID = frame_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHEST"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-16.0, -16.0, round(i * 2.5, 2)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 2.5
        ds.PixelSpacing = [0.5, 0.5]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.KVP = 120
        _image(ds, _pixels(seed, i, size))
        study.paths.append(_save(ds, folder))
        study.sop_uids.append(sop_uid)
    return study


def make_sc_instance(folder: Path, study: SyntheticStudy, seed: str = "sc") -> Path:
    """A Secondary Capture instance in a new series of an existing ``study``."""
    series_uid = seeded_uid(seed, "series", 0)
    sop_uid = seeded_uid(seed, "sop", 0, 0)
    ds = _base(seed, SecondaryCaptureImageStorage, sop_uid, "OT", study.patient_id,
               study.accession_number, study.study_uid, series_uid)
    ds.PatientName = f"Test^{study.patient_id}"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    _image(ds, _pixels(seed, 0, 32))
    return _save(ds, folder)
