"""compute-scores --per-token: each training position's part of a score, Σ_layers g_tᵀ V'_q a_t.

A tracked Linear layer's per-example gradient is Σ_t g_t a_tᵀ, so its score ⟨V'_q, Σ_t g_t a_tᵀ⟩
splits exactly into one term per position. Checked in float64 on a Linear over padded features
[B, T, F] and on an Embedding + Linear language model: the parts sum to the scores, each part is
g_tᵀ V'_q a_t from autograd and the factors alone, padding positions are exact zeros; then the
CLI (compute-scores, top-k, --json) and the refusals.
"""

from __future__ import annotations

import json

import pytest
import torch
from exact import batches_of, sequence_project
from safetensors.torch import load_file
from test_language_modeling import LM, LM_MODULE, PAD, TinyLM, lm_sequences
from torch import nn
from typer.testing import CliRunner

from influence_cli import compute_scores, fit_factors, load_config
from influence_cli.cli import app
from influence_cli.errors import ConfigError, ModelError, UsageError
from influence_cli.fit import PassPlan, compute_factors
from influence_cli.kernel import build_kernel, pairwise_scores
from influence_cli.passes import stream_gradients
from influence_cli.scores import plan_layout
from influence_cli.tracking import find_tracked_modules

DAMPING = 0.05


class PaddedFeatures(nn.Module):
    """Linear -> tanh -> Linear over features [B, T, F], summed over the real positions (a position of all zeros is padding)."""

    def __init__(self, features: int = 3, hidden: int = 5):
        super().__init__()
        self.mix = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        real = (x != 0).any(-1, keepdim=True).to(x.dtype)
        return (self.out(torch.tanh(self.mix(x))) * real).sum(1)


def _features(n=9, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, 3, generator=g, dtype=torch.float64)
    for k in range(n):
        x[k, 2 + k % (t - 1) :] = 0  # right padding: 2..t real positions
    return x, torch.randn(n, 2, generator=g, dtype=torch.float64)


def _setup(kind):
    torch.manual_seed(0)
    if kind == LM:
        model = TinyLM().double()
        (x, y, _), (qx, qy, _) = lm_sequences(n=10), lm_sequences(n=3, seed=1)
    else:
        model = PaddedFeatures().double()
        (x, y), (qx, qy) = _features(), _features(n=3, seed=1)
    tracked = find_tracked_modules(model, ["*"])
    factors = compute_factors(model, tracked, "ekfac", PassPlan(batches_of(x, y, 4), 3, len(x), kind, "empirical", 0, padding_value=PAD))
    return model, tracked, factors, (x, y), (qx, qy)


def _per_token(model, tracked, factors, kind, train, queries, batch_size=4, eigenbasis=False):
    """[Q, N, T] from the kernel as compute-scores runs it (queries stored whole, training batches streamed; with
    `eigenbasis`, a workload whose layers are scored in their Kronecker eigenbasis, a and g rotated as the queries are)."""
    kernel = build_kernel(model, factors, DAMPING, 0.1, None, per_token=True)
    if eigenbasis:
        kernel.plan(len(queries[0]), 1)
    stored: dict = {}
    qx, qy = queries
    for b in stream_gradients(model, tracked, batches_of(qx, qy, 2)(0), task_kind=kind, mode="measurement", padding_value=PAD):
        kernel.store_queries(stored, int(b.global_indices[0]), len(qx), b)
    x, y = train
    parts = [
        kernel.pairwise_per_token(stored, b)
        for b in stream_gradients(model, tracked, batches_of(x, y, batch_size)(0), task_kind=kind, mode="loss", padding_value=PAD)
    ]
    if eigenbasis:
        assert all(kernel.eigenbasis.values())
    return torch.cat(parts, dim=1)


def _keeper(seen, name):
    """A forward hook keeping the layer's input and output (its gradient retained) in `seen[name]`."""

    def hook(_module, inp, o):
        o.retain_grad()
        seen[name] = (inp[0], o)

    return hook


def _explicit(model, tracked, factors, kind, train, queries):
    """s(q, x, t) = Σ_layers g_tᵀ V'_q a_t from autograd and the factors alone: V'_q = U_G [(U_Gᵀ ∇W_q U_A) / (Λ* + λ)] U_Aᵀ
    with ∇W_q the query loss's [W | b] gradient; a_t the layer's input at t (1 appended), g_t the training loss's gradient
    with respect to the layer's output at t, each training sequence run alone (no padding)."""
    import torch.nn.functional as F

    def loss_of(out, y):
        if kind == LM:
            return F.cross_entropy(out[0], y[0], ignore_index=-100, reduction="sum")
        return ((out - y) ** 2).sum()  # task.py: Σ_k (f_k − y_k)², no ½

    layers = {tm.name: tm for tm in tracked}
    v = {}
    for q in range(len(queries[0])):
        grads = torch.autograd.grad(loss_of(model(queries[0][q : q + 1]), queries[1][q : q + 1]), [p for tm in tracked for p in (tm.module.weight, tm.module.bias)])
        for i, tm in enumerate(tracked):
            gw = tm.gradient_matrix(grads[2 * i], grads[2 * i + 1])
            lf = factors[tm.name]
            rotated = lf.g_eigenvectors.T @ gw @ lf.a_eigenvectors / (lf.eigenvalues + DAMPING)
            v[q, tm.name] = lf.g_eigenvectors @ rotated @ lf.a_eigenvectors.T
    x, y = train
    out = torch.zeros(len(queries[0]), len(x), x.shape[1], dtype=torch.float64)
    for n in range(len(x)):
        length = int((x[n] != 0).reshape(x.shape[1], -1).any(-1).nonzero().max()) + 1
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [layers[name].module.register_forward_hook(_keeper(seen, name)) for name in layers]
        try:
            loss_of(model(x[n : n + 1, :length]), y[n : n + 1, :length] if kind == LM else y[n : n + 1]).backward()
        finally:
            for h in hooks:
                h.remove()
        for name, (layer_in, layer_out) in seen.items():
            a = torch.cat([layer_in[0], torch.ones(length, 1, dtype=layer_in.dtype)], dim=1)  # [t, d_in + 1]
            for q in range(len(queries[0])):
                out[q, n, :length] += ((layer_out.grad[0] @ v[q, name]) * a).sum(-1)
    return out


@pytest.mark.parametrize("kind", [LM, "regression"])
def test_per_token_parts_are_the_layer_position_decomposition_and_sum_to_the_scores(kind):
    model, tracked, factors, train, queries = _setup(kind)
    parts = _per_token(model, tracked, factors, kind, train, queries)
    assert parts.shape == (3, len(train[0]), train[0].shape[1])
    scores = pairwise_scores(
        model, tracked, factors, batches_of(*queries, 2)(0), batches_of(*train, 4)(0), task_kind=kind, damping=DAMPING, padding_value=PAD
    )
    torch.testing.assert_close(parts.sum(-1), scores, rtol=1e-10, atol=1e-12 * float(scores.abs().max()))
    torch.testing.assert_close(parts, _explicit(model, tracked, factors, kind, train, queries), rtol=1e-9, atol=1e-12 * float(parts.abs().max()))
    x = train[0]
    padding = (x == PAD) if kind == LM else ~(x != 0).any(-1)
    assert padding.any() and (parts[:, padding] == 0).all()  # exact zeros, not small numbers
    assert (parts[:, ~padding] != 0).any()
    rebatched = _per_token(model, tracked, factors, kind, train, queries, batch_size=3)  # independent of the batching
    torch.testing.assert_close(rebatched, parts, rtol=1e-12, atol=1e-14 * float(parts.abs().max()))
    rotated = _per_token(model, tracked, factors, kind, train, queries, eigenbasis=True)  # the same parts in the eigenbasis
    torch.testing.assert_close(rotated, parts, rtol=1e-9, atol=1e-12 * float(parts.abs().max()))
    assert (rotated[:, padding] == 0).all()


@pytest.mark.parametrize(("d_in", "d_out"), [(3, 40), (40, 3)])
def test_per_position_parts_hold_the_narrower_intermediate(monkeypatch, d_in, d_out):
    """V'_q is contracted with the wider side's vectors first: [Q, min(d_in, d_out), rows] at a time, within
    GRADIENT_ELEMENTS (a language model's head, d_out its vocabulary, would otherwise hold [Q, vocabulary, rows])."""
    from influence_cli import kernel

    g = torch.Generator().manual_seed(0)
    q, a, grad = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, d_out * d_in), (3, 4, d_in), (3, 4, d_out)))
    monkeypatch.setattr(kernel, "GRADIENT_ELEMENTS", 2 * 3 * 4)
    sizes: list[int] = []
    matmul = torch.matmul

    def counted(x, y):
        out = matmul(x, y)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(kernel.torch, "matmul", counted)
    parts = kernel._per_position_scores(q, a, grad)
    monkeypatch.undo()
    expected = torch.einsum("bto,qoi,bti->qbt", grad, q.view(2, d_out, d_in), a)
    torch.testing.assert_close(parts, expected, rtol=1e-12, atol=1e-12)
    assert sizes and max(sizes) <= 2 * 3 * 4


def test_the_memory_plan_counts_the_per_token_block():
    plain = plan_layout(4, 1000, 10, batch_size=10, max_memory_mb=0.02)
    per_token = plan_layout(4, 1000, 10, batch_size=10, max_memory_mb=0.02, score_planes=1 + 16)
    assert not plain.sharded and per_token.sharded
    assert max(s.stop - s.start for s in per_token.shards) * 4 * 4 * 17 <= 0.02 * 2**20


@pytest.fixture
def lm_project(tmp_path, monkeypatch):
    tokens, labels, _ = lm_sequences(n=24)
    return sequence_project(tmp_path, monkeypatch, "tinylm_pertok", LM_MODULE, tokens, labels, "lm.safetensors", task={"kind": LM})


def _invoke(runner, *args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.stderr
    return result


def test_cli_stores_per_token_scores_and_top_k_shows_the_leading_tokens(lm_project, tmp_path):
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    _invoke(runner, "fit-factors", lm_project)
    _invoke(runner, "compute-scores", lm_project)
    plain = load_file(tmp_path / "out" / "scores.safetensors")
    _invoke(runner, "compute-scores", lm_project, "--per-token", "--overwrite")
    stored = load_file(tmp_path / "out" / "scores.safetensors")
    tokens, _, _ = lm_sequences(n=24)
    parts = stored["scores_per_token"]
    assert parts.shape == (4, 20, tokens.shape[1])
    assert (parts[:, tokens[:20] == PAD] == 0).all()
    torch.testing.assert_close(parts.double().sum(-1), plain["scores"].double(), rtol=1e-4, atol=1e-5 * float(plain["scores"].abs().max()))
    torch.testing.assert_close(stored["scores"], parts.sum(-1))
    table = _invoke(runner, "top-k", lm_project, "--k", "2", "--query", "0").stdout
    assert "tokens" in table and "@" in table
    top = json.loads(_invoke(runner, "top-k", lm_project, "--k", "2", "--json").stdout)
    first = top["queries"][0]["proponents"][0]
    assert len(first["per_token"]) == tokens.shape[1]
    assert first["per_token"] == pytest.approx(parts[0, first["train_position"]].tolist())
    assert sum(first["per_token"]) == pytest.approx(first["score"], rel=1e-4)
    assert f"{int(tokens[first['train_position'], first['top_tokens'][0]['position']])}" == str(first["top_tokens"][0]["token"])
    # sharded by a small budget: the same parts, each shard its train range
    _invoke(runner, "compute-scores", lm_project, "--per-token", "--overwrite", "--set", "scores.max_memory_mb=0.001")
    index = json.loads((tmp_path / "out" / "scores.index.json").read_text())
    assert len(index["shards"]) > 1
    shards = torch.cat([load_file(tmp_path / "out" / s["file"])["scores_per_token"] for s in index["shards"]], dim=1)
    torch.testing.assert_close(shards, parts)
    info = json.loads(_invoke(runner, "info", str(tmp_path / "out" / "scores.index.json"), "--json").stdout)["tensors"]
    assert info[f"{index['shards'][0]['file']}:scores_per_token"] == [4, index["shards"][0]["train_stop"], tokens.shape[1]]
    assert "each with its scores_per_token" in _invoke(runner, "info", str(tmp_path / "out" / "scores.index.json")).stdout
    json_top = json.loads(_invoke(runner, "top-k", lm_project, "--k", "2", "--json").stdout)
    assert json_top["queries"][0]["proponents"][0]["per_token"] == pytest.approx(first["per_token"])


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--relative"], "scores.relative (--relative)"),
        (["--by-layer"], "scores.by_layer (--by-layer)"),
        (["--self"], "not with --self"),
    ],
)
def test_combinations_without_per_token_parts_are_refused(lm_project, flags, words):
    runner = CliRunner(env={"INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    _invoke(runner, "fit-factors", lm_project)
    result = runner.invoke(app, ["compute-scores", lm_project, "--per-token", *flags])
    assert result.exit_code == 2 and words in result.stderr


def test_config_combinations_are_refused_in_one_line(lm_project):
    with pytest.raises(ConfigError, match=r"scores.per_token: not available with scores.relative or scores.by_layer"):
        load_config(lm_project, ["scores.per_token=true", "scores.relative=true", "scores.by_layer=true"])


def test_layers_off_the_inputs_positions_and_inputs_without_positions_are_refused(tmp_path, monkeypatch):
    pooled = """
import torch
from torch import nn


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def make():
    return Pooled()
"""
    tokens, _, _ = lm_sequences(n=24)
    path = sequence_project(tmp_path, monkeypatch, "pooled_pertok", pooled, tokens, tokens[:, 0] % 3, "d.safetensors", task={"kind": "classification"})
    cfg = load_config(path, ["data.padding_value=null"])
    fit_factors(cfg)
    compute_scores(cfg)
    old = (tmp_path / "out" / "scores.safetensors").read_bytes()
    with pytest.raises(ModelError, match=r"layer 'head' sees 1 position per example, data.train's inputs have 6"):
        compute_scores(cfg, per_token=True, overwrite=True)
    assert (tmp_path / "out" / "scores.safetensors").read_bytes() == old  # refused at the first batch, before --overwrite removes them
    flat = tmp_path / "flat"
    flat.mkdir()
    mlp = "import torch\nfrom torch import nn\n\n\ndef make():\n    return nn.Sequential(nn.Linear(6, 3))\n"
    path = sequence_project(flat, monkeypatch, "flat_pertok", mlp, torch.randn(24, 6), torch.randint(0, 3, (24,)), "d.safetensors")
    cfg = load_config(path, ["data.padding_value=null"])
    fit_factors(cfg)
    with pytest.raises(ConfigError, match=r"inputs of shape \[6\] \(float32\) have no positions"):
        compute_scores(cfg, per_token=True)
    with pytest.raises(UsageError, match="not with --self"):
        compute_scores(cfg, per_token=True, self_influence=True)
    # scores.per_token in the config is a pairwise setting: --self leaves it aside, as it does scores.relative
    report = compute_scores(load_config(path, ["data.padding_value=null", "scores.per_token=true"]), self_influence=True)
    assert report.kind == "self" and report.per_token is None


def test_the_size_of_large_per_token_files_is_said_before_the_pass(lm_project, monkeypatch, caplog):
    from influence_cli import scores

    cfg = load_config(lm_project)
    fit_factors(cfg)
    monkeypatch.setattr(scores, "PER_TOKEN_NOTE_BYTES", 4 * 20 * 6 * 4)  # 4 queries x 20 examples x 6 positions, float32
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_scores(cfg, per_token=True)
    said = [r.getMessage() for r in caplog.records if "per-token parts" in r.getMessage()]
    assert said == ["scores.per_token: the scores files will hold 1.92e-06 GB of per-token parts (4 queries × 20 training examples × 6 "
                    "positions, float32); fewer queries, a shorter data.train.range or scores.dtype: bfloat16 make them smaller"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_scores(load_config(lm_project, ["scores.dtype=bfloat16"]), per_token=True, overwrite=True)
    assert not [r for r in caplog.records if "per-token parts" in r.getMessage()]  # half the bytes: below


def test_per_token_parts_of_summed_queries_are_the_per_query_parts_summed(lm_project, tmp_path):
    """--per-token with --sum-queries: the summed row's parts [1, N, T] are Σ_q of each query's parts (linearity), summing over T
    to the summed scores; top-k shows the row's leading tokens."""
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    _invoke(runner, "fit-factors", lm_project)
    _invoke(runner, "compute-scores", lm_project, "--per-token")
    per_query = load_file(tmp_path / "out" / "scores.safetensors")["scores_per_token"].double()
    _invoke(runner, "compute-scores", lm_project, "--sum-queries", "--overwrite")
    summed = load_file(tmp_path / "out" / "scores.safetensors")["scores"].double()
    report = json.loads(_invoke(runner, "compute-scores", lm_project, "--per-token", "--sum-queries", "--overwrite", "--json").stdout)
    assert report["n_query"] == 1 and report["queries_summed"] == 4 and report["per_token"] == per_query.shape[-1]
    stored = load_file(tmp_path / "out" / "scores.safetensors")
    parts = stored["scores_per_token"]
    assert parts.shape == (1, *per_query.shape[1:])
    torch.testing.assert_close(parts[0].double(), per_query.sum(0), rtol=1e-4, atol=1e-5 * float(per_query.abs().max()))
    torch.testing.assert_close(stored["scores"], parts.sum(-1))
    torch.testing.assert_close(parts.double().sum(-1), summed, rtol=1e-4, atol=1e-5 * float(summed.abs().max()))
    top = json.loads(_invoke(runner, "top-k", lm_project, "--k", "2", "--json").stdout)
    [row] = top["queries"]
    first = row["proponents"][0]
    assert row["query_index"] is None and first["per_token"] == pytest.approx(parts[0, first["train_position"]].tolist())
    assert first["top_tokens"] and "tokens" in _invoke(runner, "top-k", lm_project, "--k", "2").stdout


def test_an_interrupted_summed_per_token_run_resumes_to_the_same_parts(lm_project, tmp_path):
    from stopping import StopAt

    cfg = load_config(lm_project, ["factors.checkpoint_every=1", "data.batch_size=4", "scores.query_chunk=2"])  # two chunks summed
    fit_factors(cfg)
    compute_scores(cfg, per_token=True, sum_queries=True)
    whole = load_file(tmp_path / "out" / "scores.safetensors")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(cfg, per_token=True, sum_queries=True, overwrite=True, progress=StopAt("scores", 12))
    report = compute_scores(cfg, per_token=True, sum_queries=True, resume=True)
    assert report.resumed_from is not None and report.per_token == 6 and report.queries_summed == 4
    resumed = load_file(tmp_path / "out" / "scores.safetensors")
    assert torch.equal(resumed["scores_per_token"], whole["scores_per_token"]) and torch.equal(resumed["scores"], whole["scores"])


def test_the_size_of_summed_per_token_files_counts_their_one_row(lm_project, monkeypatch, caplog):
    from influence_cli import scores

    cfg = load_config(lm_project)
    fit_factors(cfg)
    monkeypatch.setattr(scores, "PER_TOKEN_NOTE_BYTES", 1 * 20 * 6 * 4)  # 1 summed row x 20 examples x 6 positions, float32
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_scores(cfg, per_token=True, sum_queries=True)
    said = [r.getMessage() for r in caplog.records if "per-token parts" in r.getMessage()]
    assert said == ["scores.per_token: the scores files will hold 4.8e-07 GB of per-token parts (the 4 queries summed into 1 row × 20 "
                    "training examples × 6 positions, float32); a shorter data.train.range or scores.dtype: bfloat16 make them smaller"]


def test_an_interrupted_per_token_run_resumes_to_the_same_parts(lm_project, tmp_path):
    from stopping import StopAt

    cfg = load_config(lm_project, ["factors.checkpoint_every=1", "data.batch_size=4"])
    fit_factors(cfg)
    compute_scores(cfg, per_token=True)
    whole = load_file(tmp_path / "out" / "scores.safetensors")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(cfg, per_token=True, overwrite=True, progress=StopAt("scores", 12))
    assert not (tmp_path / "out" / "scores.safetensors").exists()
    report = compute_scores(cfg, per_token=True, resume=True)
    assert report.resumed_from is not None and report.per_token == 6
    resumed = load_file(tmp_path / "out" / "scores.safetensors")
    assert torch.equal(resumed["scores_per_token"], whole["scores_per_token"]) and torch.equal(resumed["scores"], whole["scores"])


def test_convolutions_are_refused_before_any_factors_are_read(tmp_path, monkeypatch):
    conv = "from torch import nn\n\n\ndef make():\n    return nn.Sequential(nn.Conv1d(6, 3, 2), nn.Flatten(), nn.Linear(3 * 3, 2))\n"
    path = sequence_project(tmp_path, monkeypatch, "conv_pertok", conv, torch.randn(24, 6, 4), torch.randint(0, 2, (24,)), "d.safetensors")
    cfg = load_config(path, ["data.padding_value=null"])
    with pytest.raises(ConfigError, match=r"scores.per_token: layer '0' is a Conv1d, whose positions are patches"):
        compute_scores(cfg, per_token=True)


@pytest.mark.distributed
def test_two_ranks_store_the_same_per_token_parts_as_one_process(lm_project, tmp_path):
    """torchrun with 2 CPU ranks (gloo): each rank's shard holds its training range's parts, the same as one process's."""
    import subprocess
    import sys

    from launch import subprocess_env

    runner = CliRunner(env={"INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    _invoke(runner, "fit-factors", lm_project)
    _invoke(runner, "compute-scores", lm_project, "--per-token")
    whole = load_file(tmp_path / "out" / "scores.safetensors")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "influence_cli"]
    run = subprocess.run([*cmd, "compute-scores", lm_project, "--per-token", "--overwrite"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    index = json.loads((tmp_path / "out" / "scores.index.json").read_text())
    assert len(index["shards"]) == 2 and not (tmp_path / "out" / "scores.safetensors").exists()
    shards = [load_file(tmp_path / "out" / s["file"]) for s in index["shards"]]
    parts = torch.cat([s["scores_per_token"] for s in shards], dim=1)
    torch.testing.assert_close(parts, whole["scores_per_token"], rtol=1e-5, atol=1e-6 * float(parts.abs().max()))
    torch.testing.assert_close(torch.cat([s["scores"] for s in shards], dim=1), whole["scores"], rtol=1e-5, atol=1e-6 * float(parts.abs().max()))


def test_a_changed_per_token_setting_is_named_by_its_key_and_flag():
    from influence_cli.resume import changed_settings

    assert changed_settings({"per_token": 6}, {}) == "scores.per_token (--per-token) 6 -> (unset)"
