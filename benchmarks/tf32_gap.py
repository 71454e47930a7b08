"""Why float32 passes turn TF32 off on CUDA: the bundled models' scores on the GPU against the CPU.

    python benchmarks/tf32_gap.py [--configs configs/digits.yaml configs/digits_cnn.yaml]

PyTorch runs float32 convolutions in TF32 on Ampere and newer GPUs by default (10-bit mantissa);
influence_cli's float32 passes turn it off for the model's forward and backward
(`passes.ieee_float32`). For each config this runs fit-factors and compute-scores on the CPU, on
CUDA as shipped, and on CUDA with TF32 left on for cuDNN and cuBLAS, and prints each GPU run's
largest score difference from the CPU (relative to the largest |score|), the Pearson correlation,
and the share of each query's top 10 proponents that the GPU run keeps. Needs a CUDA GPU
(`--device cpu --configs configs/digits.yaml` is a dry run of the script itself, the "GPU" runs on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
from field_common import pearson
from mnist_common import ROOT, header

import influence_cli.passes as passes
from influence_cli.config import load_config
from influence_cli.fit import fit_factors
from influence_cli.scores import compute_scores
from influence_cli.storage import SCORES_FILE, load_tensors


@contextlib.contextmanager
def tf32_on(device: torch.device, amp: str):
    """The passes as they would run with PyTorch's defaults plus TF32 matmuls: TF32 for cuDNN and cuBLAS."""
    backends = torch.backends
    settings = [backends.cudnn.conv, backends.cuda.matmul]
    saved = [s.fp32_precision for s in settings]
    try:
        for s in settings:
            s.fp32_precision = "tf32"
        yield
    finally:
        for s, value in zip(settings, saved, strict=True):
            s.fp32_precision = value


def run(config: Path, out: Path, device: str) -> tuple[torch.Tensor, float]:
    """[Q, N] float64 scores of fit-factors + compute-scores, and their wall seconds."""
    cfg = load_config(config, [f"device={device}", f"output_dir={out}"])
    t0 = time.perf_counter()
    fit_factors(cfg, overwrite=True)
    compute_scores(cfg, overwrite=True)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return load_tensors(out / SCORES_FILE)[0]["scores"].double(), seconds


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean share of each query's k most positive scores in a that are among b's k."""
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ta, tb, strict=True)) / ta.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/digits.yaml", "configs/digits_cnn.yaml"])
    parser.add_argument("--device", default="cuda", help="the GPU runs' device (cpu: a dry run of the script)")
    args = parser.parse_args()
    gpu = args.device
    if gpu != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    print(header() + f"  gpu: {torch.cuda.get_device_name() if gpu != 'cpu' else 'none (dry run)'}\n")
    print("| config | GPU run | max |Δ| / max |score| | Pearson with CPU | top-10 kept | fit + scores (s) |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="tf32_gap_") as tmp:
        for config in args.configs:
            path = ROOT / config
            cpu, cpu_s = run(path, Path(tmp) / "cpu", "cpu")
            print(f"| {config} | (cpu) | | | | {cpu_s:.2f} |")
            run(path, Path(tmp) / "warm", gpu)  # CUDA start-up and cuDNN's choice of kernels, untimed
            shipped = passes.ieee_float32
            for name, guard in (("float32 (TF32 off, as shipped)", shipped), ("TF32 on", tf32_on)):
                passes.ieee_float32 = guard
                try:
                    scores, secs = run(path, Path(tmp) / "gpu", gpu)
                finally:
                    passes.ieee_float32 = shipped
                gap = float((scores - cpu).abs().max()) / float(cpu.abs().max())
                print(f"| {config} | {name} | {gap:.1e} | {pearson(scores, cpu):.6f} | {top_overlap(scores, cpu):.2f} | {secs:.2f} |")


if __name__ == "__main__":
    main()
