"""`dataset-similarity`: compare whole datasets through the model's own loss geometry.

Each named dataset S is streamed once. Per tracked layer, in the factors'
Kronecker eigenbasis (U_A, U_G from fit-factors; see factors.py), it yields

    M̃_S = U_Gᵀ (mean_n ∇W_n) U_A                      (d_out × d_in), the mean loss gradient
    D_S = mean_n Σ_k (U_Gᵀ ∇W_nk U_A)²                (d_out × d_in), the diagonal Fisher

with ∇W_n = Σ_t g_nt a_ntᵀ the per-example gradient at the real labels and ∇W_nk
the gradients of the Fisher's vectors (the factors' Fisher kind: sampled,
empirical or ggn). From them:

- Fisher kernel (Jaakkola & Haussler 1999, between dataset means):
  K(S, T) = Σ_layers Σ_ij M̃_S[i,j] M̃_T[i,j] / (Λ*[i,j] + λ), which is exactly the
  mean over all pairs (s ∈ S, t ∈ T) of the influence score ∇L(s)ᵀ (F + λ)⁻¹ ∇L(t)
  (expand the means); normalized K(S,T) / √(K(S,S) K(T,T)) ∈ [-1, 1].
- Task2Vec (Achille et al. 2019, "Task2Vec: Task Embedding for Meta-Learning"):
  the embedding of S is D_S over all layers; similarity is the cosine, and the
  normalized distance is d(S, T) = 1 − cos(D_S / (D_S + D_T), D_T / (D_S + D_T)).

Both are computed in the one pass; `method` only picks the headline matrix.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_cli import notices, storage
from influence_cli.config import SIMILARITY_METHODS, Config
from influence_cli.context import prepare
from influence_cli.distributed import DistState
from influence_cli.errors import ConfigError, NumericalError, UsageError
from influence_cli.factors import DiagonalAccumulator, LayerFactors, layer_damping
from influence_cli.fit import PassPlan, check_factors_match, load_factors, plan_for, warn_of_refit
from influence_cli.passes import BatchGradients, NonFiniteWatch, accumulator_dtype, check_first_batches, stream_gradients
from influence_cli.progress import NullProgress, Progress, for_rank
from influence_cli.reprs import brief_repr
from influence_cli.resume import (
    DatasetsProgress,
    clear_progress_of_finished,
    finished_result,
    prefixed,
    run_key,
)
from influence_cli.tracking import TrackedModule

HEADLINE = {"fisher-kernel": "kernel_normalized", "task2vec": "task2vec_cosine"}


@dataclass
class DatasetStatistics:
    """What one dataset contributes, per tracked layer (float64, CPU).

    Attributes:
        mean_gradient: {layer: M̃_S [d_out, d_in]} the mean loss gradient in the eigenbasis.
        fisher_diagonal: {layer: D_S [d_out, d_in]} the diagonal Fisher in the eigenbasis.
        num_examples: Examples averaged over (all ranks).
    """

    mean_gradient: dict[str, torch.Tensor]
    fisher_diagonal: dict[str, torch.Tensor]
    num_examples: int


@dataclass
class SimilarityResult:
    """The matrices between S datasets, in the order of `names` (float64 [S, S])."""

    names: list[str]
    statistics: list[DatasetStatistics]
    kernel: torch.Tensor
    kernel_normalized: torch.Tensor
    task2vec_cosine: torch.Tensor
    task2vec_distance: torch.Tensor
    layer_kernels: dict[str, torch.Tensor]
    inverse_curvature: dict[str, torch.Tensor]  # {layer: 1 / (Λ* + λ) [d_out, d_in]}


@dataclass
class SimilarityReport:
    """The outcome of dataset-similarity."""

    __repr__ = brief_repr

    path: Path
    method: str
    names: list[str]
    sizes: list[int]
    kernel: torch.Tensor
    kernel_normalized: torch.Tensor
    task2vec_cosine: torch.Tensor
    task2vec_distance: torch.Tensor
    damping: dict[str, float]
    strategy: str
    fisher: str  # the Fisher of the Task2Vec diagonals (similarity.fisher, else the factors')
    factors_fisher: str  # the factors' Fisher, which the kernel uses
    seconds: dict[str, float] = field(default_factory=dict)
    from_file: bool = False  # read from the finished result of the same settings, not computed
    resumed_from: str | None = None  # where --resume continued this rank's interrupted run

    @property
    def headline_name(self) -> str:
        return HEADLINE[self.method]

    @property
    def headline(self) -> torch.Tensor:
        """The matrix `method` is about: normalized kernel or Task2Vec cosine."""
        return getattr(self, self.headline_name)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "path": str(self.path),
            "method": self.method,
            "headline": self.headline_name,
            "names": self.names,
            "sizes": dict(zip(self.names, self.sizes, strict=True)),
            "kernel": self.kernel.tolist(),
            "kernel_normalized": self.kernel_normalized.tolist(),
            "task2vec_cosine": self.task2vec_cosine.tolist(),
            "task2vec_distance": self.task2vec_distance.tolist(),
            "damping": self.damping,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "factors_fisher": self.factors_fisher,
            "seconds": self.seconds,
            "from_file": self.from_file,
            "resumed_from": self.resumed_from,
        }


# ----------------------------------------------------------------------------- streaming


def _stream(model: nn.Module, tracked: list[TrackedModule], plan: PassPlan, name: str, start: int = 0) -> Iterator[BatchGradients]:
    """One forward pass per batch, from batch `start` on; back-propagates the loss gradient and the Fisher's vectors.

    Yields BatchGradients whose `gradients[0]` is {layer: g [B, T, d_out]} of the loss at
    the real labels and `gradients[1:]` those of the Fisher's vectors (`plan.fisher`);
    for the empirical Fisher the two coincide and only `gradients[0]` is formed.
    """
    return stream_gradients(
        model, tracked, plan.batches(start), task_kind=plan.task_kind, mode="loss+fisher", fisher=plan.fisher,
        seed=plan.seed, device=plan.device, amp=plan.amp, start_batch=start, dataset_name=name,
        padding_value=plan.padding_value,
    )


def _as_tensors(stats: DatasetStatistics) -> dict[str, torch.Tensor]:
    """A dataset's statistics as the tensors its saved progress holds (layer names may hold dots)."""
    return (
        {f"mean.{k}": v for k, v in stats.mean_gradient.items()}
        | {f"diagonal.{k}": v for k, v in stats.fisher_diagonal.items()}
        | {"count": torch.tensor(stats.num_examples, dtype=torch.int64)}
    )


def _from_tensors(tensors: dict[str, torch.Tensor]) -> DatasetStatistics:
    return DatasetStatistics(prefixed(tensors, "mean."), prefixed(tensors, "diagonal."), int(tensors["count"]))


def dataset_statistics(
    model: nn.Module,
    tracked: list[TrackedModule],
    factors: dict[str, LayerFactors],
    plan: PassPlan,
    *,
    name: str = "dataset",
    title: str | None = None,
    progress: Progress | None = None,
    saved: DatasetsProgress | None = None,
) -> DatasetStatistics:
    """Streams one dataset once and returns its mean rotated gradient and diagonal Fisher.

    Per batch and layer: Σ_n ∇W_n is one GEMM gᵀa over the B·T flattened rows (rotated
    once at the end, rotation being linear); the diagonal Fisher reuses
    factors.DiagonalAccumulator ((g̃²)ᵀ(ã²) for T = 1, chunked bmm otherwise).
    Sums and counts are all-reduced over ranks. `name` (a config key) is named in
    errors, `title` (default `name`) on the progress bar. `saved`: the pass continues
    from its sums and saves them every `factors.checkpoint_every` batches.
    """
    progress = progress or NullProgress()
    device, dtype = plan.device, accumulator_dtype(model)
    basis = {k: lf.to(device, dtype) for k, lf in factors.items()}
    grad_sum = {tm.name: torch.zeros(tm.d_out, tm.d_in, dtype=dtype, device=device) for tm in tracked}
    diag = DiagonalAccumulator(tracked, {k: (lf.a_eigenvectors, lf.g_eigenvectors) for k, lf in basis.items()}, dtype, device)
    sums = {f"{k}.gradient": v for k, v in grad_sum.items()} | diag.state()
    start = 0
    if saved is not None and saved.batches_done > 0:
        for k, v in sums.items():
            v.copy_(saved.state[k])
        start = saved.batches_done
    watch = NonFiniteWatch(device, amp=plan.amp)
    progress.start(title or name, plan.num_examples)
    try:
        if start:
            progress.advance(min(plan.num_examples, int(diag.count)))
        for batch in _stream(model, tracked, plan, name, start):
            watch.observe(batch)
            for tm in tracked:
                a, g = batch.activations[tm.name], batch.gradients[0][tm.name]
                grad_sum[tm.name].addmm_(g.reshape(-1, g.shape[-1]).T, a.reshape(-1, a.shape[-1]))
            diag.update(batch if plan.fisher == "empirical" else dataclasses.replace(batch, gradients=batch.gradients[1:]))
            done = batch.index + 1
            if saved is not None and saved.due(done) and done < plan.num_batches:
                watch.check(name)  # never save progress past a non-finite batch
                saved.save(done, sums)
            progress.advance(len(batch.global_indices))
        # Before the all-reduce, as fit-factors does: the rank whose shard holds the NaN names its examples, and the
        # others stop with a lost-peer error; and before the bar stops, so that a failed pass leaves no finished bar.
        watch.check(name)
    finally:
        progress.stop()  # also on errors and Ctrl-C, so the terminal is clean for the message
    for t in [*grad_sum.values(), *diag.sums.values(), diag.count]:
        plan.all_reduce(t)
    count = float(diag.count)
    if count == 0:  # pragma: no cover - load_dataset refuses empty datasets
        raise NumericalError(f"{name}: no examples were streamed")
    means, diagonals = {}, {}
    for tm in tracked:
        lf64 = factors[tm.name].to(device, torch.float64)
        means[tm.name] = lf64.rotate(grad_sum[tm.name].double() / count).cpu()
        diagonals[tm.name] = (diag.sums[tm.name].double() / count).cpu()
        if not (bool(torch.isfinite(means[tm.name]).all()) and bool(torch.isfinite(diagonals[tm.name]).all())):
            raise NumericalError(
                f"{name}: non-finite mean gradient or Fisher diagonal in layer {tm.name!r}", hint="nothing was written"
            )
    return DatasetStatistics(means, diagonals, int(count))


# ----------------------------------------------------------------------------- the matrices


def inverse_curvature(lf: LayerFactors, damping: float, shape: tuple[int, int]) -> torch.Tensor:
    """1 / (Λ* + λ) [d_out, d_in] in float64 (ones for the identity strategy); with λ = 0 the
    pseudo-inverse, as compute-scores uses (`LayerFactors.inverse_eigenvalues`)."""
    if lf.eigenvalues is None:
        return torch.ones(shape, dtype=torch.float64)
    inverse = lf.inverse_eigenvalues(damping, 1, torch.float64)  # float64 throughout: 1/(Λ+λ) can pass float32's max
    assert inverse is not None
    return inverse.cpu()


def fisher_kernel(
    stats: list[DatasetStatistics], inverse: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """K [S, S] = Σ_layers X_l diag(1/(Λ*+λ)) X_lᵀ with X_l [S, d_out·d_in] the stacked M̃_S; also each layer's part."""
    per_layer = {}
    for name, inv in inverse.items():
        x = torch.stack([s.mean_gradient[name].reshape(-1) for s in stats])
        per_layer[name] = (x * inv.reshape(-1)) @ x.T
    kernel = torch.stack(list(per_layer.values())).sum(0)
    return 0.5 * (kernel + kernel.T), per_layer


def normalize_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """K(S,T) / √(K(S,S) K(T,T)); 0 where a dataset's mean gradient is exactly zero.

    K is a Gram matrix, so the result lies in [-1, 1] with 1 on the diagonal (Cauchy-Schwarz);
    it is clamped there, so that rounding (1.0000000000000002) cannot leave it.
    """
    d = kernel.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(d, d)
    out = torch.where(denom > 0, kernel / denom.clamp_min(torch.finfo(kernel.dtype).tiny), torch.zeros_like(kernel)).clamp(-1.0, 1.0)
    out.diagonal().copy_((d > 0).to(out.dtype))
    return out


def noise_floor(dtype: torch.dtype) -> float:
    """Relative size below which a Fisher-diagonal entry is rounding noise for accumulators of `dtype`.

    A rotated gradient entry carries an absolute error of about eps·‖∇W‖, so its square
    one of about eps²·‖∇W‖², and ‖∇W‖² summed over a layer is the layer's Σ D.
    """
    return 1e3 * torch.finfo(dtype).eps ** 2


def task2vec_matrices(stats: list[DatasetStatistics], floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity [S, S] of the Fisher diagonals, and the Task2Vec normalized distance [S, S].

    d(S, T) = 1 − cos(D_S / (D_S + D_T), D_T / (D_S + D_T)) (Achille et al. 2019, sec. 3.3).
    The ratio is left out where D_S + D_T is at most `floor` × its sum over the layer:
    there both are zero up to rounding (e.g. the softmax's null direction of G) and
    their ratio would be noise.
    """
    layers = list(stats[0].fisher_diagonal)
    n = len(stats)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name in layers:
        x = torch.stack([s.fisher_diagonal[name].reshape(-1) for s in stats])
        gram += x @ x.T
    cosine = normalize_kernel(gram)
    distance = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            uv = uu = vv = torch.zeros((), dtype=torch.float64)
            for name in layers:
                u, v = stats[i].fisher_diagonal[name], stats[j].fisher_diagonal[name]
                total = u + v
                keep = total > floor * total.sum()
                u, v = u[keep] / total[keep], v[keep] / total[keep]
                uv, uu, vv = uv + u @ v, uu + u @ u, vv + v @ v
            denom = (uu * vv).sqrt()
            distance[i, j] = distance[j, i] = (1.0 - uv / denom).clamp(0.0, 1.0) if denom > 0 else 0.0  # rounding aside, in [0, 1]
    return cosine, distance


def compute_similarity(
    model: nn.Module,
    tracked: list[TrackedModule],
    factors: dict[str, LayerFactors],
    plans: dict[str, PassPlan],
    damping: dict[str, float],
    *,
    progress: Progress | None = None,
    keys: dict[str, str] | None = None,
    saved: DatasetsProgress | None = None,
    state: DistState | None = None,
) -> SimilarityResult:
    """Streams each dataset once and returns every similarity matrix between them.

    Args:
        factors: {layer: factors} from fit-factors (bases and Λ*).
        plans: {dataset name: PassPlan}; `plan.fisher` is the Fisher kind of the diagonal.
        damping: {layer: λ} added to Λ* in the kernel.
        keys: {dataset name: config key} named in errors (default: the name).
        saved: resumable progress: the datasets it finished are not streamed again; what its start lets go
            (`DatasetsProgress.replaced`) is removed once the first batches passed their checks.
        state: the ranks, which agree on the first-batch checks of the datasets to stream (`passes.check_first_batches`).
    """
    keys = keys or {}
    stats = [_from_tensors(t) for t in saved.finished] if saved is not None else []
    streamed = list(plans.items())[len(stats) :]  # each dataset's first batch before any pass (`passes.check_first_batches`)
    check_first_batches([lambda n=n, plan=plan: _stream(model, tracked, plan, keys.get(n, n)) for n, plan in streamed], state)
    if saved is not None:  # what its start lets go, on every rank once every rank's first batches passed
        saved.remove_replaced()
    for i, (n, plan) in enumerate(plans.items()):
        if i < len(stats):
            continue
        stats.append(dataset_statistics(model, tracked, factors, plan, name=keys.get(n, n), title=n, progress=progress, saved=saved))
        if saved is not None:
            saved.finish(_as_tensors(stats[-1]), more=i + 1 < len(plans))
    inverse = {tm.name: inverse_curvature(factors[tm.name], damping[tm.name], (tm.d_out, tm.d_in)) for tm in tracked}
    kernel, per_layer = fisher_kernel(stats, inverse)
    # rounding comes from the accumulators and from the bases as stored (float32 files, also for float64 models)
    dtypes = {accumulator_dtype(model)} | {
        basis.dtype for lf in factors.values() for basis in (lf.a_eigenvectors, lf.g_eigenvectors) if basis is not None
    }
    cosine, distance = task2vec_matrices(stats, max(noise_floor(d) for d in dtypes))
    return SimilarityResult(list(plans), stats, kernel, normalize_kernel(kernel), cosine, distance, per_layer, inverse)


# ----------------------------------------------------------------------------- the command's core


def _finished_report(path: Path, method: str, meta: dict[str, Any]) -> SimilarityReport:
    """The report of a finished similarity file, with `method` as its headline."""
    names = ["kernel", "kernel_normalized", "task2vec_cosine", "task2vec_distance"]
    tensors, _ = storage.load_tensors(path, storage.SIMILARITY_FORMAT, keys=names)
    return SimilarityReport(
        path, method, list(meta["names"]), [int(n) for n in meta["sizes"]], *(tensors[k] for k in names),
        dict(meta["damping"]), meta["strategy"], meta["fisher"], meta["factors_fisher"], from_file=True,
    )  # fmt: skip


def _flat(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layers' [d_out, d_in] tensors flattened row-major and concatenated in order, as float32."""
    return torch.cat([t.reshape(-1) for t in parts.values()]).float()


@storage.guards_output_dir("similarity", reads="factors")
def dataset_similarity(
    cfg: Config,
    *,
    method: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    state: DistState | None = None,
    progress: Progress | None = None,
) -> SimilarityReport:
    """Compares the datasets of `similarity.datasets` and writes `<output_dir>/similarity.safetensors`.

    Needs the factors of fit-factors for this model (any training set). The file holds
    `kernel`, `kernel_normalized`, `task2vec_cosine`, `task2vec_distance` ([S, S]),
    `kernel_layer.<layer>` ([S, S] per layer), per dataset `embedding.<name>` (M̃_S
    flattened, layers concatenated) and `fisher_diagonal.<name>` (D_S, same layout),
    and `inverse_curvature` (1/(Λ*+λ), same layout), so that K(S,T) =
    Σ embedding.S · embedding.T · inverse_curvature.

    Raises:
        ConfigError: fewer than two datasets.
        OutputError: no factors; factors of another model, layers, strategy or Fisher kind
            (the datasets need not be the factors' training set); the output exists, of other
            settings, without `overwrite`; progress of an interrupted run without `resume` or
            `overwrite`, or of other settings. A finished result of the same settings is read, not
            recomputed (`from_file`), whatever the `method`, with a warning when its factors were refitted
            since with the same settings (`fit.warn_of_refit`); `resume` continues an interrupted
            run from its last saved progress (every `factors.checkpoint_every` batches, and after
            each dataset).
    """
    t_start = time.perf_counter()
    method = method or cfg.similarity.method
    if method not in SIMILARITY_METHODS:
        raise UsageError(f"--method: expected one of {', '.join(SIMILARITY_METHODS)}, got {method!r}")
    specs = cfg.similarity.datasets
    if len(specs) < 2:
        raise ConfigError(
            f"similarity.datasets: needs two or more named datasets, got {len(specs)}",
            source=cfg.source,
            hint="name two or more data specs (the keys of data.train) under similarity.datasets, such as "
            "similarity: {datasets: {train: <data.train's keys>, query: <data.query's keys>}} (README, \"Your own model and data\")",
        )
    out_dir = cfg.output_path
    path = out_dir / storage.SIMILARITY_FILE
    factors_path = cfg.factors_path / storage.FACTORS_FILE
    ctx = prepare(cfg, state)
    # matched to the model first (metadata only: factors of another model are refused for that, the more useful message,
    # before a page of them is read), then every layer checked to be finite
    factors = load_factors(factors_path, match=lambda f: check_factors_match(f, ctx, factors_path, same_kind=True))
    if cfg.scores.checkpoints:
        notices.warn(f"dataset-similarity: only model.checkpoint is compared with, not the {len(cfg.scores.checkpoints)} model(s) of scores.checkpoints")
    measured = cfg.task.measurement != "loss"  # margin, or the user's own function
    ignored = [k for k, used in ((f"task.measurement: {cfg.task.measurement}", measured), ("scores.relative: true", cfg.scores.relative)) if used]
    if ignored:  # compute-scores' settings in a shared config: said, so that nobody reads a margin (or custom) kernel into the table
        notices.warn(f"dataset-similarity: the kernel compares the datasets' mean loss gradients with plain scores; {' and '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} to compute-scores only")
    storage.ensure_writable_dir(out_dir)
    keys = {name: f"similarity.datasets.{name}" for name in specs}
    datasets = {name: ctx.dataset(spec, keys[name]) for name, spec in specs.items()}
    fisher = cfg.similarity.fisher or factors.fisher  # the Task2Vec diagonals' Fisher; the kernel uses the factors
    plans = {name: dataclasses.replace(plan_for(ctx, ds), fisher=fisher) for name, ds in datasets.items()}
    # from the values as stored, so that λ (and the result's key) is the same whichever device runs the passes
    damping = layer_damping(factors.layers, cfg.scores.damping, cfg.scores.damping_factor, cfg.scores.damping_scope)
    result_fields = {  # what the matrices are of (not the headline --method: both are saved)
        "model": ctx.model_fingerprint, "definition": ctx.model_definition, "factors": factors.metadata.get("result_key"),
        "datasets": {n: ds.fingerprint() for n, ds in datasets.items()}, "fisher": fisher, "damping": damping,
        "amp": cfg.factors.amp, "seed": cfg.seed if fisher == "sampled" else None,  # the passes' precision; sampled labels
    }  # fmt: skip
    recorded = finished_result(path, result_fields, "a similarity result", storage.SIMILARITY_FORMAT, overwrite=overwrite, names={"fisher": "similarity.fisher"})
    if recorded is not None:
        clear_progress_of_finished(ctx.state, out_dir, storage.SIMILARITY_PARTIAL, outputs=[path])  # a kill right after the final rename
        warn_of_refit(path, "a similarity result", factors_path, recorded.get("factors_created"), factors.metadata.get("created"), "dataset-similarity")
        return _finished_report(path, method, recorded)
    st = ctx.state
    # the progress of the factors written then: a refit of the same settings since (the same result key) is refused by --resume
    # (its name in `resume._NAMES`), so that no datasets of the old factors are combined with ones of the new
    progress_fields = result_fields | {"factors_created": factors.metadata.get("created")}
    # the old result and progress go once the first batches passed their checks (`compute_similarity`)
    saved = DatasetsProgress.start(
        path, storage.SIMILARITY_PARTIAL, st, progress_fields, list(plans), batch_size=cfg.data.batch_size, every=cfg.factors.checkpoint_every,
        resume=resume, overwrite=overwrite, names={"fisher": "similarity.fisher"},
    )  # fmt: skip
    resumed_from = saved.resumed_from(list(plans), st)
    progress = for_rank(progress, st.rank, st.world_size)
    factors = factors.to(ctx.device)  # off the CPU, nothing is left of the file's memory map: its pages are not kept resident
    layers = factors.layers
    t0 = time.perf_counter()
    result = compute_similarity(ctx.model, ctx.tracked, layers, plans, damping, progress=progress, keys=keys, saved=saved, state=st)
    seconds = {"passes": time.perf_counter() - t0}
    names = result.names
    sizes = [s.num_examples for s in result.statistics]
    if ctx.state.is_main:
        tensors = {
            "kernel": result.kernel,
            "kernel_normalized": result.kernel_normalized,
            "task2vec_cosine": result.task2vec_cosine,
            "task2vec_distance": result.task2vec_distance,
            "inverse_curvature": _flat(result.inverse_curvature),
        }
        tensors |= {f"kernel_layer.{k}": v for k, v in result.layer_kernels.items()}
        for name, s in zip(names, result.statistics, strict=True):
            tensors[f"embedding.{name}"] = _flat(s.mean_gradient)
            tensors[f"fisher_diagonal.{name}"] = _flat(s.fisher_diagonal)
        offset, layout = 0, []
        for tm in ctx.tracked:
            layout.append({"name": tm.name, "shape": [tm.d_out, tm.d_in], "offset": offset})
            offset += tm.d_out * tm.d_in
        storage.save_tensors(
            path,
            tensors,
            {
                storage.FORMAT_KEY: storage.SIMILARITY_FORMAT,
                **ctx.provenance({"similarity.method": method}),  # --method
                "method": method,
                "names": names,
                "sizes": sizes,
                "dataset_fingerprints": {n: ds.fingerprint() for n, ds in datasets.items()},
                "strategy": factors.strategy,
                "fisher": fisher,
                "factors_fisher": factors.fisher,
                "damping": damping,
                "layout": layout,
                "model_fingerprint": ctx.model_fingerprint,
                "factors_dataset_fingerprint": factors.metadata.get("dataset_fingerprint", ""),
                "factors_created": factors.metadata.get("created"),  # a refit of the same settings is warned of when it is shown again
                "result_key": run_key(result_fields),
                "result": result_fields,
            },
        )
    st.barrier()
    saved.clear()
    seconds["total"] = time.perf_counter() - t_start
    return SimilarityReport(
        path,
        method,
        names,
        sizes,
        result.kernel,
        result.kernel_normalized,
        result.task2vec_cosine,
        result.task2vec_distance,
        damping,
        factors.strategy,
        fisher,
        factors.fisher,
        seconds,
        resumed_from=resumed_from,
    )
