"""Upgrading over an older release's data directory: only ``serve`` migrates the store,
the other commands leave an older store as it is (an older node may still run on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from dicom_node.cli import main
from dicom_node.store import MIGRATIONS, SCHEMA_VERSION, NewJob, Store, schema_info
from rest.app import create_app
from tests.support.inproc import node_settings, running_node

OLD = 5  # the release before study_called_aes (migration 6)


def old_store(data: Path, version: int = OLD) -> str:
    """``data/node.db`` as a release with schema ``version`` left it, with a job."""
    data.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{data / 'node.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema_info.create(conn)
        conn.execute(schema_info.insert().values(version=version))
        for migration in MIGRATIONS[:version]:
            migration(conn)
        conn.execute(sa.text("INSERT INTO jobs (id, state, priority, pipeline, kind, attempts, "
                             "max_attempts, input, created_at, updated_at, cancel_requested) "
                             "VALUES ('0b5e1e7a-0000-0000-0000-000000000001', 'queued', 128, "
                             "'demo', 'dimse', 0, 3, '{}', '2024-01-01 00:00:00', "
                             "'2024-01-01 00:00:00', 0)"))
    engine.dispose()
    return url


def version_of(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.select(schema_info.c.version)).scalar_one())
    finally:
        engine.dispose()


def test_opening_without_migrating_leaves_an_older_store_as_it_is(tmp_path: Path) -> None:
    url = old_store(tmp_path / "data")
    store = Store(url).open(migrate=False)
    try:
        assert store.schema_version() == OLD
        assert store.migrated is None
    finally:
        store.close()
    assert version_of(url) == OLD
    store = Store(url).open()
    try:
        assert store.migrated == (OLD, SCHEMA_VERSION)
        assert store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()


@pytest.mark.parametrize("command", [
    ["jobs", "list"], ["jobs", "show", "0b5e1e7a"], ["studies", "list"],
    ["studies", "show", "1.2.3"],
])
def test_read_commands_refuse_an_older_store_and_leave_it_as_it_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    data = tmp_path / "data"
    url = old_store(data)
    assert main([*command, "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err
    assert f"has schema version {OLD}; this version uses {SCHEMA_VERSION}" in err
    assert "`dicom-node serve` of this version upgrades it (one way" in err
    assert version_of(url) == OLD


def test_check_config_notes_an_older_store_and_does_not_migrate_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    url = old_store(data)
    config = tmp_path / "node.yaml"
    config.write_text("models: []\npipelines: []\nwatch: []\n")
    assert main(["check-config", str(config), "--data-dir", str(data)]) == 0
    out, err = capsys.readouterr()
    assert "OK" in out and "no objects stored" in out
    assert f"dicom-node: note: the store at sqlite:///{data / 'node.db'} has schema version " \
        f"{OLD}; this version uses {SCHEMA_VERSION}" in err
    assert version_of(url) == OLD


def test_read_commands_work_on_a_current_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = Store(f"sqlite:///{data / 'node.db'}").open()
    store.create_job(NewJob(pipeline="demo", study_instance_uid="1.2.3"))
    store.close()
    assert main(["jobs", "list", "--data-dir", str(data)]) == 0
    assert "demo" in capsys.readouterr().out


def test_version_names_the_store_schema(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip().endswith(f"(store schema {SCHEMA_VERSION})")


async def test_serve_migrates_and_says_so(aiohttp_client: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = old_store(data)
    with structlog.testing.capture_logs() as logs:
        async with running_node(node_settings(data)) as node:
            client = await aiohttp_client(create_app(node))
            body = await (await client.get("/health")).json()
    assert body["schema"] == SCHEMA_VERSION
    assert version_of(url) == SCHEMA_VERSION
    upgraded = [e for e in logs if e["event"] == "store schema upgraded"]
    assert [(e["from_version"], e["to_version"]) for e in upgraded] == [(OLD, SCHEMA_VERSION)]
    assert "older versions of dicom-node now refuse this store" in upgraded[0]["note"]
    started = next(e for e in logs if e["event"] == "node started")
    assert started["schema"] == SCHEMA_VERSION


async def test_an_older_versions_interrupted_job_is_requeued_at_start(tmp_path: Path) -> None:
    """An older version (lease owner: the bare node_name) was killed while running a job:
    the upgraded node queues it again at start, not after its lease, and does not
    mistake its predecessor for another node with its name."""
    data = tmp_path / "data"
    settings = node_settings(data)
    data.mkdir()
    store = Store(settings.database_url).open()
    try:
        job = store.create_job(NewJob(pipeline="demo"))
        assert store.claim_next(settings.node_name, 3600) is not None
    finally:
        store.close()
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            assert node.store is not None
            events = [e.message for e in node.store.events(job.id)]
    assert "interrupted; queued again" in events
    assert any(e["event"] == "job interrupted by a restart; queued again"
               and e["job_id"] == job.id for e in logs)
    assert not [e for e in logs if "another node with this node_name" in e["event"]]
