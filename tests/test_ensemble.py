"""Ensembles over checkpoints (scores.checkpoints): scores averaged over models, each with its own factors.

float64 math first (the one-pass ensemble against the mean of the members' explicit, dense
influence), then the pipeline on the tiny project (float32, as every loaded model is): the
ensemble run of fit-factors + compute-scores against separate single-model runs, the files,
the metadata, the refusals, and a CLI round trip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from exact import batches_of, tiny_mlp
from safetensors.torch import load_file, save_file
from test_scores import (
    N_QUERY,
    N_TRAIN,
    all_scores,
    explicit_grads,
    explicit_scores,
    explicit_self_and_norms,
    fitted,
    write_project,
)
from typer.testing import CliRunner

from influence_cli import storage
from influence_cli.cli import app
from influence_cli.config import config_from_dict
from influence_cli.ensemble import ensemble_members
from influence_cli.errors import ModelError, NumericalError, OutputError, UsageError
from influence_cli.fit import fit_factors
from influence_cli.kernel import ensemble_pairwise_scores, pairwise_scores
from influence_cli.models import mlp
from influence_cli.resume import PassCheckpoint
from influence_cli.scores import compute_scores
from influence_cli.topk import check_scores_match, load_scores_meta, load_self_influence, top_k

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SEEDS = (0, 1, 2)




# ----------------------------------------------------------------------------- the math (float64)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (13,), generator=g)
    xq = torch.randn(4, 5, generator=g, dtype=F64)
    yq = torch.randint(0, 3, (4,), generator=g)
    return x, y, xq, yq


def members_of(data, strategy: str = "ekfac"):
    """Three float64 MLPs (seeds 0, 1, 2), each with its own factors fitted on the same data."""
    out = []
    for seed in SEEDS:
        model = tiny_mlp(seed=seed)
        tracked, layers = fitted(model, data, strategy)
        out.append((model, tracked, layers))
    return out


@pytest.mark.parametrize("damping", ["auto", 0.05], ids=["damping-auto", "damping-0.05"])
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "identity"])
def test_ensemble_is_the_mean_of_the_members_dense_influence(data, strategy, damping):
    x, y, xq, yq = data
    members = members_of(data, strategy)
    got = ensemble_pairwise_scores(members, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping=damping)
    refs = []
    for model, tracked, layers in members:
        gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
        refs.append(explicit_scores(layers, gq, gt, damping) if strategy != "identity" else sum(gq[n] @ gt[n].T for n in gq))
    assert got.dtype == F64 and got.shape == (4, 13)
    torch.testing.assert_close(got, torch.stack(refs).mean(0), rtol=1e-9, atol=1e-10)
    separately = [pairwise_scores(m, t, lf, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping=damping) for m, t, lf in members]
    torch.testing.assert_close(got, torch.stack(separately).mean(0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(refs[0], refs[1])  # the members really differ


def test_ensemble_relative_divides_each_member_by_its_own_norm(data):
    x, y, xq, yq = data
    members = members_of(data)
    got = ensemble_pairwise_scores(members, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), relative=True)
    refs = []
    for model, tracked, layers in members:
        gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
        _, norms = explicit_self_and_norms(layers, gt, "auto")
        refs.append(explicit_scores(layers, gq, gt, "auto") / norms)
    torch.testing.assert_close(got, torch.stack(refs).mean(0), rtol=1e-9, atol=1e-10)


def test_one_member_ensemble_is_the_single_model(data):
    x, y, xq, yq = data
    (member,) = members_of(data)[:1]
    got = ensemble_pairwise_scores([member], batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0))
    torch.testing.assert_close(got, pairwise_scores(*member, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the pipeline (config, float32)


def write_members(folder: Path, dim: int = 6) -> list[str]:
    """Checkpoints of the tiny project's MLP with seeds 1 and 2 (member 0 is write_project's seed 0)."""
    names = []
    for seed in SEEDS[1:]:
        torch.manual_seed(seed)
        model = mlp(input_dim=dim, hidden=[5], num_classes=3)
        name = f"model_seed{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny project as a 3-model ensemble, with its factors fitted once (into <folder>/out)."""
    folder = tmp_path_factory.mktemp("ensemble")
    data = write_project(folder)
    data["scores"] = {"checkpoints": write_members(folder)}
    report = fit_factors(config_from_dict(data, base_dir=folder))
    assert [m.member for m in report.members] == [1, 2]
    return folder, data


def ensemble_cfg(project, out: str, *overrides: str):
    """The ensemble config writing to <folder>/<out>, with the fitted factors of every member copied there."""
    folder, data = project
    if out != "out" and not (folder / out).exists():
        shutil.copytree(folder / "out", folder / out, ignore=shutil.ignore_patterns("scores*", "self_influence*"))
    return config_from_dict(data, [f"output_dir={out}", *overrides], base_dir=folder)


def single_cfg(project, member: int, *overrides: str):
    """A one-model config of ensemble member `member`, in its own output_dir (with its factors copied)."""
    folder, data = project
    out = folder / f"single{member}"
    out.mkdir(exist_ok=True)
    src = storage.member_dir(folder / "out", member) / storage.FACTORS_FILE
    shutil.copy(src, out / storage.FACTORS_FILE)
    plain = {k: v for k, v in data.items() if k != "scores"}
    ckpt = "model.safetensors" if member == 0 else data["scores"]["checkpoints"][member - 1]
    return config_from_dict(plain, [f"output_dir=single{member}", f"model.checkpoint={ckpt}", *overrides], base_dir=folder)


def test_fit_factors_writes_every_members_factors_with_its_fingerprint(project):
    folder, data = project
    out = folder / "out"
    fingerprints = []
    for i in range(len(SEEDS)):
        path = storage.member_dir(out, i) / storage.FACTORS_FILE
        meta = storage.read_metadata(path)
        member = meta["ensemble_member"]
        assert member["member"] == i and member["model_fingerprint"] == meta["model_fingerprint"]
        assert member["key"] == ("model.checkpoint" if i == 0 else f"scores.checkpoints[{i - 1}]")
        fingerprints.append(meta["model_fingerprint"])
    assert len(set(fingerprints)) == len(SEEDS)
    assert (out / storage.MEMBERS_DIR / "1" / storage.FACTORS_FILE).is_file()


def test_a_member_checkpoint_that_does_not_fit_stops_the_job_before_any_pass(tmp_path):
    data = write_project(tmp_path)
    torch.manual_seed(1)
    other = mlp(input_dim=6, hidden=[7], num_classes=3)  # another hidden width
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    data["scores"] = {"checkpoints": [write_members(tmp_path)[0], "other.safetensors"]}
    with pytest.raises(ModelError, match=r"scores.checkpoints\[1\]: .*other.safetensors' does not match the model") as exc:
        fit_factors(config_from_dict(data, base_dir=tmp_path))
    assert not list((tmp_path / "out").rglob("*.safetensors"))  # model 0 was not fitted first
    # model.checkpoint fits model.kwargs: the fix is in scores.checkpoints, not in model.kwargs
    assert exc.value.hint.startswith("the models of an ensemble share model.architecture and model.kwargs")


def _with_diverged_member(folder: Path, member: int) -> dict:
    """The tiny project as a 3-model ensemble whose model `member` has a NaN weight (a seed whose training diverged)."""
    data = write_project(folder)
    names = ["model.safetensors", *write_members(folder)]
    state = {k: v.clone() for k, v in load_file(folder / names[member]).items()}
    state["fc1.weight"][0, 0] = float("nan")
    save_file(state, folder / "diverged.safetensors")
    names[member] = "diverged.safetensors"
    data["model"]["checkpoint"], data["scores"] = names[0], {"checkpoints": names[1:]}
    return data


@pytest.mark.parametrize("member", [0, 2], ids=["model.checkpoint", "scores.checkpoints[1]"])
def test_a_model_whose_passes_are_not_finite_is_named_by_its_key_and_file(tmp_path, member):
    data = _with_diverged_member(tmp_path, member)
    with pytest.raises(NumericalError) as exc:
        fit_factors(config_from_dict(data, base_dir=tmp_path))
    key = "model.checkpoint" if member == 0 else "scores.checkpoints[1]"
    assert exc.value.message.startswith(f"{key} ({tmp_path / 'diverged.safetensors'}): non-finite loss or gradient")
    fitted = [m.factors_path.is_file() for m in ensemble_members(config_from_dict(data, base_dir=tmp_path))]
    assert fitted == ([False, False, False] if member == 0 else [True, True, False])
    assert ("(those of the models before it stand)" in exc.value.hint) == (member > 0)


@pytest.mark.parametrize("self_influence", [False, True], ids=["pairwise", "self"])
def test_compute_scores_names_the_model_whose_gradients_are_not_finite(tmp_path, self_influence):
    data = _with_diverged_member(tmp_path, 2)
    data["factors"]["strategy"] = "identity"  # no factors to fit: the scoring passes meet the NaN
    with pytest.raises(NumericalError, match=r"^scores.checkpoints\[1\] \(.*diverged.safetensors\): non-finite loss or gradient"):
        compute_scores(config_from_dict(data, base_dir=tmp_path), self_influence=self_influence)
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_adding_a_checkpoint_later_fits_only_its_factors_with_resume(tmp_path):
    data = write_project(tmp_path)
    first, second = write_members(tmp_path)
    data["scores"] = {"checkpoints": [first]}
    fit_factors(config_from_dict(data, base_dir=tmp_path))
    data["scores"] = {"checkpoints": [first, second]}
    cfg = config_from_dict(data, base_dir=tmp_path)
    with pytest.raises(OutputError, match=r"already holds factors from a finished run; scores.checkpoints\[1\] of the ensemble has none yet") as exc:
        fit_factors(cfg)
    assert exc.value.hint.startswith("pass --resume to fit only the models without factors")
    report = fit_factors(cfg, resume=True)
    assert report.resumed_from == "already complete" and report.members[0].resumed_from == "already complete"
    assert report.members[1].resumed_from is None and report.members[1].path.is_file()
    assert compute_scores(cfg).members == 3


class _Fitted(Exception):
    """Raised by a stand-in of fit's compute_factors: a model's passes were reached."""


@pytest.mark.parametrize(
    ("flags", "member", "held", "refusal"),
    [
        ({}, 2, "program", "was not written by influence_cli (a safetensors file of another program, format pt)"),
        ({"resume": True}, 2, "program", "was not written by influence_cli"),
        ({"resume": True}, 1, "damaged", "is not a readable safetensors file (damaged, or not written by influence_cli)"),
        ({"resume": True}, 1, "scores", f"already holds scores (format {storage.SCORES_FORMAT}), not factors"),
        ({}, 2, "factors", "already holds factors from a finished run"),
        ({"resume": True}, 2, "factors", "holds factors of a finished run with other settings"),  # they record none
        ({"overwrite": True}, 2, "program", None),  # replaced
        ({"resume": True}, 1, "fifo", "already exists and is not a regular file (a FIFO, socket or device)"),  # never opened
        ({"overwrite": True}, 2, "folder", "is a folder, not a file"),  # never removed: model 0's factors are kept
    ],
    ids=["program", "program-resume", "damaged-resume", "scores-resume", "factors", "factors-resume", "program-overwrite", "fifo-resume",
         "folder-overwrite"],
)  # fmt: skip
def test_a_file_in_any_models_place_refuses_the_run_before_any_model_is_fitted(tmp_path, monkeypatch, flags, member, held, refusal):
    """fit-factors checks every model's factors file before it fits any: a file in a later model's place is refused as
    check_can_write says what it is, before model 0's passes run; with --resume, finished factors there are compared
    with this run's settings (these record none), and --overwrite replaces whatever is there but a folder."""
    import influence_cli.fit as fit_mod

    data = write_project(tmp_path)
    data["scores"] = {"checkpoints": write_members(tmp_path)}
    cfg = config_from_dict(data, base_dir=tmp_path)
    path = storage.member_dir(cfg.factors_path, member) / storage.FACTORS_FILE
    path.parent.mkdir(parents=True)
    if held == "program":
        save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    elif held == "damaged":
        path.write_bytes(b"damaged")
    elif held == "fifo":
        os.mkfifo(path)
        monkeypatch.setattr(storage, "read_metadata", lambda *a, **kw: pytest.fail("a FIFO was opened"))
    elif held == "folder":
        path.mkdir()
        storage.save_tensors(cfg.factors_path / storage.FACTORS_FILE, {"x": torch.zeros(1)}, {storage.FORMAT_KEY: storage.FACTORS_FORMAT})
    else:
        fmt = storage.SCORES_FORMAT if held == "scores" else storage.FACTORS_FORMAT
        storage.save_tensors(path, {"x": torch.zeros(1)}, {storage.FORMAT_KEY: fmt})
    before = path.read_bytes() if path.is_file() else None

    def stand_in(*args, **kwargs):
        raise _Fitted

    monkeypatch.setattr(fit_mod, "compute_factors", stand_in)
    if refusal is None:
        with pytest.raises(_Fitted):
            fit_factors(cfg, **flags)
        return
    with pytest.raises(OutputError) as exc:
        fit_factors(cfg, **flags)
    assert exc.value.message.startswith(f"{str(path)!r} ") and refusal in exc.value.message
    assert exc.value.hint.startswith("set output_dir to another place") == (held in ("program", "damaged", "scores", "fifo", "folder"))
    assert (path.read_bytes() == before) if before is not None else (path.is_fifo() or path.is_dir())
    assert (cfg.factors_path / storage.FACTORS_FILE).exists() == (held == "folder")


def _refusal_at_its_turn(cfg, member: int) -> OutputError:
    """What fit-factors --resume refuses when it reaches model `member` (fit's step for one model alone, without the
    ensemble's checks before model 0)."""
    import influence_cli.fit as fit_mod

    with pytest.raises(OutputError) as exc:
        fit_mod._fit_member(cfg, ensemble_members(cfg)[member], resume=True)
    return exc.value


def _no_model_is_fitted(monkeypatch) -> None:
    """A model's passes raise _Fitted; no tensor of a factors file or snapshot may be read (header reads only)."""
    import influence_cli.fit as fit_mod

    monkeypatch.setattr(fit_mod, "compute_factors", lambda *a, **k: (_ for _ in ()).throw(_Fitted()))
    monkeypatch.setattr(storage, "load_tensors", lambda path, *a, **k: pytest.fail(f"{path} was loaded"))
    monkeypatch.setattr(storage, "read_groups", lambda path, *a, **k: pytest.fail(f"{path} was loaded"))


@pytest.mark.parametrize(
    ("other", "changed"),
    [
        ("factors.strategy=kfac", "factors.strategy kfac -> ekfac"),
        ("factors.fisher=sampled", "factors.fisher sampled -> empirical"),
        ("data.train.range=[0, 30]", f"data.train, examples (factors.max_examples) 30 -> {N_TRAIN}"),
    ],
    ids=["strategy", "fisher", "dataset"],
)
def test_resume_refuses_a_later_models_factors_of_other_settings_before_any_model_is_fitted(project, monkeypatch, other, changed):
    """A later model's finished factors of other settings are refused up front, with the refusal its turn gives (the
    file, what changed, the fix), before model 0 is fitted: not once model 0's passes have run."""
    cfg = ensemble_cfg(project, f"later_{other.split('=')[0]}")
    fit_factors(ensemble_cfg(project, cfg.output_dir, other), overwrite=True)
    model_0 = cfg.factors_path / storage.FACTORS_FILE
    model_0.unlink()  # model 0 is to be fitted first
    later = storage.member_dir(cfg.factors_path, 1) / storage.FACTORS_FILE
    at_its_turn = _refusal_at_its_turn(cfg, 1)
    _no_model_is_fitted(monkeypatch)
    with pytest.raises(OutputError) as exc:
        fit_factors(cfg, resume=True)
    assert exc.value.message == at_its_turn.message == f"{str(later)!r} holds factors of a finished run with other settings ({changed})"
    assert exc.value.hint == at_its_turn.hint == "--resume continues interrupted runs only: pass --overwrite to recompute with these settings"
    assert exc.value.same_on_every_rank and not model_0.exists()


def test_resume_refuses_a_later_models_progress_of_other_settings_before_any_model_is_fitted(project, monkeypatch):
    """A later model's snapshot of another run (an interrupted kfac fit, resumed as ekfac) is refused up front, from its
    header, with the refusal its turn gives; so are its progress saved by another number of ranks and a damaged one."""
    cfg = ensemble_cfg(project, "later_progress")
    kfac = ensemble_cfg(project, "later_progress", "factors.strategy=kfac")
    snapshot = storage.member_dir(cfg.factors_path, 1) / storage.FACTORS_PARTIAL.format(rank="")
    save = PassCheckpoint.save

    def interrupted(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.path == snapshot:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(PassCheckpoint, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            fit_factors(kfac, overwrite=True)  # model 0 fitted, model 1 stopped after its first batch
    model_0 = cfg.factors_path / storage.FACTORS_FILE
    model_0.unlink()
    at_its_turn = _refusal_at_its_turn(cfg, 1)
    with monkeypatch.context() as patched:
        _no_model_is_fitted(patched)
        with pytest.raises(OutputError) as exc:
            fit_factors(cfg, resume=True)
    assert exc.value.message == at_its_turn.message == f"{str(snapshot)!r} is progress of a run with other settings (factors.strategy kfac -> ekfac)"
    assert exc.value.hint == at_its_turn.hint
    assert snapshot.is_file() and not model_0.exists()
    ranks = snapshot.with_name(storage.FACTORS_PARTIAL.format(rank=".rank1"))
    snapshot.rename(ranks)  # as a rank of a 2-rank job saved it
    at_its_turn = _refusal_at_its_turn(cfg, 1)
    with monkeypatch.context() as patched:
        _no_model_is_fitted(patched)
        with pytest.raises(OutputError) as exc:
            fit_factors(cfg, resume=True)
    assert exc.value.message == at_its_turn.message and "holds progress saved by a run with 2 rank(s)" in exc.value.message
    ranks.unlink()
    snapshot.write_bytes(b"damaged")
    at_its_turn = _refusal_at_its_turn(cfg, 1)
    with monkeypatch.context() as patched:
        _no_model_is_fitted(patched)
        with pytest.raises(OutputError) as exc:
            fit_factors(cfg, resume=True)
    assert exc.value.message == at_its_turn.message and exc.value.message.startswith(f"{str(snapshot)!r} ")
    assert not model_0.exists()


@pytest.mark.parametrize("saved_by", ["one process", "2 ranks", "fifo"])
def test_a_later_models_leftover_progress_refuses_the_run_before_any_model_is_fitted(project, monkeypatch, saved_by):
    """Without --resume or --overwrite, a later model's leftover progress (a snapshot, one saved by another number of
    ranks, a FIFO in its place) is refused before model 0 is fitted, with the refusal its turn gives: not once model 0's
    passes have run (--overwrite would then refit model 0 too). The up-front checks remove nothing: the temporary files
    killed writers left in model 1's folder, whose checks pass, stay (they were removed before model 2's refusal)."""
    import influence_cli.fit as fit_mod

    cfg = ensemble_cfg(project, f"leftover_{saved_by.replace(' ', '_')}")
    for m in ensemble_members(cfg):
        m.factors_path.unlink()
    temps = [storage.member_dir(cfg.factors_path, 1) / f".{storage.FACTORS_PARTIAL.format(rank=r)}.k1ll3d.tmp" for r in ("", ".rank1")]
    for tmp in temps:
        tmp.write_bytes(b"half")
    later = storage.member_dir(cfg.factors_path, 2)
    snapshot = later / storage.FACTORS_PARTIAL.format(rank=".rank1" if saved_by == "2 ranks" else "")
    if saved_by == "fifo":
        os.mkfifo(snapshot)
    else:
        PassCheckpoint(snapshot, {}, 1).save("covariance", 1, {})
    with pytest.raises(OutputError) as at_its_turn:
        fit_mod._fit_member(cfg, ensemble_members(cfg)[2])
    _no_model_is_fitted(monkeypatch)
    with pytest.raises(OutputError) as exc:
        fit_factors(cfg)
    assert exc.value.message == at_its_turn.value.message and exc.value.hint == at_its_turn.value.hint
    assert exc.value.message.startswith(repr(str(later if saved_by == "2 ranks" else snapshot)))
    assert not (cfg.factors_path / storage.FACTORS_FILE).exists() and (snapshot.is_file() or snapshot.is_fifo())
    assert all(tmp.read_bytes() == b"half" for tmp in temps)
    snapshot.unlink()
    with pytest.raises(_Fitted):
        fit_factors(cfg)


def test_a_later_models_temporary_files_are_removed_at_its_turn(project):
    """The temporary files killed writers left in a later model's folder (its snapshot's, another number of ranks'
    snapshot's, its factors'), which the up-front checks leave, are removed at its turn: a finished run leaves only
    the factors there."""
    cfg = ensemble_cfg(project, "later_temporary_files")
    for m in ensemble_members(cfg):
        m.factors_path.unlink()
    names = [storage.FACTORS_PARTIAL.format(rank=""), storage.FACTORS_PARTIAL.format(rank=".rank1"), storage.FACTORS_FILE]
    for index in (1, 2):
        for name in names:
            (storage.member_dir(cfg.factors_path, index) / f".{name}.k1ll3d.tmp").write_bytes(b"half")
    fit_factors(cfg)
    for index in (1, 2):
        assert [p.name for p in storage.member_dir(cfg.factors_path, index).iterdir()] == [storage.FACTORS_FILE]


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}], ids=["no-flag", "resume", "overwrite"])
def test_a_file_in_the_way_of_a_later_models_folder_refuses_the_run_before_any_model_is_fitted(project, monkeypatch, flags):
    """A file where a later model's folder goes (<factors_dir>/members) is refused before model 0 is fitted, as that
    model's turn refuses it; with --overwrite it gave a traceback (model 0's removal of the other models' factors)."""
    cfg = ensemble_cfg(project, f"in_the_way_{'_'.join(flags) or 'none'}")
    shutil.rmtree(cfg.factors_path / storage.MEMBERS_DIR)
    (cfg.factors_path / storage.MEMBERS_DIR).write_text("not a folder")
    model_0 = cfg.factors_path / storage.FACTORS_FILE
    model_0.unlink()
    _no_model_is_fitted(monkeypatch)
    with pytest.raises(OutputError) as exc:
        fit_factors(cfg, **flags)
    in_the_way = cfg.factors_path / storage.MEMBERS_DIR
    assert exc.value.message == f"output_dir: cannot create {str(storage.member_dir(cfg.factors_path, 1))!r}: {str(in_the_way)!r} is a file, not a folder"
    assert not model_0.exists() and in_the_way.read_text() == "not a folder"


def test_a_run_refused_before_its_later_models_leaves_no_folder_for_them(project, monkeypatch):
    """The later models' folders are checked up front but created only at their turns: a run refused before then
    (here: model 0 cannot be fitted) leaves none behind in a factors_dir that was there before it."""
    cfg = ensemble_cfg(project, "no_member_folders")
    shutil.rmtree(cfg.factors_path / storage.MEMBERS_DIR)
    (cfg.factors_path / storage.FACTORS_FILE).unlink()
    _no_model_is_fitted(monkeypatch)
    with pytest.raises(_Fitted):
        fit_factors(cfg)
    assert not (cfg.factors_path / storage.MEMBERS_DIR).exists()


@pytest.mark.parametrize("rank", ["", ".rank1"], ids=["one-process", "rank1"])
def test_overwrite_refuses_a_folder_at_a_later_models_progress_before_anything_is_removed(project, monkeypatch, rank):
    """--overwrite removes the later models' factors and progress once model 0's checks pass, but never a folder: one at
    a later model's progress path is refused before any model is fitted or any file removed (it gave a traceback)."""
    cfg = ensemble_cfg(project, f"progress_folder{rank}")
    folder = storage.member_dir(cfg.factors_path, 2) / storage.FACTORS_PARTIAL.format(rank=rank)
    folder.mkdir()
    _no_model_is_fitted(monkeypatch)
    with pytest.raises(OutputError) as exc:
        fit_factors(cfg, overwrite=True)
    assert exc.value.message == f"{str(folder)!r} is a folder, not a file"
    assert folder.is_dir() and all(m.factors_path.is_file() for m in ensemble_members(cfg))


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "relative"])
def test_ensemble_scores_equal_the_mean_of_single_model_runs(project, relative):
    flag = f"scores.relative={str(relative).lower()}"
    cfg = ensemble_cfg(project, "ens_" + ("rel" if relative else "plain"), flag)
    report = compute_scores(cfg)
    assert report.members == 3 and report.n_query == N_QUERY and report.n_train == N_TRAIN
    got = all_scores(cfg.output_path)
    singles = []
    for i in range(len(SEEDS)):
        single = single_cfg(project, i, flag)
        compute_scores(single, overwrite=True)
        singles.append(all_scores(single.output_path))
    torch.testing.assert_close(got, torch.stack(singles).mean(0), rtol=1e-5, atol=1e-6 * float(got.abs().max()))
    tensors, meta = storage.load_tensors(report.paths[0], storage.SCORES_FORMAT)
    assert ("train_norms" in tensors) is False  # per-member norms do not combine into one
    members = meta["members"]
    assert [m["member"] for m in members] == [0, 1, 2]
    assert [m["model_fingerprint"] for m in members] == [
        storage.read_metadata(storage.member_dir(cfg.output_path, i) / storage.FACTORS_FILE)["model_fingerprint"] for i in range(3)
    ]
    assert members[2]["factors"]["file"] == f"{storage.MEMBERS_DIR}/2/{storage.FACTORS_FILE}"


def test_an_ensemble_reads_every_members_factors_from_factors_dir(project):
    """factors_dir holds the whole fit, members/<i>/ included: another output_dir scores from it
    exactly what the fit's own folder scores, and top-k checks every member's factors there."""
    folder, data = project
    shared = config_from_dict(data, ["output_dir=ens_shared", f"factors_dir={folder / 'out'}"], base_dir=folder)
    assert [m.factors_path for m in ensemble_members(shared)] == [
        storage.member_dir(folder / "out", i) / storage.FACTORS_FILE for i in range(len(SEEDS))
    ]
    compute_scores(shared)
    assert sorted(p.name for p in shared.output_path.iterdir()) == [storage.SCORES_FILE]
    own = ensemble_cfg(project, "ens_own")
    compute_scores(own)
    assert torch.equal(all_scores(shared.output_path), all_scores(own.output_path))
    check_scores_match(load_scores_meta(shared.output_path).metadata, shared, shared.output_path)  # top-k's check


def test_top_k_refuses_ensemble_scores_of_other_member_models_and_plain_without_norms(project):
    """A reordered or replaced scores.checkpoints list is not the ensemble the scores averaged; an ensemble's
    RelatIF scores keep no norms, so plain=True is refused, not ignored."""
    folder, data = project
    cfg = ensemble_cfg(project, "ens_members")
    compute_scores(cfg)
    meta = load_scores_meta(cfg.output_path)
    check_scores_match(meta.metadata, cfg, cfg.output_path)
    swapped = config_from_dict(data, ["output_dir=ens_members", f"scores.checkpoints={list(reversed(data['scores']['checkpoints']))}"], base_dir=folder)
    with pytest.raises(OutputError, match=r"averaged over another model as scores.checkpoints\[0\]") as info:
        check_scores_match(meta.metadata, swapped, cfg.output_path)
    assert info.value.message.startswith(f"{str(cfg.output_path)!r} holds scores")  # the scores named, not the checkpoint
    relative = ensemble_cfg(project, "ens_members_rel", "scores.relative=true")
    compute_scores(relative)
    with pytest.raises(UsageError, match="keep no norms to undo the division"):
        top_k(relative.output_path, [0], 2, plain=True)


def test_top_k_refuses_ensemble_scores_when_a_sharded_members_shard_is_replaced(project):
    """A member named by a sharded checkpoint's index: the scores record the shards' sizes and times too, so a shard
    replaced by other weights (the index untouched) is hashed again and refused, not passed as the file the scores saw."""
    from safetensors.torch import load_file

    folder, data = project
    state = load_file(folder / "model_seed1.safetensors")
    names = sorted(state)
    shards = {"seed1-00001-of-00002.safetensors": names[:2], "seed1-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard)
    (folder / "seed1.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    members = ["seed1.safetensors.index.json", *data["scores"]["checkpoints"][1:]]
    cfg = ensemble_cfg(project, "ens_index", f"scores.checkpoints={members}")
    compute_scores(cfg)
    meta = load_scores_meta(cfg.output_path)
    check_scores_match(meta.metadata, cfg, cfg.output_path)
    other = load_file(folder / "model_seed2.safetensors")
    save_file({k: other[k] for k in names[2:]}, folder / "seed1-00002-of-00002.safetensors")
    with pytest.raises(OutputError, match=r"averaged over another model as scores.checkpoints\[0\]"):
        check_scores_match(meta.metadata, cfg, cfg.output_path)


def test_a_member_with_the_same_weights_as_another_is_refused_before_any_pass(project, tmp_path):
    """A copy (or hard link) of model.checkpoint in scores.checkpoints would weigh twice in the average."""
    from influence_cli.errors import ConfigError

    folder, data = project
    (folder / "copy_of_model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = config_from_dict(data, [f"output_dir={tmp_path / 'dup'}", "scores.checkpoints=[model_seed1.safetensors, copy_of_model.safetensors]"],
                           base_dir=folder, source="ensemble.yaml")  # fmt: skip
    with pytest.raises(ConfigError, match=r"^ensemble\.yaml: scores.checkpoints\[1\]: holds the same weights as model.checkpoint"):
        fit_factors(cfg)  # the file named, as every config error names it
    assert not (tmp_path / "dup").exists()
    with pytest.raises(ConfigError, match="holds the same weights as model.checkpoint"):  # factors fitted by an earlier version
        compute_scores(ensemble_cfg(project, "ens_dup", "scores.checkpoints=[model_seed1.safetensors, copy_of_model.safetensors]"))


def test_dataset_similarity_says_it_compares_with_model_checkpoint_alone(project, caplog):
    from influence_cli.similarity import dataset_similarity

    sets = "{a: {source: tensors, path: data.safetensors, range: [0, 20]}, b: {source: tensors, path: data.safetensors, range: [20, 40]}}"
    cfg = ensemble_cfg(project, "ens_similarity", f"similarity.datasets={sets}")
    with caplog.at_level("WARNING", logger="influence_cli"):
        dataset_similarity(cfg)
    assert "dataset-similarity: only model.checkpoint is compared with, not the 2 model(s) of scores.checkpoints" in caplog.text


def test_edit_says_how_to_edit_another_model_with_the_factors_fit_factors_wrote_for_it(project, caplog):
    from influence_cli.edit import edit_checkpoint

    folder, data = project
    cfg = ensemble_cfg(project, "ens_edit")
    with caplog.at_level("WARNING", logger="influence_cli"):
        edit_checkpoint(cfg, folder / "edited0.safetensors", share=0.5)
    members = folder / "ens_edit" / storage.MEMBERS_DIR
    assert "only model.checkpoint is edited, not the 2 models of scores.checkpoints" in caplog.text
    assert f"--set model.checkpoint=<it> --set scores.checkpoints=[] --set factors_dir={members}/<i>" in caplog.text
    second = data["scores"]["checkpoints"][1]  # as told, for scores.checkpoints[1]: its factors, no refit
    alone = ensemble_cfg(project, "ens_edit", f"model.checkpoint={second}", "scores.checkpoints=[]", f"factors_dir={members}/2")
    report = edit_checkpoint(alone, folder / "edited2.safetensors", share=0.5)
    assert report.source_fingerprint == storage.read_metadata(members / "2" / storage.FACTORS_FILE)["model_fingerprint"]


def test_ensemble_self_influence_is_the_mean_of_the_members(project):
    cfg = ensemble_cfg(project, "ens_self")
    assert compute_scores(cfg, self_influence=True).members == 3
    got = load_self_influence(cfg.output_path)
    singles = []
    for i in range(len(SEEDS)):
        single = single_cfg(project, i)
        compute_scores(single, self_influence=True, overwrite=True)
        singles.append(load_self_influence(single.output_path))
    want = torch.stack([s.values for s in singles]).mean(0)
    torch.testing.assert_close(got.values, want, rtol=1e-5, atol=1e-6 * float(got.values.abs().max()))
    torch.testing.assert_close(got.train_losses, torch.stack([s.train_losses for s in singles]).mean(0))  # so are the training losses


@pytest.mark.parametrize("self_influence", [False, True], ids=["pairwise", "self"])
def test_ensemble_per_layer_parts_are_averaged_over_the_members(project, self_influence):
    """scores.by_layer with an ensemble: each layer's part is the mean of the members' parts (RelatIF: each
    divided by its member's own norm), and the parts sum to the averaged scores."""
    key, total = (storage.SELF_BY_LAYER, "self_influence") if self_influence else (storage.SCORES_BY_LAYER, "scores")
    flags = [] if self_influence else ["scores.relative=true"]
    report = compute_scores(ensemble_cfg(project, f"ens_by_layer_{total}", *flags), self_influence=self_influence, by_layer=True)
    tensors = storage.load_tensors(report.paths[0])[0]
    parts = tensors[key]
    assert report.by_layer == ["fc1", "head"] and parts.shape[0] == 2
    peak = float(tensors[total].abs().max())
    torch.testing.assert_close(parts.sum(0), tensors[total], rtol=1e-5, atol=1e-6 * peak)
    singles = []
    for i in range(len(SEEDS)):
        single = single_cfg(project, i, *flags)
        singles.append(storage.load_tensors(compute_scores(single, self_influence=self_influence, by_layer=True, overwrite=True).paths[0])[0][key])
    torch.testing.assert_close(parts, torch.stack(singles).mean(0), rtol=1e-5, atol=1e-6 * peak)


def test_sharded_and_chunked_ensemble_equals_one_block(project, monkeypatch):
    """Each member checked (model_checks) once on each distinct first batch, though streamed for every chunk and shard."""
    import influence_cli.model_checks as model_checks

    whole = ensemble_cfg(project, "ens_whole")
    compute_scores(whole)
    cfg = ensemble_cfg(project, "ens_sharded", "scores.query_chunk=3", "scores.max_memory_mb=0.0005")
    checked: dict[int, int] = {}
    real = model_checks.check_weight_gradients
    monkeypatch.setattr(model_checks, "check_weight_gradients", lambda model, *a: checked.update({id(model): checked.get(id(model), 0) + 1}) or real(model, *a))
    report = compute_scores(cfg)
    assert report.sharded and report.query_chunks == 3 and report.members == 3
    assert list(checked.values()) == [3 + report.num_shards] * 3  # each member: 3 query chunks, each shard
    expected = all_scores(whole.output_path)
    torch.testing.assert_close(all_scores(cfg.output_path), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_an_ensemble_scores_the_same_with_its_query_chunks_kept(project, monkeypatch):
    """Every member's preconditioned queries of each chunk computed once and kept for every shard (the layout's
    keep_queries, forced here: the budget holds no more than a chunk) score bit for bit as computed for each shard."""
    import dataclasses

    import influence_cli.scores as scores_mod

    plan, passes = scores_mod.plan_layout, []
    real = scores_mod._Scorer.precondition
    monkeypatch.setattr(scores_mod._Scorer, "precondition", lambda self, *args: passes.append(args[1:3]) or real(self, *args))
    settings = ["scores.query_chunk=3", "scores.max_memory_mb=0.0005", "scores.relative=true"]
    again = compute_scores(ensemble_cfg(project, "ens_again", *settings), by_layer=True)
    assert again.num_shards > 1 and again.query_chunks == 3 and len(passes) == 3 * again.num_shards
    passes.clear()
    monkeypatch.setattr(scores_mod, "plan_layout", lambda *a, **kw: dataclasses.replace(plan(*a, **kw), keep_queries=True))
    kept = compute_scores(ensemble_cfg(project, "ens_kept", *settings), by_layer=True)
    assert passes == [(0, 3), (3, 6), (6, 7)]
    assert again.paths[0].name == storage.SCORES_INDEX
    for x, y in zip(again.paths[1:], kept.paths[1:], strict=True):  # the shards
        a, b = storage.load_tensors(x)[0], storage.load_tensors(y)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_member_factors_are_a_clear_error(project):
    cfg = ensemble_cfg(project, "ens_missing")
    (storage.member_dir(cfg.output_path, 2) / storage.FACTORS_FILE).unlink()
    with pytest.raises(OutputError) as info:
        compute_scores(cfg)
    assert "scores.checkpoints[1]" in info.value.message and "members/2/factors.safetensors" in info.value.message
    assert "fit-factors" in (info.value.hint or "")


def test_member_factors_of_another_model_are_refused(project):
    cfg = ensemble_cfg(project, "ens_swapped")
    one, two = (storage.member_dir(cfg.output_path, i) / storage.FACTORS_FILE for i in (1, 2))
    shutil.copy(one, two)
    with pytest.raises(OutputError, match="fitted for another model"):
        compute_scores(cfg)


def test_another_member_checkpoint_is_not_already_complete_for_resume(project):
    folder, data = project
    cfg = ensemble_cfg(project, "ens_resume")
    compute_scores(cfg)
    assert compute_scores(cfg, resume=True).resumed_from == "already complete"
    torch.manual_seed(3)
    model = mlp(input_dim=6, hidden=[5], num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model_seed3.safetensors")
    other = ensemble_cfg(project, "ens_resume", "scores.checkpoints=[model_seed1.safetensors, model_seed3.safetensors]")
    with pytest.raises(OutputError, match=r"^scores.checkpoints\[1\] \(.*model_seed3.safetensors\): .* was fitted for another model"):
        compute_scores(other, resume=True)  # member 2's factors belong to seed 2: the message names the listed checkpoint
    fit_factors(other, overwrite=True)
    report = compute_scores(other, overwrite=True)
    assert report.resumed_from != "already complete" and report.members == 3


# ----------------------------------------------------------------------------- the CLI


def test_cli_round_trip(tmp_path):
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    data = write_project(tmp_path, dim=16)
    data["scores"] = {"checkpoints": write_members(tmp_path, dim=16)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))

    helped = " ".join(runner.invoke(app, ["fit-factors", "--help"]).stdout.split())
    assert "those of scores.checkpoints[N - 1] into members/N/ beside factors.safetensors" in helped  # where they go, as written
    result = runner.invoke(app, ["fit-factors", str(config), "--json"])
    assert result.exit_code == 0, result.stderr
    fitted_report = json.loads(result.stdout)
    assert [m["path"] for m in fitted_report["members"]] == [
        str(tmp_path / "out" / storage.MEMBERS_DIR / str(i) / storage.FACTORS_FILE) for i in (1, 2)
    ]
    result = runner.invoke(app, ["fit-factors", str(config), "--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert "ensemble member 2" in " ".join(result.stderr.split())

    result = runner.invoke(app, ["compute-scores", str(config), "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["members"] == 3
    result = runner.invoke(app, ["compute-scores", str(config), "--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert "ensemble of 3 models" in " ".join(result.stdout.split())
    result = runner.invoke(app, ["top-k", str(config), "--query", "0", "--k", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    (ranking,) = json.loads(result.stdout)["queries"]
    assert [e["train_index"] for e in ranking["proponents"]] == [e.train_index for e in top_k(tmp_path / "out", [0], 3)[0].proponents]

    (tmp_path / "out" / storage.MEMBERS_DIR / "1" / storage.FACTORS_FILE).unlink()
    result = runner.invoke(app, ["compute-scores", str(config), "--overwrite"])
    assert result.exit_code != 0
    message = " ".join(result.stderr.split())
    assert "scores.checkpoints[0]" in message and "fit-factors" in message
    result = runner.invoke(app, ["fit-factors", str(config), "--resume"])  # each model says where it started
    assert result.exit_code == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stderr.splitlines()]
    assert any(line.startswith("ensemble member 0: ") and line.endswith("is already complete for these settings") for line in lines), lines
    assert any(line.startswith("saved ensemble member 1: ") for line in lines) and not any(line.startswith("saved ensemble member 0") for line in lines)


# ----------------------------------------------------------------------------- 2 processes (gloo)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensemble_rank(rank: int, world: int, port: int, data: dict, folder: str, out: str) -> None:
    """One rank of an ensemble job: fit-factors for all members, then pairwise scores, as under torchrun."""
    import os

    import torch.distributed as dist

    from influence_cli.distributed import DistState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = config_from_dict(data, [f"output_dir={out}"], base_dir=folder)
        state = DistState(rank=rank, world_size=world)
        fit_factors(cfg, state=state)
        compute_scores(cfg, state=state)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_fit_and_score_an_ensemble_like_one_process(project):
    """Every member's factors are all-reduced over the ranks' shards; the ranks' score shards are the one-process matrix."""
    import torch.multiprocessing as mp

    folder, data = project
    mp.spawn(_ensemble_rank, args=(2, _free_port(), data, str(folder), "dist2"), nprocs=2)
    dist_out, ref_out = folder / "dist2", folder / "out"
    for member in range(len(SEEDS)):
        got = storage.load_tensors(storage.member_dir(dist_out, member) / storage.FACTORS_FILE, storage.FACTORS_FORMAT)[0]
        ref = storage.load_tensors(storage.member_dir(ref_out, member) / storage.FACTORS_FILE, storage.FACTORS_FORMAT)[0]
        assert got.keys() == ref.keys()
        for key in (k for k in ref if not k.endswith("eigenvectors")):  # eigenvectors: up to sign
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6 * float(ref[key].abs().max()))
    index = json.loads((dist_out / storage.SCORES_INDEX).read_text())
    assert len(index["shards"]) == 2  # one per rank
    single = ensemble_cfg(project, "single_ens")
    compute_scores(single)
    ref_scores = all_scores(single.output_path)
    torch.testing.assert_close(all_scores(dist_out), ref_scores, rtol=1e-4, atol=1e-5 * float(ref_scores.abs().max()))


def test_each_member_runs_the_first_batch_checks_once(project, data, monkeypatch):
    """The members share one stream of batches each (itertools.tee), so the model checks run on each
    member's first batch only, in compute-scores and in the in-memory ensemble."""
    import influence_cli.model_checks as model_checks

    calls = []
    original = model_checks.check_weight_gradients
    monkeypatch.setattr(model_checks, "check_weight_gradients", lambda *a, **k: calls.append(1) or original(*a, **k))
    compute_scores(ensemble_cfg(project, "ens_checks"), self_influence=True)
    assert len(calls) == 3  # one training pass, three members
    x, y, xq, yq = data
    members = members_of(data)  # (their fits run the checks too: two passes each)
    calls.clear()
    ensemble_pairwise_scores(members, batches_of(xq, yq, 2)(0), batches_of(x, y, 4)(0))
    assert len(calls) == 6  # the query pass and the training pass of each of three members


def test_an_interrupted_ensemble_overwrite_resumes(project, tmp_path, monkeypatch):
    """--overwrite removes every model's factors as the run starts, so --resume continues past the
    models whose old factors (of other settings) were not refitted yet."""
    import influence_cli.fit as fit_mod

    cfg = ensemble_cfg(project, "overwrite")
    changed = ensemble_cfg(project, "overwrite", "factors.strategy=kfac", "factors.checkpoint_every=1")
    real, seen = fit_mod.stream_gradients, [0]

    def interrupted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            if seen[0] == 1:
                raise KeyboardInterrupt
            seen[0] += 1
            yield batch

    monkeypatch.setattr(fit_mod, "stream_gradients", interrupted)
    stale = cfg.output_path / "members" / "2" / storage.FACTORS_PARTIAL.format(rank="")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"progress of an older run, in a model the new run has not reached")
    with pytest.raises(KeyboardInterrupt):
        fit_factors(changed, overwrite=True)
    monkeypatch.undo()
    assert not list(cfg.output_path.rglob("factors.safetensors"))  # no old factors left looking current
    assert not stale.exists()  # nor its progress, which --resume would refuse
    report = fit_factors(changed, resume=True)
    assert report.strategy == "kfac" and [m.strategy for m in report.members] == ["kfac", "kfac"]


def test_a_failed_ensemble_overwrite_keeps_the_old_factors(project):
    """--overwrite removes the old factors only once the first model's checks pass (a typo keeps them)."""
    cfg = ensemble_cfg(project, "typo")
    before = sorted(str(p.relative_to(cfg.output_path)) for p in cfg.output_path.rglob("factors.safetensors"))
    with pytest.raises(ModelError, match="'nope' names no module"):
        fit_factors(ensemble_cfg(project, "typo", "factors.modules=[nope]"), overwrite=True)
    assert sorted(str(p.relative_to(cfg.output_path)) for p in cfg.output_path.rglob("factors.safetensors")) == before == [
        "factors.safetensors", "members/1/factors.safetensors", "members/2/factors.safetensors"]


def _rank_outcome(rank: int, world: int, port: int, data: dict, folder: str, seen: str | None, resume: bool) -> None:
    """One rank of fit-factors (`resume`) on the ensemble of `data`, whose passes raise _Fitted; with `seen`, only rank 0
    sees the file there (a later model's place: a file that appeared between the ranks' checks, or a folder not shared
    by every rank). Each rank's outcome goes to <folder>/rank<r>.json."""
    import datetime
    import os

    import torch.distributed as dist

    import influence_cli.fit as fit_mod
    from influence_cli.distributed import DistState
    from influence_cli.errors import InfluenceError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    check = storage.check_can_write
    if seen is not None and rank == 1:  # this rank does not see the file
        storage.check_can_write = lambda path, *a, **k: None if str(path) == seen else check(path, *a, **k)  # type: ignore[assignment]
    fit_mod.compute_factors = lambda *a, **k: (_ for _ in ()).throw(_Fitted())  # no model is fitted
    outcome: dict = {}
    try:
        fit_factors(config_from_dict(data, base_dir=folder), resume=resume, state=DistState(rank=rank, world_size=world))
    except InfluenceError as exc:
        outcome = {"type": type(exc).__name__, "message": exc.message, "everywhere": exc.same_on_every_rank}
    except _Fitted:
        outcome = {"type": "fitted"}
    finally:
        Path(folder, f"rank{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.mark.distributed
def test_a_file_in_a_later_models_place_that_only_rank_0_sees_stops_every_rank_before_any_pass(tmp_path):
    """The ensemble's up-front check of every model's place runs as one agreed step: when only rank 0 refuses a file
    there, rank 1 stops with a DistributedError naming rank 0's refusal, instead of going on to its model loads and
    failing in the next collective once rank 0 has left."""
    import torch.multiprocessing as mp

    data = write_project(tmp_path)
    data["scores"] = {"checkpoints": write_members(tmp_path)}
    cfg = config_from_dict(data, base_dir=tmp_path)
    path = storage.member_dir(cfg.factors_path, 2) / storage.FACTORS_FILE
    path.parent.mkdir(parents=True)
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    mp.spawn(_rank_outcome, args=(2, _free_port(), data, str(tmp_path), str(path), False), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["type"] == "OutputError" and rank0["message"].startswith(f"{str(path)!r} already exists and was not written by influence_cli")
    assert rank1 == {"type": "DistributedError", "message": f"rank 0 stopped: {rank0['message']}", "everywhere": False}
    assert not (cfg.factors_path / storage.FACTORS_FILE).exists()


@pytest.mark.distributed
@pytest.mark.parametrize("held", ["factors", "snapshot"])
def test_two_ranks_refuse_a_later_models_files_of_other_settings_before_any_pass(tmp_path, held):
    """Under torchrun, --resume's up-front check of the later models is one agreed step: finished factors of other
    settings stop both ranks alike (said once); rank 1's own snapshot of another run stops rank 1 with its refusal and
    rank 0 with a DistributedError naming it, before model 0's passes on either rank."""
    import torch.multiprocessing as mp

    data = write_project(tmp_path)
    data["scores"] = {"checkpoints": write_members(tmp_path)}
    cfg = config_from_dict(data, base_dir=tmp_path)
    kfac = config_from_dict(data, ["factors.strategy=kfac"], base_dir=tmp_path)
    fit_factors(kfac)
    (cfg.factors_path / storage.FACTORS_FILE).unlink()  # model 0 is to be fitted first
    member = ensemble_members(cfg)[1]
    if held == "factors":
        path = member.factors_path
        expected = f"{str(path)!r} holds factors of a finished run with other settings (factors.strategy kfac -> ekfac)"
    else:  # what rank 1 of an interrupted 2-rank kfac fit of model 1 saved (its header: no tensor is read up front)
        result = storage.read_metadata(member.factors_path)["result"]
        for m in ensemble_members(cfg)[1:]:
            m.factors_path.unlink()
        path = member.out_dir / storage.FACTORS_PARTIAL.format(rank=".rank1")
        PassCheckpoint(path, result | {"batch_size": kfac.data.batch_size, "world": 2}, 1).save("covariance", 1, {})
        expected = f"{str(path)!r} is progress of a run with other settings (factors.strategy kfac -> ekfac)"
    mp.spawn(_rank_outcome, args=(2, _free_port(), data, str(tmp_path), None, True), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1 == {"type": "OutputError", "message": expected, "everywhere": held == "factors"}
    if held == "factors":
        assert rank0 == rank1
    else:
        assert rank0 == {"type": "DistributedError", "message": f"rank 1 stopped: {expected}", "everywhere": False}
    assert path.is_file() and not (cfg.factors_path / storage.FACTORS_FILE).exists()
