"""The node's settings: one frozen, typed object loaded from YAML + environment + CLI.

Loading order (later wins): built-in defaults, the YAML file, ``DICOM_NODE_…``
environment variables (``__`` separates nested keys, e.g.
``DICOM_NODE_DIMSE__PORT=11113``), then CLI overrides. The problems are raised
together as one :class:`ConfigError`, each naming the file, the key path and what is
wrong (an unknown key with the one meant, when it is close).

Relative paths inside the settings are relative to ``storage.data_dir``, so
moving the data directory moves the store, the studies, the results and the
drop folder together.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_node.digits import ascii_int
from dicom_node.tls import TlsFileError, client_context, readable_by_others, server_context
from pipeline.settings import ModelSpec, PipelineSpec

ENV_PREFIX = "DICOM_NODE_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# AE titles: up to 16 characters of the Default Character Repertoire, no backslash
# or control characters, not all spaces (PS3.5 6.2).
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ConfigError(Exception):
    """A setting is wrong; the message names the file and the key path, one line per
    problem (``more``: those after the first)."""

    def __init__(self, source: str, key: str, problem: str,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.more = list(more)
        lines = [f"{source}: {k}: {p}" if k else f"{source}: {p}"
                 for k, p in [(key, problem), *self.more]]
        super().__init__("\n".join(lines))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            "must be 1-16 printable ASCII characters, no backslash, not all spaces"
        )
    return value.strip()


_UID_TEXT = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(text: str) -> bool:
    """``text`` is a DICOM UID: digits and dots, at most 64 characters."""
    return len(text) <= 64 and _UID_TEXT.match(text) is not None


def _sop_class_keywords() -> dict[str, str]:
    """pydicom's SOP Class keywords (``CTImageStorage``) and their UIDs."""
    from pydicom._uid_dict import UID_dictionary

    return {v[4]: uid for uid, v in UID_dictionary.items() if v[1] == "SOP Class" and v[4]}


def _check_sop_classes(values: list[str]) -> list[str]:
    """SOP Class UIDs, each given as a UID (private ones too) or a keyword such as
    ``CTImageStorage``; keywords become their UIDs."""
    keywords: dict[str, str] | None = None
    out = []
    for raw in values:
        value = str(raw).strip()
        if is_uid(value):
            out.append(value)
            continue
        keywords = keywords if keywords is not None else _sop_class_keywords()
        if value in keywords:
            out.append(keywords[value])
            continue
        close = difflib.get_close_matches(value, list(keywords), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{value!r} is neither a UID (digits and dots, at most 64) nor a "
                         f"SOP Class keyword such as 'CTImageStorage'{hint}")
    return list(dict.fromkeys(out))


class Grouping(StrEnum):
    STUDY = "study"
    SERIES = "series"


class DuplicatePolicy(StrEnum):
    OVERWRITE = "overwrite"
    KEEP_FIRST = "keep_first"


class TlsSettings(_Section):
    """TLS for a listener or a connection; paths are relative to the data directory."""

    certificate: Path
    private_key: Path
    ca_certificate: Path | None = None  # when set, peers must present a certificate it signed


class StorageSettings(_Section):
    data_dir: Path = Path("data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/node.db
    studies_dir: Path = Path("studies")
    results_dir: Path = Path("results")
    # studies_dir and results_dir are on a filesystem every node on the database mounts
    # (absolute paths, the same on each machine): any node may run any job, and take
    # over a dead node's pending instances. Off: a job runs on the node holding its files.
    shared: bool = False
    min_free_mb: int = Field(default=500, ge=0)
    # Days after a study last received an instance before its files are deleted (and
    # days after a job finished before its results folder is); null keeps everything.
    retention_days: float | None = Field(default=None, gt=0, le=36_500)
    retention_check_s: float = Field(default=3600, ge=10, le=86_400)
    # The file mode mask `serve` works under (octal): results, reports and folders it
    # makes hold patient data. 027: the node's group may read them, other users not.
    umask: str = Field(default="027", pattern=r"^0?[0-7]{3}$")

    @field_validator("database_url")
    @classmethod
    def _database(cls, v: str | None) -> str | None:
        """A URL of a database the store supports; the message never repeats the URL
        (it may hold a password)."""
        if v is None:
            return v
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(v).get_backend_name()
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL: give sqlite:///FILE or "
                             "postgresql://USER@HOST/DATABASE") from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}: the store runs on SQLite "
                             "(sqlite:///FILE) or PostgreSQL (postgresql://USER@HOST/DB)")
        return v


class DimseSettings(_Section):
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=25, ge=1, le=1000)
    maximum_pdu_size: int = Field(default=0, ge=0)
    acse_timeout_s: float = Field(default=30, gt=0)
    dimse_timeout_s: float = Field(default=30, gt=0)
    network_timeout_s: float = Field(default=60, gt=0)
    tls: TlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class AETitleSettings(_Section):
    """A called AE title the node answers to, and what it does with what it receives."""

    ae_title: str
    pipelines: list[str] = Field(default_factory=list)
    grouping: Grouping = Grouping.STUDY
    timeout_s: float = Field(default=5.0, gt=0, le=86_400)
    complete_on_release: bool = True
    sources: list[str] = Field(default_factory=list)  # names in `sources`
    reject_unknown_sources: bool = False
    # UIDs or keywords. Empty: every storage SOP class pynetdicom knows. A class named
    # in either list is negotiated even when pynetdicom does not know it (private ones).
    allowed_sop_classes: list[str] = Field(default_factory=list)
    ignored_sop_classes: list[str] = Field(default_factory=list)  # answered Success, not kept
    duplicates: DuplicatePolicy = DuplicatePolicy.OVERWRITE

    _ae = field_validator("ae_title")(_check_ae_title)
    _sop = field_validator("allowed_sop_classes", "ignored_sop_classes")(_check_sop_classes)


class SourceSettings(_Section):
    """A peer that sends to us or that we retrieve from (a PACS)."""

    name: str = Field(pattern=_NAME)
    ae_title: str
    host: str
    port: int = Field(default=104, ge=1, le=65535)
    retrieve: Literal["c-move", "c-get"] = "c-move"
    dicomweb_url: str | None = None
    tls: TlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class RetrySettings(_Section):
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff_s: float = Field(default=2.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): doubling
        from ``backoff_s``, at most ``backoff_max_s``."""
        return float(min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))


class DestinationSettings(_Section):
    """Where results go: a DIMSE peer (C-STORE), a DICOMweb server (STOW-RS) or a folder."""

    name: str = Field(pattern=_NAME)
    type: Literal["dimse", "dicomweb", "folder"]
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = None
    path: Path | None = None
    tls: TlsSettings | None = None
    auth: Literal["none", "basic", "bearer"] = "none"  # DICOMweb
    credentials: str | None = None  # "user:password" for basic, the token for bearer
    retry: RetrySettings = Field(default_factory=RetrySettings)

    @model_validator(mode="after")
    def _needs(self) -> DestinationSettings:
        required = {
            "dimse": ("ae_title", "host", "port"), "dicomweb": ("url",), "folder": ("path",)
        }
        missing = [k for k in required[self.type] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a {self.type} destination needs {', '.join(missing)}")
        if self.ae_title is not None:
            _check_ae_title(self.ae_title)
        return self


class WatchSettings(_Section):
    """A drop folder."""

    name: str = Field(pattern=_NAME)
    path: Path
    pipelines: list[str] = Field(default_factory=list)
    grouping: Grouping = Grouping.STUDY
    output: Path | None = None  # default: <results_dir>/<name>
    destinations: list[str] = Field(default_factory=list)
    on_done: Literal["move", "delete", "keep"] = "move"
    recursive: bool = True
    settle_s: float = Field(default=2.0, ge=0)
    timeout_s: float = Field(default=5.0, gt=0)
    # A full sweep this often finds files inotify never reported: written from another
    # host to a network share (NFS, SMB), or dropped when its event queue overflowed.
    rescan_s: float = Field(default=30.0, ge=1, le=86_400)
    # A DICOM file (or zip) that reads as cut short is most likely still being written
    # (a writer pausing mid-file): it is refused only once unchanged this long. None:
    # max(60 s, 10 x settle_s). Other refusals (not DICOM at all...) are immediate.
    truncated_grace_s: float | None = Field(default=None, ge=0)


class RestSettings(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=5000, ge=1, le=65535)
    # Largest request body of the JSON and image APIs (STOW-RS has stow_max_mb): a large
    # radiograph sent as base64 fits; a 50 MB upload is refused with 413.
    max_body_mb: float = Field(default=32, gt=0)
    # Connections the HTTP server holds at once (one more is closed at once), and how
    # long one may take to send a complete request head: a client holding many half-sent
    # requests must not take the file descriptors DICOM intake needs (rest/connections).
    max_connections: int = Field(default=256, ge=1, le=100_000)
    request_head_timeout_s: float = Field(default=30, gt=0, le=3600)
    # Server-side paths named in requests must resolve inside one of these.
    allowed_roots: list[Path] = Field(
        default_factory=lambda: [Path("."), PROJECT_ROOT / "samples"]
    )
    # The pipeline POST /single_inference runs (seed 001 names no model); None: the
    # first classify pipeline.
    single_inference_pipeline: str | None = None
    allow_any_url: bool = False
    # Hosts (``name`` or ``name:port``) that seed 003's image endpoints may download
    # image URLs from; empty: image URLs are refused, only base64 images are taken.
    image_url_hosts: list[str] = Field(default_factory=list)
    tls: TlsSettings | None = None
    # STOW-RS intake (POST /dicomweb/studies) files instances as if they were sent to
    # this called AE title: its pipelines, grouping, timeout, SOP class and duplicate
    # policies apply. None: the node's own AE title (dimse.ae_title).
    stow_ae_title: str | None = None
    stow_max_mb: float = Field(default=4096, gt=0)  # one STOW-RS request, all parts
    # The base URL clients reach the node at (behind a proxy), for the Retrieve URLs of
    # STOW-RS answers; None: taken from each request.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")

    @field_validator("stow_ae_title")
    @classmethod
    def _stow_ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae_title(v)

    @field_validator("image_url_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for h in hosts:
            host = h.strip().lower()
            if not re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?", host):
                raise ValueError(f"{h!r} is not a host name or host:port (no scheme, no path)")
            out.append(host)
        return out


Scope = Literal["infer", "read", "admin"]
Algorithm = Literal["HS256", "RS256", "ES256"]


class ApiKeySettings(_Section):
    name: str = Field(pattern=_NAME)
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    group: str = "default"
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["infer", "read"]))
    # Seed 002's "Model Run" permission: the projects (called AE titles or drop folders,
    # by name, or by the integer id GET /v1/projects shows) whose sources the key may
    # list and run batches on. None: every project (a file's `projects:` left empty is
    # refused at load: see _empty_projects).
    projects: list[StrictStr | StrictInt] | None = None


class AuthSettings(_Section):
    jwt_secret_file: Path = Path("jwt_secret")
    jwt_public_key_file: Path | None = None
    algorithms: list[Algorithm] = Field(default_factory=lambda: list[Algorithm](["HS256"]))
    audience: str | None = None
    issuer: str | None = None
    token_default_expiry_s: int = Field(default=3600, ge=1)
    api_keys: list[ApiKeySettings] = Field(default_factory=list)
    # The scopes a request without credentials gets on the model-serving routes (seed
    # 003's, /metrics, seed 004's /predictions and /models): [read] lets Prometheus scrape
    # /metrics without a token, [infer] lets seed-003 clients on a trusted network
    # classify. Empty: those routes need credentials, as every other route always does.
    anonymous_scopes: list[Scope] = Field(default_factory=list)

    @field_validator("anonymous_scopes")
    @classmethod
    def _anonymous(cls, scopes: list[Scope]) -> list[Scope]:
        if "admin" in scopes:
            raise ValueError("admin is never given to requests without credentials: it "
                             "changes the configuration; give an API key or a token the "
                             "admin scope instead")
        return list(dict.fromkeys(scopes))


class ExecutorSettings(_Section):
    # Jobs run in threads of the node's own process; no other executor is built yet, so
    # asking for one (a Celery queue) is a configuration error, not a silent fallback.
    kind: Literal["thread"] = "thread"
    workers: int = Field(default=1, ge=1, le=64)
    # One more worker that takes only priority-255 ("immediate") jobs, so that such a
    # request starts at once even while every worker is busy (nothing is pre-empted).
    immediate_slot: bool = True
    runner: str = Field(default="dicom_node.handler:create_handler", pattern=r"^[\w.]+:\w+$")
    retry: RetrySettings = Field(default_factory=RetrySettings)
    grace_period_s: float = Field(default=30.0, ge=0)
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    lease_s: float = Field(default=60.0, gt=1)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


# The demo models ship in the source tree (trained by pipeline/train, see their READMEs),
# so a fresh `make run` answers a chest X-ray or a CT with real results.
DEMO_PIPELINE_NAMES = ("cxr-findings", "ct-organs")


def demo_models() -> list[ModelSpec]:
    return [ModelSpec(name="cxr-findings", path=Path("pipeline/models/cxr-findings")),
            ModelSpec(name="ct-organs", path=Path("pipeline/models/ct-organs"))]


def demo_pipelines() -> list[PipelineSpec]:
    return [
        PipelineSpec.model_validate({
            "name": "cxr-findings", "model": "cxr-findings", "task": "classify",
            # configs/node.yaml's: a chest radiograph (an image that names no body part
            # included), frontal
            "series": {"modalities": ["CR", "DX"], "body_parts": ["CHEST"],
                       "view_positions": ["PA", "AP"]},
            "outputs": ["json", "png", "pdf", "sr", "sc", "encapsulated_pdf"]}),
        PipelineSpec.model_validate({
            "name": "ct-organs", "model": "ct-organs", "task": "segment",
            "series": {"modalities": ["CT"], "min_instances": 8},
            "outputs": ["json", "png", "pdf", "seg", "sr"]}),
    ]


class Settings(_Section):
    """Everything the node needs to start; valid once constructed."""

    node_name: str = Field(default="dicom-node", pattern=_NAME)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    dimse: DimseSettings = Field(default_factory=DimseSettings)
    ae_titles: list[AETitleSettings] = Field(
        default_factory=lambda: [AETitleSettings(ae_title="DICOMNODE")]
    )
    sources: list[SourceSettings] = Field(default_factory=list)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    models: list[ModelSpec] = Field(default_factory=list)
    pipelines: list[PipelineSpec] = Field(default_factory=list)
    watch: list[WatchSettings] = Field(
        default_factory=lambda: [WatchSettings(name="inbox", path=Path("inbox"))]
    )
    rest: RestSettings = Field(default_factory=RestSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @model_validator(mode="before")
    @classmethod
    def _demo_defaults(cls, data: Any) -> Any:
        """With neither ``models`` nor ``pipelines`` given, the node runs the demo models,
        and the default AE title and drop folder (when not given) feed them. A file
        that names its own models gets no demo pipelines to trip over."""
        if not isinstance(data, dict) or "models" in data or "pipelines" in data:
            return data
        data = {**data, "models": demo_models(), "pipelines": demo_pipelines()}
        names = list(DEMO_PIPELINE_NAMES)
        data.setdefault("ae_titles", [AETitleSettings(ae_title="DICOMNODE", pipelines=names)])
        data.setdefault("watch", [WatchSettings(name="inbox", path=Path("inbox"),
                                                pipelines=names)])
        return data

    @model_validator(mode="after")
    def _references(self) -> Settings:
        """Names used in one section must exist in another; names are unique. Every
        problem is named at once, not one a run."""
        found: list[tuple[str, str]] = []
        _unique(found, "ae_titles", [a.ae_title for a in self.ae_titles])
        _unique(found, "sources", [s.name for s in self.sources])
        _unique(found, "destinations", [d.name for d in self.destinations])
        _unique(found, "pipelines", [p.name for p in self.pipelines])
        _unique(found, "watch", [w.name for w in self.watch])
        _unique(found, "models", [f"{m.name}@{m.version}" for m in self.models if m.version])
        pipelines = {p.name for p in self.pipelines}
        destinations = {d.name for d in self.destinations}
        sources = {s.name for s in self.sources}
        models = {m.name for m in self.models}
        for i, ae in enumerate(self.ae_titles):
            _known(found, f"ae_titles.{i}.pipelines", ae.pipelines, pipelines, "pipelines")
            _known(found, f"ae_titles.{i}.sources", ae.sources, sources, "sources")
        if self.rest.stow_ae_title is not None:
            _known(found, "rest.stow_ae_title", [self.rest.stow_ae_title],
                   {a.ae_title for a in self.ae_titles}, "ae_titles")
        for i, w in enumerate(self.watch):
            _known(found, f"watch.{i}.pipelines", w.pipelines, pipelines, "pipelines")
            _known(found, f"watch.{i}.destinations", w.destinations, destinations,
                   "destinations")
        name = self.rest.single_inference_pipeline
        if (name is not None
                and _known(found, "rest.single_inference_pipeline", [name], pipelines,
                           "pipelines")
                and next(p for p in self.pipelines if p.name == name).task != "classify"):
            found.append(("rest.single_inference_pipeline",
                          f"pipeline {name!r} does not classify"))
        for i, p in enumerate(self.pipelines):
            _known(found, f"pipelines.{i}.model", [p.model], models, "models")
            _known(found, f"pipelines.{i}.destinations", p.destinations, destinations,
                   "destinations")
        if self.rest.enabled and self.rest.port == self.dimse.port:
            found.append(("rest.port", f"{self.rest.port} is dimse.port too; the HTTP and "
                                       "DICOM listeners need a port each"))
        self._folders_apart(found)
        if self.storage.shared:
            for key in ("studies_dir", "results_dir"):
                if not getattr(self.storage, key).expanduser().is_absolute():
                    found.append((f"storage.{key}", "with storage.shared, give the absolute "
                                  "path of the folder on the filesystem every node mounts "
                                  "(a relative one is inside each node's own data_dir)"))
        if found:
            raise _KeyedError(*found[0], more=found[1:])
        return self

    def _folders_apart(self, found: list[tuple[str, str]]) -> None:
        """The node's own folders do not overlap, and nothing else writes into them: a
        drop folder over the studies would move them away, a folder destination inside a
        drop folder would feed the node its own results."""
        owned = self.node_folders()
        keys = list(owned)
        for i, key in enumerate(keys):
            for other in keys[:i]:
                a, b = owned[key], owned[other]
                if a.is_relative_to(b) or b.is_relative_to(a):
                    found.append((key, f"{a} overlaps {other} ({b}); the node's folders "
                                       "must be apart"))
        writers = [(f"watch.{i}.output", w.output) for i, w in enumerate(self.watch)]
        writers += [(f"destinations.{i}.path", d.path) for i, d in enumerate(self.destinations)
                    if d.type == "folder"]
        for key, path in writers:
            if path is None:
                continue
            holder = self.node_folder_holding(self.path(path))
            if holder is not None and holder != "storage.results_dir":  # results: outputs
                found.append((key, f"{path} is inside {holder}, which the node fills and "
                                   "empties itself; name a folder of your own"))

    # -- derived paths -------------------------------------------------------------

    def node_folders(self) -> dict[str, Path]:
        """The folders the node fills and empties itself, resolved, by their settings key:
        the studies, the results and every drop folder."""
        folders = {"storage.studies_dir": self.studies_dir,
                   "storage.results_dir": self.results_dir}
        folders.update({f"watch.{i}.path": self.path(w.path) for i, w in enumerate(self.watch)})
        return {key: _resolved(p) for key, p in folders.items()}

    def node_folder_holding(self, path: Path) -> str | None:
        """The settings key of the node's own folder that holds ``path`` (links followed)."""
        target = _resolved(path)
        return next((key for key, folder in self.node_folders().items()
                     if target.is_relative_to(folder)), None)

    def path(self, p: Path) -> Path:
        """Resolve a configured path: relative ones are relative to the data directory."""
        p = p.expanduser()
        return p if p.is_absolute() else self.storage.data_dir / p

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.data_dir / 'node.db').resolve()}"

    @property
    def studies_dir(self) -> Path:
        return self.path(self.storage.studies_dir)

    @property
    def results_dir(self) -> Path:
        return self.path(self.storage.results_dir)

    @property
    def jwt_secret_file(self) -> Path:
        return self.path(self.auth.jwt_secret_file)

    def model_path(self, spec: ModelSpec) -> Path:
        """Model paths are relative to the source tree's root (where bundles ship), or absolute."""
        p = spec.path.expanduser()
        return p if p.is_absolute() else PROJECT_ROOT / p

    def stow_ae(self) -> AETitleSettings:
        """The called AE title whose policies STOW-RS intake follows."""
        called = self.rest.stow_ae_title or self.dimse.ae_title
        return self.ae_title(called) or AETitleSettings(ae_title=called)

    def ae_title(self, called: str) -> AETitleSettings | None:
        for ae in self.ae_titles:
            if ae.ae_title == called.strip():
                return ae
        return None

    def warnings(self) -> list[str]:
        """Settings that are valid but most likely not what was meant, each as
        ``key: what happens``; ``check-config`` prints them and ``serve`` logs them.

        A drop folder without pipelines takes files (and moves them to ``done/``) but
        makes no job: nobody drops files only to archive them. An AE title without
        pipelines is not warned about: an archive AE title that only stores is a
        common, deliberate setup.
        """
        found = [f"watch.{i}.pipelines: drop folder {w.name} has no pipelines: files are "
                 "stored, no job is made" for i, w in enumerate(self.watch) if not w.pipelines]
        # A private key others can read is a leaked key; it still works, so not an error.
        found += [f"{key}.private_key: {self.path(tls.private_key)} is readable by group or "
                  f"others; make it readable only by the node's user (chmod 600)"
                  for key, tls in _tls_blocks(self)
                  if readable_by_others(self.path(tls.private_key))]
        if self.storage.shared and self.database_url.startswith("sqlite"):
            found.append("storage.shared: the store is SQLite, one machine's: nodes share "
                         "work only through PostgreSQL (storage.database_url)")
        if "infer" in self.auth.anonymous_scopes:
            found.append("auth.anonymous_scopes: anyone who reaches the HTTP port runs the "
                         "models without credentials (/classify_image, /embed_image, /infer, "
                         "/embed, /predictions); keep it to a trusted network")
        return found


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: compare it as written
        return path.absolute()


def _unique(found: list[tuple[str, str]], section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            found.append((f"{section}.{i}", f"duplicate name {n!r}"))
        seen.add(n)


def _known(found: list[tuple[str, str]], key: str, used: list[str], defined: set[str],
           section: str) -> bool:
    """Whether every name in ``used`` is defined; a problem in ``found`` for each not."""
    missing = [(i, name) for i, name in enumerate(used) if name not in defined]
    found.extend((f"{key}.{i}" if len(used) > 1 else key, f"{name!r} is not defined in {section}")
                 for i, name in missing)
    return not missing


class _KeyedError(ValueError):
    """A cross-reference problem that knows its own key path (and any more found with it)."""

    def __init__(self, key: str, problem: str,
                 more: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem
        self.more = list(more)


# -- loading -------------------------------------------------------------------------


def default_config_path() -> Path:
    """The embedded default configuration shipped with the source tree."""
    return Path(__file__).resolve().parent.parent / "configs" / "node.yaml"


def load_settings(
    path: Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Load settings from ``path`` (or the built-in defaults), the environment and overrides.

    ``overrides`` use dotted keys (``{"dimse.port": 11113}``). Raises
    :class:`ConfigError` naming the file and key on any problem.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(path)
    env = os.environ if environ is None else environ
    set_by: dict[str, str] = {}  # dotted key -> the variable or option that set it
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, keys, value, f"environment variable {name}")
        set_by[".".join(keys)] = f"environment variable {name}"
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted.split("."), value, f"override {dotted}")
            set_by[dotted] = f"override {dotted}"
    if problem := _empty_projects(data):
        raise ConfigError(source, *problem)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = [(k, _with_origin(k, p, set_by))
                    for err in exc.errors() for k, p in _problems(err)]
        raise ConfigError(source, *problems[0], more=problems[1:]) from None
    _check_files(settings, source)
    return settings


def _empty_projects(data: dict[str, Any]) -> tuple[str, str] | None:
    """(key, problem) for an API key whose ``projects:`` the file leaves empty (null):
    read as "every project" it failed open, where its writer meant a list still to be
    filled in. Checked on the file's data: settings dumped and read again carry None."""
    auth = data.get("auth")
    keys = auth.get("api_keys") if isinstance(auth, dict) else None
    for i, entry in enumerate(keys if isinstance(keys, list) else []):
        if isinstance(entry, dict) and "projects" in entry and entry["projects"] is None:
            return (f"auth.api_keys.{i}.projects",
                    "empty (null): give a list of project names or ids ([] for none), or "
                    "leave the key out for every project")
    return None


def _with_origin(key: str, problem: str, set_by: dict[str, str]) -> str:
    """``problem``, naming the environment variable or option that set ``key`` (a typo
    there is not in the file the message starts with)."""
    origin = set_by.get(key)
    return f"{problem} (set by {origin})" if origin else problem


def _problems(err: Any) -> list[tuple[str, str]]:
    """A pydantic error as (key path, what a person should read): one, or several for
    the cross-reference check."""
    loc = tuple(err["loc"])
    error = err.get("ctx", {}).get("error")
    if isinstance(error, _KeyedError):
        return [(error.key, error.problem), *error.more]
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        return [(key, "unknown key" + _hint(loc))]
    if err["type"] == "missing":
        return [(key, "required key is missing")]
    return [(key, err["msg"])]


def _hint(loc: tuple[Any, ...]) -> str:
    """What an unknown settings key at ``loc`` may have meant (see unknown_key_hint),
    or the top-level section it is when put inside another."""
    name = str(loc[-1])
    if len(loc) > 1 and name in Settings.model_fields:
        return f" ('{name}' is a top-level section)"
    return unknown_key_hint(Settings, loc)


def unknown_key_hint(root: type[BaseModel], loc: Sequence[Any]) -> str:
    """For an unknown key at ``loc`` (a pydantic error's location) in a body or file
    validated as ``root``: " (did you mean 'timeout_s'?)" when a key of its section is
    close, else " (known here: ...)" with the keys the section takes, else ""."""
    known = _keys_at(root, tuple(loc[:-1]))
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known here: {', '.join(known)})" if known else ""


def _keys_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys (aliases where a field has one) that the section of ``root`` at ``loc``
    takes, list positions skipped; empty when ``loc`` does not lead to a section."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = _fields(model).get(str(part)) if model is not None else None
        model = _section_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(_fields(model)) if model is not None else []


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {f.alias or name: f for name, f in model.model_fields.items()}


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The section (model) an annotation holds (``X``, ``list[X]``, ``X | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _section_in(arg)) is not None:
            return found
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: YAML keeps the last,
    so a second ``storage:`` section silently dropped the first's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {seen[key]}); YAML "
                    "would keep only the last", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(str(path), "", "file not found")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"),  # a SafeLoader
                           Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(str(path), where, f"not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot be read ({exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(str(path), "", "the top level must be a mapping of sections")
    return loaded


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any, origin: str) -> None:
    node: Any = data
    for k in keys[:-1]:
        if isinstance(node, list):
            index = ascii_int(k)
            if index is None or index >= len(node):
                raise ConfigError(origin, ".".join(keys), "list index out of range")
            node = node[index]
            continue
        node = node.setdefault(k, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(origin, ".".join(keys), f"{k!r} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        index = ascii_int(last)
        if index is None or index >= len(node):
            raise ConfigError(origin, ".".join(keys), "list index out of range")
        node[index] = value
    else:
        node[last] = value


def _tls_blocks(settings: Settings) -> list[tuple[str, TlsSettings]]:
    """Every TLS block in the settings, with its key path."""
    blocks: list[tuple[str, TlsSettings | None]] = [
        ("dimse.tls", settings.dimse.tls),
        ("rest.tls", settings.rest.tls),
    ]
    blocks += [(f"sources.{i}.tls", s.tls) for i, s in enumerate(settings.sources)]
    blocks += [(f"destinations.{i}.tls", d.tls) for i, d in enumerate(settings.destinations)]
    return [(key, tls) for key, tls in blocks if tls is not None]


def tls_problems(settings: Settings, tls: TlsSettings | None,
                 *, server: bool = False) -> list[tuple[str, str]]:
    """(field, problem) for a TLS block: a file that does not exist, else files that do
    not load together as the node will use them (certificate, key and CA): a key that
    does not match, a file that is not PEM or a key with a passphrase is a wrong
    setting, not a failure of the port or of the peer."""
    if tls is None:
        return []
    found = []
    for field in ("certificate", "private_key", "ca_certificate"):
        p = getattr(tls, field)
        if p is not None and not settings.path(p).is_file():
            found.append((field, f"file not found: {settings.path(p)}"))
    if found:
        return found
    ca = settings.path(tls.ca_certificate) if tls.ca_certificate is not None else None
    build = server_context if server else client_context
    try:
        build(settings.path(tls.certificate), settings.path(tls.private_key), ca)
    except TlsFileError as exc:
        found.append((exc.field, f"{exc.path}: {exc.problem}"))
    return found


def _check_files(settings: Settings, source: str) -> None:
    """Files the settings name must exist, and load: a typo should stop start-up, not a
    request."""
    for key, tls in _tls_blocks(settings):
        server = key in ("dimse.tls", "rest.tls")
        for field, problem in tls_problems(settings, tls, server=server):
            raise ConfigError(source, f"{key}.{field}", problem)
    # DICOMweb base URLs as their first use checks them (a password inside one was taken
    # here, then refused at the first export, and shown wherever the URL was).
    urls = [(f"destinations.{i}.url", d.url) for i, d in enumerate(settings.destinations)
            if d.type == "dicomweb" and d.url]
    urls += [(f"sources.{i}.dicomweb_url", s.dicomweb_url)
             for i, s in enumerate(settings.sources) if s.dicomweb_url]
    if urls:
        from dicom_node.dicomweb import validate_base_url  # it imports this module
        from dicom_node.errors import InvalidInput

        for key, url in urls:
            try:
                validate_base_url(url)
            except InvalidInput as exc:
                raise ConfigError(source, key, str(exc)) from None
    if settings.auth.jwt_public_key_file is not None:
        p = settings.path(settings.auth.jwt_public_key_file)
        if not p.is_file():
            raise ConfigError(source, "auth.jwt_public_key_file", f"file not found: {p}")
    for i, m in enumerate(settings.models):
        if not settings.model_path(m).exists():
            raise ConfigError(source, f"models.{i}.path", f"not found: {settings.model_path(m)}")

