"""docs/FROM_KRONFLUENCE.md names only what exists: its YAML loads with the strict loader and is the
MNIST run of configs/mnist.yaml, every config key and flag it names is one of this tool's (each flag it gives a
command one of that command's, each keyword of a Python call one of that function's), and (where kronfluence
can be imported) every Kronfluence argument its tables name is one of Kronfluence's."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import typer

import influence_cli
from influence_cli.cli import app
from influence_cli.config import field_docs, load_config

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "FROM_KRONFLUENCE.md").read_text(encoding="utf-8")
FLAG = r"(?<![\w-])(--[a-z][a-z-]*)"


def _blocks(language: str) -> list[str]:
    return [b.split("```", 1)[0] for b in DOC.split(f"```{language}\n")[1:]]


@functools.cache
def _commands() -> dict:
    """{name: click command} of every command of the CLI."""
    return typer.main.get_command(app).commands


def _command_lines() -> list[tuple[str, str]]:
    """(command, what follows it) for each code span, and each line of a bash block, that starts with a command."""
    spans = re.findall(r"`([^`\n]+)`", DOC) + [line for b in _blocks("bash") for line in b.splitlines()]
    command = re.compile(rf"(?:influence )?({'|'.join(map(re.escape, _commands()))})(?:\s(.*))?$")
    found = [command.match(span.split("#")[0].strip()) for span in spans]
    return [(m[1], m[2] or "") for m in found if m]


def _section(title: str) -> str:
    return DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_yaml_loads_strictly_and_is_the_mnist_run_of_configs(tmp_path):
    """The one YAML block, beside its own files, holds configs/mnist.yaml's settings, its paths and device aside."""
    (block,) = _blocks("yaml")
    (tmp_path / "influence.yaml").write_text(block, encoding="utf-8")
    doc = load_config(tmp_path / "influence.yaml", check_files=False)
    mnist = load_config(ROOT / "configs" / "mnist.yaml", check_files=False)
    assert doc.model.checkpoint == "model.pt" and doc.data.train.images == "mnist/t10k-images-idx3-ubyte.gz" and doc.device == "cpu"
    paths = {"images": None, "labels": None}
    for part in ("train", "query"):
        assert dataclasses.replace(getattr(doc.data, part), **paths) == dataclasses.replace(getattr(mnist.data, part), **paths), part
    assert (doc.model.architecture, doc.model.kwargs) == (mnist.model.architecture, mnist.model.kwargs)
    assert (doc.task, doc.factors, doc.scores, doc.seed) == (mnist.task, mnist.factors, mnist.scores, mnist.seed)
    assert (doc.data.batch_size, doc.data.num_workers, doc.data.padding_value) == (mnist.data.batch_size, mnist.data.num_workers, mnist.data.padding_value)


def test_every_config_key_flag_command_and_python_name_it_names_exists():
    assert len(_blocks("python")) == 2
    for block in _blocks("python"):  # Kronfluence's script and this tool's Python: both parse
        ast.parse(block)
    keys = {k for k, *_ in field_docs()}
    tokens = re.findall(r"`((?:model|task|data|factors|scores|similarity|spectrum)\.[a-z_]+(?:\.[a-z_]+)*)", DOC)
    named = {t for t in tokens if not t.endswith((".safetensors", ".json", ".pt"))}  # file names: factors.safetensors, model.pt
    assert {"factors.max_examples", "scores.damping_factor", "data.padding_value"} <= named
    assert sorted(named - keys) == []
    options = {name: {o for p in c.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} for name, c in _commands().items()}
    flags = set(re.findall(FLAG, DOC))
    assert {"--self", "--by-layer", "--overwrite", "--resume"} <= flags
    assert sorted(flags - set().union(*options.values())) == []  # whole names: `--resum` is not `--resume`
    for command, rest in _command_lines():  # and each one where the text gives it to a command is that command's
        assert sorted(f for f in re.findall(FLAG, rest) if f not in options[command]) == [], command
    used = set(re.findall(r"(?:^|`)influence ([a-z-]+)", DOC, flags=re.MULTILINE))
    assert "fit-factors" in used and sorted(used - set(_commands())) == []
    assert {"top-k", "compute-scores", "fit-factors"} <= {c for c, _ in _command_lines()}
    imported = {n.strip() for line in re.findall(r"^from influence_cli import ([\w, ]+)$", DOC, flags=re.MULTILINE) for n in line.split(",")}
    rows = [line.split(" | ") for line in _section("`Analyzer` → commands and the Python API").splitlines() if line.startswith("| `")]
    python = {n for row in rows for n in re.findall(r"`([a-z_]+)[(`]", row[2])}
    assert {"load_scores_meta", "load_self_influence"} <= imported | python
    assert sorted(n for n in imported | python if not hasattr(influence_cli, n)) == []
    signatures = {n: inspect.signature(getattr(influence_cli, n)).parameters for n in imported | python}
    calls = [(n, args) for row in rows for n, args in re.findall(r"`([a-z_]+)\(([^)`]*)\)", row[2])]
    keywords = {(n, k) for n, args in calls for k in re.findall(r"(\w+)=", args)}
    assert ("compute_scores", "self_influence") in keywords
    assert sorted((n, k) for n, k in keywords if k not in signatures[n]) == []
    bare = {k for row in rows for k in re.findall(r"`(\w+)=[^`(]*`", row[2])}  # `overwrite=True`: a keyword of the calls above
    assert "overwrite" in bare and sorted(k for k in bare if not any(k in p for p in signatures.values())) == []


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="kronfluence is not installed (`make bench-install`)")
def test_every_kronfluence_argument_in_the_tables_is_one_of_kronfluence():
    from kronfluence.analyzer import Analyzer
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    for title, names in (
        ("`FactorArguments` → the factors block", {f.name for f in dataclasses.fields(FactorArguments)}),
        ("`ScoreArguments` → the scores keys and flags", {f.name for f in dataclasses.fields(ScoreArguments)}),
        ("`Task` → the task block, measurement, layers, padding", {n for n in dir(Task) if not n.startswith("_")} | {"sample"}),
    ):
        rows = [line.split(" | ")[0] for line in _section(title).splitlines() if line.startswith("| `")]
        named = {n for row in rows for n in re.findall(r"`([a-z_]+)", row)}
        assert named and sorted(named - names - {"prepare_model", "use_empirical_fisher"}) == [], title
    rows = [line.split(" | ")[0] for line in _section("`Analyzer` → commands and the Python API").splitlines() if line.startswith("| `")]
    methods = {n for row in rows for n in re.findall(r"`([a-z_]+)\(", row) + re.findall(r"`([a-z_]+)`", row)}
    public = [getattr(Analyzer, m) for m in dir(Analyzer) if not m.startswith("_") or m == "__init__"]
    parameters = {q for f in public if inspect.isfunction(f) for q in inspect.signature(f).parameters}
    assert {"query_indices", "factors_name"} <= methods
    assert sorted(n for n in methods if not hasattr(Analyzer, n) and n not in parameters) == []
    classes = {"Analyzer": Analyzer, "DataLoaderKwargs": DataLoaderKwargs}
    built = re.findall(r"`([A-Z]\w*)\(([^)`]*)\)", " ".join(rows))  # `Analyzer(analysis_name, ..., cpu=...)`
    assert {c for c, _ in built} == set(classes)
    for cls, args in built:
        named = re.findall(r"(\w+)=", args) + [a.strip() for a in args.split(",") if a.strip().isidentifier()]
        assert sorted(set(named) - set(inspect.signature(classes[cls]).parameters)) == [], cls
