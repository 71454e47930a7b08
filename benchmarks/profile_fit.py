"""Where fit-factors spends its time and memory, phase by phase: one process, sampled VmRSS.

    OMP_NUM_THREADS=1 python benchmarks/profile_fit.py --train 1024 [--out profile.json] [--keep DIR]

The built-in `cnn` with `channels: [128, 256]` (random weights, seed 0) on real MNIST 28 × 28
(configs/mnist.yaml's data and settings, no flatten): fc's input is 12,545 wide (256 × 7 × 7 + the
bias column), conv2 unfolds 196 positions × 1,153 inputs per example. `influence.fit_factors` runs
with the config's defaults (factors.checkpoint_every = 50, so the summed covariances are written
once after pass 1) while a thread reads VmRSS from /proc/self/status every 10 ms; the phases are
timed by wrapping the functions that run them:

- pass 1 (`fit._run_pass`, phase `covariance`), the progress snapshot after it
  (`PassCheckpoint.save`), every eigendecomposition (`factors.eigendecompose`, per layer and
  factor, with its width and the zero rows it deflates), the LAPACK call inside it
  (`torch.linalg.eigh`) and the spill of a large A or G to the factors' folder before it
  (`factors._spill`, where the version has one), pass 2 (`_run_pass`, phase `correction`), within it the accumulation of
  Λ* (`DiagonalAccumulator.update`: the rotations into the eigenbasis and the sums; one row for all
  batches, its peak the highest of theirs, so the rest of pass 2's is its forward and backward)
  and the factors file (`storage.save_tensors` from `fit._fit_member`).

Each row: wall and CPU seconds (the process's, the sampler included: on a shared machine the
wall time counts the other processes' turns), VmRSS when the phase began, the highest sample in
it, and the growth. The last line is the process's ru_maxrss (the true peak; the samples can miss
a peak shorter than 10 ms). The wrappers read only arguments and time: the same script profiles
any version of the package (`INFLUENCE_ROOT`, below). `--channels 16,32` is a quick try.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch

from influence_cli import factors as factors_module
from influence_cli import fit as fit_module
from influence_cli import resume as resume_module
from influence_cli import storage
from influence_cli.config import load_config

# The repository whose configs/mnist.yaml is read (default: this one). The package is whichever
# `influence_cli` the path imports (PYTHONPATH), so one copy of the script measures two versions.
ROOT = Path(os.environ.get("INFLUENCE_ROOT", Path(__file__).resolve().parents[1]))
MNIST = Path(os.environ.get("INFLUENCE_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))  # as mnist_common.py


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    def __init__(self, every: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), rss_mb()))
            time.sleep(self.every)

    def peak(self, t0: float, t1: float) -> float:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0.0)


UPDATE = "  Λ* accumulation, all batches (its peak: the highest)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--channels", default="128,256", help="the cnn's channels (smaller for a quick try)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="factors.checkpoint_every (default: the config's)")
    parser.add_argument("--out", type=Path, default=None, help="write the phases as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="output_dir (default: a temporary folder, removed)")
    args = parser.parse_args()

    images, labels = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    tmp = tempfile.TemporaryDirectory(prefix="profile_fit_")
    out_dir = args.keep or Path(tmp.name)
    overrides = [
        "model.architecture=cnn", f"model.kwargs={{channels: [{args.channels}]}}", "model.checkpoint=null",
        f"data.train.images={images}", f"data.train.labels={labels}", f"data.train.range=[0, {args.train}]",
        "data.train.transform.flatten=false",
        f"data.query.images={images}", f"data.query.labels={labels}", "data.query.transform.flatten=false",
        f"output_dir={out_dir}", "device=cpu",
    ]  # fmt: skip
    if args.checkpoint_every is not None:
        overrides.append(f"factors.checkpoint_every={args.checkpoint_every}")
    cfg = load_config(ROOT / "configs" / "mnist.yaml", overrides)

    events: list[dict] = []
    sampler = Sampler()

    def timed(label_of, fn):
        def wrapper(*a, **k):
            label = label_of(*a, **k)
            t0, c0, r0 = time.perf_counter(), time.process_time(), rss_mb()
            try:
                return fn(*a, **k)
            finally:
                events.append({"phase": label, "t0": t0, "t1": time.perf_counter(), "cpu": time.process_time() - c0, "rss0": r0})

        return wrapper

    layer = {"name": "?"}
    fit_module._run_pass = timed(lambda *a, **k: f"pass {a[4]}", fit_module._run_pass)
    orig_klf = fit_module.kronecker_layer_factors

    def klf(name, *a, **k):
        layer["name"] = name
        return orig_klf(name, *a, **k)

    fit_module.kronecker_layer_factors = klf
    factors_module.kronecker_layer_factors = klf
    order = iter("AGAGAGAGAGAGAGAG")

    def eig_label(matrix, *a, **k):
        matrix = getattr(matrix, "tensor", matrix)  # a Handover lends its matrix
        n = len(matrix)  # zero rows counted 1,024 rows at a time (no full-size temporary)
        zero = sum(int((matrix[i : i + 1024].abs().amax(dim=1) == 0).sum()) for i in range(0, n, 1024))
        return f"eigendecompose {layer['name']}.{next(order)} ({n:,}, {zero:,} zero rows)"

    factors_module.eigendecompose = timed(eig_label, factors_module.eigendecompose)
    if hasattr(factors_module, "_spill"):  # versions that spill a large A or G to factors_dir during its eigh
        factors_module._spill = timed(lambda m, *a, **k: f"  spill {tuple(m.shape)} {str(m.dtype)[6:]} to a file", factors_module._spill)
        factors_module._read_spilled = timed(lambda *a, **k: "  read back from the file (fall-back)", factors_module._read_spilled)
    torch.linalg.eigh = timed(lambda m, *a, **k: f"  eigh {tuple(m.shape)} {str(m.dtype)[6:]}", torch.linalg.eigh)
    factors_module.DiagonalAccumulator.update = timed(lambda *a, **k: UPDATE, factors_module.DiagonalAccumulator.update)
    resume_module.PassCheckpoint.save = timed(lambda self, phase, *a, **k: f"progress snapshot ({phase})", resume_module.PassCheckpoint.save)
    storage.save_tensors = timed(lambda path, *a, **k: f"save {Path(path).name}", storage.save_tensors)

    base = rss_mb()
    sampler.start()
    t_start, c_start = time.perf_counter(), time.process_time()
    fit_module.fit_factors(cfg, overwrite=True)
    t_end, c_end = time.perf_counter(), time.process_time()
    time.sleep(0.02)
    sampler.stop.set()
    sampler.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    updates = [e for e in events if e["phase"] == UPDATE]
    events = [e for e in events if e["phase"] != UPDATE]
    if updates:
        events.append({"phase": UPDATE, "t0": updates[0]["t0"], "t1": updates[-1]["t1"], "cpu": sum(e["cpu"] for e in updates), "rss0": updates[0]["rss0"],
                       "seconds": sum(e["t1"] - e["t0"] for e in updates), "peak": max(sampler.peak(e["t0"], e["t1"]) for e in updates)})
    eig_start = min((e["t0"] for e in events if e["phase"].startswith("eigendecompose")), default=None)
    eig_end = max((e["t1"] for e in events if e["phase"].startswith("eigendecompose")), default=None)
    if eig_start is not None:
        cpu = sum(e["cpu"] for e in events if e["phase"].startswith("eigendecompose"))
        rss0 = next(r for t, r in sampler.samples if t >= eig_start)
        events.append({"phase": "eigendecompositions, all layers", "t0": eig_start, "t1": eig_end, "cpu": cpu, "rss0": rss0})
    events.sort(key=lambda e: (e["t0"], -e["t1"]))
    rows = [
        {
            "phase": e["phase"], "seconds": e.get("seconds", e["t1"] - e["t0"]), "cpu_seconds": e["cpu"], "rss_start_mb": e["rss0"],
            "rss_peak_mb": max(e["rss0"], e.get("peak", sampler.peak(e["t0"], e["t1"]))),
        }  # fmt: skip
        for e in events
    ]
    rows.append({"phase": "whole fit_factors", "seconds": t_end - t_start, "cpu_seconds": c_end - c_start, "rss_start_mb": base, "rss_peak_mb": sampler.peak(t_start, t_end)})
    print(f"fit-factors, cnn [{args.channels}], {args.train:,} MNIST images, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}")
    print(f"{'phase':<58} {'wall s':>8} {'CPU s':>8} {'RSS at start':>13} {'peak':>9} {'growth':>8}")
    for r in rows:
        print(f"{r['phase']:<58} {r['seconds']:8.1f} {r['cpu_seconds']:8.1f} {r['rss_start_mb']:10,.0f} MB {r['rss_peak_mb']:6,.0f} MB {r['rss_peak_mb'] - r['rss_start_mb']:+5,.0f} MB")
    print(f"ru_maxrss of the process: {maxrss:,.0f} MB")
    if args.out:
        args.out.write_text(json.dumps({"train": args.train, "rows": rows, "ru_maxrss_mb": maxrss, "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
