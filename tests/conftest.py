"""Shared fixtures: stores on SQLite and PostgreSQL, a running node on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.store import Store
from tests.support.node import RunningNode, node_settings, running_node
from tests.support.postgres import postgres_server


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    with running_node(node_settings(tmp_path / "data")) as rn:
        yield rn


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A fresh, migrated store on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
        s = Store(url).open()
    else:
        url = request.getfixturevalue("postgres_url")
        s = Store(url).open()
        # one database for the session: start each test from empty tables
        with s.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE jobs, job_events, artifacts, exports, instances, "
                                 "watch_inputs, studies, study_called_aes, integer_ids, "
                                 "batches, batch_sources, nodes RESTART IDENTITY CASCADE")
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    yield s
    s.close()
