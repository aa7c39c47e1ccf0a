"""Which images the chest X-ray model is given, and how they are shaped for it.

Built from the shipped phantoms (samples/cxr: CR, CHEST, PA, 256 x 256) with pydicom:
a knee or hand radiograph, a "for processing" DX, a lateral view said only by its View
Code Sequence, a thumbnail, and non-square radiographs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline.bundle import ASPECT_NOTE_RATIO, load_model
from pipeline.explain import gradcam
from pipeline.io import (
    ImageSizeError,
    SeriesError,
    load_image_2d,
    pixel_aspect,
    select_series,
    series_misfit,
    study_images,
)
from pipeline.runner import PipelineRunner
from pipeline.settings import ModelSpec, PipelineSpec, SeriesRules
from pipeline.train.phantoms_cxr import make_cxr_phantom

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "samples" / "cxr"
MODEL = ROOT / "pipeline" / "models" / "cxr-findings"
# the shipped default's chest rules (configs/node.yaml, dicom_node.config.demo_pipelines)
CHEST = SeriesRules(modalities=["CR", "DX"], body_parts=["CHEST"], view_positions=["PA", "AP"])
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def sample(name: str = "pleural-effusion", **changes: Any) -> Dataset:
    """A sample as a study of its own, with ``changes`` (None deletes an attribute)."""
    ds = pydicom.dcmread(SAMPLES / f"{name}.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    if "SOPClassUID" in changes:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def with_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    pixels = np.ascontiguousarray(pixels.astype(np.uint16))
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return ds


def padded(name: str, rows: int, columns: int) -> np.ndarray:
    """A sample's pixels centred in a rows x columns frame of its own background, as a
    detector larger than the chest would show it (the probe's non-square variants)."""
    raw = pydicom.dcmread(SAMPLES / f"{name}.dcm").pixel_array.astype(np.int64)
    out = np.full((rows, columns), raw.min())
    top, left = (rows - raw.shape[0]) // 2, (columns - raw.shape[1]) // 2
    out[top:top + raw.shape[0], left:left + raw.shape[1]] = raw
    return out


def code_item(value: str, scheme: str, meaning: str) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return Sequence([item])


def save(ds: Dataset, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def runner() -> Iterator[PipelineRunner]:
    r = PipelineRunner([ModelSpec(name="cxr-findings", path=MODEL)],
                       [PipelineSpec(name="cxr", model="cxr-findings", task="classify",
                                     series=CHEST, outputs=["json", "png"])])
    r.start()
    yield r
    r.close()


# -- P2: body part ---------------------------------------------------------------------


@pytest.mark.parametrize("part", ["KNEE", "HAND", "ABDOMEN"])
def test_a_radiograph_of_another_body_part_is_refused_with_the_reason(part: str) -> None:
    """A knee or hand CR (PA view) was read as a chest and got chest findings."""
    with pytest.raises(SeriesError) as info:
        select_series([sample(BodyPartExamined=part)], CHEST)
    assert f"body part {part} not in ['CHEST']" in str(info.value)
    assert info.value.near  # a refusal of a modality the rules take: a skip, with why


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_a_radiograph_that_names_no_body_part_is_read() -> None:
    """Body Part Examined is optional, and many chest images lack it: such an image is
    taken, ranked after one that names the chest; any case, spaces around, is the same."""
    unsaid = sample(BodyPartExamined=None)
    assert select_series([unsaid], CHEST).headers == [unsaid]
    empty = sample(BodyPartExamined="")
    assert select_series([empty], CHEST).headers == [empty]
    chest = sample(BodyPartExamined="chest ")
    assert select_series([unsaid, chest], CHEST).headers == [chest]
    assert select_series([chest, unsaid], CHEST).headers == [chest]


def test_the_anatomic_region_sequence_names_the_body_part_when_body_part_examined_does_not(
) -> None:
    knee = sample(BodyPartExamined=None,
                  AnatomicRegionSequence=code_item(codes.SCT.Knee.value, "SCT", "Knee"))
    with pytest.raises(SeriesError, match=r"body part KNEE \(Anatomic Region Sequence: "
                                          r"Knee\) not in \['CHEST'\]"):
        select_series([knee], CHEST)
    for value, scheme in (("816094009", "SCT"), ("51185008", "SCT"), ("T-D3000", "SRT")):
        chest = sample(BodyPartExamined=None,
                       AnatomicRegionSequence=code_item(value, scheme, "Chest"))
        assert select_series([chest], CHEST).headers == [chest], (value, scheme)
    # a code the node does not know says nothing: taken, as without one
    local = sample(BodyPartExamined=None,
                   AnatomicRegionSequence=code_item("X1", "99LOCAL", "Thorax"))
    assert select_series([local], CHEST).headers == [local]
    # Body Part Examined, when given, is what counts
    said = sample(BodyPartExamined="CHEST",
                  AnatomicRegionSequence=code_item(codes.SCT.Knee.value, "SCT", "Knee"))
    assert select_series([said], CHEST).headers == [said]


# -- P4: "for processing" ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["sop class", "presentation intent"])
def test_a_study_of_only_a_for_processing_image_is_refused(how: str) -> None:
    changes: dict[str, Any] = {"Modality": "DX", "PresentationIntentType": "FOR PROCESSING"}
    changes["SOPClassUID"] = DX_FOR_PROCESSING if how == "sop class" else DX_FOR_PRESENTATION
    raw = sample(**changes)
    with pytest.raises(SeriesError) as info:
        select_series([raw], CHEST)
    assert "for processing: raw detector values" in str(info.value)
    assert "send the For Presentation image" in str(info.value)
    assert info.value.near
    # rules that name the "for processing" class take it (a model trained on raw images)
    raw_rules = CHEST.model_copy(update={"sop_class_uids": [DX_FOR_PROCESSING,
                                                            DX_FOR_PRESENTATION]})
    assert select_series([raw], raw_rules).headers == [raw]


def test_a_presentation_image_is_read_and_the_for_processing_one_named() -> None:
    study = generate_uid()
    shown = sample(Modality="DX", SOPClassUID=DX_FOR_PRESENTATION, StudyInstanceUID=study,
                   PresentationIntentType="FOR PRESENTATION", SeriesNumber=1)
    raw = sample(Modality="DX", SOPClassUID=DX_FOR_PROCESSING, StudyInstanceUID=study,
                 PresentationIntentType="FOR PROCESSING", SeriesNumber=2)
    for files in ([raw, shown], [shown, raw]):
        chosen = select_series(files, CHEST)
        assert chosen.headers == [shown]
        read, unread = study_images(chosen, 8)
        assert [r.header for r in read] == [shown]
        assert unread == ["series 2 image 1 (PA) (for processing: raw detector values)"]


# -- P8: the view in the View Code Sequence ---------------------------------------------


@pytest.mark.parametrize(("value", "scheme", "meaning", "term"), [
    ("R-10236", "SRT", "left lateral", "LL"),      # the probe's file: a retired SNOMED RT code
    ("399173006", "SCT", "left lateral", "LL"),
    ("399198007", "SCT", "right lateral", "RL"),
    ("399067008", "SCT", "lateral", "LATERAL"),
    ("399006002", "SCT", "left posterior oblique", "LEFT POSTERIOR OBLIQUE"),
])
def test_a_lateral_view_said_only_by_its_view_code_is_refused(
        value: str, scheme: str, meaning: str, term: str) -> None:
    for view in ("", None):  # empty, or absent
        lateral = sample(ViewPosition=view,
                         ViewCodeSequence=code_item(value, scheme, meaning))
        with pytest.raises(SeriesError) as info:
            select_series([lateral], CHEST)
        assert (f"view position {term} (View Code Sequence: {meaning}) not in ['AP', 'PA']"
                in str(info.value))


def test_a_frontal_view_code_is_taken_and_a_contradicting_one_refuses() -> None:
    for value, scheme in (("272479007", "SCT"), ("399348003", "SCT"), ("R-10206", "SRT"),
                          ("399033003", "SCT"), ("X-PA", "99LOCAL")):
        frontal = sample(ViewPosition="", ViewCodeSequence=code_item(value, scheme, "x"))
        assert select_series([frontal], CHEST).headers == [frontal], value
    # a PA whose View Code Sequence says left lateral may be a lateral (View Position is
    # often a technologist's default): a frontal-only model does not read it
    said = sample(ViewPosition="PA",
                  ViewCodeSequence=code_item("399173006", "SCT", "left lateral"))
    with pytest.raises(SeriesError, match="view position PA, its View Code Sequence left "
                                          "lateral not in"):
        select_series([said], CHEST)
    agreeing = sample(ViewPosition="PA",
                      ViewCodeSequence=code_item("399348003", "SCT", "postero-anterior"))
    assert select_series([agreeing], CHEST).headers == [agreeing]
    # a coded PA ranks as a frontal view, before an image that does not say
    study = generate_uid()
    coded = sample(ViewPosition="", StudyInstanceUID=study, SeriesNumber=1,
                   ViewCodeSequence=code_item("272479007", "SCT", "postero-anterior"))
    unsaid = sample(ViewPosition=None, StudyInstanceUID=study, SeriesNumber=2)
    assert select_series([unsaid, coded], CHEST).headers == [coded]


# -- P8: a thumbnail -------------------------------------------------------------------


def test_an_image_far_below_the_models_input_is_refused(runner: PipelineRunner,
                                                        tmp_path: Path) -> None:
    """A 32 x 32 "radiograph" was enlarged 4 times and classified (a false Fibrosis)."""
    model = runner.classifier("cxr-findings")
    assert model.size_refusal(64, 64) == "" and model.size_refusal(64, 300) == ""
    assert "63 x 64 pixels, fewer than 64 a side" in model.size_refusal(63, 64)
    raw = pydicom.dcmread(SAMPLES / "pleural-effusion.dcm").pixel_array
    tiny = with_pixels(sample(), raw.reshape(32, 8, 32, 8).mean(axis=(1, 3)))
    path = save(tiny, tmp_path / "in", "tiny")
    with pytest.raises(ImageSizeError) as info:
        runner.run("cxr", [path], tmp_path / "out")
    assert "32 x 32 pixels, fewer than 64 a side" in str(info.value)
    assert "128 x 128 input of model 'cxr-findings'" in str(info.value)
    # beside a full-size image of the study: that one is read, the thumbnail named
    full = sample(StudyInstanceUID=tiny.StudyInstanceUID, SeriesNumber=2)
    out = runner.run("cxr", [path, save(full, tmp_path / "in", "full")], tmp_path / "out2")
    notes = out.result.notes  # type: ignore[union-attr]
    assert any(n.startswith("not read:") and "32 x 32 pixels" in n for n in notes), notes
    # the other ways in refuse it too
    with pytest.raises(ImageSizeError, match="32 x 32 pixels"):
        runner.classify(runner.pipelines["cxr"], load_image_2d(path))


# -- P3: non-square radiographs keep their proportions ----------------------------------


def test_square_images_give_exactly_what_they_gave_before() -> None:
    """Padding touches only non-square images: the samples and the training phantoms
    (square) reach the network bit for bit as without it."""
    padding = load_model(MODEL)
    padding.pad_to_square = True  # the shipped model squashes (its README says why)
    squashing = load_model(MODEL)
    assert not squashing.pad_to_square and padding.square_frame(256, 256) is None
    images = [load_image_2d(SAMPLES / f"{n}.dcm").pixels
              for n in ("normal", "cardiomegaly", "pleural-effusion", "pneumothorax")]
    images += [make_cxr_phantom(seed).image for seed in (0, 1, 10_000_000)]
    for image in images:
        assert torch.equal(padding.preprocess(image), squashing.preprocess(image))


def test_a_non_square_image_is_padded_to_a_square_of_its_background() -> None:
    model = load_model(MODEL)
    model.pad_to_square = True  # a model trained on letterboxed images
    assert model.square_frame(312, 256) == (312, 312, 0, 28)
    assert model.square_frame(256, 352) == (352, 352, 48, 0)
    # pixels twice as high as wide: 128 x 256 of them is a square in millimetres
    assert model.square_frame(128, 256, pixel_aspect=2.0) is None
    assert model.square_frame(128, 300, pixel_aspect=2.0) == (150, 300, 11, 0)
    image = np.random.default_rng(0).random((40, 100)).astype(np.float32) + 0.2
    square = np.full((100, 100), image.min(), np.float32)
    square[30:70] = image
    assert torch.equal(model.preprocess(image), model.preprocess(square))


def test_the_heatmap_of_a_padded_image_lies_on_its_own_pixels() -> None:
    """The heatmap comes back at the image's size from the padded square the model saw:
    the same pixels placed in that square by hand give the same heatmap there."""
    torch.set_num_threads(2)
    model = load_model(MODEL)
    model.pad_to_square = True
    wide = padded("pleural-effusion", 256, 352).astype(np.float32)
    wide /= wide.max()
    square = np.full((352, 352), wide.min(), np.float32)
    square[48:304] = wide
    assert torch.equal(model.preprocess(wide), model.preprocess(square))
    heat = gradcam(model, wide, "Pleural Effusion")
    whole = gradcam(model, square, "Pleural Effusion")[48:304]
    whole = (whole - whole.min()) / (whole.max() - whole.min())
    assert heat.shape == (256, 352)
    np.testing.assert_allclose(heat, whole, atol=1e-5)


def test_pixel_aspect_from_the_header(tmp_path: Path) -> None:
    raw = pydicom.dcmread(SAMPLES / "normal.dcm").pixel_array
    assert pixel_aspect(load_image_2d(sample("normal"))) == 1.0
    tall = sample("normal", PixelSpacing=[2.8, 1.4], ImagerPixelSpacing=[2.8, 1.4])
    assert pixel_aspect(load_image_2d(tall)) == pytest.approx(2.0)
    imager = sample("normal", PixelSpacing=None, ImagerPixelSpacing=[0.1, 0.2])
    assert pixel_aspect(load_image_2d(imager)) == pytest.approx(0.5)
    ratio = sample("normal", PixelSpacing=None, ImagerPixelSpacing=None,
                   PixelAspectRatio=[3, 2])
    assert pixel_aspect(load_image_2d(ratio)) == pytest.approx(1.5)
    # stored on its side (rows are the patient's feet-head): turned upright, the pixels'
    # height is the stored width
    side = with_pixels(sample("normal", PatientOrientation=["F", "L"],
                              PixelSpacing=[2.8, 1.4]), np.ascontiguousarray(raw.T))
    assert pixel_aspect(load_image_2d(side)) == pytest.approx(0.5)


def test_a_non_square_radiograph_is_noted_and_square_ones_are_not(
        runner: PipelineRunner, tmp_path: Path) -> None:
    """The probe's normal chest padded to 312 x 256 was read "Abnormal, Pneumothorax
    0.93" with no note. The demo model, trained on square phantoms that the chest fills,
    squashes it (padding misreads more): the result says how the image was fitted."""
    portrait = with_pixels(sample("normal"), padded("normal", 312, 256))
    out = runner.run("cxr", [save(portrait, tmp_path / "in", "portrait")], tmp_path / "out")
    notes = out.result.notes  # type: ignore[union-attr]
    assert notes == ["the image is 312 x 256 pixels (aspect ratio 1.22), resized to the "
                     "model's 128 x 128 input without keeping its proportions (squashed): "
                     "the model may read it less reliably"]
    assert out.result.image.shape == out.result.heatmap.shape == (312, 256)  # type: ignore
    square = runner.run("cxr", [save(sample("normal"), tmp_path / "in", "square")],
                        tmp_path / "out2")
    assert square.result.result == "Normal" and square.result.notes == []  # type: ignore
    # only just off square: no note (the threshold is the long side over the short one)
    near = with_pixels(sample("normal"), padded("normal", 256, int(256 * ASPECT_NOTE_RATIO)))
    out = runner.run("cxr", [save(near, tmp_path / "in", "near")], tmp_path / "out3")
    assert not any("aspect ratio" in n for n in out.result.notes)  # type: ignore[union-attr]


def test_pixels_twice_as_high_as_wide_are_not_padded(runner: PipelineRunner,
                                                     tmp_path: Path) -> None:
    """128 x 256 pixels of 2.8 x 1.4 mm are a square chest: it is not padded (the resize
    restores it, as it did before) and needs no note; its result is the square one's."""
    raw = pydicom.dcmread(SAMPLES / "pleural-effusion.dcm").pixel_array.astype(np.float64)
    halved = (raw[0::2] + raw[1::2]) / 2
    tall = with_pixels(sample(PixelSpacing=[2.8, 1.4], ImagerPixelSpacing=[2.8, 1.4]), halved)
    out = runner.run("cxr", [save(tall, tmp_path / "in", "tall")], tmp_path / "out")
    assert out.result.notes == []  # type: ignore[union-attr]
    effusion = next(f for f in out.result.findings  # type: ignore[union-attr]
                    if f.name == "Pleural Effusion")
    assert effusion.presence and effusion.confidence > 0.99


def test_the_shipped_rules_refuse_a_knee_and_read_a_chest_without_a_body_part() -> None:
    from dicom_node.config import load_settings

    rules = next(p for p in load_settings(environ={}).pipelines
                 if p.name == "cxr-findings").series
    misfit = series_misfit([sample(BodyPartExamined="KNEE")], rules)
    assert misfit is not None and "body part KNEE not in ['CHEST']" in misfit
    assert series_misfit([sample(BodyPartExamined=None)], rules) is None
    assert series_misfit([sample()], rules) is None
