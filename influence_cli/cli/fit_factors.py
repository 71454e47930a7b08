"""`influence fit-factors` and `influence inspect`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from influence_cli.cli.app import ConfigArg, JsonOpt, OverwriteOpt, ResumeOpt, SetOpt, command, load
from influence_cli.cli.render import (
    RichProgress,
    err_console,
    layer_label,
    new_table,
    print_json,
    print_line,
    print_resumed,
    print_table,
)
from influence_cli.errors import human_bytes

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from influence_cli.fit import LayerInfo

FIT_EPILOG = """\
**Examples**

  influence fit-factors configs/digits.yaml

  influence fit-factors configs/mnist.yaml --set factors.strategy=kfac --set factors.fisher=ggn --overwrite

  influence fit-factors configs/mnist.yaml --set factors.amp=bfloat16 --overwrite

  torchrun --nproc_per_node=4 -m influence_cli fit-factors configs/mnist.yaml --set device=cuda
"""


@command("fit-factors", resumable=True, epilog=FIT_EPILOG)
def fit_factors_cmd(
    config: ConfigArg,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Fit the curvature (EKFAC by default) on data.train and save it as OUTPUT_DIR/factors.safetensors
    (FACTORS_DIR/factors.safetensors when the config sets factors_dir).

    Streams the training set in two passes for ekfac (covariances A and G, then the eigenvalue
    correction; one pass for kfac and diagonal, none for identity), with progress bars on stderr,
    and prints a summary of what was fitted. With scores.checkpoints (an ensemble), also fits each listed
    checkpoint's own factors, those of scores.checkpoints[N - 1] into members/N/ beside factors.safetensors;
    with --resume, only those without factors (a checkpoint added to the list).
    """
    from influence_cli.distributed import init_distributed
    from influence_cli.fit import fit_factors

    cfg = load(config, set_, "fit_factors")
    state = init_distributed(cfg.device, cfg.source)
    report = fit_factors(cfg, overwrite=overwrite, resume=resume, state=state, progress=RichProgress(not json_))
    if not state.is_main:
        return
    if json_:
        print_json(
            {
                "path": str(report.path),
                "strategy": report.strategy,
                "fisher": report.fisher,
                "num_examples": report.num_examples,
                "seconds": report.seconds,
                "resumed_from": report.resumed_from,
                "layers": [dataclasses.asdict(layer) for layer in report.layers],
                "skipped_layers": [dataclasses.asdict(u) for u in report.skipped],
                "members": [{"member": m.member, "path": str(m.path), "seconds": m.seconds, "resumed_from": m.resumed_from} for m in report.members],
            }
        )
        return
    if all(r.resumed_from == "already complete" for r in [report, *report.members]):
        err_console.print(f"{escape(str(report.path))} is already complete for these settings; nothing to do (--overwrite refits)")
        return
    for r in [report, *report.members]:  # each model of an ensemble says where it started
        which = f"ensemble member {r.member}: " if report.members else ""
        if r.resumed_from == "already complete":
            err_console.print(f"{which}{escape(str(r.path))} is already complete for these settings")
        else:
            print_resumed(r.resumed_from, which)
    zeros = any(layer.zero_inputs or layer.zero_outputs for layer in report.layers)
    columns = [("layer", "left"), ("kind", "left"), ("weight", "left"), ("A", "right"), ("G", "right"), ("Λ", "right")]
    title = f"{report.strategy} factors ({report.fisher} Fisher) on {report.num_examples:,} examples"
    if report.strategy == "identity":
        title = "identity: no curvature to fit (scores are plain gradient dot products)"
    table = new_table(
        title,
        columns + ([("always 0: in / out", "right")] if zeros else []),
    )
    table.columns[2].no_wrap = True  # a shape folded in a narrow terminal ("64×6" / "4") would read as another
    for layer in report.layers:
        row = [
            layer_label(layer.name),
            kind_label(layer),
            "×".join(map(str, layer.weight_shape)),
            f"{layer.d_in}²" if layer.a_size else "-",
            f"{layer.d_out}²" if layer.g_size else "-",
            f"{layer.d_out}×{layer.d_in}" if layer.eigenvalue_size else "-",
        ]
        table.add_row(*row, *([f"{layer.zero_inputs or 0} / {layer.zero_outputs or 0}"] if zeros else []))
    print_table(table)
    if zeros:
        err_console.print(
            "always 0: inputs (columns of [W | b]) and outputs that were 0 on every example: blank pixels, "
            "zero padding, dead units; their curvature is exactly 0 and they are left out of the eigendecompositions"
        )
    if report.skipped:  # layers a user may expect in the scores, grouped by why they are not
        groups: dict[str, list[str]] = {}
        for u in report.skipped:
            groups.setdefault(f"{u.kind}: {u.reason}", []).append(u.name)
        for why, names in groups.items():
            err_console.print(f"not tracked: {escape(_first_names(names))} ({escape(why)})")
        err_console.print("[dim]`influence inspect` lists every parameter the scores leave out[/]")
    for r in [report, *report.members]:
        if r.resumed_from == "already complete":  # said above; not written by this run
            continue
        timing = ", ".join(f"{k} {v:.2f}s" for k, v in r.seconds.items())
        size = Path(r.path).stat().st_size
        which = f"ensemble member {r.member}: " if report.members else ""
        err_console.print(f"[green]saved[/] {which}{escape(str(r.path))} ({human_bytes(size)}){'; ' + timing if timing else ''}")


def kind_label(layer: LayerInfo) -> str:
    """The kind column: a transformers Conv1D (weight stored in × out) says so beside `linear`."""
    return f"{layer.kind} (Conv1D)" if layer.transposed else layer.kind


def _first_names(names: list[str]) -> str:
    """Up to three names, then how many there are in all (a deep model has many norms)."""
    return ", ".join(names[:3]) + (f", … ({len(names)} in all)" if len(names) > 3 else "")


INSPECT_EPILOG = """\
**Examples**

  influence inspect configs/digits.yaml

  influence inspect configs/mnist.yaml --set 'factors.modules=["fc*"]' --json
"""


@command("inspect", rank_0=True, epilog=INSPECT_EPILOG)
def inspect_cmd(config: ConfigArg, set_: SetOpt = None, json_: JsonOpt = False) -> None:
    """List the layers fit-factors would track, with their shapes and factor sizes (nothing is computed).

    The list comes from the model's modules; the model is not run, so a layer its forward never
    calls, or calls in a way the factors cannot follow, is named by fit-factors on its first batch.
    """
    from influence_cli import notices
    from influence_cli.fit import describe_layers, large_factor_warning
    from influence_cli.models import load_model
    from influence_cli.scores import query_memory
    from influence_cli.tracking import find_tracked_modules, frozen_layers_warning, untracked_modules

    cfg = load(config, set_, "inspect")
    model = load_model(cfg.model, cfg.base_dir)  # on the CPU and unhashed: nothing here runs it
    tracked = find_tracked_modules(model, cfg.factors.modules, trainable_only=cfg.factors.trainable_only)
    rows = describe_layers(tracked, cfg.factors.strategy)
    untracked = untracked_modules(model, tracked, trainable_only=cfg.factors.trainable_only)
    models = 1 + len(cfg.scores.checkpoints)  # an ensemble: fit-factors writes each model's factors
    factor_bytes = models * sum(r.factor_bytes() for r in rows)
    tracked_params = sum(r.d_in * r.d_out for r in rows)
    parameters = sum(p.numel() for p in model.parameters())  # each once (tied or parametrized weights too)
    query_bytes, queries_per_chunk = query_memory(cfg, model, tracked_params)
    if (large := large_factor_warning(rows)) is not None:
        notices.warn(large)
    if (frozen := frozen_layers_warning(model, tracked, cfg.factors.modules)) is not None:
        notices.warn(frozen)
    if json_:
        print_json({
            "strategy": cfg.factors.strategy,
            "layers": [dataclasses.asdict(r) for r in rows],
            "untracked": [dataclasses.asdict(u) for u in untracked],
            "factor_bytes": factor_bytes,
            "tracked_parameters": tracked_params,
            "parameters": parameters,
            "query_bytes": query_bytes,
            "queries_per_chunk": queries_per_chunk,
        })  # fmt: skip
        return
    table = new_table(
        f"tracked layers ({cfg.factors.strategy})",
        [("layer", "left"), ("kind", "left"), ("weight", "left"), ("[W | b]", "right"), ("params", "right"), ("factors", "right")],
    )
    table.columns[0].overflow = "fold"
    table.columns[2].no_wrap = True  # a shape folded in a narrow terminal ("64×6" / "4") would read as another
    for r in rows:
        table.add_row(
            layer_label(r.name), kind_label(r), "×".join(map(str, r.weight_shape)), f"{r.d_out}×{r.d_in}", f"{r.d_in * r.d_out:,}", human_bytes(r.factor_bytes())
        )
    print_table(table)
    if untracked:  # grouped by kind and reason: a deep model has many norms
        groups: dict[tuple[str, str], list] = {}
        for u in untracked:
            groups.setdefault((u.kind, u.reason), []).append(u)
        table = new_table("parameters left out of the scores", [("kind", "left"), ("modules", "left"), ("params", "right"), ("why", "left")])
        table.columns[1].overflow = "fold"
        for (kind, reason), members in groups.items():
            table.add_row(kind, _first_names([u.name for u in members]), f"{sum(u.num_params for u in members):,}", reason)
        print_table(table)
    print_line(
        f"{len(rows)} layer{'s' if len(rows) != 1 else ''}, factors {human_bytes(factor_bytes)} in float32"
        + (f" ({models} models, {human_bytes(factor_bytes // models)} each)" if models > 1 else "") + "; "
        f"{tracked_params:,} of {parameters:,} parameters tracked; compute-scores preconditions and scores up to {queries_per_chunk:,} "
        f"quer{'y' if queries_per_chunk == 1 else 'ies'} at a time ({human_bytes(query_bytes)} each), streaming the training set "
        "once per such chunk of queries"
    )
