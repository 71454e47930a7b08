"""Datasets from a data spec: sources, subsets, label noise, transforms and loaders.

Every example keeps its *global index*, its position in the original source before
any subsetting, so that scores, reports and shards always name the same example.
In-memory sources (IDX files, tensors files, torchvision arrays, factory tensors)
hold one raw tensor and serve whole batches through `IndexedDataset.__getitems__`;
lazy sources (image folders, factory datasets) load one example at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import hashlib
import importlib
import inspect
import json
import math
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from influence_cli.config import DataSpec, TransformSpec
from influence_cli.errors import DataError

__all__ = ["IndexedDataset", "collate_batch", "example_image", "load_dataset", "make_loader"]

BUILTIN_SOURCES = ("mnist", "fashion_mnist", "cifar10", "idx", "tensors", "image_folder")

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MNIST_CLASSES = [str(i) for i in range(10)]
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST"),
    "cifar10": ("CIFAR10", "CIFAR-10"),
}


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class _Source:
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
    raw_255: bool = False  # raw values are 8-bit pixel values (0..255)
    resize_in_items: bool = False  # `items` already applies transform.resize
    label_key: str = "source"  # spec key blamed for bad labels


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p


def _file_info(path: Path) -> list[Any]:
    """[resolved path, size in bytes] of a file, for the fingerprint."""
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    return [str(path.resolve()), size]


def _existing_file(spec_value: str | None, key: str, base_dir: Path, what: str) -> Path:
    if spec_value is None:
        raise DataError(f"{key}: required ({what})")
    path = _resolve(spec_value, base_dir)
    if not path.exists():
        raise DataError(f"{key}: {str(path)!r} does not exist", hint="paths resolve against the config file's folder")
    if not path.is_file():
        raise DataError(f"{key}: {str(path)!r} is not a file")
    return path


def _to_inputs(value: Any, key: str, where: str) -> torch.Tensor:
    """Raw inputs [N, ...]: uint8 kept as is (compact), every other real dtype as float32."""
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
    return value if value.dtype == torch.uint8 else value.to(torch.float32)


def _to_labels(value: Any, key: str, where: str) -> torch.Tensor:
    """Labels [N]: int64 for integer (class) labels, float32 for regression targets."""
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
    return value.to(torch.float32)


def _item_label(y: Any) -> torch.Tensor:
    """One example's label: int64 scalar for classes, float32 for regression targets."""
    if isinstance(y, torch.Tensor):
        return y.to(torch.int64) if (y.dtype == torch.bool or not y.is_floating_point()) else y.to(torch.float32)
    if isinstance(y, (bool, int, np.integer)):
        return torch.tensor(int(y), dtype=torch.int64)
    if isinstance(y, (float, np.floating)):
        return torch.tensor(float(y), dtype=torch.float32)
    if isinstance(y, np.ndarray):
        return _item_label(torch.from_numpy(np.ascontiguousarray(y)))
    raise TypeError(f"a label must be a number or a tensor, got {type(y).__name__}")


def _item_input(x: Any) -> torch.Tensor:
    """One example's raw input as a tensor (PIL images become [C, H, W] 0..255)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (int, float)):
        return torch.tensor(float(x))
    if hasattr(x, "getbands") and hasattr(x, "size"):  # a PIL image
        return _pil_to_tensor(x)
    raise TypeError(f"an input must be a tensor, an array or a PIL image, got {type(x).__name__}")


def _pil_to_tensor(img: Any) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W]."""
    arr = np.array(img)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------ IDX files


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


def _read_idx(path: Path, key: str) -> torch.Tensor:
    """Reads an IDX file (gzipped or not) into a tensor of its stored shape and dtype."""
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(f"{key}: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    tensor, reason = _read_idx_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if tensor is None:
        raise DataError(f"{key}: {path.name} {reason}", hint="expected an IDX file like t10k-images-idx3-ubyte(.gz)")
    return tensor


def _idx_images(images: torch.Tensor) -> torch.Tensor:
    """IDX images [N, H, W] get a channel dim -> [N, 1, H, W]; other shapes are kept."""
    return images.unsqueeze(1) if images.ndim == 3 else images


def _open_idx(spec: DataSpec, base_dir: Path, name: str) -> _Source:
    img_path = _existing_file(spec.images, f"{name}.images", base_dir, "the IDX images file of source idx")
    lab_path = _existing_file(spec.labels, f"{name}.labels", base_dir, "the IDX labels file of source idx")
    images = _read_idx(img_path, f"{name}.images")
    labels = _read_idx(lab_path, f"{name}.labels")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{name}.labels: {lab_path.name} has {labels.shape[0]} labels but {img_path.name} "
            f"has {images.shape[0]} images"
        )
    return _Source(
        n=images.shape[0],
        desc=img_path.name,
        inputs=_to_inputs(_idx_images(images), f"{name}.images", img_path.name),
        labels=_to_labels(labels, f"{name}.labels", lab_path.name),
        files={"images": _file_info(img_path), "labels": _file_info(lab_path)},
        raw_255=images.dtype == torch.uint8,
        label_key="labels",
    )


# ------------------------------------------------------------------ tensors files


def _open_tensors(spec: DataSpec, base_dir: Path, name: str) -> _Source:
    path = _existing_file(spec.path, f"{name}.path", base_dir, "the tensors file of source tensors")
    suffix = path.suffix.lower()
    where = path.name
    content: dict[str, Any]
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            content = dict(load_file(str(path)))
        elif suffix == ".npz":
            loaded = np.load(str(path), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{name}.path: {where} holds one array, expected an .npz archive of named arrays")
            with loaded:
                content = {k: loaded[k] for k in loaded.files}
        elif suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise DataError(
                    f"{name}.path: {where} holds a {type(obj).__name__}, expected a dict of tensors "
                    f"with keys {spec.inputs_key!r} and {spec.labels_key!r}"
                )
            content = obj
        else:
            raise DataError(f"{name}.path: {where} is not a .safetensors, .npz, .pt or .pth file")
    except DataError:
        raise
    except Exception as exc:  # any reader failure on a user file becomes one readable line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}.path: cannot read {where} ({type(exc).__name__}: {reason})") from None
    keys = ", ".join(sorted(map(str, content))) or "none"
    for key_name, key in (("inputs_key", spec.inputs_key), ("labels_key", spec.labels_key)):
        if key not in content:
            raise DataError(f"{name}.{key_name}: {key!r} is not in {where} (keys: {keys})")
    inputs = _to_inputs(content[spec.inputs_key], f"{name}.inputs_key", where)
    labels = _to_labels(content[spec.labels_key], f"{name}.labels_key", where)
    if labels.shape[0] != inputs.shape[0]:
        raise DataError(
            f"{name}.labels_key: {where} has {labels.shape[0]} labels ({spec.labels_key!r}) "
            f"but {inputs.shape[0]} inputs ({spec.inputs_key!r})"
        )
    return _Source(
        n=inputs.shape[0],
        desc=where,
        inputs=inputs,
        labels=labels,
        files={"path": _file_info(path), "inputs_key": spec.inputs_key, "labels_key": spec.labels_key},
        raw_255=inputs.dtype == torch.uint8,
        label_key="labels_key",
    )


# ------------------------------------------------------------------ torchvision datasets


def _find_mnist_files(root: Path, source: str, split: str) -> tuple[Path, Path] | None:
    """Local MNIST-style IDX files for a split, in root or root/<Class>/raw (torchvision's layout)."""
    prefix = "train" if split == "train" else "t10k"
    folders = [root, root / _TORCHVISION[source][0] / "raw"]
    for folder in folders:
        found = []
        for kind, dims in (("images", 3), ("labels", 1)):
            stem = folder / f"{prefix}-{kind}-idx{dims}-ubyte"
            hit = next((p for p in (stem, stem.with_name(stem.name + ".gz")) if p.is_file()), None)
            found.append(hit)
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _open_torchvision(spec: DataSpec, base_dir: Path, name: str) -> _Source:
    if spec.root is None:
        raise DataError(f"{name}.root: required for source {spec.source} (the dataset folder)")
    root = _resolve(spec.root, base_dir)
    cls_name, label = _TORCHVISION[spec.source]
    desc = f"{label} {spec.split} split"
    if spec.source in ("mnist", "fashion_mnist"):
        local = _find_mnist_files(root, spec.source, spec.split)
        if local is not None:
            images = _read_idx(local[0], f"{name}.root")
            labels = _read_idx(local[1], f"{name}.root")
            if images.shape[0] != labels.shape[0] or images.ndim != 3:
                raise DataError(
                    f"{name}.root: {local[0].name} ({list(images.shape)}) and {local[1].name} "
                    f"({list(labels.shape)}) do not form an {label} split"
                )
            return _Source(
                n=images.shape[0],
                desc=desc,
                inputs=_to_inputs(_idx_images(images), f"{name}.root", local[0].name),
                labels=_to_labels(labels, f"{name}.root", local[1].name),
                files={"images": _file_info(local[0]), "labels": _file_info(local[1]), "split": spec.split},
                class_names=_MNIST_CLASSES if spec.source == "mnist" else _FASHION_CLASSES,
                raw_255=True,
                label_key="root",
            )
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(f"{name}.source: {spec.source} needs torchvision", hint="pip install torchvision") from None
    try:
        # torchvision reports download progress on stdout, which is reserved for results
        with contextlib.redirect_stdout(sys.stderr):
            ds = getattr(tvd, cls_name)(str(root), train=spec.split == "train", download=spec.download)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if spec.download:
            raise DataError(
                f"{name}.root: could not download or read {label} into {str(root)!r} ({reason})",
                hint="check the network, or download the files elsewhere and point root at them",
            ) from None
        raise DataError(
            f"{name}.root: {label} ({spec.split}) files not found under {str(root)!r}",
            hint=f"set {name}.download: true, or point {name}.root at the folder holding the files",
        ) from None
    data = torch.as_tensor(np.asarray(ds.data)) if not isinstance(ds.data, torch.Tensor) else ds.data
    if spec.source == "cifar10":
        data = data.permute(0, 3, 1, 2).contiguous()  # [N, H, W, C] -> [N, C, H, W]
    else:
        data = _idx_images(data)
    targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return _Source(
        n=data.shape[0],
        desc=desc,
        inputs=_to_inputs(data, f"{name}.root", desc),
        labels=targets,
        files={"root": str(root.resolve()), "split": spec.split},
        class_names=[str(c) for c in getattr(ds, "classes", [])] or None,
        raw_255=True,
        label_key="root",
    )


# ------------------------------------------------------------------ image folders


class _ImageFolderItems:
    """Loads image `i` of an ImageFolder as uint8 [C, H, W] (resized if asked); picklable for workers."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, resize: tuple[int, int] | None, key: str):
        self.samples = samples
        self.mode = mode
        self.resize = resize
        self.key = key

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
                if self.resize is not None and (img.height, img.width) != self.resize:
                    img = img.resize((self.resize[1], self.resize[0]), Image.Resampling.BILINEAR)
                return _pil_to_tensor(img), target
        except OSError as exc:
            raise DataError(f"{self.key}: cannot read image {path!r} ({exc})") from None


def _open_image_folder(spec: DataSpec, base_dir: Path, name: str) -> _Source:
    if spec.root is None:
        raise DataError(f"{name}.root: required for source image_folder (a folder with one sub-folder per class)")
    root = _resolve(spec.root, base_dir)
    if not root.is_dir():
        raise DataError(f"{name}.root: {str(root)!r} is not a folder")
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(f"{name}.source: image_folder needs torchvision", hint="pip install torchvision") from None
    try:
        ds = tvd.ImageFolder(str(root))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"{name}.root: no images found under {str(root)!r} ({exc})",
            hint="image_folder expects root/<class name>/<image files>",
        ) from None
    samples = [(str(p), int(t)) for p, t in ds.samples]
    from PIL import Image

    try:
        with Image.open(samples[0][0]) as first:
            mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    except OSError as exc:
        raise DataError(f"{name}.root: cannot read image {samples[0][0]!r} ({exc})") from None
    resize = tuple(spec.transform.resize) if spec.transform.resize else None
    rel = [str(Path(p).relative_to(root)) for p, _ in samples]
    return _Source(
        n=len(samples),
        desc=f"image folder {root.name or str(root)}",
        labels=torch.tensor([t for _, t in samples], dtype=torch.int64),
        items=_ImageFolderItems(samples, mode, resize, f"{name}.root"),  # type: ignore[arg-type]
        files={
            "root": str(root.resolve()),
            "samples": hashlib.sha256("\n".join(rel).encode()).hexdigest(),
            "classes": list(ds.classes),
        },
        class_names=list(ds.classes),
        raw_255=True,
        resize_in_items=True,
        label_key="root",
    )


# ------------------------------------------------------------------ factory functions


class _FactoryItems:
    """Loads item `i` of a user's Dataset as (raw input tensor, label); picklable if the dataset is."""

    def __init__(self, dataset: Any, key: str):
        self.dataset = dataset
        self.key = key

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            item = self.dataset[index]
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(f"{self.key}: item {index} raised {type(exc).__name__}: {reason}") from None
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{self.key}: item {index} is a {type(item).__name__}, expected a pair (x, y)")
        try:
            return _item_input(item[0]), _item_label(item[1])
        except TypeError as exc:
            raise DataError(f"{self.key}: item {index}: {exc}") from None


@contextlib.contextmanager
def _on_sys_path(folder: Path):
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _open_factory(spec: DataSpec, base_dir: Path, name: str) -> _Source:
    key = f"{name}.source"
    module_name, _, func_name = spec.source.rpartition(":")
    if not module_name or not func_name:
        raise DataError(f"{key}: {spec.source!r} is not of the form package.module:function")
    with _on_sys_path(base_dir):
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"{key}: cannot import {module_name!r} ({type(exc).__name__}: {reason})",
                hint=f"put {module_name.split('.')[0]}.py beside the config file or on PYTHONPATH",
            ) from None
        func = getattr(module, func_name, None)
        if not callable(func):
            raise DataError(f"{key}: module {module_name!r} has no function {func_name!r}")
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
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(f"{key}: {spec.source} raised {type(exc).__name__}: {reason}") from None
    mod_file = getattr(module, "__file__", None)
    files: dict[str, Any] = {"function": spec.source, "kwargs": spec.kwargs}
    if mod_file:
        files["module"] = _file_info(Path(mod_file))
    where = f"the result of {spec.source}"
    tensors = getattr(result, "tensors", None)  # a TensorDataset is served from memory
    if isinstance(result, torch.utils.data.TensorDataset) and isinstance(tensors, tuple) and len(tensors) == 2:
        result = tensors
    if (
        isinstance(result, (tuple, list))
        and len(result) == 2
        and all(isinstance(r, (torch.Tensor, np.ndarray)) for r in result)
    ):
        inputs = _to_inputs(result[0], key, where)
        labels = _to_labels(result[1], key, where)
        if labels.shape[0] != inputs.shape[0]:
            raise DataError(f"{key}: {where} has {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        return _Source(
            n=inputs.shape[0], desc=spec.source, inputs=inputs, labels=labels, files=files,
            raw_255=inputs.dtype == torch.uint8,
        )  # fmt: skip
    if not (hasattr(result, "__getitem__") and hasattr(result, "__len__")):
        raise DataError(
            f"{key}: {spec.source} returned a {type(result).__name__}; expected a torch Dataset of (x, y) items "
            "or a tuple (inputs, labels)"
        )
    n = len(result)
    labels = None
    targets = getattr(result, "targets", None)
    if targets is not None:
        with contextlib.suppress(DataError):
            t = _to_labels(targets, key, where)
            labels = t if t.shape[0] == n else None
    return _Source(
        n=n,
        desc=spec.source,
        labels=labels,
        items=_FactoryItems(result, key),
        files=files,
        class_names=[str(c) for c in getattr(result, "classes", [])] or None,
    )


def _open_source(spec: DataSpec, base_dir: Path, name: str) -> _Source:
    source = spec.source
    if source == "idx":
        return _open_idx(spec, base_dir, name)
    if source == "tensors":
        return _open_tensors(spec, base_dir, name)
    if source in _TORCHVISION:
        return _open_torchvision(spec, base_dir, name)
    if source == "image_folder":
        return _open_image_folder(spec, base_dir, name)
    if ":" in source:
        return _open_factory(spec, base_dir, name)
    known = ", ".join(BUILTIN_SOURCES)
    raise DataError(f"{name}.source: {source!r} is not one of {known} or package.module:function")


# ----------------------------------------------------------------------------- subsets


def _read_indices_file(spec: DataSpec, base_dir: Path, key: str) -> tuple[list[int], list[Any]]:
    """Indices listed in a text (one per line) or .json file; also returns its fingerprint info."""
    path = _existing_file(spec.indices_file, key, base_dir, "a file of indices")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{key}: cannot read {path.name} ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{key}: {path.name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise DataError(f"{key}: {path.name} must hold a JSON list of integers")
        return values, _file_info(path)
    out: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(int(line))
        except ValueError:
            raise DataError(f"{key}: line {lineno} of {path.name} is {line!r}, not an integer") from None
    return out, _file_info(path)


def _check_indices(values: Sequence[int], n: int, key: str, desc: str) -> torch.Tensor:
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


def _select(spec: DataSpec, src: _Source, base_dir: Path, name: str) -> tuple[torch.Tensor, dict[str, Any]]:
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
            raise DataError(f"{key}: {r} is outside the {src.n} examples of {src.desc}")
        info["range"] = r
        return torch.arange(r[0], r[1], dtype=torch.int64), info
    if spec.indices is not None:
        info["indices"] = hashlib.sha256(json.dumps(list(spec.indices)).encode()).hexdigest()
        return _check_indices(spec.indices, src.n, f"{name}.indices", src.desc), info
    if spec.indices_file is not None:
        values, file_info = _read_indices_file(spec, base_dir, f"{name}.indices_file")
        info["indices_file"] = file_info
        return _check_indices(values, src.n, f"{name}.indices_file", src.desc), info
    return torch.arange(src.n, dtype=torch.int64), info


def _labels_of(src: _Source, idx: torch.Tensor) -> torch.Tensor | None:
    """Labels [m] of source examples `idx`; loads the items when the source keeps no label list."""
    if src.labels is not None:
        return src.labels[idx]
    if src.items is None:  # pragma: no cover - every source has labels or items
        return None
    ys = [src.items(int(i))[1] for i in idx]
    return torch.stack([_item_label(y) for y in ys]) if ys else torch.zeros(0, dtype=torch.int64)


def _apply_label_noise(labels: torch.Tensor, p: float, seed: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces the labels of round(p * n) seeded-random positions by a random other class.

    Args:
        labels: int64 [n] class labels.

    Returns:
        (noisy labels int64 [n], mask bool [n] of the changed positions).
    """
    if labels.is_floating_point() or labels.ndim != 1:
        raise DataError(f"{key}: label noise needs integer class labels (classification), got {labels.dtype} labels")
    classes = torch.unique(labels)
    if classes.numel() < 2:
        raise DataError(f"{key}: label noise needs two or more classes, the kept examples have {classes.tolist()}")
    n = labels.numel()
    k = int(round(p * n))
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:k]
    current = torch.searchsorted(classes, labels[chosen])
    r = torch.randint(0, classes.numel() - 1, (k,), generator=gen)
    noisy = labels.clone()
    noisy[chosen] = classes[r + (r >= current).to(torch.int64)]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask


# ----------------------------------------------------------------------------- transforms


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of float images [B, C, H, W] or [B, H, W] to size (H', W')."""
    if tuple(x.shape[-2:]) == size:
        return x
    squeeze = x.ndim == 3
    x = x.unsqueeze(1) if squeeze else x
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.squeeze(1) if squeeze else x


class _Transform:
    """resize -> scale -> normalize -> flatten, applied out of place on float32 batches [B, *raw_shape]."""

    def __init__(self, spec: TransformSpec, name: str, raw_shape: tuple[int, ...], resize_in_items: bool):
        key = f"{name}.transform"
        self.scale = spec.scale
        self.flatten = spec.flatten
        self.resize: tuple[int, int] | None = None
        shape = tuple(raw_shape)
        if spec.resize is not None:
            if len(spec.resize) != 2 or min(spec.resize) <= 0:
                raise DataError(f"{key}.resize: expected [height, width] > 0, got {spec.resize}")
            if len(shape) not in (2, 3):
                raise DataError(f"{key}.resize: inputs of shape {list(shape)} are not images ([C, H, W] or [H, W])")
            if not resize_in_items:
                self.resize = (int(spec.resize[0]), int(spec.resize[1]))
            shape = shape[:-2] + (int(spec.resize[0]), int(spec.resize[1]))
        if self.scale is not None and (self.scale == 0 or not math.isfinite(self.scale)):
            raise DataError(f"{key}.scale: must be a finite non-zero number, got {self.scale}")
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        if spec.normalize is not None:
            mean, std = list(spec.normalize.mean), list(spec.normalize.std)
            if len(mean) != len(std) or not mean:
                raise DataError(f"{key}.normalize: mean and std need the same non-zero length")
            if any(s <= 0 for s in std):
                raise DataError(f"{key}.normalize.std: every std must be > 0, got {std}")
            if len(mean) == 1:
                self.mean, self.std = torch.tensor(mean[0]), torch.tensor(std[0])
            elif len(shape) < 2:
                raise DataError(
                    f"{key}.normalize: {len(mean)} values given but the inputs of shape {list(shape)} have no "
                    "channel dimension; give a single mean and std"
                )
            elif shape[0] != len(mean):
                raise DataError(
                    f"{key}.normalize: {len(mean)} values given for inputs with {shape[0]} channels "
                    f"(shape {list(shape)}, channels first)"
                )
            else:
                view = (len(mean),) + (1,) * (len(shape) - 1)
                self.mean = torch.tensor(mean).view(view)
                self.std = torch.tensor(std).view(view)
        self.image_shape = shape  # one example before flattening
        self.out_shape = (math.prod(shape),) if self.flatten else shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Transforms raw inputs [B, *raw_shape] (any real dtype) into float32 [B, *out_shape]."""
        x = x.to(torch.float32)
        if self.resize is not None:
            x = _resize(x, self.resize)
        if self.scale is not None:
            x = x / self.scale
        if self.mean is not None:
            x = (x - self.mean) / self.std
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        return x


# ----------------------------------------------------------------------------- the dataset


class _Batch(tuple):
    """A batch collated by `IndexedDataset.__getitems__`: (x [B, ...], y [B], global_index int64 [B])."""

    __slots__ = ()


class IndexedDataset(Dataset):
    """Examples of one data spec, each carrying its global index in the original source.

    `ds[i]` is `(x, y, global_index)`: x float32 (transformed), y an int64 scalar (class
    label) or float32 (regression target), global_index an int. Build it with `load_dataset`.

    Attributes:
        global_indices: int64 [n], the index of each kept example in the original source.
        labels: [n] labels of the kept examples in order (after label noise), or None when
            a lazy factory dataset exposes no `targets`.
        clean_labels: [n] labels before label noise (the same tensor as `labels` without noise).
        noisy_mask: bool [n], True where label noise changed the label (all False without noise).
        name: the config key of the spec, e.g. "data.train".
        input_shape: shape of one transformed x.
        class_names: class names when the source knows them (image folders, torchvision), else None.
        source_description: the source as named in messages, e.g. "t10k-images-idx3-ubyte.gz".
    """

    def __init__(
        self,
        *,
        name: str,
        global_indices: torch.Tensor,
        labels: torch.Tensor | None,
        clean_labels: torch.Tensor | None,
        noisy_mask: torch.Tensor,
        transform: _Transform,
        inputs: torch.Tensor | None,
        items: Callable[[int], tuple[torch.Tensor, Any]] | None,
        canonical: dict[str, Any],
        source_description: str,
        class_names: list[str] | None,
        raw_255: bool,
    ) -> None:
        self.name = name
        self.global_indices = global_indices
        self.labels = labels
        self.clean_labels = clean_labels
        self.noisy_mask = noisy_mask
        self.class_names = class_names
        self.source_description = source_description
        self._transform = transform
        self._inputs = inputs  # [n, ...] raw values of the kept examples (in-memory sources)
        self._items = items  # lazy loader by source index (image folders, factory datasets)
        self._canonical = canonical
        self._raw_255 = raw_255
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fingerprint: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._transform.out_shape)

    @property
    def in_memory(self) -> bool:
        """True when batches are sliced from one tensor (fast path), False for per-example loading."""
        return self._inputs is not None

    def __len__(self) -> int:
        return int(self.global_indices.numel())

    def __repr__(self) -> str:
        return f"IndexedDataset({self.name!r}, n={len(self)}, source={self.source_description!r})"

    def _position(self, position: int) -> int:
        n = len(self)
        p = int(position)
        if p < 0:
            p += n
        if not 0 <= p < n:
            raise IndexError(f"{self.name}: position {position} is outside the {n} examples")
        return p

    def _load_item(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw input and label of position p (lazy sources)."""
        assert self._items is not None
        x, y = self._items(int(self.global_indices[p]))
        label = self.labels[p] if self.labels is not None else _item_label(y)
        return x, label

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One example: (x float32 [*input_shape], y int64 [] or float32, global index)."""
        p = self._position(position)
        if self._inputs is not None:
            x = self._transform(self._inputs[[p]])[0]  # advanced indexing copies: x never aliases storage
            y = self.labels[p]  # type: ignore[index]
        else:
            raw, y = self._load_item(p)
            x = self._transform(raw.unsqueeze(0))[0]
        return x, y, int(self.global_indices[p])

    def __getitems__(self, positions: list[int]) -> Any:
        """A batch for the DataLoader's fetcher.

        In-memory sources return it already collated, as (x [B, *input_shape], y [B], global
        index int64 [B]) in a `_Batch`, which `collate_batch` passes through. Lazy sources
        return a list of `__getitem__` tuples for `collate_batch` to stack.
        """
        if self._inputs is not None:
            idx = torch.as_tensor(positions, dtype=torch.int64)
            x = self._transform(self._inputs[idx])
            return _Batch((x, self.labels[idx], self.global_indices[idx]))  # type: ignore[index]
        items = [self[p] for p in positions]
        shapes = {tuple(it[0].shape) for it in items}
        if len(shapes) > 1:
            a, b = sorted(shapes)[:2]
            raise DataError(
                f"{self.name}.transform.resize: examples of shapes {list(a)} and {list(b)} cannot form one batch",
                hint=f"set {self.name}.transform.resize: [height, width] so every image has the same size",
            )
        return items

    def position_of(self, global_indices: torch.Tensor) -> torch.Tensor:
        """Positions in this dataset of the given global indices.

        Args:
            global_indices: int64 tensor of any shape (or a list).

        Returns:
            int64 tensor of the same shape.

        Raises:
            DataError: naming the global indices that this dataset does not hold.
        """
        gi = torch.as_tensor(global_indices, dtype=torch.int64)
        shape = gi.shape
        flat = gi.reshape(-1)
        if self._sorted is None:
            self._sorted = torch.sort(self.global_indices)
        values, order = self._sorted
        if flat.numel() == 0:
            return torch.zeros(shape, dtype=torch.int64)
        pos = torch.searchsorted(values, flat).clamp(max=max(len(self) - 1, 0))
        found = values[pos] == flat if len(self) else torch.zeros_like(flat, dtype=torch.bool)
        if not bool(found.all()):
            missing = flat[~found]
            shown = ", ".join(str(int(v)) for v in missing[:10]) + (", ..." if missing.numel() > 10 else "")
            raise DataError(
                f"{self.name}: global indices {shown} are not among its {len(self)} examples "
                f"({missing.numel()} missing)"
            )
        return order[pos].reshape(shape)

    def fingerprint(self) -> str:
        """Short sha256 hex of the spec, the kept global indices and the labels; never reads the inputs."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self._canonical, sort_keys=True, default=str).encode())
            h.update(f"|n={len(self)}|".encode())
            h.update(self.global_indices.contiguous().numpy().tobytes())
            if self.labels is not None:
                h.update(str(self.labels.dtype).encode())
                h.update(self.labels.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def raw_example(self, position: int) -> torch.Tensor:
        """The untransformed (but resized) input of one example, float32 [*image_shape]."""
        p = self._position(position)
        raw = self._inputs[p : p + 1] if self._inputs is not None else self._load_item(p)[0].unsqueeze(0)
        x = raw.to(torch.float32)
        if self._transform.resize is not None:
            x = _resize(x, self._transform.resize)
        return x[0]


# ----------------------------------------------------------------------------- public functions


def load_dataset(spec: DataSpec, base_dir: str | Path, name: str = "data.train", seed: int = 0) -> IndexedDataset:
    """Opens the source of `spec`, applies its subsets and label noise, and sets up its transforms.

    Subsets apply in the order selector (range | indices | indices_file) -> labels_in -> limit.

    Args:
        spec: The data spec.
        base_dir: Folder that relative paths (and factory modules) resolve against.
        name: The spec's config key, used in every error message (e.g. "data.query").
        seed: Seed of the label-noise generator.

    Raises:
        DataError: naming the config key at fault.
    """
    base = Path(base_dir)
    src = _open_source(spec, base, name)
    sel, subset_info = _select(spec, src, base, name)
    labels = src.labels[sel] if src.labels is not None else None
    if spec.labels_in is not None:
        key = f"{name}.labels_in"
        if labels is None:
            labels = _labels_of(src, sel)
        if labels is None or labels.is_floating_point() or labels.ndim != 1:
            dtype = None if labels is None else labels.dtype
            raise DataError(f"{key}: needs integer class labels, the source has {dtype} labels")
        keep = torch.isin(labels, torch.as_tensor(list(spec.labels_in), dtype=torch.int64))
        if not bool(keep.any()):
            present = torch.unique(labels).tolist()
            shown = present[:20] + (["..."] if len(present) > 20 else [])
            raise DataError(
                f"{name}: no examples left after labels_in {list(spec.labels_in)}",
                hint=f"the selected examples have labels {shown}",
            )
        sel, labels = sel[keep], labels[keep]
    if spec.limit is not None:
        if spec.limit <= 0:
            raise DataError(f"{name}.limit: must be > 0, got {spec.limit}")
        sel = sel[: spec.limit]
        labels = labels[: spec.limit] if labels is not None else None
    if sel.numel() == 0:
        raise DataError(f"{name}: no examples left after range/labels_in/limit (source: {src.desc}, {src.n} examples)")
    if not 0.0 <= spec.label_noise < 1.0:
        raise DataError(f"{name}.label_noise: must be in [0, 1), got {spec.label_noise}")
    n = sel.numel()
    noisy_mask = torch.zeros(n, dtype=torch.bool)
    clean = labels
    if spec.label_noise > 0:
        if labels is None:
            labels = _labels_of(src, sel)
            clean = labels
        labels, noisy_mask = _apply_label_noise(labels, spec.label_noise, seed, f"{name}.label_noise")  # type: ignore[arg-type]
    if labels is not None:
        labels = labels.clone().contiguous()
        clean = labels if clean is None or not bool(noisy_mask.any()) else clean.clone().contiguous()
    inputs = None
    if src.inputs is not None:
        start = int(sel[0])
        contiguous = bool((sel == torch.arange(start, start + n)).all())
        inputs = src.inputs[start : start + n] if contiguous else src.inputs[sel]
        raw_shape = tuple(src.inputs.shape[1:])
    else:
        assert src.items is not None
        first, _ = src.items(int(sel[0]))
        raw_shape = tuple(first.shape)
        src.raw_255 = src.raw_255 or first.dtype == torch.uint8
    transform = _Transform(spec.transform, name, raw_shape, src.resize_in_items)
    canonical = {
        "source": spec.source,
        "files": src.files,
        "subset": {**subset_info, "labels_in": spec.labels_in, "limit": spec.limit, "label_noise": spec.label_noise},
        "transform": dataclasses.asdict(spec.transform),
    }
    return IndexedDataset(
        name=name,
        global_indices=sel.contiguous(),
        labels=labels,
        clean_labels=clean,
        noisy_mask=noisy_mask,
        transform=transform,
        inputs=inputs,
        items=src.items,
        canonical=canonical,
        source_description=src.desc,
        class_names=src.class_names,
        raw_255=src.raw_255,
    )


def collate_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate_fn: passes batches pre-collated by `IndexedDataset.__getitems__` through.

    Returns:
        (x [B, ...] float32, y [B] (int64 or float32), global_index int64 [B]).
    """
    if isinstance(batch, _Batch):
        return tuple(batch)  # type: ignore[return-value]
    x, y, gi = default_collate(batch)
    return x, y, gi


class _BlockBatchSampler(Sampler[list[int]]):
    """Batches of consecutive positions [start, stop), in order."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self):
        for s in range(self.start, self.stop, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


def shard_bounds(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """The contiguous block [rank*n//world, (rank+1)*n//world) of positions of one rank."""
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    return rank * n // world, (rank + 1) * n // world


def make_loader(
    dataset: IndexedDataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    shard: tuple[int, int] = (0, 1),
    start_batch: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """An in-order DataLoader over this rank's contiguous block of the dataset.

    Batches are (x [B, *input_shape] float32, y [B], global_index int64 [B]); positions
    [rank*n//world, (rank+1)*n//world) for shard=(rank, world), where n is the dataset
    size or `limit` (its first examples) if smaller. Never shuffles. `start_batch`
    skips this rank's first batches without loading them (resumed passes).
    `pin_memory` is only used when CUDA is available.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    start, stop = shard_bounds(n, shard)
    start = min(stop, start + start_batch * batch_size)
    return DataLoader(
        dataset,
        batch_sampler=_BlockBatchSampler(start, stop, batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=collate_batch,
    )


def example_image(dataset: IndexedDataset, position: int) -> torch.Tensor:
    """One example as an image for display: float32 [C, H, W] in [0, 1], C in {1, 3}.

    Shown from the untransformed input (what undoing flatten, normalize and scale gives back).
    Flattened square inputs are reshaped: 784 -> [1, 28, 28], 64 -> [1, 8, 8], 3072 -> [3, 32, 32].

    Raises:
        DataError: if the example cannot be shown as an image.
    """
    try:
        x = dataset.raw_example(position)
    except IndexError as exc:
        raise DataError(str(exc)) from None
    shape = list(x.shape)
    if x.ndim == 1:
        d = x.numel()
        side, side3 = math.isqrt(d), math.isqrt(d // 3)
        if side * side == d:
            x = x.reshape(1, side, side)
        elif d % 3 == 0 and side3 * side3 * 3 == d:
            x = x.reshape(3, side3, side3)
        else:
            raise DataError(f"{dataset.name}: inputs of {d} values are not a square image (C x H x W with C = 1 or 3)")
    elif x.ndim == 2:
        x = x.unsqueeze(0)
    elif x.ndim == 3 and x.shape[0] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(2, 0, 1)  # stored channels last
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise DataError(f"{dataset.name}: inputs of shape {shape} cannot be shown as an image")
    scale = dataset._transform.scale
    if dataset._raw_255:
        x = x / 255.0
    elif scale is not None and float(x.min()) / scale >= -1e-6 and float(x.max()) / scale <= 1 + 1e-6:
        x = x / scale
    else:
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and hi <= 1.0:
            pass
        elif lo >= 0.0 and hi <= 255.0:
            x = x / 255.0
        else:
            x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return x.clamp(0.0, 1.0).to(torch.float32).contiguous()
