"""Interruption and resume of fit-factors, atomic outputs, and bit-identical reruns.

In-process tests interrupt the pass by raising KeyboardInterrupt from inside the
batch stream; subprocess tests kill a real `influence fit-factors` with SIGKILL or
stop it with SIGINT (Ctrl-C). A resumed run must give factors bit-identical
(torch.equal) to an uninterrupted one: the data order is fixed and the sampled
labels depend only on (seed, example index).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launch import subprocess_env
from safetensors import safe_open
from safetensors.torch import load_file
from stopping import assert_same_tensors

import influence_cli.fit as fit
from influence_cli import storage
from influence_cli.config import FactorsConfig, load_config
from influence_cli.distributed import DistState
from influence_cli.errors import DistributedError, OutputError
from influence_cli.resume import DatasetsProgress, PassCheckpoint, Snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
PARTIAL = storage.FACTORS_PARTIAL.format(rank="")

# 1500 digits in batches of 64: 24 batches per pass, a snapshot every 2 batches.
FAST = ["device=cpu", "data.batch_size=64", "factors.checkpoint_every=2"]
BATCHES_PER_PASS = 24

# The subprocess runs: 47 batches per pass, a snapshot every 5, slowed down (see SLOW_CLI).
SLOW = ["device=cpu", "data.batch_size=32", "factors.checkpoint_every=5"]
BATCH_DELAY_S = 0.03

# The real CLI with each batch slowed down, so that a signal lands mid-pass whatever the machine;
# with HOLD_AT=n it also stops after its n-th batch until a signal comes (however loaded the machine).
SLOW_CLI = f"""
import os, sys, time
import influence_cli.fit as fit

_stream = fit.stream_gradients
_hold_at = int(os.environ.get("HOLD_AT", "0"))
_seen = 0

def slow_stream(*args, **kwargs):
    global _seen
    for batch in _stream(*args, **kwargs):
        time.sleep({BATCH_DELAY_S})
        _seen += 1
        if _seen == _hold_at:
            time.sleep(600)
        yield batch

fit.stream_gradients = slow_stream
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""




def config(out: Path, *overrides: str):
    return load_config(CONFIG, [f"output_dir={out}", *FAST, *overrides])


def factors_of(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / storage.FACTORS_FILE)


def assert_bit_identical(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(ref)
    different = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not different, f"tensors differ: {different}"


def leftovers(out: Path) -> list[str]:
    """Files that look like factors but are not a finished, complete factors file."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".factors") or p.name.endswith(".tmp"))


def interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Ctrl-C (KeyboardInterrupt) after `batches` batches, counted over all passes."""
    real = fit.stream_gradients
    seen = [0]

    def stream(*args, **kwargs):
        for batch in real(*args, **kwargs):
            if seen[0] == batches:
                raise KeyboardInterrupt
            seen[0] += 1
            yield batch

    monkeypatch.setattr(fit, "stream_gradients", stream)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Uninterrupted factors under the FAST settings, per strategy."""
    out = {}
    for strategy in ("ekfac", "diagonal"):
        folder = tmp_path_factory.mktemp(f"reference-{strategy}")
        fit.fit_factors(config(folder, f"factors.strategy={strategy}"))
        out[strategy] = factors_of(folder)
    return out


# ---------------------------------------------------------------------------
# In process: KeyboardInterrupt inside the pass.


@pytest.mark.parametrize(
    ("strategy", "cut", "resumed_from"),
    [
        ("ekfac", 7, "covariance pass, batch 6"),
        ("ekfac", BATCHES_PER_PASS + 1, "correction pass, batch 0"),
        ("ekfac", BATCHES_PER_PASS + 7, "correction pass, batch 6"),
        ("diagonal", 11, "diagonal pass, batch 10"),
    ],
    ids=["ekfac-covariance-pass", "ekfac-before-first-correction-snapshot", "ekfac-correction-pass", "diagonal"],
)
def test_interrupted_run_resumes_bit_identically(tmp_path, monkeypatch, reference, strategy, cut, resumed_from):
    cfg = config(tmp_path, f"factors.strategy={strategy}")
    interrupt_after(monkeypatch, cut)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(cfg)
    monkeypatch.undo()

    assert (tmp_path / PARTIAL).is_file()
    assert not (tmp_path / storage.FACTORS_FILE).exists()
    assert leftovers(tmp_path) == []

    with pytest.raises(OutputError, match="interrupted run") as info:
        fit.fit_factors(cfg)
    assert "--resume" in info.value.hint

    report = fit.fit_factors(cfg, resume=True)
    assert report.resumed_from == resumed_from
    assert_bit_identical(factors_of(tmp_path), reference[strategy])
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE]
    phases = {"covariance pass, batch 6": ["covariance", "eigendecomposition", "correction"], "correction pass, batch 0": ["eigendecomposition", "correction"]}
    assert list(report.seconds) == phases.get(resumed_from, [resumed_from.split()[0]])  # the phases this run went through (docs/JSON.md)


@pytest.mark.parametrize(
    ("first", "then", "resumed_from"),
    [(BATCHES_PER_PASS, BATCHES_PER_PASS, "correction pass, batch 0"), (2, 0, "correction pass, batch 6"), (BATCHES_PER_PASS, 2, "correction pass, batch 0")],
    ids=["no-correction-snapshots", "resumed-without-snapshots", "resumed-with-snapshots"],
)
def test_correction_pass_resumes_whether_or_not_its_runs_snapshot_it(tmp_path, monkeypatch, reference, first, then, resumed_from):
    """A run writes snapshots of the correction pass (which hold the eigenbases) or none
    (checkpoint_every >= its batches, or 0: only the summed covariances after pass 1); the
    interrupted run and the resumed one may differ in that (checkpoint_every is not a setting of
    the result): the factors are the uninterrupted ones."""
    interrupt_after(monkeypatch, BATCHES_PER_PASS + 7)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(config(tmp_path, f"factors.checkpoint_every={first}"))
    monkeypatch.undo()
    report = fit.fit_factors(config(tmp_path, f"factors.checkpoint_every={then}"), resume=True)
    assert report.resumed_from == resumed_from
    assert_bit_identical(factors_of(tmp_path), reference["ekfac"])


def test_resume_survives_a_second_interruption(tmp_path, monkeypatch, reference):
    cfg = config(tmp_path)
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(cfg)
    monkeypatch.undo()
    interrupt_after(monkeypatch, BATCHES_PER_PASS)  # covariance batches 4..23, then correction batches 0..3
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(cfg, resume=True)
    monkeypatch.undo()
    assert fit.fit_factors(cfg, resume=True).resumed_from == "correction pass, batch 4"
    assert_bit_identical(factors_of(tmp_path), reference["ekfac"])


def test_overwrite_discards_progress(tmp_path, monkeypatch, reference):
    cfg = config(tmp_path)
    interrupt_after(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(cfg)
    monkeypatch.undo()
    report = fit.fit_factors(cfg, overwrite=True)
    assert report.resumed_from is None
    assert_bit_identical(factors_of(tmp_path), reference["ekfac"])
    assert not (tmp_path / PARTIAL).exists()


@pytest.mark.parametrize(
    ("changed", "named"),
    [("data.batch_size=32", "batch size 64 -> 32"), ("factors.strategy=kfac", "factors.strategy ekfac -> kfac"), ("seed=1", "seed 0 -> 1"),
     ("data.train.range=[0, 1400]", "examples"), ("model.kwargs.activation=tanh", "model definition")],  # fmt: skip
    ids=["batch_size", "strategy", "seed", "train_range", "model_kwargs"],
)
def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, changed, named):
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(config(tmp_path))
    monkeypatch.undo()
    with pytest.raises(OutputError, match=f"other settings \\(.*{named}") as info:
        fit.fit_factors(config(tmp_path, changed), resume=True)
    assert "--overwrite" in info.value.hint
    assert (tmp_path / PARTIAL).is_file()  # the progress is kept
    assert not (tmp_path / storage.FACTORS_FILE).exists()


def test_resume_without_progress_starts_fresh(tmp_path, reference):
    report = fit.fit_factors(config(tmp_path), resume=True)
    assert report.resumed_from is None
    assert_bit_identical(factors_of(tmp_path), reference["ekfac"])


def test_finished_factors_are_not_replaced_without_overwrite(tmp_path, reference):
    fit.fit_factors(config(tmp_path))
    with pytest.raises(OutputError, match="finished run"):
        fit.fit_factors(config(tmp_path))
    with pytest.raises(OutputError, match="finished run"):
        fit.fit_factors(config(tmp_path, "seed=1"), resume=True)


def test_stale_temporary_files_are_removed(tmp_path, monkeypatch, reference):
    """A SIGKILL between writing and renaming leaves `.name.xxx.tmp`; the next run removes it."""
    cfg = config(tmp_path)
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(cfg)
    monkeypatch.undo()
    for name in (PARTIAL, storage.FACTORS_FILE):
        (tmp_path / f".{name}.abc123.tmp").write_bytes(b"half a file")
    (tmp_path / f".{storage.FACTORS_FILE}.folder.tmp").mkdir()  # no writer's file: left alone (was a traceback)
    fit.fit_factors(cfg, resume=True)
    assert leftovers(tmp_path) == [f".{storage.FACTORS_FILE}.folder.tmp"]
    assert_bit_identical(factors_of(tmp_path), reference["ekfac"])


def test_same_config_and_seed_give_bit_identical_factors(tmp_path, reference):
    for run in ("a", "b"):
        fit.fit_factors(config(tmp_path / run))
    a, b = factors_of(tmp_path / "a"), factors_of(tmp_path / "b")
    assert_bit_identical(a, b)
    assert_bit_identical(a, reference["ekfac"])
    meta = [storage.read_metadata(tmp_path / run / storage.FACTORS_FILE) for run in ("a", "b")]
    for m in meta:
        m.pop("created")
        m["config"] = m["config"] | {"output_dir": None}
    assert meta[0] == meta[1]
    # ... and another seed samples other labels, so the Fisher differs.
    fit.fit_factors(config(tmp_path / "c", "seed=1"))
    c = factors_of(tmp_path / "c")
    assert not torch.equal(c["fc1.g_eigenvalues"], a["fc1.g_eigenvalues"])


class _FakeRanks(DistState):
    """Two ranks whose saved progress is `phases` (all_gather_object answers for both; a broadcast
    from rank `src` answers with `sent[src]`)."""

    def __init__(self, phases: list[str | None], rank: int = 0, sent: dict[int, object] | None = None) -> None:
        super().__init__(rank=rank, world_size=2)
        self.phases, self.sent = phases, sent or {}

    def all_gather_object(self, obj: object) -> list[object]:
        return list(self.phases)

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        return obj if self.rank == src else self.sent[src]


@pytest.mark.parametrize(
    "phases",
    [[None, None], ["covariance", None], ["correction", "correction"]],  # each rank's pass-1 sums are its own until the all-reduce
)
def test_ranks_in_the_same_pass_resume_their_own_progress(phases):
    snapshot = None if phases[0] is None else Snapshot(phases[0], 5, {"x": torch.ones(1)})
    assert fit._agree_on_progress(_FakeRanks(phases), snapshot) is snapshot


@pytest.mark.parametrize("kind", ["covariance", "basis"])
@pytest.mark.parametrize("phases", [["correction", "covariance"], [None, "correction"]])
def test_ranks_in_different_passes_restart_the_correction_from_the_summed_covariances(phases, kind):
    """A rank stopped while the others wrote the summed covariances: every rank restarts the
    correction pass at batch 0 from what the first rank that holds its progress resumes from: the
    summed covariances (its snapshot after pass 1) or the eigenbases (a later one)."""
    src = phases.index("correction")
    summed = {f"{kind}.fc1.a": torch.full((2, 2), 3.0), f"{kind}.count": torch.tensor(8.0)}
    held = Snapshot("correction", 7 if kind == "basis" else 0, {**summed, "fc1.diag": torch.ones(2)})
    for rank in (0, 1):
        mine = held if rank == src else (None if phases[rank] is None else Snapshot(phases[rank], 4, {"covariance.fc1.a": torch.zeros(2, 2)}))
        sent = {src: {k: v for k, v in held.tensors.items() if k != "fc1.diag"}}
        got = fit._agree_on_progress(_FakeRanks(phases, rank=rank, sent=sent), mine)
        assert (got.phase, got.batches_done) == ("correction", 0)
        assert sorted(got.tensors) == sorted(summed) and all(torch.equal(got.tensors[k], v) for k, v in summed.items())


# ---------------------------------------------------------------------------
# Subprocesses: SIGKILL and Ctrl-C on the real CLI.


def _cli_args(out: Path, *extra: str) -> list[str]:
    args = ["fit-factors", str(CONFIG), "--set", f"output_dir={out}"]
    for item in SLOW:
        args += ["--set", item]
    return args + list(extra)


def run_cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real CLI, not slowed down."""
    cmd = [sys.executable, "-m", "influence_cli", *_cli_args(out, *extra)]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def start_slow_cli(out: Path, *extra: str, hold_at: int = 0) -> subprocess.Popen:
    """The CLI under SLOW_CLI; `hold_at`: the batch after which it waits for a signal (0: none)."""
    cmd = [sys.executable, "-c", SLOW_CLI, *_cli_args(out, *extra)]
    env = subprocess_env() | {"HOLD_AT": str(hold_at)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def progress_of(partial: Path) -> tuple[str, int] | None:
    """(phase, batches done) of a progress file, None while there is none."""
    try:
        with safe_open(str(partial), framework="pt") as fh:
            meta = fh.metadata()
        return meta["phase"], int(meta["batches_done"])
    except Exception:  # not there yet, or just renamed over
        return None


def wait_for_progress(proc: subprocess.Popen, partial: Path, phase: str, timeout: float = 60.0) -> int:
    """Polls until `proc` has saved progress in `phase` past batch 0; returns the batches done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = progress_of(partial)
        if seen is not None and seen[0] == phase and seen[1] > 0:
            return seen[1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before saving {phase} progress:\n{err}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {phase} progress within {timeout}s")


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """An uninterrupted CLI run under the SLOW settings (without the delay)."""
    out = tmp_path_factory.mktemp("cli-reference")
    done = run_cli(out)
    assert done.returncode == 0, done.stderr
    return factors_of(out)


def test_sigkill_mid_pass_then_resume_is_bit_identical(tmp_path, cli_reference):
    proc = start_slow_cli(tmp_path)
    done_at_kill = wait_for_progress(proc, tmp_path / PARTIAL, "correction")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert not (tmp_path / storage.FACTORS_FILE).exists()
    assert (tmp_path / PARTIAL).is_file()

    again = run_cli(tmp_path)  # no --resume: refused, progress kept
    assert again.returncode == 5, again.stderr
    assert "--resume" in again.stderr
    assert (tmp_path / PARTIAL).is_file()

    resumed = run_cli(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    phase, batches = progress_of_message(resumed.stderr)
    assert phase == "correction" and batches >= done_at_kill
    assert_bit_identical(factors_of(tmp_path), cli_reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE]


def progress_of_message(stderr: str) -> tuple[str, int]:
    """The pass and batch of the CLI's "resumed from <phase> pass, batch <n>" line."""
    line = next((x for x in stderr.splitlines() if "resumed from" in x), None)
    assert line is not None, stderr
    words = line.split("resumed from", 1)[1].replace(",", " ").split()
    return words[0], int(words[-1])


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path):
    proc = start_slow_cli(tmp_path, hold_at=7)  # after the first save (batch 5): the signal lands mid-pass
    wait_for_progress(proc, tmp_path / PARTIAL, "covariance")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert "Traceback" not in err
    # Only complete files under final names: the progress file, no factors, no temp files.
    assert not (tmp_path / storage.FACTORS_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [PARTIAL]


def test_resume_of_a_finished_run_is_a_no_op(tmp_path, monkeypatch):
    """A requeued batch job reruns with --resume: finished factors of the same settings are kept as they are."""
    out = tmp_path / "run"
    fit.fit_factors(config(out))
    before = (out / storage.FACTORS_FILE).stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("no pass should run")

    monkeypatch.setattr(fit, "compute_factors", fail)
    left = out / storage.FACTORS_PARTIAL.format(rank="")
    left.write_bytes(b"the progress of a run killed right after renaming its finished factors")
    temp = out / f".{storage.FACTORS_FILE}.killed.tmp"
    temp.write_bytes(b"what a writer killed mid-write left")
    report = fit.fit_factors(config(out, "data.batch_size=32"), resume=True)  # batch size does not change the result
    assert report.resumed_from == "already complete"
    assert not left.exists() and not temp.exists()  # the finished file holds all of it
    assert (out / storage.FACTORS_FILE).stat().st_mtime_ns == before
    with pytest.raises(OutputError, match=r"holds factors of a finished run with other settings \(factors.strategy ekfac -> kfac\)"):
        fit.fit_factors(config(out, "factors.strategy=kfac"), resume=True)


def test_a_failed_first_run_leaves_no_empty_output_dir(tmp_path, monkeypatch):
    """The output_dir (and its parents) a run created are removed when it fails before writing
    anything; saved progress keeps them, and a folder that existed is left alone."""
    out = tmp_path / "new" / "run"
    interrupt_after(monkeypatch, 1)  # before the first snapshot (every 2 batches)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(config(out))
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    interrupt_after(monkeypatch, 3)  # after it: the progress is kept, with its folder
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(config(out))
    assert (out / PARTIAL).is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    monkeypatch.undo()
    interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(config(existing))
    assert existing.is_dir()


FOLDERS_CREATED_LATER = [  # (folder, refusal) of check_creatable_dir
    ("new/sub", None),
    ("real/sub", None),
    ("to_real/sub", None),
    ("a_file", "'{t}/a_file' is a file, not a folder"),
    ("a_file/sub", "cannot create '{t}/a_file/sub': '{t}/a_file' is a file, not a folder"),
    ("to_a_file/sub", "cannot create '{t}/to_a_file/sub': '{t}/to_a_file' is a symbolic link to 'a_file', which leads to no folder"),
    ("dangling", "'{t}/dangling' is a symbolic link to 'gone', which leads to no folder"),
    ("dangling/sub", "cannot create '{t}/dangling/sub': '{t}/dangling' is a symbolic link to 'gone', which leads to no folder"),
    ("read_only/sub", "cannot create '{t}/read_only/sub': '{t}/read_only' is not writable"),
    ("read_only", "'{t}/read_only' is not writable"),
    ("closed/sub", "'{t}/closed' cannot be read (permission denied)"),
]


@pytest.mark.parametrize("where, expected", FOLDERS_CREATED_LATER, ids=[w for w, _ in FOLDERS_CREATED_LATER])
def test_a_folder_created_later_is_checked_without_creating_it(tmp_path, monkeypatch, where, expected):
    """check_creatable_dir (a later model's folder of an ensemble, edit's --out, a picture's) refuses what creating
    the folder would, a symbolic link to nothing in its place included, and creates nothing; creating it
    (ensure_writable_dir) names what is in its way alike, a file above it included."""
    (tmp_path / "real").mkdir()
    (tmp_path / "read_only").mkdir()
    (tmp_path / "closed").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "to_real").symlink_to("real")
    (tmp_path / "to_a_file").symlink_to("a_file")
    (tmp_path / "dangling").symlink_to("gone")
    access = os.access  # root may write and enter anything: these folders say no as they would to a user

    def denied(path, mode, *args, **kwargs):
        name = Path(path).name
        if (name == "read_only" and mode & os.W_OK) or (name == "closed" and mode & os.X_OK):
            return False
        return access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", denied)
    before = sorted(tmp_path.rglob("*"))
    if expected is None:
        storage.check_creatable_dir(tmp_path / where, "--out")
    else:
        with pytest.raises(OutputError) as exc:
            storage.check_creatable_dir(tmp_path / where, "--out")
        assert exc.value.message == "--out: " + expected.format(t=tmp_path)
    assert sorted(tmp_path.rglob("*")) == before
    if expected is not None and not where.startswith(("read_only/", "closed")):  # its creation refuses it as the check did
        with pytest.raises(OutputError) as exc:
            storage.ensure_writable_dir(tmp_path / where, "--out")
        assert exc.value.message == "--out: " + expected.format(t=tmp_path)


def test_an_interrupted_overwrite_resumes(tmp_path, monkeypatch, reference):
    """--overwrite removes the old factors as the refit starts, so its saved progress is what
    --resume continues (the old factors are not kept looking current either)."""
    fit.fit_factors(config(tmp_path, "factors.strategy=diagonal"))
    interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(config(tmp_path), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [PARTIAL]
    assert fit.fit_factors(config(tmp_path), resume=True).resumed_from == "covariance pass, batch 6"
    assert_bit_identical(factors_of(tmp_path), reference["ekfac"])


def _layout_started(folder: Path, pattern: str, world_size: int, **kw) -> None:
    """`check_rank_layout` in one process as a command's start takes it: what it returns is removed once it passed
    (`agreed_checks`, then `Replaced.remove`)."""
    from influence_cli.resume import agreed_checks, check_rank_layout

    agreed_checks(DistState(), lambda: (None, check_rank_layout(folder, pattern, world_size, **kw)))[1].remove()


def test_progress_of_another_number_of_ranks_is_refused_not_dropped(tmp_path):
    pattern = storage.FACTORS_PARTIAL
    for r in (0, 1):
        (tmp_path / pattern.format(rank=f".rank{r}")).write_bytes(b"progress")
    for resume in (True, False):
        with pytest.raises(OutputError, match=r"progress saved by a run with 2 rank\(s\) .*; this run has 1") as info:
            _layout_started(tmp_path, pattern, 1, resume=resume, overwrite=False)
        assert "--nproc_per_node 2" in info.value.hint
    _layout_started(tmp_path, pattern, 2, resume=True, overwrite=False)  # its own layout: PassCheckpoint's business
    scores = storage.SCORES_PARTIAL
    (tmp_path / scores.format(rank=".self")).write_bytes(b"self-influence progress")
    _layout_started(tmp_path, scores, 2, resume=True, overwrite=False)  # pairwise: the .self file is not its progress
    with pytest.raises(OutputError, match="with 1 rank"):
        _layout_started(tmp_path, scores, 2, resume=True, overwrite=False, kind=".self")
    _layout_started(tmp_path, pattern, 1, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [scores.format(rank=".self")]
    similarity = storage.SIMILARITY_PARTIAL  # and the files of the datasets a rank finished, beside its snapshot
    for name in [similarity.format(rank=f".rank{r}{f}") for r in (0, 1) for f in ("", ".finished0", ".finished1")]:
        (tmp_path / name).write_bytes(b"progress")
    two = r"2 rank\(s\) \(similarity.partial.rank0.safetensors, similarity.partial.rank1.safetensors, and 4 file\(s\) saved beside them\)"
    with pytest.raises(OutputError, match=two + "; this run has 1"):
        _layout_started(tmp_path, similarity, 1, resume=True, overwrite=False)
    _layout_started(tmp_path, similarity, 2, resume=True, overwrite=False)
    _layout_started(tmp_path, similarity, 1, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [scores.format(rank=".self")]
    for name in (scores.format(rank=".rank1"), scores.format(rank=".rank1.finished0"), scores.format(rank=".rank1.finished1")):
        (tmp_path / name).write_bytes(b"pairwise progress: a snapshot and the score pieces beside it")
    pieces = r"2 rank\(s\) \(scores.partial.rank1.safetensors, and 2 file\(s\) saved beside it\); this run has 1"
    with pytest.raises(OutputError, match=pieces):  # not "of the datasets it finished": compute-scores finishes none
        _layout_started(tmp_path, scores, 1, resume=True, overwrite=False)
    _layout_started(tmp_path, scores, 1, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [scores.format(rank=".self")]
    (tmp_path / similarity.format(rank=".finished0")).write_bytes(b"of one process, whose snapshot is gone")
    with pytest.raises(OutputError, match=r"1 rank\(s\) \(similarity.partial.finished0.safetensors\); this run has 2"):
        _layout_started(tmp_path, similarity, 2, resume=True, overwrite=False)
    _layout_started(tmp_path, similarity, 2, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [scores.format(rank=".self")]


def test_temporary_files_of_another_number_of_ranks_are_removed_with_their_progress(tmp_path):
    """A killed writer of another rank layout's progress (a snapshot, a finished dataset's file) leaves a temporary
    file that no name of this run covers: it goes when that progress does (--overwrite), or at once when there is
    none to refuse, so a run that finishes leaves none; a refusal leaves everything, and other passes' files stay."""
    similarity = storage.SIMILARITY_PARTIAL
    left = [f".{similarity.format(rank=f'.rank1{f}')}.k1ll3d.tmp" for f in ("", ".finished2")]
    mine = f".{similarity.format(rank='')}.l1ve01.tmp"  # this layout's own: PassCheckpoint's and DatasetsProgress's business
    kept = [mine, f".{storage.SCORES_PARTIAL.format(rank='.rank1.self')}.k1ll3d.tmp", f".{storage.SPECTRUM_PARTIAL.format(rank='.rank1')}.k1ll3d.tmp"]
    for name in [*left, *kept, similarity.format(rank=".rank1")]:
        (tmp_path / name).write_bytes(b"half")
    with pytest.raises(OutputError, match="progress saved by a run with"):
        _layout_started(tmp_path, similarity, 1, resume=True, overwrite=False)
    assert {p.name for p in tmp_path.iterdir()} == {*left, *kept, similarity.format(rank=".rank1")}
    _layout_started(tmp_path, similarity, 1, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    for name in left:  # a layout killed in its first write: no progress, only temporary files
        (tmp_path / name).write_bytes(b"half")
    _layout_started(tmp_path, similarity, 1, resume=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    _layout_started(tmp_path, storage.SCORES_PARTIAL, 1, resume=False, overwrite=False)  # pairwise scores: --self's are not its own
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    folder = tmp_path / left[0].replace("k1ll3d", "folder")  # a folder of such a name is no writer's: left alone
    folder.mkdir()
    (tmp_path / left[1]).symlink_to(folder)  # a link of that name is a writer's leftover: removed, not what it leads to
    for overwrite in (False, True):
        _layout_started(tmp_path, similarity, 1, resume=False, overwrite=overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, folder.name])


HOLD_LOCK = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"pid {sys.argv[2]} on {socket.gethostname()}: fit-factors cfg".encode(), 0)
print("held", flush=True)
time.sleep(float(sys.argv[3]))
if len(sys.argv) > 4:
    open(sys.argv[4], "w").close()  # about to exit, and so to release the lock
"""


def test_the_lock_of_a_killed_writer_held_by_its_orphaned_workers_is_waited_for(tmp_path, monkeypatch):
    """After a SIGKILL, the DataLoader workers the writer forked still hold its lock until they notice
    (seconds): a writer named in the lock that no longer exists is waited for, a live one is not."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    out = tmp_path / "run"
    out.mkdir()
    lock = out / storage.LOCK_FILE.format(what="factors")
    exiting = tmp_path / "exiting"
    orphan = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock), str(dead_pid), "1.0", str(exiting)], stdout=subprocess.PIPE, text=True)
    assert orphan.stdout.readline().strip() == "held"
    with storage.output_dir_lock(out, "factors"):  # waits about a second, then holds it
        assert exiting.exists()  # the orphan slept its second and let go
        assert orphan.wait(timeout=30) == 0  # (its exit status may lag the release of its lock by a moment: not poll())
    live = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock), str(os.getpid()), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "held"
        monkeypatch.setattr(storage, "_ORPHAN_WAIT_S", 30.0)
        with pytest.raises(OutputError, match=rf"writing its factors \(pid {os.getpid()} on "):  # refused at once
            with storage.output_dir_lock(out, "factors"):
                pass
    finally:
        live.kill()
        live.wait()


FORKS_A_WORKER = """
import os, sys, time
from pathlib import Path
from influence_cli import storage
with storage.output_dir_lock(Path(sys.argv[1]), "factors"):
    if os.fork() == 0:  # a DataLoader worker
        time.sleep(8)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(60)
"""


def test_a_killed_runs_forked_workers_do_not_keep_its_lock(tmp_path):
    """SIGKILL leaves the lock file; the workers the run forked closed their copy, so the next run
    takes it at once (without waiting for them to notice their parent is gone)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-c", FORKS_A_WORKER, str(out)], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline().strip() == "ready"
    run.kill()
    run.wait()
    start = time.monotonic()
    with storage.output_dir_lock(out, "factors"):
        assert time.monotonic() - start < 1.0


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path):
    """Two runs writing the same outputs would replace each other's outputs and progress; the lock
    is released (and its file removed) when a run ends, and the OS drops it when a run is killed.
    Runs writing other outputs share the folder."""
    out = tmp_path / "new"
    with storage.output_dir_lock(out, "factors"):
        with pytest.raises(OutputError, match=r"output_dir: .* is in use by another run writing its factors \(pid \d+ on "):
            fit.fit_factors(config(out))
        assert out.is_dir()  # the refused run leaves the other run's (new) folder alone
    assert list(out.iterdir()) == []
    with storage.output_dir_lock(out, "scores"):  # compute-scores writing its scores there: fit-factors may run
        fit.fit_factors(config(out))
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE]
    with storage.output_dir_lock(out, "factors", shared=True), storage.output_dir_lock(out, "factors", shared=True):  # two readers
        with pytest.raises(OutputError, match="is in use by another run reading its factors"):
            fit.fit_factors(config(out), overwrite=True)
    with storage.output_dir_lock(out, "factors"):  # a refit: the readers wait
        from influence_cli.scores import compute_scores

        with pytest.raises(OutputError, match=r"is in use by another run writing its factors \(pid "):
            compute_scores(config(out))
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE]  # every lock file removed by its last holder


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    fit.fit_factors(config(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE]  # no lock file left
    assert "cannot be locked (No locks available); running without the lock" in caplog.text


def test_outputs_finished_or_saved_before_the_model_definition_was_recorded_still_resume(tmp_path, monkeypatch):
    """A requeued --resume on factors of the previous version (no model definition in their keys) is a no-op."""
    from influence_cli import resume

    def legacy_key(fields):
        return resume.run_key({k: v for k, v in fields.items() if k not in resume.LATER_FIELDS})

    monkeypatch.setattr(fit, "run_key", legacy_key)
    fit.fit_factors(config(tmp_path))
    monkeypatch.undo()
    assert fit.fit_factors(config(tmp_path), resume=True).resumed_from == "already complete"


def test_resume_of_finished_factors_with_other_settings_names_the_change(tmp_path):
    fit.fit_factors(config(tmp_path))
    with pytest.raises(OutputError, match=r"holds factors of a finished run with other settings \(seed 0 -> 1\)"):
        fit.fit_factors(config(tmp_path, "seed=1"), resume=True)


def test_a_full_disk_is_one_output_error(tmp_path, monkeypatch):
    """safetensors reports I/O failures as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(storage, "save_file", full)
    with pytest.raises(OutputError, match=r"output_dir: cannot write .*factors.safetensors.* No space left on device") as info:
        storage.save_tensors(tmp_path / storage.FACTORS_FILE, {"x": torch.zeros(2)}, {})
    assert "free space" in info.value.hint and list(tmp_path.iterdir()) == []


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_under_the_other_writers_says_to_free_space(tmp_path, monkeypatch):
    """JSON (the scores index), pictures and .pt state dicts are written by Python or torch, whose full disk is an
    OSError (torch's own: "unexpected pos ..."): the hint is to free space, as for safetensors, and no file is left."""
    with pytest.raises(OutputError, match=r"output_dir: cannot write .*scores.index.json' \(No space left on device\)") as info:
        with storage.atomic_path(tmp_path / storage.SCORES_INDEX) as tmp:
            no_space(tmp)
    assert info.value.hint == "free space, or set output_dir to another place"

    class SmallDisk:  # a file on a disk with room for its first 64 bytes
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            if self.fh.tell() + len(data) > 64:
                no_space()
            return self.fh.write(data)

        def flush(self):
            self.fh.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(storage, "open", lambda path, mode: SmallDisk(open(path, mode)), raising=False)
    with pytest.raises(OutputError, match=r"--out: cannot write .*edited.pt' \(No space left on device\)") as info:
        storage.save_state_dict(tmp_path / "edited.pt", {"w": torch.zeros(1000)}, key="--out")
    assert info.value.hint == "free space, or give --out another path"
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_stops_a_run_at_its_lock_and_leaves_no_lock_file(tmp_path, monkeypatch):
    """A disk too full for the lock file's few bytes (who holds it) is one output error before any work, not an
    OSError traceback with the lock file left behind."""
    monkeypatch.setattr(storage.os, "pwrite", no_space)
    with pytest.raises(OutputError, match=r"output_dir: cannot write the lock file .*\(No space left on device\)") as info:
        with storage.output_dir_lock(tmp_path / "out", "scores"):
            pass
    assert info.value.hint == "free space, or set output_dir to another place"
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.undo()
    with storage.output_dir_lock(tmp_path / "out", "scores"):  # the next run locks as usual
        assert storage.writer_of(tmp_path / "out", "scores") is not None


def test_a_lock_file_that_cannot_be_removed_after_a_full_disk_is_still_one_output_error(tmp_path, monkeypatch):
    """The lock's write failed and its file cannot be removed (a sticky folder, another user's file): the same output
    error, not the unlink's OSError traceback, and the lock is released for the next run."""
    monkeypatch.setattr(storage.os, "pwrite", no_space)
    real_unlink = Path.unlink

    def denied(self, missing_ok=False):
        if self.name.endswith(".lock"):
            raise PermissionError(1, "Operation not permitted", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", denied)
    with pytest.raises(OutputError, match=r"output_dir: cannot write the lock file .*\(No space left on device\)") as info:
        with storage.output_dir_lock(tmp_path / "out", "scores"):
            pass
    assert info.value.hint == "free space, or set output_dir to another place"
    monkeypatch.undo()
    with storage.output_dir_lock(tmp_path / "out", "scores"):  # released: the file left is locked by the next run as usual
        assert storage.writer_of(tmp_path / "out", "scores") is not None


def test_readers_never_refuse_each_other_and_the_api_without_a_state_locks(tmp_path, monkeypatch):
    """A reader that releases last upgrades its lock to remove the file: another reader opening it
    then must wait a moment, not be refused. A process called without `state` runs alone (RANK
    notwithstanding) and takes the locks."""
    import threading

    refused = []

    def read_many():
        for _ in range(200):
            try:
                with storage.output_dir_lock(tmp_path, "factors", shared=True):
                    pass
            except OutputError as exc:
                refused.append(exc.message)

    threads = [threading.Thread(target=read_many) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert refused == [] and list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "1")
    with storage.output_dir_lock(tmp_path, "factors"):
        with pytest.raises(OutputError, match="is in use by another run writing its factors"):
            fit.fit_factors(config(tmp_path))


def test_factors_dir_holds_the_fit_and_its_locks(tmp_path, monkeypatch):
    """With factors_dir, fit-factors writes (and locks) the factors there, never creating
    output_dir; readers lock the factors there too, so a refit is refused while another
    output_dir's compute-scores reads them, and the reverse."""
    from influence_cli.scores import compute_scores

    shared, queries = tmp_path / "fit", tmp_path / "queries"
    cfg = config(queries, f"factors_dir={shared}")
    assert cfg.factors_path == shared and cfg.output_path == queries
    fit.fit_factors(cfg)
    assert sorted(p.name for p in shared.iterdir()) == [storage.FACTORS_FILE] and not queries.exists()
    with storage.output_dir_lock(shared, "factors", key="factors_dir"):  # a refit in the shared folder
        with pytest.raises(OutputError, match=r"factors_dir: .* is in use by another run writing its factors") as info:
            compute_scores(cfg)
        assert "another factors_dir" in info.value.hint
    assert not queries.exists()  # the refused run created nothing
    with storage.output_dir_lock(shared, "factors", shared=True):  # a compute-scores reading them from elsewhere
        with pytest.raises(OutputError, match=r"factors_dir: .* is in use by another run reading its factors"):
            fit.fit_factors(config(tmp_path / "other", f"factors_dir={shared}"), overwrite=True)
    assert (shared / storage.FACTORS_FILE).is_file()
    compute_scores(cfg)
    assert storage.SCORES_FILE in {p.name for p in queries.iterdir()} and storage.FACTORS_FILE not in {p.name for p in queries.iterdir()}
    assert sorted(p.name for p in shared.iterdir()) == [storage.FACTORS_FILE]  # the readers' lock files removed
    monkeypatch.setattr(storage.os, "access", lambda path, mode: Path(path) != shared or not mode & os.W_OK)  # shared read-only
    compute_scores(cfg, overwrite=True)  # reads them unlocked, without a warning
    assert sorted(p.name for p in shared.iterdir()) == [storage.FACTORS_FILE]


def test_a_missing_factors_dir_is_named_and_not_created(tmp_path):
    from influence_cli.scores import compute_scores

    cfg = config(tmp_path / "queries", f"factors_dir={tmp_path / 'nowhere'}")
    with pytest.raises(OutputError, match=r"no factors at .*nowhere/factors.safetensors"):
        compute_scores(cfg)
    assert list(tmp_path.iterdir()) == []  # neither folder left behind


class _Group:
    """Ranks as threads of this process: the collectives of `_ThreadRank` exchange objects through `slots`, each
    rank waiting for the others at a barrier (a rank that skips a collective the others take fails them all at
    its timeout, as a deadlock would hang torchrun; ranks that meet in different collectives fail at once)."""

    def __init__(self, world_size: int) -> None:
        self.slots: list[tuple[str, bytes] | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=20)


class _ThreadRank(DistState):
    """One rank of a `_Group`: all_gather_object, broadcast_object and barrier as torch.distributed has them (the
    objects pickled, so that no rank holds another's tensors)."""

    def __init__(self, group: _Group, rank: int) -> None:
        super().__init__(rank=rank, world_size=len(group.slots))
        self.group = group

    def _exchange(self, kind: str, obj: object) -> list[object]:
        self.group.slots[self.rank] = (kind, pickle.dumps(obj))
        self.group.barrier.wait()
        slots = list(self.group.slots)
        self.group.barrier.wait()
        kinds = [k for k, _ in slots]  # type: ignore[misc]
        if len(set(kinds)) > 1:  # torch.distributed would hang, or mix up the objects
            raise AssertionError(f"rank {self.rank}: the ranks met in different collectives: {kinds}")
        return [pickle.loads(b) for _, b in slots]  # type: ignore[misc]

    def all_gather_object(self, obj: object) -> list[object]:
        return self._exchange("all_gather_object", obj)

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        return self._exchange(f"broadcast_object from rank {src}", obj if self.rank == src else None)[src]

    def barrier(self) -> None:
        self._exchange("barrier", None)


def on_every_rank(world_size: int, fn) -> list:
    """`fn(state)` on `world_size` ranks at once (threads; `state` a DistState of its rank): each rank's result, or its exception."""
    group, out = _Group(world_size), [None] * world_size

    def run(rank: int) -> None:
        try:
            out[rank] = fn(_ThreadRank(group, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_datasets_progress_round_trips_and_ranks_resume_at_the_furthest_dataset(tmp_path):
    """A rank stopped before it saved dataset 1 as finished (the other did, after the all-reduce): both continue
    with dataset 2, the first rank with the other's result of dataset 1 and its own state dropped."""
    results = [{"mean.fc.0": torch.full((2, 3), float(i)), "count": torch.tensor(10 + i)} for i in range(2)]
    behind = DatasetsProgress(PassCheckpoint(tmp_path / "p0.safetensors", {"a": 1}, 1))
    behind.finish(results[0], more=True)
    behind.save(3, {"sum.fc.0": torch.ones(2, 3)})
    ahead = DatasetsProgress(PassCheckpoint(tmp_path / "p1.safetensors", {"a": 1}, 1))
    for r in results:
        ahead.finish(r, more=True)
    behind = DatasetsProgress(behind.checkpoint, behind.checkpoint.check_start(True, False)[0])
    ahead = DatasetsProgress(ahead.checkpoint, ahead.checkpoint.check_start(True, False)[0])
    assert behind.batches_done == 3 and torch.equal(behind.state["sum.fc.0"], torch.ones(2, 3))
    assert [int(r["count"]) for r in ahead.finished] == [10, 11] and torch.equal(ahead.finished[1]["mean.fc.0"], results[1]["mean.fc.0"])
    assert behind.resumed_from(["a", "b", "c"]) == "dataset 'b', batch 3 (1 of 3 datasets done)"
    assert on_every_rank(2, lambda st: [behind, ahead][st.rank].agree(st)) == [None, None]
    assert [int(r["count"]) for r in behind.finished] == [10, 11] and behind.batches_done == 0 and behind.state == {}
    assert behind.resumed_from(["a", "b", "c"]) == "dataset 'c', batch 0 (2 of 3 datasets done)"
    assert len(ahead.finished) == 2 and ahead.resumed_from(["a", "b", "c"]) == "dataset 'c', batch 0 (2 of 3 datasets done)"
    assert DatasetsProgress(PassCheckpoint(tmp_path / "none.safetensors", {}, 1)).resumed_from(["a"]) is None
    assert not (tmp_path / "p0.finished1.safetensors").exists()
    behind.save(1, {"sum.fc.0": torch.zeros(2, 3)})  # the result it was sent goes to its own file, at its next save
    again = DatasetsProgress(behind.checkpoint, behind.checkpoint.check_start(True, False)[0])
    assert [int(r["count"]) for r in again.finished] == [10, 11] and again.batches_done == 1
    assert_same_tensors(tmp_path / "p0.finished1.safetensors", tmp_path / "p1.finished1.safetensors")


def _results(n: int, size: int = 1000) -> list[dict[str, torch.Tensor]]:
    """`n` finished datasets' results of two float64 [size] tensors each, as dataset-similarity keeps them."""
    return [{"mean.fc": torch.full((size,), float(i), dtype=torch.float64), "diagonal.fc": torch.rand(size, dtype=torch.float64),
             "count": torch.tensor(10 + i)} for i in range(n)]  # fmt: skip


def test_each_finished_dataset_is_written_once_and_the_snapshot_does_not_grow(tmp_path, monkeypatch):
    """Saves after k finished datasets write the snapshot (the current dataset's state and the count) and only the
    results finished since the last save, each once, to its own file beside the snapshot."""
    writes: list[tuple[str, list[str]]] = []
    save_tensors = storage.save_tensors
    monkeypatch.setattr(storage, "save_tensors", lambda path, tensors, meta, **kw: (writes.append((path.name, sorted(tensors))), save_tensors(path, tensors, meta, **kw))[1])
    saved = DatasetsProgress(PassCheckpoint(tmp_path / "similarity.partial.safetensors", {"a": 1}, 2))
    state = {"sum.fc": torch.ones(1000)}
    results, sizes = _results(3), []
    for r in results:
        saved.save(2, state)
        saved.save(4, state)
        sizes.append((tmp_path / "similarity.partial.safetensors").stat().st_size)
        saved.finish(r, more=True)
    first = (tmp_path / "similarity.partial.finished0.safetensors").stat()
    saved.save(2, state)
    assert len(set(sizes)) == 1, sizes  # after 0, 1 and 2 finished datasets
    assert (tmp_path / "similarity.partial.safetensors").stat().st_size == sizes[0]
    snapshots = [keys for name, keys in writes if name == "similarity.partial.safetensors"]
    assert len(snapshots) == 10 and all(keys in ([], ["state.sum.fc"]) for keys in snapshots)
    finished = [name for name, _ in writes if name != "similarity.partial.safetensors"]
    assert finished == [f"similarity.partial.finished{i}.safetensors" for i in range(3)]  # once each
    again = (tmp_path / "similarity.partial.finished0.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    resumed = DatasetsProgress(saved.checkpoint, saved.checkpoint.check_start(True, False)[0])
    assert len(resumed.finished) == 3 and resumed.written == 3 and resumed.batches_done == 2
    for got, expected in zip(resumed.finished, results, strict=True):
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    resumed.save(4, state)
    assert len(writes) == 14  # the snapshot only: the files of the datasets read back are not written again
    resumed.clear()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_unreadable_or_foreign_finished_file_is_refused_by_name(tmp_path):
    settings = {"a": 1, "dataset_order": ["x", "y", "z"]}
    saved = DatasetsProgress(PassCheckpoint(tmp_path / "spectrum.partial.safetensors", settings, 1))
    for r in _results(2, 4):
        saved.finish(r, more=True)
    second = tmp_path / "spectrum.partial.finished1.safetensors"
    kept = second.read_bytes()

    def resume() -> DatasetsProgress:
        return DatasetsProgress(saved.checkpoint, saved.checkpoint.check_start(True, False)[0])

    second.unlink()
    with pytest.raises(OutputError, match=r"finished1.safetensors' is missing: it held the result of dataset 'y', which spectrum.partial.safetensors counts as finished") as info:
        resume()
    assert "--overwrite" in info.value.hint
    second.write_bytes(kept[: len(kept) // 2])
    with pytest.raises(OutputError, match=r"finished1.safetensors' is not a readable safetensors file \(.*\): it held the result of dataset 'y'") as info:
        resume()
    assert "--overwrite" in info.value.hint
    PassCheckpoint(second, settings | {"a": 2}, 1).save("finished:1", 0, {"count": torch.tensor(1)})
    with pytest.raises(OutputError, match=r"finished1.safetensors' is progress of a run with other settings \(a 2 -> 1\)"):
        resume()
    second.write_bytes((tmp_path / "spectrum.partial.finished0.safetensors").read_bytes())
    with pytest.raises(OutputError, match=r"does not hold the result of dataset 'y'.*'finished:0'"):
        resume()
    second.write_bytes(kept)
    assert len(resume().finished) == 2


def test_a_snapshot_that_holds_the_finished_results_still_resumes(tmp_path):
    """Snapshots of earlier versions hold the finished datasets' results as tensors finished.<i>.*: they are read from
    it, and the next save writes them to their files, once, and a snapshot without them."""
    checkpoint = PassCheckpoint(tmp_path / "similarity.partial.safetensors", {"a": 1}, 1)
    results = _results(2, 4)
    old = {f"finished.{i}.{k}": v for i, r in enumerate(results) for k, v in r.items()} | {"state.sum.fc": torch.ones(4)}
    checkpoint.save("dataset:2", 3, old)
    saved = DatasetsProgress(checkpoint, checkpoint.check_start(True, False)[0])
    assert saved.batches_done == 3 and torch.equal(saved.state["sum.fc"], torch.ones(4)) and saved.written == 0
    assert [int(r["count"]) for r in saved.finished] == [10, 11] and torch.equal(saved.finished[1]["mean.fc"], results[1]["mean.fc"])
    saved.save(4, saved.state)
    tensors, meta = storage.load_tensors(checkpoint.path)
    assert list(tensors) == ["state.sum.fc"] and meta["phase"] == "dataset:2"
    again = DatasetsProgress(checkpoint, checkpoint.check_start(True, False)[0])
    assert again.written == 2 and all(torch.equal(a["diagonal.fc"], b["diagonal.fc"]) for a, b in zip(again.finished, results, strict=True))


@pytest.mark.parametrize("how", ["holds-it", "unreadable", "another dataset's", "other settings"])
def test_a_finished_file_no_snapshot_counts_yet_is_counted_when_it_holds_its_result(tmp_path, how):
    """A run killed between writing a finished dataset's file and the snapshot that counts it leaves a file the snapshot
    does not count. --resume counts it as finished when it holds its dataset's result under this run's settings, as it
    is (not written again; the snapshot's state of that dataset goes: it was finished); it was removed and the dataset
    streamed again from the snapshot's batch. A file that does not hold it (damaged, another dataset's, other settings)
    is removed and the snapshot continued, as before, and so is a file of the last dataset, whose result is the
    command's. --overwrite starts over: every file is removed when the run starts, with the temporary files of killed
    writers."""
    output = tmp_path / storage.SIMILARITY_FILE

    def start(**kw) -> DatasetsProgress:
        saved = DatasetsProgress.start(output, storage.SIMILARITY_PARTIAL, DistState(), {"a": 1}, ["x", "y", "z"], batch_size=8, every=1, **kw)
        saved.remove_replaced()  # as the commands do once their first batches passed
        return saved

    saved = start(resume=False, overwrite=False)
    results = _results(3, 4)
    saved.finish(results[0], more=True)
    saved.save(3, {"sum.fc": torch.ones(4, dtype=torch.float64)})
    saved.finished.append(results[1])
    saved._write_finished(1)  # killed before the snapshot that counts it
    unsaved = saved.finished_path(1)
    if how == "unreadable":
        _damage(unsaved, how)
    elif how == "another dataset's":
        unsaved.write_bytes(saved.finished_path(0).read_bytes())
    elif how == "other settings":
        settings = {"a": 2, "bs": 8, "world": 1, "dataset_order": ["x", "y", "z"]}
        PassCheckpoint(unsaved, settings, 1).save("finished:1", 0, results[1])
    written = unsaved.stat()
    saved.checkpoint.save("finished:2", 0, results[2], saved.finished_path(2))  # the last dataset's: never counted
    (tmp_path / ".similarity.partial.finished2.safetensors.k1ll3d.tmp").write_bytes(b"half")
    resumed = start(resume=True, overwrite=False)
    names = ["similarity.partial.finished0.safetensors", "similarity.partial.safetensors"]
    if how == "holds-it":
        assert len(resumed.finished) == 2 and resumed.written == 2 and _same(resumed.finished[1], results[1]) and resumed.state == {}
        assert resumed.resumed_from(["x", "y", "z"]) == "dataset 'z', batch 0 (2 of 3 datasets done)"
        assert (unsaved.stat().st_ino, unsaved.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
        names.insert(1, unsaved.name)
    else:
        assert len(resumed.finished) == 1 and resumed.written == 1 and torch.equal(resumed.state["sum.fc"], torch.ones(4, dtype=torch.float64))
        assert resumed.resumed_from(["x", "y", "z"]) == "dataset 'y', batch 3 (1 of 3 datasets done)"
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    resumed.save(1, {"sum.fc": torch.zeros(4, dtype=torch.float64)})
    assert storage.read_metadata(resumed.checkpoint.path)["phase"] == f"dataset:{len(resumed.finished)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    if how == "holds-it":  # counted by the snapshot now, not written again
        assert (unsaved.stat().st_ino, unsaved.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    start(resume=False, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def _start_rank(folder: Path, st: DistState, resume: bool = True, every: int = 1) -> DatasetsProgress:
    """`DatasetsProgress.start` of dataset-similarity's files in `folder` on rank `st`, datasets x, y, z, a save every
    `every` batches (0: none)."""
    output = folder / storage.SIMILARITY_FILE
    saved = DatasetsProgress.start(output, storage.SIMILARITY_PARTIAL, st, {"a": 1}, ["x", "y", "z"], batch_size=8, every=every, resume=resume, overwrite=False)
    saved.remove_replaced()  # as the commands do once their first batches passed
    return saved


def _saved_by_ranks(folder: Path, counts: list[int], results: list[dict[str, torch.Tensor]]) -> list[Path]:
    """Progress of len(counts) ranks in `folder`: rank r finished `counts[r]` of `results` and is 3 batches into the next
    dataset (its state: its rank, in a float64 [4]). Returns the files, sorted."""

    def run(st: DistState) -> None:
        saved = _start_rank(folder, st, resume=False)
        for r in results[: counts[st.rank]]:
            saved.finish(r, more=True)
        saved.save(3, {"sum.fc": torch.full((4,), float(st.rank), dtype=torch.float64)})

    assert on_every_rank(len(counts), run) == [None] * len(counts)
    return sorted(folder.iterdir())


def _damage(path: Path, how: str) -> None:
    """Makes a finished dataset's file `path` missing, unreadable (half of it) or a copy of another dataset's."""
    if how == "missing":
        path.unlink()
    elif how == "unreadable":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(path.with_name(path.name.replace(".finished0.", ".finished1.")).read_bytes())


@pytest.mark.parametrize("how", ["missing", "unreadable", "another dataset's"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_lost_a_finished_datasets_file_resumes_with_another_ranks_copy(tmp_path, rank, how):
    """Each rank's finished results are the same (all-reduced or gathered): a rank whose file of one is missing or
    unreadable is sent another rank's copy (rank 0's, or rank 1's when rank 0 lost it), keeps its own state of the
    dataset in progress, and writes the copy to its own file at once; it used to be refused (--overwrite)."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [2, 2], results)
    lost = tmp_path / f"similarity.partial.rank{rank}.finished0.safetensors"
    other = tmp_path / f"similarity.partial.rank{1 - rank}.finished0.safetensors"
    _damage(lost, how)
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(saved, DatasetsProgress) for saved in got), got
    for r, saved in enumerate(got):
        assert len(saved.finished) == 2 and saved.lost == {}
        for mine, expected in zip(saved.finished, results, strict=False):
            assert mine.keys() == expected.keys() and all(torch.equal(mine[k], expected[k]) for k in expected)
        assert saved.batches_done == 3 and torch.equal(saved.state["sum.fc"], torch.full((4,), float(r), dtype=torch.float64))
        assert saved.resumed_from(["x", "y", "z"]) == "dataset 'z', batch 3 (2 of 3 datasets done)"
    assert_same_tensors(lost, other)  # the copy is in its own file, before any save
    got[rank].save(4, {"sum.fc": torch.zeros(4, dtype=torch.float64)})
    assert_same_tensors(lost, other)
    again = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert [s.batches_done for s in again] == [4 if r == rank else 3 for r in range(2)] and all(s.lost == {} for s in again)


def test_a_finished_datasets_file_no_rank_holds_is_refused_alike_on_every_rank(tmp_path):
    """No rank holds a usable copy (both lost theirs; or the other rank had not finished that dataset): every rank
    refuses alike (said once), naming the lowest rank's lost file, and no file is touched."""
    results = _results(3, 4)
    files = _saved_by_ranks(tmp_path, [2, 2], results)
    _damage(tmp_path / "similarity.partial.rank0.finished1.safetensors", "missing")
    _damage(tmp_path / "similarity.partial.rank1.finished1.safetensors", "unreadable")
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(e, OutputError) and e.same_on_every_rank for e in got), got
    assert got[0].message == got[1].message and got[0].hint == got[1].hint
    assert got[0].message == (
        f"{str(tmp_path / 'similarity.partial.rank0.finished1.safetensors')!r} is missing: it held the result of dataset 'y', "
        "which similarity.partial.rank0.safetensors counts as finished; no other rank holds a usable copy (rank 1 lost its copy too)"
    )
    assert "--overwrite" in got[0].hint
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == left

    behind = tmp_path / "behind"
    behind.mkdir()
    files = _saved_by_ranks(behind, [1, 2], results)  # rank 0 had not finished dataset y
    _damage(behind / "similarity.partial.rank1.finished1.safetensors", "unreadable")
    got = on_every_rank(2, lambda st: _start_rank(behind, st))
    assert all(isinstance(e, OutputError) and e.same_on_every_rank for e in got), got
    assert "rank1.finished1.safetensors' is not a readable safetensors file" in got[0].message
    assert got[0].message.endswith("; no other rank holds a usable copy") and got[1].message == got[0].message
    assert sorted(behind.iterdir()) == files


@pytest.mark.parametrize("other_lost", [False, True], ids=["other-holds-it", "other-lost-it"])
def test_a_finished_datasets_file_of_other_settings_is_still_refused_by_name(tmp_path, other_lost):
    """A rank's file of other settings is refused by that rank, naming them, though the other rank holds a copy (the
    other rank stops naming it), as before; also when the other rank lost its own (it waits in no collective)."""
    _saved_by_ranks(tmp_path, [2, 2], _results(3, 4))
    if other_lost:
        (tmp_path / "similarity.partial.rank0.finished0.safetensors").unlink()
    path = tmp_path / "similarity.partial.rank1.finished0.safetensors"
    settings = {"a": 2, "bs": 8, "world": 2, "dataset_order": ["x", "y", "z"]}
    PassCheckpoint(path, settings, 1).save("finished:0", 0, {"count": torch.tensor(1)})
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert isinstance(got[1], OutputError) and "rank1.finished0.safetensors' is progress of a run with other settings (a 2 -> 1)" in got[1].message
    assert isinstance(got[0], DistributedError) and got[0].message.startswith("rank 1 stopped: ") and "other settings (a 2 -> 1)" in got[0].message


def test_copies_of_a_finished_result_that_differ_are_refused(tmp_path):
    """Three ranks: rank 2 lost its file of dataset x, and ranks 0 and 1 hold copies that differ (a file changed that
    still reads): no copy is trusted, every rank refuses alike."""
    _saved_by_ranks(tmp_path, [2, 2, 2], _results(3, 4))
    first = tmp_path / "similarity.partial.rank1.finished0.safetensors"
    tensors, meta = storage.load_tensors(first)
    storage.save_tensors(first, tensors | {"count": torch.tensor(99)}, meta)
    _damage(tmp_path / "similarity.partial.rank2.finished0.safetensors", "missing")
    got = on_every_rank(3, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(e, OutputError) and e.same_on_every_rank for e in got), got
    assert got[0].message == (
        f"{str(first)!r} and {str(tmp_path / 'similarity.partial.rank0.finished0.safetensors')!r} hold different results of "
        "dataset 'x' (every rank's copy should be the same): the saved progress cannot be continued"
    )
    assert {e.message for e in got} == {got[0].message} and got[0].hint == "pass --overwrite to start over"


def _path(folder: Path, rank: int, index: int) -> Path:
    """Rank `rank`'s file of finished dataset `index` in `folder`."""
    return folder / f"similarity.partial.rank{rank}.finished{index}.safetensors"


def _load(folder: Path, rank: int, index: int) -> dict[str, torch.Tensor]:
    return storage.load_tensors(_path(folder, rank, index))[0]


def _same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_three_ranks_one_behind_and_each_with_a_lost_file_resume_with_every_result(tmp_path, caplog):
    """Rank 2 saved 1 of 3 datasets and lost its file of it (x), so it holds none of them and still takes part in
    the comparison of the copies of x; rank 0 lost y's (its file holds x); rank 1 lost z's (half of it). Every rank
    takes what it lacks from the first rank that holds it (x: rank 0, y: rank 1, z: rank 0), each lost file is warned
    about, naming it and the rank whose copy replaces it, which is written to that file at once; the rank behind starts
    z over, the others keep their state; and after one save each, every rank's files hold every result and a resume
    finds nothing lost."""
    results = _results(4, 4)
    _saved_by_ranks(tmp_path, [3, 3, 1], results)
    (tmp_path / "similarity.partial.rank2.finished0.safetensors").unlink()
    mixed = tmp_path / "similarity.partial.rank0.finished1.safetensors"
    mixed.write_bytes((tmp_path / "similarity.partial.rank0.finished0.safetensors").read_bytes())
    _damage(tmp_path / "similarity.partial.rank1.finished2.safetensors", "unreadable")
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(3, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(saved, DatasetsProgress) for saved in got), got
    for r, saved in enumerate(got):
        assert len(saved.finished) == 3 and all(_same(mine, expected) for mine, expected in zip(saved.finished, results, strict=False))
        assert saved.lost == {} and saved.batches_done == (0 if r == 2 else 3)
    assert [s.written for s in got] == [3, 3, 1] and all(_same(_load(tmp_path, r, i), results[i]) for r, i in ((0, 1), (1, 2), (2, 0)))
    assert not (tmp_path / "similarity.partial.rank2.finished1.safetensors").exists()  # not lost: written at the next save
    warned = sorted(set(caplog.messages))
    assert len(warned) == 3 and len(caplog.messages) == 9, caplog.messages  # each rank says each (the CLI prints rank 0's)
    assert warned[0].startswith(f"{str(mixed)!r} does not hold the result of dataset 'y'") and warned[0].endswith(
        "; rank 1's copy takes its place (written to rank 0's file)"
    )
    assert "rank1.finished2.safetensors' is not a readable safetensors file" in warned[1] and warned[1].endswith(
        "; rank 0's copy takes its place (written to rank 1's file)"
    )
    assert warned[2].startswith(f"{str(tmp_path / 'similarity.partial.rank2.finished0.safetensors')!r} is missing: it held the result of dataset 'x'")
    assert warned[2].endswith("; rank 0's copy takes its place (written to rank 2's file)")
    for r, saved in enumerate(got):
        saved.save(5, {"sum.fc": torch.full((4,), float(r), dtype=torch.float64)})
    assert all(_same(_load(tmp_path, r, i), results[i]) for r in range(3) for i in range(3))
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        again = on_every_rank(3, lambda st: _start_rank(tmp_path, st))
    assert [(len(s.finished), s.batches_done, s.lost) for s in again] == [(3, 5, {})] * 3 and caplog.messages == []


@pytest.mark.parametrize("every", [0, 1])
def test_a_recovered_result_is_written_at_once_whether_or_not_a_save_follows(tmp_path, caplog, every):
    """The copy that takes the place of a lost file is written to that file when the ranks resume, also with
    factors.checkpoint_every 0, under which no save follows (the warning said "written ... at its next save" and the
    file stayed lost, with nothing but the other rank's copy left), as the setting's help says ("0 = never" alone was
    not true); the warning says it is written. The next finished dataset's save then writes only its own file (none
    with 0); a last dataset is not saved (it is the result), and `clear` removes every file."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [1, 1], results)
    lost = tmp_path / "similarity.partial.rank1.finished0.safetensors"
    lost.unlink()
    snapshot = tmp_path / "similarity.partial.rank1.safetensors"
    before = snapshot.read_bytes()
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(tmp_path, st, every=every))
    assert all(isinstance(s, DatasetsProgress) for s in got), got
    assert caplog.messages == [
        f"{str(lost)!r} is missing: it held the result of dataset 'x', which similarity.partial.rank1.safetensors counts as "
        "finished; rank 0's copy takes its place (written to rank 1's file)"
    ] * 2  # each rank says it (the CLI prints rank 0's)
    assert _same(_load(tmp_path, 1, 0), results[0]) and snapshot.read_bytes() == before  # the snapshot counted it already
    if not every:  # the setting's help said "0 = never" alone
        assert "--resume still rewrites a rank's lost file of a finished dataset" in FactorsConfig.__dataclass_fields__["checkpoint_every"].metadata["help"]
    got[1].finish(results[1], more=True)
    assert (tmp_path / "similarity.partial.rank1.finished1.safetensors").exists() == bool(every)
    assert storage.read_metadata(snapshot)["phase"] == ("dataset:2" if every else "dataset:1")
    got[1].finish(results[2], more=False)
    assert not (tmp_path / "similarity.partial.rank1.finished2.safetensors").exists()
    got[1].clear()
    assert sorted(p.name for p in tmp_path.glob("*rank1*")) == []


@pytest.mark.parametrize("behind", [False, True], ids=["lost-only", "behind-too"])
def test_a_rank_killed_at_its_first_save_after_recovering_a_lost_file_resumes_consistently(tmp_path, monkeypatch, behind):
    """Rank 1 lost its file of x (and with `behind` saved only x as finished): the resume writes x's file again at once
    (its snapshot counts it), and rank 1 is killed at its first save, once the files are written and before its snapshot
    is. The rewritten file of x holds the result and is read as its own at the next resume (not lost again); the file of
    y that no snapshot counts yet holds y's result, the same as rank 0's copy: it is counted as finished, not written
    again (it was removed and sent again); and the result is every rank's after all."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [2, 1 if behind else 2], results)
    snapshot = tmp_path / "similarity.partial.rank1.safetensors"
    before = snapshot.read_bytes()
    (tmp_path / "similarity.partial.rank1.finished0.safetensors").unlink()
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert _same(_load(tmp_path, 1, 0), results[0]) and got[1].written == (1 if behind else 2)
    save = got[1].checkpoint.save

    def killed_at_the_snapshot(phase, batches_done, tensors, path=None):
        if path is None:
            raise KeyboardInterrupt
        save(phase, batches_done, tensors, path)

    monkeypatch.setattr(got[1].checkpoint, "save", killed_at_the_snapshot)
    with pytest.raises(KeyboardInterrupt):
        got[1].save(4, {"sum.fc": torch.zeros(4, dtype=torch.float64)})
    assert snapshot.read_bytes() == before and _same(_load(tmp_path, 1, 0), results[0])
    unsaved = tmp_path / "similarity.partial.rank1.finished1.safetensors"
    written = unsaved.stat()  # written, then the kill
    again = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(s, DatasetsProgress) for s in again), again
    assert again[1].lost == {} and again[1].written == 2
    assert again[1].batches_done == (0 if behind else 3) and all(_same(m, e) for m, e in zip(again[1].finished, results[:2], strict=True))
    assert (unsaved.stat().st_ino, unsaved.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    again[1].save(4, {"sum.fc": torch.zeros(4, dtype=torch.float64)})
    assert all(_same(_load(tmp_path, 1, i), results[i]) for i in range(2))


def _unsaved(folder: Path, rank: int, index: int, result: dict[str, torch.Tensor]) -> Path:
    """Rank `rank`'s file of dataset `index` in `folder` (two ranks, datasets x, y, z), holding `result`, as a save killed
    before the snapshot that counts it leaves it."""
    settings = {"a": 1, "bs": 8, "world": 2, "dataset_order": ["x", "y", "z"]}
    PassCheckpoint(_path(folder, rank, index), settings, 1).save(f"finished:{index}", 0, result)
    return _path(folder, rank, index)


@pytest.mark.parametrize("case", ["both-unsaved", "one-behind", "differs-from-the-counted-copy", "unsaved-copies-differ"])
def test_ranks_count_the_files_a_kill_left_before_their_snapshots_when_every_copy_agrees(tmp_path, caplog, case):
    """Under torchrun a rank's file of y that its snapshot does not count yet (a kill between the two writes) is counted
    as finished when every rank's copy of y agrees (by digest): both ranks' uncounted files, or rank 1's and rank 0's
    counted one (`one-behind`); neither is written again, and a rank that counted one starts z at its start (the other
    keeps its state). A copy that differs is not counted, and is removed as before: rank 1 is sent rank 0's counted copy
    (written at its next save), or, when no snapshot counts y and the ranks' copies differ, both continue y from their
    snapshots. No warning, no refusal."""
    results = _results(3, 4)
    counts = [1, 1] if case in ("both-unsaved", "unsaved-copies-differ") else [2, 1]
    _saved_by_ranks(tmp_path, counts, results)
    other = results[1] | {"count": torch.tensor(99)}
    for r in (r for r in range(2) if counts[r] == 1):
        _unsaved(tmp_path, r, 1, other if case == "differs-from-the-counted-copy" or (case == "unsaved-copies-differ" and r == 1) else results[1])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(s, DatasetsProgress) for s in got), got
    assert caplog.messages == []
    counted = case != "unsaved-copies-differ"
    assert all(len(s.finished) == 1 + counted and all(_same(m, e) for m, e in zip(s.finished, results, strict=False)) for s in got)
    kept = counts[0] == 2 or not counted  # rank 0's state: of z (its snapshot counts y), or of y (neither file counted)
    assert [s.batches_done for s in got] == [3 if kept else 0, 0 if counted else 3]
    assert [s.written for s in got] == [1 + counted, 1 + (case != "differs-from-the-counted-copy") * counted]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    gone = {_path(tmp_path, 1, 1).name} if case == "differs-from-the-counted-copy" else set() if counted else {_path(tmp_path, r, 1).name for r in range(2)}
    assert after == {name: v for name, v in before.items() if name not in gone}  # nothing written again
    got[1].save(1, {"sum.fc": torch.zeros(4, dtype=torch.float64)})
    if counted:
        assert _same(_load(tmp_path, 1, 1), results[1])
    again = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert [(len(s.finished), s.batches_done) for s in again] == [(len(s.finished), s.batches_done) for s in got[:1]] + [(1 + counted, 1)]


@pytest.mark.parametrize("copy", ["same", "differs"])
def test_a_lost_snapshots_own_copy_takes_part_in_counting_a_file_no_snapshot_counts_yet(tmp_path, caplog, copy):
    """Rank 1's snapshot counts x and its file of y is there uncounted (a kill between the two writes); rank 0's snapshot
    is missing, and its own file of y holds y's result under this run's settings: the same as rank 1's, or not. Rank 0's
    copy is one of y's copies: when they agree rank 1 counts y as finished and rank 0 keeps its copy; when they differ
    rank 1 does not count y (removed as before, continuing y from its snapshot; it counted it, and then refused every
    rank, rank 0's copy differing), and rank 0's file of y, past the finished datasets, is removed."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [1, 1], results)
    _unsaved(tmp_path, 1, 1, results[1])
    _unsaved(tmp_path, 0, 1, results[1] if copy == "same" else results[1] | {"count": torch.tensor(99)})
    lost = _lose_snapshot(tmp_path, 0, "missing")
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(s, DatasetsProgress) for s in got), got
    counted = copy == "same"
    assert all(len(s.finished) == 1 + counted and all(_same(m, e) for m, e in zip(s.finished, results, strict=False)) for s in got)
    assert [s.batches_done for s in got] == [0, 0 if counted else 3] and [s.written for s in got] == [1 + counted] * 2
    files = {p.name for p in tmp_path.iterdir()}
    assert all((_path(tmp_path, r, 1).name in files) == counted for r in range(2)), files
    warned = list(dict.fromkeys(caplog.messages))
    assert len(warned) == 1 and warned[0].startswith(f"{str(lost)!r} is missing; rank 0 resumes as a rank that saved nothing"), warned


def test_a_setting_only_one_side_records_is_shown_unset_on_the_other():
    """ggn -> sampled adds the seed (it counts only for a sampled Fisher): "seed None -> 0" read as a seed changed."""
    from influence_cli.resume import changed_settings

    assert changed_settings({"fisher": "ggn"}, {"fisher": "sampled", "seed": 0}) == "factors.fisher ggn -> sampled, seed (unset) -> 0"
    assert changed_settings({"fisher": "sampled", "seed": 0}, {"fisher": "ggn"}) == "factors.fisher sampled -> ggn, seed 0 -> (unset)"
    assert changed_settings({"bs": 256}, {"bs": 64}) == "batch size 256 -> 64"


def _lose_snapshot(folder: Path, rank: int, how: str) -> Path:
    """Makes rank `rank`'s snapshot in `folder` missing or unreadable (its first 50 bytes); returns it."""
    path = folder / f"similarity.partial.rank{rank}.safetensors"
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:50])
    return path


@pytest.mark.parametrize("files", ["kept", "lost"])
@pytest.mark.parametrize("how", ["missing", "truncated"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_snapshot_is_lost_resumes_as_one_that_saved_nothing(tmp_path, caplog, rank, how, files):
    """A rank's snapshot is missing or unreadable while the other's reads: that rank resumes as one that saved nothing
    (it was refused when unreadable, and went on silently when missing) and starts the dataset in progress over on its
    shard (the other keeps its state). Its own files of the finished datasets are read: when they hold the results it
    keeps them (they were removed, and the other rank's copies sent and written at its next save), else it is sent the
    other rank's copies, written to its files at once; a file past the finished datasets is removed. The loss is said in
    a warning naming the snapshot and what was recovered, an own file that is there but unreadable in a warning of its
    own, as a lost file is (it was replaced unsaid), and a second resume after a save finds nothing lost."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [2, 2], results)
    lost = _lose_snapshot(tmp_path, rank, how)
    beyond = tmp_path / f"similarity.partial.rank{rank}.finished2.safetensors"
    beyond.write_bytes(_path(tmp_path, rank, 1).read_bytes())  # not counted by any snapshot
    if files == "lost":
        _path(tmp_path, rank, 0).unlink()
        _damage(_path(tmp_path, rank, 1), "unreadable")
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if f".rank{rank}.finished" in p.name and p != beyond}
    other = {p.name: p.read_bytes() for p in tmp_path.iterdir() if f".rank{1 - rank}" in p.name}
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(saved, DatasetsProgress) for saved in got), got
    for r, saved in enumerate(got):
        assert len(saved.finished) == 2 and all(_same(mine, expected) for mine, expected in zip(saved.finished, results, strict=False))
        assert saved.lost == {} and saved.snapshot_lost is None and saved.written == 2
        assert saved.resumed_from(["x", "y", "z"]) == f"dataset 'z', batch {0 if r == rank else 3} (2 of 3 datasets done)"
    assert got[rank].state == {} and torch.equal(got[1 - rank].state["sum.fc"], torch.full((4,), float(1 - rank), dtype=torch.float64))
    said = "is missing" if how == "missing" else "is not a readable safetensors file"
    recovered = (
        "it keeps its own copies of the 2 finished datasets" if files == "kept"
        else f"it is sent rank {1 - rank}'s copies of the 2 finished datasets (written to its files)"
    )  # fmt: skip
    warned = list(dict.fromkeys(caplog.messages))  # in the order said
    assert len(warned) == 1 + (files == "lost") and caplog.messages == warned * 2, caplog.messages  # each rank says each (the CLI prints rank 0's)
    if files == "lost":  # its file of x, missing, is no more said than the rest of what it lost with its snapshot
        assert warned[0].startswith(f"{str(_path(tmp_path, rank, 1))!r} is not a readable safetensors file (") and warned[0].endswith(
            f"; rank {1 - rank}'s copy takes its place (written to rank {rank}'s file)"
        )
    assert warned[-1].startswith(f"{str(lost)!r} {said}") and warned[-1].endswith(
        f"; rank {rank} resumes as a rank that saved nothing: {recovered} and starts dataset 'z' over on its shard"
    )
    names = [_path(tmp_path, rank, i).name for i in range(2)] + ([] if how == "missing" else [lost.name])
    assert sorted(p.name for p in tmp_path.iterdir() if f".rank{rank}" in p.name) == sorted(names)
    assert all(_same(_load(tmp_path, rank, i), results[i]) for i in range(2))
    if files == "kept":  # not written again
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if f".rank{rank}.finished" in p.name} == kept
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if f".rank{1 - rank}" in p.name} == other  # the other's untouched
    got[rank].save(1, {"sum.fc": torch.zeros(4, dtype=torch.float64)})
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        again = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert [(len(s.finished), s.batches_done) for s in again] == [(2, 1 if r == rank else 3) for r in range(2)] and caplog.messages == []


@pytest.mark.parametrize("own", ["none", "y"])
def test_a_lost_snapshot_among_three_ranks_takes_each_result_from_a_rank_that_holds_it(tmp_path, caplog, own):
    """Rank 1's snapshot is unreadable, rank 0 lost its file of x and rank 2 saved x only; rank 1's own file of x is
    unreadable, and of y too, or (`own` y) it holds y. Rank 1 is sent x by rank 2 (the only holder) and y by rank 0, or
    keeps its own y (compared with rank 0's), and starts z over with rank 2; every warning is said (rank 1's unreadable
    files too, each naming the rank whose copy replaces it), each copy is written to the file it replaces, and the
    result is each rank's."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [2, 2, 1], results)
    lost = _lose_snapshot(tmp_path, 1, "truncated")
    (tmp_path / "similarity.partial.rank0.finished0.safetensors").unlink()
    _damage(_path(tmp_path, 1, 0), "unreadable")
    if own == "none":
        _damage(_path(tmp_path, 1, 1), "unreadable")
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(3, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(saved, DatasetsProgress) for saved in got), got
    assert all(len(s.finished) == 2 and all(_same(m, e) for m, e in zip(s.finished, results, strict=False)) for s in got)
    assert [s.batches_done for s in got] == [3, 0, 0] and [s.written for s in got] == [2, 2, 1]
    assert all(_same(_load(tmp_path, r, i), results[i]) for r, i in ((0, 0), (0, 1), (1, 0), (1, 1), (2, 0)))
    warned = list(dict.fromkeys(caplog.messages))  # in the order said: by dataset, then the snapshot's
    assert len(warned) == (4 if own == "none" else 3) and len(caplog.messages) == 3 * len(warned), caplog.messages
    assert "rank0.finished0.safetensors' is missing" in warned[0] and warned[0].endswith("rank 2's copy takes its place (written to rank 0's file)")
    damaged = [f"{str(_path(tmp_path, 1, 0))!r} is not a readable safetensors file (", "; rank 2's copy takes its place (written to rank 1's file)"]
    if own == "none":
        damaged += [f"{str(_path(tmp_path, 1, 1))!r} is not a readable safetensors file (", "; rank 0's copy takes its place (written to rank 1's file)"]
    for said, (start, end) in zip(warned[1:-1], zip(damaged[::2], damaged[1::2], strict=True), strict=True):
        assert said.startswith(start) and said.endswith(end), said
    recovered = (
        "it is sent copies from ranks 0, 2 of the 2 finished datasets (written to its files)" if own == "none"
        else "it keeps its own copy of dataset 'y', is sent rank 2's copy of dataset 'x' (written to its file)"
    )  # fmt: skip
    assert warned[-1].startswith(f"{str(lost)!r} is not a readable safetensors file") and warned[-1].endswith(
        f"; rank 1 resumes as a rank that saved nothing: {recovered} and starts dataset 'z' over on its shard"
    )


def test_a_lost_snapshot_in_the_first_dataset_starts_it_over(tmp_path, caplog):
    """No dataset is finished yet: the rank whose snapshot is lost is sent nothing and starts the first one over."""
    _saved_by_ranks(tmp_path, [0, 0], _results(3, 4))
    lost = _lose_snapshot(tmp_path, 1, "truncated")
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert [(len(s.finished), s.batches_done) for s in got] == [(0, 3), (0, 0)], got
    assert set(caplog.messages) == {caplog.messages[0]} and caplog.messages[0].startswith(repr(str(lost)))
    assert caplog.messages[0].endswith("; rank 1 resumes as a rank that saved nothing: it starts dataset 'x' over on its shard")


@pytest.mark.parametrize("lost", ["none", "truncated"], ids=["other-reads", "other-truncated"])
def test_a_snapshot_of_other_settings_is_still_refused_by_name(tmp_path, lost):
    """Rank 1's snapshot is of other settings: rank 1 refuses it by name, and rank 0 stops naming rank 1, whether its own
    snapshot reads or not (an unreadable one is not a reason to go on without rank 1's)."""
    _saved_by_ranks(tmp_path, [2, 2], _results(3, 4))
    settings = {"a": 2, "bs": 8, "world": 2, "dataset_order": ["x", "y", "z"]}
    PassCheckpoint(tmp_path / "similarity.partial.rank1.safetensors", settings, 1).save("dataset:2", 3, {})
    if lost != "none":
        _lose_snapshot(tmp_path, 0, lost)
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert isinstance(got[1], OutputError) and "rank1.safetensors' is progress of a run with other settings (a 2 -> 1)" in got[1].message
    assert isinstance(got[0], DistributedError) and got[0].message.startswith("rank 1 stopped: ") and "other settings (a 2 -> 1)" in got[0].message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == left


def test_without_a_snapshot_that_reads_resume_starts_over_only_when_no_rank_saved_any(tmp_path, caplog):
    """No rank's snapshot reads: when every one is missing no rank saved progress, and every rank starts from the
    beginning, as before (the finished files no snapshot counts are removed); when one is unreadable every rank refuses
    alike, said once, naming the lowest such rank's and what the others' are, and no file is touched."""
    for hows in (["truncated", "missing"], ["missing", "truncated"], ["truncated", "truncated"]):
        folder = tmp_path / "-".join(hows)
        folder.mkdir()
        _saved_by_ranks(folder, [2, 1], _results(3, 4))
        paths = [_lose_snapshot(folder, r, how) for r, how in enumerate(hows)]
        left = {p.name: p.read_bytes() for p in folder.iterdir()}
        got = on_every_rank(2, lambda st, folder=folder: _start_rank(folder, st))
        assert all(isinstance(e, OutputError) and e.same_on_every_rank for e in got), got
        first = hows.index("truncated")
        assert got[0].message.startswith(f"{str(paths[first])!r} is not a readable safetensors file") and got[0].message.endswith(
            f"; no other rank holds a snapshot that reads (rank {1 - first}'s is {'unreadable' if hows[1 - first] == 'truncated' else 'missing'}): the saved progress cannot be continued"
        )
        assert got[1].message == got[0].message and got[0].hint == got[1].hint == "pass --overwrite to start over"
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == left
    folder = tmp_path / "missing-missing"
    folder.mkdir()
    _saved_by_ranks(folder, [2, 1], _results(3, 4))
    for r in (0, 1):
        _lose_snapshot(folder, r, "missing")
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(folder, st))
    assert [(len(s.finished), s.batches_done, s.resumed_from(["x", "y", "z"])) for s in got] == [(0, 0, None)] * 2
    assert list(folder.iterdir()) == [] and caplog.messages == []


def test_a_lost_snapshot_does_not_let_another_number_of_ranks_resume(tmp_path):
    """A rank whose files are all gone leaves no name: progress of 2 ranks with only rank 0's left is still refused in one
    process as progress of 2 ranks (it read "1 rank(s)" and "resume without torchrun"), taking the number the run recorded
    when a file reads (3); under torchrun with 3 ranks, progress of 2 (rank 2 has no snapshot) is refused as of other
    settings, and with 2 ranks, progress of 3 whose rank 2 left nothing too: no rank resumes as one that saved nothing."""
    from influence_cli.resume import check_rank_layout

    pattern = storage.SIMILARITY_PARTIAL
    two = tmp_path / "two"
    two.mkdir()
    _saved_by_ranks(two, [1, 1], _results(3, 4))
    for p in two.glob("*rank1*"):
        p.unlink()
    with pytest.raises(OutputError, match=r"a run with 2 rank\(s\) \(similarity.partial.rank0.safetensors, and 1 file\(s\) .*; this run has 1") as info:
        check_rank_layout(two, pattern, 1, resume=True, overwrite=False)
    assert "--nproc_per_node 2" in info.value.hint
    for p in two.iterdir():
        p.write_bytes(b"damaged")  # no recorded number: the names say at least 2
    with pytest.raises(OutputError, match=r"a run with 2 rank\(s\)") as info:
        check_rank_layout(two, pattern, 1, resume=True, overwrite=False)
    three = tmp_path / "three"
    three.mkdir()
    _saved_by_ranks(three, [1, 1, 1], _results(3, 4))
    for p in three.glob("*rank[12]*"):
        p.unlink()
    with pytest.raises(OutputError, match=r"a run with 3 rank\(s\)") as info:
        check_rank_layout(three, pattern, 1, resume=True, overwrite=False)
    assert "--nproc_per_node 3" in info.value.hint
    _saved_by_ranks(tmp_path / "to-three", [2, 2], _results(3, 4))
    got = on_every_rank(3, lambda st: _start_rank(tmp_path / "to-three", st))
    assert [type(e) for e in got] == [OutputError, OutputError, DistributedError], got
    assert all("other settings (number of ranks 2 -> 3)" in e.message for e in got)
    _saved_by_ranks(tmp_path / "to-two", [2, 2, 2], _results(3, 4))
    for p in (tmp_path / "to-two").glob("*rank2*"):
        p.unlink()
    got = on_every_rank(2, lambda st: _start_rank(tmp_path / "to-two", st))
    assert all(isinstance(e, OutputError) and "other settings (number of ranks 3 -> 2)" in e.message for e in got), got


def test_overwrite_that_one_rank_refuses_removes_no_ranks_progress(tmp_path):
    """--overwrite refused by rank 1 alone (a folder at the path of its finished dataset's file, refused even so) stops
    both ranks before either removes a file: rank 0's snapshot and finished file were removed in the start step while
    rank 1 refused. Moved away, --overwrite removes every file of both ranks."""
    files = _saved_by_ranks(tmp_path, [1, 1], _results(3, 4))
    folder = tmp_path / storage.SIMILARITY_PARTIAL.format(rank=".rank1.finished0")
    folder.unlink()
    folder.mkdir()
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    output = tmp_path / storage.SIMILARITY_FILE

    def start(st: DistState) -> DatasetsProgress:
        saved = DatasetsProgress.start(output, storage.SIMILARITY_PARTIAL, st, {"a": 1}, ["x", "y", "z"], batch_size=8, every=1, resume=False, overwrite=True)
        saved.remove_replaced()
        return saved

    got = on_every_rank(2, start)
    assert [type(e) for e in got] == [DistributedError, OutputError], got
    assert got[1].message == f"{str(folder)!r} is a folder, not a file" and "rank 1 stopped" in got[0].message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == left and folder.is_dir()
    assert sorted(left) == sorted(p.name for p in files if p != folder)
    folder.rmdir()
    assert all(isinstance(saved, DatasetsProgress) for saved in on_every_rank(2, start))
    assert list(tmp_path.iterdir()) == []


def test_a_file_the_start_cannot_remove_stops_every_rank_by_name(tmp_path, monkeypatch):
    """A file the agreed start cannot remove (no permission) stops every rank with an output error naming it (it
    raised PermissionError on that rank, while the others went on to wait in their next collective); a file already
    gone is no error."""
    from influence_cli.resume import agreed_checks

    def agreed_start(st: DistState, checks, key: str = "output_dir"):
        value, replaced = agreed_checks(st, checks, key)
        replaced.remove()
        return value

    files = [tmp_path / f"p{r}.safetensors" for r in range(2)]
    for p in files:
        p.write_bytes(b"progress")
    unlink = Path.unlink

    def denied(self: Path, missing_ok: bool = False) -> None:
        if self == files[1]:
            raise PermissionError(1, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", denied)
    got = on_every_rank(2, lambda st: agreed_start(st, lambda: (st.rank, [tmp_path / "gone.tmp", files[st.rank]])))
    assert [type(e) for e in got] == [DistributedError, OutputError], got
    assert got[1].message == f"output_dir: cannot remove {str(files[1])!r} (Operation not permitted)" and not got[1].same_on_every_rank
    assert got[1].hint == "remove it yourself, or set output_dir to another place" and got[0].message == "rank 1 stopped: " + got[1].message
    assert not files[0].exists() and files[1].exists()
    got = on_every_rank(2, lambda st: agreed_start(st, lambda: (st.rank, [files[1]]), "factors_dir"))  # a file every rank removes
    assert [type(e) for e in got] == [OutputError, OutputError] and all(e.same_on_every_rank for e in got), got
    assert got[0].message.startswith("factors_dir: cannot remove ")
    monkeypatch.undo()
    assert on_every_rank(2, lambda st: agreed_start(st, lambda: (st.rank, files))) == [0, 1] and list(tmp_path.iterdir()) == []


def test_one_process_refuses_an_unreadable_snapshot_and_starts_over_without_one(tmp_path, caplog):
    """Without torchrun no other rank's snapshot can stand in: an unreadable one is refused by name, every file left (not
    silently started over); a missing one under --resume is no saved progress: the run starts over, unsaid, and the
    finished files no snapshot counts are removed."""
    _saved_by_ranks(tmp_path, [2], _results(3, 4))
    snapshot = tmp_path / "similarity.partial.safetensors"
    snapshot.write_bytes(snapshot.read_bytes()[:50])
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutputError, match=r"similarity.partial.safetensors' is not a readable safetensors file") as info:
        _start_rank(tmp_path, DistState())
    assert "--overwrite" in info.value.hint and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == left
    snapshot.unlink()
    with caplog.at_level("WARNING", logger="influence_cli"):
        saved = _start_rank(tmp_path, DistState())
    assert (len(saved.finished), saved.batches_done, saved.snapshot_lost) == (0, 0, None)
    assert list(tmp_path.iterdir()) == [] and caplog.messages == []


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_the_files_of_a_rank_whose_snapshot_is_lost_are_copies_like_any_other_ranks(tmp_path, caplog, how):
    """Rank 0's snapshot is lost and rank 1 lost its file of x: rank 0's own file of x holds the result, so it keeps it
    and sends it to rank 1, which writes it to its file at once (every rank refused: rank 0's files were not read)."""
    results = _results(3, 4)
    _saved_by_ranks(tmp_path, [2, 2], results)
    _lose_snapshot(tmp_path, 0, how)
    lost = _path(tmp_path, 1, 0)
    lost.unlink()
    with caplog.at_level("WARNING", logger="influence_cli"):
        got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(saved, DatasetsProgress) for saved in got), got
    assert [(len(s.finished), s.batches_done) for s in got] == [(2, 0), (2, 3)]
    assert all(_same(m, e) for s in got for m, e in zip(s.finished, results, strict=False))
    assert all(_same(_load(tmp_path, r, i), results[i]) for r in range(2) for i in range(2))
    warned = list(dict.fromkeys(caplog.messages))  # in the order said: the lost file's, then the snapshot's
    assert len(warned) == 2 and len(caplog.messages) == 4, caplog.messages
    assert warned[0].startswith(f"{str(lost)!r} is missing: it held the result of dataset 'x'") and warned[0].endswith(
        "; rank 0's copy takes its place (written to rank 1's file)"
    )
    assert warned[1].endswith(
        "; rank 0 resumes as a rank that saved nothing: it keeps its own copies of the 2 finished datasets and starts dataset 'z' over on its shard"
    )


@pytest.mark.parametrize("own", ["missing", "unreadable", "another dataset's", "other settings"])
def test_no_usable_copy_beside_a_lost_snapshot_says_why_its_file_is_none_and_leaves_every_file(tmp_path, own):
    """Rank 0's snapshot is lost, rank 1 lost its file of x, and rank 0's file of x holds no result of x under this
    run's settings (missing, unreadable, another dataset's, or of other settings: not refused, as no snapshot counts
    it): every rank refuses alike, naming rank 1's file and why rank 0's is no copy, and no file is touched."""
    _saved_by_ranks(tmp_path, [2, 2], _results(3, 4))
    _lose_snapshot(tmp_path, 0, "missing")
    _path(tmp_path, 1, 0).unlink()
    mine = _path(tmp_path, 0, 0)
    if own == "other settings":
        settings = {"a": 2, "bs": 8, "world": 2, "dataset_order": ["x", "y", "z"]}
        PassCheckpoint(mine, settings, 1).save("finished:0", 0, {"count": torch.tensor(1)})
    else:
        _damage(mine, own)
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(e, OutputError) and e.same_on_every_rank for e in got), got
    why = {
        "missing": "is missing", "unreadable": "is not a readable safetensors file (",
        "another dataset's": "does not hold the result of dataset 'x' (it holds 'finished:1')",
        "other settings": "is progress of a run with other settings (a 2 -> 1)",
    }[own]  # fmt: skip
    assert got[0].message == got[1].message and got[0].message.startswith(
        f"{str(_path(tmp_path, 1, 0))!r} is missing: it held the result of dataset 'x', which similarity.partial.rank1.safetensors "
        f"counts as finished; no other rank holds a usable copy (rank 0, whose snapshot is missing, holds none either: {str(mine)!r} {why}"
    ), got[0].message
    assert got[0].message.endswith(")") and "--overwrite" in got[0].hint
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == left


def test_a_lost_snapshots_copy_that_differs_is_refused_though_no_rank_lacks_it(tmp_path):
    """Rank 0's snapshot is lost and its file of x, which still reads, differs from rank 1's: no snapshot counts that
    file, so it is compared even though every rank holds x, and every rank refuses alike, touching no file."""
    _saved_by_ranks(tmp_path, [2, 2], _results(3, 4))
    _lose_snapshot(tmp_path, 0, "truncated")
    mine = _path(tmp_path, 0, 0)
    tensors, meta = storage.load_tensors(mine)
    storage.save_tensors(mine, tensors | {"count": torch.tensor(99)}, meta)
    left = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    got = on_every_rank(2, lambda st: _start_rank(tmp_path, st))
    assert all(isinstance(e, OutputError) and e.same_on_every_rank for e in got), got
    assert got[0].message == got[1].message == (
        f"{str(_path(tmp_path, 1, 0))!r} and {str(mine)!r} hold different results of dataset 'x' (every rank's copy should be "
        "the same): the saved progress cannot be continued"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == left


def test_the_lock_file_follows_the_umask_like_the_outputs(tmp_path):
    """In a folder a group shares (umask 002), a lock file a killed run leaves must stay openable by
    the group's next run (the OS drops the lock, the file stays); it was created 0644 whatever the
    umask, so the next user's run went on unlocked."""
    out = tmp_path / "run"
    old = os.umask(0o002)
    try:
        with storage.output_dir_lock(out, "factors"):
            mode = (out / storage.LOCK_FILE.format(what="factors")).stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o664


def test_settings_keys_and_model_definitions_with_a_set_are_the_same_in_every_process() -> None:
    """A set in model.kwargs or in a command's settings was written in Python's order of its strings, which changes with
    every process: a --resume in the next process was refused as other settings, and a later command refused the
    outputs as of another model definition. They are written as the data fingerprints write them (sorted)."""
    import subprocess
    import sys

    from launch import subprocess_env

    code = (
        "from types import SimpleNamespace\nimport torch\nfrom influence_cli import models, resume\n"
        "tags = {'cat', 'dog', 'bird', 'eel', 'fox'}\n"
        "cfg = SimpleNamespace(architecture='mlp', kwargs={'tags': tags})\n"
        "print(resume.run_key({'kwargs': tags}), models.model_definition(cfg, torch.nn.Linear(1, 1))['kwargs'])"
    )
    seen = set()
    for hash_seed in ("1", "2", "3"):
        run = subprocess.run([sys.executable, "-c", code], env={**subprocess_env(), "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        seen.add(run.stdout)
    assert len(seen) == 1, seen
