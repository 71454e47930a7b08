"""Resumable progress of long passes: periodic snapshots of accumulators.

A snapshot records the pass (phase), how many batches of this rank are done, the
accumulators, and a run key (hash of everything the result depends on), so that
`--resume` continues only the exact run that was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch

from influence_cli import notices, storage
from influence_cli.distributed import DistState, agree
from influence_cli.errors import OutputError

_T = TypeVar("_T")


def run_key(fields: dict[str, Any]) -> str:
    """A short hash of the settings a result depends on."""
    return hashlib.sha256(storage.canonical_json(fields).encode()).hexdigest()[:20]


LATER_FIELDS = ("definition", "model_definition")  # settings recorded since 0.1.0 (outputs before it lack them)
# recorded later still: the factors' `created` in the progress of dataset-similarity and spectrum (not in their result key)
_LATEST_FIELDS = ("factors_created",)


def run_keys(fields: dict[str, Any]) -> set[str]:
    """`run_key` of `fields`, and of `fields` without the settings outputs of earlier versions did
    not record (`_LATEST_FIELDS`, and those and `LATER_FIELDS`): a finished output or progress from before
    them still matches (unverified for those settings, as `check_factors_match` treats them)."""
    latest = {k: v for k, v in fields.items() if k not in _LATEST_FIELDS}
    return {run_key(fields), run_key(latest), run_key({k: v for k, v in latest.items() if k not in LATER_FIELDS})}


def agreed_checks(state: DistState, checks: Callable[[], tuple[_T, list[Path]]], key: str = "output_dir") -> tuple[_T, Replaced]:
    """Runs a command's start checks on every rank at once (`distributed.agree`: a refusal every rank meets is said
    once). `checks` returns its value and the paths the start replaces (old progress and outputs --overwrite lets go,
    temporary files killed writers left); they are removed by the returned `Replaced`, which the command calls once
    the first batches of its passes passed their checks on every rank, so that a run refused at its start or at a
    first batch removes nothing, on any rank (`key`: the config key of their folder). Returns the checks' value."""
    value, removed = agree(state, checks)
    return value, Replaced(state, removed, key)


class Replaced:
    """What a command's start lets go (`agreed_checks`): this rank's old progress, progress saved by another number of
    ranks, on rank 0 the finished outputs --overwrite replaces, and the temporary files killed writers left. Nothing is
    removed before `remove`, which every rank calls at the same point: after the first-batch checks of the passes
    (`passes.check_first_batches`, `passes.agreed_first_batch`), so that an --overwrite refused there (data that does
    not fit the model, a task that does not fit its labels, a non-finite first batch) leaves the old outputs as they
    were, and before the run saves any progress or output of its own."""

    def __init__(self, state: DistState, paths: list[Path], key: str = "output_dir") -> None:
        self.state = state
        self.paths = paths
        self.key = key
        self.done = False

    def remove(self) -> None:
        """Removes the paths in one step every rank takes (`remove_agreed`: one that cannot be removed stops every rank,
        named) the first time it is called; later calls do nothing."""
        if not self.done:
            self.done = True
            remove_agreed(self.state, self.paths, self.key)


def remove_agreed(state: DistState, paths: list[Path], key: str = "output_dir") -> None:
    """Removes this rank's `paths` (one already gone is fine) in one step every rank takes (`distributed.agree`): a
    file that cannot be removed stops every rank, named (`key`: the config key of its folder)."""
    agree(state, lambda: _remove(paths, key))


def _remove(paths: list[Path], key: str) -> None:
    """Removes `paths` (one already gone is fine); one that cannot be removed is an output error naming it."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(
                f"{key}: cannot remove {str(path)!r} ({exc.strerror or exc})", hint=f"remove it yourself, or set {key} to another place"
            ) from None


def remove_finished_progress(paths: Sequence[Path], what: str = "the progress of a finished run", *, per_rank: bool = False) -> None:
    """Removes files a run whose output is written no longer needs (`paths`: its progress, `what` they are in words;
    one already gone is fine). One that cannot be removed (no permission, an immutable file) is said in one warning
    naming each and why, not raised: the output stands, and a later run with these settings shows it again and tries
    once more (`clear_progress_of_finished`). `per_rank`: under torchrun each rank says its own files."""
    left: list[str] = []
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            left.append(f"{str(path)!r} ({exc.strerror or exc})")
    if left:
        files = ", ".join(left[:-1]) + f" and {left[-1]}" if len(left) > 1 else left[0]
        by_hand = "the file" if len(left) == 1 else "them"
        notices.warn(f"cannot remove {files}, {what}: the output stands; remove {by_hand} by hand", per_rank=per_rank)


def check_rank_layout(
    folder: Path, pattern: str, world_size: int, *, resume: bool, overwrite: bool, kind: str = "", key: str = "output_dir"
) -> list[Path]:
    """Refuses progress of this pass saved by a run with another number of ranks (its files,
    `pattern` with {rank} = ".rank<r>" + kind, or kind alone for one process, and the files saved beside them
    (the datasets each finished, compute-scores' score pieces), are not this run's names, so it would silently start over
    and leave them behind); --overwrite lets them go. What is no regular file there is refused as that
    (`storage.refuse_irregular`; `key`: the config key of `folder`). Removes nothing: returns what the
    start lets go (`agreed_checks`, removed once every rank's checks and first batches passed): those files with --overwrite, and the
    temporary files that killed writers of those names left (they hold no progress; the caller holds the lock).

    Raises:
        OutputError: naming the files and the number of ranks that saved them.
    """
    mine = {pattern.format(rank=kind)} if world_size == 1 else {pattern.format(rank=f".rank{r}{kind}") for r in range(world_size)}
    others = [p for p in progress_files(folder, pattern, kind) if snapshot_of(p.name, pattern) not in mine]
    for p in others:  # never opened (a FIFO would block), nor a folder removed
        storage.refuse_irregular(p, overwrite and not resume, key)
    if others and not (overwrite and not resume):
        ranks = _saved_ranks(others, pattern)
        snapshots = [p.name for p in others if snapshot_of(p.name, pattern) == p.name] or [p.name for p in others]
        more = len(others) - len(snapshots)
        raise OutputError(
            f"{str(folder)!r} holds progress saved by a run with {ranks} rank(s) ({', '.join(snapshots)}"
            + (f", and {more} file(s) saved beside {'it' if len(snapshots) == 1 else 'them'}" if more else "")  # finished datasets, score pieces
            + f"); this run has {world_size}",
            hint=(f"resume with the same number of ranks (torchrun --nproc_per_node {ranks})" if ranks > 1 else "resume without torchrun")
            + ", or pass --overwrite to start over",
        ).everywhere()
    temps = storage.temp_files(folder / pattern.format(rank="*"))
    return others + [tmp for tmp, name in temps if _is_progress_name(name, pattern, kind) and snapshot_of(name, pattern) not in mine]


def _saved_ranks(files: list[Path], pattern: str) -> int:
    """The number of ranks that saved the progress files `files` (of `pattern`): the number their run recorded (the first
    "world" setting that reads and is above their highest rank), else as their names show it (a rank whose files are all
    gone leaves no name: one process names none, the highest rank r says at least r + 1, and any at least 2)."""
    numbers = [int(m.group(1)) for p in files if (m := re.match(r"\.rank(\d+)", _middle(p.name, pattern)))]
    if not numbers:
        return 1
    for p in files:
        try:
            world = storage.read_metadata(p).get("settings", {}).get("world")
        except (OutputError, AttributeError):  # unreadable, or not progress with settings
            continue
        if isinstance(world, int) and world > max(numbers):
            return world
    return max(2, max(numbers) + 1)


_FINISHED = "(?:" + "|".join(re.escape(n.split("{")[0]) for n in (storage.PARTIAL_FINISHED, storage.PARTIAL_PIECE)) + r")\d+"  # ".finished<i>": a finished dataset's file (DatasetsProgress), a score piece; ".piece<i>": a piece of spectrum's energies


def _middle(name: str, pattern: str) -> str:
    """What stands for {rank} in `name`, a file name of `pattern`: "", ".rank1", ".rank0.self", ".rank0.finished2"."""
    prefix, suffix = pattern.split("{rank}")
    return name[len(prefix) : len(name) - len(suffix)]


def snapshot_of(name: str, pattern: str) -> str:
    """The snapshot a progress file of `pattern` belongs to: its own name, or for the file of a
    dataset a `DatasetsProgress` finished (similarity.partial.rank0.finished2.safetensors) the
    snapshot it was saved beside (similarity.partial.rank0.safetensors)."""
    prefix, suffix = pattern.split("{rank}")
    return prefix + re.sub(_FINISHED + "$", "", _middle(name, pattern)) + suffix


def progress_files(folder: Path, pattern: str, kind: str = "") -> list[Path]:
    """The progress files of one pass in `folder`, saved by any number of ranks: `pattern` with
    {rank} = "" or ".rank<r>", followed by `kind` (".self" for self-influence), and the files of
    the datasets each finished (".finished<i>" after that: dataset-similarity, spectrum; compute-scores' saved score pieces)."""
    return [p for p in sorted(folder.glob(pattern.format(rank="*"))) if _is_progress_name(p.name, pattern, kind)]


def _is_progress_name(name: str, pattern: str, kind: str) -> bool:
    """Whether `name` (a name of `pattern`) is a progress file of the pass `kind` (`progress_files`)."""
    own = re.compile(r"(\.rank\d+)?" + re.escape(kind) + f"({_FINISHED})?")  # "", ".rank1", ".self", ".rank0.self", ".finished2"
    return own.fullmatch(_middle(name, pattern)) is not None


def clear_progress_of_finished(
    state: DistState, folder: Path, pattern: str, kind: str = "", outputs: Sequence[Path] = (), key: str = "output_dir"
) -> None:
    """Removes the progress a run killed right after renaming its finished output left beside it, or that a finished
    run could not remove (the finished output holds all of it: a FIFO there goes too, never opened), and the temporary
    files a killed writer of `outputs` left (the caller holds their lock); rank 0 removes them. Every rank first checks
    the progress at once (`distributed.agree`): a folder there is refused, said once, before any file is removed (`key`
    naming `folder` in its hint), so that no rank reports the output as finished while another refuses. A file that
    still cannot be removed is a warning (`remove_finished_progress`): the finished output stands."""

    def checks() -> list[Path]:
        found = progress_files(folder, pattern, kind)
        for p in found:  # all checked before any is removed
            storage.refuse_irregular(p, True, key)  # a folder is never removed
        return found

    found = agree(state, checks)
    if state.is_main:
        remove_finished_progress(found)
        temps = [tmp for output in outputs for tmp in storage.temp_paths(output)]
        remove_finished_progress(temps, "left by a killed writer of a finished output")


_LostFiles = list[dict[int, tuple[str, str | None]]]  # by rank: its lost finished files' refusals (message, hint)
# by rank whose snapshot is lost: the files of finished datasets it holds no copy in, each (why, hint, whether the file is there)
_Lacking = dict[int, dict[int, tuple[str, str, bool]]]


@dataclass
class Snapshot:
    phase: str
    batches_done: int
    tensors: dict[str, torch.Tensor]


class PassCheckpoint:
    """Saves and restores one rank's progress to `path` (atomic writes)."""

    def __init__(
        self, path: Path, settings: dict[str, Any], every: int, names: dict[str, str] | None = None, folder_key: str = "output_dir"
    ) -> None:
        """`settings`: everything the pass's result depends on (its `run_key` identifies the run);
        `names`: the command's own words for some of them, in refusals (`changed_settings`);
        `folder_key`: the config key that names its folder, in refusals."""
        self.path = path
        self.settings = as_recorded(settings)
        self.key = run_key(settings)
        self.every = every
        self.names = names
        self.folder_key = folder_key

    def exists(self) -> bool:
        return self.path.exists()

    @overload
    def check_start(self, resume: bool, overwrite: bool, *, lost_ok: Literal[False] = False) -> tuple[Snapshot | None, list[Path]]: ...
    @overload
    def check_start(self, resume: bool, overwrite: bool, *, lost_ok: bool) -> tuple[Snapshot | OutputError | None, list[Path]]: ...

    def check_start(self, resume: bool, overwrite: bool, *, lost_ok: bool = False) -> tuple[Snapshot | OutputError | None, list[Path]]:
        """The snapshot to resume from (None to start fresh), and what the start lets go (`agreed_checks`, removed once
        every rank's checks and first batches passed): the temporary files a killed writer left, and with `overwrite` (without `resume`)
        the snapshot. Refuses to silently drop progress; removes nothing.

        Args:
            lost_ok: A snapshot that cannot be read (damaged, or not progress at all) is returned as its refusal
                instead of raised: under torchrun the other ranks' snapshots can go on without it (`DatasetsProgress`).
                One of other settings is refused all the same.

        Raises:
            OutputError: progress without --resume or --overwrite; progress of other settings (named); without
                `lost_ok`, not a readable progress file.
        """
        stale = storage.temp_paths(self.path)
        if not self.path.exists():
            return None, stale
        storage.refuse_irregular(self.path, overwrite and not resume, self.folder_key)  # never opened; --overwrite lets a FIFO go
        if overwrite and not resume:
            return None, [*stale, self.path]
        if not resume:
            raise OutputError(
                f"{str(self.path)!r} holds progress of an interrupted run",
                hint="pass --resume to continue it, or --overwrite to start over",
            )
        try:
            tensors, meta = storage.load_tensors(self.path, storage.PARTIAL_FORMAT)
        except OutputError as exc:
            if not lost_ok:
                raise
            return exc, stale
        self.check_settings(self.path, meta)
        return Snapshot(meta["phase"], int(meta["batches_done"]), tensors), stale

    def check_header(self) -> None:
        """What `check_start(resume=True, overwrite=False)` refuses, from the snapshot's header alone (no tensor
        is read, no file removed): for the progress of a pass that runs later (a later model of an ensemble), so
        that it refuses the run before the earlier passes, with the refusal it would meet at its turn.

        Raises:
            OutputError: what is no regular file (never opened), not a readable progress file, progress of other
                settings (named).
        """
        if self.path.exists():
            storage.refuse_irregular(self.path, False, self.folder_key)
            meta, _ = storage.read_contents(self.path, storage.PARTIAL_FORMAT)
            self.check_settings(self.path, meta)

    def check_settings(self, path: Path, meta: dict[str, Any]) -> None:
        """Refuses progress at `path` (`meta`: its metadata) of other settings than this run's.

        Raises:
            OutputError: naming the settings that changed.
        """
        if meta.get("run_key") not in run_keys(self.settings):
            old = meta.get("settings")
            changed = changed_settings(old, self.settings, self.names)
            hint = "resume with the interrupted run's settings, or pass --overwrite to start over with these"
            chunks = old.get("chunks") if isinstance(old, dict) else None
            if chunks and {k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k)} == {"chunks"}:
                size = chunks[0][1] - chunks[0][0]  # only the query chunks differ (a budget or a version that sized them otherwise)
                hint = f"resume with --set scores.query_chunk={size} (the interrupted run's chunks; the scores are the same), or pass --overwrite"
            raise OutputError(f"{str(path)!r} is progress of a run with other settings ({changed})", hint=hint)

    def due(self, batches_done: int) -> bool:
        return self.every > 0 and batches_done % self.every == 0

    def save(self, phase: str, batches_done: int, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        """Writes progress (atomically) to `path`, by default the snapshot, with this run's key and settings."""
        meta = {
            storage.FORMAT_KEY: storage.PARTIAL_FORMAT, "run_key": self.key, "phase": phase, "batches_done": batches_done,
            "settings": self.settings,
        }  # fmt: skip
        storage.save_tensors(path or self.path, tensors, meta)

    def clear(self) -> None:
        """Removes this rank's snapshot once the run's output is written, then the pieces saved beside it (`piece_path`):
        one that cannot be removed is a warning (`remove_finished_progress`)."""
        remove_finished_progress([self.path, *pieces_of(self.path)], per_rank=True)

    def check_leftovers(self, paths: list[Path], what: str) -> None:
        """Refuses to resume past outputs of the interrupted run (`paths`, e.g. finished score shards,
        each with its run's `run_key` and `settings` in its metadata) that other settings wrote:
        they would be recomputed and replaced, the work they hold lost.

        Raises:
            OutputError: naming what changed.
        """
        keys = run_keys(self.settings)
        stale = [(path, meta) for path in paths if (meta := storage.read_metadata(path)).get("run_key") not in keys]
        if stale:
            path, meta = stale[0]
            changed = changed_settings(meta.get("settings"), self.settings)
            raise OutputError(
                f"{str(path.parent)!r} holds {len(stale)} {what} of an interrupted run with other settings ({changed})",
                hint="resume with the interrupted run's settings, or pass --overwrite to start over with these",
            )


_Cut = Callable[[int, int, int, int], dict[str, torch.Tensor]]  # (q0, q1, c0, c1) → the results of those rows and columns
_Paste = Callable[[int, int, int, int, dict[str, torch.Tensor]], None]  # puts a piece's results back at (q0, q1, c0, c1)


class SavedPieces:
    """The per-example results of one range of examples a pass has saved, in files beside its snapshot (`piece_path`),
    each written once: at each save, those of the columns (examples) done since the previous one. compute-scores
    (scores.partial[.self].finished<i>.safetensors): pairwise, a piece per query chunk since, its [chunk rows, columns]
    of the scores (and of their per-layer parts); --self (`chunks` None), one piece: the values of those examples, their
    per-layer parts, training losses, predictions and collected labels. spectrum (`DatasetsProgress` with `per_example`,
    spectrum.partial.piece<i>.safetensors): one piece, the energies of those examples of the dataset in progress. The
    snapshot counts the pieces (`pieces`) and holds only what the pieces do not. It held the results themselves: each
    save wrote all of them so far again, so a range of B batches saved every E batches wrote about B / 2E times its
    results (quadratic in the range).
    """

    def __init__(
        self,
        checkpoint: PassCheckpoint,
        shard: int,
        chunks: list[tuple[int, int]] | None,
        width: int,
        names: set[str],
        what: tuple[str, str] = ("scores", "score"),
        *,
        of: str | None = None,
        name: str = storage.PARTIAL_FINISHED,
    ) -> None:
        """`shard`: the range's number (in each piece's phase); `names`: the tensors every piece holds; `what`: them in
        words, and the pieces' kind ("scores", "score"); `of`: the range in words (default "train range <shard>");
        `name`: the pieces' files (`piece_path`)."""
        self.checkpoint, self.shard, self.width, self.names = checkpoint, shard, width, names
        self.what, self.kind = what
        self.of, self.name = of or f"train range {shard}", name
        self.by_query = chunks is not None
        self.chunks = chunks if chunks is not None else [(0, 0)]
        self.count = 0
        self.saved = (0, 0)  # (query chunk, column): everything before it is in the pieces

    @staticmethod
    def check_start(checkpoint: PassCheckpoint, resume: bool, overwrite: bool) -> tuple[Snapshot | None, list[Path]]:
        """`checkpoint.check_start`, and besides what it removes, the pieces `stale` names."""
        snap, stale = checkpoint.check_start(resume, overwrite)
        return snap, stale + SavedPieces.stale(checkpoint, snap)

    @staticmethod
    def stale(checkpoint: PassCheckpoint, snapshot: object, name: str = storage.PARTIAL_FINISHED) -> list[Path]:
        """What a start removes of the pieces (`name`) beside `checkpoint`'s snapshot: without a `snapshot` (None), the
        pieces no snapshot continues (those of an --overwrite run's, of one killed before its first snapshot); always the
        temporary files of killed writers of pieces."""
        gone = pieces_of(checkpoint.path, name) if snapshot is None else []
        return gone + storage.temp_paths(piece_path(checkpoint.path, "*", name))

    def _at(self, ci: int, c: int) -> str:
        return f"query chunk {ci + 1}, column {c}" if self.by_query else f"example {c}"

    def _span(self, ci: int, c0: int, c1: int) -> str:
        return f"query chunk {ci + 1}, columns {c0}..{c1}" if self.by_query else f"examples {c0}..{c1}"

    def write(self, cut: _Cut, upto: tuple[int, int]) -> None:
        """Writes the results from `saved` up to `upto` (query chunk, column), a piece per query chunk."""
        (first, start), (last, stop) = self.saved, upto
        for ci in range(first, last + 1):
            c0, c1 = (start if ci == first else 0), (stop if ci == last else self.width)
            if c1 <= c0:
                continue
            tensors = cut(*self.chunks[ci], c0, c1)
            self.checkpoint.save(f"piece:{self.shard}:{ci}:{c0}:{c1}", 0, tensors, piece_path(self.checkpoint.path, self.count, self.name))
            self.count += 1
        self.saved = upto

    def read(self, count: int, paste: _Paste, upto: tuple[int, int]) -> None:
        """Puts back (`paste`) the first `count` pieces, which hold every result before `upto` (query chunk, column),
        each once, in the order `write` wrote them.

        Raises:
            OutputError: a piece missing, unreadable, of other settings or of another range, one that holds other
                tensors, or one that does not continue the results before it (a gap, or results the pieces before it hold).
        """
        hint = "pass --overwrite to start over (the saved progress cannot continue without it)"
        at = (0, 0)  # (query chunk, column): the pieces read so far hold every result before it
        for i in range(count):
            path = piece_path(self.checkpoint.path, i, self.name)
            if path.exists():
                storage.refuse_irregular(path, False)  # never opened
            else:
                raise OutputError(f"{str(path)!r} is missing: it held {self.what} {self.checkpoint.path.name} counts as saved", hint=hint)
            tensors, meta = storage.load_tensors(path, storage.PARTIAL_FORMAT)
            self.checkpoint.check_settings(path, meta)
            phase = str(meta.get("phase", "")).split(":")
            if len(phase) != 5 or phase[0] != "piece" or int(phase[1]) != self.shard:
                raise OutputError(f"{str(path)!r} does not hold {self.what} of {self.of} (it holds {meta.get('phase')!r})", hint=hint)
            ci, c0, c1 = (int(v) for v in phase[2:])
            follows = (ci, c0) == at or (at[1] == self.width and (ci, c0) == (at[0] + 1, 0))
            if not (follows and ci < len(self.chunks) and c0 < c1 <= self.width):
                raise OutputError(
                    f"{str(path)!r} holds the {self.what} of {self._span(ci, c0, c1)} of {self.of}, where "
                    f"the {self.what} saved before it end at {self._at(*at)}",
                    hint=hint,
                )
            if set(tensors) != self.names:
                raise OutputError(f"{str(path)!r} holds {', '.join(sorted(tensors))}, not {', '.join(sorted(self.names))}", hint=hint)
            paste(*self.chunks[ci], c0, c1, tensors)
            at = (ci, c1)
        if at != upto:
            raise OutputError(
                f"{str(self.checkpoint.path)!r} counts {count} {self.kind} piece(s) that end at "
                f"{self._at(*at)}, not where it stopped ({self._at(*upto)})",
                hint=hint,
            )
        self.count, self.saved = count, upto

    def remove(self) -> None:
        """Removes every piece beside the snapshot (those of an earlier run that no snapshot counts too)."""
        remove_finished_progress(pieces_of(self.checkpoint.path, self.name), per_rank=True)


_NAMES = {"bs": "batch size", "batch_size": "batch size", "world": "number of ranks", "n": "examples (factors.max_examples)",
          "chunks": "query chunks (scores.query_chunk, scores.max_memory_mb)", "shards": "score shards (scores.max_memory_mb)",
          "damping": "damping (scores.damping, damping_factor, damping_scope; `auto` follows the factors)", "factors": "factors file (refitted)",
          "factors_created": "factors file (refitted since, with the same settings)", "model_fingerprint": "model",
          "model": "model", "model_definition": "model definition", "definition": "model definition", "train_fingerprint": "data.train",
          "data": "data.train", "query_fingerprint": "data.query", "strategy": "factors.strategy", "fisher": "factors.fisher",
          "amp": "factors.amp", "dtype": "scores.dtype", "relative": "scores.relative", "by_layer": "scores.by_layer (--by-layer)", "sum_queries": "scores.sum_queries (--sum-queries)", "per_token": "scores.per_token (--per-token)", "measurement": "task.measurement",
          "task": "task.kind", "modules": "layers (factors.modules, factors.trainable_only)", "padding_value": "data.padding_value",
          "dataset_order": "the order of the datasets"}  # fmt: skip


def as_recorded(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` as metadata records and reads them back (JSON types), for comparisons."""
    return json.loads(storage.canonical_json(fields))


def refuse_other_finished_result(
    path: Path, recorded: dict[str, Any] | None, result: dict[str, Any], what: str, key: str = "output_dir", fmt: str | None = None
) -> None:
    """--resume on a finished output of other settings (`recorded`: its metadata's "result"):
    there is nothing to continue, and recomputing would replace it (`key`: the config key that names its folder;
    `fmt`: the format of the output expected there).

    Raises:
        OutputError: naming what changed; another program's file at `path`, or an output of another kind, is refused
            as that (`storage.check_can_write`).
    """
    storage.check_can_write(path, False, what, key, fmt, resume=True)
    raise OutputError(
        f"{str(path)!r} holds {what} of a finished run with other settings ({changed_settings(recorded, as_recorded(result))})",
        hint="--resume continues interrupted runs only: pass --overwrite to recompute with these settings",
    ).everywhere()


def finished_result(
    path: Path, result: dict[str, Any], what: str, fmt: str, *, overwrite: bool, names: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The metadata of the finished output at `path` (format `fmt`) when it holds `result` (a command that
    shows it again instead of recomputing it); None when there is none, or with `overwrite`.

    Raises:
        OutputError: it holds the result of other settings (named, through `names` too), or of a
            version that did not record them; it is not an output of `fmt`'s kind (`storage.check_can_write`).
    """
    if not path.exists():
        return None
    # a folder (even with --overwrite); another program's file, a damaged one, another kind, a FIFO (without it)
    storage.check_can_write(path, overwrite, what, "output_dir", fmt, resume=True)
    if overwrite:
        return None
    recorded = storage.read_metadata(path)
    if recorded.get("result_key") is None:
        storage.check_can_write(path, overwrite, what, "output_dir", fmt)  # raises: a finished run whose settings are unknown (of this version or another)
    if recorded["result_key"] not in run_keys(result):
        raise OutputError(
            f"{str(path)!r} holds {what} of other settings ({changed_settings(recorded.get('result'), as_recorded(result), names)})"
            + storage.other_version(recorded),
            hint="pass --overwrite to replace it",
        ).everywhere()
    return recorded


def changed_settings(old: dict[str, Any] | None, new: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """Which settings differ, in words: "batch size 256 -> 64, model, seed (unset) -> 0" (`names`: the
    command's own words for some keys; a setting only one side records, such as the seed of a sampled
    Fisher, is "(unset)" on the other)."""
    if not isinstance(old, dict):
        return "model, data, strategy or batch size changed"
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            name = (names or {}).get(key) or _NAMES.get(key, key)
            shown = ["(unset)" if k not in side else v for k, side, v in ((key, old, a), (key, new, b))]
            short = all(isinstance(v, (int, float, str, bool)) and len(str(v)) <= 12 for v in shown)
            parts.append(f"{name} {shown[0]} -> {shown[1]}" if short else name)
    return ", ".join(parts) or "unknown change"


class DatasetsProgress:
    """Resumable progress of a command that streams several datasets one after another (dataset-similarity,
    spectrum), on this rank, saved beside its `PassCheckpoint`'s snapshot: each finished dataset's result
    (tensors, the same on every rank: they are all-reduced or gathered) once, in a file of its own
    (`finished_path`), and every `factors.checkpoint_every` batches the snapshot: this rank's state of the
    dataset in progress and how many are finished, never their results (so a save costs the same after
    any number of datasets). Each rank keeps its own files, as it keeps its own snapshot, so a rank that
    lost one (missing or unreadable) is sent another rank's copy when it resumes (`agree`), and a rank that
    lost its snapshot resumes as one that saved nothing, its own files of the finished datasets read as copies.

    Phase "dataset:<i>": datasets 0..i-1 are finished, each in its file; `batches_done` batches of dataset
    i are in `state`. A snapshot of earlier versions holds the finished results as its tensors
    finished.<j>.*: they are read from it, and written to their files at the next save. A save writes the
    files before the snapshot, so a run killed in between leaves the file of dataset i that no snapshot
    counts: `--resume` counts it as finished when it holds that result under this run's settings
    (`_read_unsaved`, `agree`), instead of streaming dataset i again.

    `per_example` names the tensors of the state that hold a row per example done (spectrum's energies): they are
    saved in pieces beside the snapshot (`SavedPieces`, `storage.PARTIAL_PIECE`), each row once, and the snapshot
    counts the pieces and the rows (`state.pieces`, `state.rows`). A snapshot of earlier versions holds the rows
    themselves: they are resumed from it, and written to pieces at the next save.
    """

    def __init__(
        self, checkpoint: PassCheckpoint, snapshot: Snapshot | None = None, *, lost_ok: bool = False, per_example: tuple[str, ...] = (),
        examples: Sequence[int] = (),
    ) -> None:
        """Continues `snapshot` (of `checkpoint`; none: from the start), reading the finished datasets' files.

        Args:
            lost_ok: A finished dataset's file that is missing, unreadable or holds another dataset is kept
                in `lost` (its refusal) instead of refused, its result left empty: under torchrun another
                rank's copy can take its place (`agree`, which refuses when no rank holds one).
            per_example: the state's tensors of a row per example, saved in pieces (their rows are read back by
                `read_pieces`, which `start` calls).
            examples: this rank's examples of each dataset (its shard), where `per_example` is set: the rows a snapshot
                holds are those of the batches it counts as done (`read_pieces`).

        Raises:
            OutputError: a finished dataset's file is of other settings (named), or without `lost_ok`
                missing, unreadable, or of another dataset: the snapshot cannot be continued without it.
        """
        self.checkpoint = checkpoint
        self.finished: list[dict[str, torch.Tensor]] = []
        self.written = 0  # how many of `finished` are in their files
        self.lost: dict[int, OutputError] = {}  # datasets whose file is lost (lost_ok), until `agree` writes another rank's copy
        # results of the datasets after those the snapshot counts, from files it does not count (`_read_unsaved`), until `agree`
        self.unsaved: list[dict[str, torch.Tensor]] = []
        # under torchrun, this rank's snapshot when it is lost (`start`), until `agree`: ("missing" or "unreadable", in words)
        self.snapshot_lost: tuple[str, str] | None = None
        self.batches_done = 0
        self.state: dict[str, torch.Tensor] = {}
        self.per_example = per_example
        self.examples = list(examples)
        self.pieces: SavedPieces | None = None  # the dataset in progress's pieces, once read or first written
        self.replaced: Replaced | None = None  # what `start` lets go, until `remove_replaced`
        if snapshot is not None and snapshot.phase.startswith("dataset:"):
            done = int(snapshot.phase.removeprefix("dataset:"))
            if any(k.startswith("finished.") for k in snapshot.tensors):  # an earlier version's snapshot holds them
                self.finished = [prefixed(snapshot.tensors, f"finished.{i}.") for i in range(done)]
            else:
                self.finished = [self._read_finished(i, lost_ok) for i in range(done)]
                self.written = done
            self.batches_done = snapshot.batches_done
            self.state = prefixed(snapshot.tensors, "state.")

    @classmethod
    def start(
        cls, output: Path, pattern: str, dist: Any, result: dict[str, Any], datasets: list[str], *,
        batch_size: int, every: int, resume: bool, overwrite: bool, names: dict[str, str] | None = None,
        per_example: tuple[str, ...] = (), examples: Sequence[int] = (),
    ) -> DatasetsProgress:
        """The progress this rank continues from (none without `resume`) towards `output`, saved as `pattern` (with
        {rank}) every `every` batches: every rank checks its own at once (`distributed.agree`: a refusal is said
        once), then the ranks agree on where to continue and send each other the finished results a rank lacks
        (`agree`, which can refuse too); only then is anything removed (`Replaced`, `replaced`): what --overwrite lets
        go, and the temporary files killed writers left, so that a refused start, --resume included, removes nothing;
        not before the command calls `remove_replaced()` on every rank, once the first batches of the datasets to
        stream passed their checks (dataset-similarity, spectrum).
        Under torchrun a snapshot that is missing (under `resume`) or unreadable is not refused here: `agree` decides.
        With `overwrite` the finished `output` is removed with them (an interrupted --overwrite
        run must not leave the old result looking current). Under `resume` the files of the datasets right after those
        this rank's snapshot (one that reads) counts, written by a run killed before the snapshot that counts them,
        are counted as finished when they hold their results under this run's settings (and, under torchrun, agree
        with every other rank's copy: `agree`). Files of finished datasets that this rank's snapshot does not count
        and that are not so counted (a run started over; one of them does not hold its result; when the snapshot is
        lost, those past the datasets the other ranks finished) are removed once the ranks agreed to go on: a refusal
        leaves them. What is no regular file at the path of one of them is refused as that before any is read or
        removed (`storage.refuse_irregular`: a FIFO is never opened, and removed by `overwrite` without `resume`; a
        folder is never removed). The pieces of the per-example state (`per_example`) that the snapshot counts are
        read once the ranks agreed where to continue, on every rank at once (a refusal stops every rank); those of
        a start without a snapshot are removed.

        Args:
            dist: The DistState. result: the settings the result depends on; the batch size, the ranks and
                the order of `datasets` are added (progress is kept by position). names: words for refusals.
            per_example: the state's tensors that hold a row per example (saved in pieces, each row once).
            examples: this rank's examples of each dataset, with `per_example` (a snapshot's rows are checked against them).
        """  # fmt: skip
        folder = output.parent
        settings = result | {"bs": batch_size, "world": dist.world_size, "dataset_order": list(datasets)}
        checkpoint = PassCheckpoint(folder / pattern.format(rank=f".rank{dist.rank}" if dist.distributed else ""), settings, every, names)

        def start_checks() -> tuple[DatasetsProgress, list[Path]]:
            removed = check_rank_layout(folder, pattern, dist.world_size, resume=resume, overwrite=overwrite)
            for path in [*_finished_files(checkpoint.path).values(), *pieces_of(checkpoint.path, storage.PARTIAL_PIECE)]:  # never opened (a FIFO would block), nor a folder removed
                storage.refuse_irregular(path, overwrite and not resume, checkpoint.folder_key)
            snapshot, stale = checkpoint.check_start(resume, overwrite, lost_ok=dist.distributed)
            progress = cls(
                checkpoint, None if isinstance(snapshot, OutputError) else snapshot, lost_ok=dist.distributed, per_example=per_example, examples=examples
            )
            stale += SavedPieces.stale(checkpoint, snapshot, storage.PARTIAL_PIECE)
            if isinstance(snapshot, OutputError):
                progress.snapshot_lost = ("unreadable", snapshot.message)
            elif snapshot is None and resume and dist.distributed:  # `agree`: no progress at all when no rank has one
                progress.snapshot_lost = ("missing", f"{str(checkpoint.path)!r} is missing")
            elif snapshot is not None and snapshot.phase.startswith("dataset:"):  # it reads (one only under `resume`)
                progress._read_unsaved()
            return progress, removed + stale + storage.temp_paths(progress.finished_path("*"))  # what killed writers left

        saved, removed = agree(dist, start_checks)  # removes nothing: `agree` below can still refuse
        saved.agree(dist)
        agree(dist, saved.read_pieces)  # a rank whose pieces are refused stops every rank
        replaced = ([output] if overwrite else []) + storage.temp_paths(output)  # and what a killed writer left
        removed += saved._finished_from(saved.written) + (replaced if dist.is_main else [])
        saved.replaced = Replaced(dist, removed, checkpoint.folder_key)
        return saved

    def remove_replaced(self) -> None:
        """Removes what `start` lets go, if it is not removed yet (`Replaced.remove`: every rank calls it at the same point)."""
        if self.replaced is not None:
            self.replaced.remove()

    def finished_path(self, index: int | str) -> Path:
        """The file of finished dataset `index` (from 0; "*": a glob of them all), beside the snapshot:
        similarity.partial.rank0.safetensors -> similarity.partial.rank0.finished2.safetensors."""
        return piece_path(self.checkpoint.path, index)  # storage.PARTIAL_FINISHED, as compute-scores' score pieces

    def dataset_name(self, index: int) -> str:
        """Dataset `index` in words: its name in the run's order ('zeros_sixes'), else its place."""
        order = self.checkpoint.settings.get("dataset_order")
        return repr(order[index]) if isinstance(order, list) and index < len(order) else str(index)

    def _read_finished(self, index: int, lost_ok: bool = False, counted: bool = True) -> dict[str, torch.Tensor]:
        """The result in finished dataset `index`'s file; with `lost_ok` an empty one when the file is lost (`lost`).

        Args:
            counted: Whether this rank's snapshot counts the dataset as finished. A file that is not counted (the
                snapshot is lost: `agree`) and is of other settings is lost too, not refused.
        """
        path = self.finished_path(index)
        what = f"the result of dataset {self.dataset_name(index)}" + (f", which {self.checkpoint.path.name} counts as finished" if counted else "")
        held = f": it held {what}" if counted else ""
        hint = "pass --overwrite to start over (the saved progress cannot continue without it)"
        lost = None
        if not path.is_file():
            lost = OutputError(f"{str(path)!r} is missing{held}", hint=hint)
        else:
            try:
                tensors, meta = storage.load_tensors(path, storage.PARTIAL_FORMAT)
            except OutputError as exc:  # unreadable, or not progress at all
                lost = OutputError(f"{exc.message}{held}", hint=hint)
            else:
                try:
                    self.checkpoint.check_settings(path, meta)  # of other settings: refused by name, whatever other ranks hold
                except OutputError as exc:
                    if counted:
                        raise
                    lost = OutputError(exc.message, hint=hint)
                if lost is None and meta.get("phase") != f"finished:{index}":
                    lost = OutputError(f"{str(path)!r} does not hold {what} (it holds {meta.get('phase')!r})", hint=hint)
        if lost is None:
            return tensors
        if not lost_ok:
            raise lost
        self.lost[index] = lost
        return {}

    def _read_unsaved(self) -> None:
        """Reads this rank's files of the datasets after those its snapshot counts into `unsaved`, in order, up to the
        first that does not hold its dataset's result under this run's settings (missing, unreadable, another dataset's
        or of other settings, checked as any file no snapshot counts: `_read_finished`); never the last dataset's (its
        result is the command's). A save writes such a file before the snapshot that counts it, so a run killed in
        between leaves it complete (written atomically). Not for a snapshot of earlier versions (no file was written
        beside it)."""
        order = self.checkpoint.settings.get("dataset_order")
        last = len(order) - 1 if isinstance(order, list) else 0
        if self.written != len(self.finished):
            return
        while (index := len(self.finished) + len(self.unsaved)) < last:
            result = self._read_finished(index, lost_ok=True, counted=False)
            if self.lost.pop(index, None) is not None:
                return
            self.unsaved.append(result)

    def _adopt(self, count: int) -> None:
        """Counts the first `count` results of `unsaved` as finished (each is in its file) and drops the rest; the state
        of the dataset in progress goes, as the first of them finished it."""
        if count:
            self.finished += self.unsaved[:count]
            self.written = len(self.finished)
            self.batches_done, self.state = 0, {}
        self.unsaved = []

    def _adopt_agreed(self, dist: Any, counts: list[int], unsaved: list[int]) -> list[int]:
        """Under torchrun, each rank adopts its `unsaved` results (`unsaved`: how many each rank read) as far as every
        copy of each agrees: the digests of the unsaved copies of a dataset, of the copies of the ranks that count it
        (`counts`: by rank, the datasets its snapshot counts; not its lost files) and of the files of the ranks whose
        snapshot is lost that hold it (once adopted, they would be compared with it, and a difference refused:
        `_check_copies`) are gathered, and a rank adopts up to its first result whose copies differ (that file and
        those after it are then removed, as any file no snapshot counts is). Returns how many datasets each rank holds
        as finished then (the same list on every rank)."""
        if not any(unsaved):
            return counts
        spans = [range(count, count + n) for count, n in zip(counts, unsaved, strict=True)]
        mine: dict[int, str] = {}
        for i in sorted({i for span in spans for i in span}):  # every rank takes part, those that hold none of them too
            if i in spans[dist.rank]:
                mine[i] = storage.tensors_digest(self.unsaved[i - counts[dist.rank]])
            elif i < counts[dist.rank] and i not in self.lost:
                mine[i] = storage.tensors_digest(self.finished[i])
            elif self.snapshot_lost is not None:  # its own file, when it holds a copy (as `_read_own_copies` reads it)
                copy = self._read_finished(i, lost_ok=True, counted=False)
                if self.lost.pop(i, None) is None:
                    mine[i] = storage.tensors_digest(copy)
                del copy
        digests: list[dict[int, str]] = dist.all_gather_object(mine)
        taken = [next((n for n, i in enumerate(span) if len({d[i] for d in digests if i in d}) > 1), len(span)) for span in spans]
        self._adopt(taken[dist.rank])
        return [count + n for count, n in zip(counts, taken, strict=True)]

    def _copy_path(self, index: int) -> Path:
        """Where this rank's copy of finished dataset `index`'s result was read from: its file, or the snapshot of an
        earlier version that holds it."""
        return self.finished_path(index) if index < self.written else self.checkpoint.path

    def _finished_from(self, start: int) -> list[Path]:
        """This rank's files of finished datasets from index `start` on."""
        return [p for index, p in _finished_files(self.checkpoint.path).items() if index >= start]

    def clear(self) -> None:
        """Removes this rank's progress: the snapshot, then the finished datasets' files and the pieces (a kill in
        between leaves files that no snapshot counts, which the next start removes); those that cannot be removed are
        one warning (`remove_finished_progress`)."""
        pieces = pieces_of(self.checkpoint.path, storage.PARTIAL_PIECE)
        remove_finished_progress([self.checkpoint.path, *self._finished_from(0), *pieces], per_rank=True)

    def due(self, batches_done: int) -> bool:
        return self.checkpoint.due(batches_done)

    def save(self, batches_done: int, state: dict[str, torch.Tensor]) -> None:
        """Saves `batches_done` batches of the dataset in progress (`state`: what they added up to) in the snapshot,
        after writing each dataset finished since the last save to its file (every finished result is written once),
        and the rows of the per-example state added since the last save to a piece (`per_example`: each row once)."""
        for i in range(self.written, len(self.finished)):
            self._write_finished(i)
        self.written = len(self.finished)
        rows = [state[k] for k in self.per_example if k in state]
        held = {f"state.{k}": v for k, v in state.items() if k not in self.per_example}
        if rows:
            done = len(rows[0])
            pieces = self.pieces = self.pieces or self._pieces(done)
            pieces.write(lambda _q0, _q1, c0, c1: {k: state[k][c0:c1] for k in self.per_example}, (0, done))
            held |= {"state.pieces": torch.tensor(pieces.count), "state.rows": torch.tensor(done)}
        self.checkpoint.save(f"dataset:{len(self.finished)}", batches_done, held)

    def _pieces(self, width: int) -> SavedPieces:
        """The pieces of the per-example state of the dataset in progress (`width`: its rows saved so far)."""
        i = len(self.finished)
        return SavedPieces(
            self.checkpoint, i, None, width, set(self.per_example), ("per-example results", "per-example"),
            of=f"dataset {self.dataset_name(i)}", name=storage.PARTIAL_PIECE,
        )  # fmt: skip

    def read_pieces(self) -> None:
        """Puts the rows of the per-example state that the snapshot's pieces hold back into `state` (joined, in order).

        Raises:
            OutputError: the pieces refused (`SavedPieces.read`: missing, unreadable, of other settings or another
                dataset, or not tiling the rows the snapshot counts), or a snapshot that counts batches done and no
                rows of them, or other rows than those batches hold (damaged or edited: it cannot be continued).
        """
        if not self.per_example or not self.batches_done:
            return
        if "pieces" in self.state:  # else a snapshot of earlier versions holds the rows
            done = int(self.state.pop("rows"))
            pieces = self._pieces(done)
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.per_example}

            def paste(_q0: int, _q1: int, _c0: int, _c1: int, tensors: dict[str, torch.Tensor]) -> None:
                for k, v in tensors.items():
                    parts[k].append(v)

            pieces.read(int(self.state.pop("pieces")), paste, (0, done))
            self.pieces = pieces
            for k, held in parts.items():
                if held:
                    self.state[k] = torch.cat(held) if len(held) != 1 else held[0]
                held.clear()
        if not all(k in self.state and len(self.state[k]) for k in self.per_example):
            raise OutputError(
                f"{str(self.checkpoint.path)!r} counts {self.batches_done} batch(es) of dataset "
                f"{self.dataset_name(len(self.finished))} as done but holds no per-example results of them",
                hint="pass --overwrite to start over (the saved progress cannot continue without them)",
            )
        self._check_rows()

    def _check_rows(self) -> None:
        """Refuses a snapshot whose rows of the dataset in progress are not those of the batches it counts as done: each
        batch holds the batch size's examples, but the last of this rank's shard (`examples`, where known)."""
        i, bs, done = len(self.finished), int(self.checkpoint.settings["bs"]), self.batches_done
        shard = self.examples[i] if i < len(self.examples) else None
        expected = bs * done if shard is None else min(bs * done, shard)
        rows = sorted({len(self.state[k]) for k in self.per_example})
        if rows != [expected] or (shard is not None and bs * (done - 1) >= shard):
            raise OutputError(
                f"{str(self.checkpoint.path)!r} counts {done} batch(es) of {bs} of dataset {self.dataset_name(i)} as done, "
                f"but holds the per-example results of {' / '.join(map(str, rows))} example(s)"
                + (f" (this rank's shard has {shard})" if shard is not None else ""),
                hint="pass --overwrite to start over (the saved progress was damaged or edited, and cannot be continued)",
            )

    def _write_finished(self, index: int) -> None:
        """Writes finished dataset `index`'s result to its file."""
        self.checkpoint.save(f"finished:{index}", 0, self.finished[index], self.finished_path(index))

    def finish(self, result: dict[str, torch.Tensor], more: bool) -> None:
        """Records a finished dataset, and saves it when `more` datasets follow (the last one is the command's result)."""
        self.finished.append({k: v.detach().cpu() for k, v in result.items()})
        self.batches_done, self.state = 0, {}
        if more and self.checkpoint.every > 0:
            self.save(0, {})
            if self.pieces is not None:  # the finished dataset's file holds them: the snapshot counts none
                self.pieces.remove()
        self.pieces = None

    def agree(self, dist: Any) -> None:
        """Every rank (`dist`: a DistState) resumes after the most datasets any rank finished, holding every finished
        result. First each rank counts as finished the results in its files that its snapshot did not count yet
        (`unsaved`; under torchrun as far as every rank's copies of them agree, `_adopt_agreed`). What a rank lacks (it
        saved fewer, lost a file, or lost its snapshot) is sent by the first rank that holds it (`_send_copies`), and
        each of its files so replaced is said in a warning (one its snapshot counts that is lost, or one that is there
        but holds no copy). A rank whose snapshot is
        lost (`snapshot_lost`) resumes as a rank that saved nothing, said in a warning: its own files of those datasets
        are read then (`_read_own_copies`), and each that holds its dataset's result under this run's settings is a copy
        like any other rank's (kept, and sent to a rank that lacks it). A rank that saved fewer, or whose snapshot is
        lost, starts the dataset in progress over on its shard; the others keep their state. Each copy that takes the
        place of a rank's lost file (or, beside a lost snapshot, of a file it lacks) is written to that file at once,
        whatever `factors.checkpoint_every` is, so no save need follow. When every snapshot is missing, no rank saved
        progress, and all start from the beginning. Every rank decides from the same gathered views, so all go on, or
        all refuse alike, touching no file.

        Raises:
            OutputError: (every rank alike, said once) no rank's snapshot reads and one is unreadable
                (`_saved_nothing`), or a finished result has no usable copy, or its copies differ (`_check_copies`).
        """
        if not dist.distributed:
            if self.lost:  # pragma: no cover - one process reads its files without lost_ok
                raise next(iter(self.lost.values()))
            self._adopt(len(self.unsaved))
            return
        mine = (len(self.finished), {i: (e.message, e.hint) for i, e in self.lost.items()}, self.snapshot_lost, len(self.unsaved))
        views = dist.all_gather_object(mine)
        lost: _LostFiles = [dict(gone) for _, gone, _, _ in views]
        saved_nothing = _saved_nothing([snapshot for _, _, snapshot, _ in views])
        counts = self._adopt_agreed(dist, [int(count) for count, _, _, _ in views], [int(n) for *_, n in views])
        self.snapshot_lost = None
        most = max(counts)
        lacking = self._read_own_copies(dist, most, saved_nothing)

        def holds(r: int, i: int) -> bool:  # a rank whose snapshot is lost holds what its files hold, another what it counts
            return i not in lacking[r] if r in lacking else counts[r] > i and i not in lost[r]

        holders = [[r for r in range(dist.world_size) if holds(r, i)] for i in range(most)]
        self._check_copies(dist, holders, lost, saved_nothing, lacking)
        finished = self._send_copies(dist, holders, lost, lacking)
        for r, (_, said) in saved_nothing.items():  # a lost snapshot is said, as a lost file is
            notices.warn(f"{said}; rank {r} resumes as a rank that saved nothing: {self._recovered(r, most, holders)}")
        if len(self.finished) < most:
            self.batches_done, self.state = 0, {}
        self.finished, recovered, self.lost = finished, sorted(self.lost), {}  # all below `written`
        agree(dist, lambda: [self._write_finished(i) for i in recovered])  # a rank that cannot write stops every rank

    def _read_own_copies(self, dist: Any, most: int, saved_nothing: dict[int, tuple[str, str]]) -> _Lacking:
        """The ranks whose snapshot is lost (`saved_nothing`) read their own files of the `most` finished datasets (every
        rank takes part in the gathering). Returns, by such rank, the datasets of which it holds no usable copy, each
        with why (message, hint) and whether the file is there: it is missing, unreadable, or holds another dataset or
        other settings."""
        if not saved_nothing or not most:
            return {r: {} for r in saved_nothing}
        if dist.rank in saved_nothing:
            self.finished = [self._read_finished(i, lost_ok=True, counted=False) for i in range(most)]
            self.written = most  # its files: those it lacks are written once the copies are sent
        mine = {i: (e.message, e.hint, self.finished_path(i).is_file()) for i, e in self.lost.items()} if dist.rank in saved_nothing else None
        gathered: list[dict[int, tuple[str, str, bool]] | None] = dist.all_gather_object(mine)
        return {r: dict(gathered[r] or {}) for r in saved_nothing}

    def _check_copies(
        self, dist: Any, holders: list[list[int]], lost: _LostFiles, saved_nothing: dict[int, tuple[str, str]], lacking: _Lacking,
    ) -> None:
        """Refuses, every rank alike, when a finished dataset that a rank lacks has no holder (`holders`: the ranks that
        hold each; `lost`: by rank, its lost files' refusals; `saved_nothing`: the ranks whose snapshot is lost, `lacking`:
        the files each of them lacks), or its holders' copies differ (a digest of each holder's, gathered: each rank
        checked its files' settings). The copies are compared where a rank lacks the dataset, or a rank whose snapshot
        is lost holds it (no snapshot counts that file)."""  # fmt: skip
        for i, held in enumerate(holders):
            if not held:
                raise _no_usable_copy(i, lost, saved_nothing, lacking)
        shared = [i for i, held in enumerate(holders) if len(held) > 1 and (len(held) < dist.world_size or any(r in saved_nothing for r in held))]
        if shared:  # every rank takes part, those that hold none of them too
            mine = {i: (storage.tensors_digest(self.finished[i]), str(self._copy_path(i))) for i in shared if dist.rank in holders[i]}
            digests: list[dict[int, tuple[str, str]]] = dist.all_gather_object(mine)
            for i in shared:
                first, *others = [digests[r][i] for r in holders[i]]
                other = next((o for o in others if o[0] != first[0]), None)
                if other is not None:
                    raise OutputError(
                        f"{other[1]!r} and {first[1]!r} hold different results of dataset {self.dataset_name(i)} (every rank's "
                        "copy should be the same): the saved progress cannot be continued",
                        hint="pass --overwrite to start over",
                    ).everywhere()

    def _send_copies(self, dist: Any, holders: list[list[int]], lost: _LostFiles, lacking: _Lacking) -> list[dict[str, torch.Tensor]]:
        """This rank's finished results, those a rank lacks broadcast by their first holder (`holders`); each lost file
        (`lost`: by rank), and each file of a rank whose snapshot is lost that is there but holds no copy (`lacking`:
        damaged, another dataset's, other settings), is said, naming the rank whose copy takes its place (written to
        that file at once, `agree`)."""
        finished = self.finished + [{} for _ in range(len(holders) - len(self.finished))]
        for i, held in enumerate(holders):
            if len(held) == dist.world_size:
                continue
            src = held[0]
            copy = dist.broadcast_object(finished[i] if dist.rank == src else None, src=src)
            if dist.rank not in held:
                finished[i] = copy
            del copy  # a holder's duplicate goes at once (a spectrum's energies can be large)
            for r, gone in enumerate(lost):
                no_copy = lacking.get(r, {}).get(i)  # (why, hint, whether the file is there)
                why = gone[i][0] if i in gone else no_copy[0] if no_copy is not None and no_copy[2] else None
                if why is not None:  # a damaged or deleted file is said, not silently replaced
                    notices.warn(f"{why}; rank {src}'s copy takes its place (written to rank {r}'s file)")
        return finished

    def _recovered(self, rank: int, most: int, holders: list[list[int]]) -> str:
        """What `rank`, whose snapshot is lost, keeps and is given, in words (`most`: the finished datasets; `holders`:
        the ranks that hold each): "it keeps its own copy of dataset 'a', is sent rank 0's copy of dataset 'b' (written
        to its file) and starts dataset 'c' over on its shard"."""
        kept = [i for i in range(most) if rank in holders[i]]
        sent = [i for i in range(most) if rank not in holders[i]]
        parts = ["keeps its own {} of {}".format(*self._copies_of(kept, most))] if kept else []
        if sent:
            sources = sorted({holders[i][0] for i in sent})
            noun, what = self._copies_of(sent, most)
            whose = f"rank {sources[0]}'s {noun}" if len(sources) == 1 else f"{noun} from ranks {', '.join(map(str, sources))}"
            parts.append(f"is sent {whose} of {what} (written to its file{'s' if len(sent) > 1 else ''})")
        parts.append(f"starts dataset {self.dataset_name(most)} over on its shard")
        return "it " + (f"{', '.join(parts[:-1])} and " if len(parts) > 1 else "") + parts[-1]

    def _copies_of(self, indices: list[int], most: int) -> tuple[str, str]:
        """("copy", "the finished dataset"), ("copies", "the 2 finished datasets") (`indices`: all `most` of them), or by
        name: ("copy", "dataset 'a'"), ("copies", "datasets 'a', 'b'")."""
        noun = "copy" if len(indices) == 1 else "copies"
        if len(indices) == most:
            return noun, "the finished dataset" if most == 1 else f"the {most} finished datasets"
        return noun, ("dataset " if len(indices) == 1 else "datasets ") + ", ".join(self.dataset_name(i) for i in indices)

    def resumed_from(self, names: list[str], dist: Any = None) -> str | None:
        """Where this rank continues, in words ("dataset 'b', batch 6 (1 of 3 datasets done)"), or None;
        with `dist` (a DistState of several ranks, every rank calls it) where each rank continues ("rank 0: ...; rank 1: ...")."""
        where = None
        if self.finished or self.batches_done:
            where = f"dataset {names[len(self.finished)]!r}, batch {self.batches_done}"
            where += f" ({len(self.finished)} of {len(names)} datasets done)" if self.finished else ""
        if dist is None or not dist.distributed:
            return where
        views = dist.all_gather_object(where)
        return "; ".join(f"rank {r}: {v}" for r, v in enumerate(views) if v is not None) or None


def piece_path(snapshot: Path, index: int | str, name: str = storage.PARTIAL_FINISHED) -> Path:
    """The file of saved piece `index` of a pass's per-example results beside `snapshot` (`SavedPieces`; "*": a glob of
    them all), `name` before ".safetensors": compute-scores' score pieces are named as a finished dataset's file
    (`DatasetsProgress.finished_path`), spectrum's pieces of the dataset in progress `storage.PARTIAL_PIECE` (beside the files of the
    datasets it finished); every check of a pass's progress files (other ranks' layouts, --overwrite, a finished run's
    leftovers) counts both."""
    return snapshot.with_suffix(name.format(index=index) + snapshot.suffix)


def pieces_of(snapshot: Path, name: str = storage.PARTIAL_FINISHED) -> list[Path]:
    """The pieces (`piece_path`) beside `snapshot`, in order."""
    return list(_finished_files(snapshot, name).values())


def _finished_files(snapshot: Path, name: str = storage.PARTIAL_FINISHED) -> dict[int, Path]:
    """The files of finished datasets beside `snapshot` (whatever each is: a FIFO or folder too), by index; with `name`,
    the pieces of that name (`piece_path`)."""
    glob = piece_path(snapshot, "*", name)
    head, tail = glob.name.split("*")
    found = {p.name[len(head) : len(p.name) - len(tail)]: p for p in glob.parent.glob(glob.name)}
    return dict(sorted((int(index), p) for index, p in found.items() if index.isdigit()))


def _no_usable_copy(index: int, lost: _LostFiles, saved_nothing: dict[int, tuple[str, str]], lacking: _Lacking) -> OutputError:
    """The refusal, the same on every rank, when no rank holds a usable copy of finished dataset `index`'s result
    (`lost`: per rank, the refusal of each of its lost files): the lowest such rank's, who else lost theirs, and why
    each rank whose snapshot is lost (`saved_nothing`: by rank, how) holds none (`lacking`: by such rank, why each
    file it lacks is not a copy)."""
    ranks = [r for r, gone in enumerate(lost) if index in gone]
    message, hint = lost[ranks[0]][index]
    others = ranks[1:]
    notes = [f"rank {others[0]} lost its copy too"] if len(others) == 1 else [f"ranks {', '.join(map(str, others))} lost theirs too"] if others else []
    notes += [f"rank {r}, whose snapshot is {how}, holds none either: {lacking[r][index][0]}" for r, (how, _) in saved_nothing.items()]
    also = f" ({'; '.join(notes)})" if notes else ""
    return OutputError(f"{message}; no other rank holds a usable copy{also}", hint=hint).everywhere()


def _saved_nothing(snapshots: list[tuple[str, str] | None]) -> dict[int, tuple[str, str]]:
    """The ranks that resume as ranks that saved nothing, each with its lost snapshot (`snapshots`: by rank, None when
    it reads, else ("missing" or "unreadable", that in words)); none when every one is missing: no rank saved any
    progress, and all start from the beginning.

    Raises:
        OutputError: (the same on every rank) no snapshot reads and one is unreadable: the lowest such rank's is named,
            and what the others' are.
    """
    lost = {r: snapshot for r, snapshot in enumerate(snapshots) if snapshot is not None}
    if len(lost) < len(snapshots):
        return lost
    unreadable = [r for r, (how, _) in lost.items() if how == "unreadable"]
    if not unreadable:
        return {}
    others = ", ".join(f"rank {r}'s is {how}" for r, (how, _) in lost.items() if r != unreadable[0])
    raise OutputError(
        f"{lost[unreadable[0]][1]}; no other rank holds a snapshot that reads ({others}): the saved progress cannot be continued",
        hint="pass --overwrite to start over",
    ).everywhere()


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, by the rest of their names (which may hold dots: layer names)."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
