"""The scoring GEMM in row blocks (layers without positions): the same scores as one GEMM over [B, P] gradients.

compute-scores forms a training batch's per-example gradients g ãᵀ a block of rows of
[d_out, d_in] at a time, against the matching column block of the preconditioned queries
(ScoreKernel.store_queries / pairwise). Here the blocks are made tiny (one or two rows),
so every layer is cut in many; float64 against the dense math, float32 against the unblocked pipeline.
Layers with positions form theirs a chunk of examples at a time (`GRADIENT_ELEMENTS`), here two.
"""

from __future__ import annotations

import pytest
import torch
from exact import SeqModel, batches_of, fit, tiny_mlp
from test_scores import all_scores, explicit_grads, explicit_scores, fitted, make_cfg, project  # noqa: F401 (project is a fixture)
from torch import nn

import influence_cli.kernel as kernel_mod
from influence_cli.kernel import contracts, contracts_positions, eigenbasis_cheaper, pairwise_scores, query_row_blocks, row_blocks
from influence_cli.scores import compute_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    xq = torch.randn(4, 5, generator=g, dtype=torch.float64)
    yq = torch.randint(0, 3, (4,), generator=g)
    return x, y, xq, yq


def test_row_blocks_cover_every_row_once():
    assert row_blocks(5, 3, elements=7) == [(0, 2), (2, 4), (4, 5)]
    assert row_blocks(5, 30, elements=7) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # at least one row
    assert row_blocks(4, 2, elements=100) == [(0, 4)]


def test_few_queries_are_contracted_in_large_blocks():
    assert contracts(1, 785) and contracts(784, 785) and not contracts(785, 785)
    assert query_row_blocks(1, 128, 785) == [(0, 128)]  # one block: one GEMM [128, 785] @ [785, B]
    assert query_row_blocks(1000, 128, 785) == row_blocks(128, 785)  # many queries: gradient blocks


@pytest.fixture(params=["gradient-blocks", "contracted"])
def form(request, monkeypatch):
    """Both scoring forms of layers without positions: per-example gradient blocks, or (V'a)·g."""
    monkeypatch.setattr(kernel_mod, "contracts", lambda n_query, d_in: request.param == "contracted")
    return request.param


@pytest.mark.parametrize("elements", [1, 12])
@pytest.mark.parametrize("strategy", ["ekfac", "diagonal", "identity"])
def test_blocked_scores_equal_the_dense_inverse(data, monkeypatch, strategy, elements, form):
    monkeypatch.setattr(kernel_mod, "_BLOCK_ELEMENTS", elements)
    monkeypatch.setattr(kernel_mod, "_CONTRACT_ELEMENTS", 4 * elements)  # 4 queries: `elements` entries of each per block
    x, y, xq, yq = data
    model = tiny_mlp()
    tracked, layers = fitted(model, data, strategy)
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping=0.05)
    gq, gt = explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y)
    ref = explicit_scores(layers, gq, gt, 0.05) if strategy != "identity" else sum(gq[n] @ gt[n].T for n in gq)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def test_layers_with_few_positions_and_queries_are_contracted():
    assert contracts_positions(1, 32) and contracts_positions(8, 4) and not contracts_positions(1, 64) and not contracts_positions(16, 4)


def test_the_cheaper_basis_of_a_layer_with_positions():
    """A ResNet's third stage at 32 × 32 (T = 4, 2304 → 256): the eigenbasis up to ~70 training
    examples per query; its first stage (T = 64, 576 → 64) barely ever; unknown workload: parameters."""
    assert eigenbasis_cheaper((8, 512), 4, 256, 2304) and not eigenbasis_cheaper((8, 1024), 4, 256, 2304)
    assert not eigenbasis_cheaper((8, 512), 64, 64, 576)
    assert not eigenbasis_cheaper(None, 4, 256, 2304)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()


@pytest.mark.parametrize("basis", ["parameter", "eigen"])
@pytest.mark.parametrize("rotates_vectors", [False, True], ids=["query-rotated", "vectors-rotated"])
@pytest.mark.parametrize("contracted", [False, True], ids=["formed", "contracted"])
@pytest.mark.parametrize("arch", ["conv", "sequence"])
def test_layers_with_positions_score_the_same_in_both_forms(monkeypatch, arch, contracted, rotates_vectors, basis):
    """Σ_t (V'_q a_bt)·g_bt (few queries) and ⟨V'_q, Σ_t g_bt a_btᵀ⟩, in the parameter basis (each query
    rotated into the eigenbasis as a matrix or through its vectors, and back) or in the eigenbasis
    (the training vectors rotated too): the dense scores every way."""
    monkeypatch.setattr(kernel_mod, "contracts_positions", lambda n_query, positions: contracted)
    monkeypatch.setattr(kernel_mod, "rotates_vectors", lambda positions, d_out, d_in: rotates_vectors)
    monkeypatch.setattr(kernel_mod, "eigenbasis_cheaper", lambda workload, positions, d_out, d_in: basis == "eigen")
    g = torch.Generator().manual_seed(6)
    shape = (2, 4, 4) if arch == "conv" else (6, 4)
    x, y = torch.randn(9, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    xq, yq = torch.randn(4, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    model = tiny_cnn() if arch == "conv" else SeqModel().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=3)
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping=0.05)
    ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), 0.05)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def two_conv_cnn(dtype: torch.dtype = torch.float64) -> nn.Module:
    """conv1 (P = 3·19 = 57) and conv2 (P = 2·28 = 56), 16 positions each, then a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(dtype)


def test_chunks_of_examples_are_whole_multiples_of_64_within_the_bound(monkeypatch):
    """b: the whole batch when its [B, P] fits GRADIENT_ELEMENTS, else the most multiples of 64
    examples whose [b, P] fit, at least 64."""
    t = kernel_mod._Positions(torch.zeros(300, 4, 10), torch.zeros(300, 4, 3))  # P = 30
    for elements, examples in [(30 * 64, 64), (30 * 128 - 1, 64), (30 * 200, 192), (30 * 256, 256), (30 * 299, 256), (30 * 300, 300), (30 * 63, 64), (1, 64)]:
        monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS", elements)
        assert t.chunk() == examples


@pytest.mark.parametrize("batch", [65, 100, 113])
def test_a_batch_within_the_bound_is_formed_whole(monkeypatch, batch):
    """A batch of 65 to 113 examples whose [B, P] fits the bound (113 examples' worth, as the 128/256-channel
    CNN's conv2 at 2^25) is one chunk, not 64 and a ragged rest: cutting it saves nothing within the
    bound and costs one more pass over the queries (batch 100, 244 queries: 299 against 277 ms)."""
    t = kernel_mod._Positions(torch.zeros(batch, 4, 10), torch.zeros(batch, 4, 3))  # P = 30
    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS", 30 * 113)
    assert t.chunk() == batch
    t = kernel_mod._Positions(torch.zeros(114, 4, 10), torch.zeros(114, 4, 3))
    assert t.chunk() == 64


def test_the_bound_off_the_cpu_is_the_gpu_one(monkeypatch):
    """Any device other than the CPU (CUDA, MPS; here `meta`, which allocates nothing) takes GRADIENT_ELEMENTS_GPU."""
    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS", 30 * 64)
    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS_GPU", 30 * 200)
    t = kernel_mod._Positions(torch.zeros(300, 4, 10, device="meta"), torch.zeros(300, 4, 3, device="meta"))
    assert t.chunk() == 192


def _record_formed_chunks(monkeypatch, basis: str) -> list[tuple[int, ...]]:
    """Has layers with positions form their per-example gradients (never the contracted form), in
    `basis` ("parameter" or "eigen"), and returns the list that records the shape of every buffer
    the kernel asks its scratch for."""
    monkeypatch.setattr(kernel_mod, "contracts_positions", lambda n_query, positions: False)
    monkeypatch.setattr(kernel_mod, "eigenbasis_cheaper", lambda workload, positions, d_out, d_in: basis == "eigen")
    formed: list[tuple[int, ...]] = []
    get = kernel_mod._Scratch.get

    def recording(self, shape, dtype, device):
        formed.append(shape)
        return get(self, shape, dtype, device)

    monkeypatch.setattr(kernel_mod._Scratch, "get", recording)
    return formed


@pytest.mark.parametrize("amp", ["none", "bfloat16"])
@pytest.mark.parametrize("basis", ["parameter", "eigen"])
def test_conv_gradients_are_formed_a_few_examples_at_a_time(monkeypatch, basis, amp):
    """A layer with positions forms its per-example gradients `GRADIENT_ELEMENTS` at a time, in whole
    multiples of `_CHUNK_EXAMPLES` (64; here 2): two examples of a batch of 5 (chunks of 2, 2, 1; a last batch of one at once), for the first layer
    scored (conv1: its columns are new) and a later one (conv2: added into the scores so far).
    The buffer never holds more, and the scores are those of the whole batch at once (and, in
    float64, the dense math's)."""
    formed = _record_formed_chunks(monkeypatch, basis)
    dtype = torch.float64 if amp == "none" else torch.float32
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(11, 2, 4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (11,), generator=g)
    xq, yq = torch.randn(4, 2, 4, 4, generator=g, dtype=dtype), torch.randint(0, 3, (4,), generator=g)
    model = two_conv_cnn(dtype)
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=4)

    def scores() -> torch.Tensor:
        return pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 5)(0), damping=0.05, amp=amp)

    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS", 1 << 30)
    whole = scores()
    assert [shape[0] for shape in formed] == [5, 5] * 2 + [1, 1]  # unbounded: each batch at once, conv1 then conv2
    formed.clear()
    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS", 2 * 57 + 1)
    monkeypatch.setattr(kernel_mod, "_CHUNK_EXAMPLES", 2)
    chunked = scores()
    assert [shape[0] for shape in formed] == [2, 2, 1] * 4 + [1, 1]
    assert max(shape[0] * shape[1] * shape[2] for shape in formed) <= 2 * 57 + 1
    torch.testing.assert_close(chunked, whole, rtol=1e-12 if amp == "none" else 1e-5, atol=0)
    if amp == "none":
        ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), 0.05)
        torch.testing.assert_close(chunked, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("basis", ["parameter", "eigen"])
def test_sequence_layers_are_scored_a_chunk_of_examples_at_a_time(monkeypatch, basis):
    """Linear layers applied to [B, T, d] (SeqModel: proj, P = 5·5, and head, P = 3·6; 6 positions
    each) take the same chunked path as a conv: chunks of two examples score as the dense math,
    both bases, in float64."""
    formed = _record_formed_chunks(monkeypatch, basis)
    monkeypatch.setattr(kernel_mod, "GRADIENT_ELEMENTS", 2 * 25 + 1)
    monkeypatch.setattr(kernel_mod, "_CHUNK_EXAMPLES", 2)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    xq, yq = torch.randn(4, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    model = SeqModel().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=3)
    got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), damping=0.05)
    assert [shape[0] for shape in formed] == [2, 2] * 4 + [1, 1]  # batches of 4, 4, 1: proj then head
    ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, x, y), 0.05)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("overrides", [[], ["scores.query_chunk=3"]], ids=["one-chunk", "query-chunks"])
def test_blocked_pipeline_equals_unblocked(project, monkeypatch, overrides):  # noqa: F811
    whole = make_cfg(project, "blocks-whole-" + "-".join(overrides), *overrides)
    monkeypatch.setattr(kernel_mod, "contracts", lambda n_query, d_in: False)
    monkeypatch.setattr(kernel_mod, "_BLOCK_ELEMENTS", 1 << 30)  # one block per layer: the plain GEMM
    compute_scores(whole)
    monkeypatch.setattr(kernel_mod, "contracts", contracts)  # few queries: the contracted form, in small blocks
    monkeypatch.setattr(kernel_mod, "_BLOCK_ELEMENTS", 8)  # one or two rows per block
    monkeypatch.setattr(kernel_mod, "_CONTRACT_ELEMENTS", 8)
    monkeypatch.setattr(kernel_mod, "QUERY_STEP_BYTES", 1)  # queries preconditioned and stored one row at a time
    cfg = make_cfg(project, "blocks-rows-" + "-".join(overrides), *overrides)
    compute_scores(cfg)
    expected = all_scores(whole.output_path)
    torch.testing.assert_close(all_scores(cfg.output_path), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("basis", ["parameter", "eigen"])
@pytest.mark.parametrize(("t_query", "t_train"), [(1, 4), (4, 1), (1, 1), (3, 4)])
def test_queries_and_training_data_with_different_positions(monkeypatch, t_query, t_train, basis):
    """A sequence layer's queries fix its layout (pieces and row blocks for one position, a
    [Q, P] matrix otherwise); training batches with another number of positions follow it:
    on the fit's data and on data that is nonzero where the fit's was always 0."""
    monkeypatch.setattr(kernel_mod, "eigenbasis_cheaper", lambda workload, positions, d_out, d_in: basis == "eigen")
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, t_train, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    xq, yq = torch.randn(3, t_query, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    x[:, :, 0] = 0.0  # an input the fit never sees: a deflated column, a piece of its own
    model = SeqModel().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=4)
    gq = explicit_grads(model, tracked, xq, yq)
    lit = x.clone()
    lit[:, :, 0] = 1.0
    for train_x in (x, lit):
        got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 2)(0), batches_of(train_x, y, 4)(0), damping=0.05)
        ref = explicit_scores(layers, gq, explicit_grads(model, tracked, train_x, y), 0.05)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
