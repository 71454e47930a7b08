"""The task: per-example losses, the query measurement and the Fisher's output vectors.

Everything here acts on model outputs ([B, C] logits for classification, [B] or
[B, K] predictions for regression, [B, T, V] logits for language modeling). The per-example
regression loss is Σ_k (f_k − y_k)² (a Gaussian likelihood with c = 1, no ½), so its
Gauss-Newton matrix is 2·JᵀJ. A language model's per-example loss is the cross-entropy summed
over its positions (the sequence's negative log-likelihood), labels [B, T] aligned with the
outputs; positions labelled IGNORE_INDEX (padding, prompts) are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from influence_cli.config import BUILTIN_MEASUREMENTS
from influence_cli.errors import ConfigError, InfluenceError, NumericalError, first_line
from influence_cli.user_code import import_attribute

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 24  # elements of a [B, positions, V] float64 chunk when sampling a language model's tokens (128 MiB)
IGNORE_INDEX = -100  # a language model's label for positions without a loss (PyTorch's and Hugging Face's convention)
_OWN_FIX = "return one value per example, computed from its own row of the outputs, with grad: a tensor of shape [batch]"


class CustomMeasurement:
    """A per-example quantity of the user's own, attributed like the loss: `fn(outputs, targets)` returns one value
    per example ([B], floating, computed from the outputs with grad); a positive score means up-weighting the training
    example lowers it. `spec` names it in messages and in the scores' metadata (task.measurement's
    package.module:function). Each value is checked (shape, dtype, a gradient to the outputs, finite)."""

    def __init__(self, fn: Callable[..., Any], spec: str) -> None:
        self.fn = fn
        self.spec = spec
        self.rows_checked = False  # the first batch of two or more checks that a row's value is its own (_check_rows)

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"CustomMeasurement({self.spec!r})"

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, global_indices: torch.Tensor | None = None) -> torch.Tensor:
        where = f"task.measurement: {self.spec}"
        try:
            value = self.fn(outputs, targets)
        except InfluenceError:
            raise
        except Exception as exc:  # the user's code can raise anything
            error = ConfigError(f"{where} raised {type(exc).__name__}: {first_line(exc)}", hint=f"it is called as fn(outputs {_shape(outputs)}, targets {_shape(targets)}); {_OWN_FIX}")
            error.same_on_every_rank = False  # it may depend on the batch
            raise error from exc
        b = outputs.shape[0]
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{where} returned {type(value).__name__}, not a tensor", hint=_OWN_FIX)
        if tuple(value.shape) != (b,):
            what = "one number (a sum or mean over the batch?)" if value.dim() == 0 else f"shape {list(value.shape)}"
            raise ConfigError(f"{where} returned {what} for a batch of {b} examples, not shape [{b}]", hint=f"{_OWN_FIX} (.squeeze(-1) or .sum(-1) of a [batch, 1] value)")
        if not value.is_floating_point():
            raise ConfigError(f"{where} returned {str(value.dtype).removeprefix('torch.')} values, which have no gradient", hint=f"{_OWN_FIX}, floating point")
        if not value.requires_grad:
            raise ConfigError(
                f"{where} returned values without a gradient: they do not depend on the model's outputs (detached, .item(), "
                "torch.no_grad, or computed from the targets alone)",
                hint=_OWN_FIX,
            )
        finite = torch.isfinite(value.detach())
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().cpu()
            named = bad if global_indices is None else global_indices.cpu()[bad]
            label = "global indices" if global_indices is not None else "batch positions"
            raise NumericalError(
                f"{where} returned non-finite values for {len(bad)} of {b} queries ({label} {', '.join(str(int(i)) for i in named[:10])}"
                f"{', ...' if len(bad) > 10 else ''})",
                hint="keep its value finite at every query (a log of a probability that rounds to 0: use log_softmax)",
            )
        if not self.rows_checked and b > 1:
            self.rows_checked = True
            self._check_rows(outputs, targets, value, where)
        return value

    def _check_rows(self, outputs: torch.Tensor, targets: torch.Tensor, value: torch.Tensor, where: str) -> None:
        """Refuses a function whose value for the batch's first example changes when the example is called alone (a batch
        mean or sum in it: the scores would then depend on the batch size). One call on one row, once per run; a function
        that cannot take one row is not judged."""
        with torch.no_grad():
            try:
                alone = self.fn(outputs[:1].detach(), targets[:1])
            except Exception:  # the user's code may need two rows or more: no verdict
                return
        if not isinstance(alone, torch.Tensor) or alone.numel() != 1:
            return
        a, b = float(alone.reshape(())), float(value[0].detach())
        if abs(a - b) > 1e-4 * max(1.0, abs(a), abs(b)):
            error = ConfigError(
                f"{where}: the value of a query changes with the other queries of its batch ({a:.6g} alone, {b:.6g} in a batch "
                f"of {value.shape[0]}), so the scores would depend on the batch size",
                hint="compute each value from its own row of outputs and targets (no mean, sum or normalization over the batch)",
            )
            error.same_on_every_rank = False
            raise error


Measurement = str | CustomMeasurement  # loss, margin or the user's own


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(d) for d in t.shape)}]"


def load_measurement(spec: str | Callable[..., Any] | CustomMeasurement, base_dir: str | Path = ".") -> Measurement:
    """`loss` / `margin` as they are; a `package.module:function` of task.measurement imported (relative to the config's
    folder `base_dir`, then the Python path) as a CustomMeasurement; a Python function (the in-memory API) wrapped as one.

    Raises:
        ConfigError: naming task.measurement, for a module that does not import, a missing name or one not callable.
    """
    if isinstance(spec, CustomMeasurement):
        return spec
    if callable(spec):
        return CustomMeasurement(spec, f"{getattr(spec, '__module__', None) or '?'}:{getattr(spec, '__qualname__', None) or type(spec).__name__}")
    if spec in BUILTIN_MEASUREMENTS:
        return spec
    module_name, _, func_name = str(spec).partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"task.measurement: {spec!r} is not loss, margin or package.module:function")
    base = Path(base_dir)
    where = "task.measurement"
    fn = import_attribute(module_name, func_name, base, where, ConfigError)
    if not callable(fn):
        raise ConfigError(f"{where}: {spec!r} is a {type(fn).__name__}, not a function", hint="name a function fn(outputs, targets) that returns one value per example")
    return CustomMeasurement(fn, str(spec))


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss of each example.

    Args:
        outputs: [B, C] logits (classification), [B, ...] predictions (regression) or
            [B, T, V] logits (language_modeling).
        targets: [B] class indices, [B, ...] regression targets or [B, T] token ids.
        kind: "classification", "regression" or "language_modeling".

    Returns:
        [B] losses.
    """
    if kind == "classification":
        return F.cross_entropy(outputs, targets.long(), reduction="none")
    if kind == "language_modeling":
        flat = F.cross_entropy(outputs.flatten(0, -2), targets.long().flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        return flat.reshape(outputs.shape[0], -1).sum(dim=1)
    diff = outputs - targets.to(outputs.dtype).reshape(outputs.shape)
    return diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1)


def per_example_measurement(
    outputs: torch.Tensor, targets: torch.Tensor, kind: str, measurement: Measurement, global_indices: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss-like quantity attributed for each query ([B]).

    `loss` is the per-example loss; `margin` is minus the margin
    (correct logit − logsumexp of the other logits = log(p_y / (1 − p_y)), smooth where logits
    tie), so that a positive influence score always means "lowers this quantity" (Park et al.,
    2023, TRAK's margin); a CustomMeasurement is the user's function of (outputs, targets), checked
    (`global_indices` name the queries of a non-finite value).
    """
    if isinstance(measurement, CustomMeasurement):
        return measurement(outputs, targets, global_indices)
    if measurement == "loss":
        return per_example_loss(outputs, targets, kind)
    targets = targets.long()
    correct = outputs.gather(1, targets[:, None]).squeeze(1)
    others = outputs.scatter(1, targets[:, None], float("-inf"))
    return -(correct - torch.logsumexp(others, dim=1))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values < 2**32."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def without_counted_position(labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: the language-model examples whose labels [B, T] are all IGNORE_INDEX (no loss, so a zero gradient)."""
    return (labels == IGNORE_INDEX).flatten(1).all(1)


def counter_uniform(
    seed: int, global_indices: torch.Tensor, width: int, stream: int = 0, columns: torch.Tensor | None = None
) -> torch.Tensor:
    """Uniform(0, 1) numbers that depend only on (seed, stream, example index, column).

    Counter-based, so sampled labels do not depend on batch size, data order,
    the number of ranks or where a resumed pass restarts.

    Args:
        columns: [B, width] int64 column numbers per example instead of 0..width-1 (a padded
            sequence's positions numbered by their rank among its real ones; a regression's
            Box-Muller pairs 2c and 2c + 1).

    Returns:
        [B, width] float64 in (0, 1).
    """
    idx = global_indices.to(torch.int64)
    cols = torch.arange(width, device=idx.device, dtype=torch.int64)[None, :] if columns is None else columns.to(torch.int64)
    h = _hash32(torch.full_like(idx, (seed * 0x9E3779B1 + stream * 0x85EBCA77) & _MASK32))
    if seed >> 32:  # a seed of 2**32 or more draws other numbers than its low 32 bits (smaller seeds: unchanged)
        h = _hash32(h ^ (seed >> 32))
    h = _hash32(h ^ (idx & _MASK32))
    h = _hash32(h ^ (idx >> 32))
    h = _hash32(h[:, None] ^ (cols * 0x27D4EB2F & _MASK32))
    return (h.to(torch.float64) + 0.5) / 2.0**32


def sample_targets(
    outputs: torch.Tensor, targets: torch.Tensor, global_indices: torch.Tensor, kind: str, seed: int, real: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets drawn from the model's own predictive distribution (the true Fisher).

    Classification: y ~ Categorical(softmax(outputs)) by the Gumbel-max trick.
    Regression: y ~ N(f, 1/2), the distribution whose negative log-likelihood is the
    loss (f − y)² up to a constant; outputs per position of a padded sequence (`real`) draw
    at each real position what the sequence alone draws there (_regression_columns).
    Language modeling: one token per position, y_t ~ Categorical(softmax(outputs_t)) by
    inversion of the cumulative distribution (one uniform number per position, not per
    vocabulary entry); positions whose real label is IGNORE_INDEX keep it. Position t of a padded sequence (`real`) draws the number of its rank
    among the sequence's real positions, so padding on either side, of any length, draws the
    same tokens as the sequence alone.

    The random numbers are drawn where `global_indices` (and `real`) live, then moved to the
    outputs' device in one copy: with the indices on the host (as the passes give them) a GPU
    runs none of the counter hash's ~40 small kernels, and every device draws the same numbers.

    Args:
        targets: The real targets; only language modeling reads them (which positions count).
        global_indices: [B] the examples' global indices, on the host or on the outputs' device.
        real: [B, T] bool, True at real (not padding) positions, or None (no padding); on the
            device of `global_indices`.

    Returns:
        [B] class indices, targets shaped like `outputs`, or [B, T] token ids.
    """
    outputs = outputs.detach()
    if kind == "classification":
        u = counter_uniform(seed, global_indices, outputs.shape[1])
        gumbel = _moved(-torch.log(-torch.log(u)), outputs.device)
        return (outputs.double() + gumbel).argmax(dim=1)
    if kind == "language_modeling":
        b, t, v = outputs.shape
        ranks = None
        if real is not None and tuple(real.shape) == (b, t):  # the rank of each position among the real ones
            ranks = (real.to(torch.int64).cumsum(1) - 1).clamp_(min=0)
        u = _moved(counter_uniform(seed, global_indices, t, columns=ranks), outputs.device)  # [B, T]
        drawn = torch.empty(b, t, dtype=torch.int64, device=outputs.device)
        step = max(1, _CHUNK // max(1, b * v))  # positions per chunk: float64 copies of [B, step, V] only
        for s in range(0, t, step):
            cdf = torch.softmax(outputs[:, s : s + step].double(), dim=-1).cumsum(dim=-1)
            pick = torch.searchsorted(cdf, (u[:, s : s + step] * cdf[..., -1]).unsqueeze(-1)).squeeze(-1)
            drawn[:, s : s + step] = pick.clamp_(max=v - 1)
        targets = targets.long().reshape(drawn.shape)
        return torch.where(targets == IGNORE_INDEX, targets, drawn)
    flat = outputs.reshape(outputs.shape[0], -1)
    cols = _regression_columns(tuple(outputs.shape), real, global_indices.device)  # [B, width]
    u1 = counter_uniform(seed, global_indices, cols.shape[1], columns=2 * cols)
    u2 = counter_uniform(seed, global_indices, cols.shape[1], columns=2 * cols + 1)
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)
    return (flat + _moved(normal.to(flat.dtype), flat.device) * 0.5**0.5).reshape(outputs.shape)


def _regression_columns(shape: tuple[int, ...], real: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[B, width] int64: the number of each output entry of a regression's outputs `shape` [B, ...]
    among the example's entries, from which its Gaussian draw is made (Box-Muller: counter columns 2c
    and 2c + 1, so no entry's draw depends on how many entries there are).

    Outputs per position [B, T, ...] of a padded sequence (`real` [B, T]) number each position by its
    rank among the real positions (the padding positions after them), so padding on either side, of
    any length, draws the same targets at the real positions as the sequence alone; otherwise the
    entries are numbered in order.
    """
    b = shape[0]
    width = 1
    for d in shape[1:]:
        width *= d
    if real is None or len(shape) < 2 or tuple(real.shape) != (b, shape[1]):
        return torch.arange(width, device=device, dtype=torch.int64)[None, :].expand(b, width)
    real = real.to(device=device, dtype=torch.bool)
    n_real = real.sum(1, keepdim=True)
    real_rank = real.to(torch.int64).cumsum(1) - 1
    pad_rank = n_real + (~real).to(torch.int64).cumsum(1) - 1
    rank = torch.where(real, real_rank, pad_rank)  # [B, T]: a permutation of 0..T-1 per example
    per = width // shape[1]
    return (rank[:, :, None] * per + torch.arange(per, device=device, dtype=torch.int64)).reshape(b, width)


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the host to a GPU through pinned memory, so the copy does not wait for the GPU."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def loss_output_gradient(
    outputs: torch.Tensor, targets: torch.Tensor, kind: str, measurement: Measurement = "loss", global_indices: torch.Tensor | None = None
) -> torch.Tensor:
    """d(per-example measurement)/d(outputs), one row per example ([B, ...] like outputs).

    For the cross-entropy loss this is p − e_y, with the y entry computed as −Σ_{k≠y} p_k: equal
    in exact arithmetic, but when p_y rounds to 1 the usual p_y − 1 leaves an error the size of
    the whole residual along the all-ones output direction, which has no curvature, so the
    preconditioned gradient of a confidently classified example would be rounding noise / λ.
    A language model's rows are the same at each position, and 0 at IGNORE_INDEX positions.
    The margin and a CustomMeasurement are differentiated by autograd (`global_indices`: see
    per_example_measurement).
    """
    custom = isinstance(measurement, CustomMeasurement)
    if kind == "classification" and measurement == "loss":
        return _cross_entropy_gradient(outputs, targets.long())
    if kind == "language_modeling" and not custom:
        y = targets.long().reshape(outputs.shape[:-1])
        keep = y != IGNORE_INDEX
        return _cross_entropy_gradient(outputs, torch.where(keep, y, 0)) * keep.unsqueeze(-1).to(outputs.dtype)
    out = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        value = per_example_measurement(out, targets, kind, measurement, global_indices).sum()
        (grad,) = torch.autograd.grad(value, out, allow_unused=custom)
    if grad is None:  # a custom measurement's value has a gradient, but to something else than the outputs
        raise ConfigError(f"task.measurement: {measurement} returned values that do not depend on the model's outputs", hint=_OWN_FIX)
    return grad


def _cross_entropy_gradient(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """softmax(logits) − e_y along the last dim, the y entry summed from the others (see above); y [...] like logits[..., 0]."""
    y = y.unsqueeze(-1)
    others = torch.softmax(logits.detach(), dim=-1).scatter(-1, y, 0.0)
    return others.scatter(-1, y, -others.sum(-1, keepdim=True))


def ggn_output_factors(outputs: torch.Tensor, kind: str) -> torch.Tensor:
    """Square root of the output Hessian of the loss: K vectors s_k with Σ_k s_k s_kᵀ = H.

    Classification (softmax cross-entropy): H = diag(p) − ppᵀ and
    s_c = √p_c (e_c − p), one per class. Regression ((f − y)²): H = 2I and
    s_k = √2 e_k.

    Returns:
        [K, B, ...] with K = number of outputs per example.

    Raises:
        ValueError: for language modeling, whose K would be positions × vocabulary (the
            config refuses `ggn` there).
    """
    outputs = outputs.detach()
    if kind == "language_modeling":
        raise ValueError("the ggn Fisher of a language model needs positions x vocabulary vectors")
    if kind == "classification":
        p = torch.softmax(outputs.double(), dim=1)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        s = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])
        return s.to(outputs.dtype)
    flat = outputs.reshape(outputs.shape[0], -1)
    k = flat.shape[1]
    eye = torch.eye(k, dtype=flat.dtype, device=flat.device) * 2.0**0.5
    return eye[:, None, :].expand(k, flat.shape[0], k).reshape(k, *outputs.shape)


def fisher_output_vectors(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    global_indices: torch.Tensor,
    kind: str,
    fisher: str,
    seed: int,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """The vectors back-propagated to form the Fisher's gradients.

    `empirical`: the loss gradient at the real targets. `sampled`: the loss gradient
    at targets sampled from the model (`real`: the padding mask, see sample_targets).
    `ggn`: the square root of the output Hessian, so that Σ_k (Jᵀ s_k)(Jᵀ s_k)ᵀ is the
    exact Gauss-Newton matrix.

    Returns:
        [K, B, ...] (K = 1 except for `ggn`).
    """
    if fisher == "ggn":
        return ggn_output_factors(outputs, kind)
    if fisher == "sampled":
        targets = sample_targets(outputs, targets, global_indices, kind, seed, real)
    return loss_output_gradient(outputs, targets, kind)[None]
