"""The two-command promise: the default configuration, the shipped demo models and the
samples give real results to a newcomer who sends the samples with storescu."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.store import JobState, Store
from tests.support.node_process import ROOT, NodeProcess
from tests.support.peers import storescu

SAMPLES = ROOT / "samples"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "data")  # nothing but ports and the data directory changed
    yield n
    n.stop()


def finished_jobs(store: Store, count: int, node: NodeProcess) -> list:  # type: ignore[type-arg]
    while True:  # no time limit: pytest-timeout guards the test
        jobs = store.list_jobs()
        done = [j for j in jobs if j.state in (JobState.SUCCEEDED, JobState.FAILED)]
        if len(done) >= count:
            return done
        assert node.proc is not None and node.proc.poll() is None, node.log()
        time.sleep(0.2)


def test_samples_get_findings_and_organs(node: NodeProcess) -> None:
    node.start()
    cxr = SAMPLES / "cxr" / "pleural-effusion.dcm"
    ct = sorted((SAMPLES / "ct" / "abdomen").glob("*.dcm"))
    storescu(node.dicom_port, [cxr], "DICOMNODE")
    storescu(node.dicom_port, ct, "DICOMNODE")
    store = Store(f"sqlite:///{(node.data_dir / 'node.db').resolve()}").open()
    try:
        jobs = finished_jobs(store, 4, node)  # two studies x two pipelines
        last_word = {j.id: store.events(j.id)[-1].message for j in jobs}
    finally:
        store.close()
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [(j.pipeline, j.error) for j in jobs]
    cxr_study = pydicom.dcmread(cxr, stop_before_pixels=True).StudyInstanceUID
    by = {(j.pipeline, j.study_instance_uid == cxr_study): j for j in jobs}

    chest = by[("cxr-findings", True)].result
    assert chest["results"][0]["result"] == "Abnormal"
    present = [f["name"] for f in chest["results"][0]["findings"] if f["presence"]]
    assert "Pleural Effusion" in present
    names = {p.name for p in Path(chest["output_dir"]).rglob("*") if p.is_file()}
    assert {"SAMPLE-CXR-PLEURAL-EFFUSION_predictions.json",
            "SAMPLE-CXR-PLEURAL-EFFUSION_heatmap.png",
            "SAMPLE-CXR-PLEURAL-EFFUSION_sr.dcm"} <= names

    organs = by[("ct-organs", False)].result
    volumes = {s["name"]: s["volume_ml"] for s in organs["results"][0]["segments"]}
    assert set(volumes) == {"liver", "spleen", "right kidney", "left kidney"}
    assert all(v > 10 for v in volumes.values()), volumes
    seg = next(Path(organs["output_dir"]).rglob("*_seg.dcm"))
    assert pydicom.dcmread(seg, stop_before_pixels=True).Modality == "SEG"

    # each study only went through the pipeline its modality suits; the other skipped it
    for pipeline, is_cxr, modality in (("ct-organs", True, "CR"), ("cxr-findings", False, "CT")):
        result = by[(pipeline, is_cxr)].result
        assert result["results"] == [] and "output_dir" not in result
        assert modality in result["skipped"][0]["reason"], result
        # `dicom-node jobs show` says so, not a bare "done"
        assert last_word[by[(pipeline, is_cxr)].id] == f"skipped: {result['skipped'][0]['reason']}"
    assert last_word[by[("cxr-findings", True)].id] == "done"
