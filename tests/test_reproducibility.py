"""What a rerun gives: the sampled Fisher's labels depend on the seed and the example alone, and the thread
count and batch size change the factors and scores only by float32 rounding (docs/GUIDE.md, "Reproducibility").

The bit-for-bit claims are pinned where their machinery is tested: the same command twice
(test_resume.test_same_config_and_seed_give_bit_identical_factors,
test_scores_interrupted.test_same_config_gives_bit_identical_scores), a resumed run
(test_resume, test_scores_interrupted, test_distributed.test_interrupted_job_resumes_to_the_same_factors).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import curvature_times

from influence_cli import storage
from influence_cli import task as task_lib
from influence_cli.config import load_config
from influence_cli.fit import fit_factors
from influence_cli.scores import compute_scores

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"
F64 = torch.float64


@pytest.mark.parametrize("kind", ["classification", "regression", "language_modeling"])
def test_sampled_labels_depend_only_on_the_seed_and_the_example(kind):
    """Each example draws the same label (or target, or tokens) whichever batch holds it, at whichever place
    (batch size, data order, a rank's shard, a resumed pass): the same bits; another seed draws others."""
    g = torch.Generator().manual_seed(0)
    n = 40
    shape = {"classification": (n, 7), "regression": (n, 3), "language_modeling": (n, 5, 11)}[kind]
    outputs = torch.randn(shape, generator=g, dtype=F64)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=g) if kind == "language_modeling" else torch.zeros(n)
    indices = torch.randperm(10_000, generator=g)[:n] + 3  # global indices, as a subset or a shard keeps them
    whole = task_lib.sample_targets(outputs, targets, indices, kind, seed=5)
    order = torch.randperm(n, generator=g)
    pieces = torch.cat([task_lib.sample_targets(outputs[p], targets[p], indices[p], kind, seed=5) for p in order.split(7)])
    assert torch.equal(pieces, whole[order])
    assert not torch.equal(task_lib.sample_targets(outputs, targets, indices, kind, seed=6), whole)


def test_seeds_that_share_their_low_32_bits_draw_other_labels():
    """The counter hash takes the seed's bits above 32 too (a config's seed may be up to 2**63 - 1), and seeds below
    2**32 draw what they always drew."""
    idx = torch.arange(1000)
    draws = {seed: task_lib.counter_uniform(seed, idx, 4) for seed in (0, 7, 2**32, 2**32 + 7, 2**62)}
    assert not torch.equal(draws[0], draws[2**32]) and not torch.equal(draws[7], draws[2**32 + 7])
    assert not torch.equal(draws[0], draws[2**62])
    # example 1's numbers under seed 0, as drawn before the high bits were taken in
    assert draws[0][1].tolist() == [0.14063432381954044, 0.32697531196754426, 0.22536502999719232, 0.789259173325263]


def _fit_and_score(out: Path, threads: int, *sets: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    cfg = load_config(CONFIG, [f"output_dir={out}", "device=cpu", "data.train.range=[0, 500]", "data.query.range=[1500, 1510]", *sets])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fit_factors(cfg)
        compute_scores(cfg)
    finally:
        torch.set_num_threads(before)
    return load_file(out / storage.FACTORS_FILE), load_file(out / storage.SCORES_FILE)["scores"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor]:
    """The output_dir, factors and scores of 500 digits in batches of 64, on one thread."""
    out = tmp_path_factory.mktemp("reference")
    return out, *_fit_and_score(out, 1, "data.batch_size=64")


@pytest.mark.parametrize(
    ("threads", "batch_size"), [(2, 64), (1, 100), (1, 500)], ids=["2-threads", "batch-size-100", "one-batch"]
)
def test_the_thread_count_and_batch_size_change_factors_and_scores_only_by_rounding(tmp_path, reference, threads, batch_size):
    """float32 sums in another order: the curvature (a basis-free product with it) agrees to 1e-4 of its norm
    and every score to 1e-4 of the largest (measured on the digits: 5e-6 and 2e-5 at most)."""
    _, ref_factors, ref_scores = reference
    factors, scores = _fit_and_score(tmp_path / "other", threads, f"data.batch_size={batch_size}")
    assert sorted(factors) == sorted(ref_factors)
    for layer in sorted({k.rsplit(".", 1)[0] for k in ref_factors}):
        assert torch.equal(factors[f"{layer}.num_examples"], ref_factors[f"{layer}.num_examples"])
        v = torch.randn(ref_factors[f"{layer}.eigenvalues"].shape, generator=torch.Generator().manual_seed(0), dtype=F64)
        a, b = curvature_times(factors, layer, v), curvature_times(ref_factors, layer, v)
        assert (a - b).norm() <= 1e-4 * b.norm(), layer
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4 * float(ref_scores.abs().max()))


def test_two_runs_of_the_same_commands_differ_only_in_their_times(tmp_path, reference):
    """fit-factors then compute-scores again into another output_dir: the same bits, and metadata that differs
    only in `created`, `output_dir` and, in the scores, the keys that name their factors file by its `created`."""
    factors, scores = _fit_and_score(tmp_path, 1, "data.batch_size=64")
    first, ref_factors, ref_scores = reference
    assert sorted(factors) == sorted(ref_factors) and all(torch.equal(factors[k], ref_factors[k]) for k in factors)
    assert torch.equal(scores, ref_scores)
    for name, by_factors_time in ((storage.FACTORS_FILE, set()), (storage.SCORES_FILE, {"factors", "run_key", "result_key", "settings", "result"})):
        a, b = storage.read_metadata(tmp_path / name), storage.read_metadata(first / name)
        assert a["config"] | {"output_dir": None} == b["config"] | {"output_dir": None}
        differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"created", "config"}
        assert differ <= by_factors_time, (name, differ)  # none when the two fits were made in the same second
        if by_factors_time:
            same = {"created": None, "bytes": None}  # bytes: the factors file's, whose metadata holds output_dir
            assert a["factors"] | same == b["factors"] | same, (a["factors"], b["factors"])
            for key in ("settings", "result"):
                assert a[key] | {"factors": None} == b[key] | {"factors": None}, key


def test_the_tests_the_docs_cite_exist():
    """Every `test_file.py::test_name` (and `test_file.py`) README.md and docs/ cite is a test there: a renamed or
    removed test leaves no claim unpinned."""
    import re

    cited = set()
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        cited |= {(doc.name, *m) for m in re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?", doc.read_text())}
    assert any(doc == "GUIDE.md" for doc, _, _ in cited)
    missing = []
    for doc, file, name in sorted(cited):
        path = ROOT / "tests" / file
        if not path.is_file() or (name and not re.search(rf"^def {name}\(", path.read_text(), re.M)):
            missing.append(f"{doc}: {file}{'::' + name if name else ''}")
    assert missing == []
