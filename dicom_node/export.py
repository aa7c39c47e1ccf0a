"""Export: send a job's artifacts to its destinations, one pass at a time.

A destination is a DIMSE peer (C-STORE), a DICOMweb server (STOW-RS) or a
folder. DICOM artifacts go everywhere; other files (JSON, PNG, PDF) only to
folders. Each pass tries every destination still pending once; one that
failed with attempts left is tried again in a later pass, after its backoff,
with the job queued meanwhile (no worker waits for it). A destination that
keeps failing fails its export, never the node: the outcome says what
happened, and the job records it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node.config import DestinationSettings, Settings
from dicom_node.logs import get_logger
from dicom_node.scheduler import ExportOutcome, ExportProgress
from dicom_node.store import (
    EXPORT_FAILED,
    EXPORT_PENDING,
    EXPORT_RETRYING,
    EXPORT_SENDING,
    EXPORT_SUCCEEDED,
    ExportRecord,
)
from pipeline.types import Artifact

if TYPE_CHECKING:
    from dicom_node.dicomweb import DicomWebClient
    from dicom_node.scu import DicomClient

DICOM_MEDIA_TYPE = "application/dicom"

_log = get_logger("export")


@dataclass
class SendResult:
    """What one attempt at one destination achieved."""

    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    # The SOP Instance UIDs the destination acknowledged, where it names them (DIMSE,
    # STOW-RS): a later attempt does not send them again.
    sent_uids: list[str] = field(default_factory=list)
    # Whether the failures may pass on a later attempt (False: the peer refuses them).
    retryable: bool = True
    message: str = ""  # what went wrong, in the sender's words (else from ``failed``)


class Sender(Protocol):
    """Sends files to one kind of destination; raises on a connection-level failure."""

    def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult: ...


class AcknowledgingSender(Protocol):
    """A sender that names each object the destination acknowledges as it comes
    (``acknowledged``, called in the sending thread), so that a pass cut short by a
    crash does not send it again."""

    reports_acknowledged: bool

    def send(self, dest: DestinationSettings, files: list[Path],
             acknowledged: Callable[[str], None] | None = None) -> SendResult: ...


class FolderSender:
    """Copies files into a folder (atomically: temp name, fsync, rename).

    A file under ``base`` keeps its path relative to it (so a job's
    ``<job id>/<patient>/<patient>_sr.dcm`` stays apart from another job's files for the
    same patient); any other file goes to the folder's top by its name.
    """

    def __init__(self, resolve: Callable[[Path], Path], base: Path | None = None) -> None:
        self.resolve = resolve
        self.base = base

    def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult:
        assert dest.path is not None
        root = self.resolve(dest.path)
        root.mkdir(parents=True, exist_ok=True)
        result = SendResult()
        for src in files:
            target = root / _relative(src, self.base)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".export-", suffix=".part")
            except OSError as exc:
                result.failed.append((src, str(exc)))
                continue
            try:
                with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                    shutil.copyfileobj(inp, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
                result.sent += 1
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                result.failed.append((src, str(exc)))
        return result


def _relative(src: Path, base: Path | None) -> Path:
    """``src`` relative to ``base`` when it lies under it (never with ``..``), else its name."""
    if base is not None:
        try:
            rel = src.resolve().relative_to(base.resolve())
        except ValueError:
            pass
        else:
            if rel.parts and ".." not in rel.parts:
                return rel
    return Path(src.name)


def dicomweb_client(dest: DestinationSettings) -> DicomWebClient:
    """A DICOMweb client for a destination, with its Basic or Bearer credentials."""
    from dicom_node.dicomweb import BasicAuth, BearerAuth, DicomWebAuth, DicomWebClient

    assert dest.url is not None
    auth: DicomWebAuth = None
    if dest.auth == "basic" and dest.credentials:
        user, _, password = dest.credentials.partition(":")
        auth = BasicAuth(user, password)
    elif dest.auth == "bearer" and dest.credentials:
        auth = BearerAuth(dest.credentials)
    return DicomWebClient(dest.url, auth, retries=1)


class DicomWebSender:
    """STOW-RS to a DICOMweb server (Basic or Bearer credentials from the destination)."""

    def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult:
        with dicomweb_client(dest) as client:
            stored = client.store(files)
        return SendResult(
            sent=len(stored.referenced), sent_uids=list(stored.referenced),
            failed=[(Path(f.path) if f.path else Path(f.sop_uid or "?"), f.reason)
                    for f in stored.failed],
        )


class DimseSender:
    """C-STORE with the node's DICOM client: one association a send.

    The client retries an instance the peer could not take in that association; a
    destination that cannot be reached now is the next export pass's to try again.
    """

    reports_acknowledged = True

    def __init__(self, client: DicomClient, cancelled: threading.Event | None = None) -> None:
        self.client = client
        self.cancelled = cancelled

    def send(self, dest: DestinationSettings, files: list[Path],
             acknowledged: Callable[[str], None] | None = None) -> SendResult:
        result = self.client.export(dest, files, attempts=1, cancelled=self.cancelled,
                                    acknowledged=acknowledged)
        if result.ok:
            return SendResult(sent=len(result.sent), sent_uids=list(result.sent))
        return SendResult(sent=len(result.sent), sent_uids=list(result.sent),
                          failed=[(Path(f.sop_instance_uid), f.message) for f in result.failures],
                          retryable=result.retryable, message=result.message)


class Exporter:
    """Routes artifacts to destinations by name: one export pass.

    A pass tries each destination that has not yet got the results once. A destination
    that failed with attempts left (its ``retry`` settings) gets an outcome with
    ``retry_in_s``: the scheduler queues the job again for then, releasing the worker,
    and the next pass sends to the destinations still pending only.
    """

    def __init__(self, settings: Settings, senders: dict[str, Sender] | None = None,
                 base: Path | None = None, log: Any = None) -> None:
        """``base``: a folder destination gets each artifact under it at its path
        relative to it (the layout of the results), any other by its name."""
        self.settings = settings
        self.senders: dict[str, Sender] = {"folder": FolderSender(settings.path, base),
                                           "dicomweb": DicomWebSender()}
        self.senders.update(senders or {})
        self.log = log if log is not None else _log

    def export(self, names: list[str], artifacts: list[Artifact],
               cancelled: threading.Event | None = None,
               extra: list[DestinationSettings] | None = None,
               earlier: Mapping[str, ExportRecord] | None = None,
               on_outcome: Callable[[ExportOutcome], None] | None = None,
               on_progress: Callable[[ExportProgress], None] | None = None,
               ) -> list[ExportOutcome]:
        """One pass: send ``artifacts`` to each named destination (and ``extra`` ad-hoc
        ones) that the job's ``earlier`` passes did not settle.

        A destination ``earlier`` records as succeeded is never sent to again, nor one it
        records as failed for good; their outcomes come back with ``recorded`` set. A
        cancel stops the pass before the next object and between destinations (the
        outcomes so far come back; a destination it cut short has none, its progress
        says what it acknowledged).

        ``on_outcome`` gets each destination's outcome as soon as it is known, before the
        next destination is tried (the job records it then: a crash later in the pass
        must not send it again); ``on_progress`` where each destination stands meanwhile
        (``pending`` at the start of the pass, ``sending`` with the objects it has
        acknowledged so far). Both are called in the pass's thread.
        """
        earlier = earlier or {}
        settled = {n: r for n, r in earlier.items()
                   if r.state in (EXPORT_SUCCEEDED, EXPORT_FAILED)}
        by_name = {d.name: d for d in self.settings.destinations}
        outcomes: list[ExportOutcome] = []
        targets: list[DestinationSettings] = []

        def settle(outcome: ExportOutcome) -> None:
            outcomes.append(outcome)
            if on_outcome is not None and not outcome.recorded:
                on_outcome(outcome)

        for name in dict.fromkeys(names):  # keep order, drop repeats
            dest = by_name.get(name)
            if name in settled:
                outcomes.append(_recorded(settled[name]))
            elif dest is None:
                settle(ExportOutcome(name, ok=False, attempts=0,
                                     message="no such destination is configured"))
            else:
                targets.append(dest)
        for dest in extra or []:
            if dest.name in settled:
                outcomes.append(_recorded(settled[dest.name]))
            else:
                targets.append(dest)
        if on_progress is not None:  # a polling client sees every destination at once
            for dest in targets:
                if dest.name not in earlier:
                    on_progress(ExportProgress(dest.name, EXPORT_PENDING))
        for dest in targets:
            if cancelled is not None and cancelled.is_set():
                self.log.info("export stopped: the job was cancelled", destination=dest.name)
                break
            before = earlier.get(dest.name)
            attempt = (before.attempts if before is not None else 0) + 1
            acknowledged = before.acknowledged if before is not None else frozenset()
            outcome = self._one(dest, artifacts, attempt, acknowledged, cancelled,
                                on_progress)
            if outcome is None:  # cut short by a cancel: its progress is recorded
                break
            settle(outcome)
        return outcomes

    def _one(self, dest: DestinationSettings, artifacts: list[Artifact], attempt: int,
             acknowledged: frozenset[str] = frozenset(),
             cancelled: threading.Event | None = None,
             on_progress: Callable[[ExportProgress], None] | None = None,
             ) -> ExportOutcome | None:
        """Attempt number ``attempt`` at ``dest``: one send, of the artifacts whose SOP
        Instance UID is not among those it ``acknowledged`` in earlier passes. None when
        a cancel cut it short (what it acknowledged went to ``on_progress``)."""
        chosen = [a for a in artifacts
                  if dest.type == "folder" or a.media_type == DICOM_MEDIA_TYPE]
        if not chosen:
            return ExportOutcome(dest.name, ok=True, attempts=0, sent=0,
                                 message="nothing to send to this kind of destination")
        sender = self.senders.get(dest.type)
        if sender is None:
            return ExportOutcome(dest.name, ok=False, attempts=0,
                                 message=f"{dest.type} export is not available in this build")
        # What the destination already has (of these results: a run that made new ones
        # made new UIDs) is not sent again. A folder is written whole each time.
        has = frozenset() if dest.type == "folder" else frozenset(
            a.sop_instance_uid for a in chosen
            if a.sop_instance_uid is not None and a.sop_instance_uid in acknowledged)
        files = [a.path for a in chosen if a.sop_instance_uid not in has]
        already = len(chosen) - len(files)
        earlier = f"{already} already sent, " if already else ""
        if not files:  # everything acknowledged; the pass that saw it did not record it
            self.log.info("export done", destination=dest.name, already_sent=already,
                          sent=0, attempt=attempt)
            return ExportOutcome(dest.name, ok=True, attempts=attempt, sent=already,
                                 message=f"{earlier}0 sent now")
        progress = _Progress(dest.name, attempt - 1, has, on_progress)
        progress.report(EXPORT_SENDING)
        retryable = True
        try:
            if getattr(sender, "reports_acknowledged", False):
                acking: AcknowledgingSender = sender  # type: ignore[assignment]
                result = acking.send(dest, files, acknowledged=progress.acknowledged)
            else:
                result = sender.send(dest, files)
        except Exception as exc:  # connection refused, association rejected, timeout
            message = str(exc) or type(exc).__name__
            sent = 0
            now: frozenset[str] = frozenset(progress.acked)
        else:
            sent = result.sent
            now = frozenset(result.sent_uids) | progress.acked
            if not result.failed:
                self.log.info("export done", destination=dest.name, already_sent=already,
                              sent=sent, attempt=attempt)
                return ExportOutcome(dest.name, ok=True, attempts=attempt, sent=already + sent,
                                     message=f"{earlier}{sent} sent now" if already else None)
            retryable = result.retryable
            message = result.message or "; ".join(
                f"{p.name}: {why}" for p, why in result.failed[:5])
        has |= now
        if cancelled is not None and cancelled.is_set():
            # Stopped before it was done (`jobs cancel`, a stopping node): not an attempt
            # that failed; what it acknowledged is kept for the next pass.
            self.log.info("export stopped: the job was cancelled", destination=dest.name,
                          already_sent=already, sent=sent)
            if on_progress is not None:
                on_progress(ExportProgress(
                    dest.name, EXPORT_RETRYING, attempt - 1, already + sent,
                    f"stopped before it was done: {earlier}{sent} sent now", has))
            return None
        if already or sent:
            message = f"{earlier}{sent} sent now: {message}"
        limit = dest.retry.max_attempts
        if retryable and attempt < limit:
            delay = dest.retry.delay_after(attempt)
            self.log.warning("export attempt failed; will retry", destination=dest.name,
                             attempt=attempt, max_attempts=limit, retry_in_s=delay,
                             already_sent=already, sent=sent, error=message)
            return ExportOutcome(dest.name, ok=False, attempts=attempt, sent=already + sent,
                                 message=f"{message} (attempt {attempt} of {limit})",
                                 retry_in_s=delay, acknowledged=has)
        self.log.error("export failed", destination=dest.name, attempts=attempt,
                       already_sent=already, sent=sent, error=message)
        return ExportOutcome(dest.name, ok=False, attempts=attempt, sent=already + sent,
                             message=f"{message} (after {attempt} attempts)",
                             acknowledged=has)


class _Progress:
    """A destination's progress in a pass: each object it acknowledges is recorded as
    the answer comes. Batches left the last answers unrecorded while the next object
    waited on a slow peer, the moment a crash is likely: they were sent again. A pass
    sends a job's few result objects, so a write per answer costs little."""

    def __init__(self, destination: str, attempts: int, had: frozenset[str],
                 report: Callable[[ExportProgress], None] | None) -> None:
        self.destination = destination
        self.attempts = attempts  # finished attempts: the one under way is not counted
        self.had = had
        self.acked: set[str] = set()
        self._report = report

    def report(self, state: str) -> None:
        if self._report is None:
            return
        try:
            self._report(ExportProgress(self.destination, state, self.attempts,
                                        len(self.had) + len(self.acked), None,
                                        self.had | self.acked))
        except Exception as exc:  # progress only; the outcome is recorded in any case
            _log.warning("cannot record an export's progress", destination=self.destination,
                         error=f"{type(exc).__name__}: {exc}")

    def acknowledged(self, sop_instance_uid: str) -> None:
        self.acked.add(sop_instance_uid)
        self.report(EXPORT_SENDING)


def _recorded(record: ExportRecord) -> ExportOutcome:
    """The outcome an earlier pass recorded for a destination this pass leaves alone."""
    return ExportOutcome(record.destination, ok=record.state == EXPORT_SUCCEEDED,
                         attempts=record.attempts, sent=record.sent, message=record.message,
                         recorded=True)
