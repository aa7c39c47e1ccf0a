"""WADO-RS retrieval of the instances the node holds (PS3.18 §10.4).

``GET /dicomweb/studies/{study}``, ``…/series/{series}`` and
``…/series/{series}/instances/{instance}`` answer ``multipart/related;
type="application/dicom"`` with the stored files as they were received (no
transcoding: the transfer syntax is each instance's own). These are the Retrieve
URLs of the STOW-RS response. Only instances recorded in the store are served,
from their recorded paths inside the studies directory.

An instance recorded but whose file is missing is the node's fault, logged with
the count and UIDs: a study or series is served without it, with a ``Warning: 299``
saying how many are missing; one instance asked for by its UID answers 404 saying
its file is missing on the server. 404 rather than 410 Gone: 410 tells clients and
caches the removal is deliberate and permanent, which the node does not know (the
file may be restored); 404 is what PS3.18 lists for a resource not found.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import IO

from aiohttp import web
from aiohttp.hdrs import ACCEPT, CONTENT_TYPE

from dicom_node.errors import InvalidInput
from dicom_node.logs import get_logger
from dicom_node.scp import safe_uid
from dicom_node.store import InstanceRecord
from rest.app import NODE, Route
from rest.errors import ApiError
from rest.media import parse_accept, quality

DICOM = "application/dicom"
_CHUNK = 1 << 20

log = get_logger("rest.wado")


def _accepts_dicom(header: str | None) -> bool:
    """Whether ``Accept`` allows multipart/related with application/dicom parts; a
    range weighted ``q=0`` refuses what it matches."""
    ranges = [r for r in parse_accept(header)
              if r.matches("multipart/related") < 3
              or r.params.get("type", DICOM).lower() in (DICOM, "application/*")]
    return quality(ranges, "multipart/related") > 0


def _uid(request: web.Request, key: str, name: str) -> str | None:
    value = request.match_info.get(key)
    if value is None:
        return None
    try:
        return safe_uid(value, name)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None


def _served(records: list[InstanceRecord], root: Path) -> tuple[list[Path], list[Path]]:
    """The recorded files that exist inside the studies directory, and those that are
    recorded but missing (or, recorded outside it, not to be served)."""
    paths: list[Path] = []
    missing: list[Path] = []
    for rec in records:
        p = Path(rec.path).resolve()
        (paths if p.is_relative_to(root) and p.is_file() else missing).append(p)
    return paths, missing


def _open(path: Path) -> IO[bytes] | None:
    """``path`` opened for reading, or None when it is gone."""
    try:
        return path.open("rb")
    except OSError:
        return None


async def _send_file(response: web.StreamResponse, fh: IO[bytes]) -> None:
    while chunk := await asyncio.to_thread(fh.read, _CHUNK):
        await response.write(chunk)


async def retrieve(request: web.Request) -> web.StreamResponse:
    """A study, a series or one instance as multipart/related application/dicom.

    The status and headers are decided from the records before the first byte; the
    files are then opened one at a time while the body is written, so a study of any
    size holds one file open, and a slow client holds no more.
    """
    node = request.app[NODE]
    if node.store is None:
        raise ApiError(503, "the store is not open")
    study = _uid(request, "study", "StudyInstanceUID")
    series = _uid(request, "series", "SeriesInstanceUID")
    sop = _uid(request, "instance", "SOPInstanceUID")
    assert study is not None
    if not _accepts_dicom(request.headers.get(ACCEPT)):
        raise ApiError(406, f'only multipart/related; type="{DICOM}" is served')
    records = await asyncio.to_thread(node.store.instances_of, study, series)
    if sop is not None:
        records = [r for r in records if r.sop_instance_uid == sop]
    root = node.settings.studies_dir.resolve()
    paths, missing = await asyncio.to_thread(_served, records, root)
    what = "instance" if sop else "series" if series else "study"
    if not records:
        raise ApiError(404, f"no such {what} is held by this node")
    headers: dict[str, str] = {}
    if missing:
        # The store says the node holds them; the disk does not: the node's fault,
        # logged for its operator, and said to the client rather than sent silently short.
        log.warning("WADO-RS: instances are recorded but their files are missing",
                    missing=len(missing), served=len(paths), study_uid=study,
                    series_uid=series, sop_instance_uid=sop,
                    files=[str(p) for p in missing[:20]])
        if sop is not None:
            raise ApiError(404, f"instance {sop} is recorded by this node but its file is "
                           "missing on the server")
        text = (f"{len(missing)} instance{'s' if len(missing) > 1 else ''} of the {what} "
                f"{'are' if len(missing) > 1 else 'is'} recorded but "
                f"{'their files are' if len(missing) > 1 else 'its file is'} missing")
        if not paths:
            raise ApiError(404, f"{text} on the server")
        headers["Warning"] = f'299 dicom-node "{text}"'
    boundary = uuid.uuid4().hex
    headers[CONTENT_TYPE] = f'multipart/related; type="{DICOM}"; boundary="{boundary}"'
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    for path in paths:
        fh = await asyncio.to_thread(_open, path)
        if fh is None:  # gone since it was listed: left out, not sent empty
            log.warning("WADO-RS: a file vanished before it was sent", path=str(path),
                        study_uid=study, series_uid=series)
            continue
        try:
            await response.write(f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode())
            try:
                await _send_file(response, fh)
            except OSError as exc:
                if isinstance(exc, ConnectionError):
                    raise
                # Read failed mid-file: the part ends here (the client's parser sees an
                # instance cut short); the others still go.
                log.warning("WADO-RS: a file could not be read to its end", path=str(path),
                            error=str(exc), study_uid=study, series_uid=series)
            await response.write(b"\r\n")
        finally:
            await asyncio.to_thread(fh.close)
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response


def routes() -> list[Route]:
    base = "/dicomweb/studies/{study}"
    return [
        Route("GET", base, retrieve, scope="read"),
        Route("GET", base + "/series/{series}", retrieve, scope="read"),
        Route("GET", base + "/series/{series}/instances/{instance}", retrieve, scope="read"),
    ]
