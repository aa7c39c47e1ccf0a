"""A small held-out evaluation of the demo bundles (~60 phantoms) against the targets."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.bundle import load_model
from pipeline.train.evaluate import evaluate_ct, evaluate_cxr

MODELS = Path(__file__).resolve().parents[3] / "pipeline" / "models"


def test_cxr_heldout_targets() -> None:
    torch.set_num_threads(2)
    r = evaluate_cxr(load_model(MODELS / "cxr-findings"), 56, progress=False)
    assert r["mean_auroc"] >= 0.95, r
    assert r["min_auroc"] >= 0.85, r
    assert r["gradcam_hit_rate"] >= 0.80, r


def test_ct_heldout_targets() -> None:
    torch.set_num_threads(2)
    r = evaluate_ct(load_model(MODELS / "ct-organs"), 4, progress=False)
    assert r["min_dice"] >= 0.85, r
