"""Helpers shared by the artifact writers: safe names, output series settings, coding."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "PRIVATE_SCHEME",
    "SeriesInfo",
    "atomic_path",
    "concept_for_name",
    "lateralized_concept",
    "package_version",
    "patient_dir",
    "person_name",
    "utc_now",
    "validate_patient_id",
]

#: Coding scheme designator for concepts that have no standard code (DICOM PS3.16 §8.2).
PRIVATE_SCHEME = "99DCMNODE"

_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")


# Patient ID is a DICOM LO: 64 characters at most. A longer one (a broken sender) named
# a folder the filesystem refused, and its job failed every attempt.
MAX_PATIENT_ID = 64


def validate_patient_id(patient_id: str) -> str:
    """Return ``patient_id`` if it is safe as one path component.

    Raises:
        ValueError: naming the value when it is empty, ``.``/``..``, or holds a path
            separator, a control character or a character Windows forbids in names.
    """
    if not isinstance(patient_id, str) or not patient_id.strip():
        raise ValueError(f"Invalid patient_id: {patient_id!r} (empty)")
    if patient_id in {".", ".."} or ".." in patient_id:
        raise ValueError(f"Invalid patient_id: {patient_id!r} (contains '..')")
    if _FORBIDDEN.search(patient_id) or any(
        unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp"} for c in patient_id
    ):
        raise ValueError(
            f"Invalid patient_id: {patient_id!r} (path separator or control character)"
        )
    if any(c in '<>:"|?*' for c in patient_id) or patient_id != patient_id.strip():
        raise ValueError(f"Invalid patient_id: {patient_id!r} (not a safe file name)")
    if len(patient_id) > MAX_PATIENT_ID:  # DICOM's LO; with our suffixes a file name fits
        raise ValueError(f"Invalid patient_id: {patient_id[:MAX_PATIENT_ID]!r}... (longer "
                         f"than {MAX_PATIENT_ID} characters)")
    return patient_id


def patient_dir(out_dir: Path, patient_id: str) -> Path:
    """Create and return the absolute folder ``<out_dir>/<patient_id>/``.

    Raises:
        ValueError: when ``patient_id`` is not a safe path component.
        OSError: when the folder cannot be created.
    """
    # Absolute (not symlink-resolved), so paths written into JSON are absolute as in seed 001.
    folder = Path(os.path.abspath(Path(out_dir) / validate_patient_id(patient_id)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def package_version() -> str:
    """The installed dicom-node version, or ``0.0.0`` when not installed."""
    try:
        return metadata.version("dicom-node")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def person_name(value: str) -> str:
    """A DICOM PN as people write it: ``Doe^John^^Dr`` -> ``Dr John Doe``.

    Values without ``^`` are returned unchanged (stripped); only the alphabetic
    representation (before the first ``=``) is used.
    """
    text = str(value or "").split("=")[0].strip()
    if "^" not in text:
        return text
    family, given, middle, prefix, suffix = ([p.strip() for p in text.split("^")] + [""] * 5)[:5]
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path``; on success rename it to ``path``.

    Readers (exporters, watch folders) never see a half-written file. On error the
    temporary file is removed and the exception propagates.
    """
    path = Path(path)
    # unique per call: two threads writing the same artifact must not share a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def utc_now() -> datetime:
    """Current time in UTC (timezone-aware)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class SeriesInfo:
    """Equipment and series attributes of a DICOM output written by this node."""

    series_description: str = "AI result"
    series_number: int = 9001
    manufacturer: str = "dicom-node"
    manufacturer_model_name: str = "dicom-node"
    software_version: str = field(default_factory=package_version)
    device_serial_number: str = "0"
    institution_name: str | None = None


#: Standard codes of the names the shipped models use that pydicom's dictionary does not
#: find by their CamelCase form (keys: lower-case words joined by one space).
#: Mass, Infiltrate and Pathologic calcification are pydicom's own codes (CID 6104 Abnormal
#: Opacity; CID 6335); Tuberculosis, Atelectasis and Consolidation of lung are not in
#: pydicom's dictionary, and were checked against published SNOMED CT value sets.
#: "Nodule Mass" (ChestX-ray14's merged label) is coded Mass (4147007): the label covers
#: masses as well as nodules, and coding it Nodule (27925004) would say less than a mass.
#: Pleural thickening has no code here that could be verified: it stays ``99DCMNODE``
#: (a deployment may set one: ``codes`` of the pipeline's settings).
_STANDARD: dict[str, Code] = {
    "tuberculosis": Code("56717001", "SCT", "Tuberculosis"),
    "atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "consolidation": Code("95436008", "SCT", "Consolidation of lung"),
    "nodule mass": codes.SCT.Mass,
    "infiltration": codes.DCM.Infiltrate,
    "infiltrate": codes.DCM.Infiltrate,
    "calcification": codes.SCT.PathologicCalcification,
}

#: Laterality (CID 244) of a name that starts with one of these words.
_SIDES: dict[str, Code] = {"right": codes.SCT.Right, "left": codes.SCT.Left}


def _words(name: str) -> list[str]:
    return [part for part in re.split(r"[^A-Za-z0-9]+", name) if part]


def concept_for_name(name: str, scheme: str = "SCT") -> Code:
    """Return a coded concept for a human name: the standard code when one is known.

    The name is looked up in a small table of standard codes for the shipped models'
    labels, then (as CamelCase) in pydicom's code dictionary for ``scheme``; when
    absent from both, a code of the private scheme ``99DCMNODE`` is made from the name.
    """
    words = _words(name)
    if (known := _STANDARD.get(" ".join(w.lower() for w in words))) is not None:
        return known
    key = "".join(part.capitalize() for part in words)
    if key:
        try:
            code: Code = getattr(getattr(codes, scheme), key)
            return code
        except AttributeError:
            pass
    slug = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_") or "UNNAMED"
    if len(slug) > 16:
        slug = slug[:7] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8].upper()
    meaning = name.strip()[:64] or "Unnamed"
    return Code(slug, PRIVATE_SCHEME, meaning)


def lateralized_concept(name: str, scheme: str = "SCT") -> tuple[Code, Code | None]:
    """The concept of a structure and its laterality: "right kidney" is Kidney (SCT
    64033007) with laterality Right (SCT 24028007), every code from pydicom's
    dictionary. A name without a side, or whose rest has no standard code, is
    :func:`concept_for_name` of the whole name, without laterality.
    """
    words = _words(name)
    side = _SIDES.get(words[0].lower()) if len(words) > 1 else None
    if side is not None:
        rest = concept_for_name(" ".join(words[1:]), scheme)
        if rest.scheme_designator != PRIVATE_SCHEME:
            return rest, side
    return concept_for_name(name, scheme), None
