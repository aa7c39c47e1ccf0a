"""A job's WADO-RS retrieval (dicom_node.retrieve) against a loopback HTTP server that
answers with chosen multipart bodies: what the node's writer refuses is a failed
instance of the study, the rest reaches the job with the headers already read."""

from __future__ import annotations

import http.server
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from dicom_node.config import Settings
from dicom_node.retrieve import Retriever, Target
from dicom_node.scp import InstanceWriter
from dicom_node.store import Store
from tests.support.dicom_factory import make_ct_study
from tests.support.http_server import loopback_http

CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary="b0undary"'


class _Answer(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Answer]]]:
    handler = type("Handler", (_Answer,), {})
    with loopback_http(handler) as url:
        yield url, handler


def test_a_part_cut_short_is_a_failed_instance_and_the_rest_arrive_read(
        server: tuple[str, type[_Answer]], tmp_path: Path) -> None:
    url, handler = server
    ct = make_ct_study(tmp_path / "src", seed="cut-part", slices=3)
    parts = [p.read_bytes() for p in ct.paths]
    parts[1] = parts[1][:-100]  # its header is whole, its pixels are not
    handler.body = DICOMwebClient._encode_multipart_message(parts, CONTENT_TYPE)
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "models": [], "pipelines": [], "watch": []})
    store = Store(f"sqlite:///{tmp_path / 'node.db'}").open()
    node: Any = SimpleNamespace(settings=settings,
                                instance_writer=lambda: InstanceWriter(settings, store))
    ctx: Any = SimpleNamespace(work_dir=tmp_path / "work")
    try:
        fetched = Retriever(node, ctx)._fetch_web(
            {"interface": "DICOMweb", "uri": url}, Target(ct.study_uid, ct.series_uid))
        assert fetched.failed == 1 and fetched.failed_instances == [ct.sop_uids[1]]
        assert [p.name for p in fetched.paths] == [f"{ct.sop_uids[0]}.dcm",
                                                   f"{ct.sop_uids[2]}.dcm"]
        assert store.get_instance(ct.sop_uids[1]) is None
        # what the job reads next: the headers, naming the stored files
        assert all(isinstance(s, Dataset) for s in fetched.sources)
        assert [Path(s.filename) for s in fetched.sources] == fetched.paths
        assert fetched.paths[0].read_bytes() == ct.paths[0].read_bytes()

        handler.body = DICOMwebClient._encode_multipart_message([parts[1]], CONTENT_TYPE)
        nothing = Retriever(node, ctx)._fetch_web(
            {"interface": "DICOMweb", "uri": url}, Target(ct.study_uid, ct.series_uid))
        assert nothing.paths == [] and nothing.failed == 1
        assert "nothing usable arrived" in nothing.message
        assert "truncated" in nothing.message
    finally:
        store.close()
