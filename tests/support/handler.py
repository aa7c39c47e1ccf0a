"""A job handler for tests: runs nothing, records nothing, succeeds at once."""

from __future__ import annotations

from dicom_node.config import Settings
from dicom_node.scheduler import ExportOutcome, JobContext
from dicom_node.store import Job, Store
from pipeline.types import Artifact


class NullHandler:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store

    def needs_retrieval(self, job: Job) -> bool:
        return False

    def retrieve(self, ctx: JobContext) -> None:
        return None

    def run(self, ctx: JobContext) -> list[Artifact]:
        return []

    def export(self, ctx: JobContext, artifacts: list[Artifact]) -> list[ExportOutcome]:
        return []


def create_handler(settings: Settings, store: Store) -> NullHandler:
    return NullHandler(settings, store)
