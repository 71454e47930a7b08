"""The per-batch NaN/Inf watch of the passes (`passes.finite_rows`, `NonFiniteWatch`), without host syncs."""

from __future__ import annotations

import pytest
import torch

from influence_cli.errors import NumericalError
from influence_cli.passes import BatchGradients, NonFiniteWatch, finite_rows


def _batch(index: int, first: int, outputs: torch.Tensor, grads: list[torch.Tensor]) -> BatchGradients:
    n = len(outputs)
    return BatchGradients(index, torch.arange(first, first + n), torch.zeros(n), outputs, {}, [{f"l{i}": g for i, g in enumerate(grads)}])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_rows_marks_nan_and_inf_anywhere_in_an_example(dtype):
    outputs = torch.zeros(6, 3, dtype=dtype)
    g1, g2 = torch.ones(6, 2, 4, dtype=dtype), torch.ones(6, 5, dtype=dtype)
    outputs[1, 2] = float("nan")
    g1[2, 1, 3] = float("inf")
    g2[3, 0] = float("-inf")
    g1[4, 0, 0], g2[4, 1] = float("inf"), float("-inf")  # +inf and -inf of one example in two tensors
    assert finite_rows(outputs, [{"a": g1, "b": g2}]).tolist() == [True, False, False, False, False, True]


def test_finite_rows_does_not_call_large_finite_values_infinite():
    """Rows of float32 values near its largest sum past it; in float64 they stay finite."""
    big = torch.full((2, 4), 3e38)
    assert finite_rows(big, [{"a": big.clone()}]).tolist() == [True, True]


def test_finite_rows_does_not_add_up_large_finite_sums_of_a_float64_model():
    """A float64 model's outputs and gradients are each summed in their own float64 sums; two large
    finite sums of one example, added, would overflow to Inf."""
    big = torch.full((2, 1), 1e308, dtype=torch.float64)
    assert finite_rows(big, [{"a": big.clone()}]).tolist() == [True, True]
    big[1, 0] = float("inf")
    assert finite_rows(big, [{"a": -big}]).tolist() == [True, False]  # +Inf and -Inf of one example in two tensors


def test_the_watch_names_the_first_bad_batch_and_its_examples_across_batch_sizes():
    watch = NonFiniteWatch(torch.device("cpu"))
    ok = torch.zeros(4, 2)
    watch.observe(_batch(0, 0, ok, [ok]))
    watch.check("covariance")  # nothing yet
    bad = torch.zeros(3, 2)
    bad[0, 1] = bad[2, 0] = float("nan")
    watch.observe(_batch(1, 4, bad, [torch.zeros(3, 2)]))  # a smaller last batch
    worse = torch.full((4, 2), float("inf"))
    watch.observe(_batch(2, 7, ok, [worse]))  # a later bad batch does not replace the first
    with pytest.raises(NumericalError, match=r"covariance pass at batch 1 \(examples with global indices 4, 6\)"):
        watch.check("covariance")
