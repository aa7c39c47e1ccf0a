"""Encapsulated PDF of the report, written with pydicom."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import EncapsulatedPDFStorage, generate_uid

from pipeline.artifacts._common import SeriesInfo, utc_now
from pipeline.artifacts._dicom import (
    copy_patient_study,
    new_file_dataset,
    save,
    set_equipment,
    set_series,
    set_times,
)
from pipeline.types import Artifact

__all__ = ["DOCUMENT_TITLE", "build_encapsulated_pdf", "write_encapsulated_pdf"]

#: Concept Name of the Encapsulated PDF: LOINC 18748-4, the usual diagnostic imaging
#: report title (CID 7000).
DOCUMENT_TITLE = codes.LN.DiagnosticImagingReport


def build_encapsulated_pdf(
    pdf: bytes,
    source_ds: Dataset,
    info: SeriesInfo,
    *,
    title: str = "AI inference report",
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    sources: list[Dataset] | None = None,
    when: datetime | None = None,
) -> Dataset:
    """Build an Encapsulated PDF Storage dataset holding ``pdf`` in a new series.

    The patient and study modules come from ``source_ds``; ``sources`` (default: the
    source dataset) are listed in the Source Instance Sequence.

    Raises:
        ValueError: when ``pdf`` is not a PDF or ``source_ds`` has no StudyInstanceUID.
    """
    if not pdf.startswith(b"%PDF"):
        raise ValueError("the document is not a PDF")
    when = when or utc_now()
    sop_uid = sop_instance_uid or generate_uid()
    ds = new_file_dataset(EncapsulatedPDFStorage, sop_uid)
    copy_patient_study(source_ds, ds)
    set_series(ds, info, series_uid or generate_uid(), "DOC")
    set_equipment(ds, info)
    ds.ConversionType = "SYN"
    ds.InstanceNumber = instance_number
    set_times(ds, when, source_ds)
    # the same instant, in the same time as the creation time (and the offset, if any)
    ds.AcquisitionDateTime = ds.InstanceCreationDate + ds.InstanceCreationTime
    ds.BurnedInAnnotation = "YES"  # the PDF shows patient identification
    ds.DocumentTitle = title[:64]
    # the document title's code (CID 7000): LOINC "Diagnostic Imaging Report"
    title_code = Dataset()
    title_code.CodeValue = DOCUMENT_TITLE.value
    title_code.CodingSchemeDesignator = DOCUMENT_TITLE.scheme_designator
    title_code.CodeMeaning = DOCUMENT_TITLE.meaning
    ds.ConceptNameCodeSequence = [title_code]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    refs, seen = [], set()
    for src in sources if sources is not None else [source_ds]:
        # an instance once (the frames of a multi-frame object come with one header each)
        if "SOPInstanceUID" in src and "SOPClassUID" in src \
                and src.SOPInstanceUID not in seen:
            seen.add(src.SOPInstanceUID)
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            refs.append(ref)
    if refs:
        ds.SourceInstanceSequence = refs
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    return ds


def write_encapsulated_pdf(
    pdf_path: Path,
    source_ds: Dataset,
    path: Path,
    info: SeriesInfo,
    *,
    title: str = "AI inference report",
    series_uid: str | None = None,
    sources: list[Dataset] | None = None,
    when: datetime | None = None,
) -> Artifact:
    """Wrap the PDF file at ``pdf_path`` in DICOM at ``path`` (kind ``encapsulated_pdf``);
    ``when`` (default: now) is its creation and content time.

    Raises:
        ValueError: when the file is not a PDF. OSError: when reading or writing fails.
    """
    ds = build_encapsulated_pdf(
        Path(pdf_path).read_bytes(),
        source_ds,
        info,
        title=title,
        series_uid=series_uid,
        sources=sources,
        when=when,
    )
    save(ds, path)
    return Artifact(
        kind="encapsulated_pdf",
        path=Path(path),
        media_type="application/dicom",
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
