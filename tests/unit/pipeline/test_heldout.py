"""A small held-out evaluation of the demo bundles (~60 phantoms) against the targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.bundle import load_model
from pipeline.train.evaluate import evaluate_ct, evaluate_cxr

MODELS = Path(__file__).resolve().parents[3] / "pipeline" / "models"


@pytest.fixture(scope="module")
def cxr_scores() -> dict[str, Any]:
    torch.set_num_threads(2)
    return evaluate_cxr(load_model(MODELS / "cxr-findings"), 56, progress=False)


def test_cxr_heldout_auroc(cxr_scores: dict[str, Any]) -> None:
    assert cxr_scores["mean_auroc"] >= 0.95, cxr_scores
    assert cxr_scores["min_auroc"] >= 0.85, cxr_scores


def test_cxr_heldout_gradcam_hit_rate(cxr_scores: dict[str, Any]) -> None:
    assert cxr_scores["gradcam_hit_rate"] >= 0.80, cxr_scores


def test_ct_heldout_targets() -> None:
    torch.set_num_threads(2)
    r = evaluate_ct(load_model(MODELS / "ct-organs"), 4, progress=False)
    assert r["min_dice"] >= 0.85, r
