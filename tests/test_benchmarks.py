"""Every benchmark script runs on the current code: each at a tiny size, in processes of its own.

The scripts in benchmarks/ call the package's internals (`fit.compute_factors`, `kernel._Positions`,
`scores._run_pairwise`, ...), which an internal change can break without any other test noticing.
Each job below runs one script (after whatever it reads, such as fitted factors) at a tiny size,
one intra-op thread per process, and checks it exits 0 and prints its report. The jobs run two at
a time (each is mostly one process's start-up and small GEMMs); the figures the scripts print at
these sizes mean nothing. The jobs marked slow (`make test-all`) are a dozen process start-ups at
any size.

The scripts with a Kronfluence half run without it, as they do when kronfluence (`make
bench-install`) is missing: `test_kronfluence_half` runs the halves that have a flag to skip them
when kronfluence can be imported and is skipped, saying so, when it cannot; the others are checked
for their Kronfluence lines then too. `benchmarks/gpu_check.sh` needs a GPU: it is checked for
syntax, its Python steps run as the dry runs below (`--device cpu`), and every `benchmarks/*.py`
flag that it, the Makefile and the docs pass is checked to exist.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mnist_files import IMAGES, LABELS, MNIST_DIR, ROOT

HAS_MNIST = IMAGES.is_file() and LABELS.is_file()
HAS_KRONFLUENCE = importlib.util.find_spec("kronfluence") is not None
PARALLEL = 2  # jobs at a time
TIMEOUT = 300  # seconds, per command


@dataclass(frozen=True)
class Job:
    """Commands run in order (each the arguments of `python`; `{tmp}` is the job's own folder); the
    last one's output must contain `expect`, and `with_kronfluence` too where kronfluence can be imported
    (the script then runs its Kronfluence half as well)."""

    commands: tuple[tuple[str, ...], ...]
    expect: str
    mnist: bool = True
    marks: tuple = field(default=())
    with_kronfluence: str | None = None


def job(*commands: str, expect: str, mnist: bool = True, marks: tuple = (), with_kronfluence: str | None = None) -> Job:
    return Job(tuple(tuple(c.split()) for c in commands), expect, mnist, marks, with_kronfluence)


SLOW = (pytest.mark.slow,)  # `make test-all`: jobs that are mostly a dozen process start-ups whatever the size

JOBS: dict[str, Job] = {  # the longest first: two at a time, they end together
    "compare_kronfluence": job(  # the speed section: one worker process
        "benchmarks/compare_kronfluence.py --fidelity 300x10 --speed 300x10 --repeats 1 --skip-fidelity --skip-processes --out {tmp}/compare",
        expect="scoring pass / floor",
        with_kronfluence="Kronfluence's scores / floor",
    ),
    "bench_factor_loading+bench_scoring_buffer": job(
        "-m influence_cli fit-factors configs/digits_cnn.yaml --set output_dir={tmp}/cnn --json",
        "benchmarks/bench_factor_loading.py configs/digits_cnn.yaml --set output_dir={tmp}/cnn",
        # a 4,096-entry buffer: conv2's per-example gradients formed 3 examples at a time
        "benchmarks/bench_scoring_buffer.py cli --fresh 4096 compute-scores configs/digits_cnn.yaml --set output_dir={tmp}/cnn --json",
        "benchmarks/bench_scoring_buffer.py kernel --repeats 1 --shape 4,9,8",
        expect="| examples per chunk |",
        mnist=False,
    ),
    "lds": job(
        "benchmarks/lds.py --train 200 --queries 5 --subsets 4 --retrain-seeds 1 --jobs 1 --skip-ensemble --skip-kronfluence --out {tmp}/lds",
        expect="| influence_cli | ekfac | sampled | auto, layer |",
    ),
    "gpu_profile": job("benchmarks/gpu_profile.py --device cpu --train 512 --queries 16 --out {tmp}/profile", expect="cProfile"),
    "train_mnist+bench_progress": job(
        "benchmarks/train_mnist.py --out {tmp}/mlp.safetensors --train 0:200 --epochs 1",
        "benchmarks/bench_progress.py --model {tmp}/mlp.safetensors --limit 300",
        expect="progress files written",
    ),
    "memorization": job("benchmarks/memorization.py --epochs 1 --seeds 0 --train 600 --out-dir {tmp}/memorization", expect="AUROC self-influence"),
    "amp_fidelity": job("benchmarks/amp_fidelity.py --train 300 --queries 10 --amps float16", expect="digits CNN"),
    "bench_scores": job("benchmarks/bench_scores.py --train 300 --queries 10 --amp bfloat16", expect="agreement with float32"),
    "gpu_check": job(
        "benchmarks/gpu_check.py --device cpu --train 500 --queries 20 --repeats 1", expect="scores against float32 scores",
        with_kronfluence="kronfluence (same workload, CPU",
    ),
    "bench_conv": job("benchmarks/bench_conv.py --arch cnn --train 16 --queries 2 --repeats 0 --skip-kronfluence", expect="| compute-scores |"),
    "bench_fit": job("benchmarks/bench_fit.py --train 300 --repeats 1 --amp none,bfloat16 --skip-memory", expect="fit-factors (passes + eigendecomposition)"),
    "bench_lm": job(
        "benchmarks/bench_lm.py --train 16 --queries 2 --repeats 1 --vocab 32 --length 8 --batch-size 8", expect="scores finite: True", mnist=False
    ),
    "bench_topk": job(
        "benchmarks/bench_topk.py --queries 20 --train 2000 --by-layer 2 --repeats 1 --cli --dir {tmp}/topk", expect="rankings: the same", mnist=False
    ),
    "tf32_gap": job("benchmarks/tf32_gap.py --device cpu --configs configs/digits.yaml", expect="| TF32 on |", mnist=False),
    "eigh_precision": job("benchmarks/eigh_precision.py --train 64 --channels 2,4", expect="kfac_solve_rel_error"),
    "profile_fit": job("benchmarks/profile_fit.py --train 64 --channels 2,4 --checkpoint-every 1", expect="ru_maxrss of the process"),
    "bench_scoring_buffer-whole": job(
        "benchmarks/bench_scoring_buffer.py whole --batch 4 --repeats 1 --shape 4,9,8", expect="scores bit for bit", mnist=False
    ),
    # each measurement a CLI process of its own: 8 or 9 processes (about 20 s of CPU) at any size
    "bench_memory": job("benchmarks/bench_memory.py --sizes 100,300 --queries 10", expect="fit-factors peak RSS", marks=SLOW),
    "bench_scale": job("benchmarks/bench_scale.py 200", expect="| top-k --k 10 --query 5 |", mnist=False, marks=SLOW),
    "compare_kronfluence-all": job(  # 7 worker processes and 2 CLI processes
        "benchmarks/compare_kronfluence.py --fidelity 300x10 --speed 300x10 --repeats 1 --out {tmp}/compare",
        expect="Whole processes, 300 × 10",
        marks=SLOW,
        with_kronfluence="| kronfluence | 1.000000",
    ),
}

KRONFLUENCE_JOBS: dict[str, Job] = {  # the Kronfluence halves, run when kronfluence can be imported
    "bench_conv": job("benchmarks/bench_conv.py --arch cnn --train 16 --queries 2 --repeats 0", expect="influence_cli / Kronfluence"),
    "lds": job(
        "benchmarks/lds.py --train 200 --queries 5 --subsets 4 --retrain-seeds 1 --jobs 1 --skip-ensemble --out {tmp}/lds",
        expect="best of the sweep",
    ),
}


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "INFLUENCE_MNIST_DIR": str(MNIST_DIR)}


def run_job(j: Job, tmp: Path) -> str:
    """Runs the job's commands in order; the output of each, failing at the first one that fails."""
    tmp.mkdir(parents=True, exist_ok=True)
    outputs = []
    for command in j.commands:
        args = [sys.executable, *(a.replace("{tmp}", str(tmp)) for a in command)]
        try:
            done = subprocess.run(args, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{' '.join(command)}: still running after {TIMEOUT} s") from exc
        outputs.append(done.stdout + done.stderr)
        if done.returncode:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{outputs[-1][-4000:]}")
    return outputs[-1]


def selected(session: pytest.Session, test: str) -> list[str]:
    """The ids of `test`'s parametrized items this session runs (after -k and -m)."""
    return [item.callspec.id for item in session.items if item.originalname == test and hasattr(item, "callspec")]


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """Every selected job, started `PARALLEL` at a time as soon as the module begins: {(test, id): Future}."""
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    futures: dict[tuple[str, str], Future[str]] = {}
    for test, jobs in (("test_benchmark_runs", JOBS), ("test_kronfluence_half", KRONFLUENCE_JOBS)):
        if test == "test_kronfluence_half" and not HAS_KRONFLUENCE:
            continue
        for name in selected(request.session, test):
            j = jobs[name]
            if j.mnist and not HAS_MNIST:
                continue
            futures[test, name] = pool.submit(run_job, j, tmp_path_factory.mktemp(re.sub(r"\W", "_", name)))
    yield futures
    for f in futures.values():
        f.cancel()
    pool.shutdown(wait=True)


def result(started: dict[tuple[str, str], Future[str]], test: str, name: str, j: Job, tmp: Path) -> str:
    """The job's output: from the pool, or run now in `tmp` if the fixture did not start it (an item it did not see)."""
    future = started.get((test, name))
    return future.result() if future is not None else run_job(j, tmp)


def params(jobs: dict[str, Job]) -> list:
    return [pytest.param(name, id=name, marks=j.marks) for name, j in jobs.items()]


@pytest.mark.parametrize("name", params(JOBS))
def test_benchmark_runs(name, started, tmp_path):
    j = JOBS[name]
    if j.mnist and not HAS_MNIST:
        pytest.skip(f"real MNIST test split not found in {MNIST_DIR} (set INFLUENCE_MNIST_DIR)")
    out = result(started, "test_benchmark_runs", name, j, tmp_path)
    assert j.expect in out, out[-4000:]
    if HAS_KRONFLUENCE and j.with_kronfluence:
        assert j.with_kronfluence in out, out[-4000:]


@pytest.mark.skipif(not HAS_KRONFLUENCE, reason="kronfluence is not installed (`make bench-install`, then run the tests with .venv-bench/bin/python)")
@pytest.mark.parametrize("name", params(KRONFLUENCE_JOBS))
def test_kronfluence_half(name, started, tmp_path):
    if not HAS_MNIST:
        pytest.skip(f"real MNIST test split not found in {MNIST_DIR} (set INFLUENCE_MNIST_DIR)")
    out = result(started, "test_kronfluence_half", name, KRONFLUENCE_JOBS[name], tmp_path)
    assert KRONFLUENCE_JOBS[name].expect in out, out[-4000:]


def test_every_script_has_a_job():
    """A new benchmark script gets a job here (helpers imported by the others need none)."""
    helpers = {"mnist_common", "field_common", "kronfluence_task"}
    covered = {Path(a).stem for j in JOBS.values() for c in j.commands for a in c if a.startswith("benchmarks/")}
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - helpers
    assert scripts - covered == set()


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


# `benchmarks/name.py` and the arguments after it on the same line, up to the end of the command
INVOCATION = re.compile(r"benchmarks/(\w+)\.py((?:[ \t]+[^\s`|;#)&]+)*)")


def test_documented_flags_exist():
    """Every `--flag` that the Makefile, gpu_check.sh, the docs and the scripts' own usage lines pass
    to a benchmark script is one that script defines."""
    sources = [ROOT / "Makefile", ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.py"),
               ROOT / "benchmarks" / "gpu_check.sh"]  # fmt: skip
    unknown = []
    for source in sources:
        for m in INVOCATION.finditer(source.read_text()):
            script = ROOT / "benchmarks" / f"{m.group(1)}.py"
            if not script.is_file():
                unknown.append(f"{source.name}: benchmarks/{m.group(1)}.py does not exist")
                continue
            text = script.read_text()
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
                if f'"{flag}"' not in text:
                    unknown.append(f"{source.name}: benchmarks/{m.group(1)}.py {flag}")
    assert unknown == []
