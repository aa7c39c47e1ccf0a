"""Seed 001: ``POST /single_inference`` — one DICOM file on the server, one classification.

The request names a ``.dcm`` file on the server; the answer is the overall result,
the findings, the source image and a Grad-CAM heatmap, either as files written
under ``<output_folder_path>/<patient_id>/`` (``save_to_disk: true``) or as base64
PNG strings in the response. Validation follows the seed's table, message for
message; server-side paths must resolve, after following links, inside
``rest.allowed_roots``.

The model is the pipeline ``rest.single_inference_pipeline`` (else the first
classify pipeline), run through the node's :class:`~pipeline.runner.PipelineRunner`.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydicom.dataset import Dataset

from dicom_node.config import Settings
from dicom_node.logs import get_logger
from pipeline import artifacts as art
from pipeline.io import (
    InputError,
    UnreadableFileError,
    load_image_2d,
    read_dataset,
    series_misfit,
)
from pipeline.settings import Output, PipelineSpec, Task
from rest.app import NODE, Route, json_body
from rest.errors import ApiError, ErrorStyle

if TYPE_CHECKING:
    from pipeline.runner import PipelineRunner

log = get_logger("rest.single_inference")

SUCCESS_MESSAGE = "Inference completed successfully."
# The files of seed 001's output folder (the DICOM outputs are for PACS jobs, not here).
OUTPUTS = (Output.JSON, Output.PNG, Output.PDF)


@dataclass(frozen=True)
class SingleInferenceRequest:
    """A request that passed the seed's validation; paths are resolved and inside the roots."""

    input_path: Path
    save_to_disk: bool
    patient_id: str  # from the request, else the DICOM PatientID
    output_dir: Path | None  # resolved output_folder_path; set when save_to_disk
    output_folder_raw: str | None  # as the caller wrote it, for messages


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def allowed_roots(settings: Settings) -> list[Path]:
    """The configured roots, absolute and with links resolved (relative: to the data dir)."""
    return [settings.path(r).resolve() for r in settings.rest.allowed_roots]


def resolve_inside(raw: Any, roots: Sequence[Path]) -> Path | None:
    """``raw`` resolved (links followed) when it is an absolute path inside ``roots``."""
    if not isinstance(raw, str) or not raw or "\x00" in raw or not os.path.isabs(raw):
        return None
    try:
        resolved = Path(raw).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long
        return None
    return resolved if any(resolved.is_relative_to(r) for r in roots) else None


def _check_patient_id(value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(f"Invalid patient_id: '{value}' in request body")
    try:
        value.encode("utf-8")  # a lone surrogate from JSON cannot name a file
        return art.validate_patient_id(value)
    except ValueError:
        raise _bad(f"Invalid patient_id: '{value}' in request body") from None


def validate(body: Any, settings: Settings) -> SingleInferenceRequest:
    """Check a request body against seed 001's validation table (reads the file's header).

    Raises ApiError 400 with the seed's message for the first problem found.
    """
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object")
    for field in ("input_image_path", "save_to_disk"):
        if body.get(field) is None:
            raise _bad(f"{field} is required in the request")
    save = body["save_to_disk"]
    if not isinstance(save, bool):
        raise _bad(f"Invalid value for save_to_disk, should be a boolean: {save}")
    given = body.get("patient_id")
    requested_pid = _check_patient_id(given) if given is not None else None
    out_raw = body.get("output_folder_path")
    if save and (out_raw is None or out_raw == ""):
        raise _bad("output_folder_path is required in the request when save_to_disk is True")

    roots = allowed_roots(settings)
    raw = body["input_image_path"]
    path = resolve_inside(raw, roots)
    if path is None:
        raise _bad(f"Invalid path input_image_path: {raw} (not an absolute path inside "
                   "the allowed roots)")
    output_dir = None
    if save:
        output_dir = resolve_inside(out_raw, roots)
        if output_dir is None:
            raise _bad(f"Invalid path output_folder_path: {out_raw} (not an absolute path "
                       "inside the allowed roots)")
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise _bad(f"Input image path does not exist: {raw}") from None
    except OSError as exc:  # a name too long, a folder it may not enter
        raise _bad(f"Invalid path input_image_path: {raw} ({exc.strerror})") from None
    # the name asked for decides (a link named .dcm may point at a file named otherwise)
    if Path(raw).suffix.lower() != ".dcm" or not stat.S_ISREG(mode):
        raise _bad(f"Requested image is not a DICOM file: {raw}")
    try:
        header = read_dataset(path, stop_before_pixels=True)
    except UnreadableFileError:
        raise _bad(f"Invalid DICOM image, unable to fetch patient ID: {raw}") from None
    patient_id = requested_pid if requested_pid is not None else _dicom_patient_id(header)
    if not patient_id.strip():
        raise _bad(f"Patient ID is empty or None in the DICOM image and no patient_id was "
                   f"given in the request: {raw}")
    if save and requested_pid is None:
        try:
            art.validate_patient_id(patient_id)
        except ValueError:  # e.g. "12/34": it cannot name a folder
            raise _bad(f"Invalid patient_id: '{patient_id}' in the DICOM PatientID; give a "
                       "patient_id in the request body") from None
    if output_dir is not None:
        holder = settings.node_folder_holding(output_dir / patient_id)
        if holder is not None:  # it would replace or feed what the node keeps there
            raise _bad(f"Invalid path output_folder_path: {out_raw} (the results would go "
                       f"inside the node's own folder {holder}; name a folder of your own)")
    return SingleInferenceRequest(path, save, patient_id, output_dir,
                                  out_raw if save else None)


def _dicom_patient_id(header: Dataset) -> str:
    try:
        return str(header.get("PatientID", "") or "")
    except Exception:  # a malformed element: treat as no Patient ID
        return ""


def pipeline_for(settings: Settings, runner: PipelineRunner | None) -> PipelineSpec:
    """The classify pipeline this route runs; ApiError 503 when there is none."""
    if runner is None:
        raise ApiError(503, "Single Inference is not available: the inference pipeline is "
                            "not running on this node")
    name = settings.rest.single_inference_pipeline
    if name is None:
        name = next((p.name for p in settings.pipelines if p.task is Task.CLASSIFY), None)
    if name is None or name not in runner.pipelines:
        raise ApiError(503, "Single Inference is not available: no classify pipeline is "
                            "configured")
    spec = runner.pipelines[name]
    if spec.model in runner.failed:
        raise ApiError(503, f"Single Inference is not available: model {spec.model!r} failed "
                            "to load")
    return spec


def run(runner: PipelineRunner, spec: PipelineSpec, req: SingleInferenceRequest,
        ) -> dict[str, Any]:
    """Classify the image and build the response's ``Data``; writes files when asked.

    Blocking (model, Grad-CAM, files): call it in a worker thread.
    """
    if req.save_to_disk:  # before the model runs: a folder that cannot be made fails fast
        _patient_folder(req)
    try:
        image = load_image_2d(req.input_path, modalities=spec.series.modalities or None)
    except InputError as exc:
        raise _bad(f"Requested image cannot be analysed by {spec.name}: {exc.message}") from None
    # The pipeline's other rules too (a lateral view for a PA/AP model): the same file
    # sent by C-STORE would be skipped, not classified.
    if (misfit := series_misfit([image.header], spec.series)) is not None:
        raise _bad(f"Requested image cannot be analysed by {spec.name}: {misfit}")
    model = runner.classifier(spec.model, spec.model_version)
    if small := model.size_refusal(*image.pixels.shape[-2:]):
        raise _bad(f"Requested image cannot be analysed by {spec.name}: {small}")
    result, study = runner.classify(spec, image, req.patient_id)
    if req.save_to_disk:
        assert req.output_dir is not None
        written = art.write_classification_artifacts(result, study, image.header,
                                                     req.output_dir, OUTPUTS)
        predictions = next(a.path for a in written if a.path.name.endswith("_predictions.json"))
        data: dict[str, Any] = json.loads(predictions.read_text(encoding="utf-8"))
    else:
        data = art.build_api_data(result, study)
    # The response lists the findings present; the predictions JSON keeps all of them
    # (seed 001: a Normal response has "findings": [], the JSON "the full inference output").
    data["findings"] = [f for f in data["findings"] if f["presence"]]
    return data


def _patient_folder(req: SingleInferenceRequest) -> Path:
    """Create ``<output_folder_path>/<patient_id>/``; ApiError 500 when that fails."""
    assert req.output_dir is not None
    folder = req.output_dir / req.patient_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApiError(500, f"Unable to create output folder: "
                            f"{os.path.join(req.output_folder_raw or '', req.patient_id)} "
                            f"({exc.strerror or type(exc).__name__})") from None
    # A patient folder that is a link elsewhere must not receive files.
    if not folder.resolve().is_relative_to(req.output_dir):
        raise _bad(f"Invalid path output_folder_path: {req.output_folder_raw} "
                   f"({req.patient_id} links outside it)")
    return folder


async def single_inference(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        body = await json_body(request)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, 4300-digit ints, deep nesting
        raise _bad("The request body is not valid JSON") from None
    settings = node.settings
    req = await asyncio.to_thread(validate, body, settings)
    spec = pipeline_for(settings, node.runner)
    assert node.runner is not None
    data = await asyncio.to_thread(run, node.runner, spec, req)
    log.info("single inference", pipeline=spec.name, result=data["result"],
             save_to_disk=req.save_to_disk)
    return web.json_response({"Result": "Success", "Data": data, "Message": SUCCESS_MESSAGE})


def routes() -> list[Route]:
    return [Route("POST", "/single_inference", single_inference, scope="infer",
                  style=ErrorStyle.SEED_001)]
