"""End-to-end smoke run on real MNIST (tests/mnist_files.py says where): train a small MLP in seconds, then the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from mnist_files import ROOT, idx_overrides, requires_mnist
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import ModelConfig, load_config
from influence_cli.data import load_dataset, make_loader
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.models import build_model
from influence_cli.storage import load_tensors, save_tensors
from influence_cli.tracking import find_tracked_modules
from influence_cli.training import TrainRecipe, accuracy, train_model

CONFIG = ROOT / "configs" / "mnist.yaml"

pytestmark = requires_mnist


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """A 784-64-10 MLP trained on MNIST images 0..2000, saved as a checkpoint; overrides pointing at it."""
    tmp = tmp_path_factory.mktemp("mnist")
    overrides = [
        "model.kwargs.hidden=[64]",
        f"model.checkpoint={tmp / 'model.safetensors'}",
        "data.train.range=[0, 2000]",
        "data.query.range=[9000, 9020]",
        f"output_dir={tmp / 'run'}",
        "device=cpu",
        *idx_overrides("data.train", "data.query"),
    ]
    cfg = load_config(CONFIG, overrides, check_files=False)
    ds = load_dataset(cfg.data.train, cfg.base_dir)
    x, y = (torch.cat(t) for t in zip(*[(bx, by) for bx, by, _ in make_loader(ds, 2000)], strict=True))
    model = build_model(ModelConfig(architecture="mlp", kwargs={"input_dim": 784, "hidden": [64], "num_classes": 10}), ".")
    train_model(model, x, y, TrainRecipe(epochs=3, batch_size=64, lr=2e-3, seed=0))
    assert accuracy(model, x, y) > 0.9
    save_tensors(tmp / "model.safetensors", model.state_dict(), {})
    return tmp, overrides


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    return result


def test_fit_factors_on_mnist(mnist_run):
    tmp, overrides = mnist_run
    sets = [a for o in overrides for a in ("--set", o)]
    result = invoke("fit-factors", str(CONFIG), *sets, "--json")
    report = json.loads(result.stdout)
    assert report["num_examples"] == 2000 and report["strategy"] == "ekfac"
    assert "warning" not in result.stderr  # pixels almost always 0 are rare features, not columns on another scale
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "head"]
    tensors, meta = load_tensors(tmp / "run" / "factors.safetensors")
    assert tensors["fc1.a_eigenvectors"].shape == (785, 785)
    assert tensors["fc1.eigenvalues"].shape == (64, 785)
    assert tensors["head.g_eigenvectors"].shape == (10, 10)
    for name, t in tensors.items():
        assert torch.isfinite(t.float()).all(), name
    # EKFAC's corrected eigenvalues are a second moment: non-negative, and not all zero
    assert (tensors["fc1.eigenvalues"] >= 0).all() and tensors["fc1.eigenvalues"].sum() > 0
    assert meta["config"]["data"]["train"]["range"] == [0, 2000]


def test_a_cnn_on_mnist_pixels_gives_no_column_scale_warning(caplog):
    """The built-in CNN, trained for 3 epochs on 2000 images: the border pixels are rare in conv1's patches, ReLU
    units rare in the layers after it, and none of it is a column on another scale (spreads mean/median of 0.7 to 2.7 measured, against the limit of 100)."""
    cfg = load_config(CONFIG, ["data.train.range=[0, 2000]", "data.train.transform={scale: 255.0}", *idx_overrides("data.train")], check_files=False)
    ds = load_dataset(cfg.data.train, cfg.base_dir)
    x, y = (torch.cat(t) for t in zip(*[(bx, by) for bx, by, _ in make_loader(ds, 2000)], strict=True))
    model = build_model(ModelConfig(architecture="cnn", kwargs={}), ".")
    train_model(model, x, y, TrainRecipe(epochs=3, batch_size=64, lr=2e-3, seed=0))
    assert accuracy(model, x, y) > 0.85
    tracked = find_tracked_modules(model, ["*"])
    plan = PassPlan(lambda start: ((x[i : i + 500], y[i : i + 500], torch.arange(i, i + len(x[i : i + 500]))) for i in range(500 * start, 2000, 500)),
                    4, 2000, "classification", "sampled")  # fmt: skip
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_factors(model, tracked, "kfac", plan)
    assert [t.name for t in tracked] == ["conv1", "conv2", "fc", "head"]
    assert caplog.messages == []


def test_gpu_check_script_dry_runs_on_the_cpu(tmp_path):
    """The prepared GPU check (benchmarks/gpu_check.py) runs end to end with --device cpu, so a run on a GPU machine finds it working."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--train", "300", "--queries", "10", "--repeats", "1",
         "--bf16-floor", "0.95"],  # small fits agree less in bf16 (docs/CONFIG.md); the real check keeps 0.99
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| autocast | covariance ex/s |" in out.stdout
    assert "| bfloat16 |" in out.stdout and "| float16 |" in out.stdout
    assert "scores against float32 scores: bfloat16 Pearson" in out.stdout and ", float16 Pearson" in out.stdout


def test_resnet18_benchmark_runs_end_to_end():
    """benchmarks/bench_conv.py: torchvision's ResNet-18 on 32 × 32 digits, whose last stage's
    3 × 3 convolutions see a 1 × 1 map (8 of 9 taps always padding: the deflated eigh and
    `Rotation`), its late layers few positions (the position-pair route), fit and scored."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_conv.py"), "--train", "64", "--queries", "2", "--repeats", "0", "--skip-kronfluence"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"covariance", "eigendecomposition", "correction", "compute-scores"} <= set(result["median_seconds"])
