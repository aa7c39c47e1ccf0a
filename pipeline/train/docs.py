"""Text of the demo bundles' ``docs/README.md`` (kept next to the generators)."""

from __future__ import annotations


def cxr_readme() -> str:
    """README of the cxr-findings bundle."""
    from pipeline.train import phantoms_cxr

    return f"""# cxr-findings (demo bundle)

A small MONAI `DenseNet` (2D, two dense blocks) that scores 11 chest-radiograph
findings (multi-label, sigmoid outputs). **It was trained only on synthetic
phantoms and is meant for demonstrating and testing dicom-node; it says
nothing about real patients and must not be used clinically.**

- Input: one frontal chest radiograph (DX/CR, MONOCHROME2), resized to
  128x128 (area; a non-square one without keeping its proportions), min-max
  scaled to [0, 1]; see `configs/inference.json`.
- Output: 11 probabilities in the order of `labels` in `configs/metadata.json`.
  The overall result is `TB Presumptive` when Tuberculosis >= threshold,
  `Abnormal` when any other finding is, else `Normal`.
- Grad-CAM target layer: `gradcam_target_layer` in `configs/metadata.json`
  (the final feature map, before global pooling).
- Held-out scores (phantom seeds >= 10,000,000, disjoint from training):
  `held_out` in `configs/metadata.json`.

Reproduce: `python -m pipeline.train.train_cxr --out pipeline/models/cxr-findings`
then `python -m pipeline.train.evaluate --write`.

## Known limitations

- The Grad-CAM localisation hit-rate (heatmap peak inside the lesion's box)
  is 0.95 over all positives of 400 held-out phantoms
  (`held_out.gradcam_hit_rate`), but not even across findings
  (`gradcam_hit_rate_per_finding`): it is worst for Pleural Thickening (0.76),
  whose peak tends to fall on the adjacent chest wall just lateral to the box,
  and Infiltration (0.85). The classification scores are not affected.
- The phantoms are square and the chest fills them. A non-square radiograph is
  squashed to the square input (`pad_to_square: false`): of 200 held-out
  phantoms cut to non-square shapes, the chest still filling them, squashed
  ones read wrong 23-54 times, the same padded to a square 26-230 times (the
  padded chest is smaller than any the model saw). Either way the model may
  find what is not there (a normal phantom padded by hand to 312x256 reads as
  Pneumothorax 0.93), and dicom-node notes in the result every image whose
  long side is more than 1.1 times its short one.
- The fused Grad-CAM layers were chosen by looking at held-out seeds
  10,000,000-10,000,100, which are also part of the reported held-out set, so
  the hit-rate is partly measured on the phantoms it was tuned on.

## Phantom appearance

{phantoms_cxr.__doc__}
"""


def ct_readme() -> str:
    """README of the ct-organs bundle."""
    from pipeline.train import phantoms_ct

    return f"""# ct-organs (demo bundle)

A small MONAI 3D `UNet` that segments organ-like structures in abdominal CT
phantoms, run with `monai.inferers.sliding_window_inference`. **Trained only on
synthetic phantoms; for demonstrating and testing dicom-node, not for clinical use.**

- Input: a CT volume in Hounsfield units (Z x Y x X, axial slices), windowed
  [-200, 300] HU to [0, 1] (`ScaleIntensityRange`, clipped). A series whose
  spacing is more than 10% off the training spacing (`pixdim_zyx_mm` in
  `configs/metadata.json`, 5 x 4 x 4 mm) is resampled to it by the node (area
  averaging) and the labels come back at the series' own grid.
- Output: label map (argmax of softmax), labels listed in `configs/metadata.json`.
- Held-out Dice per structure: `held_out` in `configs/metadata.json`.

Reproduce: `python -m pipeline.train.train_ct --out pipeline/models/ct-organs`
then `python -m pipeline.train.evaluate --write`.

## Phantom appearance

{phantoms_ct.__doc__}
"""
