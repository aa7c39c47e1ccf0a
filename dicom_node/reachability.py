"""Is a configured peer reachable now? One check per source or destination.

- DIMSE (a destination or a source): a C-ECHO (association, Verification, release);
- DICOMweb (a destination, or a source's ``dicomweb_url``): a QIDO-RS search for one
  study, with the destination's credentials;
- folder: the folder exists and the node may write to it (or may create it).

Used by ``POST /config/destination/{name}/echo`` and ``dicom-node echo``. Every check
returns an :class:`EchoOutcome`; none raises for an unreachable peer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import DestinationSettings, Settings, SourceSettings
from dicom_node.scu import DicomClient

__all__ = ["EchoOutcome", "check_destination", "check_source"]


@dataclass(frozen=True)
class EchoOutcome:
    """What one reachability check found."""

    destination: str  # the configured name (of a destination or a source)
    type: str  # dimse, dicomweb or folder
    target: str  # AE@host:port, the URL or the folder
    success: bool
    status: int | None  # DIMSE status of the C-ECHO, or the HTTP status of the QIDO
    round_trip_ms: float
    message: str


def check_destination(settings: Settings, client: DicomClient,
                      dest: DestinationSettings) -> EchoOutcome:
    if dest.type == "dimse":
        return _dimse(client, dest)
    if dest.type == "dicomweb":
        return _dicomweb(dest)
    return _folder(settings, dest)


def check_source(client: DicomClient, src: SourceSettings) -> list[EchoOutcome]:
    """C-ECHO the source's AE and, when it has a ``dicomweb_url``, QIDO-RS it too."""
    found = [_dimse(client, src)]
    if src.dicomweb_url:
        web = DestinationSettings(name=src.name, type="dicomweb", url=src.dicomweb_url)
        found.append(_dicomweb(web))
    return found


def _dimse(client: DicomClient, peer_settings: DestinationSettings | SourceSettings,
           ) -> EchoOutcome:
    from dicom_node.errors import InvalidInput
    from dicom_node.scu import Peer

    try:
        peer = Peer.from_settings(peer_settings)
    except InvalidInput as exc:
        return EchoOutcome(peer_settings.name, "dimse", "", False, None, 0.0, str(exc))
    start = time.perf_counter()
    result = client.echo(peer)
    ms = (time.perf_counter() - start) * 1000
    message = result.message or ("C-ECHO succeeded" if result.ok else "C-ECHO failed")
    return EchoOutcome(peer_settings.name, "dimse", f"{peer.ae_title}@{peer.host}:{peer.port}",
                       result.ok, result.status, round(ms, 2), message)


def _dicomweb(dest: DestinationSettings) -> EchoOutcome:
    from dicom_node.dicomweb import DicomWebError, redact_url
    from dicom_node.errors import InvalidInput
    from dicom_node.export import dicomweb_client

    url = redact_url(str(dest.url))  # the target shown: never a user or password
    start = time.perf_counter()
    try:
        with dicomweb_client(dest) as client:
            found = client.search_studies(limit=1)
    except DicomWebError as exc:
        ms = (time.perf_counter() - start) * 1000
        return EchoOutcome(dest.name, "dicomweb", exc.url or url, False, exc.status,
                           round(ms, 2), str(exc))
    except InvalidInput as exc:
        return EchoOutcome(dest.name, "dicomweb", url, False, None, 0.0, str(exc))
    ms = (time.perf_counter() - start) * 1000
    return EchoOutcome(dest.name, "dicomweb", url, True, 200 if found else 204, round(ms, 2),
                       "QIDO-RS search for studies answered")


def _folder(settings: Settings, dest: DestinationSettings) -> EchoOutcome:
    assert dest.path is not None
    folder = settings.path(dest.path)
    start = time.perf_counter()
    if folder.is_dir():
        ok = os.access(folder, os.W_OK | os.X_OK)
        message = "the folder exists and is writable" if ok else \
            "the node may not write to the folder"
    else:  # the first export creates it (and its missing parents)
        ancestor = next(p for p in folder.parents if p.exists())
        ok = ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)
        message = "the folder does not exist yet; the first export creates it" if ok else \
            f"the folder does not exist and cannot be created under {ancestor}"
    if ok and (full := _full(folder if folder.is_dir() else ancestor)):
        # writable but full: an export there fails on every file (it was called "ok")
        ok, message = False, full
    ms = (time.perf_counter() - start) * 1000
    return EchoOutcome(dest.name, "folder", str(folder), ok, None, round(ms, 2), message)


def _full(folder: Path) -> str:
    """Why nothing fits in ``folder``'s filesystem (under 1 MiB or no inode free), or ''."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    if free < 1 << 20:
        return f"the folder's disk is full ({free // 1024} KiB free): an export there would fail"
    if st.f_files and not st.f_favail:
        return "the folder's disk has no inode (file) free: an export there would fail"
    return ""
