"""Secondary Capture (RGB) of the heatmap overlay, written with pydicom."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from pipeline.artifacts._common import SeriesInfo, utc_now
from pipeline.artifacts._dicom import (
    copy_patient_study,
    new_file_dataset,
    save,
    set_equipment,
    set_series,
)
from pipeline.types import Artifact

__all__ = ["build_secondary_capture", "write_secondary_capture"]


def build_secondary_capture(
    image: Image.Image,
    source_ds: Dataset,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    when: datetime | None = None,
) -> Dataset:
    """Build an SC Image Storage dataset (RGB, 8 bit) of ``image`` in a new series.

    The patient and study modules come from ``source_ds``; the source instance is
    referenced in the Source Image Sequence. Burned-in annotation is "NO" (the
    heatmap carries no text).

    Raises:
        ValueError: when ``source_ds`` has no StudyInstanceUID.
    """
    when = when or utc_now()
    sop_uid = sop_instance_uid or generate_uid()
    ds = new_file_dataset(SecondaryCaptureImageStorage, sop_uid, when)
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
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "AI heatmap overlaid on the source image"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if "SOPInstanceUID" in source_ds and "SOPClassUID" in source_ds:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source_ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = source_ds.SOPInstanceUID
        ds.SourceImageSequence = [ref]
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    return ds


def write_secondary_capture(
    image: Image.Image,
    source_ds: Dataset,
    path: Path,
    info: SeriesInfo,
    *,
    series_uid: str | None = None,
    instance_number: int = 1,
) -> Artifact:
    """Write the SC file to ``path`` and return its artifact (kind ``sc``).

    Raises:
        ValueError: when ``source_ds`` has no StudyInstanceUID. OSError: when writing fails.
    """
    ds = build_secondary_capture(
        image, source_ds, info, series_uid=series_uid, instance_number=instance_number
    )
    save(ds, path)
    return Artifact(
        kind="sc",
        path=Path(path),
        media_type="application/dicom",
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
