"""Shared fixtures: a running node on free loopback ports with a temp data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.node import RunningNode, node_settings, running_node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    with running_node(node_settings(tmp_path / "data")) as rn:
        yield rn
