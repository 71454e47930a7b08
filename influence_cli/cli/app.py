"""The Typer application, shared options, and the one place errors are formatted."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from influence_cli import __version__
from influence_cli.cli.render import err_console
from influence_cli.errors import InfluenceError

EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="influence",
    help=(
        "Which training examples made the model predict this? Influence functions under an EKFAC "
        "approximation of the Fisher, driven by one YAML config.\n\n"
        "Sign convention: a positive score means up-weighting the training example lowers the query's "
        "loss (a proponent, helpful); negative means it raises it (an opponent).\n\n"
        "Typical flow: influence fit-factors CONFIG, then influence compute-scores CONFIG, then influence top-k CONFIG."
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": os.environ.get("INFLUENCE_DEBUG", "") not in ("", "0")}

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file (see docs/CONFIG.md).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set factors.strategy=kfac (repeatable; values are YAML)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace outputs of a finished run (and leftover progress).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last saved progress.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (nothing else goes to stdout).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"influence_cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (or set INFLUENCE_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    # set on every invocation: a --debug run must not leak into the next one in the same process (tests, notebooks)
    _DEBUG["on"] = debug or os.environ.get("INFLUENCE_DEBUG", "") not in ("", "0")


def report_error(exc: InfluenceError) -> int:
    """Prints one line (plus the next step) to stderr; returns the exit code."""
    rank = os.environ.get("RANK")
    prefix = escape(f"[rank {rank}] ") if rank not in (None, "0") else ""  # the markup would swallow "[rank 1]"
    err_console.print(f"[bold red]{prefix}{exc.kind}:[/] {escape(exc.message)}", highlight=False, markup=True, soft_wrap=True)
    if exc.hint:
        err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
    if _DEBUG["on"]:
        err_console.print(traceback.format_exc(), markup=False, highlight=False)
    return exc.exit_code


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Registers a command whose typed errors become one message and an exit code."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except InfluenceError as exc:
                code = report_error(exc)
                raise typer.Exit(code) from None
            except KeyboardInterrupt:
                if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; say it once
                    err_console.print(
                        "[bold yellow]interrupted.[/] Progress up to the last saved batch is kept; "
                        "rerun the same command with --resume to continue."
                    )
                raise typer.Exit(EXIT_INTERRUPTED) from None
            finally:
                from influence_cli.distributed import shutdown_distributed

                shutdown_distributed()

        return app.command(name, **kwargs)(wrapper)

    return decorate


def load(config: Path, overrides: list[str] | None):
    """Loads and validates the config (errors carry the file and key)."""
    from influence_cli.config import load_config

    return load_config(config, overrides or [])


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="influence")
    except KeyboardInterrupt:  # pragma: no cover - interrupted outside a command
        sys.exit(EXIT_INTERRUPTED)
