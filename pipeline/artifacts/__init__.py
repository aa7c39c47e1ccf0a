"""Result artifacts: predictions JSON, PNGs, PDF reports and DICOM outputs."""

from pipeline.artifacts._common import MAX_PATIENT_ID, SeriesInfo, validate_patient_id
from pipeline.artifacts.encapsulated import write_encapsulated_pdf
from pipeline.artifacts.images import (
    write_heatmap_png,
    write_segmentation_overlay_png,
    write_source_png,
)
from pipeline.artifacts.predictions import (
    build_api_data,
    build_predictions,
    write_predictions_json,
    write_volumes_json,
)
from pipeline.artifacts.report import write_classification_report, write_segmentation_report
from pipeline.artifacts.sc import write_secondary_capture
from pipeline.artifacts.seg import seg_can_reference, write_segmentation
from pipeline.artifacts.sr import build_classification_sr, build_segmentation_sr, write_sr
from pipeline.artifacts.write import (
    HEATMAP_OUTPUTS,
    write_classification_artifacts,
    write_segmentation_artifacts,
)

__all__ = [
    "HEATMAP_OUTPUTS",
    "MAX_PATIENT_ID",
    "SeriesInfo",
    "build_api_data",
    "build_classification_sr",
    "build_predictions",
    "build_segmentation_sr",
    "seg_can_reference",
    "validate_patient_id",
    "write_classification_artifacts",
    "write_classification_report",
    "write_encapsulated_pdf",
    "write_heatmap_png",
    "write_predictions_json",
    "write_secondary_capture",
    "write_segmentation",
    "write_segmentation_artifacts",
    "write_segmentation_overlay_png",
    "write_segmentation_report",
    "write_source_png",
    "write_sr",
    "write_volumes_json",
]
