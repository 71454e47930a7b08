"""The scoring math: query gradients preconditioned once, training gradients streamed against them.

For a query z and a training example x (Koh & Liang 2017 with the
EKFAC curvature of Grosse et al. 2023),

    I(z, x) = Σ_layers ∇L(z)ᵀ (F + λ)⁻¹ ∇L(x)

where ∇L(z) is the gradient of the query measurement (the loss, minus the
margin, or the user's own function of the outputs) and ∇L(x) the gradient of the
training loss. Positive means up-weighting x lowers z's loss (x is a proponent). F is
the mean over training examples (as Koh & Liang's Hessian) and each gradient is of one
example's loss, so a score is N × the first-order effect of removing x: removing x
changes the query's measurement (the loss, minus the margin, or the user's function)
by about +score / N (leaving out a proponent raises the query's loss;
tests/test_scores.py and tests/test_measurements.py check this against retraining).

Cost: the query gradients are preconditioned once per layer,
V' = U_G [(U_Gᵀ V U_A) / (Λ* + λ)] U_Aᵀ, and kept as [Q, P] matrices; the training
set is streamed and each batch costs one GEMM per layer, [Q, P] @ [P, B]. Layers
without positions do both sides in the Kronecker eigenbasis instead (ScoreKernel),
where a per-example gradient is an outer product of rotated vectors: the same
scores without the O(P·(d_in + d_out)) rotation of every query. For those layers
the outer products of a training batch are formed a block of rows of [d_out, d_in]
at a time, right before the GEMM of that block (queries are stored in the same
column blocks), so the [B, P] gradient matrix never round-trips through memory and
the pass runs within about 10% of 2·Q·N·P FLOPs at the machine's GEMM rate
(docs/BENCHMARKS.md); with fewer queries than d_in the queries are contracted with
the activations first and nothing per example is formed (`contracts`), and so are
layers with positions when Q·T is small (`contracts_positions`); otherwise their per-example
gradients are formed `GRADIENT_ELEMENTS` entries (a chunk of the batch's examples) at a time
into one kept buffer, so that it does not grow with the batch. In the
eigenbasis, the rows and columns deflated at the fit (units and inputs that were 0
on every example) are exact zeros of every training gradient of the fit; they are
split off (`_Piece`) and multiplied only on batches that are nonzero there.

Variants:
- relative (RelatIF, Barshan et al. 2020, θ-relative): I(z, x) / ‖(F + λ)⁻¹ ∇L(x)‖;
- self-influence: I(x, x) = ∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) for every training example.
Both need Σ_ij R_ij² / (Λ* + λ)_ij^p with R = U_Gᵀ ∇W U_A the rotated per-example
gradient (squares.py; for layers without positions one matmul, ((g̃²) @ W · ã²).sum(-1),
with W = (Λ* + λ)^-p).

`pairwise_scores`, `ensemble_pairwise_scores` and `self_influence_scores` run the math on
in-memory batches (tests, notebooks); scores.py runs it as the command, sharded and resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from influence_cli.factors import LayerFactors, Rotation, all_finite, deflated_columns, layer_damping, low_precision_mm
from influence_cli.passes import BatchGradients, accumulator_dtype, fan_out, matmul_dtype, stream_gradients
from influence_cli.squares import weighted_squares
from influence_cli.task import Measurement, load_measurement
from influence_cli.tracking import TrackedModule, per_example_gradients

_BLOCK_ELEMENTS = 1 << 13  # per-example gradient elements formed at once in the scoring GEMM (layers without positions)
_CONTRACT_ELEMENTS = 1 << 20  # query entries per block in the contracted scoring form (few queries)
_MIN_SPLIT = 1 / 64  # split a layer into pieces when its deflated rows and columns hold at least this share of P
QUERY_STEP_BYTES = 16 << 20  # one layer's preconditioned query rows formed at once (`store_queries`): their transient copies stay small
GRADIENT_ELEMENTS = 1 << 25  # per-example gradients [b, P] of a layer with positions formed at once on the CPU (128 MiB in float32, 256 in float64)
GRADIENT_ELEMENTS_GPU = 1 << 26  # on a GPU, or any device other than the CPU (256 MiB in float32)
_CHUNK_EXAMPLES = 64  # ... in whole multiples of 64 examples, at least 64: the GEMM slows down with fewer (and with a ragged tail)

StoredQueries = dict[str, list[Any]]
"""{layer: one entry per piece (`_Piece`): the row blocks [Q, rows·cols] of a layer without positions, or V' [Q, P]}."""


@dataclass(frozen=True)
class _Piece:
    """A rectangle [rows, cols] of a layer's per-example gradient in its eigenbasis ([d_out, d_in]).

    The eigendecomposition deflates outputs and inputs that were 0 on every example of the fit
    (dead units, blank pixels, padding: `factors.eigendecompose`) into the leading k_g rows and k_a
    columns of the eigenbasis, where a training example of the fit therefore has exact zeros.
    The rest of the matrix is the `support` piece, scored on every batch; the deflated rows and
    columns are one piece each, scored only on batches whose gradients are nonzero there (a
    training set other than the fit's), so that the scores stay exact and skip 2·Q·B flops for
    every entry that is always 0 (MNIST's MLP: 19% of its weights).
    """

    rows: slice
    cols: slice
    support: bool


def _pieces(d_out: int, d_in: int, k_g: int, k_a: int) -> list[_Piece]:
    """The pieces of a [d_out, d_in] gradient whose first k_g rows and k_a columns are deflated."""
    whole = slice(None)
    if (k_g * d_in + k_a * d_out) < _MIN_SPLIT * d_out * d_in:
        return [_Piece(whole, whole, True)]
    pieces = [_Piece(slice(k_g, d_out), slice(k_a, d_in), True), _Piece(slice(0, k_g), whole, False), _Piece(slice(k_g, d_out), slice(0, k_a), False)]
    return [p for p in pieces if len(range(d_out)[p.rows]) and len(range(d_in)[p.cols])]


class _Scratch:
    """One reusable buffer for the largest per-batch temporary, a layer's per-example gradients [b, P]
    (a chunk of a batch's examples, `GRADIENT_ELEMENTS` entries at most, or 64 examples' worth where
    one example's P is above a 64th of that: `_Positions.chunk`, `_positions_scores`).

    A fresh allocation of that size each time costs more than filling it: glibc maps every block
    over 32 MB anew, so each of its pages faults on first write (a ResNet's third stage at batch 64:
    151 MB, 81 ms to form against 8 ms into a reused buffer; a 128/256-channel CNN's conv2 at batch
    256, four chunks of 64 examples, 72 MiB: about 110 ms more per batch than into the kept buffer).
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= size
        buf = self.buffer
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self.buffer = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


@dataclass
class _Positions:
    """The per-example gradients ∇W_b = Σ_t g_bt a_btᵀ of a layer with positions, not formed yet.

    a [B, T, d_in], g [B, T, d_out]; `matmul_dtype`: the scoring GEMMs' dtype (None: a's own);
    `scratch`: where `flat` forms them (valid until the next `flat`).
    """

    a: torch.Tensor
    g: torch.Tensor
    matmul_dtype: torch.dtype | None = None
    scratch: _Scratch | None = None

    def flat(self, examples: slice = slice(None)) -> torch.Tensor:
        """[b, P] (row-major vec of [d_out, d_in]) of the `examples`, in the scoring GEMMs' dtype."""
        a, g = self.a[examples], self.g[examples]
        a, g = (a, g) if self.matmul_dtype is None else (a.to(self.matmul_dtype), g.to(self.matmul_dtype))
        shape = (a.shape[0], g.shape[-1], a.shape[-1])
        out = (self.scratch or _Scratch()).get(shape, a.dtype, a.device)
        return torch.bmm(g.transpose(1, 2), a, out=out).view(shape[0], -1)

    def chunk(self) -> int:
        """Examples whose [b, P] gradients are formed at once: the whole batch when its [B, P] fits
        `GRADIENT_ELEMENTS` entries (on any other device than the CPU, `GRADIENT_ELEMENTS_GPU`), else
        the most whole multiples of `_CHUNK_EXAMPLES` within that bound, at least one multiple (a
        layer whose P exceeds the bound / 64 keeps 64 examples' worth, above the bound)."""
        limit = GRADIENT_ELEMENTS if self.a.device.type == "cpu" else GRADIENT_ELEMENTS_GPU
        fits = limit // max(1, self.a.shape[-1] * self.g.shape[-1])
        if self.a.shape[0] <= fits:  # one GEMM: cutting it would only add a ragged chunk and re-read the queries
            return self.a.shape[0]
        return max(1, fits // _CHUNK_EXAMPLES) * _CHUNK_EXAMPLES


def support_entries(lf: LayerFactors, d_out: int, d_in: int) -> int:
    """Entries of a layer's [d_out, d_in] gradient in its support `_Piece` (without positions): what
    scoring a (query, training example of the fit) pair multiplies, P less the deflated rows and columns."""
    k_a, k_g = (0 if u is None else deflated_columns(u) for u in (lf.a_eigenvectors, lf.g_eigenvectors))
    return sum(len(range(d_out)[p.rows]) * len(range(d_in)[p.cols]) for p in _pieces(d_out, d_in, k_g, k_a) if p.support)


class ScoreKernel:
    """Turns the gradients of a batch into preconditioned vectors, pairwise scores and quadratic forms.

    Each layer's query and train vectors share one basis, chosen at the first batch a
    layer is seen (the query side): for layers without positions (T = 1) the Kronecker
    eigenbasis, where the per-example gradient is the outer product g̃ ãᵀ of rotated
    vectors (g̃ = U_Gᵀ g, ã = U_Aᵀ a), so preconditioning is one division and nothing is
    rotated back; for sequence / conv layers the parameter basis, where the query side
    is rotated back once, U_G [(U_Gᵀ V U_A) / (Λ* + λ)] U_Aᵀ, and training gradients
    are used as they are, unless the workload (`plan`) makes rotating every training
    example's vectors cheaper than rotating every query back (`eigenbasis_cheaper`).
    Scores are the same in either basis (U_A, U_G orthogonal).

    Args:
        layers: {layer: LayerFactors} on the model's device and in its accumulator dtype.
        damping: {layer: λ}.
        matmul_dtype: bfloat16 (`factors.amp: bfloat16`; float16 keeps float32 here): the preconditioned
            queries are stored, and the scoring GEMMs run, in that dtype; scores are summed in float32.
        per_token: Store every layer's queries as one [Q, P] matrix, whatever their positions, for
            `pairwise_per_token` (scores.per_token).
    """

    def __init__(
        self, layers: dict[str, LayerFactors], damping: dict[str, float], matmul_dtype: torch.dtype | None = None, per_token: bool = False
    ) -> None:
        self.layers = layers
        self.per_token = per_token
        self.damping = damping
        self.matmul_dtype = matmul_dtype
        self._inverse = {name: _inverse_weights(lf, damping[name]) for name, lf in layers.items()}
        self._quadratic_weights: dict[tuple[str, int], tuple[torch.Tensor | None, float]] = {}  # filled by `quadratic` when used
        self.eigenbasis: dict[str, bool] = {}
        self.pieces: dict[str, list[_Piece]] = {}
        self.flat: dict[str, bool] = {}
        self.piece_shapes: dict[str, list[tuple[int, int]]] = {}  # {layer: [rows, cols] of each stored piece}, by `_store_layer`
        self._scratch = _Scratch()
        self.workload: tuple[int, int] | None = None
        self._rotations = {
            name: tuple(None if u is None else Rotation(u) for u in (lf.a_eigenvectors, lf.g_eigenvectors)) for name, lf in layers.items()
        }

    def plan(self, n_query: int, n_train: int) -> None:
        """The workload: `n_query` queries preconditioned together, `n_train` training examples
        streamed against them. Layers with positions are then scored in the basis that costs less
        (`eigenbasis_cheaper`); without a plan, in the parameter basis."""
        self.workload = (n_query, n_train)

    def _in_eigenbasis(self, name: str, a: torch.Tensor) -> bool:
        if name not in self.eigenbasis:
            lf = self.layers[name]
            rotates = lf.a_eigenvectors is not None or lf.g_eigenvectors is not None
            positions = a.shape[1]
            cheaper = positions == 1 or (lf.eigenvalues is not None and eigenbasis_cheaper(self.workload, positions, *lf.eigenvalues.shape))
            self.eigenbasis[name] = rotates and cheaper
        return self.eigenbasis[name]

    def _layer_pieces(self, name: str, a: torch.Tensor, d_out: int) -> list[_Piece]:
        """The layer's `_Piece`s and query layout, fixed at the first batch it is seen (the query side).

        Queries with one position are stored cut into pieces and row blocks (`flat[name]` False),
        queries with positions, or any with `per_token`, as one [Q, P] matrix (`flat[name]` True); training batches follow
        that layout whatever their own number of positions.
        """
        if name not in self.pieces:
            self.flat[name] = a.shape[1] != 1 or self.per_token
            if self._in_eigenbasis(name, a) and not self.flat[name]:
                k_a, k_g = (0 if r is None else r.deflated for r in self._rotations[name])
                self.pieces[name] = _pieces(d_out, a.shape[-1], k_g, k_a)
            else:
                self.pieces[name] = [_Piece(slice(None), slice(None), True)]
        return self.pieces[name]

    def _rotated(self, name: str, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a U_A [B, T, d_in], g U_G [B, T, d_out]): the layer's vectors in its eigenbasis."""
        rot_a, rot_g = self._rotations[name]
        return (a if rot_a is None else rot_a(a)), (g if rot_g is None else rot_g(g))

    def gradients(self, batch: BatchGradients) -> dict[str, list[Any]]:
        """{layer: [∇W of every example, per `_Piece`]} in the layer's basis, for `pairwise`.

        Layers with positions: their (a, g) (`_Positions`), from which `pairwise` forms the matrix
        [B, P] (row-major vec of [d_out, d_in], P = d_out·d_in) right before the layer's GEMM, a
        chunk of examples at a time (`GRADIENT_ELEMENTS`), or contracts the queries with a first
        (few queries).
        Layers without (T = 1): per piece, the factors (g [B, rows], a [B, cols]) of the outer
        products ∇W = g aᵀ, which `pairwise` forms block by block next to its GEMM; None for a
        piece outside the support on which this batch's gradients are 0 (one host sync per batch).
        """
        out: dict[str, list[Any]] = {}
        checks: list[tuple[str, int, torch.Tensor]] = []
        for name in self.layers:
            a = batch.activations[name]
            g = batch.gradients[0][name]
            pieces = self._layer_pieces(name, a, g.shape[-1])
            if self._in_eigenbasis(name, a):
                a, g = self._rotated(name, a, g)
            if a.shape[1] != 1 and self.flat[name]:  # formed (if at all) when its GEMM runs, a chunk of examples at a time (`_positions_scores`)
                out[name] = [_Positions(a, g, self.matmul_dtype, self._scratch)]
                continue
            if a.shape[1] != 1:  # queries of one position, stored in pieces: this batch's gradients cut the same way
                grad = per_example_gradients(a, g) if self.matmul_dtype is None else per_example_gradients(*self._low((a, g)))
                out[name] = [grad[:, p.rows, p.cols].reshape(len(grad), -1) for p in pieces]
                continue
            g, a = (g[:, 0], a[:, 0]) if self.matmul_dtype is None else self._low((g[:, 0], a[:, 0]))
            out[name] = [(g[:, p.rows], a[:, p.cols]) for p in pieces]
            checks += [(name, i, gp.any() & ap.any()) for i, (p, (gp, ap)) in enumerate(zip(pieces, out[name], strict=True)) if not p.support]
        if checks:
            skipped = [(name, i) for (name, i, _), nonzero in zip(checks, torch.stack([c for *_, c in checks]).tolist(), strict=True) if not nonzero]
            if len(skipped) == sum(len(entries) for entries in out.values()):
                skipped = skipped[1:]  # a model with no support at all: one (zero) piece keeps the [Q, B] shape
            for name, i in skipped:
                out[name][i] = None
        return out

    def _low(self, v: Any) -> Any:
        """A tensor, or a tuple / list of them, in the scoring GEMMs' dtype."""
        if isinstance(v, torch.Tensor):
            return v.to(self.matmul_dtype)
        return type(v)(t.to(self.matmul_dtype) for t in v)

    def preconditioned(self, batch: BatchGradients) -> dict[str, torch.Tensor]:
        """{layer: (F + λ)⁻¹ ∇W [B, P]} in the layer's basis (see the class docstring)."""
        return {name: self._preconditioned(name, batch.activations[name], batch.gradients[0][name]) for name in self.layers}

    def _preconditioned(self, name: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(F + λ)⁻¹ ∇W [B, P] of one layer from its vectors a [B, T, d_in], g [B, T, d_out]."""
        lf, (inv, scale) = self.layers[name], self._inverse[name]
        if self._in_eigenbasis(name, a):
            grad = per_example_gradients(*self._rotated(name, a, g))
            grad = grad * inv if inv is not None else grad
        elif inv is None:
            grad = per_example_gradients(a, g)
        else:  # U_Gᵀ (Σ_t g_t a_tᵀ) U_A from the rotated vectors when T is small, then back
            if rotates_vectors(a.shape[1], *inv.shape):
                rotated = per_example_gradients(*self._rotated(name, a, g))
            else:
                rotated = lf.rotate(per_example_gradients(a, g))
            grad = lf.unrotate(rotated * inv)
        if scale != 1.0:  # in float64: the scale itself is beyond float32's max
            grad = (grad.double() * scale).to(grad.dtype)
        return grad.reshape(a.shape[0], -1)

    def store_queries(self, out: StoredQueries, row: int, total: int, batch: BatchGradients) -> None:
        """Writes a query batch's preconditioned vectors into rows [row, row + B) of `out`.

        Each layer's storage is allocated at the first batch: [total, P], or, for layers
        without positions, each `_Piece` of the matrix cut into column blocks of whole rows
        (`query_row_blocks`), the layout `pairwise` multiplies block by block. Layer by layer,
        a few rows at a time (`QUERY_STEP_BYTES` of [rows, P] each), so that the transient
        copies add little to the stored queries, which `scores.max_memory_mb` bounds.
        """
        for name in self.layers:
            a, g = batch.activations[name], batch.gradients[0][name]
            step = max(1, QUERY_STEP_BYTES // (g.shape[-1] * a.shape[-1] * a.element_size()))
            for r0 in range(0, a.shape[0], step):
                v = self._preconditioned(name, a[r0 : r0 + step], g[r0 : r0 + step])
                self._store_layer(out, name, row + r0, total, v, a)

    def blocked(self, queries: dict[str, torch.Tensor], batch: BatchGradients) -> StoredQueries:
        """[Q, P] preconditioned queries in the layout of `store_queries` (`batch`: any batch, for the layers' shapes)."""
        out: StoredQueries = {}
        for name, v in queries.items():
            self._store_layer(out, name, 0, len(v), v, batch.activations[name])
        return out

    def _store_layer(self, out: StoredQueries, name: str, row: int, total: int, v: torch.Tensor, a: torch.Tensor) -> None:
        """Writes one layer's vectors v [n, P] into rows [row, row + n) of `out` (`a`: the layer's inputs, for its shape)."""
        v = v if self.matmul_dtype is None else v.to(self.matmul_dtype)
        n = v.shape[0]
        pieces = self._layer_pieces(name, a, v.shape[1] // a.shape[-1])
        if self.flat[name]:
            if name not in out:
                out[name] = [v.new_empty(total, v.shape[1])]
            out[name][0][row : row + n] = v
            return
        matrix = v.view(n, -1, a.shape[-1])
        parts = [matrix[:, p.rows, p.cols] for p in pieces]
        self.piece_shapes[name] = [(part.shape[1], part.shape[2]) for part in parts]
        if name not in out:
            out[name] = [[v.new_empty(total, (r1 - r0) * part.shape[2]) for r0, r1 in query_row_blocks(total, *part.shape[1:])] for part in parts]
        for part, blocks in zip(parts, out[name], strict=True):
            r0 = 0
            for block in blocks:
                r1 = r0 + block.shape[1] // part.shape[2]
                block[row : row + n] = part[:, r0:r1].reshape(n, -1)
                r0 = r1

    @staticmethod
    def add_rows(queries: StoredQueries, into: dict[str, list[torch.Tensor]] | None = None) -> dict[str, list[torch.Tensor]]:
        """`into` + the sum over the rows (queries) of stored queries: {layer: per piece, the summed vector, [P]
        or the piece's [rows·cols] in row-major order}, in float32 (float64 for float64 queries) whatever the
        stored dtype, so that a bfloat16 run sums its queries without rounding each partial sum."""
        out = {} if into is None else into
        for name, pieces in queries.items():
            sums = []
            for q in pieces:
                blocks = q if isinstance(q, list) else [q]
                dtype = torch.float64 if blocks[0].dtype == torch.float64 else torch.float32
                sums.append(torch.cat([b.sum(0, dtype=dtype) for b in blocks]))
            if name in out:
                for acc, add in zip(out[name], sums, strict=True):
                    acc.add_(add)
            else:
                out[name] = sums
        return out

    def summed_queries(self, sums: dict[str, list[torch.Tensor]]) -> StoredQueries:
        """The one-row stored queries of summed vectors (`add_rows`), in the layout of `store_queries` with one
        query and in the stored dtype: what `pairwise` scores as one query, Σ_q V'_q."""
        out: StoredQueries = {}
        for name, pieces in sums.items():
            if self.flat[name]:
                out[name] = [pieces[0].to(self.matmul_dtype or pieces[0].dtype).view(1, -1)]
                continue
            out[name] = []
            for s, (rows, cols) in zip(pieces, self.piece_shapes[name], strict=True):
                matrix = s.to(self.matmul_dtype or s.dtype).view(rows, cols)
                out[name].append([matrix[r0:r1].reshape(1, -1) for r0, r1 in query_row_blocks(1, rows, cols)])
        return out

    @staticmethod
    def pairwise(queries: StoredQueries, train: dict[str, list[Any]]) -> torch.Tensor:
        """Σ_layers V'_q ∇W_xᵀ: [Q, B] (one GEMM per layer piece, or per row block).

        Args:
            queries: {layer: per piece, V' [Q, P] or its column blocks} (`store_queries`).
            train: {layer: per piece, ∇W [B, P], the factors (g, a) of ∇W = g aᵀ, the (a, g) of a
                layer with positions (`_Positions`), or None for a piece where the batch is 0} (`gradients`).

        With blocks and factors, the per-example gradients are formed one block of rows of
        [d_out, d_in] at a time, [B, rows·d_in] (a few MB, in cache), and multiplied at once:
        the [B, P] matrix never exists, so the pass runs at the GEMM's rate. With fewer queries
        than d_in (`contracts`) nothing per example is formed at all: V'_q a_b first, one GEMM
        [Q·rows, d_in] @ [d_in, B], then its dot with g_b (`_contracted`).
        """
        out: torch.Tensor | None = None
        for name, pieces in queries.items():
            for q, t in zip(pieces, train[name], strict=True):
                if t is not None:
                    out = _piece_scores(out, q, t)
        assert out is not None
        return out

    @staticmethod
    def pairwise_by_layer(queries: StoredQueries, train: dict[str, list[Any]], layers: Sequence[str]) -> torch.Tensor:
        """The parts V'_q,l ∇W_x,lᵀ of `pairwise` per layer: [L, Q, B], in the order of `layers`.

        The same GEMMs as `pairwise`, each layer's pieces summed into its own [Q, B] plane instead of
        one; a piece on which the batch is 0 (None in `train`) adds nothing to its layer. The planes
        sum to `pairwise` up to the order of the float additions.
        """
        out: torch.Tensor | None = None
        for i, name in enumerate(layers):
            for q, t in zip(queries[name], train[name], strict=True):
                if t is None:
                    continue
                if out is None:
                    first = _piece_scores(None, q, t)
                    out = first.new_zeros(len(layers), *first.shape)
                    out[i] = first
                else:
                    _piece_scores(out[i], q, t)  # in place: every form adds into a given `out`
        assert out is not None
        return out

    def pairwise_per_token(self, queries: StoredQueries, batch: BatchGradients) -> torch.Tensor:
        """Each training position's part of `pairwise`: [Q, B, T], Σ_layers g_btᵀ V'_q a_bt, summing over T to the scores.

        A layer's per-example gradient Σ_t g_bt a_btᵀ is a sum over its positions, so its score
        ⟨V'_q, Σ_t g_bt a_btᵀ⟩ splits exactly into one term per position (in either basis: the
        eigenbasis rotates a and g alike on both sides). Needs the kernel built with `per_token`
        (queries stored whole) and every layer at the same T positions (the caller checks it);
        padding positions, whose a and g the pass zeroed, are exact zeros.
        """
        out: torch.Tensor | None = None
        for name in self.layers:
            a, g = batch.activations[name], batch.gradients[0][name]
            self._layer_pieces(name, a, g.shape[-1])
            if not self.flat[name]:
                raise ValueError(f"layer {name!r}: queries stored in pieces; build the kernel with per_token=True")
            if self._in_eigenbasis(name, a):
                a, g = self._rotated(name, a, g)
            part = _per_position_scores(queries[name][0], a, g)
            out = part if out is None else out.add_(part)
        assert out is not None
        return out

    def quadratic(self, batch: BatchGradients, power: int) -> torch.Tensor:
        """Σ_layers Σ_ij R_ij² (Λ* + λ)_ij^-power per example: [B], R = U_Gᵀ ∇W U_A.

        power = 1: the self-influence ∇Lᵀ (F + λ)⁻¹ ∇L; power = 2: ‖(F + λ)⁻¹ ∇L‖².
        Without curvature (identity) the weight is 1: ‖∇W‖².
        """
        total: torch.Tensor | None = None
        dtype = None
        for name in self.layers:
            value, dtype = self._layer_quadratic(batch, name, power)
            total = value if total is None else total + value
        assert total is not None and dtype is not None
        return total.to(dtype)

    def _layer_quadratic(self, batch: BatchGradients, name: str, power: int) -> tuple[torch.Tensor, torch.dtype]:
        """(Σ_ij R_ij² (Λ* + λ)_ij^-power of one layer per example, in float64 [B]; the dtype it was computed in)."""
        if (name, power) not in self._quadratic_weights:
            self._quadratic_weights[name, power] = _scaled_weights(self.layers[name], self.damping[name], power)
        w, scale = self._quadratic_weights[name, power]
        value = weighted_squares(*self._rotated(name, batch.activations[name], batch.gradients[0][name]), None if w is None else w[:, None, :])[:, 0]
        return value.double() * scale, value.dtype  # the weights were divided by `scale`: multiplied back in float64

    def self_influence_by_layer(self, batch: BatchGradients, layers: Sequence[str]) -> torch.Tensor:
        """Each layer's part ∇W_lᵀ (F_l + λ_l)⁻¹ ∇W_l of `self_influence`: [L, B] in float64, in the order
        of `layers` (their sum, cast to the model's dtype, is `self_influence`)."""
        return torch.stack([self._layer_quadratic(batch, name, 1)[0] for name in layers])

    def self_influence(self, batch: BatchGradients) -> torch.Tensor:
        """∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) per example: [B]."""
        return self.quadratic(batch, 1)

    def norms(self, batch: BatchGradients) -> torch.Tensor:
        """‖(F + λ)⁻¹ ∇L(x)‖ per example (the RelatIF denominator): [B]."""
        return self.quadratic(batch, 2).clamp_min(0).sqrt()


def _inverse_weights(lf: LayerFactors, damping: float) -> tuple[torch.Tensor | None, float]:
    """(1/(Λ + λ), 1.0) in the factors' dtype, or, where that overflows it (curvature near float32's
    underflow, as in deep squeeze-excitation layers: Λ ~ 1e-40), the `_scaled_weights` pair, whose
    scale multiplies the preconditioned gradients instead (their values fit)."""
    inverse = lf.inverse_eigenvalues(damping, 1)
    if inverse is None or all_finite(inverse):
        return inverse, 1.0
    return _scaled_weights(lf, damping, 1)


def _scaled_weights(lf: LayerFactors, damping: float, power: int) -> tuple[torch.Tensor | None, float]:
    """(1/(Λ + λ)^power divided by its largest entry, in the factors' dtype; that entry).

    The quadratic forms Σ R²/(Λ + λ)^power are summed from the scaled weights and multiplied
    by the scale in float64, so a small λ (1/λ² beyond float32's 3e38) does not overflow.
    """
    w = lf.inverse_eigenvalues(damping, power, torch.float64)
    if w is None:
        return None, 1.0
    scale = float(w.max()) if bool((w > 0).any()) else 1.0
    return w.div_(scale).to(lf.eigenvalues.dtype), scale  # type: ignore[union-attr]


def _piece_scores(out: torch.Tensor | None, q: torch.Tensor | list[torch.Tensor], t: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | _Positions) -> torch.Tensor:
    """out + the [Q, B] scores of one layer piece (`ScoreKernel.pairwise`).

    q: V' [Q, P], or its column blocks of whole rows; t: ∇W [B, P], the factors (g [B, rows], a [B, cols]),
    or the (a, g) of a layer with positions (`_Positions`).
    """
    if not isinstance(q, list):
        if isinstance(t, _Positions):
            if contracts_positions(q.shape[0], t.a.shape[1]):
                part = _per_position_scores(q, t.a, t.g).sum(dim=2)  # Σ_t g_btᵀ V'_q a_bt
                return part if out is None else out.add_(part)
            return _positions_scores(out, q, t)
        if isinstance(t, tuple):
            t = (t[0][:, :, None] * t[1][:, None, :]).reshape(t[0].shape[0], -1)
        return _add_scores(out, q, t.T)
    buf: torch.Tensor | None = None
    c0 = r0 = 0
    for block in q:
        width = block.shape[1]
        if isinstance(t, tuple):
            g, a = t
            r1 = r0 + width // a.shape[1]
            if contracts(block.shape[0], a.shape[1]):
                part = _contracted(block, g[:, r0:r1], a)
                out = part if out is None else out.add_(part)
                r0 = r1
                continue
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
    assert out is not None
    return out


def _positions_scores(out: torch.Tensor | None, q: torch.Tensor, t: _Positions) -> torch.Tensor:
    """out + V' ∇Wᵀ [Q, B] of a layer with positions, its [B, P] gradients formed a chunk of examples
    at a time (`_Positions.chunk`) into the kernel's scratch, each chunk multiplied by all of V' [Q, P].

    Column b of the scores depends on example b alone, so the chunks' columns are the batch's scores
    (up to the GEMM's summation order). The kept buffer then holds [b, P], not [B, P] (a 128/256-channel
    CNN's conv2 at batch 256: 64 of its 256 examples, 72 MiB instead of 288), at the cost of reading
    V' once per chunk: the GEMM slows as b shrinks (docs/BENCHMARKS.md, Memory, has the figures).
    """
    n, step = t.a.shape[0], t.chunk()
    if step >= n:
        return _add_scores(out, q, t.flat().T)
    columns = []
    for b0 in range(0, n, step):
        grad = t.flat(slice(b0, b0 + step))
        if out is None:
            columns.append(_add_scores(None, q, grad.T))
        else:
            _add_scores(out[:, b0 : b0 + step], q, grad.T)  # in place, into the columns of these examples
    return torch.cat(columns, dim=1) if out is None else out


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


def contracts_positions(n_query: int, positions: int) -> bool:
    """True when a layer with T positions is scored as Σ_t (V'_q a_bt)·g_bt rather than ⟨V'_q, Σ_t g_bt a_btᵀ⟩.

    Forming the per-example gradients is a bmm over only T terms per entry, bound by writing B·P
    numbers, then a GEMM of Q·B·P multiply-adds (on a ResNet's third stage, T = 4, batch 64:
    14 ms with one query against 1.6 ms contracted); the contracted form is one well-shaped GEMM
    of Q·T·B·P. Measured on CPU, contracting wins while Q·T ≤ 32.
    """
    return n_query * positions <= 32


def _per_position_scores(q: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g_btᵀ V'_q a_bt: [Q, B, T] from q [Q, d_out·d_in], a [B, T, d_in], g [B, T, d_out] (float32 for a
    bfloat16 q). V'_q is contracted with the vectors of the wider side first, so that the intermediate is
    [Q, min(d_in, d_out), rows] (a language model's head: [Q, d_in, rows], not [Q, vocabulary, rows]),
    `GRADIENT_ELEMENTS` entries at a time. A bfloat16 / float16 q is multiplied in 2-D products by
    `low_precision_mm`, whose result on CUDA is the GEMM's float32 accumulation, not rounded to q's dtype first."""
    n, (b, t, d_in), d_out = q.shape[0], a.shape, g.shape[-1]
    low = q.dtype not in (torch.float32, torch.float64)
    dtype = torch.float32 if low else q.dtype
    rows_a, rows_g = a.reshape(b * t, d_in), g.reshape(b * t, d_out).to(dtype)
    out = torch.empty(n, b * t, dtype=dtype, device=q.device)
    step = max(1, GRADIENT_ELEMENTS // max(1, n * min(d_in, d_out)))
    wide = d_out > d_in  # gᵀ V first: [Q, rows, d_in]; otherwise V a: [Q, d_out, rows]
    v = q.view(n, d_out, d_in)
    if wide and low:  # [d_out, Q·d_in], once: gᵀ V of every query in one 2-D product per block of rows
        v = v.transpose(0, 1).reshape(d_out, n * d_in)
    for r0 in range(0, b * t, step):
        ra, rg = rows_a[r0 : r0 + step], rows_g[r0 : r0 + step]
        if wide and low:
            gv = low_precision_mm(rg, v, q.dtype, torch.float32).view(-1, n, d_in)  # [rows, Q, d_in]
            out[:, r0 : r0 + step] = (gv * ra.to(dtype)[:, None]).sum(-1).T
        elif wide:
            gv = torch.matmul(rg[None], v)  # [Q, rows, d_in], then its dot with a
            out[:, r0 : r0 + step] = (gv * ra.to(dtype)[None]).sum(-1)
        else:
            flat = v.view(n * d_out, d_in)
            va = torch.matmul(flat, ra.T.to(dtype)) if not low else low_precision_mm(flat, ra.T, q.dtype, torch.float32)  # [Q·d_out, rows]
            out[:, r0 : r0 + step] = (va.view(n, d_out, -1) * rg.T[None]).sum(1)
    return out.view(n, b, t)


def eigenbasis_cheaper(workload: tuple[int, int] | None, positions: int, d_out: int, d_in: int) -> bool:
    """True when a layer with positions costs less scored in its Kronecker eigenbasis than in the parameter basis.

    Both bases cost the same scoring GEMMs; the eigenbasis rotates the vectors of every streamed
    training example, n_train·T·(d_in² + d_out²) multiply-adds, the parameter basis rotates every
    preconditioned query back, n_query·d_out·d_in·(d_in + d_out). A ResNet's third stage (T = 4,
    2304 → 256) favours the eigenbasis up to about 70 training examples per query; its first
    (T = 64) up to about one. `workload` = (n_query, n_train), None when unknown (parameter basis).
    """
    if workload is None:
        return False
    n_query, n_train = workload
    return n_train * positions * (d_in * d_in + d_out * d_out) < n_query * d_out * d_in * (d_in + d_out)


def rotates_vectors(positions: int, d_out: int, d_in: int) -> bool:
    """True when U_Gᵀ (Σ_t g_t a_tᵀ) U_A is cheaper from the rotated vectors (T·(d_in² + d_out²)
    multiply-adds) than by rotating the formed gradient (d_out·d_in·(d_in + d_out)): few positions."""
    return positions * (d_in * d_in + d_out * d_out) < d_out * d_in * (d_in + d_out)


def row_blocks(d_out: int, d_in: int, elements: int | None = None) -> list[tuple[int, int]]:
    """Ranges [r0, r1) of the rows of a [d_out, d_in] gradient, each about `elements` entries (at least one row)."""
    rows = max(1, (elements or _BLOCK_ELEMENTS) // max(1, d_in))
    return [(r0, min(d_out, r0 + rows)) for r0 in range(0, d_out, rows)]


def safe_norms(norms: torch.Tensor) -> torch.Tensor:
    """RelatIF denominators with zeros replaced by 1 (a zero gradient scores 0 either way); NaN and inf
    are kept, for the checks before writing to refuse (compute-scores checks the norms and the scores)."""
    return torch.where(norms == 0, torch.ones_like(norms), norms)


def pairwise_scores(
    model: nn.Module,
    tracked: list[TrackedModule],
    layers: dict[str, LayerFactors],
    query_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    **options: Any,
) -> torch.Tensor:
    """In-memory scores of every (query, train) pair: [n_query, n_train].

    A small-problem entry point (notebooks, tests): everything is held in memory.
    `compute_scores` is the streaming, sharded, resumable version of the same math.

    Args:
        layers: {layer: LayerFactors} (converted to the model's dtype and device here).
        query_batches, train_batches: (inputs, targets, global_indices) triples.
        options: task_kind, measurement, damping, damping_factor, damping_scope, relative,
            device, padding_value, amp, by_layer, as in `ensemble_pairwise_scores`.
    """
    return ensemble_pairwise_scores([(model, tracked, layers)], query_batches, train_batches, **options)


def ensemble_pairwise_scores(
    members: Sequence[tuple[nn.Module, list[TrackedModule], dict[str, LayerFactors]]],
    query_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    train_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    task_kind: str = "classification",
    measurement: Measurement | Callable[..., Any] = "loss",
    damping: float | str = "auto",
    damping_factor: float = 0.1,
    damping_scope: str = "layer",
    relative: bool = False,
    device: torch.device | None = None,
    padding_value: float | None = None,
    amp: str = "none",
    by_layer: bool = False,
) -> torch.Tensor:
    """In-memory scores averaged over an ensemble of models, each with its own factors: [n_query, n_train].

    (1/M) Σ_m ∇L_m(z)ᵀ (F_m + λ_m)⁻¹ ∇L_m(x) (ensemble.py), the mean of `pairwise_scores` over
    the members, computed in one pass over each dataset (every batch goes through every model).

    Args:
        members: (model, tracked layers, {layer: LayerFactors}) of every member.
        query_batches, train_batches: (inputs, targets, global_indices) triples.
        measurement: `loss`, `margin`, or the user's own fn(outputs, targets) -> [B] (a function, or its
            package.module:function imported from the working directory or the Python path).
        by_layer: Return each layer's part instead, [L, n_query, n_train] in the order of the first
            member's layers; the parts sum to the scores (relative ones too: each part is divided by
            the example's whole norm).
    """
    measurement = load_measurement(measurement)  # imported once for every member's stream
    kernels = [build_kernel(model, layers, damping, damping_factor, device, damping_scope, amp) for model, _, layers in members]
    kw: dict[str, Any] = {"task_kind": task_kind, "device": device, "padding_value": padding_value, "amp": amp}
    queries: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in layers} for _, _, layers in members]
    last: list[BatchGradients] = []

    def per_member(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], **options: Any) -> Iterator[tuple[BatchGradients, ...]]:
        """Each batch through every member, one stream per member (its first-batch checks run once)."""
        copies = fan_out(batches, len(members))
        streams = [stream_gradients(model, tracked, it, **options, **kw) for (model, tracked, _), it in zip(members, copies, strict=True)]
        return zip(*streams, strict=True)

    for batches in per_member(query_batches, mode="measurement", measurement=measurement):
        last = list(batches)
        for kernel, out, batch in zip(kernels, queries, batches, strict=True):
            for name, v in kernel.preconditioned(batch).items():
                out[name].append(v)
    if not last:
        raise ValueError("no query batches")
    stacked = [k.blocked({name: torch.cat(v) for name, v in out.items()}, b) for k, out, b in zip(kernels, queries, last, strict=True)]
    columns = []
    names = list(kernels[0].layers) if by_layer else None
    for batches in per_member(train_batches, mode="loss", dataset_name="data.train"):
        total: torch.Tensor | None = None
        for kernel, vq, batch in zip(kernels, stacked, batches, strict=True):
            grads = kernel.gradients(batch)
            s = kernel.pairwise(vq, grads) if names is None else kernel.pairwise_by_layer(vq, grads, names)
            if relative:
                s = s / safe_norms(kernel.norms(batch))
            total = s if total is None else total + s
        assert total is not None
        columns.append(total / len(members))
    return torch.cat(columns, dim=-1)


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
    by_layer: bool = False,
) -> torch.Tensor:
    """In-memory self-influence ∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) of every training example: [n_train]; with
    `by_layer`, each layer's part instead, [L, n_train] in the order of `layers` (in the model's dtype)."""
    kernel = build_kernel(model, layers, damping, damping_factor, device, damping_scope)
    names = list(kernel.layers)
    out = [
        kernel.self_influence(batch) if not by_layer else kernel.self_influence_by_layer(batch, names).to(accumulator_dtype(model))
        for batch in stream_gradients(
            model, tracked, train_batches, task_kind=task_kind, mode="loss", device=device, padding_value=padding_value
        )
    ]
    return torch.cat(out, dim=-1)


def build_kernel(
    model: nn.Module,
    layers: dict[str, LayerFactors],
    damping: float | str,
    factor: float,
    device: torch.device | None,
    scope: str = "layer",
    amp: str = "none",
    per_token: bool = False,
) -> ScoreKernel:
    """The ScoreKernel of `model`: its factors on `device` in the model's accumulator dtype, λ per
    layer (`factors.layer_damping`) and the scoring GEMMs' dtype under `factors.amp`; `per_token`:
    queries stored whole, for `ScoreKernel.pairwise_per_token`."""
    dtype = accumulator_dtype(model)
    moved = {name: lf.to(device or torch.device("cpu"), dtype) for name, lf in layers.items()}
    return ScoreKernel(moved, layer_damping(moved, damping, factor, scope), matmul_dtype(amp, dtype), per_token)


__all__ = [
    "ScoreKernel",
    "StoredQueries",
    "build_kernel",
    "contracts",
    "contracts_positions",
    "eigenbasis_cheaper",
    "ensemble_pairwise_scores",
    "pairwise_scores",
    "query_row_blocks",
    "row_blocks",
    "safe_norms",
    "self_influence_scores",
    "support_entries",
]
