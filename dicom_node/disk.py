"""The free-space reserve (``storage.min_free_mb``), checked the same way everywhere.

Intake (DICOM, STOW-RS, drop folders) stops taking new data while the disk of the
studies holds less than the reserve, and jobs wait while the disk of the results does:
a job started on a full disk failed every attempt and was given up for good, and a full
disk under the store stops everything else too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dicom_node.config import Settings

MB = 1024 * 1024
# Fewer free inodes than this is short of space too: a disk of many small instances runs
# out of them with bytes to spare, and then every instance was refused while /health
# read "ok". A filesystem that does not count inodes (f_files 0) is never short of them.
MIN_FREE_INODES = 1000


def _space(path: Path) -> tuple[int, int | None]:
    """(free megabytes, free inodes or None where the filesystem does not count them) of
    ``path``'s filesystem (its nearest existing parent's): one statvfs, as the listener
    asks for each instance."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // MB, (st.f_favail if st.f_files else None)


def free_mb(path: Path) -> int:
    """Free megabytes on ``path``'s filesystem (its nearest existing parent's)."""
    return _space(path)[0]


def free_inodes(path: Path) -> int | None:
    """Free inodes (files) on ``path``'s filesystem, or None where it does not count them."""
    return _space(path)[1]


def _few_inodes(inodes: int | None) -> str | None:
    if inodes is None or inodes >= MIN_FREE_INODES:
        return None
    return f"{inodes} inodes (files) free, under {MIN_FREE_INODES}"


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
        free, inodes = _space(path)
    except OSError:
        return None  # an unreadable disk shows up as the write's own error
    return _under_reserve(settings, free) or _few_inodes(inodes)


def disk_health(settings: Settings) -> dict[str, Any]:
    """Free space of the studies' and the results' disks against the reserve."""
    out: dict[str, Any] = {"reserve_mb": settings.storage.min_free_mb}
    ok = True
    for name, path in (("studies", settings.studies_dir), ("results", settings.results_dir)):
        free: int | None
        try:
            free, inodes = _space(path)
        except OSError:
            free = inodes = None
        out[f"{name}_free_mb"] = free
        out[f"{name}_free_inodes"] = inodes
        ok = ok and (free is None or _under_reserve(settings, free) is None) and (
            not settings.storage.min_free_mb or _few_inodes(inodes) is None)
    out["ok"] = ok
    return out
