"""A small real filesystem that can be filled: a tmpfs mounted for one test."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(mountpoint: Path, size_mb: int, inodes: int | None = None) -> Iterator[Path]:
    """Mount a ``size_mb`` tmpfs (with at most ``inodes`` files, when given) at
    ``mountpoint`` for the block; skip where mounting is not allowed (not root, or a
    container without the capability)."""
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mb}m" + (f",nr_inodes={inodes}" if inodes else "")
    res = subprocess.run([mount, "-t", "tmpfs", "-o", options, "tmpfs",
                          str(mountpoint)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Write a filler file on ``disk`` until only about ``leave_bytes`` are free."""
    filler = disk / "filler.bin"
    size = shutil.disk_usage(disk).free - leave_bytes
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= f.write(chunk[:size])
    return filler
