"""Write the hand-testing samples in ``samples/`` from the phantom generators.

    python -m pipeline.train.make_samples [--out samples]

Seeds lie outside the training and held-out ranges, so the demo models have not
seen these images. The files are committed; this only re-creates them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.train.phantoms_ct import make_ct_phantom, write_dicom_series
from pipeline.train.phantoms_cxr import FINDINGS, make_cxr_phantom, write_dicom

# name -> (seed, findings present); every other finding is forced absent
CXR_SAMPLES: dict[str, tuple[int, tuple[str, ...]]] = {
    "normal": (20_000_001, ()),
    "pleural-effusion": (20_000_002, ("Pleural Effusion",)),
    "cardiomegaly": (20_000_003, ("Cardiomegaly",)),
    "pneumothorax": (20_000_004, ("Pneumothorax",)),
}
CT_SEED = 20_000_101


def write_samples(out: Path) -> list[Path]:
    """Chest X-rays (CR) as single files under ``out/cxr``, one CT series under ``out/ct``."""
    written: list[Path] = []
    for name, (seed, present) in CXR_SAMPLES.items():
        phantom = make_cxr_phantom(seed, findings={f: f in present for f in FINDINGS})
        written.append(write_dicom(phantom, out / "cxr" / f"{name}.dcm", modality="CR",
                                   patient_id=f"SAMPLE-CXR-{name.upper()}"))
    ct = make_ct_phantom(CT_SEED)
    written += write_dicom_series(ct, out / "ct" / "abdomen", patient_id="SAMPLE-CT-1")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("samples"),
                        help="folder to write into (default: samples)")
    args = parser.parse_args(argv)
    files = write_samples(args.out)
    print(f"wrote {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
