"""One entry point per task: write every requested artifact under ``<out_dir>/<patient_id>/``."""

from __future__ import annotations

import contextvars
import dataclasses
import glob
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pipeline.artifacts._common import SeriesInfo, patient_dir, utc_now
from pipeline.artifacts._dicom import distinct, in_source_time
from pipeline.artifacts.encapsulated import write_encapsulated_pdf
from pipeline.artifacts.images import (
    heatmap_overlay,
    overlay_slices,
    segmentation_overlay,
    write_png,
    write_source_png,
)
from pipeline.artifacts.predictions import NORMAL, write_predictions_json, write_volumes_json
from pipeline.artifacts.report import write_classification_report, write_segmentation_report
from pipeline.artifacts.sc import write_secondary_capture
from pipeline.artifacts.seg import write_segmentation
from pipeline.artifacts.sr import build_classification_sr, build_segmentation_sr, write_sr
from pipeline.settings import Output, SecondaryCaptureSpec
from pipeline.types import Artifact, ClassificationResult, PatientStudy, SegmentationResult

__all__ = ["HEATMAP_OUTPUTS", "write_classification_artifacts", "write_segmentation_artifacts"]

# Log lines carry kinds, counts and timings only: no patient name, ID or path.
log = structlog.get_logger(__name__)

# Offsets from the base series number; each DICOM output gets its own new series
# (they have different modalities, which one series cannot mix).
_SERIES = {"sr": (0, "SR"), "sc": (1, "heatmap"), "pdf": (2, "report"), "seg": (3, "SEG")}
#: Ends every output's Series Description, which viewers show (the PDF says it too).
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
#: The Secondary Capture of a segmentation: a montage of slices, not a heatmap.
_SEGMENTATION_OVERLAY = "contours"


def _series(base: SeriesInfo, kind: str, suffix: str | None = None) -> SeriesInfo:
    """The series of output ``kind``: the base description with what it holds and the
    not-for-diagnostic-use notice, which is kept whole within LO's 64 characters (the
    description is shortened instead)."""
    offset, default = _SERIES[kind]
    tail = f" ({suffix or default}) {NOT_FOR_DIAGNOSTIC_USE}"
    head = base.series_description[:max(0, 64 - len(tail))].rstrip()
    return dataclasses.replace(
        base,
        series_number=base.series_number + offset,
        series_description=f"{head}{tail}".strip()[:64],
    )


def _overlay_sources(result: SegmentationResult,
                     source_datasets: Sequence[Dataset]) -> list[tuple[Dataset, int | None]]:
    """The slices the segmentation overlay shows, as (header, frame) of their source;
    all the source instances when the label map's slices are not the sources' (a
    resampled series)."""
    frames = list(result.source_frames) or [None] * len(source_datasets)
    if len(source_datasets) != np.asarray(result.labels).shape[0] \
            or len(frames) != len(source_datasets):
        return [(ds, None) for ds in distinct(source_datasets)]
    return [(source_datasets[z], frames[z]) for z in overlay_slices(result.labels)]


def _report_time(instant: datetime, source: Dataset) -> datetime:
    """``instant`` as the report shows it: in the source's offset (aware) when it has
    one, else in local time, naive (the report then says "local time"), as the DICOM
    objects of the run write it."""
    local, known = in_source_time(instant, source)
    return local if known else local.replace(tzinfo=None)


def _log_done(task: str, artifacts: list[Artifact], started: float) -> None:
    log.info(
        "artifacts.written",
        task=task,
        kinds=[a.kind for a in artifacts],
        count=len(artifacts),
        duration_s=round(time.perf_counter() - started, 3),
    )


@contextmanager
def _nothing_if_failed(folder: Path, pid: str) -> Iterator[None]:
    """When the block raises, remove the files it wrote in ``folder``: a failed run must
    not leave a report or a DICOM object there that reads like a result. Files of
    earlier runs that it did not replace stay."""
    before = _stamps(folder, pid)
    try:
        yield
    except BaseException:
        # Every artifact is renamed into place (atomic_path): a new inode, a new mtime.
        removed = [p for p, stamp in _stamps(folder, pid).items() if before.get(p) != stamp]
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("artifacts.removed_after_failure", count=len(removed))
        raise


def _stamps(folder: Path, pid: str) -> dict[Path, tuple[int, int]]:
    stamps = {}
    for path in folder.glob(f"{glob.escape(pid)}_*"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        stamps[path] = (st.st_ino, st.st_mtime_ns)
    return stamps


def _reports(
    write_report: Callable[[Path], Artifact],
    wanted: set[Output],
    folder: Path,
    pid: str,
    source_ds: Dataset,
    info: SeriesInfo,
    title: str,
    *,
    sources: list[Dataset] | None = None,
    when: datetime | None = None,
) -> list[Artifact]:
    """The PDF report and its Encapsulated PDF, each when ``wanted``; a PDF wanted only
    inside DICOM is written to a temporary folder first."""
    if not wanted & {Output.PDF, Output.ENCAPSULATED_PDF}:
        return []
    keep = Output.PDF in wanted
    with tempfile.TemporaryDirectory(prefix="dicom-node-") as tmp:
        pdf = write_report((folder if keep else Path(tmp)) / f"{pid}_report.pdf")
        made = [pdf] if keep else []
        if Output.ENCAPSULATED_PDF in wanted:
            made.append(write_encapsulated_pdf(pdf.path, source_ds, folder / f"{pid}_report.dcm",
                                               info, title=title, sources=sources,
                                               when=when))
    return made


#: The classification outputs that show the heatmap of a result that is not Normal: the
#: PNGs, the JSON (it names the heatmap PNG, seed 001), the report and the Secondary
#: Capture. Grad-CAM runs only when one of them is asked for.
HEATMAP_OUTPUTS = frozenset({Output.PNG, Output.JSON, Output.PDF, Output.ENCAPSULATED_PDF,
                             Output.SECONDARY_CAPTURE})


def write_classification_artifacts(
    result: ClassificationResult,
    study: PatientStudy,
    source_ds: Dataset,
    out_dir: Path,
    outputs: Collection[Output | str],
    *,
    series: SeriesInfo | None = None,
    generated_at: datetime | None = None,
    finding_codes: Mapping[str, Code] | None = None,
    sc: SecondaryCaptureSpec | None = None,
    finding_sources: Mapping[str, tuple[Dataset, int | None]] | None = None,
    sources: Sequence[Dataset] | None = None,
) -> list[Artifact]:
    """Write the requested classification artifacts; return them in this order: the
    PNGs, the JSON, then the PDF and the DICOM objects.

    Files (seed 001 names) in ``<out_dir>/<patient_id>/``: ``_predictions.json``,
    ``_source_image.png``, ``_heatmap.png`` (not when Normal), ``_report.pdf``, and the
    DICOM outputs ``_sr.dcm``, ``_sc.dcm`` (heatmap; not when Normal) and
    ``_report.dcm``, each in a new series of the source study (``sc``: how the Secondary
    Capture is encoded). The JSON names the PNG files, so asking for JSON writes the PNGs
    too. ``patient_id`` is ``study.patient_id``.
    For a Normal result a heatmap PNG or SC left there by an earlier run is removed.
    ``generated_at`` (default: now) is the one instant every DICOM object and the report
    carry, written in the time the source's study date and time are in (its Timezone
    Offset From UTC, else local time without an offset; see :func:`set_times`).
    ``finding_sources``: the image each finding's confidence came
    from when several were read (see :func:`build_classification_sr`). ``sources``: every
    image the result was derived from (default: ``source_ds`` and the images of
    ``finding_sources``), listed as the Encapsulated PDF's source instances.

    Raises:
        ValueError: when the patient ID is not a safe path component, an output name is
            unknown, or the result is not Normal and has no heatmap.
        OSError: when a file cannot be written.
    """
    started = time.perf_counter()
    wanted = {Output(o) for o in outputs}
    pid = study.patient_id
    folder = patient_dir(out_dir, pid)
    with _nothing_if_failed(folder, pid):
        base = series or SeriesInfo()
        # One instant for the whole run: every object and the report carry it, in the
        # time the study's own date and time are in.
        generated = (generated_at or utc_now()).astimezone(UTC)
        shown = _report_time(generated, source_ds)
        abnormal = result.result != NORMAL
        if abnormal and result.heatmap is None and not result.heatmap_note \
                and wanted & HEATMAP_OUTPUTS:
            raise ValueError(f"result {result.result!r} is not Normal but has no heatmap")
        artifacts: list[Artifact] = []
        if not abnormal or result.heatmap is None:
            # No heatmap (Normal, or a model Grad-CAM cannot explain): drop one left by an
            # earlier run of this patient.
            for stale in (f"{pid}_heatmap.png", f"{pid}_sc.dcm"):
                (folder / stale).unlink(missing_ok=True)
        # Blended once for the heatmap PNG and the Secondary Capture (a full-size radiograph
        # takes a while); the report draws its own at print size.
        overlay = None
        if abnormal and result.heatmap is not None and wanted & {
            Output.PNG, Output.JSON, Output.SECONDARY_CAPTURE
        }:
            overlay = heatmap_overlay(result.image, result.heatmap)
        source_path, heat_path = folder / f"{pid}_source_image.png", folder / f"{pid}_heatmap.png"
        documents: list[Artifact] = []  # the PDF and the DICOM objects
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="artifact-png") as pool:
            # PNG encoding runs without the interpreter lock: beside the report and DICOM.
            pngs = []
            if wanted & {Output.PNG, Output.JSON}:
                pngs.append(pool.submit(contextvars.copy_context().run,
                                        write_source_png, result, source_path))
                if overlay is not None:
                    pngs.append(pool.submit(contextvars.copy_context().run,
                                            write_png, overlay, heat_path))
            documents += _reports(
                lambda path: write_classification_report(
                    result, study, path, generated_at=shown,
                    software=f"{base.manufacturer} {base.software_version}",
                ),
                wanted, folder, pid, source_ds, _series(base, "pdf"), "AI inference report",
                sources=distinct([source_ds, *(sources or []),
                                  *(ds for ds, _ in (finding_sources or {}).values())]),
                when=generated,
            )
            if Output.SR in wanted:
                sr = build_classification_sr(
                    result, source_ds, _series(base, "sr"), finding_codes=finding_codes,
                    when=generated, finding_sources=finding_sources,
                )
                documents.append(write_sr(sr, folder / f"{pid}_sr.dcm"))
            if Output.SECONDARY_CAPTURE in wanted and overlay is not None:
                documents.append(
                    write_secondary_capture(
                        overlay, source_ds, folder / f"{pid}_sc.dcm", _series(base, "sc"),
                        encoding=sc, when=generated, frame_number=result.frame_number,
                    )
                )
            artifacts += [png.result() for png in pngs]
        if Output.JSON in wanted:
            artifacts.append(
                write_predictions_json(
                    result,
                    study,
                    folder / f"{pid}_predictions.json",
                    source_path,
                    heat_path if overlay is not None else None,
                )
            )
        artifacts += documents
    _log_done("classification", artifacts, started)
    return artifacts


def write_segmentation_artifacts(
    result: SegmentationResult,
    study: PatientStudy,
    source_datasets: Sequence[Dataset],
    out_dir: Path,
    outputs: Collection[Output | str],
    *,
    series: SeriesInfo | None = None,
    generated_at: datetime | None = None,
    codes_by_name: Mapping[str, tuple[Code, Code]] | None = None,
    sc: SecondaryCaptureSpec | None = None,
) -> list[Artifact]:
    """Write the requested segmentation artifacts; return them in writing order.

    Files in ``<out_dir>/<patient_id>/``: ``_volumes.json``, ``_overlay.png``,
    ``_report.pdf``, and DICOM ``_seg.dcm`` (BINARY SEG over ``source_datasets``,
    which are in the label map's slice order), ``_sr.dcm`` (volumes, referencing the
    SEG when one is written), ``_sc.dcm`` (the overlay, encoded as ``sc`` says) and
    ``_report.dcm``. ``generated_at``: as in :func:`write_classification_artifacts`.

    Raises:
        ValueError: when the patient ID is not a safe path component, an output name is
            unknown, there are no source datasets, or the label map does not match them.
        OSError: when a file cannot be written.
    """
    started = time.perf_counter()
    wanted = {Output(o) for o in outputs}
    pid = study.patient_id
    folder = patient_dir(out_dir, pid)
    with _nothing_if_failed(folder, pid):
        if not source_datasets:
            raise ValueError("no source datasets")
        first = source_datasets[0]
        base = series or SeriesInfo()
        # One instant for the whole run: every object and the report carry it, in the
        # time the study's own date and time are in.
        generated = (generated_at or utc_now()).astimezone(UTC)
        shown = _report_time(generated, first)
        artifacts: list[Artifact] = []
        if Output.JSON in wanted:
            artifacts.append(write_volumes_json(result, study, folder / f"{pid}_volumes.json"))
        overlay = None  # drawn once for the PNG, the Secondary Capture and the report
        if wanted & {Output.PNG, Output.SECONDARY_CAPTURE, Output.PDF, Output.ENCAPSULATED_PDF}:
            overlay = segmentation_overlay(result.volume, result.labels, result.segments,
                                           pixel_spacing=result.spacing[1:])
            if Output.PNG in wanted:
                artifacts.append(write_png(overlay, folder / f"{pid}_overlay.png"))
            if Output.SECONDARY_CAPTURE in wanted:
                slices = _overlay_sources(result, source_datasets)
                artifacts.append(
                    write_secondary_capture(
                        overlay, first, folder / f"{pid}_sc.dcm",
                        _series(base, "sc", _SEGMENTATION_OVERLAY),
                        encoding=sc, when=generated, sources=slices,
                        derivation=(f"AI segmentation ({result.model_name} "
                                    f"{result.model_version}): label fills and contours "
                                    f"on {len(slices)} slice(s) of the source series, "
                                    "with a legend of the volumes"),
                    )
                )
        artifacts += _reports(
            lambda path: write_segmentation_report(
                result, study, path, generated_at=shown,
                software=f"{base.manufacturer} {base.software_version}", overlay=overlay,
            ),
            wanted, folder, pid, first, _series(base, "pdf"), "AI segmentation report",
            sources=distinct(source_datasets), when=generated,
        )
        seg_ds = None
        if Output.SEG in wanted:
            seg_art, seg_ds = write_segmentation(
                result,
                source_datasets,
                folder / f"{pid}_seg.dcm",
                _series(base, "seg"),
                codes_by_name=codes_by_name,
                when=generated,
            )
            artifacts.append(seg_art)
        if Output.SR in wanted:
            sr = build_segmentation_sr(
                result,
                source_datasets,
                _series(base, "sr"),
                seg_ds=seg_ds,
                codes_by_name=codes_by_name,
                when=generated,
            )
            artifacts.append(write_sr(sr, folder / f"{pid}_sr.dcm"))
    _log_done("segmentation", artifacts, started)
    return artifacts
