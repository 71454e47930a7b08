"""Helpers shared by the benchmarks against the field (compare_kronfluence.py, lds.py).

The MNIST workload: an MLP 784-128-128-10 trained with the seeded recipe of
influence_cli.training on MNIST test-split images [0, n_train) from ../shared/data/mnist,
queries from images 9000 on. Statistics: Pearson and Spearman correlations, peak memory.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from mnist_common import IMAGES, LABELS, MLP_KWARGS, ROOT, load_mnist

from influence_cli.models import BUILTIN_ARCHITECTURES
from influence_cli.storage import save_tensors
from influence_cli.training import TrainRecipe, accuracy, train_model

RESULTS = ROOT / "benchmarks" / "results"  # gitignored: cached models, retrained outputs, scores
TRANSFORM = {"flatten": True, "scale": 255.0}
RECIPE = TrainRecipe(epochs=10, batch_size=64, lr=1e-3, seed=0)  # the MLP recipe of these benchmarks


CNN_KWARGS = {"channels": [8, 16], "fc_dim": 64}  # the small CNN of lds.py --arch cnn (two conv layers, two linear)


def model_kwargs(arch: str) -> dict:
    return {"mlp": MLP_KWARGS, "cnn": CNN_KWARGS}[arch]


def as_inputs(x: torch.Tensor, arch: str = "mlp") -> torch.Tensor:
    """Flat MNIST images [n, 784] as the architecture's inputs (images [n, 1, 28, 28] for the CNN)."""
    return x if arch == "mlp" else x.view(-1, 1, 28, 28)


def new_model(seed: int, arch: str = "mlp") -> torch.nn.Module:
    """The architecture with its initial weights drawn from `seed` (build_model always draws them
    from seed 0, so a model of seed 0 is the one the commands build); the caller's RNG is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILTIN_ARCHITECTURES[arch](**model_kwargs(arch))


def new_mlp(seed: int) -> torch.nn.Module:
    return new_model(seed, "mlp")


def train_seeded(x: torch.Tensor, y: torch.Tensor, seed: int = 0, epochs: int = RECIPE.epochs, arch: str = "mlp") -> torch.nn.Module:
    """The benchmarks' recipe: init and data order from `seed`, Adam 1e-3, batch 64 (`arch`: mlp or cnn)."""
    recipe = TrainRecipe(epochs=epochs, batch_size=RECIPE.batch_size, lr=RECIPE.lr, seed=seed)
    return train_model(new_model(seed, arch), as_inputs(x, arch), y, recipe)


def trained_checkpoint(path: Path, n_train: int, seed: int = 0, epochs: int = RECIPE.epochs, arch: str = "mlp") -> tuple[Path, float]:
    """Trains (or reuses, when `path` exists) the model on images [0, n_train); returns the path and the test accuracy."""
    from influence_cli.storage import read_metadata

    key = f"{n_train}:{seed}:{epochs}:init{seed}" + ("" if arch == "mlp" else f":{arch}")  # init: weights drawn from the seed too
    if path.is_file():
        meta = read_metadata(path)
        if meta.get("recipe") == key:
            return path, float(meta["test_accuracy"])
    x, y = load_mnist(0, n_train)
    model = train_seeded(x, y, seed, epochs, arch)
    xt, yt = load_mnist(9000, 10000)
    acc = accuracy(model, as_inputs(xt, arch), yt)
    save_tensors(path, model.state_dict(), {"recipe": key, "test_accuracy": f"{acc:.4f}"})
    return path, acc


def idx_spec(start: int, stop: int, arch: str = "mlp") -> dict:
    """A config data spec of MNIST test-split images [start, stop) (flat for the MLP, [1, 28, 28] for the CNN)."""
    transform = dict(TRANSFORM) if arch == "mlp" else {"scale": 255.0}
    return {"source": "idx", "images": str(IMAGES), "labels": str(LABELS), "range": [start, stop], "transform": transform}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def ranks(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Ranks along `dim` (ties broken by position; the scores here are continuous)."""
    return v.argsort(dim=dim).argsort(dim=dim).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a.flatten()), ranks(b.flatten()))


def rowwise_spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of a [R, K] with the same row of b: [R]."""
    ra, rb = ranks(a, 1), ranks(b, 1)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
