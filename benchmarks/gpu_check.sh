#!/usr/bin/env bash
# One prepared GPU check: fit-factors and compute-scores on real MNIST on one GPU (float32 and
# bf16 autocast), throughput per pass, peak GPU memory and the ratio to one training epoch, and
# Kronfluence on the same workload when it is installed; where those passes spend their time
# (gpu_profile.py); ResNet-18 at 64 x 64 fit and scored
# against Kronfluence (bench_conv.py); the bundled models' scores on the GPU against the CPU with
# TF32 off and on (tf32_gap.py); the CUDA tests (tests/test_gpu.py). Also a 2-GPU torchrun
# smoke run when two GPUs are visible.
#   bash benchmarks/gpu_check.sh            (from the repository root; PYTHON=... to pick the interpreter)
# It reads the MNIST test split from ../shared/data/mnist, or from INFLUENCE_MNIST_DIR (on a machine
# that has only the repository, copy the two t10k-*.gz files into a folder there and point at it).
# Everything it prints is also written to $OUT/gpu_check.txt ($OUT: benchmarks/results when unset).
# Every step runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOG="${OUT:-benchmarks/results}/gpu_check.txt"
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
failed=()
step() {  # step NAME COMMAND...: run it, remember a failure, go on
  local name=$1; shift
  echo; echo "== $name"
  "$@" || failed+=("$name")
}
date -u +"date: %Y-%m-%d %H:%M UTC"
(cd benchmarks && "$PYTHON" -c "from mnist_common import IMAGES, LABELS; missing = [str(p) for p in (IMAGES, LABELS) if not p.is_file()]; assert not missing, 'MNIST test split missing: ' + ', '.join(missing) + ' (set INFLUENCE_MNIST_DIR)'") || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
"$PYTHON" -c "import influence_cli" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps -e . || exit 1
export PYTHONWARNINGS=ignore::FutureWarning  # Kronfluence's GradScaler deprecation, once per call
step "MNIST MLP: fit-factors and compute-scores, float32, bf16 and float16 (gpu_check.py)" "$PYTHON" benchmarks/gpu_check.py "$@"
# Where the MNIST passes spend their time: host syncs by line, kernels per batch, the GPU's busy share, a Python profile.
step "MNIST MLP: syncs, kernels and host time per batch (gpu_profile.py)" "$PYTHON" benchmarks/gpu_profile.py --out "$(dirname "$LOG")"
# A convolutional network on the GPU: torchvision's ResNet-18 at 64 x 64 (layer4 sees 2 x 2 maps, where Kronfluence fits too).
step "ResNet-18 at 64 x 64 against Kronfluence (bench_conv.py)" \
  "$PYTHON" benchmarks/bench_conv.py --device cuda --size 64 --train 4096 --queries 8 --repeats 1
# The bundled MLP and CNN on the GPU against the CPU, with the float32 passes' TF32 off (as shipped) and on.
step "GPU against CPU, TF32 off and on (tf32_gap.py)" "$PYTHON" benchmarks/tf32_gap.py
# CUDA paths of the test suite (skipped on CPU-only machines): a padded language model on the GPU against the CPU, out-of-vocabulary ids.
step "CUDA tests (tests/test_gpu.py)" "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
if [ "$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  out=$(mktemp -d)
  step "torchrun, 2 GPUs" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 -m influence_cli fit-factors configs/digits.yaml \
      --set device=cuda --set output_dir="$out" --json
fi
echo
if [ ${#failed[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${failed[@]}"; exit 1; fi
echo "gpu check: every step passed"
