"""The OpenAPI document describes every route the application serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from dicom_node.config import Settings
from dicom_node.node import Node
from rest.app import create_app, openapi_document
from rest.auth import Authenticator


def test_document_is_valid_openapi_3() -> None:
    validate(openapi_document())  # type: ignore[arg-type]


def test_every_route_is_documented(tmp_path: Path) -> None:
    node = Node(Settings.model_validate({"storage": {"data_dir": str(tmp_path)}}))
    app = create_app(node, Authenticator(node.settings.auth, b"x" * 32))
    paths: dict[str, Any] = openapi_document()["paths"]
    missing = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        path = path.replace("{kind:ae|source|destination}", "{kind}")
        if route.method.lower() not in paths.get(path, {}):
            missing.append(f"{route.method} {path}")
    assert not missing, f"routes missing from rest/openapi.yaml: {missing}"


async def test_served_at_options_root_and_openapi_json(aiohttp_client: Any,
                                                       tmp_path: Path) -> None:
    node = Node(Settings.model_validate({"storage": {"data_dir": str(tmp_path)}}))
    client = await aiohttp_client(create_app(node, Authenticator(node.settings.auth, b"x" * 32)))
    for method, path in (("OPTIONS", "/"), ("GET", "/openapi.json")):
        r = await client.request(method, path)
        assert r.status == 200 and (await r.json())["openapi"].startswith("3.")
