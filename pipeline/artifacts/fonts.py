"""The fonts the report (reportlab) and the overlay legends (Pillow) write text in.

The main font is DejaVu Sans (Debian fonts-dejavu-core: Latin, Greek, Cyrillic). A
character it has no glyph for (Chinese, Japanese, Korean) is written in the first
installed of :data:`FALLBACK_FONTS`; neither library falls back per glyph by itself,
so text is cut into runs by font (:func:`runs`).
"""

from __future__ import annotations

import functools
import unicodedata
from pathlib import Path

import structlog

__all__ = ["DEJAVU", "DEJAVU_BOLD", "FALLBACK_FONTS", "coverage", "fallback_font", "runs"]

log = structlog.get_logger(__name__)

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
DEJAVU_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
#: TrueType fonts with CJK glyphs, best coverage first (Debian packages
#: fonts-wqy-microhei, fonts-wqy-zenhei, fonts-droid-fallback; the last has no Hangul).
#: Noto CJK is not here: its outlines are CFF, which reportlab cannot embed.
FALLBACK_FONTS = (
    Path("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
    Path("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf"),
)
_warned: list[str] = []  # the script of the first character no font had, once logged


@functools.cache
def coverage(path: Path) -> frozenset[int]:
    """The code points the TrueType font at ``path`` (of a .ttc, its first face) has
    glyphs for; empty when it is missing or cannot be read."""
    from reportlab.pdfbase.ttfonts import TTFontFile

    if not path.is_file():
        return frozenset()
    try:
        return frozenset(TTFontFile(str(path), subfontIndex=0).charToGlyph)
    except Exception:  # a font reportlab cannot read (CFF outlines, damage): not usable
        return frozenset()


@functools.lru_cache(maxsize=1)
def fallback_font() -> Path | None:
    """The first of :data:`FALLBACK_FONTS` installed and readable (~50 ms the first time)."""
    return next((p for p in FALLBACK_FONTS if coverage(p)), None)


def runs(text: str, main: frozenset[int]) -> list[tuple[bool, str]]:
    """``text`` cut into runs of ``(in_fallback, characters)``: a character goes to the
    fallback font when ``main`` (the main font's coverage) lacks it and the fallback has
    it. A character neither has stays in the main font (an empty box) and is logged
    once, by script only: the text may be a patient's name."""
    out: list[tuple[bool, str]] = []
    for ch in text:
        extra = False
        if main and ord(ch) not in main:  # main empty: a font whose coverage is unknown
            fallback = fallback_font()
            extra = fallback is not None and ord(ch) in coverage(fallback)
            if not extra and ch.isprintable() and not _warned:
                _warned.append(unicodedata.name(ch, "?").split()[0])
                log.warning("text has characters no installed font has glyphs for; they "
                            "print as empty boxes", script=_warned[0],
                            install="fonts-wqy-microhei (Debian) for Chinese, Japanese, Korean")
        if out and out[-1][0] == extra:
            out[-1] = (extra, out[-1][1] + ch)
        else:
            out.append((extra, ch))
    return out
