"""``POST /config/destination/{name}/echo``: is a destination reachable now? (admin)

The checks are :mod:`dicom_node.reachability`'s: a C-ECHO, a QIDO-RS search or a
writable folder. The answer always has the same shape (``success``, ``status``, ``round_trip_ms``,
``message``) and is 200 whatever the outcome: the check ran, the peer's answer is
the result. 404 when no destination has that name.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from aiohttp import web

from dicom_node.logs import get_logger
from dicom_node.reachability import check_destination
from rest.app import NODE, Route
from rest.errors import ApiError

log = get_logger("rest.echo")


async def echo_destination(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = request.match_info["name"]
    dest = next((d for d in node.settings.destinations if d.name == name), None)
    if dest is None:
        raise ApiError(404, f"no destination named {name!r}")
    outcome = await asyncio.to_thread(check_destination, node.settings, node.dicom_client(),
                                      dest)
    (log.info if outcome.success else log.warning)(
        "destination echo", destination=name, type=outcome.type, success=outcome.success,
        status=outcome.status, round_trip_ms=outcome.round_trip_ms, message=outcome.message)
    return web.json_response(asdict(outcome))


def routes() -> list[Route]:
    return [Route("POST", "/config/destination/{name}/echo", echo_destination, scope="admin")]
