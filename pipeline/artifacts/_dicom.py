"""Shared pieces of the DICOM writers: patient/study copy, equipment, file meta."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pipeline.artifacts._common import PRIVATE_SCHEME, SeriesInfo, atomic_path

__all__ = [
    "PATIENT_ATTRIBUTES",
    "STUDY_ATTRIBUTES",
    "copy_patient_study",
    "declare_private_scheme",
    "new_file_dataset",
    "save",
    "set_equipment",
    "set_series",
    "with_type2",
]

#: Patient module (and Patient Study module) attributes copied from the source.
PATIENT_ATTRIBUTES: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
)

#: General Study module attributes copied from the source.
STUDY_ATTRIBUTES: tuple[str, ...] = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)

_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the patient and study modules from ``source`` into ``target``.

    Type 2 attributes missing in the source are written empty.

    Raises:
        ValueError: when the source has no StudyInstanceUID.
    """
    if not source.get("StudyInstanceUID"):
        raise ValueError("the source dataset has no StudyInstanceUID")
    for keyword in PATIENT_ATTRIBUTES + STUDY_ATTRIBUTES:
        if keyword in source and source[keyword].value not in (None, ""):
            target[keyword] = source[keyword]
    for keyword in _TYPE2:
        if keyword not in target:
            setattr(target, keyword, "")


def with_type2(ds: Dataset) -> Dataset:
    """``ds``, or a copy of it with the Type 2 patient and study attributes it lacks set
    empty: highdicom reads them from a source image (an anonymised file may have no
    PatientID at all), and the caller's dataset is left as it was."""
    missing = [k for k in _TYPE2 if k not in ds]
    if not missing:
        return ds
    out = copy.deepcopy(ds)
    for keyword in missing:
        setattr(out, keyword, "")
    return out


def info_texts(info: SeriesInfo) -> list[str]:
    """The strings of ``info`` that go into an output's text attributes."""
    return [info.series_description, info.manufacturer, info.manufacturer_model_name,
            info.software_version, info.device_serial_number, info.institution_name or ""]


def declare_utf8_for(ds: Dataset, texts: Iterable[str]) -> None:
    """Make ``ds`` say UTF-8 (``ISO_IR 192``) when a string this program put in it (a
    segment or finding name, a configured description) is not ASCII.

    highdicom copies the source's Specific Character Set, or none (the default
    repertoire, ASCII) when the source had none, and pydicom then writes a label like
    "Lungenflügel" in Latin-1 undeclared, or "肝臓" as "??". The values copied from the
    source are decoded first, so that they are written again in UTF-8.
    """
    if all(t.isascii() for t in texts) or ds.get("SpecificCharacterSet") == "ISO_IR 192":
        return
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def set_equipment(ds: Dataset, info: SeriesInfo) -> None:
    """Set the General Equipment module from ``info``."""
    ds.Manufacturer = info.manufacturer
    ds.ManufacturerModelName = info.manufacturer_model_name
    ds.SoftwareVersions = info.software_version
    ds.DeviceSerialNumber = info.device_serial_number
    if info.institution_name:
        ds.InstitutionName = info.institution_name


def set_series(ds: Dataset, info: SeriesInfo, series_uid: str, modality: str) -> None:
    """Set the series attributes of a new derived series."""
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = info.series_number
    ds.SeriesDescription = info.series_description


def new_file_dataset(sop_class_uid: str, sop_instance_uid: str, when: datetime) -> Dataset:
    """An empty dataset with file meta and the SOP Common module filled in."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = UID(sop_instance_uid)
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    ds.TimezoneOffsetFromUTC = "+0000"
    return ds


def _uses_scheme(ds: Dataset, scheme: str) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if any(_uses_scheme(item, scheme) for item in elem.value):
                return True
        elif elem.keyword == "CodingSchemeDesignator" and elem.value == scheme:
            return True
    return False


def declare_private_scheme(ds: Dataset) -> None:
    """Identify the private ``99DCMNODE`` coding scheme in the Coding Scheme
    Identification Sequence when any code in ``ds`` uses it (PS3.3 C.12.1.1.7)."""
    if not _uses_scheme(ds, PRIVATE_SCHEME):
        return
    existing = ds.get("CodingSchemeIdentificationSequence", [])
    if any(item.get("CodingSchemeDesignator") == PRIVATE_SCHEME for item in existing):
        return
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "dicom-node local concepts"
    item.CodingSchemeResponsibleOrganization = "dicom-node"
    ds.CodingSchemeIdentificationSequence = [*existing, item]


def save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file (explicit VR little endian).

    Raises:
        OSError: when writing fails.
    """
    with atomic_path(Path(path)) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
