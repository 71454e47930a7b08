"""torchvision datasets (MNIST, FashionMNIST, CIFAR-10) from a local root, and image folders."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import pickle
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from influence_cli import notices
from influence_cli.config import DataSpec, image_folder_classes, resolve_path
from influence_cli.data.idx import idx_images, read_idx
from influence_cli.data.source import Source, file_info, pil_to_tensor, to_inputs, to_labels
from influence_cli.errors import DataError

_MNIST_CLASSES = [str(i) for i in range(10)]  # torchvision's "3 - three" only spells the number out; tables show the number alone
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR_FOLDER = "cifar-10-batches-py"  # torchvision's (and the archive's) folder of pickled batches
TORCHVISION_SOURCES = {
    "mnist": ("MNIST", "MNIST"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST"),
    "cifar10": ("CIFAR10", "CIFAR-10"),
}


def _find_mnist_files(root: Path, source: str, split: str) -> tuple[Path, Path] | None:
    """Local MNIST-style IDX files for a split, in root/<Class>/raw (torchvision's layout) or, for MNIST, in root itself.

    MNIST and FashionMNIST share file names, so a flat folder of them is read as MNIST only
    (FashionMNIST read it as clothes labels on digit images); FashionMNIST needs torchvision's layout.
    """
    folders, names = _mnist_places(root, source, split)
    for folder in folders:
        found = [next((p for p in (folder / n, folder / f"{n}.gz") if p.is_file()), None) for n in names]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _mnist_places(root: Path, source: str, split: str) -> tuple[list[Path], list[str]]:
    """(the folders an MNIST-style split is looked for in, its images' and labels' file names without .gz)."""
    prefix = "train" if split == "train" else "t10k"
    folders = [root / TORCHVISION_SOURCES[source][0] / "raw"] + ([root] if source == "mnist" else [])
    return folders, [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def _missing_mnist_files(root: Path, spec: DataSpec, name: str) -> DataError:
    """Names the IDX files an MNIST-style source looks for, where, and which of them are there."""
    cls_name, label = TORCHVISION_SOURCES[spec.source]
    folders, wanted = _mnist_places(root, spec.source, spec.split)
    present = sorted({f.name for d in folders if d.is_dir() for f in d.iterdir() if f.name.split(".")[0] in wanted})
    where = " or ".join(repr(str(d)) for d in folders)
    hints = []
    if root.name == cls_name:
        hints.append(f"{name}.root names the {cls_name} folder itself: point it at the folder that holds {cls_name}/")
    hints.append(f"set {name}.download: true to fetch them")
    if spec.source == "fashion_mnist":
        hints.append("a flat folder of FashionMNIST IDX files reads with source: idx")
    return DataError(
        f"{name}.root: no {label} {spec.split} split under {str(root)!r}: expected {wanted[0]}[.gz] and {wanted[1]}[.gz] in {where}"
        + (f" (found only {', '.join(present)})" if present else ""),
        hint="; ".join(hints),
    )


def open_torchvision(spec: DataSpec, base_dir: Path, name: str) -> Source:
    if spec.root is None:
        raise DataError(f"{name}.root: required for source {spec.source} (the dataset folder)")
    root = resolve_path(spec.root, base_dir)
    cls_name, label = TORCHVISION_SOURCES[spec.source]
    desc = f"{label} {spec.split} split"
    if spec.source in ("mnist", "fashion_mnist"):
        local = _find_mnist_files(root, spec.source, spec.split)
        if local is not None:
            images = read_idx(local[0], f"{name}.root")
            labels = read_idx(local[1], f"{name}.root")
            if images.shape[0] != labels.shape[0] or images.ndim != 3:
                raise DataError(
                    f"{name}.root: {local[0].name} ({list(images.shape)}) and {local[1].name} "
                    f"({list(labels.shape)}) do not form an {label} split"
                )
            return Source(
                n=images.shape[0],
                desc=desc,
                inputs=to_inputs(idx_images(images), f"{name}.root", local[0].name),
                labels=to_labels(labels, f"{name}.root", local[1].name),
                files={"images": file_info(local[0]), "labels": file_info(local[1]), "split": spec.split},
                class_names=_MNIST_CLASSES if spec.source == "mnist" else _FASHION_CLASSES,
                raw_255=True,
                label_key="root",
            )
        if not spec.download and not (root / cls_name / "processed").is_dir():  # torchvision still reads its old processed/*.pt
            raise _missing_mnist_files(root, spec, name)
    if spec.source == "cifar10":
        local_cifar = _find_cifar_files(root, spec.split)
        if local_cifar is not None:
            data, labels, class_names = _read_cifar(local_cifar, f"{name}.root")
            return Source(
                n=data.shape[0],
                desc=desc,
                inputs=to_inputs(data, f"{name}.root", desc),
                labels=labels,
                files={"root": root.resolve().name, "split": spec.split},  # as torchvision's reading recorded it
                class_names=class_names,
                raw_255=True,
                label_key="root",
            )
        if not spec.download:
            raise _missing_cifar_files(root, spec, name)
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(f"{name}.source: {spec.source} needs torchvision", hint="pip install torchvision") from None
    try:
        # torchvision reports download progress on stdout, which is reserved for results
        with contextlib.redirect_stdout(sys.stderr):
            ds = getattr(tvd, cls_name)(str(root), train=spec.split == "train", download=spec.download)
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = " ".join(lines[:2])[:300] if lines else type(exc).__name__  # "Error downloading X:" says why on its next line
        if spec.download:
            raise DataError(
                f"{name}.root: could not download or read {label} into {str(root)!r} ({reason})",
                hint="check the network, or download the files elsewhere and point root at them",
            ) from None
        raise DataError(
            f"{name}.root: cannot read {label} ({spec.split}) under {str(root)!r} ({reason})",
            hint=f"point {name}.root at the folder holding torchvision's files, or set {name}.download: true",
        ) from None
    data = torch.as_tensor(np.asarray(ds.data)) if not isinstance(ds.data, torch.Tensor) else ds.data
    if spec.source == "cifar10":
        data = data.permute(0, 3, 1, 2).contiguous()  # [N, H, W, C] -> [N, C, H, W]
    else:
        data = idx_images(data)
    targets = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return Source(
        n=data.shape[0],
        desc=desc,
        inputs=to_inputs(data, f"{name}.root", desc),
        labels=targets,
        files={"root": root.resolve().name, "split": spec.split},
        class_names=_MNIST_CLASSES if spec.source == "mnist" else [str(c) for c in getattr(ds, "classes", [])] or None,
        raw_255=True,
        label_key="root",
    )


def _cifar_names(split: str) -> list[str]:
    """The batch files of a CIFAR-10 split, as torchvision names them."""
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _find_cifar_files(root: Path, split: str) -> list[Path] | None:
    """The split's batch files in root/cifar-10-batches-py (torchvision's layout), or None when one is missing."""
    files = [root / _CIFAR_FOLDER / n for n in _cifar_names(split)]
    return files if all(f.is_file() for f in files) else None


def _missing_cifar_files(root: Path, spec: DataSpec, name: str) -> DataError:
    """Names the batch files CIFAR-10 looks for, where, and which of them are there."""
    folder = root / _CIFAR_FOLDER
    wanted = _cifar_names(spec.split)
    present = [n for n in wanted if (folder / n).is_file()]
    hints = []
    if all((root / n).is_file() for n in wanted):
        hints.append(f"{name}.root names the {_CIFAR_FOLDER} folder itself: point it at the folder that holds {_CIFAR_FOLDER}/")
    hints.append(f"set {name}.download: true to fetch them")
    return DataError(
        f"{name}.root: no CIFAR-10 {spec.split} split under {str(root)!r}: expected {', '.join(wanted)} in {str(folder)!r}"
        + (f" (found only {', '.join(present)})" if present else ""),
        hint="; ".join(hints),
    )


def _unpickle(path: Path, key: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the archive's were pickled by Python 2; batches pickled
    by Python 3 with bytes keys, b"data", read too)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - whatever unpickling a damaged file raises
        raise DataError(f"{key}: cannot read {str(path)!r} as a CIFAR-10 batch ({type(exc).__name__}: {exc})", hint="replace the file with the dataset's own") from None
    if not isinstance(entry, dict):
        raise DataError(f"{key}: {str(path)!r} holds a {type(entry).__name__}, not a CIFAR-10 batch (a dict with data and labels)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar(files: list[Path], key: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10 batches read as torchvision reads them (without its md5 check): uint8 images
    [N, 3, 32, 32], int64 labels [N] and the class names of batches.meta (CIFAR-10's own when absent)."""
    images, labels = [], []
    for path in files:
        entry = _unpickle(path, key)
        data, targets = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
        data = np.asarray(data) if data is not None else None
        if data is None or targets is None or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(targets) != data.shape[0]:
            what = f"data {list(data.shape)} {data.dtype}" if data is not None else "no data"
            raise DataError(
                f"{key}: {str(path)!r} is not a CIFAR-10 batch ({what}, {'no labels' if targets is None else f'{len(targets)} labels'}; "
                "expected data: uint8 [N, 3072] and labels: N class ids)"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(to_labels(np.asarray(targets), key, path.name))
    class_names = _CIFAR_CLASSES
    meta = files[0].parent / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta, key).get("label_names")
        if isinstance(names, list) and names:
            class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return torch.from_numpy(np.concatenate(images)), torch.cat(labels), class_names


# ------------------------------------------------------------------ image folders


UNREADABLE_HINT = "remove or replace the unreadable files (or move them out of the class folders)"
DECODE_CHECK_SECONDS = 60.0  # how long a failed decode spends looking for the other unreadable images


def _unreadable_errors() -> tuple[type[Exception], ...]:
    """What PIL raises for a file it cannot open or decode: OSError mostly, but some plugins raise
    ValueError (a truncated 16-bit PPM: "not enough image data"), SyntaxError, EOFError or
    struct.error, and an image of too many pixels DecompressionBombError."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class ImageFolderItems:
    """Loads image `i` of an ImageFolder as uint8 [C, H, W] (resized if asked); picklable for workers."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, resize: tuple[int, int] | None, key: str):
        self.samples = samples
        self.mode = mode
        self.resize = resize
        self.key = key
        self.scope: list[int] | None = None  # the folder indices a dataset keeps (`kept`): those a failed read checks

    def kept(self, indices: torch.Tensor) -> ImageFolderItems:
        """The same loader for a dataset that keeps only the folder indices `indices` (its subset)."""
        out = copy.copy(self)
        out.scope = indices.tolist()
        return out

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
                if self.resize is not None and (img.height, img.width) != self.resize:
                    img = img.resize((self.resize[1], self.resize[0]), Image.Resampling.BILINEAR)
                return pil_to_tensor(img), target
        except _unreadable_errors() as exc:
            raise unreadable_images(self.key, (path, _reason(exc, path)), *self._others_unreadable(index)) from None

    def _others_unreadable(self, failed: int) -> tuple[list[tuple[str, str]], int, int]:
        """The other images whose pixel data cannot be decoded either, so that one run names them all (the
        headers were read when the folder was opened, the pixels only now): `decode_failures` of the
        dataset's images (`scope`) after `failed`, then of those before it; with how many others there are."""
        scope = self.scope if self.scope is not None else range(len(self.samples))
        order = [i for i in scope if i > failed] + [i for i in scope if i < failed]
        bad, decoded = decode_failures([self.samples[i][0] for i in order])
        return bad, len(order), decoded


def _reason(exc: Exception, path: str) -> str:
    """What PIL says is wrong with the image at `path`, without the path it repeats ("cannot identify image file")."""
    text = str(exc).replace(repr(path), "").replace(path, "").strip(" :")
    return text or type(exc).__name__


def decode_failures(paths: list[str]) -> tuple[list[tuple[str, str]], int]:
    """(path, what is wrong) of each image of `paths` whose header or pixels cannot be read, in their order, and
    how many were decoded: all of them, or those decoded within `DECODE_CHECK_SECONDS` (a large folder)."""
    from PIL import Image

    bad: list[tuple[str, str]] = []
    deadline = time.monotonic() + DECODE_CHECK_SECONDS
    for decoded, path in enumerate(paths):
        if time.monotonic() > deadline:
            return bad, decoded
        try:
            with Image.open(path) as img:
                img.load()
        except _unreadable_errors() as exc:
            bad.append((path, _reason(exc, path)))
    return bad, len(paths)


UNREADABLE_SHOWN = 5  # unreadable images an error names, beyond the first (the rest are counted)


def unreadable_images(key: str, first: tuple[str, str], bad: list[tuple[str, str]], n_others: int, checked: int) -> DataError:
    """One error for every unreadable image found: `first` (path, what is wrong), then `bad`, the unreadable
    ones among the `n_others` other images, of which `checked` were read (fewer when `DECODE_CHECK_SECONDS`
    ran out). The list names `UNREADABLE_SHOWN` and counts the rest."""
    path, why = first
    unread = n_others - checked
    stopped = f"{unread} not decoded: the search stops after {DECODE_CHECK_SECONDS:g} s"
    if not n_others:
        tail = ""
    elif not bad:
        tail = f"; the other {n_others} images decode" if not unread else f"; {checked} of the other {n_others} images decode ({stopped})"
    else:
        shown = ", ".join(f"{p!r} ({w})" for p, w in bad[:UNREADABLE_SHOWN]) + (f" and {len(bad) - UNREADABLE_SHOWN} more" if len(bad) > UNREADABLE_SHOWN else "")
        tail = f"; {len(bad)} of the other {n_others} images cannot be read either" + (f" ({stopped})" if unread else "") + f": {shown}"
    return DataError(f"{key}: cannot read image {path!r} ({why}){tail}", hint=UNREADABLE_HINT)


_GRAY_MODES = ("1", "L", "LA")  # palette images (P) are gray when their palette is
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _folder_mode(samples: list[tuple[str, int]], key: str, until_colour: bool = False) -> str:
    """"L" when every image is grayscale, else "RGB" (as torchvision's loader); reads the headers only (with
    `until_colour`, up to the first colour image, checking no more).

    Raises:
        DataError: an unreadable image, or 16-bit / float images (8-bit conversion would clip them).
    """
    from PIL import Image

    gray = True
    unreadable: list[tuple[str, Exception]] = []  # every one, so that one run names them all
    errors = _unreadable_errors()
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                if img.mode in _HIGH_BIT_MODES:
                    raise DataError(
                        f"{key}: {path!r} is an {img.mode} image (16-bit or float); image folders are read as 8-bit",
                        hint="export 8-bit images, or save the arrays in a tensors file (source: tensors)",
                    )
                if img.mode == "P":
                    gray = gray and _palette_is_gray(img)
                else:
                    gray = gray and img.mode in _GRAY_MODES
            if until_colour and not gray:
                return "RGB"
        except errors as exc:
            unreadable.append((path, exc))
    if unreadable:  # the pixels of the others too, so that one run names a bad header and a truncated file alike
        headers = {p for p, _ in unreadable}
        truncated, decoded = decode_failures([p for p, _ in samples if p not in headers])
        bad = {p: _reason(e, p) for p, e in unreadable} | dict(truncated)
        order = [(p, bad[p]) for p, _ in samples if p in bad]  # the folder's order
        raise unreadable_images(key, order[0], order[1:], len(samples) - 1, len(unreadable) + decoded - 1)
    return "L" if gray else "RGB"


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")  # torchvision's, other JPEG names, GIF


@functools.lru_cache(maxsize=8)
def _root_mode(root: str) -> str:
    """_folder_mode of an image folder given by its root (data.train's, read once per process).

    Raises:
        DataError: the folder is gone (a Config loaded where it was, run where it is not).
    """
    try:
        present, is_image, _ = _list_image_folder(Path(root), _IMAGE_SUFFIXES, "data.train.root")
    except OSError as exc:
        raise DataError(
            f"data.train.root: {root!r}, whose colour mode the image folders of data.train's classes are read in, cannot be read ({exc.strerror or exc})",
            hint="make data.train's images available here",
        ) from None
    try:
        found, _ = _folder_samples(Path(root), present, {c: i for i, c in enumerate(present)}, is_image, "data.train.root")
    except OSError:
        found = []
    if not found:  # no colour mode to take (gray would silently turn RGB images gray)
        raise DataError(f"data.train.root: {root!r}, whose colour mode the image folders of data.train's classes are read in, holds no images")
    return _folder_mode(found, "data.train.root")


def _palette_is_gray(img: Any) -> bool:
    palette = img.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


def _list_image_folder(root: Path, suffixes: tuple[str, ...], key: str) -> tuple[list[str], Any, dict[str, int]]:
    """The class folders of `root` (sorted; hidden ones left out), a file filter for
    `_folder_samples` (image `suffixes`), and the count of files it leaves out by suffix
    (filled as it runs).

    Hidden files and folders (names starting with '.': .ipynb_checkpoints, macOS ._ files) are
    not examples; torchvision's ImageFolder made a hidden folder class 0, shifting every label.

    Raises:
        DataError: naming `key`, when `root` cannot be listed (no permission).
    """
    try:
        classes = image_folder_classes(root)
    except PermissionError as exc:
        raise _unreadable_folder(key, exc) from None
    skipped: dict[str, int] = {}

    def is_image(path: str) -> bool:
        rel = Path(path).relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            return False
        suffix = rel.suffix.lower()
        if suffix in suffixes:
            return True
        skipped[suffix or "no suffix"] = skipped.get(suffix or "no suffix", 0) + 1
        return False

    return classes, is_image, skipped


def _folder_samples(root: Path, present: list[str], label: dict[str, int], is_image: Any, key: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under each class folder, in torchvision's make_dataset order
    (classes sorted, then sorted walks with links followed), and the class folders holding none.

    Raises:
        DataError: naming `key`, when a class folder, or a folder below one, cannot be listed (its images would
            silently be left out, or the class taken for one without images).
    """

    def unreadable(exc: OSError) -> None:
        raise _unreadable_folder(key, exc)

    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for c in present:
        found = [str(Path(d) / f) for d, _, files in sorted(os.walk(root / c, onerror=unreadable, followlinks=True)) for f in sorted(files)]
        found = [f for f in found if is_image(f)]
        if not found:
            empty.append(c)
        samples += [(f, label[c]) for f in found]
    return samples, empty


def _unreadable_folder(key: str, exc: OSError) -> DataError:
    """The DataError of an image folder (`exc.filename`) that cannot be listed."""
    return DataError(
        f"{key}: folder {str(exc.filename)!r} cannot be read ({exc.strerror or exc})",
        hint="give this user read and search permission on it (chmod u+rx)",
    )


def _skipped_text(skipped: dict[str, int]) -> str:
    """'3 files of other types (.txt 2, .avif 1)'."""
    total = sum(skipped.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1])[:4])
    return f"{total} file{'s' if total != 1 else ''} of other types ({parts})"


def open_image_folder(spec: DataSpec, base_dir: Path, name: str) -> Source:
    if spec.root is None:
        raise DataError(f"{name}.root: required for source image_folder (a folder with one sub-folder per class)")
    root = resolve_path(spec.root, base_dir)
    if not root.is_dir():
        raise DataError(f"{name}.root: {str(root)!r} is not a folder")
    present, is_image, skipped = _list_image_folder(root, _IMAGE_SUFFIXES, f"{name}.root")
    if not present:
        loose = any(p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES for p in root.iterdir())
        raise DataError(
            f"{name}.root: {str(root)!r} has no class sub-folders" + (" (its images lie in the folder itself)" if loose else ""),
            hint="image_folder expects root/<class name>/<image files>; for unlabelled images make one class folder",
        )
    classes = spec.classes or present  # label i = classes[i] (data.train's classes, shared by config.py)
    samples, empty = _folder_samples(root, present, {c: classes.index(c) if c in classes else -1 for c in present}, is_image, f"{name}.root")
    unknown = [c for c in present if c not in classes and c not in empty]  # a folder without images labels nothing
    if unknown:
        shared = name != "data.train" and spec.colour_of is not None  # data.train's classes: the model's labels
        raise DataError(
            f"{name}.root: class folder(s) {unknown[:5]} of {str(root)!r} are not among the classes {classes[:12]}"
            + (" (data.train's, whose labels the model predicts)" if shared else ""),
            hint="move those folders out (the model has no label for them)" if shared else f"list every class in {name}.classes (label order), or remove those folders",
        )
    if not samples:
        raise DataError(
            f"{name}.root: no images in the class folders of {str(root)!r}" + (f" ({_skipped_text(skipped)})" if skipped else ""),
            hint=f"image_folder reads {', '.join(_IMAGE_SUFFIXES)} files in root/<class name>/",
        )
    empty = [c for c in empty if c in classes]  # those left out of `classes` take no label
    if empty and spec.colour_of is None:  # a folder of its own classes (a query folder takes data.train's, and may lack some)
        notices.warn(
            f"{name}.root: class folder(s) {empty[:8]} of {str(root)!r} hold no images: no examples of those classes, which still "
            f"take their label numbers in sorted order (set {name}.classes to list the folders that are classes)"
        )
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if skipped or loose:
        parts = ([_skipped_text(skipped) + " in the class folders"] if skipped else []) + (
            [f"{len(loose)} file{'s' if len(loose) != 1 else ''} in the root folder itself"] if loose else []
        )
        notices.warn(f"{name}.root: {' and '.join(parts)} of {str(root)!r} are not read (image files: {', '.join(_IMAGE_SUFFIXES)})")
    mode = _folder_mode(samples, f"{name}.root")  # also checks every image's header
    if spec.colour_of is not None:
        mode = _root_mode(spec.colour_of)  # data.train's: the model takes its channels, whatever this folder holds
    resize = tuple(spec.transform.resize) if spec.transform.resize else None
    rel = [f"{Path(p).relative_to(root)}|{Path(p).stat().st_size}" for p, _ in samples]  # names and sizes, for the fingerprint
    return Source(
        n=len(samples),
        desc=f"image folder {root.name or str(root)}" + (f" ({_skipped_text(skipped)} skipped)" if skipped else ""),
        labels=torch.tensor([t for _, t in samples], dtype=torch.int64),
        items=ImageFolderItems(samples, mode, resize, f"{name}.root"),  # type: ignore[arg-type]
        files={
            "root": root.resolve().name,
            "samples": hashlib.sha256("\n".join(rel).encode("utf-8", "surrogateescape")).hexdigest(),  # a name that is not UTF-8: its bytes
            "classes": classes,
            "colour": "grayscale" if mode == "L" else "RGB",  # as read: its own mode, or data.train's (`colour_of`)
        },
        class_names=classes,
        files_of_examples=[str(Path(p).relative_to(root)) for p, _ in samples],
        raw_255=True,
        resize_in_items=True,
        label_key="root",
    )
