"""Export: send a job's artifacts to its destinations, with retries and backoff.

A destination is a DIMSE peer (C-STORE), a DICOMweb server (STOW-RS) or a
folder. DICOM artifacts go everywhere; other files (JSON, PNG, PDF) only to
folders. A destination that keeps failing fails its export, never the node:
the outcome says what happened, and the job records it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from dicom_node.config import DestinationSettings, Settings
from dicom_node.logs import get_logger
from dicom_node.scheduler import ExportOutcome
from pipeline.types import Artifact

if TYPE_CHECKING:
    from dicom_node.dicomweb import DicomWebClient

DICOM_MEDIA_TYPE = "application/dicom"

log = get_logger("export")


@dataclass
class SendResult:
    """What one attempt at one destination achieved."""

    sent: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


class Sender(Protocol):
    """Sends files to one kind of destination; raises on a connection-level failure."""

    def send(self, dest: DestinationSettings, files: list[Path]) -> SendResult: ...


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
            sent=len(stored.referenced),
            failed=[(Path(f.path) if f.path else Path(f.sop_uid or "?"), f.reason)
                    for f in stored.failed],
        )


class Exporter:
    """Routes artifacts to destinations by name and retries each with backoff."""

    def __init__(self, settings: Settings, senders: dict[str, Sender] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 dimse: Callable[[DestinationSettings, list[Path]], ExportOutcome] | None = None,
                 base: Path | None = None) -> None:
        """``base``: a folder destination gets each artifact under it at its path
        relative to it (the layout of the results), any other by its name."""
        self.settings = settings
        self.senders: dict[str, Sender] = {"folder": FolderSender(settings.path, base),
                                           "dicomweb": DicomWebSender()}
        self.senders.update(senders or {})
        self.sleep = sleep
        # The DIMSE client retries per instance within its own associations.
        self.dimse = dimse

    def export(self, names: list[str], artifacts: list[Artifact],
               cancelled: threading.Event | None = None,
               extra: list[DestinationSettings] | None = None) -> list[ExportOutcome]:
        """Send ``artifacts`` to each named destination (and ``extra`` ad-hoc ones)."""
        by_name = {d.name: d for d in self.settings.destinations}
        outcomes: list[ExportOutcome] = []
        targets: list[DestinationSettings] = []
        for name in dict.fromkeys(names):  # keep order, drop repeats
            dest = by_name.get(name)
            if dest is None:
                outcomes.append(ExportOutcome(name, ok=False, attempts=0,
                                              message="no such destination is configured"))
            else:
                targets.append(dest)
        targets += extra or []
        for dest in targets:
            outcomes.append(self._one(dest, artifacts, cancelled))
        return outcomes

    def _one(self, dest: DestinationSettings, artifacts: list[Artifact],
             cancelled: threading.Event | None) -> ExportOutcome:
        files = [a.path for a in artifacts
                 if dest.type == "folder" or a.media_type == DICOM_MEDIA_TYPE]
        if not files:
            return ExportOutcome(dest.name, ok=True, attempts=0, sent=0,
                                 message="nothing to send to this kind of destination")
        if dest.type == "dimse" and self.dimse is not None and "dimse" not in self.senders:
            return self.dimse(dest, files)
        sender = self.senders.get(dest.type)
        if sender is None:
            return ExportOutcome(dest.name, ok=False, attempts=0,
                                 message=f"{dest.type} export is not available in this build")
        retry = dest.retry
        pending = list(files)
        sent = 0
        message = ""
        for attempt in range(1, retry.max_attempts + 1):
            try:
                result = sender.send(dest, pending)
            except Exception as exc:  # connection refused, association rejected, timeout
                message = str(exc) or type(exc).__name__
                result = None
            if result is not None:
                sent += result.sent
                if not result.failed:
                    log.info("export done", destination=dest.name, sent=sent, attempts=attempt)
                    return ExportOutcome(dest.name, ok=True, attempts=attempt, sent=sent)
                pending = [p for p, _ in result.failed]
                message = "; ".join(f"{p.name}: {why}" for p, why in result.failed[:5])
            if attempt < retry.max_attempts and not (cancelled and cancelled.is_set()):
                delay = min(retry.backoff_s * 2 ** (attempt - 1), retry.backoff_max_s)
                log.warning("export attempt failed; will retry", destination=dest.name,
                            attempt=attempt, retry_in_s=delay, error=message)
                self.sleep(delay)
            else:
                break
        log.error("export failed", destination=dest.name, error=message)
        return ExportOutcome(dest.name, ok=False, attempts=attempt, sent=sent,
                             message=f"{message} (after {attempt} attempts)")
