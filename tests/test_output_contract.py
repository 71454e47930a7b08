"""What the model must return and the labels must look like: one tensor with the batch on
dim 0, targets shaped like the outputs (regression), one class index per example
(classification); a task.kind of the factors; float64 data stays float64."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml
from exact import batches_of
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from influence_cli import storage
from influence_cli.cli import app
from influence_cli.errors import DataError, ModelError
from influence_cli.models import mlp
from influence_cli.passes import stream_gradients
from influence_cli.tracking import find_tracked_modules


class Squeezed(nn.Module):
    """Regression with a final .squeeze(): a batch of one loses its batch dimension."""

    def __init__(self, outputs: int = 3):
        super().__init__()
        self.fc = nn.Linear(4, outputs)

    def forward(self, x):
        return self.fc(x).squeeze()


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y, y.detach()


def _first(model, x, y, kind="regression", fisher="ggn"):
    tracked = find_tracked_modules(model, ["*"])
    batches = batches_of(x, y, 8)(0)
    return list(stream_gradients(model, tracked, batches, task_kind=kind, mode="fisher", fisher=fisher))


def test_outputs_that_lose_the_batch_dimension_are_refused():
    x, y = torch.randn(9, 4), torch.randn(9, 3)  # batches of 8 and 1
    with pytest.raises(ModelError, match=r"the model returned outputs of shape \[3\] for a batch of 1: dim 0 must be the batch") as err:
        _first(Squeezed(), x, y)
    assert ".squeeze(-1)" in err.value.hint
    with pytest.raises(ModelError, match=r"outputs of shape \[\] for a batch of 1"):
        _first(Squeezed(outputs=1), x, y[:, 0])


def test_a_model_returning_a_tuple_is_refused():
    with pytest.raises(ModelError, match="the model returned a tuple, not a tensor of outputs") as err:
        _first(Pair(), torch.randn(4, 4), torch.randn(4, 3))
    assert "`return self.model(x)[0]`" in err.value.hint


class CausalLMOutput(OrderedDict):
    """What a Hugging Face model returns (transformers' ModelOutput is an OrderedDict with attributes)."""


class Returns(nn.Module):
    """Returns its Linear's outputs under `key` of a mapping of class `cls`, beside a cache."""

    def __init__(self, cls: type, key: str):
        super().__init__()
        self.fc, self.cls, self.key = nn.Linear(4, 3), cls, key

    def forward(self, x):
        return self.cls([(self.key, self.fc(x)), ("past_key_values", None)])


@pytest.mark.parametrize(
    ("cls", "key", "described", "pick"),
    [
        (CausalLMOutput, "logits", "CausalLMOutput (a mapping of 'logits', 'past_key_values')", '["logits"]'),
        (dict, "prediction", "dict (a mapping of 'prediction', 'past_key_values')", "['prediction']"),
    ],
    ids=["model-output", "dict"],
)
def test_a_model_returning_a_mapping_is_refused_naming_its_keys(cls, key, described, pick):
    """A Hugging Face ModelOutput (or any mapping) is named with its keys, and the hint picks the logits, else its first tensor."""
    with pytest.raises(ModelError) as err:
        _first(Returns(cls, key), torch.randn(4, 4), torch.randn(4, 3))
    assert err.value.message == f"the model returned a {described}, not a tensor of outputs"
    assert f"`return self.model(x){pick}`" in err.value.hint


@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_regression_targets_must_match_the_outputs(fisher):
    model = nn.Linear(4, 3)
    with pytest.raises(DataError, match=r"data.train: regression targets of shape \[\] per example do not match the model's outputs of shape \[3\]"):
        _first(model, torch.randn(4, 4), torch.randn(4), fisher=fisher)
    with pytest.raises(DataError, match=r"targets of shape \[3\] per example do not match the model's outputs of shape \[1\]"):
        _first(nn.Linear(4, 1), torch.randn(4, 4), torch.randn(4, 3), fisher=fisher)
    assert len(_first(nn.Linear(4, 1), torch.randn(4, 4), torch.randn(4), fisher=fisher)) == 1  # [B] targets for [B, 1] outputs


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_classification_needs_one_class_index_per_example(fisher):
    with pytest.raises(DataError, match=r"classification needs one class index per example, got labels of shape \[1\] each") as err:
        _first(nn.Linear(4, 3), torch.randn(4, 4), torch.zeros(4, 1, dtype=torch.int64), kind="classification", fisher=fisher)
    assert "labels.squeeze(1)" in err.value.hint


def _project(tmp_path, inputs, labels, width=None, model=None, **config):
    save_file({"inputs": inputs, "labels": labels}, tmp_path / "data.safetensors")
    torch.manual_seed(0)
    width = width or (labels.shape[1] if labels.dim() > 1 else 1)
    model = model or mlp(inputs.shape[1], [5], width, "tanh").to(inputs.dtype)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    n = len(inputs)
    base = {
        "model": {
            "architecture": "mlp",
            "kwargs": {"input_dim": inputs.shape[1], "hidden": [5], "num_classes": width, "activation": "tanh"},
            "checkpoint": "model.safetensors",
        },
        "task": {"kind": "regression"},
        "data": {
            "train": {"source": "tensors", "path": "data.safetensors", "range": [0, n - 3]},
            "query": {"source": "tensors", "path": "data.safetensors", "range": [n - 3, n]},
            "batch_size": 8,
        },
        "factors": {"fisher": "empirical"},
        "scores": {"damping": 0.1},
        "output_dir": "out",
        "device": "cpu",
    }
    for key, value in config.items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base))
    return str(tmp_path / "config.yaml")


def _invoke(*args):
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None}).invoke(app, list(args))


def test_factors_remember_the_task(tmp_path):
    g = torch.Generator().manual_seed(0)
    config = _project(tmp_path, torch.randn(20, 4, generator=g), torch.randint(0, 2, (20,), generator=g), width=2)
    assert _invoke("fit-factors", config, "--set", "task.kind=classification").exit_code == 0
    meta = storage.read_metadata(tmp_path / "out" / storage.FACTORS_FILE)
    assert meta["task"] == "classification"
    result = _invoke("compute-scores", config)
    assert result.exit_code == 5
    assert "was fitted for task.kind=classification, the config has regression" in result.stderr


def test_float64_data_and_model_score_in_float64(tmp_path):
    """Targets near 1000 fitted to 1e-2: rounding them to float32 (steps of 6e-5) would move the
    residuals, and so the scores, by about 1e-3."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = mlp(4, [5], 2, "tanh").double()
    with torch.no_grad():
        net.head.bias.fill_(1000.0)
        x = torch.randn(23, 4, generator=g, dtype=torch.float64)
        y = net(x) + 1e-2 * torch.randn(23, 2, generator=g, dtype=torch.float64)
    config = _project(tmp_path, x, y, model=net, factors={"strategy": "identity"})
    for command in ("fit-factors", "compute-scores"):
        result = _invoke(command, config)
        assert result.exit_code == 0, result.stderr
    scores, _ = storage.load_tensors(tmp_path / "out" / storage.SCORES_FILE, storage.SCORES_FORMAT)

    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    model = mlp(4, [5], 2, "tanh").double()
    model.load_state_dict(state)

    def grads(rows):
        out = []
        for i in rows:
            loss = (model(x[i : i + 1]) - y[i : i + 1]).pow(2).sum()
            out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
        return torch.stack(out)

    want = grads(range(20, 23)) @ grads(range(20)).T
    got = scores["scores"].double()
    assert scores["scores"].dtype == torch.float32  # scores.dtype: the storage dtype
    torch.testing.assert_close(got, want.float().double(), rtol=1e-6, atol=0)
    result = _invoke("compute-scores", config, "--self")
    assert result.exit_code == 0, result.stderr
    own, _ = storage.load_tensors(tmp_path / "out" / storage.SELF_INFLUENCE_FILE, storage.SELF_FORMAT)
    assert own["self_influence"].dtype == torch.float64  # self-influence is stored as computed
    g20 = grads(range(20))
    torch.testing.assert_close(own["self_influence"], (g20 * g20).sum(1), rtol=1e-10, atol=0)
    again = _invoke("compute-scores", config, "--self", "--resume", "--json")  # a finished run reports it like a fresh one
    assert again.exit_code == 0 and json.loads(again.stdout)["measurement"] == "loss", again.stderr


def test_query_predictions_are_not_rounded_by_amp(tmp_path):
    g = torch.Generator().manual_seed(0)
    config = _project(tmp_path, torch.randn(20, 4, generator=g), torch.randn(20, 1, generator=g), factors={"amp": "bfloat16"})
    for command in ("fit-factors", "compute-scores"):
        assert _invoke(command, config).exit_code == 0
    scores, _ = storage.load_tensors(tmp_path / "out" / storage.SCORES_FILE, storage.SCORES_FORMAT)
    from safetensors.torch import load_file

    data = load_file(tmp_path / "data.safetensors")
    model = mlp(4, [5], 1, "tanh")
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        want = model(data["inputs"][17:20])
    torch.testing.assert_close(scores["query_predictions"].reshape(want.shape), want, rtol=1e-6, atol=1e-7)


def test_a_one_output_regression_shows_its_prediction_as_a_number_like_its_label(tmp_path):
    g = torch.Generator().manual_seed(0)
    config = _project(tmp_path, torch.randn(20, 4, generator=g), torch.randn(20, generator=g))  # [N] targets, [N, 1] outputs
    for command in ("fit-factors", "compute-scores"):
        assert _invoke(command, config).exit_code == 0
    ranked = json.loads(_invoke("top-k", config, "--query", "0", "--k", "2", "--json").stdout)["queries"][0]
    assert isinstance(ranked["query_label"], float) and isinstance(ranked["query_prediction"], float), ranked
    table = _invoke("top-k", config, "--query", "0", "--k", "2").stdout
    assert "predicted [" not in table and "predicted" in table


def test_regression_labels_and_the_root_layer_show_in_tables(tmp_path):
    g = torch.Generator().manual_seed(0)
    np.random.seed(0)
    save_file({"inputs": torch.randn(12, 4, generator=g), "labels": torch.randn(12, 2, generator=g)}, tmp_path / "d.safetensors")
    (tmp_path / "bare_linear_model.py").write_text("from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n")
    config = {
        "model": {"architecture": "bare_linear_model:make"},
        "task": {"kind": "regression"},
        "data": {"train": {"source": "tensors", "path": "d.safetensors"}, "batch_size": 4},
        "output_dir": "out",
        "device": "cpu",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    path = str(tmp_path / "c.yaml")
    result = _invoke("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert "(model)" in result.stdout
    assert _invoke("fit-factors", path).exit_code == 0
    result = _invoke("spectrum", path, "--top", "2")
    assert result.exit_code == 0, result.stderr
    assert "(model)" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│") and "[" in line]
    assert rows and all(len(cell) < 40 for row in rows for cell in row.split("│")), rows  # labels to 4 digits
    data = json.loads(_invoke("spectrum", path, "--top", "2", "--json", "--overwrite").stdout)
    assert data


def _dense_regression_project(tmp_path, x: torch.Tensor, y: torch.Tensor) -> str:
    """A regression project whose model maps x [16, 4] to targets y [16, 2, 3, 3] (13 train, 3 queries),
    fitted and scored (pairwise and --self) through the CLI; returns its config's path."""
    save_file({"inputs": x, "labels": y}, tmp_path / "d.safetensors")
    (tmp_path / "dense_model.py").write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 18), nn.Unflatten(1, (2, 3, 3)))\n")
    config = {
        "model": {"architecture": "dense_model:make"},
        "task": {"kind": "regression"},
        "data": {
            "train": {"source": "tensors", "path": "d.safetensors", "range": [0, 13]},
            "query": {"source": "tensors", "path": "d.safetensors", "range": [13, 16]},
            "batch_size": 4,
        },
        "factors": {"fisher": "empirical"},
        "output_dir": "out",
        "device": "cpu",
    }
    path = str(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    for command in (["fit-factors"], ["compute-scores"], ["compute-scores", "--self"]):
        result = _invoke(command[0], path, *command[1:])
        assert result.exit_code == 0, result.stderr
    return path


def test_dense_regression_targets_are_summarised_not_repeated(tmp_path):
    """A [C, H, W] target per example (a U-Net's) was printed in full for every ranked example by
    top-k --json and spectrum --json, and as a nest of cut lists in the tables."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, 3, 3, generator=g)
    path = _dense_regression_project(tmp_path, x, y)

    def summary(i: int) -> dict:
        return {"shape": [2, 3, 3], "mean": pytest.approx(float(y[i].double().mean())), "min": float(y[i].min()), "max": float(y[i].max())}

    result = _invoke("top-k", path, "--query", "0", "--k", "3", "--json")
    assert result.exit_code == 0, result.stderr
    ranked = json.loads(result.stdout)["queries"][0]
    assert ranked["query_label"] == summary(13)
    assert ranked["query_prediction"].keys() == {"shape", "mean", "min", "max"} and ranked["query_prediction"]["shape"] == [2, 3, 3]
    entries = ranked["proponents"] + ranked["opponents"]
    assert len(entries) == 6 and all(e["train_label"] == summary(e["train_index"]) for e in entries)
    rows = json.loads(_invoke("top-k", path, "--self", "--k", "3", "--json").stdout)["self_influence"]
    assert len(rows) == 3 and all(r["train_label"] == summary(r["train_index"]) for r in rows)
    table = _invoke("top-k", path, "--query", "0", "--k", "3").stdout
    assert table.count("[2×3×3] mean ") == 8 and "[[" not in table  # the query's label and prediction in the title, 6 rows
    assert f"label [2×3×3] mean {float(y[13].double().mean()):.4g} in [{float(y[13].min()):.4g}, {float(y[13].max()):.4g}]" in table
    rows = json.loads(_invoke("spectrum", path, "--top", "2", "--json").stdout)["top_examples"]["train"]
    assert rows and all(r["label"] == summary(r["global_index"]) for r in rows)
    assert "[2×3×3] mean " in _invoke("spectrum", path, "--top", "2").stdout


def test_dense_integer_regression_targets_are_summarised_like_their_predictions(tmp_path):
    """A regression target of integers (a uint8 target image) was given in full for every ranked example,
    while its prediction beside it was summarised: only a float list counted as a regression target."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 256, (16, 2, 3, 3), generator=g, dtype=torch.uint8)
    path = _dense_regression_project(tmp_path, x, y)

    def summary(i: int) -> dict:
        v = y[i].double()
        return {"shape": [2, 3, 3], "mean": pytest.approx(float(v.mean())), "min": float(v.min()), "max": float(v.max())}

    ranked = json.loads(_invoke("top-k", path, "--query", "0", "--k", "2", "--json").stdout)["queries"][0]
    assert ranked["query_label"] == summary(13) and ranked["query_prediction"]["shape"] == [2, 3, 3]
    assert all(e["train_label"] == summary(e["train_index"]) for e in ranked["proponents"] + ranked["opponents"])
    rows = json.loads(_invoke("top-k", path, "--self", "--k", "2", "--json").stdout)["self_influence"]
    assert rows and all(r["train_label"] == summary(r["train_index"]) for r in rows)
    table = _invoke("top-k", path, "--query", "0", "--k", "2").stdout
    assert table.count("[2×3×3] mean ") == 6 and "[[" not in table
    rows = json.loads(_invoke("spectrum", path, "--top", "2", "--json").stdout)["top_examples"]["train"]
    assert rows and all(r["label"] == summary(r["global_index"]) for r in rows)
    assert "[[" not in _invoke("spectrum", path, "--top", "2").stdout


def test_labels_of_up_to_16_values_and_token_ids_are_given_in_full():
    from influence_cli.cli.render import label_json, label_text

    small = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4).tolist()
    assert label_json(small) == small and label_json(0.5) == 0.5 and label_json(3) == 3 and label_json(None) is None
    assert label_json(list(range(100))) == list(range(100))  # a language model's token ids
    assert label_json(list(range(100)), token_ids=True) == list(range(100)) and label_text(list(range(100)), token_ids=True).startswith("[0, 1, 2")
    assert label_json(list(range(100)), token_ids=False) == {"shape": [100], "mean": 49.5, "min": 0.0, "max": 99.0}  # a regression target
    assert label_json([0.5] * 17) == {"shape": [17], "mean": 0.5, "min": 0.5, "max": 0.5}
    assert label_json([[1.0, float("nan")]] * 9)["mean"] != label_json([[1.0, float("nan")]] * 9)["mean"]  # NaN: null in JSON
    assert label_text([0.25] * 17) == "[17] mean 0.25 in [0.25, 0.25]" and label_text([0.25, 0.5]) == "[0.25, 0.5]"


def test_a_dense_labels_shape_is_spelled_in_image_grids():
    """The image grids' font has no '×': a dense target's caption '[2×3×3] mean ...' was drawn as '[2?3?3] mean ...'."""
    from influence_cli.cli.render import label_text
    from influence_cli.drawing import default_font, drawable

    assert drawable(label_text([0.5] * 18), str.isascii).startswith("[18] mean") and drawable("[2×3×3]", str.isascii) == "[2x3x3]"
    font = default_font(12)
    assert bytes(font.getmask("label [2×3×3]")) == bytes(font.getmask("label [2x3x3]"))


def test_a_dense_label_with_infinities_or_huge_values_is_summarised():
    """+inf and -inf among a dense target's values (or float64 values near the maximum) crashed its
    summary: math.fsum raised ValueError ('-inf + inf in fsum') or OverflowError."""
    from influence_cli.cli.render import label_json, label_text

    both = label_json([float("inf"), float("-inf")] + [0.0] * 15)
    assert math.isnan(both["mean"]) and (both["min"], both["max"]) == (float("-inf"), float("inf"))
    assert label_text([float("inf"), float("-inf")] + [0.0] * 15) == "[17] mean nan in [-inf, inf]"
    assert label_json([float("inf")] + [0.0] * 16)["mean"] == float("inf")
    assert label_json([1e308] * 17)["mean"] == pytest.approx(1e308)


def test_class_labels_stored_as_floats_are_named_as_such():
    x = torch.randn(4, 4)
    with pytest.raises(DataError, match="classification needs integer labels, got torch.float32") as exc:
        _first(nn.Linear(4, 3), x, torch.tensor([0.0, 2.0, 1.0, 1.0]), kind="classification", fisher="empirical")
    assert exc.value.hint == "store the class labels as integers (these are whole numbers stored as floats)"
    with pytest.raises(DataError) as exc:
        _first(nn.Linear(4, 3), x, torch.tensor([0.5, 2.0, 1.0, 1.0]), kind="classification", fisher="empirical")
    assert exc.value.hint == "set task.kind: regression"
    with pytest.raises(DataError) as exc:  # one-hot rows: casting them would not help
        _first(nn.Linear(4, 3), x, torch.eye(3)[[0, 2, 1, 1]], kind="classification", fisher="empirical")
    assert exc.value.hint == "store the class indices, labels.argmax(1), as integers [N] (these are one-hot rows)"


class OneLogit(nn.Module):
    """A binary classifier with one logit per example ([B, 1], or [B] with `squeeze`), as trained with BCE."""

    def __init__(self, squeeze: bool = False, two_class: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.squeeze, self.two_class = squeeze, two_class

    def forward(self, x):
        z = self.fc(x)
        if self.two_class:  # what the hint says to return
            return torch.cat([torch.zeros_like(z), z], dim=1)
        return z.squeeze(-1) if self.squeeze else z


@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_a_one_logit_binary_classifier_is_refused_with_its_two_class_form(fisher):
    """A [B, 1] classifier's softmax is 1, so every loss and gradient is 0: labels all 0 passed silently
    (zero scores), and a label 1 was refused as outside the model's 1 classes with the hint to keep labels
    0..0; a squeezed [B] one was told to set task.kind: regression, which scores the squared error of a logit."""
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    for labels in (torch.zeros(6, dtype=torch.int64), torch.tensor([0, 1, 1, 0, 1, 0])):
        with pytest.raises(DataError, match=r"classification expects two or more logits per example, got outputs \[6, 1\]") as exc:
            _first(OneLogit(), x, labels, kind="classification", fisher=fisher)
        assert "return torch.cat([torch.zeros_like(z), z], dim=1)" in exc.value.hint and "BCE" in exc.value.hint
    with pytest.raises(DataError, match=r"expects model outputs \[batch, classes\], got \[6\]") as exc:
        _first(OneLogit(squeeze=True), x, labels, kind="classification", fisher=fisher)
    assert "return torch.stack([torch.zeros_like(z), z], dim=1)" in exc.value.hint
    model = OneLogit(two_class=True)
    (batch,) = _first(model, x, labels, kind="classification", fisher="empirical")
    z = model.fc(x)[:, 0].detach().requires_grad_(True)  # the two-class cross-entropy's gradient is the BCE's
    (bce,) = torch.autograd.grad(nn.functional.binary_cross_entropy_with_logits(z, labels.float(), reduction="sum"), z)
    torch.testing.assert_close(batch.gradients[0]["fc"].reshape(-1), bce)


def test_created_is_to_the_microsecond_and_never_given_twice(frozen_clock):
    """`created` identifies a factors file (a refit of the same settings is told from the fit before by it): ISO 8601
    to the microsecond with the UTC offset, a microsecond later at each call where the clock has not moved (a coarse
    clock, two calls within a microsecond)."""
    import datetime

    times = [storage.created_now() for _ in range(3)]
    parsed = [datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f%z") for t in times]
    assert parsed == [frozen_clock + datetime.timedelta(microseconds=i) for i in range(3)], times
