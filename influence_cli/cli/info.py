"""`influence info`: what produced an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from influence_cli.cli.app import JsonOpt, command
from influence_cli.cli.render import new_table, print_json, print_table

INFO_EPILOG = """\
**Examples**

  influence info runs/digits/factors.safetensors

  influence info runs/digits/scores.safetensors --json
"""


@command("info", epilog=INFO_EPILOG)
def info_cmd(
    path: Annotated[Path, typer.Argument(help="A factors, scores or similarity file written by this tool.")],
    json_: JsonOpt = False,
) -> None:
    """Show the metadata of an output: format, versions, strategy, fingerprints, tensors (--json adds the resolved config)."""
    from safetensors import safe_open

    from influence_cli import storage

    meta = storage.read_metadata(path)
    with safe_open(str(path), framework="pt") as fh:
        shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    decoded = {k: storage.meta_json(meta, k) for k in meta}
    if json_:
        print_json({"path": str(path), "metadata": decoded, "tensors": shapes})
        return
    table = new_table(str(path), [("field", "left"), ("value", "left")])
    for key, value in sorted(decoded.items()):
        if key == "config":
            continue
        table.add_row(key, str(value))
    table.add_row("tensors", f"{len(shapes)} ({', '.join(list(shapes)[:6])}{', …' if len(shapes) > 6 else ''})")
    print_table(table)
