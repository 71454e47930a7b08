"""`spectrum`: where in the curvature spectrum do examples act? (memorization in the eigenbasis)

Per tracked layer, the d_out·d_in directions of the Kronecker eigenbasis split by curvature
into bottom, middle and top bands (bands.py). Merullo et al. 2025 ("From Memorization to
Reasoning in the Spectrum of Loss Curvature") find that memorized examples act mostly along
low-curvature directions, which the rest of the data does not share, and that removing those
directions from the weights suppresses memorization (edit.py).

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
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_cli import notices, storage
from influence_cli.bands import LayerBands, check_order, layer_bands, load_kronecker_factors, select_layers
from influence_cli.config import Config, DataSpec
from influence_cli.context import RunContext, prepare
from influence_cli.data.dataset import IndexedDataset, data_change
from influence_cli.distributed import DistState
from influence_cli.errors import ConfigError, UsageError
from influence_cli.factors import LayerFactors, Rotation
from influence_cli.fit import check_finite_factors, warn_of_refit
from influence_cli.notices import warn
from influence_cli.passes import BatchGradients, NonFiniteWatch, accumulator_dtype, check_first_batches, stream_gradients
from influence_cli.progress import NullProgress, Progress, for_rank
from influence_cli.reprs import brief_repr
from influence_cli.resume import (
    DatasetsProgress,
    clear_progress_of_finished,
    finished_result,
    run_key,
)
from influence_cli.squares import weighted_squares
from influence_cli.tracking import TrackedModule

BANDS = ("bottom", "middle", "top")
RANKINGS = ("energy", "share")  # how `top_examples` ranks: the bottom band's gradient energy, or its share
_MAX_ELEMENTS = 1 << 25  # bound on the intermediates of one masked GEMM
_SUM_ELEMENTS = 1 << 20  # bound on the float64 copy of per-example energies summed at once (`_layer_sum`)


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
    """Per-example energies of one dataset (CPU), examples in dataset order.

    The energies are kept in the dtype the pass computed them in (float32; float64 for a float64 model), as the
    spectrum file stores them; every sum over them (the shares, the summaries) is taken in float64.

    Attributes:
        global_indices: int64 [N].
        labels: [N] the labels the gradients were taken at (after label noise).
        noisy: bool [N], True where label noise changed the label.
        band_energy: [N, L, 3] gradient energy per analysed layer and band.
        bin_energy: [N, L, bins] gradient energy per curvature-percentile bin.
        input_energy: [N, L, 3] input energy Σ_t ã_t² per band of A-directions.
    """

    __repr__ = brief_repr

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

    def bottom_energy(self) -> torch.Tensor:
        """[N] each example's gradient energy in the bottom bands, summed over the layers (float64)."""
        return bottom_energy(self.band_energy.double())

    def bottom_share(self) -> torch.Tensor:
        """[N] each example's share of gradient energy in the bottom bands (all layers; 0 for a zero gradient; float64)."""
        band = self.band_energy.double()
        total = band.sum(dim=(1, 2))
        return torch.where(total > 0, band[:, :, 0].sum(1) / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def bottom_energy(band_energy: torch.Tensor) -> torch.Tensor:
    """[N] the bottom band's gradient energy of per-example band energies [N, layers, 3], summed over the layers."""
    return band_energy[:, :, 0].sum(1)


def _percent(share: float) -> str:
    """A band's share as set, to 5 significant digits and without an exponent: 50%, 12.5%, 0.4%,
    0.00001%, 99.999% (whole percents would show 0.004 as "0%" and 0.99999 as "100%")."""
    from decimal import Decimal

    return f"{Decimal(f'{100 * share:.5g}'):f}%"


def _share(x: torch.Tensor) -> torch.Tensor:
    """x / Σ_last (0 where the sum is 0)."""
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def _mean_share(x: torch.Tensor, own: bool = False) -> torch.Tensor:
    """Mean over dim 0 of x / Σ_last x, over the rows whose sum is > 0 (zeros when none is). `own`: x is the caller's
    to overwrite (a temporary), so the shares take its place when every row is kept (no copy of x, as large)."""
    keep = x.sum(-1) > 0
    if not bool(keep.any()):
        return torch.zeros(x.shape[1:], dtype=x.dtype)
    if own and bool(keep.all()):  # the rows' sums are all > 0: _share's x / Σ_last x, in place
        return x.div_(x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)).mean(0)
    return _share(x[keep]).mean(0)


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

    __repr__ = brief_repr

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
    """Means over the examples of `ds` (or those where the bool mask `rows` is True), in float64, computed from one
    float64 copy of a few of the energies at a time: all of the band energies only for their mean, then each sum
    over the layers (`_layer_sum`) and each layer's energies, its shares taking its place (`_mean_share`)."""
    sel = slice(None) if rows is None else rows
    band = ds.band_energy[sel].double()
    n = int(band.shape[0])
    energy = band.sum(0) / max(n, 1)
    del band
    layers = range(ds.band_energy.shape[1])
    return GroupSummary(
        name or ds.name,
        n,
        energy,
        _mean_share(_layer_sum(ds.band_energy, rows), own=True),
        torch.stack([_mean_share(ds.band_energy[:, k][sel].to(torch.float64, copy=True), own=True) for k in layers]),
        _mean_share(_layer_sum(ds.bin_energy, rows), own=True),
        _mean_share(_layer_sum(ds.input_energy, rows), own=True),
        torch.stack([_mean_share(ds.input_energy[:, k][sel].to(torch.float64, copy=True), own=True) for k in layers]),
    )


def _layer_sum(energy: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """energy.sum(1) in float64 over the examples where the bool mask `rows` is True (all when None), [N, L, K] ->
    [n, K], a few examples at a time: neither the float64 copy of the energies (twice their size) nor a copy of the
    rows picked is ever whole."""
    n = len(energy) if rows is None else int(rows.sum())
    out = torch.empty(n, *energy.shape[2:], dtype=torch.float64)
    step, at = max(1, _SUM_ELEMENTS // max(1, energy[0].numel())) if len(energy) else 1, 0
    for i in range(0, len(energy), step):
        chunk = energy[i : i + step] if rows is None else energy[i : i + step][rows[i : i + step]]
        out[at : at + len(chunk)] = chunk.double().sum(1)
        at += len(chunk)
    return out


def groups_of(datasets: list[DatasetSpectrum]) -> list[GroupSummary]:
    """Each dataset, followed by its `name:noisy` and `name:clean` examples when label noise changed some labels."""
    out = []
    for ds in datasets:
        out.append(summarize(ds))
        if bool(ds.noisy.any()) and not bool(ds.noisy.all()):
            out.append(summarize(ds, f"{ds.name}:noisy", ds.noisy))
            out.append(summarize(ds, f"{ds.name}:clean", ~ds.noisy))
    return out


def _stream(
    model: nn.Module,
    layers: list[TrackedModule],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    task_kind: str,
    name: str,
    device: torch.device,
    padding_value: float | None,
    start: int = 0,
) -> Iterator[BatchGradients]:
    """Each batch's loss gradients at its labels, {layer: g [B, T, d_out]} in `gradients[0]`, numbered from `start`."""
    return stream_gradients(
        model, layers, batches, task_kind=task_kind, mode="loss", device=device, start_batch=start, dataset_name=name,
        padding_value=padding_value,
    )  # fmt: skip


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
    saved: DatasetsProgress | None = None,
) -> DatasetSpectrum:
    """Streams one dataset once (loss gradients at its labels) and returns every example's band energies.

    Args:
        layers: The analysed layers (only they are hooked).
        factors: {layer: factors} with the Kronecker eigenbasis.
        bands: {layer: LayerBands}.
        batches: (inputs, targets, global_indices) triples, from batch `saved.batches_done` on when given.
        noisy_of: global indices [B] -> bool [B] (label noise); default all False.
        name: The dataset's config key, named in errors.
        padding_value: Masks padding positions (`data.padding_value`).
        saved: resumable progress: the examples it holds are not streamed again, and the energies
            are saved every `factors.checkpoint_every` batches (started with `per_example=_PARTS`: those of
            the examples since the previous save, in a piece beside the snapshot, each example's once).
    """
    device = device or torch.device("cpu")
    progress = progress or NullProgress()
    dtype = accumulator_dtype(model)
    moved = {tm.name: factors[tm.name].to(device, dtype) for tm in layers}
    rot = {name: (Rotation(lf.a_eigenvectors), Rotation(lf.g_eigenvectors)) for name, lf in moved.items()}  # type: ignore[arg-type]
    energy = {tm.name: LayerEnergy(bands[tm.name], bins, dtype, device) for tm in layers}
    input_masks = {tm.name: torch.nn.functional.one_hot(bands[tm.name].input_band, 3).to(device, dtype) for tm in layers}
    rows = {k: _Rows(num_examples) for k in _PARTS}
    start = saved.batches_done if saved is not None else 0
    if start:
        for k in _PARTS:
            rows[k].add(saved.state.pop(k).to(device))  # type: ignore[union-attr]  # held once: in `rows`
    watch = NonFiniteWatch(device)
    progress.start(title or name, num_examples)
    try:
        seen = rows["global_indices"].count  # examples of this rank's shard done
        if seen:
            progress.advance(seen)
        for batch in _stream(model, layers, batches, task_kind=task_kind, name=name, device=device, padding_value=padding_value, start=start):
            watch.observe(batch)
            per_layer, per_input = [], []
            for tm in layers:
                rot_a, rot_g = rot[tm.name]
                a_rot, g_rot = rot_a(batch.activations[tm.name]), rot_g(batch.gradients[0][tm.name])
                per_layer.append(energy[tm.name](a_rot, g_rot))
                per_input.append(a_rot.square().sum(1) @ input_masks[tm.name])
            e = torch.stack(per_layer, dim=1)  # [B, L, 3 + bins]
            rows["band_energy"].add(e[:, :, :3])
            rows["bin_energy"].add(e[:, :, 3:])
            rows["input_energy"].add(torch.stack(per_input, dim=1))
            rows["global_indices"].add(batch.global_indices)
            rows["labels"].add(batch.targets)
            done = batch.index + 1
            seen += len(batch.global_indices)
            if saved is not None and saved.due(done) and (num_examples is None or seen < num_examples):  # the last batch: `finish` saves
                watch.check(name)  # never save progress past a non-finite batch
                saved.save(done, {k: r.so_far() for k, r in rows.items()})
            progress.advance(len(batch.global_indices))
        watch.check(name)  # before the bar stops: a failed pass leaves no finished bar
    finally:
        progress.stop()  # also on errors and Ctrl-C, so the terminal is clean for the message
    if not rows["global_indices"].count:
        empty = torch.zeros(0, len(layers), 3, dtype=dtype)
        return DatasetSpectrum(
            name, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool),
            empty, torch.zeros(0, len(layers), bins, dtype=dtype), empty.clone(),
        )  # fmt: skip
    whole = {k: r.so_far().cpu() for k, r in rows.items()}  # each example's energies in the pass's own dtype
    noisy = noisy_of(whole["global_indices"]) if noisy_of is not None else torch.zeros(len(whole["global_indices"]), dtype=torch.bool)
    return DatasetSpectrum(name, whole["global_indices"], whole["labels"], noisy, whole["band_energy"], whole["bin_energy"], whole["input_energy"])


_PARTS = ("global_indices", "labels", "band_energy", "bin_energy", "input_energy")  # what a pass adds up, batch by batch


class _Rows:
    """One per-example result of a pass, batch after batch, in dataset order: written into one tensor of `size` rows
    (its dtype, device and other dims those of the first batch), or, where the size is not known, kept per batch and
    joined when asked for. Joining parts at the end held them twice (and their float64 copy besides, twice as large)."""

    def __init__(self, size: int | None) -> None:
        self.size, self.count = size, 0
        self.whole: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor) -> None:
        if self.size is None:
            self.parts.append(rows)
        else:
            if self.whole is None:
                self.whole = rows.new_empty((self.size, *rows.shape[1:]))
            self.whole[self.count : self.count + len(rows)] = rows
        self.count += len(rows)

    def so_far(self) -> torch.Tensor:
        """The rows added so far, [count, ...] (a view of the whole, or the parts joined once)."""
        if self.whole is not None:
            return self.whole[: self.count]
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        return self.parts[0]


def _as_tensors(ds: DatasetSpectrum) -> dict[str, torch.Tensor]:
    """A finished dataset's energies as its saved progress holds them (the name is the dataset's place)."""
    return {f.name: getattr(ds, f.name) for f in dataclasses.fields(ds) if f.name != "name"}


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
    without_curvature: list[bool]


@dataclass
class SpectrumReport:
    """The outcome of `spectrum` (all shares are of gradient energy unless named input_*)."""

    __repr__ = brief_repr

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
    from_file: bool = False  # read from the finished result of the same settings, not computed
    resumed_from: str | None = None  # where --resume continued this rank's interrupted run
    loaded: dict[str, IndexedDataset] = field(default_factory=dict, repr=False)  # the datasets measured, by config key: what --top shows their examples from

    def band_names(self) -> list[str]:
        """Row labels: "bottom 50%", "middle 40%", "top 10%" (by mass: "bottom ≤50% of curvature", ...)."""
        if self.mass:
            return [f"bottom (≤{_percent(self.bottom)} of curvature)", "middle", f"top (≥{_percent(self.top)} of curvature)"]
        return [f"bottom {_percent(self.bottom)}", f"middle {_percent(max(0.0, 1 - self.bottom - self.top))}", f"top {_percent(self.top)}"]

    def group(self, name: str) -> GroupSummary:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def ratios(self) -> dict[str, list[float]]:
        """{group: [3]} share in each band relative to the baseline's, minus 1 (+0.23 = 23% more); NaN where
        the baseline has 0 or the band has no curvature in any layer (`flat_bands`)."""
        base = self.group(self.baseline).share
        flat = self.flat_bands()
        out = {}
        for g in self.groups:
            if g.name != self.baseline:
                out[g.name] = [
                    float(s / b - 1.0) if b > 0 and not f else float("nan") for s, b, f in zip(g.share.tolist(), base.tolist(), flat, strict=True)
                ]
        return out

    def flat_bands(self) -> list[bool]:
        """Per band, whether it has no curvature in any analysed layer (`LayerBands.without_curvature`, empty
        bands aside): its energy shares are rounding, or energy the fit never saw, and rank nothing."""
        return [
            any(b.counts[k] for b in self.bands) and all(b.without_curvature[k] for b in self.bands if b.counts[k]) for k in range(3)
        ]

    def top_examples(self, n: int, rank_by: str = "energy") -> dict[str, list[dict[str, Any]]]:
        """Per dataset, its n most memorization-like examples (ties by position), among those with any
        energy in the bottom band; none when that band has no curvature (`flat_bands`).

        Args:
            rank_by: "energy": the largest gradient energy in the bottom band (a memorized example's
                large gradient along directions the rest of the data leaves flat; on MNIST with 5%
                random labels it finds them with AUROC 0.93 to 0.96, docs/MEMORIZATION.md), or
                "share": the largest share of its own energy there (AUROC 0.53 to 0.56; on the bundled
                digits its top 10 are examples the model fits almost exactly, of tiny gradients).
        """
        if rank_by not in RANKINGS:
            raise UsageError(f"--rank-by: {rank_by!r} is not one of {', '.join(RANKINGS)}")
        out = {}
        flat = self.flat_bands()[0]
        for ds in self.datasets:
            total = ds.band_energy.double().sum(dim=(1, 2))
            energy, share = ds.bottom_energy(), ds.bottom_share()
            score = energy if rank_by == "energy" else share
            k = 0 if flat else min(n, int((score > 0).sum()))
            pos = torch.sort(score, descending=True, stable=True).indices[:k].tolist()
            out[ds.name] = [
                {
                    "global_index": int(ds.global_indices[p]),
                    "label": ds.labels[p].tolist(),
                    "noisy": bool(ds.noisy[p]),
                    "bottom_energy": float(energy[p]),
                    "bottom_share": float(share[p]),
                    "energy": float(total[p]),
                }
                for p in pos
            ]
        return out

    def to_dict(self, top: int = 0, rank_by: str = "energy") -> dict[str, Any]:
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
                    "without_curvature": dict(zip(BANDS, b.without_curvature, strict=True)),
                }
                for b in self.bands
            ],
            "groups": [g.to_dict(self.layers) for g in self.groups],
            "ratio_vs_baseline": {k: dict(zip(BANDS, v, strict=True)) for k, v in self.ratios().items()},
            "seconds": self.seconds,
            "from_file": self.from_file,
            "resumed_from": self.resumed_from,
        }
        if top:
            data["rank_by"] = rank_by
            data["top_examples"] = self.top_examples(top, rank_by)
        return data


def dataset_specs(cfg: Config) -> dict[str, tuple[DataSpec, str]]:
    """{name: (data spec, its config key)} of the datasets spectrum measures: spectrum.datasets, or
    data.train as `train`."""
    if cfg.spectrum.datasets:
        return {name: (spec, f"spectrum.datasets.{name}") for name, spec in cfg.spectrum.datasets.items()}
    return {"train": (cfg.data.train, "data.train")}  # type: ignore[dict-item]


@storage.guards_output_dir("spectrum", reads="factors")
def spectrum(
    cfg: Config,
    *,
    layers: list[str] | str | None = None,
    order: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
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

    A finished result of the same settings is read back instead of recomputed (with a warning when its factors
    were refitted since with the same settings, `fit.warn_of_refit`); `resume` continues an
    interrupted run from its last saved progress (every `factors.checkpoint_every` batches, and after
    each dataset).

    Raises:
        OutputError: no factors, factors of another model or Fisher (factors.fisher) or without an eigenbasis, or the output exists
            without `overwrite`; progress of an interrupted run without `resume` or `overwrite`, or of other settings.
        ConfigError: the config's layer patterns (spectrum.layers) match no tracked layer, or spectrum.baseline names no dataset.
        UsageError: `layers` matches no tracked layer, or `order` is not kfac / ekfac.
        NumericalError: the chosen layers' factors hold NaN/Inf.
    """
    t_start = time.perf_counter()
    sp = cfg.spectrum
    layers = [layers] if isinstance(layers, str) else layers
    order_key = "--order" if order else "spectrum.order"
    order = order or sp.order
    check_order(order, "--order")
    out_dir = cfg.output_path
    path = out_dir / storage.SPECTRUM_FILE
    ctx = prepare(cfg, state)
    factors, factors_path = load_kronecker_factors(ctx, order, order_key)
    chosen = select_layers(ctx.tracked, layers or sp.layers, "--layers" if layers else "spectrum.layers", cfg.source)
    check_finite_factors(factors, factors_path, [tm.name for tm in chosen])
    storage.ensure_writable_dir(out_dir)
    bands = {
        tm.name: layer_bands(factors.layers[tm.name], order=order, bottom=sp.bottom, top=sp.top, mass=sp.mass, bins=sp.bins)
        for tm in chosen
    }
    specs = dataset_specs(cfg)
    keys = {name: key for name, (_, key) in specs.items()}
    progress = for_rank(progress, ctx.state.rank, ctx.state.world_size)
    datasets = {name: ctx.dataset(spec, key) for name, (spec, key) in specs.items()}
    fitted_on = factors.metadata.get("dataset_fingerprint")
    if not sp.datasets and fitted_on is not None and datasets["train"].fingerprint() != fitted_on:
        change = data_change(factors.metadata.get("dataset_parts"), datasets["train"])  # as compute-scores' refusal names it
        notices.warn(
            "spectrum: data.train is not the training set the factors were fitted on, so its group `train` is measured "
            f"in another set's curvature (fit-factors on this data.train, or name the datasets in spectrum.datasets){change}"
        )
    if cfg.scores.checkpoints:
        notices.warn(f"spectrum: only model.checkpoint is analysed, not the {len(cfg.scores.checkpoints)} model(s) of scores.checkpoints")
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
    fingerprints = {name: ds.fingerprint() for name, ds in datasets.items()}
    result_fields = {  # what the energies are of (not the baseline, which only changes the ratios shown)
        "model": ctx.model_fingerprint, "definition": ctx.model_definition, "factors": factors.metadata.get("result_key"),
        "datasets": fingerprints, "layers": [tm.name for tm in chosen], "order": order, "bottom": sp.bottom, "top": sp.top,
        "mass": sp.mass, "bins": sp.bins, "task": cfg.task.kind, "padding_value": cfg.data.padding_value,
    }  # fmt: skip
    recorded = finished_result(path, result_fields, "a spectrum result", storage.SPECTRUM_FORMAT, overwrite=overwrite)
    from_file = recorded is not None
    if recorded is not None:
        warn_of_refit(path, "a spectrum result", factors_path, recorded.get("factors_created"), factors.metadata.get("created"), "spectrum")
    # the chosen layers' factors, moved to the device once for every dataset (not for a result read back); off the CPU
    # nothing of the file's memory map (whose pages the finite check read) is kept beside them: only the metadata stays
    layer_factors = {} if from_file else {tm.name: factors.layers[tm.name].to(ctx.device, accumulator_dtype(ctx.model)) for tm in chosen}
    factors = dataclasses.replace(factors, layers={})
    st = ctx.state
    resumed_from = None
    if from_file:
        clear_progress_of_finished(st, out_dir, storage.SPECTRUM_PARTIAL, outputs=[path])  # a kill right after the final rename
        results = _load_energies(path, list(datasets))
    else:
        # of the factors written then: --resume refuses progress of a refit of the same settings since, as dataset-similarity does
        progress_fields = result_fields | {"factors_created": factors.metadata.get("created")}
        saved = DatasetsProgress.start(
            path, storage.SPECTRUM_PARTIAL, st, progress_fields, list(datasets), batch_size=cfg.data.batch_size,
            every=cfg.factors.checkpoint_every, resume=resume, overwrite=overwrite, per_example=_PARTS,
            examples=[stop - start for start, stop in (st.shard(len(ds)) for ds in datasets.values())],
        )  # the old result and progress go once the first batches below passed their checks
        resumed_from = saved.resumed_from(list(datasets), st)
        results = [DatasetSpectrum(name, **t) for name, t in zip(datasets, saved.finished, strict=False)]
    if not from_file:  # each dataset's first batch before any pass (`passes.check_first_batches`)
        first_batch = functools.partial(_stream, ctx.model, chosen, task_kind=cfg.task.kind, device=ctx.device, padding_value=cfg.data.padding_value)
        left = list(datasets.items())[len(results) :]
        check_first_batches([lambda name=name, ds=ds: first_batch(ctx.batches(ds), name=keys[name]) for name, ds in left], st)
        saved.remove_replaced()  # on every rank, once every rank's first batches passed
    t0 = time.perf_counter()
    for i, (name, ds) in enumerate(datasets.items() if not from_file else []):
        if i < len(results):
            continue
        start, stop = st.shard(len(ds))
        part = dataset_spectrum(
            ctx.model, chosen, layer_factors, bands, ctx.batches(ds, start_batch=saved.batches_done),
            bins=sp.bins, task_kind=cfg.task.kind, name=keys[name], device=ctx.device,
            noisy_of=lambda gi, ds=ds: ds.noisy_mask[ds.position_of(gi)], num_examples=stop - start, title=name, progress=progress,
            padding_value=cfg.data.padding_value, saved=saved,
        )  # fmt: skip
        results.append(_gather(dataclasses.replace(part, name=name), st))
        saved.finish(_as_tensors(results[-1]), more=i + 1 < len(datasets))
    seconds = {"passes": time.perf_counter() - t0}
    groups = groups_of(results)
    infos = [
        LayerBandInfo(
            tm.name, (tm.d_out, tm.d_in), bands[tm.name].counts, bands[tm.name].mass, bands[tm.name].input_counts, bands[tm.name].without_curvature
        )
        for tm in chosen
    ]
    report = SpectrumReport(
        path, [tm.name for tm in chosen], order, sp.bottom, sp.top, sp.mass, sp.bins, infos, results, groups, baseline,
        factors.strategy, factors.fisher, {} if from_file else seconds, from_file=from_file, resumed_from=resumed_from,
        loaded={keys[name]: ds for name, ds in datasets.items()},
    )  # fmt: skip
    if report.flat_bands()[0]:
        warn(
            "spectrum: the bottom band has no curvature in any analysed layer (e.g. only the softmax's null direction, dead units or "
            "inputs that are always 0): its shares are rounding, no ratio or example ranking is given; raise spectrum.bottom"
        )
    if from_file:
        return report
    if st.is_main:
        flags = {"spectrum.order": order} | ({"spectrum.layers": layers} if layers else {})
        _save(report, ctx, fingerprints, result_fields, flags, factors.metadata.get("created"))
    st.barrier()
    saved.clear()
    report.seconds["total"] = time.perf_counter() - t_start
    return report


def _load_energies(path: Path, names: list[str]) -> list[DatasetSpectrum]:
    """The per-example energies of a finished spectrum file (stored in float32, read as that: sums over them are
    taken in float64)."""
    tensors, _ = storage.load_tensors(path, storage.SPECTRUM_FORMAT)
    return [
        DatasetSpectrum(
            name, tensors[f"{name}.global_indices"], tensors[f"{name}.labels"], tensors[f"{name}.noisy"],
            *(tensors[f"{name}.{k}"] for k in ("band_energy", "bin_energy", "input_energy")),
        )  # fmt: skip
        for name in names
    ]


def _save(
    report: SpectrumReport, ctx: RunContext, fingerprints: dict[str, str], result: dict[str, Any], flags: dict[str, object], factors_created: Any
) -> None:
    """Writes the spectrum file; `flags`: what --order and --layers gave spectrum.order and spectrum.layers (`provenance`);
    `factors_created`: the factors' `created`, so that a refit of the same settings is warned of when the result is shown again."""
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
            **ctx.provenance(flags),
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
            "factors_created": factors_created,
            "result_key": run_key(result),
            "result": result,
        },
    )


def load_spectrum_scores(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-example scores of a spectrum file: {dataset: {global_indices, labels, noisy, bottom_share,
    bottom_energy}} (bottom_energy [N]: the bottom band's gradient energy, summed over the layers)."""
    tensors, meta = storage.load_tensors(Path(path), storage.SPECTRUM_FORMAT)
    return {
        name: {k: tensors[f"{name}.{k}"] for k in ("global_indices", "labels", "noisy", "bottom_share")}
        | {"bottom_energy": bottom_energy(tensors[f"{name}.band_energy"])}
        for name in meta.get("names", [])
    }


