"""IndexedDataset and load_dataset: a data spec opened, subset, noised and transformed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from influence_cli.config import DataSpec, checked_data_spec
from influence_cli.data.csv_file import open_csv
from influence_cli.data.factory import open_factory
from influence_cli.data.idx import open_idx
from influence_cli.data.source import Source, item_label
from influence_cli.data.subsets import apply_label_noise, labels_of, noise_classes, sample_positions, select_indices
from influence_cli.data.tensors_file import open_tensors
from influence_cli.data.torchvision_sets import TORCHVISION_SOURCES, ImageFolderItems, open_image_folder, open_torchvision
from influence_cli.data.transforms import TargetTransform, Transform, resize_images
from influence_cli.errors import DataError, InfluenceError
from influence_cli.storage import canonical_json
from influence_cli.user_code import keeps_random_state, seed_generators

BUILTIN_SOURCES = ("mnist", "fashion_mnist", "cifar10", "idx", "tensors", "csv", "image_folder")
# The keys of a data spec that say which dataset object its source builds; not the subset, label noise or transforms.
SOURCE_KEYS = ("source", "images", "labels", "root", "path", "inputs_key", "labels_key", "split", "classes", "kwargs")


def source_seed(spec: DataSpec) -> int:
    """The seed of the global random generators while the source of `spec` is built and read (a user's factory or
    Dataset that draws without seeding itself draws from it): a 64-bit int from the sha256 of its SOURCE_KEYS, so
    two specs of one source (train and query ranges of one factory) draw the same data whatever else they keep, other
    kwargs draw other data, and neither depends on the order the datasets are loaded in or on the command."""
    described = canonical_json({key: getattr(spec, key) for key in SOURCE_KEYS})
    return int.from_bytes(hashlib.sha256(described.encode()).digest()[:8], "big")


def open_source(spec: DataSpec, base_dir: Path, name: str) -> Source:
    """The reader of `spec.source`: a built-in format or a `package.module:function` factory."""
    source = spec.source
    if source == "idx":
        return open_idx(spec, base_dir, name)
    if source == "tensors":
        return open_tensors(spec, base_dir, name)
    if source == "csv":
        return open_csv(spec, base_dir, name)
    if source in TORCHVISION_SOURCES:
        return open_torchvision(spec, base_dir, name)
    if source == "image_folder":
        return open_image_folder(spec, base_dir, name)
    if ":" in source:
        return open_factory(spec, base_dir, name)
    known = ", ".join(BUILTIN_SOURCES)
    raise DataError(f"{name}.source: {source!r} is not one of {known} or package.module:function")


class Batch(tuple):
    """A batch collated by `IndexedDataset.__getitems__`: (x [B, ...], y [B], global_index int64 [B])."""

    __slots__ = ()


class WorkerFailure:
    """What a DataLoader worker hands back instead of a batch when loading it raised an InfluenceError.

    torch re-raises a worker's exception as its type built from the formatted traceback, which
    loses the hint; the loader (`make_loader`) raises this one as it was.
    """

    def __init__(self, error: InfluenceError) -> None:
        self.error = error


class IndexedDataset(Dataset):
    """Examples of one data spec, each carrying its global index in the original source.

    `ds[i]` is `(x, y, global_index)`: x float32 (transformed; float64 from float64 inputs) or int64 token ids, y an int64 scalar (class
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
        transform: Transform,
        inputs: torch.Tensor | None,
        items: Callable[[int], tuple[torch.Tensor, Any]] | None,
        canonical: dict[str, Any],
        source_description: str,
        class_names: list[str] | None,
        raw_255: bool,
        files_of_examples: Sequence[str] | None = None,
        target_transform: TargetTransform | None = None,
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
        self._files = files_of_examples  # by source index
        self._target_transform = target_transform  # applied to `labels` already; to the labels items give here

    @property
    def has_files(self) -> bool:
        """Whether `example_file` names each example's file (image folders) or its place in one (a CSV file's row)."""
        return self._files is not None

    def example_file(self, position: int) -> str | None:
        """The file an example was read from (image folders: its path relative to the root, e.g. "dog/3.png"; a CSV file: its name
        and the row's line, "houses.csv:57"); None for other sources."""
        if self._files is None:
            return None
        return self._files[int(self.global_indices[self._position(position)])]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._transform.out_shape)

    @property
    def token_inputs(self) -> bool:
        """True when x holds int64 token ids (`transform.dtype`), False for float32 inputs."""
        return self._transform.tokens

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
        if self.labels is not None:
            return x, self.labels[p]
        label = item_label(y)
        return x, label if self._target_transform is None else self._target_transform(label)

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
        index int64 [B]) in a `Batch`, which `collate_batch` passes through. Lazy sources
        return a list of `__getitem__` tuples for `collate_batch` to stack. In a worker
        process, an InfluenceError comes back as a `WorkerFailure`.
        """
        try:
            return self._batch(positions)
        except InfluenceError as exc:
            if get_worker_info() is None:
                raise
            return WorkerFailure(exc)

    def _batch(self, positions: list[int]) -> Any:
        if self._inputs is not None:
            idx = torch.as_tensor(positions, dtype=torch.int64)
            x = self._transform(self._inputs[idx])
            return Batch((x, self.labels[idx], self.global_indices[idx]))  # type: ignore[index]
        items = [self[p] for p in positions]
        if self.token_inputs:  # token sequences: one length per batch
            shapes = sorted({tuple(it[0].shape) for it in items})
            if len(shapes) > 1:
                raise DataError(
                    f"{self.name}: token sequences of shapes {list(shapes[0])} and {list(shapes[1])} cannot form one batch",
                    hint="pad the sequences to one length in the data source, and set data.padding_value to the pad id",
                )
            return items
        odd = next((it for it in items if tuple(it[0].shape) != self.input_shape), None)  # one shape for the whole dataset
        if odd is not None:
            where = f" ({self._files[int(odd[2])]})" if self._files is not None else ""
            raise DataError(
                f"{self.name}.transform.resize: example {odd[2]}{where} has shape {list(odd[0].shape)}, the first example "
                f"{list(self.input_shape)}: every example needs the same shape",
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
            h.update(canonical_json(self._canonical).encode())
            h.update(f"|n={len(self)}|".encode())
            h.update(self.global_indices.contiguous().numpy().tobytes())
            if self.labels is not None:
                labels = self.labels.to(torch.float32) if self.labels.dtype == torch.float64 else self.labels
                h.update(str(labels.dtype).encode())  # float64 targets as float32: the fingerprint of a value, not of its storage
                h.update(labels.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def fingerprint_parts(self) -> dict[str, Any]:
        """What the fingerprint hashes, part by part and small enough for an output's metadata (`data_change`
        compares them): `spec` (source, subset and transform settings), `files` (names and sizes; a
        factory's module file among them), `n`, and short hashes of the kept `indices` and the `labels`."""
        labels = b""
        if self.labels is not None:  # float64 targets as float32, as the fingerprint hashes them
            labels = self.labels.to(torch.float32 if self.labels.dtype == torch.float64 else self.labels.dtype).contiguous().numpy().tobytes()
        parts = {
            "spec": {k: v for k, v in self._canonical.items() if k != "files"},
            "files": self._canonical["files"],
            "n": len(self),
            "indices": hashlib.sha256(self.global_indices.contiguous().numpy().tobytes()).hexdigest()[:16],
            "labels": hashlib.sha256(labels).hexdigest()[:16],
        }
        return json.loads(canonical_json(parts))  # as the metadata reads back

    def raw_example(self, position: int) -> torch.Tensor:
        """The untransformed (but channels-first and resized, as the model sees it) input of one example, float32 [*image_shape]."""
        p = self._position(position)
        raw = self._inputs[p : p + 1] if self._inputs is not None else self._load_item(p)[0].unsqueeze(0)
        x = raw.to(torch.float32)
        if self._transform.channels_first:  # [1, H, W, C] -> [1, C, H, W] before resize, which works on the last two axes
            x = x.permute(0, 3, 1, 2)
        if self._transform.resize is not None:
            x = resize_images(x, self._transform.resize)
        return x[0]


def _is_file_info(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _changes(then: Any, now: Any, path: str, out: list[str]) -> None:
    """Appends "<path>: <then> then, <now> now" for each leaf that differs between two JSON values
    ("<name>: <size> bytes then, <size> now" for a file's `file_info`; not for a factory's kwargs, whose
    values are the user's own)."""
    if isinstance(then, dict) and isinstance(now, dict):
        for key in sorted(set(then) | set(now)):
            _changes(then.get(key), now.get(key), f"{path}.{key}" if path else str(key), out)
    elif then != now:
        path = path.removeprefix("subset.")  # the spec's own key names: range, labels_in, ...
        if path in ("samples", "indices"):  # hashed: an image folder's files, an index list
            out.append("the image files (names or sizes)" if path == "samples" else "the indices list")
        elif path == "content":  # hashed: a CSV file's bytes
            out.append("the file's content")
        elif _is_file_info(then) and _is_file_info(now) and not path.startswith("kwargs."):
            out.append(f"{now[0]}: {then[1]:,} bytes then, {now[1]:,} now" if then[0] == now[0] else f"{then[0]} ({then[1]:,} bytes) then, {now[0]} ({now[1]:,} bytes) now")
        else:
            out.append(f"{path}: {json.dumps(then, default=str)} then, {json.dumps(now, default=str)} now")


def _noise_compared(then: Any, now: dict[str, Any]) -> tuple[Any, bool]:
    """The spec an output recorded (`then`) as compared with the spec `now`: its label_noise_seed is only compared where
    both record one (data with label noise does; one side without it names the change of label_noise alone). Also
    whether `then` had label noise drawn by the earlier rule (label noise, and no label_noise_seed recorded) where `now`
    has label noise too."""
    subset_then, subset_now = then.get("subset") if isinstance(then, dict) else None, now.get("subset")
    if not isinstance(subset_then, dict) or not isinstance(subset_now, dict) or ("label_noise_seed" in subset_then) == ("label_noise_seed" in subset_now):
        return then, False
    compared = {k: v for k, v in subset_then.items() if k != "label_noise_seed"}
    if "label_noise_seed" in subset_now:
        compared["label_noise_seed"] = subset_now["label_noise_seed"]
    noise = subset_then.get("label_noise")
    earlier = "label_noise_seed" in subset_now and isinstance(noise, int | float) and noise > 0
    return then | {"subset": compared}, earlier


def data_change(recorded: Any, dataset: IndexedDataset) -> str:
    """What differs between the `fingerprint_parts` an output recorded and `dataset`'s now, as
    "; what changed: ..." for a refusal's message ("" for an output written before they were recorded).

    A factory source's module file counts among its files by name and size, so an edit of that module
    anywhere (the model's code, when it lives there too) changes the data's fingerprint: the message says so."""
    if not isinstance(recorded, dict):
        return ""
    now = dataset.fingerprint_parts()
    changes: list[str] = []
    then_spec, earlier_noise = _noise_compared(recorded.get("spec"), now["spec"])
    _changes(then_spec, now["spec"], "", changes)
    files_then = recorded.get("files")
    if isinstance(files_then, dict):  # a factory's `function` is its spec's `source`, named above
        files_then = {k: v for k, v in files_then.items() if k != "function"}
    _changes(files_then, {k: v for k, v in now["files"].items() if k != "function"}, "", changes)
    if recorded.get("n") != now["n"]:
        changes.append(f"{recorded.get('n')} examples then, {now['n']} now")
    elif recorded.get("indices") != now["indices"]:
        changes.append("the kept indices")
    if earlier_noise:
        changes.append(
            "the labels label_noise flips (the output's were drawn by an earlier rule, by place in the subset; each "
            "example's is now drawn from label_noise_seed and its index in the source)"
        )
    elif recorded.get("labels") != now["labels"] and recorded.get("n") == now["n"]:
        changes.append("the labels")
    if not changes:
        return ""
    shown = "; ".join(changes[:4]) + (f"; {len(changes) - 4} more" if len(changes) > 4 else "")
    module_then, module_now = (isinstance(files_then, dict) and files_then.get("module")), now["files"].get("module")
    module = _is_file_info(module_then) and _is_file_info(module_now) and module_then[0] == module_now[0] and module_then != module_now
    note = " (the factory's module counts by its size: any edit of that file is taken for a change of the data)" if module else ""
    return f"; what changed: {shown}{note}"


def load_dataset(
    spec: DataSpec | dict[str, Any], base_dir: str | Path, name: str = "data.train", seed: int = 0, *, embedding_model: bool = False
) -> IndexedDataset:
    """Opens the source of `spec`, applies its subsets and label noise, and sets up its transforms.

    The global random generators (torch's, NumPy's, Python's) are left as they were, whatever a user's factory or
    Dataset draws while it is read; while it is, they are seeded from the source's description (`source_seed`), so a
    factory that draws without seeding itself builds the same data in every command and run, and two ranges of one
    factory are parts of one draw. Subsets apply in the order selector (range | indices | indices_file) -> labels_in -> sample | limit.

    Args:
        spec: The data spec (cfg.data.train, or a mapping of the same keys as the file's).
        base_dir: Folder that relative paths (and factory modules) resolve against.
        name: The spec's config key, used in every error message (e.g. "data.query").
        seed: Seed of the label noise and of `sample` (cfg.seed) where the spec sets no label_noise_seed / sample_seed.
        embedding_model: The model has an embedding table (`models.takes_token_ids`): with
            `transform.dtype: auto`, integer inputs then stay int64 token ids.

    Raises:
        TypeError: `spec` is no data spec (the whole Config, a path), or `seed` is no integer.
        ConfigError: a field of `spec` changed in code is invalid (checked as the file's are).
        DataError: naming the config key at fault.
    """
    try:  # a NumPy or torch integer as the int it holds
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"load_dataset(): seed: expected an int (cfg.seed), not {type(seed).__name__} {seed!r}") from None
    with keeps_random_state():  # the user's factory and the items read here may draw random numbers
        return _load(spec, Path(base_dir), name, seed, embedding_model)


def _load(spec: DataSpec | dict[str, Any], base: Path, name: str, seed: int, embedding_model: bool) -> IndexedDataset:
    spec = checked_data_spec(spec, name, base)
    seed_generators(source_seed(spec))  # before the source is built: its draws are the same in every load of it
    src = open_source(spec, base, name)
    sel, subset_info = select_indices(spec, src, base, name)
    labels = src.labels[sel] if src.labels is not None else None
    if spec.labels_in is not None:
        key = f"{name}.labels_in"
        if labels is None:
            labels = labels_of(src, sel)
        if labels is None or labels.is_floating_point() or labels.ndim != 1:
            dtype = None if labels is None else labels.dtype
            shape = "" if labels is None or labels.ndim == 1 else f" of shape {list(labels.shape[1:])} per example"
            raise DataError(f"{key}: needs one integer class label per example, the source has {dtype} labels{shape}")
        keep = torch.isin(labels, torch.as_tensor(list(spec.labels_in), dtype=torch.int64))
        if not bool(keep.any()):
            present = torch.unique(labels).tolist()
            shown = present[:20] + (["..."] if len(present) > 20 else [])
            raise DataError(
                f"{name}: no examples left after labels_in {list(spec.labels_in)}",
                hint=f"the selected examples have labels {shown}",
            )
        sel, labels = sel[keep], labels[keep]
    sample_seed = seed if spec.sample_seed is None else spec.sample_seed
    if spec.sample is not None:  # not beside limit: checked_data_spec refuses both
        keep = sample_positions(sel, spec.sample, sample_seed, f"{name}.sample")
        sel = sel[keep]
        labels = labels[keep] if labels is not None else None
    if spec.limit is not None:
        if spec.limit <= 0:
            raise DataError(f"{name}.limit: must be > 0, got {spec.limit}")
        sel = sel[: spec.limit]
        labels = labels[: spec.limit] if labels is not None else None
    if src.n == 0:
        hint = f"relative paths in {name}.kwargs are the factory's own: they resolve against the working folder" if ":" in spec.source else None
        raise DataError(f"{name}: the source holds no examples ({src.desc})", hint=hint)
    if sel.numel() == 0:
        raise DataError(f"{name}: no examples left after range/labels_in/sample/limit (source: {src.desc}, {src.n} examples)")
    if not 0.0 <= spec.label_noise < 1.0:
        raise DataError(f"{name}.label_noise: must be in [0, 1), got {spec.label_noise}")
    n = sel.numel()
    noisy_mask = torch.zeros(n, dtype=torch.bool)
    clean = labels
    noise_seed = seed if spec.label_noise_seed is None else spec.label_noise_seed
    if spec.label_noise > 0:
        if labels is None:
            labels = labels_of(src, sel)
            clean = labels
        classes = noise_classes(src, spec.labels_in)
        labels, noisy_mask = apply_label_noise(labels, sel, spec.label_noise, noise_seed, f"{name}.label_noise", classes)  # type: ignore[arg-type]
    if labels is not None:
        labels = labels.clone().contiguous()
        clean = labels if clean is None or not bool(noisy_mask.any()) else clean.clone().contiguous()
    inputs = None
    items = src.items.kept(sel) if isinstance(src.items, ImageFolderItems) else src.items  # a failed read checks the kept images only
    if src.inputs is not None:
        start = int(sel[0])
        contiguous = bool((sel == torch.arange(start, start + n)).all())
        inputs = src.inputs[start : start + n] if contiguous else src.inputs[sel]
        raw_shape, raw_dtype = tuple(src.inputs.shape[1:]), src.inputs.dtype
    else:
        assert items is not None
        first, first_label = items(int(sel[0]))
        raw_shape, raw_dtype = tuple(first.shape), first.dtype
        src.raw_255 = src.raw_255 or first.dtype == torch.uint8
    transform = Transform(spec.transform, name, raw_shape, src.resize_in_items, raw_dtype, embedding_model)
    target_transform = None
    if spec.transform.target_normalize is not None:
        label = labels[0] if labels is not None else item_label(first_label) if src.inputs is None else None
        if label is None:
            raise DataError(f"{name}.transform.target_normalize: {src.desc} holds no labels to standardize", hint=f"leave out {name}.transform.target_normalize")
        target_transform = TargetTransform(spec.transform, name, tuple(label.shape), label.dtype, src.desc)
        if labels is not None:  # as loaded: the fingerprint, the passes and top-k see the standardized targets
            standardized = target_transform(labels)
            clean = standardized if clean is labels else target_transform(clean)
            labels = standardized
    transform_spec = dataclasses.asdict(spec.transform)
    del transform_spec["dtype"]  # how the model receives the inputs does not change which data they are
    for unset_key, unset in (("channels_first", False), ("channels", None), ("target_normalize", None)):
        if transform_spec[unset_key] == unset:
            del transform_spec[unset_key]  # unset: the fingerprints of outputs written before the key existed still match
    canonical = {
        "source": spec.source,
        "files": src.files,
        "subset": {**subset_info, "labels_in": spec.labels_in, "limit": spec.limit, "label_noise": spec.label_noise}
        | ({"label_noise_seed": noise_seed} if spec.label_noise > 0 else {})  # without noise: the fingerprints of earlier versions
        | ({"sample": spec.sample, "sample_seed": sample_seed} if spec.sample is not None else {}),  # without a sample: as well
        "transform": transform_spec,
    }
    return IndexedDataset(
        name=name,
        global_indices=sel.contiguous(),
        labels=labels,
        clean_labels=clean,
        noisy_mask=noisy_mask,
        transform=transform,
        inputs=inputs,
        items=items,
        canonical=canonical,
        source_description=src.desc,
        class_names=src.class_names,
        raw_255=src.raw_255,
        files_of_examples=src.files_of_examples,
        target_transform=target_transform,
    )


MIN_FLAT_SIDE = 4  # a flat input drawn as an image is a square of at least this side (3 features are no 1x1 RGB image)


def example_image(dataset: IndexedDataset, position: int) -> torch.Tensor:
    """One example as an image for display: float32 [C, H, W] in [0, 1], C in {1, 3}.

    Shown from the untransformed input (what undoing flatten, normalize and scale gives back).
    Flattened square inputs are reshaped: 784 -> [1, 28, 28], 64 -> [1, 8, 8], 3072 -> [3, 32, 32]; a
    flat input of fewer values than a MIN_FLAT_SIDE² square (3 or 9 features of a regression) is
    no image.

    Raises:
        DataError: if the example cannot be shown as an image.
    """
    if dataset.token_inputs:
        raise DataError(
            f"{dataset.name}: the inputs are token ids, not images",
            hint=f"leave out --image-grid, or set {dataset.name}.transform.dtype: float32 if they are integer pixels",
        )
    try:
        x = dataset.raw_example(position)
    except IndexError as exc:
        raise DataError(str(exc)) from None
    shape = list(x.shape)
    if x.ndim == 1:
        d = x.numel()
        side, side3 = math.isqrt(d), math.isqrt(d // 3)
        if side * side == d and side >= MIN_FLAT_SIDE:
            x = x.reshape(1, side, side)
        elif d % 3 == 0 and side3 * side3 * 3 == d and side3 >= MIN_FLAT_SIDE:
            x = x.reshape(3, side3, side3)
        else:
            raise DataError(
                f"{dataset.name}: inputs of {d} values are not a square image (C x H x W with C = 1 or 3, "
                f"at least {MIN_FLAT_SIDE}x{MIN_FLAT_SIDE})",
                hint="leave out --image-grid: the tables name every example",
            )
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
