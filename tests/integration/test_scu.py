"""The node's DICOM client against dcmtk ``storescp`` and ``dcmqrscp``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pydicom
import pytest
import structlog
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_node.config import DestinationSettings, RetrySettings, SourceSettings
from dicom_node.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicom_node.logs import configure_logging
from dicom_node.scheduler import ExportOutcome
from dicom_node.scu import GET_STORAGE_CLASSES, DicomClient, Peer, Query, QueryLevel
from tests.integration.test_scp import Trickle, synthetic, write_files
from tests.support.node import NODE_AE, RunningNode, node_settings
from tests.support.orthanc import orthanc_server
from tests.support.peers import dcmqrscp, free_port, storescp, storescu
from tests.unit.dicom_node.test_logs import restore_logging  # noqa: F401 (a fixture)

pytestmark = pytest.mark.peers

FILES = ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"]


def sample(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return Path(str(found))


def destination(port: int, ae: str = "STORESCP", **retry: float) -> DestinationSettings:
    return DestinationSettings(
        name="pacs", type="dimse", ae_title=ae, host="127.0.0.1", port=port,
        retry=RetrySettings(**{"max_attempts": 3, "backoff_s": 0.5, **retry}),
    )


def test_export_keeps_each_objects_transfer_syntax(node: RunningNode, tmp_path: Path) -> None:
    files = [sample(n) for n in FILES]
    with storescp(tmp_path / "out", "STORESCP", "+xa", "+B") as peer:
        client = DicomClient(node.settings)
        result = client.export(destination(peer.port), files)
        assert result.ok, result.message
        assert result.attempts == 1 and len(result.sent) == len(files)
        outcome = result.to_outcome()
        assert isinstance(outcome, ExportOutcome) and outcome.ok and outcome.sent == len(files)
    received = {pydicom.dcmread(p).SOPInstanceUID: p for p in (tmp_path / "out").iterdir()}
    for f in files:
        src = pydicom.dcmread(f)
        got = pydicom.dcmread(received[src.SOPInstanceUID])
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert got.PixelData == src.PixelData


def test_export_decompresses_for_an_uncompressed_only_peer(
    node: RunningNode, tmp_path: Path
) -> None:
    src = sample("MR_small_RLE.dcm")
    with storescp(tmp_path / "out") as peer:  # dcmtk's default: uncompressed only
        result = DicomClient(node.settings).export(destination(peer.port), [src])
    assert result.ok, result.message
    (got,) = list((tmp_path / "out").iterdir())
    ds = pydicom.dcmread(got)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    assert (ds.pixel_array == pydicom.dcmread(src).pixel_array).all()


def test_export_to_a_destination_that_is_down_fails_with_backoff(node: RunningNode) -> None:
    slept: list[float] = []
    client = DicomClient(node.settings, sleep=slept.append)
    result = client.export(destination(free_port(), backoff_s=1.0), [sample("CT_small.dcm")])
    assert not result.ok
    assert result.attempts == 3
    assert slept == [1.0, 2.0]  # exponential backoff between attempts
    assert "cannot associate" in result.message
    assert result.failures and result.failures[0].status is None
    assert result.to_outcome().ok is False


def test_export_to_a_refusing_destination(node: RunningNode, tmp_path: Path) -> None:
    # The node's own SCP is the refusing peer: it does not know this called AE title.
    slept: list[float] = []
    result = DicomClient(node.settings, sleep=slept.append).export(
        destination(node.port, ae="NOBODY", max_attempts=2), [sample("CT_small.dcm")]
    )
    assert not result.ok
    assert ("rejected the association: rejected-permanent, service-user, called AE title "
            "not recognised") in result.message
    assert result.attempts == 1 and slept == []  # a permanent rejection is not retried


def test_export_unreadable_file_fails_only_itself(node: RunningNode, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with storescp(tmp_path / "out") as peer:
        result = DicomClient(node.settings).export(
            destination(peer.port), [junk, sample("CT_small.dcm")]
        )
    assert not result.ok
    assert len(result.sent) == 1
    assert [f.sop_instance_uid for f in result.failures] == [str(junk)]


def test_echo(node: RunningNode, tmp_path: Path) -> None:
    client = DicomClient(node.settings)
    with storescp(tmp_path / "out") as peer:
        assert client.echo(Peer("STORESCP", "127.0.0.1", peer.port)).ok
    down = client.echo(Peer("STORESCP", "127.0.0.1", free_port()))
    assert not down.ok and down.message


def test_requests_name_the_node_as_their_implementation(node: RunningNode) -> None:
    """The peer's log shows which implementation asked: the node's, not pynetdicom's."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    seen: list[tuple[str, str | None]] = []

    def on_echo(event: evt.Event) -> int:
        requestor = event.assoc.requestor
        seen.append((requestor.implementation_class_uid, requestor.implementation_version_name))
        return 0

    ae = AE("PEER")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
    try:
        assert DicomClient(node.settings).echo(Peer("PEER", "127.0.0.1", port)).ok
    finally:
        server.shutdown()
    assert seen == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)]


# -- retrieval from dcmqrscp -------------------------------------------------------------


@pytest.fixture
def archive(node: RunningNode, tmp_path: Path):  # type: ignore[no-untyped-def]
    """dcmqrscp holding one study of 2 series (3 + 2 instances) plus CT_small."""
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    dss = [synthetic(study, s1) for _ in range(3)] + [synthetic(study, s2) for _ in range(2)]
    for i, ds in enumerate(dss):
        ds.AccessionNumber = "ACC42"
        ds.InstanceNumber = i + 1
    files = write_files(tmp_path / "src", dss)
    with dcmqrscp(tmp_path / "qr", "QRSCP", {NODE_AE: ("127.0.0.1", node.port)}) as qr:
        storescu(qr.port, [*files, sample("CT_small.dcm")], "QRSCP", "LOADER")
        qr.study = study  # type: ignore[attr-defined]
        qr.series = (s1, s2)  # type: ignore[attr-defined]
        qr.datasets = dss  # type: ignore[attr-defined]
        yield qr


def source(port: int, retrieve: str = "c-move") -> SourceSettings:
    return SourceSettings(name="pacs", ae_title="QRSCP", host="127.0.0.1", port=port,
                          retrieve=retrieve)  # type: ignore[arg-type]


def client_for(node: RunningNode) -> DicomClient:
    assert node.node is not None
    return DicomClient(node.settings, node.store, node.node.scp)


def test_find_at_each_level(node: RunningNode, archive) -> None:  # type: ignore[no-untyped-def]
    client = client_for(node)
    src = source(archive.port)
    studies = client.find(src, Query(QueryLevel.STUDY, accession_number="ACC42"))
    assert studies.ok, studies.message
    assert [m.StudyInstanceUID for m in studies.matches] == [archive.study]
    by_patient = client.find(src, Query(QueryLevel.STUDY, patient_id="TEST-1"))
    assert [m.StudyInstanceUID for m in by_patient.matches] == [archive.study]
    series = client.find(src, Query(QueryLevel.SERIES, study_instance_uid=archive.study))
    assert sorted(m.SeriesInstanceUID for m in series.matches) == sorted(archive.series)
    images = client.find(src, Query(QueryLevel.IMAGE, study_instance_uid=archive.study,
                                    series_instance_uid=archive.series[0]))
    assert len(images.matches) == 3


def test_query_validation_names_the_parameter() -> None:
    from dicom_node.errors import InvalidInput

    with pytest.raises(InvalidInput, match="study_instance_uid"):
        Query(QueryLevel.SERIES, patient_id="X")
    with pytest.raises(InvalidInput, match="series_instance_uid"):
        Query(QueryLevel.IMAGE, study_instance_uid="1.2")
    with pytest.raises(InvalidInput, match="study_instance_uid is not a valid UID"):
        Query(QueryLevel.STUDY, study_instance_uid="1.2/../x")


def test_move_study_lands_in_store(node: RunningNode, archive) -> None:  # type: ignore[no-untyped-def]
    client = client_for(node)
    result = client.retrieve(source(archive.port),
                             Query(QueryLevel.STUDY, study_instance_uid=archive.study))
    assert result.ok, result.message
    assert result.method == "c-move" and result.completed == 5
    uids = sorted(r.sop_instance_uid for r in result.received)
    assert uids == sorted(d.SOPInstanceUID for d in archive.datasets)
    for uid in uids:
        rec = node.store.get_instance(uid)
        assert rec is not None and rec.source == "retrieve" and Path(rec.path).is_file()
    assert node.store.list_jobs() == []  # retrieved instances make no DIMSE job


def test_move_series_partial_failure_is_reported_per_instance(
    node: RunningNode, archive, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    assert node.node is not None and node.node.scp is not None
    writer = node.node.scp.writer
    bad = archive.datasets[1].SOPInstanceUID
    real = writer.keep

    def failing(parsed, **kw):  # type: ignore[no-untyped-def]
        if parsed.sop_instance_uid == bad:
            raise OSError(28, "No space left on device")
        return real(parsed, **kw)

    monkeypatch.setattr(writer, "keep", failing)
    result = client_for(node).move(
        Peer.from_settings(source(archive.port)),
        Query(QueryLevel.SERIES, study_instance_uid=archive.study,
              series_instance_uid=archive.series[0]),
    )
    assert not result.ok
    assert result.completed == 2 and result.failed == 1
    assert [f.sop_instance_uid for f in result.failures] == [bad]
    assert len(result.received) == 2


def test_two_moves_from_one_pacs_at_once_each_get_their_own(
    node: RunningNode, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """The PACS names each C-MOVE's message ID in its C-STOREs; two retrievals from the
    same PACS in flight together (several job workers) do not take each other's."""
    import threading

    studies = {generate_uid(): [] for _ in range(2)}
    dss = []
    for study, mine in studies.items():
        series = generate_uid()
        for _ in range(12):
            ds = synthetic(study, series, rows=64)
            mine.append(str(ds.SOPInstanceUID))
            dss.append(ds)
    files = write_files(tmp_path / "src", dss)
    with dcmqrscp(tmp_path / "qr", "QRSCP", {NODE_AE: ("127.0.0.1", node.port)}) as qr:
        storescu(qr.port, files, "QRSCP", "LOADER")
        results: dict[str, object] = {}
        start = threading.Barrier(len(studies))

        def move(study: str) -> None:
            start.wait()
            results[study] = client_for(node).retrieve(
                source(qr.port), Query(QueryLevel.STUDY, study_instance_uid=study))

        threads = [threading.Thread(target=move, args=(s,)) for s in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for study, mine in studies.items():
        result = results[study]
        assert result.ok, result.message  # type: ignore[attr-defined]
        got = sorted(r.sop_instance_uid for r in result.received)  # type: ignore[attr-defined]
        assert got == sorted(mine)


def test_get_study(node: RunningNode, archive) -> None:  # type: ignore[no-untyped-def]
    result = client_for(node).retrieve(
        source(archive.port, "c-get"), Query(QueryLevel.STUDY, study_instance_uid=archive.study)
    )
    assert result.ok, result.message
    assert result.method == "c-get" and result.completed == 5
    for r in result.received:
        rec = node.store.get_instance(r.sop_instance_uid)
        assert rec is not None and rec.source == "retrieve"


def test_get_brings_storage_classes_beyond_the_common_images(
    node: RunningNode, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """C-GET offers the usual storage classes, not only radiology's everyday ones: a study
    with a multi-frame grayscale word secondary capture and an RT plan comes back whole."""
    study, series = generate_uid(), generate_uid()
    kinds = ["1.2.840.10008.5.1.4.1.1.7.3",  # multi-frame grayscale word SC
             "1.2.840.10008.5.1.4.1.1.481.5"]  # RT plan
    dss = []
    for sop_class in kinds:
        ds = synthetic(study, series)
        ds.SOPClassUID = sop_class
        dss.append(ds)
    files = write_files(tmp_path / "src", dss)
    with dcmqrscp(tmp_path / "qr", "QRSCP", {NODE_AE: ("127.0.0.1", node.port)}) as qr:
        storescu(qr.port, files, "QRSCP", "LOADER")
        result = client_for(node).retrieve(
            source(qr.port, "c-get"), Query(QueryLevel.STUDY, study_instance_uid=study))
    assert result.ok, result.message
    assert sorted(r.sop_instance_uid for r in result.received) == sorted(
        str(d.SOPInstanceUID) for d in dss)


def test_get_single_instance(node: RunningNode, archive) -> None:  # type: ignore[no-untyped-def]
    ds = archive.datasets[4]
    result = client_for(node).get(
        Peer.from_settings(source(archive.port)),
        Query(QueryLevel.IMAGE, study_instance_uid=archive.study,
              series_instance_uid=archive.series[1], sop_instance_uid=ds.SOPInstanceUID),
    )
    assert result.ok, result.message
    assert [r.sop_instance_uid for r in result.received] == [ds.SOPInstanceUID]


def test_retrieve_from_a_source_that_is_down(node: RunningNode) -> None:
    result = client_for(node).retrieve(source(free_port()),
                                       Query(QueryLevel.STUDY, study_instance_uid="1.2.3"))
    assert not result.ok and "cannot" in result.message


def test_export_retries_out_of_resources_then_succeeds(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's own SCP answers 0xA700 once (disk full), then accepts: one retry."""
    assert node.node is not None and node.node.scp is not None
    writer = node.node.scp.writer
    real = writer.keep
    calls: list[str] = []

    def flaky(parsed, **kw):  # type: ignore[no-untyped-def]
        calls.append(parsed.sop_instance_uid)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(parsed, **kw)

    monkeypatch.setattr(writer, "keep", flaky)
    slept: list[float] = []
    src = sample("CT_small.dcm")
    result = DicomClient(node.settings, sleep=slept.append).export(
        destination(node.port, ae=NODE_AE, backoff_s=0.25), [src]
    )
    assert result.ok, result.message
    assert result.attempts == 2 and slept == [0.25]
    assert node.store.get_instance(pydicom.dcmread(src).SOPInstanceUID) is not None


def test_export_permanent_failure_status_is_reported_per_instance(
    node: RunningNode, tmp_path: Path
) -> None:
    """An instance the peer cannot understand (0xC210) fails alone and is not retried."""
    good = sample("CT_small.dcm")
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3.not-a-uid"  # the node refuses it: 0xC210
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    slept: list[float] = []
    result = DicomClient(node.settings, sleep=slept.append).export(
        destination(node.port, ae=NODE_AE), [bad, good]
    )
    assert not result.ok
    assert result.attempts == 1 and slept == []
    assert result.sent == [str(pydicom.dcmread(good).SOPInstanceUID)]
    assert [(f.sop_instance_uid, f.status) for f in result.failures] == [
        (str(ds.SOPInstanceUID), 0xC210)]


def test_associations_ack_at_once_and_send_without_nagle(node: RunningNode) -> None:
    """Both ends of the node's associations: Nagle's algorithm off (pynetdicom writes a
    message's command and dataset as separate PDUs, and the second would wait for a
    delayed ACK) and the socket that acknowledges each read at once."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    client = DicomClient(node.settings)
    ae = AE(ae_title="NODESCU")
    ae.add_requested_context(Verification)
    assoc, error = client._associate(ae, Peer(NODE_AE, "127.0.0.1", node.port))
    assert assoc is not None, error
    try:
        ours = assoc.dul.socket
        assert type(ours).__name__ == "_TunedSocket"
        assert ours.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert node.node is not None and node.node.scp is not None
        server = node.node.scp._server
        assert server is not None
        accepted = [a for a in server.active_associations if a.is_established]
        assert accepted, "the node's side of the association"
        theirs = accepted[0].dul.socket
        assert type(theirs).__name__ == "_TunedSocket"
        assert theirs.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _eventfds() -> int:
    import contextlib
    import os

    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while listing
            count += os.readlink(fd) == "anon_inode:[eventfd]"
    return count


def _voluntary_switches(thread_id: int) -> int:
    status = Path(f"/proc/self/task/{thread_id}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("voluntary_ctxt_switches"))
    return int(line.split()[1])


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_association_threads_sleep_until_woken(node: RunningNode) -> None:
    """The DUL threads of both ends wait for data or for a primitive to send, and the
    node's association thread for a message, a release or an abort, instead of polling
    every millisecond (a polling thread takes the interpreter lock from the one handling
    a message); the eventfds that wake the DUL threads close with their associations."""
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    before = _eventfds()
    client = DicomClient(node.settings)
    ae = AE(ae_title="NODESCU")
    ae.add_requested_context(Verification)
    for _ in range(5):
        assoc, error = client._associate(ae, Peer(NODE_AE, "127.0.0.1", node.port))
        assert assoc is not None, error
        try:
            assert _eventfds() >= before + 2  # one for each end
            # woken to send each request and each response: every echo is answered
            assert all(assoc.send_c_echo().Status == 0x0000 for _ in range(20))
            assert node.node is not None and node.node.scp is not None
            server = node.node.scp._server
            assert server is not None
            theirs = next(a for a in server.active_associations if a.is_established)
            # both DUL threads, and the node's association thread waiting for messages
            threads = [assoc.dul.native_id, theirs.dul.native_id, theirs.native_id]
            assert all(t is not None for t in threads)
            start = [_voluntary_switches(t) for t in threads if t is not None]
            time.sleep(0.5)
            woke = [_voluntary_switches(t) - s
                    for t, s in zip(threads, start, strict=True) if t is not None]
            # polling: ~500 each in half a second; waiting: ~25 (the 20 ms upper bound)
            assert max(woke) < 150, woke
        finally:
            assoc.release()
    for _ in range(200):  # the acceptor's threads finish just after the release
        if _eventfds() <= before:
            break
        time.sleep(0.01)
    assert _eventfds() <= before


def test_associations_work_without_eventfd(node: RunningNode,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no eventfd (not Linux) the DUL threads poll the socket as before."""
    import os

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    monkeypatch.delattr(os, "eventfd", raising=False)
    ae = AE(ae_title="NODESCU")
    ae.add_requested_context(Verification)
    assoc, error = DicomClient(node.settings)._associate(
        ae, Peer(NODE_AE, "127.0.0.1", node.port))
    assert assoc is not None, error
    try:
        assert type(assoc.dul.socket).__name__ == "_TunedSocket"
        assert assoc.dul.socket._wakeup is None
        assert all(assoc.send_c_echo().Status == 0x0000 for _ in range(5))
    finally:
        assoc.release()


def test_move_cut_off_by_the_pacs_keeps_what_came_and_says_so(node: RunningNode) -> None:
    """A Q/R SCP (pynetdicom's, standing in for a PACS that crashes) sends one of three
    instances and then aborts the association: no final status, the one instance kept."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelMove,
    )

    study, series = generate_uid(), generate_uid()
    datasets = [synthetic(study, series) for _ in range(3)]
    sent = threading.Event()

    def on_move(event: evt.Event):  # type: ignore[no-untyped-def]
        yield "127.0.0.1", node.port
        yield len(datasets)
        yield 0xFF00, datasets[0]
        sent.set()
        event.assoc.abort()

    ae = AE("QRSCP")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(CTImageStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_MOVE, on_move)])
    try:
        result = client_for(node).retrieve(
            source(port), Query(QueryLevel.STUDY, study_instance_uid=study))
    finally:
        server.shutdown()
    assert sent.is_set()
    assert not result.ok and result.status is None
    assert "no final response" in result.message
    assert [r.sop_instance_uid for r in result.received] == [datasets[0].SOPInstanceUID]


def test_move_from_a_pacs_that_does_not_know_the_node_says_what_to_register(
        node: RunningNode, orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Orthanc aborts a C-MOVE to a destination it does not know: the message says the
    PACS aborted and what to register on it, not only "no final response"."""
    pacs = orthanc_factory()  # no modalities: the node's AE title is unknown to it
    study = generate_uid()
    paths = write_files(tmp_path, [synthetic(study, generate_uid())])
    pacs.upload(paths)
    peer = SourceSettings(name="pacs", ae_title=pacs.aet, host="127.0.0.1",
                          port=pacs.dicom_port)
    result = client_for(node).retrieve(peer, Query(QueryLevel.STUDY, study_instance_uid=study))
    assert not result.ok
    assert "it aborted the association" in result.message, result.message
    assert f"register {node.settings.dimse.ae_title}" in result.message


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("restore_logging")
def test_pynetdicom_lines_about_an_export_carry_the_job_and_the_peer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """pynetdicom logs a refused connection from the association's own thread, which
    does not inherit the job's context variables: its line names the job all the same."""
    configure_logging("info", fmt="json")
    client = DicomClient(node_settings(tmp_path / "data"))
    with structlog.contextvars.bound_contextvars(job_id="job-42"):
        result = client.export(destination(free_port(), max_attempts=1),
                               [sample("CT_small.dcm")])
    assert not result.ok
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    refused = [x for x in lines if "unable to connect" in x["event"]
               or "TCP Initialisation Error" in x["event"]]
    assert refused, lines
    for line in refused:
        assert line.get("job_id") == "job-42", line
        assert str(line.get("peer", "")).startswith("pacs(STORESCP@127.0.0.1:"), line



@pytest.mark.timeout(120)
@pytest.mark.parametrize("level", [QueryLevel.STUDY, QueryLevel.SERIES])
def test_get_offers_the_classes_a_find_reports_beyond_the_usual_list(
    node: RunningNode, tmp_path: Path, level: QueryLevel,
) -> None:
    """A study holding a class the usual C-GET list lacks (a parametric map) comes back
    whole from Orthanc: the C-FIND before the C-GET names its class (SOP Classes in
    Study, or each instance's SOP Class UID), which is offered first. (A private class
    is offered the same way; Orthanc 1.10 accepts its context but does not grant the
    SCP role for it, so it cannot serve as the test's peer for one.)"""
    private = "1.2.840.10008.5.1.4.1.1.30"  # parametric map
    assert private not in GET_STORAGE_CLASSES
    study, series = generate_uid(), generate_uid()
    dss = [synthetic(study, series) for _ in range(2)]
    dss[1].SOPClassUID = private
    if "file_meta" in dir(dss[1]):
        dss[1].file_meta.MediaStorageSOPClassUID = private
    files = write_files(tmp_path / "src", dss)
    with orthanc_server(modalities={"NODE": (NODE_AE, "127.0.0.1", node.port)},
                        extra={"DicomAlwaysAllowGet": True}) as pacs:
        pacs.upload(files)
        peer = source(pacs.dicom_port, "c-get")
        result = client_for(node).retrieve(
            peer, Query(level, study_instance_uid=study,
                        series_instance_uid=series if level is QueryLevel.SERIES else None))
    assert result.ok, result.message
    assert sorted(r.sop_instance_uid for r in result.received) == sorted(
        str(d.SOPInstanceUID) for d in dss)


# -- which C-STOREs are a C-MOVE's sub-operations (PS3.7 C.4.2) --------------------------


@contextlib.contextmanager
def _fake_pacs(on_move=None, on_get=None):  # type: ignore[no-untyped-def]
    """A Q/R SCP (pynetdicom's, AE title QRSCP) whose C-MOVE handler is ``on_move`` or
    C-GET handler ``on_get``; yields its port."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        CTImageStorage,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    ae = AE("QRSCP")
    if on_get is None:
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage)
        handler = (evt.EVT_C_MOVE, on_move)
    else:  # the instances go back on the C-GET's association: the SCP takes both roles
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        handler = (evt.EVT_C_GET, on_get)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[handler])
    try:
        yield port
    finally:
        server.shutdown()


def _push(port: int, calling: str, datasets, *, originator_aet: str | None = None,  # type: ignore[no-untyped-def]
          originator_id: int | None = None) -> list[int]:
    """C-STORE ``datasets`` to the node's own AE title from ``calling``, with the Move
    Originator attributes given; the statuses."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds, originator_aet=originator_aet,
                                       originator_id=originator_id).Status)
                for ds in datasets]
    finally:
        assoc.release()


def _spy_durability(node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """SOP Instance UID -> the ``durable`` each instance the node's SCP kept was written with."""
    assert node.node is not None and node.node.scp is not None
    writer = node.node.scp.writer
    real = writer.keep
    durable: dict[str, bool] = {}

    def keep(parsed, **kw):  # type: ignore[no-untyped-def]
        durable[parsed.sop_instance_uid] = kw.get("durable", True)
        return real(parsed, **kw)

    monkeypatch.setattr(writer, "keep", keep)
    return durable


def test_pushes_from_the_pacs_during_a_move_are_not_taken_into_it(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a C-MOVE from a PACS runs, that PACS (same AE title) pushes another study:
    without Move Originator attributes, with our AE title and a message ID of no C-MOVE,
    and with another originator's AE title. Each is an ordinary push (durable, source
    dimse), not one of the retrieval's; an instance of the moved study sent without the
    attributes (a PACS that sends none) still belongs to the retrieval."""
    import threading

    durable = _spy_durability(node, monkeypatch)
    study, series = generate_uid(), generate_uid()
    moved = [synthetic(study, series) for _ in range(2)]
    other_study, other_series = generate_uid(), generate_uid()
    pushed = [synthetic(other_study, other_series) for _ in range(3)]
    moving, go_on = threading.Event(), threading.Event()
    move_ids: list[int] = []

    def on_move(event):  # type: ignore[no-untyped-def]
        move_ids.append(int(event.request.MessageID))
        moving.set()
        assert go_on.wait(30)
        yield "127.0.0.1", node.port
        yield 1
        yield 0xFF00, moved[0]  # pynetdicom's sub-operation

    results: list[object] = []
    with _fake_pacs(on_move) as port:
        mover = threading.Thread(target=lambda: results.append(client_for(node).retrieve(
            source(port), Query(QueryLevel.STUDY, study_instance_uid=study))))
        mover.start()
        try:
            assert moving.wait(30)
            statuses = _push(node.port, "QRSCP", [pushed[0]])
            statuses += _push(node.port, "QRSCP", [pushed[1]], originator_aet=NODE_AE,
                              originator_id=(move_ids[0] + 7) % 65535 + 1)
            statuses += _push(node.port, "QRSCP", [pushed[2]], originator_aet="OTHERSCU",
                              originator_id=move_ids[0])
            statuses += _push(node.port, "QRSCP", [moved[1]])  # no attributes, moved study
        finally:
            go_on.set()
            mover.join(60)
    assert statuses == [0, 0, 0, 0]
    result = results[0]
    assert result.ok, result.message  # type: ignore[attr-defined]
    got = sorted(r.sop_instance_uid for r in result.received)  # type: ignore[attr-defined]
    assert got == sorted(str(ds.SOPInstanceUID) for ds in moved)
    for ds in pushed:
        rec = node.store.get_instance(ds.SOPInstanceUID)
        assert rec is not None and rec.source == "dimse", ds.SOPInstanceUID
        assert durable[ds.SOPInstanceUID] is True
    for ds in moved:
        rec = node.store.get_instance(ds.SOPInstanceUID)
        assert rec is not None and rec.source == "retrieve"
        assert durable[ds.SOPInstanceUID] is False


def test_sub_operations_from_another_storage_ae_title_belong_to_the_move(
        node: RunningNode) -> None:
    """A PACS that stores from another AE title than its Q/R one (QRSCP_STORE), naming
    our AE title and the C-MOVE's message ID: its instances are the retrieval's; one
    naming a message ID of no C-MOVE of ours is an ordinary push."""
    study, series = generate_uid(), generate_uid()
    moved = synthetic(study, series)
    stray = synthetic(study, series)
    statuses: list[int] = []

    def on_move(event):  # type: ignore[no-untyped-def]
        move_id = int(event.request.MessageID)
        statuses.extend(_push(node.port, "QRSCP_STORE", [moved], originator_aet=NODE_AE,
                              originator_id=move_id))
        statuses.extend(_push(node.port, "QRSCP_STORE", [stray], originator_aet=NODE_AE,
                              originator_id=move_id % 65535 + 1))
        yield "127.0.0.1", node.port
        yield 0  # its own sub-operations are sent above

    with _fake_pacs(on_move) as port:
        result = client_for(node).retrieve(
            source(port), Query(QueryLevel.STUDY, study_instance_uid=study))
    assert statuses == [0, 0]
    assert result.ok, result.message
    assert [r.sop_instance_uid for r in result.received] == [moved.SOPInstanceUID]
    rec = node.store.get_instance(moved.SOPInstanceUID)
    assert rec is not None and rec.source == "retrieve" and rec.calling_ae == "QRSCP_STORE"
    rec = node.store.get_instance(stray.SOPInstanceUID)
    assert rec is not None and rec.source == "dimse"


def test_a_get_waits_while_a_large_instance_is_still_coming(tmp_path: Path) -> None:
    """PS3.7 C.4.3: a Pending response follows each sub-operation, so one large instance
    over a slow link may take longer than dimse.dimse_timeout_s. The retrieval ended
    there ("no final response") while the instance was still arriving."""
    from pynetdicom import evt

    from tests.support.node import running_node

    study, series = generate_uid(), generate_uid()
    big = synthetic(study, series, rows=1024)  # 2 MiB: ~1.6 s on the slow link

    def on_get(event: evt.Event):  # type: ignore[no-untyped-def]
        event.assoc.dul.socket.socket = Trickle(event.assoc.dul.socket.socket)
        yield 1
        yield 0xFF00, big

    settings = node_settings(tmp_path / "data", dimse={"dimse_timeout_s": 1.0})
    with _fake_pacs(on_get=on_get) as port, running_node(settings) as rn:
        result = client_for(rn).retrieve(
            source(port, "c-get"), Query(QueryLevel.STUDY, study_instance_uid=study))
    assert result.ok, result.message
    assert [r.sop_instance_uid for r in result.received] == [big.SOPInstanceUID]


def test_a_sub_operation_after_its_move_ended_is_kept_and_makes_no_job(
        node: RunningNode) -> None:
    """When the node stopped waiting for a C-MOVE, the PACS's sub-operations that came
    after (Move Originator: the node and that C-MOVE) became ordinary pushes: jobs ran
    on them and sent results nobody asked for. They are kept as retrieved instances."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    assert node.node is not None and node.node.scp is not None
    with node.node.scp.collect_from("QRSCP", 4242):
        pass  # the retrieval ended (no final response in time)
    late = synthetic(generate_uid(), generate_uid())
    ae = AE("QRSCP")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(late, originator_aet=NODE_AE, originator_id=4242)
        assert status.Status == 0
    finally:
        assoc.release()
    rec = node.store.get_instance(str(late.SOPInstanceUID))
    assert rec is not None and rec.source == "retrieve"


@contextlib.contextmanager
def _slow_link(to_port: int):  # type: ignore[no-untyped-def]
    """A TCP relay to ``to_port`` on loopback that passes 64 KiB every 50 ms towards it
    (a slow link, about 1.3 MB/s) and the answers back at once; yields its port."""
    import socket
    import threading
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(65536):
                if slow:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def relay() -> None:
        while not stop.is_set():
            try:
                near, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", to_port))
            threading.Thread(target=pump, args=(near, far, True), daemon=True).start()
            threading.Thread(target=pump, args=(far, near, False), daemon=True).start()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_move_waits_while_a_large_sub_operation_is_still_coming(tmp_path: Path) -> None:
    """The C-MOVE side of the wait above: the sub-operation comes on an association the
    PACS opens to the node, over a slow link, and the PACS's next response only after
    it; the node counts the bytes arriving from the PACS's host as the C-MOVE going on,
    instead of ending it after dimse.dimse_timeout_s as 'no final response'."""
    from tests.support.node import running_node

    study, series = generate_uid(), generate_uid()
    big = synthetic(study, series, rows=1024)  # 2 MiB: ~1.6 s on the slow link
    settings = node_settings(tmp_path / "data", dimse={"dimse_timeout_s": 1.0})
    with running_node(settings) as rn:
        with _slow_link(rn.port) as relay_port:

            def on_move(event):  # type: ignore[no-untyped-def]
                yield "127.0.0.1", relay_port  # the node, as the PACS reaches it
                yield 1
                yield 0xFF00, big

            with _fake_pacs(on_move) as port:
                result = client_for(rn).retrieve(
                    source(port), Query(QueryLevel.STUDY, study_instance_uid=study))
        assert result.ok, result.message
        assert [r.sop_instance_uid for r in result.received] == [big.SOPInstanceUID]
        rec = rn.store.get_instance(str(big.SOPInstanceUID))
        assert rec is not None and rec.source == "retrieve"


def test_a_get_under_the_free_space_reserve_keeps_nothing(tmp_path: Path) -> None:
    """The listener answers a C-MOVE's sub-operations 0xA700 under storage.min_free_mb;
    a C-GET's came back on its own association and were written past the reserve, the
    disk to 0."""
    from pynetdicom import evt

    from tests.support.node import running_node

    study, series = generate_uid(), generate_uid()
    sent = [synthetic(study, series) for _ in range(3)]

    def on_get(event: evt.Event):  # type: ignore[no-untyped-def]
        yield len(sent)
        for ds in sent:
            yield 0xFF00, ds

    settings = node_settings(tmp_path / "data", min_free_mb=10**9)  # never that much free
    with _fake_pacs(on_get=on_get) as port, running_node(settings) as rn:
        result = client_for(rn).retrieve(
            source(port, "c-get"), Query(QueryLevel.STUDY, study_instance_uid=study))
        assert all(rn.store.get_instance(str(ds.SOPInstanceUID)) is None for ds in sent)
    assert not result.ok and result.received == []
    assert len(result.failures) == 3
