"""Numbers written as text by callers and senders: ASCII digits ``0``-``9`` only.

``str.isdigit()`` is true for any Unicode digit: superscripts (``"¹"``), which
``int()`` refuses with a ValueError, and other scripts' decimal digits (Arabic-Indic
U+0661, fullwidth U+FF11), which ``int()`` reads as numbers. An id in a URL, a count
in a query or an index in a configuration key is plain ASCII digits, or it is not a
number.
"""

from __future__ import annotations

__all__ = ["ascii_digits", "ascii_int"]


def ascii_digits(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits and nothing else (no sign, space
    or underscore)."""
    return text.isascii() and text.isdigit()


def ascii_int(text: str, max_digits: int = 18) -> int | None:
    """``text`` as a non-negative integer when it is 1 to ``max_digits`` ASCII digits,
    else None.

    ``max_digits`` (18: any such number fits 64 bits) keeps ``int()`` off very long
    strings, which it refuses past 4300 digits.
    """
    if len(text) > max_digits or not ascii_digits(text):
        return None
    return int(text)
