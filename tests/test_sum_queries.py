"""Scores summed over the queries (scores.sum_queries, compute-scores --sum-queries).

By linearity Σ_q I(q, x) = (Σ_q ∇m(q))ᵀ (F + λ)⁻¹ ∇L(x): the preconditioned query gradients are summed chunk
by chunk into one row, scored in one pass over the training set. The summed row is checked in float64 against
the per-query matrix summed over its rows (ekfac, identity, per-layer parts, RelatIF, an ensemble), then the
files, top-k and the refusals through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_ensemble import write_members
from test_scores import N_QUERY, N_TRAIN, all_scores, make_cfg, project, project64, write_project  # noqa: F401 (fixtures)
from typer.testing import CliRunner

import influence_cli.kernel as kernel_mod
import influence_cli.scores as scores_mod
from influence_cli import storage
from influence_cli.cli import app
from influence_cli.config import config_from_dict
from influence_cli.errors import OutputError, UsageError
from influence_cli.fit import fit_factors
from influence_cli.scores import compute_scores, plan_layout
from influence_cli.topk import load_scores_meta, top_k

pytestmark = pytest.mark.usefixtures("one_thread")


def captured_blocks(monkeypatch) -> list[torch.Tensor]:
    """The score blocks (and per-layer parts) as computed, before the storage dtype rounds them: float64 for a float64 model."""
    seen: list[torch.Tensor] = []
    check = scores_mod._check_storable

    def keep(block, *args, **kwargs):
        seen.append(block.clone())
        return check(block, *args, **kwargs)

    monkeypatch.setattr(scores_mod, "_check_storable", keep)
    return seen


def preconditioned_chunks(monkeypatch) -> list[tuple[int, int]]:
    """The query ranges preconditioned, in order."""
    seen: list[tuple[int, int]] = []
    precondition = scores_mod._Scorer.precondition

    def record(self, queries, q0, q1, title, **kwargs):
        seen.append((q0, q1))
        return precondition(self, queries, q0, q1, title, **kwargs)

    monkeypatch.setattr(scores_mod._Scorer, "precondition", record)
    return seen


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= rel * float(want.abs().max()), (err, float(want.abs().max()))


# ----------------------------------------------------------------------------- the math (float64)


@pytest.mark.parametrize("variant", ["plain", "by_layer", "relative", "blocks"])
@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_the_summed_row_is_the_per_query_matrix_summed_over_its_rows(project64, monkeypatch, strategy, variant):  # noqa: F811
    if variant == "blocks":  # the per-example gradient blocks rather than the contracted form, on both sides
        monkeypatch.setattr(kernel_mod, "contracts", lambda n_query, d_in: False)
    overrides = [f"factors.strategy={strategy}", "scores.query_chunk=2"]  # 7 queries: 4 chunks, the last of one query
    overrides += {"by_layer": ["scores.by_layer=true"], "relative": ["scores.relative=true"]}.get(variant, [])
    name = f"{strategy}_{variant}"
    per_query_cfg = make_cfg(project64, f"q_{name}", *overrides, copy_factors=strategy != "identity")
    summed_cfg = make_cfg(project64, f"s_{name}", *overrides, copy_factors=strategy != "identity")
    blocks = captured_blocks(monkeypatch)
    compute_scores(per_query_cfg)
    per_query = list(blocks)
    blocks.clear()
    chunks = preconditioned_chunks(monkeypatch)
    report = compute_scores(summed_cfg, sum_queries=True)
    summed = list(blocks)
    assert chunks == [(0, 2), (2, 4), (4, 6), (6, 7)]  # every chunk preconditioned once, then one pass over the training set
    assert report.n_query == 1 and report.queries_summed == N_QUERY and report.query_chunks == 1
    assert per_query[0].shape == (N_QUERY, N_TRAIN) and per_query[0].dtype == torch.float64
    assert_rel(summed[0], per_query[0].sum(0, keepdim=True), 1e-10)
    if variant == "by_layer":  # each layer's part, [L, 1, N]
        assert_rel(summed[1], per_query[1].sum(1, keepdim=True), 1e-10)
    tensors, meta = storage.load_tensors(report.paths[0], storage.SCORES_FORMAT)
    assert tensors["scores"].shape == (1, N_TRAIN)
    assert meta["sum_queries"] is True and meta["queries_summed"] == N_QUERY and meta["n_query"] == 1
    assert meta["config"]["scores"]["sum_queries"] is True  # the flag recorded in the effective config
    assert tensors[storage.SUMMED_QUERY_INDICES].tolist() == list(range(50, 50 + N_QUERY))
    assert not {"query_indices", "query_labels", "query_predictions"} & set(tensors)


def test_an_ensembles_summed_row_is_the_sum_of_its_mean_scores(tmp_path, monkeypatch):
    data = write_project(tmp_path)
    save_file({k: v.double() for k, v in load_file(tmp_path / "model.safetensors").items()}, tmp_path / "model.safetensors")
    (extra,) = write_members(tmp_path)[:1]
    save_file({k: v.double() for k, v in load_file(tmp_path / extra).items()}, tmp_path / extra)
    data["scores"] = {"checkpoints": [extra], "query_chunk": 3}
    fit_factors(config_from_dict(data, base_dir=tmp_path))
    blocks = captured_blocks(monkeypatch)
    per_query = compute_scores(config_from_dict(data, base_dir=tmp_path))
    assert per_query.members == 2
    summed = compute_scores(config_from_dict(data, ["scores.sum_queries=true"], base_dir=tmp_path), overwrite=True)
    assert summed.members == 2 and summed.queries_summed == N_QUERY
    assert_rel(blocks[1], blocks[0].sum(0, keepdim=True), 1e-10)


def test_summed_scores_sharded_by_train_range_equal_the_single_file(project):  # noqa: F811
    whole = compute_scores(make_cfg(project, "s_whole"), sum_queries=True)
    sharded = compute_scores(make_cfg(project, "s_shards", "scores.max_memory_mb=0.00005", "scores.query_chunk=3"), sum_queries=True)
    assert not whole.sharded and sharded.sharded and sharded.num_shards > 1
    meta = load_scores_meta(sharded.paths[0].parent)
    assert meta.n_query == 1 and meta.queries_summed == N_QUERY
    torch.testing.assert_close(all_scores(sharded.paths[0].parent, 1), all_scores(whole.paths[0].parent, 1), rtol=1e-5, atol=1e-7)


def test_plan_layout_sizes_the_score_block_by_one_row_when_summed():
    layout = plan_layout(1000, 4000, 100, batch_size=8, max_memory_mb=1.0, query_chunk=300, sum_queries=True)
    assert layout.query_chunks == [(0, 1)] and layout.summed == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    assert not layout.sharded and layout.rows == 1  # [1000, 4000] float32 would not fit 1 MB; [1, 4000] does
    assert plan_layout(1000, 4000, 100, batch_size=8, max_memory_mb=1.0, query_chunk=300).sharded


# ----------------------------------------------------------------------------- refusals


def test_resume_of_a_per_query_run_with_sum_queries_is_refused_naming_the_flag(project):  # noqa: F811
    cfg = make_cfg(project, "s_resume")
    compute_scores(cfg)
    with pytest.raises(OutputError, match=r"scores\.sum_queries \(--sum-queries\)"):
        compute_scores(cfg, resume=True, sum_queries=True)


def test_resume_of_interrupted_per_query_progress_with_sum_queries_is_refused(project):  # noqa: F811
    from stopping import StopAt

    cfg = make_cfg(project, "s_interrupted", "factors.checkpoint_every=1")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(cfg, progress=StopAt("scores", 16))
    with pytest.raises(OutputError, match="sum_queries"):
        compute_scores(cfg, resume=True, sum_queries=True)
    compute_scores(cfg, resume=True)  # the run it was continues


def test_an_interrupted_summed_run_resumes_to_the_same_scores(project):  # noqa: F811
    from stopping import StopAt

    whole = all_scores(compute_scores(make_cfg(project, "s_uninterrupted", "scores.query_chunk=3"), sum_queries=True).paths[0].parent, 1)
    cfg = make_cfg(project, "s_resumed", "scores.query_chunk=3", "factors.checkpoint_every=1")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(cfg, sum_queries=True, progress=StopAt("scores", 16))
    report = compute_scores(cfg, resume=True, sum_queries=True)
    assert report.resumed_from is not None and report.queries_summed == N_QUERY
    assert torch.equal(all_scores(cfg.output_path, 1), whole)


def test_sum_queries_is_refused_with_self(project):  # noqa: F811
    with pytest.raises(UsageError, match="--sum-queries"):
        compute_scores(make_cfg(project, "s_self"), self_influence=True, sum_queries=True)


def test_top_k_of_summed_scores_takes_only_their_one_row(project):  # noqa: F811
    out = compute_scores(make_cfg(project, "s_topk"), sum_queries=True).paths[0].parent
    (ranking,) = top_k(out, None, 3)
    assert ranking.query_position == 0 and ranking.query_index is None and ranking.query_label is None
    assert top_k(out, 0, 3)[0].proponents == ranking.proponents
    for refused in (1, slice(0, 5), [0, 1]):
        with pytest.raises(UsageError, match="summed into one row"):
            top_k(out, refused, 3)


# ----------------------------------------------------------------------------- the CLI (float32)


def test_cli_sum_queries_scores_top_k_and_json(project, tmp_path):  # noqa: F811
    folder, data = project
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    config = folder / "s_cli.yaml"
    (folder / "s_cli").mkdir(exist_ok=True)
    shutil.copy(folder / "out" / storage.FACTORS_FILE, folder / "s_cli" / storage.FACTORS_FILE)
    config.write_text(json.dumps(data | {"output_dir": "s_cli", "scores": {"query_chunk": 3}}))
    result = runner.invoke(app, ["compute-scores", str(config)])
    assert result.exit_code == 0, result.stderr
    per_query = all_scores(folder / "s_cli")
    result = runner.invoke(app, ["compute-scores", str(config), "--sum-queries", "--overwrite", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_query"] == 1 and report["queries_summed"] == N_QUERY and report["query_chunks"] == 1
    summed = all_scores(folder / "s_cli", 1)
    assert summed.shape == (1, N_TRAIN)
    assert_rel(summed, per_query.sum(0, keepdim=True), 1e-5)
    result = runner.invoke(app, ["compute-scores", str(config), "--sum-queries", "--resume"])
    assert result.exit_code == 0 and "already complete" in result.stderr

    result = runner.invoke(app, ["top-k", str(config), "--k", "3"])
    assert result.exit_code == 0, result.stderr
    assert f"the {N_QUERY} queries of data.query, summed" in result.stdout and "predicted" not in result.stdout
    result = runner.invoke(app, ["top-k", str(config), "--k", "3", "--query", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    (row,) = printed["queries"]
    assert printed["queries_summed"] == N_QUERY
    assert row["query_position"] == 0 and row["query_index"] is None and row["query_label"] is None and row["query_prediction"] is None
    best = int(summed[0].argmax())
    assert row["proponents"][0]["train_position"] == best
    assert row["proponents"][0]["score"] == pytest.approx(float(summed[0, best]), rel=1e-6)

    result = runner.invoke(app, ["top-k", str(config), "--query", "2"])
    assert result.exit_code != 0 and "--query" in result.stderr and "summed into one row" in result.stderr
    result = runner.invoke(app, ["top-k", str(config), "--image-grid", str(tmp_path / "grid.png")])
    assert result.exit_code != 0 and "--image-grid" in result.stderr and not (tmp_path / "grid.png").exists()
    result = runner.invoke(app, ["compute-scores", str(config), "--no-sum-queries", "--resume"])  # a per-query run over summed scores
    assert result.exit_code != 0 and "--sum-queries" in result.stderr


def test_sum_queries_of_an_empty_data_query_is_refused_in_one_line_naming_it(project):  # noqa: F811
    """No query to sum: refused as the per-query run refuses it, one line naming data.query, nothing written."""
    folder, data = project
    save_file({"inputs": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.int64)}, folder / "no_queries.safetensors")
    (folder / "s_empty").mkdir(exist_ok=True)
    shutil.copy(folder / "out" / storage.FACTORS_FILE, folder / "s_empty" / storage.FACTORS_FILE)
    config = folder / "s_empty.yaml"
    config.write_text(json.dumps(data | {"output_dir": "s_empty", "data": data["data"] | {"query": {"source": "tensors", "path": "no_queries.safetensors"}}}))
    runner = CliRunner(env={"COLUMNS": "160", "INFLUENCE_DEBUG": None, "RANK": None, "WORLD_SIZE": None})
    for flags in ([], ["--sum-queries"]):
        result = runner.invoke(app, ["compute-scores", str(config), *flags])
        assert result.exit_code == 3, result.stderr
        assert result.stderr.startswith("data error: data.query: the source holds no examples (no_queries.safetensors)\n"), result.stderr
    assert [p.name for p in (folder / "s_empty").iterdir()] == [storage.FACTORS_FILE]


def test_summed_scores_of_a_path_are_read_as_one_row(project):  # noqa: F811
    out = compute_scores(make_cfg(project, "s_meta"), sum_queries=True).paths[0].parent
    meta = load_scores_meta(Path(out))
    assert meta.n_query == 1 and meta.queries_summed == N_QUERY and meta.query_labels is None


@pytest.mark.distributed
def test_two_ranks_sum_the_queries_as_one_process(tmp_path):
    """Under torchrun each rank sums every chunk of queries into the row it scores its own shards with: the job's
    index and shards hold the one process's summed row."""
    from test_distributed import CONFIG, torchrun

    from influence_cli.config import load_config

    sets = ["device=cpu", "data.train.range=[0, 200]", "scores.query_chunk=3"]
    single = load_config(CONFIG, [*sets, f"output_dir={tmp_path / 'single'}"])
    fit_factors(single)
    want = all_scores(compute_scores(single, sum_queries=True).paths[0].parent, 1)
    (tmp_path / "job").mkdir()
    shutil.copy(tmp_path / "single" / storage.FACTORS_FILE, tmp_path / "job" / storage.FACTORS_FILE)
    args = [a for s in [*sets, f"output_dir={tmp_path / 'job'}"] for a in ("--set", s)]
    run = torchrun("compute-scores", str(CONFIG), *args, "--sum-queries")
    assert run.returncode == 0, run.stderr
    meta = load_scores_meta(tmp_path / "job")
    assert meta.sharded and meta.n_query == 1 and meta.queries_summed == single.data.query.range[1] - single.data.query.range[0]
    torch.testing.assert_close(all_scores(tmp_path / "job", 1), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("model_class", ["ConvHead", "SeqModel"])
@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_summed_stored_queries_of_layers_with_positions_score_the_sum(model_class, strategy):
    """`ScoreKernel.add_rows` then `summed_queries` on chunks stored by `store_queries` (a layer with positions keeps
    [Q, P]; the head is cut into pieces and row blocks), against the in-memory [Q, N] matrix summed over its rows."""
    import exact

    from influence_cli.factors import LayerFactors
    from influence_cli.kernel import build_kernel, pairwise_scores
    from influence_cli.passes import stream_gradients
    from influence_cli.tracking import find_tracked_modules

    model = getattr(exact, model_class)().double()
    g = torch.Generator().manual_seed(3)
    shape = (2, 5, 5) if model_class == "ConvHead" else (4, 4)
    x, y = torch.randn(13, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (13,), generator=g)
    xq, yq = torch.randn(7, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    if strategy == "identity":
        tracked = find_tracked_modules(model, ["*"])
        layers = {tm.name: LayerFactors(tm.name) for tm in tracked}
    else:
        tracked, layers = exact.fit(model, x, y, strategy=strategy, batch_size=5)
    want = pairwise_scores(model, tracked, layers, exact.batches_of(xq, yq, 3)(0), exact.batches_of(x, y, 4)(0)).sum(0, keepdim=True)
    kernel = build_kernel(model, layers, "auto", 0.1, None, "layer", "none")
    kernel.plan(3, 13)
    sums = None
    for q0 in range(0, 7, 3):  # chunks of 3, 3 and 1 queries
        stored: dict = {}
        q1 = min(q0 + 3, 7)
        chunk = [(xq[q0:q1], yq[q0:q1], torch.arange(q0, q1))]
        for batch in stream_gradients(model, tracked, chunk, task_kind="classification", mode="measurement"):
            kernel.store_queries(stored, 0, q1 - q0, batch)
        sums = kernel.add_rows(stored, sums)
    row = kernel.summed_queries(sums)
    got = torch.cat([
        kernel.pairwise(row, kernel.gradients(batch))
        for batch in stream_gradients(model, tracked, exact.batches_of(x, y, 4)(0), task_kind="classification", mode="loss")
    ], 1)  # fmt: skip
    assert_rel(got, want, 1e-10)


def test_resume_with_other_query_chunks_is_refused_naming_the_chunks_to_resume_with(project):  # noqa: F811
    """The summed row's rounding follows its chunks: progress summed in chunks of 3 is not continued with a row summed
    in chunks of 2, and the refusal names the query chunks and the scores.query_chunk that resumes it."""
    from stopping import StopAt

    cfg = make_cfg(project, "s_rechunked", "scores.query_chunk=3", "factors.checkpoint_every=1")
    with pytest.raises(KeyboardInterrupt):
        compute_scores(cfg, sum_queries=True, progress=StopAt("scores", 16))
    with pytest.raises(OutputError, match=r"query chunks \(scores\.query_chunk, scores\.max_memory_mb\)") as caught:
        compute_scores(make_cfg(project, "s_rechunked", "scores.query_chunk=2", "factors.checkpoint_every=1"), resume=True, sum_queries=True)
    assert "--set scores.query_chunk=3" in caught.value.hint
    compute_scores(cfg, resume=True, sum_queries=True)
