"""Memory stays bounded as the data grows: peak RSS of whole CLI processes on real MNIST.

    python benchmarks/bench_memory.py [--sizes 2000,8000] [--queries 1000]

1. fit-factors and compute-scores --self with 2,000 vs 8,000 training examples (goal: within 10%).
2. compute-scores + top-k for 8,000 train × 1,000 queries (a 32 MB float32 score matrix) with
   scores.max_memory_mb = 4, so the matrix is written as shards and top-k merges them, against
   the same run unsharded.
Each measurement is a separate process (ru_maxrss of the child, measured by a wrapper process).
`--sizes` (the two training-set sizes; the larger one is scored) and `--queries` make a quick run smaller.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from mnist_common import IMAGES, LABELS, MLP_KWARGS, ROOT, header, load_mnist

from influence_cli.config import ModelConfig
from influence_cli.models import build_model
from influence_cli.storage import save_tensors
from influence_cli.training import TrainRecipe, train_model

INFLUENCE = [sys.executable, "-m", "influence_cli"]


def peak(args: list[str]) -> float:
    code = (
        "import resource, subprocess, sys;"
        f"subprocess.run({INFLUENCE + args!r}, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return float(out.stdout.strip())


def write_config(path: Path, checkpoint: Path, out: Path, n_train: int, n_query: int = 1000) -> Path:
    spec = {"source": "idx", "images": str(IMAGES), "labels": str(LABELS), "transform": {"flatten": True, "scale": 255.0}}
    train = spec | {"range": [0, n_train]}
    cfg = {
        "model": {"architecture": "mlp", "kwargs": MLP_KWARGS, "checkpoint": str(checkpoint)},
        "data": {"train": train, "query": spec | {"range": [9000, 9000 + n_query]}, "batch_size": 256},
        "factors": {"checkpoint_every": 0},
        "output_dir": str(out),
        "device": "cpu",
    }
    path.write_text(json.dumps(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,8000", help="the two training-set sizes, smaller first (the larger one is also scored)")
    parser.add_argument("--queries", type=int, default=1000, help="queries of the scoring runs (images 9000 on)")
    args = parser.parse_args()
    small, large = (int(n) for n in args.sizes.split(","))
    n_query = args.queries
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES}")
    workdir = tempfile.TemporaryDirectory(prefix="bench_memory_")  # removed when the script ends
    tmp = Path(workdir.name)
    x, y = load_mnist(0, large)
    torch.manual_seed(0)
    model = train_model(build_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS), "."), x, y, TrainRecipe(epochs=3))
    ckpt = tmp / "model.safetensors"
    save_tensors(ckpt, model.state_dict(), {})

    rows = []
    sizes = {n: write_config(tmp / f"fit{n}.json", ckpt, tmp / f"fit{n}", n) for n in (small, large)}
    for n, cfg in sizes.items():
        rows.append((f"fit-factors, {n:,} train", peak(["fit-factors", str(cfg)])))
    fit_ratio = rows[1][1] / rows[0][1]
    for n, cfg in sizes.items():  # the scoring passes stream the training set too (one batch held at a time)
        rows.append((f"compute-scores --self, {n:,} train", peak(["compute-scores", str(cfg), "--self"])))
    self_ratio = rows[3][1] / rows[2][1]

    cfg = write_config(tmp / "scores.json", ckpt, tmp / f"fit{large}", large, n_query)
    pairs = f"{large:,} × {n_query:,}"
    rows.append((f"compute-scores {pairs}, one file ({4 * large * n_query / 1e6:.0f} MB matrix)", peak(["compute-scores", str(cfg), "--overwrite"])))
    rows.append(("top-k --k 10, one file", peak(["top-k", str(cfg), "--k", "10", "--json"])))
    rows.append((f"compute-scores {pairs}, one file, factors.amp=bfloat16 (bf16 queries)",
                 peak(["compute-scores", str(cfg), "--overwrite", "--set", "factors.amp=bfloat16"])))
    rows.append((f"compute-scores, score budget 4 MB (shards; query chunk {n_query:,})",
                 peak(["compute-scores", str(cfg), "--overwrite", "--set", "scores.max_memory_mb=4", "--set", f"scores.query_chunk={n_query}"])))
    shards = len(list((tmp / f"fit{large}").glob("scores.shard-*")))
    rows.append((f"top-k --k 10 over {shards} shards", peak(["top-k", str(cfg), "--k", "10", "--json"])))

    print(header())
    print()
    print("| process | peak RSS (MB) |")
    print("|---|---:|")
    for name, mb in rows:
        print(f"| {name} | {mb:,.0f} |")
    print(f"\nfit-factors peak RSS, {large:,} vs {small:,} examples: {fit_ratio:.3f}x; compute-scores --self: {self_ratio:.3f}x")


if __name__ == "__main__":
    main()
