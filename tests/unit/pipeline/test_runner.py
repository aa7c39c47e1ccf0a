"""The pipeline runner end to end on tiny on-the-fly bundles (nothing special-cases the demos)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from pipeline.io import InputError
from pipeline.runner import (
    AxialView,
    PipelineError,
    PipelineRunner,
    label_map,
    overall_result,
    parallelism,
)
from pipeline.settings import (
    LabelCodeSpec,
    ModelSpec,
    PipelineSpec,
    SecondaryCaptureSpec,
    SeriesRules,
)
from pipeline.train.phantoms_ct import make_ct_phantom, write_dicom_series
from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom
from pipeline.types import Finding, SegmentationResult
from tests.unit.pipeline.dicom_samples import coronal_reformat, enhanced_ct
from tests.unit.pipeline.test_bundle import make_tiny_bundle

SEG_NET: dict[str, Any] = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                           "out_channels": 3, "channels": [4, 8], "strides": [2],
                           "num_res_units": 0}


def make_tiny_seg_bundle(folder: Path) -> Path:
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    net = ConfigParser({"network_def": dict(SEG_NET)}).get_parsed_content("network_def")
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    meta = {"name": "tinyseg", "version": "0.2.0", "task": "segment",
            "labels": ["background", "organ a", "organ b"]}
    inference = {"network_def": SEG_NET,
                 "preprocessing": {"_target_": "Compose", "transforms": [
                     {"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"},
                     {"_target_": "ScaleIntensityRange", "a_min": -200, "a_max": 300,
                      "b_min": 0.0, "b_max": 1.0, "clip": True}]},
                 "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 32, 32],
                             "sw_batch_size": 2}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    return folder


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("bundles")
    cls = make_tiny_bundle(root / "tiny")
    seg = make_tiny_seg_bundle(root / "tinyseg")
    r = PipelineRunner(
        [ModelSpec(name="tiny", path=cls, max_batch=4, max_delay_ms=2),
         ModelSpec(name="tinyseg", path=seg)],
        [PipelineSpec(name="cls", model="tiny", task="classify", threshold=0.01,
                      series=SeriesRules(modalities=["DX", "CR"]),
                      codes={"a": LabelCodeSpec(value="46621007", scheme="SCT",
                                                meaning="Atelectasis")}),
         PipelineSpec(name="never-normal", model="tiny", task="classify", threshold=0.99),
         PipelineSpec(name="cls-jpeg", model="tiny", task="classify", threshold=0.01,
                      secondary_capture=SecondaryCaptureSpec(compression="jpeg",
                                                             max_size=100)),
         PipelineSpec(name="seg", model="tinyseg", task="segment",
                      series=SeriesRules(modalities=["CT"], min_instances=4),
                      codes={"organ a": LabelCodeSpec(value="10200004", scheme="SCT",
                                                      meaning="Liver")})],
    )
    r.start()
    yield r
    r.close()


def test_classification_writes_every_artifact(runner: PipelineRunner, tmp_path: Path) -> None:
    src = write_dicom(make_cxr_phantom(7), tmp_path / "in" / "cr.dcm", patient_id="PAT7")
    out = runner.run("cls", [src], tmp_path / "out")
    assert out.result.result == "Abnormal"  # type: ignore[union-attr]
    names = sorted(a.path.name for a in out.artifacts)
    assert names == sorted(["PAT7_source_image.png", "PAT7_heatmap.png", "PAT7_predictions.json",
                            "PAT7_report.pdf", "PAT7_report.dcm", "PAT7_sr.dcm", "PAT7_sc.dcm"])
    pred = json.loads((tmp_path / "out" / "PAT7" / "PAT7_predictions.json").read_text())
    assert [f["name"] for f in pred["findings"]] == ["a", "b", "c"]
    assert pred["metadata"]["patient_id"] == "PAT7"
    sr = pydicom.dcmread(tmp_path / "out" / "PAT7" / "PAT7_sr.dcm")
    assert sr.StudyInstanceUID == pydicom.dcmread(src).StudyInstanceUID
    # the pipeline's code of label "a" (settings: codes) is its finding type in the SR
    groups = hd.sr.srread(tmp_path / "out" / "PAT7" / "PAT7_sr.dcm").content\
        .get_image_measurement_groups()
    types = {g.tracking_identifier: g.finding_type for g in groups[1:]}
    assert (types["a"].value, types["a"].scheme_designator) == ("46621007", "SCT")
    assert types["b"].scheme_designator == "99DCMNODE"



def test_a_pipeline_can_ask_for_a_smaller_jpeg_secondary_capture(
    runner: PipelineRunner, tmp_path: Path
) -> None:
    src = write_dicom(make_cxr_phantom(7), tmp_path / "in" / "cr.dcm", patient_id="PAT7")
    runner.run("cls-jpeg", [src], tmp_path / "out", outputs=["sc"])
    sc = pydicom.dcmread(tmp_path / "out" / "PAT7" / "PAT7_sc.dcm")
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert sc.LossyImageCompression == "01"
    assert max(sc.Rows, sc.Columns) == 100
    source = pydicom.dcmread(src)
    assert sc.Rows / sc.Columns == pytest.approx(source.Rows / source.Columns, abs=0.02)

def test_normal_has_no_heatmap_and_patient_override(runner: PipelineRunner,
                                                    tmp_path: Path) -> None:
    src = write_dicom(make_cxr_phantom(8), tmp_path / "cr.dcm")
    out = runner.run("never-normal", [src], tmp_path / "out", patient_id="override")
    assert out.result.result == "Normal"  # type: ignore[union-attr]
    pred = json.loads((tmp_path / "out" / "override" / "override_predictions.json").read_text())
    assert pred["heatmap"] == "" and pred["findings"]


def test_segmentation_writes_seg_and_volumes(runner: PipelineRunner, tmp_path: Path) -> None:
    files = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct",
                               patient_id="CT3")
    out = runner.run("seg", files[::-1], tmp_path / "out")  # order must not matter
    kinds = {a.kind for a in out.artifacts}
    assert {"seg", "json", "png"} <= kinds
    vols = json.loads(next(a.path for a in out.artifacts if a.kind == "json").read_text())
    assert vols
    seg = pydicom.dcmread(next(a.path for a in out.artifacts if a.kind == "seg"))
    assert seg.Modality == "SEG"
    # the pipeline's code of "organ a" (settings: codes) is its segmented property type
    kinds = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0]
             for s in seg.SegmentSequence}
    assert kinds["organ a"].CodeValue == "10200004"
    assert kinds["organ b"].CodingSchemeDesignator == "99DCMNODE"


def test_an_enhanced_ct_is_segmented_like_its_slices(runner: PipelineRunner,
                                                     tmp_path: Path) -> None:
    """The same CT as single-frame slices and as one multi-frame object gives the same
    labels, and SEGs that place them at the same positions: the multi-frame's SEG
    references its frames (listed highest first) one by one."""
    files = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct",
                               patient_id="CT3")
    mf = enhanced_ct([pydicom.dcmread(f) for f in files])
    mf_path = tmp_path / "mf" / "ct.dcm"
    mf_path.parent.mkdir()
    mf.save_as(mf_path)
    single = runner.run("seg", files, tmp_path / "single")
    multi = runner.run("seg", [mf_path], tmp_path / "multi")
    np.testing.assert_array_equal(multi.result.labels, single.result.labels)  # type: ignore[union-attr]
    segs = [hd.seg.segread(next(a.path for a in out.artifacts if a.kind == "seg"))
            for out in (single, multi)]
    a, b = (seg.get_volume(combine_segments=True) for seg in segs)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    first = segs[1].PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    ref = first.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID
    sr = pydicom.dcmread(next(a.path for a in multi.artifacts if a.kind == "sr"))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [[i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence]
            for s in evidence if s.SeriesInstanceUID == mf.SeriesInstanceUID] == [
                [mf.SOPInstanceUID]]
    # Two multi-frame objects of one series: a SEG cannot reference both; the rest is made.
    halves = []
    for n, part in enumerate((files[:8], files[8:])):
        half = enhanced_ct([pydicom.dcmread(f) for f in part],
                           SeriesInstanceUID=mf.SeriesInstanceUID)
        halves.append(tmp_path / "mf" / f"half{n}.dcm")
        half.save_as(halves[-1])
    two = runner.run("seg", halves, tmp_path / "two")
    np.testing.assert_array_equal(two.result.labels, single.result.labels)  # type: ignore[union-attr]
    assert {a.kind for a in two.artifacts} >= {"json", "sr"}
    assert "seg" not in {a.kind for a in two.artifacts}


def test_a_coronal_reformat_is_segmented_as_its_axial_series(runner: PipelineRunner,
                                                             tmp_path: Path) -> None:
    """A coronal series (a reformat sent on its own) is put in the axial order the
    model was trained on before it runs: its labels are the axial series' labels
    resliced, its volumes the same, and its SEG references its own slices. Fed as it
    came, the model saw the body on its side."""
    files = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct",
                               patient_id="CT3")
    coronal = coronal_reformat([pydicom.dcmread(f) for f in files])
    folder = tmp_path / "cor"
    folder.mkdir()
    paths = []
    for n, ds in enumerate(coronal):
        paths.append(folder / f"c{n:03d}.dcm")
        ds.save_as(paths[-1])
    axial = runner.run("seg", files, tmp_path / "axial")
    resliced = runner.run("seg", paths, tmp_path / "coronal")
    a, c = axial.result, resliced.result
    assert isinstance(a, SegmentationResult) and isinstance(c, SegmentationResult)
    assert c.labels.shape == (48, 16, 48)  # the coronal series' own slices
    np.testing.assert_array_equal(c.labels, np.transpose(a.labels, (1, 0, 2))[:, ::-1, :])
    assert [s.volume_ml for s in c.segments] == [s.volume_ml for s in a.segments]
    seg = hd.seg.segread(next(x.path for x in resliced.artifacts if x.kind == "seg"))
    refs = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for f in seg.PerFrameFunctionalGroupsSequence}
    assert refs <= {str(ds.SOPInstanceUID) for ds in coronal}


@pytest.mark.parametrize(("orientation", "axes", "flips"), [
    ([1, 0, 0, 0, 1, 0], (0, 1, 2), ()),           # axial, as scanners write it
    ([-1, 0, 0, 0, 1, 0], (0, 1, 2), (0, 2)),      # axial, rows mirrored
    ([1, 0, 0, 0, 0, -1], (1, 0, 2), (0,)),        # coronal
    ([0, 1, 0, 0, 0, -1], (1, 2, 0), (0, 2)),      # sagittal, seen from the left
    ([0.99, 0.14, 0, -0.14, 0.99, 0], (0, 1, 2), ()),  # axial, rotated a little
])
def test_axial_view_of_each_orientation(orientation: list[float], axes: tuple[int, ...],
                                        flips: tuple[int, ...]) -> None:
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    view = AxialView.of((tuple(row), tuple(col), tuple(np.cross(row, col))))
    assert (view.axes, view.flips) == (axes, flips)
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    np.testing.assert_array_equal(view.undo(view.apply(volume)), volume)
    assert view.spacing((5.0, 3.0, 1.0)) == tuple((5.0, 3.0, 1.0)[a] for a in axes)


def test_a_segmenter_with_an_input_size_is_warmed_up_and_traced_at_start(tmp_path: Path) -> None:
    folder = make_tiny_seg_bundle(tmp_path / "tinyseg")
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["spatial_size"] = [16, 32, 32]  # its sliding window's patch
    meta_path.write_text(json.dumps(meta))
    r = PipelineRunner([ModelSpec(name="tinyseg", path=folder)],
                       [PipelineSpec(name="seg", model="tinyseg", task="segment")])
    r.start()
    try:
        assert not r.failed
        model = r.registry.get("tinyseg")
        assert model._fast_tried and model._fast is not None  # before any study
        assert model._fast.sample_shape == (1, 16, 32, 32)
        assert r.engine.get("tinyseg").statistics().inference_count == 0  # not counted
    finally:
        r.close()


def test_bad_inputs_fail_with_a_message(runner: PipelineRunner, tmp_path: Path) -> None:
    src = write_dicom(make_cxr_phantom(9), tmp_path / "cr.dcm")
    with pytest.raises((InputError, PipelineError)):
        runner.run("seg", [src], tmp_path / "out")  # a radiograph to a CT model
    with pytest.raises(PipelineError, match="not configured"):
        runner.run("nope", [src], tmp_path / "out")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises((InputError, PipelineError)):
        runner.run("cls", [junk], tmp_path / "out")


def test_classify_many_shares_one_forward_pass(tmp_path: Path) -> None:
    from pipeline.io import load_image_2d

    bundle = make_tiny_bundle(tmp_path / "tiny")
    # A long delay and max_batch 4: the batch runs only once all four are in, so the
    # single forward pass below shows they were handed over together.
    r = PipelineRunner([ModelSpec(name="tiny", path=bundle, max_batch=4, max_delay_ms=10_000,
                                  workers=1)],
                       [PipelineSpec(name="cls", model="tiny", task="classify", threshold=0.01)])
    r.start()
    try:
        images = [load_image_2d(write_dicom(make_cxr_phantom(s), tmp_path / f"{s}.dcm",
                                            patient_id=f"P{s}")) for s in (11, 12, 13, 14)]
        before = r.engine.get("tiny").statistics().execution_count
        out = r.classify_many(r.spec("cls"), images, [None, "X", None, None], explain=False)
        stats = r.engine.get("tiny").statistics()
        assert stats.execution_count == before + 1
        assert [b.batch_size for b in stats.batch_stats] == [4]
        assert [study.patient_id for _, study in out] == ["P11", "X", "P13", "P14"]
        assert [res.sop_instance_uid for res, _ in out] == [i.sop_instance_uid for i in images]
        for (res, _), image in zip(out, images, strict=True):
            assert res.result != "Normal" and res.heatmap is None  # explain=False
            assert res.image is image.pixels
        with pytest.raises(ValueError, match="2 patient IDs given for 4 images"):
            r.classify_many(r.spec("cls"), images, ["a", "b"])
    finally:
        r.close()


def test_several_versions_of_one_model_each_load_and_serve(tmp_path: Path) -> None:
    """Two bundles of one model whose versions come from their metadata.json: both load,
    the default is the one the spec marks, and a pipeline can pin the other."""
    from pipeline.io import load_image_2d

    old = make_tiny_bundle(tmp_path / "v1", version="1.0.0")
    new = make_tiny_bundle(tmp_path / "v2", version="2.0.0")
    r = PipelineRunner([ModelSpec(name="tiny", path=old, default=False, warmup=False),
                        ModelSpec(name="tiny", path=new, default=True, warmup=False)],
                       [PipelineSpec(name="now", model="tiny", task="classify"),
                        PipelineSpec(name="then", model="tiny", model_version="1.0.0",
                                     task="classify")])
    r.start()
    try:
        assert r.failed == {}
        assert r.model("tiny").version == "2.0.0"
        assert r.model("tiny", "1.0.0").version == "1.0.0"
        assert sorted(r.engine.get("tiny", v).version for v in ("1.0.0", "2.0.0")) == [
            "1.0.0", "2.0.0"]
        image = load_image_2d(write_dicom(make_cxr_phantom(5), tmp_path / "5.dcm"))
        for pipeline, version in (("now", "2.0.0"), ("then", "1.0.0")):
            result, _ = r.classify(r.spec(pipeline), image, explain=False)
            assert result.model_version == version
    finally:
        r.close()


@pytest.mark.parametrize(("pid", "named"), [(None, "scan-7"), ("", "scan-7"),
                                             ("12/34", "12_34"), ("../..", "scan-7"),
                                             ("SMITH..J", "SMITH.J"),
                                             ("ÜNÏ/../CODE", "N_._CODE"),
                                             # a broken sender's 5,000 characters: the
                                             # folder failed ENAMETOOLONG, every attempt
                                             ("A" * 5000, "A" * 51 + "-260679791fa8")])
def test_results_of_a_source_whose_patient_id_cannot_name_a_folder(
        runner: PipelineRunner, tmp_path: Path, pid: str | None, named: str) -> None:
    """No PatientID (anonymised), an empty one, one with a path separator or with '..'
    inside: the results are named by the ID's safe characters, else by the file, never
    outside out_dir."""
    path = write_dicom(make_cxr_phantom(7), tmp_path / "scan-7.dcm")
    ds = pydicom.dcmread(path)
    if pid is None:
        del ds.PatientID
    else:
        ds.PatientID = pid
    ds.save_as(path)
    out = runner.run("cls", [path], tmp_path / "out", outputs=["json", "sr"])
    assert out.study.patient_id == named
    assert {a.path.parent for a in out.artifacts} == {tmp_path / "out" / named}


def test_classify_explains_unless_told_not_to(runner: PipelineRunner, tmp_path: Path) -> None:
    from pipeline.io import load_image_2d

    image = load_image_2d(write_dicom(make_cxr_phantom(15), tmp_path / "cr.dcm"))
    explained, _ = runner.classify(runner.spec("cls"), image)
    bare, _ = runner.classify(runner.spec("cls"), image, explain=False)
    assert explained.heatmap is not None and bare.heatmap is None
    assert [f.confidence for f in bare.findings] == [f.confidence for f in explained.findings]


def test_embedding_and_overall_result(runner: PipelineRunner) -> None:
    import numpy as np

    vec = runner.embed(np.zeros((64, 64), np.float32), "tiny")
    assert len(vec) > 1
    assert overall_result([Finding("Tuberculosis", True, 0.9)]) == "TB Presumptive"
    assert overall_result([Finding("Fibrosis", False, 0.1)]) == "Normal"


def test_an_embedding_counts_in_the_models_statistics(runner: PipelineRunner) -> None:
    """It runs outside the batcher (on the Grad-CAM copy), yet /metrics must show it: a
    success of batch size 1, and a failure when it cannot run."""
    served = runner.engine.get("tiny")
    before = served.statistics()
    runner.embed(np.zeros((64, 64), np.float32), "tiny")
    ok = served.statistics()
    assert ok.success.count == before.success.count + 1
    assert ok.inference_count == before.inference_count + 1
    assert ok.execution_count == before.execution_count + 1
    assert ok.compute_infer.count == before.compute_infer.count + 1
    assert ok.fail == before.fail
    size1 = {b.batch_size: b for b in ok.batch_stats}[1]
    was = {b.batch_size: b.compute_infer.count for b in before.batch_stats}.get(1, 0)
    assert size1.compute_infer.count == was + 1
    assert ok.last_inference_ms is not None
    with pytest.raises(RuntimeError):  # a 4-D array: its Resize cannot take it
        runner.embed(np.zeros((2, 3, 4, 5), np.float32), "tiny")
    failed = served.statistics()
    assert failed.fail.count == ok.fail.count + 1
    assert failed.success == ok.success and failed.inference_count == ok.inference_count


def test_label_map_is_the_argmax_slab_by_slab() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 37, 6, 7)  # 37 slices: the last slab is partial
    labels = label_map(logits, slab=16)
    assert labels.dtype == np.uint8 and labels.shape == (37, 6, 7)
    np.testing.assert_array_equal(labels, logits.argmax(dim=0).numpy())
    with pytest.raises(PipelineError, match="300 output channels"):
        label_map(torch.zeros(300, 2, 2, 2))


def test_channel_argmax_takes_the_first_maximum_like_torch() -> None:
    from pipeline.runner import channel_argmax

    scores = torch.tensor([[0.0, 2.0, 1.0, -1.0],
                           [0.0, 2.0, 3.0, -5.0],
                           [0.0, 1.0, 3.0, -1.0]])  # ties: 0 (all), 0/1, 1/2, 0/2
    out = torch.full((4,), 9, dtype=torch.uint8)
    channel_argmax(scores, out)
    assert out.tolist() == scores.argmax(dim=0).tolist() == [0, 0, 1, 0]
    strided = torch.randn(6, 4, 5).transpose(0, 1)  # 4 channels, not contiguous
    out = torch.empty((6, 5), dtype=torch.uint8)
    channel_argmax(strided, out)
    np.testing.assert_array_equal(out.numpy(), strided.argmax(dim=0).numpy())


def _loaded(task: str, device: str = "cpu") -> Any:
    from pipeline.bundle import LoadedModel

    return LoadedModel(name="m", version="1", task=task, labels=["a"], spatial_size=None,
                       network=torch.nn.Identity(), path=Path("."), source="state_dict",
                       device=torch.device(device))


@pytest.mark.parametrize("task, device, cpus, spec, expected", [
    ("classify", "cpu", 2, {}, (2, 1)),
    ("classify", "cpu", 16, {}, (2, 8)),
    ("classify", "cpu", 1, {}, (1, None)),
    ("segment", "cpu", 8, {}, (1, None)),
    ("classify", "cuda", 8, {}, (1, None)),
    ("classify", "cpu", 8, {"workers": 4}, (4, 2)),
    ("classify", "cpu", 8, {"workers": 1, "threads": 3}, (1, 3)),
    ("segment", "cpu", 8, {"threads": 2}, (1, 2)),
])
def test_parallelism(task: str, device: str, cpus: int, spec: dict[str, int],
                     expected: tuple[int, int | None]) -> None:
    s = ModelSpec(name="m", path=Path("."), **spec)
    assert parallelism(s, _loaded(task, device), cpus) == expected


def test_model_grid_from_the_training_spacing() -> None:
    from pipeline.runner import model_grid

    trained = (5.0, 4.0, 4.0)
    assert model_grid((48, 96, 96), (5.0, 4.0, 4.0), trained) is None
    assert model_grid((48, 96, 96), (5.2, 3.9, 4.1), trained) is None  # within 10 %
    assert model_grid((300, 512, 512), (1.0, 0.75, 0.75), trained) == (60, 96, 96)
    assert model_grid((20, 64, 64), (10.0, 4.0, 4.0), trained) == (40, 64, 64)
    assert model_grid((48, 96, 96), (1.0, 1.0, 1.0), None) is None


def test_resample_shrinks_by_area_and_grows_linearly() -> None:
    from pipeline.runner import resample

    x = torch.zeros(1, 4, 8, 8)
    x[:, :, :4] = 1.0  # upper half of every slice
    small = resample(x, (4, 4, 4))
    assert small.shape == (1, 4, 4, 4)
    assert torch.allclose(small[0, :, :2], torch.ones(4, 2, 4))  # area: exact averages
    assert torch.allclose(small[0, :, 2:], torch.zeros(4, 2, 4))
    mixed = resample(x, (8, 4, 4))  # z grows while y and x shrink
    assert mixed.shape == (1, 8, 4, 4) and float(mixed.max()) == pytest.approx(1.0)


def test_resampled_label_map_matches_full_interpolation() -> None:
    from pipeline.runner import resampled_label_map

    torch.manual_seed(3)
    logits = torch.randn(3, 5, 6, 7)
    full = torch.nn.functional.interpolate(logits[None], size=(11, 13, 9), mode="trilinear",
                                           align_corners=False)[0].argmax(0)
    got = resampled_label_map(logits, (11, 13, 9), slab=4)
    assert got.dtype == np.uint8 and got.shape == (11, 13, 9)
    assert (got == full.numpy()).mean() > 0.999  # float rounding at ties only


def test_demo_ct_model_segments_a_finer_ct_at_its_training_spacing(tmp_path: Path) -> None:
    """A CT at 2 x 1.5 x 1.5 mm (the model was trained at 5 x 4 x 4 mm) is resampled for the
    model and the labels come back at the CT's own grid, with plausible organ volumes."""
    from pipeline.train.phantoms_ct import LABELS

    models = Path(__file__).resolve().parents[3] / "pipeline" / "models"
    ph = make_ct_phantom(900001, shape=(120, 256, 256), spacing=(2.0, 1.5, 1.5))
    files = write_dicom_series(ph, tmp_path / "ct", patient_id="FINE")
    r = PipelineRunner([ModelSpec(name="ct-organs", path=models / "ct-organs")],
                       [PipelineSpec(name="seg", model="ct-organs", task="segment",
                                     series=SeriesRules(modalities=["CT"]))])
    r.start()
    try:
        out = r.run("seg", files, tmp_path / "out", outputs=["json"])
    finally:
        r.close()
    labels = out.result.labels  # type: ignore[union-attr]
    assert labels.shape == ph.labels.shape
    for i, name in enumerate(LABELS[1:], start=1):
        a, b = labels == i, ph.labels == i
        dice = 2 * float((a & b).sum()) / float(a.sum() + b.sum())
        assert dice >= 0.8, (name, dice)  # without resampling: spleen 0.26, left kidney 0.07


def _failure_at_start(folder: Path, task: str = "segment") -> str:
    """What a runner with only this model (and a pipeline of ``task``) reports for it at
    start ('' when it loads)."""
    r = PipelineRunner([ModelSpec(name="m", path=folder)],
                       [PipelineSpec(name="m", model="m", task=task)])
    r.start()
    r.close()
    return r.failed.get("m", "")


def test_a_segmenter_of_2d_images_is_refused_at_start_with_the_reason(
        tmp_path: Path) -> None:
    """A 2-D segmentation model (a radiograph's lungs) has no pipeline to run in: it is
    reported at start, not failed on every radiograph with "ImageOrientationPatient is
    missing ... a volume needs it"."""
    folder = make_tiny_seg_bundle(tmp_path / "seg2d")
    net = {**SEG_NET, "spatial_dims": 2}
    from monai.bundle import ConfigParser

    torch.save(ConfigParser({"n": net}).get_parsed_content("n").state_dict(),
               folder / "models" / "model.pt")
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    inference["network_def"] = net
    del inference["inferer"]
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    (folder / "configs" / "metadata.json").write_text(
        json.dumps({**meta, "spatial_size": [32, 32]}))
    assert "segments 2-D images; the node segments 3-D series" in _failure_at_start(folder)


def test_a_model_of_several_distinct_input_channels_is_refused_with_them(
        tmp_path: Path) -> None:
    """A network whose four channels are four MR sequences (BraTS) cannot be fed one
    series repeated four times: it is reported at start, naming the channels."""
    folder = make_tiny_seg_bundle(tmp_path / "brats")
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    meta["network_data_format"] = {"inputs": {"image": {
        "num_channels": 4, "channel_def": {"0": "t1c", "1": "t1", "2": "t2", "3": "flair"}}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert "takes 4 channels (t1c, t1, t2, flair)" in _failure_at_start(folder)


def test_a_transform_the_bundle_cannot_make_fails_the_model_at_start(
        tmp_path: Path) -> None:
    """A slip in a bundle's preprocessing (a misspelt transform) shows at start, in the
    failed models the node reports, not as the first study's failure."""
    bundle = make_zoo_bundle(tmp_path / "zoo")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    inference["preprocessing"]["transforms"][-1]["_target_"] = "EnsureTypd"
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    failure = _failure_at_start(bundle)
    assert "cannot instantiate 'preprocessing'" in failure and "EnsureTypd" in failure


def test_a_pipeline_whose_task_is_not_its_models_is_named(tmp_path: Path) -> None:
    """``task: segment`` on a classifier: every job would fail; the runner names the
    pipeline at start (the node logs it with the failed models)."""
    r = PipelineRunner([ModelSpec(name="tiny", path=make_tiny_bundle(tmp_path / "tiny"))],
                       [PipelineSpec(name="wrong", model="tiny", task="segment"),
                        PipelineSpec(name="right", model="tiny", task="classify"),
                        PipelineSpec(name="absent", model="nope", task="classify")])
    r.start()
    try:
        assert r.mismatched() == {
            "wrong": "task segment, but model 'tiny' classifies (its metadata)"}
    finally:
        r.close()


def test_a_model_that_cannot_run_its_warm_up_is_reported_not_raised(tmp_path: Path) -> None:
    """A bundle that loads but cannot run on its own declared input size fails alone: the
    runner (and so the node) starts, with the reason in ``failed``, and the other
    models serve."""
    broken = make_tiny_bundle(tmp_path / "broken")
    meta_path = broken / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [2, 2]  # pools to 0
    meta_path.write_text(json.dumps(meta))
    good = make_tiny_bundle(tmp_path / "good")
    r = PipelineRunner([ModelSpec(name="broken", path=broken), ModelSpec(name="good", path=good)],
                       [])
    try:
        r.start()
        assert list(r.failed) == ["broken"]
        assert r.failed["broken"].startswith("EngineError: warm-up of model broken")
        assert r.predict(np.zeros((40, 40), np.float32), "good").labels == ["a", "b", "c"]
    finally:
        r.close()


def test_a_series_too_large_for_the_memory_left_is_refused_before_loading(
    runner: PipelineRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rather than have the kernel kill the node: more than the machine has is a
    PipelineError saying what to send instead; more than is free now is NotEnoughMemory,
    which the scheduler retries."""
    import pipeline.runner as runner_module
    from pipeline.runner import SEGMENT_BYTES_PER_VOXEL, NotEnoughMemory, PipelineError

    files = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct")
    need = 16 * 48 * 48 * SEGMENT_BYTES_PER_VOXEL
    monkeypatch.setattr(runner_module, "memory_left", lambda: (need // 2, need // 2))
    with pytest.raises(PipelineError, match=r"16 slices of 48 x 48\) takes about .* more "
                                            r"than the 0\.0 GB this machine"):
        runner.run("seg", files, tmp_path / "a")
    monkeypatch.setattr(runner_module, "memory_left", lambda: (need // 2, need * 4))
    with pytest.raises(NotEnoughMemory, match="free now; the job is tried again later"):
        runner.run("seg", files, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    monkeypatch.setattr(runner_module, "memory_left", lambda: (need * 2, need * 4))
    assert runner.run("seg", files, tmp_path / "c").artifacts
    mf = tmp_path / "mf.dcm"  # a multi-frame object counts its frames
    enhanced_ct([pydicom.dcmread(f) for f in files]).save_as(mf)
    monkeypatch.setattr(runner_module, "memory_left", lambda: (need // 2, need * 4))
    with pytest.raises(NotEnoughMemory, match=r"16 slices of 48 x 48"):
        runner.run("seg", [mf], tmp_path / "d")


def test_memory_left_reads_the_machine_and_its_container(tmp_path: Path) -> None:
    from pipeline.resources import memory_left

    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cgroup.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\n"
                                  "MemAvailable:    8000000 kB\n")
    assert memory_left(proc, cgroup) == (8_192_000_000, 16_384_000_000)
    (cgroup / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert memory_left(proc, cgroup) == (8_192_000_000, 16_384_000_000)
    (cgroup / "memory.max").write_text("4000000000\n")  # a container of 4 GB
    (cgroup / "memory.current").write_text("3000000000\n")
    (cgroup / "memory.stat").write_text("anon 2500000000\ninactive_file 500000000\n")
    assert memory_left(proc, cgroup) == (1_500_000_000, 4_000_000_000)
    assert memory_left(tmp_path / "nowhere", cgroup) is None


def make_zoo_bundle(folder: Path, pixdim: tuple[float, float, float] = (3.0, 3.0, 2.5),
                    labels_first: bool = False) -> Path:
    """A bundle written as the MONAI Model Zoo writes them (spleen_ct_segmentation's
    layout): dictionary transforms from a LoadImaged to a SaveImaged, reoriented to RAS
    and resampled to its own spacing, an Invertd back, references between the sections
    (``@preprocessing``, ``@bundle_root``) and keys from ``network_data_format``. Its
    network is a 1x1x1 convolution that labels what is brighter than 0 HU, so where its
    labels must land is known. Its sections refer to settings elsewhere in the file, as
    wholeBody_ct_segmentation's do; ``labels_first`` takes the argmax before the Invertd
    (nearest), as that bundle does, instead of after it."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    weight = torch.zeros(2, 1, 1, 1, 1)
    weight[1] = 20.0  # channel 1 wins where the scaled value is above 0.5 (0 HU)
    torch.save({"weight": weight, "bias": torch.tensor([0.0, -10.0])},
               folder / "models" / "model.pt")
    argmax = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}
    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
              "orig_keys": "@image_key", "nearest_interp": labels_first, "to_tensor": True}
    inference = {
        "displayable_configs": {"highres": True, "sw_batch_size": 2},
        "imports": ["$import glob", "$import os"],
        "image_key": "image",
        "num_classes": 2,
        "pixdim": f"$[{pixdim[0]}, {pixdim[1]}, {pixdim[2]}] if "
                  "@displayable_configs#highres else [9.0, 9.0, 9.0]",
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob('/nonexistent/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1,
                        "out_channels": "@num_classes", "kernel_size": 1},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim",
             "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -1000,
             "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True},
            {"_target_": "EnsureTyped", "keys": "@image_key"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16],
                    "sw_batch_size": "@displayable_configs#sw_batch_size", "overlap": 0.25},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            *([argmax, invert] if labels_first else [invert, argmax]),
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir",
             "output_ext": ".nii.gz"}]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                      "val_data_loader": "@dataloader", "network": "@network"},
    }
    meta = {"version": "0.2.0", "task": "Decathlon style threshold segmentation",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "hounsfield",
                                     "num_channels": 1, "spatial_shape": [32, 32, 16]}},
                "outputs": {"pred": {"type": "image", "format": "segmentation",
                                     "num_channels": 2,
                                     "channel_def": {"0": "background", "1": "tissue"}}}}}
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    return folder


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("labels_first", [False, True])
def test_a_model_zoo_bundle_runs_its_own_transforms_on_the_series(tmp_path: Path,
                                                                   labels_first: bool) -> None:
    """A Model Zoo bundle failed every job ("applying transform LoadImaged"): its
    transforms take dictionaries from a file loader. The node now hands them what
    LoadImaged would have made of the series (its geometry as a RAS affine) and leaves
    out the loader and the writer. The labels land where the tissue is, in the series'
    own slice order, for an axial series and for a coronal reformat of it."""
    from pipeline.io import load_ct_volume

    bundle = make_zoo_bundle(tmp_path / "zoo", labels_first=labels_first)
    r = PipelineRunner([ModelSpec(name="zoo", path=bundle)],
                       [PipelineSpec(name="zoo", model="zoo", task="segment")])
    r.start()
    try:
        assert r.failed == {}
        model = r.model("zoo")
        assert model.io_keys == ("image", "pred") and model.task == "segment"
        assert model.labels == ["background", "tissue"]
        files = write_dicom_series(make_ct_phantom(5, shape=(16, 48, 40)), tmp_path / "ct",
                                   patient_id="ZOO")
        out = r.run("zoo", files, tmp_path / "out")
        labels = out.result.labels  # type: ignore[union-attr]
        tissue = load_ct_volume(files).array > 0
        assert labels.shape == tissue.shape == (16, 48, 40)
        assert _dice(labels == 1, tissue) > 0.9
        assert _dice(labels == 1, tissue[:, :, ::-1]) < 0.85  # a mirror would show
        assert _dice(labels == 1, tissue[::-1]) < 0.85
        assert {a.kind for a in out.artifacts} >= {"json", "seg"}
        assert not (bundle / "eval").exists()  # its SaveImaged was left out

        coronal = coronal_reformat([pydicom.dcmread(f) for f in files])
        paths = []
        for n, ds in enumerate(coronal):
            paths.append(tmp_path / f"c{n:03d}.dcm")
            ds.save_as(paths[-1])
        resliced = r.run("zoo", paths, tmp_path / "coronal").result.labels  # type: ignore[union-attr]
        assert resliced.shape == (48, 16, 40)
        as_coronal = np.transpose(labels, (1, 0, 2))[:, ::-1, :]
        assert _dice(resliced == 1, as_coronal == 1) > 0.9
    finally:
        r.close()


def test_a_model_zoo_bundle_sees_the_series_in_ras_order(tmp_path: Path) -> None:
    """What the network of a Model Zoo bundle gets: the series as MONAI's loader and
    Orientationd(RAS) would give it, indices growing to the patient's right, anterior
    and superior: an axial series (columns to the left, rows to the back) arrives with
    both in-plane axes reversed, and a coronal reformat of it arrives the same."""
    from pipeline.bundle import load_model
    from pipeline.io import load_ct_volume

    phantom = make_ct_phantom(5, shape=(16, 48, 40))  # spacing z 5, y 4, x 4 mm
    model = load_model(make_zoo_bundle(tmp_path / "zoo", pixdim=(4.0, 4.0, 5.0)))
    files = write_dicom_series(phantom, tmp_path / "ct", patient_id="ZOO")
    axial = load_ct_volume(files)
    x, _ = model.prepare(axial.array, axial.affine())
    hu = np.transpose(axial.array, (2, 1, 0))[::-1, ::-1, :]  # (x, y, z) as R, A, S
    expected = np.clip((hu + 1000) / 2000, 0, 1)
    assert tuple(x.shape) == (1, 40, 48, 16)
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-4)

    coronal = coronal_reformat([pydicom.dcmread(f) for f in files])
    for n, ds in enumerate(coronal):
        ds.save_as(tmp_path / f"c{n:03d}.dcm")
    resliced = load_ct_volume(sorted(tmp_path.glob("c*.dcm")))
    y, _ = model.prepare(resliced.array, resliced.affine())
    np.testing.assert_allclose(y.numpy(), x.numpy(), atol=1e-4)


def _rewrite_zoo(bundle: Path, pre: Any = None, post: Any = None) -> Path:
    """``bundle``'s inference.json with its pre/postprocessing transforms filtered or
    extended by ``pre(list) -> list`` and ``post(list) -> list``."""
    path = bundle / "configs" / "inference.json"
    inference = json.loads(path.read_text())
    for key, change in (("preprocessing", pre), ("postprocessing", post)):
        if change is not None:
            inference[key]["transforms"] = change(inference[key]["transforms"])
    path.write_text(json.dumps(inference))
    return bundle


def _no_invertd(ts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in ts if t["_target_"] != "Invertd"]


def test_a_model_zoo_bundle_that_does_not_invert_its_resampling_says_so(
        tmp_path: Path) -> None:
    """A bundle that resamples in its preprocessing and has no Invertd gives labels on
    its own grid: it is refused at start saying what the bundle lacks."""
    bundle = _rewrite_zoo(make_zoo_bundle(tmp_path / "zoo"), post=_no_invertd)
    failure = _failure_at_start(bundle)
    assert "its preprocessing has Orientationd, Spacingd and its postprocessing no " \
           "Invertd" in failure


def test_a_model_zoo_bundle_that_reorients_without_invertd_is_refused_not_mirrored(
        tmp_path: Path) -> None:
    """Orientationd(RAS) and no Invertd: on an axial LPS series the prediction has the
    series' shape but runs right-to-left and front-to-back, and the SEG came out
    mirrored (Dice 0) without a word. The model is refused at start; and a bundle's
    prediction whose affine is not the series' (a Zoomd the load check does not know)
    fails the job rather than giving displaced labels."""
    from pipeline.bundle import BundleError, load_model
    from pipeline.io import load_ct_volume

    def orientation_only(ts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [t for t in ts if t["_target_"] != "Spacingd"]

    bundle = _rewrite_zoo(make_zoo_bundle(tmp_path / "zoo"), pre=orientation_only,
                          post=_no_invertd)
    failure = _failure_at_start(bundle)
    assert "its preprocessing has Orientationd and its postprocessing no Invertd" in failure
    assert "would land mirrored" in failure

    # Without the runner's check: the prediction's geometry gives it away.
    model = load_model(bundle)
    volume = load_ct_volume(write_dicom_series(make_ct_phantom(5, shape=(16, 48, 40)),
                                               tmp_path / "ct"))
    x, context = model.prepare(volume.array, volume.affine())
    assert tuple(x.shape[1:]) == (40, 48, 16)  # the shape alone would not tell
    with pytest.raises(BundleError, match="not on the series' grid .* needs an Invertd"):
        model.finish(model.infer(x[None])[0], context)

    def zoom(ts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [*orientation_only(ts)[:2], {"_target_": "Zoomd", "keys": "image",
                                            "zoom": 1.25, "keep_size": True},
                *orientation_only(ts)[3:]]

    zoomed = _rewrite_zoo(make_zoo_bundle(tmp_path / "zoomed"), pre=zoom, post=_no_invertd)
    r = PipelineRunner([ModelSpec(name="zoo", path=zoomed)],
                       [PipelineSpec(name="zoo", model="zoo", task="segment")])
    r.start()
    try:
        assert r.failed == {}
        with pytest.raises(PipelineError, match="not on the series' grid"):
            r.run("zoo", volume.paths, tmp_path / "out")  # type: ignore[arg-type]
        assert not (tmp_path / "out").exists()
    finally:
        r.close()


def test_a_model_on_a_device_the_machine_lacks_fails_alone_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device: cuda`` on a machine without CUDA stopped the node at start with torch's
    "AssertionError: Torch not compiled with CUDA enabled": that model now fails to load
    with the reason, and the others serve."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = PipelineRunner([ModelSpec(name="gpu", path=make_tiny_bundle(tmp_path / "gpu"),
                                  device="cuda"),
                        ModelSpec(name="cpu", path=make_tiny_bundle(tmp_path / "cpu"))], [])
    try:
        r.start()
        assert list(r.failed) == ["gpu"]
        assert "device cuda is not available on this machine" in r.failed["gpu"]
        assert r.predict(np.zeros((40, 40), np.float32), "cpu").labels == ["a", "b", "c"]
        with pytest.raises(KeyError, match="failed to load: .*device cuda is not available"):
            r.model("gpu")
    finally:
        r.close()


def _without_gradcam_layer(folder: Path, layer: str | None = None) -> Path:
    meta_path = folder / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("gradcam_target_layer")
    if layer is not None:
        meta["gradcam_target_layer"] = layer
    meta_path.write_text(json.dumps(meta))
    return folder


def test_a_classifier_without_a_grad_cam_layer_gives_findings_without_a_heatmap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``gradcam_target_layer``: every study that was not Normal failed with
    "internal error: BundleError: no 'gradcam_target_layer'", even for outputs that show
    no heatmap. Now the findings come without one (JSON heatmap "", the report says why,
    no heatmap PNG or Secondary Capture), and the runner notes it once at start."""
    import pipeline.runner as runner_module

    folder = _without_gradcam_layer(make_tiny_bundle(tmp_path / "nocam"))
    r = PipelineRunner([ModelSpec(name="nocam", path=folder)],
                       [PipelineSpec(name="all", model="nocam", task="classify",
                                     threshold=0.01),
                        PipelineSpec(name="json-sr", model="nocam", task="classify",
                                     threshold=0.01, outputs=["json", "sr"])])
    r.start()
    try:
        assert r.failed == {}
        assert r.notes == {"nocam": ["findings come without a heatmap: no Grad-CAM layer "
                                     "in the model's metadata"]}
        src = write_dicom(make_cxr_phantom(7), tmp_path / "cr.dcm", patient_id="P")
        out = r.run("all", [src], tmp_path / "out")
        assert out.result.result == "Abnormal"  # type: ignore[union-attr]
        assert out.result.heatmap is None  # type: ignore[union-attr]
        names = sorted(a.path.name for a in out.artifacts)
        assert names == sorted(["P_source_image.png", "P_predictions.json", "P_report.pdf",
                                "P_report.dcm", "P_sr.dcm"])
        pred = json.loads((tmp_path / "out" / "P" / "P_predictions.json").read_text())
        assert pred["heatmap"] == "" and pred["result"] == "Abnormal"
        assert r.run("json-sr", [src], tmp_path / "out2").artifacts

        # A model that has a layer runs Grad-CAM only for outputs that show the heatmap.
        calls: list[str] = []
        monkeypatch.setattr(runner_module, "gradcam",
                            lambda *a, **k: calls.append("gradcam") or np.zeros((4, 4)))
        tiny = PipelineRunner([ModelSpec(name="tiny", path=make_tiny_bundle(tmp_path / "t"))],
                              [PipelineSpec(name="sr", model="tiny", task="classify",
                                            threshold=0.01, outputs=["sr"])])
        tiny.start()
        try:
            assert tiny.notes == {}
            assert tiny.run("sr", [src], tmp_path / "out3").artifacts and calls == []
        finally:
            tiny.close()
    finally:
        r.close()


def test_a_grad_cam_layer_the_network_lacks_is_refused_at_start_with_close_names(
        tmp_path: Path) -> None:
    folder = _without_gradcam_layer(make_tiny_bundle(tmp_path / "badcam"),
                                    "class_layers.rleu")
    failure = _failure_at_start(folder, "classify")
    assert "Grad-CAM target layer 'class_layers.rleu' (gradcam_target_layer) is not a " \
           "layer of the network; closest: class_layers.relu" in failure


def _set_labels(folder: Path, labels: list[str]) -> Path:
    meta_path = folder / "configs" / "metadata.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "labels": labels}))
    return folder


def test_labels_and_network_outputs_that_differ_in_number_are_refused_at_start(
        tmp_path: Path) -> None:
    """Three labels for four outputs dropped the fourth score silently (and three for
    two would have named findings after the wrong outputs): the warm-up's output is
    checked against the labels, for classifiers and for segmenters (background
    included). Loaded without a warm-up, the job fails with the same reason."""
    classifier = _set_labels(make_tiny_bundle(tmp_path / "cls"), ["a", "b"])
    assert "the network gives 3 outputs, its metadata names 2 labels (a, b)" in \
        _failure_at_start(classifier, "classify")
    segmenter = _set_labels(make_tiny_seg_bundle(tmp_path / "seg"), ["organ a", "organ b"])
    files = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct")
    r = PipelineRunner([ModelSpec(name="m", path=segmenter)],  # no input size: no warm-up
                       [PipelineSpec(name="m", model="m", task="segment")])
    r.start()
    try:
        with pytest.raises(PipelineError, match="the network gives 3 output channels, its "
                                                "metadata names 2 labels, background included"):
            r.run("m", files, tmp_path / "seg-out")
    finally:
        r.close()
    meta_path = segmenter / "configs" / "metadata.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()),
                                     "spatial_size": [16, 32, 32]}))
    assert "the network gives 3 output channels, its metadata names 2 labels, " \
           "background included" in _failure_at_start(segmenter)

    r = PipelineRunner([ModelSpec(name="m", path=classifier, warmup=False)],
                       [PipelineSpec(name="m", model="m", task="classify")])
    r.start()
    try:
        assert r.failed == {}
        src = write_dicom(make_cxr_phantom(7), tmp_path / "cr.dcm")
        with pytest.raises(PipelineError, match="gives 3 outputs, its metadata names 2"):
            r.run("m", [src], tmp_path / "out")
    finally:
        r.close()


def test_a_classifier_of_3d_images_is_refused_at_start_with_the_reason(
        tmp_path: Path) -> None:
    """A 3-D classifier loaded and then failed every job with a raw torch error about
    its input's dimensions: the node classifies 2-D images."""
    from monai.bundle import ConfigParser

    from tests.unit.pipeline.test_bundle import NET_DEF

    folder = make_tiny_bundle(tmp_path / "cls3d")
    net = {**NET_DEF, "spatial_dims": 3}
    torch.save(ConfigParser({"n": net}).get_parsed_content("n").state_dict(),
               folder / "models" / "model.pt")
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    (folder / "configs" / "inference.json").write_text(
        json.dumps({**inference, "network_def": net}))
    assert "it classifies 3-D images; the node classifies 2-D images" in \
        _failure_at_start(folder, "classify")
    meta_path = folder / "configs" / "metadata.json"  # said by its input size alone
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [16, 32, 32]
    meta_path.write_text(json.dumps(meta))
    (folder / "configs" / "inference.json").write_text(json.dumps(
        {**inference, "network_def": {**net, "spatial_dims": "$3"}}))
    assert "it classifies 3-D images" in _failure_at_start(folder, "classify")


def test_a_seg_left_out_of_a_resampled_series_is_said_with_the_reason(
        runner: PipelineRunner, tmp_path: Path) -> None:
    """Slices whose spacing varies by more than 1 % are resampled to even ones, and a
    SEG (which references the slices sent) cannot be written: it was left out without a
    word. The result's notes say why: in the summary the job and ``infer`` print, in the
    volumes JSON and in the report."""
    from pipeline.runner import result_summary

    files = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct",
                               patient_id="UNEVEN")
    for n, f in enumerate(files):  # the second half 6 % further apart
        ds = pydicom.dcmread(f)
        z = float(ds.ImagePositionPatient[2])
        if n > 8:
            ds.ImagePositionPatient[2] = z + 0.3 * (n - 8)
        ds.save_as(f)
    out = runner.run("seg", files, tmp_path / "out")
    assert "seg" not in {a.kind for a in out.artifacts}
    notes = out.result.notes
    assert len(notes) == 1 and notes[0].startswith("no SEG written: the spacing between its "
                                                   "slices varies by more than 1 %")
    assert result_summary(out.result)["notes"] == notes
    volumes = next(a.path for a in out.artifacts if a.kind == "json")
    assert json.loads(volumes.read_text())["notes"] == notes
    even = runner.run("seg", write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)),
                                                tmp_path / "even"), tmp_path / "out2")
    assert not even.result.notes and "notes" not in result_summary(even.result)


def test_a_classifier_given_a_stack_of_slices_refuses_it_and_says_which_frame_it_read(
        runner: PipelineRunner, tmp_path: Path) -> None:
    """A 2-D classifier given a CT series classified its first slice without a word. A
    stack of slices is refused with the count; of a multi-frame radiograph the result
    says which frame was read; a single radiograph is classified as before."""
    ct = write_dicom_series(make_ct_phantom(3, shape=(16, 48, 48)), tmp_path / "ct")
    with pytest.raises(PipelineError, match=r"classifies one 2-D image \(a radiograph\); "
                                            r"the series it was given is a stack of 16 CT "
                                            "slices"):
        runner.run("never-normal", ct, tmp_path / "out-ct")
    assert not (tmp_path / "out-ct").exists()

    single = write_dicom(make_cxr_phantom(7), tmp_path / "cr.dcm", patient_id="ONE")
    assert runner.run("cls", [single], tmp_path / "out1").result.notes == []
    ds = pydicom.dcmread(single)
    frame = ds.pixel_array
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([frame, frame]).tobytes()
    ds.save_as(tmp_path / "cr2.dcm")
    two = runner.run("cls", [tmp_path / "cr2.dcm"], tmp_path / "out2")
    # both frames are read now (tests/unit/pipeline/test_study_reading.py); the notes say
    # which one the result shows
    notes = two.result.notes
    assert len(notes) == 1 and notes[0].startswith("classified 2 images of the study (")
    assert notes[0].endswith("frame 1 of 2" if two.result.frame_number == 1  # type: ignore[union-attr]
                             else "frame 2 of 2")
