"""`influence init`: a commented starter config, for the user's own model and data or for a bundled example.

`starter_config` builds the YAML text (every key it sets with a comment; checked with the strict loader
before it is returned), `write_config` writes it atomically without replacing a file unless told to, and
`next_commands` lists the commands that follow. The keys are the config's own (config.py); relative paths
in the text resolve against the folder of the file it is written to, as in any config.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import importlib.machinery
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from influence_cli.errors import ConfigError, UsageError
from influence_cli.tables import CSV_SUFFIXES, delimiter, header_names, is_csv

EXAMPLES = ("digits", "mnist")
BUILTIN_MODELS = ("mlp", "cnn")
TENSORS_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")
QUERY_LIMIT = 10  # queries of a starter config over the user's own query set: a first result in seconds
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"  # beside the package in a clone (`pip install -e .`)
MNIST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # the test split, as configs/mnist.yaml reads it
COMMENT_COLUMN = 36
IMAGE_TRANSFORM = (  # the comment of an image folder's transform: the pixels reach the model as its training fed them
    "8-bit pixels to [0, 1], as ToTensor; add resize: [H, W] and normalize: {mean: [...], std: [...]} as in training"
)
_PLAIN = re.compile(r"[A-Za-z0-9_./~-]+")
_FLAGS = {"model.architecture": "--model", "model.checkpoint": "--checkpoint", "data.train": "--train", "data.query": "--query"}

BLOCK = object()  # the value of a key whose keys follow on lines of their own
Line = tuple[int, str, object, str]  # indent level, key, value (BLOCK, or what the key is set to), comment


def starter_config(
    config_path: str | Path,
    *,
    example: str | None = None,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    train: str | None = None,
    query: str | None = None,
    data_dir: str | Path | None = None,
    label_column: str | None = None,
) -> str:
    """The text of a starter config to be written at `config_path` ("-": printed, its paths then relative to the
    working directory).

    Either `example` ("digits": the bundled sample, model and data; "mnist": configs/mnist.yaml's MLP on the IDX
    files in `data_dir`, with `checkpoint` as its weights), or the user's own `model` (`module:Name`, or a built-in
    name) with an optional `checkpoint`, and a `train` (and optional `query`) data source: `module:Name`, a tensors
    file (.safetensors, .npz, .pt, .pth), a table of numbers with a header row (.csv, .tsv, either .gz: its label
    column `label_column`, or by default the header's last column) or an image folder. Paths given are taken from the
    working directory and written relative to the config's folder.

    Raises:
        UsageError: naming the flag (--example, --model, --train, --query, --data-dir, --label-column) whose value
            cannot make a config.
    """
    folder = Path(os.path.abspath(".") if str(config_path) == "-" else os.path.dirname(os.path.abspath(config_path)))
    if label_column is not None and not any(value is not None and is_csv(value) for value in (train, query)):
        raise UsageError("--label-column: only used with a --train or --query table (.csv, .tsv)", hint="leave out --label-column")
    stem = "starter" if str(config_path) == "-" else Path(config_path).stem
    if example is not None:
        if example not in EXAMPLES:
            raise UsageError(f"--example: {example!r} is not one of {', '.join(EXAMPLES)}")
        given = [flag for flag, value in (("--model", model), ("--train", train), ("--query", query)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: not used with --example (it names the model and the data)", hint="leave out --example to name your own")
        if example == "digits":
            for flag, value in (("--checkpoint", checkpoint), ("--data-dir", data_dir)):
                if value is not None:
                    raise UsageError(f"{flag}: not used with --example digits (the bundled sample has its model and data)")
            lines = _digits(folder)
        else:
            lines = _mnist(folder, data_dir, checkpoint)
    else:
        if model is None or train is None:
            missing = " and ".join(flag for flag, value in (("--model", model), ("--train", train)) if value is None)
            raise UsageError(f"{missing}: missing", hint="name your model and training data (--model my_model:Net --train my_data:train_set), or use --example digits")
        if data_dir is not None:
            raise UsageError("--data-dir: only used with --example mnist")
        lines = _own(folder, model, checkpoint, train, query, label_column)
    lines += [
        (0, "output_dir", f"runs/{stem}", "where factors and scores are written"),
        (0, "device", "auto", "auto | cpu | cuda | cuda:N"),
        (0, "seed", 0, "seed of the sampled Fisher's labels"),
    ]
    text = "\n".join(_header(example) + [_line(*line) for line in lines]) + "\n"
    _check(text, folder)
    return text


def next_commands(config_shown: str, query: bool = True) -> list[tuple[str, str]]:
    """The commands to run after `influence init`, each with what it does, for the config at `config_shown` (as the
    user typed it); without a query set, self-influence instead of the queries' rankings."""
    steps = [("inspect", "", "the layers tracked"), ("fit-factors", "", "the curvature of the training set")]
    steps += [
        ("compute-scores", "", "every training example's influence on every query"),
        ("top-k", " --query 0:3 --k 5", "each query's strongest proponents and opponents"),
    ] if query else [
        ("compute-scores", " --self", "self-influence of every training example"),
        ("top-k", " --self --k 10", "the most self-influential: likely mislabeled or memorized"),
    ]  # fmt: skip
    return [(f"influence {name} {config_shown}{flags}", what) for name, flags, what in steps]


def write_config(path: str | Path, text: str, overwrite: bool = False) -> None:
    """Writes `text` at `path` atomically (a temporary file beside it, renamed over it).

    Raises:
        UsageError: `path` exists (without `overwrite`) or is a folder.
        OutputError: it cannot be written.
    """
    from influence_cli import storage  # here: it imports torch, which building the text does not need

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"FILE: {str(path)!r} is a folder", hint="give the name of the config file to write, e.g. my_config.yaml")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UsageError(f"FILE: {str(path)!r} already exists", hint="pass --overwrite to replace it, or give another file name")
    with storage.atomic_path(path, key="FILE") as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- the configs


def _header(example: str | None) -> list[str]:
    what = {"digits": "the bundled digits sample (sample_data/)", "mnist": "MNIST's IDX files"}.get(example or "", "your model and data")
    return [
        f"# influence_cli config for {what}, written by `influence init`.",
        "# Relative paths resolve against this file's folder. Every key, with its default: docs/CONFIG.md.",
    ]


def _digits(folder: Path) -> list[Line]:
    if not (SAMPLE_DATA / "digits.safetensors").is_file():
        raise UsageError(
            f"--example digits: the bundled sample is not in {str(SAMPLE_DATA)!r} (an install from a wheel leaves it out)",
            hint="install from a clone of the repository (pip install -e .), or name your own model and data",
        )
    data = _bundled("digits.safetensors", folder)
    return [
        (0, "model", BLOCK, "an MLP trained on scikit-learn's 8x8 handwritten digits"),
        (1, "architecture", "mlp", "built-in; your own: module:Name"),
        (1, "kwargs", {"input_dim": 64, "hidden": [64, 32], "num_classes": 10}, "arguments of mlp(...)"),
        (1, "checkpoint", _bundled("mlp.safetensors", folder), "its trained weights"),
        *_task(),
        (0, "data", BLOCK, "an example's index is its position in the file"),
        (1, "train", BLOCK, "the training set"),
        (2, "source", "tensors", "a file of inputs and labels tensors"),
        (2, "path", data, "inputs [1797, 64], labels [1797]"),
        (2, "range", [0, 1500], "examples 0..1499"),
        (2, "transform", {"scale": 16.0}, "pixels 0..16 divided by 16"),
        (1, "query", BLOCK, "the examples whose predictions are explained"),
        (2, "source", "tensors", "the same file"),
        (2, "path", data, "held-out examples below"),
        (2, "range", [1500, 1520], "examples 1500..1519 (top-k --query 0 is 1500)"),
        (2, "transform", {"scale": 16.0}, "as the training set"),
        (1, "batch_size", 256, "examples per batch in every pass"),
        *_factors_and_scores(),
    ]


def _mnist(folder: Path, data_dir: str | Path | None, checkpoint: str | Path | None) -> list[Line]:
    if data_dir is None:
        raise UsageError("--data-dir: missing (the folder of MNIST's IDX files) for --example mnist", hint="e.g. --data-dir ../shared/data/mnist")
    files = []
    for name in MNIST_FILES:
        found = next((Path(data_dir) / f for f in (f"{name}.gz", name) if (Path(data_dir) / f).is_file()), None)
        if found is None:
            raise UsageError(f"--data-dir: no {name}.gz (or {name}) in {str(data_dir)!r}", hint="give the folder that holds MNIST's t10k IDX files")
        files.append(_relative(found, folder))
    weights = "none: untrained weights; set the file `make mnist-model` writes (runs/mnist/model.safetensors)" if checkpoint is None else "its trained weights"
    spec = [
        (2, "source", "idx", "raw IDX files (.gz or not)"),
        (2, "images", files[0], "MNIST's test split: 10,000 images"),
        (2, "labels", files[1], "and their labels"),
    ]
    return [
        (0, "model", BLOCK, "the MLP of `make mnist-model`, trained on images 0..7999"),
        (1, "architecture", "mlp", "built-in; your own: module:Name"),
        (1, "kwargs", {"input_dim": 784, "hidden": [128, 128], "num_classes": 10}, "arguments of mlp(...)"),
        (1, "checkpoint", None if checkpoint is None else _relative(Path(checkpoint), folder), weights),
        *_task(),
        (0, "data", BLOCK, "an example's index is its position in the files"),
        (1, "train", BLOCK, "the training set"),
        *spec,
        (2, "range", [0, 8000], "images 0..7999"),
        (2, "transform", {"flatten": True, "scale": 255.0}, "28x28 pixels to 784 values in [0, 1]"),
        (1, "query", BLOCK, "the examples whose predictions are explained"),
        *spec,
        (2, "range", [9000, 9100], "images 9000..9099, held out"),
        (2, "transform", {"flatten": True, "scale": 255.0}, "as the training set"),
        (1, "batch_size", 256, "examples per batch in every pass"),
        *_factors_and_scores(),
    ]


def _own(folder: Path, model: str, checkpoint: str | Path | None, train: str, query: str | None, label_column: str | None = None) -> list[Line]:
    if model not in BUILTIN_MODELS and ":" not in model:
        from influence_cli.user_code import colon_form_hint

        own = colon_form_hint(model, folder)
        raise UsageError(f"--model: {model!r} is not module:Name (your nn.Module class or a function returning the model) nor one of {', '.join(BUILTIN_MODELS)}", hint=own)
    torchvision = model.startswith("torchvision:")
    if torchvision:
        _torchvision_name(model)
    elif ":" in model:
        _user_code(model, "--model", folder)
    name = model.rpartition(":")[2]
    if model in BUILTIN_MODELS:
        from influence_cli.models import BUILTIN_ARCHITECTURES

        required = [p.name for p in inspect.signature(BUILTIN_ARCHITECTURES[model]).parameters.values() if p.default is inspect.Parameter.empty]
        arguments = f"keyword arguments of {name}(...)" + (f": {', '.join(required)} required, the others: docs/CONFIG.md" if required else ": docs/CONFIG.md")
    else:
        arguments = f"keyword arguments of {name}(...)"
    kwargs: dict[str, object] = {}
    folders = _folder_classes(train)
    classes = _with_images(train, folders)  # an empty folder takes a label unless data.train.classes leaves it out
    if classes and (torchvision or model in BUILTIN_MODELS):  # their outputs are num_classes (torchvision's default: 1000)
        kwargs["num_classes"] = len(classes)
        arguments += f"; num_classes: the {len(classes)} class folders of --train" + (" with images" if classes != folders else "")
    table = _table_labels(train, label_column) if is_csv(train) else None
    regression = table is not None and table[1] is None
    identifiers = True  # columns named as a row's identifier left out of the features
    if model in BUILTIN_MODELS and (read := _builtin_arguments(model, checkpoint, train, table)) is not None:
        kwargs, arguments, identifiers = read
        regression = regression or (table is not None and kwargs["num_classes"] == 1)  # a one-output model of a table
    gray_to_rgb = torchvision and bool(classes) and _grayscale(train)  # torchvision's image models take RGB
    where = "torchvision's, built without weights" if torchvision else "looked up beside this file, then on PYTHONPATH" if ":" in model else "built-in"
    weights = (
        (1, "checkpoint", _relative(Path(checkpoint), folder), "its trained weights: a state dict (torch.save) or .safetensors")
        if checkpoint is not None
        else (1, "checkpoint", None, "none: the weights it is built with (set the trained weights' file)")
    )
    lines: list[Line] = [
        (0, "model", BLOCK, "the trained model"),
        (1, "architecture", model, where),
        (1, "kwargs", kwargs, arguments),
        weights,
        *_task("regression" if regression else "classification", table is not None),
        (0, "data", BLOCK, "an example's index is its position in its dataset"),
        (1, "train", BLOCK, "the training set the model learned from"),
        *_source(folder, train, "--train", label_column, gray_to_rgb, identifiers, regression),
    ]
    if classes and classes != folders:  # torchvision's ImageFolder refuses a class folder without images: no class of the model
        empty = [c for c in folders if c not in classes]
        lines.append((2, "classes", classes, f"labels 0, 1, ...: the class folders with images ({', '.join(empty[:5])} without: no label)"))
    unknown = [c for c in _with_images(query, _folder_classes(query)) if c not in classes] if classes and query is not None else []
    if unknown:  # the commands refuse them: the model has no label for them
        raise UsageError(
            f"--query: class folder(s) {unknown[:5]} of {query!r} are not among the class folders of --train {classes[:12]}, whose labels the model predicts",
            hint="move those folders out of the query folder",
        )
    if query is not None:
        lines += [
            (1, "query", BLOCK, "the examples whose predictions are explained"),
            *_source(folder, query, "--query", label_column, gray_to_rgb, identifiers, regression),
            (2, "limit", QUERY_LIMIT, f"the first {QUERY_LIMIT} (leave it out for all)"),
        ]
    return [*lines, (1, "batch_size", 256, "examples per batch in every pass (lower it if memory runs out)"), *_factors_and_scores()]


def _builtin_arguments(model: str, checkpoint: str | Path | None, train: str, table: tuple[int, int | None] | None) -> tuple[dict[str, object], str, bool] | None:
    """The kwargs of the built-in `model` (mlp, cnn), their comment and whether a table's identifier columns stay out of
    its features: read from the checkpoint's layer shapes, or for mlp without one from the --train `table`'s feature
    count and classes (`_table_labels`); None when neither says them.

    Raises:
        UsageError: a checkpoint whose layers are not `model`'s (`_not_builtin`).
    """
    shapes = _checkpoint_shapes(checkpoint) if checkpoint is not None else None
    derived = _builtin_kwargs(model, shapes) if shapes is not None else None
    if derived is not None:  # exact: the layers' shapes are the arguments' values
        arguments = f"arguments of {model}(...), read from the checkpoint's layer shapes" + (
            " (activation: relu unless set)"
            if model == "mlp"
            else " (padding: 1 assumed; image_size: the smallest the layers fit)"
            if "image_size" in derived
            else " (set image_size: the images' [height, width])"
        )
        header = (_csv_header(train) or []) if table is not None else []
        # the model takes every column but the label: one named as an identifier (a feature `index`) is one of them
        return derived, arguments, not (model == "mlp" and derived["input_dim"] == len(header) - 1)
    if shapes and checkpoint is not None:
        raise _not_builtin(model, Path(checkpoint), shapes)
    if table is not None and model == "mlp":  # no checkpoint (or one the commands will name the fault of): the table's shape
        what = f"{table[1]} classes: labels 0..{table[1] - 1}" if table[1] is not None else "1 output: a regression's target"
        arguments = f"arguments of mlp(...): input_dim: the {table[0]} feature columns of --train; num_classes: {what}; hidden: docs/CONFIG.md"
        return {"input_dim": table[0], "num_classes": table[1] if table[1] is not None else 1}, arguments, True
    return None


def _source(
    folder: Path, value: str, flag: str, label_column: str | None = None, gray_to_rgb: bool = False, identifiers: bool = True, regression: bool = False
) -> list[Line]:
    """A data spec's lines for a --train / --query value: `module:Name`, a tensors file, a CSV or TSV file (its label
    column `label_column`, by default the header's last; with `identifiers`, the columns named as a row's identifier
    left out of the features) or an image folder (its grayscale images as RGB with `gray_to_rgb`)."""
    if ":" in value and not os.path.exists(value):
        _user_code(value, flag, folder)
        name = value.rpartition(":")[2]
        what = "items (x, y) as the model takes them, no random augmentation" if flag == "--train" else "as the training set's"
        return [
            (2, "source", value, f"your Dataset (class or function): {what}"),
            (2, "kwargs", {}, f"keyword arguments of {name}(...)"),
        ]
    if os.path.isdir(value):
        if not _folder_classes(value):
            parent = os.path.dirname(os.path.abspath(value))
            raise UsageError(
                f"{flag}: {value!r} has no class sub-folders; a folder of images is read as root/<class name>/<image files>",
                hint=f"give the folder that holds one sub-folder per class (such as {parent!r} if {os.path.basename(os.path.abspath(value))!r} is one)",
            )
        return [
            (2, "source", "image_folder", "one sub-folder of images per class"),
            (2, "root", _relative(Path(value), folder), "the folder"),
            (2, "transform", {"scale": 255.0} | ({"channels": 3} if gray_to_rgb else {}), _transform_comment(flag, gray_to_rgb)),
        ]
    if value.lower().endswith(TENSORS_SUFFIXES):
        return [(2, "source", "tensors", "a file of inputs and labels tensors"), (2, "path", _relative(Path(value), folder), "keys inputs and labels")]
    if is_csv(value):
        label, columns = _label_column(value, flag, label_column), _columns(value, label_column) if identifiers else []
        if columns:  # the columns line names the features
            label = (*label[:3], label[3].replace("; every other column is a feature", ""))
        return [
            (2, "source", "csv", "a table of numbers: a header row, then one example per row"),
            (2, "path", _relative(Path(value), folder), "an example's index is its row's (0: the first after the header)"),
            label,
            *columns,
            (2, "transform", {}, _table_transform_comment(flag, regression)),
        ]
    raise UsageError(
        f"{flag}: {value!r} is not module:Name (your Dataset class or a function returning one), a tensors file "
        f"({', '.join(TENSORS_SUFFIXES)}), a table ({', '.join(CSV_SUFFIXES)}) or a folder of images",
        hint=f"e.g. {flag} my_data:{'train_set' if flag == '--train' else 'test_set'}",
    )


def _table_transform_comment(flag: str, regression: bool) -> str:
    """The comment on a CSV file's transform line: the features (and a regression's targets) as the file holds them."""
    if flag != "--train":
        return "as the training set's"
    if regression:
        return (
            "the features and targets as the file holds them: add normalize: {mean: [...], std: [...]}, one per column, if "
            "training standardized the features, target_normalize: {mean: [...], std: [...]} if it standardized the targets"
        )
    return "the features as the file holds them: add normalize: {mean: [...], std: [...]}, one per column, if training standardized them"


def _label_column(value: str, flag: str, label_column: str | None) -> Line:
    """The label_column line of a CSV file's data spec: `label_column` (checked against the file's header where it can
    be read), else the header's last column."""
    header = _csv_header(value)
    if label_column is not None:
        if header is not None and label_column not in header:
            raise UsageError(f"--label-column: {label_column!r} is not a column of {value} (its header: {', '.join(map(repr, header[:12]))})")
        return (2, "label_column", label_column, "the labels (--label-column); every other column is a feature")
    if not header:
        raise UsageError(f"{flag}: cannot read the header of {value!r} to take its last column as the labels", hint="name the label column with --label-column")
    return (2, "label_column", header[-1], "the header's last column (--label-column names another); every other column is a feature")


def _identifiers(header: list[str]) -> list[str]:
    """The columns of a table's header named as row identifiers (id, ID, user_id, index, pandas' unnamed index), which
    are no features."""
    return [h for h in header if h.lower() in ("id", "index", "unnamed: 0") or h.lower().endswith(("_id", " id"))]


def _columns(value: str, label_column: str | None) -> list[Line]:
    """The columns line of a table whose header names identifier columns: every column but those and the label's."""
    header = _csv_header(value) or []
    label = label_column if label_column is not None else header[-1] if header else None
    ids = [h for h in _identifiers(header) if h != label]
    if not ids:
        return []
    features = [h for h in header if h != label and h not in ids]
    return [(2, "columns", features, f"the features, in the model's order: every column but the label and {', '.join(ids)} (a row's identifier)")]


def _table_rows(value: str) -> Iterator[list[str]]:
    """The rows of a CSV or TSV file (gzip too) that hold a cell, the header's first, decoded as data/csv_file.py
    decodes them."""
    opened = gzip.open(value, "rt", encoding="utf-8-sig", newline="") if value.lower().endswith(".gz") else open(value, encoding="utf-8-sig", newline="")
    with opened as f:
        yield from (row for row in csv.reader(f, delimiter=delimiter(value), skipinitialspace=True) if row and any(cell.strip() for cell in row))


def _csv_header(value: str) -> list[str] | None:
    """The column names of the first row of a CSV or TSV file (gzip too), as data/csv_file.py reads them; None when it
    cannot be read."""
    try:
        with contextlib.closing(_table_rows(value)) as rows:
            row = next(rows, None)
    except (OSError, UnicodeDecodeError, csv.Error, EOFError):
        return None
    if row is None:
        return None
    return header_names(row)


def _table_labels(value: str, label_column: str | None) -> tuple[int, int | None] | None:
    """The feature count of a --train table (every column but the label column and identifier columns) and its number
    of classes (the largest label + 1 where the label column holds class numbers: whole numbers from 0 that cover at
    least half of 0..largest), None for a regression's targets; None when the table cannot be read or a label is no
    number (the commands name why). Read with the csv module, as `_csv_header`, so that init imports no torch."""
    header = _csv_header(value)
    column = label_column if label_column is not None else header[-1] if header else None
    if not header or column not in header:
        return None
    at = header.index(column)
    seen: set[float] = set()
    try:
        with contextlib.closing(_table_rows(value)) as rows:
            next(rows, None)  # the header
            for row in rows:
                seen.add(float(row[at]))
    except (OSError, UnicodeDecodeError, csv.Error, EOFError, ValueError, IndexError):
        return None
    if not seen or not all(math.isfinite(v) for v in seen):
        return None
    whole = all(v == round(v) for v in seen) and min(seen) >= 0
    largest = int(max(seen)) if whole else 0
    classes = largest + 1 if whole and largest >= 1 and len(seen) * 2 >= largest + 1 else None
    return len([h for h in header if h != column and h not in _identifiers(header)]), classes


def _checkpoint_shapes(path: str | Path) -> dict[str, list[int]] | None:
    """The tensor shapes of a checkpoint by key (a .safetensors file's header alone, which reads no tensor; another
    file as the commands load it, wrappers removed), or None when it cannot be read (the commands name why)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.name.lower().endswith(".safetensors"):
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)) if 0 < size < 1 << 30 else None
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "shape" in v}
    from influence_cli.errors import ModelError
    from influence_cli.models import read_state_dict

    try:
        state = read_state_dict(path, "--checkpoint")
    except ModelError:
        return None
    return {k: list(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _not_builtin(model: str, checkpoint: Path, shapes: dict[str, list[int]]) -> UsageError:
    """The refusal of a --checkpoint whose layers are not those of the built-in --model (the other built-in's if they are)."""
    from influence_cli.errors import first_few

    layers = "fc1..fcN and head" if model == "mlp" else "conv1..convN, fc and head"
    other = next((m for m in BUILTIN_MODELS if m != model and _builtin_kwargs(m, shapes) is not None), None)
    return UsageError(
        f"--checkpoint: {checkpoint.name}'s layers are not those of the built-in {model} ({layers}): it holds {first_few(sorted(shapes), 4)}",
        hint=f"it is {other}'s: --model {other}" if other else "give --model the network it was saved from (module:Name, your nn.Module class)",
    )


def _builtin_kwargs(model: str, shapes: dict[str, list[int]]) -> dict[str, object] | None:
    """The kwargs of the built-in `model` (mlp, cnn) whose layers have these shapes (models.py names them fc1..fcN and
    head, or conv1..convN, fc and head; any common prefix, such as a wrapper's, is left out), or None when the keys are
    not that model's."""
    head = next((k for k in shapes if k == "head.weight" or k.endswith(".head.weight")), None)
    if head is None:
        return None
    prefix = head[: -len("head.weight")]
    if not all(k.startswith(prefix) for k in shapes):  # other layers beside these: another network's head
        return None
    own = {k[len(prefix) :]: v for k, v in shapes.items()}
    if len(own["head.weight"]) != 2:
        return None
    num_classes, width = own["head.weight"]
    layer = "fc" if model == "mlp" else "conv"
    count = 0
    while f"{layer}{count + 1}.weight" in own:
        count += 1
    names = [f"{layer}{i}" for i in range(1, count + 1)] + ([] if model == "mlp" else ["fc"]) + ["head"]
    if set(own) != {f"{n}.{p}" for n in names for p in ("weight", "bias")}:  # every layer of the model, and nothing else
        return None
    weights = [own[f"{layer}{i}.weight"] for i in range(1, count + 1)]
    if model == "mlp":
        if any(len(w) != 2 for w in weights) or any(weights[i][1] != weights[i - 1][0] for i in range(1, count)) or (weights and weights[-1][0] != width):
            return None
        return {"input_dim": weights[0][1] if weights else width, "hidden": [w[0] for w in weights], "num_classes": num_classes}
    fc = own.get("fc.weight")
    if not weights or fc is None or len(fc) != 2 or fc[0] != width or any(len(w) != 4 or w[2] != w[3] or w[2] != weights[0][2] for w in weights):
        return None
    channels, kernel = [w[0] for w in weights], weights[0][2]
    kwargs: dict[str, object] = {"in_channels": weights[0][1], "num_classes": num_classes, "channels": channels, "kernel_size": kernel, "fc_dim": fc[0]}
    side = round((fc[1] / channels[-1]) ** 0.5) if fc[1] % channels[-1] == 0 else 0
    for size in range(1, 4097) if side and side * side * channels[-1] == fc[1] else ():
        h = size
        for _ in channels:
            h = (h + 2 - kernel + 1) // 2  # padding 1, as cnn's default
        if h == side:
            kwargs["image_size"] = size  # the smallest size the layers fit: any other that does builds the same model
            break
    return kwargs


def _torchvision_name(model: str) -> None:
    """A `torchvision:<name>` that torchvision builds (a misspelt name is refused now, with its close names, not by
    the first command)."""
    from influence_cli.errors import ModelError
    from influence_cli.models import _torchvision_builder

    try:
        _torchvision_builder(model.partition(":")[2])
    except ModelError as exc:
        raise UsageError(f"--model: {exc.message.partition(': ')[2]}", hint=exc.hint) from None


def _transform_comment(flag: str, gray_to_rgb: bool) -> str:
    if flag != "--train":
        return "as the training set's"
    return ("grayscale images as RGB, as the model takes them; " if gray_to_rgb else "") + IMAGE_TRANSFORM


def _grayscale(value: str) -> bool:
    """Whether every image of the image folder `value` is grayscale (the commands then read it as one channel); the
    headers are read up to the first colour image (all of them only where none is)."""
    from influence_cli.data.torchvision_sets import _IMAGE_SUFFIXES, _folder_mode, _folder_samples, _list_image_folder
    from influence_cli.errors import DataError

    root = Path(os.path.abspath(value))
    try:
        present, is_image, _ = _list_image_folder(root, _IMAGE_SUFFIXES, "--train")
        found = _folder_samples(root, present, dict.fromkeys(present, 0), is_image, "--train")[0]
        return bool(found) and _folder_mode(found, "--train", until_colour=True) == "L"
    except (DataError, OSError):  # no images, an unreadable one: the commands name it
        return False


def _folder_classes(value: str) -> list[str]:
    """The class folders of an image folder given as --train, as the commands number them; none for another source."""
    if not os.path.isdir(value):
        return []
    from influence_cli.config import image_folder_classes

    try:
        return image_folder_classes(Path(value))
    except OSError:  # not listable: the commands name it
        return []


def _with_images(value: str, classes: list[str]) -> list[str]:
    """The class folders among `classes` of the image folder `value` that hold an image, at any depth, as the commands
    read them (each walk stops at its first image)."""
    if not classes:
        return []
    from influence_cli.data.torchvision_sets import _IMAGE_SUFFIXES, _list_image_folder
    from influence_cli.errors import DataError

    root = Path(value)
    try:
        is_image = _list_image_folder(root, _IMAGE_SUFFIXES, "root")[1]
    except DataError:  # not listable: the commands name it
        return []
    return [c for c in classes if any(is_image(str(Path(d) / f)) for d, _, files in os.walk(root / c, followlinks=True) for f in files)]


def _user_code(value: str, flag: str, folder: Path) -> None:
    """A `module:Name` of the user's code as the commands import it: a module name (not a file's path) and a name
    after the colon, its module beside the config or on the Python path, not only in the working directory (which
    the commands do not search). A module found nowhere yet is let be: it may be written after the config."""
    from influence_cli.user_code import import_failure_hint

    module, _, name = value.partition(":")
    what = "your Dataset class or a function returning one" if flag != "--model" else "your nn.Module class or a function returning the model"
    if module.endswith(".py") or any(sep in module for sep in ("/", "\\")):
        raise UsageError(f"{flag}: {value!r} names a file, not a module ({what}: module:Name)", hint=import_failure_hint(module, folder, ModuleNotFoundError(), name or "<Name>"))
    if not all(part.isidentifier() for part in module.split(".")) or not name or not all(part.isidentifier() for part in name.split(".")):
        raise UsageError(f"{flag}: {value!r} is not module:Name ({what}, e.g. my_model:Net)")
    top = module.split(".")[0]
    cwd = Path.cwd().resolve()

    def holds(where: Path) -> bool:
        return (where / f"{top}.py").is_file() or (where / top).is_dir()

    pythonpath = {Path(entry).resolve() for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry}
    if cwd == folder.resolve() or holds(folder) or not holds(cwd) or cwd in pythonpath:
        return
    others = [entry for entry in sys.path if entry and Path(entry).resolve() != cwd]  # `python -m` puts the working directory first
    if importlib.machinery.PathFinder.find_spec(top, others) is None:
        file = f"{top}.py" if (cwd / f"{top}.py").is_file() else f"{top}/"
        raise UsageError(
            f"{flag}: {file} is in the working directory, not beside the config in {str(folder)!r}, where the commands look for it (then on PYTHONPATH)",
            hint=f"write the config beside {file}, or move {file} beside the config, or add {cwd} to PYTHONPATH",
        )


def _task(kind: str = "classification", table: bool = False) -> list[Line]:
    why = {"classification": ": the label column holds class numbers 0, 1, ...", "regression": ": the label column holds targets, not class numbers"}
    return [
        (0, "task", BLOCK, "what the model does"),
        (1, "kind", kind, "classification | regression | language_modeling" + (why[kind] if table else "")),
        (1, "measurement", "loss", "what is attributed for a query: loss | margin | package.module:function"),
    ]


def _factors_and_scores() -> list[Line]:
    return [
        (0, "factors", BLOCK, "the curvature (Fisher) approximation"),
        (1, "strategy", "ekfac", "ekfac | kfac | diagonal | identity"),
        (1, "fisher", "sampled", "sampled | empirical | ggn"),
        (1, "modules", ["*"], "layers tracked, fnmatch patterns (influence inspect lists them)"),
        (0, "scores", BLOCK, "how scores are computed"),
        (1, "damping", "auto", "auto (0.1 x each layer's mean eigenvalue) or a number"),
        (1, "relative", False, "true: RelatIF, which keeps high-gradient outliers from leading every list"),
    ]


# ----------------------------------------------------------------------------- text


def _relative(path: Path, folder: Path) -> str:
    """A path given from the working directory as the config names it: relative to the config's folder (an absolute
    one as it is)."""
    path = Path(os.path.expanduser(path))
    return str(path) if path.is_absolute() else os.path.relpath(os.path.abspath(path), folder)


def _bundled(name: str, folder: Path) -> str:
    """A file of sample_data/: relative to a config written inside the repository, else absolute."""
    inside = os.path.commonpath([folder, SAMPLE_DATA.parent]) == str(SAMPLE_DATA.parent)
    return os.path.relpath(SAMPLE_DATA / name, folder) if inside else str(SAMPLE_DATA / name)


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return text if _PLAIN.fullmatch(text) and yaml.safe_load(text) == text else json.dumps(text, ensure_ascii=False)


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def _line(indent: int, key: str, value: object, comment: str) -> str:
    text = "  " * indent + f"{key}:" + ("" if value is BLOCK else f" {_flow(value)}")
    return f"{text.ljust(COMMENT_COLUMN)} # {comment}"


def _check(text: str, folder: Path) -> None:
    """The text loads with the strict loader (the files it names need not exist yet); a problem is named by its flag."""
    from influence_cli.config import config_from_dict

    try:
        config_from_dict(yaml.safe_load(text), base_dir=folder, source="influence init", check_files=False)
    except ConfigError as exc:
        problems = []
        for problem in exc.problems:
            key = problem.split(":", 1)[0]
            flag = next((f for k, f in _FLAGS.items() if key == k or key.startswith(f"{k}.")), None)
            problems.append(f"{flag} ({problem})" if flag else problem)
        raise UsageError("; ".join(problems)) from None
