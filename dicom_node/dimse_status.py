"""DIMSE status codes and association rejection reasons the node answers with.

One place maps the node's failures to what a peer sees (PS3.4 Annex B/C, PS3.8 9.3.4),
so a PACS administrator reading a peer's log finds the same words as in ours.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from dicom_node.errors import InvalidInput, NodeError, StoreError

__all__ = [
    "REJECT_CALLED_AE",
    "REJECT_CALLING_AE",
    "REJECT_LOCAL_LIMIT",
    "REJECT_NO_SPACE",
    "Rejection",
    "Status",
    "status_for",
]


class Status(IntEnum):
    """C-STORE / C-ECHO response statuses used by the node."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # the SOP class does not match the presentation context
    OUT_OF_RESOURCES = 0xA700  # disk full, store down
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC210  # the dataset or its UIDs cannot be read
    PROCESSING_FAILURE = 0x0110


class Rejection(NamedTuple):
    """An A-ASSOCIATE-RJ: result, source and reason (diagnostic), with its words."""

    result: int  # 1 rejected-permanent, 2 rejected-transient
    source: int  # 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)
    reason: int
    text: str


REJECT_CALLED_AE = Rejection(1, 1, 7, "called AE title not recognised")
REJECT_CALLING_AE = Rejection(1, 1, 3, "calling AE title not recognised")
REJECT_LOCAL_LIMIT = Rejection(2, 3, 2, "local limit exceeded")
# Low disk space is temporary: a transient rejection tells the peer to try again later.
REJECT_NO_SPACE = Rejection(2, 1, 1, "no reason given (free disk space below storage.min_free_mb)")


def status_for(exc: BaseException) -> Status:
    """The C-STORE status for a failure while storing an instance."""
    if isinstance(exc, InvalidInput):
        return Status.CANNOT_UNDERSTAND
    if isinstance(exc, (StoreError, OSError)):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, NodeError):
        return Status.PROCESSING_FAILURE
    return Status.OUT_OF_RESOURCES
