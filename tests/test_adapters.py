"""Fine-tuning with adapters (LoRA) and with a frozen backbone.

LoRA (Hu et al. 2021) keeps a pretrained layer W₀ frozen and trains a low-rank update beside
it: out = W₀x + b + s·B A dropout(x), with A [r, d_in] and B [d_out, r] nn.Linear layers (peft's
LoraLayer: `base_layer`, `lora_A`, `lora_B`, `lora_dropout`, each adapter under its name in a
ModuleDict, and `scaling`). A and B are tracked as the Linear layers they are: A sees the layer's
input and B sees A's output, and B's output gradient carries the scale s. `LoraLinear` below has
peft's structure, so these tests run without it; the last one runs peft itself when it is installed.

The math is checked in float64 against per-example gradients taken by autograd with respect to
the adapter weights themselves (not through the hooks).
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from exact import batches_of, fit, kron_dense
from safetensors.torch import load_file, save_file
from torch import nn

from influence_cli import task as task_lib
from influence_cli.config import FactorsConfig, load_config
from influence_cli.edit import edit_checkpoint
from influence_cli.errors import ConfigError, ModelError, OutputError
from influence_cli.fit import fit_factors, load_factors
from influence_cli.kernel import pairwise_scores
from influence_cli.models import load_checkpoint
from influence_cli.scores import compute_scores
from influence_cli.tracking import find_tracked_modules, frozen_layers_warning, skipped_layers, untracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
ADAPTERS = ["fc1.lora_A.default", "fc1.lora_B.default", "fc2.lora_A.default", "fc2.lora_B.default"]

MODEL_SOURCE = '''
import torch
from torch import nn


class LoraLinear(nn.Module):
    """peft's lora.Linear: a frozen base layer plus s * B(A(dropout(x))), the adapter named "default"."""

    def __init__(self, d_in, d_out, r=2, alpha=6.0, dropout=0.0):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(dropout) if dropout else nn.Identity()})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(d_in, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, d_out, bias=False)})
        self.scaling = {"default": alpha / r}
        self.base_layer.requires_grad_(False)
        nn.init.normal_(self.lora_B["default"].weight)  # trained: B is no longer its initial 0

    def forward(self, x):
        out = self.base_layer(x)
        return out + self.lora_B["default"](self.lora_A["default"](self.lora_dropout["default"](x))) * self.scaling["default"]


class LoraMLP(nn.Module):
    """Two LoRA layers and a frozen head (trainable with `train_head`, as partial fine-tuning)."""

    def __init__(self, d_in=5, hidden=4, d_out=3, dropout=0.0, train_head=False):
        super().__init__()
        self.fc1 = LoraLinear(d_in, hidden, dropout=dropout)
        self.fc2 = LoraLinear(hidden, hidden, dropout=dropout)
        self.head = nn.Linear(hidden, d_out)
        self.head.requires_grad_(train_head)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make(dropout: float = 0.0, train_head: bool = False, frozen: bool = False):
    torch.manual_seed(0)
    model = LoraMLP(dropout=dropout, train_head=train_head)
    return model.requires_grad_(False) if frozen else model
'''


@pytest.fixture
def lora_module(tmp_path, monkeypatch):
    """The module `lora_mlp` (MODEL_SOURCE) in tmp_path, importable."""
    import importlib

    (tmp_path / "lora_mlp.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "lora_mlp", raising=False)
    return importlib.import_module("lora_mlp")


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(14, 5, generator=g, dtype=F64), torch.randint(0, 3, (14,), generator=g)
    xq, yq = torch.randn(4, 5, generator=g, dtype=F64), torch.randint(0, 3, (4,), generator=g)
    return x, y, xq, yq


def adapter_gradients(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer: [N, d_out·d_in]} per-example loss gradients of the named layers' weights, by autograd on the
    weights themselves, one example at a time (no hooks)."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for k in range(len(x)):
        loss = task_lib.per_example_loss(model(x[k : k + 1]), y[k : k + 1], "classification").sum()
        for n, grad in zip(names, torch.autograd.grad(loss, weights), strict=True):
            out[n].append(grad.reshape(-1))
    for w, flag in zip(weights, flags, strict=True):
        w.requires_grad_(flag)
    return {n: torch.stack(v) for n, v in out.items()}


# ----------------------------------------------------------------------------- which layers


def test_patterns_and_trainable_only(lora_module):
    model = lora_module.make().double()
    everything = [tm.name for tm in find_tracked_modules(model, ["*"])]
    assert everything == ["fc1.base_layer", *ADAPTERS[:2], "fc2.base_layer", *ADAPTERS[2:], "head"]
    assert [tm.name for tm in find_tracked_modules(model, ["*lora_A*", "*lora_B*"])] == ADAPTERS
    tracked = find_tracked_modules(model, ["*"], trainable_only=True)
    assert [tm.name for tm in tracked] == ADAPTERS
    left_out = {u.name: u.reason for u in untracked_modules(model, tracked, trainable_only=True)}
    assert left_out == dict.fromkeys(["fc1.base_layer", "fc2.base_layer", "head"], "frozen (no parameter requires grad), left out by factors.trainable_only")
    assert skipped_layers(model, tracked, ["*"], trainable_only=True) == []  # the user's choice, not a layer that cannot be tracked
    # partial fine-tuning: a trained head counts, whatever else is frozen
    head = lora_module.make(train_head=True)
    assert [tm.name for tm in find_tracked_modules(head, ["*"], trainable_only=True)] == [*ADAPTERS, "head"]
    assert [tm.name for tm in find_tracked_modules(head, ["head", "fc1.*"], trainable_only=True)] == ["fc1.lora_A.default", "fc1.lora_B.default", "head"]
    # requires_grad is read, not changed
    assert [p.requires_grad for p in model.parameters()] == [n.split(".")[1].startswith("lora") for n, _ in model.named_parameters()]


def test_trainable_only_refusals(lora_module):
    model = lora_module.make()
    with pytest.raises(ModelError, match=r"factors.modules: Linear 'head' is frozen \(none of its parameters requires grad\)") as err:
        find_tracked_modules(model, ["*lora*", "head"], trainable_only=True)
    assert "factors.trainable_only: false" in err.value.hint
    with pytest.raises(ModelError, match=r"\['\*'\] matches only frozen layers .*fc1.base_layer, fc1.lora_A.default, fc1.lora_B.default, \.\.\. \(7 in all\)") as err:
        find_tracked_modules(lora_module.make(frozen=True), ["*"], trainable_only=True)  # built for inference: nothing requires grad
    assert "is_trainable=True" in err.value.hint
    assert [tm.name for tm in find_tracked_modules(lora_module.make(frozen=True), ["*"])][0] == "fc1.base_layer"  # without it: every layer


def test_frozen_layers_warning(lora_module):
    model = lora_module.make()
    warning = frozen_layers_warning(model, find_tracked_modules(model, ["*"]), ["*"])
    assert warning is not None and warning.startswith("factors.modules tracks 3 frozen layers (no parameter requires grad: fc1.base_layer, fc2.base_layer, head)")
    assert "factors.trainable_only: true" in warning
    for patterns in (["*lora*"], ["*lora*", "head"]):  # no frozen layer, or one named on purpose
        assert frozen_layers_warning(model, find_tracked_modules(model, patterns), patterns) is None
    for built in (lora_module.make(frozen=True), lora_module.make().requires_grad_(True)):  # no trainable parameter, or all of them
        assert frozen_layers_warning(built, find_tracked_modules(built, ["*"]), ["*"]) is None


# ----------------------------------------------------------------------------- the math (float64)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_adapter_factors_and_scores_equal_their_definitions(lora_module, data, strategy):
    """A = E[a aᵀ] of each adapter's own input (x for A, A x for B), G = E[g gᵀ] of its output gradient (s-scaled),
    Λ* (ekfac) the mean squared rotated per-example gradient, and the scores Σ ∇L(z)ᵀ (P + λ)⁻¹ ∇L(x) over the
    adapters, against gradients autograd takes with respect to the adapter weights."""
    x, y, xq, yq = data
    model = lora_module.make().double()
    tracked, layers = fit(model, x, y, strategy=strategy, fisher="empirical", batch_size=5, modules=ADAPTERS)
    assert [tm.name for tm in tracked] == ADAPTERS
    gt, gq = adapter_gradients(model, ADAPTERS, x, y), adapter_gradients(model, ADAPTERS, xq, yq)
    with torch.no_grad():
        h1 = torch.tanh(model.fc1(x))
        inputs = {"fc1.lora_A.default": x, "fc2.lora_A.default": h1}
        inputs |= {"fc1.lora_B.default": model.fc1.lora_A["default"](x), "fc2.lora_B.default": model.fc2.lora_A["default"](h1)}
    for name in ADAPTERS:
        lf = layers[name]
        a = inputs[name]
        d_out = lf.g_covariance.shape[0]
        grads = gt[name].reshape(len(x), d_out, -1)
        g = grads @ a[:, :, None] / a.square().sum(1)[:, None, None]  # ∇W = g aᵀ without positions: g = ∇W a / ‖a‖²
        torch.testing.assert_close(lf.a_covariance, a.T @ a / len(x), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(lf.g_covariance, (g[..., 0].T @ g[..., 0]) / len(x), rtol=1e-10, atol=1e-14)
        if strategy == "ekfac":
            rotated = lf.g_eigenvectors.T @ grads @ lf.a_eigenvectors
            torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(0), rtol=1e-9, atol=1e-14)
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping="auto")
    want = 0
    for name in ADAPTERS:
        lam = 0.1 * float(layers[name].eigenvalues.mean())
        want = want + gq[name] @ torch.linalg.inv(kron_dense(layers[name], lam)) @ gt[name].T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # the frozen base layers are not in the scores: tracking them too adds their own terms
    everything = find_tracked_modules(model, ["*"])
    assert len(everything) == 7 and {tm.name for tm in everything} - set(ADAPTERS) == {"fc1.base_layer", "fc2.base_layer", "head"}


def test_adapter_dropout_is_off_in_eval_mode_and_refused_in_training_mode(lora_module, data):
    """The commands run the model in eval mode, where the adapter's dropout is the identity: the factors and
    scores of a model with lora_dropout 0.5 are those of the same weights without dropout. In training mode the
    first-batch check refuses it (its outputs are random)."""
    x, y, xq, yq = data
    plain, dropped = lora_module.make().double(), lora_module.make(dropout=0.5).double()
    dropped.load_state_dict(plain.state_dict())
    scores = []
    for model in (plain, dropped.eval()):
        tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=5, modules=ADAPTERS)
        scores.append(pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0)))
    torch.testing.assert_close(scores[0], scores[1], rtol=0, atol=0)
    with pytest.raises(ModelError, match="model.eval"):
        fit(dropped.train(), x, y, strategy="ekfac", fisher="empirical", batch_size=5, modules=ADAPTERS)


# ----------------------------------------------------------------------------- commands


def project(folder, lora_module, **model_kwargs) -> str:
    """A config over the LoRA MLP (its weights saved whole, float32) and a tensors file."""
    g = torch.Generator().manual_seed(5)
    save_file({"inputs": torch.randn(40, 5, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)}, folder / "data.safetensors")
    save_file(lora_module.make().state_dict(), folder / "model.safetensors")
    config = {
        "model": {"architecture": "lora_mlp:make", "kwargs": model_kwargs, "checkpoint": "model.safetensors"},
        "data": {
            "train": {"source": "tensors", "path": "data.safetensors", "range": [0, 32]},
            "query": {"source": "tensors", "path": "data.safetensors", "range": [32, 40]},
            "batch_size": 8,
        },
        "factors": {"trainable_only": True},
        "output_dir": "out",
        "device": "cpu",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return str(folder / "config.yaml")


def test_commands_track_the_adapters_with_dropout_off(tmp_path, lora_module):
    path = project(tmp_path, lora_module)
    cfg = load_config(path)
    assert cfg.factors.trainable_only is True and FactorsConfig().trainable_only is False
    report = fit_factors(cfg)
    assert [layer.name for layer in report.layers] == ADAPTERS
    assert set(load_factors(report.path).layers) == set(ADAPTERS)
    compute_scores(cfg)
    first = load_file(tmp_path / "out" / "scores.safetensors")["scores"]
    dropped = load_config(path, ["model.kwargs.dropout=0.5", "output_dir=out_dropout"])
    fit_factors(dropped)
    compute_scores(dropped)
    torch.testing.assert_close(load_file(tmp_path / "out_dropout" / "scores.safetensors")["scores"], first, rtol=0, atol=0)


def test_fit_factors_warns_of_frozen_layers_a_wildcard_tracks(tmp_path, lora_module, caplog):
    path = project(tmp_path, lora_module)
    with caplog.at_level(logging.WARNING, logger="influence_cli"):
        fit_factors(load_config(path, ["factors.trainable_only=false"]))
    assert any("tracks 3 frozen layers" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="influence_cli"):
        fit_factors(load_config(path), overwrite=True)
    assert not any("frozen" in r.getMessage() for r in caplog.records)


def test_factors_of_another_trainable_only_are_refused_naming_it(tmp_path, lora_module):
    """trainable_only changes the layers tracked: compute-scores refuses factors fitted without it, and says which key."""
    path = project(tmp_path, lora_module)
    fit_factors(load_config(path, ["factors.trainable_only=false"]))
    with pytest.raises(OutputError, match=r"tracks layers \['fc1.base_layer', .*\], the config tracks \['fc1.lora_A.default'") as err:
        compute_scores(load_config(path))
    assert "factors.trainable_only" in err.value.hint


def test_edit_changes_only_the_adapters(tmp_path, lora_module):
    path = project(tmp_path, lora_module)
    cfg = load_config(path)
    fit_factors(cfg)
    report = edit_checkpoint(cfg, tmp_path / "edited.safetensors")
    assert [e.name for e in report.layers] == ADAPTERS
    before, after = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "edited.safetensors")
    assert set(after) == set(before)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == [f"{name}.weight" for name in ADAPTERS]
    load_checkpoint(lora_module.make(), tmp_path / "edited.safetensors")  # loads back into the model it came from


def test_adapter_only_checkpoint_is_refused_with_a_hint(tmp_path, lora_module):
    """peft's save_pretrained writes adapter_model.safetensors: the adapter's weights alone, keyed without the
    adapter's name (fc1.lora_A.weight)."""
    model = lora_module.make()
    adapter = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    (tmp_path / "adapter").mkdir()
    save_file(adapter, tmp_path / "adapter" / "adapter_model.safetensors")
    save_file(adapter, tmp_path / "lora.safetensors")
    for name in ("adapter/adapter_model.safetensors", "lora.safetensors"):  # by its name, or by its keys
        with pytest.raises(ModelError, match=r"holds 4 keys \(fc1.lora_A.weight, .*\), an adapter's weights alone, without the base model's \(the model has 10 keys\)") as err:
            load_checkpoint(lora_module.make(), tmp_path / name)
        assert "PeftModel.from_pretrained(base, folder, is_trainable=True)" in err.value.hint and "model.checkpoint null" in err.value.hint
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"architecture": "lora_mlp:make", "checkpoint": "adapter"}}))
    with pytest.raises(ConfigError, match=r"model.checkpoint: .*/adapter' is a folder, not a file \(it holds adapter_model.safetensors, an adapter's weights alone"):
        load_config(tmp_path / "config.yaml", reads=[])


class ModulesToSaveWrapper(nn.Module):
    """peft's ModulesToSaveWrapper (modules_to_save: a module fine-tuned whole beside the adapters): the frozen
    original and one trained copy per adapter, of which the forward calls one."""

    def __init__(self, module: nn.Module, adapters=("default",), active=("default",), disabled=False):
        super().__init__()
        import copy

        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({a: copy.deepcopy(module).requires_grad_(True) for a in adapters})
        self.active_adapters, self.disable_adapters = list(active), disabled

    def forward(self, x):
        if self.disable_adapters or any(a not in self.modules_to_save for a in self.active_adapters):
            return self.original_module(x)
        return self._forward_wrapped(x)

    def _forward_wrapped(self, x):
        return self.modules_to_save[self.active_adapters[0]](x) if self.active_adapters else self.original_module(x)


@pytest.mark.parametrize(
    "options,called",
    [({}, "modules_to_save.default"), ({"adapters": ("a", "b"), "active": ("b",)}, "modules_to_save.b"), ({"disabled": True}, "original_module")],
    ids=["active", "second-adapter", "disabled"],
)
def test_peft_modules_to_save_copies_that_are_not_called(lora_module, monkeypatch, options, called):
    """Wildcards leave out the copies of a modules_to_save module that its wrapper does not call (tracked, they
    stopped fit-factors as layers never called), naming one is refused, and the copy it calls is tracked."""
    import sys
    import types

    fake = types.ModuleType("peft.utils.other")
    fake.ModulesToSaveWrapper = ModulesToSaveWrapper
    monkeypatch.setitem(sys.modules, "peft.utils.other", fake)
    model = lora_module.make().double()
    model.head = ModulesToSaveWrapper(model.head, **options)
    tracked = find_tracked_modules(model, ["*"])
    heads = [tm.name for tm in tracked if tm.name.startswith("head.")]
    assert heads == [f"head.{called}"]
    copies = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("head.") and n != f"head.{called}"]
    left_out = {u.name: u.reason for u in untracked_modules(model, tracked)}
    for name in copies:
        assert left_out[name] == f"a copy of 'head' that peft's ModulesToSaveWrapper keeps but does not call (it calls {called!r})"
    with pytest.raises(ModelError, match=rf"Linear '{copies[0]}' is a copy of 'head' that peft's ModulesToSaveWrapper keeps but does not call"):
        find_tracked_modules(model, ["*lora*", copies[0]])
    x, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,))
    fit(model, x, y, modules=["*"])  # every tracked layer is called


class OldModulesToSaveWrapper(nn.Module):
    """peft's ModulesToSaveWrapper before 0.15: its forward alone (no _forward_wrapped), one `active_adapter`, a string."""

    def __init__(self, module: nn.Module, active="default", disabled=False):
        super().__init__()
        import copy

        self.original_module = module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module).requires_grad_(True)})
        self.active_adapter, self.disable_adapters = active, disabled

    def forward(self, x):
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(x)
        return self.modules_to_save[self.active_adapter](x)


@pytest.mark.parametrize("options,called", [({}, "modules_to_save.default"), ({"disabled": True}, "original_module")], ids=["active", "disabled"])
def test_modules_to_save_of_peft_before_0_15(lora_module, monkeypatch, options, called):
    """Its wrapper has no _forward_wrapped (reading it raised AttributeError) and names its adapter in active_adapter."""
    import sys
    import types

    fake = types.ModuleType("peft.utils.other")
    fake.ModulesToSaveWrapper = OldModulesToSaveWrapper
    monkeypatch.setitem(sys.modules, "peft.utils.other", fake)
    model = lora_module.make().double()
    model.head = OldModulesToSaveWrapper(model.head, **options)
    assert [tm.name for tm in find_tracked_modules(model, ["*"]) if tm.name.startswith("head.")] == [f"head.{called}"]
    fit(model, torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,)), modules=["*"])


# ----------------------------------------------------------------------------- peft itself


def test_peft_lora_model():
    """peft's get_peft_model on a small MLP (when peft is installed): trainable_only tracks exactly its lora_A and
    lora_B layers, and their factors and scores meet the same definitions as above; of a modules_to_save module,
    the copy peft calls is tracked."""
    peft = pytest.importorskip("peft", reason="peft is not installed (influence_cli does not need it)")
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("fc1", nn.Linear(5, 4))
    base.add_module("act", nn.Tanh())
    base.add_module("head", nn.Linear(4, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.3, target_modules=["fc1"])).double().eval()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        with torch.no_grad():
            p.normal_()  # trained: B is no longer its initial 0
    names = ["base_model.model.fc1.lora_A.default", "base_model.model.fc1.lora_B.default"]
    tracked = find_tracked_modules(model, ["*"], trainable_only=True)
    assert [tm.name for tm in tracked] == names
    saved = peft.get_peft_model(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    assert [tm.name for tm in find_tracked_modules(saved, ["*"])][-1] == "base_model.model.2.modules_to_save.default"  # not original_module, never called
    assert [tm.name for tm in find_tracked_modules(model, ["*lora_A*", "*lora_B*"])] == names
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 5, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    xq, yq = torch.randn(3, 5, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g)
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=5, modules=names)
    gt, gq = adapter_gradients(model, names, x, y), adapter_gradients(model, names, xq, yq)
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping=0.01)
    want = sum(gq[n] @ torch.linalg.inv(kron_dense(layers[n], 0.01)) @ gt[n].T for n in names)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for n in names:
        rotated = layers[n].g_eigenvectors.T @ gt[n].reshape(12, *layers[n].eigenvalues.shape) @ layers[n].a_eigenvectors
        torch.testing.assert_close(layers[n].eigenvalues, rotated.square().mean(0), rtol=1e-9, atol=1e-14)


def test_inspect_lists_frozen_layers(tmp_path, lora_module):
    """`influence inspect`: with trainable_only the frozen layers are listed among the parameters left out, with
    why; without it, a wildcard tracking them is a warning on stderr."""
    from typer.testing import CliRunner

    from influence_cli.cli import app

    path = project(tmp_path, lora_module)
    runner = CliRunner(env={"COLUMNS": "200", "INFLUENCE_DEBUG": None, "RANK": None})
    result = runner.invoke(app, ["inspect", path])
    assert result.exit_code == 0, result.stderr
    assert "4 layers, factors" in result.stdout and "34 of 93 parameters tracked" in result.stdout
    assert "fc1.base_layer, fc2.base_layer, head" in result.stdout and "frozen (no parameter requires grad), left out by factors.trainable_only" in result.stdout
    assert "warning" not in result.stderr
    result = runner.invoke(app, ["inspect", path, "--set", "factors.trainable_only=false"])
    assert result.exit_code == 0, result.stderr
    assert "7 layers, factors" in result.stdout
    assert "warning: factors.modules tracks 3 frozen layers" in " ".join(result.stderr.split())
