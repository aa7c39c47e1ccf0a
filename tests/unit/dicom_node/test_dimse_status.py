"""UID validation and the mapping of failures to DIMSE statuses."""

from __future__ import annotations

import pytest

from dicom_node.dimse_status import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LOCAL_LIMIT,
    Status,
    status_for,
)
from dicom_node.errors import InvalidInput, StoreError
from dicom_node.scp import safe_uid


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "0", "1" * 64])
def test_safe_uid_accepts(uid: str) -> None:
    assert safe_uid(uid, "StudyInstanceUID") == uid


@pytest.mark.parametrize("uid", ["", None, "1..2", ".1", "1.2.", "../etc", "1/2", "1.2a",
                                 "1" * 65, "1.2\\3"])
def test_safe_uid_refuses(uid: object) -> None:
    with pytest.raises(InvalidInput, match="SeriesInstanceUID"):
        safe_uid(uid, "SeriesInstanceUID")


def test_safe_uid_strips_padding() -> None:
    assert safe_uid("1.2.3\x00", "SOPInstanceUID") == "1.2.3"


def test_status_for() -> None:
    assert status_for(InvalidInput("x")) is Status.CANNOT_UNDERSTAND
    assert status_for(StoreError("x")) is Status.OUT_OF_RESOURCES
    assert status_for(OSError(28, "No space left on device")) is Status.OUT_OF_RESOURCES


def test_rejections_are_the_standard_codes() -> None:
    assert REJECT_CALLED_AE[:3] == (1, 1, 7)
    assert REJECT_CALLING_AE[:3] == (1, 1, 3)
    assert REJECT_LOCAL_LIMIT[:3] == (2, 3, 2)
