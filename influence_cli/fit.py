"""`fit-factors`: stream the training set through the curvature passes and save the factors.

Pass 1 (kfac, ekfac) accumulates A and G; the eigendecomposition runs in float64;
pass 2 (ekfac) accumulates the corrected eigenvalues Λ* in the Kronecker
eigenbasis; `diagonal` has one pass (squared gradients in the parameter basis);
`identity` has none. Memory is model + factors + one batch, whatever the dataset size.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from influence_cli import notices, storage
from influence_cli.config import Config, yaml_text
from influence_cli.context import RunContext, read_dataset
from influence_cli.data import IndexedDataset
from influence_cli.data.dataset import data_change
from influence_cli.distributed import DistState, agree
from influence_cli.ensemble import Member, describe_member, ensemble_members, name_member, prepare_member, refuse_same_weights
from influence_cli.errors import NumericalError, OutputError, human_bytes, out_of_memory
from influence_cli.factors import (
    SCALE_SPREAD,
    STORED_KEYS,
    ColumnScales,
    CovarianceAccumulator,
    DiagonalAccumulator,
    Factors,
    Handover,
    LayerFactors,
    basis_diagonal,
    column_scales,
    kronecker_layer_factors,
)
from influence_cli.models import definition_change, load_model, model_definition, model_fingerprint, takes_token_ids
from influence_cli.passes import (
    BatchGradients,
    NonFiniteWatch,
    accumulator_dtype,
    agreed_first_batch,
    matmul_dtype,
    stream_gradients,
)
from influence_cli.progress import NullProgress, Progress, for_rank
from influence_cli.progress import start as start_progress
from influence_cli.reprs import brief_repr
from influence_cli.resume import (
    PassCheckpoint,
    Snapshot,
    agreed_checks,
    check_rank_layout,
    clear_progress_of_finished,
    progress_files,
    refuse_other_finished_result,
    run_key,
    run_keys,
)
from influence_cli.tracking import (
    CONV_KINDS,
    TrackedModule,
    UntrackedModule,
    find_tracked_modules,
    frozen_layers_warning,
    is_layer,
    skipped_layers,
)


@dataclass
class LayerInfo:
    """What is tracked in one layer and how big its factors are (elements)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    d_in: int
    d_out: int
    a_size: int
    g_size: int
    eigenvalue_size: int
    zero_inputs: int | None = None  # rows of A that are 0 on every example (blank inputs, dead units before)
    zero_outputs: int | None = None  # rows of G that are 0 on every example (dead units)
    transposed: bool = False  # weight stored [d_in, d_out] (transformers' Conv1D), tracked as the Linear of its transpose

    def factor_bytes(self) -> int:
        """Bytes of this layer's tensors in the factors file: the float32 factors (with kfac / ekfac
        also λ_A [d_in] and λ_G [d_out]) and the int64 example count."""
        spectra = self.d_in + self.d_out if self.a_size else 0
        return 4 * (self.a_size + self.g_size + self.eigenvalue_size + spectra) + 8


LARGE_FACTOR_SIDE = 1 << 15  # a Kronecker factor this wide (4 GiB in float32), such as a large vocabulary's G, gets a warning


LARGE_FACTORS_BYTES = 1 << 30  # factors from this size on, not the batch, are the likely cause of running out of memory


def large_factor_warning(layers: list[LayerInfo]) -> str | None:
    """A warning naming the layer with the widest A or G when it is at least LARGE_FACTOR_SIDE wide (an output head
    over a large vocabulary: G is vocabulary²), with the memory fit-factors needs for it; None when there is none."""
    sides = [(side, which, r) for r in layers if r.a_size for side, which in ((r.d_in, "an A"), (r.d_out, "a G")) if side >= LARGE_FACTOR_SIDE]
    if not sides:
        return None
    side, which, r = max(sides, key=lambda s: s[0])
    many = len({id(s[2]) for s in sides})
    what = f"{many} layers have factors {LARGE_FACTOR_SIDE:,} or more wide; the widest, {r.name!r}, has" if many > 1 else f"layer {r.name!r} has"
    return (
        f"{what} {which} of {side:,}² ({human_bytes(4 * side**2)} in float32; fit-factors eigendecomposes it in float64, "
        f"{human_bytes(8 * side**2)}, in time growing as its width cubed): with a large vocabulary, leave the output head out of "
        "factors.modules (`influence inspect` lists the layers), or fit on a machine with that memory"
    )


def factor_memory_hint(layers: list[LayerInfo]) -> str:
    """The hint of fit-factors running out of memory: the factors' size and the largest layer's, and what lowers each
    (leaving layers out first when the factors take LARGE_FACTORS_BYTES or more, a smaller batch first otherwise)."""
    total = sum(r.factor_bytes() for r in layers)
    largest = max(layers, key=lambda r: r.factor_bytes())
    shapes = f" (A {largest.d_in:,}², G {largest.d_out:,}², eigendecomposed in float64)" if largest.a_size else ""
    fixes = [
        "leave large layers out of factors.modules (`influence inspect` lists each layer's factors)",
        "a smaller data.batch_size lowers the passes' activations",
    ]
    if total < LARGE_FACTORS_BYTES:
        fixes.reverse()
    return (
        f"the factors take {human_bytes(total)} in float32, layer {largest.name!r} {human_bytes(largest.factor_bytes())} of it{shapes}: "
        f"{'; '.join(fixes)}; fit-factors keeps the progress it saved: rerun it with --resume"
    )


@dataclass
class FitReport:
    """The outcome of fit-factors.

    Attributes:
        path: The factors file written.
        strategy, fisher: What was fitted (factors.strategy, factors.fisher).
        num_examples: Training examples each pass saw (all ranks together).
        layers: The tracked layers with their shapes and factor sizes.
        seconds: Wall time per phase (covariance, eigendecomposition, correction; diagonal for that strategy).
        resumed_from: The saved progress this run continued from, if any.
        members: An ensemble's other models (scores.checkpoints), one report each.
        skipped: Layers the module patterns' wildcards passed over (untracked kinds).
    """

    __repr__ = brief_repr

    path: Path
    strategy: str
    fisher: str
    num_examples: int
    layers: list[LayerInfo]
    seconds: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    members: list[FitReport] = field(default_factory=list)  # ensembles: the factors of scores.checkpoints
    member: int = 0  # which ensemble member this report is about (0 = model.checkpoint)
    skipped: list[UntrackedModule] = field(default_factory=list)  # tracking.skipped_layers: layers the wildcards passed over


def describe_layers(tracked: list[TrackedModule], strategy: str) -> list[LayerInfo]:
    """Factor sizes each tracked layer needs under `strategy`."""
    rows = []
    for tm in tracked:
        kron = strategy in ("kfac", "ekfac")
        rows.append(
            LayerInfo(
                tm.name,
                tm.kind,
                tm.weight_shape,
                tm.d_in,
                tm.d_out,
                tm.d_in**2 if kron else 0,
                tm.d_out**2 if kron else 0,
                tm.num_params if strategy != "identity" else 0,
                transposed=tm.transposed,
            )
        )
    return rows


@dataclass
class PassPlan:
    """How to stream one rank's data through the passes.

    Attributes:
        batches: batches(start_batch) -> iterable of (inputs, targets, global_indices) from that batch on.
        num_batches: Batches in this rank's shard.
        num_examples: Examples in this rank's shard.
        task_kind, fisher, seed, amp, padding_value: Settings of the passes.
        device: Where the model lives.
        all_reduce: Sums a tensor over ranks in place (identity in one process).
        state: The ranks, which take the first batch of each fit pass together (`passes.agreed_first_batch`); None: one process.
        after_first_batch: Run on every rank once every rank's first batch of a pass passed its checks, finite
            included (fit-factors: `resume.Replaced.remove`, which does its work at the first pass's only).
    """

    batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    num_batches: int
    num_examples: int
    task_kind: str
    fisher: str
    seed: int = 0
    amp: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    padding_value: float | None = None
    all_reduce: Callable[[torch.Tensor], object] = lambda t: t
    state: DistState | None = None
    after_first_batch: Callable[[], None] | None = None


def _run_pass(
    model: nn.Module,
    tracked: list[TrackedModule],
    plan: PassPlan,
    accumulator: CovarianceAccumulator | DiagonalAccumulator,
    phase: str,
    checkpoint: PassCheckpoint | None,
    snapshot: Snapshot | None,
    extra: dict[str, torch.Tensor],
    progress: Progress,
) -> None:
    """Streams the shard once into `accumulator`, snapshotting progress; then all-reduces it."""
    acc_state = accumulator.state()
    start = 0
    if snapshot is not None and snapshot.phase == phase and snapshot.batches_done > 0:
        for k, v in acc_state.items():
            v.copy_(snapshot.tensors[k])
        start = snapshot.batches_done
    progress.start(PHASE_TITLES[phase], plan.num_examples)
    try:
        _stream_into(model, tracked, plan, accumulator, phase, checkpoint, start, acc_state | extra, progress)
    finally:
        progress.stop()  # also on Ctrl-C, so the terminal is left clean for the message
    for v in acc_state.values():
        plan.all_reduce(v)
        if not bool(torch.isfinite(v).all()):
            raise NumericalError(f"non-finite accumulator after the {phase} pass", hint="no factors were written")


def _stream_into(
    model: nn.Module,
    tracked: list[TrackedModule],
    plan: PassPlan,
    accumulator: CovarianceAccumulator | DiagonalAccumulator,
    phase: str,
    checkpoint: PassCheckpoint | None,
    start: int,
    to_save: dict[str, torch.Tensor],
    progress: Progress,
) -> None:
    """The batch loop of `_run_pass`, from batch `start` on."""
    watch = NonFiniteWatch(plan.device, "no factors were written", plan.amp)
    stream = stream_gradients(
        model,
        tracked,
        plan.batches(start),
        task_kind=plan.task_kind,
        mode="fisher",
        fisher=plan.fisher,
        seed=plan.seed,
        device=plan.device,
        amp=plan.amp,
        start_batch=start,
        padding_value=plan.padding_value,
        tensor_dtype=accumulator.matmul_dtype,
    )
    def finite(batch: BatchGradients) -> None:  # a NaN checkpoint stops the run at its first batch, not at the pass's end
        watch.observe(batch)
        watch.check(phase)

    # a first-batch error every rank meets is said once; only then does the fit let go of what it replaces
    for batch in agreed_first_batch(stream, plan.state, check=finite, then=plan.after_first_batch):
        if batch.index == start and start:
            progress.advance(min(plan.num_examples, start * len(batch.global_indices)))
        accumulator.update(batch)
        watch.observe(batch)
        done = batch.index + 1
        if checkpoint is not None and checkpoint.due(done) and done < plan.num_batches:
            watch.check(phase)
            checkpoint.save(phase, done, to_save)
        progress.advance(len(batch.global_indices))
    watch.check(phase)


PHASE_TITLES = {"diagonal": "diagonal Fisher", "covariance": "covariances A, G", "correction": "eigenvalue correction"}


def compute_factors(
    model: nn.Module,
    tracked: list[TrackedModule],
    strategy: str,
    plan: PassPlan,
    *,
    checkpoint: PassCheckpoint | None = None,
    snapshot: Snapshot | None = None,
    progress: Progress | None = None,
    seconds: dict[str, float] | None = None,
    keep_covariances: bool = False,
    spill_dir: Path | None = None,
    damping: tuple[float | str, float, str] = ("auto", 0.1, "layer"),
) -> dict[str, LayerFactors]:
    """Runs the passes `strategy` needs and returns every tracked layer's factors.

    Accumulators are float32 (float64 for a float64 model); eigendecompositions float64. Each
    layer's A and G are released once decomposed (only their zero rows are counted, `zero_inputs`
    and `zero_outputs`); `keep_covariances` keeps them on the factors (`a_covariance`,
    `g_covariance`), except in a run resumed from a snapshot of the correction pass past its start,
    which holds the eigenbases, not A and G. With `spill_dir` (fit-factors: the factors' folder), an
    A or G larger than `factors.SPILL_BYTES` is written to an anonymous temporary file there while
    its own eigh runs, instead of being held in memory for the fall-backs (`factors.eigendecompose`).
    `damping`: (scores.damping, damping_factor, damping_scope), which the column-scale warning after pass 1 judges
    (`warn_column_scales`).
    """
    progress = progress or NullProgress()
    seconds = seconds if seconds is not None else {}
    dtype = accumulator_dtype(model)
    device = plan.device
    if strategy == "identity":
        total = plan.all_reduce(torch.tensor(float(plan.num_examples), dtype=torch.float64, device=device))
        return {tm.name: LayerFactors(tm.name, num_examples=int(total)) for tm in tracked}  # type: ignore[arg-type]

    def timed(phase: str, acc, extra: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        _run_pass(model, tracked, plan, acc, phase, checkpoint, snapshot, extra, progress)
        seconds[phase] = time.perf_counter() - t0

    low = matmul_dtype(plan.amp, dtype)  # factors.amp: bfloat16: the products in bf16 (float16 keeps them float32)
    if strategy == "diagonal":
        diag = DiagonalAccumulator(tracked, {tm.name: (None, None) for tm in tracked}, dtype, device, low)
        timed("diagonal", diag, {})
        count = float(diag.count)
        return {name: LayerFactors(name, eigenvalues=(s / count).clamp_min(0), num_examples=int(count)) for name, s in diag.sums.items()}

    if snapshot is not None and snapshot.phase == "correction" and BASIS_COUNT in snapshot.tensors:
        layers = layers_from_basis(tracked, snapshot.tensors, device)  # the interrupted run's eigenbases: no eigendecomposition
        count = snapshot.tensors[BASIS_COUNT]
        diagonals = {n: (basis_diagonal(lf.a_eigenvectors, lf.a_eigenvalues), float(lf.g_eigenvalues.double().mean())) for n, lf in layers.items()}
        warn_column_scales(model, tracked, diagonals, dtype, damping)
    else:
        cov = CovarianceAccumulator(tracked, dtype, device, low)
        if snapshot is not None and snapshot.phase == "correction":  # the summed covariances after pass 1
            for k, v in cov.state().items():
                v.copy_(snapshot.tensors[f"covariance.{k}"])
        else:
            timed("covariance", cov, {})
            if strategy == "ekfac" and checkpoint is not None and checkpoint.every > 0:
                # The summed covariances exist only now: keep them at once, so that a run stopped
                # before the first correction snapshot (e.g. in a long eigendecomposition) does
                # not redo pass 1, and so that all ranks' progress is from the same pass.
                checkpoint.save("correction", 0, {f"covariance.{k}": v for k, v in cov.state().items()})
        count = cov.count
        diagonals = {n: (a.diagonal() / count, float(cov.g[n].diagonal().double().mean() / count)) for n, a in cov.a.items()}
        warn_column_scales(model, tracked, diagonals, dtype, damping)
        t0 = time.perf_counter()
        start_progress(progress, "eigendecomposition", len(tracked), unit="layers")  # minutes for wide layers (ViT, ConvNeXt): say it is working
        layers = {}
        for tm in tracked:  # one layer's float64 matrices at a time (factors.eigendecompose)
            # The sums become the mean covariances in their own memory and leave the accumulator: they are
            # handed over, so that each is released for its own eigendecomposition (a 12,545-wide A is
            # 630 MB in float32), unless asked to keep them.
            a_cov, g_cov = cov.means(tm.name, float(count), release=True)
            if not keep_covariances:
                a_cov, g_cov = Handover(a_cov), Handover(g_cov)
            layers[tm.name] = kronecker_layer_factors(
                tm.name, a_cov, g_cov, int(count), dtype, keep_covariances=keep_covariances, spill_dir=spill_dir
            )
            del a_cov, g_cov
            progress.advance(1)
        progress.stop()
        seconds["eigendecomposition"] = time.perf_counter() - t0
        del cov
    if strategy == "kfac":
        return layers

    bases = {name: (lf.a_eigenvectors, lf.g_eigenvectors) for name, lf in layers.items()}
    corr = DiagonalAccumulator(tracked, bases, dtype, device, low)
    for lf in layers.values():
        lf.eigenvalues = None  # K-FAC's λ_G λ_Aᵀ [d_out, d_in]: Λ* replaces it
    # Snapshots of this pass hold the eigenbases (alive anyway) with its sums: a resumed run decomposes nothing.
    timed("correction", corr, basis_tensors(layers, count))
    count2 = float(corr.count)
    for name, lf in layers.items():
        lf.eigenvalues = (corr.sums[name] / count2).clamp_min(0)  # the position-pair sums can round below 0
    return layers


DROWNED = 0.1 * SCALE_SPREAD
"""`warn_column_scales` speaks of a layer whose auto damping is at least this many times its median column's curvature
(with the default damping_factor 0.1 and scope `layer`: the layers `column_scales` flags)."""
SHOWN_LAYERS = 5
"""Layers the column-scale warning names (the rest are counted)."""


@dataclass
class _Drowned:
    """A layer `warn_column_scales` speaks of: its columns, and auto damping / its median column's curvature (`over`)."""

    tm: TrackedModule
    found: ColumnScales
    curvature: float  # the median column's curvature, mean(λ_G) × median_j E[a_j²]
    over: float


def warn_column_scales(
    model: nn.Module,
    tracked: list[TrackedModule],
    diagonals: dict[str, tuple[torch.Tensor, float]],
    dtype: torch.dtype = torch.float32,
    damping: tuple[float | str, float, str] = ("auto", 0.1, "layer"),
) -> None:
    """After pass 1: one warning naming the layers whose input columns are on scales so far apart that auto
    damping drowns the typical column's curvature (`factors.column_scales`). `diagonals`: each layer's diag(A)
    [d_in] and mean(λ_G), the means of pass 1; `dtype`: the factors'; `damping`: (scores.damping,
    damping_factor, damping_scope), as compute-scores will read them (a number for scores.damping: nothing to say).

    Auto damping is estimated from pass 1 as K-FAC has it: a layer's mean eigenvalue is mean(λ_G) × mean_j E[a_j²].
    """
    value, factor, scope = damping
    if value != "auto":
        return
    means = {tm.name: diagonals[tm.name][1] * float(diagonals[tm.name][0].double().mean()) for tm in tracked}
    size = sum(tm.d_out * tm.d_in for tm in tracked)
    model_mean = sum(means[tm.name] * tm.d_out * tm.d_in for tm in tracked) / size if size else 0.0
    drowned = []
    for tm in tracked:
        a_diagonal, g_mean = diagonals[tm.name]
        found = column_scales(a_diagonal)
        curvature = g_mean * found.median if found is not None else 0.0
        if found is None or curvature <= 0:
            continue
        over = factor * (model_mean if scope == "model" else means[tm.name]) / curvature
        if over >= DROWNED:
            drowned.append(_Drowned(tm, found, curvature, over))
    if not drowned:
        return
    first = None if takes_token_ids(model) else next((m for m in model.modules() if is_layer(m)), None)
    data = [d for d in drowned if d.tm.module is first]  # the model's first Linear or conv reads the data's columns
    hidden = [d for d in drowned if d.tm.module is not first]
    parts = [_data_columns_text(data[0], factor, scope, dtype)] if data else []
    if hidden:
        parts.append(_hidden_features_text(hidden, len(tracked), factor, scope, also=bool(data)))
    notices.warn(". ".join(parts), key="column scales")  # one line for every layer, once for an ensemble


def _auto_damping(factor: float, scope: str, whose: str = "the layer's") -> str:
    """Auto damping in words, as scores.damping_factor and damping_scope set it."""
    return f"auto damping ({factor:g} × {'the mean eigenvalue over every layer' if scope == 'model' else whose + ' mean eigenvalue'})"


def _data_columns_text(d: _Drowned, factor: float, scope: str, dtype: torch.dtype) -> str:
    """The warning of `warn_column_scales` for the layer that reads the data: its columns named, and the fixes.

    Damping 0 is said not to help where the pseudo-inverse (`LayerFactors.inverse_eigenvalues`: eigenvalues
    below max · eps · max(d_out, d_in) count as 0, eps of the factors' `dtype`) comes within 10× of the median column's curvature.
    """
    tm, found = d.tm, d.found
    lost = found.ratios[0] * torch.finfo(dtype).eps * max(tm.d_in, tm.d_out) >= 0.1
    unit = "channel" if tm.kind in CONV_KINDS else "column"
    per = math.prod(tm.module.kernel_size) if tm.kind in CONV_KINDS else 1  # F.unfold's columns: channel-major
    bias = tm.has_bias and tm.d_in - 1 in found.columns
    numbers = list(dict.fromkeys(j // per for j in found.columns if not (tm.has_bias and j == tm.d_in - 1)))
    shown = ", ".join(str(j) for j in numbers[:5]) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    parts = ([f"input {unit}{'s' if len(numbers) > 1 else ''} {shown}"] if numbers else []) + (["the bias column (ones)"] if bias else [])
    subject, several = " and ".join(parts), len(numbers) + bias > 1
    name = repr(tm.name or "(model)")
    plural = "s" if several else ""
    zero = (
        f"; scores.damping 0 does not help ({str(dtype).removeprefix('torch.')} factors cannot resolve the other {unit}s beside "
        f"{'them' if several else 'it'})"
        if lost
        else ""
    )
    return (
        f"layer {name}: {subject} {'are' if several else 'is'} on a scale up to {_magnitude(math.sqrt(found.ratios[0]))} times the median "
        f"{unit}'s (root mean square), so {_auto_damping(factor, scope)} is {_magnitude(d.over)} times the median {unit}'s curvature "
        f"and the scores follow "
        f"{'those' if several else 'that'} {unit}{plural} almost alone{zero}. Standardize the data's {unit}s (one mean and std per {unit} in "
        f"data.train's and data.query's transform.normalize, or in the data factory), or set scores.damping near "
        f"{_magnitude(factor * d.curvature)} ({factor:g} × the median {unit}'s curvature in {name}; the number serves every layer)"
    )


def _hidden_features_text(hidden: list[_Drowned], n_tracked: int, factor: float, scope: str, *, also: bool) -> str:
    """The warning of `warn_column_scales` for layers past the first: the model's own features, not the data's
    columns; the layers named (`SHOWN_LAYERS`, then a count), and the damping_factor that brings the widest
    one's auto damping down to `factor` × its median feature's curvature."""
    names = ", ".join(repr(d.tm.name) for d in hidden[:SHOWN_LAYERS])
    more = f" and {len(hidden) - SHOWN_LAYERS} more" if len(hidden) > SHOWN_LAYERS else ""
    several = len(hidden) > 1
    scale = _magnitude(math.sqrt(max(d.found.ratios[0] for d in hidden)))
    worst = max(d.over for d in hidden)
    auto = _auto_damping(factor, scope, "a layer's" if several else "the layer's")
    layers, whose = ("layers", "those layers'") if several else ("layer", "the layer's")
    return (
        f"{'Also ' if also else ''}{layers} {names}{more} ({len(hidden)} of {n_tracked} tracked): a few input features (the model's "
        f"own, such as a transformer's outlier dimensions) are on a scale up to {scale} times the median feature's, so {auto} is up to "
        f"{_magnitude(worst)} times the median feature's curvature and {whose} scores follow those features almost alone; "
        f"if the others should count, lower scores.damping_factor (near {_magnitude(factor * factor / worst)})"
    )


def _magnitude(value: float) -> str:
    """A number to one significant digit, exponent without padding: 1e6, 2e-1, 3."""
    mantissa, exponent = f"{value:.0e}".split("e")
    return mantissa if int(exponent) == 0 else f"{mantissa}e{int(exponent)}"


BASIS = "basis."
"""Prefix of the eigendecomposition's tensors in snapshots of the correction pass (`basis_tensors`)."""
BASIS_COUNT = f"{BASIS}count"
_BASIS_KEYS = (storage.A_EIGENVECTORS, storage.G_EIGENVECTORS, storage.A_EIGENVALUES, storage.G_EIGENVALUES)


def basis_tensors(layers: dict[str, LayerFactors], count: torch.Tensor) -> dict[str, torch.Tensor]:
    """What snapshots of the correction pass keep of the eigendecomposition, keyed `basis.<layer>.<factor>`:
    every layer's U_A, U_G, λ_A, λ_G (the tensors themselves, no copies), its zero rows of A and G
    (`basis.<layer>.zero_rows`, int64 [2]), and pass 1's example count (`basis.count`, float64 []).

    A column-major eigenbasis (LAPACK's, where nothing was deflated) is kept as its transpose,
    `<factor>.mT`, so that `layers_from_basis` gives it back in that layout: the rotations' GEMMs
    round alike only with operands laid out alike.
    """
    out = {BASIS_COUNT: count}
    for name, lf in layers.items():
        for key in _BASIS_KEYS:
            t = getattr(lf, key)
            column_major = t.dim() == 2 and not t.is_contiguous() and t.mT.is_contiguous()
            out[f"{BASIS}{name}.{key}{'.mT' if column_major else ''}"] = t.mT if column_major else t
        out[f"{BASIS}{name}.zero_rows"] = torch.tensor([lf.zero_inputs, lf.zero_outputs], dtype=torch.int64)
    return out


def layers_from_basis(tracked: list[TrackedModule], tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, LayerFactors]:
    """The layers' factors before the correction pass from a snapshot's `basis_tensors`, copied to
    `device` in their layout (a copy: new memory, aligned as the eigendecomposition's was, not the
    snapshot file's map; GEMMs can round otherwise on unaligned operands)."""
    count = int(tensors[BASIS_COUNT])
    layers = {}
    for tm in tracked:
        prefix = f"{BASIS}{tm.name}."
        zero_inputs, zero_outputs = tensors[f"{prefix}zero_rows"].tolist()
        basis = {}
        for key in _BASIS_KEYS:
            t = tensors[prefix + key] if prefix + key in tensors else tensors[f"{prefix}{key}.mT"].mT
            basis[key] = t.to(device, copy=True)  # strides kept
        layers[tm.name] = LayerFactors(tm.name, num_examples=count, zero_inputs=zero_inputs, zero_outputs=zero_outputs, **basis)
    return layers


def plan_for(ctx: RunContext, dataset: IndexedDataset, limit: int | None = None) -> PassPlan:
    """The PassPlan of this rank's shard of `dataset` under the config's settings."""
    cfg = ctx.cfg
    n = len(dataset) if limit is None else min(limit, len(dataset))
    start, stop = ctx.state.shard(n)
    return PassPlan(
        batches=lambda start_batch: ctx.batches(dataset, start_batch=start_batch, limit=limit),
        num_batches=ctx.num_batches(dataset, limit),
        num_examples=stop - start,
        task_kind=cfg.task.kind,
        fisher=cfg.factors.fisher,
        seed=cfg.seed,
        amp=cfg.factors.amp,
        device=ctx.device,
        padding_value=cfg.data.padding_value,
        all_reduce=ctx.state.all_reduce_,
        state=ctx.state,
    )


def factors_metadata(ctx: RunContext, dataset: IndexedDataset, num_examples: int) -> dict[str, object]:
    """What produced a factors file (checked by every later command)."""
    cfg = ctx.cfg
    return {
        storage.FORMAT_KEY: storage.FACTORS_FORMAT,
        **ctx.provenance(),
        "strategy": cfg.factors.strategy,
        "fisher": cfg.factors.fisher,
        "task": cfg.task.kind,
        "model_fingerprint": ctx.model_fingerprint,
        "model_definition": ctx.model_definition,
        "dataset_fingerprint": dataset.fingerprint(),
        "dataset_parts": dataset.fingerprint_parts(),  # what a refusal names as changed (data_change)
        "num_examples": num_examples,
        "modules": [tm.name for tm in ctx.tracked],
        "seed": cfg.seed,
        "padding_value": cfg.data.padding_value,
    }


def _agree_on_progress(state: DistState, snapshot: Snapshot | None) -> Snapshot | None:
    """The snapshot this rank resumes from, the same pass on every rank (they all-reduce the same tensors).

    When some ranks saved progress in the correction pass and others only in the covariance pass
    (a rank stopped while the others wrote the summed covariances), every rank restarts the
    correction pass from what the first rank that holds its progress resumes from: the summed
    covariances (its snapshot after pass 1) or the eigenbases decomposed from them (a later one).
    """
    if not state.distributed:
        return snapshot
    phases = state.all_gather_object(None if snapshot is None else snapshot.phase)
    if "correction" not in phases or len(set(phases)) == 1:
        return snapshot
    src = phases.index("correction")
    mine = None
    if snapshot is not None and state.rank == src:  # the summed covariances (at batch 0), or the eigenbases (later)
        mine = {k: v.cpu() for k, v in snapshot.tensors.items() if k.startswith(("covariance.", BASIS))}
    start = state.broadcast_object(mine, src=src)
    return Snapshot("correction", 0, start)  # type: ignore[arg-type]


@storage.guards_output_dir("factors")
def fit_factors(
    cfg: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    state: DistState | None = None,
    progress: Progress | None = None,
) -> FitReport:
    """Fits the configured curvature on `data.train` and writes `<factors_dir>/factors.safetensors`
    (factors_dir: output_dir unless the config sets it).

    With `scores.checkpoints` (an ensemble), also fits every extra checkpoint's own factors
    into `<factors_dir>/members/<i>/factors.safetensors` (ensemble.py); the report of
    model.checkpoint is returned, with the others in `members`.

    Raises:
        OutputError: the factors exist (without `overwrite`), or leftover progress
            exists without `resume`/`overwrite`, or it belongs to other settings. Every model's
            factors file is checked before any model is fitted: a file that is no factors
            (another program's, a damaged one, another output), or, without `resume`, finished
            factors, in any model's place refuses the run before it computes anything, as a
            folder there does even with `overwrite`, and so do a later model's folder that cannot be
            created or written and its progress (without a flag; a folder with `overwrite`); with
            `resume`, so do a later model's finished factors of other settings, its progress saved
            by another number of ranks and this rank's snapshot of other settings (read from their
            headers; data.train is read then, once for every model).
    """
    members = ensemble_members(cfg)
    first, *others = members
    dist = state or DistState()  # the ranks (the device is no concern before a model is fitted)

    def up_front() -> None:  # every model's place, before any model is fitted
        for m in members:  # what is no factors refuses first (a folder even with --overwrite); with --resume, the later
            # models' finished factors are compared once the models and data.train are read (_check_later_models)
            storage.check_can_write(m.factors_path, overwrite, "factors", cfg.factors_key, storage.FACTORS_FORMAT, resume=True)
        unfitted = [m for m in others if not m.factors_path.is_file()]
        if not resume and not overwrite and first.factors_path.is_file() and unfitted:
            raise OutputError(
                f"{str(first.factors_path)!r} already holds factors from a finished run; {', '.join(m.key for m in unfitted)} of the ensemble "
                f"{'has' if len(unfitted) == 1 else 'have'} none yet",
                hint="pass --resume to fit only the models without factors (keeping the others), or --overwrite to refit every model",
            ).everywhere()
        if not resume and not overwrite:
            for m in members:
                storage.check_can_write(m.factors_path, False, "factors", cfg.factors_key, storage.FACTORS_FORMAT)
        for m in others:  # a later model's folder (a file in its way, not writable), as at its turn
            storage.check_creatable_dir(m.out_dir, cfg.factors_key)  # created at its turn
            if overwrite:  # its progress, removed at model 0's turn: never a folder
                for p in progress_files(m.out_dir, storage.FACTORS_PARTIAL):
                    storage.refuse_irregular(p, True, cfg.factors_key)
            elif not resume:  # its leftover progress, refused as at its turn (no settings are compared; nothing removed)
                check_rank_layout(m.out_dir, storage.FACTORS_PARTIAL, dist.world_size, resume=False, overwrite=False, key=cfg.factors_key)
                PassCheckpoint(_progress_path(m.out_dir, dist), {}, 0, folder_key=cfg.factors_key).check_start(False, False)

    agree(dist, up_front)  # a file that only some ranks see stops every rank here, none left waiting in a collective
    described: list[_Described] = []
    if others:  # each checkpoint fits the model, and holds weights of its own, before model 0's passes run
        described = [_describe(cfg, m) for m in members]
        refuse_same_weights([(m.key, d.fingerprint) for m, d in zip(members, described, strict=True)], cfg.source)
    shared: IndexedDataset | None = None  # data.train, read once for every model that takes its inputs as model 0 does
    if others and resume:  # a later model's finished factors or progress of other settings refuse the run now, not at its turn
        train = read_dataset(cfg, dist, cfg.data.train, "data.train", tokens=described[0].tokens)
        agree(dist, lambda: _check_later_models(cfg, [(m, described[m.index]) for m in others], train, dist))
        shared = train
    # with --overwrite, removed once model 0's checks and its first batch pass: the other models' progress, then their factors (a progress
    # file that cannot be removed, one a finished run left, stops the run with every factors file still there)
    replaced = [p for m in others for p in progress_files(m.out_dir, storage.FACTORS_PARTIAL)] + [m.out_dir / storage.FACTORS_FILE for m in others]

    def fit(m: Member, also_replaced: list[Path] | None = None) -> FitReport:
        dataset = shared if shared is not None and described[m.index].tokens == described[0].tokens else None
        try:
            return _fit_member(cfg, m, overwrite=overwrite, resume=resume, state=state, progress=progress, also_replaced=also_replaced, dataset=dataset)
        except NumericalError as exc:  # NaN/Inf of one model's own (its weights diverged): say which, and what stands
            if others:
                name_member(exc, m, cfg)
            if m.index and exc.hint:
                exc.hint = exc.hint.replace("no factors were written", "no factors were written for this model (those of the models before it stand)")
            raise

    report = fit(first, replaced)
    report.members = [fit(m) for m in others]
    return report


@dataclass(frozen=True)
class _Described:
    """What the factors of one model of an ensemble record of it (`_fit_result`), and whether it takes token ids
    (`models.takes_token_ids`: how data.train is read for it)."""

    fingerprint: str
    definition: dict[str, object]
    modules: list[str]
    tokens: bool


def _describe(cfg: Config, member: Member) -> _Described:
    """`member`'s model, loaded on the CPU and described (the model itself is not kept)."""
    model = load_model(cfg.model, cfg.base_dir, checkpoint=member.checkpoint, key=member.key)
    tracked = [tm.name for tm in find_tracked_modules(model, cfg.factors.modules, trainable_only=cfg.factors.trainable_only)]
    return _Described(model_fingerprint(model), model_definition(cfg.model, model), tracked, takes_token_ids(model))


def _check_later_models(cfg: Config, later: list[tuple[Member, _Described]], dataset: IndexedDataset, state: DistState) -> None:
    """--resume's refusals of the later models of an ensemble (`later`: each with its description), before any model
    is fitted, each the refusal that model's turn would give: finished factors of other settings, progress saved by
    another number of ranks, and this rank's snapshot of other settings. Header reads only: no tensor is loaded."""
    for member, d in later:
        result = _fit_result(cfg, d.fingerprint, d.definition, d.modules, dataset)
        if member.factors_path.is_file():  # finished: its progress is removed at its turn, not compared
            _check_finished(cfg, member.factors_path, result)
            continue
        check_rank_layout(member.out_dir, storage.FACTORS_PARTIAL, state.world_size, resume=True, overwrite=False, key=cfg.factors_key)
        _snapshot_of(cfg, member.out_dir, result, state).check_header()


def _fit_result(
    cfg: Config, fingerprint: str, definition: dict[str, object], modules: list[str], dataset: IndexedDataset
) -> dict[str, object]:
    """The settings a model's factors depend on (their `result_key` hashes them): the model's fingerprint and
    definition (`models.model_definition`), the tracked layers' names, the training set and the fit's settings."""
    return {
        "model": fingerprint,
        "definition": definition,
        "data": dataset.fingerprint(),
        "strategy": cfg.factors.strategy,
        "fisher": cfg.factors.fisher,
        "task": cfg.task.kind,
        "modules": modules,
        "n": num_fit_examples(cfg, len(dataset)),
        "seed": cfg.seed,
        "amp": cfg.factors.amp,
        "padding_value": cfg.data.padding_value,
    }


def _snapshot_of(cfg: Config, out_dir: Path, result: dict[str, object], state: DistState) -> PassCheckpoint:
    """This rank's progress of the fit of `result` into `out_dir`. Progress is only resumable with the same batches
    on the same ranks; a finished result is "the same" whatever the batch size and rank count were."""
    settings = result | {"batch_size": cfg.data.batch_size, "world": state.world_size}
    return PassCheckpoint(_progress_path(out_dir, state), settings, cfg.factors.checkpoint_every, folder_key=cfg.factors_key)


def _progress_path(out_dir: Path, state: DistState) -> Path:
    """This rank's snapshot of a fit into `out_dir`."""
    return out_dir / storage.FACTORS_PARTIAL.format(rank=f".rank{state.rank}" if state.distributed else "")


def _check_finished(cfg: Config, path: Path, result: dict[str, object]) -> None:
    """--resume on finished factors at `path`: refused when they hold the result of other settings than `result` (named)."""
    recorded = storage.read_metadata(path)
    if recorded.get("result_key") not in run_keys(result):
        refuse_other_finished_result(path, recorded.get("result"), result, "factors", cfg.factors_key, storage.FACTORS_FORMAT)


def _fit_member(
    cfg: Config,
    member: Member,
    *,
    overwrite: bool = False,
    resume: bool = False,
    state: DistState | None = None,
    progress: Progress | None = None,
    also_replaced: list[Path] | None = None,
    dataset: IndexedDataset | None = None,
) -> FitReport:
    """fit-factors for one model of the ensemble (member 0: model.checkpoint into factors_dir).

    With `overwrite`, its old factors, and `also_replaced` (the other models' factors and
    progress), are removed once its start checks and its first batch passed on every rank (a run refused there
    leaves them), before any progress is saved: an interrupted run then resumes past the models it did not reach.
    `dataset`: data.train as read already for this model (else read here).
    """
    ctx = prepare_member(cfg, member, state)
    out_dir = member.out_dir
    path = out_dir / storage.FACTORS_FILE
    dataset = dataset if dataset is not None else ctx.dataset(cfg.data.train, "data.train")
    n = num_fit_examples(cfg, len(dataset))
    result = _fit_result(cfg, ctx.model_fingerprint, ctx.model_definition, [tm.name for tm in ctx.tracked], dataset)
    layers_info = describe_layers(ctx.tracked, cfg.factors.strategy)
    skipped = skipped_layers(ctx.model, ctx.tracked, cfg.factors.modules, cfg.factors.trainable_only)
    if resume and not overwrite and path.exists():
        _check_finished(cfg, path, result)
        clear_progress_of_finished(ctx.state, out_dir, storage.FACTORS_PARTIAL, outputs=[path], key=cfg.factors_key)
        return FitReport(path, cfg.factors.strategy, cfg.factors.fisher, n, layers_info, {}, "already complete", member=member.index, skipped=skipped)
    checkpoint = _snapshot_of(cfg, out_dir, result, ctx.state)

    def start_checks() -> tuple[Snapshot | None, list[Path]]:
        storage.check_can_write(path, overwrite, "factors", cfg.factors_key, storage.FACTORS_FORMAT)
        storage.ensure_writable_dir(out_dir, key=cfg.factors_key)
        removed = check_rank_layout(out_dir, storage.FACTORS_PARTIAL, ctx.state.world_size, resume=resume, overwrite=overwrite, key=cfg.factors_key)
        snapshot, stale = checkpoint.check_start(resume, overwrite)  # a rank's own progress file may refuse on that rank alone
        # rank 0 also lets go of the old factors: an interrupted --overwrite run leaves its progress, which --resume
        # continues, and not them (the other models' progress first, `fit_factors`)
        old = [*(also_replaced or []), path] if overwrite else []
        return snapshot, removed + stale + (old + storage.temp_paths(path) if ctx.state.is_main else [])

    # every rank stops together, none left waiting in a collective; what the fit replaces goes once the first batch passed
    snapshot, replaced = agreed_checks(ctx.state, start_checks, cfg.factors_key)
    snapshot = _agree_on_progress(ctx.state, snapshot)
    resumed_from = None if snapshot is None else f"{snapshot.phase} pass, batch {snapshot.batches_done}"
    seconds: dict[str, float] = {}
    progress = for_rank(progress, ctx.state.rank, ctx.state.world_size)
    plan = replace(plan_for(ctx, dataset, cfg.factors.max_examples), after_first_batch=replaced.remove)
    if (large := large_factor_warning(layers_info)) is not None:
        notices.warn(large)
    if (frozen := frozen_layers_warning(ctx.model, ctx.tracked, cfg.factors.modules)) is not None:
        notices.warn(frozen, key="frozen layers")  # once for an ensemble
    try:
        layers = compute_factors(
            ctx.model, ctx.tracked, cfg.factors.strategy, plan, checkpoint=checkpoint, snapshot=snapshot, progress=progress, seconds=seconds,
            spill_dir=out_dir, damping=(cfg.scores.damping, cfg.scores.damping_factor, cfg.scores.damping_scope),
        )  # fmt: skip
    except (RuntimeError, MemoryError) as exc:
        memory = out_of_memory(exc, factor_memory_hint(layers_info))
        if memory is None:
            raise
        raise memory from exc
    replaced.remove()  # done at the first batch, but for a fit without passes (identity)
    factors = Factors(cfg.factors.strategy, cfg.factors.fisher, layers)
    for info in layers_info:
        info.zero_inputs, info.zero_outputs = layers[info.name].zero_inputs, layers[info.name].zero_outputs
    if ctx.state.is_main:
        tensors: dict[str, torch.Tensor] = {}
        for lf in factors.layers.values():
            tensors.update(lf.tensors())
        meta = factors_metadata(ctx, dataset, n) | {"result_key": run_key(result), "result": result}
        if member.index or cfg.scores.checkpoints:
            meta["ensemble_member"] = describe_member(member, ctx)
        storage.save_tensors(path, tensors, meta)
    ctx.state.barrier()
    checkpoint.clear()
    return FitReport(path, cfg.factors.strategy, cfg.factors.fisher, n, layers_info, seconds, resumed_from, member=member.index, skipped=skipped)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def load_factors(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    check_finite: bool = True,
    match: Callable[[Factors], None] | None = None,
) -> Factors:
    """Reads a factors file written by fit-factors (`path`: the file, e.g. cfg.factors_path / "factors.safetensors").

    Layer by layer: each layer's tensors are checked to be finite (`LayerFactors.nonfinite`, a few
    MB at a time) and moved to `device` and `dtype` (`LayerFactors.to`, as `kernel.build_kernel`
    does) before the next layer is read, so that memory holds the factors once plus one layer's
    file pages while a copy is made. Without a copy (as stored: float32 on the CPU) the tensors
    are views of a memory map of the file: nothing is read twice.

    Args:
        path: The factors file.
        device, dtype: Where and in which dtype the factors are wanted (None: as stored).
        check_finite: Refuse a file holding NaN or Inf. compute-scores and dataset-similarity, which use
            every layer, check them here; spectrum and edit read without it and check the layers they
            chose (`check_finite_factors`), so that the others' pages are never read.
        match: Called before any tensor is read, with the file's metadata as a `Factors` whose layers
            hold no tensors yet (e.g. `check_factors_match`): factors of another model or training set
            are refused for that, the more useful message, before their values are checked or copied.

    Raises:
        OutputError: no file there, or not a readable factors file; what `match` raises; the file
            replaced while it was read (its header and its layers are read through separate opens).
        NumericalError: a tensor of the file holds NaN or Inf (named `<layer>.<factor>`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_factors() takes the path of a factors file (cfg.factors_path / 'factors.safetensors'), not {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"no factors at {str(path)!r}", hint="run `influence fit-factors` with this config first").everywhere()
    found = storage.file_identity(path)
    meta, dtypes = storage.read_contents(path, storage.FACTORS_FORMAT)
    names = meta.get("modules", [])
    strategy, fisher = meta.get("strategy", ""), meta.get("fisher", "")
    if match is not None:
        match(Factors(strategy, fisher, {name: LayerFactors(name) for name in names}, meta))
    groups = [[k for k in (f"{name}.{key}" for key in (*STORED_KEYS, storage.NUM_EXAMPLES)) if k in dtypes] for name in names]
    moved = device is not None or dtype is not None
    target = torch.device("cpu") if device is None else torch.device(device)
    float_dtypes = {d for d in dtypes.values() if d.startswith(("F", "BF"))}
    copies = target.type != "cpu" or (dtype is not None and bool(float_dtypes - {_SAFETENSORS_DTYPES.get(dtype)}))
    layers: dict[str, LayerFactors] = {}
    groups_read = storage.read_groups(path, groups, separate=copies)
    for name in names:  # not zip(): its reused result tuple would keep the previous group alive during the next read
        lf = LayerFactors.from_tensors(name, next(groups_read))
        if check_finite:
            _refuse_nonfinite(lf, path)
        layers[name] = lf.to(target, dtype) if moved else lf
        del lf  # a copy's source (its file pages) goes before the next layer is read
    if storage.file_identity(path) != found:  # the header and the layers come from separate opens of the path
        raise OutputError(
            f"{str(path)!r} was replaced while it was read", hint="rerun once `influence fit-factors` has finished writing it"
        )
    return Factors(strategy, fisher, layers, meta)


def check_finite_factors(factors: Factors, path: Path, layers: Iterable[str] | None = None) -> None:
    """Refuses factors read with `load_factors(check_finite=False)` that hold NaN or Inf in `layers`
    (None: every layer), a few MB at a time (`LayerFactors.nonfinite`).

    Raises:
        NumericalError: naming the first such tensor, `<layer>.<factor>`, in layer order.
    """
    for name in factors.layers if layers is None else layers:
        _refuse_nonfinite(factors.layers[name], path)


def _refuse_nonfinite(lf: LayerFactors, path: Path) -> None:
    bad = lf.nonfinite()
    if bad is not None:
        raise NumericalError(f"{str(path)!r}: {lf.name}.{bad} holds NaN/Inf", hint="refit with `influence fit-factors --overwrite`").everywhere()


def warn_of_refit(path: Path, what: str, factors_path: Path, then: object, now: object, command: str) -> None:
    """Warns that the finished output at `path` (holding `what`: "scores", "a similarity result") was computed
    from the factors written at `then`, and `factors_path` was refitted since (`now`, its `created`) with the same
    settings (the same result key): the output is the refit's up to float rounding. `command` recomputes it.
    Nothing is said when either time is unknown (an output of a version that did not record it)."""
    if then is None or now is None or then == now:
        return
    subject = "the scores are" if what == "scores" else "it is"
    notices.warn(
        f"{str(path)!r} holds {what} of the factors written at {then}; {str(factors_path)!r} was refitted "
        f"since ({now}) with the same settings, so {subject} its own up to float rounding: rerun {command} "
        "with --overwrite for its own bits"
    )


def num_fit_examples(cfg: Config, n_train: int) -> int:
    """The training examples each pass of fit-factors sees: all, or the first factors.max_examples."""
    return n_train if cfg.factors.max_examples is None else min(cfg.factors.max_examples, n_train)


def check_factors_match(
    factors: Factors,
    ctx: RunContext,
    path: Path,
    train: IndexedDataset | None = None,
    num_examples: int | None = None,
    *,
    same_fit: bool = False,
    same_kind: bool = False,
) -> None:
    """Refuses factors of another model, task, other layers, other padding, or (when given) another
    training set than `train` (naming what changed, where the factors recorded it) or number of examples (factors.max_examples); with `same_fit` (compute-scores,
    whose scores record the factors' settings) also another seed for sampled labels; with
    `same_kind` another strategy or Fisher than the config's. Every rank of a torchrun job reads
    the same file and config: the refusal is printed once."""
    meta = factors.metadata
    fitted_seed = meta.get("seed")
    if same_fit and factors.fisher == "sampled" and fitted_seed is not None and fitted_seed != ctx.cfg.seed:
        raise OutputError(
            f"{str(path)!r} was fitted with seed={fitted_seed} (its sampled Fisher labels), the config has {ctx.cfg.seed}",
            hint="use the seed of fit-factors, or refit with --overwrite",
        ).everywhere()
    fitted_task = meta.get("task")  # absent from files written before the task was recorded
    if fitted_task is not None and fitted_task != ctx.cfg.task.kind:
        raise OutputError(
            f"{str(path)!r} was fitted for task.kind={fitted_task}, the config has {ctx.cfg.task.kind}",
            hint="use the task of fit-factors, or refit with --overwrite",
        ).everywhere()
    if meta.get("model_fingerprint") != ctx.model_fingerprint:
        raise OutputError(
            f"{str(path)!r} was fitted for another model (fingerprint {meta.get('model_fingerprint')} vs {ctx.model_fingerprint})",
            hint="rerun `influence fit-factors` for this checkpoint (with --overwrite)",
        ).everywhere()
    fitted_definition = meta.get("model_definition")  # absent from files written before it was recorded
    if fitted_definition is not None and fitted_definition != ctx.model_definition:
        raise OutputError(
            f"{str(path)!r} was fitted for another model definition ({definition_change(fitted_definition, ctx.model_definition)})",
            hint="use the model block of fit-factors, or refit with --overwrite",
        ).everywhere()
    names = [tm.name for tm in ctx.tracked]
    if list(factors.layers) != names:
        raise OutputError(
            f"{str(path)!r} tracks layers {list(factors.layers)}, the config tracks {names}",
            hint="use the factors.modules and factors.trainable_only of fit-factors, or refit with --overwrite",
        ).everywhere()
    if train is not None and meta.get("dataset_fingerprint") != train.fingerprint():
        raise OutputError(
            f"{str(path)!r} was fitted on another training set than data.train{storage.other_version(meta)}{data_change(meta.get('dataset_parts'), train)}",
            hint="use the data.train of fit-factors, or refit with --overwrite",
        ).everywhere()
    fitted_n = meta.get("num_examples")
    if num_examples is not None and fitted_n is not None and fitted_n != num_examples:
        raise OutputError(
            f"{str(path)!r} was fitted on {fitted_n} examples, the config asks for {num_examples} (data.train, factors.max_examples)",
            hint="use the factors.max_examples of fit-factors, or refit with --overwrite",
        ).everywhere()
    fitted_padding = meta.get("padding_value")
    if fitted_padding != ctx.cfg.data.padding_value:
        raise OutputError(
            f"{str(path)!r} was fitted with data.padding_value={yaml_text(fitted_padding)}, the config has {yaml_text(ctx.cfg.data.padding_value)}",
            hint="use the padding of fit-factors, or refit with --overwrite",
        ).everywhere()
    if same_kind and (factors.strategy != ctx.cfg.factors.strategy or factors.fisher != ctx.cfg.factors.fisher):
        raise OutputError(
            f"{str(path)!r} holds {factors.strategy} factors ({factors.fisher} Fisher), the config asks for "
            f"{ctx.cfg.factors.strategy} ({ctx.cfg.factors.fisher})",
            hint="set factors.strategy/factors.fisher to match, or refit with `influence fit-factors --overwrite`",
        ).everywhere()
