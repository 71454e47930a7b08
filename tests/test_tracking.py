"""Which layers are tracked, and models whose forward could fool the hooks (float64).

In-place ops on a tracked layer's input or output, inputs whose dim 0 is not the batch,
tied weights, Conv2d padding forms and layers without curvature: each either gives the
dense per-example answer or a one-line error naming the layer.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from exact import batches_of, empirical_vectors, fit, per_example_layer_grads
from test_scores import explicit_grads, explicit_scores
from torch import nn

from influence_cli.errors import ModelError
from influence_cli.factors import LayerFactors
from influence_cli.kernel import pairwise_scores, self_influence_scores
from influence_cli.tracking import find_tracked_modules, skipped_layers, untracked_modules

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    xq, yq = torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g)
    return x, y, xq, yq


def relu_mlp(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3))


class ScalesItsInput(nn.Module):
    """Modifies a layer's input in place after the layer has read it."""

    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.inplace = nn.Linear(4, 6), nn.Linear(4, 3), inplace

    def forward(self, x):
        x = x + 1.0
        h = torch.tanh(self.fc1(x))
        x = x.mul_(2.0) if self.inplace else x * 2.0
        return self.fc2(x) + h[:, :3]


@pytest.mark.parametrize("make", [relu_mlp, ScalesItsInput], ids=["output-relu_", "input-mul_"])
def test_in_place_ops_on_a_tracked_layer_are_seen_and_undone(data, make):
    """nn.ReLU(inplace=True) right after a Linear (as in VGG) would turn g into the gradient after
    the ReLU; x.mul_() after a layer read x would change its a. Both forwards are detected and rerun."""
    x, y, xq, yq = data
    results = []
    for inplace in (False, True):
        model = make(inplace)
        tracked, layers = fit(model, x.clone(), y, strategy="ekfac", batch_size=4)
        scores = pairwise_scores(model, tracked, layers, batches_of(xq.clone(), yq, 2)(0), batches_of(x.clone(), y, 4)(0), damping=0.05)
        results.append((tracked, layers, scores))
    (_, ref_layers, ref), (tracked, layers, got) = results
    assert any(tm.copy_io for tm in tracked)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name, lf in layers.items():
        torch.testing.assert_close(lf.eigenvalues, ref_layers[name].eigenvalues, rtol=1e-10, atol=1e-14)


class Alternating(nn.Module):
    """Modifies fc1's output in place on odd calls and fc2's on even ones (a stateful forward)."""

    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.inplace, self.calls = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3), inplace, 0

    def forward(self, x):
        self.calls += 1
        odd = self.calls % 2 == 1
        h = self.fc1(x)
        h = h.tanh_() if self.inplace and odd else torch.tanh(h)
        h = self.fc2(h)
        h = h.tanh_() if self.inplace and not odd else torch.tanh(h)
        return self.fc3(h)


def test_a_forward_that_modifies_other_layers_on_each_run_is_rerun_until_all_are_copied(data):
    x, y, xq, yq = data
    results = []
    for inplace in (False, True):
        model = Alternating(inplace)
        tracked, layers = fit(model, x, y, strategy="ekfac", batch_size=4)
        scores = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 2)(0), batches_of(x, y, 4)(0), damping=0.05)
        results.append((tracked, scores))
    assert [tm.copy_io for tm in results[1][0]] == [True, True, False]
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)


class SequenceFirst(nn.Module):
    """A Linear applied to [T, B, F] (nn.Transformer's default layout)."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # x [B, T, F]
        return self.head(torch.tanh(self.proj(x.transpose(0, 1))).mean(0))


class Prototypes(nn.Module):
    """The tracked `proj` also embeds K = 5 learned prototypes (no batch dim), or one learned vector."""

    def __init__(self, vector: bool = False):
        super().__init__()
        self.proj = nn.Linear(4, 5)
        self.protos = nn.Parameter(torch.randn(4) if vector else torch.randn(5, 4))

    def forward(self, x):
        h, p = self.proj(x), self.proj(self.protos)
        return (h * p if p.dim() == 1 else h @ p.T)[:, :3]


def test_a_layer_whose_dim_0_is_not_the_batch_is_refused():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
    with pytest.raises(ModelError, match=r"layer 'proj' receives inputs of shape \[3, 4, 4\], whose first dimension is not the batch size 4"):
        fit(SequenceFirst(), x, y, batch_size=4)
    flat = torch.randn(4, 4, generator=g)
    for vector, shape in ((False, "[5, 4]"), (True, "[4]")):
        with pytest.raises(ModelError, match=re.escape(f"layer 'proj' receives inputs of shape {shape}, whose first dimension")):
            fit(Prototypes(vector), flat, y, batch_size=4)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_tied_weights_are_refused_unless_one_layer_is_tracked():
    with pytest.raises(ModelError, match=r"layers 'enc' and 'dec' share a parameter"):
        find_tracked_modules(Tied(), ["*"])
    assert [tm.name for tm in find_tracked_modules(Tied(), ["dec"])] == ["dec"]


def conv_net(**conv) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, **({"kernel_size": 3} | conv)), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))


@pytest.mark.parametrize(
    ("named", "numeric"),
    [
        (dict(padding="valid"), dict(padding=0)),
        (dict(padding="same"), dict(padding=1)),
        (dict(padding="same", dilation=2), dict(padding=2, dilation=2)),
        (dict(padding="same", kernel_size=(1, 3)), dict(padding=(0, 1), kernel_size=(1, 3))),
    ],
)
def test_conv_padding_by_name_equals_the_numbers(named, numeric):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 5, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    factors = []
    for kw in (named, numeric):
        model = conv_net(**kw)
        model(x[:1])  # materialise the lazy head
        factors.append(fit(model, x, y, strategy="ekfac", batch_size=3)[1])
    for name, lf in factors[0].items():
        torch.testing.assert_close(lf.eigenvalues, factors[1][name].eigenvalues, rtol=1e-10, atol=1e-14)


def test_unsupported_convs_are_skipped_by_wildcards_and_refused_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 2, padding="same"), nn.Flatten(), nn.Linear(8, 3))
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == ["3"]
    assert [(u.name, u.reason) for u in untracked_modules(model, tracked)] == [
        ("0", "groups=2"),
        ("1", "padding='same' with an even kernel (asymmetric)"),
    ]
    with pytest.raises(ModelError, match=r"Conv2d '0' uses groups=2"):
        find_tracked_modules(model, ["0", "3"])


def test_skipped_layers_are_the_layers_a_wildcard_passed_over():
    """fit-factors names the layers a user would expect in the scores but the wildcards left out
    (unsupported convs, convs of other dimensions); not norms, nor layers the patterns exclude."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 4, 1), nn.Flatten(2, 3), nn.Conv2d(4, 4, 1, groups=2), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(20, 6), nn.Linear(6, 3)
    )
    everything = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in everything] == ["5", "6"]
    assert [(u.name, u.kind, u.reason) for u in skipped_layers(model, everything, ["*"])] == [("0", "Conv3d", "not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D"), ("2", "Conv2d", "groups=2")]
    assert skipped_layers(model, find_tracked_modules(model, ["6"]), ["6"]) == []  # a name: the layers no pattern matches are the user's choice
    assert [u.name for u in skipped_layers(model, find_tracked_modules(model, ["[2-6]"]), ["[2-6]"])] == ["2"]


def tiny_swin(v2: bool = False) -> nn.Module:
    """torchvision's Swin Transformer (V2: its blocks and patch merging) for 8×8 RGB images, 3 classes."""
    from torchvision.models import SwinTransformer
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    torch.manual_seed(0)
    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=3, **kw)
    return model.double().eval()  # V2's relative-coordinates table is a float32 buffer


SWIN_TRACKED = ["features.0.0", "features.1.0.mlp.0", "features.1.0.mlp.3", "features.2.reduction", "features.3.0.mlp.0", "features.3.0.mlp.3", "head"]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_attention_layers_are_skipped_by_wildcards_and_refused_by_name(v2):
    """Swin's attention applies qkv and proj through F.linear (no hook sees them), and V2 runs cpb_mlp
    once on a table shared by the batch (no per-example gradient): '*' tracks the rest."""
    model = tiny_swin(v2)
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == SWIN_TRACKED
    cls = "ShiftedWindowAttentionV2" if v2 else "ShiftedWindowAttention"
    never_called = f"applied by torchvision's {cls} through F.linear on its weight, never called as a layer"
    shared = (
        "part of the position-bias MLP (cpb_mlp) of torchvision's ShiftedWindowAttentionV2, run once on a relative-coordinates "
        "table shared by the whole batch (no batch dimension)"
    )
    expected = []
    for block in ("features.1.0.attn", "features.3.0.attn"):
        expected += [(f"{block}.qkv", never_called), (f"{block}.proj", never_called)]
        expected += [(f"{block}.cpb_mlp.0", shared), (f"{block}.cpb_mlp.2", shared)] if v2 else []
    assert [(u.name, u.reason) for u in skipped_layers(model, tracked, ["*"])] == expected
    left_out = {u.name: u.reason for u in untracked_modules(model, tracked)}  # what `influence inspect` lists
    assert [(name, left_out[name]) for name, _ in expected] == expected
    named = {"features.3.0.attn.proj": f"is {never_called}, so its inputs cannot be recorded"}
    if v2:
        named["features.1.0.attn.cpb_mlp.2"] = f"is {shared}: its hooks would see the batch's summed output gradient, not each example's"
    for name, why in named.items():
        with pytest.raises(ModelError, match=re.escape(f"factors.modules: Linear {name!r} {why}")) as exc:
            find_tracked_modules(model, ["head", name])
        assert exc.value.hint == "leave it out of factors.modules"
    with pytest.raises(ModelError, match=re.escape(f"matches only layers that cannot be tracked: features.1.0.attn.qkv ({never_called})")):
        find_tracked_modules(model, ["*qkv"])


def test_swin_attention_with_its_own_forward_is_left_alone():
    """A subclass with its own forward may call qkv and proj as layers; cpb_mlp stays shared by the batch
    while get_relative_position_bias is torchvision's."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    class CallsItsLayers(ShiftedWindowAttention):
        def forward(self, x):
            return self.proj(self.qkv(x)[..., : x.shape[-1]])

    class CallsItsLayersV2(CallsItsLayers, ShiftedWindowAttentionV2):
        pass

    kw = {"dim": 4, "window_size": [2, 2], "shift_size": [0, 0], "num_heads": 1}
    assert [tm.name for tm in find_tracked_modules(CallsItsLayers(**kw), ["*"])] == ["qkv", "proj"]
    model = CallsItsLayersV2(**kw)
    tracked = find_tracked_modules(model, ["*"])
    assert [tm.name for tm in tracked] == ["qkv", "proj"]
    assert [u.name for u in skipped_layers(model, tracked, ["*"])] == ["cpb_mlp.0", "cpb_mlp.2"]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_factors_of_the_tracked_layers_are_exact(v2):
    """The first batch's model checks pass, and EKFAC's Λ* of every tracked layer is the mean squared
    per-example gradient (autograd's, one example at a time) in the Kronecker eigenbasis."""
    model = tiny_swin(v2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=4)
    assert [tm.name for tm in tracked] == SWIN_TRACKED
    grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())
    for tm in tracked:
        lf = layers[tm.name]
        rotated = lf.g_eigenvectors.T @ grads[tm.name] @ lf.a_eigenvectors  # [N, 1, d_out, d_in]
        torch.testing.assert_close(lf.eigenvalues, rotated.square().sum(dim=1).mean(dim=0), rtol=1e-9, atol=1e-12)


def test_every_name_without_wildcards_must_be_a_tracked_layer():
    """A named layer is never dropped silently because another pattern matched something."""
    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.Flatten(), nn.Sequential(nn.Linear(6, 4), nn.Tanh()), nn.Linear(4, 3))
    assert [tm.name for tm in find_tracked_modules(model, ["2.0", "3"])] == ["2.0", "3"]
    cases = [
        (["0", "3"], "factors.modules: '0' is a Conv3d, not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D"),
        (["3", "fc9"], "factors.modules: 'fc9' names no module of the model"),
        (["2", "3"], "factors.modules: '2' is a Sequential"),
        (["0"], "factors.modules: '0' is a Conv3d, not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D"),  # also when nothing else is tracked
        (["fc9"], "factors.modules: 'fc9' names no module of the model"),
        (["3", "2.*", "Encoder.*"], "factors.modules: pattern 'Encoder.*' matches no nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D layer (layers: 2.0, 3)"),
    ]
    for patterns, needle in cases:
        with pytest.raises(ModelError, match=re.escape(needle)) as exc:
            find_tracked_modules(model, patterns)
        if patterns[0] == "2":
            assert "'2.*' tracks the layers inside it" in exc.value.hint


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_a_weight_tied_to_an_untracked_module_is_reported():
    model = TiedEmbedding()
    tracked = find_tracked_modules(model, ["*"])
    assert [(u.name, u.num_params, u.reason) for u in untracked_modules(model, tracked)] == [
        ("embed", 28, "its use of the weight shared with tracked 'head'")
    ]


def test_untracked_modules_name_what_the_scores_leave_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    tracked = find_tracked_modules(model, ["0"])
    rows = [(u.name, u.kind, u.num_params, u.reason) for u in untracked_modules(model, tracked)]
    assert rows == [("1", "LayerNorm", 12, "not an nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D"), ("2", "Linear", 21, "not matched by factors.modules")]


class AuxiliaryHead(nn.Module):
    """`aux` is computed in the forward but never reaches the output: no curvature, zero gradients."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head, self.aux = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        self.aux_out = self.aux(h)
        return self.head(h)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_a_layer_without_curvature_adds_nothing_instead_of_nan(data, strategy):
    """`auto` damping of a layer whose Λ is all 0 is 0: its 1/(Λ + λ) is taken as the
    pseudo-inverse's 0, not ∞ (0·∞ made every score NaN)."""
    x, y, xq, yq = data
    model = AuxiliaryHead()
    tracked, layers = fit(model, x, y, strategy=strategy, batch_size=4)
    assert float(layers["aux"].eigenvalues.abs().max()) == 0.0
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 2)(0), batches_of(x, y, 4)(0))
    self_inf = self_influence_scores(model, tracked, layers, batches_of(x, y, 4)(0))
    without = {k: v for k, v in layers.items() if k != "aux"}
    reached = [tm for tm in tracked if tm.name != "aux"]
    gq, gt = explicit_grads(model, reached, xq, yq), explicit_grads(model, reached, x, y)
    torch.testing.assert_close(got, explicit_scores(without, gq, gt, "auto"), rtol=1e-9, atol=1e-10)
    assert bool(torch.isfinite(self_inf).all())


def test_zero_damping_is_the_pseudo_inverse():
    lf = LayerFactors("l", eigenvalues=torch.tensor([[0.0, 2.0], [4.0, 0.0]]))
    torch.testing.assert_close(lf.inverse_eigenvalues(0.0), torch.tensor([[0.0, 0.5], [0.25, 0.0]]))
    torch.testing.assert_close(lf.inverse_eigenvalues(0.0, 2), torch.tensor([[0.0, 0.25], [0.0625, 0.0]]))
    # a zero blurred by float32 rounding (below max(Λ)·eps·max(d_out, d_in)) is a zero too; any λ > 0 keeps it
    noisy = LayerFactors("l", eigenvalues=torch.tensor([[1e-28, 2.0], [4.0, 3e-7]], dtype=torch.float32))
    assert noisy.inverse_eigenvalues(0.0, 2).tolist() == [[0.0, 0.25], [0.0625, 0.0]]
    assert float(noisy.inverse_eigenvalues(1e-3)[0, 0]) == pytest.approx(1e3, rel=1e-6)


def test_the_pseudo_inverse_cut_off_keeps_the_precision_the_factors_were_read_in():
    """Factors from a (float32) file moved to a float64 model's dtype drop the same directions as in
    float32: compute-scores (which moves them) and dataset-similarity (which does not) must agree."""
    stored = LayerFactors("l", eigenvalues=torch.tensor([[1.0, 2e-12], [0.5, 0.25]], dtype=torch.float32))
    moved = stored.to("cpu", torch.float64)
    assert moved.eigenvalues.dtype == torch.float64 and moved.rounding() == torch.finfo(torch.float32).eps
    assert moved.inverse_eigenvalues(0.0).tolist() == stored.inverse_eigenvalues(0.0, dtype=torch.float64).tolist()
    assert float(moved.inverse_eigenvalues(0.0)[0, 1]) == 0.0
    computed = LayerFactors("l", eigenvalues=stored.eigenvalues.double())  # float64 factors fitted in memory keep it
    assert float(computed.inverse_eigenvalues(0.0)[0, 1]) == pytest.approx(5e11, rel=1e-6)
    assert computed.to("cpu", torch.float64).rounding() == torch.finfo(torch.float64).eps
    assert computed.to("cpu", torch.float32).rounding() == torch.finfo(torch.float32).eps


class ScalesTheBatch(ScalesItsInput):
    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(x.mul_(2.0)) + h[:, :3]


def test_a_model_that_modifies_its_input_batch_in_place_is_refused(data):
    x, y, *_ = data
    with pytest.raises(ModelError, match="modifies its input batch in place"):
        fit(ScalesTheBatch(True), x.clone(), y, batch_size=4)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.reentrant = nn.Linear(4, 5), nn.Linear(5, 3), reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.fc2(checkpoint(lambda z: torch.tanh(self.fc1(z)), x, use_reentrant=self.reentrant))


def test_activation_checkpointing(data):
    """Non-reentrant checkpointing is transparent; the reentrant kind hides fc1 from autograd: a named error."""
    x, y, xq, yq = data
    model = Checkpointed(False)
    tracked, layers = fit(model, x, y, strategy="ekfac", batch_size=4)
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 2)(0), batches_of(x, y, 4)(0), damping=0.05)
    ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), 0.05)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    with pytest.raises(ModelError, match=r"layer 'fc1' ran without autograd"), pytest.warns(UserWarning):
        fit(Checkpointed(True), x, y, batch_size=4)


def test_quadratic_forms_of_a_tiny_damping_do_not_overflow_float32(data):
    """RelatIF norms ‖(F+λ)⁻¹∇L‖ and self-influence with curvature and λ near 1e-22 (1/λ² is far
    beyond float32's range): the weights are scaled per layer and the scale applied in float64."""
    x, y, xq, yq = data
    model = relu_mlp(False)
    tracked, layers = fit(model, x, y, strategy="ekfac", batch_size=4)
    tiny = {k: dataclasses.replace(lf, eigenvalues=lf.eigenvalues * 1e-20) for k, lf in layers.items()}
    ref = self_influence_scores(model, tracked, tiny, batches_of(x, y, 4)(0), damping=1e-22)
    model32 = relu_mlp(False).float()
    tracked32 = find_tracked_modules(model32, ["*"])
    tiny32 = {k: lf.to("cpu", torch.float32) for k, lf in tiny.items()}
    got = self_influence_scores(model32, tracked32, tiny32, batches_of(x.float(), y, 4)(0), damping=1e-22)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)
    scores = pairwise_scores(model32, tracked32, tiny32, batches_of(xq.float(), yq, 2)(0), batches_of(x.float(), y, 4)(0), damping=1e-22, relative=True)
    assert bool(torch.isfinite(scores).all())


def test_layers_the_forward_never_calls_are_named_together():
    """Weights applied through F.linear by the module holding the layers: every such layer in one error."""
    from influence_cli.tracking import Capture

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.c(nn.functional.linear(nn.functional.linear(x, self.a.weight), self.b.weight))

    model = Functional()
    with Capture(find_tracked_modules(model, ["*"])) as cap:
        model(torch.randn(3, 4))
    with pytest.raises(ModelError, match=r"layers 'a', 'b' were not called in the forward pass, which runs in eval mode \(.*a weight applied another way"):
        cap.activations(3)


def test_pattern_errors_list_only_the_layers_that_can_be_tracked():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ModelError, match=r"matches no nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D layer that can be tracked \(layers: 2\)"):
        find_tracked_modules(model, ["nomatch*"])
    with pytest.raises(ModelError, match=r"pattern 'nomatch\*' matches no nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D layer \(layers: 2\)"):
        find_tracked_modules(model, ["2", "nomatch*"])


@pytest.mark.parametrize("family", ["googlenet", "inception_v3"])
def test_auxiliary_classifiers_run_only_in_training_are_skipped_by_wildcards(family):
    """torchvision's GoogLeNet and Inception3 call their auxiliary classifiers only in training: under '*'
    the first batch stopped at them ("not called"); wildcards leave them out, naming one is refused."""
    import torchvision

    build = getattr(torchvision.models, family)
    model = build(weights=None, num_classes=3, aux_logits=True, init_weights=False).eval()
    heads = ("aux1.", "aux2.") if family == "googlenet" else ("AuxLogits.",)
    cls = "GoogLeNet" if family == "googlenet" else "Inception3"
    reason = f"part of the auxiliary classifier of torchvision's {cls}, which runs only in training (the model runs in eval mode)"
    tracked = find_tracked_modules(model, ["*"])
    skipped = skipped_layers(model, tracked, ["*"])
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert [u.name for u in skipped] == [n for n in layers if n.startswith(heads)] and skipped
    assert {u.reason for u in skipped} == {reason}
    assert [tm.name for tm in tracked] == [n for n in layers if not n.startswith(heads)]
    with pytest.raises(ModelError, match=re.escape(f"factors.modules: Conv2d {skipped[0].name!r} is {reason}: it is never called")):
        find_tracked_modules(model, ["fc", skipped[0].name])

    class OwnForward(type(model)):  # may call its heads: left to the first batch's check
        def _forward(self, x):
            return super()._forward(x)

    model.__class__ = OwnForward
    assert len(find_tracked_modules(model, ["*"])) == len(layers)


def test_a_googlenet_with_its_auxiliary_classifiers_is_fitted_under_wildcards():
    """The fit runs through the layers the eval-mode forward calls (its first-batch checks included)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=True, init_weights=False).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
    tracked, layers = fit(model, x, y, strategy="kfac", fisher="empirical", batch_size=4)
    assert not any(tm.name.startswith("aux") for tm in tracked) and set(layers) == {tm.name for tm in tracked}


@pytest.mark.parametrize("bias", [True, False])
def test_conv_patches_are_unfolded_a_few_examples_at_a_time(monkeypatch, bias):
    """A conv layer's activations are the unfolded patches with a ones column, bit for bit; with a bias
    they are unfolded `UNFOLD_ELEMENTS` at a time into the result, so the batch's patches are not held twice."""
    import torch.nn.functional as F

    import influence_cli.tracking as tracking

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2, bias=bias)
    (tm,) = find_tracked_modules(nn.Sequential(conv), ["*"])
    x = torch.randn(7, 3, 9, 9)
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [7, 25, 27]
    want = torch.cat([cols, torch.ones(7, 25, 1)], dim=2) if bias else cols
    sizes: list[int] = []
    real = F.unfold
    monkeypatch.setattr(tracking.F, "unfold", lambda part, *a, **k: sizes.append(part.shape[0]) or real(part, *a, **k))
    monkeypatch.setattr(tracking, "UNFOLD_ELEMENTS", 2 * 25 * 27)
    assert torch.equal(tracking.layer_activations(tm, x), want)
    assert max(sizes) == (2 if bias else 7)
