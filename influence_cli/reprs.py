"""Short reprs of the result objects the Python API returns, for a notebook.

`brief_repr` shows a dataclass's fields with each tensor as its shape and dtype, a long list or dict as its first
and last items and its length, and a dataclass held in a field (a layer's row, a dataset's spectrum, an ensemble
member's report) by its first field, so that a result prints what it holds, not thousands of numbers (torch prints
a tensor of up to 1000 elements in full) or lines. The values stay whole as attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

_SHOWN = 4  # a list or dict of more items shows its first two, `...` and its last


def brief_repr(self: Any) -> str:
    """`Name(field=value, ...)` of a dataclass, its fields of repr=False left out (a whole config, fingerprints)."""
    parts = [f"{f.name}={_brief(getattr(self, f.name))}" for f in dataclasses.fields(self) if f.repr]
    return f"{type(self).__name__}({', '.join(parts)})"


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={list(value.shape)}, dtype={value.dtype})"
    if isinstance(value, list):
        return _ends(value, _item, "[]")
    if isinstance(value, dict):
        return _ends(list(value.items()), lambda pair: f"{pair[0]!r}: {_item(pair[1])}", "{}")
    return _item(value)


def _ends(items: list[Any], show: Callable[[Any], str], brackets: str) -> str:
    """`items` shown in `brackets`: all of them, or of more than `_SHOWN` the first two, `...` and the last, then their count."""
    if len(items) <= _SHOWN:
        return f"{brackets[0]}{', '.join(show(v) for v in items)}{brackets[1]}"
    first, second, last = (show(v) for v in (items[0], items[1], items[-1]))
    return f"{brackets[0]}{first}, {second}, ..., {last}{brackets[1]} ({len(items)} items)"


def _item(value: Any) -> str:
    """A value inside a field: a dataclass that is named (its first field `name`) or that has a brief repr of its own
    as `Name(first=value, …)`; a tensor as in a field; anything else as its repr."""
    if isinstance(value, torch.Tensor):
        return _brief(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        first = next(iter(dataclasses.fields(value)), None)
        if first is not None and (first.name == "name" or type(value).__repr__ is brief_repr):
            return f"{type(value).__name__}({first.name}={getattr(value, first.name)!r}, …)"
    return repr(value)
