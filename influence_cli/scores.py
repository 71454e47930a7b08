"""`compute-scores`: pairwise, relative and self influence of training examples.

For a query z and a training example x (DESIGN.md, Koh & Liang 2017 with the
EKFAC curvature of Grosse et al. 2023),

    I(z, x) = Σ_layers ∇L(z)ᵀ (F + λ)⁻¹ ∇L(x)

where ∇L(z) is the gradient of the query measurement (the loss, or minus the
margin) and ∇L(x) the gradient of the training loss. Positive means up-weighting
x lowers z's loss (x is a proponent). F is the mean over training examples and
per-example losses are summed, so a score is N × the classical per-example
influence: removing x changes the query's measurement by about −score / N.

Cost (DESIGN.md): the query gradients are preconditioned once per layer,
V' = U_G [(U_Gᵀ V U_A) / (Λ* + λ)] U_Aᵀ, and kept as [Q, P] matrices; the training
set is streamed and each batch costs one GEMM per layer, [Q, P] @ [P, B]. Layers
without positions do both sides in the Kronecker eigenbasis instead (ScoreKernel),
where a per-example gradient is an outer product of rotated vectors: the same
scores without the O(P·(d_in + d_out)) rotation of every query. For those layers
the outer products of a training batch are formed a block of rows of [d_out, d_in]
at a time, right before the GEMM of that block (queries are stored in the same
column blocks), so the [B, P] gradient matrix never round-trips through memory and
the pass runs within about 10% of 2·Q·N·P FLOPs at the machine's GEMM rate
(docs/BENCHMARKS.md).

Ensembles (scores.checkpoints, ensemble.py): every model has its own gradients,
factors and damping; each training batch goes through every model and the blocks
are averaged, in one pass over the training set.

Variants:
- relative (RelatIF, Barshan et al. 2020, θ-relative): I(z, x) / ‖(F + λ)⁻¹ ∇L(x)‖;
- self-influence: I(x, x) = ∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) for every training example.
Both need Σ_ij R_ij² / (Λ* + λ)_ij^p with R = U_Gᵀ ∇W U_A the rotated per-example
gradient; for layers without positions R = g̃ ãᵀ, so this is one matmul,
((g̃²) @ W · ã²).sum(-1), with W = (Λ* + λ)^-p.

Large runs: the score matrix is written as shards by train range (each
[n_query, shard_len]) plus an index; queries are processed in chunks that fit
`scores.max_memory_mb`, each chunk streaming the training range again.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_cli import storage
from influence_cli.config import Config
from influence_cli.context import RunContext, prepare
from influence_cli.data import IndexedDataset, make_loader
from influence_cli.distributed import DistState
from influence_cli.ensemble import Member, describe_member, ensemble_members, prepare_member
from influence_cli.errors import DistributedError, InfluenceError, NumericalError, OutputError
from influence_cli.factors import LayerFactors, Rotation, layer_damping, low_precision_mm
from influence_cli.fit import check_factors_match, load_factors
from influence_cli.passes import BatchGradients, accumulator_dtype, autocast_context, matmul_dtype, model_dtype, stream_gradients
from influence_cli.progress import Progress, for_rank
from influence_cli.resume import PassCheckpoint, Snapshot, run_key
from influence_cli.squares import weighted_squares
from influence_cli.tracking import TrackedModule, per_example_gradients

_BLOCK_ELEMENTS = 1 << 13  # per-example gradient elements formed at once in the scoring GEMM (layers without positions)
_CONTRACT_ELEMENTS = 1 << 20  # query entries per block in the contracted scoring form (few queries)
_SCORE_BYTES = 4  # the score block is computed in float32 (float64 for float64 models), see sizing


# ----------------------------------------------------------------------------- the math


def resolve_damping(layers: dict[str, LayerFactors], damping: float | str, factor: float = 0.1, scope: str = "layer") -> dict[str, float]:
    """λ per layer: `auto` = factor × mean(Λ*) of the layer (scope `layer`) or of the whole model
    (scope `model`), a number as given, 0 for layers without curvature (factors.layer_damping)."""
    return layer_damping(layers, damping, factor, scope)


class ScoreKernel:
    """Turns the gradients of a batch into preconditioned vectors, pairwise scores and quadratic forms.

    Each layer's query and train vectors share one basis, chosen at the first batch a
    layer is seen (the query side): for layers without positions (T = 1) the Kronecker
    eigenbasis, where the per-example gradient is the outer product g̃ ãᵀ of rotated
    vectors (g̃ = U_Gᵀ g, ã = U_Aᵀ a), so preconditioning is one division and nothing is
    rotated back; for sequence / conv layers the parameter basis, where the query side
    is rotated back once, U_G [(U_Gᵀ V U_A) / (Λ* + λ)] U_Aᵀ, and training gradients
    are used as they are. Scores are the same in either basis (U_A, U_G orthogonal).

    Args:
        layers: {layer: LayerFactors} on the model's device and in its accumulator dtype.
        damping: {layer: λ}.
        matmul_dtype: bfloat16 / float16 (`factors.amp`): the preconditioned queries are stored,
            and the scoring GEMMs run, in that dtype; scores are summed in float32.
    """

    def __init__(self, layers: dict[str, LayerFactors], damping: dict[str, float], matmul_dtype: torch.dtype | None = None) -> None:
        self.layers = layers
        self.damping = damping
        self.matmul_dtype = matmul_dtype
        self._inverse = {name: lf.inverse_eigenvalues(damping[name], 1) for name, lf in layers.items()}
        self._inverse_sq = {name: lf.inverse_eigenvalues(damping[name], 2) for name, lf in layers.items()}
        self.eigenbasis: dict[str, bool] = {}
        self._rotations = {
            name: tuple(None if u is None else Rotation(u) for u in (lf.a_eigenvectors, lf.g_eigenvectors)) for name, lf in layers.items()
        }

    def _in_eigenbasis(self, name: str, a: torch.Tensor) -> bool:
        if name not in self.eigenbasis:
            lf = self.layers[name]
            rotates = lf.a_eigenvectors is not None or lf.g_eigenvectors is not None
            self.eigenbasis[name] = rotates and a.shape[1] == 1
        return self.eigenbasis[name]

    def _rotated(self, name: str, batch: BatchGradients) -> tuple[torch.Tensor, torch.Tensor]:
        """(a U_A [B, T, d_in], g U_G [B, T, d_out]): the layer's vectors in its eigenbasis."""
        rot_a, rot_g = self._rotations[name]
        a, g = batch.activations[name], batch.gradients[0][name]
        return (a if rot_a is None else rot_a(a)), (g if rot_g is None else rot_g(g))

    def gradients(self, batch: BatchGradients) -> dict[str, Any]:
        """{layer: ∇W} of every example in the layer's basis, for `pairwise`.

        Layers with positions: a function returning the matrix [B, P] (row-major vec of
        [d_out, d_in], P = d_out·d_in), called by `pairwise` right before the layer's GEMM.
        Layers without (T = 1): the factors (g [B, d_out], a [B, d_in]) of the outer products
        ∇W = g aᵀ, which `pairwise` forms block by block next to its GEMM.
        """
        out: dict[str, Any] = {}
        for name in self.layers:
            a = batch.activations[name]
            if self._in_eigenbasis(name, a):
                a, g = self._rotated(name, batch)
            else:
                g = batch.gradients[0][name]
            if a.shape[1] == 1:
                out[name] = (g[:, 0], a[:, 0]) if self.matmul_dtype is None else self._low((g[:, 0], a[:, 0]))
            else:  # formed when its GEMM runs, so only one layer's [B, P] exists at a time
                out[name] = functools.partial(self._flat_gradients, a, g)
        return out

    def _flat_gradients(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[B, P] per-example gradients of a layer with positions, in the scoring GEMMs' dtype."""
        grads = per_example_gradients(a, g).reshape(a.shape[0], -1)
        return grads if self.matmul_dtype is None else grads.to(self.matmul_dtype)

    def _low(self, v: Any) -> Any:
        """A tensor, or a tuple / list of them, in the scoring GEMMs' dtype."""
        if isinstance(v, torch.Tensor):
            return v.to(self.matmul_dtype)
        return type(v)(t.to(self.matmul_dtype) for t in v)

    def preconditioned(self, batch: BatchGradients) -> dict[str, torch.Tensor]:
        """{layer: (F + λ)⁻¹ ∇W [B, P]} in the layer's basis (see the class docstring)."""
        out = {}
        for name, lf in self.layers.items():
            a, inv = batch.activations[name], self._inverse[name]
            if self._in_eigenbasis(name, a):
                grad = per_example_gradients(*self._rotated(name, batch))
                grad = grad * inv if inv is not None else grad
            else:
                grad = per_example_gradients(a, batch.gradients[0][name])
                if inv is not None:
                    grad = lf.unrotate(lf.rotate(grad) * inv)
            out[name] = grad.reshape(a.shape[0], -1)
        return out

    def store_queries(self, out: dict[str, torch.Tensor | list[torch.Tensor]], row: int, total: int, batch: BatchGradients) -> None:
        """Writes a query batch's preconditioned vectors into rows [row, row + B) of `out`.

        Each layer's storage is allocated at the first batch: [total, P], or, for layers
        without positions, the same matrix cut into column blocks of whole rows of
        [d_out, d_in] (`row_blocks`), the layout `pairwise` multiplies block by block.
        """
        for name, v in self.preconditioned(batch).items():
            v = v if self.matmul_dtype is None else v.to(self.matmul_dtype)
            n, d_in = v.shape[0], batch.activations[name].shape[-1]
            dest = out.get(name)
            if dest is None:
                blocks = batch.activations[name].shape[1] == 1
                dest = out[name] = (
                    [v.new_empty(total, (r1 - r0) * d_in) for r0, r1 in query_row_blocks(total, v.shape[1] // d_in, d_in)]
                    if blocks
                    else v.new_empty(total, v.shape[1])
                )
            if isinstance(dest, list):
                rows = v.view(n, -1, d_in)
                r0 = 0
                for block in dest:
                    r1 = r0 + block.shape[1] // d_in
                    block[row : row + n] = rows[:, r0:r1].reshape(n, -1)
                    r0 = r1
            else:
                dest[row : row + n] = v

    def blocked(self, queries: dict[str, torch.Tensor], batch: BatchGradients) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """[Q, P] preconditioned queries in the layout of `store_queries` (`batch`: any batch, for the layers' shapes)."""
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        for name, v in queries.items():
            v = v if self.matmul_dtype is None else v.to(self.matmul_dtype)
            a = batch.activations[name]
            if a.shape[1] != 1:
                out[name] = v
                continue
            d_in = a.shape[-1]
            out[name] = [v[:, r0 * d_in : r1 * d_in].contiguous() for r0, r1 in query_row_blocks(len(v), v.shape[1] // d_in, d_in)]
        return out

    @staticmethod
    def pairwise(
        queries: dict[str, torch.Tensor | list[torch.Tensor]], train: dict[str, Any]
    ) -> torch.Tensor:
        """Σ_layers V'_q ∇W_xᵀ: [Q, B] (one GEMM per layer, or per row block).

        Args:
            queries: {layer: V' [Q, P]}, or its column blocks (`store_queries`).
            train: {layer: ∇W [B, P]} (or a function returning it), or the factors (g, a) of
                ∇W = g aᵀ (`gradients`).

        With blocks and factors, the per-example gradients are formed one block of rows of
        [d_out, d_in] at a time, [B, rows·d_in] (a few MB, in cache), and multiplied at once:
        the [B, P] matrix never exists, so the pass runs at the GEMM's rate. With fewer queries
        than d_in (`contracts`) nothing per example is formed at all: V'_q a_b first, one GEMM
        [Q·rows, d_in] @ [d_in, B], then its dot with g_b (`_contracted`).
        """
        out: torch.Tensor | None = None
        for name, q in queries.items():
            t = train[name]
            if callable(t):
                t = t()
            if isinstance(q, list):
                buf: torch.Tensor | None = None
                c0 = r0 = 0
                for block in q:
                    width = block.shape[1]
                    if isinstance(t, tuple) and contracts(block.shape[0], t[1].shape[1]):
                        g, a = t
                        r1 = r0 + width // a.shape[1]
                        part = _contracted(block, g[:, r0:r1], a)
                        out = part if out is None else out.add_(part)
                        r0 = r1
                        continue
                    if isinstance(t, tuple):
                        g, a = t
                        r1 = r0 + width // a.shape[1]
                        if buf is None:
                            buf = g.new_empty(g.shape[0] * max(b.shape[1] for b in q))
                        grad = buf[: g.shape[0] * width].view(g.shape[0], r1 - r0, a.shape[1])
                        torch.mul(g[:, r0:r1, None], a[:, None, :], out=grad)
                        grad = grad.view(g.shape[0], width)
                        r0 = r1
                    else:  # a [B, P] matrix: its matching columns
                        grad = t[:, c0 : c0 + width]
                    c0 += width
                    out = _add_scores(out, block, grad.T)
                continue
            if isinstance(t, tuple):
                t = (t[0][:, :, None] * t[1][:, None, :]).reshape(t[0].shape[0], -1)
            out = _add_scores(out, q, t.T)
        assert out is not None
        return out

    def quadratic(self, batch: BatchGradients, power: int) -> torch.Tensor:
        """Σ_layers Σ_ij R_ij² (Λ* + λ)_ij^-power per example: [B], R = U_Gᵀ ∇W U_A.

        power = 1: the self-influence ∇Lᵀ (F + λ)⁻¹ ∇L; power = 2: ‖(F + λ)⁻¹ ∇L‖².
        Without curvature (identity) the weight is 1: ‖∇W‖².
        """
        total: torch.Tensor | None = None
        for name, lf in self.layers.items():
            if power == 1:
                w = self._inverse[name]
            elif power == 2:
                w = self._inverse_sq[name]
            else:
                w = lf.inverse_eigenvalues(self.damping[name], power)
            value = weighted_squares(*self._rotated(name, batch), None if w is None else w[:, None, :])[:, 0]
            total = value if total is None else total + value
        assert total is not None
        return total

    def self_influence(self, batch: BatchGradients) -> torch.Tensor:
        """∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) per example: [B]."""
        return self.quadratic(batch, 1)

    def norms(self, batch: BatchGradients) -> torch.Tensor:
        """‖(F + λ)⁻¹ ∇L(x)‖ per example (the RelatIF denominator): [B]."""
        return self.quadratic(batch, 2).clamp_min(0).sqrt()


def _add_scores(out: torch.Tensor | None, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """out + q @ t; a bfloat16 / float16 product is summed into a float32 `out`."""
    if q.dtype in (torch.float32, torch.float64):
        return q @ t if out is None else out.addmm_(q, t)
    prod = low_precision_mm(q, t, q.dtype, torch.float32)
    return prod if out is None else out.add_(prod)


def contracts(n_query: int, d_in: int) -> bool:
    """True when a layer without positions is scored as (V'_q a_b)·g_b rather than ⟨V'_q, g_b a_bᵀ⟩.

    Both cost 2·Q·B·P flops in their GEMM; around it, forming the per-example gradients writes
    B·P numbers per batch and the contracted form reduces Q·d_out·B, so it wins when Q < d_in
    (one query: 30× faster on the MLP's first layer, the same at 1,000 queries).
    """
    return n_query < d_in


def query_row_blocks(n_query: int, d_out: int, d_in: int) -> list[tuple[int, int]]:
    """The row blocks [r0, r1) of a layer's stored queries: about 2^20 query entries per block
    for the contracted form (`contracts`), `row_blocks` (cache-sized gradient blocks) otherwise."""
    if contracts(n_query, d_in):
        return row_blocks(d_out, d_in, _CONTRACT_ELEMENTS // max(1, n_query))
    return row_blocks(d_out, d_in)


def _contracted(block: torch.Tensor, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σ_ij V'_q[i, j] g_b[i] a_b[j]: [Q, B] from block [Q, rows·d_in] (rows of V'_q), g [B, rows], a [B, d_in]."""
    n, d_in = block.shape[0], a.shape[1]
    rows = block.shape[1] // d_in
    flat = block.view(n * rows, d_in)
    va = flat @ a.T if flat.dtype in (torch.float32, torch.float64) else low_precision_mm(flat, a.T, flat.dtype, torch.float32)
    return (va.view(n, rows, -1) * g.T.to(va.dtype)).sum(dim=1)


def row_blocks(d_out: int, d_in: int, elements: int | None = None) -> list[tuple[int, int]]:
    """Ranges [r0, r1) of the rows of a [d_out, d_in] gradient, each about `elements` entries (at least one row)."""
    rows = max(1, (elements or _BLOCK_ELEMENTS) // max(1, d_in))
    return [(r0, min(d_out, r0 + rows)) for r0 in range(0, d_out, rows)]


def _safe(norms: torch.Tensor) -> torch.Tensor:
    """RelatIF denominators with zeros replaced by 1 (a zero gradient scores 0 either way)."""
    return torch.where(norms > 0, norms, torch.ones_like(norms))


def pairwise_scores(
    model: nn.Module,
    tracked: list[TrackedModule],
    layers: dict[str, LayerFactors],
    query_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    task_kind: str = "classification",
    measurement: str = "loss",
    damping: float | str = "auto",
    damping_factor: float = 0.1,
    damping_scope: str = "layer",
    relative: bool = False,
    device: torch.device | None = None,
    padding_value: float | None = None,
    amp: str = "none",
) -> torch.Tensor:
    """In-memory scores of every (query, train) pair: [n_query, n_train].

    A small-problem entry point (notebooks, tests): everything is held in memory.
    `compute_scores` is the streaming, sharded, resumable version of the same math.

    Args:
        layers: {layer: LayerFactors} (converted to the model's dtype and device here).
        query_batches, train_batches: (inputs, targets, global_indices) triples.
        amp: `factors.amp`: bfloat16 / float16 run the passes and the scoring GEMMs in that dtype.
    """
    return ensemble_pairwise_scores(
        [(model, tracked, layers)], query_batches, train_batches, task_kind=task_kind, measurement=measurement,
        damping=damping, damping_factor=damping_factor, damping_scope=damping_scope, relative=relative, device=device,
        padding_value=padding_value, amp=amp,
    )


def ensemble_pairwise_scores(
    members: Sequence[tuple[nn.Module, list[TrackedModule], dict[str, LayerFactors]]],
    query_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    task_kind: str = "classification",
    measurement: str = "loss",
    damping: float | str = "auto",
    damping_factor: float = 0.1,
    damping_scope: str = "layer",
    relative: bool = False,
    device: torch.device | None = None,
    padding_value: float | None = None,
    amp: str = "none",
) -> torch.Tensor:
    """In-memory scores averaged over an ensemble of models, each with its own factors: [n_query, n_train].

    (1/M) Σ_m ∇L_m(z)ᵀ (F_m + λ_m)⁻¹ ∇L_m(x) (ensemble.py), the mean of `pairwise_scores` over
    the members, computed in one pass over each dataset (every batch goes through every model).

    Args:
        members: (model, tracked layers, {layer: LayerFactors}) of every member.
        query_batches, train_batches: (inputs, targets, global_indices) triples.
    """
    kernels = [_kernel(model, layers, damping, damping_factor, device, damping_scope, amp) for model, _, layers in members]
    kw: dict[str, Any] = {"task_kind": task_kind, "device": device, "padding_value": padding_value, "amp": amp}
    queries: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in layers} for _, _, layers in members]
    last: list[BatchGradients] = []
    for item in query_batches:
        last = []
        for (model, tracked, _), kernel, out in zip(members, kernels, queries, strict=True):
            for batch in stream_gradients(model, tracked, [item], mode="measurement", measurement=measurement, **kw):
                for name, v in kernel.preconditioned(batch).items():
                    out[name].append(v)
                last.append(batch)
    if not last:
        raise ValueError("no query batches")
    stacked = [k.blocked({name: torch.cat(v) for name, v in out.items()}, b) for k, out, b in zip(kernels, queries, last, strict=True)]
    columns = []
    for item in train_batches:
        total: torch.Tensor | None = None
        for (model, tracked, _), kernel, vq in zip(members, kernels, stacked, strict=True):
            for batch in stream_gradients(model, tracked, [item], mode="loss", dataset_name="data.train", **kw):
                s = kernel.pairwise(vq, kernel.gradients(batch))
                if relative:
                    s = s / _safe(kernel.norms(batch))
                total = s if total is None else total + s
        assert total is not None
        columns.append(total / len(members))
    return torch.cat(columns, dim=1)


def self_influence_scores(
    model: nn.Module,
    tracked: list[TrackedModule],
    layers: dict[str, LayerFactors],
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    task_kind: str = "classification",
    damping: float | str = "auto",
    damping_factor: float = 0.1,
    damping_scope: str = "layer",
    device: torch.device | None = None,
    padding_value: float | None = None,
) -> torch.Tensor:
    """In-memory self-influence ∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) of every training example: [n_train]."""
    kernel = _kernel(model, layers, damping, damping_factor, device, damping_scope)
    out = [
        kernel.self_influence(batch)
        for batch in stream_gradients(
            model, tracked, train_batches, task_kind=task_kind, mode="loss", device=device, padding_value=padding_value
        )
    ]
    return torch.cat(out)


def _kernel(
    model: nn.Module,
    layers: dict[str, LayerFactors],
    damping: float | str,
    factor: float,
    device: torch.device | None,
    scope: str = "layer",
    amp: str = "none",
) -> ScoreKernel:
    dtype = accumulator_dtype(model)
    moved = {name: lf.to(device or torch.device("cpu"), dtype) for name, lf in layers.items()}
    low = matmul_dtype(amp) if dtype == torch.float32 else None
    return ScoreKernel(moved, resolve_damping(moved, damping, factor, scope), low)


# ----------------------------------------------------------------------------- sizing and sharding


@dataclass
class ShardSpec:
    """One train range written to one file: positions [start, stop) of data.train, scored by `rank`.

    Attributes:
        first_batch: The rank-local batch number of `start` (ranges are batch-aligned).
        num_batches: Batches in the range.
    """

    number: int
    rank: int
    start: int
    stop: int
    first_batch: int
    num_batches: int


def plan_shards(n_train: int, world_size: int, batch_size: int, shard_len: int | None = None) -> list[ShardSpec]:
    """Splits every rank's contiguous train block (DistState.shard) into ranges of `shard_len`.

    `shard_len` must be a multiple of `batch_size` (None = one range per rank), so
    every range starts on a batch boundary of its rank's loader.
    """
    if shard_len is not None and (shard_len <= 0 or shard_len % batch_size):
        raise ValueError(f"shard_len must be a positive multiple of batch_size {batch_size}, got {shard_len}")
    out: list[ShardSpec] = []
    for rank in range(world_size):
        start, stop = rank * n_train // world_size, (rank + 1) * n_train // world_size
        length = (stop - start) if shard_len is None else shard_len
        for c0 in range(start, stop, max(1, length)):
            c1 = min(c0 + length, stop)
            out.append(ShardSpec(len(out), rank, c0, c1, (c0 - start) // batch_size, -(-(c1 - c0) // batch_size)))
    return out


@dataclass
class ScoresLayout:
    """How a pairwise run is split: query chunks × train shards.

    Attributes:
        query_chunks: [(q0, q1)] query positions preconditioned together.
        shards: Every rank's train ranges (numbers are global).
        sharded: Written as shard files plus an index (else one scores file).
    """

    query_chunks: list[tuple[int, int]]
    shards: list[ShardSpec]
    sharded: bool


def plan_layout(
    n_query: int,
    n_train: int,
    num_params: int,
    *,
    batch_size: int,
    world_size: int = 1,
    max_memory_mb: float = 1024.0,
    query_chunk: int | None = None,
    element_bytes: int = 4,
) -> ScoresLayout:
    """Chunks and shards that keep each in-memory block within `max_memory_mb`.

    The preconditioned query chunk is [chunk, num_params] and the score block
    [n_query, shard_len] (4 bytes per score); each one fits the budget on its own.
    Each chunk streams each train range once; with several chunks the query
    gradients are recomputed per range (one query pass per chunk and shard).
    """
    budget = int(max_memory_mb * 2**20)
    chunk = query_chunk or max(1, budget // max(1, num_params * element_bytes))
    chunk = max(1, min(chunk, n_query))
    chunks = [(q0, min(q0 + chunk, n_query)) for q0 in range(0, n_query, chunk)]
    fits = n_query * n_train * _SCORE_BYTES <= budget
    shard_len = None
    if not fits:
        per_shard = budget // (n_query * _SCORE_BYTES)
        shard_len = max(batch_size, per_shard // batch_size * batch_size)
    return ScoresLayout(chunks, plan_shards(n_train, world_size, batch_size, shard_len), sharded=world_size > 1 or not fits)


# ----------------------------------------------------------------------------- non-finite values


class _NonFiniteWatch:
    """Remembers, on the device, the first batch with a non-finite output or gradient and which examples.

    No host synchronization per batch: `check` reads it (at checkpoints and pass ends).
    """

    def __init__(self, device: torch.device, batch_size: int) -> None:
        self.batch_size = batch_size
        self.bad_batch = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_examples = torch.full((batch_size,), -1, dtype=torch.int64, device=device)

    def observe(self, batch: BatchGradients) -> None:
        n = len(batch.global_indices)
        tensors = [batch.outputs] + [g for grads in batch.gradients for g in grads.values()]
        ok = torch.stack([torch.isfinite(t.reshape(n, -1).sum(1)) for t in tensors]).all(0)  # [B]
        marked = torch.where(ok, torch.full_like(batch.global_indices, -1), batch.global_indices.to(torch.int64))
        marked = torch.nn.functional.pad(marked, (0, self.batch_size - n), value=-1)
        first = (self.bad_batch < 0) & ~ok.all()
        self.bad_batch = torch.where(first, torch.full_like(self.bad_batch, batch.index), self.bad_batch)
        self.bad_examples = torch.where(first, marked, self.bad_examples)

    def check(self, what: str) -> None:
        batch = int(self.bad_batch)
        if batch < 0:
            return
        bad = [int(i) for i in self.bad_examples.tolist() if i >= 0]
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise NumericalError(
            f"non-finite loss or gradient in the {what} pass at batch {batch} (examples with global indices {shown})",
            hint="check those examples and the checkpoint for NaN/Inf; no scores were written",
        )


# ----------------------------------------------------------------------------- the command


@dataclass
class ScoresReport:
    """The outcome of compute-scores.

    Attributes:
        kind: "pairwise" or "self".
        paths: Files written (the scores file, or the index and its shards; the self-influence file).
        n_query: Queries scored (0 for self-influence).
        n_train: Training examples scored.
        sharded: Written as shards plus an index.
        num_shards: Shard files (1 when not sharded).
        query_chunks: Times the training set was streamed per train range.
        damping: {layer: λ}.
        seconds: Wall time per phase.
        examples_per_second: Training examples scored against every query per second of the scoring
            passes (all ranks together).
        layer_params: {layer: parameters (d_out × d_in, bias included)}.
    """

    kind: str
    paths: list[Path]
    n_query: int
    n_train: int
    sharded: bool
    num_shards: int
    query_chunks: int
    relative: bool
    strategy: str
    measurement: str
    damping: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    examples_per_second: float = 0.0
    resumed_from: str | None = None
    layer_params: dict[str, int] = field(default_factory=dict)
    members: int = 1  # models averaged over (ensemble.py): 1 + len(scores.checkpoints)


def _members_key(common: dict[str, Any]) -> dict[str, Any]:
    """The ensemble's part of a run key: every extra member's model and factors (nothing for one model)."""
    if "members" not in common:
        return {}
    return {"members": [(m["model_fingerprint"], m["factors"].get("created"), m["damping"]) for m in common["members"]]}


def _finished_key(path: Path) -> str | None:
    """The run key recorded by a finished scores file or index (None when absent)."""
    if not path.exists():
        return None
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text()).get("metadata", {}).get("run_key")
        except (OSError, ValueError):
            return None
    return storage.read_metadata(path).get("run_key")


def _shard_glob() -> str:
    return storage.SCORES_SHARD.split("{", 1)[0] + "*" + storage.SCORES_SHARD.rsplit("}", 1)[1]


def _agree(state: DistState, fn) -> Any:
    """Runs a start-up check on every rank; if any rank fails, every rank raises (no rank hangs in a barrier)."""
    failure: InfluenceError | None = None
    result = None
    try:
        result = fn()
    except InfluenceError as exc:
        failure = exc
    if state.distributed:
        messages = state.all_gather_object(None if failure is None else failure.message)
        if failure is None:
            for rank, message in enumerate(messages):
                if message is not None:
                    raise DistributedError(f"rank {rank} stopped: {message}")
    if failure is not None:
        raise failure
    return result


def _load_layers(ctx: RunContext, train: IndexedDataset, member: Member) -> tuple[dict[str, LayerFactors], dict[str, Any]]:
    """The curvature of every tracked layer (none for `identity`) of one ensemble member and what describes its file."""
    cfg = ctx.cfg
    if cfg.factors.strategy == "identity":
        return {tm.name: LayerFactors(tm.name) for tm in ctx.tracked}, {"strategy": "identity", "file": None}
    path = member.factors_path
    if member.index and not path.is_file():
        raise OutputError(
            f"{member.key}: no factors at {str(path)!r} for this ensemble member",
            hint="run `influence fit-factors` with this config: it fits the factors of every checkpoint in scores.checkpoints",
        )
    factors = load_factors(path)
    check_factors_match(factors, ctx, path, train.fingerprint())
    if factors.strategy != cfg.factors.strategy or factors.fisher != cfg.factors.fisher:
        raise OutputError(
            f"{str(path)!r} holds {factors.strategy} factors ({factors.fisher} Fisher), the config asks for "
            f"{cfg.factors.strategy} ({cfg.factors.fisher})",
            hint="set factors.strategy/factors.fisher to match, or refit with `influence fit-factors --overwrite`",
        )
    meta = factors.metadata
    stat = path.stat()
    info = {
        "file": str(path.relative_to(cfg.output_path)) if path.is_relative_to(cfg.output_path) else str(path),
        "created": meta.get("created"),
        "bytes": stat.st_size,
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "num_examples": meta.get("num_examples"),
        "dataset_fingerprint": meta.get("dataset_fingerprint"),
        "tool_version": meta.get("tool_version"),
    }
    return factors.layers, info


def _rows(batches: Iterable[tuple[torch.Tensor, ...]], skip: int, take: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The `take` examples after the first `skip` of a stream of (x, y, index) batches."""
    for x, y, idx in batches:
        if take <= 0:
            return
        if skip:
            if skip >= len(idx):
                skip -= len(idx)
                continue
            x, y, idx = x[skip:], y[skip:], idx[skip:]
            skip = 0
        if len(idx) > take:
            x, y, idx = x[:take], y[:take], idx[:take]
        take -= len(idx)
        yield x, y, idx


def _known_labels(train: IndexedDataset, start: int, stop: int, device: torch.device) -> torch.Tensor | None:
    """Labels of train positions [start, stop) when the dataset knows them without loading examples."""
    return None if train.labels is None else train.labels[start:stop].to(device)


def _collect(labels: torch.Tensor | None, length: int, c0: int, targets: torch.Tensor) -> torch.Tensor:
    """Writes a batch's targets into a label buffer of `length` rows (allocated on first use)."""
    if labels is None:
        labels = torch.zeros((length, *targets.shape[1:]), dtype=targets.dtype, device=targets.device)
    labels[c0 : c0 + len(targets)] = targets
    return labels


@dataclass
class _ScoringMember:
    """One model of the ensemble (the only one without scores.checkpoints): its context and kernel."""

    ctx: RunContext
    kernel: ScoreKernel


class _Scorer:
    """One run of compute-scores on this rank: the models, their kernels, the datasets and the passes.

    With an ensemble (ensemble.py), every batch of examples is run through every member
    (`member_batches`) and the members' scores are averaged (`pairwise`, `self_influence`).
    `ctx` and `kernel` are member 0's (model.checkpoint).
    """

    def __init__(self, members: list[_ScoringMember], train: IndexedDataset, progress: Progress) -> None:
        self.members = members
        self.ctx = members[0].ctx
        self.cfg = self.ctx.cfg
        self.kernel = members[0].kernel
        self.train = train
        self.progress = progress
        self.dtype = accumulator_dtype(self.ctx.model)
        self.bs = self.cfg.data.batch_size

    def loader(self, dataset: IndexedDataset, start_batch: int = 0):
        """Every example of `dataset` (not sharded by rank), from `start_batch` on."""
        return make_loader(
            dataset,
            self.bs,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            shard=(0, 1),
            start_batch=start_batch,
        )

    def stream(self, batches, *, mode: str, start_batch: int, name: str, member: _ScoringMember | None = None) -> Iterator[BatchGradients]:
        ctx = (member or self.members[0]).ctx
        return stream_gradients(
            ctx.model,
            ctx.tracked,
            batches,
            task_kind=self.cfg.task.kind,
            mode=mode,
            measurement=self.cfg.task.measurement,
            seed=self.cfg.seed,
            device=self.ctx.device,
            amp=self.cfg.factors.amp,
            start_batch=start_batch,
            dataset_name=name,
            padding_value=self.cfg.data.padding_value,
        )

    def member_batches(self, batches, *, mode: str, start_batch: int, name: str) -> Iterator[list[BatchGradients]]:
        """Each batch of (inputs, targets, indices) through every member: [BatchGradients per member]."""
        if len(self.members) == 1:
            for batch in self.stream(batches, mode=mode, start_batch=start_batch, name=name):
                yield [batch]
            return
        for offset, item in enumerate(batches):
            yield [b for m in self.members for b in self.stream([item], mode=mode, start_batch=start_batch + offset, name=name, member=m)]

    def train_batches(self, shard: ShardSpec, skip_batches: int) -> Iterator[list[BatchGradients]]:
        """This rank's batches of one train range, from its `skip_batches`-th batch on (one per member)."""
        first = shard.first_batch + skip_batches
        batches = itertools.islice(self.ctx.batches(self.train, start_batch=first), shard.num_batches - skip_batches)
        return self.member_batches(batches, mode="loss", start_batch=first, name="data.train")

    def pairwise(
        self, queries: list[dict[str, torch.Tensor | list[torch.Tensor]]], batches: list[BatchGradients], norms: torch.Tensor | None, c0: int, first: bool
    ) -> torch.Tensor:
        """The [Q, B] block of one training batch, averaged over the members.

        RelatIF (`norms` [M, width] given): each member's scores are divided by its own
        ‖(F_m + λ_m)⁻¹∇L_m(x)‖, computed into `norms` on the `first` query chunk.
        """
        total: torch.Tensor | None = None
        n = len(batches[0].global_indices)
        for m, (member, vq, batch) in enumerate(zip(self.members, queries, batches, strict=True)):
            s = member.kernel.pairwise(vq, member.kernel.gradients(batch))
            if norms is not None:
                if first:
                    norms[m, c0 : c0 + n] = member.kernel.norms(batch)
                s = s / _safe(norms[m, c0 : c0 + n])
            total = s if total is None else total.add_(s)
        assert total is not None
        return total if len(self.members) == 1 else total.div_(len(self.members))

    def self_influence(self, batches: list[BatchGradients]) -> torch.Tensor:
        """∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) of one training batch, averaged over the members: [B]."""
        values = [m.kernel.self_influence(b) for m, b in zip(self.members, batches, strict=True)]
        return values[0] if len(values) == 1 else torch.stack(values).mean(0)

    @torch.no_grad()
    def query_info(self, queries: IndexedDataset) -> dict[str, torch.Tensor]:
        """query_indices [Q], query_labels [Q, ...] and query_predictions (arg-max, or the outputs for regression)."""
        labels, preds = [], []
        model = self.ctx.model
        dtype = model_dtype(model)
        for x, y, _ in self.loader(queries):
            x = x.to(self.ctx.device)
            if x.is_floating_point():
                x = x.to(dtype)
            with autocast_context(self.ctx.device, self.cfg.factors.amp):
                out = model(x)
            out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
            preds.append(out.argmax(1).cpu() if self.cfg.task.kind == "classification" else out.cpu())
            labels.append(y)
        return {
            "query_indices": queries.global_indices.clone(),
            "query_labels": torch.cat(labels),
            "query_predictions": torch.cat(preds),
        }

    def precondition(self, queries: IndexedDataset, q0: int, q1: int, title: str) -> list[dict[str, torch.Tensor | list[torch.Tensor]]]:
        """Per member, {layer: (F + λ)⁻¹ ∇(measurement) [q1 - q0, P]} for query positions [q0, q1)
        (layers without positions: in column blocks, ScoreKernel.store_queries)."""
        outs: list[dict[str, torch.Tensor | list[torch.Tensor]]] = [{} for _ in self.members]
        watch = _NonFiniteWatch(self.ctx.device, self.bs)
        self.progress.start(title, q1 - q0)
        row = 0
        batches = _rows(self.loader(queries, start_batch=q0 // self.bs), q0 % self.bs, q1 - q0)
        for per_member in self.member_batches(batches, mode="measurement", start_batch=q0 // self.bs, name="data.query"):
            n = len(per_member[0].global_indices)
            for member, out, batch in zip(self.members, outs, per_member, strict=True):
                member.kernel.store_queries(out, row, q1 - q0, batch)
                watch.observe(batch)
            row += n
            self.progress.advance(n)
        self.progress.stop()
        watch.check("query gradient")
        return outs


def _check_storable(block: torch.Tensor, dtype: str) -> None:
    """Refuses to store scores that overflow the storage dtype (float16 tops out at 65504)."""
    if dtype == "float32":
        return
    limit = torch.finfo(getattr(torch, dtype)).max
    peak = float(block.abs().max()) if block.numel() else 0.0
    if peak > limit:
        raise NumericalError(
            f"scores.dtype: {dtype} cannot hold scores up to {peak:.3g} (its max is {limit:.3g})",
            hint="set scores.dtype: float32 (or bfloat16) and rerun with --overwrite",
        )


def _check_factors_finite(layers: dict[str, LayerFactors], path: Path) -> None:
    for name, lf in layers.items():
        for key in ("eigenvalues", "a_eigenvectors", "g_eigenvectors"):
            t = getattr(lf, key)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise NumericalError(
                    f"{str(path)!r}: {name}.{key} holds NaN/Inf", hint="refit with `influence fit-factors --overwrite`"
                )


def _snapshot_phase(snapshot: Snapshot | None, prefix: str) -> list[int] | None:
    if snapshot is None or not snapshot.phase.startswith(prefix):
        return None
    return [int(p) for p in snapshot.phase[len(prefix) :].split(":") if p]


def compute_scores(
    cfg: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    self_influence: bool = False,
    relative: bool | None = None,
    state: DistState | None = None,
    progress: Progress | None = None,
) -> ScoresReport:
    """Scores data.query against data.train (or every training example against itself) and writes the result.

    Pairwise: `<output_dir>/scores.safetensors` with `scores` [n_query, n_train], or,
    when that exceeds `scores.max_memory_mb` or under torchrun, shard files by train
    range plus `scores.index.json`. Self-influence (`self_influence=True`):
    `<output_dir>/self_influence.safetensors` with `self_influence` [n_train].

    Args:
        relative: RelatIF scores (None = `scores.relative` of the config).

    Raises:
        OutputError: factors missing or fitted for another model, layers or training set;
            finished scores exist (without `overwrite`); leftover progress without
            `resume`/`overwrite`.
        NumericalError: a non-finite loss or gradient (names the batch and examples).
    """
    t_start = time.perf_counter()
    ctx = prepare(cfg, state)
    out_dir = cfg.output_path
    storage.ensure_writable_dir(out_dir)
    relative = cfg.scores.relative if relative is None else relative
    progress = for_rank(progress, ctx.state.rank, ctx.state.world_size)
    train = ctx.dataset(cfg.data.train, "data.train")
    members: list[_ScoringMember] = []
    described: list[dict[str, Any]] = []
    for member in ensemble_members(cfg):  # model.checkpoint, then scores.checkpoints (each with its own factors)
        mctx = ctx if member.index == 0 else prepare_member(cfg, member, ctx.state)
        layers, factors_info = _load_layers(mctx, train, member)
        _check_factors_finite(layers, member.factors_path)
        dtype = accumulator_dtype(mctx.model)
        layers = {name: lf.to(mctx.device, dtype) for name, lf in layers.items()}
        damping = resolve_damping(layers, cfg.scores.damping, cfg.scores.damping_factor, cfg.scores.damping_scope)
        low = matmul_dtype(cfg.factors.amp) if dtype == torch.float32 else None
        members.append(_ScoringMember(mctx, ScoreKernel(layers, damping, low)))
        described.append(describe_member(member, mctx) | {"factors": factors_info, "damping": damping})
    scorer = _Scorer(members, train, progress)
    seconds = {"setup": time.perf_counter() - t_start}
    common = {
        **ctx.provenance(),
        "strategy": cfg.factors.strategy,
        "fisher": cfg.factors.fisher,
        "task_kind": cfg.task.kind,
        "damping": described[0]["damping"],
        "damping_setting": cfg.scores.damping,
        "model_fingerprint": ctx.model_fingerprint,
        "train_fingerprint": train.fingerprint(),
        "factors": described[0]["factors"],
        "modules": [tm.name for tm in ctx.tracked],
    }
    if len(members) > 1:
        common["members"] = described  # fingerprints, factors and damping of every model averaged over
    if self_influence:
        return _run_self(scorer, common, overwrite, resume, seconds)
    return _run_pairwise(scorer, common, relative, overwrite, resume, seconds)


def _run_pairwise(scorer: _Scorer, common: dict[str, Any], relative: bool, overwrite: bool, resume: bool, seconds: dict[str, float]) -> ScoresReport:
    ctx, cfg, train = scorer.ctx, scorer.cfg, scorer.train
    st = ctx.state
    out_dir = cfg.output_path
    queries = ctx.dataset(cfg.data.query, "data.query")
    n_members = len(scorer.members)
    n_q, n_t = len(queries), len(train)
    element_bytes = torch.finfo(scorer.dtype).bits // 8
    layout = plan_layout(
        n_q,
        n_t,
        sum(tm.num_params for tm in ctx.tracked) * n_members,  # every member's preconditioned queries
        batch_size=scorer.bs,
        world_size=st.world_size,
        max_memory_mb=cfg.scores.max_memory_mb,
        query_chunk=cfg.scores.query_chunk,
        element_bytes=element_bytes,
    )
    single, index = out_dir / storage.SCORES_FILE, out_dir / storage.SCORES_INDEX
    metadata = common | {
        storage.FORMAT_KEY: storage.SCORES_FORMAT,
        "kind": "pairwise",
        "measurement": cfg.task.measurement,
        "relative": relative,
        "query_fingerprint": queries.fingerprint(),
        "n_query": n_q,
        "n_train": n_t,
        "dtype": cfg.scores.dtype,
    }
    key = run_key(
        {k: metadata[k] for k in ("model_fingerprint", "train_fingerprint", "query_fingerprint", "damping", "relative", "measurement", "strategy", "dtype")}
        | {"factors": common["factors"].get("created"), "bs": scorer.bs, "world": st.world_size, "amp": cfg.factors.amp,
           "chunks": layout.query_chunks, "shards": [(s.start, s.stop) for s in layout.shards]}
        | _members_key(common)
    )
    metadata["run_key"] = key
    paths = ([index] + [out_dir / storage.SCORES_SHARD.format(shard=s.number) for s in layout.shards]) if layout.sharded else [single]
    if resume and not overwrite and _finished_key(paths[0]) == key:  # a requeued job whose scores are done
        return ScoresReport(
            "pairwise", paths, n_q, n_t, layout.sharded, len(layout.shards), len(layout.query_chunks), relative,
            cfg.factors.strategy, cfg.task.measurement, common["damping"], {}, 0.0, "already complete",
            {tm.name: tm.num_params for tm in ctx.tracked}, n_members,
        )
    rank_suffix = f".rank{st.rank}" if st.distributed else ""
    checkpoint = PassCheckpoint(out_dir / storage.SCORES_PARTIAL.format(rank=rank_suffix), key, cfg.factors.checkpoint_every)

    def start_checks() -> Snapshot | None:
        storage.check_can_write(single, overwrite, "scores")
        storage.check_can_write(index, overwrite, "scores")
        snap = checkpoint.check_start(resume, overwrite)
        leftovers = sorted(out_dir.glob(_shard_glob()))
        if leftovers and not resume and not overwrite:
            raise OutputError(
                f"{str(leftovers[0].parent)!r} holds {len(leftovers)} score shard(s) of an interrupted run",
                hint="pass --resume to continue it, or --overwrite to start over",
            )
        return snap

    snapshot = _agree(st, start_checks)
    st.barrier()
    if st.is_main:
        if overwrite:
            single.unlink(missing_ok=True)
            index.unlink(missing_ok=True)
        if not resume:
            for stale in out_dir.glob(_shard_glob()):
                stale.unlink(missing_ok=True)
        storage.remove_stale_temp_files(out_dir / "scores*")  # every scores file's temporaries
    st.barrier()

    t0 = time.perf_counter()
    query_info = scorer.query_info(queries)
    chunks = layout.query_chunks
    mine = [s for s in layout.shards if s.rank == st.rank]
    cached: list[dict[str, torch.Tensor | list[torch.Tensor]]] | None = None
    watch = _NonFiniteWatch(ctx.device, scorer.bs)
    steps, scored, resumed_from = 0, 0, None
    seconds.update(queries=time.perf_counter() - t0, scores=0.0, write=0.0)
    for shard in mine:
        shard_path = out_dir / storage.SCORES_SHARD.format(shard=shard.number) if layout.sharded else single
        if layout.sharded and resume and shard_path.is_file() and storage.read_metadata(shard_path).get("run_key") == key:
            resumed_from = resumed_from or f"shard {shard.number}"
            continue
        width = shard.stop - shard.start
        block = torch.zeros(n_q, width, dtype=scorer.dtype, device=ctx.device)
        norms = torch.zeros(n_members, width, dtype=scorer.dtype, device=ctx.device) if relative else None
        labels = _known_labels(train, shard.start, shard.stop, ctx.device)
        collect = labels is None
        start_chunk, start_batch = 0, 0
        where = _snapshot_phase(snapshot, "scores:")
        if where is not None and snapshot is not None and where[0] == shard.number:
            start_chunk, start_batch = where[1], snapshot.batches_done
            q0 = chunks[start_chunk][0]
            done = min(width, start_batch * scorer.bs)
            block[:q0] = snapshot.tensors["rows_done"].to(block)
            block[q0 : chunks[start_chunk][1], :done] = snapshot.tensors["current"].to(block)
            if norms is not None:
                norms.copy_(snapshot.tensors["norms"])
            if collect and "labels" in snapshot.tensors:
                labels = snapshot.tensors["labels"].to(ctx.device)
            resumed_from = f"shard {shard.number}, query chunk {start_chunk + 1}/{len(chunks)}, batch {start_batch}"
        for ci in range(start_chunk, len(chunks)):
            q0, q1 = chunks[ci]
            if cached is not None:
                vq = cached
            else:
                tq = time.perf_counter()
                vq = scorer.precondition(queries, q0, q1, f"query gradients {q0:,}..{q1:,}")
                seconds["queries"] += time.perf_counter() - tq
                if len(chunks) == 1:
                    cached = vq
            skip = start_batch if ci == start_chunk else 0
            scorer.progress.start(_pass_title(shard, layout, ci, len(chunks)), shard.stop - shard.start)
            if skip:
                scorer.progress.advance(min(width, skip * scorer.bs))
            tp = time.perf_counter()
            for batches in scorer.train_batches(shard, skip):
                batch = batches[0]
                j = batch.index - shard.first_batch
                c0 = j * scorer.bs
                n = len(batch.global_indices)
                block[q0:q1, c0 : c0 + n] = scorer.pairwise(vq, batches, norms, c0, first=ci == 0)
                if collect:
                    labels = _collect(labels, width, c0, batch.targets)
                for b in batches:
                    watch.observe(b)
                steps += 1
                scored += n
                if checkpoint.due(steps):
                    watch.check("scoring")
                    state_tensors = {"rows_done": block[:q0], "current": block[q0:q1, : c0 + n]}
                    if collect and labels is not None:
                        state_tensors["labels"] = labels
                    if norms is not None:
                        state_tensors["norms"] = norms
                    checkpoint.save(f"scores:{shard.number}:{ci}", j + 1, state_tensors)
                scorer.progress.advance(n)
            watch.check("scoring")
            seconds["scores"] += time.perf_counter() - tp
            scorer.progress.stop()
        tw = time.perf_counter()
        _check_storable(block, cfg.scores.dtype)
        tensors = dict(query_info) | {
            "scores": block.to(getattr(torch, cfg.scores.dtype)),
            "train_indices": train.global_indices[shard.start : shard.stop].clone(),
        }
        if labels is not None:
            tensors["train_labels"] = labels
        if norms is not None and n_members == 1:  # an ensemble's RelatIF has one norm per member: plain scores are not recoverable
            tensors["train_norms"] = norms[0]
        shard_meta = metadata | {"train_start": shard.start, "train_stop": shard.stop, "shard": shard.number}
        storage.save_tensors(shard_path, tensors, shard_meta)
        seconds["write"] += time.perf_counter() - tw
        del block
    st.barrier()
    if layout.sharded:
        if st.is_main:
            storage.save_json(
                index,
                {
                    storage.FORMAT_KEY: storage.SCORES_FORMAT,
                    "n_query": n_q,
                    "n_train": n_t,
                    "shards": [
                        {"file": storage.SCORES_SHARD.format(shard=s.number), "shard": s.number, "train_start": s.start, "train_stop": s.stop}
                        for s in layout.shards
                    ],
                    "metadata": {k: v for k, v in metadata.items() if k != storage.FORMAT_KEY},
                },
            )
        st.barrier()
    checkpoint.clear()
    seconds["total"] = time.perf_counter() - t0 + seconds["setup"]
    rate = scored / len(chunks) / seconds["scores"] if seconds["scores"] > 0 else 0.0
    return ScoresReport(
        "pairwise",
        paths,
        n_q,
        n_t,
        layout.sharded,
        len(layout.shards),
        len(chunks),
        relative,
        cfg.factors.strategy,
        cfg.task.measurement,
        common["damping"],
        seconds,
        rate * st.world_size,
        resumed_from,
        {tm.name: tm.num_params for tm in ctx.tracked},
        n_members,
    )


def _pass_title(shard: ShardSpec, layout: ScoresLayout, chunk: int, num_chunks: int) -> str:
    title = "scores"
    if layout.sharded:
        title += f" train {shard.start:,}..{shard.stop:,}"
    if num_chunks > 1:
        title += f" (query chunk {chunk + 1}/{num_chunks})"
    return title


def _run_self(scorer: _Scorer, common: dict[str, Any], overwrite: bool, resume: bool, seconds: dict[str, float]) -> ScoresReport:
    ctx, cfg, train = scorer.ctx, scorer.cfg, scorer.train
    st = ctx.state
    out_dir = cfg.output_path
    n_t = len(train)
    path = out_dir / storage.SELF_INFLUENCE_FILE
    metadata = common | {storage.FORMAT_KEY: storage.SELF_FORMAT, "kind": "self", "n_train": n_t}
    key = run_key(
        {k: common[k] for k in ("model_fingerprint", "train_fingerprint", "damping", "strategy")}
        | {"factors": common["factors"].get("created"), "bs": scorer.bs, "world": st.world_size, "amp": cfg.factors.amp, "kind": "self"}
        | _members_key(common)
    )
    metadata["run_key"] = key
    if resume and not overwrite and _finished_key(path) == key:  # a requeued job whose scores are done
        return ScoresReport(
            "self", [path], 0, n_t, False, 1, 0, False, cfg.factors.strategy, cfg.task.measurement, common["damping"],
            {}, 0.0, "already complete", {tm.name: tm.num_params for tm in ctx.tracked}, len(scorer.members),
        )
    rank_suffix = (f".rank{st.rank}" if st.distributed else "") + ".self"
    checkpoint = PassCheckpoint(out_dir / storage.SCORES_PARTIAL.format(rank=rank_suffix), key, cfg.factors.checkpoint_every)

    def start_checks() -> Snapshot | None:
        storage.check_can_write(path, overwrite, "self-influence scores")
        return checkpoint.check_start(resume, overwrite)

    snapshot = _agree(st, start_checks)
    if st.is_main:
        storage.remove_stale_temp_files(path)
    start, stop = st.shard(n_t)
    shard = ShardSpec(st.rank, st.rank, start, stop, 0, -(-(stop - start) // scorer.bs))
    values = torch.zeros(n_t, dtype=scorer.dtype, device=ctx.device)
    labels = _known_labels(train, 0, n_t, ctx.device)  # all of them; else each rank collects its own range
    collect = labels is None
    skip, resumed_from = 0, None
    if snapshot is not None and snapshot.phase == "self":
        skip = snapshot.batches_done
        values.copy_(snapshot.tensors["values"])
        if collect and "labels" in snapshot.tensors:
            labels = snapshot.tensors["labels"].to(ctx.device)
        resumed_from = f"batch {skip}"
    watch = _NonFiniteWatch(ctx.device, scorer.bs)
    scorer.progress.start("self-influence", stop - start)
    if skip:
        scorer.progress.advance(min(stop - start, skip * scorer.bs))
    t0 = time.perf_counter()
    steps = 0
    for batches in scorer.train_batches(shard, skip):
        batch = batches[0]
        c0 = batch.index * scorer.bs
        n = len(batch.global_indices)
        values[start + c0 : start + c0 + n] = scorer.self_influence(batches)
        if collect:
            labels = _collect(labels, stop - start, c0, batch.targets)
        for b in batches:
            watch.observe(b)
        steps += 1
        if checkpoint.due(steps):
            watch.check("self-influence")
            checkpoint.save("self", batch.index + 1, {"values": values} | ({"labels": labels} if collect and labels is not None else {}))
        scorer.progress.advance(n)
    watch.check("self-influence")
    seconds["self"] = time.perf_counter() - t0
    scorer.progress.stop()
    st.all_reduce_(values)
    if collect and st.distributed:  # each rank collected its own range
        parts = [p for p in st.all_gather_object(None if labels is None else labels.cpu()) if p is not None]
        labels = torch.cat(parts) if parts else None  # type: ignore[arg-type]
    if st.is_main:
        tensors = {"self_influence": values, "train_indices": train.global_indices.clone()}
        if labels is not None:
            tensors["train_labels"] = labels
        storage.save_tensors(path, tensors, metadata)
    st.barrier()
    checkpoint.clear()
    rate = (stop - start) / seconds["self"] if seconds["self"] > 0 else 0.0
    return ScoresReport(
        "self", [path], 0, n_t, False, 1, 0, False, cfg.factors.strategy, "loss", common["damping"], seconds, rate * st.world_size,
        resumed_from, {tm.name: tm.num_params for tm in ctx.tracked}, len(scorer.members),
    )


__all__ = [
    "ScoreKernel",
    "ScoresLayout",
    "ScoresReport",
    "ShardSpec",
    "compute_scores",
    "ensemble_pairwise_scores",
    "pairwise_scores",
    "plan_layout",
    "plan_shards",
    "resolve_damping",
    "self_influence_scores",
]
