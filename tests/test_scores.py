"""compute-scores: float64 math against explicit answers, then the streaming pipeline on a tiny project.

The math tests build every quantity explicitly: per-example gradients by autograd one
example at a time (exact.per_example_layer_grads), the curvature densely from the
factors with torch.kron (exact.kron_dense, row-major vec), and its inverse with
torch.linalg.inv. The pipeline tests run `compute_scores` from a config (float32, as
every loaded model is) and check files, sharding, chunking, refusals and resume.
"""

from __future__ import annotations

import re
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from exact import SeqModel, batches_of, fit, kron_dense, per_example_layer_grads, tiny_mlp
from safetensors.torch import load_file, save_file
from stopping import interrupt_after
from torch import nn

import influence_cli.scores as scores_mod
from influence_cli import storage
from influence_cli import task as task_lib
from influence_cli.config import config_from_dict
from influence_cli.context import prepare
from influence_cli.data import make_loader
from influence_cli.errors import NumericalError, OutputError
from influence_cli.factors import LayerFactors, layer_damping
from influence_cli.fit import fit_factors, load_factors
from influence_cli.kernel import pairwise_scores, self_influence_scores
from influence_cli.models import mlp
from influence_cli.scores import compute_scores, plan_layout, plan_shards
from influence_cli.topk import check_scores_match, iter_score_blocks, load_scores_meta, self_top_k, top_k
from influence_cli.tracking import find_tracked_modules

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64




# ----------------------------------------------------------------------------- explicit references


def loss_vectors(kind="classification", measurement="loss"):
    return lambda o, y, idx: task_lib.loss_output_gradient(o, y, kind, measurement)[None]


def explicit_grads(model, tracked, x, y, kind="classification", measurement="loss") -> dict[str, torch.Tensor]:
    """{layer: [N, P]} per-example gradients of the loss (or measurement), row-major vec."""
    grads = per_example_layer_grads(model, tracked, x, y, loss_vectors(kind, measurement))
    return {name: g[:, 0].reshape(len(x), -1) for name, g in grads.items()}


def damping_of(lf: LayerFactors, damping) -> float:
    if lf.eigenvalues is None:
        return 0.0
    return float(0.1 * lf.eigenvalues.mean()) if damping == "auto" else float(damping)


def dense_inverse(lf: LayerFactors, damping) -> torch.Tensor:
    """(P + λ)⁻¹ of one layer, built densely: Kronecker (kfac/ekfac), diagonal, or I (identity)."""
    lam = damping_of(lf, damping)
    if lf.eigenvalues is None:
        n = lf.name  # identity: the size comes from the caller's gradients
        raise AssertionError(n)
    if lf.a_eigenvectors is None:
        return torch.diag(1.0 / (lf.eigenvalues.reshape(-1) + lam))
    return torch.linalg.inv(kron_dense(lf, lam))


def preconditioner(lf: LayerFactors, damping, size: int) -> torch.Tensor:
    return torch.eye(size, dtype=F64) if lf.eigenvalues is None else dense_inverse(lf, damping)


def explicit_scores(layers, gq, gt, damping) -> torch.Tensor:
    """Σ_l ∇L(z)ᵀ (P_l + λ_l)⁻¹ ∇L(x): [Q, N]."""
    return sum(gq[n] @ preconditioner(lf, damping, gq[n].shape[1]) @ gt[n].T for n, lf in layers.items())


def explicit_self_and_norms(layers, gt, damping) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇Lᵀ P⁻¹ ∇L [N], ‖P⁻¹ ∇L‖ [N]) summed over layers."""
    self_inf, sq = 0, 0
    for n, lf in layers.items():
        pinv = preconditioner(lf, damping, gt[n].shape[1])
        pre = gt[n] @ pinv  # P⁻¹ symmetric
        self_inf = self_inf + (pre * gt[n]).sum(1)
        sq = sq + pre.square().sum(1)
    return self_inf, sq.sqrt()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(13, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (13,), generator=g)
    xq = torch.randn(4, 5, generator=g, dtype=F64)
    yq = torch.randint(0, 3, (4,), generator=g)
    return x, y, xq, yq


def run_pairwise(model, tracked, layers, data, bs=4, **kw):
    x, y, xq, yq = data
    return pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, bs)(0), **kw)


def fitted(model, data, strategy, fisher="empirical", kind="classification"):
    x, y, *_ = data
    if strategy == "identity":
        tracked = find_tracked_modules(model, ["*"])
        return tracked, {tm.name: LayerFactors(tm.name) for tm in tracked}
    return fit(model, x, y, strategy=strategy, fisher=fisher, batch_size=5, kind=kind)


# ----------------------------------------------------------------------------- the math (float64)


def test_identity_scores_are_gradient_dot_products(data):
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, "identity")
    got = run_pairwise(model, tracked, layers, data)
    gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
    ref = sum(gq[n] @ gt[n].T for n in gq)
    assert got.dtype == F64 and got.shape == (4, 13)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("damping", ["auto", 0.05], ids=["damping-auto", "damping-0.05"])
@pytest.mark.parametrize("strategy,fisher", [("ekfac", "empirical"), ("ekfac", "sampled"), ("kfac", "ggn"), ("diagonal", "empirical")])
def test_scores_equal_dense_curvature_inverse(data, strategy, fisher, damping):
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, strategy, fisher)
    got = run_pairwise(model, tracked, layers, data, damping=damping)
    ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), damping)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_relative_and_self_influence_equal_their_definitions(data, strategy):
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, strategy)
    gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
    self_ref, norms = explicit_self_and_norms(layers, gt, "auto")
    rel = run_pairwise(model, tracked, layers, data, relative=True)
    torch.testing.assert_close(rel, explicit_scores(layers, gq, gt, "auto") / norms, rtol=1e-9, atol=1e-10)
    got_self = self_influence_scores(model, tracked, layers, batches_of(x, y, 4)(0))
    torch.testing.assert_close(got_self, self_ref, rtol=1e-9, atol=1e-10)
    assert bool((got_self > 0).all())


def test_sequence_layers_relative_and_self_influence():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 6, 4, generator=g, dtype=F64), torch.randint(0, 3, (7,), generator=g)
    xq, yq = torch.randn(3, 6, 4, generator=g, dtype=F64), torch.randint(0, 3, (3,), generator=g)
    model = SeqModel().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=3)
    gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
    self_ref, norms = explicit_self_and_norms(layers, gt, "auto")
    got = run_pairwise(model, tracked, layers, (x, y, xq, yq), bs=3, relative=True)
    torch.testing.assert_close(got, explicit_scores(layers, gq, gt, "auto") / norms, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(self_influence_scores(model, tracked, layers, batches_of(x, y, 2)(0)), self_ref, rtol=1e-9, atol=1e-10)


def test_self_influence_is_the_diagonal_of_pairwise_scores(data):
    x, y, *_ = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, "ekfac")
    pair = pairwise_scores(model, tracked, layers, batches_of(x, y, 4)(0), batches_of(x, y, 5)(0))
    torch.testing.assert_close(torch.diagonal(pair), self_influence_scores(model, tracked, layers, batches_of(x, y, 6)(0)))


def least_squares_problem():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(30, 4, generator=g, dtype=F64), torch.randn(30, 1, generator=g, dtype=F64)
    xq, yq = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, 1, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    xa, xqa = torch.cat([x, torch.ones(30, 1, dtype=F64)], 1), torch.cat([xq, torch.ones(5, 1, dtype=F64)], 1)
    with torch.no_grad():  # ∇W of (f − y)² is 2 (f − y) [x, 1]
        gt = 2 * (model(x) - y) * xa
        gq = 2 * (model(xq) - yq) * xqa
    return model, (x, y, xq, yq), xa, gq, gt


def test_least_squares_kfac_matches_closed_form_up_to_one_scale():
    """K-FAC with the empirical Fisher: G is the scalar mean squared residual, so (F + λ)⁻¹ ∝ (XᵀX/N + λ')⁻¹."""
    model, data, xa, gq, gt = least_squares_problem()
    tracked, layers = fit(model, data[0], data[1], strategy="kfac", fisher="empirical", kind="regression", batch_size=7)
    got = run_pairwise(model, tracked, layers, data, task_kind="regression")
    gram = xa.T @ xa / 30
    lam = 0.1 * torch.linalg.eigvalsh(gram).mean()  # auto damping, in units of the Gram matrix
    closed = gq @ torch.linalg.inv(gram + lam * torch.eye(5, dtype=F64)) @ gt.T
    corr = torch.corrcoef(torch.stack([got.flatten(), closed.flatten()]))[0, 1]
    assert corr > 0.9999
    scale = float(layers[""].g_covariance)  # the one global factor: mean of (2 r)²
    torch.testing.assert_close(got * scale, closed, rtol=1e-9, atol=1e-10)


def test_least_squares_ggn_ekfac_is_exact():
    """Gauss-Newton of (f − y)² is 2XᵀX/N exactly: scores = ∇L(z)ᵀ (2XᵀX/N + λ)⁻¹ ∇L(x)."""
    model, data, xa, gq, gt = least_squares_problem()
    tracked, layers = fit(model, data[0], data[1], strategy="ekfac", fisher="ggn", kind="regression", batch_size=7)
    got = run_pairwise(model, tracked, layers, data, task_kind="regression", damping=0.01)
    closed = gq @ torch.linalg.inv(2 * xa.T @ xa / 30 + 0.01 * torch.eye(5, dtype=F64)) @ gt.T
    torch.testing.assert_close(got, closed, rtol=1e-9, atol=1e-10)


def test_removing_an_example_changes_the_query_loss_by_plus_score_over_n():
    """The documented scale and sign, against retraining: least squares at its optimum, where the
    GGN is the exact Hessian; leaving x out changes the query's loss by ≈ +score/N (a proponent,
    positive score, is missed: the loss rises)."""
    g = torch.Generator().manual_seed(11)
    n = 200
    x, y = torch.randn(n, 4, generator=g, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64)
    xq, yq = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 1, generator=g, dtype=F64)
    xa, xqa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1), torch.cat([xq, torch.ones(6, 1, dtype=F64)], 1)

    def solve(rows: torch.Tensor) -> torch.Tensor:  # [5, 1]: least squares on those training rows
        return torch.linalg.lstsq(xa[rows], y[rows]).solution

    def query_loss(w: torch.Tensor) -> torch.Tensor:  # [6]
        return ((xqa @ w - yq) ** 2).squeeze(1)

    w = solve(torch.arange(n))
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.copy_(w[:4].T)
        model.bias.copy_(w[4])
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="ggn", kind="regression", batch_size=32)
    scores = run_pairwise(model, tracked, layers, (x, y, xq, yq), task_kind="regression", damping=0.0)  # [6, n]
    removed = [0, 1, 2, 3, 4, 5, 6, 7]
    actual = torch.stack([query_loss(solve(torch.tensor([i for i in range(n) if i != r]))) - query_loss(w) for r in removed], 1)
    predicted = scores[:, removed] / n
    assert torch.equal(torch.sign(actual), torch.sign(predicted))
    assert torch.corrcoef(torch.stack([actual.flatten(), predicted.flatten()]))[0, 1] > 0.99
    torch.testing.assert_close(actual, predicted, rtol=0.25, atol=1e-4)  # first order: off by O(1/N²)


def test_margin_measurement_equals_explicit_gradient_of_minus_margin(data):
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, "ekfac")
    got = run_pairwise(model, tracked, layers, data, measurement="margin")
    gq = explicit_grads(model, tracked, xq, yq, measurement="margin")
    ref = explicit_scores(layers, gq, explicit_grads(model, tracked, x, y), "auto")
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def test_margin_sign_binary_is_loss_influence_over_error_probability():
    """Two classes: ∇(−margin) = ∇loss / (1 − p_correct), so margin scores keep the loss scores' sign."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 5, generator=g, dtype=F64), torch.randint(0, 2, (12,), generator=g)
    xq, yq = torch.randn(4, 5, generator=g, dtype=F64), torch.randint(0, 2, (4,), generator=g)
    model = tiny_mlp(d_out=2)
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=5)
    loss = run_pairwise(model, tracked, layers, (x, y, xq, yq))
    margin = run_pairwise(model, tracked, layers, (x, y, xq, yq), measurement="margin")
    with torch.no_grad():
        p_wrong = 1 - torch.softmax(model(xq), 1).gather(1, yq[:, None])
    torch.testing.assert_close(margin, loss / p_wrong, rtol=1e-9, atol=1e-10)
    assert torch.equal(torch.sign(margin), torch.sign(loss))


def test_plan_shards_cover_every_rank_range_batch_aligned():
    shards = plan_shards(103, 3, 8, shard_len=16)
    for rank in range(3):
        lo, hi = rank * 103 // 3, (rank + 1) * 103 // 3
        mine = [s for s in shards if s.rank == rank]
        assert mine[0].start == lo and mine[-1].stop == hi
        assert all(a.stop == b.start for a, b in zip(mine, mine[1:], strict=False))
        assert all(s.first_batch * 8 == s.start - lo for s in mine)
        assert sum(s.num_batches for s in mine) == -(-(hi - lo) // 8)
    assert [s.number for s in shards] == list(range(len(shards)))
    one = plan_layout(10, 1000, 50, batch_size=8, max_memory_mb=1.0)
    assert not one.sharded and len(one.shards) == 1 and one.query_chunks == [(0, 10)]
    many = plan_layout(100, 10_000, 10_000, batch_size=8, max_memory_mb=1.0)
    assert many.sharded and all((s.stop - s.start) * 100 * 4 <= 2**20 for s in many.shards)
    assert all((q1 - q0) * 10_000 * 4 <= 2**20 for q0, q1 in many.query_chunks)
    wide = plan_layout(100, 10_000, 10_000, batch_size=8, max_memory_mb=1.0, element_bytes=8, score_bytes=8)  # a float64 model
    assert all((s.stop - s.start) * 100 * 8 <= 2**20 for s in wide.shards) and len(wide.shards) > len(many.shards)
    assert all((q1 - q0) * 10_000 * 8 <= 2**20 for q0, q1 in wide.query_chunks)


# ----------------------------------------------------------------------------- the pipeline (config, float32)


N_TRAIN, N_QUERY = 45, 7


def write_project(folder: Path, dim: int = 6) -> dict:
    """A tensors dataset (60 examples, `dim` features in [0, 1)) and an mlp checkpoint in `folder`; returns the config dict."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, dim, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    save_file({"inputs": x, "labels": y}, folder / "data.safetensors")
    torch.manual_seed(0)
    model = mlp(input_dim=dim, hidden=[5], num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return {
        "model": {"architecture": "mlp", "kwargs": {"input_dim": dim, "hidden": [5], "num_classes": 3}, "checkpoint": "model.safetensors"},
        "data": {
            "train": {"source": "tensors", "path": "data.safetensors", "range": [0, N_TRAIN]},
            "query": {"source": "tensors", "path": "data.safetensors", "range": [50, 50 + N_QUERY]},
            "batch_size": 8,
        },
        "factors": {"strategy": "ekfac", "fisher": "empirical", "checkpoint_every": 1},
        "output_dir": "out",
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny project with its factors fitted once (into <folder>/out)."""
    folder = tmp_path_factory.mktemp("project")
    data = write_project(folder)
    fit_factors(config_from_dict(data, base_dir=folder))
    return folder, data


@pytest.fixture(scope="module")
def project64(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny project with a float64 checkpoint (scored in float64), its factors fitted once."""
    folder = tmp_path_factory.mktemp("project64")
    data = write_project(folder)
    save_file({k: v.double() for k, v in load_file(folder / "model.safetensors").items()}, folder / "model.safetensors")
    fit_factors(config_from_dict(data, base_dir=folder))
    return folder, data


@pytest.fixture(params=["float32", "float64"])
def either_project(request) -> tuple[Path, dict]:
    """The tiny project scored in float32, then in float64."""
    return request.getfixturevalue("project" if request.param == "float32" else "project64")


def make_cfg(project, out: str, *overrides: str, copy_factors: bool = True):
    """A config of the project writing to <folder>/<out>, with the fitted factors copied there."""
    folder, data = project
    (folder / out).mkdir(exist_ok=True)
    if copy_factors and not (folder / out / storage.FACTORS_FILE).exists():
        shutil.copy(folder / "out" / storage.FACTORS_FILE, folder / out / storage.FACTORS_FILE)
    return config_from_dict(data, [f"output_dir={out}", *overrides], base_dir=folder)


def all_scores(out: Path, n_query: int = N_QUERY) -> torch.Tensor:
    return torch.cat([b.scores for b in iter_score_blocks(out, range(n_query))], 1)


def in_memory_reference(cfg, relative=False) -> torch.Tensor:
    ctx = prepare(cfg)
    factors = load_factors(cfg.output_path / storage.FACTORS_FILE)
    train, query = ctx.dataset(cfg.data.train, "data.train"), ctx.dataset(cfg.data.query, "data.query")
    return pairwise_scores(
        ctx.model, ctx.tracked, factors.layers, make_loader(query, 8), make_loader(train, 8), relative=relative
    )


def test_compute_scores_writes_scores_matching_the_in_memory_math(project):
    cfg = make_cfg(project, "plain")
    report = compute_scores(cfg)
    assert report.paths == [cfg.output_path / storage.SCORES_FILE] and not report.sharded
    tensors, meta = storage.load_tensors(report.paths[0], storage.SCORES_FORMAT)
    assert tensors["scores"].shape == (N_QUERY, N_TRAIN) and tensors["scores"].dtype == torch.float32
    torch.testing.assert_close(tensors["scores"], in_memory_reference(cfg))
    assert tensors["query_indices"].tolist() == list(range(50, 50 + N_QUERY))
    assert tensors["train_indices"].tolist() == list(range(N_TRAIN))
    data = load_file(project[0] / "data.safetensors")
    assert torch.equal(tensors["train_labels"], data["labels"][:N_TRAIN])
    assert torch.equal(tensors["query_labels"], data["labels"][50 : 50 + N_QUERY])
    ctx = prepare(cfg)
    with torch.no_grad():
        assert torch.equal(tensors["query_predictions"], ctx.model(data["inputs"][50 : 50 + N_QUERY]).argmax(1))
    decoded = meta
    assert decoded["strategy"] == "ekfac" and decoded["measurement"] == "loss" and decoded["relative"] is False
    assert set(decoded["damping"]) == {"fc1", "head"} and all(v > 0 for v in decoded["damping"].values())
    assert decoded["model_fingerprint"] == ctx.model_fingerprint
    assert decoded["config"]["scores"]["damping"] == "auto" and decoded["factors"]["file"] == storage.FACTORS_FILE


def test_sharded_and_chunked_runs_give_identical_top_k(project):
    plain = make_cfg(project, "unsharded", "scores.query_chunk=7")
    compute_scores(plain)
    ref, ref_top = all_scores(plain.output_path), top_k(plain.output_path, None, 4)
    budget = 7 * 16 * 4 / 2**20  # 16 training columns per shard
    sharded = make_cfg(project, "sharded", f"scores.max_memory_mb={budget}", "scores.query_chunk=7")
    report = compute_scores(sharded)
    assert report.sharded and report.num_shards == 3 and (sharded.output_path / storage.SCORES_INDEX).is_file()
    assert not (sharded.output_path / storage.SCORES_FILE).exists()
    assert torch.equal(all_scores(sharded.output_path), ref)  # same batches, same GEMMs: bit-identical
    assert top_k(sharded.output_path, None, 4, max_elements=20) == ref_top
    chunked = make_cfg(project, "chunked", f"scores.max_memory_mb={budget}", "scores.query_chunk=3")
    report = compute_scores(chunked)
    assert report.query_chunks == 3
    torch.testing.assert_close(all_scores(chunked.output_path), ref)
    got = top_k(chunked.output_path, None, 4)
    assert [[e.train_index for e in r.proponents + r.opponents] for r in got] == [
        [e.train_index for e in r.proponents + r.opponents] for r in ref_top
    ]


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor in nested lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
    return [t for item in items for t in tensors_in(item)]


def count_query_passes(monkeypatch) -> tuple[list[tuple[int, int]], list[int]]:
    """(the query positions [q0, q1) of every query pass (forward, backward and preconditioning of a chunk), in
    order; how many chunks computed before were still in memory as each pass began)."""
    passes: list[tuple[int, int]] = []
    alive: list[int] = []
    earlier: list[list[weakref.ref]] = []
    real = scores_mod._Scorer.precondition

    def counted(self, queries, q0, q1, title):
        passes.append((q0, q1))
        alive.append(sum(any(r() is not None for r in refs) for refs in earlier))
        out = real(self, queries, q0, q1, title)
        earlier.append([weakref.ref(t) for t in tensors_in(out)])
        return out

    monkeypatch.setattr(scores_mod._Scorer, "precondition", counted)
    return passes, alive


def stored_blocks(monkeypatch) -> list[torch.Tensor]:
    """Every score block as computed (the model's dtype, before scores.dtype rounds it), in the order written."""
    blocks: list[torch.Tensor] = []
    real = scores_mod._check_storable

    def kept(block, dtype, what="scores", layers=None):
        if what == "scores":
            blocks.append(block.clone())
        return real(block, dtype, what, layers)

    monkeypatch.setattr(scores_mod, "_check_storable", kept)
    return blocks


def test_one_query_chunk_is_in_memory_when_the_budget_cannot_hold_them_together(either_project, monkeypatch):
    """3 shards × 3 query chunks, which the budget cannot hold together: each shard computes every chunk again, and a
    chunk's preconditioned queries are let go before the next chunk's are computed; the scores are bit for bit those
    of one block scored chunk by chunk."""
    plain = make_cfg(either_project, "order-whole", "scores.query_chunk=3")
    dtype = scores_mod.accumulator_dtype(prepare(plain).model)
    size = torch.finfo(dtype).bits // 8
    whole = stored_blocks(monkeypatch)
    compute_scores(plain)
    assert len(whole) == 1 and whole[0].dtype == dtype
    budget = N_QUERY * 16 * size / 2**20  # 16 training columns per shard; the preconditioned gradients of 2 queries (53 weights each)
    cfg = make_cfg(either_project, "order-sharded", f"scores.max_memory_mb={budget}", "scores.query_chunk=3")
    (passes, alive), blocks = count_query_passes(monkeypatch), stored_blocks(monkeypatch)
    report = compute_scores(cfg)
    assert report.num_shards == 3 and report.query_chunks == 3
    assert passes == [(0, 3), (3, 6), (6, 7)] * 3  # each shard computes each chunk
    assert alive == [0] * 9  # the chunk used last is let go before the next is computed: one in memory
    assert torch.equal(torch.cat(blocks, 1), whole[0])
    assert torch.equal(all_scores(cfg.output_path), all_scores(plain.output_path))


def test_a_query_chunk_or_train_shard_streamed_again_is_not_checked_again(project, monkeypatch):
    """3 shards × 3 query chunks: each chunk's queries are streamed for each shard and each shard for each chunk, but
    the first-batch model checks run once per distinct first batch (3 query chunks, 3 shards), in each command."""
    import influence_cli.model_checks as model_checks

    inputs: list[torch.Tensor] = []
    real = model_checks.check_weight_gradients
    monkeypatch.setattr(model_checks, "check_weight_gradients", lambda model, tracked, x, *a: inputs.append(x.clone()) or real(model, tracked, x, *a))
    for out in ("checked-once", "checked-once-again"):  # a second command checks again
        inputs.clear()
        report = compute_scores(make_cfg(project, out, f"scores.max_memory_mb={N_QUERY * 16 * 4 / 2**20}", "scores.query_chunk=3"))
        assert report.num_shards == 3 and report.query_chunks == 3
        assert [len(x) for x in inputs] == [3, 8, 3, 1, 8, 8]  # chunk (0, 3), shard 0, then chunks (3, 6) and (6, 7), shards 1 and 2
        assert all(not torch.equal(x, y) for i, x in enumerate(inputs) for y in inputs[i + 1 :] if x.shape == y.shape)


def test_query_chunks_that_fit_the_budget_together_are_preconditioned_once(either_project, monkeypatch):
    """scores.query_chunk below what the budget holds: the preconditioned queries of every chunk are kept for every
    shard (4 query passes for 4 chunks, not one per chunk and shard), and score the same."""
    plain = make_cfg(either_project, "kept-whole", "scores.query_chunk=2")
    size = torch.finfo(scores_mod.accumulator_dtype(prepare(plain).model)).bits // 8
    budget = 2000 * size / 4 / 2**20  # every query's 53 weights (1,484 bytes in float32), not the score block with its 2 layers' parts
    whole = stored_blocks(monkeypatch)
    compute_scores(plain, by_layer=True)
    cfg = make_cfg(either_project, "kept-sharded", f"scores.max_memory_mb={budget}", "scores.query_chunk=2")
    (passes, alive), blocks = count_query_passes(monkeypatch), stored_blocks(monkeypatch)
    report = compute_scores(cfg, by_layer=True)
    assert report.num_shards == 3 and report.query_chunks == 4
    assert passes == [(0, 2), (2, 4), (4, 6), (6, 7)] and alive == [0, 1, 2, 3]
    assert torch.equal(torch.cat(blocks, 1), whole[0])
    layout = plan_layout(N_QUERY, N_TRAIN, 53, batch_size=8, max_memory_mb=budget, query_chunk=2, element_bytes=size, score_bytes=size, score_planes=3)
    assert layout.keep_queries and len(layout.shards) == 3 and len(layout.query_chunks) == 4
    exact = {"batch_size": 8, "max_memory_mb": 53 * N_QUERY * 4 / 2**20, "query_chunk": 2}  # every query's 53 weights, to the byte
    assert plan_layout(N_QUERY, N_TRAIN, 53, score_planes=3, **exact).keep_queries
    assert not plan_layout(N_QUERY, N_TRAIN, 54, score_planes=3, **exact).keep_queries  # a weight more
    assert plan_layout(N_QUERY, N_TRAIN, 53, batch_size=8, max_memory_mb=1e-6, query_chunk=N_QUERY).keep_queries  # one chunk, whatever the budget


def test_a_rank_with_one_shard_left_holds_one_query_chunk_at_a_time(project, monkeypatch):
    """Query chunks that the budget holds together are kept only while a rank has several shards to score: with one
    shard, or one left to score on --resume, each chunk is used once and let go before the next is computed."""
    budget = 2000 / 2**20  # every query's 53 weights, not the score block with its 2 layers' parts: 3 shards
    cfg = make_cfg(project, "one-left", f"scores.max_memory_mb={budget}", "scores.query_chunk=2", "factors.checkpoint_every=1")
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise_by_layer", 19)  # 8 batches per shard (4 chunks × 2): in shard 2, chunk 2
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg, by_layer=True)
    passes, alive = count_query_passes(monkeypatch)
    report = compute_scores(cfg, resume=True, by_layer=True)
    assert report.num_shards == 3 and report.resumed_from.startswith("shard 2, query chunk 2/4")
    assert passes == [(2, 4), (4, 6), (6, 7)] and alive == [0, 0, 0]
    passes.clear(), alive.clear()
    report = compute_scores(make_cfg(project, "one-shard", f"scores.max_memory_mb={budget}", "scores.query_chunk=2"))
    assert report.num_shards == 1 and passes == [(0, 2), (2, 4), (4, 6), (6, 7)] and alive == [0, 0, 0, 0]


def test_relative_run_stores_norms_and_matches_the_math(project):
    cfg = make_cfg(project, "relative", "scores.relative=true")
    compute_scores(cfg)
    tensors, meta = storage.load_tensors(cfg.output_path / storage.SCORES_FILE)
    assert meta["relative"] is True and tensors["train_norms"].shape == (N_TRAIN,)
    torch.testing.assert_close(tensors["scores"], in_memory_reference(cfg, relative=True))
    plain = make_cfg(project, "relative-plain")
    compute_scores(plain)
    torch.testing.assert_close(tensors["scores"] * tensors["train_norms"], all_scores(plain.output_path))


def test_self_influence_file(project):
    cfg = make_cfg(project, "self")
    report = compute_scores(cfg, self_influence=True)
    tensors, meta = storage.load_tensors(report.paths[0], storage.SELF_FORMAT)
    ctx = prepare(cfg)
    factors = load_factors(cfg.output_path / storage.FACTORS_FILE)
    ref = self_influence_scores(ctx.model, ctx.tracked, factors.layers, make_loader(ctx.dataset(cfg.data.train, "data.train"), 8))
    torch.testing.assert_close(tensors["self_influence"], ref)
    assert tensors["train_indices"].tolist() == list(range(N_TRAIN)) and tensors["train_labels"].shape == (N_TRAIN,)


def test_self_influence_stores_each_examples_training_loss(project64):
    """Beside I(x, x), each example's cross-entropy at its label, computed directly in float64; top-k --self
    --rank-by loss ranks by it, the largest first, each example keeping its self-influence."""
    cfg = make_cfg(project64, "self-loss")
    report = compute_scores(cfg, self_influence=True)
    tensors = storage.load_tensors(report.paths[0], storage.SELF_FORMAT)[0]
    data = load_file(project64[0] / "data.safetensors")
    x, y = data["inputs"][:N_TRAIN].double(), data["labels"][:N_TRAIN]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(prepare(cfg).model(x), y, reduction="none")
    assert tensors[storage.SELF_LOSSES].dtype == F64
    torch.testing.assert_close(tensors[storage.SELF_LOSSES], want, rtol=1e-12, atol=0)
    ranked = self_top_k(cfg.output_path, 5, rank_by="loss")
    order = torch.argsort(want, descending=True, stable=True)[:5].tolist()
    assert [e.train_position for e in ranked] == order and [e.rank for e in ranked] == [1, 2, 3, 4, 5]
    assert [e.loss for e in ranked] == tensors[storage.SELF_LOSSES][order].tolist()
    assert [e.score for e in ranked] == tensors["self_influence"][order].tolist()  # the self-influence, whatever ranks
    assert [e.loss for e in self_top_k(cfg.output_path, 5)] == tensors[storage.SELF_LOSSES][
        torch.argsort(tensors["self_influence"], descending=True, stable=True)[:5]
    ].tolist()


def test_identity_needs_no_factors(project):
    cfg = make_cfg(project, "identity", "factors.strategy=identity", copy_factors=False)
    report = compute_scores(cfg)
    assert report.damping == {"fc1": 0.0, "head": 0.0}
    assert storage.load_tensors(report.paths[0])[0]["scores"].shape == (N_QUERY, N_TRAIN)


@pytest.mark.parametrize(
    "change,needle",
    [
        ("missing", "no factors"),
        ("model", "another model"),
        ("train", "another training set"),
        ("strategy", "the config asks for kfac"),
        ("layers", "tracks layers"),
        ("definition", 'another model definition (model.kwargs.activation (unset) -> "tanh")'),
    ],
)
def test_mismatched_or_missing_factors_are_refused(project, change, needle):
    folder, data = project
    overrides = {
        "missing": [],
        "model": ["model.checkpoint=other.safetensors"],
        "train": ["data.train.range=[0, 40]"],
        "strategy": ["factors.strategy=kfac"],
        "layers": ["factors.modules=[head]"],
        "definition": ["model.kwargs.activation=tanh"],  # same weights and shapes, another model
    }[change]
    if change == "model":
        state = load_file(folder / "model.safetensors")
        save_file({k: v * 1.01 for k, v in state.items()}, folder / "other.safetensors")
    cfg = make_cfg(project, f"mismatch-{change}", *overrides, copy_factors=change != "missing")
    with pytest.raises(OutputError, match=re.escape(needle)) as info:
        compute_scores(cfg)
    assert "fit-factors" in info.value.hint or "factors." in info.value.hint
    assert info.value.same_on_every_rank  # under torchrun rank 0 alone prints it
    assert not (cfg.output_path / storage.SCORES_FILE).exists()


def test_a_refused_training_set_is_told_what_changed(tmp_path):
    """A factory's module counts among its files by size: an edit of it anywhere (here, a comment) refuses the
    factors and scores of the same data.train, and the refusal names the module and its sizes, as it names a
    changed setting, rather than leaving "another training set" to be guessed at."""
    from influence_cli.data import load_dataset
    from influence_cli.data.dataset import data_change

    data = write_project(tmp_path)
    (tmp_path / "rows.py").write_text(
        "from safetensors.torch import load_file\n\n\ndef load(path):\n    d = load_file(path)\n    return d['inputs'], d['labels']\n"
    )
    data["data"]["train"] = {"source": "rows:load", "kwargs": {"path": str(tmp_path / "data.safetensors")}, "range": [0, N_TRAIN]}
    cfg = config_from_dict(data, base_dir=tmp_path)
    fit_factors(cfg)
    compute_scores(cfg)
    size = (tmp_path / "rows.py").stat().st_size
    with open(tmp_path / "rows.py", "a") as fh:
        fh.write("# the same data\n")
    with pytest.raises(OutputError) as info:
        compute_scores(cfg, overwrite=True)
    assert info.value.message.endswith(
        f"was fitted on another training set than data.train; what changed: rows.py: {size:,} bytes then, {size + 16:,} now "
        "(the factory's module counts by its size: any edit of that file is taken for a change of the data)"
    ), info.value.message
    with pytest.raises(OutputError) as info:
        check_scores_match(load_scores_meta(cfg.output_path).metadata, cfg, cfg.output_path / storage.SCORES_FILE)  # as top-k checks them
    assert "holds scores computed on another data.train; what changed: rows.py:" in info.value.message, info.value.message
    fit_factors(cfg, overwrite=True)
    narrower = config_from_dict(data, ["data.train.range=[0, 30]"], base_dir=tmp_path)
    with pytest.raises(OutputError) as info:
        compute_scores(narrower)
    assert info.value.message.endswith(
        f"another training set than data.train; what changed: range: [0, {N_TRAIN}] then, [0, 30] now; {N_TRAIN} examples then, 30 now"
    ), info.value.message
    recorded = load_factors(cfg.output_path / storage.FACTORS_FILE).metadata["dataset_parts"]
    assert data_change(recorded, load_dataset(cfg.data.train, tmp_path)) == ""  # the same data: nothing to name
    assert data_change(None, load_dataset(narrower.data.train, tmp_path)) == ""  # an output written before the parts were recorded


def test_a_training_set_refused_in_factors_of_another_version_names_both_versions(project):
    """Versions may fingerprint data differently (image folders' colour mode since 0.2.0): the refusal says
    which version wrote the factors, so that an upgrade is not taken for a change of data."""
    from influence_cli import __version__

    cfg = make_cfg(project, "older-version", "data.train.range=[0, 40]")
    path = cfg.output_path / storage.FACTORS_FILE
    tensors, meta = storage.load_tensors(path)
    older = {k: v for k, v in meta.items() if k != "dataset_parts"}  # 0.1.0 recorded the fingerprint alone
    storage.save_tensors(path, tensors, older | {"tool_version": "0.1.0"})
    with pytest.raises(OutputError) as info:
        compute_scores(cfg)
    assert info.value.message.endswith(
        f"was fitted on another training set than data.train (written by influence_cli 0.1.0; this is {__version__}, "
        "and versions may fingerprint data differently)"
    ), info.value.message
    assert storage.other_version({"tool_version": __version__}) == storage.other_version({}) == ""


def test_finished_scores_are_not_replaced_without_overwrite(project):
    cfg = make_cfg(project, "existing")
    compute_scores(cfg)
    with pytest.raises(OutputError, match="already holds scores") as info:
        compute_scores(cfg)
    assert "--overwrite" in info.value.hint
    # --overwrite into a sharded layout removes the single file
    budget = 7 * 16 * 4 / 2**20
    sharded = make_cfg(project, "existing", f"scores.max_memory_mb={budget}")
    compute_scores(sharded, overwrite=True)
    assert not (cfg.output_path / storage.SCORES_FILE).exists() and (cfg.output_path / storage.SCORES_INDEX).exists()
    with pytest.raises(OutputError, match="already holds scores"):
        compute_scores(sharded)
    compute_scores(cfg, overwrite=True)
    assert (cfg.output_path / storage.SCORES_FILE).exists() and not (cfg.output_path / storage.SCORES_INDEX).exists()
    assert not list(cfg.output_path.glob("scores.shard-*"))


@pytest.mark.parametrize(
    "name,overrides,cut",
    [
        ("single", [], 3),
        ("sharded-chunked", [f"scores.max_memory_mb={7 * 16 * 4 / 2**20}", "scores.query_chunk=4"], 9),
        ("sharded-chunked-relative", [f"scores.max_memory_mb={7 * 16 * 4 / 2**20}", "scores.query_chunk=4", "scores.relative=true"], 7),
        ("relative", ["scores.relative=true", "scores.query_chunk=4"], 8),
    ],
)
def test_resume_after_interruption_is_bit_identical(project, monkeypatch, name, overrides, cut):
    ref_cfg = make_cfg(project, f"resume-ref-{name}", *overrides)
    compute_scores(ref_cfg)
    ref = all_scores(ref_cfg.output_path)
    cfg = make_cfg(project, f"resume-{name}", *overrides)
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", cut)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg)
    assert not (cfg.output_path / storage.SCORES_FILE).exists() and not (cfg.output_path / storage.SCORES_INDEX).exists()
    with pytest.raises(OutputError, match="interrupted run"):
        compute_scores(cfg)
    report = compute_scores(cfg, resume=True)
    assert report.resumed_from is not None
    assert torch.equal(all_scores(cfg.output_path), ref)
    assert not list(cfg.output_path.glob("scores.partial*"))


def _progress_writes(monkeypatch) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Records every progress file written from now on: (its name, a copy of its tensors), in order."""
    written: list[tuple[str, dict[str, torch.Tensor]]] = []
    real = storage.save_tensors

    def spy(path, tensors, metadata, **kwargs):
        if "partial" in Path(path).name:
            written.append((Path(path).name, {k: v.clone() for k, v in tensors.items()}))
        return real(path, tensors, metadata, **kwargs)

    monkeypatch.setattr(storage, "save_tensors", spy)
    return written


def test_snapshots_write_each_score_once(project, monkeypatch):
    """A pass saved after every batch (6 batches, 2 query chunks) writes each score to its progress once, in pieces
    beside a snapshot that holds none: the snapshot held every row scored so far, written again at each save (and the
    current chunk's rows copied to be written), so the saves of a range of B batches wrote about B/2 score blocks."""
    written = _progress_writes(monkeypatch)
    cfg = make_cfg(project, "saved-once", "scores.query_chunk=4")
    compute_scores(cfg)
    pieces = [t for name, t in written if ".finished" in name]
    snapshots = [t for name, t in written if ".finished" not in name]
    assert len(snapshots) == 12 and all(set(t) == {"pieces"} for t in snapshots)  # 2 chunks × 6 batches
    assert sum(t["scores"].numel() for t in pieces) == N_QUERY * N_TRAIN
    assert not list(cfg.output_path.glob("scores.partial*"))


def test_a_snapshot_that_holds_the_scores_still_resumes(project, monkeypatch):
    """A snapshot of an earlier version (the rows of the finished query chunks and the current one's columns
    so far, `rows_done` and `current`, no pieces) resumes to the same scores, and so does the run that resumed
    it when it is stopped in turn: its first save writes the scores that snapshot held to pieces (it wrote only
    those scored since, and the next resume read zeros in their place)."""
    ref = all_scores(compute_scores(make_cfg(project, "earlier-ref", "scores.query_chunk=4")).paths[0].parent)
    cfg = make_cfg(project, "earlier", "scores.query_chunk=4")
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", 8)  # chunk 2 (rows 4..7), 2 of its batches (16 columns) done
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg)
    snapshot = cfg.output_path / storage.SCORES_PARTIAL.format(rank="")
    tensors, meta = storage.load_tensors(snapshot)
    block = torch.zeros(N_QUERY, N_TRAIN)
    for piece in sorted(cfg.output_path.glob("scores.partial.finished*")):
        held, piece_meta = storage.load_tensors(piece)
        _, _, ci, c0, c1 = piece_meta["phase"].split(":")
        q0 = 4 * int(ci)
        block[q0 : q0 + len(held["scores"]), int(c0) : int(c1)] = held["scores"]
        piece.unlink()
    assert meta["phase"] == "scores:0:1" and meta["batches_done"] == 2
    del tensors["pieces"]
    storage.save_tensors(snapshot, tensors | {"rows_done": block[:4], "current": block[4:, :16]}, {k: v for k, v in meta.items() if k != "created"})
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", 2)  # 2 more batches of chunk 2, each saved
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg, resume=True)
    report = compute_scores(cfg, resume=True)
    assert report.resumed_from == "shard 0, query chunk 2/2, batch 4"
    assert torch.equal(all_scores(cfg.output_path), ref)


def test_saved_pieces_that_do_not_tile_the_scores_so_far_are_refused(project, monkeypatch):
    """The pieces a snapshot counts hold every score before where it stopped, each once, in order: one that repeats the
    scores of another (a copy under its name) or a count that stops short is refused by name, not resumed with zeros
    where the scores were."""
    cfg = make_cfg(project, "pieces-tile", "scores.query_chunk=4")
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", 8)  # chunk 2, 2 of its batches done: a piece per save
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg)
    snapshot = cfg.output_path / storage.SCORES_PARTIAL.format(rank="")
    first, second = (cfg.output_path / storage.SCORES_PARTIAL.format(rank=f".finished{i}") for i in (0, 1))
    held = second.read_bytes()
    shutil.copy(first, second)
    with pytest.raises(OutputError, match=r"finished1.safetensors' holds the scores of query chunk 1, columns 0..8 of train range 0, "
                       r"where the scores saved before it end at query chunk 1, column 8") as info:
        compute_scores(cfg, resume=True)
    assert "--overwrite" in info.value.hint
    second.write_bytes(held)
    tensors, meta = storage.load_tensors(snapshot)
    storage.save_tensors(snapshot, tensors | {"pieces": tensors["pieces"] - 1}, {k: v for k, v in meta.items() if k != "created"})
    with pytest.raises(OutputError, match=r"counts 7 score piece\(s\) that end at query chunk 2, column 8, not where it stopped "
                       r"\(query chunk 2, column 16\)"):
        compute_scores(cfg, resume=True)


def _self_partial(cfg) -> Path:
    return cfg.output_path / storage.SCORES_PARTIAL.format(rank=".self")


def _stop_self(cfg, after: int, resume: bool = False) -> None:
    """--self stopped (Ctrl-C) after `after` more batches, each saved."""
    with pytest.MonkeyPatch.context() as m:
        interrupt_after(m, "self_influence_by_layer" if cfg.scores.by_layer else "self_influence", after)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg, self_influence=True, resume=resume)


def _as_earlier_self_snapshot(partial: Path, n_train: int = N_TRAIN) -> None:
    """Rewrites --self progress (a snapshot counting the pieces saved beside it) as earlier versions saved it: one
    snapshot holding every value of the run, [..., n_train] each with zeros after those done (collected labels: the
    range's rows), and no pieces."""
    tensors, meta = storage.load_tensors(partial)
    held: dict[str, torch.Tensor] = {}
    for i in range(int(tensors["pieces"])):
        piece = partial.with_suffix(f".finished{i}.safetensors")
        got, piece_meta = storage.load_tensors(piece)
        c0, c1 = (int(v) for v in piece_meta["phase"].split(":")[3:])  # piece:<range>:0:<c0>:<c1>
        for name, t in got.items():
            if name == "labels":
                held.setdefault(name, torch.zeros(n_train, *t.shape[1:], dtype=t.dtype))[c0:c1] = t
            else:
                held.setdefault(name, torch.zeros(*t.shape[:-1], n_train, dtype=t.dtype))[..., c0:c1] = t
        piece.unlink()
    if not bool(tensors["with_predictions"]):
        held.pop("predictions", None)
    storage.save_tensors(partial, held, {k: v for k, v in meta.items() if k != "created"})


def _self_outputs(report) -> dict[str, torch.Tensor]:
    return storage.load_tensors(report.paths[0])[0]


@pytest.mark.parametrize("overrides", [[], ["scores.by_layer=true"]], ids=["values", "by-layer"])
@pytest.mark.parametrize("cuts", [[1], [4], [5], [2, 1, 2]], ids=lambda c: "stops-after-" + "-".join(map(str, c)))
def test_self_influence_resume_is_bit_identical(project, overrides, cuts):
    """--self stopped after each of `cuts` batches in turn (the last of its 6 batches is short), every stop resumed:
    every stored tensor is that of the uninterrupted run, bit for bit, and no progress is left."""
    ref = _self_outputs(compute_scores(make_cfg(project, f"self-ref-{len(overrides)}", *overrides), self_influence=True, overwrite=True))
    cfg = make_cfg(project, f"self-resume-{len(overrides)}-{'-'.join(map(str, cuts))}", *overrides)
    for i, cut in enumerate(cuts):
        _stop_self(cfg, cut, resume=i > 0)
    report = compute_scores(cfg, self_influence=True, resume=True)
    assert report.resumed_from == f"batch {sum(cuts)}"
    got = _self_outputs(report)
    assert got.keys() == ref.keys() and {"self_influence", "train_predictions", storage.SELF_LOSSES} <= set(ref)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    assert not list(cfg.output_path.glob("scores.partial*"))


def test_self_influence_progress_writes_each_value_once(project, monkeypatch):
    """--self saved after every batch (6) writes each example's values to its progress once, in pieces beside a snapshot
    that holds none: the snapshot held every value so far (self-influence, loss, prediction), written again at each save,
    so the saves of N examples wrote about N²/2 × batch size × checkpoint_every of them."""
    written = _progress_writes(monkeypatch)
    cfg = make_cfg(project, "self-saved-once")
    compute_scores(cfg, self_influence=True)
    pieces = [t for name, t in written if ".finished" in name]
    snapshots = [t for name, t in written if ".finished" not in name]
    assert len(snapshots) == len(pieces) == 6
    assert all(set(t) == {"pieces", "with_predictions", "with_losses"} and t["pieces"].numel() == 1 for t in snapshots)
    assert all(set(t) == {"values", "predictions", "losses"} for t in pieces)
    for name in ("values", "predictions", "losses"):
        assert sum(t[name].numel() for t in pieces) == N_TRAIN, name
    assert not list(cfg.output_path.glob("scores.partial*"))


@pytest.mark.parametrize("collected", [False, True], ids=["known-labels", "collected-labels"])
def test_a_self_snapshot_that_holds_the_values_still_resumes(project, monkeypatch, collected):
    """--self progress of an earlier version (the snapshot holds every value so far, no pieces) resumes to the same
    values, and so does the run that resumed it when it is stopped in turn: its first save writes the values that
    snapshot held to pieces (writing only those since, the next resume would read zeros in their place). Labels the
    dataset does not know are collected from the batches, and saved and resumed with the rest."""
    if collected:
        monkeypatch.setattr(scores_mod, "_known_labels", lambda *args: None)
    ref = _self_outputs(compute_scores(make_cfg(project, f"self-earlier-ref-{collected}"), self_influence=True))
    cfg = make_cfg(project, f"self-earlier-{collected}")
    _stop_self(cfg, 3)
    if collected:
        assert "labels" in storage.load_tensors(_self_partial(cfg).with_suffix(".finished0.safetensors"))[0]
    _as_earlier_self_snapshot(_self_partial(cfg))
    assert "values" in storage.load_tensors(_self_partial(cfg))[0] and not list(cfg.output_path.glob("*.finished*"))
    _stop_self(cfg, 2, resume=True)  # 2 more batches, each saved: the first writes the 3 earlier batches' values too
    report = compute_scores(cfg, self_influence=True, resume=True)
    assert report.resumed_from == "batch 5"
    got = _self_outputs(report)
    assert got.keys() == ref.keys() and "train_labels" in ref
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


@pytest.mark.parametrize("saved,stored", [("predictions", "train_predictions"), ("losses", storage.SELF_LOSSES)], ids=["predictions", "losses"])
def test_self_influence_progress_saved_without_predictions_resumes_without_them(project, monkeypatch, saved, stored):
    """Progress of a version that kept no predictions (or losses): the values resume, and none are stored (some would be
    0), also after the resumed run is stopped and resumed in turn (its progress says they are not kept)."""
    ref = _self_outputs(compute_scores(make_cfg(project, "self-old-progress-ref"), self_influence=True, overwrite=True))
    cfg = make_cfg(project, f"self-old-progress-{saved}")
    _stop_self(cfg, 4)
    progress = _self_partial(cfg)
    _as_earlier_self_snapshot(progress)
    tensors, meta = storage.load_tensors(progress)
    del tensors[saved]
    storage.save_tensors(progress, tensors, meta)
    _stop_self(cfg, 1, resume=True)
    report = compute_scores(cfg, self_influence=True, resume=True)
    written = _self_outputs(report)
    assert report.resumed_from == "batch 5" and stored not in written and len(written) == 4  # the other one kept
    for key in written:
        assert torch.equal(written[key], ref[key]), key


def test_saved_self_pieces_that_do_not_tile_the_values_so_far_are_refused(project):
    """The pieces a --self snapshot counts hold every value before where it stopped, each once, in order, with every
    tensor the run keeps: a piece that repeats another's examples, one short of a tensor, or a count that stops short
    is refused by name, not resumed with zeros where the values were."""
    cfg = make_cfg(project, "self-pieces-tile")
    _stop_self(cfg, 3)
    snapshot = _self_partial(cfg)
    first, second = (snapshot.with_suffix(f".finished{i}.safetensors") for i in (0, 1))
    held = second.read_bytes()
    shutil.copy(first, second)
    with pytest.raises(OutputError, match=r"finished1.safetensors' holds the self-influence values of examples 0..8 of train range 0, "
                       r"where the self-influence values saved before it end at example 8") as info:
        compute_scores(cfg, self_influence=True, resume=True)
    assert "--overwrite" in info.value.hint
    second.write_bytes(held)
    tensors, meta = storage.load_tensors(second)
    storage.save_tensors(second, {k: v for k, v in tensors.items() if k != "losses"}, {k: v for k, v in meta.items() if k != "created"})
    with pytest.raises(OutputError, match=r"finished1.safetensors' holds predictions, values, not losses, predictions, values"):
        compute_scores(cfg, self_influence=True, resume=True)
    second.write_bytes(held)
    tensors, meta = storage.load_tensors(snapshot)
    storage.save_tensors(snapshot, tensors | {"pieces": tensors["pieces"] - 1}, {k: v for k, v in meta.items() if k != "created"})
    with pytest.raises(OutputError, match=r"counts 2 self-influence piece\(s\) that end at example 16, not where it stopped \(example 24\)"):
        compute_scores(cfg, self_influence=True, resume=True)


def test_self_influence_overwrite_lets_the_saved_pieces_go(project):
    """--overwrite over stopped --self progress removes its pieces with its snapshot: stopped in turn after 1 batch, the
    new run's progress is its snapshot and its one piece, and it resumes to the values of an uninterrupted run."""
    ref = _self_outputs(compute_scores(make_cfg(project, "self-overwrite-ref"), self_influence=True))
    cfg = make_cfg(project, "self-overwrite")
    _stop_self(cfg, 4)
    assert len(list(cfg.output_path.glob("scores.partial.self.finished*"))) == 4
    with pytest.MonkeyPatch.context() as m:
        interrupt_after(m, "self_influence", 1)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg, self_influence=True, overwrite=True)
    assert sorted(p.name for p in cfg.output_path.glob("scores.partial*")) == ["scores.partial.self.finished0.safetensors", "scores.partial.self.safetensors"]
    got = _self_outputs(compute_scores(cfg, self_influence=True, resume=True))
    for key in ref:
        assert torch.equal(got[key], ref[key]), key


def test_progress_of_other_query_chunks_says_which_chunk_size_resumes_it(project, monkeypatch):
    """Only the query chunks differ (a version that sized them otherwise, or scores.query_chunk left out): the hint
    names the chunk size that resumes it."""
    cfg = make_cfg(project, "rechunked", "scores.query_chunk=2")
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", 3)
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg)
    with pytest.raises(OutputError, match=r"other settings \(query chunks") as info:
        compute_scores(make_cfg(project, "rechunked"), resume=True)
    assert info.value.hint.startswith("resume with --set scores.query_chunk=2 ")
    report = compute_scores(make_cfg(project, "rechunked", "scores.query_chunk=2"), resume=True)
    assert report.resumed_from is not None and report.query_chunks == 4


def test_overwrite_discards_interrupted_progress(project, monkeypatch):
    budget = 7 * 16 * 4 / 2**20
    cfg = make_cfg(project, "discard", f"scores.max_memory_mb={budget}", "scores.query_chunk=7")
    with monkeypatch.context() as m:
        interrupt_after(m, "pairwise", 3)  # shard 0 (2 batches) written, shard 1 in progress
        with pytest.raises(KeyboardInterrupt):
            compute_scores(cfg)
    assert list(cfg.output_path.glob("scores.shard-*"))
    report = compute_scores(cfg, overwrite=True)
    assert report.resumed_from is None and (cfg.output_path / storage.SCORES_INDEX).exists()


def test_non_finite_gradient_names_batch_and_examples(project, tmp_path):
    folder, data = project
    d = load_file(folder / "data.safetensors")
    d["inputs"][19, 2] = float("nan")
    save_file(d, tmp_path / "data.safetensors")
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    cfg = config_from_dict(data | {"output_dir": "out"}, base_dir=tmp_path)
    cfg2 = config_from_dict(data | {"output_dir": "out"}, ["factors.strategy=identity"], base_dir=tmp_path)
    with pytest.raises(NumericalError, match=r"batch 2 \(examples with global indices 19\)"):
        compute_scores(cfg2)
    with pytest.raises(NumericalError, match="19"):
        compute_scores(cfg2, self_influence=True)
    assert not (cfg.output_path / storage.SCORES_FILE).exists()


def test_non_finite_factors_are_refused_naming_the_tensor_checked_a_chunk_at_a_time(project, monkeypatch):
    """The finite check over the factors never forms a temporary the size of a factor (a 12,545-wide
    eigenbasis took 1,053 MiB more for torch.isfinite's |U| and masks): here every torch.isfinite call
    of compute-scores, factors and batches alike, sees at most 8 entries."""
    import influence_cli.factors as factors_lib

    cfg = make_cfg(project, "nonfinite_factors")
    path = cfg.output_path / storage.FACTORS_FILE
    tensors, meta = storage.load_tensors(path, storage.FACTORS_FORMAT)
    largest = max((k for k in tensors if tensors[k].is_floating_point()), key=lambda k: tensors[k].numel())
    assert tensors[largest].numel() > 8
    monkeypatch.setattr(factors_lib, "FINITE_CHUNK_ELEMENTS", 8)
    sizes: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: sizes.append(t.numel()) or real(t))
    compute_scores(cfg)
    assert sizes and max(sizes) <= 8
    for value in (float("nan"), float("inf")):
        poisoned = {k: v.clone() for k, v in tensors.items()}
        poisoned[largest].view(-1)[-1] = value
        storage.save_tensors(path, poisoned, meta)
        for self_influence in (False, True):
            with pytest.raises(NumericalError) as caught:
                compute_scores(cfg, overwrite=True, self_influence=self_influence)
            assert caught.value.message == f"{str(path)!r}: {largest} holds NaN/Inf"
            assert caught.value.hint == "refit with `influence fit-factors --overwrite`"
    storage.save_tensors(path, tensors, meta)  # replaced, as fit-factors does: not rewritten under the maps `caught` keeps
    compute_scores(cfg, overwrite=True)


def test_factors_of_another_model_are_refused_for_that_before_their_values_are_read(project, monkeypatch):
    """The match (metadata only) comes before the finite check and the copy to the kernel's dtype:
    factors of another model that also hold NaN are refused for the mismatch, the more useful
    message, without reading a page of them."""
    cfg = make_cfg(project, "foreign_factors")
    path = cfg.output_path / storage.FACTORS_FILE
    tensors, meta = storage.load_tensors(path, storage.FACTORS_FORMAT)
    poisoned = {k: v.clone() for k, v in tensors.items()}
    next(v for v in poisoned.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    storage.save_tensors(path, poisoned, {**meta, "model_fingerprint": "another"})
    read: list[list[str]] = []
    real = storage._read
    monkeypatch.setattr(storage, "_read", lambda p, keys: read.append(keys) or real(p, keys))
    with pytest.raises(OutputError, match="was fitted for another model"):
        compute_scores(cfg)
    assert read == []


def test_relative_scores_with_zero_damping_are_finite(tmp_path):
    """float32 factors hold zeros blurred by rounding (on the digits MLP, Λ* down to 1e-28 where
    dead units and the softmax have no curvature); with λ = 0 the pseudo-inverse drops them, so
    every RelatIF norm is finite (1/Λ*² overflowed to inf and NaN, and the scores were wrong)."""
    from influence_cli.config import load_config
    from influence_cli.fit import fit_factors

    digits = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    cfg = load_config(digits, [f"output_dir={tmp_path}", "scores.damping=0", "scores.relative=true", "data.query.range=[1500, 1505]"])
    fit_factors(cfg)
    compute_scores(cfg)
    tensors = storage.load_tensors(cfg.output_path / storage.SCORES_FILE)[0]
    assert bool(torch.isfinite(tensors["train_norms"]).all()) and bool((tensors["train_norms"] > 0).all())
    assert bool(torch.isfinite(tensors["scores"]).all())


def test_storage_dtype_and_overflow(project, caplog):
    cfg = make_cfg(project, "bf16", "scores.dtype=bfloat16")
    compute_scores(cfg)
    stored = storage.load_tensors(cfg.output_path / storage.SCORES_FILE)[0]["scores"]
    assert stored.dtype == torch.bfloat16
    torch.testing.assert_close(stored.float(), in_memory_reference(cfg), rtol=1e-2, atol=1e-3)
    with pytest.raises(NumericalError, match="float16 cannot hold scores up to 1e"):
        scores_mod._check_storable(torch.tensor([[1.0, -1e6]]), "float16")
    with caplog.at_level("WARNING", logger="influence_cli"):
        scores_mod._check_storable(torch.tensor([[1.0, 0.0, -1e-3]]), "float16")
        assert not caplog.records  # 0 is exact, 1e-3 a normal float16
        scores_mod._check_storable(torch.tensor([[1.0, 3e-5]]), "bfloat16")
        assert not caplog.records
        scores_mod._check_storable(torch.tensor([[1.0, -3e-5]]), "float16")
    assert "float16 stores scores below 6.1e-05 in magnitude with fewer significant digits" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        scores_mod._check_storable(torch.zeros(2, 3), "float32")
    assert "scores: every value of a block is exactly 0" in caplog.text
    with pytest.raises(NumericalError, match=r"scores: non-finite values \(query row 1, training position 0\)"):
        scores_mod._check_storable(torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]), "float32")
    with pytest.raises(NumericalError, match=r"self-influence: non-finite values \(training position 2\)"):
        scores_mod._check_storable(torch.tensor([1.0, 2.0, float("inf")]), "float32", "self-influence")


def test_a_budget_that_holds_few_queries_says_the_training_set_is_streamed_once_per_chunk(project, caplog):
    """53 weights × 4 bytes per preconditioned query: 0.0005 MB holds 2 of the 7 queries, 4 passes over the training set."""
    with caplog.at_level("WARNING", logger="influence_cli"):
        report = compute_scores(make_cfg(project, "few-queries", "scores.max_memory_mb=0.0005"))
    assert report.query_chunks == 4
    assert "holds the preconditioned gradients of 2 queries at a time (0.000202 MB each), so the training set is streamed 4 times" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="influence_cli"):
        compute_scores(make_cfg(project, "chosen-chunks", "scores.max_memory_mb=0.0005", "scores.query_chunk=2"))  # the user's choice
    assert "streamed" not in caplog.text
    bf16 = make_cfg(project, "few-bf16-queries", "scores.max_memory_mb=0.0005", "factors.amp=bfloat16", copy_factors=False)
    fit_factors(bf16)
    assert compute_scores(bf16).query_chunks == 2  # the queries are stored in bf16: 4 of them fit, not 2


@pytest.mark.parametrize("self_influence", [False, True], ids=["pairwise", "self"])
@pytest.mark.parametrize("overrides", [(), ("scores.max_memory_mb=0.001",)], ids=["single", "sharded"])
def test_resume_of_finished_scores_is_a_no_op(project, self_influence, overrides):
    """A requeued job reruns with --resume: finished scores of the same run are kept as they are."""
    name = f"noop-{int(self_influence)}-{len(overrides)}"
    cfg = make_cfg(project, name, *overrides)
    first = compute_scores(cfg, self_influence=self_influence)
    stamp = first.paths[0].stat().st_mtime_ns
    again = compute_scores(cfg, self_influence=self_influence, resume=True)
    assert again.resumed_from == "already complete" and again.paths == first.paths
    assert first.paths[0].stat().st_mtime_ns == stamp
    other_batches = compute_scores(make_cfg(project, name, *overrides, "data.batch_size=3"), self_influence=self_influence, resume=True)
    assert other_batches.resumed_from == "already complete"  # the same scores, whatever the batch size
    assert first.paths[0].stat().st_mtime_ns == stamp
    with pytest.raises(OutputError, match=r"holds (self-influence )?scores of a finished run with other settings \(damping \(scores.damping, damping_factor, damping_scope; `auto` follows the factors\)\)") as err:
        compute_scores(make_cfg(project, name, *overrides, "scores.damping=0.5"), self_influence=self_influence, resume=True)
    assert "--overwrite" in err.value.hint


@pytest.mark.parametrize(("first", "then"), [(("scores.max_memory_mb=0.001",), ()), ((), ("scores.max_memory_mb=0.001",))], ids=["sharded", "single"])
def test_resume_of_finished_scores_reports_the_layout_on_disk(project, first, then):
    """Another memory budget would plan another layout; the report describes the files there are."""
    name = f"layout-{len(first)}"
    done = compute_scores(make_cfg(project, name, *first))
    again = compute_scores(make_cfg(project, name, *then), resume=True)
    assert again.resumed_from == "already complete"
    assert (again.paths, again.sharded, again.num_shards, again.query_chunks) == (done.paths, done.sharded, done.num_shards, done.query_chunks)


def test_a_float64_checkpoint_runs_in_float64_end_to_end(tmp_path):
    """fit-factors and compute-scores on a float64 checkpoint (computed in float64, stored as the files' dtypes), close to the float32 run's."""
    from safetensors.torch import load_file as load_st

    from influence_cli.config import load_config
    from influence_cli.fit import fit_factors, load_factors

    root = Path(__file__).resolve().parents[1]
    save_file({k: v.double() for k, v in load_st(root / "sample_data" / "mlp.safetensors").items()}, tmp_path / "mlp64.safetensors")
    common = [f"output_dir={tmp_path}/64", "data.query.range=[1500, 1504]", "data.train.range=[0, 300]"]
    cfg64 = load_config(root / "configs" / "digits.yaml", [*common, f"model.checkpoint={tmp_path / 'mlp64.safetensors'}"])
    fit_factors(cfg64)
    compute_scores(cfg64)
    assert load_factors(cfg64.output_path / storage.FACTORS_FILE).metadata["model_fingerprint"] != ""
    s64 = storage.load_tensors(cfg64.output_path / storage.SCORES_FILE)[0]["scores"]
    cfg32 = load_config(root / "configs" / "digits.yaml", [*common[1:], f"output_dir={tmp_path}/32"])
    fit_factors(cfg32)
    compute_scores(cfg32)
    s32 = storage.load_tensors(cfg32.output_path / storage.SCORES_FILE)[0]["scores"]
    assert s64.dtype == torch.float32  # stored in scores.dtype
    torch.testing.assert_close(s64, s32, rtol=2e-3, atol=2e-3 * float(s32.abs().max()))


class FaintFirstLayer(nn.Module):
    """fc1's output gradient is scaled by 1e-20 (same values forward): its curvature is ~1e-42, near
    float32's underflow, as in deep squeeze-excitation layers of a random-init EfficientNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h * 1e-20 + (h * (1 - 1e-20)).detach()))


def test_curvature_near_float32_underflow_gives_finite_scores():
    """1/(Λ + λ) beyond float32's max (auto λ ~ 1e-43) multiplies the queries as a scaled inverse."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    results = []
    for dtype in (torch.float64, torch.float32):
        model, xx = FaintFirstLayer().to(dtype), x.to(dtype)
        tracked, layers = fit(model, xx, y)
        assert not torch.isfinite(layers["fc1"].inverse_eigenvalues(layer_damping(layers, "auto")["fc1"]).float()).all()
        results.append(pairwise_scores(model, tracked, layers, batches_of(xx[:2], y[:2], 2)(0), batches_of(xx, y, 4)(0)).double())
    want, got = results
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4 * float(want.abs().max()))  # float32 Λ ~ 1e-43 is subnormal: few bits


def test_factors_linked_into_another_output_dir_score_the_same(project):
    """Several query sets against one fit: each output_dir links to the fit's factors."""
    folder, _ = project
    cfg = make_cfg(project, "linked", copy_factors=False)
    (folder / "linked" / storage.FACTORS_FILE).symlink_to(folder / "out" / storage.FACTORS_FILE)
    reference = make_cfg(project, "linked-copy")
    compute_scores(cfg)
    compute_scores(reference)
    assert torch.equal(all_scores(cfg.output_path), all_scores(reference.output_path))
    assert (folder / "linked" / storage.FACTORS_FILE).is_symlink()
