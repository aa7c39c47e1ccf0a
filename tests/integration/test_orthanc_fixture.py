"""The Orthanc test fixture itself: REST helpers, and a C-MOVE to a registered modality."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.support.dicom_factory import make_cr_study, make_ct_study
from tests.support.orthanc import Orthanc, OrthancFactory
from tests.support.peers import free_port, need_binary

pytestmark = pytest.mark.peers


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if process.poll() is not None:
            pytest.fail(f"storescp exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail("storescp did not start listening")


def test_rest_helpers(orthanc: Orthanc, tmp_path: Path) -> None:
    cr = make_cr_study(tmp_path / "cr", seed="fx-cr")
    ct = make_ct_study(tmp_path / "ct", seed="fx-ct", slices=3)
    assert len(orthanc.upload([*cr.paths, *ct.paths])) == 4
    assert (len(orthanc.studies()), len(orthanc.series()), len(orthanc.instances())) == (2, 2, 4)
    study = orthanc.find_study(ct.study_uid)
    assert study is not None
    assert study["MainDicomTags"]["AccessionNumber"] == ct.accession_number
    assert orthanc.study_sop_uids(ct.study_uid) == set(ct.sop_uids)
    assert orthanc.find_study("1.2.3") is None
    orthanc.delete_all()
    assert orthanc.instances() == []


def test_factory_builds_are_deterministic(tmp_path: Path) -> None:
    a = make_ct_study(tmp_path / "a", seed="same", slices=2)
    b = make_ct_study(tmp_path / "b", seed="same", slices=2)
    c = make_ct_study(tmp_path / "c", seed="other", slices=2)
    assert (a.study_uid, a.sop_uids) == (b.study_uid, b.sop_uids)
    assert a.paths[0].read_bytes() == b.paths[0].read_bytes()
    assert not set(a.sop_uids) & set(c.sop_uids)
    ds = pydicom.dcmread(a.paths[1])
    assert [float(v) for v in ds.ImagePositionPatient] == [-16.0, -16.0, 2.5]
    assert ds.pixel_array.shape == (64, 64)


def test_c_move_to_a_registered_modality(orthanc_factory: OrthancFactory,
                                         tmp_path: Path) -> None:
    """Register the node's AE as a modality; a C-MOVE to it delivers the study."""
    storescp = need_binary("storescp")
    movescu = need_binary("movescu")
    node_port = free_port()
    orthanc = orthanc_factory(aet="PACS", modalities={"NODE": ("NODEAE", "127.0.0.1",
                                                                node_port)})
    assert orthanc.get("/modalities") == ["NODE"]
    ct = make_ct_study(tmp_path / "ct", seed="fx-move", slices=5)
    orthanc.upload(ct.paths)

    received = tmp_path / "received"
    received.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}
    scp = subprocess.Popen([storescp, "-aet", "NODEAE", "-od", str(received), str(node_port)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(node_port, scp)
        move = subprocess.run(
            [movescu, "-S", "-aet", "NODEAE", "-aec", "PACS", "-aem", "NODEAE",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ct.study_uid}",
             "127.0.0.1", str(orthanc.dicom_port)],
            env=env, capture_output=True, text=True, timeout=120)
        assert move.returncode == 0, move.stderr
    finally:
        scp.terminate()
        scp.wait(timeout=20)
    got = {pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()}
    assert got == set(ct.sop_uids)


def test_restart_keeps_ports_and_storage_and_extra_config_applies(
        orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    from tests.support.peers import echoscu

    pacs = orthanc_factory(extra={"DicomCheckCalledAet": True})
    cr = make_cr_study(tmp_path / "cr", seed="fx-restart")
    pacs.upload(cr.paths)
    ports = (pacs.http_port, pacs.dicom_port)
    pacs.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", pacs.dicom_port)) != 0  # down
    pacs.restart()
    assert (pacs.http_port, pacs.dicom_port) == ports
    assert pacs.study_sop_uids(cr.study_uid) == set(cr.sop_uids)
    # DicomCheckCalledAet: a wrong called AE title is refused, the right one answered
    assert echoscu(pacs.dicom_port, "WRONGAE").returncode != 0
    assert echoscu(pacs.dicom_port, pacs.aet).returncode == 0
