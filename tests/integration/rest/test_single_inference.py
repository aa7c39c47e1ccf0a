"""POST /single_inference end to end: a whole node with the real cxr-findings model.

Phantom chest radiographs (CR) drawn by ``pipeline.train.phantoms_cxr`` with all
findings forced off (the model says Normal) or with only Tuberculosis on (the
model says TB Presumptive) go through the node's PipelineRunner.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pydicom
import pytest
from aiohttp.test_utils import TestClient
from PIL import Image

from pipeline.train.phantoms_cxr import FINDINGS, make_cxr_phantom, write_dicom
from rest.app import create_app
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port

pytestmark = pytest.mark.timeout(300)

CXR = {
    "models": [{"name": "cxr-findings", "path": "pipeline/models/cxr-findings"}],
    "pipelines": [{"name": "cxr-findings", "model": "cxr-findings", "task": "classify",
                   "series": {"modalities": ["CR", "DX"]}}],
}
SEED = 1003  # a phantom the demo model reads right with findings forced either way


def phantom(path: Path, *, tb: bool, patient_id: str) -> Path:
    drawn = make_cxr_phantom(SEED, findings={f: tb and f == "Tuberculosis" for f in FINDINGS})
    return write_dicom(drawn, path, patient_id=patient_id, patient_name="Doe^John",
                       modality="CR")


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[tuple[TestClient, dict,
                                                                         Path]]:
    data = tmp_path / "data"
    settings = node_settings(data, dimse={"host": "127.0.0.1", "port": free_port()}, **CXR)
    async with running_node(settings) as node:
        assert node.runner is not None and not node.runner.failed
        client = await aiohttp_client(create_app(node))
        secret = (data / "jwt_secret").read_bytes().strip()
        token = jwt.encode({"sub": "ris", "scope": "infer", "exp": int(time.time()) + 600},
                           secret, algorithm="HS256")
        yield client, {"Authorization": token}, data  # the bare token, as in the seed


async def post(client: TestClient, headers: dict, body: dict) -> tuple[int, Any]:
    r = await client.post("/single_inference", json=body, headers=headers)
    return r.status, await r.json()


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


async def test_tb_phantom_saved_to_disk_with_the_seeds_names(
        api: tuple[TestClient, dict, Path]) -> None:
    client, headers, data = api
    src = phantom(data / "incoming" / "chest.dcm", tb=True, patient_id="DICOM-PID")
    out = data / "output"
    status, got = await post(client, headers, {
        "input_image_path": str(src), "save_to_disk": True, "patient_id": "PAT001",
        "output_folder_path": f"{out}/"})
    assert status == 200, got
    assert got["Result"] == "Success" and got["Message"] == "Inference completed successfully."
    folder = out / "PAT001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "PAT001_heatmap.png", "PAT001_predictions.json", "PAT001_report.pdf",
        "PAT001_source_image.png"]
    d = got["Data"]
    assert d["result"] == "TB Presumptive"
    assert "Tuberculosis" in [f["name"] for f in d["findings"]]
    assert all(f["presence"] for f in d["findings"])
    assert d["source_image"] == str(folder / "PAT001_source_image.png")
    assert d["heatmap"] == str(folder / "PAT001_heatmap.png")
    ds = pydicom.dcmread(src)
    assert d["metadata"] == {"model_version": "1.0.0", "patient_id": "PAT001",
                             "patient_name": "John Doe", "sop_instance_uid": ds.SOPInstanceUID,
                             "age": ds.PatientAge, "sex": ds.PatientSex}
    saved = json.loads((folder / "PAT001_predictions.json").read_text())
    assert [f["name"] for f in saved["findings"]] == list(FINDINGS)  # the full output
    assert {k: saved[k] for k in ("result", "source_image", "heatmap", "metadata")} == {
        k: d[k] for k in ("result", "source_image", "heatmap", "metadata")}
    for f in saved["findings"]:
        assert set(f) == {"name", "presence", "confidence"} and 0 <= f["confidence"] <= 1
    with Image.open(folder / "PAT001_source_image.png") as im:
        assert im.size == (ds.Columns, ds.Rows)
    assert (folder / "PAT001_report.pdf").read_bytes()[:5] == b"%PDF-"


async def test_normal_phantom_in_base64_mode(api: tuple[TestClient, dict, Path]) -> None:
    client, headers, data = api
    src = phantom(data / "incoming" / "normal.dcm", tb=False, patient_id="PAT-N")
    status, got = await post(client, headers, {"input_image_path": str(src),
                                               "save_to_disk": False})
    assert status == 200, got
    d = got["Data"]
    assert d["result"] == "Normal" and d["findings"] == [] and d["heatmap"] == ""
    assert png(d["source_image"]).size == (256, 256)
    assert d["metadata"]["patient_id"] == "PAT-N"  # from the DICOM PatientID
    assert not any(p.suffix == ".png" for p in data.rglob("*"))  # nothing written


async def test_tb_phantom_in_base64_mode_has_a_heatmap(api: tuple[TestClient, dict, Path],
                                                       ) -> None:
    client, headers, data = api
    src = phantom(data / "incoming" / "tb.dcm", tb=True, patient_id="PAT-T")
    status, got = await post(client, headers, {"input_image_path": str(src),
                                               "save_to_disk": False})
    assert status == 200, got
    d = got["Data"]
    assert d["result"] == "TB Presumptive"
    heat = png(d["heatmap"])
    assert heat.size == (256, 256) and heat.mode == "RGB"


async def test_normal_phantom_on_disk_has_no_heatmap(api: tuple[TestClient, dict, Path]) -> None:
    client, headers, data = api
    src = phantom(data / "incoming" / "normal.dcm", tb=False, patient_id="PAT-N")
    out = data / "output"
    status, got = await post(client, headers, {"input_image_path": str(src),
                                               "save_to_disk": True,
                                               "output_folder_path": str(out)})
    assert status == 200, got
    assert got["Data"]["heatmap"] == "" and got["Data"]["result"] == "Normal"
    assert sorted(p.name for p in (out / "PAT-N").iterdir()) == [
        "PAT-N_predictions.json", "PAT-N_report.pdf", "PAT-N_source_image.png"]
    saved = json.loads((out / "PAT-N" / "PAT-N_predictions.json").read_text())
    assert saved["heatmap"] == "" and not any(f["presence"] for f in saved["findings"])
