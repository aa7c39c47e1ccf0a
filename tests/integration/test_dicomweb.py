"""The DICOMweb client against a real Orthanc (DICOMweb plugin) on loopback."""

from __future__ import annotations

import http.server
import io
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicom_node.dicomweb import (
    BasicAuth,
    BearerAuth,
    DicomWebClient,
    DicomWebError,
    DicomWebNotFound,
    InstanceRef,
)
from dicom_node.errors import InvalidInput, NodeError, NotFound
from tests.support.dicom_factory import (
    SyntheticStudy,
    make_cr_study,
    make_ct_study,
    make_sc_instance,
)
from tests.support.http_server import loopback_http
from tests.support.orthanc import Orthanc, OrthancFactory, orthanc_server
from tests.support.peers import free_port

pytestmark = pytest.mark.peers

CT_SLICES = 20
UNKNOWN_UID = "1.2.826.0.1.3680043.8.498.1"


@dataclass
class LoadedPacs:
    orthanc: Orthanc
    cr: SyntheticStudy
    ct: SyntheticStudy


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPacs]:
    """One Orthanc for the read-only tests, loaded over REST with a CR and a 20-slice CT."""
    src = tmp_path_factory.mktemp("src")
    cr = make_cr_study(src / "cr", seed="dw-cr")
    ct = make_ct_study(src / "ct", seed="dw-ct", slices=CT_SLICES)
    with orthanc_server() as orthanc:
        orthanc.upload([*cr.paths, *ct.paths])
        assert len(orthanc.instances()) == 1 + CT_SLICES
        yield LoadedPacs(orthanc, cr, ct)


@pytest.fixture
def client(pacs: LoadedPacs) -> Iterator[DicomWebClient]:
    with DicomWebClient(pacs.orthanc.dicomweb_url) as c:
        yield c


# ----------------------------------------------------------------------------- QIDO
def test_search_studies_by_study_uid(pacs: LoadedPacs, client: DicomWebClient) -> None:
    found = client.search_studies(study_uid=pacs.ct.study_uid)
    assert len(found) == 1
    study = found[0]
    assert study.study_uid == pacs.ct.study_uid
    assert study.patient_id == pacs.ct.patient_id
    assert study.accession_number == pacs.ct.accession_number
    assert study.modalities == ("CT",)
    assert study.number_of_series == 1
    assert study.number_of_instances == CT_SLICES


def test_search_all_studies(pacs: LoadedPacs, client: DicomWebClient) -> None:
    uids = {s.study_uid for s in client.search_studies()}
    assert uids == {pacs.cr.study_uid, pacs.ct.study_uid}
    assert len(client.search_studies(limit=1)) == 1


def test_search_by_patient_id(pacs: LoadedPacs, client: DicomWebClient) -> None:
    studies = client.search_studies(patient_id=pacs.cr.patient_id)
    assert [s.study_uid for s in studies] == [pacs.cr.study_uid]
    series = client.search_series(patient_id=pacs.cr.patient_id)
    assert [(s.study_uid, s.series_uid, s.modality, s.number_of_instances)
            for s in series] == [(pacs.cr.study_uid, pacs.cr.series_uid, "CR", 1)]


def test_search_by_accession_number(pacs: LoadedPacs, client: DicomWebClient) -> None:
    studies = client.search_studies(accession_number=pacs.ct.accession_number)
    assert [s.study_uid for s in studies] == [pacs.ct.study_uid]
    series = client.search_series(accession_number=pacs.ct.accession_number)
    assert [s.series_uid for s in series] == [pacs.ct.series_uid]
    assert series[0].number_of_instances == CT_SLICES


def test_search_series_and_instances_of_a_study(pacs: LoadedPacs,
                                                client: DicomWebClient) -> None:
    series = client.search_series(study_uid=pacs.ct.study_uid)
    assert [(s.series_uid, s.modality, s.series_number) for s in series] == [
        (pacs.ct.series_uid, "CT", 1)]
    instances = client.search_instances(study_uid=pacs.ct.study_uid,
                                        series_uid=pacs.ct.series_uid)
    assert {i.sop_uid for i in instances} == set(pacs.ct.sop_uids)
    assert {i.series_uid for i in instances} == {pacs.ct.series_uid}
    assert {i.sop_class_uid for i in instances} == {pydicom.uid.CTImageStorage}
    assert sorted(i.instance_number or 0 for i in instances) == list(range(1, CT_SLICES + 1))
    # paged: several requests, same answer
    paged = client.search_instances(study_uid=pacs.ct.study_uid, page_size=7)
    assert {i.sop_uid for i in paged} == set(pacs.ct.sop_uids)
    by_series_key = client.search_instances(series_uid=pacs.ct.series_uid)
    assert {i.sop_uid for i in by_series_key} == set(pacs.ct.sop_uids)


def test_unknown_study_searches_empty(client: DicomWebClient) -> None:
    assert client.search_studies(study_uid=UNKNOWN_UID) == []
    assert client.search_studies(patient_id="NO-SUCH-PATIENT") == []
    assert client.search_series(accession_number="NO-SUCH-ACC") == []


# ----------------------------------------------------------------------------- WADO
def _assert_same_instances(paths: list[Path], study: SyntheticStudy) -> None:
    sources = {pydicom.dcmread(p).SOPInstanceUID: p for p in study.paths}
    assert {p.name for p in paths} == {f"{uid}.dcm" for uid in study.sop_uids}
    for path in paths:
        got = pydicom.dcmread(path)  # a readable Part 10 file
        src = pydicom.dcmread(sources[got.SOPInstanceUID])
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert got.file_meta.MediaStorageSOPInstanceUID == got.SOPInstanceUID
        assert got.StudyInstanceUID == study.study_uid
        assert got.SeriesInstanceUID in study.series_uids
        assert got.PixelData == src.PixelData
        assert np.array_equal(got.pixel_array, src.pixel_array)
        # stored as Orthanc keeps it (the file we uploaded), not parsed and re-encoded
        assert path.read_bytes() == sources[got.SOPInstanceUID].read_bytes()


def test_retrieve_study_streams_to_folder(pacs: LoadedPacs, client: DicomWebClient,
                                          tmp_path: Path) -> None:
    result = client.retrieve_study(pacs.ct.study_uid, tmp_path / "study")
    assert result.ok, result.failed
    assert len(result.succeeded) == CT_SLICES
    assert {o.sop_uid for o in result.outcomes} == set(pacs.ct.sop_uids)
    _assert_same_instances(result.paths, pacs.ct)
    # nothing but the instances: no temporary files left behind
    assert sorted((tmp_path / "study").iterdir()) == sorted(result.paths)



def test_scratch_retrieval_skips_the_fsyncs(pacs: LoadedPacs, client: DicomWebClient,
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A retrieval into a job's scratch (moved on at once, fetched again after a crash)
    writes without fsync; the default keeps every file on disk before it is reported."""
    import os

    import dicom_node.dicomweb as dicomweb_module

    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(dicomweb_module.os, "fsync", counting_fsync)
    scratch = client.retrieve_series(pacs.ct.study_uid, pacs.ct.series_uid, tmp_path / "a",
                                     durable=False)
    assert scratch.ok and len(scratch.succeeded) == CT_SLICES and synced == []
    _assert_same_instances(scratch.paths, pacs.ct)
    durable = client.retrieve_series(pacs.ct.study_uid, pacs.ct.series_uid, tmp_path / "b")
    assert durable.ok and len(synced) == CT_SLICES + 1  # each file, then the folder

def test_retrieve_streams_instead_of_holding_the_study(orthanc: Orthanc,
                                                       tmp_path: Path) -> None:
    """A study much larger than the read chunk never sits in memory whole."""
    big = make_ct_study(tmp_path / "src", seed="big-ct", slices=60, size=256)
    total = sum(p.stat().st_size for p in big.paths)  # ~7.7 MB
    orthanc.upload(big.paths)
    with DicomWebClient(orthanc.dicomweb_url, chunk_size=64 * 1024) as client:
        tracemalloc.start()
        try:
            result = client.retrieve_study(big.study_uid, tmp_path / "out")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result.ok and len(result.paths) == 60
    assert peak < total / 2, (peak, total)


def test_retrieve_series(pacs: LoadedPacs, client: DicomWebClient, tmp_path: Path) -> None:
    result = client.retrieve_series(pacs.cr.study_uid, pacs.cr.series_uid, tmp_path)
    assert result.ok, result.failed
    _assert_same_instances(result.paths, pacs.cr)
    ds = pydicom.dcmread(result.paths[0])
    assert (ds.Rows, ds.Columns, ds.BitsAllocated) == (256, 256, 16)


def test_retrieve_listed_instances_reports_each(pacs: LoadedPacs, client: DicomWebClient,
                                                tmp_path: Path) -> None:
    wanted = [InstanceRef(pacs.ct.study_uid, pacs.ct.series_uid, uid)
              for uid in pacs.ct.sop_uids[:3]]
    missing = InstanceRef(pacs.ct.study_uid, pacs.ct.series_uid, UNKNOWN_UID)
    result = client.retrieve_instances([*wanted, missing], tmp_path)
    assert [o.ok for o in result.outcomes] == [True, True, True, False]
    assert [o.sop_uid for o in result.outcomes] == [*pacs.ct.sop_uids[:3], UNKNOWN_UID]
    assert "404" in (result.outcomes[-1].reason or "")
    for outcome in result.succeeded:
        assert outcome.path is not None
        assert pydicom.dcmread(outcome.path).SOPInstanceUID == outcome.sop_uid


def test_retrieve_unknown_study_is_a_clear_not_found(pacs: LoadedPacs, client: DicomWebClient,
                                                     tmp_path: Path) -> None:
    with pytest.raises(DicomWebNotFound) as info:
        client.retrieve_study(UNKNOWN_UID, tmp_path)
    assert isinstance(info.value, NotFound)
    assert info.value.status == 404
    assert "404" in str(info.value)
    assert UNKNOWN_UID in str(info.value)
    assert pacs.orthanc.url in str(info.value)


# ----------------------------------------------------------------------------- STOW
def test_stow_adds_instance_to_its_study(orthanc: Orthanc, tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "cr", seed="stow-cr")
    orthanc.upload(cr.paths)
    sc = make_sc_instance(tmp_path / "sc", cr, seed="stow-sc")
    sc_uid = pydicom.dcmread(sc).SOPInstanceUID

    with DicomWebClient(orthanc.dicomweb_url) as client:
        result = client.store([sc])
        assert result.ok, result.failed
        assert result.referenced == [sc_uid]
        assert result.requests == 1
        assert orthanc.study_sop_uids(cr.study_uid) == {cr.sop_uids[0], sc_uid}
        study = orthanc.find_study(cr.study_uid)
        assert study is not None and len(study["Series"]) == 2
        # and the node's own QIDO sees the new series
        series = client.search_series(study_uid=cr.study_uid)
        assert {s.modality for s in series} == {"CR", "OT"}


def test_stow_batches_and_reports_unreadable_files(orthanc: Orthanc, tmp_path: Path) -> None:
    ct = make_ct_study(tmp_path / "ct", seed="stow-ct", slices=CT_SLICES)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with DicomWebClient(orthanc.dicomweb_url) as client:
        result = client.store([*ct.paths, junk], batch_size=8)
    assert result.requests == 3
    assert sorted(result.referenced) == sorted(ct.sop_uids)
    assert len(result.failed) == 1
    assert result.failed[0].path == junk
    assert "junk.dcm" in result.failed[0].reason
    assert orthanc.study_sop_uids(ct.study_uid) == set(ct.sop_uids)


# ----------------------------------------------------------------------------- auth
def test_basic_auth(orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    orthanc = orthanc_factory(users={"alice": "s3cret"}, dicom_server=False)
    cr = make_cr_study(tmp_path, seed="auth-cr")
    orthanc.upload(cr.paths)

    with DicomWebClient(orthanc.dicomweb_url, BasicAuth("alice", "s3cret")) as good:
        assert [s.study_uid for s in good.search_studies()] == [cr.study_uid]
        assert good.retrieve_study(cr.study_uid, tmp_path / "out").ok

    for auth in (BasicAuth("alice", "wrong"), None):
        with DicomWebClient(orthanc.dicomweb_url, auth) as bad:
            with pytest.raises(DicomWebError) as info:
                bad.search_studies()
            assert info.value.status == 401
            assert "401" in str(info.value)
            assert orthanc.dicomweb_url in str(info.value)
            assert "wrong" not in str(info.value)
            with pytest.raises(DicomWebError, match="401"):
                bad.retrieve_study(cr.study_uid, tmp_path / "bad")
            with pytest.raises(DicomWebError, match="401"):
                bad.store(cr.paths)


class _FakeServer(http.server.BaseHTTPRequestHandler):
    """A scripted DICOMweb server: records headers, answers every GET with ``body``.

    ``delay`` seconds before answering; ``truncate_at`` bytes of the body sent
    (with the full Content-Length) before the connection is dropped.
    """

    headers_seen: list[dict[str, str]] = []
    delay = 0.0
    body = b"[]"
    content_type = "application/dicom+json"
    truncate_at: int | None = None
    status = 200
    location = ""

    def do_GET(self) -> None:
        type(self).headers_seen.append(dict(self.headers))
        time.sleep(self.delay)
        try:
            self.send_response(self.status)
            if self.location:
                self.send_header("Location", self.location)
            self.send_header("Content-Type", self.content_type)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            self.wfile.write(self.body[: self.truncate_at])
            self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_FakeServer]]]:
    handler = type("Handler", (_FakeServer,), {"headers_seen": []})
    with loopback_http(handler) as url:
        yield url, handler


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    """A WADO-RS multipart answer, encoded by dicomweb-client itself."""
    content_type = 'multipart/related; type="application/dicom"; boundary="b0undary"'
    return DICOMwebClient._encode_multipart_message(parts, content_type), content_type


def test_bearer_token_is_sent(fake_server: tuple[str, type[_FakeServer]]) -> None:
    url, handler = fake_server
    with DicomWebClient(url, BearerAuth("tok.en.value")) as client:
        assert client.search_studies() == []
    assert handler.headers_seen[-1]["Authorization"] == "Bearer tok.en.value"


def test_read_timeout_is_a_dicomweb_error(fake_server: tuple[str, type[_FakeServer]]) -> None:
    url, handler = fake_server
    handler.delay = 3.0
    with DicomWebClient(url, read_timeout_s=0.3, retries=1) as client, \
            pytest.raises(DicomWebError, match="timed out") as info:
        client.search_studies()
    assert url in str(info.value)


def test_a_server_that_is_not_there_is_named_by_the_system_s_reason() -> None:
    """Nothing listens on the port: the error says 'Connection refused' (as the system
    put it), not urllib3's retry wrapper around it with the whole query string."""
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with DicomWebClient(url, retries=1) as client, \
            pytest.raises(DicomWebError) as info:
        client.search_studies()
    message = str(info.value)
    assert message.endswith("(server down, refused or unreachable): Connection refused")
    assert "includefield" not in message and "HTTPConnectionPool" not in message


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_server_cannot_choose_file_names(fake_server: tuple[str, type[_FakeServer]],
                                         tmp_path: Path) -> None:
    """A part whose SOPInstanceUID is a path is refused; the others are written."""
    url, handler = fake_server
    cr = make_cr_study(tmp_path / "src", seed="evil-cr")
    good = cr.paths[0].read_bytes()
    evil = pydicom.dcmread(cr.paths[0])
    evil.SOPInstanceUID = "../../escaped"
    evil.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID("1.2.3")
    buffer = io.BytesIO()
    with pydicom.config.disable_value_validation():
        evil.save_as(buffer)
    handler.body, handler.content_type = _multipart([buffer.getvalue(), good])
    out = tmp_path / "out"
    with DicomWebClient(url) as client:
        result = client.retrieve_study(cr.study_uid, out, expect=[cr.sop_uids[0], "1.2.9"])
    assert [(o.sop_uid, o.ok) for o in result.outcomes] == [
        ("../../escaped", False), (cr.sop_uids[0], True), ("1.2.9", False)]
    assert "SOPInstanceUID" in (result.outcomes[0].reason or "")
    assert "not received" in (result.outcomes[2].reason or "")
    assert [p.name for p in out.iterdir()] == [f"{cr.sop_uids[0]}.dcm"]
    assert not (tmp_path / "escaped.dcm").exists()
    assert handler.headers_seen[-1]["Accept"].count("transfer-syntax=*") == 1


def test_transfer_cut_short_keeps_what_arrived(fake_server: tuple[str, type[_FakeServer]],
                                               tmp_path: Path) -> None:
    url, handler = fake_server
    ct = make_ct_study(tmp_path / "src", seed="cut-ct", slices=4)
    parts = [p.read_bytes() for p in ct.paths]
    handler.body, handler.content_type = _multipart(parts)
    # the first two parts and half of the third arrive, then the connection drops
    handler.truncate_at = len(parts[0]) + len(parts[1]) + len(parts[2]) // 2 + 200
    # read in small chunks: a chunk that never completes is lost with the connection
    with DicomWebClient(url, retries=1, chunk_size=1024) as client:
        result = client.retrieve_series(ct.study_uid, ct.series_uid, tmp_path / "out",
                                        expect=ct.sop_uids)
    assert [o.sop_uid for o in result.succeeded] == ct.sop_uids[:2]
    interrupted = [o for o in result.failed if o.sop_uid is None]
    assert len(interrupted) == 1
    assert "interrupted after 2 instance(s)" in (interrupted[0].reason or "")
    assert {o.sop_uid for o in result.failed if o.sop_uid} == set(ct.sop_uids[2:])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{uid}.dcm" for uid in ct.sop_uids[:2])


def test_parts_without_file_meta_and_bare_answers_are_stored_as_part10(
        fake_server: tuple[str, type[_FakeServer]], tmp_path: Path) -> None:
    """A part that is a bare dataset (no preamble or File Meta Information: not what
    the standard asks) is stored as a Part 10 file; a conformant one byte for byte;
    a single instance sent without the multipart wrapping is taken too."""
    url, handler = fake_server
    ct = make_ct_study(tmp_path / "src", seed="bare-ct", slices=2)
    bare = DicomBytesIO()  # the dataset alone, explicit VR little endian
    bare.is_implicit_VR, bare.is_little_endian = False, True
    write_dataset(bare, pydicom.dcmread(ct.paths[0]))
    assert b"DICM" not in bare.getvalue()[:200]
    handler.body, handler.content_type = _multipart([bare.getvalue(), ct.paths[1].read_bytes()])
    with DicomWebClient(url, retries=1) as client:
        result = client.retrieve_series(ct.study_uid, ct.series_uid, tmp_path / "a")
        assert result.ok and [o.sop_uid for o in result.outcomes] == ct.sop_uids[:2]
        first, second = (o.path for o in result.outcomes)
        assert first is not None and second is not None
        ds = pydicom.dcmread(first)  # force=False: a real Part 10 file now
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.PixelData == pydicom.dcmread(ct.paths[0]).PixelData
        assert second.read_bytes() == ct.paths[1].read_bytes()

        handler.body, handler.content_type = ct.paths[0].read_bytes(), "application/dicom"
        refs = [InstanceRef(ct.study_uid, ct.series_uid, ct.sop_uids[0])]
        one = client.retrieve_instances(refs, tmp_path / "b")
    assert one.ok and one.outcomes[0].path is not None
    assert one.outcomes[0].path.read_bytes() == ct.paths[0].read_bytes()


@pytest.mark.filterwarnings("ignore:message sent by origin server")
@pytest.mark.parametrize("body", [b"<html>proxy error</html>", b'"a string"', b"[1, 2]"])
def test_garbage_answers_are_dicomweb_errors_or_ignored(
        fake_server: tuple[str, type[_FakeServer]], body: bytes, tmp_path: Path) -> None:
    url, handler = fake_server
    handler.body = body
    with DicomWebClient(url, retries=1) as client:
        try:
            assert client.search_studies() == []  # items without a StudyInstanceUID
        except DicomWebError as exc:
            assert url in str(exc)
        with pytest.raises(DicomWebError):
            client.retrieve_study(UNKNOWN_UID, tmp_path)  # not multipart at all


def test_redirects_are_refused(fake_server: tuple[str, type[_FakeServer]],
                               orthanc: Orthanc) -> None:
    """A server cannot send the client to another URL (the SSRF guard checks only ours)."""
    url, handler = fake_server
    handler.status, handler.location = 302, orthanc.dicomweb_url + "/studies"
    with DicomWebClient(url, retries=1) as client, \
            pytest.raises(DicomWebError, match="redirects are not followed") as info:
        client.search_studies()
    assert info.value.status == 302
    assert len(handler.headers_seen) == 1
    with DicomWebClient(url, retries=1, follow_redirects=True) as client:
        assert client.search_studies() == []  # followed to the (empty) Orthanc


def test_wildcards_cannot_widen_a_search(pacs: LoadedPacs, client: DicomWebClient) -> None:
    for value in ("*", "PAT-*", "PAT-dw-c?", "", "  ", "A\\B"):
        with pytest.raises(InvalidInput):
            client.search_studies(patient_id=value)
        with pytest.raises(InvalidInput):
            client.search_series(accession_number=value)
    with pytest.raises(InvalidInput):
        client.search_instances(study_uid="1.2.*")


# ----------------------------------------------------------------------------- down
def test_server_down_is_a_connection_error(orthanc: Orthanc, tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "cr", seed="down-cr")
    url = orthanc.dicomweb_url
    orthanc.stop()
    with DicomWebClient(url, connect_timeout_s=2, retries=1) as client:
        for call in (lambda: client.search_studies(),
                     lambda: client.retrieve_study(cr.study_uid, tmp_path / "out"),
                     lambda: client.retrieve_series(cr.study_uid, cr.series_uid, tmp_path),
                     lambda: client.store(cr.paths)):
            with pytest.raises(DicomWebError) as info:
                call()
            assert "connection" in str(info.value)
            assert url in str(info.value)
            assert info.value.status is None
            assert isinstance(info.value, NodeError)


def test_nothing_listening_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    # with the default retries (3 attempts, backoff): still one clear error
    with DicomWebClient(url, connect_timeout_s=2) as client, \
            pytest.raises(DicomWebError, match="connection"):
        client.search_studies(patient_id="X")
