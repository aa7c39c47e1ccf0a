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
WEB = {"name": "web", "type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web",
       "auth": "basic", "credentials": "alice:s3cret"}  # a destination with a secret


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


async def test_changes_at_the_same_time_all_apply(aiohttp_client: Any, tmp_path: Path) -> None:
    """Ten creates at once: each is live (not only the last), and one name posted ten
    times at once is created once and refused as a conflict nine times."""
    import asyncio

    data = tmp_path / "data"
    async with running_node(node_settings(data, **CONFIG)) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)

        def folder(name: str) -> dict[str, Any]:
            return {"name": name, "type": "folder", "path": str(tmp_path / name)}

        answers = await asyncio.gather(*(
            c.post("/config/destination", json=folder(f"rd{i}"), headers=h) for i in range(10)
        ))
        assert [r.status for r in answers] == [201] * 10
        live = {d.name for d in node.settings.destinations}
        assert {f"rd{i}" for i in range(10)} <= live
        for i in range(10):
            assert (await c.get(f"/config/destination/rd{i}", headers=h)).status == 200

        answers = await asyncio.gather(*(
            c.post("/config/destination", json=folder("same"), headers=h) for _ in range(10)
        ))
        assert sorted(r.status for r in answers) == [201] + [409] * 9


async def test_credentials_are_never_shown(aiohttp_client: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_node(node_settings(data, **CONFIG)) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        web = dict(WEB)
        r = await c.post("/config/destination", json=web, headers=h)
        assert r.status == 201 and "s3cret" not in await r.text()
        for url in ("/config/destination", "/config/destination/web"):
            r = await c.get(url, headers=h)
            assert r.status == 200 and "s3cret" not in await r.text()
        shown = await (await c.get("/config/destination/web", headers=h)).json()
        assert shown["credentials"] == "********"
        # what a GET showed, changed and PUT back, keeps the credentials it hid
        shown.pop("origin")
        r = await c.put("/config/destination/web", json={**shown, "url": "http://pacs/dw"},
                        headers=h)
        assert r.status == 200, await r.text()
        dest = next(d for d in node.settings.destinations if d.name == "web")
        assert dest.credentials == "alice:s3cret" and dest.url == "http://pacs/dw"
        r = await c.put("/config/destination/web", json={**shown, "credentials": "bob:pw"},
                        headers=h)
        assert next(d for d in node.settings.destinations
                    if d.name == "web").credentials == "bob:pw"


async def test_delete_of_an_object_in_use_is_a_conflict(aiohttp_client: Any,
                                                        tmp_path: Path) -> None:
    """A destination a drop folder sends to, a source an AE title takes from: deleting
    either is refused with 409, naming what uses it and where."""
    data = tmp_path / "data"
    settings = node_settings(
        data, **CONFIG,
        sources=[{"name": "ris", "ae_title": "RIS", "host": "127.0.0.1"}],
        ae_titles=[{"ae_title": "DICOMNODE", "sources": ["ris"]}],
        watch=[{"name": "drop", "path": str(tmp_path / "drop"), "destinations": ["pacs"]}])
    async with running_node(settings) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        r = await c.delete("/config/destination/pacs", headers=h)
        assert r.status == 409, await r.text()
        assert (await r.json())["message"] == (
            "destination 'pacs' is used by drop folder 'drop' (watch.0.destinations); "
            "remove it there first")
        r = await c.delete("/config/source/ris", headers=h)
        assert r.status == 409, await r.text()
        assert "source 'ris' is used by AE title 'DICOMNODE' (ae_titles.0.sources)" in \
            (await r.json())["message"]
        assert [d.name for d in node.settings.destinations] == ["pacs"]


async def test_spaces_around_a_name_are_not_part_of_it(aiohttp_client: Any,
                                                       tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_node(node_settings(data, **CONFIG)) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        r = await c.post("/config/destination", json={"name": " padded ", "type": "folder",
                                                      "path": str(tmp_path / "out")}, headers=h)
        assert r.status == 201, await r.text()
        assert (await r.json())["name"] == "padded"
        r = await c.post("/config/ae", json={"ae_title": " CXR "}, headers=h)
        assert r.status == 201, await r.text()
        assert node.settings.ae_title("CXR") is not None
        r = await c.put("/config/ae/CXR", json={"ae_title": "CXR ", "timeout_s": 3}, headers=h)
        assert r.status == 200, await r.text()
        assert [a.ae_title for a in node.settings.ae_titles] == ["DICOMNODE", "CXR"]


async def test_the_mask_is_never_saved_as_the_secret(aiohttp_client: Any,
                                                     tmp_path: Path) -> None:
    """The mask keeps a stored secret; where there is none (a clone of another
    destination's GET, a PUT on one without credentials) it is refused, not saved."""
    data = tmp_path / "data"
    async with running_node(node_settings(data, **CONFIG)) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        web = dict(WEB)
        assert (await c.post("/config/destination", json=web, headers=h)).status == 201
        clone = await (await c.get("/config/destination/web", headers=h)).json()
        clone.pop("origin")
        r = await c.post("/config/destination", json={**clone, "name": "web2"}, headers=h)
        assert r.status == 422, await r.text()
        assert (await r.json())["details"] == [
            {"field": "credentials",
             "message": "give the secret itself; ******** only keeps the stored one"}]
        assert "web2" not in {d.name for d in node.settings.destinations}

        bare = {**web, "name": "bare", "auth": "none", "credentials": None}
        assert (await c.post("/config/destination", json=bare, headers=h)).status == 201
        r = await c.put("/config/destination/bare", json={**bare, "credentials": "********"},
                        headers=h)
        assert r.status == 422, await r.text()
        assert next(d for d in node.settings.destinations if d.name == "bare").credentials \
            is None


async def test_objects_are_checked_as_start_up_and_use_check_them(aiohttp_client: Any,
                                                                  tmp_path: Path) -> None:
    """A TLS file that does not exist and a DICOMweb URL with a user and password are
    refused (422 naming the field), as the YAML file and the first use refuse them; a
    URL's userinfo is never shown, not even one the file gives."""
    data = tmp_path / "data"
    file_dest = {"name": "fileweb", "type": "dicomweb", "url": "http://bob:filepw@host/dw"}
    settings = node_settings(data, **{**CONFIG,
                                      "destinations": [*CONFIG["destinations"], file_dest]})
    async with running_node(settings) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        tls = {"certificate": str(tmp_path / "missing.pem"),
               "private_key": str(tmp_path / "missing.key")}
        r = await c.post("/config/destination", json={
            "name": "tlspacs", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
            "port": 104, "tls": tls}, headers=h)
        assert r.status == 422, await r.text()
        assert {"field": "tls.certificate",
                "message": f"file not found: {tmp_path / 'missing.pem'}"} \
            in (await r.json())["details"]
        r = await c.put("/config/destination/pacs", json={
            "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "tls": tls},
            headers=h)
        assert r.status == 422, await r.text()
        r = await c.post("/config/source", json={"name": "s", "ae_title": "S",
                                                 "host": "127.0.0.1", "tls": tls}, headers=h)
        assert r.status == 422, await r.text()

        r = await c.post("/config/destination", json={
            "name": "web", "type": "dicomweb", "url": "http://alice:pw0rd@host/dicomweb"},
            headers=h)
        assert r.status == 422, await r.text()
        assert (await r.json())["details"] == [{
            "field": "url",
            "message": "DICOMweb URL must not carry credentials; configure auth instead"}]
        assert "pw0rd" not in await r.text()
        r = await c.post("/config/source", json={
            "name": "s", "ae_title": "S", "host": "127.0.0.1",
            "dicomweb_url": "https://alice:pw0rd@host/dicomweb"}, headers=h)
        assert r.status == 422, await r.text()
        assert {d.name for d in node.settings.destinations} == {"pacs", "fileweb"}
        assert node.settings.sources == []

        for url in ("/config/destination", "/config/destination/fileweb"):
            r = await c.get(url, headers=h)
            assert r.status == 200 and "filepw" not in await r.text() \
                and "http://host/dw" in await r.text()
        r = await c.post("/config/destination/fileweb/echo", headers=h)
        assert r.status == 200 and "filepw" not in await r.text(), await r.text()


def _accepted(port: int, called: str, calling: str = "STRANGER") -> bool:
    """Whether the node accepts an association (Verification) from ``calling``."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    accepted = bool(assoc.is_established)
    if accepted:
        assoc.release()
    return accepted


async def test_the_nodes_own_ae_title_cannot_be_deleted(aiohttp_client: Any,
                                                       tmp_path: Path) -> None:
    """Its own AE title is answered even without an entry (C-MOVE retrievals arrive
    there): a delete would only drop the entry's policy. It is refused (409) saying
    what to do instead; a delete stored before (a tombstone) no longer drops the file's
    entry at start-up; entries the stored objects replace or delete are logged."""
    import asyncio

    import structlog

    data = tmp_path / "data"
    settings = node_settings(data, **CONFIG, dimse={"ae_title": "PROBENODE"},
                             ae_titles=[{"ae_title": "PROBENODE",
                                         "reject_unknown_sources": True}])
    port = settings.dimse.port
    async with running_node(settings) as node:
        c: TestClient = await aiohttp_client(create_app(node))
        h = headers(data)
        r = await c.delete("/config/ae/PROBENODE", headers=h)
        assert r.status == 409, await r.text()
        message = (await r.json())["message"]
        assert "'PROBENODE' is this node's own AE title (dimse.ae_title)" in message
        assert "reject_unknown_sources" in message
        assert [a["ae_title"] for a in await (await c.get("/config/ae", headers=h)).json()] \
            == ["PROBENODE"]
        assert not await asyncio.to_thread(_accepted, port, "PROBENODE")
        assert node.store is not None
        # as a version that let the delete through left it
        node.store.put_config_object("ae", "PROBENODE", None)
        r = await c.delete("/config/destination/pacs", headers=h)
        assert r.status == 204

    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            ae = node.settings.ae_title("PROBENODE")
            assert ae is not None and ae.reject_unknown_sources
            assert not await asyncio.to_thread(_accepted, port, "PROBENODE")
    skipped = [e for e in logs if e["event"] == "runtime config object skipped"]
    assert [(e["kind"], e["name"]) for e in skipped] == [("ae", "PROBENODE")]
    overridden = [(e["kind"], e["name"], e["action"]) for e in logs
                  if e["event"] == "file entry overridden by the config API"]
    assert overridden == [("destination", "pacs", "deleted")]


def test_check_config_names_the_file_entries_stored_objects_override(tmp_path: Path) -> None:
    import subprocess
    import sys

    from dicom_node.config import load_settings
    from dicom_node.store import Store

    config = tmp_path / "node.yaml"
    config.write_text("models: []\npipelines: []\nwatch: []\nae_titles: [{ae_title: DICOMNODE}]\n"
                      "destinations: [{name: pacs, type: dimse, ae_title: PACS, "
                      "host: 127.0.0.1, port: 104}]\n")
    data = tmp_path / "data"

    def check() -> str:
        r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "check-config", str(config),
                            "--data-dir", str(data)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return next(ln for ln in r.stdout.splitlines() if "config API" in ln).split(None, 2)[2]

    assert check() == "no objects stored"
    settings = load_settings(config, overrides={"storage.data_dir": str(data)})
    data.mkdir()
    store = Store(settings.database_url).open()
    try:
        store.put_config_object("destination", "pacs", None)
        store.put_config_object("ae", "DICOMNODE", {"ae_title": "DICOMNODE", "timeout_s": 3})
        store.put_config_object("ae", "CXR", {"ae_title": "CXR"})
    finally:
        store.close()
    assert check() == ("3 objects stored; file entries ae 'DICOMNODE' replaced, "
                       "destination 'pacs' deleted")


OLD_OBJECTS: list[tuple[str, str, dict[str, Any]]] = [
    # what older versions accepted and this one refuses, and what depends on it
    ("source", "pwsrc", {"name": "pwsrc", "ae_title": "PWSRC", "host": "127.0.0.1",
                         "dicomweb_url": "http://user:secret@127.0.0.1:8042/dicom-web"}),
    ("ae", "FROMPW", {"ae_title": "FROMPW", "sources": ["pwsrc"],
                      "reject_unknown_sources": True}),
    ("destination", "dwpw", {"name": "dwpw", "type": "dicomweb",
                             "url": "ftp://user:secret@127.0.0.1/dicom-web"}),
]


def _store_old_objects(url: str) -> None:
    """OLD_OBJECTS written as an older version accepted them (no checks)."""
    from dicom_node.store import Store

    store = Store(url).open()
    try:
        for kind, name, body in OLD_OBJECTS:
            store.put_config_object(kind, name, body)
    finally:
        store.close()


async def test_stored_objects_that_no_longer_validate_stay_visible_and_fixable(
        aiohttp_client: Any, tmp_path: Path) -> None:
    """Objects an older version stored that this one refuses were dropped at start with a
    warning (their dependants with them), and 404 to GET, PUT and DELETE: the secret
    stayed in the store for good. Now they are listed as invalid with their problems,
    /health is degraded, a PUT fixes one (and what depends on it comes back into force)
    and a DELETE removes one and its secret."""
    import structlog


    data = tmp_path / "data"
    settings = node_settings(data, **CONFIG)
    data.mkdir()
    _store_old_objects(settings.database_url)
    with structlog.testing.capture_logs() as logs:
        async with running_node(settings) as node:
            assert node.settings.ae_title("FROMPW") is None
            c: TestClient = await aiohttp_client(create_app(node))
            h = headers(data)
            health = await (await c.get("/health")).json()
            assert health["status"] == "degraded"
            assert health["config"]["invalid"] == 3
            assert {"kind": "destination", "name": "dwpw"} in health["config"]["objects"]

            r = await c.get("/config/destination", headers=h)
            assert r.status == 200 and "secret" not in await r.text()
            dwpw = next(d for d in await r.json() if d["name"] == "dwpw")
            assert dwpw["invalid"] is True and dwpw["origin"] == "api"
            assert [p["field"] for p in dwpw["problems"]] == ["url"]
            r = await c.get("/config/source/pwsrc", headers=h)
            assert r.status == 200 and "secret" not in await r.text()
            assert (await r.json())["problems"][0]["field"] == "dicomweb_url"
            ae = await (await c.get("/config/ae/FROMPW", headers=h)).json()
            assert ae["invalid"] is True and "pwsrc" in ae["problems"][0]["message"]
            r = await c.post("/config/ae", json=OLD_OBJECTS[1][2], headers=h)
            assert r.status == 409

            # a PUT is checked as any is; a valid one puts it (and its dependant) in force
            source = dict(OLD_OBJECTS[0][2])
            r = await c.put("/config/source/pwsrc", json=source, headers=h)
            assert r.status == 422
            source["dicomweb_url"] = "http://127.0.0.1:8042/dicom-web"
            r = await c.put("/config/source/pwsrc", json=source, headers=h)
            assert r.status == 200, await r.text()
            assert node.settings.ae_title("FROMPW") is not None
            ae = await (await c.get("/config/ae/FROMPW", headers=h)).json()
            assert "invalid" not in ae

            r = await c.delete("/config/destination/dwpw", headers=h)
            assert r.status == 204
            assert (await c.get("/config/destination/dwpw", headers=h)).status == 404
            assert node.store is not None
            assert node.store.config_objects()["destination"]["dwpw"] is None  # no secret
            health = await (await c.get("/health")).json()
            assert health["config"] == {"invalid": 0, "objects": []}
    errors = [(e["kind"], e["name"]) for e in logs if e["log_level"] == "error"
              and e["event"].startswith("runtime config object skipped")]
    assert sorted(errors) == [("ae", "FROMPW"), ("destination", "dwpw"), ("source", "pwsrc")]
    assert "PUT /config/destination/dwpw" in next(
        e["event"] for e in logs if e.get("name") == "dwpw" and e["log_level"] == "error")

    async with running_node(settings) as node:  # fixed for good
        assert node.config_skipped == []
        assert node.settings.ae_title("FROMPW") is not None


def test_check_config_fails_on_stored_objects_that_do_not_validate(tmp_path: Path) -> None:
    from dicom_node.cli import main
    from dicom_node.config import load_settings

    config = tmp_path / "node.yaml"
    config.write_text("models: []\npipelines: []\nwatch: []\n")
    data = tmp_path / "data"
    data.mkdir()
    settings = load_settings(config, overrides={"storage.data_dir": str(data)})
    _store_old_objects(settings.database_url)
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["check-config", str(config), "--data-dir", str(data)]) == 2
    assert "invalid (not in force): ae 'FROMPW', source 'pwsrc', destination 'dwpw'" \
        in out.getvalue()
    assert "the config API's destination 'dwpw' stored in the store does not validate" \
        in err.getvalue()
    assert "PUT /config/ae/FROMPW" in err.getvalue()
    assert "secret" not in out.getvalue() + err.getvalue()
