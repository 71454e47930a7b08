"""The Typer application, shared options, and the one place errors are formatted."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from influence_cli import __version__
from influence_cli.cli.render import (
    EXIT_BROKEN_PIPE,
    WarningPrinter,
    configure_rich,
    err_console,
    stdout_closed,
    stop_running_bars,
    tolerate_narrow_encodings,
    unwritable,
)
from influence_cli.errors import InfluenceError, OutputError, out_of_memory

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
RANK_0_GRACE_S = 30.0  # how long a rank leaving an error every rank meets to rank 0 waits for rank 0 to say it


class _PlainHelpFlag:
    """-h/--help shows no `<bool>` type, like every other flag here (mixed into the group and each command)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_PlainHelpFlag, TyperGroup):
    """The app's group."""


class _Command(_PlainHelpFlag, TyperCommand):
    """Every subcommand."""


app = typer.Typer(
    name="influence",
    cls=_Group,
    help=(
        "Which training examples made the model predict this? Influence functions under an EKFAC "
        "approximation of the Fisher, driven by one YAML config.\n\n"
        "Sign convention: a positive score means up-weighting the training example lowers the query's "
        "loss (a proponent, helpful); negative means it raises it (an opponent).\n\n"
        "Typical flow: influence fit-factors CONFIG, then influence compute-scores CONFIG, then influence top-k CONFIG. "
        "A first config: influence init FILE --example digits (the bundled sample), or influence init FILE --model "
        "my_model:Net --checkpoint model.pt --train my_data:train_set for your own."
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": os.environ.get("INFLUENCE_DEBUG", "") not in ("", "0")}

ConfigArg = Annotated[Path, typer.Argument(metavar="CONFIG", help="YAML config file (see docs/CONFIG.md).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a config key: --set factors.strategy=kfac (repeatable; values are YAML)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", metavar="", help="Replace outputs of a finished run (and leftover progress).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", metavar="", help="Continue an interrupted run from its last saved progress.")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON on stdout (nothing else goes to stdout).")]


def _help_or_version(args: list[str]) -> bool:
    """Whether the arguments ask for help or the version (what typer prints itself), not a command's work."""
    return not args or any(a in ("--help", "-h", "--version") for a in args)


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"influence_cli {__version__}")  # click's echo flushes: a reader gone raises here (click would exit 1)
        except BrokenPipeError:
            stdout_closed()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show full tracebacks (or set INFLUENCE_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    # set on every invocation: a --debug run must not leak into the next one in the same process (tests, notebooks)
    _DEBUG["on"] = debug or os.environ.get("INFLUENCE_DEBUG", "") not in ("", "0")


def _rank_0_says_it(code: int) -> bool:
    """Whether this rank (not rank 0) may leave an error every rank meets alike to rank 0 to say. Under torchrun it
    first waits for rank 0 to go: were it to exit now, torchrun would stop rank 0 (SIGTERM) at once, before rank 0
    said it when rank 0 runs behind (its machine slower to import or read the config), and the job would fail with no
    message. torchrun stops this rank once rank 0 has exited; it then exits with `code`. False when rank 0 is still
    running after RANK_0_GRACE_S seconds (it did not meet the error): this rank says it itself. Launched otherwise
    (RANK and WORLD_SIZE set by a Slurm script, a Kubernetes job, by hand), nothing stops this rank when rank 0 exits
    and nothing stops rank 0 when this rank does: it leaves at once."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1") or not os.environ.get("TORCHELASTIC_RUN_ID"):
        return True  # torchrun's agent names its workers' run in TORCHELASTIC_RUN_ID
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    leave = signal.signal(signal.SIGTERM, lambda *_: os._exit(code)), signal.signal(signal.SIGINT, lambda *_: os._exit(code))
    try:
        time.sleep(RANK_0_GRACE_S)
    finally:
        signal.signal(signal.SIGTERM, leave[0])
        signal.signal(signal.SIGINT, leave[1])
    return False


def report_error(exc: InfluenceError) -> int:
    """Prints one line (plus the next step) to stderr; returns the exit code."""
    rank = os.environ.get("RANK")
    if rank not in (None, "", "0") and exc.same_on_every_rank and _rank_0_says_it(exc.exit_code):  # rank 0 says it for the job
        return exc.exit_code
    own = rank not in (None, "", "0") or (rank == "0" and os.environ.get("WORLD_SIZE", "1") not in ("", "1") and not exc.same_on_every_rank)
    prefix = escape(f"[rank {rank}] ") if own else ""  # a rank's own error (its shard), rank 0's too; the markup would swallow "[rank 1]"
    err_console.print(f"[bold red]{prefix}{exc.kind}:[/] {escape(exc.message)}", highlight=False, markup=True, soft_wrap=True)
    if exc.hint:
        err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
    if _DEBUG["on"]:
        err_console.print(traceback.format_exc(), markup=False, highlight=False)
    return exc.exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler sends before it requeues or kills a job), handled like Ctrl-C."""


_TERMINATED = {"hit": False}


_EXTENSIONS = ("torch", "torchvision", "numpy", "PIL", "safetensors")  # packages with compiled parts


def _importing_an_extension() -> bool:
    """True while torch, numpy or another package with compiled parts is being imported: an exception
    raised then can leave it half-initialised, for the cleanup that follows to trip over. (Pure-Python
    imports, such as rich's while a summary is printed, are interrupted like any other code.)"""
    return any(
        getattr(getattr(m, "__spec__", None), "_initializing", False) and name.split(".")[0] in _EXTENSIONS
        for name, m in list(sys.modules.items())
    )


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: a clean stop like Ctrl-C (exit 143); while a compiled package is being imported, the
    default action (the signal's own exit: cleanup could trip over the half-imported package)."""
    if _importing_an_extension():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _TERMINATED["hit"] = True
    raise Terminated()


def home_expanded(value: Any) -> Any:
    """A path argument (CONFIG, FILE, --out, a picture's) with a leading `~` expanded, as in the config: the shell
    leaves `--out=~/x` and a quoted "~/x" as they are, which would make a folder named "~". Other values as given."""
    return Path(os.path.expanduser(value)) if isinstance(value, Path) else value


def command(name: str, resumable: bool = False, rank_0: bool = False, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Registers a command whose typed errors become one message and an exit code.

    `resumable`: the command saves progress that --resume continues (said when it is interrupted).
    `rank_0`: a command of one process (reading outputs, listing layers): launched by torchrun,
    rank 0 runs it and the other ranks exit 0 at once, so its result prints once.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            rank = os.environ.get("RANK", "0").strip()
            if rank_0 and rank not in ("", "0"):
                return None
            warnings = WarningPrinter(int(rank) if rank.isdigit() else 0)  # under torchrun, each rank about its shard (a bad RANK: init_distributed says)
            logger = logging.getLogger("influence_cli")  # the core's notices (not imported here: it would import torch)
            logger.addHandler(warnings)
            propagated, logger.propagate = logger.propagate, False  # restored below: a program that runs a command in-process keeps its logging
            try:
                try:
                    return fn(*args, **{k: home_expanded(v) for k, v in kw.items()})
                except BaseException:
                    stop_running_bars()  # a pass that failed mid-way would leave its bar drawn under the error line
                    raise
            except InfluenceError as exc:
                code = report_error(exc)
                _leave_the_job(code)
                raise typer.Exit(code) from None
            except (RuntimeError, MemoryError) as exc:
                memory = out_of_memory(exc)
                if memory is None:
                    raise
                code = report_error(memory)
                _leave_the_job(code)
                raise typer.Exit(code) from None
            except BrokenPipeError:  # stdout's reader went away (`| head`): what it read stands
                stdout_closed()
                raise typer.Exit(EXIT_BROKEN_PIPE) from None
            except KeyboardInterrupt as exc:
                if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets the signal; say it once
                    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
                    if isinstance(exc, Terminated) and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
                        what = "terminated by torchrun (another rank stopped: see its message above, or its exit code in torchrun's summary; or the job was cancelled)"
                    more = (
                        " Rerun the same command with --resume to continue from its last save (progress is saved every factors.checkpoint_every batches, never with 0; before the first save --resume starts over)."
                        if resumable
                        else ""
                    )
                    err_console.print(f"[bold yellow]{what}.[/]{more}", soft_wrap=True)
                raise typer.Exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED) from None
            finally:
                logger.removeHandler(warnings)
                logger.propagate = propagated
                if "influence_cli.distributed" in sys.modules:  # never import torch here: a Ctrl-C may have cut its import short
                    sys.modules["influence_cli.distributed"].shutdown_distributed()

        return app.command(name, cls=_Command, **kwargs)(wrapper)

    return decorate


def _leave_the_job(code: int) -> None:
    """Under torchrun, a failed rank exits now (`distributed.exit_before_the_other_ranks`)."""
    if "influence_cli.distributed" in sys.modules:  # never import torch here
        sys.modules["influence_cli.distributed"].exit_before_the_other_ranks(code)


def load(config: Path, overrides: list[str] | None, command: str, *, self_influence: bool = False):
    """Loads and validates the config for `command` (a run function's name, `context.reads_of`: the
    data it does not read need not exist here); errors carry the file and key."""
    from influence_cli.config import load_config
    from influence_cli.context import reads_of

    return load_config(config, overrides or [], reads=reads_of(command, self_influence=self_influence))


def _debug_first(argv: list[str]) -> list[str]:
    """`--debug` is an option of `influence` itself; accept it after the command too."""
    if "--debug" in argv[1:] and "--" not in argv[: argv.index("--debug")]:
        argv = [a for a in argv if a != "--debug"]
        argv.insert(0, "--debug")
    return argv


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line too, SIGTERM is handled like Ctrl-C."""
    try:  # typer >= 0.25 vendors click
        from typer._click import exceptions as click
    except ImportError:  # pragma: no cover - older typer depends on click itself
        from click import exceptions as click  # type: ignore[no-redef]

    args = _debug_first(list(sys.argv[1:] if argv is None else argv))
    if sys.stdout is None:  # started with stdout closed (`>&-`): the results would vanish without a word
        sys.exit(report_error(OutputError("stdout is closed, and the results are printed there", hint="redirect it to a file, or to /dev/null to discard them")))
    tolerate_narrow_encodings()
    configure_rich()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(prog_name="influence", args=args, standalone_mode=False)
    except OSError as exc:  # help or --version into a full disk (commands' own output errors are typed)
        if isinstance(exc, BrokenPipeError) or not _help_or_version(args):
            raise
        code = report_error(unwritable(exc))
    except click.NoArgsIsHelpError as exc:  # the help is already printed
        code = exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "influence"
        if where == "influence":  # an option error seen before the command's context existed
            command_names = {c.name for c in app.registered_commands}
            where = next((f"influence {a}" for a in args if a in command_names), where)
        rank = os.environ.get("RANK", "0").strip()
        if rank in ("", "0") or not _rank_0_says_it(exc.exit_code):  # under torchrun every rank parses the same arguments: rank 0 says it
            prefix = "" if rank in ("", "0") else escape(f"[rank {rank}] ")
            err_console.print(f"[bold red]{prefix}usage error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
            err_console.print(f"[dim]hint:[/] {escape(f'{where} --help')} lists the arguments and options", highlight=False, soft_wrap=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (typer.Abort, getattr(click, "Abort", typer.Abort)):  # pragma: no cover - Ctrl-C outside a command
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:  # pragma: no cover - interrupted outside a command
        code = EXIT_INTERRUPTED
    if _TERMINATED["hit"]:  # SIGTERM, also when click turned it into its own abort (exit 130) while parsing
        code = EXIT_TERMINATED
    sys.exit(code if isinstance(code, int) else 0)
