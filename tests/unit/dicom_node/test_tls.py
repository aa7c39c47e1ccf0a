"""TLS files are checked with the settings: a key, certificate or CA file that cannot be
used is a wrong setting (exit 2, naming the key), not a failure of the DICOM port."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dicom_node.config import ConfigError, load_settings


def _key_and_cert(d: Path, name: str, *, passphrase: bytes | None = None,
                  mode: int = 0o600) -> tuple[Path, Path]:
    """A self-signed certificate and its key (PEM) in ``d``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    key_path, cert_path = d / f"{name}.key", d / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8, encryption))
    key_path.chmod(mode)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _config(tmp_path: Path, cert: Path, key: Path, ca: Path | None = None,
            section: str = "dimse") -> Path:
    tls = f"{{certificate: {cert}, private_key: {key}" + (f", ca_certificate: {ca}}}"
                                                          if ca else "}")
    if section == "dimse":
        text = f"dimse:\n  tls: {tls}\n"
    else:
        text = (f"destinations:\n  - {{name: pacs, type: dimse, ae_title: PACS, host: h, "
                f"port: 104, tls: {tls}}}\n")
    p = tmp_path / "node.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    a_key, a_pem = _key_and_cert(tmp_path, "a")
    b_key, _ = _key_and_cert(tmp_path, "b")
    enc_key, enc_pem = _key_and_cert(tmp_path, "enc", passphrase=b"secret")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    return {"a.key": a_key, "a.pem": a_pem, "b.key": b_key, "enc.key": enc_key,
            "enc.pem": enc_pem, "junk": junk}


@pytest.mark.parametrize("cert,key,ca,field,problem", [
    ("a.pem", "b.key", None, "private_key", "the private key does not match the certificate"),
    ("junk", "a.key", None, "certificate", "not a PEM certificate"),
    ("a.pem", "junk", None, "private_key", "not a PEM private key"),
    ("a.key", "a.key", None, "certificate", "not a PEM certificate"),
    ("a.pem", "a.key", "junk", "ca_certificate", "not a PEM certificate"),
    ("enc.pem", "enc.key", None, "private_key",
     "the private key is protected by a passphrase; give an unencrypted key readable "
     "only by the node's user"),
])
@pytest.mark.parametrize("section,prefix", [("dimse", "dimse.tls"),
                                            ("destination", "destinations.0.tls")])
def test_unusable_tls_files_name_the_key(tmp_path: Path, pki: dict[str, Path], cert: str,
                                         key: str, ca: str | None, field: str, problem: str,
                                         section: str, prefix: str) -> None:
    config = _config(tmp_path, pki[cert], pki[key], pki[ca] if ca else None, section)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert info.value.key == f"{prefix}.{field}"
    assert problem in info.value.problem
    named = {"certificate": cert, "private_key": key, "ca_certificate": ca}[field]
    assert str(pki[named or ""]) in info.value.problem  # the file, as well as the key


def test_usable_tls_files_load(tmp_path: Path, pki: dict[str, Path]) -> None:
    s = load_settings(_config(tmp_path, pki["a.pem"], pki["a.key"], pki["a.pem"]), environ={})
    assert s.dimse.tls is not None
    assert not [w for w in s.warnings() if "private_key" in w]  # the key is 0600


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # No terminal and a time limit: OpenSSL once asked for the passphrase on the tty.
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True, timeout=120)


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_check_config_and_serve_exit_2_for_a_key_with_a_passphrase(
        tmp_path: Path, pki: dict[str, Path], command: str) -> None:
    config = _config(tmp_path, pki["enc.pem"], pki["enc.key"])
    args = [str(config)] if command == "check-config" else [
        "--config", str(config), "--data-dir", str(tmp_path / "data"),
        "--dicom-port", "11104", "--http-port", "11105"]  # not opened: it stops before
    r = _cli(command, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "pass phrase" not in r.stdout + r.stderr  # OpenSSL did not prompt
    assert r.stderr.strip().splitlines() == [
        f"dicom-node: configuration error: {config}: dimse.tls.private_key: {pki['enc.key']}: "
        "the private key is protected by a passphrase; give an unencrypted key readable "
        "only by the node's user"]


def test_a_private_key_others_can_read_is_warned_about(tmp_path: Path) -> None:
    """It works, so it is not an error; but it is a leaked key: check-config and the
    start-up log say so."""
    key, cert = _key_and_cert(tmp_path, "open", mode=0o644)
    config = _config(tmp_path, cert, key)
    s = load_settings(config, environ={})
    assert s.warnings() == [
        f"dimse.tls.private_key: {key} is readable by group or others; make it readable "
        "only by the node's user (chmod 600)"]
    r = _cli("check-config", str(config))
    assert r.returncode == 0, r.stderr
    assert f"dimse.tls.private_key: {key} is readable by group or others" in r.stderr
