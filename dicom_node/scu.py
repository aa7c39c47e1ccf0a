"""The node as a DICOM client: C-STORE export, C-ECHO, and C-FIND / C-MOVE / C-GET retrieval.

Every operation returns a typed result object and never raises into the node for a
peer's behaviour (refused, down, failed sub-operations): a destination that fails
fails that export, with a message a person can act on. Operations block; call them
from a worker thread (``asyncio.to_thread``), never from the event loop.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.presentation import StoragePresentationContexts, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_node import spool
from dicom_node.config import (
    DestinationSettings,
    RetrySettings,
    Settings,
    SourceSettings,
    TlsSettings,
)
from dicom_node.dimse_status import Status
from dicom_node.disk import short_of_space
from dicom_node.errors import InvalidInput, StoreError
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.logs import get_logger
from dicom_node.scheduler import ExportOutcome
from dicom_node.scp import (
    ACCEPTED_TRANSFER_SYNTAXES,
    InstanceWriter,
    ReceivedInstance,
    RetrievalKeys,
    RetrievedBatch,
    StorageSCP,
    close_wakeup,
    safe_uid,
    tune_socket,
)
from dicom_node.store import Store
from dicom_node.tls import TlsFileError, client_context, handshake_problem

__all__ = [
    "GET_STORAGE_CLASSES",
    "UNCOMPRESSED_TRANSFER_SYNTAXES",
    "DicomClient",
    "EchoResult",
    "ExportResult",
    "FindResult",
    "InstanceFailure",
    "Peer",
    "Query",
    "QueryLevel",
    "RetrieveResult",
]

UNCOMPRESSED_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]  # fallback
_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
_PENDING = (0xFF00, 0xFF01)  # C-MOVE / C-GET sub-operations continuing (PS3.7 C.4.2, C.4.3)

_log = get_logger("dimse.scu")

# Storage SOP classes offered for C-GET (a C-GET association carries the storage contexts
# as well as the query/retrieve one, within 128 in all): these first, then pynetdicom's
# list of the usual storage classes (key objects, RT plans, tomosynthesis, whole slide,
# multi-frame secondary captures ...) until the 127 places are full. A PACS can send
# back only what was offered.
_GET_FIRST = [
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # mammography
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # enhanced CT
    "1.2.840.10008.5.1.4.1.1.3.1",  # US multi-frame
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # enhanced MR
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # SC multi-frame grayscale byte
    "1.2.840.10008.5.1.4.1.1.7.4",  # SC multi-frame true colour
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.66.4",  # segmentation
    "1.2.840.10008.5.1.4.1.1.88.22",  # enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # comprehensive SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT structure set
    "1.2.840.10008.5.1.4.1.1.11.1",  # grayscale softcopy presentation state
]
GET_STORAGE_CLASSES = list(dict.fromkeys(
    _GET_FIRST + [str(cx.abstract_syntax) for cx in StoragePresentationContexts]
))[: _MAX_CONTEXTS - 1]


# -- log context in pynetdicom's threads -----------------------------------------------


class _NodeAE(AE):
    """An AE for one outgoing operation, with the log context of the caller (the job's
    id, the peer) for the lines pynetdicom logs from the association's own threads."""

    log_context: dict[str, Any]


class _AssociationLogContext(logging.Filter):
    """Binds an outgoing association's log context in the pynetdicom thread a record
    comes from (the association's reactor, its DUL), where the caller's context
    variables are not: those threads start with none. Each serves one association, so
    what is bound there stays with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        _adopt_context(threading.current_thread())
        return True


def _adopt_context(thread: threading.Thread) -> None:
    """Bind the log context of the node's AE behind ``thread``'s association, if any."""
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    context = getattr(getattr(assoc, "ae", None), "log_context", None)
    if context and structlog.contextvars.get_contextvars() != context:
        structlog.contextvars.bind_contextvars(**context)


def _install_log_context() -> None:
    """Put the filter on each of pynetdicom's loggers (a logger's filters see only its
    own records, not its children's); once."""
    names = ["pynetdicom", *(n for n in logging.root.manager.loggerDict
                             if n.startswith("pynetdicom."))]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _AssociationLogContext) for f in logger.filters):
            logger.addFilter(_AssociationLogContext())


_install_log_context()


# -- typed requests and results --------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A remote application entity."""

    ae_title: str
    host: str
    port: int
    tls: TlsSettings | None = None
    name: str = ""

    @classmethod
    def from_settings(cls, s: SourceSettings | DestinationSettings) -> Peer:
        if s.ae_title is None or s.host is None or s.port is None:
            raise InvalidInput(f"{s.name} is not a DIMSE peer (ae_title, host, port)")
        return cls(s.ae_title, s.host, s.port, s.tls, s.name)

    def __str__(self) -> str:
        return f"{self.name or self.ae_title}({self.ae_title}@{self.host}:{self.port})"


class QueryLevel(StrEnum):
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


@dataclass(frozen=True)
class Query:
    """A Study Root query: the level and the keys that select what to find or retrieve."""

    level: QueryLevel
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", QueryLevel(self.level))
        for name in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
            value = getattr(self, name)
            if value is not None:
                for uid in value.split("\\"):  # a list of UIDs is a valid match key
                    safe_uid(uid, name)
        if self.level is not QueryLevel.STUDY and not self.study_instance_uid:
            raise InvalidInput(f"a {self.level} level query needs study_instance_uid")
        if self.level is QueryLevel.IMAGE and not self.series_instance_uid:
            raise InvalidInput("an IMAGE level query needs series_instance_uid")
        if not any((self.study_instance_uid, self.patient_id, self.accession_number)):
            raise InvalidInput(
                "a query needs study_instance_uid, patient_id or accession_number"
            )

    def to_dataset(self, *, for_find: bool) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level.value
        ds.StudyInstanceUID = self.study_instance_uid or ""
        if self.patient_id is not None or for_find:
            ds.PatientID = self.patient_id or ""
        if self.accession_number is not None or for_find:
            ds.AccessionNumber = self.accession_number or ""
        if self.level in (QueryLevel.SERIES, QueryLevel.IMAGE):
            ds.SeriesInstanceUID = self.series_instance_uid or ""
        if self.level is QueryLevel.IMAGE:
            ds.SOPInstanceUID = self.sop_instance_uid or ""
        if for_find:  # return keys
            ds.StudyDate = ""
            if self.level is QueryLevel.STUDY:
                ds.ModalitiesInStudy = ""
                ds.NumberOfStudyRelatedInstances = ""
            if self.level is QueryLevel.SERIES:
                ds.Modality = ""
                ds.SeriesNumber = ""
                ds.NumberOfSeriesRelatedInstances = ""
            if self.level is QueryLevel.IMAGE:
                ds.SOPClassUID = ""
                ds.InstanceNumber = ""
        return ds


@dataclass(frozen=True)
class EchoResult:
    peer: str
    ok: bool
    status: int | None = None
    message: str = ""


@dataclass(frozen=True)
class InstanceFailure:
    """One instance that could not be sent or retrieved, and why."""

    sop_instance_uid: str
    status: int | None
    message: str


@dataclass(frozen=True)
class ExportResult:
    """The outcome of sending a batch of instances to one destination."""

    destination: str
    ok: bool
    attempts: int
    sent: list[str] = field(default_factory=list)
    failures: list[InstanceFailure] = field(default_factory=list)
    message: str = ""
    # Some failures may pass on a later attempt (no association, out of resources);
    # False when every failure is one the peer will repeat (a refused SOP class).
    retryable: bool = False

    def to_outcome(self) -> ExportOutcome:
        return ExportOutcome(destination=self.destination, ok=self.ok, attempts=self.attempts,
                             sent=len(self.sent), message=self.message or None)


@dataclass(frozen=True)
class FindResult:
    peer: str
    ok: bool
    matches: list[Dataset] = field(default_factory=list)
    status: int | None = None
    message: str = ""


@dataclass(frozen=True)
class RetrieveResult:
    """What a C-MOVE or C-GET brought in: stored instances and per-instance failures."""

    peer: str
    method: str  # "c-move" or "c-get"
    ok: bool
    received: list[ReceivedInstance] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failures: list[InstanceFailure] = field(default_factory=list)
    status: int | None = None
    message: str = ""


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


# -- the client ------------------------------------------------------------------------


class DicomClient:
    """DIMSE client operations for the node (thread-safe; each call has its own AE)."""

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        scp: StorageSCP | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.scp = scp
        self._sleep = sleep
        self.log = get_logger("dimse.scu")

    # -- plumbing ------------------------------------------------------------------------

    def _ae(self) -> _NodeAE:
        d = self.settings.dimse
        ae = _NodeAE(ae_title=d.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.log_context = structlog.contextvars.get_contextvars()
        ae.acse_timeout = d.acse_timeout_s
        ae.dimse_timeout = d.dimse_timeout_s
        ae.network_timeout = d.network_timeout_s
        ae.maximum_pdu_size = d.maximum_pdu_size
        return ae

    def _tls(self, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
        if peer.tls is None:
            return None
        tls = peer.tls
        ca = self.settings.path(tls.ca_certificate) if tls.ca_certificate is not None else None
        ctx = client_context(self.settings.path(tls.certificate),
                             self.settings.path(tls.private_key), ca)
        return ctx, peer.host

    def _associate(self, ae: AE, peer: Peer, **kwargs: Any) -> tuple[Association | None, str]:
        """Associate; on failure return ``None`` and a message naming the reason.

        pynetdicom's own log lines about the association carry the caller's context
        (the job's id) and the peer."""
        if isinstance(ae, _NodeAE):
            ae.log_context = {**ae.log_context, "peer": str(peer)}
        try:
            tls_args = self._tls(peer)
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                                 tls_args=tls_args, **kwargs)
        except TlsFileError as exc:  # checked with the settings; changed since
            return None, f"cannot connect to {peer}: tls.{exc}"
        except (OSError, ssl.SSLError) as exc:
            return None, f"cannot connect to {peer}: {exc}"
        if assoc.is_established:
            tune_socket(assoc)
            return assoc, ""
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            reason = _reject_text(rj) if rj is not None else "rejected"
            return None, f"{peer} rejected the association: {reason}"
        # pynetdicom reports a refused TCP connection, and a failed TLS handshake, as an
        # abort too (the handshake's reason only in its own log): ask the network.
        ctx = tls_args[0] if tls_args is not None else None
        return None, f"cannot associate with {peer}: {_why_no_association(peer, ctx)}"

    # -- C-ECHO --------------------------------------------------------------------------

    def echo(self, peer: Peer) -> EchoResult:
        ae = self._ae()
        ae.add_requested_context(Verification)
        assoc, error = self._associate(ae, peer)
        if assoc is None:
            self.log.warning("C-ECHO failed", peer=str(peer), message=error)
            return EchoResult(str(peer), False, None, error)
        try:
            rsp = assoc.send_c_echo()
        finally:
            _close(assoc)
        status = int(rsp.Status) if "Status" in rsp else None
        ok = status == Status.SUCCESS
        message = "" if ok else ("no response" if status is None else f"status 0x{status:04X}")
        self.log.info("C-ECHO", peer=str(peer), status=status, ok=ok)
        return EchoResult(str(peer), ok, status, message)

    # -- C-STORE export ------------------------------------------------------------------

    def export(self, destination: DestinationSettings, paths: Sequence[Path], *,
               attempts: int | None = None,
               cancelled: threading.Event | None = None,
               acknowledged: Callable[[str], None] | None = None) -> ExportResult:
        """Send ``paths`` to a DIMSE destination, retrying with exponential backoff.

        ``attempts``: at most this many associations (default: the destination's
        ``retry.max_attempts``); a job's export makes one each pass and is queued again
        for the next. ``cancelled`` stops it between instances and attempts.
        ``acknowledged`` gets each SOP Instance UID the peer acknowledges, as it does.
        """
        try:
            peer = Peer.from_settings(destination)
        except InvalidInput as exc:
            return ExportResult(destination.name, False, 0, message=str(exc))
        retry = destination.retry
        if attempts is not None:
            retry = retry.model_copy(update={"max_attempts": attempts})
        return self.store_instances(peer, paths, retry, cancelled=cancelled,
                                    acknowledged=acknowledged)

    def store_instances(
        self, peer: Peer, paths: Sequence[Path], retry: RetrySettings | None = None, *,
        cancelled: threading.Event | None = None,
        acknowledged: Callable[[str], None] | None = None,
    ) -> ExportResult:
        retry = retry or RetrySettings()
        items: list[_Item] = []
        failures: dict[str, InstanceFailure] = {}
        for p in paths:
            try:
                items.append(_read_item(Path(p)))
            except InvalidInput as exc:
                failures[str(p)] = InstanceFailure(str(p), None, str(exc))
        pending = items
        sent: list[str] = []
        attempt = 0
        last_error = ""
        while pending and attempt < retry.max_attempts:
            if cancelled is not None and cancelled.is_set():
                last_error = last_error or "cancelled"
                break
            if attempt:
                delay = retry.delay_after(attempt)
                self.log.info("export: retrying", peer=str(peer), in_s=delay,
                              pending=len(pending), attempt=attempt + 1)
                if cancelled is not None:
                    if cancelled.wait(delay):
                        continue  # the check above ends it
                else:
                    self._sleep(delay)
            attempt += 1
            done, retryable, permanent, last_error = self._store_once(
                peer, pending, cancelled, acknowledged)
            sent += done
            for f in permanent:
                failures[f.sop_instance_uid] = f
            for f in retryable:
                failures[f.sop_instance_uid] = f
            retry_uids = {f.sop_instance_uid for f in retryable}
            pending = [i for i in pending if i.sop_instance_uid in retry_uids]
        for uid in sent:
            failures.pop(uid, None)
        for i in pending:  # not tried at all: cancelled first
            failures.setdefault(i.sop_instance_uid,
                                InstanceFailure(i.sop_instance_uid, None, last_error))
        ok = not failures
        if ok:
            message = f"{len(sent)} instances sent"
        else:
            first = next(iter(failures.values()))
            after = f" after {attempt} attempts" if attempt > 1 else ""
            message = (f"{len(failures)} of {len(paths)} instances not sent to {peer}{after}: "
                       f"{last_error or first.message}")
        log = self.log.info if ok else self.log.warning
        log("export finished", peer=str(peer), ok=ok, sent=len(sent), failed=len(failures),
            attempts=attempt)
        return ExportResult(peer.name or peer.ae_title, ok, attempt, sent,
                            list(failures.values()), message, retryable=bool(pending))

    def _store_once(
        self, peer: Peer, items: list[_Item], cancelled: threading.Event | None = None,
        acknowledged: Callable[[str], None] | None = None,
    ) -> tuple[list[str], list[InstanceFailure], list[InstanceFailure], str]:
        """One association: (sent, retryable failures, permanent failures, association error).

        ``cancelled`` stops it before the next instance; ``acknowledged`` gets each SOP
        Instance UID the peer acknowledges (Success or Warning) as it does."""
        ae = self._ae()
        contexts: set[tuple[str, str]] = set()
        for it in items:
            contexts.add((it.sop_class_uid, it.transfer_syntax_uid))
            contexts.add((it.sop_class_uid, "uncompressed"))
        # Each object's own syntax in its own context, so the peer cannot pick an
        # uncompressed one that would force a decode; uncompressed as the fallback.
        for sop_class, ts in sorted(contexts)[:_MAX_CONTEXTS]:
            ae.add_requested_context(
                sop_class, UNCOMPRESSED_TRANSFER_SYNTAXES if ts == "uncompressed" else [ts])
        assoc, error = self._associate(ae, peer)
        if assoc is None:
            failed = [InstanceFailure(i.sop_instance_uid, None, error) for i in items]
            if "rejected-permanent" in error:  # the same request will be refused again
                return [], [], failed, error
            return [], failed, [], error
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        sent: list[str] = []
        retryable: list[InstanceFailure] = []
        permanent: list[InstanceFailure] = []
        error = ""
        try:
            for it in items:
                if cancelled is not None and cancelled.is_set():
                    error = "cancelled"
                    retryable.append(InstanceFailure(it.sop_instance_uid, None, error))
                    continue
                if not assoc.is_established:
                    error = f"{peer} ended the association"
                    retryable.append(InstanceFailure(it.sop_instance_uid, None, error))
                    continue
                try:
                    ds = _dataset_for(it, accepted)
                except InvalidInput as exc:
                    permanent.append(InstanceFailure(it.sop_instance_uid, None, str(exc)))
                    continue
                try:
                    rsp = assoc.send_c_store(ds)
                except (ValueError, AttributeError, RuntimeError) as exc:
                    permanent.append(InstanceFailure(it.sop_instance_uid, None, str(exc)))
                    continue
                status = int(rsp.Status) if "Status" in rsp else None
                if status is None:
                    error = f"no C-STORE response from {peer} (timeout or abort)"
                    retryable.append(InstanceFailure(it.sop_instance_uid, None, error))
                elif status == 0 or (status & 0xF000) == 0xB000:  # success or warning
                    sent.append(it.sop_instance_uid)
                    if acknowledged is not None:
                        try:
                            acknowledged(it.sop_instance_uid)
                        except Exception as exc:  # a record of progress; the send goes on
                            self.log.warning("cannot note an acknowledged instance",
                                             error=f"{type(exc).__name__}: {exc}")
                elif (status & 0xFF00) == 0xA700:  # out of resources: may pass later
                    retryable.append(InstanceFailure(it.sop_instance_uid, status,
                                                     f"status 0x{status:04X}"))
                else:
                    permanent.append(InstanceFailure(it.sop_instance_uid, status,
                                                     f"status 0x{status:04X}"))
        finally:
            _close(assoc)
        return sent, retryable, permanent, error

    # -- C-FIND --------------------------------------------------------------------------

    def find(self, source: SourceSettings | Peer, query: Query) -> FindResult:
        peer = source if isinstance(source, Peer) else Peer.from_settings(source)
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc, error = self._associate(ae, peer)
        if assoc is None:
            return FindResult(str(peer), False, message=error)
        matches: list[Dataset] = []
        status: int | None = None
        try:
            for rsp, identifier in assoc.send_c_find(
                query.to_dataset(for_find=True), StudyRootQueryRetrieveInformationModelFind
            ):
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                if status in (0xFF00, 0xFF01) and identifier is not None:
                    matches.append(identifier)
        finally:
            _close(assoc)
        ok = status == Status.SUCCESS
        message = "" if ok else _status_text("C-FIND", status)
        self.log.info("C-FIND", peer=str(peer), level=query.level.value, matches=len(matches),
                      status=status)
        return FindResult(str(peer), ok, matches, status, message)

    # -- C-MOVE / C-GET ------------------------------------------------------------------

    def retrieve(self, source: SourceSettings, query: Query) -> RetrieveResult:
        """C-MOVE to the node's own AE title, or C-GET when the source says ``c-get``."""
        peer = Peer.from_settings(source)
        if source.retrieve == "c-get":
            return self.get(peer, query)
        return self.move(peer, query)

    def move(self, peer: Peer, query: Query) -> RetrieveResult:
        """C-MOVE ``query`` to our own AE title; our running SCP receives the instances."""
        if self.scp is None:
            return RetrieveResult(str(peer), "c-move", False,
                                  message="the node's DICOM listener is not running")
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc, error = self._associate(ae, peer)
        if assoc is None:
            return RetrieveResult(str(peer), "c-move", False, message=error)
        message_id = _next_move_id()
        keys = RetrievalKeys(query.study_instance_uid, query.series_instance_uid,
                             query.sop_instance_uid, query.patient_id,
                             query.accession_number)
        with self.scp.collect_from(peer.ae_title, message_id, keys) as batch:
            try:
                # Sends the request; the responses are read by _collect_retrieve, not
                # through the generator this returns.
                assoc.send_c_move(
                    query.to_dataset(for_find=False), self.settings.dimse.ae_title,
                    StudyRootQueryRetrieveInformationModelMove, msg_id=message_id,
                )
                # its sub-operations come on other associations from the PACS's host
                scp, host = self.scp, peer.host
                result = _collect_retrieve(assoc, lambda: scp.last_inbound_bytes(host))
            finally:
                _close(assoc)
                got = batch.end()  # recorded together, also when the C-MOVE broke off
        return self._retrieve_result(peer, "c-move", query, result, got)

    def get(self, peer: Peer, query: Query) -> RetrieveResult:
        """C-GET ``query``: the instances come back on this association and are stored."""
        if self.store is None:
            return RetrieveResult(str(peer), "c-get", False, message="no store to keep into")
        writer = InstanceWriter(self.settings, self.store)
        spool.install(writer.studies_dir)  # what comes back is spooled beside the studies
        batch = RetrievedBatch(writer)  # placed; recorded together when the C-GET ends
        failures: list[InstanceFailure] = []
        lock = threading.Lock()

        def on_store(event: evt.Event) -> int:
            _adopt_context(threading.current_thread())  # the writer's lines name the job
            req: Any = event.request
            sop = str(req.AffectedSOPInstanceUID or "")
            if short := short_of_space(self.settings, writer.studies_dir):
                # as the listener answers a C-MOVE's: a C-GET wrote the disk to 0 past it
                with lock:
                    failures.append(InstanceFailure(sop, int(Status.OUT_OF_RESOURCES),
                                                    f"free disk space is low: {short}"))
                return int(Status.OUT_OF_RESOURCES)
            try:
                got = writer.write(
                    spool.received_path(req), called_ae=self.settings.dimse.ae_title,
                    calling_ae=peer.ae_title, association_id=id(event.assoc),
                    source="retrieve", expected_sop_class=str(req.AffectedSOPClassUID),
                    expected_sop_instance=sop, durable=False,  # fetched again after a crash
                    keep_header=True,  # the job reads the headers next
                    record=False,
                )
                batch.add(got)
            except InvalidInput as exc:
                with lock:
                    failures.append(InstanceFailure(sop, int(Status.CANNOT_UNDERSTAND), str(exc)))
                return int(Status.CANNOT_UNDERSTAND)
            except (OSError, StoreError) as exc:
                with lock:
                    failures.append(InstanceFailure(sop, int(Status.OUT_OF_RESOURCES), str(exc)))
                return int(Status.OUT_OF_RESOURCES)
            return int(Status.SUCCESS)

        # The classes the peer says the instances have first (a private or newer class is
        # not in the usual list), then the usual ones, within the 127 places left.
        learned = self._sop_classes(peer, query)
        offered = list(dict.fromkeys(learned + GET_STORAGE_CLASSES))[: _MAX_CONTEXTS - 1]
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for sop_class in offered:
            ae.add_requested_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
            roles.append(build_role(sop_class, scp_role=True))
        assoc, error = self._associate(ae, peer, ext_neg=roles,
                                       evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if assoc is None:
            return RetrieveResult(str(peer), "c-get", False, message=error)
        try:
            assoc.send_c_get(query.to_dataset(for_find=False),  # as for C-MOVE
                             StudyRootQueryRetrieveInformationModelGet)
            sock = assoc.dul.socket
            result = _collect_retrieve(  # the instances come on this association
                assoc, lambda: float(getattr(sock, "last_recv", 0.0)))
        finally:
            _close(assoc)
            received = batch.end()
        known = {f.sop_instance_uid for f in result.failures}
        result.failures.extend(f for f in failures if f.sop_instance_uid not in known)
        return self._retrieve_result(peer, "c-get", query, result, received)

    def _sop_classes(self, peer: Peer, query: Query) -> list[str]:
        """The SOP Class UIDs of the instances ``query`` selects, as the peer's C-FIND
        tells them: SOP Classes in Study at study level, else the SOPClassUID of each
        instance (image level, series by series). Empty when it cannot tell: the C-GET
        then offers the usual classes only."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc, error = self._associate(ae, peer)
        if assoc is None:
            self.log.info("C-GET: SOP classes not asked for", peer=str(peer), message=error)
            return []
        found: dict[str, None] = {}
        try:
            series: list[tuple[str, str]] = []
            if query.level is QueryLevel.STUDY:
                ds = query.to_dataset(for_find=False)
                ds.SOPClassesInStudy = ""
                studies = []
                for match in _find_all(assoc, ds):
                    studies.append(str(match.get("StudyInstanceUID") or ""))
                    found.update(dict.fromkeys(_uids(match.get("SOPClassesInStudy"))))
                if found:
                    return list(found)
                for study in filter(None, studies):
                    ds = Dataset()
                    ds.QueryRetrieveLevel = "SERIES"
                    ds.StudyInstanceUID = study
                    ds.SeriesInstanceUID = ""
                    series += [(study, str(m.SeriesInstanceUID)) for m in _find_all(assoc, ds)
                               if m.get("SeriesInstanceUID")]
            else:
                assert query.study_instance_uid is not None  # checked by Query
                series = [(query.study_instance_uid, uid)
                          for uid in (query.series_instance_uid or "").split("\\") if uid]
            for study, one in series:
                ds = Dataset()
                ds.QueryRetrieveLevel = "IMAGE"
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = one
                ds.SOPInstanceUID = (query.sop_instance_uid or ""
                                     if query.level is QueryLevel.IMAGE else "")
                ds.SOPClassUID = ""
                for match in _find_all(assoc, ds):
                    found.update(dict.fromkeys(_uids(match.get("SOPClassUID"))))
        finally:
            _close(assoc)
        return list(found)

    def _no_final_response(self, method: str, r: _RetrieveTally) -> str:
        """Why a retrieval got no final status, in words; for a C-MOVE aborted before any
        instance came, the usual cause."""
        if r.ended == "aborted":
            hint = ""
            if method == "c-move" and not (r.completed or r.failed or r.warning):
                dimse = self.settings.dimse
                hint = (f"; a PACS does this when it does not know the move destination: "
                        f"register {dimse.ae_title} (this node's host, port {dimse.port}) as "
                        "a DICOM modality on it")
            return f" (it aborted the association{hint})"
        if r.ended == "closed":
            return " (it closed the connection)"
        if r.ended == "timeout":
            return f" within dimse.dimse_timeout_s ({self.settings.dimse.dimse_timeout_s:g} s)"
        return ""

    def _retrieve_result(self, peer: Peer, method: str, query: Query, r: _RetrieveTally,
                         received: list[ReceivedInstance]) -> RetrieveResult:
        ok = r.status == Status.SUCCESS and not r.failed and not r.failures
        if ok:
            message = f"{len(received)} instances retrieved"
        elif r.status is None:
            message = (f"{method.upper()}: no final response from {peer}"
                       + self._no_final_response(method, r))
        else:
            message = (f"{method.upper()} finished with status 0x{r.status:04X}"
                       f"{_retrieve_status_meaning(r.status)}: "
                       f"{r.completed} completed, {r.failed} failed, {r.warning} warning")
        log = self.log.info if ok else self.log.warning
        log(method.upper(), peer=str(peer), level=query.level.value, received=len(received),
            completed=r.completed, failed=r.failed, status=r.status)
        return RetrieveResult(str(peer), method, ok, received, r.completed, r.failed,
                              r.warning, r.failures, r.status, message)


_move_ids = itertools.count(1)
_move_ids_lock = threading.Lock()


def _next_move_id() -> int:
    """A message ID for a C-MOVE, unique among the node's retrievals in flight (1-65535):
    the PACS's C-STOREs name it, which tells two retrievals from one PACS apart."""
    with _move_ids_lock:
        return (next(_move_ids) - 1) % 65535 + 1


@dataclass
class _RetrieveTally:
    status: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failures: list[InstanceFailure] = field(default_factory=list)
    ended: str = ""  # with no final status: aborted (A-ABORT), closed, timeout


def _collect_retrieve(assoc: Association,
                      last_bytes: Callable[[], float] | None = None) -> _RetrieveTally:
    """Tally the responses to the C-MOVE / C-GET request just sent on ``assoc``.

    pynetdicom's ``send_c_move`` / ``send_c_get`` send the request and return a
    generator of the responses, left unstarted here: that generator builds
    a pydicom Dataset, attribute by attribute, for every Pending response, and a PACS
    answers each sub-operation with one: for a 300-instance C-MOVE from Orthanc that was
    a third of the node's CPU time while retrieving. This loop reads the counts off the
    response primitives instead, and handles the rest as pynetdicom does: C-STOREs on a
    C-GET association go to the storage handler; no response (DIMSE timeout or the
    connection gone) or an unexpected message ends the retrieval with no status.

    PS3.7 C.4.2: a Pending response follows each sub-operation, so one large instance
    from a slow PACS may take longer than dimse.dimse_timeout_s to be followed by one.
    While ``last_bytes`` (when the sub-operations' data was last read) is within that
    timeout, the wait goes on.
    """
    tally = _RetrieveTally()
    timeout = float(assoc.dimse_timeout or 0)
    while True:
        context_id, rsp = assoc.dimse.get_msg(block=True)
        if isinstance(rsp, C_STORE):  # an instance on a C-GET association
            assoc._c_store_scp(rsp)
            continue
        if (rsp is None and last_bytes is not None and timeout and assoc.is_established
                and time.monotonic() - last_bytes() < timeout):
            continue  # the PACS is still sending: not a missing response
        if rsp is None or not isinstance(rsp, (C_MOVE, C_GET)) or not rsp.is_valid_response:
            if rsp is None:
                # why there was none, before _handle_no_response aborts on a timeout
                tally.ended = ("aborted" if assoc.acse.is_aborted("a-abort") else
                               "closed" if assoc.acse.is_aborted("a-p-abort") else "timeout")
                assoc._handle_no_response()
            else:
                _log.warning("unexpected DIMSE message during a retrieval: abort",
                             message=type(rsp).__name__)
                assoc.abort()
            assoc._reactor_checkpoint.set()
            tally.status = None
            return tally
        status = int(rsp.Status or 0)
        tally.status = status
        tally.completed = int(rsp.NumberOfCompletedSuboperations or tally.completed)
        tally.failed = int(rsp.NumberOfFailedSuboperations or tally.failed)
        tally.warning = int(rsp.NumberOfWarningSuboperations or tally.warning)
        if status in _PENDING:
            continue
        assoc._reactor_checkpoint.set()
        for uid in _failed_uids(assoc, context_id, rsp):
            tally.failures.append(InstanceFailure(uid, status, "failed sub-operation"))
        return tally


def _failed_uids(assoc: Association, context_id: int | None, rsp: C_MOVE | C_GET) -> list[str]:
    """The Failed SOP Instance UID List of a final response's identifier, if any
    (PS3.4 C.4.2.1.4: present with Warning, Failure or Cancel, but not always)."""
    if rsp.Identifier is None or rsp.Status == Status.SUCCESS:
        return []
    syntax = next((cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                   if cx.context_id == context_id), ImplicitVRLittleEndian)
    try:
        identifier = decode(rsp.Identifier, syntax.is_implicit_VR, syntax.is_little_endian,
                            syntax.is_deflated)
        uids = identifier.get("FailedSOPInstanceUIDList") or []
    except Exception as exc:  # a broken identifier loses only the per-instance detail
        _log.warning("the retrieval's final identifier cannot be decoded", error=str(exc))
        return []
    return [str(u) for u in ([uids] if isinstance(uids, str) else uids) if u]


def _find_all(assoc: Association, ds: Dataset) -> list[Dataset]:
    """The matches of one C-FIND on ``assoc`` (those before a failure or no response)."""
    if not assoc.is_established:
        return []
    return [identifier for rsp, identifier in
            assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind)
            if rsp is not None and rsp.get("Status") in _PENDING and identifier is not None]


def _uids(value: Any) -> list[str]:
    """The valid UIDs of a single or multiple UI value (an odd answer is ignored)."""
    values = [] if value is None else [value] if isinstance(value, str) else list(value)
    return [str(v) for v in values if v and UID(str(v)).is_valid]


def _read_item(path: Path) -> _Item:
    try:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return _Item(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                     str(ds.file_meta.TransferSyntaxUID))
    except Exception as exc:  # any unreadable file fails only itself
        raise InvalidInput(f"{path.name} cannot be read as DICOM ({type(exc).__name__})") from exc


def _dataset_for(it: _Item, accepted: set[tuple[str, str]]) -> Dataset:
    """The dataset to send: as stored when its syntax was accepted, else decompressed."""
    ds = dcmread(it.path)
    if (it.sop_class_uid, it.transfer_syntax_uid) in accepted:
        return ds
    if any((it.sop_class_uid, ts) in accepted for ts in UNCOMPRESSED_TRANSFER_SYNTAXES):
        if UID(it.transfer_syntax_uid).is_compressed:
            try:
                ds.decompress()
            except Exception as exc:
                raise InvalidInput(
                    f"the peer accepts only uncompressed {it.sop_class_uid} and the "
                    f"instance cannot be decompressed ({type(exc).__name__})"
                ) from exc
        return ds
    raise InvalidInput(f"the peer accepted no presentation context for SOP class "
                       f"{it.sop_class_uid} in {it.transfer_syntax_uid} or uncompressed")


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    close_wakeup(assoc)


def _retrieve_status_meaning(status: int) -> str:
    """The words of a C-MOVE / C-GET final status (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
    if status in (0xA701, 0xA702):
        return " (out of resources)"
    if status == 0xA801:
        return " (move destination unknown: the PACS does not know the node's AE title)"
    if status == 0xA900:
        return " (identifier does not match SOP class)"
    if status == 0xB000:
        return " (some sub-operations failed)"
    if status == 0xFE00:
        return " (cancelled)"
    if 0xC000 <= status <= 0xCFFF:
        return " (unable to process)"
    return ""


def _status_text(op: str, status: int | None) -> str:
    return f"{op}: no final response" if status is None else f"{op} status 0x{status:04X}"


_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def _reject_text(rj: Any) -> str:
    result, source, reason = int(rj.result), int(rj.result_source), int(rj.diagnostic)
    return (f"{_RESULTS.get(result, result)}, {_SOURCES.get(source, source)}, "
            f"{_REASONS.get((source, reason), reason)}")


def _why_no_association(peer: Peer, ctx: ssl.SSLContext | None = None,
                        timeout_s: float = 3.0) -> str:
    """Why an association that was neither accepted nor rejected failed, found by
    opening a connection to the peer as the association did (with TLS when ``ctx`` is
    given): nothing listens, it does not answer, the TLS handshake fails and why, or it
    listens but is not speaking DICOM the node's way (a web server, TLS expected)."""
    if ctx is not None:
        # The same handshake, to get its own error; a plain connection to a TLS port
        # would only leave the peer a failed handshake of its own to log.
        problem = handshake_problem(ctx, peer.host, peer.port, timeout_s)
        if problem is not None:
            return problem
        return (f"the TLS handshake with {peer.host}:{peer.port} succeeds but the peer "
                f"aborted the association or did not answer as a DICOM node does")
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout_s):
            pass
    except ConnectionRefusedError:
        return f"connection refused (nothing listens on port {peer.port})"
    except TimeoutError:
        return f"no answer from {peer.host}:{peer.port} within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    return (f"port {peer.port} takes connections but the peer aborted the association "
            f"or did not answer as a DICOM node does (is it the DICOM port? it may be "
            f"another service or expects TLS)")
