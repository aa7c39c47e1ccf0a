"""Seed 002: asynchronous batch inference jobs (``Authorization: Api-Key …``).

- ``POST /v1/infer/batch`` → 201 with an integer ``inferenceJobId``, status ``Queued``;
  400 ``{"message": …}`` when the job cannot start.
- ``GET /v1/infer/batch/{job_id}`` → ``Queued``, ``Running``, ``Finished`` or
  ``Errored`` with one result per source; 404 when unknown or not the caller's group's.
  A source is Queued until its job is first taken up, then Running until the job ends
  (also while it waits in the queue to be tried again, e.g. for its next export
  attempt: once started, it is not Queued again), then Finished or Errored (failed or
  cancelled). The batch is Queued while no source has started, Running once one has
  and until all have ended, then Finished when all finished, else Errored.
- ``GET /v1/sources?projectIdentifier=…``, ``GET /v1/projects`` and ``GET /v1/models``
  list what a request can name.

How the seed's words map onto the node:

- a **project** is a called AE title the node received studies under (configured
  or seen), or a drop folder; each has a stable integer id. A study is in the project of
  every AE title and drop folder it came to, also when its instances came again later
  by another way;
- a **source** is a study the node holds; its id is the study's integer id;
- the **model** is a configured pipeline, by name or by its stable integer id
  (``GET /v1/models``), or a model by name (its first pipeline);
- the **output layer** is a configured destination, with a stable integer id;
- **groupName** must be the group of the caller's API key (or the JWT's ``group``);
- the **"Model Run" permission**: an API key with ``projects`` (a JWT with a
  ``projects`` claim) may list the sources of, run batches on and read the batches of
  those projects only; others are answered 404, as the seed answers a permission
  problem. Without the list, every project.

Each source becomes one node job (so one bad study does not sink the others), all
created in one store transaction and run by the scheduler like any other job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from dicom_node.config import Settings
from dicom_node.digits import ascii_int
from dicom_node.errors import NotFound
from dicom_node.logs import get_logger
from dicom_node.store import Batch, Job, JobEvent, JobState, NewJob, Store, StudyRecord
from pipeline.settings import PipelineSpec
from rest.app import NODE, Route, json_body, principal
from rest.auth import Principal
from rest.errors import ApiError, ErrorStyle, without_paths

log = get_logger("rest.batch")

AE_PROJECT = "project:ae"
WATCH_PROJECT = "project:watch"
PROJECT_KINDS = (AE_PROJECT, WATCH_PROJECT)
OUTPUT_LAYER = "destination"
MODEL = "pipeline"
MAX_SOURCES = 1000


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    kind: Literal["ae", "watch"]

    def studies(self, store: Store, ids: Sequence[int] | None = None, limit: int = 1000,
                offset: int = 0) -> list[StudyRecord]:
        if self.kind == "ae":
            return store.project_studies(called_ae=self.name, ids=ids, limit=limit,
                                         offset=offset)
        return store.project_studies(watch=self.name, ids=ids, limit=limit, offset=offset)

    def body(self) -> dict[str, Any]:
        return {"projectId": self.id, "projectName": self.name,
                "kind": "calledAETitle" if self.kind == "ae" else "dropFolder"}


class BatchRequest(BaseModel):
    """The seed's request body; every field is required."""

    model_config = ConfigDict(extra="ignore")

    projectIdentifier: StrictStr | StrictInt
    modelIdentifier: StrictStr | StrictInt
    sourceIds: list[Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]] = Field(
        min_length=1, max_length=MAX_SOURCES)
    outputLayerIdentifier: StrictStr | StrictInt
    groupName: StrictStr


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _problem(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"][:2]) or "(body)"
        if err["type"] == "missing":
            parts.append(f"{field} is required")
        elif field.startswith("sourceIds") and err["type"] in ("too_short", "too_long"):
            parts.append(f"sourceIds must hold 1 to {MAX_SOURCES} source ids")
        elif field.startswith("sourceIds"):
            parts.append("sourceIds must be an array of integer source ids")
        elif field == "groupName":
            parts.append("groupName must be a string")
        else:
            parts.append(f"{field.split('.')[0]} must be a string or an integer")
    return "; ".join(dict.fromkeys(parts))


# -- projects, models and output layers ------------------------------------------------


def projects(settings: Settings, store: Store) -> list[Project]:
    """Every project, by id: configured or seen called AE titles, then drop folders."""
    aes = store.integer_ids(AE_PROJECT, [*(a.ae_title for a in settings.ae_titles),
                                         *store.called_ae_titles()])
    watches = store.integer_ids(WATCH_PROJECT, [*(w.name for w in settings.watch),
                                                *store.watch_names()])
    found = [Project(i, n, "ae") for n, i in aes.items()]
    found += [Project(i, n, "watch") for n, i in watches.items()]
    return sorted(found, key=lambda p: p.id)


def find_project(settings: Settings, store: Store, ident: str | int) -> Project:
    """A project by integer id or unique name; raises NotFound."""
    every = projects(settings, store)
    if isinstance(ident, str):
        named = [p for p in every if p.name == ident]
        if len(named) > 1:
            raise _bad(f"project name {ident!r} is both a called AE title and a drop folder; "
                       f"use its id ({', '.join(str(p.id) for p in named)})")
        if named:
            return named[0]
        number = ascii_int(ident.strip())
        if number is None:
            raise NotFound(unknown_project(ident))
        ident = number
    for p in every:
        if p.id == ident:
            return p
    raise NotFound(unknown_project(ident))


def unknown_project(ident: str | int) -> str:
    """What a caller hears of a project that does not exist, and of one its credentials
    may not use: the same words, so that walking ids or names tells no one which
    projects exist (the forbidden one's name was in the message)."""
    if isinstance(ident, str) and ascii_int(ident.strip()) is None:
        return f"no project {ident!r}; GET /v1/projects lists them"
    number = ident if isinstance(ident, int) else ascii_int(ident.strip())
    return f"no project with id {number}; GET /v1/projects lists them"


def model_ids(settings: Settings, store: Store) -> dict[str, int]:
    """The stable integer id of each configured pipeline (seed 002's models), by name."""
    return store.integer_ids(MODEL, [p.name for p in settings.pipelines])


def find_pipeline(settings: Settings, store: Store, ident: str | int,
                  failed: dict[str, str]) -> PipelineSpec:
    """A pipeline by name or integer id (a digit string too, when no pipeline has that
    name), or the first pipeline of a model by name. Raises ApiError 400."""
    spec = None
    if isinstance(ident, str):
        spec = next((p for p in settings.pipelines if p.name == ident), None) or next(
            (p for p in settings.pipelines if p.model == ident), None)
    number = ident if isinstance(ident, int) else ascii_int(ident.strip())
    if spec is None and number is not None:
        name = next((n for n, i in model_ids(settings, store).items() if i == number), None)
        spec = next((p for p in settings.pipelines if p.name == name), None)
    if spec is None:
        known = ", ".join(f"{n} (id {i})" for n, i in sorted(model_ids(settings, store).items()))
        raise _bad(f"no model or pipeline {ident!r}; configured pipelines: {known or 'none'} "
                   "(GET /v1/models lists them)")
    if spec.model in failed:
        raise _bad(f"model {spec.model!r} failed to load on this node: "
                   f"{without_paths(failed[spec.model])}")
    return spec


def find_output_layer(settings: Settings, store: Store, ident: str | int) -> tuple[int, str]:
    """A configured destination by name or integer id: ``(id, name)``."""
    ids = store.integer_ids(OUTPUT_LAYER, [d.name for d in settings.destinations])
    if isinstance(ident, str) and ident in ids:
        return ids[ident], ident
    number = ident if isinstance(ident, int) else ascii_int(ident.strip())
    for name, i in ids.items():
        if i == number:
            return i, name
    known = ", ".join(f"{n} ({i})" for n, i in ids.items()) or "none is configured"
    raise _bad(f"no output layer {ident!r}; output layers are the node's destinations: "
               f"{known}")


def _check_group(who: Principal, group: str) -> None:
    if who.group is None:
        raise _bad("these credentials belong to no group; use an API key of the group "
                   f"{group!r}")
    if who.group != group:
        raise _bad(f"groupName {group!r} is not the group of these credentials")


# -- creating and reading batches ------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    project: Project
    pipeline: PipelineSpec
    layer_id: int
    layer_name: str
    sources: list[tuple[int, NewJob]]


def plan(settings: Settings, store: Store, req: BatchRequest, who: Principal,
         failed: dict[str, str]) -> Planned:
    """Resolve a request into one job per source; ApiError 400 saying why it cannot start.

    Blocking (store): call it in a worker thread.
    """
    _check_group(who, req.groupName)
    try:
        project = find_project(settings, store, req.projectIdentifier)
    except NotFound as exc:
        raise _bad(str(exc)) from None
    if not who.may_use_project(project.id, project.name):  # seed 002's "Model Run"
        raise _bad(unknown_project(req.projectIdentifier))  # as if it did not exist
    pipeline = find_pipeline(settings, store, req.modelIdentifier, failed)
    layer_id, layer_name = find_output_layer(settings, store, req.outputLayerIdentifier)
    if len(set(req.sourceIds)) != len(req.sourceIds):
        raise _bad("sourceIds holds the same source twice")
    held = {s.id: s for s in project.studies(store, ids=req.sourceIds, limit=MAX_SOURCES)}
    missing = [i for i in req.sourceIds if i not in held]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (
            f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        are = "source is" if len(missing) == 1 else "sources are"
        raise _bad(f"{len(missing)} {are} not in project {project.name!r}: "
                   f"{shown} (GET /v1/sources?projectIdentifier={project.id} lists them)")
    jobs: list[tuple[int, NewJob]] = []
    for source_id in req.sourceIds:
        study = held[source_id]
        sops = [r.sop_instance_uid for r in store.instances_of(study.study_instance_uid)]
        jobs.append((source_id, NewJob(
            pipeline=pipeline.name, kind="batch", owner=who.owner,
            study_instance_uid=study.study_instance_uid,
            input={"instances": sops, "study_instance_uid": study.study_instance_uid,
                   "destinations": [layer_name]},
        )))
    return Planned(project, pipeline, layer_id, layer_name, jobs)


def source_status(job: Job) -> str:
    """Queued until the source's job is first taken up; Running from then until it ends,
    also while it waits in the queue again (for its next export attempt, a retry of its
    run, or after a restart): a source does not go back to Queued. Then Finished, or
    Errored (failed or cancelled)."""
    if job.state is JobState.SUCCEEDED:
        return "Finished"
    if job.state.final:
        return "Errored"
    if job.state is JobState.QUEUED and job.started_at is None:
        return "Queued"
    return "Running"


def _started(job: Job) -> bool:
    """Whether the job was ever taken up (one cancelled while queued never was)."""
    return job.started_at is not None or source_status(job) in ("Running", "Finished")


def batch_status(jobs: Sequence[Job]) -> str:
    """Finished when every source finished; Errored when every source ended and one did
    not finish; else Queued while no source has started (those cancelled before they
    started count as not started), Running once one has."""
    states = [source_status(j) for j in jobs]
    if all(s == "Finished" for s in states):
        return "Finished"
    if all(s in ("Finished", "Errored") for s in states):
        return "Errored"
    return "Running" if any(_started(j) for j in jobs) else "Queued"


def cancelled_message(job: Job, events: Sequence[JobEvent]) -> str:
    """What a cancelled source's result says: when, at which stage, and the error the
    job was waiting on, if any (an export to be tried again)."""
    when = f"cancelled at {job.finished_at.isoformat()}" if job.finished_at else "cancelled"
    # The state it was cancelled in: the one recorded before the cancel.
    ends = [i for i, e in enumerate(events) if e.state is JobState.CANCELLED]
    while_queued = bool(ends) and ends[-1] > 0 and events[ends[-1] - 1].state is JobState.QUEUED
    if job.started_at is None:
        return f"{when}, before it started"
    if not while_queued:
        return f"{when} while it ran"
    after = f", after: {job.error}" if job.error else ""
    return f"{when} while queued to be tried again{after}"


def _source_result(store: Store, source_id: int, job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {"sourceId": source_id, "status": source_status(job),
                           "jobId": job.id, "studyInstanceUID": job.study_instance_uid}
    summaries = (job.result or {}).get("results") or []
    if summaries:
        summary = dict(summaries[0])
        summary.pop("study", None)
        out.update(summary)  # result + findings, or segments
    if job.state.final:
        out["artifacts"] = [{"kind": a.kind, "path": a.path, "mediaType": a.media_type}
                            for a in store.artifacts_of(job.id)]
        out["exports"] = [{"outputLayerName": x.destination, "state": x.state,
                           "sent": x.sent, "message": x.message}
                          for x in store.exports_of(job.id)]
    if job.state is JobState.CANCELLED:
        out["message"] = cancelled_message(job, store.events(job.id))
    else:
        out["message"] = job.error if job.state is not JobState.SUCCEEDED else None
    return out


def status_body(store: Store, batch: Batch) -> dict[str, Any]:
    """The GET answer: the seed's fields, the names, and one result per source."""
    jobs = [j for _, j in batch.sources]
    project = store.name_of_id(PROJECT_KINDS, batch.project_id)
    layer = store.name_of_id([OUTPUT_LAYER], batch.output_layer_id)
    finished = [j.finished_at for j in jobs if j.finished_at is not None]
    status = batch_status(jobs)
    return {
        "inferenceJobId": batch.id,
        "status": status,
        "projectId": batch.project_id,
        "projectName": project[1] if project else None,
        "modelIdentifier": batch.pipeline,
        "outputLayerId": batch.output_layer_id,
        "outputLayerName": layer[1] if layer else None,
        "sourceIds": [s for s, _ in batch.sources],
        "createdAt": batch.created_at.isoformat(),
        "finishedAt": max(finished).isoformat()
        if status in ("Finished", "Errored") and finished else None,
        "results": [_source_result(store, s, j) for s, j in batch.sources],
    }


def _visible(who: Principal, store: Store, batch: Batch) -> bool:
    """The caller's group's (any group's with admin), on a project it may use.

    Blocking (store) when the caller has a project list."""
    if "admin" not in who.scopes and (who.group is None or who.group != batch.group_name):
        return False
    if who.projects is None:
        return True
    project = store.name_of_id(PROJECT_KINDS, batch.project_id)
    return project is not None and who.may_use_project(batch.project_id, project[1])


# -- handlers --------------------------------------------------------------------------


def _store(request: web.Request) -> Store:
    store = request.app[NODE].store
    if store is None:
        raise ApiError(503, "the store is not open")
    return store


async def post_batch(request: web.Request) -> web.Response:
    node = request.app[NODE]
    store = _store(request)
    try:
        body = await json_body(request)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, 4300-digit ints, deep nesting
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    try:
        req = BatchRequest.model_validate(body)
    except ValidationError as exc:
        raise _bad(_problem(exc)) from None
    if node.scheduler is None or node.runner is None:
        raise ApiError(503, "the scheduler or the inference pipeline is not running")
    who = principal(request)
    planned = await asyncio.to_thread(plan, node.settings, store, req, who, node.runner.failed)
    batch = await asyncio.to_thread(
        store.create_batch, group_name=req.groupName, owner=who.owner,
        project_id=planned.project.id, pipeline=planned.pipeline.name,
        output_layer_id=planned.layer_id, sources=planned.sources)
    node.scheduler.notify()
    log.info("batch queued", batch_id=batch.id, project=planned.project.name,
             pipeline=planned.pipeline.name, sources=len(batch.sources),
             job_ids=[j.id for _, j in batch.sources])
    return web.json_response({
        "inferenceJobId": batch.id,
        "status": "Queued",
        "projectName": planned.project.name,
        "projectId": planned.project.id,
        "outputLayerName": planned.layer_name,
        "outputLayerId": planned.layer_id,
        "sourceIds": [s for s, _ in batch.sources],
    }, status=201)


async def get_batch(request: web.Request) -> web.Response:
    store = _store(request)
    raw = request.match_info["job_id"]
    batch_id = ascii_int(raw)
    if batch_id is None:
        raise NotFound(f"no batch inference job {raw!r}")
    who = principal(request)

    def answer() -> dict[str, Any]:
        try:
            batch = store.get_batch(batch_id)
        except NotFound:
            raise NotFound(f"no batch inference job {raw}") from None
        if not _visible(who, store, batch):  # not the caller's: as if it did not exist
            raise NotFound(f"no batch inference job {raw}")
        return status_body(store, batch)

    return web.json_response(await asyncio.to_thread(answer))


def _int_query(request: web.Request, name: str, default: int, top: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = ascii_int(raw)
    if value is None or value > top:
        raise _bad(f"{name} must be an integer from 0 to {top}")
    return value


async def get_sources(request: web.Request) -> web.Response:
    node = request.app[NODE]
    store = _store(request)
    ident = request.query.get("projectIdentifier")
    if not ident:
        raise _bad("projectIdentifier is required (GET /v1/projects lists the projects)")
    limit = _int_query(request, "limit", 1000, 10_000)
    offset = _int_query(request, "offset", 0, 2**31 - 1)
    who = principal(request)

    def answer() -> dict[str, Any]:
        project = find_project(node.settings, store, ident)
        if not who.may_use_project(project.id, project.name):
            raise NotFound(unknown_project(ident))  # as if it did not exist
        return {**project.body(), "sources": [{
            "sourceId": s.id, "studyInstanceUID": s.study_instance_uid,
            "patientId": s.patient_id, "accessionNumber": s.accession_number,
            "studyDate": s.study_date, "modalities": s.modalities, "instances": s.instances,
            "receivedAt": s.created_at.isoformat(), "updatedAt": s.updated_at.isoformat(),
        } for s in project.studies(store, limit=limit, offset=offset)]}

    return web.json_response(await asyncio.to_thread(answer))


async def get_projects(request: web.Request) -> web.Response:
    node = request.app[NODE]
    store = _store(request)
    who = principal(request)
    found = await asyncio.to_thread(projects, node.settings, store)
    return web.json_response({"projects": [p.body() for p in found
                                           if who.may_use_project(p.id, p.name)]})


async def get_models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    store = _store(request)
    ids = await asyncio.to_thread(model_ids, node.settings, store)
    return web.json_response({"models": [
        {"modelId": ids[p.name], "modelName": p.name, "model": p.model, "task": p.task}
        for p in sorted(node.settings.pipelines, key=lambda p: ids[p.name])]})


def routes() -> list[Route]:
    style = ErrorStyle.MESSAGE
    return [
        Route("POST", "/v1/infer/batch", post_batch, scope="infer", style=style),
        Route("GET", "/v1/infer/batch/{job_id}", get_batch, scope=("read", "infer"),
              style=style),
        Route("GET", "/v1/sources", get_sources, scope="read", style=style),
        Route("GET", "/v1/projects", get_projects, scope="read", style=style),
        Route("GET", "/v1/models", get_models, scope="read", style=style),
    ]
