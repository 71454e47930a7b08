"""docs/JSON.md lists exactly the top-level keys each command prints with --json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from influence_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def documented() -> dict[str, tuple[set[str], set[str]]]:
    """{command: (keys always printed, optional keys)} from the tables of docs/JSON.md."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    command = None
    for line in (ROOT / "docs" / "JSON.md").read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## `influence ([a-z-]+)`", line)
        if heading:
            command = heading.group(1)
            out[command] = (set(), set())
            continue
        row = re.match(r"\| `([a-z_0-9]+)` \| (.*) \|$", line)
        if command and row:
            out[command][1 if "*optional*" in row.group(2) or "(not with `--self`)" in row.group(2) else 0].add(row.group(1))
    return out


def test_every_command_prints_the_documented_keys(tmp_path, monkeypatch):
    docs = documented()
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    sets = ["--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 200]"]
    runs = {
        "fit-factors": ["fit-factors", DIGITS, *sets],
        "inspect": ["inspect", DIGITS, *sets],
        "compute-scores": ["compute-scores", DIGITS, *sets],
        "top-k": ["top-k", DIGITS, *sets, "--query", "0", "--k", "2", "--image-grid", tmp_path / "grid.png"],
        "dataset-similarity": ["dataset-similarity", DIGITS, *sets, "--heatmap", tmp_path / "heat.png"],
        "spectrum": ["spectrum", DIGITS, *sets, "--top", "2", "--plot", tmp_path / "spectrum.png"],
        "edit": ["edit", DIGITS, *sets, "--out", tmp_path / "edited.safetensors"],
        "info": ["info", tmp_path / "factors.safetensors", "--digest"],
        "init": ["init", tmp_path / "starter.yaml", "--example", "digits"],
    }
    assert set(runs) == set(docs) == {c.name for c in app.registered_commands}
    printed = {}
    for name, args in runs.items():
        result = runner.invoke(app, [str(a) for a in args] + ["--json"])
        assert result.exit_code == 0, (name, result.stderr)
        printed[name] = json.loads(result.stdout)
    result = runner.invoke(app, ["compute-scores", str(DIGITS), *sets, "--self", "--json"])
    assert set(json.loads(result.stdout)) == set(printed["compute-scores"])  # --self prints the same keys
    result = runner.invoke(app, ["top-k", str(DIGITS), *sets, "--self", "--k", "2", "--json"])
    self_top = json.loads(result.stdout)
    noisy = [str(DIGITS), "--set", f"output_dir={tmp_path / 'noisy'}", "--set", "data.train.range=[0, 200]", "--set", "data.train.label_noise=0.1"]
    for args in (["fit-factors", *noisy], ["compute-scores", *noisy, "--self"]):
        assert runner.invoke(app, args).exit_code == 0, args
    noisy_top = json.loads(runner.invoke(app, ["top-k", *noisy, "--self", "--k", "2", "--json"]).stdout)
    loss_top = json.loads(runner.invoke(app, ["top-k", *noisy, "--self", "--rank-by", "loss", "--k", "2", "--json"]).stdout)
    assert set(loss_top) == set(noisy_top) and loss_top["rank_by"] == "loss"  # either ranking prints the same keys
    by_layer = json.loads(runner.invoke(app, ["compute-scores", str(DIGITS), *sets, "--by-layer", "--overwrite", "--json"]).stdout)
    per_token = per_token_scores(runner, tmp_path / "lm", monkeypatch)
    folder_top, folder_self = image_folder_top_k(runner, tmp_path / "folders")
    assert folder_top["classes"] == folder_self["classes"] == ["cat", "dog", "fox"]  # label i is classes[i]
    assert [q["query_label"] for q in folder_top["queries"]] == [0, 1] and folder_top["queries"][1]["query_file"] == "dog/0.png"
    summed = json.loads(runner.invoke(app, ["compute-scores", str(DIGITS), *sets, "--sum-queries", "--overwrite", "--json"]).stdout)
    summed_top = json.loads(runner.invoke(app, ["top-k", str(DIGITS), *sets, "--k", "2", "--json"]).stdout)  # its one row
    assert summed["n_query"] == 1 and [q["query_index"] for q in summed_top["queries"]] == [None]
    seen: dict[str, set[str]] = {}
    for name, data in [
        *printed.items(), ("top-k", self_top), ("top-k", noisy_top), ("compute-scores", by_layer), ("compute-scores", per_token),
        ("top-k", folder_top), ("top-k", folder_self), ("compute-scores", summed), ("top-k", summed_top),
    ]:
        always, optional = docs[name]
        keys = set(data)
        seen.setdefault(name, set()).update(keys)
        if name == "top-k":  # pairwise queries or self-influence
            always = always - {"queries", "self_influence"}
            keys = keys - {"queries", "self_influence"}
        assert always <= keys <= always | optional, (name, sorted(keys - always - optional), sorted(always - keys))
    assert "queries" in printed["top-k"] and "self_influence" in self_top
    assert {"relative", "measurement"} <= set(printed["top-k"]) and not {"relative", "measurement"} & set(self_top)  # not with --self
    for name, (_, optional) in docs.items():  # every optional key is printed in its case
        assert optional <= seen[name], (name, sorted(optional - seen[name]))
    for name, key in (("top-k", "image_grid"), ("dataset-similarity", "heatmap"), ("spectrum", "plot"), ("edit", "path"), ("info", "path")):
        assert Path(printed[name][key]).is_absolute(), (name, key)


def per_token_scores(runner: CliRunner, folder: Path, monkeypatch) -> dict:
    """compute-scores --per-token's JSON, on the tiny language model of tests/test_language_modeling.py."""
    from exact import sequence_project
    from test_language_modeling import LM, LM_MODULE, lm_sequences

    folder.mkdir()
    tokens, labels, _ = lm_sequences(n=24)
    config = sequence_project(folder, monkeypatch, "tinylm_json", LM_MODULE, tokens, labels, "lm.safetensors", task={"kind": LM})
    assert runner.invoke(app, ["fit-factors", config]).exit_code == 0
    return json.loads(runner.invoke(app, ["compute-scores", config, "--per-token", "--json"]).stdout)


def image_folder_top_k(runner: CliRunner, folder: Path) -> tuple[dict, dict]:
    """top-k's JSON, of queries and of self-influence, over class folders (cat, dog, fox) of 8x8 grayscale images that the
    digits MLP reads flattened."""
    from PIL import Image

    for c, name in enumerate(["cat", "dog", "fox"]):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 60 * c + 20 * i).save(folder / name / f"{i}.png")
    spec = f"{{source: image_folder, root: {folder}, transform: {{flatten: true, scale: 255.0}}}}"
    args = [str(DIGITS), "--set", f"output_dir={folder.parent / 'folder_runs'}", "--set", f"data.train={spec}", "--set", f"data.query={spec}", "--set", "data.query.indices=[0, 3]"]
    for command in (["fit-factors", *args], ["compute-scores", *args], ["compute-scores", *args, "--self"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.stderr)
    outputs = [runner.invoke(app, ["top-k", *args, *flags, "--k", "2", "--json"]) for flags in (["--query", "0:2"], ["--self"])]
    return json.loads(outputs[0].stdout), json.loads(outputs[1].stdout)


def row_names(command: str, key: str) -> set[str]:
    """The `names` a row of docs/JSON.md's table of `command` mentions (`key`'s row)."""
    text = (ROOT / "docs" / "JSON.md").read_text(encoding="utf-8").split(f"## `influence {command}`", 1)[1]
    row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
    return set(re.findall(r"`([a-z_0-9]+)`", row))


def test_the_rows_of_rankings_and_their_per_layer_parts_are_documented(tmp_path):
    """Each query's keys and each ranked example's, with the per-layer parts (compute-scores --by-layer)."""
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    sets = [str(DIGITS), "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 200]"]
    assert runner.invoke(app, ["fit-factors", *sets]).exit_code == 0
    result = runner.invoke(app, ["compute-scores", *sets, "--by-layer", "--json"])
    always, optional = documented()["compute-scores"]
    assert "by_layer" in json.loads(result.stdout) and set(json.loads(result.stdout)) <= always | optional
    queries = json.loads(runner.invoke(app, ["top-k", *sets, "--query", "0", "--k", "2", "--json"]).stdout)["queries"]
    names = row_names("top-k", "queries")
    assert set(queries[0]) <= names
    entries = queries[0]["proponents"] + queries[0]["opponents"]
    assert all("by_layer" in e and set(e) <= names for e in entries)
    assert runner.invoke(app, ["compute-scores", *sets, "--self", "--by-layer"]).exit_code == 0
    for ranking in ("self-influence", "loss"):
        rows = json.loads(runner.invoke(app, ["top-k", *sets, "--self", "--rank-by", ranking, "--k", "2", "--json"]).stdout)["self_influence"]
        assert all({"by_layer", "loss"} <= set(r) <= names | row_names("top-k", "self_influence") for r in rows)


def test_nothing_but_json_on_stdout_with_a_warning_and_nothing_at_all_with_an_error(tmp_path):
    """A warning goes to stderr beside the JSON; an error leaves stdout empty and exits with its code."""
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    sets = [str(DIGITS), "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 200]"]
    assert runner.invoke(app, ["fit-factors", *sets]).exit_code == 0
    result = runner.invoke(app, ["edit", *sets, "--out", str(tmp_path / "e.safetensors"), "--rho", "0.6", "--json"])
    assert result.exit_code == 0 and "warning: edit" in result.stderr, result.stderr
    assert json.loads(result.stdout)["rho"] == 0.6
    for args, code in (
        (["fit-factors", *sets], 5),  # the factors exist
        (["top-k", *sets, "--query", "0"], 5),  # no scores yet
        (["fit-factors", *sets, "--set", "factors.strategy=bogus"], 2),
        (["top-k", *sets, "--bogus"], 2),  # Click's own usage error
    ):
        result = runner.invoke(app, [*args, "--json"])
        assert (result.exit_code, result.stdout) == (code, ""), (args, result.exit_code, result.stdout)
        assert result.stderr.strip(), args
