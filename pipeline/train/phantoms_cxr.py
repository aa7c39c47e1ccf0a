"""Deterministic 2D chest-radiograph phantoms for the ``cxr-findings`` demo model.

``make_cxr_phantom(seed)`` draws one frontal (PA) chest radiograph in display
convention (MONOCHROME2: air dark, bone bright) as a float32 image in [0, 1].
Everything comes from ``numpy.random.default_rng(seed)``, so a seed always gives
the same image, labels and boxes.

Normal anatomy, varied per seed: a soft-tissue body outline on an air
background; two lungs (half-ellipses cut by a domed diaphragm) with a fine
vascular texture; mediastinum, spine and heart (cardio-thoracic ratio
0.36-0.46); nine posterior ribs per side and both clavicles; thorax size and
position, exposure (gain, offset, gamma), blur and quantum noise all vary.

Each of the 11 findings of seed 001 has its own appearance and location
(``side`` = patient's right or left lung, chosen at random). Any number of
findings may be present in one image (each independently, ~22 % prevalence,
25 % of images are normal); their opacities add up, so none hides another.

=====================  ======================================================  =====================
Finding                Appearance in the phantom                               Location / box
=====================  ======================================================  =====================
Tuberculosis           cavitating lesion: dense ring (outer radius 9-13 px,    upper zone (apex) of
                       wall 3-4 px) with a dark air-filled centre, plus 3-5    one lung; box around
                       small satellite nodules (radius 2-3 px) around it       ring and satellites
Cardiomegaly           enlarged heart: cardio-thoracic ratio 0.58-0.68         heart bounding box
                       (normal 0.36-0.46), taller and wider heart shadow
Pleural Thickening     smooth dense band 5-8 px thick along the lateral        lateral chest wall,
                       (outer) lung border                                     mid zone of one lung
Pleural Effusion       homogeneous dense opacity filling the lung base, with   base of one lung
                       a concave meniscus rising towards the lateral wall      (costophrenic angle)
                       (blunted costophrenic angle)
Pneumothorax           lateral apical region that is blacker than lung and     lateral upper part
                       has no vascular markings, bounded by a thin bright      of one lung
                       visceral pleural line
Consolidation          large dense homogeneous ellipse (radii 18-30 px) with   mid/lower zone of one
                       soft edge and dark branching air bronchograms inside    lung
Atelectasis            sharp-edged triangular (wedge) opacity, apex at the     medial lower zone of
                       hilum, base on the diaphragm                            one lung
Nodule Mass            single solid round dense disc (radius 7-12 px) with     anywhere in the mid
                       a sharp edge, no dark centre                            or lower lung
Fibrosis               reticular net of thin bright lines (jittered grid,      peripheral lower zone
                       spacing 6-8 px) over a subpleural region                of one lung
Infiltration           5-8 faint ill-defined patchy blobs (Gaussian, sigma     perihilar / mid zone
                       4-7 px, low contrast) in a cluster ~35 px wide          of one lung
Calcification          3-6 tiny, very dense (near white) dots, radius          anywhere in one lung
                       2-3.5 px, clustered within ~20 px
=====================  ======================================================  =====================

Boxes are ``(x0, y0, x1, y1)`` in pixels of the returned image (inclusive-
exclusive). ``write_dicom`` stores the image as a 16-bit DX file.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipeline.train._common import blur, deterministic_uid

FINDINGS: tuple[str, ...] = (
    "Tuberculosis",
    "Cardiomegaly",
    "Pleural Thickening",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Atelectasis",
    "Nodule Mass",
    "Fibrosis",
    "Infiltration",
    "Calcification",
)

#: Findings whose phantom has a bounding box (all of them).
LOCALISED: tuple[str, ...] = FINDINGS

Box = tuple[int, int, int, int]
FArr = npt.NDArray[np.float32]


@dataclass
class CXRPhantom:
    """One phantom: image (H x W, float32 in [0, 1]), labels and lesion boxes."""

    seed: int
    image: FArr
    labels: npt.NDArray[np.float32]  # 11-vector of 0/1 in FINDINGS order
    boxes: dict[str, Box] = field(default_factory=dict)
    sex: str = "M"
    age: int = 50


@dataclass
class _Lung:
    side: int  # +1 = image right (patient's left), -1 = image left (patient's right)
    cx: float
    cy: float
    rx: float
    ry: float
    top: float
    bottom: float
    mask: npt.NDArray[np.bool_]
    radial: FArr  # normalised elliptic radius (1 on the border)
    lateral: FArr  # +1 laterally, -1 medially (normalised x offset)


def _box(mask: npt.NDArray[np.bool_], size: int, margin: int = 1) -> Box:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (
        max(0, int(xs.min()) - margin),
        max(0, int(ys.min()) - margin),
        min(size, int(xs.max()) + 1 + margin),
        min(size, int(ys.max()) + 1 + margin),
    )


def _disc(xx: FArr, yy: FArr, x: float, y: float, r: float, edge: float = 1.0) -> FArr:
    """Soft-edged disc of radius ``r`` (1 inside, 0 outside)."""
    d = np.sqrt((xx - x) ** 2 + (yy - y) ** 2)
    return np.clip((r - d) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _segment(xx: FArr, yy: FArr, p0: tuple[float, float], p1: tuple[float, float],
             width: float) -> FArr:
    """Soft line segment of the given width."""
    (x0, y0), (x1, y1) = p0, p1
    vx, vy = x1 - x0, y1 - y0
    ll = vx * vx + vy * vy + 1e-6
    t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / ll, 0.0, 1.0)
    d = np.sqrt((xx - (x0 + t * vx)) ** 2 + (yy - (y0 + t * vy)) ** 2)
    return np.clip(width / 2 - d + 0.5, 0.0, 1.0).astype(np.float32)


def _pick_in(rng: np.random.Generator, mask: npt.NDArray[np.bool_],
             xx: FArr, yy: FArr) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(xs)))
    return float(xx[ys[i], xs[i]]), float(yy[ys[i], xs[i]])


def make_cxr_phantom(seed: int, size: int = 256,
                     findings: dict[str, bool] | None = None) -> CXRPhantom:
    """Draw the phantom of ``seed``; ``findings`` forces some labels on or off."""
    rng = np.random.default_rng(seed)
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # ---- which findings ---------------------------------------------------
    normal = rng.random() < 0.25
    present = {f: (not normal) and bool(rng.random() < 0.22) for f in FINDINGS}
    if findings:
        present.update(findings)
    sides = {f: int(rng.choice([-1, 1])) for f in FINDINGS}

    # ---- thorax geometry ----------------------------------------------------
    cx = s / 2 + rng.uniform(-0.03, 0.03) * s
    half_w = rng.uniform(0.34, 0.41) * s
    top = rng.uniform(0.08, 0.14) * s
    bottom = rng.uniform(0.78, 0.86) * s
    density = np.zeros((size, size), np.float32)

    # body (soft tissue) and air outside
    body = ((xx - cx) / (half_w * 1.22)) ** 2 + ((yy - s * 0.55) / (s * 0.62)) ** 2 < 1.0
    body |= (np.abs(xx - cx) < half_w * 0.45) & (yy < s * 0.2)  # neck / shoulders
    density += np.where(body, 0.48, 0.04).astype(np.float32)

    lungs: list[_Lung] = []
    for side in (-1, 1):
        lcx = cx + side * half_w * 0.52
        rx = half_w * rng.uniform(0.40, 0.44)
        ly_top = top + rng.uniform(-0.01, 0.01) * s
        ly_bot = bottom + rng.uniform(-0.015, 0.015) * s
        ry = (ly_bot - ly_top) * 0.95
        lcy = ly_bot
        radial = np.sqrt(((xx - lcx) / rx) ** 2 + ((yy - lcy) / ry) ** 2).astype(np.float32)
        lateral = (side * (xx - lcx) / rx).astype(np.float32)
        dome = ly_bot - 0.05 * s * np.clip(1 - lateral**2, 0, 1) - 0.02 * s * (lateral < 0)
        mask = (radial < 1.0) & (yy < dome)
        lungs.append(_Lung(side, lcx, lcy, rx, ry, ly_top, ly_bot, mask, radial, lateral))
    lung_any = lungs[0].mask | lungs[1].mask
    by_side = {lg.side: lg for lg in lungs}

    # lung: air density with vascular texture (markings)
    texture = blur(rng.normal(0, 1, (size, size)).astype(np.float32), 2.0)
    texture = texture / (np.abs(texture).max() + 1e-6)
    vessels = np.zeros_like(density)
    for lg in lungs:
        hx, hy = lg.cx - lg.side * lg.rx * 0.55, lg.top + (lg.bottom - lg.top) * 0.45
        for _ in range(14):
            ang = rng.uniform(-np.pi * 0.95, np.pi * 0.95) + np.pi / 2
            length = rng.uniform(0.3, 0.7) * lg.rx * 1.6
            ex, ey = hx + lg.side * abs(np.cos(ang)) * length, hy + np.sin(ang) * length
            vessels += _segment(xx, yy, (hx, hy), (ex, ey), rng.uniform(1.0, 2.0)) * 0.5
    markings = np.clip(0.05 * texture + 0.06 * np.clip(vessels, 0, 1.5), -0.05, 0.12)
    lung_density = np.where(lung_any, -0.30 + markings, 0.0).astype(np.float32)

    # ---- findings that change anatomy --------------------------------------
    ptx_mask = np.zeros((size, size), bool)
    if present["Pneumothorax"]:
        lg = by_side[sides["Pneumothorax"]]
        r_pl = rng.uniform(0.70, 0.80)
        upper = yy < lg.top + (lg.bottom - lg.top) * rng.uniform(0.55, 0.7)
        ptx_mask = lg.mask & (lg.radial > r_pl) & upper & (lg.lateral > -0.2)
        lung_density = np.where(ptx_mask, -0.46, lung_density)  # no markings, blacker
        pleural_line = lg.mask & (np.abs(lg.radial - r_pl) < 1.2 / lg.rx) & upper & (
            lg.lateral > -0.2)
        lung_density = np.where(pleural_line, lung_density + 0.28, lung_density)
    density += lung_density.astype(np.float32)

    # mediastinum and spine
    medi = (np.abs(xx - cx) < half_w * 0.16) & (yy > top - 0.02 * s) & (yy < bottom)
    density += np.where(medi & ~lung_any, 0.12, 0.0).astype(np.float32)
    spine = (np.abs(xx - cx) < half_w * 0.09) & body
    density += np.where(spine, 0.10, 0.0).astype(np.float32)

    # heart
    ctr = rng.uniform(0.58, 0.68) if present["Cardiomegaly"] else rng.uniform(0.36, 0.46)
    heart_hw = ctr * half_w
    heart_hh = heart_hw * rng.uniform(0.72, 0.82)
    hcx = cx + half_w * rng.uniform(0.06, 0.12)
    hcy = bottom - heart_hh * 1.0
    heart = ((xx - hcx) / heart_hw) ** 2 + ((yy - hcy) / heart_hh) ** 2 < 1.0
    heart &= yy < bottom + 0.02 * s
    density += np.where(heart, 0.32, 0.0).astype(np.float32)
    boxes: dict[str, Box] = {}
    if present["Cardiomegaly"]:
        boxes["Cardiomegaly"] = _box(heart, size)

    # ribs and clavicles
    bone = np.zeros_like(density)
    for lg in lungs:
        spacing = (lg.bottom - lg.top) / 9.5
        for k in range(9):
            y_med = lg.top + spacing * (k + 0.4)
            x0 = cx + lg.side * half_w * 0.08
            x1 = lg.cx + lg.side * lg.rx * 1.05
            xm = (x0 + x1) / 2
            pts = [(x0, y_med), (xm, y_med + spacing * 0.2), (x1, y_med + spacing * 0.9)]
            thick = spacing * 0.38
            bone += _segment(xx, yy, pts[0], pts[1], thick) * 0.6
            bone += _segment(xx, yy, pts[1], pts[2], thick) * 0.6
        clav_y = top + rng.uniform(0.0, 0.03) * s
        bone += _segment(xx, yy, (cx + lg.side * half_w * 0.1, clav_y + 0.02 * s),
                         (cx + lg.side * half_w * 1.0, clav_y - 0.02 * s), 0.025 * s)
    density += 0.14 * np.clip(bone, 0, 1) * body

    # ---- focal findings (additive opacities) -------------------------------
    op = np.zeros_like(density)

    if present["Tuberculosis"]:
        lg = by_side[sides["Tuberculosis"]]
        zone = lg.mask & (yy < lg.top + (lg.bottom - lg.top) * 0.3) & (lg.radial < 0.85)
        x, y = _pick_in(rng, zone, xx, yy)
        r_out = rng.uniform(9, 13)
        wall = rng.uniform(3, 4)
        ring = _disc(xx, yy, x, y, r_out) - _disc(xx, yy, x, y, r_out - wall)
        op += 0.42 * ring - 0.10 * _disc(xx, yy, x, y, r_out - wall)
        m = ring > 0.5
        for _ in range(int(rng.integers(3, 6))):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(r_out + 4, r_out + 11)
            sat = _disc(xx, yy, x + d * np.cos(a), y + d * np.sin(a), rng.uniform(2, 3))
            op += 0.30 * sat
            m |= sat > 0.5
        boxes["Tuberculosis"] = _box(m, size)

    if present["Pleural Thickening"]:
        lg = by_side[sides["Pleural Thickening"]]
        t = rng.uniform(5, 8)
        y0 = lg.top + (lg.bottom - lg.top) * rng.uniform(0.25, 0.35)
        y1 = lg.top + (lg.bottom - lg.top) * rng.uniform(0.62, 0.72)
        band = lg.mask & (lg.radial > 1 - t / lg.rx) & (lg.lateral > 0.3) & (yy > y0) & (yy < y1)
        op += 0.36 * blur(band.astype(np.float32), 0.8)
        boxes["Pleural Thickening"] = _box(band, size)

    if present["Pleural Effusion"]:
        lg = by_side[sides["Pleural Effusion"]]
        level = lg.bottom - (lg.bottom - lg.top) * rng.uniform(0.18, 0.30)
        rise = (lg.bottom - lg.top) * rng.uniform(0.08, 0.14)
        meniscus = level - rise * np.clip(lg.lateral, 0, 1) ** 2
        fluid = lg.mask & (yy > meniscus)
        op += 0.45 * blur(fluid.astype(np.float32), 1.2)
        boxes["Pleural Effusion"] = _box(fluid, size)

    if present["Pneumothorax"]:
        boxes["Pneumothorax"] = _box(ptx_mask, size)

    if present["Consolidation"]:
        lg = by_side[sides["Consolidation"]]
        zone = lg.mask & (yy > lg.top + (lg.bottom - lg.top) * 0.4) & (lg.radial < 0.6)
        x, y = _pick_in(rng, zone, xx, yy)
        rxc, ryc = rng.uniform(20, 30), rng.uniform(18, 26)
        ell = np.clip((1 - np.sqrt(((xx - x) / rxc) ** 2 + ((yy - y) / ryc) ** 2)) * 6, 0, 1)
        ell = ell * lg.mask
        bron = np.zeros_like(density)
        for _ in range(int(rng.integers(2, 4))):
            a = rng.uniform(0, 2 * np.pi)
            p1 = (x + 0.7 * rxc * np.cos(a), y + 0.7 * ryc * np.sin(a))
            bron += _segment(xx, yy, (x, y), p1, 2.0)
            b = a + rng.uniform(-0.8, 0.8)
            p2 = (p1[0] + 0.3 * rxc * np.cos(b), p1[1] + 0.3 * ryc * np.sin(b))
            bron += _segment(xx, yy, p1, p2, 1.5)
        op += 0.42 * ell - 0.22 * np.clip(bron, 0, 1) * ell
        boxes["Consolidation"] = _box(ell > 0.5, size)

    if present["Atelectasis"]:
        lg = by_side[sides["Atelectasis"]]
        hx = lg.cx - lg.side * lg.rx * rng.uniform(0.35, 0.5)
        hy = lg.top + (lg.bottom - lg.top) * rng.uniform(0.45, 0.55)
        by_ = lg.bottom - 0.06 * s
        bx0 = lg.cx - lg.side * lg.rx * rng.uniform(0.55, 0.7)
        bx1 = lg.cx + lg.side * lg.rx * rng.uniform(0.0, 0.2)
        # triangle (hx,hy), (bx0,by_), (bx1,by_) via barycentric sign tests
        def _edge(ax: float, ay: float, bx: float, by: float) -> FArr:
            e: FArr = ((xx - ax) * (by - ay) - (yy - ay) * (bx - ax)).astype(np.float32)
            return e
        e1, e2, e3 = _edge(hx, hy, bx0, by_), _edge(bx0, by_, bx1, by_), _edge(bx1, by_, hx, hy)
        tri = ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))
        tri &= lg.mask
        op += 0.38 * tri.astype(np.float32)
        boxes["Atelectasis"] = _box(tri, size)

    if present["Nodule Mass"]:
        lg = by_side[sides["Nodule Mass"]]
        zone = lg.mask & (yy > lg.top + (lg.bottom - lg.top) * 0.3) & (lg.radial < 0.75)
        x, y = _pick_in(rng, zone, xx, yy)
        r = rng.uniform(7, 12)
        nod = _disc(xx, yy, x, y, r)
        op += 0.45 * nod
        boxes["Nodule Mass"] = _box(nod > 0.5, size)

    if present["Fibrosis"]:
        lg = by_side[sides["Fibrosis"]]
        region = lg.mask & (lg.radial > rng.uniform(0.5, 0.6)) & (lg.lateral > 0.0) & (
            yy > lg.top + (lg.bottom - lg.top) * 0.5)
        sp = rng.uniform(6, 8)
        gx = np.sin(2 * np.pi * (xx + 2.5 * texture * sp) / sp)
        gy = np.sin(2 * np.pi * (yy + 2.5 * np.roll(texture, 17, 0) * sp) / sp)
        net = ((np.abs(gx) > 0.85) | (np.abs(gy) > 0.85)).astype(np.float32)
        op += 0.28 * net * region
        boxes["Fibrosis"] = _box(region, size)

    if present["Infiltration"]:
        lg = by_side[sides["Infiltration"]]
        zone = lg.mask & (np.abs(yy - (lg.top + (lg.bottom - lg.top) * 0.5)) < 0.2 * (
            lg.bottom - lg.top)) & (lg.radial < 0.7)
        x, y = _pick_in(rng, zone, xx, yy)
        m = np.zeros((size, size), bool)
        blobs = np.zeros_like(density)
        for _ in range(int(rng.integers(5, 9))):
            bx, by = x + rng.uniform(-17, 17), y + rng.uniform(-17, 17)
            sg = rng.uniform(4, 7)
            blobs += np.exp(-0.5 * ((xx - bx) ** 2 + (yy - by) ** 2) / sg**2) * rng.uniform(
                0.12, 0.2)
            m |= (xx - bx) ** 2 + (yy - by) ** 2 < (1.5 * sg) ** 2
        op += np.clip(blobs, 0, 0.3) * lg.mask
        boxes["Infiltration"] = _box(m & lg.mask, size)

    if present["Calcification"]:
        lg = by_side[sides["Calcification"]]
        zone = lg.mask & (lg.radial < 0.75)
        x, y = _pick_in(rng, zone, xx, yy)
        m = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(3, 7))):
            dx, dy = rng.uniform(-10, 10), rng.uniform(-10, 10)
            dot = _disc(xx, yy, x + dx, y + dy, rng.uniform(2.0, 3.5), 0.7)
            op += 0.9 * dot
            m |= dot > 0.3
        boxes["Calcification"] = _box(m, size)

    density += op * body

    # ---- exposure, blur and noise -----------------------------------------
    img = blur(density, rng.uniform(0.5, 1.0))
    img = np.clip(img, 0.0, 1.2) / 1.2
    gamma = rng.uniform(0.8, 1.25)
    img = img**gamma
    gain, offset = rng.uniform(0.85, 1.1), rng.uniform(-0.03, 0.08)
    img = gain * img + offset
    img += rng.normal(0, rng.uniform(0.008, 0.025), img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)

    labels = np.array([1.0 if present[f] else 0.0 for f in FINDINGS], np.float32)
    boxes = {k: v for k, v in boxes.items() if present[k]}
    sex = "M" if rng.random() < 0.5 else "F"
    age = int(rng.integers(18, 90))
    return CXRPhantom(seed=seed, image=img, labels=labels, boxes=boxes, sex=sex, age=age)


def write_dicom(phantom: CXRPhantom, path: str | Path, *, patient_id: str | None = None,
                patient_name: str | None = None, modality: str = "DX",
                study_date: _dt.date | None = None) -> Path:
    """Write ``phantom`` as a single-frame 16-bit MONOCHROME2 DX (or CR) DICOM file.

    Pixel value = ``round(image * 4095)``, WindowCenter 2048, WindowWidth 4096.
    UIDs are derived deterministically from the phantom's seed.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
    )

    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    path = Path(path)
    seed = phantom.seed
    sop_class = (DigitalXRayImageStorageForPresentation if modality == "DX"
                 else ComputedRadiographyImageStorage)
    sop_uid = deterministic_uid("cxr", seed, "sop")
    date = study_date or (_dt.date(2024, 1, 1) + _dt.timedelta(days=seed % 365))

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = deterministic_uid("cxr", seed, "study")
    ds.SeriesInstanceUID = deterministic_uid("cxr", seed, "series")
    ds.Modality = modality
    ds.PatientID = patient_id or f"PHANTOM-CXR-{seed:06d}"
    ds.PatientName = patient_name or f"Phantom^CXR{seed:06d}"
    ds.PatientSex = phantom.sex
    ds.PatientAge = f"{phantom.age:03d}Y"
    ds.PatientBirthDate = f"{date.year - phantom.age:04d}0101"
    ds.StudyDate = date.strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = f"ACC{seed:08d}"[:16]
    ds.StudyID = f"{seed % 100000}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "CHEST PA (phantom)"
    ds.SeriesDescription = "PA"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "dicom-node phantom"
    ds.ReferringPhysicianName = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ConversionType = "SYN"
    ds.PixelSpacing = [0.7 * 512 / phantom.image.shape[0]] * 2
    ds.ImagerPixelSpacing = ds.PixelSpacing

    pixels = np.round(np.clip(phantom.image, 0, 1) * 4095).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelData = pixels.tobytes()

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
