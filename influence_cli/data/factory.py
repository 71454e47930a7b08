"""User factories: `package.module:function` returning a Dataset of (x, y) or a pair (inputs, labels)."""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli import notices
from influence_cli.config import DataSpec
from influence_cli.data.source import LABELS_AS_NUMBERS_HINT, Source, file_info, item_input, item_label, to_inputs, to_labels
from influence_cli.errors import DataError, first_few, first_line
from influence_cli.user_code import import_failure_hint, import_from, keeps_random_state, missing_function_hint, on_sys_path


class _FactoryItems:
    """Loads item `i` of a user's Dataset as (raw input tensor, label); picklable if the dataset is."""

    def __init__(self, dataset: Any, key: str):
        self.dataset = dataset
        self.key = key

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            item = self.dataset[index]
        except Exception as exc:
            reason = first_line(exc)
            raise DataError(f"{self.key}: item {index} raised {type(exc).__name__}: {reason}") from None
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            if isinstance(item, dict):  # Hugging Face datasets and many projects' own give {"image": ..., "label": ...}
                keys = list(item)
                shown = first_few([repr(k) for k in keys], 6)
                raise DataError(
                    f"{self.key}: item {index} is a dict (keys {shown}), expected a pair (x, y)",
                    hint="return (input, label) from __getitem__, or have the factory return a Dataset wrapping this one "
                    "whose __getitem__ returns (item[<input key>], item[<label key>])",
                )
            raise DataError(
                f"{self.key}: item {index} is a {type(item).__name__}, expected a pair (x, y)",
                hint="the Dataset's __getitem__ must return (input, label)",
            )
        try:
            return item_input(item[0]), item_label(item[1])
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
            text = isinstance(item[1], (str, bytes))
            raise DataError(f"{self.key}: item {index}: {exc}" + (f" ({item[1]!r})" if text else ""), hint=LABELS_AS_NUMBERS_HINT if text else None) from None


def _targets_match_items(dataset: Any, targets: torch.Tensor, key: str, checks: int = 8) -> bool:
    """Whether `dataset.targets` are the labels its items carry, on a few items spread over it.

    A dataset may keep raw `targets` while its items carry transformed ones (target_transform,
    relabelled subsets); then the items' labels are used, loaded with the items.
    """
    n, items = len(targets), _FactoryItems(dataset, key)
    for i in sorted({round(k * (n - 1) / max(checks - 1, 1)) for k in range(checks)}):
        y = items(i)[1]
        if y.shape != targets[i].shape or not bool(torch.equal(y.to(torch.float64), targets[i].to(torch.float64))):
            return False
    return True


_ARRAYS = (torch.Tensor, np.ndarray)


def _as_inputs(values: Any) -> list[torch.Tensor] | None:
    """Each raw input (number, tensor, array, PIL image, list of numbers) as a tensor; None if one is not an input."""
    try:
        return [item_input(v) for v in values]
    except (TypeError, ValueError, RuntimeError):
        return None


def _input_shape(v: Any) -> tuple[int, ...] | None:
    """The shape of one raw input; None if it is not one."""
    converted = _as_inputs([v])
    return None if converted is None else tuple(converted[0].shape)


def _label_shape(v: Any) -> tuple[int, ...] | None:
    """The shape of one label (number, bool, tensor, array, list of numbers); None if it is not one."""
    if isinstance(v, (bool, int, float, np.number, np.bool_)):
        return ()
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, np.ndarray):
        return tuple(v.shape) if v.dtype.kind in "biuf" else None
    if isinstance(v, (list, tuple)):  # a row of regression targets, or a language model's token ids
        try:
            return tuple(item_label(v).shape)
        except (TypeError, ValueError, OverflowError, RuntimeError):
            return None
    return None


def _one_shape(values: Any, shape_of: Any) -> tuple[int, ...] | None | str:
    """The common shape of the values; None if one is not a value; 'ragged' if they differ."""
    shapes = {shape_of(v) for v in values}
    if None in shapes:
        return None
    return shapes.pop() if len(shapes) == 1 else "ragged"


def _stack_pair(result: Any, key: str, source: str) -> tuple[Any, Any] | None:
    """(inputs, labels) when `result` is a pair of per-example sequences, None when it is a dataset of (x, y) items.

    A plain list/tuple of two sequences reads two ways: (inputs, labels) of n examples, e.g.
    `([x_0, ..., x_n], [y_0, ..., y_n])` or `tuple(zip(*items))`, or two (x, y, ...) items. Each
    reading holds when its inputs share one shape and its labels another; the one that holds is
    taken, and when both do (two examples whose values all share one shape) the result is refused.

    Raises:
        DataError: for that ambiguous case, for pairs of unequal length, and for pairs whose
            inputs differ in shape or whose labels are not numbers.
    """
    if isinstance(result, torch.utils.data.Dataset) or not (isinstance(result, (tuple, list)) and len(result) == 2):
        return None
    inputs, labels = result
    if isinstance(inputs, _ARRAYS) and isinstance(labels, _ARRAYS):
        return None  # already (inputs, labels) tensors
    if not all(isinstance(r, (list, tuple, *_ARRAYS)) for r in result):
        return None
    # items are (x, y) or (x, y, extra); longer "items" are per-example sequences
    items_read = all(isinstance(r, (list, tuple)) and 2 <= len(r) <= 3 for r in result) and all(
        isinstance(_one_shape(col, shape_of), tuple)
        for col, shape_of in (([r[0] for r in result], _input_shape), ([r[1] for r in result], _label_shape))
    )
    inputs_list = None if isinstance(inputs, _ARRAYS) else _as_inputs(inputs)  # converted once: shapes, then the stack
    if isinstance(inputs, _ARRAYS):
        input_shape: tuple[int, ...] | None | str = tuple(inputs.shape[1:])
    else:
        input_shape = None if inputs_list is None else _one_shape(inputs_list, lambda t: tuple(t.shape))
    label_shape = _one_shape(labels, _label_shape) if not isinstance(labels, _ARRAYS) else tuple(labels.shape[1:])
    pair_read = len(inputs) == len(labels) > 0 and isinstance(input_shape, tuple) and isinstance(label_shape, tuple)
    if pair_read and items_read:
        raise DataError(
            f"{key}: {source} returned two sequences that read both as (inputs, labels) of {len(inputs)} examples and "
            f"as {len(result)} (x, y) items",
            hint="return a tuple of two tensors (inputs [N, ...], labels [N]) or a torch Dataset",
        )
    if items_read:
        return None
    if len(inputs) != len(labels):
        raise DataError(f"{key}: {source} returned {len(inputs)} inputs but {len(labels)} labels")
    if len(inputs) == 0:
        raise DataError(f"{key}: {source} returned no examples")
    if input_shape == "ragged":
        assert inputs_list is not None
        first = inputs_list[0]
        odd = next(i for i, t in enumerate(inputs_list) if t.shape != first.shape)
        tokens = first.ndim == 1 and not first.is_floating_point()
        raise DataError(
            f"{key}: the inputs returned by {source} differ in shape (example 0: {list(first.shape)}, example {odd}: {list(inputs_list[odd].shape)})",
            hint=f"pad the sequences to one length in {source} and set data.padding_value to the pad id"
            if tokens
            else f"return inputs of one shape from {source}: pad sequences (and set data.padding_value), resize images",
        )
    if label_shape == "ragged":
        raise DataError(f"{key}: the labels returned by {source} differ in shape")
    if label_shape is None:
        text = isinstance(labels, (list, tuple)) and any(isinstance(y, (str, bytes)) for y in labels)
        raise DataError(
            f"{key}: the labels returned by {source} are not all numbers or tensors of numbers" + (" (some are text)" if text else ""),
            hint=LABELS_AS_NUMBERS_HINT if text else None,
        )
    if input_shape is None:
        raise DataError(f"{key}: the inputs returned by {source} are not all tensors, arrays, images or lists of numbers")
    stacked_inputs = inputs if inputs_list is None else torch.stack(inputs_list)
    stacked_labels = labels if isinstance(labels, _ARRAYS) else torch.stack([item_label(y) for y in labels])
    return stacked_inputs, stacked_labels


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values, NaN where NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def _warn_if_items_change(dataset: Any, key: str, source: str, n: int) -> None:
    """Warns when item 0 of the user's Dataset differs between two reads (random augmentation): every pass reads
    each example anew, so the factors and the scores would each see another version of it. The caller's random
    state (torch's, NumPy's and Python's) is left as it was; an item that fails to load is left to the passes."""
    if n == 0:
        return
    items = _FactoryItems(dataset, key)
    with keeps_random_state(), contextlib.suppress(DataError):
        (x0, y0), (x1, y1) = items(0), items(0)
        if not (_same_values(x0, x1) and _same_values(y0, y1)):
            notices.warn(
                f"{key}: item 0 of {source} differs between two reads (random augmentation?): each pass reads every example "
                "anew, so the factors and scores would see other versions of it; give the Dataset its evaluation transforms"
            )


def open_factory(spec: DataSpec, base_dir: Path, name: str) -> Source:
    key = f"{name}.source"
    module_name, _, func_name = spec.source.rpartition(":")
    if not module_name or not func_name:
        raise DataError(f"{key}: {spec.source!r} is not of the form package.module:function")
    try:
        module = import_from(module_name, base_dir)
    except Exception as exc:
        reason = first_line(exc, type(exc).__name__)
        raise DataError(
            f"{key}: cannot import {module_name!r} ({type(exc).__name__}: {reason})",
            hint=import_failure_hint(module_name, base_dir, exc, func_name) or getattr(exc, "hint", None),
        ) from None
    with on_sys_path(base_dir):  # the factory may import its neighbours when called
        func = getattr(module, func_name, None)
        if not callable(func):
            raise DataError(f"{key}: module {module_name!r} has no function {func_name!r}", hint=missing_function_hint(module, func_name))
        with contextlib.suppress(TypeError, ValueError):  # builtins may have no signature
            try:
                inspect.signature(func).bind(**spec.kwargs)
            except TypeError as exc:
                raise DataError(f"{name}.kwargs: do not fit {spec.source} ({exc})") from None
        try:
            result = func(**spec.kwargs)
        except DataError:
            raise
        except Exception as exc:
            reason = first_line(exc)
            hint = None
            if isinstance(exc, FileNotFoundError) and not Path(str(exc.filename or "/")).is_absolute():
                hint = (
                    f"the factory opens relative paths from the working directory ({Path.cwd()}), not the config's folder: "
                    f"give {name}.kwargs absolute paths, or resolve them in the factory"
                )
            raise DataError(f"{key}: {spec.source} raised {type(exc).__name__}: {reason}", hint=hint) from None
    mod_file = getattr(module, "__file__", None)
    files: dict[str, Any] = {"function": spec.source, "kwargs": spec.kwargs}
    if mod_file:
        files["module"] = file_info(Path(mod_file))
    where = f"the result of {spec.source}"
    tensors = getattr(result, "tensors", None)  # a TensorDataset is served from memory
    plain = all(  # a subclass with its own __getitem__ or __len__ is read through them
        getattr(type(result), m, None) is getattr(torch.utils.data.TensorDataset, m) for m in ("__getitem__", "__len__")
    )
    if isinstance(result, torch.utils.data.TensorDataset) and plain and isinstance(tensors, tuple) and len(tensors) == 2:
        result = tensors
    try:
        result = _stack_pair(result, key, spec.source) or result  # ([x_0, ..., x_n], [y_0, ..., y_n]): not a 2-item dataset
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{key}: the inputs listed by {spec.source} cannot form one tensor ({exc})") from None
    if (
        isinstance(result, (tuple, list))
        and len(result) == 2
        and all(isinstance(r, (torch.Tensor, np.ndarray)) for r in result)
    ):
        inputs = to_inputs(result[0], key, where)
        labels = to_labels(result[1], key, where)
        if labels.shape[0] != inputs.shape[0]:
            raise DataError(f"{key}: {where} has {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        return Source(
            n=inputs.shape[0], desc=spec.source, inputs=inputs, labels=labels, files=files,
            raw_255=inputs.dtype == torch.uint8,
        )  # fmt: skip
    if isinstance(result, dict):  # a mapping would be read as a dataset of its keys
        raise DataError(
            f"{key}: {spec.source} returned a dict (keys {list(result)[:4]}); expected a torch Dataset of (x, y) items "
            "or a tuple (inputs, labels)",
            hint='return (d["inputs"], d["labels"]), or save the dict as a tensors file (source: tensors)',
        )
    if not (hasattr(result, "__getitem__") and hasattr(result, "__len__")):
        raise DataError(
            f"{key}: {spec.source} returned a {type(result).__name__}; expected a torch Dataset of (x, y) items "
            "or a tuple (inputs, labels)"
        )
    n = len(result)
    _warn_if_items_change(result, key, spec.source, n)
    labels = None
    targets = getattr(result, "targets", None)
    if targets is not None and getattr(result, "target_transform", None) is None:
        with contextlib.suppress(DataError):
            t = to_labels(targets, key, where)
            labels = t if t.shape[0] == n and _targets_match_items(result, t, key) else None
    return Source(
        n=n,
        desc=spec.source,
        labels=labels,
        items=_FactoryItems(result, key),
        files=files,
        class_names=[str(c) for c in getattr(result, "classes", [])] or None,
    )
