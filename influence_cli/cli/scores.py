"""`influence compute-scores` and `influence top-k`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.text import Text

from influence_cli.cli.app import ConfigArg, JsonOpt, OverwriteOpt, ResumeOpt, SetOpt, command, load
from influence_cli.cli.render import (
    RichProgress,
    err_console,
    human_bytes,
    input_ids_reader,
    label_text,
    layer_label,
    new_table,
    out_console,
    print_json,
    print_table,
)
from influence_cli.errors import UsageError

SCORES_EPILOG = """\
**Examples**

  influence compute-scores configs/digits.yaml

  influence compute-scores configs/mnist.yaml --relative --set scores.max_memory_mb=256 --overwrite

  influence compute-scores configs/mnist.yaml --set factors.amp=bfloat16 --overwrite

  torchrun --nproc_per_node=4 -m influence_cli compute-scores configs/mnist.yaml --self --set device=cuda
"""

TOPK_EPILOG = """\
**Examples**

  influence top-k configs/digits.yaml --query 0:5 --k 5

  influence top-k configs/mnist.yaml --query 3 --query 10:12 --image-grid runs/mnist/top5.png

  influence top-k configs/mnist.yaml --self --k 20 --json
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
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Score every (query, training example) pair with the fitted factors and save OUTPUT_DIR/scores.safetensors.

    I(z, x) = ∇L(z)ᵀ (F + λ)⁻¹ ∇L(x), summed over the tracked layers, with z from data.query
    (gradient of task.measurement: loss or margin) and x from data.train. The query gradients are
    preconditioned once; the training set is streamed with one matrix product per layer and batch.
    Score matrices larger than scores.max_memory_mb are written as shards by train range plus
    scores.index.json. Read them with `influence top-k`. With scores.checkpoints (an ensemble), the
    scores are averaged over model.checkpoint and every listed checkpoint, each with the factors
    fit-factors fitted for it.

    Sign convention: a positive score means the training example helps the query: up-weighting it
    lowers the query's loss (a proponent); negative means it hurts (an opponent). A score is N × the
    classical per-example influence (N = training examples): removing the example changes the query's
    measurement by about +score/N (leaving out a proponent raises the query's loss).
    """
    from influence_cli.distributed import init_distributed
    from influence_cli.scores import compute_scores

    if self_ and relative is not None:
        raise UsageError("--relative/--no-relative: not used with --self (self-influence is ∇L(x)ᵀ(F+λ)⁻¹∇L(x), one number per example)")
    cfg = load(config, set_)
    state = init_distributed(cfg.device, cfg.source)
    report = compute_scores(
        cfg, overwrite=overwrite, resume=resume, self_influence=self_, relative=relative, state=state, progress=RichProgress(not json_)
    )
    if not state.is_main:
        return
    if json_:
        data = dataclasses.asdict(report)
        data["paths"] = [str(p) for p in report.paths]
        print_json(data)
        return
    if report.resumed_from == "already complete":
        err_console.print(f"{escape(str(report.paths[0]))} is already complete for these settings; nothing to do (--overwrite recomputes)")
        return
    if report.resumed_from:
        err_console.print(f"resumed from {report.resumed_from}")
    if report.kind == "self":
        title = f"self-influence of {report.n_train:,} training examples ({report.strategy})"
    else:
        variant = "relative influence (RelatIF)" if report.relative else "influence"
        title = (
            f"{variant}: {report.n_query:,} queries × {report.n_train:,} training examples "
            f"({report.strategy}, measurement {report.measurement})"
        )
    if report.members > 1:
        title += f", averaged over an ensemble of {report.members} models (damping below: model.checkpoint's)"
    out_console().print(title, markup=False)
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
            except ValueError:
                raise UsageError(f"--query {text!r}: expected N or START:STOP (e.g. --query 3 or --query 0:10)") from None
    return out


@command("top-k", rank_0=True, epilog=TOPK_EPILOG)
def top_k_cmd(
    config: ConfigArg,
    query: Annotated[
        list[str] | None,
        typer.Option("--query", "-q", metavar="ROWS", help="Query positions (rows of the scores): 3, 0:10, 5: (repeatable; default: all)."),
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, metavar="N", help="Examples per ranking (at most: proponents are positive scores, opponents negative).")] = 5,
    self_: Annotated[bool, typer.Option("--self", metavar="", help="Rank training examples by self-influence (from compute-scores --self).")] = False,
    opponents: Annotated[
        bool, typer.Option("--opponents/--no-opponents", metavar="", help="Also list the opponents (most negative scores).")
    ] = True,
    image_grid: Annotated[
        Path | None,
        typer.Option("--image-grid", help="Also draw the rankings as a picture (PNG, or any format Pillow writes, by the suffix; replaced if it exists): one row per query.", show_default=False),
    ] = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Print each query's top-k proponents and opponents from the scores of compute-scores.

    Reads the scores of any size, streaming over shards, and prints one table per query:
    rank, training index, label and score, under a line with the query's index, label and
    prediction. With --self, lists the most self-influential training examples (candidates for
    mislabeled or memorized data).

    Sign convention: a positive score means the training example helps the query: up-weighting it
    lowers the query's loss (a proponent); negative means it hurts (an opponent). A score is N × the
    classical per-example influence (N = training examples): removing the example changes the query's
    measurement by about +score/N (leaving out a proponent raises the query's loss).
    """
    from influence_cli import storage, topk

    cfg = load(config, set_)
    out_dir = cfg.output_path
    if image_grid is not None:
        storage.check_image_path(image_grid, "--image-grid")  # before any reading
    if self_:
        if query:
            raise UsageError("--query: not used with --self (self-influence ranks the training set)")
        self_influence = topk.load_self_influence(out_dir)
        loaded = topk.check_scores_match(self_influence.metadata, cfg, out_dir / storage.SELF_INFLUENCE_FILE, pairwise=False)
        ranked = topk.self_top_k(self_influence, k)
        grid_path = _self_grid(cfg, ranked, image_grid, loaded) if image_grid is not None else None
        inputs = _token_inputs(cfg, loaded, ["data.train"])  # a language model's examples are shown by their input ids
        files, names = _example_files(cfg, loaded, ["data.train"])  # image folders: each example's file
        noise = _label_noise(cfg, loaded, ranked)
        if json_:
            rows = [
                dataclasses.asdict(r) | ({"train_input": inputs[0](r.train_position)} if inputs else {})
                | ({"train_file": files[0](r.train_position)} if files else {})
                | ({"noisy": noise.clean_label[i] is not None, "clean_label": noise.clean_label[i]} if noise else {})
                for i, r in enumerate(ranked)
            ]  # fmt: skip
            print_json(
                {"output_dir": str(out_dir), "strategy": self_influence.metadata.get("strategy"), "k": k, "self_influence": rows}
                | ({"label_noise": {"flipped": noise.flipped, "train": noise.train, "in_top_k": noise.in_top_k}} if noise else {})
                | ({"image_grid": str(Path(grid_path).resolve())} if grid_path else {})
            )
            return
        shown = "input" if inputs else "label"
        table = new_table(f"most self-influential training examples (top {len(ranked)})", [("rank", "right"), ("train index", "right")]
                          + ([("file", "left")] if files else []) + [(shown, "left")] + ([("label noise", "left")] if noise else [])
                          + [("self-influence", "right")])  # fmt: skip
        for i, r in enumerate(ranked):
            cell = label_text(inputs[0](r.train_position) if inputs else r.train_label, names[0])
            flipped = [] if not noise else ["" if noise.clean_label[i] is None else f"flipped from {label_text(noise.clean_label[i], names[0])}"]
            table.add_row(str(r.rank), str(r.train_index), *([files[0](r.train_position)] if files else []), cell, *flipped, f"{r.score:.5g}")
        print_table(table)
        if noise:
            out_console().print(
                f"label noise: {noise.in_top_k} of these {len(ranked)} carry a flipped label "
                f"({noise.flipped} of the {noise.train} training examples do, {noise.flipped / noise.train:.1%})",
                markup=False,
            )
        if grid_path:
            err_console.print(f"[green]saved[/] {escape(str(grid_path))}")
        return

    selection = parse_query_option(query)
    meta = topk.load_scores_meta(out_dir)
    loaded = topk.check_scores_match(meta.metadata, cfg, meta.files[0].path if len(meta.files) == 1 else out_dir / storage.SCORES_INDEX)
    if cfg.scores.relative != meta.relative:  # not refused: compute-scores --relative overrides the config
        which = "relative (RelatIF)" if meta.relative else "plain"
        err_console.print(
            f"[bold yellow]note:[/] the scores in {escape(str(out_dir))} are {which} influence, the config has scores.relative: "
            f"{str(cfg.scores.relative).lower()}; showing them as they are (compute-scores --overwrite scores as the config says)",
            soft_wrap=True,
        )
    rankings = topk.top_k(out_dir, selection, k, largest=True, smallest=opponents)
    grid_path = _pairwise_grid(cfg, meta, selection, k, opponents, rankings, image_grid, loaded) if image_grid is not None else None
    inputs = _token_inputs(cfg, loaded, ["data.train", "data.query"])  # a language model's examples are shown by their input ids
    files, names = _example_files(cfg, loaded, ["data.train", "data.query"])  # image folders: each example's file
    if json_:
        queries = []
        for r in rankings:
            row = dataclasses.asdict(r)
            for key, read, side_key in (("input", inputs, "train_input"), ("file", files, "train_file")):
                if read:
                    row[f"query_{key}"] = read[1](r.query_position)
                    for side in ("proponents", "opponents"):
                        for e, entry in zip(getattr(r, side), row[side], strict=True):
                            entry[side_key] = read[0](e.train_position)
            queries.append(row)
        print_json(
            {
                "output_dir": str(out_dir),
                "relative": meta.relative,
                "measurement": meta.metadata.get("measurement"),
                "strategy": meta.metadata.get("strategy"),
                "k": k,
                "queries": queries,
            }
            | ({"image_grid": str(Path(grid_path).resolve())} if grid_path else {})
        )
        return
    variant = "relative influence" if meta.relative else "influence"

    def cells(e) -> list[str]:
        return ([files[0](e.train_position)] if files else []) + [label_text(inputs[0](e.train_position) if inputs else e.train_label, names[0])]

    blank = [""] * (2 if files else 1)
    for r in rankings:
        shown = f"input {label_text(inputs[1](r.query_position))} · " if inputs else ""
        shown += f"file {files[1](r.query_position)} · " if files else ""
        title = (
            f"query {r.query_position} · index {r.query_index} · {shown}label {label_text(r.query_label, names[1])} · "
            f"predicted {label_text(r.query_prediction, names[1])}"
        )
        columns = [("", "left"), ("rank", "right"), ("train index", "right")] + ([("file", "left")] if files else [])
        table = new_table(title, [*columns, ("input" if inputs else "label", "left"), (variant, "right")])
        for e in r.proponents:
            table.add_row(Text("proponent", style="green"), str(e.rank), str(e.train_index), *cells(e), f"{e.score:+.5g}")
        if not r.proponents:
            table.add_row(Text("proponent", style="green"), "-", "", *blank, "no positive score")
        if opponents:
            table.add_section()
        for e in r.opponents:
            table.add_row(Text("opponent", style="red"), str(e.rank), str(e.train_index), *cells(e), f"{e.score:+.5g}")
        if opponents and not r.opponents:
            table.add_row(Text("opponent", style="red"), "-", "", *blank, "no negative score")
        print_table(table)
    if grid_path:
        err_console.print(f"[green]saved[/] {escape(str(grid_path))}")


@dataclasses.dataclass
class _LabelNoise:
    """data.train's planted label noise (`label_noise`) at the ranked examples."""

    clean_label: list  # per ranked example: its label before the noise flipped it, or None where it was not flipped
    in_top_k: int  # ranked examples with a flipped label
    flipped: int  # flipped labels in the whole training set
    train: int  # training examples


def _label_noise(cfg, loaded: dict, ranked) -> _LabelNoise | None:
    """Which ranked examples carry a label that data.train.label_noise flipped; None without label noise."""
    if not cfg.data.train.label_noise:
        return None
    (train,) = _datasets(cfg, ["data.train"], loaded)
    mask = train.noisy_mask
    clean = [train.clean_labels[r.train_position].tolist() if bool(mask[r.train_position]) else None for r in ranked]
    return _LabelNoise(clean, sum(c is not None for c in clean), int(mask.sum()), len(mask))


def _token_inputs(cfg, loaded: dict, which: list[str]):
    """For a language model, one function per data key in `which`: position -> the example's input
    token ids without padding (list of int); None for other tasks."""
    if cfg.task.kind != "language_modeling":
        return None
    return [input_ids_reader(ds, cfg.data.padding_value) for ds in _datasets(cfg, which, loaded)]


def _example_files(cfg, loaded: dict, which: list[str]):
    """(One function per data key in `which`: position -> the example's file, or None when no
    source has files; each key's class names, or None.) Image folders name both."""
    present = [key for key in which if (cfg.data.train if key == "data.train" else cfg.data.query) is not None]
    found = dict(zip(present, _datasets(cfg, present, loaded), strict=True))  # scores of a config without data.query still rank
    datasets = [found.get(key) for key in which]
    names = [None if ds is None else ds.class_names for ds in datasets]
    if not any(ds is not None and ds.has_files for ds in datasets):
        return None, names
    return [lambda p, ds=ds: (ds.example_file(p) if ds is not None else None) or "-" for ds in datasets], names


def _datasets(cfg, which: list[str], loaded: dict):
    """The data specs named in `which` (data.train / data.query): those `topk.check_scores_match` loaded
    (and matched to the scores), the others loaded here."""
    from influence_cli.data import load_dataset
    from influence_cli.models import load_model, takes_token_ids

    out = []
    embedding_model = None
    for key in which:
        spec = cfg.data.train if key == "data.train" else cfg.data.query
        if spec is None:
            from influence_cli.errors import ConfigError

            raise ConfigError(f"{key}: missing in the config (top-k reads its examples)", source=cfg.source)
        if key not in loaded and embedding_model is None:  # token ids are not drawn as images
            embedding_model = takes_token_ids(load_model(cfg.model, cfg.base_dir))
        out.append(loaded[key] if key in loaded else load_dataset(spec, cfg.base_dir, name=key, seed=cfg.seed, embedding_model=bool(embedding_model)))
    return out


def _train_tiles(train, entries, kind: str, clean: list | None = None):
    """Tiles of ranked training examples; `clean`: per entry, the label before label noise flipped it, or None."""
    from influence_cli.data import example_image
    from influence_cli.image_grid import Tile

    names = train.class_names
    clean = clean or [None] * len(entries)
    return [
        Tile(
            example_image(train, e.train_position),
            [f"#{e.train_index} · {label_text(e.train_label, names)}" + ("" if was is None else f" (was {label_text(was, names)})"), f"{e.score:+.3g}"],
            kind,
        )
        for e, was in zip(entries, clean, strict=True)
    ]


def _pairwise_grid(cfg, meta, selection, k: int, opponents: bool, rankings, path: Path, loaded: dict) -> Path:
    from influence_cli import topk
    from influence_cli.data import example_image
    from influence_cli.image_grid import GridGroup, GridRow, Tile, save_image_grid

    train, queries = _datasets(cfg, ["data.train", "data.query"], loaded)

    def rows(ranks) -> list[GridRow]:
        out = []
        for r in ranks:
            q = Tile(
                example_image(queries, r.query_position),
                [f"query #{r.query_index}", f"y {label_text(r.query_label, queries.class_names)} · pred {label_text(r.query_prediction, queries.class_names)}"],
                "query",
            )
            out.append(GridRow(q, _train_tiles(train, r.proponents, "proponent"), _train_tiles(train, r.opponents, "opponent")))
        return out

    notes = ("no positive score", "no negative score" if opponents else None)
    groups = []
    if meta.relative and meta.has_norms:
        plain = topk.top_k(cfg.output_path, selection, k, largest=True, smallest=opponents, plain=True)
        groups.append(GridGroup("influence", rows(plain), empty_notes=notes))
        groups.append(GridGroup("relative influence (RelatIF)", rows(rankings), empty_notes=notes))
    else:
        groups.append(GridGroup("relative influence (RelatIF)" if meta.relative else "influence", rows(rankings), empty_notes=notes))
    title = f"{meta.metadata.get('strategy')} · measurement {meta.metadata.get('measurement')} · positive = helpful"
    return save_image_grid(path, groups, title=title)


def _self_grid(cfg, ranked, path: Path, loaded: dict) -> Path:
    from influence_cli.image_grid import GridGroup, GridRow, save_image_grid

    (train,) = _datasets(cfg, ["data.train"], loaded)
    noise = _label_noise(cfg, loaded, ranked)
    row = GridRow(None, _train_tiles(train, ranked, "proponent", noise.clean_label if noise else None))
    return save_image_grid(path, GridGroup("most self-influential training examples", [row], proponents_label="self-influence"))
