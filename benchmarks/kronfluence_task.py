"""Kronfluence 1.0.x on the benchmarks' classification workload, with influence_cli's conventions.

Benchmark-only: kronfluence is the optional `bench` extra (`make bench-install`), never
imported by influence_cli or its tests. Everything here imports it lazily;
`kronfluence_missing()` says why it cannot run.

Conventions matched to influence_cli (checked against kronfluence 1.0.1's source):
- losses are summed over the batch (`reduction="sum"`), so per-sample gradients are the
  gradients of per-example losses, as in influence_cli;
- the true Fisher: `compute_train_loss(sample=True)` draws labels from softmax(logits)
  (torch.multinomial; other draws than influence_cli's counter-based sampler, so the two
  agree only in expectation); the empirical Fisher: `use_empirical_fisher=True`;
- the measurement is the summed loss, or minus the margin (TRAK's margin, as in
  Kronfluence's own examples): Kronfluence's pairwise score is ∇f(z)ᵀ(F + λ)⁻¹∇L(x), so with
  f = loss or −margin a positive score means "helpful", influence_cli's sign;
- damping: ScoreArguments.damping_factor is an absolute λ added to every layer's
  Λ (default 1e-8), or None for 0.1 × mean(Λ) per layer — influence_cli's `auto`;
- float32 covariances, Λ and scores, float64 eigendecomposition (Kronfluence's defaults).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


def kronfluence_missing() -> str | None:
    """None when kronfluence 1.0.x can be imported, else the reason and the way to install it."""
    try:
        import kronfluence
    except ImportError:
        return "kronfluence is not installed: run `make bench-install` (or `pip install -e '.[bench]'`) and use .venv-bench/bin/python"
    version = getattr(kronfluence, "__version__", "?")
    if not version.startswith("1.0."):
        return f"kronfluence {version} is installed; these benchmarks were written for 1.0.x"
    return None


def kronfluence_version() -> str:
    import kronfluence

    return kronfluence.__version__


def make_task(measurement: str = "loss"):
    """A kronfluence Task for [B, C]-logit classification with a summed cross-entropy loss."""
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
            inputs, labels = batch
            logits = model(inputs)
            if measurement == "loss":
                return F.cross_entropy(logits, labels, reduction="sum")
            rows = torch.arange(logits.shape[0], device=logits.device)
            correct = logits[rows, labels]
            others = logits.clone()
            others[rows, labels] = -torch.inf
            return -(correct - others.logsumexp(dim=-1)).sum()

    return ClassificationTask()


@dataclass
class KronfluenceRun:
    """Scores [n_query, n_train] and wall seconds per phase of one Kronfluence run."""

    scores: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)


def _factor_args(strategy: str, empirical: bool, low_precision: bool):
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.common.factor_arguments import smart_low_precision_factor_arguments

    args = smart_low_precision_factor_arguments(strategy) if low_precision else FactorArguments(strategy=strategy)
    args.use_empirical_fisher = empirical
    return args


def _score_args(damping: float | None, low_precision: bool):
    from kronfluence.arguments import ScoreArguments
    from kronfluence.utils.common.score_arguments import smart_low_precision_score_arguments

    return smart_low_precision_score_arguments(damping_factor=damping) if low_precision else ScoreArguments(damping_factor=damping)


def run_kronfluence(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    out_dir: Path,
    *,
    strategy: str = "ekfac",
    empirical: bool = False,
    damping: float | None = 1e-8,
    measurement: str = "loss",
    batch_size: int = 256,
    query_batch_size: int | None = None,
    factors: str | None = None,
    seed: int = 0,
    cpu: bool = True,
    low_precision: bool = False,
) -> KronfluenceRun:
    """Fits Kronfluence's factors on `train` and scores every (query, train) pair (on the CPU unless `cpu=False`).

    Args:
        model: The trained model (deep-copied: prepare_model wraps its layers in place).
        train, query: (inputs, labels) tensors.
        out_dir: Kronfluence's output_dir (factors and scores are written there, as it always does).
        damping: ScoreArguments.damping_factor: absolute λ, or None for 0.1 × mean(Λ) per layer.
        query_batch_size: Queries preconditioned together (None = all at once: one pass over train).
        factors: Reuse the factors of this name (already fitted in `out_dir`) instead of fitting.
        seed: torch.manual_seed before fitting (the sampled Fisher's labels).
        low_precision: Kronfluence's own bf16 recipe (`smart_low_precision_factor_arguments` and
            `smart_low_precision_score_arguments`: bf16 autocast, covariances, per-sample gradients
            and scores; float32 Λ and preconditioning), the counterpart of `factors.amp: bfloat16`.
    """
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    task = make_task(measurement)
    wrapped = prepare_model(copy.deepcopy(model).eval(), task)
    analyzer = Analyzer("bench", wrapped, task, cpu=cpu, disable_tqdm=True, output_dir=str(out_dir), log_level=logging.WARNING)
    seconds: dict[str, float] = {}
    name = factors or f"{strategy}_{'empirical' if empirical else 'sampled'}"
    if factors is None:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name=name,
            dataset=TensorDataset(*train),
            per_device_batch_size=batch_size,
            factor_args=_factor_args(strategy, empirical, low_precision),
            overwrite_output_dir=True,
        )
        seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name=f"scores_{name}",
        factors_name=name,
        query_dataset=TensorDataset(*query),
        train_dataset=TensorDataset(*train),
        per_device_query_batch_size=query_batch_size or len(query[0]),
        per_device_train_batch_size=batch_size,
        score_args=_score_args(damping, low_precision),
        overwrite_output_dir=True,
    )
    seconds["scores"] = time.perf_counter() - t0
    scores = analyzer.load_pairwise_scores(f"scores_{name}")["all_modules"]
    return KronfluenceRun(scores.float(), seconds)
