# influence_cli — `make demo` runs the main job on the bundled sample data, `make test` runs the tests.
# Both create .venv and install on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO := configs/digits.yaml

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint bench mnist-model clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

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
	$(BIN)/ruff check influence_cli tests benchmarks sample_data
	$(PY) -m pytest -q

test-all: $(STAMP) ## Run every test, the slow ones too (nightly)
	$(PY) -m pytest -q -m ''

lint: $(STAMP) ## ruff
	$(BIN)/ruff check influence_cli tests benchmarks sample_data

mnist-model: $(STAMP) ## Train the MNIST MLP used by configs/mnist*.yaml (runs/mnist/model.safetensors)
	$(PY) benchmarks/train_mnist.py --out runs/mnist/model.safetensors

bench: $(STAMP) mnist-model ## Run the CPU benchmarks (results go to stdout; see docs/BENCHMARKS.md)
	$(PY) benchmarks/bench_fit.py
	$(PY) benchmarks/bench_scores.py

clean: ## Remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
