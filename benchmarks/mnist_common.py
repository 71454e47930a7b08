"""Shared set-up of the MNIST benchmarks: the real test split from ../shared/data/mnist and the MLP recipe."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MNIST_DIR = Path(os.environ.get("INFLUENCE_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))
IMAGES = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
LABELS = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
MLP_KWARGS = {"input_dim": 784, "hidden": [128, 128], "num_classes": 10}


def mnist_spec(start: int, stop: int, **extra):
    from influence_cli.config import DataSpec, TransformSpec

    return DataSpec(
        source="idx", images=str(IMAGES), labels=str(LABELS), range=[start, stop],
        transform=TransformSpec(flatten=True, scale=255.0), **extra,
    )


def idx_overrides(*keys: str) -> list[str]:
    """`--set` overrides pointing a config's IDX data specs (e.g. `data.train`) at IMAGES and LABELS, so a
    shipped config reads the files found here (INFLUENCE_MNIST_DIR) rather than its own relative paths."""
    return [f"{key}.{part}={path}" for key in keys for part, path in (("images", IMAGES), ("labels", LABELS))]


def load_mnist(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [n, 784] in [0, 1] and labels [n] of MNIST test-split examples [start, stop)."""
    from influence_cli.data import load_dataset, make_loader

    ds = load_dataset(mnist_spec(start, stop), ROOT, name="mnist")
    xs, ys = zip(*[(x, y) for x, y, _ in make_loader(ds, 4096)], strict=True)
    return torch.cat(xs), torch.cat(ys)


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def command_line() -> str:
    """The command as it was run: the interpreter (relative to the repository when it is in it, else by
    its name) and every argument."""
    exe = Path(sys.executable)
    python = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else exe.name
    return " ".join([python, *map(shlex.quote, sys.argv)])


def header(command: str | None = None) -> str:
    """The date, machine and command line (`command_line()` unless given) that a benchmark's result records."""
    return f"date: {time.strftime('%Y-%m-%d')}  machine: {machine()}  command: `{command or command_line()}`"
