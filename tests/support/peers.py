"""Real DICOM peers for tests: dcmtk programs on free loopback ports.

A missing binary skips the test with a reason, or fails it when ``REQUIRE_PEERS=1``
(CI installs the peers, so a missing one there is a failure, not a skip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require(binary: str) -> str:
    """Path of a peer program; skip (or fail under REQUIRE_PEERS=1) when it is missing."""
    path = shutil.which(binary)
    if path is None:
        msg = f"{binary} (dcmtk) is not installed"
        if os.environ.get("REQUIRE_PEERS") == "1":
            pytest.fail(msg + " and REQUIRE_PEERS=1")
        pytest.skip(msg)
    return path


def peer_env() -> dict[str, str]:
    # Debian's dcmtk stalls ~50 ms per message without TCP_NODELAY.
    return {**os.environ, "TCP_NODELAY": "1"}


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something listens on 127.0.0.1:port (or the process died)."""
    for _ in range(500):
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise RuntimeError(f"peer exited with {proc.returncode}: {out[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Peer:
    ae_title: str
    port: int
    directory: Path
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def storescp(directory: Path, ae_title: str = "STORESCP", *extra: str,
             port: int | None = None) -> Iterator[Peer]:
    """dcmtk ``storescp`` writing what it receives to ``directory`` (on ``port``: a
    destination that was down coming up; default a free one)."""
    exe = require("storescp")
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "-aet", ae_title, "-od", str(directory), *extra, str(port)],
        env=peer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc)
        yield Peer(ae_title, port, directory, proc)
    finally:
        stop(proc)


@contextlib.contextmanager
def dcmqrscp(
    root: Path, ae_title: str = "QRSCP", move_destinations: dict[str, tuple[str, int]] | None = None
) -> Iterator[Peer]:
    """dcmtk ``dcmqrscp`` with an empty archive under ``root``; load it with :func:`storescu`."""
    exe = require("dcmqrscp")
    storage = root / "archive"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    hosts = "\n".join(
        f"{name.lower()} = ({ae}, {host}, {p})"
        for name, (host, p) in (move_destinations or {}).items()
        for ae in [name]
    )
    cfg = root / "dcmqrscp.cfg"
    cfg.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 65536\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
        "VendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\n{ae_title} {storage} RW (200, 1024mb) ANY\nAETable END\n"
    )
    proc = subprocess.Popen([exe, "-c", str(cfg), "--disable-host-lookup", str(port)],
                            env=peer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield Peer(ae_title, port, storage, proc)
    finally:
        stop(proc)


def storescu(
    port: int, files: list[Path], called: str, calling: str = "STORESCU", *extra: str,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk ``storescu`` (each file's own transfer syntax is proposed)."""
    exe = require("storescu")
    cmd = [exe, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
           *map(str, files)]
    res = subprocess.run(cmd, env=peer_env(), capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"storescu failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res


def echoscu(port: int, called: str, calling: str = "ECHOSCU",
            *extra: str) -> subprocess.CompletedProcess[str]:
    exe = require("echoscu")
    return subprocess.run([exe, "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1",
                           str(port)], env=peer_env(), capture_output=True, text=True,
                          timeout=60)


# storescu proposes only uncompressed syntaxes unless told which compressed one to add.
PROPOSE_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a DICOM file: everything after the File Meta Information."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} has no DICOM preamble"
    # (0002,0000) UL, explicit VR little endian: tag 4 + VR 2 + length 2 + value 4
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


def require_peers() -> bool:
    return os.environ.get("REQUIRE_PEERS", "") not in ("", "0", "false")


def need_binary(name: str, *search: str) -> str:
    """Path of a peer binary (also looked for in ``search`` globs), or skip/fail the test."""
    found = shutil.which(name)
    for folder in search:
        if found:
            break
        candidates = sorted(Path("/").glob(folder.lstrip("/") + "/" + name))
        found = str(candidates[-1]) if candidates else None
    if found:
        return found
    message = f"peer program {name!r} is not installed (see .ci/run for the packages)"
    if require_peers():
        pytest.fail(message)
    pytest.skip(message)
