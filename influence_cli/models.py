"""Models: built-in architectures, torchvision and factory models, strict checkpoint loading.

`model.architecture` is one of:

- a built-in name (`mlp`, `cnn`, see `BUILTIN_ARCHITECTURES`);
- `torchvision:<name>` (built with `weights=None`: nothing is downloaded);
- `package.module:function`, imported with the config's folder on `sys.path` and
  called with `model.kwargs`; it must return an `nn.Module`.

Checkpoints are `.safetensors` files or `.pt`/`.pth`/`.bin` files holding a state dict
(the usual `{"state_dict": ...}`-style wrappers and `module.`/`_orig_mod.` prefixes are
accepted). Loading is strict: every key and shape must match the built model.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence_cli import notices, storage
from influence_cli.config import ADAPTER_ONLY, ModelConfig, resolve_path
from influence_cli.errors import ModelError, first_line, out_of_memory
from influence_cli.tracking import unmaterialized
from influence_cli.user_code import (
    colon_form_hint,
    import_attribute,
    keeps_random_state,
    note_training_modes,
    seed_generators,
)

__all__ = [
    "BUILTIN_ARCHITECTURES",
    "takes_token_ids",
    "build_model",
    "load_checkpoint",
    "load_model",
    "model_fingerprint",
    "names_a_class",
    "read_state_dict",
    "tied_keys",
]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema", "ema")  # in this order
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_KWARGS_HINT = "check model.architecture and model.kwargs: they must describe the network the checkpoint was saved from"
_MEMBER_HINT = (  # a checkpoint of scores.checkpoints: model.checkpoint, loaded first, fits model.architecture and model.kwargs
    "the models of an ensemble share model.architecture and model.kwargs (model.checkpoint's network): "
    "list in scores.checkpoints only checkpoints of that network, such as other training seeds"
)


def _kwargs_hint(key: str) -> str:
    """The fix of a checkpoint that does not fit the model, by the config key that named it."""
    return _MEMBER_HINT if key.startswith("scores.checkpoints") else _KWARGS_HINT


# ----------------------------------------------------------------------------- built-in architectures


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"model.kwargs.{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_int_list(name: str, value: Any, allow_empty: bool = True) -> list[int]:
    if not isinstance(value, (list, tuple)) or (not allow_empty and not value):
        raise ModelError(f"model.kwargs.{name}: expected a list of positive integers, got {value!r}")
    return [_check_int(f"{name}[{i}]", v) for i, v in enumerate(value)]


def mlp(
    input_dim: int,
    hidden: list[int] | tuple[int, ...] = (128, 128),
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """A multilayer perceptron; inputs [B, ...] are flattened to [B, input_dim] first.

    Layers are named `flatten`, `fc1`, `act1`, ..., `fcN`, `actN`, `head`.

    Args:
        input_dim: Features per example after flattening.
        hidden: Widths of the hidden layers (may be empty: a linear model).
        num_classes: Outputs (classes, or regression targets).
        activation: relu | tanh | gelu.
    """
    input_dim = _check_int("input_dim", input_dim)
    hidden = _check_int_list("hidden", hidden)
    num_classes = _check_int("num_classes", num_classes)
    if activation not in _ACTIVATIONS:
        raise ModelError(f"model.kwargs.activation: expected one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = input_dim
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"act{i}"] = _ACTIVATIONS[activation]()
        width = h
    layers["head"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    channels: list[int] | tuple[int, ...] = (16, 32),
    image_size: int | list[int] | tuple[int, int] = 28,
    kernel_size: int = 3,
    padding: int = 1,
    fc_dim: int = 64,
) -> nn.Sequential:
    """A small CNN: (Conv2d -> ReLU -> MaxPool2d(2)) per entry of `channels`, then a 2-layer head.

    Layers are named `conv1`, `relu1`, `pool1`, ..., `flatten`, `fc`, `relu`, `head`.

    Args:
        in_channels: Input image channels.
        num_classes: Outputs.
        channels: Output channels of each conv block.
        image_size: Input height and width (an int for square images, or [height, width]).
        kernel_size: Conv kernel size.
        padding: Conv padding.
        fc_dim: Width of the hidden fully connected layer.
    """
    in_channels = _check_int("in_channels", in_channels)
    num_classes = _check_int("num_classes", num_classes)
    channels = _check_int_list("channels", channels, allow_empty=False)
    kernel_size = _check_int("kernel_size", kernel_size)
    padding = _check_int("padding", padding, minimum=0)
    fc_dim = _check_int("fc_dim", fc_dim)
    if isinstance(image_size, (list, tuple)):
        if len(image_size) != 2:
            raise ModelError(f"model.kwargs.image_size: expected an integer or [height, width], got {image_size!r}")
        height, width = (_check_int(f"image_size[{i}]", v) for i, v in enumerate(image_size))
    else:
        height = width = _check_int("image_size", image_size)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    for i, out in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, out, kernel_size=kernel_size, padding=padding)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c = out
        height = (height + 2 * padding - kernel_size + 1) // 2
        width = (width + 2 * padding - kernel_size + 1) // 2
        if height < 1 or width < 1:
            raise ModelError(
                f"model.kwargs: image_size {image_size!r} is too small for {len(channels)} conv blocks "
                f"(the feature map vanishes after block {i})",
                hint="use fewer entries in model.kwargs.channels or a larger model.kwargs.image_size",
            )
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c * height * width, fc_dim)
    layers["relu"] = nn.ReLU()
    layers["head"] = nn.Linear(fc_dim, num_classes)
    return nn.Sequential(layers)


BUILTIN_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn}


# ----------------------------------------------------------------------------- building


@contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Seeds torch's generators for the block (`seed_generators`: the CPU's, and each CUDA device's where CUDA is
    initialized) and leaves every global generator as it was afterwards (`keeps_random_state`), whatever the builder draws."""
    with keeps_random_state():
        seed_generators(seed, torch_only=True)
        yield


def _import_factory(spec: str, base_dir: Path) -> Callable[..., Any]:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name or ":" in func_name:
        raise ModelError(
            f"model.architecture: {spec!r} is not a built-in name, torchvision:<name> or package.module:function",
            hint=f"built-in architectures: {', '.join(BUILTIN_ARCHITECTURES)}",
        )
    func = import_attribute(module_name, func_name, base_dir, "model.architecture", ModelError, missing="attribute")
    if not callable(func):
        raise ModelError(f"model.architecture: {spec!r} is not callable")
    return func


def names_a_class(architecture: str, base_dir: str | Path) -> bool:
    """Whether `architecture` names an nn.Module class of the user's code (`my_model:Net`, an alias of it, or a
    functools.partial of it), which builds the model with the weights its __init__ gives it; False for a
    function, a classmethod (`Net.pretrained`), a callable instance and anything that does not import."""
    arch = architecture.strip()
    if ":" not in arch or arch.startswith("torchvision:"):
        return False
    try:
        func: Any = _import_factory(arch, Path(base_dir))
    except ModelError:
        return False
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.isclass(func) and issubclass(func, nn.Module)


def _check_signature(func: Callable[..., Any], kwargs: dict[str, Any], label: str) -> bool:
    """Refuses kwargs the builder's signature does not take; False when it has none that names
    every argument (no signature, or **kwargs)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without signatures: let the call decide
        return False
    try:
        sig.bind(**kwargs)
    except TypeError as exc:
        params = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
        raise ModelError(
            f"model.kwargs: {label} rejects the keyword arguments ({exc})",
            hint=f"{label} takes: {', '.join(params) if params else 'no arguments'}",
        ) from None
    return all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _call_builder(func: Callable[..., Any], kwargs: dict[str, Any], label: str) -> Any:
    signature_checked = _check_signature(func, kwargs, label)
    try:
        return func(**kwargs)
    except ModelError:
        raise
    except TypeError as exc:
        if signature_checked:  # the arguments fit: the TypeError comes from inside the builder
            raise ModelError(f"model.architecture: {label} raised TypeError: {first_line(exc)}") from exc
        raise ModelError(f"model.kwargs: {label} failed with these keyword arguments: {first_line(exc)}") from exc
    except Exception as exc:  # user factories can raise anything
        if (memory := out_of_memory(exc, f"building {label} with these model.kwargs needs more memory than this machine has")) is not None:
            raise memory from exc
        raise ModelError(f"model.architecture: {label} raised {type(exc).__name__}: {first_line(exc)}", hint=getattr(exc, "hint", None)) from exc
    except SystemExit as exc:  # sys.exit() in a factory: its code would read as one of this tool's exit codes
        raise ModelError(f"model.architecture: {label} called sys.exit({exc.code!r})") from None


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        raise ModelError(f"model.architecture: torchvision:{name} needs torchvision ({exc})") from None
    available = sorted(torchvision.models.list_models())
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.75)
        hint = f"close names: {', '.join(close)}" if close else f"for example: {', '.join(available[:8])}"
        raise ModelError(f"model.architecture: torchvision has no model {name!r}", hint=hint)

    def build(**kwargs: Any) -> nn.Module:
        if "weights" in kwargs or "pretrained" in kwargs:
            raise ModelError(
                f"model.kwargs: torchvision models are built without weights ({'weights' if 'weights' in kwargs else 'pretrained'} "
                "is not taken); the weights come from model.checkpoint",
                hint=f"save torchvision.models.get_model({name!r}, weights=...).state_dict() to a file and name it in model.checkpoint",
            )
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return build


def build_model(cfg: ModelConfig, base_dir: str | Path) -> nn.Module:
    """Builds the model `cfg` describes, randomly initialized with a fixed seed (0).

    The global RNG state of the caller is left unchanged.

    Args:
        cfg: The model block of the config.
        base_dir: The config file's folder (put on `sys.path` for `package.module:function`).

    Raises:
        ModelError: naming `model.architecture` or `model.kwargs`.
    """
    arch = (cfg.architecture or "").strip()
    kwargs = dict(cfg.kwargs or {})
    base = Path(base_dir)
    if not arch:
        raise ModelError(
            "model.architecture: missing",
            hint=f"use one of {', '.join(BUILTIN_ARCHITECTURES)}, torchvision:<name> or package.module:function",
        )
    if arch in BUILTIN_ARCHITECTURES:
        func: Callable[..., Any] = BUILTIN_ARCHITECTURES[arch]
        label = f"built-in {arch!r}"
    elif arch.startswith("torchvision:"):
        name = arch.split(":", 1)[1]
        func = _torchvision_builder(name)
        label = f"torchvision model {name!r}"
    elif ":" in arch:
        func = _import_factory(arch, base)
        label = f"factory {arch!r}"
    else:
        close = difflib.get_close_matches(arch.lower(), list(BUILTIN_ARCHITECTURES), n=3)
        own = colon_form_hint(arch, base)
        if own:
            hint = own
        elif close:
            hint = f"did you mean {', '.join(close)}?"
        else:
            hint = (
                f"built-in names: {', '.join(BUILTIN_ARCHITECTURES)}; or torchvision:<name> or package.module:function"
            )
        raise ModelError(f"model.architecture: unknown architecture {arch!r}", hint=hint)
    with _seeded(0):
        model = _call_builder(func, kwargs, label)
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model.architecture: {label} returned {type(model).__name__}, not a torch.nn.Module",
            hint="the factory must return the model object (an nn.Module)",
        )
    note_training_modes(model)  # the run puts it in eval mode; its modes are put back when the run ends (it may be the user's own)
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if not isinstance(t, nn.parameter.UninitializedTensorMixin)]
    on_meta = [name for name, t in tensors if t.is_meta]
    if on_meta:
        raise ModelError(
            f"model.architecture: {label} built the model on the meta device: {_listing(on_meta, 'tensor')} hold no values",
            hint="build it on the CPU (a factory that builds on torch.device('meta') must also load the weights: "
            "model.to_empty(device='cpu'), then load_state_dict)",
        )
    inference = [name for name, t in tensors if t.is_inference()]
    if inference:
        raise ModelError(
            f"model.architecture: {label} built the model under torch.inference_mode(): {_listing(inference, 'tensor')} "
            "can neither load weights nor take gradients",
            hint="build it outside inference_mode (torch.no_grad() is fine)",
        )
    return model


# ----------------------------------------------------------------------------- checkpoints


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state(obj: Any, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The first tensor dict under the wrapper keys, depth first (wrappers nest: {"model": {"state_dict": ...}})."""
    if _is_tensor_dict(obj):
        return {str(k): v for k, v in obj.items()}
    if not isinstance(obj, Mapping) or depth >= 4:
        return None
    for key in _WRAPPER_KEYS:
        found = _find_state(obj[key], depth + 1) if key in obj else None
        if found is not None:
            return found
    return None


def _mixed_state(obj: Any, depth: int = 0) -> Mapping[Any, Any] | None:
    """The first mapping (under the wrapper keys, as _find_state looks) whose values are mostly
    tensors but not all: a state dict with something else mixed in."""
    if not isinstance(obj, Mapping) or depth > 4:
        return None
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    if tensors and 2 * tensors >= len(obj):
        return obj
    return next((m for key in _WRAPPER_KEYS if key in obj and (m := _mixed_state(obj[key], depth + 1)) is not None), None)


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    found = _find_state(obj)
    if found is not None:
        holding = [key for key in _WRAPPER_KEYS if isinstance(obj, Mapping) and key in obj and _find_state(obj[key], 1) is not None]
        if len(holding) > 1:  # e.g. timm's state_dict and state_dict_ema
            notices.warn(f"{where} holds state dicts under {', '.join(holding)}; loading {holding[0]} (the first of {', '.join(_WRAPPER_KEYS)})")
        return found
    mixed = _mixed_state(obj)
    if mixed is not None:
        others = [f"{k!r} ({type(v).__name__})" for k, v in mixed.items() if not isinstance(v, torch.Tensor)]
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ModelError(
            f"{where} holds a state dict with {len(others)} value(s) that are not tensors: {shown}",
            hint="save model.state_dict() alone (settings such as the step or epoch beside it, not inside it)",
        )
    if isinstance(obj, Mapping):
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        what = f"a mapping with keys {shown}" if keys else "an empty mapping"
    else:
        what = f"a {type(obj).__name__}"
    raise ModelError(
        f"{where} holds {what}, not a state dict of tensors",
        hint="save model.state_dict(), alone or under one of the keys " + ", ".join(_WRAPPER_KEYS) + ", or a .safetensors file",
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def read_state_dict(path: str | Path, key: str = "model.checkpoint", strip: bool = True) -> dict[str, torch.Tensor]:
    """Reads a checkpoint file into a plain state dict on the CPU (wrappers and prefixes removed).

    Args:
        path: A .safetensors, .pt, .pth or .bin file, or the index of a sharded checkpoint (`*.index.json`).
        key: The config key the path came from, used in error messages.

    Raises:
        ModelError: the file is missing, unreadable, corrupt or holds no state dict.
    """
    path = Path(path)
    where = f"{key}: {str(path)!r}"
    if not path.is_file():
        raise ModelError(f"{where} does not exist")
    if path.name.endswith(".index.json"):
        return _read_sharded(path, where, key, strip)
    try:
        suffix = _checkpoint_format(path)
    except OSError as exc:  # permission denied, an I/O error
        raise ModelError(f"{where}: cannot read the checkpoint ({exc.strerror or exc})", hint="check that this user may read the file") from None
    if suffix != ".safetensors" and _is_torchscript(path):  # torch.load would hand it to torch.jit.load
        raise ModelError(
            f"{where}: cannot read the checkpoint (a TorchScript archive, written by torch.jit.save)",
            hint="save model.state_dict() with torch.save, or as .safetensors",
        )
    try:
        if suffix == ".safetensors":
            obj: Any = storage.load_safetensors(path)
        else:
            with path.open("rb") as fh:  # a file object: torch.load hands a path named *.safetensors to safetensors
                obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many kinds of errors
        reason, objects = torch_load_reason(exc, path)
        hint = "the file may be truncated or not a checkpoint; re-save it from the trained model"
        if suffix != ".safetensors" and objects:
            hint = "the file holds pickled objects other than tensors (a whole model, or settings beside the weights): save model.state_dict() alone"
        raise ModelError(f"{where}: cannot read the checkpoint ({type(exc).__name__}: {reason})", hint=hint) from None
    state = _unwrap(obj, where)
    return _strip_prefixes(state) if strip else state


def _read_sharded(path: Path, where: str, key: str, strip: bool) -> dict[str, torch.Tensor]:
    """A sharded checkpoint from its index (Hugging Face's `model.safetensors.index.json`, {"weight_map": {name: shard
    file beside it}}): each shard's tensors that the map assigns to it.

    Raises:
        ModelError: the index is not such a JSON file, names an index or a missing file as a shard, or a shard lacks
            a tensor the index assigns to it.
    """
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError(weight_map)
    except OSError as exc:
        raise ModelError(f"{where}: cannot read the checkpoint ({exc.strerror or exc})", hint="check that this user may read the file") from None
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deeply to read
        raise ModelError(
            f"{where}: not the index of a sharded checkpoint (a JSON object whose weight_map maps each tensor name to its shard file)",
            hint="name the checkpoint's own file (.safetensors, .pt, .bin), or the model.safetensors.index.json save_pretrained wrote",
        ) from None
    shards = list(dict.fromkeys(weight_map.values()))
    nested = next((s for s in shards if s.endswith(".index.json")), None)
    if nested is not None:  # read as an index in turn (the index itself: without end)
        raise ModelError(f"{where}: the index names {nested!r} as a shard, an index itself", hint="map each tensor name to its shard file (.safetensors, .bin)")
    absent = [s for s in shards if not (path.parent / s).is_file()]
    if absent:  # all of them, before any shard is read
        raise ModelError(
            f"{where}: shard {absent[0]!r}, which the index names, is not beside it"
            + (f" ({len(absent)} of its {len(shards)} shards are missing)" if len(absent) > 1 else ""),
            hint="copy every file save_pretrained wrote into the index's folder",
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = read_state_dict(path.parent / shard, key, strip=False)
        names = [n for n, f in weight_map.items() if f == shard]
        missing = [n for n in names if n not in part]
        if missing:
            raise ModelError(
                f"{where}: shard {shard!r} holds no tensor {missing[0]!r}, which the index assigns to it",
                hint="the index and its shards come from different saves: save the model again",
            )
        state.update({n: part[n] for n in names})
    return _strip_prefixes(state) if strip else state


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint is read from: `path`, and for the index of a sharded checkpoint the shards it names
    (those of an index that cannot be read: none, `read_state_dict` says why)."""
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        shards = json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()
        return [path, *(path.parent / s for s in dict.fromkeys(shards) if isinstance(s, str))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return [path]


def torch_load_reason(exc: BaseException, path: Path) -> tuple[str, bool]:
    """One readable line (at most 300 characters) for a failed read of `path` (`torch.load(..., weights_only=True)`,
    safetensors), and whether the file holds pickled objects other than tensors (torch's own message is a multi-line
    preamble of options a user of this tool does not have, with terminal escape codes). An empty file is said to be
    empty (torch.load's EOFError and safetensors' 'header too small' say it less plainly)."""
    if path.stat().st_size == 0:
        return "the file is empty", False
    text = str(exc).strip()
    reason = first_line(exc, type(exc).__name__)
    if "WeightsUnpickler error:" in text:  # the line after the preamble says why
        reason = next((line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()), reason)
    objects = "Unsupported global" in text
    if objects:
        reason = reason.split(" was not an allowed global", 1)[0] + " (not a tensor)"
    return reason[:300], objects


def _checkpoint_format(path: Path) -> str:
    """".pt" (torch.save: a zip archive or a legacy pickle) or ".safetensors", from the file's first bytes, whatever its name."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):  # a zip archive: torch.save's format
        return ".pt"
    if head[8:9] == b"{":  # safetensors: an 8-byte header length (whose first byte may be 0x80), then the JSON header
        return ".safetensors"
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return ".pt"
    return ".safetensors" if path.suffix.lower() == ".safetensors" else ".pt"


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _listing(items: list[str], noun: str) -> str:
    plural = noun if len(items) == 1 else noun + "s"
    shown = ", ".join(items[:5]) + (f", ... ({len(items) - 5} more)" if len(items) > 5 else "")
    return f"{len(items)} {plural} ({shown})"


def tied_keys(model: nn.Module) -> dict[str, list[str]]:
    """Each state-dict key of a tensor that several keys share (tied weights) -> all of its keys."""
    by_tensor: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(v), []).append(k)
    return {k: keys for keys in by_tensor.values() if len(keys) > 1 for k in keys}


def _with_tied(state: dict[str, torch.Tensor], tied: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """`state` with every tied key it lacks filled from another key of the same tensor: files
    written by safetensors' `save_model` keep one name per shared tensor."""
    missing = [k for k in tied if k not in state]
    if not missing:
        return state
    filled = dict(state)
    for k in missing:
        source = next((other for other in tied[k] if other in state), None)
        if source is not None:
            filled[k] = state[source]
    return filled


def _differing_tied(state: dict[str, torch.Tensor], tied: dict[str, list[str]]) -> str:
    """The first group of tied keys that `state` gives different values ("a vs b"), else ""."""
    for keys in {tuple(keys) for keys in tied.values()}:
        given = [k for k in keys if k in state]
        for other in given[1:]:
            if not torch.equal(state[given[0]], state[other]):
                return f"{given[0]} vs {other}"
    return ""


def _match_extra_prefix(state: dict[str, torch.Tensor], expected: set[str], tied: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Makes the keys match by one common leading component: stripped from the checkpoint's keys
    (e.g. Lightning's `model.`), or added to them when the model wraps the saved network (a
    factory returning `Wrapper(model)` that picks the logits out of its output).

    Returns:
        The keys that match exactly, else those that share the most keys with the model (so a
        mismatch lists only the keys that really differ), the checkpoint's own on a tie.
    """
    candidates = [state]
    first = {k.split(".", 1)[0] for k in state}
    if len(first) == 1 and all("." in k for k in state):
        prefix = next(iter(first)) + "."
        candidates.append({k[len(prefix) :]: v for k, v in state.items()})
    own_first = {k.split(".", 1)[0] for k in expected}
    if len(own_first) == 1 and all("." in k for k in expected):
        prefix = next(iter(own_first)) + "."
        candidates.append({prefix + k: v for k, v in state.items()})
    return max(candidates, key=lambda c: (set(_with_tied(c, tied)) == expected, len(set(c) & expected)))


def _with_versions(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` carrying the built model's module versions (`state_dict()._metadata`), which a
    safetensors file cannot hold and the unwrapping drops: modules that convert older layouts in
    `_load_from_state_dict` read them (torchvision's MNASNet refuses a state dict without one)."""
    out = OrderedDict(state)
    metadata = getattr(own, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _adapter_only(path: Path, missing: list[str], unexpected: list[str]) -> bool:
    """Whether a checkpoint that lacks `missing` keys of the model looks like an adapter's weights alone: peft's
    save_pretrained file (adapter_model.safetensors), or unexpected keys that are all LoRA factors
    (`...lora_A.weight`: peft leaves the adapter's name out of the keys it saves)."""
    lora = bool(unexpected) and all(any(part.startswith("lora_") for part in k.split(".")) for k in unexpected)
    return bool(missing) and (path.name.startswith("adapter_model.") or lora)


def _under_model_keys(raw: dict[str, torch.Tensor], own: set[str], tied: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict under the model's keys, as `load_checkpoint` loads it: wrapper prefixes
    ("module.", ...) removed unless the model's own keys carry them, one leading component stripped or
    added (`_match_extra_prefix`), and tied keys the file left out filled from the one it kept."""
    state = raw if set(raw) == own else _match_extra_prefix(_strip_prefixes(raw), own, tied)
    return _with_tied(state, tied)


def checkpoint_under_model_keys(model: nn.Module, path: str | Path, key: str = "model.checkpoint") -> dict[str, torch.Tensor]:
    """The checkpoint at `path` as `load_checkpoint` would load it into `model`, by the model's keys
    (the tensors as stored, in their own dtypes; keys the model lacks are kept as they are).

    Raises:
        ModelError: unreadable file.
    """
    return _under_model_keys(read_state_dict(path, key, strip=False), set(model.state_dict()), tied_keys(model))


def load_checkpoint(model: nn.Module, path: str | Path, key: str = "model.checkpoint") -> None:
    """Loads a checkpoint into `model` in place, strictly (every key and shape must match).

    Args:
        model: The built model.
        path: A .safetensors, .pt, .pth or .bin file.
        key: The config key the path came from, used in error messages.

    Raises:
        ModelError: unreadable file, or missing/unexpected keys or shape mismatches (listed).
    """
    raw = read_state_dict(path, key, strip=False)
    floating = [v for v in raw.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if floating and all(v.dtype == torch.float64 for v in floating):
        model.double()  # a float64 checkpoint is not rounded to float32
    own = model.state_dict()
    tied = tied_keys(model)
    state = _under_model_keys(raw, set(own), tied)
    if lazy_layers(model):  # lazy layers take their shapes from the checkpoint (torch's own load hook)
        lazy_keys = {k for k, v in own.items() if isinstance(v, nn.parameter.UninitializedTensorMixin)}
        model.load_state_dict(_with_versions({k: v for k, v in state.items() if k in lazy_keys}, own), strict=False)
        own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]  # BatchNorm fills it in, as torch does
    unexpected = [k for k in state if k not in own]
    integer = [f"{k} ({state[k].dtype})" for k, v in own.items() if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    if integer:
        raise ModelError(
            f"{key}: {str(Path(path))!r} holds integer tensors for floating parameters: " + _listing(integer, "tensor"),
            hint="re-save the checkpoint from the trained model (model.state_dict())",
        )
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or mismatched) and (differing := _differing_tied(state, tied)):
        raise ModelError(
            f"{key}: {str(Path(path))!r} holds different values for weights the model ties (shares): {differing}",
            hint="the checkpoint is of an untied variant of the model; load it into a model that does not tie these weights",
        )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append("missing " + _listing(missing, "key"))
        if unexpected:
            parts.append("unexpected " + _listing(unexpected, "key"))
        if mismatched:
            parts.append(_listing(mismatched, "shape mismatch").replace("mismatchs", "mismatches"))
        if _adapter_only(Path(path), missing, unexpected):  # the keys would only list what an adapter file leaves out
            raise ModelError(
                f"{key}: {str(Path(path))!r} holds {_listing(sorted(state), 'key')}, {ADAPTER_ONLY.partition(': ')[0]} (the model has {len(own)} keys)",
                hint=ADAPTER_ONLY.partition(": ")[2],
            )
        head = None if missing or unexpected or key.startswith("scores.checkpoints") else _output_head(model, state, own)
        raise ModelError(f"{key}: {str(Path(path))!r} does not match the model: " + "; ".join(parts), hint=head or _kwargs_hint(key))
    try:
        model.load_state_dict(_with_versions(state, own), strict=not any(k not in state for k in own))
    except RuntimeError as exc:  # pragma: no cover - keys and shapes were checked above
        raise ModelError(f"{key}: {str(Path(path))!r} cannot be loaded: {exc}", hint=_kwargs_hint(key)) from None


def _output_head(model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """The fix of a checkpoint whose only mismatch is the outputs of one nn.Linear (a classifier's head of another number
    of classes, such as torchvision's 1000): its weight [out, in] (and bias [out]) differ in `out` alone. An embedding's
    table [vocabulary, dim] differs alike in its rows: a vocabulary, not a head."""
    differ = {k for k, v in own.items() if k in state and state[k].shape != v.shape}
    weights = [k for k in differ if k.endswith(".weight")]
    layer = weights[0].rpartition(".")[0] if len(weights) == 1 else ""
    if not layer or differ - {f"{layer}.weight", f"{layer}.bias"} or not isinstance(dict(model.named_modules()).get(layer), nn.Linear):
        return None
    ours, theirs = own[f"{layer}.weight"].shape, state[f"{layer}.weight"].shape
    if len(ours) != 2 or ours[1] != theirs[1] or (f"{layer}.bias" in differ and state[f"{layer}.bias"].shape != theirs[:1]):
        return None
    return (
        f"the checkpoint's {layer} has {theirs[0]} outputs, the model's {ours[0]}: set model.kwargs.num_classes: {theirs[0]} "
        "(or the argument of your model that sets its outputs)"
    )


def load_model(
    cfg: ModelConfig,
    base_dir: str | Path,
    checkpoint: str | Path | None = None,
    *,
    key: str = "model.checkpoint",
) -> nn.Module:
    """Builds the model, loads its weights and puts it in eval mode, on the CPU.

    The model keeps the precision of its checkpoint when every floating tensor there is
    float64 (its curvature and scores are then computed in float64), else it is float32.
    Without a checkpoint, a factory's model whose floating tensors are all float64 stays float64.

    Args:
        cfg: The model block of the config.
        base_dir: The config file's folder; a relative `cfg.checkpoint` resolves against it.
        checkpoint: Weights to load instead of `cfg.checkpoint` (used as given).
        key: The config key named in checkpoint errors.

    Raises:
        ModelError: the model cannot be built or the checkpoint does not fit it.
    """
    try:  # the same model and file on every rank of a torchrun job
        model = build_model(cfg, base_dir)
        if checkpoint is None and cfg.checkpoint:
            checkpoint = resolve_path(cfg.checkpoint, base_dir)
        model = model.to(device="cpu", dtype=torch.float64 if checkpoint is None and _all_float64(model) else torch.float32)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint, key=key)
    except ModelError as exc:
        exc.everywhere()
        raise
    lazy = lazy_layers(model)
    if lazy:
        raise ModelError(
            f"model.architecture: the model has lazy layers whose shapes are not set yet ({', '.join(lazy[:3])})",
            hint="give model.checkpoint (it sets them), or run the model once on a dummy batch in the factory before returning it",
        )
    return model.eval()


def _all_float64(model: nn.Module) -> bool:
    """Every floating parameter and buffer of `model` is float64 (lazy ones, without a dtype yet, aside)."""
    floating = [
        t
        for t in (*model.parameters(), *model.buffers())
        if not isinstance(t, nn.parameter.UninitializedTensorMixin) and t.is_floating_point()
    ]
    return bool(floating) and all(t.dtype == torch.float64 for t in floating)


def lazy_layers(model: nn.Module) -> list[str]:
    """Names (with types) of the model's lazy modules (nn.LazyLinear, ...) whose parameters are not materialized."""
    return [
        f"{type(m).__name__} {name!r}"
        for name, m in model.named_modules()
        if unmaterialized(m)
    ]


# ----------------------------------------------------------------------------- fingerprint


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's state dict: names, shapes, dtypes and the bytes of every tensor.

    Returns:
        The first 16 hex characters of a sha256 digest; any weight change changes it.
    """
    return storage.tensors_digest(model.state_dict())[:16]


def model_definition(cfg: ModelConfig, model: nn.Module) -> dict[str, Any]:
    """What builds the model, beside its weights: model.architecture, model.kwargs and the module tree.

    The weights' fingerprint misses a changed keyword that keeps every tensor shape (attention
    heads, an activation, a dropout-free variant); outputs record this too, and later commands
    compare it.

    Returns:
        {"architecture": str, "kwargs": the kwargs as JSON values, "modules": 16 hex characters
        hashing every module's name and class}.
    """
    tree = "\n".join(f"{name}|{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules())
    return {
        "architecture": cfg.architecture,
        "kwargs": json.loads(storage.canonical_json(cfg.kwargs)),
        "modules": hashlib.sha256(tree.encode()).hexdigest()[:16],
    }


def definition_change(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """The difference between two `model_definition`s, in words ("model.kwargs.nhead 4 -> 2")."""
    parts = []
    if recorded.get("architecture") != current.get("architecture"):
        parts.append(f"model.architecture {recorded.get('architecture')!r} -> {current.get('architecture')!r}")
    old, new = recorded.get("kwargs") or {}, current.get("kwargs") or {}
    for key in sorted(set(old) | set(new)):
        if (key in old, old.get(key)) != (key in new, new.get(key)):
            was, now = (json.dumps(d[key]) if key in d else "(unset)" for d in (old, new))
            parts.append(f"model.kwargs.{key} {was} -> {now}")
    if not parts and recorded.get("modules") != current.get("modules"):
        parts.append("the model's modules (names or classes) changed")
    return ", ".join(parts) or "the model definition changed"


def takes_token_ids(model: nn.Module) -> bool:
    """Whether the model has an embedding table (nn.Embedding / nn.EmbeddingBag): integer inputs are then token ids."""
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules())
