"""TLS contexts for the DICOM port and for connections to peers, and what went wrong
with them in words a person can act on.

The contexts are built while settings are checked (``check-config`` and ``serve``), so
that a key that does not match its certificate, a file that is not PEM, or a key
protected by a passphrase stops start-up naming the key, not the DICOM port.
"""

from __future__ import annotations

import socket
import ssl
import stat
from pathlib import Path

__all__ = [
    "TlsFileError",
    "client_context",
    "handshake_problem",
    "readable_by_others",
    "server_context",
]

PASSPHRASE = ("the private key is protected by a passphrase; give an unencrypted key "
              "readable only by the node's user")


class TlsFileError(ValueError):
    """A certificate, key or CA file that cannot be used; ``field`` is its settings key
    (``certificate``, ``private_key`` or ``ca_certificate``)."""

    def __init__(self, field: str, path: Path, problem: str) -> None:
        self.field = field
        self.path = path
        self.problem = problem
        super().__init__(f"{field}: {path}: {problem}")


class _Passphrase(Exception):
    """Raised by the password callback: OpenSSL must never prompt on the terminal."""


def _no_passphrase() -> bytes:
    raise _Passphrase


def server_context(certificate: Path, private_key: Path,
                   ca_certificate: Path | None) -> ssl.SSLContext:
    """TLS for the DICOM port; peers must present a certificate when a CA is given.

    Raises :class:`TlsFileError` for a file that cannot be used.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load(ctx, certificate, private_key, ca_certificate)
    if ca_certificate is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(certificate: Path, private_key: Path,
                   ca_certificate: Path | None) -> ssl.SSLContext:
    """TLS for a connection to a peer; its certificate is checked when a CA is given.

    Raises :class:`TlsFileError` for a file that cannot be used.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    _load(ctx, certificate, private_key, ca_certificate)
    if ca_certificate is None:  # encrypt, but the peer's certificate cannot be checked
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load(ctx: ssl.SSLContext, certificate: Path, private_key: Path,
          ca_certificate: Path | None) -> None:
    files = [("certificate", certificate), ("private_key", private_key)]
    if ca_certificate is not None:
        files.append(("ca_certificate", ca_certificate))
    for field, path in files:  # ssl's own errors do not say which file
        try:
            path.open("rb").close()
        except OSError as exc:
            raise TlsFileError(field, path, f"cannot read it ({exc.strerror or exc})") from None
    try:
        ctx.load_cert_chain(certificate, private_key, password=_no_passphrase)
    except _Passphrase:
        raise TlsFileError("private_key", private_key, PASSPHRASE) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError("private_key", private_key,
                               "the private key does not match the certificate") from None
        if not _has_certificate(certificate):
            raise TlsFileError("certificate", certificate, "not a PEM certificate") from None
        raise TlsFileError("private_key", private_key,
                           f"not a PEM private key ({_reason(exc)})") from None
    if ca_certificate is not None:
        try:
            ctx.load_verify_locations(ca_certificate)
        except ssl.SSLError as exc:
            raise TlsFileError("ca_certificate", ca_certificate,
                               f"not a PEM certificate ({_reason(exc)})") from None


def _has_certificate(path: Path) -> bool:
    """Whether ``path`` holds at least one PEM certificate that OpenSSL can read."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except (ssl.SSLError, OSError):
        return False
    return True


def readable_by_others(path: Path) -> bool:
    """Whether a file's group or others may read it (False when it cannot be looked at)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRGRP | stat.S_IROTH))


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, in lower case words (``CERTIFICATE_VERIFY_FAILED`` -> ...)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    reason = exc.reason or str(exc)
    return reason.replace("_", " ").lower()


# What a TLS client sees when the peer does not speak TLS on the port: a DICOM node
# answers the ClientHello with an A-ABORT or A-ASSOCIATE-RJ (not a TLS record), or
# closes the connection.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING", "RECORD_LAYER_FAILURE",
            "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"}


def handshake_problem(ctx: ssl.SSLContext, host: str, port: int,
                      timeout_s: float = 3.0) -> str | None:
    """Why a TLS connection to ``host:port`` with ``ctx`` fails, found by making one;
    None when the handshake succeeds and the peer does not refuse it at once.

    TLS 1.3 servers judge the client's certificate after the client has finished its
    handshake, so a short read follows: a refusal arrives as an alert.
    """
    where = f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return f"connection refused (nothing listens on port {port})"
    except TimeoutError:
        return f"no answer from {where} within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    with raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as sock:
                try:
                    sock.settimeout(min(timeout_s, 1.0))
                    sock.recv(1)  # a DICOM acceptor sends nothing before our request
                except TimeoutError:
                    return None
                except ssl.SSLError as exc:
                    return (f"the peer refused the node's certificate in the TLS handshake "
                            f"with {where}: {_reason(exc)} (is the node's certificate signed "
                            f"by a CA the peer trusts?)")
                except OSError:
                    pass
                return None
        except ssl.SSLCertVerificationError as exc:
            hint = (" (is ca_certificate the CA that signed the peer's certificate?)"
                    if exc.verify_code in (2, 19, 20, 21) else "")
            return f"TLS handshake with {where} failed: {_reason(exc)}{hint}"
        except ssl.SSLError as exc:
            if exc.reason in _NOT_TLS or isinstance(exc, ssl.SSLEOFError):
                return (f"the peer does not speak TLS on port {port} "
                        f"(TLS handshake: {_reason(exc)}; is it a plain DICOM port?)")
            return f"TLS handshake with {where} failed: {_reason(exc)}"
        except TimeoutError:
            return f"no TLS handshake answer from {where} within {timeout_s:g} s"
        except OSError as exc:  # reset during the handshake: not a TLS server
            return (f"the peer does not speak TLS on port {port} (the connection "
                    f"ended during the TLS handshake: {exc.strerror or exc})")
