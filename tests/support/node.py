"""Run a whole :class:`~dicom_node.node.Node` in a background thread for tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dicom_node.config import (
    AETitleSettings,
    DimseSettings,
    ExecutorSettings,
    RestSettings,
    Settings,
    StorageSettings,
)
from dicom_node.node import Node
from pipeline.settings import ModelSpec, PipelineSpec
from tests.support.peers import free_port

NODE_AE = "DICOMNODE"


def node_settings(data_dir: Path, ae_titles: list[AETitleSettings] | None = None,
                  **extra: Any) -> Settings:
    """Settings for a test node: temp data dir, free loopback port, no HTTP, test handler."""
    ae_titles = ae_titles or [
        AETitleSettings(ae_title=NODE_AE),
        AETitleSettings(ae_title="AI_STUDY", pipelines=["demo"], timeout_s=5),
        AETitleSettings(ae_title="AI_SERIES", pipelines=["demo"], grouping="series",
                        timeout_s=0.5, complete_on_release=False),
    ]
    dimse = extra.pop("dimse", {})
    return Settings(
        storage=StorageSettings(data_dir=data_dir, min_free_mb=extra.pop("min_free_mb", 0)),
        dimse=DimseSettings(ae_title=NODE_AE, host="127.0.0.1", port=free_port(), **dimse),
        ae_titles=ae_titles,
        models=[ModelSpec(name="demo-model", path=Path("unused"))],
        pipelines=[PipelineSpec(name="demo", model="demo-model", task="classify")],
        rest=RestSettings(enabled=False),
        watch=[],
        executor=ExecutorSettings(runner="tests.support.handlers:create_handler",
                                  poll_interval_s=0.2),
        **extra,
    )


class RunningNode:
    """A node running in its own thread and event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node: Node | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="test-node", daemon=True)

    @property
    def port(self) -> int:
        assert self.node is not None and self.node.scp is not None
        return self.node.scp.port

    @property
    def store(self) -> Any:
        assert self.node is not None
        return self.node.store

    def _main(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.node = Node(self.settings)
            waiter = asyncio.ensure_future(self.node.started.wait())
            runner = asyncio.ensure_future(self.node.run())
            await asyncio.wait([waiter, runner], return_when=asyncio.FIRST_COMPLETED)
            self._ready.set()
            await runner

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> RunningNode:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self.node is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.node.request_stop)
        self._thread.join(60)
        if self._error is not None:
            raise self._error

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the node's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


@contextlib.contextmanager
def running_node(settings: Settings) -> Iterator[RunningNode]:
    rn = RunningNode(settings).start()
    try:
        yield rn
    finally:
        rn.stop()
