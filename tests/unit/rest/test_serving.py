"""Seed 004 over HTTP against a live node with the demo models: /ping, /predictions, /models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.decode import decode_image
from tests.support.serving import (
    CT,
    CXR,
    CXR_LABELS,
    LiveNode,
    jpeg_bytes,
    live_node,
    phantom,
    phantom_dicom,
    phantom_png,
    png_bytes,
    serving_settings,
)

# A wide batching window makes concurrent requests share forward passes for certain.
SERVED = {**CXR, "max_delay_ms": 50}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    data = tmp_path_factory.mktemp("serving") / "data"
    with live_node(serving_settings(data, models=[SERVED, CT], max_body_mb=1)) as ln:
        yield ln


async def call(live: LiveNode, method: str, path: str, *, auth: dict[str, str] | None = None,
               **kwargs: Any) -> tuple[int, Any]:
    headers = {**(live.auth() if auth is None else auth), **kwargs.pop("headers", {})}
    async with aiohttp.ClientSession() as s, s.request(
            method, live.base_url + path, headers=headers, **kwargs) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except json.JSONDecodeError:
            return r.status, text


def assert_findings(body: Any) -> None:
    assert isinstance(body, list) and len(body) == len(CXR_LABELS)
    assert sorted(f["class"] for f in body) == sorted(CXR_LABELS)
    probs = [f["probability"] for f in body]
    assert probs == sorted(probs, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probs)


async def assert_same_as_pipeline(live: LiveNode, data: bytes, body: Any) -> None:
    """The answer is the pipeline's own prediction for the decoded image, class by class."""
    pred = await asyncio.to_thread(live.node.runner.predict, decode_image(data).pixels,
                                   "cxr-findings")
    got = {f["class"]: f["probability"] for f in body}
    assert got == pytest.approx(dict(zip(pred.labels, pred.probabilities, strict=True)),
                                abs=1e-4)


# -- /ping -------------------------------------------------------------------------------


async def test_ping_is_open(live: LiveNode) -> None:
    assert await call(live, "GET", "/ping", auth={}) == (200, {"health": "healthy!"})
    # TorchServe answers a POST too (some load balancers' health checks send one)
    assert await call(live, "POST", "/ping", auth={}) == (200, {"health": "healthy!"})


async def test_a_method_the_route_lacks_is_torchserves_405_with_allow(
        live: LiveNode) -> None:
    """Unmatched methods and paths of seed 004's API answer in its error shape (they
    were the node's generic one), and a 405 names the methods allowed, as HTTP asks."""
    async with aiohttp.ClientSession() as s, s.get(
            live.base_url + "/predictions/cxr-findings", headers=live.auth()) as r:
        assert r.status == 405
        assert set(r.headers["Allow"].split(",")) >= {"POST", "PUT"}
        assert (await r.json())["type"] == "MethodNotAllowedException"
    status, body = await call(live, "GET", "/predictions")
    assert status == 404 and body["type"] == "ModelNotFoundException"


# -- /predictions --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_raw_png_gives_the_findings_top_class_first(live: LiveNode, seed: int) -> None:
    data = phantom_png(seed)
    status, body = await call(live, "POST", "/predictions/cxr-findings", data=data,
                              headers={"Content-Type": "image/png"})
    assert status == 200, body
    assert_findings(body)
    await assert_same_as_pipeline(live, data, body)
    # the demo model reads its phantoms: the top class is one of the drawn findings
    drawn = {n for n, y in zip(CXR_LABELS, phantom(seed).labels, strict=True) if y}
    assert not drawn or body[0]["class"] in drawn


async def test_put_like_curl_upload_file(live: LiveNode) -> None:
    status, body = await call(live, "PUT", "/predictions/cxr-findings", data=phantom_png(1))
    assert status == 200
    assert_findings(body)


async def test_multipart_data_part(live: LiveNode) -> None:
    form = aiohttp.FormData()
    form.add_field("data", phantom_png(2), filename="kitten.png", content_type="image/png")
    status, body = await call(live, "POST", "/predictions/cxr-findings", data=form)
    assert status == 200
    await assert_same_as_pipeline(live, phantom_png(2), body)


async def test_multipart_takes_the_file_when_no_part_is_named_data(live: LiveNode) -> None:
    form = aiohttp.FormData()
    form.add_field("comment", "hello")
    form.add_field("upload", phantom_png(3), filename="x.png", content_type="image/png")
    status, body = await call(live, "POST", "/predictions/cxr-findings", data=form)
    assert status == 200
    await assert_same_as_pipeline(live, phantom_png(3), body)


async def test_same_answer_for_png_jpeg_dicom(live: LiveNode, tmp_path: Path) -> None:
    img = phantom(4).image
    answers = []
    for data in (png_bytes(img), jpeg_bytes(img), phantom_dicom(4, tmp_path)):
        status, body = await call(live, "POST", "/predictions/cxr-findings/1.0.0", data=data)
        assert status == 200, body
        answers.append({f["class"]: f["probability"] for f in body})
    for other in answers[1:]:
        for label in CXR_LABELS:
            assert other[label] == pytest.approx(answers[0][label], abs=0.05)


async def test_concurrent_requests_share_batches(live: LiveNode) -> None:
    bodies = [phantom_png(10 + i) for i in range(8)]
    _, before = await call(live, "GET", "/models/cxr-findings")
    results = await asyncio.gather(*(
        call(live, "POST", "/predictions/cxr-findings", data=b) for b in bodies))
    assert all(status == 200 for status, _ in results)
    _, after = await call(live, "GET", "/models/cxr-findings")
    requests = after[0]["inferenceCount"] - before[0]["inferenceCount"]
    batches = after[0]["executionCount"] - before[0]["executionCount"]
    assert requests == 8 and batches < 8
    for data, (_, body) in zip(bodies, results, strict=True):  # each got its own answer
        await assert_same_as_pipeline(live, data, body)


@pytest.mark.parametrize("path, message, kind", [
    ("/predictions/no-such-model", "unknown model 'no-such-model'", "ModelNotFoundException"),
    ("/predictions/no-such-model/1.0", "unknown model 'no-such-model'",
     "ModelNotFoundException"),
    ("/predictions/cxr-findings/9.9", "no version '9.9'", "ModelVersionNotFoundException"),
])
async def test_unknown_model_or_version_is_404(live: LiveNode, path: str, message: str,
                                               kind: str) -> None:
    status, body = await call(live, "POST", path, data=phantom_png(1))
    assert status == 404
    assert body["code"] == 404 and body["type"] == kind  # TorchServe's names
    assert message in body["message"]


async def test_two_images_in_one_request_are_refused(live: LiveNode) -> None:
    """The answer is one prediction: a second image was dropped without a word."""
    form = aiohttp.FormData()
    form.add_field("data", phantom_png(1), filename="a.png", content_type="image/png")
    form.add_field("data", phantom_png(2), filename="b.png", content_type="image/png")
    status, body = await call(live, "POST", "/predictions/cxr-findings", data=form)
    assert status == 400 and body["type"] == "BadRequestException"
    assert "the request has 2 images; send one image per request" in body["message"]


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "neither DICOM, PNG nor JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "cannot decode the PNG"),
    (b"", "the request has no image"),
])
async def test_not_an_image_is_400(live: LiveNode, data: bytes, message: str) -> None:
    status, body = await call(live, "POST", "/predictions/cxr-findings", data=data)
    assert status == 400
    assert body["type"] == "BadRequestException" and message in body["message"]


async def test_broken_multipart_is_400(live: LiveNode) -> None:
    status, body = await call(
        live, "POST", "/predictions/cxr-findings", data=b"--xx\r\nbroken\r\n\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=xx"})
    assert status == 400 and body["code"] == 400


async def test_segmentation_model_is_400(live: LiveNode) -> None:
    status, body = await call(live, "POST", "/predictions/ct-organs", data=phantom_png(1))
    assert status == 400 and "segments" in body["message"]


@pytest.mark.parametrize("multipart", [False, True])
async def test_body_over_the_limit_is_413(live: LiveNode, multipart: bool) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(1_200_000)  # rest.max_body_mb is 1 here
    data: Any = big
    if multipart:
        data = aiohttp.FormData()
        data.add_field("data", big, filename="big.png", content_type="image/png")
    status, body = await call(live, "POST", "/predictions/cxr-findings", data=data)
    assert status == 413 and body["type"] == "RequestEntityTooLargeException"


@pytest.mark.parametrize("auth, status, message", [
    ({}, 401, "Token missing"),
    ("expired", 401, "Token expired"),
    ("other-key", 401, "Signature verification failed"),
    ("read-only", 403, "infer"),
])
async def test_credentials(live: LiveNode, auth: Any, status: int, message: str) -> None:
    if auth == "expired":
        auth = live.auth(expires_in=-60)
    elif auth == "other-key":
        auth = live.auth(secret=b"another-secret-of-32-bytes-length!!")
    elif auth == "read-only":
        auth = live.auth(scope="read")
    got, body = await call(live, "POST", "/predictions/cxr-findings", auth=auth,
                           data=phantom_png(1))
    assert got == status and body["code"] == status and message in body["message"]


# -- /models -------------------------------------------------------------------------------


async def test_models_lists_every_model(live: LiveNode) -> None:
    status, body = await call(live, "GET", "/models")
    assert status == 200
    names = {m["modelName"]: m for m in body["models"]}
    assert set(names) == {"cxr-findings", "ct-organs"}
    assert names["cxr-findings"] == {"modelName": "cxr-findings", "status": "ready",
                                     "versions": ["1.0.0"], "defaultVersion": "1.0.0"}


@pytest.mark.parametrize("path", ["/models/cxr-findings", "/models/cxr-findings/all",
                                  "/models/cxr-findings/1.0.0"])
async def test_model_description(live: LiveNode, path: str) -> None:
    status, body = await call(live, "GET", path)
    assert status == 200 and len(body) == 1
    d = body[0]
    assert d["modelName"] == "cxr-findings" and d["modelVersion"] == "1.0.0"
    assert d["default"] is True and d["status"] == "ready" and d["task"] == "classify"
    assert d["labels"] == CXR_LABELS and d["inputSize"] == [128, 128]
    assert d["device"] == "cpu" and d["batchSize"] == 8 and d["maxBatchDelay"] == 50.0
    assert d["workers"] >= 1
    assert isinstance(d["inferenceCount"], int)


async def test_segmentation_model_description_has_batch_1(live: LiveNode) -> None:
    status, body = await call(live, "GET", "/models/ct-organs")
    assert status == 200 and body[0]["task"] == "segment" and body[0]["batchSize"] == 1


@pytest.mark.parametrize("path", ["/models/nope", "/models/cxr-findings/2.0"])
async def test_unknown_model_description_is_404(live: LiveNode, path: str) -> None:
    status, body = await call(live, "GET", path)
    assert status == 404 and body["type"] == "ModelNotFoundException"


async def test_models_need_credentials(live: LiveNode) -> None:
    status, body = await call(live, "GET", "/models", auth={})
    assert status == 401 and body["code"] == 401


# -- a model that failed to load -------------------------------------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    root = tmp_path_factory.mktemp("broken")
    bundle = root / "broken-model"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{not json", encoding="utf-8")
    models = [{"name": "broken", "path": str(bundle), "device": "cpu"}]
    with live_node(serving_settings(root / "data", models=models)) as ln:
        yield ln


async def test_ping_says_which_model_failed(broken: LiveNode) -> None:
    status, body = await call(broken, "GET", "/ping", auth={})
    assert status == 503 and body["health"] == "unhealthy!"
    assert "'broken' failed to load" in body["reason"] and "corrupt JSON" in body["reason"]
    assert "broken-model/" not in body["reason"]  # an open route: no server paths


async def test_predictions_on_a_failed_model_is_503(broken: LiveNode) -> None:
    status, body = await call(broken, "POST", "/predictions/broken", data=phantom_png(1))
    assert status == 503 and body["type"] == "ServiceUnavailableException"
    assert "failed to load" in body["message"]
    assert "broken-model/" not in body["message"]  # may be open (auth.anonymous_scopes)


async def test_failed_model_is_listed_with_its_error(broken: LiveNode) -> None:
    status, body = await call(broken, "GET", "/models")
    assert status == 200
    assert body["models"][0]["modelName"] == "broken"
    assert body["models"][0]["status"] == "failed" and "corrupt JSON" in body["models"][0]["error"]
    assert "broken-model/" not in body["models"][0]["error"]  # /health (admin) has the path
    status, body = await call(broken, "GET", "/models/broken")
    assert status == 200 and body[0]["status"] == "failed"
    assert "broken-model/" not in body[0]["error"]


def test_dicom_images_its_pipelines_would_skip_are_refused(tmp_path: Path) -> None:
    """A CT slice or a lateral view posted to a PA/AP radiograph model: refused with the
    pipeline's reason (sent by C-STORE, the same file is skipped), not classified."""
    import pydicom

    from pipeline.train.phantoms_ct import make_ct_phantom, write_dicom_series
    from tests.support.inproc import node_settings
    from tests.support.peers import free_port
    from tests.support.serving import live_node

    settings = node_settings(
        tmp_path / "data", models=[CXR],
        pipelines=[{"name": "cxr", "model": "cxr-findings", "task": "classify",
                    "series": {"modalities": ["CR", "DX"], "view_positions": ["PA", "AP"]}}],
        rest={"enabled": True, "host": "127.0.0.1", "port": free_port()},
        storage={"data_dir": str(tmp_path / "data"), "min_free_mb": 0})
    frontal = phantom_dicom(4, tmp_path)
    ds = pydicom.dcmread(tmp_path / "cxr-4.dcm")
    ds.ViewPosition = "LL"
    ds.save_as(tmp_path / "lateral.dcm")
    ct = write_dicom_series(make_ct_phantom(1, shape=(2, 32, 32)), tmp_path / "ct")[0]

    async def check(live: LiveNode) -> None:
        status, body = await call(live, "POST", "/predictions/cxr-findings", data=frontal)
        assert status == 200, body
        status, body = await call(live, "POST", "/predictions/cxr-findings",
                                  data=(tmp_path / "lateral.dcm").read_bytes())
        assert status == 400 and "cxr-findings does not take this image" in body["message"]
        assert "LL" in body["message"], body
        status, body = await call(live, "POST", "/predictions/cxr-findings",
                                  data=ct.read_bytes())
        assert status == 400 and "modality CT not in ['CR', 'DX']" in body["message"], body
        status, body = await call(live, "POST", "/predictions/cxr-findings",
                                  data=png_bytes(phantom(4).image))
        assert status == 200, body  # a PNG says nothing of its modality

    with live_node(settings) as live:
        asyncio.run(check(live))
