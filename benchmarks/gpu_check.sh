#!/usr/bin/env bash
# One prepared GPU check: fit-factors and compute-scores on real MNIST on one GPU (float32 and
# bf16 autocast), throughput per pass and peak GPU memory, and Kronfluence on the same workload
# when it is installed; ResNet-18 fit and scores (bench_conv.py); the CUDA tests (tests/test_gpu.py). Also a 2-GPU torchrun smoke run when two GPUs are visible.
#   bash benchmarks/gpu_check.sh            (from the repository root; PYTHON=... to pick the interpreter)
# It reads the MNIST test split from ../shared/data/mnist, or from INFLUENCE_MNIST_DIR (on a machine
# that has only the repository, copy the two t10k-*.gz files into a folder there and point at it).
# Everything it prints is also written to $OUT/gpu_check.txt ($OUT: benchmarks/results when unset).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOG="${OUT:-benchmarks/results}/gpu_check.txt"
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
date -u +"date: %Y-%m-%d %H:%M UTC"
(cd benchmarks && "$PYTHON" -c "from mnist_common import IMAGES, LABELS; missing = [str(p) for p in (IMAGES, LABELS) if not p.is_file()]; assert not missing, 'MNIST test split missing: ' + ', '.join(missing) + ' (set INFLUENCE_MNIST_DIR)'")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$PYTHON" -c "import influence_cli" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps -e .
"$PYTHON" benchmarks/gpu_check.py "$@"
# CUDA paths of the test suite (skipped on CPU-only machines): a padded language model on the GPU against the CPU, out-of-vocabulary ids.
"$PYTHON" -m pytest -q -rs tests/test_gpu.py
# A convolutional network on the GPU: torchvision's ResNet-18 at 32 x 32 (deflated eigh, position pairs).
"$PYTHON" benchmarks/bench_conv.py --device cuda --train 4096 --queries 8 --repeats 1 --skip-kronfluence | tail -n 14
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  out=$(mktemp -d)
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m influence_cli fit-factors configs/digits.yaml \
      --set device=cuda --set output_dir="$out" --json | tail -n 5
fi
