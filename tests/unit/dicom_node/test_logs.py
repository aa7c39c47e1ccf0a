"""Process-wide logging set-up (dicom_node.logs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from dicom_node.logs import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after the test."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pnd = logging.getLogger("pynetdicom")
    pnd_level, handler_level = pnd.level, _config.LOG_HANDLER_LEVEL
    try:
        yield
    finally:
        structlog.configure(**saved)
        root.handlers[:], root.level = handlers, level
        pnd.setLevel(pnd_level)
        _config.LOG_HANDLER_LEVEL = handler_level


def _bound(event: evt.NotificationEvent) -> bool:
    assoc = Association(AE(), mode="requestor")
    return bool(assoc.get_handlers(event))


@pytest.mark.usefixtures("restore_logging")
def test_pynetdicom_message_logging_only_when_it_is_shown() -> None:
    """pynetdicom's standard handlers format every PDU and DIMSE message for its logger,
    which shows nothing below warning unless we debug: not bound then."""
    configure_logging("info", fmt="json")
    assert _config.LOG_HANDLER_LEVEL == "none"
    assert not _bound(evt.EVT_DIMSE_RECV) and not _bound(evt.EVT_PDU_SENT)
    configure_logging("debug", fmt="json")
    assert _config.LOG_HANDLER_LEVEL == "standard"
    assert _bound(evt.EVT_DIMSE_RECV) and _bound(evt.EVT_PDU_SENT)
