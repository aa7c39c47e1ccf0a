"""ACR inference requests end to end: a real Orthanc PACS, the node in-process with the
real demo models (cxr-findings, ct-organs), HTTP requests to its REST API.

The node fetches the study (C-MOVE / C-FIND, or QIDO/WADO-RS), runs the pipeline and
stores the results back (C-STORE or STOW-RS); the tests then look in Orthanc with
QIDO-RS / WADO-RS. Failure paths use a second Orthanc configured at run time through
the config API, stopped, or refusing the node's association.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from dicom_node.config import Settings
from pipeline.train.phantoms_ct import make_ct_phantom, write_dicom_series
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from tests.support.node import RunningNode, running_node
from tests.support.orthanc import Orthanc, OrthancFactory, orthanc_server
from tests.support.peers import free_port

pytestmark = pytest.mark.peers

NODE_AE = "DICOMNODE"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22",
              "1.2.840.10008.5.1.4.1.1.88.34"}
SC = "1.2.840.10008.5.1.4.1.1.7"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
FINAL = ("succeeded", "failed", "cancelled")


def acr_settings(data_dir: Path, node_port: int, http_port: int, pacs: Orthanc) -> Settings:
    """The node as a site would run it for ACR requests against one PACS."""
    return Settings.model_validate({
        "storage": {"data_dir": str(data_dir), "min_free_mb": 0},
        "dimse": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port},
        "ae_titles": [{"ae_title": NODE_AE}],
        "sources": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                     "port": pacs.dicom_port, "dicomweb_url": pacs.dicomweb_url}],
        "destinations": [
            {"name": "pacs-out", "type": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1",
             "port": pacs.dicom_port, "retry": {"max_attempts": 2, "backoff_s": 0.2}},
            {"name": "pacs-web", "type": "dicomweb", "url": pacs.dicomweb_url},
            # the name samples/requests/*.json and configs/examples/pacs.yaml use
            {"name": "pacs", "type": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1",
             "port": pacs.dicom_port},
        ],
        "models": [{"name": "cxr-findings", "path": "pipeline/models/cxr-findings"},
                   {"name": "ct-organs", "path": "pipeline/models/ct-organs"}],
        "pipelines": [
            {"name": "cxr-findings", "model": "cxr-findings", "task": "classify",
             "series": {"modalities": ["CR", "DX"]},
             "outputs": ["json", "png", "pdf", "sr", "sc", "encapsulated_pdf"]},
            {"name": "ct-organs", "model": "ct-organs", "task": "segment",
             "series": {"modalities": ["CT"], "min_instances": 8},
             "outputs": ["json", "png", "pdf", "seg", "sr"]},
        ],
        "rest": {"host": "127.0.0.1", "port": http_port},
        "watch": [],
        "executor": {"poll_interval_s": 0.2,
                     "retry": {"max_attempts": 2, "backoff_s": 0.5, "backoff_max_s": 1}},
        "logging": {"format": "json"},
    })


@dataclass
class Site:
    """The PACS, the running node and an HTTP client for it."""

    pacs: Orthanc
    node: RunningNode
    url: str
    headers: dict[str, str]
    admin: dict[str, str]
    tmp: Path

    def post(self, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.url}/api/inference", json=body, headers=self.headers,
                             timeout=30)

    def status(self, ref: str) -> dict[str, Any]:
        r = requests.get(f"{self.url}/api/inference/status/{ref}", headers=self.headers,
                         timeout=30)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def run(self, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        """POST the request and wait for its final status."""
        r = self.post(body)
        assert r.status_code == 200, r.text
        assert r.json()["transactionID"] == body["transactionID"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(body["transactionID"])
            if st["state"] in FINAL or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def config(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        r = requests.request(method, f"{self.url}/config/{path}", json=body,
                             headers=self.admin, timeout=30)
        assert r.status_code in (200, 201, 204), r.text

    def healthy(self) -> bool:
        r = requests.get(f"{self.url}/health", timeout=10)
        parts = r.json()["parts"]
        return r.status_code == 200 and all(v == "running" for v in parts.values())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("acr")
    node_port, http_port = free_port(), free_port()
    with orthanc_server(modalities={"NODE": (NODE_AE, "127.0.0.1", node_port)}) as pacs, \
            running_node(acr_settings(tmp / "data", node_port, http_port, pacs)) as node:
        secret = (tmp / "data" / "jwt_secret").read_bytes().strip()

        def token(scope: str) -> dict[str, str]:
            claims = {"sub": "ris", "scope": scope, "exp": int(time.time()) + 3600}
            return {"Authorization": f"Bearer {jwt.encode(claims, secret, algorithm='HS256')}"}

        yield Site(pacs, node, f"http://127.0.0.1:{http_port}", token("infer read"),
                   token("admin"), tmp)


def request(pipeline: str, details: dict[str, Any], source: dict[str, Any],
            outputs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "transactionID": f"tx-{uuid.uuid4().hex[:12]}",
        "priority": 200,
        "inputMetadata": {"details": details},
        "inputResources": [{"interface": "Algorithm", "connectionDetails": {"name": pipeline}},
                           source],
        "outputResources": outputs,
    }


def dimse(name: str) -> dict[str, Any]:
    return {"interface": "DIMSE", "connectionDetails": {"name": name}}


def web(uri: str) -> dict[str, Any]:
    return {"interface": "DICOMweb", "connectionDetails": {"uri": uri, "authType": "None"}}


def by_uid(study: str) -> dict[str, Any]:
    return {"type": "DICOM_UID", "studies": [{"StudyInstanceUID": study}]}


def chest(site: Site, seed: int, pacs: Orthanc | None = None) -> pydicom.Dataset:
    """A CR chest phantom with findings (so a heatmap SC too) loaded into the PACS."""
    phantom = make_cxr_phantom(seed)
    assert phantom.labels.any(), f"phantom {seed} has no finding"
    path = write_dicom(phantom, site.tmp / f"cr-{seed}.dcm", modality="CR")
    (pacs or site.pacs).upload([path])
    return pydicom.dcmread(path, stop_before_pixels=True)


def qido_instances(pacs: Orthanc, study: str) -> list[dict[str, Any]]:
    """Every instance of the study as Orthanc's QIDO-RS lists it (SOP class, series)."""
    found = DICOMwebClient(pacs.dicomweb_url).search_for_instances(
        study_instance_uid=study, fields=["SeriesInstanceUID", "Modality"])
    return [{"sop_class": i["00080016"]["Value"][0], "sop": i["00080018"]["Value"][0],
             "series": i["0020000E"]["Value"][0]} for i in found]


def assert_results_in_pacs(pacs: Orthanc, source: pydicom.Dataset) -> None:
    """SR, Secondary Capture and Encapsulated PDF, each in a new series of the study."""
    instances = qido_instances(pacs, str(source.StudyInstanceUID))
    classes = {i["sop_class"] for i in instances}
    assert classes & SR_CLASSES, classes
    assert SC in classes and PDF in classes, classes
    results = [i for i in instances if i["sop"] != str(source.SOPInstanceUID)]
    assert len(results) == 3, instances
    assert all(i["series"] != str(source.SeriesInstanceUID) for i in results)


def test_cr_dimse_source_and_dimse_output(site: Site) -> None:
    cr = chest(site, 103)
    st = site.run(request("cxr-findings", by_uid(str(cr.StudyInstanceUID)), dimse("pacs"),
                          [dimse("pacs-out")]))
    assert st["state"] == "succeeded", st
    assert st["status"] == "Succeeded" and st["message"] is None
    [retrieved] = st["retrieval"]
    assert retrieved["source"] == "pacs" and retrieved["state"] == "retrieved"
    assert retrieved["received"] == 1
    [export] = st["exports"]
    assert export["destination"] == "pacs-out" and export["state"] == "succeeded"
    assert export["sent"] == 3
    [result] = st["results"]
    assert result["study"] == str(cr.StudyInstanceUID) and len(result["findings"]) == 11
    timings = st["timings"]
    assert {"retrieve_s", "run_s", "export_s", "total_s", "compute_s", "load_s"} <= set(timings)
    assert timings["compute_s"] <= timings["run_s"]
    assert_results_in_pacs(site.pacs, cr)


def test_cr_dicomweb_source_and_dicomweb_output(site: Site) -> None:
    cr = chest(site, 106)
    st = site.run(request("cxr-findings", by_uid(str(cr.StudyInstanceUID)),
                          web(site.pacs.dicomweb_url), [web(site.pacs.dicomweb_url)]))
    assert st["state"] == "succeeded", st
    [retrieved] = st["retrieval"]
    assert retrieved["source"] == site.pacs.dicomweb_url and retrieved["received"] == 1
    [export] = st["exports"]
    assert export["state"] == "succeeded" and export["sent"] == 3
    assert_results_in_pacs(site.pacs, cr)


def test_ct_by_accession_number_seg_references_the_source_series(site: Site) -> None:
    folder = site.tmp / "ct"
    paths = write_dicom_series(make_ct_phantom(5, shape=(32, 96, 96)), folder)
    site.pacs.upload(paths)
    ct = pydicom.dcmread(paths[0], stop_before_pixels=True)
    source_sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in paths}
    st = site.run(request("ct-organs", {"type": "ACCESSION_NUMBER",
                                        "accessionNumber": [str(ct.AccessionNumber)]},
                          dimse("pacs"), [dimse("pacs-out")]))
    assert st["state"] == "succeeded", st
    [retrieved] = st["retrieval"]
    assert retrieved["study"] == str(ct.StudyInstanceUID) and retrieved["received"] == 32
    [result] = st["results"]
    assert {s["name"] for s in result["segments"]} >= {"liver", "spleen"}
    segs = [i for i in qido_instances(site.pacs, str(ct.StudyInstanceUID))
            if i["sop_class"] == SEG]
    assert len(segs) == 1
    seg = DICOMwebClient(site.pacs.dicomweb_url).retrieve_instance(
        str(ct.StudyInstanceUID), segs[0]["series"], segs[0]["sop"])
    assert str(seg.StudyInstanceUID) == str(ct.StudyInstanceUID)
    assert str(seg.SeriesInstanceUID) != str(ct.SeriesInstanceUID)
    assert str(seg.FrameOfReferenceUID) == str(ct.FrameOfReferenceUID)
    [ref_series] = seg.ReferencedSeriesSequence
    assert str(ref_series.SeriesInstanceUID) == str(ct.SeriesInstanceUID)
    referenced = {str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence}
    assert referenced and referenced <= source_sops
    # ... and the SR with the volumes, in the same study
    srs = [i for i in qido_instances(site.pacs, str(ct.StudyInstanceUID))
           if i["sop_class"] in SR_CLASSES]
    assert len(srs) == 1


def test_a_dicomweb_source_allowed_to_retrieve_only_is_not_searched(site: Site) -> None:
    """operations [RETRIEVE]: the node may read that source but not search it, so a
    request by PatientID is refused at once (its job could only fail with "no study
    found" for a study that is there); with QUERY as well it runs."""
    cr = chest(site, 42)
    pid = {"type": "DICOM_PATIENT_ID", "PatientID": str(cr.PatientID)}
    read_only = web(site.pacs.dicomweb_url)
    read_only["connectionDetails"]["operations"] = ["RETRIEVE"]
    r = site.post(request("cxr-findings", pid, read_only, [dimse("pacs-out")]))
    assert r.status_code == 422, r.text
    problem = next(d for d in r.json()["details"] if d["field"] == "inputResources")
    assert "DICOM_PATIENT_ID lookup needs a source that allows QUERY" in problem["message"]
    both = web(site.pacs.dicomweb_url)
    both["connectionDetails"]["operations"] = ["QUERY", "RETRIEVE"]
    st = site.run(request("cxr-findings", pid, both, [dimse("pacs-out")]))
    assert st["state"] == "succeeded", st


def test_study_not_found_fails_at_once_with_the_reason(site: Site) -> None:
    missing = "1.2.826.0.1.3680043.8.498.1"
    st = site.run(request("cxr-findings", by_uid(missing), dimse("pacs"), [dimse("pacs-out")]))
    assert st["state"] == "failed" and st["status"] == "Failed"
    assert st["attempts"] == 1  # retrying cannot help
    assert missing in st["message"] and "no such study" in st["message"]
    assert st["retrieval"][0]["state"] == "failed"
    st = site.run(request("ct-organs", {"type": "ACCESSION_NUMBER", "accessionNumber": ["NOPE1"]},
                          web(site.pacs.dicomweb_url), [dimse("pacs-out")]))
    assert st["state"] == "failed" and "no study found for accession_number=NOPE1" \
        in st["message"], st
    assert site.healthy()


def test_pacs_down_fails_with_the_reason_and_a_retry_succeeds_once_it_is_back(
        site: Site, orthanc_factory: OrthancFactory) -> None:
    other = orthanc_factory(modalities={"NODE": (NODE_AE, "127.0.0.1",
                                                 site.node.settings.dimse.port)})
    site.config("POST", "source", {"name": "other-pacs", "ae_title": other.aet,
                                   "host": "127.0.0.1", "port": other.dicom_port})
    try:
        cr = chest(site, 105, other)
        body = request("cxr-findings", by_uid(str(cr.StudyInstanceUID)), dimse("other-pacs"),
                       [dimse("pacs-out")])
        other.stop()
        st = site.run(body)
        assert st["state"] == "failed", st
        assert st["attempts"] == 2  # retried with backoff (executor.retry), then given up
        assert "other-pacs" in st["message"] and "cannot associate" in st["message"], st
        assert st["exports"] == []
        assert site.healthy()
        other.restart()
        again = site.run({**body, "transactionID": body["transactionID"] + "-retry"})
        assert again["state"] == "succeeded", again
        assert_results_in_pacs(site.pacs, cr)
    finally:
        site.config("DELETE", "source/other-pacs")


def test_output_refusing_the_association_fails_the_job_and_succeeds_once_fixed(
        site: Site, orthanc_factory: OrthancFactory) -> None:
    strict = orthanc_factory(aet="STRICT", extra={"DicomCheckCalledAet": True})
    out = {"name": "strict-out", "type": "dimse", "ae_title": "WRONGAE", "host": "127.0.0.1",
           "port": strict.dicom_port, "retry": {"max_attempts": 2, "backoff_s": 0.2}}
    site.config("POST", "destination", out)
    try:
        cr = chest(site, 106)
        body = request("cxr-findings", by_uid(str(cr.StudyInstanceUID)), dimse("pacs"),
                       [dimse("strict-out")])
        st = site.run(body)
        assert st["state"] == "failed", st
        assert "strict-out" in st["message"] and "rejected the association" in st["message"]
        assert "called AE title not recognised" in st["message"]
        [export] = st["exports"]
        assert export["destination"] == "strict-out" and export["state"] == "failed"
        assert st["results"]  # the model did run; only the export failed
        assert site.healthy()
        site.config("PUT", "destination/strict-out", {**out, "ae_title": "STRICT"})
        again = site.run({**body, "transactionID": body["transactionID"] + "-retry"})
        assert again["state"] == "succeeded", again
        assert_results_in_pacs(strict, cr) if strict.find_study(str(cr.StudyInstanceUID)) \
            else pytest.fail("nothing arrived in the fixed destination")
    finally:
        site.config("DELETE", "destination/strict-out")


SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.mark.parametrize(("request_file", "study_files", "result_class"), [
    ("acr-cxr-dimse.json", ["cxr/pleural-effusion.dcm"], SC),
    ("acr-ct-accession.json", [f"ct/abdomen/IM{i:04d}.dcm" for i in range(1, 49)], SEG),
])
def test_the_sample_requests_work_as_shipped(site: Site, request_file: str,
                                             study_files: list[str], result_class: str) -> None:
    """What README tells a RIS integrator to send, sent unchanged to a PACS named 'pacs'."""
    site.pacs.upload(SAMPLES / f for f in study_files)
    body = json.loads((SAMPLES / "requests" / request_file).read_text())
    st = site.run(body)
    assert st["state"] == "succeeded", st
    study = str(pydicom.dcmread(SAMPLES / study_files[0], stop_before_pixels=True)
                .StudyInstanceUID)
    assert result_class in {i["sop_class"] for i in qido_instances(site.pacs, study)}


# -- the patient a request names, and accessions of several patients ------------------


def chest_of(site: Site, seed: int, patient_id: str,
             accession: str | None = None) -> pydicom.Dataset:
    """A CR chest phantom of ``patient_id`` (with ``accession``) loaded into the PACS."""
    path = write_dicom(make_cxr_phantom(seed), site.tmp / f"cr-{seed}.dcm", modality="CR",
                       patient_id=patient_id)
    ds = pydicom.dcmread(path)
    if accession is not None:
        ds.AccessionNumber = accession
        ds.save_as(path)
    site.pacs.upload([path])
    return ds


def results_in_pacs(pacs: Orthanc, study: pydicom.Dataset) -> int:
    """How many instances other than the source the PACS holds in the study."""
    return sum(i["sop"] != str(study.SOPInstanceUID)
               for i in qido_instances(pacs, str(study.StudyInstanceUID)))


def test_a_study_of_another_patient_than_the_request_names_is_not_retrieved(site: Site) -> None:
    real = chest_of(site, 211, "ACR-REAL")
    study = str(real.StudyInstanceUID)
    for source in (dimse("pacs"), web(site.pacs.dicomweb_url)):  # C-FIND, then QIDO-RS
        for named in ("ACR-OTHER", "acr-real"):  # compared case-sensitively
            st = site.run(request("cxr-findings", {**by_uid(study), "PatientID": named},
                                  source, [dimse("pacs-out")]))
            assert st["state"] == "failed" and st["attempts"] == 1, st
            why = (f"study {study} belongs to patient ACR-REAL on the PACS, not {named} "
                   "as the request says; not retrieved")
            [retrieved] = st["retrieval"]
            assert retrieved["state"] == "failed" and retrieved["message"] == why
            assert retrieved["PatientID"] == "ACR-REAL" and retrieved["received"] == 0
            assert why in st["message"]
            assert st["results"] == [] and st["exports"] == []
    assert results_in_pacs(site.pacs, real) == 0
    assert site.node.node is not None and site.node.node.store is not None
    assert site.node.node.store.get_instance(str(real.SOPInstanceUID)) is None  # not fetched
    # the patient it does belong to (trailing spaces are DICOM padding)
    st = site.run(request("cxr-findings", {**by_uid(study), "PatientID": "ACR-REAL "},
                          dimse("pacs"), [dimse("pacs-out")]))
    assert st["state"] == "succeeded", st
    [result] = st["results"]
    assert result["study"] == study and result["PatientID"] == "ACR-REAL"
    assert st["retrieval"][0]["PatientID"] == "ACR-REAL"


def test_of_two_studies_only_the_named_patients_is_processed(site: Site) -> None:
    mine, theirs = chest_of(site, 212, "ACR-MINE"), chest_of(site, 213, "ACR-THEIRS")
    details = {"type": "DICOM_UID", "PatientID": "ACR-MINE",
               "studies": [{"StudyInstanceUID": str(mine.StudyInstanceUID)},
                           {"StudyInstanceUID": str(theirs.StudyInstanceUID)}]}
    st = site.run(request("cxr-findings", details, dimse("pacs"), [dimse("pacs-out")]))
    assert st["state"] == "succeeded", st
    assert [r["study"] for r in st["results"]] == [str(mine.StudyInstanceUID)]
    assert st["results"][0]["PatientID"] == "ACR-MINE"
    refused = next(r for r in st["retrieval"] if r["study"] == str(theirs.StudyInstanceUID))
    assert refused["state"] == "failed" and "belongs to patient ACR-THEIRS" in refused["message"]
    assert "belongs to patient ACR-THEIRS on the PACS, not ACR-MINE" in st["message"]
    assert results_in_pacs(site.pacs, theirs) == 0 and results_in_pacs(site.pacs, mine) == 3


def test_an_accession_request_naming_another_patient_is_not_retrieved(site: Site) -> None:
    real = chest_of(site, 214, "ACR-REAL2", accession="ACRPID1")
    details = {"type": "ACCESSION_NUMBER", "accessionNumber": ["ACRPID1"],
               "PatientID": "ACR-OTHER"}
    st = site.run(request("cxr-findings", details, dimse("pacs"), [dimse("pacs-out")]))
    assert st["state"] == "failed" and st["attempts"] == 1, st
    assert (f"study {real.StudyInstanceUID} belongs to patient ACR-REAL2 on the PACS, not "
            "ACR-OTHER as the request says; not retrieved") in st["message"]
    assert results_in_pacs(site.pacs, real) == 0


def test_instances_of_another_patient_from_a_source_not_searched_are_not_processed(
        site: Site) -> None:
    """A DICOMweb source the request allows only RETRIEVE cannot be asked whose study it
    is: what arrives is checked instead."""
    real = chest_of(site, 215, "ACR-REAL3")
    read_only = web(site.pacs.dicomweb_url)
    read_only["connectionDetails"]["operations"] = ["RETRIEVE"]
    st = site.run(request("cxr-findings",
                          {**by_uid(str(real.StudyInstanceUID)), "PatientID": "ACR-OTHER"},
                          read_only, [dimse("pacs-out")]))
    assert st["state"] == "failed" and st["attempts"] == 1, st
    [retrieved] = st["retrieval"]
    assert retrieved["state"] == "failed" and retrieved["PatientID"] == "ACR-REAL3"
    assert retrieved["message"] == (f"the instances of {real.StudyInstanceUID} that arrived "
                                    "belong to patient ACR-REAL3, not ACR-OTHER as expected; "
                                    "not processed")
    assert st["results"] == [] and results_in_pacs(site.pacs, real) == 0


def test_an_accession_matching_studies_of_two_patients_is_refused(site: Site) -> None:
    p1 = chest_of(site, 216, "ACR-P1", accession="DUPACC")
    p2 = chest_of(site, 217, "ACR-P2", accession="DUPACC")
    alone = chest_of(site, 218, "ACR-P3", accession="ONEACC")
    why = ("accession number DUPACC matches studies of 2 patients on the PACS "
           "(ACR-P1, ACR-P2); none of them retrieved")
    for source in (dimse("pacs"), web(site.pacs.dicomweb_url)):
        st = site.run(request("cxr-findings",
                              {"type": "ACCESSION_NUMBER", "accessionNumber": ["DUPACC"]},
                              source, [dimse("pacs-out")]))
        assert st["state"] == "failed" and st["attempts"] == 1, st
        assert why in st["message"]
        assert {(r["study"], r["PatientID"], r["state"], r["message"])
                for r in st["retrieval"]} == {
            (str(p1.StudyInstanceUID), "ACR-P1", "failed", why),
            (str(p2.StudyInstanceUID), "ACR-P2", "failed", why)}
        assert st["results"] == [] and st["exports"] == []
    # with an accession of one patient beside it, that one alone is processed
    st = site.run(request("cxr-findings", {"type": "ACCESSION_NUMBER",
                                           "accessionNumber": ["DUPACC", "ONEACC"]},
                          dimse("pacs"), [dimse("pacs-out")]))
    assert st["state"] == "succeeded", st
    [result] = st["results"]
    assert result["study"] == str(alone.StudyInstanceUID) and result["PatientID"] == "ACR-P3"
    assert why in st["message"]
    assert results_in_pacs(site.pacs, p1) == 0 and results_in_pacs(site.pacs, p2) == 0
    assert results_in_pacs(site.pacs, alone) == 3
