"""Bytes written by dataset-similarity's resumable progress on real MNIST.

    make mnist-model    # the model it reads
    python benchmarks/bench_progress.py [--model runs/mnist/model.safetensors] [--limit N]

Fits the factors of `configs/mnist.yaml` in a temporary output_dir, runs
`configs/mnist_similarity.yaml` (4 datasets) there with progress saved every 2 batches of 128, and
counts what `storage.save_tensors` writes to progress files: how many, their bytes in all and the largest.
Both configs read MNIST where the benchmarks find it (../shared/data/mnist, or INFLUENCE_MNIST_DIR).
`--limit N` keeps at most N examples of every dataset (a quick run of the script; the figures are of the whole sets).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mnist_common import ROOT, header, idx_overrides

from influence_cli import load_config, storage
from influence_cli.fit import fit_factors
from influence_cli.similarity import dataset_similarity

FIT_CONFIG = ROOT / "configs" / "mnist.yaml"
SIMILARITY_CONFIG = ROOT / "configs" / "mnist_similarity.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "mnist" / "model.safetensors", help="the MNIST MLP checkpoint (make mnist-model)")
    parser.add_argument("--limit", type=int, default=None, help="keep at most this many examples of each dataset (default: all)")
    args = parser.parse_args()
    model = args.model.resolve()
    if not model.is_file():
        raise SystemExit(f"{model} is missing: run `make mnist-model` first")
    datasets = [f"similarity.datasets.{name}" for name in load_config(SIMILARITY_CONFIG, check_files=False).similarity.datasets]

    def limited(*keys: str) -> list[str]:
        return [] if args.limit is None else [f"{key}.limit={args.limit}" for key in keys]

    written: list[int] = []
    save = storage.save_tensors

    def counted(path, tensors, *args, **kwargs):
        if Path(path).name.startswith("similarity.partial"):  # this pass's progress, not the fit's
            written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return save(path, tensors, *args, **kwargs)

    storage.save_tensors = counted
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sets = [f"output_dir={out}", "device=cpu", f"model.checkpoint={model}", *limited("data.train")]
        fit_factors(load_config(FIT_CONFIG, [*sets, *idx_overrides("data.train", "data.query")]))
        sets += ["factors.checkpoint_every=2", "data.batch_size=128", *idx_overrides("data.train", *datasets), *limited(*datasets)]
        start = time.perf_counter()
        dataset_similarity(load_config(SIMILARITY_CONFIG, sets), overwrite=True)
        seconds = time.perf_counter() - start
    print(header())
    print(f"progress files written: {len(written)}, {sum(written) / 2**20:.1f} MiB in all, largest {max(written) / 2**20:.2f} MiB ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
