"""The warning fit-factors gives after pass 1 when a layer's input columns are on scales far apart.

One tabular column on a scale of 1e6 sets auto damping (0.1 × the mean eigenvalue) some 1e10 times
above the other columns' curvature, so the scores follow that column alone; at damping 0 float32
factors cannot resolve the other columns either. Rare features (pixels almost always 0) sit below
the median column and must not trigger it: MNIST (tests/test_mnist_smoke.py), the digits configs
(tests/test_cli.py) and the language-model example (tests/test_examples.py) fit without it.
"""

from __future__ import annotations

import json
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


MISS = "miss the targets"  # the untrained models' predictions on the raw columns: the warning of passes.warn_far_targets


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
    result = runner.invoke(app, ["fit-factors", str(config), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["num_examples"] == 150  # the warning is on stderr only
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:") and MISS not in line]
    assert warning.startswith("warning: layer 'fc1': input column 2 is on a scale up to 1e6 times the median column's")
    assert "Standardize the data's columns" in warning
    advised = re.search(r"set scores.damping near (\S+) ", warning).group(1)
    result = runner.invoke(app, ["fit-factors", str(config), "--overwrite", "--set", f"scores.damping={advised}"])
    assert result.exit_code == 0, result.stderr
    assert "warning: layer" not in result.stderr  # the advice taken: nothing more to say of the columns
    mean, std = x[:150].mean(0).tolist(), x[:150].std(0).tolist()
    norm = [f"data.{key}.transform={{normalize: {{mean: {mean}, std: {std}}}}}" for key in ("train", "query")]
    result = runner.invoke(app, ["fit-factors", str(config), "--overwrite", *(a for s in norm for a in ("--set", s))])
    assert result.exit_code == 0, result.stderr
    assert "warning: layer" not in result.stderr


class Outliers(nn.Module):
    """Token embeddings, then `depth` residual blocks whose Linear sees hidden feature 3 about 1000 × the others
    (as a pretrained transformer's outlier dimensions), and a head."""

    def __init__(self, depth: int = 12, width: int = 16, vocab: int = 20) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, vocab)
        boost = torch.ones(width)
        boost[3] = 1e3
        self.register_buffer("boost", boost)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + 0.01 * torch.tanh(block(nn.functional.layer_norm(h, h.shape[-1:]) * self.boost))
        return self.head(nn.functional.layer_norm(h, h.shape[-1:]))


def test_many_layers_with_outlier_features_are_one_warning_that_blames_no_data_column(caplog):
    """Twelve layers flagged: one line naming five and counting the rest; the first Linear of a model with an
    embedding reads hidden features, not the data's columns, so nothing is said about standardizing the data."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (32, 6), generator=g), torch.randint(0, 20, (32, 6), generator=g)
    model = Outliers()
    tracked = find_tracked_modules(model, ["*"])
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_factors(model, tracked, "kfac", PassPlan(batches_of(x, y, 16), 2, 32, "language_modeling", "empirical"))
    assert len(caplog.messages) == 1, caplog.messages
    text = caplog.messages[0]
    assert text.startswith(
        "layers 'blocks.0', 'blocks.1', 'blocks.2', 'blocks.3', 'blocks.4' and 7 more (12 of 13 tracked): a few input features "
        "(the model's own, such as a transformer's outlier dimensions) are on a scale up to 9e2 times the median feature's, "
        "so auto damping (0.1 × a layer's mean eigenvalue) is up to "
    ), text
    advised = re.search(r"those layers' scores follow those features almost alone; if the others should count, lower scores.damping_factor \(near (\de-\d)\)$", text)
    assert "Standardize" not in text and "data" not in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        plan = PassPlan(batches_of(x, y, 16), 2, 32, "language_modeling", "empirical")
        compute_factors(model, tracked, "kfac", plan, damping=("auto", float(advised.group(1)), "layer"))
    assert caplog.messages == []  # the advice taken: nothing more to say


def test_the_warning_follows_the_damping_settings(caplog):
    """damping_factor and damping_scope set what auto damping is, so the numbers, the advice and whether the
    layer is drowned at all follow them; a number for scores.damping leaves nothing to say."""
    from influence_cli.fit import warn_column_scales

    model = mlp(4, [3], 100)
    tracked = find_tracked_modules(model, ["*"])
    fc1 = torch.tensor([1.0, 1.0, 1e3, 1.0, 1.0], dtype=F64)  # 4 columns and the bias: mean 201, median 1
    diagonals = {"fc1": (fc1, 1.0), "head": (torch.ones(4, dtype=F64), 1e-9)}  # the head: 400 weights of almost no curvature

    def said(damping) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="influence_cli"):
            warn_column_scales(model, tracked, diagonals, torch.float32, damping)
        return list(caplog.messages)

    (text,) = said(("auto", 0.1, "layer"))
    assert "so auto damping (0.1 × the layer's mean eigenvalue) is 2e1 times the median column's curvature" in text
    assert text.endswith("or set scores.damping near 1e-1 (0.1 × the median column's curvature in 'fc1'; the number serves every layer)")
    (text,) = said(("auto", 1.0, "layer"))
    assert "(1 × the layer's mean eigenvalue) is 2e2 times" in text and "near 1 (1 × the median column's curvature" in text
    assert said(("auto", 0.01, "layer")) == []  # 2 times: not drowned
    assert said(("auto", 0.1, "model")) == []  # the head's 400 weights pull the model's mean eigenvalue to 7: 0.7 times
    diagonals["head"] = (torch.ones(4, dtype=F64), 1e3)
    (text,) = said(("auto", 0.1, "model"))
    assert "auto damping (0.1 × the mean eigenvalue over every layer) is 1e2 times the median column's curvature" in text
    assert said((0.1, 0.1, "layer")) == []
    assert said((0.0, 0.1, "layer")) == []


def test_the_data_layer_and_deeper_layers_share_one_line(caplog):
    from influence_cli.fit import warn_column_scales

    model = mlp(4, [3], 2)
    tracked = find_tracked_modules(model, ["*"])
    wide = torch.tensor([1.0, 1.0, 1e6, 1.0], dtype=F64)
    diagonals = {"fc1": (torch.cat([wide, torch.ones(1, dtype=F64)]), 1.0), "head": (wide, 1.0)}
    with caplog.at_level("WARNING", logger="influence_cli"):
        warn_column_scales(model, tracked, diagonals)
    (text,) = caplog.messages
    assert text.startswith("layer 'fc1': input column 2 is on a scale up to 1e3 times the median column's")
    assert "the number serves every layer). Also layer 'head' (1 of 2 tracked): a few input features (the model's own" in text
    assert "and the layer's scores follow those features almost alone; if the others should count, lower scores.damping_factor (near 4e-7)" in text


@pytest.mark.parametrize("cut", [3, 6], ids=["before-the-correction-snapshots", "with-the-eigenbases-saved"])
def test_a_resumed_fit_warns_as_the_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, cut: int):
    """A run resumed in the correction pass does not redo pass 1: it judges the summed covariances it saved, or,
    past the correction's first snapshot, the diagonal of A rebuilt from the saved eigenbasis (`basis_diagonal`)."""
    from stopping import StopAt

    from influence_cli.config import load_config
    from influence_cli.fit import fit_factors

    x, y = tabular(96, 0)
    save_file({"inputs": x.float(), "labels": y.float()}, tmp_path / "rows.safetensors")
    torch.manual_seed(0)
    save_file(mlp(6, [8], 1).state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "tabular.yaml").write_text(
        "model: {architecture: mlp, kwargs: {input_dim: 6, hidden: [8], num_classes: 1}, checkpoint: model.safetensors}\n"
        "task: {kind: regression}\n"
        "data: {train: {source: tensors, path: rows.safetensors}, query: {source: tensors, path: rows.safetensors}, batch_size: 8}\n"
        "factors: {checkpoint_every: 4}\n"
        "output_dir: out\n"
    )
    cfg = load_config(tmp_path / "tabular.yaml", ["device=cpu"])
    with caplog.at_level("WARNING", logger="influence_cli"):
        with pytest.raises(KeyboardInterrupt):
            fit_factors(cfg, progress=StopAt("eigenvalue correction", cut * 8))
        (fresh,) = [m for m in caplog.messages if MISS not in m]
        caplog.clear()
        report = fit_factors(cfg, resume=True)
    assert report.resumed_from == ("correction pass, batch 0" if cut < 4 else "correction pass, batch 4")
    assert [m for m in caplog.messages if MISS not in m] == [fresh] and fresh.startswith("layer 'fc1': input column 2 is on a scale up to 1e6 times")
