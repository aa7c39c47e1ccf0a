"""STOW-RS intake: ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``.

One more way in (PS3.18 §10.5): a ``multipart/related; type="application/dicom"``
body, read part by part with aiohttp's :class:`~aiohttp.MultipartReader`. Each part
is spooled beside the studies directory and stored exactly like a C-STORE
instance (:meth:`Node.instance_writer`), then handed to the assembler as if it had
been sent to the called AE title ``rest.stow_ae_title`` (default: the node's own
AE title), whose pipelines, grouping, SOP class and duplicate policies apply. One
request counts as one association: its groups complete when the request ends
(``complete_on_release``) or after the AE title's timeout, and become ``kind:
stow`` jobs, one per pipeline.

The answer is the standard Store Instances Response (DICOM JSON): referenced SOP
instances with their WADO-RS Retrieve URLs, failed ones with a Failure Reason;
200 when all were stored, 202 when some failed, 409 when none was stored, 400 for
a body that holds no readable part or a target study that is not a UID, 415 for
another media type.

A body that ends before its closing boundary (cut short, over ``rest.stow_max_mb``,
the client gone) keeps what was stored before: the answer lists it, with 202 (413
when over the limit) and a ``Warning: 299`` naming why the rest was not read. Such
a request ends like an aborted association: its groups complete on their timeout,
so a retry within it joins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO

from aiohttp import BodyPartReader, ClientError, web
from aiohttp.hdrs import ACCEPT, CONTENT_LENGTH, CONTENT_TYPE
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from pydicom import Dataset, dcmread

from dicom_node.assembler import GroupPolicy
from dicom_node.config import AETitleSettings
from dicom_node.disk import short_of_space
from dicom_node.errors import InvalidInput, StoreError
from dicom_node.logs import get_logger
from dicom_node.scp import AssociationEnd, InstanceWriter, ReceivedInstance, safe_uid
from rest.app import NODE, Route, principal
from rest.errors import ApiError
from rest.media import parse_accept, quality

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
CALLING_AE = "STOW-RS"  # what the store and the job record as the sender
_CHUNK = 1 << 20
# What reading a multipart body raises when it is malformed, cut short or the client
# hangs up (ConnectionResetError, aiohttp's ClientPayloadError are among these).
_READ_ERRORS = (ValueError, AssertionError, RuntimeError, OSError, ClientError,
                HttpProcessingError)

log = get_logger("rest.stow")

# Negative ids: never equal to a DIMSE association's id() (a positive address).
_requests = itertools.count(1)


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values of the Store Instances Response (PS3.18 §10.5)."""

    PROCESSING_FAILURE = 0x0110  # also: the study differs from the target (as Orthanc does)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part of the request."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    failure: FailureReason | None = None
    reason: str = ""
    received: ReceivedInstance | None = None


def public_base(request: web.Request) -> str:
    """The URL callers reach this node at, for the Retrieve URLs it answers with.

    ``rest.public_url`` when set (behind a proxy); otherwise the request's Host, with
    the listening port added when the Host header has none (dicomweb-client, for
    one, sends the host name alone).
    """
    configured = request.app[NODE].settings.rest.public_url
    if configured:
        return configured.rstrip("/")
    host = request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    default = 443 if request.scheme == "https" else 80
    has_port = ":" in host.rsplit("]", 1)[-1]  # "[::1]" has none, "[::1]:80" has one
    if not has_port and sockname and int(sockname[1]) != default:
        host = f"{host}:{int(sockname[1])}"
    return f"{request.scheme}://{host}"


def _accepts_json(header: str | None) -> bool:
    """Whether ``Accept`` allows DICOM JSON (``application/json`` counts as asking for
    it); a range weighted ``q=0`` refuses it."""
    return quality(parse_accept(header), DICOM_JSON, aliases=("application/json",)) > 0


def _check_content_type(request: web.Request) -> None:
    raw = request.headers.get(CONTENT_TYPE, "")
    mime = parse_mimetype(raw)
    inner = (mime.parameters.get("type") or "").strip().lower()
    if (mime.type, mime.subtype) != ("multipart", "related") or inner != DICOM:
        raise ApiError(415, f"STOW-RS takes multipart/related; type=\"{DICOM}\"; "
                       f"got {raw or 'no Content-Type'!r}")
    if not mime.parameters.get("boundary"):
        raise ApiError(400, "the multipart/related Content-Type has no boundary")


def _store_part(writer: InstanceWriter, spooled: Path, ae: AETitleSettings,
                study: str | None, association_id: int) -> PartOutcome:
    """Check one spooled part against the target study and the AE's policy, then store it.

    Runs in a worker thread. The spooled file is consumed or left for the caller to
    delete.
    """
    try:
        head = dcmread(spooled, stop_before_pixels=True,
                       specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                      "SeriesInstanceUID"])
        sop_class = safe_uid(head.get("SOPClassUID"), "SOPClassUID")
        sop = safe_uid(head.get("SOPInstanceUID"), "SOPInstanceUID")
        this_study = safe_uid(head.get("StudyInstanceUID"), "StudyInstanceUID")
        series = safe_uid(head.get("SeriesInstanceUID"), "SeriesInstanceUID")
    except InvalidInput as exc:
        return PartOutcome(None, None, failure=FailureReason.CANNOT_UNDERSTAND, reason=str(exc))
    except Exception as exc:  # pydicom raises many shapes on what is not DICOM
        return PartOutcome(None, None, failure=FailureReason.CANNOT_UNDERSTAND,
                           reason=f"not a DICOM Part 10 instance ({type(exc).__name__})")
    known = PartOutcome(sop_class, sop, this_study, series)
    if study is not None and this_study != study:
        return dataclasses.replace(
            known, failure=FailureReason.PROCESSING_FAILURE,
            reason=f"StudyInstanceUID {this_study} is not the target study {study}")
    if (ae.allowed_sop_classes and sop_class not in ae.allowed_sop_classes) \
            or sop_class in ae.ignored_sop_classes:
        return dataclasses.replace(
            known, failure=FailureReason.SOP_CLASS_NOT_SUPPORTED,
            reason=f"SOP class {sop_class} is not accepted by {ae.ae_title}")
    try:
        got = writer.write(spooled, called_ae=ae.ae_title, calling_ae=CALLING_AE,
                           association_id=association_id, source="stow",
                           duplicates=ae.duplicates)
    except InvalidInput as exc:
        return dataclasses.replace(known, failure=FailureReason.CANNOT_UNDERSTAND,
                                   reason=str(exc))
    except (OSError, StoreError) as exc:
        return dataclasses.replace(known, failure=FailureReason.OUT_OF_RESOURCES,
                                   reason=f"cannot keep the instance: {exc}")
    return dataclasses.replace(known, received=got)


def _response(outcomes: list[PartOutcome], base: str, study: str | None) -> web.Response:
    """The Store Instances Response (DICOM JSON) and its HTTP status."""
    ds = Dataset()
    referenced, failed = [], []
    for o in outcomes:
        item = Dataset()
        if o.sop_class_uid:
            item.ReferencedSOPClassUID = o.sop_class_uid
        if o.sop_instance_uid:
            item.ReferencedSOPInstanceUID = o.sop_instance_uid
        if o.failure is None:
            item.RetrieveURL = (f"{base}/studies/{o.study_instance_uid}/series/"
                                f"{o.series_instance_uid}/instances/{o.sop_instance_uid}")
            referenced.append(item)
        else:
            item.FailureReason = int(o.failure)
            failed.append(item)
    studies = {o.study_instance_uid for o in outcomes if o.failure is None}
    if study is not None and referenced:
        ds.RetrieveURL = f"{base}/studies/{study}"
    elif len(studies) == 1:
        ds.RetrieveURL = f"{base}/studies/{studies.pop()}"
    # Both sequences are conditional (PS3.18 §10.5.3): one with no item is left out,
    # not sent empty.
    if failed:
        ds.FailedSOPSequence = failed
    if referenced:
        ds.ReferencedSOPSequence = referenced
    status = 200 if not failed else 202 if referenced else 409
    # DICOM JSON is UTF-8 by definition; a charset parameter makes some clients
    # (dicomweb-client compares the whole header) ignore the body.
    headers = CIMultiDict({CONTENT_TYPE: DICOM_JSON})
    # A Failure Reason is a code; PS3.18 lets the answer say why in words too, in
    # Warning header fields (code 299), one per refused part: the first ones, and a
    # count of the rest (20,000 refused parts made headers no client would read).
    refused = [(i, o) for i, o in enumerate(outcomes) if o.failure is not None and o.reason]
    for i, o in refused[:MAX_PART_WARNINGS]:
        headers.add("Warning", _warning(o.sop_instance_uid or f"part {i + 1}", o.reason))
    if len(refused) > MAX_PART_WARNINGS:
        headers.add("Warning", _warning(
            f"{len(refused) - MAX_PART_WARNINGS} more parts", "refused too; the Failed SOP "
            "Sequence of the response lists every refused instance"))
    return web.Response(body=json.dumps(ds.to_json_dict()).encode("utf-8"), status=status,
                        headers=headers)


# Refused parts named one by one, in the response's Warning headers and in the log.
MAX_PART_WARNINGS = 20


def _warning(what: str, reason: str) -> str:
    """A ``Warning: 299`` value: printable ASCII (300 characters at most), quoted."""
    text = " ".join(f"{what}: {reason}".split())[:300]
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '299 dicom-node "{}"'.format(text.replace("\\", "\\\\").replace('"', '\\"'))


class _Spool:
    """A part being written to a temporary file beside the studies directory."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".stow-", suffix=".part")
        self.path = Path(name)
        self.file: IO[bytes] = os.fdopen(fd, "wb")

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


async def store_instances(request: web.Request) -> web.Response:
    """``POST /dicomweb/studies[/{study}]``: store the parts, answer per instance."""
    node = request.app[NODE]
    study = request.match_info.get("study")
    if study is not None:
        try:
            study = safe_uid(study, "the target StudyInstanceUID")
        except InvalidInput as exc:
            raise ApiError(400, str(exc)) from None
    if not _accepts_json(request.headers.get(ACCEPT)):
        raise ApiError(406, f"the Store Instances Response is only available as {DICOM_JSON}")
    _check_content_type(request)
    settings = node.settings
    limit = int(settings.rest.stow_max_mb * 1024 * 1024)
    if int(request.headers.get(CONTENT_LENGTH, "0") or 0) > limit:
        raise ApiError(413, "the request is larger than rest.stow_max_mb")
    if node.store is None:
        raise ApiError(503, "the store is not open")
    writer = node.instance_writer()
    staging = writer.studies_dir
    staging.mkdir(parents=True, exist_ok=True)
    if short := await asyncio.to_thread(short_of_space, settings, staging):
        raise ApiError(503, f"free disk space is low ({short}); try again later")
    ae = settings.stow_ae()
    policy = dataclasses.replace(GroupPolicy.for_ae(ae), kind="stow")
    association_id = -next(_requests)
    who = principal(request)
    rlog = log.bind(called_ae=ae.ae_title, caller=who.owner, study_uid=study)
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as exc:
        raise ApiError(400, f"the multipart body cannot be read: {exc}") from None
    outcomes: list[PartOutcome] = []
    refused = 0
    total = 0
    delivered = False
    # Why the body ended before its closing boundary (cut short, over the size limit,
    # the client gone), or None when it was read to its end. What was stored before
    # stays stored, and the answer says so.
    ended_early: str | None = None
    too_large = False
    whole = False
    try:
        while True:
            try:
                part = await reader.next()
            except _READ_ERRORS as exc:
                ended_early = f"the multipart body cannot be read: {exc}"
                break
            if part is None:
                whole = True
                break
            if not isinstance(part, BodyPartReader):  # a nested multipart: not DICOM
                try:
                    await part.release()
                except _READ_ERRORS as exc:
                    ended_early = f"the multipart body cannot be read: {exc}"
                    break
                outcomes.append(PartOutcome(None, None, failure=FailureReason.CANNOT_UNDERSTAND,
                                            reason="a nested multipart is not a DICOM part"))
                continue
            media = parse_mimetype(part.headers.get(CONTENT_TYPE, DICOM))
            # parse_mimetype splits a structured syntax suffix off the subtype:
            # application/dicom+json is ("application", "dicom", suffix "json").
            if (media.type, media.subtype, media.suffix) != ("application", "dicom", ""):
                try:
                    await part.release()
                except _READ_ERRORS as exc:
                    ended_early = f"the multipart body cannot be read: {exc}"
                    break
                named = f"{media.type}/{media.subtype}" + (f"+{media.suffix}"
                                                            if media.suffix else "")
                outcomes.append(PartOutcome(
                    None, None, failure=FailureReason.CANNOT_UNDERSTAND,
                    reason=f"part of type {named}, not {DICOM}"))
                continue
            spool = await asyncio.to_thread(_Spool, staging)
            try:
                while True:
                    try:
                        chunk = await part.read_chunk(_CHUNK)
                    except _READ_ERRORS as exc:
                        ended_early = f"the multipart body cannot be read: {exc}"
                        break
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        too_large = True
                        ended_early = ("the request is larger than rest.stow_max_mb "
                                       f"({len(outcomes)} parts read before the limit)")
                        break
                    # Outside the try: a write failing is the node's, not the body's.
                    spool.file.write(chunk)  # to the page cache; fsync happens when placed
                if ended_early is not None:
                    break  # the part being read is incomplete: not stored
                spool.file.close()
                if short := await asyncio.to_thread(short_of_space, settings, staging):
                    # checked again for each part: one large request began above the
                    # reserve and wrote the disk full, the store's too
                    outcome = PartOutcome(None, None, failure=FailureReason.OUT_OF_RESOURCES,
                                          reason=f"free disk space is low ({short}); "
                                                 "not kept, send it again later")
                else:
                    outcome = await asyncio.to_thread(_store_part, writer, spool.path, ae,
                                                      study, association_id)
            finally:
                spool.discard()  # a stored part was renamed away; anything else goes
            outcomes.append(outcome)
            if outcome.received is not None:
                rlog.info("STOW-RS instance stored", sop_instance_uid=outcome.sop_instance_uid,
                          study_uid=outcome.study_instance_uid)
                if node.assembler is not None:
                    node.assembler.instance_received(outcome.received, policy)
                    delivered = True
            else:
                refused += 1
                if refused <= MAX_PART_WARNINGS:  # the rest are counted at the end
                    rlog.warning("STOW-RS instance refused",
                                 sop_instance_uid=outcome.sop_instance_uid,
                                 failure_reason=f"0x{int(outcome.failure or 0):04X}",
                                 reason=outcome.reason)
    finally:
        if refused > MAX_PART_WARNINGS:
            rlog.warning("STOW-RS instances refused beyond those logged one by one",
                         more=refused - MAX_PART_WARNINGS, refused=refused)
        if delivered and node.assembler is not None:
            # The request is over. Read to its end, it completes its groups like an
            # A-RELEASE; cut short (or cancelled), it ends like an A-ABORT: the groups
            # complete on their timeout, and a retry within it joins them.
            node.assembler.association_ended(
                AssociationEnd(association_id, ae.ae_title, CALLING_AE, released=whole))
    stored = sum(1 for o in outcomes if o.failure is None)
    if ended_early is not None:
        gone = request.transport is None or request.transport.is_closing()
        (rlog.info if gone else rlog.warning)(
            "STOW-RS request ended early" + (": the client went away" if gone else ""),
            reason=ended_early, parts=len(outcomes), stored=stored)
        if not outcomes:  # nothing was kept: a plain error, as before
            raise ApiError(413 if too_large else 400, ended_early)
    if not outcomes:
        raise ApiError(400, "the request holds no part")
    rlog.info("STOW-RS request", parts=len(outcomes), stored=stored,
              failed=len(outcomes) - stored, whole=whole)
    base = f"{public_base(request)}/dicomweb"
    response = _response(outcomes, base, study)
    if ended_early is not None:
        # PS3.18 §10.5.3: the instances stored are listed; the status and a Warning say
        # the rest of the body was not read.
        response.set_status(413 if too_large else 202 if stored else response.status)
        response.headers.add("Warning", _warning("the rest of the request was not read",
                                                 ended_early))
    elif stored == 0 and all(o.sop_instance_uid is None
                             and o.failure is not FailureReason.OUT_OF_RESOURCES
                             for o in outcomes):
        # Nothing in the body could even be read as DICOM: the request itself is bad (not
        # parts refused for want of space, unread: a client must not take 400 as "do not
        # send again")
        response.set_status(400)
    return response


def routes() -> list[Route]:
    return [
        Route("POST", "/dicomweb/studies", store_instances, scope="infer"),
        Route("POST", "/dicomweb/studies/{study}", store_instances, scope="infer"),
    ]
