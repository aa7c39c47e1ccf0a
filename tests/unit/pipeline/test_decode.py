"""Decoding images sent as bytes: DICOM, PNG (8/16-bit, colour), JPEG, and what is refused."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import MAX_PIXELS, ImageFormat, NotAnImageError, decode_image, sniff_format
from pipeline.io import InputError, NoPixelDataError, load_image_2d
from tests.support.serving import jpeg_bytes, phantom, phantom_dicom, png_bytes

RAMP = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))


def test_png_8_bit_is_divided_by_255() -> None:
    out = decode_image(png_bytes(RAMP))
    assert out.format is ImageFormat.PNG and out.header is None
    assert out.pixels.dtype == np.float32 and out.pixels.shape == (48, 64)
    np.testing.assert_allclose(out.pixels, np.round(RAMP * 255) / 255, atol=1e-6)


def test_png_16_bit_is_divided_by_65535() -> None:
    out = decode_image(png_bytes(RAMP, bits=16))
    np.testing.assert_allclose(out.pixels, np.round(RAMP * 65535) / 65535, atol=1e-6)
    assert out.pixels.max() == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_and_alpha_pngs_become_luminance(mode: str) -> None:
    out = decode_image(png_bytes(RAMP, mode=mode))
    assert out.pixels.shape == (48, 64)
    np.testing.assert_allclose(out.pixels, np.round(RAMP * 255) / 255, atol=2 / 255)


def test_jpeg() -> None:
    out = decode_image(jpeg_bytes(RAMP))
    assert out.format is ImageFormat.JPEG
    np.testing.assert_allclose(out.pixels, RAMP, atol=0.03)


def test_dicom_goes_through_the_display_pipeline(tmp_path: Path) -> None:
    data = phantom_dicom(1, tmp_path)
    out = decode_image(data)
    assert out.format is ImageFormat.DICOM and out.header is not None
    assert out.header.Modality == "CR" and "PixelData" not in out.header
    expected = load_image_2d(tmp_path / "cxr-1.dcm").pixels
    np.testing.assert_array_equal(out.pixels, expected)
    # the phantom's own values come back (its window covers the stored range)
    np.testing.assert_allclose(out.pixels, phantom(1).image, atol=2e-3)


def test_dicom_without_preamble(tmp_path: Path) -> None:
    data = phantom_dicom(2, tmp_path)
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = dcmread(io.BytesIO(data))
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    bare = buf.getvalue()
    assert sniff_format(bare) is None
    out = decode_image(bare)
    assert out.format is ImageFormat.DICOM and out.pixels.shape == (256, 256)


def test_dicom_without_pixels_says_so(tmp_path: Path) -> None:
    from pydicom import dcmread

    path = tmp_path / "x.dcm"
    path.write_bytes(phantom_dicom(3, tmp_path))
    ds = dcmread(path)
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(NoPixelDataError, match="no pixel data"):
        decode_image(buf.getvalue())


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"hello, world", "neither DICOM, PNG nor JPEG"),
    (b"GIF89a" + bytes(64), "neither DICOM, PNG nor JPEG"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "cannot decode the PNG"),
    (b"\xff\xd8\xff\xe0" + bytes(40), "cannot decode the JPEG"),
    (bytes(128) + b"DICM" + bytes(20), "not a readable DICOM|no pixel data"),
])
def test_not_an_image(data: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        decode_image(data)


def test_truncated_png() -> None:
    data = png_bytes(np.random.default_rng(0).random((64, 64)))
    with pytest.raises(NotAnImageError, match="cannot decode the PNG"):
        decode_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) \
        + chunk(b"IEND", b"")


def test_too_many_pixels_is_refused_before_decoding() -> None:
    side = int(MAX_PIXELS ** 0.5) + 1
    with pytest.raises(NotAnImageError, match="more than"):
        decode_image(_png_header_only(side, side))


def test_a_one_pixel_wide_image_is_refused() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 1), np.uint8)).save(buf, format="PNG")
    with pytest.raises(NotAnImageError, match="at least 2 x 2"):
        decode_image(buf.getvalue())
