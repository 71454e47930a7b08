"""Picture of rankings, in the spirit of the RelatIF figure (Barshan et al. 2020, Fig. 1).

One row per query: the query image, then its top-k proponents (and optionally
opponents), each tile labelled with its index, class and score. Several row
groups (e.g. plain and relative influence of the same queries) are stacked, each
under its own title. Written atomically (temporary file + rename).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from influence_cli import storage
from influence_cli.drawing import default_font, fit_text

_COLORS = {"query": (40, 90, 200), "proponent": (30, 150, 60), "opponent": (200, 50, 40)}
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_MARGIN = 8
_GAP = 6
_SECTION_GAP = 18
_BORDER = 3


@dataclass
class Tile:
    """One image and the lines of text under it.

    Attributes:
        image: float [C, H, W] in [0, 1], C = 1 or 3 (data.example_image).
        lines: Text under the tile (index, class, score).
        kind: "query" | "proponent" | "opponent" (the border color).
    """

    image: torch.Tensor
    lines: list[str]
    kind: str = "proponent"


@dataclass
class GridRow:
    """A query and its ranked training examples (query None: a row of training examples only, e.g. self-influence)."""

    query: Tile | None
    proponents: list[Tile] = field(default_factory=list)
    opponents: list[Tile] = field(default_factory=list)


@dataclass
class GridGroup:
    """Rows shown under one title (e.g. "influence" and "relative influence")."""

    title: str
    rows: list[GridRow]
    proponents_label: str | None = None
    empty_notes: tuple[str | None, str | None] = (None, None)  # drawn in an empty proponents / opponents section


def group_label(group: GridGroup, default: str) -> str:
    return group.proponents_label or default


def _to_pil(image: torch.Tensor, size: int) -> Image.Image:
    """[C, H, W] in [0, 1] → a PIL image fitted into size × size (nearest-neighbour when enlarging)."""
    x = image.detach().float().clamp(0, 1)
    if x.ndim == 2:
        x = x[None]
    c, h, w = x.shape
    data = (x * 255).round().to(torch.uint8)
    if c == 1:
        pil = Image.frombytes("L", (w, h), bytes(data[0].flatten().tolist())).convert("RGB")
    else:
        pil = Image.frombytes("RGB", (w, h), bytes(data[:3].permute(1, 2, 0).flatten().tolist()))
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return pil.resize(new, resample)


def _header(draw: ImageDraw.ImageDraw, text: str, short: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """A section's header within its width: the full text, else the short one (cut if need be)."""
    return text if draw.textlength(text, font=font) <= width else fit_text(draw, short, font, width)


def save_image_grid(
    path: str | Path,
    groups: GridGroup | list[GridGroup],
    *,
    tile_size: int = 84,
    title: str | None = None,
) -> Path:
    """Draws the rows of every group and writes the picture (format from the suffix: .png, .jpg, ...).

    Args:
        path: The output file.
        groups: One group, or several stacked vertically (each with its title).
        tile_size: Side of each image tile in pixels.
        title: A line at the top (e.g. the config and the sign convention).

    Returns:
        The path written.

    Raises:
        OutputError: the suffix is not an image format, or the folder is not writable.
    """
    path = Path(path)
    groups = [groups] if isinstance(groups, GridGroup) else list(groups)
    storage.check_image_path(path, "--image-grid")  # before drawing
    font = default_font(12)  # at 10 px the default font's spaces are 2 px and words run together
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(12, int(probe.textbbox((0, 0), "Hg#0", font=font)[3]) + 3)
    tiles = [t for g in groups for r in g.rows for t in [r.query, *r.proponents, *r.opponents] if t is not None]
    n_lines = max((len(t.lines) for t in tiles), default=0)
    has_query = any(r.query is not None for g in groups for r in g.rows)
    noted = [any(g.empty_notes[side] for g in groups) for side in (0, 1)]  # such a section is shown even when empty
    n_prop = max([len(r.proponents) for g in groups for r in g.rows] + [int(noted[0])], default=0)
    n_opp = max([len(r.opponents) for g in groups for r in g.rows] + [int(noted[1])], default=0)
    cell_w = max(tile_size, 96) + _GAP
    cell_h = tile_size + 2 * _BORDER + n_lines * line_h + _GAP
    x_prop = _MARGIN + (cell_w + _SECTION_GAP if has_query else 0)
    x_opp = x_prop + n_prop * cell_w + (_SECTION_GAP if n_opp else 0)
    width = x_opp + n_opp * cell_w + _MARGIN
    header_h = line_h + 4
    height = _MARGIN + (header_h if title else 0)
    height += sum(2 * header_h + len(g.rows) * cell_h for g in groups) + _MARGIN
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = _MARGIN
    if title:
        draw.text((_MARGIN, y), fit_text(draw, title, font, width - 2 * _MARGIN), fill=_TEXT, font=font)
        y += header_h
    for group in groups:
        draw.text((_MARGIN, y), fit_text(draw, group.title, font, width - 2 * _MARGIN), fill=_TEXT, font=font)
        y += header_h
        if has_query:
            draw.text((_MARGIN, y), "query", fill=_COLORS["query"], font=font)
        if n_prop:
            text = _header(draw, group_label(group, "proponents (largest scores)"), "proponents", font, n_prop * cell_w - _GAP)
            draw.text((x_prop, y), text, fill=_COLORS["proponent"], font=font)
        if n_opp:
            text = _header(draw, "opponents (smallest scores)", "opponents", font, n_opp * cell_w - _GAP)
            draw.text((x_opp, y), text, fill=_COLORS["opponent"], font=font)
        y += header_h
        for row in group.rows:
            cells = [] if row.query is None else [(_MARGIN, row.query)]
            cells += [(x_prop + i * cell_w, t) for i, t in enumerate(row.proponents)]
            cells += [(x_opp + i * cell_w, t) for i, t in enumerate(row.opponents)]
            for x, tile in cells:
                _draw_tile(canvas, draw, font, tile, x, y, tile_size, cell_w - _GAP, line_h)
            for x, tiles, note in ((x_prop, row.proponents, group.empty_notes[0]), (x_opp, row.opponents, group.empty_notes[1])):
                if note and not tiles:
                    draw.text((x, y + tile_size // 2), fit_text(draw, note, font, cell_w - _GAP), fill=_TEXT, font=font)
            y += cell_h
    storage.save_picture(canvas, path, "--image-grid")
    return path


def _draw_tile(canvas, draw, font, tile: Tile, x: int, y: int, size: int, text_w: int, line_h: int) -> None:
    pil = _to_pil(tile.image, size)
    color = _COLORS.get(tile.kind, _TEXT)
    draw.rectangle([x, y, x + size + 2 * _BORDER - 1, y + size + 2 * _BORDER - 1], fill=color)
    ox = x + _BORDER + (size - pil.width) // 2
    oy = y + _BORDER + (size - pil.height) // 2
    draw.rectangle([x + _BORDER, y + _BORDER, x + _BORDER + size - 1, y + _BORDER + size - 1], fill=(0, 0, 0))
    canvas.paste(pil, (ox, oy))
    ty = y + size + 2 * _BORDER + 1
    for line in tile.lines:
        draw.text((x, ty), fit_text(draw, line, font, text_w), fill=_TEXT, font=font)
        ty += line_h


__all__ = ["GridGroup", "GridRow", "Tile", "save_image_grid"]
