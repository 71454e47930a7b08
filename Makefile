# influence_cli — `make demo` runs the main job on the bundled sample data, `make test` runs the tests.
# Both create .venv and install on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO := configs/digits.yaml
# Threads of every benchmark process (torch reads OMP_NUM_THREADS at start-up); each result records it.
BENCH_THREADS ?= $(shell nproc)

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint bench bench-install bench-field gpu-check mnist-model clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package with its dev tools

demo: $(STAMP) ## Fit EKFAC factors, score, rank and compare datasets on the bundled digits sample
	$(BIN)/influence inspect $(DEMO)
	$(BIN)/influence fit-factors $(DEMO) --overwrite
	$(BIN)/influence compute-scores $(DEMO) --overwrite
	$(BIN)/influence top-k $(DEMO) --query 0:3 --k 5 --image-grid runs/digits/top_k.png
	$(BIN)/influence compute-scores $(DEMO) --self --overwrite
	$(BIN)/influence top-k $(DEMO) --self --k 10
	$(BIN)/influence dataset-similarity $(DEMO) --overwrite --heatmap runs/digits/similarity.png

test: $(STAMP) ## Run the test suite (includes the real-MNIST smoke run and 2-process distributed tests)
	$(BIN)/ruff check influence_cli tests benchmarks sample_data docs
	$(PY) -m pytest -q

test-all: $(STAMP) ## Run every test, including those marked slow (nightly: the benchmark scripts that are mostly process start-ups)
	$(PY) -m pytest -q -m ''

lint: $(STAMP) ## ruff
	$(BIN)/ruff check influence_cli tests benchmarks sample_data docs

mnist-model: $(STAMP) ## Train the MNIST MLP of configs/mnist.yaml and mnist_similarity.yaml (runs/mnist/model.safetensors)
	$(PY) benchmarks/train_mnist.py --out runs/mnist/model.safetensors

bench bench-field: export OMP_NUM_THREADS = $(BENCH_THREADS)
bench bench-field: export MKL_NUM_THREADS = $(BENCH_THREADS)

bench: $(STAMP) mnist-model ## Run the CPU benchmarks (results go to stdout; see docs/BENCHMARKS.md; BENCH_THREADS=n pins the threads, default all cores)
	$(PY) benchmarks/bench_fit.py --amp none,bfloat16
	$(PY) benchmarks/bench_scores.py --amp bfloat16
	$(PY) benchmarks/bench_conv.py --skip-kronfluence
	$(PY) benchmarks/bench_lm.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_progress.py
	$(PY) benchmarks/memorization.py
	$(PY) tests/test_exactness.py

# Kronfluence is a benchmark-only extra (pyproject `bench`): it goes into .venv-bench, a venv that
# sees .venv's packages (torch, influence_cli) through a .pth file, never into .venv itself.
$(BENCH_STAMP): $(STAMP)
	test -x $(BENCH_PY) || $(PY) -m venv $(BENCH_VENV)
	printf 'import site; site.addsitedir(%s)\n' "'$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')'" \
		> "$$($(BENCH_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_influence_main_venv.pth"
	$(BENCH_PY) -m pip install -q 'kronfluence>=1.0,<1.1'
	touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP) ## Create .venv-bench: .venv's packages plus Kronfluence (for the benchmarks against it)

bench-field: $(BENCH_STAMP) ## Benchmarks against Kronfluence: scores agreement, speed, LDS, ensembles (~15 min; docs/BENCHMARKS.md)
	$(BENCH_PY) benchmarks/compare_kronfluence.py --amp bfloat16
	$(BENCH_PY) benchmarks/bench_conv.py
	$(BENCH_PY) benchmarks/lds.py

gpu-check: $(STAMP) ## On a machine with a GPU: fit-factors and compute-scores on MNIST, float32 and bf16, ResNet-18, the CUDA tests (docs/BENCHMARKS.md)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean: ## Remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
