"""Peak RSS and wall time of whole CLI processes as the training set grows, on a lazily synthesized dataset.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [N ...]     (default: 50000 200000 1000000)

The data is a `package.module:function` factory (`synth` below, imported from this folder) whose
Dataset makes each 32-feature example from its index on demand, so nothing grows with N but what
the commands themselves hold; the model is the built-in mlp 32-16-10 with its random weights.
For each N: fit-factors, compute-scores (100 queries), compute-scores --self, spectrum and
dataset-similarity (two datasets of N and N/2 examples), then compute-scores and top-k with 1,000
queries at the first N. Each measurement is a process of its own (`/usr/bin/time -v`'s maximum
resident set size, which counts the pages of files it maps, such as the scores top-k reads).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
_FREQ = torch.arange(1, 33, dtype=torch.float32) * 0.731


class Synth(Dataset):
    """n examples, each made from its index when asked for: 32 features, 10 classes."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return torch.sin(_FREQ * (i % 9973) + (i % 7)), (i * 7919) % 10


def synth(n: int = 1000) -> Synth:
    return Synth(n)


def config(path: Path, n: int, n_query: int, out: Path) -> Path:
    spec = {"source": "bench_scale:synth"}
    cfg = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 32, "hidden": [16], "num_classes": 10}, "checkpoint": None},
        "data": {"train": spec | {"kwargs": {"n": n}}, "query": spec | {"kwargs": {"n": n_query}}, "batch_size": 1024},
        "factors": {"strategy": "ekfac", "fisher": "empirical"},
        "similarity": {"datasets": {"a": spec | {"kwargs": {"n": n}}, "b": spec | {"kwargs": {"n": n}, "range": [n // 2, n]}}},
        "output_dir": str(out),
        "device": "cpu",
    }
    path.write_text(json.dumps(cfg))
    return path


def measure(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `influence ARGS` in a process of its own."""
    with tempfile.NamedTemporaryFile("r") as report:
        cmd = ["/usr/bin/time", "-f", "%M %e", "-o", report.name, sys.executable, "-m", "influence_cli", *args]
        subprocess.run(cmd, check=True, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kb, wall = report.read().split()
    return int(kb) / 1024, float(wall)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [50_000, 200_000, 1_000_000]
    work = tempfile.TemporaryDirectory(prefix="bench_scale_")
    rows = []
    for n in sizes:
        cfg = str(config(Path(work.name) / f"n{n}.json", n, 100, Path(work.name) / f"n{n}"))
        for name, args in [
            ("fit-factors", ["fit-factors", cfg]),
            ("compute-scores, 100 queries", ["compute-scores", cfg]),
            ("compute-scores --self", ["compute-scores", cfg, "--self"]),
            ("spectrum", ["spectrum", cfg]),
            ("dataset-similarity (N and N/2)", ["dataset-similarity", cfg]),
        ]:
            rows.append((name, n, *measure(args)))
    n = sizes[0]
    wide = str(config(Path(work.name) / "q1000.json", n, 1000, Path(work.name) / f"n{n}"))
    rows.append(("compute-scores, 1,000 queries", n, *measure(["compute-scores", wide, "--overwrite"])))
    rows.append(("top-k --k 10, all 1,000 queries", n, *measure(["top-k", wide, "--k", "10", "--json"])))
    rows.append(("top-k --k 10 --query 5", n, *measure(["top-k", wide, "--k", "10", "--json", "--query", "5"])))
    print("| process | N | peak RSS (MB) | wall (s) |")
    print("|---|---:|---:|---:|")
    for name, n, mb, wall in rows:
        print(f"| {name} | {n:,} | {mb:,.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
