from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog.testing
from PIL import Image

from pipeline.artifacts import fonts, report, write_classification_report, write_segmentation_report
from pipeline.artifacts.report import format_age, format_date, format_person_name
from pipeline.types import ClassificationResult, PatientStudy, SegmentationResult


def _render(pdf: Path, tmp_path: Path) -> list[Path]:
    exe = shutil.which("pdftoppm")
    if exe is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    subprocess.run(
        [exe, "-png", "-r", "40", str(pdf), str(tmp_path / "page")], check=True, timeout=120
    )
    return sorted(tmp_path.glob("page*.png"))


def _check_pdf(path: Path, tmp_path: Path) -> list[Path]:
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert b"%%EOF" in data[-1024:]
    pages = _render(path, tmp_path)
    assert pages
    for page in pages:
        img = Image.open(page)
        assert img.width > 100 and img.height > img.width
    return pages


def test_classification_report(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy
) -> None:
    art = write_classification_report(tb_result, study, tmp_path / "r.pdf")
    assert (art.kind, art.media_type) == ("pdf", "application/pdf")
    pages = _check_pdf(art.path, tmp_path)
    assert len(pages) == 1  # fits one A4 page with 11 findings


def test_classification_report_normal(
    tmp_path: Path, normal_result: ClassificationResult, study: PatientStudy
) -> None:
    art = write_classification_report(normal_result, study, tmp_path / "r.pdf")
    _check_pdf(art.path, tmp_path)


def test_report_escapes_markup_and_unicode(tmp_path: Path, tb_result: ClassificationResult) -> None:
    study = PatientStudy(patient_id="P<1>&", patient_name="Ünal^Zoë", study_description="<b>")
    art = write_classification_report(tb_result, study, tmp_path / "r.pdf")
    _check_pdf(art.path, tmp_path)


def test_segmentation_report(
    tmp_path: Path, seg_result: SegmentationResult, study: PatientStudy
) -> None:
    art = write_segmentation_report(seg_result, study, tmp_path / "r.pdf")
    _check_pdf(art.path, tmp_path)


def test_formatters() -> None:
    assert format_date("20250314") == "2025-03-14"
    assert format_date("") == "—"
    assert format_age("045Y") == "45 years"
    assert format_age("003M") == "3 months"
    # Unicode digits a sender's file may hold pass isdigit() but not int(): shown as is
    wide = "".join(chr(0xFF10 + int(d)) for d in "20250314")  # full-width digits
    assert format_age("¹²³Y") == "¹²³Y" and format_date(wide) == wide
    assert format_person_name("Doe^John") == "Doe, John"
    assert format_person_name("Doe^John^Q") == "Doe, John Q"
    assert format_person_name("") == "—"
    # PN component groups: alphabetic = ideographic = phonetic
    assert format_person_name("Yamada^Tarou=山田^太郎=やまだ^たろう") == "Yamada, Tarou (山田 太郎)"
    assert format_person_name("=山田^太郎") == "山田 太郎"
    assert format_person_name("==やまだ^たろう") == "やまだ たろう"
    assert format_person_name("Doe^John==") == "Doe, John"


def _page_texts(pdf: Path) -> list[str]:
    """Each page's text as ``pdftotext -layout`` lays it out."""
    exe = shutil.which("pdftotext")
    if exe is None:
        pytest.skip("pdftotext (poppler-utils) is not installed")
    out = subprocess.run([exe, "-layout", str(pdf), "-"], check=True, timeout=120,
                         capture_output=True, text=True)
    return out.stdout.split("\f")


def _text(pdf: Path) -> str:
    """The whole text, whitespace collapsed."""
    return " ".join(" ".join(_page_texts(pdf)).split())


def test_classification_report_says_what_a_reader_needs(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy
) -> None:
    """Patient and study data, every finding with its confidence, the model and version,
    and that it is not for diagnostic use: read back from the PDF's text."""
    text = _text(write_classification_report(tb_result, study, tmp_path / "r.pdf").path)
    for expected in ("Patient ID PAT001", "Patient name Doe, John", "Sex M", "Age 45 years",
                     "Study date 2025-03-14", "Accession no. ACC12345", "CHEST PA",
                     f"Study UID {study.study_instance_uid}",
                     f"OVERALL RESULT {tb_result.result}",
                     f"Model {tb_result.model_name}",
                     f"Model version v{tb_result.model_version.lstrip('v')}",
                     "Source image", "Heatmap", "NOT FOR DIAGNOSTIC USE"):
        assert expected in text, expected
    for f in tb_result.findings:  # each with its presence and confidence, in the table
        row = f"{f.name} {'Present' if f.presence else 'Absent'} {f.confidence * 100:.1f} %"
        assert row in text, row


def test_segmentation_report_says_what_a_reader_needs(
    tmp_path: Path, seg_result: SegmentationResult, study: PatientStudy
) -> None:
    text = _text(write_segmentation_report(seg_result, study, tmp_path / "s.pdf").path)
    version = seg_result.model_version.lstrip("v")
    for expected in ("Patient ID PAT001", "Patient name Doe, John", "Study date 2025-03-14",
                     f"Model {seg_result.model_name}", f"Model version v{version}",
                     f"Source series {seg_result.series_instance_uid}", "Overlay",
                     "NOT FOR DIAGNOSTIC USE"):
        assert expected in text, expected
    for seg in seg_result.segments:  # each structure with its label and volume in mL
        row = f"{seg.name} {seg.label} {seg.volume_ml:.1f}"
        assert row in text, row
    assert f"Total {sum(s.volume_ml for s in seg_result.segments):.1f}" in text


def test_long_ids_wrap_at_their_separators(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy
) -> None:
    """A 64-character Patient ID and accession number are cut only after their own
    separators, never inside a part a reader has to copy; the Model heading stays on
    the page of its table."""
    long_id = "HOSPITAL-NORTH-RADIOLOGY-DEPARTMENT-CHEST-2024-000123456789_SITE.A"
    study = PatientStudy(**{**study.__dict__, "patient_id": long_id,
                            "accession_number": "RIS.2024.11.000000000000000000123456"})
    pdf = write_classification_report(tb_result, study, tmp_path / "r.pdf").path
    pages = _page_texts(pdf)
    text = "\f".join(pages)
    for part in ("HOSPITAL-", "RADIOLOGY-", "DEPARTMENT-", "000123456789_",
                 "11.", "000000000000000000123456"):
        assert part in text, part
    assert long_id not in " ".join(text.split())  # it did need more than one line
    model_page = next(p for p in pages if "Model version" in p)
    assert "\nModel\n" in model_page or model_page.lstrip().startswith("Model")


def _embedded_images(pdf: Path) -> list[tuple[int, int, int]]:
    """(width, height, x-ppi) of each image in the PDF, as ``pdfimages -list`` reads them."""
    exe = shutil.which("pdfimages")
    if exe is None:
        pytest.skip("pdfimages (poppler-utils) is not installed")
    out = subprocess.run([exe, "-list", str(pdf)], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
    return [(int(r[3]), int(r[4]), int(r[12])) for r in rows]


def test_report_images_are_embedded_at_print_resolution(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy
) -> None:
    """A radiograph of thousands of pixels goes into the PDF at about 300 dpi of its
    printed size, not at full size; a small image is not blown up."""
    y, x = np.mgrid[0:3000, 0:2400].astype(np.float32)
    big = dataclasses.replace(tb_result, image=(x + y) / (x + y).max())
    pdf = write_classification_report(big, study, tmp_path / "big.pdf").path
    images = _embedded_images(pdf)
    assert images
    for width, height, ppi in images:
        assert ppi <= 301, (width, height, ppi)
        assert width < 1200 and height < 1200
    small = write_classification_report(tb_result, study, tmp_path / "small.pdf").path
    assert max(w for w, _, _ in _embedded_images(small)) <= 64  # the 48x64 source as it is


def _fallback_font_installed() -> bool:
    if fonts.fallback_font() is not None:
        return True
    if os.environ.get("REQUIRE_PEERS") == "1":
        pytest.fail("REQUIRE_PEERS=1 but no CJK font is installed (fonts-wqy-microhei)")
    pytest.skip("no CJK font installed (Debian fonts-wqy-microhei)")


def _fonts_of(pdf: Path) -> str:
    exe = shutil.which("pdffonts")
    if exe is None:
        pytest.skip("pdffonts (poppler-utils) is not installed")
    return subprocess.run([exe, str(pdf)], check=True, timeout=60, capture_output=True,
                          text=True).stdout


def test_cjk_text_is_set_in_the_fallback_font(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy
) -> None:
    """A Japanese name and a Korean description print in the CJK font, embedded, and
    read back as text; the Latin text around them stays in the report's own font."""
    _fallback_font_installed()
    regular, _ = report._fonts()
    runs = report._runs("Yamada, Tarou (山田 太郎)", regular)
    assert runs == [(regular, "Yamada, Tarou ("), (report.FALLBACK_FONT, "山田"),
                    (regular, " "), (report.FALLBACK_FONT, "太郎"), (regular, ")")]
    cjk = dataclasses.replace(study, patient_name="Yamada^Tarou=山田^太郎",
                              study_description="胸部 正面 한국어 <검사>")
    pdf = write_classification_report(tb_result, cjk, tmp_path / "r.pdf").path
    fonts = [line.split()[0] for line in _fonts_of(pdf).splitlines()[2:]]
    embedded = {name.split("+")[-1] for name in fonts}
    assert len(embedded & {"WenQuanYiMicroHei-0", "WenQuanYiZenHei", "DroidSansFallback"}) == 1
    text = _text(pdf)
    assert "Patient name Yamada, Tarou (山田 太郎)" in text
    if "DroidSansFallback" not in embedded:  # the one of the three without Hangul
        assert "胸部 正面 한국어 <검사>" in text


@pytest.fixture
def no_cjk_font(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As on a machine with none of the fallback fonts."""
    monkeypatch.setattr(fonts, "FALLBACK_FONTS", ())
    monkeypatch.setattr(fonts, "_warned", [])
    fonts.fallback_font.cache_clear()
    yield
    fonts.fallback_font.cache_clear()  # the real fonts again for the next test


def test_text_without_a_glyph_anywhere_still_writes_the_report(
    tmp_path: Path, tb_result: ClassificationResult, study: PatientStudy, no_cjk_font: None,
) -> None:
    """No CJK font installed: the name prints as the main font's empty boxes, the report
    is written all the same, and the log says once what to install."""
    regular, _ = report._fonts()
    with structlog.testing.capture_logs() as logs:
        assert report._runs("山田 Tarou", regular) == [(regular, "山田 Tarou")]
        report._runs("太郎", regular)
    (warning,) = logs
    assert warning["script"] == "CJK" and "fonts-wqy-microhei" in warning["install"]
    assert "山" not in str(warning)  # no part of a name in the log
    cjk = dataclasses.replace(study, patient_name="=山田^太郎")
    _check_pdf(write_classification_report(tb_result, cjk, tmp_path / "r.pdf").path, tmp_path)
