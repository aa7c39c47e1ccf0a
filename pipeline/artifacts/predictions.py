"""The predictions JSON of seed 001 and the ``Data`` object of its API response."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from pipeline.artifacts._common import atomic_path, person_name
from pipeline.artifacts.images import heatmap_overlay, png_bytes, source_image
from pipeline.types import Artifact, ClassificationResult, PatientStudy, SegmentationResult

__all__ = [
    "NORMAL",
    "build_api_data",
    "build_predictions",
    "build_volumes",
    "write_json",
    "write_predictions_json",
    "write_volumes_json",
]

#: The overall result that carries no heatmap.
NORMAL = "Normal"


def _confidence(value: float) -> float:
    return round(float(value), 4)


def build_predictions(
    result: ClassificationResult,
    study: PatientStudy,
    source_image: str,
    heatmap: str,
) -> dict[str, Any]:
    """The seed-001 predictions object, keys in the seed's order.

    ``source_image`` and ``heatmap`` are paths or base64 PNG strings; ``heatmap`` is
    forced to ``""`` when the result is Normal. Findings keep the model's label order
    (all of them, present or not). The patient name is written as people read it
    (``Doe^John`` -> ``John Doe``, as in the seed's example).
    """
    return {
        "result": result.result,
        "findings": [
            {
                "name": f.name,
                "presence": bool(f.presence),
                "confidence": _confidence(f.confidence),
            }
            for f in result.findings
        ],
        "source_image": source_image,
        "heatmap": "" if result.result == NORMAL else heatmap,
        "metadata": {
            "model_version": result.model_version,
            "patient_id": study.patient_id,
            "patient_name": person_name(study.patient_name),
            "sop_instance_uid": result.sop_instance_uid,
            "age": study.patient_age,
            "sex": study.patient_sex,
        },
    }


def build_api_data(
    result: ClassificationResult,
    study: PatientStudy,
    *,
    source_image_path: Path | None = None,
    heatmap_path: Path | None = None,
) -> dict[str, Any]:
    """The ``Data`` object of a /single_inference response.

    With ``source_image_path`` given (save_to_disk true) the image fields are those
    paths; without it they are base64 PNG strings rendered from ``result``. The
    heatmap is ``""`` when the result is Normal.

    Raises:
        ValueError: when an abnormal result has no heatmap array in base64 mode, or
            no ``heatmap_path`` in path mode.
    """
    abnormal = result.result != NORMAL
    if source_image_path is not None:
        if abnormal and heatmap_path is None and not result.heatmap_note:
            raise ValueError("heatmap_path is required for a result that is not Normal")
        return build_predictions(
            result, study, str(source_image_path),
            str(heatmap_path) if abnormal and heatmap_path is not None else ""
        )
    src = base64.b64encode(png_bytes(source_image(result.image))).decode("ascii")
    heat = ""
    if abnormal and not (result.heatmap is None and result.heatmap_note):
        if result.heatmap is None:
            raise ValueError("the result is not Normal but has no heatmap")
        heat = base64.b64encode(png_bytes(heatmap_overlay(result.image, result.heatmap))).decode(
            "ascii"
        )
    return build_predictions(result, study, src, heat)


def write_json(obj: Any, path: Path, kind: str = "json") -> Artifact:
    """Write ``obj`` as indented UTF-8 JSON and return its artifact.

    Raises:
        TypeError: when ``obj`` is not JSON-serialisable. OSError: when writing fails.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Artifact(kind=kind, path=path, media_type="application/json")


def write_predictions_json(
    result: ClassificationResult,
    study: PatientStudy,
    path: Path,
    source_image_path: Path,
    heatmap_path: Path | None,
) -> Artifact:
    """Write ``<patient_id>_predictions.json`` in the seed-001 shape.

    Raises:
        ValueError: when the result is not Normal and ``heatmap_path`` is None.
        OSError: when writing fails.
    """
    data = build_api_data(
        result, study, source_image_path=Path(source_image_path), heatmap_path=heatmap_path
    )
    return write_json(data, path)


def build_volumes(result: SegmentationResult, study: PatientStudy) -> dict[str, Any]:
    """The segmentation counterpart of the predictions JSON: one volume per structure."""
    return {
        "result": "Segmented",
        "segments": [
            {"label": s.label, "name": s.name, "volume_ml": round(float(s.volume_ml), 3)}
            for s in result.segments
        ],
        "metadata": {
            "model_name": result.model_name,
            "model_version": result.model_version,
            "patient_id": study.patient_id,
            "patient_name": person_name(study.patient_name),
            "series_instance_uid": result.series_instance_uid,
            "age": study.patient_age,
            "sex": study.patient_sex,
            "spacing_mm": [float(v) for v in result.spacing],
        },
        **({"notes": list(result.notes)} if result.notes else {}),
    }


def write_volumes_json(result: SegmentationResult, study: PatientStudy, path: Path) -> Artifact:
    """Write ``<patient_id>_volumes.json``.

    Raises:
        OSError: when writing fails.
    """
    return write_json(build_volumes(result, study), path)
