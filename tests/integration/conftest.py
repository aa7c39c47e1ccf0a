"""Integration fixtures: a real Orthanc PACS (with DICOMweb) on loopback.

``orthanc``: a fresh, empty Orthanc for one test (AET ``ORTHANC``, no auth).
``orthanc_factory``: start Orthancs with other settings, e.g. a modality for
C-MOVE or Basic-auth users; every one started is stopped when the test ends::

    def test_move(orthanc_factory):
        pacs = orthanc_factory(modalities={"NODE": ("NODEAE", "127.0.0.1", node_port)})
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from typing import Any

import pytest

from tests.support.orthanc import Orthanc, OrthancFactory, orthanc_server


@pytest.fixture
def orthanc_factory() -> Iterator[OrthancFactory]:
    """A function ``(aet=, modalities=, users=, dicom_server=, extra=) -> Orthanc``."""
    with ExitStack() as stack:

        def start(*, aet: str = "ORTHANC",
                  modalities: Mapping[str, tuple[str, str, int]] | None = None,
                  users: Mapping[str, str] | None = None,
                  dicom_server: bool = True,
                  extra: Mapping[str, Any] | None = None) -> Orthanc:
            return stack.enter_context(orthanc_server(aet=aet, modalities=modalities,
                                                      users=users, dicom_server=dicom_server,
                                                      extra=extra))

        yield start


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> Orthanc:
    """A fresh, empty Orthanc with default settings, stopped after the test."""
    return orthanc_factory()
