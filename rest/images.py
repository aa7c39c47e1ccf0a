"""Image classification and embeddings (seed 003): ``/classify_image``, ``/embed_image``,
``/infer`` (``/embed``) and ``/embed_text``.

Images come as base64 (bare or a ``data:`` URI) or as http(s) URLs, one or a
list. URLs are downloaded only from hosts an administrator listed in
``rest.image_url_hosts`` (none by default), without following redirects and
within ``rest.max_body_mb``, so the API cannot be used to reach other hosts.

Every endpoint checks a model's images alike (:func:`rest.serving.admit_image`):
a DICOM image the model's pipelines would not take is refused with 400 on each.
``processingTimeMs`` is whole milliseconds, an integer as in the seed.

- ``/classify_image`` -> ``probabilities`` (one list per image, in the model's
  label order; ``labels`` names them) and ``processingTimeMs``; the images go
  through the engine's dynamic batching.
- ``/embed_image`` -> ``embeddings``: the classifier's penultimate features
  (the input of its last linear layer), cut to ``nDims`` and L2-normalised
  when ``normalize`` (the default). Each counts in the model's statistics.
- ``/infer`` (also ``/embed``, where the seed's example and ingrain post it) ->
  ``imageEmbeddings`` and ``probabilities`` for the images, and
  ``textEmbeddings`` ``null`` (text is not served), as the seed's answer has both.
- Text (``/embed_text``, ``text`` in ``/infer``) answers 400: the node serves
  image models only, none has a text encoder.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import time
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from dicom_node.config import unknown_key_hint
from pipeline.io import InputError
from pipeline.runner import PipelineError, PipelineRunner
from rest.app import NODE, Route, json_body
from rest.errors import ApiError
from rest.serving import admit_async, body_limit, classifier, classify_admitted, runner_of

if TYPE_CHECKING:
    from pipeline.bundle import LoadedModel
    from pipeline.decode import DecodedImage

MAX_IMAGES = 64  # per request: each may be a download
DOWNLOAD_TIMEOUT_S = 30.0
NO_TEXT_ENCODER = ("no loaded model has a text encoder: this node serves image models only; "
                   "use /embed_image or /classify_image")

Name = Annotated[str, Field(min_length=1, max_length=256)]
ImageRef = Annotated[str, Field(min_length=1)]
Images = ImageRef | Annotated[list[ImageRef], Field(min_length=1, max_length=MAX_IMAGES)]
Texts = Annotated[str, Field(min_length=1)] | Annotated[
    list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_IMAGES)]


NDims = Annotated[int, Field(ge=1)] | None
Headers = dict[str, str] | None


def _n_dims() -> Any:
    # The seed's bodies say nDims; ingrain, whose client the seed's Python examples
    # use, sends its pydantic field names (n_dims, image_download_headers).
    return Field(default=None, validation_alias=AliasChoices("nDims", "n_dims"))


def _download_headers() -> Any:
    return Field(default=None, validation_alias=AliasChoices("image_download_headers",
                                                             "imageDownloadHeaders"))


class _Request(BaseModel):
    # strict: "true" is not a boolean, "3" is not an integer
    model_config = ConfigDict(strict=True, extra="forbid")


class ClassifyImageRequest(_Request):
    name: Name
    image: Images
    image_download_headers: Headers = _download_headers()


class EmbedImageRequest(ClassifyImageRequest):
    normalize: bool = True
    nDims: NDims = _n_dims()


class EmbedTextRequest(_Request):
    name: Name
    text: Texts
    normalize: bool = True
    nDims: NDims = _n_dims()


class InferRequest(_Request):
    name: Name
    text: Texts | None = None
    image: Images | None = None
    normalize: bool = True
    nDims: NDims = _n_dims()
    image_download_headers: Headers = _download_headers()


M = TypeVar("M", bound=_Request)


# The names pydantic gives the branches of the string-or-list unions (Images, Texts) in
# an error's location ("constrained-str", "list[constrained-str]"): nothing a client sent.
_UNION_BRANCH = re.compile(r"^(constrained-)?str$|^list\[")
ONE_OR_A_LIST = "Input should be a string or a list of strings"


def _branch(part: object) -> str | None:
    return part if isinstance(part, str) and _UNION_BRANCH.match(part) else None


def _spellings(model: type[BaseModel]) -> dict[str, list[str]]:
    """Each key a field takes, with all the keys of its field (``n_dims``: nDims, n_dims)."""
    out: dict[str, list[str]] = {}
    for name, field in model.model_fields.items():
        keys = [str(c) for c in field.validation_alias.choices] \
            if isinstance(field.validation_alias, AliasChoices) else [field.alias or name]
        out.update({k: keys for k in keys})
    return out


def _field_errors(exc: ValidationError, model: type[BaseModel],
                  body: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    spellings = _spellings(model)
    for err in exc.errors():
        loc = list(err["loc"])
        msg = err["msg"]
        branch = _branch(loc[1]) if len(loc) > 1 else None
        if branch is not None:
            # A value one or a list may be: pydantic complains once per branch. Of a string
            # or a list, the complaint of its own branch says what is wrong; of anything
            # else, that it is neither.
            value = body.get(str(loc[0]))
            if isinstance(value, str | list):
                if isinstance(value, list) != branch.startswith("list["):
                    continue
            else:
                msg = ONE_OR_A_LIST
        loc = [p for p in loc if _branch(p) is None]
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            keys = spellings.get(str(loc[-1]), [])
            given = [k for k in keys if k in body and k != loc[-1]]
            msg = (f"the same field as {given[0]!r}: send one of them" if given
                   else "unknown field" + unknown_key_hint(model, err["loc"]))
        item = {"field": ".".join(str(p) for p in loc) or "(body)", "message": msg}
        if item not in out:
            out.append(item)
    return out


async def _parse(request: web.Request, model: type[M]) -> M:
    try:
        body = await json_body(request)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, 4300-digit ints, deep nesting
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object",
                       [{"field": "(body)", "message": "must be an object"}])
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "the request has invalid or missing fields",
                       _field_errors(exc, model, body)) from None


# -- images --------------------------------------------------------------------------------


def _host_allowed(url: str, hosts: list[str]) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        return False
    if ":" in host:  # IPv6 literals are listed in brackets
        host = f"[{host}]"
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return False
    return host in hosts or f"{host}:{port}" in hosts


def _base64(ref: str, where: str) -> bytes:
    payload = ref
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{where}: a data URI must be base64-encoded "
                           "(data:image/png;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: not an http(s) URL, a data URI or valid base64") from None


async def _download(session: aiohttp.ClientSession, url: str, where: str, limit: int,
                    headers: dict[str, str] | None) -> bytes:
    try:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                hint = " (redirects are not followed)" if 300 <= resp.status < 400 else ""
                raise ApiError(400, f"{where}: downloading {url} answered HTTP "
                               f"{resp.status}{hint}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(256 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ApiError(400, f"{where}: the image at {url} is larger than "
                                   f"rest.max_body_mb")
                chunks.append(chunk)
            return b"".join(chunks)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ApiError(400, f"{where}: cannot download {url} "
                       f"({type(exc).__name__}: {exc})") from None


async def load_images(request: web.Request, refs: str | list[str],
                      headers: dict[str, str] | None) -> list[bytes]:
    """The bytes of each image reference (base64, data URI or allowed URL), in order."""
    refs = [refs] if isinstance(refs, str) else refs
    hosts = request.app[NODE].settings.rest.image_url_hosts
    out: list[bytes | None] = [None] * len(refs)
    urls: list[tuple[int, str]] = []
    for i, ref in enumerate(refs):
        where = f"image[{i}]" if len(refs) > 1 else "image"
        if ref[:8].lower().startswith(("http://", "https://")):  # schemes are case-blind
            if not _host_allowed(ref, hosts):
                raise ApiError(400, f"{where}: downloads from {urlsplit(ref).netloc!r} are not "
                               "allowed (rest.image_url_hosts lists the hosts an administrator "
                               "allows); send the image as base64 instead")
            urls.append((i, ref))
        else:
            out[i] = _base64(ref, where)
    if urls:
        limit = body_limit(request)
        timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            got = await asyncio.gather(*(
                _download(session, url, f"image[{i}]" if len(refs) > 1 else "image", limit,
                          headers) for i, url in urls))
        for (i, _), data in zip(urls, got, strict=True):
            out[i] = data
    return [d if d is not None else b"" for d in out]


# -- work ----------------------------------------------------------------------------------


def _where(i: int, n: int) -> str:
    return f"image[{i}]" if n > 1 else "image"


async def _admit_all(runner: PipelineRunner, model: LoadedModel,
                     images: list[bytes]) -> list[DecodedImage]:
    """Each image decoded and checked as every endpoint of the model checks it
    (:func:`~rest.serving.admit_image`); 400 naming the first one refused."""
    async def one(i: int, data: bytes) -> DecodedImage:
        try:
            return await admit_async(runner, model, data)
        except ApiError as exc:
            raise ApiError(exc.status, f"{_where(i, len(images))}: {exc.message}") from None

    return list(await asyncio.gather(*(one(i, d) for i, d in enumerate(images))))


async def _probabilities(runner: PipelineRunner, model: LoadedModel,
                         images: list[DecodedImage]) -> list[list[float]]:
    async def one(i: int, image: DecodedImage) -> list[float]:
        try:
            return (await classify_admitted(runner, model, image)).probabilities
        except ApiError as exc:
            raise ApiError(exc.status, f"{_where(i, len(images))}: {exc.message}") from None

    return list(await asyncio.gather(*(one(i, im) for i, im in enumerate(images))))


def _embed_all(runner: PipelineRunner, model: LoadedModel, images: list[DecodedImage],
               normalize: bool, n_dims: int | None) -> list[list[float]]:
    """Embed each image (blocking: runs in a worker thread)."""
    out = []
    for i, image in enumerate(images):
        try:
            vector = runner.embed(image.pixels, model.name, model.version,
                                  pixel_aspect=image.pixel_aspect)
        except InputError as exc:
            raise ApiError(400, f"{_where(i, len(images))}: {exc.message}") from None
        if n_dims is not None:
            if n_dims > len(vector):
                raise ApiError(422, f"nDims {n_dims} is larger than the model's embedding "
                               f"size {len(vector)}",
                               [{"field": "nDims", "message": f"at most {len(vector)}"}])
            vector = vector[:n_dims]
        if normalize:
            norm = math.sqrt(sum(v * v for v in vector))
            if norm > 0:
                vector = [v / norm for v in vector]
        out.append(vector)
    return out


async def _embeddings(runner: PipelineRunner, model: LoadedModel, images: list[DecodedImage],
                      normalize: bool, n_dims: int | None) -> list[list[float]]:
    try:
        return await asyncio.to_thread(_embed_all, runner, model, images, normalize, n_dims)
    except PipelineError as exc:
        raise ApiError(400, str(exc)) from None


def _elapsed_ms(t0: float) -> int:
    """Whole milliseconds since ``t0``: seed 003's ``processingTimeMs`` is an integer."""
    return round((time.perf_counter() - t0) * 1000.0)


# -- handlers ------------------------------------------------------------------------------


async def classify_image(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    req = await _parse(request, ClassifyImageRequest)
    runner = runner_of(request)
    model = classifier(runner, req.name)
    images = await _admit_all(runner, model, await load_images(
        request, req.image, req.image_download_headers))
    probs = await _probabilities(runner, model, images)
    return web.json_response({"probabilities": probs, "labels": list(model.labels),
                              "processingTimeMs": _elapsed_ms(t0)})


async def embed_image(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    req = await _parse(request, EmbedImageRequest)
    runner = runner_of(request)
    model = classifier(runner, req.name)
    images = await _admit_all(runner, model, await load_images(
        request, req.image, req.image_download_headers))
    vectors = await _embeddings(runner, model, images, req.normalize, req.nDims)
    return web.json_response({"embeddings": vectors, "processingTimeMs": _elapsed_ms(t0)})


async def infer(request: web.Request) -> web.Response:
    t0 = time.perf_counter()
    req = await _parse(request, InferRequest)
    if req.text is not None:
        raise ApiError(400, NO_TEXT_ENCODER)
    if req.image is None:
        raise ApiError(422, "the request has invalid or missing fields",
                       [{"field": "image", "message": "required (text is not supported)"}])
    runner = runner_of(request)
    model = classifier(runner, req.name)
    # checked once for both halves: a refused image is one failed request, not two
    images = await _admit_all(runner, model, await load_images(
        request, req.image, req.image_download_headers))
    vectors, probs = await asyncio.gather(
        _embeddings(runner, model, images, req.normalize, req.nDims),
        _probabilities(runner, model, images))
    # seed 003 answers both halves; the one not asked for (text: never served) is null
    return web.json_response({"textEmbeddings": None, "imageEmbeddings": vectors,
                              "probabilities": probs, "labels": list(model.labels),
                              "processingTimeMs": _elapsed_ms(t0)})


async def embed_text(request: web.Request) -> web.Response:
    await _parse(request, EmbedTextRequest)
    raise ApiError(400, NO_TEXT_ENCODER)


def routes() -> list[Route]:
    return [
        Route("POST", "/classify_image", classify_image, scope="infer", anonymous=True),
        Route("POST", "/embed_image", embed_image, scope="infer", anonymous=True),
        Route("POST", "/infer", infer, scope="infer", anonymous=True),
        # seed 003's curl example and ingrain's Client.embed() post /embed, under the
        # heading POST /infer: both are served
        Route("POST", "/embed", infer, scope="infer", anonymous=True),
        Route("POST", "/embed_text", embed_text, scope="infer", anonymous=True),
    ]
