"""The Storage SCP: C-ECHO and C-STORE on several called AE titles, with an accept policy.

Instances are written exactly as received (pynetdicom's chunked receive mode
streams each dataset to a file; we never decode and re-encode it), fsynced,
renamed to ``<studies_dir>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm`` and recorded
in the store *before* Success is answered. The handler stays thin: write,
record, answer. Grouping into jobs happens on the asyncio loop (the
assembler), reached through the ``on_instance`` / ``on_association_end``
callbacks, which must be thread-safe.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
import functools
import os
import queue
import select
import shutil
import socket
import ssl
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
    register_uid,
    uid_to_service_class,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import command_set, file_meta, spool
from dicom_node.config import (
    AETitleSettings,
    DuplicatePolicy,
    Settings,
    TlsSettings,
    is_uid,
)
from dicom_node.dimse_status import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    REJECT_NO_SPACE,
    Rejection,
    Status,
)
from dicom_node.disk import short_of_space
from dicom_node.errors import InvalidInput, StoreError
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.logs import get_logger
from dicom_node.store import InstanceRecord, Store
from dicom_node.tls import server_context

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "VERIFICATION_TRANSFER_SYNTAXES",
    "AssociationEnd",
    "DimseCounters",
    "InstanceWriter",
    "ReceivedInstance",
    "RetrievedBatch",
    "StorageSCP",
    "close_wakeup",
    "safe_uid",
    "storage_sop_classes",
    "tune_socket",
]

# Stream every received dataset to a file instead of memory: raw, bounded memory.
_config.STORE_RECV_CHUNKED_DATASET = True
command_set.install()  # what the node sends: C-STORE responses direct, the rest encoded once
file_meta.install()  # the file meta in front of each received dataset, encoded directly


def _decodable_ae(value: str) -> tuple[bool, str]:
    """pynetdicom's AE check, used while *decoding* a peer's A-ASSOCIATE-RQ: an AE title
    with odd bytes (non-ASCII, control characters, a backslash) made pynetdicom abort the
    association mid-decode. Let it through there: the accept policy then rejects it as
    "called AE title not recognised", which the peer's log can show. Our own AE titles
    are checked when the configuration is loaded."""
    return (True, "") if len(value) <= 16 else (False, "must not exceed 16 characters")


_config.VALIDATORS["AE"] = _decodable_ae

# In the node's order of preference: when a sender offers several in one presentation
# context, the first here that it offers is accepted. Explicit VR before implicit (a
# private element keeps its VR), and lossless before lossy: a sender that could send an
# image either way never has to compress it lossily for us.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless (what cloud archives store and send)
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]
VERIFICATION_TRANSFER_SYNTAXES = ACCEPTED_TRANSFER_SYNTAXES[:4]  # the uncompressed ones

# Retired storage classes that old devices still send (ultrasound and nuclear medicine
# from before 1996, trial SR, standalone curves and LUTs). pynetdicom leaves them out;
# dcmtk's storescp and Orthanc accept them, and so does the node.
RETIRED_STORAGE_CLASSES = [
    "1.2.840.10008.5.1.1.27",  # Stored Print Storage
    "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image Storage
    "1.2.840.10008.5.1.1.30",  # Hardcopy Color Image Storage
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.8",  # Standalone Overlay Storage
    "1.2.840.10008.5.1.4.1.1.9",  # Standalone Curve Storage
    "1.2.840.10008.5.1.4.1.1.9.1",  # Waveform Storage - Trial
    "1.2.840.10008.5.1.4.1.1.10",  # Standalone Modality LUT Storage
    "1.2.840.10008.5.1.4.1.1.11",  # Standalone VOI LUT Storage
    "1.2.840.10008.5.1.4.1.1.12.3",  # X-Ray Angiographic Bi-Plane Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.77.2",  # VL Multi-frame Image Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.1",  # Text SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.2",  # Audio SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.3",  # Detail SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.88.4",  # Comprehensive SR Storage - Trial
    "1.2.840.10008.5.1.4.1.1.129",  # Standalone PET Curve Storage
    "1.2.840.10008.5.1.4.34.1",  # RT Beams Delivery Instruction Storage - Trial
]


def storage_sop_classes() -> list[str]:
    """Every storage SOP class the listener accepts unless an AE title narrows it."""
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
            ] + RETIRED_STORAGE_CLASSES

_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "Modality", "AccessionNumber", "StudyDate",
]


def safe_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID usable in a path: digits and dots, at most 64 characters.

    Raises :class:`InvalidInput` naming the attribute otherwise, so that nothing is
    ever written outside the studies directory (``..``, ``/`` cannot pass).
    """
    text = str(value or "").strip().rstrip("\x00").strip()
    if not text:
        raise InvalidInput(f"{name} is missing")
    if not is_uid(text):
        raise InvalidInput(f"{name} is not a valid UID")
    return text


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance stored and recorded; what the assembler and retrieval callers see."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    called_ae: str
    calling_ae: str
    association_id: int
    stored: bool = True  # False: a duplicate kept as it was (keep_first)
    # The header the writer read (values over 4 KiB left unread, ``filename`` the stored
    # path), when asked to keep it: a retrieval's job then never reads the file for it.
    header: Dataset | None = field(default=None, compare=False, repr=False)
    # Placed but not yet in the store (``write(record=False)``): what
    # :meth:`InstanceWriter.record` records, with others, in one transaction.
    unrecorded: InstanceRecord | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AssociationEnd:
    """An association ended; ``released`` is False when it was aborted."""

    association_id: int
    called_ae: str
    calling_ae: str
    released: bool


@dataclass(frozen=True)
class DimseCounters:
    """What the listener has done since it started (a snapshot, for metrics).

    ``associations`` counts by outcome (``accepted``, ``rejected``, ``released``,
    ``aborted``); ``c_store`` counts C-STORE responses by status (``0x0000``...);
    ``instances_stored`` counts instances written (duplicates kept as they were
    are not); ``active`` is the number of associations open now.
    """

    associations: dict[str, int]
    c_echo: int
    c_store: dict[str, int]
    instances_stored: int
    active: int


@dataclass
class _Peer:
    called_ae: str
    calling_ae: str
    address: str
    port: int
    instances: int = 0
    echoes: int = 0
    out_of_space: int = 0  # instances refused under storage.min_free_mb (logged once)


@dataclass
class ParsedInstance:
    """A received file's header, read and checked by :meth:`InstanceWriter.read`."""

    source_path: Path
    ds: Any  # the header (values over 4 KiB unread); dropped once placed
    elems: dict[str, Any]
    meta_ts: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str


class InstanceWriter:
    """Writes a received instance durably and records it; shared by the SCP and C-GET."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.studies_dir = settings.studies_dir.resolve()
        self.log = get_logger("dimse.store")

    def write(
        self,
        source_path: Path,
        *,
        called_ae: str,
        calling_ae: str,
        association_id: int,
        source: str = "dimse",
        duplicates: DuplicatePolicy = DuplicatePolicy.OVERWRITE,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        durable: bool = True,
        keep_header: bool = False,
        record: bool = True,
    ) -> ReceivedInstance:
        """Move the DICOM file at ``source_path`` into the studies dir and record it.

        ``source_path`` is consumed (renamed or copied then left for its owner to delete).
        ``durable=False`` skips the fsyncs: only for instances fetched by a retrieval,
        which a crash makes the job fetch again (the PACS still holds them), never for
        instances a sender considers delivered once we answer. ``keep_header`` returns
        the header read (``ReceivedInstance.header``) instead of dropping it.
        ``record=False`` (with ``DuplicatePolicy.OVERWRITE`` only) places the file but
        leaves its store record to :meth:`record` (retrievals: one commit for the lot).
        Raises :class:`InvalidInput` when the file or its UIDs cannot be read (0xC210) or
        do not match the request (0xA900 via ``ValueError``), :class:`OSError` or
        :class:`StoreError` when it cannot be kept (0xA700).
        """
        parsed = self.read(source_path, expected_sop_class=expected_sop_class,
                           expected_sop_instance=expected_sop_instance)
        return self.keep(parsed, called_ae=called_ae, calling_ae=calling_ae,
                         association_id=association_id, source=source,
                         duplicates=duplicates, durable=durable, keep_header=keep_header,
                         record=record)

    def read(self, source_path: Path, *, expected_sop_class: str | None = None,
             expected_sop_instance: str | None = None) -> ParsedInstance:
        """The first half of :meth:`write`: read the header of the file at
        ``source_path`` and check it (what the SCP needs to decide where the instance
        goes: a retrieval or an ordinary push). Raises as :meth:`write` does."""
        try:
            # Every element header is parsed (that is what catches a truncated dataset),
            # but values over 4 KiB (the pixels) are skipped, not read: their declared
            # extent is checked against the file's size instead.
            ds = dcmread(source_path, force=False, defer_size=_DEFER_BYTES)
            meta_ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
            deflated = meta_ts == DeflatedExplicitVRLittleEndian
            if deflated:
                # offsets are into the inflated stream: nothing to compare with the file
                ds = dcmread(source_path, force=False)
            _check_encoding(ds, meta_ts)
            _check_complete(ds, None if deflated else os.stat(source_path).st_size)
            elems = {t: ds.get(t) for t in _TAGS}
        except InvalidInput:
            raise  # already says what is wrong (a truncated element)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
                NotImplementedError) as exc:
            raise InvalidInput(f"the dataset cannot be read ({type(exc).__name__})") from exc
        except Exception as exc:  # pydicom raises many shapes on corrupt input
            raise InvalidInput(f"the dataset cannot be read ({type(exc).__name__})") from exc
        sop = safe_uid(elems["SOPInstanceUID"], "SOPInstanceUID")
        sop_class = safe_uid(elems["SOPClassUID"], "SOPClassUID")
        study = safe_uid(elems["StudyInstanceUID"], "StudyInstanceUID")
        series = safe_uid(elems["SeriesInstanceUID"], "SeriesInstanceUID")
        if expected_sop_instance and sop != expected_sop_instance.strip():
            raise _Mismatch("SOPInstanceUID differs from the request's Affected SOP Instance UID")
        if expected_sop_class and sop_class != expected_sop_class.strip():
            raise _Mismatch("SOPClassUID differs from the request's Affected SOP Class UID")
        return ParsedInstance(source_path, ds, elems, meta_ts, sop, sop_class, study, series)

    def keep(
        self,
        parsed: ParsedInstance,
        *,
        called_ae: str,
        calling_ae: str,
        association_id: int,
        source: str = "dimse",
        duplicates: DuplicatePolicy = DuplicatePolicy.OVERWRITE,
        durable: bool = True,
        keep_header: bool = False,
        record: bool = True,
    ) -> ReceivedInstance:
        """The second half of :meth:`write`: place and record an instance :meth:`read`
        read. Raises :class:`OSError` or :class:`StoreError` when it cannot be kept."""
        if not record and duplicates is not DuplicatePolicy.OVERWRITE:
            raise ValueError("write(record=False) takes DuplicatePolicy.OVERWRITE only")
        source_path, elems, meta_ts = parsed.source_path, parsed.elems, parsed.meta_ts
        sop, sop_class = parsed.sop_instance_uid, parsed.sop_class_uid
        study, series = parsed.study_instance_uid, parsed.series_instance_uid
        header = parsed.ds if keep_header else None
        parsed.ds = None  # the pixels' file handle goes with it

        final = self.studies_dir / study / series / f"{sop}.dcm"
        overwrite = duplicates is DuplicatePolicy.OVERWRITE
        if duplicates is DuplicatePolicy.KEEP_FIRST:
            known = self.store.get_instance(sop)
            if known is not None and _intact(Path(known.path), known.size_bytes):
                return ReceivedInstance(sop, sop_class, study, series, Path(known.path),
                                        called_ae, calling_ae, association_id, stored=False)
            overwrite = known is not None  # the first copy did not survive: this replaces it
        new_file = record and not final.exists()
        size = _place(source_path, final, durable=durable)
        record_row = InstanceRecord(
            sop_instance_uid=sop, sop_class_uid=sop_class, study_instance_uid=study,
            series_instance_uid=series, path=final, size_bytes=size, source=source,
            patient_id=_text(elems["PatientID"], 64), modality=_text(elems["Modality"], 16),
            transfer_syntax_uid=meta_ts, called_ae=called_ae, calling_ae=calling_ae,
            accession_number=_text(elems["AccessionNumber"], 64),
            study_date=_text(elems["StudyDate"], 8),
        )
        if record:
            replaced: list[str] = []
            try:
                self.store.record_instance(record_row, overwrite=overwrite, durable=durable,
                                           replaced=replaced)
            except SQLAlchemyError as exc:
                if new_file:  # not acknowledged, in no record: nothing would ever find it
                    with contextlib.suppress(OSError):
                        final.unlink()
                raise StoreError(f"cannot record the instance: {type(exc).__name__}") from exc
            self.discard_replaced(replaced, durable=durable)
        if header is not None:
            header.filename = str(final)
        return ReceivedInstance(sop, sop_class, study, series, final, called_ae, calling_ae,
                                association_id, header=header,
                                unrecorded=None if record else record_row)

    def record(self, received: Sequence[ReceivedInstance], *, durable: bool = True) -> None:
        """Record instances placed by ``write(record=False)``, in one transaction.

        Raises:
            StoreError: when the store cannot record them (none is recorded then).
        """
        rows = [r.unrecorded for r in received if r.unrecorded is not None]
        replaced: list[str] = []
        try:
            self.store.record_instances(rows, durable=durable, replaced=replaced)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot record the instances: {type(exc).__name__}") from exc
        self.discard_replaced(replaced, durable=durable)

    def discard_replaced(self, paths: Sequence[str], *, durable: bool = True) -> None:
        """Delete the files of instances that an overwrite moved to another study or
        series (the store no longer names them), and the folders left empty."""
        for name in paths:
            old = Path(name)
            if not old.is_relative_to(self.studies_dir):
                continue  # not ours to delete
            try:
                old.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # a leftover file, not a wrong answer
                self.log.warning("cannot delete a replaced instance's old file",
                                 error=str(exc))
                continue
            folder = old.parent
            if durable:
                fsync_dir(folder)  # the deletion survives a power cut
            while folder != self.studies_dir and folder.is_relative_to(self.studies_dir):
                try:
                    folder.rmdir()  # only when empty: series, then study
                except OSError:
                    break
                folder = folder.parent


class RetrievedBatch:
    """The instances one retrieval placed with ``write(record=False)``, recorded together
    (one commit) when it ends; one whose C-STORE finishes after the end records itself.
    Thread-safe: C-STOREs arrive on the association's thread."""

    def __init__(self, writer: InstanceWriter) -> None:
        self.writer = writer
        self._received: list[ReceivedInstance] = []
        self._lock = threading.Lock()
        self._ended = False

    def add(self, got: ReceivedInstance) -> None:
        """Raises StoreError when a late instance cannot be recorded."""
        with self._lock:
            if not self._ended:
                self._received.append(got)
                return
        self.writer.record([got], durable=False)  # its retrieval ended meanwhile

    def end(self) -> list[ReceivedInstance]:
        """Record what arrived (once; later calls record nothing) and return it.

        Raises:
            StoreError: when the store cannot record them.
        """
        with self._lock:
            first, self._ended = not self._ended, True
            got = list(self._received)
        if first:
            self.writer.record(got, durable=False)
        return got


_DEFER_BYTES = 4096


def _check_complete(ds: Any, file_size: int | None) -> None:
    """Raise when an element's value is shorter than its declared length (a truncated send).

    pydicom reads a short final value without complaint, and skips a deferred one by
    seeking; the raw elements still carry the declared length (and, when deferred, the
    value's offset), so a dataset cut off mid-value shows as a read value shorter than
    its length or a skipped one that ends past the end of the file. ``file_size`` None
    (a deflated dataset, read whole: its offsets are into the inflated stream, and an
    empty element's ended past the compressed file's end) skips that comparison.
    """
    for elem in ds.values():  # raw, not yet converted: cheap
        length = getattr(elem, "length", None)
        if length is None or length == 0xFFFFFFFF:
            continue
        value = getattr(elem, "value", None)
        if isinstance(value, bytes) and len(value) != length:
            raise InvalidInput(f"the dataset is truncated in element {elem.tag}")
        tell = getattr(elem, "value_tell", None)
        if (value is None and tell is not None and file_size is not None
                and tell + length > file_size):
            raise InvalidInput(f"the dataset is truncated in element {elem.tag}")


def _check_encoding(ds: Any, meta_ts: str) -> None:
    """Raise when the dataset is not encoded as the transfer syntax it came in says.

    A sender that encodes explicit VR on a presentation context negotiated for implicit
    VR (or the reverse) sends a dataset no reader can take as its file meta says: pydicom
    guesses the VR from the first element's bytes and only warns, so it was stored as it
    came and answered Success (dcmdump cannot read it). What pydicom guessed is kept in
    the raw elements of the header already read (``is_implicit_VR``; the dataset's
    ``original_encoding`` says the transfer syntax's): comparing costs nothing more.
    """
    try:
        syntax = UID(meta_ts)
        expected = syntax.is_implicit_VR if syntax.is_transfer_syntax else None
    except ValueError:
        expected = None
    found = None
    for elem in ds.values():  # the first one is enough: pydicom guessed once for all
        found = getattr(elem, "is_implicit_VR", None)  # raw, not yet converted
        break
    if expected is None or found is None or found == expected:
        return
    said, is_ = ("implicit", "explicit") if expected else ("explicit", "implicit")
    raise InvalidInput(f"the dataset is encoded with {is_} VR, but its transfer syntax "
                       f"({meta_ts}) is {said} VR")


def _intact(path: Path, size: int) -> bool:
    """Whether a kept instance's file is still there at the size it was recorded with (a
    crash after an unsynced write, as for retrievals, can leave it empty)."""
    try:
        return path.stat().st_size == size
    except OSError:
        return False


class _Mismatch(InvalidInput):
    """The dataset does not match the C-STORE request (0xA900)."""


def _text(value: Any, limit: int) -> str:
    return str(value or "")[:limit]


def _place(source: Path, final: Path, *, durable: bool = True) -> int:
    """Durably move ``source`` to ``final``: fsync the data, rename, fsync the directory.

    Without ``durable`` the same moves happen without the fsyncs.
    """
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    if not durable:
        size = os.stat(source).st_size
        try:
            os.replace(source, final)
        except OSError:  # another filesystem
            shutil.copyfile(source, final)
        return size
    fd = os.open(source, os.O_RDONLY)
    try:
        os.fsync(fd)  # the writer flushed to the OS; make it reach the disk
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    try:
        os.replace(source, final)
    except OSError:
        # Another filesystem (the temp dir): copy to a temporary name beside the target.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the rename itself must survive a power cut
    finally:
        os.close(dfd)
    return size


def fsync_dir(folder: Path) -> None:
    """Make the renames and deletions in ``folder`` reach the disk (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _Wakeup:
    """An eventfd that wakes a DUL thread waiting on its socket when a primitive is
    queued for it to send (see :class:`_TunedSocket`).

    Set from any thread; waited on and cleared by the DUL thread only. Closed by the
    DUL thread when its connection closes, or when the last reference goes; ``set``
    after that does nothing (the lock keeps it from writing to a reused fd number).
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._close = weakref.finalize(self, os.close, self.fd)

    def set(self) -> None:
        with self._lock:
            if self._close.alive:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        with contextlib.suppress(OSError):  # EAGAIN: already cleared
            os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            self._close()


class _SignallingQueue(queue.Queue[Any]):
    """One of a DUL's queues that also signals a waiting thread on every put: its send
    queue sets the DUL thread's :class:`_Wakeup`, its queue to the user (release and
    abort requests, the peer's A-ABORT) wakes the association thread."""

    on_put: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.on_put()


def _signal_on_put(q: queue.Queue[Any], on_put: Callable[[], None]) -> None:
    q.__class__ = _SignallingQueue
    cast(_SignallingQueue, q).on_put = on_put


def _notify_all(condition: threading.Condition) -> None:
    with condition:
        condition.notify_all()


class _TunedSocket(AssociationSocket):
    """pynetdicom's association socket, tuned for receiving large datasets.

    pynetdicom 3.0 reads a PDU 4 KiB at a time into a growing bytearray, and its DUL
    thread polls the socket with a zero timeout then sleeps 1 ms, so every C-STORE
    waits up to a millisecond for the thread to notice the data (or our response).
    Here ``recv`` fills one preallocated buffer, and ``ready`` waits in ``poll`` on the
    socket and on a :class:`_Wakeup` that the DUL's send queue sets, so the thread
    sleeps until the peer sends or we have something to send, whichever comes first,
    instead of spinning (the spinning thread took the interpreter lock from the one
    handling the message thousands of times a second). Without eventfd (not Linux) it
    polls: 0.2 ms while the peer is busy, 1 ms when idle. Only the class of each
    association's socket changes (see :func:`tune_socket`), nothing global.
    """

    _busy_until: float = 0.0
    last_recv: float = 0.0  # time.monotonic() of the last bytes read (a retrieval's wait)
    _wakeup: _Wakeup | None = None
    _poller: Any = None  # select.poll, registered on first use by the DUL thread

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        idle = None
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:  # connection closed: return what we have, as pynetdicom does
                del view
                return buf[:got]
            got += n
            if got < nr_bytes:
                # A PDU still arriving is no idle association: pynetdicom restarts its
                # idle timer once a PDU is whole, so a sender of one large PDU (a 126 MB
                # dataset at max PDU 0) over a slow link was aborted mid-way at
                # dimse.network_timeout_s while its bytes kept coming.
                idle = idle or getattr(getattr(self.assoc, "dul", None), "_idle_timer", None)
                if idle is not None:
                    idle.restart()
                self.last_recv = time.monotonic()
        del view
        self.last_recv = time.monotonic()
        if self._wakeup is None:  # only the polling fallback paces itself by this
            self._busy_until = time.monotonic() + 0.25
        if _QUICKACK is not None:
            # Acknowledge at once, not after Linux's delayed-ACK timer: a sender with
            # Nagle's algorithm on (dcmtk's default) holds its next PDU until our ACK
            # comes, 40 ms an instance. Linux drops the mode again, so set it each time.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return buf

    def close(self) -> None:
        super().close()
        # pynetdicom closes the transport from the DUL thread (the state machine's
        # actions): past this its ``ready`` is not called, so the eventfd can go.
        if self._wakeup is not None and threading.current_thread() is self.assoc.dul:
            self._wakeup.close()

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        wakeup = self._wakeup
        if self._poller is None:
            poller = select.poll()
            try:
                poller.register(sock, select.POLLIN)
                if wakeup is not None:
                    poller.register(wakeup.fd, select.POLLIN)
            except (OSError, ValueError):  # closed under us
                self.event_queue.put("Evt17")
                return False
            self._poller = poller
        if wakeup is None:
            wait_ms = 0.2 if time.monotonic() < self._busy_until else 1.0
        elif self.assoc.dul.state_machine.current_state == "Sta13":
            wait_ms = 0.0  # pynetdicom closes the transport once no data is left
        else:
            # The upper bound is for what nothing signals: the ARTIM timer, and the
            # association asking the thread to stop.
            wait_ms = 20.0
        try:
            events = self._poller.poll(wait_ms)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        readable = False
        fd = sock.fileno()
        for got_fd, mask in events:
            if got_fd == fd:
                if mask & select.POLLNVAL:
                    self.event_queue.put("Evt17")
                    return False
                readable = True
            elif wakeup is not None:
                wakeup.clear()
        return readable


class _AcceptorAssociation(Association):
    """An association the node accepts: says when one ends before its A-ASSOCIATE-RQ
    came whole (pynetdicom closes it at the ARTIM time without a word)."""

    def run(self) -> None:  # the thread's: its target is the reactor bound at __init__
        opened = time.monotonic()
        try:
            super().run()
        finally:
            if self.requestor.primitive is None:
                server = self._server
                log = getattr(server, "log", None)
                timeout = float(getattr(server, "handshake_timeout_s", 0) or 0)
                if log is not None:
                    held = time.monotonic() - opened
                    timed_out = held >= timeout * 0.9
                    (log.warning if timed_out else log.debug)(
                        "connection closed: no A-ASSOCIATE-RQ within dimse.acse_timeout_s"
                        if timed_out else "connection closed before an A-ASSOCIATE-RQ came",
                        peer=f"{self.requestor.address}:{self.requestor.port}",
                        came="part of one" if timed_out else "nothing whole",
                        acse_timeout_s=timeout)


class _RequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if type(assoc) is Association and _PYNETDICOM_3_0:
            assoc.__class__ = _AcceptorAssociation
        return assoc


class _TunedAssociation(_AcceptorAssociation):
    """An accepted association whose reactor wakes when a DIMSE message arrives.

    pynetdicom 3.0's acceptor reactor sleeps 1 ms before every look at its message
    queue (2 ms and more on a busy machine), and a C-STORE typically costs it several
    turns: most of the time a PACS spends sending us a study went there. This is
    pynetdicom 3.0.4's ``_run_reactor`` with that sleep replaced by a wait on the
    queue, which returns as soon as a message is queued or the DUL hands up a release
    or abort (:class:`_SignallingQueue`); at most 20 ms, for what nothing signals (the
    network timeout, a kill from another thread). Only used with pynetdicom 3.0 (see
    :func:`_tune`).
    """

    def _run_reactor(self) -> None:
        try:
            self._serve()
        finally:
            close_wakeup(self)

    def _serve(self) -> None:
        self._is_paused = False
        queue = self.dimse.msg_queue
        while not self._kill:
            with queue.not_empty:  # returns at once when a message is waiting
                if not queue._qsize():
                    queue.not_empty.wait(0.02)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id or 0))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


_register_lock = threading.Lock()


def _storage_context(uid: str) -> PresentationContext | None:
    """A storage presentation context for ``uid``, or None when pynetdicom knows it as
    a class of another service.

    A SOP class pynetdicom does not know (a vendor's private one, such as Siemens' CSA
    Non-Image Storage, or one newer than it) is registered with its Storage service
    first: its C-STOREs then reach our handler like any other.
    """
    if not _storable(uid):
        return None
    with _register_lock:
        if uid_to_service_class(uid) is ServiceClass:  # the base class: unknown
            register_uid(uid, "Storage_" + uid.replace(".", "_"), StorageServiceClass)
    return build_context(uid, ACCEPTED_TRANSFER_SYNTAXES)


def _storable(uid: str) -> bool:
    """A storage SOP class, or one pynetdicom does not know (a private one): naming it
    in an AE title's lists makes the node take it; a Query/Retrieve class would not."""
    service = uid_to_service_class(uid)
    return service is ServiceClass or issubclass(service, StorageServiceClass)


def negotiable_contexts(ae: AETitleSettings, supported: Sequence[PresentationContext],
                        ) -> list[PresentationContext] | None:
    """The presentation contexts an AE title accepts, from the server's ``supported``
    ones (every storage SOP class of storage_sop_classes(), and Verification); None when it
    accepts exactly those.

    With ``allowed_sop_classes`` only those classes (and Verification); classes named
    in ``allowed_sop_classes`` or ``ignored_sop_classes`` that the server lacks are
    added, so that a private class can be allowed, or ignored rather than refused.
    """
    named = list(dict.fromkeys([*ae.allowed_sop_classes, *ae.ignored_sop_classes]))
    if not named:
        return None
    have = {str(cx.abstract_syntax) for cx in supported}
    extra = [cx for uid in named if uid not in have
             if (cx := _storage_context(uid)) is not None]
    if not ae.allowed_sop_classes:
        return [*supported, *extra] if extra else None
    keep = set(named) | {str(Verification)}
    return [cx for cx in supported if str(cx.abstract_syntax) in keep] + extra


def _sop_label(uid: str) -> str:
    """``uid (its name)`` for a UID pydicom can name, else the UID."""
    name = UID(uid).name
    return f"{uid} ({name})" if name != uid else uid


_REFUSAL = {  # A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2)
    1: "user rejection", 2: "no reason", 3: "abstract syntax not supported",
    4: "transfer syntaxes not supported",
}


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, with the TLS handshake made on the connection's own thread.

    pynetdicom makes it in the accept loop, with no time limit: one peer that connects
    and never starts its handshake (a port scan, a modality set up without TLS) held
    every other peer off until it left, and a failed handshake left no log line.
    """

    handshake_timeout_s: float = 30.0
    log: Any = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = f"{client_address[0]}:{client_address[1]}"
        first = _first_byte(request, self.handshake_timeout_s)
        if first is None:
            # The ARTIM timer (PS3.8 9.1.5): pynetdicom's waited as long again after this
            # wait, so a connection that sent nothing was held for twice the time.
            self._artim_expired(request, peer, "nothing came")
            return
        if self.ssl_context is None and first == bytes([_TLS_HANDSHAKE]):
            # pynetdicom would read the ClientHello as PDUs of unknown types: five error
            # lines naming neither the peer nor the cause.
            if self.log is not None:
                self.log.warning("TLS handshake on the plain DICOM port", peer=peer,
                                 hint="the peer is set up for TLS: turn TLS off there, or "
                                      "set dimse.tls on the node")
            with contextlib.suppress(OSError):
                request.close()
            return
        if self.ssl_context is not None and not isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout_s)
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as exc:  # ssl.SSLError, a timeout, a reset
                if self.log is not None:
                    self.log.warning("TLS handshake failed", error=str(exc) or type(exc).__name__,
                                     peer=peer)
                with contextlib.suppress(OSError):
                    request.close()
                return
        # Until its A-ASSOCIATE-RQ is read, a read that stalls (a PDU cut off mid-way)
        # ends at the ARTIM time: pynetdicom's reads block with no limit. Once it is
        # read, StorageSCP._on_requested sets the network timeout for the same purpose.
        with contextlib.suppress(OSError):
            request.settimeout(self.handshake_timeout_s)
        # And the whole request must come within it (PS3.8 9.1.5): a read timeout alone
        # let a peer trickling a byte every few seconds hold the connection for minutes.
        artim = threading.Timer(self.handshake_timeout_s, _end_unrequested, (request,))
        artim.daemon = True
        with _artim_lock:
            _artim_timers[id(request)] = artim
        artim.start()
        super().process_request_thread(request, client_address)

    def _artim_expired(self, request: Any, peer: str, what: str) -> None:
        if self.log is not None:
            self.log.warning("connection closed: no A-ASSOCIATE-RQ within "
                             "dimse.acse_timeout_s", peer=peer, came=what,
                             acse_timeout_s=self.handshake_timeout_s)
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            request.close()


_TLS_HANDSHAKE = 0x16  # a TLS record's content type; no PDU type (PS3.8 9.3.1)

# The ARTIM timers of connections whose A-ASSOCIATE-RQ has not come whole yet, by the
# id of their socket (see _Server.process_request_thread and request_came).
_artim_timers: dict[int, threading.Timer] = {}
_artim_lock = threading.Lock()


def _end_unrequested(request: Any) -> None:
    """ARTIM expired before the A-ASSOCIATE-RQ came whole: end the connection (the
    association thread then logs it, see _AcceptorAssociation)."""
    with _artim_lock:
        _artim_timers.pop(id(request), None)
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


def request_came(sock: Any) -> None:
    """The A-ASSOCIATE-RQ on ``sock`` came whole: its ARTIM timer stops."""
    with _artim_lock:
        timer = _artim_timers.pop(id(sock), None)
    if timer is not None:
        timer.cancel()


def _first_byte(sock: socket.socket, timeout_s: float) -> bytes | None:
    """The peer's first byte, peeked (it stays to be read): whether it opens a TLS
    handshake tells a TLS peer on the plain port. None when nothing came within
    ``timeout_s``; empty when the peer closed or reset (left to pynetdicom as before).
    """
    try:
        sock.settimeout(timeout_s)
        return sock.recv(1, socket.MSG_PEEK)[:1]
    except TimeoutError:
        return None
    except OSError:  # a reset
        return b""
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(None)


class _SharedSyntaxContexts(list[PresentationContext]):
    """The server's supported presentation contexts, cheap to copy for each association.

    pynetdicom deep-copies them for every association it accepts, and deep-copying
    re-validates each UID against its regex: ~2,200 UIDs for every storage SOP class and
    transfer syntax, 15 ms on an idle machine and several times that on a busy one,
    before the peer's request is even looked at. UIDs are immutable strings, so the
    copies can share them; each copy still gets its own object and transfer syntax list.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for cx in self:
            new = copy.copy(cx)
            new._transfer_syntax = list(cx._transfer_syntax)
            copies.append(new)
        return copies


def tune_socket(assoc: Association) -> None:
    """Swap in :class:`_TunedSocket`, let it pace the DUL loop (woken by data or by
    a primitive to send), and switch off Nagle's algorithm.

    pynetdicom writes a DIMSE message's command and dataset as separate PDUs; with
    Nagle on, the second waits for the peer to acknowledge the first, which a peer
    delaying its ACKs (Linux: up to 40 ms) does only when its timer runs out: exporting
    to dcmtk's storescp took 46 ms an instance. Used on every association the node
    accepts (see :func:`_tune`) and requests (``dicom_node.scu``).
    """
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        if hasattr(os, "eventfd"):
            # Before the class changes: the DUL thread's first tuned ``ready`` must
            # already wait on the eventfd too.
            wakeup = _Wakeup()
            _signal_on_put(assoc.dul.to_provider_queue, wakeup.set)
            sock._wakeup = wakeup  # type: ignore[attr-defined]
        sock.__class__ = _TunedSocket
        assoc.dul._run_loop_delay = 0  # ``ready`` waits instead of sleeping blind
    raw = getattr(sock, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def close_wakeup(assoc: Association) -> None:
    """Close the eventfd of a finished association's socket (see :class:`_Wakeup`).

    Only once its DUL thread has stopped; otherwise, and for any association that
    ends another way, the eventfd closes when the socket is collected.
    """
    sock = assoc.dul.socket
    if isinstance(sock, _TunedSocket) and sock._wakeup is not None \
            and not assoc.dul.is_alive():
        sock._wakeup.close()


def _tune(assoc: Association) -> None:
    """:func:`tune_socket`, and swap in :class:`_TunedAssociation`'s reactor (it runs
    after EVT_REQUESTED, where this is called)."""
    tune_socket(assoc)
    if type(assoc) in (Association, _AcceptorAssociation) and _PYNETDICOM_3_0:
        _signal_on_put(assoc.dul.to_user_queue,
                       functools.partial(_notify_all, assoc.dimse.msg_queue.not_empty))
        assoc.__class__ = _TunedAssociation


_PYNETDICOM_3_0 = pynetdicom.__version__.startswith("3.0.")
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def server_ssl_context(settings: Settings, tls: TlsSettings) -> ssl.SSLContext:
    """TLS for the DICOM port; peers must present a certificate when a CA is configured.

    Raises :class:`dicom_node.tls.TlsFileError` for a file that cannot be used (settings
    loading has already checked them; this is for a file changed since).
    """
    ca = settings.path(tls.ca_certificate) if tls.ca_certificate is not None else None
    return server_context(settings.path(tls.certificate), settings.path(tls.private_key), ca)


InstanceCallback = Callable[[ReceivedInstance], None]
EndCallback = Callable[[AssociationEnd], None]


@dataclass(frozen=True)
class RetrievalKeys:
    """What a C-MOVE asked for: the keys an instance sent without Move Originator
    attributes must match to be taken as one of its sub-operations (see
    :meth:`StorageSCP._collector_for`). A key left None is not compared; UIDs may be
    lists (``a\\b``), as in the query."""

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None

    def given(self) -> bool:
        return any((self.study_instance_uid, self.series_instance_uid,
                    self.sop_instance_uid, self.patient_id, self.accession_number))

    def match(self, parsed: ParsedInstance) -> bool:
        """Whether the instance is one the C-MOVE asked for (every key given matches);
        False when no key is given: nothing then tells it from a push."""
        if not self.given():
            return False
        checks = (
            (self.study_instance_uid, parsed.study_instance_uid, True),
            (self.series_instance_uid, parsed.series_instance_uid, True),
            (self.sop_instance_uid, parsed.sop_instance_uid, True),
            (self.patient_id, _text(parsed.elems.get("PatientID"), 64), False),
            (self.accession_number, _text(parsed.elems.get("AccessionNumber"), 64), False),
        )
        for wanted, value, uid_key in checks:
            if not wanted:
                continue
            if uid_key:
                if value not in {u.strip() for u in wanted.split("\\")}:
                    return False
            elif not fnmatch.fnmatchcase(value.strip(), wanted.strip()):
                return False  # PatientID / AccessionNumber may hold * and ? wildcards
        return True


@dataclass
class _Collector:
    """Instances sent during a retrieval (C-MOVE to ourselves) from one PACS."""

    calling_ae: str  # the PACS's (Q/R) AE title
    batch: RetrievedBatch
    message_id: int | None = None  # of our C-MOVE request: the sub-operations carry it
    keys: RetrievalKeys = field(default_factory=RetrievalKeys)


class StorageSCP:
    """The node's DICOM listener. ``start()`` / ``stop()`` as a pair; thread-based."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        on_instance: InstanceCallback | None = None,
        on_association_end: EndCallback | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.writer = InstanceWriter(settings, store)
        self.on_instance = on_instance
        self.on_association_end = on_association_end
        self.log = get_logger("dimse.scp")
        self._server: _Server | None = None
        self._listening = False
        self._peers: dict[int, _Peer] = {}
        self._admitted: set[int] = set()  # associations counted against max_associations
        self._collectors: list[_Collector] = []
        # Message IDs of our C-MOVEs that have ended (see _late_sub_operation)
        self._ended_moves: collections.deque[int] = collections.deque(maxlen=1024)
        self._lock = threading.Lock()
        self._sources = {s.name: s for s in settings.sources}
        self._counts: Counter[str] = Counter()  # guarded by _lock

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        dimse = self.settings.dimse
        self.settings.studies_dir.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=dimse.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # The limit is enforced in _on_requested, counting only associations we admitted;
        # pynetdicom's own count includes ones being rejected, which under a burst would
        # refuse peers below the limit. Its guard stays, well above ours.
        ae.maximum_associations = dimse.max_associations + 1000
        ae.maximum_pdu_size = dimse.maximum_pdu_size
        ae.acse_timeout = dimse.acse_timeout_s
        ae.dimse_timeout = dimse.dimse_timeout_s
        ae.network_timeout = dimse.network_timeout_s
        # Called AE titles are checked per association (several are served); see _on_requested.
        ae.require_called_aet = False
        for uid in storage_sop_classes():
            if _storage_context(uid) is not None:  # registers the retired ones with pynetdicom
                ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, VERIFICATION_TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        # beside the studies; a full disk -> 0xA700
        spool.install(self.writer.studies_dir, shared=self.settings.storage.shared)
        ssl_ctx = server_ssl_context(self.settings, dimse.tls) if dimse.tls else None
        # ae.start_server(block=False), with our server class
        server = cast(_Server, ae.make_server((dimse.host, dimse.port), evt_handlers=handlers,
                                              ssl_context=ssl_ctx, server_class=_Server))
        server.contexts = _SharedSyntaxContexts(server.contexts)
        server.RequestHandlerClass = _RequestHandler
        server.handshake_timeout_s = dimse.acse_timeout_s
        server.log = self.log
        threading.Thread(target=make_target(server.serve_forever), name="dicom-accept",
                         daemon=True).start()
        ae._servers.append(server)  # as start_server does: its shutdown() takes it out
        self._server = server
        self._listening = True
        self.log.info("DICOM listening", host=dimse.host, port=self.port,
                      ae_titles=[a.ae_title for a in self.settings.ae_titles],
                      tls=ssl_ctx is not None)

    def stop_listening(self, server: _Server | None = None) -> None:
        """Refuse new associations (the listening socket closes); open ones go on until
        :meth:`stop`. The first thing a stopping node does: nothing new comes in."""
        server = server or self._server
        if server is None or not self._listening:
            return
        self._listening = False
        server.shutdown()
        self.log.info("DICOM listener closed: new associations are refused")

    def stop(self, join_s: float = 5.0) -> None:
        """Stop listening, then A-ABORT the associations still open.

        Without the abort they ran on into a node that was closing its store (refusals
        the peer could not explain) and were cut off at exit without a word; an A-ABORT
        is what a sender's log understands, and it sends again what got no Success.
        Each association thread gets ``join_s`` to finish the instance in its hands.
        """
        server, self._server = self._server, None
        if server is None:
            return
        if self._listening:
            self.stop_listening(server)
        with self._lock:
            ours = set(self._peers)
        open_ = [a for a in server.ae.active_associations
                 if a.is_acceptor and id(a) in ours]
        if open_:
            self.log.warning("aborting open associations: the node is stopping",
                             associations=len(open_))
            for assoc in open_:
                assoc.abort()
            for assoc in open_:
                assoc.join(join_s)
        self.log.info("DICOM listener stopped")

    @property
    def port(self) -> int:
        if self._server is None:
            return self.settings.dimse.port
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._server is not None

    def counters(self) -> DimseCounters:
        """A consistent snapshot of the listener's counters."""
        with self._lock:
            c = dict(self._counts)
            active = len(self._peers)
        return DimseCounters(
            associations={k.split(":", 1)[1]: v for k, v in c.items()
                          if k.startswith("assoc:")},
            c_echo=c.get("echo", 0),
            c_store={k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("store:")},
            instances_stored=c.get("stored", 0),
            active=active,
        )

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    @contextlib.contextmanager
    def collect_from(self, calling_ae: str, message_id: int | None = None,
                     keys: RetrievalKeys | None = None) -> Iterator[RetrievedBatch]:
        """Route the sub-operations of our C-MOVE ``message_id`` to the yielded batch,
        not to the assembler.

        Used by C-MOVE retrieval: the PACS sends the moved instances to our own AE title,
        each C-STORE naming our AE title and the C-MOVE's ``message_id`` (Move Originator
        AE Title and Message ID), from whatever AE title it stores with; a C-STORE
        without them is taken only when it comes from ``calling_ae`` (the PACS's Q/R AE
        title) and matches ``keys`` (what the C-MOVE asked for); see
        :meth:`_collector_for`. They are placed without a store record; the caller ends
        the batch (:meth:`RetrievedBatch.end`) once the C-MOVE is over, which records
        them together.
        """
        collector = _Collector(calling_ae.strip(), RetrievedBatch(self.writer), message_id,
                               keys or RetrievalKeys())
        with self._lock:
            self._collectors.append(collector)
        try:
            yield collector.batch
        finally:
            with self._lock:
                self._collectors.remove(collector)
                if message_id is not None:
                    self._ended_moves.append(message_id)

    def last_inbound_bytes(self, host: str) -> float:
        """``time.monotonic()`` when an association the node accepted from ``host`` last
        read bytes (0: none): a C-MOVE whose next response is late still waits while
        its sub-operations' data is arriving (one large instance from a slow PACS takes
        longer than dimse.dimse_timeout_s)."""
        server = self._server
        if server is None:
            return 0.0
        addresses = {host}
        with contextlib.suppress(OSError):
            addresses.add(socket.gethostbyname(host))
        return max((float(getattr(a.dul.socket, "last_recv", 0.0))
                    for a in list(server.ae.active_associations)
                    if a.is_acceptor and a.requestor.address in addresses),
                   default=0.0)

    def _late_sub_operation(self, request: Any) -> bool:
        """A sub-operation of one of our C-MOVEs that ended before it came (the node
        stopped waiting for the PACS): kept like a retrieved instance, made no job; it
        became an ordinary push that ran the pipelines and sent results nobody asked
        for."""
        move_ae, move_id = _move_originator(request)
        if move_ae != self.settings.dimse.ae_title or move_id is None:
            return False
        with self._lock:
            return move_id in self._ended_moves

    # -- policy ------------------------------------------------------------------------

    def ae_settings(self, called: str) -> AETitleSettings | None:
        """The settings for a called AE title; the node's own AE title always stores."""
        found = self.settings.ae_title(called)
        if found is None and called.strip() == self.settings.dimse.ae_title:
            return AETitleSettings(ae_title=self.settings.dimse.ae_title)
        return found

    def _decide(self, called: str, calling: str, address: str, echo_only: bool = False,
                ) -> tuple[Rejection, str] | None:
        """The rejection for an association request, with what the log says of why.
        ``echo_only``: it proposes Verification alone, which writes nothing: a PACS's
        "test connection" still succeeds while the disk is under the reserve."""
        ae = self.ae_settings(called)
        if ae is None:
            known = [a.ae_title for a in self.settings.ae_titles]
            return REJECT_CALLED_AE, f"this node answers to {', '.join(known)}"
        if ae.reject_unknown_sources:
            allowed = [self._sources[n] for n in ae.sources if n in self._sources]
            if not any(s.ae_title == calling and _host_matches(s.host, address)
                       for s in allowed):
                hosts = [s.host for s in allowed if s.ae_title == calling]
                if hosts:  # the right AE title from the wrong machine: say so
                    return REJECT_CALLING_AE, (f"{calling} is a source of {called} from "
                                               f"{', '.join(hosts)}, not from {address}")
                return REJECT_CALLING_AE, (
                    f"{calling} is not among {called}'s sources "
                    f"({', '.join(f'{s.ae_title}@{s.host}' for s in allowed) or 'none'})")
        if not echo_only and (short := short_of_space(self.settings, self.writer.studies_dir)):
            return REJECT_NO_SPACE, short
        return None

    # -- handlers (association threads) -----------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request_came(getattr(assoc.dul.socket, "socket", None))  # ARTIM stops (PS3.8 9.1.5)
        rq = assoc.requestor.primitive
        called = _ae_text(getattr(rq, "called_ae_title", ""))
        calling = _ae_text(getattr(rq, "calling_ae_title", ""))
        address, port = str(assoc.requestor.address), int(assoc.requestor.port)
        proposed = {str(getattr(c, "abstract_syntax", "")) for c in
                    (getattr(rq, "presentation_context_definition_list", None) or [])}
        decided = self._decide(called, calling, address,
                               echo_only=proposed == {str(Verification)})
        if decided is None:
            with self._lock:
                if len(self._admitted) >= self.settings.dimse.max_associations:
                    decided = (REJECT_LOCAL_LIMIT, f"{len(self._admitted)} associations open "
                               "(dimse.max_associations)")
                else:
                    self._admitted.add(id(assoc))
        if decided is not None:
            rejection, why = decided
            self.log.warning("association rejected", reason=rejection.text, why=why,
                             called_ae=called, calling_ae=calling, peer=f"{address}:{port}",
                             result=rejection.result, source=rejection.source,
                             diagnostic=rejection.reason)
            self._count("assoc:rejected")
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.reason)
            assoc.kill()  # as pynetdicom does after its own rejections: wait for the DUL
            return
        ae = self.ae_settings(called)
        assert ae is not None
        # Contexts for SOP classes the AE title does not take are refused at negotiation
        # (abstract syntax not supported): the peer learns it before sending anything.
        contexts = negotiable_contexts(ae, assoc.acceptor.supported_contexts)
        if contexts is not None:
            assoc.acceptor.supported_contexts = contexts
        _tune(assoc)
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            # A PDU that stalls mid-way ends the connection at the network timeout: the
            # DUL reads a PDU's rest with blocking reads (its socket otherwise has none).
            with contextlib.suppress(OSError):
                raw.settimeout(self.settings.dimse.network_timeout_s)
        with self._lock:
            self._peers[id(assoc)] = _Peer(called, calling, address, port)
            self._counts["assoc:accepted"] += 1
        # Debug: the association's end says who, and what came (one info line for each
        # of a monitor's C-ECHOs, not three).
        self.log.debug("association accepted", called_ae=called, calling_ae=calling,
                       peer=f"{address}:{port}")

    def _on_accepted(self, event: evt.Event) -> None:
        """Log the presentation contexts refused: a modality's "no presentation context"
        failure is explained here, with what would make the node take the class."""
        refused = event.assoc.rejected_contexts
        if not refused:
            return
        peer = self._peer(event.assoc)
        classes = list(dict.fromkeys(_sop_label(str(cx.abstract_syntax)) for cx in refused))
        shown = classes[:8] + ([f"... {len(classes) - 8} more"] if len(classes) > 8 else [])
        unsupported = any(cx.result == 3 and _storable(str(cx.abstract_syntax))
                          for cx in refused)
        self.log.info(
            "presentation contexts refused", called_ae=peer.called_ae,
            calling_ae=peer.calling_ae, peer=f"{peer.address}:{peer.port}",
            contexts=len(refused), sop_classes=shown,
            reasons=sorted({_REFUSAL.get(int(cx.result or 0), str(cx.result)) for cx in refused}),
            **({"hint": self._take_hint(peer.called_ae)} if unsupported else {}))

    def _take_hint(self, called_ae: str) -> str:
        """What makes ``called_ae`` take a class it refused. An allow-list replaces the
        default (every standard class): naming only the refused class there would
        refuse the images, so the advice says so when the AE title has none yet."""
        ae = self.settings.ae_title(called_ae)
        listed = ae is not None and bool(ae.allowed_sop_classes)
        keep = (f"add it (UID or keyword) to {called_ae}'s allowed_sop_classes" if listed else
                f"list it (UID or keyword) in {called_ae}'s allowed_sop_classes together with "
                "every class it should take (the list replaces the default of all standard "
                "storage classes)")
        return (f"to answer Success without keeping it, name it in ignored_sop_classes; to "
                f"store it, {keep}")

    def _peer(self, assoc: Association) -> _Peer:
        with self._lock:
            peer = self._peers.get(id(assoc))
        if peer is None:  # only when EVT_REQUESTED did not run; be safe anyway
            rq = assoc.requestor.primitive
            peer = _Peer(_ae_text(getattr(rq, "called_ae_title", "")),
                         _ae_text(getattr(rq, "calling_ae_title", "")),
                         str(assoc.requestor.address), int(assoc.requestor.port))
        return peer

    def _on_echo(self, event: evt.Event) -> int:
        peer = self._peer(event.assoc)
        self._count("echo")
        peer.echoes += 1
        self.log.debug("C-ECHO", called_ae=peer.called_ae, calling_ae=peer.calling_ae,
                       peer=f"{peer.address}:{peer.port}", status=0)
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        peer = self._peer(event.assoc)
        req: Any = event.request
        sop = str(req.AffectedSOPInstanceUID or "")
        sop_class = str(req.AffectedSOPClassUID or "")
        log = self.log.bind(called_ae=peer.called_ae, calling_ae=peer.calling_ae,
                            peer=f"{peer.address}:{peer.port}", sop_instance_uid=sop[:64])
        ae = self.ae_settings(peer.called_ae)
        if ae is None:  # cannot happen after EVT_REQUESTED; refuse rather than guess
            return self._answer(log, Status.PROCESSING_FAILURE, "called AE title unknown")
        if str(event.context.abstract_syntax) != sop_class:
            return self._answer(log, Status.SOP_CLASS_NOT_SUPPORTED,
                                "SOP class does not match the presentation context")
        if sop_class in ae.ignored_sop_classes:
            return self._answer(log, Status.SUCCESS, "SOP class ignored; not kept")
        collector: _Collector | None = None
        try:
            try:
                path = spool.received_path(req)  # OSError: the disk filled as it arrived
            except AttributeError:  # chunked mode switched off by someone: use the bytes
                path = _spool(event.encoded_dataset(include_meta=True), self.writer.studies_dir)
            if short := short_of_space(self.settings, self.writer.studies_dir):
                # The reserve is checked for each instance, not only when an association
                # opens: one association of a large study wrote the disk full past it,
                # and the store on the same disk with it. The spooled file goes.
                peer.out_of_space += 1
                self._count(f"store:0x{Status.OUT_OF_RESOURCES:04X}")
                if peer.out_of_space == 1:  # the association's summary counts the rest
                    log.warning("C-STORE refused", status=f"0x{Status.OUT_OF_RESOURCES:04X}",
                                message=f"free disk space is low: {short}; not kept (the "
                                "sender may send it again later)")
                return int(Status.OUT_OF_RESOURCES)
            parsed = self.writer.read(path, expected_sop_class=sop_class,
                                      expected_sop_instance=sop)
            # a sub-operation of our C-MOVE, or None: an ordinary push
            collector = self._collector_for(peer, req, parsed)
            retrieving = collector is not None
            if not retrieving and self._late_sub_operation(req):
                got = self.writer.keep(parsed, called_ae=peer.called_ae,
                                       calling_ae=peer.calling_ae,
                                       association_id=id(event.assoc), source="retrieve")
                log.warning("a sub-operation of a retrieval that had ended: kept, no job",
                            study_uid=got.study_instance_uid)
                peer.instances += 1
                return self._answer(log, Status.SUCCESS, "stored (late sub-operation)")
            got = self.writer.keep(
                parsed, called_ae=peer.called_ae, calling_ae=peer.calling_ae,
                association_id=id(event.assoc), duplicates=ae.duplicates,
                source="retrieve" if retrieving else "dimse",
                durable=not retrieving,  # a retrieval that fails is fetched again
                keep_header=retrieving,  # its job reads the headers next
                # the retrieval records its instances together when it ends
                record=not (retrieving and ae.duplicates is DuplicatePolicy.OVERWRITE),
            )
        except _Mismatch as exc:
            return self._answer(log, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc))
        except InvalidInput as exc:
            return self._answer(log, Status.CANNOT_UNDERSTAND, str(exc))
        except (OSError, StoreError) as exc:
            return self._answer(log, Status.OUT_OF_RESOURCES, f"cannot keep the instance: {exc}")
        except Exception as exc:  # never let a bug become a silent Success
            log.exception("C-STORE failed")
            return self._answer(log, Status.OUT_OF_RESOURCES, type(exc).__name__)
        peer.instances += 1
        if got.stored:
            self._count("stored")
        self._deliver(got, collector)
        return self._answer(log, Status.SUCCESS,
                            "stored" if got.stored else "duplicate; first copy kept",
                            study_uid=got.study_instance_uid)

    def _answer(self, log: Any, status: Status, message: str, **extra: Any) -> int:
        self._count(f"store:0x{status:04X}")
        if status is Status.SUCCESS:  # the association's summary line counts them
            log.debug("C-STORE", status=f"0x{status:04X}", message=message, **extra)
        else:
            log.warning("C-STORE refused", status=f"0x{status:04X}", message=message, **extra)
        return int(status)

    def _collector_for(self, peer: _Peer, request: Any,
                       parsed: ParsedInstance) -> _Collector | None:
        """The retrieval a C-STORE is a sub-operation of, or None: an ordinary push
        (written durably, grouped into jobs).

        PS3.7 C.4.2: a C-MOVE's sub-operations name its requestor and request in Move
        Originator AE Title and Message ID; the AE title they are sent from is the PACS's
        to choose (many store from another AE title than their Q/R one). So:

        - with both attributes and the AE title ours, the instance belongs to the
          retrieval whose C-MOVE has that message ID, whatever AE title sends it; to
          none (a push) when no C-MOVE in flight has that ID;
        - a Move Originator AE Title naming another AE makes it a push (a sub-operation
          of someone else's C-MOVE), except when it names the PACS we sent the C-MOVE
          to: pynetdicom's Q/R SCP names itself there, so it is taken as the next case;
        - without usable Move Originator attributes (some PACS send none) it belongs to
          a retrieval only when it comes from that retrieval's PACS AE title (and names
          its message ID, if it names one) and matches what the C-MOVE asked for (its
          Study Instance UID, and the other keys given): a study that PACS pushes
          meanwhile is not taken into the retrieval.
        """
        node_ae = self.settings.dimse.ae_title
        if peer.called_ae != node_ae:  # sub-operations go to the move destination: us
            return None
        move_ae, move_id = _move_originator(request)
        with self._lock:
            collectors = list(self._collectors)
        if move_ae == node_ae and move_id is not None:
            return next((c for c in collectors if c.message_id == move_id), None)
        return next((c for c in collectors
                     if c.calling_ae == peer.calling_ae
                     and move_ae in ("", node_ae, c.calling_ae)
                     and (move_id is None or c.message_id == move_id)
                     and c.keys.match(parsed)), None)

    def _deliver(self, got: ReceivedInstance, collector: _Collector | None) -> None:
        if collector is not None:
            try:
                collector.batch.add(got)
            except StoreError:  # on disk, not recorded: a later retrieval records it again
                self.log.exception("cannot record a retrieved instance",
                                   sop_instance_uid=got.sop_instance_uid)
            return
        if self.on_instance is not None:
            try:
                self.on_instance(got)
            except Exception:  # the instance is safe on disk and in the store
                self.log.exception("cannot hand the instance to the assembler",
                                   sop_instance_uid=got.sop_instance_uid)

    def _end(self, event: evt.Event, released: bool) -> None:
        with self._lock:
            peer = self._peers.pop(id(event.assoc), None)
            self._admitted.discard(id(event.assoc))
            if peer is not None:
                self._counts["assoc:released" if released else "assoc:aborted"] += 1
        if peer is None:
            return
        self.log.info("association released" if released else "association aborted",
                      called_ae=peer.called_ae, calling_ae=peer.calling_ae,
                      peer=f"{peer.address}:{peer.port}", instances=peer.instances,
                      **({"echoes": peer.echoes} if peer.echoes else {}),
                      **({"refused_out_of_space": peer.out_of_space}
                         if peer.out_of_space else {}))
        if self.on_association_end is not None:
            self.on_association_end(
                AssociationEnd(id(event.assoc), peer.called_ae, peer.calling_ae, released)
            )

    def _on_closed(self, event: evt.Event) -> None:
        # A connection lost without A-RELEASE or A-ABORT counts as aborted (no-op otherwise).
        self._end(event, released=False)
        _discard_partial(event.assoc)

    def _on_released(self, event: evt.Event) -> None:
        self._end(event, released=True)

    def _on_aborted(self, event: evt.Event) -> None:
        self._end(event, released=False)


def _discard_partial(assoc: Association) -> None:
    """Delete the temp file of an instance cut off by an abort (pynetdicom leaves it)."""
    msg = getattr(assoc.dimse, "message", None)
    partial = getattr(msg, "_data_set_file", None)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
        os.unlink(partial.name)


def _ae_text(value: object) -> str:
    """An AE title as text: bytes outside printable ASCII become U+FFFD, which no
    configured AE title holds, and cannot forge a log line."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value or "")
    return "".join(c if " " <= c <= "~" else "\ufffd" for c in text).strip()


def _host_matches(configured: str, address: str) -> bool:
    if configured in ("*", "", "0.0.0.0", "any"):
        return True
    if configured == address:
        return True
    try:
        import socket

        return address in {ai[4][0] for ai in socket.getaddrinfo(configured, None)}
    except OSError:
        return False


def _spool(data: bytes, studies_dir: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=studies_dir, prefix=".", suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def _move_originator(request: Any) -> tuple[str, int | None]:
    """The Move Originator AE Title (stripped; "" when absent) and Message ID (None when
    absent) of a C-STORE request."""
    ae = _ae_text(getattr(request, "MoveOriginatorApplicationEntityTitle", None) or "")
    value = getattr(request, "MoveOriginatorMessageID", None)
    try:
        move_id = None if value is None else int(value)
    except (TypeError, ValueError):
        move_id = None
    return ae, move_id
