"""Kronecker-factored curvature: accumulators, eigendecomposition and the inverse.

For one tracked layer with activations a and output gradients g (see tracking.py),
the Fisher block is approximated (Martens & Grosse 2015, K-FAC; Grosse & Martens
2016, KFC for positions) as A ⊗ G with

    A = E_n[Σ_t a_t a_tᵀ]         (d_in × d_in)
    G = E_n[(1/T) Σ_t g_t g_tᵀ]   (d_out × d_out)

with t over an example's real positions (T of them) when padding is masked.

EKFAC (George et al. 2018) keeps the eigenbases U_A, U_G and replaces the
eigenvalue products by the Fisher's diagonal in that basis:

    Λ*[i, j] = E_n[(U_Gᵀ ∇W_n U_A)[i, j]²]   (d_out × d_in)

`diagonal` is the same quantity in the parameter basis (U = I); `identity` has
no curvature at all (plain gradient dot products).
"""

from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from influence_cli import storage
from influence_cli.errors import NumericalError, OutputError, out_of_memory
from influence_cli.passes import BatchGradients
from influence_cli.reprs import brief_repr
from influence_cli.squares import add_squared_gradients_
from influence_cli.tracking import TrackedModule

STORED_KEYS = (storage.EIGENVALUES, storage.A_EIGENVECTORS, storage.G_EIGENVECTORS, storage.A_EIGENVALUES, storage.G_EIGENVALUES)
"""The curvature tensors a factors file holds per layer (besides the count), in the order they are checked."""

FINITE_CHUNK_ELEMENTS = 1 << 20  # entries `all_finite` tests at once


def all_finite(t: torch.Tensor, chunk: int | None = None) -> bool:
    """Whether every entry of `t` (any shape) is finite, tested `chunk` entries at a time
    (default `FINITE_CHUNK_ELEMENTS`; a strided tensor's rows are not split, so at least one row).

    torch.isfinite over a whole tensor forms |t| and three boolean masks of t's size, 7 bytes per
    float32 entry beside the tensor itself (1,053 MiB for a 12,545-wide eigenbasis); a chunk's
    temporaries are a few MB. No copy of `t` is made, whatever its layout, and the answer costs one
    host sync.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    flat = t.view(-1) if t.is_contiguous() else t  # a strided tensor (never 0-d) is split along its first dimension
    rows = max(1, (chunk or FINITE_CHUNK_ELEMENTS) // flat[0].numel())
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    for part in flat.split(rows):
        ok &= torch.isfinite(part).all()
    return bool(ok)


@dataclass
class LayerFactors:
    """Curvature of one layer.

    Attributes:
        a_eigenvectors: U_A [d_in, d_in] (None = identity basis).
        g_eigenvectors: U_G [d_out, d_out] (None = identity basis).
        eigenvalues: Curvature diagonal in the basis [d_out, d_in]; None for `identity`.
        a_eigenvalues, g_eigenvalues: λ_A [d_in], λ_G [d_out] (K-FAC / EKFAC).
        a_covariance, g_covariance: A and G themselves (K-FAC / EKFAC), only when asked for
            (`kronecker_layer_factors(keep_covariances=True)`): otherwise released once decomposed.
        num_examples: Examples averaged over.
        eps: The relative rounding of the factors: the coarsest precision they were held in, so
            factors read from a float32 file and moved to float64 keep float32's (None: their dtype's).
        zero_inputs, zero_outputs: How many rows of A (inputs) and of G (outputs) are exactly 0, i.e.
            0 on every example (blank pixels, dead units); None when not known (a factors file).
    """

    __repr__ = brief_repr

    name: str
    eigenvalues: torch.Tensor | None = None
    a_eigenvectors: torch.Tensor | None = None
    g_eigenvectors: torch.Tensor | None = None
    a_eigenvalues: torch.Tensor | None = None
    g_eigenvalues: torch.Tensor | None = None
    a_covariance: torch.Tensor | None = None
    g_covariance: torch.Tensor | None = None
    num_examples: int = 0
    eps: float | None = None
    zero_inputs: int | None = None
    zero_outputs: int | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LayerFactors:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        eps = self.rounding()
        if dtype is not None and dtype.is_floating_point:
            eps = max(eps or 0.0, torch.finfo(dtype).eps)

        return LayerFactors(
            self.name,
            move(self.eigenvalues),
            move(self.a_eigenvectors),
            move(self.g_eigenvectors),
            move(self.a_eigenvalues),
            move(self.g_eigenvalues),
            move(self.a_covariance),
            move(self.g_covariance),
            self.num_examples,
            eps,
            self.zero_inputs,
            self.zero_outputs,
        )

    def nonfinite(self) -> str | None:
        """The name of the first of the layer's tensors (`STORED_KEYS`, then the covariances) that holds
        a NaN or Inf, None when every one is finite (`all_finite`: no temporary the size of a tensor)."""
        for key in (*STORED_KEYS, "a_covariance", "g_covariance"):
            value = getattr(self, key)
            if value is not None and not all_finite(value):
                return key
        return None

    def rounding(self) -> float | None:
        """`eps`, else the machine epsilon of the eigenvalues' dtype (None without eigenvalues)."""
        if self.eps is not None:
            return self.eps
        return None if self.eigenvalues is None else torch.finfo(self.eigenvalues.dtype).eps

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """Into the eigenbasis: U_Gᵀ V U_A for V [..., d_out, d_in]."""
        if self.g_eigenvectors is not None:
            v = self.g_eigenvectors.T @ v
        if self.a_eigenvectors is not None:
            v = v @ self.a_eigenvectors
        return v

    def unrotate(self, v: torch.Tensor) -> torch.Tensor:
        """Back from the eigenbasis: U_G Ṽ U_Aᵀ."""
        if self.g_eigenvectors is not None:
            v = self.g_eigenvectors @ v
        if self.a_eigenvectors is not None:
            v = v @ self.a_eigenvectors.T
        return v

    def damping(self, damping: float | str, factor: float = 0.1) -> float:
        """λ for this layer: `auto` is factor × mean(eigenvalues) (0 without curvature)."""
        if self.eigenvalues is None:
            return 0.0
        if damping == "auto":
            return float(factor * self.eigenvalues.double().mean())
        return float(damping)

    def inverse_eigenvalues(self, damping: float, power: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """1 / (Λ + λ)^power [d_out, d_in]; None means the identity (no curvature).

        With λ = 0 it is the pseudo-inverse: directions whose Λ is at most
        max(Λ)·eps·max(d_out, d_in) (numpy.linalg.pinv's rule, with the factors' `rounding()`; in
        float32 such a Λ is a zero blurred by rounding, e.g. the softmax's null direction) take 0
        instead of a huge 1/Λ.
        They have no curvature, the fit's gradients are 0 there, and 0·(1/0) would be NaN.
        `dtype`: of the result (default: the eigenvalues'); it is computed in float64.
        """
        if self.eigenvalues is None:
            return None
        lam = self.eigenvalues
        tol = float(lam.abs().max()) * (self.rounding() or 0.0) * max(lam.shape) if damping <= 0 else 0.0  # |Λ| is exact in its own dtype
        shifted = lam.to(torch.float64, copy=True).add_(damping)  # one float64 copy, worked on in place
        drop = (shifted > tol).logical_not_()
        inverse = shifted.masked_fill_(drop, 1.0).pow_(-power).masked_fill_(drop, 0.0)
        return inverse.to(dtype or lam.dtype)

    def precondition(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """(F + λ)⁻¹ V for V [..., d_out, d_in] (George et al. 2018: rotate, divide, rotate back)."""
        inv = self.inverse_eigenvalues(damping)
        if inv is None:
            return v
        return self.unrotate(self.rotate(v) * inv)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk tensors, keyed `<layer>.<factor>`.

        A and G themselves are not written: U diag(λ) Uᵀ gives them back, and leaving them out
        halves the file (docs/CONFIG.md, the output folder: eigenvectors, eigenvalues, corrected eigenvalues, counts).
        """
        out = {f"{self.name}.{storage.NUM_EXAMPLES}": torch.tensor([self.num_examples], dtype=torch.int64)}
        for key in STORED_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[f"{self.name}.{key}"] = value.float()
        return out

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, torch.Tensor]) -> LayerFactors:
        def get(key: str) -> torch.Tensor | None:
            return tensors.get(f"{name}.{key}")

        n = get(storage.NUM_EXAMPLES)
        return cls(
            name,
            get(storage.EIGENVALUES),
            get(storage.A_EIGENVECTORS),
            get(storage.G_EIGENVECTORS),
            get(storage.A_EIGENVALUES),
            get(storage.G_EIGENVALUES),
            None,  # A and G are not stored (see `tensors`)
            None,
            int(n.item()) if n is not None else 0,
        )


def layer_damping(layers: dict[str, LayerFactors], damping: float | str, factor: float = 0.1, scope: str = "layer") -> dict[str, float]:
    """λ of every layer (0 for layers without curvature).

    A number is used as given. `auto` is `factor` × a mean of the curvature diagonal Λ:
    with scope `layer`, each layer's own mean (Grosse et al. 2023; Kronfluence's heuristic),
    so each block is damped relative to its own scale; with scope `model`, the mean over every
    tracked parameter (Σ_l ΣΛ_l / Σ_l P_l), one λ for the whole block-diagonal F, i.e. the
    Tikhonov damping (F + λI)⁻¹ of the classical influence function (Koh & Liang 2017).
    """
    if damping != "auto" or scope == "layer":
        return {name: lf.damping(damping, factor) for name, lf in layers.items()}
    curved = [lf.eigenvalues for lf in layers.values() if lf.eigenvalues is not None]
    total = sum(float(v.double().sum()) for v in curved)
    count = sum(v.numel() for v in curved)
    lam = factor * total / count if count else 0.0
    return {name: (lam if lf.eigenvalues is not None else 0.0) for name, lf in layers.items()}


SCALE_SPREAD = 100.0
"""`column_scales` flags a layer whose input columns' mean E[a_j²] is at least this many times their median."""


@dataclass
class ColumnScales:
    """A layer's input columns on scales far apart (`column_scales`).

    Attributes:
        spread: mean_j E[a_j²] / median_j E[a_j²] (the median over the columns that are not always 0).
        columns: The columns whose E[a_j²] is at least `SCALE_SPREAD` × the median, largest first.
        ratios: Their E[a_j²] / the median, in the same order.
        median: The median E[a_j²] itself.
    """

    spread: float
    columns: list[int]
    ratios: list[float]
    median: float


def column_scales(a_diagonal: torch.Tensor) -> ColumnScales | None:
    """The columns that set a layer's auto damping far above its typical column's curvature, from the
    diagonal of A [d_in] (E[a_j²]); None when the spread is below `SCALE_SPREAD`.

    Auto damping, 0.1 × the mean eigenvalue, is about 0.1 × mean(λ_G) × mean_j E[a_j²] (exactly under
    K-FAC), and a column's own curvature about mean(λ_G) × E[a_j²]: a spread mean/median of 100 puts auto
    damping at 10 × the median column's curvature, where one column on a scale of 1e6 among five of scale 1
    puts it at 1e10, and the scores follow that column alone. The median measures the typical column:
    a rare feature (a pixel almost always 0) has a small E[a_j²] and sits below it, moving neither the
    median nor the mean, where a condition number or a max/min ratio would flag every image layer (MNIST's
    first layer: min/median 4e-8, mean/median 2.3).
    """
    diag = a_diagonal.detach().double().cpu()
    present = diag[diag > 0]
    if len(present) < 2:
        return None
    median = float(present.median())
    spread = float(diag.mean()) / median
    if spread < SCALE_SPREAD:
        return None
    ratios, order = (diag / median).sort(descending=True)
    keep = ratios >= SCALE_SPREAD
    return ColumnScales(spread, order[keep].tolist(), ratios[keep].tolist(), median)


def basis_diagonal(vectors: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """diag(U diag(λ) Uᵀ) [n] in float64 from an eigenbasis U [n, n] and its eigenvalues λ [n]: the
    diagonal of the matrix decomposed, a block of rows at a time (no n² temporary)."""
    lam = values.to(vectors.device, torch.float64)
    return torch.cat([vectors[i : i + _ROW_BLOCK].double().square_() @ lam for i in range(0, len(vectors), _ROW_BLOCK)])


@dataclass
class Factors:
    """Every tracked layer's curvature plus what produced it."""

    __repr__ = brief_repr

    strategy: str
    fisher: str
    layers: dict[str, LayerFactors]
    metadata: dict[str, str] = field(default_factory=dict, repr=False)  # the whole config and fingerprints: kept out of the repr

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Factors:
        return Factors(self.strategy, self.fisher, {k: v.to(device, dtype) for k, v in self.layers.items()}, self.metadata)


# ----------------------------------------------------------------------------- accumulators


def low_precision_mm(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """x @ y with both operands in `dtype` (bfloat16 / float16): the fast matrix units, half the traffic.

    On CUDA the product is returned in `out_dtype` straight from the fp32 accumulation of the
    GEMM; elsewhere it is rounded to `dtype` (8 significant bits for bfloat16) and converted.
    """
    x, y = x.to(dtype), y.to(dtype)
    if not x.is_cuda:
        return torch.mm(x, y).to(out_dtype)
    try:
        return torch.mm(x, y, out_dtype=out_dtype)
    except (TypeError, RuntimeError):  # a torch build without mm(out_dtype=) (its missing kernels raise a RuntimeError subclass): round, then convert
        return torch.mm(x, y).to(out_dtype)


def add_product_(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor, matmul_dtype: torch.dtype | None, alpha: float = 1.0) -> None:
    """acc += alpha · x @ y, the product in `matmul_dtype` when given (None: in acc's dtype), the sum in acc's dtype."""
    if matmul_dtype is None or matmul_dtype == acc.dtype:
        acc.addmm_(x.to(acc.dtype), y.to(acc.dtype), alpha=alpha)
    else:
        acc.add_(low_precision_mm(x, y, matmul_dtype, acc.dtype), alpha=alpha)


LAUNCH_BOUND_MACS = 1 << 30  # off the CPU, products of fewer multiply-adds are bound by kernel launches (~42 µs at an H200's fp32 rate)
LAUNCH_BOUND_WIDTH = 4096  # and of fewer columns: a whole gram's float32 temporary under factors.amp stays within 64 MiB


def launch_bound(device: torch.device, rows: int, width: int) -> bool:
    """Whether a product of `rows` × `width`² multiply-adds on `device` costs less as one GEMM than
    as the several smaller kernels that would skip some of its flops (`add_gram_`'s blocks,
    `Rotation`'s gathers): off the CPU below `LAUNCH_BOUND_MACS`, where a pass waits on the host's
    kernel launches (the MNIST MLP on an H200: 8% of a fit's time busy on the GPU), for widths below
    `LAUNCH_BOUND_WIDTH` (under `factors.amp` a whole gram is a float32 temporary of width² entries
    beside its accumulator, the blocks' width²/16: a wide layer's last few rows stay in blocks)."""
    return device.type != "cpu" and width < LAUNCH_BOUND_WIDTH and rows * width * width < LAUNCH_BOUND_MACS


def gram_blocks(width: int, whole: bool = False) -> list[tuple[int, int]]:
    """Column ranges for accumulating a symmetric xᵀx of `width` columns block by block.

    Only the blocks on and above the diagonal are computed, k(k+1)/2 of k² (a BLAS syrk by
    hand: 2/3 of the flops with 3 blocks); below a width of 512 one GEMM is faster, and so it is
    for a `launch_bound` product (`whole`). Either way the blocks above the diagonal of the
    split by width (the finest) are complete sums, which `mirror_` relies on.
    """
    k = 1 if whole or width < 512 else min(4, width // 256)
    edges = [round(i * width / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def add_gram_(acc: torch.Tensor, x: torch.Tensor, matmul_dtype: torch.dtype | None, alpha: float = 1.0) -> None:
    """acc [w, w] += alpha · xᵀx for x [n, w], in the blocks on and above the diagonal only (`gram_blocks`).

    The blocks below the diagonal are left as they are; `symmetric` fills them.
    """
    blocks = gram_blocks(x.shape[1], whole=launch_bound(x.device, *x.shape))
    for i, (r0, r1) in enumerate(blocks):
        xi = x[:, r0:r1]
        for c0, c1 in blocks[i:]:
            add_product_(acc[r0:r1, c0:c1], xi.T, x[:, c0:c1], matmul_dtype, alpha=alpha)


def symmetric(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix of an `add_gram_` accumulator (a copy; its lower blocks mirrored)."""
    return mirror_(acc.clone())


def mirror_(acc: torch.Tensor) -> torch.Tensor:
    """Fills the blocks below the diagonal of an `add_gram_` accumulator [w, w] from those above, in place; returns it.

    The split by width alone: its upper blocks are complete sums also where batches were summed
    as one GEMM (`launch_bound`: a GPU, or a pass resumed on one, or a smaller last batch).
    """
    blocks = gram_blocks(acc.shape[0])
    for i, (r0, r1) in enumerate(blocks):
        for c0, c1 in blocks[i + 1 :]:
            acc[c0:c1, r0:r1] = acc[r0:r1, c0:c1].T
    return acc


class CovarianceAccumulator:
    """Pass 1: running sums of Σ_t a aᵀ and (1/T) Σ_t g gᵀ over examples.

    `matmul_dtype` (bfloat16 under `factors.amp: bfloat16`) runs each batch's products in that
    dtype; the sums stay in `dtype`. Wide factors are summed in their upper block triangle only
    (`add_gram_`): `covariances` returns the full matrices.
    """

    def __init__(
        self, tracked: list[TrackedModule], dtype: torch.dtype, device: torch.device, matmul_dtype: torch.dtype | None = None
    ) -> None:
        self.a = {tm.name: torch.zeros(tm.d_in, tm.d_in, dtype=dtype, device=device) for tm in tracked}
        self.g = {tm.name: torch.zeros(tm.d_out, tm.d_out, dtype=dtype, device=device) for tm in tracked}
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.matmul_dtype = matmul_dtype

    def update(self, batch: BatchGradients) -> None:
        for name, acc in self.a.items():
            a = batch.activations[name]
            add_gram_(acc, a.reshape(-1, a.shape[-1]), self.matmul_dtype)
            positions = batch.positions.get(name)
            for grads in batch.gradients:
                g = grads[name]
                if positions is None:
                    add_gram_(self.g[name], g.reshape(-1, g.shape[-1]), self.matmul_dtype, alpha=1.0 / g.shape[1])
                else:  # each example averages over its own real positions
                    add_gram_(self.g[name], (g * positions.rsqrt()[:, None, None]).reshape(-1, g.shape[-1]), self.matmul_dtype)
        self.count += len(batch.global_indices)

    def covariances(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ a aᵀ, Σ (1/T) g gᵀ) of one layer as full symmetric matrices (sums, not yet means)."""
        return symmetric(self.a[name]), symmetric(self.g[name])

    def means(self, name: str, count: float, *, release: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, G) of one layer: its sums / `count` as full symmetric matrices [d_in, d_in], [d_out, d_out].

        One new tensor per factor (the quotient, mirrored in place), or with `release` none: the
        sums are divided and mirrored in their own memory and the layer leaves the accumulator (its
        `state` no longer holds them). A 12,545-wide A is 630 MB in float32.
        """
        if not release:
            return mirror_(self.a[name] / count), mirror_(self.g[name] / count)
        return mirror_(self.a.pop(name).div_(count)), mirror_(self.g.pop(name).div_(count))

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"{k}.a": v for k, v in self.a.items()} | {f"{k}.g": v for k, v in self.g.items()}
        return out | {"count": self.count}


class DiagonalAccumulator:
    """Pass 2: Σ_n (U_Gᵀ ∇W_n U_A)² (EKFAC), or Σ_n ∇W_n² with identity bases (diagonal).

    For a layer without positions (T = 1) the per-example gradient in the basis is
    the outer product g̃ ãᵀ, so the sum of its squares is one matmul,
    (g̃²)ᵀ (ã²); with positions see squares.py (position pairs, or bmm in chunks).
    """

    def __init__(
        self,
        tracked: list[TrackedModule],
        bases: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]],
        dtype: torch.dtype,
        device: torch.device,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        low = matmul_dtype is not None and matmul_dtype != dtype
        self.matmul_dtype = matmul_dtype if low else None
        rotation = lambda u: None if u is None else Rotation(u.to(matmul_dtype) if low else u)  # noqa: E731
        self.rotations = {name: (rotation(u_a), rotation(u_g)) for name, (u_a, u_g) in bases.items()}
        self.sums = {tm.name: torch.zeros(tm.d_out, tm.d_in, dtype=dtype, device=device) for tm in tracked}
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, batch: BatchGradients) -> None:
        low = self.matmul_dtype
        for name, acc in self.sums.items():
            rot_a, rot_g = self.rotations[name]
            a = batch.activations[name] if low is None else batch.activations[name].to(low)
            a_rot = rot_a(a) if rot_a is not None else a
            for grads in batch.gradients:
                g = grads[name] if low is None else grads[name].to(low)
                g_rot = rot_g(g) if rot_g is not None else g
                accumulate_squared_gradients(acc, a_rot, g_rot)
        self.count += len(batch.global_indices)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{k}.diag": v for k, v in self.sums.items()} | {"count": self.count}


def accumulate_squared_gradients(acc: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> None:
    """acc [d_out, d_in] += Σ_n (Σ_t g_nt a_ntᵀ)² for a [B, T, d_in], g [B, T, d_out] (squares.py).

    a and g in a lower precision than acc (bfloat16 / float16) keep the product in theirs when
    T = 1, where every term is a square; with positions the cross terms cancel, and it runs in acc's.
    """
    if a.shape[1] == 1 and a.dtype != acc.dtype:
        add_product_(acc, g[:, 0].square().T, a[:, 0].square(), a.dtype)
    else:
        add_squared_gradients_(acc, a, g)


def null_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Indices [k] of the rows of a square matrix that are exactly zero.

    A covariance has one for every input (or output) that is zero on every example:
    MNIST's blank border pixels, a dead ReLU unit, an unused one-hot column.
    """
    rows = _ROW_BLOCK  # a block of rows at a time: no temporary as large as the matrix
    zero = [matrix[i : i + rows].abs().amax(dim=1) == 0 for i in range(0, len(matrix), rows)]
    return torch.cat(zero).nonzero().flatten() if zero else torch.zeros(0, dtype=torch.int64, device=matrix.device)


_ROW_BLOCK = 1024  # rows (or block width) of the blockwise passes over a square matrix here


class Handover:
    """A tensor handed to a callee with its last reference: `take()` gives it up once, so that the
    callee can release it (`eigendecompose`: a mean covariance, while its own eigh runs)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor: torch.Tensor | None = tensor

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor, lent (still held here)."""
        if self._tensor is None:
            raise RuntimeError("the tensor was already taken")
        return self._tensor

    def take(self) -> torch.Tensor:
        tensor, self._tensor = self.tensor, None
        return tensor


def _lent(matrix: torch.Tensor | Handover) -> torch.Tensor:
    return matrix.tensor if isinstance(matrix, Handover) else matrix


SPILL_BYTES = 64 << 20
"""A matrix handed over to `eigendecompose` with a `spill_dir` is written there while its eigh runs
when it is larger than this (a 12,545-wide float32 A: 630 MB); smaller ones stay in memory."""


def eigendecompose(
    matrix: torch.Tensor | Handover, vectors_dtype: torch.dtype = torch.float64, *, spill_dir: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [n] (float64, ascending, clamped at 0) and eigenvectors [n, n] (`vectors_dtype`) of a symmetric matrix [n, n].

    The k exactly-zero rows (`null_rows` of the symmetrised matrix) are deflated: their
    eigenvectors are the unit vectors e_i (eigenvalue exactly 0, the first k columns, in row
    order), and eigh runs on the remaining (n − k)² block only, so that its cost falls by
    ((n − k) / n)³. It is an exact eigendecomposition of the same matrix, with exact zeros where
    LAPACK would return rounding noise.

    Memory: `matrix` is read, never written. The only float64 matrix is the symmetrised
    (n − k)² block, gathered from `matrix` a block of rows at a time (the full n² one is never
    formed), which LAPACK overwrites with the eigenvectors (eigh in place), plus LAPACK's
    workspace (syevd: about 2 (n − k)² float64 more; that is the floor). `vectors_dtype`: of the
    eigenvectors returned (rounded from float64; the eigenvalues stay float64), so that a float32
    eigenbasis is built without a float64 one of full size.

    `matrix` as a `Handover` is released here; with `spill_dir`, one larger than `SPILL_BYTES` is
    not in memory while eigh runs: it is written to an anonymous temporary file in `spill_dir`
    (gone when closed, or with the process; a GPU's matrix is copied to host memory instead), read back only if the fall-backs need it (`_eigh`),
    and the file is closed before this returns or raises. Without a directory, or if the file
    cannot be written, it stays in memory until the eigenvectors are there.
    """
    owned = isinstance(matrix, Handover)  # a matrix the caller holds is in memory anyway: never spilled
    source = _Symmetrised(matrix.take() if isinstance(matrix, Handover) else matrix)
    try:
        return _eigendecompose(source, vectors_dtype, spill_dir if owned else None)
    finally:
        source.close()


def _eigendecompose(source: _Symmetrised, vectors_dtype: torch.dtype, spill_dir: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, device = source.shape[0], source.device
    null = _symmetrised_null_rows(source.lent())
    if len(null) == 0:
        values, vectors = _eigh(source, spill_dir)
        return values, vectors.to(vectors_dtype)
    keep = source.keep = _complement(null, n)
    k = len(null)
    if len(keep):
        sub_values, sub_vectors = _eigh(source, spill_dir)
    else:
        sub_values, sub_vectors = torch.zeros(0, dtype=torch.float64, device=device), None
    values = torch.zeros(n, dtype=torch.float64, device=device)
    values[k:] = sub_values
    vectors = torch.zeros(n, n, dtype=vectors_dtype, device=device)
    vectors[null, torch.arange(k, device=device)] = 1.0
    for c in range(0, n - k, _ROW_BLOCK):  # a block of columns at a time, rounded to vectors_dtype on the way
        block = sub_vectors[:, c : c + _ROW_BLOCK]
        vectors[keep.unsqueeze(1), torch.arange(k + c, k + c + block.shape[1], device=device)] = block.to(vectors_dtype)
    return values, vectors


class _Symmetrised:
    """The float64 matrix eigh decomposes, `symmetrised_float64(M, keep)`, formed from M on demand;
    M [n, n] can be moved off its device in the meantime (`spill`: a CPU matrix to a file, a GPU's
    to host memory) and is then read from there to form it."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix: torch.Tensor | None = matrix
        self.keep: torch.Tensor | None = None
        self.shape, self.dtype, self.device = matrix.shape, matrix.dtype, matrix.device
        self.file: BinaryIO | None = None
        self.host: torch.Tensor | None = None

    def lent(self) -> torch.Tensor:
        assert self.matrix is not None, "M is in its file"
        return self.matrix

    def form(self) -> torch.Tensor:
        """S = symmetrised_float64(M, keep): on M's device, or, once M was spilled, on the CPU from
        M read back (M [n, n] alive beside S only until S is formed)."""
        if self.matrix is not None:
            return symmetrised_float64(self.matrix, self.keep)
        keep = None if self.keep is None else self.keep.cpu()
        if self.host is not None:
            return symmetrised_float64(self.host, keep)
        assert self.file is not None
        return symmetrised_float64(_read_spilled(self.file, self.shape, self.dtype), keep)

    def spill(self, directory: Path) -> None:
        """Moves M, when larger than `SPILL_BYTES`, off its device and lets it go there: a GPU's M to host
        memory (a copy; no disk written), a CPU M to an anonymous temporary file in
        `directory`; it stays if the file cannot be written (a full disk: the spill only saves memory)."""
        m = self.lent()
        if m.numel() * m.element_size() <= SPILL_BYTES:
            return
        if self.device.type != "cpu":
            self.host, self.matrix = m.cpu(), None
            return
        try:
            self.file = _spill(m, directory)
        except OSError:
            return
        self.matrix = None

    def close(self) -> None:
        self.matrix = self.host = None
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()  # the descriptor is released, and the file gone, however this ends
            except OSError:  # a late write error (a network folder reports them on close): nothing reads it now
                pass


def _spill(matrix: torch.Tensor, directory: Path) -> BinaryIO:
    """`matrix` [n, m]'s bytes, row-major, written to an anonymous temporary file in `directory`
    (removed once closed: the caller closes it) a block of rows at a time; the file is returned."""
    file = tempfile.TemporaryFile(dir=directory)
    try:
        for i in range(0, len(matrix), _ROW_BLOCK):
            rows = matrix[i : i + _ROW_BLOCK].contiguous().cpu()  # a contiguous CPU matrix's own rows: no copy
            file.write(memoryview(rows.reshape(-1).view(torch.uint8).numpy()))
        file.flush()
    except BaseException:
        file.close()
        raise
    return file


def _read_spilled(file: BinaryIO, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The matrix `_spill` wrote to `file`, read into a new CPU tensor of `shape` and `dtype`."""
    out = torch.empty(shape, dtype=dtype)
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    file.seek(0)
    done = 0
    while done < len(buffer):
        got = file.readinto(buffer[done:])
        if not got:
            raise OSError(f"the spilled matrix's file ended after {done} of {len(buffer)} bytes")
        done += got
    return out


def symmetrised_float64(matrix: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """S = 0.5 · (M + Mᵀ) in float64 [n, n], or its rows and columns `keep` [m] (ascending) only,
    S[keep][:, keep] [m, m]: a new tensor (also for a float64 M), bit for bit those expressions.

    The kept block is gathered a block of rows at a time and symmetrised in place one pair of
    blocks at a time: no n² temporary.
    """
    if keep is None:
        sym = matrix.to(torch.float64, copy=True)
    else:
        sym = torch.empty(len(keep), len(keep), dtype=torch.float64, device=matrix.device)
        for i in range(0, len(keep), _ROW_BLOCK):
            sym[i : i + _ROW_BLOCK] = matrix.index_select(0, keep[i : i + _ROW_BLOCK]).index_select(1, keep)
    m, b = len(sym), _ROW_BLOCK
    for i in range(0, m, b):
        for j in range(i, m, b):
            upper, lower = sym[i : i + b, j : j + b], sym[j : j + b, i : i + b]
            half = (upper + lower.T).mul_(0.5)
            upper.copy_(half)
            lower.copy_(half.T)
    return sym


def _symmetrised_null_rows(matrix: torch.Tensor) -> torch.Tensor:
    """`null_rows` of 0.5 · (M + Mᵀ) in float64 [k], read from M a block of rows (and columns) at a time."""
    zero = []
    for i in range(0, len(matrix), _ROW_BLOCK):
        rows = matrix[i : i + _ROW_BLOCK].double() + matrix[:, i : i + _ROW_BLOCK].T.double()
        zero.append(rows.mul_(0.5).abs_().amax(dim=1) == 0)
    return torch.cat(zero).nonzero().flatten() if zero else torch.zeros(0, dtype=torch.int64, device=matrix.device)


def _eigh(source: _Symmetrised, spill_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [n] (ascending, clamped at 0) and eigenvectors [n, n] (column-major, as
    torch.linalg.eigh returns them) of the exactly symmetric PSD float64 matrix S that `source` forms.

    LAPACK overwrites S with the eigenvectors (in place: no copy of it); with `spill_dir`, M
    (`source`'s matrix) is spilled there first when large (`_Symmetrised.spill`). Should LAPACK
    fail, the matrix it wrote into is released and `source` forms S anew, copied to the CPU (from M read
    back if spilled), for the fall-backs there: torch.linalg.eigh (some device builds lack a
    float64 eigh, or the device lacks the memory for its workspace), then the SVD (LAPACK's
    divide-and-conquer eigh can fail to converge on matrices with many repeated eigenvalues; a PSD
    matrix's SVD U S Uᵀ is its eigendecomposition). So one such matrix is alive at a time (the
    fall-backs' on the CPU).
    """
    sym = source.form()
    device = sym.device
    if spill_dir is not None:
        source.spill(spill_dir)
    try:
        values, vectors = _eigh_in_place(sym)
        return values.clamp_min(0.0), vectors
    except RuntimeError as exc:  # torch.linalg.LinAlgError included
        error = exc
    del sym
    traceback.clear_frames(error.__traceback__)  # the failed call's frames hold the matrix too
    matrix = source.form().cpu()
    attempts = [torch.linalg.eigh] if device.type != "cpu" else []
    for attempt in [*attempts, _eigh_by_svd]:
        try:
            values, vectors = attempt(matrix)
            break
        except RuntimeError as exc:
            error = exc
    else:
        raise error
    return values.to(device).clamp_min(0.0), vectors.to(device)


def _eigh_in_place(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of `sym` [n, n], exactly symmetric, writing the eigenvectors into it.

    Its column-major view holds the same matrix; eigh writes the eigenvectors into the tensor
    passed as `out`, and copies nothing when that is its input.
    """
    vectors = sym.mT
    return torch.linalg.eigh(vectors, out=(sym.new_empty(len(sym)), vectors))


def _eigh_by_svd(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues and eigenvectors of a symmetric PSD matrix from its SVD."""
    u, s, _ = torch.linalg.svd(sym)
    return s.flip(0), u.flip(1)


def _complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=indices.device)
    mask[indices] = False
    return mask.nonzero().flatten()


def deflated_columns(vectors: torch.Tensor, chunk: int = 256) -> int:
    """How many leading columns of an eigenbasis U [n, n] are unit vectors e_i (`eigendecompose`'s
    deflated null rows): columns holding a single nonzero entry, ±1. Reads only the leading run
    and one chunk of columns past it."""
    k = 0
    while k < vectors.shape[1]:
        block = vectors[:, k : k + chunk]
        unit = (block.abs().amax(dim=0) == 1) & ((block != 0).sum(dim=0) == 1)
        run = int(unit.int().cumprod(0).sum())
        k += run
        if run < block.shape[1]:
            break
    return k


class Rotation:
    """x ↦ x U [..., n] for an eigenbasis U [n, n], skipping the unit vectors `eigendecompose` deflated.

    When U's first k columns are unit vectors e_i (the null rows of the matrix), (x U)[..., :k]
    is x[..., null] and (x U)[..., k:] = x[..., rest] U[rest, k:]: an (n − k)² matmul instead of n².
    A ResNet's last stage at 32 × 32 inputs has 90% such rows (the zero padding of a 1 × 1 feature
    map), MNIST's first layer 15% (blank pixels). Exact for any x. The gathers cost more than they
    save below n = `MIN_WIDTH` or k < n · `MIN_NULL_FRACTION` (measured on CPU), where the plain
    matmul runs, and for an x too small to keep a GPU busy (`launch_bound`), where the gathers'
    kernel launches cost more than the flops they save.

    Attributes:
        deflated: k, the number of leading unit-vector columns of U (whether skipped or not).
    """

    MIN_NULL_FRACTION = 0.125
    MIN_WIDTH = 512

    def __init__(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors
        self.null: torch.Tensor | None = None
        k = self.deflated = deflated_columns(vectors)
        if k and len(vectors) >= self.MIN_WIDTH and k >= self.MIN_NULL_FRACTION * len(vectors):
            self.null = vectors[:, :k].abs().argmax(dim=0)
            self.rest = _complement(self.null, len(vectors))
            self.block = vectors[:, k:].index_select(0, self.rest)  # U[rest, k:], contiguous, copied once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.vectors)
        if self.null is None or launch_bound(x.device, x.numel() // n, n):
            return x @ self.vectors
        return torch.cat([x.index_select(-1, self.null), x.index_select(-1, self.rest) @ self.block], dim=-1)


def _layer_eigendecompose(
    layer: str, which: str, matrix: torch.Tensor | Handover, vectors_dtype: torch.dtype, spill_dir: Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(_lent(matrix))
    try:
        return eigendecompose(matrix, vectors_dtype, spill_dir=spill_dir)
    except RuntimeError as exc:  # LAPACK's "failed to converge" (torch.linalg.LinAlgError)
        if out_of_memory(exc) is not None:
            raise
        raise NumericalError(
            f"the float64 eigendecomposition of layer {layer!r}'s {which} ({n}×{n}) did not converge",
            hint="fit on more examples, or leave the layer out of factors.modules (`influence inspect CONFIG` lists the layers)",
        ) from exc
    except OSError as exc:  # the only I/O here: a spilled matrix read back for the fall-backs of a failed eigh
        raise OutputError(
            f"layer {layer!r}'s {which} ({n}×{n}) cannot be read back from its temporary file in {str(spill_dir)!r} for the "
            f"fall-backs of its failed float64 eigendecomposition ({exc.strerror or exc})",
            hint="check the disk that folder is on, then rerun with --resume",
        ) from exc


def kronecker_layer_factors(
    name: str,
    a_cov: torch.Tensor | Handover,
    g_cov: torch.Tensor | Handover,
    num_examples: int,
    out_dtype: torch.dtype,
    *,
    keep_covariances: bool = False,
    spill_dir: Path | None = None,
) -> LayerFactors:
    """K-FAC factors of one layer from its mean covariances (eigenvalues = λ_G λ_Aᵀ).

    Each eigendecomposition runs in float64 and hands back its eigenvectors in `out_dtype`: A's
    float64 eigenbasis is gone before G's eigendecomposition starts. The factors count the zero rows
    of A and G (`zero_inputs`, `zero_outputs`) and hold A and G themselves only with
    `keep_covariances` (in `out_dtype`): otherwise nothing of them outlives the caller's references
    (a 12,545-wide A is 630 MB in float32). Handed over (`Handover`, without `keep_covariances`),
    each is released for its own eigendecomposition, and with `spill_dir` a large one is not in
    memory while its eigh runs (`eigendecompose`).
    """
    if keep_covariances:
        a_cov, g_cov = (c.take() if isinstance(c, Handover) else c for c in (a_cov, g_cov))
    zero_inputs, zero_outputs = len(null_rows(_lent(a_cov))), len(null_rows(_lent(g_cov)))
    a_vals, a_vecs = _layer_eigendecompose(name, "A", a_cov, out_dtype, spill_dir)
    g_vals, g_vecs = _layer_eigendecompose(name, "G", g_cov, out_dtype, spill_dir)
    return LayerFactors(
        name=name,
        eigenvalues=torch.outer(g_vals, a_vals).to(out_dtype),
        a_eigenvectors=a_vecs,
        g_eigenvectors=g_vecs,
        a_eigenvalues=a_vals.to(out_dtype),
        g_eigenvalues=g_vals.to(out_dtype),
        a_covariance=_lent(a_cov).to(out_dtype) if keep_covariances else None,
        g_covariance=_lent(g_cov).to(out_dtype) if keep_covariances else None,
        num_examples=num_examples,
        zero_inputs=zero_inputs,
        zero_outputs=zero_outputs,
    )
