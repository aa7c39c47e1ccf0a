"""TLS on the DICOM port, the free-space refusal, a disk that fills mid-dataset, and log
lines for refusals."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_node.config import RetrySettings, TlsSettings
from dicom_node.scu import DicomClient, Peer
from dicom_node.spool import SPOOL_DIR_NAME
from tests.integration.test_scp import _encoded, _send_raw, synthetic, wait_for
from tests.support.disk import fill, small_disk
from tests.support.node import NODE_AE, RunningNode, node_settings, running_node
from tests.support.peers import echoscu, require, storescp, storescu

pytestmark = pytest.mark.peers


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed (openssl)."""
    openssl = require_openssl()
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", "/CN=localhost")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
            "-extfile", f"{name}.ext")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                               "client.key")}


def require_openssl() -> str:
    import shutil

    path = shutil.which("openssl")
    if path is None:
        pytest.skip("openssl is not installed")
    return path


def test_tls_with_client_verification(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = node_settings(tmp_path / "data", dimse={"tls": TlsSettings(
        certificate=pki["server.pem"], private_key=pki["server.key"],
        ca_certificate=pki["ca.pem"])})
    with running_node(settings) as rn:
        client = DicomClient(rn.settings)
        good = TlsSettings(certificate=pki["client.pem"], private_key=pki["client.key"],
                           ca_certificate=pki["ca.pem"])
        assert client.echo(Peer(NODE_AE, "127.0.0.1", rn.port, good)).ok
        # Plain TCP to the TLS port gets nowhere.
        assert echoscu(rn.port, NODE_AE).returncode != 0
        # A client certificate from another CA is refused (the peer is verified).
        other = make_pki(tmp_path / "other")
        bad = TlsSettings(certificate=other["client.pem"], private_key=other["client.key"],
                          ca_certificate=pki["ca.pem"])
        assert not client.echo(Peer(NODE_AE, "127.0.0.1", rn.port, bad)).ok


def test_tls_peer_that_sends_nothing_holds_no_one_off(tmp_path: Path) -> None:
    """A connection to the TLS port that never starts its handshake (a port scan, a
    modality set up without TLS that waits for the node to speak) must not hold the
    accept loop: other peers still get through, and failed handshakes are logged."""
    import socket

    import structlog

    pki = make_pki(tmp_path / "pki")
    settings = node_settings(tmp_path / "data", dimse={"tls": TlsSettings(
        certificate=pki["server.pem"], private_key=pki["server.key"],
        ca_certificate=pki["ca.pem"])})
    good = TlsSettings(certificate=pki["client.pem"], private_key=pki["client.key"],
                       ca_certificate=pki["ca.pem"])
    with running_node(settings) as rn, structlog.testing.capture_logs() as logs, \
            socket.create_connection(("127.0.0.1", rn.port)):
        # the silent connection is open; a real peer still gets its echo
        assert DicomClient(rn.settings).echo(Peer(NODE_AE, "127.0.0.1", rn.port, good)).ok
        assert echoscu(rn.port, NODE_AE).returncode != 0  # plain DICOM on the TLS port
        # ssl sends its alert before it raises: echoscu can be gone before the line is
        failed = wait_for(lambda: [e for e in logs if e["event"] == "TLS handshake failed"],
                          "the handshake failure's log line")
        assert failed[0]["peer"].startswith("127.0.0.1:")
        assert failed[0]["error"]  # the reason ssl gave (wrong version number, ...)


def test_low_disk_space_refuses_new_associations(tmp_path: Path) -> None:
    """Under the reserve a sender that may store is rejected (transient); one proposing
    only C-ECHO (a PACS's "test connection") is still answered."""
    require("echoscu")
    settings = node_settings(tmp_path / "data", min_free_mb=10**9)  # a petabyte free: never
    sample = tmp_path / "ct.dcm"
    synthetic(generate_uid(), generate_uid()).save_as(sample, enforce_file_format=True)
    with running_node(settings) as rn:
        stored = storescu(rn.port, [sample], NODE_AE, check=False)
        echoed = echoscu(rn.port, NODE_AE)
    assert stored.returncode != 0
    assert "Rejected Transient" in stored.stdout + stored.stderr
    assert echoed.returncode == 0, echoed.stdout + echoed.stderr


def test_disk_filling_during_a_dataset_answers_a700_and_the_association_goes_on(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real filesystem (a small tmpfs) fills while a 2 MB instance arrives: that instance
    gets 0xA700, the association stays up, what was acknowledged before stays, the partial
    file gives its space back, and the same instance is accepted once there is room."""
    with small_disk(tmp_path / "disk", size_mb=8) as disk, monkeypatch.context() as patch:
        # The system temp dir on the same disk too (pynetdicom's own choice of spool):
        # the node must not depend on where it is.
        (disk / "tmp").mkdir()
        patch.setattr(tempfile, "tempdir", str(disk / "tmp"))
        settings = node_settings(tmp_path / "data")
        settings = settings.model_copy(update={"storage": settings.storage.model_copy(
            update={"studies_dir": disk / "studies"})})
        study, series = generate_uid(), generate_uid()
        kept, big = synthetic(study, series, rows=256), synthetic(study, series, rows=1024)
        with running_node(settings) as rn:
            ae = AE(ae_title="SCU")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", rn.port, ae_title=NODE_AE)
            assert assoc.is_established
            assert assoc.send_c_store(kept).Status == 0x0000
            filler = fill(disk, leave_bytes=512 * 1024)
            assert assoc.send_c_store(big).Status == 0xA700
            assert assoc.is_established  # not aborted: the next instance can come
            spool = disk / "studies" / SPOOL_DIR_NAME
            assert not list(spool.glob(".*.part"))  # the partial dataset is gone
            assert rn.store.get_instance(big.SOPInstanceUID) is None
            filler.unlink()
            assert assoc.send_c_store(big).Status == 0x0000
            assoc.release()
            for ds in (kept, big):
                record = rn.store.get_instance(ds.SOPInstanceUID)
                assert record is not None and Path(record.path).is_file()
                assert Path(record.path).stat().st_size > len(ds.PixelData)
            assert not list(spool.glob(".*.part"))
    out = capfd.readouterr().out
    assert "0xA700" in out and "No space left on device" in out


def test_refusals_are_logged(node: RunningNode, capfd: pytest.CaptureFixture[str]) -> None:
    ds = synthetic(generate_uid(), generate_uid())
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    assert _send_raw(node.port, NODE_AE, CTImageStorage, uid, _encoded(ds)) == 0xC210
    echoscu(node.port, "WHO_ARE_YOU")
    out = capfd.readouterr().out
    assert "C-STORE refused" in out and "0xC210" in out and "SOPInstanceUID is missing" in out
    assert "BADSCU" in out and uid in out
    assert "association rejected" in out and "called AE title not recognised" in out
    assert "Test^Not^Real" not in out  # no patient names in logs


def test_failed_outgoing_tls_says_why(tmp_path: Path) -> None:
    """An echo or export over TLS that fails in the handshake says what the handshake
    said (the wrong CA, a peer without TLS, a peer refusing the node's certificate),
    not that the port 'did not answer as a DICOM node does'; and finding out leaves
    the peer no plain-TCP connection to log as a failed handshake."""
    import structlog

    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other")
    settings = node_settings(tmp_path / "data", dimse={"tls": TlsSettings(
        certificate=pki["server.pem"], private_key=pki["server.key"],
        ca_certificate=pki["ca.pem"])})
    with running_node(settings) as rn, structlog.testing.capture_logs() as logs:
        client = DicomClient(rn.settings)
        wrong_ca = TlsSettings(certificate=pki["client.pem"], private_key=pki["client.key"],
                               ca_certificate=other["ca.pem"])
        result = client.echo(Peer(NODE_AE, "127.0.0.1", rn.port, wrong_ca, "node"))
        assert not result.ok
        # OpenSSL's words for the chain vary ("unable to get local issuer certificate",
        # "self-signed certificate in certificate chain"); the rest is ours.
        assert (f"TLS handshake with 127.0.0.1:{rn.port} failed: certificate verify failed: "
                in result.message), result.message
        assert result.message.endswith(
            "(is ca_certificate the CA that signed the peer's certificate?)")
        assert "takes connections" not in result.message
        # The node logged the handshakes the client broke off, none cut short by a probe.
        failed = [e["error"] for e in logs if e["event"] == "TLS handshake failed"]
        assert failed and not [e for e in failed if "EOF" in e], failed

        # The node verifies clients: a certificate from another CA is refused.
        not_trusted = TlsSettings(certificate=other["client.pem"],
                                  private_key=other["client.key"],
                                  ca_certificate=pki["ca.pem"])
        result = client.echo(Peer(NODE_AE, "127.0.0.1", rn.port, not_trusted, "node"))
        assert not result.ok
        assert "the peer refused the node's certificate" in result.message, result.message

    good = TlsSettings(certificate=pki["client.pem"], private_key=pki["client.key"],
                       ca_certificate=pki["ca.pem"])
    with storescp(tmp_path / "plain") as plain:  # dcmtk, no TLS
        peer = Peer(plain.ae_title, "127.0.0.1", plain.port, good, "plain")
        result = DicomClient(settings).echo(peer)
        assert not result.ok
        assert f"the peer does not speak TLS on port {plain.port}" in result.message, \
            result.message
        study, series = generate_uid(), generate_uid()
        f = tmp_path / "one.dcm"
        synthetic(study, series).save_as(f, enforce_file_format=True)
        export = DicomClient(settings).store_instances(peer, [f], RetrySettings(max_attempts=1))
        assert not export.ok
        assert f"the peer does not speak TLS on port {plain.port}" in export.message


def test_tls_client_on_the_plain_port_is_one_warning_naming_the_peer(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peer set up for TLS on the node's plain DICOM port (dcmtk echoscu +tla) gets
    one warning that names it and says what it is, not pynetdicom's "Unknown PDU type
    received" errors; peers speaking plain DICOM go on as before."""
    import structlog

    settings = node_settings(tmp_path / "data")
    with running_node(settings) as rn, structlog.testing.capture_logs() as logs:
        assert echoscu(rn.port, NODE_AE, "ECHOSCU", "+tla", "-ic").returncode != 0
        assert echoscu(rn.port, NODE_AE).returncode == 0
    warned = [e for e in logs if e["event"] == "TLS handshake on the plain DICOM port"]
    assert len(warned) == 1 and warned[0]["peer"].startswith("127.0.0.1:")
    assert warned[0]["log_level"] == "warning"
    assert not [r for r in caplog.records if "Unknown PDU type" in r.getMessage()]
