"""A whole node running inside the test's event loop (no HTTP listener; use a test client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from dicom_node.config import Settings
from dicom_node.node import Node
from tests.support.peers import free_port

TEST_RUNNER = "tests.support.handlers:create_handler"


def node_settings(data_dir: Path, **sections: Any) -> Settings:
    cfg: dict[str, Any] = {
        "storage": {"data_dir": str(data_dir)},
        # a free port, not 11112: a node running on this machine must not fail the tests
        "dimse": {"host": "127.0.0.1", "port": free_port()},
        "rest": {"enabled": False},
        "executor": {"runner": TEST_RUNNER, "poll_interval_s": 0.05, "grace_period_s": 1},
        "watch": [],
        "models": [],  # no demo models unless a test asks: they take a while to load
        "pipelines": [],
        "logging": {"format": "json"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return Settings.model_validate(cfg)


@asynccontextmanager
async def running_node(settings: Settings) -> AsyncIterator[Node]:
    node = Node(settings)
    task = asyncio.create_task(node.run())
    started = asyncio.create_task(node.started.wait())
    done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises the start-up error
    try:
        yield node
    finally:
        node.request_stop()
        await task
