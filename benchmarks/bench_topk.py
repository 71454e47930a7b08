"""top-k over a large scores file with many queries: wall time, peak anonymous memory, rankings compared.

    python benchmarks/bench_topk.py [--queries 1000] [--train 200000] [--k 5] [--dtype float32] [--shards 1]
                                    [--by-layer L] [--dir DIR] [--before TREE] [--repeats 3] [--cli] [--profile]

Writes a synthetic scores file in DIR (random normal scores, seed 0, through `storage.save_tensors`
with the tensors and metadata compute-scores writes: scores, train_indices, train_labels, the
queries' indices; `--dtype bfloat16` gives many exact ties, `--shards N` N train-range shards and
their index; `--by-layer L` also the per-layer parts of L layers, as `compute-scores --by-layer`
stores them, which `top_k` then reads for every ranked pair), or reuses the one there when it has
the same shape, dtype, shards and layers. Then, one
fresh process per measurement, this tree and TREE (a `git worktree` of an earlier commit)
interleaved round by round:

- `top_k(DIR, None, k)` over every query: seconds (imports excluded), the largest RssAnon sampled
  every 5 ms above the process's before the call (the scores are memory-mapped, so the pages read
  are file-backed, not anonymous), and a digest of the rankings (their per-layer parts too), which
  must be the same for both trees; with `--by-layer`, also the seconds of that call spent reading
  the ranked pairs' parts (`pair_parts`);
- with `--cli`, the whole `influence top-k CONFIG --k K --json` and the tables, as a user runs it
  (a config naming DIR; imports, config, rendering included): wall and CPU seconds, and its output,
  which must be the same for both trees.

Medians of `--repeats`. `--profile` prints this tree's cProfile of one `top_k` call instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import dataclasses, hashlib, json, sys, threading, time
from influence_cli import topk
from influence_cli.topk import top_k

parts_seconds = [0.0]
read_parts = topk.pair_parts

def timed_parts(*args, **kwargs):
    t0 = time.perf_counter()
    try:
        return read_parts(*args, **kwargs)
    finally:
        parts_seconds[0] += time.perf_counter() - t0

topk.pair_parts = timed_parts

def anon_kb():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))

out, k = sys.argv[1], int(sys.argv[2])
base, peak, done = anon_kb(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.005)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
t0 = time.perf_counter()
rankings = top_k(out, None, k)
seconds = time.perf_counter() - t0
done.set()
sampler.join()
digest = hashlib.sha256(json.dumps([dataclasses.asdict(r) for r in rankings]).encode()).hexdigest()[:16]
print(json.dumps({"seconds": seconds, "parts_seconds": parts_seconds[0], "anon_mb": max(0, peak[0] - base) / 1024, "digest": digest}))
"""


def write_scores(out: Path, n_query: int, n_train: int, dtype: str, shards: int, layers: int = 0) -> None:
    """Synthetic scores as compute-scores stores them (one file, or `shards` train ranges and their index), with
    the parts of `layers` layers (random normal, seed 1; the last one makes them sum to the scores in float32)."""
    import torch

    from influence_cli import storage

    stamp = out / "bench_topk.json"
    spec = {"queries": n_query, "train": n_train, "dtype": dtype, "shards": shards, "by_layer": layers}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("scores*.safetensors"), *out.glob(storage.SCORES_INDEX)]:
        old.unlink()
    scores = torch.randn(n_query, n_train, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    meta = {storage.FORMAT_KEY: storage.SCORES_FORMAT, "relative": False, "measurement": "loss"}
    parts = None
    if layers:
        meta[storage.BY_LAYER] = [f"layer{i}" for i in range(layers)]
        parts = torch.randn(layers, n_query, n_train, generator=torch.Generator().manual_seed(1))
        parts[-1] = scores.float() - parts[:-1].sum(0)
        parts = parts.to(getattr(torch, dtype))
    common = {"query_indices": torch.arange(n_query), "query_labels": torch.arange(n_query) % 10}
    train_indices, train_labels = torch.arange(n_train), torch.arange(n_train) % 10
    if shards == 1:
        tensors = common | {"scores": scores, "train_indices": train_indices, "train_labels": train_labels}
        storage.save_tensors(out / storage.SCORES_FILE, tensors | ({storage.SCORES_BY_LAYER: parts} if parts is not None else {}), meta)
    else:
        index, meta_of_index = [], {key: value for key, value in meta.items() if key != storage.FORMAT_KEY}
        bounds = [n_train * i // shards for i in range(shards + 1)]
        for number, (c0, c1) in enumerate(zip(bounds, bounds[1:], strict=False)):
            name = storage.SCORES_SHARD.format(shard=number)
            tensors = common | {"scores": scores[:, c0:c1], "train_indices": train_indices[c0:c1], "train_labels": train_labels[c0:c1]}
            tensors |= {storage.SCORES_BY_LAYER: parts[:, :, c0:c1]} if parts is not None else {}
            storage.save_tensors(out / name, tensors, meta)
            index.append({"file": name, "shard": number, "train_start": c0, "train_stop": c1})
        storage.save_json(out / storage.SCORES_INDEX, {storage.FORMAT_KEY: storage.SCORES_FORMAT, "n_query": n_query, "n_train": n_train,
                                                       "shards": index, "metadata": meta_of_index})  # fmt: skip
    stamp.write_text(json.dumps(spec))


def write_config(out: Path) -> Path:
    """A config naming `out` (the digits MLP of sample_data: the synthetic scores record no model or data to compare)."""
    path = out / "bench_topk.yaml"
    config = {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": 64, "hidden": [8], "num_classes": 10}},
        "data": {"train": {"source": "tensors", "path": str(ROOT / "sample_data" / "digits.safetensors")}},
        "output_dir": str(out),
        "device": "cpu",
    }
    path.write_text(json.dumps(config))
    return path


def env_for(tree: Path) -> dict[str, str]:
    import os

    return os.environ | {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_top_k(tree: Path, out: Path, k: int) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, str(out), str(k)], env=env_for(tree), cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(tree: Path, config: Path, k: int, json_: bool) -> tuple[float, float, str]:
    """The wall and CPU seconds (user + system, steadier than wall time on a shared machine) of the whole command, and its stdout."""
    args = [sys.executable, "-m", "influence_cli", "top-k", str(config), "--k", str(k), *(["--json"] if json_ else [])]
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(args, env=env_for(tree) | {"COLUMNS": "120"}, cwd=tree, check=True, capture_output=True, text=True)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--train", type=int, default=200_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--by-layer", type=int, default=0, metavar="L", help="also store (and rank with) the parts of L layers")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_topk"))
    parser.add_argument("--before", type=Path, help="a tree of an earlier commit (git worktree add DIR COMMIT)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cli", action="store_true", help="also time the whole `influence top-k` command")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    write_scores(args.dir, args.queries, args.train, args.dtype, args.shards, args.by_layer)
    size = (1 + args.by_layer) * args.queries * args.train * {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[args.dtype] / 2**20
    layers = f", the parts of {args.by_layer} layers" if args.by_layer else ""
    print(f"{args.queries:,} queries x {args.train:,} train, {args.dtype}{layers}, {args.shards} file(s), {size:,.0f} MiB; k {args.k}")
    if args.profile:
        call = f"top_k({str(args.dir)!r}, None, {args.k})"
        code = f"import cProfile; from influence_cli.topk import top_k; cProfile.run({call!r}, sort='tottime')"
        subprocess.run([sys.executable, "-c", code], env=env_for(ROOT), cwd=ROOT, check=True)
        return
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    cli: dict[tuple[str, bool], list[tuple[float, float]]] = {(name, j): [] for name in trees for j in (True, False)}
    outputs: dict[tuple[str, bool], str] = {}
    config = write_config(args.dir)
    for _ in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(run_top_k(tree, args.dir, args.k))
            if args.cli:
                for json_ in (True, False):
                    seconds, cpu, stdout = run_cli(tree, config, args.k, json_)
                    cli[name, json_].append((seconds, cpu))
                    outputs[name, json_] = stdout
    parts = " of which `pair_parts` (s) |" if args.by_layer else ""
    print(f"| tree | top_k (s) |{parts} peak anonymous memory above imports (MB) | rankings digest |" + (" `top-k --json` (s, CPU s) | `top-k`, tables (s, CPU s) |" if args.cli else ""))
    print("|---|---:|" + ("---:|" if args.by_layer else "") + "---:|---|" + ("---:|---:|" if args.cli else ""))
    for name, rows in runs.items():
        parts = f" {statistics.median(r['parts_seconds'] for r in rows):.2f} |" if args.by_layer else ""
        line = f"| {name} | {statistics.median(r['seconds'] for r in rows):.2f} |{parts} {max(r['anon_mb'] for r in rows):.0f} | {rows[0]['digest']} |"
        if args.cli:
            for json_ in (True, False):
                wall, cpu = (statistics.median(run[i] for run in cli[name, json_]) for i in (0, 1))
                line += f" {wall:.2f}, {cpu:.2f} |"
        print(line)
    digests = {r["digest"] for rows in runs.values() for r in rows}
    same_cli = len({outputs[key] for key in outputs if key[1]}) <= 1 and len({outputs[key] for key in outputs if not key[1]}) <= 1
    print("rankings: " + ("the same" if len(digests) == 1 and same_cli else f"DIFFER ({sorted(digests)})"))
    if len(digests) != 1 or not same_cli:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
