"""torch's nn.Conv1d (audio, time series, text CNNs): tracked as the nn.Conv2d on its input viewed
[B, C, 1, L] with kernel (1, k), stride (1, s), padding (0, p), dilation (1, d) (KFC, Grosse & Martens
2016), so a model built from it has the factors, scores, self-influence and edits of the same model
built from Conv2d (weights unsqueezed), in float64.

(Hugging Face's `Conv1D`, a transposed Linear, is another layer: tests/test_conv1d.py.)
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
import yaml
from exact import assert_same_curvature, assert_same_scores, batches_of, fit, sequence_project
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.edit import edit_model
from influence_cli.errors import ModelError
from influence_cli.fit import describe_layers
from influence_cli.kernel import pairwise_scores
from influence_cli.tracking import find_tracked_modules, skipped_layers, untracked_modules

pytestmark = pytest.mark.usefixtures("float64_default")

LENGTH = 11  # positions of the inputs [B, 2, LENGTH]


class Signal1d(nn.Module):
    """[B, 2, 11] -> conv1 (k 3, stride 2, padding 1) -> tanh -> conv2 (k 2, dilation 2, padding 1, no bias) -> tanh
    -> conv3 (k 3, dilation 2, padding 'same') -> flatten -> fc: 3 classes. `two_d`: the same network of nn.Conv2d
    on [B, 2, 1, 11], kernels (1, k), strides (1, s), paddings (0, p), dilations (1, d)."""

    def __init__(self, two_d: bool = False):
        super().__init__()
        self.two_d = two_d

        def conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int | str = 0, dilation: int = 1, bias: bool = True) -> nn.Module:
            if not two_d:
                return nn.Conv1d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
            pad = padding if isinstance(padding, str) else (0, padding)
            return nn.Conv2d(c_in, c_out, (1, k), stride=(1, stride), padding=pad, dilation=(1, dilation), bias=bias)

        self.conv1 = conv(2, 3, 3, stride=2, padding=1)
        self.conv2 = conv(3, 4, 2, padding=1, dilation=2, bias=False)
        self.conv3 = conv(4, 4, 3, padding="same", dilation=2)
        self.fc = nn.Linear(4 * 6, 3)

    def forward(self, x):
        h = x.unsqueeze(2) if self.two_d else x
        h = self.conv3(torch.tanh(self.conv2(torch.tanh(self.conv1(h)))))
        return self.fc(torch.flatten(h, 1))


def twins() -> tuple[nn.Module, nn.Module]:
    """A Signal1d of nn.Conv1d layers and its nn.Conv2d twin (every conv weight [out, in, k] unsqueezed to [out, in, 1, k])."""
    torch.manual_seed(0)
    one = Signal1d()
    with torch.no_grad():
        for p in one.parameters():  # gradients well above rounding
            p.copy_(torch.randn_like(p) * 0.7)
    two = Signal1d(two_d=True)
    two.load_state_dict({k: v.unsqueeze(2) if v.dim() == 3 else v for k, v in one.state_dict().items()})
    return one.eval(), two.eval()


def signals(n: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, LENGTH, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_conv1d_layers_are_tracked_as_conv1d_with_the_patches_of_their_conv2d_twin():
    one, two = twins()
    tracked = find_tracked_modules(one, ["*"])
    assert [(tm.name, tm.kind, tm.d_out, tm.d_in, tm.has_bias) for tm in tracked] == [
        ("conv1", "conv1d", 3, 2 * 3 + 1, True),
        ("conv2", "conv1d", 4, 3 * 2, False),
        ("conv3", "conv1d", 4, 4 * 3 + 1, True),
        ("fc", "linear", 3, 25, True),
    ]
    twin = find_tracked_modules(two, ["*"])
    assert [(tm.kind, tm.d_out, tm.d_in) for tm in twin] == [("conv2d", 3, 7), ("conv2d", 4, 6), ("conv2d", 4, 13), ("linear", 3, 25)]
    assert [r.weight_shape for r in describe_layers(tracked, "ekfac")][:3] == [(3, 2, 3), (4, 3, 2), (4, 4, 3)]
    tm = tracked[0]  # [W | b] is d_out × C·k (channel-major, as F.unfold's patches), and back to [out, in, k]
    w, b = one.conv1.weight.detach(), one.conv1.bias.detach()
    mat = tm.gradient_matrix(w, b)
    assert torch.equal(mat, twin[0].gradient_matrix(w.unsqueeze(2), b))
    weight, bias = tm.split_matrix(mat)
    assert torch.equal(weight, w) and torch.equal(bias, b)


@pytest.mark.parametrize(
    ("strategy", "fisher"), [("ekfac", "empirical"), ("ekfac", "sampled"), ("kfac", "empirical"), ("diagonal", "empirical")], ids=lambda v: v
)
def test_factors_scores_and_self_influence_equal_those_of_the_conv2d_model(strategy, fisher):
    """Both twins: the same curvature per layer (A, G and the dense block; the diagonal's eigenvalues), the
    same pairwise scores and self-influence; the first batch's model checks pass for Conv1d."""
    one, two = twins()
    x, y = signals()
    fitted = [fit(model, x, y, strategy=strategy, fisher=fisher, batch_size=6) for model in (one, two)]  # the twin views x as [B, 2, 1, 11]
    (_, got_factors), (tracked, want_factors) = fitted
    assert_same_curvature(got_factors, want_factors, [tm.name for tm in tracked], strategy)
    scores = assert_same_scores((one, two), fitted, batches_of(x[:4] + 0.1, y[:4], 2), batches_of(x, y, 7), damping=1e-3)
    assert scores[1].abs().max() > 1e-3


def test_edit_writes_the_conv1d_weight_back_as_out_in_k():
    """`edit` projects [W | b] and writes each Conv1d weight back as [out, in, k]: the Conv2d twin's edit, squeezed."""
    one, two = twins()
    x, y = signals()
    edited = []
    for model in (one, two):
        tracked, factors = fit(model, x, y, strategy="ekfac", batch_size=6)
        state, edits = edit_model(model, tracked, factors, keep="mass", rho=0.6)
        assert all(e.removed > 0 for e in edits)
        edited.append(state)
    for key, want in edited[1].items():
        got = edited[0][key]
        assert got.shape == one.state_dict()[key].shape
        torch.testing.assert_close(got, want.squeeze(2) if want.dim() == 4 else want, rtol=1e-8, atol=1e-10)
    one.load_state_dict(edited[0])  # loads as it is


class ScaledConv1d(nn.Conv1d):
    """A Conv1d whose forward doubles the weight: its gradient is not Σ g·aᵀ."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.Conv1d(4, 4, 3, padding=1, groups=2), "groups=2"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'"),
        (nn.Conv1d(4, 4, 2, padding="same"), "padding='same' with an even kernel (asymmetric)"),
    ],
    ids=["groups", "circular", "same-even"],
)
def test_an_unsupported_conv1d_is_skipped_by_wildcards_and_refused_when_named(layer, reason):
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), layer, nn.Flatten(), nn.Linear(4 * LENGTH, 3))
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == ["0", "3"]
    assert [(u.name, u.kind, u.reason) for u in skipped_layers(model, tracked, ["*"])] == [("1", "Conv1d", reason)]
    with pytest.raises(ModelError, match=rf"factors.modules: Conv1d '1' uses {re.escape(reason)}; only groups=1 with zero padding"):
        find_tracked_modules(model, ["0", "1"])


def test_a_conv1d_with_its_own_conv_forward_is_skipped_by_wildcards_and_checked_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledConv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 3)).eval()
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == ["3"]
    assert "ScaledConv1d overrides the Conv1d forward" in skipped_layers(model, tracked, ["*"])[0].reason
    assert [u.name for u in untracked_modules(model, tracked)] == ["0"]
    x, y = signals()
    with pytest.raises(ModelError, match=r"layer '0': the gradient of its weight is not Σ g·aᵀ of its own calls .*F.conv1d elsewhere"):
        fit(model, x, y, strategy="kfac", modules=["0", "3"])


def test_bfloat16_autocast_fits_and_scores_a_conv1d_model():
    """factors.amp: the first batch's weight-gradient check passes under autocast and the scores follow float32's."""
    from influence_cli.fit import PassPlan, compute_factors

    one, _ = twins()
    one = one.float()
    x, y = signals(n=32)
    x = x.float()
    tracked = find_tracked_modules(one, ["*"])
    assert [tm.kind for tm in tracked] == ["conv1d", "conv1d", "conv1d", "linear"]
    scores = []
    for amp in ("none", "bfloat16"):
        factors = compute_factors(one, tracked, "ekfac", PassPlan(batches_of(x, y, 16), 2, 32, "classification", "empirical", 0, amp=amp))
        scores.append(pairwise_scores(one, tracked, factors, batches_of(x[:4], y[:4], 4)(0), batches_of(x, y, 16)(0), amp=amp))
    assert torch.corrcoef(torch.stack([scores[0].flatten().double(), scores[1].flatten().double()]))[0, 1] > 0.99


# ----------------------------------------------------------------------------- the CLI, end to end

CNN_MODULE = f"""
import torch
from torch import nn

LENGTH = {LENGTH}


{inspect.getsource(Signal1d)}

def make():
    return Signal1d()
"""  # the factory module the CLI test imports


def test_cli_inspects_fits_scores_and_ranks_a_conv1d_model(tmp_path, monkeypatch):
    x, y = signals(n=24)
    project = sequence_project(tmp_path, monkeypatch, "signal1d_cli", CNN_MODULE, x.float(), y, "signals.pt")
    config = yaml.safe_load(open(project))
    config["data"]["padding_value"] = None  # signals [B, C, L], not padded sequences
    open(project, "w").write(yaml.safe_dump(config))
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    table = runner.invoke(app, ["inspect", project])
    assert table.exit_code == 0, table.stderr
    assert "conv1d" in table.stdout and "Conv1d" not in table.stderr  # tracked, not listed as left out
    layers = json.loads(runner.invoke(app, ["inspect", project, "--json"]).stdout)["layers"]
    assert [(r["name"], r["kind"], r["weight_shape"], r["d_out"], r["d_in"]) for r in layers] == [
        ("conv1", "conv1d", [3, 2, 3], 3, 7),
        ("conv2", "conv1d", [4, 3, 2], 4, 6),
        ("conv3", "conv1d", [4, 4, 3], 4, 13),
        ("fc", "linear", [3, 24], 3, 25),
    ]
    for command in (["fit-factors", project], ["compute-scores", project], ["top-k", project, "--k", "2", "--query", "0"], ["spectrum", project, "--top", "2"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    edited = tmp_path / "edited.safetensors"
    result = runner.invoke(app, ["edit", project, "--out", str(edited), "--layers", "conv1"])
    assert result.exit_code == 0, result.stderr
    before, after = load_file(tmp_path / "model.safetensors"), load_file(edited)
    assert after["conv1.weight"].shape == before["conv1.weight"].shape == (3, 2, 3)
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("conv1."))


class PerExample(nn.Module):
    """Calls its conv once per example: the conv sees unbatched [C, L] (or [C, H, W]) inputs."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.stack([self.conv(xi).flatten(1).mean(1) for xi in x]))


@pytest.mark.parametrize("two_d", [False, True], ids=["conv1d", "conv2d"])
def test_a_conv_called_on_unbatched_examples_is_refused_by_name_even_when_channels_equal_the_batch(two_d):
    """Channels 3 = batch size 3: dim 0 looks like the batch, but F.unfold of [C, L] (viewed [C, L, 1]) fails."""
    torch.manual_seed(0)
    model = PerExample(nn.Conv2d(3, 4, (1, 3)) if two_d else nn.Conv1d(3, 4, 3)).eval()
    x, y = torch.randn(6, 3, 1, 9) if two_d else torch.randn(6, 3, 9), torch.randint(0, 3, (6,))
    layout = r"\[batch, C, H, W\]" if two_d else r"\[batch, C, L\]"
    with pytest.raises(ModelError, match=rf"layer 'conv' receives inputs of shape \[3, .*one unbatched example: a tracked Conv[12]d must see the batch along dim 0, {layout}"):
        fit(model, x, y, strategy="kfac", batch_size=3)
