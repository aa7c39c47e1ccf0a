"""Seed 002 end to end: studies arrive by C-STORE (dcmtk storescu) under a called AE
title, a batch job runs the real cxr-findings model on them through the scheduler,
and the results go to the output layer, a real DICOM peer (dcmtk storescp).

No assertion has a wall-clock limit; pytest-timeout guards hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from aiohttp.test_utils import TestClient

from pipeline.train.phantoms_cxr import FINDINGS, make_cxr_phantom, write_dicom
from rest.app import create_app
from rest.auth import hash_api_key
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port, storescp, storescu

pytestmark = pytest.mark.timeout(300)

API_KEY = "XXXXXXX-XXXXXXX-XXXXXXX"
HEADERS = {"Authorization": f"Api-Key {API_KEY}"}
SEED = 1003  # a phantom the demo model reads right with findings forced either way


@dataclass
class Setup:
    client: TestClient
    pacs: Path  # where the output layer (storescp) writes what it receives
    studies: dict[str, str]  # "tb" / "normal" -> StudyInstanceUID


@pytest.fixture
async def setup(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Setup]:
    with storescp(tmp_path / "pacs", "RESEARCH") as peer:
        port = free_port()
        settings = node_settings(
            tmp_path / "data",
            dimse={"host": "127.0.0.1", "port": port},
            ae_titles=[{"ae_title": "DICOMNODE"},
                       {"ae_title": "AI_CXR", "pipelines": [], "timeout_s": 1}],
            models=[{"name": "cxr-findings", "path": "pipeline/models/cxr-findings"}],
            pipelines=[{"name": "cxr-findings", "model": "cxr-findings", "task": "classify",
                        "series": {"modalities": ["CR", "DX"]}}],
            destinations=[{"name": "research-pacs", "type": "dimse", "ae_title": "RESEARCH",
                           "host": "127.0.0.1", "port": peer.port}],
            executor={"runner": "dicom_node.handler:create_handler", "poll_interval_s": 0.1,
                      "grace_period_s": 10},
            auth={"api_keys": [{"name": "annotator", "key_sha256": hash_api_key(API_KEY),
                                "group": "Company Name"}]},
        )
        async with running_node(settings) as node:
            assert node.runner is not None and not node.runner.failed
            client = await aiohttp_client(create_app(node))
            files, studies = [], {}
            for label, tb in (("tb", True), ("normal", False)):
                drawn = make_cxr_phantom(SEED + (0 if tb else 1),
                                         findings={f: tb and f == "Tuberculosis"
                                                   for f in FINDINGS})
                path = write_dicom(drawn, tmp_path / "modality" / f"{label}.dcm",
                                   patient_id=f"PAT-{label}", modality="CR")
                files.append(path)
                studies[label] = str(pydicom.dcmread(path).StudyInstanceUID)
            await asyncio.to_thread(storescu, port, files, "AI_CXR", "MODALITY")
            yield Setup(client, peer.directory, studies)


async def test_batch_runs_the_model_on_sources_and_sends_to_the_output_layer(
        setup: Setup) -> None:
    client = setup.client
    r = await client.get("/v1/sources", params={"projectIdentifier": "AI_CXR"},
                         headers=HEADERS)
    listed = await r.json()
    assert r.status == 200, listed
    ids = {s["studyInstanceUID"]: s["sourceId"] for s in listed["sources"]}
    assert set(ids) == set(setup.studies.values())
    source_ids = [ids[setup.studies["tb"]], ids[setup.studies["normal"]]]

    r = await client.post("/v1/infer/batch", headers=HEADERS, json={
        "groupName": "Company Name", "projectIdentifier": "AI_CXR", "sourceIds": source_ids,
        "modelIdentifier": "cxr-findings", "outputLayerIdentifier": "research-pacs"})
    created = await r.json()
    assert r.status == 201, created
    assert created["status"] == "Queued" and isinstance(created["inferenceJobId"], int)
    assert (created["projectName"], created["projectId"]) == ("AI_CXR", listed["projectId"])
    assert created["outputLayerName"] == "research-pacs"
    assert isinstance(created["outputLayerId"], int) and created["sourceIds"] == source_ids

    seen = []
    while True:
        r = await client.get(f"/v1/infer/batch/{created['inferenceJobId']}", headers=HEADERS)
        status = await r.json()
        assert r.status == 200, status
        if not seen or seen[-1] != status["status"]:
            seen.append(status["status"])
        if status["status"] in ("Finished", "Errored"):
            break
        await asyncio.sleep(0.2)
    assert seen[-1] == "Finished", status
    assert set(seen) <= {"Queued", "Running", "Finished"}
    assert status["inferenceJobId"] == created["inferenceJobId"]
    assert status["sourceIds"] == source_ids and status["projectId"] == created["projectId"]
    tb, normal = status["results"]
    assert tb["result"] == "TB Presumptive" and normal["result"] == "Normal"
    assert next(f for f in tb["findings"] if f["name"] == "Tuberculosis")["presence"]
    assert len(tb["findings"]) == len(FINDINGS)
    for res in (tb, normal):
        assert res["status"] == "Finished" and res["message"] is None
        [export] = res["exports"]
        assert export["outputLayerName"] == "research-pacs" and export["state"] == "succeeded"
    kinds = {r["studyInstanceUID"]: sorted(a["kind"] for a in r["artifacts"])
             for r in status["results"]}
    assert "sc" in kinds[setup.studies["tb"]] and "sc" not in kinds[setup.studies["normal"]]

    # the output layer received the DICOM results: an SR per study, the heatmap SC for TB
    received = [pydicom.dcmread(p, stop_before_pixels=True)
                for p in setup.pacs.iterdir() if p.is_file()]
    assert sum(r["exports"][0]["sent"] for r in status["results"]) == len(received)
    by_study: dict[str, set[str]] = {}
    for ds in received:
        by_study.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.Modality))
    assert by_study == {setup.studies["tb"]: {"SR", "OT", "DOC"},
                        setup.studies["normal"]: {"SR", "DOC"}}, by_study
