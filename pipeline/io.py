"""Loading DICOM inputs for the models: 2D images, CT volumes and series selection.

Everything here turns a file (or a pydicom ``Dataset``) into arrays a model can
use, and turns every problem with the input into an :class:`InputError` (or one
of its subclasses) whose message says what is wrong and what to send instead.
Callers never see a bare numpy or pydicom exception from these functions.

Display pipeline of :func:`load_image_2d` (PS3.3 C.11, in this order):

1. decode the pixel data with pydicom's pixel handlers (native, RLE, deflate,
   JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 through the
   installed pylibjpeg plugins); multi-frame objects give their middle frame
   unless a frame index is asked for;
2. colour images (RGB, YBR_*) become luminance (ITU-R BT.601: 0.299 R +
   0.587 G + 0.114 B) scaled by their bit depth and skip steps 3-4; PALETTE
   COLOR (pseudo-colour indices) is refused;
3. modality LUT: Rescale Slope/Intercept or the Modality LUT Sequence
   (float32);
4. VOI: the first VOI LUT Sequence item, else the first Window Center/Width
   pair (LINEAR, LINEAR_EXACT or SIGMOID), else min-max of the image;
   pixels equal to Pixel Padding Value (or in its range limit) are left out
   of the min-max and shown black. A VOI LUT whose entries contradict its
   descriptor, or a VOI that turns an image whose values vary into one flat
   grey, into 8 grey levels or fewer, or 90 % pure black or white, is refused
   (:class:`VOIError`); a first window that clips the image while others were
   offered, a VOI that shows half the image or more as pure black or white,
   and the first of several VOI LUTs are named in :attr:`Image2D.notes`;
5. MONOCHROME1 is inverted so that, as for MONOCHROME2, 1.0 is white.

LUTs (Modality and VOI) are applied here, not by pydicom: pydicom 3.0 indexes a
LUT of 8-bit entries with 8-bit integers, so an input above 255 wraps around
(a 12-bit image through a [4096, 0, 8] VOI LUT came out as noise).

CT volumes (:func:`load_ct_volume`) keep raw HU, padding included: models clip
HU in their own pre-processing. A CT slice without Rescale Slope/Intercept (nor a
Modality LUT) is refused: its stored values are not HU.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import pixel_array
from pydicom.sr.codedict import Collection, codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag, Tag

from pipeline.settings import SeriesRules

__all__ = [
    "CorruptPixelDataError",
    "Image2D",
    "ImageSizeError",
    "IncompleteSeriesError",
    "InputError",
    "NoPixelDataError",
    "PatientMismatchError",
    "SelectedSeries",
    "SeriesError",
    "Source",
    "StudyImage",
    "TruncatedFileError",
    "UnreadableFileError",
    "VOIError",
    "Volume",
    "WrongModalityError",
    "check_one_patient",
    "load_ct_volume",
    "load_image_2d",
    "number_of_frames",
    "pixel_aspect",
    "read_dataset",
    "select_series",
    "series_misfit",
    "series_refusal",
    "study_images",
]

Source: TypeAlias = "str | PathLike[str] | Dataset"

_PIXEL_TAGS = frozenset(
    Tag(t)
    for t in (
        0x7FE00010,  # Pixel Data
        0x7FE00008,  # Float Pixel Data
        0x7FE00009,  # Double Float Pixel Data
    )
)
_PIXEL_DATA = Tag(0x7FE00010)
_COLOUR = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


# --------------------------------------------------------------------------- errors


class InputError(Exception):
    """An input the pipeline cannot use; ``str(err)`` is meant for a person.

    ``path`` names the offending file when there is one.
    """

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None


class UnreadableFileError(InputError):
    """The file is missing, unreadable, or not DICOM."""


class TruncatedFileError(UnreadableFileError):
    """The file ends before its data set does: it was cut short in transfer or on disk."""


class NoPixelDataError(InputError):
    """The object carries no image (an SR, RT structure set, RT plan, waveform...)."""


class WrongModalityError(InputError):
    """The object's modality is not one the model accepts."""


class CorruptPixelDataError(InputError):
    """The pixel data cannot be decoded (truncated, corrupted, unsupported codec)."""


class VOIError(InputError):
    """The image's VOI cannot show it: a VOI LUT whose entries contradict its LUT
    Descriptor, or a VOI LUT or window that turns an image whose values vary into one
    flat grey (a model would read nothing, or noise)."""


class ImageSizeError(InputError):
    """The image is empty, a single pixel or otherwise of a size a model cannot use."""


class SeriesError(InputError):
    """A series cannot form a volume, or no series of a study matches the rules.

    ``near`` (from :func:`select_series`): the study's series of a modality the rules
    take, each with why it was refused ("series 1.2.3 (CT, 1 instance(s)): 1 image(s),
    fewer than the 8 required"); empty when no series was of such a modality.
    """

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None,
                 near: Sequence[str] = ()) -> None:
        super().__init__(message, path=path)
        self.near = list(near)


class PatientMismatchError(InputError):
    """The instances of one study name more than one patient (Patient ID, or the same
    ID from different issuers): an upstream merge error; the study is not run."""


class IncompleteSeriesError(SeriesError):
    """Slices are missing from a series (a gap between positions): it arrived in part."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Image2D:
    """One 2D image ready for display and models.

    ``pixels`` is float32 H x W in [0, 1] with 1.0 white whatever the
    photometric interpretation. ``header`` is a copy of the dataset without its
    pixel data. ``photometric`` is the source's Photometric Interpretation;
    ``window`` is the (center, width) applied, in modality units, or ``None``
    when a VOI LUT, min-max scaling or a colour conversion was used instead
    (``voi`` says which: ``"lut"``, ``"window"``, ``"minmax"`` or ``"colour"``).
    ``upright_from`` is the Patient Orientation the pixels had when they were turned
    to the way radiographs are read and models trained (patient's left on the right,
    feet down: ``L\\F``), the header then saying ``L\\F``; ``""`` when they already
    were, or the orientation does not say (a lateral view, none given).
    ``notes`` says what a person reading a result from these pixels should know: the
    window they were read through when the image offers several and the first (DICOM's
    default, applied) clips its values.
    """

    pixels: npt.NDArray[np.float32]
    header: Dataset
    photometric: str
    inverted: bool
    voi: str
    window: tuple[float, float] | None
    frame_index: int
    number_of_frames: int
    path: Path | None = None
    upright_from: str = ""
    notes: tuple[str, ...] = ()

    @property
    def modality(self) -> str:
        """The header's Modality, or ``""``."""
        return str(self.header.get("Modality", ""))

    @property
    def sop_instance_uid(self) -> str:
        """The header's SOP Instance UID, or ``""``."""
        return str(self.header.get("SOPInstanceUID", ""))

    @property
    def series_instance_uid(self) -> str:
        """The header's Series Instance UID, or ``""``."""
        return str(self.header.get("SeriesInstanceUID", ""))


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units, slices sorted along the slice normal.

    ``array`` is float32 Z x Y x X. ``spacing`` is (z, y, x) in mm, with z the
    distance between consecutive slices. ``origin`` is the patient position
    (x, y, z, LPS mm) of the first voxel of the first slice. ``direction``
    holds the unit vectors, in patient LPS coordinates, along which the x, y
    and z indices grow: (row direction, column direction, slice normal).
    ``paths`` and ``headers`` are the source files and their headers in slice order
    (``None`` paths for in-memory datasets); the slices of a multi-frame object share
    its path and header, and ``frames`` holds each slice's frame number in it (1-based;
    ``None`` for a single-frame slice). ``resampled`` is true when the slices were
    interpolated onto a uniform grid; ``missing_slices`` is the number of
    slices that looked missing from the gaps between positions.
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    paths: list[Path | None]
    series_instance_uid: str
    headers: list[Dataset] = field(default_factory=list, repr=False)
    frames: list[int | None] = field(default_factory=list)
    resampled: bool = False
    missing_slices: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X)."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    def affine(self) -> npt.NDArray[np.float64]:
        """4 x 4 matrix mapping (x, y, z, 1) voxel indices to patient LPS mm."""
        m = np.eye(4)
        d = np.asarray(self.direction, dtype=np.float64)
        sz, sy, sx = self.spacing
        m[:3, 0] = d[0] * sx
        m[:3, 1] = d[1] * sy
        m[:3, 2] = d[2] * sz
        m[:3, 3] = self.origin
        return m


@dataclass(frozen=True)
class SelectedSeries:
    """The series of a study chosen by :func:`select_series`.

    ``paths`` and ``headers`` are in the same order: the order given, the image a
    classifier should take first (use :func:`load_ct_volume` to sort slices by
    position). ``rejected`` maps every other
    series UID to the reason it was not chosen.
    """

    series_instance_uid: str
    modality: str
    sop_class_uid: str
    body_part: str
    description: str
    paths: list[Path | None]
    headers: list[Dataset]
    rejected: dict[str, str] = field(default_factory=dict)
    # the other eligible series, best first, each as it would have been chosen (its
    # images ranked): a classifier reads them too; a volume model reads the chosen one
    also_eligible: list[SelectedSeries] = field(default_factory=list)

    @property
    def series_number(self) -> str:
        """The chosen series' Series Number, or ``""``."""
        return str(self.headers[0].get("SeriesNumber", "") or "") if self.headers else ""

    @property
    def sources(self) -> list[str | PathLike[str] | Dataset]:
        """What to pass to the loaders: a header whose pixels were left in its file (the
        loader reads only those), else the path when known, else the dataset."""
        return [h if _pixels_in_file(h) or p is None else p
                for p, h in zip(self.paths, self.headers, strict=True)]


# --------------------------------------------------------------------------- reading


def read_dataset(source: Source, *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file (or pass a ``Dataset`` through).

    Files without the 128-byte preamble / File Meta header are accepted when
    they still parse as DICOM (they carry a SOP Class UID or Modality).

    Raises:
        UnreadableFileError: the file is missing, unreadable or not DICOM.
        TruncatedFileError: the file ends before its data set does (see
            :func:`_check_whole`).
    """
    if isinstance(source, Dataset):
        if not stop_before_pixels and _pixels_in_file(source):
            return _with_pixels_from_file(source)
        return source
    path = Path(source)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except (OSError, EOFError) as exc:
        raise UnreadableFileError(
            f"cannot read {path}: {exc.__class__.__name__}: {exc}", path=path
        ) from exc
    except Exception as exc:
        raise UnreadableFileError(
            f"{path} is not a readable DICOM file ({exc.__class__.__name__}: {exc}); "
            "check that the file is complete and was not altered in transfer",
            path=path,
        ) from exc
    else:
        _check_whole(ds, path, stop_before_pixels)
        return ds
    # No preamble: try a forced read but only accept something that looks like DICOM.
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        ok = "SOPClassUID" in ds or "Modality" in ds
    except Exception:
        ok = False
    if not ok:
        raise UnreadableFileError(
            f"{path} is not a DICOM file (no 'DICM' prefix and no DICOM attributes found); "
            "send a DICOM Part 10 file",
            path=path,
        )
    _check_whole(ds, path, stop_before_pixels)
    return ds


def _check_whole(ds: Dataset, path: Path, stop_before_pixels: bool) -> None:
    """Refuse a file that ends before its data set does, which pydicom reads without an
    error: an element of undefined length (compressed Pixel Data, a sequence) that runs
    to the end of the file without its delimiter loses the whole data set (pydicom only
    warns, and the file read as an object without pixels); a value the file ends inside
    comes back short; a file that ends inside an element's header ends the data set
    there. Pixel Data read (whole or not) ends the check: one cut short is the decoder's
    to report, and nothing after it matters.

    Raises:
        TruncatedFileError: the message says where the file ends.
    """
    if not ds:
        why = ("no element of its data set could be read (it ends inside the first one, "
               "or an element without a defined length - compressed Pixel Data, a sequence "
               "- runs to the end of the file without its closing delimiter)")
    else:
        tag = list(ds.keys())[-1]  # the last read (top-level elements keep file order)
        elem = ds.get_item(tag, keep_deferred=True)
        if _has_pixels(ds) or not isinstance(elem, RawDataElement) \
                or elem.length == 0xFFFFFFFF:
            return
        name = f"{pydicom.datadict.keyword_for_tag(tag) or 'element'} {BaseTag(tag)}"
        size = path.stat().st_size
        end = elem.value_tell + elem.length
        if end > size:
            why = f"it ends {size - elem.value_tell} bytes into the {elem.length}-byte " \
                  f"value of {name}"
        # fewer bytes left than an element's header: pydicom stops there without a word
        # (stopping before the pixels leaves at least Pixel Data's header)
        elif 0 < size - end < 8 or (size > end and not stop_before_pixels):
            why = f"it ends {size - end} byte(s) into the header of the element after {name}"
        else:
            return
    raise TruncatedFileError(
        f"{path} is truncated: {why}; the file is incomplete (cut short in transfer or on "
        "disk) - resend it", path=path)


def _pixels_in_file(ds: Dataset) -> bool:
    """Whether ``ds`` is a header read from a file with ``defer_size`` whose pixel value
    was skipped (still in the file): what the node keeps of a retrieved instance."""
    if not isinstance(getattr(ds, "filename", None), str):
        return False
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    return isinstance(elem, RawDataElement) and elem.value is None


def _with_pixels_from_file(header: Dataset) -> Dataset:
    """A dataset of the loader's own over ``header``'s elements, its pixels read from
    the header's file (pydicom's deferred read): the header is not parsed again, and the
    caller's header neither gains the pixels nor loses anything.

    Raises:
        UnreadableFileError: the file is gone, or no longer holds the pixels there.
    """
    path = str(header.filename)
    # keys(): iterating a Dataset yields its elements, converted (and deferred ones read)
    elems: dict[BaseTag, DataElement | RawDataElement] = {
        tag: header.get_item(tag, keep_deferred=True) for tag in header.keys()  # noqa: SIM118
    }
    try:
        own = FileDataset(path, elems, preamble=getattr(header, "preamble", None),
                          file_meta=header.file_meta)
        implicit, little = header.original_encoding
        own.set_original_encoding(implicit, little, header.original_character_set)
        own.get_item(_PIXEL_DATA)  # the deferred read, checked against the element's tag
    except (OSError, ValueError, StopIteration) as exc:
        raise UnreadableFileError(
            f"cannot read the pixel data of {path}: {exc.__class__.__name__}: {exc}",
            path=Path(path)) from exc
    return own


def _source_path(source: Source) -> Path | None:
    if isinstance(source, Dataset):
        name = getattr(source, "filename", None)
        return Path(name) if isinstance(name, (str, PathLike)) else None
    return Path(source)


def _describe(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID")
    name = getattr(sop, "name", None) or str(sop or "unknown SOP class")
    return f"{name} (modality {ds.get('Modality', '?')})"


def _has_pixels(ds: Dataset) -> bool:
    return any(t in ds for t in _PIXEL_TAGS)


def _header_of(ds: Dataset, source: Source) -> Dataset:
    """``ds`` without its pixels: stripped in place when read here (nobody else holds
    it; a deep copy of every slice's header costs more than reading it), copied when it
    is the dataset the caller passed in."""
    if ds is source:
        return _header_copy(ds)
    for tag in _PIXEL_TAGS:
        if tag in ds:
            del ds[tag]
    return ds


def _header_copy(ds: Dataset) -> Dataset:
    hdr = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            hdr.add(copy.deepcopy(elem))
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        hdr.file_meta = copy.deepcopy(meta)
    hdr.is_little_endian = getattr(ds, "is_little_endian", None)
    hdr.is_implicit_VR = getattr(ds, "is_implicit_VR", None)
    return hdr


def _check_modality(ds: Dataset, modalities: Iterable[str] | None, path: Path | None) -> None:
    if modalities is None:
        return
    wanted = {m.upper() for m in modalities}
    if not wanted:
        return
    have = str(ds.get("Modality", "")).upper()
    if have not in wanted:
        where = f"{path}: " if path else ""
        raise WrongModalityError(
            f"{where}modality {have or '(missing)'} is not accepted by this model "
            f"(expects {', '.join(sorted(wanted))}); send a {'/'.join(sorted(wanted))} image",
            path=path,
        )


def _require_pixels(ds: Dataset, path: Path | None) -> None:
    where = f"{path}: " if path else ""
    if not _has_pixels(ds):
        raise NoPixelDataError(
            f"{where}{_describe(ds)} has no pixel data; an image model needs an image "
            "object (e.g. CR, DX, CT, MR), not a report, structure set, plan or waveform",
            path=path,
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise CorruptPixelDataError(
            f"{where}pixel data without Rows/Columns; the image pixel module is incomplete",
            path=path,
        )
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    if rows < 2 or cols < 2:
        raise ImageSizeError(
            f"{where}image is {rows} x {cols} pixels; at least 2 x 2 is needed", path=path
        )


def _decode(ds: Dataset, path: Path | None, index: int | None) -> npt.NDArray[Any]:
    where = f"{path}: " if path else ""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # Files without meta (read with force) are implicit/explicit VR little endian.
        ds.file_meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if getattr(ds, "is_implicit_VR", True)
            else pydicom.uid.ExplicitVRLittleEndian
        )
    tsyntax = ds.file_meta.TransferSyntaxUID
    try:
        arr = pixel_array(ds, index=index)
    except Exception as exc:
        raise CorruptPixelDataError(
            f"{where}cannot decode the pixel data ({getattr(tsyntax, 'name', tsyntax)}): "
            f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}; "
            "the file may be truncated or corrupted, or its compression unsupported - "
            "resend it, or send it uncompressed",
            path=path,
        ) from exc
    if arr.size == 0:
        raise ImageSizeError(f"{where}the decoded image is empty", path=path)
    return arr


# --------------------------------------------------------------------------- 2D images


def _values(ds: Dataset, keyword: str) -> list[Any]:
    """An attribute's values as a list ([] when absent or empty)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) \
        else [value]


def _window_pair(ds: Dataset) -> tuple[float, float] | None:
    """The first Window Center/Width pair (the one DICOM displays), or None when there is
    none or it is not a usable window."""
    centers, widths = _values(ds, "WindowCenter"), _values(ds, "WindowWidth")
    try:
        center, width = float(centers[0]), float(widths[0])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
        return None
    return center, width


def _minmax(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros_like(arr)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros_like(arr)
    return np.nan_to_num((arr - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)


def _little_endian(ds: Dataset) -> bool:
    """Whether ``ds``'s OW values (LUT Data) are little endian: its transfer syntax's, or
    how it was read; little endian when neither says."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is not None and tsyntax.is_transfer_syntax:
        return bool(tsyntax.is_little_endian)
    little = ds.original_encoding[1]
    return True if little is None else bool(little)


@dataclass(frozen=True)
class _Lut:
    """A Modality or VOI LUT (PS3.3 C.11.1.1, C.11.2.1.1): its LUT Descriptor as written,
    ``first`` the first input value mapped (signed where its input is), ``entries`` as
    many as the descriptor says. An input below ``first`` takes the first entry, one past
    the last entry the last (:meth:`indices`)."""

    descriptor: tuple[int, int, int]
    first: int
    entries: npt.NDArray[np.int64]

    @classmethod
    def from_item(cls, item: Dataset, little: bool, signed_input: bool) -> _Lut:
        """The LUT of a Modality or VOI LUT Sequence item.

        LUT Data may be US (a list) or OW (16-bit words in the data set's byte order; a
        LUT of 8-bit entries packed two to a word is taken when the data holds one byte
        an entry). A first value of 0 in the descriptor means 65536 entries. A second
        value written as US (pydicom's reading of "US or SS") that is 2**15 or more is
        taken as negative when the LUT's input is signed.

        Raises:
            ValueError: a descriptor that is not three numbers, bits per entry outside
                1-16, LUT Data with fewer entries than declared, or entries beyond what
                the bits per entry allow; the message says which.
        """
        try:
            count, first, bits = (int(v) for v in _values(item, "LUTDescriptor"))
        except (TypeError, ValueError):
            raise ValueError(
                f"its LUT Descriptor {item.get('LUTDescriptor')!r} is not three numbers "
                "(entries, first value mapped, bits per entry)") from None
        descriptor = (count, first, bits)
        n = count or 65536
        if not 1 <= bits <= 16:
            raise ValueError(f"its LUT Descriptor {list(descriptor)} declares {bits} bits "
                             "per entry, more than LUT Data can hold (16)" if bits > 16 else
                             f"its LUT Descriptor {list(descriptor)} declares {bits} bits "
                             "per entry")
        if signed_input and first >= 2**15:
            first -= 2**16
        raw = item.get("LUTData")
        if isinstance(raw, (bytes, bytearray)):
            if len(raw) >= 2 * n or bits > 8:
                words = np.frombuffer(raw, dtype="<u2" if little else ">u2",
                                      count=min(len(raw) // 2, n))
            else:  # 8-bit entries packed two to a word
                words = np.frombuffer(raw, dtype=np.uint8, count=min(len(raw), n))
            entries = words.astype(np.int64)
        else:
            entries = np.asarray(_values(item, "LUTData"), dtype=np.int64).ravel()[:n]
        if entries.size < n:
            raise ValueError(f"its LUT Data holds {entries.size} entries, fewer than the {n} "
                             f"its LUT Descriptor {list(descriptor)} declares")
        if entries.min() < 0 or entries.max() > 2**bits - 1:
            raise ValueError(
                f"its entries run from {int(entries.min())} to {int(entries.max())}, beyond "
                f"the 0 to {2**bits - 1} that the {bits} bits per entry of its LUT "
                f"Descriptor {list(descriptor)} allow")
        return cls(descriptor, first, entries)

    def indices(self, values: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
        """Each input value's index into :attr:`entries` (inputs rounded to integers),
        in a wide integer type whatever the entries' bits."""
        # float32 holds every integer a LUT can index exactly, at half float64's memory
        idx = np.rint(np.asarray(values, dtype=np.float32)) - np.float32(self.first)
        np.clip(np.nan_to_num(idx, copy=False), 0, self.entries.size - 1, out=idx)
        return idx.astype(np.int32)


def _voi(
    values: npt.NDArray[Any], ds: Dataset, path: Path | None = None
) -> tuple[npt.NDArray[Any], str, tuple[float, float] | None]:
    """Map modality values to [0, 1]: VOI LUT, else first window, else min-max.

    Raises:
        VOIError: the first VOI LUT Sequence item contradicts its LUT Descriptor, or its
            entries are all the same.
    """
    where = f"{path}: " if path else ""
    seq = ds.get("VOILUTSequence")
    if seq:
        item = seq[0]
        try:
            lut = _Lut.from_item(item, _little_endian(ds), bool(np.min(values) < 0))
        except ValueError as exc:
            raise VOIError(f"{where}its VOI LUT cannot be applied: {exc}; the VOI LUT is "
                           "inconsistent - correct it at the modality and resend the image, "
                           "or send it without a VOI LUT Sequence", path=path) from None
        lo, hi = int(lut.entries.min()), int(lut.entries.max())
        if hi == lo:
            raise VOIError(f"{where}its VOI LUT (LUT Descriptor {list(lut.descriptor)}) maps "
                           f"every value to {lo}: the image would show as one flat grey; "
                           "correct it at the modality and resend the image", path=path)
        scaled = ((lut.entries - lo) / (hi - lo)).astype(np.float32)
        return scaled[lut.indices(values)], "lut", None
    pair = _window_pair(ds)
    if pair is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return apply_window(values, *pair, function), "window", pair
    return _minmax(values), "minmax", None


def _voi_name(ds: Dataset, voi: str, window: tuple[float, float] | None) -> str:
    """The VOI that :func:`_voi` applied, for a message."""
    if voi == "lut":
        return f"VOI LUT (LUT Descriptor {list(_values(ds.VOILUTSequence[0], 'LUTDescriptor'))})"
    if voi == "window" and window is not None:
        return f"window (Window Center/Width {window[0]:g}/{window[1]:g})"
    return "min-max scaling"


def _check_voi(before: npt.NDArray[Any], after: npt.NDArray[Any],
               padding: npt.NDArray[np.bool_] | None, name: str,
               path: Path | None = None) -> None:
    """Refuse a VOI that turns an image whose values vary into one flat grey (99 % of its
    pixels, padding left out, within one grey level of 256), on a sample of the pixels
    (some 16,000: the percentiles' sort is most of the cost of this check).

    Raises:
        VOIError: the message names the VOI and the values it flattened.
    """
    where = f"{path}: " if path else ""
    step = max(1, round(math.sqrt(before.size / 16_000)))
    b, a = before[::step, ::step], after[::step, ::step]
    if padding is not None:
        keep = ~padding[::step, ::step]
        b, a = b[keep], a[keep]
    if b.size == 0:
        return
    a_lo, a_hi = np.percentile(a, [0.5, 99.5])
    b_lo, b_hi = np.percentile(b, [0.5, 99.5])
    advice = ("check the image's VOI (VOI LUT, Window Center/Width) at the modality and "
              "resend it")
    if a_hi - a_lo < 1 / 255:
        if b_hi > b_lo:  # flat by the VOI's doing, not the image's
            raise VOIError(
                f"{where}its {name} turns the image into one flat grey ({float(a_lo):.2f} "
                f"for 99 % of the pixels, whose values run from {float(b_lo):g} to "
                f"{float(b_hi):g}): a model would read nothing; {advice}", path=path)
        return
    # A window 1 or 2 wide thresholds the image: two levels passed the check above, and a
    # chest made a black-and-white mask read "TB Presumptive" with six findings.
    levels = np.unique(np.round(a * 255)).size
    if levels <= _MIN_VOI_LEVELS and np.unique(b).size > _MIN_VOI_LEVELS:
        raise VOIError(f"{where}its {name} leaves {levels} grey levels of the image's "
                       f"{float(b_lo):g} to {float(b_hi):g}: a model would read a "
                       f"thresholded mask; {advice}", path=path)
    clipped = _clipped(a)
    if clipped >= _VOI_CLIP_REFUSE:
        raise VOIError(f"{where}its {name} shows {clipped:.0%} of the pixels as pure black or "
                       f"white (values from {float(b_lo):g} to {float(b_hi):g}): a model would "
                       f"read next to nothing of it; {advice}", path=path)


# A VOI whose output has this few grey levels is a threshold, not a view; one that
# shows this share of the pixels as pure black or white leaves little to read (refused),
# and this share is noted (a model trained on full-range images reads less of it).
_MIN_VOI_LEVELS = 8
_VOI_CLIP_REFUSE = 0.9
_VOI_CLIP_NOTE = 0.5


def _clipped(values: npt.NDArray[Any]) -> float:
    """The share of ``values`` (in [0, 1]) at pure black or pure white."""
    if values.size == 0:
        return 0.0
    return float(np.count_nonzero((values <= 0.5 / 255) | (values >= 254.5 / 255))
                 / values.size)


def _clip_note(ds: Dataset, name: str, values: npt.NDArray[Any],
               padding: npt.NDArray[np.bool_] | None) -> str:
    """A note when the VOI applied shows half the pixels or more as pure black or white
    (a single narrow window read a chest 97 % black, with five findings and no note), or
    is the first of several VOI LUTs; ``""`` otherwise."""
    shown = values if padding is None else values[~padding]
    step = max(1, round(math.sqrt(shown.size / 16_000)))
    clipped = _clipped(np.ravel(shown)[::step * step])
    luts = len(ds.get("VOILUTSequence") or [])
    several = (f", the first of the {luts} VOI LUTs the image offers (DICOM's default)"
               if name.startswith("VOI LUT") and luts > 1 else "")
    if clipped < _VOI_CLIP_NOTE and not several:
        return ""
    shows = (f", which shows {clipped:.0%} of the pixels as pure black or white"
             if clipped >= _VOI_CLIP_NOTE else "")
    return f"read through its {name}{several}{shows}: a model may read it less reliably"


def _window_note(ds: Dataset, window: tuple[float, float], values: npt.NDArray[Any]) -> str:
    """A note naming the window applied, when the image offers several and this one (the
    first, DICOM's default) clips its modality ``values``; ``""`` otherwise."""
    offered = min(len(_values(ds, "WindowCenter")), len(_values(ds, "WindowWidth")))
    if offered < 2:
        return ""
    center, width = window
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if center - width / 2 <= low and high <= center + width / 2:
        return ""
    explanations = _values(ds, "WindowCenterWidthExplanation")
    said = str(explanations[0]).strip() if explanations else ""
    return (f"read through Window Center/Width {center:g}/{width:g}"
            + (f" ({said})" if said else "")
            + f", the first of the {offered} windows the image offers (DICOM's default), "
            f"which clips its values ({low:g} to {high:g})")


def apply_window(values: npt.NDArray[Any], center: float, width: float,
                 function: str = "LINEAR") -> npt.NDArray[Any]:
    """A VOI window (PS3.3 C.11.2.1.2 and C.11.2.1.3) onto [0, 1], in float32.

    ``LINEAR`` (also for an unknown function), ``LINEAR_EXACT`` or ``SIGMOID``; the
    same values as :func:`pydicom.pixels.apply_windowing` scaled to [0, 1], which
    computes in float64 with a mask per case: this is ~4x faster on a radiograph.
    """
    x = np.asarray(values, dtype=np.float32)
    if function == "SIGMOID":
        z = np.clip(np.float32(-4.0 / width) * (x - np.float32(center)), -80.0, 80.0)
        sig: npt.NDArray[Any] = 1.0 / (1.0 + np.exp(z))  # z clipped: exp stays finite
        return sig.astype(np.float32)
    if function == "LINEAR_EXACT":
        c, w = center, width
    else:
        c, w = center - 0.5, width - 1.0
    if w <= 0:  # a width of 1: a threshold at the center
        return (x > c).astype(np.float32)
    out = (x - np.float32(c)) * np.float32(1.0 / w)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _padding_mask(arr: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.bool_] | None:
    """Pixels equal to Pixel Padding Value (or within its range limit), or None."""
    try:
        pad = ds.get("PixelPaddingValue")
        if pad is None:
            return None
        limit = ds.get("PixelPaddingRangeLimit")
        lo, hi = (int(pad), int(pad)) if limit is None else sorted((int(pad), int(limit)))
    except (TypeError, ValueError):
        return None
    mask = (arr >= lo) & (arr <= hi)
    if not mask.any() or mask.all():
        return None
    return np.asarray(mask, dtype=np.bool_)


def _modality(arr: npt.NDArray[Any], ds: Dataset) -> npt.NDArray[np.float32]:
    """Stored values -> modality values (the modality LUT), in float32.

    Rescale Slope/Intercept are applied here in float32 (exact for any 16-bit
    stored value; pydicom's float64 is twice the memory traffic for nothing a
    display needs); so is a Modality LUT Sequence (:class:`_Lut`).

    Raises:
        ValueError: a Modality LUT that contradicts its descriptor (the message says how).
    """
    seq = ds.get("ModalityLUTSequence")
    if seq:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        try:
            lut = _Lut.from_item(seq[0], _little_endian(ds), signed)
        except ValueError as exc:
            raise ValueError(f"its Modality LUT cannot be applied: {exc}") from None
        return lut.entries.astype(np.float32)[lut.indices(arr)]
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if (slope is None) != (intercept is None):
        # they go together (Type 1 where the module has them): one alone was skipped, and
        # a slope of -1 without its intercept read a chest inverted
        have, lack = (("Rescale Slope", "Rescale Intercept") if intercept is None
                      else ("Rescale Intercept", "Rescale Slope"))
        raise InputError(f"it has a {have} but no {lack}: its stored values cannot be "
                         "turned into the values they stand for; resend it from the modality")
    out = np.asarray(arr, dtype=np.float32).copy()
    if slope is not None and intercept is not None:
        slope, intercept = float(slope), float(intercept)
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
    return out


def _luminance(rgb: npt.NDArray[Any], max_value: float) -> npt.NDArray[Any]:
    y = np.asarray(rgb, dtype=np.float64) @ _LUMA
    return np.clip(y / max_value, 0.0, 1.0) if max_value > 0 else _minmax(y)


def load_image_2d(
    source: Source,
    *,
    modalities: Iterable[str] | None = None,
    frame: int | None = None,
) -> Image2D:
    """Load one 2D image as float32 H x W in [0, 1] (1.0 white).

    Args:
        source: a file path or a pydicom ``Dataset`` (with its pixel data).
        modalities: accepted Modality values (case-insensitive); ``None`` or
            empty accepts any.
        frame: the frame of a multi-frame object to use (0-based); by default
            the middle frame, ``NumberOfFrames // 2``.

    Returns:
        An :class:`Image2D` (see the module docstring for the display steps).

    Raises:
        UnreadableFileError: the file is missing or not DICOM (TruncatedFileError:
            it was cut short).
        NoPixelDataError: an SR, RT or other object without pixel data.
        WrongModalityError: the modality is not in ``modalities``.
        ImageSizeError: an empty or 1-pixel-wide image, or a bad frame index.
        CorruptPixelDataError: pixel data that cannot be decoded.
        VOIError: a VOI LUT that contradicts its descriptor, or a VOI LUT or window
            that turns the image into one flat grey.
        InputError: any other problem with the values (all of the above are
            subclasses of it).
    """
    path = _source_path(source)
    where = f"{path}: " if path else ""
    ds = read_dataset(source)
    _require_pixels(ds, path)
    _check_modality(ds, modalities, path)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageSizeError(
            f"{where}frame {index} asked for but the object has {n_frames} frame(s)", path=path
        )
    arr = _decode(ds, path, index if n_frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    notes: list[str] = []
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
        if photometric == "PALETTE COLOR":
            # Its pixels index a colour table: a pseudo-colour rendering (an inverted
            # grey palette read a chest as its negative, with seven findings), not the
            # greyscale image a model was trained on.
            raise InputError(f"{where}PALETTE COLOR image: its pixels are indices into a "
                             "colour table (a pseudo-colour rendering), not the greyscale "
                             "image a model reads; send the greyscale original", path=path)
        elif samples == 3 or photometric in _COLOUR:
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise InputError(
                    f"{where}colour image with unexpected shape {arr.shape}", path=path
                )
            # pydicom already converted YBR_* to RGB while decoding.
            values = _luminance(arr, float(2**bits - 1))
            voi, window, inverted = "colour", None, False
        else:
            if arr.ndim != 2:
                raise InputError(
                    f"{where}expected a 2D monochrome frame, decoded shape {arr.shape}", path=path
                )
            padding = _padding_mask(arr, ds)
            try:
                modality_values = _modality(arr, ds)
            except InputError as exc:
                raise InputError(f"{where}{exc}", path=path) from None
            if padding is not None:  # keep padding out of min-max and the LUT
                modality_values[padding] = modality_values[~padding].min()
            values, voi, window = _voi(modality_values, ds, path)
            if voi != "minmax":
                _check_voi(modality_values, values, padding, _voi_name(ds, voi, window), path)
            note = (_window_note(ds, window, modality_values) if window is not None
                    else "") or (_clip_note(ds, _voi_name(ds, voi, window), values, padding)
                                 if voi in ("window", "lut") else "")
            if note:
                notes.append(note)
            inverted = photometric == "MONOCHROME1"
            if inverted:
                values = 1.0 - values
            if padding is not None:
                values[padding] = 0.0  # padding shows black
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{where}cannot convert the pixel values for display "
            f"({exc.__class__.__name__}: {exc}); check the image pixel module attributes",
            path=path,
        ) from exc
    pixels = np.ascontiguousarray(values, dtype=np.float32)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise ImageSizeError(f"{where}image of shape {pixels.shape} is too small", path=path)
    header = _header_of(ds, source)
    pixels, upright_from = _upright(pixels, header.get("PatientOrientation"))
    if upright_from:
        header.PatientOrientation = ["L", "F"]
    return Image2D(
        pixels=pixels,
        header=header,
        photometric=photometric,
        inverted=inverted,
        voi=voi,
        window=window,
        frame_index=index,
        number_of_frames=n_frames,
        path=path,
        upright_from=upright_from,
        notes=tuple(notes),
    )


def _upright(pixels: npt.NDArray[np.float32], orientation: Any
             ) -> tuple[npt.NDArray[np.float32], str]:
    """``pixels`` turned so that the patient's left is on the right and the feet down
    (Patient Orientation ``L\\F``, how radiographs are read and models trained: a
    portable image stored on its side read as seven findings), and the orientation they
    had (``""`` when unchanged). Only the main direction of each value counts (``FL``
    is ``F``); one that is not left-right and head-feet (a lateral view's ``A``/``P``)
    is left as it is."""
    try:
        row, col = (str(v).strip().upper()[:1] for v in orientation)
    except (TypeError, ValueError):
        return pixels, ""
    across, down = ("L", "R"), ("H", "F")
    turned = pixels
    if row in down and col in across:  # on its side: rows become columns
        turned, row, col = pixels.T, col, row
    elif row not in across or col not in down or (row, col) == ("L", "F"):
        return pixels, ""
    if row == "R":
        turned = turned[:, ::-1]
    if col == "H":
        turned = turned[::-1, :]
    given = "\\".join(str(v).strip().upper() for v in orientation)
    return np.ascontiguousarray(turned), given


def pixel_aspect(image: Image2D) -> float:
    """The height of one of ``image.pixels``' pixels over its width: row spacing over
    column spacing of Pixel Spacing, else Imager Pixel Spacing (an enhanced object's
    shared Pixel Measures too), else Pixel Aspect Ratio; inverted when the pixels were
    turned on their side to be upright. 1.0 for square pixels, and when the header does
    not say or says something unusable (within 1 %, or beyond 10:1)."""
    header = image.header
    ratio = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value in (None, ""):
            with_measures = header.get("SharedFunctionalGroupsSequence")
            try:
                value = with_measures[0].PixelMeasuresSequence[0].get(keyword) \
                    if with_measures else None
            except (AttributeError, IndexError, KeyError, TypeError):
                value = None
        ratio = _ratio(value)
        if ratio is not None:
            break
    if ratio is None:
        ratio = _ratio(header.get("PixelAspectRatio"))
    if ratio is None or abs(ratio - 1.0) <= 0.01 or not 0.1 <= ratio <= 10.0:
        return 1.0
    orientation = image.upright_from.split("\\")[0][:1]
    return 1.0 / ratio if orientation in ("H", "F") else ratio  # turned on its side


def _ratio(value: Any) -> float | None:
    """First over second of a two-valued attribute (``[0.2, 0.1]`` -> 2.0), or None."""
    try:
        first, second = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(first) and math.isfinite(second)) or first <= 0 or second <= 0:
        return None
    return first / second


# --------------------------------------------------------------------------- CT volumes


def _floats(ds: Dataset, keyword: str, n: int, path: Path | None,
            frame: int | None = None) -> npt.NDArray[np.float64]:
    where = _where(path, frame)
    value = ds.get(keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value else None
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (n,) or not np.all(np.isfinite(out)):
        raise SeriesError(
            f"{where}{keyword} is missing or invalid ({value!r}); a volume needs it on every "
            f"{'frame' if frame else 'slice'}",
            path=path,
        )
    return out


def _where(path: Path | None, frame: int | None = None) -> str:
    """The start of a message about a file (and a frame of it): "path: frame 3: "."""
    return (f"{path}: " if path else "") + (f"frame {frame}: " if frame else "")


def number_of_frames(ds: Dataset) -> int:
    """The frames an image object holds (1 when Number of Frames is absent or odd)."""
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def _is_enhanced(ds: Dataset) -> bool:
    """Whether ``ds`` keeps its geometry in functional groups (Enhanced and Legacy Converted
    Enhanced CT/MR, and the like) rather than in top-level attributes."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


_RESCALE = ("RescaleIntercept", "RescaleSlope")
# CT Image, Enhanced CT and Legacy Converted Enhanced CT Image Storage
_CT_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",
})


# Where each attribute a slice needs lives in an enhanced object's functional groups.
_FRAME_ATTRIBUTES = (
    ("PlanePositionSequence", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PixelValueTransformationSequence", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept"),
)


def _frame_geometry(ds: Dataset, index: int) -> Dataset:
    """Position, orientation, pixel spacing and rescale of frame ``index`` (0-based) of an
    enhanced object, as the top-level attributes of a single-frame slice would hold them:
    the frame's own functional groups first, then the shared ones (PS3.3 C.7.6.16); a
    rescale neither holds, from the top level, where some converters leave it."""
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame):
        groups.append(per_frame[index])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    out = Dataset()
    for sequence, keyword in _FRAME_ATTRIBUTES:
        for group in groups:
            items = group.get(sequence)
            if items and keyword in items[0]:
                setattr(out, keyword, items[0][keyword].value)
                break
    for keyword in _RESCALE:
        if keyword not in out and keyword in ds:
            setattr(out, keyword, ds[keyword].value)
    return out


def _missing_rescale(ds: Dataset, geometry: Dataset) -> list[str]:
    """The Rescale attributes a CT slice (``geometry``: the slice, or a frame's
    :func:`_frame_geometry`) lacks; ``[]`` when it has both, has a Modality LUT instead,
    or is not a CT. They are Type 1 in the CT Image module (PS3.3 C.8.2.1) and in the
    CT Pixel Value Transformation of Enhanced CT (C.8.15.3.10): without them the stored
    values are not HU, and a volume model's output is nonsense."""
    if not (str(ds.get("Modality", "")).strip().upper() == "CT"
            or str(ds.get("SOPClassUID", "")) in _CT_CLASSES) \
            or "ModalityLUTSequence" in geometry:
        return []
    # a value of 0 is present (and falsy)
    return [k for k in _RESCALE if (v := geometry.get(k)) is None or str(v).strip() == ""]


def _orientation(ds: Dataset) -> Any:
    """Image Orientation (Patient) of a slice, or of an enhanced object's first frame."""
    if _is_enhanced(ds):
        return _frame_geometry(ds, 0).get("ImageOrientationPatient")
    return ds.get("ImageOrientationPatient")


@dataclass
class _Slice:
    position: float  # along the slice normal, mm
    ipp: npt.NDArray[np.float64]
    path: Path | None
    header: Dataset
    frame: int | None  # 1-based, in a multi-frame object
    hu: npt.NDArray[np.float32]

    @property
    def label(self) -> str:
        return f"{self.path} frame {self.frame}" if self.frame else str(self.path)


def load_ct_volume(
    sources: Sequence[Source],
    *,
    modalities: Iterable[str] | None = ("CT",),
    min_slices: int = 2,
    max_gap_ratio: float = 1.5,
    spacing_tolerance: float = 0.01,
) -> Volume:
    """Load the slices of one series as a volume in HU, sorted along the slice normal.

    A source is a single-frame slice, or an enhanced multi-frame object (Enhanced CT,
    Legacy Converted Enhanced CT) whose frames are the slices, placed by their per-frame
    functional groups (Plane Position, Plane Orientation, Pixel Measures, Pixel Value
    Transformation).

    Slices are ordered by ``ImagePositionPatient . (row x column)`` (never by
    InstanceNumber or frame order). Spacing between slices is checked: when it varies by
    more than ``spacing_tolerance`` (relative) the slices are linearly
    interpolated onto a uniform grid from the first to the last position,
    with the spacing closest to the median that divides that span
    (``Volume.resampled``). Gantry tilt is not corrected: slices are stacked
    along the normal and the in-plane offset between them is ignored.

    Args:
        sources: file paths or datasets of one series (any order).
        modalities: accepted Modality values; ``None`` accepts any.
        min_slices: fewest slices (frames included) accepted.
        max_gap_ratio: a gap between consecutive slices larger than this
            multiple of the median spacing is refused as missing slices. The
            default (1.5) refuses any missing slice; raise it (e.g. 2.5) to
            interpolate over isolated missing slices instead.
        spacing_tolerance: relative spacing variation treated as uniform.

    Raises:
        UnreadableFileError, NoPixelDataError, WrongModalityError,
        CorruptPixelDataError, ImageSizeError: as for :func:`load_image_2d`,
            for any slice.
        InputError: a CT slice (or frame) without Rescale Intercept/Slope, or whose
            modality LUT cannot be applied.
        SeriesError: fewer than ``min_slices``, slices of several series,
            mixed orientations, sizes or pixel spacings, missing position or
            orientation, duplicate positions (also several stacks or phases in one
            multi-frame object), a multi-frame object without functional groups, or
            gaps larger than ``max_gap_ratio`` times the typical spacing.
    """
    slices: list[_Slice] = []
    ref: dict[str, Any] = {}
    for source in sources:
        path = _source_path(source)
        where = f"{path}: " if path else ""
        ds = read_dataset(source)
        _require_pixels(ds, path)
        _check_modality(ds, modalities, path)
        n_frames = number_of_frames(ds)
        enhanced = _is_enhanced(ds)
        if n_frames > 1 and not enhanced:
            raise SeriesError(
                f"{where}a multi-frame object without per-frame positions (functional "
                "groups) cannot be placed as CT slices; send the series as single-frame "
                "images or as an Enhanced CT object",
                path=path,
            )
        uid = str(ds.get("SeriesInstanceUID", ""))
        size = (int(ds.Rows), int(ds.Columns))
        if ref and uid != ref["uid"]:
            raise SeriesError(
                f"{where}slices come from several series ({ref['uid']} and {uid}); "
                "select one series first",
                path=path,
            )
        if ref and size != ref["size"]:
            raise SeriesError(
                f"{where}mixed image sizes in series {uid} ({ref['size']} vs {size})",
                path=path,
            )
        arr = _decode(ds, path, None)
        if arr.shape != (n_frames, *size) and arr.shape != size:
            raise SeriesError(
                f"{where}expected {'frames of ' if n_frames > 1 else ''}a 2D monochrome "
                f"slice, decoded shape {arr.shape}",
                path=path,
            )
        planes = arr.reshape(n_frames, *size)
        header = _header_of(ds, source)
        for i, plane in enumerate(planes):
            frame = i + 1 if enhanced else None
            at = _where(path, frame)
            geometry = _frame_geometry(ds, i) if enhanced else ds
            iop = _floats(geometry, "ImageOrientationPatient", 6, path, frame)
            ipp = _floats(geometry, "ImagePositionPatient", 3, path, frame)
            spacing = _floats(geometry, "PixelSpacing", 2, path, frame)
            normal = np.cross(iop[:3], iop[3:])
            if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
                raise SeriesError(f"{at}ImageOrientationPatient is not orthonormal", path=path)
            if not ref:
                ref = {"iop": iop, "normal": normal, "size": size, "spacing": spacing,
                       "uid": uid}
            elif not np.allclose(iop, ref["iop"], atol=1e-3):
                raise SeriesError(
                    f"{at}mixed slice orientations in series {uid} "
                    f"({ref['iop'].round(4).tolist()} vs {iop.round(4).tolist()}); "
                    "a volume needs parallel slices",
                    path=path,
                )
            elif not np.allclose(spacing, ref["spacing"], rtol=1e-3, atol=1e-4):
                raise SeriesError(
                    f"{at}mixed pixel spacings in series {uid} "
                    f"({ref['spacing'].tolist()} vs {spacing.tolist()})",
                    path=path,
                )
            if missing := _missing_rescale(ds, geometry):
                which = ("Rescale Intercept/Slope" if len(missing) == 2 else
                         " ".join(re.findall("[A-Z][a-z]+", missing[0])))
                raise InputError(
                    f"{at}CT image of series {uid} has no {which} (Type 1 for CT"
                    + (", in the Pixel Value Transformation functional group, per-frame or "
                       "shared" if enhanced else "")
                    + "); Hounsfield units cannot be known; resend it from the modality",
                    path=path)
            try:
                hu = _modality(plane, geometry)
            except Exception as exc:
                raise InputError(
                    f"{at}cannot apply the modality LUT / rescale ({exc}); check Rescale "
                    "Slope/Intercept",
                    path=path,
                ) from exc
            slices.append(_Slice(float(np.dot(ipp, ref["normal"])), ipp, path, header, frame,
                                 hu))
        del arr, planes
    if len(slices) < min_slices:
        raise SeriesError(
            f"a volume needs at least {min_slices} slices, got {len(slices)}; "
            "send the complete series"
        )

    slices.sort(key=lambda s: s.position)
    positions = np.asarray([s.position for s in slices], dtype=np.float64)
    diffs = np.diff(positions)
    uid = str(ref["uid"])
    if np.any(diffs < 1e-3):
        i = int(np.argmin(diffs))
        several = ("; one multi-frame object with several stacks, phases or energies is not "
                   "supported: send one of them" if slices[i].frame else "")
        raise SeriesError(
            f"series {uid} has two slices at the same position ({positions[i]:.3f} mm: "
            f"{slices[i].label} and {slices[i + 1].label}); remove duplicates or select one "
            f"series{several}"
        )
    nominal = float(np.median(diffs))
    worst = int(np.argmax(diffs))
    if diffs[worst] > max_gap_ratio * nominal:
        missing = round(diffs[worst] / nominal) - 1
        raise IncompleteSeriesError(
            f"series {uid} has a gap of {diffs[worst]:.2f} mm between slices at "
            f"{positions[worst]:.2f} and {positions[worst + 1]:.2f} mm (typical spacing "
            f"{nominal:.2f} mm): about {max(missing, 1)} slice(s) missing; "
            "resend the complete series"
        )
    missing_total = int(sum(max(round(d / nominal) - 1, 0) for d in diffs))
    stack = np.stack([s.hu for s in slices])
    resampled = False
    span = float(positions[-1] - positions[0])
    step = span / (len(positions) - 1)  # the mean spacing when it is uniform
    if np.any(np.abs(diffs - nominal) > spacing_tolerance * nominal):
        # Uniform grid from the first to the last slice, close to the median spacing.
        n = max(round(span / nominal), 1) + 1
        step = span / (n - 1)
        grid = positions[0] + np.arange(n) * step
        upper = np.clip(np.searchsorted(positions, grid, side="right"), 1, len(positions) - 1)
        lower = upper - 1
        t = ((grid - positions[lower]) / (positions[upper] - positions[lower])).clip(0, 1)
        t = t.astype(np.float32)[:, None, None]
        stack = stack[lower] * (1 - t) + stack[upper] * t
        resampled = True
    origin = tuple(float(v) for v in slices[0].ipp)
    iop = ref["iop"]
    nrm = ref["normal"]
    return Volume(
        array=np.ascontiguousarray(stack, dtype=np.float32),
        spacing=(step, float(ref["spacing"][0]), float(ref["spacing"][1])),
        origin=(origin[0], origin[1], origin[2]),
        direction=(
            (float(iop[0]), float(iop[1]), float(iop[2])),
            (float(iop[3]), float(iop[4]), float(iop[5])),
            (float(nrm[0]), float(nrm[1]), float(nrm[2])),
        ),
        paths=[s.path for s in slices],
        series_instance_uid=uid,
        headers=[s.header for s in slices],
        frames=[s.frame for s in slices],
        resampled=resampled,
        missing_slices=missing_total,
    )


# --------------------------------------------------------------------------- series selection


def _is_localizer(ds: Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).upper() == "LOCALIZER" for v in image_type)


def _is_original(ds: Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return bool(image_type) and str(image_type[0]).upper() == "ORIGINAL"


def _is_axial(ds: Dataset) -> bool:
    """Slices whose normal (Image Orientation (Patient), row x column) is within ~25
    degrees of the patient's feet-head axis: axial, gantry tilt included."""
    iop = _orientation(ds)
    try:
        a, b, _, d, e, _ = (float(v) for v in iop)
    except (TypeError, ValueError):
        return False
    return abs(a * e - b * d) >= 0.9


# DX, mammography and intra-oral X-ray "for processing": raw detector values, before the
# modality's own image processing; models are trained on the images people read.
_FOR_PROCESSING_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.3.1",
})


# Why such an image is not read: in a study's notes beside its presentation image, and in
# the refusal of a study that holds no other.
_FOR_PROCESSING_NOTE = "for processing: raw detector values"


def _for_presentation(ds: Dataset) -> bool:
    """Not a "for processing" image (by SOP class or Presentation Intent Type)."""
    return (str(ds.get("SOPClassUID", "")) not in _FOR_PROCESSING_CLASSES
            and str(ds.get("PresentationIntentType", "")).upper() != "FOR PROCESSING")


def _is_frontal(ds: Dataset) -> bool:
    """A PA or AP projection (View Position): what chest X-ray models are trained on,
    rather than a lateral view of the same study."""
    return _view(ds) in ("PA", "AP")


# View Code Sequence (0054,0220) concepts that name a View Position term (CID 4010 "DX
# View", SNOMED CT codes; a retired SNOMED RT code of the same concept, as older devices
# send, e.g. SRT R-10236 "left lateral", compares equal through pydicom's mapping).
# "frontal" says neither PA nor AP: it counts as a view that does not say.
_VIEW_TERMS: tuple[tuple[Code, str], ...] = (
    (codes.SCT.PosteroAnterior, "PA"),      # 272479007
    (codes.SCT.AnteroPosterior, "AP"),      # 399348003
    (codes.SCT.LeftLateral, "LL"),          # 399173006
    (codes.SCT.RightLateral, "RL"),         # 399198007
    (codes.SCT.LateralProjection, "LATERAL"),  # 399067008
    (codes.SCT.Frontal, ""),                # 399033003
)


@functools.cache
def _dx_views() -> tuple[Code, ...]:
    """Every concept of CID 4010 (DX View): an oblique, a lateral-medial view..."""
    return tuple(Collection("CID4010").concepts.values())


@functools.lru_cache(maxsize=512)
def _coded_term(value: str, scheme: str, kind: str) -> str | None:
    """The term a code of a ``kind`` ("view" or "region") stands for: its entry in
    :data:`_VIEW_TERMS` / :data:`_REGION_TERMS`, else the upper-case meaning of the
    concept of CID 4010 / CID 4031 it is; None for a code of neither."""
    terms, others = (_VIEW_TERMS, _dx_views()) if kind == "view" else \
        (_REGION_TERMS, _regions())
    code = Code(value, scheme, "")
    for ref, term in terms:
        if code == ref:
            return term
    for ref in others:
        if code == ref:
            return ref.meaning.upper()
    return None


def _first_code(ds: Dataset, keyword: str) -> tuple[str, str, str] | None:
    """(value, scheme, meaning) of the first item of a code sequence, or None."""
    try:
        item = (ds.get(keyword) or [None])[0]
    except (TypeError, IndexError):
        return None
    if not isinstance(item, Dataset):
        return None
    value = str(item.get("CodeValue") or item.get("LongCodeValue") or "").strip()
    scheme = str(item.get("CodingSchemeDesignator") or "").strip().upper()
    if not value or not scheme:
        return None
    return value, scheme, str(item.get("CodeMeaning") or "").strip()


def _coded_view(ds: Dataset) -> tuple[str, str]:
    """(View Position term, code meaning) of the image's View Code Sequence: ``LL`` for
    "left lateral", an upper-case meaning for another DX view ("LEFT POSTERIOR OBLIQUE");
    ``("", ...)`` for "frontal" or a code of no DX view, ``("", "")`` without one."""
    coded = _first_code(ds, "ViewCodeSequence")
    if coded is None:
        return "", ""
    value, scheme, meaning = coded
    return _coded_term(value, scheme, "view") or "", meaning


def _view(ds: Dataset) -> str:
    """View Position's first word (some devices write "AP SUPINE" or "PA_ERECT"); when
    it is empty, the view the View Code Sequence names (see :func:`_coded_view`)."""
    words = re.split(r"[\s_]+", str(ds.get("ViewPosition", "")).strip().upper())
    if words and words[0]:
        return words[0]
    return _coded_view(ds)[0]


def _views_said(ds: Dataset) -> tuple[str, str]:
    """(View Position's first word, the View Code Sequence's view term); '' where absent."""
    words = re.split(r"[\s_]+", str(ds.get("ViewPosition", "")).strip().upper())
    return (words[0] if words else ""), _coded_view(ds)[0]


def _view_text(ds: Dataset) -> str:
    """The image's view for a message: ``LL``, or ``LL (View Code Sequence: left
    lateral)`` when the code gave it, or ``PA, its View Code Sequence left lateral``
    when the two say different views."""
    view = _view(ds)
    position, coded = _views_said(ds)
    if position and coded and coded != position:
        return f"{position}, its View Code Sequence {_coded_view(ds)[1] or coded}"
    if view and not str(ds.get("ViewPosition", "") or "").strip():
        meaning = _coded_view(ds)[1]
        return f"{view} (View Code Sequence{': ' + meaning if meaning else ''})"
    return view


def _view_fits(ds: Dataset, views: set[str]) -> bool:
    """Whether an image's view (View Position, else View Code Sequence) is one of
    ``views`` (any when there are none, or when the image does not say: many radiographs
    leave View Position empty)."""
    if not views:
        return True
    # both must fit where both are given: a PA whose View Code Sequence says left lateral
    # may well be a lateral (View Position is often a technologist's default)
    return all(v in views for v in _views_said(ds) if v)


# Anatomic Region Sequence (0008,2218) concepts of the chest, read when Body Part Examined
# is empty: SNOMED CT 816094009 "Chest" (CID 4031), 51185008 "Thoracic structure" (SNOMED
# RT T-D3000 "Chest" of older devices) and 43799004 "Thoracic cavity structure" (T-D3200).
_REGION_TERMS: tuple[tuple[Code, str], ...] = (
    (codes.SCT.Chest, "CHEST"),
    (codes.SCT.ThoracicStructure, "CHEST"),
    (codes.SCT.ThoracicCavityStructure, "CHEST"),
)


@functools.cache
def _regions() -> tuple[Code, ...]:
    """Every concept of CID 4031 (Common Anatomic Regions): a knee, a hand..."""
    return tuple(Collection("CID4031").concepts.values())


def _body_part(ds: Dataset) -> tuple[str, str]:
    """(the image's body part, where it came from): Body Part Examined in upper case, else
    what its Anatomic Region Sequence names (``CHEST`` for a chest code, the upper-case
    meaning of another common region: ``KNEE``), with ``"Anatomic Region Sequence:
    Knee"`` as the source; ``("", "")`` when neither says (both are optional)."""
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body:
        return body, ""
    coded = _first_code(ds, "AnatomicRegionSequence")
    if coded is None:
        return "", ""
    value, scheme, meaning = coded
    term = _coded_term(value, scheme, "region")
    return (term, f"Anatomic Region Sequence: {meaning or value}") if term else ("", "")


def _image_rank(ds: Dataset) -> tuple[int, int]:
    return int(_for_presentation(ds)), int(_is_frontal(ds))


def _acquired(ds: Dataset) -> str:
    """When an image was made, as a string that sorts in time order (``""`` when it does
    not say): Acquisition DateTime, else Acquisition Date and Time, else Content Date
    and Time. Used to break ties, never to choose."""
    value = str(ds.get("AcquisitionDateTime", "") or "").strip()
    if not value:
        for date, time_ in (("AcquisitionDate", "AcquisitionTime"),
                            ("ContentDate", "ContentTime")):
            day = str(ds.get(date, "") or "").strip()
            if day:
                value = day + str(ds.get(time_, "") or "").strip()
                break
    digits = re.sub(r"[^0-9.]", "", value.split("+")[0].split("-")[0])
    whole, _, fraction = digits.partition(".")
    return whole.ljust(14, "0") + "." + fraction.ljust(6, "0") if whole else ""


def _number(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def _image_order(ds: Dataset) -> tuple[tuple[int, int], int, str]:
    """An image's place in its series, best first when sorted in reverse: its rank,
    then the lowest Instance Number, then the SOP Instance UID (never arrival order)."""
    return (_image_rank(ds), -_number(ds, "InstanceNumber"),
            str(ds.get("SOPInstanceUID", "")))


def _patient_of(ds: Dataset) -> tuple[str, str]:
    return (str(ds.get("PatientID", "") or "").strip(),
            str(ds.get("IssuerOfPatientID", "") or "").strip())


def check_one_patient(sources: Iterable[Source]) -> None:
    """Refuse a study whose instances name more than one patient: different Patient IDs,
    or the same Patient ID from different Issuers of Patient ID (an instance that names
    no issuer agrees with any issuer of its ID). Unreadable sources are left to
    :func:`select_series` to report.

    Raises:
        PatientMismatchError: the IDs (with their issuers) in the message, never names.
    """
    seen: dict[str, set[str]] = {}
    for src in sources:
        try:
            ds = src if isinstance(src, Dataset) else read_dataset(src, stop_before_pixels=True)
        except InputError:
            continue
        pid, issuer = _patient_of(ds)
        issuers = seen.setdefault(pid, set())
        if issuer:
            issuers.add(issuer)
    patients = [f"{pid or '(empty)'}" + (f" (issuer {issuer})" if issuer else "")
                for pid in sorted(seen) for issuer in (sorted(seen[pid]) or [""])]
    if len(patients) > 1:
        raise PatientMismatchError(
            f"the study's instances carry {len(patients)} Patient IDs "
            f"({', '.join(patients)}): one Study Instance UID holds images of different "
            "patients (a merge or registration error); fix the study on the sending "
            "system and send it again; not run")


@dataclass(frozen=True)
class StudyImage:
    """One image of a study a classifier reads: a single-frame instance, or one frame
    of a multi-frame one (``frame``: 0-based, None for a single-frame instance).
    ``label`` names it for people: ``series 2 image 1 (PA) frame 2 of 2``."""

    source: Source
    header: Dataset
    frame: int | None
    label: str


def _series_label(header: Dataset) -> str:
    number = str(header.get("SeriesNumber", "") or "").strip()
    return f"series {number}" if number else f"series {header.get('SeriesInstanceUID', '?')}"


def _image_label(header: Dataset, frame: int | None, frames: int) -> str:
    number = str(header.get("InstanceNumber", "") or "").strip()
    view = _view(header)
    text = (f"{_series_label(header)} "
            + (f"image {number}" if number else f"instance {header.get('SOPInstanceUID', '?')}")
            + (f" ({view})" if view else ""))
    return text + (f" frame {frame + 1} of {frames}" if frame is not None else "")


def study_images(selected: SelectedSeries, limit: int,
                 too_small: Callable[[int, int], str] | None = None,
                 ) -> tuple[list[StudyImage], list[str]]:
    """The images of a study a classifier reads, and what it leaves unread, why.

    Every image (every frame) of the chosen series and of each other eligible series
    (:attr:`SelectedSeries.also_eligible`), best series first, that ranks with the best
    of them (images for presentation before "for processing" ones, a frontal view
    before a lateral or one that does not say), at most ``limit``. A series of slices
    (a CT beside the radiographs) is left out, and so is an image for which
    ``too_small(rows, columns)`` (the model's size check) gives a reason. The second
    list names each image not read with the reason, for the result's notes.

    Raises:
        ImageSizeError: every image is too small for the model.
    """
    candidates: list[StudyImage] = []
    unread: list[str] = []
    small: list[str] = []
    for k, series in enumerate([selected, *selected.also_eligible]):
        frames = sum(number_of_frames(h) for h in series.headers)
        if k and frames > 1 and (
                series.modality.upper() in {"CT", "MR", "PT", "NM"}
                or len({tuple(h.get("ImagePositionPatient") or ()) for h in series.headers}) > 1):
            unread.append(f"{_series_label(series.headers[0])} (a stack of {frames} "
                          f"{series.modality or 'image'} slices, not a radiograph)")
            continue
        for source, header in zip(series.sources, series.headers, strict=True):
            n = number_of_frames(header)
            rows, columns = _number(header, "Rows"), _number(header, "Columns")
            why = too_small(rows, columns) if too_small is not None and rows and columns \
                else ""
            for frame in range(n) if n > 1 else [None]:
                label = _image_label(header, frame, n)
                if why:
                    small.append(f"{label} ({why})")
                else:
                    candidates.append(StudyImage(source, header, frame, label))
    if not candidates:
        raise ImageSizeError(f"no image of the study is large enough for the model: "
                             f"{'; '.join(small)}; send the full-size image")
    unread.extend(small)
    best = max(_image_rank(c.header) for c in candidates)
    kept: list[StudyImage] = []
    for c in candidates:
        rank = _image_rank(c.header)
        if rank == best:
            kept.append(c)
        elif best[0] and not rank[0]:
            unread.append(f"{c.label} ({_FOR_PROCESSING_NOTE})")
        else:
            unread.append(f"{c.label} (not a frontal view)")
    over = kept[limit:]
    if over:
        unread.append(f"{', '.join(c.label for c in over)} (more than the {limit} images "
                      "a study is read for: the pipeline's series.max_images)")
    return kept[:limit], unread


def select_series(
    sources: Mapping[str | PathLike[str], Dataset] | Iterable[Source],
    rules: SeriesRules,
) -> SelectedSeries:
    """Group instances by Series Instance UID and choose the series the rules accept.

    A series is eligible when its modality, SOP class, body part and view position
    are in the rules' lists (empty lists accept anything). The body part is Body Part
    Examined, else what the Anatomic Region Sequence names (a chest code counts as
    CHEST); a series that names neither is accepted (both are optional: many chest
    images carry neither) but ranked after those that match, and one that names another
    body part is refused. The view is View Position, else what the View Code Sequence
    names ("left lateral" is LL); an image that says neither is accepted, images of
    another view are left out. It holds images
    (Rows present), it is not a localizer/scout (ImageType LOCALIZER) and it
    has at least ``rules.min_instances`` images (the frames of a multi-frame object
    count one by one). A study whose eligible images are all "for processing" (raw
    detector values: a DX, mammography or intra-oral "For Processing" SOP class, or
    Presentation Intent Type FOR PROCESSING) is refused, unless the rules'
    ``sop_class_uids`` name such a class. Among eligible series the
    choice prefers a matching body part, then images "for presentation" to raw "for
    processing" ones, then axial slices (a study's sagittal and coronal series are for
    reading; volume models are trained on axial), then a frontal (PA or AP) view to a
    lateral one, then ORIGINAL images, then the most images - so a CT study with a
    scout, an axial series and its reformats picks the axial, and a chest X-ray study
    its PA view. Ties go to the latest series (Acquisition, else Content, date and
    time), then the highest Series Number, then the Series Instance UID: never to the
    order the instances came in. Within the chosen series the same preferences put the
    best image first (``paths[0]``), then the lowest Instance Number. The other eligible
    series, ranked, are in ``also_eligible`` (a classifier reads them too: see
    :func:`study_images`).

    Args:
        sources: a mapping path -> header (e.g. read with
            ``stop_before_pixels=True``), or an iterable of paths and/or
            datasets; paths are read here with ``stop_before_pixels=True``.
            Unreadable files are skipped and reported if nothing matches.
        rules: the pipeline's :class:`~pipeline.settings.SeriesRules`.

    Raises:
        SeriesError: no series is eligible; the message lists every series
            with the reason it was refused.
    """
    items: list[tuple[Path | None, Dataset]] = []
    problems: list[str] = []
    if isinstance(sources, Mapping):
        items = [(Path(p), ds) for p, ds in sources.items()]
    else:
        for src in sources:
            try:
                items.append((_source_path(src), read_dataset(src, stop_before_pixels=True)))
            except InputError as exc:
                problems.append(str(exc))
    groups: dict[str, list[tuple[Path | None, Dataset]]] = {}
    for path, ds in items:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))

    modalities = {m.upper() for m in rules.modalities}
    sop_classes = set(rules.sop_class_uids)
    body_parts = {b.upper() for b in rules.body_parts}
    views = {v.upper() for v in rules.view_positions}
    rejected: dict[str, str] = {}
    near: list[str] = []  # refusals of series of a modality the rules take
    ranked: list[tuple[tuple[Any, ...], str]] = []
    labels: dict[str, str] = {}
    for uid, members in groups.items():
        first = members[0][1]
        modality = str(first.get("Modality", "")).upper()
        sop = str(first.get("SOPClassUID", ""))
        # the first image that names a body part names the series' (most name it in
        # each image, or in none)
        body, body_from = next((b for b in (_body_part(ds) for _, ds in members) if b[0]),
                               ("", ""))
        frames = sum(number_of_frames(ds) for _, ds in members)
        label = (f"series {uid or '(no UID)'} ({modality or '?'}, {len(members)} instance(s)"
                 + (f", {frames} frames)" if frames > len(members) else ")"))
        reason = ""
        if not uid:
            reason = "instances without a Series Instance UID"
        elif modalities and modality not in modalities:
            reason = f"modality {modality or '(missing)'} not in {sorted(modalities)}"
        elif sop_classes and sop not in sop_classes:
            reason = f"SOP class {_describe(first)} not accepted"
        elif not any("Rows" in ds for _, ds in members):
            reason = f"{_describe(first)} holds no images"
        elif all(_is_localizer(ds) for _, ds in members):
            reason = "localizer/scout images"
        elif body_parts and body and body not in body_parts:
            reason = (f"body part {body}" + (f" ({body_from})" if body_from else "")
                      + f" not in {sorted(body_parts)}")
        elif views and not any(_view_fits(ds, views) for _, ds in members):
            seen = sorted({_view_text(ds) for _, ds in members})
            reason = f"view position {'/'.join(seen)} not in {sorted(views)}"
        elif misfit := _description_misfit(first, rules) or _thickness_misfit(first, rules):
            reason = misfit
        else:
            usable = [m for m in members if "Rows" in m[1] and not _is_localizer(m[1])
                      and _view_fits(m[1], views)]
            images = sum(number_of_frames(ds) for _, ds in usable)
            if images < rules.min_instances:
                reason = f"{images} image(s), fewer than the {rules.min_instances} required"
            else:
                groups[uid] = usable
                key = (
                    int(bool(body_parts) and body in body_parts),
                    int(any(_for_presentation(ds) for _, ds in usable)),
                    int(all(_is_axial(ds) for _, ds in usable)),
                    int(any(_is_frontal(ds) for _, ds in usable)),
                    int(all(_is_original(ds) for _, ds in usable)),
                    images,
                )
                # ties (two PA series of one study) broken the same way whatever the
                # order the images came in: the latest, then the highest Series Number
                tie = (max(_acquired(ds) for _, ds in usable),
                       max(_number(ds, "SeriesNumber") for _, ds in usable), uid)
                key = (*key, tie)  # type: ignore[assignment]
                ranked.append((key, uid))
                labels[uid] = label
        if reason:
            rejected[uid] = f"{label}: {reason}"
            if not (modalities and modality not in modalities):
                near.append(rejected[uid])
    if ranked and not any(key[1] for key, _ in ranked) \
            and not sop_classes & _FOR_PROCESSING_CLASSES:
        # Only raw detector images: a model reads the images people read (a presentation
        # image is preferred where there is one; named in the notes, see study_images).
        # Rules that name a "for processing" SOP class take them.
        for _, uid in ranked:
            rejected[uid] = (f"{labels[uid]}: {_FOR_PROCESSING_NOTE}, not for presentation; "
                             "send the For Presentation image")
            near.append(rejected[uid])
        ranked = []
    if not ranked:
        details = list(rejected.values()) + problems
        wanted = (
            f"modalities={sorted(modalities) or 'any'}, "
            f"body parts={sorted(body_parts) or 'any'}, "
            f"SOP classes={sorted(sop_classes) or 'any'}, min instances={rules.min_instances}"
            + (f", view positions={sorted(views)}" if views else "")
            + (f", series descriptions={rules.series_descriptions}"
               if rules.series_descriptions else "")
            + (f", not {rules.exclude_series_descriptions}"
               if rules.exclude_series_descriptions else "")
            + (f", slice thickness {rules.slice_thickness_mm[0]:g}-"
               f"{rules.slice_thickness_mm[1]:g} mm" if rules.slice_thickness_mm else "")
        )
        raise SeriesError(
            f"no series matches the model's rules ({wanted}); "
            + ("; ".join(details) if details else "no instances were given"),
            near=near,
        )
    ranked.sort(key=lambda r: r[0], reverse=True)
    best = ranked[0][1]
    for _, uid in ranked[1:]:
        rejected[uid] = f"series {uid}: eligible but ranked after {best}"

    def selected(uid: str, **extra: Any) -> SelectedSeries:
        # The best image first: a classifier starts with it (a PA before the lateral).
        chosen = sorted(groups[uid], key=lambda m: _image_order(m[1]), reverse=True)
        first = chosen[0][1]
        return SelectedSeries(
            series_instance_uid=uid,
            modality=str(first.get("Modality", "")),
            sop_class_uid=str(first.get("SOPClassUID", "")),
            body_part=str(first.get("BodyPartExamined", "")),
            description=str(first.get("SeriesDescription", "")),
            paths=[p for p, _ in chosen],
            headers=[ds for _, ds in chosen],
            **extra,
        )

    return selected(best, rejected=rejected,
                    also_eligible=[selected(uid) for _, uid in ranked[1:]])


def _description_misfit(ds: Dataset, rules: SeriesRules) -> str:
    """Why a series' description keeps it from ``rules`` ('' when it does not)."""
    if not (rules.series_descriptions or rules.exclude_series_descriptions):
        return ""
    text = str(ds.get("SeriesDescription", "") or "").strip()
    folded = text.casefold()
    for pattern in rules.exclude_series_descriptions:
        if fnmatch.fnmatchcase(folded, pattern.casefold()):
            return f"description {text!r} excluded ({pattern!r})"
    if rules.series_descriptions and not any(
            fnmatch.fnmatchcase(folded, p.casefold()) for p in rules.series_descriptions):
        return f"description {text!r} matches none of {rules.series_descriptions}"
    return ""


def _thickness_misfit(ds: Dataset, rules: SeriesRules) -> str:
    """Why a series' slice thickness keeps it from ``rules`` ('' when it does not, or
    when its images do not say)."""
    thickness = _slice_thickness(ds) if rules.slice_thickness_mm is not None else None
    if thickness is None or rules.slice_thickness_mm is None:
        return ""
    low, high = rules.slice_thickness_mm
    return "" if low <= thickness <= high else \
        f"slice thickness {thickness:g} mm, not {low:g}-{high:g} mm"


def _slice_thickness(ds: Dataset) -> float | None:
    """Slice Thickness in mm: the image's, or an enhanced object's shared Pixel Measures."""
    value = ds.get("SliceThickness")
    if value in (None, ""):
        try:
            value = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        thickness = float(value)
    except (TypeError, ValueError):
        return None
    return thickness if math.isfinite(thickness) and thickness > 0 else None


def series_refusal(
    sources: Mapping[str | PathLike[str], Dataset] | Iterable[Source],
    rules: SeriesRules,
) -> SeriesError | None:
    """The error :func:`select_series` raises for ``sources`` (its ``near`` names the
    series of a modality the rules take), or None when a series suits ``rules``."""
    try:
        select_series(sources, rules)
    except SeriesError as exc:
        return exc
    return None


def series_misfit(
    sources: Mapping[str | PathLike[str], Dataset] | Iterable[Source],
    rules: SeriesRules,
) -> str | None:
    """Why no series of ``sources`` suits ``rules`` (:func:`select_series`'s message), or
    None when one does."""
    refusal = series_refusal(sources, rules)
    return None if refusal is None else str(refusal)
