"""Where the GPU passes spend their time: host syncs, kernel launches, GPU idle time, Python overhead.

    python benchmarks/gpu_profile.py [--train 8000] [--queries 1000] [--device cuda] [--out DIR]

(`--device cpu --train 512 --queries 16` is a dry run of the script without a GPU; the sync census
and the kernel counts then have nothing to count.)

The workload of gpu_check.py (real MNIST, MLP 784-128-128-10 trained by the script, EKFAC,
sampled Fisher, batch 256). After a warm-up call of each, it measures:

1. Host syncs: `torch.cuda.set_sync_debug_mode("warn")` during one `compute_factors` (both passes)
   and one `compute_scores`; each warning is attributed to the innermost frame of influence_cli on
   its stack (with its two callers), and counted per pass batch.
2. Kernels: `torch.profiler` over one training epoch, one `compute_factors` and one
   `compute_scores`: wall time, kernels launched (per batch), the GPU's busy time (the union of
   kernel intervals) and its share of the wall time, the CUDA runtime calls that block
   (synchronize, device-to-host copies), and the top operators by host and by GPU time.
3. Python: cProfile of one `compute_factors`, the functions with the most own time.

Everything goes to stdout and `<out>/gpu_profile.txt`, the numbers also to `<out>/gpu_profile.json`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
from mnist_common import MLP_KWARGS, header, load_mnist

from influence_cli.config import ModelConfig, config_from_dict
from influence_cli.context import prepare
from influence_cli.data import make_loader
from influence_cli.fit import compute_factors, fit_factors, plan_for
from influence_cli.models import build_model
from influence_cli.scores import compute_scores
from influence_cli.storage import save_tensors
from influence_cli.training import TrainRecipe, train_model

PACKAGE = str(Path(__file__).resolve().parents[1] / "influence_cli")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost influence_cli frame and its two callers, as `file:line function < ...`."""
    ours = [f for f in stack if "influence_cli" in f.filename and "warnings" not in f.filename]
    if not ours:
        return "outside influence_cli: " + " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stack[-3:][::-1])
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in ours[-3:][::-1])


@contextlib.contextmanager
def sync_census(device: torch.device):
    """Counts the synchronizing CUDA calls made inside, by the influence_cli line that made them."""
    counts: collections.Counter[str] = collections.Counter()
    if device.type != "cuda":
        yield counts
        return
    saved = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if "synchroniz" in str(message):
            counts[_site(traceback.extract_stack()[:-1])] += 1
        else:
            saved(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = saved


def epoch(model: torch.nn.Module, dataset, batch_size: int, device: torch.device) -> None:
    """One plain training epoch (forward, backward, Adam step), as gpu_check.py times it."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for x, y, _ in make_loader(dataset, batch_size, pin_memory=device.type == "cuda"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ", "cudaMemcpy")


def kernel_profile(name: str, fn, device: torch.device, batches: int, log) -> dict:
    """Wall time, kernels, GPU busy share and blocking runtime calls of fn() under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = _busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
    runtime = collections.Counter(e.name for e in events if e.name.startswith("cuda"))
    memcpy = collections.Counter(e.name for e in kernels if "Memcpy" in e.name or "Memset" in e.name)
    row = {
        "wall_s": wall,
        "batches": batches,
        "kernels": len(kernels),
        "kernels_per_batch": len(kernels) / max(batches, 1),
        "gpu_busy_s": busy,
        "gpu_busy_share": busy / wall if wall else 0.0,
        "cuda_runtime_calls": dict(runtime.most_common(12)),
        "copies": dict(memcpy),
        "aten_ops": sum(1 for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU),
    }
    log(f"\n### {name}: wall {wall:.3f} s, {batches} batches ({wall / max(batches, 1) * 1e3:.2f} ms each), "
        f"{len(kernels)} kernels ({row['kernels_per_batch']:.0f} per batch), GPU busy {busy:.3f} s ({row['gpu_busy_share']:.0%}), "
        f"{row['aten_ops']} aten ops ({row['aten_ops'] / max(batches, 1):.0f} per batch)")
    log("CUDA runtime calls: " + ", ".join(f"{k} {v}" for k, v in runtime.most_common(12)))
    log("copies/memsets on the GPU: " + (", ".join(f"{k} {v}" for k, v in memcpy.most_common()) or "none"))
    averages = prof.key_averages()
    log(averages.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    if device.type == "cuda":
        log(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    args.out.mkdir(parents=True, exist_ok=True)
    text = open(args.out / "gpu_profile.txt", "w")  # noqa: SIM115 (closed at the end)

    def log(line: str = "") -> None:
        print(line, flush=True)
        text.write(line + "\n")

    results: dict = {"argv": sys.argv[1:]}
    workdir = tempfile.TemporaryDirectory(prefix="gpu_profile_")
    tmp = Path(workdir.name)
    x, y = load_mnist(0, args.train)
    torch.manual_seed(0)
    model = train_model(build_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS), "."), x, y, TrainRecipe(epochs=3))
    save_tensors(tmp / "model.safetensors", model.state_dict(), {})
    from bench_scores import make_config

    cfg = config_from_dict(make_config(tmp, args.train, 9000, 9000 + args.queries, args.device), base_dir=tmp)
    ctx = prepare(cfg)
    dataset = ctx.dataset(cfg.data.train, "data.train")
    n_batches = -(-args.train // cfg.data.batch_size)
    log(header() + f"  gpu: {torch.cuda.get_device_name() if device.type == 'cuda' else 'none (dry run)'}")

    def fit() -> None:
        compute_factors(ctx.model, ctx.tracked, "ekfac", plan_for(ctx, dataset))

    def scores() -> None:
        compute_scores(cfg, overwrite=True)

    train_copy = build_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS), ".").to(device)
    train_copy.load_state_dict(model.state_dict())
    fit_factors(cfg, overwrite=True)  # the factors compute_scores reads; also a warm-up
    for warm in (fit, scores, lambda: epoch(train_copy, dataset, cfg.data.batch_size, device)):
        warm()

    log("\n## 1. Host syncs (set_sync_debug_mode), by the influence_cli line that made them")
    for name, fn, batches in (("compute_factors (2 passes)", fit, 2 * n_batches), ("compute_scores", scores, n_batches)):
        with sync_census(device) as counts:
            fn()
            _sync(device)
        total = sum(counts.values())
        results.setdefault("syncs", {})[name] = {"total": total, "per_batch": total / batches, "sites": dict(counts.most_common())}
        log(f"\n{name}: {total} syncs, {total / batches:.2f} per batch")
        for site, n in counts.most_common(25):
            log(f"  {n:6d}  {site}")

    log("\n## 2. Kernels and GPU busy time (torch.profiler)")
    results["profile"] = {
        "epoch": kernel_profile("one training epoch", lambda: epoch(train_copy, dataset, cfg.data.batch_size, device), device, n_batches, log),
        "fit": kernel_profile("compute_factors (both passes)", fit, device, 2 * n_batches, log),
        "scores": kernel_profile("compute_scores (whole call)", scores, device, n_batches, log),
    }

    log("\n## 3. Python: cProfile of one compute_factors (own time)")
    profiler = cProfile.Profile()
    _sync(device)
    profiler.enable()
    fit()
    _sync(device)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(r"influence_cli", 30)
    log(stream.getvalue().replace(PACKAGE + "/", ""))

    (args.out / "gpu_profile.json").write_text(json.dumps(results, indent=1, default=str))
    text.close()


if __name__ == "__main__":
    main()
