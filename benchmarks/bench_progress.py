"""Bytes written by dataset-similarity's resumable progress on real MNIST.

    make mnist-model    # the model it reads
    python benchmarks/bench_progress.py

Fits the factors of `configs/mnist.yaml` in a temporary output_dir, runs
`configs/mnist_similarity.yaml` (4 datasets) there with progress saved every 2 batches of 128, and
counts what `storage.save_tensors` writes to progress files: how many, their bytes in all and the largest.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mnist_common import ROOT, header

from influence_cli import load_config, storage
from influence_cli.fit import fit_factors
from influence_cli.similarity import dataset_similarity


def main() -> None:
    model = ROOT / "runs" / "mnist" / "model.safetensors"
    if not model.is_file():
        raise SystemExit(f"{model} is missing: run `make mnist-model` first")
    written: list[int] = []
    save = storage.save_tensors

    def counted(path, tensors, *args, **kwargs):
        if Path(path).name.startswith("similarity.partial"):  # this pass's progress, not the fit's
            written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return save(path, tensors, *args, **kwargs)

    storage.save_tensors = counted
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sets = [f"output_dir={out}", "device=cpu"]
        fit_factors(load_config(ROOT / "configs" / "mnist.yaml", sets))
        sets += ["factors.checkpoint_every=2", "data.batch_size=128"]
        start = time.perf_counter()
        dataset_similarity(load_config(ROOT / "configs" / "mnist_similarity.yaml", sets), overwrite=True)
        seconds = time.perf_counter() - start
    print(header())
    print(f"progress files written: {len(written)}, {sum(written) / 2**20:.1f} MiB in all, largest {max(written) / 2**20:.2f} MiB ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
