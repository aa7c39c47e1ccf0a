"""A job handler for tests: behaviour comes from the job's input, effects go to a file.

``input`` keys: ``sleep`` (seconds the run takes, in small steps that honour
cancel), ``fail_times`` (raise on the first N attempts), ``disk_full_runs`` (the
first N runs fail as a full disk does, wrapped as a library re-raises it), ``permanent`` (raise a
PermanentJobError), ``marker`` (a file that gets ``start <id>`` and ``end <id>``
lines, so a test can count how often a job ran and finished), ``pacs_down_passes``
(the destination "pacs" refuses the first N export passes, each asking for another
after ``retry_in_s``), ``linger_s`` (once cancelled, the run takes this long more,
as a peer's answer to an object in flight does, then marks ``lingered``).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from dicom_node.errors import PermanentJobError
from dicom_node.node import Node
from dicom_node.scheduler import ExportOutcome, JobContext
from dicom_node.store import Job
from pipeline.types import Artifact


def _mark(ctx: JobContext, what: str) -> None:
    marker = ctx.job.input.get("marker")
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"{what} {ctx.job.id} {os.getpid()}\n")
            fh.flush()
            os.fsync(fh.fileno())


class RecordingHandler:
    def __init__(self) -> None:
        self.order: list[str] = []  # runs
        self.exports: list[str] = []  # export passes

    def needs_retrieval(self, job: Job) -> bool:
        return bool(job.input.get("retrieve"))

    def retrieve(self, ctx: JobContext) -> None:
        _mark(ctx, "retrieve")

    def run(self, ctx: JobContext) -> list[Artifact]:
        self.order.append(ctx.job.input.get("name", ctx.job.id))
        _mark(ctx, "start")
        if ctx.job.input.get("permanent"):
            raise PermanentJobError("this input can never work")
        if self.order.count(ctx.job.input.get("name", ctx.job.id)) <= int(
                ctx.job.input.get("disk_full_runs", 0)):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise RuntimeError("cannot write the report") from exc
        if ctx.job.attempts <= int(ctx.job.input.get("fail_times", 0)):
            raise RuntimeError(f"transient failure on attempt {ctx.job.attempts}")
        deadline = time.monotonic() + float(ctx.job.input.get("sleep", 0))
        while time.monotonic() < deadline:
            if ctx.cancelled.is_set() and ctx.job.input.get("linger_s"):
                time.sleep(float(ctx.job.input["linger_s"]))
                _mark(ctx, "lingered")
            ctx.check_cancelled()
            time.sleep(0.02)
        (ctx.work_dir / "scratch.bin").write_bytes(b"scratch")  # the scheduler removes it
        out = ctx.work_dir.parent.parent / f"{ctx.job.id}.txt"  # beside work/, as results
        out.write_text("ok")
        _mark(ctx, "end")
        return [Artifact(kind="txt", path=Path(out), media_type="text/plain")]

    def export(self, ctx: JobContext, artifacts: list[Artifact]) -> list[ExportOutcome]:
        self.exports.append(ctx.job.input.get("name", ctx.job.id))
        down = int(ctx.job.input.get("pacs_down_passes", 0))
        if down:  # "pacs" refuses the first N passes, then takes the results
            before = ctx.exported.get("pacs")
            attempt = (before.attempts if before is not None else 0) + 1
            if attempt <= down:
                return [ExportOutcome("pacs", ok=False, attempts=attempt, message="refused",
                                      retry_in_s=float(ctx.job.input.get("retry_in_s", 0.05)))]
            return [ExportOutcome("pacs", ok=True, attempts=attempt, sent=len(artifacts))]
        if ctx.job.input.get("export_fails"):
            return [ExportOutcome("pacs", ok=False, attempts=3, message="association rejected")]
        return [ExportOutcome("folder", ok=True, sent=len(artifacts))]


def create_handler(node: Node) -> RecordingHandler:
    return RecordingHandler()
