"""The examples of the commands' --help run as written (on real MNIST; tests/mnist_files.py says where)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from mnist_files import ROOT, idx_overrides, requires_mnist
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.models import build_model
from influence_cli.storage import save_tensors

pytestmark = [requires_mnist, pytest.mark.usefixtures("one_thread")]


def help_examples(command: str) -> list[list[str]]:
    """The `influence ...` lines under Examples in `command --help`, as argument lists without `influence`."""
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout.split("Examples", 1)[1]
    return [shlex.split(line.strip(), comments=True)[1:] for line in text.splitlines() if line.strip().startswith("influence ")]


def example(command: str, *needles: str) -> list[str]:
    """The one example of `command --help` holding every needle."""
    found = [args for args in help_examples(command) if all(n in args for n in needles)]
    assert len(found) == 1, (command, needles, help_examples(command))
    return found[0]


def test_the_sharded_scores_and_self_influence_examples_give_the_files_info_and_top_k_read(tmp_path, monkeypatch):
    """compute-scores' budget example writes shards (info's scores.index.json example reads them), and
    its CPU --self example writes what top-k's --self examples rank, by self-influence and by loss (an untrained model of configs/mnist.yaml)."""
    monkeypatch.chdir(ROOT)  # the examples' paths are relative to the repository root
    cfg = load_config(ROOT / "configs" / "mnist.yaml", check_files=False)
    torch.manual_seed(0)
    save_tensors(tmp_path / "model.safetensors", build_model(cfg.model, cfg.base_dir).state_dict(), {})
    sets = [
        f"model.checkpoint={tmp_path / 'model.safetensors'}", f"output_dir={tmp_path}", "device=cpu",
        *idx_overrides("data.train", "data.query"),
    ]
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})

    def run(args: list[str]) -> str:
        args = [a.replace("runs/mnist/", f"{tmp_path}/") for a in args]
        if args[0] != "info":
            args += [x for s in sets for x in ("--set", s)]
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, (args, result.stderr)
        return result.stdout

    assert run(["fit-factors", "configs/mnist.yaml"])
    report = json.loads(run(example("compute-scores", "--relative")))
    assert report["sharded"] and report["num_shards"] >= 2, report
    info = json.loads(run(example("info", "runs/mnist/scores.index.json")))
    assert info["path"] == str(tmp_path / "scores.index.json")
    assert json.loads(run(example("compute-scores", "--self")))["kind"] == "self"
    ranked = json.loads(run(example("top-k", "--self", "--json")))
    assert len(ranked["self_influence"]) == 20
    by_loss = json.loads(run(example("top-k", "--rank-by", "loss")))
    assert by_loss["rank_by"] == "loss" and len(by_loss["self_influence"]) == 20
    losses = [row["loss"] for row in by_loss["self_influence"]]
    assert losses == sorted(losses, reverse=True)
