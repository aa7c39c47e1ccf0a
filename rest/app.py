"""The node's aiohttp application: ``create_app(node) -> web.Application``.

Each API family is a module with a ``routes(node) -> list[Route]`` table. A route
declares the scope it needs (``None``: open) and its contract's error shape; one
middleware authenticates, one turns exceptions into that shape.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

import dicom_node
from rest.auth import ANONYMOUS, Authenticator, AuthError, AuthFailure, Principal
from rest.errors import ErrorStyle, error_response, map_exception

if TYPE_CHECKING:
    from dicom_node.node import Node

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NODE: web.AppKey[Node] = web.AppKey("node")
AUTH: web.AppKey[Authenticator] = web.AppKey("auth")
ROUTES: web.AppKey[dict[Any, Route]] = web.AppKey("routes")
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    # None: open to anyone; a tuple: any one of these scopes will do
    scope: str | tuple[str, ...] | None = "read"
    style: ErrorStyle = ErrorStyle.DEFAULT
    # A request without credentials gets auth.anonymous_scopes here (none by default).
    # Only the model-serving routes and /metrics: none that reads or runs on the studies
    # the node holds, or changes its configuration.
    anonymous: bool = False


def principal(request: web.Request) -> Principal:
    """The authenticated caller of a non-open route."""
    p: Principal = request[PRINCIPAL]
    return p


async def json_body(request: web.Request) -> Any:
    """The request's JSON body. A UTF-8 byte order mark, which .NET clients write, is
    skipped. Raises ValueError (not JSON, not UTF-8, 4300-digit ints) or RecursionError
    (deep nesting)."""
    return json.loads((await request.read()).decode("utf-8-sig"))


def _style_of(request: web.Request) -> ErrorStyle:
    table = request.app[ROUTES]
    route = table.get(request.match_info.route)
    if route is not None:
        return route.style
    # No route matched (a 404, or a 405 for a method the resource lacks): answer in the
    # dialect of the API the path belongs to, as its clients parse it.
    top = request.path.split("/")[1:2]
    styles = {r.style for r in table.values() if r.path.split("/")[1:2] == top}
    return styles.pop() if len(styles) == 1 else ErrorStyle.DEFAULT


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return map_exception(exc, _style_of(request), request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.app[ROUTES].get(request.match_info.route)
    if route is None or route.scope is None:  # open routes and 404/405 answers
        return await handler(request)
    try:
        given = request.headers.getall("Authorization", [])
        if len(given) > 1:  # only the first was read: an empty one made a wrong token anonymous
            raise AuthError(AuthFailure.INVALID, "more than one Authorization header")
        who = request.app[AUTH].authenticate(given[0] if given else None,
                                              anonymous=route.anonymous)
        try:
            who.require(route.scope)
        except AuthError:
            if who.kind == ANONYMOUS:  # what the caller lacks is credentials
                raise AuthError(AuthFailure.MISSING) from None
            raise
    except AuthError as exc:
        message = exc.failure.value if route.style is ErrorStyle.SEED_001 else exc.detail
        response = error_response(route.style, exc.status, message)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="dicom-node"'
        return response
    request[PRINCIPAL] = who
    return await handler(request)


OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document describing every route (``rest/openapi.yaml``)."""
    doc: dict[str, Any] = yaml.safe_load(OPENAPI_PATH.read_text(encoding="utf-8"))
    doc["info"]["version"] = dicom_node.__version__
    return doc


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def base_routes() -> list[Route]:
    return [
        Route("GET", "/openapi.json", openapi, scope=None),
        Route("OPTIONS", "/", openapi, scope=None),
    ]


def create_app(
    node: Node,
    authenticator: Authenticator | None = None,
    extra_routes: list[Route] | None = None,
) -> web.Application:
    """Build the application for ``node``; the caller runs it."""
    app = web.Application(
        client_max_size=int(node.settings.rest.max_body_mb * 1024 * 1024),
        middlewares=[error_middleware, auth_middleware],
    )
    app[NODE] = node
    app[AUTH] = authenticator or node.authenticator()
    from rest import (
        batch,
        config_api,
        echo,
        images,
        inference,
        metrics,
        serving,
        single_inference,
        stow,
        wado,
    )

    table: dict[Any, Route] = {}
    for route in [*base_routes(), *inference.routes(), *config_api.routes(), *echo.routes(),
                  *stow.routes(), *wado.routes(), *single_inference.routes(), *batch.routes(),
                  *metrics.routes(), *serving.routes(), *images.routes(),
                  *(extra_routes or [])]:
        table[app.router.add_route(route.method, route.path, route.handler)] = route
    app[ROUTES] = table
    return app
