"""The first batch checks what the factors assume of a model (model_checks): every example on its
own along dim 0, and each tracked weight used only by its layer's own call. Models that break
either gave wrong factors and scores without a word."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from exact import batches_of, fit
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from influence_cli.errors import ModelError
from influence_cli.kernel import pairwise_scores
from influence_cli.tracking import find_tracked_modules, untracked_modules

pytestmark = pytest.mark.usefixtures("float64_default")


def _data(shape=(4,), n=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


class StdConv2d(nn.Conv2d):
    """Weight-standardized convolution (as in BiT / NFNet): the forward uses a function of the weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 3.0 * self.weight, self.bias)


class CustomLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = StdConv2d(1, 3, 3), ScaledLinear(3 * 3 * 3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))))


def test_subclasses_with_their_own_forward_are_left_to_wildcards_and_checked_when_named():
    model = CustomLayers()
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == ["head"]
    reasons = {u.name: u.reason for u in untracked_modules(model, tracked)}
    assert reasons["conv"].startswith("StdConv2d overrides the Conv2d forward") and "name it in factors.modules" in reasons["fc"]
    x, y = _data((1, 5, 5))
    fit(model, x, y)  # the wildcard fit runs
    for name in ("conv", "fc"):
        with pytest.raises(ModelError, match=f"layer '{name}': the gradient of its weight is not Σ g·aᵀ of its own calls"):
            fit(model, x, y, modules=(name, "head"))


class Harmless(nn.Linear):
    """A subclass whose forward is the stock computation: named, it passes the check."""

    def forward(self, x):
        return super().forward(x)


def test_a_named_subclass_that_uses_its_weight_as_usual_is_tracked():
    torch.manual_seed(0)
    model = nn.Sequential(Harmless(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data()
    tracked, layers = fit(model, x, y, modules=("0", "2"))
    assert [tm.name for tm in tracked] == ["0", "2"]
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    plain.load_state_dict(model.state_dict())
    _, want = fit(plain, x, y)
    torch.testing.assert_close(layers["0"].eigenvalues, want["0"].eigenvalues, rtol=1e-12, atol=0)


class ReusedWeight(nn.Module):
    """fc1's weight also multiplies tanh(h) through F.linear, outside fc1's own call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.head(h + F.linear(torch.tanh(h), self.fc1.weight))


def test_a_weight_also_used_outside_its_layer_is_refused():
    x, y = _data()
    with pytest.raises(ModelError, match=r"layer 'fc1': the gradient of its weight is not Σ g·aᵀ of its own calls \(off by \d+%\)"):
        fit(ReusedWeight(), x, y)
    fit(ReusedWeight(), x, y, modules=("head",))  # the other layer alone is exact


class TiedHead(nn.Module):
    """A language-model-style head tied to the input embedding: attributed through the head's use only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens).mean(1)))


def test_weights_tied_to_untracked_modules_and_parametrized_weights_still_fit():
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 7, (8, 3), generator=g), torch.randint(0, 7, (8,), generator=g)
    fit(TiedHead(), tokens, y)
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), nn.Linear(5, 3))
    x, y = _data()
    tracked, _ = fit(model, x, y)
    assert [tm.name for tm in tracked] == ["0", "2"]
    assert [(u.name, u.reason) for u in untracked_modules(model, tracked)] == [
        ("0.parametrizations.weight", "parametrizes the weight of tracked '0', which is scored as its effective weight")
    ]


class SequenceFirst(nn.Module):
    """proj sees [T, B, F]; with T == B only the sizes of dim 0 look right."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # x [B, T, F]
        return self.head(torch.tanh(self.proj(x.transpose(0, 1))).mean(0))


class SequenceFirstEncoder(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False, fed [B, T, d]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.TransformerEncoderLayer(4, nhead=2, dim_feedforward=6, dropout=0.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class SequenceFirstLSTM(nn.Module):
    """nn.LSTM with its default batch_first=False, fed [B, T, d]: a recurrence along the batch, whose
    first example is the first step and depends on no other (T != B: every layer sees the batch on dim 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0].mean(1))


class CapacityExperts(nn.Module):
    """Two experts, each taking at most 2 examples of a batch (in batch order); the others pass through
    unchanged: a mixture of experts with a capacity per batch, whose later copies of an example are dropped."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate, self.experts, self.head = nn.Linear(4, 2), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.Linear(4, 3)

    def forward(self, x):
        choice = self.gate(x).argmax(1)  # [B]
        rank = torch.stack([(choice[: i + 1] == choice[i]).sum() for i in range(len(x))])  # place in its expert's queue
        routed = torch.stack([self.experts[k](x) for k in range(2)], 1)[torch.arange(len(x)), choice]
        return self.head(torch.where((rank <= 2)[:, None], routed, x))


class BatchCentred(nn.Module):
    """Subtracts a batch mean, from the head's inputs or from the logits: each example depends on the others."""

    def __init__(self, logits: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head, self.logits = nn.Linear(4, 5), nn.Linear(5, 3), logits

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        if self.logits:
            out = self.head(h)
            return out - out.mean(0, keepdim=True)
        return self.head(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize(
    "model, shape, needle",
    [
        (SequenceFirst, (4, 4), "layer 'proj' receives inputs for the batch's first example that change with the other examples"),
        (SequenceFirstEncoder, (4, 4), "layer 'enc.linear1' receives inputs for the batch's first example that change"),
        (BatchCentred, (4,), "layer 'head' receives inputs for the batch's first example that change with the other examples: they depend"),
        (lambda: BatchCentred(logits=True), (4,), "the model's outputs for the batch's first example change with the other examples"),
        (SequenceFirstLSTM, (5, 4), "the model's outputs differ between the copies of one example in a batch: they depend on the other examples"),
        (CapacityExperts, (4,), r"differ between the copies of one example .* a mixture of experts with a capacity per batch"),
    ],
    ids=["seq-first-T-equals-B", "encoder-batch_first-False", "batch-mean", "batch-mean-logits", "lstm-batch_first-False", "experts-capacity"],
)
def test_models_that_mix_the_examples_of_a_batch_are_refused(model, shape, needle):
    """Dim 0 has the batch's size (T == B), so only a batch of copies of one example tells them apart."""
    x, y = _data(shape)
    with pytest.raises(ModelError, match=needle) as exc:
        fit(model().eval(), x, y, batch_size=4)
    assert "batch_first=True" in exc.value.hint


class BatchCentredConv(nn.Module):
    """A conv layer after a batch mean: its unfolded patches of example 0 depend on the other examples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        return self.head(self.conv2(h - h.mean(0, keepdim=True)).flatten(1))


def test_the_independence_check_unfolds_one_example_of_the_copies(monkeypatch):
    """Of the batch of copies, only row 0's activations are formed (a conv layer's unfolded patches are
    T·d_in per example: all of them would be a second copy of the batch's largest tensors), and a conv
    model that mixes the examples is still refused."""
    import influence_cli.model_checks as model_checks
    import influence_cli.tracking as tracking

    rows: list[int] = []
    real = tracking.layer_activations
    check = model_checks.check_examples_independent

    def recording(*args, **kwargs):
        monkeypatch.setattr(tracking, "layer_activations", lambda tm, x: rows.append(x.shape[0]) or real(tm, x))
        try:
            return check(*args, **kwargs)
        finally:
            monkeypatch.setattr(tracking, "layer_activations", real)

    monkeypatch.setattr(model_checks, "check_examples_independent", recording)
    x, y = _data((1, 6, 6))
    with pytest.raises(ModelError, match="layer 'conv2' receives inputs for the batch's first example that change"):
        fit(BatchCentredConv().eval(), x, y, batch_size=4)
    assert rows and set(rows) == {1}


def test_the_every_row_check_holds_no_float64_copy_of_the_whole_batch():
    """A language model's copies are [B, positions, vocabulary]: comparing every row to row 0 converted the whole
    batch to float64 several times over (4 x 8 rows of 2^21 values: 512 MiB here, tens of GB for a real vocabulary)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import influence_cli.model_checks as model_checks
    from influence_cli.tracking import Capture

    class LargestFloat64(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    LargestFloat64.largest = max(LargestFloat64.largest, t.numel())
            return result

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1 << 16)).float().eval()  # logits [B, 32, 65536]
    tracked = find_tracked_modules(model, ["0"])
    x = torch.randn(8, 32, 4, dtype=torch.float32)
    with torch.no_grad(), Capture(tracked) as cap:
        out = model(x)
    acts = cap.activations(8)
    with LargestFloat64():
        model_checks.check_examples_independent(model, tracked, x, out, acts, 1e-3)
    assert 0 < LargestFloat64.largest <= out.numel() // 4  # two rows (32 MiB) at a time, not the 8 rows x 4


def test_the_checks_change_no_number(monkeypatch):
    """A plain model passes every check, and factors and scores are bit for bit those of a run without them."""
    import influence_cli.model_checks as model_checks

    x, y = _data()

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        tracked, layers = fit(model, x, y, batch_size=3)
        return layers, pairwise_scores(model, tracked, layers, batches_of(x[:2], y[:2], 2)(0), batches_of(x, y, 3)(0))

    checked_layers, checked = run()
    for name in ("check_examples_independent", "check_weight_gradients", "check_padding_alone"):
        monkeypatch.setattr(model_checks, name, lambda *a, **k: None)
    plain_layers, plain = run()
    assert torch.equal(checked, plain)
    for name, lf in plain_layers.items():
        assert torch.equal(checked_layers[name].eigenvalues, lf.eigenvalues), name


def test_outputs_near_zero_are_not_mistaken_for_mixing():
    """Example 0's prediction is ~1e-8 of the others' (a well-fit zero target): the comparison batch has
    the batch's shape, so its products round alike, and the gap is measured against the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).float()  # float32 in this float64 module
    x = torch.randn(64, 16, dtype=torch.float32)
    with torch.no_grad():
        model[2].bias -= model(x[:1])[0, 0]  # example 0's output: rounding noise around 0
    fit(model, x, torch.randn(64, 1, dtype=torch.float32), kind="regression", batch_size=64)


@pytest.mark.parametrize("reused", [False, True])
def test_subnormal_loss_gradients_of_confident_predictions_are_no_evidence_of_a_reused_weight(reused):
    """Examples predicted with probability 1 in float32 have loss gradients ~1e-44 (subnormal): the
    weight check scales them by a power of 2 first, so a plain model passes and a reused weight is still caught."""
    model = (ReusedWeight() if reused else nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))).float()
    head = model.head if reused else model[2]
    with torch.no_grad():
        head.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.zeros(8, dtype=torch.int64)
    if reused:
        with pytest.raises(ModelError, match="layer 'fc1': the gradient of its weight is not"):
            fit(model, x, y, batch_size=8)
    else:
        fit(model, x, y, batch_size=8)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_an_old_style_weight_norm_elsewhere_leaves_the_other_layers_checked():
    """torch.nn.utils.weight_norm (a forward pre-hook) replaces the weight by a plain tensor: that
    layer is skipped, the scaled layer is still refused."""
    torch.manual_seed(0)
    model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(4, 5)), nn.Tanh(), ScaledLinear(5, 3))
    x, y = _data()
    with pytest.raises(ModelError, match="layer '2': the gradient of its weight is not"):
        fit(model, x, y, modules=("0", "2"))


def test_compiled_models_are_refused_with_the_reason():
    """torch.compile's graph runs without the layers' hooks (the factors came out zero)."""
    model = torch.compile(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), backend="eager")
    with pytest.raises(ModelError, match="module '\\(model\\)' is compiled with torch.compile") as exc:
        find_tracked_modules(model, ["*"])
    assert "_orig_mod" in exc.value.hint


class FixedBatch(nn.Module):
    """Writes the batch size into a reshape: runs on its batch of 16, fails on any other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).view(16, -1))


def test_a_model_bound_to_its_batch_size_is_named():
    x, y = _data(n=16)
    with pytest.raises(ModelError, match=r"the model runs on a batch of 16 but fails on its first 8 examples") as exc:
        fit(FixedBatch(), x, y, batch_size=16)
    assert "any batch size" in exc.value.hint


def test_a_batch_checked_in_an_earlier_pass_is_not_checked_again(monkeypatch):
    """Passes that share `checked` (compute-scores streams a query chunk or train shard again for each shard or chunk)
    check a batch of the same examples, in the same mode, once: the first-batch checks and the padding check; a pass
    from another batch, in another mode, or without `checked` checks again."""
    from exact import PaddedSeqModel, variable_length_sequences

    import influence_cli.model_checks as model_checks
    from influence_cli.passes import stream_gradients

    calls: list[str] = []
    for name in ("check_examples_independent", "check_weight_gradients", "check_padding_alone"):
        real = getattr(model_checks, name)
        monkeypatch.setattr(model_checks, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model = PaddedSeqModel()
    tracked = find_tracked_modules(model, ["*"])
    padded, _, labels = variable_length_sequences()
    checked: set = set()

    def run(start_batch=0, mode="loss", shared=checked) -> list[str]:
        calls.clear()
        batches = batches_of(padded, labels, 4)(start_batch)
        for _ in stream_gradients(model, tracked, batches, task_kind="classification", mode=mode, padding_value=0.0, checked=shared):
            pass
        return sorted(calls)

    every = ["check_examples_independent", "check_padding_alone", "check_weight_gradients"]
    assert run() == every
    assert run() == []  # the same batches again
    assert run(mode="measurement") == every  # another loss gradient
    assert run(start_batch=1) == every  # other examples first
    assert run(start_batch=1) == []
    assert run(shared=None) == every
