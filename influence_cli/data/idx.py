"""IDX files (the MNIST format), gzipped or not."""

from __future__ import annotations

import functools
import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from influence_cli.config import DataSpec
from influence_cli.data.source import Source, existing_file, file_info, to_inputs, to_labels
from influence_cli.errors import DataError

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> tuple[torch.Tensor | None, str]:
    """Parses an IDX file; returns (tensor, "") or (None, reason). Cached by path, size and mtime."""
    del size, mtime_ns  # part of the cache key only
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        return None, f"cannot read the file ({exc.strerror or exc})"
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            return None, f"is not a valid gzip file ({exc or type(exc).__name__})"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        magic = raw[:4].hex() if raw else "empty file"
        return None, f"is not an IDX file (magic number {magic})"
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        return None, "is truncated (incomplete IDX header)"
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        return None, (
            f"is truncated or corrupt: shape {list(dims)} needs {count * dtype.itemsize} bytes of data, "
            f"found {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    arr = arr.astype(dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(arr), ""


def read_idx(path: Path, key: str) -> torch.Tensor:
    """Reads an IDX file (gzipped or not) into a tensor of its stored shape and dtype."""
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{key}: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    tensor, reason = _read_idx_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if tensor is None:
        raise DataError(f"{key}: {path.name} {reason}", hint="expected an IDX file like t10k-images-idx3-ubyte(.gz)")
    return tensor


def idx_images(images: torch.Tensor) -> torch.Tensor:
    """IDX images [N, H, W] get a channel dim -> [N, 1, H, W]; other shapes are kept."""
    return images.unsqueeze(1) if images.ndim == 3 else images


def open_idx(spec: DataSpec, base_dir: Path, name: str) -> Source:
    img_path = existing_file(spec.images, f"{name}.images", base_dir, "the IDX images file of source idx")
    lab_path = existing_file(spec.labels, f"{name}.labels", base_dir, "the IDX labels file of source idx")
    images = read_idx(img_path, f"{name}.images")
    labels = read_idx(lab_path, f"{name}.labels")
    if labels.ndim > 1 and images.ndim == 1:
        raise DataError(
            f"{name}.labels: {lab_path.name} holds {list(labels.shape)} values and {img_path.name} one number per example: "
            "images and labels look swapped",
            hint=f"swap {name}.images and {name}.labels",
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name}.labels: {lab_path.name} has {labels.shape[0]} labels but {img_path.name} "
            f"has {images.shape[0]} images"
        )
    return Source(
        n=images.shape[0],
        desc=img_path.name,
        inputs=to_inputs(idx_images(images), f"{name}.images", img_path.name),
        labels=to_labels(labels, f"{name}.labels", lab_path.name),
        files={"images": file_info(img_path), "labels": file_info(lab_path)},
        raw_255=images.dtype == torch.uint8,
        label_key="labels",
    )
