"""Seed 003's image endpoints: /classify_image, /embed_image, /infer, /embed_text."""

from __future__ import annotations

import base64
import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.serving import (
    CT,
    CXR,
    CXR_LABELS,
    LiveNode,
    live_node,
    phantom_dicom,
    phantom_png,
    png_bytes,
    sample,
    serving_settings,
)

PNG = phantom_png(1)
B64 = base64.b64encode(PNG).decode()
DATA_URI = "data:image/png;base64," + B64
EMBED_DIM = 224  # the demo DenseNet's features, the input of its last linear layer


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/img.png" or (self.path == "/private.png"
                                       and self.headers.get("X-Token") == "s3cret"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(403 if self.path == "/private.png" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, image_server: str) -> Iterator[LiveNode]:
    data = tmp_path_factory.mktemp("images") / "data"
    # the radiograph model's pipeline takes radiographs only: a CT slice is not for it
    cxr = {"name": "cxr", "model": "cxr-findings", "task": "classify",
           "series": {"modalities": ["CR", "DX"]}}
    settings = serving_settings(data, models=[CXR, CT], pipelines=[cxr],
                                image_url_hosts=[image_server], max_body_mb=1)
    with live_node(settings) as ln:
        yield ln


async def post(live: LiveNode, path: str, body: Any, *, raw: bool = False,
               auth: dict[str, str] | None = None) -> tuple[int, Any]:
    headers = live.auth() if auth is None else auth
    kwargs: dict[str, Any] = {"data": body} if raw else {"json": body}
    async with aiohttp.ClientSession() as s, s.post(live.base_url + path, headers=headers,
                                                    **kwargs) as r:
        text = await r.text()
        return r.status, json.loads(text)


async def predictions(live: LiveNode, png: bytes) -> dict[str, float]:
    async with aiohttp.ClientSession(headers=live.auth()) as s, s.post(
            f"{live.base_url}/predictions/cxr-findings", data=png) as r:
        return {f["class"]: f["probability"] for f in await r.json()}


# -- /classify_image -----------------------------------------------------------------------


@pytest.mark.parametrize("image", [B64, DATA_URI, [B64], "\n".join([B64[:60], B64[60:]])])
async def test_classify_one_image(live: LiveNode, image: Any) -> None:
    status, body = await post(live, "/classify_image", {"name": "cxr-findings", "image": image})
    assert status == 200, body
    assert set(body) == {"probabilities", "labels", "processingTimeMs"}
    assert body["labels"] == CXR_LABELS and len(body["probabilities"]) == 1
    assert isinstance(body["processingTimeMs"], int)  # seed 003: "processingTimeMs": 15
    expected = await predictions(live, PNG)
    got = dict(zip(body["labels"], body["probabilities"][0], strict=True))
    assert got == pytest.approx(expected, abs=1e-4)


async def test_classify_a_list_keeps_the_order(live: LiveNode) -> None:
    pngs = [phantom_png(i) for i in (2, 3, 4)]
    status, body = await post(live, "/classify_image", {
        "name": "cxr-findings", "image": [base64.b64encode(p).decode() for p in pngs]})
    assert status == 200 and len(body["probabilities"]) == 3
    for png, probs in zip(pngs, body["probabilities"], strict=True):
        expected = await predictions(live, png)
        assert dict(zip(CXR_LABELS, probs, strict=True)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("scheme", ["http", "HTTP"])  # URL schemes are case-insensitive
async def test_classify_from_an_allowed_url(live: LiveNode, image_server: str,
                                            scheme: str) -> None:
    status, body = await post(live, "/classify_image", {
        "name": "cxr-findings", "image": [f"{scheme}://{image_server}/img.png", B64]})
    assert status == 200, body
    assert body["probabilities"][0] == pytest.approx(body["probabilities"][1], abs=1e-4)


async def test_download_headers_are_sent(live: LiveNode, image_server: str) -> None:
    url = f"http://{image_server}/private.png"
    status, _ = await post(live, "/classify_image", {
        "name": "cxr-findings", "image": url, "image_download_headers": {"X-Token": "s3cret"}})
    assert status == 200
    status, _ = await post(live, "/classify_image", {
        "name": "cxr-findings", "image": url, "imageDownloadHeaders": {"X-Token": "s3cret"}})
    assert status == 200
    status, body = await post(live, "/classify_image", {"name": "cxr-findings", "image": url})
    assert status == 400 and "HTTP 403" in body["message"]


@pytest.mark.parametrize("path, message", [
    ("/redirect", "redirects are not followed"),
    ("/missing.png", "HTTP 404"),
])
async def test_url_problems_are_400(live: LiveNode, image_server: str, path: str,
                                    message: str) -> None:
    status, body = await post(live, "/classify_image", {
        "name": "cxr-findings", "image": f"http://{image_server}{path}"})
    assert status == 400 and message in body["message"]


@pytest.mark.parametrize("url", ["http://example.com/x.png", "http://127.0.0.1:1/x.png",
                                 "https://localhost/x.png", "http://[::1]/x.png"])
async def test_urls_outside_the_allowed_hosts_are_refused(live: LiveNode, url: str) -> None:
    status, body = await post(live, "/classify_image", {"name": "cxr-findings", "image": url})
    assert status == 400
    assert "not allowed" in body["message"] and "rest.image_url_hosts" in body["message"]


# -- /embed_image ----------------------------------------------------------------------------


async def test_embeddings_are_normalised_by_default(live: LiveNode) -> None:
    status, body = await post(live, "/embed_image", {"name": "cxr-findings", "image": [B64, B64]})
    assert status == 200, body
    assert set(body) == {"embeddings", "processingTimeMs"}
    assert isinstance(body["processingTimeMs"], int)
    a, b = body["embeddings"]
    assert len(a) == EMBED_DIM and a == pytest.approx(b)
    assert math.fsum(v * v for v in a) == pytest.approx(1.0)


async def test_embeddings_raw_and_cut_to_n_dims(live: LiveNode) -> None:
    _, raw = await post(live, "/embed_image", {"name": "cxr-findings", "image": B64,
                                               "normalize": False})
    full = raw["embeddings"][0]
    assert math.fsum(v * v for v in full) != pytest.approx(1.0)
    _, cut = await post(live, "/embed_image", {"name": "cxr-findings", "image": B64,
                                               "normalize": False, "nDims": 16})
    assert cut["embeddings"][0] == pytest.approx(full[:16])
    _, unit = await post(live, "/embed_image", {"name": "cxr-findings", "image": B64,
                                                "nDims": 16, "normalize": True})
    norm = math.sqrt(math.fsum(v * v for v in full[:16]))
    assert unit["embeddings"][0] == pytest.approx([v / norm for v in full[:16]])


@pytest.mark.parametrize("path, key", [("/embed_image", "embeddings"),
                                       ("/infer", "imageEmbeddings"),
                                       ("/embed", "imageEmbeddings")])
async def test_n_dims_spelt_as_the_seed_or_as_ingrain_sends_it(live: LiveNode, path: str,
                                                             key: str) -> None:
    """The seed's bodies say nDims; ingrain (the client of its Python examples) sends its
    field names: n_dims, image_download_headers, and text: null on /embed."""
    camel = await post(live, path, {"name": "cxr-findings", "image": B64, "nDims": 8})
    snake = await post(live, path, {"name": "cxr-findings", "image": B64, "n_dims": 8,
                                    "normalize": True, "image_download_headers": None,
                                    **({"text": None} if path != "/embed_image" else {})})
    assert camel[0] == snake[0] == 200, (camel, snake)
    assert len(snake[1][key][0]) == 8
    assert snake[1][key][0] == pytest.approx(camel[1][key][0])
    status, got = await post(live, path, {"name": "cxr-findings", "image": B64, "n_dims": 0})
    assert status == 422 and got["details"][0]["field"] == "n_dims"


async def test_n_dims_given_both_ways_is_422(live: LiveNode) -> None:
    status, got = await post(live, "/embed_image", {"name": "cxr-findings", "image": B64,
                                                    "nDims": 8, "n_dims": 8})
    assert status == 422
    assert got["details"] == [{"field": "n_dims",
                               "message": "the same field as 'nDims': send one of them"}]


async def test_n_dims_larger_than_the_embedding_is_422(live: LiveNode) -> None:
    status, body = await post(live, "/embed_image", {"name": "cxr-findings", "image": B64,
                                                     "nDims": 100_000})
    assert status == 422 and body["details"][0]["field"] == "nDims"


# -- /infer and text -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/infer", "/embed"])  # the seed's heading, its example
async def test_infer_gives_embeddings_and_probabilities(live: LiveNode, path: str) -> None:
    status, body = await post(live, path, {"name": "cxr-findings", "image": B64,
                                           "text": None, "nDims": 8})
    assert status == 200, body
    assert len(body["imageEmbeddings"]) == 1 and len(body["imageEmbeddings"][0]) == 8
    assert len(body["probabilities"][0]) == len(CXR_LABELS)
    assert isinstance(body["processingTimeMs"], int)
    # the seed's answer has both halves: the one not asked for (text) is null, not missing
    assert list(body)[:2] == ["textEmbeddings", "imageEmbeddings"]
    assert body["textEmbeddings"] is None


@pytest.mark.parametrize("path, body", [
    ("/embed_text", {"name": "cxr-findings", "text": "sample text"}),
    ("/embed_text", {"name": "anything", "text": ["a", "b"], "normalize": True, "nDims": None}),
    ("/infer", {"name": "cxr-findings", "text": "sample text", "image": B64}),
    ("/embed", {"name": "cxr-findings", "text": "sample text", "image": B64}),
    ("/embed_text", {"name": "x", "text": "a", "n_dims": None}),  # as ingrain sends it
])
async def test_text_is_400_no_text_encoder(live: LiveNode, path: str, body: Any) -> None:
    status, got = await post(live, path, body)
    assert status == 400 and "no loaded model has a text encoder" in got["message"]


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/classify_image", "/embed_image", "/infer", "/embed_text"])
@pytest.mark.parametrize("raw", [b"{name: oops", b"\xff\xfe{}",
                                 b'{"nDims": ' + b"9" * 5000 + b"}",  # int too long to parse
                                 b"[" * 100_000 + b"]" * 100_000])   # nesting past recursion
async def test_not_json_is_400(live: LiveNode, path: str, raw: bytes) -> None:
    status, body = await post(live, path, raw, raw=True)
    assert status == 400 and body == {"error": "bad_request",
                                      "message": "the body is not valid JSON"}


@pytest.mark.parametrize("body, field", [
    ([1, 2], "(body)"),
    ({"image": B64}, "name"),
    ({"name": "cxr-findings"}, "image"),
    ({"name": "cxr-findings", "image": 5}, "image"),
    ({"name": "cxr-findings", "image": []}, "image"),
    ({"name": "cxr-findings", "image": [B64, 7]}, "image.1"),
    ({"name": 3, "image": B64}, "name"),
    ({"name": "cxr-findings", "image": B64, "normalize": "yes"}, "normalize"),
    ({"name": "cxr-findings", "image": B64, "nDims": "3"}, "nDims"),
    ({"name": "cxr-findings", "image": B64, "nDims": 0}, "nDims"),
    ({"name": "cxr-findings", "image": B64, "surprise": 1}, "surprise"),
    ({"name": "cxr-findings", "image": ["x"] * 65}, "image"),
])
async def test_wrong_types_are_422_by_field(live: LiveNode, body: Any, field: str) -> None:
    status, got = await post(live, "/embed_image", body)
    assert status == 422, got
    assert field in [d["field"] for d in got["details"]]


@pytest.mark.parametrize("image, details", [
    (5, [{"field": "image", "message": "Input should be a string or a list of strings"}]),
    (None, [{"field": "image", "message": "Input should be a string or a list of strings"}]),
    ([], [{"field": "image",
           "message": "List should have at least 1 item after validation, not 0"}]),
    ([B64, 7], [{"field": "image.1", "message": "Input should be a valid string"}]),
    ("", [{"field": "image", "message": "String should have at least 1 character"}]),
    (["x"] * 65, [{"field": "image",
                   "message": "List should have at most 64 items after validation, not 65"}]),
])
async def test_details_name_the_field_as_sent(live: LiveNode, image: Any,
                                              details: list[dict[str, str]]) -> None:
    """One detail for the field, in the client's words: not one per branch of the
    string-or-list type, nor pydantic's names for them ("image.constrained-str")."""
    status, got = await post(live, "/classify_image", {"name": "cxr-findings", "image": image})
    assert status == 422 and got["details"] == details


async def test_a_misspelt_field_is_answered_with_the_one_meant(live: LiveNode) -> None:
    status, got = await post(live, "/embed_image", {"name": "cxr-findings", "image": B64,
                                                    "ndims": 8})
    assert status == 422, got
    assert {"field": "ndims", "message": "unknown field (did you mean 'nDims'?)"} \
        in got["details"]


@pytest.mark.parametrize("image, message", [
    ("not base64 at all!", "not an http(s) URL, a data URI or valid base64"),
    ("data:image/png,rawdata", "must be base64-encoded"),
    (base64.b64encode(b"hello world").decode(), "neither DICOM, PNG nor JPEG"),
    ([B64, base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(30)).decode()],
     "image[1]: cannot decode the PNG"),
])
@pytest.mark.parametrize("path", ["/classify_image", "/embed_image"])
async def test_not_an_image_is_400(live: LiveNode, path: str, image: Any, message: str) -> None:
    status, body = await post(live, path, {"name": "cxr-findings", "image": image})
    assert status == 400 and message in body["message"]


@pytest.mark.parametrize("path", ["/classify_image", "/embed_image", "/infer"])
async def test_unknown_model_is_404(live: LiveNode, path: str) -> None:
    status, body = await post(live, path, {"name": "nope", "image": B64})
    assert status == 404 and "unknown model 'nope'" in body["message"]
    assert body["error"] == "not_found"


async def test_segmentation_model_is_400(live: LiveNode) -> None:
    status, body = await post(live, "/classify_image", {"name": "ct-organs", "image": B64})
    assert status == 400 and "segments" in body["message"]


async def test_body_over_the_limit_is_413(live: LiveNode) -> None:
    big = {"name": "cxr-findings", "image": "A" * 1_200_000}  # rest.max_body_mb is 1
    status, body = await post(live, "/classify_image", big)
    assert status == 413 and body["error"] == "payload_too_large"


@pytest.mark.parametrize("kind, status", [("none", 401), ("expired", 401), ("other-key", 401),
                                          ("read-only", 403)])
async def test_credentials(live: LiveNode, kind: str, status: int) -> None:
    auth = {"none": {}, "expired": live.auth(expires_in=-5),
            "other-key": live.auth(secret=b"x" * 40), "read-only": live.auth(scope="read")}[kind]
    got, body = await post(live, "/classify_image", {"name": "cxr-findings", "image": B64},
                           auth=auth)
    assert got == status and body["error"] in ("unauthorized", "forbidden")


@pytest.fixture(scope="module")
def open_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    """A node that gives requests without credentials the infer scope."""
    data = tmp_path_factory.mktemp("images-open") / "data"
    settings = serving_settings(data, models=[CXR])
    settings = settings.model_copy(update={"auth": settings.auth.model_copy(
        update={"anonymous_scopes": ["infer"]})})
    with live_node(settings) as ln:
        yield ln


@pytest.mark.parametrize("path", ["/classify_image", "/embed_image", "/infer", "/embed"])
async def test_anonymous_infer_serves_requests_without_credentials(open_live: LiveNode,
                                                                   path: str) -> None:
    status, body = await post(open_live, path, {"name": "cxr-findings", "image": B64},
                              auth={})
    assert status == 200, body
    # credentials that are sent are checked all the same
    status, body = await post(open_live, path, {"name": "cxr-findings", "image": B64},
                              auth=open_live.auth(secret=b"x" * 40))
    assert status == 401 and body["error"] == "unauthorized"


async def test_anonymous_infer_opens_neither_metrics_nor_the_studies(
        open_live: LiveNode) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/metrics", "/v1/projects", "/api/inference/status/1"):
            async with s.get(open_live.base_url + path) as r:
                assert r.status == 401, path  # read was not given; studies never are
        async with s.post(open_live.base_url + "/predictions/cxr-findings", data=PNG) as r:
            assert r.status == 200  # seed 004's serving route admits it too
        async with s.post(open_live.base_url + "/dicomweb/studies", data=b"") as r:
            assert r.status == 401


# -- the model's input rules, the same on every endpoint ----------------------------------


CT_SLICE = sample("ct/abdomen/IM0001.dcm").read_bytes()
ONE_PIXEL = png_bytes(np.zeros((1, 1)))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("path", ["/classify_image", "/embed_image", "/infer"])
async def test_every_endpoint_refuses_what_the_model_does_not_take(
        live: LiveNode, path: str, tmp_path: Path) -> None:
    """The radiograph model's pipeline takes CR and DX: a CT slice is refused by each
    endpoint with the pipeline's reason, a CR radiograph taken by each."""
    radiograph = phantom_dicom(5, tmp_path)
    status, body = await post(live, path, {"name": "cxr-findings", "image": b64(radiograph)})
    assert status == 200, body
    status, body = await post(live, path, {"name": "cxr-findings",
                                           "image": [b64(radiograph), b64(CT_SLICE)]})
    assert status == 400, body
    assert body["message"].startswith("image[1]: cxr-findings does not take this image")
    assert "modality CT not in ['CR', 'DX']" in body["message"]


# -- the model's statistics ----------------------------------------------------------------


async def cxr_stats(live: LiveNode) -> tuple[dict[str, Any], dict[str, Any]]:
    """cxr-findings' seed-003 modelStats entry, and the Prometheus families read after."""
    headers = live.auth()
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(live.base_url + "/metrics",
                         headers={"Accept": "application/json"}) as r:
            entry = next(e for e in (await r.json())["modelStats"]
                         if e["name"] == "cxr-findings")
        async with s.get(live.base_url + "/metrics", headers={"Accept": "text/plain"}) as r:
            prom = {f.name: f for f in text_string_to_metric_families(await r.text())}
    return entry, prom


def n(entry: dict[str, Any], key: str, field: str = "count") -> int:
    """A count of the entry (``inferenceCount`` or an inferenceStats key): null is 0."""
    value = entry[key] if key in ("inferenceCount", "executionCount") \
        else entry["inferenceStats"][key][field]
    return int(value or 0)


def batch1(entry: dict[str, Any]) -> int:
    sizes = {b["batchSize"]: b for b in entry["batchStats"] or []}
    return int(sizes["1"]["computeInfer"]["count"]) if "1" in sizes else 0


def prom_value(fams: dict[str, Any], name: str, **labels: str) -> float:
    for s in fams[name].samples:
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


def assert_prometheus_is_the_json(entry: dict[str, Any], fams: dict[str, Any]) -> None:
    mv = {"model": "cxr-findings", "version": entry["version"]}
    for outcome in ("success", "fail"):
        assert prom_value(fams, "dicom_node_inference_requests", **mv,
                          outcome=outcome) == n(entry, outcome)
    assert prom_value(fams, "dicom_node_inference_count", **mv) == n(entry, "inferenceCount")
    assert prom_value(fams, "dicom_node_inference_executions", **mv) == \
        n(entry, "executionCount")
    assert prom_value(fams, "dicom_node_inference_batch_executions", **mv,
                      batch_size="1") == batch1(entry)


async def test_embeddings_count_in_metrics_as_any_inference(live: LiveNode) -> None:
    """Each embedding is one inference of the model, of batch size 1 (it runs alone)."""
    before, _ = await cxr_stats(live)
    status, body = await post(live, "/embed_image", {"name": "cxr-findings", "image": [B64, B64]})
    assert status == 200, body
    after, fams = await cxr_stats(live)
    for key in ("inferenceCount", "executionCount", "success", "queue", "compute_input",
                "compute_infer", "compute_output"):
        assert n(after, key) == n(before, key) + 2, key
    assert batch1(after) == batch1(before) + 2
    assert n(after, "compute_infer", "ns") > n(before, "compute_infer", "ns")
    assert n(after, "fail") == n(before, "fail")
    assert after["lastInference"] is not None
    assert_prometheus_is_the_json(after, fams)
    # /infer: an embedding and a classification of the image, two inferences
    status, body = await post(live, "/infer", {"name": "cxr-findings", "image": B64})
    assert status == 200, body
    again, fams = await cxr_stats(live)
    assert n(again, "success") == n(after, "success") + 2
    assert n(again, "inferenceCount") == n(after, "inferenceCount") + 2
    assert_prometheus_is_the_json(again, fams)


@pytest.mark.parametrize("image", [CT_SLICE, ONE_PIXEL], ids=["ct-slice", "1x1-png"])
@pytest.mark.parametrize("path", ["/classify_image", "/embed_image", "/infer",
                                  "/predictions/cxr-findings"])
async def test_a_refused_image_counts_once_as_a_failure_of_the_model(
        live: LiveNode, path: str, image: bytes) -> None:
    """The client saw the request for the model fail: so does /metrics, on every
    endpoint alike (once for /infer, though it would have run the model twice)."""
    before, _ = await cxr_stats(live)
    if path.startswith("/predictions"):
        status, body = await post(live, path, image, raw=True)
    else:
        status, body = await post(live, path, {"name": "cxr-findings", "image": b64(image)})
    assert status == 400, body
    after, fams = await cxr_stats(live)
    assert n(after, "fail") == n(before, "fail") + 1
    assert n(after, "fail", "ns") > n(before, "fail", "ns")
    assert n(after, "success") == n(before, "success")
    assert n(after, "inferenceCount") == n(before, "inferenceCount")
    assert_prometheus_is_the_json(after, fams)
