from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.artifacts import build_api_data, write_predictions_json
from pipeline.types import ClassificationResult, PatientStudy

from .conftest import LABELS

SEED_KEYS = ["result", "findings", "source_image", "heatmap", "metadata"]
SEED_METADATA_KEYS = [
    "model_version",
    "patient_id",
    "patient_name",
    "sop_instance_uid",
    "age",
    "sex",
]


def _check_shape(data: dict, result: ClassificationResult, study: PatientStudy) -> None:
    assert list(data) == SEED_KEYS
    assert data["result"] == result.result
    assert [f["name"] for f in data["findings"]] == LABELS
    for item, finding in zip(data["findings"], result.findings, strict=True):
        assert list(item) == ["name", "presence", "confidence"]
        assert isinstance(item["presence"], bool) and item["presence"] == finding.presence
        assert isinstance(item["confidence"], float)
        assert item["confidence"] == pytest.approx(finding.confidence, abs=1e-4)
    assert list(data["metadata"]) == SEED_METADATA_KEYS
    assert data["metadata"] == {
        "model_version": "v1.0.1",
        "patient_id": "PAT001",
        "patient_name": "John Doe",
        "sop_instance_uid": result.sop_instance_uid,
        "age": "045Y",
        "sex": "M",
    }
    assert all(isinstance(v, str) for v in data["metadata"].values())


def test_predictions_json_matches_seed(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy
) -> None:
    src, heat = tmp_path / "PAT001_source_image.png", tmp_path / "PAT001_heatmap.png"
    art = write_predictions_json(tb_result, study, tmp_path / "PAT001_predictions.json", src, heat)
    assert art.kind == "json" and art.media_type == "application/json"
    data = json.loads(art.path.read_text(encoding="utf-8"))
    _check_shape(data, tb_result, study)
    assert data["source_image"] == str(src)
    assert data["heatmap"] == str(heat)
    present = [f["name"] for f in data["findings"] if f["presence"]]
    assert present == ["Tuberculosis", "Consolidation"]


def test_normal_result_has_empty_heatmap(
    tmp_path: Path, normal_result: ClassificationResult, study: PatientStudy
) -> None:
    art = write_predictions_json(
        normal_result, study, tmp_path / "p.json", tmp_path / "s.png", None
    )
    data = json.loads(art.path.read_text())
    _check_shape(data, normal_result, study)
    assert data["heatmap"] == ""
    # Even when a heatmap path is passed, Normal means "".
    data = build_api_data(
        normal_result, study, source_image_path=tmp_path / "s.png", heatmap_path=tmp_path / "h.png"
    )
    assert data["heatmap"] == ""


def test_abnormal_without_heatmap_path_raises(
    tb_result: ClassificationResult, study: PatientStudy, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="heatmap_path"):
        build_api_data(tb_result, study, source_image_path=tmp_path / "s.png")


def _png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(raw))


def test_api_data_base64_mode(tb_result: ClassificationResult, study: PatientStudy) -> None:
    data = build_api_data(tb_result, study)
    _check_shape(data, tb_result, study)
    src, heat = _png(data["source_image"]), _png(data["heatmap"])
    assert (src.mode, src.size) == ("L", (48, 64))
    assert (heat.mode, heat.size) == ("RGB", (48, 64))
    json.dumps(data)  # serialisable as the response body


def test_api_data_base64_mode_normal(
    normal_result: ClassificationResult, study: PatientStudy
) -> None:
    data = build_api_data(normal_result, study)
    assert data["heatmap"] == ""
    assert _png(data["source_image"]).mode == "L"
