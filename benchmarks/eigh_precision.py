"""What a float32 eigendecomposition of a wide factor would save, and what it would change.

    OMP_NUM_THREADS=1 python benchmarks/eigh_precision.py [--train 1024]

fit-factors decomposes every factor in float64 (factors.eigendecompose). This measures the
alternative on the widest factor of benchmarks/profile_fit.py's workload: fc's A of the built-in
`cnn` with `channels: [128, 256]` (seed-0 random weights) on the first `--train` MNIST test images,
12,545 wide (`--channels` for a smaller one), built as the fit builds it (A = Σ a aᵀ / N, the zero rows deflated). The same
symmetric block is decomposed by torch.linalg.eigh in float64 and in float32; reported: CPU seconds
and peak resident growth of each, and the float32 result against the float64 one:

- eigenvalues: the largest relative error over the eigenvalues above 1e-6 · λ_max;
- eigenvectors: |u32 · u64| of the eigenvectors whose eigenvalue is separated from its neighbours
  by at least 1e-4 · λ_max (float32 rounding moves an eigenvector by about eps32 · λ_max / gap;
  within a cluster only the subspace is defined), and the largest principal angle
  between the two subspaces of the eigenvalues above 1e-2, 1e-4, 1e-6 · λ_max (A's rank is at
  most N: one position per example);
- what K-FAC does with them: (A + λI)⁻¹ v for 64 held-out activation rows v, λ = 0.1 · mean(λ_A)
  (the `auto` damping's rule, on A alone) and 0.001 · mean(λ_A), relative error in the 2-norm,
  median and max.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from influence_cli.config import load_config
from influence_cli.context import prepare
from influence_cli.factors import null_rows

# The repository whose configs/mnist.yaml is read (default: this one). The package is whichever
# `influence_cli` the path imports (PYTHONPATH), so one copy of the script measures two versions.
ROOT = Path(os.environ.get("INFLUENCE_ROOT", Path(__file__).resolve().parents[1]))
MNIST = Path(os.environ.get("INFLUENCE_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))  # as mnist_common.py


def vm(key: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))


def measured(fn):
    """(result, CPU seconds, wall seconds, peak resident growth in bytes)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM reset to VmRSS
    base, c0, t0 = vm("VmRSS"), time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0, vm("VmHWM") - base


def fc_inputs(n: int, channels: str) -> torch.Tensor:
    """fc's inputs [n, 12,545] (the flattened feature maps and the bias column) of the first n images."""
    images, labels = MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz"
    overrides = [
        "model.architecture=cnn", f"model.kwargs={{channels: [{channels}]}}", "model.checkpoint=null",
        f"data.train.images={images}", f"data.train.labels={labels}", f"data.train.range=[0, {n}]",
        "data.train.transform.flatten=false", "data.query=null", "device=cpu",
    ]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "mnist.yaml", overrides)
    ctx = prepare(cfg)
    model = ctx.model.eval()
    rows = []
    with torch.no_grad():
        for x, _, _ in ctx.batches(ctx.dataset(cfg.data.train, "data.train")):
            h = x
            for name, module in model.named_children():
                if name == "fc":
                    break
                h = module(h)
            rows.append(torch.cat([h, torch.ones(len(h), 1)], dim=1))
    return torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--channels", default="128,256", help="the cnn's channels (smaller for a quick try)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = fc_inputs(args.train + 64, args.channels)
    fit_rows, held_out = x[: args.train], x[args.train :]
    a = (fit_rows.T @ fit_rows) / args.train  # float32, as the accumulators sum it
    null = null_rows(a)
    keep = torch.ones(len(a), dtype=torch.bool)
    keep[null] = False
    block64 = a[keep][:, keep].double()
    block64 = 0.5 * (block64 + block64.T)
    block32 = block64.float()
    del a
    v = held_out[:, keep].double()
    n = len(block64)
    report = {"width": len(keep), "zero_rows": len(null), "n": n, "train": args.train, "threads": torch.get_num_threads()}

    (l32, u32), cpu32, wall32, mem32 = measured(lambda: torch.linalg.eigh(block32))
    (l64, u64), cpu64, wall64, mem64 = measured(lambda: torch.linalg.eigh(block64))
    report |= {"float64": {"cpu_s": cpu64, "wall_s": wall64, "peak_growth_mb": mem64 / 2**20},
               "float32": {"cpu_s": cpu32, "wall_s": wall32, "peak_growth_mb": mem32 / 2**20}}  # fmt: skip

    l32d, u32d = l32.double().clamp_min(0), u32.double()
    l64c = l64.clamp_min(0)
    top = l64c.max()
    big = l64c > 1e-6 * top
    report["eigenvalues_above_1e-6_max"] = int(big.sum())
    report["eigenvalue_max_rel_error"] = float(((l32d - l64c).abs()[big] / l64c[big]).max())
    gaps = torch.minimum(torch.cat([l64c[1:] - l64c[:-1], l64c.new_full((1,), float("inf"))]), torch.cat([l64c.new_full((1,), float("inf")), l64c[1:] - l64c[:-1]]))
    separated = big & (gaps > 1e-4 * top)  # float32's rounding moves eigenvectors by about eps32 · λ_max / gap
    cos = (u32d * u64).sum(dim=0).abs()
    report["separated_eigenvectors"] = int(separated.sum())
    report["separated_min_abs_cos"] = float(cos[separated].min()) if separated.any() else None
    angles = {}
    for rel in (1e-2, 1e-4, 1e-6):  # the subspace of the eigenvalues above rel · λ_max
        r = int((l64c > rel * top).sum())
        s = torch.linalg.svdvals(u32d[:, -r:].T @ u64[:, -r:])
        angles[f"{rel:g}"] = {"r": r, "max_angle_deg": float(torch.rad2deg(torch.arccos(s.min().clamp(max=1.0))))}
    report["top_subspace_angles"] = angles
    r = angles["1e-06"]["r"]

    def solve(values, vectors, lam):
        return vectors @ ((vectors.T @ v.T) / (values + lam)[:, None])

    report["kfac_solve_rel_error"] = {}
    for factor in (0.1, 0.001):
        lam = factor * float(l64c.mean())
        exact, approx = solve(l64c, u64, lam), solve(l32d, u32d, lam)
        err = (approx - exact).norm(dim=0) / exact.norm(dim=0)
        report["kfac_solve_rel_error"][f"{factor:g} mean"] = {"median": float(err.median()), "max": float(err.max()), "damping": lam}
    report["orthogonality_float32_top_r"] = float((u32d[:, -r:].T @ u32d[:, -r:] - torch.eye(r, dtype=torch.float64)).abs().max())
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
