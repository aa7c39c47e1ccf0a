"""Finding and starting real peer programs for tests.

A missing peer skips its tests with a reason, except when ``REQUIRE_PEERS=1``
(set by ``.ci/run``), where it fails: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest


def require_peers() -> bool:
    return os.environ.get("REQUIRE_PEERS", "") not in ("", "0", "false")


def need_binary(name: str, *search: str) -> str:
    """Path of a peer binary, or skip/fail the test that needs it."""
    found = shutil.which(name)
    for folder in search:
        if found:
            break
        candidates = sorted(Path("/").glob(folder.lstrip("/") + "/" + name))
        found = str(candidates[-1]) if candidates else None
    if found:
        return found
    message = f"peer program {name!r} is not installed (see .ci/run for the packages)"
    if require_peers():
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
