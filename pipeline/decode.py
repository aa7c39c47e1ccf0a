"""Decode images sent over the network: DICOM Part 10, PNG or JPEG bytes.

The model-serving APIs receive images as request bodies, multipart parts,
base64 strings or downloads rather than files. :func:`decode_image` turns
such bytes into the same float32 H x W array in [0, 1] (1.0 white) that
:func:`pipeline.io.load_image_2d` gives for a DICOM file, so a classifier
sees the same values whichever way an image came:

- DICOM (``DICM`` at offset 128, or a bare dataset that parses as one) goes
  through :func:`pipeline.io.load_image_2d` (modality LUT, VOI, MONOCHROME1);
- PNG and JPEG are decoded with Pillow; 8-bit values are divided by 255,
  16-bit by 65535; colour, palette and alpha images become luminance
  (ITU-R BT.601, Pillow's ``convert("L")``).

Every problem is an :class:`~pipeline.io.InputError` whose message says what
was received and what to send instead.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset

from pipeline.io import InputError, load_image_2d, pixel_aspect

__all__ = ["MAX_PIXELS", "DecodedImage", "ImageFormat", "NotAnImageError", "decode_image",
           "sniff_format"]

# Far above any radiograph (a 43 x 43 cm detector at 100 um is ~18.5 MP), far below what
# would exhaust memory: a small compressed body must not expand into gigabytes.
MAX_PIXELS = 64 * 1024 * 1024


class ImageFormat(StrEnum):
    DICOM = "dicom"
    PNG = "png"
    JPEG = "jpeg"


class NotAnImageError(InputError):
    """The bytes are neither DICOM, PNG nor JPEG, or cannot be decoded as such."""


@dataclass(frozen=True)
class DecodedImage:
    """One decoded 2-D image: ``pixels`` float32 H x W in [0, 1], 1.0 white."""

    pixels: npt.NDArray[np.float32]
    format: ImageFormat
    header: Dataset | None = None  # the DICOM header (no pixel data), for DICOM input
    # a pixel's height over its width (pipeline.io.pixel_aspect; 1.0 for PNG and JPEG)
    pixel_aspect: float = 1.0


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> ImageFormat | None:
    """The format the bytes announce (magic numbers), or ``None``."""
    if data.startswith(_PNG_MAGIC):
        return ImageFormat.PNG
    if data.startswith(_JPEG_MAGIC):
        return ImageFormat.JPEG
    if len(data) >= 132 and data[128:132] == b"DICM":
        return ImageFormat.DICOM
    return None


def decode_image(data: bytes) -> DecodedImage:
    """Decode DICOM, PNG or JPEG bytes to a float32 H x W image in [0, 1].

    Raises:
        NotAnImageError: empty bytes, an unknown format, or a PNG/JPEG that
            cannot be decoded or is larger than :data:`MAX_PIXELS`.
        InputError: a DICOM object the pipeline cannot use (no pixel data,
            corrupt pixel data, ...) - the message of
            :func:`pipeline.io.load_image_2d`.
    """
    if not data:
        raise NotAnImageError("the image is empty (0 bytes); send a DICOM, PNG or JPEG image")
    kind = sniff_format(data)
    if kind is ImageFormat.DICOM:
        return _dicom(data, preamble=True)
    if kind is None:
        # DICOM written without the preamble (a bare dataset) still starts with a group 0008
        # or 0002 tag; anything else is not an image we read.
        if data[:2] in (b"\x08\x00", b"\x02\x00"):
            return _dicom(data, preamble=False)
        raise NotAnImageError(
            f"not an image: the data ({len(data)} bytes, starting {data[:8]!r}) is neither "
            "DICOM, PNG nor JPEG; send one of those")
    return _pillow(data, kind)


def _dicom(data: bytes, preamble: bool) -> DecodedImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not preamble)
    except Exception as exc:
        raise NotAnImageError(
            f"not a readable DICOM object ({exc.__class__.__name__}: "
            f"{' '.join(str(exc).split())[:200]}); send a complete DICOM Part 10 file") from exc
    if not preamble and "SOPClassUID" not in ds and "Modality" not in ds:
        raise NotAnImageError("not an image: the data is neither DICOM, PNG nor JPEG")
    image = load_image_2d(ds)
    return DecodedImage(image.pixels, ImageFormat.DICOM, image.header, pixel_aspect(image))


def _pillow(data: bytes, kind: ImageFormat) -> DecodedImage:
    name = kind.value.upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[name])
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise NotAnImageError(
                    f"the {name} image is {w} x {h} pixels, more than the {MAX_PIXELS} "
                    "pixels accepted; send a smaller image")
            img.load()
    except NotAnImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NotAnImageError(
            f"cannot decode the {name} image ({exc.__class__.__name__}: "
            f"{' '.join(str(exc).split())[:200]}); it may be truncated or corrupt") from exc
    if min(w, h) < 2:
        raise NotAnImageError(f"the {name} image is {w} x {h} pixels; at least 2 x 2 is needed")
    pixels = _to_unit(img)
    return DecodedImage(pixels, kind)


def _to_unit(img: Image.Image) -> npt.NDArray[np.float32]:
    """Pillow image -> float32 H x W in [0, 1], divided by the sample type's maximum."""
    mode = img.mode
    # 16-bit PNGs decode to I;16 or to 32-bit integers ("I") holding 16-bit values
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    else:
        if mode != "L":
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.uint8).astype(np.float32) * np.float32(1 / 255)
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0, out=arr if arr.flags.writeable else None))
