"""Train the ``ct-organs`` demo segmentation model on synthetic abdominal CT phantoms.

    python -m pipeline.train.train_ct --out pipeline/models/ct-organs

Phantoms come from :mod:`pipeline.train.phantoms_ct`; training uses phantom
seeds ``[0, n_train)``, the per-epoch validation ``[5_000_000, +n_val)``; the
held-out evaluation (:mod:`pipeline.train.evaluate`) uses ``10_000_000`` and up.
The network is a small MONAI 3D ``UNet`` trained on random axial slabs and run
with ``monai.inferers.sliding_window_inference``; written as a MONAI bundle.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import time
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.train._common import (
    MAX_TRAIN,
    TRAIN_SEED_START,
    VAL_SEED_START,
    seed_everything,
    write_bundle,
)
from pipeline.train.phantoms_ct import DEFAULT_SHAPE, DEFAULT_SPACING, LABELS, make_ct_phantom

ROI_SIZE = (16, 96, 96)
HU_WINDOW = (-200.0, 300.0)

NETWORK_DEF: dict[str, Any] = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": len(LABELS),
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "norm": "batch",
}

INFERENCE: dict[str, Any] = {
    "imports": ["$import torch"],
    "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
    "network_def": NETWORK_DEF,
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "EnsureChannelFirst", "channel_dim": "no_channel"},
            {"_target_": "ScaleIntensityRange", "a_min": HU_WINDOW[0], "a_max": HU_WINDOW[1],
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureType", "dtype": "$torch.float32"},
        ],
    },
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(ROI_SIZE),
                "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activations", "softmax": True},
            {"_target_": "AsDiscrete", "argmax": True},
        ],
    },
}


def build_network() -> torch.nn.Module:
    """The segmentation net, instantiated from ``NETWORK_DEF`` by MONAI's config parser."""
    from monai.bundle.config_parser import ConfigParser

    parser = ConfigParser({"network_def": copy.deepcopy(NETWORK_DEF)})
    net: torch.nn.Module = parser.get_parsed_content("network_def")
    return net


def preprocess(volume: np.ndarray) -> np.ndarray:
    """HU volume (Z x Y x X) -> windowed [0, 1] float32 (same as the bundle's preprocessing)."""
    lo, hi = HU_WINDOW
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _one(seed: int) -> tuple[np.ndarray, np.ndarray]:
    p = make_ct_phantom(seed)
    return preprocess(p.volume).astype(np.float16), p.labels


def make_dataset(seeds: Sequence[int], workers: int = 2,
                 desc: str = "phantoms") -> tuple[torch.Tensor, torch.Tensor]:
    """Generate phantoms -> (N x 1 x Z x Y x X float16, N x Z x Y x X uint8)."""
    with Pool(workers) as pool:
        items = list(tqdm(pool.imap(_one, seeds, chunksize=4), total=len(seeds), desc=desc))
    x = torch.from_numpy(np.stack([i[0] for i in items]))[:, None]
    y = torch.from_numpy(np.stack([i[1] for i in items]))
    return x, y


def dice_per_label(pred: np.ndarray, ref: np.ndarray, n_labels: int) -> list[float]:
    """Dice of labels 1..n_labels-1 (NaN where both are empty)."""
    out = []
    for lab in range(1, n_labels):
        p, r = pred == lab, ref == lab
        den = p.sum() + r.sum()
        out.append(float(2 * (p & r).sum() / den) if den else float("nan"))
    return out


def segment(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sliding-window inference of a preprocessed N x 1 x Z x Y x X batch -> label maps."""
    from monai.inferers.utils import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(x, ROI_SIZE, 2, net, overlap=0.25, mode="gaussian")
    assert isinstance(logits, torch.Tensor)
    return logits.argmax(1)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("pipeline/models/ct-organs"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--n-train", type=int, default=100, help="number of training phantoms")
    ap.add_argument("--n-val", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="seed of weights init and sampling")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--version", default="1.0.0")
    args = ap.parse_args(argv)
    if not 0 < args.n_train <= MAX_TRAIN:
        ap.error(f"--n-train must be in 1..{MAX_TRAIN}")

    from monai.losses.dice import DiceCELoss

    t0 = time.time()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    xtr, ytr = make_dataset(range(TRAIN_SEED_START, TRAIN_SEED_START + args.n_train),
                            args.threads, "train phantoms")
    xva, yva = make_dataset(range(VAL_SEED_START, VAL_SEED_START + args.n_val),
                            args.threads, "val phantoms")
    net = build_network()
    n_params = sum(p.numel() for p in net.parameters())
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    per_epoch = (len(xtr) + args.batch_size - 1) // args.batch_size
    steps = args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    nz = xtr.shape[2]
    history: list[dict[str, Any]] = []
    bar = tqdm(total=steps, desc="train ct")
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i: i + args.batch_size]
            z0s = torch.randint(0, nz - ROI_SIZE[0] + 1, (len(idx),), generator=gen)
            xb = torch.stack([xtr[j, :, z: z + ROI_SIZE[0]] for j, z in zip(idx, z0s, strict=True)])
            yb = torch.stack([ytr[j, z: z + ROI_SIZE[0]] for j, z in zip(idx, z0s, strict=True)])
            loss = loss_fn(net(xb.float()), yb[:, None].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        net.eval()
        dices = []
        for j in range(len(xva)):
            pred = segment(net, xva[j: j + 1].float())[0].numpy()
            dices.append(dice_per_label(pred, yva[j].numpy(), len(LABELS)))
        mean = np.nanmean(np.array(dices), axis=0)
        history.append({"epoch": epoch, "loss": total / len(xtr),
                        "val_dice": {LABELS[k + 1]: round(float(d), 4)
                                     for k, d in enumerate(mean)}})
        tqdm.write(json.dumps(history[-1]))
    bar.close()
    wall = time.time() - t0

    metadata: dict[str, Any] = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "name": "ct-organs",
        "version": args.version,
        "changelog": {args.version: "demo model trained on synthetic abdominal CT phantoms"},
        "monai_version": __import__("monai").__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "task": "segment",
        "description": "Demo 3D segmentation of liver, spleen and kidneys, trained only on "
                       "synthetic phantoms (pipeline.train.phantoms_ct). Not for clinical use.",
        "authors": "dicom-node",
        "copyright": "Apache-2.0",
        "intended_use": "Demonstration and testing of the dicom-node pipeline only.",
        "labels": list(LABELS),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield", "modality": "CT",
                "num_channels": 1, "spatial_shape": list(ROI_SIZE),
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
                "channel_def": {"0": "image"},
                "pixdim_zyx_mm": list(DEFAULT_SPACING),
                "training_volume_shape_zyx": list(DEFAULT_SHAPE),
                "axes": "Z x Y x X, axial slices ordered inferior to superior "
                        "(ascending ImagePositionPatient z), rows posterior, columns to "
                        "the patient's left (LPS)",
                "preprocessing": f"HU windowed [{HU_WINDOW[0]:.0f}, {HU_WINDOW[1]:.0f}] to "
                                 "[0, 1] and clipped (ScaleIntensityRange); the node resamples "
                                 "a series more than 10% off pixdim_zyx_mm to it and the "
                                 "labels back to the series' grid",
            }},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": len(LABELS),
                "spatial_shape": list(ROI_SIZE), "dtype": "float32", "value_range": [0, 1],
                "is_onehot": True, "activation": "softmax",
                "channel_def": {str(i): n for i, n in enumerate(LABELS)},
            }},
        },
        "inference": {"sliding_window": {"roi_size": list(ROI_SIZE), "sw_batch_size": 2,
                                         "overlap": 0.25, "mode": "gaussian"}},
        "training": {
            "script": "python -m pipeline.train.train_ct",
            "args": {k: str(v) for k, v in vars(args).items()},
            "seed": args.seed,
            "train_phantom_seeds": [TRAIN_SEED_START, TRAIN_SEED_START + args.n_train],
            "val_phantom_seeds": [VAL_SEED_START, VAL_SEED_START + args.n_val],
            "n_train": args.n_train,
            "epochs": args.epochs,
            "parameters": n_params,
            "wall_time_s": round(wall, 1),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "history": history,
        },
        "held_out": {},
    }
    from pipeline.train.docs import ct_readme

    write_bundle(args.out, network=net, example=torch.zeros(1, 1, *ROI_SIZE),
                 metadata=metadata, inference=INFERENCE, readme=ct_readme())
    print(f"wrote {args.out} in {wall:.0f} s ({n_params} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
