"""Text helpers shared by the PNG reports (Pillow only)."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable
from typing import Any

from PIL import ImageDraw, ImageFont

_MISSING = "\uffff"  # a character no font has: what a missing glyph looks like in this font


def default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` px (the fixed bitmap font on Pillow < 10.1 or without FreeType).

    It has glyphs for ASCII and a few symbols only: the font measures and draws any other character
    (a class named "Müller", "猫") as `drawable` spells it, instead of as empty boxes.
    """
    font, probe = _load_default(size), _load_default(size)  # the probe keeps its own methods: glyphs are looked up there
    spell = functools.partial(drawable, has_glyph=functools.lru_cache(maxsize=None)(functools.partial(_has_glyph, probe.getmask)))
    for method in ("getmask", "getmask2", "getbbox", "getlength"):
        if hasattr(font, method):
            setattr(font, method, _spelled(getattr(font, method), spell))
    return font


def _load_default(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _spelled(method: Callable[..., Any], spell: Callable[[str], str]) -> Callable[..., Any]:
    def call(text: Any, *args: Any, **kwargs: Any) -> Any:
        return method(spell(text) if isinstance(text, str) else text, *args, **kwargs)

    return call


def _has_glyph(getmask: Callable[[str], Any], char: str) -> bool:
    """Whether a font (its own `getmask`) draws `char` as something other than its missing-glyph box."""
    if char.isascii():
        return True
    try:
        mask, missing = getmask(char), getmask(_MISSING)
    except Exception:  # noqa: BLE001 - a font that cannot encode it (the bitmap font is Latin-1)
        return False
    return mask.size != missing.size or bytes(mask) != bytes(missing)


_STAND_INS = {"×": "x"}  # symbols the tool itself writes (a dense label's shape, [2×3×3]), spelled in ASCII


def drawable(text: str, has_glyph: Callable[[str], bool]) -> str:
    """`text` with each character the font lacks replaced by its letters without accents (é → e,
    ü → u), by an ASCII stand-in (× → x), or by '?' when it has none (猫)."""
    out = []
    for char in unicodedata.normalize("NFC", text):  # "u" + a combining diaeresis (macOS file names) is "ü"
        if has_glyph(char):
            out.append(char)
            continue
        plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c) and has_glyph(c))
        plain = plain or _STAND_INS.get(char, "")
        out.append(plain or ("" if unicodedata.combining(char) else "?"))
    return "".join(out)


def text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn in `font`."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, cut with '…' to fit in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
