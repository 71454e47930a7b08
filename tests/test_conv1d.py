"""Hugging Face transformers' `Conv1D` (GPT-2's attention and MLP projections): a Linear whose
weight is stored transposed, [in, out]. It is tracked as the Linear of its transpose, so a model
built from it has the factors, scores and edits of the same model built from nn.Linear (float64).

transformers is not needed: `Conv1D` below is a copy of `transformers.pytorch_utils.Conv1D` (same
class name, weight layout and forward); the last test runs a real GPT-2 when transformers is installed.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from exact import assert_same_curvature, assert_same_scores, batches_of, fit, kron_dense, sequence_project
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

LM = "language_modeling"
VOCAB, PAD, IGNORE = 9, 0, -100


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: nf outputs, nx inputs, weight [nx, nf] (bias None here when `bias=False`)."""

    def __init__(self, nf: int, nx: int, bias: bool = True):
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf)) if bias else None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight) if self.bias is not None else x.view(-1, x.size(-1)) @ self.weight
        return x.view(size_out)


class TinyGPT(nn.Module):
    """Embedding -> causal prefix mean -> c_attn -> tanh -> c_fc -> gelu -> c_proj (no bias) + residual -> head:
    next-token logits [B, T, V]. Its projections are Conv1D (`linear=False`) or nn.Linear."""

    def __init__(self, linear: bool, d: int = 4, hidden: int = 6):
        super().__init__()

        def proj(d_in: int, d_out: int, bias: bool = True) -> nn.Module:
            return nn.Linear(d_in, d_out, bias=bias) if linear else Conv1D(d_out, d_in, bias=bias)

        self.embed = nn.Embedding(VOCAB, d)
        self.c_attn = proj(d, d)
        self.c_fc = proj(d, hidden)
        self.c_proj = proj(hidden, d, bias=False)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens):
        e = self.embed(tokens)
        counts = torch.arange(1, tokens.shape[1] + 1, dtype=e.dtype, device=e.device)
        h = torch.tanh(self.c_attn(e.cumsum(dim=1) / counts[:, None]))
        return self.head(h + self.c_proj(F.gelu(self.c_fc(h))))


def twins() -> tuple[nn.Module, nn.Module]:
    """A TinyGPT of Conv1D layers and the same model of nn.Linear layers (every weight the transpose)."""
    torch.manual_seed(0)
    conv = TinyGPT(linear=False)
    with torch.no_grad():
        for p in conv.parameters():  # larger than GPT-2's initialization: gradients well above rounding
            p.copy_(torch.randn_like(p) * 0.7)
    linear = TinyGPT(linear=True)
    state = {k: v.T if k.endswith(".weight") and isinstance(conv.get_submodule(k.rpartition(".")[0]), Conv1D) else v for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    return conv.eval(), linear.eval()


def sequences(n: int = 12, length: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n token sequences of lengths 2..length, right-padded with 0: ids and next-token labels [n, length] (-100 = no loss)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, length), PAD, dtype=torch.int64)
    labels = torch.full((n, length), IGNORE, dtype=torch.int64)
    for k in range(n):
        size = 2 + (k * 3) % (length - 1)
        tokens[k, :size] = torch.randint(1, VOCAB, (size,), generator=g)
        labels[k, : size - 1] = tokens[k, 1:size]
    return tokens, labels


def test_conv1d_layers_are_tracked_as_the_linear_of_their_transpose():
    conv, _ = twins()
    tracked = find_tracked_modules(conv, ["*"])
    assert [(tm.name, tm.kind, tm.d_out, tm.d_in, tm.transposed) for tm in tracked] == [
        ("c_attn", "linear", 4, 5, True),
        ("c_fc", "linear", 6, 5, True),
        ("c_proj", "linear", 4, 6, True),
        ("head", "linear", 9, 5, False),
    ]
    assert [(r.weight_shape, r.transposed) for r in describe_layers(tracked, "ekfac")][:3] == [((4, 4), True), ((4, 6), True), ((6, 4), True)]
    assert [u.kind for u in untracked_modules(conv, tracked)] == ["Embedding"]
    tm = tracked[2]  # no bias: [W] is d_out × d_in = the weight's transpose, and back
    w = conv.c_proj.weight.detach()
    assert torch.equal(tm.gradient_matrix(w, None), w.T)
    weight, bias = tm.split_matrix(w.T)
    assert bias is None and torch.equal(weight, w) and weight.is_contiguous()


@pytest.mark.parametrize(
    ("strategy", "fisher"), [("ekfac", "empirical"), ("ekfac", "sampled"), ("kfac", "sampled"), ("diagonal", "empirical")], ids=lambda v: v
)
def test_factors_and_scores_equal_those_of_the_nn_linear_model(strategy, fisher):
    """Padded sequences through both twins: the same curvature per layer (in the [W | b] layout), the
    same pairwise scores and self-influence; the first batch's model checks pass for Conv1D."""
    conv, linear = twins()
    tokens, labels = sequences()
    fitted = [fit(model, tokens, labels, strategy=strategy, fisher=fisher, kind=LM, batch_size=5) for model in (conv, linear)]
    (conv_tracked, conv_factors), (linear_tracked, linear_factors) = fitted
    assert_same_curvature(conv_factors, linear_factors, [tm.name for tm in linear_tracked], strategy)
    query = batches_of(tokens[:3], labels[:3], 2)
    train = batches_of(tokens, labels, 5)
    scores = assert_same_scores((conv, linear), fitted, query, train, task_kind=LM, damping=1e-3, padding_value=PAD)
    assert scores[1].abs().max() > 1e-3


def test_flat_inputs_and_deflated_rows_match_the_nn_linear_model():
    """Conv1D layers on [B, features] inputs (EKFAC's one-matmul correction, no positions), with a dead unit and an input
    that is always 0 (rows deflated from A and G): the scores and self-influence of the nn.Linear twin."""

    def mlp(linear: bool) -> nn.Module:
        torch.manual_seed(0)
        proj = (lambda i, o, b=True: nn.Linear(i, o, bias=b)) if linear else (lambda i, o, b=True: Conv1D(o, i, bias=b))
        return nn.Sequential(proj(5, 6), nn.ReLU(), proj(6, 4, False), nn.Tanh(), proj(4, 3)).eval()

    conv = mlp(linear=False)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p))
        conv[0].weight[:, 2], conv[0].bias[2] = 0.0, -5.0  # unit 2 never fires
    linear = mlp(linear=True)
    linear.load_state_dict({k: v.T if v.dim() == 2 else v for k, v in conv.state_dict().items()})
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    x[:, 1] = 0.0
    fitted = [fit(m, x, y, strategy="ekfac") for m in (conv, linear)]
    assert [(lf.zero_inputs, lf.zero_outputs) for lf in fitted[0][1].values()] == [(1, 1), (1, 0), (0, 0)]
    query, train = batches_of(x[:4], y[:4], 2), batches_of(x, y, 6)
    assert_same_scores((conv, linear), fitted, query, train, damping=1e-3)


def test_edit_writes_the_transposed_weight():
    """`edit` projects [W | b] and writes each Conv1D weight back as [in, out]: the nn.Linear twin's edit, transposed."""
    conv, linear = twins()
    tokens, labels = sequences()
    edited = []
    for model in (conv, linear):
        tracked, factors = fit(model, tokens, labels, strategy="ekfac", fisher="empirical", kind=LM, batch_size=5)
        state, edits = edit_model(model, tracked, factors, keep="mass", rho=0.6)
        assert all(e.removed > 0 for e in edits)
        edited.append(state)
    for key, want in edited[1].items():
        got = edited[0][key]
        if key.endswith(".weight") and isinstance(conv.get_submodule(key.rpartition(".")[0]), Conv1D):
            assert got.shape == conv.get_submodule(key.rpartition(".")[0]).weight.shape
            got = got.T
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    conv.load_state_dict(edited[0])  # loads as it is


class ScaledConv1D(Conv1D):
    """A Conv1D subclass whose forward doubles the weight: its gradient is not Σ a·gᵀ."""

    def forward(self, x):
        return (x.reshape(-1, x.size(-1)) @ (2 * self.weight) + self.bias).reshape(*x.shape[:-1], self.nf)


class WithScaled(TinyGPT):
    def __init__(self):
        super().__init__(linear=False)
        self.c_attn = ScaledConv1D(4, 4)


def test_a_conv1d_with_its_own_forward_is_skipped_by_wildcards_and_checked_when_named():
    torch.manual_seed(0)
    model = WithScaled().eval()
    tracked = find_tracked_modules(model, ["*"])
    assert "c_attn" not in [tm.name for tm in tracked]
    assert [(u.name, u.kind) for u in skipped_layers(model, tracked, ["*"])] == [("c_attn", "ScaledConv1D")]
    assert "overrides the Conv1D forward" in skipped_layers(model, tracked, ["*"])[0].reason
    tokens, labels = sequences()
    with pytest.raises(ModelError, match=r"layer 'c_attn': the gradient of its weight is not Σ g·aᵀ of its own calls"):
        fit(model, tokens, labels, strategy="kfac", fisher="empirical", kind=LM, batch_size=5, modules=["c_attn", "head"])


class NotTransposed(nn.Module):
    """A class named Conv1D that is something else (a real 1-d convolution's weight [out, in, k]): not tracked."""

    def __init__(self):
        super().__init__()
        self.conv = type("Conv1D", (nn.Module,), {})()
        self.conv.weight = nn.Parameter(torch.zeros(3, 2, 5))
        self.conv.nx, self.conv.nf = 2, 3
        self.head = nn.Linear(2, 3)


def test_a_class_named_conv1d_without_its_weight_layout_is_not_a_layer():
    model = NotTransposed()
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == ["head"]
    assert [(u.name, u.reason) for u in untracked_modules(model, tracked)] == [("conv", "not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D")]
    with pytest.raises(ModelError, match=r"'conv' is a Conv1D, not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D \(whose weight is \[nx, nf\]"):
        find_tracked_modules(model, ["conv"])  # named: what the layout lacks is said


def _named_conv1d(forward) -> type:
    """A user's class named Conv1D with transformers' attributes (nx, nf, weight [nx, nf], bias [nf]) and another `forward`."""

    def init(self, nf: int, nx: int):
        nn.Module.__init__(self)
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    return type("Conv1D", (nn.Module,), {"__init__": init, "forward": forward})


def _over_time(self, x):
    """A real 1-d convolution along the positions of x [B, T, nx]: kernel 2, the weight shared by both taps."""
    return (x + F.pad(x, (0, 0, 1, 0))[:, :-1]) @ self.weight + self.bias


def _channels_first(self, x):
    """x @ weight + bias over dim 1 of x [B, nx, T]: outputs [B, nf, T]."""
    return (x.transpose(1, 2) @ self.weight + self.bias).transpose(1, 2)


class Impostor(nn.Module):
    """Sequences [B, T, 4] -> a class named Conv1D (4 -> 3; `channels_first`: applied to [B, 4, T]) -> tanh -> mean over T -> 5 classes."""

    def __init__(self, forward, channels_first: bool = False):
        super().__init__()
        self.conv, self.head, self.channels_first = _named_conv1d(forward)(3, 4), nn.Linear(3, 5), channels_first

    def forward(self, x):
        h = self.conv(x.transpose(1, 2)).transpose(1, 2) if self.channels_first else self.conv(x)
        return self.head(torch.tanh(h)).mean(dim=1)


def test_a_class_named_conv1d_computing_another_op_is_refused_on_the_first_batch():
    """The contract's attributes are all recognition reads, so a user's Conv1D of another op is tracked; the first batch
    refuses it, naming the layer: a convolution along the positions fails the weight-gradient check, one over the
    channels of [B, C, T] inputs maps another dimension than its features (4 positions, as many as its 4 inputs, too)."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 6, 4), torch.randint(0, 5, (12,))
    model = Impostor(_over_time).eval()
    assert [(tm.name, tm.transposed) for tm in find_tracked_modules(model, ["*"])] == [("conv", True), ("head", False)]
    with pytest.raises(ModelError, match=r"layer 'conv': the gradient of its weight is not Σ g·aᵀ of its own calls .*a class named Conv1D computing other"):
        fit(model, x, y, strategy="ekfac")
    for positions in (6, 4):
        with pytest.raises(ModelError, match=rf"layer 'conv' maps inputs of shape \[4, 4, {positions}\] to outputs of shape \[4, 3, {positions}\], not its 4 input "):
            fit(Impostor(_channels_first, channels_first=True).eval(), torch.randn(12, positions, 4), y, strategy="ekfac")


class Logits(nn.Module):
    """A Hugging Face model's logits, as the factory of a config returns it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(input_ids=tokens, attention_mask=(tokens != PAD).long()).logits


def test_gpt2_of_transformers_matches_its_nn_linear_twin():
    """A real (tiny, randomly initialized) GPT-2: every Conv1D projection is tracked, and its factors and
    scores are those of the same network with each Conv1D replaced by the nn.Linear of its transpose."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (influence_cli does not need it)")
    from transformers.pytorch_utils import Conv1D as HFConv1D

    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=8, attn_implementation="eager")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    conv = Logits(gpt2)
    linear = Logits(transformers.GPT2LMHeadModel(config).double().eval())
    linear.model.load_state_dict(gpt2.state_dict())
    for name, module in list(linear.named_modules()):
        if isinstance(module, HFConv1D):
            layer = nn.Linear(module.nx, module.nf).double()
            with torch.no_grad():
                layer.weight.copy_(module.weight.T)
                layer.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(linear.get_submodule(parent), attr, layer)
    tokens, labels = sequences(n=8, length=6)
    fitted = [fit(m, tokens, labels, strategy="ekfac", fisher="sampled", kind=LM, batch_size=4, modules=["*.h.*"]) for m in (conv, linear)]
    assert [(tm.name, tm.transposed) for tm in fitted[0][0]] == [(f"model.transformer.h.0.{n}", True) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for name, want in fitted[1][1].items():
        torch.testing.assert_close(kron_dense(fitted[0][1][name], 0.0), kron_dense(want, 0.0), rtol=1e-8, atol=1e-12)
    batches = batches_of(tokens, labels, 4)
    scores = [pairwise_scores(m, t, f, batches(0), batches(0), task_kind=LM, damping=1e-3, padding_value=PAD) for m, (t, f) in zip((conv, linear), fitted, strict=True)]
    assert scores[1].abs().max() > 1e-3
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-8, atol=1e-10 * float(scores[1].abs().max()))


# ----------------------------------------------------------------------------- the CLI, end to end

GPT_MODULE = f"""
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = {VOCAB}


{inspect.getsource(Conv1D)}

{inspect.getsource(TinyGPT)}

def make():
    return TinyGPT(linear=False)
"""  # the factory module the CLI test imports


def test_cli_inspects_fits_scores_and_edits_a_conv1d_model(tmp_path, monkeypatch):
    tokens, labels = sequences(n=24)
    project = sequence_project(tmp_path, monkeypatch, "tinygpt_cli", GPT_MODULE, tokens, labels, "lm.pt", task={"kind": LM})
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    table = runner.invoke(app, ["inspect", project])
    assert table.exit_code == 0, table.stderr
    assert "linear (Conv1D)" in table.stdout and "Conv1D" not in table.stderr
    layers = json.loads(runner.invoke(app, ["inspect", project, "--json"]).stdout)["layers"]
    assert [(r["name"], r["weight_shape"], r["d_out"], r["d_in"], r["transposed"]) for r in layers] == [
        ("c_attn", [4, 4], 4, 5, True),
        ("c_fc", [4, 6], 6, 5, True),
        ("c_proj", [6, 4], 4, 6, True),
        ("head", [9, 4], 9, 5, False),
    ]
    for command in (["fit-factors", project], ["compute-scores", project], ["top-k", project, "--k", "2", "--query", "0"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.stderr
    edited = tmp_path / "edited.safetensors"
    result = runner.invoke(app, ["edit", project, "--out", str(edited), "--layers", "c_fc"])
    assert result.exit_code == 0, result.stderr
    before, after = load_file(tmp_path / "model.safetensors"), load_file(edited)
    assert after["c_fc.weight"].shape == before["c_fc.weight"].shape == (4, 6)  # [in, out], as Conv1D stores it
    assert not torch.equal(after["c_fc.weight"], before["c_fc.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("c_fc."))
