"""TorchServe-style model serving (seed 004): ``/ping``, ``/predictions``, ``/models``.

- ``GET /ping`` (open): ``{"health": "healthy!"}``; 503 with the reason while the
  models load or when one failed to load.
- ``POST|PUT /predictions/{model}[/{version}]``: one DICOM, PNG or JPEG image as
  the raw body (``curl -T file`` sends PUT) or as a multipart part (``curl -F
  data=@file``) -> ``[{"class": ..., "probability": ...}, ...]``, top class first.
- ``GET /models``, ``GET /models/{name}[/{version}]`` (``all`` as version works as
  in TorchServe): the loaded models, their versions, default, device and batching.

Predictions go through the inference engine's dynamic batching, so concurrent
requests for a model share forward passes. Decoding and preprocessing run in a
worker thread; the event loop only moves bytes and awaits the batch. Errors
have TorchServe's shape: ``{"code": 404, "type": "ModelNotFoundException",
"message": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from pipeline.decode import DecodedImage, decode_image
from pipeline.io import InputError, series_misfit
from pipeline.runner import PipelineError, PipelineRunner, Prediction
from rest.app import NODE, Route
from rest.errors import ApiError, ErrorStyle, without_paths

if TYPE_CHECKING:
    import torch

    from pipeline.bundle import LoadedModel
    from pipeline.settings import SeriesRules

# Multipart parts TorchServe hands its handlers as the request's input.
_INPUT_PARTS = ("data", "body", "file", "image")


def runner_of(request: web.Request) -> PipelineRunner:
    """The node's model runner; 503 while the models are still loading."""
    runner = request.app[NODE].runner
    if runner is None:
        raise ApiError(503, "the models are still loading; retry shortly")
    return runner


def classifier(runner: PipelineRunner, name: str, version: str | None = None) -> LoadedModel:
    """The classifier ``name`` (at ``version``): 404 unknown, 503 failed, 400 not a classifier."""
    if name in runner.failed:
        # no server paths: these routes may be open (auth.anonymous_scopes); /health
        # with the admin scope and the log have them
        raise ApiError(503, f"model {name!r} failed to load: {without_paths(runner.failed[name])}")
    try:
        return runner.classifier(name, version)
    except KeyError as exc:
        message = str(exc.args[0]) if exc.args else f"unknown model {name!r}"
        # TorchServe names an unknown version of a known model apart
        kind = ("ModelVersionNotFoundException"
                if version is not None and name in runner.registry.names() else None)
        raise ApiError(404, message, kind=kind) from None
    except PipelineError as exc:
        raise ApiError(400, f"{exc}; this route serves image classifiers") from None


def admit_image(runner: PipelineRunner, model: LoadedModel, data: bytes) -> DecodedImage:
    """Decode one image sent for ``model`` and check that the model takes it: a DICOM
    image that no pipeline of the model would take (a CT slice, a lateral view for a
    PA/AP model) is refused with the reason, as the same file sent by C-STORE is
    skipped. Every endpoint that hands a model images checks them here, so that the
    model takes the same images on each.

    An image refused here counts as a failed request of the model in its statistics
    (``fail`` in /metrics), as the client saw it fail; what fails before an image's
    bytes are read (bad base64, a refused download) does not, like a request that
    never reached the model. Blocking: runs in a worker thread.

    Raises:
        InputError: not an image the pipeline can read, or one the model does not take.
    """
    t0 = time.perf_counter_ns()
    try:
        image = decode_image(data)
        rules = _rules_of(runner, model)
        if image.header is not None and rules:
            misfits = [series_misfit([image.header], r) for r in rules]
            if all(misfits):
                raise InputError(f"{model.name} does not take this image: {misfits[0]}")
        if small := model.size_refusal(*image.pixels.shape[-2:]):
            raise InputError(f"{model.name} does not take this image: {small}")
    except InputError:
        with contextlib.suppress(KeyError):  # loaded, yet not served: nothing to count in
            runner.engine.get(model.name, model.version).record_failure(
                time.perf_counter_ns() - t0)
        raise
    return image


def _rules_of(runner: PipelineRunner, model: LoadedModel) -> list[SeriesRules]:
    """The series rules of the pipelines that run ``model`` (none: it takes any image)."""
    return [spec.series for spec in runner.pipelines.values() if spec.model == model.name]


def _prepare(runner: PipelineRunner, model: LoadedModel, data: bytes) -> torch.Tensor:
    """Admit and preprocess one image (blocking: runs in a worker thread)."""
    image = admit_image(runner, model, data)
    return model.preprocess(image.pixels, pixel_aspect=image.pixel_aspect)


_PREP_LOCK = threading.Lock()
_PREP: ThreadPoolExecutor | None = None


def _single_threaded_torch() -> None:
    import torch

    # One image's resize is too small to split; with torch's intra-op pool every one of
    # these threads would fan out over all the cores and fight the engine's workers.
    torch.set_num_threads(1)


def prep_executor() -> ThreadPoolExecutor:
    """The threads that decode and preprocess request images (one per CPU, torch on
    one thread each), created on first use."""
    global _PREP
    with _PREP_LOCK:
        if _PREP is None:
            _PREP = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                       thread_name_prefix="image-prep",
                                       initializer=_single_threaded_torch)
        return _PREP


async def classify_bytes(runner: PipelineRunner, model: LoadedModel, data: bytes) -> Prediction:
    """Classify one encoded image through the batching engine without blocking the loop.

    Raises ApiError 400 when the bytes are not an image the model takes (:func:`admit_image`).
    """
    loop = asyncio.get_running_loop()
    try:
        tensor = await loop.run_in_executor(prep_executor(), _prepare, runner, model, data)
    except InputError as exc:
        raise ApiError(400, exc.message) from None
    return await runner.predict_async(model, tensor)


async def admit_async(runner: PipelineRunner, model: LoadedModel, data: bytes) -> DecodedImage:
    """:func:`admit_image` in the image threads; ApiError 400 with the reason."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(prep_executor(), admit_image, runner, model, data)
    except InputError as exc:
        raise ApiError(400, exc.message) from None


async def classify_admitted(runner: PipelineRunner, model: LoadedModel,
                            image: DecodedImage) -> Prediction:
    """Classify one image :func:`admit_image` gave, as :func:`classify_bytes` does."""
    loop = asyncio.get_running_loop()
    try:
        tensor = await loop.run_in_executor(
            prep_executor(), functools.partial(model.preprocess, image.pixels,
                                               pixel_aspect=image.pixel_aspect))
    except InputError as exc:
        raise ApiError(400, exc.message) from None
    return await runner.predict_async(model, tensor)


def findings(pred: Prediction) -> list[dict[str, Any]]:
    """``[{"class", "probability"}]`` sorted by probability, top class first."""
    pairs = sorted(zip(pred.labels, pred.probabilities, strict=False), key=lambda p: -p[1])
    return [{"class": label, "probability": p} for label, p in pairs]


async def _read_limited(part: BodyPartReader, budget: int) -> bytes:
    """A multipart part's bytes; 413 beyond ``budget`` (the reader does not enforce a limit)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(256 * 1024):
        size += len(chunk)
        if size > budget:
            raise web.HTTPRequestEntityTooLarge(max_size=budget, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def body_limit(request: web.Request) -> int:
    """The configured largest request body, in bytes (``rest.max_body_mb``)."""
    return int(request.app[NODE].settings.rest.max_body_mb * 1024 * 1024)


async def request_image(request: web.Request) -> bytes:
    """The image of a request: the raw body, or one part of a multipart form.

    Of a multipart body, the part named ``data`` (or ``body``, ``file``, ``image``)
    is used, else the part with a file name, else the first part. Raises ApiError 400
    without an image or with more than one (one prediction answers one image),
    HTTPRequestEntityTooLarge beyond the limit.
    """
    if not request.content_type.startswith("multipart/"):
        data = await request.read()  # aiohttp enforces client_max_size here
    else:
        budget = body_limit(request)
        named = first_file = first = None
        images = 0  # parts that carry an image: named as one, or a file
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue  # a nested multipart is not an image
                content = await _read_limited(part, budget)
                budget -= len(content)
                if part.name in _INPUT_PARTS or part.filename:
                    images += 1
                if part.name in _INPUT_PARTS and named is None:
                    named = content
                if first is None:
                    first = content
                if first_file is None and part.filename:
                    first_file = content
        except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
            # a malformed body (bad boundary, part headers, encoding)
            raise ApiError(400, f"the multipart body cannot be read ({exc}); send the image "
                           "as the part 'data' (curl -F data=@file)") from None
        if images > 1:
            raise ApiError(400, f"the request has {images} images; send one image per "
                           "request (concurrent requests are batched by the server)")
        data = next((d for d in (named, first_file, first) if d is not None), b"")
    if not data:
        raise ApiError(400, "the request has no image: send a DICOM, PNG or JPEG image as the "
                       "body (curl -T file) or as the multipart part 'data' (curl -F data=@file)")
    return data


# -- handlers ------------------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    node = request.app[NODE]
    runner = node.runner
    problem = None
    if runner is None:
        state = node.parts.get("models", "starting")
        problem = "the models are still loading" if state in ("starting", "running") \
            else f"the model runner is {state}"
    elif runner.failed:
        # an open route: the reason, not where the server keeps its models
        problem = "; ".join(f"model {n!r} failed to load: {without_paths(e)}"
                            for n, e in runner.failed.items())
    else:
        dead = [f"{m.name}:{m.version}" for m in runner.engine.models() if not m.alive]
        if dead:
            problem = f"the inference threads of {', '.join(dead)} stopped"
    if problem is not None:
        return web.json_response({"health": "unhealthy!", "reason": problem}, status=503)
    return web.json_response({"health": "healthy!"})


async def predictions(request: web.Request) -> web.Response:
    runner = runner_of(request)
    model = classifier(runner, request.match_info["model"], request.match_info.get("version"))
    data = await request_image(request)
    return web.json_response(findings(await classify_bytes(runner, model, data)))


def describe_version(runner: PipelineRunner, model: LoadedModel) -> dict[str, Any]:
    """One loaded version as ``GET /models/{name}`` lists it (TorchServe's field names)."""
    default = runner.registry.default_version(model.name)
    body: dict[str, Any] = {
        "modelName": model.name,
        "modelVersion": model.version,
        "default": model.version == default,
        "status": "ready",
        "task": model.task,
        "labels": list(model.labels),
        "inputSize": list(model.spatial_size) if model.spatial_size else None,
        "source": model.source,
        "device": str(model.device),
    }
    try:
        served = runner.engine.get(model.name, model.version)
    except KeyError:
        body["status"] = "not serving"
        return body
    stats = served.statistics()
    body.update({
        "device": str(served.device),
        "batchSize": served.max_batch,
        "maxBatchDelay": served.max_delay_ns / 1e6,
        "workers": served.workers,
        "threadsPerWorker": served.threads,
        "status": "ready" if served.alive else "stopped",
        "inferenceCount": stats.inference_count,
        "executionCount": stats.execution_count,
    })
    return body


def _versions(runner: PipelineRunner, name: str) -> list[LoadedModel]:
    """Every loaded version of ``name``, oldest first."""
    return [runner.model(name, v) for v in runner.registry.versions(name)]


def _failed(runner: PipelineRunner, name: str) -> dict[str, Any]:
    specs = [s for s in runner.specs if s.name == name]
    return {"modelName": name, "status": "failed", "error": without_paths(runner.failed[name]),
            "versions": sorted({s.version for s in specs if s.version})}


async def list_models(request: web.Request) -> web.Response:
    runner = runner_of(request)
    out: list[dict[str, Any]] = []
    for name in sorted({s.name for s in runner.specs}):
        if name in runner.failed:
            out.append(_failed(runner, name))
            continue
        versions = [m.version for m in _versions(runner, name)]
        out.append({"modelName": name, "status": "ready", "versions": versions,
                    "defaultVersion": runner.registry.default_version(name)})
    return web.json_response({"models": out})


async def describe_model(request: web.Request) -> web.Response:
    runner = runner_of(request)
    name = request.match_info["name"]
    version = request.match_info.get("version")
    if name not in {s.name for s in runner.specs}:
        raise ApiError(404, f"model {name!r} is not loaded; GET /models lists the models")
    if name in runner.failed:
        return web.json_response([_failed(runner, name)])
    if version in (None, "all"):
        return web.json_response([describe_version(runner, m) for m in _versions(runner, name)])
    try:
        model = runner.model(name, version)
    except KeyError as exc:
        raise ApiError(404, str(exc.args[0])) from None
    return web.json_response([describe_version(runner, model)])


def routes() -> list[Route]:
    ts = ErrorStyle.TORCHSERVE
    # TorchServe answers /ping to POST as well (some load balancers' health checks)
    table = [Route(method, "/ping", ping, scope=None, style=ts) for method in ("GET", "POST")]
    for path in ("/predictions/{model}", "/predictions/{model}/{version}"):
        table += [Route(method, path, predictions, scope="infer", style=ts, anonymous=True)
                  for method in ("POST", "PUT")]
    table += [
        Route("GET", "/models", list_models, scope="read", style=ts, anonymous=True),
        Route("GET", "/models/{name}", describe_model, scope="read", style=ts,
              anonymous=True),
        Route("GET", "/models/{name}/{version}", describe_model, scope="read", style=ts,
              anonymous=True),
    ]
    return table
