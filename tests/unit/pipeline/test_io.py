"""Tests of pipeline.io: 2D images, CT volumes, series selection and input errors."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.processing import apply_modality_lut, apply_windowing
from pydicom.pixels.utils import pixel_array
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from pipeline.io import (
    CorruptPixelDataError,
    Image2D,
    ImageSizeError,
    InputError,
    NoPixelDataError,
    SeriesError,
    UnreadableFileError,
    Volume,
    WrongModalityError,
    apply_window,
    load_ct_volume,
    load_image_2d,
    read_dataset,
    select_series,
)
from pipeline.settings import SeriesRules
from tests.unit.pipeline.dicom_samples import (
    bundled,
    ct_slice,
    enhanced_ct,
    make_image,
    save,
    write_series,
)

__all__ = ["write_series"]  # the fixture, imported so that pytest finds it

WriteSeries = Callable[..., list[Path]]


def _check_image(img: Image2D) -> None:
    assert isinstance(img, Image2D)
    assert img.pixels.dtype == np.float32
    assert img.pixels.ndim == 2
    assert np.isfinite(img.pixels).all()
    assert img.pixels.min() >= 0.0
    assert img.pixels.max() <= 1.0
    assert "PixelData" not in img.header


# --------------------------------------------------------------------------- bundled files


def test_ct_small_applies_rescale_then_minmax() -> None:
    path = bundled("CT_small.dcm")
    img = load_image_2d(path)
    _check_image(img)
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - hu.min()) / (hu.max() - hu.min())
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert img.voi == "minmax"
    assert img.window is None
    assert img.modality == "CT"
    assert img.path == path
    assert img.sop_instance_uid == ds.SOPInstanceUID
    assert img.series_instance_uid == ds.SeriesInstanceUID
    assert img.header.PatientName == ds.PatientName


def test_header_of_a_passed_dataset_is_a_copy_and_leaves_it_whole() -> None:
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    img = load_image_2d(ds)
    _check_image(img)
    assert "PixelData" in ds and img.header is not ds  # the caller's dataset is untouched
    assert img.header.SOPInstanceUID == ds.SOPInstanceUID


def test_mr_small_uses_first_window_from_file() -> None:
    path = bundled("MR_small.dcm")
    img = load_image_2d(path)
    _check_image(img)
    ds = pydicom.dcmread(path)
    assert img.voi == "window"
    assert img.window == (float(ds.WindowCenter), float(ds.WindowWidth))
    c, w = img.window
    values = ds.pixel_array.astype(np.float64)
    expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-4)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_htj2k.dcm",  # High-Throughput JPEG 2000, lossless (ours: OpenJPH)
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_same_image(name: str) -> None:
    reference = load_image_2d(bundled("MR_small.dcm")).pixels
    img = load_image_2d(bundled(name))
    _check_image(img)
    np.testing.assert_allclose(img.pixels, reference, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPEG2000.dcm", (1024, 256)),  # JPEG 2000, NM, signed 16 bit
        ("693_J2KI.dcm", (512, 512)),  # JPEG 2000 CT with a window
        ("JPGExtended.dcm", (1024, 256)),  # JPEG extended 12 bit
        ("JPEGLSNearLossless_16.dcm", (50, 10)),  # JPEG-LS near-lossless
        ("SC_rgb_jpeg_gdcm.dcm", (100, 100)),  # JPEG lossless, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100)),  # JPEG baseline, YBR_FULL
        ("image_dfl.dcm", (512, 512)),  # deflated explicit VR little endian
        ("rtdose_1frame.dcm", (10, 10)),  # 32-bit unsigned
    ],
)
def test_compressed_and_unusual_files_load(name: str, shape: tuple[int, int]) -> None:
    img = load_image_2d(bundled(name))
    _check_image(img)
    assert img.pixels.shape == shape
    assert img.pixels.max() > img.pixels.min()


def test_jpeg_lossy_12bit_loads_or_fails_cleanly() -> None:
    # pylibjpeg cannot decode this 12-bit lossy JPEG; either outcome must be clean.
    try:
        img = load_image_2d(bundled("JPEG-lossy.dcm"))
    except CorruptPixelDataError as exc:
        assert "JPEG Extended" in str(exc)
        assert exc.path is not None
    else:
        _check_image(img)


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_rle.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_rle_16bit.dcm",
    ],
)
def test_colour_images_become_luminance(name: str) -> None:
    path = bundled(name)
    img = load_image_2d(path)
    _check_image(img)
    ds = pydicom.dcmread(path)
    rgb = pixel_array(ds).astype(np.float64)  # YBR converted to RGB by pydicom
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / (2 ** int(ds.BitsStored) - 1)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-5)
    assert img.voi == "colour"


def test_palette_colour_image_is_refused() -> None:
    """Pseudo-colour indices are not the greyscale image a model reads (an inverted grey
    palette read a chest as its negative); refused, naming what to send instead."""
    with pytest.raises(InputError, match="PALETTE COLOR image"):
        load_image_2d(bundled("examples_palette.dcm"))


def test_multiframe_uses_middle_frame_by_default() -> None:
    path = bundled("examples_ybr_color.dcm")
    img = load_image_2d(path)
    _check_image(img)
    assert (img.number_of_frames, img.frame_index) == (30, 15)
    first = load_image_2d(path, frame=0)
    assert first.frame_index == 0
    assert first.pixels.shape == img.pixels.shape == (240, 320)
    with pytest.raises(ImageSizeError, match="frame 30"):
        load_image_2d(path, frame=30)


def test_multiframe_rle_picks_frame_one_of_two() -> None:
    path = bundled("SC_rgb_rle_2frame.dcm")
    img = load_image_2d(path)
    ds = pydicom.dcmread(path)
    frame = ds.pixel_array[1].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255
    np.testing.assert_allclose(img.pixels, frame, atol=1e-5)
    assert img.frame_index == 1


def test_dataset_input_is_accepted() -> None:
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    img = load_image_2d(ds)
    _check_image(img)
    assert "PixelData" in ds  # the caller's dataset is left alone


# --------------------------------------------------------------------------- synthetic images


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 16
    m2 = load_image_2d(save(make_image(ramp, modality="CR"), tmp_path / "m2.dcm"))
    m1 = load_image_2d(
        save(make_image(ramp, modality="CR", photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    )
    assert m1.inverted and not m2.inverted
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)
    assert m1.pixels[0, 0] == pytest.approx(1.0)  # lowest value is white in MONOCHROME1


def test_window_from_file_after_rescale(tmp_path: Path) -> None:
    hu = np.array([[-1000, -200, -100, 40], [200, 300, 1000, 3000]], dtype=np.int32)
    stored = (hu + 1024).astype(np.uint16)
    ds = make_image(
        stored,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=[40, 300],
        WindowWidth=[400, 1500],
    )
    img = load_image_2d(save(ds, tmp_path / "w.dcm"))
    assert img.voi == "window"
    assert img.window == (40.0, 400.0)
    px = img.pixels
    assert px[0, 0] == 0.0 and px[0, 1] == 0.0  # below the window
    assert px[0, 3] == pytest.approx(0.5, abs=0.01)  # the center
    assert px[1, 1] == 1.0 and px[1, 3] == 1.0  # above the window
    assert 0.0 < px[0, 2] < px[0, 3] < px[1, 0] < 1.0


def test_signed_16_bit_without_window_uses_minmax(tmp_path: Path) -> None:
    values = np.array([[-2000, -1000], [0, 2000]], dtype=np.int16)
    img = load_image_2d(save(make_image(values), tmp_path / "s.dcm"))
    np.testing.assert_allclose(img.pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)
    assert img.voi == "minmax"


def test_12_bit_and_8_bit(tmp_path: Path) -> None:
    twelve = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    img12 = load_image_2d(save(make_image(twelve, bits_stored=12), tmp_path / "12.dcm"))
    np.testing.assert_allclose(img12.pixels, twelve / 4095, atol=1e-6)
    eight = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    img8 = load_image_2d(save(make_image(eight, modality="OT"), tmp_path / "8.dcm"))
    np.testing.assert_allclose(img8.pixels, eight / 255, atol=1e-6)


def test_modality_lut_sequence(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "HU"
    # not monotonic: proves the LUT was used
    item.LUTData = np.array([100, 400, 200, 300], "<u2").tobytes()
    ds = make_image(stored, ModalityLUTSequence=DicomSequence([item]))
    img = load_image_2d(save(ds, tmp_path / "mlut.dcm"))
    np.testing.assert_allclose(img.pixels, [[0.0, 1.0], [1 / 3, 2 / 3]], atol=1e-6)


def test_voi_lut_sequence(tmp_path: Path) -> None:
    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = np.array([0, 255, 51, 102], "<u2").tobytes()
    ds = make_image(stored, VOILUTSequence=DicomSequence([item]), WindowCenter=1, WindowWidth=2)
    img = load_image_2d(save(ds, tmp_path / "vlut.dcm"))
    assert img.voi == "lut"
    np.testing.assert_allclose(img.pixels, [[0.0, 1.0], [0.2, 0.4]], atol=1e-6)


def test_constant_image_gives_zeros(tmp_path: Path) -> None:
    img = load_image_2d(save(make_image(np.full((4, 4), 7, np.uint16)), tmp_path / "c.dcm"))
    assert not img.pixels.any()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("rtstruct.dcm", "RT Structure Set"),
        ("test-SR.dcm", "SR"),
        ("reportsi.dcm", "SR"),
        ("rtplan.dcm", "RT Plan"),
        ("waveform_ecg.dcm", "ECG"),
    ],
)
def test_objects_without_pixels_are_refused(name: str, kind: str) -> None:
    with pytest.raises(NoPixelDataError, match="has no pixel data") as info:
        load_image_2d(bundled(name))
    assert kind in str(info.value)
    assert isinstance(info.value, InputError)


def test_wrong_modality() -> None:
    with pytest.raises(WrongModalityError, match=r"modality MR is not accepted.*CR, DX"):
        load_image_2d(bundled("MR_small.dcm"), modalities=["dx", "CR"])
    assert load_image_2d(bundled("MR_small.dcm"), modalities=["mr"]).modality == "MR"


def test_truncated_pixel_data() -> None:
    with pytest.raises(CorruptPixelDataError, match="truncated or corrupted"):
        load_image_2d(bundled("MR_truncated.dcm"))


def test_corrupted_compressed_pixel_data(tmp_path: Path) -> None:
    ds = make_image(np.arange(256, dtype=np.uint16).reshape(16, 16))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"garbage"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(CorruptPixelDataError, match="RLE Lossless"):
        load_image_2d(save(ds, tmp_path / "bad_rle.dcm"))


@pytest.mark.parametrize("shape", [(1, 1), (1, 16), (16, 1)])
def test_one_pixel_wide_images_are_refused(tmp_path: Path, shape: tuple[int, int]) -> None:
    ds = make_image(np.zeros(shape, dtype=np.uint16))
    with pytest.raises(ImageSizeError, match="at least 2 x 2"):
        load_image_2d(save(ds, tmp_path / "tiny.dcm"))


def test_zero_size_image_is_refused(tmp_path: Path) -> None:
    ds = make_image(np.zeros((4, 4), dtype=np.uint16))
    ds.Rows = 0
    ds.PixelData = b""
    with pytest.raises(ImageSizeError):
        load_image_2d(save(ds, tmp_path / "empty.dcm"))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFileError, match="cannot read"):
        load_image_2d(tmp_path / "missing.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(UnreadableFileError, match="not a DICOM file"):
        load_image_2d(junk)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableFileError):
        load_image_2d(empty)
    with pytest.raises(UnreadableFileError):
        load_image_2d(tmp_path)  # a directory


def test_read_dataset_accepts_files_without_preamble() -> None:
    ds = read_dataset(bundled("ExplVR_LitEndNoMeta.dcm"))
    assert "SOPClassUID" in ds


# --------------------------------------------------------------------------- CT volumes


def test_volume_sorted_by_position_not_instance_number(write_series: WriteSeries) -> None:
    zs = [float(z) for z in np.arange(10) * 2.5 - 30]
    order = list(range(10))
    random.Random(4).shuffle(order)
    paths = write_series(zs, order=order)
    vol = load_ct_volume(list(reversed(paths)))
    assert isinstance(vol, Volume)
    assert vol.array.dtype == np.float32
    assert vol.shape == (10, 8, 8)
    np.testing.assert_allclose(vol.array[:, 0, 0], [10 * z for z in zs], atol=1e-4)
    assert vol.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert vol.origin == pytest.approx((-10.0, -20.0, -30.0))
    assert vol.direction == ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    assert not vol.resampled and vol.missing_slices == 0
    assert [pydicom.dcmread(p).ImagePositionPatient[2] for p in vol.paths] == zs  # type: ignore[arg-type]
    assert len(vol.headers) == 10 and "PixelData" not in vol.headers[0]
    affine = vol.affine()
    np.testing.assert_allclose(affine @ [0, 0, 9, 1], [-10, -20, -7.5, 1])


def _kept_header(path: Path) -> Dataset:
    """What the node keeps of a retrieved instance: the header, pixels left in the file."""
    ds = pydicom.dcmread(path, defer_size=64)
    ds.filename = str(path)
    return ds


def test_volume_applies_rescale_slope_and_intercept_in_float32(tmp_path: Path) -> None:
    """HU = stored * RescaleSlope + RescaleIntercept; the loader computes it in float32
    (as for 2D images), which is exact for 16-bit stored values and a slope of 2.5."""
    uid = generate_uid()
    paths, stored = [], []
    for n, z in enumerate([0.0, 2.5, 5.0]):
        ds = ct_slice((-10.0, -20.0, z), 10 * z, series_uid=uid, instance=n + 1)
        ds.RescaleSlope, ds.RescaleIntercept = 2.5, -1000
        stored.append(ds.pixel_array.astype(np.float64))
        paths.append(save(ds, tmp_path / f"s{n}.dcm"))
    vol = load_ct_volume(paths)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, np.stack(stored) * 2.5 - 1000)


def test_volume_from_kept_headers_reads_only_the_pixels(write_series: WriteSeries) -> None:
    zs = [0.0, 2.5, 5.0, 7.5]
    paths = write_series(zs, order=[2, 0, 3, 1])
    headers = [_kept_header(p) for p in paths]
    selected = select_series(headers, SeriesRules(modalities=["CT"]))
    assert all(s is h for s, h in zip(selected.sources, selected.headers, strict=True))
    vol = load_ct_volume(selected.sources)
    by_path = load_ct_volume(paths)
    np.testing.assert_array_equal(vol.array, by_path.array)
    assert vol.paths == by_path.paths
    assert "PixelData" not in vol.headers[0]
    for h in headers:  # the caller's headers gained no pixels
        elem = h.get_item(0x7FE00010, keep_deferred=True)
        assert isinstance(elem, pydicom.dataelem.RawDataElement) and elem.value is None
    assert all(h is not v for h in headers for v in vol.headers)


def test_compressed_image_from_a_kept_header() -> None:
    """Encapsulated (JPEG-LS) pixels past ``defer_size`` are deferred too; the deferred
    read finds their items in the file."""
    path = Path(pydicom.data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    header = _kept_header(path)
    header_elem = header.get_item(0x7FE00010, keep_deferred=True)
    assert header_elem.value is None and header_elem.length == 0xFFFFFFFF
    kept = load_image_2d(header, modalities=None)
    np.testing.assert_array_equal(kept.pixels, load_image_2d(path, modalities=None).pixels)
    assert header.get_item(0x7FE00010, keep_deferred=True).value is None


def test_kept_header_whose_file_changed_is_a_clear_error(write_series: WriteSeries) -> None:
    paths = write_series([0.0, 2.5])
    headers = [_kept_header(p) for p in paths]
    paths[1].write_bytes(paths[1].read_bytes()[:200])  # cut short after it was kept
    with pytest.raises(UnreadableFileError, match="cannot read the pixel data"):
        load_ct_volume(headers)
    paths[0].unlink()
    with pytest.raises(UnreadableFileError, match="cannot read the pixel data"):
        read_dataset(headers[0])


def test_volume_follows_the_slice_normal(tmp_path: Path) -> None:
    # Sagittal slices: row (0,1,0) x column (0,0,-1) = normal (-1,0,0).
    uid = generate_uid()
    xs = [0.0, 3.0, 6.0, 9.0]
    paths = [
        save(
            ct_slice((x, 0.0, 0.0), x, series_uid=uid, orientation=(0, 1, 0, 0, 0, -1)),
            tmp_path / f"s{i}.dcm",
        )
        for i, x in enumerate(xs)
    ]
    vol = load_ct_volume(paths)
    np.testing.assert_allclose(vol.array[:, 0, 0], [9, 6, 3, 0])  # along -x
    assert vol.direction[2] == pytest.approx((-1, 0, 0))
    assert vol.spacing[0] == pytest.approx(3.0)


def test_missing_slice_is_refused_by_default(write_series: WriteSeries) -> None:
    zs = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]  # 7.5 missing
    paths = write_series(zs)
    with pytest.raises(SeriesError, match=r"gap of 5.00 mm.*1 slice\(s\) missing"):
        load_ct_volume(paths)


def test_missing_slice_interpolated_when_allowed(write_series: WriteSeries) -> None:
    zs = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]
    vol = load_ct_volume(write_series(zs), max_gap_ratio=2.5)
    assert vol.resampled and vol.missing_slices == 1
    assert vol.shape[0] == 7
    np.testing.assert_allclose(vol.array[:, 3, 3], np.arange(7) * 25.0, atol=1e-3)


def test_varying_spacing_is_resampled_linearly(write_series: WriteSeries) -> None:
    zs = [0.0, 2.0, 4.0, 7.0, 10.0, 13.0]  # diffs 2,2,3,3,3: median 3
    vol = load_ct_volume(write_series(zs))
    assert vol.resampled
    assert vol.spacing[0] == pytest.approx(3.25)  # 4 steps over 13 mm
    np.testing.assert_allclose(vol.array[:, 0, 0], [0, 32.5, 65, 97.5, 130], atol=1e-3)


def test_absurd_gap_is_refused(write_series: WriteSeries) -> None:
    with pytest.raises(SeriesError, match="resend the complete series"):
        load_ct_volume(write_series([0.0, 2.5, 5.0, 7.5, 100.0]), max_gap_ratio=2.5)


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    a = save(ct_slice((0, 0, 0), 0, series_uid=uid), tmp_path / "a.dcm")
    b = save(
        ct_slice((0, 0, 2), 0, series_uid=uid, orientation=(1, 0, 0, 0, 0, -1)), tmp_path / "b.dcm"
    )
    with pytest.raises(SeriesError, match="mixed slice orientations"):
        load_ct_volume([a, b])


def test_mixed_sizes_and_series_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    a = save(ct_slice((0, 0, 0), 0, series_uid=uid), tmp_path / "a.dcm")
    b = save(ct_slice((0, 0, 2), 0, series_uid=uid, size=(8, 9)), tmp_path / "b.dcm")
    with pytest.raises(SeriesError, match="mixed image sizes"):
        load_ct_volume([a, b])
    c = save(ct_slice((0, 0, 2), 0, series_uid=generate_uid()), tmp_path / "c.dcm")
    with pytest.raises(SeriesError, match="several series"):
        load_ct_volume([a, c])
    d = save(ct_slice((0, 0, 2), 0, series_uid=uid, spacing=(0.5, 0.5)), tmp_path / "d.dcm")
    with pytest.raises(SeriesError, match="mixed pixel spacings"):
        load_ct_volume([a, d])


def test_duplicate_positions_and_too_few_slices(write_series: WriteSeries) -> None:
    with pytest.raises(SeriesError, match="same position"):
        load_ct_volume(write_series([0.0, 2.5, 2.5, 5.0]))
    with pytest.raises(SeriesError, match="at least 2 slices"):
        load_ct_volume(write_series([0.0], folder="one"))


def test_volume_refuses_wrong_modality_and_missing_geometry(tmp_path: Path) -> None:
    uid = generate_uid()
    mr = [
        save(ct_slice((0, 0, z), 0, series_uid=uid, Modality="MR"), tmp_path / f"{z}.dcm")
        for z in (0, 1)
    ]
    with pytest.raises(WrongModalityError):
        load_ct_volume(mr)
    assert load_ct_volume(mr, modalities=None).shape == (2, 8, 8)
    ds = ct_slice((0, 0, 5), 0, series_uid=uid, Modality="MR")
    del ds.ImagePositionPatient
    with pytest.raises(SeriesError, match="ImagePositionPatient is missing"):
        load_ct_volume([*mr, save(ds, tmp_path / "nopos.dcm")], modalities=None)


def test_volume_refuses_an_sr_in_the_list(write_series: WriteSeries) -> None:
    paths = write_series([0.0, 2.5])
    with pytest.raises(NoPixelDataError):
        load_ct_volume([*paths, bundled("test-SR.dcm")])


def test_enhanced_ct_frames_are_the_slices(tmp_path: Path) -> None:
    """An enhanced multi-frame CT gives the same volume as its single-frame slices: each
    frame placed by its own plane position, rescaled by its own (or the shared) pixel
    value transformation; ``frames`` says which frame each slice came from."""
    uid = generate_uid()
    slices = []
    for n, z in enumerate([0.0, 2.5, 5.0, 7.5]):
        ds = ct_slice((-10.0, -20.0, z), 10 * z, series_uid=uid, instance=n + 1)
        if n == 2:  # stored differently, same HU: a per-frame rescale
            ds.PixelData = (ds.pixel_array + 24).astype(np.uint16).tobytes()
            ds.RescaleIntercept = -1048
        slices.append(save(ds, tmp_path / "single" / f"{n}.dcm"))
    random.Random(3).shuffle(slices)
    enhanced = save(enhanced_ct([pydicom.dcmread(p) for p in slices]), tmp_path / "mf.dcm")
    single = load_ct_volume(slices)
    for source in (enhanced, _kept_header(enhanced)):
        vol = load_ct_volume([source])
        np.testing.assert_array_equal(vol.array, single.array)
        np.testing.assert_allclose(vol.array[:, 0, 0], [0, 25, 50, 75])
        assert (vol.spacing, vol.origin, vol.direction) == (
            single.spacing, single.origin, single.direction)
        assert vol.frames == [4, 3, 2, 1]  # the converter lists the highest first
        assert vol.paths == [enhanced] * 4
        assert all(h is vol.headers[0] for h in vol.headers)  # one object, one header
        assert "PixelData" not in vol.headers[0]
    assert single.frames == [None] * 4 and len({id(h) for h in single.headers}) == 4
    chosen = select_series([enhanced], SeriesRules(modalities=["CT"], min_instances=4))
    assert chosen.paths == [enhanced]
    with pytest.raises(SeriesError, match=r"1 instance\(s\), 4 frames\): 4 image"):
        select_series([enhanced], SeriesRules(min_instances=5))


def test_enhanced_ct_problems_name_the_frame(tmp_path: Path) -> None:
    uid = generate_uid()
    slices = [ct_slice((0.0, 0.0, z), 0, series_uid=uid, instance=n + 1)
              for n, z in enumerate([0.0, 2.5, 5.0])]
    mf = enhanced_ct(slices)
    del mf.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(SeriesError, match=r"mf\.dcm: frame 2: ImagePositionPatient is missing"):
        load_ct_volume([save(mf, tmp_path / "mf.dcm")])
    two_phases = enhanced_ct([*slices, *(ct_slice((0.0, 0.0, z), 0, series_uid=uid)
                                         for z in (0.0, 2.5, 5.0))])
    with pytest.raises(SeriesError, match="same position.*several stacks, phases"):
        load_ct_volume([save(two_phases, tmp_path / "phases.dcm")])
    plain = make_image(np.zeros((2, 8, 8), dtype=np.uint16).reshape(16, 8),
                       series_uid=uid, Modality="CT")
    plain.Rows, plain.NumberOfFrames = 8, 2  # frames, but no functional groups
    with pytest.raises(SeriesError, match="without per-frame positions"):
        load_ct_volume([save(plain, tmp_path / "plain.dcm")])


# --------------------------------------------------------------------------- series selection


@pytest.fixture
def study(tmp_path: Path, write_series: WriteSeries) -> dict[str, list[Path]]:
    """A CT study: a 3-image scout, a 12-slice axial series, an SR and an RT structure set."""
    scout_uid, axial_uid = generate_uid(), generate_uid()
    scout = []
    for i in range(3):
        ds = ct_slice((0, 0, 0), 0, series_uid=scout_uid, orientation=(1, 0, 0, 0, 0, -1))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.append(save(ds, tmp_path / "study" / f"scout{i}.dcm"))
    zs = [float(z) for z in range(0, 36, 3)]
    order = list(range(len(zs)))
    random.Random(7).shuffle(order)
    axial = write_series(zs, series_uid=axial_uid, folder="study", order=order)
    sr = Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.SOPClassUID = BasicTextSRStorage
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    others = [save(sr, tmp_path / "study" / "sr.dcm")]
    return {"scout": scout, "axial": axial, "other": others}


def test_select_series_picks_axial_over_scout(study: dict[str, list[Path]]) -> None:
    everything = study["scout"] + study["axial"] + study["other"]
    random.Random(1).shuffle(everything)
    chosen = select_series(everything, SeriesRules(modalities=["CT"], body_parts=["chest"]))
    assert sorted(chosen.paths) == sorted(study["axial"])  # type: ignore[type-var]
    assert chosen.modality == "CT" and chosen.body_part == "CHEST"
    assert len(chosen.rejected) == 2
    assert any("localizer" in r for r in chosen.rejected.values())
    assert any("modality SR" in r for r in chosen.rejected.values())
    assert all("PixelData" not in h for h in chosen.headers)
    vol = load_ct_volume(chosen.sources)
    assert vol.shape == (12, 8, 8)
    np.testing.assert_allclose(vol.array[:, 0, 0], np.arange(0, 36, 3) * 10.0)


def test_select_series_ranks_by_instances_when_scout_is_not_flagged(
    study: dict[str, list[Path]],
) -> None:
    headers = {
        p: pydicom.dcmread(p, stop_before_pixels=True) for p in study["scout"] + study["axial"]
    }
    for p in study["scout"]:
        headers[p].ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    chosen = select_series(headers, SeriesRules(modalities=["CT"]))
    assert len(chosen.paths) == 12
    assert "ranked after" in next(iter(chosen.rejected.values()))
    with pytest.raises(SeriesError, match="fewer than the 20 required"):
        select_series(headers, SeriesRules(min_instances=20))


def test_select_series_prefers_axial_slices_to_the_reformats(
    study: dict[str, list[Path]], tmp_path: Path,
) -> None:
    """A CT study as a PACS holds it: the axial series and sagittal and coronal
    reformats with more images, all ORIGINAL here (some scanners label them so): the
    axial one is chosen, a slightly tilted gantry still counts as axial."""
    reformats = []
    for name, orientation in (("sag", (0, 1, 0, 0, 0, -1)), ("cor", (1, 0, 0, 0, 0, -1))):
        uid = generate_uid()
        reformats += [save(ct_slice((float(i), 0, 0), 0, series_uid=uid,
                                    orientation=orientation, instance=i + 1),
                           tmp_path / "study" / f"{name}{i}.dcm") for i in range(20)]
    chosen = select_series(study["axial"] + reformats, SeriesRules(modalities=["CT"]))
    assert sorted(chosen.paths) == sorted(study["axial"])  # type: ignore[type-var]
    assert sum("ranked after" in r for r in chosen.rejected.values()) == 2
    tilt = math.radians(20)  # about the x axis
    tilted_uid = generate_uid()
    tilted = [save(ct_slice((0, 0, float(i)), 0, series_uid=tilted_uid, instance=i + 1,
                            orientation=(1, 0, 0, 0, math.cos(tilt), math.sin(tilt))),
                   tmp_path / "study" / f"tilt{i}.dcm") for i in range(8)]
    chosen = select_series(tilted + reformats, SeriesRules(modalities=["CT"]))
    assert chosen.series_instance_uid == tilted_uid


def test_select_series_takes_the_frontal_view_for_presentation(tmp_path: Path) -> None:
    """A chest X-ray study as modalities send it: a lateral series listed first, a PA
    series, and a DX "for processing" copy of the PA (raw detector values). The PA for
    presentation is chosen; within a series holding both views, the PA comes first."""
    def xray(view: str, series: str, **attrs: Any) -> Path:
        ds = make_image(np.zeros((8, 8), dtype=np.uint16), modality="DX",
                        series_uid=series, ViewPosition=view, **attrs)
        return save(ds, tmp_path / f"{generate_uid()}.dcm")

    lateral = xray("LL", generate_uid())
    pa = xray("PA", generate_uid(), PresentationIntentType="FOR PRESENTATION")
    raw = xray("PA", generate_uid(), PresentationIntentType="FOR PROCESSING",
               sop_class=UID("1.2.840.10008.5.1.4.1.1.1.1.1"))
    rules = SeriesRules(modalities=["DX"])
    assert select_series([raw, lateral, pa], rules).paths == [pa]
    assert select_series([raw, lateral], rules).paths == [lateral]
    both = generate_uid()
    in_one = [xray("LL", both), xray("AP", both), xray("LATERAL", both)]
    chosen = select_series(in_one, rules)
    assert chosen.paths[0] == in_one[1] and len(chosen.paths) == 3


def test_select_series_breaks_ties_the_same_way_whatever_the_order(tmp_path: Path) -> None:
    """Two equal PA series: the first to arrive was chosen. Now the latest (Acquisition
    DateTime, else Acquisition or Content Date and Time), then the highest Series
    Number; the other is kept in ``also_eligible``, and images within a series go by
    Instance Number."""
    def xray(series: str, number: int, instance: int = 1, **attrs: Any) -> Path:
        ds = make_image(np.zeros((8, 8), dtype=np.uint16), modality="DX",
                        series_uid=series, ViewPosition="PA", SeriesNumber=number,
                        InstanceNumber=instance, **attrs)
        return save(ds, tmp_path / f"{generate_uid()}.dcm")

    rules = SeriesRules(modalities=["DX"])
    one, two = generate_uid(), generate_uid()
    low, high = xray(one, 1), xray(two, 2)
    for files in ([low, high], [high, low]):
        chosen = select_series(files, rules)
        assert chosen.paths == [high] and chosen.series_number == "2"
        assert [s.paths for s in chosen.also_eligible] == [[low]]
    early = xray(generate_uid(), 9, AcquisitionDateTime="20240101080000")
    late = xray(generate_uid(), 3, AcquisitionDate="20240101", AcquisitionTime="0930")
    for files in ([early, late], [late, early]):
        assert select_series(files, rules).paths == [late]
    content = xray(generate_uid(), 1, ContentDate="20240102", ContentTime="070000")
    assert select_series([late, content, early], rules).paths == [content]
    three = generate_uid()
    second, first = xray(three, 1, instance=2), xray(three, 1, instance=1)
    assert select_series([second, first], rules).paths == [first, second]


def test_select_series_leaves_out_views_the_rules_do_not_take(tmp_path: Path) -> None:
    """A frontal chest model (view positions PA, AP): a lateral view alone is refused
    with the reason (it was classified as if frontal), lateral images of a mixed series
    are left out, and an image that does not say its view is taken."""
    def xray(view: str | None, series: str) -> Path:
        extra = {"ViewPosition": view} if view is not None else {}
        ds = make_image(np.zeros((8, 8), dtype=np.uint16), modality="DX", series_uid=series,
                        **extra)
        return save(ds, tmp_path / f"{generate_uid()}.dcm")

    rules = SeriesRules(modalities=["DX"], view_positions=["PA", "AP"])
    lateral = xray("LL", generate_uid())
    with pytest.raises(SeriesError) as info:
        select_series([lateral], rules)
    assert "view position LL not in ['AP', 'PA']" in str(info.value)
    assert "view positions=['AP', 'PA']" in str(info.value)
    assert info.value.near and "view position LL" in info.value.near[0]
    mixed = generate_uid()
    in_one = [xray("LL", mixed), xray("PA", mixed), xray("LATERAL", mixed)]
    assert select_series(in_one, rules).paths == [in_one[1]]
    unsaid = xray(None, generate_uid())
    assert select_series([lateral, unsaid], rules).paths == [unsaid]
    worded = xray("AP SUPINE", generate_uid())  # as some portable units write it
    assert select_series([lateral, worded], rules).paths == [worded]
    assert select_series([lateral], SeriesRules(modalities=["DX"])).paths == [lateral]


def test_select_series_by_description_and_slice_thickness(
    tmp_path: Path, write_series: WriteSeries,
) -> None:
    """A CT exam holds several axial reconstructions of the same slices: 1 mm with a
    sharp (bone) kernel, the most images, and 5 mm soft tissue. By count the 1 mm bone
    series wins; rules on Series Description (shell patterns, any case) or on Slice
    Thickness take the one the model was trained on, and say why the others are out."""
    bone = write_series([float(z) for z in range(0, 20)], folder="bone",
                        SeriesDescription="Abdomen 1.0 BONE", SliceThickness=1.0)
    soft = write_series([float(z) for z in range(0, 20, 5)], folder="soft",
                        SeriesDescription="ABDOMEN 5.0 Soft Tissue", SliceThickness=5.0)
    both = bone + soft
    assert sorted(select_series(both, SeriesRules()).paths) == sorted(bone)  # type: ignore[type-var]
    for rules in (SeriesRules(exclude_series_descriptions=["*bone*"]),
                  SeriesRules(series_descriptions=["*SOFT*", "*portal*"]),
                  SeriesRules(slice_thickness_mm=(3, 6))):
        chosen = select_series(both, rules)
        assert sorted(chosen.paths) == sorted(soft), rules  # type: ignore[type-var]
    why = select_series(both, SeriesRules(exclude_series_descriptions=["*bone*"])).rejected
    assert "description 'Abdomen 1.0 BONE' excluded ('*bone*')" in " ".join(why.values())
    with pytest.raises(SeriesError) as info:
        select_series(both, SeriesRules(slice_thickness_mm=(2, 3),
                                        series_descriptions=["*abdomen*"]))
    message = str(info.value)
    assert "slice thickness 1 mm, not 2-3 mm" in message
    assert "slice thickness 5 mm, not 2-3 mm" in message
    assert "series descriptions=['*abdomen*'], slice thickness 2-3 mm" in message
    with pytest.raises(ValueError, match="thinnest"):
        SeriesRules(slice_thickness_mm=(5, 1))


def test_select_series_explains_why_nothing_matches(study: dict[str, list[Path]]) -> None:
    paths = study["scout"] + study["axial"] + study["other"]
    with pytest.raises(SeriesError) as info:
        select_series(paths, SeriesRules(modalities=["CT"], body_parts=["HEAD"]))
    message = str(info.value)
    assert "no series matches" in message
    assert "body part CHEST not in ['HEAD']" in message
    assert "localizer" in message and "modality SR" in message
    with pytest.raises(SeriesError, match="SOP class"):
        select_series(paths, SeriesRules(sop_class_uids=[SecondaryCaptureImageStorage]))
    with pytest.raises(SeriesError, match="holds no images"):
        select_series(study["other"], SeriesRules())


def test_select_series_reports_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"nope")
    with pytest.raises(SeriesError, match="not a DICOM file"):
        select_series([junk], SeriesRules())


def test_pixel_padding_is_ignored_by_minmax_and_shown_black(tmp_path: Path) -> None:
    values = np.array([[-2000, -2000, 0], [100, 200, 400]], dtype=np.int16)
    img = load_image_2d(save(make_image(values, PixelPaddingValue=-2000), tmp_path / "p.dcm"))
    np.testing.assert_allclose(img.pixels, [[0.0, 0.0, 0.0], [0.25, 0.5, 1.0]], atol=1e-6)
    m1 = make_image(values, photometric="MONOCHROME1", PixelPaddingValue=-2000)
    img1 = load_image_2d(save(m1, tmp_path / "p1.dcm"))
    np.testing.assert_allclose(img1.pixels, [[0.0, 0.0, 1.0], [0.75, 0.5, 0.0]], atol=1e-6)


@pytest.mark.parametrize("name", ["rtdose.dcm", "rtdose_rle.dcm", "rtdose_expb.dcm"])
def test_monochrome_multiframe_middle_frame(name: str) -> None:
    path = bundled(name)
    img = load_image_2d(path)
    assert (img.frame_index, img.number_of_frames) == (7, 15)
    frame = pydicom.dcmread(path).pixel_array[7].astype(np.float64)
    expected = (frame - frame.min()) / (frame.max() - frame.min())
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(40.0, 400.0), (1000.5, 1.0), (-600.0, 1500.0),
                                               (0.0, 2.0)])
def test_window_matches_pydicom(function: str, center: float, width: float) -> None:
    """Our float32 window gives pydicom's apply_windowing values, scaled to [0, 1]."""
    values = np.random.default_rng(7).uniform(-3000, 3000, (64, 64))
    values[0, :8] = [center, center - 0.5, center + 0.5, center - width / 2,
                     center + width / 2, center - 0.5 - (width - 1) / 2,
                     center - 0.5 + (width - 1) / 2, center + 1]
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    ds.PhotometricInterpretation, ds.PixelRepresentation, ds.BitsStored = "MONOCHROME2", 0, 16
    with np.errstate(over="ignore"):  # pydicom's sigmoid overflows exp far from the center
        expected = apply_windowing(values.copy(), ds) / 65535.0
    got = apply_window(values, center, width, function)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_modality_values_match_pydicom(tmp_path: Path) -> None:
    """Rescale in float32 gives pydicom's modality values, through to the window."""
    stored = np.random.default_rng(3).integers(0, 4096, (32, 32)).astype(np.uint16)
    ds = make_image(stored, RescaleSlope=0.5, RescaleIntercept=-1024.25,
                    WindowCenter=-300.0, WindowWidth=1200.0)
    img = load_image_2d(save(ds, tmp_path / "r.dcm"))
    hu = apply_modality_lut(stored, ds)
    np.testing.assert_allclose(img.pixels, np.clip((hu + 300.5) / 1199 + 0.5, 0, 1), atol=2e-6)


@pytest.mark.parametrize(("orientation", "turn"), [
    (["L", "F"], lambda a: a),
    (["R", "F"], lambda a: a[:, ::-1]),                 # mirrored
    (["L", "H"], lambda a: a[::-1, :]),                 # upside down
    (["R", "H"], lambda a: a[::-1, ::-1]),              # turned half round
    (["F", "R"], lambda a: np.rot90(a)),                # on its side, head on the left
    (["H", "L"], lambda a: np.rot90(a, -1)),            # on its side, head on the right
    (["FL", "RF"], lambda a: np.rot90(a)),              # oblique: the main directions count
])
def test_a_radiograph_stored_turned_is_read_upright(
        tmp_path: Path, orientation: list[str], turn: Any) -> None:
    """A portable chest image stored on its side (or mirrored) is turned to the way it
    is read and the models were trained (L\\F) before anything sees it; the header then
    says L\\F, and upright_from what it said."""
    upright = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4) * 100  # no symmetry
    stored = np.ascontiguousarray(turn(upright))
    ds = make_image(stored, modality="DX", PatientOrientation=orientation)
    image = load_image_2d(save(ds, tmp_path / "dx.dcm"))
    plain = load_image_2d(save(make_image(upright, modality="DX"), tmp_path / "plain.dcm"))
    np.testing.assert_array_equal(image.pixels, plain.pixels)
    changed = orientation != ["L", "F"]
    assert image.upright_from == ("\\".join(orientation) if changed else "")
    assert list(image.header.PatientOrientation) == ["L", "F"]


@pytest.mark.parametrize("orientation", [["A", "F"], ["P", "F"], None, ["L"]])
def test_an_orientation_that_does_not_say_leaves_the_image_as_stored(
        tmp_path: Path, orientation: list[str] | None) -> None:
    """A lateral view (A/P), no Patient Orientation, or one that cannot be read."""
    stored = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4) * 100
    extra = {"PatientOrientation": orientation} if orientation is not None else {}
    image = load_image_2d(save(make_image(stored, modality="DX", **extra), tmp_path / "x.dcm"))
    assert image.pixels.shape == (6, 4) and image.upright_from == ""
    assert image.pixels[0, 0] < image.pixels[0, 1] < image.pixels[1, 0]
