"""The linear datamodeling score (LDS) of influence_cli (and Kronfluence) on real MNIST.

    .venv-bench/bin/python benchmarks/lds.py [--subsets 100] [--jobs 2] [--skip-kronfluence]

Setup (Park et al. 2023, TRAK; the LDS of Bae et al. 2024): an MLP 784-128-128-10 trained
with the benchmarks' seeded recipe (10 epochs, Adam 1e-3, batch 64, seed 0) on MNIST
test-split images 0..4999 (../shared/data/mnist); 100 queries, images 9000..9099; the
measurement is the margin (correct logit minus log-sum-exp of the others).

Ground truth: `--subsets` random halves S_k of the training set (seeded), the same recipe
retrained on each, every query's margin recorded. Cached in
benchmarks/results/lds/ground_truth.safetensors, so reruns only re-score (more subsets extend it).

Prediction: the group influence of S_k on query q is the sum of the scores of S_k's examples.
influence_cli's scores are for minus the margin with "positive = helpful", i.e. an example
with a positive score raises the margin, so the predicted margin rises with the sum. The LDS of
a method is the mean over queries of the Spearman correlation, across subsets, between
predicted group influence and actual margin.

Methods: identity, K-FAC and EKFAC, plain and relative (RelatIF), `auto` damping, with the
sampled (true) Fisher (the default) and the `ggn` Fisher; Kronfluence's EKFAC (true Fisher) at
its default damping (1e-8) and over a damping sweep; and an ensemble of 5 models (seeds 0..4,
`scores.checkpoints`) against the single model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from field_common import RESULTS, Timer, idx_spec, rowwise_spearman, train_mlp, trained_checkpoint
from kronfluence_task import kronfluence_missing
from mnist_common import IMAGES, MLP_KWARGS, ROOT, header, load_mnist

OUT = RESULTS / "lds"
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


def _init_worker() -> None:
    torch.set_num_threads(1)
    x, y = load_mnist(0, N_TRAIN)
    xq, yq = load_mnist(*QUERIES)
    _DATA.update(x=x, y=y, xq=xq, yq=yq)


def _retrain(job: tuple[list[int], int]) -> torch.Tensor:
    """Query margins of the recipe retrained on one subset (a worker process)."""
    keep, seed = job
    idx = torch.tensor(keep)
    model = train_mlp(_DATA["x"][idx], _DATA["y"][idx], seed=seed)
    return margins(model, _DATA["xq"], _DATA["yq"])


def ground_truth(n_subsets: int, jobs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(masks [S, N] bool, margins [S, Q], seconds spent retraining now), from the cache when it has enough subsets."""
    from influence_cli import storage

    path = OUT / "ground_truth.safetensors"
    masks, values = torch.zeros(0, N_TRAIN, dtype=torch.bool), torch.zeros(0, QUERIES[1] - QUERIES[0])
    if path.is_file():
        tensors, meta = storage.load_tensors(path)
        if meta.get("setup") == _setup_key(seed):
            masks, values = tensors["masks"], tensors["margins"]
    if len(masks) >= n_subsets:
        return masks[:n_subsets], values[:n_subsets], 0.0
    gen = torch.Generator().manual_seed(seed)
    all_masks = []
    for _ in range(n_subsets):  # the same sequence whatever the cache holds: subset k is always the same half
        m = torch.zeros(N_TRAIN, dtype=torch.bool)
        m[torch.randperm(N_TRAIN, generator=gen)[: N_TRAIN // 2]] = True
        all_masks.append(m)
    todo = list(range(len(masks), n_subsets))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
        new = list(pool.map(_retrain, [(all_masks[k].nonzero().flatten().tolist(), 0) for k in todo]))
    seconds = time.perf_counter() - t0
    masks = torch.stack(all_masks)
    values = torch.cat([values, torch.stack(new)]) if new else values
    storage.save_tensors(path, {"masks": masks, "margins": values}, {"setup": _setup_key(seed)})
    return masks, values, seconds


def _setup_key(seed: int) -> str:
    from field_common import RECIPE

    return json.dumps({"n_train": N_TRAIN, "queries": QUERIES, "recipe": [RECIPE.epochs, RECIPE.batch_size, RECIPE.lr], "seed": seed})


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean over queries of Spearman(Σ_{x∈S_k} score[q, x], margin_k[q]) across subsets k."""
    predicted = masks.double() @ scores.double().T  # [S, Q]
    return float(rowwise_spearman(predicted.T, actual.double().T).mean())


# ----------------------------------------------------------------------------- scores


def our_config(name: str, strategy: str, fisher: str, relative: bool = False, members: list[Path] | None = None) -> dict:
    return {
        "model": {"architecture": "mlp", "kwargs": MLP_KWARGS, "checkpoint": str(OUT / "mlp_seed0.safetensors")},
        "task": {"kind": "classification", "measurement": "margin"},
        "data": {"train": idx_spec(0, N_TRAIN), "query": idx_spec(*QUERIES), "batch_size": 256},
        "factors": {"strategy": strategy, "fisher": fisher},
        "scores": {"relative": relative, "checkpoints": [str(p) for p in members or []]},
        "output_dir": str(OUT / "runs" / name),
        "device": "cpu",
    }


def our_scores(strategy: str, fisher: str, members: list[Path] | None = None) -> dict[str, torch.Tensor]:
    """{plain, relative} scores [Q, N] of influence_cli (one fit-factors, two compute-scores)."""
    from influence_cli.config import config_from_dict
    from influence_cli.fit import fit_factors
    from influence_cli.scores import compute_scores
    from influence_cli.storage import SCORES_FILE, load_tensors

    name = f"{strategy}_{fisher}" + (f"_ensemble{1 + len(members)}" if members else "")
    out = {}
    for relative in (False, True):
        cfg = config_from_dict(our_config(name, strategy, fisher, relative, members), base_dir=ROOT)
        if not relative and strategy != "identity":
            fit_factors(cfg, overwrite=True)
        compute_scores(cfg, overwrite=True)
        out["relative" if relative else "plain"] = load_tensors(cfg.output_path / SCORES_FILE)[0]["scores"]
    return out


def kronfluence_lds(masks: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """Kronfluence's EKFAC (true Fisher, margin measurement) LDS per damping of the sweep."""
    from field_common import new_mlp
    from kronfluence_task import run_kronfluence

    from influence_cli.models import load_checkpoint

    model = new_mlp(0)
    load_checkpoint(model, OUT / "mlp_seed0.safetensors")
    train, query = load_mnist(0, N_TRAIN), load_mnist(*QUERIES)
    out: dict[str, float] = {}
    factors = None
    for damping in KRONFLUENCE_DAMPINGS:
        run = run_kronfluence(model, train, query, OUT / "kronfluence", damping=damping, measurement="margin", factors=factors)
        factors = "ekfac_sampled"
        out["heuristic 0.1·mean(Λ)" if damping is None else f"{damping:g}"] = lds(run.scores, masks, actual)
    return out


# ----------------------------------------------------------------------------- the report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", type=int, default=100, help="Random half subsets retrained (>= 50).")
    parser.add_argument("--jobs", type=int, default=2, help="Retraining processes (1 thread each).")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--skip-ensemble", action="store_true")
    args = parser.parse_args()
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
            path, acc = trained_checkpoint(OUT / f"mlp_seed{s}.safetensors", N_TRAIN, seed=s)
            checkpoints.append(path)
            accuracies.append(acc)
    masks, actual, retrain_seconds = ground_truth(args.subsets, args.jobs)
    results: dict = {"subsets": len(masks), "accuracy": accuracies, "retrain_seconds": retrain_seconds}

    table: list[tuple[str, str, str, float, float]] = []
    with Timer() as t_ours:
        for strategy, fisher in (("identity", "sampled"), ("kfac", "sampled"), ("ekfac", "sampled"), ("kfac", "ggn"), ("ekfac", "ggn")):
            got = our_scores(strategy, fisher)
            fisher_label = "—" if strategy == "identity" else fisher
            table.append(("influence_cli", strategy, fisher_label, lds(got["plain"], masks, actual), lds(got["relative"], masks, actual)))
    ensemble_rows = []
    if not args.skip_ensemble:
        with Timer() as t_ens:
            for fisher in ("sampled", "ggn"):
                got = our_scores("ekfac", fisher, checkpoints[1:])
                single = next(r for r in table if r[1] == "ekfac" and r[2] == fisher)
                ensemble_rows.append((fisher, single[3], lds(got["plain"], masks, actual), single[4], lds(got["relative"], masks, actual)))
        results["ensemble_seconds"] = t_ens.seconds
    kf: dict[str, float] = {}
    if not missing:
        with Timer() as t_kf:
            kf = kronfluence_lds(masks, actual)
        results["kronfluence_seconds"] = t_kf.seconds
    results.update(ours=table, ensemble=ensemble_rows, kronfluence=kf, ours_seconds=t_ours.seconds, model_seconds=t_models.seconds)
    results["seconds_total"] = time.perf_counter() - t_start

    q = QUERIES[1] - QUERIES[0]
    lines = [
        header(f"{Path(sys.executable).parent.parent.name}/bin/python benchmarks/lds.py --subsets {args.subsets} --jobs {args.jobs}"),
        "",
        f"MLP 784-128-128-10, {N_TRAIN:,} training images (test accuracy {accuracies[0]:.3f}), {q} queries, margin measurement; "
        f"{len(masks)} random half subsets retrained once each (seed 0, 10 epochs). LDS = mean over queries of the Spearman "
        "correlation across subsets (higher is better).",
        "",
        "| tool | strategy | Fisher | damping | LDS (plain) | LDS (relative) |",
        "|---|---|---|---|---:|---:|",
    ]
    for tool, strategy, fisher, plain, rel in table:
        lines.append(f"| {tool} | {strategy} | {fisher} | {'—' if strategy == 'identity' else 'auto'} | {plain:.4f} | {rel:.4f} |")
    if kf:
        best = max(kf, key=kf.get)
        lines.append(f"| Kronfluence {_kf_version()} | ekfac | sampled (true) | 1e-8 (its default) | {kf['1e-08']:.4f} | |")
        lines.append(f"| Kronfluence {_kf_version()} | ekfac | sampled (true) | {best} (best of the sweep) | {kf[best]:.4f} | |")
        lines += ["", "Kronfluence's damping sweep (EKFAC, true Fisher): " + ", ".join(f"{k}: {v:.4f}" for k, v in kf.items()), ""]
        ours_default = next(r for r in table if r[1] == "ekfac" and r[2] == "sampled")[3]
        ours_ggn = next(r for r in table if r[1] == "ekfac" and r[2] == "ggn")[3]
        lines.append(
            f"influence_cli defaults (ekfac, sampled Fisher, auto damping): {ours_default:.4f}; with `fisher: ggn`: {ours_ggn:.4f}; "
            f"Kronfluence's best: {kf[best]:.4f} → {'met' if max(ours_default, ours_ggn) >= kf[best] else 'missed'} "
            "(goal: at least Kronfluence's best)."
        )
    if ensemble_rows:
        lines += [
            "",
            f"Ensemble of {len(seeds)} models (seeds {', '.join(map(str, seeds))}, each trained on the full training set, "
            "each with its own EKFAC factors; `scores.checkpoints`), same ground truth:",
            "",
            "| Fisher | single model | ensemble of 5 | gain | single (relative) | ensemble (relative) | gain |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for fisher, s_plain, e_plain, s_rel, e_rel in ensemble_rows:
            lines.append(f"| {fisher} | {s_plain:.4f} | {e_plain:.4f} | **{e_plain - s_plain:+.4f}** | {s_rel:.4f} | {e_rel:.4f} | {e_rel - s_rel:+.4f} |")
    lines += [
        "",
        f"Wall time: {results['seconds_total'] / 60:.1f} min (retraining {retrain_seconds:.0f} s now, cached afterwards; "
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
