"""Where the tests find real MNIST: one setting for every test that reads it.

`INFLUENCE_MNIST_DIR` (the same variable the benchmarks read), else `../shared/data/mnist` beside
the repository, where `configs/mnist*.yaml` look. Tests that need the files skip with the path
they tried when it holds none.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("INFLUENCE_MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist")
IMAGES = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
LABELS = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"

requires_mnist = pytest.mark.skipif(
    not (IMAGES.is_file() and LABELS.is_file()),
    reason=f"real MNIST test split not found in {MNIST_DIR} (set INFLUENCE_MNIST_DIR)",
)


def idx_overrides(*keys: str) -> list[str]:
    """`--set` overrides pointing the config's IDX sources (e.g. `data.train`) at MNIST_DIR."""
    return [f"{key}.{part}={path}" for key in keys for part, path in (("images", IMAGES), ("labels", LABELS))]
