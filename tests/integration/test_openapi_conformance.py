"""Schemathesis over the whole of rest/openapi.yaml against a live node with real models.

Every documented operation gets generated requests with valid credentials (a token
with every scope); every answer must be a non-5xx whose status, content type and
body the document declares. Examples per operation are kept small so the suite
stays quick.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rest.app import openapi_document
from tests.support.serving import CT, CXR, LiveNode, live_node, serving_settings

CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance,
          content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveNode]:
    data: Path = tmp_path_factory.mktemp("conformance") / "data"
    # a small body limit so that generated bodies cannot make the node decode megabytes
    with live_node(serving_settings(data, models=[CXR, CT], max_body_mb=1)) as ln:
        yield ln


@pytest.fixture(scope="module")
def session(live: LiveNode) -> Iterator[requests.Session]:
    with requests.Session() as s:
        token = live.token(scope="infer read admin", expires_in=3600)
        s.headers["Authorization"] = f"Bearer {token}"
        yield s


schemathesis.serializer.alias("application/dicom", "application/octet-stream")
# STOW-RS bodies: arbitrary bytes sent as multipart/related (no boundary, no DICOM parts);
# the node must refuse them with a declared 400/415, never a 5xx. Real STOW requests are
# covered by tests/unit/rest/test_stow.py and the ACR end-to-end tests.
schemathesis.serializer.alias("multipart/related", "application/octet-stream")
schema = schemathesis.openapi.from_dict(openapi_document())


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_conforms(case: Any, live: LiveNode, session: requests.Session) -> None:
    case.call_and_validate(base_url=live.base_url, session=session, checks=CHECKS, timeout=60)
