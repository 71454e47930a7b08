"""Curvature bands of a layer's Kronecker eigenbasis, shared by `spectrum` and `edit`.

The eigenbasis (U_A, U_G; factors.py) has d_out·d_in directions (i, j), each with a curvature

    c[i, j] = λ_G[i]·λ_A[j]   (order: kfac, the K-FAC products)   or   Λ*[i, j]   (order: ekfac)

Sorted by c they split into three bands: the bottom p and top q share of the directions (the
middle is the rest), or, with `mass`, the largest set of lowest-curvature directions holding at
most p of Σc and the smallest set of highest-curvature directions holding at least q of it
(Merullo et al. 2025, "From Memorization to Reasoning in the Spectrum of Loss Curvature").
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from influence_cli import storage
from influence_cli.config import SPECTRUM_ORDERS
from influence_cli.context import RunContext
from influence_cli.errors import ConfigError, OutputError, UsageError
from influence_cli.factors import Factors, LayerFactors
from influence_cli.fit import check_factors_match, load_factors
from influence_cli.tracking import TrackedModule


def directions_of_share(share: float, n: int) -> int:
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
        n_top = directions_of_share(top, n)
        return min(directions_of_share(bottom, n), n - n_top), n_top
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
        without_curvature: Per band, whether it has directions and all of them lie outside the
            curvature's numerical range (`_null_directions`: the softmax's null direction, inputs
            that are always 0, dead units): energy there is rounding or what the fit never saw.
    """

    name: str
    band: torch.Tensor
    bin: torch.Tensor
    input_band: torch.Tensor
    counts: list[int]
    mass: list[float]
    input_counts: list[int]
    without_curvature: list[bool]

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
    null = _null_directions(lf)
    return LayerBands(
        lf.name,
        band,
        percentile_bins(c, bins),
        input_band,
        [int((band == k).sum()) for k in range(3)],
        mass_share,
        [int((input_band == k).sum()) for k in range(3)],
        [bool((band == k).any()) and bool(null[band == k].all()) for k in range(3)],
    )


def _null_directions(lf: LayerFactors) -> torch.Tensor:
    """bool [d_out, d_in]: directions outside the curvature's numerical range, where λ_G or λ_A is at
    most its factor's max·eps·size (a matrix rank's usual tolerance, with the factors' `rounding()`):
    the softmax's null direction, inputs that are always 0, dead units. The product of two small
    real eigenvalues is not one of them."""
    eps = lf.rounding() or 0.0

    def null(values: torch.Tensor) -> torch.Tensor:
        v = values.double().cpu()
        return v <= float(v.abs().max()) * eps * v.numel()

    return null(lf.g_eigenvalues)[:, None] | null(lf.a_eigenvalues)[None, :]  # type: ignore[arg-type]


def select_layers(tracked: list[TrackedModule], patterns: list[str], key: str, source: str | None = None) -> list[TrackedModule]:
    """The tracked layers whose names match any fnmatch pattern, in model order (`source`: the config
    file, named by a ConfigError).

    Raises:
        UsageError (a --flag) or ConfigError (a config key): no tracked layer matches.
    """
    chosen = [tm for tm in tracked if any(fnmatch.fnmatchcase(tm.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(tm.name for tm in tracked[:8])
        message, hint = f"{key}: {list(patterns)} matches none of the tracked layers ({names})", "use '*' or names from `influence inspect`"
        raise UsageError(message, hint=hint) if key.startswith("--") else ConfigError(message, source=source, hint=hint)
    return chosen


def load_kronecker_factors(ctx: RunContext, order: str, order_key: str) -> tuple[Factors, Path]:
    """The factors of fit-factors for this model, checked to hold a Kronecker eigenbasis of the config's
    Fisher (factors.fisher, which changes the eigenbasis; kfac and ekfac factors hold the same one, so the
    config's factors.strategy is not compared) and, for `order` ekfac, the corrected eigenvalues Λ*
    (`order_key`: the flag or key that set the order), from the file's metadata before any tensor is read
    (factors of another model that also hold NaN are refused for the mismatch). Not yet checked to be
    finite: the caller checks the layers it chose (`fit.check_finite_factors`), so that the others are never read.

    Raises:
        OutputError: missing, of another model or layers, fitted with strategy diagonal / identity, or with
            another factors.fisher than the config's.
        UsageError (--order) or ConfigError (spectrum.order): order ekfac with kfac factors (whose
            eigenvalues are the products λ_G·λ_A: the directions would be ordered by kfac under the ekfac name).
    """
    path = ctx.cfg.factors_path / storage.FACTORS_FILE

    def match(factors: Factors) -> None:
        check_factors_match(factors, ctx, path)
        if factors.strategy not in ("kfac", "ekfac"):
            raise OutputError(
                f"{str(path)!r} holds {factors.strategy or 'unknown'} factors; the curvature eigenbasis needs kfac or ekfac factors",
                hint="rerun `influence fit-factors` with --set factors.strategy=ekfac --overwrite",
            ).everywhere()
        if factors.fisher != ctx.cfg.factors.fisher:  # after the strategy: that refit (with this config) fixes both
            raise OutputError(
                f"{str(path)!r} was fitted with factors.fisher={factors.fisher or 'unknown'}, the config has {ctx.cfg.factors.fisher} "
                "(the Fisher sets the curvature eigenbasis)",
                hint="use the factors.fisher of fit-factors, or refit with --overwrite",
            ).everywhere()
        if order == "ekfac" and factors.strategy != "ekfac":
            message = f"{order_key} ekfac: {str(path)!r} holds {factors.strategy} factors, without the corrected eigenvalues Λ* that order ekfac ranks by"
            hint = "use --order kfac (λ_G·λ_A), or refit with --set factors.strategy=ekfac --overwrite"
            raise UsageError(message, hint=hint) if order_key.startswith("--") else ConfigError(message, source=ctx.cfg.source, hint=hint)

    return load_factors(path, check_finite=False, match=match), path


def check_order(order: str, key: str) -> None:
    if order not in SPECTRUM_ORDERS:
        raise UsageError(f"{key}: expected one of {', '.join(SPECTRUM_ORDERS)}, got {order!r}")


