"""The job handler the node runs by default: retrieval, the pipeline, then export.

Each step is a service built from the settings; a step that is not available in
this build fails the job with a message that says so, never silently.
"""

from __future__ import annotations

from dicom_node.config import Settings
from dicom_node.errors import PermanentJobError
from dicom_node.scheduler import ExportOutcome, JobContext
from dicom_node.store import Job, Store
from pipeline.types import Artifact


class NodeHandler:
    """Runs a job's configured pipeline on its instances and sends the results on."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.pipelines = {p.name: p for p in settings.pipelines}

    def needs_retrieval(self, job: Job) -> bool:
        return bool(job.input.get("retrieve"))

    def retrieve(self, ctx: JobContext) -> None:
        raise PermanentJobError("retrieval from a PACS is not available in this build")

    def run(self, ctx: JobContext) -> list[Artifact]:
        if ctx.job.pipeline not in self.pipelines:
            raise PermanentJobError(
                f"pipeline {ctx.job.pipeline!r} is not configured; configured: "
                f"{', '.join(sorted(self.pipelines)) or 'none'}"
            )
        raise PermanentJobError("the inference pipeline is not available in this build")

    def export(self, ctx: JobContext, artifacts: list[Artifact]) -> list[ExportOutcome]:
        return []


def create_handler(settings: Settings, store: Store) -> NodeHandler:
    return NodeHandler(settings, store)
