"""Test helper: validate a DICOM file with dicom3tools' ``dciodvfy``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["assert_dciodvfy_clean", "dciodvfy_executable"]


def dciodvfy_executable() -> str:
    """Path of ``dciodvfy``; skips the test when missing, fails instead if REQUIRE_PEERS=1."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        if os.environ.get("REQUIRE_PEERS") == "1":
            pytest.fail("dciodvfy (dicom3tools) is required (REQUIRE_PEERS=1) but not installed")
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    return exe


def assert_dciodvfy_clean(path: Path) -> str:
    """Run ``dciodvfy path``; fail on any output line starting with ``Error``.

    Returns the full output (warnings included) for further checks.
    """
    exe = dciodvfy_executable()
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy errors for {Path(path).name}:\n{text}"
    return text
