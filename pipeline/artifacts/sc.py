"""Secondary Capture (RGB) of the heatmap overlay, written with pydicom.

Uncompressed by default; a pipeline may ask for JPEG Baseline (Pillow encodes, pydicom
encapsulates) and for a smaller image (``SecondaryCaptureSpec``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from pipeline.artifacts._common import SeriesInfo, utc_now
from pipeline.artifacts._dicom import (
    copy_patient_study,
    frame_reference,
    new_file_dataset,
    save,
    set_equipment,
    set_series,
    set_times,
)
from pipeline.settings import SecondaryCaptureSpec
from pipeline.types import Artifact

__all__ = ["HEATMAP", "NOT_FOR_DIAGNOSTIC_USE", "build_secondary_capture",
           "write_secondary_capture"]

#: Derivation Description of the classifier's Secondary Capture.
HEATMAP = "AI heatmap overlaid on the source image"
#: Image Comments of every Secondary Capture (a viewer shows it with the image).
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE: made automatically by an AI model"


def build_secondary_capture(
    image: Image.Image,
    source_ds: Dataset,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    when: datetime | None = None,
    encoding: SecondaryCaptureSpec | None = None,
    frame_number: int | None = None,
    derivation: str = HEATMAP,
    sources: Sequence[tuple[Dataset, int | None]] | None = None,
) -> Dataset:
    """Build an SC Image Storage dataset (RGB, 8 bit) of ``image`` in a new series.

    The patient and study modules come from ``source_ds``; the images shown are
    referenced in the Source Image Sequence: ``sources`` (header, 1-based frame or
    None), default ``source_ds`` (at ``frame_number``). ``derivation`` says what the
    image shows (Derivation Description). Burned-in annotation is "NO" (the heatmap
    carries no text). ``encoding`` may scale the image down and compress it
    (JPEG Baseline, YBR_FULL_422, marked lossy); by default it is kept as it is.

    Raises:
        ValueError: when ``source_ds`` has no StudyInstanceUID.
    """
    when = when or utc_now()
    sop_uid = sop_instance_uid or generate_uid()
    ds = new_file_dataset(SecondaryCaptureImageStorage, sop_uid)
    copy_patient_study(source_ds, ds)
    set_series(ds, info, series_uid or generate_uid(), "OT")
    set_equipment(ds, info)
    # Laterality is Type 2C in General Series: copied from the source; left empty
    # (unknown) only when the source does not name its body part either.
    if source_ds.get("BodyPartExamined"):
        ds.BodyPartExamined = source_ds.BodyPartExamined
        if source_ds.get("Laterality"):
            ds.Laterality = source_ds.Laterality
    else:
        ds.Laterality = source_ds.get("Laterality", "")
    ds.ConversionType = "WSD"
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = source_ds.get("PatientOrientation", "")
    set_times(ds, when, source_ds)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation[:1024]
    ds.ImageComments = NOT_FOR_DIAGNOSTIC_USE
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if refs := _source_images(sources if sources is not None
                              else [(source_ds, frame_number)]):
        ds.SourceImageSequence = refs
    spec = encoding or SecondaryCaptureSpec()
    image = _scaled(image.convert("RGB"), spec.max_size)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = image.height, image.width
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if spec.compression == "jpeg":
        _set_jpeg(ds, image, spec.quality)
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()
    return ds


def _source_images(sources: Sequence[tuple[Dataset, int | None]]) -> list[Dataset]:
    """One Source Image item per instance shown (in order), naming the frames shown of
    a multi-frame one (where its SOP class lets a reference name them)."""
    items: dict[str, Dataset] = {}
    frames: dict[str, list[int]] = {}
    for src, number in sources:
        if "SOPInstanceUID" not in src or "SOPClassUID" not in src:
            continue
        uid = str(src.SOPInstanceUID)
        if uid not in items:
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            items[uid], frames[uid] = ref, []
        if (frame := frame_reference(src, number)) and frame not in frames[uid]:
            frames[uid].append(frame)
    for uid, ref in items.items():
        if frames[uid]:
            ref.ReferencedFrameNumber = frames[uid] if len(frames[uid]) > 1 else frames[uid][0]
    return list(items.values())


def _scaled(image: Image.Image, max_size: int | None) -> Image.Image:
    """``image`` with its longest side at most ``max_size`` pixels (aspect kept)."""
    longest = max(image.size)
    if max_size is None or longest <= max_size:
        return image
    scale = max_size / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _set_jpeg(ds: Dataset, image: Image.Image, quality: int) -> None:
    """JPEG Baseline pixel data: chroma subsampled horizontally (4:2:2), which PS3.5
    8.2.1 names YBR_FULL_422, and the lossy compression recorded (PS3.3 C.7.6.1.1.5)."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, subsampling=1)  # 1: 4:2:2
    data = buf.getvalue()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([data])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{image.width * image.height * 3 / len(data):.2f}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.DerivationDescription = (f"{ds.DerivationDescription}; JPEG Baseline, quality "
                                f"{quality}")


def write_secondary_capture(
    image: Image.Image,
    source_ds: Dataset,
    path: Path,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    instance_number: int = 1,
    encoding: SecondaryCaptureSpec | None = None,
    when: datetime | None = None,
    frame_number: int | None = None,
    derivation: str = HEATMAP,
    sources: Sequence[tuple[Dataset, int | None]] | None = None,
) -> Artifact:
    """Write the SC file to ``path`` and return its artifact (kind ``sc``); ``when``
    (default: now) is its creation and content time; the rest as in
    :func:`build_secondary_capture`.

    Raises:
        ValueError: when ``source_ds`` has no StudyInstanceUID. OSError: when writing fails.
    """
    ds = build_secondary_capture(
        image, source_ds, info, series_uid=series_uid, instance_number=instance_number,
        encoding=encoding, when=when, frame_number=frame_number, derivation=derivation,
        sources=sources,
    )
    save(ds, path)
    return Artifact(
        kind="sc",
        path=Path(path),
        media_type="application/dicom",
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
