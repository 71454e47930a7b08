"""Reading scores of any size: metadata, block-by-block streaming over shards, top-k rankings.

Nothing here loads the whole score matrix: `iter_score_blocks` reads the rows of
the selected queries one column block at a time (safetensors slices), and
`top_k` keeps only the k best candidates per query, merging blocks and shards as
it goes. Ties are broken by train position (lower first), so sharded and
unsharded runs of the same scores rank identically.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from influence_cli import notices, storage
from influence_cli.config import Config, yaml_text
from influence_cli.data import IndexedDataset
from influence_cli.errors import OutputError, UsageError, shortened
from influence_cli.reprs import brief_repr
from influence_cli.resume import progress_files

_BLOCK_ELEMENTS = 1 << 22  # scores read at once (16 MiB in float32; the ranking holds a few copies of a block)
_NO_SCORES_HINT = "run `influence compute-scores CONFIG` first (with the same output_dir)"


@dataclass
class ScoreFile:
    """One file of a scores run and the train positions [train_start, train_stop) it holds."""

    path: Path
    train_start: int
    train_stop: int


@dataclass
class ScoresMeta:
    """What a scores run holds, without its score matrix.

    Attributes:
        files: The single scores file, or the shards in train order.
        metadata: Decoded metadata (strategy, damping, measurement, relative, fingerprints, config, ...).
        query_indices: [n_query] global indices of the queries.
        query_labels: [n_query, ...] labels, or None.
        query_predictions: [n_query] arg-max predictions (classification) or [n_query, K] outputs, or None.
        has_norms: The files hold `train_norms` (relative runs), so plain scores can be recovered.
        by_layer: The layers, in order, whose parts of every score the files hold too
            (`scores_by_layer`, compute-scores --by-layer); None when they hold none.
        queries_summed: Scores summed over the queries of data.query (compute-scores --sum-queries): their
            number, the scores' one row their sum (n_query is 1; no query labels or predictions); None otherwise.
        per_token: T, when the files hold each training position's part of every score too
            (`scores_per_token` [n_query, train range, T], compute-scores --per-token); None otherwise.
    """

    __repr__ = brief_repr

    output_dir: Path
    files: list[ScoreFile]
    n_query: int
    n_train: int
    relative: bool
    metadata: dict[str, Any] = field(repr=False)  # the whole config and fingerprints: kept out of the repr
    query_indices: torch.Tensor
    query_labels: torch.Tensor | None
    query_predictions: torch.Tensor | None
    has_norms: bool = False
    by_layer: list[str] | None = None
    queries_summed: int | None = None
    per_token: int | None = None

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1 or self.files[0].path.name != storage.SCORES_FILE


@dataclass
class ScoreBlock:
    """Scores of the selected queries against train positions [train_start, train_stop).

    Attributes:
        scores: float32 [n_selected, train_stop - train_start].
        train_indices: int64 [train_stop - train_start] global indices.
        train_labels: [train_stop - train_start, ...] or None.
    """

    __repr__ = brief_repr

    train_start: int
    train_stop: int
    scores: torch.Tensor
    train_indices: torch.Tensor
    train_labels: torch.Tensor | None


@dataclass
class RankedExample:
    """One training example in a ranking (score: its influence on the query, or its self-influence).

    `by_layer`: {layer: its part of the score}, in the layers' order, summing to the score, when
    the scores hold their parts (compute-scores --by-layer); None otherwise. `per_token`: each of the
    example's T positions' part of the score (compute-scores --per-token; padding 0), summing to it; None otherwise. `loss`: in a
    self-influence ranking, the example's training loss (`SelfInfluence.train_losses`); None in
    pairwise rankings and for self-influence files written before it was stored.
    """

    rank: int
    train_index: int
    train_position: int
    train_label: Any
    score: float
    by_layer: dict[str, float] | None = None
    loss: float | None = None
    per_token: list[float] | None = None


@dataclass
class QueryRanking:
    """The top proponents (largest scores) and opponents (smallest) of one query, or of the one row of scores
    summed over every query (compute-scores --sum-queries: `query_index`, label and prediction None)."""

    query_position: int
    query_index: int | None
    query_label: Any
    query_prediction: Any
    proponents: list[RankedExample] = field(default_factory=list)
    opponents: list[RankedExample] = field(default_factory=list)


def _plain(value: torch.Tensor | None) -> Any:
    """A label or prediction as plain Python (int, float or list) for tables and JSON."""
    return None if value is None else value.tolist()


def _folder_of(path: str | Path, caller: str, *names: str) -> Path:
    """The output folder `path` names, or holds when it is one of the files `names` (Python callers
    pass either).

    Raises:
        TypeError: `path` is no path (a Config: its output_path is the folder), naming `caller`.
        OutputError: the folder cannot be read (permission denied); with `names`, `path` is another file (or lies
            under one): refused as that, not as a folder without the scores.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}() takes the output folder (cfg.output_path) or a file in it, not {type(path).__name__}")
    p = Path(path)
    folder = p.parent if p.name in names and os.path.isfile(p) else p
    if names:  # the reader of the files: a caller without names passes the path on to one
        storage.refuse_file_as_folder(folder, "output_dir", "set output_dir to the folder compute-scores wrote the scores into")
    storage.check_readable_dir(folder, listed=False)  # its files are read by name
    return folder


def load_scores_meta(output_dir: str | Path) -> ScoresMeta:
    """Reads the index (or the single scores file) and the query tensors of a scores run
    (`output_dir`, or the path of its scores file or index).

    Raises:
        OutputError: no scores in `output_dir`, or a listed shard is missing or of another format.
    """
    out = _folder_of(output_dir, "load_scores_meta", storage.SCORES_INDEX, storage.SCORES_FILE)
    index, single = out / storage.SCORES_INDEX, out / storage.SCORES_FILE
    if index.is_file():
        data = storage.load_json(index, "scores index", "rerun compute-scores with --overwrite")
        found = data.get(storage.FORMAT_KEY) if isinstance(data, dict) else None
        if found is not None and found != storage.SCORES_FORMAT:  # another version's index: named so before its fields are read as this one's
            raise storage.format_mismatch(index, found, storage.SCORES_FORMAT, hint="rerun compute-scores with --overwrite")
        try:
            files = [ScoreFile(out / s["file"], int(s["train_start"]), int(s["train_stop"])) for s in data["shards"]]
            n_query, n_train, metadata = int(data["n_query"]), int(data["n_train"]), dict(data["metadata"])
            if (gap := index_gap(files, n_train)) is not None:
                raise ValueError(gap)
        except (ValueError, KeyError, TypeError) as exc:
            raise OutputError(f"{str(index)!r} is not a readable scores index ({exc})", hint="rerun compute-scores with --overwrite") from None
        if found != storage.SCORES_FORMAT:  # an index without its format (one of another version is refused above)
            raise storage.format_mismatch(index, found, storage.SCORES_FORMAT, hint="rerun compute-scores with --overwrite")
        storage.check_shards_present(index, [f.path for f in files])
    elif single.is_file():
        metadata = storage.read_metadata(single)
        if metadata.get(storage.FORMAT_KEY) != storage.SCORES_FORMAT:
            raise storage.format_mismatch(single, metadata.get(storage.FORMAT_KEY), storage.SCORES_FORMAT, hint="rerun compute-scores with --overwrite")
        with _open_scores(single, ("scores", "train_indices")) as fh:
            n_query, n_train = fh.get_slice("scores").get_shape()
        files = [ScoreFile(single, 0, n_train)]
    else:
        finished_shards = list(out.glob(storage.SCORES_SHARD_GLOB))  # of a run killed before it wrote its index
        interrupted = bool(progress_files(out, storage.SCORES_PARTIAL) or finished_shards)  # not --self's progress
        hint = "compute-scores was interrupted: rerun it with --resume to finish" if interrupted else _NO_SCORES_HINT
        running = storage.writer_of(out, "scores")
        hint = f"compute-scores is writing them now ({running}): wait for it to finish" if running else hint
        raise OutputError(f"no scores in {str(out)!r} ({storage.SCORES_FILE} or {storage.SCORES_INDEX})", hint=hint)
    with _open_scores(files[0].path, ()) as fh:
        keys = set(fh.keys())
        shape = list(fh.get_slice("scores").get_shape()) if "scores" in keys else None
        if index.is_file() and shape is not None and shape != [n_query, files[0].train_stop - files[0].train_start]:
            raise OutputError(
                f"{str(index)!r} is not a readable scores index (it lists {n_query} queries and training positions "
                f"{files[0].train_start}..{files[0].train_stop} for {files[0].path.name}, which holds scores of shape {shape})",
                hint="rerun compute-scores with --overwrite",
            )

        def get(key: str) -> torch.Tensor | None:
            return fh.get_tensor(key) if key in keys else None

        query_indices = get("query_indices")
        labels, preds = get("query_labels"), get("query_predictions")
    if query_indices is None:
        query_indices = torch.arange(n_query)
    summed = metadata.get("queries_summed") if metadata.get("sum_queries") else None
    return ScoresMeta(
        out, files, int(n_query), int(n_train), bool(metadata.get("relative", False)), metadata, query_indices, labels, preds,
        has_norms="train_norms" in keys, by_layer=_layer_names(files[0].path, metadata, keys, storage.SCORES_BY_LAYER),
        queries_summed=None if summed is None else int(summed),
        per_token=_token_count(files[0].path, metadata, keys),
    )


def _token_count(path: Path, metadata: dict[str, Any], keys: set[str]) -> int | None:
    """T of the per-token parts a scores file holds (the metadata's `per_token`); None when it holds none.

    Raises:
        OutputError: the parts without their T (written by something else).
    """
    if storage.SCORES_PER_TOKEN not in keys:
        return None
    t = metadata.get(storage.PER_TOKEN)
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise OutputError(f"{str(path)!r} holds {storage.SCORES_PER_TOKEN} without its number of positions, which compute-scores always writes", hint=storage.remake_hint(path))
    return t


def index_gap(files: list[ScoreFile], n_train: int) -> str | None:
    """What is wrong with a scores index's shards (`files`, in order) as a cover of the training positions
    [0, n_train), each after the one before it; None when they cover them."""
    if n_train < 0 or not files:
        return f"{n_train} training examples in {len(files)} shards"
    stop = 0
    for f in files:
        if f.train_start != stop or f.train_stop < f.train_start:
            return f"{f.path.name} holds training positions {f.train_start}..{f.train_stop}, not from {stop} on"
        stop = f.train_stop
    return None if stop == n_train else f"the shards hold {stop} training positions, not {n_train}"


def _layer_names(path: Path, metadata: dict[str, Any], keys: set[str], tensor: str) -> list[str] | None:
    """The layers of the per-layer parts a scores file holds (`tensor`, named in order by the metadata's
    `by_layer`); None when it holds none.

    Raises:
        OutputError: the parts without their layers' names (written by something else).
    """
    if tensor not in keys:
        return None
    names = metadata.get(storage.BY_LAYER)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise OutputError(f"{str(path)!r} holds {tensor} without the names of its layers, which compute-scores always writes", hint=storage.remake_hint(path))
    return names


def check_scores_match(metadata: dict[str, Any], cfg: Config, path: Path, *, pairwise: bool = True) -> dict[str, IndexedDataset]:
    """Refuses scores that the config does not describe.

    Compares what compute-scores recorded with the config: task kind, strategy, Fisher kind,
    damping (with `auto`, its factor and scope), (pairwise) measurement, padding value and the
    number of ensemble models, then
    the model (fingerprint of the checkpoint's weights), the tracked layers, the factors now in
    factors_dir / output_dir (each model's: refitted factors, e.g. with another seed, make the scores stale),
    data.train and (pairwise) data.query (dataset fingerprints). `relative` is not compared: `compute-scores --relative` may override
    the config, and the rankings say which they are. Scores of an older tool version that lack a
    field are not refused for it.

    Returns:
        The datasets it loaded to compare, by config key ("data.train", "data.query"), for reuse.

    Raises:
        OutputError: naming the first setting that differs.
    """
    from influence_cli.data import load_dataset
    from influence_cli.data.dataset import data_change
    from influence_cli.models import definition_change, load_model, model_definition, model_fingerprint, takes_token_ids
    from influence_cli.tracking import find_tracked_modules

    command = "compute-scores" if pairwise else "compute-scores --self"
    hint = f"use the config (and --set overrides) of {command}, or rerun {command} with --overwrite"
    settings = [("task.kind", "task_kind", cfg.task.kind),
                ("factors.strategy", "strategy", cfg.factors.strategy), ("factors.fisher", "fisher", cfg.factors.fisher),
                ("scores.damping", "damping_setting", cfg.scores.damping)]  # fmt: skip
    if pairwise:
        settings.append(("task.measurement", "measurement", cfg.task.measurement))
    if cfg.scores.damping == "auto":
        settings += [("scores.damping_factor", "damping_factor", cfg.scores.damping_factor), ("scores.damping_scope", "damping_scope", cfg.scores.damping_scope)]
    recorded_models = len(metadata.get("members") or [None])  # an ensemble lists every model it averaged
    if "model_fingerprint" in metadata and recorded_models != 1 + len(cfg.scores.checkpoints):
        raise OutputError(
            f"{str(path)!r} holds scores averaged over {recorded_models} model(s); the config names {1 + len(cfg.scores.checkpoints)} "
            "(model.checkpoint and scores.checkpoints)",
            hint=hint,
        )
    checks = [(key, metadata.get(field_name), value) for key, field_name, value in settings]  # (key, recorded, the config's)
    recorded_config = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    if recorded_config:  # settings of the factors and of the stored scores, as compute-scores compares them
        fit, scores = recorded_config.get("factors") or {}, recorded_config.get("scores") or {}
        checks.append(("factors.amp", fit.get("amp"), cfg.factors.amp))
        if pairwise:  # self-influence is stored as computed (float32; float64 for a float64 model), not in scores.dtype
            checks.append(("scores.dtype", scores.get("dtype"), cfg.scores.dtype))
        if cfg.factors.fisher == "sampled":
            checks.append(("seed", recorded_config.get("seed"), cfg.seed))
        n_train = metadata.get("n_train")
        if isinstance(n_train, int) and "max_examples" in fit:  # the examples each pass of fit-factors saw
            checks.append(("factors.max_examples", _fit_examples(fit["max_examples"], n_train), _fit_examples(cfg.factors.max_examples, n_train)))
    for key, recorded, value in checks:
        if recorded is not None and recorded != value:
            raise OutputError(f"{str(path)!r} holds scores computed with {key}={yaml_text(recorded)}; the config has {yaml_text(value)}", hint=hint)
    if "padding_value" in metadata and metadata["padding_value"] != cfg.data.padding_value:
        recorded, value = (yaml_text(v) for v in (metadata["padding_value"], cfg.data.padding_value))
        raise OutputError(f"{str(path)!r} holds scores computed with data.padding_value={recorded}; the config has {value}", hint=hint)
    recorded = metadata.get("model_fingerprint")
    embedding_model: bool | None = None  # whether the model takes token ids: how integer inputs are read
    if recorded is not None:
        model = load_model(cfg.model, cfg.base_dir)
        current, embedding_model = model_fingerprint(model), takes_token_ids(model)
        if recorded != current:
            raise OutputError(f"{str(path)!r} holds scores of another model (fingerprint {recorded}; model.checkpoint's is {current})", hint=hint)
        recorded_definition, definition = metadata.get("model_definition"), model_definition(cfg.model, model)
        if recorded_definition is not None and recorded_definition != definition:
            change = definition_change(recorded_definition, definition)
            raise OutputError(f"{str(path)!r} holds scores of another model definition ({change})", hint=hint)
        names = [tm.name for tm in find_tracked_modules(model, cfg.factors.modules, trainable_only=cfg.factors.trainable_only)]
        if metadata.get("modules") is not None and metadata["modules"] != names:
            raise OutputError(f"{str(path)!r} holds scores of layers {metadata['modules']}; the config tracks {names}", hint=hint)
        _check_members(metadata.get("members"), cfg, path, hint)
    _check_current_factors(metadata, cfg, path, command)
    specs = [("data.train", cfg.data.train, "train")] + ([("data.query", cfg.data.query, "query")] if pairwise else [])
    loaded = {}
    for key, spec, side in specs:
        recorded = metadata.get(f"{side}_fingerprint")
        if recorded is None or spec is None:
            continue
        if embedding_model is None:
            embedding_model = takes_token_ids(load_model(cfg.model, cfg.base_dir))
        loaded[key] = load_dataset(spec, cfg.base_dir, name=key, seed=cfg.seed, embedding_model=embedding_model)
        if recorded != loaded[key].fingerprint():
            change = data_change(metadata.get(f"{side}_parts"), loaded[key])
            raise OutputError(f"{str(path)!r} holds scores computed on another {key}{storage.other_version(metadata)}{change}", hint=hint)
    return loaded


def _check_members(members: Any, cfg: Any, path: Path, hint: str) -> None:
    """Refuses an ensemble's scores when a model of scores.checkpoints is not the one averaged there (replaced,
    reordered or another file); their number is checked before."""
    from influence_cli.ensemble import checkpoint_stat
    from influence_cli.models import load_model, model_fingerprint

    if not isinstance(members, list):
        return
    for i, (recorded, checkpoint) in enumerate(zip(members[1:], cfg.scores.checkpoints, strict=False)):
        fingerprint = recorded.get("model_fingerprint") if isinstance(recorded, dict) else None
        if fingerprint is None:
            continue
        weights = cfg.resolve(checkpoint)
        if recorded.get("checkpoint") == str(weights) and recorded.get("checkpoint_stat") == checkpoint_stat(weights) is not None:
            continue  # the very file, untouched since: no need to hash its weights again
        key = f"scores.checkpoints[{i}]"
        current = model_fingerprint(load_model(cfg.model, cfg.base_dir, weights, key=key))
        if current != fingerprint:
            raise OutputError(
                f"{str(path)!r} holds scores averaged over another model as {key} (fingerprint {fingerprint}; {checkpoint}'s is {current})",
                hint=hint,
            )


def _fit_examples(max_examples: int | None, n_train: int) -> int:
    return n_train if max_examples is None else min(max_examples, n_train)


def _check_current_factors(metadata: dict[str, Any], cfg: Config, path: Path, command: str) -> None:
    """The scores were computed from the factors now in their folder (each ensemble model's), judged by
    the factors' result key (model, data, strategy, Fisher, task, layers, examples, seed, amp, padding):
    refused when it differs; when only the factors' `created` differs (refitted since with the same
    settings, as `compute-scores --resume` sees it too) a warning says the scores are theirs up to float
    rounding. `command` recomputes them ("compute-scores --self" for self-influence)."""
    from influence_cli.ensemble import ensemble_members
    from influence_cli.fit import warn_of_refit

    storage.refuse_file_as_folder(cfg.factors_path, cfg.factors_key, storage.factors_folder_hint(cfg.factors_key))  # not skipped as no factors
    described = metadata.get("members") or [metadata]
    for member, info in zip(ensemble_members(cfg), described, strict=False):
        factors = (info.get("factors") or {}) if isinstance(info, dict) else {}
        recorded = factors.get("result_key")
        if recorded is None or not member.factors_path.is_file():
            continue
        current = storage.read_metadata(member.factors_path)
        if current.get("result_key") != recorded:
            raise OutputError(
                f"{str(path)!r} holds scores of other factors than {str(member.factors_path)!r} (refitted since, with other settings)",
                hint=f"rerun {command} with --overwrite on the current factors",
            )
        warn_of_refit(path, "scores", member.factors_path, factors.get("created"), current.get("created"), command)


def check_summed_selection(meta: ScoresMeta, queries: slice | int | Sequence[int | slice] | None) -> None:
    """Scores summed over the queries (`meta.queries_summed`) have one row: a selection other than all of them
    (None) or row 0 is refused, naming --query.

    Raises:
        UsageError: naming --query, the number of queries summed and what to pass.
    """
    items = _selection_items(queries)  # None: [None]
    whole = all(
        item is None or (_is_position(item) and item == 0)
        or (isinstance(item, slice) and item.start in (None, 0) and item.stop in (None, 1) and item.step in (None, 1))
        for item in items
    )
    if not whole:
        raise UsageError(
            f"--query: the scores in {str(meta.output_dir)!r} are the {meta.queries_summed} queries of data.query summed into one row "
            "(compute-scores --sum-queries): pass --query 0 or no --query (without --sum-queries, each query has its own row)"
        )


def select_queries(
    n_query: int, queries: slice | int | Sequence[int | slice] | None, query_indices: torch.Tensor | None = None
) -> list[int]:
    """Query positions (rows of the scores) from an int, a slice, a list of both, or None (all).

    Slices are clipped to the queries like Python's (`15:99` of 20 is 15..19, with a warning); a position outside
    them is an error, which names the position of a query whose global index was given instead
    (`query_indices`, int64 [n_query]).

    Raises:
        UsageError: naming --query and the valid range.
    """
    if queries is None:
        return list(range(n_query))
    items = _selection_items(queries)
    for item in items:  # True would read as row 1 and 0.5 as row 0
        if not (isinstance(item, slice) or _is_position(item)):
            raise TypeError(f"queries: expected an int, a slice or a list of them (slice(0, 3) for 0:3), not {item!r}")
    out: list[int] = []
    valid = f"valid: 0..{n_query - 1}" if n_query else "there are no queries"
    for item in items:
        if isinstance(item, slice):
            start = 0 if item.start is None else item.start
            stop = n_query if item.stop is None else item.stop
            if start < 0 or stop < 0 or (item.step or 1) <= 0:
                raise UsageError(f"--query {_slice_text(item)}: expected START:STOP with 0 <= START < STOP ({valid})")
            if stop <= start:
                raise UsageError(f"--query {_slice_text(item)}: an empty range (STOP must be larger than START)")
            if start >= n_query:
                raise UsageError(f"--query {_slice_text(item)}: outside the {n_query} queries ({valid}, e.g. --query 0:{min(n_query, 10)})")
            if item.stop is not None and stop > n_query:  # clipped as Python clips, but said: an index may have been meant
                notices.warn(f"--query {_slice_text(item)}: the scores hold {n_query} queries; ranking {start}:{n_query}")
            out.extend(range(start, min(stop, n_query), item.step or 1))
        else:
            q = int(item)
            if not 0 <= q < n_query:
                hint = None
                if query_indices is not None and -(2**63) <= q < 2**63 and bool((query_indices == q).any()):  # an int64 index
                    hint = f"--query takes positions (rows of the scores), not dataset indices: index {q} is at position {int((query_indices == q).nonzero()[0])}"
                raise UsageError(f"--query {shortened(q, quote=False)}: outside the {n_query} queries ({valid})", hint=hint)
            out.append(q)
    return list(dict.fromkeys(out))


def _selection_items(queries: Any) -> list[Any]:
    """The items of a query selection: an int or a slice (or anything that is not a list of them) alone, a list's items."""
    return [queries] if isinstance(queries, slice) or _is_position(queries) else list(queries) if _is_iterable(queries) else [queries]


def _is_iterable(value: Any) -> bool:
    """Items to iterate (a list, a tuple, a generator, a tensor or array of positions), not text."""
    return not isinstance(value, (str, bytes)) and hasattr(value, "__iter__")


def _positions_tensor(positions: Any) -> torch.Tensor:
    """Row positions (any iterable of ints, or an integer array or tensor) as int64 [R].

    Raises:
        TypeError: anything else (floats, bools, text).
    """
    refused = TypeError(f"query_positions: expected a list of ints (rows of the scores), not {positions!r}")
    if hasattr(positions, "dtype") and hasattr(positions, "shape"):  # an array or tensor: checked whole, not per element
        try:
            t = torch.as_tensor(positions)
        except (TypeError, ValueError, RuntimeError):
            raise refused from None
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.ndim != 1:
            raise refused  # a single position (0-d) as a single int is: a list is asked for
        return t.to(torch.int64)
    if not _is_iterable(positions):
        raise refused
    items = list(positions)
    if not all(type(q) is int or _is_position(q) for q in items):
        raise refused
    return torch.tensor([int(q) for q in items], dtype=torch.int64)


def _is_position(item: Any) -> bool:
    """An integer row position: an int (not a bool), a NumPy integer or a one-element integer tensor."""
    if isinstance(item, torch.Tensor):
        return item.numel() == 1 and not item.dtype.is_floating_point and not item.dtype.is_complex and item.dtype != torch.bool
    return isinstance(item, numbers.Integral) and not isinstance(item, bool)


def _slice_text(s: slice) -> str:
    """START:STOP[:STEP] as --query takes it, shortened when it is over-long (`errors.shortened`)."""
    numbers = [s.start, s.stop] + ([s.step] if s.step not in (None, 1) else [])
    try:
        return shortened(":".join("" if v is None else str(v) for v in numbers), quote=False)
    except ValueError:  # a number past Python's limit of digits for text: each shortened alone
        return ":".join("" if v is None else shortened(v, 40, quote=False) for v in numbers)


def _row_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, stop) runs of sorted unique positions."""
    runs: list[tuple[int, int]] = []
    for p in positions.tolist():
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def iter_score_blocks(
    source: str | Path | ScoresMeta,
    query_positions: Sequence[int],
    *,
    plain: bool = False,
    max_elements: int = _BLOCK_ELEMENTS,
) -> Iterator[ScoreBlock]:
    """Scores of the given query rows, streamed in train order one column block at a time.

    Args:
        source: An output_dir or its `load_scores_meta`.
        query_positions: Rows to read (any order; rows come back in this order).
        plain: For a relative run, undo the RelatIF division (scores × train_norms).
        max_elements: Scores per block (bounds the memory).

    Yields:
        ScoreBlock with float32 scores [len(query_positions), block columns].
    """
    meta = source if isinstance(source, ScoresMeta) else load_scores_meta(_folder_of(source, "iter_score_blocks"))
    wanted = _positions_tensor(query_positions)
    outside = wanted[(wanted < 0) | (wanted >= meta.n_query)]
    if outside.numel():
        valid = f"valid: 0..{meta.n_query - 1}" if meta.n_query else "there are no queries"
        raise UsageError(f"query_positions: {int(outside[0])} is outside the {meta.n_query} queries ({valid})")
    unique, inverse = torch.unique(wanted, sorted=True, return_inverse=True)
    in_order = len(unique) == len(wanted) and bool((inverse == torch.arange(len(wanted))).all())  # rows read as asked: no reordering copy
    runs = _row_runs(unique)
    step = max(1, max_elements // max(1, len(unique)))
    if plain and meta.relative and not meta.has_norms:
        raise UsageError(
            f"--plain: the relative scores in {str(meta.files[0].path.parent)!r} keep no norms to undo the division (an ensemble's have one per model)",
            hint="compute-scores --no-relative --set output_dir=<a new folder> --set factors_dir=<this fit's folder> gives the plain scores",
        )
    undo = plain and meta.relative
    for f in meta.files:
        with _open_scores(f.path, ("scores", "train_indices", *(["train_norms"] if undo else []))) as fh:
            keys = set(fh.keys())
            scores = fh.get_slice("scores")
            width = f.train_stop - f.train_start
            for c0 in range(0, width, step):
                c1 = min(width, c0 + step)
                parts = [scores[r0:r1, c0:c1] for r0, r1 in runs]
                block = (parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(0, c1 - c0)).float()
                block = block if in_order else block[inverse]
                if undo:
                    block = block * fh.get_slice("train_norms")[c0:c1].float()
                _check_no_nan(block, f.path)
                labels = fh.get_slice("train_labels")[c0:c1] if "train_labels" in keys else None
                yield ScoreBlock(f.train_start + c0, f.train_start + c1, block, fh.get_slice("train_indices")[c0:c1], labels)


def _open_scores(path: Path, required: Sequence[str]) -> Any:
    """A scores file opened for slicing (safetensors' safe_open), checked to hold the tensors `required`.

    Raises:
        OutputError: the file is gone, unreadable, or lacks one of them (written by something else).
    """
    try:
        fh = storage.open_safetensors(path)
        keys = set(fh.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError and others
        raise storage.unreadable(path, exc, "scores file") from None
    _check_holds(path, keys, required, "compute-scores")
    return fh


def _check_holds(path: Path, keys: set[str], required: Sequence[str], writer: str) -> None:
    """Refuses a file (`keys`: its tensors) without every tensor `required`, which `writer` always writes.

    Raises:
        OutputError: naming the missing tensors (the file was written by something else).
    """
    missing = [k for k in required if k not in keys]
    if missing:
        raise OutputError(f"{str(path)!r} holds no {', '.join(missing)}, which {writer} always writes", hint=storage.remake_hint(path))


def _check_no_nan(values: torch.Tensor, path: Path) -> None:
    """compute-scores never writes NaN: a file holding some was written by something else, and would rank nothing.

    Raises:
        OutputError: naming the file.
    """
    if values.numel() and bool(torch.aminmax(values).max.isnan()):  # NaN propagates (one pass, no [R, M] mask as isnan().any() makes)
        raise OutputError(f"{str(path)!r} holds NaN scores, which compute-scores never writes", hint=storage.remake_hint(path))


def _best(values: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best per row by (value descending, position ascending), sorted that way.

    Args:
        values: [R, M] scores; positions: [R, M] int64 train positions, ascending along each row.
    """
    m = values.shape[1]
    k = min(k, m)
    if m > 4 * k:
        columns = _first_k(values, values.topk(k, dim=1).values[:, -1:], k)
        values, positions = values.gather(1, columns), positions.gather(1, columns)
    order = _order(values, positions)[:, :k]
    return values.gather(1, order), positions.gather(1, order)


def _first_k(values: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] columns, ascending, of each row's values above its k-th best `kth` [R, 1], then of the first ones equal to it."""
    better = values > kth
    tie = values == kth
    tie &= tie.cumsum(1) <= k - better.sum(1, keepdim=True)  # as many as places are left
    return (better | tie).nonzero()[:, 1].view(-1, k)


def _order(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R, M] column order of each row by (value descending, position ascending): a full sort, for a few candidates per row."""
    order = positions.argsort(dim=1, stable=True)
    return order.gather(1, values.gather(1, order).argsort(dim=1, descending=True, stable=True))


def _block_best(scores: torch.Tensor, k: int, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of a block (scores × `sign`: 1 the largest, -1 the smallest), ties by column (lower first).

    One `topk` of k + 1 per row decides most rows: where the (k+1)-th value differs from the k-th,
    the k kept are exactly the values at least the k-th, whichever tied ones `topk` happened to take
    among them. Rows where they are equal (more ties than places) keep the values beyond the k-th
    and the first of the tied ones by column (`_first_k`), as `_best` does.

    Args:
        scores: [R, M] float scores, no NaN (`iter_score_blocks` refuses them).

    Returns:
        values [R, min(k, M)] (scores × `sign`) and their int64 columns, sorted by (value descending, column ascending).
    """
    rows, m = scores.shape
    k = min(k, m)
    columns = torch.arange(m).expand(rows, m)
    if k == m:  # every column is kept
        return _best(scores * sign, columns, k)
    top = scores.topk(k + 1, dim=1, largest=sign == 1)
    values, kept = top.values[:, :k] * sign, top.indices[:, :k]
    tied = (top.values[:, k] == top.values[:, k - 1]).nonzero().squeeze(1)
    if tied.numel():
        sub = scores[tied] * sign
        kept[tied] = _first_k(sub, values[tied, -1:], k)
        values[tied] = sub.gather(1, kept[tied])
    order = _order(values, kept)
    return values.gather(1, order), kept.gather(1, order)


def _join_labels(first: torch.Tensor | None, second: torch.Tensor | None, n_first: int, n_second: int) -> torch.Tensor:
    """Labels [R, n_first, ...] and [R, n_second, ...] side by side, zeros standing for the side without any (never both)."""
    like = first if first is not None else second
    assert like is not None
    parts = [t if t is not None else torch.zeros(like.shape[0], n, *like.shape[2:], dtype=like.dtype) for t, n in ((first, n_first), (second, n_second))]
    return torch.cat(parts, 1)


class _Running:
    """The k best (value, train position) per row seen so far, with the global indices and labels of those
    positions: tensors of k per row, merged with each block's k best, whatever the number of blocks."""

    def __init__(self, rows: int, k: int, sign: float) -> None:
        self.k, self.sign = k, sign
        self.values = torch.empty(rows, 0)
        self.positions = torch.empty(rows, 0, dtype=torch.int64)
        self.indices = torch.empty(rows, 0, dtype=torch.int64)  # global index of each kept position
        self.labels: torch.Tensor | None = None  # [rows, kept, ...] label of each kept position, where the files hold labels
        self.labelled = torch.empty(rows, 0, dtype=torch.bool)  # which kept positions have one (shards without labels have none)

    def update(self, block: ScoreBlock) -> None:
        v, columns = _block_best(block.scores, self.k, self.sign)
        rows, kept = columns.shape
        labels = None if block.train_labels is None else block.train_labels[columns]
        values, positions = torch.cat([self.values, v], 1), torch.cat([self.positions, columns + block.train_start], 1)
        indices = torch.cat([self.indices, block.train_indices[columns]], 1)
        labelled = torch.cat([self.labelled, torch.full((rows, kept), labels is not None)], 1)
        if labels is not None or self.labels is not None:
            labels = _join_labels(self.labels, labels, self.values.shape[1], kept)
        order = _order(values, positions)[:, : self.k]
        self.values, self.positions, self.indices, self.labelled = (t.gather(1, order) for t in (values, positions, indices, labelled))
        self.labels = None if labels is None else labels[torch.arange(rows)[:, None], order]

    def ranked(self, row: int) -> list[RankedExample]:
        """The row's ranking, cut where the sign turns: a proponent has a positive score, an opponent a negative one."""
        out = []
        indices, labelled = self.indices[row].tolist(), self.labelled[row].tolist()
        for r, (v, q) in enumerate(zip(self.values[row].tolist(), self.positions[row].tolist(), strict=True), start=1):
            if not v > 0:  # values are sorted descending (times the sign); NaN never reaches here (_check_no_nan)
                break
            label = _plain(self.labels[row, r - 1]) if self.labels is not None and labelled[r - 1] else None
            out.append(RankedExample(r, indices[r - 1], q, label, v * self.sign))
        return out


def _check_k(k: int) -> None:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool):
        raise TypeError(f"k: expected an int, not {k!r}")
    if k <= 0:
        raise UsageError(f"--k {k}: must be at least 1")


def top_k(
    output_dir: str | Path,
    queries: slice | int | Sequence[int | slice] | None = None,
    k: int = 5,
    *,
    largest: bool = True,
    smallest: bool = True,
    plain: bool = False,
    max_elements: int = _BLOCK_ELEMENTS,
) -> list[QueryRanking]:
    """The k largest (proponents) and k smallest (opponents) scores of each selected query.

    Proponents are positive scores and opponents negative ones, so either list may be shorter
    than k (a training set of 5 examples has no 4 proponents and 4 opponents).

    Memory: a few copies of one block of `max_elements` scores plus 2k candidates per query, whatever n_train.

    Args:
        queries: Query positions (rows): an int, a slice, a list of them, or None for all.
        largest, smallest: Compute proponents / opponents.
        plain: For a relative run, rank by the plain influence instead (scores × train_norms).

    Raises:
        OutputError: no scores in `output_dir` (run compute-scores first).
        UsageError: a query position outside the run's queries (names --query).
    """
    _check_k(k)
    _folder_of(output_dir, "top_k")  # the caller named in a TypeError
    meta = load_scores_meta(output_dir)
    if meta.queries_summed is not None:
        check_summed_selection(meta, queries)
        queries = None  # its one row
    rows = select_queries(meta.n_query, queries, meta.query_indices)
    best = _Running(len(rows), k, 1.0) if largest else None
    worst = _Running(len(rows), k, -1.0) if smallest else None
    for block in iter_score_blocks(meta, rows, plain=plain, max_elements=max_elements):
        for running in (best, worst):
            if running is not None:
                running.update(block)
    out = []
    for i, q in enumerate(rows):
        out.append(
            QueryRanking(
                q,
                None if meta.queries_summed is not None else int(meta.query_indices[q]),
                None if meta.query_labels is None else _plain(meta.query_labels[q]),
                None if meta.query_predictions is None else _plain(meta.query_predictions[q]),
                best.ranked(i) if best is not None else [],
                worst.ranked(i) if worst is not None else [],
            )
        )
    ranked = [e for r in out for e in (*r.proponents, *r.opponents)]
    pairs = [(r.query_position, e.train_position) for r in out for e in (*r.proponents, *r.opponents)]
    if meta.by_layer is not None:
        for e, parts in zip(ranked, pair_parts(meta, pairs, plain=plain), strict=True):
            e.by_layer = parts
    if meta.per_token is not None:
        for e, values in zip(ranked, pair_tokens(meta, pairs), strict=True):
            e.per_token = values
    return out


def _pair_positions(meta: ScoresMeta, pairs: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and train positions of (query position, train position) pairs, as int64 tensors [pairs] each.

    Raises:
        UsageError: a query position outside the run's queries.
    """
    asked = torch.tensor([(int(q), int(t)) for q, t in pairs], dtype=torch.int64).view(-1, 2)
    queries, trains = asked[:, 0], asked[:, 1]
    outside = queries[(queries < 0) | (queries >= meta.n_query)]
    if outside.numel():
        valid = f"valid: 0..{meta.n_query - 1}" if meta.n_query else "there are no queries"
        raise UsageError(f"pairs: query position {int(outside[0])} is outside the {meta.n_query} queries ({valid})")
    return queries, trains


def pair_tokens(meta: ScoresMeta, pairs: Sequence[tuple[int, int]]) -> list[list[float]]:
    """Each (query position, train position) pair's per-position parts [T] (float32 values as floats), from
    scores that hold them (`meta.per_token`): each file's pairs by one indexed read of its memory-mapped
    [n_query, train range, T] parts (only the pages holding them are read). A pair in no file gets [].

    Raises:
        UsageError: the scores hold no per-token parts (compute-scores --per-token stores them), or a query
            position outside the run's queries.
        OutputError: a file's parts are not of the shape its metadata and queries say.
    """
    t = meta.per_token
    if t is None:
        raise UsageError(f"the scores in {str(meta.output_dir)!r} hold no per-token parts", hint="rerun compute-scores with --per-token and --overwrite")
    out: list[list[float]] = [[] for _ in pairs]
    queries, trains = _pair_positions(meta, pairs)
    for f in meta.files:
        mine = ((trains >= f.train_start) & (trains < f.train_stop)).nonzero().squeeze(1)
        if not mine.numel():
            continue
        with _open_scores(f.path, (storage.SCORES_PER_TOKEN,)) as fh:
            parts = fh.get_tensor(storage.SCORES_PER_TOKEN)
            width = f.train_stop - f.train_start
            if tuple(parts.shape) != (meta.n_query, width, t):
                raise OutputError(
                    f"{str(f.path)!r} holds {storage.SCORES_PER_TOKEN} of shape {list(parts.shape)}, "
                    f"not [{meta.n_query} queries, {width} train examples, {t} positions (its metadata says)]",
                    hint=storage.remake_hint(f.path),
                )
            values = parts[queries[mine], trains[mine] - f.train_start].float()  # [pairs, T]
            for i, row in zip(mine.tolist(), values.tolist(), strict=True):
                out[i] = row
    return out


def pair_parts(meta: ScoresMeta, pairs: Sequence[tuple[int, int]], *, plain: bool = False) -> list[dict[str, float]]:
    """{layer: its part of the score} of each (query position, train position) pair, from scores that
    hold their parts (`meta.by_layer`), read as `iter_score_blocks` reads the scores (float32; `plain`:
    a relative run's parts times the example's norm). A few numbers per pair: the rankings' pairs only.

    Each file's pairs are read together, in the file's order, by one indexed read of the memory-mapped
    [L, n_query, train range] parts per `_BLOCK_ELEMENTS` numbers: only the pages holding them are read.
    A pair whose train position is in no file gets {}.

    Raises:
        UsageError: the scores hold no per-layer parts (compute-scores --by-layer stores them), or a
            query position outside the run's queries.
        OutputError: a file's parts are not of the shape its metadata and queries say.
    """
    names = meta.by_layer
    if names is None:
        raise UsageError(
            f"the scores in {str(meta.output_dir)!r} hold no per-layer parts", hint="rerun compute-scores with --by-layer (scores.by_layer: true) and --overwrite"
        )
    out: list[dict[str, float]] = [{} for _ in pairs]
    queries, trains = _pair_positions(meta, pairs)
    undo = plain and meta.relative
    step = max(1, _BLOCK_ELEMENTS // max(1, len(names)))  # pairs per read: [L, step] numbers
    for f in meta.files:
        mine = ((trains >= f.train_start) & (trains < f.train_stop)).nonzero().squeeze(1)
        if not mine.numel():
            continue
        with _open_scores(f.path, (storage.SCORES_BY_LAYER, *(["train_norms"] if undo else []))) as fh:
            parts = fh.get_tensor(storage.SCORES_BY_LAYER)  # a view of the file's memory map, not read yet
            width = f.train_stop - f.train_start
            if tuple(parts.shape) != (len(names), meta.n_query, width):
                raise OutputError(
                    f"{str(f.path)!r} holds {storage.SCORES_BY_LAYER} of shape {list(parts.shape)}, "
                    f"not [{len(names)} layers (its metadata names them), {meta.n_query} queries, {width} train examples]",
                    hint=storage.remake_hint(f.path),
                )
            norms = fh.get_tensor("train_norms") if undo else None
            rows, columns = queries[mine], trains[mine] - f.train_start
            order = (rows * width + columns).argsort()  # the file's order: each layer's pages read front to back
            for s0 in range(0, len(order), step):
                chosen = order[s0 : s0 + step]
                values = parts[:, rows[chosen], columns[chosen]].float()  # [L, pairs]
                if undo:
                    values = values * norms[columns[chosen]].float()
                for i, row in zip(mine[chosen].tolist(), values.T.tolist(), strict=True):
                    out[i] = dict(zip(names, row, strict=True))
    return out


@dataclass
class SelfInfluence:
    """A self-influence file: values [n_train] and what produced them."""

    __repr__ = brief_repr

    values: torch.Tensor
    train_indices: torch.Tensor
    train_labels: torch.Tensor | None
    metadata: dict[str, Any] = field(repr=False)  # the whole config and fingerprints: kept out of the repr
    train_predictions: torch.Tensor | None = None  # [n_train] model.checkpoint's predicted classes (classification)
    by_layer: torch.Tensor | None = None  # [L, n_train] each layer's part (compute-scores --self --by-layer), summing to values
    layers: list[str] | None = None  # the layers of `by_layer`, in order
    train_losses: torch.Tensor | None = None  # [n_train] each example's training loss at its label (None: a file of an earlier version)
    path: Path | None = None  # the file read


def load_self_influence(output_dir: str | Path) -> SelfInfluence:
    """Reads `<output_dir>/self_influence.safetensors` (OutputError if absent: run compute-scores --self);
    the file's own path works too."""
    out = _folder_of(output_dir, "load_self_influence", storage.SELF_INFLUENCE_FILE)
    path = out / storage.SELF_INFLUENCE_FILE
    if not path.is_file():
        interrupted = progress_files(out, storage.SCORES_PARTIAL, ".self")
        hint = "compute-scores --self was interrupted: rerun it with --resume to finish" if interrupted else "run `influence compute-scores CONFIG --self` first"
        running = storage.writer_of(out, "self_influence")
        hint = f"compute-scores --self is writing them now ({running}): wait for it to finish" if running else hint
        raise OutputError(f"no self-influence scores at {str(path)!r}", hint=hint)
    tensors, meta = storage.load_tensors(path, storage.SELF_FORMAT)
    _check_holds(path, set(tensors), ("self_influence", "train_indices"), "compute-scores --self")
    _check_no_nan(tensors["self_influence"], path)
    layers = _layer_names(path, meta, set(tensors), storage.SELF_BY_LAYER)
    parts = tensors.get(storage.SELF_BY_LAYER)
    if parts is not None and (parts.ndim != 2 or parts.shape != (len(layers or ()), tensors["self_influence"].numel())):
        raise OutputError(f"{str(path)!r} holds {storage.SELF_BY_LAYER} of shape {list(parts.shape)}, not [layers, n_train]", hint=storage.remake_hint(path))
    losses = tensors.get(storage.SELF_LOSSES)
    if losses is not None and losses.shape != tensors["self_influence"].shape:
        raise OutputError(f"{str(path)!r} holds {storage.SELF_LOSSES} of shape {list(losses.shape)}, not [n_train]", hint=storage.remake_hint(path))
    return SelfInfluence(
        tensors["self_influence"], tensors["train_indices"], tensors.get("train_labels"), meta, tensors.get("train_predictions"), parts, layers,
        losses, path,
    )  # fmt: skip


SELF_RANKINGS = ("self-influence", "loss")  # what top-k --self can rank by (--rank-by)


def self_top_k(
    source: str | Path | SelfInfluence, k: int = 5, *, largest: bool = True, rank_by: str = "self-influence"
) -> list[RankedExample]:
    """The k training examples with the largest (largest=False: smallest) self-influence, or with
    rank_by="loss" training loss, ties by position; each carries its self-influence (`score`) and,
    where the file holds it, its training loss (`loss`).

    `source`: an output_dir, or its self-influence already read (`load_self_influence`).

    Raises:
        UsageError: `rank_by` is neither "self-influence" nor "loss".
        OutputError: rank_by="loss" on a file without training losses (written by an earlier version).
    """
    _check_k(k)
    if rank_by not in SELF_RANKINGS:
        raise UsageError(f"--rank-by: {rank_by!r} is not one of {', '.join(SELF_RANKINGS)}")
    si = source if isinstance(source, SelfInfluence) else load_self_influence(_folder_of(source, "self_top_k"))
    ranked = si.values if rank_by == "self-influence" else si.train_losses
    if ranked is None:
        where = repr(str(si.path)) if si.path is not None else "the self-influence scores"
        raise OutputError(
            f"--rank-by loss: {where} holds no {storage.SELF_LOSSES} (written before compute-scores --self stored each example's loss)",
            hint="rerun `influence compute-scores CONFIG --self --overwrite` to store them",
        )
    sign = 1.0 if largest else -1.0
    _, p = _best(ranked.double()[None] * sign, torch.arange(ranked.numel())[None], k)
    return [
        RankedExample(
            r,
            int(si.train_indices[q]),
            q,
            None if si.train_labels is None else _plain(si.train_labels[q]),
            float(si.values[q]),
            None if si.by_layer is None or si.layers is None else dict(zip(si.layers, si.by_layer[:, q].double().tolist(), strict=True)),
            None if si.train_losses is None else float(si.train_losses[q]),
        )
        for r, q in enumerate(p[0].tolist(), start=1)
    ]


def rank_by_loss_note(ranked: list[RankedExample], predicted: torch.Tensor | None, has_losses: bool) -> str | None:
    """The note that --rank-by loss suits these self-influence rows better, where the class the model predicts
    differs from the label on most of them (it has not fit them: docs/MEMORIZATION.md); None otherwise."""
    if predicted is None or not has_losses or not ranked:
        return None
    differ = sum(int(predicted[r.train_position]) != int(r.train_label) for r in ranked)
    if 2 * differ <= len(ranked):
        return None
    return (
        f"the model predicts another class than the label on {differ} of these {len(ranked)}: it has not fit them, and "
        "--rank-by loss (the largest training losses first) then finds wrong labels better (docs/MEMORIZATION.md)"
    )


__all__ = [
    "QueryRanking",
    "RankedExample",
    "ScoreBlock",
    "ScoresMeta",
    "SELF_RANKINGS",
    "SelfInfluence",
    "check_scores_match",
    "iter_score_blocks",
    "load_scores_meta",
    "load_self_influence",
    "pair_parts",
    "pair_tokens",
    "rank_by_loss_note",
    "select_queries",
    "self_top_k",
    "top_k",
]
