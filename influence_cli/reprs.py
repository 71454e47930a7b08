"""Short reprs of the result objects the Python API returns, for a notebook.

`brief_repr` shows a dataclass's fields with each tensor as its shape and dtype, a long list or dict as its first
and last items and its length, and a dataclass held in a field (a layer's row, a dataset's spectrum, an ensemble
member's report) by its first field, so that a result prints what it holds, not thousands of numbers (torch prints
a tensor of up to 1000 elements in full) or lines. The values stay whole as attributes.
"""

from __future__ import annotations

import dataclasses
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
        items = [_item(v) for v in (value if len(value) <= _SHOWN else (value[0], value[1], value[-1]))]
        return f"[{', '.join(items)}]" if len(value) <= _SHOWN else f"[{items[0]}, {items[1]}, ..., {items[2]}] ({len(value)} items)"
    if isinstance(value, dict):
        pairs = list(value.items())
        items = [f"{k!r}: {_item(v)}" for k, v in (pairs if len(pairs) <= _SHOWN else (pairs[0], pairs[1], pairs[-1]))]
        return f"{{{', '.join(items)}}}" if len(pairs) <= _SHOWN else f"{{{items[0]}, {items[1]}, ..., {items[2]}}} ({len(pairs)} items)"
    return _item(value)


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
