"""Bounds on what HTTP clients can hold open: a connection cap and a request-head timeout.

aiohttp reads a request's head for as long as the client keeps sending it, and
takes every connection offered. A client that opens a thousand connections and
sends one header line every few seconds ("slowloris") then holds a thousand file
descriptors, with no token needed: the node's one process runs out of them, and
the DICOM listener, the store and the drop folders with it. The guard closes a
connection that has waited longer than ``head_timeout_s`` for a complete request
head (idle keep-alive connections included: a client reconnects), and one beyond
``max_connections`` as soon as it is accepted. A request being handled, however
slow its body or its answer, is never cut off here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from dicom_node.logs import get_logger

__all__ = ["ConnectionGuard"]

# How often the guard looks for connections waiting too long for a request head.
SWEEP_S = 1.0
# At most one warning per this many seconds about refused or closed connections.
WARN_EVERY_S = 60.0


class ConnectionGuard:
    """Caps the HTTP server's connections and times out request heads (see module)."""

    def __init__(self, max_connections: int, head_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.head_timeout_s = head_timeout_s
        self.refused = 0  # connections closed at once: over max_connections
        self.timed_out = 0  # connections closed waiting for a request head
        self._waiting_since: dict[RequestHandler, float] = {}
        self._open: set[RequestHandler] = set()
        self._reported = (0, 0)
        self._warned_at = 0.0
        self.log = get_logger("rest.connections")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def install(self, server: web.Server) -> None:
        """Follow ``server``'s connections (before it accepts any)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if len(self._open) >= self.max_connections:
                self.refused += 1
                transport.abort()  # no answer: the client is told by the closed socket
                self._warn()
                return
            self._open.add(handler)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self._open.discard(handler)
            self._waiting_since.pop(handler, None)
            lost(handler, exc)

        # The server's hooks, which each connection calls, wrapped on this instance.
        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def sweep(self, now: float | None = None) -> None:
        """Close connections that have waited ``head_timeout_s`` for a request head."""
        now = time.monotonic() if now is None else now
        for handler in list(self._open):
            # aiohttp sets _waiter exactly while the connection waits for the next
            # request (its head not yet complete, or nothing sent yet).
            if getattr(handler, "_waiter", None) is None:
                self._waiting_since.pop(handler, None)
                continue
            since = self._waiting_since.setdefault(handler, now)
            if now - since > self.head_timeout_s:
                self._waiting_since.pop(handler, None)
                self._open.discard(handler)
                self.timed_out += 1
                handler.force_close()
        self._warn()

    def _warn(self) -> None:
        """One warning a minute at most, with the counts since the last (a flood of
        connections must not become a flood of log lines)."""
        now = time.monotonic()
        if (self.refused, self.timed_out) == self._reported or now - self._warned_at < WARN_EVERY_S:
            return
        refused = self.refused - self._reported[0]
        timed_out = self.timed_out - self._reported[1]
        self._reported, self._warned_at = (self.refused, self.timed_out), now
        self.log.warning("HTTP connections closed: too many open, or no complete request "
                         "in time", refused_over_limit=refused, head_timed_out=timed_out,
                         max_connections=self.max_connections,
                         head_timeout_s=self.head_timeout_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Sweep while the server runs."""
        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(SWEEP_S)
                self.sweep()

        task = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> dict[str, Any]:
        return {"open": self.open_connections, "refused": self.refused,
                "timed_out": self.timed_out}
