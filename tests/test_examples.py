"""docs/examples/causal_lm.py, the worked language-model example, runs as its docstring says."""

from __future__ import annotations

import importlib.util
import json
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
