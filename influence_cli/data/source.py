"""What a data source provides before subsetting, and the conversions every reader shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli.config import resolve_path
from influence_cli.errors import DataError


@dataclasses.dataclass
class Source:
    """What a source provides before subsetting.

    Exactly one of `inputs` (in memory, [N, ...] raw values) and `items` (a lazy
    per-example loader called with a source index) is set.
    """

    n: int
    desc: str  # for messages: "t10k-images-idx3-ubyte.gz", "MNIST test split", ...
    inputs: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # [N] int64 (classes) or [N, ...] float32 (regression), or unknown
    items: Callable[[int], tuple[torch.Tensor, Any]] | None = None
    files: dict[str, Any] = dataclasses.field(default_factory=dict)  # canonical file info for the fingerprint
    class_names: list[str] | None = None
    files_of_examples: Sequence[str] | None = None  # by source index: each example's file (image folders) or place in it (a CSV's row: "t.csv:57"), shown by top-k
    raw_255: bool = False  # raw values are 8-bit pixel values (0..255)
    resize_in_items: bool = False  # `items` already applies transform.resize
    label_key: str = "source"  # spec key blamed for bad labels


def file_info(path: Path) -> list[Any]:
    """[file name, size in bytes] of a file, for the fingerprint.

    Not its folder: a project moved to another machine or mount keeps its fingerprints (and so
    its factors and scores); the labels and kept indices are hashed as well (`IndexedDataset.fingerprint`).
    """
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    return [path.name, size]


def existing_file(spec_value: str | None, key: str, base_dir: Path, what: str) -> Path:
    """The data file `spec_value` names (`what`, resolved against `base_dir`); DataError naming `key` when it is unset,
    missing, no file, or a file this user may not read."""
    if spec_value is None:
        raise DataError(f"{key}: required ({what})")
    path = resolve_path(spec_value, base_dir)
    if not path.exists():
        raise DataError(f"{key}: {str(path)!r} does not exist", hint="paths resolve against the config file's folder")
    if not path.is_file():
        raise DataError(f"{key}: {str(path)!r} is not a file")
    try:  # each reader's own failure would say "No such file" (safetensors) or blame the format
        with open(path, "rb"):
            pass
    except PermissionError:
        raise DataError(f"{key}: {str(path)!r} cannot be read (permission denied)", hint="give this user read permission on it (chmod)") from None
    except OSError:
        pass  # the reader says what is wrong
    return path


def to_inputs(value: Any, key: str, where: str) -> torch.Tensor:
    """Raw inputs [N, ...]: integer dtypes and float64 kept as they are, bool and other floats as float32."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{key}: the inputs in {where} have dtype {value.dtype}, not numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{key}: the inputs in {where} are a {type(value).__name__}, not a tensor")
    if value.is_complex():
        raise DataError(f"{key}: the inputs in {where} are complex numbers")
    if value.ndim == 0:
        raise DataError(f"{key}: the inputs in {where} are a single number, expected a tensor [N, ...]")
    if value.dtype == torch.bool or (value.is_floating_point() and value.dtype != torch.float64):
        return value.to(torch.float32)
    return value


LABELS_AS_NUMBERS_HINT = "labels must be class numbers 0, 1, ...: for class names, classes = sorted(set(names)) and label = classes.index(name)"


def _text_labels(value: Any) -> list[str]:
    """The first few labels of `value` when they are text (str or bytes: class names, digits as strings), else []."""
    items = value.reshape(-1)[:3].tolist() if isinstance(value, np.ndarray) else list(value[:3]) if isinstance(value, (list, tuple)) else []
    if items and all(isinstance(v, (str, bytes)) for v in items):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in items]
    return []


def to_labels(value: Any, key: str, where: str) -> torch.Tensor:
    """Labels [N]: int64 for integer (class) labels; regression targets float64 if stored so, else float32."""
    text = _text_labels(value)
    if text:
        raise DataError(f"{key}: the labels in {where} are text ({', '.join(repr(t) for t in text)}, ...), not class numbers", hint=LABELS_AS_NUMBERS_HINT)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise DataError(f"{key}: the labels in {where} have dtype {value.dtype}, not numbers")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (list, tuple)):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"{key}: the labels in {where} are not numbers ({exc})") from None
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{key}: the labels in {where} are a {type(value).__name__}, not a tensor")
    if value.ndim == 0:
        raise DataError(f"{key}: the labels in {where} are a single number, expected a tensor [N]")
    if value.dtype == torch.bool or not (value.is_floating_point() or value.is_complex()):
        return value.to(torch.int64)
    if value.is_complex():
        raise DataError(f"{key}: the labels in {where} are complex numbers")
    return value if value.dtype == torch.float64 else value.to(torch.float32)


def item_label(y: Any) -> torch.Tensor:
    """One example's label: int64 scalar for classes; regression targets (a tensor, array or list of numbers)
    float64 if given so, else float32."""
    if isinstance(y, torch.Tensor):
        if y.dtype == torch.bool or not y.is_floating_point():
            return y.to(torch.int64)
        return y if y.dtype == torch.float64 else y.to(torch.float32)
    if isinstance(y, (bool, int, np.integer, np.bool_)):
        return torch.tensor(int(y), dtype=torch.int64)
    if isinstance(y, (float, np.floating)):
        return torch.tensor(float(y), dtype=torch.float32)
    if isinstance(y, np.ndarray):
        return item_label(torch.from_numpy(np.ascontiguousarray(y)).reshape(y.shape))
    if isinstance(y, (list, tuple)) and not any(isinstance(v, (str, bytes)) for v in y):  # e.g. a row of regression targets
        return item_label(_numbers(y, "a label"))
    raise TypeError(f"a label must be a number, a list of numbers or a tensor, got {type(y).__name__}")


def _numbers(values: list | tuple, what: str) -> torch.Tensor:
    """A list or tuple of real numbers (nested, of one shape) as a tensor; TypeError naming `what` otherwise."""
    try:
        value = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{what} given as a {type(values).__name__} must hold numbers of one shape") from None
    if value.is_complex():
        raise TypeError(f"{what} given as a {type(values).__name__} must hold real numbers")
    return value


def item_input(x: Any) -> torch.Tensor:
    """One example's raw input as a tensor (PIL images become [C, H, W] 0..255; lists of numbers a tensor)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).reshape(x.shape)  # 0-d stays 0-d
    if isinstance(x, (int, float, np.number)) and not isinstance(x, bool):
        return torch.tensor(float(x))
    if isinstance(x, (list, tuple)):  # e.g. a list of token ids
        return _numbers(x, "an input")
    if hasattr(x, "getbands") and hasattr(x, "size"):  # a PIL image
        return pil_to_tensor(x)
    raise TypeError(f"an input must be a tensor, an array or a PIL image, got {type(x).__name__}")


def pil_to_tensor(img: Any) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W]: grayscale modes as one channel, every other mode
    (palette, RGBA, CMYK, ...) as RGB, the colours the image shows.

    Raises:
        TypeError: 16-bit or float images (converting them to 8 bits would clip them).
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise TypeError(f"a {img.mode} image (16-bit or float) cannot be read as 8-bit; return a tensor instead")
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "LA") else "RGB")
    arr = np.array(img)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
