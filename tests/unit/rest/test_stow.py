"""STOW-RS intake (rest/stow.py) and WADO-RS retrieval of what it stored (rest/wado.py).

The node runs in the test's loop with the recording test handler; the HTTP client
side is dicomweb-client (blocking, so in a thread) or aiohttp's MultipartWriter for
bodies dicomweb-client would not send (parts that are not DICOM).
"""

from __future__ import annotations

import asyncio
import io
import os
import resource
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pydicom
import pytest
import requests
import structlog.testing
from aiohttp import BodyPartReader, ClientResponse, MultipartReader, MultipartWriter
from aiohttp.test_utils import TestClient
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.config import ConfigError, load_settings
from dicom_node.dicomweb import BearerAuth, DicomWebClient
from dicom_node.node import Node
from dicom_node.store import Job
from rest.app import create_app
from rest.stow import FailureReason
from tests.support.dicom_factory import SyntheticStudy, make_cr_study, make_ct_study
from tests.support.inproc import node_settings, running_node
from tests.support.peers import free_port

CONFIG: dict[str, Any] = {
    "dimse": {"port": free_port(), "host": "127.0.0.1"},
    "models": [{"name": "m", "path": "."}],
    "pipelines": [{"name": "cxr", "model": "m", "task": "classify"},
                  {"name": "ct", "model": "m", "task": "segment"}],
    "ae_titles": [{"ae_title": "DICOMNODE"},
                  {"ae_title": "AI_STOW", "pipelines": ["cxr", "ct"], "timeout_s": 30}],
    "rest": {"stow_ae_title": "AI_STOW"},
}
DICOM_JSON = "application/dicom+json"
REFERENCED, FAILED, RETRIEVE_URL, REASON = "00081199", "00081198", "00081190", "00081197"
SOP_UID = "00081155"


def tok(secret: bytes, scope: str = "infer read") -> str:
    return jwt.encode({"sub": "modality", "scope": scope, "exp": int(time.time()) + 300},
                      secret, algorithm="HS256")


class Api:
    def __init__(self, client: TestClient, node: Node, secret: bytes) -> None:
        self.client = client
        self.node = node
        self.secret = secret
        self.headers = {"Authorization": f"Bearer {tok(secret)}"}

    @property
    def base(self) -> str:
        return str(self.client.make_url("/dicomweb"))

    def web(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.base, headers=self.headers)

    async def jobs(self, n: int, timeout: float = 20) -> list[Job]:
        assert self.node.store is not None
        deadline = time.monotonic() + timeout
        while True:
            jobs = await asyncio.to_thread(self.node.store.list_jobs)
            if len(jobs) >= n or time.monotonic() > deadline:
                return jobs
            await asyncio.sleep(0.05)


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Api]:
    async with running_node(node_settings(tmp_path / "data", **CONFIG)) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        yield Api(client, node, secret)


@pytest.fixture
def ct(tmp_path: Path) -> SyntheticStudy:
    return make_ct_study(tmp_path / "ct", slices=4, size=32)


def datasets(study: SyntheticStudy) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in study.paths]


def uids(items: list[dict[str, Any]]) -> list[str]:
    return [i[SOP_UID]["Value"][0] for i in items if SOP_UID in i]


def body(parts: list[tuple[bytes, str]]) -> MultipartWriter:
    mp = MultipartWriter("related")
    for data, media in parts:
        mp.append(data, {"Content-Type": media})
    return mp


def headers_for(mp: MultipartWriter, api: Api) -> dict[str, str]:
    return {**api.headers, "Content-Type":
            f'multipart/related; type="application/dicom"; boundary="{mp.boundary}"'}


async def test_dicomweb_client_store_makes_one_job_per_pipeline(api: Api,
                                                                ct: SyntheticStudy) -> None:
    answer = await asyncio.to_thread(api.web().store_instances, datasets(ct))
    stored = [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence]
    assert sorted(stored) == sorted(ct.sop_uids)
    assert not answer.get("FailedSOPSequence")
    assert answer.RetrieveURL == f"{api.base}/studies/{ct.study_uid}"
    assert api.node.store is not None
    for sop in ct.sop_uids:
        rec = api.node.store.get_instance(sop)
        assert rec is not None and rec.source == "stow" and rec.called_ae == "AI_STOW"
        assert Path(rec.path).is_file()
    # the request's end completes the group at once (complete_on_release), not the 30 s
    jobs = await api.jobs(2, timeout=10)
    assert sorted(j.pipeline for j in jobs) == ["ct", "cxr"]
    for j in jobs:
        assert j.kind == "stow" and j.study_instance_uid == ct.study_uid
        assert sorted(j.input["instances"]) == sorted(ct.sop_uids)
        assert j.called_ae == "AI_STOW" and j.calling_ae == "STOW-RS"


async def test_retrieve_urls_serve_what_was_stored(api: Api, ct: SyntheticStudy) -> None:
    answer = await asyncio.to_thread(api.web().store_instances, datasets(ct))
    url = str(answer.ReferencedSOPSequence[0].RetrieveURL)
    assert url.startswith(f"{api.base}/studies/{ct.study_uid}/series/{ct.series_uid}/instances/")
    web = api.web()
    got = await asyncio.to_thread(web.retrieve_study, ct.study_uid)
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(ct.sop_uids)
    original = {str(d.SOPInstanceUID): d for d in datasets(ct)}
    for d in got:  # the same data, pixels included
        assert d.PixelData == original[str(d.SOPInstanceUID)].PixelData
    one = await asyncio.to_thread(web.retrieve_instance, ct.study_uid, ct.series_uid,
                                  ct.sop_uids[1])
    assert str(one.SOPInstanceUID) == ct.sop_uids[1]
    series = await asyncio.to_thread(web.retrieve_series, ct.study_uid, ct.series_uid)
    assert len(series) == len(ct.sop_uids)
    r = await api.client.get(f"/dicomweb/studies/{ct.study_uid}/series/1.2.3",
                             headers=api.headers)
    assert r.status == 404
    r = await api.client.get("/dicomweb/studies/not-a-uid", headers=api.headers)
    assert r.status == 400
    r = await api.client.get(f"/dicomweb/studies/{ct.study_uid}",
                             headers={**api.headers, "Accept": "application/dicom+json"})
    assert r.status == 406


async def test_target_study_mismatch_fails_only_those_instances(
        api: Api, ct: SyntheticStudy, tmp_path: Path) -> None:
    other = make_cr_study(tmp_path / "cr", seed="other")
    web = api.web()
    answer = await asyncio.to_thread(web.store_instances, [*datasets(ct), *datasets(other)],
                                     ct.study_uid)
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence) \
        == sorted(ct.sop_uids)
    [failed] = answer.FailedSOPSequence
    assert str(failed.ReferencedSOPInstanceUID) == other.sop_uids[0]
    assert failed.FailureReason == FailureReason.PROCESSING_FAILURE
    assert api.node.store is not None
    assert api.node.store.get_instance(other.sop_uids[0]) is None  # not kept
    # every instance of another study: nothing stored, 409
    with pytest.raises(requests.HTTPError) as err:
        await asyncio.to_thread(web.store_instances, datasets(other), ct.study_uid)
    assert err.value.response.status_code == 409
    assert uids(err.value.response.json()[FAILED]["Value"]) == other.sop_uids


async def test_parts_that_are_not_dicom(api: Api, ct: SyntheticStudy) -> None:
    good = ct.paths[0].read_bytes()
    mp = body([(good, "application/dicom"), (b"this is not DICOM", "application/dicom"),
               (b'{"00100010": {}}', "application/dicom+json")])
    r = await api.client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
    assert r.status == 202, await r.text()
    assert r.content_type == DICOM_JSON
    answer = await r.json()
    assert uids(answer[REFERENCED]["Value"]) == [ct.sop_uids[0]]
    failed = answer[FAILED]["Value"]
    assert [f[REASON]["Value"][0] for f in failed] == [FailureReason.CANNOT_UNDERSTAND] * 2
    # nothing readable at all: the request is bad
    mp = body([(b"\x00" * 200, "application/dicom")])
    r = await api.client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
    assert r.status == 400
    assert (await r.json())[FAILED]["Value"][0][REASON]["Value"] == [0xC000]


async def test_refused_sop_class_and_truncated_instance(aiohttp_client: Any, tmp_path: Path,
                                                        ct: SyntheticStudy) -> None:
    config = {**CONFIG, "ae_titles": [
        {"ae_title": "DICOMNODE"},
        {"ae_title": "AI_STOW", "pipelines": ["ct"],
         "allowed_sop_classes": ["1.2.840.10008.5.1.4.1.1.2"]}]}
    async with running_node(node_settings(tmp_path / "data", **config)) as node:
        client = await aiohttp_client(create_app(node))
        api = Api(client, node, (tmp_path / "data" / "jwt_secret").read_bytes().strip())
        cr = make_cr_study(tmp_path / "cr")
        truncated = ct.paths[1].read_bytes()[:-100]
        mp = body([(ct.paths[0].read_bytes(), "application/dicom"),
                   (cr.paths[0].read_bytes(), "application/dicom"),
                   (truncated, "application/dicom")])
        r = await client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
        assert r.status == 202
        answer = await r.json()
        assert uids(answer[REFERENCED]["Value"]) == [ct.sop_uids[0]]
        failed = {u: f[REASON]["Value"][0] for f in answer[FAILED]["Value"]
                  for u in uids([f])}
        assert failed == {cr.sop_uids[0]: FailureReason.SOP_CLASS_NOT_SUPPORTED,
                          ct.sop_uids[1]: FailureReason.CANNOT_UNDERSTAND}
        # the codes' reasons in words, one Warning header (PS3.18: code 299) a part
        warnings = r.headers.getall("Warning")
        assert len(warnings) == 2, warnings
        assert all(w.startswith('299 dicom-node "') and w.endswith('"') for w in warnings)
        assert any(cr.sop_uids[0] in w and "AI_STOW" in w for w in warnings), warnings
        assert node.store is not None and node.store.get_instance(ct.sop_uids[1]) is None
        leftovers = [p for p in node.settings.studies_dir.iterdir() if p.suffix == ".part"]
        assert not leftovers


async def test_many_refused_parts_give_a_bounded_answer(api: Api, ct: SyntheticStudy) -> None:
    """20,000 refused parts made 20,000 Warning headers (307 KB: curl gave up before the
    body) and as many log lines; now the first 20 are named and the rest counted."""
    from rest.stow import MAX_PART_WARNINGS

    parts = [(b"not DICOM %d" % i, "application/dicom") for i in range(MAX_PART_WARNINGS + 30)]
    mp = body([(ct.paths[0].read_bytes(), "application/dicom"), *parts])
    r = await api.client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
    assert r.status == 202
    answer = await r.json()
    assert len(answer[FAILED]["Value"]) == MAX_PART_WARNINGS + 30  # every one, in the body
    warnings = r.headers.getall("Warning")
    assert len(warnings) == MAX_PART_WARNINGS + 1
    assert warnings[-1].startswith('299 dicom-node "30 more parts: refused too')


async def test_wrong_media_type_target_auth_and_size(api: Api, ct: SyntheticStudy,
                                                     tmp_path: Path) -> None:
    data = ct.paths[0].read_bytes()
    for content_type in ("application/dicom", "application/json",
                         'multipart/related; type="application/dicom+json"; boundary=x',
                         "multipart/mixed; boundary=x"):
        r = await api.client.post("/dicomweb/studies", data=data,
                                  headers={**api.headers, "Content-Type": content_type})
        assert r.status == 415, content_type
    mp = body([(data, "application/dicom")])
    r = await api.client.post("/dicomweb/studies/1.2.x", data=mp, headers=headers_for(mp, api))
    assert r.status == 400
    mp = body([(data, "application/dicom")])
    r = await api.client.post("/dicomweb/studies", data=mp,
                              headers={**headers_for(mp, api), "Accept": "application/dicom+xml"})
    assert r.status == 406
    r = await api.client.post("/dicomweb/studies", data=b"",
                              headers=headers_for(body([]), api))
    assert r.status == 400
    mp = body([(data, "application/dicom")])
    r = await api.client.post("/dicomweb/studies", data=mp,
                              headers={"Content-Type": headers_for(mp, api)["Content-Type"]})
    assert r.status == 401
    read_only = {"Authorization": f"Bearer {tok(api.secret, scope='read')}"}
    mp = body([(data, "application/dicom")])
    r = await api.client.post("/dicomweb/studies", data=mp,
                              headers={**headers_for(mp, api), **read_only})
    assert r.status == 403


async def test_request_over_the_size_limit(aiohttp_client: Any, tmp_path: Path,
                                           ct: SyntheticStudy) -> None:
    config = {**CONFIG, "rest": {"stow_ae_title": "AI_STOW", "stow_max_mb": 0.001}}
    async with running_node(node_settings(tmp_path / "data", **config)) as node:
        client = await aiohttp_client(create_app(node))
        api = Api(client, node, (tmp_path / "data" / "jwt_secret").read_bytes().strip())
        mp = body([(p.read_bytes(), "application/dicom") for p in ct.paths])
        r = await client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
        assert r.status == 413
        assert "stow_max_mb" in (await r.json())["message"]


def test_stow_ae_title_must_be_configured(tmp_path: Path) -> None:
    cfg = tmp_path / "node.yaml"
    cfg.write_text("rest: {stow_ae_title: NOPE}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.key == "rest.stow_ae_title"


async def test_dicom_bytes_labelled_json_or_xml_are_refused(api: Api,
                                                            ct: SyntheticStudy) -> None:
    # Valid Part 10 bytes: only the part's label says they are not application/dicom.
    mp = body([(ct.paths[0].read_bytes(), "application/dicom"),
               (ct.paths[1].read_bytes(), "application/dicom+json"),
               (ct.paths[2].read_bytes(), "application/dicom+xml")])
    r = await api.client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
    assert r.status == 202, await r.text()
    answer = await r.json()
    assert uids(answer[REFERENCED]["Value"]) == [ct.sop_uids[0]]
    failed = answer[FAILED]["Value"]
    assert [f[REASON]["Value"][0] for f in failed] == [FailureReason.CANNOT_UNDERSTAND] * 2
    warnings = r.headers.getall("Warning")
    assert any("application/dicom+json" in w for w in warnings), warnings
    assert any("application/dicom+xml" in w for w in warnings), warnings
    assert api.node.store is not None
    assert api.node.store.get_instance(ct.sop_uids[1]) is None
    assert api.node.store.get_instance(ct.sop_uids[2]) is None


async def test_a_sequence_with_no_item_is_left_out(api: Api, ct: SyntheticStudy,
                                                   tmp_path: Path) -> None:
    mp = body([(ct.paths[0].read_bytes(), "application/dicom")])
    r = await api.client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
    assert r.status == 200
    answer = await r.json()
    assert FAILED not in answer and uids(answer[REFERENCED]["Value"]) == [ct.sop_uids[0]]
    other = make_cr_study(tmp_path / "cr", seed="other")
    mp = body([(other.paths[0].read_bytes(), "application/dicom")])
    r = await api.client.post(f"/dicomweb/studies/{ct.study_uid}", data=mp,
                              headers=headers_for(mp, api))
    assert r.status == 409
    answer = await r.json()
    assert REFERENCED not in answer and uids(answer[FAILED]["Value"]) == other.sop_uids


async def test_accept_weighted_q0_is_refused(api: Api, ct: SyntheticStudy) -> None:
    data = ct.paths[0].read_bytes()
    for accept, status in (("application/dicom+json;q=0, application/dicom+xml", 406),
                           ("*/*, application/dicom+json; q=0.0", 406),
                           ("application/dicom+json;q=0.5, application/dicom+xml", 200)):
        mp = body([(data, "application/dicom")])
        r = await api.client.post("/dicomweb/studies", data=mp,
                                  headers={**headers_for(mp, api), "Accept": accept})
        assert r.status == status, (accept, await r.text())
    # WADO-RS: the same rule for multipart/related
    url = f"/dicomweb/studies/{ct.study_uid}"
    for accept, status in (('multipart/related; type="application/dicom";q=0, '
                            "application/dicom+json", 406),
                           ('*/*, multipart/related; q=0', 406),
                           ('multipart/related; type="application/dicom"; q=0.9', 200)):
        r = await api.client.get(url, headers={**api.headers, "Accept": accept})
        assert r.status == status, (accept, await r.text())


async def serialized(mp: MultipartWriter) -> bytes:
    out: list[bytes] = []

    class Sink:
        async def write(self, data: bytes) -> None:
            out.append(bytes(data))

    await mp.write(Sink())  # type: ignore[arg-type]
    return b"".join(out)


def short_timeout(timeout_s: float, **rest: Any) -> dict[str, Any]:
    return {**CONFIG, "ae_titles": [
        {"ae_title": "DICOMNODE"},
        {"ae_title": "AI_STOW", "pipelines": ["cxr", "ct"], "timeout_s": timeout_s}],
        "rest": {"stow_ae_title": "AI_STOW", **rest}}


async def test_a_body_cut_short_answers_what_was_stored_and_a_retry_joins_its_group(
        aiohttp_client: Any, tmp_path: Path, ct: SyntheticStudy) -> None:
    async with running_node(node_settings(tmp_path / "data", **short_timeout(3))) as node:
        client = await aiohttp_client(create_app(node))
        api = Api(client, node, (tmp_path / "data" / "jwt_secret").read_bytes().strip())
        mp = body([(p.read_bytes(), "application/dicom") for p in ct.paths])
        whole = await serialized(mp)
        second = whole.index(ct.paths[1].read_bytes())
        cut = whole[:second + 100]  # the first part whole, the second cut short
        r = await client.post("/dicomweb/studies", data=cut, headers=headers_for(mp, api))
        assert r.status == 202, await r.text()
        assert r.content_type == DICOM_JSON
        answer = await r.json()
        assert uids(answer[REFERENCED]["Value"]) == [ct.sop_uids[0]]
        assert FAILED not in answer
        [warning] = r.headers.getall("Warning")
        assert warning.startswith('299 dicom-node "') and "not read" in warning, warning
        assert node.store is not None and node.store.get_instance(ct.sop_uids[1]) is None
        # the request ended like an aborted association: its group stays open for the
        # AE title's timeout, and the client's retry joins it (one job per pipeline,
        # each with the whole study, not a job for the part and then one for the rest)
        mp = body([(p.read_bytes(), "application/dicom") for p in ct.paths])
        r = await client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
        assert r.status == 200, await r.text()
        jobs = await api.jobs(2)
        assert sorted(j.pipeline for j in jobs) == ["ct", "cxr"]
        for j in jobs:
            assert sorted(j.input["instances"]) == sorted(ct.sop_uids)


async def test_a_chunked_body_over_the_limit_answers_what_was_stored(
        aiohttp_client: Any, tmp_path: Path, ct: SyntheticStudy) -> None:
    size = ct.paths[0].stat().st_size
    config = short_timeout(30, stow_max_mb=(size * 1.5) / (1024 * 1024))
    async with running_node(node_settings(tmp_path / "data", **config)) as node:
        client = await aiohttp_client(create_app(node))
        api = Api(client, node, (tmp_path / "data" / "jwt_secret").read_bytes().strip())
        mp = body([(p.read_bytes(), "application/dicom") for p in ct.paths])
        whole = await serialized(mp)

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length
            for i in range(0, len(whole), 1000):
                yield whole[i:i + 1000]

        r = await client.post("/dicomweb/studies", data=chunked(),
                              headers=headers_for(mp, api))
        assert r.status == 413, await r.text()
        answer = await r.json()
        assert uids(answer[REFERENCED]["Value"]) == [ct.sop_uids[0]]
        [warning] = r.headers.getall("Warning")
        assert "stow_max_mb" in warning


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, str, dict[str, str]]]:
    """A node serving HTTP itself, as in production (aiohttp's TestServer cancels a
    handler whose client hangs up; the node's own server lets it finish)."""
    port = free_port()
    config = {**CONFIG, "rest": {**CONFIG["rest"], "enabled": True, "host": "127.0.0.1",
                                 "port": port}}
    async with running_node(node_settings(tmp_path / "data", **config)) as node:
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        yield node, f"127.0.0.1:{port}", {"Authorization": f"Bearer {tok(secret)}"}


@pytest.mark.timeout(60)
async def test_a_client_hanging_up_mid_upload_is_not_an_error(
        tmp_path: Path, ct: SyntheticStudy) -> None:
    mp = body([(p.read_bytes(), "application/dicom") for p in ct.paths])
    whole = await serialized(mp)
    second = whole.index(ct.paths[1].read_bytes())
    with structlog.testing.capture_logs() as logs:
        async with served(tmp_path) as (node, host, auth):
            head = (f"POST /dicomweb/studies HTTP/1.1\r\nHost: {host}\r\n"
                    "Content-Type: multipart/related; type=\"application/dicom\"; "
                    f"boundary=\"{mp.boundary}\"\r\n"
                    f"Authorization: {auth['Authorization']}\r\n"
                    f"Content-Length: {len(whole)}\r\n\r\n").encode()
            ip, port = host.split(":")
            _, writer = await asyncio.open_connection(ip, int(port))
            writer.write(head + whole[:second + 100])
            await writer.drain()
            assert node.store is not None
            while node.store.get_instance(ct.sop_uids[0]) is None:
                await asyncio.sleep(0.05)
            writer.close()  # the client goes away in the middle of the second part
            await writer.wait_closed()
            while not any(e["event"].startswith(("STOW-RS request ended early",
                                                 "request failed")) for e in logs):
                await asyncio.sleep(0.05)
    assert not [e for e in logs if e["event"].startswith("request failed")], logs
    ended = [e for e in logs if e["event"].startswith("STOW-RS request ended early")]
    assert ended[0]["log_level"] == "info" and ended[0]["stored"] == 1, ended


async def dicom_parts(r: ClientResponse) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related answer, read with aiohttp's reader."""
    parts = []
    reader = MultipartReader.from_response(r)
    while (part := await reader.next()) is not None:
        assert isinstance(part, BodyPartReader)
        parts.append((part.headers["Content-Type"], bytes(await part.read())))
    return parts


async def test_retrieve_opens_one_file_at_a_time(api: Api, tmp_path: Path) -> None:
    big = make_ct_study(tmp_path / "big", seed="big", slices=60, size=16)
    answer = await asyncio.to_thread(api.web().store_instances, datasets(big))
    assert len(answer.ReferencedSOPSequence) == 60
    # fewer descriptors left than the study has files (as under `ulimit -n`)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    try:
        r = await api.client.get(f"/dicomweb/studies/{big.study_uid}", headers=api.headers)
        assert r.status == 200, await r.text()
        parts = await dicom_parts(r)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got = {str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) for _, data in parts}
    assert got == set(big.sop_uids)


async def test_missing_files_are_logged_and_said(api: Api, ct: SyntheticStudy) -> None:
    await asyncio.to_thread(api.web().store_instances, datasets(ct))
    assert api.node.store is not None
    rec = api.node.store.get_instance(ct.sop_uids[1])
    assert rec is not None
    Path(rec.path).unlink()  # the store records it; the disk lost it
    with structlog.testing.capture_logs() as logs:
        r = await api.client.get(f"/dicomweb/studies/{ct.study_uid}/series/{ct.series_uid}",
                                 headers=api.headers)
        assert r.status == 200
        assert r.headers["Warning"] == ('299 dicom-node "1 instance of the series is '
                                        'recorded but its file is missing"')
        parts = await dicom_parts(r)
        assert len(parts) == len(ct.sop_uids) - 1
        r = await api.client.get(f"/dicomweb/studies/{ct.study_uid}/series/{ct.series_uid}"
                                 f"/instances/{ct.sop_uids[1]}", headers=api.headers)
        assert r.status == 404
        assert "file is missing on the server" in (await r.json())["message"]
    missing = [e for e in logs if "files are missing" in e["event"]]
    assert len(missing) == 2 and missing[0]["missing"] == 1, missing
    assert missing[0]["study_uid"] == ct.study_uid and missing[0]["series_uid"] == ct.series_uid
    assert missing[0]["log_level"] == "warning"


async def test_retrieve_honours_the_transfer_syntax_asked_for(
        api: Api, ct: SyntheticStudy, tmp_path: Path) -> None:
    original = pydicom.dcmread(ct.paths[0])
    j2k = pydicom.dcmread(ct.paths[0])
    j2k.compress(JPEG2000Lossless, generate_instance_uid=False)  # stored as JPEG 2000
    out = io.BytesIO()
    j2k.save_as(out, enforce_file_format=True)
    mp = body([(out.getvalue(), "application/dicom")])
    r = await api.client.post("/dicomweb/studies", data=mp, headers=headers_for(mp, api))
    assert r.status == 200, await r.text()
    url = (f"/dicomweb/studies/{ct.study_uid}/series/{ct.series_uid}"
           f"/instances/{original.SOPInstanceUID}")
    related = 'multipart/related; type="application/dicom"'
    for accept, expected in (
            (None, ExplicitVRLittleEndian),  # PS3.18's default
            (f"{related}; transfer-syntax={ExplicitVRLittleEndian}", ExplicitVRLittleEndian),
            (f"{related}; transfer-syntax=*", JPEG2000Lossless),
            (f"{related}; transfer-syntax={JPEG2000Lossless}", JPEG2000Lossless),
            (f"{related}; transfer-syntax=1.2.840.10008.1.2.4.50, "
             f"{related}; transfer-syntax=*; q=0.5", JPEG2000Lossless)):
        headers = {**api.headers, **({"Accept": accept} if accept else {})}
        r = await api.client.get(url, headers=headers)
        assert r.status == 200, (accept, await r.text())
        [(content_type, data)] = await dicom_parts(r)
        assert content_type == f"application/dicom; transfer-syntax={expected}", accept
        got = pydicom.dcmread(io.BytesIO(data))
        assert got.file_meta.TransferSyntaxUID == expected, accept
        assert (got.pixel_array == original.pixel_array).all()
    r = await api.client.get(url, headers={
        **api.headers, "Accept": f"{related}; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert r.status == 406
    message = (await r.json())["message"]
    assert JPEG2000Lossless in message and ExplicitVRLittleEndian in message, message
    # the node's own DICOMweb client asks for transfer-syntax=* and gets the file as kept
    with DicomWebClient(api.base, BearerAuth(api.headers["Authorization"][7:])) as web:
        got = await asyncio.to_thread(web.retrieve_series, ct.study_uid, ct.series_uid,
                                      tmp_path / "fetched")
    assert not got.failed and len(got.paths) == 1
    assert got.paths[0].read_bytes() == out.getvalue()


@pytest.mark.timeout(120)
async def test_a_client_hanging_up_mid_download_is_not_an_error(tmp_path: Path) -> None:
    # more than the loopback socket buffers hold, so the server is still sending
    big = make_ct_study(tmp_path / "big", seed="big-dl", slices=48, size=512)
    with structlog.testing.capture_logs() as logs:
        async with served(tmp_path) as (_, host, auth):
            web = DICOMwebClient(url=f"http://{host}/dicomweb", headers=auth)
            await asyncio.to_thread(web.store_instances, datasets(big))
            ip, port = host.split(":")
            reader, writer = await asyncio.open_connection(ip, int(port))
            writer.write(f"GET /dicomweb/studies/{big.study_uid} HTTP/1.1\r\nHost: {host}\r\n"
                         f"Authorization: {auth['Authorization']}\r\n\r\n".encode())
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.readexactly(1 << 20)  # the download is under way
            writer.transport.abort()  # the client goes away, its buffers unread
            while not any(e["event"] in ("WADO-RS: client went away", "request failed")
                          for e in logs):
                await asyncio.sleep(0.05)
    assert not [e for e in logs if e["event"].startswith("request failed")], logs
    gone = [e for e in logs if e["event"] == "WADO-RS: client went away"]
    assert gone[0]["log_level"] == "info" and gone[0]["study_uid"] == big.study_uid


async def test_the_free_space_reserve_is_checked_for_each_part(aiohttp_client: Any,
                                                               tmp_path: Path) -> None:
    """One request that began above storage.min_free_mb wrote the disk full: it was
    checked only when the request came. A part that arrives under the reserve is now
    refused with 0xA700 (the parts before it stay stored)."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 40) as disk:
        config = {**CONFIG, "storage": {"min_free_mb": 10}}
        async with running_node(node_settings(disk / "data", **config)) as node:
            client = await aiohttp_client(create_app(node))
            secret = (disk / "data" / "jwt_secret").read_bytes().strip()
            study = make_ct_study(tmp_path / "ct", slices=2, size=32)
            first, second = (p.read_bytes() for p in study.paths)
            boundary = "probe-boundary"
            head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            fillers: list[Path] = []

            async def chunks() -> AsyncIterator[bytes]:
                yield head + first + b"\r\n" + head  # the first part, whole
                # aiohttp's part reader reads past a part's end before it ends it: the
                # second part comes a little at a time until the first is stored
                assert node.store is not None
                at = 0
                while node.store.get_instance(study.sop_uids[0]) is None and at < 1024:
                    yield second[at:at + 16]
                    at += 16
                    await asyncio.sleep(0.02)
                fillers.append(await asyncio.to_thread(fill, disk, 6 << 20))
                yield second[at:] + f"\r\n--{boundary}--\r\n".encode()

            r = await client.post("/dicomweb/studies", data=chunks(), headers={
                "Authorization": f"Bearer {tok(secret)}", "Accept": DICOM_JSON,
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary="{boundary}"'})
            answer = await r.json()
            assert fillers
            assert uids(answer[REFERENCED]["Value"]) == [study.sop_uids[0]]
            (failed,) = answer[FAILED]["Value"]
            assert failed[REASON]["Value"] == [int(FailureReason.OUT_OF_RESOURCES)]
            assert node.store is not None and node.store.get_instance(study.sop_uids[1]) is None


async def test_parts_all_refused_for_space_are_409_not_400(aiohttp_client: Any,
                                                           tmp_path: Path) -> None:
    """Every part refused under the reserve read as "nothing in the body is DICOM" (400:
    a client does not send a malformed request again)."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 40) as disk:
        config = {**CONFIG, "storage": {"min_free_mb": 10}}
        async with running_node(node_settings(disk / "data", **config)) as node:
            client = await aiohttp_client(create_app(node))
            secret = (disk / "data" / "jwt_secret").read_bytes().strip()
            (only,) = make_ct_study(tmp_path / "ct", slices=1, size=32).paths
            data = only.read_bytes()
            boundary = "probe-boundary"
            head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()

            async def chunks() -> AsyncIterator[bytes]:
                yield head + data[:-64]  # the request began above the reserve
                await asyncio.to_thread(fill, disk, 6 << 20)
                yield data[-64:] + f"\r\n--{boundary}--\r\n".encode()

            r = await client.post("/dicomweb/studies", data=chunks(), headers={
                "Authorization": f"Bearer {tok(secret)}", "Accept": DICOM_JSON,
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary="{boundary}"'})
            assert r.status == 409
            (failed,) = (await r.json())[FAILED]["Value"]
            assert failed[REASON]["Value"] == [int(FailureReason.OUT_OF_RESOURCES)]
