"""Per-layer parts of the scores (scores.by_layer, compute-scores --by-layer).

Influence under the block-diagonal curvature is a sum over layers, I(z, x) = Σ_l ∇W_l L(z)ᵀ (F_l + λ_l)⁻¹
∇W_l L(x); each part is checked in float64 against that layer's explicit term (test_scores' dense
references), and the parts against the total, then the pipeline (files, shards, resume, --self) and
the CLI on the bundled digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from exact import ConvHead, SeqModel, batches_of, fit, tiny_mlp
from stopping import interrupt_after
from test_deflation import GatedUnitMLP
from test_scores import (  # noqa: F401 (data and project are fixtures)
    N_QUERY,
    N_TRAIN,
    all_scores,
    data,
    explicit_grads,
    explicit_self_and_norms,
    fitted,
    in_memory_reference,
    make_cfg,
    preconditioner,
    project,
    run_pairwise,
)
from typer.testing import CliRunner

import influence_cli.kernel as kernel_mod
import influence_cli.scores as scores_mod
from influence_cli import storage
from influence_cli.cli import app
from influence_cli.cli.render import layer_shares
from influence_cli.context import prepare
from influence_cli.data import make_loader
from influence_cli.errors import OutputError, UsageError
from influence_cli.fit import load_factors
from influence_cli.kernel import ensemble_pairwise_scores, pairwise_scores, self_influence_scores
from influence_cli.scores import compute_scores, plan_layout
from influence_cli.topk import load_scores_meta, load_self_influence, pair_parts, self_top_k, top_k

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
DEFAULT_TENSORS = {"query_indices", "query_labels", "query_predictions", "scores", "train_indices", "train_labels"}


def explicit_parts(layers, gq, gt, damping) -> torch.Tensor:
    """∇W_l L(z)ᵀ (P_l + λ_l)⁻¹ ∇W_l L(x) of each layer: [L, Q, N], in the order of `layers`."""
    return torch.stack([gq[n] @ preconditioner(lf, damping, gq[n].shape[1]) @ gt[n].T for n, lf in layers.items()])


def explicit_self_parts(layers, gt, damping) -> torch.Tensor:
    """∇W_l L(x)ᵀ (P_l + λ_l)⁻¹ ∇W_l L(x) of each layer: [L, N]."""
    return torch.stack([((gt[n] @ preconditioner(lf, damping, gt[n].shape[1])) * gt[n]).sum(1) for n, lf in layers.items()])


# ----------------------------------------------------------------------------- the math (float64)


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "relative"])
@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("form", ["contracted", "blocks"])  # fewer queries than d_in (V'a first), or the per-example gradient blocks
def test_each_part_is_its_layers_explicit_influence_and_the_parts_sum_to_the_score(data, monkeypatch, strategy, relative, form):  # noqa: F811
    x, y, xq, yq = data
    if form == "blocks":
        monkeypatch.setattr(kernel_mod, "contracts", lambda n_query, d_in: False)
    model = tiny_mlp()
    tracked, layers = fitted(model, data, strategy)
    gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
    ref = explicit_parts(layers, gq, gt, "auto")
    if relative:  # every part divided by the example's whole norm ‖(F+λ)⁻¹∇L(x)‖, so that they sum to the relative score
        ref = ref / explicit_self_and_norms(layers, gt, "auto")[1]
    parts = run_pairwise(model, tracked, layers, data, relative=relative, by_layer=True)
    assert parts.dtype == F64 and parts.shape == (2, 4, 13) and list(layers) == ["0", "2"]
    torch.testing.assert_close(parts, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(parts.sum(0), run_pairwise(model, tracked, layers, data, relative=relative), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(parts[0], parts[1])


def test_parts_with_one_damping_for_the_model(data):  # noqa: F811
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, "ekfac")
    lam = 0.1 * sum(float(lf.eigenvalues.sum()) for lf in layers.values()) / sum(lf.eigenvalues.numel() for lf in layers.values())
    parts = run_pairwise(model, tracked, layers, data, damping_scope="model", by_layer=True)
    ref = explicit_parts(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), lam)
    torch.testing.assert_close(parts, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(parts.sum(0), run_pairwise(model, tracked, layers, data, damping_scope="model"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("contracted", [True, False], ids=["contracted", "formed"])
@pytest.mark.parametrize("make,shape", [(SeqModel, (6, 4)), (ConvHead, (2, 5, 5))], ids=["sequence", "conv"])
def test_parts_of_layers_with_positions(monkeypatch, make, shape, contracted):
    monkeypatch.setattr(kernel_mod, "contracts_positions", lambda n_query, positions: contracted)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, *shape, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    xq, yq = torch.randn(3, *shape, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g)
    model = make().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=3)
    gt = explicit_grads(model, tracked, x, y)
    ref = explicit_parts(layers, explicit_grads(model, tracked, xq, yq), gt, "auto") / explicit_self_and_norms(layers, gt, "auto")[1]
    parts = run_pairwise(model, tracked, layers, (x, y, xq, yq), bs=3, relative=True, by_layer=True)
    torch.testing.assert_close(parts, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(parts.sum(0), run_pairwise(model, tracked, layers, (x, y, xq, yq), bs=3, relative=True), rtol=1e-12, atol=1e-12)


def test_a_skipped_deflated_piece_adds_nothing_to_its_layer():
    """A layer cut into pieces (its support, and the rows and columns deflated at the fit): on the fit's
    examples the deflated pieces are 0 and skipped; on others they are scored, each into its own layer."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 5, generator=g, dtype=F64)
    x[:, [1, 3]] = 0.0
    y = torch.randint(0, 3, (17,), generator=g)
    model = GatedUnitMLP().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical")
    other = torch.randn(11, 5, generator=g, dtype=F64).abs(), torch.randint(0, 3, (11,), generator=g)
    xq, yq = torch.randn(3, 5, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g)
    for train in ((x, y), other):
        batches = [(train[0][:6], train[1][:6], torch.arange(6)), (train[0][6:], train[1][6:], torch.arange(6, len(train[0])))]
        parts = pairwise_scores(model, tracked, layers, [(xq, yq, torch.arange(3))], batches, by_layer=True)
        ref = explicit_parts(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, *train), "auto")
        torch.testing.assert_close(parts, ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(parts.sum(0), pairwise_scores(model, tracked, layers, [(xq, yq, torch.arange(3))], batches), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_self_influence_parts(data, strategy):  # noqa: F811
    x, y, *_ = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, strategy)
    parts = self_influence_scores(model, tracked, layers, batches_of(x, y, 4)(0), by_layer=True)
    assert parts.dtype == F64 and parts.shape == (2, 13)
    torch.testing.assert_close(parts, explicit_self_parts(layers, explicit_grads(model, tracked, x, y), "auto"), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(parts.sum(0), self_influence_scores(model, tracked, layers, batches_of(x, y, 4)(0)), rtol=1e-12, atol=1e-12)
    pair = pairwise_scores(model, tracked, layers, batches_of(x, y, 4)(0), batches_of(x, y, 5)(0), by_layer=True)
    torch.testing.assert_close(torch.diagonal(pair, dim1=1, dim2=2), parts, rtol=1e-10, atol=1e-12)
    assert bool((parts >= 0).all())


def test_ensemble_parts_are_the_mean_of_the_members_parts(data):  # noqa: F811
    x, y, xq, yq = data
    members = []
    refs = []
    for seed in (0, 1, 2):
        model = tiny_mlp(seed=seed)
        tracked, layers = fitted(model, data, "ekfac")
        members.append((model, tracked, layers))
        gt = explicit_grads(model, tracked, x, y)
        refs.append(explicit_parts(layers, explicit_grads(model, tracked, xq, yq), gt, "auto") / explicit_self_and_norms(layers, gt, "auto")[1])
    parts = ensemble_pairwise_scores(members, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), relative=True, by_layer=True)
    torch.testing.assert_close(parts, torch.stack(refs).mean(0), rtol=1e-9, atol=1e-10)
    total = ensemble_pairwise_scores(members, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), relative=True)
    torch.testing.assert_close(parts.sum(0), total, rtol=1e-12, atol=1e-12)


def test_bfloat16_parts_sum_to_the_bfloat16_scores():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    xq, yq = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    model = tiny_mlp().float()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=8)
    layers = {name: lf.to(torch.device("cpu"), torch.float32) for name, lf in layers.items()}

    def run(**kw):
        return pairwise_scores(model, tracked, layers, batches_of(xq, yq, 4)(0), batches_of(x, y, 16)(0), **kw)

    low, ref = run(amp="bfloat16", by_layer=True), run(by_layer=True)
    assert low.dtype == torch.float32  # summed in float32
    peak = float(ref.abs().max())
    torch.testing.assert_close(low.sum(0), run(amp="bfloat16"), rtol=1e-5, atol=1e-6 * peak)
    torch.testing.assert_close(low, ref, rtol=0, atol=0.05 * peak)


# ----------------------------------------------------------------------------- the pipeline (config, float32)


def in_memory_parts(cfg, relative=False) -> torch.Tensor:
    ctx = prepare(cfg)
    factors = load_factors(cfg.output_path / storage.FACTORS_FILE)
    train, query = ctx.dataset(cfg.data.train, "data.train"), ctx.dataset(cfg.data.query, "data.query")
    return pairwise_scores(ctx.model, ctx.tracked, factors.layers, make_loader(query, 8), make_loader(train, 8), relative=relative, by_layer=True)


def all_parts(out: Path) -> torch.Tensor:
    """Every shard's scores_by_layer, joined along the training examples: [L, Q, N]."""
    meta = load_scores_meta(out)
    return torch.cat([storage.load_tensors(f.path)[0][storage.SCORES_BY_LAYER] for f in meta.files], dim=2)


def close_sum(parts: torch.Tensor, total: torch.Tensor) -> None:
    """float32 parts sum to the float32 total up to rounding relative to the largest score."""
    torch.testing.assert_close(parts.sum(0), total, rtol=1e-5, atol=1e-6 * float(total.abs().max()))


def test_a_default_run_stores_what_it_always_stored(project):  # noqa: F811
    report = compute_scores(make_cfg(project, "bl-default"))
    tensors, meta = storage.load_tensors(report.paths[0], storage.SCORES_FORMAT)
    assert set(tensors) == DEFAULT_TENSORS
    assert storage.BY_LAYER not in meta and storage.BY_LAYER not in meta["result"] and report.by_layer is None
    report = compute_scores(make_cfg(project, "bl-default"), self_influence=True)
    tensors, meta = storage.load_tensors(report.paths[0], storage.SELF_FORMAT)
    assert set(tensors) == {"self_influence", "train_indices", "train_labels", "train_predictions", storage.SELF_LOSSES} and storage.BY_LAYER not in meta


@pytest.mark.parametrize("relative", [False, True], ids=["plain", "relative"])
def test_compute_scores_stores_each_layers_part(project, relative):  # noqa: F811
    cfg = make_cfg(project, f"bl-{relative}", f"scores.relative={str(relative).lower()}")
    report = compute_scores(cfg, by_layer=True)
    assert report.by_layer == ["fc1", "head"]
    tensors, meta = storage.load_tensors(report.paths[0], storage.SCORES_FORMAT)
    assert set(tensors) == DEFAULT_TENSORS | {storage.SCORES_BY_LAYER} | ({"train_norms"} if relative else set())
    parts = tensors[storage.SCORES_BY_LAYER]
    assert parts.shape == (2, N_QUERY, N_TRAIN) and parts.dtype == torch.float32 and meta[storage.BY_LAYER] == ["fc1", "head"]
    close_sum(parts, tensors["scores"])
    torch.testing.assert_close(parts, in_memory_parts(cfg, relative).float(), rtol=1e-5, atol=1e-6 * float(parts.abs().max()))
    if relative:  # times the norms: the parts of the plain scores
        close_sum(parts * tensors["train_norms"], in_memory_reference(cfg).float())


def test_the_budget_counts_the_parts_and_every_shard_holds_its_range(project):  # noqa: F811
    assert plan_layout(7, 45, 10, batch_size=8, max_memory_mb=7 * 16 * 4 / 2**20).shards[0].stop == 16
    assert plan_layout(7, 45, 10, batch_size=8, max_memory_mb=7 * 16 * 4 / 2**20, score_planes=3).shards[0].stop == 8  # 16/3 columns, whole batches
    whole = make_cfg(project, "bl-whole", "scores.query_chunk=7")
    compute_scores(whole, by_layer=True)
    budget = 7 * 48 * 4 / 2**20  # 48 columns of scores alone: one file without the parts, 16 columns a shard with them
    sharded = make_cfg(project, "bl-sharded", f"scores.max_memory_mb={budget}", "scores.query_chunk=3")
    report = compute_scores(sharded, by_layer=True)
    assert report.sharded and report.num_shards == 3 and report.query_chunks == 3
    index = json.loads((sharded.output_path / storage.SCORES_INDEX).read_text())
    assert index["metadata"][storage.BY_LAYER] == ["fc1", "head"]
    for shard in load_scores_meta(sharded.output_path).files:
        tensors = storage.load_tensors(shard.path)[0]
        assert tensors[storage.SCORES_BY_LAYER].shape == (2, N_QUERY, shard.train_stop - shard.train_start)
        close_sum(tensors[storage.SCORES_BY_LAYER], tensors["scores"])
    torch.testing.assert_close(all_parts(sharded.output_path), all_parts(whole.output_path))
    assert not compute_scores(make_cfg(project, "bl-unsharded", f"scores.max_memory_mb={budget}")).sharded  # the budget holds the scores alone
    ref, got = top_k(whole.output_path, None, 4), top_k(sharded.output_path, None, 4, max_elements=20)
    assert [[e.train_index for e in r.proponents + r.opponents] for r in got] == [[e.train_index for e in r.proponents + r.opponents] for r in ref]
    for r in got:
        for e in r.proponents + r.opponents:
            assert list(e.by_layer) == ["fc1", "head"]
            assert sum(e.by_layer.values()) == pytest.approx(e.score, rel=1e-4, abs=1e-6)


def test_top_k_plain_undoes_the_relative_division_of_the_parts(project):  # noqa: F811
    cfg = make_cfg(project, "bl-rel-top", "scores.relative=true")
    compute_scores(cfg, by_layer=True)
    for r in top_k(cfg.output_path, [0, 3], 3, plain=True):
        for e in r.proponents + r.opponents:
            assert sum(e.by_layer.values()) == pytest.approx(e.score, rel=1e-4)
    plain = make_cfg(project, "bl-plain-top")
    compute_scores(plain)
    with pytest.raises(UsageError, match="hold no per-layer parts"):
        pair_parts(load_scores_meta(plain.output_path), [(0, 0)])
    assert all(e.by_layer is None for r in top_k(plain.output_path, [0], 2) for e in r.proponents)


@pytest.mark.parametrize(
    "name,overrides,cut",
    [
        ("single", [], 3),
        ("sharded-chunked", [f"scores.max_memory_mb={7 * 48 * 4 / 2**20}", "scores.query_chunk=4"], 9),
        # 4 chunks of 2 queries, all held (keep_queries) for 3 shards: killed in shard 1, chunk 2, whose queries were kept
        ("kept", [f"scores.max_memory_mb={2000 / 2**20}", "scores.query_chunk=2"], 11),
        ("relative", ["scores.relative=true"], 4),
    ],
)
def test_resume_continues_the_parts_and_refuses_a_changed_by_layer(project, monkeypatch, name, overrides, cut):  # noqa: F811
    ref_cfg = make_cfg(project, f"bl-resume-ref-{name}", *overrides)
    compute_scores(ref_cfg, by_layer=True)
    cfg = make_cfg(project, f"bl-resume-{name}", *overrides)
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise_by_layer", cut)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg, by_layer=True)
    with pytest.raises(OutputError, match=r"progress of a run with other settings \(scores.by_layer \(--by-layer\)") as info:
        compute_scores(cfg, resume=True)  # by_layer off: other settings
    assert "by_layer=True" in str(info.value)  # the Python argument the flag stands for
    report = compute_scores(cfg, resume=True, by_layer=True)
    assert report.resumed_from is not None
    assert torch.equal(all_scores(cfg.output_path), all_scores(ref_cfg.output_path))
    assert torch.equal(all_parts(cfg.output_path), all_parts(ref_cfg.output_path))
    assert not list(cfg.output_path.glob("scores.partial*"))
    with pytest.raises(OutputError, match=r"holds scores of a finished run with other settings \(scores.by_layer"):
        compute_scores(cfg, resume=True, by_layer=False)
    assert compute_scores(cfg, resume=True, by_layer=True).resumed_from == "already complete"


def test_progress_without_parts_is_not_resumed_with_them(project, monkeypatch):  # noqa: F811
    cfg = make_cfg(project, "bl-resume-off")
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", 3)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg)
    with pytest.raises(OutputError, match=r"other settings \(scores.by_layer"):
        compute_scores(cfg, resume=True, by_layer=True)
    compute_scores(cfg, resume=True)


def test_parts_too_large_for_float16_are_named_as_the_parts():
    """Layers that pull both ways: their parts can pass float16's 65504 where the score they sum to does not."""
    parts = torch.tensor([[[1e5, 2.0]], [[-1e5 + 1.0, 1.0]], [[0.5, 0.5]]])
    scores_mod._check_storable(parts.sum(0), "float16")
    with pytest.raises(scores_mod.NumericalError, match=r"float16 cannot hold per-layer scores \(scores.by_layer\) up to 1e\+05 \(layer 'fc1', its max"):
        scores_mod._check_storable(parts, "float16", "per-layer scores (scores.by_layer)", layers=["fc1", "fc2", "head"])


def test_self_influence_parts_are_stored_and_resumed(project, monkeypatch):  # noqa: F811
    ref_cfg = make_cfg(project, "bl-self-ref")
    report = compute_scores(ref_cfg, self_influence=True, by_layer=True)
    assert report.by_layer == ["fc1", "head"]
    ref, meta = storage.load_tensors(report.paths[0], storage.SELF_FORMAT)
    parts = ref[storage.SELF_BY_LAYER]
    assert parts.shape == (2, N_TRAIN) and meta[storage.BY_LAYER] == ["fc1", "head"] and bool((parts >= 0).all())
    torch.testing.assert_close(parts.sum(0), ref["self_influence"], rtol=1e-6, atol=0)
    ctx = prepare(ref_cfg)
    factors = load_factors(ref_cfg.output_path / storage.FACTORS_FILE)
    expected = self_influence_scores(ctx.model, ctx.tracked, factors.layers, make_loader(ctx.dataset(ref_cfg.data.train, "data.train"), 8), by_layer=True)
    torch.testing.assert_close(parts, expected)
    ranked = self_top_k(load_self_influence(ref_cfg.output_path), 3)
    assert all(sum(e.by_layer.values()) == pytest.approx(e.score, rel=1e-5) for e in ranked)
    cfg = make_cfg(project, "bl-self-resume")
    with monkeypatch.context() as m:
        interrupt_after(m, "self_influence_by_layer", 4)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg, self_influence=True, by_layer=True)
    with pytest.raises(OutputError, match=r"other settings \(scores.by_layer"):
        compute_scores(cfg, self_influence=True, resume=True)
    assert compute_scores(cfg, self_influence=True, resume=True, by_layer=True).resumed_from == "batch 4"
    got = storage.load_tensors(cfg.output_path / storage.SELF_INFLUENCE_FILE)[0]
    assert torch.equal(got[storage.SELF_BY_LAYER], parts) and torch.equal(got["self_influence"], ref["self_influence"])


# ----------------------------------------------------------------------------- the CLI (the bundled digits)


def test_layer_shares_reads_well_with_mixed_signs():
    assert layer_shares({"fc1": 0.24, "fc2": 0.71, "head": 0.05}, 1.0) == "fc2 71% · fc1 24% · head 5%"
    assert layer_shares({"fc1": -2.0, "fc2": 3.0}, 1.0) == "fc2 60% · fc1 -40%"  # fc1 pulls against the score
    assert layer_shares({"fc1": -2.0, "fc2": 1.0}, -1.0) == "fc1 67% · fc2 -33%"  # an opponent: fc2 is the one against it
    assert layer_shares({"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.25}, 2.0) == "a 50% · b 25% · c 12%"  # three at most
    assert layer_shares({"a": 1.0, "b": 1e-6}, 1.0) == "a 100%"  # under 0.5%: left out
    assert layer_shares({"": 2.0}, 2.0) == "(model) 100%" and layer_shares({"a": 0.0, "b": 0.0}, 0.0) == "-"


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[str]:
    """The digits sample's config on its first 200 training examples, fitted in a folder of its own."""
    out = tmp_path_factory.mktemp("digits")
    sets = ["--set", f"output_dir={out}", "--set", "data.train.range=[0, 200]"]
    result = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None}).invoke(app, ["fit-factors", str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"), *sets])
    assert result.exit_code == 0, result.stderr
    return [str(Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"), *sets]


def test_cli_by_layer_end_to_end(digits):
    runner = CliRunner(env={"COLUMNS": "120", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    out = Path(digits[2].split("=", 1)[1])
    result = runner.invoke(app, ["compute-scores", *digits, "--by-layer", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["by_layer"] == ["fc1", "fc2", "head"]
    result = runner.invoke(app, ["top-k", *digits, "--query", "0:2", "--k", "3", "--json"])
    assert result.exit_code == 0, result.stderr
    for query in json.loads(result.stdout)["queries"]:
        for e in query["proponents"] + query["opponents"]:
            assert list(e["by_layer"]) == ["fc1", "fc2", "head"]
            assert sum(e["by_layer"].values()) == pytest.approx(e["score"], rel=1e-4)
    result = runner.invoke(app, ["top-k", *digits, "--query", "0", "--k", "3"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "layers" in lines[2] and all(len(line) <= 120 for line in lines)  # the rich table fits 120 columns
    assert sum("%" in line for line in lines) == 6  # every proponent and opponent row
    shown = top_k(out, [0], 3)[0].proponents[0]
    assert layer_shares(shown.by_layer, shown.score) in result.stdout
    result = runner.invoke(app, ["info", str(out / storage.SCORES_FILE), "--json"])
    assert json.loads(result.stdout)["tensors"][storage.SCORES_BY_LAYER] == [3, 20, 200]

    small = ["--set", "scores.max_memory_mb=0.03", "--set", "data.batch_size=32"]  # 98 columns of 4 planes: shards of 96
    result = runner.invoke(app, ["compute-scores", *digits, *small, "--by-layer", "--overwrite", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["num_shards"] == 3
    tensors = json.loads(runner.invoke(app, ["info", str(out / storage.SCORES_INDEX), "--json"]).stdout)["tensors"]
    assert tensors["scores.shard-00000.safetensors"] == [20, 96] and tensors[f"scores.shard-00000.safetensors:{storage.SCORES_BY_LAYER}"] == [3, 20, 96]

    result = runner.invoke(app, ["compute-scores", *digits, "--self", "--set", "scores.by_layer=true", "--json"])
    assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["top-k", *digits, "--self", "--k", "3", "--json"])
    rows = json.loads(result.stdout)["self_influence"]
    assert all(sum(r["by_layer"].values()) == pytest.approx(r["score"], rel=1e-5) for r in rows)
    result = runner.invoke(app, ["top-k", *digits, "--self", "--k", "3"])
    assert "layers" in result.stdout and all(len(line) <= 120 for line in result.stdout.splitlines())

    result = runner.invoke(app, ["compute-scores", *digits, "--overwrite", "--json"])  # by_layer off again: the default output
    assert "by_layer" not in json.loads(result.stdout)
    result = runner.invoke(app, ["top-k", *digits, "--query", "0", "--k", "3", "--json"])
    assert all("by_layer" not in e for e in json.loads(result.stdout)["queries"][0]["proponents"])
    assert "layers" not in runner.invoke(app, ["top-k", *digits, "--query", "0", "--k", "3"]).stdout


RESNET = [f"backbone.encoder.{n}" for n in ["conv1", *(f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in (0, 1) for c in (1, 2)), "layer4.0.downsample.0", "fc"]]


def ranking_lines(monkeypatch, columns: int | None, rows) -> list[str]:
    """The lines of a ranking's table with a "layers" column, printed at `columns` (None: to a pipe)."""
    import io

    from influence_cli.cli import render
    from influence_cli.cli.scores import _ranking_table
    from influence_cli.topk import RankedExample

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    ranked = [(["proponent", str(rank), str(index), "7", f"{sum(parts.values()):+.5g}"], RankedExample(rank, index, index, 7, sum(parts.values()), parts))
              for rank, (index, parts) in enumerate(rows, start=1)]  # fmt: skip
    head = [("", "left"), ("rank", "right"), ("train index", "right"), ("label", "left"), ("influence", "right")]
    render.print_table(_ranking_table("query 0", head, ranked, None, True))
    return out.getvalue().splitlines()[4:-1]  # the rows: below the title and the header, above the bottom border


def test_the_layers_column_keeps_to_the_terminal_with_long_layer_names(monkeypatch):
    """A ResNet's layers inside a wrapper ("backbone.encoder.layer4.0.downsample.0"): the rows keep to the
    terminal's width, one form for the whole column: the three leading layers by name, then without the
    prefix every name shares, then fewer layers, down to the first alone cut from the left; a pipe gets
    them whole."""
    first = dict.fromkeys(RESNET, 0.0) | {RESNET[-2]: 0.5, RESNET[-3]: -0.3, RESNET[10]: 0.2}
    second = dict.fromkeys(RESNET, 0.0) | {RESNET[3]: 0.6, RESNET[-1]: 0.25, RESNET[1]: 0.15}
    rows = [(1234, first), (77, second)]
    whole = ranking_lines(monkeypatch, None, rows)
    assert "backbone.encoder.layer4.0.downsample.0 50% · backbone.encoder.layer4.1.conv2 -30% · backbone.encoder.layer3.0.conv2 20%" in whole[0]
    expected = {
        200: ["backbone.encoder.layer4.0.downsample.0 50% · backbone.encoder.layer4.1.conv2 -30% · backbone.encoder.layer3.0.conv2 20%",
              "backbone.encoder.layer1.1.conv1 60% · backbone.encoder.fc 25% · backbone.encoder.layer1.0.conv1 15%"],
        160: ["…layer4.0.downsample.0 50% · …layer4.1.conv2 -30% · …layer3.0.conv2 20%", "…layer1.1.conv1 60% · …fc 25% · …layer1.0.conv1 15%"],
        120: ["…layer4.0.downsample.0 50% · …layer4.1.conv2 -30%", "…layer1.1.conv1 60% · …fc 25%"],
        100: ["backbone.encoder.layer4.0.downsample.0 50%", "backbone.encoder.layer1.1.conv1 60%"],
        80: ["…0.downsample.0 50%", "…layer1.1.conv1 60%"],  # the first alone, cut at a dot to fit
    }  # fmt: skip
    for columns, cells in expected.items():
        lines = ranking_lines(monkeypatch, columns, rows)
        assert all(len(line) <= columns for line in lines), (columns, lines)
        assert [line.split("│")[-2].strip() for line in lines] == cells, columns
    lines = ranking_lines(monkeypatch, 60, rows)  # no room left: the first layer, at least 8 characters of its name, folded to fit
    assert all(len(line) <= 60 for line in lines), lines
    assert " ".join(line.split("│")[-2].strip() for line in lines if "│" in line) == "…sample.0 50% …1.conv1 60%"


def test_fitted_layer_shares_without_a_shared_prefix():
    from influence_cli.cli.render import fitted_layer_shares

    rows = [({"conv1": 1.0, "layer4.1.conv2": 2.0, "fc": -1.0}, 2.0)]
    assert fitted_layer_shares(rows, None) == ["layer4.1.conv2 50% · conv1 25% · fc -25%"]
    assert fitted_layer_shares(rows, 40) == ["layer4.1.conv2 50% · conv1 25% · fc -25%"]
    assert fitted_layer_shares(rows, 30) == ["layer4.1.conv2 50% · conv1 25%"]
    assert fitted_layer_shares(rows, 18) == ["layer4.1.conv2 50%"]
    assert fitted_layer_shares(rows, 16) == ["…1.conv2 50%"]  # at a dot
    assert fitted_layer_shares(rows, 5) == ["…1.conv2 50%"]  # 8 characters at least, a leading dot left out
    assert fitted_layer_shares([({"a.x": 0.0, "a.y": 0.0}, 0.0)], 5) == ["-"]
