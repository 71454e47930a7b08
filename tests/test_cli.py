"""CLI tests through typer's CliRunner: help, outputs, and one clear line per bad input.

The runner pins the terminal width (COLUMNS=120) and keeps stdout and stderr apart
(this typer's CliRunner always separates them), so each test can check that results
go to stdout and everything else to stderr.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from safetensors.torch import save_file
from stopping import assert_same_tensors, never_open_fifos
from typer.testing import CliRunner, Result

from influence_cli import __version__, storage
from influence_cli.cli import app
from influence_cli.cli.render import err_console
from influence_cli.errors import DataError, OutputError
from influence_cli.models import mlp
from influence_cli.storage import load_tensors

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
DIGITS_CNN = ROOT / "configs" / "digits_cnn.yaml"
FACTORS = "factors.safetensors"
EXIT = {"config": 2, "data": 3, "model": 4, "output": 5, "numerical": 6}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None})


def invoke(runner: CliRunner, *args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result: Result, code: int, *needles: str) -> str:
    """A typed error: the exit code, one message line (+ one hint line) on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, result.stderr  # no blank line either: a failed pass's progress bar leaves nothing
    assert lines[0].split(":", 1)[0] in ("config error", "usage error", "data error", "model error", "output error", "numerical error")
    if len(lines) == 2:
        assert lines[1].startswith("hint: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def fitted(runner: CliRunner, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """configs/digits.yaml fitted once into a temporary output_dir."""
    out = tmp_path_factory.mktemp("digits")
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={out}")
    return out, result


# ----------------------------------------------------------------------------- help and version


def test_root_help_states_the_sign_convention_and_the_flow(runner: CliRunner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Sign convention: a positive score means up-weighting the training example lowers the query's loss" in text
    assert "proponent" in text and "opponent" in text
    assert "influence fit-factors CONFIG" in text and "influence init FILE --example digits" in text
    for command in ("init", "fit-factors", "inspect", "info"):
        assert command in text
    assert "--debug" in text and "--version" in text


@pytest.mark.parametrize(
    "command, example",
    [
        ("fit-factors", "influence fit-factors configs/digits.yaml"),
        ("inspect", "influence inspect configs/digits.yaml"),
        ("info", "influence info runs/digits/factors.safetensors"),
        ("init", "influence init my_config.yaml --example digits"),
    ],
)
def test_command_help_has_examples(runner: CliRunner, command: str, example: str):
    result = invoke(runner, command, "--help")
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "Examples" in text and example in text
    assert "--json" in text
    if command not in ("info", "init"):  # commands that read a config
        assert "--set" in text and "docs/CONFIG.md" in text


def test_no_help_shows_a_type_on_flags(runner: CliRunner):
    from influence_cli.cli import app

    for command in [[], *[[c.name] for c in app.registered_commands]]:
        result = invoke(runner, *command, "--help")
        assert result.exit_code == 0, command
        assert "<bool>" not in result.stdout, command


def test_fit_factors_help_shows_the_torchrun_example(runner: CliRunner):
    text = " ".join(invoke(runner, "fit-factors", "--help").stdout.split())
    assert "torchrun --nproc_per_node=4 -m influence_cli fit-factors" in text
    assert "--overwrite" in text and "--resume" in text


def test_version(runner: CliRunner):
    result = invoke(runner, "--version")
    assert result.exit_code == 0
    assert result.stdout == f"influence_cli {__version__}\n"


def test_unknown_command_is_a_usage_error(runner: CliRunner):
    result = invoke(runner, "fit-factor", DIGITS)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "fit-factor" in result.stderr


# ----------------------------------------------------------------------------- fit-factors


def test_fit_factors_writes_factors_and_prints_a_summary(fitted: tuple[Path, Result]):
    out, result = fitted
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (out / FACTORS).is_file()
    assert sorted(p.name for p in out.iterdir()) == [FACTORS]  # no temporary or progress files left
    text = result.stdout
    assert "ekfac factors (sampled Fisher)" in " ".join(text.split())
    for layer in ("fc1", "fc2", "head"):
        assert layer in text
    assert "65²" in text and "64×65" in text  # fc1: A over 64 inputs + bias, Λ over [64, 65]
    assert "saved" in result.stderr and str(out / FACTORS) in " ".join(result.stderr.split())
    assert "saved" not in text
    assert "warning" not in result.stderr  # the digits' pixels, 0 to 16, include rare ones: no column-scale warning


def test_fit_factors_refuses_to_overwrite(runner: CliRunner, fitted: tuple[Path, Result]):
    out, _ = fitted
    before = (out / FACTORS).read_bytes()
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={out}")
    line = assert_clean_error(result, EXIT["output"], "already holds factors", str(out / FACTORS))
    assert "--overwrite" in result.stderr.split(line, 1)[1]
    assert (out / FACTORS).read_bytes() == before


def test_a_damaged_factors_file_is_not_called_a_finished_run(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """A factors file cut short from outside (or another program's file that does not read) is refused as what it is,
    with or without --resume; as it may be another program's, the hint names another place before --overwrite, in the
    words of another program's file."""
    out, _ = fitted
    damaged = tmp_path / FACTORS
    damaged.write_bytes((out / FACTORS).read_bytes()[:100])
    for resume in ((), ("--resume",)):
        result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", *resume)
        line = assert_clean_error(result, EXIT["output"], str(damaged), "already exists and is not a readable safetensors file (damaged, or not written by influence_cli)")
        assert "finished run" not in line
        assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or pass --overwrite to replace that file"
    assert damaged.read_bytes() == (out / FACTORS).read_bytes()[:100]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (("compute-scores",), "scores.safetensors"),
        (("compute-scores", "--self"), "self_influence.safetensors"),
        (("dataset-similarity",), "similarity.safetensors"),
        (("spectrum",), "spectrum.safetensors"),
    ],
)
def test_a_damaged_output_is_refused_as_that_and_overwrite_replaces_it(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path,
                                                                        command: tuple[str, ...], name: str):  # fmt: skip
    """compute-scores (pairwise or --self), dataset-similarity and spectrum, with or without --resume, refuse a damaged
    file at their output as what it is, before reading it as their output, naming another place before --overwrite;
    --overwrite replaces it."""
    out, _ = fitted
    damaged = tmp_path / name
    damaged.write_bytes((out / FACTORS).read_bytes()[:100])
    args = (command[0], DIGITS, *command[1:], "--set", f"factors_dir={out}", "--set", f"output_dir={tmp_path}")
    for resume in ((), ("--resume",)):
        result = invoke(runner, *args, *resume)
        line = assert_clean_error(result, EXIT["output"], f"{str(damaged)!r} already exists and is not a readable safetensors file (damaged")
        assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or pass --overwrite to replace that file"
    assert damaged.read_bytes() == (out / FACTORS).read_bytes()[:100]
    result = invoke(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert storage.file_format(damaged).startswith("influence_cli.")


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (("fit-factors",), FACTORS),
        (("compute-scores",), "scores.safetensors"),
        (("compute-scores",), "scores.index.json"),
        (("compute-scores", "--self"), "self_influence.safetensors"),
        (("dataset-similarity",), "similarity.safetensors"),
        (("spectrum",), "spectrum.safetensors"),
    ],
)
def test_what_is_no_regular_file_at_an_output_is_refused_as_that(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], name: str):  # fmt: skip
    """A FIFO at an output is never opened (it would block the command: dataset-similarity and spectrum read their
    output without any flag, every command with --resume), and is refused as what it is unless --overwrite replaces
    it; a folder there is refused as a folder even with --overwrite (no IsADirectoryError from removing it), and kept."""
    out, _ = fitted
    shared = () if command[0] == "fit-factors" else ("--set", f"factors_dir={out}")
    args = (command[0], DIGITS, *command[1:], *shared, "--set", f"output_dir={tmp_path}")
    fifo = tmp_path / name
    os.mkfifo(fifo)
    never_open_fifos(monkeypatch)
    for resume in ((), ("--resume",)):
        result = invoke(runner, *args, *resume)
        line = assert_clean_error(result, EXIT["output"], f"{str(fifo)!r} already exists and is not a regular file (a FIFO, socket or device)")
        assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or pass --overwrite to replace it"
    assert fifo.is_fifo()
    result = invoke(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    monkeypatch.undo()
    assert not fifo.exists() if name.endswith(".json") else storage.file_format(fifo).startswith("influence_cli.")  # unsharded: no index
    for made in (fifo, *tmp_path.glob("*.safetensors")):  # what --overwrite wrote
        made.unlink(missing_ok=True)
    (tmp_path / name / "kept").mkdir(parents=True)
    for flags in ((), ("--resume",), ("--overwrite",)):
        result = invoke(runner, *args, *flags)
        line = assert_clean_error(result, EXIT["output"], f"{str(tmp_path / name)!r} is a folder, not a file")
        assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or move that folder away"
    assert (tmp_path / name / "kept").is_dir()


def test_edit_never_opens_a_fifo_at_out(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A FIFO given as edit --out blocked the command in the check that --out is no other command's output; it is
    refused as what it is, and --overwrite replaces it."""
    out, _ = fitted
    fifo = tmp_path / "edited.safetensors"
    os.mkfifo(fifo)
    never_open_fifos(monkeypatch)
    args = ("edit", DIGITS, "--set", f"output_dir={out}", "--out", fifo, "--keep-share", "0.5")
    result = invoke(runner, *args)
    line = assert_clean_error(result, EXIT["output"], f"{str(fifo)!r} already exists and is not a regular file (a FIFO, socket or device)")
    assert result.stderr.split(line, 1)[1].strip() == "hint: give --out another path, or pass --overwrite to replace it"
    assert fifo.is_fifo()
    result = invoke(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    monkeypatch.undo()
    assert storage.file_format(fifo) == storage.EDITED_CHECKPOINT_FORMAT


def test_another_programs_safetensors_file_is_not_called_a_finished_run(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """A valid safetensors file that influence_cli did not write (no format, or its own: Hugging Face's "pt") in the way of
    fit-factors, compute-scores or edit --out is refused as another program's, naming a place of its own first; replacing
    it takes --overwrite. A .pt file at --out records nothing of what wrote it, and is said to."""
    out, _ = fitted
    mine = tmp_path / "mine"
    mine.mkdir()
    checkpoint = {"weight": torch.arange(6.0).reshape(2, 3)}
    save_file(checkpoint, str(mine / FACTORS))  # no metadata at all
    before = (mine / FACTORS).read_bytes()
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={mine}")
    line = assert_clean_error(result, EXIT["output"], str(mine / FACTORS), "already exists and was not written by influence_cli")
    assert "finished run" not in line
    assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or pass --overwrite to replace that file"
    assert (mine / FACTORS).read_bytes() == before
    save_file(checkpoint, str(mine / "scores.safetensors"), metadata={"format": "pt"})  # as Hugging Face writes its checkpoints
    result = invoke(runner, "compute-scores", DIGITS, "--set", f"factors_dir={out}", "--set", f"output_dir={mine}")
    line = assert_clean_error(result, EXIT["output"], "already exists and was not written by influence_cli (a safetensors file of another program, format pt)")
    assert "set output_dir to another place, or pass --overwrite" in result.stderr.split(line, 1)[1]
    hf = tmp_path / "model.safetensors"
    save_file(checkpoint, str(hf), metadata={"format": "pt"})
    result = invoke(runner, "edit", DIGITS, "--set", f"output_dir={out}", "--out", hf)
    line = assert_clean_error(result, EXIT["output"], str(hf), "was not written by influence_cli")
    assert "hint: give --out another path, or pass --overwrite to replace that file" in result.stderr.split(line, 1)[1]
    assert load_tensors(hf)[0]["weight"].equal(checkpoint["weight"])
    pt = tmp_path / "model.pt"
    torch.save(checkpoint, pt)
    result = invoke(runner, "edit", DIGITS, "--set", f"output_dir={out}", "--out", pt)
    line = assert_clean_error(result, EXIT["output"], f"{str(pt)!r} already exists (a .pt file records nothing of what wrote it")
    assert "finished run" not in line and "give --out another path, or pass --overwrite" in result.stderr
    result = invoke(runner, "edit", DIGITS, "--set", f"output_dir={out}", "--out", hf, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert storage.file_format(hf) == storage.EDITED_CHECKPOINT_FORMAT
    result = invoke(runner, "edit", DIGITS, "--set", f"output_dir={out}", "--out", hf)  # its own output now
    assert_clean_error(result, EXIT["output"], str(hf), "already holds a checkpoint from a finished run")


def test_an_output_of_another_version_is_said_to_be(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """Factors in the way that another version of influence_cli wrote (its tool_version, or a format this one does not
    write) are refused as that: a finished run's output, of that version, with the --overwrite hint."""
    out, _ = fitted
    tensors, meta = load_tensors(out / FACTORS)
    for changed, needle in (
        ({"tool_version": "0.1.0"}, f"already holds factors written by influence_cli 0.1.0 (this is {__version__})"),
        ({storage.FORMAT_KEY: "influence_cli.factors/9"}, "already holds factors in format influence_cli.factors/9, written by another version of influence_cli"),
    ):
        storage.save_tensors(tmp_path / FACTORS, tensors, meta | changed)
        result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}")
        line = assert_clean_error(result, EXIT["output"], str(tmp_path / FACTORS), needle)
        assert result.stderr.split(line, 1)[1].strip() == "hint: pass --overwrite to replace it"
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={out}")  # this version's own
    line = assert_clean_error(result, EXIT["output"], f"{str(out / FACTORS)!r} already holds factors from a finished run")
    assert line.endswith("from a finished run")


def test_an_output_of_another_kind_is_said_to_be(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """An output of this version of influence_cli but of another kind in an output's place (scores renamed to
    factors.safetensors, a similarity result where spectrum writes) is refused as what it holds, the kind its format
    names, with or without --resume, its hint naming output_dir as the place to change first, as for another
    program's file, and left as it is."""
    out, _ = fitted
    for command in ("compute-scores", "dataset-similarity"):
        made = invoke(runner, command, DIGITS, "--set", f"factors_dir={out}", "--set", f"output_dir={tmp_path}")
        assert made.exit_code == 0, made.stderr
    (tmp_path / "scores.safetensors").rename(tmp_path / FACTORS)
    (tmp_path / "similarity.safetensors").rename(tmp_path / "spectrum.safetensors")
    before = {name: (tmp_path / name).read_bytes() for name in (FACTORS, "spectrum.safetensors")}
    for args, name, needle in (
        (("fit-factors",), FACTORS, f"already holds scores (format {storage.SCORES_FORMAT}), not factors"),
        (("spectrum", "--set", f"factors_dir={out}"), "spectrum.safetensors",
         f"already holds a similarity result (format {storage.SIMILARITY_FORMAT}), not a spectrum result"),
    ):  # fmt: skip
        for resume in ((), ("--resume",)):
            result = invoke(runner, args[0], DIGITS, *args[1:], *resume, "--set", f"output_dir={tmp_path}")
            line = assert_clean_error(result, EXIT["output"], f"{str(tmp_path / name)!r} {needle}")
            assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or pass --overwrite to replace that file"
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (("compute-scores", "--resume"), "scores.safetensors"),
        (("compute-scores", "--self"), "self_influence.safetensors"),
        (("compute-scores", "--self", "--resume"), "self_influence.safetensors"),
        (("dataset-similarity",), "similarity.safetensors"),
        (("spectrum", "--resume"), "spectrum.safetensors"),
    ],
)
def test_every_output_refuses_another_programs_file_by_its_key(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, args: tuple[str, ...], name: str):
    """Another program's safetensors file at compute-scores' (--self, --resume), dataset-similarity's or spectrum's output is
    refused as that, naming output_dir as the place to change, and left as it is."""
    out, _ = fitted
    save_file({"weight": torch.zeros(2)}, str(tmp_path / name), metadata={"format": "pt"})
    before = (tmp_path / name).read_bytes()
    result = invoke(runner, args[0], DIGITS, *args[1:], "--set", f"factors_dir={out}", "--set", f"output_dir={tmp_path}")
    line = assert_clean_error(result, EXIT["output"], str(tmp_path / name), "already exists and was not written by influence_cli (a safetensors file of another program, format pt)")
    assert result.stderr.split(line, 1)[1].strip() == "hint: set output_dir to another place, or pass --overwrite to replace that file"
    assert (tmp_path / name).read_bytes() == before


def test_resume_on_another_programs_file_is_refused_as_that(runner: CliRunner, tmp_path: Path):
    """--resume over another program's safetensors file says what it is, not "a finished run with other settings"."""
    save_file({"weight": torch.zeros(2)}, str(tmp_path / FACTORS), metadata={"format": "pt"})
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--resume")
    line = assert_clean_error(result, EXIT["output"], str(tmp_path / FACTORS), "was not written by influence_cli")
    assert "finished run" not in line and "pass --overwrite" in result.stderr.split(line, 1)[1]


def test_an_output_that_does_not_open_is_not_read_to_be_called_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Only a regular, readable .safetensors file that safetensors can open is read to tell a damaged one: a non-UTF-8
    path where there is no /proc/self/fd to open it through and a file without read permission fail to open whatever
    they hold, and a FIFO would block the command (it is refused as what it is, with --resume too, whose callers would
    read it next)."""
    good = tmp_path / "f.safetensors"
    storage.save_tensors(good, {"x": torch.zeros(1)}, {storage.FORMAT_KEY: storage.FACTORS_FORMAT})
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff.safetensors"))
    odd.write_bytes(good.read_bytes()[:10])
    with pytest.raises(OutputError, match="already exists and is not a readable safetensors file"):  # read: /proc/self/fd
        storage.check_can_write(odd, False, "factors")
    monkeypatch.setattr(storage, "_descriptor_names", lambda: False)
    with pytest.raises(OutputError, match="already holds factors from a finished run\nhint") as exc:
        storage.check_can_write(odd, False, "factors")
    assert exc.value.hint == "pass --overwrite to replace it"
    monkeypatch.undo()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:10])
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)  # as a user without read permission (tests run as root)
    with pytest.raises(OutputError, match="already holds factors from a finished run\nhint"):
        storage.check_can_write(cut, False, "factors")
    monkeypatch.undo()
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(storage, "read_metadata", lambda *a, **kw: pytest.fail("a FIFO was opened"))
    for resume in (False, True):
        with pytest.raises(OutputError, match="already exists and is not a regular file \\(a FIFO, socket or device\\)\nhint") as exc:
            storage.check_can_write(fifo, False, "factors", "output_dir", storage.FACTORS_FORMAT, resume=resume)
        assert exc.value.hint == "set output_dir to another place, or pass --overwrite to replace it"
    storage.check_can_write(fifo, True, "factors")  # replaced


def test_fit_factors_json_and_overwrite(runner: CliRunner, tmp_path: Path):
    out = tmp_path
    first = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={out}", "--set", "data.train.range=[0, 100]", "--json")
    assert first.exit_code == 0 and json.loads(first.stdout)["strategy"] == "ekfac"
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={out}", "--overwrite", "--json",
                    "--set", "factors.strategy=kfac", "--set", "data.train.range=[0, 300]")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["path"] == str(out / FACTORS)
    assert data["strategy"] == "kfac" and data["fisher"] == "sampled" and data["num_examples"] == 300
    assert [layer["name"] for layer in data["layers"]] == ["fc1", "fc2", "head"]
    assert data["layers"][0]["weight_shape"] == [64, 64]
    assert "covariance" in data["seconds"]
    assert "━" not in result.stderr  # no progress bars with --json
    # the overwrite really replaced the file
    info = json.loads(invoke(runner, "info", out / FACTORS, "--json").stdout)
    assert info["metadata"]["strategy"] == "kfac" and info["metadata"]["num_examples"] == 300


def test_identity_says_there_is_nothing_to_fit(runner: CliRunner, tmp_path: Path):
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--set", "factors.strategy=identity")
    assert result.exit_code == 0, result.stderr
    assert "identity: no curvature to fit" in result.stdout and "Fisher" not in result.stdout


def test_fit_factors_counts_inputs_and_units_that_are_always_zero(runner: CliRunner, tmp_path: Path):
    """Blank pixels are always-0 inputs of fc1; a dead unit of one layer is an always-0 input of the next."""
    from safetensors.torch import load_file

    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--json")
    assert result.exit_code == 0, result.stderr
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    pixels = load_file(ROOT / "sample_data" / "digits.safetensors")["inputs"][:1500].reshape(1500, -1)
    assert layers["fc1"]["zero_inputs"] == int((pixels.abs().amax(0) == 0).sum()) > 0
    assert layers["fc1"]["zero_outputs"] == layers["fc2"]["zero_inputs"] > 0
    assert layers["fc2"]["zero_outputs"] == layers["head"]["zero_inputs"]
    assert layers["head"]["zero_outputs"] == 0
    table = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--overwrite")
    assert "always 0: in / out" in table.stdout and f"{layers['fc1']['zero_inputs']} / {layers['fc1']['zero_outputs']}" in table.stdout
    assert "dead units" in " ".join(table.stderr.split())


GROUPED_MODULE = """
from torch import nn


def make():
    return nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 4, 4)), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(64, 10))
"""


def test_fit_factors_names_the_layers_a_wildcard_could_not_track(runner: CliRunner, tmp_path: Path, monkeypatch):
    """A grouped conv under factors.modules ["*"] is left out of the scores: the summary says so."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "grouped_model.py").write_text(GROUPED_MODULE)
    torch.manual_seed(0)
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (4, 4, 4)), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(64, 10))
    save_file(model.state_dict(), tmp_path / "grouped.safetensors")
    sets = ["--set", "model.architecture=grouped_model:make", "--set", "model.kwargs={}", "--set", f"model.checkpoint={tmp_path / 'grouped.safetensors'}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.train.range=[0, 64]"]  # fmt: skip
    result = invoke(runner, "fit-factors", DIGITS, *sets)
    assert result.exit_code == 0, result.stderr
    assert "not tracked: 2 (Conv2d: groups=2)" in result.stderr and "influence inspect" in result.stderr
    result = invoke(runner, "fit-factors", DIGITS, *sets, "--overwrite", "--json")
    assert json.loads(result.stdout)["skipped_layers"] == [{"name": "2", "kind": "Conv2d", "num_params": 12, "reason": "groups=2", "shared_with": None}]
    result = invoke(runner, "fit-factors", DIGITS, *sets[:-2], "--set", f"output_dir={tmp_path / 'mlp'}", "--set", "model.architecture=mlp",
                    "--set", "model.kwargs={input_dim: 64, hidden: [64, 32], num_classes: 10}", "--set", f"model.checkpoint={ROOT / 'sample_data' / 'mlp.safetensors'}")  # fmt: skip
    assert result.exit_code == 0 and "not tracked" not in result.stderr


SWIN_MODULE = """
from torchvision.models import SwinTransformer
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2


def make():
    return SwinTransformer([2, 2], 8, [1, 1], [1, 1], [2, 2], num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
"""


def test_a_swin_transformer_is_attributed_through_the_layers_it_calls(runner: CliRunner, tmp_path: Path, monkeypatch):
    """torchvision's Swin V2 under ["*"]: the attention's qkv/proj (applied through F.linear) and its
    position-bias MLP (one table for the whole batch) are left out, named by fit-factors and inspect;
    the rest is fitted and scored."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "tiny_swin.py").write_text(SWIN_MODULE)
    import tiny_swin

    torch.manual_seed(0)
    save_file(tiny_swin.make().state_dict(), tmp_path / "swin.safetensors")
    sets = ["--set", "model.architecture=tiny_swin:make", "--set", "model.kwargs={}", "--set", f"model.checkpoint={tmp_path / 'swin.safetensors'}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.train.range=[0, 48]", "--set", "data.query.range=[1500, 1504]",
            "--set", "data.train.transform.channels=3", "--set", "data.query.transform.channels=3", "--set", "data.batch_size=16"]  # fmt: skip
    result = invoke(runner, "fit-factors", DIGITS, *sets)
    assert result.exit_code == 0, result.stderr
    stderr = " ".join(result.stderr.split())
    assert "not tracked: features.1.0.attn.qkv, features.1.0.attn.proj, features.3.0.attn.qkv, … (4 in all) (Linear: applied by torchvision's ShiftedWindowAttentionV2 through F.linear on its weight, never called as a layer)" in stderr
    assert "not tracked: features.1.0.attn.cpb_mlp.0, features.1.0.attn.cpb_mlp.2, features.3.0.attn.cpb_mlp.0, … (4 in all) (Linear: part of the position-bias MLP" in stderr
    result = invoke(runner, "compute-scores", DIGITS, *sets)
    assert result.exit_code == 0, result.stderr
    scores = load_tensors(tmp_path / "out" / "scores.safetensors")[0]["scores"]
    assert scores.shape == (4, 48) and bool(torch.isfinite(scores).all())
    result = invoke(runner, "inspect", DIGITS, *sets, "--json")
    untracked = {u["name"]: u["reason"] for u in json.loads(result.stdout)["untracked"]}
    assert untracked["features.3.0.attn.proj"].startswith("applied by torchvision's ShiftedWindowAttentionV2 through F.linear")
    assert untracked["features.3.0.attn.cpb_mlp.2"].startswith("part of the position-bias MLP (cpb_mlp) of torchvision's ShiftedWindowAttentionV2")


AUX_MODULE = """
from torch import nn


class WithAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.aux, self.fc = nn.Linear(64, 8), nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x):
        h = self.body(x.flatten(1))
        return (self.fc(h), self.aux(h)) if self.training else self.fc(h)


def make():
    return WithAux()
"""


def test_a_head_used_only_in_training_is_named_with_eval_mode(runner: CliRunner, tmp_path: Path, monkeypatch):
    """googlenet and inception_v3 call their auxiliary classifiers only in training; the tool runs the
    model in eval mode, so '*' matches layers the forward never calls: one clean error says why."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "with_aux.py").write_text(AUX_MODULE)
    import with_aux

    save_file(with_aux.make().state_dict(), tmp_path / "aux.safetensors")
    sets = ["--set", "model.architecture=with_aux:make", "--set", "model.kwargs={}", "--set", f"model.checkpoint={tmp_path / 'aux.safetensors'}",
            "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.train.range=[0, 16]", "--set", "data.batch_size=8"]  # fmt: skip
    result = invoke(runner, "fit-factors", DIGITS, *sets)
    assert_clean_error(result, EXIT["model"], "layer 'aux' was not called in the forward pass, which runs in eval mode", "used only in training")
    assert not (tmp_path / "out" / FACTORS).exists()
    result = invoke(runner, "fit-factors", DIGITS, *sets, "--set", "factors.modules=[body, fc]")
    assert result.exit_code == 0, result.stderr


def test_fit_factors_cnn_with_margin_and_ggn(runner: CliRunner, tmp_path: Path):
    result = invoke(runner, "fit-factors", DIGITS_CNN, "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 64]",
                    "--set", "data.batch_size=32", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fisher"] == "ggn" and data["num_examples"] == 64
    assert "warning" not in result.stderr
    assert {layer["kind"] for layer in data["layers"]} == {"conv2d", "linear"}


# ----------------------------------------------------------------------------- bad input


def _pixels(n: int, side: int) -> torch.Tensor:
    """Digit-like inputs [n, 1, side, side] in 0..16, from a fixed generator (the global RNG is left alone)."""
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(0)) * 16


def _tensors(tmp: Path, name: str, inputs: torch.Tensor, labels: torch.Tensor) -> Path:
    path = tmp / name
    save_file({"inputs": inputs, "labels": labels}, str(path))
    return path


def _bad_yaml(tmp: Path) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text("model:\n  architecture: mlp\n kwargs: {\n", encoding="utf-8")
    return [str(path)]


def _labels_outside(tmp: Path) -> list[str]:
    path = _tensors(tmp, "labels12.safetensors", _pixels(20, 8), torch.tensor([1, 2, 12, 3] * 5))
    return [str(DIGITS), "--set", f"data.train.path={path}", "--set", "data.train.range=null"]


def _wrong_shape(tmp: Path) -> list[str]:
    path = _tensors(tmp, "tens.safetensors", _pixels(20, 10), torch.arange(20) % 10)
    return [str(DIGITS), "--set", f"data.train.path={path}", "--set", "data.train.range=null"]


def _train_file(name: str, inputs: torch.Tensor | None, labels: torch.Tensor | None) -> Callable[[Path], list[str]]:
    """A config whose data.train is a tensors file written for the test (None: a file that is not safetensors)."""

    def build(tmp: Path) -> list[str]:
        path = tmp / name
        if inputs is None:
            path.write_bytes(b"not a safetensors file")
        else:
            save_file({"inputs": inputs} | ({} if labels is None else {"labels": labels}), str(path))
        return [str(DIGITS), "--set", f"data.train.path={path}", "--set", "data.train.range=null", "--set", "data.batch_size=16"]

    return build


def _nan_inputs() -> torch.Tensor:
    x = _pixels(40, 8)
    x[33, 0, 2, 2] = float("nan")
    return x


def _output_under_a_file(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("not a folder")
    return [str(DIGITS), "--set", f"output_dir={tmp / 'a_file' / 'out'}"]


def _output_dir_a_file(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("not a folder")
    return [str(DIGITS), "--set", f"output_dir={tmp / 'a_file'}"]


def _output_dir_a_dangling_link(tmp: Path) -> list[str]:
    (tmp / "link").symlink_to(tmp / "gone")
    return [str(DIGITS), "--set", f"output_dir={tmp / 'link' / 'out'}"]


def _checkpoint_of_input_dim(dim: int) -> Callable[[Path], list[str]]:
    """A config whose model (and its checkpoint) takes `dim` features, not the digits' 64."""

    def build(tmp: Path) -> list[str]:
        path = tmp / f"mlp{dim}.safetensors"
        save_file(mlp(input_dim=dim, hidden=[64, 32], num_classes=10).state_dict(), str(path))
        return [str(DIGITS), "--set", f"model.kwargs.input_dim={dim}", "--set", f"model.checkpoint={path}"]

    return build


def _cfg(*sets: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        args = [str(DIGITS)]
        for s in sets:
            args += ["--set", s]
        return args

    return build


# (id, args builder, exit code, words the error line must contain)
BAD_INPUTS = [
    ("malformed-yaml", _bad_yaml, EXIT["config"], ["bad.yaml", "not valid YAML", "line 3, column 2"]),
    ("missing-config", lambda tmp: [str(tmp / "nope.yaml")], EXIT["config"], ["nope.yaml", "does not exist"]),
    ("unknown-key", _cfg("data.train.sourc=x"), EXIT["config"], ["digits.yaml", "data.train.sourc", "unknown key", "did you mean source"]),
    ("wrong-type", _cfg("data.batch_size=ten"), EXIT["config"], ["digits.yaml", "data.batch_size", "expected an integer"]),
    ("wrong-type-strategy", _cfg("factors.strategy=3"), EXIT["config"], ["factors.strategy", "ekfac | kfac"]),
    ("batch-size-0", _cfg("data.batch_size=0"), EXIT["config"], ["data.batch_size", "must be > 0"]),
    ("batch-size-negative", _cfg("data.batch_size=-8"), EXIT["config"], ["data.batch_size", "must be > 0"]),
    ("damping-negative", _cfg("scores.damping=-1"), EXIT["config"], ["scores.damping", "-1"]),
    ("damping-nan", _cfg("scores.damping=.nan"), EXIT["config"], ["scores.damping", "nan"]),
    ("bad-override", _cfg("data.batch_size"), EXIT["config"], ["--set 'data.batch_size'", "key.path=value"]),
    ("override-through-scalar", _cfg("seed.x=1"), EXIT["config"], ["--set 'seed.x=1'", "not a mapping"]),
    ("missing-checkpoint", _cfg("model.checkpoint=nope.safetensors"), EXIT["config"], ["model.checkpoint", "nope.safetensors", "does not exist"]),
    ("emoji-codes-stay-text", _cfg("data.train.path=a:fire:b:100:.safetensors"), EXIT["config"], ["a:fire:b:100:.safetensors", "does not exist"]),
    ("missing-dataset", _cfg("data.train.path=nope.safetensors"), EXIT["config"], ["data.train.path", "nope.safetensors", "does not exist"]),
    ("several-problems", _cfg("data.batch_size=0", "scores.damping=-1", "factors.fisher=exact"), EXIT["config"],
     ["3 problems", "data.batch_size", "scores.damping", "factors.fisher"]),  # fmt: skip
    ("other-architecture", _cfg("model.kwargs.hidden=[8]"), EXIT["model"], ["model.checkpoint", "does not match the model", "fc1.weight"]),
    ("other-input-dim", _cfg("model.kwargs.input_dim=100"), EXIT["model"], ["model.checkpoint", "fc1.weight: checkpoint [64, 64] vs model [64, 100]"]),
    ("module-pattern-matches-nothing", _cfg("factors.modules=[conv*]"), EXIT["model"], ["factors.modules", "conv*", "fc1, fc2, head"]),
    ("range-beyond-data", _cfg("data.train.range=[0, 5000]"), EXIT["data"], ["data.train.range", "1797 examples"]),
    ("indices-beyond-data", _cfg("data.train.range=null", "data.train.indices=[0, 1797]"), EXIT["data"], ["data.train.indices", "1797"]),
    ("empty-after-labels_in", _cfg("data.train.labels_in=[42]"), EXIT["data"], ["data.train", "no examples left", "labels_in"]),
    ("labels-outside-classes", _labels_outside, EXIT["data"], ["data.train", "label 12", "10 classes"]),
    ("wrong-image-shape", _wrong_shape, EXIT["data"], ["data.train", "inputs of shape [20, 1, 10, 10]", "do not fit the model"]),
    ("wrong-input-dim", _checkpoint_of_input_dim(100), EXIT["data"], ["data.train", "do not fit the model", "100"]),
    ("empty-dataset", _train_file("empty.safetensors", torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)), EXIT["data"],
     ["data.train", "the source holds no examples", "empty.safetensors"]),  # fmt: skip
    ("dataset-without-labels", _train_file("nolabels.safetensors", torch.zeros(5, 1, 8, 8), None), EXIT["data"],
     ["data.train.labels_key", "'labels' is not in nolabels.safetensors"]),  # fmt: skip
    ("dataset-not-safetensors", _train_file("garbage.safetensors", None, None), EXIT["data"], ["data.train.path", "garbage.safetensors"]),
    ("nan-input", _train_file("nan.safetensors", _nan_inputs(), torch.arange(40) % 10), EXIT["numerical"],
     ["covariance pass", "batch 2", "global indices 33)"]),  # fmt: skip
    ("output-under-a-file", _output_under_a_file, EXIT["output"], ["output_dir: cannot create ", "out': ", "a_file' is a file, not a folder"]),
    ("output-dir-a-file", _output_dir_a_file, EXIT["output"], ["output_dir: ", "a_file' is a file, not a folder"]),
    ("output-under-a-dangling-link", _output_dir_a_dangling_link, EXIT["output"],
     ["output_dir: cannot create ", "link' is a symbolic link to ", "gone', which leads to no folder"]),  # fmt: skip
]


@pytest.mark.parametrize("build, code, needles", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_line_and_writes_nothing(
    runner: CliRunner, tmp_path: Path, build: Callable[[Path], list[str]], code: int, needles: list[str]
):
    out = tmp_path / "out"
    args = build(tmp_path)
    if not any(a.startswith("output_dir=") for a in args):
        args += ["--set", f"output_dir={out}"]
    result = invoke(runner, "fit-factors", *args)
    assert_clean_error(result, code, *needles)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_label_outside_the_classes_names_the_labels_in_key_of_its_dataset(runner: CliRunner, tmp_path: Path):
    """The hint was 'check model.kwargs.num_classes or filter with labels_in': a key that a factory's
    kwargs need not have, and labels_in of no dataset."""
    args = _labels_outside(tmp_path)
    result = invoke(runner, "fit-factors", *args, "--set", f"output_dir={tmp_path / 'out'}")
    assert_clean_error(result, EXIT["data"], "label 12")
    hint = result.stderr.splitlines()[1]
    assert "keep labels 0..9 with data.train.labels_in" in hint and "num_classes of mlp, cnn and torchvision models" in hint


def test_a_path_written_from_the_working_directory_is_named_from_the_configs_folder(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A config in a sub-folder naming model.pt (beside the working directory, not the config) was only
    'does not exist'; the message now says where relative paths resolve, and how to write this one."""
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "sample_data" / "mlp.safetensors", tmp_path / "model.safetensors")
    config = tmp_path / "configs" / "mine.yaml"
    config.write_text(DIGITS.read_text())
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "model.checkpoint=model.safetensors", "--set", "data.train.path=nope.safetensors"]
    result = invoke(runner, "fit-factors", config, *sets)
    line = assert_clean_error(result, EXIT["config"], "model.checkpoint: ", "does not exist")
    assert "model.safetensors in the working directory is ../model.safetensors from there" in line
    assert "relative paths resolve against the config file's folder" in line
    assert "nope.safetensors' does not exist (" not in line  # not in the working directory either


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_dir(runner: CliRunner, tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={locked / 'out'}")
        assert_clean_error(result, EXIT["output"], "output_dir")
    finally:
        locked.chmod(0o700)


def unprivileged(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m influence_cli ARGS` bound by file permissions: under root, without the capabilities that pass over
    them (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set), so that chmod applies."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        prefix = [setpriv or "setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
        if setpriv is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
            pytest.skip("root, and no setpriv that drops the capabilities passing over file permissions")
    env = {**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
    env.pop("INFLUENCE_DEBUG", None)
    command = [*prefix, sys.executable, "-m", "influence_cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def assert_one_error_line(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A subprocess's typed error: its exit code, the message line and its hint on stderr, nothing on stdout, no traceback."""
    assert done.returncode == code and done.stdout == "" and "Traceback" not in done.stderr, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_files_and_folders_this_user_may_not_read(fitted: tuple[Path, Result], tmp_path: Path):
    """A checkpoint, factors file or output_dir without read permission: one line naming it and the permission (not
    a PermissionError traceback, nor safetensors' "No such file or directory" with a hint to recompute)."""
    out, _ = fitted
    run = tmp_path / "run"
    run.mkdir()
    (run / FACTORS).write_bytes((out / FACTORS).read_bytes())
    checkpoint = tmp_path / "mlp.safetensors"
    checkpoint.write_bytes((ROOT / "sample_data" / "mlp.safetensors").read_bytes())
    checkpoint.chmod(0)
    (run / FACTORS).chmod(0)
    try:
        done = unprivileged("fit-factors", DIGITS, "--set", f"output_dir={tmp_path / 'fit'}", "--set", f"model.checkpoint={checkpoint}")
        assert_one_error_line(done, EXIT["model"], f"model.checkpoint: {str(checkpoint)!r}: cannot read the checkpoint (Permission denied)")
        done = unprivileged("compute-scores", DIGITS, "--set", f"output_dir={run}")
        assert_one_error_line(done, EXIT["output"], f"{str(run / FACTORS)!r} cannot be read (permission denied)")
        run.chmod(0)
        for command in ("top-k", "compute-scores"):
            done = unprivileged(command, DIGITS, "--set", f"output_dir={run}")
            assert_one_error_line(done, EXIT["output"], f"output_dir: {str(run)!r} cannot be read (permission denied)")
    finally:
        run.chmod(0o700)
        (run / FACTORS).chmod(0o600)
        checkpoint.chmod(0o600)
    assert not (tmp_path / "fit").exists()


def test_a_tilde_in_path_arguments_is_the_home_folder(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch):
    """CONFIG, FILE, --out and the pictures' paths expand a leading ~ as the config's paths do: the shell leaves
    `--out=~/x` (and a quoted ~) as it is, which made a folder named "~" in the working directory."""
    out, _ = fitted
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    (home / "digits.yaml").symlink_to(DIGITS)  # its paths resolve against configs/, the folder of the file it links to
    result = invoke(runner, "edit", "~/digits.yaml", "--set", f"output_dir={out}", "--out=~/edited.safetensors", "--keep-share", "0.5")
    assert result.exit_code == 0, result.stderr
    result = invoke(runner, "info", "~/edited.safetensors", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["path"] == str(home / "edited.safetensors"), result.stderr
    assert (home / "edited.safetensors").is_file() and list(work.iterdir()) == []


def test_a_scores_index_given_with_a_tilde_that_this_user_may_not_read(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch):
    """FILE's own readability check passes over a path given with ~ (it looks for a file named "~"): info names an
    unreadable scores index as such, as top-k and compute-scores do, not as "not a scores index written by this tool"."""
    out, _ = fitted
    home = tmp_path / "home"
    sets = ["--set", f"output_dir={home}", "--set", f"factors_dir={out}", "--set", "scores.max_memory_mb=0.02"]
    assert invoke(runner, "compute-scores", DIGITS, *sets).exit_code == 0
    index = home / "scores.index.json"
    monkeypatch.setenv("HOME", str(home))
    index.chmod(0)
    try:
        done = unprivileged("info", "~/scores.index.json")
    finally:
        index.chmod(0o600)
    assert_one_error_line(done, EXIT["output"], f"{str(index)!r} cannot be read (permission denied)")
    assert done.stderr.splitlines()[1] == "hint: give this user read permission on it (chmod)"


def test_data_files_this_user_may_not_read(tmp_path: Path):
    """A tensors file (safetensors said "No such file or directory") and an indices_file (a PermissionError's text,
    no hint) without read permission: one line naming the key, the file and the permission, before any pass."""
    data = tmp_path / "digits.safetensors"
    data.write_bytes((ROOT / "sample_data" / "digits.safetensors").read_bytes())
    indices = tmp_path / "indices.txt"
    indices.write_text("0\n1\n2\n")
    cases = [(data, "data.train.path", [f"data.train.path={data}"]),
             (indices, "data.train.indices_file", ["data.train.range=null", f"data.train.indices_file={indices}"])]  # fmt: skip
    for path, key, sets in cases:
        path.chmod(0)
        try:
            done = unprivileged("fit-factors", DIGITS, *(a for s in [*sets, f"output_dir={tmp_path / 'out'}"] for a in ("--set", s)))
        finally:
            path.chmod(0o600)
        assert_one_error_line(done, EXIT["data"], f"{key}: {str(path)!r} cannot be read (permission denied)")
        assert done.stderr.splitlines()[1] == "hint: give this user read permission on it (chmod)"
    assert not (tmp_path / "out").exists()


def test_folders_that_may_be_entered_but_not_listed(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """A folder this user may enter but not list serves what is read or written there by name: factors shared through
    factors_dir, top-k's scores, a picture, `edit --out`; the output_dir a command writes is listed (its progress and
    temporary files are found there), and a folder that cannot be entered (or one below it) is refused, one line,
    before any work."""
    out, _ = fitted
    shared, scored, drop, closed, run = (tmp_path / name for name in ("shared", "scored", "drop", "closed", "run"))
    for folder in (shared, scored, drop, closed):
        folder.mkdir()
    (shared / FACTORS).write_bytes((out / FACTORS).read_bytes())
    assert invoke(runner, "compute-scores", DIGITS, "--set", f"factors_dir={shared}", "--set", f"output_dir={scored}").exit_code == 0
    shared.chmod(0o100)  # search only
    scored.chmod(0o300)  # write and search: a drop box
    drop.chmod(0o300)
    closed.chmod(0)
    factors = ["--set", f"factors_dir={shared}"]
    try:
        done = unprivileged("compute-scores", DIGITS, *factors, "--set", f"output_dir={run}")
        assert done.returncode == 0, done.stderr
        done = unprivileged("top-k", DIGITS, "--set", f"output_dir={scored}", "--query", "0", "--image-grid", drop / "grid.png")
        assert done.returncode == 0, done.stderr
        done = unprivileged("edit", DIGITS, *factors, "--set", f"output_dir={run}", "--out", drop / "edited.safetensors")
        assert done.returncode == 0, done.stderr
        done = unprivileged("compute-scores", DIGITS, *factors, "--set", f"output_dir={drop}")
        assert_one_error_line(done, EXIT["output"], f"output_dir: {str(drop)!r} cannot be read (permission denied)")
        done = unprivileged("top-k", DIGITS, "--set", f"output_dir={scored}", "--query", "0", "--image-grid", closed / "grid.png")
        assert_one_error_line(done, EXIT["output"], f"--image-grid: {str(closed)!r} cannot be read (permission denied)")
        done = unprivileged("edit", DIGITS, *factors, "--set", f"output_dir={run}", "--out", closed / "sub" / "edited.safetensors")
        assert_one_error_line(done, EXIT["output"], f"--out: {str(closed / 'sub')!r} cannot be read (permission denied)")
        done = unprivileged("edit", DIGITS, "--set", f"factors_dir={closed / 'sub'}", "--set", f"output_dir={run}", "--out", drop / "e.pt")
        assert_one_error_line(done, EXIT["output"], f"factors_dir: {str(closed / 'sub')!r} cannot be read (permission denied)")
    finally:
        for folder in (shared, scored, drop, closed):
            folder.chmod(0o700)
    assert sorted(p.name for p in drop.iterdir()) == ["edited.safetensors", "grid.png"] and not any(closed.iterdir())


def _non_utf8_folder(parent: Path) -> Path:
    """parent/café with the é as Latin-1, a byte that is not UTF-8 (Python's surrogate escape '\\udce9')."""
    folder = parent / os.fsdecode(b"caf\xe9")
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    return folder


def test_a_config_in_a_folder_whose_name_is_not_utf8(runner: CliRunner, tmp_path: Path):
    """Its checkpoint and data beside it are read (safetensors opens only UTF-8 paths: they are mapped through
    /proc/self/fd), and the folder is recorded in the outputs' metadata as it is; a relative output_dir, in that
    folder, holds the outputs, read back as well (it was refused as a config error)."""
    folder = _non_utf8_folder(tmp_path)
    for name in ("mlp.safetensors", "digits.safetensors"):
        (folder / name).write_bytes((ROOT / "sample_data" / name).read_bytes())
    config = folder / "digits.yaml"
    config.write_text(DIGITS.read_text().replace("../sample_data/", ""))
    out = tmp_path / "out"
    result = invoke(runner, "fit-factors", config, "--set", f"output_dir={out}", "--set", "data.train.range=[0, 300]")
    assert result.exit_code == 0, result.stderr
    _, meta = load_tensors(out / FACTORS)
    assert meta["base_dir"] == str(config.resolve().parent) and meta["config"]["model"]["checkpoint"] == "mlp.safetensors"
    assert invoke(runner, "compute-scores", config, "--set", f"output_dir={out}", "--set", "data.train.range=[0, 300]").exit_code == 0
    inside = ["--set", "output_dir=runs", "--set", "data.train.range=[0, 300]"]  # relative: in the folder
    for command in ("fit-factors", "compute-scores"):
        done = invoke(runner, command, config, *inside)
        assert done.exit_code == 0, done.stderr
    assert sorted(p.name for p in (folder / "runs").iterdir()) == [FACTORS, "scores.safetensors"]
    assert_same_tensors(folder / "runs" / FACTORS, out / FACTORS)
    shown = invoke(runner, "info", folder / "runs" / FACTORS, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["path"] == str(folder / "runs" / FACTORS)


def test_every_output_is_written_and_read_back_in_a_folder_whose_name_is_not_utf8(runner: CliRunner, tmp_path: Path):
    """An output_dir given by --set as the shell passes a byte that is not UTF-8 (b"\\xff"; YAML refused the value,
    and the config such an output_dir) holds every command's outputs, score shards among them, and each is read back
    by the next command (safetensors opens only UTF-8 paths: through /proc/self/fd); paths print in --json as JSON's
    escapes of Python's surrogate escapes, which give the path's bytes back; a finished output there is refused as
    one, read like any other."""
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/out\xff"))
    sets = ["--set", f"output_dir={out}", "--set", "data.train.range=[0, 300]"]

    def run(*args: str | Path) -> Result:
        done = invoke(runner, *args[:1], DIGITS, *sets, *args[1:])
        assert done.exit_code == 0, (args, done.stderr)
        return done

    run("fit-factors")
    paths = json.loads(run("compute-scores", "--set", "scores.max_memory_mb=0.02", "--json").stdout)["paths"]
    assert len(paths) > 2 and all(os.fsencode(p).startswith(os.fsencode(out) + b"/scores.") for p in paths)
    run("compute-scores", "--self")
    ranked = json.loads(run("top-k", "--query", "0", "--k", "3", "--json", "--image-grid", out / "grid.png").stdout)
    assert os.fsencode(ranked["output_dir"]) == os.fsencode(tmp_path) + b"/out\xff"
    assert len(ranked["queries"][0]["proponents"]) == 3
    assert "proponent" in run("top-k", "--query", "0", "--k", "3").stdout
    run("top-k", "--self", "--k", "2")
    assert json.loads(run("dataset-similarity", "--json", "--heatmap", out / "similarity.png").stdout)["path"] == str(out / "similarity.safetensors")
    assert json.loads(run("dataset-similarity", "--json").stdout)["from_file"]  # read back
    run("spectrum", "--plot", out / "spectrum.png")
    assert json.loads(run("spectrum", "--json", "--top", "2").stdout)["from_file"]
    edited = out / os.fsdecode(b"edited\xfe.safetensors")
    assert json.loads(run("edit", "--out", edited, "--json").stdout)["path"] == str(edited)
    run("edit", "--out", out / "edited.pt")
    assert json.loads(invoke(runner, "info", edited, "--json").stdout)["metadata"]["format"] == storage.EDITED_CHECKPOINT_FORMAT
    assert "influence_cli.factors/1" in invoke(runner, "info", out / FACTORS).stdout
    names = {"grid.png", "similarity.png", "spectrum.png", edited.name, "edited.pt", FACTORS, "self_influence.safetensors",
             "similarity.safetensors", "spectrum.safetensors", "scores.index.json"}  # fmt: skip
    assert {p.name for p in out.iterdir()} == names | {Path(p).name for p in paths}
    refused = invoke(runner, "fit-factors", DIGITS, *sets)
    assert_clean_error(refused, EXIT["output"], "already holds factors from a finished run")
    (out / FACTORS).write_bytes(b"damaged")
    refused = invoke(runner, "fit-factors", DIGITS, *sets)
    assert_clean_error(refused, EXIT["output"], "is not a readable safetensors file (damaged")


def test_outputs_whose_path_is_not_utf8_without_proc_self_fd_are_one_line_errors(runner: CliRunner, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """Without /proc/self/fd (not Linux) safetensors cannot open such a path: the outputs are still written, and
    reading one back is one line naming the file and the fix, never a traceback."""
    monkeypatch.setattr(storage, "_descriptor_names", lambda: False)
    out = tmp_path / os.fsdecode(b"out\xff")
    sets = ["--set", f"output_dir={out}", "--set", "data.train.range=[0, 300]"]
    assert invoke(runner, "fit-factors", DIGITS, *sets).exit_code == 0
    for args in (["compute-scores", DIGITS, *sets], ["info", out / FACTORS]):
        line = assert_clean_error(invoke(runner, *args), EXIT["output"], repr(str(out / FACTORS)), "its path is not valid UTF-8")
        assert "no /proc/self/fd" in line


def test_debug_shows_the_traceback_and_does_not_stick(runner: CliRunner, tmp_path: Path):
    args = ["fit-factors", DIGITS, "--set", "data.batch_size=0", "--set", f"output_dir={tmp_path}"]
    result = invoke(runner, "--debug", *args)
    assert result.exit_code == EXIT["config"]
    assert "config error:" in result.stderr and "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert "Traceback" not in invoke(runner, *args).stderr


def test_debug_from_the_environment(tmp_path: Path):
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": "1"})
    result = runner.invoke(app, ["fit-factors", str(DIGITS), "--set", "data.batch_size=0", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == EXIT["config"] and "Traceback" in result.stderr


def test_debug_traceback_of_a_wrong_shape_keeps_the_torch_error(runner: CliRunner, tmp_path: Path):
    result = invoke(runner, "--debug", "fit-factors", *_wrong_shape(tmp_path), "--set", f"output_dir={tmp_path / 'out'}")
    assert result.exit_code == EXIT["data"]
    assert "RuntimeError" in result.stderr and "DataError" in result.stderr


# ----------------------------------------------------------------------------- inspect


def test_inspect_table(runner: CliRunner):
    result = invoke(runner, "inspect", DIGITS)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "tracked layers (ekfac)" in text
    for layer in ("fc1", "fc2", "head"):
        assert layer in text
    assert "4,160" in text  # fc1 parameters: 64 x (64 + 1)
    assert "3 layers, factors 84.4 KiB in float32; 6,570 of 6,570 parameters tracked" in text  # part of the answer: stdout


def test_inspect_json(runner: CliRunner):
    result = invoke(runner, "inspect", DIGITS_CNN, "--json", "--set", "factors.modules=[conv*]", "--set", "factors.strategy=diagonal")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["strategy"] == "diagonal"
    assert data["layers"] and all(layer["name"].startswith("conv") for layer in data["layers"])
    assert all(layer["kind"] == "conv2d" and layer["a_size"] == 0 for layer in data["layers"])
    weights = sum(layer["d_in"] * layer["d_out"] for layer in data["layers"])
    assert data["tracked_parameters"] == weights < data["parameters"]  # the linear layers are left out
    assert data["factor_bytes"] == sum(4 * (layer["g_size"] + layer["eigenvalue_size"]) + 8 for layer in data["layers"])
    assert data["query_bytes"] == 4 * weights and data["queries_per_chunk"] == 1024 * 2**20 // (4 * weights)  # scores.max_memory_mb: 1024


def test_inspect_says_how_many_queries_compute_scores_takes_at_a_time(runner: CliRunner, tmp_path: Path):
    """The same sizing as compute-scores (scores.plan_layout): bf16 queries with factors.amp, every model of an ensemble."""
    from influence_cli.scores import plan_layout

    budget = ["--set", "scores.max_memory_mb=0.1"]
    plain = json.loads(invoke(runner, "inspect", DIGITS, "--json", *budget).stdout)
    n = plain["tracked_parameters"]
    chunk = plan_layout(10**6, 100, n, batch_size=8, max_memory_mb=0.1).query_chunks[0][1]
    assert plain["queries_per_chunk"] == chunk == int(0.1 * 2**20) // (4 * n)
    bf16 = json.loads(invoke(runner, "inspect", DIGITS, "--json", *budget, "--set", "factors.amp=bfloat16").stdout)
    assert bf16["query_bytes"] == 2 * n and bf16["queries_per_chunk"] == int(0.1 * 2**20) // (2 * n)
    (tmp_path / "member.safetensors").write_bytes((ROOT / "sample_data" / "mlp.safetensors").read_bytes())
    two = json.loads(invoke(runner, "inspect", DIGITS, "--json", *budget, "--set", f"scores.checkpoints=[{tmp_path / 'member.safetensors'}]").stdout)
    assert two["query_bytes"] == 8 * n
    assert two["factor_bytes"] == 2 * plain["factor_bytes"]  # fit-factors writes each model's factors
    line = " ".join(invoke(runner, "inspect", DIGITS, "--set", f"scores.checkpoints=[{tmp_path / 'member.safetensors'}]").stdout.split())
    assert "factors 168.8 KiB in float32 (2 models, 84.4 KiB each)" in line
    table = invoke(runner, "inspect", DIGITS, *budget).stdout
    # not "holds": with several train shards compute-scores keeps every chunk that the budget holds together
    assert f"compute-scores preconditions and scores up to {chunk:,} queries at a time" in " ".join(table.split())


@pytest.mark.parametrize(
    ("config", "strategy"),
    [(DIGITS, "ekfac"), (DIGITS, "kfac"), (DIGITS, "diagonal"), (DIGITS, "identity"), (DIGITS_CNN, "ekfac"), (DIGITS_CNN, "diagonal")],
)
def test_inspect_counts_the_bytes_fit_factors_writes(runner: CliRunner, tmp_path: Path, config: Path, strategy: str):
    """The total and each layer's bytes (its tensors `<layer>.*` in the file), for linear and conv2d layers."""
    from influence_cli.fit import LayerInfo

    sets = ["--set", f"factors.strategy={strategy}", "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 200]"]
    data = json.loads(invoke(runner, "inspect", config, *sets, "--json").stdout)
    assert invoke(runner, "fit-factors", config, *sets).exit_code == 0
    tensors, _ = load_tensors(tmp_path / FACTORS)
    assert data["factor_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for layer in data["layers"]:
        written = sum(t.numel() * t.element_size() for key, t in tensors.items() if key.rsplit(".", 1)[0] == layer["name"])
        assert LayerInfo(**(layer | {"weight_shape": tuple(layer["weight_shape"])})).factor_bytes() == written, layer["name"]


def test_human_bytes_moves_to_the_next_unit_when_rounding_reaches_1024():
    from influence_cli.errors import human_bytes

    assert [human_bytes(n) for n in (0, 1023, 1023.6, 1024, 1535, 2**20 - 52, 2**20 - 1, 2**30 - 1, 2**40 - 1, 2**40)] == [
        "0 B", "1023 B", "1.0 KiB", "1.0 KiB", "1.5 KiB", "1023.9 KiB", "1.0 MiB", "1.0 GiB", "1.0 TiB", "1.0 TiB",
    ]  # fmt: skip


NORMED_MODULE = """
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def make():
    torch.manual_seed(0)
    return nn.Sequential(weight_norm(nn.Linear(64, 32)), nn.ReLU(), nn.Linear(32, 10))
"""


def test_inspect_counts_a_parametrized_weight_once(runner: CliRunner, tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "normed_model.py").write_text(NORMED_MODULE)
    import normed_model

    save_file(normed_model.make().state_dict(), tmp_path / "normed.safetensors")
    sets = ["--set", "model.architecture=normed_model:make", "--set", "model.kwargs={}", "--set", f"model.checkpoint={tmp_path / 'normed.safetensors'}"]
    result = invoke(runner, "inspect", DIGITS, *sets, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["parameters"] == sum(p.numel() for p in normed_model.make().parameters()) == 2442
    assert data["tracked_parameters"] == 64 * 32 + 32 + 32 * 10 + 10  # the effective weights and biases


UNSEEDED_MODULE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def synthetic(n):
    return TensorDataset(torch.randn(n, 64), torch.randint(0, 3, (n,)))


def tiny():
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
"""


def test_a_query_set_of_an_unseeded_factory_is_not_a_copy_of_the_training_set(runner: CliRunner, tmp_path: Path):
    """A factory that draws without seeding itself, n=1000 for data.train and n=100 for data.query: each load drew
    from the same state (the caller's, put back after each), so query i was train i, its top proponent for about a
    third of the queries (in separate processes compute-scores refused the factors instead, its state at the load not
    fit-factors')."""
    (tmp_path / "unseeded_data.py").write_text(UNSEEDED_MODULE)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {architecture: 'unseeded_data:tiny'}\ntask: {kind: classification}\n"
        "data:\n  train: {source: 'unseeded_data:synthetic', kwargs: {n: 1000}}\n"
        "  query: {source: 'unseeded_data:synthetic', kwargs: {n: 100}}\n  num_workers: 0\n"
        "output_dir: out\ndevice: cpu\n"
    )
    for command in ("fit-factors", "compute-scores"):
        result = invoke(runner, command, config)
        assert result.exit_code == 0, (command, result.stderr)
    result = invoke(runner, "top-k", config, "--k", "1", "--json")
    assert result.exit_code == 0, result.stderr
    queries = json.loads(result.stdout)["queries"]
    own = sum(q["proponents"][0]["train_index"] == q["query_index"] for q in queries)
    assert len(queries) == 100 and own <= 3, own  # chance: 0.1 of 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_inspect_needs_no_device(runner: CliRunner, monkeypatch):
    """inspect never runs the model, so it works on a login node without the config's GPU, and it
    does not hash the weights."""
    import influence_cli.context

    def no_hashing(model):
        raise AssertionError("inspect hashed the model")

    monkeypatch.setattr(influence_cli.context, "model_fingerprint", no_hashing)
    result = invoke(runner, "inspect", DIGITS, "--set", "device=cuda")
    assert result.exit_code == 0, result.stderr
    assert "3 layers" in result.stdout


FAILING_MODULE = """
import torch
from influence_cli.models import mlp


class Failing(torch.nn.Module):
    def __init__(self, after: int, error: str):
        super().__init__()
        self.net, self.after, self.error, self.calls = mlp(input_dim=64, hidden=[64, 32], num_classes=10), after, error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            if self.error == "name":
                return undefined_name(x)  # noqa: F821
            raise RuntimeError("custom assertion in my model")
        return self.net(x)


def make(after: int, error: str):
    return Failing(after, error)
"""


@pytest.mark.parametrize(("after", "error", "kind"), [(0, "runtime", "RuntimeError"), (3, "runtime", "RuntimeError"), (3, "name", "NameError")])
def test_an_error_of_the_model_s_own_forward_is_a_model_error(runner: CliRunner, tmp_path: Path, monkeypatch, after: int, error: str, kind: str):
    """Not blamed on the data (first batch), and no traceback (later batches)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "failing_model.py").write_text(FAILING_MODULE)
    sets = [
        "--set", "model.architecture=failing_model:make", "--set", f"model.kwargs={{after: {after}, error: {error}}}",
        "--set", "model.checkpoint=null", "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.batch_size=64",
    ]  # fmt: skip
    line = assert_clean_error(invoke(runner, "fit-factors", DIGITS, *sets), EXIT["model"], f"the model's forward raised {kind}")
    assert "data.train" in line and "global indices" in line


def test_inspect_bad_pattern(runner: CliRunner):
    result = invoke(runner, "inspect", DIGITS, "--set", "factors.modules=[nothing*]")
    assert_clean_error(result, EXIT["model"], "factors.modules", "nothing*")


def test_inspect_reports_config_errors(runner: CliRunner):
    assert_clean_error(invoke(runner, "inspect", DIGITS, "--set", "data.batch_size=0"), EXIT["config"], "data.batch_size")


# ----------------------------------------------------------------------------- info


def test_info_table(runner: CliRunner, fitted: tuple[Path, Result]):
    out, _ = fitted
    result = invoke(runner, "info", out / FACTORS)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for field in ("strategy", "fisher", "model_fingerprint", "dataset_fingerprint", "tool_version", "torch_version", "tensors"):
        assert field in text, field
    assert __version__ in text


def test_info_records_the_python_version_hardware_and_threads_the_bits_depend_on(runner: CliRunner, tmp_path: Path):
    """CPU kernels sum in an order that depends on the thread count, and GPUs and CPUs round differently: an
    output records them, with the Python version, so a rerun for the same bits can match them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--set", "device=cpu").exit_code == 0
    finally:
        torch.set_num_threads(before)
    meta = json.loads(invoke(runner, "info", tmp_path / FACTORS, "--json").stdout)["metadata"]
    assert meta["threads"] == 2 and meta["python_version"] == platform.python_version()
    assert isinstance(meta["device_name"], str) and meta["device_name"]
    table = invoke(runner, "info", tmp_path / FACTORS).stdout
    assert _table_cell(table, "threads") == "2" and _table_cell(table, "python_version") == platform.python_version()


def test_the_config_info_prints_runs_the_same_fit_again(runner: CliRunner, tmp_path: Path):
    """info --config prints the resolved config (--set overrides in place); saved where its first line says,
    it fits the same factors, bit for bit. With --json it is a usage error; a file without a config is named."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(DIGITS, project / "configs")
    shutil.copytree(ROOT / "sample_data", project / "sample_data", ignore=shutil.ignore_patterns("cnn*", "*.py", "*.md"))
    first = tmp_path / "first"
    sets = ["--set", f"output_dir={first}", "--set", "data.batch_size=100", "--set", "factors.fisher=sampled", "--set", "seed=3"]
    assert invoke(runner, "fit-factors", project / "configs" / "digits.yaml", *sets).exit_code == 0
    result = invoke(runner, "info", first / FACTORS, "--config")
    assert result.exit_code == 0, result.stderr
    head = result.stdout.splitlines()[0]
    assert head.startswith("#") and head.endswith(f"save it in {project / 'configs'}"), head
    rerun = project / "configs" / "rerun.yaml"
    rerun.write_text(result.stdout)
    again = invoke(runner, "fit-factors", rerun, "--set", f"output_dir={tmp_path / 'again'}")
    assert again.exit_code == 0, again.stderr
    assert_same_tensors(tmp_path / "again" / FACTORS, first / FACTORS)
    assert_clean_error(invoke(runner, "info", first / FACTORS, "--config", "--json"), 2, "--config and --json")

    # --digest: the tensors' hash, the same for the two runs (whose metadata differ); a value changed changes it
    def digest(path: Path) -> str:
        result = invoke(runner, "info", path, "--digest", "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["tensors_sha256"]

    assert digest(first / FACTORS) == digest(tmp_path / "again" / FACTORS) == _table_cell(invoke(runner, "info", first / FACTORS, "--digest").stdout, "tensors_sha256")
    tensors, meta = load_tensors(first / FACTORS)
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["head.eigenvalues"].view(torch.int32)[0, 0] += 1  # one bit of one value
    storage.save_tensors(tmp_path / "changed" / FACTORS, tensors, meta)
    assert digest(tmp_path / "changed" / FACTORS) != digest(first / FACTORS)
    save_file({"x": torch.zeros(1)}, tmp_path / "bare.safetensors", metadata={"format": "influence_cli.factors/1"})
    assert_clean_error(invoke(runner, "info", tmp_path / "bare.safetensors", "--config"), EXIT["output"], "records no config")


def _table_cell(stdout: str, field: str) -> str:
    """The value of `field` in `info`'s table, its folded lines joined by spaces."""
    rows = [line.split("│") for line in stdout.splitlines() if line.startswith("│")]
    start = next(i for i, row in enumerate(rows) if row[1].strip() == field)
    end = next((i for i in range(start + 1, len(rows)) if rows[i][1].strip()), len(rows))
    return " ".join(row[2].strip() for row in rows[start:end])


def test_info_groups_the_tensors_by_layer(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """The tensors row names each layer's tensors once, the layers holding the same ones together, within 120
    columns; --json lists every tensor. A scores index lists its shard files."""
    out, _ = fitted
    result = invoke(runner, "info", out / FACTORS)
    assert all(len(line) <= 120 for line in result.stdout.splitlines() if line.startswith(BOX)), result.stdout
    tensors = "18: {fc1, fc2, head}.{a_eigenvalues, a_eigenvectors, eigenvalues, g_eigenvalues, g_eigenvectors, num_examples}"
    assert _table_cell(result.stdout, "tensors") == tensors
    assert len(json.loads(invoke(runner, "info", out / FACTORS, "--json").stdout)["tensors"]) == 18
    from influence_cli.cli.info import tensor_names

    layers = [f"backbone.layer{i}.{b}.conv{c}" for i in range(1, 5) for b in (0, 1) for c in (1, 2)]
    assert tensor_names([f"{layer}.{t}" for layer in layers for t in ("a_eigenvalues", "num_examples")] + ["scale"]) == (
        "33: scale\n{backbone.layer1.0.conv1, backbone.layer1.0.conv2, backbone.layer1.1.conv1, … (16 in all)}.{a_eigenvalues, num_examples}"
    )
    assert tensor_names([f"d{i}.x{i}" for i in range(12)]).splitlines()[-1] == "… and 5 more groups (--json lists every tensor)"
    sets = ["--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}", "--set", "scores.max_memory_mb=0.02"]
    assert invoke(runner, "compute-scores", DIGITS, *sets, "--by-layer").exit_code == 0
    shards = _table_cell(invoke(runner, "info", tmp_path / "scores.index.json").stdout, "shards")
    assert shards == "6 files: scores.shard-00000.safetensors, scores.shard-00001.safetensors, … (6 in all); each with its scores_by_layer"


def test_info_json(runner: CliRunner, fitted: tuple[Path, Result]):
    out, _ = fitted
    result = invoke(runner, "info", out / FACTORS, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    meta = data["metadata"]
    assert meta["format"].startswith("influence_cli.factors/")
    assert meta["strategy"] == "ekfac" and meta["fisher"] == "sampled" and meta["num_examples"] == 1500
    assert len(meta["model_fingerprint"]) >= 16 and len(meta["dataset_fingerprint"]) >= 16
    assert meta["modules"] == ["fc1", "fc2", "head"]
    config = meta["config"]
    assert config["model"]["architecture"] == "mlp" and config["output_dir"] == str(out)
    assert config["data"]["train"]["source"] == "tensors"
    assert all(key.split(".", 1)[0] in ("fc1", "fc2", "head") for key in data["tensors"])


def _recorded_config(runner: CliRunner, path: Path) -> dict:
    return json.loads(invoke(runner, "info", path, "--json").stdout)["metadata"]["config"]


def test_outputs_record_the_config_the_flags_made(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """The config an output records is the run's effective one: the flags that set config keys are in it, as
    --set overrides are. The keys --resume and read-backs go by are unchanged: an output whose config says
    what the config file did (as earlier versions recorded it) is still this run's finished result."""
    out, _ = fitted
    sets = ["--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}"]
    scores = tmp_path / "scores.safetensors"
    assert invoke(runner, "compute-scores", DIGITS, *sets, "--relative", "--by-layer").exit_code == 0
    recorded = _recorded_config(runner, scores)["scores"]
    assert recorded["relative"] is True and recorded["by_layer"] is True  # the file's scores.relative is false, by_layer unset
    assert invoke(runner, "compute-scores", DIGITS, *sets, "--self", "--by-layer").exit_code == 0
    recorded = _recorded_config(runner, tmp_path / "self_influence.safetensors")["scores"]
    assert recorded["by_layer"] is True and recorded["relative"] is False  # as the file has it: --self does not use it
    tensors, metadata = storage.load_tensors(scores)
    metadata["config"]["scores"] |= {"relative": False, "by_layer": False}  # as earlier versions recorded the same run
    storage.save_tensors(scores, tensors, metadata)
    result = invoke(runner, "compute-scores", DIGITS, *sets, "--relative", "--by-layer", "--resume")
    assert result.exit_code == 0 and "already complete" in result.stderr, result.stderr

    result = invoke(runner, "spectrum", DIGITS, *sets, "--order", "ekfac", "--layers", "fc1", "--layers", "fc2")
    assert result.exit_code == 0, result.stderr
    recorded = _recorded_config(runner, tmp_path / "spectrum.safetensors")["spectrum"]
    assert recorded["order"] == "ekfac" and recorded["layers"] == ["fc1", "fc2"]  # the file's: kfac, ["*"]
    again = invoke(runner, "spectrum", DIGITS, *sets, "--order", "ekfac", "--layers", "fc1", "--layers", "fc2")
    assert again.exit_code == 0 and "read from" in again.stderr, again.stderr

    assert invoke(runner, "dataset-similarity", DIGITS, *sets, "--method", "task2vec").exit_code == 0
    assert _recorded_config(runner, tmp_path / "similarity.safetensors")["similarity"]["method"] == "task2vec"

    edited = tmp_path / "edited.safetensors"
    assert invoke(runner, "edit", DIGITS, *sets, "--out", edited, "--keep-share", "0.3", "--layers", "head").exit_code == 0
    recorded = _recorded_config(runner, edited)["spectrum"]
    assert recorded["edit"] | {"order": recorded["order"]} == {"keep": "share", "rho": 0.6, "share": 0.3, "layers": ["head"], "order": "kfac"}


def test_info_names_the_folder_the_configs_relative_paths_resolve_against(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """The resolved config keeps its paths as written (../sample_data/digits.safetensors), which info showed
    without the folder they resolve against: the config file's, recorded as base_dir."""
    from influence_cli.storage import save_tensors

    out, _ = fitted
    text = invoke(runner, "info", out / FACTORS).stdout
    assert f"\nresolved config (relative paths resolve against {ROOT / 'configs'}):\n" in text
    assert "base_dir" not in text  # shown with the config, not as a row of the table
    meta = json.loads(invoke(runner, "info", out / FACTORS, "--json").stdout)["metadata"]
    assert meta["base_dir"] == str(ROOT / "configs")
    assert (Path(meta["base_dir"]) / meta["config"]["data"]["train"]["path"]).resolve() == ROOT / "sample_data" / "digits.safetensors"
    old = tmp_path / FACTORS  # a file of an earlier version: no base_dir
    save_tensors(old, {"x": torch.zeros(1)}, {"format": "influence_cli.factors/1", "config": {"output_dir": "runs/x"}})
    result = invoke(runner, "info", old)
    assert result.exit_code == 0, result.stderr
    assert "resolved config (relative paths resolve against its config file's folder, not recorded by earlier versions):" in result.stdout
    assert "base_dir" not in json.loads(invoke(runner, "info", old, "--json").stdout)["metadata"]


def test_text_that_reads_as_json_survives_the_metadata(tmp_path: Path):
    """Metadata stores plain text as it is and everything else as JSON: text that reads as JSON is
    stored as JSON too, so every value reads back with its type."""
    from influence_cli import storage

    metadata = {"fingerprint": "1234e56789012345", "digits": "0123", "number": "12", "flag": "true", "none": "null", "plain": "ekfac", "n": 5, "x": [1.5]}
    storage.save_tensors(tmp_path / "t.safetensors", {"t": torch.zeros(1)}, metadata)
    meta = storage.read_metadata(tmp_path / "t.safetensors")
    assert {k: meta[k] for k in metadata} == metadata
    assert storage.load_tensors(tmp_path / "t.safetensors")[1] == meta


DATED_MODULE = """
import datetime
from influence_cli.models import mlp


def make(trained_on: datetime.date, **kwargs):
    return mlp(**kwargs)
"""


def test_a_yaml_date_in_the_kwargs_is_recorded_as_text(runner: CliRunner, tmp_path: Path, monkeypatch):
    """YAML reads 2024-01-01 as a date; the factory gets one, and the outputs' metadata records its text."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "dated_model.py").write_text(DATED_MODULE)
    sets = [
        "--set", "model.architecture=dated_model:make", "--set", "model.kwargs.trained_on=2024-01-01",
        "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.train.range=[0, 100]",
    ]  # fmt: skip
    result = invoke(runner, "fit-factors", DIGITS, *sets)
    assert result.exit_code == 0, result.stderr
    meta = json.loads(invoke(runner, "info", tmp_path / "out" / FACTORS, "--json").stdout)["metadata"]
    assert meta["config"]["model"]["kwargs"]["trained_on"] == "2024-01-01"


def test_compute_scores_without_a_query_set_says_so_before_the_missing_factors(runner: CliRunner, tmp_path: Path):
    """The config's problem comes first: no data.query is named (with the fix), not the factors not fitted yet."""
    out = tmp_path / "out"
    result = invoke(runner, "compute-scores", DIGITS, "--set", "data.query=null", "--set", f"output_dir={out}")
    assert_clean_error(result, EXIT["config"], "digits.yaml", "data.query: missing")
    assert "add a data.query block" in result.stderr and "--self" in result.stderr and "factors" not in result.stderr
    assert not out.exists()
    result = invoke(runner, "compute-scores", DIGITS, "--set", "data.query=null", "--set", f"output_dir={out}", "--self")
    assert_clean_error(result, EXIT["output"], "no factors")  # self-influence reads no queries


def test_top_k_refuses_scores_of_factors_fitted_with_another_seed(runner: CliRunner, tmp_path: Path):
    """With the sampled Fisher the seed draws the factors' labels: compute-scores refuses another, so does top-k."""
    sets = ["--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 200]"]
    for command in ("fit-factors", "compute-scores"):
        assert invoke(runner, command, DIGITS, *sets).exit_code == 0
    assert_clean_error(invoke(runner, "top-k", DIGITS, *sets, "--set", "seed=3"), EXIT["output"], "computed with seed=0; the config has 3")
    assert invoke(runner, "top-k", DIGITS, *sets, "--set", "seed=3", "--set", "factors.fisher=empirical").exit_code == EXIT["output"]  # (another Fisher)
    assert invoke(runner, "compute-scores", DIGITS, *sets, "--self", "--set", "scores.dtype=bfloat16").exit_code == 0
    result = invoke(runner, "top-k", DIGITS, *sets, "--self", "--k", "2")  # self-influence is stored in float32 whatever scores.dtype
    assert result.exit_code == 0, result.stderr


def test_a_model_without_a_checkpoint_is_said_to_be_untrained(runner: CliRunner, tmp_path: Path):
    sets = ["--set", "model.checkpoint=null", "--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 100]"]
    result = invoke(runner, "fit-factors", DIGITS, *sets)
    assert result.exit_code == 0, result.stderr
    assert "warning: model.checkpoint is not set: mlp runs with its random initial weights" in result.stderr


def test_a_model_class_without_a_checkpoint_is_said_to_have_its_initial_weights(runner: CliRunner, tmp_path: Path):
    """`architecture: my_net:Net` (an nn.Module class) without model.checkpoint runs as constructed: warned;
    a factory function without one (which may load its own weights) is not."""
    (tmp_path / "my_net.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    def __init__(self):\n        super().__init__(nn.Linear(64, 10))\n\n\n"
        "def make():\n    return Net()\n\n\nModel = Net\n"
    )
    config = tmp_path / "net.yaml"
    data = {"source": "tensors", "path": str(ROOT / "sample_data" / "digits.safetensors"), "range": [0, 50], "transform": {"scale": 16.0, "flatten": True}}
    config.write_text(json.dumps({"model": {"architecture": "my_net:Net"}, "data": {"train": data}, "output_dir": "out"}))  # JSON is YAML
    result = invoke(runner, "fit-factors", str(config))
    assert result.exit_code == 0, result.stderr
    assert "warning: model.checkpoint is not set: my_net:Net is a class, so the model has the weights its __init__ gives it" in result.stderr
    result = invoke(runner, "fit-factors", str(config), "--set", "model.architecture=my_net:make", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "model.checkpoint is not set" not in result.stderr
    result = invoke(runner, "fit-factors", str(config), "--set", "model.architecture=my_net:Model", "--overwrite")  # the class by another name
    assert result.exit_code == 0, result.stderr
    assert "warning: model.checkpoint is not set: my_net:Model is a class" in result.stderr


def test_a_fingerprint_of_digits_passes_every_check(runner: CliRunner, tmp_path: Path, monkeypatch):
    """A model fingerprint of hex digits that reads as a number ("1234e5…") is still a fingerprint
    for compute-scores, top-k and info."""
    import influence_cli.context
    import influence_cli.models

    fingerprint = "1234e56789012345"
    for module in (influence_cli.context, influence_cli.models):
        monkeypatch.setattr(module, "model_fingerprint", lambda model: fingerprint)
    sets = ["--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 200]"]
    for command in (["fit-factors"], ["compute-scores"], ["top-k", "--k", "2"]):
        result = invoke(runner, command[0], DIGITS, *sets, *command[1:])
        assert result.exit_code == 0, result.stderr
    for name in (FACTORS, "scores.safetensors"):
        assert json.loads(invoke(runner, "info", tmp_path / name, "--json").stdout)["metadata"]["model_fingerprint"] == fingerprint


def test_each_command_needs_only_the_data_it_reads(runner: CliRunner, tmp_path: Path):
    """A shared config on a machine with part of the data: every file a command does not read is gone."""
    gone = "/nonexistent/data.safetensors"
    no_query = ["--set", f"data.query.path={gone}"]
    no_sets = [arg for name in ("zeros_sixes", "ones_sevens", "zeros_sixes_heldout", "ones_sevens_heldout")
               for arg in ("--set", f"similarity.datasets.{name}.path={gone}")]  # fmt: skip
    digits = "{source: tensors, path: ../sample_data/digits.safetensors, range: [0, 200], transform: {scale: 16.0}}"
    out = ["--set", f"output_dir={tmp_path}", "--set", "device=cpu"]
    runs = [
        ("fit-factors", [*no_query, *no_sets, "--set", "data.train.range=[0, 300]"]),
        ("compute-scores", ["--self", *no_query, *no_sets, "--set", "data.train.range=[0, 300]"]),
        ("top-k", ["--self", *no_query, *no_sets, "--set", "data.train.range=[0, 300]"]),
        ("spectrum", ["--set", f"data.train.path={gone}", *no_query, *no_sets, "--set", f"spectrum.datasets.a={digits}"]),
        ("inspect", ["--set", f"data.train.path={gone}", *no_query, *no_sets]),
    ]
    for command, sets in runs:
        result = invoke(runner, command, DIGITS, *out, *sets)
        assert result.exit_code == 0, (command, result.stderr)
    for command in ("compute-scores", "top-k"):  # pairwise: reads data.query
        assert_clean_error(invoke(runner, command, DIGITS, *out, *no_query), EXIT["config"], "data.query.path", "does not exist")


def test_info_on_a_scores_index_checks_its_shards(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """An index whose shard is gone describes incomplete scores: refused by name, as top-k refuses them."""
    out, _ = fitted
    sets = ["--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}", "--set", "scores.max_memory_mb=0.02"]
    assert invoke(runner, "compute-scores", DIGITS, *sets).exit_code == 0
    index = tmp_path / "scores.index.json"
    shards = json.loads(invoke(runner, "info", index, "--json").stdout)["tensors"]
    assert len(shards) >= 2
    (tmp_path / sorted(shards)[1]).unlink()
    assert_clean_error(invoke(runner, "info", index), EXIT["output"], f"{sorted(shards)[1]}' (listed in scores.index.json) is missing")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"metadata": {}, "n_query": 1, "shards": [{"file": null, "train_start": 0, "train_stop": 1}]}', "a shard's 'file' is not a file name"),
        ('{"metadata": {}, "n_query": 1, "shards": [{"file": 7, "train_start": 0, "train_stop": 1}]}', "a shard's 'file' is not a file name"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["null file", "number file", "nested"],
)
def test_info_on_a_damaged_scores_index(runner: CliRunner, tmp_path: Path, text: str, why: str):
    """A shard listed without a file name, or JSON nested past Python's recursion limit, is no scores index: said so (it was a traceback)."""
    index = tmp_path / "scores.index.json"
    index.write_text(text)
    assert_clean_error(invoke(runner, "info", index), EXIT["output"], f"{str(index)!r} is not a scores index written by this tool ({why})")


@pytest.mark.parametrize("name", ["missing.safetensors", "config.yaml"])
def test_info_on_a_file_that_is_not_an_output(runner: CliRunner, tmp_path: Path, name: str):
    path = tmp_path / name
    if name == "config.yaml":
        path.write_text(DIGITS.read_text())
    assert_clean_error(invoke(runner, "info", path), EXIT["output"], name)


def test_info_on_an_npz_archive_does_not_call_it_a_torch_save_file(runner: CliRunner, tmp_path: Path):
    """An .npz (a zip archive, as torch.save writes) was called 'a torch.save file (a checkpoint, ...)'."""
    import numpy as np

    np.savez(tmp_path / "data.npz", inputs=np.zeros((2, 3)), labels=np.zeros(2))
    result = invoke(runner, "info", tmp_path / "data.npz")
    assert_clean_error(result, EXIT["output"], "data.npz' is not a readable safetensors file")
    assert "torch.save" not in result.stderr


def test_info_on_a_plain_state_dict_says_it_records_no_metadata(runner: CliRunner, tmp_path: Path):
    """A .pt written by edit (torch.save) was 'not a readable safetensors file (... header too large)',
    with a hint to point info at a file written by this tool, which it was."""
    import torch

    torch.save({"w": torch.ones(2)}, tmp_path / "edited.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": {"module.w": torch.ones(2)}, "epoch": 3}, tmp_path / "trained.ckpt")  # not a plain state dict
    for name in ("edited.pt", "legacy.pth", "trained.ckpt"):
        result = invoke(runner, "info", tmp_path / name)
        assert_clean_error(result, EXIT["output"], f"{name}' is a torch.save file", "records no metadata")
        assert "header too large" not in result.stderr and "edit --json" in result.stderr
        assert "a plain state dict, as edit writes" not in result.stderr  # a training checkpoint was called one


def test_unreadable_outputs_name_the_command_that_writes_them_again(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """A truncated factors or scores file: the hint names the command that writes it again, not a flag of this one."""
    out, _ = fitted
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / FACTORS).write_bytes((out / FACTORS).read_bytes()[:3000])
    sets = ["--set", f"output_dir={broken}"]
    for command in (["compute-scores", DIGITS, "--overwrite"], ["spectrum", DIGITS]):
        result = invoke(runner, *command, *sets)
        assert_clean_error(result, EXIT["output"], "is not a readable safetensors file")
        assert "hint: refit with `influence fit-factors CONFIG --overwrite`" in result.stderr
    (broken / "scores.safetensors").write_bytes(b"\x08" + bytes(20))
    result = invoke(runner, "top-k", DIGITS, *sets)
    assert "hint: rerun `influence compute-scores CONFIG --overwrite`" in result.stderr, result.stderr


# ----------------------------------------------------------------------------- the console script


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    from influence_cli.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["top-k", str(DIGITS), "--kk", "3"], "No such option: --kk"),
        (["top-k", str(DIGITS), "--k", "abc"], "Invalid value for '--k'"),
        (["top-k"], "Missing argument 'CONFIG'"),
        (["no-such-command"], "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_are_one_line_with_the_help_command(capsys, argv, needle):
    code, out, err = run_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 2, err
    assert lines[0].startswith("usage error: ") and needle in lines[0]
    assert lines[1].startswith("hint: influence") and "--help" in lines[1]


def test_debug_works_after_the_command_too(capsys):
    code, _, err = run_main(capsys, "inspect", str(DIGITS), "--set", "data.batch_size=0", "--debug")
    assert code == 2 and "config error" in err and "Traceback" in err
    code, _, err = run_main(capsys, "inspect", str(DIGITS), "--set", "data.batch_size=0")
    assert code == 2 and "Traceback" not in err


def test_sigterm_outside_an_import_stops_like_ctrl_c(monkeypatch):
    import importlib

    app_mod = importlib.import_module("influence_cli.cli.app")  # the module (influence_cli.cli.app is also the Typer app's name)

    monkeypatch.setitem(app_mod._TERMINATED, "hit", False)
    assert not app_mod._importing_an_extension()
    with pytest.raises(app_mod.Terminated):
        app_mod._on_sigterm(15, None)
    assert app_mod._TERMINATED["hit"]  # main() then exits 143 even if click turned it into its own abort


def test_sigterm_during_an_import_stops_cleanly_unless_a_compiled_package_is_half_imported(monkeypatch):
    """A pure-Python import (rich's, while a summary prints after the output was saved) is interrupted like
    any code; one of torch's gets the signal's own exit, as cleanup could trip over half-imported torch."""
    import importlib
    import signal
    import types

    app_mod = importlib.import_module("influence_cli.cli.app")
    monkeypatch.setitem(app_mod._TERMINATED, "hit", False)
    spec = types.SimpleNamespace(_initializing=True)
    monkeypatch.setitem(sys.modules, "rich._being_imported", types.SimpleNamespace(__spec__=spec))
    with pytest.raises(app_mod.Terminated):
        app_mod._on_sigterm(15, None)
    monkeypatch.setitem(sys.modules, "torch._being_imported", types.SimpleNamespace(__spec__=spec))
    calls = []
    monkeypatch.setattr(signal, "signal", lambda *args: calls.append(("signal", *args)))
    monkeypatch.setattr(app_mod.os, "kill", lambda *args: calls.append(("kill", *args)))
    app_mod._on_sigterm(15, None)
    assert calls == [("signal", signal.SIGTERM, signal.SIG_DFL), ("kill", app_mod.os.getpid(), signal.SIGTERM)]


def test_tables_survive_odd_terminals(tmp_path: Path, monkeypatch):
    """A non-UTF-8 stdout prints '?' for λ or ×, a non-numeric COLUMNS is ignored, and a pipe gets
    tables at their natural width (rich would assume 80 columns and cut the headers)."""
    import subprocess
    import sys

    from influence_cli.cli import render

    root = Path(__file__).resolve().parents[1]
    for encoding in ("ascii", "latin-1"):
        env = {**os.environ, "PYTHONIOENCODING": encoding, "COLUMNS": "abc", "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-m", "influence_cli", "inspect", str(root / "configs" / "digits.yaml")],
            capture_output=True, env=env, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode(errors="replace")
        assert b"fc1" in out.stdout
    import io

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a pipe or file: not a terminal
    assert render._columns() == 10_000
    monkeypatch.setenv("COLUMNS", "abc")
    assert render._columns() == 10_000  # ignored: stdout is still not a terminal
    monkeypatch.setenv("COLUMNS", "57")
    assert render._columns() == 57


def test_numbers_stay_whole_in_a_narrow_terminal(tmp_path: Path, monkeypatch):
    """Text cells fold between words; a number never folds (a folded "+3599 / 3" reads as another number) and is
    never cut: a table that cannot fit so is drawn as records, one "column: value" line each, never wider than
    the terminal (which would wrap every line of the grid)."""
    from influence_cli.cli import render

    for width in (24, 30, 40, 120):
        table = render.new_table("scores", [("kind", "left"), ("train index", "right"), ("influence", "right")])
        for row in (("proponent", "1495", "+35993"), ("opponent", "77", "-0.00012345")):
            table.add_row(*row)
        monkeypatch.setenv("COLUMNS", str(width))
        out = io.StringIO()
        monkeypatch.setattr("sys.stdout", out)
        render.print_table(table)
        lines = out.getvalue().splitlines()
        for number in ("1495", "+35993", "-0.00012345"):
            assert any(number in line for line in lines), (width, lines)
        assert all(len(line) <= width for line in lines), (width, lines)
        if width < 35:  # its words and numbers alone need 35 columns as a grid
            assert lines[1:] == ["kind: proponent", "  train index: 1495", "  influence: +35993",
                                 "kind: opponent", "  train index: 77", "  influence: -0.00012345"], lines  # fmt: skip
        else:
            assert all(line.endswith(("│", "┃", "┓", "┩", "┘", "┛", "┤")) for line in lines[1:]), lines
            assert any("proponent" in line for line in lines), lines


def _printed(table, width: int, monkeypatch) -> list[str]:
    from influence_cli.cli import render

    monkeypatch.setenv("COLUMNS", str(width))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    render.print_table(table)
    return out.getvalue().splitlines()


PRINTED_TABLES = Path(__file__).parent / "printed_tables.txt"  # as print_table drew them while rich measured every cell itself


def printed_tables(monkeypatch) -> str:
    """A ranking's table, one with a "layers" column of long layer names (compute-scores --by-layer), and one with
    long paths, each printed to a pipe and at 200 to 30 columns: as they are, narrowed, or as records."""
    from rich.text import Text

    from influence_cli.cli import render
    from influence_cli.cli.scores import _ranking_table
    from influence_cli.topk import RankedExample

    names = [f"backbone.encoder.layer{i}.{b}.conv{c}" for i in (1, 4) for b in (0, 1) for c in (1, 2)] + ["fc"]
    head = [("", "left"), ("rank", "right"), ("train index", "right"), ("label", "left"), ("influence", "right")]

    def ranking(layers: bool):
        rows = []
        for side, sign in (("proponent", 1), ("opponent", -1)):
            for rank in range(1, 4):
                parts = {name: sign * (i % 5 - 1.5 + rank) / 7 for i, name in enumerate(names)}
                score = sum(parts.values())
                e = RankedExample(rank, 1000 * rank + 7, rank, f"class {rank} (a longer class name)", score, parts if layers else None)
                rows.append(([Text(side, style="green" if sign > 0 else "red"), str(rank), str(e.train_index), e.train_label, f"{score:+.5g}"], e))
        return _ranking_table("query 3 · index 103 · label 1 (one) · predicted 7 (seven)", head, rows, 3, layers)

    def paths():
        table = render.new_table("files", [("name", "left"), ("path", "left"), ("size", "right")])
        table.add_row("factors", "/home/someone/experiments_with_a_long_name/run_0042/factors.safetensors", "41,234,112")
        table.add_row("scores", "/home/someone/experiments_with_a_long_name/run_0042/scores_shard_00003.safetensors", "-3")
        return table

    blocks = []
    for columns in (None, 200, 120, 100, 80, 60, 40, 30):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", str(columns))
        for name, make in (("ranking", lambda: ranking(False)), ("layers", lambda: ranking(True)), ("paths", paths)):
            out = io.StringIO()
            monkeypatch.setattr("sys.stdout", out)
            render.print_table(make())
            blocks.append(f"=== {name} at {columns or 'a pipe'}\n{out.getvalue()}")
    return "".join(blocks)


def test_tables_print_as_they_did_while_rich_measured_every_cell_again(monkeypatch):
    """print_table gives rich the widths it measured (the natural ones where the table fits), and a ranking's
    table with its "layers" column is measured once for record_room and print_table together: the same
    bytes as before, in every layout, and rich measures no cell after print_table laid the table out."""
    from rich.table import Table

    from influence_cli.cli import render

    laid_out, late, inside = [], [], []
    column_widths, measure_column = render._column_widths, Table._measure_column

    def counted(console, table):
        laid_out.append(table)
        inside.append(True)
        try:
            return column_widths(console, table)
        finally:
            inside.pop()

    def measured(self, console, options, column):
        if not inside and laid_out and self is laid_out[-1] and column.width is None:
            late.append(column.header)
        return measure_column(self, console, options, column)

    monkeypatch.setattr(render, "_column_widths", counted)
    monkeypatch.setattr(Table, "_measure_column", measured)
    assert printed_tables(monkeypatch) == PRINTED_TABLES.read_text(encoding="utf-8")
    assert late == []
    laid_out.clear()
    monkeypatch.setenv("COLUMNS", "200")
    from influence_cli.cli.scores import _ranking_table
    from influence_cli.topk import RankedExample

    e = RankedExample(1, 7, 7, 3, 0.5, {"fc1": 0.25, "fc2": 0.25})
    render.print_table(_ranking_table("query 0", [("", "left"), ("influence", "right")], [(["proponent", "+0.5"], e)], None, True))
    assert len(laid_out) == 2  # the other columns alone (room_beside), then the whole table once


def test_a_path_longer_than_a_record_line_folds_in_a_two_column_grid(monkeypatch):
    """A two-column table (info's) is drawn as "name: value" lines where they show whole a token the grid would
    fold (a path on a line of its own, which a terminal lets one copy); a path longer than such a line folds in
    them too, so it folds in the grid instead, as it did, where the grid's other tokens fit whole."""
    from influence_cli.cli import render

    def info(path: str):
        table = render.new_table("edited.safetensors", [("field", "left"), ("value", "left")])
        table.add_row("factors", path)
        table.add_row("format", "influence_cli.edited_checkpoint/1")
        return table

    long = "/home/someone/" + "experiments_with_a_long_name/" * 5 + "factors.safetensors"  # 178 characters
    for width in (60, 80, 120):
        lines = _printed(info(long), width, monkeypatch)
        assert lines[1].startswith("┏") and all(len(line) <= width for line in lines), (width, lines)
        assert long in "".join(line.split("│")[2].strip() for line in lines if line.startswith("│")), lines
    assert _printed(info(long), 40, monkeypatch)[1:4] == ["field: value", "factors:", f"  {long[:38]}"]  # format's value does not fit
    short = "/home/someone/experiments/digits_mlp_sweep_with_damping/factors.safetensors"  # 75: whole on a record's line
    assert _printed(info(short), 80, monkeypatch)[1:] == ["field: value", "factors:", f"  {short}", "format: influence_cli.edited_checkpoint/1"]


def test_a_record_key_wider_than_the_terminal_wraps(monkeypatch):
    """A record's key longer than its line (COLUMNS=20, the narrowest) wraps between words, its value below it:
    no line wider than the terminal."""
    from influence_cli.cli import render

    table = render.new_table("scores", [("", "left"), ("train index", "right"), ("relative influence", "right")])
    table.add_row("proponent", "1288", "+7.0562")
    assert _printed(table, 20, monkeypatch)[1:] == ["proponent", "  train index: 1288", "  relative", "  influence:", "    +7.0562"]


def test_a_right_justified_cell_is_measured_as_written(monkeypatch):
    """Tables are printed without markup, so a class name in brackets ("[draft]", "[/x]") is as wide as written:
    the cell stays whole in a narrow terminal (it was measured without its "tag", or raised MarkupError)."""
    from influence_cli.cli import render

    table = render.new_table("examples", [("rank", "right"), ("label", "right"), ("note", "left")])
    table.add_row("1", "3 ([draft])", "a long note that folds between its words")
    table.add_row("2", "7 ([/x])", "another")
    monkeypatch.setenv("COLUMNS", "30")
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    render.print_table(table)
    lines = out.getvalue().splitlines()
    assert any("3 ([draft])" in line for line in lines) and any("7 ([/x])" in line for line in lines), out.getvalue()
    assert all(len(line) <= 30 for line in lines[1:]), out.getvalue()


BOX = tuple("┏┃┡│├└")  # the first character of a table's lines


def test_tables_fold_their_text_to_keep_to_the_terminal(fitted: tuple[Path, Result], tmp_path: Path):
    """A table whose text cells can fold between words is drawn within the terminal's width (a header "train
    index" on two lines), its numbers whole; at 120 columns the usual tables are drawn at their own width, as
    before. inspect's and info's tables, whose words (info's `created`, to the microsecond) do not fit in 50 columns,
    are drawn as records there."""
    out, _ = fitted
    sets = ["--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}"]
    assert invoke(CliRunner(env={"COLUMNS": "120"}), "compute-scores", DIGITS, *sets).exit_code == 0
    commands = [("top-k", DIGITS, *sets, "--query", "0"), ("inspect", DIGITS),
                ("info", out / FACTORS), ("info", tmp_path / "scores.safetensors")]  # fmt: skip
    for width in (50, 80, 120):
        runner = CliRunner(env={"COLUMNS": str(width), "INFLUENCE_DEBUG": None, "RANK": None})
        for args in commands:
            result = invoke(runner, *args)
            assert result.exit_code == 0, (args, result.stderr)
            table = [line for line in result.stdout.splitlines() if line.startswith(BOX)]
            assert all(len(line) <= width for line in table), (width, args, result.stdout)
            records = {"inspect": "layer: fc1", "info": "created: "}  # their words do not fit in 50 columns: records
            assert table or (width == 50 and records.get(args[0], "\0") in result.stdout), (width, args, result.stdout)
            if args[0] == "inspect":
                assert all(shape in result.stdout for shape in ("64×64", "32×64", "10×32")), result.stdout  # shapes never fold
            if args[0] == "top-k":
                assert len(table[0]) == min(width, 54), (width, result.stdout)  # folded to 50; else its own width
                assert all(number in result.stdout for number in ("+35993", "-33772", "1495"))


def test_edits_shapes_never_fold(fitted: tuple[Path, Result], tmp_path: Path):
    """edit's [W | b] column keeps a shape on one line in a narrow terminal ("6" / "4" / "×" / "6" / "5" read as
    numbers of their own); the table is drawn as records where its numbers and shapes do not fit a grid."""
    out, _ = fitted
    sets = ["--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}"]
    runner = CliRunner(env={"COLUMNS": "50", "INFLUENCE_DEBUG": None, "RANK": None})
    result = invoke(runner, "edit", DIGITS, *sets, "--out", tmp_path / "edited.safetensors")
    assert result.exit_code == 0, result.stderr
    assert all(shape in result.stdout for shape in ("64×65", "32×65", "10×33")), result.stdout
    assert all(number in result.stdout for number in ("4,160", "2,080", "330")), result.stdout


def _words(text: str) -> set[str]:
    """The words of a command's stdout, without a table's borders or the colon after a record's key."""
    return {word.removesuffix(":") for word in re.sub(r"[\u2500-\u257f]", " ", text).split()}


def test_narrow_terminals_break_no_word(fitted: tuple[Path, Result], tmp_path: Path):
    """At 40 and 60 columns every table-printing command shows the words of its 200-column tables, none broken
    ("pro" / "pon" / "ent" was what a squeezed grid showed) and none left out, in lines that fit the terminal
    (a grid whose words do not fit is drawn as records); the one exception: a grid's "layers" column names
    fewer layers where its room is short (`fitted_layer_shares`). --json is the same at any width."""
    out, _ = fitted
    sets = ["--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}"]
    refit = ["--set", f"output_dir={tmp_path / 'fit'}", "--overwrite"]
    runners = {width: CliRunner(env={"COLUMNS": str(width), "INFLUENCE_DEBUG": None, "RANK": None}) for width in (200, 40, 60)}
    for args in (("compute-scores", DIGITS, *sets, "--self"), ("dataset-similarity", DIGITS, *sets), ("spectrum", DIGITS, *sets)):
        assert invoke(runners[200], *args).exit_code == 0, args  # written once; the others read them back, tables and all
    commands = [("fit-factors", DIGITS, *refit), ("compute-scores", DIGITS, *sets, "--by-layer", "--overwrite"),
                ("inspect", DIGITS), ("info", out / FACTORS), ("info", tmp_path / "scores.safetensors"),
                ("top-k", DIGITS, *sets, "--query", "0:2"), ("top-k", DIGITS, *sets, "--self"),
                ("dataset-similarity", DIGITS, *sets), ("spectrum", DIGITS, *sets)]  # fmt: skip
    for args in commands:
        wide = invoke(runners[200], *args)
        assert wide.exit_code == 0 and "┃" in wide.stdout, (args, wide.stderr)
        if args[0] == "top-k" and "--self" not in args:
            assert "fc1 66% · fc2 22% · head 12%" in wide.stdout, wide.stdout  # the layers of the scores --by-layer
        for width in (40, 60):
            result = invoke(runners[width], *args)
            assert result.exit_code == 0, (width, args, result.stderr)
            shown, expected = _words(result.stdout), _words(wide.stdout)
            assert shown <= expected, (width, args, sorted(shown - expected), result.stdout)  # no word broken
            missing = expected - shown
            if args[0] == "top-k" and "--self" not in args and width == 60:
                assert missing <= {"·", "fc1", "fc2", "head"} | {w for w in missing if w.endswith("%")}, (missing, result.stdout)
            else:
                assert not missing, (width, args, sorted(missing), result.stdout)  # nothing left out
            kept = set(wide.stdout.splitlines())  # titles and lines of text: one line each, as on a pipe
            assert all(cell_len(line) <= width for line in result.stdout.splitlines() if line not in kept), (width, args, result.stdout)
    at_40 = invoke(runners[40], "top-k", DIGITS, *sets, "--query", "0").stdout  # a record's line has room for every layer
    assert "proponent\n  rank: 1\n  train index: 485\n  label: 1\n  influence: +35993\n  layers: fc1 66% · fc2 22% · head 12%\n" in at_40
    json_args = ("top-k", DIGITS, *sets, "--query", "0", "--json")
    assert invoke(runners[40], *json_args).stdout == invoke(runners[200], *json_args).stdout


def test_a_long_title_is_one_line_on_a_pipe(monkeypatch):
    from influence_cli.cli import render

    title = "identity: no curvature to fit (scores are plain gradient dot products)"
    table = render.new_table(title, [("layer", "left"), ("A", "right")])
    table.add_row("fc1", "-")
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)  # a pipe: tables at their natural width, titles whole
    render.print_table(table)
    assert out.getvalue().splitlines()[0] == title


def test_results_print_literally(monkeypatch):
    """A path with "[/b]" or a class folder named "[cat]" is not rich markup (it used to vanish or crash)."""
    from influence_cli.cli import render

    table = render.new_table("/tmp/we[/b]ird/factors.safetensors", [("label", "left"), ("n", "right")])
    table.add_row("3 ([cat])", "1")
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    render.print_table(table)
    assert "/tmp/we[/b]ird/factors.safetensors" in out.getvalue() and "3 ([cat])" in out.getvalue()


def test_under_torchrun_rank_0_alone_says_what_every_rank_meets_and_prints_one_process_results(tmp_path: Path, capsys, monkeypatch):
    """A config error or an existing output is the same on every rank: the other ranks exit with its
    code silently; top-k, inspect and info run on rank 0 only."""
    rank1 = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": "1", "WORLD_SIZE": None})
    result = invoke(rank1, "inspect", DIGITS, "--set", "data.batch_size=0")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")  # not run on rank 1
    result = invoke(rank1, "top-k", DIGITS, "--set", "data.batch_size=0")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    from influence_cli.cli.app import report_error
    from influence_cli.errors import ConfigError, DataError, OutputError

    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert report_error(ConfigError("data.batch_size: must be > 0")) == 2
    assert report_error(OutputError("'x' already holds factors").everywhere()) == 5
    assert capsys.readouterr().err == ""  # rank 0 says these for the job
    assert report_error(DataError("data.train: example 7 is NaN")) == 3  # about this rank's shard: said here
    assert "[rank 1] data error: data.train: example 7 is NaN" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report_error(DataError("data.train: example 3 is NaN"))  # rank 0's own shard: said as rank 0's, not the job's
    assert "[rank 0] data error: data.train: example 3 is NaN" in capsys.readouterr().err
    report_error(ConfigError("data.batch_size: must be > 0"))
    assert capsys.readouterr().err.startswith("config error: ")
    monkeypatch.setenv("WORLD_SIZE", "1")
    report_error(DataError("data.train: example 3 is NaN"))
    assert capsys.readouterr().err.startswith("data error: ")


def test_a_closed_stdout_exits_141_like_a_shell_pipe(runner: CliRunner, tmp_path: Path):
    """`influence top-k ... | head -1`: the reader goes away, the command stops quietly with 128 + SIGPIPE."""
    sets = ["--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 400]"]
    for command in ("fit-factors", "compute-scores"):
        assert invoke(runner, command, DIGITS, *sets).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "influence_cli", "top-k", str(DIGITS), *sets, "--k", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err
    proc = subprocess.Popen([sys.executable, "-m", "influence_cli", "compute-scores", str(DIGITS), *sets, "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**env, "COLUMNS": "60"})  # fmt: skip
    assert proc.stderr is not None
    proc.stderr.close()  # stderr's reader gone (`2>&1 | head -1`): the same exit
    assert proc.wait(timeout=120) == 141


def test_json_larger_than_the_pipe_into_a_reader_that_leaves_exits_141(runner: CliRunner, tmp_path: Path):
    """`top-k --json | head -c 10`: a write of megabytes ended short without an error through Python's stdout, exit 0."""
    sets = ["--set", f"output_dir={tmp_path}", "--set", "data.train.range=[0, 400]"]
    for command in ("fit-factors", "compute-scores"):
        assert invoke(runner, command, DIGITS, *sets).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "influence_cli", "top-k", str(DIGITS), *sets, "--k", "200", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.read(10).startswith(b'{')
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_stdout_and_stderr_that_cannot_be_written(fitted: tuple[Path, Result], tmp_path: Path):
    """A full disk under stdout is an output error (exit 5), not a traceback; a closed stdout is refused before any work
    (the results would vanish); a full disk under stderr only loses the messages: the run completes."""
    out, _ = fitted
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    influence = [sys.executable, "-m", "influence_cli"]
    for args in (["info", str(out / FACTORS)], ["info", str(out / FACTORS), "--json"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run([*influence, *args], stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        assert done.returncode == EXIT["output"], done.stderr
        assert done.stderr.startswith("output error: cannot write the results to stdout (No space left on device)"), done.stderr
        assert "Traceback" not in done.stderr
    for args in (["--version"], ["--help"], ["top-k", "--help"]):  # what typer prints itself
        with open("/dev/full", "w") as full:
            done = subprocess.run([*influence, *args], stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        assert done.returncode == EXIT["output"] and done.stderr.startswith("output error: cannot write the results"), (args, done.stderr)
    closed = subprocess.run(["bash", "-c", '"$0" -m influence_cli info "$1" >&-', sys.executable, str(out / FACTORS)],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert closed.returncode == EXIT["output"] and closed.stderr.startswith("output error: stdout is closed"), closed.stderr
    with open("/dev/full", "w") as full:
        done = subprocess.run([*influence, "fit-factors", str(DIGITS), "--set", f"output_dir={tmp_path}"],
                              stdout=subprocess.DEVNULL, stderr=full, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0 and (tmp_path / FACTORS).is_file()


def test_version_into_a_closed_pipe_exits_141():
    """click's echo turned the reader gone into exit 1."""
    done = subprocess.run(["bash", "-c", '"$0" -m influence_cli --version | (exec 0<&-; sleep 1); exit "${PIPESTATUS[0]}"', sys.executable],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize("columns", ["0", "-5", "4"])
def test_a_columns_that_is_no_width_is_ignored(monkeypatch, columns: str):
    """COLUMNS=0 dropped inspect's summary line from a pipe, and COLUMNS=4 split its numbers."""
    from influence_cli.cli import render

    monkeypatch.setenv("COLUMNS", columns)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    render.print_line("3 layers, factors 84.4 KiB in float32; 6,570 of 6,570 parameters tracked")
    assert out.getvalue() == "3 layers, factors 84.4 KiB in float32; 6,570 of 6,570 parameters tracked\n"


def test_info_shows_control_characters_of_foreign_metadata_as_escapes(runner: CliRunner, tmp_path: Path):
    """An escape sequence in a file's metadata recoloured (or cleared) the terminal."""
    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"s": "\x1b[31mred\x1b[0m", "k\x1b[2J": "v"})
    result = invoke(runner, "info", path)
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\\x1b[31mred\\x1b[0m" in result.stdout and "k\\x1b[2J" in result.stdout


def test_a_model_too_large_for_the_machine_is_out_of_memory(runner: CliRunner):
    """Building it failed as a model error (exit 4), with no hint."""
    result = invoke(runner, "inspect", DIGITS, "--set", "model.checkpoint=null", "--set", "model.kwargs.hidden=[1000000000000000, 32]")
    assert result.exit_code == 8, result.stderr
    assert result.stderr.startswith("out of memory: the host ran out of memory")
    assert "hint: building built-in 'mlp' with these model.kwargs needs more memory than this machine has" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["fit-factors", "--help"]])
def test_help_into_a_closed_pipe_exits_141(args: list[str]):
    """`influence --help | true`: typer's own help console stops the same way as the commands' output."""
    proc = subprocess.Popen([sys.executable, "-m", "influence_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # gone before the help is written (python takes far longer to start)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err


def test_the_cli_starts_without_importing_torch():
    """`influence --help` and usage errors answer at once: torch (seconds to import) loads only when a command runs."""
    code = "import sys; from influence_cli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "error,where",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"), "GPU"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), "host"),
        (MemoryError(), "host"),
    ],
)
def test_out_of_memory_is_one_line_with_the_settings_to_lower(runner, tmp_path, monkeypatch, error, where):
    import influence_cli.fit as fit

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(fit, "fit_factors", exhausted)
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 8, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"out of memory: the {where} ran out of memory"), result.stderr
    assert lines[1].startswith("hint: lower data.batch_size") and "--resume" in lines[1]


def test_out_of_memory_in_the_passes_names_the_largest_factors(runner, tmp_path, monkeypatch):
    """fit-factors out of memory while fitting: the hint says how large the factors are and which layer holds most of them."""
    import influence_cli.fit as fit

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB")

    monkeypatch.setattr(fit, "compute_factors", exhausted)
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 8, result.stderr
    hint = " ".join(result.stderr.split()).partition("hint: ")[2]
    assert hint.startswith("the factors take 84.4 KiB in float32, layer 'fc1' 49.3 KiB of it (A 65², G 64², eigendecomposed in float64): a smaller data.batch_size")
    assert "leave large layers out of factors.modules" in hint and "--resume" in hint
    # factors of a GiB or more are the likely cause: leaving layers out comes first
    large = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--set", "model.checkpoint=null", "--set", "model.kwargs.hidden=[16384]")
    assert large.exit_code == 8, large.stderr
    hint = " ".join(large.stderr.split()).partition("hint: ")[2]
    assert hint.startswith("the factors take 2.0 GiB in float32, layer 'fc1' 1.0 GiB of it (A 65², G 16,384², eigendecomposed in float64): leave large layers out"), hint


def test_a_factor_as_wide_as_a_large_vocabulary_gets_a_warning(runner):
    """A G of 32,768² (a vocabulary's output head) is 4 GiB in float32 and twice that in its float64 eigendecomposition:
    inspect (which never runs the model) warns, naming the widest factor; 32,767 wide passes without a word."""
    sets = ["--set", "model.checkpoint=null"]
    wide = invoke(runner, "inspect", DIGITS, *sets, "--set", "model.kwargs.hidden=[32768]")
    assert wide.exit_code == 0, wide.stderr
    assert " ".join(wide.stderr.split()) == (
        "warning: 2 layers have factors 32,768 or more wide; the widest, 'head', has an A of 32,769² (4.0 GiB in float32; "
        "fit-factors eigendecomposes it in float64, 8.0 GiB, in time growing as its width cubed): with a large vocabulary, leave the output head out of factors.modules "
        "(`influence inspect` lists the layers), or fit on a machine with that memory"
    )
    narrow = invoke(runner, "inspect", DIGITS, *sets, "--set", "model.kwargs.hidden=[32766]")
    assert narrow.exit_code == 0 and narrow.stderr == "", narrow.stderr
    diagonal = invoke(runner, "inspect", DIGITS, *sets, "--set", "model.kwargs.hidden=[32768]", "--set", "factors.strategy=diagonal")
    assert diagonal.exit_code == 0 and diagonal.stderr == "", diagonal.stderr


def test_fit_factors_warns_of_a_factor_as_wide_as_a_large_vocabulary(runner, tmp_path, monkeypatch):
    """fit-factors says it before its passes (the threshold lowered to the digits MLP's widths, which it then fits)."""
    import influence_cli.fit as fit

    monkeypatch.setattr(fit, "LARGE_FACTOR_SIDE", 65)
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}")
    assert result.exit_code == 0, result.stderr
    assert "warning: 2 layers have factors 65 or more wide; the widest, 'fc1', has an A of 65² (16.5 KiB in float32;" in " ".join(result.stderr.split())


def test_json_output_has_no_nan_or_infinity(capsys):
    """Strict parsers (JavaScript, Go, serde) reject NaN: an empty band's ratio and the like print as null."""
    from influence_cli.cli.render import print_json

    print_json({"ratio": {"middle": float("nan"), "top": 0.25}, "bounds": [float("inf"), -float("inf"), 1.0], "n": 3})
    text = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(constant)

    assert json.loads(text, parse_constant=refuse) == {"ratio": {"middle": None, "top": 0.25}, "bounds": [None, None, 1.0], "n": 3}


def test_queries_with_a_zero_gradient_are_warned(runner, fitted, tmp_path):
    """Unscaled inputs saturate the softmax: the query loss's gradient is exactly 0, and so is every score."""
    out = tmp_path
    (out / FACTORS).write_bytes((fitted[0] / FACTORS).read_bytes())
    result = invoke(runner, "compute-scores", DIGITS, "--set", f"output_dir={out}", "--set", "data.query.transform.scale=0.0001",
                    "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stderr.split())
    assert "warning: data.query: the gradient of the query loss is exactly 0 for " in text and "transform.scale: 255" in text
    assert "warning" not in invoke(runner, "compute-scores", DIGITS, "--set", f"output_dir={out}", "--overwrite").stderr
    # under torchrun rank 0 says it (the next test); a RANK without its WORLD_SIZE is refused, not run as a silent rank
    rank1 = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": "1", "WORLD_SIZE": None})
    result = invoke(rank1, "compute-scores", DIGITS, "--set", f"output_dir={out}", "--set", "data.query.transform.scale=0.0001", "--overwrite")
    assert result.exit_code == 7 and "RANK=1 and WORLD_SIZE=1" in result.stderr and "exactly 0" not in result.stderr


def test_warnings_under_torchrun_come_from_rank_0_or_from_the_rank_whose_shard_they_are_about():
    import logging

    from influence_cli.cli.render import WarningPrinter

    records = [logging.LogRecord("influence_cli", logging.WARNING, "", 0, msg, None, None) for msg in ("global", "shard")]
    records[1].per_rank = True
    for rank, expected in ((0, ["warning: global", "warning: shard"]), (1, ["[rank 1] warning: shard"])):
        printer = WarningPrinter(rank)
        with err_console.capture() as captured:
            for record in records:
                printer.emit(record)
                printer.emit(record)  # each once
        assert captured.get().splitlines() == expected


def test_metadata_text_of_earlier_versions_stays_text(tmp_path: Path):
    """Earlier versions stored fingerprints and keys as they are, "1234567890123456" too: read back as text."""
    from safetensors.torch import save_file as save_raw

    from influence_cli import storage

    save_raw({"t": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"model_fingerprint": "1234567890123456", "result_key": "12e45", "n": "5"})
    meta = storage.read_metadata(tmp_path / "old.safetensors")
    assert meta == {"model_fingerprint": "1234567890123456", "result_key": "12e45", "n": 5}


def test_progress_titles_print_as_written(capsys):
    """A dataset named "a:fire:" or "[/]" (similarity.datasets) is a bar's title: no emoji, no markup error."""
    from influence_cli.cli.render import RichProgress

    bar = RichProgress()
    bar.start("a:fire: [/] b", 1)
    bar.advance(1)
    bar.stop()
    assert "a:fire: [/] b" in capsys.readouterr().err


def test_progress_bars_in_a_log_keep_their_numbers(monkeypatch):
    """A log (stderr a file) was drawn at 80 columns: after a long title the counts and rates were cut ("4352/…")."""
    from influence_cli.cli import render

    monkeypatch.setenv("COLUMNS", "80")
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = render.RichProgress()
    bar.start("scores train 0..4,352 (query chunk 1/28) (rank 0 of 2)", 4352)
    bar.advance(4352)
    bar.stop()
    assert "4352/4352" in log.getvalue() and "eta 0:00:00" in log.getvalue() and "…" not in log.getvalue(), log.getvalue()
    assert render._MessagesConsole(file=render.MESSAGES).width >= render.LOG_COLUMNS  # COLUMNS exported before the console existed


@pytest.mark.parametrize("columns", ["0", "4"])
def test_a_columns_that_is_no_width_does_not_swallow_messages(monkeypatch, columns: str):
    """COLUMNS=0 left stderr empty, the error message too: rich drew every line at that width."""
    from influence_cli.cli import render

    monkeypatch.setenv("COLUMNS", columns)
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    render._MessagesConsole(file=render.MESSAGES, soft_wrap=True).print("config error: data.batch_size: must be > 0, got 0")
    assert log.getvalue() == "config error: data.batch_size: must be > 0, got 0\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_results_in_an_encoding_with_a_byte_order_mark_carry_one(monkeypatch, tmp_path: Path, encoding: str):
    """Each write encoded on its own started with a byte-order mark of its own: four marks for two tables."""
    from influence_cli.cli import render

    path = tmp_path / "out.txt"
    with open(path, "w", encoding=encoding) as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        render.write_results("query 0\n")
        render.write_results("query 1 · λ\n")
        monkeypatch.undo()
    assert path.read_text(encoding=encoding) == "query 0\nquery 1 · λ\n"


def test_results_name_files_that_are_not_utf8_by_their_bytes(monkeypatch, tmp_path: Path):
    """A file name from another system's encoding (b"\\xff.png", read as a surrogate) stopped the command: "surrogates not allowed"."""
    from influence_cli.cli import render

    path = tmp_path / "out.txt"
    with open(path, "w", encoding="utf-8") as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        render.write_results(os.fsdecode(b"cat/\xff.png") + "\n")
        monkeypatch.undo()
    assert path.read_bytes() == b"cat/\xff.png\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_results_name_files_that_are_not_utf8_on_a_stdout_without_a_descriptor(monkeypatch, encoding: str):
    """Written through sys.stdout (a test runner's buffer; an encoding with a byte-order mark), such a name raised
    "surrogates not allowed": its bytes go through the stream's buffer, or in UTF-16 (whose text they are not) its escape."""
    from influence_cli.cli import render

    raw = io.BytesIO()  # no descriptor
    stdout = io.TextIOWrapper(raw, encoding=encoding)
    monkeypatch.setattr("sys.stdout", stdout)
    render.write_results("λ 0\n")
    render.write_results(os.fsdecode(b"cat/\xff.png") + "\n")
    stdout.flush()
    monkeypatch.undo()
    expected = "λ 0\ncat/\\udcff.png\n".encode(encoding) if encoding == "utf-16" else "λ 0\n".encode() + b"cat/\xff.png\n"
    assert raw.getvalue() == expected


def test_help_with_a_columns_that_is_no_width():
    """typer's own help console read COLUMNS=0 too, and printed nothing."""
    done = subprocess.run([sys.executable, "-m", "influence_cli", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "0"})  # fmt: skip
    assert done.returncode == 0 and "Usage: influence" in done.stdout and "fit-factors" in done.stdout, done.stdout


def test_results_wait_for_a_non_blocking_stdout(monkeypatch):
    """A non-blocking pipe (set by a parent process) refused the rest of a large write: the JSON ended at 64 KiB."""
    import fcntl
    import threading

    from influence_cli.cli import render

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETFL, fcntl.fcntl(write_end, fcntl.F_GETFL) | os.O_NONBLOCK)
    text = "x" * 1_000_000 + "\n"
    got = bytearray()

    def reader() -> None:
        while chunk := os.read(read_end, 65536):
            got.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    with os.fdopen(write_end, "w") as stdout:
        monkeypatch.setattr("sys.stdout", stdout)
        render.write_results(text)
        monkeypatch.undo()
    thread.join(timeout=60)
    os.close(read_end)
    assert got.decode() == text


@pytest.mark.parametrize(
    ("command", "name"),
    [("fit-factors", "factors.partial.safetensors"), ("compute-scores", "scores.partial.safetensors"),
     ("compute-scores", "scores.shard-00000.safetensors"), ("compute-scores --self", "scores.partial.self.safetensors"),
     ("dataset-similarity", "similarity.partial.safetensors")],
)  # fmt: skip
def test_a_fifo_or_folder_at_a_progress_path_is_refused_as_that(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, name: str
):
    """A FIFO at a snapshot's or a score shard's path is never opened (a shard's blocked --resume for good, a snapshot
    was said not to exist), refused as what it is with or without --resume and removed by --overwrite; a folder there
    is refused even with --overwrite (it gave a traceback), and never removed."""
    out, _ = fitted
    path = tmp_path / name
    os.mkfifo(path)
    never_open_fifos(monkeypatch)
    args = (*command.split(), DIGITS, "--set", f"factors_dir={out}", "--set", f"output_dir={tmp_path}")
    if command == "fit-factors":
        args = (command, DIGITS, "--set", f"output_dir={tmp_path}")
    for flags in ((), ("--resume",)):
        result = invoke(runner, *args, *flags)
        line = assert_clean_error(result, EXIT["output"], f"{str(path)!r} already exists and is not a regular file (a FIFO, socket or device)")
        assert result.stderr.split(line, 1)[1].strip().endswith("or pass --overwrite to replace it")
        assert path.is_fifo()
    result = invoke(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert not path.exists()
    if "shard" in name:
        (tmp_path / "scores.safetensors").unlink()  # a shard's folder beside finished scores is no shard of theirs: left alone
    path.mkdir()
    for flags in (("--overwrite",), ("--resume",)):
        result = invoke(runner, *args, *flags)
        line = assert_clean_error(result, EXIT["output"], f"{str(path)!r} is a folder, not a file")
        assert result.stderr.split(line, 1)[1].strip().endswith("or move that folder away")
        assert path.is_dir()


@pytest.mark.parametrize(
    ("command", "pattern", "output", "own"),
    [(("fit-factors",), storage.FACTORS_PARTIAL, FACTORS, ""), (("compute-scores",), storage.SCORES_PARTIAL, storage.SCORES_FILE, ""),
     (("compute-scores", "--self"), storage.SCORES_PARTIAL, storage.SELF_INFLUENCE_FILE, ""),
     (("dataset-similarity",), storage.SIMILARITY_PARTIAL, storage.SIMILARITY_FILE, ".finished0"),
     (("spectrum",), storage.SPECTRUM_PARTIAL, storage.SPECTRUM_FILE, ".finished0")],
)  # fmt: skip
def test_overwrite_refused_at_the_start_removes_nothing(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, command: tuple[str, ...], pattern: str, output: str, own: str
):
    """A folder at this run's own progress path (its snapshot, or the file of a dataset it finished) refuses --overwrite
    before anything is removed: the progress of another number of ranks (it was removed before the refusal), the temporary
    files killed writers left and the finished output are all still there. Once the folder is gone, --overwrite removes
    them all."""
    out, _ = fitted
    kind = ".self" if "--self" in command else ""
    folder = tmp_path / pattern.format(rank=kind + own)
    folder.mkdir()
    files = [pattern.format(rank=f".rank{r}{kind}") for r in (0, 1)] + [output]
    files += [f".{name}.k1ll3d.tmp" for name in (pattern.format(rank=f".rank1{kind}"), pattern.format(rank=kind), output)]
    for name in files:
        (tmp_path / name).write_bytes(b"left")
    shared = () if command[0] == "fit-factors" else ("--set", f"factors_dir={out}")
    args = (command[0], DIGITS, *command[1:], *shared, "--set", f"output_dir={tmp_path}", "--overwrite")
    result = invoke(runner, *args)
    assert_clean_error(result, EXIT["output"], f"{str(folder)!r} is a folder, not a file")
    assert {name: (tmp_path / name).read_bytes() for name in files if (tmp_path / name).is_file()} == dict.fromkeys(files, b"left")
    assert folder.is_dir()
    folder.rmdir()
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.stderr
    assert [name for name in files if (tmp_path / name).exists()] == [output]
    assert storage.file_format(tmp_path / output).startswith("influence_cli.")


@pytest.mark.parametrize(
    ("command", "pattern", "output", "extra"),
    [(("fit-factors",), storage.FACTORS_PARTIAL, FACTORS, ()),
     (("compute-scores",), storage.SCORES_PARTIAL, storage.SCORES_FILE, ()),
     (("compute-scores",), storage.SCORES_PARTIAL, storage.SCORES_INDEX, ("--set", "scores.max_memory_mb=0.02", "--set", "scores.query_chunk=20")),
     (("compute-scores", "--self"), storage.SCORES_PARTIAL, storage.SELF_INFLUENCE_FILE, ()),
     (("dataset-similarity",), storage.SIMILARITY_PARTIAL, storage.SIMILARITY_FILE, ()),
     (("spectrum",), storage.SPECTRUM_PARTIAL, storage.SPECTRUM_FILE, ())],
    ids=["fit-factors", "compute-scores", "sharded-scores", "self", "dataset-similarity", "spectrum"],
)  # fmt: skip
def test_overwrite_refused_at_a_first_batch_keeps_the_old_output(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...], pattern: str, output: str, extra: tuple[str, ...],
):  # fmt: skip
    """--overwrite whose first batch is refused (a data error of the first batch's checks, as for labels outside the
    model's classes) leaves the finished output (every file of it: a sharded one's shards and index) byte for byte,
    and the progress --overwrite lets go (of another number of ranks) and the temporary files killed writers left: they
    were removed in the start step, before the first batch's checks, so the refused run lost the previous result.
    Without the refusal, --overwrite replaces the output and removes them."""
    import influence_cli.passes as passes

    out, _ = fitted
    kind = ".self" if "--self" in command else ""
    shared = () if command[0] == "fit-factors" else ("--set", f"factors_dir={out}")
    args = (command[0], DIGITS, *command[1:], *shared, *extra, "--set", f"output_dir={tmp_path}")
    assert invoke(runner, *args).exit_code == 0
    finished = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert output in finished and (output != storage.SCORES_INDEX or len(finished) > 2)
    left = [pattern.format(rank=f".rank1{kind}"), f".{output}.k1ll3d.tmp"]
    for name in left:
        (tmp_path / name).write_bytes(b"left")
    checks = passes.check_outputs

    def refused(*a, **kw):
        raise DataError("data.train: label 12 of example 0 is outside the model's 10 classes", hint="keep labels 0..9")

    monkeypatch.setattr(passes, "check_outputs", refused)
    result = invoke(runner, *args, "--overwrite")
    assert_clean_error(result, EXIT["data"], "label 12 of example 0 is outside the model's 10 classes")
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished
    assert all((tmp_path / name).read_bytes() == b"left" for name in left)
    monkeypatch.setattr(passes, "check_outputs", checks)
    old = tmp_path.parent / f"{tmp_path.name}.old"
    os.link(tmp_path / output, old)  # keeps the old file's inode in use: the new output cannot reuse it
    result = invoke(runner, *args, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / output).stat().st_ino != old.stat().st_ino and not any((tmp_path / name).exists() for name in left)


@pytest.mark.parametrize("change", ["regression", "nan-checkpoint"])
def test_fit_factors_overwrite_refused_at_its_first_batch_keeps_the_factors(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, change: str
):
    """fit-factors --overwrite with a task its labels do not fit (regression on class labels: a data error) or with a
    checkpoint holding NaN (a numerical error, now met at the first batch: it was met at the end of the pass) stops
    with the finished factors as they were (they were removed before the first batch)."""
    out, _ = fitted
    shutil.copy(out / FACTORS, tmp_path / FACTORS)
    before = (tmp_path / FACTORS).read_bytes()
    if change == "regression":
        sets, code, said = ("task.kind=regression",), EXIT["data"], "data.train: regression targets of shape [] per example"
    else:
        weights = load_tensors(ROOT / "sample_data" / "mlp.safetensors")[0]
        weights = {k: v.clone() for k, v in weights.items()}
        next(iter(weights.values())).view(-1)[0] = float("nan")
        save_file(weights, str(tmp_path / "nan.safetensors"))
        sets = (f"model.checkpoint={tmp_path / 'nan.safetensors'}",)
        code, said = EXIT["numerical"], "non-finite loss or gradient in the covariance pass at batch 0"
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", *(a for s in sets for a in ("--set", s)), "--overwrite")
    assert_clean_error(result, code, said)
    assert (tmp_path / FACTORS).read_bytes() == before


def deny_removing(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Path.unlink of `denied` fails as without permission (as root, chmod cannot deny it); other paths are removed."""
    unlink = Path.unlink

    def guarded(self: Path, missing_ok: bool = False) -> None:
        if self == denied:
            raise PermissionError(1, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", guarded)


def test_progress_overwrite_cannot_remove_is_a_one_line_error(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """fit-factors --overwrite whose old snapshot cannot be removed (no permission) is an output error naming it and
    factors_dir, the key of its folder (it gave a traceback)."""
    snapshot = tmp_path / storage.FACTORS_PARTIAL.format(rank="")
    snapshot.write_bytes(b"progress")
    deny_removing(monkeypatch, snapshot)
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"factors_dir={tmp_path}", "--set", f"output_dir={tmp_path / 'out'}", "--overwrite")
    assert_clean_error(result, EXIT["output"], f"factors_dir: cannot remove {str(snapshot)!r} (Operation not permitted)")
    assert result.stderr.splitlines()[1] == "hint: remove it yourself, or set factors_dir to another place"
    assert snapshot.read_bytes() == b"progress" and not (tmp_path / FACTORS).exists()


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (("fit-factors",), storage.FACTORS_FILE),
        (("compute-scores",), storage.SCORES_FILE),
        (("compute-scores", "--self"), storage.SELF_INFLUENCE_FILE),
        (("dataset-similarity",), storage.SIMILARITY_FILE),
    ],
    ids=["fit-factors", "compute-scores", "self", "dataset-similarity"],
)
def test_overwrite_that_cannot_remove_the_old_output_is_a_one_line_error(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], name: str
):
    """--overwrite whose finished output cannot be removed (no permission) is an output error naming it, before any
    pass (it gave a traceback), and the output is kept."""
    out, _ = fitted
    factors = ("--set", f"factors_dir={out}") if command[0] != "fit-factors" else ()
    args = (*command, DIGITS, "--set", f"output_dir={tmp_path}", *factors)
    assert invoke(runner, *args).exit_code == 0
    old = tmp_path / name
    before = old.read_bytes()
    deny_removing(monkeypatch, old)
    result = invoke(runner, *args, "--overwrite")
    assert_clean_error(result, EXIT["output"], f"output_dir: cannot remove {str(old)!r} (Operation not permitted)")
    assert old.read_bytes() == before


@pytest.mark.parametrize(
    ("command", "left"),
    [
        (("dataset-similarity", "--resume"), "similarity.partial.finished1.safetensors"),  # a finished dataset's file no snapshot counts
        (("dataset-similarity", "--overwrite"), f".{storage.SIMILARITY_FILE}.killed.tmp"),  # what a killed writer of the output left
        (("compute-scores", "--self", "--overwrite"), f".{storage.SELF_INFLUENCE_FILE}.killed.tmp"),
    ],
    ids=["finished-dataset", "similarity-temp", "self-temp"],
)
def test_a_start_that_cannot_remove_what_it_replaces_is_a_one_line_error(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...], left: str
):
    """A file the start removes (a finished dataset's file no snapshot counts, a killed writer's temporary file of
    the output) that cannot be removed (no permission) is an output error naming it, and it is kept."""
    out, _ = fitted
    stray = tmp_path / left
    stray.write_bytes(b"left")
    deny_removing(monkeypatch, stray)
    result = invoke(runner, *command, DIGITS, "--set", f"output_dir={tmp_path}", "--set", f"factors_dir={out}")
    assert_clean_error(result, EXIT["output"], f"output_dir: cannot remove {str(stray)!r} (Operation not permitted)")
    assert stray.read_bytes() == b"left"


def cannot_remove(path: Path, what: str = "the progress of a finished run") -> str:
    """The warning line of a file a finished run cannot remove (no permission)."""
    return f"warning: cannot remove {str(path)!r} (Operation not permitted), {what}: the output stands; remove the file by hand"


def test_progress_beside_finished_factors_that_cannot_be_removed_is_a_warning(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """fit-factors --resume over finished factors removes the progress a kill right after the final rename left
    beside them, and a killed writer's temporary file of the factors; one that cannot be removed (no permission) is a
    warning naming it (it gave a traceback, then an error), and the factors are shown as complete."""
    out, _ = fitted
    shutil.copy(out / FACTORS, tmp_path / FACTORS)
    snapshot, temp = tmp_path / storage.FACTORS_PARTIAL.format(rank=""), tmp_path / f".{FACTORS}.k1ll3d.tmp"
    for path in (snapshot, temp):
        path.write_bytes(b"left")
        deny_removing(monkeypatch, path)
    result = invoke(runner, "fit-factors", DIGITS, "--set", f"output_dir={tmp_path}", "--resume", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed_from"] == "already complete"
    assert result.stderr.splitlines() == [cannot_remove(snapshot), cannot_remove(temp, "left by a killed writer of a finished output")]
    assert snapshot.read_bytes() == temp.read_bytes() == b"left"


def a_second_model(tmp_path: Path) -> Path:
    """A checkpoint of the digits MLP with other weights (an ensemble's second model)."""
    path = tmp_path / "member.safetensors"
    tensors = load_tensors(ROOT / "sample_data" / "mlp.safetensors")[0]
    save_file({k: v + 0.01 for k, v in tensors.items()}, path)
    return path


@pytest.mark.parametrize(
    ("command", "snapshot", "output"),
    [
        (("fit-factors",), storage.FACTORS_PARTIAL.format(rank=""), FACTORS),
        (("fit-factors",), f"members/1/{storage.FACTORS_PARTIAL.format(rank='')}", f"members/1/{FACTORS}"),
        (("compute-scores",), storage.SCORES_PARTIAL.format(rank=""), storage.SCORES_FILE),
        (("compute-scores", "--self"), storage.SCORES_PARTIAL.format(rank=".self"), storage.SELF_INFLUENCE_FILE),
        (("dataset-similarity",), storage.SIMILARITY_PARTIAL.format(rank=""), storage.SIMILARITY_FILE),
        (("spectrum",), storage.SPECTRUM_PARTIAL.format(rank=""), storage.SPECTRUM_FILE),
    ],
    ids=["fit-factors", "ensemble", "compute-scores", "self", "dataset-similarity", "spectrum"],
)
def test_a_finished_run_that_cannot_remove_its_progress_warns(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...], snapshot: str, output: str,
):  # fmt: skip
    """A run whose output is written but whose progress file cannot be removed (no permission, an immutable file)
    exits 0 with one warning naming it (it gave a traceback), its --json output as ever. With the file left: --resume
    shows the output as complete and warns again; without a flag fit-factors and compute-scores refuse the finished
    output (pass --overwrite), dataset-similarity and spectrum show it again (warning); --overwrite cannot remove it
    (an error naming it: the run would save its progress there). Once the file can be removed, --resume removes it."""
    out, _ = fitted
    sets = ["--set", f"output_dir={tmp_path}", "--set", "factors.checkpoint_every=1"]
    if "members/" in snapshot:
        sets += ["--set", f"scores.checkpoints=[{a_second_model(tmp_path)}]"]
    elif command[0] != "fit-factors":
        sets += ["--set", f"factors_dir={out}"]
    args = (command[0], DIGITS, *command[1:], *sets, "--json")
    left, path = tmp_path / snapshot, tmp_path / output
    deny_removing(monkeypatch, left)
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [cannot_remove(left)]
    assert json.loads(result.stdout)["resumed_from"] is None
    assert left.is_file() and storage.file_format(path).startswith("influence_cli.")
    written = path.read_bytes()
    assert not list(tmp_path.glob("**/*.finished*"))  # a finished dataset's file is removed all the same

    result = invoke(runner, *args, "--resume")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [cannot_remove(left)]
    assert path.read_bytes() == written and left.is_file()
    result = invoke(runner, *args)
    if command[0] in ("dataset-similarity", "spectrum"):
        assert result.exit_code == 0 and result.stderr.splitlines() == [cannot_remove(left)], result.stderr
        json.loads(result.stdout)
    else:
        assert_clean_error(result, EXIT["output"], "from a finished run")
    model_0 = (tmp_path / FACTORS).read_bytes() if "members/" in snapshot else b""
    result = invoke(runner, *args, "--overwrite")
    assert_clean_error(result, EXIT["output"], f"cannot remove {str(left)!r} (Operation not permitted)")
    assert path.read_bytes() == written
    assert not model_0 or (tmp_path / FACTORS).read_bytes() == model_0  # an ensemble's first factors stay too

    monkeypatch.undo()
    result = invoke(runner, *args, "--resume")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert not left.exists() and path.read_bytes() == written


@pytest.mark.parametrize("command", ["fit-factors", "dataset-similarity"])
def test_a_finished_run_in_a_folder_where_nothing_can_be_removed_warns(
    runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
):
    """A folder that lets files be written but none removed (its write permission taken away once the output was
    written, a filesystem that forbids removal): the run's lock file stays there too, harmless (the next run takes the
    lock on it), so the run still exits 0 with its one warning about its progress and its --json (it gave a traceback
    from the lock); the next run takes the lock on the file left."""
    out, _ = fitted
    args = [command, DIGITS, "--set", f"output_dir={tmp_path}", "--set", "factors.checkpoint_every=1", "--json"]
    if command != "fit-factors":
        args += ["--set", f"factors_dir={out}"]
    partial = {"fit-factors": storage.FACTORS_PARTIAL, "dataset-similarity": storage.SIMILARITY_PARTIAL}[command]
    left, lock = tmp_path / partial.format(rank=""), tmp_path / storage.LOCK_FILE.format(what=command.split("-")[-1])
    for path in (left, lock):
        deny_removing(monkeypatch, path)
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [cannot_remove(left)]
    assert json.loads(result.stdout)["resumed_from"] is None and lock.is_file()
    monkeypatch.undo()
    result = invoke(runner, *args, "--resume")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert not left.exists() and not lock.exists()


def test_a_fifo_or_folder_among_the_factors_progress_names_factors_dir(runner: CliRunner, fitted: tuple[Path, Result], tmp_path: Path):
    """fit-factors into factors_dir names that key in the refusal of a FIFO at another rank's progress path, and of a
    folder at a progress path beside finished factors (both said "write to another place")."""
    out, _ = fitted
    factors = tmp_path / "factors"
    factors.mkdir()
    args = ("fit-factors", DIGITS, "--set", f"output_dir={tmp_path / 'out'}", "--set", f"factors_dir={factors}")
    fifo = factors / "factors.partial.rank1.safetensors"
    os.mkfifo(fifo)
    result = invoke(runner, *args)
    line = assert_clean_error(result, EXIT["output"], f"{str(fifo)!r} already exists and is not a regular file (a FIFO, socket or device)")
    assert result.stderr.split(line, 1)[1].strip() == "hint: set factors_dir to another place, or pass --overwrite to replace it"
    fifo.unlink()
    (factors / storage.FACTORS_FILE).write_bytes((out / storage.FACTORS_FILE).read_bytes())
    folder = factors / "factors.partial.safetensors"
    folder.mkdir()
    result = invoke(runner, *args, "--resume")  # finished factors: the progress beside them is cleared
    line = assert_clean_error(result, EXIT["output"], f"{str(folder)!r} is a folder, not a file")
    assert result.stderr.split(line, 1)[1].strip() == "hint: set factors_dir to another place, or move that folder away"
    assert folder.is_dir()
