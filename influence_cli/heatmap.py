"""A labelled heatmap of a square matrix as a PNG (Pillow only; no plotting library)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from influence_cli import storage
from influence_cli.drawing import default_font, text_size

# Viridis at 9 evenly spaced stops (Smith & van der Walt, matplotlib's default colormap).
_VIRIDIS = [
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
]  # fmt: skip
_CELL = 72
_PAD = 12
_BAR = 60  # half the colour bar's width


def _color(t: float) -> tuple[int, int, int]:
    """Viridis at t ∈ [0, 1], linearly interpolated between stops."""
    t = min(max(t, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _position(value: float, lo: float, hi: float) -> float:
    """Where `value` falls on the colour bar from lo to hi (0 to 1 inside it); on a bar of one value (two
    datasets: one value off the diagonal) that value is in the middle, any other at the end it lies beyond."""
    if hi > lo:
        return (value - lo) / (hi - lo)
    return 0.5 if value == lo else float(value > lo)


def _format(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.2e}"


def render_heatmap(matrix: torch.Tensor, names: Sequence[str], title: str, off_diagonal_scale: bool = True) -> Image.Image:
    """An RGB image: `matrix` [S, S] as coloured cells with their values, rows and columns labelled by `names`.

    With `off_diagonal_scale` the colours span the off-diagonal values (a similarity's
    diagonal is 1 or 0 by construction and would wash the rest out); the diagonal is clipped.
    A colour bar under the title gives the span.
    """
    m = matrix.detach().double().cpu()
    n = len(names)
    if m.shape != (n, n):
        raise ValueError(f"matrix of shape {list(m.shape)} does not match {n} names")
    font, title_font = default_font(13), default_font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(text_size(probe, s, font)[0] for s in names)
    label_h = max(text_size(probe, s, font)[1] for s in names)
    title_w, title_h = text_size(probe, title, title_font)
    scaled = m[~torch.eye(n, dtype=torch.bool)] if off_diagonal_scale and n > 1 else m.reshape(-1)
    finite = scaled[torch.isfinite(scaled)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    legend = ("colours span the values off the diagonal" if off_diagonal_scale and n > 1 else "colours span the values")
    legend_w, legend_h = text_size(probe, f"{_format(lo)} {legend} {_format(hi)}", font)
    legend_w += 2 * _BAR + 2 * _PAD
    left = _PAD + label_w + _PAD
    top = _PAD + title_h + _PAD + legend_h + _PAD + label_w + _PAD  # column labels are drawn rotated by 90°
    width = max(left + n * _CELL + _PAD, _PAD + title_w + _PAD, _PAD + legend_w + _PAD)
    height = top + n * _CELL + _PAD
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((_PAD, _PAD), title, fill="black", font=title_font)
    _draw_colour_bar(draw, (_PAD, _PAD + title_h + _PAD), legend_h, lo, hi, legend, font)
    for i in range(n):
        w, h = text_size(draw, names[i], font)
        draw.text((left - _PAD - w, top + i * _CELL + (_CELL - h) // 2), names[i], fill="black", font=font)
        # column label: drawn on its own strip, rotated, pasted above column i
        strip = Image.new("RGB", (label_w + 4, label_h + 6), "white")
        ImageDraw.Draw(strip).text((0, 0), names[i], fill="black", font=font)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (left + i * _CELL + (_CELL - strip.width) // 2, top - _PAD - strip.height + 4))
        for j in range(n):
            value = float(m[i, j])
            t = _position(value, lo, hi) if value == value else 0.0
            fill = _color(t) if value == value else (200, 200, 200)
            x0, y0 = left + j * _CELL, top + i * _CELL
            draw.rectangle([x0, y0, x0 + _CELL - 1, y0 + _CELL - 1], fill=fill, outline="white")
            text = _format(value)
            tw, th = text_size(draw, text, font)
            ink = "black" if t > 0.6 else "white"
            draw.text((x0 + (_CELL - tw) // 2, y0 + (_CELL - th) // 2), text, fill=ink, font=font)
    return img


def _draw_colour_bar(draw: ImageDraw.ImageDraw, at: tuple[int, int], height: int, lo: float, hi: float, legend: str, font) -> None:
    """"lo ▮▮▮▮ hi  legend" at `at`: the colours from lo to hi."""
    x, y = at
    text = _format(lo)
    draw.text((x, y), text, fill="black", font=font)
    x += text_size(draw, text, font)[0] + _PAD // 2
    for k in range(2 * _BAR):
        draw.line([(x + k, y + 1), (x + k, y + height - 1)], fill=_color(k / (2 * _BAR - 1)))
    x += 2 * _BAR + _PAD // 2
    text = _format(hi)
    draw.text((x, y), text, fill="black", font=font)
    x += text_size(draw, text, font)[0] + _PAD
    draw.text((x, y), f"({legend})", fill="gray", font=font)


def save_heatmap(
    path: str | Path, matrix: torch.Tensor, names: Sequence[str], title: str, off_diagonal_scale: bool = True
) -> Path:
    """Writes the heatmap of `matrix` [S, S] to `path` as a PNG, atomically (temporary file + rename).

    See `render_heatmap`; characters the default font lacks are drawn as `drawing.drawable` spells them (é → e, 猫 → ?).

    Raises:
        OutputError: the folder cannot be created or written.
    """
    path = Path(path)
    img = render_heatmap(matrix, names, title, off_diagonal_scale)
    storage.save_picture(img, path, "--heatmap")
    return path
