"""compute-scores killed mid-pass (a real SIGKILL) resumes to bit-identical scores; runs are reproducible."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stopping import assert_same_tensors

from influence_cli import storage
from influence_cli.config import load_config
from influence_cli.errors import OutputError
from influence_cli.fit import fit_factors
from influence_cli.scores import compute_scores

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
# 1500 training digits in batches of 32 (47 batches), 200 queries, progress saved every 4 batches.
SETTINGS = ["device=cpu", "data.batch_size=32", "factors.checkpoint_every=4", "data.query.range=[1500, 1700]"]
PARTIAL = storage.SCORES_PARTIAL.format(rank="")

# The real CLI with each scored batch slowed down, so that the kill lands mid-pass on any machine.
SLOW_CLI = """
import sys, time
import influence_cli.scores as scores

_stream = scores.stream_gradients

def slow_stream(*args, **kwargs):
    for batch in _stream(*args, **kwargs):
        if kwargs.get("mode") == "loss":
            time.sleep(0.03)
        yield batch

scores.stream_gradients = slow_stream
from influence_cli.cli import main
sys.argv[0] = "influence"
main()
"""




def cli(out: Path, *extra: str) -> list[str]:
    sets = [a for s in [*SETTINGS, f"output_dir={out}"] for a in ("--set", s)]
    return [sys.executable, "-c", SLOW_CLI, "compute-scores", str(CONFIG), *sets, *extra]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """Factors of the digits sample, and the scores of one uninterrupted run."""
    out = tmp_path_factory.mktemp("scores-ref")
    cfg = load_config(CONFIG, [*SETTINGS, f"output_dir={out}"])
    fit_factors(cfg)
    compute_scores(cfg)
    return out


def test_same_config_gives_bit_identical_scores(fitted, tmp_path):
    (tmp_path / storage.FACTORS_FILE).write_bytes((fitted / storage.FACTORS_FILE).read_bytes())
    compute_scores(load_config(CONFIG, [*SETTINGS, f"output_dir={tmp_path}"]))
    assert_same_tensors(tmp_path / storage.SCORES_FILE, fitted / storage.SCORES_FILE)


def test_sigkill_mid_pass_then_resume_is_bit_identical(fitted, tmp_path):
    (tmp_path / storage.FACTORS_FILE).write_bytes((fitted / storage.FACTORS_FILE).read_bytes())
    env = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.Popen(cli(tmp_path), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (tmp_path / PARTIAL).exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before saving progress:\n{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no progress saved within 90 s")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / storage.SCORES_FILE).exists()  # nothing that looks finished

    refused = subprocess.run(cli(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 5 and "--resume" in refused.stderr, refused.stderr

    resumed = subprocess.run(cli(tmp_path, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_same_tensors(tmp_path / storage.SCORES_FILE, fitted / storage.SCORES_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.FACTORS_FILE, storage.SCORES_FILE]


def test_resume_with_other_settings_never_replaces_the_shards_an_interrupted_run_finished(fitted, tmp_path):
    """Killed after some shards, with no progress file (checkpoint_every 0, or before the first save):
    --resume with other settings is refused by name; with the same ones it adds only the missing shards."""
    (tmp_path / storage.FACTORS_FILE).write_bytes((fitted / storage.FACTORS_FILE).read_bytes())
    sets = [*SETTINGS, f"output_dir={tmp_path}", "scores.max_memory_mb=0.5", "factors.checkpoint_every=0"]
    compute_scores(load_config(CONFIG, sets))
    shards = sorted(tmp_path.glob("scores.shard*.safetensors"))
    assert len(shards) >= 3
    (tmp_path / storage.SCORES_INDEX).unlink()
    shards[-1].unlink()  # as a run killed while scoring its last shard leaves the folder
    kept = {p: p.read_bytes() for p in shards[:-1]}
    with pytest.raises(OutputError, match=rf"holds {len(kept)} score shard\(s\) of an interrupted run with other settings \(damping") as exc:
        compute_scores(load_config(CONFIG, [*sets, "scores.damping=0.001"]), resume=True)
    assert "--overwrite" in exc.value.hint
    assert all(p.read_bytes() == data for p, data in kept.items())
    report = compute_scores(load_config(CONFIG, sets), resume=True)
    assert report.resumed_from == f"shard {len(kept)} ({len(kept)} finished shards kept)"
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert shards[-1].is_file() and (tmp_path / storage.SCORES_INDEX).is_file()


def test_resume_of_finished_scores_clears_the_progress_a_late_kill_left(fitted, tmp_path):
    """Killed right after the final rename: the progress file stays beside the finished scores; --resume says
    'already complete' and removes it (the finished file holds all of it)."""
    for name in (storage.FACTORS_FILE, storage.SCORES_FILE):
        (tmp_path / name).write_bytes((fitted / name).read_bytes())
    left = tmp_path / PARTIAL
    left.write_bytes(b"progress of the run that wrote the scores")
    other = tmp_path / storage.SCORES_PARTIAL.format(rank=".self")  # --self's own progress is not this run's
    other.write_bytes(b"progress of an interrupted --self run")
    temps = [tmp_path / f".{name}.killed.tmp" for name in (storage.SCORES_FILE, storage.SCORES_INDEX, storage.SCORES_SHARD.format(shard=0))]
    for temp in temps:  # what a writer killed mid-write left
        temp.write_bytes(b"half")
    others = [tmp_path / f".{name}.killed.tmp" for name in (storage.SELF_INFLUENCE_FILE, storage.FACTORS_FILE)]  # not this command's
    for temp in others:
        temp.write_bytes(b"half")
    report = compute_scores(load_config(CONFIG, [*SETTINGS, f"output_dir={tmp_path}"]), resume=True)
    assert report.resumed_from == "already complete" and not left.exists() and other.exists()
    assert not any(t.exists() for t in temps) and all(t.exists() for t in others)
