"""`influence dataset-similarity`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape

from influence_cli.cli.app import ConfigArg, JsonOpt, OverwriteOpt, ResumeOpt, SetOpt, command, load
from influence_cli.cli.render import RichProgress, err_console, new_table, print_json, print_read_back, print_resumed, print_table

SIMILARITY_EPILOG = """\
**Examples**

  influence dataset-similarity configs/digits.yaml --heatmap runs/digits/similarity.png

  influence dataset-similarity configs/mnist_similarity.yaml --method task2vec --json --overwrite

  torchrun --nproc_per_node=4 -m influence_cli dataset-similarity configs/mnist_similarity.yaml --set device=cuda
"""

TITLES = {
    "kernel_normalized": "normalized Fisher kernel K(S,T)/√(K(S,S)·K(T,T))",
    "task2vec_cosine": "Task2Vec cosine similarity of the Fisher diagonals",
    "task2vec_distance": "Task2Vec normalized distance",
}


PLAIN_TITLES = {  # the heatmap's default font has no √
    "kernel_normalized": "normalized Fisher kernel K(S,T) / sqrt(K(S,S) K(T,T))",
    "task2vec_cosine": "Task2Vec: cosine similarity of the Fisher diagonals",
}


def _cell(value: float) -> str:
    return f"{value:.3f}"


def _matrix_table(title: str, names: list[str], matrix, extra: list[tuple[str, list[str]]] = ()):
    """Names on both axes, the matrix in the cells, then `extra` (header, one value per row) columns.

    Columns are headed by number ("(1)", ...) and rows by number and full name, so that long
    dataset names stay readable on narrow terminals.
    """
    columns = [("dataset", "left")] + [(f"({j + 1})", "right") for j in range(len(names))] + [(h, "right") for h, _ in extra]
    table = new_table(title, columns)
    table.columns[0].overflow = "fold"
    for col in table.columns[1:]:
        col.no_wrap = True
    for i, name in enumerate(names):
        cells = [_cell(float(matrix[i, j])) for j in range(len(names))]
        table.add_row(f"({i + 1}) {name}", *cells, *[values[i] for _, values in extra])
    return table


@command("dataset-similarity", resumable=True, epilog=SIMILARITY_EPILOG)
def dataset_similarity_cmd(
    config: ConfigArg,
    method: Annotated[
        Literal["fisher-kernel", "task2vec"] | None,
        typer.Option(
            "--method", help="Headline matrix: fisher-kernel or task2vec (default: similarity.method). Both are always saved."
        ),
    ] = None,
    heatmap: Annotated[
        Path | None, typer.Option("--heatmap", help="Also write the headline matrix as a labelled heatmap here (PNG, or any format Pillow writes, by the suffix); its colours span the values off the diagonal.")
    ] = None,
    set_: SetOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Compare the datasets of similarity.datasets through the model's Fisher, using the factors of fit-factors.

    Each dataset is streamed once. **fisher-kernel** (default): K(S,T) is the mean (plain, loss) influence score
    ∇L(s)ᵀ(F+λ)⁻¹∇L(t) over all pairs s in S, t in T, i.e. the datasets' mean loss gradients compared
    through the inverse curvature; the table shows the normalized form K(S,T)/√(K(S,S)·K(T,T)) in [-1, 1]
    (1 = same direction, 0 = unrelated, negative = training on one raises the other's loss) and the raw
    K(S,S) (how strongly the model would still change to fit S). K(S,S) includes each example paired with itself
    (self-influence / n, often most of it), so two samples of one distribution score well below 1: compare by rank,
    with a second sample of one dataset as baseline. **task2vec**: each dataset is embedded by
    its diagonal Fisher in the eigenbasis; the table shows their cosine similarity in [0, 1] and the
    Task2Vec normalized distance (0 = same). The diagonal uses similarity.fisher (null = the factors'
    Fisher kind); a one-sample `sampled` Fisher is noisy on small datasets, similarity.fisher=ggn removes that noise.
    Neither reads the datasets' labels (the model's predictions stand in for them): a copy with other labels gets the
    same embedding, except under `empirical`. Everything, with
    per-dataset embeddings, is saved to OUTPUT_DIR/similarity.safetensors; run again with the same settings, the command
    shows that result (with any --method or --heatmap) without recomputing it, and --overwrite recomputes.
    An interrupted run continues with --resume (progress is saved every factors.checkpoint_every batches and after
    each dataset).
    """
    from influence_cli.distributed import init_distributed
    from influence_cli.similarity import dataset_similarity

    cfg = load(config, set_, "dataset_similarity")
    if heatmap is not None:
        from influence_cli.storage import check_image_path

        check_image_path(heatmap, "--heatmap")  # fail before the passes, not after
    state = init_distributed(cfg.device, cfg.source)
    report = dataset_similarity(cfg, method=method, overwrite=overwrite, resume=resume, state=state, progress=RichProgress(not json_))
    if not state.is_main:
        return
    if heatmap is not None:
        from influence_cli.heatmap import save_heatmap

        save_heatmap(heatmap, report.headline, report.names, PLAIN_TITLES[report.headline_name])
    if json_:
        data = report.to_dict()
        if heatmap is not None:
            data["heatmap"] = str(Path(heatmap).resolve())
        print_json(data)
        return
    sizes = [f"{n:,}" for n in report.sizes]
    if report.method == "fisher-kernel":
        raw = [f"{float(report.kernel[i, i]):.4g}" for i in range(len(report.names))]
        print_table(
            _matrix_table(TITLES["kernel_normalized"], report.names, report.kernel_normalized, [("K(S,S)", raw), ("n", sizes)])
        )
    else:
        print_table(_matrix_table(TITLES["task2vec_cosine"], report.names, report.task2vec_cosine, [("n", sizes)]))
        print_table(_matrix_table(TITLES["task2vec_distance"], report.names, report.task2vec_distance))
    sizes_text = ", ".join(f"{name} {n}" for name, n in zip(report.names, sizes, strict=True))
    fishers = f"{report.factors_fisher} Fisher" + (
        f" (Task2Vec diagonals: {report.fisher})" if report.fisher != report.factors_fisher else ""
    )
    err_console.print(f"examples: {escape(sizes_text)}; {report.strategy} factors, {fishers}")
    if report.from_file:
        print_read_back(report.path, heatmap)
        return
    print_resumed(report.resumed_from)
    saved = f"[green]saved[/] {escape(str(report.path))}" + (f" and {escape(str(heatmap))}" if heatmap is not None else "")
    err_console.print(f"{saved} ({report.seconds.get('total', 0.0):.2f}s)")
