from __future__ import annotations

import shutil

import pytest

from .dicom_check import dciodvfy_executable


def test_missing_dciodvfy_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        dciodvfy_executable()


def test_missing_dciodvfy_fails_when_peers_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_PEERS"):
        dciodvfy_executable()
