"""`edit`: remove the low-curvature components of chosen layers' weights.

Following Merullo et al. 2025 ("From Memorization to Reasoning in the Spectrum of Loss
Curvature"), each chosen layer's [W | b] (d_out × d_in, bias as the last column,
tracking.py) is written in the Kronecker eigenbasis of its factors and only the
high-curvature components are kept:

    W' = U_G (C ⊙ M) U_Aᵀ,   C = U_Gᵀ [W | b] U_A,

with M [d_out, d_in] the 0/1 mask of the kept directions (bands.keep_mask): the
smallest set of highest-curvature directions holding a share ρ of Σc (ρ = 0.6 in the
paper), or a fixed share of the directions. It is computed as
W' = W − U_G (C ⊙ (1 − M)) U_Aᵀ, the same for orthogonal U, so that kept layers and an
all-ones mask return W bit for bit even with float32-stored eigenvectors. The edited
checkpoint has every other weight unchanged and loads with the same config.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from influence_cli import notices, storage
from influence_cli.bands import (
    check_order,
    direction_curvature,
    directions_of_share,
    keep_mask,
    load_kronecker_factors,
    select_layers,
)
from influence_cli.config import EDIT_KEEP, Config
from influence_cli.context import prepare
from influence_cli.distributed import DistState
from influence_cli.errors import ModelError, UsageError, first_line
from influence_cli.factors import LayerFactors
from influence_cli.fit import check_finite_factors
from influence_cli.models import checkpoint_files, checkpoint_under_model_keys, model_fingerprint, tied_keys
from influence_cli.reprs import brief_repr
from influence_cli.tracking import TrackedModule


@dataclass
class LayerEdit:
    """What was removed from one layer.

    Attributes:
        directions: d_out·d_in directions of the eigenbasis.
        removed: Directions removed (low curvature).
        weight_share_removed: ‖C ⊙ (1 − M)‖² / ‖C‖², the share of ‖[W | b]‖² removed.
        curvature_share_kept: Σ_{kept} c / Σ c.
    """

    name: str
    shape: tuple[int, int]
    directions: int
    removed: int
    weight_share_removed: float
    curvature_share_kept: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "directions": self.directions,
            "removed": self.removed,
            "removed_share": self.removed / max(1, self.directions),
            "weight_share_removed": self.weight_share_removed,
            "curvature_share_kept": self.curvature_share_kept,
        }


@dataclass
class EditReport:
    """The outcome of `edit`."""

    __repr__ = brief_repr

    path: Path
    source: str
    keep: str
    rho: float | None  # the share of the curvature mass kept (keep "mass"), else None
    share: float | None  # the share of the directions kept (keep "share"), else None
    order: str
    layers: list[LayerEdit]
    source_fingerprint: str
    fingerprint: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(Path(self.path).resolve()),
            "source": self.source,
            "keep": self.keep,
            "rho": self.rho,
            "share": self.share,
            "order": self.order,
            "layers": [layer.to_dict() for layer in self.layers],
            "source_fingerprint": self.source_fingerprint,
            "fingerprint": self.fingerprint,
            "seconds": self.seconds,
        }


def project_weights(w: torch.Tensor, lf: LayerFactors, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Keeps the components of w along the directions of `mask` (float64 inside).

    Args:
        w: [d_out, d_in] the layer's [W | b].
        lf: The layer's factors (U_A [d_in, d_in], U_G [d_out, d_out]).
        mask: bool or 0/1 [d_out, d_in], True = keep.

    Returns:
        (W − U_G (C ⊙ (1 − M)) U_Aᵀ in w's dtype, ‖C ⊙ (1 − M)‖² / ‖C‖²) with C = U_Gᵀ w U_A.
    """
    w64 = w.detach().double()
    u_a = lf.a_eigenvectors.to(w.device, torch.float64)  # type: ignore[union-attr]
    u_g = lf.g_eigenvectors.to(w.device, torch.float64)  # type: ignore[union-attr]
    c = u_g.T @ w64 @ u_a
    dropped = c * (1.0 - mask.to(w.device, torch.float64))
    norm = float(c.square().sum())
    removed = float(dropped.square().sum()) / norm if norm > 0 else 0.0
    return (w64 - u_g @ dropped @ u_a.T).to(w.dtype), removed


def edit_model(
    model: nn.Module,
    layers: list[TrackedModule],
    factors: dict[str, LayerFactors],
    *,
    keep: str = "mass",
    rho: float = 0.6,
    share: float = 0.5,
    order: str = "kfac",
) -> tuple[dict[str, torch.Tensor], list[LayerEdit]]:
    """The model's state dict with `layers` projected onto their high-curvature directions (the model is not changed).

    Returns:
        (state dict, one LayerEdit per layer).
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tied = tied_keys(model)
    edits = []
    for tm in layers:
        lf = factors[tm.name]
        c = direction_curvature(lf, order)
        mask = keep_mask(c, keep, rho=rho, share=share)
        weight = tm.module.weight
        bias = tm.module.bias if tm.has_bias else None
        w = tm.gradient_matrix(weight.detach(), None if bias is None else bias.detach())
        new, removed = project_weights(w, lf, mask.to(w.device))
        new_w, new_b = tm.split_matrix(new)
        for key, value in _layer_state(tm, new_w.to(weight.dtype), None if new_b is None else new_b.to(bias.dtype)).items():  # type: ignore[union-attr]
            state[key] = value
            others = [k for k in tied.get(key, []) if k != key]
            for other in others:  # one tensor under several names: every name holds the edited values
                state[other] = value.clone()
            if others:
                notices.warn(f"edit: {key} is tied to {', '.join(others)}; the edited weight replaces it there too")
        total = float(c.clamp_min(0).sum())
        kept_mass = float(c.clamp_min(0)[mask.cpu()].sum()) / total if total > 0 else 0.0
        edits.append(LayerEdit(tm.name, (tm.d_out, tm.d_in), c.numel(), int((~mask).sum()), removed, kept_mass))
    return state, edits


def _layer_state(tm: TrackedModule, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The state-dict entries of layer `tm` holding `weight` (and `bias`) as its effective values: a
    parametrized weight (weight_norm, ...) is set through its parametrization's right_inverse, so its
    stored originals are what the checkpoint gets.

    Raises:
        ModelError: the parametrization cannot take the edited weight (no right_inverse, or not in its image).
    """
    hint = "leave the layer out of --layers / spectrum.edit.layers"
    try:
        module = copy.deepcopy(tm.module)
    except Exception as exc:  # e.g. the hook-based torch.nn.utils.weight_norm
        raise ModelError(
            f"layer {tm.name!r} cannot be copied to write its edited weight ({type(exc).__name__}: {first_line(exc)})",
            hint=f"use torch.nn.utils.parametrizations (weight_norm, ...) for its weight, or {hint}",
        ) from None
    with torch.no_grad():
        for name, value in (("weight", weight), ("bias", bias)):
            if value is None:
                continue
            if not parametrize.is_parametrized(module, name):
                getattr(module, name).copy_(value)
                continue
            try:
                setattr(module, name, value)  # the parametrization's right_inverse
                exact = torch.allclose(getattr(module, name), value, rtol=1e-4, atol=1e-6 * float(value.abs().max()))
            except Exception as exc:
                raise ModelError(
                    f"layer {tm.name!r}: its parametrized {name} cannot be set to the edited values ({type(exc).__name__}: {exc})",
                    hint=hint,
                ) from None
            if not exact:  # e.g. spectral_norm, whose right_inverse keeps the value and divides it again
                kinds = ", ".join(type(p).__name__ for p in module.parametrizations[name])
                raise ModelError(f"layer {tm.name!r}: its {name}'s parametrization ({kinds}) does not reproduce the edited values", hint=hint)
    prefix = f"{tm.name}." if tm.name else ""
    return {prefix + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _settings(
    cfg: Config, out: str | Path, keep: str | None, rho: float | None, share: float | None, order: str | None
) -> tuple[Path, str, float, float, str, str]:
    """edit's flags checked and filled in from spectrum.edit and spectrum.order: (out, keep, rho, share, order, the
    key that names order). Checked before the factors' lock is taken (`_check_flags`), and again where they are used.

    Raises:
        UsageError: impossible --rho / --keep-share / --out.
        OutputError: --out's folder cannot be entered or created.
    """
    e = cfg.spectrum.edit
    if rho is not None and share is not None:
        raise UsageError("--rho and --keep-share: give one (keep a share of the curvature mass, or a share of the directions)")
    if keep is not None and keep not in EDIT_KEEP:
        raise UsageError(f"keep: expected one of {', '.join(EDIT_KEEP)}, got {keep!r}")
    unused = ("rho", rho, "mass") if keep == "share" and rho is not None else ("share", share, "share") if keep == "mass" and share is not None else None
    if unused is not None:  # Python callers: the value would be ignored
        name, value, its_keep = unused
        raise UsageError(f"keep={keep!r} with {name}={value!r}: {name} is used by keep={its_keep!r} only", hint=f"leave out keep (the {name} implies keep={its_keep!r}) or {name}")
    keep = keep or ("mass" if rho is not None else "share" if share is not None else e.keep)
    rho = e.rho if rho is None else rho
    share = e.share if share is None else share
    if not 0.0 < rho <= 1.0:
        raise UsageError(f"--rho: must be in (0, 1], got {rho}")
    if not 0.0 < share <= 1.0:
        raise UsageError(f"--keep-share: must be in (0, 1] (0 would zero every edited weight), got {share}")
    order_key = "--order" if order else "spectrum.order"
    order = order or cfg.spectrum.order
    check_order(order, "--order")
    out = Path(out)
    if out.suffix not in EDIT_SUFFIXES:
        raise UsageError(
            f"--out: {str(out)!r} must end in {', '.join(EDIT_SUFFIXES[:-1])} or {EDIT_SUFFIXES[-1]}",
            hint="e.g. edited.safetensors (with the edit's metadata), or edited.pt (a plain state dict)",
        )
    storage.check_readable_dir(out.parent, "--out", listed=False)  # is_dir() would raise PermissionError
    if out.is_dir():
        raise UsageError(f"--out: {str(out)!r} is a folder", hint="give a file name ending in .safetensors, .pt or .pth")
    storage.check_creatable_dir(out.parent, "--out", "give --out a path in a writable folder")  # created only when the edited weights are written
    read = cfg.input_files().get(out.resolve())
    what = "the model's own checkpoint" if read == "model.checkpoint" else f"a file the config reads ({read})"
    if read is None:  # a shard of a checkpoint named by its index: the edit would replace it with the whole model
        named = [("model.checkpoint", cfg.model.checkpoint), *((f"scores.checkpoints[{i}]", c) for i, c in enumerate(cfg.scores.checkpoints))]
        shards = {f.resolve(): key for key, c in named if c is not None for f in checkpoint_files(cfg.resolve(c))[1:]}
        read = shards.get(out.resolve())
        what = f"a shard of {read}"
    if read is not None:
        raise UsageError(f"--out: {str(out)!r} is {what}", hint="write the edited weights to a new file")
    made = storage.file_format(out)
    if storage.is_output_name(out.name) or (made.startswith("influence_cli.") and made != storage.EDITED_CHECKPOINT_FORMAT):
        raise UsageError(
            f"--out: {str(out)!r} is the name of an output of the other commands" + (f" (it holds {made})" if made else ""),
            hint="write the edited weights to a file of their own, e.g. edited.safetensors",
        )
    return out, keep, rho, share, order, order_key


def _flags(keep: str, rho: float, share: float, order: str, layers: list[str] | None) -> dict[str, object]:
    """The config keys edit's flags set, with the values the edit used (`provenance`: the recorded config is the
    effective one): spectrum.edit's keep, rho and share, spectrum.order, and spectrum.edit.layers (--layers)."""
    flags: dict[str, object] = {"spectrum.edit.keep": keep, "spectrum.edit.rho": rho, "spectrum.edit.share": share, "spectrum.order": order}
    return flags | ({"spectrum.edit.layers": layers} if layers else {})


def _check_flags(cfg: Config, arguments: dict[str, Any]) -> None:
    """`_settings` of edit_checkpoint's arguments (by name, as given), before the factors' lock is taken: a usage
    error is not hidden behind a busy factors folder (it would still be there once fit-factors is done)."""
    _settings(cfg, arguments["out"], arguments.get("keep"), arguments.get("rho"), arguments.get("share"), arguments.get("order"))


# the factors' shared lock is held for the whole run, as the other readers hold theirs: the factors are read (checked,
# projected) through their map well after they were opened, and the checkpoint names their file. A refit would not
# change what the map holds (it renames a new file over the path), but the file named would then hold other factors.
# It guards the factors only: --out takes no lock (an atomic write; a killed writer's temporary files are removed by
# age). Under torchrun rank 0 takes it and tells the others whether it got it, before any rank reads the factors
@storage.guards_output_dir(None, reads="factors", checks=_check_flags)
def edit_checkpoint(
    cfg: Config,
    out: str | Path,
    *,
    keep: str | None = None,
    rho: float | None = None,
    share: float | None = None,
    layers: list[str] | str | None = None,
    order: str | None = None,
    overwrite: bool = False,
    state: DistState | None = None,
) -> EditReport:
    """Writes a checkpoint (atomic) with the chosen layers' low-curvature components removed: `out`
    ending in .safetensors holds the edit's metadata (format, provenance, source checkpoint, layers),
    one ending in .pt or .pth a plain state dict (torch.save; no metadata: the report has it).

    Needs the factors of fit-factors for the config's model, which it holds a shared lock on until
    the checkpoint is written (fit-factors is refused meanwhile; `storage.guards_output_dir`). Settings default to
    spectrum.edit (keep, rho, share, layers, which default to spectrum.layers) and spectrum.order;
    `rho` alone implies keep mass, `share` alone keep share; `keep` with the other one's value
    (keep "share" with `rho`, keep "mass" with `share`) is refused, as that value would be ignored.

    Raises:
        UsageError: impossible --rho / --keep-share / --out / --order, `keep` with the other keep's value, or `layers`
            matching no tracked layer.
        OutputError: no kfac/ekfac factors of this model and factors.fisher, fit-factors writing them, or `out` exists without `overwrite`.
        ConfigError: the config's layer patterns (spectrum.edit, spectrum.layers) match no tracked layer.
        NumericalError: the chosen layers' factors hold NaN/Inf.
    """
    t0 = time.perf_counter()
    layers = [layers] if isinstance(layers, str) else layers
    e = cfg.spectrum.edit
    share_given = share
    out, keep, rho, share, order, order_key = _settings(cfg, out, keep, rho, share, order)
    source = cfg.resolve(cfg.model.checkpoint)
    ctx = prepare(cfg, state)
    factors, factors_path = load_kronecker_factors(ctx, order, order_key)
    if layers:
        patterns, key = layers, "--layers"
    elif e.layers is not None:
        patterns, key = e.layers, "spectrum.edit.layers"
    else:
        patterns, key = cfg.spectrum.layers, "spectrum.layers"
    chosen = select_layers(ctx.tracked, patterns, key, cfg.source)
    check_finite_factors(factors, factors_path, [tm.name for tm in chosen])
    storage.check_can_write(out, overwrite, "a checkpoint", "--out", storage.EDITED_CHECKPOINT_FORMAT)
    state_dict, edits = edit_model(ctx.model, chosen, factors.layers, keep=keep, rho=rho, share=share, order=order)
    _check_something_kept(edits, keep, share, explicit=share_given is not None)
    _warn_if_most_weight_removed(edits)
    tied = tied_keys(ctx.model)
    if source is not None:
        edited = {k for tm in chosen for k in _layer_keys(tm)}
        edited |= {other for k in edited for other in tied.get(k, [])}
        state_dict = _in_source_precision(state_dict, checkpoint_under_model_keys(ctx.model, source), tied, edited)
    if cfg.scores.checkpoints:
        n = len(cfg.scores.checkpoints)
        members = cfg.factors_path / storage.MEMBERS_DIR  # where fit-factors put the others' factors: no refit needed
        notices.warn(
            f"edit: only model.checkpoint is edited, not the {n} model{'s' if n > 1 else ''} of scores.checkpoints (to edit "
            f"scores.checkpoints[i - 1], run edit again with --set model.checkpoint=<it> --set scores.checkpoints=[] "
            f"--set factors_dir={members}/<i>, which holds its factors)"
        )
    fingerprint = _fingerprint(ctx.model, state_dict)
    if ctx.state.is_main:  # what a killed writer left (no lock guards --out), once nothing can refuse the run
        storage.remove_stale_temp_files(out, storage.UNLOCKED_TEMP_AGE_S)
    if ctx.state.is_main and out.suffix != ".safetensors":  # .pt / .pth: a plain state dict, which holds no metadata
        storage.save_state_dict(out, _tied_as_one(state_dict, tied), key="--out")
    elif ctx.state.is_main:
        storage.save_tensors(
            out,
            _one_name_per_tensor(state_dict, tied),
            {
                storage.FORMAT_KEY: storage.EDITED_CHECKPOINT_FORMAT,
                **ctx.provenance(_flags(keep, rho, share, order, layers)),
                "source_checkpoint": str(source) if source is not None else "",
                "source_fingerprint": ctx.model_fingerprint,
                "model_fingerprint": fingerprint,
                "factors": str(factors_path),
                "keep": keep,
                "rho": rho if keep == "mass" else None,
                "share": share if keep == "share" else None,
                "order": order,
                "layers": [ed.to_dict() for ed in edits],
            },
            key="--out",
        )
    ctx.state.barrier()
    return EditReport(
        out, str(source) if source is not None else "", keep, rho if keep == "mass" else None, share if keep == "share" else None,
        order, edits, ctx.model_fingerprint, fingerprint,
        {"total": time.perf_counter() - t0},
    )  # fmt: skip


EDIT_SUFFIXES = (".safetensors", ".pt", ".pth")  # --out: safetensors with the edit's metadata, or a plain torch.save state dict


MOST_WEIGHT = 0.5  # an edit that removes more of a layer's ‖[W | b]‖² is warned about


def _warn_if_most_weight_removed(edits: list[LayerEdit]) -> None:
    """Warns when the edit removes most of a layer's weight: the edited model may have lost what it learned
    (a trained network's weights can lie mostly in its low-curvature directions)."""
    heavy = [ed for ed in edits if ed.weight_share_removed > MOST_WEIGHT]
    if heavy:
        shown = ", ".join(f"{ed.name} {ed.weight_share_removed:.1%}" for ed in heavy[:4]) + (f", ... ({len(heavy)} layers)" if len(heavy) > 4 else "")
        notices.warn(
            f"edit: removes more than half of the weight (‖[W | b]‖²) of {shown}; check the edited model's accuracy "
            "before using it (a larger --keep-share or --rho keeps more)"
        )


def _check_something_kept(edits: list[LayerEdit], keep: str, share: float, explicit: bool) -> None:
    """Refuses an edit that keeps none of a layer's directions (its weight would become 0).

    Raises:
        UsageError: naming the layer, and the smallest share that keeps one of its directions.
    """
    for ed in edits:
        if ed.removed < ed.directions:
            continue
        if keep == "share":
            key = "--keep-share" if explicit else "spectrum.edit.share"
            fewest = min(e.directions for e in edits)
            raise UsageError(
                f"{key} {share:g} keeps none of the {ed.directions:,} directions of layer {ed.name or '(model)'!r} "
                f"(⌊{share:g}·{ed.directions:,} + ½⌋ = 0): its weights would all become 0",
                hint=f"give at least {_smallest_share(fewest):g} (one direction of every edited layer), or leave the layer out with --layers",
            )
        raise UsageError(  # mass: only a layer without curvature keeps nothing
            f"layer {ed.name or '(model)'!r} has no curvature in any direction, so no direction is kept: its weights would all become 0",
            hint="leave the layer out with --layers",
        )


def _layer_keys(tm: TrackedModule) -> list[str]:
    """The model's state-dict keys of layer `tm` (what `_layer_state` writes)."""
    prefix = f"{tm.name}." if tm.name else ""
    return [prefix + k for k in tm.module.state_dict()]


def _in_source_precision(
    state: dict[str, torch.Tensor], source: dict[str, torch.Tensor], tied: dict[str, list[str]], edited: set[str]
) -> dict[str, torch.Tensor]:
    """`state` (the float32 model's) with each tensor not in `edited` as the source checkpoint stores it (bit
    for bit and in its dtype, also a float64 one of a checkpoint the model reads in float32), and each edited
    floating tensor in the floating dtype the source stored it in (a bfloat16 checkpoint stays bfloat16: the
    same size). `source`: the checkpoint under the model's keys (`checkpoint_under_model_keys`: also one whose
    keys carry another prefix, or none where the model wraps the saved network); a tied name the source left
    out (it stores one of them) takes the dtype of the one it kept."""
    stored = {k: v.dtype for k, v in source.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    out = {}
    storages: set[int] = set()
    for k, v in state.items():
        kept = source.get(k)
        if k not in edited and isinstance(kept, torch.Tensor) and kept.shape == v.shape:
            # also where a module's load hook converts it: loading the edited file converts it again. Tensors of one
            # storage (views torch.load keeps as such) are copied apart: safetensors refuses tensors that overlap
            shared = kept.numel() > 0 and kept.untyped_storage().data_ptr() in storages
            storages.add(kept.untyped_storage().data_ptr())
            out[k] = kept.clone() if shared else kept
            continue
        dtype = stored.get(k) or next((stored[a] for a in tied.get(k, []) if a in stored), None)
        out[k] = v.to(dtype) if v.is_floating_point() and dtype is not None and dtype != v.dtype else v
    return out


def _smallest_share(n: int) -> float:
    """The smallest share of two significant digits that keeps one of n directions (⌊share·n + ½⌋ ≥ 1)."""
    step = 10.0 ** (math.floor(math.log10(0.5 / n)) - 1)
    share = math.ceil(0.5 / n / step) * step
    while directions_of_share(share, n) < 1:
        share += step
    return float(f"{share:.2g}") if directions_of_share(float(f"{share:.2g}"), n) >= 1 else share


def _one_name_per_tensor(state: dict[str, torch.Tensor], tied: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """`state` with each tied tensor under one name, the one safetensors' `save_model` keeps (the
    first in sorted order), so `safetensors.torch.load_model` and this tool's loader both read it."""
    dropped = {k for keys in tied.values() for k in sorted(keys)[1:]}
    return {k: v for k, v in state.items() if k not in dropped}


def _tied_as_one(state: dict[str, torch.Tensor], tied: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """`state` with every name of a tied tensor holding one tensor (the value of the name
    `_one_name_per_tensor` keeps), as `model.state_dict()` does: torch.save stores it once, and
    `load_state_dict` fills every name."""
    out = dict(state)
    for keys in tied.values():
        present = sorted(k for k in keys if k in out)
        for k in present[1:]:
            out[k] = out[present[0]]
    return out


def _fingerprint(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str:
    """models.model_fingerprint of `model` as it would be with `state_dict` loaded (the model is restored)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(state_dict, strict=True)
        return model_fingerprint(model)
    finally:
        model.load_state_dict(saved, strict=True)
