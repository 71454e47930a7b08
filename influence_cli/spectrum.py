"""`spectrum`: where in the curvature spectrum do examples act? (memorization in the eigenbasis)

Per tracked layer, the Kronecker eigenbasis of the factors (U_A, U_G; factors.py) has
d_out·d_in directions (i, j), each with a curvature

    c[i, j] = λ_G[i]·λ_A[j]   (order: kfac, the K-FAC products)   or   Λ*[i, j]   (order: ekfac)

Sorted by c they split into three bands: the bottom p and top q share of the directions
(the middle is the rest), or, with `mass`, the largest set of lowest-curvature directions
holding at most p of Σc and the smallest set of highest-curvature directions holding at
least q of it. Merullo et al. 2025 ("From Memorization to Reasoning in the Spectrum of
Loss Curvature") find that memorized examples act mostly along low-curvature directions,
which the rest of the data does not share, and that removing those directions from the
weights suppresses memorization (edit.py).

For an example n with loss gradient ∇W_n = Σ_t g_t a_tᵀ ([W | b] layout, tracking.py),
its energy in a set b of directions (a band, or a curvature-percentile bin) is

    e_n(b) = Σ_{(i,j) ∈ b} G̃_n[i, j]²,   G̃_n = U_Gᵀ ∇W_n U_A.

For layers without positions (T = 1) G̃_n = g̃ ãᵀ, so e_n(b) = (g̃²)ᵀ M_b (ã²) with the 0/1
mask M_b of the set: one GEMM per batch for all sets, never a per-example outer product.
Layers with positions use position pairs or chunked bmm (squares.py). The input energy of a band of A-directions
(ordered by λ_A) is Σ_t Σ_{j ∈ b} ã_tj². Energies of a partition add up to ‖∇W_n‖² (‖a‖²),
so shares over the bands sum to 1. An example's score is its share of gradient energy in
the bottom bands of all analysed layers together.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_cli import storage
from influence_cli.config import SPECTRUM_ORDERS, Config
from influence_cli.context import RunContext, prepare
from influence_cli.distributed import DistState
from influence_cli.errors import ConfigError, NumericalError, OutputError, UsageError
from influence_cli.factors import Factors, LayerFactors, Rotation
from influence_cli.fit import _NonFiniteWatch, check_factors_match, load_factors
from influence_cli.passes import accumulator_dtype, stream_gradients
from influence_cli.progress import NullProgress, Progress, for_rank
from influence_cli.squares import weighted_squares
from influence_cli.tracking import TrackedModule

BANDS = ("bottom", "middle", "top")
_MAX_ELEMENTS = 1 << 25  # bound on the intermediates of one masked GEMM


# ----------------------------------------------------------------------------- bands


def _count(share: float, n: int) -> int:
    """⌊share·n + ½⌋, the number of n directions a share stands for."""
    return min(n, max(0, math.floor(share * n + 0.5)))


def band_sizes(curvature: torch.Tensor, bottom: float, top: float, mass: bool = False) -> tuple[int, int]:
    """(n_bottom, n_top): how many of the lowest and of the highest-curvature directions the bands hold.

    By share: ⌊p·N + ½⌋ and ⌊q·N + ½⌋ of the N directions. By mass (Merullo et al. 2025):
    the top band is the smallest set of highest-curvature directions holding at least q of
    Σc, the bottom band the largest set of lowest-curvature directions holding at most p of
    it. The bands never overlap (the top band keeps a shared direction).

    Args:
        curvature: c of every direction, any shape (negative values count as 0).
    """
    values = torch.sort(curvature.detach().reshape(-1).double().clamp_min(0).cpu()).values
    n = values.numel()
    if not mass:
        n_top = _count(top, n)
        return min(_count(bottom, n), n - n_top), n_top
    total = float(values.sum())
    n_top = 0
    if top > 0 and total > 0:
        desc = torch.cumsum(values.flip(0), 0)
        n_top = min(n, int(torch.searchsorted(desc, torch.tensor(top * total * (1 - 1e-12), dtype=torch.float64))) + 1)
    asc = torch.cumsum(values, 0)
    n_bottom = int(torch.searchsorted(asc, torch.tensor(bottom * total * (1 + 1e-12), dtype=torch.float64), right=True))
    return min(n_bottom, n - n_top), n_top


def _ranks(curvature: torch.Tensor) -> torch.Tensor:
    """Rank of each entry in ascending order (ties by position), same shape, int64."""
    flat = curvature.detach().reshape(-1).double()
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), device=flat.device)
    return ranks.reshape(curvature.shape)


def band_labels(curvature: torch.Tensor, bottom: float, top: float, mass: bool = False) -> torch.Tensor:
    """Band of every direction: 0 bottom, 1 middle, 2 top (int64, shape of `curvature`); see `band_sizes`."""
    n_bottom, n_top = band_sizes(curvature, bottom, top, mass)
    ranks = _ranks(curvature)
    labels = torch.ones_like(ranks)
    labels[ranks < n_bottom] = 0
    labels[ranks >= ranks.numel() - n_top] = 2
    return labels


def percentile_bins(curvature: torch.Tensor, bins: int) -> torch.Tensor:
    """Curvature-percentile bin of every direction: ⌊rank·bins / N⌋ in 0..bins−1, lowest first (int64)."""
    return _ranks(curvature) * bins // max(1, curvature.numel())


def keep_mask(curvature: torch.Tensor, keep: str, rho: float = 0.6, share: float = 0.5) -> torch.Tensor:
    """The directions `edit` keeps (bool, shape of `curvature`): the highest-curvature ones.

    keep "mass": the smallest set holding at least ρ of Σc (Merullo et al. 2025 keep ρ = 0.6);
    keep "share": the top ⌊share·N + ½⌋ directions.
    """
    if keep == "mass":
        return band_labels(curvature, 0.0, rho, mass=True) == 2
    return band_labels(curvature, 0.0, share, mass=False) == 2


def direction_curvature(lf: LayerFactors, order: str) -> torch.Tensor:
    """c [d_out, d_in] (float64): λ_G λ_Aᵀ (order kfac) or Λ* (order ekfac).

    Raises:
        OutputError: the factors have no Kronecker eigenbasis (strategies diagonal, identity).
    """
    if lf.a_eigenvectors is None or lf.g_eigenvectors is None or lf.a_eigenvalues is None or lf.g_eigenvalues is None:
        raise OutputError(
            f"layer {lf.name!r}: the factors have no Kronecker eigenbasis (fitted with strategy diagonal or identity)",
            hint="rerun `influence fit-factors` with --set factors.strategy=ekfac --overwrite",
        )
    if order == "kfac":
        return torch.outer(lf.g_eigenvalues.double(), lf.a_eigenvalues.double())
    if lf.eigenvalues is None:  # pragma: no cover - kfac and ekfac factors always have them
        raise OutputError(f"layer {lf.name!r}: the factors have no eigenvalues", hint="rerun `influence fit-factors` --overwrite")
    return lf.eigenvalues.double()


@dataclass
class LayerBands:
    """Which band and percentile bin each direction of one layer falls in.

    Attributes:
        band: int64 [d_out, d_in], 0 bottom / 1 middle / 2 top (by c).
        bin: int64 [d_out, d_in], curvature-percentile bin, lowest first.
        input_band: int64 [d_in], band of each A-direction (by λ_A).
        counts: Directions per band.
        mass: Share of Σc per band.
        input_counts: A-directions per band.
    """

    name: str
    band: torch.Tensor
    bin: torch.Tensor
    input_band: torch.Tensor
    counts: list[int]
    mass: list[float]
    input_counts: list[int]

    def masks(self, bins: int, dtype: torch.dtype, device: torch.device | str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """0/1 masks of the sets [start, stop) of (3 bands, then `bins` bins), stacked as [d_out, stop − start, d_in]."""
        stop = 3 + bins if stop is None else stop
        sets = torch.arange(start, stop, device=device)
        band, bin_ = self.band.to(device), self.bin.to(device) + 3
        return ((band[:, None, :] == sets[None, :, None]) | (bin_[:, None, :] == sets[None, :, None])).to(dtype)


def layer_bands(lf: LayerFactors, *, order: str, bottom: float, top: float, mass: bool, bins: int) -> LayerBands:
    """The bands and percentile bins of one layer's directions under `order`."""
    c = direction_curvature(lf, order).cpu()
    band = band_labels(c, bottom, top, mass)
    total = float(c.clamp_min(0).sum())
    mass_share = [float(c.clamp_min(0)[band == k].sum()) / total if total > 0 else 0.0 for k in range(3)]
    lam_a = lf.a_eigenvalues.double().cpu()  # type: ignore[union-attr]
    input_band = band_labels(lam_a, bottom, top, mass)
    return LayerBands(
        lf.name,
        band,
        percentile_bins(c, bins),
        input_band,
        [int((band == k).sum()) for k in range(3)],
        mass_share,
        [int((input_band == k).sum()) for k in range(3)],
    )


# ----------------------------------------------------------------------------- energies


class LayerEnergy:
    """Per-example energies of one layer in its 3 bands and `bins` percentile bins: [B, 3 + bins].

    An example's energy in a set of directions is Σ_ij M_ij G̃_n,ij² with the set's 0/1 mask M
    (`squares.weighted_squares` over the masks [d_out, K, d_in] of `LayerBands.masks`). The masks are built in chunks of at most 2^25 elements; they are kept when all of them
    fit in 2^27 elements and rebuilt per batch otherwise, so memory stays bounded for wide layers.
    """

    def __init__(self, bands: LayerBands, bins: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.bands, self.bins, self.dtype, self.device = bands, bins, dtype, device
        d_out, d_in = bands.band.shape
        per = max(1, _MAX_ELEMENTS // (d_out * d_in))
        self.ranges = [(s, min(s + per, 3 + bins)) for s in range(0, 3 + bins, per)]
        self.cached = d_out * d_in * (3 + bins) <= 4 * _MAX_ELEMENTS
        self._masks = [bands.masks(bins, dtype, device, s, e) for s, e in self.ranges] if self.cached else None

    def __call__(self, a_rot: torch.Tensor, g_rot: torch.Tensor) -> torch.Tensor:
        """[B, 3 + bins] from ã [B, T, d_in] and g̃ [B, T, d_out] (already rotated)."""
        masks = self._masks or (self.bands.masks(self.bins, self.dtype, self.device, s, e) for s, e in self.ranges)
        return torch.cat([weighted_squares(a_rot, g_rot, m) for m in masks], dim=1)


@dataclass
class DatasetSpectrum:
    """Per-example energies of one dataset (float64, CPU), examples in dataset order.

    Attributes:
        global_indices: int64 [N].
        labels: [N] the labels the gradients were taken at (after label noise).
        noisy: bool [N], True where label noise changed the label.
        band_energy: [N, L, 3] gradient energy per analysed layer and band.
        bin_energy: [N, L, bins] gradient energy per curvature-percentile bin.
        input_energy: [N, L, 3] input energy Σ_t ã_t² per band of A-directions.
    """

    name: str
    global_indices: torch.Tensor
    labels: torch.Tensor
    noisy: torch.Tensor
    band_energy: torch.Tensor
    bin_energy: torch.Tensor
    input_energy: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.global_indices.numel())

    def bottom_share(self) -> torch.Tensor:
        """[N] each example's share of gradient energy in the bottom bands (all layers; 0 for a zero gradient)."""
        total = self.band_energy.sum(dim=(1, 2))
        return torch.where(total > 0, self.band_energy[:, :, 0].sum(1) / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def _share(x: torch.Tensor) -> torch.Tensor:
    """x / Σ_last (0 where the sum is 0)."""
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _mean_share(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of x / Σ_last x, over the rows whose sum is > 0 (zeros when none is)."""
    keep = x.sum(-1) > 0
    return _share(x[keep]).mean(0) if bool(keep.any()) else torch.zeros(x.shape[1:], dtype=x.dtype)


@dataclass
class GroupSummary:
    """A dataset (or its noisy / clean examples) summarized over its examples.

    Shares are means of per-example shares (each example counts once, whatever its
    gradient norm; examples with a zero gradient are left out), so the shares of a
    partition sum to 1 and `share[0]` is the mean per-example score.

    Attributes:
        energy: [L, 3] mean gradient energy per layer and band.
        share: [3] share of gradient energy per band, all layers together.
        layer_share: [L, 3] the same per layer.
        bin_share: [bins] share of gradient energy per curvature-percentile bin, all layers.
        input_share: [3] share of input energy per band of A-directions, all layers.
        layer_input_share: [L, 3] the same per layer.
    """

    name: str
    size: int
    energy: torch.Tensor
    share: torch.Tensor
    layer_share: torch.Tensor
    bin_share: torch.Tensor
    input_share: torch.Tensor
    layer_input_share: torch.Tensor

    def to_dict(self, layers: list[str]) -> dict[str, Any]:
        def per_layer(t: torch.Tensor) -> dict[str, dict[str, float]]:
            return {name: dict(zip(BANDS, row, strict=True)) for name, row in zip(layers, t.tolist(), strict=True)}

        return {
            "name": self.name,
            "size": self.size,
            "share": dict(zip(BANDS, self.share.tolist(), strict=True)),
            "layer_share": per_layer(self.layer_share),
            "mean_energy": per_layer(self.energy),
            "input_share": dict(zip(BANDS, self.input_share.tolist(), strict=True)),
            "layer_input_share": per_layer(self.layer_input_share),
            "bin_share": self.bin_share.tolist(),
        }


def summarize(ds: DatasetSpectrum, name: str | None = None, rows: torch.Tensor | None = None) -> GroupSummary:
    """Means over the examples of `ds` (or those where the bool mask `rows` is True)."""
    sel = slice(None) if rows is None else rows
    band, bins, inp = ds.band_energy[sel], ds.bin_energy[sel], ds.input_energy[sel]
    n = int(band.shape[0])
    return GroupSummary(
        name or ds.name,
        n,
        band.sum(0) / max(n, 1),
        _mean_share(band.sum(1)),
        torch.stack([_mean_share(band[:, k]) for k in range(band.shape[1])]),
        _mean_share(bins.sum(1)),
        _mean_share(inp.sum(1)),
        torch.stack([_mean_share(inp[:, k]) for k in range(inp.shape[1])]),
    )


def groups_of(datasets: list[DatasetSpectrum]) -> list[GroupSummary]:
    """Each dataset, followed by its `name:noisy` and `name:clean` examples when label noise changed some labels."""
    out = []
    for ds in datasets:
        out.append(summarize(ds))
        if bool(ds.noisy.any()) and not bool(ds.noisy.all()):
            out.append(summarize(ds, f"{ds.name}:noisy", ds.noisy))
            out.append(summarize(ds, f"{ds.name}:clean", ~ds.noisy))
    return out


def dataset_spectrum(
    model: nn.Module,
    layers: list[TrackedModule],
    factors: dict[str, LayerFactors],
    bands: dict[str, LayerBands],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    bins: int,
    task_kind: str,
    name: str,
    device: torch.device | None = None,
    noisy_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_examples: int | None = None,
    title: str | None = None,
    progress: Progress | None = None,
    padding_value: float | None = None,
) -> DatasetSpectrum:
    """Streams one dataset once (loss gradients at its labels) and returns every example's band energies.

    Args:
        layers: The analysed layers (only they are hooked).
        factors: {layer: factors} with the Kronecker eigenbasis.
        bands: {layer: LayerBands}.
        batches: (inputs, targets, global_indices) triples.
        noisy_of: global indices [B] -> bool [B] (label noise); default all False.
        name: The dataset's config key, named in errors.
        padding_value: Masks padding positions (`data.padding_value`).
    """
    device = device or torch.device("cpu")
    progress = progress or NullProgress()
    dtype = accumulator_dtype(model)
    moved = {tm.name: factors[tm.name].to(device, dtype) for tm in layers}
    rot = {name: (Rotation(lf.a_eigenvectors), Rotation(lf.g_eigenvectors)) for name, lf in moved.items()}  # type: ignore[arg-type]
    energy = {tm.name: LayerEnergy(bands[tm.name], bins, dtype, device) for tm in layers}
    input_masks = {tm.name: torch.nn.functional.one_hot(bands[tm.name].input_band, 3).to(device, dtype) for tm in layers}
    idx_parts, label_parts, band_parts, bin_parts, input_parts = [], [], [], [], []
    watch = _NonFiniteWatch(device)
    progress.start(title or name, num_examples)
    for batch in stream_gradients(
        model, layers, batches, task_kind=task_kind, mode="loss", device=device, dataset_name=name, padding_value=padding_value
    ):
        watch.observe(batch)
        per_layer, per_input = [], []
        for tm in layers:
            rot_a, rot_g = rot[tm.name]
            a_rot, g_rot = rot_a(batch.activations[tm.name]), rot_g(batch.gradients[0][tm.name])
            per_layer.append(energy[tm.name](a_rot, g_rot))
            per_input.append(a_rot.square().sum(1) @ input_masks[tm.name])
        e = torch.stack(per_layer, dim=1)  # [B, L, 3 + bins]
        band_parts.append(e[:, :, :3])
        bin_parts.append(e[:, :, 3:])
        input_parts.append(torch.stack(per_input, dim=1))
        idx_parts.append(batch.global_indices)
        label_parts.append(batch.targets)
        progress.advance(len(batch.global_indices))
    progress.stop()
    try:
        watch.check(name)
    except NumericalError as exc:
        raise NumericalError(exc.message, hint="check those examples and the checkpoint for NaN/Inf; nothing was written") from None
    if not idx_parts:
        empty = torch.zeros(0, len(layers), 3, dtype=torch.float64)
        return DatasetSpectrum(
            name, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool),
            empty, torch.zeros(0, len(layers), bins, dtype=torch.float64), empty.clone(),
        )  # fmt: skip
    idx = torch.cat(idx_parts).cpu()
    noisy = noisy_of(idx) if noisy_of is not None else torch.zeros(idx.numel(), dtype=torch.bool)
    return DatasetSpectrum(
        name,
        idx,
        torch.cat(label_parts).cpu(),
        noisy,
        torch.cat(band_parts).double().cpu(),
        torch.cat(bin_parts).double().cpu(),
        torch.cat(input_parts).double().cpu(),
    )


def _gather(ds: DatasetSpectrum, state: DistState) -> DatasetSpectrum:
    """Concatenates the ranks' contiguous shards in rank order (no-op in one process)."""
    if not state.distributed:
        return ds
    parts: list[DatasetSpectrum] = state.all_gather_object(ds)  # type: ignore[assignment]
    fields = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(ds) if f.name != "name"}
    return DatasetSpectrum(ds.name, **fields)


# ----------------------------------------------------------------------------- the command's core


@dataclass
class LayerBandInfo:
    """What the bands of one layer hold."""

    name: str
    shape: tuple[int, int]
    counts: list[int]
    mass: list[float]
    input_counts: list[int]


@dataclass
class SpectrumReport:
    """The outcome of `spectrum` (all shares are of gradient energy unless named input_*)."""

    path: Path
    layers: list[str]
    order: str
    bottom: float
    top: float
    mass: bool
    bins: int
    bands: list[LayerBandInfo]
    datasets: list[DatasetSpectrum]
    groups: list[GroupSummary]
    baseline: str
    strategy: str
    fisher: str
    seconds: dict[str, float] = field(default_factory=dict)

    def band_names(self) -> list[str]:
        """Row labels: "bottom 50%", "middle 40%", "top 10%" (by mass: "bottom ≤50% of curvature", ...)."""
        if self.mass:
            return [f"bottom (≤{self.bottom:.0%} of curvature)", "middle", f"top (≥{self.top:.0%} of curvature)"]
        return [f"bottom {self.bottom:.0%}", f"middle {1 - self.bottom - self.top:.0%}", f"top {self.top:.0%}"]

    def group(self, name: str) -> GroupSummary:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def ratios(self) -> dict[str, list[float]]:
        """{group: [3]} share in each band relative to the baseline's, minus 1 (+0.23 = 23% more); NaN where the baseline has 0."""
        base = self.group(self.baseline).share
        out = {}
        for g in self.groups:
            if g.name != self.baseline:
                out[g.name] = [float(s / b - 1.0) if b > 0 else float("nan") for s, b in zip(g.share.tolist(), base.tolist(), strict=True)]
        return out

    def top_examples(self, n: int) -> dict[str, list[dict[str, Any]]]:
        """Per dataset, its n examples with the largest bottom-band share (most memorization-like; ties by position)."""
        out = {}
        for ds in self.datasets:
            total = ds.band_energy.sum(dim=(1, 2))
            score = ds.bottom_share()
            k = min(n, ds.size)
            pos = torch.sort(score, descending=True, stable=True).indices[:k]
            values = score[pos]
            out[ds.name] = [
                {
                    "global_index": int(ds.global_indices[p]),
                    "label": ds.labels[p].tolist(),
                    "noisy": bool(ds.noisy[p]),
                    "bottom_share": float(v),
                    "energy": float(total[p]),
                }
                for v, p in zip(values.tolist(), pos.tolist(), strict=True)
            ]
        return out

    def to_dict(self, top: int = 0) -> dict[str, Any]:
        """Plain data for JSON."""
        data = {
            "path": str(self.path),
            "layers": self.layers,
            "order": self.order,
            "bottom": self.bottom,
            "top": self.top,
            "mass": self.mass,
            "bins": self.bins,
            "bands": self.band_names(),
            "strategy": self.strategy,
            "fisher": self.fisher,
            "baseline": self.baseline,
            "layer_bands": [
                {
                    "name": b.name,
                    "shape": list(b.shape),
                    "directions": dict(zip(BANDS, b.counts, strict=True)),
                    "curvature_share": dict(zip(BANDS, b.mass, strict=True)),
                    "input_directions": dict(zip(BANDS, b.input_counts, strict=True)),
                }
                for b in self.bands
            ],
            "groups": [g.to_dict(self.layers) for g in self.groups],
            "ratio_vs_baseline": {k: dict(zip(BANDS, v, strict=True)) for k, v in self.ratios().items()},
            "seconds": self.seconds,
        }
        if top:
            data["top_examples"] = self.top_examples(top)
        return data


def select_layers(tracked: list[TrackedModule], patterns: list[str], key: str) -> list[TrackedModule]:
    """The tracked layers whose names match any fnmatch pattern, in model order.

    Raises:
        ConfigError: no tracked layer matches (names the key or flag).
    """
    chosen = [tm for tm in tracked if any(fnmatch.fnmatchcase(tm.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(tm.name for tm in tracked[:8])
        raise ConfigError(f"{key}: {list(patterns)} matches none of the tracked layers ({names})", hint="use '*' or names from `influence inspect`")
    return chosen


def load_kronecker_factors(ctx: RunContext) -> tuple[Factors, Path]:
    """The factors of fit-factors for this model, checked to hold a Kronecker eigenbasis.

    Raises:
        OutputError: missing, of another model or layers, or fitted with strategy diagonal / identity.
    """
    path = ctx.output_dir / storage.FACTORS_FILE
    factors = load_factors(path)
    check_factors_match(factors, ctx, path)
    if factors.strategy not in ("kfac", "ekfac"):
        raise OutputError(
            f"{str(path)!r} holds {factors.strategy or 'unknown'} factors; the curvature eigenbasis needs kfac or ekfac factors",
            hint="rerun `influence fit-factors` with --set factors.strategy=ekfac --overwrite",
        )
    return factors, path


def _check_order(order: str, key: str) -> None:
    if order not in SPECTRUM_ORDERS:
        raise UsageError(f"{key}: expected one of {', '.join(SPECTRUM_ORDERS)}, got {order!r}")


def spectrum(
    cfg: Config,
    *,
    layers: list[str] | None = None,
    order: str | None = None,
    overwrite: bool = False,
    state: DistState | None = None,
    progress: Progress | None = None,
) -> SpectrumReport:
    """Measures each dataset's gradient and input energy per curvature band; writes `<output_dir>/spectrum.safetensors`.

    Datasets are `spectrum.datasets` (default: data.train as `train`); a dataset whose label
    noise changed some labels is also summarized as `name:noisy` and `name:clean`. The file
    holds per dataset `<name>.global_indices`, `.labels`, `.noisy`, `.bottom_share` [N] (the
    per-example score), `.band_energy` and `.input_energy` [N, L, 3], `.bin_energy` [N, L, bins].

    Args:
        layers: Patterns overriding spectrum.layers (the --layers flag).
        order: kfac | ekfac, overriding spectrum.order (the --order flag).

    Raises:
        OutputError: no factors, factors of another model or without an eigenbasis, or the output exists without `overwrite`.
        ConfigError: the layer patterns match no tracked layer, or spectrum.baseline names no dataset.
    """
    t_start = time.perf_counter()
    sp = cfg.spectrum
    order = order or sp.order
    _check_order(order, "--order")
    out_dir = cfg.output_path
    path = out_dir / storage.SPECTRUM_FILE
    ctx = prepare(cfg, state)
    factors, _ = load_kronecker_factors(ctx)
    chosen = select_layers(ctx.tracked, layers or sp.layers, "--layers" if layers else "spectrum.layers")
    storage.check_can_write(path, overwrite, "a spectrum result")
    storage.ensure_writable_dir(out_dir)
    bands = {
        tm.name: layer_bands(factors.layers[tm.name], order=order, bottom=sp.bottom, top=sp.top, mass=sp.mass, bins=sp.bins)
        for tm in chosen
    }
    specs = dict(sp.datasets) or {"train": cfg.data.train}
    keys = {name: f"spectrum.datasets.{name}" if sp.datasets else "data.train" for name in specs}
    progress = for_rank(progress, ctx.state.rank, ctx.state.world_size)
    layer_factors = {tm.name: factors.layers[tm.name] for tm in chosen}
    datasets = {name: ctx.dataset(spec, keys[name]) for name, spec in specs.items()}
    names = []
    for name, ds in datasets.items():
        split = bool(ds.noisy_mask.any()) and not bool(ds.noisy_mask.all())
        names += [name, f"{name}:noisy", f"{name}:clean"] if split else [name]
    baseline = sp.baseline or names[-1]
    if baseline not in names:
        raise ConfigError(
            f"spectrum.baseline: {baseline!r} is not among {', '.join(names)}",
            source=cfg.source,
            hint="name:noisy and name:clean exist only for datasets whose label noise changed some labels",
        )
    results, fingerprints = [], {}
    t0 = time.perf_counter()
    for name, ds in datasets.items():
        fingerprints[name] = ds.fingerprint()
        start, stop = ctx.state.shard(len(ds))
        part = dataset_spectrum(
            ctx.model, chosen, layer_factors, bands, ctx.batches(ds),
            bins=sp.bins, task_kind=cfg.task.kind, name=keys[name], device=ctx.device,
            noisy_of=lambda gi, ds=ds: ds.noisy_mask[ds.position_of(gi)], num_examples=stop - start, title=name, progress=progress,
            padding_value=cfg.data.padding_value,
        )  # fmt: skip
        results.append(_gather(dataclasses.replace(part, name=name), ctx.state))
    seconds = {"passes": time.perf_counter() - t0}
    groups = groups_of(results)
    infos = [
        LayerBandInfo(tm.name, (tm.d_out, tm.d_in), bands[tm.name].counts, bands[tm.name].mass, bands[tm.name].input_counts)
        for tm in chosen
    ]
    report = SpectrumReport(
        path, [tm.name for tm in chosen], order, sp.bottom, sp.top, sp.mass, sp.bins, infos, results, groups, baseline,
        factors.strategy, factors.fisher, seconds,
    )  # fmt: skip
    if ctx.state.is_main:
        _save(report, ctx, cfg, fingerprints)
    ctx.state.barrier()
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _save(report: SpectrumReport, ctx: RunContext, cfg: Config, fingerprints: dict[str, str]) -> None:
    tensors: dict[str, torch.Tensor] = {
        "band_directions": torch.tensor([b.counts for b in report.bands], dtype=torch.int64),
        "band_curvature_share": torch.tensor([b.mass for b in report.bands], dtype=torch.float32),
    }
    for ds in report.datasets:
        tensors[f"{ds.name}.global_indices"] = ds.global_indices
        tensors[f"{ds.name}.labels"] = ds.labels
        tensors[f"{ds.name}.noisy"] = ds.noisy
        tensors[f"{ds.name}.bottom_share"] = ds.bottom_share().float()
        tensors[f"{ds.name}.band_energy"] = ds.band_energy.float()
        tensors[f"{ds.name}.input_energy"] = ds.input_energy.float()
        tensors[f"{ds.name}.bin_energy"] = ds.bin_energy.float()
    storage.save_tensors(
        report.path,
        tensors,
        {
            storage.FORMAT_KEY: storage.SPECTRUM_FORMAT,
            **ctx.provenance(),
            "layers": report.layers,
            "order": report.order,
            "bottom": report.bottom,
            "top": report.top,
            "mass": report.mass,
            "bins": report.bins,
            "names": [ds.name for ds in report.datasets],
            "dataset_fingerprints": fingerprints,
            "summary": {g.name: g.to_dict(report.layers) for g in report.groups},
            "baseline": report.baseline,
            "strategy": report.strategy,
            "fisher": report.fisher,
            "model_fingerprint": ctx.model_fingerprint,
        },
    )


def load_spectrum_scores(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-example scores of a spectrum file: {dataset: {global_indices, labels, noisy, bottom_share}}."""
    tensors, meta = storage.load_tensors(Path(path), storage.SPECTRUM_FORMAT)
    return {
        name: {k: tensors[f"{name}.{k}"] for k in ("global_indices", "labels", "noisy", "bottom_share")}
        for name in storage.meta_json(meta, "names", [])
    }


# ----------------------------------------------------------------------------- plot

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207), (140, 86, 75), (227, 119, 194)]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: Any, text: str, font: Any) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _nice_step(span: float) -> float:
    """A 1-2-5 tick step giving about 5 ticks over `span`."""
    raw = span / 5 if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def render_spectrum_plot(report: SpectrumReport) -> Any:
    """A PIL image with two panels over the curvature percentile of the directions (x, low to high).

    Top: mean share of gradient energy per percentile bin (log scale, 6 decades), one line per
    dataset or group. Bottom: the same relative to the baseline (linear, 1 = same).
    """
    from PIL import Image, ImageDraw

    font, title_font = _font(13), _font(16)
    groups = report.groups
    series = [g.bin_share.clamp_min(0) for g in groups]
    positive = torch.cat([s[s > 0] for s in series])
    hi = math.ceil(math.log10(float(positive.max()))) if positive.numel() else 0
    lo = hi - 6
    base = report.group(report.baseline).bin_share
    ratios = [torch.where(base > 0, s / base.clamp_min(1e-300), torch.nan) for s in series]
    finite = torch.cat([r[torch.isfinite(r) & (base >= 10.0**lo)] for r in ratios])
    r_lo, r_hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.5, 1.5)
    r_lo, r_hi = min(r_lo, 0.9), max(r_hi, 1.1)
    step = _nice_step(r_hi - r_lo)
    r_lo, r_hi = step * math.floor(r_lo / step), step * math.ceil(r_hi / step)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = max(_text_size(probe, g.name, font)[0] for g in groups) + 40
    left, plot_w, top1, h1, gap, h2 = 90, 620, 50, 300, 60, 170
    top2 = top1 + h1 + gap
    width, height = left + plot_w + 30 + legend_w, top2 + h2 + 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    title = f"gradient energy per curvature percentile ({report.order} order; layers {', '.join(report.layers)})"
    draw.text((left, 14), title, fill="black", font=title_font)

    def x_of(p: float) -> float:
        return left + plot_w * p / 100.0

    def y_log(v: float) -> float:
        lv = math.log10(v) if v > 0 else lo
        return top1 + h1 * (hi - min(max(lv, lo), hi)) / (hi - lo)

    def y_lin(v: float) -> float:
        return top2 + h2 * (r_hi - min(max(v, r_lo), r_hi)) / (r_hi - r_lo)

    def ylabel(text: str, top: int, h: int) -> None:
        w, th = _text_size(draw, text, font)
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
            w, _ = _text_size(draw, str(p), font)
            draw.text((x_of(p) - w / 2, top + h + 8), str(p), fill="black", font=font)
    for e in range(lo, hi + 1):
        y = y_log(10.0**e)
        draw.line([left + 1, y, left + plot_w - 1, y], fill=(215, 215, 215))
        w, th = _text_size(draw, f"1e{e}", font)
        draw.text((left - 8 - w, y - th / 2 - 2), f"1e{e}", fill="black", font=font)
    t = r_lo
    while t <= r_hi + 1e-9:
        y = y_lin(t)
        draw.line([left + 1, y, left + plot_w - 1, y], fill=(150, 150, 150) if abs(t - 1) < 1e-9 else (215, 215, 215))
        label = f"{t:g}"
        w, th = _text_size(draw, label, font)
        draw.text((left - 8 - w, y - th / 2 - 2), label, fill="black", font=font)
        t += step
    ylabel("share of gradient energy (log)", top1, h1)
    ylabel(f"relative to {report.baseline}", top2, h2)
    xlabel = "curvature percentile of the eigenbasis direction (low to high)"
    w, _ = _text_size(draw, xlabel, font)
    draw.text((left + (plot_w - w) / 2, top2 + h2 + 30), xlabel, fill="black", font=font)
    n_bins = report.bins
    for k, (g, s, r) in enumerate(zip(groups, series, ratios, strict=True)):
        color = _COLORS[k % len(_COLORS)]
        xs = [x_of(100 * (i + 0.5) / n_bins) for i in range(n_bins)]
        for y_of, values in ((y_log, s.tolist()), (y_lin, r.tolist())):
            pts = [(x, y_of(v)) for x, v in zip(xs, values, strict=True) if v == v]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
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
    with storage.atomic_path(path, key="--plot") as tmp:
        img.save(tmp, format="PNG")
    return path
