"""Process-wide logging set-up (dicom_node.logs)."""

from __future__ import annotations

import json
import logging
import warnings
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
        logging.captureWarnings(False)
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


@pytest.mark.usefixtures("restore_logging")
def test_library_messages_and_warnings_are_json_lines_without_the_values_they_quote(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pydicom and highdicom quote dataset values in their messages (a birth date, a
    patient's name); such messages and Python warnings become JSON log lines with the
    quoted values blanked, not raw text on stderr."""
    configure_logging("info", fmt="json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Invalid value for VR DA: '1958-01-01'.", UserWarning, stacklevel=1)
    logging.getLogger("highdicom.base").warning(
        'The string "Doe John" is unlikely to represent the intended person name')
    # a name with quote marks of its own: all of it goes, not only what the first pair
    # of marks encloses
    logging.getLogger("highdicom.base").warning(
        'The string "MILLER "BUDDY" WILLIAM" is unlikely to represent the intended person '
        'name')
    logging.getLogger("dicom_node.test").warning("kept: 'as it is'")
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert "1958" not in out + err and "Doe John" not in out + err
    assert "BUDDY" not in out + err and "MILLER" not in out + err
    warning, highdicom, quoted, ours = (line["event"] for line in lines)
    assert warning.endswith("UserWarning: Invalid value for VR DA: '<value removed>'.")
    assert highdicom.startswith("The string '<value removed>' is unlikely")
    assert quoted.startswith("The string '<value removed>' is unlikely")
    assert ours == "kept: 'as it is'"  # the node's own lines are its own business


@pytest.mark.usefixtures("restore_logging")
def test_libraries_notices_of_coming_changes_only_at_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A Model Zoo bundle made MONAI warn, on every start, that a default its Orientationd
    relies on will change: a line for bundle authors that the log blanked into noise."""
    for level, shown in (("info", False), ("debug", True)):
        with warnings.catch_warnings():  # the filter configure_logging sets is undone
            warnings.filterwarnings("always", category=UserWarning)
            configure_logging(level, fmt="json")
            warnings.warn_explicit("Default value changed to None", FutureWarning,
                                   "deprecate_utils.py", 1, module="monai.utils")
            warnings.warn("Invalid value for VR DA: '1958-01-01'.", UserWarning,
                          stacklevel=1)
            logging.captureWarnings(False)  # before catch_warnings puts showwarning back
        out = capsys.readouterr().out
        assert ("Default value changed" in out) is shown, level
        assert "Invalid value for VR DA" in out  # pydicom's about a file: always
