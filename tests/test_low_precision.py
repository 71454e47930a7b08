"""`factors.amp: bfloat16`: the passes' matrix products (covariances, rotations, Λ*, the scoring
GEMMs) in bfloat16 with float32 sums, against the same run in float32.

bfloat16 keeps 8 significant bits, so a single product is off by about 0.4%; sums over batches
stay float32. These tests bound the resulting error of factors and scores on a small float32 model.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from exact import batches_of
from test_scores import write_project
from torch import nn
from typer.testing import CliRunner

from influence_cli.cli import app
from influence_cli.factors import add_product_, low_precision_mm
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import ScoreKernel, pairwise_scores
from influence_cli.tracking import find_tracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(n=96, d=12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return model, x, y


def _fit(model, x, y, amp, strategy="ekfac"):
    tracked = find_tracked_modules(model, ["*"])
    plan = PassPlan(batches_of(x, y, 16), -(-len(x) // 16), len(x), "classification", "empirical", 0, amp=amp)
    return tracked, compute_factors(model, tracked, strategy, plan, keep_covariances=True)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_low_precision_product_is_close_and_summed_in_float32():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 40, generator=g), torch.randn(40, 30, generator=g)
    prod = low_precision_mm(x, y, torch.bfloat16, torch.float32)
    assert prod.dtype == torch.float32
    assert _relative_error(prod, x @ y) < 1e-2
    acc = torch.zeros(64, 30)
    add_product_(acc, x, y, torch.bfloat16, alpha=0.5)
    assert acc.dtype == torch.float32 and _relative_error(acc, 0.5 * (x @ y)) < 1e-2


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_bfloat16_factors_are_close_to_float32(strategy):
    model, x, y = _problem()
    _, ref = _fit(model, x, y, "none", strategy)
    _, low = _fit(model, x, y, "bfloat16", strategy)
    for name, lf in ref.items():
        assert low[name].eigenvalues.dtype == torch.float32
        assert not torch.equal(low[name].eigenvalues, lf.eigenvalues)  # the products did run in bfloat16
        assert _relative_error(low[name].eigenvalues, lf.eigenvalues) < 3e-2, name
        if lf.a_covariance is not None:
            assert _relative_error(low[name].a_covariance, lf.a_covariance) < 1e-2
            # g comes from a bfloat16 forward and backward (autocast), hence a little further off
            assert _relative_error(low[name].g_covariance, lf.g_covariance) < 3e-2


def test_bfloat16_scores_agree_with_float32():
    model, x, y = _problem()
    tracked, ref_factors = _fit(model, x, y, "none")
    _, low_factors = _fit(model, x, y, "bfloat16")
    xq, yq = x[:10] + 0.1, y[:10]
    ref = pairwise_scores(model, tracked, ref_factors, batches_of(xq, yq, 5)(0), batches_of(x, y, 16)(0))
    low = pairwise_scores(model, tracked, low_factors, batches_of(xq, yq, 5)(0), batches_of(x, y, 16)(0), amp="bfloat16")
    assert low.dtype == torch.float32
    pearson = torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1]
    assert pearson > 0.995
    assert (ref.argmax(1) == low.argmax(1)).float().mean() >= 0.9  # the top proponent of almost every query


@pytest.mark.parametrize("contracted", [False, True], ids=["formed", "contracted"])
def test_bfloat16_conv_scores_agree_with_float32_in_both_forms(monkeypatch, contracted):
    """Layers with positions: per-example gradients formed, or the queries contracted with a first."""
    import influence_cli.kernel as kernel_mod

    monkeypatch.setattr(kernel_mod, "contracts_positions", lambda n_query, positions: contracted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(48, 2, 5, 5, generator=g), torch.randint(0, 3, (48,), generator=g)
    tracked, factors = _fit(model, x, y, "none")
    xq, yq = x[:6] + 0.1, y[:6]
    ref = pairwise_scores(model, tracked, factors, batches_of(xq, yq, 3)(0), batches_of(x, y, 16)(0))
    low = pairwise_scores(model, tracked, factors, batches_of(xq, yq, 3)(0), batches_of(x, y, 16)(0), amp="bfloat16")
    assert low.dtype == torch.float32 and not torch.equal(low, ref)
    assert torch.corrcoef(torch.stack([ref.flatten(), low.flatten()]))[0, 1] > 0.995


@pytest.mark.parametrize(("d_in", "d_out"), [(3, 40), (40, 3)])
def test_per_position_products_of_bfloat16_queries_keep_the_gemm_accumulation(monkeypatch, d_in, d_out):
    """The per-token parts (and the few-queries form of layers with positions) multiply bfloat16 queries through
    `low_precision_mm`, whose product off the CPU is the GEMM's float32 accumulation: with it standing in for
    CUDA's, the parts are those of the bfloat16 operands to float32's precision, not rounded to 8 bits first."""
    from influence_cli import kernel

    def accumulated(x, y, dtype, out_dtype):  # CUDA's mm(out_dtype=float32): products of the rounded operands, summed in float32
        return torch.mm(x.to(dtype).float(), y.to(dtype).float()).to(out_dtype)

    monkeypatch.setattr(kernel, "low_precision_mm", accumulated)
    g = torch.Generator().manual_seed(0)
    q, a, grad = (torch.randn(*shape, generator=g).bfloat16() for shape in ((2, d_out * d_in), (3, 4, d_in), (3, 4, d_out)))
    parts = kernel._per_position_scores(q, a, grad)
    want = torch.einsum("bto,qoi,bti->qbt", grad.double(), q.double().view(2, d_out, d_in), a.double())
    assert parts.dtype == torch.float32
    assert _relative_error(parts.double(), want) < 1e-6  # rounded to bfloat16 before the dot with the other side: ~1e-3


def test_scoring_gemm_runs_on_bfloat16_queries():
    model, x, y = _problem(n=32)
    _, factors = _fit(model, x, y, "none")
    kernel = ScoreKernel(factors, {name: 1e-3 for name in factors}, torch.bfloat16)
    from influence_cli.passes import stream_gradients

    tracked = find_tracked_modules(model, ["*"])
    batch = next(stream_gradients(model, tracked, [(x[:8], y[:8], torch.arange(8))], task_kind="classification", mode="loss"))
    out: dict = {}
    kernel.store_queries(out, 0, 8, batch)
    for pieces in out.values():
        for piece in pieces:
            for block in piece if isinstance(piece, list) else [piece]:
                assert block.dtype == torch.bfloat16
    scores = kernel.pairwise(out, kernel.gradients(batch))
    assert scores.dtype == torch.float32 and scores.shape == (8, 8)


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_cli_low_precision_run_from_a_config_file(tmp_path, amp):
    """factors.amp in the config file (float16 was once refused by the config's checks)."""
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    data = write_project(tmp_path, dim=16)
    data["factors"]["amp"] = amp
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = str(tmp_path / "config.yaml")
    for command in ("fit-factors", "compute-scores"):
        result = runner.invoke(app, [command, cfg])
        assert result.exit_code == 0, result.stderr


_IEEE_SCRIPT = """
import torch
from influence_cli.passes import ieee_float32
b, cuda = torch.backends, torch.device("cuda")
read = lambda: [b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision]
before = read()
with ieee_float32(cuda, "none"):
    assert read() == ["ieee"] * 3, read()
assert read() == before, (read(), before)
try:
    with ieee_float32(cuda, "none"):
        raise ValueError
except ValueError:
    pass
assert read() == before
for device, amp in (("cuda", "bfloat16"), ("cpu", "none")):
    with ieee_float32(torch.device(device), amp):
        assert read() == before
torch.set_float32_matmul_precision("high")  # a caller's own setting comes back as it was
with ieee_float32(cuda, "none"):
    assert b.cuda.matmul.fp32_precision == "ieee"
assert b.cuda.matmul.fp32_precision == "tf32"
with torch.backends.cudnn.flags(enabled=True, deterministic=True):  # leaves conv and rnn pinned to tf32 (allow_tf32=True)
    pass
pinned = read()
with ieee_float32(cuda, "none"):
    assert read() == ["ieee"] * 3, read()
assert read() == pinned
print("ok")
"""


def test_float32_passes_turn_tf32_off_on_cuda_and_restore_the_callers_settings():
    """amp none on CUDA: the model's convolutions and matmuls in IEEE float32 (PyTorch's TF32 default for
    cuDNN put percent-level differences from the CPU into the scores); the settings come back after, also
    after an error, and torch's defaults stay defaults (a later parent setting reaches them); CPU and bf16
    passes leave them alone. In a fresh process: torch's flags are process-wide."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9: the legacy allow_tf32 flags")
    result = subprocess.run([sys.executable, "-c", _IEEE_SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # torch's defaults stay defaults: a later setting of their parent reaches them as it does without the
    # block (torch 2.11 keeps cuDNN's conv and rnn at their own tf32 then; later versions let them follow)
    after = {}
    for first in ("plain", "block"):
        result = subprocess.run([sys.executable, "-c", _PARENT_SCRIPT, first], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        after[first] = result.stdout.strip()
    assert after["block"] == after["plain"]


_PARENT_SCRIPT = """
import sys
import torch
from influence_cli.passes import ieee_float32
b = torch.backends
if sys.argv[1] == "block":
    with ieee_float32(torch.device("cuda"), "none"):
        pass
b.fp32_precision = "ieee"
print([b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision])
"""
