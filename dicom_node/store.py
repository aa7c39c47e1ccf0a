"""The durable store: instances, studies, jobs, job events, artifacts and exports.

SQLAlchemy 2 Core over SQLite (WAL) by default or PostgreSQL for several
machines. The store is the source of truth for jobs; the scheduler's queue is
only a view of it, so a crash loses nothing. All timestamps are UTC.

Every method is synchronous and thread-safe (one pooled connection per call);
async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from dicom_node.errors import Conflict, NotFound, StoreError

if TYPE_CHECKING:
    from pipeline.types import Artifact


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

schema_info = sa.Table(
    "schema_info",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("patient_id", sa.String(64)),
    sa.Column("accession_number", sa.String(64)),
    sa.Column("study_date", sa.String(8)),
    sa.Column("called_ae", sa.String(16)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # retention's oldest-first pass (keyset on updated_at, id) and ``studies list``
    sa.Index("ix_studies_updated_at", "updated_at", "id"),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("patient_id", sa.String(64)),
    sa.Column("modality", sa.String(16)),
    sa.Column("transfer_syntax_uid", sa.String(64)),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("called_ae", sa.String(16)),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("source", sa.String(16), nullable=False),  # dimse, stow, watch, retrieve
    sa.Column("received_at", UTCDateTime, nullable=False),
    # When the instance's group became jobs; NULL while it waits in the assembler, so a
    # node that died meanwhile finds it again at start-up (see pending_instances).
    sa.Column("queued_at", UTCDateTime),
    # The node_name of the node that received (stored) it, whose studies folder holds
    # its file; NULL for instances recorded before migration 8. At start a node
    # re-assembles only its own pending instances (see Store.recoverable_instances).
    sa.Column("received_by", sa.String(128)),
    sa.Index("ix_instances_called_ae", "called_ae"),
    sa.Index("ix_instances_queued_at", "queued_at"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("pipeline", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("not_before", UTCDateTime),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_token", sa.String(36)),
    sa.Column("lease_expires", UTCDateTime),
    sa.Column("study_instance_uid", sa.String(64), index=True),
    sa.Column("called_ae", sa.String(16)),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("transaction_id", sa.String(256)),
    sa.Column("owner", sa.String(256)),
    # The node_name whose own (not shared) storage holds the job's input files: only
    # that node claims it. NULL: any node may run it (a retrieval, or shared storage).
    sa.Column("home", sa.String(128)),
    sa.Column("input", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Migration 9 (see _migration_job_indexes): each index serves one query's WHERE and
    # ORDER BY whole, so it reads only the rows it returns however many jobs there are.
    # claim_next: queued, highest priority first, then oldest (replaces ix_jobs_queue,
    # whose ascending priority could not give that order without sorting every queued job)
    # (not_before and home too: the jobs it passes over are skipped in the index alone)
    sa.Index("ix_jobs_claim", "state", sa.desc("priority"), "created_at", "id", "not_before",
             "home"),
    sa.Index("ix_jobs_due", "state", "not_before"),  # next_due
    sa.Index("ix_jobs_created_at", "created_at"),  # list_jobs, newest first
    sa.Index("ix_jobs_state_created_at", "state", "created_at"),  # list_jobs --state
    sa.Index("ix_jobs_finished_at", "finished_at", "id"),  # retention (keyset)
    sa.UniqueConstraint("owner", "transaction_id", name="uq_jobs_owner_transaction"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("message", sa.Text),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("media_type", sa.String(128), nullable=False),
    sa.Column("sop_instance_uid", sa.String(64)),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

exports = sa.Table(
    "exports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True),
    sa.Column("destination", sa.String(128), nullable=False),
    # succeeded, retrying, failed; pending, sending while a pass is under way
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("sent", sa.Integer, nullable=False, default=0),
    sa.Column("message", sa.Text),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # SOP Instance UIDs the destination acknowledged (C-STORE Success or Warning, STOW-RS
    # referenced) while its export is not yet done: a later pass sends only the rest.
    sa.Column("acknowledged", sa.JSON),
)


# Runtime configuration made through the HTTP config API, merged over the YAML file
# at start-up. A null body is a tombstone: the object was deleted at run time.
config_objects = sa.Table(
    "config_objects",
    metadata,
    sa.Column("kind", sa.String(16), primary_key=True),  # ae, source, destination
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("body", sa.JSON),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


# Drop-folder inputs already taken into the store, so that a restart (or the same file
# dropped again) processes nothing twice. One row per (watch folder, content hash);
# ``state`` is "stored" until the instance's group has become jobs, then "queued".
watch_inputs = sa.Table(
    "watch_inputs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("watch", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("sop_instance_uid", sa.String(64)),  # None for an archive
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("watch", "sha256", name="uq_watch_inputs_watch_sha256"),
    sa.Index("ix_watch_inputs_state", "watch", "state"),
)


# Integer ids for things the node names by string, where a contract asks for integers
# (seed 002: projects are called AE titles or drop folders, output layers are
# destinations). Assigned on first sight and never reused, so they stay stable.
integer_ids = sa.Table(
    "integer_ids",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("kind", "name", name="uq_integer_ids_kind_name"),
)

# The called AE titles each study was received under (seed 002's projects), one row a
# pair. An instance record keeps only the AE title it last came in on; a study stays in
# the project of every AE title it was received under, also when the same instance
# comes again by another way (a drop folder, STOW-RS, another AE title).
study_called_aes = sa.Table(
    "study_called_aes",
    metadata,
    sa.Column("called_ae", sa.String(16), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Index("ix_study_called_aes_study", "study_instance_uid"),
)

# Seed 002's batch inference jobs: an integer id over one node job per source (study).
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("group_name", sa.String(128), nullable=False),
    sa.Column("owner", sa.String(256)),
    sa.Column("project_id", sa.Integer, nullable=False),
    sa.Column("pipeline", sa.String(128), nullable=False),
    sa.Column("output_layer_id", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

batch_sources = sa.Table(
    "batch_sources",
    metadata,
    sa.Column("batch_id", sa.Integer, sa.ForeignKey("batches.id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("source_id", sa.Integer, nullable=False),
    sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
              nullable=False, index=True),
)


# Nodes sharing the database, by node_name, and until when each is known to be alive
# (its scheduler renews this like a lease, in the database's time). A dead node's
# pending instances are taken over only once it is no longer alive (shared storage).
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("alive_until", UTCDateTime, nullable=False),
)


def _disk_full_note(database: Path) -> str:
    """What to say first when an SQLite store cannot be opened on a full disk: SQLite
    says "disk I/O error" (it cannot make its -wal and -shm files, even to read), which
    sends an operator looking for failing hardware."""
    try:
        free = shutil.disk_usage(database.parent).free
    except OSError:
        return ""
    if free >= 1 << 20:
        return ""
    return (f"the disk holding it is full ({free // 1024} KiB free on {database.parent}; "
            "free space there, then start again); SQLite says: ")


def _migration_1(conn: Connection) -> None:
    for table in (studies, instances, jobs, job_events, artifacts, exports):
        table.create(conn, checkfirst=True)


def _migration_2(conn: Connection) -> None:
    config_objects.create(conn, checkfirst=True)


def _migration_watch_inputs(conn: Connection) -> None:
    watch_inputs.create(conn, checkfirst=True)


def _migration_batches(conn: Connection) -> None:
    for index in instances.indexes:
        if index.name == "ix_instances_called_ae":
            index.create(conn, checkfirst=True)
    for table in (integer_ids, batches, batch_sources):
        table.create(conn, checkfirst=True)


def _migration_pending_instances(conn: Connection) -> None:
    """``instances.queued_at``; instances already in the store count as queued."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("instances")}
    if "queued_at" not in columns:  # a store made by an older version
        ddl = UTCDateTime().impl.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE instances ADD COLUMN queued_at {ddl}"))
    conn.execute(sa.text("UPDATE instances SET queued_at = received_at "
                         "WHERE queued_at IS NULL"))
    for index in instances.indexes:
        if index.name == "ix_instances_queued_at":
            index.create(conn, checkfirst=True)


def _migration_study_called_aes(conn: Connection) -> None:
    """``study_called_aes``, filled from the AE titles the instances held came in on."""
    study_called_aes.create(conn, checkfirst=True)
    i, known = instances.c, study_called_aes.c
    held = (sa.select(i.called_ae, i.study_instance_uid, sa.func.min(i.received_at))
            .where(i.called_ae.is_not(None), i.called_ae != "",
                   ~sa.exists().where(known.called_ae == i.called_ae,
                                      known.study_instance_uid == i.study_instance_uid))
            .group_by(i.called_ae, i.study_instance_uid))
    conn.execute(study_called_aes.insert().from_select(
        ["called_ae", "study_instance_uid", "created_at"], held))


def _migration_export_acknowledged(conn: Connection) -> None:
    """``exports.acknowledged``: the instances a destination already has."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns("exports")}
    if "acknowledged" not in columns:  # a store made by an older version
        ddl = sa.JSON().compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE exports ADD COLUMN acknowledged {ddl}"))


def _migration_scale_out(conn: Connection) -> None:
    """``instances.received_by``, ``jobs.home`` and ``nodes``: several machines on one
    database each re-assemble and run only what their own storage holds."""
    for table, column in ((instances, "received_by"), (jobs, "home")):
        columns = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        if column not in columns:  # a store made by an older version
            ddl = table.c[column].type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column} {ddl}"))
    nodes.create(conn, checkfirst=True)


def _migration_job_indexes(conn: Connection) -> None:
    """Indexes for the job queue, the job listing and retention (see ``jobs``)."""
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_jobs_queue"))
    for table in (jobs, studies):
        for index in table.indexes:
            index.create(conn, checkfirst=True)


# Ordered schema migrations: entry i takes the schema from version i to i + 1.
# Append, never edit: a deployed store has already run the earlier ones.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_watch_inputs,  # drop folders (issue #7)
    _migration_batches,  # seed 002 batch jobs, projects and output layers (issue #6)
    _migration_pending_instances,  # received instances whose group is not yet a job
    _migration_study_called_aes,  # a study stays in each AE title's project it came to
    _migration_export_acknowledged,  # a partly failed export resends only what is missing
    _migration_scale_out,  # receiving node, job home, node liveness (several machines)
    _migration_job_indexes,  # claim, list and expire jobs and studies without full scans
]
SCHEMA_VERSION = len(MIGRATIONS)


class JobState(StrEnum):
    QUEUED = "queued"
    RETRIEVING = "retrieving"
    RUNNING = "running"
    EXPORTING = "exporting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATES

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


ACTIVE_STATES = frozenset({JobState.RETRIEVING, JobState.RUNNING, JobState.EXPORTING})
FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# Keys of a job's input that hold credentials (an ACR request's DICOMweb authId).
SECRET_INPUT_KEYS = frozenset({"authId"})
REDACTED = "[removed after the job succeeded]"


def redact_secrets(value: Any) -> Any:
    """``value`` with every non-empty credential under :data:`SECRET_INPUT_KEYS` replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if k in SECRET_INPUT_KEYS and v else redact_secrets(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


PRIORITY_NORMAL = 128
PRIORITY_IMMEDIATE = 255


@dataclass(frozen=True)
class InstanceRecord:
    """One stored DICOM instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: Path
    size_bytes: int
    source: str
    patient_id: str = ""
    modality: str = ""
    transfer_syntax_uid: str = ""
    called_ae: str = ""
    calling_ae: str = ""
    accession_number: str = ""
    study_date: str = ""
    received_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class NewJob:
    """What a caller asks the scheduler to run."""

    pipeline: str
    kind: str = "dimse"
    priority: int = PRIORITY_NORMAL
    input: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 5
    study_instance_uid: str | None = None
    called_ae: str | None = None
    calling_ae: str | None = None
    transaction_id: str | None = None
    owner: str | None = None
    home: str | None = None  # see jobs.home; set by Store.create_group_jobs

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 255:
            raise ValueError(f"priority must be 0-255, got {self.priority}")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    pipeline: str
    state: JobState
    priority: int
    attempts: int
    max_attempts: int
    input: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    not_before: datetime | None = None
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_token: str | None = None
    lease_expires: datetime | None = None
    study_instance_uid: str | None = None
    called_ae: str | None = None
    calling_ae: str | None = None
    transaction_id: str | None = None
    owner: str | None = None
    home: str | None = None  # the node whose own storage holds its input, if only one
    result: dict[str, Any] | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> Job:
        return cls.from_mapping(dict(row._mapping))

    @classmethod
    def from_mapping(cls, m: dict[str, Any]) -> Job:
        m = dict(m)
        m["state"] = JobState(m["state"])
        m["cancel_requested"] = bool(m["cancel_requested"])
        return cls(**m)


@dataclass(frozen=True)
class JobEvent:
    at: datetime
    state: JobState
    message: str | None


@dataclass(frozen=True)
class ArtifactRecord:
    job_id: str
    kind: str
    path: str
    media_type: str
    sop_instance_uid: str | None
    created_at: datetime


# The state of a job's export to one destination: it got the results; it will be tried
# again (attempts left, or the job was retried); it did not and will not (this run).
EXPORT_SUCCEEDED = "succeeded"
EXPORT_RETRYING = "retrying"
EXPORT_FAILED = "failed"
# While a pass is under way: not yet tried in it; being sent to (with what it has
# acknowledged so far). Neither settles the destination: a later pass sends to it.
EXPORT_PENDING = "pending"
EXPORT_SENDING = "sending"


@dataclass(frozen=True)
class ExportRecord:
    job_id: str
    destination: str
    state: str
    attempts: int
    sent: int
    message: str | None
    updated_at: datetime
    # SOP Instance UIDs the destination acknowledged in passes that did not finish it.
    acknowledged: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StudyRecord:
    """A study the node holds, with its integer id (seed 002's source id)."""

    id: int
    study_instance_uid: str
    patient_id: str
    accession_number: str
    study_date: str
    modalities: list[str]
    instances: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SeriesRecord:
    """One series of a stored study, summed over its instance records."""

    series_instance_uid: str
    modality: str
    instances: int
    size_bytes: int
    first_received: datetime
    last_received: datetime
    #: how its instances came: ``CALLING -> CALLED`` AE titles over DIMSE, else the
    #: source (``stow``, ``watch``, ``retrieve``)
    senders: list[str]
    transfer_syntaxes: list[str]


@dataclass(frozen=True)
class Batch:
    """A seed-002 batch job and its node jobs, one per source, in the order asked."""

    id: int
    group_name: str
    owner: str | None
    project_id: int
    pipeline: str
    output_layer_id: int
    created_at: datetime
    sources: list[tuple[int, Job]]


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit reaches the disk before it returns. An instance is acknowledged only
    # once recorded; with NORMAL a power cut could lose the record of a file we fsynced
    # (~0.3 ms more per commit here).
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    # Deleted and replaced rows are overwritten with zeros, not left in free pages: a
    # request's credentials are removed from the file, not only from the table.
    cur.execute("PRAGMA secure_delete=ON")
    cur.close()


def _instance_values(rec: InstanceRecord, received_by: str | None = None) -> dict[str, Any]:
    """An instances row for ``rec``."""
    return {
        "sop_instance_uid": rec.sop_instance_uid,
        "sop_class_uid": rec.sop_class_uid,
        "study_instance_uid": rec.study_instance_uid,
        "series_instance_uid": rec.series_instance_uid,
        "patient_id": rec.patient_id,
        "modality": rec.modality,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "path": str(rec.path),
        "size_bytes": rec.size_bytes,
        "called_ae": rec.called_ae,
        "calling_ae": rec.calling_ae,
        "source": rec.source,
        "received_at": rec.received_at,
        "queued_at": None,  # (again) waiting for its group to become jobs
        "received_by": received_by,
    }


# Where a known instance was before an overwrite (one indexed read, built once).
_PRIOR = (sa.select(instances.c.study_instance_uid, instances.c.path, instances.c.called_ae)
          .where(instances.c.sop_instance_uid == sa.bindparam("sop")))


def _moved(conn: Connection, rec: InstanceRecord, old_study: str, old_path: str,
           replaced: list[str] | None) -> None:
    """An overwrite put ``rec`` where an instance with its SOP Instance UID was: the old
    file is no longer referenced when the path changed (another study or series), and
    the old study's record goes when no instance is left in it."""
    if old_path != str(rec.path) and replaced is not None:
        replaced.append(old_path)
    if old_study != rec.study_instance_uid:
        left = conn.execute(sa.select(instances.c.id)
                            .where(instances.c.study_instance_uid == old_study).limit(1)).first()
        if left is None:
            _delete_study_rows(conn, old_study)


def _delete_study_rows(conn: Connection, study_instance_uid: str) -> None:
    """A study's record and its projects' (the called AE titles it came to): the same
    UID received again later starts afresh."""
    conn.execute(study_called_aes.delete().where(
        study_called_aes.c.study_instance_uid == study_instance_uid))
    conn.execute(studies.delete().where(studies.c.study_instance_uid == study_instance_uid))


def _called_ae_kept(rec: InstanceRecord, before_called_ae: str | None) -> str:
    """The called AE title an instance's record keeps after ``rec`` is written over one
    that came in on ``before_called_ae`` (None: it was not held): a retrieval of an
    instance the node already holds keeps the AE title it came in on (see
    ``Store._upserts``)."""
    if rec.source == "retrieve" and before_called_ae:
        return before_called_ae
    return rec.called_ae


def _study_values(rec: InstanceRecord, now: datetime) -> dict[str, Any]:
    """A studies row for ``rec``'s study."""
    return {
        "study_instance_uid": rec.study_instance_uid, "patient_id": rec.patient_id,
        "accession_number": rec.accession_number, "study_date": rec.study_date,
        "called_ae": rec.called_ae, "created_at": now, "updated_at": now,
    }


def _private_sqlite_file(db: Path) -> None:
    """Make the database file readable by its owner only: it holds destinations'
    credentials, patients' names and IDs. SQLite gives its -wal and -shm files the
    database's mode. A new database is created empty (a valid SQLite file) with mode 600;
    an existing one loses group and other access when we own it."""
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        with contextlib.suppress(OSError):  # not ours: its owner decides
            mode = db.stat().st_mode & 0o777
            if mode & 0o077:
                for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                    if path.exists():
                        path.chmod(mode & 0o700)
    except OSError:
        pass  # a read-only folder and the like: opening the store says what is wrong


# A running job stops at its next step; a DICOM exchange with a peer that stopped
# answering ends only at its timeout, and until then the cancel was nowhere to be seen.
CANCEL_PENDING = ("cancel requested: the job stops when the step in progress ends (a "
                  "DICOM exchange with a peer that does not answer ends at its timeout)")


class _WriteWatch:
    """Whether the store's last write failed: SQLite still answers reads (``ping``) while
    a lock or a read-only file makes every write fail, and every C-STORE was refused
    with /health saying "ok". Written from the engine's events: a statement failing as
    OperationalError marks trouble, a commit of a transaction that wrote clears it."""

    _WRITES = ("INSERT", "UPDATE", "DELETE")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._ok_seq = 0
        self._failure: tuple[int, float, str] | None = None  # seq, time.time(), error

    def install(self, engine: Engine) -> None:
        sa.event.listen(engine, "after_cursor_execute", self._executed)
        sa.event.listen(engine, "commit", self._committed)
        sa.event.listen(engine, "rollback", self._rolled_back)
        sa.event.listen(engine, "handle_error", self._failed)

    def _executed(self, conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip()[:6].upper() in self._WRITES:
            conn.info["dicom_node_wrote"] = True

    def _committed(self, conn: Connection) -> None:
        # Before the database commits: a commit that then fails comes after, as an error.
        if conn.info.pop("dicom_node_wrote", False):
            with self._lock:
                self._seq += 1
                self._ok_seq = self._seq

    def _rolled_back(self, conn: Connection) -> None:
        conn.info.pop("dicom_node_wrote", None)

    def _failed(self, ctx: Any) -> None:
        if ctx.is_pre_ping or not isinstance(ctx.sqlalchemy_exception,
                                             sa.exc.OperationalError):
            return  # a unique key taken by a racing writer, bad input: not the store's state
        error = str(ctx.original_exception).splitlines()[0][:200]
        with self._lock:
            self._seq += 1
            self._failure = (self._seq, time.time(), error)

    def problem(self) -> str | None:
        """``"<error> (N s ago)"`` when the last write failed, else None."""
        with self._lock:
            failure = self._failure
            if failure is None or failure[0] < self._ok_seq:
                return None
        return f"writes fail: {failure[2]} ({time.time() - failure[1]:.0f} s ago)"


class Store:
    """The node's database. ``open()`` connects and migrates (``migrate=False``: only
    connects, for the commands that must not change a store an older version may still
    run on); ``close()`` disposes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None
        # (from, to) of the migration the last open() made; None when none was needed
        self.migrated: tuple[int, int] | None = None
        # The serving node this store records for (see serve_as); None in the CLI.
        self.node_name: str | None = None
        self.shared_storage = False
        self.writes = _WriteWatch()  # .problem(): the last write failed (for /health)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, *, migrate: bool = True) -> Store:
        url = sa.engine.make_url(self.url)
        if url.drivername == "postgresql":  # psycopg 3, not psycopg2
            url = url.set(drivername="postgresql+psycopg")
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            _private_sqlite_file(Path(url.database))
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
            if engine.dialect.name == "sqlite":
                sa.event.listen(engine, "connect", _sqlite_pragmas)
            self.writes.install(engine)
            self._engine = engine
            if migrate:
                found = self.migrate()
                self.migrated = (found, SCHEMA_VERSION) if found < SCHEMA_VERSION else None
            else:
                self._refuse_newer(self.schema_version())
        except SQLAlchemyError as exc:
            self.close()
            full = (_disk_full_note(Path(url.database))
                    if url.get_backend_name() == "sqlite" and url.database not in (
                        None, "", ":memory:") else "")
            raise StoreError(f"cannot open the store at {url.render_as_string()}: "
                             f"{full}{exc}") from exc
        return self

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise StoreError("the store is not open")
        return self._engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                # A row of a table, not SELECT 1: SQLite answers that without reading
                # the file, so a corrupt or vanished database passed as healthy.
                conn.execute(sa.select(schema_info.c.version)).scalar()
            return True
        except (SQLAlchemyError, StoreError):
            return False

    def migrate(self) -> int:
        """Bring the schema to ``SCHEMA_VERSION``; safe when several processes start at once.

        Returns the version found (0 for an empty database). One way: once migrated, an
        older version refuses the store. Raises StoreError when the store is newer.
        """
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7061757)"))
            schema_info.create(conn, checkfirst=True)
            current = conn.execute(sa.select(schema_info.c.version)).scalar()
            if current is None:
                conn.execute(schema_info.insert().values(version=0))
                current = 0
            self._refuse_newer(current)
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
            conn.execute(schema_info.update().values(version=SCHEMA_VERSION))
        return int(current)

    @staticmethod
    def _refuse_newer(current: int) -> None:
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the store's schema is version {current}, newer than this program's "
                f"{SCHEMA_VERSION}: upgrade dicom-node"
            )

    def schema_version(self) -> int:
        """The schema version the store has: 0 for a database no node has set up."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(schema_info.name):
                return 0
            found = conn.execute(sa.select(schema_info.c.version)).scalar()
        return 0 if found is None else int(found)

    # -- the serving node (several machines on one database) ----------------------------

    def serve_as(self, node_name: str, *, shared_storage: bool = False) -> None:
        """Record what this process stores as received by ``node_name``, and queue the
        jobs of its groups for that node alone unless ``shared_storage`` (the studies
        and results folders are on a filesystem every node mounts) or the store is
        SQLite (one machine: a renamed node must still run its queued jobs)."""
        self.node_name = node_name
        self.shared_storage = shared_storage

    @property
    def _home(self) -> str | None:
        """The home of the group jobs this process makes (see ``jobs.home``)."""
        if self.node_name is None or self.shared_storage or self.dialect == "sqlite":
            return None
        return self.node_name

    def _db_now(self) -> Any:
        """Now, for leases and liveness: the database's clock on PostgreSQL, so that
        machines whose clocks differ agree on when a lease runs out; this machine's on
        SQLite (one machine)."""
        if self.dialect == "postgresql":
            return sa.func.clock_timestamp()
        return utcnow()

    def _db_later(self, seconds: float) -> Any:
        """:meth:`_db_now` plus ``seconds``."""
        if self.dialect == "postgresql":
            return sa.func.clock_timestamp() + sa.literal(timedelta(seconds=seconds),
                                                          sa.Interval())
        return utcnow() + timedelta(seconds=seconds)

    def node_alive(self, node_name: str, alive_s: float, conn: Connection | None = None
                   ) -> None:
        """Note that ``node_name`` runs and is alive for ``alive_s`` more seconds."""
        if conn is None:
            with self._begin() as c:
                self.node_alive(node_name, alive_s, c)
            return
        until = self._db_later(alive_s)
        changed = conn.execute(nodes.update().where(nodes.c.name == node_name)
                               .values(alive_until=until)).rowcount
        if not changed:
            try:
                with conn.begin_nested():
                    conn.execute(nodes.insert().values(name=node_name, alive_until=until))
            except IntegrityError:  # inserted by its namesake meanwhile
                conn.execute(nodes.update().where(nodes.c.name == node_name)
                             .values(alive_until=until))

    def live_nodes(self) -> list[str]:
        """The node_names whose liveness has not run out."""
        with self.engine.connect() as conn:
            return sorted(str(r[0]) for r in conn.execute(
                sa.select(nodes.c.name).where(nodes.c.alive_until > self._db_now())))

    def recoverable_instances(self, node_name: str, *, alive_s: float,
                              take_over_after_s: float | None = None,
                              sources: Sequence[str] = ("dimse", "stow"),
                              ) -> list[InstanceRecord]:
        """The pending instances (see :meth:`pending_instances`) that ``node_name``
        must group again at start, oldest first: those it received, not another node's
        (whose study may still be arriving there).

        Instances recorded before receiving nodes were (migration 8) are taken by the
        first node starting that finds their files on its disk. With
        ``take_over_after_s`` (the studies are on shared storage) it also takes those
        of nodes that are not alive (see :meth:`node_alive`) and were received that
        long ago. Taking is a conditional update under a lock with the node's own
        liveness note, so two nodes starting together never both group an instance.

        On SQLite (one machine) every pending instance is this node's.
        """
        if self.dialect == "sqlite":
            return self.pending_instances(sources)
        i = instances.c
        pending = sa.and_(i.queued_at.is_(None), i.source.in_(list(sources)))
        with self._begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7061758)"))
            self.node_alive(node_name, alive_s, conn)
            unknown = conn.execute(sa.select(i.id, i.path)
                                   .where(pending, i.received_by.is_(None))).all()
            found = [r.id for r in unknown if Path(r.path).is_file()]
            for n in range(0, len(found), 500):
                conn.execute(instances.update()
                             .where(i.id.in_(found[n:n + 500]), i.received_by.is_(None))
                             .values(received_by=node_name))
            if take_over_after_s is not None:
                alive = sa.select(nodes.c.name).where(nodes.c.alive_until > self._db_now())
                conn.execute(
                    instances.update()
                    .where(pending, i.received_by.is_not(None), i.received_by != node_name,
                           i.received_by.not_in(alive),
                           i.received_at < self._db_later(-take_over_after_s))
                    .values(received_by=node_name))
            rows = conn.execute(sa.select(instances)
                                .where(pending, i.received_by == node_name)
                                .order_by(i.id)).all()
        return [_instance(r) for r in rows]

    # -- instances and studies -----------------------------------------------------------

    def add_instance(self, rec: InstanceRecord, *, overwrite: bool = True) -> bool:
        """Record a stored instance; returns False when it was known and kept as it was."""
        return self._add_instance(rec, overwrite=overwrite)

    def _add_instance(self, rec: InstanceRecord, *, overwrite: bool = True,
                      replaced: list[str] | None = None) -> bool:
        now = utcnow()
        values = _instance_values(rec, self.node_name)
        with self._begin() as conn:
            existing = conn.execute(
                sa.select(instances.c.id, instances.c.study_instance_uid, instances.c.path,
                          instances.c.called_ae)
                .where(instances.c.sop_instance_uid == rec.sop_instance_uid)
            ).first()
            called_ae = _called_ae_kept(rec, existing.called_ae if existing else None)
            values["called_ae"] = called_ae
            if existing is not None:
                if not overwrite:
                    return False
                conn.execute(instances.update().where(instances.c.id == existing.id)
                             .values(values))
                _moved(conn, rec, existing.study_instance_uid, existing.path, replaced)
            else:
                conn.execute(instances.insert().values(values))
            self._upsert_study(conn, rec, now)
            if called_ae:
                self._add_called_ae(conn, called_ae, rec.study_instance_uid, now)
        return existing is None

    def _add_called_ae(self, conn: Connection, called_ae: str, study_instance_uid: str,
                       now: datetime) -> None:
        """Note that the study was received under ``called_ae`` (once)."""
        stmts = self._upserts(True)
        if stmts is not None:
            conn.execute(stmts[2], {"called_ae": called_ae,
                                    "study_instance_uid": study_instance_uid,
                                    "created_at": now})
            return
        try:
            with conn.begin_nested():
                conn.execute(study_called_aes.insert().values(
                    called_ae=called_ae, study_instance_uid=study_instance_uid,
                    created_at=now))
        except IntegrityError:  # known already
            pass

    def _upsert_study(self, conn: Connection, rec: InstanceRecord, now: datetime) -> None:
        found = conn.execute(
            sa.select(studies.c.id).where(studies.c.study_instance_uid == rec.study_instance_uid)
        ).scalar()
        if found is None:
            try:
                with conn.begin_nested():
                    conn.execute(studies.insert().values(_study_values(rec, now)))
                return
            except IntegrityError:  # another writer inserted it first
                pass
        conn.execute(
            studies.update()
            .where(studies.c.study_instance_uid == rec.study_instance_uid)
            .values(updated_at=now)
        )

    def record_instance(self, rec: InstanceRecord, *, overwrite: bool = True,
                        durable: bool = True, replaced: list[str] | None = None) -> bool:
        """Like :meth:`add_instance`, in two cached upsert statements: the receive hot path.

        Returns False when the instance was known and kept as it was (``overwrite=False``).
        Backends without ``ON CONFLICT`` fall back to :meth:`add_instance`.
        ``durable=False`` commits without waiting for the disk (SQLite ``synchronous``
        NORMAL for this commit, PostgreSQL ``synchronous_commit`` off): only for instances
        a retrieval fetched, whose files are not fsynced either (a crash fetches them
        again); the commit is as atomic as ever, only a power cut can undo it.

        An instance overwritten by one of another study or series (a study corrected at
        the modality) has a new path: the old one is appended to ``replaced`` for the
        caller to delete once this returns, and the old study's record goes when it has
        no instance left.
        """
        return self.record_instances([rec], overwrite=overwrite, durable=durable,
                                     replaced=replaced)[0]

    def record_instances(self, recs: Sequence[InstanceRecord], *, overwrite: bool = True,
                         durable: bool = True, replaced: list[str] | None = None
                         ) -> list[bool]:
        """:meth:`record_instance` for several instances in one transaction (one commit,
        each study upserted once): a retrieval's instances, recorded together once placed.
        Returns, per record, whether it was written."""
        if not recs:
            return []
        stmts = self._upserts(overwrite)
        if stmts is None:
            return [self._add_instance(rec, overwrite=overwrite, replaced=replaced)
                    for rec in recs]
        if durable:
            with self._begin() as conn:
                return self._upsert_instances(conn, stmts, recs, overwrite, replaced,
                                              self.node_name)
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":  # a connection setting: set outside the transaction
                conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                conn.commit()
            try:
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                    return self._upsert_instances(conn, stmts, recs, overwrite, replaced,
                                                  self.node_name)
            finally:
                if self.dialect == "sqlite":  # the pooled connection goes back as it came
                    conn.exec_driver_sql("PRAGMA synchronous=FULL")
                    conn.commit()

    @staticmethod
    def _upsert_instances(conn: Connection, stmts: tuple[Any, Any, Any],
                          recs: Sequence[InstanceRecord], overwrite: bool = True,
                          replaced: list[str] | None = None,
                          received_by: str | None = None) -> list[bool]:
        now = utcnow()
        written: list[bool] = []
        studies_seen: set[str] = set()
        called_aes_seen: set[tuple[str, str]] = set()
        for rec in recs:
            before = conn.execute(_PRIOR, {"sop": rec.sop_instance_uid}).first() \
                if overwrite else None
            row = conn.execute(stmts[0], _instance_values(rec, received_by)).first()
            written.append(row is not None)
            if row is None:  # known, and kept as it was
                continue
            if rec.study_instance_uid not in studies_seen:
                studies_seen.add(rec.study_instance_uid)
                conn.execute(stmts[1], _study_values(rec, now))
            if before is not None:
                _moved(conn, rec, before.study_instance_uid, before.path, replaced)
            called_ae = _called_ae_kept(rec, before.called_ae if before is not None else None)
            if called_ae and (called_ae, rec.study_instance_uid) not in called_aes_seen:
                called_aes_seen.add((called_ae, rec.study_instance_uid))
                conn.execute(stmts[2], {"called_ae": called_ae,
                                        "study_instance_uid": rec.study_instance_uid,
                                        "created_at": now})
        return written

    def _upserts(self, overwrite: bool) -> tuple[Any, Any, Any] | None:
        """The INSERTs of an instance, of its study and of a study's called AE title, each
        taking ON CONFLICT; None without it.

        Built once: constructing SQLAlchemy statements costs more than running them."""
        cache: dict[bool, tuple[Any, Any, Any]] = self.__dict__.setdefault("_upsert_cache", {})
        if overwrite in cache:
            return cache[overwrite]
        upsert = self._insert_on_conflict()
        if upsert is None:
            return None
        ins = upsert(instances)
        if overwrite:
            set_ = {c.name: ins.excluded[c.name] for c in instances.columns
                    if c.name not in ("id", "sop_instance_uid")}
            # A retrieval fetching an instance the node already holds does not change the
            # AE title it came in on: the study stays in that AE title's project (batch
            # API) instead of moving to the node's own AE title, the C-MOVE destination.
            set_["called_ae"] = sa.case(
                (sa.and_(ins.excluded.source == "retrieve", instances.c.called_ae.is_not(None),
                         instances.c.called_ae != ""), instances.c.called_ae),
                else_=ins.excluded.called_ae)
            ins = ins.on_conflict_do_update(index_elements=["sop_instance_uid"], set_=set_)
        else:
            ins = ins.on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        # A row back says it was written: PostgreSQL's driver reports rowcount -1 for an
        # INSERT that SQLAlchemy gave an implicit RETURNING, so rowcount cannot tell.
        returning = ins.returning(instances.c.id)
        study = upsert(studies)
        study = study.on_conflict_do_update(
            index_elements=["study_instance_uid"], set_={"updated_at": study.excluded.updated_at}
        )
        called = upsert(study_called_aes).on_conflict_do_nothing(
            index_elements=["called_ae", "study_instance_uid"])
        cache[overwrite] = (returning, study, called)
        return cache[overwrite]

    def _insert_on_conflict(self) -> Any:
        """The dialect's INSERT that takes ON CONFLICT (SQLite, PostgreSQL), else None."""
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        elif self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
        else:
            return None
        return insert

    def _watch_input_insert(self) -> Any:
        """INSERT of drop-folder inputs leaving known ones as they are, built once; None
        without ON CONFLICT."""
        if "_watch_insert" not in self.__dict__:
            upsert = self._insert_on_conflict()
            self.__dict__["_watch_insert"] = None if upsert is None else upsert(
                watch_inputs).on_conflict_do_nothing(index_elements=["watch", "sha256"])
        return self.__dict__["_watch_insert"]

    def mark_queued(self, sop_instance_uids: Sequence[str]) -> None:
        """Note that these instances' group became jobs (or needed none)."""
        with self._begin() as conn:
            _mark_queued(conn, sop_instance_uids, utcnow())

    def pending_instances(self, sources: Sequence[str] = ("dimse", "stow")
                          ) -> list[InstanceRecord]:
        """Instances received from ``sources`` whose group never became jobs (the node
        stopped, or died, first), oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(instances)
                .where(instances.c.queued_at.is_(None), instances.c.source.in_(list(sources)))
                .order_by(instances.c.id)
            ).all()
        return [_instance(r) for r in rows]

    def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(instances).where(instances.c.sop_instance_uid == sop_instance_uid)
            ).first()
        return _instance(row) if row else None

    def instances_of(
        self, study_instance_uid: str, series_instance_uid: str | None = None
    ) -> list[InstanceRecord]:
        q = sa.select(instances).where(instances.c.study_instance_uid == study_instance_uid)
        if series_instance_uid:
            q = q.where(instances.c.series_instance_uid == series_instance_uid)
        with self.engine.connect() as conn:
            return [_instance(r) for r in conn.execute(q.order_by(instances.c.id))]

    # -- retention ------------------------------------------------------------------------

    def expired_studies(self, before: datetime, limit: int = 200, *,
                        node_name: str | None = None) -> list[str]:
        """Studies that received nothing since ``before`` and that nothing still needs: no
        job of theirs that is not final, no instance still waiting to become a job; the
        longest unchanged first, at most ``limit`` (see :meth:`expired_study_batches`).

        ``node_name``: only studies none of whose instances another node received (their
        files are on that node's disk: its own retention deletes them with the records)."""
        return [uid for uid, _ in self._expired_studies(before, limit, node_name, None)]

    def expired_study_batches(self, before: datetime, limit: int = 200, *,
                              node_name: str | None = None) -> Iterator[list[str]]:
        """:meth:`expired_studies` batch after batch, each going on after the last study
        of the one before (by ``updated_at`` and id, which ix_studies_updated_at gives in
        order): a pass reads each study once, not again the studies a batch left (still
        needed, another node's) on every batch. Each batch is its own query."""
        after: tuple[datetime, int] | None = None
        while rows := self._expired_studies(before, limit, node_name, after):
            yield [uid for uid, _ in rows]
            after = rows[-1][1]

    def _expired_studies(self, before: datetime, limit: int, node_name: str | None,
                         after: tuple[datetime, int] | None
                         ) -> list[tuple[str, tuple[datetime, int]]]:
        study, s = studies.c.study_instance_uid, studies.c
        q = (sa.select(study, s.updated_at, s.id)
             .where(s.updated_at < before, ~sa.exists(_unfinished_jobs(study)),
                    ~sa.exists(_pending_instances(study)))
             .order_by(s.updated_at, s.id).limit(limit))
        if after is not None:
            q = q.where(sa.tuple_(s.updated_at, s.id) > after)
        if node_name is not None:
            q = q.where(~sa.exists(sa.select(instances.c.id)
                                   .where(*_received_elsewhere(study, node_name))))
        with self.engine.connect() as conn:
            return [(str(r[0]), (r[1], int(r[2]))) for r in conn.execute(q)]

    def received_by_others(self, study_instance_uid: str, node_name: str) -> list[str]:
        """The other nodes that received instances of the study, by name."""
        q = sa.select(instances.c.received_by).distinct().where(
            *_received_elsewhere(study_instance_uid, node_name))
        with self.engine.connect() as conn:
            return sorted(str(r[0]) for r in conn.execute(q))

    def study_last_received(self, study_instance_uid: str) -> datetime | None:
        """When the node last received an instance of the study (None: holds none)."""
        q = sa.select(studies.c.updated_at).where(
            studies.c.study_instance_uid == study_instance_uid)
        with self.engine.connect() as conn:
            value: datetime | None = conn.execute(q).scalar()  # the column's type makes it UTC
        return value

    def held_the_same_way(self, job: Job, series_instance_uids: Collection[str] | None = None,
                          *, any_way: bool = False) -> list[InstanceRecord]:
        """Every instance of a group ``job``'s study (of these series, when given) that
        the store holds now and that came the way its group did: to the same called AE
        title, or into the same drop folder (what ``retry`` runs on), in the order they
        arrived; empty when ``job`` was not made from a group.

        ``any_way``: however they came. The store keeps one record per SOP Instance UID,
        which says only the last way it came: the same series sent to two AE titles
        would otherwise lose, for the first, the instances the second received since."""
        q = _came_the_same_way(job, instances, any_way=any_way)
        if q is None:
            return []
        if series_instance_uids is not None:
            q = q.where(instances.c.series_instance_uid.in_(list(series_instance_uids)))
        with self.engine.connect() as conn:
            return [_instance(r) for r in conn.execute(q.order_by(instances.c.id))]

    def claim_for_group_job(self, job: Job,
                            decide: Callable[[list[Job]], dict[str, Any] | None]) -> bool:
        """Decide, with the study's other jobs of the same pipeline that came the same way
        as group ``job`` (see :meth:`held_the_same_way`), whether ``job`` runs: ``decide``
        gets them and returns the result to record for ``job`` (it runs) or None (it
        does not). One transaction that first writes the study's row, so two jobs of one
        study decide one after the other, each seeing what the other recorded. Returns
        whether the result was recorded (False too when ``job``'s lease was lost)."""
        study = job.study_instance_uid or job.input.get("study_instance_uid") or ""
        with self._begin() as conn:
            # a write first: it serialises the deciders (SQLite's write lock, the row's
            # lock in PostgreSQL)
            conn.execute(studies.update().where(studies.c.study_instance_uid == study)
                         .values(study_instance_uid=studies.c.study_instance_uid))
            rows = conn.execute(sa.select(jobs).where(
                jobs.c.study_instance_uid == study, jobs.c.pipeline == job.pipeline,
                jobs.c.id != job.id).order_by(jobs.c.created_at)).all()
            others = [o for o in map(Job.from_row, rows) if _same_way(job, o)]
            result = decide(others)
            if result is None:
                return False
            stmt = jobs.update().where(jobs.c.id == job.id).values(result=result,
                                                                  updated_at=utcnow())
            if job.lease_token is not None:
                stmt = stmt.where(jobs.c.lease_token == job.lease_token)
            return bool(conn.execute(stmt).rowcount)

    def note(self, job_id: str, message: str) -> None:
        """Add a line to a job's history (``jobs show``) without changing its state."""
        now = utcnow()
        with self._begin() as conn:
            state = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
            if state is not None:
                self._event(conn, job_id, JobState(state), message, now)

    def study_activity(self, study_instance_uid: str) -> tuple[list[str], int]:
        """What still needs a study: the ids of its jobs that are not final, and how many
        of its instances still wait to become a job (it is still arriving)."""
        active = _unfinished_jobs(study_instance_uid).order_by(jobs.c.created_at)
        pending = sa.select(sa.func.count()).select_from(
            _pending_instances(study_instance_uid).subquery())
        with self.engine.connect() as conn:
            ids = [str(r[0]) for r in conn.execute(active)]
            return ids, int(conn.execute(pending).scalar_one())

    def forget_study(self, study_instance_uid: str, *,
                     forget_inputs_of: Collection[str] = ()) -> int:
        """Delete a study's instance records and the study's; returns the instances.

        ``forget_inputs_of`` names drop folders whose content-hash records of the study's
        files go too, so that the same file dropped there again is taken in again. Their
        archive records go as well: an archive is not linked to its studies, and one
        dropped again is then looked at member by member (members still held stay known).
        """
        with self._begin() as conn:
            if forget_inputs_of:
                held = sa.select(instances.c.sop_instance_uid).where(
                    instances.c.study_instance_uid == study_instance_uid)
                conn.execute(watch_inputs.delete().where(
                    watch_inputs.c.watch.in_(list(forget_inputs_of)),
                    sa.or_(watch_inputs.c.sop_instance_uid.in_(held),
                           watch_inputs.c.sop_instance_uid.is_(None))))
            n = conn.execute(instances.delete().where(
                instances.c.study_instance_uid == study_instance_uid)).rowcount
            _delete_study_rows(conn, study_instance_uid)
        return int(n or 0)

    def jobs_finished_before(self, before: datetime, limit: int = 500) -> list[str]:
        """Ids of final jobs that finished before ``before`` (at most ``limit``, the
        earliest first), leaving out those of a batch with a job that did not: a batch
        expires whole (see :meth:`expired_job_batches`)."""
        return [job_id for job_id, _ in self._jobs_finished_before(before, limit, None)]

    def expired_job_batches(self, before: datetime, limit: int = 500) -> Iterator[list[str]]:
        """:meth:`jobs_finished_before` batch after batch, each going on after the last
        job of the one before (by ``finished_at`` and id: ix_jobs_finished_at), so the
        jobs a batch left (of a live batch) are not read again by every later batch."""
        after: tuple[datetime, str] | None = None
        while rows := self._jobs_finished_before(before, limit, after):
            yield [job_id for job_id, _ in rows]
            after = rows[-1][1]

    def _jobs_finished_before(self, before: datetime, limit: int,
                              after: tuple[datetime, str] | None
                              ) -> list[tuple[str, tuple[datetime, str]]]:
        final = [s.value for s in FINAL_STATES]
        # SQLite's planner (no statistics) would take ix_jobs_state_created_at for
        # state IN (...) and sort every final job; ``state || ''`` is no indexed column,
        # so it walks ix_jobs_finished_at in order and stops at ``limit``
        state = jobs.c.state.concat("") if self.dialect == "sqlite" else jobs.c.state
        expired = sa.and_(state.in_(final), jobs.c.finished_at < before)
        other = jobs.alias("other")
        live_batches = (
            sa.select(batch_sources.c.batch_id)
            .join(other, other.c.id == batch_sources.c.job_id)
            .where(sa.or_(other.c.state.not_in(final), other.c.finished_at.is_(None),
                          other.c.finished_at >= before)))
        kept = sa.select(batch_sources.c.job_id).where(batch_sources.c.batch_id.in_(live_batches))
        q = (sa.select(jobs.c.id, jobs.c.finished_at).where(expired, jobs.c.id.not_in(kept))
             .order_by(jobs.c.finished_at, jobs.c.id).limit(limit))
        if after is not None:
            q = q.where(sa.tuple_(jobs.c.finished_at, jobs.c.id) > after)
        with self.engine.connect() as conn:
            return [(str(r[0]), (r[1], str(r[0]))) for r in conn.execute(q)]

    def forget_jobs(self, job_ids: Sequence[str]) -> int:
        """Delete these jobs' records (events, artifacts and exports with them) and the
        batches left without a job; returns the jobs deleted."""
        if not job_ids:
            return 0
        with self._begin() as conn:
            ids = list(job_ids)
            for table in (job_events, artifacts, exports, batch_sources):
                conn.execute(table.delete().where(table.c.job_id.in_(ids)))
            n = conn.execute(jobs.delete().where(jobs.c.id.in_(ids))).rowcount
            conn.execute(batches.delete().where(
                batches.c.id.not_in(sa.select(batch_sources.c.batch_id))))
        return int(n or 0)

    def received_studies(
        self, *, limit: int = 20, patient_id: str | None = None, uid: str | None = None,
        uid_prefix: str | None = None,
    ) -> list[tuple[StudyRecord, list[SeriesRecord]]]:
        """The studies the node holds, the most recently received first, each with its
        series (see :class:`SeriesRecord`); ``uid`` keeps that study, ``uid_prefix`` the
        studies whose UID starts with it."""
        q = (sa.select(studies)
             .order_by(studies.c.updated_at.desc(), studies.c.id.desc()).limit(limit))
        if patient_id is not None:
            q = q.where(studies.c.patient_id == patient_id)
        if uid is not None:
            q = q.where(studies.c.study_instance_uid == uid)
        if uid_prefix:
            q = q.where(studies.c.study_instance_uid.startswith(uid_prefix, autoescape=True))
        i = instances.c
        with self.engine.connect() as conn:
            rows = list(conn.execute(q))
            uids = [r.study_instance_uid for r in rows]
            sums: list[Any] = []
            ways: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
            if uids:
                per_series = (
                    sa.select(i.study_instance_uid, i.series_instance_uid, sa.func.max(i.modality),
                              sa.func.count(), sa.func.sum(i.size_bytes),
                              sa.func.min(i.received_at), sa.func.max(i.received_at))
                    .where(i.study_instance_uid.in_(uids))
                    .group_by(i.study_instance_uid, i.series_instance_uid))
                sums = list(conn.execute(per_series))
                how = (sa.select(i.study_instance_uid, i.series_instance_uid, i.source,
                                 i.calling_ae, i.called_ae, i.transfer_syntax_uid)
                       .where(i.study_instance_uid.in_(uids)).distinct())
                for study, series, source, calling, called, ts in conn.execute(how):
                    senders, syntaxes = ways.setdefault((study, series), (set(), set()))
                    senders.add(f"{calling} -> {called}" if source == "dimse" and calling
                                else str(source))
                    if ts:
                        syntaxes.add(str(ts))
        by_study: dict[str, list[SeriesRecord]] = {}
        for study, series, modality, n, size, first, last in sums:
            senders, syntaxes = ways.get((study, series), (set(), set()))
            by_study.setdefault(study, []).append(SeriesRecord(
                series_instance_uid=series, modality=modality or "", instances=int(n),
                size_bytes=int(size or 0), first_received=first, last_received=last,
                senders=sorted(senders), transfer_syntaxes=sorted(syntaxes)))
        out = []
        for r in rows:
            series_list = sorted(by_study.get(r.study_instance_uid, []),
                                 key=lambda x: (x.first_received, x.series_instance_uid))
            out.append((StudyRecord(
                id=int(r.id), study_instance_uid=r.study_instance_uid,
                patient_id=r.patient_id or "", accession_number=r.accession_number or "",
                study_date=r.study_date or "",
                modalities=sorted({x.modality for x in series_list if x.modality}),
                instances=sum(x.instances for x in series_list),
                created_at=r.created_at, updated_at=r.updated_at), series_list))
        return out

    def count_instances(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar_one())

    # -- jobs ----------------------------------------------------------------------------

    def create_job(self, new: NewJob) -> Job:
        now = utcnow()
        try:
            with self._begin() as conn:
                job_id = self._insert_job(conn, new, now)
        except IntegrityError as exc:
            if new.transaction_id is not None:
                with self.engine.connect() as conn:
                    earlier = conn.execute(sa.select(jobs.c.id).where(
                        jobs.c.transaction_id == new.transaction_id,
                        jobs.c.owner == new.owner)).scalar()
                again = (f" (job {earlier}): send a new transactionID, or run that job "
                         f"again with `dicom-node jobs retry {earlier}`" if earlier else "")
                raise Conflict(f"transactionID {new.transaction_id!r} was already used by "
                               f"this caller{again}") from exc
            raise
        return self.get_job(job_id)

    def create_group_jobs(self, news: Sequence[NewJob], sop_instance_uids: Sequence[str],
                          *, watch: str | None = None, only_pending: bool = False
                          ) -> list[Job]:
        """Queue a complete group's jobs and record its instances as queued, in one
        transaction: after a crash either all of it is in the store or none of it (and
        the instances are still pending, so the next start assembles them again), never
        jobs whose instances look pending and are queued a second time.

        ``watch``: the drop folder the instances came from; its inputs move from
        "stored" to "queued" in the same transaction. ``news`` may be empty (an intake
        without pipelines): the instances are then only recorded as queued.

        ``only_pending``: do nothing (and return no jobs) when none of these instances
        is pending any more. A call tried again after a failure passes it: the failed
        call may have committed before it failed (the connection lost at the commit's
        answer, or reading the new jobs back), and its jobs must not be queued twice.
        """
        now = utcnow()
        with self._begin() as conn:
            if only_pending and not _any_pending(conn, sop_instance_uids):
                return []
            _mark_queued(conn, sop_instance_uids, now)
            if watch is not None:
                _mark_watch_inputs(conn, watch, sop_instance_uids, "queued", now)
            home = self._home
            ids = [self._insert_job(conn, new if home is None or new.home is not None
                                    else dataclasses.replace(new, home=home), now)
                   for new in news]
        return [self.get_job(job_id) for job_id in ids]

    def _insert_job(self, conn: Connection, new: NewJob, now: datetime) -> str:
        job_id = str(uuid.uuid4())
        conn.execute(
            jobs.insert().values(
                id=job_id,
                kind=new.kind,
                pipeline=new.pipeline,
                state=JobState.QUEUED.value,
                priority=new.priority,
                attempts=0,
                max_attempts=new.max_attempts,
                cancel_requested=False,
                study_instance_uid=new.study_instance_uid,
                called_ae=new.called_ae,
                calling_ae=new.calling_ae,
                transaction_id=new.transaction_id,
                owner=new.owner,
                home=new.home,
                input=new.input,
                created_at=now,
                updated_at=now,
            )
        )
        self._event(conn, job_id, JobState.QUEUED, "queued" + _only_home(new.home), now)
        return job_id

    def get_job(self, job_id: str) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_row(row)

    def find_job(self, ref: str, owner: str | None = None) -> Job:
        """A job by id or by the caller's transactionID."""
        q = sa.select(jobs).where(sa.or_(jobs.c.id == ref, jobs.c.transaction_id == ref))
        if owner is not None:
            q = q.where(jobs.c.owner == owner)
        with self.engine.connect() as conn:
            row = conn.execute(q.limit(1)).first()
        if row is None:
            raise NotFound(f"no job {ref!r}")
        return Job.from_row(row)

    def match_job(self, ref: str, min_prefix: int = 4) -> Job:
        """A job by id, transactionID or, for people typing ids, a unique id prefix."""
        try:
            return self.find_job(ref)
        except NotFound:
            if len(ref) < min_prefix:
                raise NotFound(f"no job {ref!r} (give at least {min_prefix} characters "
                               "of its id)") from None
        pattern = _id_prefix(ref.lower(), self.dialect)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).where(pattern).order_by(jobs.c.id)
                                .limit(6)).all()
        if not rows:
            raise NotFound(f"no job {ref!r}")
        if len(rows) > 1:
            more = ", ..." if len(rows) > 5 else ""
            raise Conflict(f"{ref!r} names more than one job: "
                           f"{', '.join(r.id for r in rows[:5])}{more}; give more of the id")
        return Job.from_row(rows[0])

    def list_jobs(
        self, states: Iterable[JobState] | None = None, limit: int = 50, offset: int = 0,
        *, study_instance_uid: str | None = None, with_input: bool = True,
    ) -> list[Job]:
        """Jobs, newest first. ``with_input=False`` leaves each job's input unread (its
        ``input`` is ``{}``): a listing that does not show it reads no instance UIDs.

        Several ``states`` are read one state at a time (ix_jobs_state_created_at gives
        each newest first, at most ``offset + limit`` rows) and merged: one query over
        ``state IN (...)`` would sort every job in those states."""
        columns = [c for c in jobs.c if with_input or c.name != "input"]
        q = sa.select(*columns).order_by(jobs.c.created_at.desc())
        if study_instance_uid is not None:
            q = q.where(jobs.c.study_instance_uid == study_instance_uid)
        wanted = list(dict.fromkeys(s.value for s in states)) if states else []
        with self.engine.connect() as conn:
            if len(wanted) <= 1 or study_instance_uid is not None:
                if wanted:
                    q = q.where(jobs.c.state.in_(wanted))
                rows = list(conn.execute(q.limit(limit).offset(offset)))
            else:
                per_state = [list(conn.execute(q.where(jobs.c.state == state)
                                               .limit(offset + limit)))
                             for state in wanted]
                merged = heapq.merge(*per_state, key=lambda r: r.created_at, reverse=True)
                rows = list(itertools.islice(merged, offset, offset + limit))
        return [Job.from_mapping({"input": {}, **r._mapping}) for r in rows]

    def count_jobs(self) -> dict[JobState, int]:
        q = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        counts = dict.fromkeys(JobState, 0)
        with self.engine.connect() as conn:
            for state, n in conn.execute(q):
                counts[JobState(state)] = int(n)
        return counts

    def events(self, job_id: str) -> list[JobEvent]:
        q = sa.select(job_events).where(job_events.c.job_id == job_id).order_by(job_events.c.id)
        with self.engine.connect() as conn:
            return [JobEvent(r.at, JobState(r.state), r.message) for r in conn.execute(q)]

    def claim_next(
        self, owner: str, lease_s: float, first_state: Callable[[Job], JobState] | None = None,
        min_priority: int = 0, node: str | None = None,
    ) -> Job | None:
        """Take the most urgent runnable job: highest priority first, then oldest.

        Only jobs of ``min_priority`` or more are considered; with ``node`` (the
        claiming node's node_name) only jobs without a home or whose home it is: a job
        whose input is on another node's own storage waits for that node. The claim is
        a conditional update (``WHERE state = 'queued'``), so two workers or two
        machines never take the same job. The lease runs out ``lease_s`` from now by
        the database's clock (see :meth:`_db_now`).
        """
        now = utcnow()
        # Only ids, in the order of ix_jobs_claim: the index gives them (and filters on
        # not_before and home) without reading or sorting the queue; each job's whole row
        # (its input can be thousands of instance UIDs) is read only when trying it.
        q = (
            sa.select(jobs.c.id)
            .where(jobs.c.state == JobState.QUEUED.value)
            .where(jobs.c.priority >= min_priority)
            .where(sa.or_(jobs.c.not_before.is_(None), jobs.c.not_before <= now))
            .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
            .limit(8)
        )
        if node is not None:
            q = q.where(sa.or_(jobs.c.home.is_(None), jobs.c.home == node))
        with self.engine.connect() as conn:
            candidates = [str(r[0]) for r in conn.execute(q)]
        for job_id in candidates:
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(jobs).where(
                    jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)).first()
            if row is None:  # taken (or cancelled) meanwhile
                continue
            job = Job.from_row(row)
            state = first_state(job) if first_state else JobState.RUNNING
            token = str(uuid.uuid4())
            with self._begin() as conn:
                claimed = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job.id, jobs.c.state == JobState.QUEUED.value)
                    .values(
                        state=state.value,
                        attempts=jobs.c.attempts + 1,
                        lease_owner=owner,
                        lease_token=token,
                        lease_expires=self._db_later(lease_s),
                        started_at=now,
                        updated_at=now,
                        not_before=None,
                        error=None,
                    )
                ).rowcount
                if claimed:
                    self._event(conn, job.id, state, f"attempt {job.attempts + 1} on {owner}", now)
            if claimed:
                return self.get_job(job.id)
        return None

    def next_due(self) -> datetime | None:
        """When the earliest delayed (backing-off) job becomes runnable."""
        q = sa.select(sa.func.min(jobs.c.not_before)).where(
            jobs.c.state == JobState.QUEUED.value, jobs.c.not_before.is_not(None)
        )
        with self.engine.connect() as conn:
            value = conn.execute(q).scalar()
        return UTCDateTime().process_result_value(value, self.engine.dialect) if value else None

    def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        token: str | None = None,
        message: str | None = None,
        result: dict[str, Any] | None = None,
        not_before: datetime | None = None,
        uncount_attempt: bool = False,
    ) -> bool:
        """Move a job to ``to``; with ``token`` only if the caller still holds its lease.

        ``uncount_attempt``: the attempt that ends here does not count (a deferral).
        Returns False (and changes nothing) when the lease was lost, e.g. the job was
        re-queued after a shutdown grace period.
        """
        now = utcnow()
        values: dict[str, Any] = {"state": to.value, "updated_at": now}
        if to.final:
            values.update(finished_at=now, lease_owner=None, lease_token=None, lease_expires=None)
        if to is JobState.QUEUED:
            values.update(lease_owner=None, lease_token=None, lease_expires=None,
                          not_before=not_before)
        if to is JobState.FAILED or (to is JobState.QUEUED and message):
            values["error"] = message
        if result is not None:
            values["result"] = result
        if uncount_attempt:
            values["attempts"] = jobs.c.attempts - 1
        with self._begin() as conn:
            if to is JobState.SUCCEEDED:
                # A succeeded job never runs again: the credentials a request gave for
                # its PACS (DICOMweb authId) are not kept past their use.
                current = conn.execute(sa.select(jobs.c.input)
                                       .where(jobs.c.id == job_id)).scalar()
                if current is not None and (redacted := redact_secrets(current)) != current:
                    values["input"] = redacted
            stmt = jobs.update().where(jobs.c.id == job_id).values(values)
            if token is not None:
                stmt = stmt.where(jobs.c.lease_token == token)
            changed = conn.execute(stmt).rowcount
            if changed:
                self._event(conn, job_id, to, message, now)
                if to.final:
                    self._close_exports(conn, job_id, to, now)
        if changed and "input" in values:
            self._forget_old_pages()
        return bool(changed)

    def _forget_old_pages(self) -> None:
        """SQLite's write-ahead log keeps the pages a change replaced until a checkpoint;
        copy them in and empty the log, so that removed credentials leave the disk too."""
        if self.dialect != "sqlite":
            return  # PostgreSQL: dead rows go at its next VACUUM
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")

    def update_result(self, job_id: str, result: dict[str, Any], *,
                      token: str | None = None) -> bool:
        """Replace a running job's result (progress); only while ``token`` holds the lease."""
        stmt = jobs.update().where(jobs.c.id == job_id).values(result=result,
                                                              updated_at=utcnow())
        if token is not None:
            stmt = stmt.where(jobs.c.lease_token == token)
        with self._begin() as conn:
            return bool(conn.execute(stmt).rowcount)

    def renew_leases(self, owner: str, lease_s: float,
                     job_ids: Collection[str] | None = None) -> list[tuple[str, bool]]:
        """Extend this owner's leases (only those of ``job_ids`` when given: the jobs a
        worker still runs); returns (job_id, cancel_requested) for each."""
        active = [s.value for s in ACTIVE_STATES]
        mine = [jobs.c.lease_owner == owner, jobs.c.state.in_(active)]
        if job_ids is not None:
            if not job_ids:
                return []
            mine.append(jobs.c.id.in_(list(job_ids)))
        with self._begin() as conn:
            conn.execute(jobs.update().where(*mine)
                         .values(lease_expires=self._db_later(lease_s)))
            rows = conn.execute(sa.select(jobs.c.id, jobs.c.cancel_requested)
                                .where(*mine)).all()
        return [(r.id, bool(r.cancel_requested)) for r in rows]

    def live_lease_owners(self) -> dict[str, int]:
        """Who holds unexpired leases on active jobs, and on how many."""
        active = [s.value for s in ACTIVE_STATES]
        q = (sa.select(jobs.c.lease_owner, sa.func.count())
             .where(jobs.c.state.in_(active), jobs.c.lease_owner.is_not(None),
                    jobs.c.lease_expires >= self._db_now())
             .group_by(jobs.c.lease_owner))
        with self.engine.connect() as conn:
            return {str(owner): int(n) for owner, n in conn.execute(q)}

    def requeue_interrupted(self, owner: str) -> list[str]:
        """Queue again the jobs this owner was running when it died, and any whose lease expired.

        Leases of ``owner`` are taken back even when they have not expired yet: the
        caller must know that no live process uses that owner name (``serve`` holds the
        data directory's lock, whose id is part of the name; see dicom_node.serve_lock).
        So are those of the bare node name before ``#`` in ``owner``: versions before
        the ``<node_name>#<id>`` owners leased as ``<node_name>``, and a node name
        belongs to one node (those versions too took back its leases at start), so
        such a lease is this node's dead predecessor's, on SQLite or on a database
        several nodes share.
        The interrupted attempt does not count against ``max_attempts``: the job did
        not fail, the process did.
        """
        mine = [owner]
        node_name, sep, _ = owner.rpartition("#")
        if sep and node_name:
            mine.append(node_name)
        return self._requeue(sa.or_(jobs.c.lease_owner.in_(mine),
                                    jobs.c.lease_expires < self._db_now()))

    def requeue_expired(self) -> list[str]:
        """Queue again the jobs whose lease ran out, whoever held it: their node died or
        hangs (a live node renews its leases long before they run out)."""
        return self._requeue(jobs.c.lease_expires < self._db_now())

    def _requeue(self, held: Any) -> list[str]:
        now = utcnow()
        cond = sa.and_(jobs.c.state.in_([s.value for s in ACTIVE_STATES]), held)
        requeued: list[str] = []
        with self._begin() as conn:
            held_jobs = conn.execute(sa.select(jobs.c.id, jobs.c.home).where(cond)).all()
            for job_id, home in held_jobs:
                changed = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, cond)  # another node may have been first
                    .values(
                        state=JobState.QUEUED.value,
                        attempts=sa.func.max(jobs.c.attempts - 1, 0)
                        if conn.dialect.name == "sqlite"
                        else sa.func.greatest(jobs.c.attempts - 1, 0),
                        lease_owner=None,
                        lease_token=None,
                        lease_expires=None,
                        updated_at=now,
                    )
                ).rowcount
                if changed:
                    self._event(conn, job_id, JobState.QUEUED,
                                "interrupted; queued again" + _only_home(home), now)
                    requeued.append(job_id)
        return requeued

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or ask its worker to stop a running one."""
        job = self.get_job(job_id)
        if job.state.final:
            raise Conflict(f"job {job_id} has already {job.state.value}")
        now = utcnow()
        changed = 0
        with self._begin() as conn:
            if job.state is JobState.QUEUED:
                changed = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.state == JobState.QUEUED.value)
                    .values(state=JobState.CANCELLED.value, cancel_requested=True,
                            finished_at=now, updated_at=now)
                ).rowcount
                if changed:
                    self._event(conn, job_id, JobState.CANCELLED, "cancelled while queued", now)
                    self._close_exports(conn, job_id, JobState.CANCELLED, now)
            if not changed:
                asked = conn.execute(
                    jobs.update().where(jobs.c.id == job_id,
                                        jobs.c.cancel_requested.is_(False))
                    .values(cancel_requested=True, updated_at=now)
                ).rowcount
                if asked:  # the history says so at once, not only when the job ends
                    self._event(conn, job_id, job.state, CANCEL_PENDING, now)
        return self.get_job(job_id)

    @staticmethod
    def _close_exports(conn: Connection, job_id: str, to: JobState, now: datetime) -> None:
        """A job that ended leaves no destination saying it will be sent to (``pending``,
        ``sending``, ``retrying``): each becomes ``failed`` with why, keeping what it
        acknowledged, so that a ``jobs retry`` sends only the rest."""
        why = "the job was cancelled" if to is JobState.CANCELLED else f"the job {to.value}"
        open_ = [EXPORT_PENDING, EXPORT_SENDING, EXPORT_RETRYING]
        rows = conn.execute(sa.select(exports.c.id, exports.c.state, exports.c.message)
                            .where(exports.c.job_id == job_id,
                                   exports.c.state.in_(open_))).all()
        for r in rows:
            if r.state == EXPORT_PENDING or not r.message:
                message = f"not sent: {why} before it was tried"
            else:
                message = f"{r.message}; not tried again: {why}"
            conn.execute(exports.update().where(exports.c.id == r.id)
                         .values(state=EXPORT_FAILED, message=message, updated_at=now))

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again with a fresh attempt count.

        A job the assembler made from a group of pushed instances (DICOM, STOW-RS, drop
        folder) runs on every instance of its study (or series, when its intake groups
        by series) that the store holds now and that came the same way: to the same
        called AE title, or into the same drop folder. A series that arrived in parts
        (a transfer cut off, a disk that filled) then runs whole. When its instance list
        grows, the results of the failed run are dropped (the job runs again) and the
        history says so ("retry requested with 200 instances, 78 more than the failed
        run").
        """
        now = utcnow()
        with self._begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            old = Job.from_row(row) if row is not None else None
            grown = _regrouped(conn, old) if old is not None else None
            values: dict[str, Any] = {}
            if old is not None and grown is not None:
                values["input"] = {**old.input, "instances": grown}
            changed = conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id,
                    jobs.c.state.in_([JobState.FAILED.value, JobState.CANCELLED.value]),
                )
                .values(state=JobState.QUEUED.value, attempts=0, cancel_requested=False,
                        not_before=None, error=None, finished_at=None, updated_at=now,
                        **values)
            ).rowcount
            message = "retry requested"
            if changed and old is not None and grown is not None:
                before = len(old.input.get("instances", []))
                message += (f" with {len(grown)} instances, {len(grown) - before} more than "
                            "the failed run")
                # made from fewer instances: not results of this run, which makes new ones
                conn.execute(artifacts.delete().where(artifacts.c.job_id == job_id))
            if changed:
                # Destinations that have not got the results get their attempts afresh;
                # those that did are never sent to again.
                conn.execute(
                    exports.update()
                    .where(exports.c.job_id == job_id,
                           exports.c.state != EXPORT_SUCCEEDED)
                    .values(state=EXPORT_RETRYING, attempts=0, updated_at=now))
                self._event(conn, job_id, JobState.QUEUED, message, now)
        if not changed:
            job = self.get_job(job_id)
            raise Conflict(f"job {job_id} is {job.state.value}; only failed or cancelled "
                           "jobs can be retried")
        return self.get_job(job_id)

    # -- artifacts and exports -----------------------------------------------------------

    def add_artifact(
        self, job_id: str, kind: str, path: Path, media_type: str,
        sop_instance_uid: str | None = None,
    ) -> None:
        with self._begin() as conn:
            conn.execute(artifacts.insert().values(
                job_id=job_id, kind=kind, path=str(path), media_type=media_type,
                sop_instance_uid=sop_instance_uid, created_at=utcnow()))

    def start_export(
        self, job_id: str, produced: Sequence[Artifact], *, token: str | None = None,
        message: str | None = None,
    ) -> bool:
        """Record the artifacts a run produced, in place of any an earlier run recorded,
        and move the job to ``exporting``: one transaction, so a job whose artifacts are
        recorded has them all (an interrupted export can be resumed from them).

        With ``token`` only while the caller holds the job's lease; returns whether it did.
        """
        now = utcnow()
        with self._begin() as conn:
            stmt = jobs.update().where(jobs.c.id == job_id).values(
                state=JobState.EXPORTING.value, updated_at=now)
            if token is not None:
                stmt = stmt.where(jobs.c.lease_token == token)
            if not conn.execute(stmt).rowcount:
                return False
            conn.execute(artifacts.delete().where(artifacts.c.job_id == job_id))
            if produced:
                conn.execute(artifacts.insert(), [
                    {"job_id": job_id, "kind": a.kind, "path": str(a.path),
                     "media_type": a.media_type, "sop_instance_uid": a.sop_instance_uid,
                     "created_at": now} for a in produced])
            self._event(conn, job_id, JobState.EXPORTING, message, now)
        return True

    def artifacts_of(self, job_id: str) -> list[ArtifactRecord]:
        q = sa.select(artifacts).where(artifacts.c.job_id == job_id).order_by(artifacts.c.id)
        with self.engine.connect() as conn:
            return [ArtifactRecord(r.job_id, r.kind, r.path, r.media_type, r.sop_instance_uid,
                                   r.created_at) for r in conn.execute(q)]

    def record_export(
        self, job_id: str, destination: str, state: str, attempts: int, sent: int,
        message: str | None = None, acknowledged: Iterable[str] = (),
    ) -> None:
        """Record the latest outcome of the job's export to ``destination`` (one record a
        destination: a later attempt replaces the earlier one's), with the SOP Instance
        UIDs it has acknowledged so far (all passes) while it is not done."""
        values = {"state": state, "attempts": attempts, "sent": sent, "message": message,
                  "acknowledged": (sorted(set(acknowledged)) or None
                                   if state != EXPORT_SUCCEEDED else None),
                  "updated_at": utcnow()}
        with self._begin() as conn:
            ids = list(conn.execute(
                sa.select(exports.c.id)
                .where(exports.c.job_id == job_id, exports.c.destination == destination)
                .order_by(exports.c.id)).scalars())
            if not ids:
                conn.execute(exports.insert().values(job_id=job_id, destination=destination,
                                                     **values))
                return
            conn.execute(exports.update().where(exports.c.id == ids[0]).values(values))
            if len(ids) > 1:  # a store written before one record a destination
                conn.execute(exports.delete().where(exports.c.id.in_(ids[1:])))

    def exports_of(self, job_id: str) -> list[ExportRecord]:
        q = sa.select(exports).where(exports.c.job_id == job_id).order_by(exports.c.id)
        with self.engine.connect() as conn:
            return [ExportRecord(r.job_id, r.destination, r.state, r.attempts, r.sent,
                                 r.message, r.updated_at, frozenset(r.acknowledged or ()))
                    for r in conn.execute(q)]

    # -- drop-folder inputs ---------------------------------------------------------------

    def watch_input_known(self, watch: str, sha256: str) -> bool:
        """Whether a file with this content was already taken in from drop folder ``watch``."""
        q = sa.select(watch_inputs.c.id).where(watch_inputs.c.watch == watch,
                                               watch_inputs.c.sha256 == sha256)
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    def add_watch_inputs(
        self, watch: str, inputs: Sequence[tuple[str, str | None]], state: str = "stored",
        *, instances: Sequence[InstanceRecord] = (), replaced: list[str] | None = None,
    ) -> None:
        """Record ``(sha256, sop_instance_uid)`` pairs as taken in; known ones are left as is.

        ``instances`` (placed by ``InstanceWriter.write(record=False)``) are recorded in
        the same transaction, overwriting known ones: one commit for a dropped file, not
        one for its instance and another for the file. ``replaced``: as for
        :meth:`record_instance`.
        """
        if not inputs:
            self.record_instances(instances, replaced=replaced)
            return
        stmts = self._upserts(True) if instances else None
        if instances and stmts is None:  # no ON CONFLICT: one instance at a time first
            self.record_instances(instances, replaced=replaced)
        now = utcnow()
        rows = [{"watch": watch, "sha256": sha, "sop_instance_uid": sop, "state": state,
                 "created_at": now, "updated_at": now} for sha, sop in inputs]
        with self._begin() as conn:
            if stmts is not None:
                self._upsert_instances(conn, stmts, instances, True, replaced,
                                       self.node_name)
            insert = self._watch_input_insert()
            if insert is not None:
                conn.execute(insert, rows)
                return
            for row in rows:
                try:
                    with conn.begin_nested():
                        conn.execute(watch_inputs.insert().values(row))
                except IntegrityError:
                    pass

    def mark_watch_inputs(self, watch: str, sop_instance_uids: Sequence[str],
                          state: str = "queued") -> None:
        """Move the inputs carrying these SOP Instance UIDs from "stored" to ``state``."""
        with self._begin() as conn:
            _mark_watch_inputs(conn, watch, sop_instance_uids, state, utcnow())

    def pending_watch_instances(self, watch: str) -> list[InstanceRecord]:
        """Instances taken in from ``watch`` whose group never became a job (a crash)."""
        q = (
            sa.select(instances)
            .join(watch_inputs, watch_inputs.c.sop_instance_uid == instances.c.sop_instance_uid)
            .where(watch_inputs.c.watch == watch, watch_inputs.c.state == "stored")
            .order_by(instances.c.id)
        )
        if self.node_name is None or self.dialect == "sqlite":
            with self.engine.connect() as conn:
                return [_instance(r) for r in conn.execute(q)]
        # Another machine's drop folder of the same name is that machine's; one recorded
        # before receiving nodes were is the one whose file is on this machine's disk.
        q = q.where(sa.or_(instances.c.received_by == self.node_name,
                           instances.c.received_by.is_(None)))
        with self.engine.connect() as conn:
            return [_instance(r) for r in conn.execute(q)
                    if r.received_by is not None or Path(r.path).is_file()]

    def count_watch_inputs(self, watch: str | None = None) -> dict[str, int]:
        """Inputs per state, for one drop folder or all."""
        q = sa.select(watch_inputs.c.state, sa.func.count()).group_by(watch_inputs.c.state)
        if watch is not None:
            q = q.where(watch_inputs.c.watch == watch)
        with self.engine.connect() as conn:
            return {str(state): int(n) for state, n in conn.execute(q)}

    # -- integer ids, projects and batches (seed 002) ------------------------------------

    def integer_ids(self, kind: str, names: Iterable[str]) -> dict[str, int]:
        """The stable integer id of each name of ``kind``, assigning new ones on first sight."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}
        q = sa.select(integer_ids.c.name, integer_ids.c.id).where(integer_ids.c.kind == kind)
        with self._begin() as conn:
            known = {r.name: int(r.id) for r in conn.execute(q)}
            missing = [n for n in wanted if n not in known]
            now = utcnow()
            for name in missing:
                try:
                    with conn.begin_nested():  # another process may assign it first
                        conn.execute(integer_ids.insert().values(kind=kind, name=name,
                                                                 created_at=now))
                except IntegrityError:
                    pass
            if missing:
                known = {r.name: int(r.id) for r in conn.execute(q)}
        return {n: known[n] for n in wanted}

    def name_of_id(self, kinds: Collection[str], id_: int) -> tuple[str, str] | None:
        """``(kind, name)`` of an integer id assigned to one of ``kinds``, or None."""
        q = sa.select(integer_ids.c.kind, integer_ids.c.name).where(
            integer_ids.c.id == id_, integer_ids.c.kind.in_(list(kinds)))
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return (str(row.kind), str(row.name)) if row else None

    def called_ae_titles(self) -> list[str]:
        """Every called AE title a study the node holds was received under."""
        q = (sa.select(study_called_aes.c.called_ae).distinct()
             .order_by(study_called_aes.c.called_ae))
        with self.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(q)]

    def watch_names(self) -> list[str]:
        """Every drop folder files were taken in from."""
        q = sa.select(watch_inputs.c.watch).distinct().order_by(watch_inputs.c.watch)
        with self.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(q)]

    def project_studies(
        self, *, called_ae: str | None = None, watch: str | None = None,
        ids: Collection[int] | None = None, limit: int = 1000, offset: int = 0,
    ) -> list[StudyRecord]:
        """Studies received under a called AE title or taken in from a drop folder.

        A study is in the project of each AE title and drop folder it came to, whichever
        way its instances came last. ``ids`` restricts the answer to those study ids
        (those not in the project are simply absent).
        """
        if (called_ae is None) == (watch is None):
            raise ValueError("give exactly one of called_ae and watch")
        if called_ae is not None:
            members = sa.select(study_called_aes.c.study_instance_uid).where(
                study_called_aes.c.called_ae == called_ae)
        else:
            members = (sa.select(instances.c.study_instance_uid)
                       .join(watch_inputs,
                             watch_inputs.c.sop_instance_uid == instances.c.sop_instance_uid)
                       .where(watch_inputs.c.watch == watch))
        q = sa.select(studies).where(studies.c.study_instance_uid.in_(members))
        if ids is not None:
            q = q.where(studies.c.id.in_(list(ids)))
        q = q.order_by(studies.c.id).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            rows = list(conn.execute(q))
            uids = [r.study_instance_uid for r in rows]
            counts: dict[str, dict[str, int]] = {}
            if uids:
                per = (sa.select(instances.c.study_instance_uid, instances.c.modality,
                                 sa.func.count())
                       .where(instances.c.study_instance_uid.in_(uids))
                       .group_by(instances.c.study_instance_uid, instances.c.modality))
                for uid, modality, n in conn.execute(per):
                    counts.setdefault(uid, {})[modality or ""] = int(n)
        return [StudyRecord(
            id=int(r.id), study_instance_uid=r.study_instance_uid,
            patient_id=r.patient_id or "", accession_number=r.accession_number or "",
            study_date=r.study_date or "",
            modalities=sorted(m for m in counts.get(r.study_instance_uid, {}) if m),
            instances=sum(counts.get(r.study_instance_uid, {}).values()),
            created_at=r.created_at, updated_at=r.updated_at) for r in rows]

    def create_batch(
        self, *, group_name: str, owner: str | None, project_id: int, pipeline: str,
        output_layer_id: int, sources: Sequence[tuple[int, NewJob]],
    ) -> Batch:
        """Record a batch and queue one job per source, in one transaction."""
        if not sources:
            raise ValueError("a batch needs at least one source")
        now = utcnow()
        with self._begin() as conn:
            batch_id = int(conn.execute(batches.insert().values(
                group_name=group_name, owner=owner, project_id=project_id, pipeline=pipeline,
                output_layer_id=output_layer_id, created_at=now)).inserted_primary_key[0])
            for position, (source_id, new) in enumerate(sources):
                # A batch job reads the study's instances where they were received.
                if self._home is not None and new.home is None:
                    new = dataclasses.replace(new, home=_holder(conn, new))
                # distinct creation times: jobs of equal priority are claimed in this order
                job_id = self._insert_job(conn, new, now + timedelta(microseconds=position))
                conn.execute(batch_sources.insert().values(
                    batch_id=batch_id, position=position, source_id=source_id, job_id=job_id))
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: int) -> Batch:
        """A batch with its jobs; raises NotFound."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
            if row is None:
                raise NotFound(f"no batch inference job {batch_id}")
            q = (sa.select(batch_sources.c.source_id, jobs)
                 .join(jobs, jobs.c.id == batch_sources.c.job_id)
                 .where(batch_sources.c.batch_id == batch_id)
                 .order_by(batch_sources.c.position))
            sources = []
            for r in conn.execute(q):
                m = dict(r._mapping)
                source_id = int(m.pop("source_id"))
                sources.append((source_id, Job.from_mapping(m)))
        return Batch(id=int(row.id), group_name=row.group_name, owner=row.owner,
                     project_id=int(row.project_id), pipeline=row.pipeline,
                     output_layer_id=int(row.output_layer_id), created_at=row.created_at,
                     sources=sources)

    # -- runtime configuration ----------------------------------------------------------

    def config_objects(self) -> dict[str, dict[str, dict[str, Any] | None]]:
        """Every runtime config object: ``{kind: {name: body-or-None}}``."""
        out: dict[str, dict[str, dict[str, Any] | None]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(sa.select(config_objects)):
                out.setdefault(r.kind, {})[r.name] = r.body
        return out

    def put_config_object(self, kind: str, name: str, body: dict[str, Any] | None) -> None:
        """Create, replace or (with ``body=None``) tombstone one runtime config object."""
        now = utcnow()
        key = (config_objects.c.kind == kind) & (config_objects.c.name == name)
        try:
            with self._begin() as conn:
                found = conn.execute(sa.select(config_objects.c.name).where(key)).first()
                if found:
                    conn.execute(config_objects.update().where(key).values(body=body,
                                                                           updated_at=now))
                else:
                    conn.execute(config_objects.insert().values(kind=kind, name=name,
                                                                body=body, updated_at=now))
        except IntegrityError:  # another node sharing the database made it just now
            raise Conflict(f"{kind} {name!r} was just created elsewhere; read it and use "
                           "PUT to change it") from None

    # -- helpers -------------------------------------------------------------------------

    def _begin(self) -> Any:
        return self.engine.begin()

    @staticmethod
    def _event(
        conn: Connection, job_id: str, state: JobState, message: str | None, at: datetime
    ) -> None:
        conn.execute(job_events.insert().values(job_id=job_id, at=at, state=state.value,
                                                message=message))


def _id_prefix(prefix: str, dialect: str) -> Any:
    """``jobs.id`` starts with ``prefix``. On SQLite a range (``prefix <= id <
    prefix_next``), which the primary key's index serves (a LIKE scans the table).
    PostgreSQL's text order follows the database's collation, in which a range need not
    hold exactly the strings with that prefix: there, LIKE."""
    like = jobs.c.id.startswith(prefix, autoescape=True)
    if dialect != "sqlite" or not prefix or ord(prefix[-1]) >= 0x10FFFF:
        return like
    following = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return sa.and_(jobs.c.id >= prefix, jobs.c.id < following)


def _holder(conn: Connection, new: NewJob) -> str | None:
    """The node that received most of ``new``'s input instances (none recorded: None),
    whose own storage holds their files."""
    uids = [u for u in new.input.get("instances", []) if isinstance(u, str)]
    counts: dict[str, int] = {}
    for i in range(0, len(uids), 500):
        for node, n in conn.execute(
                sa.select(instances.c.received_by, sa.func.count())
                .where(instances.c.sop_instance_uid.in_(uids[i:i + 500]),
                       instances.c.received_by.is_not(None))
                .group_by(instances.c.received_by)):
            counts[str(node)] = counts.get(str(node), 0) + int(n)
    return max(counts, key=lambda node: counts[node]) if counts else None


def _only_home(home: str | None) -> str:
    """What a job's history says of its home (see ``jobs.home``)."""
    if home is None:
        return ""
    return (f"; only {home} runs it: its input is in {home}'s own storage "
            "(storage.shared is off)")


def _any_pending(conn: Connection, sop_instance_uids: Sequence[str]) -> bool:
    """Whether any of these instances is recorded and not yet queued."""
    uids = list(dict.fromkeys(sop_instance_uids))
    for i in range(0, len(uids), 500):  # bounded IN lists
        if conn.execute(sa.select(instances.c.id)
                        .where(instances.c.sop_instance_uid.in_(uids[i:i + 500]),
                               instances.c.queued_at.is_(None))
                        .limit(1)).first() is not None:
            return True
    return False


def _mark_queued(conn: Connection, sop_instance_uids: Sequence[str], now: datetime) -> None:
    """Set ``queued_at`` of these instances (their group became jobs)."""
    uids = list(dict.fromkeys(sop_instance_uids))
    for i in range(0, len(uids), 500):  # bounded IN lists
        conn.execute(instances.update()
                     .where(instances.c.sop_instance_uid.in_(uids[i:i + 500]))
                     .values(queued_at=now))


def _mark_watch_inputs(conn: Connection, watch: str, sop_instance_uids: Sequence[str],
                       state: str, now: datetime) -> None:
    """Move drop folder ``watch``'s inputs carrying these SOP UIDs from "stored" to ``state``."""
    uids = list(dict.fromkeys(sop_instance_uids))
    for i in range(0, len(uids), 500):
        conn.execute(
            watch_inputs.update()
            .where(watch_inputs.c.watch == watch, watch_inputs.c.state == "stored",
                   watch_inputs.c.sop_instance_uid.in_(uids[i:i + 500]))
            .values(state=state, updated_at=now)
        )


# Jobs the assembler makes from a group of pushed instances (see Store.retry).
GROUP_KINDS = frozenset({"dimse", "stow", "watch"})


def _received_elsewhere(study: Any, node_name: str) -> tuple[Any, ...]:
    """Conditions on ``instances``: of ``study`` (a UID or a column), received by a node
    other than ``node_name``."""
    return (instances.c.study_instance_uid == study, instances.c.received_by.is_not(None),
            instances.c.received_by != node_name)


def _came_the_same_way(job: Job, *columns: Any, any_way: bool = False
                       ) -> sa.Select[Any] | None:
    """The instances (``columns`` of them) of a group ``job``'s study that came the way
    its group did: to the same called AE title by the same service, or into the same drop
    folder, and to its home node when it has one; None when ``job`` was not made from a
    group."""
    study = job.input.get("study_instance_uid")
    if job.kind not in GROUP_KINDS or not study:
        return None
    q = sa.select(*columns).where(instances.c.study_instance_uid == study)
    if job.home is not None:  # only what its node holds: the others cannot read it
        q = q.where(instances.c.received_by == job.home)
    if any_way:
        return q
    if job.kind == "watch":
        if not job.input.get("watch"):
            return None
        return q.where(instances.c.sop_instance_uid.in_(
            sa.select(watch_inputs.c.sop_instance_uid)
            .where(watch_inputs.c.watch == job.input["watch"])))
    return q.where(instances.c.source == job.kind,
                   instances.c.called_ae == (job.called_ae or ""))


def _same_way(job: Job, other: Job) -> bool:
    """Whether two group jobs came the same way (see :func:`_came_the_same_way`)."""
    if job.kind != other.kind:
        return False
    if job.kind == "watch":
        return bool(job.input.get("watch")) and \
            job.input.get("watch") == other.input.get("watch")
    return (job.called_ae or "") == (other.called_ae or "")


def _regrouped(conn: Connection, job: Job) -> list[str] | None:
    """The instance list of a group's ``job`` with every instance of its study (or
    series) that the store now holds and that came the same way added, in the order
    they arrived; None when that adds none (or ``job`` was not made from a group)."""
    given = job.input.get("instances")
    q = _came_the_same_way(job, instances.c.sop_instance_uid)
    if q is None or not isinstance(given, list):
        return None
    if job.input.get("series_instance_uid"):
        q = q.where(instances.c.series_instance_uid == job.input["series_instance_uid"])
    known = set(given)
    more = [str(r[0]) for r in conn.execute(q.order_by(instances.c.id))
            if r[0] not in known]
    return [*given, *more] if more else None


def _unfinished_jobs(study: Any) -> sa.Select[Any]:
    """The ids of the jobs of ``study`` (a UID or a column) that are not final."""
    return sa.select(jobs.c.id).where(jobs.c.study_instance_uid == study,
                                      jobs.c.state.not_in([s.value for s in FINAL_STATES]))


def _pending_instances(study: Any) -> sa.Select[Any]:
    """The instances of ``study`` (a UID or a column) a sender was told were stored and
    that are not yet part of a job (the study is still arriving or waiting for its
    AE title's timeout)."""
    return sa.select(instances.c.id).where(
        instances.c.study_instance_uid == study, instances.c.queued_at.is_(None),
        instances.c.source.in_(["dimse", "stow"]))


def _instance(row: sa.Row[Any]) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        path=Path(row.path),
        size_bytes=row.size_bytes,
        source=row.source,
        patient_id=row.patient_id or "",
        modality=row.modality or "",
        transfer_syntax_uid=row.transfer_syntax_uid or "",
        called_ae=row.called_ae or "",
        calling_ae=row.calling_ae or "",
        received_at=row.received_at,
    )


__all__: Sequence[str] = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "PRIORITY_IMMEDIATE",
    "PRIORITY_NORMAL",
    "SCHEMA_VERSION",
    "SECRET_INPUT_KEYS",
    "ArtifactRecord",
    "Batch",
    "ExportRecord",
    "InstanceRecord",
    "Job",
    "JobEvent",
    "JobState",
    "NewJob",
    "SeriesRecord",
    "Store",
    "StudyRecord",
    "redact_secrets",
    "utcnow",
]
