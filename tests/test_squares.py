"""Float64 checks of squares.py against per-example gradients formed explicitly, on both routes
(position pairs, bmm) and across chunk boundaries."""

from __future__ import annotations

import pytest
import torch

from influence_cli import squares
from influence_cli.squares import PAIR_MAX_POSITIONS, add_squared_gradients_, weighted_squares


def explicit(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, d_out, d_in] per-example gradients, one example at a time."""
    return torch.stack([g[n].T @ a[n] for n in range(len(a))])


def inputs(t: int, b: int = 11, d_in: int = 7, d_out: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, d_in, generator=gen, dtype=torch.float64), torch.randn(b, t, d_out, generator=gen, dtype=torch.float64)


POSITIONS = [1, 2, 3, PAIR_MAX_POSITIONS, PAIR_MAX_POSITIONS + 1, 12]


@pytest.fixture(params=[1 << 20, 40], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(squares, "_CHUNK_ELEMENTS", request.param)


@pytest.mark.parametrize("t", POSITIONS)
def test_sum_of_squared_gradients(t, chunk):
    a, g = inputs(t)
    acc = torch.full((5, 7), 0.5, dtype=torch.float64)
    add_squared_gradients_(acc, a, g)
    torch.testing.assert_close(acc, 0.5 + explicit(a, g).square().sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", POSITIONS)
def test_weighted_squares(t, chunk):
    a, g = inputs(t)
    w = torch.rand(5, 3, 7, dtype=torch.float64)  # K = 3 sets of weights
    expected = torch.einsum("nij,ikj->nk", explicit(a, g).square(), w)
    torch.testing.assert_close(weighted_squares(a, g, w), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", POSITIONS + [40])
@pytest.mark.parametrize("shape", [(7, 5), (300, 200)], ids=["narrow", "wide"])
def test_square_norms(t, shape, chunk):
    """Without weights: Gram matrices of positions when T is small against d_in·d_out/(d_in + d_out), bmm otherwise."""
    a, g = inputs(t, b=4, d_in=shape[0], d_out=shape[1])
    expected = explicit(a, g).square().sum((1, 2))
    torch.testing.assert_close(weighted_squares(a, g, None)[:, 0], expected, rtol=1e-12, atol=1e-10)


def test_results_never_round_below_zero():
    """A gradient that cancels exactly (g_2 = −g_1, a_2 = a_1) is 0, not a negative rounding error."""
    a, g = inputs(1, b=3)
    a, g = torch.cat([a, a], 1).float(), torch.cat([g, -g], 1).float()
    assert bool((weighted_squares(a, g, torch.ones(5, 1, 7)) >= 0).all())
    assert bool((weighted_squares(a, g, None) >= 0).all())
