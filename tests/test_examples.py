"""docs/examples/causal_lm.py, the worked language-model example, runs as its docstring says; README's examples run as printed."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from influence_cli.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "causal_lm.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def _example():
    spec = importlib.util.spec_from_file_location("causal_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_causal_lm_example_attributes_queries_to_their_own_language(tmp_path):
    """The written folder runs with the docstring's commands; every projection of the attention is
    tracked, and a query's top proponents are sequences of its own language."""
    config = _example().write_example(tmp_path / "lm")
    assert sorted(p.name for p in config.parent.iterdir()) == ["causal_lm.py", "lm.pt", "lm.safetensors", "lm.yaml"]
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    inspect = runner.invoke(app, ["inspect", str(config), "--json"])
    assert inspect.exit_code == 0, inspect.stderr
    tracked = [layer["name"] for layer in json.loads(inspect.stdout)["layers"]]
    assert tracked == [f"blocks.0.{p}" for p in ("q", "k", "v", "out", "up", "down")] + ["head"]
    for command in ("fit-factors", "compute-scores"):
        result = runner.invoke(app, [command, str(config)])
        assert result.exit_code == 0, result.stderr
        assert "warning" not in result.stderr
    result = runner.invoke(app, ["top-k", str(config), "--k", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    language = torch.load(config.parent / "lm.pt")["language"]
    queries = json.loads(result.stdout)["queries"]
    assert len(queries) == 30
    same = [sum(int(language[e["train_index"]] == language[q["query_index"]]) for e in q["proponents"]) / 5 for q in queries]
    assert sum(same) / len(same) >= 0.9, same


OWN_MODEL = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(x.flatten(1)))
"""

OWN_DATA = """
import torch
from torch.utils.data import Dataset


class Images(Dataset):
    def __init__(self, split):
        g = torch.Generator().manual_seed({"train": 0, "test": 1, "val": 2}[split])
        self.y = torch.randint(0, 3, (60,), generator=g)
        self.x = torch.randn(60, 1, 8, 8, generator=g) + self.y[:, None, None, None]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
"""


def test_the_readme_config_of_your_own_model_and_data_runs_as_written(tmp_path):
    """README's "Your own model and data": the YAML as printed, beside a model class, a Dataset class and a
    torch.save'd state dict, runs every command it names; the queries are test examples 0, 17 and 42."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Your own model and data", 1)[1]
    (tmp_path / "influence.yaml").write_text(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    (tmp_path / "my_model.py").write_text(OWN_MODEL)
    (tmp_path / "my_data.py").write_text(OWN_DATA)
    torch.manual_seed(0)
    spec = importlib.util.spec_from_file_location("readme_own_model", tmp_path / "my_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.save(module.Net().state_dict(), tmp_path / "model.pt")
    config = str(tmp_path / "influence.yaml")
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})

    def run(*args: str) -> dict:
        result = runner.invoke(app, [*args[:1], config, *args[1:], "--json"])
        assert result.exit_code == 0, result.stderr
        assert "warning" not in result.stderr, result.stderr
        return json.loads(result.stdout)

    inspect = run("inspect")
    assert [layer["name"] for layer in inspect["layers"]] == ["conv", "fc"] and [m["name"] for m in inspect["untracked"]] == ["bn"]
    run("fit-factors")
    run("compute-scores")
    ranked = run("top-k", "--query", "0:3", "--k", "5")["queries"]
    assert [q["query_index"] for q in ranked] == [0, 17, 42] and all(len(q["proponents"]) == 5 for q in ranked)
    run("compute-scores", "--self")
    assert len(run("top-k", "--self", "--k", "5")["self_influence"]) == 5
    assert run("dataset-similarity")["names"] == ["train", "heldout"]


def test_the_readme_quick_path_runs_as_printed(tmp_path, monkeypatch):
    """README's "Quick path": at most 15 lines, init, fit-factors, compute-scores and top-k, each command as printed
    (from another folder than the repository's, so the config names the bundled sample by its absolute path)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Quick path\n", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 15, section
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["influence", name] for name in ("init", "fit-factors", "compute-scores", "top-k")]
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for command in commands:
        result = runner.invoke(app, command[1:])
        assert result.exit_code == 0, (command, result.stderr)
        assert "warning" not in result.stderr, result.stderr
    assert "proponent" in result.stdout and "opponent" in result.stdout
    ranked = runner.invoke(app, [*commands[-1][1:], "--json"])
    assert [q["query_index"] for q in json.loads(ranked.stdout)["queries"]] == [1500, 1501, 1502]


def test_the_quick_path_config_written_at_the_repository_root_is_ignored_by_git():
    """README's "Quick path" writes its config at the repository root: git leaves it out, as it does runs/."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    section = (root / "README.md").read_text().split("## Quick path\n", 1)[1].split("```bash\n", 1)[1]
    init = next(shlex.split(line, comments=True) for line in section.splitlines() if line.startswith("influence init "))
    for path in (init[2], f"runs/{Path(init[2]).stem}/factors.safetensors"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0, path
