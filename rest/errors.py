"""One place that turns exceptions into each API's JSON error shape."""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from http import HTTPStatus
from typing import Any

from aiohttp import web
from sqlalchemy.exc import DatabaseError, DataError, IntegrityError, ProgrammingError

from dicom_node.errors import Conflict, InvalidInput, NodeError, NotFound, StoreError
from dicom_node.logs import get_logger

log = get_logger("rest")


class ErrorStyle(StrEnum):
    """The error body a route family's contract asks for."""

    DEFAULT = "default"  # {"error": "...", "message": "..."}
    SEED_001 = "seed001"  # {"Result": "Failure", "Data": null, "Message": "..."}
    MESSAGE = "message"  # {"message": "..."} (seed 002)
    TORCHSERVE = "torchserve"  # {"code": 404, "type": "ModelNotFoundException", "message": ...}


class ApiError(Exception):
    """An HTTP error with a status, a message for a person and optional details."""

    def __init__(self, status: int, message: str, details: Any = None, *,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details
        # The exception name a TorchServe-style answer carries in "type" when the status
        # alone does not say it (ModelVersionNotFoundException is a 404 too).
        self.kind = kind


_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
            415: "unsupported_media_type", 422: "unprocessable_entity", 500: "internal_error",
            503: "unavailable"}


def _reason(status: int) -> str:
    """``not_acceptable`` for 406: the standard phrase, for statuses not listed above."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


# The exception names TorchServe puts in "type" (seed 004's clients may switch on them).
_TORCHSERVE_TYPES = {400: "BadRequestException", 401: "UnauthorizedException",
                     403: "ForbiddenException", 404: "ModelNotFoundException",
                     405: "MethodNotAllowedException", 413: "RequestEntityTooLargeException",
                     415: "UnsupportedMediaTypeException", 422: "BadRequestException",
                     500: "InternalServerException", 503: "ServiceUnavailableException"}


def error_response(style: ErrorStyle, status: int, message: str,
                   details: Any = None, *, kind: str | None = None) -> web.Response:
    body: dict[str, Any]
    if style is ErrorStyle.SEED_001:
        body = {"Result": "Failure", "Data": None, "Message": message}
    elif style is ErrorStyle.MESSAGE:
        body = {"message": message}
    elif style is ErrorStyle.TORCHSERVE:
        body = {"code": status,
                "type": kind or _TORCHSERVE_TYPES.get(status, "ServiceException"),
                "message": message}
    else:
        body = {"error": _REASONS.get(status) or _reason(status), "message": message}
    if details is not None and style is not ErrorStyle.SEED_001:
        body["details"] = details
    return web.json_response(body, status=status)


# An absolute path in a message: a quoted one whole, else from a slash after the start,
# a space, a bracket, a colon or "=" to the next space, quote, comma or bracket.
_PATH = re.compile(r"(?<=')/[^'\n]*(?=')|(?<=\")/[^\"\n]*(?=\")"
                   r"|(?:(?<=^)|(?<=[\s(:=]))/[^\s'\",;)]*")


def without_paths(text: str) -> str:
    """``text`` with each absolute filesystem path cut to its last name (``…/metadata.json``):
    what an open route says of a failure names the file, without mapping the server's
    disks for anyone who asks."""
    return _PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def _store_unavailable(exc: BaseException) -> bool:
    """The database is down, locked or unreadable (not a query's own mistake)."""
    if isinstance(exc, StoreError):
        return True
    return isinstance(exc, DatabaseError) and not isinstance(
        exc, IntegrityError | ProgrammingError | DataError)


def _client_gone(request: web.Request) -> bool:
    """Whether the request's connection is closed or closing (a ConnectionError raised
    then is the client's hang-up, not a peer the handler talked to refusing it)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def map_exception(exc: BaseException, style: ErrorStyle, request: web.Request) -> web.Response:
    """The response for an exception raised while handling ``request``."""
    if isinstance(exc, ApiError):
        return error_response(style, exc.status, exc.message, exc.details, kind=exc.kind)
    if isinstance(exc, NotFound):
        return error_response(style, 404, str(exc))
    if isinstance(exc, Conflict):
        return error_response(style, 409, str(exc))
    if isinstance(exc, InvalidInput):
        return error_response(style, 400, str(exc))
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(style, 413, "request body is larger than the configured limit "
                              "(rest.max_body_mb)")
    if isinstance(exc, web.HTTPException):
        response = error_response(style, exc.status, exc.reason)
        if "Allow" in exc.headers:  # a 405 must say which methods the resource takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    if isinstance(exc, ConnectionError) and _client_gone(request):
        # The client hung up mid-request (an upload cut off, a download abandoned): not
        # the node's fault and no one to answer; not worth a traceback.
        log.info("client went away", method=request.method, path=request.path,
                 error=str(exc) or type(exc).__name__)
        return error_response(style, 400, "the client went away")
    error_id = uuid.uuid4().hex[:12]
    if _store_unavailable(exc):
        # The client's request was not at fault, and it may try again later.
        log.error("request failed: the store is unavailable", error_id=error_id,
                  method=request.method, path=request.path, error=str(exc))
        return error_response(style, 503, f"the node's job store is unavailable (error id "
                                          f"{error_id}; see the node's log)")
    if isinstance(exc, NodeError):
        return error_response(style, 400, str(exc))
    log.exception("request failed", error_id=error_id, method=request.method,
                  path=request.path)
    message = f"internal error (error id {error_id}; see the node's log)"
    if style is ErrorStyle.SEED_001:
        message = "Single Inference failed due to an internal error"
    return error_response(style, 500, message)
