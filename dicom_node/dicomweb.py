"""DICOMweb client: QIDO-RS search, WADO-RS retrieve to disk, STOW-RS store.

A thin, typed wrapper around :class:`dicomweb_client.DICOMwebClient` (the HTTP
and multipart work is the library's; see DESIGN §8). What this module adds:

* construction from a base URL, an auth choice (none, HTTP Basic, Bearer token)
  and timeouts, refusing anything but ``http``/``https`` URLs;
* typed search results instead of DICOM JSON;
* retrieval that *streams*: instances are written one at a time to a target
  folder (temporary name, fsync, rename to ``<SOPInstanceUID>.dcm``), so a
  300-instance study is never held in memory at once; each instance gets an
  ok/failed outcome;
* STOW-RS of files in batches, with referenced and failed SOP instances;
* one exception, :class:`DicomWebError` (a :class:`~dicom_node.errors.NodeError`),
  for every network or HTTP failure, naming the URL and the HTTP status;
* :func:`url_allowed`, to refuse URLs outside configured base URLs (SSRF).

Retrieved instances are stored as the server sent them, like received C-STOREs. We
ask for the transfer syntax each instance is stored in (``transfer-syntax=*``) so
nothing is transcoded, take the multipart answer's parts as bytes from
dicomweb-client's own decoder (its public retrieve methods would parse every part
into a pydicom ``Dataset`` that we would only encode again: 1 ms an instance), read
only the SOP Instance UID of each (it names the file) and write the part's bytes. A
part that is not a Part 10 file (no preamble or File Meta Information, which the
standard requires) is parsed and written as one with
``dcmwrite(..., enforce_file_format=True)``: values unchanged, the byte layout may
differ.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit

import requests
import retrying
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread, dcmwrite
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.config import is_uid
from dicom_node.errors import InvalidInput, NodeError, NotFound
from dicom_node.logs import get_logger
from dicom_node.scp import fsync_dir

log = get_logger(__name__)

__all__ = [
    "BasicAuth",
    "BearerAuth",
    "DicomWebAuth",
    "DicomWebClient",
    "DicomWebError",
    "DicomWebNotFound",
    "FailedSop",
    "InstanceOutcome",
    "InstanceRef",
    "InstanceResult",
    "RetrieveResult",
    "SeriesResult",
    "StoreResult",
    "StudyResult",
    "url_allowed",
    "validate_base_url",
]

_SCHEMES = ("http", "https")
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)
# Any transfer syntax the server has: no transcoding on the way out.
_ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'

T = TypeVar("T")


# ---------------------------------------------------------------------------- errors
class DicomWebError(NodeError):
    """A DICOMweb request failed: connection, timeout, HTTP status or bad answer.

    ``url`` is the URL asked (without credentials), ``status`` the HTTP status
    when the server answered with one.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class DicomWebNotFound(DicomWebError, NotFound):
    """The server answered 404: no such study, series or instance."""


# ------------------------------------------------------------------------------ auth
@dataclass(frozen=True)
class BasicAuth:
    """HTTP Basic authentication."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class BearerAuth:
    """An ``Authorization: Bearer <token>`` header (OAuth2 / JWT)."""

    token: str = field(repr=False)


DicomWebAuth = BasicAuth | BearerAuth | None


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class StudyResult:
    """One study found by QIDO-RS."""

    study_uid: str
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    modalities: tuple[str, ...] = ()
    number_of_series: int | None = None
    number_of_instances: int | None = None


@dataclass(frozen=True)
class SeriesResult:
    """One series found by QIDO-RS."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    series_number: int | None = None
    number_of_instances: int | None = None


@dataclass(frozen=True)
class InstanceResult:
    """One instance found by QIDO-RS."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str | None = None
    instance_number: int | None = None


@dataclass(frozen=True)
class InstanceRef:
    """The three UIDs that name an instance for WADO-RS."""

    study_uid: str
    series_uid: str
    sop_uid: str


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one instance of a retrieve.

    ``ok`` with ``path`` set, or not ``ok`` with ``reason``. ``sop_uid`` is None
    when the failure is not about a known instance (a transfer cut short).
    """

    sop_uid: str | None
    ok: bool
    path: Path | None = None
    reason: str | None = None


@dataclass
class RetrieveResult:
    """Per-instance outcomes of a WADO-RS retrieve."""

    folder: Path
    outcomes: list[InstanceOutcome] = field(default_factory=list)

    @property
    def succeeded(self) -> list[InstanceOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[InstanceOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def paths(self) -> list[Path]:
        """Files written, in the order received."""
        return [o.path for o in self.outcomes if o.ok and o.path is not None]

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed


@dataclass(frozen=True)
class FailedSop:
    """An instance a STOW-RS did not store, and why."""

    sop_uid: str | None
    reason: str
    path: Path | None = None


@dataclass
class StoreResult:
    """Outcome of a STOW-RS of several files (possibly several requests)."""

    referenced: list[str] = field(default_factory=list)
    failed: list[FailedSop] = field(default_factory=list)
    requests: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


# ----------------------------------------------------------------------------- URLs
def validate_base_url(url: str) -> str:
    """Check a DICOMweb base URL; return it without a trailing slash.

    Raises :class:`InvalidInput` unless the scheme is ``http`` or ``https`` and a
    host is given; credentials inside the URL (``http://user:pw@host``) are
    refused too: pass them as ``auth`` so they never reach a log line.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("a DICOMweb URL is required")
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"malformed DICOMweb URL {url!r}: {exc}") from None
    if parts.scheme.lower() not in _SCHEMES:
        raise InvalidInput(
            f"DICOMweb URL {redact_url(url)!r} must use http or https, not {parts.scheme!r}"
        )
    if "@" in parts.netloc:
        raise InvalidInput("DICOMweb URL must not carry credentials; configure auth instead")
    if not parts.hostname:
        raise InvalidInput(f"DICOMweb URL {url!r} has no host")
    if port == 0:
        raise InvalidInput(f"DICOMweb URL {url!r} has an invalid port")
    if parts.query or parts.fragment:
        raise InvalidInput(f"DICOMweb URL {url!r} must not have a query or fragment")
    return url.rstrip("/")


def _normalise(url: str) -> tuple[str, str, int, tuple[str, ...]] | None:
    """(scheme, host, port, path segments) of an acceptable URL, or None."""
    if not isinstance(url, str) or not url or url != url.strip():
        return None
    if any(c in url for c in "\\\t\r\n ") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        return None
    if "@" in parts.netloc or "%" in parts.netloc:
        return None  # userinfo (http://good@evil) or encoded host tricks
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        return None
    if port is None:
        port = 443 if scheme == "https" else 80
    if not 0 < port < 65536:
        return None
    segments: list[str] = []
    for raw in parts.path.split("/"):
        seg = unquote(raw)
        if seg in (".", "..") or "/" in seg or "\\" in seg or "\x00" in seg:
            return None  # dot segments, encoded slashes
        if seg:
            segments.append(seg)
    return scheme, host, port, tuple(segments)


def url_allowed(url: str, allowed_bases: Sequence[str], allow_any: bool = False) -> bool:
    """Whether ``url`` may be contacted: it is under one of ``allowed_bases``.

    Both sides are normalised (scheme and host lower-cased, default ports made
    explicit, empty path segments dropped, percent-escapes decoded) and then
    compared on scheme, host, port and path *segments* (so ``/dicom-web`` does
    not admit ``/dicom-web-evil``). Always refused, even with ``allow_any``:
    schemes other than http/https, userinfo (``http://good@evil``), ``.`` or
    ``..`` path segments (also percent-encoded), encoded slashes, whitespace and
    control characters. ``allow_any=True`` skips only the base comparison.
    Never raises.
    """
    target = _normalise(url)
    if target is None:
        return False
    if allow_any:
        return True
    for base in allowed_bases:
        b = _normalise(base)
        if b is None:
            continue
        if b[:3] == target[:3] and target[3][: len(b[3])] == b[3]:
            return True
    return False


def redact_url(url: str) -> str:
    """The URL without any userinfo, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


# --------------------------------------------------------------------------- helpers
def _values(item: Any, tag: str) -> list[Any]:
    """The ``Value`` list of ``tag`` in a DICOM JSON object; [] for anything malformed."""
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    return values if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    values = _values(item, tag)
    return values[0] if values else None


def _str(item: dict[str, Any], tag: str) -> str | None:
    value = _first(item, tag)
    if value is None:
        return None
    if isinstance(value, dict):  # PN
        return str(value.get("Alphabetic", ""))
    return str(value)


def _int(item: dict[str, Any], tag: str) -> int | None:
    value = _first(item, tag)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _strs(item: dict[str, Any], tag: str) -> tuple[str, ...]:
    return tuple(str(v) for v in _values(item, tag) if v is not None)


_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_SOP_CLASS, _MODALITY, _PATIENT_ID, _ACCESSION = "00080016", "00080060", "00100020", "00080050"
_STUDY_DATE, _MODALITIES_IN_STUDY = "00080020", "00080061"
_N_STUDY_SERIES, _N_STUDY_INSTANCES, _N_SERIES_INSTANCES = "00201206", "00201208", "00201209"
_SERIES_NUMBER, _INSTANCE_NUMBER = "00200011", "00200013"


def _check_uid(uid: str, what: str) -> str:
    if not isinstance(uid, str) or not is_uid(uid):
        raise InvalidInput(f"{what} {uid!r} is not a valid DICOM UID")
    return uid


def _sop_uid(ds: Dataset) -> str:
    # The UID names the file: never let a server choose a path.
    return _check_uid(str(ds.get("SOPInstanceUID", ""))[:80], "SOPInstanceUID")


def _part_header(part: bytes) -> Dataset:
    """The File Meta Information and SOP Instance UID of one part of a WADO-RS answer."""
    return dcmread(BytesIO(part), force=True, stop_before_pixels=True,
                   specific_tags=[_SOP_INSTANCE_UID])


def _write_part(part: bytes, header: Dataset, folder: Path, durable: bool = True) -> Path:
    """Write one part of a WADO-RS answer (``header`` from :func:`_part_header`) as
    ``<SOPInstanceUID>.dcm``: a Part 10 file byte for byte, anything else parsed and
    written as one. Raises (pydicom's errors, ValueError) when it cannot be read."""
    sop_uid = _sop_uid(header)
    if header.preamble is not None and "TransferSyntaxUID" in header.file_meta:
        return _write_file(folder, sop_uid, lambda fh: fh.write(part), durable)
    ds = dcmread(BytesIO(part), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare dataset: the encoding it was read in
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return _write_dataset(ds, folder, durable)


def _write_dataset(ds: Dataset, folder: Path, durable: bool = True) -> Path:
    """Write ``ds`` as ``<SOPInstanceUID>.dcm`` (a Part 10 file)."""
    return _write_file(folder, _sop_uid(ds),
                       lambda fh: dcmwrite(fh, ds, enforce_file_format=True), durable)


def _write_file(folder: Path, sop_uid: str, write: Callable[[BinaryIO], object],
                durable: bool) -> Path:
    """``<folder>/<sop_uid>.dcm`` written by ``write`` via a temporary name, fsync (when
    ``durable``) and rename."""
    final = folder / f"{sop_uid}.dcm"
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".wado-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp_name)
        raise
    return final


# ---------------------------------------------------------------------------- client
class DicomWebClient:
    """A DICOMweb (QIDO-RS, WADO-RS, STOW-RS) client for one server.

    ``base_url`` is the service root (e.g. ``http://pacs:8042/dicom-web``).
    ``auth`` is None, :class:`BasicAuth` or :class:`BearerAuth`. Timeouts are in
    seconds: ``connect_timeout_s`` to open a connection, ``read_timeout_s``
    between bytes of an answer (not for a whole transfer). ``retries`` is how
    many times a request is tried in all (backoff 1 s, 2 s, 4 s…) when it fails
    to connect, times out or is answered 408/429/503/504 (dicomweb-client's
    retry policy); ``retries=1`` tries once. ``chunk_size`` is how many bytes
    are read (WADO) or sent (STOW) at a time. ``trust_env`` lets ``requests``
    use proxy settings from the environment. Redirects are refused (an error)
    unless ``follow_redirects``: a server must not send us to another URL
    behind :func:`url_allowed`'s back.

    Raises :class:`InvalidInput` for a URL that is not http(s). Every method
    raises :class:`DicomWebError` (or :class:`DicomWebNotFound` for a 404) when
    the server cannot be reached or answers with an error; never a raw
    ``requests`` exception. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        auth: DicomWebAuth = None,
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        retries: int = 3,
        chunk_size: int = 1 << 20,
        trust_env: bool = True,
        follow_redirects: bool = False,
    ) -> None:
        self.base_url = validate_base_url(base_url)
        if connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise InvalidInput("DICOMweb timeouts must be positive")
        self._session = requests.Session()
        self._session.trust_env = trust_env
        if not follow_redirects:
            self._session.hooks["response"].append(_refuse_redirect)
        if isinstance(auth, BasicAuth):
            self._session.auth = (auth.username, auth.password)
        elif isinstance(auth, BearerAuth):
            self._session.headers["Authorization"] = f"Bearer {auth.token}"
        elif auth is not None:
            raise InvalidInput(f"unsupported DICOMweb auth {type(auth).__name__}")
        try:
            self._client = DICOMwebClient(
                url=self.base_url,
                session=self._session,
                timeout=(connect_timeout_s, read_timeout_s),
                chunk_size=chunk_size,
            )
        except ValueError as exc:
            raise InvalidInput(f"DICOMweb URL {self.base_url!r} refused: {exc}") from None
        self._client.set_http_retry_params(
            retry=retries > 1, max_attempts=max(1, retries), wait_exponential_multiplier=500
        )

    # -- lifecycle
    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self._session.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DicomWebClient({self.base_url!r})"

    # -- error mapping
    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url

    def _raise(self, exc: BaseException, what: str, url: str) -> NoReturn:
        """Turn a requests/dicomweb-client exception into a :class:`DicomWebError`."""
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            status = exc.response.status_code
            reason = exc.response.reason or ""
            detail = f"{what}: {url} answered HTTP {status} {reason}".rstrip()
            if status in (401, 403):
                raise DicomWebError(
                    f"{detail} (not authorised: check the credentials configured for "
                    f"this server)", url=url, status=status) from None
            if status == 404:
                raise DicomWebNotFound(f"{detail} (not found)", url=url, status=status) from None
            raise DicomWebError(detail, url=url, status=status) from None
        if isinstance(exc, requests.Timeout):
            raise DicomWebError(f"{what}: {url} timed out ({exc.__class__.__name__})",
                                url=url) from None
        if isinstance(exc, requests.ConnectionError):
            raise DicomWebError(
                f"{what}: connection to {url} failed (server down, refused or unreachable): "
                f"{_connection_cause(exc)}", url=url) from None
        if isinstance(exc, retrying.RetryError):
            attempt = exc.last_attempt.value
            last: int | None = (getattr(attempt, "status_code", None)
                                if not isinstance(attempt, tuple) else None)
            raise DicomWebError(f"{what}: {url} kept answering HTTP {last}; gave up",
                                url=url, status=last) from None
        if isinstance(exc, requests.RequestException):
            raise DicomWebError(f"{what}: request to {url} failed: {_short(exc)}",
                                url=url) from None
        raise DicomWebError(f"{what}: unexpected answer from {url}: {_short(exc)}",
                            url=url) from None

    @contextmanager
    def _mapped(self, what: str, url: str) -> Iterator[None]:
        try:
            yield
        except NodeError:
            raise
        except Exception as exc:  # network boundary: whatever the answer did, say so
            self._raise(exc, what, url)

    def _call(self, what: str, url: str, fn: Callable[[], T]) -> T:
        with self._mapped(what, url):
            return fn()
        raise AssertionError("unreachable")  # pragma: no cover

    # -- QIDO-RS
    def _search(self, what: str, path: str,
                fn: Callable[[dict[str, Any], int, int], list[dict[str, Any]]],
                filters: dict[str, Any], page_size: int, limit: int | None,
                key: Callable[[dict[str, Any]], str | None]) -> list[dict[str, Any]]:
        """Page through a QIDO search; stops on a short, empty or repeated page."""
        results: list[dict[str, Any]] = []
        seen: set[str] = set()
        offset = 0
        url = self._url(path)
        while True:
            size = page_size if limit is None else min(page_size, limit - len(results))
            if size <= 0:
                break
            page = self._call(what, url, lambda s=size, o=offset: fn(filters, s, o))  # type: ignore[misc]
            if not isinstance(page, list):
                raise DicomWebError(f"{what}: {url} answered something other than a list",
                                    url=url)
            fresh = []
            for item in page:
                k = key(item)
                if k is not None and k not in seen:
                    seen.add(k)
                    fresh.append(item)
            results.extend(fresh)
            if len(page) < size or not fresh:
                break
            offset += len(page)
        return results if limit is None else results[:limit]

    @staticmethod
    def _filters(**kwargs: str | None) -> dict[str, str]:
        names = {"study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID",
                 "sop_uid": "SOPInstanceUID", "patient_id": "PatientID",
                 "accession_number": "AccessionNumber", "modality": "Modality"}
        out: dict[str, str] = {}
        for k, v in kwargs.items():
            if v is None:
                continue
            if k.endswith("_uid"):
                _check_uid(v, names[k])
            elif not v.strip() or any(c in v for c in "*?\\"):
                # Empty means "any", '*' and '?' are wildcards, '\\' separates
                # values: a caller's ID must never widen the search.
                raise InvalidInput(f"{names[k]} {v!r} is empty or has wildcard characters")
            out[names[k]] = v
        return out

    def search_studies(self, *, study_uid: str | None = None, patient_id: str | None = None,
                       accession_number: str | None = None, limit: int | None = None,
                       page_size: int = 500) -> list[StudyResult]:
        """QIDO-RS ``/studies`` with the given matching keys (all optional, ANDed).

        Matching is exact. Returns an empty list when nothing matches. Raises
        :class:`InvalidInput` for a malformed UID or an empty or wildcard
        (``*``, ``?``, ``\\``) value, :class:`DicomWebError` if the search fails.
        """
        filters = self._filters(study_uid=study_uid, patient_id=patient_id,
                                accession_number=accession_number)
        fields = ["StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "PatientID", "AccessionNumber"]

        def fn(f: dict[str, Any], size: int, offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_studies(
                search_filters=f, fields=fields, limit=size, offset=offset)

        items = self._search("QIDO-RS search for studies", "studies", fn, filters,
                             page_size, limit, lambda i: _str(i, _STUDY_UID))
        return [
            StudyResult(
                study_uid=str(_str(i, _STUDY_UID)),
                patient_id=_str(i, _PATIENT_ID),
                accession_number=_str(i, _ACCESSION),
                study_date=_str(i, _STUDY_DATE),
                modalities=_strs(i, _MODALITIES_IN_STUDY),
                number_of_series=_int(i, _N_STUDY_SERIES),
                number_of_instances=_int(i, _N_STUDY_INSTANCES),
            )
            for i in items
        ]

    def search_series(self, *, study_uid: str | None = None, series_uid: str | None = None,
                      patient_id: str | None = None, accession_number: str | None = None,
                      modality: str | None = None, limit: int | None = None,
                      page_size: int = 500) -> list[SeriesResult]:
        """QIDO-RS series search (``/studies/{uid}/series`` when ``study_uid`` is given).

        Matching is exact. Returns an empty list when nothing matches. Raises
        :class:`InvalidInput` for a malformed UID or an empty or wildcard
        (``*``, ``?``, ``\\``) value, :class:`DicomWebError` if the search fails.
        """
        filters = self._filters(series_uid=series_uid, patient_id=patient_id,
                                accession_number=accession_number, modality=modality)
        if study_uid is not None:
            _check_uid(study_uid, "StudyInstanceUID")
        fields = ["StudyInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances"]

        def fn(f: dict[str, Any], size: int, offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_series(
                study_instance_uid=study_uid, search_filters=f, fields=fields,
                limit=size, offset=offset)

        path = f"studies/{study_uid}/series" if study_uid else "series"
        items = self._search("QIDO-RS search for series", path, fn, filters, page_size,
                             limit, lambda i: _str(i, _SERIES_UID))
        return [
            SeriesResult(
                study_uid=_str(i, _STUDY_UID) or study_uid or "",
                series_uid=str(_str(i, _SERIES_UID)),
                modality=_str(i, _MODALITY),
                series_number=_int(i, _SERIES_NUMBER),
                number_of_instances=_int(i, _N_SERIES_INSTANCES),
            )
            for i in items
        ]

    def search_instances(self, *, study_uid: str | None = None, series_uid: str | None = None,
                         sop_uid: str | None = None, patient_id: str | None = None,
                         accession_number: str | None = None, limit: int | None = None,
                         page_size: int = 1000) -> list[InstanceResult]:
        """QIDO-RS instance search (under the study/series when their UIDs are given).

        ``series_uid`` without ``study_uid`` is sent as a matching key. Matching
        is exact. Returns an empty list when nothing matches. Raises
        :class:`InvalidInput` for a malformed UID or an empty or wildcard value,
        :class:`DicomWebError` if the search fails.
        """
        if study_uid is not None:
            _check_uid(study_uid, "StudyInstanceUID")
        scoped_series = series_uid if study_uid is not None else None
        filters = self._filters(
            series_uid=None if scoped_series else series_uid, sop_uid=sop_uid,
            patient_id=patient_id, accession_number=accession_number)
        if scoped_series is not None:
            _check_uid(scoped_series, "SeriesInstanceUID")
        fields = ["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "InstanceNumber"]

        def fn(f: dict[str, Any], size: int, offset: int) -> list[dict[str, Any]]:
            return self._client.search_for_instances(
                study_instance_uid=study_uid, series_instance_uid=scoped_series,
                search_filters=f, fields=fields, limit=size, offset=offset)

        path = "instances"
        if study_uid:
            path = f"studies/{study_uid}/" + (f"series/{scoped_series}/" if scoped_series
                                              else "") + "instances"
        items = self._search("QIDO-RS search for instances", path, fn, filters, page_size,
                             limit, lambda i: _str(i, _SOP_UID))
        return [
            InstanceResult(
                study_uid=_str(i, _STUDY_UID) or study_uid or "",
                series_uid=_str(i, _SERIES_UID) or scoped_series or "",
                sop_uid=str(_str(i, _SOP_UID)),
                sop_class_uid=_str(i, _SOP_CLASS),
                instance_number=_int(i, _INSTANCE_NUMBER),
            )
            for i in items
        ]

    # -- WADO-RS
    def _parts(self, url: str) -> Iterator[bytes]:
        """GET a WADO-RS resource as the stored instances it holds, the raw parts of the
        multipart answer (each a Part 10 file as the server keeps it), one at a time.

        dicomweb-client's own GET (session, auth, retries, timeouts) and multipart
        decoder, which its public retrieve methods wrap in a pydicom parse per part.
        """
        response = self._client._http_get(url, headers={"Accept": _ACCEPT_AS_STORED},
                                          stream=True)
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type == "application/dicom":
            # The one part sent bare: non-conformant, but dicomweb-client takes it too.
            return iter([response.content])
        if media_type != "multipart/related":  # an error page, JSON: nothing to store
            response.close()
            raise ValueError(f"answered {media_type or 'no content type'}, "
                             "not multipart/related")
        parts: Iterator[bytes] = self._client._decode_multipart_message(response, stream=True)
        return parts

    def _stream_to(self, what: str, url: str, folder: Path,
                   open_stream: Callable[[], Iterator[bytes]],
                   expect: Collection[str] | None = None,
                   durable: bool = True) -> RetrieveResult:
        """Write each dataset of a streamed multipart answer to ``folder``.

        Failure to *start* the transfer raises :class:`DicomWebError`; a failure
        to write one instance is that instance's outcome; a transfer cut short
        after it started adds an outcome with ``sop_uid=None``.
        """
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DicomWebError(f"{what}: cannot create {folder}: {exc.strerror}",
                                url=url) from None
        result = RetrieveResult(folder=folder)
        stream = self._call(what, url, open_stream)
        iterator = iter(stream)
        try:
            while True:
                try:
                    part = next(iterator)
                except StopIteration:
                    break
                except Exception as exc:  # decoding what the server sent; it may be anything
                    if not result.outcomes and isinstance(exc, requests.HTTPError):
                        self._raise(exc, what, url)
                    result.outcomes.append(InstanceOutcome(
                        None, False, reason=f"transfer from {url} interrupted after "
                        f"{len(result.outcomes)} instance(s): {_short(exc)}"))
                    break
                sop_uid = None
                try:
                    header = _part_header(part)
                    sop_uid = str(header.get("SOPInstanceUID", "")) or None
                    path = _write_part(part, header, folder, durable)
                except Exception as exc:  # that instance fails, the others go on
                    result.outcomes.append(InstanceOutcome(sop_uid, False, reason=_short(exc)))
                else:
                    result.outcomes.append(InstanceOutcome(sop_uid, True, path=path))
                del part
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with suppress(Exception):
                    close()
            if durable:
                fsync_dir(folder)
        if expect is not None:
            received = {o.sop_uid for o in result.outcomes}
            result.outcomes.extend(
                InstanceOutcome(uid, False, reason=f"not received from {url}")
                for uid in expect if uid not in received)
        log.info("dicomweb_retrieved", url=url, ok=len(result.succeeded),
                 failed=len(result.failed))
        return result

    def retrieve_study(self, study_uid: str, folder: Path | str, *,
                       expect: Collection[str] | None = None,
                       durable: bool = True) -> RetrieveResult:
        """WADO-RS the whole study, streaming each instance to ``folder``.

        ``expect``: SOPInstanceUIDs that must arrive (e.g. from a QIDO search);
        any that does not becomes a failed outcome. ``durable=False`` skips the
        fsyncs: for a scratch folder whose files are moved on at once (a crash
        makes the caller fetch again). Raises :class:`InvalidInput`
        (bad UID), :class:`DicomWebNotFound` (no such study) or
        :class:`DicomWebError` (the transfer could not start).
        """
        _check_uid(study_uid, "StudyInstanceUID")
        url = self._url(f"studies/{study_uid}")
        return self._stream_to("WADO-RS retrieve study", url, Path(folder),
                               lambda: self._parts(url), expect, durable)

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path | str, *,
                        expect: Collection[str] | None = None,
                        durable: bool = True) -> RetrieveResult:
        """WADO-RS one series, streaming each instance to ``folder``.

        Raises like :meth:`retrieve_study`.
        """
        _check_uid(study_uid, "StudyInstanceUID")
        _check_uid(series_uid, "SeriesInstanceUID")
        url = self._url(f"studies/{study_uid}/series/{series_uid}")
        return self._stream_to("WADO-RS retrieve series", url, Path(folder),
                               lambda: self._parts(url), expect, durable)

    def retrieve_instances(self, refs: Iterable[InstanceRef], folder: Path | str, *,
                           durable: bool = True) -> RetrieveResult:
        """WADO-RS each instance in turn to ``folder``; each gets its own outcome
        (``durable`` as for :meth:`retrieve_study`).

        An instance that is missing, refused or unwritable is a failed outcome
        with the reason; nothing is raised for it. Raises :class:`InvalidInput`
        for a malformed UID and :class:`DicomWebError` only when the folder
        cannot be created.
        """
        refs = list(refs)
        for ref in refs:
            _check_uid(ref.study_uid, "StudyInstanceUID")
            _check_uid(ref.series_uid, "SeriesInstanceUID")
            _check_uid(ref.sop_uid, "SOPInstanceUID")
        folder = Path(folder)
        result = RetrieveResult(folder=folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DicomWebError(f"WADO-RS retrieve instance: cannot create {folder}: "
                                f"{exc.strerror}", url=self.base_url) from None
        for ref in refs:
            url = self._url(f"studies/{ref.study_uid}/series/{ref.series_uid}/"
                            f"instances/{ref.sop_uid}")
            try:
                parts = self._call("WADO-RS retrieve instance", url,
                                   lambda u=url: list(self._parts(u)))  # type: ignore[misc]
                if len(parts) != 1:
                    raise ValueError(f"server sent {len(parts)} parts for one instance")
                header = _part_header(parts[0])
                sent = str(header.get("SOPInstanceUID", ""))
                if sent != ref.sop_uid:
                    raise ValueError(f"server sent SOPInstanceUID {sent[:80]!r}")
                path = _write_part(parts[0], header, folder, durable)
            except DicomWebError as exc:
                result.outcomes.append(InstanceOutcome(ref.sop_uid, False, reason=str(exc)))
            except Exception as exc:  # that instance fails, the others go on
                result.outcomes.append(InstanceOutcome(ref.sop_uid, False, reason=_short(exc)))
            else:
                result.outcomes.append(InstanceOutcome(ref.sop_uid, True, path=path))
        if durable:
            fsync_dir(folder)
        return result

    # -- STOW-RS
    def store(self, paths: Iterable[Path | str], *, batch_size: int = 16,
              batch_bytes: int = 64 << 20) -> StoreResult:
        """STOW-RS the DICOM files at ``paths``, several per request.

        A request carries at most ``batch_size`` files and, beyond its first file,
        at most ``batch_bytes`` of files. A file that cannot be read as DICOM is
        a failed SOP (nothing sent); instances the server neither references
        nor lists as failed are failed too. Raises :class:`DicomWebError` when
        a request fails outright (connection, 401/403, 5xx…); HTTP 409 (all of
        the batch refused) is reported per instance, not raised.
        """
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        result = StoreResult()
        batch: list[tuple[Path, Dataset]] = []
        size = 0
        for p in paths:
            path = Path(p)
            try:
                file_size = path.stat().st_size
                ds = dcmread(path)
                str(ds.SOPInstanceUID)
            except (OSError, InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
                result.failed.append(FailedSop(None, f"cannot read {path.name}: "
                                               f"{_short(exc)}", path))
                continue
            if batch and (len(batch) >= batch_size or size + file_size > batch_bytes):
                self._store_batch(batch, result)
                batch, size = [], 0
            batch.append((path, ds))
            size += file_size
        if batch:
            self._store_batch(batch, result)
        log.info("dicomweb_stored", url=self.base_url, referenced=len(result.referenced),
                 failed=len(result.failed), requests=result.requests)
        return result

    def _store_batch(self, batch: list[tuple[Path, Dataset]], result: StoreResult) -> None:
        url = self._url("studies")
        result.requests += 1
        what = "STOW-RS store"
        answer: Dataset | None
        try:
            answer = self._client.store_instances([ds for _, ds in batch])
        except requests.HTTPError as exc:
            # 409: the server refused every instance and says why in the body.
            status = exc.response.status_code if exc.response is not None else None
            answer = _stow_error_body(exc) if status == 409 else None
            if answer is None:
                self._raise(exc, what, url)
        except NodeError:
            raise
        except Exception as exc:  # network boundary, as in _mapped
            self._raise(exc, what, url)
        by_uid = {str(ds.SOPInstanceUID): path for path, ds in batch}
        accounted: set[str] = set()
        for item in answer.get("ReferencedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            if uid in by_uid and uid not in accounted:
                result.referenced.append(uid)
                accounted.add(uid)
        for item in answer.get("FailedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            if uid in accounted:
                continue
            code = item.get("FailureReason")
            reason = f"refused by server (failure reason 0x{int(code):04X})" if code is not None \
                else "refused by server"
            result.failed.append(FailedSop(uid or None, reason, by_uid.get(uid)))
            accounted.add(uid)
        for uid, path in by_uid.items():
            if uid not in accounted:
                result.failed.append(FailedSop(uid, "not acknowledged by the server", path))


def _refuse_redirect(response: requests.Response, *args: object, **kwargs: object) -> None:
    """``requests`` response hook: a redirect is an error, not followed."""
    if response.is_redirect:
        target = str(response.headers.get("Location", ""))[:200]
        raise DicomWebError(
            f"{response.url} answered HTTP {response.status_code} redirecting to {target!r}; "
            f"redirects are not followed", url=str(response.url), status=response.status_code)


def _stow_error_body(exc: BaseException) -> Dataset | None:
    """The DICOM JSON body of a STOW-RS 409 answer, if there is one."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _connection_cause(exc: BaseException) -> str:
    """Why a connection failed, as the system said it ("Name or service not known",
    "Connection refused", a certificate problem), rather than urllib3's retry wrapper
    around it with the whole query string; else :func:`_short`."""
    text = str(exc)
    if found := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text):
        return found.group(1).strip()
    if found := re.search(r"(certificate verify failed[^'\")]*|CERTIFICATE_VERIFY_FAILED)",
                          text, re.IGNORECASE):
        return f"TLS: {found.group(1).strip()}"
    return _short(exc)


def _short(exc: BaseException) -> str:
    """A one-line description of an exception, without URLs' credentials."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"://[^/@\s]+@", "://", text)
    name = exc.__class__.__name__
    return f"{name}: {text}"[:300] if text else name
