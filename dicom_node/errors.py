"""The node's exceptions: one base, mapped to HTTP in ``rest.errors`` and to DIMSE in ``scp``."""

from __future__ import annotations


class NodeError(Exception):
    """Base of every error the node raises on purpose; the message is for a person."""


class NotFound(NodeError):
    """A job, study, instance or configured object does not exist."""


class Conflict(NodeError):
    """The request conflicts with the current state (a name in use, a job already ended)."""


class InvalidInput(NodeError):
    """Input was refused; retrying the same input will not help."""


class PermanentJobError(NodeError):
    """A job cannot succeed as it is (bad input, unknown pipeline): fail it, do not retry."""


class DeferJob(NodeError):
    """A job cannot tell yet what to do (a study is still arriving): queue it again to
    run after ``delay_s``; the attempt does not count towards the retries."""

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class JobCancelled(NodeError):
    """Raised inside a job when its cancellation was requested."""


class StoreError(NodeError):
    """The store could not be read or written."""
