"""The `spectrum --plot` PNG: gradient energy per curvature percentile, per dataset (Pillow only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from influence_cli import storage
from influence_cli.band_energy import SpectrumReport
from influence_cli.drawing import default_font, fit_text, text_size

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (140, 86, 75), (227, 119, 194)]


def _nice_step(span: float) -> float:
    """A 1-2-5 tick step giving about 5 ticks over `span`."""
    raw = span / 5 if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def _runs(xs: list[float], values: list[float]) -> list[list[tuple[float, float]]]:
    """The (x, value) points between NaNs, run by run: a line is drawn along each, not across a gap."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, v in zip(xs, values, strict=True):
        if v == v:
            runs[-1].append((x, v))
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if run]


def render_spectrum_plot(report: SpectrumReport) -> Any:
    """A PIL image with two panels over the curvature percentile of the directions (x, low to high).

    Top: mean share of gradient energy per percentile bin (log scale, 6 decades), one line per
    dataset or group. Bottom: the same relative to the baseline (linear, 1 = same). A bin below the
    log axis (6 decades down from the power of ten above the largest share) is a gap in both panels,
    not a point on the floor: such a share is rounding (a band without curvature, as the table's
    n/a), and so is a ratio of it.
    """
    from PIL import Image, ImageDraw

    font, title_font = default_font(13), default_font(16)
    groups = report.groups
    series = [g.bin_share.clamp_min(0) for g in groups]
    positive = torch.cat([s[s > 0] for s in series])
    hi = math.ceil(math.log10(float(positive.max()))) if positive.numel() else 0
    lo = hi - 6
    floor = 10.0**lo
    base = report.group(report.baseline).bin_share
    ratios = [torch.where((base >= floor) & (s >= floor), s / base.clamp_min(1e-300), torch.nan) for s in series]
    finite = torch.cat([r[torch.isfinite(r)] for r in ratios])
    r_lo, r_hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.5, 1.5)
    r_lo, r_hi = min(r_lo, 0.9), max(r_hi, 1.1)
    step = _nice_step(r_hi - r_lo)
    r_lo, r_hi = step * math.floor(r_lo / step), step * math.ceil(r_hi / step)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = max(text_size(probe, g.name, font)[0] for g in groups) + 40
    left, plot_w, top1, h1, gap, h2 = 90, 620, 50, 300, 60, 170
    top2 = top1 + h1 + gap
    width, height = left + plot_w + 30 + legend_w, top2 + h2 + 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title = f"gradient energy per curvature percentile ({report.order} order; layers {', '.join(report.layers)})"
    draw.text((left, 14), fit_text(draw, title, title_font, width - left - 10), fill="black", font=title_font)

    def x_of(p: float) -> float:
        return left + plot_w * p / 100.0

    def y_log(v: float) -> float:
        lv = math.log10(v) if v > 0 else lo
        return top1 + h1 * (hi - min(max(lv, lo), hi)) / (hi - lo)

    def y_lin(v: float) -> float:
        return top2 + h2 * (r_hi - min(max(v, r_lo), r_hi)) / (r_hi - r_lo)

    def ylabel(text: str, top: int, h: int) -> None:
        w, th = text_size(draw, text, font)
        strip = Image.new("RGB", (w + 4, th + 6), "white")
        ImageDraw.Draw(strip).text((0, 0), text, fill="black", font=font)
        strip = strip.rotate(90, expand=True)
        img.paste(strip, (14, int(top + (h - strip.height) / 2)))

    for top, h in ((top1, h1), (top2, h2)):
        if not report.mass:  # shade the bottom and top bands
            draw.rectangle([x_of(0), top, x_of(100 * report.bottom), top + h], fill=(236, 242, 250))
            draw.rectangle([x_of(100 * (1 - report.top)), top, x_of(100), top + h], fill=(250, 238, 236))
        draw.rectangle([left, top, left + plot_w, top + h], outline="black")
        for p in range(0, 101, 10):
            draw.line([x_of(p), top + h, x_of(p), top + h + 5], fill="black")
            w, _ = text_size(draw, str(p), font)
            draw.text((x_of(p) - w / 2, top + h + 8), str(p), fill="black", font=font)
    for e in range(lo, hi + 1):
        y = y_log(10.0**e)
        draw.line([left + 1, y, left + plot_w - 1, y], fill=(215, 215, 215))
        w, th = text_size(draw, f"1e{e}", font)
        draw.text((left - 8 - w, y - th / 2 - 2), f"1e{e}", fill="black", font=font)
    t = r_lo
    while t <= r_hi + 1e-9:
        y = y_lin(t)
        draw.line([left + 1, y, left + plot_w - 1, y], fill=(150, 150, 150) if abs(t - 1) < 1e-9 else (215, 215, 215))
        label = f"{t:g}"
        w, th = text_size(draw, label, font)
        draw.text((left - 8 - w, y - th / 2 - 2), label, fill="black", font=font)
        t += step
    ylabel("share of gradient energy (log)", top1, h1)
    ylabel(f"relative to {report.baseline}", top2, h2)
    xlabel = "curvature percentile of the eigenbasis direction (low to high)"
    w, _ = text_size(draw, xlabel, font)
    draw.text((left + (plot_w - w) / 2, top2 + h2 + 30), xlabel, fill="black", font=font)
    n_bins = report.bins
    for k, (g, s, r) in enumerate(zip(groups, series, ratios, strict=True)):
        color = _COLORS[k % len(_COLORS)]
        xs = [x_of(100 * (i + 0.5) / n_bins) for i in range(n_bins)]
        shares = [v if v >= floor else float("nan") for v in s.tolist()]  # a bin below the range is a gap, not a point on the floor
        for y_of, values in ((y_log, shares), (y_lin, r.tolist())):
            for run in _runs(xs, values):
                if len(run) > 1:
                    draw.line([(x, y_of(v)) for x, v in run], fill=color, width=2)
                for x, v in run:
                    y = y_of(v)
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        ly, lx = top1 + 10 + 22 * k, left + plot_w + 30
        draw.line([lx, ly + 7, lx + 24, ly + 7], fill=color, width=3)
        draw.text((lx + 30, ly), g.name, fill="black", font=font)
    return img


def save_spectrum_plot(path: str | Path, report: SpectrumReport) -> Path:
    """Writes `render_spectrum_plot` to `path` as a PNG, atomically (temporary file + rename).

    Raises:
        OutputError: the folder cannot be created or written.
    """
    path = Path(path)
    img = render_spectrum_plot(report)
    storage.save_picture(img, path, "--plot")
    return path
