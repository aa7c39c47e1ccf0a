"""Held-out evaluation of the demo bundles on phantoms the training never saw.

    python -m pipeline.train.evaluate [--n 400] [--n-ct 16] [--write]

Held-out phantom seeds start at ``EVAL_SEED_START`` (10,000,000); training uses
``[0, n_train)`` and validation ``[5,000,000, ...)``. Prints, for cxr-findings,
the AUROC per finding, the mean AUROC and the Grad-CAM localisation hit-rate
(heatmap peak inside the lesion's box, over positives of localised findings);
for ct-organs, the Dice per structure. ``--write`` stores the scores in each
bundle's ``configs/metadata.json`` under ``held_out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.bundle import LoadedModel, load_model
from pipeline.explain import gradcam
from pipeline.train._common import EVAL_SEED_START
from pipeline.train.phantoms_ct import make_ct_phantom
from pipeline.train.phantoms_cxr import LOCALISED, make_cxr_phantom

MODELS = Path(__file__).resolve().parents[1] / "models"


def auroc(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def evaluate_cxr(model: LoadedModel, n: int, start: int = EVAL_SEED_START,
                 progress: bool = True) -> dict[str, Any]:
    """AUROC per finding, mean AUROC and Grad-CAM hit-rate over ``n`` held-out phantoms."""
    scores, labels = [], []
    hits = total = 0
    hits_per: dict[str, list[int]] = {}
    for seed in tqdm(range(start, start + n), desc="cxr held-out", disable=not progress):
        p = make_cxr_phantom(seed)
        x = model.preprocess(p.image)
        prob = torch.sigmoid(model.infer(x[None]))[0].cpu().numpy()
        scores.append(prob)
        labels.append(p.labels)
        for name, (x0, y0, x1, y1) in p.boxes.items():
            if name not in LOCALISED or name not in model.labels:
                continue
            heat = gradcam(model, p.image, name, input_tensor=x)
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
            hit = int(x0 <= px < x1 and y0 <= py < y1)
            hits += hit
            total += 1
            hits_per.setdefault(name, []).append(hit)
    s, y = np.array(scores), np.array(labels)
    per = {name: round(auroc(s[:, k], y[:, k]), 4) for k, name in enumerate(model.labels)}
    return {
        "n_phantoms": n,
        "phantom_seeds": [start, start + n],
        "auroc": per,
        "mean_auroc": round(float(np.nanmean(list(per.values()))), 4),
        "min_auroc": round(float(np.nanmin(list(per.values()))), 4),
        "gradcam_hit_rate": round(hits / max(total, 1), 4),
        "gradcam_hit_rate_per_finding": {k: round(float(np.mean(v)), 4)
                                         for k, v in hits_per.items()},
        "gradcam_positives": total,
    }


def evaluate_ct(model: LoadedModel, n: int, start: int = EVAL_SEED_START,
                progress: bool = True) -> dict[str, Any]:
    """Dice per structure (mean over ``n`` held-out phantoms)."""
    dices = []
    for seed in tqdm(range(start, start + n), desc="ct held-out", disable=not progress):
        p = make_ct_phantom(seed)
        x = model.preprocess(p.volume)
        pred = model.infer(x[None]).argmax(1)[0].cpu().numpy()
        row = []
        for lab in range(1, len(model.labels)):
            a, b = pred == lab, p.labels == lab
            den = a.sum() + b.sum()
            row.append(float(2 * (a & b).sum() / den) if den else float("nan"))
        dices.append(row)
    mean = np.nanmean(np.array(dices), axis=0)
    per = {model.labels[k + 1]: round(float(d), 4) for k, d in enumerate(mean)}
    return {"n_phantoms": n, "phantom_seeds": [start, start + n], "dice": per,
            "min_dice": round(float(min(per.values())), 4)}


def _write(bundle: Path, scores: dict[str, Any]) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta["held_out"] = {**scores,
                        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "command": "python -m pipeline.train.evaluate --write"}
    path.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; exits 1 when a target is missed."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="held-out CXR phantoms")
    ap.add_argument("--n-ct", type=int, default=16, help="held-out CT phantoms")
    ap.add_argument("--cxr", type=Path, default=MODELS / "cxr-findings")
    ap.add_argument("--ct", type=Path, default=MODELS / "ct-organs")
    ap.add_argument("--skip-cxr", action="store_true")
    ap.add_argument("--skip-ct", action="store_true")
    ap.add_argument("--write", action="store_true", help="store scores in metadata.json")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ok = True
    if not args.skip_cxr and args.n > 0:
        r = evaluate_cxr(load_model(args.cxr), args.n)
        print("cxr-findings held-out:")
        for k, v in r["auroc"].items():
            print(f"  AUROC {k:20s} {v:.4f}")
        print(f"  mean AUROC {r['mean_auroc']:.4f}  (target >= 0.95, each >= 0.85)")
        print(f"  Grad-CAM hit-rate {r['gradcam_hit_rate']:.3f} over {r['gradcam_positives']} "
              "positives (target >= 0.80)")
        for k, v in r["gradcam_hit_rate_per_finding"].items():
            print(f"    {k:20s} {v:.3f}")
        ok &= r["mean_auroc"] >= 0.95 and r["min_auroc"] >= 0.85 and r[
            "gradcam_hit_rate"] >= 0.8
        if args.write:
            _write(args.cxr, r)
    if not args.skip_ct and args.n_ct > 0:
        r = evaluate_ct(load_model(args.ct), args.n_ct)
        print("ct-organs held-out:")
        for k, v in r["dice"].items():
            print(f"  Dice {k:15s} {v:.4f}")
        print("  (target >= 0.85 per structure)")
        ok &= r["min_dice"] >= 0.85
        if args.write:
            _write(args.ct, r)
    print("targets met" if ok else "TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
