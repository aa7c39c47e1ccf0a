"""``POST /config/destination/{name}/echo`` against real peers: dcmtk storescp, the node's
own SCP (which refuses an unknown called AE title), Orthanc's DICOMweb, closed ports."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient

from rest.app import create_app
from tests.support.inproc import node_settings, running_node
from tests.support.orthanc import Orthanc
from tests.support.peers import free_port, storescp

pytestmark = pytest.mark.peers

NODE_PORT = free_port()


def admin(secret: bytes, scope: str = "admin") -> dict[str, str]:
    token = jwt.encode({"sub": "pacs-admin", "scope": scope, "exp": int(time.time()) + 300},
                       secret, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def api(aiohttp_client: Any, tmp_path: Path
              ) -> AsyncIterator[tuple[TestClient, dict[str, str], bytes]]:
    settings = node_settings(tmp_path / "data", dimse={"host": "127.0.0.1", "port": NODE_PORT},
                             ae_titles=[{"ae_title": "DICOMNODE"}])
    async with running_node(settings) as node:
        client = await aiohttp_client(create_app(node))
        secret = (tmp_path / "data" / "jwt_secret").read_bytes().strip()
        yield client, admin(secret), secret


async def add(client: TestClient, headers: dict[str, str], body: dict[str, Any]) -> None:
    r = await client.post("/config/destination", json=body, headers=headers)
    assert r.status == 201, await r.text()


async def echo(client: TestClient, headers: dict[str, str], name: str) -> dict[str, Any]:
    r = await client.post(f"/config/destination/{name}/echo", headers=headers)
    assert r.status == 200, await r.text()
    out: dict[str, Any] = await r.json()
    assert out["destination"] == name
    assert isinstance(out["round_trip_ms"], float) and out["round_trip_ms"] >= 0
    return out


async def test_dimse_destinations(api: tuple[TestClient, dict[str, str], bytes],
                                  tmp_path: Path) -> None:
    client, h, _ = api
    with storescp(tmp_path / "scp", "STORESCP") as peer:
        await add(client, h, {"name": "storescp", "type": "dimse", "ae_title": "STORESCP",
                              "host": "127.0.0.1", "port": peer.port})
        out = await echo(client, h, "storescp")
        assert out["success"] is True and out["status"] == 0
        assert out["type"] == "dimse" and out["target"] == f"STORESCP@127.0.0.1:{peer.port}"
    # the node's own SCP: its AE title answers, an unknown one is refused
    await add(client, h, {"name": "self", "type": "dimse", "ae_title": "DICOMNODE",
                          "host": "127.0.0.1", "port": NODE_PORT})
    assert (await echo(client, h, "self"))["success"] is True
    await add(client, h, {"name": "wrong-ae", "type": "dimse", "ae_title": "NOSUCHAE",
                          "host": "127.0.0.1", "port": NODE_PORT})
    out = await echo(client, h, "wrong-ae")
    assert out["success"] is False and out["status"] is None
    assert "rejected the association" in out["message"]
    assert "called AE title not recognised" in out["message"]
    # nothing listening
    await add(client, h, {"name": "closed", "type": "dimse", "ae_title": "PACS",
                          "host": "127.0.0.1", "port": free_port()})
    out = await echo(client, h, "closed")
    assert out["success"] is False and out["message"]


async def test_dicomweb_and_folder_destinations(
        api: tuple[TestClient, dict[str, str], bytes], orthanc_factory: Any,
        tmp_path: Path) -> None:
    client, h, _ = api
    pacs: Orthanc = orthanc_factory(users={"node": "s3cret"})
    await add(client, h, {"name": "web", "type": "dicomweb", "url": pacs.dicomweb_url,
                          "auth": "basic", "credentials": "node:s3cret"})
    out = await echo(client, h, "web")
    assert out["success"] is True and out["status"] in (200, 204), out
    await add(client, h, {"name": "web-badauth", "type": "dicomweb", "url": pacs.dicomweb_url,
                          "auth": "basic", "credentials": "node:wrong"})
    out = await echo(client, h, "web-badauth")
    assert out["success"] is False and out["status"] == 401 and "credentials" in out["message"]
    await add(client, h, {"name": "web-down", "type": "dicomweb",
                          "url": f"http://127.0.0.1:{free_port()}/dicom-web"})
    out = await echo(client, h, "web-down")
    assert out["success"] is False and out["status"] is None and "connection" in out["message"]
    await add(client, h, {"name": "drop", "type": "folder", "path": str(tmp_path / "out")})
    assert (await echo(client, h, "drop"))["success"] is True
    blocker = tmp_path / "file"
    blocker.write_text("x")
    await add(client, h, {"name": "blocked", "type": "folder", "path": str(blocker / "sub")})
    assert (await echo(client, h, "blocked"))["success"] is False


async def test_unknown_destination_and_scope(api: tuple[TestClient, dict[str, str], bytes]
                                             ) -> None:
    client, h, secret = api
    r = await client.post("/config/destination/nope/echo", headers=h)
    assert r.status == 404
    r = await client.post("/config/destination/nope/echo", headers=admin(secret, "infer read"))
    assert r.status == 403
    assert (await client.post("/config/destination/nope/echo")).status == 401
