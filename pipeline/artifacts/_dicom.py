"""Shared pieces of the DICOM writers: patient/study copy, equipment, file meta."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

# highdicom's own test of a SOP class whose IOD has frames (not public API; pinned)
from highdicom._standard_utils import is_multiframe_image
from highdicom.enum import SpecificCharacterSetValues
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pipeline.artifacts._common import PRIVATE_SCHEME, SeriesInfo, atomic_path

__all__ = [
    "PATIENT_ATTRIBUTES",
    "STUDY_ATTRIBUTES",
    "copy_patient_study",
    "declare_private_scheme",
    "for_highdicom",
    "frame_reference",
    "in_source_time",
    "new_file_dataset",
    "save",
    "set_equipment",
    "set_series",
    "set_times",
    "source_timezone",
    "utc_date_time",
]

UTF8 = "ISO_IR 192"  #: Specific Character Set of UTF-8
#: DCM code of Processing Equipment, the purpose of the equipment that made an object
_PROCESSING = "109102"
#: ISO 2022 code extensions of multi-byte character sets (never the first value)
_MULTI_BYTE = ("ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58")
#: the Specific Character Set terms highdicom knows
_KNOWN_CHARSETS = frozenset(v.value for v in SpecificCharacterSetValues)

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


def frame_reference(source: Dataset, frame_number: int | None) -> int | None:
    """``frame_number`` when a reference to ``source`` may name a frame (its SOP class is
    a multi-frame IOD), else None. A single-frame class sent with several frames (a CR
    with Number of Frames 2) may not: dciodvfy refuses a Referenced Frame Number to it,
    and the result's notes say the frame instead."""
    if not frame_number:
        return None
    try:
        return frame_number if is_multiframe_image(source) else None
    except (AttributeError, KeyError, ValueError):
        return None


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
            if keyword in _REWRITTEN:  # in the DICOM form (see for_highdicom)
                setattr(target, keyword, _conformant(keyword, source.get(keyword)))
            else:
                target[keyword] = source[keyword]
    for keyword in _TYPE2:
        if keyword not in target:
            setattr(target, keyword, "")


_REWRITTEN = ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex")
_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_ISO_DATE = re.compile(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


def _date(text: str) -> str:
    """A DA value: ``YYYYMMDD`` as it is, ``YYYY-MM-DD`` (or with / or .) rewritten,
    anything else (or an impossible date) empty."""
    parts: tuple[str, ...] | None = None
    if re.fullmatch(r"\d{8}", text):
        parts = (text[:4], text[4:6], text[6:])
    elif m := _ISO_DATE.fullmatch(text):
        parts = m.groups()
    if parts is None:
        return ""
    try:
        return datetime(int(parts[0]), int(parts[1]), int(parts[2])).strftime("%Y%m%d")
    except ValueError:
        return ""


def _time(text: str) -> str:
    """A TM value: ``HHMMSS.ffffff`` (or a start of it) as it is, ``HH:MM:SS`` without its
    colons, anything else (or an impossible time) empty."""
    t = text.replace(":", "")
    if not _TIME.fullmatch(t) or int(t[:2]) > 23 or int(t[2:4] or 0) > 59 \
            or int(t[4:6] or 0) > 60:
        return ""
    return t


def _conformant(keyword: str, value: object) -> str:
    text = str(value or "").strip()
    if keyword == "PatientSex":
        return _SEXES.get(text.upper(), "")
    return _time(text) if keyword == "StudyTime" else _date(text)


def distinct(datasets: Sequence[Dataset]) -> list[Dataset]:
    """``datasets`` without repeats, in order: the slices of a multi-frame object share
    its header, and a reference names the object once."""
    return list({id(ds): ds for ds in datasets}.values())


def for_highdicom(datasets: Sequence[Dataset]) -> list[Dataset]:
    """``datasets`` as highdicom can take them as source images or evidence, the
    caller's datasets left as they were (a copy is made only when something changes).

    highdicom reads the patient and study attributes from the first of them only, and
    is strict about them: a missing Type 2 attribute, a birth or study date like
    ``1958-01-01``, a time like ``10:30:00`` or a sex like ``male`` raise, which
    failed the whole job. In the first, missing ones are set empty; dates, time and
    sex are rewritten to the DICOM form when they can be (``19580101``, ``103000``,
    ``M``), else set empty. Its Specific Character Set, which highdicom copies into
    the output, is put in a form highdicom takes (see :func:`_charset_for_highdicom`).
    The others are passed as they are.
    """
    if not datasets:
        return []
    return [_conformant_copy(datasets[0]), *datasets[1:]]


def _conformant_copy(ds: Dataset) -> Dataset:
    changes = {k: "" for k in _TYPE2 if k not in ds}
    for keyword in _REWRITTEN:
        if keyword in ds:
            value = ds.get(keyword)
            fixed = _conformant(keyword, value)
            if fixed != str(value or ""):
                changes[keyword] = fixed
    charset = _charset_for_highdicom(ds.get("SpecificCharacterSet"))
    if not changes and charset is None:
        return ds
    out = copy.deepcopy(ds)
    if charset == UTF8:
        out.decode()  # the values, read in the source's encoding, are written in UTF-8
    if charset is not None:
        out.SpecificCharacterSet = charset
    for keyword, value in changes.items():
        setattr(out, keyword, value)
    return out


def _charset_for_highdicom(value: object) -> str | list[str] | None:
    """The Specific Character Set to give highdicom in place of ``value``, or ``None``
    when highdicom takes ``value`` as it is.

    highdicom refuses the form Japanese and Korean modalities send most, ``\\ISO 2022
    IR 87`` (an empty first value: ASCII, then code extensions), which failed the whole
    job; it means the same as ``ISO 2022 IR 6\\ISO 2022 IR 87``, which it takes. A
    value it does not know (a misspelled term, the Korean extension) becomes UTF-8,
    the values decoded first so that nothing is lost.
    """
    if value is None or value == "":
        return None
    known = _KNOWN_CHARSETS
    if isinstance(value, str):
        return None if value in known else UTF8
    given = [str(v) for v in value]  # type: ignore[attr-defined]
    terms = [t.strip() or "ISO 2022 IR 6" for t in given]
    if len(terms) == 1:
        return None if given[0] in known else UTF8
    if all(t in known and t.startswith("ISO 2022") for t in terms) \
            and terms[0] not in _MULTI_BYTE:
        return None if terms == given else terms
    return UTF8


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
    if all(t.isascii() for t in texts) or ds.get("SpecificCharacterSet") == UTF8:
        return
    ds.decode()
    ds.SpecificCharacterSet = UTF8


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


def new_file_dataset(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """An empty dataset with file meta and the SOP Common module's UIDs filled in (the
    caller stamps its times with :func:`set_times`)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = UTF8
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = UID(sop_instance_uid)
    return ds


def utc_date_time(when: datetime) -> tuple[str, str]:
    """``when`` as a DA and a TM value in UTC (a naive ``when`` is read as local time)."""
    utc = when.astimezone(UTC)
    return utc.strftime("%Y%m%d"), utc.strftime("%H%M%S")


_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def source_timezone(source: Dataset | None) -> timezone | None:
    """The time zone the source's dates and times are in: its Timezone Offset From UTC
    (``+0900``), or None when it has none (or one that is not a valid offset): its
    times are then local time, of an unknown offset."""
    text = str(source.get("TimezoneOffsetFromUTC") or "").strip() if source else ""
    if not (m := _OFFSET.fullmatch(text)):
        return None
    hours, minutes = int(m.group(2)), int(m.group(3))
    if hours > 14 or minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if m.group(1) == "-" else delta)


def in_source_time(when: datetime, source: Dataset | None) -> tuple[datetime, bool]:
    """``when`` in the time the source's study date and time are in, and whether that
    time has a known offset: in the source's Timezone Offset From UTC when it has one,
    else in the host's local time (the source's times are then local too, and no
    offset is written)."""
    zone = source_timezone(source)
    return (when.astimezone(zone), True) if zone is not None else (when.astimezone(), False)


def set_times(ds: Dataset, when: datetime, source: Dataset | None, *,
              content: bool = True) -> None:
    """Stamp ``ds`` with the instant ``when``: Instance Creation Date/Time and Content
    Date/Time (unless ``content`` is false), in the time the source's study date and
    time are in (see :func:`in_source_time`). Timezone Offset From UTC is the source's
    when it has one, and absent when it has none: PS3.3 C.12.1.1.8 applies the offset to
    every date and time of the instance, the Study Date/Time copied from the source too.

    highdicom fills the first two from the host's local clock, so one run's objects
    disagreed; every object of a run is stamped with the same instant, written one way.
    The Contribution DateTime highdicom gives itself as processing equipment, also
    local, becomes that instant too.
    """
    local, known = in_source_time(when, source)
    date, time = local.strftime("%Y%m%d"), local.strftime("%H%M%S")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    if content:
        ds.ContentDate = date
        ds.ContentTime = time
    for item in ds.get("ContributingEquipmentSequence", []):
        purpose = item.get("PurposeOfReferenceCodeSequence") or [Dataset()]
        if "ContributionDateTime" in item and purpose[0].get("CodeValue") == _PROCESSING:
            item.ContributionDateTime = date + time
    if known:
        ds.TimezoneOffsetFromUTC = source.TimezoneOffsetFromUTC  # type: ignore[union-attr]
    elif "TimezoneOffsetFromUTC" in ds:
        del ds.TimezoneOffsetFromUTC


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
    # PS3.10 7.1: the file meta names the implementation that wrote the file
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    with atomic_path(Path(path)) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
