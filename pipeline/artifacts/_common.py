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


def concept_for_name(name: str, scheme: str = "SCT") -> Code:
    """Return a coded concept for a human name: the standard code when one is known.

    The name is looked up (as CamelCase) in pydicom's code dictionary for ``scheme``;
    when absent, a code of the private scheme ``99DCMNODE`` is made from the name.
    """
    key = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part)
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
