"""Train the MNIST MLP (784-128-128-10) used by configs/mnist*.yaml and the benchmarks.

    python benchmarks/train_mnist.py --out runs/mnist/model.safetensors [--train 0:8000] [--epochs 5]

Trains on MNIST test-split images [start, stop) from ../shared/data/mnist with the seeded
recipe of influence_cli.training, and prints the accuracy on images 9000..10000.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from mnist_common import IMAGES, MLP_KWARGS, load_mnist

from influence_cli.models import mlp
from influence_cli.storage import save_tensors
from influence_cli.training import TrainRecipe, accuracy, train_model


def train(out: Path, start: int = 0, stop: int = 8000, epochs: int = 5, seed: int = 0) -> float:
    x, y = load_mnist(start, stop)
    xt, yt = load_mnist(9000, 10000)
    torch.manual_seed(seed)
    model = mlp(**MLP_KWARGS)  # initial weights from `seed` (build_model draws them from seed 0 whatever the seed)
    train_model(model, x, y, TrainRecipe(epochs=epochs, batch_size=64, lr=1e-3, seed=seed))
    acc = accuracy(model, xt, yt)
    save_tensors(out, model.state_dict(), {"architecture": "mlp", "kwargs": MLP_KWARGS, "train_range": [start, stop], "test_accuracy": acc})
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mnist/model.safetensors"))
    parser.add_argument("--train", default="0:8000", help="start:stop of the training images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not IMAGES.exists():
        raise SystemExit(f"MNIST not found at {IMAGES} (set INFLUENCE_MNIST_DIR)")
    start, stop = (int(v) for v in args.train.split(":"))
    t0 = time.perf_counter()
    acc = train(args.out, start, stop, args.epochs, args.seed)
    print(f"saved {args.out}: accuracy on images 9000..10000 = {acc:.4f} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
