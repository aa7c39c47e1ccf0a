"""Seed 002 batch jobs: request checks, the 201/400/404 shapes, groups, projects, sources.

A whole node runs in the test's loop with the node's own job handler and a tiny
random classifier (the demo model runs in tests/integration/rest/test_batch.py).
Studies are placed with the node's InstanceWriter, as C-STORE would place them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from aiohttp.test_utils import TestClient

from dicom_node.node import Node
from dicom_node.store import Batch, Job, JobState, NewJob, Store, utcnow
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from rest.app import create_app
from rest.auth import hash_api_key
from rest.batch import batch_status, status_body
from tests.support.dicom_factory import make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port
from tests.unit.pipeline.test_bundle import make_tiny_bundle

pytestmark = pytest.mark.timeout(180)

KEYS = {"lab": ("radiology", ["infer", "read"]), "cardio": ("cardiology", ["infer", "read"]),
        "reader": ("radiology", ["read"]), "root": ("ops", ["admin"]),
        "submitter": ("radiology", ["infer"]), "cxr-only": ("radiology", ["infer", "read"])}
PROJECTS = {"cxr-only": ["AI_CXR"]}  # the keys with seed 002's "Model Run" permission list


def key(name: str) -> dict[str, str]:
    return {"Authorization": f"Api-Key secret-{name}"}


@dataclass
class Api:
    client: TestClient
    node: Node
    tmp: Path
    sources: dict[str, int]  # study label -> source id

    async def post(self, body: Any, who: str = "lab") -> tuple[int, Any]:
        r = await self.client.post("/v1/infer/batch", json=body, headers=key(who))
        return r.status, await r.json()

    async def get(self, path: str, who: str = "lab") -> tuple[int, Any]:
        r = await self.client.get(path, headers=key(who))
        return r.status, await r.json()


def settings_for(tmp: Path) -> Any:
    bundle = make_tiny_bundle(tmp / "bundles" / "tiny")
    return node_settings(
        tmp / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        ae_titles=[{"ae_title": "DICOMNODE"}, {"ae_title": "AI_CXR"}],
        watch=[{"name": "inbox", "path": str(tmp / "inbox"), "settle_s": 0.2}],
        models=[{"name": "tiny", "path": str(bundle), "max_delay_ms": 0, "warmup": False}],
        pipelines=[{"name": "cxr", "model": "tiny", "task": "classify", "threshold": 0.01,
                    "series": {"modalities": ["CR", "DX"]}, "outputs": ["json", "png"]}],
        destinations=[{"name": "gold-set", "type": "folder", "path": str(tmp / "gold")},
                      # a file where the folder should be: each export fails, and is
                      # tried again an hour later
                      {"name": "unwritable", "type": "folder", "path": str(tmp / "a-file"),
                       "retry": {"max_attempts": 3, "backoff_s": 3600,
                                 "backoff_max_s": 3600}}],
        executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.05,
                  "grace_period_s": 5},
        auth={"api_keys": [{"name": n, "key_sha256": hash_api_key(f"secret-{n}"), "group": g,
                            "scopes": s, "projects": PROJECTS.get(n)}
                           for n, (g, s) in KEYS.items()]},
    )


def place(node: Node, src: Path, called_ae: str) -> str:
    """Store a file as if a modality had sent it to ``called_ae``; its study UID."""
    sent = src.with_suffix(".sent")
    shutil.copy(src, sent)
    got = node.instance_writer().write(sent, called_ae=called_ae, calling_ae="MODALITY",
                                       association_id=0)
    return got.study_instance_uid


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Api]:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    async with running_node(settings_for(tmp_path)) as node:
        assert node.store is not None
        client = await aiohttp_client(create_app(node))
        incoming = tmp_path / "incoming"
        uids: dict[str, str] = {}
        for seed in (1, 2):
            uids[f"cr{seed}"] = place(node, write_dicom(
                make_cxr_phantom(seed, size=64), incoming / f"cr{seed}.dcm",
                patient_id=f"P{seed}", modality="CR"), "AI_CXR")
        for p in make_ct_study(incoming / "ct", slices=2).paths:
            uids["ct"] = place(node, p, "AI_CXR")
        uids["cr3"] = place(node, write_dicom(make_cxr_phantom(3, size=64), incoming / "cr3.dcm",
                                              patient_id="P3", modality="CR"), "DICOMNODE")
        by_uid = {s.study_instance_uid: s.id
                  for ae in ("AI_CXR", "DICOMNODE")
                  for s in node.store.project_studies(called_ae=ae)}
        sources = {label: by_uid[uid] for label, uid in uids.items()}
        yield Api(client, node, tmp_path, sources)


def good(api: Api, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"projectIdentifier": "AI_CXR", "modelIdentifier": "cxr",
                            "sourceIds": [api.sources["cr1"], api.sources["cr2"]],
                            "outputLayerIdentifier": "gold-set", "groupName": "radiology"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


async def wait_final(api: Api, job_id: int) -> dict[str, Any]:
    while True:
        status, got = await api.get(f"/v1/infer/batch/{job_id}")
        assert status == 200, got
        if got["status"] in ("Finished", "Errored"):
            return got
        await asyncio.sleep(0.1)


async def test_projects_and_sources(api: Api) -> None:
    status, got = await api.get("/v1/projects")
    assert status == 200
    names = {p["projectName"]: p for p in got["projects"]}
    assert names["AI_CXR"]["kind"] == "calledAETitle"
    assert names["inbox"]["kind"] == "dropFolder"
    assert names["DICOMNODE"]["kind"] == "calledAETitle"
    pid = names["AI_CXR"]["projectId"]
    again = await api.get("/v1/projects")
    assert again[1] == got  # ids are stable
    for ident in ("AI_CXR", str(pid)):
        status, got = await api.get(f"/v1/sources?projectIdentifier={ident}")
        assert status == 200 and got["projectId"] == pid and got["projectName"] == "AI_CXR"
        assert sorted(s["sourceId"] for s in got["sources"]) == sorted(
            api.sources[k] for k in ("cr1", "cr2", "ct"))
    ct = next(s for s in got["sources"] if s["sourceId"] == api.sources["ct"])
    assert ct["modalities"] == ["CT"] and ct["instances"] == 2
    status, got = await api.get("/v1/sources?projectIdentifier=AI_CXR&limit=1&offset=1")
    assert status == 200 and len(got["sources"]) == 1
    status, got = await api.get("/v1/sources?projectIdentifier=" + "9" * 5000)
    assert status == 404 and set(got) == {"message"}
    assert (await api.get("/v1/sources?projectIdentifier=NOPE")) == (
        404, {"message": "no project 'NOPE'; GET /v1/projects lists them"})
    status, got = await api.get("/v1/sources")
    assert status == 400 and set(got) == {"message"}
    status, got = await api.get("/v1/sources?projectIdentifier=AI_CXR&limit=-1")
    assert status == 400 and "limit" in got["message"]


async def test_created_then_finished_with_results(api: Api) -> None:
    status, got = await api.post(good(api))
    assert status == 201, got
    projects = {p["projectName"]: p["projectId"] for p in (await api.get("/v1/projects"))[1]
                ["projects"]}
    assert isinstance(got["inferenceJobId"], int)
    assert {k: v for k, v in got.items() if k not in ("inferenceJobId", "outputLayerId")} == {
        "status": "Queued", "projectName": "AI_CXR", "projectId": projects["AI_CXR"],
        "outputLayerName": "gold-set",
        "sourceIds": [api.sources["cr1"], api.sources["cr2"]]}
    assert isinstance(got["outputLayerId"], int)
    done = await wait_final(api, got["inferenceJobId"])
    assert done["status"] == "Finished", done
    assert done["sourceIds"] == got["sourceIds"] and done["projectId"] == got["projectId"]
    assert [r["sourceId"] for r in done["results"]] == got["sourceIds"]
    for r in done["results"]:
        assert r["status"] == "Finished" and r["result"] == "Abnormal" and r["message"] is None
        assert [f["name"] for f in r["findings"]] == ["a", "b", "c"]
        assert r["exports"][0]["outputLayerName"] == "gold-set"
        assert r["exports"][0]["state"] == "succeeded"
    # the folder destination mirrors the results: <job id>/<patient>/<files>
    (kept,) = (api.tmp / "gold").rglob("P1_predictions.json")
    job_dir = kept.relative_to(api.tmp / "gold").parts[0]
    assert (api.node.settings.results_dir / job_dir / "P1" / "P1_predictions.json").is_file()
    # the output layer by its integer id, the project by its integer id
    status, again = await api.post(good(api, projectIdentifier=got["projectId"],
                                        outputLayerIdentifier=got["outputLayerId"],
                                        modelIdentifier="tiny"))
    assert status == 201 and again["inferenceJobId"] > got["inferenceJobId"]
    assert again["outputLayerName"] == "gold-set"


async def test_a_source_the_model_cannot_read_errors_alone(api: Api) -> None:
    status, got = await api.post(good(api, sourceIds=[api.sources["ct"], api.sources["cr1"]]))
    assert status == 201
    done = await wait_final(api, got["inferenceJobId"])
    assert done["status"] == "Errored"
    ct, cr = done["results"]
    assert ct["status"] == "Errored" and "CT" in ct["message"]
    assert cr["status"] == "Finished" and cr["result"] == "Abnormal"


BAD: list[tuple[dict[str, Any], str]] = [
    ({"projectIdentifier": ...}, "projectIdentifier is required"),
    ({"modelIdentifier": ...}, "modelIdentifier is required"),
    ({"sourceIds": ...}, "sourceIds is required"),
    ({"outputLayerIdentifier": ...}, "outputLayerIdentifier is required"),
    ({"groupName": ...}, "groupName is required"),
    ({"sourceIds": []}, "sourceIds must hold 1 to 1000 source ids"),
    ({"sourceIds": ["1"]}, "sourceIds must be an array of integer source ids"),
    ({"sourceIds": [True]}, "sourceIds must be an array of integer source ids"),
    ({"sourceIds": [2**40]}, "sourceIds must be an array of integer source ids"),
    ({"sourceIds": 5}, "sourceIds must be an array of integer source ids"),
    ({"projectIdentifier": ["x"]}, "projectIdentifier must be a string or an integer"),
    ({"groupName": 3}, "groupName must be a string"),
    ({"projectIdentifier": "NOPE"}, "no project 'NOPE'"),
    ({"projectIdentifier": 9999}, "no project with id 9999"),
    ({"projectIdentifier": "9" * 5000}, "no project '999"),
    ({"outputLayerIdentifier": "9" * 5000}, "no output layer '999"),
    ({"outputLayerIdentifier": 2**70}, "no output layer 1180591620717411303424"),
    ({"modelIdentifier": "nope"}, "no model or pipeline 'nope'; configured pipelines: cxr"),
    ({"outputLayerIdentifier": "nowhere"}, "no output layer 'nowhere'"),
    ({"outputLayerIdentifier": 9999}, "no output layer 9999"),
    ({"groupName": "cardiology"}, "groupName 'cardiology' is not the group of these"),
    ({"sourceIds": [99999]}, "1 source is not in project 'AI_CXR': 99999 (GET"),
    # a thousand unknown ids: the first twenty and a count, not a thousand numbers
    ({"sourceIds": list(range(90000, 91000))}, "1000 sources are not in project "
     "'AI_CXR': " + ", ".join(map(str, range(90000, 90020))) + " and 980 more (GET"),
]


@pytest.mark.parametrize(("changes", "message"), BAD)
async def test_cannot_start_is_400_with_a_message(api: Api, changes: dict[str, Any],
                                                  message: str) -> None:
    status, got = await api.post(good(api, **changes))
    assert status == 400 and set(got) == {"message"}, got
    assert got["message"].startswith(message), got


async def test_sources_of_another_project_and_repeats_are_refused(api: Api) -> None:
    status, got = await api.post(good(api, sourceIds=[api.sources["cr3"]]))
    assert status == 400 and "not in project 'AI_CXR'" in got["message"]
    status, got = await api.post(good(api, sourceIds=[api.sources["cr1"]] * 2))
    assert status == 400 and "twice" in got["message"]
    # the same source through its own project is fine
    status, got = await api.post(good(api, projectIdentifier="DICOMNODE",
                                      sourceIds=[api.sources["cr3"]]))
    assert status == 201, got


@pytest.mark.parametrize("raw", [b"not json", b"[]", b"null", b'"x"', b"",
                                 b'{"sourceIds": [' + b"9" * 5000 + b"]}",
                                 b"[" * 100_000 + b"]" * 100_000])
async def test_body_that_is_not_an_object(api: Api, raw: bytes) -> None:
    r = await api.client.post("/v1/infer/batch", data=raw,
                              headers={**key("lab"), "Content-Type": "application/json"})
    assert r.status == 400 and set(await r.json()) == {"message"}


async def test_status_is_404_when_unknown_or_another_groups(api: Api) -> None:
    status, got = await api.post(good(api))
    job = got["inferenceJobId"]
    for path in ("/v1/infer/batch/99999", "/v1/infer/batch/abc", "/v1/infer/batch/-1",
                 "/v1/infer/batch/" + "9" * 40):
        status, got = await api.get(path)
        assert status == 404 and set(got) == {"message"}, (path, got)
    status, got = await api.get(f"/v1/infer/batch/{job}", who="cardio")
    assert status == 404 and set(got) == {"message"}
    assert (await api.get(f"/v1/infer/batch/{job}", who="reader"))[0] == 200  # same group
    # a key that may only submit may still poll: infer or read scope will do
    assert (await api.get(f"/v1/infer/batch/{job}", who="submitter"))[0] == 200
    assert (await api.get("/v1/projects", who="submitter"))[0] == 403  # listing needs read
    assert (await api.get(f"/v1/infer/batch/{job}", who="root"))[0] == 200  # admin


async def test_credentials(api: Api) -> None:
    for headers in ({}, {"Authorization": "Api-Key wrong"}, {"Authorization": "Api-Key "},
                    {"Authorization": "garbage"}):
        r = await api.client.post("/v1/infer/batch", json=good(api), headers=headers)
        assert r.status == 401 and set(await r.json()) == {"message"}
    status, got = await api.post(good(api), who="reader")  # no infer scope
    assert status == 403 and set(got) == {"message"}
    # a JWT with a group claim is accepted like an API key of that group
    secret = (api.tmp / "data" / "jwt_secret").read_bytes().strip()
    token = jwt.encode({"sub": "svc", "group": "radiology", "scope": "infer read",
                        "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    r = await api.client.post("/v1/infer/batch", json=good(api),
                              headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201
    no_group = jwt.encode({"sub": "svc", "exp": int(time.time()) + 60}, secret,
                          algorithm="HS256")
    r = await api.client.post("/v1/infer/batch", json=good(api),
                              headers={"Authorization": f"Bearer {no_group}"})
    assert r.status == 400 and "no group" in (await r.json())["message"]


async def test_a_key_with_projects_may_use_those_only(api: Api) -> None:
    """Seed 002: running models needs the "Model Run" permission on the project, and a
    permission problem is 404. A key's projects are all it sees, lists and runs on."""
    status, got = await api.get("/v1/projects", who="cxr-only")
    assert status == 200 and [p["projectName"] for p in got["projects"]] == ["AI_CXR"]
    assert (await api.get("/v1/sources?projectIdentifier=AI_CXR", who="cxr-only"))[0] == 200
    # another project is answered as one that does not exist: the same words, by name
    # and by id, so walking ids tells no one which projects exist (nor their names)
    ids = {p["projectName"]: p["projectId"] for p in (await api.get("/v1/projects"))[1][
        "projects"]}
    unknown_id = max(ids.values()) + 1
    for ident, words in (("DICOMNODE", "no project 'DICOMNODE'"),
                         ("NO_SUCH_AE", "no project 'NO_SUCH_AE'"),
                         (str(ids["DICOMNODE"]), f"no project with id {ids['DICOMNODE']}"),
                         (str(unknown_id), f"no project with id {unknown_id}")):
        assert await api.get(f"/v1/sources?projectIdentifier={ident}", who="cxr-only") == (
            404, {"message": f"{words}; GET /v1/projects lists them"}), ident
    elsewhere = good(api, projectIdentifier="DICOMNODE", sourceIds=[api.sources["cr3"]])
    assert await api.post(elsewhere, who="cxr-only") == (
        400, {"message": "no project 'DICOMNODE'; GET /v1/projects lists them"})
    assert await api.post(good(api, projectIdentifier="NO_SUCH_AE"), who="cxr-only") == (
        400, {"message": "no project 'NO_SUCH_AE'; GET /v1/projects lists them"})
    status, mine = await api.post(good(api), who="cxr-only")
    assert status == 201, mine
    # a batch of the same group on a project the key may not use: as if it did not exist
    status, theirs = await api.post(elsewhere, who="lab")  # no list: every project
    assert status == 201, theirs
    status, got = await api.get(f"/v1/infer/batch/{theirs['inferenceJobId']}", who="cxr-only")
    assert status == 404 and set(got) == {"message"}
    assert (await api.get(f"/v1/infer/batch/{mine['inferenceJobId']}", who="cxr-only"))[0] \
        == 200
    # a JWT's projects claim, here by the project's integer id
    secret = (api.tmp / "data" / "jwt_secret").read_bytes().strip()
    token = jwt.encode({"sub": "svc", "group": "radiology", "scope": "infer read",
                        "projects": [ids["DICOMNODE"]], "exp": int(time.time()) + 60},
                       secret, algorithm="HS256")
    headers = {"Authorization": f"Bearer {token}"}
    r = await api.client.post("/v1/infer/batch", json=elsewhere, headers=headers)
    assert r.status == 201
    r = await api.client.post("/v1/infer/batch", json=good(api), headers=headers)
    assert r.status == 400  # as if AI_CXR did not exist


async def test_models_have_stable_integer_ids(api: Api) -> None:
    """Seed 002's modelIdentifier is "either id or the unique name of the model"."""
    status, got = await api.get("/v1/models")
    assert status == 200
    assert [(m["modelName"], m["model"], m["task"]) for m in got["models"]] == [
        ("cxr", "tiny", "classify")]
    model_id = got["models"][0]["modelId"]
    assert isinstance(model_id, int) and (await api.get("/v1/models"))[1] == got
    assert (await api.get("/v1/models", who="submitter"))[0] == 403  # a listing: read
    for ident in (model_id, str(model_id)):
        status, body = await api.post(good(api, modelIdentifier=ident))
        assert status == 201, body
        status, body = await api.get(f"/v1/infer/batch/{body['inferenceJobId']}")
        assert body["modelIdentifier"] == "cxr"
    status, body = await api.post(good(api, modelIdentifier=model_id + 1000))
    assert status == 400 and body["message"].startswith(
        f"no model or pipeline {model_id + 1000}; configured pipelines: cxr (id {model_id})")


async def test_body_over_the_limit_is_413(api: Api) -> None:
    big = b'{"groupName": "' + b"g" * 50_000_000 + b'"}'  # a 50 MB body: over the 32 MiB default
    r = await api.client.post("/v1/infer/batch", data=big,
                              headers={**key("lab"), "Content-Type": "application/json"})
    assert r.status == 413 and set(await r.json()) == {"message"}


def test_batch_status_rules() -> None:
    """Queued while no source has started; Running once one has, until every source has
    ended; then Finished, or Errored when one did not succeed."""
    def job(state: JobState, started: bool = False) -> Job:
        now = utcnow()
        return Job(id="x", kind="batch", pipeline="p", state=state, priority=128, attempts=0,
                   max_attempts=5, input={}, created_at=now, updated_at=now,
                   started_at=now if started else None)

    q, r, s, f = (job(JobState.QUEUED), job(JobState.RUNNING, True),
                  job(JobState.SUCCEEDED, True), job(JobState.FAILED, True))
    # cancelled while queued: ended without starting
    c = job(JobState.CANCELLED)
    # ran, and waits in the queue for its next export attempt (or a retry of its run)
    w = job(JobState.QUEUED, started=True)
    assert batch_status([q, q]) == "Queued"
    assert batch_status([q, r]) == "Running"
    assert batch_status([s, q]) == "Running"
    assert batch_status([s, s]) == "Finished"
    assert batch_status([s, f]) == "Errored"
    assert batch_status([dataclasses.replace(f, state=JobState.CANCELLED)]) == "Errored"
    assert batch_status([c, q]) == "Queued"  # nothing has run yet
    assert batch_status([c, c]) == "Errored"
    assert batch_status([f, q]) == "Running"  # one ran: the batch is under way
    assert batch_status([w]) == "Running"
    assert batch_status([w, s]) == "Running"
    assert batch_status([dataclasses.replace(s, started_at=None), q]) == "Running"


def _batch_of_two(store: Store) -> Batch:
    return store.create_batch(
        group_name="g", owner=None, project_id=1, pipeline="p", output_layer_id=2,
        sources=[(1, NewJob(pipeline="p", kind="batch")),
                 (2, NewJob(pipeline="p", kind="batch"))])


def test_a_source_is_running_from_its_first_start_until_it_ends(tmp_path: Path) -> None:
    """A job queued again after it started (for an export retry, a retry of its run, or
    after a restart) is still Running: a source never goes back to Queued."""
    store = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    try:
        batch = _batch_of_two(store)
        first = batch.sources[0][1]
        body = status_body(store, store.get_batch(batch.id))
        assert [r["status"] for r in body["results"]] == ["Queued", "Queued"]
        claimed = store.claim_next("w", 30)
        assert claimed is not None and claimed.id == first.id
        assert status_body(store, store.get_batch(batch.id))["results"][0]["status"] == (
            "Running")
        # its export failed with attempts left: queued for the next one, an hour away
        assert store.start_export(first.id, [], token=claimed.lease_token)
        store.record_export(first.id, "pacs", "retrying", 1, 0, "refused (attempt 1 of 3)")
        assert store.transition(first.id, JobState.QUEUED, token=claimed.lease_token,
                                message="export to pacs failed; next export attempt in 3600 s",
                                not_before=utcnow() + timedelta(hours=1),
                                uncount_attempt=True)
        body = status_body(store, store.get_batch(batch.id))
        assert store.get_job(first.id).state is JobState.QUEUED
        assert [r["status"] for r in body["results"]] == ["Running", "Queued"]
        assert body["status"] == "Running"
    finally:
        store.close()


def test_a_cancelled_source_says_it_was_cancelled(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    try:
        batch = _batch_of_two(store)
        cancelled = store.request_cancel(batch.sources[0][1].id)
        body = status_body(store, store.get_batch(batch.id))
        gone, waiting = body["results"]
        assert gone["status"] == "Errored" and waiting["status"] == "Queued"
        assert cancelled.finished_at is not None
        assert gone["message"] == (f"cancelled at {cancelled.finished_at.isoformat()}, "
                                   "before it started")
        assert body["status"] == "Queued"  # nothing has started: nothing runs
        # the other is cancelled as it runs: its worker stops it
        claimed = store.claim_next("w", 30)
        assert claimed is not None and claimed.id == batch.sources[1][1].id
        store.request_cancel(claimed.id)
        assert store.transition(claimed.id, JobState.CANCELLED, token=claimed.lease_token,
                                message="cancelled")
        body = status_body(store, store.get_batch(batch.id))
        ran = store.get_job(claimed.id)
        assert ran.finished_at is not None
        assert body["results"][1]["message"] == (
            f"cancelled at {ran.finished_at.isoformat()} while it ran")
        assert body["status"] == "Errored"
    finally:
        store.close()


def other_digits(n: int, zero: str = "\u0660") -> str:
    """``n`` in another script's decimal digits (Arabic-Indic by default), which
    ``str.isdigit()`` and ``int()`` both take."""
    return "".join(chr(ord(zero) + int(d)) for d in str(n))


async def test_ids_and_numbers_are_ascii_digits_only(api: Api) -> None:
    """"¹" (int() refuses it), Arabic-Indic and fullwidth digits (int() reads them as
    numbers) are no ids and no numbers: unknown (404) or a bad value (400), never a 500
    and never another id's batch, project or output layer."""
    status, got = await api.post(good(api))
    assert status == 201, got
    job, pid, lid = got["inferenceJobId"], got["projectId"], got["outputLayerId"]
    assert (await api.get(f"/v1/infer/batch/{job}"))[0] == 200
    for ident in ("\u00b9", other_digits(job), other_digits(job, "\uff10")):
        status, body = await api.get(f"/v1/infer/batch/{quote(ident)}")
        assert status == 404 and set(body) == {"message"}, (ident, body)
    for changes in ({"projectIdentifier": "\u00b9"}, {"projectIdentifier": other_digits(pid)},
                    {"outputLayerIdentifier": "\u00b2"},
                    {"outputLayerIdentifier": other_digits(lid)}):
        status, body = await api.post(good(api, **changes))
        assert status == 400 and set(body) == {"message"}, (changes, body)
        assert body["message"].startswith(("no project", "no output layer")), body
    for ident in ("\u00b9", other_digits(pid)):
        status, body = await api.get(f"/v1/sources?projectIdentifier={quote(ident)}")
        assert status == 404 and set(body) == {"message"}, (ident, body)
    for name, value in (("limit", "\u00b2"), ("limit", other_digits(1)),
                        ("offset", "\u00b2"), ("offset", "9" * 5000)):
        status, body = await api.get(
            f"/v1/sources?projectIdentifier=AI_CXR&{name}={quote(value)}")
        assert status == 400 and body["message"].startswith(f"{name} must be"), (name, body)


async def test_a_study_stays_in_its_project_when_it_comes_again_another_way(
        api: Api) -> None:
    """Sent to AI_CXR, then the same file dropped into the inbox: the study is in both
    projects, and a batch on AI_CXR still takes it."""
    source = api.sources["cr1"]
    shutil.copy(api.tmp / "incoming" / "cr1.dcm", api.tmp / "inbox" / "cr1.dcm")
    while True:  # until the drop folder has taken it in
        status, got = await api.get("/v1/sources?projectIdentifier=inbox")
        assert status == 200, got
        if [s["sourceId"] for s in got["sources"]] == [source]:
            break
        await asyncio.sleep(0.05)
    status, got = await api.get("/v1/sources?projectIdentifier=AI_CXR")
    assert status == 200 and source in [s["sourceId"] for s in got["sources"]], got
    status, got = await api.post(good(api, sourceIds=[source]))
    assert status == 201, got
    status, got = await api.post(good(api, projectIdentifier="inbox", sourceIds=[source]))
    assert status == 201, got


async def test_a_source_waiting_to_export_again_is_running_and_a_cancel_says_so(
        api: Api) -> None:
    """The model ran, the export failed with attempts left: the job waits in the queue
    for its next export attempt, and its source stays Running. Cancelled then, it is
    Errored with a message saying it was cancelled."""
    status, got = await api.post(good(api, sourceIds=[api.sources["cr1"]],
                                      outputLayerIdentifier="unwritable"))
    assert status == 201, got
    assert api.node.store is not None and api.node.scheduler is not None
    store = api.node.store
    ((_, job),) = store.get_batch(got["inferenceJobId"]).sources
    while True:  # until its first export attempt failed and it went back to the queue
        now = store.get_job(job.id)
        if now.state is JobState.QUEUED and store.exports_of(job.id):
            break
        assert not now.state.final, now
        await asyncio.sleep(0.05)
    assert store.exports_of(job.id)[0].state == "retrying"
    status, body = await api.get(f"/v1/infer/batch/{got['inferenceJobId']}")
    assert status == 200, body
    assert body["status"] == "Running" and body["results"][0]["status"] == "Running", body
    await api.node.scheduler.cancel(job.id)
    done = await wait_final(api, got["inferenceJobId"])
    assert done["status"] == "Errored"
    (result,) = done["results"]
    assert result["status"] == "Errored"
    assert result["message"].startswith("cancelled at "), result
    # what it was waiting for
    assert " while queued to be tried again, after: export to unwritable failed: " in (
        result["message"]), result
