"""WADO-RS retrieval of the instances the node holds (PS3.18 §10.4).

``GET /dicomweb/studies/{study}``, ``…/series/{series}`` and
``…/series/{series}/instances/{instance}`` answer ``multipart/related;
type="application/dicom"``, one part per instance, each labelled
``application/dicom; transfer-syntax=<uid>``. These are the Retrieve URLs of the
STOW-RS response.

The ``transfer-syntax`` parameter of ``Accept`` chooses the encoding (PS3.18
§8.7.3.5): ``*`` or the instance's own syntax sends the file as stored; absent
(also for ``*/*``) or Explicit VR Little Endian sends it in Explicit VR Little
Endian, rewritten (and decompressed) with pydicom when stored otherwise, one
instance in memory at a time. Any other syntax answers 406 naming what can be
given. Ranges are tried in ``q`` order, per instance. Only instances recorded in
the store are served, from their recorded paths inside the studies directory.

An instance recorded but whose file is missing is the node's fault, logged with
the count and UIDs: a study or series is served without it, with a ``Warning: 299``
saying how many are missing; one instance asked for by its UID answers 404 saying
its file is missing on the server. 404 rather than 410 Gone: 410 tells clients and
caches the removal is deliberate and permanent, which the node does not know (the
file may be restored); 404 is what PS3.18 lists for a resource not found.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import IO

from aiohttp import web
from aiohttp.hdrs import ACCEPT, CONTENT_TYPE
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRBigEndian

from dicom_node.errors import InvalidInput
from dicom_node.logs import get_logger
from dicom_node.scp import safe_uid
from dicom_node.store import InstanceRecord
from rest.app import NODE, Route
from rest.errors import ApiError
from rest.media import MediaRange, parse_accept, quality

DICOM = "application/dicom"
EXPLICIT_LE = "1.2.840.10008.1.2.1"  # PS3.18's default transfer syntax
AS_STORED = "*"
_CHUNK = 1 << 20

log = get_logger("rest.wado")


def _wanted_syntaxes(header: str | None) -> list[str] | None:
    """The transfer syntaxes ``Accept`` asks for, most wanted first (``*``: as stored);
    None when it refuses multipart/related with application/dicom parts altogether.

    A range without a ``transfer-syntax`` parameter (``*/*``, ``multipart/*``, or
    multipart/related without it) asks for Explicit VR Little Endian, the default of
    PS3.18 §8.7.3.5. A range weighted ``q=0`` refuses what it matches.
    """
    ranges = [r for r in parse_accept(header)
              if r.matches("multipart/related") < 3
              or r.params.get("type", DICOM).lower() in (DICOM, "application/*")]
    if quality(ranges, "multipart/related") <= 0:
        return None

    def syntax(r: MediaRange) -> str:
        exact = r.matches("multipart/related") == 3
        return r.params.get("transfer-syntax", EXPLICIT_LE) if exact else EXPLICIT_LE

    matching = [r for r in ranges if r.matches("multipart/related")]
    refused = {r.params["transfer-syntax"] for r in matching
               if r.q == 0 and "transfer-syntax" in r.params}
    wanted: list[str] = []
    for r in sorted((r for r in matching if r.q > 0), key=lambda r: -r.q):  # stable
        ts = syntax(r)
        if ts not in refused and ts not in wanted:
            wanted.append(ts)
    return wanted


def _syntax_for(stored: str, wanted: list[str]) -> str | None:
    """The transfer syntax to send an instance stored in ``stored`` in, or None."""
    for ts in wanted:
        if ts in (AS_STORED, stored):
            return stored
        if ts == EXPLICIT_LE and stored != ExplicitVRBigEndian:
            # any other syntax is rewritten (and decompressed) by pydicom; big endian
            # would need its pixel bytes swapped, which is not done here
            return EXPLICIT_LE
    return None


def _uid(request: web.Request, key: str, name: str) -> str | None:
    value = request.match_info.get(key)
    if value is None:
        return None
    try:
        return safe_uid(value, name)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None


def _served(records: list[InstanceRecord],
            root: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """The recorded files that exist inside the studies directory, each with its
    transfer syntax (read from its file meta when the record has none), and those
    that are recorded but missing (or, recorded outside it, not to be served)."""
    served: list[tuple[Path, str]] = []
    missing: list[Path] = []
    for rec in records:
        p = Path(rec.path).resolve()
        if not (p.is_relative_to(root) and p.is_file()):
            missing.append(p)
            continue
        ts = rec.transfer_syntax_uid
        if not ts:
            try:
                ts = str(read_file_meta_info(p).get("TransferSyntaxUID", "")) or EXPLICIT_LE
            except (OSError, InvalidDicomError):
                missing.append(p)
                continue
        served.append((p, ts))
    return served, missing


def _transcoded(path: Path) -> bytes:
    """The instance at ``path`` as a Part 10 file in Explicit VR Little Endian, its
    pixel data decompressed when it was stored compressed."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()  # decodes the pixel data; the file meta then says Explicit LE
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def _part_head(boundary: str, transfer_syntax: str) -> bytes:
    return (f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={transfer_syntax}"
            "\r\n\r\n").encode()


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
    wanted = _wanted_syntaxes(request.headers.get(ACCEPT))
    if wanted is None:
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
    plan = [(path, stored, _syntax_for(stored, wanted)) for path, stored in paths]
    if any(ts is None for _, _, ts in plan):
        cannot = sorted({stored for _, stored, ts in plan if ts is None})
        raise ApiError(406, f"transfer syntax {', '.join(wanted) or 'none'} cannot be given "
                       f"for instances stored in {', '.join(cannot)}; this node gives "
                       f"transfer-syntax=* (as stored: "
                       f"{', '.join(sorted({s for _, s, _ in plan}))}) or {EXPLICIT_LE}")
    boundary = uuid.uuid4().hex
    headers[CONTENT_TYPE] = f'multipart/related; type="{DICOM}"; boundary="{boundary}"'
    response = web.StreamResponse(headers=headers)
    try:
        await response.prepare(request)
        for path, stored, ts in plan:
            assert ts is not None
            if ts != stored:
                try:
                    data = await asyncio.to_thread(_transcoded, path)
                except Exception as exc:  # gone, unreadable, or no decoder for its pixels
                    log.warning("WADO-RS: an instance could not be transcoded; left out",
                                path=str(path), stored=stored, transfer_syntax=ts,
                                error=f"{type(exc).__name__}: {exc}", study_uid=study,
                                series_uid=series)
                    continue
                await response.write(_part_head(boundary, ts) + data + b"\r\n")
                continue
            fh = await asyncio.to_thread(_open, path)
            if fh is None:  # gone since it was listed: left out, not sent empty
                log.warning("WADO-RS: a file vanished before it was sent", path=str(path),
                            study_uid=study, series_uid=series)
                continue
            try:
                await response.write(_part_head(boundary, ts))
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
    except ConnectionError as exc:
        # The client hung up (or its connection broke) mid-download: nothing the node
        # did wrong, and nothing left to answer.
        log.info("WADO-RS: client went away", study_uid=study, series_uid=series,
                 sop_instance_uid=sop, error=str(exc) or type(exc).__name__)
    return response


def routes() -> list[Route]:
    base = "/dicomweb/studies/{study}"
    return [
        Route("GET", base, retrieve, scope="read"),
        Route("GET", base + "/series/{series}", retrieve, scope="read"),
        Route("GET", base + "/series/{series}/instances/{instance}", retrieve, scope="read"),
    ]
