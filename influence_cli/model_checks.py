"""The model contract: one output tensor with the batch on dim 0 (every batch), and first-batch
checks that a model meets what the factors assume of it.

The hooks record each tracked layer's input a and output gradient g, and every factor and score
is built from them on two assumptions (DESIGN.md: per-example gradients Σₜ gₜaₜᵀ):

1. An example's outputs and layer inputs depend on that example alone, with the examples along
   dim 0. A layer fed [T, B, F] (the sequence-first layout of nn.Transformer's default) when T
   happens to equal the batch size, or a model that mixes examples, breaks it silently.
2. The gradient of a tracked weight is Σₜ gₜaₜᵀ (transposed for transformers' Conv1D): the weight is
   used only by its layer's own call, as nn.Linear / nn.Conv1d / nn.Conv2d / Conv1D use it. A subclass whose forward
   transforms the weight (weight standardization), or `F.linear(x, layer.weight)` elsewhere in the
   model, breaks it.

Each pass checks both on its first batch: one extra forward of a batch of copies of its first
example, and one forward and backward of its first 8 examples to the tracked weights. A first
batch of the same examples that the same model passed them on earlier in the command (compute-scores
streams a query chunk again for each train shard, and a shard again for each chunk) is not
checked again (`stream_gradients(checked=...)`): the same inputs give the same outcome. Weights shared with untracked modules (tied input
embeddings, attributed through the tracked use only) and parametrized weights (weight_norm,
whose weight is recomputed at each access) are left out of the second check.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from torch import nn

from influence_cli.errors import ModelError, first_few, first_line, out_of_memory
from influence_cli.tracking import Capture, TrackedModule, attention_fastpath_off

_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}  # relative; under factors.amp (bf16 / fp16 autocast): 5e-2
_GAP_ELEMENTS = 1 << 22  # float64 values `_rows_gap` holds at once (32 MiB)
_HINT_LAYOUT = (
    "keep the batch first in the model (e.g. batch_first=True), with nothing that mixes the examples of a batch "
    "and no randomness (model.eval() turns off dropout and batch statistics)"
)


def tolerance(dtype: torch.dtype, amp: str, device: torch.device | None = None) -> float:
    """Relative agreement expected of two computations of the same quantity: float32 on CUDA gets
    1e-2, a margin for cuDNN's choice of algorithms between a batch and its check (the passes run
    in IEEE float32 there, `passes.ieee_float32`); a forward and backward under bf16 / fp16 autocast 5e-2."""
    if amp != "none":
        return 5e-2
    if dtype == torch.float32 and device is not None and device.type == "cuda":
        return 1e-2
    return _TOLERANCE.get(dtype, 5e-2)


def _relative_gap(got: torch.Tensor, want: torch.Tensor, scale_of: torch.Tensor | None = None) -> float:
    """max |got − want| over the largest |value| of both (or of `scale_of`, e.g. the whole batch)."""
    got, want = got.double(), want.double()
    scale = max(float(want.abs().max()), float(got.abs().max()), 1e-300)
    if scale_of is not None and scale_of.numel():  # max and -min, not abs().max(): no copy of a batch's activations
        scale = max(scale, float(scale_of.detach().max()), -float(scale_of.detach().min()))
    return float((got - want).abs().max()) / scale


def _rows_gap(rows: torch.Tensor, scale_of: torch.Tensor) -> float:
    """max over i of |rows[i] − rows[0]|, relative as `_relative_gap` (to the largest |value| of `rows` or
    `scale_of`), a chunk of about `_GAP_ELEMENTS` (at least one row) in float64 at a time: a language
    model's outputs [B, positions, vocabulary] are not copied whole into float64 (four times over)."""
    if rows.numel() == 0:
        return 0.0
    first = rows[:1].double()
    step = max(1, _GAP_ELEMENTS // max(1, first.numel()))
    worst = torch.zeros((), dtype=torch.float64, device=rows.device)
    for start in range(1, rows.shape[0], step):  # torch.maximum keeps a NaN, as _relative_gap's max does
        worst = torch.maximum(worst, (rows[start : start + step].double() - first).abs().max())
    scale = max(float(rows.max()), -float(rows.min()), float(scale_of.detach().max()), -float(scale_of.detach().min()), 1e-300)
    return float(worst) / scale


def check_model_output(out: object, batch_size: int) -> None:
    """The model must return one tensor with the batch along dim 0.

    Raises:
        ModelError: for a tuple/dict output, or outputs whose dim 0 is not the batch (a final
            `squeeze()` turns the outputs of a one-example batch into those of no batch).
    """
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returned a {_described(out)}, not a tensor of outputs", hint=_one_tensor_hint(out))
    if out.dim() == 0 or out.shape[0] != batch_size:
        raise ModelError(
            f"the model returned outputs of shape {list(out.shape)} for a batch of {batch_size}: dim 0 must be the batch",
            hint="a final .squeeze() drops it on a batch of one; use .squeeze(-1)",
            alike="the model returned outputs whose dim 0 is not the batch",
        )


def _described(out: object) -> str:
    """A non-tensor output for messages: its type, and a mapping's keys (a Hugging Face ModelOutput is one)."""
    if isinstance(out, Mapping):
        keys = [str(k) for k in out]
        shown = first_few([repr(k) for k in keys], 4)
        return f"{type(out).__name__} (a mapping of {shown or 'nothing'})"
    return type(out).__name__


def _one_tensor_hint(out: object) -> str:
    """What a factory's wrapper returns instead of `out`: its logits entry, else its first tensor."""
    pick = '["logits"]'
    if isinstance(out, Mapping) and "logits" not in out:
        pick = next((f"[{k!r}]" for k, v in out.items() if isinstance(v, torch.Tensor)), pick)
    elif isinstance(out, (tuple, list)):
        pick = "[0]" if out and isinstance(out[0], torch.Tensor) else pick
    return (
        "return one tensor, the logits (classification, language modeling) or predictions (regression): e.g. a factory "
        f"returning a wrapper whose forward is `return self.model(x){pick}` (the saved network's checkpoint still loads; "
        "docs/CONFIG.md, \"Hugging Face models\")"
    )


def check_examples_independent(
    model: nn.Module, tracked: list[TrackedModule], x: torch.Tensor, out: torch.Tensor, acts: dict[str, torch.Tensor], tol: float
) -> None:
    """Row 0 of the batch's outputs and of every layer's inputs is the same in a batch of B copies of example 0,
    and every row of the copies' outputs is row 0's.

    The copies keep the batch's shape, so the products round as in the batch and a model that
    does not mix examples gives the same bits; the other examples being replaced changes what a
    model that mixes them computes (batch statistics; a [seq, batch, ...] layer whose seq equals
    the batch size sees other rows). A recurrence along the batch (a sequence-first LSTM fed
    [batch, seq, ...]) leaves row 0 alone, as the first step of its sequence, but not the rows after it.
    Run under the batch's autocast context.

    Args:
        x: The batch [B, ...] (B > 1); out, acts: its outputs and layer inputs {layer: a [B, T, d_in]}.

    Raises:
        ModelError: outputs or layer inputs that depend on the other examples of the batch.
    """
    with torch.no_grad(), Capture(tracked) as twin:
        copies = model(x[:1].expand(x.shape[0], *x.shape[1:]).contiguous())
    check_model_output(copies, x.shape[0])
    twin_acts = twin.activations(x.shape[0], rows=1)  # row 0 only: the batch's activations exist once, not twice
    for tm in tracked:
        a1, a = twin_acts[tm.name], acts[tm.name][:1]
        if a1.shape != a.shape or _relative_gap(a1, a, acts[tm.name]) > tol:
            raise ModelError(
                f"layer {tm.name!r} receives inputs for the batch's first example that change with the other examples: they depend "
                "on the other examples of the batch (a [seq, batch, features] layout whose seq equals the batch size, or "
                "statistics over the batch)",
                hint=_HINT_LAYOUT,
            )
    if copies.shape != out.shape or _relative_gap(copies[:1], out[:1].detach(), out) > tol:
        raise ModelError(
            "the model's outputs for the batch's first example change with the other examples: they depend on the other examples of the batch",
            hint=_HINT_LAYOUT,
        )
    if _rows_gap(copies, out) > tol:  # row 0 comes first in a recurrence over the batch
        raise ModelError(
            "the model's outputs differ between the copies of one example in a batch: they depend on the other examples of the "
            "batch (a recurrent layer, nn.LSTM or nn.GRU, without batch_first=True runs along the batch as its sequence; a "
            "mixture of experts with a capacity per batch drops the copies that exceed it)",
            hint=_HINT_LAYOUT,
        )


def check_padding_alone(
    model: nn.Module, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor, tol: float, dataset_name: str = "data.train"
) -> None:
    """The batch's first padded example with real positions, run on those alone, gives its outputs in the batch.

    Masking padded positions in the tracked layers is exact only for a model that ignores
    padding; `mask_padding`'s gradient check sees tracked layers only, so a model that reads
    padding through untracked ones (attention projections, embeddings) needs this one too. Run
    under the batch's autocast context.

    Args:
        x: The batch [B, L, ...]; out: its outputs; mask: [B, L] bool, True at real positions;
            idx: [B] global indices. Outputs with positions ([B, L, ...]) are compared at the real ones.

    Raises:
        ModelError: naming the example whose outputs change.
    """
    padded = ((~mask).any(1) & mask.any(1)).nonzero()  # padding and real positions: an example of padding alone shows nothing
    if not len(padded):
        return
    i = int(padded[0, 0])
    real = mask[i]
    try:
        with torch.no_grad(), attention_fastpath_off():
            single = model(x[i : i + 1][:, real])
    except (RuntimeError, ValueError, IndexError) as exc:  # a model that only takes its padded length: nothing to compare
        if out_of_memory(exc) is not None:
            raise
        return
    if not isinstance(single, torch.Tensor) or single.dim() == 0 or single.shape[0] != 1:
        return
    mine = out[i].detach()
    if single.shape[1:] == mine.shape:
        gap = _relative_gap(single[0], mine, out)
    elif out.dim() >= 2 and out.shape[1] == x.shape[1] and single.shape[1:] == (int(real.sum()), *out.shape[2:]):
        gap = _relative_gap(single[0], mine[real], out)
    else:
        return  # outputs whose shape follows the length some other way: nothing to compare
    if gap > tol:
        raise ModelError(
            f"data.padding_value: the model's outputs for example {int(idx[i])} of {dataset_name} change when its padding is removed "
            f"(by {gap:.1%} of the batch's largest output): the model reads the padded positions",
            hint="mask padding in the model (an attention key mask, a causal mask with right padding, masked pooling), "
            "or pad with a value the model ignores",
            alike=f"data.padding_value: the model's outputs for examples of {dataset_name} change when their padding is removed",
        )


def check_weight_gradients(
    model: nn.Module, tracked: list[TrackedModule], x: torch.Tensor, vector: torch.Tensor, tol: float, autocast: contextlib.AbstractContextManager
) -> None:
    """Autograd's gradient of each tracked weight equals Σ_b r_b Σₜ g_bt a_btᵀ from the hooks.

    Runs its own forward and backward on the batch's first examples (at most 8, so the batch's
    graph need not be kept), with the examples weighted by ±2^k (exact in every float format;
    random, so that a trained model's batch gradient, which nearly cancels, is not compared as
    rounding noise). A model whose forward modifies a saved layer input in place has no weight
    gradient to compare with. A float16 backward that overflows here (a weight's gradient sums over
    the examples and their positions) is run again without autocast. Call with the tracked
    parameters requiring grad.

    Args:
        x: The batch [B, ...]; vector: dL/d outputs [B, ...] of the pass (per example, so the
            first rows are those of a smaller batch); autocast: the pass's autocast context.

    Raises:
        ModelError: naming the first layer whose weight the model also uses otherwise.
    """
    shared = {id(p) for m in model.modules() if all(m is not tm.module for tm in tracked) for p in m.parameters(recurse=False)}
    layers = [
        tm
        for tm in tracked
        if isinstance(tm.module.weight, nn.Parameter)  # not a parametrized or old-style weight_norm weight, recomputed at each access
        and id(tm.module.weight) not in shared
        and (not tm.has_bias or isinstance(tm.module.bias, nn.Parameter))
    ]
    if not layers:
        return
    params = [p for tm in layers for p in ([tm.module.weight] + ([tm.module.bias] if tm.has_bias else []))]
    n = min(x.shape[0], 8)
    try:
        with torch.enable_grad(), Capture(tracked) as cap:
            with autocast:
                out = model(x[:n])
    except (RuntimeError, ValueError, IndexError) as exc:
        if out_of_memory(exc) is not None:
            raise
        reason = first_line(exc, type(exc).__name__)
        raise ModelError(
            f"the model runs on a batch of {x.shape[0]} but fails on its first {n} examples ({reason[:200]})",
            hint="the model must accept any batch size (a size written into a view/reshape also fails on a short last batch)",
            alike="the model fails on a smaller batch than the pass's",
        ) from exc
    check_model_output(out, n)
    peak = float(vector[:n].detach().abs().max()) if vector.numel() else 0.0
    if not 0.0 < peak < math.inf:  # no gradient (confident predictions of the sampled labels): no evidence either way
        return
    # exact (a power of 2, applied in float64: 2^k itself can exceed float32) and linear, before the cast to the outputs' dtype:
    # the gradients of saturated outputs would be subnormal, and flushed to 0 in float16
    seed = (vector[:n].double() * 2.0 ** -math.floor(math.log2(peak))).to(out.dtype)
    gen = torch.Generator().manual_seed(0)  # ±2^k, k in -2..2: exact in every float format, so bf16 rounds both sides alike
    r = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double() * 2.0 ** torch.randint(-2, 3, (n,), generator=gen).double()
    weights = r.to(out.device, out.dtype).reshape(-1, *[1] * (out.dim() - 1))
    acts = cap.activations(n)
    try:
        grads = cap.output_gradients(out, seed, retain_graph=True)
        found = torch.autograd.grad((out * (seed * weights)).sum(), params, allow_unused=True)
    except RuntimeError as exc:
        if "inplace operation" in str(exc):  # a weight's saved input was modified in place (the hooks record a copy)
            return
        raise
    out = cap = seed = None
    if not isinstance(autocast, contextlib.nullcontext) and not all(
        bool(torch.isfinite(t).all()) for t in [*grads.values(), *(w for w in found if w is not None)]
    ):
        # under float16 a weight's gradient, a sum over the examples and their positions, can overflow where the passes'
        # layer-output gradients do not: decided without autocast then, not taken as no evidence
        check_weight_gradients(model, tracked, x, vector, tol, contextlib.nullcontext())
        return
    k = 0
    for tm in layers:
        w, b = found[k], found[k + 1] if tm.has_bias else None
        auto = tm.gradient_matrix(  # [W | b] layout, d_out × d_in (a Conv1D's [in, out] weight transposed)
            torch.zeros_like(tm.module.weight) if w is None else w, (torch.zeros_like(tm.module.bias) if b is None else b) if tm.has_bias else None
        )
        k += 1 + tm.has_bias
        dtype = torch.promote_types(acts[tm.name].dtype, torch.float32)  # float32 (float64 models: float64) is enough for the tolerance
        a, g = acts[tm.name].to(dtype), grads[tm.name].to(dtype)
        hooks = torch.einsum("b,btd,bte->de", r.to(a.device, dtype), g, a)
        gap = _relative_gap(hooks, auto)  # NaN from a model that gives NaN: no evidence either way (the passes report it)
        if gap > tol:
            conv1d = "a class named Conv1D computing other than transformers' Conv1D (x @ weight + bias), " if tm.transposed else ""
            raise ModelError(
                f"layer {tm.name!r}: the gradient of its weight is not Σ g·aᵀ of its own calls (off by {gap:.0%}): the model "
                f"uses the weight otherwise ({conv1d}a subclass whose forward changes it, or the weight passed to F.{'linear' if tm.kind == 'linear' else tm.kind} elsewhere)",
                hint="leave it out of factors.modules, or use the weight only through the layer's own call",
                alike=f"layer {tm.name!r}: the gradient of its weight is not Σ g·aᵀ of its own calls",
            )
