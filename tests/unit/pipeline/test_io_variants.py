"""Variants of the shipped samples that once reached a model wrong, or were refused for
the wrong reason: a VOI LUT of 8-bit entries (read as noise, then "TB Presumptive"), a CT
without Rescale Slope/Intercept (stored values taken for HU), a truncated compressed
file (refused as "no pixel data"), and a narrow first window (applied without a word).

Each is built here with pydicom from samples/cxr and samples/ct.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_voi_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RLELossless, generate_uid

from pipeline.io import (
    CorruptPixelDataError,
    InputError,
    TruncatedFileError,
    UnreadableFileError,
    VOIError,
    load_ct_volume,
    load_image_2d,
    read_dataset,
)
from pipeline.runner import PipelineRunner
from pipeline.types import ClassificationResult
from tests.unit.pipeline.dicom_samples import enhanced_ct, save
from tests.unit.pipeline.test_study_reading import runner

__all__ = ["runner"]  # the fixture, imported so that pytest finds it

ROOT = Path(__file__).resolve().parents[3]
CXR = ROOT / "samples" / "cxr" / "pleural-effusion.dcm"  # 185..3833 stored, window 2048/4096
CT = sorted((ROOT / "samples" / "ct" / "abdomen").glob("*.dcm"))[:8]  # HU = stored - 1024


def cxr() -> Dataset:
    return pydicom.dcmread(CXR)


def voi_lut(descriptor: list[int], data: Any, *, vr: str = "US") -> DicomSequence:
    """A VOI LUT Sequence of one item: LUT Data as US (a list) or OW (bytes)."""
    item = Dataset()
    item.LUTDescriptor = descriptor
    if vr == "OW":
        item.add_new(0x00283006, "OW", np.asarray(data, dtype="<u2").tobytes())
    else:
        item.LUTData = [int(v) for v in data]
        item["LUTData"].VR = "US"
    return DicomSequence([item])


def written(ds: Dataset, path: Path) -> Path:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return save(ds, path)


@pytest.fixture(scope="module")
def unmodified() -> np.ndarray:
    return load_image_2d(CXR).pixels


# --------------------------------------------------------------------------- VOI LUT


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_an_8_bit_voi_lut_of_4096_entries_shows_the_image(
        tmp_path: Path, unmodified: np.ndarray, vr: str) -> None:
    """12 bits in, 8 bits out (LUT Descriptor 4096\\0\\8), mapping as the image's own
    window: pydicom 3.0 indexed it with uint8, so every value above 255 wrapped around
    and the chest came out as noise ("TB Presumptive", six findings)."""
    ds = cxr()
    ds.VOILUTSequence = voi_lut([4096, 0, 8], np.arange(4096) // 16, vr=vr)
    img = load_image_2d(written(ds, tmp_path / "lut.dcm"))
    assert img.voi == "lut" and img.window is None
    np.testing.assert_allclose(img.pixels, unmodified, atol=16 / 4095 + 1e-6)
    assert abs(float(img.pixels.mean()) - float(unmodified.mean())) < 0.002


def test_a_voi_lut_with_a_first_value_mapped_takes_8_or_16_bit_entries_alike(
        tmp_path: Path) -> None:
    """LUT Descriptor 3649\\185\\8 (the image's own range, linear): inputs below 185 take
    the first entry, above 3833 the last (PS3.3 C.11.2.1.1); the 16-bit LUT of the same
    mapping gives the same image, as pydicom (right for 16-bit entries) computes it."""
    stored = cxr().pixel_array.astype(np.float64)
    expected = (stored - 185) / (3833 - 185)
    n = 3833 - 185 + 1
    images = {}
    for bits in (8, 16):
        ds = cxr()
        ds.VOILUTSequence = voi_lut([n, 185, bits],
                                    np.round(np.linspace(0, 2**bits - 1, n)).astype(int))
        images[bits] = load_image_2d(written(ds, tmp_path / f"lut{bits}.dcm")).pixels
        np.testing.assert_allclose(images[bits], expected, atol=1 / 255 + 1e-6)
        if bits == 16:
            reference = apply_voi_lut(cxr().pixel_array, ds) / 65535.0
            np.testing.assert_allclose(images[16], reference, atol=1e-6)
    np.testing.assert_allclose(images[8], images[16], atol=1 / 255 + 1e-6)


def test_the_controls_of_the_probe_still_read_right(tmp_path: Path,
                                                    unmodified: np.ndarray) -> None:
    """A 12-bit LUT of 16-bit entries, and an 8-bit image through 256 8-bit entries."""
    ds = cxr()
    ds.VOILUTSequence = voi_lut([4096, 0, 16], np.arange(4096) * 16)
    np.testing.assert_allclose(load_image_2d(written(ds, tmp_path / "16.dcm")).pixels,
                               unmodified, atol=1e-6)
    ds = cxr()
    ds.PixelData = (ds.pixel_array >> 4).astype(np.uint16).tobytes()
    ds.BitsStored, ds.HighBit = 8, 7
    del ds.WindowCenter, ds.WindowWidth
    ds.VOILUTSequence = voi_lut([256, 0, 8], range(256))
    np.testing.assert_allclose(load_image_2d(written(ds, tmp_path / "8.dcm")).pixels,
                               unmodified, atol=16 / 4095 + 1e-6)


def test_a_voi_lut_of_65536_entries_is_written_with_0_entries(tmp_path: Path) -> None:
    stored = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    ds = cxr()
    ds.PixelData = stored.tobytes()
    ds.Rows = ds.Columns = 2
    ds.VOILUTSequence = voi_lut([0, 0, 16], np.arange(65536), vr="OW")
    np.testing.assert_allclose(load_image_2d(written(ds, tmp_path / "full.dcm")).pixels,
                               stored / 65535, atol=1e-6)


def test_a_first_value_mapped_written_unsigned_is_negative_for_signed_input(
        tmp_path: Path) -> None:
    """HU-like input (-1024..) and a LUT Descriptor whose second value, -1024, was
    written as US (64512): read as signed, as the input is."""
    ds = pydicom.dcmread(CT[0])
    ds.VOILUTSequence = voi_lut([2048, 2**16 - 1024, 16], np.arange(2048) * 32)
    img = load_image_2d(written(ds, tmp_path / "signed.dcm"))
    hu = ds.pixel_array.astype(np.float64) - 1024
    np.testing.assert_allclose(img.pixels, np.clip((hu + 1024) / 2047, 0, 1), atol=1e-6)


@pytest.mark.parametrize(("descriptor", "data", "message"), [
    ([4096, 0, 8], np.arange(4096), r"entries run from 0 to 4095, beyond the 0 to 255 "
                                    r"that the 8 bits per entry"),
    ([4096, 0, 16], np.arange(2048), "holds 2048 entries, fewer than the 4096"),
    ([4096, 0, 24], np.arange(4096), "declares 24 bits per entry, more than LUT Data can"),
    ([4096, 0, 0], np.arange(4096), r"declares 0 bits per entry; the VOI LUT"),
    ([4096, 0], np.arange(4096), "is not three numbers"),
    ([4096, 0, 16], np.full(4096, 300), "maps every value to 300"),
])
def test_a_voi_lut_that_contradicts_its_descriptor_is_refused(
        tmp_path: Path, descriptor: list[int], data: np.ndarray, message: str) -> None:
    """Refused, not replaced by the window or min-max: what the modality meant the image
    to look like is not known."""
    ds = cxr()
    ds.VOILUTSequence = voi_lut(descriptor, data)
    with pytest.raises(VOIError, match=message):
        load_image_2d(written(ds, tmp_path / "bad.dcm"))


@pytest.mark.parametrize(("center", "width"), [(60000, 100), (-5000, 10)])
def test_a_window_that_flattens_the_image_is_refused(tmp_path: Path, center: float,
                                                     width: float) -> None:
    ds = cxr()
    ds.WindowCenter, ds.WindowWidth = center, width
    with pytest.raises(VOIError, match=f"its window \\(Window Center/Width {center:g}/"
                                       f"{width:g}\\) turns the image into one flat grey"):
        load_image_2d(written(ds, tmp_path / "flat.dcm"))


def test_a_voi_lut_that_flattens_the_image_is_refused(tmp_path: Path) -> None:
    """Every value of the image falls below the LUT's first value mapped."""
    ds = cxr()
    ds.VOILUTSequence = voi_lut([256, 10000, 8], range(256))
    with pytest.raises(VOIError, match=r"its VOI LUT \(LUT Descriptor \[256, 10000, 8\]\) "
                                       "turns the image into one flat grey"):
        load_image_2d(written(ds, tmp_path / "flat.dcm"))


def test_a_flat_image_through_a_window_is_not_the_window_s_fault(tmp_path: Path) -> None:
    ds = cxr()
    ds.PixelData = np.full((256, 256), 2000, np.uint16).tobytes()
    assert not load_image_2d(written(ds, tmp_path / "flat.dcm")).pixels.std()


# --------------------------------------------------------------------------- CT rescale


def ct_slices(**changes: Any) -> list[Dataset]:
    slices: list[Dataset] = [pydicom.dcmread(p) for p in CT]
    for ds in slices:
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return slices


def test_a_ct_without_rescale_is_refused(tmp_path: Path) -> None:
    """Rescale Intercept/Slope are Type 1 for CT (PS3.3 C.8.2.1): without them the
    stored values (HU + 1024 here) are not HU, and a volume model's organs were absurd."""
    slices = ct_slices(RescaleSlope=None, RescaleIntercept=None, RescaleType=None)
    paths = [written(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(slices)]
    with pytest.raises(InputError, match=r"CT image of series .* has no Rescale "
                       r"Intercept/Slope \(Type 1 for CT\); Hounsfield units cannot be "
                       "known; resend it from the modality"):
        load_ct_volume(paths)
    with pytest.raises(InputError, match="has no Rescale Slope"):
        load_ct_volume(ct_slices(RescaleSlope=None))


def test_a_ct_rescale_of_intercept_0_or_a_modality_lut_is_kept() -> None:
    """An intercept of 0 is present (signed stored values that are HU already); a
    Modality LUT in place of the rescale gives HU too."""
    hu = load_ct_volume(ct_slices()).array
    signed = ct_slices(RescaleIntercept=0, PixelRepresentation=1)
    for ds in signed:
        ds.PixelData = (ds.pixel_array.astype(np.int16) - 1024).tobytes()
    np.testing.assert_array_equal(load_ct_volume(signed).array, hu)
    lut = Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [4096, 0, 16], "HU"
    lut.LUTData = np.arange(4096, dtype="<u2").tobytes()
    via_lut = ct_slices(RescaleSlope=None, RescaleIntercept=None, RescaleType=None,
                        ModalityLUTSequence=DicomSequence([lut]))
    np.testing.assert_array_equal(load_ct_volume(via_lut).array, hu + 1024)


def test_an_enhanced_ct_takes_its_rescale_from_any_group_and_is_refused_without(
        tmp_path: Path) -> None:
    """Legacy Converted Enhanced CT: the rescale per frame, shared, or (some converters)
    at the top level gives the single-frame volume; in none of them, a refusal."""
    expected = load_ct_volume(ct_slices()).array
    mf = enhanced_ct(ct_slices())
    groups = [*mf.PerFrameFunctionalGroupsSequence, *mf.SharedFunctionalGroupsSequence]
    transform = next(g.PixelValueTransformationSequence for g in groups
                     if "PixelValueTransformationSequence" in g)
    for group in groups:
        if "PixelValueTransformationSequence" in group:
            del group.PixelValueTransformationSequence
    with pytest.raises(InputError, match=r"mf\.dcm: frame 1: CT image of series .* has no "
                       r"Rescale Intercept/Slope \(Type 1 for CT, in the Pixel Value "
                       "Transformation functional group, per-frame or shared\\)"):
        load_ct_volume([save(mf, tmp_path / "mf.dcm")])
    shared = copy.deepcopy(mf)
    shared.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = transform
    np.testing.assert_array_equal(load_ct_volume([shared]).array, expected)
    top = copy.deepcopy(mf)
    top.RescaleIntercept, top.RescaleSlope = transform[0].RescaleIntercept, 1
    np.testing.assert_array_equal(load_ct_volume([top]).array, expected)


def test_volumes_and_radiographs_that_are_not_ct_keep_identity_without_rescale(
        tmp_path: Path, unmodified: np.ndarray) -> None:
    """The rescale is optional for an MR (its values are unitless) and Type 1C for a
    radiograph: stored values are the modality values."""
    mr = ct_slices(RescaleSlope=None, RescaleIntercept=None, RescaleType=None, Modality="MR",
                   SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    np.testing.assert_array_equal(load_ct_volume(mr, modalities=None).array,
                                  load_ct_volume(ct_slices()).array + 1024)
    ds = cxr()
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    np.testing.assert_array_equal(load_image_2d(written(ds, tmp_path / "cr.dcm")).pixels,
                                  unmodified)


# --------------------------------------------------------------------------- truncation


def rle_file(tmp_path: Path) -> bytes:
    ds = cxr()
    ds.compress(RLELossless)
    return written(ds, tmp_path / "whole.dcm").read_bytes()


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_a_truncated_compressed_file_is_refused_as_truncated(tmp_path: Path) -> None:
    """Compressed Pixel Data (undefined length) cut off before its delimiter: pydicom
    only warns and gives an empty data set, which read as "unknown SOP class ... has no
    pixel data"."""
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(rle_file(tmp_path)[:-5000])
    with pytest.raises(TruncatedFileError, match=r"cut\.dcm is truncated: no element of its "
                       "data set could be read .* resend it"):
        load_image_2d(cut)
    with pytest.raises(UnreadableFileError, match="truncated"):  # the kind callers catch
        read_dataset(cut)
    # its header is whole: a series can be chosen from it, the loader then refuses it
    assert read_dataset(cut, stop_before_pixels=True).Modality == "CR"


def test_a_file_cut_in_its_header_is_refused_as_truncated(tmp_path: Path) -> None:
    """Cut in a value, or in the header of the element after one: pydicom gives the
    elements before it and says nothing."""
    whole = written(cxr(), tmp_path / "whole.dcm")
    name = pydicom.dcmread(whole).get_item(0x00100010)  # Patient Name, raw: where it lies
    assert isinstance(name, RawDataElement) and name.length > 4
    cut = tmp_path / "cut.dcm"
    for keep, message in ((name.value_tell + 4, rf"it ends 4 bytes into the {name.length}-"
                           r"byte value of PatientName \(0010,0010\)"),
                          (name.value_tell + name.length + 3, r"it ends 3 byte\(s\) into the "
                           r"header of the element after PatientName \(0010,0010\)")):
        cut.write_bytes(whole.read_bytes()[:keep])
        for stop_before_pixels in (True, False):
            with pytest.raises(TruncatedFileError, match=message):
                read_dataset(cut, stop_before_pixels=stop_before_pixels)


def test_whole_files_and_cut_native_pixels_keep_their_reading(tmp_path: Path) -> None:
    """No false alarm on whole files (compressed or not); native Pixel Data cut short is
    still the decoder's to report, naming its transfer syntax."""
    whole = tmp_path / "rle.dcm"
    whole.write_bytes(rle_file(tmp_path))
    assert load_image_2d(whole).pixels.shape == (256, 256)
    assert "PixelData" not in read_dataset(CXR, stop_before_pixels=True)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(CXR.read_bytes()[:-60000])
    with pytest.raises(CorruptPixelDataError, match="truncated or corrupted"):
        load_image_2d(cut)


# --------------------------------------------------------------------------- several windows


def narrow_first(tmp_path: Path) -> Path:
    ds = cxr()
    ds.WindowCenter, ds.WindowWidth = [2400, 2048], [1600, 4096]
    ds.WindowCenterWidthExplanation = ["BONE", "FULL"]
    return written(ds, tmp_path / "bone-first.dcm")


def test_a_narrow_first_window_of_several_is_applied_and_named(tmp_path: Path) -> None:
    """DICOM's rule stays (the first pair is displayed), and the image says so."""
    img = load_image_2d(narrow_first(tmp_path))
    assert img.voi == "window" and img.window == (2400, 1600)
    assert img.notes == ("read through Window Center/Width 2400/1600 (BONE), the first of "
                         "the 2 windows the image offers (DICOM's default), which clips "
                         "its values (185 to 3833)",)


def test_no_note_for_one_window_or_a_first_one_that_clips_nothing(tmp_path: Path) -> None:
    assert load_image_2d(CXR).notes == ()
    ds = cxr()
    ds.WindowCenter, ds.WindowWidth = [2048, 3000], [4096, 800]
    assert load_image_2d(written(ds, tmp_path / "full-first.dcm")).notes == ()


def test_the_result_notes_name_the_window_read_through(
        runner: PipelineRunner, tmp_path: Path) -> None:
    out = runner.run("cxr", [narrow_first(tmp_path)], tmp_path / "out", outputs=["json"])
    assert isinstance(out.result, ClassificationResult)
    assert out.result.notes == [
        "series 1 image 1 (PA): read through Window Center/Width 2400/1600 (BONE), the first "
        "of the 2 windows the image offers (DICOM's default), which clips its values "
        "(185 to 3833)"]


def test_the_8_bit_voi_lut_gives_the_finding_of_the_unmodified_image(
        runner: PipelineRunner, tmp_path: Path) -> None:
    """What the probe saw end to end: "TB Presumptive" with six findings before."""
    ds = cxr()
    ds.VOILUTSequence = voi_lut([4096, 0, 8], np.arange(4096) // 16)
    path = written(ds, tmp_path / "lut.dcm")
    base, lut = (runner.run("cxr", [p], tmp_path / p.stem, outputs=["json"]).result
                 for p in (CXR, path))
    assert isinstance(base, ClassificationResult) and isinstance(lut, ClassificationResult)
    assert lut.result == base.result == "Abnormal"
    assert [f.name for f in lut.findings if f.presence] == ["Pleural Effusion"]
    for a, b in zip(lut.findings, base.findings, strict=True):
        assert a.confidence == pytest.approx(b.confidence, abs=0.02)


# -- a second probe: VOIs that threshold or blank the image, and what else reached a model --


@pytest.mark.parametrize("width", [1, 2])
def test_a_window_that_thresholds_the_image_is_refused(tmp_path: Path, width: int) -> None:
    """A window 1 or 2 wide (legal) made the chest a black-and-white mask: two grey
    levels passed the flat-grey check, and the model read "TB Presumptive"."""
    ds = cxr()
    ds.WindowCenter, ds.WindowWidth = 2048, width
    with pytest.raises(VOIError, match=r"leaves 2 grey levels .* a thresholded mask"):
        load_image_2d(written(ds, tmp_path / "w.dcm"))


def test_a_single_window_that_blanks_most_of_the_image_is_refused_and_half_noted(
        tmp_path: Path) -> None:
    """One narrow window (no other offered) read a chest 97 % black, five findings and no
    note: the note fired only when several windows were offered."""
    ds = cxr()
    ds.WindowCenter, ds.WindowWidth = 3000, 800
    with pytest.raises(VOIError, match=r"shows 97% of the pixels as pure black or white"):
        load_image_2d(written(ds, tmp_path / "bone.dcm"))
    ds.WindowCenter, ds.WindowWidth = 2400, 1600
    img = load_image_2d(written(ds, tmp_path / "narrow.dcm"))
    assert img.notes == ("read through its window (Window Center/Width 2400/1600), which "
                         "shows 62% of the pixels as pure black or white: a model may read "
                         "it less reliably",)


def test_the_first_of_several_voi_luts_is_named(tmp_path: Path) -> None:
    ds = cxr()
    ds.VOILUTSequence = voi_lut([4096, 0, 12], np.arange(4096))
    ds.VOILUTSequence.append(voi_lut([4096, 0, 12], np.arange(4096))[0])
    img = load_image_2d(written(ds, tmp_path / "two.dcm"))
    assert img.notes == ("read through its VOI LUT (LUT Descriptor [4096, 0, 12]), the first "
                         "of the 2 VOI LUTs the image offers (DICOM's default): a model may "
                         "read it less reliably",)


def test_a_rescale_slope_without_its_intercept_is_refused(tmp_path: Path) -> None:
    """A radiograph's slope of -1 without its intercept was skipped with it: the chest
    was read inverted, with seven findings."""
    ds = cxr()
    ds.RescaleSlope = -1
    if "RescaleIntercept" in ds:
        del ds.RescaleIntercept
    with pytest.raises(InputError, match="has a Rescale Slope but no Rescale Intercept"):
        load_image_2d(written(ds, tmp_path / "slope.dcm"))


def test_palette_colour_is_refused(tmp_path: Path) -> None:
    """An inverted grey palette read a chest as its negative, with seven findings."""
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    with pytest.raises(InputError, match="PALETTE COLOR image: .* send the greyscale original"):
        load_image_2d(written(ds, tmp_path / "palette.dcm"))
