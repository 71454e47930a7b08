"""The scoring buffer of a conv layer's per-example gradients: wall time and peak RSS of compute-scores by its bound.

    python benchmarks/bench_scoring_buffer.py setup DIR            # writes the configs, fits the factors (~11 min)
    python benchmarks/bench_scoring_buffer.py study DIR --before TREE [--rounds 2] [--only before,default]
    python benchmarks/bench_scoring_buffer.py kernel [--repeats 7]  # conv2's scoring alone, in process
    python benchmarks/bench_scoring_buffer.py whole [--batch 100] [--repeats 7]  # a batch within the bound: whole or 64 + rest
    (`kernel` and `whole` take `--shape T,D_IN,D_OUT`, conv2's 196,1153,256 by default; `--shape 4,9,8` is a quick try)

A layer with positions is scored by forming its per-example gradients [b, P] and multiplying them
by the stored preconditioned queries [Q, P] (kernel.py, `_positions_scores`), b examples at a time:
`kernel.GRADIENT_ELEMENTS` entries (128 MiB in float32) on the CPU. `study` runs `influence
compute-scores` under `/usr/bin/time -v` (OMP_NUM_THREADS=1) on real MNIST, 1,024 training images,
batch 256, 50 and 500 queries, for three models: the built-in `cnn` with 128/256 channels (conv2:
196 positions × 1,153 inputs, P = 295,168, so [256, P] is 288 MiB), with 32/64 channels (P = 18,496,
18 MiB) and configs/mnist.yaml's MLP (no positions: nothing changes). Variants, one process each,
interleaved round by round:

- `before`: the code at TREE (a `git worktree` of the previous commit), one [B, P] buffer kept;
- `default`: this tree as it is (128 MiB, in whole multiples of 64 examples);
- `16 MiB`, `32 MiB`, `64 MiB`, `unbounded`: this tree with the plain size rule, GRADIENT_ELEMENTS
  set to that size and `_CHUNK_EXAMPLES` to 1 (conv2: 14, 28, 56 and 256 examples per chunk);
- `16 MiB fresh` and `unbounded fresh`: the same, the buffer allocated anew for every chunk instead
  of kept in the kernel's `_Scratch` (is a kept buffer worth it?).

Every run's scores are compared with `before`'s of the same round (bit for bit, else the largest
difference relative to the largest score).

`kernel` times what changes, alone: the scores of the 128/256-channel CNN's conv2 for one batch of
256 (random a [256, 196, 1,153] and g [256, 196, 256]) against 50 or 244 stored queries (244: a
query chunk of the 500, as scores.max_memory_mb = 1024 splits them), by buffer size (the plain size
rule, as in `study`, and the default rule), kept or fresh,
then its two halves (forming the gradients, the GEMM) by examples per chunk; medians of `--repeats`
calls after one warm-up round, the variants interleaved.

`whole` scores conv2 for one batch of `--batch` examples (65 to 113 fit the 2^25 bound whole) as
the rule first committed cut it, 64 examples and the rest, and whole, as `_Positions.chunk` now
forms it; medians of `--repeats` calls after a warm-up, interleaved, and the scores compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("INFLUENCE_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))
WORKLOADS = {
    "cnn 128/256": {"architecture": "cnn", "kwargs": {"channels": [128, 256]}, "checkpoint": None},
    "cnn 32/64": {"architecture": "cnn", "kwargs": {"channels": [32, 64]}, "checkpoint": None},
    "mlp": {"architecture": "mlp", "kwargs": {"input_dim": 784, "hidden": [128, 128], "num_classes": 10}, "checkpoint": str(ROOT / "runs" / "mnist" / "model.safetensors")},
}
SIZES = {"16 MiB": 1 << 22, "32 MiB": 1 << 23, "64 MiB": 1 << 24, "128 MiB": 1 << 25, "unbounded": 1 << 62}
VARIANTS = {  # workload -> the variants run on it
    "cnn 128/256": ["before", "default", "16 MiB", "32 MiB", "64 MiB", "unbounded", "16 MiB fresh", "unbounded fresh"],
    "cnn 32/64": ["before", "default", "16 MiB", "unbounded", "16 MiB fresh"],
    "mlp": ["before", "default", "16 MiB"],
}
QUERIES = (50, 500)


def slug(workload: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", workload).strip("-")


def config(folder: Path, workload: str, n_query: int) -> Path:
    """The config of one workload (written by `setup`)."""
    return folder / f"{slug(workload)}-q{n_query}.json"


def setup(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for workload, model in WORKLOADS.items():
        transform = {"scale": 255.0} | ({"flatten": True} if model["architecture"] == "mlp" else {})
        spec = {"source": "idx", "images": str(MNIST_DIR / "t10k-images-idx3-ubyte.gz"), "labels": str(MNIST_DIR / "t10k-labels-idx1-ubyte.gz"), "transform": transform}
        for n_query in QUERIES:
            cfg = {
                "model": model,
                "task": {"kind": "classification", "measurement": "loss"},
                "data": {"train": spec | {"range": [0, 1024]}, "query": spec | {"range": [9000, 9000 + n_query]}, "batch_size": 256, "num_workers": 0},
                "factors": {"strategy": "ekfac", "fisher": "sampled", "modules": ["*"]},
                "scores": {"damping": "auto", "relative": False},
                "output_dir": str(folder / f"out-{slug(workload)}"),
                "device": "cpu",
                "seed": 0,
            }
            config(folder, workload, n_query).write_text(json.dumps(cfg, indent=1))
        if (folder / f"out-{slug(workload)}" / "factors.safetensors").exists():
            continue
        env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "influence_cli", "fit-factors", str(config(folder, workload, QUERIES[0]))], check=True, env=env)


def cli(elements: int, fresh: bool, args: list[str]) -> None:
    """The CLI with the scoring buffer bounded at `elements`, any number of examples per chunk (and
    allocated anew each time when `fresh`)."""
    import torch

    import influence_cli.kernel as kernel
    from influence_cli.cli import main

    kernel.GRADIENT_ELEMENTS, kernel._CHUNK_EXAMPLES = elements, 1
    if fresh:
        kernel._Scratch.get = lambda self, shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)  # type: ignore[method-assign]
    main(args)


def timed(tree: Path, wrapper: list[str], cfg: Path) -> dict[str, float]:
    """Wall, user and system seconds and peak RSS (MB) of one compute-scores process; the 1-minute load average before it."""
    load = os.getloadavg()[0]
    env = os.environ | {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = ["/usr/bin/time", "-v", sys.executable, *wrapper, "compute-scores", str(cfg), "--overwrite"]
    err = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err).group(1)  # type: ignore[union-attr]
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    user = float(re.search(r"User time \(seconds\): (\S+)", err).group(1))  # type: ignore[union-attr]
    system = float(re.search(r"System time \(seconds\): (\S+)", err).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1000  # type: ignore[union-attr]
    return {"wall": seconds, "user": user, "sys": system, "rss": rss, "load": load}


def compare(a: Path, b: Path) -> str:
    """"bit for bit", or the largest difference of two score files relative to the largest score."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a))["scores"], load_file(str(b))["scores"]
    if torch.equal(x, y):
        return "bit for bit"
    return f"{float((x - y).abs().max() / x.abs().max()):.1e}"


def study(folder: Path, before: Path, rounds: int, only: list[str] | None) -> None:
    results: list[dict] = []
    chosen = {workload: [v for v in variants if only is None or v in only] for workload, variants in VARIANTS.items()}
    for r in range(rounds):
        for workload, variants in chosen.items():
            for n_query in QUERIES:
                cfg = config(folder, workload, n_query)
                scores = Path(json.loads(cfg.read_text())["output_dir"]) / "scores.safetensors"
                reference = folder / f"scores-{slug(workload)}-q{n_query}-r{r}-before.safetensors"
                for variant in variants:
                    if variant == "before":
                        row = timed(before, ["-m", "influence_cli"], cfg)
                        shutil.copyfile(scores, reference)
                        same = "-"
                    elif variant == "default":
                        row = timed(ROOT, ["-m", "influence_cli"], cfg)
                        same = compare(reference, scores)
                    else:
                        size = variant.removesuffix(" fresh")
                        wrapper = [str(Path(__file__).resolve()), "cli", *(["--fresh"] if variant.endswith("fresh") else []), str(SIZES[size])]
                        row = timed(ROOT, wrapper, cfg)
                        same = compare(reference, scores)
                    row |= {"round": r + 1, "workload": workload, "queries": n_query, "variant": variant, "scores": same}
                    results.append(row)
                    print(json.dumps(row), flush=True)
    (folder / f"results-{'-'.join(only or ['all'])}.json").write_text(json.dumps(results, indent=1))
    print("\n| model | queries | buffer | wall s (runs 1, 2) | user s | sys s | peak RSS MB | scores vs before |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for workload, variants in chosen.items():
        for n_query in QUERIES:
            for variant in variants:
                rows = [x for x in results if x["workload"] == workload and x["queries"] == n_query and x["variant"] == variant]
                cols = [", ".join(f"{x[k]:,.{d}f}" for x in rows) for k, d in (("wall", 1), ("user", 1), ("sys", 1), ("rss", 0))]
                print(f"| {workload} | {n_query} | {variant} | {' | '.join(cols)} | {', '.join(sorted({x['scores'] for x in rows}))} |")


CONV2 = (196, 1153, 256)  # the 128/256-channel CNN's conv2: positions, inputs (3 × 3 × 128 + 1), outputs


def kernel_times(repeats: int, shape: tuple[int, int, int] = CONV2) -> None:
    import statistics
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    import influence_cli.kernel as kernel

    torch.manual_seed(0)
    positions, d_in, d_out = shape
    a, g = torch.randn(256, positions, d_in), torch.randn(256, positions, d_out)
    p = d_out * d_in
    variants = [(size, kept) for size in [*SIZES, "default"] for kept in (True, False)]
    default = kernel.GRADIENT_ELEMENTS, kernel._CHUNK_EXAMPLES
    widths = (14, 16, 28, 32, 56, 64, 128, 256)
    totals: dict[tuple[int, str, bool], list[float]] = {}
    parts: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for n_query in (50, 244):
        q = torch.randn(n_query, p)
        scratch = {v: kernel._Scratch() for v in variants}
        buffers = {b: torch.empty(b * p) for b in widths}
        for r in range(repeats + 1):  # the first round warms up (and allocates the kept buffers)
            for size, kept in variants:
                kernel.GRADIENT_ELEMENTS, kernel._CHUNK_EXAMPLES = default if size == "default" else (SIZES[size], 1)
                t = kernel._Positions(a, g, None, scratch[size, kept] if kept else None)
                out = torch.zeros(n_query, 256)
                start = time.perf_counter()
                kernel._positions_scores(out, q, t)
                if r:
                    totals.setdefault((n_query, size, kept), []).append(1000 * (time.perf_counter() - start))
            for b, buf in buffers.items():  # the two halves, by examples per chunk: forming (bmm) and the GEMM
                out, spent = torch.zeros(n_query, 256), [0.0, 0.0]
                for b0 in range(0, 256, b):
                    n = min(b, 256 - b0)
                    grad = buf[: n * p].view(n, d_out, d_in)
                    start = time.perf_counter()
                    torch.bmm(g[b0 : b0 + n].transpose(1, 2), a[b0 : b0 + n], out=grad)
                    middle = time.perf_counter()
                    out[:, b0 : b0 + n].addmm_(q, grad.view(n, p).T)
                    spent[0] += middle - start
                    spent[1] += time.perf_counter() - middle
                if r:
                    parts.setdefault((n_query, b), []).append((1000 * spent[0], 1000 * spent[1]))

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):,.0f}"

    print("| queries | buffer | examples per chunk | kept (ms) | fresh (ms) |")
    print("|---:|---|---:|---:|---:|")
    for n_query in (50, 244):
        for size in [*SIZES, "default"]:
            kernel.GRADIENT_ELEMENTS, kernel._CHUNK_EXAMPLES = default if size == "default" else (SIZES[size], 1)
            b = min(256, kernel._Positions(a, g).chunk())
            print(f"| {n_query} | {size} | {b} | {median(totals[n_query, size, True])} | {median(totals[n_query, size, False])} |")
    print("\n| examples per chunk | forming, 50 queries (ms) | GEMM, 50 queries (ms) | forming, 244 | GEMM, 244 |")
    print("|---:|---:|---:|---:|---:|")
    for b in widths:
        cells = [median([x[i] for x in parts[n_query, b]]) for n_query in (50, 244) for i in (0, 1)]
        print(f"| {b} | {' | '.join(cells)} |")


def whole_batch(batch: int, repeats: int, shape: tuple[int, int, int] = CONV2) -> None:
    import statistics
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    import influence_cli.kernel as kernel

    torch.manual_seed(0)
    positions, d_in, d_out = shape
    a, g = torch.randn(batch, positions, d_in), torch.randn(batch, positions, d_out)
    p = d_out * d_in
    now = kernel._Positions.chunk

    def cut(self: kernel._Positions) -> int:  # the rule as first committed: multiples of 64 even when the batch fits
        return max(1, kernel.GRADIENT_ELEMENTS // p // kernel._CHUNK_EXAMPLES) * kernel._CHUNK_EXAMPLES

    for n_query in (50, 244):
        q = torch.randn(n_query, p)
        scratch = {"64 + rest": kernel._Scratch(), "whole": kernel._Scratch()}
        times: dict[str, list[float]] = {v: [] for v in scratch}
        scores: dict[str, torch.Tensor] = {}
        for r in range(repeats + 1):
            for variant, kept in scratch.items():
                kernel._Positions.chunk = cut if variant == "64 + rest" else now  # type: ignore[method-assign]
                out = torch.zeros(n_query, batch)
                start = time.perf_counter()
                kernel._positions_scores(out, q, kernel._Positions(a, g, None, kept))
                if r:
                    times[variant].append(1000 * (time.perf_counter() - start))
                scores[variant] = out
        kernel._Positions.chunk = now  # type: ignore[method-assign]
        same = "bit for bit" if torch.equal(scores["64 + rest"], scores["whole"]) else "differ"
        cells = ", ".join(f"{v} {statistics.median(t):,.0f} ms" for v, t in times.items())
        print(f"batch {batch}, {n_query} queries: {cells}; scores {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("setup").add_argument("folder", type=Path)
    p = sub.add_parser("study")
    p.add_argument("folder", type=Path)
    p.add_argument("--before", type=Path, required=True, help="a checkout of the code to compare with (git worktree add DIR HEAD~1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", help="the variants to run, comma-separated (default: all): before,default")
    def shape(text: str) -> tuple[int, int, int]:
        positions, d_in, d_out = (int(v) for v in text.split(","))
        return positions, d_in, d_out

    shape_help = "the layer: positions, inputs, outputs (default: conv2's 196,1153,256)"
    p = sub.add_parser("kernel")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shape", type=shape, default=CONV2, help=shape_help)
    p = sub.add_parser("whole")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shape", type=shape, default=CONV2, help=shape_help)
    p = sub.add_parser("cli")
    p.add_argument("elements", type=int)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = parser.parse_args()
    if a.command == "setup":
        setup(a.folder)
    elif a.command == "study":
        study(a.folder, a.before, a.rounds, a.only.split(",") if a.only else None)
    elif a.command == "kernel":
        kernel_times(a.repeats, a.shape)
    elif a.command == "whole":
        whole_batch(a.batch, a.repeats, a.shape)
    else:
        cli(a.elements, a.fresh, a.args)


if __name__ == "__main__":
    main()
