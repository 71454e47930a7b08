"""`influence init`: write a commented starter config (starter.py builds it)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from influence_cli.cli.app import JsonOpt, command
from influence_cli.cli.render import err_console, print_json, write_results

INIT_EPILOG = """\
**Examples**

  influence init my_config.yaml --example digits     # the bundled digits sample: nothing to download

  influence init my_config.yaml --model my_model:Net --checkpoint model.pt --train my_data:train_set --query my_data:test_set

  influence init mnist.yaml --example mnist --data-dir ../shared/data/mnist --checkpoint runs/mnist/model.safetensors

  influence init - --example digits     # printed on stdout
"""


@command("init", rank_0=True, epilog=INIT_EPILOG)
def init_cmd(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="The config file to write (- prints it on stdout).", show_default=False)],
    example: Annotated[str | None, typer.Option("--example", metavar="NAME", help="digits (the bundled sample, model and data) | mnist (the MLP of make mnist-model on MNIST's IDX files in --data-dir).")] = None,
    model: Annotated[str | None, typer.Option("--model", metavar="MODULE:NAME", help="Your nn.Module class or a function returning the model (my_model:Net, my_model.py beside the config or on PYTHONPATH), torchvision:NAME (torchvision:resnet18) or mlp / cnn, whose kwargs are read from --checkpoint's layer shapes (without one, mlp's from a --train table); over a --train image folder torchvision's, mlp and cnn get num_classes from its class folders.")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", metavar="FILE", help="The model's trained weights (a torch.save state dict or .safetensors).")] = None,
    train: Annotated[str | None, typer.Option("--train", metavar="SOURCE", help="The training data: your Dataset class or function (my_data:train_set), a tensors file (.safetensors, .npz, .pt, .pth), a table of numbers with a header row (.csv, .tsv; --label-column) or a folder of images per class (root/cat/001.png), whose pixels the config scales to [0, 1].")] = None,
    query: Annotated[str | None, typer.Option("--query", metavar="SOURCE", help="The examples to explain, as --train (the config keeps the first 10). Without it, the next commands are the self-influence ones.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", metavar="NAME", help="The label column of a --train / --query table (.csv, .tsv): a name of its header row. Default: the header's last column.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", metavar="DIR", help="The folder of MNIST's t10k IDX files (--example mnist).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace the file at FILE.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Write a commented starter config for your model and data, or for a bundled example, and print the next commands.

    Every key it sets has a comment; the config loads as written (docs/CONFIG.md has every other key). Paths given are
    from the working directory and written relative to the config's folder.
    """
    from influence_cli.errors import UsageError
    from influence_cli.starter import next_commands, starter_config, write_config

    stdout = str(path) == "-"
    if stdout and json_:
        raise UsageError("--json: not with FILE - (the config itself is printed on stdout)", hint="give a file name to write, or leave out --json")
    text = starter_config(path, example=example, model=model, checkpoint=checkpoint, train=train, query=query, data_dir=data_dir, label_column=label_column)
    if stdout:
        write_results(text)
    else:
        write_config(path, text, overwrite=overwrite)
    steps = next_commands("CONFIG" if stdout else shlex.quote(str(path)), query=example is not None or query is not None)
    if json_:
        print_json({"path": str(path.resolve()), "next_commands": [command for command, _ in steps]})
        return
    width = max(len(command) for command, _ in steps)
    lines = [f"wrote {path}; next:" if not stdout else "next, with the config saved as CONFIG:"]
    lines += [f"  {command.ljust(width)}   # {what}" for command, what in steps]
    err_console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
