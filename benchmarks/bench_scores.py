"""compute-scores on real MNIST against one forward+backward pass, the GEMM floor and the machine's GEMM rate.

    python benchmarks/bench_scores.py [--train 8000] [--queries 1000] [--repeats 1] [--device cpu] [--amp bfloat16]

MLP 784-128-128-10 trained here with the seeded recipe (3 epochs, seed 0) on MNIST
test-split images 0..8000 from ../shared/data/mnist; queries are images 9000..9999;
EKFAC factors with the sampled Fisher; batch size 256. Reports:

- the scoring pass (streaming the training set against all preconditioned queries):
  wall time, training examples/s, (query, train) pairs/s;
- its ratio to one forward+backward pass over the same training examples;
- the achieved GFLOP/s against the floor of 2 · n_query · n_train · n_params flops
  (one multiply-add per parameter per pair), and the machine's measured fp32 GEMM
  rate (square 2048³ and the scoring GEMM's own shape).

With `--amp bfloat16` the same workload also runs under `factors.amp: bfloat16` (fit-factors and
compute-scores), timed in the same run, with the agreement of its scores with the float32 ones
(Pearson over all pairs, mean per-query Spearman, top-10 proponent overlap) and the bf16 GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from field_common import rowwise_spearman
from mnist_common import IMAGES, LABELS, MLP_KWARGS, header, load_mnist

from influence_cli.config import ModelConfig, config_from_dict
from influence_cli.context import prepare
from influence_cli.data import make_loader
from influence_cli.fit import fit_factors, load_factors
from influence_cli.kernel import support_entries
from influence_cli.models import build_model
from influence_cli.scores import compute_scores
from influence_cli.storage import save_tensors
from influence_cli.topk import iter_score_blocks
from influence_cli.training import TrainRecipe, accuracy, train_model


def make_config(out_dir: Path, n_train: int, q0: int, q1: int, device: str, batch_size: int = 256, amp: str = "none") -> dict:
    transform = {"flatten": True, "scale": 255.0}
    return {
        "model": {"architecture": "mlp", "kwargs": MLP_KWARGS, "checkpoint": str(out_dir / "model.safetensors")},
        "data": {
            "train": {"source": "idx", "images": str(IMAGES), "labels": str(LABELS), "range": [0, n_train], "transform": transform},
            "query": {"source": "idx", "images": str(IMAGES), "labels": str(LABELS), "range": [q0, q1], "transform": transform},
            "batch_size": batch_size,
        },
        "factors": {"strategy": "ekfac", "fisher": "sampled", "checkpoint_every": 0, "amp": amp},
        "output_dir": str(out_dir / ("run" if amp == "none" else f"run-{amp}")),
        "device": device,
    }


def forward_backward_seconds(cfg) -> float:
    """One forward + backward pass (loss gradient w.r.t. all parameters) over data.train, no optimizer step."""
    ctx = prepare(cfg)
    dataset = ctx.dataset(cfg.data.train, "data.train")
    batches = [(x.to(ctx.device), y.to(ctx.device)) for x, y, _ in make_loader(dataset, cfg.data.batch_size)]
    model = ctx.model
    _sync(ctx.device)
    t0 = time.perf_counter()
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
    _sync(ctx.device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(
    m: int, k: int, n: int, device: torch.device, transposed_b: bool = False, repeats: int = 3, dtype: torch.dtype = torch.float32
) -> float:
    """Measured rate of [m, k] @ [k, n] in `dtype` (best of `repeats`)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype) if transposed_b else torch.randn(k, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        _ = a @ (b.T if transposed_b else b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def fit_then_score(cfg, repeats: int):
    """(median seconds of a whole fit_factors call, the compute-scores report with the fastest scoring
    pass, its whole-call seconds), each timed after one untimed call: the first call in a process
    pays one-time costs, which would otherwise fall on whichever precision runs first."""
    fit_factors(cfg, overwrite=True)
    fit_times = []
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        fit_factors(cfg, overwrite=True)
        fit_times.append(time.perf_counter() - t0)
    fit_seconds = statistics.median(fit_times)
    compute_scores(cfg, overwrite=True)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = compute_scores(cfg, overwrite=True)
        runs.append((report, time.perf_counter() - t0))
    report, wall = min(runs, key=lambda r: r[0].seconds["scores"])
    return fit_seconds, report, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", help="also run under this factors.amp (bfloat16) and compare")
    args = parser.parse_args()
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES}")
    q0, q1 = 9000, 9000 + args.queries
    workdir = tempfile.TemporaryDirectory(prefix="bench_scores_")  # removed when the script ends
    tmp = Path(workdir.name)
    x, y = load_mnist(0, args.train)
    torch.manual_seed(0)
    model = train_model(build_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS), "."), x, y, TrainRecipe(epochs=3, seed=0))
    xq, yq = load_mnist(q0, q1)
    acc = accuracy(model, xq, yq)
    save_tensors(tmp / "model.safetensors", model.state_dict(), {})
    cfg = config_from_dict(make_config(tmp, args.train, q0, q1, args.device), base_dir=tmp)
    ctx = prepare(cfg)
    device = ctx.device
    n_params = sum(tm.num_params for tm in ctx.tracked)

    fit_seconds, report, wall = fit_then_score(cfg, args.repeats)
    layers = load_factors(cfg.output_path / "factors.safetensors").layers
    support = sum(support_entries(layers[tm.name], tm.d_out, tm.d_in) for tm in ctx.tracked)
    fb = statistics.median(forward_backward_seconds(cfg) for _ in range(3))
    scoring = report.seconds["scores"]
    flops = 2 * args.queries * args.train * n_params
    achieved = flops / scoring / 1e9
    square = gemm_gflops(2048, 2048, 2048, device)
    shaped = gemm_gflops(args.queries, n_params, 256, device, transposed_b=True)
    result = {
        "n_train": args.train,
        "n_query": args.queries,
        "n_params": n_params,
        "query_accuracy": acc,
        "fit_factors_seconds": fit_seconds,
        "compute_scores_wall_seconds": wall,
        "query_gradient_seconds": report.seconds["queries"],
        "scoring_seconds": scoring,
        "train_examples_per_second": args.train / scoring,
        "pairs_per_second": args.queries * args.train / scoring,
        "forward_backward_seconds": fb,
        "scoring_over_forward_backward": scoring / fb,
        "floor_gflop": flops / 1e9,
        "achieved_gflops": achieved,
        "gemm_gflops_square_2048": square,
        "gemm_gflops_scoring_shape": shaped,
        "floor_seconds_at_square_gemm_rate": flops / square / 1e9,
        "support_params": support,
        "support_floor_seconds_at_square_gemm_rate": flops * support / n_params / square / 1e9,
    }
    print(header())
    print()
    print(f"MLP 784-128-128-10 ({n_params:,} parameters in tracked layers, query accuracy {acc:.3f}), EKFAC (sampled Fisher), "
          f"{args.train:,} training examples × {args.queries:,} queries, batch size 256, device {device}.")
    print()
    print("| quantity | value |")
    print("|---|---:|")
    print(f"| fit-factors, whole call (median of 3, after a warm-up) | {fit_seconds:.2f} s |")
    print(f"| compute-scores, whole command | {wall:.2f} s |")
    print(f"| query gradients + preconditioning ({args.queries:,} queries) | {report.seconds['queries']:.2f} s |")
    print(f"| scoring pass over the training set | {scoring:.2f} s |")
    print(f"| training examples / s (scoring pass) | {args.train / scoring:,.0f} |")
    print(f"| (query, train) pairs / s | {args.queries * args.train / scoring:,.0f} |")
    print(f"| one forward+backward pass over the {args.train:,} training examples | {fb:.3f} s |")
    print(f"| scoring pass / forward+backward pass | **{scoring / fb:.0f}x** |")
    print(f"| floor: 2 · n_query · n_train · n_params | {flops / 1e9:,.0f} GFLOP |")
    print(f"| achieved (floor flops / scoring time) | {achieved:.1f} GFLOP/s |")
    print(f"| machine fp32 GEMM, 2048³ | {square:.1f} GFLOP/s |")
    print(f"| machine fp32 GEMM, scoring shape [{args.queries}, {n_params}] @ [{n_params}, 256] | {shaped:.1f} GFLOP/s |")
    print(f"| floor time at the 2048³ GEMM rate | {flops / square / 1e9:.2f} s ({achieved / square:.0%} of peak achieved) |")
    print(f"| weights not deflated at the fit (the support, what a pair multiplies) | {support:,} ({support / n_params:.0%}) |")
    print(f"| support floor time at the 2048³ GEMM rate | {flops * support / n_params / square / 1e9:.2f} s "
          f"(scoring pass at {flops * support / n_params / scoring / 1e9 / square:.0%} of peak) |")
    if args.amp != "none":
        result["amp"] = low_precision_run(args, tmp, q0, q1, cfg, wall, scoring, fit_seconds, flops)
    print()
    print(json.dumps(result))


def all_scores(out_dir: Path, n_query: int) -> torch.Tensor:
    return torch.cat([b.scores for b in iter_score_blocks(out_dir, range(n_query))], dim=1)


def low_precision_run(args, tmp: Path, q0: int, q1: int, cfg32, wall32: float, scoring32: float, fit32: float, flops: int) -> dict:
    """fit-factors + compute-scores under factors.amp, timed as above, and their scores against float32's."""
    cfg = config_from_dict(make_config(tmp, args.train, q0, q1, args.device, amp=args.amp), base_dir=tmp)
    fit_seconds, report, wall = fit_then_score(cfg, args.repeats)
    scoring = report.seconds["scores"]
    ref, got = all_scores(cfg32.output_path, args.queries).double(), all_scores(cfg.output_path, args.queries).double()
    pearson = float(torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1])
    spearman = rowwise_spearman(got, ref)
    top_ref, top_got = ref.topk(10, dim=1).indices, got.topk(10, dim=1).indices
    overlap = float(torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top_ref, top_got, strict=True)]).mean())
    rate = gemm_gflops(args.queries, flops // (2 * args.queries * args.train), 256, torch.device(args.device), True, dtype=getattr(torch, args.amp))
    out = {
        "fit_factors_seconds": fit_seconds,
        "compute_scores_wall_seconds": wall,
        "scoring_seconds": scoring,
        "achieved_gflops": flops / scoring / 1e9,
        "gemm_gflops_scoring_shape": rate,
        "pearson_vs_float32": pearson,
        "spearman_per_query_mean": float(spearman.mean()),
        "spearman_per_query_min": float(spearman.min()),
        "top10_overlap": overlap,
    }
    print()
    print(f"factors.amp={args.amp} on the same workload (same run):")
    print()
    print(f"| quantity | float32 | {args.amp} | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| fit-factors, whole call (median of 3, after a warm-up) | {fit32:.2f} s | {fit_seconds:.2f} s | {fit_seconds / fit32:.2f}x |")
    print(f"| compute-scores, whole command | {wall32:.2f} s | {wall:.2f} s | {wall / wall32:.2f}x |")
    print(f"| scoring pass | {scoring32:.2f} s | {scoring:.2f} s | {scoring / scoring32:.2f}x |")
    print(f"| achieved (floor flops / scoring time) | {flops / scoring32 / 1e9:.1f} GFLOP/s | {flops / scoring / 1e9:.1f} GFLOP/s | |")
    print(f"| machine GEMM rate, scoring shape | | {rate:.1f} GFLOP/s | |")
    print()
    print(f"agreement with float32: Pearson {pearson:.5f}; per-query Spearman mean {float(spearman.mean()):.5f} "
          f"(worst {float(spearman.min()):.5f}); top-10 proponents shared {overlap:.1%}")
    return out


if __name__ == "__main__":
    sys.exit(main())
