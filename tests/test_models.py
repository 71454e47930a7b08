"""Tests for influence_cli.models: architectures, factories, checkpoints, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from influence_cli.config import ModelConfig
from influence_cli.errors import ModelError
from influence_cli.models import (
    BUILTIN_ARCHITECTURES,
    build_model,
    checkpoint_files,
    load_checkpoint,
    load_model,
    model_fingerprint,
    names_a_class,
)
from influence_cli.tracking import find_tracked_modules

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
MLP_KWARGS = {"input_dim": 64, "hidden": [64, 32], "num_classes": 10}


def _mlp(**kwargs) -> nn.Module:
    return build_model(ModelConfig(architecture="mlp", kwargs={**MLP_KWARGS, **kwargs}), ".")


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- architectures


def test_builtins_registered() -> None:
    assert {"mlp", "cnn"} <= set(BUILTIN_ARCHITECTURES)


def test_mlp_flat_and_image_inputs() -> None:
    model = _mlp()
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == ["fc1", "fc2", "head"]


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_mlp_activations(activation: str) -> None:
    model = build_model(ModelConfig("mlp", {"input_dim": 784, "activation": activation}), ".")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = build_model(ModelConfig("mlp", {"input_dim": 3, "hidden": [], "num_classes": 1}), ".")
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear]


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({"in_channels": 1, "image_size": 8, "channels": [8, 16]}, (4, 1, 8, 8)),
        ({}, (4, 1, 28, 28)),
        ({"in_channels": 3, "image_size": 32}, (4, 3, 32, 32)),
        ({"in_channels": 3, "image_size": [32, 16]}, (4, 3, 32, 16)),
    ],
)
def test_cnn_shapes(kwargs: dict, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig("cnn", kwargs), ".")
    assert model(torch.randn(*shape)).shape == (4, 10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == [f"conv{i + 1}" for i in range(len(kwargs.get("channels", [16, 32])))]


def test_cnn_too_small_image() -> None:
    with pytest.raises(ModelError, match="image_size"):
        build_model(ModelConfig("cnn", {"image_size": 4, "channels": [8, 8, 8]}), ".")


def test_build_is_seeded_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = _mlp(), _mlp()
    assert torch.equal(torch.rand(3), expected)
    _assert_same_weights(a, b)


def test_build_leaves_numpy_python_and_cuda_generators_as_they_were(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A factory that draws from NumPy and Python's `random` leaves both where they were, and building seeds no CUDA
    generator: with CUDA not started, torch.manual_seed would queue a seed that reseeds the caller's once it starts."""
    import random
    import uuid

    import numpy as np

    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    name = f"drawing_model_{uuid.uuid4().hex[:8]}"
    _write_factory(tmp_path, name, "import random\nimport numpy as np\nfrom torch import nn\n\n"
                   "def make():\n    np.random.rand(3), random.random()\n    return nn.Linear(3, 2)\n")  # fmt: skip
    np.random.seed(5), random.seed(5)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    a, b = build_model(ModelConfig(f"{name}:make"), tmp_path), build_model(ModelConfig(f"{name}:make"), tmp_path)
    _assert_same_weights(a, b)
    now = np.random.get_state()
    assert now[0] == numpy_state[0] and np.array_equal(now[1], numpy_state[1]) and now[2:] == numpy_state[2:]
    assert random.getstate() == python_state and seeded == []


def test_torchvision_resnet18() -> None:
    model = build_model(ModelConfig("torchvision:resnet18", {"num_classes": 10}), ".")
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_torchvision_unknown_name_suggests() -> None:
    with pytest.raises(ModelError, match="model.architecture") as info:
        build_model(ModelConfig("torchvision:resnet19"), ".")
    assert "resnet18" in (info.value.hint or "")


def test_unknown_architecture() -> None:
    with pytest.raises(ModelError, match="model.architecture") as info:
        build_model(ModelConfig("mpl", {"input_dim": 4}), ".")
    assert "mlp" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_dim": 4, "widht": 3}, "model.kwargs.*widht"),
        ({}, "model.kwargs.*input_dim"),
        ({"input_dim": "4"}, "model.kwargs.input_dim"),
        ({"input_dim": 4, "activation": "swish"}, "model.kwargs.activation"),
    ],
)
def test_bad_kwargs(kwargs: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(ModelConfig("mlp", kwargs), ".")


def test_torchvision_pretrained_weights_come_from_the_checkpoint() -> None:
    with pytest.raises(ModelError, match="torchvision models are built without weights") as err:
        build_model(ModelConfig("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}), ".")
    assert "model.checkpoint" in err.value.hint


def test_torchvision_bad_kwargs() -> None:
    with pytest.raises(ModelError, match="model.kwargs"):
        build_model(ModelConfig("torchvision:resnet18", {"num_clases": 10}), ".")


# ----------------------------------------------------------------------------- factories


def _write_factory(folder: Path, module: str, body: str) -> None:
    (folder / f"{module}.py").write_text(body)


FACTORY = """
from torch import nn

def make(width=4, out=2):
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, out))

def not_a_model():
    return 42

def broken():
    raise RuntimeError("boom")
"""


def test_factory_from_config_folder(tmp_path: Path) -> None:
    _write_factory(tmp_path, "my_model", FACTORY)
    model = build_model(ModelConfig("my_model:make", {"width": 5}), tmp_path)
    assert model(torch.randn(2, 3)).shape == (2, 2)
    assert str(tmp_path) not in __import__("sys").path


def test_factory_same_name_other_folder(tmp_path: Path) -> None:
    for sub, out in (("a", 2), ("b", 7)):
        folder = tmp_path / sub
        folder.mkdir()
        _write_factory(folder, "my_model", FACTORY.replace("out=2", f"out={out}"))
        model = build_model(ModelConfig("my_model:make"), folder)
        assert model(torch.randn(1, 3)).shape == (1, out)


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("my_model:not_a_model", {}, "model.architecture.*not a torch.nn.Module"),
        ("my_model:missing", {}, "model.architecture.*no attribute"),
        ("my_model:broken", {}, "model.architecture.*boom"),
        ("no_such_module_xyz:make", {}, "model.architecture.*cannot import"),
        ("my_model:make", {"depth": 3}, "model.kwargs.*depth"),
    ],
)
def test_factory_errors(tmp_path: Path, arch: str, kwargs: dict, match: str) -> None:
    _write_factory(tmp_path, "my_model", FACTORY)
    with pytest.raises(ModelError, match=match):
        build_model(ModelConfig(arch, kwargs), tmp_path)


def test_a_misspelled_factory_is_pointed_at_the_closest_function(tmp_path: Path) -> None:
    _write_factory(tmp_path, "my_model", FACTORY)
    with pytest.raises(ModelError, match="no attribute 'mak'") as exc:
        build_model(ModelConfig("my_model:mak"), tmp_path)
    assert exc.value.hint == "did you mean 'make'?"
    with pytest.raises(ModelError) as exc:
        build_model(ModelConfig("my_model:zzzzzz"), tmp_path)
    assert exc.value.hint.startswith("my_model defines ") and "make" in exc.value.hint
    (tmp_path / "mypkg").mkdir()
    _write_factory(tmp_path / "mypkg", "models", FACTORY)
    (tmp_path / "mypkg" / "__init__.py").write_text("from .models import make\n")  # a package that re-exports its factory
    with pytest.raises(ModelError) as exc:
        build_model(ModelConfig("mypkg:mkae"), tmp_path)
    assert exc.value.hint == "did you mean 'make'?"


def test_an_import_failure_hints_at_its_cause(tmp_path: Path) -> None:
    """A file path where the module's name belongs, a missing module, and a module that imports an
    absent package each get their own hint (a path was told to become `pkg/models/py.py`)."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    _write_factory(tmp_path / "mypkg", "models", FACTORY)
    _write_factory(tmp_path, "needs_more", "import no_such_package_xyz\n")
    hints = {}
    for arch in ("mypkg/models.py:make", "mypkg.models.py:make", "./mypkg/models:make", "no_such_module_xyz:make", "needs_more:make"):
        with pytest.raises(ModelError) as exc:
            build_model(ModelConfig(arch), tmp_path)
        hints[arch] = exc.value.hint
    for arch in ("mypkg/models.py:make", "mypkg.models.py:make", "./mypkg/models:make"):
        assert "mypkg.models:make" in hints[arch] and "py.py" not in hints[arch], hints[arch]
    assert hints["no_such_module_xyz:make"].startswith("put no_such_module_xyz.py beside the config")
    assert hints["needs_more:make"] == "needs_more imports 'no_such_package_xyz', which is not installed in this Python environment"
    assert isinstance(build_model(ModelConfig("mypkg.models:make"), tmp_path), nn.Module)  # the name the hint gives works


# ----------------------------------------------------------------------------- checkpoints


def _trained_like(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("suffix", "wrap"),
    [
        (".safetensors", lambda s: s),
        (".pt", lambda s: s),
        (".pth", lambda s: {"state_dict": s, "epoch": 3}),
        (".pt", lambda s: {"model": s, "optimizer": {"lr": 0.1}}),
        (".bin", lambda s: {"model_state_dict": s}),
        (".pt", lambda s: {f"module.{k}": v for k, v in s.items()}),
        (".pt", lambda s: {"state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}}),
        (".safetensors", lambda s: {f"_orig_mod.{k}": v for k, v in s.items()}),
        (".ckpt", lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}}),
    ],
)
def test_checkpoint_round_trip(tmp_path: Path, suffix: str, wrap) -> None:
    source = _mlp()
    state = _trained_like(source)
    source.load_state_dict(state)
    path = tmp_path / f"weights{suffix}"
    obj = wrap(state)
    if suffix == ".safetensors":
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    target = _mlp()
    load_checkpoint(target, path)
    _assert_same_weights(source, target)


def test_a_sharded_checkpoint_loads_from_its_index(tmp_path: Path) -> None:
    """Hugging Face's save_pretrained splits a large model into shards beside an index (model.safetensors.index.json):
    the index loads every shard's tensors; a shard without a tensor the index assigns to it, or a JSON file that is no
    index, is named."""
    source = _mlp()
    state = _trained_like(source)
    source.load_state_dict(state)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.pt": names[len(names) // 2 :]}
    save_file({k: state[k] for k in shards["model-00001-of-00002.safetensors"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    torch.save({k: state[k] for k in shards["model-00002-of-00002.pt"]}, tmp_path / "model-00002-of-00002.pt")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    target = _mlp()
    load_checkpoint(target, index)
    _assert_same_weights(source, target)
    moved = names[0]
    index.write_text(json.dumps({"weight_map": {k: "model-00002-of-00002.pt" if k == moved else f for f, ks in shards.items() for k in ks}}))
    with pytest.raises(ModelError, match=rf"shard 'model-00002-of-00002.pt' holds no tensor '{moved}', which the index assigns to it"):
        load_checkpoint(_mlp(), index)
    index.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ModelError, match="not the index of a sharded checkpoint") as exc:
        load_checkpoint(_mlp(), index)
    assert "model.safetensors.index.json" in exc.value.hint
    index.write_text("[" * 100_000 + "]" * 100_000)  # nested past Python's recursion limit: was a traceback
    assert checkpoint_files(index) == [index]
    with pytest.raises(ModelError, match="not the index of a sharded checkpoint"):
        load_checkpoint(_mlp(), index)


def test_a_pytorch_model_bin_index_loads_its_shards_weights_only_and_missing_shards_are_named(tmp_path: Path) -> None:
    """pytorch_model.bin.index.json: its .bin shards load as tensors only (one holding a pickled module is refused);
    an index naming shards that are not beside it names the first and how many are missing, before any is read;
    an index naming an index (itself) as a shard is refused, not followed without end."""
    source = _mlp()
    state = _trained_like(source)
    names = list(state)
    half = len(names) // 2
    torch.save({k: state[k] for k in names[:half]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in names[half:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = tmp_path / "pytorch_model.bin.index.json"
    shard_of = {k: f"pytorch_model-0000{1 + (i >= half)}-of-00002.bin" for i, k in enumerate(names)}
    index.write_text(json.dumps({"weight_map": shard_of}))
    target = _mlp()
    load_checkpoint(target, index)
    source.load_state_dict(state)
    _assert_same_weights(source, target)
    torch.save({k: state[k] for k in names[half:]} | {"head": nn.Linear(1, 1)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ModelError, match=r"pytorch_model-00002-of-00002.bin': cannot read the checkpoint \(UnpicklingError") as exc:
        load_checkpoint(_mlp(), index)
    assert "pickled objects other than tensors" in exc.value.hint
    index.write_text(json.dumps({"weight_map": {k: f"gone-{i % 2}.bin" for i, k in enumerate(names)}}))
    with pytest.raises(ModelError, match=r"shard 'gone-0.bin', which the index names, is not beside it \(2 of its 2 shards are missing\)") as exc:
        load_checkpoint(_mlp(), index)
    assert "save_pretrained" in exc.value.hint
    index.write_text(json.dumps({"weight_map": {names[0]: index.name}}))
    with pytest.raises(ModelError, match=r"the index names 'pytorch_model.bin.index.json' as a shard, an index itself"):
        load_checkpoint(_mlp(), index)


def test_load_model_resolves_against_base_dir(tmp_path: Path) -> None:
    source = _mlp()
    source.load_state_dict(_trained_like(source))
    (tmp_path / "ckpt").mkdir()
    save_file(source.state_dict(), str(tmp_path / "ckpt" / "w.safetensors"))
    cfg = ModelConfig("mlp", MLP_KWARGS, checkpoint="ckpt/w.safetensors")
    model = load_model(cfg, tmp_path)
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    _assert_same_weights(source, model)
    other = load_model(cfg, tmp_path, checkpoint=SAMPLE / "mlp.safetensors")
    assert model_fingerprint(other) != model_fingerprint(model)


def test_mismatch_lists_keys(tmp_path: Path) -> None:
    state = _trained_like(_mlp())
    state["extra.weight"] = torch.zeros(2)
    del state["head.bias"]
    state["fc1.weight"] = torch.zeros(128, 64)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError) as info:
        load_checkpoint(_mlp(), path)
    msg = info.value.message
    assert "bad.safetensors" in msg and "\n" not in msg
    assert "missing 1 key (head.bias)" in msg
    assert "unexpected 1 key (extra.weight)" in msg
    assert "fc1.weight: checkpoint [128, 64] vs model [64, 64]" in msg
    assert "model.kwargs" in (info.value.hint or "")


def test_a_head_of_another_number_of_classes_names_num_classes(tmp_path: Path) -> None:
    """A classifier trained on 3 classes loaded into the default 10 (torchvision's 1000): the hint gives the number."""
    path = tmp_path / "three.pt"
    torch.save(_mlp(num_classes=3).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(_mlp(), path)
    assert "head.weight: checkpoint [3, 32] vs model [10, 32]" in info.value.message
    assert info.value.hint.startswith("the checkpoint's head has 3 outputs, the model's 10: set model.kwargs.num_classes: 3"), info.value.hint
    with pytest.raises(ModelError) as member:  # an ensemble's member is of model.checkpoint's network: its own hint
        load_checkpoint(_mlp(), path, key="scores.checkpoints[0]")
    assert "num_classes" not in member.value.hint
    state = _mlp(num_classes=3).state_dict()
    state["fc1.weight"] = torch.zeros(64, 32)  # more than the head differs: the general hint
    torch.save(state, path)
    with pytest.raises(ModelError) as other:
        load_checkpoint(_mlp(), path)
    assert "num_classes" not in other.value.hint and "model.kwargs" in other.value.hint


def test_mismatch_truncates_long_lists(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(9)}, path)
    with pytest.raises(ModelError, match=r"unexpected 9 keys \(.*\(4 more\)\)"):
        load_checkpoint(_mlp(), path, key="scores.checkpoints[0]")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_checkpoint(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelError, match=f"model.checkpoint: .*corrupt{suffix}.*cannot read"):
        load_checkpoint(_mlp(), path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_mlp().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError, match="w.pt"):
        load_checkpoint(_mlp(), path)


def test_whole_pickled_model_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(_mlp(), path)
    with pytest.raises(ModelError, match=r"whole.pt.*Unsupported global: GLOBAL \S+ \(not a tensor\)\)(\n|$)") as info:
        load_checkpoint(_mlp(), path)
    assert "state_dict()" in info.value.hint


def test_a_text_file_named_pt_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("model: mlp\nlr: 0.1\n")
    with pytest.raises(ModelError, match=r"notes.pt.*cannot read the checkpoint \(UnpicklingError: Unsupported operand") as info:
        load_checkpoint(_mlp(), path)
    assert "not a checkpoint" in info.value.hint


def test_missing_and_non_state_dict_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(_mlp(), tmp_path / "nope.pt")
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match="not a state dict"):
        load_checkpoint(_mlp(), path)


def _mapped_ranges(name: bytes) -> list[tuple[int, int]]:
    """The address ranges of this process's memory maps of the file `name` (/proc/self/maps)."""
    with open("/proc/self/maps", "rb") as fh:
        lines = [line.split(None, 5) for line in fh]
    return [tuple(int(x, 16) for x in parts[0].split(b"-")) for parts in lines if len(parts) == 6 and parts[5].rstrip(b"\n") == name]


def test_a_checkpoint_whose_path_is_not_utf8_is_memory_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A path of other bytes than UTF-8 (which safetensors cannot open by name) is mapped through /proc/self/fd/N, not
    read into memory: the same tensors, views of a map of the file that outlives the descriptor, which is closed."""
    import os

    import safetensors.torch

    from influence_cli import storage
    from influence_cli.models import read_state_dict

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd")
    state = {"w": torch.randn(64, 32, dtype=torch.float64), "b": torch.arange(32, dtype=torch.int64)}
    plain = tmp_path / "model.safetensors"
    save_file(state, str(plain))
    name = os.fsencode(tmp_path) + b"/caf\xe9.safetensors"
    os.link(plain, name)
    odd = Path(os.fsdecode(name))
    monkeypatch.setattr(safetensors.torch, "load", lambda *a, **kw: pytest.fail("read into memory through Python"))
    fds = sorted(os.listdir("/proc/self/fd"))
    loaded = storage.load_safetensors(odd)
    assert sorted(os.listdir("/proc/self/fd")) == fds  # the descriptor is closed
    ranges = _mapped_ranges(name)
    assert ranges, "no map of the file"
    for key, tensor in loaded.items():
        start = tensor.data_ptr()
        assert any(lo <= start < hi for lo, hi in ranges), key  # a view of the map, not a copy
        assert torch.equal(tensor, state[key]) and tensor.dtype == state[key].dtype
    os.unlink(name)
    os.unlink(plain)
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # the map outlives the descriptor, and the file's names
    save_file(state, str(plain))
    os.link(plain, name)
    read = read_state_dict(odd)
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    monkeypatch.undo()
    monkeypatch.setattr(storage, "_descriptor_names", lambda: False)  # no /proc/self/fd
    read = storage.load_safetensors(odd)  # read through Python
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert sorted(os.listdir("/proc/self/fd")) == fds


def test_an_output_whose_path_is_not_utf8_is_opened_through_its_descriptor(tmp_path: Path):
    """safe_open's handle of such a path (top-k keeps one while it reads the scores a slice at a time) and read_groups'
    tensors: views of a map of the file, the descriptor closed, and the handle reads its own file after another file
    took that descriptor's number."""
    import os

    from influence_cli import storage

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc/self/fd")
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff.safetensors"))
    values = torch.arange(4096, dtype=torch.float64)
    storage.save_tensors(odd, {"x": values}, {storage.FORMAT_KEY: storage.SCORES_FORMAT, "base_dir": str(odd.parent)})
    fds = sorted(os.listdir("/proc/self/fd"))
    handle = storage.open_safetensors(odd)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(4096, dtype=torch.float64)}, str(other))
    with open(other, "rb"):  # the freed descriptor number, most likely
        assert torch.equal(handle.get_slice("x")[10:20], values[10:20]) and list(handle.keys()) == ["x"]
    (group,) = storage.read_groups(odd, [["x"]], separate=True)
    start = group["x"].data_ptr()
    assert any(lo <= start < hi for lo, hi in _mapped_ranges(os.fsencode(odd))) and torch.equal(group["x"], values)
    meta = storage.read_metadata(odd)
    assert meta["base_dir"] == str(odd.parent) and meta[storage.FORMAT_KEY] == storage.SCORES_FORMAT


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    model = _mlp()
    fp = model_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    assert model_fingerprint(load_model(ModelConfig("mlp", MLP_KWARGS), ".", checkpoint=path)) == fp
    assert model_fingerprint(load_model(ModelConfig("mlp", MLP_KWARGS), ".", checkpoint=path)) == fp
    with torch.no_grad():
        model.fc2.weight[3, 5] += 1e-6
    assert model_fingerprint(model) != fp
    other = build_model(ModelConfig("mlp", {**MLP_KWARGS, "hidden": [32, 64]}), ".")
    assert model_fingerprint(other) != fp


# ----------------------------------------------------------------------------- shipped sample data


@pytest.mark.parametrize(
    ("name", "kwargs", "min_accuracy"),
    [
        ("mlp", MLP_KWARGS, 0.88),
        ("cnn", {"in_channels": 1, "image_size": 8, "channels": [8, 16], "num_classes": 10}, 0.9),
    ],
)
def test_sample_checkpoints(name: str, kwargs: dict, min_accuracy: float) -> None:
    path = SAMPLE / f"{name}.safetensors"
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["architecture"] == name and json.loads(meta["kwargs"]) == kwargs
    model = build_model(ModelConfig(architecture=name, kwargs=kwargs), SAMPLE)
    load_checkpoint(model, path)
    model.eval()
    with safe_open(str(SAMPLE / "digits.safetensors"), "pt") as fh:
        inputs, labels = fh.get_tensor("inputs"), fh.get_tensor("labels")
    assert inputs.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
    with torch.no_grad():
        accuracy = (model(inputs[1500:] / 16.0).argmax(1) == labels[1500:]).float().mean().item()
    assert accuracy >= min_accuracy
    assert accuracy == pytest.approx(float(meta["test_accuracy"]), abs=1e-3)


def test_a_model_whose_own_keys_start_with_module_loads_its_checkpoint(tmp_path: Path) -> None:
    """The DDP prefix "module." is only stripped when the model's own keys do not carry it."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(3, 2)

    saved = Wrapper()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    model = Wrapper()
    load_checkpoint(model, path)
    assert torch.equal(model.module.weight, saved.module.weight)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in _mlp().state_dict().items()}, ddp)
    load_checkpoint(_mlp(), ddp)  # a DDP checkpoint of a plain model still loads


class PicksLogits(nn.Module):
    """A factory's wrapper around a network that returns a dict: the saved network's keys gain `net.`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["logits"]


def test_a_wrapper_around_the_saved_network_loads_its_checkpoint(tmp_path: Path) -> None:
    source = _mlp()
    source.load_state_dict(_trained_like(source))
    path = tmp_path / "inner.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    wrapped = PicksLogits(_mlp())
    load_checkpoint(wrapped, path)
    _assert_same_weights(source, wrapped.net)
    with pytest.raises(ModelError, match="missing"):  # only one whole leading component is added
        load_checkpoint(nn.Sequential(PicksLogits(_mlp())), path)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("wrapped", [False, True])
def test_tied_weights_saved_once_load_into_every_name(tmp_path: Path, wrapped: bool) -> None:
    """safetensors' save_model keeps one name per shared tensor (save_file refuses tied weights)."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    source = TiedLM()
    path = tmp_path / "tied.safetensors"
    save_model(source, str(path))
    with safe_open(str(path), "pt") as fh:
        assert len(list(fh.keys())) == len(source.state_dict()) - 1
    torch.manual_seed(1)
    model = PicksLogits(TiedLM()) if wrapped else TiedLM()
    load_checkpoint(model, path)
    target = model.net if wrapped else model
    _assert_same_weights(source, target)
    assert target.head.weight is target.embed.weight  # still tied


def test_a_float64_checkpoint_stays_float64(tmp_path: Path) -> None:
    """Weights that differ by 1e-12 are different models: a float64 checkpoint is not rounded to float32."""
    weights = {k: v.double() for k, v in _mlp().state_dict().items()}
    nudged = {k: v + 1e-12 for k, v in weights.items()}
    save_file(weights, str(tmp_path / "a.safetensors"))
    save_file(nudged, str(tmp_path / "b.safetensors"))
    cfg = ModelConfig(architecture="mlp", kwargs=MLP_KWARGS, checkpoint="a.safetensors")
    a = load_model(cfg, tmp_path)
    b = load_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS, checkpoint="b.safetensors"), tmp_path)
    assert all(p.dtype == torch.float64 for p in a.parameters())
    assert model_fingerprint(a) != model_fingerprint(b)
    save_file({k: v.float() for k, v in weights.items()}, str(tmp_path / "c.safetensors"))
    assert all(p.dtype == torch.float32 for p in load_model(ModelConfig(architecture="mlp", kwargs=MLP_KWARGS, checkpoint="c.safetensors"), tmp_path).parameters())


def test_lazy_layers_take_their_shapes_from_the_checkpoint_or_are_named(tmp_path, monkeypatch):
    """nn.LazyLinear has no shape until a forward or a checkpoint sets it."""
    (tmp_path / "lazy_factory.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = ModelConfig(architecture="lazy_factory:make")
    with pytest.raises(ModelError, match=r"lazy layers whose shapes are not set yet \(LazyLinear '0'\)"):
        load_model(cfg, tmp_path)
    with pytest.raises(ModelError, match="factors.modules: LazyLinear '0' has no shape yet"):
        find_tracked_modules(build_model(cfg, tmp_path), ["*"])
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    save_file(trained.state_dict(), tmp_path / "lazy.safetensors")
    model = load_model(ModelConfig(architecture="lazy_factory:make", checkpoint="lazy.safetensors"), tmp_path)
    assert model[0].weight.shape == (5, 4) and torch.equal(model[0].weight, trained[0].weight)
    assert [tm.name for tm in find_tracked_modules(model, ["*"])] == ["0", "2"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # the test writes a TorchScript archive on purpose
def test_checkpoint_shapes_that_were_misread_or_refused(tmp_path: Path) -> None:
    """Wrappers tried in order to the first state dict, EMA weights, BatchNorm without num_batches_tracked,
    safetensors under another suffix; integer weights, TorchScript and empty files named."""
    source = _mlp()
    state = _trained_like(source)
    cases = {
        "cfg_beside.pt": {"model": {"name": "mlp", "hidden": [64, 32]}, "model_state_dict": state, "epoch": 3},
        "ema.pt": {"ema": state},
        "timm_ema.pth": {"state_dict_ema": state},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        target = _mlp()
        load_checkpoint(target, tmp_path / name)
        _assert_same_weights(target, _mlp_with(state))
    save_file(state, str(tmp_path / "weights.bin"))  # safetensors bytes, .bin name
    load_checkpoint(_mlp(), tmp_path / "weights.bin")
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    torch.save({k: v for k, v in bn.state_dict().items() if not k.endswith("num_batches_tracked")}, tmp_path / "bn.pt")
    load_checkpoint(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), tmp_path / "bn.pt")
    save_file({k: v.to(torch.int32) if k.endswith("weight") else v for k, v in state.items()}, str(tmp_path / "int.safetensors"))
    with pytest.raises(ModelError, match="holds integer tensors for floating parameters"):
        load_checkpoint(_mlp(), tmp_path / "int.safetensors")
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
    with pytest.raises(ModelError, match=r"a TorchScript archive, written by torch.jit.save") as exc:
        load_checkpoint(_mlp(), tmp_path / "scripted.pt")
    assert "state_dict()" in exc.value.hint
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelError, match="the file is empty"):
        load_checkpoint(_mlp(), tmp_path / "empty.pt")


def _mlp_with(state: dict) -> nn.Module:
    model = _mlp()
    model.load_state_dict(state)
    return model


# ----------------------------------------------------------------------------- checkpoints that must be refused or read


def test_tied_weights_with_two_different_values_are_refused(tmp_path: Path) -> None:
    """A checkpoint of an untied variant gives the shared tensor two values; loading would keep one."""
    untied = {k: v.clone() for k, v in TiedLM().state_dict().items()}
    untied["head.weight"] = untied["embed.weight"] + 1.0
    torch.save(untied, tmp_path / "untied.pt")
    with pytest.raises(ModelError, match=r"different values for weights the model ties \(shares\): (embed|head)\.weight vs (embed|head)\.weight"):
        load_checkpoint(TiedLM(), tmp_path / "untied.pt")
    untied["head.weight"] = untied["embed.weight"].clone()  # the same values under both names load
    torch.save(untied, tmp_path / "same.pt")
    load_checkpoint(TiedLM(), tmp_path / "same.pt")


class Wrapper(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.add_module(name, _mlp())

    def forward(self, x):
        return next(iter(self.children()))(x)


@pytest.mark.parametrize("attribute", ["model", "module"])
def test_a_mismatch_under_a_prefix_lists_only_the_keys_that_differ(tmp_path: Path, attribute: str) -> None:
    state = _mlp().state_dict()
    del state["fc2.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ModelError) as err:
        load_checkpoint(Wrapper(attribute), tmp_path / "m.safetensors")
    assert f"missing 1 key ({attribute}.fc2.bias)" in str(err.value) and "unexpected" not in str(err.value)


def test_checkpoints_are_read_by_their_content_whatever_their_name(tmp_path: Path) -> None:
    source = _mlp()
    source.load_state_dict(_trained_like(source))
    torch.save(source.state_dict(), tmp_path / "pickled.safetensors")  # torch.load alone would hand this name to safetensors
    model = _mlp()
    load_checkpoint(model, tmp_path / "pickled.safetensors")
    _assert_same_weights(source, model)
    # a safetensors file whose 8-byte header length starts with 0x80, like a pickle, under a .bin name
    from safetensors.torch import save

    for pad in range(256):
        blob = save({k: v.contiguous() for k, v in source.state_dict().items()}, metadata={"pad": "x" * pad})
        if blob[0] == 0x80:
            break
    (tmp_path / "model.bin").write_bytes(blob)
    model = _mlp()
    load_checkpoint(model, tmp_path / "model.bin")
    _assert_same_weights(source, model)


def test_a_state_dict_with_other_values_names_them(tmp_path: Path) -> None:
    state: dict = dict(_mlp().state_dict())
    state["step"] = 3
    torch.save({"state_dict": state}, tmp_path / "mixed.pt")
    with pytest.raises(ModelError, match=r"holds a state dict with 1 value\(s\) that are not tensors: 'step' \(int\)"):
        load_checkpoint(_mlp(), tmp_path / "mixed.pt")


BUILDERS = """
import sys
import torch
from torch import nn

def on_meta():
    with torch.device("meta"):
        return nn.Linear(3, 2)

def in_inference_mode():
    with torch.inference_mode():
        return nn.Linear(3, 2)

def inner_type_error():
    return torch.empty("three")

def exits():
    sys.exit(3)
"""


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("on_meta", r"model.architecture: .* built the model on the meta device: 2 tensors \(weight, bias\) hold no values"),
        ("in_inference_mode", r"model.architecture: .* built the model under torch.inference_mode\(\)"),
        ("inner_type_error", r"model.architecture: factory 'builders:inner_type_error' raised TypeError"),
        ("exits", r"model.architecture: factory 'builders:exits' called sys.exit\(3\)"),
    ],
)
def test_models_a_factory_cannot_give(tmp_path: Path, factory: str, match: str) -> None:
    _write_factory(tmp_path, "builders", BUILDERS)
    with pytest.raises(ModelError, match=match):
        build_model(ModelConfig(f"builders:{factory}", {}), tmp_path)


def test_a_builder_error_of_several_lines_is_said_in_its_first(tmp_path: Path) -> None:
    """torch's own errors can run over many lines (a C++ stack under an overflow): the message keeps the first."""
    with pytest.raises(ModelError, match=r"model.architecture: built-in 'mlp' raised TypeError: empty\(\)") as err:
        build_model(ModelConfig("mlp", {"input_dim": 10**30, "hidden": [4], "num_classes": 2}), ".")
    assert "\n" not in err.value.message
    _write_factory(tmp_path, "lines", "def make():\n    raise ValueError('first line\\nsecond line')\n")
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig("lines:make", {}), tmp_path)
    assert err.value.message == "model.architecture: factory 'lines:make' raised ValueError: first line"
    _write_factory(tmp_path, "broken", "raise ValueError('first line\\nsecond line')\n")
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig("broken:make", {}), tmp_path)
    assert err.value.message == "model.architecture: importing 'broken' failed: ValueError: first line"


LOADS_WEIGHTS = """
import torch
from torch import nn

def make():
    net = nn.Sequential(nn.Linear(3, 2))
    net.load_state_dict({"1.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)})
    return net

def traced():
    raise RuntimeError('Traceback (most recent call last):\\n  File "w.py", line 3, in <module>\\nOSError: w.pt is not there')

def validated():
    raise ValueError("1 validation error for Settings\\nhidden\\n  Input should be a valid integer [type=int_parsing]")
"""


@pytest.mark.parametrize(
    ("factory", "said"),
    [
        ("make", 'Error(s) in loading state_dict for Sequential: Missing key(s) in state_dict: "0.weight". Unexpected key(s) in state_dict: "1.weight".'),
        ("traced", "OSError: w.pt is not there"),
        ("validated", "1 validation error for Settings hidden Input should be a valid integer [type=int_parsing]"),
    ],
)
def test_a_builder_error_whose_first_line_only_introduces_the_rest_says_the_rest(tmp_path: Path, factory: str, said: str) -> None:
    """A factory loading its own weights: torch's key mismatch names the keys on the lines under its first; a quoted
    traceback says why on its last line; pydantic names the field under its count. One line still, and --debug's
    traceback (the cause) keeps the text whole."""
    _write_factory(tmp_path, "loads", LOADS_WEIGHTS)
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig(f"loads:{factory}", {}), tmp_path)
    assert err.value.message.endswith(f" raised {type(err.value.__cause__).__name__}: {said}"), err.value.message
    assert "\n" not in err.value.message and "\n" in str(err.value.__cause__)


def test_an_architecture_in_capitals_is_suggested() -> None:
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig("MLP", {}), ".")
    assert err.value.hint == "did you mean mlp?"


def test_own_code_named_without_its_colon_is_given_the_colon(tmp_path: Path) -> None:
    """`my_model.make` (a dot where the colon belongs), and `my_model` alone with my_model.py beside the
    config, are pointed at `my_model:make` / `my_model:<function>`."""
    _write_factory(tmp_path, "my_model", FACTORY)
    with pytest.raises(ModelError, match="unknown architecture 'my_model.make'") as err:
        build_model(ModelConfig("my_model.make", {}), tmp_path)
    assert err.value.hint is not None and err.value.hint.endswith(": my_model:make")
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig("my_model", {}), tmp_path)
    assert err.value.hint is not None and err.value.hint.endswith(": my_model:<function>")
    with pytest.raises(ModelError) as err:  # no such file: the built-in names, as before
        build_model(ModelConfig("other_model", {}), tmp_path)
    assert err.value.hint is not None and "built-in names" in err.value.hint
    with pytest.raises(ModelError) as err:  # a dotted name of no module: the close built-in name, not a colon
        build_model(ModelConfig("mlp.v2", {}), tmp_path)
    assert err.value.hint == "did you mean mlp?"
    with pytest.raises(ModelError) as err:
        build_model(ModelConfig("other_model.make", {}), tmp_path)
    assert err.value.hint is not None and "colon" not in err.value.hint


def test_a_class_is_told_from_a_factory_by_what_the_architecture_names(tmp_path: Path) -> None:
    """A class, an alias of it and a functools.partial of it build the model as __init__ leaves it; a function,
    a classmethod factory and a callable instance may load weights, even when the model they return is of a
    class of their own name."""
    _write_factory(
        tmp_path,
        "own_classes",
        "import functools\nfrom torch import nn\n\n\nclass Net(nn.Sequential):\n    def __init__(self, width=4):\n"
        "        super().__init__(nn.Linear(2, width))\n\n    @classmethod\n    def pretrained(cls):\n        return cls()\n\n\n"
        "Alias = Net\nnarrow = functools.partial(Net, width=2)\n\n\nclass Builder:\n    def __call__(self):\n        return Net()\n\n\n"
        "builder = Builder()\n\n\ndef make():\n    return Net()\n\n\nclass Config:\n    pass\n",
    )
    named = {name: names_a_class(f"own_classes:{name}", tmp_path) for name in ("Net", "Alias", "narrow", "Net.pretrained", "builder", "make", "Config", "missing")}
    assert named == {"Net": True, "Alias": True, "narrow": True, "Net.pretrained": False, "builder": False, "make": False, "Config": False, "missing": False}
    assert not names_a_class("mlp", tmp_path) and not names_a_class("torchvision:resnet18", tmp_path)


def test_home_paths_resolve_the_same_for_validation_and_loading(tmp_path: Path) -> None:
    """An unknown ~user stays a plain folder name for the model loader as for config validation."""
    folder = tmp_path / "~nosuchuser"
    folder.mkdir()
    torch.save(_mlp().state_dict(), folder / "w.pt")
    model = load_model(ModelConfig("mlp", MLP_KWARGS, checkpoint="~nosuchuser/w.pt"), tmp_path)
    assert isinstance(model, nn.Module)


def test_a_checkpoint_with_raw_and_ema_weights_loads_the_raw_ones_and_says_so(tmp_path: Path, caplog) -> None:
    raw, ema = _trained_like(_mlp()), {k: torch.zeros_like(v) for k, v in _mlp().state_dict().items()}
    torch.save({"ema": ema, "state_dict": raw}, tmp_path / "both.pt")
    model = _mlp()
    with caplog.at_level("WARNING", logger="influence_cli"):
        load_checkpoint(model, tmp_path / "both.pt")
    assert torch.equal(model.fc1.weight, raw["fc1.weight"])
    assert "holds state dicts under state_dict, ema; loading state_dict" in caplog.text


def test_a_typed_error_raised_by_a_factory_keeps_its_hint_apart(tmp_path, monkeypatch):
    """str() of a typed error now carries its hint: the factory's message must not swallow it mid-line."""
    (tmp_path / "vocabmodel.py").write_text(
        "from influence_cli.errors import DataError\n"
        "def make():\n"
        "    raise DataError('vocab file missing', hint='run make_vocab.py')\n"
    )
    with pytest.raises(ModelError) as info:
        build_model(ModelConfig(architecture="vocabmodel:make"), tmp_path)
    assert info.value.message.endswith("raised DataError: vocab file missing") and info.value.hint == "run make_vocab.py"


class _Versioned(nn.Linear):
    """A layer that reads its version when loading, as torchvision's MNASNet does (it refuses None)."""

    _version = 3

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:  # noqa: ANN001
        if local_metadata.get("version") != 3:
            raise ValueError(f"version should be 3 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_modules_that_read_their_version_load_a_checkpoint(tmp_path: Path, suffix: str) -> None:
    """A safetensors file holds no module versions and unwrapping a torch.save'd dict drops them:
    the built model's versions are passed on, so torchvision's mnasnet0_5 loads (it raised ValueError)."""
    source = nn.Sequential(_Versioned(3, 2), nn.BatchNorm1d(2))
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # a prefix to strip
    path = tmp_path / f"w{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    target = nn.Sequential(_Versioned(3, 2), nn.BatchNorm1d(2))
    load_checkpoint(target, path)
    _assert_same_weights(source, target)
    import torchvision

    torch.manual_seed(0)
    save_file(torchvision.models.mnasnet0_5(num_classes=3).state_dict(), str(tmp_path / "mnasnet.safetensors"))
    model = load_model(ModelConfig(architecture="torchvision:mnasnet0_5", kwargs={"num_classes": 3}, checkpoint="mnasnet.safetensors"), tmp_path)
    with safe_open(str(tmp_path / "mnasnet.safetensors"), "pt") as f:
        assert torch.equal(model.classifier[1].weight, f.get_tensor("classifier.1.weight"))


def test_an_embedding_of_another_vocabulary_names_no_num_classes(tmp_path: Path) -> None:
    """An embedding table [vocabulary, dim] differing in its rows alone is no classifier head: the general hint."""

    def net(vocabulary: int) -> nn.Module:
        return nn.Sequential(nn.Embedding(vocabulary, 4), nn.Flatten(), nn.Linear(8, 3))

    path = tmp_path / "vocab.pt"
    torch.save(net(50).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_checkpoint(net(40), path)
    assert "0.weight: checkpoint [50, 4] vs model [40, 4]" in info.value.message
    assert "num_classes" not in info.value.hint and "model.kwargs" in info.value.hint
