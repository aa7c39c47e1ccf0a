"""Secrets the node creates for itself, so the default config needs none typed by hand."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from dicom_node.errors import NodeError


def ensure_jwt_secret(path: Path) -> tuple[bytes, bool]:
    """Return the JWT secret at ``path``, creating it (mode 0600) when absent.

    Returns ``(secret, created)``. Raises NodeError when the file cannot be read
    or is readable by others than its owner.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_jwt_secret(path), False
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return read_jwt_secret(path), True


def read_jwt_secret(path: Path) -> bytes:
    """Read an existing secret file; refuse one that others can read."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise NodeError(
                f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}"
            )
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise NodeError(
            f"no JWT secret at {path}: start the node once (it creates one) or set "
            "auth.jwt_secret_file"
        ) from None
    except OSError as exc:
        raise NodeError(f"cannot read the JWT secret {path}: {exc}") from exc
    if len(secret) < 32:
        raise NodeError(f"the JWT secret in {path} is shorter than 32 bytes")
    return secret
