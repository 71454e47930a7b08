"""The linear datamodeling score (LDS) of influence_cli (and Kronfluence) on real MNIST.

    .venv-bench/bin/python benchmarks/lds.py [--subsets 100] [--retrain-seeds 3] [--jobs 2] [--skip-kronfluence] [--arch mlp|cnn]
                                              [--train 5000] [--queries 100] [--out benchmarks/results/lds]

Setup (Park et al. 2023, TRAK; the LDS of Bae et al. 2024): an MLP 784-128-128-10 trained
with the benchmarks' seeded recipe (10 epochs, Adam 1e-3, batch 64, seed 0) on MNIST
test-split images 0..4999 (../shared/data/mnist); 100 queries, images 9000..9099; the
measurement is the margin (correct logit minus log-sum-exp of the others).

Ground truth: `--subsets` random halves S_k of the training set (seeded), the same recipe
retrained on each with `--retrain-seeds` training seeds, every query's margin averaged over
the seeds (one seed's margins correlate only ~0.8 with the average: seed noise). Cached per
seed in benchmarks/results/lds/ground_truth_seed<r>.safetensors, so reruns only re-score
(more subsets or seeds extend it).

Prediction: the group influence of S_k on query q is the sum of the scores of S_k's examples.
influence_cli's scores are for minus the margin with "positive = helpful", i.e. an example
with a positive score raises the margin, so the predicted margin rises with the sum. The LDS of
a method is the mean over queries of the Spearman correlation, across subsets, between
predicted group influence and actual margin.

Methods: identity, K-FAC and EKFAC, plain and relative (RelatIF), `auto` damping per layer
(the default) and model-wide (`scores.damping_scope: model`), with the sampled (true) Fisher
(the default) and the `ggn` Fisher; Kronfluence's EKFAC (true Fisher) at its default damping
(1e-8) and over a damping sweep; and an ensemble of 5 models (seeds 0..4, `scores.checkpoints`)
against the single model.

`--arch cnn` runs the same protocol with a small CNN (conv 8 and 16 channels, 3×3, max-pooling,
then a 64-unit linear layer and the head; the same recipe) on [1, 28, 28] images, cached in
benchmarks/results/lds_cnn/, so that the damping and Fisher choices are checked on conv layers too.

`--train`, `--queries` and `--out` (where the models, the ground truth and the runs are kept) make a
quick run of the script, e.g. `--train 200 --queries 5 --subsets 4 --retrain-seeds 1 --skip-ensemble --out /tmp/lds`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from field_common import (
    RECIPE,
    RESULTS,
    Timer,
    as_inputs,
    idx_spec,
    model_kwargs,
    new_model,
    rowwise_spearman,
    train_seeded,
    trained_checkpoint,
)
from kronfluence_task import kronfluence_missing
from mnist_common import IMAGES, ROOT, header, load_mnist

ARCH = "mlp"  # --arch: mlp | cnn (set in main)
OUT = RESULTS / "lds"  # RESULTS / "lds_<arch>" for other architectures
N_TRAIN = 5000
QUERIES = (9000, 9100)
ENSEMBLE_SEEDS = (0, 1, 2, 3, 4)
KRONFLUENCE_DAMPINGS: tuple[float | None, ...] = (1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, None)


# ----------------------------------------------------------------------------- ground truth


def margins(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct logit minus log-sum-exp of the others, per example: [n]."""
    from influence_cli.task import per_example_measurement

    with torch.no_grad():
        return -per_example_measurement(model(x), y, "classification", "margin")


_DATA: dict[str, torch.Tensor] = {}


def _init_worker(arch: str, n_train: int, queries: tuple[int, int]) -> None:
    global ARCH, N_TRAIN, QUERIES
    ARCH, N_TRAIN, QUERIES = arch, n_train, queries
    torch.set_num_threads(1)
    x, y = load_mnist(0, N_TRAIN)
    xq, yq = load_mnist(*QUERIES)
    _DATA.update(x=x, y=y, xq=as_inputs(xq, arch), yq=yq)


def _retrain(job: tuple[list[int], int]) -> torch.Tensor:
    """Query margins of the recipe retrained on one subset (a worker process)."""
    keep, seed = job
    idx = torch.tensor(keep)
    model = train_seeded(_DATA["x"][idx], _DATA["y"][idx], seed=seed, arch=ARCH)
    return margins(model, _DATA["xq"], _DATA["yq"])


def ground_truth(n_subsets: int, jobs: int, retrain_seeds: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(masks [S, N] bool, margins [S, Q], seconds spent retraining now).

    Subset k is the same half whatever the count (one seeded sequence); its margins are the mean
    over `retrain_seeds` retrainings (training seeds 0, 1, ...). Each seed's margins are cached in
    ground_truth_seed<r>.safetensors; only missing (subset, seed) pairs are retrained.
    """
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, N_TRAIN, dtype=torch.bool)
    for k in range(n_subsets):
        masks[k, torch.randperm(N_TRAIN, generator=gen)[: N_TRAIN // 2]] = True
    cached = [_cached_margins(r, seed) for r in range(retrain_seeds)]
    todo = [(k, r) for r in range(retrain_seeds) for k in range(len(cached[r]), n_subsets)]
    t0 = time.perf_counter()
    if todo:
        ctx = torch.multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(ARCH, N_TRAIN, QUERIES), mp_context=ctx) as pool:
            new = list(pool.map(_retrain, [(masks[k].nonzero().flatten().tolist(), r) for k, r in todo]))
        for r in range(retrain_seeds):
            extra = [m for (k, rr), m in zip(todo, new, strict=True) if rr == r]
            if extra:
                cached[r] = torch.cat([cached[r], torch.stack(extra)])
                _save_margins(r, seed, masks[: len(cached[r])], cached[r])
    seconds = time.perf_counter() - t0
    return masks, torch.stack([c[:n_subsets] for c in cached]).mean(0), seconds


def _cache_path(retrain_seed: int) -> Path:
    return OUT / f"ground_truth_seed{retrain_seed}.safetensors"


def _cached_margins(retrain_seed: int, seed: int) -> torch.Tensor:
    """The cached margins [S, Q] of one training seed (empty when absent or of another setup)."""
    from influence_cli import storage

    path = _cache_path(retrain_seed)
    if path.is_file():
        tensors, meta = storage.load_tensors(path)
        if meta.get("setup") == _setup_key(seed):
            return tensors["margins"]
    return torch.zeros(0, QUERIES[1] - QUERIES[0])


def _save_margins(retrain_seed: int, seed: int, masks: torch.Tensor, margins: torch.Tensor) -> None:
    from influence_cli import storage

    storage.save_tensors(_cache_path(retrain_seed), {"masks": masks, "margins": margins}, {"setup": _setup_key(seed)})


def _setup_key(seed: int) -> str:
    from field_common import RECIPE

    setup = {"n_train": N_TRAIN, "queries": QUERIES, "recipe": [RECIPE.epochs, RECIPE.batch_size, RECIPE.lr], "seed": seed, "init": "per training seed"}
    return json.dumps(setup if ARCH == "mlp" else setup | {"arch": ARCH, "kwargs": model_kwargs(ARCH)})


def lds_per_query(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """Spearman(Σ_{x∈S_k} score[q, x], margin_k[q]) across subsets k, for every query q: [Q]."""
    predicted = masks.double() @ scores.double().T  # [S, Q]
    return rowwise_spearman(predicted.T, actual.double().T)


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> float:
    """The LDS: the mean over queries of `lds_per_query`."""
    return float(lds_per_query(scores, masks, actual).mean())


# ----------------------------------------------------------------------------- scores


def our_config(name: str, strategy: str, fisher: str, members: list[Path] | None = None, amp: str = "none") -> dict:
    return {
        "model": {"architecture": ARCH, "kwargs": model_kwargs(ARCH), "checkpoint": str(OUT / f"{ARCH}_seed0.safetensors")},
        "task": {"kind": "classification", "measurement": "margin"},
        "data": {"train": idx_spec(0, N_TRAIN, ARCH), "query": idx_spec(*QUERIES, ARCH), "batch_size": 256},
        "factors": {"strategy": strategy, "fisher": fisher, "amp": amp},
        "scores": {"checkpoints": [str(p) for p in members or []]},
        "output_dir": str(OUT / "runs" / name),
        "device": "cpu",
    }


SCOPES = ("layer", "model")


def our_scores(strategy: str, fisher: str, members: list[Path] | None = None, amp: str = "none") -> dict[tuple[str, bool], torch.Tensor]:
    """{(damping scope, relative): scores [Q, N]} of influence_cli: one fit-factors, then compute-scores per variant."""
    from influence_cli.config import config_from_dict
    from influence_cli.fit import fit_factors
    from influence_cli.scores import compute_scores
    from influence_cli.storage import SCORES_FILE, load_tensors

    name = f"{strategy}_{fisher}" + (f"_ensemble{1 + len(members)}" if members else "") + ("" if amp == "none" else f"_{amp}")
    base = our_config(name, strategy, fisher, members, amp)
    if strategy != "identity":
        fit_factors(config_from_dict(base, base_dir=ROOT), overwrite=True)
    out = {}
    for scope in SCOPES if strategy != "identity" else SCOPES[:1]:
        for relative in (False, True):
            cfg = config_from_dict(base, [f"scores.damping_scope={scope}", f"scores.relative={str(relative).lower()}"], base_dir=ROOT)
            compute_scores(cfg, overwrite=True)
            out[scope, relative] = load_tensors(cfg.output_path / SCORES_FILE)[0]["scores"]
    return out


def kronfluence_scores() -> dict[str, torch.Tensor]:
    """Kronfluence's EKFAC scores (true Fisher, margin measurement) for every damping of the sweep (one fit)."""
    from kronfluence_task import run_kronfluence

    from influence_cli.models import load_checkpoint

    model = new_model(0, ARCH)
    load_checkpoint(model, OUT / f"{ARCH}_seed0.safetensors")
    (x, y), (xq, yq) = load_mnist(0, N_TRAIN), load_mnist(*QUERIES)
    train, query = (as_inputs(x, ARCH), y), (as_inputs(xq, ARCH), yq)
    out: dict[str, torch.Tensor] = {}
    factors = None
    for damping in KRONFLUENCE_DAMPINGS:
        run = run_kronfluence(model, train, query, OUT / "kronfluence", damping=damping, measurement="margin", factors=factors)
        factors = "ekfac_sampled"
        out["None (0.1·mean Λ per layer)" if damping is None else f"{damping:g}"] = run.scores
    return out


# ----------------------------------------------------------------------------- the report


def main() -> None:
    global ARCH, OUT, N_TRAIN, QUERIES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=int, default=100, help="Random half subsets retrained (>= 50).")
    parser.add_argument("--retrain-seeds", type=int, default=3, help="Trainings per subset (seeds 0, 1, ...) whose margins are averaged.")
    parser.add_argument("--jobs", type=int, default=2, help="Retraining processes (1 thread each).")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--skip-ensemble", action="store_true")
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp", help="The model: the MLP (default) or the small CNN.")
    parser.add_argument("--train", type=int, default=N_TRAIN, help="Training images [0, N).")
    parser.add_argument("--queries", type=int, default=QUERIES[1] - QUERIES[0], help="Queries: images 9000 on.")
    parser.add_argument("--out", type=Path, default=None, help="Folder of the models, ground truth and runs (default: benchmarks/results/lds[_<arch>]).")
    args = parser.parse_args()
    ARCH, N_TRAIN, QUERIES = args.arch, args.train, (QUERIES[0], QUERIES[0] + args.queries)
    OUT = args.out or RESULTS / ("lds" if args.arch == "mlp" else f"lds_{args.arch}")
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES} (set INFLUENCE_MNIST_DIR)")
    missing = "--skip-kronfluence was given" if args.skip_kronfluence else kronfluence_missing()
    if missing:
        print(f"NOTE: Kronfluence's LDS skipped: {missing}", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seeds = ENSEMBLE_SEEDS if not args.skip_ensemble else ENSEMBLE_SEEDS[:1]
    checkpoints, accuracies = [], []
    with Timer() as t_models:
        for s in seeds:
            path, acc = trained_checkpoint(OUT / f"{ARCH}_seed{s}.safetensors", N_TRAIN, seed=s, arch=ARCH)
            checkpoints.append(path)
            accuracies.append(acc)
    masks, actual, retrain_seconds = ground_truth(args.subsets, args.jobs, args.retrain_seeds)
    results: dict = {"subsets": len(masks), "accuracy": accuracies, "retrain_seconds": retrain_seconds}

    per_query: dict[str, torch.Tensor] = {}  # label -> LDS of every query [Q]

    def record(label: str, scores: torch.Tensor) -> float:
        per_query[label] = lds_per_query(scores, masks, actual)
        return float(per_query[label].mean())

    rows: list[tuple[str, str, str, str]] = []  # strategy, fisher, damping, key prefix
    with Timer() as t_ours:
        for strategy, fisher in (("identity", "sampled"), ("kfac", "sampled"), ("ekfac", "sampled"), ("kfac", "ggn"), ("ekfac", "ggn")):
            got = our_scores(strategy, fisher)
            for (scope, relative), scores in got.items():
                record(f"{strategy}/{fisher}/{scope}/{'relative' if relative else 'plain'}", scores)
            for scope in [s for s in SCOPES if (s, False) in got]:
                rows.append((strategy, "—" if strategy == "identity" else fisher, "—" if strategy == "identity" else f"auto, {scope}",
                             f"{strategy}/{fisher}/{scope}"))
        for (scope, relative), scores in our_scores("ekfac", "sampled", amp="bfloat16").items():
            record(f"ekfac-bf16/sampled/{scope}/{'relative' if relative else 'plain'}", scores)
        rows += [("ekfac, `factors.amp: bfloat16`", "sampled", f"auto, {scope}", f"ekfac-bf16/sampled/{scope}") for scope in SCOPES]
    ensemble_rows = []
    if not args.skip_ensemble:
        with Timer() as t_ens:
            for fisher in ("sampled", "ggn"):
                for (scope, relative), scores in our_scores("ekfac", fisher, checkpoints[1:]).items():
                    record(f"ensemble/{fisher}/{scope}/{'relative' if relative else 'plain'}", scores)
                ensemble_rows += [(fisher, scope) for scope in SCOPES]
        results["ensemble_seconds"] = t_ens.seconds
    kf: dict[str, float] = {}
    if not missing:
        with Timer() as t_kf:
            for name, scores in kronfluence_scores().items():
                kf[name] = record(f"kronfluence/{name}", scores)
        results["kronfluence_seconds"] = t_kf.seconds
    results.update(lds={k: float(v.mean()) for k, v in per_query.items()}, ours_seconds=t_ours.seconds, model_seconds=t_models.seconds)
    results["seconds_total"] = time.perf_counter() - t_start

    def mean(label: str) -> float:
        return float(per_query[label].mean())

    def diff(a: str, b: str) -> str:
        """Mean paired difference over queries ± its standard error."""
        d = per_query[a] - per_query[b]
        return f"{float(d.mean()):+.4f} ± {float(d.std() / len(d) ** 0.5):.4f}"

    q = QUERIES[1] - QUERIES[0]
    model_name = "MLP 784-128-128-10" if ARCH == "mlp" else f"CNN (conv {model_kwargs(ARCH)['channels']} channels, fc {model_kwargs(ARCH)['fc_dim']})"
    lines = [
        header(),
        "",
        f"{model_name}, {N_TRAIN:,} training images (test accuracy {accuracies[0]:.3f}), {q} queries, margin measurement; "
        f"{len(masks)} random half subsets, each retrained {args.retrain_seeds}× (seeds 0..{args.retrain_seeds - 1}, "
        f"{RECIPE.epochs} epochs) and the margins averaged. LDS = mean over queries of the Spearman correlation across subsets "
        "(higher is better); differences are paired over queries (± standard error).",
        "",
        "| tool | strategy | Fisher | damping | LDS (plain) | LDS (relative) |",
        "|---|---|---|---|---:|---:|",
    ]
    for strategy, fisher, damping, key in rows:
        lines.append(f"| influence_cli | {strategy} | {fisher} | {damping} | {mean(key + '/plain'):.4f} | {mean(key + '/relative'):.4f} |")
    default = "ekfac/sampled/layer/plain"
    if kf:
        best = max((k for k in kf if k != "1e-08"), key=kf.get)
        version = _kf_version()
        lines.append(f"| Kronfluence {version} | ekfac | sampled | 1e-8 (its default) | {kf['1e-08']:.4f} | |")
        lines.append(f"| Kronfluence {version} | ekfac | sampled | {best} (best of the sweep) | {kf[best]:.4f} | |")
        lines += [
            "",
            "Kronfluence's damping sweep (EKFAC, true Fisher): " + ", ".join(f"{k}: {v:.4f}" for k, v in kf.items()) + ".",
            "",
            "| influence_cli setting | LDS | minus Kronfluence's best | goal (≥ 0) |",
            "|---|---:|---:|---|",
        ]
        for label, key in (
            ("defaults (ekfac, sampled, auto per layer)", default),
            ("fisher: ggn", "ekfac/ggn/layer/plain"),
            ("damping_scope: model", "ekfac/sampled/model/plain"),
            ("fisher: ggn + damping_scope: model", "ekfac/ggn/model/plain"),
        ):
            gap = diff(key, f"kronfluence/{best}")
            lines.append(f"| {label} | {mean(key):.4f} | {gap} | {'met' if mean(key) >= kf[best] else 'missed'} |")
    lines += ["", f"bfloat16 against float32 (defaults otherwise): {diff('ekfac-bf16/sampled/layer/plain', default)} LDS."]
    if ensemble_rows:
        lines += [
            "",
            f"Ensemble of {len(seeds)} models (seeds {', '.join(map(str, seeds))}, each trained on the full training set with the "
            "same recipe, each with its own EKFAC factors; `scores.checkpoints`), against the single model (seed 0), same ground truth:",
            "",
            "| Fisher | damping | single model | ensemble of 5 | gain (goal ≥ +0.05) | single, relative | ensemble, relative |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for fisher, scope in ensemble_rows:
            one, ens = f"ekfac/{fisher}/{scope}", f"ensemble/{fisher}/{scope}"
            lines.append(
                f"| {fisher} | auto, {scope} | {mean(one + '/plain'):.4f} | {mean(ens + '/plain'):.4f} | **{diff(ens + '/plain', one + '/plain')}** | "
                f"{mean(one + '/relative'):.4f} | {mean(ens + '/relative'):.4f} |"
            )
    lines += [
        "",
        f"Wall time: {results['seconds_total'] / 60:.1f} min (retraining {retrain_seconds:.0f} s this run, cached afterwards; "
        f"models {t_models.seconds:.0f} s; influence_cli fits and scores {t_ours.seconds:.0f} s"
        + (f"; ensembles {results['ensemble_seconds']:.0f} s" if "ensemble_seconds" in results else "")
        + (f"; Kronfluence {results['kronfluence_seconds']:.0f} s" if "kronfluence_seconds" in results else "")
        + ").",
    ]
    (OUT / "lds.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


def _kf_version() -> str:
    from kronfluence_task import kronfluence_version

    return kronfluence_version()


if __name__ == "__main__":
    main()
