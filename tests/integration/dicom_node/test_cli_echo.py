"""``dicom-node echo``: real peers (dcmtk storescp; a closed port), a folder, the store's
runtime objects, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.config import Settings
from dicom_node.store import Store
from tests.support.peers import free_port, storescp

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.peers


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "echo", "--config",
                           str(config), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_echo_reports_each_peer_and_fails_when_one_is_down(tmp_path: Path) -> None:
    with storescp(tmp_path / "scp", "PACS") as pacs:
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(tmp_path / "data")},
            "sources": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                         "port": pacs.port}],
            "destinations": [
                {"name": "pacs-out", "type": "dimse", "ae_title": "PACS",
                 "host": "127.0.0.1", "port": pacs.port},
                {"name": "down", "type": "dimse", "ae_title": "DOWN", "host": "127.0.0.1",
                 "port": free_port()},
                {"name": "reports", "type": "folder", "path": str(tmp_path / "reports")},
            ],
        }))
        out = cli(config)
        assert out.returncode == 1, out.stderr
        lines = out.stdout.splitlines()
        assert [ln.split()[:3] for ln in lines] == [
            ["ok", "source", "pacs"], ["ok", "destination", "pacs-out"],
            ["FAIL", "destination", "down"], ["ok", "destination", "reports"]]
        assert "C-ECHO succeeded" in lines[0] and "cannot associate" in lines[2]
        assert "connection refused (nothing listens on port" in lines[2]
        assert not (tmp_path / "data").exists()  # a check creates no store

        only = cli(config, "pacs-out", "--json")
        assert only.returncode == 0
        [check] = [json.loads(ln) for ln in only.stdout.splitlines()]
        assert check["role"] == "destination" and check["success"] and check["status"] == 0

        unknown = cli(config, "nope")
        assert unknown.returncode == 2 and "no source or destination named 'nope'" in \
            unknown.stderr

        # A destination added at run time (config API) is checked as the node would use it.
        settings = Settings.model_validate(yaml.safe_load(config.read_text()))
        store = Store(settings.database_url).open()
        try:
            store.put_config_object("destination", "late", {
                "name": "late", "type": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
                "port": pacs.port})
        finally:
            store.close()
        late = cli(config, "late")
        assert late.returncode == 0 and late.stdout.split()[:3] == ["ok", "destination", "late"]


def test_a_port_that_is_not_dicom_fails_in_its_line_only(tmp_path: Path) -> None:
    """A web server where a PACS was expected: the table's FAIL line says so; pynetdicom's
    own lines about the odd answer ('Unknown PDU type received') do not come before it."""
    import http.server
    from urllib.parse import urlsplit

    from tests.support.http_server import loopback_http

    class Web(http.server.BaseHTTPRequestHandler):
        def handle(self) -> None:  # answers anything with HTTP, as a web server would
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with loopback_http(Web, path="") as url:
        port = urlsplit(url).port
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(tmp_path / "data")},
            "destinations": [{"name": "web", "type": "dimse", "ae_title": "PACS",
                              "host": "127.0.0.1", "port": port}]}))
        out = cli(config)
    assert out.returncode == 1
    assert out.stdout.split()[:3] == ["FAIL", "destination", "web"]
    assert f"port {port} takes connections but the peer aborted the association" in out.stdout
    assert "Unknown PDU type" not in out.stderr and "Association Aborted" not in out.stderr


def test_a_folder_destination_on_a_full_disk_fails(tmp_path: Path) -> None:
    """A writable folder on a disk with 0 bytes free was reported "ok": every export there
    failed on its first file."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "share", 4) as share:
        config = tmp_path / "node.yaml"
        config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(tmp_path / "data")},
            "destinations": [{"name": "share", "type": "folder", "path": str(share / "out")}],
        }))
        assert cli(config).returncode == 0  # room to spare: ok
        fill(share, 0)
        out = cli(config)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.split()[:3] == ["FAIL", "destination", "share"]
    assert "the folder's disk is full (" in out.stdout
