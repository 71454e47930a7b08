"""Memorization in the curvature spectrum, on real MNIST (configs/mnist_memorization.yaml).

    python benchmarks/memorization.py [--epochs 40] [--out-dir runs/memorization] [--train 6000]

1. Trains the config's MLP on data.train (MNIST images 0..6000, 5% random wrong labels from
   label_noise) until the random labels are memorized, and saves model.checkpoint.
2. fit-factors (EKFAC, sampled Fisher) on the same training set.
3. spectrum: share of each example's loss-gradient energy in the low-curvature band, for the
   memorized random labels (train:noisy), the clean rest (train:clean) and held-out images; how
   well each example's bottom-band energy (the ranking of `spectrum --top`), its share, its whole
   gradient energy and its self-influence (compute-scores --self) single out the random labels,
   and, for comparison, each example's training loss on its label (which compute-scores --self
   stores beside the self-influence: top-k --self --rank-by loss).
4. edit: removes the low-curvature components of every layer and measures accuracy on the
   memorized random labels, on the clean training labels and on held-out images 9000..10000.

Prints markdown tables with the date, machine and command (see docs/MEMORIZATION.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from mnist_common import IMAGES, ROOT, header, idx_overrides

from influence_cli.band_energy import spectrum
from influence_cli.config import load_config
from influence_cli.data import load_dataset, make_loader
from influence_cli.edit import edit_checkpoint
from influence_cli.fit import fit_factors
from influence_cli.models import build_model, load_model
from influence_cli.scores import compute_scores
from influence_cli.spectrum_plot import save_spectrum_plot
from influence_cli.storage import save_tensors
from influence_cli.topk import load_self_influence
from influence_cli.training import TrainRecipe, accuracy, train_model

CONFIG = ROOT / "configs" / "mnist_memorization.yaml"
EDITS = [("share", 0.2), ("share", 0.1), ("share", 0.05), ("mass", 0.999), ("mass", 0.99), ("mass", 0.9), ("mass", 0.6)]


def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x, y) for x, y, _ in make_loader(ds, 4096)], strict=True)
    return torch.cat(xs), torch.cat(ys)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting one half (Mann-Whitney)."""
    ranks = torch.empty(len(scores), dtype=torch.float64)
    order = torch.argsort(scores, stable=True)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for v in torch.unique(scores[order]):  # average ranks of ties
        tie = scores == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run(seed: int, epochs: int, weight_decay: float, out_dir: Path | None, n_train: int | None = None) -> dict:
    """Train, fit, measure and edit for one seed (label noise and data order); returns every number."""
    overrides = ["device=cpu", f"seed={seed}", *idx_overrides("data.train", "spectrum.datasets.train", "spectrum.datasets.heldout")]
    if n_train is not None:  # images [0, n_train) instead of the config's 6,000
        overrides += [f"{spec}.range=[0, {n_train}]" for spec in ("data.train", "spectrum.datasets.train")]
    if out_dir is not None:
        out = out_dir.resolve()
        overrides += [f"output_dir={out}", f"model.checkpoint={out / 'model.safetensors'}"]
    cfg = load_config(CONFIG, overrides, check_files=False)
    t_all = time.perf_counter()

    # 1. train on the noisy labels
    train = load_dataset(cfg.data.train, cfg.base_dir, name="data.train", seed=cfg.seed)
    held = load_dataset(cfg.spectrum.datasets["heldout"], cfg.base_dir, name="heldout")
    x, y = tensors(train)
    xh, yh = tensors(held)
    noisy = train.noisy_mask
    model = build_model(cfg.model, cfg.base_dir)
    t0 = time.perf_counter()
    train_model(model, x, y, TrainRecipe(epochs=epochs, batch_size=64, lr=1e-3, weight_decay=weight_decay, seed=seed))
    t_train = time.perf_counter() - t0
    save_tensors(cfg.resolve(cfg.model.checkpoint), model.state_dict(), {"trained_by": "benchmarks/memorization.py", "seed": seed})

    def accuracies(m) -> dict[str, float]:
        return {
            "noisy": accuracy(m, x[noisy], y[noisy]),  # the memorized random labels
            "noisy_true": accuracy(m, x[noisy], train.clean_labels[noisy]),  # the same images, their real labels
            "clean": accuracy(m, x[~noisy], y[~noisy]),
            "heldout": accuracy(m, xh, yh),
        }

    base = accuracies(model)

    # 2. factors, 3. spectrum (both orders)
    t0 = time.perf_counter()
    fit_factors(cfg, overwrite=True)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    ekfac = spectrum(cfg, order="ekfac", overwrite=True)
    report = spectrum(cfg, order="kfac", overwrite=True)
    t_spec = (time.perf_counter() - t0) / 2
    plot = save_spectrum_plot(cfg.output_path / "spectrum.png", report)
    ds = report.datasets[0]
    score = ds.bottom_share()
    head = ds.band_energy[:, report.layers.index("head")]  # the score of `influence spectrum --layers head`
    head_score = head[:, 0] / head.sum(1).clamp_min(1e-300)
    top_k = 100
    t0 = time.perf_counter()
    compute_scores(cfg, self_influence=True, overwrite=True)  # the other detector: self-influence
    t_self = time.perf_counter() - t0
    own = load_self_influence(cfg.output_path)
    at = {int(g): i for i, g in enumerate(own.train_indices.tolist())}
    self_influence = own.values[[at[int(g)] for g in ds.global_indices.tolist()]]
    train_loss = own.train_losses[[at[int(g)] for g in ds.global_indices.tolist()]]  # the plainest detector: the loss on the (noisy) label

    # 4. edits
    edits = []
    for keep, value in EDITS:
        path = cfg.output_path / f"edited_{keep}_{value:g}.safetensors"
        er = edit_checkpoint(cfg, path, overwrite=True, **({"rho": value} if keep == "mass" else {"share": value}))
        acc = accuracies(load_model(cfg.model, cfg.base_dir, checkpoint=path))
        kept = sum(layer.directions - layer.removed for layer in er.layers) / sum(layer.directions for layer in er.layers)
        removed_w = ", ".join(f"{layer.weight_share_removed:.0%}" for layer in er.layers)
        edits.append((keep, value, kept, removed_w, acc))
        path.unlink()
    return {
        "cfg": cfg, "report": report, "ekfac": ekfac, "plot": plot, "n": len(x), "n_noisy": int(noisy.sum()),
        "auroc_energy": auroc(ds.bottom_energy(), ds.noisy), "auroc": auroc(score, ds.noisy), "auroc_head": auroc(head_score, ds.noisy),
        "auroc_total": auroc(ds.band_energy.sum(dim=(1, 2)), ds.noisy), "auroc_self": auroc(self_influence, ds.noisy),
        "top_noisy": sum(row["noisy"] for row in report.top_examples(top_k)["train"]) / top_k,
        "top_noisy_share": sum(row["noisy"] for row in report.top_examples(top_k, "share")["train"]) / top_k,
        "auroc_loss": auroc(train_loss, ds.noisy), "top_noisy_loss": float(ds.noisy[torch.argsort(train_loss, descending=True, stable=True)[:top_k]].double().mean()),
        "top_noisy_self": float(ds.noisy[torch.argsort(self_influence, descending=True, stable=True)[:top_k]].double().mean()),
        "top_k": top_k, "base_rate": float(noisy.double().mean()), "base": base, "edits": edits,
        "seconds": {"train": t_train, "fit": t_fit, "spectrum": t_spec, "self": t_self, "total": time.perf_counter() - t_all},
    }  # fmt: skip


def print_details(r: dict, epochs: int, weight_decay: float) -> None:
    cfg, report = r["cfg"], r["report"]
    t = r["seconds"]
    print(f"seed {cfg.seed}: MLP {cfg.model.kwargs['hidden']} trained {epochs} epochs (Adam 1e-3, weight decay {weight_decay:g}) on "
          f"{r['n']:,} MNIST images with {r['n_noisy']} random labels: {t['train']:.1f}s; fit-factors {t['fit']:.1f}s; "
          f"spectrum {t['spectrum']:.1f}s; self-influence {t['self']:.1f}s; total {t['total']:.1f}s")  # fmt: skip
    print()
    groups = {g.name: g for g in report.groups}
    names = report.band_names()
    cols = ("train:noisy", "train:clean", "heldout")
    print(f"| {report.order} bands: mean share of gradient energy | "
          + " | ".join(f"{c} (n={groups[c].size})" for c in cols) + " | noisy vs clean |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")

    def row(label: str, values: list[float]) -> None:
        print(f"| {label} | " + " | ".join(f"{100 * v:.2f}%" for v in values) + f" | {100 * (values[0] / values[1] - 1):+.0f}% |")

    for k, name in enumerate(names):
        if any(b.counts[k] for b in report.bands):
            row(f"{name}, all layers", [float(groups[c].share[k]) for c in cols])
    for i, layer in enumerate(report.layers):
        row(f"{names[0]}, {layer}", [float(groups[c].layer_share[i, 0]) for c in cols])
    for i, layer in enumerate(report.layers):
        row(f"input energy, {names[0]} of A-directions, {layer}", [float(groups[c].layer_input_share[i, 0]) for c in cols])
    eg = {g.name: g for g in r["ekfac"].groups}
    row(f"ekfac order: {names[0]}, all layers", [float(eg[c].share[0]) for c in cols])
    print()
    print(f"per-example detectors of the random labels, AUROC noisy vs clean: bottom-band energy (spectrum --top) {r['auroc_energy']:.3f}, "
          f"bottom-band share (--rank-by share) {r['auroc']:.3f}, head only {r['auroc_head']:.3f}; the whole gradient energy "
          f"{r['auroc_total']:.3f}; self-influence (compute-scores --self) {r['auroc_self']:.3f}. Random labels among the {r['top_k']} "
          f"top-ranked training examples: by energy {r['top_noisy']:.0%}, by share {r['top_noisy_share']:.0%} (base rate "
          f"{r['base_rate']:.0%}); plot {r['plot']}")  # fmt: skip
    print()
    print("| edit (every layer) | directions kept | ‖W‖² removed (fc1, head) | memorized random labels | same images, true labels "
          "| clean train | held-out 9000..10000 |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    b = r["base"]
    print(f"| none | 100% | - | {b['noisy']:.1%} | {b['noisy_true']:.1%} | {b['clean']:.1%} | {b['heldout']:.1%} |")
    for keep, value, kept, removed_w, acc in r["edits"]:
        label = f"keep share {value:g}" if keep == "share" else f"keep mass rho {value:g}"
        print(f"| {label} | {kept:.2%} | {removed_w} | {acc['noisy']:.1%} | {acc['noisy_true']:.1%} | {acc['clean']:.1%} | {acc['heldout']:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the label noise and data order")
    parser.add_argument("--out-dir", type=Path, default=None, help="output_dir (default: the config's, runs/memorization)")
    parser.add_argument("--train", type=int, default=None, help="train on images [0, N) (default: the config's 0..6000; fewer for a quick run)")
    args = parser.parse_args()
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES} (set INFLUENCE_MNIST_DIR)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # the last seed run is the first one, so the checkpoint and factors left on disk are seed seeds[0]'s
    results = {seed: run(seed, args.epochs, args.weight_decay, args.out_dir, args.train) for seed in [*args.seeds[1:], args.seeds[0]]}
    print(header())
    print()
    print_details(results[args.seeds[0]], args.epochs, args.weight_decay)
    print()
    share = EDITS.index(("share", 0.1))
    print("| seed | bottom 90% share noisy / clean, all layers | ratio | ratio, ekfac order | ratio, head "
          "| AUROC bottom energy / share / head share | AUROC all energy / self-influence | top-100 noisy by energy / share "
          "| keep share 0.1: memorized labels | true labels | clean train | held-out |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        r = results[seed]
        g = {x.name: x for x in r["report"].groups}
        e = {x.name: x for x in r["ekfac"].groups}
        n, c = float(g["train:noisy"].share[0]), float(g["train:clean"].share[0])
        en, ec = float(e["train:noisy"].share[0]), float(e["train:clean"].share[0])
        b, a = r["base"], r["edits"][share][4]
        h = r["report"].layers.index("head")
        hn, hc = float(g["train:noisy"].layer_share[h, 0]), float(g["train:clean"].layer_share[h, 0])
        print(f"| {seed} | {100 * n:.2f}% / {100 * c:.2f}% | {100 * (n / c - 1):+.0f}% | {100 * (en / ec - 1):+.0f}% | {100 * (hn / hc - 1):+.0f}% "
              f"| {r['auroc_energy']:.3f} / {r['auroc']:.3f} / {r['auroc_head']:.3f} | {r['auroc_total']:.3f} / {r['auroc_self']:.3f} "
              f"| {r['top_noisy']:.0%} / {r['top_noisy_share']:.0%} "
              f"| {b['noisy']:.0%} → {a['noisy']:.0%} | {b['noisy_true']:.0%} → {a['noisy_true']:.0%} "
              f"| {b['clean']:.1%} → {a['clean']:.1%} | {b['heldout']:.1%} → {a['heldout']:.1%} |")  # fmt: skip
    print()
    top_k = results[args.seeds[0]]["top_k"]
    print(f"| seed | random labels memorized | AUROC self-influence / training loss | top-{top_k} noisy by self-influence / training loss |")
    print("|---:|---:|---:|---:|")
    for seed in args.seeds:
        r = results[seed]
        print(f"| {seed} | {r['base']['noisy']:.0%} | {r['auroc_self']:.3f} / {r['auroc_loss']:.3f} | {r['top_noisy_self']:.0%} / {r['top_noisy_loss']:.0%} |")
    print()
    print(f"total {time.perf_counter() - t0:.1f}s for {len(args.seeds)} seeds")


if __name__ == "__main__":
    main()
