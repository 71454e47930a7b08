"""`compute-scores`: pairwise, relative and self influence of training examples, as a command.

The math is in kernel.py (ScoreKernel: preconditioned queries, one GEMM per layer per
training batch). Here: sizing and sharding, resumable passes, ensembles, outputs.

Ensembles (scores.checkpoints, ensemble.py): every model has its own gradients,
factors and damping; each training batch goes through every model and the blocks
are averaged, in one pass over the training set.

Large runs: the score matrix is written as shards by train range (each
[n_query, shard_len]) plus an index; queries are processed in chunks that fit
`scores.max_memory_mb`, each chunk streaming the training range again. A rank scores its
shards one after another (each shard's block is complete, and written, before the next
one's exists: several shards' blocks would not fit the budget), every chunk of queries
against each. The preconditioned queries of every chunk are computed once and kept for
all of a rank's shards when they fit the budget together (`ScoresLayout.keep_queries`) and it
has several shards left to score; otherwise one chunk is in memory at a time, let go before the next is computed, and each
chunk is computed again for each of the rank's shards.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from influence_cli import model_checks, notices, storage
from influence_cli.config import Config, per_token_clashes
from influence_cli.context import RunContext, prepare
from influence_cli.data import IndexedDataset, make_loader
from influence_cli.distributed import DistState, agree
from influence_cli.ensemble import Member, describe_member, ensemble_members, name_member, prepare_member, refuse_same_weights
from influence_cli.errors import ConfigError, ModelError, NumericalError, OutputError, UsageError
from influence_cli.factors import FINITE_CHUNK_ELEMENTS, Factors, LayerFactors
from influence_cli.fit import check_factors_match, load_factors, num_fit_examples
from influence_cli.kernel import ScoreKernel, StoredQueries, build_kernel, safe_norms
from influence_cli.passes import (
    BatchGradients,
    NonFiniteWatch,
    TokenIdCheck,
    accumulator_dtype,
    check_finite,
    check_first_batches,
    check_outputs,
    fan_out,
    index_span,
    inputs_named,
    matmul_dtype,
    model_dtype,
    stream_gradients,
    warn_far_targets,
)
from influence_cli.progress import Progress, for_rank
from influence_cli.reprs import brief_repr
from influence_cli.resume import (
    PassCheckpoint,
    Replaced,
    SavedPieces,
    Snapshot,
    agreed_checks,
    check_rank_layout,
    clear_progress_of_finished,
    progress_files,
    refuse_other_finished_result,
    run_key,
    run_keys,
)
from influence_cli.task import (
    IGNORE_INDEX,
    CustomMeasurement,
    Measurement,
    load_measurement,
    per_example_loss,
    without_counted_position,
)
from influence_cli.tracking import CONV_KINDS, attention_fastpath_off

# ----------------------------------------------------------------------------- sizing and sharding

PER_TOKEN_NOTE_BYTES = 10**9  # per-token parts on disk (n_query × n_train × T) from which compute-scores says their size before it runs


@dataclass
class ShardSpec:
    """One train range written to one file: positions [start, stop) of data.train, scored by `rank`.

    Attributes:
        first_batch: The rank-local batch number of `start` (ranges are batch-aligned).
        num_batches: Batches in the range.
    """

    number: int
    rank: int
    start: int
    stop: int
    first_batch: int
    num_batches: int


def plan_shards(n_train: int, world_size: int, batch_size: int, shard_len: int | None = None) -> list[ShardSpec]:
    """Splits every rank's contiguous train block (DistState.shard) into ranges of `shard_len`.

    `shard_len` must be a multiple of `batch_size` (None = one range per rank), so
    every range starts on a batch boundary of its rank's loader.
    """
    if shard_len is not None and (shard_len <= 0 or shard_len % batch_size):
        raise ValueError(f"shard_len must be a positive multiple of batch_size {batch_size}, got {shard_len}")
    out: list[ShardSpec] = []
    for rank in range(world_size):
        start, stop = rank * n_train // world_size, (rank + 1) * n_train // world_size
        length = (stop - start) if shard_len is None else shard_len
        for c0 in range(start, stop, max(1, length)):
            c1 = min(c0 + length, stop)
            out.append(ShardSpec(len(out), rank, c0, c1, (c0 - start) // batch_size, -(-(c1 - c0) // batch_size)))
    return out


@dataclass
class ScoresLayout:
    """How a pairwise run is split: query chunks × train shards.

    Attributes:
        query_chunks: [(q0, q1)] query positions preconditioned together.
        shards: Every rank's train ranges (numbers are global).
        sharded: Written as shard files plus an index (else one scores file).
        keep_queries: The preconditioned queries of every chunk can be held together (one chunk,
            or all of them within the budget): a rank with several shards left to score computes
            each chunk once for all of them. Otherwise one chunk is held at a time, and computed
            again for each shard.
        summed: With scores.sum_queries, the chunks of queries [(q0, q1)] preconditioned one after another and
            summed into the one row that is scored (`query_chunks` is then [(0, 1)]); None otherwise.
    """

    query_chunks: list[tuple[int, int]]
    shards: list[ShardSpec]
    sharded: bool
    keep_queries: bool = False
    summed: list[tuple[int, int]] | None = None

    @property
    def rows(self) -> int:
        """Rows of the score matrix: the queries, or 1 when they are summed."""
        return 1 if self.summed is not None else (self.query_chunks[-1][1] if self.query_chunks else 0)


def queries_per_chunk(num_params: int, max_memory_mb: float, element_bytes: int = 4, query_chunk: int | None = None) -> int:
    """Queries whose preconditioned gradients ([chunk, num_params], `element_bytes` each) are held at a
    time: scores.query_chunk when set, else as many as scores.max_memory_mb holds (at least 1)."""
    return query_chunk or max(1, int(max_memory_mb * 2**20) // max(1, num_params * element_bytes))


def query_element_bytes(amp: str, model: torch.nn.Module) -> int:
    """Bytes per number of the stored preconditioned queries: the scoring GEMMs' dtype under
    `factors.amp: bfloat16`, else the model's accumulator dtype (kernel.build_kernel's choice; float16 keeps float32)."""
    dtype = accumulator_dtype(model)
    return torch.finfo(matmul_dtype(amp, dtype) or dtype).bits // 8


def query_memory(cfg: Config, model: torch.nn.Module, num_params: int) -> tuple[int, int]:
    """(bytes of one query's preconditioned gradients over `num_params` weights, for every model of the
    ensemble; queries compute-scores preconditions and scores together), as `_run_pairwise` sizes them (for `inspect`)."""
    element_bytes = query_element_bytes(cfg.factors.amp, model)
    numbers = num_params * (1 + len(cfg.scores.checkpoints))
    return numbers * element_bytes, queries_per_chunk(numbers, cfg.scores.max_memory_mb, element_bytes, cfg.scores.query_chunk)


def plan_layout(
    n_query: int,
    n_train: int,
    num_params: int,
    *,
    batch_size: int,
    world_size: int = 1,
    max_memory_mb: float = 1024.0,
    query_chunk: int | None = None,
    element_bytes: int = 4,
    score_bytes: int = 4,
    score_planes: int = 1,
    sum_queries: bool = False,
) -> ScoresLayout:
    """Chunks and shards that keep each in-memory block within `max_memory_mb`.

    The preconditioned query chunk is [chunk, num_params] (`element_bytes` each) and the score
    block [n_query, shard_len] (`score_bytes` each: float32, or float64 for a float64 model) times
    `score_planes` (1, or 1 + L with each layer's part, scores.by_layer); each one fits the budget
    on its own.
    Each chunk streams each train range once. `keep_queries`: the query gradients are one chunk,
    or every chunk's fit the budget together (a scores.query_chunk below what the budget holds),
    so a rank with several ranges to score computes each chunk once for all of them; otherwise
    one chunk is held at a time and computed once per range.

    `sum_queries` (scores.sum_queries): the chunks are preconditioned one after another and summed into one
    row (`ScoresLayout.summed`), the score block is [1, shard_len], and each train range is streamed once.
    """
    budget = int(max_memory_mb * 2**20)
    chunk = max(1, min(queries_per_chunk(num_params, max_memory_mb, element_bytes, query_chunk), n_query))
    chunks = [(q0, min(q0 + chunk, n_query)) for q0 in range(0, n_query, chunk)]
    rows = 1 if sum_queries else n_query
    fits = rows * n_train * score_bytes * score_planes <= budget
    shard_len = None
    if not fits:
        per_shard = budget // (rows * score_bytes * score_planes)
        shard_len = max(batch_size, per_shard // batch_size * batch_size)
    shards = plan_shards(n_train, world_size, batch_size, shard_len)
    if sum_queries:  # the summed row is P numbers per model: held for every range
        return ScoresLayout([(0, 1)], shards, sharded=world_size > 1 or not fits, keep_queries=True, summed=chunks)
    keep = len(chunks) == 1 or queries_per_chunk(num_params, max_memory_mb, element_bytes) >= n_query
    return ScoresLayout(chunks, shards, sharded=world_size > 1 or not fits, keep_queries=keep)


# ----------------------------------------------------------------------------- the command


@dataclass
class ScoresReport:
    """The outcome of compute-scores.

    Attributes:
        kind: "pairwise" or "self".
        paths: Files written (the scores file, or the index and its shards; the self-influence file).
        n_query: Queries scored (0 for self-influence).
        n_train: Training examples scored.
        sharded: Written as shards plus an index.
        num_shards: Shard files (1 when not sharded).
        query_chunks: Times the training set was streamed per train range.
        damping: {layer: λ}.
        seconds: Wall time per phase.
        examples_per_second: Training examples scored against every query per second of the scoring
            passes (all ranks together).
        layer_params: {layer: parameters (d_out × d_in, bias included)}.
        by_layer: The layers whose parts of the scores were stored too (scores.by_layer), in their
            order; None without them.
        queries_summed: With scores.sum_queries, the queries of data.query summed into the one row of
            the scores (`n_query` is then 1); None without.
        per_token: T, when each training position's part of the scores was stored too
            (scores.per_token, `scores_per_token` [n_query, n_train, T]); None without.
    """

    __repr__ = brief_repr

    kind: str
    paths: list[Path]
    n_query: int
    n_train: int
    sharded: bool
    num_shards: int
    query_chunks: int
    relative: bool
    strategy: str
    measurement: str
    damping: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    examples_per_second: float = 0.0
    resumed_from: str | None = None
    layer_params: dict[str, int] = field(default_factory=dict)
    members: int = 1  # models averaged over (ensemble.py): 1 + len(scores.checkpoints)
    by_layer: list[str] | None = None
    queries_summed: int | None = None
    per_token: int | None = None  # T, the positions of each example whose parts were stored too (scores.per_token); None without


def _members_key(common: dict[str, Any]) -> dict[str, Any]:
    """The ensemble's part of a run key: every extra member's model and factors (nothing for one model)."""
    if "members" not in common:
        return {}
    return {"members": [(m["model_fingerprint"], m["factors"].get("created"), m["damping"]) for m in common["members"]]}


def _by_layer(scorer: _Scorer) -> dict[str, Any]:
    """What the per-layer parts add to an output's metadata and to its result: {"by_layer": [their layers, in
    order]} (storage.BY_LAYER); nothing without them, so that a run without keeps the keys it always had."""
    return {} if scorer.by_layer is None else {storage.BY_LAYER: list(scorer.by_layer)}


def _per_token(scorer: _Scorer) -> dict[str, Any]:
    """What the per-token parts add to a pairwise output's metadata and result: {"per_token": T}; nothing without them."""
    return {} if scorer.per_token is None else {storage.PER_TOKEN: scorer.per_token}


def _finished_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a finished scores file or index ({} when absent, or an index that records none).

    Raises:
        OutputError: the file cannot be read (no permission: not taken for scores of other settings), or is damaged.
    """
    if not path.exists():
        return {}
    if path.suffix == ".json":
        data = storage.load_json(path, "scores index", "rerun compute-scores with --overwrite")
        try:
            return dict(data.get("metadata", {}))
        except (ValueError, TypeError, AttributeError):
            return {}
    return storage.read_metadata(path)


def _finished_files(path: Path) -> tuple[list[Path], int]:
    """(every file of a finished scores output, its number of shards): the single file, or the
    index with the shards it lists."""
    if path.suffix != ".json":
        return [path], 1
    data = storage.load_json(path, "scores index", "rerun compute-scores with --overwrite")
    try:
        shards = data["shards"]
        return [path, *(path.parent / s["file"] for s in shards)], len(shards)
    except (KeyError, TypeError) as exc:
        raise OutputError(f"{str(path)!r} is not a readable scores index ({exc})", hint="rerun compute-scores with --overwrite") from None


def _load_layers(ctx: RunContext, train: IndexedDataset, member: Member) -> tuple[dict[str, LayerFactors], dict[str, Any]]:
    """The curvature of every tracked layer (none for `identity`) of one ensemble member and what describes its file."""
    cfg = ctx.cfg
    if cfg.factors.strategy == "identity":
        return {tm.name: LayerFactors(tm.name) for tm in ctx.tracked}, {"strategy": "identity", "file": None}
    path = member.factors_path
    if member.index and not path.is_file():
        interrupted = progress_files(path.parent, storage.FACTORS_PARTIAL)
        raise OutputError(
            f"{member.key}: no factors at {str(path)!r} for this ensemble member",
            hint="fit-factors was interrupted in this model: rerun it with --resume to finish every model"
            if interrupted
            else "run `influence fit-factors` with this config and --resume: it fits the factors of every checkpoint in "
            "scores.checkpoints that has none",
        )

    def match(factors: Factors) -> None:
        try:
            check_factors_match(factors, ctx, path, train, num_fit_examples(cfg, len(train)), same_fit=True, same_kind=True)
        except OutputError as exc:
            if member.index:  # say which listed checkpoint the factors do not match
                name_member(exc, member, cfg)
            raise

    # matched first (metadata only), then read as build_kernel wants them (no second copy), checked to be finite
    factors = load_factors(path, ctx.device, accumulator_dtype(ctx.model), match=match)
    meta = factors.metadata
    stat = path.stat()
    info = {
        "file": str(path.relative_to(cfg.output_path)) if path.is_relative_to(cfg.output_path) else str(path),
        "created": meta.get("created"),
        "result_key": meta.get("result_key"),  # what the factors are of (top-k compares it with the factors now in their folder)
        "bytes": stat.st_size,
        "strategy": factors.strategy,
        "fisher": factors.fisher,
        "num_examples": meta.get("num_examples"),
        "dataset_fingerprint": meta.get("dataset_fingerprint"),
        "tool_version": meta.get("tool_version"),
    }
    return factors.layers, info


def _rows(batches: Iterable[tuple[torch.Tensor, ...]], skip: int, take: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The `take` examples after the first `skip` of a stream of (x, y, index) batches."""
    for x, y, idx in batches:
        if take <= 0:
            return
        if skip:
            if skip >= len(idx):
                skip -= len(idx)
                continue
            x, y, idx = x[skip:], y[skip:], idx[skip:]
            skip = 0
        if len(idx) > take:
            x, y, idx = x[:take], y[:take], idx[:take]
        take -= len(idx)
        yield x, y, idx


def _known_labels(train: IndexedDataset, start: int, stop: int, device: torch.device) -> torch.Tensor | None:
    """Labels of train positions [start, stop) when the dataset knows them without loading examples."""
    return None if train.labels is None else train.labels[start:stop].to(device)


def _collect(labels: torch.Tensor | None, length: int, c0: int, targets: torch.Tensor) -> torch.Tensor:
    """Writes a batch's targets into a label buffer of `length` rows (allocated on first use)."""
    if labels is None:
        labels = torch.zeros((length, *targets.shape[1:]), dtype=targets.dtype, device=targets.device)
    labels[c0 : c0 + len(targets)] = targets
    return labels


@dataclass
class _ScoringMember:
    """One model of the ensemble (the only one without scores.checkpoints): its context and kernel.

    `checked`: the batches the model passed the first-batch model checks on (`stream_gradients`), shared
    by the passes of the command, so a query chunk or train shard streamed again is not checked again.
    """

    ctx: RunContext
    kernel: ScoreKernel
    member: Member
    checked: set[tuple[Any, ...]] = field(default_factory=set)


@dataclass
class _MembersWatch:
    """One NonFiniteWatch per model of the ensemble, so that a non-finite pass names the model it came from
    (its key and checkpoint; a model alone is not named)."""

    watches: list[NonFiniteWatch]
    members: list[_ScoringMember]

    def observe(self, batches: list[BatchGradients]) -> None:
        for watch, batch in zip(self.watches, batches, strict=True):
            watch.observe(batch)

    def check(self, what: str) -> None:
        for watch, m in zip(self.watches, self.members, strict=True):
            try:
                watch.check(what)
            except NumericalError as exc:
                if len(self.members) > 1:
                    name_member(exc, m.member, m.ctx.cfg)
                raise


def _member_mean(values: list[torch.Tensor]) -> torch.Tensor:
    """The mean over an ensemble's members of one per-example value each ([B] or [L, B]); one member's as is."""
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)


class _Scorer:
    """One run of compute-scores on this rank: the models, their kernels, the datasets and the passes.

    With an ensemble (ensemble.py), every batch of examples is run through every member
    (`member_batches`) and the members' scores are averaged (`pairwise`, `self_influence`).
    `ctx` and `kernel` are member 0's (model.checkpoint). `by_layer`: the layers whose parts
    are scored too (scores.by_layer), in their order; None without. `measurement`: task.measurement,
    its package.module:function imported (load_measurement).
    """

    def __init__(
        self,
        members: list[_ScoringMember],
        train: IndexedDataset,
        progress: Progress,
        by_layer: list[str] | None = None,
        measurement: Measurement = "loss",
        per_token: int | None = None,
    ) -> None:
        self.members = members
        self.per_token = per_token
        self.measurement = measurement
        self.by_layer = by_layer
        self.ctx = members[0].ctx
        self.cfg = self.ctx.cfg
        self.kernel = members[0].kernel
        self.train = train
        self.progress = progress
        self.dtype = accumulator_dtype(self.ctx.model)
        self.bs = self.cfg.data.batch_size

    def loader(self, dataset: IndexedDataset, start_batch: int = 0):
        """Every example of `dataset` (not sharded by rank), from `start_batch` on."""
        return make_loader(
            dataset,
            self.bs,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            shard=(0, 1),
            start_batch=start_batch,
        )

    def stream(self, batches, *, mode: str, start_batch: int, name: str, member: _ScoringMember | None = None) -> Iterator[BatchGradients]:
        member = member or self.members[0]
        ctx = member.ctx
        return stream_gradients(
            ctx.model,
            ctx.tracked,
            batches,
            task_kind=self.cfg.task.kind,
            mode=mode,
            measurement=self.measurement,
            seed=self.cfg.seed,
            device=self.ctx.device,
            amp=self.cfg.factors.amp,
            start_batch=start_batch,
            dataset_name=name,
            padding_value=self.cfg.data.padding_value,
            checked=member.checked,
        )

    def member_batches(self, batches, *, mode: str, start_batch: int, name: str) -> Iterator[list[BatchGradients]]:
        """Each batch of (inputs, targets, indices) through every member: [BatchGradients per member].

        One stream per member over a shared iterator (`fan_out`, which holds one batch while the
        members take it in turn), so each member's first-batch checks run once.
        """
        copies = fan_out(batches, len(self.members))
        streams = [self.stream(it, mode=mode, start_batch=start_batch, name=name, member=m) for m, it in zip(self.members, copies, strict=True)]
        for per_member in zip(*streams, strict=True):
            yield list(per_member)

    def train_batches(self, shard: ShardSpec, skip_batches: int) -> Iterator[list[BatchGradients]]:
        """This rank's batches of one train range, from its `skip_batches`-th batch on (one per member)."""
        first = shard.first_batch + skip_batches
        batches = itertools.islice(self.ctx.batches(self.train, start_batch=first), shard.num_batches - skip_batches)
        return self.member_batches(batches, mode="loss", start_batch=first, name="data.train")

    def query_batches(self, queries: IndexedDataset, q0: int, q1: int) -> Iterator[list[BatchGradients]]:
        """The gradients of the query measurement at query positions [q0, q1), batch by batch (one per member)."""
        batches = _rows(self.loader(queries, start_batch=q0 // self.bs), q0 % self.bs, q1 - q0)
        return self.member_batches(batches, mode="measurement", start_batch=q0 // self.bs, name="data.query")

    def check_first_batches(
        self, shard: ShardSpec | None, skip: int, queries: IndexedDataset | None = None, chunk: tuple[int, int] = (0, 0)
    ) -> None:
        """Before any pass, every rank at the same point: the first batch of the query gradients (`queries` at the
        positions `chunk`) and of this rank's first training pass (`shard` from its `skip`-th batch; None where it scores
        none), through every member, as the passes take them (`passes.check_first_batches`): an error every rank meets
        there (data that does not fit the model, the model checks) is said once. The passes do not check them again."""
        streams = [] if queries is None else [lambda: self.query_batches(queries, *chunk)]
        streams.append((lambda: iter(())) if shard is None else (lambda: self._positions_checked(self.train_batches(shard, skip))))
        check_first_batches(streams, self.ctx.state)

    def _positions_checked(self, batches: Iterator[list[BatchGradients]]) -> Iterator[list[BatchGradients]]:
        """`batches`, each one's tracked layers checked first to be at data.train's T positions (scores.per_token), so that
        a pooled head is refused at the first batch, before --overwrite removes the old scores.

        Raises:
            ModelError: a tracked layer whose positions are not data.train's T (a pooled head, a layer
                called twice), whose parts would not be the tokens'.
        """
        with contextlib.closing(batches):  # closed with this generator: its loader let go of
            for members in batches:
                for name, a in members[0].activations.items():
                    if self.per_token is not None and a.shape[1] != self.per_token:
                        raise ModelError(
                            f"scores.per_token: layer {name!r} sees {a.shape[1]} position{'s' if a.shape[1] != 1 else ''} per example, "
                            f"data.train's inputs have {self.per_token}: per-token scores need every tracked layer at the inputs' positions",
                            hint=f"leave {name!r} out of factors.modules (and refit), or set scores.per_token: false",
                        )
                yield members

    def pairwise(
        self, queries: list[StoredQueries], batches: list[BatchGradients], norms: torch.Tensor | None, c0: int, first: bool
    ) -> torch.Tensor:
        """The [Q, B] block of one training batch, averaged over the members; with `by_layer`, its
        parts per layer instead, [L, Q, B], which sum to it.

        RelatIF (`norms` [M, width] given): each member's scores are divided by its own
        ‖(F_m + λ_m)⁻¹∇L_m(x)‖, computed into `norms` on the `first` query chunk (its parts too,
        by the same norm).
        """
        total: torch.Tensor | None = None
        n = len(batches[0].global_indices)
        for m, (member, vq, batch) in enumerate(zip(self.members, queries, batches, strict=True)):
            kernel, grads = member.kernel, member.kernel.gradients(batch)
            s = kernel.pairwise(vq, grads) if self.by_layer is None else kernel.pairwise_by_layer(vq, grads, self.by_layer)
            if norms is not None:
                if first:
                    norms[m, c0 : c0 + n] = member.kernel.norms(batch)
                s = s / safe_norms(norms[m, c0 : c0 + n])
            total = s if total is None else total.add_(s)
        assert total is not None
        return total if len(self.members) == 1 else total.div_(len(self.members))

    def pairwise_per_token(self, queries: list[StoredQueries], batches: list[BatchGradients]) -> torch.Tensor:
        """The [Q, B, T] per-position parts of one training batch's scores (one model: per_token refuses ensembles;
        its layers' positions checked at the first batch, `check_first_batches`)."""
        return self.members[0].kernel.pairwise_per_token(queries[0], batches[0])

    def self_influence(self, batches: list[BatchGradients]) -> torch.Tensor:
        """∇L(x)ᵀ (F + λ)⁻¹ ∇L(x) of one training batch, averaged over the members: [B]; with
        `by_layer`, its parts per layer instead, [L, B] in float64 (their sum is the value)."""
        values = [
            m.kernel.self_influence(b) if self.by_layer is None else m.kernel.self_influence_by_layer(b, self.by_layer)
            for m, b in zip(self.members, batches, strict=True)
        ]
        return _member_mean(values)

    def losses(self, batches: list[BatchGradients]) -> torch.Tensor:
        """Each example's training loss L(x) (task.per_example_loss at its real target, from the outputs the
        self-influence pass already ran), averaged over the members like the self-influence: [B]."""
        kind = self.cfg.task.kind
        return _member_mean([per_example_loss(b.outputs, b.targets, kind) for b in batches])

    def watch(self, unwritten: str) -> _MembersWatch:
        """A NonFiniteWatch per member, for one pass (`unwritten`: what its error's hint says was not written)."""
        return _MembersWatch([NonFiniteWatch(self.ctx.device, unwritten, self.cfg.factors.amp) for _ in self.members], self.members)

    @torch.no_grad()
    def query_info(self, queries: IndexedDataset) -> dict[str, torch.Tensor]:
        """query_indices [Q], query_labels [Q, ...] and query_predictions (arg-max over the last dim, or the outputs for regression)."""
        return agree(self.ctx.state, lambda: self._query_info(queries))  # every rank, before its shards: a refusal all meet is said once

    def _query_info(self, queries: IndexedDataset) -> dict[str, torch.Tensor]:
        labels, preds = [], []
        model = self.ctx.model
        dtype = model_dtype(model)
        check_ids = TokenIdCheck(model, self.ctx.device)
        for offset, (x, y, idx) in enumerate(self.loader(queries)):
            check_ids(x, idx, queries.name, self.cfg.data.padding_value)
            x = x.to(self.ctx.device)
            if x.is_floating_point():
                x = x.to(dtype)
            with inputs_named(x, idx, queries.name, first=offset == 0), attention_fastpath_off():
                out = model(x)  # in the model's dtype, not under factors.amp: predictions are shown as they are
            model_checks.check_model_output(out, x.shape[0])
            check_outputs(out, y, idx, self.cfg.task.kind, queries.name)  # labels the model cannot have, NaN outputs:
            check_finite(out, [], idx, offset, queries.name)  # said here, where every rank meets them alike
            if offset == 0 and self.cfg.task.kind == "regression":
                warn_far_targets(out, y, queries.name)
            pred = out.cpu() if self.cfg.task.kind == "regression" else out.argmax(-1).cpu()
            if self.cfg.task.kind == "regression" and pred.shape != y.shape and pred.numel() == y.numel():
                pred = pred.reshape(y.shape)  # [B] targets of a one-output model: a number per query, like its label
            if self.cfg.task.kind == "language_modeling" and y.shape == pred.shape:  # no prediction where no loss counts
                pred = pred.masked_fill(y == IGNORE_INDEX, IGNORE_INDEX)
            preds.append(pred)
            labels.append(y)
        return {
            "query_indices": queries.global_indices.clone(),
            "query_labels": torch.cat(labels),
            "query_predictions": torch.cat(preds),
        }

    def precondition(self, queries: IndexedDataset, q0: int, q1: int, title: str, summed: bool = False) -> list[StoredQueries]:
        """Per member, {layer: (F + λ)⁻¹ ∇(measurement) [q1 - q0, P]} for query positions [q0, q1)
        (layers without positions: in column blocks, ScoreKernel.store_queries); `summed`: for the row of
        scores.sum_queries (what the warning of queries with a zero gradient says of them). Under torchrun each
        rank says its own errors here: ranks reach a chunk at different times, and one that stayed
        silent could leave before rank 0 got there to say it."""
        outs: list[StoredQueries] = [{} for _ in self.members]
        watch = self.watch("no scores were written")
        self.progress.start(title, q1 - q0)
        row, zero_gradient = 0, []
        for per_member in self.query_batches(queries, q0, q1):
            n = len(per_member[0].global_indices)
            for member, out, batch in zip(self.members, outs, per_member, strict=True):
                member.kernel.store_queries(out, row, q1 - q0, batch)
            watch.observe(per_member)
            zero_gradient += _zero_gradient_indices(per_member[0])
            row += n
            self.progress.advance(n)
        self.progress.stop()
        watch.check("query gradient")
        if zero_gradient:
            cause = (
                f"task.measurement: {self.measurement} does not change with the outputs of those queries (a value of the targets "
                "alone, a clamp or a constant branch), or saturated outputs"
                if isinstance(self.measurement, CustomMeasurement)
                else "saturated outputs are the usual cause"
            )
            notices.warn(
                f"data.query: the gradient of the query {self.cfg.task.measurement} is exactly 0 for {len(zero_gradient)} of {q1 - q0} queries "
                f"(global indices {index_span(zero_gradient)}), so {'they add nothing to the summed scores' if summed else 'their scores are all 0'}; "
                f"{cause}, such as 8-bit inputs without transform.scale: 255"
            )
        return outs


def _zero_gradient_indices(batch: BatchGradients) -> list[int]:
    """Global indices of the batch's examples whose gradient is exactly 0 in every tracked layer (one host sync);
    not language-model examples without a counted position (labels all -100), which the pass warned about."""
    if not batch.gradients or not batch.gradients[0]:
        return []
    zero = torch.stack([g.flatten(1).abs().amax(1) == 0 for g in batch.gradients[0].values()]).all(0)
    y = batch.targets
    if not y.is_floating_point() and y.dim() > 1:
        zero &= ~without_counted_position(y).to(zero.device)
    return batch.global_indices[zero.to(batch.global_indices.device)].tolist()


def _check_storable(block: torch.Tensor, dtype: str, what: str = "scores", layers: list[str] | None = None) -> None:
    """Refuses to store non-finite scores, or scores that overflow the storage dtype (float16 tops out at 65504).

    `layers`: the block holds per-layer parts ([L, ...], their names): its first axis is named as
    the layer, and an all-zero block is not warned about again (its total was)."""
    if not block.numel():
        return
    low, high = torch.aminmax(block)  # no temporary of the block's size (|block| was one); NaN when any score is NaN
    peak = max(abs(float(low)), abs(float(high)))
    if not math.isfinite(peak):
        first = [int(i) for i in torch.nonzero(~torch.isfinite(block))[0]]
        layer = "" if layers is None else f"layer {layers[first.pop(0)]!r}, "
        where = (
            f"query row {first[0]}, training position {first[1]}" + (f", position {first[2]} of its sequence" if len(first) == 3 else "")
            if len(first) >= 2
            else f"training position {first[0]}"
        )
        raise NumericalError(
            f"{what}: non-finite values ({layer}{where})",
            hint="check the factors (`influence info`: NaN/Inf, or eigenvalues near 0) and set a larger scores.damping (a number)",
        )
    if peak == 0.0 and block.numel() > 1 and layers is None:
        notices.warn(
            f"{what}: every value of a block is exactly 0: the gradients are 0 (a model whose loss is "
            "saturated) or the damping is so large that (F + λ)⁻¹ rounds them away; rankings of zeros mean nothing",
            per_rank=True,
        )
    limit = torch.finfo(getattr(torch, dtype)).max
    if peak > limit:
        layer = "" if layers is None else f"layer {layers[int(block.abs().flatten(1).amax(1).argmax())]!r}, "
        raise NumericalError(  # parts can pass the limit where the scores they sum to do not (layers pulling both ways)
            f"scores.dtype: {dtype} cannot hold {what} up to {peak:.3g} ({layer}its max is {limit:.3g})",
            hint="set scores.dtype: float32 (or bfloat16) and rerun with --overwrite",
        )
    smallest = torch.finfo(getattr(torch, dtype)).tiny  # float16's subnormals keep fewer digits (0 at 6e-8)
    if dtype == "float16" and _any_below(block, smallest):
        notices.warn(
            f"scores.dtype: float16 stores scores below {smallest:.2g} in magnitude with fewer significant digits (some "
            "are that small); scores.dtype: bfloat16 keeps float32's range",
            per_rank=True,
        )


def _any_below(block: torch.Tensor, smallest: float) -> bool:
    """Whether a value of `block` other than 0 is smaller than `smallest` in magnitude, tested a few MB at a time
    (`factors.FINITE_CHUNK_ELEMENTS`): the masks of the whole block would be 2.5 times its size again."""
    flat = block.view(-1) if block.is_contiguous() else block
    rows = max(1, FINITE_CHUNK_ELEMENTS // max(1, flat[0].numel()))
    found = torch.zeros((), dtype=torch.bool, device=block.device)
    for part in flat.split(rows):
        found |= ((part != 0) & (part.abs() < smallest)).any()
    return bool(found)


def _snapshot_phase(snapshot: Snapshot | None, prefix: str) -> list[int] | None:
    if snapshot is None or not snapshot.phase.startswith(prefix):
        return None
    return [int(p) for p in snapshot.phase[len(prefix) :].split(":") if p]


def _check_query_set(cfg: Config, arguments: dict[str, Any]) -> None:
    """A pairwise run's queries are set: a config without data.query is refused for that before any output
    or factors are looked at (`storage.guards_output_dir`'s checks)."""
    if not arguments.get("self_influence") and cfg.data.query is None:
        raise ConfigError(
            "data.query: missing (the queries compute-scores scores against data.train)",
            source=cfg.source,
            hint="add a data.query block with a source: key, or pass --self for the self-influence of data.train",
        )


@storage.guards_output_dir(lambda kw: "self_influence" if kw.get("self_influence") else "scores", reads="factors", checks=_check_query_set)
def compute_scores(
    cfg: Config,
    *,
    overwrite: bool = False,
    resume: bool = False,
    self_influence: bool = False,
    relative: bool | None = None,
    by_layer: bool | None = None,
    sum_queries: bool | None = None,
    per_token: bool | None = None,
    state: DistState | None = None,
    progress: Progress | None = None,
) -> ScoresReport:
    """Scores data.query against data.train (or every training example against itself) and writes the result.

    Pairwise: `<output_dir>/scores.safetensors` with `scores` [n_query, n_train], or,
    when that exceeds `scores.max_memory_mb` or under torchrun, shard files by train
    range plus `scores.index.json`. Self-influence (`self_influence=True`):
    `<output_dir>/self_influence.safetensors` with `self_influence` [n_train], and beside it, from the
    same forward, `train_losses` [n_train] (each example's loss at its label, averaged over an
    ensemble's models) and a classifier's `train_predictions` [n_train].

    Args:
        relative: RelatIF scores (None = `scores.relative` of the config); not with `self_influence`.
        by_layer: Also store each tracked layer's part of the scores (None = `scores.by_layer`):
            `scores_by_layer` [L, n_query, n_train] (in each shard, its train range), or with
            `self_influence` `self_influence_by_layer` [L, n_train], the layers named in order by
            the metadata's `by_layer`; the parts sum to the scores.
        sum_queries: Sum the scores over every query (None = `scores.sum_queries`): `scores` [1, n_train],
            Σ_q I(q, x), from the query gradients preconditioned chunk by chunk and summed into one row, and one
            pass over the training set; the metadata records `sum_queries` and `queries_summed` (the number of
            queries). Not with `self_influence`.
        per_token: Also store each training position's part of the scores (None = `scores.per_token`, which
            `self_influence` leaves aside as it does `scores.relative`):
            `scores_per_token` [n_query, n_train, T] (in each shard, its train range), T data.train's
            sequence length (the metadata's `per_token`), padding positions 0; the parts sum over T to
            the scores. Only for Linear layers all at the inputs' positions; not with `self_influence`,
            `relative`, `by_layer` or scores.checkpoints.

    Raises:
        ConfigError: no data.query (without `self_influence`), before any file is looked at; a
            package.module:function of task.measurement that does not import, or whose values are not
            one finite number per query with a gradient to the outputs (NumericalError where not finite).
        OutputError: factors missing or fitted for another model, layers or training set;
            finished scores exist (without `overwrite`); leftover progress without
            `resume`/`overwrite`.
        NumericalError: a non-finite loss or gradient (names the batch and examples), or factors
            holding NaN/Inf (names the tensor).
    """
    t_start = time.perf_counter()
    if self_influence and relative is not None:
        raise UsageError("--relative/--no-relative: not used with --self (self-influence is ∇L(x)ᵀ(F+λ)⁻¹∇L(x), one number per example)")
    if self_influence and sum_queries is not None:
        raise UsageError("--sum-queries/--no-sum-queries: not used with --self (self-influence has no queries to sum)")
    measurement = "loss" if self_influence else load_measurement(cfg.task.measurement, cfg.base_dir)  # the user's function imported before any pass
    ctx = prepare(cfg, state)
    out_dir = cfg.output_path
    storage.ensure_writable_dir(out_dir)
    relative = cfg.scores.relative if relative is None else relative
    by_layer = cfg.scores.by_layer if by_layer is None else by_layer
    sum_queries = cfg.scores.sum_queries if sum_queries is None else sum_queries
    per_token = (cfg.scores.per_token and not self_influence) if per_token is None else per_token  # a pairwise setting, as relative is
    if per_token:
        _check_per_token(cfg, self_influence, relative, by_layer)
    progress = for_rank(progress, ctx.state.rank, ctx.state.world_size)
    train = ctx.dataset(cfg.data.train, "data.train")
    positions = _token_positions(ctx, train) if per_token else None  # refused before any factors are read
    members: list[_ScoringMember] = []
    described: list[dict[str, Any]] = []
    weights: list[tuple[str, str]] = []
    for member in ensemble_members(cfg):  # model.checkpoint, then scores.checkpoints (each with its own factors)
        mctx = ctx if member.index == 0 else prepare_member(cfg, member, ctx.state)
        weights.append((member.key, mctx.model_fingerprint))
        refuse_same_weights(weights, cfg.source)  # before its factors: those of a copy would match it
        layers, factors_info = _load_layers(mctx, train, member)  # checked to be finite, in the kernel's device and dtype
        s = cfg.scores
        kernel = build_kernel(mctx.model, layers, s.damping, s.damping_factor, mctx.device, s.damping_scope, cfg.factors.amp, per_token)
        members.append(_ScoringMember(mctx, kernel, member))
        described.append(describe_member(member, mctx) | {"factors": factors_info, "damping": kernel.damping})
    scorer = _Scorer(
        members, train, progress, by_layer=list(members[0].kernel.layers) if by_layer else None, measurement=measurement, per_token=positions
    )
    seconds = {"setup": time.perf_counter() - t_start}
    common = {
        **ctx.provenance(_flag_settings(cfg, self_influence, by_layer, relative, sum_queries, per_token)),
        "strategy": cfg.factors.strategy,
        "fisher": cfg.factors.fisher,
        "task_kind": cfg.task.kind,
        "padding_value": cfg.data.padding_value,
        "damping": described[0]["damping"],
        "damping_setting": cfg.scores.damping,
        "damping_factor": cfg.scores.damping_factor,
        "damping_scope": cfg.scores.damping_scope,
        "model_fingerprint": ctx.model_fingerprint,
        "model_definition": ctx.model_definition,
        "train_fingerprint": train.fingerprint(),
        "train_parts": train.fingerprint_parts(),  # what top-k names as changed (data_change)
        "factors": described[0]["factors"],
        "modules": [tm.name for tm in ctx.tracked],
    }
    if len(members) > 1:
        common["members"] = described  # fingerprints, factors and damping of every model averaged over
    if self_influence:
        return _run_self(scorer, common, overwrite, resume, seconds)
    return _run_pairwise(scorer, common, relative, overwrite, resume, seconds, sum_queries)


def _flag_settings(cfg: Config, self_influence: bool, by_layer: bool, relative: bool, sum_queries: bool, per_token: bool) -> dict[str, object]:
    """The scores settings that compute-scores' flags may set (--by-layer, --relative, --sum-queries, --per-token), as the
    effective config of its outputs records them: a self-influence run's by_layer alone; scores.per_token only where
    the run or the config sets it (a run without keeps the keys it always had)."""
    if self_influence:
        return {"scores.by_layer": by_layer}
    flags: dict[str, object] = {"scores.by_layer": by_layer, "scores.relative": relative, "scores.sum_queries": sum_queries}
    if per_token or cfg.scores.per_token:
        flags["scores.per_token"] = per_token
    return flags


def _check_per_token(cfg: Config, self_influence: bool, relative: bool, by_layer: bool) -> None:
    """Refuses per-token scores with what they do not combine with, in one line naming the keys and flags."""
    if self_influence:
        raise UsageError("--per-token (scores.per_token): not with --self (per-token parts are of pairwise scores)", hint="leave out one of them")
    flags = {"relative": " (--relative)", "by_layer": " (--by-layer)"}
    clash = [f"scores.{key}{flags.get(key, '')}" for key in per_token_clashes(relative, by_layer, cfg.scores.checkpoints)]
    if clash:
        raise ConfigError(
            f"scores.per_token (--per-token): not available with {' or '.join(clash)}",
            source=cfg.source,
            hint="score per token without them, or leave out --per-token (scores.per_token: false)",
        )


def _token_positions(ctx: RunContext, train: IndexedDataset) -> int:
    """T, the positions of data.train's examples that per-token scores split each score into: the length of
    token ids [T] or of features [T, F]; every tracked layer must be a Linear layer (checked again at the
    first training batch for being at those positions, `_Scorer._positions_checked`).

    Raises:
        ConfigError: a convolution among the tracked layers, or inputs without positions.
    """
    cfg = ctx.cfg
    conv = [tm for tm in ctx.tracked if tm.kind in CONV_KINDS]
    if conv:
        raise ConfigError(
            f"scores.per_token: layer {conv[0].name!r} is a {type(conv[0].module).__name__}, whose positions are patches, not tokens; "
            "per-token scores need Linear layers over the inputs' positions",
            source=cfg.source,
            hint="set scores.per_token: false, or track only Linear layers (factors.modules) and refit",
        )
    if not len(train):
        raise ConfigError("scores.per_token: data.train holds no examples", source=cfg.source)
    x = train[0][0]
    tokens = not x.is_floating_point() and x.dim() == 1
    if not (tokens or (x.is_floating_point() and x.dim() == 2)):
        raise ConfigError(
            f"scores.per_token: data.train's inputs of shape {list(x.shape)} ({str(x.dtype).removeprefix('torch.')}) have no positions; "
            "per-token scores need token ids [seq] or features [seq, features] per example",
            source=cfg.source,
            hint="set scores.per_token: false",
        )
    return int(x.shape[0])


def _run_pairwise(
    scorer: _Scorer, common: dict[str, Any], relative: bool, overwrite: bool, resume: bool, seconds: dict[str, float], sum_queries: bool = False
) -> ScoresReport:
    ctx, cfg, train = scorer.ctx, scorer.cfg, scorer.train
    st = ctx.state
    out_dir = cfg.output_path
    queries = ctx.dataset(cfg.data.query, "data.query")
    n_members = len(scorer.members)
    n_q, n_t = len(queries), len(train)
    element_bytes = query_element_bytes(cfg.factors.amp, ctx.model)  # the stored queries' dtype (bf16 with factors.amp: bfloat16)
    query_numbers = sum(tm.num_params for tm in ctx.tracked) * n_members  # every member's preconditioned gradients of one query
    layout = plan_layout(
        n_q,
        n_t,
        query_numbers,
        batch_size=scorer.bs,
        world_size=st.world_size,
        max_memory_mb=cfg.scores.max_memory_mb,
        query_chunk=cfg.scores.query_chunk,
        element_bytes=element_bytes,
        score_bytes=8 if scorer.dtype == torch.float64 else 4,  # the score block's dtype
        score_planes=1 + len(scorer.by_layer or ()) + (scorer.per_token or 0),  # each layer's or position's part beside the total
        sum_queries=sum_queries,
    )
    summed = n_q if sum_queries else None  # the queries summed into the one row of the scores
    chunk = max(q1 - q0 for q0, q1 in layout.query_chunks)
    streamed_with = n_q if sum_queries else chunk  # summed: every query is preconditioned once for the one pass
    for member in scorer.members:  # each chunk of queries is streamed against this rank's share of the training set
        member.kernel.plan(streamed_with, -(-n_t // st.world_size))
    single, index = out_dir / storage.SCORES_FILE, out_dir / storage.SCORES_INDEX
    metadata, result, settings = _pairwise_keys(scorer, common, queries, layout, relative)
    paths = ([index] + [out_dir / storage.SCORES_SHARD.format(shard=s.number) for s in layout.shards]) if layout.sharded else [single]
    recorded: dict[Path, dict[str, Any]] = {}  # for --resume: the metadata of each finished output ({} where there is none)
    if resume and not overwrite:  # a file that holds no scores is refused as what it is, before it is read as scores
        storage.check_can_write(single, False, "scores", "output_dir", storage.SCORES_FORMAT, resume=True)
        storage.check_can_write(index, False, "scores", "output_dir", resume=True)  # a FIFO: never opened
        recorded = {p: _finished_metadata(p) for p in (single, index)}
    finished = [p for p in recorded if recorded[p].get("result_key") in run_keys(result)]
    if resume and not overwrite and not finished and (other := next((p for p in (single, index) if p.exists()), None)):
        refuse_other_finished_result(other, recorded[other].get("result"), result, "scores", fmt=storage.SCORES_FORMAT)
    if resume and not overwrite and finished:  # a requeued job whose scores are done
        clear_progress_of_finished(st, out_dir, storage.SCORES_PARTIAL, outputs=[single, index, out_dir / storage.SCORES_SHARD_GLOB])
        done, num_shards = _finished_files(finished[0])  # the layout on disk, whatever this run's would be
        return ScoresReport(
            "pairwise", done, layout.rows, n_t, finished[0] == index, num_shards, int(recorded[finished[0]].get("query_chunks") or 1), relative,
            cfg.factors.strategy, cfg.task.measurement, common["damping"], {}, 0.0, "already complete",
            {tm.name: tm.num_params for tm in ctx.tracked}, n_members, scorer.by_layer, summed, scorer.per_token,
        )
    rank_suffix = f".rank{st.rank}" if st.distributed else ""
    checkpoint = PassCheckpoint(out_dir / storage.SCORES_PARTIAL.format(rank=rank_suffix), settings, cfg.factors.checkpoint_every)
    snapshot, replaced = _start_pairwise(st, checkpoint, single, index, overwrite, resume)

    if cfg.scores.query_chunk is None and len(layout.query_chunks) > 1 and chunk < 16:  # never with sum_queries: one pass
        per_query = query_numbers * element_bytes / 2**20
        notices.warn(
            f"scores.max_memory_mb: {cfg.scores.max_memory_mb:g} MB holds the preconditioned gradients of {chunk} "
            f"quer{'y' if chunk == 1 else 'ies'} at a time ({per_query:.3g} MB each), so the training set is streamed "
            f"{len(layout.query_chunks)} times, once per chunk of queries; a larger scores.max_memory_mb streams it fewer times"
        )
    if scorer.per_token is not None and (size := layout.rows * n_t * scorer.per_token * getattr(torch, cfg.scores.dtype).itemsize) >= PER_TOKEN_NOTE_BYTES:
        rows = f"the {n_q:,} queries summed into 1 row" if sum_queries else f"{n_q:,} queries"  # summed: one row, whatever their number
        notices.warn(
            f"scores.per_token: the scores files will hold {size / 1e9:.3g} GB of per-token parts ({rows} × {n_t:,} training "
            f"examples × {scorer.per_token:,} positions, {cfg.scores.dtype}); {'' if sum_queries else 'fewer queries, '}a shorter "
            "data.train.range or scores.dtype: bfloat16 make them smaller"
        )
    t0 = time.perf_counter()
    query_info = scorer.query_info(queries)
    if sum_queries:  # no row of the scores is one query's: the indices of those summed, no labels or predictions
        query_info = {storage.SUMMED_QUERY_INDICES: query_info["query_indices"]}
    mine = [(s, out_dir / storage.SCORES_SHARD.format(shard=s.number) if layout.sharded else single) for s in layout.shards if s.rank == st.rank]
    left = [  # not finished by the interrupted run
        (s, path) for s, path in mine
        if not (layout.sharded and resume and path.is_file() and storage.read_metadata(path).get("run_key") in run_keys(settings))
    ]
    first = left[0][0] if left else None  # the shard this rank scores first, from the snapshot's chunk and batch when it resumes it
    start_chunk, skip, where = 0, 0, _snapshot_phase(snapshot, "scores:")
    if first is not None and snapshot is not None and where is not None and where[0] == first.number:
        start_chunk, skip = where[1], snapshot.batches_done
    scorer.check_first_batches(first, skip, queries, layout.query_chunks[start_chunk])
    replaced.remove()  # the old scores and progress, on every rank once every rank's first batches passed
    unwritten = "no index was written (finished shards stay for --resume)" if layout.sharded else "no scores were written"
    run = _PairwisePass(
        scorer, queries, layout, metadata, checkpoint, relative, seconds, query_info, scorer.watch(unwritten),
        keep=layout.keep_queries and len(left) > 1,  # with one shard left, each chunk is used once
    )
    seconds.update(queries=time.perf_counter() - t0, scores=0.0, write=0.0)
    resumed_from, kept = None, 0  # kept: shards the interrupted run finished

    def kept_note() -> str:
        return f" ({kept} finished shard{'s' if kept > 1 else ''} kept)" if kept else ""

    # the first range's saved results, read on every rank at once: a rank whose pieces are refused stops every rank,
    # none left waiting in a later collective (only the first range continues the snapshot)
    opened = agree(st, lambda: None if first is None else run.open_shard(first, snapshot))
    for shard, shard_path in mine:
        if (shard, shard_path) not in left:
            kept += 1  # finished by the interrupted run
            continue
        if kept and resumed_from is None:
            resumed_from = f"shard {shard.number}{kept_note()}"
        results = opened if shard is first and opened is not None else run.open_shard(shard, None)
        opened = None
        if (where := run.score_shard(shard, shard_path, results)) is not None:
            resumed_from = where + kept_note()
        del results  # let go before the next range's are made
    run.held.clear()  # no shard of this rank is left to score against them
    if kept and resumed_from is None:  # every shard of this rank was finished: only the index was missing
        resumed_from = f"the index{kept_note()}"
    rate, resumed_from = _job_view(st, run.scored // len(layout.query_chunks), seconds["scores"], resumed_from)
    st.barrier()
    if layout.sharded:
        if st.is_main:
            _write_index(index, layout, metadata)
        st.barrier()
    checkpoint.clear()
    seconds["total"] = time.perf_counter() - t0 + seconds["setup"]
    return ScoresReport(
        "pairwise",
        paths,
        layout.rows,
        n_t,
        layout.sharded,
        len(layout.shards),
        len(layout.query_chunks),
        relative,
        cfg.factors.strategy,
        cfg.task.measurement,
        common["damping"],
        seconds,
        rate,
        resumed_from,
        {tm.name: tm.num_params for tm in ctx.tracked},
        n_members,
        scorer.by_layer,
        summed,
        scorer.per_token,
    )


def _pairwise_keys(
    scorer: _Scorer, common: dict[str, Any], queries: IndexedDataset, layout: ScoresLayout, relative: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the outputs' metadata, the result's settings, the run's settings): the result is what the scores
    are, whatever the batch size, ranks or shards; the run adds those, for --resume."""
    cfg, st = scorer.cfg, scorer.ctx.state
    metadata = common | {
        storage.FORMAT_KEY: storage.SCORES_FORMAT,
        "kind": "pairwise",
        "measurement": cfg.task.measurement,
        "relative": relative,
        "query_fingerprint": queries.fingerprint(),
        "query_parts": queries.fingerprint_parts(),
        "n_query": layout.rows,
        "n_train": len(scorer.train),
        "dtype": cfg.scores.dtype,
    } | _by_layer(scorer) | _per_token(scorer)
    summed = {} if layout.summed is None else {"sum_queries": True}  # a key only of summed runs: the others keep theirs
    if summed:
        metadata |= summed | {"queries_summed": len(queries)}
    result = (
        {k: metadata[k] for k in ("model_fingerprint", "model_definition", "train_fingerprint", "query_fingerprint", "damping", "relative", "measurement", "strategy", "dtype")}
        | {"factors": common["factors"].get("created"), "amp": cfg.factors.amp}
        | _members_key(common)
        | _by_layer(scorer)
        | summed
        | _per_token(scorer)
    )
    chunks = layout.query_chunks if layout.summed is None else layout.summed  # summed: the row's rounding follows its chunks
    settings = result | {"bs": scorer.bs, "world": st.world_size, "chunks": chunks, "shards": [(s.start, s.stop) for s in layout.shards]}
    metadata["run_key"], metadata["result_key"], metadata["result"] = run_key(settings), run_key(result), result
    metadata["query_chunks"] = len(layout.query_chunks)
    return metadata, result, settings


def _start_pairwise(
    st: DistState, checkpoint: PassCheckpoint, single: Path, index: Path, overwrite: bool, resume: bool
) -> tuple[Snapshot | None, Replaced]:
    """Every rank's checks of the outputs and progress before a pairwise pass (one refusal, said once), and what
    the run replaces (`agreed_checks`), removed once the first batches passed their checks on every rank: each
    rank's progress --overwrite lets go, and on rank 0 the finished scores (--overwrite), old shards (without
    --resume), temp files."""
    out_dir = single.parent

    def start_checks() -> tuple[Snapshot | None, list[Path]]:
        storage.check_can_write(single, overwrite, "scores", "output_dir", storage.SCORES_FORMAT)
        storage.check_can_write(index, overwrite, "scores", "output_dir")
        removed = check_rank_layout(out_dir, storage.SCORES_PARTIAL, st.world_size, resume=resume, overwrite=overwrite)
        snap, stale = SavedPieces.check_start(checkpoint, resume, overwrite)
        leftovers = sorted(out_dir.glob(storage.SCORES_SHARD_GLOB))
        for shard in leftovers:  # never opened (a FIFO would block); --overwrite (without --resume) removes a FIFO, never a folder
            storage.refuse_irregular(shard, overwrite and not resume, "output_dir")
        if leftovers and not resume and not overwrite:
            raise OutputError(
                f"{str(leftovers[0].parent)!r} holds {len(leftovers)} score shard(s) of an interrupted run",
                hint="pass --resume to continue it, or --overwrite to start over",
            )
        if resume and not overwrite:
            checkpoint.check_leftovers(leftovers, "score shard(s)")
        old: list[Path] = []  # what rank 0 removes besides, before any rank writes a shard
        if st.is_main:
            old = ([single, index] if overwrite else []) + ([] if resume else leftovers)
            for name in (storage.SCORES_FILE, storage.SCORES_INDEX, storage.SCORES_SHARD_GLOB):  # not "scores*": a --self run's progress shares the prefix
                old += storage.temp_paths(out_dir / name)
        return snap, removed + stale + old

    return agreed_checks(st, start_checks)


@dataclass
class _PairwisePass:
    """This rank's pairwise pass: each of its shards scored against every chunk of queries, resumable.

    `held` keeps the preconditioned queries of every chunk for the rank's later shards when `keep` (the
    layout's `keep_queries`, and several shards left to score); otherwise a chunk's are let go before the
    next chunk's are computed, so one chunk is in memory.
    """

    scorer: _Scorer
    queries: IndexedDataset
    layout: ScoresLayout
    metadata: dict[str, Any]
    checkpoint: PassCheckpoint
    relative: bool
    seconds: dict[str, float]
    query_info: dict[str, torch.Tensor]
    watch: _MembersWatch
    keep: bool = False
    held: dict[tuple[int, int], list[StoredQueries]] = field(default_factory=dict)  # (q0, q1) → the chunk's queries per member
    steps: int = 0
    scored: int = 0  # training examples scored, counted once per query chunk

    def chunk_queries(self, q0: int, q1: int) -> list[StoredQueries]:
        """The preconditioned queries [q0, q1), per member: held, or computed (one query pass), and held
        when `keep`. With scores.sum_queries (`layout.summed`), the one row Σ_q (F + λ)⁻¹ ∇(measurement) of
        every query, per member (`summed_queries`)."""
        if (q0, q1) in self.held:
            return self.held[q0, q1]
        if self.layout.summed is not None:
            self.held[q0, q1] = self.summed_queries(self.layout.summed)
            return self.held[q0, q1]
        tq = time.perf_counter()
        vq = self.scorer.precondition(self.queries, q0, q1, f"query gradients {q0:,}..{q1:,}")
        self.seconds["queries"] += time.perf_counter() - tq
        if self.keep:
            self.held[q0, q1] = vq
        return vq

    def summed_queries(self, chunks: list[tuple[int, int]]) -> list[StoredQueries]:
        """Per member, the preconditioned queries of every chunk summed into one row: each chunk computed
        (one query pass), its rows added to the sum (float32 at least, `ScoreKernel.add_rows`), and let go
        before the next one's are computed, so that one chunk [chunk, P] and the sum [P] are in memory.
        Preconditioning is linear, so the row scores Σ_q I(q, x) exactly."""
        sums: list[dict[str, list[torch.Tensor]] | None] = [None] * len(self.scorer.members)
        for q0, q1 in chunks:
            tq = time.perf_counter()
            vq = self.scorer.precondition(self.queries, q0, q1, f"query gradients {q0:,}..{q1:,} (summed)", summed=True)
            for m, (member, stored) in enumerate(zip(self.scorer.members, vq, strict=True)):
                sums[m] = member.kernel.add_rows(stored, sums[m])
            del vq, stored
            self.seconds["queries"] += time.perf_counter() - tq
        return [m.kernel.summed_queries(total or {}) for m, total in zip(self.scorer.members, sums, strict=True)]

    def open_shard(self, shard: ShardSpec, snapshot: Snapshot | None) -> _OpenShard:
        """One train range's results, zeros, or where `snapshot` is of this range, those it saved (its pieces, or the
        scores themselves in a snapshot of an earlier version) and where it stopped. The compute-scores run opens its
        first range on every rank at once (`distributed.agree`): a rank whose pieces are refused stops every rank.

        Raises:
            OutputError: the snapshot's pieces refused (`SavedPieces.read`).
        """
        scorer, chunks = self.scorer, self.layout.query_chunks
        ctx, train = scorer.ctx, scorer.train
        n_q, width = self.layout.rows, shard.stop - shard.start
        block = torch.zeros(n_q, width, dtype=scorer.dtype, device=ctx.device)
        parts = None if scorer.by_layer is None else torch.zeros(len(scorer.by_layer), n_q, width, dtype=scorer.dtype, device=ctx.device)
        tokens = None if scorer.per_token is None else torch.zeros(n_q, width, scorer.per_token, dtype=scorer.dtype, device=ctx.device)
        norms = torch.zeros(len(scorer.members), width, dtype=scorer.dtype, device=ctx.device) if self.relative else None
        labels = _known_labels(train, shard.start, shard.stop, ctx.device)
        names = {"scores"} | ({"parts"} if parts is not None else set()) | ({"tokens"} if tokens is not None else set())
        pieces = SavedPieces(self.checkpoint, shard.number, chunks, width, names)
        opened = _OpenShard(block, parts, norms, labels, labels is None, pieces, tokens=tokens)
        where = _snapshot_phase(snapshot, "scores:")
        if where is None or snapshot is None or where[0] != shard.number:
            return opened
        start_chunk, start_batch = where[1], snapshot.batches_done
        q0 = chunks[start_chunk][0]
        done = min(width, start_batch * scorer.bs)
        if "pieces" in snapshot.tensors:
            opened.pieces.read(int(snapshot.tensors["pieces"]), opened.paste, (start_chunk, done))
        else:  # a snapshot of an earlier version holds the scores themselves: the next save writes them all to pieces
            block[:q0] = snapshot.tensors["rows_done"].to(block)
            block[q0 : chunks[start_chunk][1], :done] = snapshot.tensors["current"].to(block)
            if parts is not None:  # the settings include by_layer: a snapshot of this run holds them
                parts[:, :q0] = snapshot.tensors["parts_done"].to(parts)
                parts[:, q0 : chunks[start_chunk][1], :done] = snapshot.tensors["parts_current"].to(parts)
        if norms is not None:
            norms.copy_(snapshot.tensors["norms"])
        if opened.collect and "labels" in snapshot.tensors:
            opened.labels = snapshot.tensors["labels"].to(ctx.device)
        opened.start_chunk, opened.start_batch = start_chunk, start_batch
        opened.resumed_from = f"shard {shard.number}, query chunk {start_chunk + 1}/{len(chunks)}, batch {start_batch}"
        return opened

    def score_shard(self, shard: ShardSpec, path: Path, opened: _OpenShard) -> str | None:
        """Scores one train range [n_query, shard length] from where `opened` (`open_shard`) stopped and writes it to
        `path`; where it resumed from ("shard s, query chunk c/C, batch b"), or None."""
        scorer, chunks = self.scorer, self.layout.query_chunks
        cfg, train = scorer.cfg, scorer.train
        n_members, width = len(scorer.members), shard.stop - shard.start
        block, parts, norms, labels, pieces = opened.block, opened.parts, opened.norms, opened.labels, opened.pieces
        tokens = opened.tokens
        collect, start_chunk, start_batch = opened.collect, opened.start_chunk, opened.start_batch
        for ci in range(start_chunk, len(chunks)):
            q0, q1 = chunks[ci]
            vq = self.chunk_queries(q0, q1)
            skip = start_batch if ci == start_chunk else 0
            scorer.progress.start(_pass_title(shard, self.layout, ci, len(chunks)), width)
            if skip:
                scorer.progress.advance(min(width, skip * scorer.bs))
            tp = time.perf_counter()
            for batches in scorer.train_batches(shard, skip):
                batch = batches[0]
                j = batch.index - shard.first_batch
                c0 = j * scorer.bs
                n = len(batch.global_indices)
                if tokens is not None:
                    per_position = scorer.pairwise_per_token(vq, batches)  # [Q, B, T]
                    tokens[q0:q1, c0 : c0 + n] = per_position
                    block[q0:q1, c0 : c0 + n] = per_position.sum(-1)
                elif parts is None:
                    block[q0:q1, c0 : c0 + n] = scorer.pairwise(vq, batches, norms, c0, first=ci == 0)
                else:
                    part = scorer.pairwise(vq, batches, norms, c0, first=ci == 0)  # [L, Q, B]
                    parts[:, q0:q1, c0 : c0 + n] = part
                    block[q0:q1, c0 : c0 + n] = part.sum(0)
                if collect:
                    labels = _collect(labels, width, c0, batch.targets)
                self.watch.observe(batches)
                self.steps += 1
                self.scored += n
                if self.checkpoint.due(self.steps):
                    self.watch.check("scoring")
                    pieces.write(opened.cut, (ci, c0 + n))  # the scores since the last save, each written once
                    state_tensors = {"pieces": torch.tensor(pieces.count)}
                    if collect and labels is not None:
                        state_tensors["labels"] = labels
                    if norms is not None:
                        state_tensors["norms"] = norms
                    self.checkpoint.save(f"scores:{shard.number}:{ci}", j + 1, state_tensors)
                scorer.progress.advance(n)
            self.watch.check("scoring")
            self.seconds["scores"] += time.perf_counter() - tp
            scorer.progress.stop()
            del vq  # unless `held` keeps them, let go before the next chunk's are computed
        tw = time.perf_counter()
        _check_storable(block, cfg.scores.dtype)
        tensors = dict(self.query_info) | {
            "scores": block.to(getattr(torch, cfg.scores.dtype)),
            "train_indices": train.global_indices[shard.start : shard.stop].clone(),
        }
        if parts is not None:
            _check_storable(parts, cfg.scores.dtype, "per-layer scores (scores.by_layer)", layers=scorer.by_layer)
            tensors[storage.SCORES_BY_LAYER] = parts.to(getattr(torch, cfg.scores.dtype))
        if tokens is not None:
            _check_storable(tokens, cfg.scores.dtype, "per-token scores (scores.per_token)")
            tensors[storage.SCORES_PER_TOKEN] = tokens.to(getattr(torch, cfg.scores.dtype))
        if labels is not None:
            tensors["train_labels"] = labels
        if norms is not None:
            _check_storable(norms, "float32", "RelatIF norms ‖(F+λ)⁻¹∇L(x)‖")
        if norms is not None and n_members == 1:  # an ensemble's RelatIF has one norm per member: plain scores are not recoverable
            tensors["train_norms"] = norms[0]
        shard_meta = self.metadata | {"train_start": shard.start, "train_stop": shard.stop, "shard": shard.number, "settings": self.checkpoint.settings}
        storage.save_tensors(path, tensors, shard_meta)
        pieces.remove()  # the shard's file holds them (a snapshot still counting them is of a finished shard: not resumed)
        self.seconds["write"] += time.perf_counter() - tw
        return opened.resumed_from


@dataclass
class _OpenShard:
    """A train range's results as its pass holds them (`_PairwisePass.open_shard`): the scores [n_query, width], their
    per-layer parts [L, n_query, width], the RelatIF norms [M, width], the labels (None while collected from the
    batches), the pieces saved, and where the pass continues (query chunk, batch)."""

    block: torch.Tensor
    parts: torch.Tensor | None
    norms: torch.Tensor | None
    labels: torch.Tensor | None
    collect: bool
    pieces: SavedPieces
    start_chunk: int = 0
    start_batch: int = 0
    resumed_from: str | None = None  # "shard s, query chunk c/C, batch b" where it continues a snapshot
    tokens: torch.Tensor | None = None  # [n_query, width, T] each position's part (scores.per_token)

    def cut(self, q0: int, q1: int, c0: int, c1: int) -> dict[str, torch.Tensor]:
        out = {"scores": self.block[q0:q1, c0:c1]} | ({} if self.parts is None else {"parts": self.parts[:, q0:q1, c0:c1]})
        return out | ({} if self.tokens is None else {"tokens": self.tokens[q0:q1, c0:c1]})

    def paste(self, q0: int, q1: int, c0: int, c1: int, tensors: dict[str, torch.Tensor]) -> None:
        self.block[q0:q1, c0:c1] = tensors["scores"].to(self.block)
        if self.parts is not None:
            self.parts[:, q0:q1, c0:c1] = tensors["parts"].to(self.parts)
        if self.tokens is not None:
            self.tokens[q0:q1, c0:c1] = tensors["tokens"].to(self.tokens)


def _write_index(index: Path, layout: ScoresLayout, metadata: dict[str, Any]) -> None:
    """scores.index.json: the shards by train range, and the metadata every shard carries."""
    storage.save_json(
        index,
        {
            storage.FORMAT_KEY: storage.SCORES_FORMAT,
            "n_query": metadata["n_query"],
            "n_train": metadata["n_train"],
            "shards": [
                {"file": storage.SCORES_SHARD.format(shard=s.number), "shard": s.number, "train_start": s.start, "train_stop": s.stop}
                for s in layout.shards
            ],
            "metadata": {k: v for k, v in metadata.items() if k != storage.FORMAT_KEY} | {"created": storage.created_now()},
        },
    )


def _job_view(st: DistState, scored: int, seconds: float, resumed_from: str | None) -> tuple[float, str | None]:
    """(training examples scored per second by the whole job, where each rank resumed) from every
    rank's count, seconds and resume point: all ranks' examples over the slowest rank's seconds."""
    views = st.all_gather_object((scored, seconds, resumed_from))
    slowest = max(v[1] for v in views)  # type: ignore[index]
    rate = sum(v[0] for v in views) / slowest if slowest > 0 else 0.0  # type: ignore[index]
    if not st.distributed:
        return rate, resumed_from
    resumed = [f"rank {r}: {v[2]}" for r, v in enumerate(views) if v[2] is not None]  # type: ignore[index]
    return rate, "; ".join(resumed) or None


def _pass_title(shard: ShardSpec, layout: ScoresLayout, chunk: int, num_chunks: int) -> str:
    title = "scores"
    if layout.sharded:
        title += f" train {shard.start:,}..{shard.stop:,}"
    if num_chunks > 1:
        title += f" (query chunk {chunk + 1}/{num_chunks})"
    return title


def _run_self(scorer: _Scorer, common: dict[str, Any], overwrite: bool, resume: bool, seconds: dict[str, float]) -> ScoresReport:
    ctx, cfg, train = scorer.ctx, scorer.cfg, scorer.train
    st = ctx.state
    out_dir = cfg.output_path
    n_t = len(train)
    path = out_dir / storage.SELF_INFLUENCE_FILE
    metadata = common | {storage.FORMAT_KEY: storage.SELF_FORMAT, "kind": "self", "n_train": n_t} | _by_layer(scorer)
    result = (
        {k: common[k] for k in ("model_fingerprint", "model_definition", "train_fingerprint", "damping", "strategy")}
        | {"factors": common["factors"].get("created"), "amp": cfg.factors.amp, "kind": "self"}
        | _members_key(common)
        | _by_layer(scorer)
    )
    settings = result | {"bs": scorer.bs, "world": st.world_size}
    metadata["run_key"], metadata["result_key"], metadata["result"] = run_key(settings), run_key(result), result
    if resume and not overwrite and path.exists():  # a requeued job whose scores are done, or other settings
        storage.check_can_write(path, False, "self-influence scores", "output_dir", storage.SELF_FORMAT, resume=True)
        recorded = _finished_metadata(path)
        if recorded.get("result_key") not in run_keys(result):
            refuse_other_finished_result(path, recorded.get("result"), result, "self-influence scores", fmt=storage.SELF_FORMAT)
        clear_progress_of_finished(st, out_dir, storage.SCORES_PARTIAL, ".self", outputs=[path])
        return ScoresReport(
            "self", [path], 0, n_t, False, 1, 0, False, cfg.factors.strategy, "loss", common["damping"],
            {}, 0.0, "already complete", {tm.name: tm.num_params for tm in ctx.tracked}, len(scorer.members), scorer.by_layer,
        )
    rank_suffix = (f".rank{st.rank}" if st.distributed else "") + ".self"
    checkpoint = PassCheckpoint(out_dir / storage.SCORES_PARTIAL.format(rank=rank_suffix), settings, cfg.factors.checkpoint_every)

    def start_checks() -> tuple[Snapshot | None, list[Path]]:
        storage.check_can_write(path, overwrite, "self-influence scores", "output_dir", storage.SELF_FORMAT)
        removed = check_rank_layout(out_dir, storage.SCORES_PARTIAL, st.world_size, resume=resume, overwrite=overwrite, kind=".self")
        snap, stale = SavedPieces.check_start(checkpoint, resume, overwrite)
        old = [path] if overwrite else []  # an interrupted --overwrite run must not leave the old values looking current
        return snap, removed + stale + (old + storage.temp_paths(path) if st.is_main else [])

    snapshot, replaced = agreed_checks(st, start_checks)  # removed once the first batch below passed its checks
    start, stop = st.shard(n_t)
    shard = ShardSpec(st.rank, st.rank, start, stop, 0, -(-(stop - start) // scorer.bs))
    values = torch.zeros(n_t, dtype=scorer.dtype, device=ctx.device)
    parts = None if scorer.by_layer is None else torch.zeros(len(scorer.by_layer), n_t, dtype=scorer.dtype, device=ctx.device)
    labels = _known_labels(train, 0, n_t, ctx.device)  # all of them; else each rank collects its own range
    collect = labels is None
    held = snapshot.tensors if snapshot is not None and snapshot.phase == "self" else None
    # classification: model.checkpoint's predicted class of every example, shown beside its label (mislabel triage);
    # every task: each example's training loss (top-k --self --rank-by loss), from the outputs the pass computes anyway.
    # Progress saved before they were kept has none for its batches: then none are kept (on every rank)
    if held is not None and "pieces" in held:
        predict, keep_losses = cfg.task.kind == "classification" and bool(held["with_predictions"]), bool(held["with_losses"])
    else:
        predict, keep_losses = cfg.task.kind == "classification" and (held is None or "predictions" in held), held is None or "losses" in held
    if st.distributed:
        ranks = st.all_gather_object((predict, keep_losses))
        predict, keep_losses = all(r[0] for r in ranks), all(r[1] for r in ranks)  # type: ignore[index]
    predictions = torch.zeros(n_t, dtype=torch.int64, device=ctx.device) if predict else None
    losses = torch.zeros(n_t, dtype=scorer.dtype, device=ctx.device) if keep_losses else None
    per_example = {"values": values, "values_by_layer": parts, "predictions": predictions, "losses": losses}
    kept = {name: t for name, t in per_example.items() if t is not None}  # [..., n_t] each: this rank writes [start, stop)
    names = set(kept) | ({"labels"} if collect else set())
    pieces = SavedPieces(checkpoint, st.rank, None, stop - start, names, ("self-influence values", "self-influence"))

    def cut(_q0: int, _q1: int, c0: int, c1: int) -> dict[str, torch.Tensor]:
        collected = {"labels": labels[c0:c1]} if collect and labels is not None else {}  # this rank's range: [0, stop - start)
        return {name: t[..., start + c0 : start + c1] for name, t in kept.items()} | collected

    def paste(_q0: int, _q1: int, c0: int, c1: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal labels
        for name, t in kept.items():
            t[..., start + c0 : start + c1] = tensors[name].to(t)
        if collect:
            labels = _collect(labels, stop - start, c0, tensors["labels"].to(ctx.device))

    def restore() -> None:
        """The values of the snapshot's batches: from its pieces, or from the snapshot itself (an earlier version's:
        the next save writes them all to pieces), on every rank at once (a refusal stops them all)."""
        nonlocal labels
        if held is None:
            return
        if "pieces" in held:
            pieces.read(int(held["pieces"]), paste, (0, min(stop - start, snapshot.batches_done * scorer.bs)))  # type: ignore[union-attr]
            return
        for name, t in kept.items():
            t.copy_(held[name])  # the settings include by_layer: a snapshot of this run holds values_by_layer
        if collect and "labels" in held:
            labels = held["labels"].to(ctx.device)

    agree(st, restore)
    skip = snapshot.batches_done if held is not None else 0  # type: ignore[union-attr]
    resumed_from = f"batch {skip}" if held is not None else None
    scorer.check_first_batches(shard, skip)
    replaced.remove()  # the old values and progress, on every rank once every rank's first batch passed
    watch = scorer.watch("no scores were written")
    scorer.progress.start("self-influence", stop - start)
    if skip:
        scorer.progress.advance(min(stop - start, skip * scorer.bs))
    t0 = time.perf_counter()
    steps = scored = 0
    for batches in scorer.train_batches(shard, skip):
        batch = batches[0]
        c0 = batch.index * scorer.bs
        n = len(batch.global_indices)
        if parts is None:
            values[start + c0 : start + c0 + n] = scorer.self_influence(batches)
        else:
            part = scorer.self_influence(batches)  # [L, B] in float64
            parts[:, start + c0 : start + c0 + n] = part
            values[start + c0 : start + c0 + n] = part.sum(0)
        if predictions is not None:
            predictions[start + c0 : start + c0 + n] = batch.outputs.argmax(-1)
        if losses is not None:
            losses[start + c0 : start + c0 + n] = scorer.losses(batches)
        if collect:
            labels = _collect(labels, stop - start, c0, batch.targets)
        watch.observe(batches)
        steps += 1
        scored += n
        if checkpoint.due(steps):
            watch.check("self-influence")
            pieces.write(cut, (0, c0 + n))  # the values since the last save, each written once
            flags = {"with_predictions": torch.tensor(predict), "with_losses": torch.tensor(keep_losses)}
            checkpoint.save("self", batch.index + 1, {"pieces": torch.tensor(pieces.count)} | flags)
        scorer.progress.advance(n)
    watch.check("self-influence")
    seconds["self"] = time.perf_counter() - t0
    scorer.progress.stop()
    rate, resumed_from = _job_view(st, scored, seconds["self"], resumed_from)
    st.all_reduce_(values)
    if parts is not None:
        st.all_reduce_(parts)
    for own in (predictions, losses):
        if own is not None:
            st.all_reduce_(own)  # each rank wrote its own range, zeros elsewhere
    if collect and st.distributed:  # each rank collected its own range
        ranges = [p for p in st.all_gather_object(None if labels is None else labels.cpu()) if p is not None]
        labels = torch.cat(ranges) if ranges else None  # type: ignore[arg-type]
    _check_storable(values, str(values.dtype).removeprefix("torch."), "self-influence")  # stored as computed (scores.dtype is the pairwise matrix's)
    if parts is not None:
        _check_storable(parts, str(parts.dtype).removeprefix("torch."), "per-layer self-influence (scores.by_layer)", layers=scorer.by_layer)
    if st.is_main:
        tensors = {"self_influence": values, "train_indices": train.global_indices.clone()}
        if parts is not None:
            tensors[storage.SELF_BY_LAYER] = parts
        if labels is not None:
            tensors["train_labels"] = labels
        if predictions is not None:
            tensors["train_predictions"] = predictions
        if losses is not None:
            tensors[storage.SELF_LOSSES] = losses
        storage.save_tensors(path, tensors, metadata)
    st.barrier()
    checkpoint.clear()
    return ScoresReport(
        "self", [path], 0, n_t, False, 1, 0, False, cfg.factors.strategy, "loss", common["damping"], seconds, rate,
        resumed_from, {tm.name: tm.num_params for tm in ctx.tracked}, len(scorer.members), scorer.by_layer,
    )


__all__ = [
    "ScoresLayout",
    "ScoresReport",
    "ShardSpec",
    "compute_scores",
    "plan_layout",
    "plan_shards",
]
