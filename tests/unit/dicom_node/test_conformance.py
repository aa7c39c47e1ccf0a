"""The DICOM Conformance Statement (dicom_node.conformance, `dicom-node conformance`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.config import load_settings
from dicom_node.conformance import statement
from dicom_node.identity import IMPLEMENTATION_CLASS_UID
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES

DOC = Path(__file__).resolve().parents[3] / "docs" / "conformance.md"


def test_the_committed_statement_is_the_defaults_one() -> None:
    """docs/conformance.md is what the code says; it drifts the day a list changes."""
    written = statement(load_settings(None, environ={}))
    assert DOC.read_text() == written, (
        "docs/conformance.md is out of date: DICOM_NODE_CONFIG= dicom-node conformance "
        "> docs/conformance.md")


def test_it_says_what_the_listener_accepts_in_its_order() -> None:
    text = statement(load_settings(None, environ={}))
    rows = [line for line in text.splitlines() if line.startswith("| ")
            and line.split("|")[3].strip(" `") in ACCEPTED_TRANSFER_SYNTAXES]
    assert [r.split("|")[3].strip(" `") for r in rows] == ACCEPTED_TRANSFER_SYNTAXES
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, 17))
    assert IMPLEMENTATION_CLASS_UID in text
    assert "| Computed Radiography Image Storage | `1.2.840.10008.5.1.4.1.1.1` |" in text


def test_a_configured_ae_title_is_described(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data")},
        "dimse": {"ae_title": "AIROUTER", "port": 4242, "max_associations": 7},
        "sources": [{"name": "ct1", "ae_title": "CT1", "host": "10.0.0.5"}],
        "ae_titles": [{"ae_title": "ARCHIVE", "grouping": "series", "timeout_s": 30,
                       "complete_on_release": False, "sources": ["ct1"],
                       "reject_unknown_sources": True,
                       "allowed_sop_classes": ["CTImageStorage"], "duplicates": "keep_first"}],
    }))
    text = statement(load_settings(config, environ={}))
    assert ("| `ARCHIVE` | series | after 30 s | ct1 (others rejected) | CT Image Storage "
            "| keep_first | none (stores only) |") in text
    assert "| associations at once (`dimse.max_associations`) | 7 |" in text
    assert "4242 on 0.0.0.0" in text and "(`AIROUTER`)" in text


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_NODE_CONFIG", raising=False)
    assert main(["conformance"]) == 0
    assert capsys.readouterr().out == DOC.read_text()
