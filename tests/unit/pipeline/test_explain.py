"""Grad-CAM heatmaps: plain, fused and guided, on a tiny bundle and the demo classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.bundle import BundleError, load_model
from pipeline.explain import gradcam, guided_saliency
from pipeline.train.phantoms_cxr import make_cxr_phantom
from tests.unit.pipeline.test_bundle import MODELS, make_tiny_bundle


def _with_meta(folder: Path, **changes: object) -> Path:
    path = folder / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("guided", [False, True])
def test_heatmap_at_source_size_in_unit_range(tmp_path: Path, guided: bool) -> None:
    m = load_model(_with_meta(make_tiny_bundle(tmp_path / "t"), gradcam_guided=guided,
                              gradcam_guided_sigma=1.5))
    assert (m.gradcam_guided, m.gradcam_sigma) == (guided, 1.5)
    img = np.random.default_rng(1).random((45, 61)).astype(np.float32)
    heat = gradcam(m, img, 1)
    assert heat.shape == (45, 61) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0


def test_guided_is_grad_cam_times_smoothed_saliency(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "t"))
    img = np.random.default_rng(2).random((32, 32)).astype(np.float32)
    plain = gradcam(m, img, "c", guided=False)
    guided = gradcam(m, img, "c", guided=True, sigma=0.0)
    sal = guided_saliency(m, m.preprocess(img)[None], 2, 0.0)[0, 0].numpy()
    assert sal.shape == (32, 32) and sal.min() >= 0.0 and sal.max() == pytest.approx(1.0)
    # same input size as the model: no resampling, so guided = unit(plain * saliency)
    prod = plain * sal
    prod = (prod - prod.min()) / (prod.max() - prod.min())
    np.testing.assert_allclose(guided, prod, atol=1e-5)
    smooth = guided_saliency(m, m.preprocess(img)[None], 2, 2.0)[0, 0].numpy()
    assert np.abs(np.diff(smooth, axis=1)).mean() < np.abs(np.diff(sal, axis=1)).mean()


def test_fused_layers_average_unit_maps(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "t"))
    img = np.random.default_rng(3).random((32, 32)).astype(np.float32)
    layers = ["class_layers.relu", "features.denseblock1"]
    fused = gradcam(m, img, 0, layer=layers, guided=False)
    assert fused.shape == (32, 32) and fused.max() == pytest.approx(1.0)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    m = load_model(make_tiny_bundle(tmp_path / "t"))
    img = np.zeros((32, 32), np.float32)
    with pytest.raises(BundleError, match="no.such.layer"):
        gradcam(m, img, 0, layer="no.such.layer")
    with pytest.raises(ValueError, match="no label 'zz'"):
        gradcam(m, img, "zz")
    with pytest.raises(ValueError, match="out of range"):
        gradcam(m, img, 3)
    m.gradcam_layer = None
    with pytest.raises(BundleError, match="gradcam_target_layer"):
        gradcam(m, img, 0)


@pytest.mark.parametrize(("key", "value"), [("gradcam_guided", "yes"),
                                            ("gradcam_guided_sigma", -1),
                                            ("gradcam_guided_sigma", "3"),
                                            ("gradcam_target_layer", 5),
                                            ("gradcam_target_layer", [])])
def test_bad_gradcam_metadata_is_a_bundle_error(tmp_path: Path, key: str,
                                                value: object) -> None:
    b = _with_meta(make_tiny_bundle(tmp_path / "t"), **{key: value})
    with pytest.raises(BundleError, match=key):
        load_model(b)


@pytest.mark.parametrize("finding", ["Pleural Thickening", "Atelectasis"])
def test_demo_heatmap_peak_on_the_lesion(finding: str) -> None:
    """The two findings whose plain Grad-CAM peak missed most (on the chest wall, on the
    heart border): with guided Grad-CAM it falls in the lesion's box on most phantoms."""
    torch.set_num_threads(2)
    m = load_model(MODELS / "cxr-findings")
    assert m.gradcam_guided
    hits = 0
    for seed in range(40_000_000, 40_000_010):
        p = make_cxr_phantom(seed, findings={finding: True})
        heat = gradcam(m, p.image, finding)
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        x0, y0, x1, y1 = p.boxes[finding]
        hits += int(x0 <= x < x1 and y0 <= y < y1)
    assert hits >= 8, (finding, hits)
