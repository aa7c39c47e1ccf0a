"""ACR / Clara inference requests: ``POST /api/inference``, ``GET /api/inference/status/{id}``.

Contract: seed 000 (Clara DICOM Adapter's extension of the ACR DSI model API).
A request names studies on a PACS (by UID, patient or accession), one
``Algorithm`` resource naming the pipeline, sources to fetch from (DIMSE or
DICOMweb) and destinations for the results. It becomes one durable job.

By default a request may only name sources and destinations that match the
configuration, so the API cannot be used to reach arbitrary hosts;
``rest.allow_any_url`` lets an administrator allow any http/https URL.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)

from dicom_node.config import Settings, unknown_key_hint
from dicom_node.dicomweb import url_allowed
from dicom_node.digits import ascii_int
from dicom_node.store import ExportRecord, Job, JobEvent, JobState, NewJob
from rest.app import NODE, Route, json_body, principal
from rest.batch import cancelled_message
from rest.errors import ApiError

UID = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
# A C-FIND key with * or ? (or a backslash list) would match many patients' studies:
# a request names one patient or accession exactly.
_NO_WILDCARDS = r"^[^*?\\\x00-\x1f]+$"
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _spelled(*names: str, aliases: dict[str, str] | None = None) -> Any:
    """A validator that reads a string enum as Clara's JSON reader does: case ignored
    (``"dimse"``, ``"Query"``), plus its other spellings (``aliases``, lower case)."""
    known = {n.lower(): n for n in names} | (aliases or {})

    def read(value: Any) -> Any:
        if isinstance(value, str):
            return known.get(value.strip().lower(), value)
        return value
    return read


def _digits_as_int(value: Any) -> Any:
    if isinstance(value, str):
        number = ascii_int(value.strip(), max_digits=3)
        return value if number is None else number
    return value


_interface = _spelled("Algorithm", "DIMSE", "DICOMweb")
# Clara's InputInterfaceOperations has "WADO Retrieve" beside Retrieve
_operation = _spelled("QUERY", "RETRIEVE", "STORE", aliases={"wado retrieve": "RETRIEVE"})


class InstanceRef(_Model):
    SOPInstanceUID: list[UID] = Field(min_length=1)


class SeriesRef(_Model):
    SeriesInstanceUID: UID
    instances: list[InstanceRef] | None = None


class StudyRef(_Model):
    StudyInstanceUID: UID
    series: list[SeriesRef] | None = None


class Details(_Model):
    type: Annotated[Literal["DICOM_UID", "DICOM_PATIENT_ID", "ACCESSION_NUMBER"],
                    BeforeValidator(_spelled("DICOM_UID", "DICOM_PATIENT_ID",
                                             "ACCESSION_NUMBER"))]
    studies: list[StudyRef] | None = None
    PatientID: str | None = Field(default=None, min_length=1, max_length=64,
                                  pattern=_NO_WILDCARDS)
    accessionNumber: list[Annotated[str, Field(min_length=1, max_length=16,
                                               pattern=_NO_WILDCARDS)]] | None = None

    def problems(self, path: str) -> list[dict[str, str]]:
        """The field this detail type needs must be present."""
        need = {"DICOM_UID": "studies", "DICOM_PATIENT_ID": "PatientID",
                "ACCESSION_NUMBER": "accessionNumber"}[self.type]
        if not getattr(self, need):
            return [{"field": f"{path}.{need}", "message": f"required when type is {self.type}"}]
        return []


class InputMetadata(_Model):
    details: Details | None = None
    inputs: list[Details] | None = None


class ConnectionDetails(_Model):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    # Clara's Algorithm resource carries an id beside the name (its examples do); the
    # node names pipelines by name, so it is taken and not used.
    id: str | None = Field(default=None, max_length=256)
    uri: str | None = Field(default=None, max_length=2048)
    authType: Annotated[Literal["None", "Basic", "Bearer"],
                        BeforeValidator(_spelled("None", "Basic", "Bearer"))] = "None"
    # Clara spells it authId; the issue (and some RIS) authID: both are accepted.
    authId: str | None = Field(default=None, max_length=4096,
                               validation_alias=AliasChoices("authId", "authID"))
    operations: list[Annotated[Literal["QUERY", "RETRIEVE", "STORE"],
                               BeforeValidator(_operation)]] | None = None
    aeTitle: str | None = None
    host: str | None = Field(default=None, max_length=255)
    port: StrictInt | None = Field(default=None, ge=1, le=65535)

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).scheme not in ("http", "https"):
            raise ValueError("must be an http or https URL")
        return v

    @field_validator("aeTitle")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        if v is not None and (not _AE.match(v) or not v.strip()):
            raise ValueError("must be 1-16 printable characters without backslash")
        return v


class Resource(_Model):
    interface: Annotated[Literal["Algorithm", "DIMSE", "DICOMweb"],
                         BeforeValidator(_interface)]
    connectionDetails: ConnectionDetails


class InferenceRequest(_Model):
    transactionID: str = Field(min_length=1, max_length=256)
    # A number, or ASCII digits in a string as Clara's own example writes it ("255");
    # true, 1.5 or "high" is a wrong type.
    priority: Annotated[StrictInt, BeforeValidator(_digits_as_int)] = Field(
        default=128, ge=0, le=255)
    inputMetadata: InputMetadata
    inputResources: list[Resource] = Field(min_length=1)
    outputResources: list[Resource]  # required by seed 000 (may be empty: results on disk)


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(body)"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field" + unknown_key_hint(InferenceRequest, err["loc"])
        out.append({"field": path, "message": msg})
    return out


def validate_request(body: Any, settings: Settings) -> tuple[InferenceRequest, dict[str, Any]]:
    """Check a request against the contract and the configuration.

    Returns the parsed request and the job input it becomes; raises ApiError 422
    listing every problem by its field path: the configuration checks (one Algorithm, a
    known pipeline, configured peers) run on every part that is well-formed on its own
    even when another part is not, so that one answer lists everything to fix.
    """
    try:
        req = InferenceRequest.model_validate(body)
    except ValidationError as exc:
        problems = _field_errors(exc)
        if isinstance(body, dict):
            reported = {p["field"] for p in problems}
            problems += [p for p in _checks(_Parts.salvage(body), settings).problems
                         if p["field"] not in reported]
        raise ApiError(422, "the request has invalid or missing fields", problems) from None
    checked = _checks(_Parts.of(req), settings)
    if checked.problems:
        raise ApiError(422, "the request has invalid or missing fields", checked.problems)
    job_input = {
        "retrieve": {
            "queries": [q.model_dump(exclude_none=True) for q in checked.queries],
            "sources": checked.sources,
        },
        "destinations": checked.destinations,
    }
    return req, job_input


@dataclass
class _Parts:
    """The parts of a request the configuration checks look at, each well-formed, with
    its index in the request (None where the request's structure is unknown)."""

    details: Details | None = None
    details_given: bool = False
    inputs: list[tuple[int, Details]] = field(default_factory=list)
    inputs_given: bool = False
    in_resources: list[tuple[int, Resource]] = field(default_factory=list)
    algorithm_count: int | None = None  # None: cannot tell (inputResources malformed)
    out_resources: list[tuple[int, Resource]] = field(default_factory=list)

    @classmethod
    def of(cls, req: InferenceRequest) -> _Parts:
        meta = req.inputMetadata
        return cls(meta.details, meta.details is not None, list(enumerate(meta.inputs or [])),
                   bool(meta.inputs), list(enumerate(req.inputResources)),
                   sum(r.interface == "Algorithm" for r in req.inputResources),
                   list(enumerate(req.outputResources)))

    @classmethod
    def salvage(cls, body: dict[str, Any]) -> _Parts:
        """The well-formed parts of a request that failed validation as a whole."""
        def ok(model: type[M], value: Any) -> M | None:
            try:
                return model.model_validate(value)
            except ValidationError:
                return None

        def each(model: type[M], items: Any) -> list[tuple[int, M]]:
            if not isinstance(items, list):
                return []
            return [(i, m) for i, item in enumerate(items) if (m := ok(model, item)) is not None]

        raw_meta = body.get("inputMetadata")
        meta = raw_meta if isinstance(raw_meta, dict) else {}
        # without a usable inputMetadata the structural errors already say so
        given = not isinstance(raw_meta, dict)
        raw_in = body.get("inputResources")
        count = (sum(isinstance(r, dict) and r.get("interface") == "Algorithm" for r in raw_in)
                 if isinstance(raw_in, list) else None)
        details = ok(Details, meta["details"]) if meta.get("details") is not None else None
        return cls(details, given or meta.get("details") is not None,
                   each(Details, meta.get("inputs")), given or bool(meta.get("inputs")),
                   each(Resource, raw_in), count, each(Resource, body.get("outputResources")))


@dataclass
class _Checked:
    problems: list[dict[str, str]] = field(default_factory=list)
    queries: list[Details] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    destinations: list[dict[str, Any]] = field(default_factory=list)


def _ops_named(parts: _Parts) -> list[str]:
    """The operations the request's DICOMweb sources name, each once."""
    return list(dict.fromkeys(op for _, r in parts.in_resources if r.interface == "DICOMweb"
                              for op in r.connectionDetails.operations or []))


def _checks(parts: _Parts, settings: Settings) -> _Checked:
    """The checks of a request against the contract's rules and the configuration."""
    out = _Checked()
    problems = out.problems
    if not parts.details_given and not parts.inputs_given:
        problems.append({"field": "inputMetadata.details",
                         "message": "required (or inputMetadata.inputs)"})
    if parts.details is not None:
        problems += parts.details.problems("inputMetadata.details")
        out.queries.append(parts.details)
    for i, d in parts.inputs:
        problems += d.problems(f"inputMetadata.inputs.{i}")
        out.queries.append(d)

    algorithms = [(i, r) for i, r in parts.in_resources if r.interface == "Algorithm"]
    count = parts.algorithm_count
    if count is not None and count != 1:
        problems.append({"field": "inputResources",
                         "message": f"exactly one Algorithm resource is required, "
                                    f"found {count}"})
    elif len(algorithms) == 1:
        i, algorithm = algorithms[0]
        pipeline = algorithm.connectionDetails.name or ""
        known = {p.name for p in settings.pipelines}
        if pipeline not in known:
            problems.append({"field": f"inputResources.{i}.connectionDetails.name",
                             "message": f"unknown pipeline {pipeline!r}; configured: "
                                        f"{', '.join(sorted(known)) or 'none'}"})
    for i, r in parts.in_resources:
        if r.interface == "Algorithm":
            continue
        ops = r.connectionDetails.operations
        if ops is not None and "RETRIEVE" not in ops:
            problems.append({"field": f"inputResources.{i}.connectionDetails.operations",
                             "message": "a source must allow RETRIEVE"})
            continue
        resolved, errs = _resolve_peer(r, f"inputResources.{i}", settings, output=False)
        problems += errs
        if resolved:
            out.sources.append(resolved)
    sources_named = any(r.interface != "Algorithm" for _, r in parts.in_resources)
    lookups = sorted({q.type for q in out.queries if q.type != "DICOM_UID"})
    searchable = [r for _, r in parts.in_resources if r.interface == "DIMSE"
                  or (r.interface == "DICOMweb" and (r.connectionDetails.operations is None
                                                     or "QUERY" in r.connectionDetails.operations))]
    if lookups and sources_named and not searchable:  # nothing could find the studies
        problems.append({"field": "inputResources",
                         "message": f"a {' or '.join(lookups)} lookup needs a source that "
                                    "allows QUERY; every DICOMweb source here allows only "
                                    f"{', '.join(_ops_named(parts))}"})
    if not sources_named and count == 1:
        problems.append({"field": "inputResources",
                         "message": "at least one DIMSE or DICOMweb source is required"})
    for i, r in parts.out_resources:
        if r.interface == "Algorithm":
            problems.append({"field": f"outputResources.{i}.interface",
                             "message": "an output must be DIMSE or DICOMweb"})
            continue
        ops = r.connectionDetails.operations
        if ops is not None and "STORE" not in ops:
            problems.append({"field": f"outputResources.{i}.connectionDetails.operations",
                             "message": "an output must allow STORE"})
            continue
        resolved, errs = _resolve_peer(r, f"outputResources.{i}", settings, output=True)
        problems += errs
        if resolved:
            out.destinations.append(resolved)
    return out


def _resolve_peer(r: Resource, path: str, settings: Settings,
                  output: bool) -> tuple[dict[str, Any] | None, list[dict[str, str]]]:
    """Turn a resource into a peer the node may talk to, or say why not."""
    cd = r.connectionDetails
    field = f"{path}.connectionDetails"
    if r.interface == "DIMSE":
        if cd.name:
            pool = ([d.name for d in settings.destinations if d.type == "dimse"] if output
                    else [s.name for s in settings.sources])
            if cd.name not in pool:
                kind = "destination" if output else "source"
                return None, [{"field": f"{field}.name",
                               "message": f"no configured DIMSE {kind} named {cd.name!r}"}]
            return {"interface": "DIMSE", "name": cd.name}, []
        if not (cd.aeTitle and cd.host and cd.port):
            return None, [{"field": field,
                           "message": "a DIMSE resource needs name, or aeTitle, host and port"}]
        peers = ([(d.ae_title, d.host, d.port, d.name) for d in settings.destinations
                  if d.type == "dimse"] if output
                 else [(s.ae_title, s.host, s.port, s.name) for s in settings.sources])
        for ae, host, port, name in peers:
            if (ae, host, port) == (cd.aeTitle, cd.host, cd.port):
                return {"interface": "DIMSE", "name": name}, []
        return None, [{"field": field,
                       "message": f"{cd.aeTitle}@{cd.host}:{cd.port} is not a configured "
                                  "DIMSE peer"}]
    # DICOMweb
    if not cd.uri:
        return None, [{"field": f"{field}.uri", "message": "required for DICOMweb"}]
    bases = [s.dicomweb_url for s in settings.sources if s.dicomweb_url]
    bases += [d.url for d in settings.destinations if d.type == "dicomweb" and d.url]
    if not url_allowed(cd.uri, bases, settings.rest.allow_any_url):
        return None, [{"field": f"{field}.uri",
                       "message": "not under a configured DICOMweb base URL "
                                  "(rest.allow_any_url is off)"}]
    if cd.authType != "None" and not cd.authId:
        return None, [{"field": f"{field}.authId",
                       "message": f"required with authType {cd.authType}"}]
    return {"interface": "DICOMweb", "uri": cd.uri, "authType": cd.authType,
            "authId": cd.authId, "operations": cd.operations}, []


# -- handlers ------------------------------------------------------------------------


async def post_inference(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        body = await json_body(request)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, 4300-digit ints, deep nesting
        raise ApiError(422, "the body is not valid JSON",
                       [{"field": "(body)", "message": "not valid JSON"}]) from None
    req, job_input = validate_request(body, node.settings)
    if node.scheduler is None:
        raise ApiError(503, "the scheduler is not running")
    pipeline = next(r.connectionDetails.name for r in req.inputResources
                    if r.interface == "Algorithm")
    job = await node.scheduler.submit(NewJob(
        pipeline=pipeline or "",
        kind="acr",
        priority=req.priority,
        input=job_input,
        transaction_id=req.transactionID,
        owner=principal(request).owner,
    ))
    return web.json_response({"transactionID": req.transactionID, "jobId": job.id})


async def get_status(request: web.Request) -> web.Response:
    node = request.app[NODE]
    assert node.store is not None
    ref = request.match_info["id"]
    job = await asyncio.to_thread(node.store.find_job, ref, principal(request).owner)
    exports = await asyncio.to_thread(node.store.exports_of, job.id)
    events = await asyncio.to_thread(node.store.events, job.id)
    return web.json_response(status_body(job, export_entries(exports), events))


def export_entries(exports: list[ExportRecord]) -> list[dict[str, Any]]:
    """The status's ``exports``: each destination's latest record. While a pass is under
    way a destination not yet tried in it is ``pending`` and the one being sent to
    ``sending`` (``sent``: what it acknowledged so far); each one's outcome replaces that
    as soon as it settles."""
    return [{"destination": x.destination, "state": x.state, "attempts": x.attempts,
             "sent": x.sent, "message": x.message} for x in exports]


def phase_timings(job: Job, events: list[JobEvent]) -> dict[str, float]:
    """Seconds spent queued and in each stage of the job's last attempt.

    From the store's state changes: the last claim (``attempt N on …``) starts the
    attempt; ``retrieving → running → exporting → final`` split it.
    """
    claims = [i for i, e in enumerate(events)
              if e.state in (JobState.RETRIEVING, JobState.RUNNING)
              and (e.message or "").startswith("attempt ")]
    if not claims:
        return {}
    attempt = events[claims[-1]:]
    # The attempt was queued when the job last went back to the queue (a retry, a
    # deferral), not when it was made: a retry days later would count those days.
    queued = next((e.at for e in reversed(events[:claims[-1]]) if e.state is JobState.QUEUED),
                  job.created_at).timestamp()
    at: dict[JobState, float] = {}
    for e in attempt:
        at.setdefault(e.state, e.at.timestamp())
    out = {"queued_s": attempt[0].at.timestamp() - queued}
    order = [JobState.RETRIEVING, JobState.RUNNING, JobState.EXPORTING]
    names = {JobState.RETRIEVING: "retrieve_s", JobState.RUNNING: "run_s",
             JobState.EXPORTING: "export_s"}
    final = next((e.at.timestamp() for e in attempt if e.state.final), None)
    for i, state in enumerate(order):
        if state not in at:
            continue
        end = next((at[s] for s in order[i + 1:] if s in at), final)
        if end is not None:
            out[names[state]] = end - at[state]
    if final is not None:
        out["total_s"] = final - queued
    return {k: round(max(v, 0.0), 3) for k, v in out.items()}


def _incomplete(retrieval: list[dict[str, Any]]) -> str | None:
    """What a succeeded job did not get of what its request named (None: everything)."""
    missed = [r for r in retrieval if r.get("state") in ("failed", "partial")]
    if not missed:
        return None
    parts = "; ".join(f"{r.get('study')}: {r.get('state')}"
                      + (f" ({r['message']})" if r.get("message") else "") for r in missed)
    whole = sum(1 for r in retrieval if r.get("state") == "retrieved")
    return f"ran on {whole} of {len(retrieval)} studies or series asked for in full; {parts}"


def _with_patients(results: list[dict[str, Any]],
                   retrieval: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each result with the Patient ID of the study it was made from (the one its
    instances arrived with; null where the job's record has none, e.g. an older job)."""
    patients = {str(r.get("study", "")).split("/")[0]: r.get("PatientID") for r in retrieval
                if r.get("state") in ("retrieved", "partial")}
    return [{**r, "PatientID": patients.get(r.get("study", ""))} if "PatientID" not in r
            else r for r in results]


def status_body(job: Job, exports: list[dict[str, Any]],
                events: list[JobEvent] | None = None) -> dict[str, Any]:
    def ts(v: Any) -> str | None:
        return v.isoformat() if v else None

    result = job.result or {}
    retrieval = result.get("retrieval", [])
    return {
        "transactionID": job.transaction_id,
        "jobId": job.id,
        "state": job.state.value,
        "status": "Failed" if job.state is JobState.FAILED else
        "Succeeded" if job.state is JobState.SUCCEEDED else
        "Cancelled" if job.state is JobState.CANCELLED else "InProgress",
        "pipeline": job.pipeline,
        "priority": job.priority,
        "attempts": job.attempts,
        "created": ts(job.created_at),
        "started": ts(job.started_at),
        "finished": ts(job.finished_at),
        "retrieval": retrieval,
        "exports": exports,
        "results": _with_patients(result.get("results", []), retrieval),
        "timings": {**phase_timings(job, events or []), **result.get("timings", {})},
        # A success on part of what was asked says so: a RIS reading only status and
        # message would otherwise never learn that a study was not found.
        "message": cancelled_message(job, events or []) if job.state is JobState.CANCELLED
        else job.error if job.state is not JobState.SUCCEEDED
        else job.error or _incomplete(retrieval),
    }


def routes() -> list[Route]:
    return [
        Route("POST", "/api/inference", post_inference, scope="infer"),
        Route("POST", "/inference", post_inference, scope="infer"),
        Route("GET", "/api/inference/status/{id}", get_status,
              scope=("read", "infer"))  # a caller who may submit may poll its own,
    ]
