"""Which layers are tracked, and hooks that capture their inputs and output gradients.

A tracked layer is an nn.Linear (inputs [B, d_in] or [B, ..., d_in]), a Hugging Face
transformers `Conv1D` (GPT-2's projections: a Linear whose weight is stored transposed,
[d_in, d_out]; recognised without importing transformers, `conv1d_base`), an
nn.Conv2d (patches unfolded as in KFC, Grosse & Martens 2016) or an nn.Conv1d (the
Conv2d on [B, C, 1, L] with kernel (1, k), stride (1, s), padding (0, p), dilation
(1, d): the same patches, `unfold_arguments`). Each is seen as a
linear map over positions: activations a [B, T, d_in(+1)] (a ones column folds the
bias in) and output gradients g [B, T, d_out], so that the per-example gradient
of the weight matrix [W | b] (d_out × d_in(+1)) is Σ_t g_t a_tᵀ.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from influence_cli.errors import DataError, ModelError, first_few


@dataclass
class TrackedModule:
    """A layer whose weight gradient is modelled by a Kronecker-factored block."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d" | "conv1d" (CONV_KINDS: unfolded patches)
    d_in: int  # input features per position, +1 when the layer has a bias
    d_out: int
    has_bias: bool
    copy_io: bool = False  # set by Capture when the forward modifies this layer's input or output in place
    transposed: bool = False  # the weight is stored [d_in, d_out] (transformers' Conv1D); gradients and edits transpose it

    @property
    def num_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.module.weight.shape)

    def gradient_matrix(self, grad_weight: torch.Tensor, grad_bias: torch.Tensor | None) -> torch.Tensor:
        """[W | b]-layout matrix (d_out × d_in) from a weight gradient and a bias gradient (weight-shaped: a
        transposed layer's [d_in, d_out] gradient is transposed)."""
        mat = grad_weight.T if self.transposed else grad_weight.reshape(self.d_out, -1)
        if self.has_bias:
            mat = torch.cat([mat, grad_bias.reshape(self.d_out, 1)], dim=1)  # type: ignore[union-attr]
        return mat

    def split_matrix(self, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of `gradient_matrix`: (weight-shaped tensor, bias or None)."""
        weight = mat[:, :-1] if self.has_bias else mat
        weight = weight.T.contiguous() if self.transposed else weight.reshape(self.weight_shape)
        return weight, (mat[:, -1].clone() if self.has_bias else None)


def _is_name(pattern: str) -> bool:
    """A pattern without wildcards names one layer."""
    return not any(c in pattern for c in "*?[")


LAYER_KINDS = "nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D"  # the layers that can be tracked, as messages name them


def conv1d_base(module: nn.Module) -> type | None:
    """The class named `Conv1D` in the module's MRO when the module is Hugging Face transformers'
    transposed Linear (None otherwise): integer `nx` (inputs) and `nf` (outputs), a weight [nx, nf]
    and a bias [nf] or None, its forward `x @ weight + bias` over the last dim of x [..., nx].

    Recognised by that contract, not by importing transformers (which this tool does not need): a
    copy of the class in other code counts too, and the first batch of every pass checks each
    tracked weight's gradient (model_checks), which a layer computing anything else fails.
    """
    base = next((c for c in type(module).__mro__ if c.__name__ == "Conv1D"), None)
    if base is None:
        return None
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(nx, int) and isinstance(nf, int) and isinstance(weight, torch.Tensor)) or tuple(weight.shape) != (nx, nf):
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (nf,)):
        return None
    return base


CONV_LAYERS = (nn.Conv1d, nn.Conv2d)  # the convolutions tracked through unfolded patches (KFC)
CONV_KINDS = ("conv1d", "conv2d")  # their TrackedModule.kind


def is_layer(module: nn.Module) -> bool:
    """An nn.Linear, nn.Conv1d, nn.Conv2d or transformers Conv1D: a layer `find_tracked_modules` considers."""
    return isinstance(module, (nn.Linear, *CONV_LAYERS)) or conv1d_base(module) is not None


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    """The conv's zero padding per side of each spatial dim as numbers ('valid' = 0, symmetric 'same'), or None if unsupported."""
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return None if any(p % 2 for p in total) else tuple(p // 2 for p in total)
    return tuple(module.padding)  # type: ignore[arg-type]


def unfold_arguments(module: nn.Conv1d | nn.Conv2d) -> dict[str, tuple[int, int]]:
    """F.unfold's kernel_size, dilation, padding and stride of a tracked conv: a Conv1d's are those of the
    Conv2d on its input viewed [B, C, 1, L] (kernel (1, k), dilation (1, d), padding (0, p), stride (1, s)),
    whose patches [B, C·k, L_out] (channel-major, as the weight [out, C, k] flattens) are the Conv1d's."""
    pad = _conv_padding(module)
    assert pad is not None  # unsupported_reason refuses the layer before its patches are unfolded
    if isinstance(module, nn.Conv1d):
        return {"kernel_size": (1, *module.kernel_size), "dilation": (1, *module.dilation), "padding": (0, *pad), "stride": (1, *module.stride)}  # type: ignore[dict-item]
    return {"kernel_size": module.kernel_size, "dilation": module.dilation, "padding": pad, "stride": module.stride}  # type: ignore[dict-item]


ATTENTION_OUTPUT = "applied by nn.MultiheadAttention through its weight, never called as a layer"
SWIN_PROJECTION = "applied by torchvision's {cls} through F.linear on its weight, never called as a layer"
SWIN_POSITION_BIAS = (
    "part of the position-bias MLP (cpb_mlp) of torchvision's ShiftedWindowAttentionV2, run once on a relative-coordinates "
    "table shared by the whole batch (no batch dimension)"
)


AUXILIARY_CLASSIFIER = "part of the auxiliary classifier of torchvision's {cls}, which runs only in training (the model runs in eval mode)"


def unrecorded_layers(model: nn.Module) -> dict[int, str]:
    """{id: reason} of the Linear / Conv2d layers whose calls the hooks cannot record per example
    (the modules that hold them are recognised by class; subclasses with their own forward, or
    for `cpb_mlp` their own `get_relative_position_bias`, are left alone):

    - nn.MultiheadAttention passes `out_proj.weight` to F.multi_head_attention_forward and never
      calls `out_proj`.
    - torchvision's ShiftedWindowAttention(V2) (Swin) passes `qkv.weight` and `proj.weight` to
      F.linear and never calls `qkv` or `proj`.
    - ShiftedWindowAttentionV2 runs `cpb_mlp` on its relative-coordinates table [1, 2Wh-1, 2Ww-1, 2],
      the same for every example: the hooks would see one input and the batch's summed output gradient.
    - torchvision's GoogLeNet (`aux1`, `aux2`) and Inception3 (`AuxLogits`) call their auxiliary
      classifiers only in training.
    - peft's ModulesToSaveWrapper (a module that `modules_to_save` fine-tunes whole, such as a
      classifier head beside LoRA adapters) keeps the frozen `original_module` and a trained copy per
      adapter, `modules_to_save.<adapter>`, and calls one of them: the others are never called.

    torchvision and peft are not imported here: a model holding their modules has imported them already.
    """
    out = {
        id(m.out_proj): ATTENTION_OUTPUT
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention) and type(m).forward is nn.MultiheadAttention.forward
    }
    return out | _swin_layers(model) | _auxiliary_classifiers(model) | _peft_saved_copies(model)


def _swin_layers(model: nn.Module) -> dict[int, str]:
    """`unrecorded_layers` of torchvision's Swin attention: qkv and proj, and V2's cpb_mlp."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    v1 = getattr(swin, "ShiftedWindowAttention", None)
    if v1 is None:
        return {}
    v2 = getattr(swin, "ShiftedWindowAttentionV2", None)
    stock = {v1.forward: v1.__name__} | ({v2.forward: v2.__name__} if v2 is not None else {})
    out: dict[int, str] = {}
    for m in model.modules():
        if not isinstance(m, v1):
            continue
        cls = stock.get(type(m).forward)
        if cls is not None:
            out |= {id(layer): SWIN_PROJECTION.format(cls=cls) for layer in (m.qkv, m.proj) if isinstance(layer, nn.Linear)}
        if v2 is not None and isinstance(m, v2) and type(m).get_relative_position_bias is v2.get_relative_position_bias:
            out |= {id(layer): SWIN_POSITION_BIAS for layer in m.cpb_mlp.modules() if isinstance(layer, nn.Linear)}
    return out


def _auxiliary_classifiers(model: nn.Module) -> dict[int, str]:
    """`unrecorded_layers` of torchvision's GoogLeNet and Inception3: their auxiliary classifiers."""
    families = [
        (sys.modules.get("torchvision.models.googlenet"), "GoogLeNet", ("aux1", "aux2")),
        (sys.modules.get("torchvision.models.inception"), "Inception3", ("AuxLogits",)),
    ]
    out: dict[int, str] = {}
    for module, name, heads in families:
        cls = getattr(module, name, None)
        if cls is None:
            continue
        for m in model.modules():
            if isinstance(m, cls) and type(m)._forward is cls._forward:
                reason = AUXILIARY_CLASSIFIER.format(cls=name)
                for head in (getattr(m, h, None) for h in heads):
                    if isinstance(head, nn.Module):
                        out |= {id(layer): reason for layer in head.modules() if isinstance(layer, (nn.Linear, nn.Conv2d))}
    return out


PEFT_SAVED_COPY = "a copy of {module!r} that peft's ModulesToSaveWrapper keeps but does not call (it calls {called!r})"


def _peft_saved_copies(model: nn.Module) -> dict[int, str]:
    """`unrecorded_layers` of peft's ModulesToSaveWrapper: the copies of its module its forward does not call. It calls
    `modules_to_save[active_adapters[0]]`, or `original_module` when adapters are disabled, none is active or an active
    one has no copy (peft's passthrough); a subclass with its own forward is left alone. peft before 0.15 has no
    `_forward_wrapped` and one `active_adapter`, a string."""
    cls = getattr(sys.modules.get("peft.utils.other"), "ModulesToSaveWrapper", None)
    if not isinstance(cls, type):
        return {}
    out: dict[int, str] = {}
    names = {id(m): name for name, m in model.named_modules()}
    for m in model.modules():
        if not isinstance(m, cls) or any(getattr(type(m), f, None) is not getattr(cls, f, None) for f in ("forward", "_forward_wrapped")):
            continue
        copies = getattr(m, "modules_to_save", None)
        original = getattr(m, "original_module", None)
        if not isinstance(copies, nn.ModuleDict) or not isinstance(original, nn.Module):
            continue
        active = getattr(m, "active_adapters", None)
        if active is None:
            active = getattr(m, "active_adapter", None)
        active = [active] if isinstance(active, str) else list(active or [])
        passthrough = bool(getattr(m, "disable_adapters", False)) or not active or any(a not in copies for a in active)
        called = original if passthrough else copies[active[0]]
        wrapper = names.get(id(m), "")
        reason = PEFT_SAVED_COPY.format(module=wrapper or "(model)", called=names.get(id(called), "").removeprefix(wrapper + "."))
        for copy in [original, *copies.values()]:
            if copy is not called:
                out |= {id(layer): reason for layer in copy.modules() if is_layer(layer)}
    return out


def unsupported_reason(module: nn.Module, unrecorded: dict[int, str] | None = None) -> str | None:
    """Why a Linear / Conv1d / Conv2d cannot be tracked (None if it can); `unrecorded` from `unrecorded_layers`."""
    if unrecorded and id(module) in unrecorded:
        return unrecorded[id(module)]
    if not isinstance(module, CONV_LAYERS):
        return None
    if module.groups != 1:
        return f"groups={module.groups}"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    if _conv_padding(module) is None:
        return f"padding={module.padding!r} with an even kernel (asymmetric)"
    return None


def unmaterialized(module: nn.Module) -> bool:
    """A lazy module (nn.LazyLinear, ...) whose parameters have no shape yet."""
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def frozen(module: nn.Module) -> bool:
    """None of the layer's parameters (its parametrizations' too) requires grad: training did not change it
    (a frozen backbone, the base layer under a LoRA adapter)."""
    return not any(p.requires_grad for p in module.parameters())


FROZEN_REASON = "frozen (no parameter requires grad), left out by factors.trainable_only"


def custom_forward_reason(module: nn.Module) -> str | None:
    """Why a wildcard leaves out a Linear / Conv1d / Conv2d / Conv1D subclass with its own forward (None for the stock layers).

    Such a forward may use the weight otherwise than the stock layer (weight standardization,
    a scale), so the hooks' Σ g·aᵀ would not be its gradient; naming the layer tracks it, and
    the first batch checks that gradient (model_checks).
    """
    base = next((c for c in (nn.Linear, *CONV_LAYERS) if isinstance(module, c)), None) or conv1d_base(module)
    cls = type(module)
    if base is None or (cls.forward is base.forward and (base not in CONV_LAYERS or cls._conv_forward is base._conv_forward)):
        return None
    return f"{cls.__name__} overrides the {base.__name__} forward (name it in factors.modules to track it; its gradient is checked)"


def find_tracked_modules(
    model: nn.Module, patterns: Sequence[str], key: str = "factors.modules", trainable_only: bool = False
) -> list[TrackedModule]:
    """The supported layers whose names match any fnmatch pattern, in model order.

    With `trainable_only` (factors.trainable_only), a `frozen` layer (no parameter requires grad,
    as the model is built and loaded) is left out when a wildcard matches it, and an error when named.

    A layer the factors cannot model (a grouped Conv1d / Conv2d, non-zero padding modes, asymmetric
    'same' padding; the layers of `unrecorded_layers`: nn.MultiheadAttention's `out_proj` and the
    `qkv` and `proj` of torchvision's Swin attention and the copies of a module that peft's
    ModulesToSaveWrapper does not call, which are never called, Swin V2's `cpb_mlp`,
    whose input is shared by the batch, the auxiliary classifiers of GoogLeNet and Inception3, run
    only in training) is skipped when only a wildcard pattern matches it, and an
    error when named. A subclass with its own forward is skipped by wildcards and tracked when
    named (its gradient is checked on the first batch). Every name without wildcards must be a
    tracked layer.

    Raises:
        ModelError: when no supported layer matches, a named layer is unsupported (or frozen, with
            `trainable_only`), or two tracked layers share a parameter (tied weights: one gradient, not two blocks).
    """
    compiled = next((name or "(model)" for name, m in model.named_modules() if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")), None)
    if compiled is not None:  # the compiled graph bypasses the layers' hooks: the factors would be wrong
        raise ModelError(
            f"model.architecture: module {compiled!r} is compiled with torch.compile, whose graph runs without the layers' hooks",
            hint="pass the model before torch.compile (its ._orig_mod)",
        )
    tracked: list[TrackedModule] = []
    supported_names: list[str] = []  # every Linear, Conv1d, Conv2d and Conv1D (a pattern matching any of them is not a typo)
    trackable: list[str] = []  # those that can be tracked (what messages list)
    owners: dict[int, str] = {}
    skipped: list[str] = []  # matched by a wildcard but not trackable, with the reason
    left_frozen: list[str] = []  # matched by a wildcard but frozen, with trainable_only
    unrecorded = unrecorded_layers(model)
    for name, module in model.named_modules():
        if not is_layer(module):
            continue
        supported_names.append(name)
        lazy = unmaterialized(module)
        reason = None if lazy else unsupported_reason(module, unrecorded)
        if not lazy and reason is None:
            trackable.append(name)
        matched = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
        if not matched:
            continue
        if lazy:
            raise ModelError(
                f"{key}: {type(module).__name__} {name!r} has no shape yet (a lazy layer)",
                hint="run the model once on a batch, or load its checkpoint, before fitting",
            )
        if reason is None and not any(_is_name(p) for p in matched):
            reason = custom_forward_reason(module)
            if reason is not None:
                skipped.append(f"{name} ({reason})")
                continue
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            if any(_is_name(p) for p in matched):
                if reason == SWIN_POSITION_BIAS:
                    detail = f"Linear {name!r} is {reason}: its hooks would see the batch's summed output gradient, not each example's"
                elif reason.startswith(AUXILIARY_CLASSIFIER.partition("{")[0]):
                    detail = f"{type(module).__name__} {name!r} is {reason}: it is never called"
                elif id(module) in unrecorded:
                    detail = f"Linear {name!r} is {reason}, so its inputs cannot be recorded"
                else:
                    detail = (
                        f"{type(module).__name__} {name!r} uses {reason}; only groups=1 with zero padding (numbers, 'valid' or symmetric 'same') is supported"
                    )
                raise ModelError(f"{key}: {detail}", hint=f"leave it out of {key}")
            continue
        if trainable_only and frozen(module):
            if any(_is_name(p) for p in matched):
                raise ModelError(
                    f"{key}: {type(module).__name__} {name!r} is frozen (none of its parameters requires grad), and factors.trainable_only "
                    "tracks only layers that training changed",
                    hint=f"leave it out of {key}, or set factors.trainable_only: false to track it",
                )
            left_frozen.append(name)
            continue
        for param in module.parameters(recurse=False):
            if id(param) in owners:
                raise ModelError(
                    f"{key}: layers {owners[id(param)]!r} and {name!r} share a parameter (tied weights); its gradient is the sum over both uses, which two separate blocks cannot model",
                    hint=f"track one of them in {key}",
                )
            owners[id(param)] = name
        has_bias = module.bias is not None
        if isinstance(module, nn.Linear):
            tracked.append(TrackedModule(name, module, "linear", module.in_features + has_bias, module.out_features, has_bias))
        elif not isinstance(module, CONV_LAYERS):  # a Conv1D: the Linear of its weight's transpose
            tracked.append(TrackedModule(name, module, "linear", module.nx + has_bias, module.nf, has_bias, transposed=True))
        else:
            kind = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
            d_in = module.in_channels * math.prod(module.kernel_size) + has_bias
            tracked.append(TrackedModule(name, module, kind, d_in, module.out_channels, has_bias))
    listed = first_few(trackable, 8)  # for the messages below
    dead = [p for p in patterns if not _is_name(p) and not any(fnmatch.fnmatchcase(n, p) for n in supported_names)]
    if dead and tracked:  # a typo next to a pattern that works would otherwise drop its layers silently
        raise ModelError(
            f"{key}: pattern {dead[0]!r} matches no {LAYER_KINDS} layer (layers: {listed})",
            hint="fix or remove it (names and patterns are case-sensitive; `influence inspect` lists the layers)",
        )
    named = [p for p in patterns if _is_name(p) and p not in {tm.name for tm in tracked}]
    if named:  # before "matches no layer": the name says what it is (a Conv1d, a typo)
        modules = dict(model.named_modules())
        module = modules.get(named[0])
        detail = f"is a {type(module).__name__}, not an {LAYER_KINDS}" if module is not None else "names no module of the model"
        if module is not None and any(c.__name__ == "Conv1D" for c in type(module).__mro__):  # a look-alike: which part differs
            detail += " (whose weight is [nx, nf] for integer nx and nf, its bias [nf] or None)"
        inner = module is not None and any(True for _ in module.children())
        hint = f"{named[0] + '.*'!r} tracks the layers inside it" if inner else f"use names from `influence inspect`, or leave it out of {key}"
        raise ModelError(f"{key}: {named[0]!r} {detail}", hint=hint)
    if not tracked:
        if left_frozen:
            shown = first_few(left_frozen, 3)
            raise ModelError(
                f"{key}: {list(patterns)} matches only frozen layers (none of their parameters requires grad: {shown}), and "
                "factors.trainable_only tracks only layers that training changed",
                hint="build the model with its trained parameters requiring grad, as in training (peft: PeftModel.from_pretrained(base, "
                "folder, is_trainable=True)), or set factors.trainable_only: false",
            )
        if skipped:
            shown = first_few(skipped, 3, "; ")
            detail = f"it matches only layers that cannot be tracked: {shown}"
        else:
            detail = f"layers: {listed or 'none'}"
        raise ModelError(
            f"{key}: {list(patterns)} matches no {LAYER_KINDS} layer that can be tracked ({detail})",
            hint="use '*' or patterns from `influence inspect`",
        )
    return tracked


@dataclass
class UntrackedModule:
    """A module holding parameters that influence scores leave out, and why."""

    name: str
    kind: str  # the module's class name
    num_params: int
    reason: str
    shared_with: str | None = None  # the tracked layer whose weight this module also uses (its parameters are tracked)


def untracked_modules(
    model: nn.Module, tracked: Sequence[TrackedModule], key: str = "factors.modules", trainable_only: bool = False
) -> list[UntrackedModule]:
    """Modules with parameters of their own (trainable or not) outside every tracked layer, in model order
    (`trainable_only`: factors.trainable_only, which leaves `frozen` layers out)."""
    owner = {id(p): tm for tm in tracked for p in tm.module.parameters(recurse=False)}
    tracked_names = {tm.name for tm in tracked}
    unrecorded = unrecorded_layers(model)
    out = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        params = [p for p in own if id(p) not in owner]
        shared = [owner[id(p)].name for p in own if id(p) in owner and owner[id(p)].module is not module]
        if shared:  # a weight tied to a tracked layer (input embeddings and an output head, say)
            n = sum(p.numel() for p in own if id(p) in owner)
            out.append(UntrackedModule(name or "(model)", type(module).__name__, n, f"its use of the weight shared with tracked {shared[0]!r}", shared[0]))
        if not params:
            continue
        parent, _, attr = name.rpartition(".parametrizations.")
        if is_layer(module):
            reason = (
                unsupported_reason(module, unrecorded)
                or custom_forward_reason(module)
                or (FROZEN_REASON if trainable_only and frozen(module) else f"not matched by {key}")
            )
        elif parent in tracked_names:  # weight_norm & co: the layer is scored in its effective weight
            reason = f"parametrizes the {attr} of tracked {parent!r}, which is scored as its effective {attr}"
        elif isinstance(module, nn.MultiheadAttention):
            reason = "its query/key/value projections (in_proj_weight, or q/k/v_proj_weight) are applied inside the attention, not by a layer a hook sees"
        else:
            reason = f"not an {LAYER_KINDS}"
        out.append(UntrackedModule(name or "(model)", type(module).__name__, sum(p.numel() for p in params), reason))
    return out


def skipped_layers(model: nn.Module, tracked: Sequence[TrackedModule], patterns: Sequence[str], trainable_only: bool = False) -> list[UntrackedModule]:
    """The layers a user may expect in the scores that a wildcard of `patterns` matched and passed
    over: Linear, Conv1d, Conv2d and Conv1D layers that cannot be tracked (grouped convs, nn.MultiheadAttention's
    out_proj, Swin attention's qkv, proj and cpb_mlp, subclasses with their own forward) and
    convolutions of other dimensions; not layers no pattern matches, nor those `trainable_only` left out
    as frozen, nor norms, embeddings and other parameters (`influence inspect` lists those)."""
    wildcards = [p for p in patterns if not _is_name(p)]
    modules = dict(model.named_modules())
    out = []
    for u in untracked_modules(model, tracked, trainable_only=trainable_only):
        module = modules.get("" if u.name == "(model)" else u.name)
        if u.shared_with is not None or module is None or not any(fnmatch.fnmatchcase(u.name, p) for p in wildcards):
            continue
        if u.reason == FROZEN_REASON:  # the user's choice, as a layer no pattern matches
            continue
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or conv1d_base(module) is not None:  # Conv1d and Conv2d among the convs
            out.append(u)
    return out


def frozen_layers_warning(model: nn.Module, tracked: Sequence[TrackedModule], patterns: Sequence[str]) -> str | None:
    """A warning when wildcards of `patterns` track `frozen` layers of a model that has trainable parameters
    (a frozen backbone under a trained head or LoRA adapters): their scores measure influence through
    weights that training did not change, which is rarely what a fine-tuned model's user asks. None
    otherwise (every parameter trainable, as a model built for inference often is, or none)."""
    if not any(p.requires_grad for p in model.parameters()):
        return None
    names = [tm.name for tm in tracked if frozen(tm.module) and not any(_is_name(p) and p == tm.name for p in patterns)]
    if not names:
        return None
    shown = first_few(names, 3)
    return (
        f"factors.modules tracks {len(names)} frozen layer{'s' if len(names) > 1 else ''} (no parameter requires grad: {shown}) "
        "beside trainable parameters: their part of each score is influence through weights the training did not change; "
        "factors.trainable_only: true tracks only the trainable layers (LoRA adapters, an unfrozen head)"
    )


UNFOLD_ELEMENTS = 1 << 22  # conv patches unfolded at once by `layer_activations` on the CPU (16 MiB in float32)
UNFOLD_ELEMENTS_GPU = 1 << 26  # on a GPU (256 MiB): fewer, larger unfolds, as each costs kernel launches


def layer_activations(tm: TrackedModule, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as activations [B, T, d_in] (bias column of ones appended)."""
    if tm.kind in CONV_KINDS:
        return _conv_activations(tm, x.unsqueeze(2) if tm.kind == "conv1d" else x)
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    if tm.has_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a


def _conv_activations(tm: TrackedModule, x: torch.Tensor) -> torch.Tensor:
    """A conv layer's unfolded patches [B, T, d_in] of its input x [B, C, H, W] (KFC; a Conv1d's [B, C, L] as [B, C, 1, L]).

    With a bias, the patches are unfolded `UNFOLD_ELEMENTS` (on a GPU `UNFOLD_ELEMENTS_GPU`) at a time into the result, which
    holds the ones column too: the patches (T·d_in per example, a conv net's largest tensor of a
    batch) then exist once, not twice (unfolded, then copied beside the ones).
    """
    unfold = unfold_arguments(tm.module)  # type: ignore[arg-type]

    def patches(part: torch.Tensor) -> torch.Tensor:  # [b, T, d_in]
        return F.unfold(part, **unfold).transpose(1, 2)

    if not tm.has_bias:
        return patches(x)
    _, t, d = patches(x[:1]).shape
    a = x.new_empty(x.shape[0], t, d + 1)
    a[..., d] = 1
    step = max(1, (UNFOLD_ELEMENTS if x.device.type == "cpu" else UNFOLD_ELEMENTS_GPU) // max(1, t * d))
    for s in range(0, x.shape[0], step):
        a[s : s + step, :, :d] = patches(x[s : s + step])
    return a


def output_gradients(tm: TrackedModule, grad_out: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. the layer's output as [B, T, d_out] (a conv's [B, d_out, H, W] or [B, d_out, L] with its positions flattened)."""
    if tm.kind in CONV_KINDS:
        return grad_out.flatten(2).transpose(1, 2)
    return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])


def _set_attention_fastpath(enabled: bool) -> bool | None:
    """Sets PyTorch's inference fast path of nn.MultiheadAttention and nn.TransformerEncoder(Layer);
    returns what it was (None on a torch without the switch). Without grad, that path runs the
    layers as fused kernels, which bypass the hooks of the Linear layers inside them, and packs a
    padded batch as a NestedTensor, which they cannot record: a Capture turns it off."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        return None
    before = bool(mha.get_fastpath_enabled())
    mha.set_fastpath_enabled(enabled)
    return before


@contextmanager
def attention_fastpath_off() -> Iterator[None]:
    """Runs nn.MultiheadAttention and nn.TransformerEncoder through their layers, as every forward of
    this tool does (`_set_attention_fastpath`); the caller's setting is restored after."""
    before = _set_attention_fastpath(False)
    try:
        yield
    finally:
        if before is not None:
            _set_attention_fastpath(before)


class Capture:
    """Records, during one forward pass, each tracked layer's input and output.

    Usage::

        with Capture(tracked) as cap:
            out = model(x)
        if cap.modified_in_place():              # e.g. Linear -> nn.ReLU(inplace=True): redo this forward
            ...
        a = cap.activations()                    # {name: [B, T, d_in]}
        g = cap.output_gradients(out, v)         # {name: [B, T, d_out]} for dL/dout = v

    An operation that modifies a layer's output in place (nn.ReLU(inplace=True) right after
    it, as in VGG) would turn the gradient taken w.r.t. that output into the gradient w.r.t.
    the op's result; one that modifies its input in place would change the recorded a.
    Version counters reveal both after the forward; `modified_in_place` then marks those
    layers (`TrackedModule.copy_io`), whose hooks from then on record a copy of the input
    and hand the rest of the forward a copy of the output.
    """

    def __init__(self, tracked: Sequence[TrackedModule]) -> None:
        self.tracked = list(tracked)
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._versions: dict[str, list[tuple[int, int]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fastpath_off = ExitStack()

    def __enter__(self) -> Capture:
        self._inputs = {tm.name: [] for tm in self.tracked}
        self._outputs = {tm.name: [] for tm in self.tracked}
        self._versions = {tm.name: [] for tm in self.tracked}
        self._fastpath_off.enter_context(attention_fastpath_off())
        for tm in self.tracked:
            self._handles.append(tm.module.register_forward_hook(self._make_hook(tm)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fastpath_off.close()

    def _make_hook(self, tm: TrackedModule):
        name = tm.name

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if inputs[0].is_nested:  # a model that packs its batch itself (torch.nested): no [B, T, d] to record
                raise ModelError(
                    f"layer {name!r} received a NestedTensor, whose examples cannot be recorded as a [batch, positions, features] tensor",
                    hint="pass padded tensors with a padding mask (data.padding_value), or leave the layer out of factors.modules",
                )
            x = inputs[0].detach().clone() if tm.copy_io else inputs[0].detach()
            self._inputs[name].append(x)
            self._outputs[name].append(output)
            self._versions[name].append((x._version, output._version))
            return output.clone() if tm.copy_io else None

        return hook

    def modified_in_place(self) -> bool:
        """True if the forward modified a tracked layer's recorded input or output in place.

        Marks those layers `copy_io`, so that the next forward records them intact: the
        caller runs the batch again.
        """
        found = False
        for tm in self.tracked:
            now = [(x._version, o._version) for x, o in zip(self._inputs[tm.name], self._outputs[tm.name], strict=True)]
            if now != self._versions[tm.name] and not tm.copy_io:
                tm.copy_io = found = True
        return found

    def activations(self, batch_size: int | None = None, rows: int | None = None) -> dict[str, torch.Tensor]:
        """{name: a [B, T, d_in]}; several calls of one layer are concatenated along T.

        `rows`: only the first `rows` examples' activations, [rows, T, d_in] (a conv layer's
        unfolded patches are T·d_in per example: the model checks compare one row, not the batch).

        Raises:
            ModelError: a layer not called, or (given `batch_size`) called on an input whose dim 0
                is not the batch ([batch, ..., features], [batch, C, L] or [batch, C, H, W] expected).
        """
        uncalled = [tm.name for tm in self.tracked if not self._inputs[tm.name]]
        if uncalled:  # all of them at once: one rerun, not one per layer
            shown = first_few([repr(n) for n in uncalled], 6)
            raise ModelError(
                f"layer{'s' if len(uncalled) > 1 else ''} {shown} {'were' if len(uncalled) > 1 else 'was'} not called in the forward pass, "
                "which runs in eval mode (a branch used only in training, such as an auxiliary classifier, or a weight applied "
                "another way, e.g. passed to F.linear by the module that holds the layer)",
                hint="leave them out of factors.modules: list patterns that match only the layers the model calls (`influence inspect` lists them)",
            )
        out = {}
        for tm in self.tracked:
            xs = self._inputs[tm.name]
            for x in xs if batch_size is not None else ():
                conv_dims = {"conv1d": 3, "conv2d": 4}.get(tm.kind)
                if conv_dims is not None and x.dim() != conv_dims:  # unbatched [C, L] / [C, H, W]: F.unfold would not see patches
                    layout = "[batch, C, L]" if tm.kind == "conv1d" else "[batch, C, H, W]"
                    raise ModelError(
                        f"layer {tm.name!r} receives inputs of shape {list(x.shape)}, one unbatched example: a tracked "
                        f"{type(tm.module).__name__} must see the batch along dim 0, {layout}",
                        hint="call the layer on the whole batch (not once per example), or leave it out of factors.modules",
                    )
                if x.dim() < 2 or x.shape[0] != batch_size:
                    raise ModelError(
                        f"layer {tm.name!r} receives inputs of shape {list(x.shape)}, whose first dimension is not the batch size "
                        f"{batch_size}: a tracked layer must see one example per row of dim 0 ([batch, ..., features])",
                        hint="leave it out of factors.modules, or keep the batch first in the model (e.g. batch_first=True, no reshape(-1, features) before it)",
                    )
            for x, o in zip(xs, self._outputs[tm.name], strict=True) if batch_size is not None and tm.kind == "linear" else ():
                if x.shape[-1] != tm.d_in - tm.has_bias or o.shape[-1] != tm.d_out:  # a forward that is no x @ Wᵀ over the last dim
                    what = "is taken for transformers' Conv1D, x @ weight + bias" if tm.transposed else "is tracked as x @ weightᵀ + bias"
                    raise ModelError(
                        f"layer {tm.name!r} maps inputs of shape {list(x.shape)} to outputs of shape {list(o.shape)}, not its "
                        f"{tm.d_in - tm.has_bias} input features to {tm.d_out} outputs along the last dimension: {type(tm.module).__name__} {what}",
                        hint="leave it out of factors.modules",
                    )
            parts = [layer_activations(tm, x if rows is None else x[:rows]) for x in xs]
            out[tm.name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out

    def output_gradients(self, model_output: torch.Tensor, vector: torch.Tensor, retain_graph: bool) -> dict[str, torch.Tensor]:
        """{name: g [B, T, d_out]}: back-propagates `vector` (dL/d model_output, [B, ...]).

        Gradients are taken w.r.t. the layers' outputs only, so autograd skips
        the weight-gradient GEMMs entirely.
        """
        flat = [(tm, o) for tm in self.tracked for o in self._outputs[tm.name]]
        for tm, o in flat:
            if not o.requires_grad:
                raise ModelError(
                    f"layer {tm.name!r} ran without autograd (under torch.no_grad, or inside torch.utils.checkpoint with use_reentrant=True)",
                    hint=f"use checkpoint(..., use_reentrant=False), or leave {tm.name!r} out of factors.modules",
                )
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
        if not math.isfinite(padding_value) or padding_value != int(padding_value):
            raise DataError(
                f"data.padding_value: {padding_value} is not a whole number, and {dataset_name} holds integer token ids",
                hint="set data.padding_value to the pad token id",
            )
        return x != padding_value
    if x.is_floating_point() and x.dim() == 3:
        return (x != padding_value).any(dim=-1)
    hint = "padding needs integer token ids [batch, seq] or features [batch, seq, features]; otherwise set data.padding_value: null"
    if x.is_floating_point() and x.dim() == 2:
        hint = f"for token ids stored as numbers set {dataset_name}.transform.dtype: int64; otherwise set data.padding_value: null"
    elif not x.is_floating_point() and x.dim() == 3:
        hint = f"for features stored as integers set {dataset_name}.transform.dtype: float32; otherwise set data.padding_value: null"
    what = "float inputs" if x.is_floating_point() else "integer inputs"
    raise DataError(
        f"data.padding_value: {dataset_name} {what} of shape {list(x.shape)} ({str(x.dtype).removeprefix('torch.')}) "
        "are neither token ids [batch, seq] nor features [batch, seq, features]",
        hint=hint,
    )


def mask_padding(
    tracked: Sequence[TrackedModule],
    mask: torch.Tensor,
    activations: dict[str, torch.Tensor],
    gradients: list[dict[str, torch.Tensor]],
    check: bool = False,
    dataset_name: str = "data.train",
) -> dict[str, torch.Tensor]:
    """Zeroes padding positions in place of the dicts; returns {layer: [B] real positions}.

    A Linear layer is masked when its positions are the inputs' L positions (or k·L, for a
    layer called k times, in that order); one position means the sequence was pooled before
    it, and Conv1d / Conv2d positions are patches, so neither is masked.

    Args:
        mask: [B, L] bool from `padding_mask`.
        activations: {layer: a [B, T, d_in]}; gradients: dicts {layer: g [B, T, d_out]}.
        check: Also verify that the loss does not depend on the masked positions (their output
            gradients are exact zeros when the model ignores padding); one host sync. A layer
            whose positions are the inputs' in another order (a flip, positions interleaved
            with heads) fails it.

    Raises:
        ModelError: for a Linear layer whose positions do not line up with the inputs', or
            (with `check`) whose masked positions carry gradient.
    """
    length = mask.shape[1]
    positions = {}
    for tm in tracked:
        a = activations[tm.name]
        t = a.shape[1]
        if tm.kind in CONV_KINDS or (t == 1 and length != 1):
            continue
        if t % length:
            raise ModelError(
                f"data.padding_value: layer {tm.name!r} sees {t} positions per example, the inputs of {dataset_name} have {length}; "
                "its padding positions cannot be told apart",
                hint=f"leave {tm.name!r} out of factors.modules, or set data.padding_value: null",
            )
        real = mask.repeat(1, t // length)
        if check and any(bool(grads[tm.name][~real].any()) for grads in gradients):
            raise ModelError(
                f"data.padding_value: the loss depends on positions of layer {tm.name!r} that the inputs of {dataset_name} mark as padding: "
                "the model does not ignore padding there, or the layer's positions are not the inputs' in order "
                "(a flip, positions interleaved with heads)",
                hint=f"mask padding in the model (attention key mask, masked pooling), leave {tm.name!r} out of factors.modules, "
                "or set data.padding_value: null",
            )
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
