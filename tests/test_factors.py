"""Float64 checks of the factors against explicit per-example autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from exact import (
    SeqModel,
    batches_of,
    dense_fisher,
    empirical_vectors,
    fisher_vectors,
    fit,
    kron_dense,
    per_example_layer_grads,
    tiny_mlp,
)
from torch import nn

from influence_cli.fit import PassPlan, compute_factors
from influence_cli.tracking import Capture, find_tracked_modules, layer_activations, tracked_grad_enabled

pytestmark = pytest.mark.usefixtures("float64_default")  # conftest.py


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (13,), generator=g)
    return x, y


def explicit_covariances(model, tracked, x, y, vectors_fn):
    """A = mean_n Σ_t a aᵀ and G = mean_n Σ_k (1/T) Σ_t g gᵀ, one example at a time."""
    a_sum = {tm.name: 0 for tm in tracked}
    g_sum = {tm.name: 0 for tm in tracked}
    for n in range(len(x)):
        with tracked_grad_enabled(tracked), Capture(tracked) as cap:
            o = model(x[n : n + 1])
            acts = cap.activations()
            vecs = vectors_fn(o, y[n : n + 1], torch.tensor([n]))
            for k in range(vecs.shape[0]):
                gs = cap.output_gradients(o, vecs[k], retain_graph=True)
                for tm in tracked:
                    g = gs[tm.name][0]
                    g_sum[tm.name] = g_sum[tm.name] + g.T @ g / g.shape[0]
        for tm in tracked:
            a = acts[tm.name][0]
            a_sum[tm.name] = a_sum[tm.name] + a.T @ a
    return {k: v / len(x) for k, v in a_sum.items()}, {k: v / len(x) for k, v in g_sum.items()}


@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_covariances_equal_explicit_expectations(data, fisher):
    x, y = data
    model = tiny_mlp()
    tracked, layers = fit(model, x, y, strategy="kfac", fisher=fisher)
    a_ref, g_ref = explicit_covariances(model, tracked, x, y, fisher_vectors("classification", fisher))
    for tm in tracked:
        torch.testing.assert_close(layers[tm.name].a_covariance, a_ref[tm.name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layers[tm.name].g_covariance, g_ref[tm.name], rtol=1e-10, atol=1e-12)


def test_mlp_activations_are_inputs_with_bias_column(data):
    x, y = data
    model = tiny_mlp()
    tracked, layers = fit(model, x, y, strategy="kfac")
    xa = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    torch.testing.assert_close(layers["0"].a_covariance, xa.T @ xa / len(x))


@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_ekfac_eigenvalues_are_fisher_diagonal_in_eigenbasis(data, fisher):
    x, y = data
    model = tiny_mlp()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher=fisher)
    grads = per_example_layer_grads(model, tracked, x, y, fisher_vectors("classification", fisher))
    for tm in tracked:
        lf = layers[tm.name]
        rotated = lf.g_eigenvectors.T @ grads[tm.name] @ lf.a_eigenvectors  # [N, K, d_out, d_in]
        expected = rotated.square().sum(dim=1).mean(dim=0)
        torch.testing.assert_close(lf.eigenvalues, expected, rtol=1e-10, atol=1e-12)
        # ... which is also the diagonal of the dense Fisher rotated into the Kronecker eigenbasis
        u = torch.kron(lf.g_eigenvectors, lf.a_eigenvectors)
        dense = dense_fisher(grads[tm.name])
        torch.testing.assert_close(lf.eigenvalues.reshape(-1), torch.diagonal(u.T @ dense @ u), rtol=1e-9, atol=1e-12)


def test_diagonal_strategy_is_mean_squared_gradient(data):
    x, y = data
    model = tiny_mlp()
    tracked, layers = fit(model, x, y, strategy="diagonal", fisher="empirical")
    grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())
    for tm in tracked:
        assert layers[tm.name].a_eigenvectors is None
        torch.testing.assert_close(layers[tm.name].eigenvalues, grads[tm.name][:, 0].square().mean(0))


def test_kfac_eigenvalues_are_products(data):
    x, y = data
    tracked, layers = fit(tiny_mlp(), x, y, strategy="kfac")
    lf = layers["2"]
    torch.testing.assert_close(lf.eigenvalues, torch.outer(lf.g_eigenvalues, lf.a_eigenvalues))
    # and A ⊗ G reassembled from the eigendecomposition is the covariance product
    torch.testing.assert_close(kron_dense(lf, 0.0), torch.kron(lf.g_covariance, lf.a_covariance), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac", "diagonal"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled", "ggn"])
def test_invariant_to_batch_size(data, strategy, fisher):
    x, y = data
    _, one = fit(tiny_mlp(), x, y, strategy=strategy, fisher=fisher, batch_size=1)
    _, many = fit(tiny_mlp(), x, y, strategy=strategy, fisher=fisher, batch_size=13)
    _, odd = fit(tiny_mlp(), x, y, strategy=strategy, fisher=fisher, batch_size=5)
    for name in one:
        torch.testing.assert_close(one[name].eigenvalues, many[name].eigenvalues)
        torch.testing.assert_close(one[name].eigenvalues, odd[name].eigenvalues)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.conv2 = nn.Conv2d(3, 2, kernel_size=2, bias=False, dilation=1)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv2(torch.relu(self.conv(x)))), 1))


def test_conv2d_factors_equal_explicit_unfold():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 6, 6, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    model = TinyCNN().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=4)
    # A from an explicit unfold of the conv input
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # [N, L, C*k*k]
    cols = torch.cat([cols, torch.ones(6, cols.shape[1], 1)], dim=2)
    a_ref = torch.einsum("nti,ntj->ij", cols, cols) / 6
    torch.testing.assert_close(layers["conv"].a_covariance, a_ref)
    # Λ* against autograd per-example gradients (which sum over positions)
    grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())
    for tm in tracked:
        lf = layers[tm.name]
        rotated = lf.g_eigenvectors.T @ grads[tm.name][:, 0] @ lf.a_eigenvectors
        torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(0), rtol=1e-10, atol=1e-12)
    # G averages over positions: explicit from the output gradient
    with tracked_grad_enabled(tracked), Capture(tracked) as cap:
        o = model(x)
        from influence_cli import task as task_lib

        gs = cap.output_gradients(o, task_lib.loss_output_gradient(o, y, "classification"), retain_graph=False)
    g1 = gs["conv"]  # [N, L, C_out]
    g_ref = torch.einsum("nto,ntp->op", g1, g1) / g1.shape[1] / 6
    torch.testing.assert_close(layers["conv"].g_covariance, g_ref)


def test_sequence_inputs_sum_over_positions():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 6, 4, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    model = SeqModel().double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="empirical", batch_size=3)
    grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())
    xa = torch.cat([x, torch.ones(7, 6, 1)], dim=2)
    torch.testing.assert_close(layers["proj"].a_covariance, torch.einsum("nti,ntj->ij", xa, xa) / 7)
    for tm in tracked:
        lf = layers[tm.name]
        rotated = lf.g_eigenvectors.T @ grads[tm.name][:, 0] @ lf.a_eigenvectors
        torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(0), rtol=1e-10, atol=1e-12)


def test_layer_called_twice_counts_as_positions():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    model = Shared().double()
    tracked, layers = fit(model, x, y, strategy="ekfac")
    grads = per_example_layer_grads(model, tracked, x, y, empirical_vectors())
    lf = layers["lin"]
    rotated = lf.g_eigenvectors.T @ grads["lin"][:, 0] @ lf.a_eigenvectors
    torch.testing.assert_close(lf.eigenvalues, rotated.square().mean(0))


def test_least_squares_ggn_is_exact():
    """For nn.Linear with loss (y − f)², A ⊗ G with the ggn Fisher is 2·XᵀX/N exactly."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, 4, generator=g)
    y = torch.randn(20, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="ggn", kind="regression", batch_size=6)
    xa = torch.cat([x, torch.ones(20, 1)], dim=1)
    exact = 2 * xa.T @ xa / 20
    torch.testing.assert_close(kron_dense(layers[""], 0.0), exact, rtol=1e-9, atol=1e-12)


def test_module_patterns_select_layers():
    model = tiny_mlp()
    assert [tm.name for tm in find_tracked_modules(model, ["2"])] == ["2"]
    from influence_cli.errors import ModelError

    with pytest.raises(ModelError, match="matches no"):
        find_tracked_modules(model, ["encoder.*"])


def test_activation_layout_matches_weight_layout():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    tm = find_tracked_modules(nn.Sequential(conv), ["*"])[0]
    x = torch.randn(2, 2, 5, 5)
    a = layer_activations(tm, x)  # [B, L, C*k*k + 1]
    w = tm.gradient_matrix(conv.weight, conv.bias)  # [C_out, C*k*k + 1]
    out = (a @ w.T).transpose(1, 2).reshape(2, 3, 5, 5)
    torch.testing.assert_close(out, conv(x))


def test_plan_resumes_from_start_batch(data):
    x, y = data
    model = tiny_mlp()
    tracked = find_tracked_modules(model, ["*"])
    make = batches_of(x, y, 4)
    assert sum(len(b[2]) for b in make(2)) == 13 - 8
    plan = PassPlan(make, 4, 13, "classification", "empirical")
    layers = compute_factors(model, tracked, "kfac", plan)
    assert layers["0"].num_examples == 13


def test_output_gradients_are_exactly_the_vector_jacobian_product():
    """Capture back-propagates Σ out·v; the result is bitwise autograd's vᵀJ with grad_outputs=v."""
    model = tiny_mlp()
    x = torch.randn(7, 5, dtype=torch.float64)
    v = torch.randn(7, 3, dtype=torch.float64)
    tracked = find_tracked_modules(model, ["*"])
    with tracked_grad_enabled(tracked), Capture(tracked) as cap:
        out = model(x)
        got = cap.output_gradients(out, v, retain_graph=True)
        outputs = [cap._outputs[tm.name][0] for tm in tracked]
        want = torch.autograd.grad(out, outputs, grad_outputs=v)
    for tm, w in zip(tracked, want, strict=True):
        assert torch.equal(got[tm.name][:, 0], w)


@pytest.mark.parametrize("width", [100, 512, 785, 1030])
def test_wide_covariances_summed_by_upper_blocks_are_exact(width):
    """A = Σ aaᵀ accumulated block-triangularly (wide layers), mirrored by `covariances`, equals the explicit sum."""
    from influence_cli.factors import CovarianceAccumulator, gram_blocks
    from influence_cli.passes import BatchGradients
    from influence_cli.tracking import TrackedModule

    blocks = gram_blocks(width)
    assert blocks[0][0] == 0 and blocks[-1][1] == width and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    assert (len(blocks) > 1) == (width >= 512)
    tm = TrackedModule("layer", nn.Identity(), "linear", width, 600, False)
    acc = CovarianceAccumulator([tm], torch.float64, torch.device("cpu"))
    g_ = torch.Generator().manual_seed(width)
    a_all, g_all = [], []
    for index in range(3):
        a = torch.randn(5, 2, width, generator=g_, dtype=torch.float64)
        g = torch.randn(5, 2, 600, generator=g_, dtype=torch.float64)
        acc.update(BatchGradients(index, torch.arange(5), torch.zeros(5), torch.zeros(5, 1), {"layer": a}, [{"layer": g}]))
        a_all.append(a)
        g_all.append(g)
    a, g = torch.cat(a_all).reshape(-1, width), torch.cat(g_all).reshape(-1, 600)
    got_a, got_g = acc.covariances("layer")
    torch.testing.assert_close(got_a, a.T @ a, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got_g, g.T @ g / 2, rtol=1e-12, atol=1e-10)


def test_a_pass_holds_one_batch_the_previous_ones_tensors_go_when_the_next_comes():
    """The consumer's loop variable (or zip's tuple) kept the previous batch's activations and gradients
    alive through the next batch's forward and backward: two batches in memory, not one."""
    import dataclasses
    import weakref

    from influence_cli.passes import stream_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    tracked = find_tracked_modules(model, ["*"])
    alive_at_forward: list[bool] = []
    refs: list[weakref.ref] = []
    model.register_forward_pre_hook(lambda *_: alive_at_forward.append(any(r() is not None for r in refs)))
    batches = [(x[i : i + 4], y[i : i + 4], torch.arange(i, i + 4)) for i in range(0, 12, 4)]
    for batch in stream_gradients(model, tracked, batches, task_kind="classification", mode="fisher", fisher="empirical"):
        refs[:] = [weakref.ref(batch.activations["0"]), weakref.ref(batch.gradients[0]["2"])]
    assert len(alive_at_forward) > 3 and not any(alive_at_forward), alive_at_forward
    assert batch.activations and batch.gradients  # the last batch keeps its tensors
    refs.clear()
    stream = stream_gradients(model, tracked, batches, task_kind="classification", mode="fisher", fisher="empirical")
    kept = [dataclasses.replace(b) for b in stream]  # a caller that keeps batches keeps its own references
    assert [b.activations["0"].shape[0] for b in kept] == [4, 4, 4] and all(b.gradients for b in kept)
    cut = list(stream_gradients(model, tracked, batches, task_kind="classification", mode="loss", max_examples=6))
    assert [len(b.global_indices) for b in cut] == [4, 2] and cut[-1].activations and cut[-1].gradients  # also when max_examples ends it


def test_pass_2_rotates_each_batch_at_once():
    """Λ* of a batch is Σ_n (U_Gᵀ G_n U_A)² from the batch's a and g rotated whole, in float32. Rotated in
    pieces it would depend on where the batch was cut: a GEMM's rows are not those of a GEMM over more
    rows (MKL: a piece of 1 example × 3 positions rounds otherwise than those rows of the batch's)."""
    from types import SimpleNamespace

    from influence_cli.factors import DiagonalAccumulator, accumulate_squared_gradients
    from influence_cli.passes import BatchGradients

    torch.manual_seed(0)
    b, t, d_in, d_out = 673, 3, 2049, 16  # a piece of 672 examples (its squares summed 84 at a time) would leave 1
    u_a, u_g = (torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float() for d in (d_in, d_out))  # column-major, as eigh's
    a, g = torch.randn(b, t, d_in, dtype=torch.float32), torch.randn(b, t, d_out, dtype=torch.float32)
    layer = SimpleNamespace(name="proj", d_in=d_in, d_out=d_out)
    acc = DiagonalAccumulator([layer], {"proj": (u_a, u_g)}, torch.float32, torch.device("cpu"))  # type: ignore[list-item]
    acc.update(BatchGradients(0, torch.arange(b), torch.zeros(b), torch.zeros(b, 4), {"proj": a}, [{"proj": g}]))
    want = torch.zeros(d_out, d_in, dtype=torch.float32)
    accumulate_squared_gradients(want, a @ u_a, g @ u_g)
    assert torch.equal(acc.sums["proj"], want)


def test_small_products_off_the_cpu_are_one_gemm():
    """A GPU pass is bound by kernel launches below `LAUNCH_BOUND_MACS`: the MNIST MLP's 785-wide A
    of a 256-example batch is one GEMM there (three blocks on the CPU), a ResNet layer's 4,609-wide
    one keeps its blocks; so do Rotation's gathers."""
    from influence_cli.factors import launch_bound

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert launch_bound(cuda, 256, 785) and not launch_bound(cpu, 256, 785)
    assert not launch_bound(cuda, 256, 4609)
    assert not launch_bound(cuda, 3, 12289)  # a wide layer's small last batch: its amp temporary would be 600 MB


def test_a_launch_bound_gram_is_one_gemm_and_a_launch_bound_rotation_one_matmul(monkeypatch):
    """With `launch_bound` true (as for small products on a GPU), add_gram_ makes one product and
    Rotation skips its gathers; both give the same results as the split routes."""
    from influence_cli import factors as factors_lib
    from influence_cli.factors import Rotation, add_gram_, mirror_

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 785, generator=g, dtype=torch.float64)
    vectors = torch.eye(600, dtype=torch.float64)
    vectors[120:, 120:], _ = torch.linalg.qr(torch.randn(480, 480, generator=g, dtype=torch.float64))
    rows = torch.randn(7, 600, generator=g, dtype=torch.float64)
    split = torch.zeros(785, 785, dtype=torch.float64)
    add_gram_(split, x, None)
    rotation = Rotation(vectors)
    assert rotation.null is not None  # 20% unit vectors: the gathers' route on the CPU
    gathered = rotation(rows)
    products = []
    add_product_ = factors_lib.add_product_
    monkeypatch.setattr(factors_lib, "add_product_", lambda acc, *args, **kw: products.append(acc.shape) or add_product_(acc, *args, **kw))
    monkeypatch.setattr(factors_lib, "launch_bound", lambda device, rows, width: True)
    whole = torch.zeros(785, 785, dtype=torch.float64)
    add_gram_(whole, x, None)
    assert products == [(785, 785)]
    torch.testing.assert_close(whole, mirror_(split), rtol=1e-12, atol=1e-10)
    rotation.rest = rotation.block = None  # the gathers' route would fail
    torch.testing.assert_close(rotation(rows), gathered, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cpu_first", [True, False])
def test_the_mirror_completes_a_gram_summed_partly_in_blocks_partly_whole(cpu_first):
    """A pass resumed on another device sums some batches in the CPU's upper blocks and some as one
    GEMM (the whole matrix): the mirror of the CPU's split gives the full sum either way."""
    from influence_cli.factors import add_gram_, mirror_

    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(40, 785, generator=g, dtype=torch.float64) for _ in range(2))
    acc = torch.zeros(785, 785, dtype=torch.float64)
    for x in (x1, x2) if cpu_first else (x2, x1):
        if x is x1:
            add_gram_(acc, x, None)  # the CPU: upper blocks only
        else:
            acc.addmm_(x.T, x)  # one GEMM, as on a GPU
    torch.testing.assert_close(mirror_(acc), x1.T @ x1 + x2.T @ x2, rtol=1e-12, atol=1e-10)
