"""fit-factors on real MNIST against one plain training epoch, in the same run.

    python benchmarks/bench_fit.py [--train 8000] [--repeats 3] [--strategy ekfac] [--fisher sampled] [--amp none,bfloat16]

MLP 784-128-128-10 (trained here with the seeded recipe), 8,000 training images from
../shared/data/mnist, batch size 256, CPU. Reports the median wall time of each pass,
of both passes together, of one training epoch (forward + backward + Adam step over the same
batches) and their ratio, plus the peak RSS of a whole fit-factors process at 2,000 and
8,000 examples (memory must not grow with the dataset). `--amp none,bfloat16` also times the
passes under `factors.amp: bfloat16` in the same rounds (the epoch stays float32, as trained).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from mnist_common import IMAGES, LABELS, MLP_KWARGS, ROOT, header, load_mnist

from influence_cli.config import config_from_dict
from influence_cli.context import prepare
from influence_cli.data import make_loader
from influence_cli.fit import compute_factors, plan_for
from influence_cli.storage import save_tensors
from influence_cli.training import TrainRecipe, train_model


def make_config(out_dir: Path, n_train: int, strategy: str, fisher: str, batch_size: int = 256, amp: str = "none") -> dict:
    return {
        "model": {"architecture": "mlp", "kwargs": MLP_KWARGS, "checkpoint": str(out_dir / "model.safetensors")},
        "data": {
            "train": {"source": "idx", "images": str(IMAGES), "labels": str(LABELS), "range": [0, n_train],
                      "transform": {"flatten": True, "scale": 255.0}},
            "batch_size": batch_size,
        },
        "factors": {"strategy": strategy, "fisher": fisher, "checkpoint_every": 0, "amp": amp},
        "output_dir": str(out_dir / "run"),
        "device": "cpu",
    }


def train_epoch_seconds(ctx, dataset) -> float:
    model = ctx.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    for x, y, _ in make_loader(dataset, ctx.cfg.data.batch_size):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def peak_rss_mb(config_path: Path) -> float:
    code = (
        "import resource, sys; from influence_cli.config import load_config; from influence_cli.fit import fit_factors;"
        f"fit_factors(load_config({str(config_path)!r}), overwrite=True);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--strategy", default="ekfac")
    parser.add_argument("--fisher", default="sampled")
    parser.add_argument("--amp", default="none", help="comma-separated factors.amp values to time (none,bfloat16)")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES}")
    workdir = tempfile.TemporaryDirectory(prefix="bench_fit_")  # removed when the script ends
    tmp = Path(workdir.name)
    x, y = load_mnist(0, args.train)
    torch.manual_seed(0)
    from influence_cli.config import ModelConfig
    from influence_cli.models import build_model

    model = train_model(build_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS), "."), x, y, TrainRecipe(epochs=3, seed=0))
    save_tensors(tmp / "model.safetensors", model.state_dict(), {})

    amps = args.amp.split(",")
    cfgs = {amp: config_from_dict(make_config(tmp, args.train, args.strategy, args.fisher, amp=amp), base_dir=tmp) for amp in amps}
    ctxs = {amp: prepare(c) for amp, c in cfgs.items()}
    dataset = ctxs[amps[0]].dataset(cfgs[amps[0]].data.train, "data.train")
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        seconds: dict[str, float] = {}
        for amp, ctx in ctxs.items():
            part: dict[str, float] = {}
            t0 = time.perf_counter()
            compute_factors(ctx.model, ctx.tracked, args.strategy, plan_for(ctx, dataset), seconds=part)
            part["fit_total"] = time.perf_counter() - t0
            seconds |= {(k if amp == "none" else f"{k} [{amp}]"): v for k, v in part.items()}
        seconds["train_epoch"] = train_epoch_seconds(prepare(cfgs[amps[0]]), dataset)
        for k, v in seconds.items():
            rows.setdefault(k, []).append(v)
    med = {k: statistics.median(v[1:]) for k, v in rows.items()}
    ratios = {amp: med["fit_total" if amp == "none" else f"fit_total [{amp}]"] / med["train_epoch"] for amp in amps}
    def passes(amp: str) -> float:
        suffix = "" if amp == "none" else f" [{amp}]"
        return sum(med.get(k + suffix, 0.0) for k in ("covariance", "correction", "diagonal"))

    pass_ratios = {amp: passes(amp) / med["train_epoch"] for amp in amps}
    result = {"n_train": args.train, "strategy": args.strategy, "fisher": args.fisher, "median_seconds": med, "fit_over_epoch": ratios, "passes_over_epoch": pass_ratios}
    if not args.skip_memory:
        mem = {}
        for n in (2000, args.train):
            cfg_path = tmp / f"cfg_{n}.json"
            cfg_path.write_text(json.dumps(make_config(tmp / f"mem{n}", n, args.strategy, args.fisher) | {}))
            (tmp / f"mem{n}").mkdir(exist_ok=True)
            (tmp / f"mem{n}" / "model.safetensors").write_bytes((tmp / "model.safetensors").read_bytes())
            mem[n] = peak_rss_mb(cfg_path)
        result["peak_rss_mb"] = mem
    print(header())
    print()
    print(f"| phase | median seconds ({args.repeats} runs) | examples/s |")
    print("|---|---:|---:|")
    for amp in amps:
        for k in ("covariance", "eigendecomposition", "correction", "diagonal", "fit_total"):
            key = k if amp == "none" else f"{k} [{amp}]"
            if key in med:
                rate = "" if k == "eigendecomposition" else f"{args.train / med[key]:,.0f}"
                print(f"| {key} | {med[key]:.3f} | {rate} |")
    print(f"| train_epoch | {med['train_epoch']:.3f} | {args.train / med['train_epoch']:,.0f} |")
    for amp in amps:
        print(f"\nfactors.amp={amp}: fit-factors (passes + eigendecomposition) / one training epoch = **{ratios[amp]:.2f}x**; "
              f"the data passes alone / one training epoch = **{pass_ratios[amp]:.2f}x**")
    if "peak_rss_mb" in result:
        m = result["peak_rss_mb"]
        print(f"peak RSS of a whole fit-factors process: {', '.join(f'{k:,} examples {v:.0f} MB' for k, v in m.items())}"
              f" (ratio {m[args.train] / m[2000]:.3f})")
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
