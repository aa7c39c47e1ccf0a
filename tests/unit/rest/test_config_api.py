"""Config API: create/list/update/delete, 409/404/422, admin only, survives a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
from aiohttp.test_utils import TestClient

from rest.app import create_app
from tests.support.inproc import node_settings, running_node

CONFIG = {
    "models": [{"name": "m", "path": "."}],
    "pipelines": [{"name": "cxr", "model": "m", "task": "classify"}],
    "destinations": [{"name": "pacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                      "port": 104}],
}


def headers(data_dir: Path, scope: str = "admin") -> dict[str, str]:
    secret = (data_dir / "jwt_secret").read_bytes().strip()
    t = jwt.encode({"sub": "admin", "scope": scope, "exp": int(time.time()) + 300}, secret,
                   algorithm="HS256")
    return {"Authorization": f"Bearer {t}"}


async def test_crud_and_restart(aiohttp_client: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = node_settings(data, **CONFIG)
    async with running_node(settings) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        r = await c.get("/config/ae", headers=h)
        assert r.status == 200
        assert [(a["ae_title"], a["origin"]) for a in await r.json()] == [("DICOMNODE", "file")]

        r = await c.post("/config/ae", json={"ae_title": "CXR", "pipelines": ["cxr"],
                                             "timeout_s": 10}, headers=h)
        assert r.status == 201, await r.text()
        assert (await r.json())["grouping"] == "study"  # defaults filled in
        assert node.settings.ae_title("CXR") is not None

        r = await c.post("/config/ae", json={"ae_title": "CXR"}, headers=h)
        assert r.status == 409

        r = await c.put("/config/ae/CXR", json={"pipelines": ["cxr"], "timeout_s": 2},
                        headers=h)
        assert r.status == 200 and (await r.json())["timeout_s"] == 2
        assert node.settings.ae_title("CXR").timeout_s == 2  # type: ignore[union-attr]

        r = await c.put("/config/ae/CXR", json={"pipelines": ["nope"]}, headers=h)
        assert r.status == 422
        assert {"field": "pipelines", "message": "'nope' is not defined in pipelines"} in \
            (await r.json())["details"]

        r = await c.post("/config/destination", json={"name": "web", "type": "dicomweb"},
                         headers=h)
        assert r.status == 422 and "url" in (await r.text())

        r = await c.put("/config/ae/CXR", json={"pipelines": ["cxr"], "timeout": 2}, headers=h)
        assert r.status == 422  # a slip gets the key meant
        assert {"field": "timeout", "message": "unknown field (did you mean 'timeout_s'?)"} \
            in (await r.json())["details"]

        r = await c.delete("/config/destination/pacs", headers=h)
        assert r.status == 204
        assert (await c.get("/config/destination/pacs", headers=h)).status == 404
        assert (await c.put("/config/source/ghost", json={}, headers=h)).status == 404
        r = await c.get("/config/ae", headers=headers(data, scope="infer read"))
        assert r.status == 403

    # the node starts again from the same file settings: runtime changes come back
    async with running_node(settings) as node:
        assert node.settings.ae_title("CXR").timeout_s == 2  # type: ignore[union-attr]
        assert [d.name for d in node.settings.destinations] == []
