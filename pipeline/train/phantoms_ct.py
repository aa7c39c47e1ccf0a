"""Deterministic 3D abdominal CT phantoms for the ``ct-organs`` demo model.

``make_ct_phantom(seed)`` returns a volume in Hounsfield units (Z x Y x X,
float32), a label map (uint8) and the voxel spacing ``(z, y, x)`` in mm.
Axes follow DICOM LPS: x (columns) runs to the patient's left, y (rows) to
posterior, z (slice index) from inferior (index 0) to superior, which is the
order of ascending ``ImagePositionPatient`` z in the series ``write_dicom_series``
writes. Everything comes from ``numpy.random.default_rng(seed)``.

Anatomy (positions, radii, body size and rotation vary per seed; every organ's
surface is perturbed by low-frequency noise, every tissue has its own texture,
plus quantum noise of sd 8-15 HU):

=====  ============  ======================================  ==============================
label  structure     appearance                              location
=====  ============  ======================================  ==============================
0      background    air -1000 HU outside an elliptic body;  whole volume
                     subcutaneous fat -100 HU (3-6 voxels),
                     abdominal-wall muscle 50 HU, visceral
                     fat -90 HU with bowel loops (15-35 HU,
                     some with air pockets), paraspinal
                     muscles 50 HU, vertebra (cortex ~700,
                     cancellous ~250 HU), aorta 160 HU
1      liver         large lobulated ellipsoid, 95-110 HU,   patient's right, anterior-
                     fine texture (sd ~6 HU)                 lateral, upper two thirds
2      spleen        crescent-like ellipsoid, 125-140 HU     patient's left, posterior,
                                                             upper half
3      right kidney  bean: ellipsoid 180-200 HU with a       right of the spine, posterior,
                     medial renal-sinus notch of fat         middle third
4      left kidney   as the right kidney                     left of the spine, posterior
=====  ============  ======================================  ==============================
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipeline.train._common import blur, deterministic_uid

LABELS: tuple[str, ...] = ("background", "liver", "spleen", "right kidney", "left kidney")
DEFAULT_SHAPE: tuple[int, int, int] = (48, 96, 96)
DEFAULT_SPACING: tuple[float, float, float] = (5.0, 4.0, 4.0)

FArr = npt.NDArray[np.float32]


@dataclass
class CTPhantom:
    """One CT phantom: HU volume, label map and spacing (z, y, x) in mm."""

    seed: int
    volume: FArr  # Z x Y x X, HU
    labels: npt.NDArray[np.uint8]  # Z x Y x X
    spacing: tuple[float, float, float]
    sex: str = "M"
    age: int = 50


def _lowfreq(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> FArr:
    n = blur(rng.normal(0, 1, shape).astype(np.float32), sigma)
    out: FArr = (n / (n.std() + 1e-6)).astype(np.float32)
    return out


def make_ct_phantom(seed: int, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                    spacing: tuple[float, float, float] = DEFAULT_SPACING) -> CTPhantom:
    """Draw the CT phantom of ``seed``."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    zz, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    # physical coordinates in mm, centred
    zm = (zz - (nz - 1) / 2) * spacing[0]
    ym = (yy - (ny - 1) / 2) * spacing[1]
    xm = (xx - (nx - 1) / 2) * spacing[2]
    fx, fy = nx * spacing[2], ny * spacing[1]
    sup = zz / max(nz - 1, 1)  # 0 inferior .. 1 superior

    # global in-plane rotation and shift
    ang = rng.uniform(-0.08, 0.08)
    sx, sy = rng.uniform(-0.03, 0.03) * fx, rng.uniform(-0.03, 0.03) * fy
    xr = np.cos(ang) * (xm - sx) + np.sin(ang) * (ym - sy)
    yr = -np.sin(ang) * (xm - sx) + np.cos(ang) * (ym - sy)

    smooth = _lowfreq(rng, shape, 3.0)  # shared low-frequency field for surfaces

    # ---- body ---------------------------------------------------------------
    ax = rng.uniform(0.40, 0.46) * fx * (1 + 0.03 * (sup - 0.5))
    ay = rng.uniform(0.28, 0.34) * fy
    body_r = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2)
    body = body_r < 1.0
    fat_t = rng.uniform(3, 6) * spacing[2]
    inner = np.sqrt((xr / (ax - fat_t)) ** 2 + (yr / (ay - fat_t)) ** 2) < 1.0
    wall_t = rng.uniform(2, 3) * spacing[2]
    cavity = np.sqrt((xr / (ax - fat_t - wall_t)) ** 2 + (yr / (ay - fat_t - wall_t)) ** 2) < 1

    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = -100.0
    hu[inner] = 50.0
    tex_fat = _lowfreq(rng, shape, 1.5)
    # visceral fat with bowel loops
    bowel_field = _lowfreq(rng, shape, 2.0)
    bowel = cavity & (bowel_field > 0.2)
    hu[cavity] = -90.0 + 8 * tex_fat[cavity]
    hu[bowel] = rng.uniform(15, 35) + 6 * tex_fat[bowel]
    gas = bowel & (bowel_field > 1.6)
    hu[gas] = -900.0

    # spine, paraspinal muscles, aorta (not labelled)
    vy = ay * rng.uniform(0.55, 0.62)
    vr = rng.uniform(14, 18)
    d_vert = np.sqrt(xr**2 + (yr - vy) ** 2)
    para = cavity & (np.abs(xr) < vr * 2.6) & (yr > vy - vr * 0.3)
    hu[para] = 50.0 + 5 * tex_fat[para]
    hu[d_vert < vr] = 700.0
    hu[d_vert < vr - 3] = 250.0 + 30 * tex_fat[d_vert < vr - 3]
    proc = (np.abs(xr) < 5) & (yr > vy) & (yr < vy + vr * 2.2) & body
    hu[proc] = 600.0
    aorta = np.sqrt((xr - rng.uniform(-8, 0)) ** 2 + (yr - (vy - vr - 14)) ** 2) < 10
    hu[aorta & cavity] = 160.0

    labels = np.zeros(shape, np.uint8)

    def ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float],
                  bump: float) -> npt.NDArray[np.bool_]:
        d = np.sqrt(((xr - c[0]) / r[0]) ** 2 + ((yr - c[1]) / r[1]) ** 2
                    + ((zm - c[2]) / r[2]) ** 2)
        return np.asarray((d + bump * smooth) < 1.0)

    zlen = nz * spacing[0]
    # liver: patient right (negative x), anterior-lateral, upper two thirds
    lc = (-ax * rng.uniform(0.38, 0.46), -ay * rng.uniform(0.05, 0.15),
          zlen * rng.uniform(0.12, 0.2))
    lr = (ax * rng.uniform(0.42, 0.5), ay * rng.uniform(0.55, 0.65),
          zlen * rng.uniform(0.35, 0.42))
    liver = ellipsoid(lc, lr, 0.06) & cavity
    # medial-inferior cut gives a lobulated wedge shape
    liver &= ~((xr > lc[0] + lr[0] * 0.35) & (zm < lc[2] - lr[2] * 0.2))
    # spleen: patient left, posterior, upper half
    sc = (ax * rng.uniform(0.55, 0.65), ay * rng.uniform(0.25, 0.4),
          zlen * rng.uniform(0.15, 0.25))
    sr = (ax * rng.uniform(0.2, 0.25), ay * rng.uniform(0.32, 0.4),
          zlen * rng.uniform(0.2, 0.26))
    spleen = ellipsoid(sc, sr, 0.06) & cavity & ~liver
    # kidneys: posterior, lateral to the spine, middle third
    kidneys = []
    for side in (-1, 1):
        kc = (side * (vr + rng.uniform(34, 42)), vy - rng.uniform(4, 12),
              zlen * rng.uniform(-0.12, 0.02))
        kr = (rng.uniform(26, 32), rng.uniform(30, 36), zlen * rng.uniform(0.22, 0.28))
        k = ellipsoid(kc, kr, 0.04) & cavity
        sinus = ellipsoid((kc[0] - side * kr[0] * 0.75, kc[1], kc[2]),
                          (kr[0] * 0.45, kr[1] * 0.35, kr[2] * 0.5), 0.0)
        kidneys.append((k & ~sinus & ~liver & ~spleen, k & sinus))

    organ_tex = _lowfreq(rng, shape, 1.0)
    hu[liver] = rng.uniform(95, 110) + 6 * organ_tex[liver]
    labels[liver] = 1
    hu[spleen] = rng.uniform(125, 140) + 6 * organ_tex[spleen]
    labels[spleen] = 2
    for i, (k, sinus) in enumerate(kidneys):
        hu[k] = rng.uniform(180, 200) + 8 * organ_tex[k]
        hu[sinus] = -60.0
        labels[k] = 3 + i

    hu = blur(hu, 0.6)
    hu += rng.normal(0, rng.uniform(8, 15), shape).astype(np.float32)
    hu = np.clip(hu, -1024, 3071).astype(np.float32)
    sex = "M" if rng.random() < 0.5 else "F"
    age = int(rng.integers(18, 90))
    return CTPhantom(seed=seed, volume=hu, labels=labels, spacing=spacing, sex=sex, age=age)


def write_dicom_series(phantom: CTPhantom, folder: str | Path, *,
                       patient_id: str | None = None, patient_name: str | None = None,
                       study_date: _dt.date | None = None) -> list[Path]:
    """Write ``phantom`` as a CT series, one file per slice (``IM0001.dcm``...).

    Stored value = HU + 1024 (uint16, RescaleSlope 1, RescaleIntercept -1024);
    slice ``k`` sits at ImagePositionPatient z = ``k * spacing_z``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seed = phantom.seed
    dz, dy, dx = phantom.spacing
    nz, ny, nx = phantom.volume.shape
    date = study_date or (_dt.date(2024, 1, 1) + _dt.timedelta(days=seed % 365))
    study_uid = deterministic_uid("ct", seed, "study")
    series_uid = deterministic_uid("ct", seed, "series")
    frame_uid = deterministic_uid("ct", seed, "frame")
    stored = np.clip(np.round(phantom.volume) + 1024, 0, 4095).astype(np.uint16)
    x0, y0 = -(nx - 1) / 2 * dx, -(ny - 1) / 2 * dy
    paths = []
    for k in range(nz):
        sop_uid = deterministic_uid("ct", seed, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientID = patient_id or f"PHANTOM-CT-{seed:06d}"
        ds.PatientName = patient_name or f"Phantom^CT{seed:06d}"
        ds.PatientSex = phantom.sex
        ds.PatientAge = f"{phantom.age:03d}Y"
        ds.PatientBirthDate = f"{date.year - phantom.age:04d}0101"
        ds.StudyDate = date.strftime("%Y%m%d")
        ds.StudyTime = "120000"
        ds.SeriesDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = f"ACT{seed:08d}"[:16]
        ds.StudyID = f"{seed % 100000}"
        ds.StudyDescription = "CT ABDOMEN (phantom)"
        ds.SeriesDescription = "AXIAL"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.BodyPartExamined = "ABDOMEN"
        ds.Manufacturer = "dicom-node phantom"
        ds.ReferringPhysicianName = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [float(x0), float(y0), float(k * dz)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceLocation = float(k * dz)
        ds.PixelSpacing = [float(dy), float(dx)]
        ds.SliceThickness = float(dz)
        ds.SpacingBetweenSlices = float(dz)
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = stored[k].tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
