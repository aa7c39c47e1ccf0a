"""Runtime management of AE titles, sources and destinations (admin scope).

``/config/ae``, ``/config/source``, ``/config/destination``: GET (list, one),
POST (201; 409 if the name exists), PUT (update in place — the safe way to
change a live AE title's timeout or pipelines), DELETE (204). Changes are kept
in the store and merged over the YAML file at start-up. A destination's
``credentials`` are never shown: answers carry ``"********"`` in their place, and a
PUT that sends that mask back keeps the credentials the object has; the mask where
there is none to keep (a POST, or a PUT on an object without credentials) is 422.

A stored object that no longer validates (an older version accepted it) is not in
force, but listed and shown as stored with ``"invalid": true`` and its ``problems``;
a PUT replaces it (checked as a new object is) and a DELETE removes it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dicom_node.dicomweb import redact_url
from dicom_node.runtime_config import KINDS, ConfigInvalid, SkippedObject, objects_of
from rest.app import NODE, Route, json_body
from rest.errors import ApiError

SECRET_FIELDS = ("credentials",)
MASK = "********"


URL_FIELDS = ("url", "dicomweb_url")


def _shown(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as an answer shows it: credentials masked, no user or password in a URL
    (one the file gives; the API refuses them)."""
    return {k: MASK if k in SECRET_FIELDS and v
            else redact_url(v) if k in URL_FIELDS and isinstance(v, str)
            else v for k, v in body.items()}


def _kind(request: web.Request) -> str:
    kind = request.match_info["kind"]
    if kind not in KINDS:
        raise ApiError(404, f"unknown configuration kind {kind!r}; one of "
                       f"{', '.join(KINDS)}")
    return kind


def _origin(request: web.Request, kind: str, name: str) -> str:
    node = request.app[NODE]
    in_file = name in objects_of(node.file_settings, kind)
    in_effective = objects_of(node.settings, kind).get(name)
    if not in_file:
        return "api"
    return "file" if objects_of(node.file_settings, kind)[name] == in_effective else "api"


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await json_body(request)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, 4300-digit ints, deep nesting
        raise ApiError(422, "the body is not valid JSON",
                       [{"field": "(body)", "message": "not valid JSON"}]) from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object",
                       [{"field": "(body)", "message": "must be an object"}])
    return body


def _mask_refused(field: str) -> ApiError:
    """The mask sent where there is no stored secret for it to keep."""
    return ApiError(422, "the configuration object is invalid", [
        {"field": field, "message": f"give the secret itself; {MASK} only keeps the stored one"}])


def _invalid_shown(request: web.Request, obj: SkippedObject) -> dict[str, Any]:
    """A stored object left out at start because it does not validate: as stored
    (secrets masked), marked invalid with its problems."""
    shown = {**_shown(obj.body), "origin": "api", "invalid": True, "problems": obj.problems}
    if obj.name in objects_of(request.app[NODE].settings, obj.kind):
        shown["file_entry_in_force"] = True  # the file's entry of that name runs meanwhile
    return shown


async def list_objects(request: web.Request) -> web.Response:
    kind = _kind(request)
    node = request.app[NODE]
    shown = {name: {**_shown(body), "origin": _origin(request, kind, name)}
             for name, body in objects_of(node.settings, kind).items()}
    for obj in node.config_skipped:
        if obj.kind == kind:
            shown[obj.name] = _invalid_shown(request, obj)
    return web.json_response(list(shown.values()))


async def get_object(request: web.Request) -> web.Response:
    kind, name = _kind(request), request.match_info["name"]
    node = request.app[NODE]
    if (invalid := node.invalid_config(kind, name)) is not None:
        return web.json_response(_invalid_shown(request, invalid))
    body = objects_of(node.settings, kind).get(name)
    if body is None:
        raise ApiError(404, f"no {kind} named {name!r}")
    return web.json_response({**_shown(body), "origin": _origin(request, kind, name)})


async def _change(request: web.Request, kind: str, name: str, body: dict[str, Any] | None,
                  create: bool) -> None:
    try:
        await request.app[NODE].change_config(kind, name, body, create=create)
    except ConfigInvalid as exc:
        raise ApiError(422, "the configuration object is invalid", exc.problems) from None


async def create_object(request: web.Request) -> web.Response:
    kind = _kind(request)
    body = await _body(request)
    key = KINDS[kind][1]
    name = body.get(key)
    if not isinstance(name, str) or not name.strip():
        raise ApiError(422, "the configuration object is invalid",
                       [{"field": key, "message": "required field is missing"}])
    for field in SECRET_FIELDS:  # a body copied from another object's GET: no secret in it
        if body.get(field) == MASK:
            raise _mask_refused(field)
    name = name.strip()  # surrounding spaces are not part of a name (nor of an AE title)
    await _change(request, kind, name, body, create=True)
    return web.json_response(_shown(objects_of(request.app[NODE].settings, kind)[name]),
                             status=201)


async def update_object(request: web.Request) -> web.Response:
    kind, name = _kind(request), request.match_info["name"]
    body = await _body(request)
    node = request.app[NODE]
    invalid = node.invalid_config(kind, name)  # the mask keeps what it stored
    current = invalid.body if invalid is not None \
        else objects_of(node.settings, kind).get(name) or {}
    for key in SECRET_FIELDS:  # the mask an answer showed, sent back: keep what it hides
        if body.get(key) == MASK:
            if not current.get(key):
                raise _mask_refused(key)
            body[key] = current[key]
    await _change(request, kind, name, body, create=False)
    return web.json_response(_shown(objects_of(request.app[NODE].settings, kind)[name]))


async def delete_object(request: web.Request) -> web.Response:
    kind, name = _kind(request), request.match_info["name"]
    await _change(request, kind, name, None, create=False)
    return web.Response(status=204)


def routes() -> list[Route]:
    base = "/config/{kind:ae|source|destination}"
    return [
        Route("GET", base, list_objects, scope="admin"),
        Route("POST", base, create_object, scope="admin"),
        Route("GET", base + "/{name}", get_object, scope="admin"),
        Route("PUT", base + "/{name}", update_object, scope="admin"),
        Route("DELETE", base + "/{name}", delete_object, scope="admin"),
    ]
