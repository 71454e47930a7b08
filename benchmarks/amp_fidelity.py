"""Fidelity of `factors.amp: float16` and `bfloat16` against float32: the same fit-factors + compute-scores, scores compared.

    python benchmarks/amp_fidelity.py [--train 8000] [--queries 1000] [--amps bfloat16,float16]

Workloads:
- MNIST MLP 784-128-128-10 trained here with the seeded recipe of bench_scores.py (3 epochs, seed 0)
  on MNIST test-split images 0..8000 (../shared/data/mnist, or INFLUENCE_MNIST_DIR); queries are
  images 9000.. (EKFAC, sampled Fisher, batch size 256);
- the bundled digits CNN (configs/digits_cnn.yaml: EKFAC, exact GGN, margin, RelatIF), with every
  held-out digit (1500..1797, 297 queries) as queries.

For each precision: Pearson correlation of the whole score matrix with float32's, the per-query
Spearman correlation (mean and worst query) and the share of each query's top-10 proponents kept.
Fidelity only: on a CPU float16 is emulated (slow), so no time is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from field_common import rowwise_spearman
from mnist_common import IMAGES, LABELS, MLP_KWARGS, ROOT, header, load_mnist

from influence_cli.config import ModelConfig, config_from_dict, load_config
from influence_cli.fit import fit_factors
from influence_cli.models import build_model
from influence_cli.scores import compute_scores
from influence_cli.storage import save_tensors
from influence_cli.topk import iter_score_blocks
from influence_cli.training import TrainRecipe, train_model


def mnist_config(tmp: Path, n_train: int, n_query: int) -> dict:
    transform = {"flatten": True, "scale": 255.0}
    spec = {"source": "idx", "images": str(IMAGES), "labels": str(LABELS), "transform": transform}
    return {
        "model": {"architecture": "mlp", "kwargs": MLP_KWARGS, "checkpoint": str(tmp / "model.safetensors")},
        "data": {"train": spec | {"range": [0, n_train]}, "query": spec | {"range": [9000, 9000 + n_query]}, "batch_size": 256},
        "factors": {"strategy": "ekfac", "fisher": "sampled", "checkpoint_every": 0},
        "output_dir": str(tmp / "mnist"),
        "device": "cpu",
    }


def scores_under(cfg_of, amp: str, n_query: int) -> torch.Tensor:
    """[n_query, n_train] float64 scores of fit-factors + compute-scores under `factors.amp: amp`."""
    cfg = cfg_of(amp)
    fit_factors(cfg, overwrite=True)
    compute_scores(cfg, overwrite=True)
    return torch.cat([b.scores for b in iter_score_blocks(cfg.output_path, range(n_query))], dim=1).double()


def agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    spearman = rowwise_spearman(got, ref)
    top_ref, top_got = ref.topk(10, dim=1).indices, got.topk(10, dim=1).indices
    shared = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_ref, top_got, strict=True)]
    return {
        "pearson": float(torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1]),
        "spearman_mean": float(spearman.mean()),
        "spearman_worst": float(spearman.min()),
        "top10_shared": sum(shared) / len(shared),
        "finite": bool(torch.isfinite(got).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--amps", default="bfloat16,float16")
    args = parser.parse_args()
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES}")
    amps = args.amps.split(",")
    workdir = tempfile.TemporaryDirectory(prefix="amp_fidelity_")
    tmp = Path(workdir.name)
    x, y = load_mnist(0, args.train)
    torch.manual_seed(0)
    model = train_model(build_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS), "."), x, y, TrainRecipe(epochs=3, seed=0))
    save_tensors(tmp / "model.safetensors", model.state_dict(), {})
    base = mnist_config(tmp, args.train, args.queries)
    workloads = {
        f"MNIST MLP, {args.train:,} train x {args.queries:,} queries": (
            lambda amp: config_from_dict(base, [f"factors.amp={amp}", f"output_dir={tmp / amp / 'mnist'}"], base_dir=tmp),
            args.queries,
        ),
        "digits CNN (configs/digits_cnn.yaml), 1,500 train x 297 queries": (
            lambda amp: load_config(
                ROOT / "configs" / "digits_cnn.yaml",
                [f"factors.amp={amp}", f"output_dir={tmp / amp / 'cnn'}", "data.query.range=[1500, 1797]", "device=cpu"],
            ),
            297,
        ),
    }
    print(header())
    print()
    print("| workload | amp | Pearson vs float32 | per-query Spearman mean | worst query | top-10 shared |")
    print("|---|---|---:|---:|---:|---:|")
    results = {}
    for name, (cfg_of, n_query) in workloads.items():
        ref = scores_under(cfg_of, "none", n_query)
        for amp in amps:
            r = agreement(ref, scores_under(cfg_of, amp, n_query))
            results[f"{name} [{amp}]"] = r
            print(
                f"| {name} | {amp} | {r['pearson']:.5f} | {r['spearman_mean']:.4f} | {r['spearman_worst']:.4f} | {r['top10_shared']:.1%} |"
            )
    print()
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
