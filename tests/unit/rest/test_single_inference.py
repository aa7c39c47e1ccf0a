"""POST /single_inference: seed 001's validation table, path roots, body limit, token shapes.

A tiny random classifier stands in for the demo model here (the real cxr-findings
model runs in tests/integration/rest/test_single_inference.py).
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pydicom
import pytest
from aiohttp.test_utils import TestClient

from dicom_node.config import PROJECT_ROOT, Settings
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from rest.app import create_app
from rest.single_inference import allowed_roots, resolve_inside
from tests.support.dicom_factory import make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port
from tests.unit.pipeline.test_bundle import make_tiny_bundle

FAILURE = "Failure"


@dataclass
class Api:
    client: TestClient
    token: str
    secret: bytes
    data: Path  # the data directory: an allowed root
    outside: Path  # a folder outside every allowed root
    dcm: Path  # a readable CR inside the root, PatientID "PAT7"

    async def post(self, body: Any, token: str | None = None, raw: bytes | None = None,
                   ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": self.token if token is None else token}
        if raw is not None:
            r = await self.client.post("/single_inference", data=raw,
                                       headers={**headers, "Content-Type": "application/json"})
        else:
            r = await self.client.post("/single_inference", json=body, headers=headers)
        return r.status, await r.json()


def _token(secret: bytes, **claims: Any) -> str:
    base = {"sub": "ris", "scope": "infer read", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(base, secret, algorithm="HS256")


def _api_settings(tmp_path: Path, threshold: float, **rest: Any) -> Any:
    bundle = make_tiny_bundle(tmp_path / "bundles" / "tiny")
    return node_settings(
        tmp_path / "data",
        dimse={"host": "127.0.0.1", "port": free_port()},
        models=[{"name": "tiny", "path": str(bundle), "max_delay_ms": 0, "warmup": False}],
        pipelines=[{"name": "cxr", "model": "tiny", "task": "classify", "threshold": threshold,
                    "series": {"modalities": ["CR", "DX"], "view_positions": ["PA", "AP"]}}],
        watch=[{"name": "inbox", "path": "inbox"}],  # as the node's defaults have
        rest=rest,
    )


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Api]:
    settings = _api_settings(tmp_path, threshold=0.01)  # every finding present: Abnormal
    async with running_node(settings) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        outside = tmp_path / "outside"
        outside.mkdir()
        dcm = write_dicom(make_cxr_phantom(7, size=64), tmp_path / "data" / "in" / "cr.dcm",
                          patient_id="PAT7", modality="CR")
        yield Api(client, _token(secret), secret, tmp_path / "data", outside, dcm)


def body(api: Api, **changes: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"input_image_path": str(api.dcm), "save_to_disk": False}
    b.update(changes)
    return {k: v for k, v in b.items() if v is not ...}


def failure(message: str) -> dict[str, Any]:
    return {"Result": FAILURE, "Data": None, "Message": message}


# -- the seed's validation table, row by row ------------------------------------------


async def test_missing_required_fields(api: Api) -> None:
    assert await api.post(body(api, input_image_path=...)) == (
        400, failure("input_image_path is required in the request"))
    assert await api.post(body(api, save_to_disk=...)) == (
        400, failure("save_to_disk is required in the request"))
    assert await api.post({}) == (400, failure("input_image_path is required in the request"))


@pytest.mark.parametrize("path", [
    "relative/cr.dcm",
    "{data}/in/\ud800.dcm",
    "C:/data/patient001.dcm",
    "/etc/hostname",
    "",
    "{data}/in/../../outside/x.dcm",
    "{data}/in/../../../../../../etc/passwd",
])
async def test_invalid_input_path(api: Api, path: str) -> None:
    raw = path.format(data=api.data)
    status, got = await api.post(body(api, input_image_path=raw))
    assert status == 400 and got["Data"] is None
    assert got["Message"].startswith(f"Invalid path input_image_path: {raw}"), got


async def test_path_too_long_for_the_filesystem(api: Api) -> None:
    long = f"{api.data}/{'a' * 5000}/x.dcm"
    status, got = await api.post(body(api, input_image_path=long))
    assert status == 400 and got["Message"].startswith(f"Invalid path input_image_path: {long}")


async def test_input_path_of_wrong_type(api: Api) -> None:
    status, got = await api.post(body(api, input_image_path=42))
    assert status == 400 and got["Message"].startswith("Invalid path input_image_path: 42")


async def test_symlink_out_of_the_roots_is_an_invalid_path(api: Api) -> None:
    target = write_dicom(make_cxr_phantom(8, size=64), api.outside / "secret.dcm",
                         patient_id="X", modality="CR")
    link = api.data / "in" / "link.dcm"
    link.symlink_to(target)
    status, got = await api.post(body(api, input_image_path=str(link)))
    assert status == 400
    assert got["Message"].startswith(f"Invalid path input_image_path: {link}")
    # a linked folder: the same
    (api.data / "elsewhere").symlink_to(api.outside, target_is_directory=True)
    status, got = await api.post(body(api, input_image_path=str(api.data / "elsewhere" /
                                                                 "secret.dcm")))
    assert status == 400 and got["Message"].startswith("Invalid path input_image_path:")


async def test_file_does_not_exist(api: Api) -> None:
    missing = str(api.data / "in" / "nope.dcm")
    assert await api.post(body(api, input_image_path=missing)) == (
        400, failure(f"Input image path does not exist: {missing}"))


async def test_file_is_not_dcm(api: Api) -> None:
    txt = api.data / "in" / "notes.txt"
    txt.write_text("hello")
    assert await api.post(body(api, input_image_path=str(txt))) == (
        400, failure(f"Requested image is not a DICOM file: {txt}"))
    folder = api.data / "in" / "folder.dcm"
    folder.mkdir()
    assert await api.post(body(api, input_image_path=str(folder))) == (
        400, failure(f"Requested image is not a DICOM file: {folder}"))


@pytest.mark.parametrize("content", [b"not dicom at all" * 10, b"", b"\x00" * 132])
async def test_unreadable_dicom(api: Api, content: bytes) -> None:
    bad = api.data / "in" / "bad.dcm"
    bad.write_bytes(content)
    assert await api.post(body(api, input_image_path=str(bad))) == (
        400, failure(f"Invalid DICOM image, unable to fetch patient ID: {bad}"))


@pytest.mark.parametrize("pid", ["../evil", "..", "a/b", "a\\b", "/abs", "a\nb", "a\x00b",
                                 "tab\there", "", "  ", 12, ["PAT"], "\ud800", "a\u202eb"])
async def test_invalid_patient_id(api: Api, pid: Any) -> None:
    for save in (False, True):
        out = str(api.data / "out")
        got = await api.post(body(api, patient_id=pid, save_to_disk=save,
                                  output_folder_path=out))
        assert got == (400, failure(f"Invalid patient_id: '{pid}' in request body")), got
    assert not (api.data / "out").exists() and not (api.data / "evil").exists()


async def test_empty_patient_id_in_dicom(api: Api) -> None:
    anon = write_dicom(make_cxr_phantom(9, size=64), api.data / "in" / "anon.dcm",
                       modality="CR")
    ds = pydicom.dcmread(anon)
    ds.PatientID = ""
    ds.save_as(anon)
    status, got = await api.post(body(api, input_image_path=str(anon)))
    assert status == 400 and got["Data"] is None
    assert got["Message"].startswith("Patient ID is empty or None")
    del ds.PatientID
    ds.save_as(anon)
    status, got = await api.post(body(api, input_image_path=str(anon)))
    assert status == 400 and got["Message"].startswith("Patient ID is empty or None")
    # a patient_id in the request fills the gap
    status, got = await api.post(body(api, input_image_path=str(anon), patient_id="GIVEN"))
    assert status == 200 and got["Data"]["metadata"]["patient_id"] == "GIVEN"


@pytest.mark.parametrize("pid", ["../escaped", "a/b", "..", "a\x01b"])
async def test_dicom_patient_id_that_cannot_name_a_folder(api: Api, pid: str) -> None:
    """With no patient_id in the request the file's PatientID names the folder: one that
    would leave it is refused (nothing written), and the request's patient_id fixes it."""
    src = write_dicom(make_cxr_phantom(11, size=64), api.data / "in" / "odd.dcm",
                      modality="CR")
    ds = pydicom.dcmread(src)
    ds.PatientID = pid
    ds.save_as(src)
    out = api.data / "odd-out"
    status, got = await api.post(body(api, input_image_path=str(src), save_to_disk=True,
                                      output_folder_path=str(out)))
    assert status == 400 and got["Data"] is None
    assert got["Message"] == (f"Invalid patient_id: '{pid}' in the DICOM PatientID; give a "
                              "patient_id in the request body")
    assert not (api.data / "escaped").exists() and not any(out.rglob("*.*"))
    status, got = await api.post(body(api, input_image_path=str(src), save_to_disk=True,
                                      output_folder_path=str(out), patient_id="FIXED"))
    assert status == 200 and (out / "FIXED" / "FIXED_predictions.json").is_file()


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, [], {"a": 1}])
async def test_save_to_disk_not_boolean(api: Api, value: Any) -> None:
    assert await api.post(body(api, save_to_disk=value)) == (
        400, failure(f"Invalid value for save_to_disk, should be a boolean: {value}"))


@pytest.mark.parametrize("out", [..., None, ""])
async def test_output_folder_path_missing(api: Api, out: Any) -> None:
    assert await api.post(body(api, save_to_disk=True, output_folder_path=out)) == (
        400, failure("output_folder_path is required in the request when save_to_disk is True"))


async def test_output_folder_outside_roots(api: Api) -> None:
    for out in (str(api.outside), f"{api.data}/../outside", "relative/out", 7):
        status, got = await api.post(body(api, save_to_disk=True, output_folder_path=out))
        assert status == 400
        assert got["Message"].startswith(f"Invalid path output_folder_path: {out}"), got
    link = api.data / "out-link"
    link.symlink_to(api.outside, target_is_directory=True)
    status, got = await api.post(body(api, save_to_disk=True, output_folder_path=str(link)))
    assert status == 400 and got["Message"].startswith("Invalid path output_folder_path:")
    # the patient's folder itself a link out of the output folder
    out = api.data / "out"
    out.mkdir()
    (out / "PAT7").symlink_to(api.outside, target_is_directory=True)
    status, got = await api.post(body(api, save_to_disk=True, output_folder_path=str(out)))
    assert status == 400 and got["Message"].startswith("Invalid path output_folder_path:")
    assert list(api.outside.iterdir()) == []


async def test_output_folder_inside_the_nodes_own_folders(api: Api) -> None:
    """Inside the allowed roots but where the node keeps studies, job results or drop
    folders: another job's results would be replaced, a drop folder fed."""
    job = api.data / "results" / "0123456789abcdef"
    job.mkdir(parents=True)
    cases = [(str(job), "PAT7", "storage.results_dir"),
             (str(api.data / "studies"), "PAT7", "storage.studies_dir"),
             (str(api.data), "inbox", "watch.0.path")]
    for out, pid, holder in cases:
        status, got = await api.post(body(api, save_to_disk=True, output_folder_path=out,
                                          patient_id=pid))
        assert status == 400, got
        assert got["Message"] == (f"Invalid path output_folder_path: {out} (the results "
                                  f"would go inside the node's own folder {holder}; name a "
                                  "folder of your own)")
    assert list(job.iterdir()) == []
    assert not (api.data / "studies" / "PAT7").exists()
    assert not list((api.data / "inbox").iterdir())


async def test_output_folder_cannot_be_created(api: Api) -> None:
    blocker = api.data / "blocker"
    blocker.write_text("a file where a folder should be")
    got = await api.post(body(api, save_to_disk=True, output_folder_path=str(blocker)))
    assert got[0] == 500 and got[1]["Data"] is None and got[1]["Result"] == FAILURE
    assert got[1]["Message"].startswith(f"Unable to create output folder: {blocker}/PAT7")
    if os.geteuid() != 0:  # root ignores permissions
        ro = api.data / "readonly"
        ro.mkdir(mode=0o500)
        got = await api.post(body(api, save_to_disk=True, output_folder_path=str(ro)))
        assert got[0] == 500
        assert got[1]["Message"].startswith(f"Unable to create output folder: {ro}/PAT7")


async def test_wrong_modality_is_400(api: Api) -> None:
    ct = make_ct_study(api.data / "ct", slices=1)
    status, got = await api.post(body(api, input_image_path=str(ct.paths[0])))
    assert status == 400 and got["Message"].startswith("Requested image cannot be analysed")


async def test_a_view_the_pipeline_skips_is_400(api: Api) -> None:
    """A lateral view for a PA/AP pipeline: the same file sent by C-STORE is skipped."""
    import pydicom

    ds = pydicom.dcmread(api.dcm)
    ds.ViewPosition = "LL"
    lateral = api.data / "in" / "lateral.dcm"
    ds.save_as(lateral)
    status, got = await api.post(body(api, input_image_path=str(lateral)))
    assert status == 400, got
    assert got["Message"].startswith("Requested image cannot be analysed by cxr: ")
    assert "LL" in got["Message"]


# -- bodies and tokens ----------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', b"\xff\xfe", b"",
                                 b'{"save_to_disk": ' + b"9" * 5000 + b"}",
                                 b"[" * 100_000 + b"]" * 100_000])
async def test_body_that_is_not_a_json_object(api: Api, raw: bytes) -> None:
    status, got = await api.post(None, raw=raw)
    assert status == 400 and got["Result"] == FAILURE and got["Data"] is None


@pytest.mark.parametrize("size", [32 * 1024 * 1024 + 1024,  # just over the default limit
                                  50_000_000])  # "a 50 MB body", as the issue says
async def test_body_over_the_configured_limit_is_413(api: Api, size: int) -> None:
    big = b'{"input_image_path": "' + b"a" * size + b'", "save_to_disk": false}'
    status, got = await api.post(None, raw=big)
    assert status == 413 and got["Result"] == FAILURE and got["Data"] is None


@pytest.mark.parametrize(("header", "message"), [
    (None, "Token missing"),
    ("", "Token missing"),
    ("Bearer ", "Token missing"),
    ("garbage", "Invalid token"),
    ("Bearer a.b.c", "Invalid token"),
    ("Api-Key nope", "Invalid token"),
    ("expired", "Token expired"),
    ("other-key", "Invalid token"),
    ("no-exp", "Invalid token"),
    ("alg-none", "Invalid token"),
])
async def test_bad_tokens(api: Api, header: str | None, message: str) -> None:
    if header == "expired":
        header = _token(api.secret, exp=int(time.time()) - 10)
    elif header == "other-key":
        header = _token(b"another-secret-that-is-long-enough-0123456789")
    elif header == "no-exp":
        header = jwt.encode({"sub": "ris"}, api.secret, algorithm="HS256")
    elif header == "alg-none":
        header = jwt.encode({"sub": "ris", "exp": int(time.time()) + 60}, None,
                            algorithm="none")
    headers = {} if header is None else {"Authorization": header}
    r = await api.client.post("/single_inference", json=body(api), headers=headers)
    assert r.status == 401 and await r.json() == failure(message)


async def test_token_without_infer_scope_is_403(api: Api) -> None:
    status, got = await api.post(body(api), token=_token(api.secret, scope="read"))
    assert status == 403 and got["Result"] == FAILURE and got["Data"] is None


# -- success with the tiny model --------------------------------------------------------


async def test_base64_mode(api: Api) -> None:
    status, got = await api.post(body(api, patient_id="PAT001"))
    assert status == 200, got
    assert got["Result"] == "Success" and got["Message"] == "Inference completed successfully."
    data = got["Data"]
    assert list(data) == ["result", "findings", "source_image", "heatmap", "metadata"]
    assert data["result"] == "Abnormal"  # threshold 0.01: every finding present
    assert [f["name"] for f in data["findings"]] == ["a", "b", "c"]
    for key in ("source_image", "heatmap"):
        assert base64.b64decode(data[key])[:8] == b"\x89PNG\r\n\x1a\n"
    meta = data["metadata"]
    assert list(meta) == ["model_version", "patient_id", "patient_name", "sop_instance_uid",
                          "age", "sex"]
    assert (meta["model_version"], meta["patient_id"], meta["patient_name"]) == (
        "0.1.0", "PAT001", "CXR000007 Phantom")  # Phantom^CXR000007
    assert meta["sop_instance_uid"] == str(pydicom.dcmread(api.dcm).SOPInstanceUID)
    assert not (api.data / "PAT001").exists()


async def test_save_to_disk_mode(api: Api) -> None:
    out = api.data / "out"
    status, got = await api.post(body(api, save_to_disk=True, output_folder_path=f"{out}/"))
    assert status == 200, got
    folder = out / "PAT7"
    assert sorted(p.name for p in folder.iterdir()) == [
        "PAT7_heatmap.png", "PAT7_predictions.json", "PAT7_report.pdf", "PAT7_source_image.png"]
    data = got["Data"]
    assert data["source_image"] == str(folder / "PAT7_source_image.png")
    assert data["heatmap"] == str(folder / "PAT7_heatmap.png")
    saved = json.loads((folder / "PAT7_predictions.json").read_text())
    assert saved["source_image"] == data["source_image"] and saved["heatmap"] == data["heatmap"]
    assert len(saved["findings"]) == 3  # the file keeps every finding
    assert saved["metadata"] == data["metadata"] and data["metadata"]["patient_id"] == "PAT7"


async def test_normal_result_has_empty_heatmap(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = _api_settings(tmp_path, threshold=0.99)  # nothing reaches it: Normal
    async with running_node(settings) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        dcm = write_dicom(make_cxr_phantom(7, size=64), tmp_path / "data" / "cr.dcm",
                          patient_id="N1", modality="CR")
        headers = {"Authorization": _token(secret)}
        out = tmp_path / "data" / "out"
        for save in (False, True):
            r = await client.post("/single_inference", headers=headers, json={
                "input_image_path": str(dcm), "save_to_disk": save,
                "output_folder_path": str(out)})
            data = (await r.json())["Data"]
            assert r.status == 200 and data["result"] == "Normal"
            assert data["heatmap"] == "" and data["findings"] == []
        assert sorted(p.name for p in (out / "N1").iterdir()) == [
            "N1_predictions.json", "N1_report.pdf", "N1_source_image.png"]
        assert json.loads((out / "N1" / "N1_predictions.json").read_text())["heatmap"] == ""


async def test_no_classify_pipeline_is_503(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "data", dimse={"host": "127.0.0.1", "port": free_port()})
    async with running_node(settings) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        dcm = write_dicom(make_cxr_phantom(7, size=64), tmp_path / "data" / "cr.dcm",
                          modality="CR")
        r = await client.post("/single_inference", headers={"Authorization": _token(secret)},
                              json={"input_image_path": str(dcm), "save_to_disk": False})
        got = await r.json()
        assert r.status == 503 and got["Result"] == FAILURE and got["Data"] is None


def test_default_roots_are_the_data_dir_and_samples(tmp_path: Path) -> None:
    s = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")}})
    assert allowed_roots(s) == [(tmp_path / "data").resolve(),
                                (PROJECT_ROOT / "samples").resolve()]
    custom = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                      "rest": {"allowed_roots": [str(tmp_path / "scans"),
                                                                 "exchange"]}})
    roots = allowed_roots(custom)
    assert roots == [(tmp_path / "scans").resolve(), (tmp_path / "data" / "exchange").resolve()]
    assert resolve_inside(str(tmp_path / "scans" / "a.dcm"), roots) is not None
    assert resolve_inside(str(tmp_path / "data" / "a.dcm"), roots) is None
    assert resolve_inside(str(tmp_path / "scans" / ".." / "a.dcm"), roots) is None
    assert resolve_inside(str(tmp_path / "scans-evil" / "a.dcm"), roots) is None  # not a prefix
