"""Freed C-heap memory goes back to the OS between jobs (glibc's malloc_trim)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from dicom_node.memory import release_free_memory


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_holes_a_thread_left_in_its_arena_are_returned() -> None:
    """A thread allocates ~200 MB in 2 KB blocks and frees nine in ten: the holes stay
    resident (glibc keeps them for reuse) until the trim gives their pages back."""
    kept: list[bytes] = []

    def churn() -> None:
        blocks = [bytes(2048) for _ in range(100_000)]
        kept.extend(blocks[::10])
        del blocks

    t = threading.Thread(target=churn)
    t.start()
    t.join()
    before = rss_mb()
    assert release_free_memory()
    after = rss_mb()
    assert before - after > 50, (before, after)
    assert len(kept) == 10_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
@pytest.mark.parametrize(("env", "applied"), [({}, True), ({"MALLOC_ARENA_MAX": "8"}, False)])
def test_arena_limit_applies_unless_the_environment_sets_one(
    env: dict[str, str], applied: bool
) -> None:
    """In a fresh interpreter, as ``dicom-node serve`` calls it first thing."""
    import os
    import subprocess

    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    res = subprocess.run(
        [sys.executable, "-c", "from dicom_node.memory import limit_arenas; "
         "print(limit_arenas())"],
        env={**clean, **env}, capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[3])
    assert res.stdout.strip() == str(applied)
