"""The warning fit-factors gives after pass 1 when a layer's input columns are on scales far apart.

One tabular column on a scale of 1e6 sets auto damping (0.1 × the mean eigenvalue) some 1e10 times
above the other columns' curvature, so the scores follow that column alone; at damping 0 float32
factors cannot resolve the other columns either. Rare features (pixels almost always 0) sit below
the median column and must not trigger it: MNIST (tests/test_mnist_smoke.py), the digits configs
(tests/test_cli.py) and the language-model example (tests/test_examples.py) fit without it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from exact import batches_of
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.factors import SCALE_SPREAD, basis_diagonal, column_scales, eigendecompose
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores
from influence_cli.models import mlp
from influence_cli.tracking import find_tracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
WARNING = "on a scale up to"


def test_a_column_far_above_the_median_is_flagged_and_a_rare_one_is_not():
    """E[a_j²] of 1e12 among columns of 1: flagged. 300 pixels of E[a²] 0.3 beside 200 almost always 0
    (E[a²] down to 1e-9, min/median 3e-9 like MNIST's first layer) and a bias column: not."""
    found = column_scales(torch.tensor([1.0, 2.0, 1e12, 0.5, 1.0, 0.0, 1.0]))
    assert found is not None and found.columns == [2]
    assert found.spread == pytest.approx(1e12 / 7 / 1.0) and found.ratios == [pytest.approx(1e12)]
    pixels = torch.cat([torch.full((300,), 0.3), torch.logspace(-9, -3, 200), torch.zeros(80), torch.ones(1)])
    assert column_scales(pixels) is None
    spread = float(pixels.mean() / pixels[pixels > 0].median())
    assert spread < 1  # the rare pixels pull the mean down, not the median up
    # E[a²] 1000 times the others': among 3 columns it sets auto damping (spread 251), among 99 it barely moves it (spread 11)
    assert column_scales(torch.tensor([1.0, 1.0, 1.0, 10.0 * SCALE_SPREAD])) is not None
    assert column_scales(torch.cat([torch.ones(99), torch.tensor([10.0 * SCALE_SPREAD])])) is None
    assert column_scales(torch.tensor([0.0, 3.0, 0.0])) is None  # one column that is ever nonzero: nothing to compare


def test_the_diagonal_from_an_eigenbasis_is_the_matrix_diagonal():
    """What a run resumed past the eigendecomposition checks (it holds U_A and λ_A, not A)."""
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=F64) * torch.tensor([1, 1, 1e3, 1, 0, 1], dtype=F64)
    a = x.T @ x / 50
    values, vectors = eigendecompose(a)
    torch.testing.assert_close(basis_diagonal(vectors, values), a.diagonal(), rtol=1e-9, atol=1e-12)


def tabular(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six columns of scale 1 but column 2, on a scale of 1e6; y a noisy linear function [n, 1] (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    x[:, 2] *= 1e6
    w = torch.tensor([1.0, -2.0, 3e-6, 0.5, 1.5, -1.0], dtype=F64)
    return x, (x @ w + 0.5 * torch.randn(n, generator=g, dtype=F64))[:, None]


def least_squares_scores(x, y, xq, yq, damping, caplog) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A float32 linear model at the float64 least-squares optimum, fitted (EKFAC, GGN) and scored as the tool
    does; with the float64 closed form ∇L(z)ᵀ (2XᵀX/N)⁻¹ ∇L(x) and the warnings logged. Influence at λ = 0 does
    not change when the columns are rescaled: the closed form is the same for the data standardized."""
    n = len(x)
    xa, xqa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1), torch.cat([xq, torch.ones(len(xq), 1, dtype=F64)], 1)
    w = torch.linalg.lstsq(xa, y).solution
    model = nn.Linear(6, 1)
    with torch.no_grad():
        model.weight.copy_(w[:6].T)
        model.bias.copy_(w[6])
    tracked = find_tracked_modules(model, ["*"])
    x32, y32, xq32, yq32 = (t.float() for t in (x, y, xq, yq))
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        layers = compute_factors(model, tracked, "ekfac", PassPlan(batches_of(x32, y32, 64), -(-n // 64), n, "regression", "ggn"))
    got = pairwise_scores(model, tracked, layers, batches_of(xq32, yq32, 8)(0), batches_of(x32, y32, 64)(0), task_kind="regression", damping=damping)
    gt, gq = 2 * (xa @ w - y) * xa, 2 * (xqa @ w - yq) * xqa
    exact = gq @ torch.linalg.solve(2 * xa.T @ xa / n, gt.T)
    return got.double(), exact, list(caplog.messages)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_one_column_on_a_scale_of_1e6_is_warned_about_once_and_its_advice_holds(caplog):
    x, y = tabular(300, 0)
    xq, yq = tabular(12, 1)
    auto, exact, messages = least_squares_scores(x, y, xq, yq, "auto", caplog)
    assert len(messages) == 1, messages
    text = messages[0]
    assert text.startswith("layer '(model)': input column 2 is on a scale up to 1e6 times the median column's (root mean square)")
    assert "auto damping (0.1 × the layer's mean eigenvalue) is 1e10 times the median column's curvature" in text
    assert "scores.damping 0 does not help (float32 factors cannot resolve" in text
    assert "one mean and std per column in data.train's and data.query's transform.normalize" in text
    assert pearson(auto, exact) < 0.5  # the scores follow column 2 alone (0.30 measured)
    zero, *_ = least_squares_scores(x, y, xq, yq, 0.0, caplog)
    assert pearson(zero, exact) < 0.5
    suggested = float(re.search(r"set scores.damping near (\S+) ", text).group(1))
    advised, *_ = least_squares_scores(x, y, xq, yq, suggested, caplog)
    assert pearson(advised, exact) > 0.99  # 0.9994 measured
    mean, std = x.mean(0), x.std(0)
    standardized, exact_std, messages = least_squares_scores((x - mean) / std, y, (xq - mean) / std, yq, "auto", caplog)
    assert messages == []
    torch.testing.assert_close(exact_std, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))  # influence is scale-free
    assert pearson(standardized, exact) > 0.999


def test_columns_all_on_a_tiny_scale_name_the_bias_column(caplog):
    """Every feature 1e-4 of the bias's ones: the bias column is the one on another scale."""
    x, y = tabular(300, 0)
    x[:, 2] /= 1e6
    x *= 1e-4
    _, _, messages = least_squares_scores(x, y, x[:12], y[:12], "auto", caplog)
    assert len(messages) == 1 and messages[0].startswith("layer '(model)': the bias column (ones) is on a scale up to 1e4 times")


class TwoLayers(nn.Module):
    """A conv layer on [B, 3, 6, 6] images, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.head = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_a_conv_layer_names_the_channel_on_another_scale(caplog):
    """Channel 1 (e.g. depth in millimetres beside colours in [0, 1]) at 1e4: its 9 patch columns are one channel;
    the layer after the tanh sees nothing of it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 6, generator=g)
    x[:, 1] *= 1e4
    y = torch.randint(0, 2, (64,), generator=g)
    model = TwoLayers()
    tracked = find_tracked_modules(model, ["*"])
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_factors(model, tracked, "kfac", PassPlan(batches_of(x, y, 16), 4, 64, "classification", "empirical"))
    assert len(caplog.messages) == 1, caplog.messages
    assert caplog.messages[0].startswith("layer 'conv': input channel 1 is on a scale up to 1e4 times the median channel's")
    assert "the data's channels (one mean and std per channel" in caplog.messages[0]


def test_fit_factors_warns_once_on_stderr_and_not_once_the_columns_are_standardized(tmp_path: Path):
    """The CLI, on a tensors file of raw tabular rows, through both passes of an ensemble of two models (whose
    curvatures differ): one warning line; with transform.normalize's mean and std per column, none."""
    x, y = tabular(200, 0)
    save_file({"inputs": x.float(), "labels": y.float()}, tmp_path / "rows.safetensors")
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = mlp(6, [8], 1)
        with torch.no_grad():
            model.head.weight.mul_(10.0**seed)  # fc1's output gradients, and so its curvature and the damping advised, 100 × the first's
        save_file(model.state_dict(), tmp_path / f"model{seed}.safetensors")
    config = tmp_path / "tabular.yaml"
    config.write_text(
        "model: {architecture: mlp, kwargs: {input_dim: 6, hidden: [8], num_classes: 1}, checkpoint: model0.safetensors}\n"
        "task: {kind: regression}\n"
        "data:\n"
        "  train: {source: tensors, path: rows.safetensors, range: [0, 150]}\n"
        "  query: {source: tensors, path: rows.safetensors, range: [150, 160]}\n"
        "  batch_size: 64\n"
        "scores: {checkpoints: [model1.safetensors]}\n"
        "output_dir: out\n"
    )
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    result = runner.invoke(app, ["fit-factors", str(config)])
    assert result.exit_code == 0, result.stderr
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning.startswith("warning: layer 'fc1': input column 2 is on a scale up to 1e6 times the median column's")
    assert "Standardize the data's columns" in warning
    mean, std = x[:150].mean(0).tolist(), x[:150].std(0).tolist()
    norm = [f"data.{key}.transform={{normalize: {{mean: {mean}, std: {std}}}}}" for key in ("train", "query")]
    result = runner.invoke(app, ["fit-factors", str(config), "--overwrite", *(a for s in norm for a in ("--set", s))])
    assert result.exit_code == 0, result.stderr
    assert "warning" not in result.stderr
