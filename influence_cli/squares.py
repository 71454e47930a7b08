"""Sums of squared per-example gradients, without forming the gradients where that is cheaper.

A tracked layer's gradient on one example is G = Σ_t g_t a_tᵀ (d_out × d_in) over its T
positions (tracking.py). Pass 2 of EKFAC needs Σ_n G_n² (elementwise), and self-influence,
RelatIF and the spectrum need per-example weighted sums Σ_ij W_ij G_ij². Forming every G_n is
memory-bound when T is small: a conv layer late in a network has a few positions but a large
d_out × d_in, so each example writes, squares and re-reads megabytes for a few flops per entry.
Two exact routes avoid that:

- **pairs** (T ≤ `PAIR_MAX_POSITIONS`): G_ij² = Σ_{t,s} (g_ti g_si)(a_tj a_sj), so with one row
  per example and position pair t ≤ s (off-diagonal pairs counted twice),
  P = [w_ts g_t ⊙ g_s] and Q = [a_t ⊙ a_s], Σ_n G_n² = Pᵀ Q is a single GEMM and
  Σ_ij W_ij G_n,ij² = Σ_pairs (P W) ⊙ Q. With T = 1 it is the one-matmul form (g²)ᵀ(a²) of
  George et al. (2018).
- **bmm** (more positions): G_n formed by bmm in cache-sized chunks, squared in place.

Both are exact in exact arithmetic; the pairs sum has cancelling cross terms, so it runs in the
accumulator's precision (float32 or float64), and results are clamped at 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from influence_cli.tracking import per_example_gradients

PAIR_MAX_POSITIONS = 6
_CHUNK_ELEMENTS = 1 << 20  # per-example gradients formed at once on the bmm route (4 MiB in float32)


def add_squared_gradients_(acc: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> None:
    """acc [d_out, d_in] += Σ_n (Σ_t g_nt a_ntᵀ)² for a [B, T, d_in], g [B, T, d_out], in acc's dtype."""
    b, t, d_in = a.shape
    d_out = g.shape[2]
    a, g = a.to(acc.dtype), g.to(acc.dtype)
    if t == 1:
        acc.addmm_(g[:, 0].square().T, a[:, 0].square())
        return
    if t <= PAIR_MAX_POSITIONS:
        step = max(1, _CHUNK_ELEMENTS // (t * (t + 1) // 2 * (d_in + d_out)))
        for s in range(0, b, step):
            gg, aa = position_pairs(a[s : s + step], g[s : s + step])
            acc.addmm_(gg.reshape(-1, d_out).T, aa.reshape(-1, d_in))
        return
    for squares in _squared_gradients(a, g):
        acc.add_(squares.sum(dim=0))


def weighted_squares(a: torch.Tensor, g: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Σ_ij w[i, k, j] (Σ_t g_t a_tᵀ)_ij² per example and k: [B, K].

    a [B, T, d_in], g [B, T, d_out]; w [d_out, K, d_in] (K sets of weights, e.g. the inverse
    curvature or 0/1 masks of spectral bands) or None for the plain squared norm (K = 1).
    """
    b, t, d_in = a.shape
    d_out = g.shape[2]
    if w is None:
        return _square_norms(a, g)[:, None]
    k = w.shape[1]
    dtype = torch.promote_types(a.dtype, w.dtype)
    a, g, w = a.to(dtype), g.to(dtype), w.to(dtype)
    parts = []
    if t <= PAIR_MAX_POSITIONS:
        n_pairs = t * (t + 1) // 2
        flat = w.reshape(d_out, k * d_in)
        step = max(1, _CHUNK_ELEMENTS // max(1, n_pairs * k * d_in))
        for s in range(0, b, step):
            gg, aa = position_pairs(a[s : s + step], g[s : s + step])
            c = gg.shape[0]
            per = (gg.reshape(-1, d_out) @ flat).view(c * n_pairs, k, d_in)  # [c·pairs, K, d_in]
            parts.append(torch.bmm(per, aa.reshape(-1, d_in, 1)).view(c, n_pairs, k).sum(dim=1))
    else:
        flat = w.permute(0, 2, 1).reshape(d_out * d_in, k)
        parts += [squares.reshape(squares.shape[0], -1) @ flat for squares in _squared_gradients(a, g)]
    return torch.cat(parts).clamp_min(0)


def position_pairs(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [B, pairs, d_out], Q [B, pairs, d_in]) over position pairs t ≤ s: P = w g_t ⊙ g_s, Q = a_t ⊙ a_s, w = 2 off the diagonal."""
    t = a.shape[1]
    i, j = torch.triu_indices(t, t, device=a.device)
    weight = torch.where(i == j, 1.0, 2.0).to(g.dtype)
    return g[:, i] * g[:, j] * weight[:, None], a[:, i] * a[:, j]


def _square_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t a_tᵀ‖² per example [B] = Σ_{t,s} (g_t·g_s)(a_t·a_s): T² (d_in + d_out) flops instead of T d_in d_out."""
    b, t, d_in = a.shape
    d_out = g.shape[2]
    if t * (d_in + d_out) <= d_in * d_out:  # Gram matrices of the positions, [chunk, T, T] each
        step = _bmm_step(t * t)
        parts = [
            (torch.bmm(g[s : s + step], g[s : s + step].transpose(1, 2)) * torch.bmm(a[s : s + step], a[s : s + step].transpose(1, 2))).sum((1, 2))
            for s in range(0, b, step)
        ]
        return torch.cat(parts).clamp_min(0)
    return torch.cat([squares.sum((1, 2)) for squares in _squared_gradients(a, g)])


def _squared_gradients(a: torch.Tensor, g: torch.Tensor) -> Iterator[torch.Tensor]:
    """(Σ_t g_t a_tᵀ)² elementwise, [c, d_out, d_in] for each cache-sized chunk of c examples (the bmm route)."""
    step = _bmm_step(g.shape[2] * a.shape[2])
    for s in range(0, a.shape[0], step):
        yield per_example_gradients(a[s : s + step], g[s : s + step]).square_()


def _bmm_step(per_example: int) -> int:
    return max(1, _CHUNK_ELEMENTS // per_example)
