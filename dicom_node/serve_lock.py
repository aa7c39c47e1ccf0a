"""One ``serve`` per data directory.

``serve`` holds an exclusive ``flock`` on ``<data_dir>/serve.lock`` for as long as it
runs, whatever its ``node_name``: two nodes on one data directory would both take every
file of its drop folders (each study ran twice when only the names differed). The
operating system drops the lock when the process ends, however it ends (``kill -9``
included), so a restart after a crash gets it at once, while a second ``serve`` started
beside a running one is refused with the pid that holds it.

The lock file also keeps a random id, made once and kept across restarts: the node's
lease owner is ``<node_name>#<id>``. Leases held under our own owner name can only be
left over from a process that died (we hold the lock), so they are re-queued at once;
a node with the same ``node_name`` but another data directory (several machines on one
PostgreSQL, each with local disks) has another id and its live jobs are not touched.

The other commands (``jobs``, ``studies``, ``token``, ``check-config``, ``infer``) do not
take the lock: they read, or make short writes that the store keeps consistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.errors import NodeError


class DataDirInUse(NodeError):
    """Another ``serve`` with the same node name runs on this data directory."""


@dataclass
class ServeLock:
    path: Path
    fd: int
    node_id: str

    def owner(self, node_name: str) -> str:
        """The lease owner for this node's jobs: its name and the data directory's id."""
        return f"{node_name}#{self.node_id}"

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self.fd)


def lock_path(data_dir: Path) -> Path:
    return data_dir / "serve.lock"


def _legacy_node_id(data_dir: Path, node_name: str) -> str | None:
    """The id kept by the lock file of earlier versions (one per node name), so that the
    lease owner's name survives the upgrade."""
    try:
        data = json.loads((data_dir / f"serve-{node_name}.lock").read_text())
    except (OSError, ValueError):
        return None
    node_id = data.get("node_id") if isinstance(data, dict) else None
    return node_id if isinstance(node_id, str) else None


def acquire(data_dir: Path, node_name: str) -> ServeLock:
    """Take the lock or raise :class:`DataDirInUse` naming the directory and the holder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(data_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            who = ""
            if holder.get("pid"):
                who = f" (pid {holder['pid']}"
                if holder.get("host") and holder["host"] != socket.gethostname():
                    who += f" on {holder['host']}"
                who += ")"
            raise DataDirInUse(
                f"data directory {data_dir.resolve()} is in use by another `dicom-node "
                f"serve`{who} with node_name {holder.get('node_name', '?')!r}; stop it "
                f"first, or give this one its own --data-dir (lock file {path.resolve()})"
            ) from None
        previous = _read(fd)
        node_id = previous.get("node_id") or _legacy_node_id(data_dir, node_name)
        if not isinstance(node_id, str) or not node_id.isalnum():
            node_id = uuid.uuid4().hex[:12]
        record = {"node_id": node_id, "node_name": node_name, "pid": os.getpid(),
                  "host": socket.gethostname(),
                  "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return ServeLock(path, fd, node_id)


def _read(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        data = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
