"""A throw-away Orthanc (with its DICOMweb plugin) on free loopback ports, for tests.

Orthanc's DICOM port listens on all interfaces whatever we ask, so this is only
ever started inside tests, on a free port, and stopped at the end (also when
the test fails). HTTP is limited to loopback by ``RemoteAccessAllowed: false``.

Usage::

    with orthanc_server(modalities={"NODE": ("NODEAE", "127.0.0.1", 11112)}) as pacs:
        pacs.upload([path1, path2])
        pacs.dicomweb_url          # http://127.0.0.1:<port>/dicom-web
        pacs.find_study(study_uid)

Debian's Orthanc stalls ~50 ms per received instance unless ``TCP_NODELAY=1``
is in its environment: we always set it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.peers import free_port, need_binary

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
START_TIMEOUT_S = 60.0


@dataclass
class Orthanc:
    """A running Orthanc: its ports, URLs and a few REST helpers."""

    process: subprocess.Popen[bytes]
    folder: Path
    http_port: int
    dicom_port: int
    aet: str
    users: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # to start it again: restart()

    # ---- addresses -----------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb services (QIDO/WADO/STOW), no trailing slash."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    @property
    def auth(self) -> tuple[str, str] | None:
        """Basic-auth credentials of the first registered user, if any."""
        if not self.users:
            return None
        user, password = next(iter(self.users.items()))
        return (user, password)

    # ---- REST helpers -------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("auth", self.auth)
        kwargs.setdefault("timeout", 60)
        r = requests.request(method, self.url + path, **kwargs)
        r.raise_for_status()
        return r

    def get(self, path: str) -> Any:
        """``GET <path>`` on the REST API, decoded from JSON."""
        return self._request("GET", path).json()

    def upload(self, paths: Iterable[Path | str]) -> list[str]:
        """``POST /instances`` each file; returns Orthanc's instance IDs."""
        ids = []
        for p in paths:
            r = self._request("POST", "/instances", data=Path(p).read_bytes(),
                              headers={"Content-Type": "application/dicom"})
            ids.append(str(r.json()["ID"]))
        return ids

    def studies(self) -> list[str]:
        """Orthanc IDs of all studies."""
        return list(self.get("/studies"))

    def series(self) -> list[str]:
        """Orthanc IDs of all series."""
        return list(self.get("/series"))

    def instances(self) -> list[str]:
        """Orthanc IDs of all instances."""
        return list(self.get("/instances"))

    def find(self, level: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
        """``POST /tools/find`` at ``level`` (Patient/Study/Series/Instance), expanded."""
        body = {"Level": level, "Query": dict(query), "Expand": True}
        return list(self._request("POST", "/tools/find", json=body).json())

    def find_study(self, study_uid: str) -> dict[str, Any] | None:
        """The expanded study with that StudyInstanceUID, or None."""
        found = self.find("Study", {"StudyInstanceUID": study_uid})
        return found[0] if found else None

    def study_sop_uids(self, study_uid: str) -> set[str]:
        """SOPInstanceUIDs of every instance of a study (empty if no such study)."""
        found = self.find("Instance", {"StudyInstanceUID": study_uid})
        return {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in found}

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.get("/patients"):
            self._request("DELETE", f"/patients/{patient}")

    # ---- lifecycle ----------------------------------------------------------------
    def restart(self) -> None:
        """Start a stopped server again: same configuration, ports and storage."""
        self.stop(graceful=False)
        self.process = _launch(self.command, self.folder)
        _wait_ready(self)

    def stop(self, graceful: bool = True) -> None:
        """Stop the server; idempotent.

        ``graceful``: SIGTERM and wait (Orthanc takes ~3 s to close its HTTP and
        DICOM servers), SIGKILL if it does not exit. Otherwise SIGKILL at once.
        """
        if self.process.poll() is not None:
            return
        if graceful:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
                return
            except subprocess.TimeoutExpired:
                pass
        self.process.kill()
        self.process.wait(timeout=20)


def _death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux for SIGKILL when the test process dies (no orphan).

    libc is loaded here, in the parent: the child only makes one system call.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))

    return preexec


# The ``orthanc_factory`` fixture: ``(aet=, modalities=, users=, dicom_server=, extra=)``.
OrthancFactory = Callable[..., Orthanc]


def orthanc_config(
    *,
    storage: Path,
    http_port: int,
    dicom_port: int,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    users: Mapping[str, str] | None = None,
    dicom_server: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON configuration of a test Orthanc (``extra`` keys override)."""
    return {
        "Name": "dicom-node-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "DicomServerEnabled": dicom_server,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpCompressionEnabled": False,
        "SaveJobs": False,
        "StableAge": 1,
        "OverwriteInstances": True,
        "ConcurrentJobs": 1,
        **(extra or {}),
    }


@contextmanager
def orthanc_server(
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    users: Mapping[str, str] | None = None,
    dicom_server: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[Orthanc]:
    """Start Orthanc in a fresh folder; yield it; kill it and remove the folder.

    The server is stopped however the ``with`` block ends (a failed assertion
    included), and gets SIGKILL from the kernel if the test process dies first.

    ``modalities`` maps a name to ``(AE title, host, port)`` — register the node's
    AE there so a C-MOVE to it works. ``users`` maps user name to password and
    turns HTTP Basic authentication on. ``extra`` adds or overrides configuration
    keys (e.g. ``{"DicomCheckCalledAet": True}``). Skips the test (fails under
    ``REQUIRE_PEERS=1``) if Orthanc or its DICOMweb plugin is not installed.
    """
    binary = need_binary("Orthanc", "/usr/sbin")
    if not Path(DICOMWEB_PLUGIN).exists():
        need_binary("libOrthancDicomWeb.so", "/usr/share/orthanc/plugins")
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-orthanc-"))
    storage = folder / "storage"
    storage.mkdir()
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = orthanc_config(storage=storage, http_port=http_port, dicom_port=dicom_port,
                            aet=aet, modalities=modalities, users=users,
                            dicom_server=dicom_server, extra=extra)
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    command = [binary, str(config_path)]
    process = _launch(command, folder)
    server = Orthanc(process=process, folder=folder, http_port=http_port,
                     dicom_port=dicom_port, aet=aet, users=dict(users or {}), command=command)
    try:
        _wait_ready(server)
        yield server
    finally:
        # Its storage is thrown away: no need to wait for a graceful stop.
        server.stop(graceful=False)
        shutil.rmtree(folder, ignore_errors=True)


def _launch(command: list[str], folder: Path) -> subprocess.Popen[bytes]:
    """Start Orthanc with ``TCP_NODELAY=1``, its output appended to ``orthanc.log``."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    with (folder / "orthanc.log").open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=folder, preexec_fn=_death_signal())


def _wait_ready(server: Orthanc) -> None:
    """Wait until ``GET /system`` answers; raise with the log's tail if it never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        with suppress(requests.RequestException):
            r = requests.get(server.url + "/system", auth=server.auth, timeout=2)
            if r.status_code == 200:
                return
        time.sleep(0.1)
    tail = ""
    with suppress(OSError):
        tail = server.log_path.read_text(errors="replace")[-4000:]
    raise RuntimeError(f"Orthanc did not start (exit code {server.process.poll()}):\n{tail}")
