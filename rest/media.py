"""``Accept`` header parsing for the DICOMweb routes (RFC 9110 §12.5.1, PS3.18 §8.7.3).

A media range's ``q`` weight is honoured: ``q=0`` means "not acceptable" (RFC 9110
§12.4.2), and a more specific range overrides a less specific one, so
``*/*, application/dicom+json;q=0`` refuses DICOM JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["MediaRange", "parse_accept", "quality"]

# A comma or semicolon outside double quotes.
_ITEMS = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')
_PARAMS = re.compile(r';(?=(?:[^"]*"[^"]*")*[^"]*$)')


@dataclass(frozen=True)
class MediaRange:
    """One media range of an ``Accept`` header, lower-cased, parameters unquoted."""

    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    def matches(self, media: str) -> int:
        """How specifically this range matches ``media`` (``type/subtype``), ignoring
        parameters: 3 for the type itself, 2 for ``type/*``, 1 for ``*/*``, 0 for none."""
        mtype, _, msub = media.lower().partition("/")
        if self.type == "*" and self.subtype == "*":
            return 1
        if self.type != mtype:
            return 0
        if self.subtype == "*":
            return 2
        return 3 if self.subtype == msub else 0


def _q(value: str) -> float:
    # RFC 9110's qvalue is 0..1 with at most three decimals. A weight that does not
    # parse is taken as 1 (as most servers do): the client did ask for the range.
    try:
        return min(max(float(value), 0.0), 1.0)
    except ValueError:
        return 1.0


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of ``header``; ``*/*`` alone when it is absent or empty."""
    if not header or not header.strip():
        return [MediaRange("*", "*")]
    ranges = []
    for item in _ITEMS.split(header):
        media, *raw_params = _PARAMS.split(item)
        mtype, _, subtype = media.strip().lower().partition("/")
        if not mtype or not subtype:
            continue
        params: dict[str, str] = {}
        q = 1.0
        for raw in raw_params:
            key, _, value = raw.partition("=")
            key, value = key.strip().lower(), value.strip().strip('"').strip()
            if key == "q":
                q = _q(value)
            elif key:
                params[key] = value
        ranges.append(MediaRange(mtype, subtype, params, q))
    return ranges


def quality(ranges: list[MediaRange], media: str, aliases: tuple[str, ...] = ()) -> float:
    """The weight ``ranges`` give ``media`` (or one of its ``aliases``): that of the most
    specific range matching it; 0 when none does."""
    best, weight = 0, 0.0
    for r in ranges:
        level = max(r.matches(m) for m in (media, *aliases))
        if level > best or (level == best and level and r.q > weight):
            best, weight = level, r.q
    return weight if best else 0.0
