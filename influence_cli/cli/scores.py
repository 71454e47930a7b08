"""`influence compute-scores` and `influence top-k`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from influence_cli.cli.app import ConfigArg, JsonOpt, OverwriteOpt, ResumeOpt, SetOpt, command, load
from influence_cli.cli.render import (
    RichProgress,
    err_console,
    example_cells,
    example_columns,
    fitted_layer_shares,
    label_json,
    label_text,
    layer_label,
    new_table,
    print_json,
    print_line,
    print_resumed,
    print_table,
    record_room,
    room_beside,
)
from influence_cli.errors import UsageError, human_bytes, shortened

if TYPE_CHECKING:  # the CLI imports torch only when a command runs

    from influence_cli.example_views import ExampleView
    from influence_cli.topk import QueryRanking, RankedExample

SCORES_EPILOG = """\
**Examples**

  influence compute-scores configs/digits.yaml

  influence compute-scores configs/mnist.yaml --relative --set scores.max_memory_mb=3 --overwrite     # 100 × 8,000 scores, over 3 MB: shards

  influence compute-scores configs/mnist.yaml --sum-queries --set output_dir=../runs/mnist_summed --set factors_dir=../runs/mnist     # one row, 1 × 8,000: the 100 queries summed

  influence compute-scores configs/mnist.yaml --self --overwrite

  influence compute-scores configs/mnist.yaml --set factors.amp=bfloat16 --overwrite

  torchrun --nproc_per_node=4 -m influence_cli compute-scores configs/mnist.yaml --self --set device=cuda
"""

TOPK_EPILOG = """\
**Examples**

  influence top-k configs/digits.yaml --query 0:5 --k 5

  influence top-k configs/mnist.yaml --query 3 --query 10:12 --image-grid runs/mnist/top5.png

  influence top-k configs/mnist.yaml --self --k 20 --json

  influence top-k configs/mnist.yaml --self --rank-by loss --k 20     # the largest training losses first
"""


@command("compute-scores", resumable=True, epilog=SCORES_EPILOG)
def compute_scores_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    self_: Annotated[
        bool, typer.Option("--self", metavar="", help="Self-influence ∇L(x)ᵀ(F+λ)⁻¹∇L(x) of every training example instead (no queries).")
    ] = False,
    relative: Annotated[
        bool | None,
        typer.Option(
            "--relative/--no-relative",
            metavar="",
            help="RelatIF: divide each score by ‖(F+λ)⁻¹∇L(x)‖ of the training example (default: scores.relative).",
            show_default=False,
        ),
    ] = None,
    by_layer: Annotated[
        bool | None,
        typer.Option(
            "--by-layer/--no-by-layer",
            metavar="",
            help="Also store each tracked layer's part of every score (they sum to it), for top-k to show which layers carry a pair "
            "(default: scores.by_layer); the score block in memory and the files grow (1 + layers)-fold.",
            show_default=False,
        ),
    ] = None,
    sum_queries: Annotated[
        bool | None,
        typer.Option(
            "--sum-queries/--no-sum-queries",
            metavar="",
            help="Sum the scores over every query of data.query: one row [1, n_train], each training example's total influence on "
            "the whole query set (data cleaning, data valuation), from one pass over the training set (default: scores.sum_queries).",
            show_default=False,
        ),
    ] = None,
    per_token: Annotated[
        bool | None,
        typer.Option(
            "--per-token/--no-per-token",
            metavar="",
            help="Also store each training position's part of every score (they sum to it; padding 0), for top-k to show which "
            "tokens carry a pair (default: scores.per_token); Linear layers over the inputs' positions only; the score block in "
            "memory and the files grow (1 + sequence length)-fold.",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Score every (query, training example) pair with the fitted factors and save OUTPUT_DIR/scores.safetensors.

    I(z, x) = ∇L(z)ᵀ (F + λ)⁻¹ ∇L(x), summed over the tracked layers, with z from data.query
    (gradient of task.measurement: the loss, minus the margin z_y - logsumexp of the other logits, or your own
    function's value) and x from data.train. The query gradients are
    preconditioned in chunks of queries that scores.max_memory_mb holds, and the training set is
    streamed once per chunk with one matrix product per layer and batch. Score matrices larger than
    scores.max_memory_mb are written as shards by train range plus scores.index.json: each process
    preconditions every chunk once, or, with several chunks that the budget cannot hold at once,
    again for each of its shards. Read the scores with `influence top-k`. With scores.checkpoints (an
    ensemble), the scores are averaged over model.checkpoint and every listed checkpoint, each with the factors
    fit-factors fitted for it.

    With --sum-queries (scores.sum_queries), the preconditioned query gradients are summed, chunk by chunk,
    into one row and the training set is streamed once: scores [1, n_train], each training example's total
    influence Σ_q I(q, x) on the whole query set (which examples help or hurt the model on it).

    Sign convention: a positive score means the training example helps the query: up-weighting it
    lowers the query's loss (a proponent); negative means it hurts (an opponent). A score is N × the
    first-order effect of removing the example (N = training examples), in the query measurement's
    units: removing it changes the query's loss by about +score/N (leaving out a proponent raises it),
    with task.measurement: margin the query's margin by about -score/N, and with your own
    package.module:function its value by about +score/N.
    """
    from influence_cli.distributed import init_distributed
    from influence_cli.scores import compute_scores

    cfg = load(config, set_, "compute_scores", self_influence=self_)
    state = init_distributed(cfg.device, cfg.source)
    report = compute_scores(
        cfg, overwrite=overwrite, resume=resume, self_influence=self_, relative=relative, by_layer=by_layer, sum_queries=sum_queries,
        per_token=per_token, state=state, progress=RichProgress(not json_),
    )
    if not state.is_main:
        return
    if json_:
        data = dataclasses.asdict(report)
        data["paths"] = [str(p) for p in report.paths]
        for key in ("by_layer", "queries_summed", "per_token"):  # keys only of runs that store the parts or sum their queries
            if data[key] is None:
                del data[key]
        print_json(data)
        return
    if report.resumed_from == "already complete":
        err_console.print(f"{escape(str(report.paths[0]))} is already complete for these settings; nothing to do (--overwrite recomputes)")
        return
    print_resumed(report.resumed_from)
    if report.kind == "self":
        title = f"self-influence of {report.n_train:,} training examples ({report.strategy})"
    else:
        variant = "relative influence (RelatIF)" if report.relative else "influence"
        queries = f"{report.n_query:,} queries" if report.queries_summed is None else f"the {report.queries_summed:,} queries summed"
        title = (
            f"{variant}: {queries} × {report.n_train:,} training examples "
            f"({report.strategy}, measurement {report.measurement})"
        )
    if report.members > 1:
        title += f", averaged over an ensemble of {report.members} models (damping below: model.checkpoint's)"
    if report.by_layer is not None:
        title += f", with each of the {len(report.by_layer)} layers' parts"
    if report.per_token is not None:
        title += f", with each of the {report.per_token} positions' parts"
    print_line(title)
    table = new_table("", [("layer", "left"), ("parameters", "right"), ("damping λ", "right")])
    for name, lam in report.damping.items():
        table.add_row(layer_label(name), f"{report.layer_params.get(name, 0):,}", f"{lam:.4g}")
    print_table(table)
    size = sum(Path(p).stat().st_size for p in report.paths if Path(p).is_file())
    where = str(report.paths[0]) + (f" + {report.num_shards} shards" if report.sharded else "")
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
    err_console.print(
        f"[green]saved[/] {escape(where)} ({human_bytes(size)}); {report.examples_per_second:,.0f} training examples/s; {timing}"
    )


def parse_query_option(values: list[str] | None) -> list[int | slice] | None:
    """`--query 3`, `--query 0:10`, `--query 5:` (repeatable) → positions and slices; None = all."""
    if not values:
        return None
    out: list[int | slice] = []
    for text in values:
        for part in text.split(","):
            part = part.strip()
            try:
                if ":" in part:
                    a, b = part.split(":", 1)
                    out.append(slice(int(a) if a.strip() else None, int(b) if b.strip() else None))
                else:
                    out.append(int(part))
            except ValueError:  # a number past Python's limit of digits (4,300) too: far past any scores' rows
                raise UsageError(f"--query {shortened(text)}: expected N or START:STOP (e.g. --query 3 or --query 0:10)") from None
    return out


@command("top-k", rank_0=True, epilog=TOPK_EPILOG)
def top_k_cmd(
    config: ConfigArg,
    query: Annotated[
        list[str] | None,
        typer.Option("--query", "-q", metavar="ROWS", help="Query positions (rows of the scores): 3, 0:10, 5:, or several joined by commas, 3,7,0:2 (repeatable; default: all)."),
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, metavar="N", help="Examples per ranking (at most: proponents are positive scores, opponents negative).")] = 5,
    self_: Annotated[bool, typer.Option("--self", metavar="", help="Rank training examples by self-influence (from compute-scores --self).")] = False,
    rank_by: Annotated[
        Literal["self-influence", "loss"],
        typer.Option(
            "--rank-by",
            help="With --self, what ranks: self-influence, or loss (each example's training loss at its label, stored by compute-scores --self; "
            "the better finder of wrong labels while the model has not memorized them, docs/MEMORIZATION.md; a note suggests it where the "
            "predicted class differs from the label on most self-influence rows). Either way, rows show both.",
        ),
    ] = "self-influence",
    plain: Annotated[
        bool, typer.Option("--plain", metavar="", help="With relative (RelatIF) scores, rank by plain influence instead (from the norms they keep; an ensemble's keep none).")
    ] = False,
    opponents: Annotated[
        bool, typer.Option("--opponents/--no-opponents", metavar="", help="Also list the opponents (most negative scores).")
    ] = True,
    image_grid: Annotated[
        Path | None,
        typer.Option("--image-grid", help="Also draw the rankings as a picture (PNG, or any format Pillow writes, by the suffix; replaced if it exists): one row per query; each tile shows the example's index, label (and its file, for an image folder) and score.", show_default=False),
    ] = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Print each query's top-k proponents and opponents from the scores of compute-scores.

    Reads the scores of any size, streaming over shards, and prints one table per query:
    rank, training index, label and score, under a line with the query's index, label and
    prediction. With --self, lists the most self-influential training examples (candidates for
    mislabeled or memorized data), or with --rank-by loss those of the largest training loss,
    each row showing both.

    Sign convention: a positive score means the training example helps the query: up-weighting it
    lowers the query's loss (a proponent); negative means it hurts (an opponent). A score is N × the
    first-order effect of removing the example (N = training examples), in the query measurement's
    units: removing it changes the query's loss by about +score/N (leaving out a proponent raises it),
    with task.measurement: margin the query's margin by about -score/N, and with your own
    package.module:function its value by about +score/N.
    """
    from influence_cli import storage, topk
    from influence_cli.example_views import count_label_noise, example_views

    cfg = load(config, set_, "top_k", self_influence=self_)
    out_dir = cfg.output_path
    if image_grid is not None:
        storage.check_image_path(image_grid, "--image-grid")  # before any reading
    if rank_by != "self-influence" and not self_:
        raise UsageError(f"--rank-by {rank_by}: only with --self (it orders the training examples --self lists)", hint="add --self")
    if self_:
        if query:
            raise UsageError("--query: not used with --self (self-influence ranks the training set)")
        if plain:
            raise UsageError("--plain: not used with --self (self-influence is not relative)")
        if not opponents:
            raise UsageError("--no-opponents: not used with --self (self-influence is never negative, so it lists no opponents)")
        self_influence = topk.load_self_influence(out_dir)
        loaded = topk.check_scores_match(self_influence.metadata, cfg, out_dir / storage.SELF_INFLUENCE_FILE, pairwise=False)
        ranked = topk.self_top_k(self_influence, k, rank_by=rank_by)
        (train,) = example_views(cfg, loaded, ["data.train"])
        noise = count_label_noise(train, [r.train_position for r in ranked]) if train.has_label_noise else None
        predicted = self_influence.train_predictions
        losses = self_influence.train_losses is not None
        heading = "most self-influential training examples" if rank_by == "self-influence" else "training examples of the largest loss"
        grid_path = _self_grid(train, ranked, image_grid, predicted, heading) if image_grid is not None else None
        note = topk.rank_by_loss_note(ranked, predicted, losses) if rank_by == "self-influence" and cfg.task.kind == "classification" else None
        if json_:
            if note:
                err_console.print(f"[bold yellow]note:[/] {escape(note)}", soft_wrap=True)
            rows = [
                _ranked_json(r) | {"train_label": label_json(r.train_label, train.token_data)}
                | ({"train_input": train.input_ids(r.train_position)} if train.token_inputs else {})
                | ({"train_prediction": int(predicted[r.train_position])} if predicted is not None else {})
                | ({"train_file": train.file(r.train_position)} if train.has_files else {})
                | ({"noisy": train.clean_label(r.train_position) is not None, "clean_label": train.clean_label(r.train_position)} if noise else {})
                for r in ranked
            ]  # fmt: skip
            print_json(
                {"output_dir": str(out_dir), "strategy": self_influence.metadata.get("strategy"), "k": k, "rank_by": rank_by, "self_influence": rows}
                | ({"label_noise": {"flipped": noise.replaced, "train": noise.size, "in_top_k": noise.in_ranking}} if noise else {})
                | _classes_json(train)
                | ({"image_grid": str(Path(grid_path).resolve())} if grid_path else {})
            )
            return
        rows: list[tuple[list[Any], RankedExample | None]] = []
        for r in ranked:
            was = train.clean_label(r.train_position) if noise else None
            flipped = [] if not noise else ["" if was is None else f"flipped from {label_text(was, train.class_names)}"]
            guess = [] if predicted is None else [label_text(int(predicted[r.train_position]), train.class_names)]
            rows.append(([str(r.rank), str(r.train_index), *([train.file(r.train_position)] if train.has_files else []),
                          *example_cells(train, r.train_position, r.train_label), *guess, *flipped, f"{r.score:.5g}",
                          *([f"{r.loss:.5g}"] if r.loss is not None else [])], r))  # fmt: skip
        print_table(_ranking_table(f"{heading} (top {len(ranked)})", [("rank", "right"), ("train index", "right")]
                                   + ([("file", "left")] if train.has_files else []) + example_columns(train)
                                   + ([("predicted", "left")] if predicted is not None else [])
                                   + ([("label noise", "left")] if noise else []) + [("self-influence", "right")]
                                   + ([("loss", "right")] if losses else []),
                                   rows, None, self_influence.layers is not None))  # fmt: skip
        if noise:
            print_line(
                f"label noise: {noise.in_ranking} of these {len(ranked)} carry a flipped label "
                f"({noise.replaced} of the {noise.size} training examples do, {noise.replaced / noise.size:.1%})"
            )
        if note:
            err_console.print(f"[bold yellow]note:[/] {escape(note)}", soft_wrap=True)
        if grid_path:
            err_console.print(f"[green]saved[/] {escape(str(grid_path))}")
        return

    selection = parse_query_option(query)
    meta = topk.load_scores_meta(out_dir)
    loaded = topk.check_scores_match(meta.metadata, cfg, meta.files[0].path if len(meta.files) == 1 else out_dir / storage.SCORES_INDEX)
    summed = meta.queries_summed
    if summed is not None and image_grid is not None:  # a grid's rows start with their query's tile: the sum has none
        raise UsageError(
            f"--image-grid: the scores in {str(out_dir)!r} are the {summed} queries of data.query summed into one row "
            "(compute-scores --sum-queries), which has no query image to draw; leave --image-grid out"
        )
    if plain and not meta.relative:
        raise UsageError(f"--plain: the scores in {str(out_dir)!r} are plain influence already (it undoes scores.relative)")
    if cfg.scores.relative != meta.relative and not plain:  # not refused: compute-scores --relative overrides the config
        which = "relative (RelatIF)" if meta.relative else "plain"
        err_console.print(
            f"[bold yellow]note:[/] the scores in {escape(str(out_dir))} are {which} influence, the config has scores.relative: "
            f"{str(cfg.scores.relative).lower()}; showing them as they are (compute-scores --overwrite scores as the config says)",
            soft_wrap=True,
        )
    rankings = topk.top_k(out_dir, selection, k, largest=True, smallest=opponents, plain=plain)
    relative = meta.relative and not plain
    token_data = cfg.task.kind == "language_modeling"  # both datasets are needed to show token ids; else data.query may be absent
    train, queries = example_views(cfg, loaded, ["data.train", "data.query"], required=token_data or image_grid is not None)
    grid_path = _pairwise_grid(cfg, meta, selection, k, opponents, rankings, image_grid, train, queries, plain) if image_grid is not None else None
    files = train.has_files or (queries is not None and queries.has_files)
    if json_:
        rows = [_query_ranking_json(r, train, queries, token_data, files, summed is not None) for r in rankings]
        print_json(
            {
                "output_dir": str(out_dir),
                "relative": relative,
                "measurement": meta.metadata.get("measurement"),
                "strategy": meta.metadata.get("strategy"),
                "k": k,
                "queries": rows,
            }
            | _classes_json(train)
            | ({} if summed is None else {"queries_summed": summed})
            | ({"image_grid": str(Path(grid_path).resolve())} if grid_path else {})
        )
        return
    variant = "relative influence" if relative else "influence"
    names = None if queries is None else queries.class_names

    def cells(e) -> list[str]:
        return ([train.file(e.train_position)] if files else []) + example_cells(train, e.train_position, e.train_label)

    blank = [""] * ((1 if files else 0) + len(example_columns(train)))
    for r in rankings:
        shown = f"input {label_text(queries.input_ids(r.query_position))} · " if queries is not None and queries.token_inputs else ""
        shown += f"file {queries.file(r.query_position) if queries is not None else '-'} · " if files else ""
        title = (
            f"query {r.query_position} · index {r.query_index} · {shown}label {label_text(r.query_label, names, token_data)} · "
            f"predicted {label_text(r.query_prediction, names, token_data)}"
        ) if summed is None else f"the {summed:,} queries of data.query, summed"
        columns = [("", "left"), ("rank", "right"), ("train index", "right")] + ([("file", "left")] if files else [])
        rows: list[tuple[list[Any], RankedExample | None]] = [
            ([Text("proponent", style="green"), str(e.rank), str(e.train_index), *cells(e), f"{e.score:+.5g}"], e) for e in r.proponents
        ] or [([Text("proponent", style="green"), "-", "", *blank, "no positive score"], None)]
        section = len(rows) if opponents else None
        if opponents:
            rows += [
                ([Text("opponent", style="red"), str(e.rank), str(e.train_index), *cells(e), f"{e.score:+.5g}"], e) for e in r.opponents
            ] or [([Text("opponent", style="red"), "-", "", *blank, "no negative score"], None)]
        head = [*columns, *example_columns(train), (variant, "right")]
        if meta.per_token is not None:  # each pair's leading positions (--per-token)
            head.append(("tokens", "left"))
            rows = [(shown + ([_tokens_cell(e, train)] if e is not None else [""]), e) for shown, e in rows]
        print_table(_ranking_table(title, head, rows, section, meta.by_layer is not None))  # each pair's leading layers (--by-layer)
    if grid_path:
        err_console.print(f"[green]saved[/] {escape(str(grid_path))}")


def _query_ranking_json(r: QueryRanking, train: ExampleView | None, queries: ExampleView | None, token_data: bool, files: bool, summed: bool) -> dict[str, Any]:
    """One query's ranking as top-k --json lists it: each ranked example with its train label, file and input (and its
    `top_tokens` with per-token parts), then the query's label, prediction, file and input (none for the `summed` row of
    compute-scores --sum-queries, which is no one query)."""
    row = dataclasses.asdict(r)
    for side in ("proponents", "opponents"):
        row[side] = [_ranked_json(e) for e in getattr(r, side)]
        for e, entry in zip(getattr(r, side), row[side], strict=True):
            entry |= {"train_label": label_json(e.train_label, token_data)} | _json_extras(train, e.train_position, "train", files)
            if e.per_token is not None:
                entry["top_tokens"] = _top_tokens(e, train)
    if summed:
        return row
    labels = {"query_label": label_json(r.query_label, token_data), "query_prediction": label_json(r.query_prediction, token_data)}
    return row | labels | _json_extras(queries, r.query_position, "query", files)


def _classes_json(train: ExampleView | None) -> dict[str, Any]:
    """`classes`, the names of data.train's labels (label i is classes[i]) that the tables show beside the numbers; none
    for data without class names (features, token ids)."""
    names = None if train is None or train.token_data else train.class_names
    return {"classes": list(names)} if names else {}


def _ranked_json(e) -> dict:
    """A ranked example's JSON row: `by_layer` / `per_token` only where the scores hold the parts, `loss` only where
    the self-influence file holds the training losses."""
    return {key: value for key, value in dataclasses.asdict(e).items() if value is not None or key not in ("by_layer", "loss", "per_token")}


TOP_TOKENS = 3  # positions shown per ranked example (--per-token)


def _top_tokens(e: RankedExample, train: ExampleView | None) -> list[dict[str, Any]]:
    """The positions carrying most of a ranked example's score, in its direction (the largest parts of a positive
    score, the most negative of a negative one), up to `TOP_TOKENS`: {position, token (token inputs only), value,
    share (of the score)}; none where no part points the score's way."""
    values = e.per_token or []
    sign = 1.0 if e.score >= 0 else -1.0
    order = sorted((t for t, v in enumerate(values) if v * sign > 0), key=lambda t: -values[t] * sign)[:TOP_TOKENS]
    ids = train.dataset[e.train_position][0].reshape(-1).tolist() if train is not None and train.token_inputs and order else None
    return [
        {"position": t} | ({"token": int(ids[t])} if ids is not None and t < len(ids) else {})
        | {"value": values[t], "share": values[t] / e.score if e.score else 0.0}
        for t in order
    ]


def _tokens_cell(e: RankedExample, train: ExampleView | None) -> str:
    """A ranking row's leading positions: `id@position share` (`@position` for inputs without token ids)."""
    return ", ".join(f"{top.get('token', '')}@{top['position']} {top['share']:.0%}" for top in _top_tokens(e, train)) or "-"


def _ranking_table(
    title: str, columns: list[tuple[str, str]], rows: list[tuple[list[Any], RankedExample | None]], section: int | None, layers: bool
) -> Table:
    """A ranking's table: each row's cells, a section line before row `section` (None: none); with `layers`
    (scores that hold their per-layer parts) a last "layers" column, each row's leading layers
    (`layer_shares`; none for a row without its ranked example) made to fit the width the other
    columns leave in the terminal, so that a row stays one line: long names are shortened, fewer
    layers named; in a table drawn as records (a narrow terminal), the width of a record's line."""
    examples = {i: e for i, (_, e) in enumerate(rows) if layers and e is not None and e.by_layer is not None}
    parts = [(e.by_layer or {}, e.score) for e in examples.values()]

    def drawn(shares: dict[int, str]) -> Table:
        table = new_table(title, columns + ([("layers", "left")] if layers else []))
        for i, (cells, _) in enumerate(rows):
            if i == section:
                table.add_section()
            table.add_row(*cells, *([shares[i]] if i in shares else []))
        return table

    if not examples:
        return drawn({})
    probe = new_table("", columns)  # the other columns alone, for the width they leave
    for cells, _ in rows:
        probe.add_row(*cells)
    table = drawn(dict(zip(examples, fitted_layer_shares(parts, room_beside(probe)), strict=True)))
    room = record_room(table, "layers")
    return table if room is None else drawn(dict(zip(examples, fitted_layer_shares(parts, room), strict=True)))


def _json_extras(view: ExampleView | None, position: int, side: str, files: bool) -> dict:
    """`<side>_input` (token ids) and `<side>_file` (when either dataset has files) of a ranked example's JSON row."""
    out = {} if view is None else {f"{side}_{key}": value for key, value in view.extras(position).items()}
    if files:
        out.setdefault(f"{side}_file", "-")
    return out


SELF_GRID_COLUMNS = 10  # tiles per row of the --self picture


def _file_line(view: ExampleView, position: int) -> list[str]:
    """A tile's line naming an image folder's example by its file name (its class is on the label line)."""
    return [view.file(position).rpartition("/")[2]] if view.has_files else []


def _train_tiles(train: ExampleView, entries, kind: str, noise: bool = False, predicted=None):
    """Tiles of ranked training examples; with `noise`, a label that label noise replaced shows what it was;
    `predicted`: [n_train] predicted classes, shown on a line of their own."""
    from influence_cli.image_grid import Tile

    names = train.class_names
    tiles = []
    for e in entries:
        was = train.clean_label(e.train_position) if noise else None
        label = f"#{e.train_index} · {label_text(e.train_label, names, train.token_data)}" + ("" if was is None else f" (was {label_text(was, names)})")
        guess = [] if predicted is None else [f"pred {label_text(int(predicted[e.train_position]), names)}"]
        loss = [] if e.loss is None else [f"loss {e.loss:.3g}"]  # self-influence rankings
        tiles.append(Tile(train.image(e.train_position), [label, *_file_line(train, e.train_position), *guess, f"{e.score:+.3g}", *loss], kind))
    return tiles


def _pairwise_grid(
    cfg, meta, selection, k: int, opponents: bool, rankings, path: Path, train: ExampleView, queries: ExampleView, plain: bool = False
) -> Path:
    """The rankings as a picture; relative scores that keep their norms show plain and relative influence, one above the other."""
    from influence_cli import topk
    from influence_cli.image_grid import GridGroup, GridRow, Tile, save_image_grid

    def rows(ranks) -> list[GridRow]:
        out = []
        for r in ranks:
            q = Tile(
                queries.image(r.query_position),
                [
                    f"query #{r.query_index}",
                    *_file_line(queries, r.query_position),
                    *(f"{what} {label_text(value, queries.class_names, queries.token_data)}" for what, value in (("label", r.query_label), ("pred", r.query_prediction))),
                ],
                "query",
            )
            out.append(GridRow(q, _train_tiles(train, r.proponents, "proponent"), _train_tiles(train, r.opponents, "opponent")))
        return out

    notes = ("no positive score", "no negative score" if opponents else None)
    groups = []
    if meta.relative and meta.has_norms:  # both rankings, whichever one `rankings` is (top-k --plain)
        other = topk.top_k(cfg.output_path, selection, k, largest=True, smallest=opponents, plain=not plain)
        plain_ranks, relative_ranks = (rankings, other) if plain else (other, rankings)
        groups.append(GridGroup("influence", rows(plain_ranks), empty_notes=notes))
        groups.append(GridGroup("relative influence (RelatIF)", rows(relative_ranks), empty_notes=notes))
    else:
        groups.append(GridGroup("relative influence (RelatIF)" if meta.relative else "influence", rows(rankings), empty_notes=notes))
    title = f"{meta.metadata.get('strategy')} · measurement {meta.metadata.get('measurement')} · positive = helpful"
    return save_image_grid(path, groups, title=title)


def _self_grid(train: ExampleView, ranked, path: Path, predicted=None, title: str = "most self-influential training examples") -> Path:
    from influence_cli.image_grid import GridGroup, GridRow, save_image_grid

    tiles = _train_tiles(train, ranked, "proponent", noise=train.has_label_noise, predicted=predicted)
    rows = [GridRow(None, tiles[i : i + SELF_GRID_COLUMNS]) for i in range(0, len(tiles), SELF_GRID_COLUMNS)]  # wrapped, in rank order
    return save_image_grid(path, GridGroup(title, rows, proponents_label="self-influence"))
