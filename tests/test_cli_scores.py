"""`influence compute-scores` and `influence top-k` through typer's CliRunner, and a 2-process gloo run."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from test_scores import N_QUERY, N_TRAIN, write_project
from typer.testing import CliRunner

from influence_cli import storage
from influence_cli.cli import app
from influence_cli.errors import OutputError
from influence_cli.topk import iter_score_blocks, top_k

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})


@pytest.fixture(scope="module")
def project(tmp_path_factory, runner) -> Path:
    """The tiny project with 16-feature inputs (shown as 4×4 images), its config file and fitted factors."""
    folder = tmp_path_factory.mktemp("cli")
    data = write_project(folder, dim=16)
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["fit-factors", str(folder / "config.yaml")])
    assert result.exit_code == 0, result.stderr
    return folder / "config.yaml"


def invoke(runner: CliRunner, *args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def test_help_states_sign_convention_and_examples(runner):
    for command in ("compute-scores", "top-k"):
        result = invoke(runner, command, "--help")
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "positive score means the training example helps the query" in text
        assert "up-weighting it lowers the query's loss" in text and "+score/N" in text
        assert "Examples" in text
    text = " ".join(invoke(runner, "compute-scores", "--help").stdout.split())
    assert "torchrun --nproc_per_node=4 -m influence_cli compute-scores" in text
    # when the query gradients are preconditioned more than once (tests/test_scores.py: test_one_query_chunk_is_in_memory...)
    assert "preconditions every chunk once, or, with several chunks that the budget cannot hold at once, again for each of its shards" in text


def test_another_query_set_scores_against_the_same_fit_through_factors_dir(runner, project):
    """A second query set in its own output_dir, reading the fit's factors through factors_dir;
    top-k there refuses once the shared factors are refitted with other settings."""
    fit_dir, queries = project.parent / "out", project.parent / "queries_b"
    shared = ["--set", f"output_dir={queries}", "--set", f"factors_dir={fit_dir}", "--set", "data.query.range=[0, 4]"]
    result = invoke(runner, "compute-scores", project, *shared, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["paths"] == [str(queries / storage.SCORES_FILE)]
    assert not (queries / storage.FACTORS_FILE).exists()
    result = invoke(runner, "top-k", project, *shared, "--query", "1", "--k", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["queries"][0]["query_index"] == 1
    refit = project.parent / "refit"
    shutil.copytree(fit_dir, refit, ignore=shutil.ignore_patterns("scores*", "self_influence*"))
    result = invoke(runner, "fit-factors", project, "--set", f"output_dir={refit}", "--set", "seed=7", "--overwrite")
    assert result.exit_code == 0, result.stderr
    moved = [a.replace(str(fit_dir), str(refit)) for a in shared]
    result = invoke(runner, "top-k", project, *moved, "--query", "1")
    assert result.exit_code == 5 and "refitted since" in result.stderr


def test_compute_scores_then_top_k(runner, project):
    result = invoke(runner, "compute-scores", project, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "pairwise" and report["n_query"] == N_QUERY and report["n_train"] == N_TRAIN
    out = project.parent / "out"
    assert report["paths"] == [str(out / storage.SCORES_FILE)]

    result = invoke(runner, "top-k", project, "--query", "0:2", "--query", "5", "--k", "3", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert [q["query_position"] for q in data["queries"]] == [0, 1, 5]
    api = top_k(out, [0, 1, 5], 3)
    for q, ref in zip(data["queries"], api, strict=True):
        scores = [e["score"] for e in q["proponents"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 3
        lows = [e["score"] for e in q["opponents"]]
        assert lows == sorted(lows)
        assert [e["train_index"] for e in q["proponents"]] == [e.train_index for e in ref.proponents]
        assert q["query_index"] == 50 + q["query_position"]
    full = next(iter_score_blocks(out, [0])).scores[0]
    assert data["queries"][0]["proponents"][0]["score"] == pytest.approx(float(full.max()))

    result = invoke(runner, "top-k", project, "--query", "1", "--k", "2", "--no-opponents")
    assert result.exit_code == 0, result.stderr
    assert "query 1 · index 51 · label" in result.stdout and "predicted" in result.stdout
    assert "proponent" in result.stdout and "opponent " not in result.stdout
    assert "train index" in result.stdout

    result = invoke(runner, "compute-scores", project)
    assert result.exit_code == 5 and "already holds scores" in result.stderr and "--overwrite" in result.stderr


def test_top_k_query_out_of_range_is_one_line(runner, project):
    if not (project.parent / "out" / storage.SCORES_FILE).exists():
        assert invoke(runner, "compute-scores", project).exit_code == 0
    result = invoke(runner, "top-k", project, "--query", "99")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "usage error: --query 99: outside the 7 queries (valid: 0..6)" in result.stderr
    result = invoke(runner, "top-k", project, "--query", "two")
    assert result.exit_code == 2 and "--query 'two'" in result.stderr
    result = invoke(runner, "top-k", project, "--query", "1,99999999999999999999999")  # beyond int64: no OverflowError
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert "usage error: --query 99999999999999999999999: outside the 7 queries" in result.stderr


def test_an_over_long_query_value_is_shortened_in_its_error(runner, project):
    """A pasted 5,000-digit number (past Python's 4,300 digits for int()) or 4,000-digit one is shown by its head and
    its length, not repeated whole."""
    if not (project.parent / "out" / storage.SCORES_FILE).exists():
        assert invoke(runner, "compute-scores", project).exit_code == 0
    for value, shown in (("9" * 5000, f"'{'9' * 74}...' (5,000 characters): expected N or START:STOP"),
                         ("0:" + "9" * 5000, f"'0:{'9' * 72}...' (5,002 characters): expected N or START:STOP"),
                         ("9" * 4000, f"{'9' * 76}... (4,000 characters): outside the 7 queries"),
                         ("9" * 4000 + ":", f"{'9' * 76}... (4,001 characters): an empty range")):  # fmt: skip
        result = invoke(runner, "top-k", project, "--query", value)
        assert result.exit_code == 2 and result.stdout == "", result.stderr
        assert result.stderr.startswith(f"usage error: --query {shown}") and len(result.stderr) < 300, result.stderr


def test_top_k_without_scores_hints_compute_scores(runner, tmp_path):
    data = write_project(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    result = invoke(runner, "top-k", tmp_path / "c.yaml")
    assert result.exit_code == 5 and "no scores in" in result.stderr and "compute-scores" in result.stderr


def test_top_k_refuses_scores_the_config_does_not_describe(runner, project, tmp_path):
    """Scores of another model, data or setting are never ranked as if they were the config's."""
    out = project.parent / "out"
    if not (out / storage.SCORES_FILE).exists():
        assert invoke(runner, "compute-scores", project).exit_code == 0
    assert invoke(runner, "top-k", project, "--query", "0", "--k", "1").exit_code == 0
    model = project.parent / "model.safetensors"
    perturbed = {k: v + 0.01 for k, v in load_file(model).items()}
    save_file(perturbed, tmp_path / "perturbed.safetensors")
    cases = [
        (["--set", "scores.damping=0.5"], "computed with scores.damping=auto; the config has 0.5"),
        (["--set", "scores.damping_factor=0.5"], "computed with scores.damping_factor=0.1; the config has 0.5"),
        (["--set", "scores.damping_scope=model"], "computed with scores.damping_scope=layer"),
        (["--set", f"scores.checkpoints=[{tmp_path / 'perturbed.safetensors'}]"], "averaged over 1 model(s); the config names 2"),
        (["--set", "factors.strategy=kfac"], "computed with factors.strategy=ekfac; the config has kfac"),
        (["--set", "task.measurement=margin"], "computed with task.measurement=loss"),
        (["--set", f"model.checkpoint={tmp_path / 'perturbed.safetensors'}"], "holds scores of another model"),
        (["--set", "data.query.range=[50, 53]"], "computed on another data.query"),
        (["--set", "factors.modules=[head]"], "holds scores of layers ['fc1', 'head']; the config tracks ['head']"),
        (["--set", "model.kwargs.activation=tanh"], 'another model definition (model.kwargs.activation (unset) -> "tanh")'),
        (["--set", "factors.max_examples=10"], "computed with factors.max_examples="),
        (["--set", "factors.amp=bfloat16"], "computed with factors.amp=none; the config has bfloat16"),
        (["--set", "scores.dtype=bfloat16"], "computed with scores.dtype=float32; the config has bfloat16"),
    ]
    for extra, needle in cases:
        result = invoke(runner, "top-k", project, "--query", "0", "--k", "1", *extra)
        assert result.exit_code == 5 and needle in result.stderr and result.stdout == "", (extra, result.stderr)


def test_top_k_refuses_scores_of_factors_refitted_since(runner, tmp_path, monkeypatch):
    """Factors refitted with another seed (sampled Fisher) make the pairwise and self-influence scores
    stale; `compute-scores --self --overwrite` interrupted in its pass (past the first batch's checks, which the old
    values outlive) leaves no old values behind."""
    import influence_cli.scores as scores_mod

    data = write_project(tmp_path)
    data["factors"]["fisher"] = "sampled"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in (["fit-factors"], ["compute-scores"], ["compute-scores", "--self"]):
        assert invoke(runner, *command, config).exit_code == 0
    assert invoke(runner, "fit-factors", config, "--overwrite").exit_code == 0  # the same settings: the same factors
    for override, needle in (("seed=1", "was fitted with seed=0 (its sampled Fisher labels), the config has 1"),
                             ("factors.max_examples=30", f"was fitted on {N_TRAIN} examples, the config asks for 30")):  # fmt: skip
        result = invoke(runner, "compute-scores", config, "--overwrite", "--set", override)
        assert result.exit_code == 5 and needle in result.stderr, result.stderr
    edited = invoke(runner, "edit", config, "--out", tmp_path / "edited.safetensors", "--set", "seed=1")  # edit never reads the seed
    assert edited.exit_code == 0, edited.stderr
    assert invoke(runner, "top-k", config, "--k", "1").exit_code == 0
    assert invoke(runner, "fit-factors", config, "--overwrite", "--set", "seed=1").exit_code == 0
    for extra in ([], ["--self"]):
        rerun = f"rerun {' '.join(['compute-scores', *extra])} with --overwrite"  # the command that wrote these scores
        result = invoke(runner, "top-k", config, "--k", "1", *extra)  # the scores' seed, not the factors' now
        assert result.exit_code == 5 and "holds scores of other factors than" in result.stderr, result.stderr
        assert rerun in result.stderr
        result = invoke(runner, "top-k", config, "--k", "1", "--set", "seed=1", *extra)  # the factors' seed, not the scores'
        assert result.exit_code == 5 and "computed with seed=0; the config has 1" in result.stderr, result.stderr
        assert rerun in result.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scores_mod._Scorer, "self_influence", interrupted)
    result = invoke(runner, "compute-scores", config, "--self", "--overwrite", "--set", "seed=1")
    assert result.exit_code == 130, result.stderr
    assert not (tmp_path / "out" / storage.SELF_INFLUENCE_FILE).exists()


def test_top_k_warns_of_scores_of_factors_refitted_since_with_the_same_settings(runner, tmp_path, monkeypatch):
    """A refit with the same settings keeps the factors' result key but not their bits where the batches, threads,
    ranks or GPU differ: compute-scores --resume refuses the old scores as of a refitted factors file, and top-k
    (pairwise and --self) ranks them with a warning naming the two times; scores of the factors there, none."""
    data = write_project(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in (["fit-factors"], ["compute-scores"], ["compute-scores", "--self"]):
        assert invoke(runner, *command, config).exit_code == 0
    for extra in ([], ["--self"]):
        result = invoke(runner, "top-k", config, "--k", "1", *extra)
        assert result.exit_code == 0 and "refitted" not in result.stderr, result.stderr
    monkeypatch.setattr(storage, "created_now", lambda: "2099-01-01T00:00:00+0000")
    assert invoke(runner, "fit-factors", config, "--overwrite", "--set", "data.batch_size=5").exit_code == 0
    result = invoke(runner, "compute-scores", config, "--resume")
    assert result.exit_code == 5 and "factors file (refitted)" in result.stderr, result.stderr
    for extra in ([], ["--self"]):
        result = invoke(runner, "top-k", config, "--k", "1", *extra)
        assert result.exit_code == 0, result.stderr
        warning = " ".join(result.stderr.split())
        assert "was refitted since (2099-01-01T00:00:00+0000) with the same settings" in warning, warning
        assert f"rerun {' '.join(['compute-scores', *extra])} with --overwrite" in warning, warning


def test_a_refit_within_the_same_instant_is_told_from_the_fit_before(runner, tmp_path, frozen_clock):
    """Two fits whose clock reads the same (a refit of a tiny model within the second its fit ended): the factors'
    `created` still differs, so compute-scores --resume refuses the old scores and top-k warns of them, as after a
    refit a second later."""
    data = write_project(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in (["fit-factors"], ["compute-scores"]):
        assert invoke(runner, *command, config).exit_code == 0
    first = storage.read_metadata(tmp_path / "out" / storage.FACTORS_FILE)["created"]
    assert invoke(runner, "fit-factors", config, "--overwrite", "--set", "data.batch_size=5").exit_code == 0
    second = storage.read_metadata(tmp_path / "out" / storage.FACTORS_FILE)["created"]
    assert first != second, first  # an older storage, to the second, writes the same time twice (fits well within a second)
    assert first.startswith("2026-11-30T02:10:00.1") and second.startswith("2026-11-30T02:10:00.1"), (first, second)
    result = invoke(runner, "compute-scores", config, "--resume")
    assert result.exit_code == 5 and "factors file (refitted)" in result.stderr, result.stderr
    result = invoke(runner, "top-k", config, "--k", "1")
    assert result.exit_code == 0, result.stderr
    warning = " ".join(result.stderr.split())
    assert f"of the factors written at {first};" in warning and f"was refitted since ({second})" in warning, warning


def test_similarity_and_spectrum_warn_of_a_result_of_factors_refitted_since_with_the_same_settings(runner, tmp_path, monkeypatch):
    """A finished dataset-similarity or spectrum result is shown again after a refit of the factors with the same
    settings (the same result key) as top-k ranks such scores: with a warning naming the two times; a result of the
    factors there, and one of a version that did not record their time, without one."""
    data = write_project(tmp_path)
    two = {"a": data["data"]["train"], "b": data["data"]["query"]}
    # a fixed damping: `auto` follows the refit's eigenvalues, whose rounding differs, and a result of another λ is refused
    data |= {"similarity": {"datasets": two}, "spectrum": {"datasets": two}, "scores": {"damping": 0.01}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    commands = (("dataset-similarity", storage.SIMILARITY_FILE), ("spectrum", storage.SPECTRUM_FILE))
    assert invoke(runner, "fit-factors", config).exit_code == 0
    for command, _ in commands:
        for _ in range(2):  # computed, then shown again
            result = invoke(runner, command, config)
            assert result.exit_code == 0 and "refitted" not in result.stderr, result.stderr
    monkeypatch.setattr(storage, "created_now", lambda: "2099-01-01T00:00:00+0000")
    assert invoke(runner, "fit-factors", config, "--overwrite", "--set", "data.batch_size=5").exit_code == 0
    for command, name in commands:
        for extra in ([], ["--resume"]):  # --resume on a finished result shows it, as a no-op
            result = invoke(runner, command, config, *extra)
            assert result.exit_code == 0, result.stderr
            warning = " ".join(result.stderr.split())
            assert "was refitted since (2099-01-01T00:00:00+0000) with the same settings" in warning, warning
            assert f"rerun {command} with --overwrite" in warning and warning.count("refitted") == 1, warning
        path = tmp_path / "out" / name  # as an older version wrote it, without the factors' time
        tensors, meta = storage.load_tensors(path)
        storage.save_tensors(path, tensors, {k: v for k, v in meta.items() if k != "factors_created"})
        result = invoke(runner, command, config)
        assert result.exit_code == 0 and "refitted" not in result.stderr, result.stderr
        shown = storage.read_metadata(path)  # shown, not recomputed: its key does not hold the factors' time
        assert "factors_created" not in shown and shown["created"] == meta["created"] != "2099-01-01T00:00:00+0000", shown


@pytest.mark.parametrize("command", ["dataset-similarity", "spectrum"])
def test_resume_refuses_progress_of_factors_refitted_since_with_the_same_settings(tmp_path, monkeypatch, command):
    """dataset-similarity or spectrum interrupted after its first dataset, the factors then refitted with the same
    settings (the same result key): --resume refuses the progress, naming the refit, as compute-scores --resume does,
    rather than combining a dataset of the old factors with ones of the new; --overwrite starts over."""
    from stopping import StopAt

    from influence_cli.band_energy import spectrum
    from influence_cli.config import config_from_dict
    from influence_cli.fit import fit_factors
    from influence_cli.similarity import dataset_similarity

    data = write_project(tmp_path)
    two = {"a": data["data"]["train"], "b": data["data"]["query"]}
    data |= {"similarity": {"datasets": two}, "spectrum": {"datasets": two}, "scores": {"damping": 0.01}}
    cfg = config_from_dict(data, base_dir=tmp_path)
    run, partial = {"dataset-similarity": (dataset_similarity, storage.SIMILARITY_PARTIAL), "spectrum": (spectrum, storage.SPECTRUM_PARTIAL)}[command]
    fit_factors(cfg)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=StopAt("b", 1))  # dataset a finished, in its file beside the snapshot
    assert (tmp_path / "out" / partial.format(rank="")).is_file()
    monkeypatch.setattr(storage, "created_now", lambda: "2099-01-01T00:00:00+0000")
    fit_factors(config_from_dict(data | {"data": data["data"] | {"batch_size": 5}}, base_dir=tmp_path), overwrite=True)
    with pytest.raises(OutputError, match=r"progress of a run with other settings \(factors file \(refitted since, with the same settings\)\)"):
        run(cfg, resume=True)
    assert (tmp_path / "out" / partial.format(rank="")).is_file()  # the refusal removes nothing
    run(cfg, overwrite=True)
    # progress of the version before, which did not record the factors' time, still resumes (unverified for a refit)
    from influence_cli import resume

    key = resume.run_key
    monkeypatch.setattr(resume, "run_key", lambda fields: key({k: v for k, v in fields.items() if k != "factors_created"}))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, overwrite=True, progress=StopAt("b", 1))
    monkeypatch.setattr(resume, "run_key", key)
    assert run(cfg, resume=True).resumed_from is not None


def test_a_factors_dir_that_is_a_file_is_named_as_such_by_every_command_of_the_factors(runner, project, tmp_path):
    """factors_dir naming a file (or a path under one): every command that reads the factors says so, with the key
    to set, rather than "no factors at '<file>/factors.safetensors'" (top-k too, rather than skipping its check of
    the factors); fit-factors refuses it before any pass."""
    out, fit = tmp_path / "o", project.parent / "out"
    assert invoke(runner, "compute-scores", project, "--set", f"output_dir={out}", "--set", f"factors_dir={fit}").exit_code == 0
    (tmp_path / "a_file").write_text("x")
    hint = "hint: set factors_dir to the folder of the factors, the one fit-factors wrote them into"
    for folder, where in ((tmp_path / "a_file", "is"), (tmp_path / "a_file" / "sub", f"lies under {str(tmp_path / 'a_file')!r}, which is")):
        sets = ["--set", f"output_dir={out}", "--set", f"factors_dir={folder}"]
        for command in (["compute-scores", "--overwrite"], ["compute-scores", "--self"], ["spectrum"], ["top-k"],
                        ["edit", "--out", str(tmp_path / "edited.safetensors")]):  # fmt: skip
            result = invoke(runner, command[0], project, *sets, *command[1:])
            assert result.exit_code == 5, (command, result.stderr)
            assert result.stderr.splitlines() == [f"output error: factors_dir: {str(folder)!r} {where} a file, not a folder", hint], command
        result = invoke(runner, "fit-factors", project, *sets)
        assert result.exit_code == 5 and len(result.stderr.splitlines()) == 2, result.stderr  # the refusal alone, no pass begun
        assert result.stderr.startswith("output error: factors_dir: ") and "a file, not a folder" in result.stderr, result.stderr
    assert (tmp_path / "a_file").read_text() == "x" and (out / storage.SCORES_FILE).is_file()


def test_an_output_dir_or_factors_dir_that_is_a_file_or_a_link_to_one_is_named_as_such_by_top_k(runner, project, tmp_path):
    """top-k (and top-k --self) reading scores from an output_dir that names a file, a symbolic link to one or a path
    under one says so, with the key to set, rather than "no scores in '<file>'"; a factors_dir that is a link to a file
    is refused as a file by the commands reading the factors."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a_file")
    hint = "hint: set output_dir to the folder compute-scores wrote the scores into"
    for folder, where in ((tmp_path / "a_file", "is"), (tmp_path / "link", "is"),
                          (tmp_path / "link" / "sub", f"lies under {str(tmp_path / 'link')!r}, which is")):  # fmt: skip
        for extra in ([], ["--self"]):
            result = invoke(runner, "top-k", project, "--set", f"output_dir={folder}", *extra)
            assert result.exit_code == 5, (extra, result.stderr)
            assert result.stderr.splitlines() == [f"output error: output_dir: {str(folder)!r} {where} a file, not a folder", hint], extra
    for command in ("compute-scores", "spectrum"):
        result = invoke(runner, command, project, "--set", f"output_dir={tmp_path / 'o'}", "--set", f"factors_dir={tmp_path / 'link'}")
        assert result.exit_code == 5 and f"factors_dir: {str(tmp_path / 'link')!r} is a file, not a folder" in result.stderr, result.stderr
    assert (tmp_path / "a_file").read_text() == "x"


def test_top_k_after_an_interrupted_run_hints_resume(runner, tmp_path):
    data = write_project(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / data["output_dir"]).mkdir(parents=True, exist_ok=True)
    (tmp_path / data["output_dir"] / storage.SCORES_PARTIAL.format(rank="")).write_bytes(b"")
    result = invoke(runner, "top-k", tmp_path / "c.yaml")
    assert result.exit_code == 5 and "rerun it with --resume" in result.stderr


def test_a_scores_index_this_user_may_not_read_is_named_as_such(runner, project, tmp_path, monkeypatch):
    """An index without read permission is refused as that by top-k and by compute-scores --resume, not taken for
    scores of other settings (whose hint, --overwrite, would recompute finished scores), and nothing is removed."""
    out = tmp_path / "sharded"
    sets = ["--set", f"output_dir={out}", "--set", f"factors_dir={project.parent / 'out'}", "--set", "scores.max_memory_mb=0.0001"]
    assert invoke(runner, "compute-scores", project, *sets).exit_code == 0
    index = out / storage.SCORES_INDEX
    before = sorted(out.iterdir())
    assert len(before) > 2  # the index and its shards
    read_text = Path.read_text

    def denied(self, *args, **kwargs):
        if self == index:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    for command in (["compute-scores", "--resume"], ["top-k"]):
        result = invoke(runner, command[0], project, *sets, *command[1:])
        assert result.exit_code == 5, result.stderr
        assert result.stderr.splitlines() == [
            f"output error: {str(index)!r} cannot be read (permission denied)", "hint: give this user read permission on it (chmod)"]  # fmt: skip
    assert sorted(out.iterdir()) == before


def test_picture_paths_are_checked_before_any_work(runner, project, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder.png").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    cases = [(tmp_path / "a_file" / "grid.png", "a_file' is a file, not a folder"), (tmp_path / "a_folder.png", "is a folder"), (tmp_path / "grid.txt", "unknown image format"),
             (tmp_path / "link" / "grid.png", "link' is a symbolic link to "), (tmp_path / "grid.psd", "Pillow cannot write"), (tmp_path, "is a folder"),
             (tmp_path / "grid.blp", "Pillow cannot write colour pictures as '.blp'"), (tmp_path / "grid.xbm", "cannot write colour")]  # fmt: skip
    for path, needle in cases:
        result = invoke(runner, "top-k", project, "--query", "0", "--image-grid", path)
        assert result.exit_code == 5 and "--image-grid" in result.stderr and needle in result.stderr, result.stderr
        assert result.stdout == ""
    with pytest.raises(OutputError, match="which leads to no folder"):  # up front, as a file in its way: not once it is drawn
        storage.check_image_path(tmp_path / "link" / "grid.png", "--image-grid")
    failed = invoke(runner, "top-k", project, "--query", "999999", "--image-grid", tmp_path / "new" / "grid.png")
    assert failed.exit_code in (2, 5) and not (tmp_path / "new").exists()  # a run that fails creates no picture folder


def test_plain_ranks_relative_scores_by_plain_influence(runner, project, tmp_path):
    """Relative scores keep the norms that undo the division: top-k --plain ranks them as a plain run would."""
    factors = ["--set", f"factors_dir={project.parent / 'out'}"]
    rel, plain = (["--set", f"output_dir={tmp_path / name}", *factors] for name in ("rel", "plain"))
    assert invoke(runner, "compute-scores", project, *rel, "--relative").exit_code == 0
    assert invoke(runner, "compute-scores", project, *plain, "--no-relative").exit_code == 0
    got = json.loads(invoke(runner, "top-k", project, *rel, "--plain", "--json", "--k", "4").stdout)
    want = json.loads(invoke(runner, "top-k", project, *plain, "--json", "--k", "4").stdout)
    assert got["relative"] is False and want["relative"] is False
    for g, w in zip(got["queries"], want["queries"], strict=True):
        for side in ("proponents", "opponents"):
            assert [e["train_index"] for e in g[side]] == [e["train_index"] for e in w[side]]
            assert [e["score"] for e in g[side]] == pytest.approx([e["score"] for e in w[side]], rel=1e-4)
    refused = invoke(runner, "top-k", project, *plain, "--plain")
    assert refused.exit_code == 2 and "--plain: the scores in" in refused.stderr and "are plain influence already" in refused.stderr
    assert invoke(runner, "top-k", project, *rel, "--plain", "--self").exit_code == 2
    refused = invoke(runner, "top-k", project, *rel, "--no-opponents", "--self")
    assert refused.exit_code == 2 and "--no-opponents: not used with --self" in refused.stderr


def test_a_pass_that_fails_midway_leaves_no_bar_drawn(runner, project, monkeypatch, tmp_path):
    """Every command's bars are stopped when it fails (the error line says what happened)."""
    from influence_cli.cli import render
    from influence_cli.errors import NumericalError
    from influence_cli.kernel import ScoreKernel

    def fail(*args, **kwargs):
        raise NumericalError("the scoring pass failed here")

    monkeypatch.setattr(ScoreKernel, "pairwise", fail)
    result = invoke(runner, "compute-scores", project, "--set", f"output_dir={tmp_path / 'out'}", "--set", f"factors_dir={project.parent / 'out'}")
    lines = result.stderr.splitlines()
    assert result.exit_code == 6 and lines[-1] == "numerical error: the scoring pass failed here", result.stderr
    assert len(lines) == 2 and "query gradients" in lines[0] and "7/7" in lines[0], result.stderr  # the finished pass's bar stays
    assert render._RUNNING == []


def test_a_terminated_run_says_so_and_exits_143(runner, project, monkeypatch):
    """SIGTERM (a scheduler's requeue) is handled like Ctrl-C, with its own exit code."""
    from influence_cli import scores as scores_mod
    from influence_cli.cli.app import Terminated

    def terminated(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(scores_mod, "compute_scores", terminated)
    result = invoke(runner, "compute-scores", project)
    assert result.exit_code == 143 and "terminated." in result.stderr and "--resume" in result.stderr
    monkeypatch.setattr("influence_cli.distributed.init_distributed", lambda *args: None)
    under_torchrun = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": "0", "WORLD_SIZE": "2"})
    result = invoke(under_torchrun, "compute-scores", project)  # torchrun stops the other ranks with SIGTERM when one fails
    assert result.exit_code == 143 and "terminated by torchrun (another rank stopped" in result.stderr and "--resume" in result.stderr


def test_self_influence_ranking_says_which_labels_label_noise_flipped(runner, project, tmp_path):
    """With data.train.label_noise, top-k --self marks the flipped examples and counts them (mislabel detection)."""
    from influence_cli import load_config
    from influence_cli.data import load_dataset

    sets = ["--set", "data.train.label_noise=0.2", "--set", f"output_dir={tmp_path / 'noisy'}"]
    for command in (["fit-factors"], ["compute-scores", "--self"]):
        assert invoke(runner, *command, project, *sets).exit_code == 0
    result = invoke(runner, "top-k", project, "--self", "--k", "10", "--json", *sets)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    cfg = load_config(project, ["data.train.label_noise=0.2"])
    train = load_dataset(cfg.data.train, cfg.base_dir, name="data.train", seed=cfg.seed)
    rows = data["self_influence"]
    for row in rows:
        flipped = bool(train.noisy_mask[row["train_position"]])
        assert row["noisy"] is flipped and row["clean_label"] == (int(train.clean_labels[row["train_position"]]) if flipped else None)
        assert row["train_label"] == int(train.labels[row["train_position"]])
    in_top = sum(row["noisy"] for row in rows)
    assert data["label_noise"] == {"flipped": int(train.noisy_mask.sum()), "train": len(train), "in_top_k": in_top} and in_top > 0
    table = invoke(runner, "top-k", project, "--self", "--k", "10", *sets)
    assert "label noise" in table.stdout and "flipped from" in table.stdout
    assert f"label noise: {in_top} of these 10 carry a flipped label ({data['label_noise']['flipped']} of the {len(train)}" in " ".join(table.stdout.split())
    assert invoke(runner, "top-k", project, "--self", "--k", "10", "--image-grid", tmp_path / "self.png", *sets).exit_code == 0
    by_loss = json.loads(invoke(runner, "top-k", project, "--self", "--rank-by", "loss", "--k", "10", "--json", *sets).stdout)
    losses = load_file(tmp_path / "noisy" / "self_influence.safetensors")["train_losses"]
    order = torch.argsort(losses, descending=True, stable=True)[:10].tolist()
    assert by_loss["rank_by"] == "loss" and data["rank_by"] == "self-influence"
    assert [row["train_position"] for row in by_loss["self_influence"]] == order
    assert all(row["loss"] == float(losses[row["train_position"]]) for row in rows + by_loss["self_influence"])  # both rankings
    in_top_loss = sum(bool(train.noisy_mask[p]) for p in order)
    assert by_loss["label_noise"]["in_top_k"] == in_top_loss and all(row["noisy"] is bool(train.noisy_mask[row["train_position"]]) for row in by_loss["self_influence"])
    table = " ".join(invoke(runner, "top-k", project, "--self", "--rank-by", "loss", "--k", "10", *sets).stdout.split())
    assert "training examples of the largest loss (top 10)" in table and "self-influence ┃ loss" in table
    assert f"label noise: {in_top_loss} of these 10 carry a flipped label" in table
    assert invoke(runner, "top-k", project, "--self", "--rank-by", "loss", "--image-grid", tmp_path / "loss.png", *sets).exit_code == 0
    refused = invoke(runner, "top-k", project, "--rank-by", "loss", "--query", "0", *sets)
    assert refused.exit_code == 2 and "--rank-by loss: only with --self" in refused.stderr
    differ = sum(row["train_prediction"] != row["train_label"] for row in rows)  # most rows mispredicted: --rank-by loss is suggested
    assert 2 * differ > 10, differ  # the fixture's model has not fit its top rows: the note is shown
    for args in ([], ["--json"]):
        result = invoke(runner, "top-k", project, "--self", "--k", "10", *args, *sets)
        stderr = " ".join(result.stderr.split())
        assert f"note: the model predicts another class than the label on {differ} of these 10" in stderr, stderr
        assert "--rank-by loss (the largest training losses first) then finds wrong labels better" in stderr, stderr
        assert "--rank-by loss" not in result.stdout  # on stderr only: --json's stdout stays one JSON document
        if args:
            assert json.loads(result.stdout)["self_influence"] == rows
    assert "then finds wrong labels better" not in invoke(runner, "top-k", project, "--self", "--rank-by", "loss", "--k", "10", *sets).stderr
    clean = ["--set", f"output_dir={tmp_path / 'clean'}"]  # without label noise: no such keys
    for command in (["fit-factors"], ["compute-scores", "--self"]):
        assert invoke(runner, *command, project, *clean).exit_code == 0
    plain = json.loads(invoke(runner, "top-k", project, "--self", "--k", "3", "--json", *clean).stdout)
    assert "label_noise" not in plain and "noisy" not in plain["self_influence"][0]


def test_self_influence_and_image_grids(runner, project, tmp_path):
    result = invoke(runner, "compute-scores", project, "--self")
    assert result.exit_code == 0, result.stderr
    assert "self-influence" in result.stdout
    result = invoke(runner, "top-k", project, "--self", "--k", "4", "--json", "--image-grid", tmp_path / "self.png")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    ranked = data["self_influence"]
    assert data["strategy"] == "ekfac"  # as pairwise top-k says
    assert [e["rank"] for e in ranked] == [1, 2, 3, 4]
    assert [e["score"] for e in ranked] == sorted((e["score"] for e in ranked), reverse=True)
    assert Image.open(tmp_path / "self.png").size[0] > 4 * 84

    # plain scores: one row group; relative scores (with their norms): plain and relative side by side
    out = project.parent / "out"
    if not (out / storage.SCORES_FILE).exists():
        assert invoke(runner, "compute-scores", project).exit_code == 0
    result = invoke(runner, "top-k", project, "--query", "0:3", "--k", "3", "--image-grid", tmp_path / "plain.png")
    assert result.exit_code == 0, result.stderr
    result = invoke(runner, "compute-scores", project, "--relative", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "relative influence" in result.stdout
    result = invoke(runner, "top-k", project, "--query", "0:3", "--k", "3", "--image-grid", tmp_path / "both.png")
    assert result.exit_code == 0, result.stderr
    # the config says plain: the relative scores are shown as they are, with a note on stderr
    assert "note: the scores in" in result.stderr and "are relative (RelatIF) influence" in " ".join(result.stderr.split())
    assert "note" not in invoke(runner, "top-k", project, "--k", "1", "--set", "scores.relative=true").stderr
    plain, both = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "both.png")
    assert both.size[0] == plain.size[0] and both.size[1] > 1.8 * plain.size[1] - 60
    assert not list(tmp_path.glob(".*.tmp"))
    invoke(runner, "compute-scores", project, "--overwrite")  # leave plain scores for the other tests


# ----------------------------------------------------------------------------- two processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config: str, out: str, extra: list[str]) -> None:
    """One rank: pairwise scores (sharded by rank) then self-influence, as under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from influence_cli.config import load_config
        from influence_cli.distributed import DistState
        from influence_cli.scores import compute_scores

        cfg = load_config(config, [f"output_dir={out}", *extra])
        compute_scores(cfg, state=DistState(rank=rank, world_size=world))
        compute_scores(cfg, state=DistState(rank=rank, world_size=world), self_influence=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_write_the_per_layer_parts_of_their_shards(project, tmp_path, runner):
    """scores.by_layer under torchrun: each rank's shards hold their range of the parts, and --self's parts
    are gathered from every rank's range, as the scores are."""
    out, single = tmp_path / "dist", tmp_path / "single"
    for folder in (out, single):
        folder.mkdir()
        (folder / storage.FACTORS_FILE).write_bytes((project.parent / "out" / storage.FACTORS_FILE).read_bytes())
    mp.spawn(_rank_main, args=(2, _free_port(), str(project), str(out), ["scores.by_layer=true"]), nprocs=2)
    for args in ([], ["--self"]):
        assert invoke(runner, "compute-scores", project, "--by-layer", *args, "--set", f"output_dir={single}").exit_code == 0
    index = json.loads((out / storage.SCORES_INDEX).read_text())
    assert index["metadata"][storage.BY_LAYER] == ["fc1", "head"] and len(index["shards"]) == 2
    got = torch.cat([load_file(out / s["file"])[storage.SCORES_BY_LAYER] for s in index["shards"]], dim=2)
    ref = load_file(single / storage.SCORES_FILE)[storage.SCORES_BY_LAYER]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    a, b = load_file(out / storage.SELF_INFLUENCE_FILE), load_file(single / storage.SELF_INFLUENCE_FILE)
    torch.testing.assert_close(a[storage.SELF_BY_LAYER], b[storage.SELF_BY_LAYER], rtol=1e-5, atol=1e-6 * float(b["self_influence"].max()))
    torch.testing.assert_close(a[storage.SELF_BY_LAYER].sum(0), a["self_influence"], rtol=1e-5, atol=0)


LAZY_DATA = """
from pathlib import Path

import torch
from safetensors.torch import load_file


class Lazy(torch.utils.data.Dataset):
    \"\"\"The project's examples, their labels only through the examples (no `targets`).\"\"\"

    def __init__(self):
        tensors = load_file(Path(__file__).with_name("data.safetensors"))
        self.x, self.y = tensors["inputs"], tensors["labels"]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make():
    return Lazy()
"""


def _self_rank_main(rank: int, world: int, port: int, config: str, outs: list[str]) -> None:
    """One rank: --self into each of `outs`, without and with the per-layer parts, as under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from influence_cli.config import load_config
        from influence_cli.distributed import DistState
        from influence_cli.scores import compute_scores

        for out, by_layer in zip(outs, (False, True), strict=True):
            compute_scores(load_config(config, [f"output_dir={out}"]), state=DistState(rank=rank, world_size=world), self_influence=True, by_layer=by_layer)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_gather_the_labels_of_a_lazy_training_set_for_self_influence(tmp_path, runner):
    """A training set that knows its labels only through its examples (a factory dataset without `targets`):
    under torchrun each rank collects its range's labels for --self and rank 0 joins them, with and without
    the per-layer parts, which stay a tensor of their own beside the labels."""
    data = write_project(tmp_path, dim=16)
    (tmp_path / "lazy_train_data.py").write_text(LAZY_DATA)
    data["data"]["train"] = {"source": "lazy_train_data:make", "range": [0, N_TRAIN]}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    assert invoke(runner, "fit-factors", config).exit_code == 0
    outs = [tmp_path / name for name in ("plain", "parts")]
    for out in outs:
        out.mkdir()
        shutil.copy(tmp_path / "out" / storage.FACTORS_FILE, out / storage.FACTORS_FILE)
    mp.spawn(_self_rank_main, args=(2, _free_port(), str(config), [str(o) for o in outs]), nprocs=2)
    result = invoke(runner, "compute-scores", config, "--self", "--by-layer")
    assert result.exit_code == 0, result.stderr
    ref = load_file(tmp_path / "out" / storage.SELF_INFLUENCE_FILE)
    assert ref["train_labels"].tolist() == load_file(tmp_path / "data.safetensors")["labels"][:N_TRAIN].tolist()
    for out in outs:
        got = load_file(out / storage.SELF_INFLUENCE_FILE)
        assert torch.equal(got["train_labels"], ref["train_labels"])
        torch.testing.assert_close(got["self_influence"], ref["self_influence"], rtol=1e-5, atol=0)
    parts = load_file(outs[1] / storage.SELF_INFLUENCE_FILE)[storage.SELF_BY_LAYER]
    torch.testing.assert_close(parts, ref[storage.SELF_BY_LAYER], rtol=1e-5, atol=1e-6 * float(ref["self_influence"].max()))
    assert storage.SELF_BY_LAYER not in load_file(outs[0] / storage.SELF_INFLUENCE_FILE)


@pytest.mark.distributed
def test_two_processes_write_rank_shards_matching_one_process(project, tmp_path, runner):
    out, single = tmp_path / "dist", tmp_path / "single"
    for folder in (out, single):
        folder.mkdir()
        (folder / storage.FACTORS_FILE).write_bytes((project.parent / "out" / storage.FACTORS_FILE).read_bytes())
    budget = str(N_QUERY * 16 * 4 / 2**20)  # 16 columns per shard: ranks [0, 22) and [22, 45) get 2 shards each
    mp.spawn(_rank_main, args=(2, _free_port(), str(project), str(out), [f"scores.max_memory_mb={budget}"]), nprocs=2)
    index = json.loads((out / storage.SCORES_INDEX).read_text())
    assert [(s["train_start"], s["train_stop"]) for s in index["shards"]] == [(0, 16), (16, 22), (22, 38), (38, 45)]
    assert not list(out.glob("scores.partial*"))
    for flag in ((), ("--self",)):  # one process: one block of scores, then self-influence
        result = invoke(runner, "compute-scores", project, *flag, "--set", f"output_dir={single}")
        assert result.exit_code == 0, result.stderr
    got = torch.cat([b.scores for b in iter_score_blocks(out, range(N_QUERY))], 1)
    ref = torch.cat([b.scores for b in iter_score_blocks(single, range(N_QUERY))], 1)
    # float32 sums over other batch shapes: rounding relative to the largest scores, not to each one
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    a = storage.load_tensors(out / storage.SELF_INFLUENCE_FILE)[0]
    b = storage.load_tensors(single / storage.SELF_INFLUENCE_FILE)[0]
    torch.testing.assert_close(a["self_influence"], b["self_influence"], rtol=1e-5, atol=1e-6)
    assert torch.equal(a["train_labels"], b["train_labels"]) and torch.equal(a["train_indices"], b["train_indices"])
    from influence_cli.models import mlp

    model = mlp(input_dim=16, hidden=[5], num_classes=3)
    model.load_state_dict(load_file(project.parent / "model.safetensors"))
    data = load_file(project.parent / "data.safetensors")
    with torch.no_grad():
        outputs = model(data["inputs"][:N_TRAIN])
    want = outputs.argmax(-1)
    assert torch.equal(a["train_predictions"], want) and torch.equal(b["train_predictions"], want)  # each rank wrote its own range
    loss = torch.nn.functional.cross_entropy(outputs, data["labels"][:N_TRAIN], reduction="none")
    for stored in (a, b):  # float32 forwards of other batch shapes: rounding only
        torch.testing.assert_close(stored[storage.SELF_LOSSES], loss, rtol=1e-5, atol=1e-6)


def _self_resume_rank_main(rank: int, world: int, port: int, config: str, out: str, stop_after: int, resume: bool) -> None:
    """One rank of --self, as under torchrun: stopped (Ctrl-C) after `stop_after` of its batches when > 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from stopping import interrupt_after

        from influence_cli.config import load_config
        from influence_cli.distributed import DistState
        from influence_cli.scores import compute_scores

        cfg, st = load_config(config, [f"output_dir={out}"]), DistState(rank=rank, world_size=world)
        if stop_after:
            with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):  # both ranks stop at the same batch, outside any collective
                interrupt_after(m, "self_influence", stop_after)
                compute_scores(cfg, state=st, self_influence=True)
        else:
            compute_scores(cfg, state=st, self_influence=True, resume=resume)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_resume_self_influence_bit_for_bit(project, tmp_path):
    """--self under torchrun, interrupted after 2 batches of each rank and resumed: the values, predictions and
    training losses are those of the uninterrupted run, bit for bit, each rank's read back from the pieces it saved
    beside its snapshot, which the finished run removes."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for folder in (whole, resumed):
        folder.mkdir()
        shutil.copy(project.parent / "out" / storage.FACTORS_FILE, folder / storage.FACTORS_FILE)
    mp.spawn(_self_resume_rank_main, args=(2, _free_port(), str(project), str(whole), 0, False), nprocs=2)
    mp.spawn(_self_resume_rank_main, args=(2, _free_port(), str(project), str(resumed), 2, False), nprocs=2)
    saved = sorted(p.name for p in resumed.glob("scores.partial*.self*"))
    assert saved == [f"scores.partial.rank{r}.self{piece}.safetensors" for r in (0, 1) for piece in (".finished0", ".finished1", "")]  # a piece per save
    assert not (resumed / storage.SELF_INFLUENCE_FILE).exists()
    mp.spawn(_self_resume_rank_main, args=(2, _free_port(), str(project), str(resumed), 0, True), nprocs=2)
    assert not list(resumed.glob("scores.partial*"))
    a, b = load_file(whole / storage.SELF_INFLUENCE_FILE), load_file(resumed / storage.SELF_INFLUENCE_FILE)
    assert set(a) == set(b) and storage.SELF_LOSSES in a and "train_predictions" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _refused_rank_main(rank: int, world: int, port: int, config: str, out: str, stop_after: int) -> None:
    """One rank of pairwise compute-scores, as under torchrun: stopped (Ctrl-C) after `stop_after` of its batches
    when > 0, else resumed, its error (type and message) written to <out>/rank<rank>.json; collectives time out
    after 60 s, so a rank left waiting fails rather than hangs."""
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        from stopping import interrupt_after

        from influence_cli.config import load_config
        from influence_cli.distributed import DistState
        from influence_cli.errors import InfluenceError
        from influence_cli.scores import compute_scores

        cfg, st = load_config(config, [f"output_dir={out}"]), DistState(rank=rank, world_size=world)
        if stop_after:
            with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):  # both ranks stop at the same batch
                interrupt_after(m, "pairwise", stop_after)
                compute_scores(cfg, state=st)
            return
        said = None
        try:
            compute_scores(cfg, state=st, resume=True)
        except InfluenceError as exc:
            said = (type(exc).__name__, exc.message)
        Path(out, f"rank{rank}.json").write_text(json.dumps(said))
    finally:
        dist.destroy_process_group()


def _spawn_within(fn, args: tuple, seconds: float) -> None:
    """Two ranks of `fn`, failed (killed) when they have not both ended within `seconds`."""
    import time

    ranks = mp.spawn(fn, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the ranks did not end within {seconds:g} s: one waits for the other in a collective")


@pytest.mark.distributed
def test_a_rank_whose_score_pieces_are_refused_stops_every_rank(project, tmp_path):
    """Pairwise progress resumed under torchrun where one rank's saved score pieces do not tile its scores (a piece
    that repeats another's): that rank stops naming its piece, and the other stops with it, saying which rank stopped
    and why, where it scored on and then waited for it in a collective."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(project.parent / "out" / storage.FACTORS_FILE, out / storage.FACTORS_FILE)
    mp.spawn(_refused_rank_main, args=(2, _free_port(), str(project), str(out), 2), nprocs=2)
    first, second = (out / f"scores.partial.rank1.finished{i}.safetensors" for i in (0, 1))
    assert second.exists() and (out / "scores.partial.rank0.finished1.safetensors").exists()
    shutil.copy(first, second)  # rank 1's second piece repeats its first
    _spawn_within(_refused_rank_main, (2, _free_port(), str(project), str(out), 0), 90)
    said = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert said[1][0] == "OutputError" and "scores.partial.rank1.finished1.safetensors' holds the scores of query chunk 1, columns 0..8" in said[1][1]
    assert said[0] == ["DistributedError", f"rank 1 stopped: {said[1][1]}"]
    assert not list(out.glob("scores*.safetensors")) or all("partial" in p.name for p in out.glob("scores*.safetensors"))  # no rank wrote scores


def _counted_rank_main(rank: int, world: int, port: int, config: str, out: str, extra: list[str], keep: bool) -> None:
    """One rank's pairwise scores, each query pass's positions [q0, q1) written to <out>.passes<rank>.json; without
    `keep`, the layout never keeps the query chunks (each shard computes them again)."""
    import dataclasses

    import influence_cli.scores as scores_mod

    passes: list[list[int]] = []
    real, plan = scores_mod._Scorer.precondition, scores_mod.plan_layout

    def counted(self, queries, q0, q1, title):
        passes.append([q0, q1])
        return real(self, queries, q0, q1, title)

    scores_mod._Scorer.precondition = counted
    if not keep:
        scores_mod.plan_layout = lambda *args, **kwargs: dataclasses.replace(plan(*args, **kwargs), keep_queries=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from influence_cli.config import load_config
        from influence_cli.distributed import DistState

        scores_mod.compute_scores(load_config(config, [f"output_dir={out}", *extra]), state=DistState(rank=rank, world_size=world))
    finally:
        dist.destroy_process_group()
    Path(f"{out}.passes{rank}.json").write_text(json.dumps(passes))


@pytest.mark.distributed
def test_two_processes_keep_the_query_chunks_for_their_shards(project, tmp_path, runner):
    """Each rank scores 2 shards against 4 query chunks that the budget holds together: each chunk is computed once
    per rank, and the shards are bit for bit those of ranks that compute every chunk again for each shard."""
    head = ["--set", "factors.modules=[head]", "--set", f"output_dir={tmp_path / 'fit'}"]  # 18 weights a query: 7 queries in 504 bytes
    result = invoke(runner, "fit-factors", project, *head)
    assert result.exit_code == 0, result.stderr
    extra = ["factors.modules=[head]", f"scores.max_memory_mb={7 * 18 * 4 / 2**20}", "scores.query_chunk=2", "scores.relative=true"]
    for name, keep in (("kept", True), ("again", False)):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "fit" / storage.FACTORS_FILE, tmp_path / name / storage.FACTORS_FILE)
        mp.spawn(_counted_rank_main, args=(2, _free_port(), str(project), str(tmp_path / name), extra, keep), nprocs=2)
    passes = {name: [json.loads((tmp_path / f"{name}.passes{r}.json").read_text()) for r in (0, 1)] for name in ("kept", "again")}
    chunks = [[0, 2], [2, 4], [4, 6], [6, 7]]
    assert passes == {"kept": [chunks] * 2, "again": [chunks * 2] * 2}
    shards = json.loads((tmp_path / "kept" / storage.SCORES_INDEX).read_text())["shards"]
    assert [(s["train_start"], s["train_stop"]) for s in shards] == [(0, 16), (16, 22), (22, 38), (38, 45)]
    for shard in shards:
        kept, again = (load_file(tmp_path / name / shard["file"]) for name in ("kept", "again"))
        assert kept.keys() == again.keys() and all(torch.equal(kept[k], again[k]) for k in kept)


def test_image_grid_keeps_an_empty_section_with_its_note(tmp_path):
    """A query without negative scores: the opponents column stays, with the note in it."""
    import numpy as np
    from PIL import Image

    from influence_cli.image_grid import GridGroup, GridRow, Tile, save_image_grid

    tile = Tile(torch.rand(1, 8, 8), ["#1", "+0.5"], "proponent")
    row = GridRow(Tile(torch.rand(1, 8, 8), ["query #0"], "query"), [tile], [])
    bare = save_image_grid(tmp_path / "bare.png", GridGroup("influence", [row]))
    noted = save_image_grid(tmp_path / "noted.png", GridGroup("influence", [row], empty_notes=("no positive score", "no negative score")))
    narrow, wide = np.asarray(Image.open(bare)), np.asarray(Image.open(noted))
    assert wide.shape[1] > narrow.shape[1]  # the opponents column is there
    extra = wide[:, narrow.shape[1] :]
    assert (extra != extra[0, 0]).any()  # and holds the note's text


def _busy_rank_main(rank: int, world: int, port: int, config: str, out: str, results: str) -> None:
    """One rank of a compute-scores run whose output_dir another run is writing scores into."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from influence_cli.config import load_config
        from influence_cli.distributed import DistState
        from influence_cli.errors import OutputError
        from influence_cli.scores import compute_scores

        try:
            compute_scores(load_config(config, [f"output_dir={out}"]), state=DistState(rank=rank, world_size=world), overwrite=True)
            outcome = "ran"
        except OutputError as exc:
            outcome = exc.message
        Path(results, f"rank{rank}").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_every_rank_stops_before_touching_a_file_when_rank_0_cannot_lock(project, tmp_path):
    """Only rank 0 takes the lock; it tells the others, so no rank removes the holder's progress."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / storage.FACTORS_FILE).write_bytes((project.parent / "out" / storage.FACTORS_FILE).read_bytes())
    (out / storage.SCORES_PARTIAL.format(rank="")).write_bytes(b"the other run's progress")
    with storage.output_dir_lock(out, "scores"):
        mp.spawn(_busy_rank_main, args=(2, _free_port(), str(project), str(out), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert "is in use by another run writing its scores" in (tmp_path / f"rank{rank}").read_text()
    assert (out / storage.SCORES_PARTIAL.format(rank="")).read_bytes() == b"the other run's progress"


def test_a_nan_query_is_named_before_any_training_example_is_scored(tmp_path, runner):
    """The query predictions pass, which every rank runs whole, checks the outputs: under torchrun the
    refusal is printed once, by rank 0."""
    data = load_file(Path(__file__).resolve().parents[1] / "sample_data" / "digits.safetensors")
    data["inputs"] = data["inputs"].clone()
    data["inputs"][1503, 0, 2, 2] = float("nan")
    save_file(data, tmp_path / "nan.safetensors")
    sets = [f"output_dir={tmp_path / 'run'}", "device=cpu", "data.train.range=[0,200]"]
    sets_args = [x for s in sets for x in ("--set", s)]
    digits = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    assert invoke(runner, "fit-factors", digits, *sets_args).exit_code == 0
    query = "data.query={source: tensors, path: " + str(tmp_path / "nan.safetensors") + ", range: [1500, 1520], transform: {scale: 16.0}}"
    result = invoke(runner, "compute-scores", digits, *sets_args, "--set", query)
    assert result.exit_code == 6, result.stderr
    assert "data.query: non-finite outputs or gradients in batch 0 (examples with global indices 1503)" in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / storage.SCORES_FILE).exists()


def test_rank_by_loss_is_suggested_where_the_model_predicts_another_class_on_most_top_rows():
    """docs/MEMORIZATION.md: where the predicted class differs from the label on most self-influence rows, the
    model has not fit them and the loss ranks wrong labels better; on half of them or fewer, or without
    predictions or losses, nothing is said."""
    from influence_cli.topk import RankedExample, rank_by_loss_note

    ranked = [RankedExample(rank=i + 1, train_index=10 + i, train_position=i, train_label=i % 3, score=1.0, loss=1.0) for i in range(4)]
    predicted = torch.tensor([0, 0, 0, 0])  # labels 0, 1, 2, 0: 2 of 4 differ
    assert rank_by_loss_note(ranked, predicted, True) is None
    predicted = torch.tensor([1, 0, 0, 0])  # 3 of 4 differ
    note = rank_by_loss_note(ranked, predicted, True)
    assert note is not None and note.startswith("the model predicts another class than the label on 3 of these 4: it has not fit them")
    assert rank_by_loss_note(ranked, None, True) is None and rank_by_loss_note(ranked, predicted, False) is None
    assert rank_by_loss_note([], predicted, True) is None
