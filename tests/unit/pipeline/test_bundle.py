"""Bundle loading: an on-the-fly tiny bundle, TorchScript + sidecar, errors, registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.bundle import BundleError, LoadedModel, ModelRegistry, load_model
from pipeline.explain import gradcam
from pipeline.settings import ModelSpec

MODELS = Path(__file__).resolve().parents[3] / "pipeline" / "models"

NET_DEF: dict[str, Any] = {"_target_": "DenseNet", "spatial_dims": 2, "in_channels": 1,
                           "out_channels": 3, "init_features": 4, "growth_rate": 2,
                           "block_config": [1, 1], "bn_size": 1}


def make_tiny_bundle(folder: Path, version: str = "0.1.0", with_ts: bool = False) -> Path:
    """A random tiny classifier bundle in Model Zoo layout."""
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    net = ConfigParser({"network_def": dict(NET_DEF)}).get_parsed_content("network_def")
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    if with_ts:
        torch.jit.trace(net.eval(), torch.zeros(1, 1, 32, 32)).save(
            str(folder / "models" / "model.ts"))
    meta = {"name": "tiny", "version": version, "task": "classify", "labels": ["a", "b", "c"],
            "gradcam_target_layer": "class_layers.relu",
            "network_data_format": {"inputs": {"image": {"spatial_shape": [32, 32]}}}}
    inference = {"network_def": NET_DEF, "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"},
        {"_target_": "Resize", "spatial_size": [32, 32], "mode": "area"},
        {"_target_": "ScaleIntensity"}]}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    return folder


def test_tiny_bundle_loads_and_runs(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "tiny"))
    assert isinstance(m, LoadedModel)
    assert (m.name, m.version, m.task, m.labels) == ("tiny", "0.1.0", "classify", ["a", "b", "c"])
    assert m.spatial_size == (32, 32) and m.source == "state_dict"
    img = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    x = m.preprocess(img)
    assert tuple(x.shape) == (1, 32, 32)
    assert tuple(m.infer(x[None]).shape) == (1, 3)
    heat = gradcam(m, img, "b")
    assert heat.shape == (50, 70) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0


def test_a_model_zoo_classifier_takes_the_image_as_monai_loads_it(tmp_path: Path) -> None:
    """A classifier whose transforms take dictionaries (the Model Zoo's way, from a
    LoadImaged) gets the image as MONAI's loader gives it, indexed (column, row); its
    Grad-CAM comes back at the image's own rows and columns."""
    folder = make_tiny_bundle(tmp_path / "zoo")
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    inference["preprocessing"]["transforms"] = [
        {"_target_": "LoadImaged", "keys": ["image"]},
        {"_target_": "EnsureChannelFirstd", "keys": ["image"]},
        {"_target_": "Resized", "keys": ["image"], "spatial_size": [32, 32], "mode": "area"},
        {"_target_": "ScaleIntensityd", "keys": ["image"]}]
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    zoo, plain = load_model(folder), load_model(make_tiny_bundle(tmp_path / "plain"))
    assert zoo.io_keys == ("image", "pred") and plain.io_keys is None
    img = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    np.testing.assert_allclose(zoo.preprocess(img).numpy(),
                               plain.preprocess(np.ascontiguousarray(img.T)).numpy(), atol=1e-6)
    heat = gradcam(zoo, img, "b")
    assert heat.shape == (50, 70)
    np.testing.assert_allclose(heat, gradcam(plain, np.ascontiguousarray(img.T), "b").T,
                               atol=1e-5)


def test_a_network_of_three_channels_gets_a_grey_image_in_each(tmp_path: Path) -> None:
    """An ImageNet-style classifier (``num_channels`` 3) is warmed up with three channels
    and gets a grey radiograph as R = G = B; it failed its warm-up (one channel) and
    never loaded."""
    from monai.bundle import ConfigParser

    from pipeline.runner import PipelineRunner
    from pipeline.settings import ModelSpec, PipelineSpec
    from pipeline.train.phantoms_cxr import make_cxr_phantom, write_dicom

    folder = make_tiny_bundle(tmp_path / "rgb")
    net_def = {**NET_DEF, "in_channels": 3}
    net = ConfigParser({"network_def": net_def}).get_parsed_content("network_def")
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    inference = json.loads((folder / "configs" / "inference.json").read_text())
    (folder / "configs" / "inference.json").write_text(
        json.dumps({**inference, "network_def": net_def}))
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = 3
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))

    model = load_model(folder)
    assert model.in_channels == 3
    img = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    x = model.preprocess(img)
    assert tuple(x.shape) == (3, 32, 32) and torch.equal(x[0], x[2])
    runner = PipelineRunner([ModelSpec(name="rgb", path=folder)],
                            [PipelineSpec(name="rgb", model="rgb", task="classify",
                                          threshold=0.01)])
    runner.start()
    try:
        assert runner.failed == {}
        out = runner.run("rgb", [write_dicom(make_cxr_phantom(1), tmp_path / "cr.dcm")],
                         tmp_path / "out")
        assert len(out.result.findings) == 3  # type: ignore[union-attr]
    finally:
        runner.close()


def test_weights_saved_from_a_data_parallel_wrapper_load(tmp_path: Path) -> None:
    """Weights trained on several GPUs are often saved from the DataParallel wrapper,
    every key prefixed ``module.``, inside a checkpoint's ``model``: they load as the
    network's own."""
    folder = make_tiny_bundle(tmp_path / "ddp")
    plain = torch.load(folder / "models" / "model.pt", weights_only=True)
    torch.save({"model": {f"module.{k}": v for k, v in plain.items()}, "epoch": 7},
               folder / "models" / "model.pt")
    loaded = load_model(folder).network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in plain.items())


@pytest.mark.parametrize("where", ["metadata", "postprocessing"])
def test_a_classifier_of_exclusive_classes_gives_softmax_probabilities(
        tmp_path: Path, where: str) -> None:
    """A classifier whose classes exclude each other (a breast density grade) declares a
    softmax, in its output's description or as its postprocessing's Activations: its
    probabilities sum to 1. A sigmoid per class (the default, for findings that can
    coexist) made each grade a separate yes/no."""
    from pipeline.runner import PipelineRunner
    from pipeline.settings import ModelSpec, PipelineSpec

    folder = make_tiny_bundle(tmp_path / "density")
    if where == "metadata":
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
        meta["network_data_format"]["outputs"] = {"pred": {"activation": "softmax"}}
        (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    else:
        inference = json.loads((folder / "configs" / "inference.json").read_text())
        inference["postprocessing"] = {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]}
        (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    assert load_model(folder).activation == "softmax"
    assert load_model(make_tiny_bundle(tmp_path / "plain")).activation == "sigmoid"
    runner = PipelineRunner([ModelSpec(name="density", path=folder)],
                            [PipelineSpec(name="density", model="density", task="classify")])
    runner.start()
    try:
        img = np.random.default_rng(0).random((50, 70)).astype(np.float32)
        probs = runner.predict(img, "density").probabilities
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and len(probs) == 3
    finally:
        runner.close()


def test_bare_torchscript_with_sidecar(tmp_path: Path) -> None:
    b = make_tiny_bundle(tmp_path / "b", with_ts=True)
    ts = tmp_path / "model.ts"
    ts.write_bytes((b / "models" / "model.ts").read_bytes())
    Path(str(ts) + ".json").write_text(json.dumps({"labels": ["x", "y", "z"],
                                                   "spatial_size": [32, 32], "version": "2"}))
    m = load_model(ts)
    assert m.source == "torchscript" and m.labels == ["x", "y", "z"] and m.version == "2"
    out = m.infer(m.preprocess(np.ones((40, 40), np.float32))[None])
    assert tuple(out.shape) == (1, 3)


def test_bundle_falls_back_to_torchscript(tmp_path: Path) -> None:
    b = make_tiny_bundle(tmp_path / "b", with_ts=True)
    (b / "models" / "model.pt").unlink()
    assert load_model(b).source == "torchscript"


@pytest.mark.parametrize("breakage", ["no_meta", "bad_json", "no_model", "bad_pt", "bad_ts",
                                      "mismatch", "no_labels", "missing_path", "no_sidecar"])
def test_bad_bundle_raises_bundle_error(tmp_path: Path, breakage: str) -> None:
    b = make_tiny_bundle(tmp_path / "b")
    target: Path = b
    culprit = ""
    if breakage == "no_meta":
        (b / "configs" / "metadata.json").unlink()
        culprit = "metadata.json"
    elif breakage == "bad_json":
        (b / "configs" / "metadata.json").write_text("{not json")
        culprit = "metadata.json"
    elif breakage == "no_model":
        (b / "models" / "model.pt").unlink()
        culprit = "models"
    elif breakage == "bad_pt":
        (b / "models" / "model.pt").write_bytes(b"garbage")
        culprit = "model.pt"
    elif breakage == "bad_ts":
        (b / "models" / "model.pt").unlink()
        (b / "models" / "model.ts").write_bytes(b"garbage")
        culprit = "model.ts"
    elif breakage == "mismatch":
        torch.save({"weight": torch.zeros(1)}, b / "models" / "model.pt")
        culprit = "model.pt"
    elif breakage == "no_labels":
        (b / "configs" / "metadata.json").write_text(json.dumps({"name": "x"}))
        culprit = "metadata.json"
    elif breakage == "missing_path":
        target = tmp_path / "nope"
        culprit = "nope"
    elif breakage == "no_sidecar":
        target = tmp_path / "m.ts"
        target.write_bytes(b"x")
        culprit = "m.ts.json"
    with pytest.raises(BundleError) as info:
        load_model(target)
    assert culprit in str(info.value)


def test_registry_versions_and_default(tmp_path: Path) -> None:
    v1 = make_tiny_bundle(tmp_path / "v1", version="1.0.0")
    v2 = make_tiny_bundle(tmp_path / "v2", version="1.10.0")
    v3 = make_tiny_bundle(tmp_path / "v3", version="1.2.0")
    reg = ModelRegistry([ModelSpec(name="tiny", path=v1, default=False),
                         ModelSpec(name="tiny", path=v2, default=False),
                         ModelSpec(name="tiny", path=v3, default=False, device="cpu")])
    assert reg.names() == ["tiny"]
    assert reg.versions("tiny") == ["1.0.0", "1.2.0", "1.10.0"]
    assert reg.default_version("tiny") == "1.10.0"  # highest without an explicit default
    assert reg.get("tiny").version == "1.10.0"
    assert reg.get("tiny", "1.0.0").path == v1
    assert reg.get("tiny", "1.0.0") is reg.get("tiny", "1.0.0")
    reg.add(ModelSpec(name="tiny", path=v1, version="0.9", default=True))
    assert reg.default_version("tiny") == "0.9" and reg.get("tiny").version == "0.9"
    with pytest.raises(KeyError):
        reg.get("tiny", "7")
    with pytest.raises(KeyError):
        reg.get("other")
    assert len(reg.load_all()) == 4


@pytest.mark.parametrize(("name", "task", "n_labels"), [("cxr-findings", "classify", 11),
                                                        ("ct-organs", "segment", 5)])
def test_demo_bundles_load(name: str, task: str, n_labels: int) -> None:
    folder = MODELS / name
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt",
              "models/model.ts", "docs/README.md"):
        assert (folder / f).is_file(), f
        assert (folder / f).stat().st_size < 20 * 1024 * 1024
    m = load_model(folder)
    assert m.name == name and m.task == task and len(m.labels) == n_labels
    assert m.metadata["held_out"], "held-out scores missing from metadata.json"
    if task == "classify":
        assert m.gradcam_layer and m.spatial_size
        layers = [m.gradcam_layer] if isinstance(m.gradcam_layer, str) else m.gradcam_layer
        assert set(layers) <= set(dict(m.network.named_modules()))  # the layers exist
    scripted = torch.jit.load(str(folder / "models" / "model.ts"))
    assert isinstance(scripted, torch.jit.ScriptModule)


# -- speed: channels-last weights and the frozen trace ---------------------------------------


def test_conv_weights_are_channels_last(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "tiny"))
    convs = [p for p in m.network.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_cpu_inference_runs_a_frozen_trace_that_matches_the_network(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "tiny"))
    for size in (2, 5, 1):
        x = torch.rand(size, 1, 32, 32, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            want = m.network(x)
        torch.testing.assert_close(m.infer(x), want, rtol=1e-4, atol=1e-5)
    assert m._fast is not None and isinstance(m._fast.frozen, torch.jit.ScriptModule)
    assert m.network_for(torch.zeros(1, 1, 32, 32)) is m._fast


def test_the_trace_serves_only_the_sample_shape_it_was_checked_on(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "tiny"))
    eager_calls: list[tuple[int, ...]] = []
    m.network.register_forward_hook(lambda mod, args, out: eager_calls.append(args[0].shape))
    m.infer(torch.rand(2, 1, 32, 32))  # traced (the check runs the eager network)
    eager_calls.clear()
    m.infer(torch.rand(4, 1, 32, 32))
    assert eager_calls == []  # the frozen trace ran
    x = torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        want = m.network(x)
    eager_calls.clear()
    torch.testing.assert_close(m.infer(x), want)
    assert eager_calls == [(2, 1, 40, 40)]  # another shape: the eager network


class _BatchDependent(torch.nn.Module):
    """Takes a different path for a single image: a trace would keep only one of them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)[:, :3]
        return flat * 2 if x.shape[0] == 1 else flat


def test_a_network_the_trace_cannot_follow_runs_eagerly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = LoadedModel(name="odd", version="1", task="classify", labels=["a", "b", "c"],
                    spatial_size=(4, 4), network=_BatchDependent().eval(), path=tmp_path,
                    source="state_dict")
    x1, x3 = torch.ones(1, 1, 4, 4), torch.ones(3, 1, 4, 4)
    with caplog.at_level("WARNING", logger="pipeline.bundle"):
        assert torch.equal(m.infer(x1), torch.full((1, 3), 2.0))
    assert m._fast_tried and m._fast is None  # refused: it differs at batch size 3
    assert "runs eagerly" in caplog.text and "batch size 3" in caplog.text
    assert torch.equal(m.infer(x3), torch.ones(3, 3))


def test_optimize_off_and_explainer_copies_run_the_eager_network(tmp_path: Path) -> None:
    reg = ModelRegistry([ModelSpec(name="tiny", path=make_tiny_bundle(tmp_path / "t"),
                                   device="cpu", optimize=False)])
    m = reg.get("tiny")
    m.infer(torch.rand(2, 1, 32, 32))
    assert m.optimize is False and m._fast is None and not m._fast_tried
    m.optimize = True
    m.infer(torch.rand(2, 1, 32, 32))
    clone = m.without_trace()
    assert clone.optimize is False and clone._fast is None and m._fast is not None
    assert clone.network_for(torch.rand(1, 1, 32, 32)) is clone.network


class _Pickled:  # not a tensor: torch.load(weights_only=True) refuses it
    pass


@pytest.mark.parametrize("content", ["garbage", "object"])
def test_weights_that_would_run_code_are_refused_without_torchs_advice(
    tmp_path: Path, content: str
) -> None:
    """The error names the file and why, and does not pass on torch's advice to load
    with weights_only=False (which would run the file's pickled code)."""
    b = make_tiny_bundle(tmp_path / "b")
    pt = b / "models" / "model.pt"
    if content == "garbage":
        pt.write_bytes(b"garbage")
    else:
        torch.save({"weight": _Pickled()}, pt)
    with pytest.raises(BundleError) as info:
        load_model(b)
    message = str(info.value)
    assert f"corrupt weights file {pt}: " in message
    assert "weights_only" not in message and "safe_globals" not in message
    assert "\n" not in message
    if content == "object":
        assert "can be loaded without running code" in message
