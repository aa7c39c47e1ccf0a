"""The node's Storage SCP against dcmtk ``storescu`` / ``echoscu`` and pynetdicom clients."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
import structlog.testing
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicom_node import __version__
from dicom_node.config import AETitleSettings
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.store import JobState
from tests.support.node import NODE_AE, RunningNode, node_settings, running_node
from tests.support.peers import PROPOSE_FLAG, dataset_bytes, echoscu, storescu

pytestmark = pytest.mark.peers

TEST_FILES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless (process 14, selection value 1)
    "MR_small_RLE.dcm",
    "JPEG2000.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG-lossy.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",
]


# Ours (tests/support/files): High-Throughput JPEG 2000, which Debian's dcmtk 3.6.7 cannot
# send; pynetdicom sends it.
OWN_FILES = Path(__file__).resolve().parents[1] / "support" / "files"
RAW_ONLY = ["MR_small_htj2k.dcm"]


def sample(name: str) -> Path:
    if (OWN_FILES / name).exists():
        return OWN_FILES / name
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(str(found))


def same_elements(a: Path, b: Path) -> bool:
    """Element-wise equality, ignoring what dcmtk drops on send (trailing padding, group
    lengths)."""

    def elements(p: Path) -> dict[object, object]:
        ds = pydicom.dcmread(p)
        return {e.tag: e.value for e in ds
                if e.tag != 0xFFFCFFFC and e.tag.element != 0}

    return elements(a) == elements(b)


def wait_for(predicate, what: str, limit_s: float = 30.0):  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is truthy; a generous guard, not a timing assertion."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_echo(node: RunningNode) -> None:
    res = echoscu(node.port, NODE_AE)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_node_names_itself_as_dicom_node(node: RunningNode) -> None:
    """Peers log the implementation the association names, and PS3.10 asks each file's
    meta to name the one that wrote it: the node's own, not the toolkit's."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
        assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
        ds = pydicom.dcmread(sample("CT_small.dcm"))
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    rec = node.store.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None
    meta = pydicom.dcmread(rec.path, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME == "DICOMNODE_" + (
        __version__[:6])


@pytest.mark.parametrize(("offered", "accepted"), [
    # one presentation context offering several: explicit VR keeps private elements' VRs
    ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
    # never ask a sender for a lossy copy of what it could send losslessly
    ([JPEGBaseline8Bit, JPEGLosslessSV1], JPEGLosslessSV1),
    ([JPEG2000, RLELossless], RLELossless),
    ([JPEGBaseline8Bit], JPEGBaseline8Bit),  # lossy when that is all there is
])
def test_a_context_offering_several_syntaxes_gets_the_safest(
        node: RunningNode, offered: list[str], accepted: str) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, offered)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [accepted]
    finally:
        assoc.release()


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.6",  # US (retired)
                                       "1.2.840.10008.5.1.4.1.1.5"])  # NM (retired)
def test_a_retired_storage_class_from_an_old_device_is_stored(
        node: RunningNode, sop_class: str) -> None:
    """Ultrasound and NM devices from before 1996 still send the retired classes, which
    pynetdicom leaves out; storescp and Orthanc take them, and so does the node."""
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ae = AE(ae_title="OLDUS")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    rec = node.store.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None and rec.sop_class_uid == sop_class


def test_an_echo_is_one_info_line(tmp_path: Path) -> None:
    """A monitor's C-ECHO every 30 s wrote three info lines each (about 8,600 a day):
    now the association's end alone, counting the echo."""
    with running_node(node_settings(tmp_path / "data")) as rn, \
            structlog.testing.capture_logs() as logs:
        res = echoscu(rn.port, NODE_AE)
        assert res.returncode == 0, res.stdout + res.stderr
        while not any(e["event"] == "association released" for e in logs):
            time.sleep(0.02)  # the node logs the release just after echoscu returns
        info = [e for e in logs if e["log_level"] == "info"
                and e["event"] not in ("DICOM listening", "node started")]
    assert [(e["event"], e.get("echoes")) for e in info] == [("association released", 1)]


def test_each_association_gets_its_own_copy_of_the_contexts(node: RunningNode) -> None:
    """pynetdicom deep-copies the server's contexts per association; ours copies each
    context and its transfer syntax list but shares the (immutable) UIDs, instead of
    validating ~2,200 of them again for every association."""
    import copy

    assert node.node is not None and node.node.scp is not None
    server = node.node.scp._server
    assert server is not None
    original = server.contexts
    copies = copy.deepcopy(original)
    assert len(copies) == len(original) > 100
    for a, b in zip(original, copies, strict=True):
        assert a is not b and vars(a) == vars(b)
        assert a._transfer_syntax is not b._transfer_syntax
        assert a.abstract_syntax is b.abstract_syntax  # shared, not re-validated
    copies[0].context_id = 1
    copies[0]._transfer_syntax.clear()
    assert original[0].context_id is None and original[0]._transfer_syntax
    for _ in range(2):  # two associations in a row, each negotiated from a fresh copy
        assert echoscu(node.port, NODE_AE).returncode == 0


def test_unknown_called_ae_is_rejected(node: RunningNode) -> None:
    res = echoscu(node.port, "NOT_OURS")
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Rejected Permanent" in out and "Service User" in out
    assert "Called AE Title Not Recognized" in out


@pytest.mark.parametrize("name", TEST_FILES)
def test_storescu_instance_is_stored_byte_identical(node: RunningNode, name: str) -> None:
    src = sample(name)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    flag = PROPOSE_FLAG[str(ds.file_meta.TransferSyntaxUID)]
    storescu(node.port, [src], NODE_AE, "MODALITY", flag)
    rec = node.store.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None
    expected = node.settings.studies_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
    assert Path(rec.path) == (expected / f"{ds.SOPInstanceUID}.dcm").resolve()
    stored = pydicom.dcmread(rec.path, stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert rec.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert rec.calling_ae == "MODALITY" and rec.called_ae == NODE_AE
    # storescu re-serialises what it read (padding, lengths), so the bytes it sent are not
    # the file's; every element must still be the same. The raw-sender test below checks
    # that the node keeps the exact bytes it receives.
    assert same_elements(Path(rec.path), src)


class Trickle:
    """A peer's socket on a slow link: it sends 64 KiB every 50 ms (about 1.3 MB/s)."""

    def __init__(self, sock: object) -> None:
        self._sock = sock

    def send(self, data: bytes) -> int:
        time.sleep(0.05)
        return int(self._sock.send(data[:65536]))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_a_slow_sender_of_one_large_pdu_is_not_cut_off_as_idle(tmp_path: Path) -> None:
    """At maximum PDU 0 a sender may send a whole dataset as one PDU; over a slow link
    that PDU took longer than dimse.network_timeout_s, and the node aborted the
    association as idle while its bytes kept coming."""
    import numpy as np

    settings = node_settings(tmp_path / "data", dimse={"network_timeout_s": 1.0})
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.Rows = ds.Columns = 1024  # 2 MiB of pixels: ~1.6 s at that rate
    ds.PixelData = np.zeros((1024, 1024), dtype=np.int16).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    with running_node(settings) as rn:
        ae = AE(ae_title="SLOWLINK")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", rn.port, ae_title=NODE_AE)
        assert assoc.is_established and assoc.acceptor.maximum_length == 0
        assoc.dul.socket.socket = Trickle(assoc.dul.socket.socket)  # type: ignore[union-attr,assignment]
        try:
            assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()
        assert rn.store.get_instance(str(ds.SOPInstanceUID)) is not None


def test_a_deflated_dataset_with_an_empty_element_is_stored(node: RunningNode) -> None:
    """A deflated SR whose empty element lies, in the inflated stream, past the end of
    the compressed file was refused 0xC210 as truncated (the check compared inflated
    offsets with the file's size)."""
    src = sample("reportsi_with_empty_number_tags.dcm")
    storescu(node.port, [src], NODE_AE, "MODALITY", "-xd")  # raises unless Success
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    rec = node.store.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None and rec.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    assert same_elements(Path(rec.path), src)


@pytest.mark.parametrize("name", TEST_FILES + RAW_ONLY)
def test_raw_sender_bytes_are_kept_exactly(
    node: RunningNode, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's chunked sender sends the file's dataset bytes untouched: compare them."""
    src = sample(name)
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(src)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    rec = node.store.get_instance(str(ds.SOPInstanceUID))
    assert rec is not None
    assert dataset_bytes(Path(rec.path)) == dataset_bytes(src)


def synthetic(study: str, series: str, *, rows: int = 8) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "TEST-1"
    ds.PatientName = "Test^Not^Real"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x00" * rows * rows
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_files(tmp: Path, datasets: list[Dataset]) -> list[Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_study_becomes_one_job_on_release(node: RunningNode, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    dss = [synthetic(study, series) for _ in range(5)]
    dss += [synthetic(study, generate_uid()) for _ in range(3)]
    storescu(node.port, write_files(tmp_path / "in", dss), "AI_STUDY", "CT1")
    jobs = wait_for(lambda: node.store.list_jobs(), "a job")
    assert len(jobs) == 1
    job = jobs[0]
    assert job.pipeline == "demo" and job.kind == "dimse"
    assert job.study_instance_uid == study
    assert job.called_ae == "AI_STUDY" and job.calling_ae == "CT1"
    assert sorted(job.input["instances"]) == sorted(str(d.SOPInstanceUID) for d in dss)
    assert "series_instance_uid" not in job.input
    wait_for(lambda: node.store.get_job(job.id).state is JobState.SUCCEEDED, "job done")


def test_series_grouping_completes_on_timeout(node: RunningNode, tmp_path: Path) -> None:
    study = generate_uid()
    s1, s2 = generate_uid(), generate_uid()
    dss = [synthetic(study, s1) for _ in range(2)] + [synthetic(study, s2) for _ in range(3)]
    storescu(node.port, write_files(tmp_path / "in", dss), "AI_SERIES", "CT1")
    jobs = wait_for(lambda: (j := node.store.list_jobs()) and len(j) == 2 and j, "2 jobs")
    by_series = {j.input["series_instance_uid"]: j for j in jobs}
    assert set(by_series) == {s1, s2}
    assert len(by_series[s1].input["instances"]) == 2
    assert len(by_series[s2].input["instances"]) == 3


def test_late_instance_starts_a_new_group(node: RunningNode, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    first = write_files(tmp_path / "a", [synthetic(study, series) for _ in range(2)])
    storescu(node.port, first, "AI_STUDY", "CT1")
    wait_for(lambda: len(node.store.list_jobs()) == 1, "first job")
    late = write_files(tmp_path / "b", [synthetic(study, series)])
    storescu(node.port, late, "AI_STUDY", "CT1")
    jobs = wait_for(lambda: (j := node.store.list_jobs()) and len(j) == 2 and j, "second job")
    sizes = sorted(len(j.input["instances"]) for j in jobs)
    assert sizes == [1, 2]


def test_ae_without_pipelines_just_stores(node: RunningNode, tmp_path: Path) -> None:
    files = write_files(tmp_path, [synthetic(generate_uid(), generate_uid())])
    storescu(node.port, files, NODE_AE, "CT1")
    assert node.store.count_instances() == 1
    time.sleep(0.5)
    assert node.store.list_jobs() == []


# -- bad input ---------------------------------------------------------------------------


def _send_raw(port: int, called: str, sop_class: str, sop_instance: str, data: bytes,
              context_class: str | None = None,
              syntax: str = ExplicitVRLittleEndian) -> int:
    """Send a C-STORE with hand-made dataset bytes on a context for ``syntax``."""
    from io import BytesIO

    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(context_class or sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(data)
        cx = assoc.accepted_contexts[0]
        assoc._reactor_checkpoint.clear()
        try:
            assoc.dimse.send_msg(req, int(cx.context_id))
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None
        return int(rsp.Status)
    finally:
        assoc.release()


def _encoded(ds: Dataset, *, implicit: bool = False) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def test_truncated_dataset_is_refused_c210(node: RunningNode) -> None:
    ds = synthetic(generate_uid(), generate_uid(), rows=64)
    data = _encoded(ds)
    status = _send_raw(node.port, NODE_AE, CTImageStorage, ds.SOPInstanceUID, data[:-1000])
    assert status == 0xC210
    assert node.store.get_instance(ds.SOPInstanceUID) is None
    assert not list(node.settings.studies_dir.rglob("*.dcm"))


@pytest.mark.parametrize("explicit_body", [True, False])
def test_a_dataset_not_encoded_as_its_transfer_syntax_is_refused_c210(
        node: RunningNode, explicit_body: bool) -> None:
    """Explicit VR sent on an implicit VR context (or the reverse): pydicom reads it by
    guessing and only warns, and it was stored unreadable (its file meta says one
    encoding, its body is the other) with a Success. dcmtk and Orthanc refuse it."""
    ds = synthetic(generate_uid(), generate_uid())
    if explicit_body:
        data, syntax = _encoded(ds), ImplicitVRLittleEndian
    else:
        data, syntax = _encoded(ds, implicit=True), ExplicitVRLittleEndian
    with structlog.testing.capture_logs() as logs:
        status = _send_raw(node.port, NODE_AE, CTImageStorage, ds.SOPInstanceUID, data,
                           syntax=syntax)
    assert status == 0xC210
    assert node.store.count_instances() == 0
    assert not list(node.settings.studies_dir.rglob("*.dcm"))
    refused = [e for e in logs if e["event"] == "C-STORE refused"]
    assert refused and "encoded with" in refused[0]["message"], logs


def test_dataset_without_sop_instance_uid_is_refused_c210(node: RunningNode) -> None:
    ds = synthetic(generate_uid(), generate_uid())
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    status = _send_raw(node.port, NODE_AE, CTImageStorage, uid, _encoded(ds))
    assert status == 0xC210
    assert node.store.count_instances() == 0


def test_bad_uid_never_escapes_the_studies_dir(node: RunningNode) -> None:
    ds = synthetic("1.2.3", "../../../../../tmp/evil")
    status = _send_raw(node.port, NODE_AE, CTImageStorage, ds.SOPInstanceUID, _encoded(ds))
    assert status == 0xC210
    assert node.store.count_instances() == 0


def test_wrong_sop_class_for_context_is_refused(node: RunningNode) -> None:
    ds = synthetic(generate_uid(), generate_uid())  # a CT image...
    status = _send_raw(node.port, NODE_AE, CTImageStorage, ds.SOPInstanceUID, _encoded(ds),
                       context_class=MRImageStorage)  # ...on an MR context
    assert status == 0x0122
    assert node.store.count_instances() == 0


def test_peer_abort_mid_instance_keeps_acknowledged(node: RunningNode, tmp_path: Path) -> None:
    from dicom_node.spool import SPOOL_DIR_NAME

    staging = node.settings.studies_dir / SPOOL_DIR_NAME
    study, series = generate_uid(), generate_uid()
    dss = [synthetic(study, series) for _ in range(3)]
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AI_STUDY")
    assert assoc.is_established
    for ds in dss[:2]:
        assert assoc.send_c_store(ds).Status == 0x0000
    # Send only the first P-DATA of the third instance, then abort.
    big = synthetic(study, series, rows=512)
    data = _encoded(big)
    from pynetdicom.pdu_primitives import P_DATA

    pdata = P_DATA()
    cx_id = int(assoc.accepted_contexts[0].context_id)
    command = C_STORE()
    command.MessageID = 9
    command.AffectedSOPClassUID = CTImageStorage
    command.AffectedSOPInstanceUID = big.SOPInstanceUID
    command.Priority = 2
    command.DataSet = __import__("io").BytesIO(data)
    from pynetdicom.dimse_messages import C_STORE_RQ

    msg = C_STORE_RQ()
    msg.primitive_to_message(command)
    parts = list(msg.encode_msg(cx_id, 16384))
    for p in parts[:3]:  # the command and the start of the dataset
        assoc.dul.send_pdu(p)
    del pdata
    time.sleep(0.2)
    assoc.abort()
    # Both acknowledged instances are kept and, after the timeout, become a job.
    for ds in dss[:2]:
        assert node.store.get_instance(ds.SOPInstanceUID) is not None
    assert node.store.get_instance(big.SOPInstanceUID) is None
    jobs = wait_for(lambda: node.store.list_jobs(), "job after abort")
    assert sorted(jobs[0].input["instances"]) == sorted(d.SOPInstanceUID for d in dss[:2])
    # The partial dataset's temp file does not outlive the association.
    assert staging.is_dir() and not list(staging.glob(".*.part"))


def test_odd_called_ae_title_is_rejected(node: RunningNode) -> None:
    ae = AE(ae_title="ODDSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="..;/*?%")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)


def _associate_rq(called: bytes, calling: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU for Verification, built by hand."""
    import struct

    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    ctx = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1")
               + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)))
    fixed = (struct.pack(">HH", 1, 0) + called.ljust(16, b" ")[:16]
             + calling.ljust(16, b" ")[:16] + bytes(32))
    body = fixed + app + ctx + user
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _raw_associate(port: int, called: bytes, calling: bytes = b"RAWSCU") -> bytes:
    """Send an A-ASSOCIATE-RQ built by hand (pynetdicom refuses to send odd AE titles)
    for Verification, and return the first PDU the node answers with."""
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_associate_rq(called, calling))
        header = sock.recv(6)
        length = struct.unpack(">I", header[2:6])[0]
        answer = b""
        while len(answer) < length:
            chunk = sock.recv(length - len(answer))
            if not chunk:
                break
            answer += chunk
    return header + answer


def _held_until_closed(sock: object, limit_s: float = 60.0) -> bytes:
    """What the node sends until it closes the connection; fails when it is still open
    after ``limit_s`` (a generous bound, not a timing: the node's timeouts are 1-2 s)."""
    import socket

    assert isinstance(sock, socket.socket)
    sock.settimeout(limit_s)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the node still holds the connection after {limit_s:g} s")
    return got


def _c_echo_rq() -> bytes:
    """A P-DATA-TF PDU holding a C-ECHO-RQ command on presentation context 1."""
    import struct

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    cmd = Dataset()
    cmd.AffectedSOPClassUID = "1.2.840.10008.1.1"
    cmd.CommandField = 0x0030
    cmd.MessageID = 1
    cmd.CommandDataSetType = 0x0101
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, cmd)
    group = struct.pack("<HHIL", 0, 0, 4, len(body.getvalue())) + body.getvalue()
    pdv = bytes([1, 0x03]) + group  # context 1; command, last fragment
    pdata = struct.pack(">I", len(pdv)) + pdv
    return struct.pack(">BBI", 0x04, 0, len(pdata)) + pdata


def test_connections_that_stall_before_or_within_a_pdu_are_closed(tmp_path: Path) -> None:
    """ARTIM (PS3.8 9.1.5): a connection whose A-ASSOCIATE-RQ has not come whole within
    dimse.acse_timeout_s is closed, with a log line; one that sent only the 6-byte PDU
    header was held for good (its read blocked with no limit: a thread each), and one
    that sent nothing was held for twice the time, silently. A PDU that stalls mid-way
    on an established association ends at dimse.network_timeout_s."""
    import socket
    import struct

    settings = node_settings(tmp_path, dimse={"acse_timeout_s": 1, "network_timeout_s": 5})
    with running_node(settings) as rn, structlog.testing.capture_logs() as logs:
        with socket.create_connection(("127.0.0.1", rn.port)) as sock:  # nothing
            assert _held_until_closed(sock) == b""
        rq = _associate_rq(NODE_AE.encode(), b"RAWSCU")
        with socket.create_connection(("127.0.0.1", rn.port)) as sock:  # a PDU header
            sock.sendall(rq[:6])
            assert _held_until_closed(sock) == b""
        with socket.create_connection(("127.0.0.1", rn.port)) as sock:  # half a PDU
            sock.sendall(rq[: len(rq) // 2])
            assert _held_until_closed(sock) == b""
        with socket.create_connection(("127.0.0.1", rn.port)) as sock:  # a byte at a time
            sock.settimeout(0.3)
            closed_at = None
            for i, byte in enumerate(rq):  # 0.2 s each: whole only after ~40 s
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(1) == b"":
                        closed_at = i
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed_at = i
                    break
            # the whole request must come within the ARTIM time, not each read of it
            assert closed_at is not None and closed_at < len(rq) - 1
        artim = "connection closed: no A-ASSOCIATE-RQ within dimse.acse_timeout_s"
        # logged as the association's thread ends, just after the socket closes
        wait_for(lambda: sum(e["event"] == artim for e in logs) == 4, "4 ARTIM lines")
        with socket.create_connection(("127.0.0.1", rn.port)) as sock:
            sock.settimeout(10)
            sock.sendall(rq)
            header = sock.recv(6, socket.MSG_WAITALL)
            assert header[0] == 0x02  # A-ASSOCIATE-AC
            sock.recv(struct.unpack(">I", header[2:])[0], socket.MSG_WAITALL)
            # A C-ECHO whose PDU pauses past the ARTIM time, within the network timeout:
            # answered (the ARTIM time bounds the A-ASSOCIATE-RQ only).
            echo = _c_echo_rq()
            sock.sendall(echo[:10])
            time.sleep(2)
            sock.sendall(echo[10:])
            assert sock.recv(1) == b"\x04"  # P-DATA-TF: the C-ECHO response
            sock.recv(4096)
            sock.sendall(struct.pack(">BBI", 0x04, 0, 1000) + b"\x00" * 10)  # P-DATA, cut
            _held_until_closed(sock)  # an A-ABORT may come first
        ok = echoscu(rn.port, NODE_AE, "AFTER")
        assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("called", [b"AI\x00\x07", b"A\\B", b"DICOM\nNODE", b"\x1b[31mX"])
def test_called_ae_title_with_odd_bytes_is_rejected(node: RunningNode, called: bytes) -> None:
    """Control characters (a terminal escape too), a backslash: an A-ASSOCIATE-RJ
    (permanent, called AE title not recognised), and the node goes on serving."""
    answer = _raw_associate(node.port, called)
    assert answer[0] == 0x03, answer[:16]  # A-ASSOCIATE-RJ
    result, source, reason = answer[7], answer[8], answer[9]
    assert (result, source, reason) == (1, 1, 7)
    ok = echoscu(node.port, NODE_AE, "AFTER")
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("called", [b" " * 16, b"\xc3\xa9CHO\xff"])
def test_called_ae_title_pynetdicom_cannot_decode_is_aborted(node: RunningNode,
                                                             called: bytes) -> None:
    """Sixteen spaces (no AE title at all) or bytes outside ASCII (the only repertoire
    DICOM allows there): pynetdicom refuses to decode the request and answers A-ABORT;
    the node goes on serving."""
    answer = _raw_associate(node.port, called)
    assert answer[0] == 0x07, answer[:16]
    ok = echoscu(node.port, NODE_AE, "AFTER")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_unknown_calling_ae_rejected_when_configured(tmp_path: Path) -> None:
    from dicom_node.config import SourceSettings

    settings = node_settings(
        tmp_path / "data",
        ae_titles=[AETitleSettings(ae_title="STRICT", sources=["ct1"],
                                   reject_unknown_sources=True)],
        sources=[SourceSettings(name="ct1", ae_title="CT1", host="127.0.0.1")],
    )
    with running_node(settings) as rn:
        ok = echoscu(rn.port, "STRICT", "CT1")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        bad = echoscu(rn.port, "STRICT", "INTRUDER")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr


def test_a_known_calling_ae_from_another_host_is_rejected(tmp_path: Path) -> None:
    """A source is an AE title *and* a host: CT1 is known only from 10.9.9.9, CT2 from
    localhost (a name, resolved), so from loopback CT1 is refused and CT2 accepted."""
    from dicom_node.config import SourceSettings

    settings = node_settings(
        tmp_path / "data",
        ae_titles=[AETitleSettings(ae_title="STRICT", sources=["ct1", "ct2"],
                                   reject_unknown_sources=True)],
        sources=[SourceSettings(name="ct1", ae_title="CT1", host="10.9.9.9"),
                 SourceSettings(name="ct2", ae_title="CT2", host="localhost")],
    )
    with running_node(settings) as rn, structlog.testing.capture_logs() as logs:
        bad = echoscu(rn.port, "STRICT", "CT1")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
        ok = echoscu(rn.port, "STRICT", "CT2")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        intruder = echoscu(rn.port, "STRICT", "INTRUDER")
        assert intruder.returncode != 0
    # the log says which: the right AE title from the wrong machine, or a stranger
    why = [e["why"] for e in logs if e["event"] == "association rejected"]
    assert why == ["CT1 is a source of STRICT from 10.9.9.9, not from 127.0.0.1",
                   "INTRUDER is not among STRICT's sources (CT1@10.9.9.9, CT2@localhost)"]


def test_allowed_and_ignored_sop_classes(tmp_path: Path) -> None:
    settings = node_settings(
        tmp_path / "data",
        ae_titles=[
            AETitleSettings(ae_title="ONLY_MR", allowed_sop_classes=[MRImageStorage]),
            AETitleSettings(ae_title="NO_CT", ignored_sop_classes=[CTImageStorage]),
        ],
    )
    ds = synthetic(generate_uid(), generate_uid())
    with running_node(settings) as rn:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", rn.port, ae_title="ONLY_MR")
        # No context is accepted for CT: the association is refused or has nothing usable.
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
        assoc = ae.associate("127.0.0.1", rn.port, ae_title="NO_CT")
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert rn.store.count_instances() == 0


SIEMENS_CSA_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # a vendor's private storage SOP class


def _private_instance() -> Dataset:
    ds = synthetic(generate_uid(), generate_uid())
    ds.SOPClassUID = SIEMENS_CSA_NON_IMAGE
    ds.file_meta.MediaStorageSOPClassUID = SIEMENS_CSA_NON_IMAGE
    return ds


def _send_private(port: int, called: str, ds: Dataset) -> int | None:
    """C-STORE ``ds`` (a private SOP class) to ``called``; its status, or None when the
    node refused the presentation context."""
    ae = AE(ae_title="SIEMENSCT")
    ae.add_requested_context(SIEMENS_CSA_NON_IMAGE, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        if not any(cx.abstract_syntax == SIEMENS_CSA_NON_IMAGE
                   for cx in assoc.accepted_contexts):
            return None
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_a_private_sop_class_is_taken_when_named(tmp_path: Path) -> None:
    """Modalities send vendor-private objects with their studies. Refused by default,
    with a log line that says what to set; named in allowed_sop_classes it is stored as
    sent, named in ignored_sop_classes it is answered Success and not kept. Keywords
    (CTImageStorage) work where UIDs do."""
    settings = node_settings(
        tmp_path / "data",
        ae_titles=[
            AETitleSettings(ae_title="PLAIN"),
            AETitleSettings(ae_title="KEEP",
                            allowed_sop_classes=["CTImageStorage", SIEMENS_CSA_NON_IMAGE]),
            AETitleSettings(ae_title="DROP", ignored_sop_classes=[SIEMENS_CSA_NON_IMAGE]),
        ],
    )
    with running_node(settings) as rn, structlog.testing.capture_logs() as logs:
        assert _send_private(rn.port, "PLAIN", _private_instance()) is None
        refused = [e for e in logs if e["event"] == "presentation contexts refused"]
        assert refused and refused[0]["sop_classes"] == [SIEMENS_CSA_NON_IMAGE]
        assert refused[0]["reasons"] == ["abstract syntax not supported"]
        # PLAIN lists no classes: naming only this one would refuse its images
        assert "PLAIN's allowed_sop_classes together with every class it should take" in \
            refused[0]["hint"]
        # a class of a service the node does not offer gets no such advice
        finder = AE(ae_title="RIS")
        finder.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        finder.add_requested_context(Verification)
        finder.associate("127.0.0.1", rn.port, ae_title="PLAIN").release()
        last = [e for e in logs if e["event"] == "presentation contexts refused"][-1]
        assert last["calling_ae"] == "RIS" and "hint" not in last

        dropped = _private_instance()
        assert _send_private(rn.port, "DROP", dropped) == 0x0000
        assert rn.store.get_instance(dropped.SOPInstanceUID) is None

        kept = _private_instance()
        assert _send_private(rn.port, "KEEP", kept) == 0x0000
        record = rn.store.get_instance(kept.SOPInstanceUID)
        assert record is not None and record.sop_class_uid == SIEMENS_CSA_NON_IMAGE
        assert pydicom.dcmread(record.path) == kept
        # KEEP takes CT (by keyword) but not MR: its allowed list is a whitelist
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", rn.port, ae_title="KEEP")
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [CTImageStorage]
        assoc.release()


def _store_twice(tmp_path: Path, policy: str,
                 damage: bool = False) -> tuple[bytes, Path, int]:
    """C-STORE one instance twice (the second with another PatientID) to an AE title with
    ``policy``: the first copy's bytes, the file the store points at afterwards, and the
    number of instances stored. ``damage`` empties the first copy's file in between;
    then the record must describe the file that is there."""
    settings = node_settings(
        tmp_path / "data", ae_titles=[AETitleSettings(ae_title="DUP", duplicates=policy)]
    )
    ds = synthetic(generate_uid(), generate_uid())
    with running_node(settings) as rn:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", rn.port, ae_title="DUP")
        assert assoc.send_c_store(ds).Status == 0x0000
        first = Path(rn.store.get_instance(ds.SOPInstanceUID).path).read_bytes()
        if damage:
            Path(rn.store.get_instance(ds.SOPInstanceUID).path).write_bytes(b"")
        ds.PatientID = "CHANGED"
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        record = rn.store.get_instance(ds.SOPInstanceUID)
        if damage:
            assert record.size_bytes == Path(record.path).stat().st_size
            assert record.patient_id == "CHANGED"
        return first, Path(record.path), rn.store.count_instances()


def test_duplicate_policy_keep_first(tmp_path: Path) -> None:
    first, kept, _ = _store_twice(tmp_path, "keep_first")
    assert kept.read_bytes() == first


def test_keep_first_replaces_a_first_copy_that_did_not_survive(tmp_path: Path) -> None:
    """A kept file emptied by a crash (a retrieval's unsynced write) is not "the first
    copy" any more: the new one is stored."""
    _, kept, count = _store_twice(tmp_path, "keep_first", damage=True)
    assert count == 1
    assert pydicom.dcmread(kept).PatientID == "CHANGED"


def test_duplicate_policy_overwrite(tmp_path: Path) -> None:
    _, kept, count = _store_twice(tmp_path, "overwrite")
    assert pydicom.dcmread(kept).PatientID == "CHANGED"  # the second copy replaced the first
    assert count == 1


def test_store_failure_answers_a700_and_keeps_nothing_acknowledged_lost(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = synthetic(generate_uid(), generate_uid())
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.send_c_store(ok).Status == 0x0000
    from sqlalchemy.exc import OperationalError

    def broken(*a: object, **k: object) -> bool:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(node.store, "record_instance", broken)
    bad = synthetic(generate_uid(), generate_uid())
    assert assoc.send_c_store(bad).Status == 0xA700
    assoc.release()
    monkeypatch.undo()
    assert node.store.get_instance(ok.SOPInstanceUID) is not None


def test_the_free_space_reserve_holds_within_an_association(tmp_path: Path) -> None:
    """storage.min_free_mb was checked only when an association opened: one association
    of a large study began above the reserve and wrote the disk full, the store's with
    it. Each instance under the reserve now gets 0xA700 (nothing of it kept), logged
    once; once there is room again, the same association goes on."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 40) as disk:
        settings = node_settings(disk / "data", min_free_mb=10)
        with running_node(settings) as rn, structlog.testing.capture_logs() as logs:
            study, series = generate_uid(), generate_uid()
            sent = [synthetic(study, series) for _ in range(4)]
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", rn.port, ae_title=NODE_AE)
            assert assoc.is_established
            try:
                assert assoc.send_c_store(sent[0]).Status == 0x0000
                filler = fill(disk, 6 << 20)  # the association is open: under the reserve
                assert [assoc.send_c_store(ds).Status for ds in sent[1:3]] == [0xA700, 0xA700]
                filler.unlink()
                assert assoc.send_c_store(sent[3]).Status == 0x0000
            finally:
                assoc.release()
            kept = [rn.store.get_instance(str(ds.SOPInstanceUID)) is not None for ds in sent]
            assert kept == [True, False, False, True]
            assert not list((disk / "data" / "studies" / ".incoming").glob("*"))
    refused = [e for e in logs if e["event"] == "C-STORE refused"]
    assert len(refused) == 1 and "storage.min_free_mb (10 MB)" in refused[0]["message"]
    ended = [e for e in logs if e["event"] == "association released"]
    assert ended and ended[-1]["refused_out_of_space"] == 2


def test_under_the_reserve_an_echo_is_answered_and_a_store_association_refused(
        tmp_path: Path) -> None:
    """A PACS's "test connection" (C-ECHO alone writes nothing) failed while the disk was
    under the reserve, which read as a network fault; an association that may store is
    still refused."""
    from tests.support.disk import fill, small_disk

    with small_disk(tmp_path / "disk", 40) as disk, \
            running_node(node_settings(disk / "data", min_free_mb=10)) as rn:
        fill(disk, 6 << 20)
        echo = AE(ae_title="PACS")
        echo.add_requested_context(Verification)
        assoc = echo.associate("127.0.0.1", rn.port, ae_title=NODE_AE)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        store = AE(ae_title="PACS")
        store.add_requested_context(Verification)
        store.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = store.associate("127.0.0.1", rn.port, ae_title=NODE_AE)
        assert assoc.is_rejected


def test_hundred_associations_at_once_only_25_accepted(node: RunningNode) -> None:
    results: list[tuple[bool, tuple[int, int, int] | None]] = []
    lock = threading.Lock()
    hold = threading.Event()

    def one() -> None:
        ae = AE(ae_title="MANY")
        ae.add_requested_context(Verification)
        ae.acse_timeout = 60
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        rj = None
        if assoc.is_rejected:
            p = assoc.acceptor.primitive
            rj = (int(p.result), int(p.result_source), int(p.diagnostic))
        with lock:
            results.append((assoc.is_established, rj))
        if assoc.is_established:
            hold.wait(60)
            assoc.release()

    threads = [threading.Thread(target=one) for _ in range(100)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) == 100, "100 association attempts", 120)
    hold.set()
    for t in threads:
        t.join(60)
    accepted = sum(1 for ok, _ in results if ok)
    rejected = [rj for ok, rj in results if not ok]
    assert accepted == 25
    assert len(rejected) == 75
    # The node's own count is the authority: it sent 75 A-ASSOCIATE-RJ (logged with the
    # reason). A pynetdicom requestor thread that looks only after its DUL thread has
    # handled the RJ and closed the socket takes it for a failed connect (seen once in
    # CI under this burst on 2 cores): such a client reads None, never another reason.
    assert node.node is not None and node.node.scp is not None
    assert node.node.scp.counters().associations.get("rejected") == 75
    assert all(rj in ((2, 3, 2), None) for rj in rejected), sorted(map(str, rejected))
    assert sum(rj == (2, 3, 2) for rj in rejected) >= 60  # transient, local limit
