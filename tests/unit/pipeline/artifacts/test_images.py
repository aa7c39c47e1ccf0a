from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.artifacts import (
    write_heatmap_png,
    write_segmentation_overlay_png,
    write_source_png,
)
from pipeline.artifacts.images import (
    heatmap_overlay,
    jet,
    segment_color,
    segmentation_overlay,
    to_uint8,
)
from pipeline.types import ClassificationResult, Segment, SegmentationResult


def test_source_png_is_8bit_gray(tmp_path: Path, tb_result: ClassificationResult) -> None:
    art = write_source_png(tb_result, tmp_path / "s.png")
    assert art.media_type == "image/png"
    img = Image.open(art.path)
    assert (img.format, img.mode, img.size) == ("PNG", "L", (48, 64))
    assert np.array_equal(np.asarray(img), to_uint8(tb_result.image))


def test_heatmap_png_is_rgb_overlay(tmp_path: Path, tb_result: ClassificationResult) -> None:
    art = write_heatmap_png(tb_result, tmp_path / "h.png")
    img = Image.open(art.path)
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (48, 64))
    arr = np.asarray(img).astype(int)
    # The hot spot (heatmap peak near x=16, y=20 after upscaling 4x) is reddish,
    # a cold corner stays gray.
    r, _g, b = arr[21, 17]
    assert r > b + 40
    assert abs(arr[63, 47, 0] - arr[63, 47, 2]) < 10


def test_heatmap_png_requires_heatmap(tmp_path: Path, normal_result: ClassificationResult) -> None:
    with pytest.raises(ValueError):
        write_heatmap_png(normal_result, tmp_path / "h.png")


def test_jet_endpoints() -> None:
    cmap = jet(np.array([0.0, 0.5, 1.0]))
    assert cmap.dtype == np.uint8 and cmap.shape == (3, 3)
    assert cmap[0, 2] > 100 and cmap[0, 0] == 0  # blue
    assert cmap[1, 1] == 255  # green-ish middle
    assert cmap[2, 0] > 100 and cmap[2, 2] == 0  # red


def test_overlay_is_the_alpha_blend_of_jet_over_the_source() -> None:
    """Each pixel: gray * (1 - a) + jet(heat) * a with a = 0.45 * sqrt(heat), to within
    the heat's 8-bit quantisation (a few levels near heat 0, where sqrt is steep)."""
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 1, (40, 30)).astype(np.float32)
    heat = rng.uniform(0, 1, (40, 30)).astype(np.float32)
    heat[0, :5] = [0.0, 1.0, 0.5, 1e-4, 0.999]
    got = np.asarray(heatmap_overlay(image, heat)).astype(np.float32)
    a = (0.45 * np.sqrt(heat))[..., None]
    gray = to_uint8(image).astype(np.float32)[..., None]
    want = gray * (1 - a) + jet(heat).astype(np.float32) * a
    assert np.abs(got - want).max() <= 3.5
    assert np.abs(got - want).mean() < 0.5
    assert (got[0, 0] == gray[0, 0]).all()  # no heat: the source untouched
    # a heatmap of another size is resized to the image first
    assert np.asarray(heatmap_overlay(image, heat[::2, ::2])).shape == (40, 30, 3)


def test_overlay_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        heatmap_overlay(np.zeros((4, 4, 3)), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        heatmap_overlay(np.zeros((4, 4)), np.zeros((4, 4)), alpha=2.0)


def test_segmentation_overlay_png(tmp_path: Path, seg_result: SegmentationResult) -> None:
    art = write_segmentation_overlay_png(seg_result, tmp_path / "o.png")
    img = Image.open(art.path)
    assert img.format == "PNG" and img.mode == "RGB"
    assert img.width > img.height > 256
    colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert (230, 25, 75) in colours  # first segment colour (contour/legend)


def _legend_rows(img: Image.Image, n: int, below: int) -> list[int]:
    """The top row of each legend swatch (segment colours 0..n-1) under the montage."""
    arr = np.asarray(img)[below:]
    rows = []
    for j in range(n):
        hit = np.all(arr == np.asarray(segment_color(j), dtype=np.uint8), axis=-1)
        rows.append(int(np.argwhere(hit)[:, 0].min()) + below)
    return rows


def test_overlay_legend_uses_the_width_it_has() -> None:
    """Four structures under four slices read as one legend row (not 3 + 1); names too
    long for that wrap onto more rows instead of running off the image."""
    labels = np.zeros((8, 64, 64), dtype=np.uint8)
    for k in range(1, 5):
        labels[1:7, 8 * k : 8 * k + 6, 10:50] = k
    volume = np.where(labels > 0, 60.0, -100.0).astype(np.float32)
    short = [Segment(k, f"organ {k}", 10.0 * k) for k in range(1, 5)]
    img = segmentation_overlay(volume, labels, short, slices=4, tile=256)
    rows = _legend_rows(img, 4, below=6 + 18 + 256)
    assert len(set(rows)) == 1
    long = [Segment(k, f"structure with a very long descriptive name {k}", 1.0)
            for k in range(1, 5)]
    img = segmentation_overlay(volume, labels, long, slices=4, tile=256)
    rows = _legend_rows(img, 4, below=6 + 18 + 256)
    assert len(set(rows)) > 1 and img.height > rows[-1] + 12


def test_overlay_keeps_rectangular_pixels_in_proportion() -> None:
    """A coronal reformat: 48 rows of 5 mm by 96 columns of 4 mm (240 x 384 mm) is drawn
    160 x 256, not 128 x 256 (square pixels squashed it)."""
    labels = np.zeros((2, 48, 96), dtype=np.uint8)
    labels[:, 10:30, 20:60] = 1
    volume = np.where(labels > 0, 60.0, -100.0).astype(np.float32)
    organ = [Segment(1, "organ", 1.0)]
    for spacing, height in (((1.0, 1.0), 128), ((5.0, 4.0), 160)):
        img = np.asarray(segmentation_overlay(volume, labels, organ, slices=1, tile=256,
                                              pixel_spacing=spacing))
        gray = img[6 + 18:, 6:6 + 256].max(axis=(1, 2)) > 0  # the tile's rows that show
        assert int(np.argmin(gray)) == height


def test_legend_names_in_other_scripts_are_drawn_not_boxed() -> None:
    """A label with umlauts stays in DejaVu Sans, which has them (Pillow's own font has
    ASCII only); one in Japanese goes to the CJK font, and draws something other than
    DejaVu's empty boxes."""
    from PIL import ImageDraw, ImageFont

    from pipeline.artifacts import fonts
    from pipeline.artifacts.images import _Font

    if not fonts.coverage(fonts.DEJAVU) or fonts.fallback_font() is None:
        pytest.skip("DejaVu Sans or a CJK font is not installed (fonts-dejavu-core, "
                    "fonts-wqy-microhei)")
    small = _Font(12)
    assert fonts.runs("Lungenflügel", small.coverage) == [(False, "Lungenflügel")]
    assert fonts.runs("肝臓 (liver)", small.coverage) == [(True, "肝臓"), (False, " (liver)")]

    def drawn(draw_text: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
        img = Image.new("L", (120, 20))
        draw_text(ImageDraw.Draw(img))
        return np.asarray(img)

    ours = drawn(lambda d: small.draw(d, (0, 0), "肝臓", fill="white"))
    boxes = drawn(lambda d: d.text((0, 0), "肝臓", fill="white",
                                   font=ImageFont.truetype(str(fonts.DEJAVU), 12)))
    assert ours.any() and not np.array_equal(ours, boxes)
