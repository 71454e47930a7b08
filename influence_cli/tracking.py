"""Which layers are tracked, and hooks that capture their inputs and output gradients.

A tracked layer is an nn.Linear (inputs [B, d_in] or [B, ..., d_in]) or an
nn.Conv2d (patches unfolded as in KFC, Grosse & Martens 2016). Each is seen as a
linear map over positions: activations a [B, T, d_in(+1)] (a ones column folds the
bias in) and output gradients g [B, T, d_out], so that the per-example gradient
of the weight matrix [W | b] (d_out × d_in(+1)) is Σ_t g_t a_tᵀ.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from influence_cli.errors import DataError, ModelError


@dataclass
class TrackedModule:
    """A layer whose weight gradient is modelled by a Kronecker-factored block."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    d_in: int  # input features per position, +1 when the layer has a bias
    d_out: int
    has_bias: bool

    @property
    def num_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    def gradient_matrix(self, grad_weight: torch.Tensor, grad_bias: torch.Tensor | None) -> torch.Tensor:
        """[W | b]-layout matrix (d_out × d_in) from a weight gradient and a bias gradient."""
        mat = grad_weight.reshape(self.d_out, -1)
        if self.has_bias:
            mat = torch.cat([mat, grad_bias.reshape(self.d_out, 1)], dim=1)  # type: ignore[union-attr]
        return mat

    def split_matrix(self, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of `gradient_matrix`: (weight-shaped tensor, bias or None)."""
        if self.has_bias:
            return mat[:, :-1].reshape(self.weight_shape), mat[:, -1].clone()
        return mat.reshape(self.weight_shape), None


def find_tracked_modules(model: nn.Module, patterns: Sequence[str], key: str = "factors.modules") -> list[TrackedModule]:
    """The supported layers whose names match any fnmatch pattern, in model order.

    Raises:
        ModelError: when no supported layer matches, or a matched Conv2d is unsupported.
    """
    tracked: list[TrackedModule] = []
    supported_names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        supported_names.append(name)
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        has_bias = module.bias is not None
        if isinstance(module, nn.Linear):
            tracked.append(TrackedModule(name, module, "linear", module.in_features + has_bias, module.out_features, has_bias))
        else:
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ModelError(
                    f"{key}: Conv2d {name!r} uses groups={module.groups}, padding={module.padding!r}, "
                    f"padding_mode={module.padding_mode!r}; only groups=1 with numeric zero padding is supported",
                    hint=f"leave it out of {key}",
                )
            kh, kw = module.kernel_size
            d_in = module.in_channels * kh * kw + has_bias
            tracked.append(TrackedModule(name, module, "conv2d", d_in, module.out_channels, has_bias))
    if not tracked:
        shown = ", ".join(supported_names[:8]) or "none"
        raise ModelError(
            f"{key}: {list(patterns)} matches no nn.Linear or nn.Conv2d layer (layers: {shown})",
            hint="use '*' or patterns from `influence inspect`",
        )
    return tracked


def layer_activations(tm: TrackedModule, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as activations [B, T, d_in] (bias column of ones appended)."""
    m = tm.module
    if tm.kind == "conv2d":
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # type: ignore[arg-type]
        a = cols.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if tm.has_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a


def output_gradients(tm: TrackedModule, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the layer's output as [B, T, d_out]."""
    if tm.kind == "conv2d":
        return grad_out.flatten(2).transpose(1, 2)
    return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])


class Capture:
    """Records, during one forward pass, each tracked layer's input and output.

    Usage::

        with Capture(tracked) as cap:
            out = model(x)
        a = cap.activations()                    # {name: [B, T, d_in]}
        g = cap.output_gradients(out, v)         # {name: [B, T, d_out]} for dL/dout = v
    """

    def __init__(self, tracked: Sequence[TrackedModule]) -> None:
        self.tracked = list(tracked)
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Capture:
        self._inputs = {tm.name: [] for tm in self.tracked}
        self._outputs = {tm.name: [] for tm in self.tracked}
        for tm in self.tracked:
            self._handles.append(tm.module.register_forward_hook(self._make_hook(tm.name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._inputs[name].append(inputs[0].detach())
            self._outputs[name].append(output)

        return hook

    def activations(self) -> dict[str, torch.Tensor]:
        """{name: a [B, T, d_in]}; several calls of one layer are concatenated along T."""
        out = {}
        for tm in self.tracked:
            xs = self._inputs[tm.name]
            if not xs:
                raise ModelError(f"layer {tm.name!r} was not called in the forward pass", hint="leave it out of factors.modules")
            parts = [layer_activations(tm, x) for x in xs]
            out[tm.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out

    def output_gradients(self, model_output: torch.Tensor, vector: torch.Tensor, retain_graph: bool) -> dict[str, torch.Tensor]:
        """{name: g [B, T, d_out]}: back-propagates `vector` (dL/d model_output, [B, ...]).

        Gradients are taken w.r.t. the layers' outputs only, so autograd skips
        the weight-gradient GEMMs entirely.
        """
        flat = [(tm, o) for tm in self.tracked for o in self._outputs[tm.name]]
        # The vector-Jacobian product as the gradient of the scalar Σ out·v (the same numbers: the
        # sum and product pass v through exactly); unlike grad_outputs=v, this does not import
        # torch's symbolic-shapes machinery (and sympy, 0.3 s) in every process's first pass.
        grads = torch.autograd.grad(
            (model_output * vector.detach()).sum(), [o for _, o in flat], retain_graph=retain_graph, allow_unused=True
        )
        per_layer: dict[str, list[torch.Tensor]] = {tm.name: [] for tm in self.tracked}
        for (tm, o), g in zip(flat, grads, strict=True):
            per_layer[tm.name].append(output_gradients(tm, torch.zeros_like(o) if g is None else g))
        return {name: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for name, parts in per_layer.items()}


def padding_mask(x: torch.Tensor, padding_value: float, dataset_name: str = "data.train") -> torch.Tensor:
    """[B, L] bool, True at real positions, of sequence inputs.

    Integer inputs [B, L] (token ids) are padding where they equal `padding_value`;
    floating inputs [B, L, F] where every feature of the position equals it.

    Raises:
        DataError: for inputs without a sequence dimension.
    """
    if not x.is_floating_point() and x.dim() == 2:
        return x != padding_value
    if x.is_floating_point() and x.dim() == 3:
        return (x != padding_value).any(dim=-1)
    raise DataError(
        f"data.padding_value: {dataset_name} inputs of shape {list(x.shape)} ({x.dtype}) have no sequence positions",
        hint="padding needs integer token ids [batch, seq] or features [batch, seq, features]; otherwise set data.padding_value: null",
    )


def mask_padding(
    tracked: Sequence[TrackedModule],
    mask: torch.Tensor,
    activations: dict[str, torch.Tensor],
    gradients: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Zeroes padding positions in place of the dicts; returns {layer: [B] real positions}.

    A Linear layer is masked when its positions are the inputs' L positions (or k·L, for a
    layer called k times); one position means the sequence was pooled before it, and Conv2d
    positions are patches, so neither is masked.

    Args:
        mask: [B, L] bool from `padding_mask`.
        activations: {layer: a [B, T, d_in]}; gradients: dicts {layer: g [B, T, d_out]}.

    Raises:
        ModelError: for a Linear layer whose positions do not line up with the inputs'.
    """
    length = mask.shape[1]
    positions = {}
    for tm in tracked:
        a = activations[tm.name]
        t = a.shape[1]
        if tm.kind == "conv2d" or (t == 1 and length != 1):
            continue
        if t % length:
            raise ModelError(
                f"data.padding_value: layer {tm.name!r} sees {t} positions per example, the inputs have {length}; "
                "its padding positions cannot be told apart",
                hint=f"leave {tm.name!r} out of factors.modules, or set data.padding_value: null",
            )
        real = mask.repeat(1, t // length)
        m = real.to(a.dtype)[..., None]
        activations[tm.name] = a * m
        for grads in gradients:
            grads[tm.name] = grads[tm.name] * m
        positions[tm.name] = real.sum(dim=1).to(torch.promote_types(a.dtype, torch.float32)).clamp_min(1.0)
    return positions


@contextmanager
def tracked_grad_enabled(tracked: Sequence[TrackedModule]) -> Iterator[None]:
    """Makes the tracked layers' parameters require grad, so their outputs do."""
    saved = [(p, p.requires_grad) for tm in tracked for p in tm.module.parameters(recurse=False)]
    for p, _ in saved:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def per_example_gradients(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients Σ_t g_t a_tᵀ: [B, d_out, d_in] from a [B, T, d_in], g [B, T, d_out]."""
    if a.shape[1] == 1:
        return g[:, 0, :, None] * a[:, 0, None, :]
    return torch.bmm(g.transpose(1, 2), a)
