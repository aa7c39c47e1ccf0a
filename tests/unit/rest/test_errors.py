"""The default error shape names every status, not only the usual ones."""

from __future__ import annotations

import json

import pytest

from rest.errors import ErrorStyle, error_response


@pytest.mark.parametrize(("status", "error"), [(404, "not_found"), (406, "not_acceptable"),
                                               (416, "requested_range_not_satisfiable"),
                                               (599, "error")])
def test_default_error_names_the_status(status: int, error: str) -> None:
    r = error_response(ErrorStyle.DEFAULT, status, "why")
    assert r.text is not None
    assert json.loads(r.text) == {"error": error, "message": "why"}
