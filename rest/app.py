"""The node's aiohttp application: ``create_app(node) -> web.Application``.

Routes are a table; shared state sits behind typed ``web.AppKey``s. The API
families of later issues add their routes here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web

import dicom_node

if TYPE_CHECKING:
    from dicom_node.node import Node

NODE: web.AppKey[Node] = web.AppKey("node")


async def health(request: web.Request) -> web.Response:
    """Open route: is the server up, and the state of its parts."""
    node = request.app[NODE]
    store_ok = await asyncio.to_thread(node.store.ping) if node.store else False
    body: dict[str, Any] = {
        "status": "ok" if store_ok else "degraded",
        "version": dicom_node.__version__,
        "node": node.settings.node_name,
        "store": {"ok": store_ok, "backend": node.store.dialect if node.store else None},
        "parts": dict(node.parts),
    }
    return web.json_response(body, status=200 if store_ok else 503)


def create_app(node: Node) -> web.Application:
    """Build the application for ``node``; the caller runs it."""
    app = web.Application(client_max_size=int(node.settings.rest.max_body_mb * 1024 * 1024))
    app[NODE] = node
    app.add_routes([web.get("/health", health)])
    return app
