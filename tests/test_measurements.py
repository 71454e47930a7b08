"""The query measurements and the tasks' losses and Fisher kinds against ground truth (float64).

- margin: its value and gradient against the log-odds of the label;
- the Fisher kinds of a regression: the sampled targets are N(f, ½), independent per output and
  the same whatever the number of outputs, so the sampled Fisher has the `ggn` one's expectation
  2·I; the empirical one uses the real targets;
- least squares with K outputs: the `ggn` Fisher is 2·I ⊗ XᵀX/N, which K-FAC and EKFAC hold exactly;
- scores do not depend on the batch sizes of the fit, the queries or the training set;
- a small classifier retrained without each of a few examples (L-BFGS to convergence, L2 on the
  mean loss): removing x changes the query's loss, and minus its margin, by about +score/N.
"""

from __future__ import annotations

import pytest
import torch
from exact import batches_of, fit, tiny_mlp
from torch import nn
from torch.func import functional_call

from influence_cli import task as task_lib
from influence_cli.kernel import pairwise_scores

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- margin


def test_margin_is_the_log_odds_of_the_label_smooth_at_ties():
    """margin = z_y − log Σ_{k≠y} exp z_k = log(p_y / (1 − p_y)); its gradient (of minus the margin)
    is −e_y + softmax of the other logits, also where the other logits tie (no kink, unlike the
    largest other logit); with two classes it is z_y − z_other."""
    z = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0], [5.0, -1.0, -1.0], [0.5, -2.0, 4.0]], dtype=F64)
    y = torch.tensor([0, 0, 0, 1])
    minus_margin = task_lib.per_example_measurement(z, y, "classification", "margin")
    p_y = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(-minus_margin, torch.log(p_y / (1 - p_y)), rtol=1e-12, atol=1e-12)
    others = torch.softmax(z.scatter(1, y[:, None], float("-inf")), 1)
    want = others - nn.functional.one_hot(y, 3).to(F64)
    torch.testing.assert_close(task_lib.loss_output_gradient(z, y, "classification", "margin"), want, rtol=1e-12, atol=1e-15)
    two = torch.tensor([[0.3, 0.3], [4.0, -2.0]], dtype=F64)
    torch.testing.assert_close(task_lib.per_example_measurement(two, torch.tensor([1, 0]), "classification", "margin"), torch.tensor([0.0, -6.0], dtype=F64))
    # a confident float32 prediction: the loss gradient vanishes, the margin's does not
    confident = torch.tensor([[30.0, -30.0, -31.0]])
    grad = task_lib.loss_output_gradient(confident, torch.tensor([0]), "classification", "margin")
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.7310586, 0.2689414]]))


# ----------------------------------------------------------------------------- Fisher kinds


def test_sampled_regression_targets_are_gaussian_with_variance_half():
    """y ~ N(f, ½): the gradient 2(f − y) then has covariance 2·I, the `ggn` Fisher's output Hessian."""
    n, k = 200_000, 3
    f = torch.linspace(-2, 2, n * k, dtype=F64).reshape(n, k)
    noise = task_lib.sample_targets(f, f, torch.arange(n), "regression", seed=5) - f
    assert abs(float(noise.mean())) < 5 * (0.5 / (n * k)) ** 0.5
    cov = torch.cov(noise.T)
    torch.testing.assert_close(cov, 0.5 * torch.eye(k, dtype=F64), rtol=0, atol=5 * 0.5 * (2 / n) ** 0.5)
    assert abs(float(noise.pow(4).mean() / 0.25) - 3) < 0.05  # E[z⁴] = 3 for a standard normal z
    # independent entries, not only uncorrelated ones: their squares are uncorrelated too (entries
    # sharing a uniform number have uncorrelated values but squares correlated by about 0.06)
    squares = torch.corrcoef(noise.square().T)
    assert float((squares - torch.eye(k, dtype=F64)).abs().max()) < 5 / n**0.5, squares
    # an entry's draw does not depend on how many entries the example has
    wider = task_lib.sample_targets(torch.zeros(n, k + 2, dtype=F64), f, torch.arange(n), "regression", seed=5)
    torch.testing.assert_close(wider[:, :k], noise, rtol=0, atol=1e-14)
    g = task_lib.fisher_output_vectors(f, f, torch.arange(n), "regression", "sampled", 5)[0]
    torch.testing.assert_close(g.T @ g / n, 2 * torch.eye(k, dtype=F64), rtol=0, atol=0.05)
    s = task_lib.fisher_output_vectors(f[:4], f[:4], torch.arange(4), "regression", "ggn", 5)  # [K, B, K]
    torch.testing.assert_close(torch.einsum("kbi,kbj->bij", s, s), 2 * torch.eye(k, dtype=F64).expand(4, k, k))


def test_sampled_class_labels_follow_the_softmax():
    n = 200_000
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0], dtype=F64).expand(n, 4)
    drawn = task_lib.sample_targets(logits, torch.zeros(n, dtype=torch.long), torch.arange(n), "classification", seed=3)
    p = torch.softmax(logits[0], 0)
    freq = torch.bincount(drawn, minlength=4).to(F64) / n
    assert bool(((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all()), (freq, p)


@pytest.mark.parametrize("fisher", ["ggn", "sampled", "empirical"])
def test_regression_fisher_kinds_of_a_linear_layer(fisher):
    """G of one Linear layer with 3 outputs: 2·I (ggn), about 2·I (sampled, N = 4000), and
    4·E[r rᵀ] of the real residuals r = f − y (empirical)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4000, 3, generator=g, dtype=F64), 3 * torch.randn(4000, 3, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = nn.Linear(3, 3).double()
    _, layers = fit(model, x, y, strategy="kfac", fisher=fisher, kind="regression", batch_size=500)
    got = layers[""].g_covariance
    if fisher == "empirical":
        with torch.no_grad():
            r = model(x) - y
        torch.testing.assert_close(got, 4 * r.T @ r / len(x), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got, 2 * torch.eye(3, dtype=F64), rtol=0, atol=1e-12 if fisher == "ggn" else 0.2)


# ----------------------------------------------------------------------------- least squares, K outputs


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_least_squares_with_three_outputs_ggn_is_exact(strategy):
    """Σ_k (f_k − y_k)² of a Linear layer: Gauss-Newton 2·I_K ⊗ XᵀX/N (X with a ones column), a
    Kronecker product, so both strategies give ∇L(z)ᵀ (GN + λ)⁻¹ ∇L(x) to float precision."""
    g = torch.Generator().manual_seed(6)
    n, d, k = 40, 4, 3
    x, y = torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, k, generator=g, dtype=F64)
    xq, yq = torch.randn(5, d, generator=g, dtype=F64), torch.randn(5, k, generator=g, dtype=F64)
    torch.manual_seed(0)
    model = nn.Linear(d, k).double()
    xa, xqa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1), torch.cat([xq, torch.ones(5, 1, dtype=F64)], 1)
    with torch.no_grad():  # ∇W of Σ_k (f_k − y_k)² is 2 (f − y) [x, 1]ᵀ, row-major vec of [k, d + 1]
        gt = torch.einsum("nk,nd->nkd", 2 * (model(x) - y), xa).reshape(n, -1)
        gq = torch.einsum("nk,nd->nkd", 2 * (model(xq) - yq), xqa).reshape(5, -1)
    gn = torch.kron(2 * torch.eye(k, dtype=F64), xa.T @ xa / n)
    tracked, layers = fit(model, x, y, strategy=strategy, fisher="ggn", kind="regression", batch_size=7)
    for damping in (0.0, 0.01):
        got = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x, y, 4)(0), task_kind="regression", damping=damping)
        closed = gq @ torch.linalg.solve(gn + damping * torch.eye(len(gn), dtype=F64), gt.T)
        torch.testing.assert_close(got, closed, rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- batch sizes


@pytest.mark.parametrize(
    "kind,measurement,fisher",
    [("classification", "loss", "sampled"), ("classification", "margin", "ggn"), ("regression", "loss", "sampled"), ("regression", "loss", "empirical")],
)
def test_scores_do_not_depend_on_batch_sizes(kind, measurement, fisher):
    """Per-example losses are never averaged over a batch and F is a mean over examples: the
    batch sizes of the fit, of the queries and of the training set leave every score as it is."""
    g = torch.Generator().manual_seed(11)
    x, xq = torch.randn(23, 5, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
    if kind == "classification":
        y, yq = torch.randint(0, 3, (23,), generator=g), torch.randint(0, 3, (6,), generator=g)
    else:
        y, yq = torch.randn(23, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    model = tiny_mlp()
    runs = []
    for fit_bs, query_bs, train_bs in ((1, 1, 1), (7, 4, 5), (23, 6, 23)):
        tracked, layers = fit(model, x, y, strategy="ekfac", fisher=fisher, kind=kind, batch_size=fit_bs)
        runs.append(
            pairwise_scores(
                model, tracked, layers, batches_of(xq, yq, query_bs)(0), batches_of(x, y, train_bs)(0), task_kind=kind, measurement=measurement
            )
        )
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- leave-one-out retraining


def test_leaving_an_example_out_of_a_classifier_changes_the_query_by_plus_score_over_n():
    """A tanh MLP (4-6-3) trained to convergence on the mean cross-entropy + (wd/2)‖θ‖², then
    retrained without each of 12 examples. The exact influence ∇m(z)ᵀ H⁻¹ ∇L(x) / N, H the Hessian
    of that objective, predicts the change of the query's loss and of minus its margin (m) almost
    exactly; EKFAC with the `ggn` Fisher and `scores.damping` = wd, block-diagonal and Kronecker-factored,
    keeps the sign and the ranking of the large changes."""
    n, nq, wd = 150, 6, 0.03
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n + nq, 4, generator=g, dtype=F64)
    ys = (xs @ torch.randn(4, 3, generator=g, dtype=F64) + 0.8 * torch.randn(n + nq, 3, generator=g, dtype=F64)).argmax(1)
    x, y, xq, yq = xs[:n], ys[:n], xs[n:], ys[n:]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    shapes = {name: p.shape for name, p in model.named_parameters()}

    def params(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(theta, [s.numel() for s in shapes.values()])
        return {name: c.reshape(shape) for (name, shape), c in zip(shapes.items(), chunks, strict=True)}

    def objective(theta: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        losses = task_lib.per_example_loss(functional_call(model, params(theta), (x,)), y, "classification")
        return (weights * losses).sum() / n + 0.5 * wd * theta.square().sum()

    def train(start: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        theta = start.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], max_iter=2000, tolerance_grad=1e-13, tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(theta, weights)
            value.backward()
            return value

        for _ in range(3):
            opt.step(closure)
        assert float(torch.autograd.grad(objective(theta, weights), theta)[0].norm()) < 1e-7
        return theta.detach()

    every = torch.ones(n, dtype=F64)
    theta = train(torch.cat([p.detach().flatten() for p in model.parameters()]), every)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params(theta).values(), strict=True):
            p.copy_(v)
    removed = list(range(12))
    retrained = [train(theta, every.index_fill(0, torch.tensor([r]), 0.0)) for r in removed]
    hessian = torch.autograd.functional.hessian(lambda t: objective(t, every), theta)
    train_grads = torch.func.vmap(
        torch.func.grad(lambda t, xi, yi: task_lib.per_example_loss(functional_call(model, params(t), (xi[None],)), yi[None], "classification").sum()),
        in_dims=(None, 0, 0),
    )(theta, x[removed], y[removed])
    tracked, layers = fit(model, x, y, strategy="ekfac", fisher="ggn", batch_size=32)
    for measurement in ("loss", "margin"):

        def measured(t: torch.Tensor, measurement=measurement) -> torch.Tensor:
            return task_lib.per_example_measurement(functional_call(model, params(t), (xq,)), yq, "classification", measurement)

        actual = torch.stack([measured(t) - measured(theta) for t in retrained], 1)  # [nq, 12]
        query_grads = torch.autograd.functional.jacobian(measured, theta)  # [nq, P]
        exact = query_grads @ torch.linalg.solve(hessian, train_grads.T) / n
        tool = pairwise_scores(model, tracked, layers, batches_of(xq, yq, 3)(0), batches_of(x[removed], y[removed], 5)(0), damping=wd, measurement=measurement) / n
        assert _pearson(exact, actual) > 0.99, measurement
        big = actual.abs() >= actual.abs().median()
        assert torch.equal(torch.sign(exact[big]), torch.sign(actual[big])), measurement
        assert _pearson(tool, actual) > 0.85, measurement
        assert float((torch.sign(tool[big]) == torch.sign(actual[big])).double().mean()) >= 0.85, measurement
