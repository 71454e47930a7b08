"""EKFAC on a convolutional network: a torchvision ResNet-18 at 32 × 32, against one training epoch and Kronfluence.

    python benchmarks/bench_conv.py [--train 1024] [--queries 8] [--repeats 2] [--skip-kronfluence] [--inputs mnist|random] [--size 32] [--arch resnet18|cnn]
    .venv-bench/bin/python benchmarks/bench_conv.py          # with Kronfluence 1.0.x (`make bench-install`)

Real MNIST digits (../shared/data/mnist, test split) padded to 32 × 32 and repeated to 3
channels; `torchvision:resnet18` with 10 classes (seed 0) trained here for one epoch (Adam 1e-3,
batch 64), which is also the timed training epoch. 21 tracked layers (20 Conv2d, 1 Linear), 11.2M
parameters; the positions per example fall from 256 (conv1) to 64, 16, 4 and 1 (layer4), so
the late, wide layers have few positions: the case the position-pair route of squares.py is for.

`--size 64` resizes the digits to 64 × 64 (layer4 then sees 2 × 2 maps, and Kronfluence fits).
`--arch cnn` puts the built-in `cnn` (3 input channels, channels 8 and 16) in the ResNet's place: a
quick run of the script itself (ResNet-18's float64 eigendecompositions alone take about 15 s).

Reports, median of `--repeats` after a warm-up, per phase: influence_cli's fit-factors (both
passes and the float64 eigendecompositions) and compute-scores, Kronfluence's fit_all_factors
and compute_pairwise_scores on the same model, data, batch size (64), empirical Fisher and
damping (0.1 × mean Λ per layer on both sides), and the agreement of the two score matrices.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from field_common import pearson, spearman
from kronfluence_task import kronfluence_missing
from mnist_common import IMAGES, header, load_mnist

from influence_cli.config import config_from_dict
from influence_cli.context import prepare
from influence_cli.fit import compute_factors, fit_factors, plan_for
from influence_cli.scores import compute_scores
from influence_cli.storage import SCORES_FILE, load_tensors, save_tensors

BATCH = 64
ARCHITECTURES = {  # --arch: the model's config entry
    "resnet18": {"architecture": "torchvision:resnet18", "kwargs": {"num_classes": 10}},
    "cnn": {"architecture": "cnn", "kwargs": {"in_channels": 3, "channels": [8, 16], "num_classes": 10}},
}


def digits_32(start: int, stop: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images [start, stop) as [n, 3, size, size] in [0, 1] (padded to 32, then resized), and their labels."""
    x, y = load_mnist(start, stop)
    x = F.pad(x.view(-1, 1, 28, 28), (2, 2, 2, 2))
    if size != 32:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), y


def train_one_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One epoch of Adam (forward, backward, step) over batches of 64 in order; returns its wall seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for s in range(0, len(x), BATCH):
        loss = F.cross_entropy(model(x[s : s + BATCH]), y[s : s + BATCH])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def make_config(tmp: Path, n_train: int, n_query: int, device: str = "cpu", arch: str = "resnet18", size: int = 32) -> dict:
    data = str(tmp / "data.safetensors")
    model = ARCHITECTURES[arch] | {"checkpoint": str(tmp / "model.safetensors")}
    if arch == "cnn":
        model["kwargs"] = model["kwargs"] | {"image_size": size}
    return {
        "model": model,
        "data": {
            "train": {"source": "tensors", "path": data, "range": [0, n_train]},
            "query": {"source": "tensors", "path": data, "range": [n_train, n_train + n_query]},
            "batch_size": BATCH,
        },
        "factors": {"strategy": "ekfac", "fisher": "empirical", "checkpoint_every": 0},
        "scores": {"damping": "auto"},
        "output_dir": str(tmp / "run"),
        "device": device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where influence_cli, the training epoch and Kronfluence run")
    parser.add_argument("--size", type=int, default=32, help="image side (64: layer4 sees 2 × 2 maps)")
    parser.add_argument("--inputs", choices=("mnist", "random"), default="mnist",
                        help="random: Gaussian images with MNIST's labels (no always-zero inputs, for A/B runs of older versions)")
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), default="resnet18", help="cnn: a small built-in CNN instead (a quick run)")
    args = parser.parse_args()
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES}")
    missing = None if args.skip_kronfluence else kronfluence_missing()
    if missing:
        print(f"Kronfluence skipped: {missing}")
    with_kf = not args.skip_kronfluence and missing is None
    workdir = tempfile.TemporaryDirectory(prefix="bench_conv_")  # removed when the script ends
    tmp = Path(workdir.name)
    x, y = digits_32(0, args.train + args.queries, args.size)
    if args.inputs == "random":
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    save_tensors(tmp / "data.safetensors", {"inputs": x, "labels": y}, {})

    import torchvision

    from influence_cli.models import cnn

    spec = make_config(tmp, args.train, args.queries, args.device, args.arch, args.size)["model"]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10) if args.arch == "resnet18" else cnn(**spec["kwargs"])
    device = torch.device(args.device)
    xt, yt = x[: args.train].to(device), y[: args.train].to(device)
    import copy  # a throw-away epoch on a copy first, as every phase below is timed after a warm-up round

    train_one_epoch(copy.deepcopy(model).to(device), xt, yt)
    epoch = train_one_epoch(model.to(device), xt, yt)
    model.cpu().eval()
    save_tensors(tmp / "model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()}, {})
    with torch.no_grad():
        accuracy = float((model(x[args.train :]).argmax(1) == y[args.train :]).float().mean())
    cfg = config_from_dict(make_config(tmp, args.train, args.queries, args.device, args.arch, args.size), base_dir=tmp)

    ctx = prepare(cfg)
    dataset = ctx.dataset(cfg.data.train, "data.train")
    rows: dict[str, list[float]] = {}
    kf_scores, kf_error = None, None
    for r in range(args.repeats + 1 if args.repeats else 1):  # the first round warms up (--repeats 0: one cold round)
        part: dict[str, float] = {}
        t0 = time.perf_counter()
        compute_factors(ctx.model, ctx.tracked, "ekfac", plan_for(ctx, dataset), seconds=part)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        part["fit (in-process)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit_factors(cfg, overwrite=True)
        part["fit-factors (with saving)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compute_scores(cfg, overwrite=True)
        part["compute-scores"] = time.perf_counter() - t0
        if with_kf and kf_error is None:
            from kronfluence_task import run_kronfluence

            try:
                run = run_kronfluence(
                    model, (x[: args.train], y[: args.train]), (x[args.train :], y[args.train :]), tmp / "kronfluence",
                    empirical=True, damping=None, batch_size=BATCH, cpu=ctx.device.type != "cuda",
                )
            except Exception as exc:  # reported, not retried: e.g. its eigh failing to converge
                kf_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            else:
                part["kronfluence fit"], part["kronfluence scores"] = run.seconds["fit"], run.seconds["scores"]
                kf_scores = run.scores
        if r or not args.repeats:
            for k, v in part.items():
                rows.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    ours = load_tensors(tmp / "run" / SCORES_FILE)[0]["scores"]

    print(header())
    name = "ResNet-18" if args.arch == "resnet18" else f"cnn {spec['kwargs']['channels']}"
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name} ({params / 1e6:.1f}M parameters, {len(ctx.tracked)} tracked layers), {args.train:,} training images at {args.size}×{args.size}, {args.queries} queries, "
          f"batch {BATCH}, empirical Fisher, `auto` damping; one epoch of training: {epoch:.2f} s (query accuracy {accuracy:.2f})\n")
    print("| phase | median s | per example (ms) | / one training epoch |")
    print("|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {1e3 * v / args.train:.2f} | {v / epoch:.1f}x |")
    result = {"n_train": args.train, "n_query": args.queries, "epoch_seconds": epoch, "median_seconds": med}
    if kf_error is not None:
        result["kronfluence_error"] = kf_error
        print(f"\nKronfluence failed on this workload: {kf_error}")
    if with_kf and kf_scores is not None:
        fit_ratio = med["fit-factors (with saving)"] / med["kronfluence fit"]  # both write their factors
        score_ratio = med["compute-scores"] / med["kronfluence scores"]
        result |= {"fit_ratio": fit_ratio, "scores_ratio": score_ratio, "pearson": pearson(ours, kf_scores), "spearman": spearman(ours, kf_scores)}
        print(f"\ninfluence_cli / Kronfluence: fit **{fit_ratio:.2f}x**, scores **{score_ratio:.2f}x**; "
              f"score agreement Pearson {result['pearson']:.6f}, Spearman {result['spearman']:.6f}")
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
