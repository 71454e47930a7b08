"""Subsets of a source (range, indices, indices file, a random sample) and label noise keyed by each example's global index."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from influence_cli.config import DataSpec
from influence_cli.data.source import Source, existing_file, file_info, item_label
from influence_cli.errors import DataError, not_utf8
from influence_cli.task import counter_uniform


def _read_indices_file(spec: DataSpec, base_dir: Path, key: str) -> tuple[list[int], list[Any]]:
    """Indices listed in a text (one per line), .json (a list) or .npy (a 1-D integer array) file;
    also returns its fingerprint info."""
    path = existing_file(spec.indices_file, key, base_dir, "a file of indices")
    if path.suffix.lower() == ".npy":
        import numpy as np

        try:
            with open(path, "rb") as fh:
                magic = fh.read(6)
            if magic != b"\x93NUMPY":  # numpy would call anything else a pickle, and suggest loading it unsafely
                raise DataError(f"{key}: {path.name} is not a .npy file (no NumPy header)", hint="save it with numpy.save, or list the indices in a text or .json file")
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{key}: cannot read {path.name} ({exc})") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{key}: {path.name} holds an array of {array.dtype} of shape {list(array.shape)}; expected a 1-D integer array")
        return [int(v) for v in array.tolist()], file_info(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of line 1
    except UnicodeDecodeError as exc:  # a Latin-1 or UTF-16 file: its byte and line, and the fix, as a config's
        raise DataError(f"{key}: {path.name} is not UTF-8 text ({not_utf8(exc)})", hint="save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{key}: cannot read {path.name} ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{key}: {path.name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except (ValueError, RecursionError) as exc:  # Python reads neither
            why = "nested too deeply" if isinstance(exc, RecursionError) else f"an integer of more than {sys.get_int_max_str_digits()} digits"
            raise DataError(f"{key}: {path.name} is not a JSON list of integers Python can read ({why})") from None
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise DataError(f"{key}: {path.name} must hold a JSON list of integers")
        return values, file_info(path)
    out: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "_" in line:  # int() reads Python's digit separators: "1_000" is no index a file should hold
                raise ValueError(line)
            out.append(int(line))
        except ValueError:
            raise DataError(
                f"{key}: line {lineno} of {path.name} is {line!r}, not an integer",
                hint="a text file holds one index per line (blank lines and # comment lines allowed); or give a .json list or a .npy array",
            ) from None
    return out, file_info(path)


def _check_indices(values: Sequence[int], n: int, key: str, desc: str) -> torch.Tensor:
    huge = next((v for v in values if not -(2**63) <= v < 2**63), None)  # beyond int64: torch cannot even hold it
    if huge is not None:
        raise DataError(f"{key}: index {huge} is outside the {n} examples of {desc} (valid: 0..{n - 1})")
    idx = torch.as_tensor(list(values), dtype=torch.int64)
    if idx.numel() == 0:
        raise DataError(f"{key}: the list of indices is empty")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.numel():
        raise DataError(f"{key}: index {int(bad[0])} is outside the {n} examples of {desc} (valid: 0..{n - 1})")
    uniq, counts = torch.unique(idx, return_counts=True)
    if uniq.numel() != idx.numel():
        raise DataError(f"{key}: index {int(uniq[counts > 1][0])} appears more than once")
    return idx


def select_indices(spec: DataSpec, src: Source, base_dir: Path, name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Source indices chosen by range / indices / indices_file (in that key's order); int64 [m]."""
    chosen = [k for k in ("range", "indices", "indices_file") if getattr(spec, k) is not None]
    if len(chosen) > 1:
        raise DataError(f"{name}: use one of range, indices, indices_file (got {', '.join(chosen)})")
    info: dict[str, Any] = {}
    if spec.range is not None:
        key = f"{name}.range"
        r = list(spec.range)
        if len(r) != 2 or not all(isinstance(v, int) for v in r) or r[0] < 0 or r[1] <= r[0]:
            raise DataError(f"{key}: expected [start, stop) with 0 <= start < stop, got {r}")
        if r[1] > src.n:
            raise DataError(
                f"{key}: {r} is outside the {src.n} examples of {src.desc}",
                hint=f"give a range within [0, {src.n}]" + (f", e.g. [{r[0]}, {src.n}]" if r[0] < src.n else ""),
            )
        info["range"] = r
        return torch.arange(r[0], r[1], dtype=torch.int64), info
    if spec.indices is not None:
        info["indices"] = hashlib.sha256(json.dumps(list(spec.indices)).encode()).hexdigest()
        return _check_indices(spec.indices, src.n, f"{name}.indices", src.desc), info
    if spec.indices_file is not None:
        values, listed = _read_indices_file(spec, base_dir, f"{name}.indices_file")
        info["indices_file"] = listed
        return _check_indices(values, src.n, f"{name}.indices_file", src.desc), info
    return torch.arange(src.n, dtype=torch.int64), info


def labels_of(src: Source, idx: torch.Tensor) -> torch.Tensor | None:
    """Labels [m] of source examples `idx`; loads the items when the source keeps no label list."""
    if src.labels is not None:
        return src.labels[idx]
    if src.items is None:  # pragma: no cover - every source has labels or items
        return None
    ys = [src.items(int(i))[1] for i in idx]
    return torch.stack([item_label(y) for y in ys]) if ys else torch.zeros(0, dtype=torch.int64)


SAMPLE_STREAM = 0x73616D70  # the counter hash's stream of `sample`: other numbers than label noise's and the sampled Fisher's


def sample_positions(global_indices: torch.Tensor, n: int, seed: int, key: str) -> torch.Tensor:
    """Positions in `global_indices` of `n` of them drawn uniformly without replacement, in ascending global index.

    Each example gets a counter-based uniform number from (seed, its global index) (`task.counter_uniform` on a
    stream of its own) and the `n` smallest are kept, so the draw depends only on the seed
    and the set of kept indices: not on their order, the batch size, ranks or workers; and a larger `n` keeps
    the examples a smaller one keeps. Below 2**32 the counter hash maps distinct indices to distinct numbers (each
    of its steps is one-to-one on 32 bits), so no two examples tie however many there are; above, ties go to the
    smaller global index.

    Args:
        global_indices: int64 [m] distinct indices in the source.

    Returns:
        int64 [n] positions into `global_indices`.

    Raises:
        DataError: `n` is not in 1..m.
    """
    m = global_indices.numel()
    if n <= 0:
        raise DataError(f"{key}: must be > 0, got {n}")
    if n > m:
        raise DataError(f"{key}: {n} is more than the {m} examples kept", hint=f"give a sample of at most {m}, or leave it out to keep them all")
    order = torch.argsort(global_indices, stable=True)
    u = counter_uniform(seed, global_indices[order], 1, SAMPLE_STREAM)[:, 0]
    chosen = order[torch.argsort(u, stable=True)[:n]]  # no ties below 2**32 (the hash of an index is one-to-one); above, by global index
    return chosen[torch.argsort(global_indices[chosen])]


LABEL_NOISE_STREAM = 0x6E6F6973  # the counter hash's stream of label noise: a seed it shares with the sampled Fisher (stream 0) draws other numbers


def noise_classes(src: Source, labels_in: Sequence[int] | None) -> torch.Tensor | None:
    """The classes label noise picks a new label from, the same for every subset of `src`: the labels of its
    label list and 0..len(class_names)-1 where it names its classes, narrowed to `labels_in`; int64 [C] sorted,
    or None where the source knows neither (a factory dataset without `targets` or `classes`). A negative label
    (a source's mark of an unlabeled example, such as -1) is no class to flip to."""
    parts = []
    if src.labels is not None and src.labels.ndim == 1 and not src.labels.is_floating_point():
        parts.append(src.labels.to(torch.int64))
    if src.class_names:
        parts.append(torch.arange(len(src.class_names), dtype=torch.int64))
    if not parts:
        return None
    classes = torch.unique(torch.cat(parts))
    classes = classes[classes >= 0]
    if labels_in is not None:
        classes = classes[torch.isin(classes, torch.as_tensor(list(labels_in), dtype=torch.int64))]
    return classes


def apply_label_noise(
    labels: torch.Tensor, global_indices: torch.Tensor, p: float, seed: int, key: str, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces each example's label, with probability p, by a random other class.

    Keyed by the example's global index: whether example i is flipped and its new label depend only on
    (seed, i, p, the classes), so a subset that keeps i in any order, beside any others, gives it the same
    label. Two counter-based uniform numbers per example (`task.counter_uniform` on a stream of its own):
    u₀ < p flips it, and u₁ picks an offset 1..C-1 from its label's place among the C sorted classes (mod C),
    each other class with probability 1/(C-1).

    Args:
        labels: int64 [n] class labels.
        global_indices: int64 [n] the examples' indices in the source.
        classes: int64 [C] the classes to draw from (`noise_classes`); the kept labels join them, and
            are all of them when None.

    Returns:
        (noisy labels int64 [n], mask bool [n] of the changed positions).
    """
    if labels.is_floating_point() or labels.ndim != 1:
        kind = f"{labels.dtype} labels" if labels.ndim == 1 else f"labels of shape {list(labels.shape[1:])} per example"
        raise DataError(f"{key}: label noise needs one integer class label per example (classification), got {kind}")
    classes = torch.unique(labels if classes is None else torch.cat([classes, labels.to(torch.int64)]))
    if classes.numel() < 2:
        raise DataError(f"{key}: label noise needs two or more classes, the kept examples have {classes.tolist()}")
    idx = global_indices.to(torch.int64)
    flip = counter_uniform(seed, idx, 1, LABEL_NOISE_STREAM)[:, 0] < p
    chosen = torch.nonzero(flip)[:, 0]
    u = counter_uniform(seed, idx[chosen], 1, LABEL_NOISE_STREAM, columns=torch.ones(chosen.numel(), 1, dtype=torch.int64))[:, 0]
    c = classes.numel()
    offset = 1 + (u * (c - 1)).to(torch.int64).clamp_max(c - 2)
    current = torch.searchsorted(classes, labels[chosen])
    noisy = labels.clone()
    noisy[chosen] = classes[(current + offset) % c]
    return noisy, flip
