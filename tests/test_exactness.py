"""EKFAC / K-FAC influence against exact influence with the dense Gauss-Newton matrix (float64).

The dense GGN of a tiny MLP, G = E_n Σ_k (J_nᵀ s_nk)(J_nᵀ s_nk)ᵀ over *all* parameters, gives the
exact influence ∇L(z)ᵀ (G + λI)⁻¹ ∇L(x). The approximations lose two things: the cross-layer
blocks (block-diagonal) and, within a block, the Kronecker structure. Agreement rises with
damping, since damping pulls every method towards the gradient dot product. The floors below
are what the methods achieve here; `python tests/test_exactness.py` prints the table kept in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import pytest
import torch
from exact import empirical_vectors, fisher_vectors, fit, per_example_layer_grads, tiny_mlp

DAMPINGS = (1e-3, 1e-2, 1e-1)
# Pearson correlation floors with the exact dense-GGN influence, per (method, relative damping).
FLOORS = {
    ("ekfac", 1e-3): 0.65, ("ekfac", 1e-2): 0.75, ("ekfac", 1e-1): 0.93,
    ("kfac", 1e-3): 0.64, ("kfac", 1e-2): 0.74, ("kfac", 1e-1): 0.93,
    ("block-exact", 1e-3): 0.80, ("block-exact", 1e-2): 0.81, ("block-exact", 1e-1): 0.95,
}


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def influence_table(n_train: int = 96, n_query: int = 12, seed: int = 0) -> dict[tuple[str, float], float]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n_train + n_query, 5, generator=g)
        w_true = torch.randn(5, 3, generator=g)
        y = (x @ w_true + 0.5 * torch.randn(n_train + n_query, 3, generator=g)).argmax(1)
        model = tiny_mlp(d_in=5, hidden=6, d_out=3, seed=seed)
        xt, yt, xq, yq = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        tracked, ekfac = fit(model, xt, yt, strategy="ekfac", fisher="ggn", batch_size=32)
        _, kfac = fit(model, xt, yt, strategy="kfac", fisher="ggn", batch_size=32)
        ggn_grads = per_example_layer_grads(model, tracked, xt, yt, fisher_vectors("classification", "ggn"))
        flat = torch.cat([ggn_grads[tm.name].flatten(2) for tm in tracked], dim=2)  # [N, K, P]
        dense = torch.einsum("nkp,nkq->pq", flat, flat) / n_train
        sizes = [tm.num_params for tm in tracked]
        train = per_example_layer_grads(model, tracked, xt, yt, empirical_vectors())
        query = per_example_layer_grads(model, tracked, xq, yq, empirical_vectors())
        tr = torch.cat([train[tm.name][:, 0].flatten(1) for tm in tracked], dim=1)  # [N, P]
        qu = torch.cat([query[tm.name][:, 0].flatten(1) for tm in tracked], dim=1)  # [Q, P]
        scale = float(torch.diagonal(dense).mean())
        table = {}
        for rel in DAMPINGS:
            lam = rel * scale
            exact = qu @ torch.linalg.solve(dense + lam * torch.eye(dense.shape[0]), tr.T)
            blocks = torch.block_diag(*[b for b in _diag_blocks(dense, sizes)])
            table[("block-exact", rel)] = _pearson(qu @ torch.linalg.solve(blocks + lam * torch.eye(len(blocks)), tr.T), exact)
            for name, layers in (("ekfac", ekfac), ("kfac", kfac)):
                pre = torch.cat(
                    [layers[tm.name].precondition(query[tm.name][:, 0], lam).flatten(1) for tm in tracked], dim=1
                )
                table[(name, rel)] = _pearson(pre @ tr.T, exact)
        return table
    finally:
        torch.set_default_dtype(old)


def _diag_blocks(dense: torch.Tensor, sizes: list[int]):
    start = 0
    for s in sizes:
        yield dense[start : start + s, start : start + s]
        start += s


@pytest.fixture(scope="module")
def table():
    return influence_table()


@pytest.mark.parametrize("method", ["ekfac", "kfac", "block-exact"])
@pytest.mark.parametrize("damping", DAMPINGS, ids=lambda d: f"damping={d:g}")
def test_correlation_with_exact_influence(table, method, damping):
    assert table[(method, damping)] >= FLOORS[(method, damping)], table


def test_agreement_rises_with_damping(table):
    for method in ("ekfac", "kfac"):
        values = [table[(method, d)] for d in DAMPINGS]
        assert values == sorted(values), (method, values)


def test_ekfac_at_least_as_close_as_kfac(table):
    for d in DAMPINGS:
        assert table[("ekfac", d)] >= table[("kfac", d)] - 1e-3, table


if __name__ == "__main__":
    t = influence_table()
    print("| method | " + " | ".join(f"λ = {d:g}·mean diag" for d in DAMPINGS) + " |")
    print("|---|" + "---:|" * len(DAMPINGS))
    for m in ("ekfac", "kfac", "block-exact"):
        print(f"| {m} | " + " | ".join(f"{t[(m, d)]:.4f}" for d in DAMPINGS) + " |")
