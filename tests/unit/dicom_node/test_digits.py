"""Ids and counts written as text: ASCII digits only."""

from __future__ import annotations

import pytest

from dicom_node.digits import ascii_digits, ascii_int


@pytest.mark.parametrize("text", ["0", "7", "0042", "123456789012345678"])
def test_ascii_digits_are_numbers(text: str) -> None:
    assert ascii_digits(text)
    assert ascii_int(text) == int(text)


# isdigit() is true for each of these: int() refuses the superscript and reads the
# others (Arabic-Indic, fullwidth, Devanagari one) as 1.
@pytest.mark.parametrize("text", ["", "\u00b9", "\u0661", "\uff11", "\u0967", "1\u00b2",
                                  " 1", "1 ", "-1", "+1", "1_0", "1.0", "x"])
def test_anything_else_is_not(text: str) -> None:
    assert not ascii_digits(text)
    assert ascii_int(text) is None


def test_too_many_digits_are_not_an_id() -> None:
    """Past ``max_digits``: int() would take 4300 digits' time, or refuse more."""
    assert ascii_int("9" * 19) is None
    assert ascii_int("9" * 5000) is None
    assert ascii_int("12345", max_digits=4) is None
    assert ascii_int("1234", max_digits=4) == 1234
