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

import pytest
import yaml
from safetensors.torch import save_file

from influence_cli.config import load_config
from influence_cli.errors import ConfigError, ModelError
from influence_cli.models import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


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
