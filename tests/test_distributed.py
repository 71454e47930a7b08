"""fit-factors under torchrun with 2 CPU processes (gloo), against one process.

Each rank streams a disjoint half of the data and the accumulators are all-reduced,
so the factors match a single-process run up to float summation order. The sampled
labels depend only on (seed, example index), so the sampled Fisher matches too.
Every run is a real `torchrun` subprocess (via `python -m torch.distributed.run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from exact import fit as exact_fit
from exact import tiny_mlp
from launch import subprocess_env
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from stopping import assert_same_tensors
from test_model_checks import ReusedWeight
from test_resume import progress_of

import influence_cli.fit as fit
from influence_cli import storage
from influence_cli.config import load_config
from influence_cli.distributed import DistState
from influence_cli.errors import DistributedError, InfluenceError
from influence_cli.resume import PassCheckpoint

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
SAMPLE = ROOT / "sample_data"
WORLD = 2

# The real CLI with each batch slowed down, so that a kill lands mid-pass whatever the machine.
SLOW_CLI = """
import sys, time
import influence_cli.fit as fit

_stream = fit.stream_gradients

def slow_stream(*args, **kwargs):
    for batch in _stream(*args, **kwargs):
        time.sleep(0.05)
        yield batch

fit.stream_gradients = slow_stream
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""


def _torchrun_cmd(*args: str, script: Path | None = None) -> list[str]:
    target = [str(script)] if script is not None else ["-m", "influence_cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *target, *args]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m influence_cli ARGS`."""
    return subprocess.run(_torchrun_cmd(*args), env=subprocess_env(), capture_output=True, text=True, timeout=120)


def fit_args(config: Path, out: Path, *sets: str) -> list[str]:
    args = ["fit-factors", str(config), "--set", f"output_dir={out}", "--set", "device=cpu"]
    for item in sets:
        args += ["--set", item]
    return args




def single_process(out: Path, *sets: str) -> dict[str, torch.Tensor]:
    fit.fit_factors(load_config(CONFIG, [f"output_dir={out}", "device=cpu", *sets]))
    return load_file(out / storage.FACTORS_FILE)


def assert_same_eigenvectors(u1: torch.Tensor, u2: torch.Tensor, eigenvalues: torch.Tensor, what: str) -> None:
    """Columns agree up to sign wherever the eigenvalue is well separated from its neighbours.

    (Within a (near-)degenerate eigenspace, e.g. the null space of A from always-blank
    pixels, any orthonormal basis is right; the products checked elsewhere cover those.)
    """
    lam = eigenvalues.double()
    gaps = torch.full_like(lam, float("inf"))
    gaps[1:] = torch.minimum(gaps[1:], lam[1:] - lam[:-1])
    gaps[:-1] = torch.minimum(gaps[:-1], lam[1:] - lam[:-1])
    separated = gaps.abs() > 1e-3 * lam.abs().max()
    assert int(separated.sum()) > 0, what
    dots = (u1.double() * u2.double()).sum(0).abs()[separated]
    assert bool((dots > 1 - 1e-4).all()), f"{what}: eigenvectors differ, |u1·u2| = {dots.min().item()}"


def assert_factors_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Every tensor of the two factor files agrees to float32 summation-order tolerance."""
    assert sorted(got) == sorted(ref)
    layers = sorted({k.rsplit(".", 1)[0] for k in ref})
    for key in ref:
        name = key.rsplit(".", 1)[1]
        if name == storage.NUM_EXAMPLES:
            assert torch.equal(got[key], ref[key]), key
        elif name not in (storage.A_EIGENVECTORS, storage.G_EIGENVECTORS):
            scale = ref[key].abs().max().item()
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5 * scale, msg=key)
    for layer in layers:
        for side in ("a", "g"):
            vectors = f"{layer}.{side}_eigenvectors"
            if vectors in ref:
                assert_same_eigenvectors(got[vectors], ref[vectors], ref[f"{layer}.{side}_eigenvalues"], vectors)
        if f"{layer}.g_eigenvectors" in ref:
            # The curvature itself is basis-independent.
            v = torch.randn(ref[f"{layer}.eigenvalues"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            a, b = curvature_times(got, layer, v), curvature_times(ref, layer, v)
            assert (a - b).norm() <= 1e-4 * b.norm(), f"{layer}: curvature-vector products differ"


def curvature_times(f: dict[str, torch.Tensor], layer: str, v: torch.Tensor) -> torch.Tensor:
    """F v = U_G ((U_Gᵀ V U_A) ⊙ Λ) U_Aᵀ for one layer's [d_out, d_in] V."""
    ua, ug = f[f"{layer}.a_eigenvectors"].double(), f[f"{layer}.g_eigenvectors"].double()
    return ug @ ((ug.T @ v @ ua) * f[f"{layer}.eigenvalues"].double()) @ ua.T


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


# 750 examples per rank in batches of 32: 24 batches per rank and pass, a snapshot every 5.
SETTINGS = {
    "ekfac-sampled": ["factors.strategy=ekfac", "factors.fisher=sampled", "data.batch_size=32", "factors.checkpoint_every=5"],
    "diagonal-empirical": ["factors.strategy=diagonal", "factors.fisher=empirical", "data.batch_size=32"],
}


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """name -> (torchrun result, its output_dir) for SETTINGS[name], run once per module."""
    runs: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def get(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"torchrun-{name}")
            runs[name] = torchrun(*fit_args(CONFIG, out, *SETTINGS[name])), out
        return runs[name]

    return get


@pytest.mark.parametrize("name", list(SETTINGS))
def test_two_ranks_match_one_process(tmp_path, distributed_run, name):
    sets = SETTINGS[name]
    run, dist_out = distributed_run(name)
    assert run.returncode == 0, run.stderr  # every rank exited 0
    ref = single_process(tmp_path / "single", *sets)
    assert_factors_close(load_file(dist_out / storage.FACTORS_FILE), ref)

    # Only rank 0 wrote: one finished file, no progress or temporary files from any rank.
    assert sorted(p.name for p in dist_out.iterdir()) == [storage.FACTORS_FILE]
    meta = metadata(dist_out / storage.FACTORS_FILE)
    assert meta["world_size"] == "2" and meta["num_examples"] == "1500"
    single_meta = metadata(tmp_path / "single" / storage.FACTORS_FILE)
    for key in ("model_fingerprint", "dataset_fingerprint", "strategy", "fisher", "modules"):
        assert meta[key] == single_meta[key], key

    # Progress, the summary and the log lines come from rank 0 only.
    strategy = sets[0].split("=")[1]
    assert run.stdout.count(f"{strategy} factors") == 1, run.stdout
    passes = ["covariances A, G", "eigenvalue correction"] if strategy == "ekfac" else ["diagonal Fisher"]
    for title in passes:
        assert run.stderr.count(title) == 1, run.stderr
        assert f"{title} (rank 0 of 2)" in run.stderr, run.stderr
    assert run.stderr.count("saved ") == 1, run.stderr
    assert "[rank" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_two_ranks_in_bfloat16_match_one_process(tmp_path):
    """factors.amp=bfloat16 under torchrun: float32 accumulators are all-reduced like any other run.

    Each rank's last batch differs from the one-process batches, and bf16 rounds per batch, so the
    curvature agrees to bf16 accuracy rather than to float32 summation order.
    """
    sets = ["factors.amp=bfloat16", "data.batch_size=32"]
    run = torchrun(*fit_args(CONFIG, tmp_path / "dist", *sets))
    assert run.returncode == 0, run.stderr
    got = load_file(tmp_path / "dist" / storage.FACTORS_FILE)
    ref = single_process(tmp_path / "single", *sets)
    assert torch.equal(got["fc1.num_examples"], ref["fc1.num_examples"])
    for layer in sorted({k.rsplit(".", 1)[0] for k in ref}):
        v = torch.randn(ref[f"{layer}.eigenvalues"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        a, b = curvature_times(got, layer, v), curvature_times(ref, layer, v)
        assert (a - b).norm() <= 1e-2 * b.norm(), f"{layer}: curvature-vector products differ"  # bf16 vs float32: ~3e-2


def test_failing_rank_fails_the_job_with_its_message(tmp_path):
    """Rank 1's half of the data has a label the model does not have, past its first batch: the job fails, nothing is written."""
    config = _labels_outside_config(tmp_path, [150], None, checkpoint_every=2)  # rank 1 streams 100..199, 32 a batch
    run = torchrun(*fit_args(config, tmp_path / "out"))
    assert run.returncode != 0
    assert "[rank 1] data error: data.train: label 12 of example 150 is outside the model's 10 classes" in run.stderr, run.stderr
    # rank 1 leaves before rank 0 notices, so torchrun records its own exit code (3), never its SIGTERM
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 3 ", run.stderr), run.stderr
    # Rank 0 stops with a typed error (or torchrun stops it first), never a traceback from the collective.
    assert "[rank0]: Traceback" not in run.stderr and "RuntimeError" not in run.stderr, run.stderr
    out = tmp_path / "out"
    assert not (out / storage.FACTORS_FILE).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".factors") or p.name.endswith(".tmp")]


def test_a_start_check_one_rank_fails_stops_every_rank_at_once(tmp_path):
    """Progress left by rank 1 alone (its own file) is refused on rank 1 only: rank 0 stops with it
    instead of waiting in the next collective until torchrun kills it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / storage.FACTORS_PARTIAL.format(rank=".rank1")).write_bytes(b"progress of rank 1")
    run = torchrun(*fit_args(CONFIG, out, "data.train.range=[0, 200]"))
    assert run.returncode != 0
    assert "[rank 1] output error: " in run.stderr and "holds progress of an interrupted run" in run.stderr, run.stderr
    assert "[rank 0] distributed error: rank 1 stopped: " in run.stderr, run.stderr
    assert "terminated by torchrun" not in run.stderr and "[rank0]: Traceback" not in run.stderr, run.stderr
    assert not (out / storage.FACTORS_FILE).exists()


def _labels_outside_config(tmp_path: Path, bad: list[int], fit_examples: int | None, checkpoint_every: int | None = None) -> Path:
    """A config of 200 digits in batches of 32 whose examples `bad` hold labels 12, 13, ... the model does not have: example
    10 falls in rank 0's first batch, 110 in rank 1's (each streams 100 examples); factors fitted on `fit_examples`."""
    digits = load_file(SAMPLE / "digits.safetensors")
    labels = digits["labels"][:200].clone()
    for k, i in enumerate(bad):
        labels[i] = 12 + k
    save_file({"inputs": digits["inputs"][:200].contiguous(), "labels": labels}, str(tmp_path / "labels.safetensors"))
    config = tmp_path / "labels.yaml"
    config.write_text(
        f"""\
model:
  architecture: mlp
  kwargs: {{input_dim: 64, hidden: [64, 32], num_classes: 10}}
  checkpoint: {SAMPLE / "mlp.safetensors"}
task: {{kind: classification}}
data:
  train: {{source: tensors, path: {tmp_path / "labels.safetensors"}, transform: {{scale: 16.0}}}}
  query: {{source: tensors, path: {SAMPLE / "digits.safetensors"}, range: [1500, 1504], transform: {{scale: 16.0}}}}
  batch_size: 32
factors: {{max_examples: {"null" if fit_examples is None else fit_examples}{"" if checkpoint_every is None else f", checkpoint_every: {checkpoint_every}"}}}
output_dir: {tmp_path / "out"}
"""
    )
    return config


@pytest.mark.parametrize(
    "command, bad",
    [("fit-factors", [10, 110]), ("fit-factors", [110]), ("compute-scores", [10, 110]), ("compute-scores --self", [110])],
    ids=["fit-every-rank", "fit-rank-1", "scores-every-rank", "self-rank-1"],
)
def test_a_first_batch_error_every_rank_meets_is_said_once_and_one_rank_meets_stops_every_rank(tmp_path, command, bad):
    """A label outside the classes in every rank's first batch (each rank's own example) is said once, by rank 0, the
    job's error (each rank printed its own, "[rank N] data error: ..."); one in rank 1's first batch alone is said by rank
    1, and rank 0 stops at once naming it (it streamed its whole shard, then lost its peer in the all-reduce)."""
    scores = command != "fit-factors"
    config = _labels_outside_config(tmp_path, bad, 4 if scores else None)
    out = tmp_path / "out"
    if scores:  # factors of the first 4 examples: the pass over all 200 meets the labels
        fit.fit_factors(load_config(config, ["device=cpu"]))
    run = torchrun(*command.split(), str(config), "--set", "device=cpu")
    said = "data error: data.train: label {} of example {} is outside the model's 10 classes"
    if len(bad) == 2:
        assert run.stderr.count("data error: ") == 1 and re.search(f"^{said.format(12, 10)}$", run.stderr, re.MULTILINE), run.stderr
        assert "[rank" not in run.stderr, run.stderr
        codes = [3, 3]
    else:
        assert f"[rank 1] {said.format(12, 110)}" in run.stderr and run.stderr.count("data error: ") == 1, run.stderr
        assert f"[rank 0] distributed error: rank 1 stopped: {said.format(12, 110)[len('data error: '):]}" in run.stderr, run.stderr
        codes = [7, 3]
    for rank, code in enumerate(codes):  # each rank's own exit code, none stopped by torchrun first
        assert re.search(rf"rank\s+: {rank} \(local_rank: {rank}\)\s+exitcode\s+: {code} ", run.stderr), run.stderr
    assert "[rank0]: Traceback" not in run.stderr and "[rank1]: Traceback" not in run.stderr, run.stderr
    assert sorted(p.name for p in out.glob("*")) == ([storage.FACTORS_FILE] if scores else [])  # nothing written


# The real CLI on a job whose rank 0 starts late (its machine slower to import torch or to read the config).
LATE_RANK_0_CLI = """
import os, sys, time
if os.environ["RANK"] == "0":
    time.sleep(3)
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""


@pytest.mark.parametrize("mistake, said", [(["--set", "factors.strategy=bogus"], "config error: "), (["--bogus"], "usage error: ")], ids=["config", "usage"])
def test_an_error_every_rank_meets_is_said_when_rank_0_starts_late(tmp_path, mistake, said):
    """The other ranks leave such an error to rank 0: they wait for rank 0 to exit, so that torchrun does not stop rank 0
    (SIGTERM) before it said it; the job failed with no message at all when rank 0 ran behind."""
    script = tmp_path / "late_rank_0.py"
    script.write_text(LATE_RANK_0_CLI)
    cmd = _torchrun_cmd(*fit_args(CONFIG, tmp_path / "out"), *mistake, script=script)
    run = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.count(said) == 1 and re.search(f"^{said}", run.stderr, re.MULTILINE), run.stderr  # once, by rank 0
    for rank in range(WORLD):  # each rank's own exit code, none stopped by torchrun first
        assert re.search(rf"rank\s+: {rank} \(local_rank: {rank}\)\s+exitcode\s+: 2 ", run.stderr), run.stderr


def test_a_rank_whose_rank_0_does_not_stop_says_the_error_itself(monkeypatch, capsys):
    """An error every rank should meet alike that rank 0 did not meet (it is still running): after the wait, the rank says it."""
    import importlib

    from influence_cli.errors import ConfigError

    cli_app = importlib.import_module("influence_cli.cli.app")  # the module (influence_cli.cli.app is also the Typer app's name)

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # as torchrun's agent sets it
    monkeypatch.setattr(cli_app, "RANK_0_GRACE_S", 0.01)
    assert cli_app.report_error(ConfigError("data.batch_size: must be > 0", source="run.yaml")) == 2
    assert "[rank 1] config error: run.yaml: data.batch_size: must be > 0" in capsys.readouterr().err


def test_a_lock_refusal_is_the_jobs_said_once_by_rank_0_without_a_prefix(monkeypatch, capsys):
    """Rank 0 alone takes the locks: another run's lock refuses the job, so rank 0 says it as the job's error (not as
    its own, "[rank 0] ...") and the other ranks leave it to rank 0."""
    import importlib

    cli_app = importlib.import_module("influence_cli.cli.app")

    class Rank:  # a torchrun rank; broadcast_object hands on rank 0's refusal
        distributed = True

        def __init__(self, rank: int, shared: object = None) -> None:
            self.rank, self.shared = rank, shared

        def broadcast_object(self, obj: object, src: int = 0) -> object:
            return obj if self.rank == 0 else self.shared

    busy = storage.OutputDirBusy("output_dir: 'out' is in use by another run writing its factors", hint="wait for it")
    on_rank_0, _ = storage.refusal_of_rank_0(Rank(0), busy, False)
    on_rank_1, _ = storage.refusal_of_rank_0(Rank(1, (busy.message, busy.hint, False)), None, False)
    assert on_rank_0 is busy and on_rank_0.same_on_every_rank and on_rank_1.same_on_every_rank
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_app.report_error(on_rank_0) == 5
    assert capsys.readouterr().err.startswith("output error: output_dir: 'out' is in use by another run")


@pytest.mark.parametrize("mistake", [["--set", "factors.strategy=bogus"], ["--bogus"]], ids=["config", "usage"])
def test_a_rank_launched_without_torchrun_leaves_an_error_every_rank_meets_at_once(tmp_path, mistake):
    """RANK and WORLD_SIZE set by a Slurm script or a Kubernetes job, no torchrun: no launcher stops this rank once rank 0
    has said the error (nor rank 0 when this rank exits), so it exits at once, silently, not after RANK_0_GRACE_S."""
    env = {**subprocess_env(), "RANK": "1", "WORLD_SIZE": str(WORLD)}
    cmd = [sys.executable, "-m", "influence_cli", *fit_args(CONFIG, tmp_path / "out"), *mistake]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)  # the wait would be 30 s
    assert (run.returncode, run.stdout, run.stderr) == (2, "", "")


# The real CLI on a job whose rank 1 cannot write the output folder (its machine mounts it read-only).
READ_ONLY_ON_RANK_1_CLI = """
import os, sys
from pathlib import Path

if os.environ["RANK"] == "1":
    _access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == Path(os.environ["READ_ONLY"]).resolve():
            return False
        return _access(path, mode, *args, **kwargs)

    os.access = access
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""


def test_an_output_dir_one_rank_cannot_write_stops_every_rank_naming_it(tmp_path):
    """Rank 1 cannot write output_dir: it says so, and rank 0 stops naming its error (not a lost peer in a collective)."""
    script = tmp_path / "read_only_on_rank_1.py"
    script.write_text(READ_ONLY_ON_RANK_1_CLI)
    out = tmp_path / "out"
    out.mkdir()
    cmd = _torchrun_cmd(*fit_args(CONFIG, out, "data.train.range=[0, 200]"), script=script)
    run = subprocess.run(cmd, env={**subprocess_env(), "READ_ONLY": str(out)}, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"[rank 1] output error: output_dir: {str(out)!r} is not writable" in run.stderr, run.stderr
    assert f"[rank 0] distributed error: rank 1 stopped: output_dir: {str(out)!r} is not writable" in run.stderr, run.stderr
    assert sorted(out.iterdir()) == []


def test_overwrite_one_rank_refuses_at_the_start_removes_no_ranks_progress(tmp_path):
    """--overwrite refused by rank 1 alone (a folder at its own snapshot's path, refused even so) stops the job before
    any rank removes a file: rank 0's snapshot and the progress of one process, which --overwrite lets go, stay (rank
    0 removed them in the start step while rank 1 refused)."""
    out = tmp_path / "out"
    out.mkdir()
    folder = out / storage.FACTORS_PARTIAL.format(rank=".rank1")
    folder.mkdir()
    kept = [out / storage.FACTORS_PARTIAL.format(rank=r) for r in (".rank0", "")]
    for p in kept:
        PassCheckpoint(p, {}, 1).save("covariance", 1, {})
    before = [p.read_bytes() for p in kept]
    run = torchrun(*fit_args(CONFIG, out, "data.train.range=[0, 200]"), "--overwrite")
    assert run.returncode != 0
    assert f"[rank 1] output error: {str(folder)!r} is a folder, not a file" in run.stderr, run.stderr
    assert "[rank 0] distributed error: rank 1 stopped: " in run.stderr, run.stderr
    assert [p.read_bytes() for p in kept] == before and folder.is_dir()
    assert not (out / storage.FACTORS_FILE).exists()


def test_overwrite_one_rank_refuses_at_its_first_batch_removes_nothing_on_any_rank(tmp_path):
    """fit-factors --overwrite whose first batch rank 1 alone refuses (a label outside the classes) stops the job with
    every rank's files as they were: the finished factors (rank 0 removed them, and each rank its own snapshot, in the
    start step, before the first batch's checks). The factors then replace them once the data is right."""
    config = _labels_outside_config(tmp_path, [110], None)
    out = tmp_path / "out"
    fit.fit_factors(load_config(config, ["device=cpu", "factors.max_examples=100"]))  # rank 1's examples 50..99: none bad
    snapshots = [out / storage.FACTORS_PARTIAL.format(rank=f".rank{r}") for r in range(WORLD)]
    for p in snapshots:
        PassCheckpoint(p, {}, 1).save("covariance", 1, {})
    kept = [out / storage.FACTORS_FILE, *snapshots]
    before = [p.read_bytes() for p in kept]
    run = torchrun(*fit_args(config, out), "--overwrite")
    assert run.returncode != 0
    assert "[rank 1] data error: data.train: label 12 of example 110 is outside the model's 10 classes" in run.stderr, run.stderr
    assert "[rank 0] distributed error: rank 1 stopped: " in run.stderr, run.stderr
    assert [p.read_bytes() for p in kept] == before
    run = torchrun(*fit_args(config, out, "factors.max_examples=100"), "--overwrite")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE]  # the snapshots removed, the factors replaced
    assert (out / storage.FACTORS_FILE).read_bytes() != before[0]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in a session of its own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _slow_job_files(tmp_path: Path, name: str) -> tuple[Path, Path, list[Path]]:
    """The slowed CLI's script, the output folder `name` and each rank's fit progress file in it (skips without
    /proc, which finding the ranks to signal needs)."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finding the ranks to kill needs /proc")
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    out = tmp_path / name
    return script, out, [out / storage.FACTORS_PARTIAL.format(rank=f".rank{r}") for r in range(WORLD)]


def _start_slow_job(script: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        _torchrun_cmd(*fit_args(CONFIG, out, *SETTINGS["ekfac-sampled"]), *args, script=script),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_until(proc: subprocess.Popen, partials: list[Path], ready, what: str) -> None:
    """Polls the ranks' progress files until `ready([(phase, batches) or None per rank])`."""
    deadline = time.monotonic() + 90
    while not ready([progress_of(p) for p in partials]):
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within 90 s")
        time.sleep(0.005)


def test_interrupted_job_resumes_to_the_same_factors(tmp_path, distributed_run):
    """Ctrl-C in pass 1, --resume, SIGKILL to the whole job in pass 2, rank 1's pass-1 progress put back (as if it
    had stopped while rank 0 wrote the summed covariances), --resume: the factors of an uninterrupted job."""
    script, out, partials = _slow_job_files(tmp_path, "resumed")

    # Ctrl-C: torchrun passes SIGINT on to the ranks; one message, progress kept.
    proc = _start_slow_job(script, out)
    _wait_until(proc, partials, lambda seen: all(s is not None for s in seen), "the first progress")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.count("interrupted.") == 1 and "--resume" in err, err
    assert all(p.is_file() for p in partials) and not (out / storage.FACTORS_FILE).exists()
    after_ctrl_c = [progress_of(p) for p in partials]
    rank1_pass1 = partials[1].read_bytes()  # put back below: rank 1 then holds pass-1 progress, rank 0 pass-2 progress

    # SIGKILL to the launcher and both ranks at once, as when the scheduler kills the job.
    proc = _start_slow_job(script, out, "--resume")

    def in_correction(seen: list) -> bool:
        return seen != after_ctrl_c and all(s is not None and s[0] == "correction" and s[1] > 0 for s in seen)

    try:
        _wait_until(proc, partials, in_correction, "progress in the correction pass")
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate(timeout=30)
    assert not (out / storage.FACTORS_FILE).exists()
    assert after_ctrl_c[1][0] == "covariance", after_ctrl_c  # Ctrl-C came at the first snapshot of pass 1
    partials[1].write_bytes(rank1_pass1)  # as when rank 1 stops while rank 0 writes the summed covariances

    resumed = torchrun(*fit_args(CONFIG, out, *SETTINGS["ekfac-sampled"]), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("resumed from correction pass") == 1, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE]

    fresh, fresh_out = distributed_run("ekfac-sampled")  # the same job, never interrupted
    assert fresh.returncode == 0, fresh.stderr
    got, ref = load_file(out / storage.FACTORS_FILE), load_file(fresh_out / storage.FACTORS_FILE)
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


def _rank_process(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (its environment names it)."""
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} under {launcher}")


def test_a_rank_killed_outright_stops_the_job_and_its_progress_stays(tmp_path):
    """SIGKILL to rank 1 mid-pass (the out-of-memory killer): it says nothing, torchrun stops rank 0, which says so and
    points at torchrun's summary (rank 1's -9), and exits 143; no factors, each rank's last progress kept."""
    script, out, partials = _slow_job_files(tmp_path, "killed")
    proc = _start_slow_job(script, out)
    try:
        _wait_until(proc, partials, lambda seen: all(s is not None for s in seen), "the first progress")
        os.kill(_rank_process(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert err.count("terminated by torchrun (another rank stopped: see its message above, or its exit code in torchrun's summary") == 1, err
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9 ", err), err
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: 143 ", err), err
    assert all(p.is_file() for p in partials) and not (out / storage.FACTORS_FILE).exists()


# The real CLI on a rank that cannot remove its own progress files (as in a sticky folder of another user).
UNREMOVABLE_CLI = """
import os, sys
from pathlib import Path

_unlink = Path.unlink

def guarded(self, missing_ok=False):
    if self.name.endswith(f".partial.rank{os.environ['DENIED_RANK']}.safetensors") and os.environ["RANK"] == os.environ["DENIED_RANK"]:
        raise PermissionError(1, "Operation not permitted", str(self))
    _unlink(self, missing_ok=missing_ok)

Path.unlink = guarded
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""


@pytest.mark.parametrize("command", ["fit-factors", "dataset-similarity"])
def test_a_rank_that_cannot_remove_its_progress_says_so_and_the_job_succeeds(tmp_path, distributed_run, command):
    """Under torchrun each rank removes its own progress once the output is written; rank 1's snapshot that cannot be
    removed (no permission) is said by rank 1 ("[rank 1] warning: ..."), the job exits 0 with the output written."""
    script = tmp_path / "unremovable_cli.py"
    script.write_text(UNREMOVABLE_CLI)
    out = tmp_path / "out"
    args = fit_args(CONFIG, out, "data.batch_size=64", "factors.checkpoint_every=1")
    if command != "fit-factors":
        fitted, factors = distributed_run("ekfac-sampled")
        assert fitted.returncode == 0, fitted.stderr
        args = [command, *args[1:], "--set", f"factors_dir={factors}"]
    env = subprocess_env() | {"DENIED_RANK": "1"}
    job = subprocess.run(_torchrun_cmd(*args, script=script), env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    pattern = {"fit-factors": storage.FACTORS_PARTIAL, "dataset-similarity": storage.SIMILARITY_PARTIAL}[command]
    left = out / pattern.format(rank=".rank1")
    assert left.is_file() and not (out / pattern.format(rank=".rank0")).exists()
    assert not list(out.glob("*.finished*"))  # rank 1's finished datasets' files go all the same
    said = f"[rank 1] warning: cannot remove {str(left)!r} (Operation not permitted), the progress of a finished run"
    assert job.stderr.count(said) == 1 and "Traceback" not in job.stderr, job.stderr
    output = {"fit-factors": storage.FACTORS_FILE, "dataset-similarity": storage.SIMILARITY_FILE}[command]
    assert storage.file_format(out / output).startswith("influence_cli.")


def test_lost_peer_in_a_collective_is_a_distributed_error(monkeypatch):
    """What rank 0 sees when rank 1 died: gloo's RuntimeError becomes one typed message (exit code 7)."""

    def lost_peer(*args, **kwargs):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4260\nmore")

    for name in ("all_reduce", "barrier", "all_gather_object", "broadcast_object_list"):
        monkeypatch.setattr(torch.distributed, name, lost_peer)
    state = DistState(rank=0, world_size=2)
    calls = {
        "all-reduce": lambda: state.all_reduce_(torch.zeros(2)),
        "barrier": state.barrier,
        "all-gather": lambda: state.all_gather_object(1),
        "broadcast": lambda: state.broadcast_object(1),
    }
    for what, call in calls.items():
        with pytest.raises(DistributedError, match=f"rank 0: {what} failed, another rank probably stopped") as info:
            call()
        assert "Connection closed by peer" in info.value.message and "more" not in info.value.message
        assert info.value.exit_code == 7


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """device: cuda:N would put every rank on one GPU (NCCL then fails with "Duplicate GPU detected")."""
    from influence_cli.distributed import init_distributed
    from influence_cli.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="device: 'cuda:1' would put all 2 ranks of this machine on one GPU") as info:
        init_distributed("cuda:1")
    assert "device: cuda or auto" in info.value.hint
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank per machine: cuda:N is that machine's GPU
    with pytest.raises(ConfigError) as info:  # here: no CUDA device at all
        init_distributed("cuda:1", source="run.yaml")
    assert "would put" not in info.value.message
    if not torch.cuda.is_available():
        assert info.value.message.startswith("run.yaml: device: 'cuda:1' requested but no CUDA device is visible")


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RANK": "3"}, "RANK=3 and WORLD_SIZE=1 in the environment"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not a whole number"),
    ],
)
def test_a_rank_outside_the_world_is_refused(monkeypatch, tmp_path, env, needle):
    """RANK set by hand without WORLD_SIZE used to run as a rank that writes nothing, with exit 0."""
    from typer.testing import CliRunner

    from influence_cli.cli import app

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml")
    result = CliRunner(env={"COLUMNS": "200", **env}).invoke(app, ["fit-factors", config, "--set", f"output_dir={tmp_path / 'out'}"])
    assert result.exit_code == 7 and needle in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_gpu_the_machine_lacks_is_named(monkeypatch):
    """cuda:N past the visible devices, or more torchrun ranks per machine than GPUs, is a ConfigError, not
    torch's "invalid device ordinal" traceback from the first copy to the device."""
    from influence_cli.distributed import resolve_device
    from influence_cli.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda:0")
    with pytest.raises(ConfigError) as info:
        resolve_device("cuda:1", source="run.yaml")
    assert info.value.message == "run.yaml: device: 'cuda:1' requested but this machine has 1 CUDA device (cuda:0)"
    assert "CUDA_VISIBLE_DEVICES" in info.value.hint
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for preference in ("cuda", "auto"):
        with pytest.raises(ConfigError) as info:
            resolve_device(preference, local_rank=2)
        assert f"device: {preference!r} gives LOCAL_RANK=2 GPU cuda:2, but this machine has 2 CUDA devices (cuda:0..cuda:1)" in info.value.message
        assert "torchrun --nproc_per_node=2" in info.value.hint
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_scores_report_speaks_for_the_whole_job():
    """The rate is every rank's examples over the slowest rank's seconds (rank 0's alone read 0/s when its
    shard was finished before a resume, or empty), and each rank says where it resumed."""
    from influence_cli.scores import _job_view

    class TwoRanks:
        distributed = True

        def __init__(self, views):
            self.views = views

        def all_gather_object(self, obj):
            return self.views

    rate, resumed = _job_view(TwoRanks([(0, 0.0, "the index (1 finished shard kept)"), (300, 2.0, "shard 1, query chunk 1/1, batch 3")]), 0, 0.0, None)
    assert rate == 150.0
    assert resumed == "rank 0: the index (1 finished shard kept); rank 1: shard 1, query chunk 1/1, batch 3"
    assert _job_view(TwoRanks([(100, 1.0, None), (100, 2.0, None)]), 100, 1.0, None) == (100.0, None)


@pytest.mark.parametrize("marked", [False, True], ids=["unmarked", "marked-as-met-alike"])
@pytest.mark.parametrize(
    "others, printed_once",
    [([("no examples", "no examples")], True), ([None], False), ([("other", "other")], False), ([("no examples in 1..2", "none")], True)],
    ids=["same", "none", "other", "alike"],
)
def test_agree_prints_an_error_once_only_when_every_rank_met_it(others, printed_once, marked):
    """A dataset spec refused on every rank is said once (rank 0); refused on some ranks only (node-local
    data), each failing rank says it, and the others stop naming it instead of staying silent. So is an error
    raised as one every rank meets alike (`everywhere`, a FIFO at a progress path) that only this rank met, such
    as its own progress file: no rank said it with its hint (it said nothing, rank 0 only "rank 1 stopped: ...").
    Errors whose messages differ only in each rank's own part (its examples) are the same error: their `alike`."""
    from influence_cli.distributed import agree
    from influence_cli.errors import DataError, DistributedError

    class Ranks:
        distributed = True

        def all_gather_object(self, obj):
            return [obj, *others]

    def fail():
        error = DataError("no examples", alike="none" if others[0] and others[0][1] == "none" else None)
        raise error.everywhere() if marked else error

    with pytest.raises(DataError) as info:
        agree(Ranks(), fail)
    assert info.value.same_on_every_rank is printed_once
    if others == ["other"]:
        return
    with pytest.raises(DistributedError, match=f"rank 1 stopped: {others[0][0]}$") if others[0] else contextlib.nullcontext():
        assert agree(Ranks(), lambda: 3) == 3


class Sums(torch.nn.Module):
    """The tiny MLP's outputs summed over the batch: one row for the whole batch."""

    def __init__(self):
        super().__init__()
        self.mlp = tiny_mlp()

    def forward(self, x):
        return self.mlp(x).sum(0, keepdim=True)


class Fails(torch.nn.Module):
    """A forward that fails whatever its inputs."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(5, 3).double()

    def forward(self, x):
        raise RuntimeError("not implemented yet")


def _first_batch_error(case: str, rank: int) -> InfluenceError:
    """The error of one rank's first batch (rank 0: 5 examples, rank 1: 6, other ones) in `case`."""
    from influence_cli.passes import check_outputs

    gen = torch.Generator().manual_seed(rank)
    n = 5 + rank
    x, y = torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)
    if case == "vocabulary":  # a language model's logits [B, T, 4] and its labels [B, T]
        y = torch.randint(0, 4, (n, 2), generator=gen)
        y[rank, 1] = 9 + rank
        return _raised(lambda: check_outputs(torch.zeros(n, 2, 4), y, torch.arange(n) + 100 * rank, "language_modeling", "data.train"))
    model = {"inputs": tiny_mlp(d_in=3), "outputs": Sums(), "weights": ReusedWeight().double(), "forward": Fails()}.get(case, tiny_mlp())
    if case == "classes":
        y[rank] = 3 + rank
    if case == "weights":
        x = x[:, :4]
    if case == "nonfinite":  # a checkpoint holding NaN: met at fit-factors' first batch (`passes.agreed_first_batch`)
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
    return _raised(lambda: exact_fit(model, x, y, batch_size=n))


def _raised(fn) -> InfluenceError:
    with pytest.raises(InfluenceError) as info:
        fn()
    return info.value


@pytest.mark.parametrize("case", ["classes", "vocabulary", "inputs", "outputs", "weights", "forward", "nonfinite"])
def test_first_batch_errors_of_two_ranks_own_examples_are_alike(case):
    """The first-batch refusals that name a rank's own examples, its batch's length or what its data measures (a label
    outside the classes at example 1 here and at example 102 there, inputs [5, 3] and [6, 3] that do not fit, a gradient
    off by another share, the non-finite gradients of a NaN checkpoint in examples 0..4 and 0..5) differ between ranks in their message and agree in their `alike`, so that `agree` has rank 0
    say them once."""
    on_0, on_1 = _first_batch_error(case, 0), _first_batch_error(case, 1)
    assert type(on_0) is type(on_1) and on_0.message != on_1.message, (on_0.message, on_1.message)
    assert on_0.alike is not None and on_0.alike == on_1.alike, (on_0.alike, on_1.alike)


# ----------------------------------------------------------------------------- a rank that lost a finished dataset's file
# What the ranks decide, in every case of lost files, is tested with ranks as threads (test_resume.py), and a
# similarity result rank 0 wrote from rank 1's copy in test_similarity.py; here, the spectrum of real processes.

# The real CLI; rank 1 stops (Ctrl-C) at batch <index> of dataset <name> (STOP="<name>:<index>"), once rank 0's snapshot
# (SNAPSHOT) counts the datasets before it as finished, so that both ranks hold their copies of them.
STOPPING_RANK_CLI = """
import os, sys, time
import influence_cli.band_energy as band_energy
from influence_cli import storage


def stopping(stream):
    def wrapped(*args, **kwargs):
        name, _, index = os.environ.get("STOP", ":").partition(":")
        for batch in stream(*args, **kwargs):
            if name and os.environ["RANK"] == "1" and kwargs["dataset_name"].endswith("." + name) and batch.index == int(index):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if storage.read_metadata(os.environ["SNAPSHOT"]).get("phase") == os.environ["PHASE"]:
                            break
                    except Exception:
                        pass
                    time.sleep(0.01)
                raise KeyboardInterrupt
            yield batch
    return wrapped


band_energy.stream_gradients = stopping(band_energy.stream_gradients)
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""

# Three datasets of 48 digits: 3 batches of 8 per rank each; progress saved every batch.
TINY = """\
model:
  architecture: mlp
  kwargs: {{input_dim: 64, hidden: [64, 32], num_classes: 10}}
  checkpoint: {sample}/mlp.safetensors
task: {{kind: classification}}
data:
  train: {{source: tensors, path: {sample}/digits.safetensors, range: [0, 240], transform: {{scale: 16.0}}}}
  batch_size: 8
factors: {{checkpoint_every: 1}}
spectrum:
  datasets:
    a: {{source: tensors, path: {sample}/digits.safetensors, range: [0, 48], transform: {{scale: 16.0}}}}
    b: {{source: tensors, path: {sample}/digits.safetensors, range: [48, 96], transform: {{scale: 16.0}}}}
    c: {{source: tensors, path: {sample}/digits.safetensors, range: [96, 144], transform: {{scale: 16.0}}}}
device: cpu
"""

PARTIAL = storage.SPECTRUM_PARTIAL


@pytest.fixture(scope="module")
def spectrum_stopped_with_two_datasets_finished(tmp_path_factory):
    """(a spectrum run's output_dir after rank 1 stopped in dataset c, both ranks holding their copies of a and b; the
    output_dir of the uninterrupted run; a function that runs spectrum under torchrun on an output_dir)."""
    root = tmp_path_factory.mktemp("lost-files")
    config = root / "tiny.yaml"
    config.write_text(TINY.format(sample=SAMPLE))
    fit.fit_factors(load_config(config, [f"output_dir={root / 'factors'}"]))
    script = root / "stopping.py"
    script.write_text(STOPPING_RANK_CLI)

    def run(out: Path, *args: str, stop: str = "") -> subprocess.CompletedProcess:
        out.mkdir(exist_ok=True)
        if not (out / storage.FACTORS_FILE).exists():
            (out / storage.FACTORS_FILE).write_bytes((root / "factors" / storage.FACTORS_FILE).read_bytes())
        env = subprocess_env() | {"STOP": stop, "SNAPSHOT": str(out / PARTIAL.format(rank=".rank0")), "PHASE": "dataset:2"}
        cmd = _torchrun_cmd("spectrum", str(config), "--set", f"output_dir={out}", *args, script=script)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)

    stopped = root / "stopped"
    result = run(stopped, stop="c:1")
    assert result.returncode != 0 and not (stopped / storage.SPECTRUM_FILE).exists(), result.stderr
    saved = sorted(p.name for p in stopped.glob(PARTIAL.format(rank="*")) if ".piece" not in p.name)
    assert saved == [PARTIAL.format(rank=f".rank{r}{f}") for r in (0, 1) for f in (".finished0", ".finished1", "")], result.stderr
    assert (stopped / PARTIAL.format(rank=".rank1.piece0")).is_file()  # rank 1's energies of c's first batch (rank 0's: as far as it got)
    reference = root / "reference"
    result = run(reference)
    assert result.returncode == 0, result.stderr
    return stopped, reference, run


def _lose(out: Path, rank: int, index: int, how: str) -> Path:
    """Deletes (`how`="missing") or truncates ("unreadable") rank `rank`'s file of finished dataset `index`; returns it."""
    path = out / PARTIAL.format(rank=f".rank{rank}.finished{index}")
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100])
    return path


def _killed_writers_temp_files(out: Path) -> list[Path]:
    """Writes temporary files as killed writers of rank 0's snapshot, rank 1's file of dataset a and the spectrum leave
    them (the start removes them once it goes on); returns them."""
    names = [PARTIAL.format(rank=".rank0"), PARTIAL.format(rank=".rank1.finished0"), storage.SPECTRUM_FILE]
    temps = [out / f".{name}.killed.tmp" for name in names]
    for tmp in temps:
        tmp.write_bytes(b"half written")
    return temps


def test_ranks_that_lost_finished_datasets_files_resume_to_the_uninterrupted_spectrum(tmp_path, spectrum_stopped_with_two_datasets_finished):
    """Rank 0 (which writes the result) lost its file of dataset a, rank 1 its file of b: each takes the other's copy
    (sent over gloo both ways), each loss is said once, and --resume ends with the uninterrupted run's spectrum, bit for
    bit, continuing in dataset c (it was refused, naming the file, and --overwrite dropped every rank's progress)."""
    stopped, reference, run = spectrum_stopped_with_two_datasets_finished
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    _lose(out, 0, 0, "missing")
    _lose(out, 1, 1, "unreadable")
    _killed_writers_temp_files(out)
    resumed = run(out, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    where = json.loads(resumed.stdout)["resumed_from"]
    assert where.startswith("rank 0: dataset 'c', batch ") and "; rank 1: dataset 'c', batch 1 (2 of 3 datasets done)" in where, where
    warned = [line for line in resumed.stderr.splitlines() if "copy takes its place" in line]
    assert len(warned) == 2 and "rank0.finished0.safetensors' is missing: it held the result of dataset 'a'" in warned[0], resumed.stderr
    assert "rank1.finished1.safetensors' is not a readable safetensors file" in warned[1] and "rank 0's copy takes its place" in warned[1]
    assert sorted(p.name for p in out.iterdir()) == [storage.FACTORS_FILE, storage.SPECTRUM_FILE]  # no progress left on any rank
    assert_same_tensors(out / storage.SPECTRUM_FILE, reference / storage.SPECTRUM_FILE)


def test_resume_refuses_when_no_rank_holds_a_finished_datasets_file(tmp_path, spectrum_stopped_with_two_datasets_finished):
    """Both ranks lost their file of dataset b: every rank refuses, said once (rank 0), naming the file; every rank
    exits with 5 (none waits in a collective); the progress is left as it is."""
    stopped, _, run = spectrum_stopped_with_two_datasets_finished
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    _lose(out, 0, 1, "missing")
    _lose(out, 1, 1, "unreadable")
    temps = _killed_writers_temp_files(out)  # refused by `DatasetsProgress.agree`, after every rank's own checks passed
    left = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run(out, "--resume")
    assert refused.returncode != 0
    name = PARTIAL.format(rank=".rank0.finished1")
    message = f"{name}' is missing: it held the result of dataset 'b', which {PARTIAL.format(rank='.rank0')} counts as finished; no other rank holds a usable copy (rank 1 lost its copy too)"
    assert refused.stderr.count(message) == 1 and "output error: " in refused.stderr and "[rank" not in refused.stderr, refused.stderr
    assert "hint: pass --overwrite" in refused.stderr and "[rank0]: Traceback" not in refused.stderr, refused.stderr
    assert len(re.findall(r"exitcode\s+: 5 ", refused.stderr)) == 2, refused.stderr  # every rank refused (output error), none waits
    assert {p.name: p.read_bytes() for p in out.iterdir()} == left
    assert all(tmp.read_bytes() == b"half written" for tmp in temps)  # a refused --resume removes nothing


def test_a_rank_whose_spectrum_pieces_are_refused_stops_every_rank(tmp_path, spectrum_stopped_with_two_datasets_finished):
    """Rank 1's piece of the energies of dataset c's first batch is missing: rank 1 refuses, naming it, and rank 0 stops
    with it, saying which rank stopped and why (the pieces are read at one point every rank takes: a rank that read its
    own alone would stop while the other streamed on and waited for it in a collective); the progress is left as it is."""
    stopped, _, run = spectrum_stopped_with_two_datasets_finished
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    (out / PARTIAL.format(rank=".rank1.piece0")).unlink()
    left = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run(out, "--resume")
    assert refused.returncode != 0
    message = f"{PARTIAL.format(rank='.rank1.piece0')}' is missing: it held per-example results {PARTIAL.format(rank='.rank1')} counts as saved"
    assert f"[rank 1] output error: '{str(out)}/{message}" in refused.stderr, refused.stderr
    assert f"[rank 0] distributed error: rank 1 stopped: '{str(out)}/{message}" in refused.stderr, refused.stderr
    assert "]: Traceback" not in refused.stderr, refused.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == left


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_at_a_progress_path_beside_a_finished_output_is_refused_by_every_rank(
    tmp_path, spectrum_stopped_with_two_datasets_finished, resume
):
    """spectrum run again (or --resume) on its finished result clears the progress left beside it, but a folder at rank
    1's progress path is refused first, by every rank alike (said once, every rank exits 5: none reports the result as
    finished), and nothing is removed: rank 0's leftover snapshot and a killed writer's temporary file stay."""
    _, reference, run = spectrum_stopped_with_two_datasets_finished
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / PARTIAL.format(rank=".rank1")).mkdir()
    (out / PARTIAL.format(rank=".rank0")).write_bytes(b"left by a kill")
    (out / f".{storage.SPECTRUM_FILE}.killed.tmp").write_bytes(b"half written")
    left = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = run(out, *(["--resume"] if resume else []))
    assert refused.returncode != 0
    message = f"{str(out / PARTIAL.format(rank='.rank1'))!r} is a folder, not a file"
    assert refused.stderr.count(message) == 1 and "output error: " in refused.stderr and "[rank" not in refused.stderr, refused.stderr
    assert "hint: set output_dir to another place, or move that folder away" in refused.stderr, refused.stderr
    assert "]: Traceback" not in refused.stderr, refused.stderr  # no rank's own traceback (torchrun prints its summary's)
    assert len(re.findall(r"exitcode\s+: 5 ", refused.stderr)) == 2, refused.stderr  # every rank refused, none went on
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == left
