"""`influence spectrum` and `influence edit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from influence_cli.cli.app import ConfigArg, JsonOpt, OverwriteOpt, ResumeOpt, SetOpt, command, load
from influence_cli.cli.render import (
    RichProgress,
    err_console,
    example_cells,
    example_columns,
    label_json,
    layer_label,
    new_table,
    print_json,
    print_line,
    print_read_back,
    print_resumed,
    print_table,
)
from influence_cli.errors import UsageError

LayersOpt = Annotated[
    list[str] | None, typer.Option("--layers", metavar="PATTERN", help="fnmatch pattern of the layers analysed (repeatable; default: spectrum.layers).")
]
EditLayersOpt = Annotated[
    list[str] | None,
    typer.Option("--layers", metavar="PATTERN", help="fnmatch pattern of the layers edited (repeatable; default: spectrum.edit.layers, else spectrum.layers)."),
]
OrderOpt = Annotated[
    Literal["kfac", "ekfac"] | None,
    typer.Option("--order", help="Curvature of a direction: kfac (λ_G·λ_A) or ekfac (corrected Λ*, of ekfac factors). Default: spectrum.order."),
]

SPECTRUM_EPILOG = """\
**Examples**

  influence spectrum configs/mnist_memorization.yaml --plot runs/memorization/spectrum.png --overwrite

  influence spectrum configs/mnist_memorization.yaml --top 20 --order ekfac --overwrite

  influence spectrum configs/mnist.yaml --layers head --set spectrum.mass=true --set spectrum.bottom=0.3 --set spectrum.top=0.6 --json --overwrite
"""

EDIT_EPILOG = """\
**Examples**

  influence edit configs/mnist_memorization.yaml --out runs/memorization/edited.safetensors --keep-share 0.1

  influence edit configs/mnist.yaml --out runs/mnist/edited.safetensors --rho 0.6 --layers 'fc*' --overwrite

  influence fit-factors configs/mnist.yaml --set model.checkpoint=../runs/mnist/edited.safetensors --set output_dir=../runs/mnist_edited
"""


def titled_table(title: str, columns: list[tuple[str, str]]):
    """render.new_table, at least as wide as its title (so the title stays on one line)."""
    table = new_table(title, columns)
    table.min_width = len(title) + 2
    return table


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%" if abs(value) < 0.1 else f"{100 * value:.1f}%"


def _ratio(value: float) -> str:
    return "n/a" if value != value else f"{round(100 * value):+d}%"  # an int: a tiny negative change shows as +0%, not -0%


@command("spectrum", resumable=True, epilog=SPECTRUM_EPILOG)
def spectrum_cmd(
    config: ConfigArg,
    layers: LayersOpt = None,
    order: OrderOpt = None,
    top: Annotated[int, typer.Option("--top", min=0, metavar="N", help="List each dataset's N most memorization-like examples (by --rank-by).")] = 0,
    rank_by: Annotated[
        Literal["energy", "share"],
        typer.Option("--rank-by", help="How --top ranks: energy (the largest gradient energy in the bottom band; the better detector of memorized labels) or share (the largest share of the example's own energy there)."),
    ] = "energy",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a picture of the energy per curvature percentile, one line per dataset (PNG, or any format Pillow writes, by the suffix).")] = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Measure where in the curvature spectrum each dataset's examples act (memorization), using the factors of fit-factors.

    Orders each layer's Kronecker eigenbasis directions by curvature and splits them into
    bands (spectrum.bottom / spectrum.top: shares of the directions, or of the curvature mass
    with spectrum.mass). Each dataset of spectrum.datasets (default: data.train) is streamed
    once; the table shows, per band, the mean share of an example's loss-gradient energy that
    falls in it, and how much larger or smaller it is than on the baseline dataset. Datasets
    with label noise are also split into name:noisy and name:clean. Memorized examples lean on
    low-curvature directions (Merullo et al. 2025). Per-example band energies go to
    OUTPUT_DIR/spectrum.safetensors, and --top lists the examples with the most gradient energy
    in the bottom band (--rank-by share: the largest share of their own energy there); run again
    with the same settings, the command shows that result (with any --top, --rank-by, --plot or
    spectrum.baseline) without recomputing it, and --overwrite recomputes. An interrupted run continues with --resume (progress is saved every
    factors.checkpoint_every batches and after each dataset).
    """
    from influence_cli.band_energy import BANDS, spectrum
    from influence_cli.distributed import init_distributed
    from influence_cli.spectrum_plot import save_spectrum_plot

    cfg = load(config, set_, "spectrum")
    if rank_by != "energy" and not top:
        raise UsageError(f"--rank-by {rank_by}: not used without --top (it orders the list --top asks for)", hint="add --top N")
    if plot is not None:
        from influence_cli.storage import check_image_path

        check_image_path(plot, "--plot")  # fail before the pass, not after
    state = init_distributed(cfg.device, cfg.source)
    report = spectrum(cfg, layers=layers, order=order, overwrite=overwrite, resume=resume, state=state, progress=RichProgress(not json_))
    if not state.is_main:
        return
    if plot is not None:
        save_spectrum_plot(plot, report)
    views = _views(cfg, report.loaded) if top else {}  # shown as top-k shows them: input ids, files, class names
    tokens = cfg.task.kind == "language_modeling"  # labels of token ids, never summarised
    if json_:
        data = report.to_dict(top, rank_by)
        for name, rows in data.get("top_examples", {}).items():
            for row in rows:
                row |= {"label": label_json(row["label"], tokens)} | _shown_extras(views[name], row["global_index"])
        if plot is not None:
            data["plot"] = str(Path(plot).resolve())
        print_json(data)
        return
    names = report.band_names()
    used = [k for k in range(3) if any(b.counts[k] for b in report.bands)]
    basis = "λ_G·λ_A" if report.order == "kfac" else "Λ*"
    table = titled_table(
        f"curvature bands ({report.order} order: {basis}; share of directions / of curvature)",
        [("layer", "left"), ("directions", "right")] + [(BANDS[k], "right") for k in used],
    )
    for b in report.bands:
        table.add_row(layer_label(b.name), f"{b.shape[0]}×{b.shape[1]}", *[f"{_pct(b.counts[k] / max(1, sum(b.counts)))} / {_pct(b.mass[k])}" for k in used])
    print_table(table)
    ratios = report.ratios()
    others = [g.name for g in report.groups if g.name != report.baseline]
    table = titled_table(
        f"share of gradient energy per band (mean over examples; {_layers_text(report.layers)})",
        [("band", "left")] + [(f"{g.name} (n={g.size:,})", "right") for g in report.groups] + [(f"{o} vs {report.baseline}", "right") for o in others],
    )
    for k in used:
        table.add_row(names[k], *[_pct(float(g.share[k])) for g in report.groups], *[_ratio(ratios[o][k]) for o in others])
    print_table(table)
    table = titled_table(
        f"{names[0]} share per layer: gradient energy | input energy (A-directions by λ_A)",
        [("layer", "left")] + [(g.name, "right") for g in report.groups],
    )
    for i, name in enumerate(report.layers):
        table.add_row(layer_label(name), *[f"{_pct(float(g.layer_share[i, 0]))} | {_pct(float(g.layer_input_share[i, 0]))}" for g in report.groups])
    print_table(table)
    for o in others:
        print_line(f"{names[0]}: {_ratio(ratios[o][0])} on {o} vs {report.baseline}")
    if top:
        for ds_name, rows in report.top_examples(top, rank_by).items():
            if not rows:
                why = "the bottom band has no curvature" if report.flat_bands()[0] else "no example has gradient energy in the bottom band"
                print_line(f"{ds_name}: no example ranked ({why})")
                continue
            ds = next(d for d in report.datasets if d.name == ds_name)
            noisy = bool(ds.noisy.any())
            view = views[ds_name]
            files = view.has_files
            table = titled_table(
                f"most memorization-like examples of {ds_name} (largest {names[0]} {rank_by})",
                [("rank", "right"), ("global index", "right")] + ([("file", "left")] if files else [])
                + example_columns(view)
                + ([("noisy", "left")] if noisy else []) + [("bottom energy", "right"), ("bottom share", "right"), ("gradient energy", "right")],
            )  # fmt: skip
            for r, row in enumerate(rows, start=1):
                position = _position(view, row["global_index"])
                shown = example_cells(view, position, row["label"])
                cells = [str(r), str(row["global_index"]), *([view.file(position)] if files else []), *shown] + (["yes" if row["noisy"] else ""] if noisy else [])
                table.add_row(*cells, f"{row['bottom_energy']:.3g}", _pct(row["bottom_share"]), f"{row['energy']:.3g}")
            print_table(table)
    extra = f" and {plot}" if plot is not None else ""
    if report.from_file:
        print_read_back(report.path, plot)
        return
    print_resumed(report.resumed_from)
    err_console.print(f"[green]saved[/] {escape(str(report.path))}{escape(extra)} ({report.strategy} factors, {report.fisher} Fisher; {report.seconds.get('total', 0.0):.2f}s)")


def _views(cfg, loaded: dict) -> dict:
    """The spectrum's datasets by name, as top-k shows examples (`example_views.spec_views`), from
    those the pass measured (`loaded`, by config key: neither the model nor a dataset is loaded
    again): input ids where the inputs are token ids (`ExampleView.token_inputs`), an image
    folder's files, and labels with their class names where the source has them
    (`render.example_cells`)."""
    from influence_cli.band_energy import dataset_specs
    from influence_cli.example_views import spec_views

    return spec_views(cfg, dataset_specs(cfg), loaded)


def _position(view, global_index: int) -> int:
    """A ranked example's position in its view's dataset, by its global index."""
    return int(view.dataset.position_of([global_index])[0])


def _shown_extras(view, global_index: int) -> dict:
    """`input` (token ids) and `file` (image folders) of a ranked example, by its global index."""
    return view.extras(_position(view, global_index))


@command("edit", epilog=EDIT_EPILOG)
def edit_cmd(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The edited checkpoint to write: .safetensors (with the edit's metadata), or .pt / .pth (a plain state dict for torch.load, without metadata).", show_default=False)],
    rho: Annotated[
        float | None, typer.Option("--rho", help="Keep the smallest set of highest-curvature directions holding this share of the curvature mass (directions of zero curvature are dropped even at 1; --keep-share 1 keeps every weight). Without --rho or --keep-share, spectrum.edit.keep, .rho and .share decide.")
    ] = None,
    keep_share: Annotated[float | None, typer.Option("--keep-share", help="Keep this share of the directions, highest curvature first (instead of --rho).")] = None,
    layers: EditLayersOpt = None,
    order: OrderOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace an existing --out file.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Write a checkpoint whose chosen layers keep only their high-curvature components (suppresses memorization).

    Each chosen layer's [W | b] becomes U_G (C ⊙ M) U_Aᵀ with C = U_Gᵀ [W | b] U_A in the
    Kronecker eigenbasis of the factors and M keeping the highest-curvature directions: the
    smallest set holding a share rho of the curvature mass (spectrum.edit.keep: mass, rho 0.6 as
    in Merullo et al. 2025) or a fixed share of the directions (keep: share). Every other weight
    is copied unchanged, so the file loads with the same config via --set model.checkpoint=OUT
    (fit new factors for it in another output_dir, and factors_dir=null when the config shares a fit).
    """
    from influence_cli.distributed import init_distributed
    from influence_cli.edit import edit_checkpoint

    cfg = load(config, set_, "edit_checkpoint")
    state = init_distributed(cfg.device, cfg.source)
    report = edit_checkpoint(cfg, out, rho=rho, share=keep_share, layers=layers, order=order, overwrite=overwrite, state=state)
    if not state.is_main:
        return
    if json_:
        print_json(report.to_dict())
        return
    kept = f"rho = {report.rho:g} of the curvature mass" if report.keep == "mass" else f"{report.share:.3g} of the directions"
    table = titled_table(
        f"removed low-curvature components ({report.order} order; kept {kept})",
        [("layer", "left"), ("[W | b]", "left"), ("directions", "right"), ("removed", "right"), ("removed %", "right"),
         ("‖W‖² removed", "right"), ("curvature kept", "right")],
    )  # fmt: skip
    table.columns[1].no_wrap = True  # a shape folded in a narrow terminal ("64×6" / "5") would read as another
    for layer in report.layers:
        table.add_row(
            layer_label(layer.name), f"{layer.shape[0]}×{layer.shape[1]}", f"{layer.directions:,}", f"{layer.removed:,}",
            _pct(layer.removed / max(1, layer.directions)), _pct(layer.weight_share_removed), _pct(layer.curvature_share_kept),
        )  # fmt: skip
    print_table(table)
    err_console.print(f"[green]saved[/] {escape(str(report.path))} (fingerprint {report.fingerprint}; {report.seconds.get('total', 0.0):.2f}s)")
    new_factors = " --set factors_dir=null" if cfg.factors_dir is not None else ""  # the shared fit is the original model's
    alone = " --set scores.checkpoints=[]" if cfg.scores.checkpoints else ""  # the other members are not edited
    err_console.print(
        f"[dim]hint:[/] run any command on it with --set model.checkpoint={escape(str(report.path.resolve()))} "
        f"--set output_dir=<a new folder>{new_factors}{alone}",
        soft_wrap=True,
    )


def _layers_text(layers: list[str]) -> str:
    """The analysed layers for a table title: their names when few, else how many (--json lists them)."""
    return ", ".join(map(layer_label, layers)) if len(layers) <= 3 else f"{len(layers)} layers: {layer_label(layers[0])} ... {layer_label(layers[-1])}"
