"""The examples of the commands' --help run as written (on real MNIST; tests/mnist_files.py says where)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest
import torch
from mnist_files import MNIST_DIR, ROOT, idx_overrides, requires_mnist
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
    its CPU --self example writes what top-k's --self examples rank, by self-influence and by loss, and its --sum-queries
    example writes the one summed row into its own output_dir (an untrained model of configs/mnist.yaml)."""
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
    summed = [  # its own output_dir beside the per-query scores, the factors read from ../runs/mnist (relative to configs/)
        a.replace("=../runs/mnist_summed", f"={tmp_path / 'summed'}").replace("=../runs/mnist", f"={tmp_path}")
        for a in example("compute-scores", "--sum-queries")
    ]
    result = runner.invoke(app, [*summed, *[x for s in sets if not s.startswith("output_dir=") for x in ("--set", s)], "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_query"] == 1 and report["queries_summed"] == 100 and report["n_train"] == 8000, report
    assert report["paths"] == [str(tmp_path / "summed" / "scores.safetensors")] and (tmp_path / "scores.index.json").is_file()


def test_the_spectrum_and_edit_examples_run_and_the_edited_checkpoint_loads(tmp_path, monkeypatch):
    """Every example of spectrum --help and edit --help runs as written (untrained models of configs/mnist.yaml and
    configs/mnist_memorization.yaml, on a few hundred images), and edit's last example fits factors of the edited file."""
    monkeypatch.chdir(ROOT)
    places = {"memorization": "mnist_memorization", "mnist": "mnist"}
    for folder, config in places.items():
        cfg = load_config(ROOT / "configs" / f"{config}.yaml", check_files=False)
        torch.manual_seed(0)
        (tmp_path / folder).mkdir()
        save_tensors(tmp_path / folder / "model.safetensors", build_model(cfg.model, cfg.base_dir).state_dict(), {})
    small = {
        "mnist_memorization": [*idx_overrides("data.train", "spectrum.datasets.train", "spectrum.datasets.heldout"), "data.train.range=[0, 300]",
                               "spectrum.datasets.train.range=[0, 300]", "spectrum.datasets.heldout.range=[9000, 9100]"],
        "mnist": [*idx_overrides("data.train", "data.query"), "data.train.range=[0, 300]"],
    }  # fmt: skip
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})

    def run(args: list[str]) -> dict:
        for folder in (*places, "mnist_edited"):  # ../runs/X/ (relative to configs/) and runs/X/ (to the current folder)
            args = [a.replace(f"../runs/{folder}", str(tmp_path / folder)).replace(f"runs/{folder}", str(tmp_path / folder)) for a in args]
        config = args[1].split("/")[-1].removesuffix(".yaml")
        given = {a.split("=", 1)[0] for a in args if "=" in a}
        sets = [f"model.checkpoint={tmp_path / next(f for f, c in places.items() if c == config) / 'model.safetensors'}",
                f"output_dir={tmp_path / next(f for f, c in places.items() if c == config)}", "device=cpu", *small[config]]  # fmt: skip
        args += [x for s in sets if s.split("=", 1)[0] not in given for x in ("--set", s)]
        result = runner.invoke(app, [*args, *([] if "--json" in args else ["--json"])])
        assert result.exit_code == 0, (args, result.stderr)
        return json.loads(result.stdout)

    examples = {command: help_examples(command) for command in ("spectrum", "edit")}
    assert len(examples["spectrum"]) >= 2 and len(examples["edit"]) >= 2
    for config in ("configs/mnist_memorization.yaml", "configs/mnist.yaml"):
        run(["fit-factors", config])
    for args in examples["spectrum"]:
        assert run(args)["groups"], args
    for args in examples["edit"]:
        report = run(args)
        if args[0] == "edit":
            assert Path(report["path"]).is_file() and report["layers"], args
        else:  # fit-factors of the edited checkpoint
            assert Path(report["path"]).parent == tmp_path / "mnist_edited", report


def test_the_mnist_init_example_writes_a_config_that_runs(tmp_path, monkeypatch):
    """init's MNIST example as written, from a folder beside which ../shared/data/mnist holds the IDX files and
    runs/mnist/model.safetensors an (untrained) model of configs/mnist.yaml: the written config runs its next commands."""
    work = tmp_path / "work"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist").symlink_to(MNIST_DIR)
    (work / "runs" / "mnist").mkdir(parents=True)
    monkeypatch.chdir(work)
    cfg = load_config(ROOT / "configs" / "mnist.yaml", check_files=False)
    torch.manual_seed(0)
    save_tensors(work / "runs" / "mnist" / "model.safetensors", build_model(cfg.model, cfg.base_dir).state_dict(), {})
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    args = example("init", "--example", "mnist")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    written = load_config(work / args[1])
    for key in ("train", "query"):  # configs/mnist.yaml's data, its files named from the written config's folder
        mine, theirs = getattr(written.data, key), getattr(cfg.data, key)
        assert dataclasses.replace(mine, images=None, labels=None) == dataclasses.replace(theirs, images=None, labels=None)
        assert (work / mine.images).resolve() == (MNIST_DIR / "t10k-images-idx3-ubyte.gz").resolve()
    assert written.model == dataclasses.replace(cfg.model, checkpoint="runs/mnist/model.safetensors")
    small = ["--set", "data.train.range=[0, 300]", "--set", "device=cpu"]
    for line in result.stderr.split("next:", 1)[1].strip().splitlines():
        done = runner.invoke(app, [*shlex.split(line, comments=True)[1:], *small, "--json"])
        assert done.exit_code == 0, (line, done.stderr)
    assert len(json.loads(done.stdout)["queries"]) == 3
