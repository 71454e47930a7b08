"""Float64 checks of the deflated eigendecomposition: exactly-zero rows of A or G (blank pixels,
dead ReLU units, conv padding) get unit eigenvectors and exact zero eigenvalues, which `Rotation`
skips, without changing the factors' meaning."""

from __future__ import annotations

import pytest
import torch
from exact import fisher_vectors, fit, per_example_layer_grads
from torch import nn

from influence_cli import factors as factors_lib
from influence_cli.factors import Rotation, eigendecompose, null_rows

pytestmark = pytest.mark.usefixtures("float64_default")  # conftest.py


def psd_with_zero_rows(n: int, null: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g)
    x[:, null] = 0.0
    return x.T @ x


@pytest.mark.parametrize("null", [[], [0], [3, 7, 8, 19], list(range(20))])
def test_eigendecompose_is_exact_with_zero_rows(null):
    m = psd_with_zero_rows(20, null)
    values, vectors = eigendecompose(m)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(20), rtol=0, atol=1e-12)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(m).clamp_min(0), rtol=1e-10, atol=1e-10)
    assert bool((values[1:] >= values[:-1]).all())
    k = len(null)
    assert torch.equal(values[:k], torch.zeros(k))
    assert torch.equal(vectors[:, :k], torch.eye(20)[:, null])
    assert torch.equal(null_rows(m), torch.tensor(null, dtype=torch.long))


@pytest.mark.parametrize("k", [2, 8, 30])
def test_rotation_equals_the_full_matmul(k, monkeypatch):
    n = 32
    monkeypatch.setattr(Rotation, "MIN_WIDTH", n)  # small enough for the skipping route
    null = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k].sort().values.tolist()
    _, vectors = eigendecompose(psd_with_zero_rows(n, null))
    rotation = Rotation(vectors)
    assert rotation.deflated == k
    assert (rotation.null is not None) == (k >= Rotation.MIN_NULL_FRACTION * n)
    x = torch.randn(6, 3, n)  # not zero on the null rows: the rotation stays exact anyway
    torch.testing.assert_close(rotation(x), x @ vectors, rtol=1e-13, atol=1e-13)


def test_rotation_without_unit_columns_is_the_plain_matmul():
    vectors = torch.linalg.eigh(psd_with_zero_rows(16, [])).eigenvectors
    rotation = Rotation(vectors)
    assert rotation.null is None and rotation.deflated == 0
    x = torch.randn(5, 16)
    assert torch.equal(rotation(x), x @ vectors)


class DeadUnitMLP(nn.Sequential):
    """5 → 6 → 3 with ReLU; hidden unit 2 never fires (zero weights, negative bias)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        with torch.no_grad():
            self[0].weight[2] = 0.0
            self[0].bias[2] = -1.0


@pytest.fixture
def blank_data():
    """Inputs whose features 1 and 3 are 0 on every example (like MNIST's border pixels)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 5, generator=g)
    x[:, [1, 3]] = 0.0
    return x, torch.randint(0, 3, (17,), generator=g)


@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_ekfac_with_blank_inputs_and_a_dead_unit(blank_data, fisher):
    x, y = blank_data
    model = DeadUnitMLP()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher=fisher)
    # fc1's A has the blank inputs as null rows, fc2's A the dead unit, fc1's G the dead unit
    dead = (model[1](model[0](x)).amax(dim=0) == 0).nonzero().flatten().tolist()
    assert 2 in dead
    assert null_rows(layers["0"].a_covariance).tolist() == [1, 3]
    assert null_rows(layers["2"].a_covariance).tolist() == dead
    assert null_rows(layers["0"].g_covariance).tolist() == dead
    grads = per_example_layer_grads(model, tracked, x, y, fisher_vectors("classification", fisher))
    for tm in tracked:
        lf = layers[tm.name]
        rotated = lf.g_eigenvectors.T @ grads[tm.name] @ lf.a_eigenvectors
        torch.testing.assert_close(lf.eigenvalues, rotated.square().sum(dim=1).mean(dim=0), rtol=1e-10, atol=1e-14)


def test_deflation_does_not_change_the_preconditioner(blank_data, monkeypatch):
    """(F + λ)⁻¹ v is the same as with LAPACK's own basis of the null space, even for v that is
    not zero there (a query with a pixel the fitting data never lit)."""
    x, y = blank_data
    _, deflated = fit(DeadUnitMLP(), x, y, strategy="ekfac", fisher="ggn")
    monkeypatch.setattr(factors_lib, "null_rows", lambda m: torch.zeros(0, dtype=torch.long))  # LAPACK's basis
    _, plain = fit(DeadUnitMLP(), x, y, strategy="ekfac", fisher="ggn")
    v = {"0": torch.randn(4, 6, 6), "2": torch.randn(4, 3, 7)}
    for name, lf in deflated.items():
        damping = lf.damping("auto")
        assert damping == pytest.approx(plain[name].damping("auto"), rel=1e-12)
        torch.testing.assert_close(lf.precondition(v[name], damping), plain[name].precondition(v[name], damping), rtol=1e-9, atol=1e-9)


def test_conv_patches_that_are_mostly_padding_are_deflated():
    """A 3×3 conv on a 1×1 feature map (a ResNet's last stage at 32×32 inputs) sees only its
    centre tap: 8 of 9 patch columns are zero on every example. LAPACK's eigh can fail to
    converge on such a matrix at scale; deflated, only the centre tap's block is decomposed."""
    from influence_cli.factors import CovarianceAccumulator
    from influence_cli.passes import stream_gradients
    from influence_cli.tracking import find_tracked_modules

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Flatten(), nn.Linear(3, 2)).double()
    x, y = torch.randn(10, 4, 1, 1), torch.randint(0, 2, (10,))
    tracked = find_tracked_modules(model, ["*"])
    cov = CovarianceAccumulator(tracked, torch.float64, torch.device("cpu"))
    for batch in stream_gradients(model, tracked, [(x, y, torch.arange(10))], task_kind="classification", mode="fisher", fisher="empirical", seed=0):
        cov.update(batch)
    a_cov, _ = cov.covariances("0")
    assert len(null_rows(a_cov)) == 8 * 4  # every input channel's 8 off-centre taps
    values, vectors = eigendecompose(a_cov)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, a_cov, rtol=1e-12, atol=1e-12)


def test_when_eigh_does_not_converge_the_svd_gives_the_eigendecomposition(monkeypatch):
    m = psd_with_zero_rows(12, [])
    expected = torch.linalg.eigvalsh(m)

    def fail(*_, **__):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    values, vectors = eigendecompose(m)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(12), rtol=0, atol=1e-12)


def test_an_eigendecomposition_that_fails_is_a_one_line_numerical_error(monkeypatch):
    from influence_cli.errors import NumericalError
    from influence_cli.factors import kronecker_layer_factors

    def fail(*_, **__):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    monkeypatch.setattr(torch.linalg, "svd", fail)
    with pytest.raises(NumericalError, match=r"layer 'fc1'.s A \(3×3\) did not converge"):
        kronecker_layer_factors("fc1", torch.eye(3), torch.eye(2), 10, torch.float64)


class GatedUnitMLP(nn.Sequential):
    """5 → 6 → 3 with ReLU; hidden unit 2 reads only input 1 (blank in the fitting data), so it is
    dead on the fit and alive on inputs where feature 1 is lit."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        with torch.no_grad():
            self[0].weight[2] = torch.tensor([0.0, 3.0, 0.0, 0.0, 0.0])
            self[0].bias[2] = -0.5


@pytest.mark.parametrize("n_query", [3, 9])  # fewer queries than d_in (the contracted form), and more
def test_scores_skip_the_deflated_rows_and_columns_and_stay_exact(blank_data, n_query):
    """compute-scores splits a layer's gradient into its support and the deflated rows (units dead
    on the fit) and columns (inputs blank on the fit): on the fit's own examples the deflated pieces
    are 0 and skipped; on other examples (feature 1 lit, unit 2 alive) they are scored."""
    from test_scores import explicit_grads, explicit_scores

    from influence_cli.factors import layer_damping
    from influence_cli.kernel import ScoreKernel, pairwise_scores
    from influence_cli.passes import stream_gradients

    x, y = blank_data
    model = GatedUnitMLP()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical")
    g = torch.Generator().manual_seed(5)
    other = torch.randn(11, 5, generator=g).abs(), torch.randint(0, 3, (11,), generator=g)
    xq, yq = torch.randn(n_query, 5, generator=g), torch.randint(0, 3, (n_query,), generator=g)
    damping = layer_damping(layers, "auto")
    kernel = ScoreKernel(layers, damping)
    for train, skipped in ((blank_data, True), (other, False)):
        batch = next(stream_gradients(model, tracked, [(train[0], train[1], torch.arange(len(train[0])))], task_kind="classification", mode="loss"))
        grads = kernel.gradients(batch)
        assert [p.support for p in kernel.pieces["0"]] == [True, False, False]  # fc1: unit 2 dead, inputs 1 and 3 blank
        assert all((entry is None) == skipped for entry in grads["0"][1:])
        got = pairwise_scores(model, tracked, layers, [(xq, yq, torch.arange(n_query))], [(train[0][:6], train[1][:6], torch.arange(6)), (train[0][6:], train[1][6:], torch.arange(6, len(train[0])))])
        ref = explicit_scores(layers, explicit_grads(model, tracked, xq, yq), explicit_grads(model, tracked, *train), "auto")
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [0, 1, 5, 9, 10])
def test_deflated_columns_counts_the_leading_unit_vectors_across_chunks(k):
    from influence_cli.factors import deflated_columns

    n = 10
    vectors = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(k)))[0]
    vectors[:, :k] = 0.0
    vectors[torch.arange(k), torch.arange(k)] = -1.0 if k % 2 else 1.0
    if k < n:
        vectors[0, k] = 1.0  # a ±1 entry alone does not make a unit vector: the others are nonzero
    assert deflated_columns(vectors, chunk=3) == k
    assert deflated_columns(vectors) == k


def test_pieces_cover_the_matrix_once():
    """Support + deflated rows + deflated columns tile [d_out, d_in] exactly, whatever k_g and k_a."""
    from influence_cli.kernel import _pieces

    for d_out, d_in, k_g, k_a in [(6, 7, 1, 2), (6, 7, 0, 3), (6, 7, 2, 0), (6, 7, 6, 0), (6, 7, 0, 7), (64, 64, 0, 0), (64, 64, 0, 1)]:
        pieces = _pieces(d_out, d_in, k_g, k_a)
        cover = torch.zeros(d_out, d_in, dtype=torch.int64)
        for p in pieces:
            cover[p.rows, p.cols] += 1
        assert torch.equal(cover, torch.ones_like(cover)), (d_out, d_in, k_g, k_a)
        assert sum(p.support for p in pieces) <= 1
    assert len(_pieces(128, 128, 0, 1)) == 1  # a sliver under 1/64 of the layer is not worth a split
