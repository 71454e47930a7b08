"""`influence info`: what produced an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from influence_cli.cli.app import JsonOpt, command
from influence_cli.cli.render import new_table, print_json, print_line, print_table

INFO_EPILOG = """\
**Examples**

  influence info runs/digits/factors.safetensors

  influence info runs/digits/scores.safetensors --json

  influence info runs/mnist/scores.index.json   # scores written as shards

  influence info runs/digits/factors.safetensors --config > configs/rerun.yaml   # run it again

  influence info runs/digits/factors.safetensors --digest   # the same bits as another run's?
"""


@command("info", rank_0=True, epilog=INFO_EPILOG)
def info_cmd(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="A factors, scores (or scores.index.json), self-influence, similarity or spectrum file, or a .safetensors checkpoint written by `influence edit`.")],
    json_: JsonOpt = False,
    config_only: Annotated[
        bool,
        typer.Option(
            "--config",
            metavar="",
            help="Print only the resolved config, as YAML a command takes: saved in the folder its relative paths resolve "
            "against (the original config's, named in its first line), it runs the same settings again.",
        ),
    ] = False,
    digest: Annotated[
        bool,
        typer.Option(
            "--digest",
            metavar="",
            help="Also show tensors_sha256, a hash of the tensors alone (names, shapes, dtypes, values; of every shard "
            "of a scores index): two runs that gave the same bits in the same layout show the same, whatever their metadata.",
        ),
    ] = False,
) -> None:
    """Show what produced an output: format, versions, strategy, fingerprints, the resolved config, tensors."""
    import json

    from influence_cli import storage
    from influence_cli.errors import OutputError, UsageError

    if config_only and (json_ or digest):
        raise UsageError(f"--config and {'--json' if json_ else '--digest'}: give one", hint="--config prints the config alone")

    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder", hint="give one of its files, such as factors.safetensors")
    if not path.is_file():
        raise OutputError(f"{str(path)!r} does not exist")
    if path.suffix == ".json":  # a sharded scores run's index
        try:
            index = json.loads(path.read_text())
            decoded = dict(index["metadata"]) | {storage.FORMAT_KEY: index.get(storage.FORMAT_KEY)}
            shapes = {s["file"]: [int(index["n_query"]), int(s["train_stop"]) - int(s["train_start"])] for s in index["shards"]}
            if not all(isinstance(name, str) for name in shapes):
                raise ValueError("a shard's 'file' is not a file name")
        except PermissionError:  # FILE's own check is skipped for a path given with ~
            raise storage.read_denied(path) from None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            why = f"no {exc.args[0]!r} key" if isinstance(exc, KeyError) else "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise OutputError(f"{str(path)!r} is not a scores index written by this tool ({why})") from None
        storage.check_shards_present(path, [path.parent / name for name in shapes])  # as top-k refuses it
        layers = decoded.get(storage.BY_LAYER)
        if isinstance(layers, list):  # each shard holds its range of the per-layer parts too
            shapes = {key: value for name, shape in shapes.items() for key, value in ((name, shape), (f"{name}:{storage.SCORES_BY_LAYER}", [len(layers), *shape]))}
        positions = decoded.get(storage.PER_TOKEN)
        if isinstance(positions, int) and not isinstance(positions, bool):  # each shard holds its range of the per-token parts too
            with_tokens: dict[str, list[int]] = {}
            for name, shape in shapes.items():
                with_tokens[name] = shape
                if ":" not in name:  # a shard file, not its per-layer parts
                    with_tokens[f"{name}:{storage.SCORES_PER_TOKEN}"] = [*shape, positions]
            shapes = with_tokens
    else:
        if _written_by_torch_save(path):  # edit --out *.pt / *.pth (a plain state dict), or a training checkpoint
            raise OutputError(
                f"{str(path)!r} is a torch.save file (a checkpoint, or the plain state dict edit writes to .pt / .pth), which records no metadata",
                hint="edit --json reports such an edit; write it to a .safetensors file to keep its metadata for info",
            )
        decoded = storage.read_metadata(path, hint="point info at a .safetensors file or scores.index.json written by this tool")
        with storage.open_safetensors(path) as fh:
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    files = [path] if path.suffix != ".json" else [path.parent / name for name in shapes if ":" not in name]
    sha = {"tensors_sha256": storage.files_digest(files)} if digest else {}
    if json_:
        print_json({"path": str(path.resolve()), "metadata": decoded, "tensors": shapes, **sha})
        return
    if config_only:
        print_line(config_yaml(path, decoded))
        return
    import textwrap

    import yaml

    from influence_cli.config import yaml_text

    config = decoded.pop("config", None)
    base = decoded.pop("base_dir", None) if config is not None else None  # shown with the config, whose relative paths it resolves
    nested = {k: decoded.pop(k) for k in sorted(decoded) if isinstance(decoded[k], (dict, list)) and decoded[k]}  # below the table: one long cell would widen every row
    table = new_table(str(path), [("field", "left"), ("value", "left")])
    for key, value in sorted(decoded.items()):
        table.add_row(key, yaml_text(value))
    if path.suffix == ".json":
        table.add_row("shards", shard_files(list(shapes)))
    else:
        table.add_row("tensors", tensor_names(list(shapes)))
    for key, value in sha.items():
        table.add_row(key, value)
    print_table(table)
    against = base if isinstance(base, str) else "its config file's folder, not recorded by earlier versions"
    for title, value in [*nested.items(), *([(f"resolved config (relative paths resolve against {against})", config)] if config is not None else [])]:
        print_line(f"{title}:")
        print_line(textwrap.indent(yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=100).rstrip(), "  "))


def config_yaml(path: Path, metadata: dict) -> str:
    """`info --config`: the resolved config `metadata` records, as YAML, after a comment naming the folder its
    relative paths (and `package.module:function` factories) resolve against."""
    import yaml

    from influence_cli.errors import OutputError

    config, base = metadata.get("config"), metadata.get("base_dir")
    if not isinstance(config, dict):
        raise OutputError(f"{str(path)!r} records no config", hint="info without --config shows what it records")
    where = f"save it in {base}" if isinstance(base, str) else "save it in the original config's folder (earlier versions did not record it)"
    head = f"# the resolved config of {path}; its relative paths resolve against the folder it is read from: {where}"
    return head + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100).rstrip()


NAMES_SHOWN = 3  # of a long list in the tensors row, these and then their number ("… (53 in all)"); --json lists every one
GROUPS_SHOWN = 8  # lines of the tensors row


def _some(names: list[str], shown: int = NAMES_SHOWN) -> str:
    return ", ".join(names if len(names) <= shown + 1 else [*names[:shown], f"… ({len(names)} in all)"])


def tensor_names(names: list[str]) -> str:
    """The tensors row of `info`: their number, then the names without a dot, then the others grouped by
    what comes before their last dot, the groups holding the same names on one line:
    "18: {fc1, fc2, head}.{a_eigenvalues, ..., num_examples}" (--json lists every tensor with its shape)."""
    plain = [n for n in names if not n.rpartition(".")[0]]
    leaves: dict[str, list[str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if prefix:
            leaves.setdefault(prefix, []).append(leaf)
    alike: dict[tuple[str, ...], list[str]] = {}  # the same tensors of several layers (or datasets): one line
    for prefix, held in leaves.items():
        alike.setdefault(tuple(held), []).append(prefix)
    lines = [_some(plain, 2 * NAMES_SHOWN)] if plain else []
    for held, prefixes in alike.items():
        head = prefixes[0] if len(prefixes) == 1 else f"{{{_some(prefixes)}}}"
        lines.append(f"{head}.{held[0] if len(held) == 1 else '{' + ', '.join(held) + '}'}")
    if len(lines) > GROUPS_SHOWN:
        lines[GROUPS_SHOWN - 1 :] = [f"… and {len(lines) - GROUPS_SHOWN + 1} more groups (--json lists every tensor)"]
    return f"{len(names)}: " + "\n".join(lines)


def shard_files(names: list[str]) -> str:
    """The shards row of `info` on a scores index: its shard files, and whether each holds the per-layer or per-token parts."""
    files = [n for n in names if ":" not in n]
    held = [key for key in ("scores_by_layer", "scores_per_token") if any(n.endswith(f":{key}") for n in names)]  # storage's names (the CLI imports it lazily)
    return f"{len(files)} files: {_some(files, 2)}" + (f"; each with its {' and '.join(held)}" if held else "")


def _written_by_torch_save(path: Path) -> bool:
    """Whether `path` is as torch.save writes it: a zip archive holding a `data.pkl` (other zip archives,
    such as NumPy's .npz, are not), or a legacy pickle (not a safetensors header: an 8-byte length,
    whose first byte may be 0x80, then '{')."""
    import zipfile

    with path.open("rb") as fh:
        head = fh.read(9)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.rpartition("/")[2] == "data.pkl" for name in archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    return head[:1] == b"\x80" and head[8:9] != b"{"
