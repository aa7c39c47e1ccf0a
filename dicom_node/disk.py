"""The free-space reserve (``storage.min_free_mb``), checked the same way everywhere.

Intake (DICOM, STOW-RS, drop folders) stops taking new data while the disk of the
studies holds less than the reserve, and jobs wait while the disk of the results does:
a job started on a full disk failed every attempt and was given up for good, and a full
disk under the store stops everything else too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from dicom_node.config import Settings

MB = 1024 * 1024


def free_mb(path: Path) -> int:
    """Free megabytes on ``path``'s filesystem (its nearest existing parent's)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // MB


def _under_reserve(settings: Settings, free: int) -> str | None:
    reserve = settings.storage.min_free_mb
    if not reserve or free >= reserve:  # 0 turns the check off
        return None
    return f"{free} MB free, under storage.min_free_mb ({reserve} MB)"


def short_of_space(settings: Settings, path: Path) -> str | None:
    """Why nothing more should be written under ``path`` now, or None: its disk is
    under ``storage.min_free_mb``."""
    if not settings.storage.min_free_mb:
        return None
    try:
        free = free_mb(path)
    except OSError:
        return None  # an unreadable disk shows up as the write's own error
    return _under_reserve(settings, free)


def disk_health(settings: Settings) -> dict[str, Any]:
    """Free space of the studies' and the results' disks against the reserve."""
    out: dict[str, Any] = {"reserve_mb": settings.storage.min_free_mb}
    ok = True
    for name, path in (("studies", settings.studies_dir), ("results", settings.results_dir)):
        try:
            free: int | None = free_mb(path)
        except OSError:
            free = None
        out[f"{name}_free_mb"] = free
        ok = ok and (free is None or _under_reserve(settings, free) is None)
    out["ok"] = ok
    return out
