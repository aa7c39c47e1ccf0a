"""Structured logging: JSON lines on stdout, a console renderer on a TTY.

Every line about a job carries ``job_id``; pixel data and patient names never
reach a log line (a processor drops such keys whatever the caller passes, another
blanks the values that pydicom's and highdicom's messages and Python warnings quote).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, WrappedLogger

# Keys that may carry protected health information or pixel data.
_FORBIDDEN_KEYS = frozenset(
    {
        "patient_name",
        "PatientName",
        "patientname",
        "pixel_data",
        "PixelData",
        "pixels",
        "patient_birth_date",
        "PatientBirthDate",
    }
)


def _drop_phi(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key in _FORBIDDEN_KEYS.intersection(event_dict):
        event_dict[key] = "<removed>"
    return event_dict


# Loggers whose messages quote the values of a dataset (pydicom's "Invalid value for VR
# DA: '1958-01-01'", highdicom's 'The string "Doe John" is unlikely to represent ...'),
# and Python warnings, which carry the same messages.
_QUOTING_LOGGERS = frozenset({"pydicom", "highdicom", "py.warnings"})
# From the first quote mark to the last of its kind on the line: a value may hold the
# other kind, or its own (MILLER "BUDDY" WILLIAM quoted in double quotes); blanking a
# little more than the value is the safe side.
_QUOTED = re.compile(r"'[^\n]*'|\"[^\n]*\"")


def _drop_quoted_values(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Blank what a library's message quotes: it may be a patient's name or birth date.
    A Python warning keeps only its first line (not the source line it points at)."""
    record = event_dict.get("_record")
    event = event_dict.get("event")
    if record is not None and isinstance(event, str) and (
            record.name in _QUOTING_LOGGERS or record.name.split(".")[0] in _QUOTING_LOGGERS):
        if record.name == "py.warnings":
            event = event.strip().splitlines()[0] if event.strip() else event
        event_dict["event"] = _QUOTED.sub("'<value removed>'", event)
    return event_dict


class _Stderr:
    """``sys.stderr`` as it is at each write, not as it was when logging was set up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto",
    stream: Literal["stdout", "stderr"] = "stdout",
) -> None:
    """Configure structlog and the standard library's logging for the whole process.

    Log lines go to stdout, or to stderr for a command whose stdout is its output.
    """
    out: Any = sys.stdout if stream == "stdout" else _Stderr()
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_phi,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # Libraries (pynetdicom, aiohttp, sqlalchemy) log through the standard library:
    # route them through the same renderer, at warning level unless we debug.
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[*shared, _drop_quoted_values],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Python warnings (pydicom's about odd values, libraries' deprecations) become log
    # lines too, in the same format, instead of raw text on stderr.
    logging.captureWarnings(True)
    if level != "debug":
        # Libraries' notices of coming changes (MONAI's about a default a bundle relies
        # on) address who writes code and bundles, not who runs the node.
        warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("pynetdicom", "aiohttp.access", "sqlalchemy", "watchdog", "asyncio",
                  "highdicom", "monai"):
        logging.getLogger(noisy).setLevel(numeric if level == "debug" else logging.WARNING)
    # pynetdicom's standard event handlers format every PDU and DIMSE message for its
    # logger (~0.2 ms a message, 2 or more per instance received): bind them only when
    # that logger shows them.
    from pynetdicom import _config as pynetdicom_config  # here: importing it takes 0.25 s

    pynetdicom_config.LOG_HANDLER_LEVEL = "standard" if level == "debug" else "none"


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A bound structlog logger, with ``context`` bound once."""
    log = structlog.get_logger(name)
    return log.bind(**context) if context else log
