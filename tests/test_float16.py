"""`factors.amp: float16`: the model's forward and backward in float16 with per-example backward seeds
scaled into float16's range, the passes' products in float32, against the same runs in float32.

float16 keeps 11 significant bits (bfloat16: 8), so where its range holds the numbers its factors
and scores are closer to float32's than bf16's; the per-example seed scaling
(`passes.layer_gradients`) is what keeps the range: without it a confidently predicted example's
output gradient (1e-9) is flushed to 0, and with it an overflowing backward is run again smaller.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from exact import SeqModel, batches_of
from test_resume import BATCHES_PER_PASS, assert_bit_identical, factors_of, interrupt_after
from test_resume import config as resume_config
from test_scores import all_scores, make_cfg, project  # noqa: F401 (project is a fixture)
from torch import nn
from typer.testing import CliRunner

import influence_cli.fit as fit
import influence_cli.passes as passes
from influence_cli.cli import app
from influence_cli.config import load_config
from influence_cli.errors import ModelError, NumericalError
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import pairwise_scores
from influence_cli.passes import finite_rows, stream_gradients
from influence_cli.scores import compute_scores, query_element_bytes
from influence_cli.tracking import find_tracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
EXIT_OUTPUT = 5


def _mlp():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return (
        nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)),
        torch.randn(96, 12, generator=g),
        torch.randint(0, 4, (96,), generator=g),
    )


def _cnn():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return model, torch.randn(48, 2, 5, 5, generator=g), torch.randint(0, 3, (48,), generator=g)


def _sequence():
    g = torch.Generator().manual_seed(3)
    return SeqModel(), torch.randn(48, 6, 4, generator=g), torch.randint(0, 3, (48,), generator=g)  # Linear on [B, T, F]


PROBLEMS = {"mlp": _mlp, "cnn": _cnn, "sequence": _sequence}
# Measured (relative, Frobenius) error of eigenvalues, A, G and scores against float32, over both Fisher kinds:
# mlp 5.2e-4, sequence 4.5e-4 (bf16: 3.4e-2 and 1.1e-2); cnn 6.4e-3 (bf16 1.6e-2), nearly all from one example
# whose conv output sits at a ReLU's kink, which the float16 forward puts on the other side (bf16 alike)
FLOORS = {"mlp": 2e-3, "cnn": 2e-2, "sequence": 2e-3}


def _fit(model, x, y, amp, fisher="sampled"):
    tracked = find_tracked_modules(model, ["*"])
    plan = PassPlan(batches_of(x, y, 16), -(-len(x) // 16), len(x), "classification", fisher, 0, amp=amp)
    return tracked, compute_factors(model, tracked, "ekfac", plan, keep_covariances=True)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _gradients(model, x, y, amp: str, mode: str = "loss") -> dict[str, torch.Tensor]:
    """{layer: g [B, T, d_out]} of one batch streamed under `amp`."""
    tracked = find_tracked_modules(model, ["*"])
    batch = next(stream_gradients(model, tracked, [(x, y, torch.arange(len(x)))], task_kind="classification", mode=mode, amp=amp))
    return batch.gradients[0]


@pytest.mark.parametrize("fisher", ["sampled", "ggn"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_float16_factors_and_scores_agree_with_float32(name, fisher):
    """Within FLOORS (measured errors with a margin of about 3)."""
    model, x, y = PROBLEMS[name]()
    floor = FLOORS[name]
    tracked, ref = _fit(model, x, y, "none", fisher)
    _, low = _fit(model, x, y, "float16", fisher)
    for layer, lf in ref.items():
        assert low[layer].eigenvalues.dtype == torch.float32
        assert not torch.equal(low[layer].g_covariance, lf.g_covariance)  # the passes did run in float16
        assert _relative_error(low[layer].eigenvalues, lf.eigenvalues) < floor, layer
        assert _relative_error(low[layer].a_covariance, lf.a_covariance) < floor, layer
        assert _relative_error(low[layer].g_covariance, lf.g_covariance) < floor, layer
    xq, yq = x[:8] + 0.1, y[:8]
    want = pairwise_scores(model, tracked, ref, batches_of(xq, yq, 4)(0), batches_of(x, y, 16)(0))
    got = pairwise_scores(model, tracked, low, batches_of(xq, yq, 4)(0), batches_of(x, y, 16)(0), amp="float16")
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    assert _relative_error(got, want) < floor


def test_products_stay_float32_under_float16(monkeypatch):
    """The covariances, rotations and scoring GEMMs take float32 operands (preconditioned queries pass 65504)."""
    model, x, y = _mlp()
    assert passes.matmul_dtype("float16") is None and passes.matmul_dtype("bfloat16") == torch.bfloat16
    assert query_element_bytes("float16", model) == 4 and query_element_bytes("bfloat16", model) == 2
    seen = []
    real = fit.stream_gradients

    def recorded(*args, **kwargs):
        for batch in real(*args, **kwargs):
            seen.append({t.dtype for t in [*batch.activations.values(), *batch.gradients[0].values()]})
            yield batch

    monkeypatch.setattr(fit, "stream_gradients", recorded)
    _fit(model, x, y, "float16")
    assert seen and all(dtypes == {torch.float32} for dtypes in seen)


def _confident_model():
    """Example 0 predicted as its label 0 with probability 1 - 1.5e-9: an output gradient of about 1e-9;
    example 1 predicted wrong: an output gradient of about 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(0.1)
        model[2].bias.copy_(torch.tensor([0.0, -21.0, -21.0]))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    return model, x, torch.tensor([0, 1])


def test_a_confidently_predicted_examples_tiny_gradient_survives_float16():
    model, x, y = _confident_model()
    want = _gradients(model, x, y, "none")
    assert 1e-10 < float(want["2"][0].abs().max()) < 1e-8  # below float16's smallest subnormal, 6e-8
    got = _gradients(model, x, y, "float16")
    for layer in want:
        assert got[layer].dtype == torch.float32
        assert float(got[layer][0].abs().max()) > 0, layer  # not flushed to 0
        # the logits themselves are rounded to float16 (half an ulp at 21 is 0.008): about 1% of e^-21
        assert _relative_error(got[layer][0], want[layer][0]) < 2e-2, layer
        assert _relative_error(got[layer][1], want[layer][1]) < 2e-2, layer


def _overflowing_model():
    """A last layer of weights about 3000 over small hidden units: moderate logits, but back-propagated
    seeds of 2^8 reach 3e5 at the hidden layer, past float16's 65504."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.mul_(1e-3)
        model[2].weight.mul_(3000.0)
    g = torch.Generator().manual_seed(0)
    return model, torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_a_float16_backward_that_overflows_runs_again_at_a_smaller_scale(monkeypatch):
    model, x, y = _overflowing_model()
    want = _gradients(model, x, y, "none")
    assert bool(finite_rows(x, [want]).all())
    peaks = []  # of each backward's seed: the weight check's lie in [1, 2), the pass's reach 2^7 at first
    real = passes.Capture.output_gradients
    monkeypatch.setattr(passes.Capture, "output_gradients", lambda self, out, v, **k: peaks.append(float(v.abs().max())) or real(self, out, v, **k))
    got = _gradients(model, x, y, "float16")
    assert len([p for p in peaks if p >= 2]) > 1  # the pass's backward run again
    assert bool(finite_rows(x, [got]).all())
    for layer in want:
        assert _relative_error(got[layer], want[layer]) < 1e-2, layer
    monkeypatch.setattr(passes, "FLOAT16_SEED_FLOOR", passes.FLOAT16_SEED_EXPONENT)  # not run again: the seeds' scale overflows
    assert not bool(finite_rows(x, [_gradients(model, x, y, "float16")]).all())


class _WideHidden(nn.Module):
    """Hidden units of about 1e4 (fc2's weights 1e4 times smaller, so moderate logits): the weight check's
    Σ g·aᵀ over 8 examples passes float16's 65504 while every layer-output gradient stays in its range.
    `reused`: fc2's weight also multiplies the hidden units through F.linear, outside fc2's own call."""

    def __init__(self, reused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.reused = nn.Linear(4, 16), nn.Linear(16, 3), reused
        with torch.no_grad():
            self.fc2.weight.mul_(1e-4)

    def forward(self, x):
        h = torch.relu(self.fc1(x)) * 1e4
        return self.fc2(h) + (0.5 * F.linear(h, self.fc2.weight) if self.reused else 0.0)


def test_a_weight_used_outside_its_layer_is_refused_when_the_checks_float16_weight_gradient_overflows():
    """The check's own float16 backward overflows (no evidence), so it is decided again without autocast."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    got = _gradients(_WideHidden(reused=False), x, y, "float16")
    assert bool(finite_rows(x, [got]).all())
    with pytest.raises(ModelError, match=r"layer 'fc2': the gradient of its weight is not Σ g·aᵀ of its own calls"):
        _gradients(_WideHidden(reused=True), x, y, "float16")


def test_a_nan_input_is_still_reported_under_float16():
    model, x, y = _mlp()
    x = x.clone()
    x[19, 3] = float("nan")
    with pytest.raises(NumericalError, match=r"covariance pass at batch 1 \(examples with global indices 19\)"):
        _fit(model, x, y, "float16")


def test_a_forward_past_float16s_range_names_float16_in_the_hint():
    """Inputs of 1e5 overflow float16 in the first layer (float32 is finite): the error's hint says so."""
    model, x, y = _mlp()
    x = x * 1e5
    _fit(model, x, y, "none")
    with pytest.raises(NumericalError) as err:
        _fit(model, x, y, "float16")
    assert "float16's range" in err.value.hint and "bfloat16 or none" in err.value.hint
    nan = x.clone()
    nan[19, 3] = float("nan")
    with pytest.raises(NumericalError) as err:
        _fit(model, nan, y, "none")
    assert "float16" not in err.value.hint


@pytest.mark.parametrize(
    ("cut", "resumed_from"), [(7, "covariance pass, batch 6"), (BATCHES_PER_PASS + 7, "correction pass, batch 6")]
)
def test_float16_fit_resumes_bit_identically(tmp_path, monkeypatch, cut, resumed_from):
    reference = tmp_path / "reference"
    reference.mkdir()
    fit.fit_factors(resume_config(reference, "factors.amp=float16"))
    cfg = resume_config(tmp_path / "cut", "factors.amp=float16")
    interrupt_after(monkeypatch, cut)
    with pytest.raises(KeyboardInterrupt):
        fit.fit_factors(cfg)
    monkeypatch.undo()
    report = fit.fit_factors(cfg, resume=True)
    assert report.resumed_from == resumed_from
    assert_bit_identical(factors_of(tmp_path / "cut"), factors_of(reference))


def test_sharded_float16_scores_equal_unsharded(project):  # noqa: F811
    plain = make_cfg(project, "fp16-unsharded", "factors.amp=float16", "scores.query_chunk=7")
    compute_scores(plain)
    budget = 7 * 16 * 4 / 2**20  # 16 training columns per shard (float32 queries under float16)
    sharded = make_cfg(project, "fp16-sharded", "factors.amp=float16", f"scores.max_memory_mb={budget}", "scores.query_chunk=7")
    report = compute_scores(sharded)
    assert report.sharded and report.num_shards == 3
    assert torch.equal(all_scores(sharded.output_path), all_scores(plain.output_path))


def test_cli_float16_end_to_end_and_refused_under_another_amp(tmp_path):
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    config = str(ROOT / "configs" / "digits.yaml")
    sets = ["--set", f"output_dir={tmp_path}", "--set", "device=cpu", "--set", "factors.amp=float16"]
    for command in (["fit-factors"], ["compute-scores"], ["top-k", "--k", "3"]):
        result = runner.invoke(app, [command[0], config, *command[1:], *sets])
        assert result.exit_code == 0, result.stderr
    assert "query 0 · index 1500" in result.stdout and "proponent" in result.stdout
    other = sets[:-1] + ["factors.amp=none"]
    result = runner.invoke(app, ["top-k", config, *other])
    assert result.exit_code == EXIT_OUTPUT
    assert "holds scores computed with factors.amp=float16; the config has none" in " ".join(result.stderr.split())
    result = runner.invoke(app, ["compute-scores", config, "--resume", *other])
    assert result.exit_code == EXIT_OUTPUT, result.stderr
    assert "holds scores of a finished run with other settings (factors.amp float16 -> none)" in " ".join(result.stderr.split())


def test_bundled_cnn_scores_in_float16_agree_with_float32(tmp_path):
    """The bundled digits CNN (exact GGN, margin, RelatIF) has confidently predicted digits whose output
    gradients lie below float16's range: measured Pearson with float32 0.99998 with the per-example seed
    scaling, 0.67 without it; asserted at 0.999."""
    got = {}
    for amp in ("none", "float16"):
        cfg = load_config(
            ROOT / "configs" / "digits_cnn.yaml", [f"output_dir={tmp_path / amp}", "device=cpu", f"factors.amp={amp}"]
        )
        fit.fit_factors(cfg)
        compute_scores(cfg)
        got[amp] = all_scores(cfg.output_path, 10).double()
    assert not torch.equal(got["none"], got["float16"])
    assert float(torch.corrcoef(torch.stack([got["none"].flatten(), got["float16"].flatten()]))[0, 1]) > 0.999


def test_dataset_similarity_and_spectrum_run_in_float16(tmp_path):
    """dataset-similarity's passes honour factors.amp too; spectrum's pass runs in float32, on the
    factors fitted under it. Measured against float32 on the digits: the normalized Fisher kernel
    within 1.7e-4, the training set's band shares within 1.2e-5."""
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    config = str(ROOT / "configs" / "digits.yaml")
    out = {}
    for amp in ("none", "float16"):
        sets = ["--set", f"output_dir={tmp_path / amp}", "--set", "device=cpu", "--set", f"factors.amp={amp}"]
        for command in ("fit-factors", "dataset-similarity", "spectrum"):
            result = runner.invoke(app, [command, config, "--json", *sets])
            assert result.exit_code == 0, result.stderr
            out[amp, command] = json.loads(result.stdout)
    kernels = [torch.tensor(out[amp, "dataset-similarity"]["kernel_normalized"]) for amp in ("none", "float16")]
    assert not torch.equal(*kernels) and float((kernels[1] - kernels[0]).abs().max()) < 2e-3
    shares = [out[amp, "spectrum"]["groups"][0]["share"] for amp in ("none", "float16")]
    assert shares[0] != shares[1] and all(abs(shares[1][band] - shares[0][band]) < 2e-4 for band in shares[0])


def test_powers_of_two_are_exact_over_the_seed_scales_range():
    e = torch.arange(-126, 128)
    for dtype in (torch.float32, torch.float64):
        got = passes.powers_of_two(e, dtype)
        assert got.dtype == dtype
        assert torch.equal(got.double(), torch.tensor([2.0**k for k in e.tolist()], dtype=torch.float64))
