"""The SEG written in a worker process (WriterProcess) beside the other artifacts."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pydicom
import pytest
import structlog.testing
from pydicom.dataset import Dataset

from pipeline.artifacts import write_segmentation_artifacts
from pipeline.artifacts.offload import WriterProcess
from pipeline.artifacts.seg import segments_with_voxels
from pipeline.runner import PipelineRunner
from pipeline.settings import Output, PipelineSpec
from pipeline.types import PatientStudy, Segment, SegmentationResult

ALL = list(Output)


def _die_after(seconds: float) -> None:
    """Run in the worker: hold it a moment, then end it the way the OOM killer would."""
    time.sleep(seconds)
    os._exit(1)


@pytest.fixture
def writer() -> Iterator[WriterProcess]:
    w = WriterProcess()
    w.start()
    yield w
    w.shutdown()


@pytest.fixture
def on_disk(tmp_path: Path, ct_series: list[Dataset],
            seg_result: SegmentationResult) -> SegmentationResult:
    """``seg_result`` whose slices are files (what the worker reads), in slice order."""
    folder = tmp_path / "ct"
    folder.mkdir()
    paths = []
    for i, ds in enumerate(ct_series):
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return dataclasses.replace(seg_result, source_paths=paths)


def _seg_segments(path: Path) -> set[int]:
    seg = pydicom.dcmread(path)
    return {int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for f in seg.PerFrameFunctionalGroupsSequence}


def _sr_referenced_segments(path: Path) -> dict[str, set[int]]:
    """SOP Instance UID -> segment numbers the SR's content references."""
    out: dict[str, set[int]] = {}

    def walk(items: list[Dataset]) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                if "ReferencedSegmentNumber" in ref:
                    out.setdefault(str(ref.ReferencedSOPInstanceUID), set()).update(
                        int(n) for n in np.atleast_1d(ref.ReferencedSegmentNumber))
            walk(item.get("ContentSequence", []))

    walk(pydicom.dcmread(path).ContentSequence)
    return out


def test_seg_in_writer_process_matches_in_process(
    tmp_path: Path, ct_series: list[Dataset], study: PatientStudy,
    on_disk: SegmentationResult, writer: WriterProcess, dciodvfy: Callable[[Path], str],
) -> None:
    there = write_segmentation_artifacts(on_disk, study, ct_series, tmp_path / "w", ALL,
                                         executor=writer)
    here = write_segmentation_artifacts(on_disk, study, ct_series, tmp_path / "h", ALL)
    assert [a.kind for a in there] == [a.kind for a in here]
    by_kind = {a.kind: a for a in there}
    seg = pydicom.dcmread(by_kind["seg"].path)
    assert str(seg.SOPInstanceUID) == by_kind["seg"].sop_instance_uid
    assert seg.NumberOfFrames == pydicom.dcmread(
        next(a.path for a in here if a.kind == "seg")).NumberOfFrames
    # The SR was built before the SEG existed: it must reference what the SEG holds.
    refs = _sr_referenced_segments(by_kind["sr"].path)
    assert refs == {str(seg.SOPInstanceUID): _seg_segments(by_kind["seg"].path)}
    for kind in ("seg", "sr"):
        dciodvfy(by_kind[kind].path)


def test_dead_writer_process_falls_back_in_process(
    tmp_path: Path, ct_series: list[Dataset], study: PatientStudy,
    on_disk: SegmentationResult, writer: WriterProcess,
) -> None:
    dying = writer.submit(_die_after, 0.5)  # the SEG queues behind it and dies with it
    with structlog.testing.capture_logs() as logs:
        arts = write_segmentation_artifacts(on_disk, study, ct_series, tmp_path, ALL,
                                            executor=writer)
    with pytest.raises(BrokenProcessPool):
        dying.result()
    assert any(e["event"] == "artifacts.writer_process_died" for e in logs)
    seg = next(a for a in arts if a.kind == "seg")
    assert str(pydicom.dcmread(seg.path).SOPInstanceUID) == seg.sop_instance_uid
    # and the next job gets a new worker
    again = write_segmentation_artifacts(on_disk, study, ct_series, tmp_path / "2", ALL,
                                         executor=writer)
    assert any(a.kind == "seg" for a in again)
    assert writer.submit(os.getpid).result() != os.getpid()


def test_slices_without_files_are_written_in_process(
    tmp_path: Path, ct_series: list[Dataset], study: PatientStudy,
    seg_result: SegmentationResult, writer: WriterProcess,
) -> None:
    # no source_paths: nothing the worker could read
    arts = write_segmentation_artifacts(seg_result, study, ct_series, tmp_path, [Output.SEG],
                                        executor=writer)
    assert [a.kind for a in arts] == ["seg"]
    assert arts[0].path.is_file()


def test_shut_down_writer_refuses_work() -> None:
    w = WriterProcess()
    w.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        w.submit(os.getpid)


def test_segments_with_voxels(seg_result: SegmentationResult) -> None:
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = 2  # one voxel: its volume rounds to 0 mL
    labels[1] = 3
    result = dataclasses.replace(seg_result, labels=labels, segments=[
        Segment(1, "absent", 0.0), Segment(2, "tiny", 0.0), Segment(3, "big", 1.5)])
    assert segments_with_voxels(result) == {2, 3}


def test_runner_writer_process_only_when_asked_and_segmenting() -> None:
    seg = PipelineSpec.model_validate({"name": "s", "model": "m", "task": "segment"})
    cls = PipelineSpec.model_validate({"name": "c", "model": "m", "task": "classify"})
    assert PipelineRunner([], [seg]).writer is None
    assert PipelineRunner([], [cls], writer_process=True).writer is None
    runner = PipelineRunner([], [seg], writer_process=True)
    try:
        assert (runner.writer is not None) == ((os.cpu_count() or 1) > 1)
    finally:
        runner.close()
