"""``POST /config/destination/{name}/echo``: is a destination reachable now? (admin)

- DIMSE: a C-ECHO (association, Verification, release) to the destination's AE;
- DICOMweb: a QIDO-RS search for one study, with the destination's credentials;
- folder: the folder exists and the node may write to it.

The answer always has the same shape (``success``, ``status``, ``round_trip_ms``,
``message``) and is 200 whatever the outcome: the check ran, the peer's answer is
the result. 404 when no destination has that name.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from dicom_node.config import DestinationSettings, Settings
from dicom_node.logs import get_logger
from rest.app import NODE, Route
from rest.errors import ApiError

log = get_logger("rest.echo")


@dataclass(frozen=True)
class EchoOutcome:
    """What one reachability check found."""

    destination: str
    type: str
    target: str  # AE@host:port, the URL or the folder
    success: bool
    status: int | None  # DIMSE status of the C-ECHO, or the HTTP status of the QIDO
    round_trip_ms: float
    message: str


def _dimse(node: Any, dest: DestinationSettings) -> EchoOutcome:
    from dicom_node.scu import Peer

    peer = Peer.from_settings(dest)
    start = time.perf_counter()
    result = node.dicom_client().echo(peer)
    ms = (time.perf_counter() - start) * 1000
    message = result.message or ("C-ECHO succeeded" if result.ok else "C-ECHO failed")
    return EchoOutcome(dest.name, "dimse", f"{peer.ae_title}@{peer.host}:{peer.port}",
                       result.ok, result.status, round(ms, 2), message)


def _dicomweb(dest: DestinationSettings) -> EchoOutcome:
    from dicom_node.dicomweb import DicomWebError
    from dicom_node.errors import InvalidInput
    from dicom_node.export import dicomweb_client

    url = str(dest.url)
    start = time.perf_counter()
    try:
        with dicomweb_client(dest) as client:
            found = client.search_studies(limit=1)
    except DicomWebError as exc:
        ms = (time.perf_counter() - start) * 1000
        return EchoOutcome(dest.name, "dicomweb", exc.url or url, False, exc.status,
                           round(ms, 2), str(exc))
    except InvalidInput as exc:
        return EchoOutcome(dest.name, "dicomweb", url, False, None, 0.0, str(exc))
    ms = (time.perf_counter() - start) * 1000
    return EchoOutcome(dest.name, "dicomweb", url, True, 200 if found else 204, round(ms, 2),
                       "QIDO-RS search for studies answered")


def _folder(settings: Settings, dest: DestinationSettings) -> EchoOutcome:
    assert dest.path is not None
    folder = settings.path(dest.path)
    start = time.perf_counter()
    if folder.is_dir():
        ok = os.access(folder, os.W_OK | os.X_OK)
        message = "the folder exists and is writable" if ok else \
            "the node may not write to the folder"
    else:  # the first export creates it (and its missing parents)
        ancestor = next(p for p in folder.parents if p.exists())
        ok = ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)
        message = "the folder does not exist yet; the first export creates it" if ok else \
            f"the folder does not exist and cannot be created under {ancestor}"
    ms = (time.perf_counter() - start) * 1000
    return EchoOutcome(dest.name, "folder", str(folder), ok, None, round(ms, 2), message)


async def echo_destination(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name = request.match_info["name"]
    dest = next((d for d in node.settings.destinations if d.name == name), None)
    if dest is None:
        raise ApiError(404, f"no destination named {name!r}")
    if dest.type == "dimse":
        outcome = await asyncio.to_thread(_dimse, node, dest)
    elif dest.type == "dicomweb":
        outcome = await asyncio.to_thread(_dicomweb, dest)
    else:
        outcome = await asyncio.to_thread(_folder, node.settings, dest)
    (log.info if outcome.success else log.warning)(
        "destination echo", destination=name, type=outcome.type, success=outcome.success,
        status=outcome.status, round_trip_ms=outcome.round_trip_ms, message=outcome.message)
    return web.json_response(asdict(outcome))


def routes() -> list[Route]:
    return [Route("POST", "/config/destination/{name}/echo", echo_destination, scope="admin")]
