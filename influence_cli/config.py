"""The YAML config: typed settings blocks, `--set` overrides, strict validation.

One dataclass per block, every field documented by its `help` metadata. The loader
builds them strictly (unknown keys, wrong types and impossible values are errors)
and collects every problem into one `ConfigError` naming the file and key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from influence_cli.errors import ConfigError, first_line, not_utf8, shortened
from influence_cli.user_code import colon_form_hint

SIMILARITY_METHODS = ("fisher-kernel", "task2vec")
SPECTRUM_ORDERS = ("kfac", "ekfac")
EDIT_KEEP = ("mass", "share")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


class _Section:
    """Base of the config dataclasses: setting a key they do not have (`cfg.factors.stratgy = "kfac"`)
    is an error, as an unknown key in the file is, instead of an attribute the run never reads."""

    __dataclass_fields__: dict[str, Any]

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:
            close = difflib.get_close_matches(name, list(self.__dataclass_fields__), n=1)
            raise AttributeError(
                f"{type(self).__name__} has no key {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; its keys: {', '.join(k for k, f in self.__dataclass_fields__.items() if not f.metadata.get('internal'))}"
            )  # fmt: skip
        object.__setattr__(self, name, value)


@dataclass
class NormalizeSpec(_Section):
    """Normalization applied after scaling: (x - mean) / std, per channel or per column."""

    mean: list[float] = _help("One mean, or one per channel (per column of feature rows).", default_factory=lambda: [0.0])
    std: list[float] = _help("One standard deviation, or one per channel (per column of feature rows).", default_factory=lambda: [1.0])


@dataclass
class TargetNormalizeSpec(_Section):
    """Standardization of a regression's targets as they are loaded: (y - mean) / std, per label column."""

    mean: list[float] = _help("One mean, or one per label column (a list label_column, a multi-output regression).", default_factory=lambda: [0.0])
    std: list[float] = _help("One standard deviation (> 0), or one per label column.", default_factory=lambda: [1.0])


@dataclass
class TransformSpec(_Section):
    """Basic input transforms, applied in the order channels_first -> channels -> resize -> scale -> normalize -> flatten;
    target_normalize standardizes a regression's targets as they are loaded."""

    channels_first: bool = _help("Move the channels of channels-last images [H, W, C] first ([C, H, W], as Conv2d takes them).", default=False)
    channels: int | None = _help(
        "Image channels the model takes, 1 or 3: adds the channel axis of [H, W] images, repeats a grayscale channel "
        "into RGB, or turns RGB into grayscale (0.299 R + 0.587 G + 0.114 B, as Pillow's convert('L')). null: as stored.",
        default=None,
    )
    scale: float | None = _help("Divide raw inputs by this number (255.0 for 8-bit images).", default=None)
    normalize: NormalizeSpec | None = _help(
        "Mean/std normalization: one value for every input, one per channel, or for rows of features [F] one per column. "
        "It runs after scale: with scale 255.0 the statistics of inputs in [0, 1] "
        "(torchvision's, as its Normalize sees them after ToTensor), without it those of the raw values; "
        "8-bit inputs with statistics of the other range are warned about. int32, int64 and float64 inputs (timestamps, IDs) are "
        "scaled and normalized in float64 (int32 and int64 then become float32), the rest in float32.",
        default=None,
    )
    flatten: bool = _help("Flatten each example to a vector.", default=False)
    resize: list[int] | None = _help("Resize images to [height, width] (image sources).", default=None)
    dtype: Literal["auto", "float32", "int64"] = _help(
        "Dtype the model receives: auto (integer inputs other than uint8 stay int64 token ids when the model has an "
        "nn.Embedding and no scale, normalize, resize or channels is set; everything else float32) | float32 | int64 (token ids, "
        "e.g. uint8 bytes).",
        default="auto",
    )
    target_normalize: TargetNormalizeSpec | None = _help(
        "Standardize a regression's targets as they are loaded, (y - mean) / std in float64, then float32 (float64 "
        "targets stay float64), for a model trained on standardized targets while the file holds raw ones (prices): one "
        "mean and std for every target, or one per label column. Needs task.kind: regression; the labels top-k shows are "
        "the standardized targets, and the scores (of the squared error) in their squared units. Part of the dataset's fingerprint.",
        default=None,
    )


@dataclass
class DataSpec(_Section):
    """One dataset: where it comes from and which of its examples to use."""

    source: str = _help(
        "mnist | fashion_mnist | cifar10 | idx | tensors | csv | image_folder | package.module:function (your own function "
        "or Dataset class, e.g. my_data:Images, called with kwargs)",
        default="",
    )
    images: str | None = _help("IDX images file (source: idx).", default=None)
    labels: str | None = _help("IDX labels file (source: idx).", default=None)
    root: str | None = _help("Dataset root folder (torchvision sources, image_folder).", default=None)
    path: str | None = _help(
        "Tensors file: .safetensors, .npz, .pt or .pth (source: tensors). Table of numbers: .csv (comma-separated) or "
        ".tsv (tab-separated), either gzip-compressed as .csv.gz / .tsv.gz, UTF-8, its first row a header of column names, "
        "then one example per row (source: csv; an example's index is its row's, 0 the first row after the header).",
        default=None,
    )
    inputs_key: str = _help("Key of the inputs tensor in a tensors file.", default="inputs")
    labels_key: str = _help("Key of the labels tensor in a tensors file.", default="labels")
    label_column: str | list[str] | None = _help(
        "source: csv: the header name of the label column (a column of whole numbers, 2 or 2.0, gives int64 class labels, "
        "any other numbers float32 regression targets), or a list of names (a multi-output regression's targets, float32 [N, K]).",
        default=None,
    )
    columns: list[str] | None = _help(
        "source: csv: the feature columns by header name, in the order the model takes them (float32 [N, F]); null: every "
        "column but the label column(s), in the file's order.",
        default=None,
    )
    split: Literal["train", "test"] = _help("Split of a torchvision dataset.", default="train")
    download: bool = _help("Let torchvision download the dataset into root if absent.", default=False)
    kwargs: dict[str, Any] = _help("Keyword arguments for a factory source.", default_factory=dict)
    range: list[int] | None = _help("Keep examples [start, stop) of the source.", default=None)
    indices: list[int] | None = _help("Keep these source indices, in this order.", default=None)
    indices_file: str | None = _help("File of source indices (text, one per line; a .json list; or a .npy 1-D integer array).", default=None)
    labels_in: list[int] | None = _help("Keep only examples whose label is in this list.", default=None)
    classes: list[str] | None = _help(
        "image_folder: the class folder names in label order (label i = the i-th name). Default: data.train's classes "
        "when data.train is an image folder, for data.query always (a query folder without some class keeps the others' "
        "labels; one with a class data.train lacks is refused) and for other specs when their class folders are all "
        "among them; else this root's sorted sub-folders.",
        default=None,
    )
    limit: int | None = _help(
        "Keep at most this many examples (after the other filters): the FIRST ones, so on a sorted source (an image "
        "folder, read class folder by class folder) only its first classes; `sample` draws a random part instead.",
        default=None,
    )
    sample: int | None = _help(
        "Keep this many examples drawn uniformly at random, without replacement, from those range / indices / "
        "indices_file and labels_in keep, in source order (ascending global index). The draw depends only on "
        "`sample_seed` and the kept global indices (not on batch size, ranks or workers); more than are kept is refused; "
        "not with `limit` (use one).",
        default=None,
    )
    sample_seed: int | None = _help(
        "Seed of `sample`; null = `seed`. Set it to keep the same sample while `seed` draws other sampled-Fisher labels.", default=None
    )
    label_noise: float = _help(
        "Share of examples whose label is replaced by a random other class of the source (among labels_in when set; "
        "classification only); 0 = none. Each example is flipped with this probability, drawn from `label_noise_seed` "
        "and its index in the source, so any subset, order or limit that keeps an example gives it the same label (for a "
        "factory Dataset without `targets` or `classes`, whose classes are those of the kept examples: any that keeps the same classes). "
        "`top-k --self` marks and counts them.",
        default=0.0,
    )
    label_noise_seed: int | None = _help(
        "Seed of label_noise (which examples it flips, and to which class); null = `seed`. Set it to keep the same "
        "labels while `seed` draws other sampled-Fisher labels.",
        default=None,
    )
    transform: TransformSpec = _help("Input transforms.", default_factory=TransformSpec)
    colour_of: str | None = field(  # set by _share_image_folder_classes: data.train's root, whose colour mode this folder takes
        default=None, metadata={"help": "image_folder: read in the colour mode of this folder (data.train's).", "internal": True}
    )


@dataclass
class ModelConfig(_Section):
    """The trained model: architecture, its keyword arguments and its weights."""

    architecture: str = _help(
        "Built-in name (mlp, cnn) | torchvision:<name> (built without weights: pretrained ones come from model.checkpoint) "
        "| package.module:function (your own function or nn.Module class, e.g. my_model:Net, called with model.kwargs; "
        "the module is looked up beside the config, then on PYTHONPATH)",
        default="",
    )
    kwargs: dict[str, Any] = _help(
        "Keyword arguments of the architecture; the built-ins', with their defaults: mlp: input_dim (required), hidden "
        "([128, 128], the hidden layers' widths), num_classes (10), activation (relu, or tanh, gelu); cnn: in_channels (1), "
        "num_classes (10), channels ([16, 32], one conv block each), image_size (28, or [height, width]), kernel_size (3), "
        "padding (1), fc_dim (64).",
        default_factory=dict,
    )
    checkpoint: str | None = _help(
        "Weights: a safetensors or torch.save file of a state dict, told apart by content (.safetensors, .pt, .pth, .bin, .ckpt, ...), "
        "or the index of a sharded one (model.safetensors.index.json, as Hugging Face's save_pretrained writes); "
        "wrappers state_dict / model / model_state_dict / module / state_dict_ema / model_ema / ema (the first that holds "
        "a state dict, in this order, is loaded; a warning names the others) and DDP, torch.compile and Lightning prefixes "
        "accepted.",
        default=None,
    )


@dataclass
class TaskConfig(_Section):
    """What the model does and which quantity of a query is attributed."""

    kind: Literal["classification", "regression", "language_modeling"] = _help(
        "classification (logits [batch, classes], cross-entropy) | regression (predictions, summed squared error) | "
        "language_modeling (logits [batch, positions, vocabulary], labels [batch, positions] aligned with them, "
        "cross-entropy summed over positions; label -100 = no loss there)",
        default="classification",
    )
    measurement: str = _help(
        "Query quantity differentiated: loss | margin (classification: z_y − logsumexp of the other logits; minus the margin is used) "
        "| package.module:function (your own fn(outputs, targets) returning one value per query, shape [batch], with grad; "
        "a positive score means up-weighting the training example lowers it; the module is looked up beside the config, "
        "then on PYTHONPATH).",
        default="loss",
    )


@dataclass
class DataConfig(_Section):
    """Training and query data, and how batches are formed."""

    train: DataSpec | None = _help("The training set the factors and scores are about.", default=None)
    query: DataSpec | None = _help("The query set (compute-scores).", default=None)
    batch_size: int = _help("Examples per batch for every pass.", default=256)
    num_workers: int = _help("DataLoader worker processes.", default=0)
    padding_value: float | None = _help(
        "Input value marking padding positions of sequence inputs (token ids [batch, seq], or [batch, seq, features] "
        "rows equal to it everywhere); they are left out of every factor and gradient (null = no padding; token data whose "
        "sequences end or start in runs of one id of different lengths then gets a warning). Conv1d / Conv2d patches are not "
        "masked: leave it null for channels-first signals [batch, C, L], whose C it would read as the sequence axis.",
        default=None,
    )


@dataclass
class FactorsConfig(_Section):
    """How the curvature (Fisher / Gauss-Newton) is approximated."""

    strategy: Literal["ekfac", "kfac", "diagonal", "identity"] = _help(
        "ekfac (eigenvalue-corrected K-FAC) | kfac | diagonal | identity (no curvature)", default="ekfac"
    )
    fisher: Literal["sampled", "empirical", "ggn"] = _help(
        "sampled (true Fisher, seeded label samples) | empirical (real labels) | ggn (exact expectation)",
        default="sampled",
    )
    modules: list[str] = _help("fnmatch patterns of module names to track.", default_factory=lambda: ["*"])
    trainable_only: bool = _help(
        "Track only the layers training changed: a layer none of whose parameters requires grad (requires_grad=False as "
        "the model is built and loaded: a frozen backbone, the base layers under LoRA adapters) is left out where a "
        "pattern of factors.modules matches it, and an error where one names it. false: every matched layer (fit-factors "
        "warns when a wildcard tracks frozen layers of a model that has trainable ones).",
        default=False,
    )
    max_examples: int | None = _help(
        "Cap on the training examples each fit-factors pass sees (null = all); compute-scores still scores all of "
        "data.train, and refuses factors fitted with another cap.",
        default=None,
    )
    amp: Literal["none", "bfloat16", "float16"] = _help(
        "Low precision for the data passes of fit-factors, compute-scores and dataset-similarity (spectrum's runs in float32): the model's forward "
        "and backward run under autocast in this dtype. bfloat16 (GPUs and CPUs with bf16 units): the per-batch matrix "
        "products (covariances, rotations, scoring GEMMs) run in bf16 too, summed in float32 accumulators. float16 (GPUs "
        "without bf16, such as T4 and V100): each example's backward seed is scaled by its own power of two, so float16's "
        "range keeps small gradients and a backward that overflows runs again at a smaller scale; the products stay float32. "
        "Eigendecompositions stay float64. none: float32 throughout, with TF32 turned off for the model's forward and "
        "backward on CUDA (PyTorch's default TF32 convolutions moved the bundled CNN's scores by 1% to 5% of the largest on an H200).",
        default="none",
    )
    checkpoint_every: int = _help("Save resumable progress every N batches of fit-factors' passes, of compute-scores (pairwise and --self), dataset-similarity and spectrum; 0 = never (under torchrun, their --resume still rewrites a rank's lost file of a finished dataset, from another rank's copy).", default=50)


@dataclass
class ScoresConfig(_Section):
    """How influence scores are computed and stored."""

    damping: float | str = _help(
        "auto (damping_factor x mean eigenvalue, per layer) or a number >= 0 used for every layer. With auto, fit-factors warns "
        "(one line) of layers whose input columns are on scales so far apart (one in the millions beside others near 1) that "
        "auto damping drowns the typical column's curvature: for the data's columns, naming them and a number to set here "
        "instead (standardizing them is the better fix); for deeper layers' outlier features, a lower damping_factor.",
        default="auto",
    )
    damping_factor: float = _help("λ = damping_factor x mean eigenvalue of each layer, when damping is auto.", default=0.1)
    damping_scope: Literal["layer", "model"] = _help(
        "auto damping: layer (each layer's own mean eigenvalue) | model (one λ from the mean over all tracked parameters).",
        default="layer",
    )
    relative: bool = _help("RelatIF: divide by the norm of the train example's preconditioned gradient.", default=False)
    by_layer: bool = _help(
        "Also store each tracked layer's part of every score (compute-scores --by-layer): scores_by_layer [L, n_query, "
        "n_train] beside scores (self_influence_by_layer [L, n_train] with --self), the parts summing to the score "
        "(relative ones too: each part is divided by the same norm); top-k then shows the leading layers of each pair. "
        "The score block held in memory, and the files, grow (1 + L)-fold (max_memory_mb counts it).",
        default=False,
    )
    sum_queries: bool = _help(
        "Sum the scores over every query of data.query (compute-scores --sum-queries): scores [1, n_train], each training "
        "example's total influence on the whole query set, from one pass over the training set (the preconditioned query "
        "gradients are summed chunk by chunk, exact by linearity) instead of one per chunk of queries.",
        default=False,
    )
    per_token: bool = _help(
        "Also store each training position's part of every score (compute-scores --per-token): scores_per_token [n_query, "
        "n_train, T] beside scores (T: data.train's sequence length; padding positions 0), summing over T to the score; "
        "top-k then shows each ranked example's leading tokens. For models whose tracked layers are all Linear layers over "
        "the inputs' positions (language models, [batch, seq, features] inputs); not with relative, by_layer or checkpoints (compute-scores --self leaves it aside). "
        "The score block held in memory, and the files, grow (1 + T)-fold (max_memory_mb counts it).",
        default=False,
    )
    max_memory_mb: float = _help(
        "Memory budget (MB), each on its own, for the score matrix held at a time (with by_layer, its per-layer parts too; larger "
        "runs are written as shards) and for the "
        "preconditioned queries held at a time (more queries are scored in chunks, each chunk streaming the training set once).",
        default=1024.0,
    )
    query_chunk: int | None = _help("Queries preconditioned and scored together (null = fit the budget).", default=None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help(
        "Storage dtype of the pairwise scores and of their per-layer (scores.by_layer) or per-token (scores.per_token) parts, which then sum to the stored scores up to "
        "its rounding (self-influence is stored as computed: float32, or float64 for a float64 model).",
        default="float32",
    )
    checkpoints: list[str] = _help(
        "Extra checkpoints of the same architecture to ensemble over: fit-factors fits each one's factors, "
        "compute-scores averages the scores of all models.",
        default_factory=list,
    )


@dataclass
class SimilarityConfig(_Section):
    """Datasets compared by dataset-similarity and how."""

    method: Literal["fisher-kernel", "task2vec"] = _help(
        "fisher-kernel (mean gradients through the damped Fisher) | task2vec (diagonal Fisher embeddings, cosine)",
        default="fisher-kernel",
    )
    datasets: dict[str, DataSpec] = _help("Two or more named data specs (same keys as data.train).", default_factory=dict)
    fisher: Literal["sampled", "empirical", "ggn"] | None = _help(
        "Fisher of each dataset's Task2Vec diagonal: sampled | empirical | ggn (no label-sampling noise) | null (= factors.fisher)",
        default=None,
    )


@dataclass
class SpectrumEditConfig(_Section):
    """What `influence edit` keeps of each layer's weights in the curvature eigenbasis (Merullo et al. 2025)."""

    keep: Literal["mass", "share"] = _help(
        "mass: the smallest set of highest-curvature directions holding rho of the curvature | share: the top `share` of directions",
        default="mass",
    )
    rho: float = _help("Share of the curvature mass kept with keep: mass (0.6 in Merullo et al. 2025).", default=0.6)
    share: float = _help("Share of the directions kept (highest curvature first) with keep: share.", default=0.5)
    layers: list[str] | None = _help("fnmatch patterns of the layers edited (null = spectrum.layers).", default=None)


@dataclass
class SpectrumConfig(_Section):
    """How `influence spectrum` splits the curvature eigenbasis into bands, and on which datasets."""

    layers: list[str] = _help("fnmatch patterns of the tracked layers analysed.", default_factory=lambda: ["*"])
    order: Literal["kfac", "ekfac"] = _help(
        "Curvature of direction (i, j): kfac (the products λ_G[i]·λ_A[j]) | ekfac (the corrected eigenvalues Λ*[i, j]; needs ekfac factors)",
        default="kfac",
    )
    bottom: float = _help("Share of the directions (or of the curvature mass, with mass: true) in the bottom band.", default=0.5)
    top: float = _help("Share of the directions (or of the curvature mass, with mass: true) in the top band.", default=0.1)
    mass: bool = _help("Bands by cumulative curvature mass instead of by share of directions.", default=False)
    bins: int = _help("Curvature-percentile bins of the energy profile (--plot).", default=20)
    baseline: str | None = _help(
        "Dataset the others are compared to (a name, or name:noisy / name:clean); null = the last group: the last dataset listed, or its name:clean part when label noise changed some of its labels.", default=None
    )
    datasets: dict[str, DataSpec] = _help("Named data specs (same keys as data.train); empty = data.train as `train`.", default_factory=dict)
    edit: SpectrumEditConfig = _help("influence edit.", default_factory=SpectrumEditConfig)


@dataclass
class Config(_Section):
    """The whole config file."""

    model: ModelConfig = _help("The model.", default_factory=ModelConfig)
    task: TaskConfig = _help("The task.", default_factory=TaskConfig)
    data: DataConfig = _help("The data.", default_factory=DataConfig)
    factors: FactorsConfig = _help("Curvature approximation.", default_factory=FactorsConfig)
    scores: ScoresConfig = _help("Score computation.", default_factory=ScoresConfig)
    similarity: SimilarityConfig = _help("Dataset similarity.", default_factory=SimilarityConfig)
    spectrum: SpectrumConfig = _help("Curvature spectrum (memorization) and weight editing.", default_factory=SpectrumConfig)
    output_dir: str = _help("Folder for factors, scores and reports.", default="runs/default")
    factors_dir: str | None = _help(
        "Folder of the factors, when not output_dir: fit-factors writes them there and the other commands read them "
        "from there, so several output_dirs (query sets, score settings) share one fit; null = output_dir.",
        default=None,
    )
    device: str = _help("auto | cpu | cuda | cuda:N", default="auto")
    seed: int = _help("Seed for sampled labels, and for label noise and `sample` where a data spec sets no label_noise_seed / sample_seed.", default=0)
    base_dir: str = field(default=".", metadata={"help": "Folder relative paths resolve against.", "internal": True})
    source: str = field(default="<config>", metadata={"help": "Where the config came from.", "internal": True})

    def resolve(self, path: str | None) -> Path | None:
        """Resolves a path from the config against the config file's folder."""
        return None if path is None else resolve_path(path, self.base_dir)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output_dir)  # type: ignore[return-value]

    @property
    def factors_path(self) -> Path:
        """The folder of the factors: factors_dir, or output_dir when it is unset."""
        return self.resolve(self.factors_dir) if self.factors_dir is not None else self.output_path  # type: ignore[return-value]

    @property
    def factors_key(self) -> str:
        """The config key that names the factors' folder (in errors)."""
        return "factors_dir" if self.factors_dir is not None else "output_dir"

    def input_files(self) -> dict[Path, str]:
        """{file: its config key} of every file the config reads: checkpoints, data files, index files."""
        out: dict[Path, str] = {}
        named = [("model.checkpoint", self.model.checkpoint)]
        named += [(f"scores.checkpoints[{i}]", c) for i, c in enumerate(self.scores.checkpoints)]
        for key, spec in _specs_by_key(self).items():
            named += [(f"{key}.{field}", getattr(spec, field)) for field in ("path", "images", "labels", "indices_file")]
        for key, value in named:
            if value is not None:
                out.setdefault(self.resolve(value).resolve(), key)  # type: ignore[union-attr]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (internal fields left out)."""
        return _to_plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


def resolve_path(path: str | Path, base_dir: str | Path) -> Path:
    """A path from the config (~ expanded) against the config file's folder; every command reads
    the file this names, and validation checks it."""
    p = Path(os.path.expanduser(path))  # unlike Path.expanduser, leaves an unknown ~user as is
    return Path(os.path.normpath(p if p.is_absolute() else Path(base_dir) / p))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {
            f.name: _to_plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not f.metadata.get("internal")
        }
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}.get(item)
        return f"a list of {plural}" if plural else f"a list of ({_type_name(item)})"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


_FAIL = object()
MAX_DEPTH = 64  # a YAML file's nesting, and its values once aliases are expanded (alias bombs)
MAX_VALUES = 1_000_000


def _shown(value: Any) -> str:
    """A config value as YAML writes it (null, true, abc, '5', {a: 1}), cut for one-line messages."""
    try:
        text = _yaml_repr(value)
    except yaml.YAMLError:  # a Python object given to config_from_dict
        text = repr(value)
    if isinstance(value, str) and not text.startswith(("'", '"')):
        try:
            same = _yaml_load(text) == value
        except yaml.YAMLError:
            same = False
        if not same:  # a string this loader would read as something else ('08', '1e3'): quoted, as it must be written
            text = "'" + value.replace("'", "''") + "'"
    return text if len(text) <= 80 else text[:76] + " ..."


def _names_are_distinct(value: dict[Any, Any], key: str, problems: list[str]) -> bool:
    """Whether the keys of a mapping of names are names: YAML reads `yes:`/`null:` as true/None, and
    `1:` beside `'1':` would become one name, the second one silently replacing the first."""
    ok = True
    seen: dict[str, Any] = {}
    for k in value:
        if isinstance(k, bool) or k is None:
            problems.append(f"{key}: the name {_shown(k)} is not text (quote it: YAML reads yes, no, on, off and null as true/false/null)")
            ok = False
        elif str(k) in seen:
            problems.append(f"{key}: {_shown(seen[str(k)])} and {_shown(k)} are the same name {str(k)!r} (rename one)")
            ok = False
        seen[str(k)] = k
    return ok


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Checks `value` against type `tp`; returns the value or _FAIL (problem recorded)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            arm = others[0]
            is_map = dataclasses.is_dataclass(arm) or typing.get_origin(arm) is dict
            if (is_map and isinstance(value, dict)) or (typing.get_origin(arm) is list and isinstance(value, (list, tuple))):
                # X | None given an X-shaped value: report the problems inside it, by their own keys
                return _coerce(value, arm, key, problems)
        for arg in args:
            if arg is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {_shown(value)}")
        return _FAIL
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        problems.append(f"{key}: expected one of {_type_name(tp)}, got {_shown(value)}")
        return _FAIL
    if origin is list:
        if not isinstance(value, (list, tuple)):
            one = f" (a single one is written as a list: [{_shown(value)}])" if isinstance(value, str) and typing.get_args(tp)[0] is str else ""
            problems.append(f"{key}: expected {_type_name(tp)}, got {_shown(value)}{one}")
            return _FAIL
        (arg,) = typing.get_args(tp)
        out = [_coerce(v, arg, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return _FAIL if any(v is _FAIL for v in out) else out
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_shown(value)}")
            return _FAIL
        _, varg = typing.get_args(tp)
        if not _names_are_distinct(value, key, problems):
            return _FAIL
        glued = [k for k, v in value.items() if v is None and isinstance(k, str) and re.fullmatch(r"[^\s:]+:[^\s:].*", k)]
        if glued:  # {input_dim:784}: YAML reads one key "input_dim:784" with no value
            problems.append(
                f"{key}: {_shown(glued[0])} reads as one key with no value (YAML needs a space after the colon: "
                f"{glued[0].replace(':', ': ', 1)})"
            )
            return _FAIL
        out = {str(k): _coerce(v, varg, f"{key}.{k}", problems) for k, v in value.items()}
        return _FAIL if any(v is _FAIL for v in out.values()) else out
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_shown(value)}")
            return _FAIL
        return _build(tp, value, key, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                problems.append(f"{key}: {value} is too large for a number")
                return _FAIL
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off (a class folder named "no") as true/false
            problems.append(f"{key}: expected {_type_name(tp)}, got {_shown(value)} (quote it: YAML reads yes, no, on and off as true/false)")
            return _FAIL
    problems.append(f"{key}: expected {_type_name(tp)}, got {_shown(value)}")
    return _FAIL


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            known = ", ".join(sorted(fields))
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            guess = f"did you mean {close[0]}? " if close else ""
            problems.append(f"{key}: unknown key ({guess}known keys: {known})")
            continue
        out = _coerce(value, hints[name], key, problems)
        if out is not _FAIL:
            kwargs[name] = out
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - every field has a default
        problems.append(f"{prefix}: {exc}")
        return _FAIL


# ----------------------------------------------------------------------------- YAML and overrides


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that reads numbers as YAML 1.2 does (exponent floats without a dot such as
    1e-3 are numbers, 010 is ten, 1:30 is text), and refuses a key given twice in one mapping
    (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden by explicit ones
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key (a mapping or list) is reported by PyYAML itself below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 reads them: 010 is ten and 08 is eight (YAML 1.1 reads 010 as octal 8 and
# 08 as text), 1e-3 is a number, and 1:30 and 1:30.5 are text (YAML 1.1 reads them in base 60);
# 0o17 and 0x1f stay octal and hex.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?[0-9][0-9_]*\.[0-9_]*|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)$"), list("-+0123456789")
)


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = int(text[2:], 8 if text[1] == "o" else 16) if text[:2] in ("0o", "0x") else int(text, 10)
        str(value)  # Python neither reads nor writes decimal integers past sys.get_int_max_str_digits(), which a message would
    except ValueError as exc:  # too long, or text tagged !!int that is no integer
        long = "Exceeds the limit" in str(exc)  # Python's words for either way past the limit
        problem = f"an integer of more than {sys.get_int_max_str_digits()} digits" if long else f"{text[:40]!r} is not an integer"
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None
    return value


_Loader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_ESCAPED_BYTES = range(0xDC80, 0xDD00)  # Python's surrogate escapes of bytes that are not UTF-8 (argv, file names)
_STAND_IN = 0x10FF00 - _ESCAPED_BYTES.start  # each stands in YAML as a private-use character, U+10FF00 + (byte - 0x80)


def _yaml_load_argument(text: str) -> Any:
    """A command-line value read as YAML; bytes that are not UTF-8 in it (a path of other bytes: Python's surrogate
    escapes, which YAML refuses) are read as the characters they are, into the strings that hold them, and YAML's
    errors name them so too."""
    stand_ins = text.translate({c: c + _STAND_IN for c in _ESCAPED_BYTES})
    if stand_ins == text or any(ord(c) - _STAND_IN in _ESCAPED_BYTES for c in text):  # none, or a stand-in is in the text
        return _yaml_load(text)
    try:
        return _escaped_back(_yaml_load(stand_ins))
    except yaml.MarkedYAMLError as exc:  # its words name a character as the value has it, not as its stand-in
        exc.context, exc.problem = (_escaped_back(_STAND_IN_REPR.sub(_repr_back, t)) if t else t for t in (exc.context, exc.problem))
        raise


_STAND_IN_REPR = re.compile(r"\\U0010ff([0-7][0-9a-f])")  # a stand-in as repr() shows it (YAML's messages quote characters)


def _repr_back(found: re.Match[str]) -> str:
    return f"\\u{int(found[1], 16) + _ESCAPED_BYTES.start:x}"


def _escaped_back(value: Any) -> Any:
    """`value` (as YAML read it) with the stand-ins of `_yaml_load_argument` back as the surrogate escapes they were."""
    if isinstance(value, str):
        return value.translate({c + _STAND_IN: c for c in _ESCAPED_BYTES})
    if isinstance(value, (list, tuple, set, frozenset)):  # tuples: !!pairs and !!omap; sets: !!set
        return type(value)(_escaped_back(v) for v in value)
    if isinstance(value, dict):
        return {_escaped_back(k): _escaped_back(v) for k, v in value.items()}
    return value


def yaml_text(value: Any) -> str:
    """A config value as it is written in YAML (None is null), for messages."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses one `--set a.b.c=value` override; the value is read as YAML.

    Returns:
        (key path, value).
    """
    shown = shortened(text)
    if "=" not in text:
        raise ConfigError(f"--set {shown}: expected key.path=value (for example factors.strategy=kfac)")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        raise ConfigError(f"--set {shown}: the key {shortened(key)} is not a dotted key path")
    if "[" in key:
        whole = key.split("[", 1)[0]
        raise ConfigError(f"--set {shown}: list elements cannot be set one by one; give the whole list ({whole}=[a, b])")
    try:
        value = _yaml_load_argument(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {shown}: the value is not valid YAML ({_yaml_reason(exc)})") from None
    except RecursionError:
        raise ConfigError(f"--set {shown}: the value is nested too deeply") from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict[str, Any], overrides: list[str], problems: list[str] | None = None) -> dict[str, Any]:
    """Returns a copy of `data` with every `key.path=value` override applied (to that path only).

    An override that cannot be applied raises ConfigError, or, when `problems` is given, is
    recorded there and skipped, so the others and the file are still checked.
    """
    if isinstance(overrides, Mapping):  # its keys alone would read as overrides without a value
        raise TypeError(
            "overrides: expected a list of 'key.path=value' strings (['factors.strategy=kfac']), not a mapping; "
            "for {key: value} pass [f'{k}={v}' for k, v in overrides.items()], or set the Config's fields"
        )
    overrides = overrides if isinstance(overrides, (str, bytes)) else list(overrides)
    if isinstance(overrides, (str, bytes)) or not all(isinstance(text, str) for text in overrides):
        raise TypeError(f"overrides: expected a list of 'key.path=value' strings (['factors.strategy=kfac']), not {overrides!r}")
    data = _unshared(data)
    for text in overrides:
        try:
            parts, value = parse_override(text)
            node = data
            for i, part in enumerate(parts[:-1]):
                part = _existing_key(node, part)
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    path = ".".join(parts[: i + 1])
                    raise ConfigError(f"--set {shortened(text)}: {path} is {shortened(child)}, not a mapping")
                node = child
            if value is None and dataclasses.is_dataclass(_section_type(parts)):
                raise ConfigError(
                    f"--set {shortened(text)}: {'.'.join(parts)} is a section, and null would silently reset all of it to the "
                    f"defaults; set its keys instead ({'.'.join(parts)}.<key>=value)"
                )
            node[_existing_key(node, parts[-1])] = value
        except ConfigError as exc:
            if problems is None:
                raise
            problems.extend(exc.problems)
    return data


def _section_type(parts: list[str]) -> Any:
    """The declared type of the Config field at a dotted key path (`["scores"]` -> ScoresConfig), or
    None when the path is no field: unknown, inside a mapping (`similarity.datasets.a`) or past an
    optional one (`data.query` may be null). Paths through optional fields and mappings
    (`data.train.transform`, `similarity.datasets.a.transform`) reach the fields inside them."""
    tp: Any = Config
    for i, part in enumerate(parts):
        if i:  # a path through a field: that field holds a mapping, its own type's
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
                tp = args[0]
            if typing.get_origin(tp) is dict:
                if i == len(parts) - 1:
                    return None  # a mapping's entry (a dataset) is no section of its own
                tp = typing.get_args(tp)[1]
                continue
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _existing_key(node: dict[Any, Any], part: str) -> Any:
    """The key of `node` that `part` of an override names: a dataset the file names `1:` (YAML reads an int)
    is `similarity.datasets.1`, not a second dataset '1' beside it."""
    if part in node:
        return part
    return next((k for k in node if isinstance(k, (int, float)) and not isinstance(k, bool) and str(k) == part), part)


def _unshared(node: Any) -> Any:
    """A copy in which no mapping or list is shared: a YAML alias (`query: *train`, `<<: *common`)
    becomes a copy of its anchor, so an override of one path leaves the others (deepcopy keeps
    them shared)."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return copy.copy(node)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or first_line(exc, type(exc).__name__)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


# ----------------------------------------------------------------------------- loading


def load_config(
    path: str | Path, overrides: list[str] | None = None, check_files: bool = True, *, reads: Collection[str] | None = None
) -> Config:
    """Reads, overrides and validates a config file.

    Args:
        path: The YAML file.
        overrides: `key.path=value` strings applied on top of the file.
        check_files: Also check that the files the config names exist.

    Raises:
        ConfigError: listing every problem, each with its key.
    """
    path = Path(path)
    problem = _path_problem(path, "file")
    if problem:
        raise ConfigError(f"config file {str(path)!r} {problem}", hint="pass the path of a YAML config file")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({_yaml_reason(exc)})", source=str(path)) from None
    except RecursionError:
        raise ConfigError("not valid YAML (nested too deeply)", source=str(path)) from None
    except UnicodeDecodeError as exc:  # a Latin-1 or UTF-16 file: its byte and line, and the fix
        raise ConfigError(f"not UTF-8 text ({not_utf8(exc)})", source=str(path), hint="save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc})", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys (model:, data:, ...)", source=str(path))
    return config_from_dict(data, overrides or [], base_dir=path.resolve().parent, source=str(path), check_files=check_files, reads=reads)


def config_from_dict(
    data: dict[str, Any],
    overrides: list[str] | None = None,
    base_dir: str | Path = ".",
    source: str = "<config>",
    check_files: bool = True,
    *,
    max_values: int | None = MAX_VALUES,
    reads: Collection[str] | None = None,
) -> Config:
    """Builds a validated `Config` from plain data (the Python API's entry point).

    Relative paths in `data` resolve against `base_dir` (default: the working directory when the
    config is built, made absolute, so a later `os.chdir` does not move them). `max_values` caps the
    values once YAML aliases are expanded (alias bombs); None lifts it, for data built in Python.

    Raises:
        ConfigError: listing every problem (type problems and value problems together), each with its key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys (model:, data:, ...), got {type(data).__name__}", source=source)
    reads = _checked_reads(reads)
    _check_structure(data, source, max_values)
    problems: list[str] = []
    data = apply_overrides(data, overrides or [], problems)  # a bad --set is reported with the rest
    try:
        _check_structure(data, source, max_values)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems, source=source) from None
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}  # x-<name>: YAML anchors for the keys below, not keys
    cfg = _build(Config, data, "", problems)
    if cfg is not _FAIL:
        cfg.base_dir = os.path.abspath(base_dir)  # absolute, links kept: ../data from a linked folder stays beside the link
        cfg.source = source
        # A key that failed its type check fell back to its default: drop value problems
        # about that default (e.g. "data.train: missing" after "data.train: expected a mapping").
        # So does a misspelt key for the key it was meant to be, when that key is absent
        # ("data.train.source: missing" after "data.train.sourc: unknown key (did you mean source?").
        failed = {p.split(": ", 1)[0] for p in problems} | {
            meant
            for p in problems
            if (m := re.match(r"(.*?)[^.:]+: unknown key \(did you mean ([^?]+)\?", p)) and not _has_key(data, meant := f"{m[1]}{m[2]}")
        }
        problems.extend(p for p in validate(cfg, check_files=check_files, reads=reads) if not _under(p.split(": ", 1)[0], failed))
        if check_files and not problems:
            problems += _share_image_folder_classes(cfg, reads)
    if problems:
        raise ConfigError(problems, source=source, hint="fix the keys above in the file or with --set key=value")
    return cfg


def rebuilt(cfg: Config, reads: Collection[str] | None = None) -> Config:
    """A built Config validated again and built anew, as `config_from_dict` builds plain data: a
    field changed in Python after loading (`cfg.factors.strategy = "bogus"`, a dict where a block
    belongs, an image folder set as data.query) is checked and completed (data.train's classes
    shared) like a file. Paths (os.PathLike) and numpy values become the strings and numbers they
    stand for; an image folder that took data.train's colour mode takes it from data.train's folder
    now (moved, or as at load), and is refused where that folder is absent and the run reads it.

    Raises:
        ConfigError: listing every problem, each with its key.
    """
    data = cfg.to_dict()
    before = _specs_by_key(cfg)
    took = {key for key, spec in before.items() if key != "data.train" and spec.colour_of is not None}  # data.train's colour mode, at load
    reads = _checked_reads(reads)  # used again below, after config_from_dict
    # a user factory's kwargs reach it as given (objects, Paths, tuples): set aside, not converted or copied
    # (the built-in models' and sources' kwargs are checked, so they are built anew like the rest)
    kwargs = {key: spec.kwargs for key, spec in before.items() if isinstance(spec.kwargs, dict) and spec.kwargs and ":" in str(spec.source)}
    model = cfg.model
    if isinstance(model, ModelConfig) and isinstance(model.kwargs, dict) and ":" in str(model.architecture):
        kwargs["model"] = model.kwargs
    for key in kwargs:
        node = data
        for part in _key_path(key):
            node = node[part]
        node["kwargs"] = {}
    hint = "fix those fields of the Config (or the file it was loaded from)"
    try:
        out = config_from_dict(_python_values(data), base_dir=cfg.base_dir, source=cfg.source, max_values=None, reads=reads)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=cfg.source, hint=hint) from None
    train = out.data.train
    now = out.resolve(train.root) if train is not None and train.source == "image_folder" and train.root is not None else None
    gone = []
    for key, spec in _specs_by_key(out).items():
        old = before.get(key)
        same_root = old is not None and isinstance(old.root, (str, os.PathLike)) and os.fspath(old.root) == spec.root  # Path("ac") is "ac"
        if key in took and spec.colour_of is None and same_root:
            if now is not None and _is_dir(now):
                spec.colour_of = str(now)  # to_dict leaves internal fields out: data.train's folder as it is now (moved, or as at load)
            elif reads_data(out, key, reads):  # loaded beside data.train's images, run where they are not
                where = (
                    "data.train is no longer an image folder (load the config again)" if now is None
                    else f"data.train.root {train.root!r} is not a folder here (make data.train's images available here)"
                )  # fmt: skip
                gone.append(f"{key}: this image folder took data.train's colour mode, and {where}")
        if key in kwargs:
            spec.kwargs = kwargs[key]
    if gone:
        raise ConfigError(gone, source=cfg.source, hint=hint)
    if "model" in kwargs:
        out.model.kwargs = kwargs["model"]
    return out


def checked_data_spec(spec: Any, key: str, base_dir: str | Path) -> DataSpec:
    """A data spec given in code (`load_dataset`): a DataSpec, changed after loading or not, or a
    mapping of the file's keys, checked and built anew as the file's are (as `rebuilt` does for a
    whole Config). A user factory's kwargs reach it as given; an image folder keeps its colour mode.

    Raises:
        TypeError: not a data spec (the whole Config, a path).
        ConfigError: naming each problem by `key`.
    """
    if isinstance(spec, Config):
        raise TypeError("load_dataset() takes one data spec (cfg.data.train, cfg.data.query), not the whole Config")
    if not isinstance(spec, (DataSpec, Mapping)):
        raise TypeError(f"load_dataset() takes a DataSpec (cfg.data.train) or a mapping of its keys, not {type(spec).__name__}")
    data = _to_plain(spec) if isinstance(spec, DataSpec) else dict(spec)
    factory_kwargs = data.get("kwargs") if ":" in str(data.get("source")) and isinstance(data.get("kwargs"), dict) else None
    if factory_kwargs is not None:
        data["kwargs"] = {}  # set aside, not converted or copied
    problems: list[str] = []
    out = _coerce(_python_values(data), DataSpec, key, problems)
    if out is not _FAIL:
        problems += _check_data_spec(Config(base_dir=str(base_dir)), out, key, check_files=False)  # a missing file: the source's DataError says more
    if problems:
        raise ConfigError(problems, hint="fix those fields of the data spec")
    if isinstance(spec, DataSpec):
        out.colour_of = spec.colour_of
    if factory_kwargs is not None:
        out.kwargs = factory_kwargs
    return out


def _key_path(key: str) -> list[str]:
    """'similarity.datasets.a.b' -> ['similarity', 'datasets', 'a.b']: a dataset name may hold dots."""
    if key.startswith(("similarity.datasets.", "spectrum.datasets.")):
        block, _, name = key.split(".", 2)
        return [block, "datasets", name]
    return key.split(".")


def _specs_by_key(cfg: Config) -> dict[str, DataSpec]:
    """The data specs of a Config by key; anything set in code that is not a DataSpec (a dict, None) is
    left out, to be built (and checked) anew."""
    data = getattr(cfg.data, "__dict__", {})
    specs = {"data.train": data.get("train"), "data.query": data.get("query")}
    for block in ("similarity", "spectrum"):
        datasets = getattr(getattr(cfg, block), "datasets", None)
        if isinstance(datasets, dict):
            specs |= {f"{block}.datasets.{n}": d for n, d in datasets.items()}
    return {k: v for k, v in specs.items() if isinstance(v, DataSpec)}


def _python_values(node: Any) -> Any:
    """Values set in Python as the plain data a YAML file holds: mappings as dicts, tuples and ranges
    as lists, a set as its sorted list, paths as strings, NumPy and torch scalars and arrays as numbers
    and lists (without importing either)."""
    if isinstance(node, Mapping):
        return {k: _python_values(v) for k, v in node.items()}
    if isinstance(node, (list, tuple, range)):
        return [_python_values(v) for v in node]
    if isinstance(node, (set, frozenset)):
        try:
            return sorted(_python_values(v) for v in node)
        except TypeError:  # unorderable values: the type check names them
            return [_python_values(v) for v in node]
    if isinstance(node, os.PathLike):
        return os.fspath(node)
    if type(node).__module__.split(".")[0] in ("numpy", "torch") and hasattr(node, "tolist"):
        return node.tolist()
    return node


def _is_dir(path: Path) -> bool:
    """Whether `path` is a folder here; False where it cannot be looked at (a name too long, no permission)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def image_folder_classes(root: Path) -> list[str]:
    """The class folders of an image folder: its sorted sub-folders, hidden ones (.ipynb_checkpoints) left out."""
    return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))


def _share_image_folder_classes(cfg: Config, reads: Collection[str] | None = None) -> list[str]:
    """Gives data.train's classes to data.query, and to every other image_folder spec without
    `classes` whose class folders are all among them (a folder lacking some class): each numbering
    its own folders would shift the labels of every class after the missing one. A query class
    data.train lacks is then refused when the query set loads; a similarity or spectrum folder of
    other classes (an out-of-domain set), or with `classes` of its own, keeps its own numbering.
    Those that take data.train's classes are also read in its colour mode, as the model takes it.

    Returns a problem for each spec a command reads (`reads`) that takes them, or might (data.train's
    classes unknown), where data.train's folder holds no class folders here (a command that does not
    read data.train): its labels or colour mode could change silently.
    """
    train = cfg.data.train
    if train is None or train.source != "image_folder" or train.root is None:
        return []
    root = cfg.resolve(train.root)
    denied = False  # data.train.root may not be listed by this user
    try:
        found = image_folder_classes(root) if root.is_dir() else []
    except OSError as exc:  # a name too long, no permission: not here
        found, denied = [], isinstance(exc, PermissionError)
    here = bool(found)  # else not read by this command (validate and its own load check it where it is)
    classes = train.classes or found or None
    specs = [("data.query", cfg.data.query)] + [
        (f"{block}.datasets.{name}", spec) for block in ("similarity", "spectrum") for name, spec in getattr(cfg, block).datasets.items()
    ]
    problems = []
    for key, spec in specs:
        if spec is None or spec.source != "image_folder" or spec.root is None:
            continue
        if key != "data.query":  # the query set always takes them: a class the model was not trained on is refused by name
            folder = cfg.resolve(spec.root)
            if spec.classes is not None or not _is_dir(folder):  # its own numbering, or a folder not read here
                continue
            try:
                if classes is not None and not set(image_folder_classes(folder)) <= set(classes):
                    continue  # other classes: an out-of-domain set, numbered by its own folders
            except OSError:  # no permission to list it: reading it names the folder
                continue
        if not here:
            if reads_data(cfg, key, reads):
                known = classes is not None or key == "data.query"  # whether it takes them, or only may
                what = "takes" if known else "may take (its class folders among data.train's)"
                other = "" if known else "; data.train.classes would let a folder of other classes through"
                missing = "cannot be listed (permission denied: give this user read and search permission on it, chmod u+rx" if denied else (
                    "holds no class folders here (make data.train's images available here")  # fmt: skip
                problems.append(
                    f"{key}: this image folder {what} data.train's class numbering and colour mode, and data.train.root "
                    f"{train.root!r} {missing}{other})"
                )
            continue
        spec.colour_of = str(root)  # read in data.train's colour mode (grayscale or RGB), as the model takes it
        if spec.classes is None:
            spec.classes = list(classes)  # type: ignore[arg-type]
    return problems


def _has_key(data: dict[str, Any], dotted: str) -> bool:
    """Whether the raw config data sets `dotted` (a.b.c)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _under(key: str, roots: set[str]) -> bool:
    """Whether `key` is one of `roots` or nested below one of them."""
    return any(key == r or key.startswith((r + ".", r + "[")) for r in roots)


MAX_WORKERS = 256  # DataLoader processes per rank; more is a typo (99999999999 used to hang forking them)


def _check_structure(data: Any, source: str, max_values: int | None = MAX_VALUES) -> None:
    """Rejects self-referencing YAML aliases, absurd nesting and alias bombs (more than `max_values`
    values; None: no limit) before anything walks the data."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def walk(node: Any, key: str, depth: int) -> int:
        if not isinstance(node, (dict, list, tuple)):
            return 1
        nid = id(node)
        if nid in on_path:
            raise ConfigError(f"{key or 'the top level'}: contains itself (a YAML alias inside its own anchor)", source=source)
        if nid in sizes:
            return sizes[nid]
        if depth > MAX_DEPTH:
            raise ConfigError(f"{key}: nested more than {MAX_DEPTH} levels deep", source=source)
        on_path.add(nid)
        if isinstance(node, dict):
            items = [(f"{key}.{k}" if key else str(k), v) for k, v in node.items()]
        else:
            items = [(f"{key}[{i}]", v) for i, v in enumerate(node)]
        total = 1 + sum(walk(v, k, depth + 1) for k, v in items)
        on_path.discard(nid)
        sizes[nid] = total
        return total

    total = walk(data, "", 0)
    if max_values is not None and total > max_values:
        raise ConfigError(f"the config expands to {total:,} values (YAML aliases?); the limit is {MAX_VALUES:,}", source=source)


def _path_problem(path: Path | None, kind: str) -> str | None:
    """None when `path` is a `kind` ("file" or "folder"), else what is wrong ("does not exist", "is a folder, not a file")."""
    if path is None:
        return None
    try:
        if path.is_file() if kind == "file" else path.is_dir():
            return None
        if path.exists():
            if kind == "file":
                return "is a folder, not a file" if path.is_dir() else "is not a regular file"
            return "is a file, not a folder"
    except (OSError, ValueError):
        pass
    return "does not exist"


def _named_path_problem(cfg: Config, key: str, value: str, kind: str, unset: str | None = None) -> list[str]:
    """[] when the config's path `value` (relative to the config file) is a `kind`, else the problem
    under `key`; an empty value is named as such rather than resolved to the config's folder."""
    if not value.strip():
        return [f"{key}: empty; give the path of a {kind}" + (f" or {unset} to leave it unset" if unset else "")]
    resolved = cfg.resolve(value)
    problem = _path_problem(resolved, kind)
    if problem == "does not exist":
        problem += _from_working_directory(value, cfg.base_dir, kind)
    elif problem == "is a folder, not a file" and (inside := _weights_in(resolved)) is not None:
        problem += f" (it holds {inside}, as save_pretrained writes: name that file)"
    elif problem == "is a folder, not a file" and (adapter := _adapter_in(resolved)) is not None:
        problem += f" (it holds {adapter}, {ADAPTER_ONLY})"
    return [f"{key}: {str(resolved)!r} {problem}"] if problem else []


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _weights_in(folder: Path) -> str | None:
    """The first of `WEIGHT_FILES` (Hugging Face's save_pretrained names) in `folder`, or None."""
    try:
        return next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    except OSError:
        return None


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's save_pretrained: the adapter's weights alone
ADAPTER_ONLY = (
    "an adapter's weights alone, without the base model's: load them in the model's factory "
    "(peft: PeftModel.from_pretrained(base, folder, is_trainable=True)) and leave model.checkpoint null, "
    "or save the whole fine-tuned model's state_dict() and name that file"
)


def _adapter_in(folder: Path) -> str | None:
    """The first of `ADAPTER_FILES` in `folder`, or None."""
    try:
        return next((name for name in ADAPTER_FILES if (folder / name).is_file()), None)
    except OSError:
        return None


def _from_working_directory(value: str, base_dir: str, kind: str) -> str:
    """'' unless the relative path `value` names a `kind` from the working directory (a path written
    relative to where the command runs, not to the config's folder); then how to write that one."""
    if os.path.isabs(os.path.expanduser(value)):
        return ""
    try:
        here = Path.cwd() / value
        if Path.cwd().resolve() == Path(base_dir).resolve() or _path_problem(here, kind) is not None:
            return ""
        fixed = os.path.relpath(os.path.normpath(here), base_dir)
    except (OSError, ValueError):
        return ""
    return f" (relative paths resolve against the config file's folder: {value} in the working directory is {fixed} from there)"


def per_token_clashes(relative: bool, by_layer: bool, checkpoints: Collection[str]) -> list[str]:
    """The scores settings, among those set, that per-token scores do not combine with: relative, by_layer, checkpoints (their keys
    under scores, in that order)."""
    return [key for key, on in (("relative", relative), ("by_layer", by_layer), ("checkpoints", bool(checkpoints))) if on]


BUILTIN_MEASUREMENTS = ("loss", "margin")  # task.measurement's own values; any other is a package.module:function


def _measurement_problems(cfg: Config) -> list[str]:
    """task.measurement: loss, margin or the package.module:function of the user's own (its form only: it is
    imported by compute-scores, which calls it)."""
    value = cfg.task.measurement
    if value in BUILTIN_MEASUREMENTS:
        return []
    module, colon, function = value.partition(":")

    def dotted(name: str) -> bool:
        return bool(name) and all(part.isidentifier() for part in name.split("."))

    if colon and dotted(module) and dotted(function):
        return []
    if module.endswith(".py") or any(sep in module for sep in ("/", "\\")):
        own = f"name the module as Python imports it, without its folder and .py: {Path(module).stem}:{function or '<function>'}"
    elif not colon and (close := difflib.get_close_matches(value.lower(), BUILTIN_MEASUREMENTS, n=1)):
        own = f"did you mean {close[0]}?"
    else:
        own = colon_form_hint(value, Path(cfg.base_dir)) or ""
    return [
        f"task.measurement: {value!r} is not loss, margin or package.module:function (your own fn(outputs, targets) "
        "returning one value per query)" + (f" ({own})" if own else "")
    ]


def _check_data_spec(cfg: Config, spec: DataSpec, key: str, check_files: bool) -> list[str]:
    problems: list[str] = []
    builtin = ("mnist", "fashion_mnist", "cifar10", "idx", "tensors", "csv", "image_folder")
    if not spec.source:
        problems.append(f"{key}.source: missing (one of {', '.join(builtin)} or package.module:function)")
    elif spec.source not in builtin and ":" not in spec.source:
        own = colon_form_hint(spec.source, Path(cfg.base_dir))
        problems.append(f"{key}.source: {spec.source!r} is not one of {', '.join(builtin)} or package.module:function" + (f" ({own})" if own else ""))
    required = {
        "idx": ["images", "labels"],
        "tensors": ["path"],
        "csv": ["path", "label_column"],
        "image_folder": ["root"],
        "mnist": ["root"],
        "fashion_mnist": ["root"],
        "cifar10": ["root"],
    }.get(spec.source, [])
    for name in required:
        value = getattr(spec, name)
        if value is None:
            what = " (the header name of the label column)" if name == "label_column" else ""
            problems.append(f"{key}.{name}: required for source {spec.source}{what}")
        elif name == "label_column":
            continue
        elif check_files and not (spec.source in ("mnist", "fashion_mnist", "cifar10") and spec.download):
            problems += _named_path_problem(cfg, f"{key}.{name}", value, "folder" if name == "root" else "file")
    if spec.source in builtin or ":" in spec.source:  # a key the source never reads is a mistake, not a no-op
        torchvision = ("mnist", "fashion_mnist", "cifar10")
        readers = {
            "images": ("idx",), "labels": ("idx",), "path": ("tensors", "csv"), "root": (*torchvision, "image_folder"),
            "split": torchvision, "download": torchvision, "inputs_key": ("tensors",), "labels_key": ("tensors",),
            "label_column": ("csv",), "columns": ("csv",),
        }  # fmt: skip
        source = "factory" if ":" in spec.source else spec.source
        defaults = DataSpec()
        for name, sources in readers.items():
            if source not in sources and getattr(spec, name) != getattr(defaults, name):
                problems.append(
                    f"{key}.{name}: not read by source {spec.source} (it is for {', '.join(sources)}; "
                    f"leave it out, or set it to {yaml_text(getattr(defaults, name))})"
                )
        if spec.kwargs and source != "factory":
            problems.append(f"{key}.kwargs: not read by source {spec.source} (it is for package.module:function sources; leave it out)")
    if spec.source == "csv":
        problems += _csv_column_problems(spec, key)
    if spec.indices_file is not None and check_files:
        problems += _named_path_problem(cfg, f"{key}.indices_file", spec.indices_file, "file")
    if spec.range is not None:
        if len(spec.range) != 2 or spec.range[0] < 0 or spec.range[1] <= spec.range[0]:
            problems.append(f"{key}.range: expected [start, stop) with 0 <= start < stop, got {spec.range}")
    if spec.indices is not None and any(not 0 <= i < 2**63 for i in spec.indices):
        problems.append(f"{key}.indices: indices must be in 0..2**63-1")
    if spec.labels_in is not None and any(not -(2**63) <= v < 2**63 for v in spec.labels_in):
        problems.append(f"{key}.labels_in: labels must fit in int64")
    selectors = [n for n in ("range", "indices", "indices_file") if getattr(spec, n) is not None]
    if len(selectors) > 1:
        problems.append(f"{key}: use one of range, indices, indices_file (got {', '.join(selectors)})")
    if spec.classes is not None and (spec.source != "image_folder" or len(set(spec.classes)) != len(spec.classes) or not spec.classes):
        what = "is for source image_folder" if spec.source != "image_folder" else "needs distinct folder names"
        problems.append(f"{key}.classes: {what}, got {spec.classes}")
    if spec.limit is not None and spec.limit <= 0:
        problems.append(f"{key}.limit: must be > 0, got {spec.limit}")
    if spec.sample is not None and spec.sample <= 0:
        problems.append(f"{key}.sample: must be > 0, got {spec.sample}")
    if spec.sample is not None and spec.limit is not None:
        problems.append(f"{key}: use one of sample, limit (sample {spec.sample} keeps that many examples already; limit takes the first ones)")
    if spec.sample_seed is not None and not 0 <= spec.sample_seed < 2**63:
        problems.append(f"{key}.sample_seed: must be in 0..2**63-1 (or null: seed), got {spec.sample_seed}")
    if not 0.0 <= spec.label_noise < 1.0:
        problems.append(f"{key}.label_noise: must be in [0, 1), got {spec.label_noise}")
    if spec.label_noise_seed is not None and not 0 <= spec.label_noise_seed < 2**63:
        problems.append(f"{key}.label_noise_seed: must be in 0..2**63-1 (or null: seed), got {spec.label_noise_seed}")
    t = spec.transform
    if t.scale is not None and (t.scale == 0 or not math.isfinite(t.scale)):
        problems.append(f"{key}.transform.scale: must be a finite non-zero number, got {t.scale}")
    for name, n, length in (("normalize", t.normalize, ""), ("target_normalize", t.target_normalize, " (one, or one per label column)")):
        if n is None:
            continue
        if len(n.mean) != len(n.std) or not n.mean:
            problems.append(f"{key}.transform.{name}: mean and std need the same non-zero length{length}")
        if not all(math.isfinite(m) for m in n.mean):
            problems.append(f"{key}.transform.{name}.mean: every mean must be a finite number")
        if not all(math.isfinite(s) and s > 0 for s in n.std):
            problems.append(f"{key}.transform.{name}.std: every std must be a finite number > 0, got {n.std}")
    if t.channels is not None and t.channels not in (1, 3):
        problems.append(f"{key}.transform.channels: must be 1 or 3 (or null), got {t.channels}")
    if t.resize is not None and (len(t.resize) != 2 or min(t.resize) <= 0):
        problems.append(f"{key}.transform.resize: expected [height, width] > 0, got {t.resize}")
    return problems


def _csv_column_problems(spec: DataSpec, key: str) -> list[str]:
    """label_column and columns of a csv source: names, each once, not both a label and a feature (whether the file's
    header has them, its reader says)."""
    problems: list[str] = []
    labels = [spec.label_column] if isinstance(spec.label_column, str) else list(spec.label_column or [])
    for name, names in (("label_column", labels), ("columns", spec.columns)):
        if names is None:
            continue
        if isinstance(spec.label_column, list) or name == "columns":
            if not names:
                problems.append(f"{key}.{name}: an empty list (name at least one column of the header, or leave it out)")
        if any(not n.strip() for n in names):
            problems.append(f"{key}.{name}: a column name is empty (name the header's columns)")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(f"{key}.{name}: {', '.join(map(repr, twice))} named twice (name each column once)")
    both = [n for n in spec.columns or [] if n in labels]
    if both:
        problems.append(f"{key}.columns: {', '.join(map(repr, both))} is the label_column too (a label is no feature: leave it out of columns)")
    return problems


DATA_KEYS = ("data.train", "data.query", "similarity.datasets", "spectrum.datasets")  # what a command may read (`reads`)


def _checked_reads(reads: Any) -> tuple[str, ...] | None:
    """`reads` as a tuple (an iterator is read once), checked to name only DATA_KEYS.

    Raises:
        ValueError: anything else (a string, an unknown key).
    """
    reads = reads if reads is None or isinstance(reads, str) or not isinstance(reads, Iterable) else tuple(reads)
    if reads is not None and (not isinstance(reads, tuple) or not set(reads) <= set(DATA_KEYS)):
        raise ValueError(f"reads: expected a list of {', '.join(DATA_KEYS)} (the data a command reads), got {reads!r}")
    return reads


def reads_data(cfg: Config, key: str, reads: Collection[str] | None) -> bool:
    """Whether a command that reads `reads` (None: every data key) reads the data spec(s) at `key`
    (one of DATA_KEYS, or a dataset under them): spectrum.datasets, when it names none, is data.train."""
    if reads is None:
        return True
    group = next((k for k in DATA_KEYS if key == k or key.startswith(f"{k}.")), key)
    return group in reads or (group == "data.train" and "spectrum.datasets" in reads and not cfg.spectrum.datasets)


def validate(cfg: Config, check_files: bool = True, reads: Collection[str] | None = None) -> list[str]:
    """Value checks beyond types; returns every problem found. With `reads` (DATA_KEYS a command
    reads), only the data it reads must exist: data.train is required, and files checked, only
    where it is read (a dataset-similarity run needs no training set on this machine)."""
    problems: list[str] = []
    if not cfg.model.architecture:
        problems.append("model.architecture: missing (mlp, cnn, torchvision:<name> or package.module:function)")
    if cfg.model.checkpoint is not None and check_files:  # any suffix: the reader tells safetensors from torch.save files
        problems += _named_path_problem(cfg, "model.checkpoint", cfg.model.checkpoint, "file", unset="null")
    if cfg.task.measurement == "margin" and cfg.task.kind != "classification":
        problems.append("task.measurement: margin needs task.kind: classification")
    problems += _measurement_problems(cfg)
    if cfg.task.kind != "classification":
        noisy = [key for key, spec in _specs_by_key(cfg).items() if spec.label_noise > 0]
        problems += [f"{key}.label_noise: flips class labels, which needs task.kind: classification (set it to 0)" for key in noisy]
    if cfg.task.kind != "regression":
        standardized = [key for key, spec in _specs_by_key(cfg).items() if isinstance(spec.transform, TransformSpec) and spec.transform.target_normalize is not None]
        problems += [
            f"{key}.transform.target_normalize: standardizes a regression's targets, which needs task.kind: regression "
            f"(task.kind is {cfg.task.kind}; leave it out)"
            for key in standardized
        ]
    if cfg.task.kind == "language_modeling":
        for key, fisher in (("factors.fisher", cfg.factors.fisher), ("similarity.fisher", cfg.similarity.fisher)):
            if fisher == "ggn":
                problems.append(
                    f"{key}: ggn is not available for task.kind: language_modeling (it needs positions x vocabulary "
                    "backward passes per batch); use sampled or empirical"
                )
    d = cfg.data
    if d.batch_size <= 0:
        problems.append(f"data.batch_size: must be > 0, got {d.batch_size}")
    if not 0 <= d.num_workers <= MAX_WORKERS:
        problems.append(f"data.num_workers: must be in 0..{MAX_WORKERS} (worker processes per rank), got {d.num_workers}")
    if not 0 <= cfg.seed < 2**63:
        problems.append(f"seed: must be in 0..2**63-1, got {cfg.seed}")
    if d.padding_value is not None and not math.isfinite(d.padding_value):
        problems.append(f"data.padding_value: must be a finite number (the pad id or fill value) or null, got {d.padding_value}")
    if d.train is None:
        if reads_data(cfg, "data.train", reads):
            problems.append("data.train: missing (the training set, with a source: key)")
    else:
        problems.extend(_check_data_spec(cfg, d.train, "data.train", check_files and reads_data(cfg, "data.train", reads)))
    if d.query is not None:
        problems.extend(_check_data_spec(cfg, d.query, "data.query", check_files and reads_data(cfg, "data.query", reads)))
    f = cfg.factors
    if not f.modules:
        problems.append("factors.modules: needs at least one pattern (\"*\" tracks every supported layer)")
    if f.max_examples is not None and f.max_examples <= 0:
        problems.append(f"factors.max_examples: must be > 0, got {f.max_examples}")
    if f.checkpoint_every < 0:
        problems.append(f"factors.checkpoint_every: must be >= 0, got {f.checkpoint_every}")
    s = cfg.scores
    if isinstance(s.damping, str):
        if s.damping != "auto":
            problems.append(f"scores.damping: expected auto or a number >= 0, got {s.damping!r}")
    elif not math.isfinite(s.damping) or s.damping < 0:
        problems.append(f"scores.damping: expected auto or a finite number >= 0, got {s.damping}")
    if not math.isfinite(s.damping_factor) or s.damping_factor < 0:
        problems.append(f"scores.damping_factor: must be a finite number >= 0, got {s.damping_factor}")
    if not math.isfinite(s.max_memory_mb) or s.max_memory_mb <= 0:
        problems.append(f"scores.max_memory_mb: must be a finite number > 0, got {s.max_memory_mb}")
    if s.query_chunk is not None and s.query_chunk <= 0:
        problems.append(f"scores.query_chunk: must be > 0, got {s.query_chunk}")
    if s.per_token and (clash := per_token_clashes(s.relative, s.by_layer, s.checkpoints)):
        problems.append(f"scores.per_token: not available with scores.{' or scores.'.join(clash)} (set those to their defaults, or per_token: false)")
    for i, ckpt_path in enumerate(s.checkpoints if check_files else []):
        problems += _named_path_problem(cfg, f"scores.checkpoints[{i}]", ckpt_path, "file")
    seen: dict[str, str] = {} if cfg.model.checkpoint is None else {os.path.realpath(cfg.resolve(cfg.model.checkpoint)): "model.checkpoint"}
    for i, ckpt_path in enumerate(s.checkpoints):
        real = os.path.realpath(cfg.resolve(ckpt_path))
        if real in seen:
            problems.append(f"scores.checkpoints[{i}]: {ckpt_path} is {seen[real]} again (a model listed twice weighs twice in the average)")
        seen.setdefault(real, f"scores.checkpoints[{i}]")
    for name, spec in cfg.similarity.datasets.items():
        problems.extend(_check_data_spec(cfg, spec, f"similarity.datasets.{name}", check_files and reads_data(cfg, "similarity.datasets", reads)))
    problems.extend(_check_spectrum(cfg, check_files and reads_data(cfg, "spectrum.datasets", reads)))
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", dev)):
        problems.append(f"device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    if not cfg.output_dir:
        problems.append("output_dir: must not be empty")
    if cfg.factors_dir is not None and not cfg.factors_dir:
        problems.append("factors_dir: must not be empty (null = output_dir)")
    return problems


def _yaml_repr(value: Any) -> str:
    """A default as it would be written in the YAML file (null, false, ekfac, ['*'])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _check_spectrum(cfg: Config, check_files: bool) -> list[str]:
    """Value checks of the spectrum block."""
    sp, problems = cfg.spectrum, []
    if not sp.layers:
        problems.append('spectrum.layers: needs at least one pattern ("*" = every tracked layer)')
    if not 0.0 <= sp.bottom <= 1.0:
        problems.append(f"spectrum.bottom: must be in [0, 1], got {sp.bottom}")
    if not 0.0 <= sp.top <= 1.0:
        problems.append(f"spectrum.top: must be in [0, 1], got {sp.top}")
    if 0.0 <= sp.bottom <= 1.0 and 0.0 <= sp.top <= 1.0 and sp.bottom + sp.top > 1.0:
        problems.append(f"spectrum.bottom + spectrum.top: must be <= 1, got {sp.bottom} + {sp.top}")
    if not 1 <= sp.bins <= 1000:
        problems.append(f"spectrum.bins: must be in [1, 1000], got {sp.bins}")
    names = list(sp.datasets) or ["train"]
    if sp.baseline is not None:
        base, _, group = sp.baseline.partition(":")
        if base not in names or group not in ("", "noisy", "clean"):
            problems.append(f"spectrum.baseline: {sp.baseline!r} is not one of {', '.join(names)} (optionally with :noisy or :clean)")
    for name, spec in sp.datasets.items():
        if ":" in name:
            problems.append(f"spectrum.datasets.{name}: names must not contain ':'")
        problems.extend(_check_data_spec(cfg, spec, f"spectrum.datasets.{name}", check_files))
    e = sp.edit
    if not 0.0 < e.rho <= 1.0:
        problems.append(f"spectrum.edit.rho: must be in (0, 1], got {e.rho}")
    if not 0.0 < e.share <= 1.0:
        problems.append(f"spectrum.edit.share: must be in (0, 1], got {e.share}")
    if e.layers is not None and not e.layers:
        problems.append("spectrum.edit.layers: needs at least one pattern, or null for spectrum.layers")
    return problems


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every documented key, for docs/CONFIG.md (docs/gen_config_docs.py)."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        target = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        child_prefix = key + "."
        if typing.get_origin(tp) is dict:
            child_prefix = key + ".<name>."  # a mapping of user-chosen names to blocks
        if f.default is not dataclasses.MISSING:
            default = _yaml_repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = f.default_factory()  # type: ignore[misc]
            default = "" if dataclasses.is_dataclass(made) else _yaml_repr(made)
        else:
            default = ""
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
        if target is not None and target is not Config:
            rows.extend(field_docs(target, child_prefix))
    return rows
