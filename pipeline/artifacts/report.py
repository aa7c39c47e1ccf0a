"""PDF reports (reportlab) for classification and segmentation results."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image as PILImage
from reportlab import rl_config
from reportlab.graphics.shapes import Drawing, Rect
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from pipeline.artifacts import fonts
from pipeline.artifacts._common import atomic_path, utc_now
from pipeline.artifacts.images import (
    heatmap_overlay,
    png_bytes,
    segment_color,
    segmentation_overlay,
    source_image,
)
from pipeline.artifacts.predictions import NORMAL
from pipeline.types import Artifact, ClassificationResult, PatientStudy, SegmentationResult

__all__ = [
    "DISCLAIMER",
    "format_age",
    "format_date",
    "format_person_name",
    "write_classification_report",
    "write_segmentation_report",
]

#: Multiplication sign for sizes.
TIMES = "\u00d7"
PRINT_DPI = 300  # images in the report get at most this many dots per inch

#: Notice printed prominently on every report and in every page footer.
DISCLAIMER = (
    "NOT FOR DIAGNOSTIC USE. This report was generated automatically by an AI model "
    "and has not been reviewed by a physician. It must not be used as the sole basis "
    "for clinical decisions."
)

NAVY = colors.HexColor("#1F3A5F")
LIGHT = colors.HexColor("#EEF2F7")
GRID = colors.HexColor("#C5CED9")
RED = colors.HexColor("#B42318")
RED_BG = colors.HexColor("#FDECEA")
GREEN = colors.HexColor("#1E7B34")
GREEN_BG = colors.HexColor("#E7F5EA")
AMBER = colors.HexColor("#B54708")
AMBER_BG = colors.HexColor("#FEF3E2")
# A token: a run of characters and the separator it ends with (the last may have none).
_TOKEN = re.compile(r"[^-_./^ ]+[-_./^ ]*|[-_./^ ]+")
_CELL_PADDING = 6  # ReportLab's default left and right padding of a table cell, points
_LABEL_W = 28 * mm  # the label columns of the patient and model tables

_FONT_CACHE: dict[str, tuple[str, str]] = {}
#: The name the fallback font (see :mod:`pipeline.artifacts.fonts`) is registered under.
FALLBACK_FONT = "ReportSansFallback"
_COVERAGE: dict[str, frozenset[int]] = {}  # registered font -> the code points it has


def _fonts() -> tuple[str, str]:
    """Register a Unicode TrueType font (DejaVu, else reportlab's Vera); fall back to Helvetica."""
    if "f" in _FONT_CACHE:
        return _FONT_CACHE["f"]
    import reportlab

    candidates = [
        (
            fonts.DEJAVU,
            fonts.DEJAVU_BOLD,
        ),
        (
            Path(reportlab.__file__).parent / "fonts" / "Vera.ttf",
            Path(reportlab.__file__).parent / "fonts" / "VeraBd.ttf",
        ),
    ]
    chosen = ("Helvetica", "Helvetica-Bold")
    for regular, bold in candidates:
        if regular.is_file() and bold.is_file():
            try:
                pdfmetrics.registerFont(TTFont("ReportSans", str(regular)))
                pdfmetrics.registerFont(TTFont("ReportSans-Bold", str(bold)))
                pdfmetrics.registerFontFamily(
                    "ReportSans",
                    normal="ReportSans",
                    bold="ReportSans-Bold",
                    italic="ReportSans",
                    boldItalic="ReportSans-Bold",
                )
                chosen = ("ReportSans", "ReportSans-Bold")
                break
            except Exception:  # pragma: no cover - broken font file
                continue
    _FONT_CACHE["f"] = chosen
    return chosen


def _coverage(font: str) -> frozenset[int]:
    """The code points a registered TrueType font has glyphs for (empty for others)."""
    if font not in _COVERAGE:
        face = getattr(pdfmetrics.getFont(font), "face", None)
        _COVERAGE[font] = frozenset(getattr(face, "charToGlyph", None) or ())
    return _COVERAGE[font]


def _runs(text: str, font: str) -> list[tuple[str, str]]:
    """``text`` cut into runs of ``(font name, characters)``: ``font``, or
    :data:`FALLBACK_FONT` for what only that one has (see :func:`fonts.runs`)."""
    cut = fonts.runs(text, _coverage(font))
    if any(extra for extra, _ in cut) and FALLBACK_FONT not in pdfmetrics.getRegisteredFontNames():
        fallback = fonts.fallback_font()
        assert fallback is not None  # runs() gives the fallback only what it has
        pdfmetrics.registerFont(TTFont(FALLBACK_FONT, str(fallback), subfontIndex=0))
    return [(FALLBACK_FONT if extra else font, chars) for extra, chars in cut]


def _markup(text: str, font: str) -> str:
    """``text`` escaped as Paragraph markup, the runs :func:`_runs` gives to the fallback
    font wrapped in ``<font>`` (reportlab does not fall back per glyph by itself)."""
    return "".join(escape(chars) if name == font else f'<font name="{name}">{escape(chars)}</font>'
                   for name, chars in _runs(text, font))


def _width(text: str, font: str, size: float) -> float:
    """The printed width of ``text`` in points, fallback runs measured in their font."""
    return float(sum(stringWidth(chars, name, size) for name, chars in _runs(text, font)))


def format_date(value: str) -> str:
    """``YYYYMMDD`` → ``YYYY-MM-DD``; anything else is returned as is (``—`` if empty)."""
    value = (value or "").strip()
    if len(value) == 8 and value.isascii() and value.isdigit():  # not "¹": int() refuses it
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


def format_age(value: str) -> str:
    """DICOM AS (``045Y``) → ``45 years``; other values as is (``—`` if empty)."""
    value = (value or "").strip()
    units = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}
    if len(value) == 4 and value.isascii() and value[:3].isdigit() and value[3] in units:
        return f"{int(value[:3])} {units[value[3]]}"
    return value or "—"


def format_person_name(value: str) -> str:
    """DICOM PN → ``Doe, John`` (``—`` if empty).

    A name with an ideographic group (``Yamada^Tarou=山田^太郎``) reads
    ``Yamada, Tarou (山田 太郎)``; a name given only in ideographic or phonetic
    characters reads ``山田 太郎``, family name first as it is written.
    """
    groups = [[p.strip() for p in g.split("^")] for g in str(value or "").split("=")[:3]]
    alphabetic = _name_group(groups[0], ", ")
    others = [_name_group(g, " ") for g in groups[1:]]
    native = next((n for n in others if n), "")
    if alphabetic and others and others[0]:
        return f"{alphabetic} ({others[0]})"
    return alphabetic or native or "—"


def _name_group(parts: list[str], separator: str) -> str:
    """One PN component group (family^given^middle^prefix^suffix) as the family name
    and then the other parts, the two joined by ``separator``."""
    family, given = [*parts, "", ""][:2]
    rest = " ".join(x for x in (given, *parts[2:]) if x)
    return separator.join(p for p in (family, rest) if p)


def _styles() -> dict[str, ParagraphStyle]:
    regular, bold = _fonts()
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle(
            "t",
            parent=base["Title"],
            fontName=bold,
            fontSize=18,
            leading=22,
            textColor=colors.white,
            alignment=0,
        ),
        "subtitle": ParagraphStyle(
            "st",
            parent=base["Normal"],
            fontName=regular,
            fontSize=9.5,
            textColor=colors.HexColor("#D6E0EC"),
        ),
        "h2": ParagraphStyle(
            "h2",
            parent=base["Heading2"],
            fontName=bold,
            fontSize=11.5,
            textColor=NAVY,
            spaceBefore=6,
            spaceAfter=3,
        ),
        "body": ParagraphStyle(
            "b", parent=base["Normal"], fontName=regular, fontSize=9, leading=11.5
        ),
        "center_label": ParagraphStyle(
            "cl",
            parent=base["Normal"],
            fontName=bold,
            fontSize=8.5,
            leading=11,
            alignment=TA_CENTER,
            textColor=colors.HexColor("#52606D"),
        ),
        "label": ParagraphStyle(
            "l",
            parent=base["Normal"],
            fontName=bold,
            fontSize=8.5,
            leading=11,
            textColor=colors.HexColor("#52606D"),
        ),
        "value": ParagraphStyle(
            "v", parent=base["Normal"], fontName=regular, fontSize=9, leading=11
        ),
        "notice": ParagraphStyle(
            "n", parent=base["Normal"], fontName=bold, fontSize=9, leading=12, textColor=RED
        ),
        "result": ParagraphStyle(
            "r", parent=base["Normal"], fontName=bold, fontSize=20, leading=24, alignment=TA_CENTER
        ),
        "caption": ParagraphStyle(
            "c",
            parent=base["Normal"],
            fontName=regular,
            fontSize=8,
            leading=10,
            alignment=TA_CENTER,
            textColor=colors.HexColor("#52606D"),
        ),
        "cell": ParagraphStyle(
            "cell", parent=base["Normal"], fontName=regular, fontSize=9, leading=11
        ),
        "cellb": ParagraphStyle(
            "cellb", parent=base["Normal"], fontName=bold, fontSize=9, leading=11
        ),
    }


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(_markup(text, style.fontName), style)


def _value(text: str, st: dict[str, ParagraphStyle], width: float) -> Paragraph:
    """A value cell ``width`` points wide. IDs and UIDs are single long words, which
    ReportLab would cut anywhere: lay them out in lines broken after their own
    separators (``-``, ``_``, ``.``, ``^``, ``/``, space) where they fit."""
    style = st["value"]
    room = width - 2 * _CELL_PADDING
    lines: list[str] = []
    line = ""
    for token in _TOKEN.findall(text):
        if line and _width(line + token, style.fontName, style.fontSize) > room:
            lines.append(line)
            line = token.lstrip(" ")
        else:
            line += token
    lines.append(line)
    return Paragraph("<br/>".join(_markup(line.rstrip(" "), style.fontName) for line in lines),
                     style)


def _header(title: str, subtitle: str, st: dict[str, ParagraphStyle], width: float) -> Table:
    t = Table([[_p(title, st["title"])], [_p(subtitle, st["subtitle"])]], colWidths=[width])
    t.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), NAVY),
                ("LEFTPADDING", (0, 0), (-1, -1), 10),
                ("TOPPADDING", (0, 0), (-1, 0), 9),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 9),
            ]
        )
    )
    return t


def _notice(st: dict[str, ParagraphStyle], width: float) -> Table:
    t = Table([[_p(DISCLAIMER, st["notice"])]], colWidths=[width])
    t.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), RED_BG),
                ("BOX", (0, 0), (-1, -1), 1, RED),
                ("LEFTPADDING", (0, 0), (-1, -1), 8),
                ("TOPPADDING", (0, 0), (-1, -1), 5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 6),
            ]
        )
    )
    return t


def _patient_table(
    study: PatientStudy,
    extra: Sequence[tuple[str, str]],
    st: dict[str, ParagraphStyle],
    width: float,
) -> Table:
    pairs = [
        ("Patient ID", study.patient_id or "—"),
        ("Patient name", format_person_name(study.patient_name)),
        ("Sex", study.patient_sex or "—"),
        ("Age", format_age(study.patient_age)),
        ("Birth date", format_date(study.patient_birth_date)),
        ("Study date", format_date(study.study_date)),
        ("Accession no.", study.accession_number or "—"),
        ("Description", study.study_description or "—"),
        *extra,
        ("Study UID", study.study_instance_uid or "—"),
    ]
    lw = _LABEL_W
    vw = width / 2 - lw
    rows: list[list[Any]] = []
    for i in range(0, len(pairs), 2):
        chunk = pairs[i : i + 2]
        if chunk[0][0] == "Study UID":
            uid = _value(chunk[0][1], st, width - lw)
            rows.append([_p(chunk[0][0], st["label"]), uid, "", ""])
            continue
        row: list[Any] = []
        for label, value in chunk:
            row += [_p(label, st["label"]), _value(value, st, vw)]
        if len(chunk) == 1:
            row += ["", ""]
        rows.append(row)
    t = Table(rows, colWidths=[lw, vw, lw, vw])
    style = [
        ("BACKGROUND", (0, 0), (-1, -1), LIGHT),
        ("BOX", (0, 0), (-1, -1), 0.5, GRID),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, -1), 3),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
    ]
    for r, row in enumerate(rows):
        if (
            row[2] == ""
            and row[0] is not None
            and isinstance(row[0], Paragraph)
            and (row[0].text == "Study UID")
        ):
            style.append(("SPAN", (1, r), (3, r)))
    t.setStyle(TableStyle(style))
    return t


def _result_box(
    result: str,
    st: dict[str, ParagraphStyle],
    width: float,
    label: str = "OVERALL RESULT",
    neutral: bool = False,
) -> Table:
    if neutral:
        fg, bg = NAVY, LIGHT
    else:
        fg, bg = (GREEN, GREEN_BG) if result == NORMAL else (RED, RED_BG)
    style = ParagraphStyle("res", parent=st["result"], textColor=fg)
    t = Table([[_p(label, st["center_label"])], [_p(result, style)]], colWidths=[width])
    t.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, -1), bg),
                ("BOX", (0, 0), (-1, -1), 1.5, fg),
                ("ALIGN", (0, 0), (-1, -1), "CENTER"),
                ("TOPPADDING", (0, 0), (-1, 0), 4),
                ("BOTTOMPADDING", (0, -1), (-1, -1), 7),
            ]
        )
    )
    return t


def _bar(value: float, present: bool, width: float = 45 * mm, height: float = 9) -> Drawing:
    value = min(max(float(value), 0.0), 1.0)
    d = Drawing(width, height)
    d.add(Rect(0, 0, width, height, fillColor=colors.HexColor("#E4E7EB"), strokeColor=None))
    d.add(
        Rect(
            0,
            0,
            width * value,
            height,
            fillColor=RED if present else colors.HexColor("#7B8794"),
            strokeColor=None,
        )
    )
    return d


def _findings_table(
    result: ClassificationResult, st: dict[str, ParagraphStyle], width: float
) -> Table:
    head = [_p(h, st["cellb"]) for h in ("Finding", "Presence", "Confidence", "")]
    rows: list[list[Any]] = [head]
    style = [
        ("BACKGROUND", (0, 0), (-1, 0), NAVY),
        ("TEXTCOLOR", (0, 0), (-1, 0), colors.white),
        ("LINEBELOW", (0, 1), (-1, -1), 0.25, GRID),
        ("BOX", (0, 0), (-1, -1), 0.5, GRID),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
    ]
    white = ParagraphStyle("wh", parent=st["cellb"], textColor=colors.white)
    rows[0] = [_p(h, white) for h in ("Finding", "Presence", "Confidence", "")]
    for i, f in enumerate(result.findings, start=1):
        s = st["cellb"] if f.presence else st["cell"]
        rows.append(
            [
                _p(f.name, s),
                _p("Present" if f.presence else "Absent", s),
                _p(f"{float(f.confidence) * 100:.1f} %", s),
                _bar(f.confidence, f.presence),
            ]
        )
        if f.presence:
            style += [
                ("BACKGROUND", (0, i), (-1, i), RED_BG),
                ("LINEBEFORE", (0, i), (0, i), 3, RED),
            ]
        elif i % 2 == 0:
            style.append(("BACKGROUND", (0, i), (-1, i), colors.HexColor("#F7F9FB")))
    if not result.findings:
        rows.append([_p("No findings reported by the model.", st["cell"]), "", "", ""])
        style.append(("SPAN", (0, 1), (-1, 1)))
    t = Table(
        rows, colWidths=[width * 0.38, width * 0.17, width * 0.15, width * 0.30], repeatRows=1
    )
    t.setStyle(TableStyle(style))
    return t


def _print_pixels(w: int, h: int, max_w: float, max_h: float) -> tuple[int, int] | None:
    """The pixel size of a ``w`` x ``h`` image fitted into ``max_w`` x ``max_h`` points
    at :data:`PRINT_DPI`, or None when it has no more pixels than that already (more
    only make the PDF big and slow)."""
    per_pixel = min(max_w / w, max_h / h) * PRINT_DPI / 72  # printed dots per pixel
    if per_pixel >= 1:
        return None
    return max(1, round(w * per_pixel)), max(1, round(h * per_pixel))


def _at_print_size(image: np.ndarray, max_w: float, max_h: float) -> np.ndarray:
    """A 2D float image resampled down to its print size (see :func:`_print_pixels`)."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {arr.shape}")
    size = _print_pixels(arr.shape[1], arr.shape[0], max_w, max_h)
    if size is None:
        return arr
    resized = PILImage.fromarray(arr, mode="F").resize(size, PILImage.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float32)


def _rl_image(img: PILImage.Image, max_w: float, max_h: float) -> Image:
    w, h = img.size
    scale = min(max_w / w, max_h / h)  # points per pixel at the printed size
    size = _print_pixels(w, h, max_w, max_h)
    if size is not None:
        img = img.resize(size, PILImage.Resampling.LANCZOS)
    # reportlab decodes the PNG and deflates the pixels again: compress it lightly
    return Image(io.BytesIO(png_bytes(img, compress_level=1)),
                 width=w * scale, height=h * scale)


def _model_section(
    name: str,
    version: str,
    generated: datetime,
    software: str,
    more: list[tuple[str, str]],
    st: dict[str, ParagraphStyle],
    width: float,
) -> KeepTogether:
    """The "Model" heading and table, kept on one page: model, version, generation time
    (see :func:`_stamp`) and software, then ``more`` (whose last pair spans the full width)."""
    rows = [
        ("Model", name or "—"),
        ("Model version", version or "—"),
        ("Generated", _stamp(generated)),
        ("Software", software),
        *more,
    ]
    return KeepTogether([_p("Model", st["h2"]), _model_table(rows, st, width)])


class _Placeholder(Flowable):  # type: ignore[misc]
    """A grey box with a centred message, standing in for a missing image."""

    def __init__(self, width: float, height: float, text: str) -> None:
        super().__init__()
        self.width, self.height, self.text = width, height, text

    def draw(self) -> None:
        c = self.canv
        c.setFillColor(colors.HexColor("#F2F4F7"))
        c.setStrokeColor(GRID)
        c.rect(0, 0, self.width, self.height, fill=1)
        c.setFillColor(colors.HexColor("#52606D"))
        c.setFont(_fonts()[0], 9)
        lines = self.text.splitlines() or [""]
        y = self.height / 2 + (len(lines) - 1) * 6 - 3
        for line in lines:
            c.drawCentredString(self.width / 2, y, line)
            y -= 12


def _stamp(generated: datetime) -> str:
    """The generation time as the report prints it: with its offset from UTC (``UTC``,
    ``UTC+09:00``) when ``generated`` is aware, "local time" when it is naive (the
    study's times have no known offset, and the report's time is given like them)."""
    text = generated.strftime("%Y-%m-%d %H:%M:%S")
    if generated.tzinfo is None:
        return f"{text} local time"
    offset = generated.strftime("%z")
    return f"{text} UTC" if offset == "+0000" else f"{text} UTC{offset[:3]}:{offset[3:5]}"


def _footer_factory(model: str, generated: datetime) -> Any:
    regular, _ = _fonts()
    stamp = _stamp(generated)
    # The PDF's own CreationDate/ModDate: the same instant and offset (none when the
    # time is local), not the host's clock.
    pdf_date = generated.strftime("D:%Y%m%d%H%M%S")
    if generated.tzinfo is not None:
        offset = generated.strftime("%z")
        pdf_date += f"{offset[:3]}'{offset[3:5]}'"

    def footer(canvas: Canvas, doc: SimpleDocTemplate) -> None:
        canvas.setDateFormatter(lambda *_: pdf_date)
        canvas.saveState()
        w, _h = A4
        canvas.setStrokeColor(GRID)
        canvas.line(doc.leftMargin, 14 * mm, w - doc.rightMargin, 14 * mm)
        canvas.setFont(regular, 7.5)
        canvas.setFillColor(colors.HexColor("#52606D"))
        canvas.drawString(doc.leftMargin, 10 * mm, f"{model} · generated {stamp}")
        canvas.setFillColor(RED)
        canvas.drawCentredString(w / 2, 6 * mm, "NOT FOR DIAGNOSTIC USE")
        canvas.setFillColor(colors.HexColor("#52606D"))
        canvas.drawRightString(w - doc.rightMargin, 10 * mm, f"Page {doc.page}")
        canvas.restoreState()

    return footer


def _model_table(
    rows: Sequence[tuple[str, str]], st: dict[str, ParagraphStyle], width: float
) -> Table:
    """Pairs in two columns; the last pair (a long UID) spans the full width."""
    *short, last = rows
    lw = _LABEL_W
    data: list[list[Any]] = []
    for i in range(0, len(short), 2):
        row: list[Any] = []
        for k, v in short[i : i + 2]:
            row += [_p(k, st["label"]), _value(v, st, width / 2 - lw)]
        data.append(row + [""] * (4 - len(row)))
    data.append([_p(last[0], st["label"]), _value(last[1], st, width - lw), "", ""])
    t = Table(data, colWidths=[lw, width / 2 - lw, lw, width / 2 - lw])
    t.setStyle(
        TableStyle(
            [
                ("LINEBELOW", (0, 0), (-1, -1), 0.25, GRID),
                ("SPAN", (1, -1), (3, -1)),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("TOPPADDING", (0, 0), (-1, -1), 2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ]
        )
    )
    return t


def _build(path: Path, story: list[Flowable], title: str, model: str, generated: datetime) -> None:
    with atomic_path(path) as tmp:
        _build_to(tmp, story, title, model, generated)


def _build_to(
    tmp: Path, story: list[Flowable], title: str, model: str, generated: datetime
) -> None:
    doc = SimpleDocTemplate(
        str(tmp),
        pagesize=A4,
        leftMargin=16 * mm,
        rightMargin=16 * mm,
        topMargin=12 * mm,
        bottomMargin=19 * mm,
        title=title,
        author="dicom-node",
        subject=model,
        creator="dicom-node",
    )
    footer = _footer_factory(model, generated)
    # reportlab's pure-Python ASCII85 encoding of images is slow; binary streams are
    # valid PDF and several times faster to write.
    saved = rl_config.useA85
    rl_config.useA85 = 0
    try:
        doc.build(story, onFirstPage=footer, onLaterPages=footer)
    finally:
        rl_config.useA85 = saved


def write_classification_report(
    result: ClassificationResult,
    study: PatientStudy,
    path: Path,
    *,
    generated_at: datetime | None = None,
    software: str = "dicom-node",
) -> Artifact:
    """Write the classification PDF report and return its artifact (kind ``pdf``).

    The report shows the patient and study data, the overall result, the findings
    with confidences (present ones highlighted), the source image and heatmap side by
    side, the model and the generation time (``generated_at``, default now: shown with
    its offset when aware, as local time when naive), and a "Not for diagnostic use"
    notice.

    Raises:
        ValueError: when the image is not 2D. OSError: when writing fails.
    """
    # as given: aware, shown with its offset; naive, shown as local time (see _stamp)
    generated = generated_at or utc_now()
    st = _styles()
    width = A4[0] - 32 * mm
    model = f"{result.model_name} {result.model_version}".strip()
    story: list[Flowable] = [
        _header(
            "AI Chest Radiograph Analysis", f"Automated classification report · {model}", st, width
        ),
        Spacer(1, 6),
        _notice(st, width),
        Spacer(1, 4),
        _p("Patient and study", st["h2"]),
        _patient_table(study, [], st, width),
        Spacer(1, 8),
        _result_box(result.result, st, width),
        _p("Findings", st["h2"]),
        _findings_table(result, st, width),
        # which images were read and which not: a reader must know the result's basis
        *([_p("Notes", st["h2"])] + [_p(n, st["body"]) for n in result.notes]
          if result.notes else []),
    ]
    img_w = (width - 8 * mm) / 2
    img_h = 50 * mm
    shown = _at_print_size(result.image, img_w, img_h)  # blend the heatmap at that size
    src = _rl_image(source_image(shown), img_w, img_h)
    if result.heatmap is not None and result.result != NORMAL:
        heat: Flowable = _rl_image(heatmap_overlay(shown, result.heatmap), img_w, img_h)
        heat_caption = "Heatmap (regions that drove the model's output)"
    else:
        why = "result is Normal" if result.result == NORMAL else result.heatmap_note
        heat = _Placeholder(float(src.drawWidth), float(src.drawHeight), f"No heatmap\n({why})")
        heat_caption = "Heatmap"
    images = Table(
        [[src, heat], [_p("Source image", st["caption"]), _p(heat_caption, st["caption"])]],
        colWidths=[img_w + 4 * mm, img_w + 4 * mm],
    )
    images.setStyle(
        TableStyle([("ALIGN", (0, 0), (-1, -1), "CENTER"), ("VALIGN", (0, 0), (-1, -1), "MIDDLE")])
    )
    story += [Spacer(1, 8), images]
    story.append(_model_section(
        result.model_name, result.model_version, generated, software,
        [("Source SOP UID", result.sop_instance_uid or "—"),
         *([("Source frame", str(result.frame_number))] if result.frame_number else [])],
        st, width,
    ))
    path = Path(path)
    _build(path, story, "AI inference report", model, generated)
    return Artifact(kind="pdf", path=path, media_type="application/pdf")


def write_segmentation_report(
    result: SegmentationResult,
    study: PatientStudy,
    path: Path,
    *,
    generated_at: datetime | None = None,
    software: str = "dicom-node",
    overlay: PILImage.Image | None = None,
) -> Artifact:
    """Write the segmentation PDF report (volumes table and overlay); kind ``pdf``.

    ``overlay`` is :func:`segmentation_overlay` of the result when the caller has
    already drawn it; otherwise it is drawn here.

    Raises:
        ValueError: when volume and labels differ in shape. OSError: when writing fails.
    """
    # as given: aware, shown with its offset; naive, shown as local time (see _stamp)
    generated = generated_at or utc_now()
    st = _styles()
    width = A4[0] - 32 * mm
    model = f"{result.model_name} {result.model_version}".strip()
    white = ParagraphStyle("wh", parent=st["cellb"], textColor=colors.white)
    rows: list[list[Any]] = [[_p(h, white) for h in ("", "Structure", "Label", "Volume (mL)")]]
    style = [
        ("BACKGROUND", (0, 0), (-1, 0), NAVY),
        ("LINEBELOW", (0, 1), (-1, -1), 0.25, GRID),
        ("BOX", (0, 0), (-1, -1), 0.5, GRID),
        ("ALIGN", (2, 0), (-1, -1), "RIGHT"),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
    ]
    for i, seg in enumerate(result.segments):
        swatch = Drawing(10, 10)
        r, g, b = segment_color(i)
        swatch.add(
            Rect(0, 0, 10, 10, fillColor=colors.Color(r / 255, g / 255, b / 255), strokeColor=None)
        )
        rows.append(
            [
                swatch,
                _p(seg.name, st["cell"]),
                _p(str(seg.label), st["cell"]),
                _p(f"{seg.volume_ml:,.1f}", st["cell"]),
            ]
        )
    total = sum(float(s.volume_ml) for s in result.segments)
    rows.append(["", _p("Total", st["cellb"]), "", _p(f"{total:,.1f}", st["cellb"])])
    style.append(("LINEABOVE", (0, -1), (-1, -1), 1, NAVY))
    volumes = Table(rows, colWidths=[8 * mm, width * 0.5, width * 0.15, width * 0.35 - 8 * mm])
    volumes.setStyle(TableStyle(style))
    if overlay is None:
        overlay = segmentation_overlay(result.volume, result.labels, result.segments,
                                       pixel_spacing=result.spacing[1:])
    dz, dy, dx = result.spacing
    status = f"{len(result.segments)} structure(s) segmented"
    story: list[Flowable] = [
        _header("AI CT Segmentation", f"Automated segmentation report · {model}", st, width),
        Spacer(1, 6),
        _notice(st, width),
        Spacer(1, 4),
        _p("Patient and study", st["h2"]),
        _patient_table(study, [], st, width),
        Spacer(1, 8),
        _result_box(status, st, width, label="RESULT", neutral=True),
        _p("Volumes", st["h2"]),
        volumes,
        *([_p("Notes", st["h2"])] + [_p(n, st["body"]) for n in result.notes]
          if result.notes else []),
        KeepTogether(
            [
                _p("Overlay", st["h2"]),
                _rl_image(overlay, width, 90 * mm),
                _p("Representative slices of the series with the segmented structures.",
                   st["caption"]),
            ]
        ),
        _model_section(
            result.model_name, result.model_version, generated, software,
            [
                (
                    "Volume",
                    f"{result.labels.shape[0]} {TIMES} {result.labels.shape[1]} {TIMES} "
                    f"{result.labels.shape[2]} voxels",
                ),
                ("Spacing", f"{dz:g} {TIMES} {dy:g} {TIMES} {dx:g} mm"),
                ("Source series UID", result.series_instance_uid or "—"),
            ],
            st, width,
        ),
    ]
    path = Path(path)
    _build(path, story, "AI segmentation report", model, generated)
    return Artifact(kind="pdf", path=path, media_type="application/pdf")
