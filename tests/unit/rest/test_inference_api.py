"""ACR inference requests: validation (422 by field), 409, status, ownership."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient

from rest.app import create_app
from tests.support.inproc import node_settings, running_node

PIPELINES = [{"name": "cxr", "model": "m", "task": "classify"}]
CONFIG = {
    "models": [{"name": "m", "path": "."}],
    "pipelines": PIPELINES,
    "sources": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242,
                 "dicomweb_url": "http://127.0.0.1:8042/dicom-web"}],
    "destinations": [{"name": "pacs-out", "type": "dimse", "ae_title": "ORTHANC",
                      "host": "127.0.0.1", "port": 4242}],
}
GOOD: dict[str, Any] = {
    "transactionID": "tx-1",
    "priority": 200,
    "inputMetadata": {"details": {"type": "DICOM_UID",
                                  "studies": [{"StudyInstanceUID": "1.2.840.1"}]}},
    "inputResources": [
        {"interface": "Algorithm", "connectionDetails": {"name": "cxr"}},
        {"interface": "DIMSE", "connectionDetails": {"name": "pacs"}},
    ],
    "outputResources": [{"interface": "DIMSE", "connectionDetails": {"name": "pacs-out"}}],
}


def tok(sub: str = "ris", scope: str = "infer read", secret: bytes = b"") -> str:
    return jwt.encode({"sub": sub, "scope": scope, "exp": int(time.time()) + 300}, secret,
                      algorithm="HS256")


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[tuple[TestClient, dict]]:
    settings = node_settings(tmp_path / "data", **CONFIG)
    async with running_node(settings) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        headers = {"Authorization": f"Bearer {tok(secret=secret)}"}
        other = {"Authorization": f"Bearer {tok('someone-else', secret=secret)}"}
        yield client, {"ris": headers, "other": other}


def body(**changes: Any) -> dict[str, Any]:
    b = copy.deepcopy(GOOD)
    b.update(changes)
    return b


async def test_clara_spellings_are_accepted(api: tuple[TestClient, dict]) -> None:
    """What Clara's own InferenceRequest example and its enum reader accept: priority
    as a string of digits ("255"), an id beside the Algorithm's name, enum values in
    any case, "WADO Retrieve" as an operation. They were 422s."""
    client, h = api
    clara = body(
        transactionID="tx-clara", priority="255",
        inputMetadata={"details": {"type": "dicom_uid",
                                   "studies": [{"StudyInstanceUID": "1.2.840.1"}]}},
        inputResources=[
            {"interface": "algorithm",
             "connectionDetails": {"name": "cxr", "id": "123456790"}},
            {"interface": "DICOMWeb",
             "connectionDetails": {"uri": "http://127.0.0.1:8042/dicom-web",
                                   "authType": "basic", "authId": "dXNlcjpwdw==",
                                   "operations": ["Query", "WADO Retrieve"]}},
        ])
    r = await client.post("/api/inference", json=clara, headers=h["ris"])
    assert r.status == 200, await r.text()
    s = await client.get("/api/inference/status/tx-clara", headers=h["ris"])
    assert (await s.json())["priority"] == 255


async def test_accepts_and_reports_status(api: tuple[TestClient, dict]) -> None:
    client, h = api
    r = await client.post("/api/inference", json=GOOD, headers=h["ris"])
    assert r.status == 200, await r.text()
    data = await r.json()
    assert data["transactionID"] == "tx-1" and data["jobId"]
    for ref in ("tx-1", data["jobId"]):
        s = await client.get(f"/api/inference/status/{ref}", headers=h["ris"])
        assert s.status == 200
        st = await s.json()
        assert st["jobId"] == data["jobId"] and st["priority"] == 200
        assert st["state"] in ("queued", "retrieving", "running", "exporting", "succeeded")
        assert st["created"].endswith("+00:00")
    # another caller can neither see it nor is blocked from using the same transactionID
    assert (await client.get("/api/inference/status/tx-1", headers=h["other"])).status == 404
    assert (await client.post("/inference", json=GOOD, headers=h["other"])).status == 200
    # the same caller reusing its transactionID: 409
    again = await client.post("/api/inference", json=GOOD, headers=h["ris"])
    assert again.status == 409 and "tx-1" in (await again.json())["message"]
    # and what to do instead (a RIS integrator re-sending after fixing the PACS)
    assert f"dicom-node jobs retry {data['jobId']}" in (await again.json())["message"]


async def test_a_submit_only_token_can_poll_its_request(aiohttp_client: Any,
                                                        tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "data", **CONFIG)
    async with running_node(settings) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        h = {"Authorization": f"Bearer {tok(scope='infer', secret=secret)}"}
        r = await client.post("/api/inference", json=GOOD, headers=h)
        assert r.status == 200, await r.text()
        s = await client.get("/api/inference/status/tx-1", headers=h)
        assert s.status == 200 and (await s.json())["transactionID"] == "tx-1"
        nothing = {"Authorization": f"Bearer {tok(scope='', secret=secret)}"}
        s = await client.get("/api/inference/status/tx-1", headers=nothing)
        assert s.status == 403


async def test_unknown_status_is_404(api: tuple[TestClient, dict]) -> None:
    client, h = api
    assert (await client.get("/api/inference/status/nope", headers=h["ris"])).status == 404


async def test_needs_credentials(api: tuple[TestClient, dict]) -> None:
    client, _ = api
    assert (await client.post("/api/inference", json=GOOD)).status == 401


BAD_CASES = [
    ("not json", "(body)"),
    (body(priority=300), "priority"),
    (body(priority="high"), "priority"),
    (body(priority="²⁰⁰"), "priority"),  # digits, but not ASCII ones
    (body(priority="300"), "priority"),  # in a string, still out of range
    (body(priority=1.5), "priority"),
    (body(priority=True), "priority"),
    ({k: v for k, v in GOOD.items() if k != "outputResources"}, "outputResources"),
    (body(inputMetadata={"details": {"type": "DICOM_PATIENT_ID", "PatientID": "*"}}),
     "inputMetadata.details.PatientID"),  # a wildcard would fetch every patient
    (body(inputMetadata={"details": {"type": "DICOM_PATIENT_ID", "PatientID": "PAT\\1"}}),
     "inputMetadata.details.PatientID"),
    (body(inputMetadata={"details": {"type": "ACCESSION_NUMBER",
                                     "accessionNumber": ["A1", "A?"]}}),
     "inputMetadata.details.accessionNumber.1"),
    (body(inputResources=[GOOD["inputResources"][0],
                          {"interface": "DIMSE",
                           "connectionDetails": {"aeTitle": "ORTHANC", "host": "127.0.0.1",
                                                 "port": "4242"}}]),
     "inputResources.1.connectionDetails.port"),
    ({k: v for k, v in GOOD.items() if k != "transactionID"}, "transactionID"),
    (body(inputResources=[{"interface": "FTP", "connectionDetails": {}}]),
     "inputResources.0.interface"),
    (body(inputResources=[*GOOD["inputResources"],
                          {"interface": "Algorithm", "connectionDetails": {"name": "cxr"}}]),
     "inputResources"),
    (body(inputResources=[{"interface": "Algorithm", "connectionDetails": {"name": "nope"}},
                          GOOD["inputResources"][1]]), "inputResources.0.connectionDetails.name"),
    (body(inputMetadata={"details": {"type": "DICOM_UID",
                                     "studies": [{"StudyInstanceUID": "not-a-uid"}]}}),
     "inputMetadata.details.studies.0.StudyInstanceUID"),
    (body(inputMetadata={"details": {"type": "DICOM_PATIENT_ID"}}),
     "inputMetadata.details.PatientID"),
    (body(inputResources=[GOOD["inputResources"][0],
                          {"interface": "DICOMweb",
                           "connectionDetails": {"uri": "ftp://pacs/dicom-web"}}]),
     "inputResources.1.connectionDetails.uri"),
    (body(inputResources=[GOOD["inputResources"][0],
                          {"interface": "DICOMweb",
                           "connectionDetails": {"uri": "http://evil.example/dicom-web"}}]),
     "inputResources.1.connectionDetails.uri"),
    (body(inputResources=[GOOD["inputResources"][0],
                          {"interface": "DIMSE",
                           "connectionDetails": {"aeTitle": "X", "host": "10.0.0.1",
                                                 "port": 104}}]),
     "inputResources.1.connectionDetails"),
    (body(outputResources=[{"interface": "DIMSE", "connectionDetails": {"name": "nowhere"}}]),
     "outputResources.0.connectionDetails.name"),
    (body(inputResources=[GOOD["inputResources"][0],
                          {"interface": "DICOMweb", "connectionDetails": {
                              "uri": "http://127.0.0.1:8042/dicom-web",
                              "operations": ["QUERY"]}}]),
     "inputResources.1.connectionDetails.operations"),  # may search but not read
    (body(outputResources=[{"interface": "DICOMweb", "connectionDetails": {
        "uri": "http://127.0.0.1:8042/dicom-web", "operations": ["RETRIEVE"]}}]),
     "outputResources.0.connectionDetails.operations"),  # may read but not store
    # a PatientID lookup with a source that may be read but not searched: the job would
    # fail later with "no study found" though the study is there
    (body(inputMetadata={"details": {"type": "DICOM_PATIENT_ID", "PatientID": "P1"}},
          inputResources=[GOOD["inputResources"][0],
                          {"interface": "DICOMweb", "connectionDetails": {
                              "uri": "http://127.0.0.1:8042/dicom-web",
                              "operations": ["RETRIEVE"]}}]),
     "inputResources"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_CASES)
async def test_invalid_requests_name_the_field(api: tuple[TestClient, dict], payload: Any,
                                               field: str) -> None:
    client, h = api
    if isinstance(payload, str):
        r = await client.post("/api/inference", data=payload, headers=h["ris"])
    else:
        r = await client.post("/api/inference", json=payload, headers=h["ris"])
    assert r.status == 422, await r.text()
    details = (await r.json())["details"]
    assert field in [d["field"] for d in details], details


async def test_a_misspelt_field_is_answered_with_the_one_meant(
        api: tuple[TestClient, dict]) -> None:
    """'transactionId' (the letter case is easy to get wrong): the unknown field comes
    with the contract's 'transactionID', the missing one beside it."""
    client, h = api
    bad = {("transactionId" if k == "transactionID" else k): v for k, v in GOOD.items()}
    r = await client.post("/api/inference", json=bad, headers=h["ris"])
    assert r.status == 422, await r.text()
    details = {d["field"]: d["message"] for d in (await r.json())["details"]}
    assert details["transactionId"] == "unknown field (did you mean 'transactionID'?)"
    assert details["transactionID"] == "required field is missing"


async def test_one_answer_lists_every_problem(api: tuple[TestClient, dict]) -> None:
    """A malformed field does not hide the configuration problems of the other parts."""
    client, h = api
    bad = body(priority=300, inputResources=[
        {"interface": "Algorithm", "connectionDetails": {"name": "nope"}},
        {"interface": "DICOMweb", "connectionDetails": {"uri": "http://evil.example/wado"}}],
        outputResources=[{"interface": "DIMSE", "connectionDetails": {"name": "nowhere"}},
                         {"interface": "FTP", "connectionDetails": {}}])
    r = await client.post("/api/inference", json=bad, headers=h["ris"])
    assert r.status == 422, await r.text()
    fields = [d["field"] for d in (await r.json())["details"]]
    assert set(fields) == {"priority", "inputResources.0.connectionDetails.name",
                           "inputResources.1.connectionDetails.uri",
                           "outputResources.0.connectionDetails.name",
                           "outputResources.1.interface"}, fields
    # two Algorithm resources are counted even beside a malformed resource
    two = body(inputResources=[*GOOD["inputResources"], GOOD["inputResources"][0],
                               {"interface": "FTP", "connectionDetails": {}}])
    r = await client.post("/api/inference", json=two, headers=h["ris"])
    fields = [d["field"] for d in (await r.json())["details"]]
    assert "inputResources" in fields and "inputResources.3.interface" in fields


async def test_configured_dicomweb_base_and_explicit_dimse_peer_are_accepted(
        api: tuple[TestClient, dict]) -> None:
    client, h = api
    ok = body(transactionID="tx-web", inputResources=[
        GOOD["inputResources"][0],
        {"interface": "DICOMweb", "connectionDetails": {
            "uri": "http://127.0.0.1:8042/dicom-web", "authType": "Basic", "authId": "dTpw"}},
        {"interface": "DIMSE", "connectionDetails": {"aeTitle": "ORTHANC", "host": "127.0.0.1",
                                                     "port": 4242}},
    ])
    r = await client.post("/api/inference", json=ok, headers=h["ris"])
    assert r.status == 200, await r.text()


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b'{"priority": ' + b"9" * 5000 + b"}",
                                  b"[" * 100_000 + b"]" * 100_000])
async def test_bodies_that_are_not_json_are_422(api: tuple[TestClient, dict],
                                                body: bytes) -> None:
    client, headers = api
    r = await client.post("/api/inference", data=body,
                          headers={**headers["ris"], "Content-Type": "application/json"})
    assert r.status == 422
    assert (await r.json())["details"][0]["field"] == "(body)"


def test_phase_timings_take_the_last_attempt() -> None:
    from datetime import UTC, datetime, timedelta

    from dicom_node.store import Job, JobEvent, JobState
    from rest.inference import phase_timings

    t0 = datetime(2025, 1, 1, tzinfo=UTC)

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    job = Job(id="j", kind="acr", pipeline="p", state=JobState.SUCCEEDED, priority=128,
              attempts=2, max_attempts=5, input={}, created_at=t0, updated_at=at(20))
    events = [
        JobEvent(t0, JobState.QUEUED, None),
        JobEvent(at(1), JobState.RETRIEVING, "attempt 1 on node"),
        JobEvent(at(2), JobState.QUEUED, "RetrievalError: down"),
        JobEvent(at(10), JobState.RETRIEVING, "attempt 2 on node"),
        JobEvent(at(12), JobState.RUNNING, "input retrieved"),
        JobEvent(at(17), JobState.EXPORTING, "3 artifacts"),
        JobEvent(at(18.5), JobState.SUCCEEDED, "done"),
    ]
    # the attempt is counted from its return to the queue (at 2 s), not from the job's
    # creation: a retry asked for days later would otherwise read days queued
    assert phase_timings(job, events) == {"queued_s": 8.0, "retrieve_s": 2.0, "run_s": 5.0,
                                          "export_s": 1.5, "total_s": 16.5}
    assert phase_timings(job, events[:1]) == {}
    running = phase_timings(job, events[:5])  # still running: no end for the run yet
    assert running == {"queued_s": 8.0, "retrieve_s": 2.0}
    # a first attempt: queued from the job's creation
    assert phase_timings(job, events[:2]) == {"queued_s": 1.0}


def test_a_success_on_part_of_the_request_says_what_is_missing() -> None:
    import dataclasses
    from datetime import UTC, datetime

    from dicom_node.store import Job, JobState
    from rest.inference import status_body

    retrieval = [
        {"study": "1.2.3", "state": "retrieved", "received": 1, "failed": 0},
        {"study": "1.2.4", "state": "retrieved", "received": 1, "failed": 0},
        {"study": "1.2.999", "state": "failed", "received": 0, "failed": 0,
         "message": "the source has no such study"},
    ]
    now = datetime(2025, 1, 1, tzinfo=UTC)
    job = Job(id="j", kind="acr", pipeline="p", state=JobState.SUCCEEDED, priority=128,
              attempts=1, max_attempts=5, input={}, created_at=now, updated_at=now,
              result={"retrieval": retrieval})
    body = status_body(job, [])
    assert body["status"] == "Succeeded"
    assert body["message"] == ("ran on 2 of 3 studies or series asked for in full; "
                               "1.2.999: failed (the source has no such study)")
    whole = dataclasses.replace(job, result={"retrieval": retrieval[:2]})
    assert status_body(whole, [])["message"] is None


def test_auth_id_is_accepted_in_both_spellings() -> None:
    """Clara's authId, and authID as the issue writes it, name the same credential."""
    from rest.inference import InferenceRequest

    for key in ("authId", "authID"):
        req = InferenceRequest.model_validate(body(inputResources=[
            GOOD["inputResources"][0],
            {"interface": "DICOMweb", "connectionDetails": {
                "uri": "http://127.0.0.1:8042/dicom-web", "authType": "Bearer", key: "tok"}}]))
        assert req.inputResources[1].connectionDetails.authId == "tok"


ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("sample", sorted((ROOT / "samples/requests").glob("acr-*.json")),
                         ids=lambda p: p.name)
def test_sample_requests_are_valid_for_the_example_pacs_config(sample: Path) -> None:
    import json

    from dicom_node.config import load_settings
    from rest.inference import validate_request

    settings = load_settings(ROOT / "configs/examples/pacs.yaml")
    request, _ = validate_request(json.loads(sample.read_text()), settings)  # 422 raises
    assert request.transactionID.startswith("sample-")


async def test_a_body_with_a_byte_order_mark_is_read(api: tuple[TestClient, dict]) -> None:
    """.NET's UTF-8 encoder writes a byte order mark before the JSON."""
    client, h = api
    raw = b"\xef\xbb\xbf" + json.dumps(body(transactionID="tx-bom")).encode()
    r = await client.post("/api/inference", data=raw,
                          headers={**h["ris"], "Content-Type": "application/json"})
    assert r.status == 200, await r.text()


def test_a_cancelled_request_says_when_and_at_which_stage() -> None:
    """Its message was the job's error: null, or an export error it had been waiting on."""
    from datetime import UTC, datetime, timedelta

    from dicom_node.store import Job, JobEvent, JobState
    from rest.inference import status_body

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    job = Job(id="j", kind="acr", pipeline="p", state=JobState.CANCELLED, priority=128,
              attempts=1, max_attempts=5, input={}, created_at=t0, updated_at=t0,
              started_at=t0 + timedelta(seconds=1), finished_at=t0 + timedelta(seconds=9))
    events = [JobEvent(t0, JobState.QUEUED, None),
              JobEvent(t0 + timedelta(seconds=1), JobState.RUNNING, "attempt 1"),
              JobEvent(t0 + timedelta(seconds=9), JobState.CANCELLED, "cancelled")]
    body = status_body(job, [], events)
    assert body["status"] == "Cancelled"
    assert body["message"] == "cancelled at 2025-01-01T00:00:09+00:00 while it ran"


def test_each_result_names_the_patient_of_its_study() -> None:
    """From the retrieval record: a series entry counts for its study; a study refused as
    another patient's gives no result its Patient ID; an older job's record has none."""
    from datetime import UTC, datetime

    from dicom_node.store import Job, JobState
    from rest.inference import status_body

    retrieval = [
        {"study": "1.2.3/1.2.3.1", "PatientID": "P1", "state": "retrieved"},
        {"study": "1.2.4", "PatientID": "P2", "state": "failed",
         "message": "study 1.2.4 belongs to patient P2 on the PACS, not P1 as the request "
                    "says; not retrieved"},
        {"study": "1.2.5", "state": "partial"},
    ]
    results = [{"study": "1.2.3", "result": "Normal"}, {"study": "1.2.5", "result": "Normal"}]
    now = datetime(2025, 1, 1, tzinfo=UTC)
    job = Job(id="j", kind="acr", pipeline="p", state=JobState.SUCCEEDED, priority=128,
              attempts=1, max_attempts=5, input={}, created_at=now, updated_at=now,
              result={"retrieval": retrieval, "results": results})
    assert status_body(job, [])["results"] == [
        {"study": "1.2.3", "result": "Normal", "PatientID": "P1"},
        {"study": "1.2.5", "result": "Normal", "PatientID": None}]
