"""Rendering: rich tables and progress bars. Results go to stdout, everything else to stderr."""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import logging
import math
import os
import re
import select
import sys
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from influence_cli.example_views import ExampleView

MIN_COLUMNS = 20  # a narrower $COLUMNS (0, -5, 4) is not a width results can be drawn at


def _columns() -> int | None:
    """The width results are drawn at: $COLUMNS when it is a usable number; unbounded for a file or pipe
    (rich would assume 80 and cut the tables a script reads); else the terminal's (None: rich asks it)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
        if columns >= MIN_COLUMNS:
            return columns
    except ValueError:
        pass
    isatty = getattr(sys.stdout, "isatty", None)
    return None if isatty is not None and isatty() else 10_000


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away (`| head`)


def stdout_closed(stream: Any = None) -> None:
    """The reader of stdout (or `stream`) went away: later writes (and the final flush) go to
    /dev/null instead of failing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, (stream or sys.stdout).fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a file descriptor (a test runner's buffer)
        pass


def _exit_broken_pipe(console: Console) -> None:
    """What a console does when its reader went away: rich's own exits with 1, which is not one of the
    documented codes."""
    console.quiet = True
    stdout_closed(console.file)
    raise SystemExit(EXIT_BROKEN_PIPE)


class _Environ(Mapping[str, str]):
    """os.environ as rich reads it, at each read, without a COLUMNS that is no width (0, -5, 4: rich drew every
    line, error messages too, at that width, or not at all)."""

    def __getitem__(self, key: str) -> str:
        value = os.environ[key]
        if key == "COLUMNS" and not (value.isdigit() and int(value) >= MIN_COLUMNS):
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in os.environ if k in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Console(Console):
    on_broken_pipe = _exit_broken_pipe
    _environ = _Environ()


def configure_rich() -> None:
    """Every rich console of this process, typer's help and usage consoles too, exits like ours
    (`influence --help | head -1`) and ignores a COLUMNS that is no width (`COLUMNS=0 influence --help`
    printed nothing). Only the command-line entry point calls this."""
    Console.on_broken_pipe = _exit_broken_pipe  # type: ignore[method-assign]
    Console._environ = _Environ()  # type: ignore[misc]


class _Messages(io.TextIOBase):
    """stderr as the messages see it: the current sys.stderr (test runners swap it; rich's live display wraps it),
    where a write that fails (a full disk under a log file) is dropped: messages and progress are best effort,
    and must not stop a run or replace its error. A reader gone (`2>&1 | head`) still stops it, with 141."""

    @staticmethod
    def _stream() -> Any:
        return getattr(sys.stderr, "rich_proxied_file", sys.stderr)

    def write(self, text: str) -> int:
        try:
            if (stream := self._stream()) is not None:
                stream.write(text)
        except BrokenPipeError:
            raise
        except (OSError, ValueError):
            pass
        return len(text)

    def flush(self) -> None:
        try:
            if (stream := self._stream()) is not None:
                stream.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError):
            pass

    def isatty(self) -> bool:
        try:
            return bool(self._stream().isatty())
        except (AttributeError, OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._stream().fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream(), "encoding", None) or "utf-8"


class _MessagesConsole(_Console):
    """Messages are lines, whatever reads them (a log file, a pipe); progress bars written to a file or pipe
    get room for their numbers (rich would assume 80 columns and cut them after a long title)."""

    @property
    def size(self) -> Any:
        size = super().size
        if not self.is_terminal:  # also when COLUMNS is set: a log has no width to keep to
            return type(size)(max(size.width, LOG_COLUMNS), size.height)
        return size

    @size.setter
    def size(self, new_size: Any) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


LOG_COLUMNS = 160  # progress bars in logs: the longest title ("scores train 0..4,352 (query chunk 1/28) (rank 0 of 2)") and its numbers
MESSAGES = _Messages()
err_console = _MessagesConsole(file=MESSAGES, highlight=False, soft_wrap=True, emoji=False)


class _Results(io.TextIOBase):
    """stdout as the results see it (`write_results`): every byte written or an error, a reader gone
    (`| head`) a BrokenPipeError (exit 141), any other failure an OutputError (a full disk: exit 5)."""

    def write(self, text: str) -> int:
        write_results(text)
        return len(text)

    def flush(self) -> None:
        pass  # write_results leaves nothing buffered

    def isatty(self) -> bool:
        return bool(getattr(sys.stdout, "isatty", lambda: False)())

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stdout, "encoding", None) or "utf-8"


_BOM_ENCODINGS = ("utf-8-sig", "utf-16", "utf-32")  # codecs.lookup names


def write_results(text: str) -> None:
    """Writes `text` to stdout's file descriptor until every byte is out.

    Through Python's buffered stdout, a large write to a pipe whose reader left (`| head -1`) or
    to a non-blocking pipe could end short without an error, and the command exit 0 with its
    results cut. Here a reader gone raises BrokenPipeError, a non-blocking pipe is waited on, and
    any other failure (a full disk) is an OutputError. Without a descriptor (a test runner's
    buffer), or in an encoding that starts with a byte-order mark, sys.stdout is written as it is (`_write_text`).
    """
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        fd = sys.stdout.fileno()
        if codecs.lookup(encoding).name in _BOM_ENCODINGS:  # each encode() would start with its own byte-order mark
            raise io.UnsupportedOperation
    except (AttributeError, LookupError, OSError, ValueError, io.UnsupportedOperation):
        try:
            _write_text(text, encoding)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise unwritable(exc) from None
        return
    errors = getattr(sys.stdout, "errors", None) or "strict"
    errors = "surrogateescape" if errors == "strict" else errors  # a file name that is not UTF-8 is written as its bytes, as ls does
    try:
        sys.stdout.flush()  # what was written through sys.stdout comes first
        view = memoryview(text.encode(encoding, errors=errors))
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                select.select([], [fd], [])
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise unwritable(exc) from None


def _write_text(text: str, encoding: str) -> None:
    """`text` through sys.stdout, a file name that is not UTF-8 in it (Python's surrogate escapes, which a strict
    encoder refuses) as its bytes, through the stream's binary buffer, as the descriptor gets it; in an encoding that
    starts with a byte-order mark (whose text such bytes are not), or without a buffer, as Python's escape (\\udcff)."""
    try:
        sys.stdout.write(text)
        return
    except UnicodeEncodeError:  # nothing is written: the whole text is encoded first
        pass
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None and codecs.lookup(encoding).name not in _BOM_ENCODINGS:
        with contextlib.suppress(UnicodeEncodeError):  # else a character the encoding lacks too: escaped below
            data = text.encode(encoding, errors="surrogateescape")
            sys.stdout.flush()
            buffer.write(data)
            buffer.flush()
            return
    sys.stdout.write(text.encode(encoding, errors="backslashreplace").decode(encoding))


def unwritable(exc: OSError) -> Exception:
    """The OutputError of a stdout that cannot be written."""
    from influence_cli.errors import OutputError  # here: importing the CLI (--help) must not import torch

    return OutputError(f"cannot write the results to stdout ({exc.strerror or exc})", hint="free space where stdout goes, or redirect it elsewhere")


def out_console(width: int | None = None) -> Console:
    """A console on the current stdout (followed at each write, so test runners can capture it), `width`
    columns wide (default: the terminal's, or unbounded for a pipe)."""
    return _Console(file=_Results(), highlight=False, markup=False, emoji=False, soft_wrap=False, width=width or _columns())  # results are literal: a class named "[cat]" stays


def tolerate_narrow_encodings() -> None:
    """Characters a non-UTF-8 stdout/stderr cannot encode (λ, Λ, ·, …) print as '?' instead of raising."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


class WarningPrinter(logging.Handler):
    """Shows the core's warnings (`influence_cli.notices`) on stderr as `warning: ...`, each message once;
    on a torchrun rank other than 0 only those about its own shard, as `[rank N] warning: ...`."""

    def __init__(self, rank: int = 0) -> None:
        super().__init__(logging.WARNING)
        self.rank = rank
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message in self.seen or (self.rank != 0 and not getattr(record, "per_rank", False)):
            return
        self.seen.add(message)
        prefix = escape(f"[rank {self.rank}] ") if self.rank else ""
        err_console.print(f"[bold yellow]{prefix}warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_json(data: Any) -> None:
    """JSON on stdout, nothing else; NaN and ±Inf (an empty band's ratio, ...) as null, which strict parsers accept.

    Written to the file descriptor until every byte is out (`write_results`).
    """
    write_results(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")  # ASCII: json escapes the rest


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters (an escape sequence in a foreign file's metadata, a name) spelled
    as escapes, so that they cannot move the cursor or recolour the terminal; newlines and tabs stay."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def print_line(text: str) -> None:
    """A line of results on stdout, literal and whole: never hard-wrapped (a terminal wraps it; a pipe reads it as one line)."""
    out_console().print(printable(text), markup=False, highlight=False, soft_wrap=True)


def print_table(table: Table) -> None:
    """`table` on stdout: as a grid where it fits the terminal without breaking a word (see `_column_widths`),
    else as records, one block of "column: value" lines per row (`_records`); a title on a line of its own."""
    console = out_console()
    layout = _laid_out(console, table)
    title, table.title = table.title, None  # a line of its own, not wrapped to the table's width (a pipe reads it whole)
    if title:
        console.print(title, style="table.title", soft_wrap=True)
    if layout is None:
        for line in _records(console, table):
            console.print(line, soft_wrap=True)
        return
    widths, drawn = layout
    if drawn > console.width:  # another rich's measured minimum (`_column_widths`): drawn wider (the terminal wraps the lines) rather than cropped
        console = out_console(drawn)
    for column, width in zip(table.columns, widths or [], strict=False):
        column.width = width
    console.print(table)


_KEPT_LAYOUTS: weakref.WeakKeyDictionary[Table, tuple[int, int, Any]] = weakref.WeakKeyDictionary()


def _laid_out(console: Console, table: Table, keep: bool = False) -> tuple[list[int] | None, int] | None:
    """`_column_widths` of `table`, `_prepared`, in console.width; `keep`: kept for the next call on the
    same table at the same width and with as many rows (`record_room`, then `print_table`), which takes it."""
    kept = _KEPT_LAYOUTS.pop(table, None)
    if kept is not None and kept[:2] == (console.width, len(table.rows)):
        return kept[2]
    layout = _column_widths(console, _prepared(table))
    if keep:
        _KEPT_LAYOUTS[table] = (console.width, len(table.rows), layout)
    return layout


def _prepared(table: Table) -> Table:
    """`table` as printed: its text shown, never acted on by the terminal (`printable`), and its numbers
    (a right-justified column's cells) whole on one line (a folded "+3599 / 3" reads as another number)."""
    for column in table.columns:
        column._cells = [printable(c) if isinstance(c, str) else c for c in column._cells]  # rich's cells (stable since rich 10)
        if column.justify == "right":
            column.min_width = max((_cell_width(cell) for cell in column.cells), default=None)
    if isinstance(table.title, str):
        table.title = printable(table.title)
    return table


TOKEN_KEPT = 10  # characters a line of a folded token keeps, at least ("c68cec0ec6" / "2af203")
RECORD_INDENT = 2  # a record's fields, below its first column's line; a value, below a key it does not fit beside
_WORD = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")  # a word of the language ("proponent", "self-influence"): read whole, never folded
_PUNCTUATION = "\"'()[]{}.,:;!?"  # around a word ("(predicted)", "linear,"): still a word


def _column_widths(console: Console, table: Table) -> tuple[list[int] | None, int] | None:
    """(the widths of `table`'s columns' text that fit it in console.width: their natural widths where it fits as it
    is, which `print_table` sets so that rich does not measure every cell again; None where another rich draws it by
    its own layout; the width it is drawn at, its padding and borders included), or None where it cannot be drawn as
    a grid without breaking a word: `print_table` draws it as records.

    A table wider than the terminal has its widest columns narrowed first, as far as the rest allow: a column of
    text folds between words; where that is not enough, a token (a path, a fingerprint, a snake_case or dotted
    name: anything but letters) folds inside itself, in lines of at least `TOKEN_KEPT` characters, which read
    as well as a terminal's wrapped path, while a word of the language never breaks ("pro" / "pon" / "ent" is
    unreadable); a number (a right-justified column's cell) never folds, nor does a no_wrap column. A table of
    two columns (a name and its value) folds only a token its records would fold too, one longer than a
    record's line (a long path in `info`): its records, "name: value" lines, show the others whole.
    Where a table does not fit so, it is drawn as records rather than squeezed, or drawn wider than the
    terminal, which would wrap every line of the grid.
    """
    extra = table._extra_width if hasattr(table, "_extra_width") else 0  # rich's borders (private API, stable since rich 10)
    try:
        pads = [table._get_padding_width(i) for i in range(len(table.columns))]
        unbounded = console.options.update_width(10_000)
        measured = [table._measure_column(console, unbounded, column) for column in table.columns]
    except (AttributeError, TypeError):  # pragma: no cover - another rich: its own layout, at its measured minimum
        return None, Measurement.get(console, console.options.update(max_width=10_000), table).minimum
    natural = [m.maximum - pad for m, pad in zip(measured, pads, strict=True)]
    room = console.width - extra - sum(pads)
    if sum(natural) <= room:
        return natural, sum(natural) + sum(pads) + extra
    whole = [bool(c.no_wrap) for c in table.columns]  # a right-justified column's numbers are kept whole by its min_width
    anywhere = [n if w else min(n, max(c.min_width or 0, 1)) for n, w, c in zip(natural, whole, table.columns, strict=True)]
    between_words = [n if w else max(a, m.minimum - pad) for n, w, a, m, pad in zip(natural, whole, anywhere, measured, pads, strict=True)]
    kept = console.width - RECORD_INDENT if len(table.columns) == 2 else TOKEN_KEPT  # a record's line, below its key (`_pair`)
    tokens_folded = [min(b, max(a, _unbroken(c, kept))) for a, b, c in zip(anywhere, between_words, table.columns, strict=True)]
    for least in (between_words, tokens_folded):
        if sum(least) <= room:
            return _narrowed(natural, least, room), console.width
    return None


def _unbroken(column: Any, kept: int) -> int:
    """The width `column` needs for its words of the language and its tokens of up to `kept` characters
    whole, its longer tokens in lines of `TOKEN_KEPT`."""
    words = (word for cell in (column.header, *column.cells) for word in (cell.plain if isinstance(cell, Text) else str(cell)).split())
    return max((cell_len(w) if cell_len(w) <= kept or _WORD.fullmatch(w.strip(_PUNCTUATION)) else TOKEN_KEPT for w in words), default=0)


def _narrowed(natural: list[int], least: list[int], room: int) -> list[int]:
    """Widths summing to `room` (sum(least) <= room < sum(natural)): every column wider than a level cut to it,
    none below its `least`, the level as high as the room allows (the widest columns give up width first)."""

    def cut(level: int) -> list[int]:
        return [max(lo, min(n, level)) for n, lo in zip(natural, least, strict=True)]

    low, high = 0, max(natural)  # sum(cut(low)) <= room < sum(cut(high))
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if sum(cut(mid)) <= room else (low, mid)
    widths = cut(low)
    for i in range(len(widths)):  # what is left goes one each to the columns cut below their natural width
        if sum(widths) < room and widths[i] < natural[i]:
            widths[i] += 1
    return widths


def _cell_width(cell: Any) -> int:
    """Columns a cell takes: a string as written (tables are printed without markup: "[draft]" is 7 wide)."""
    return cell.cell_len if isinstance(cell, Text) else cell_len(cell) if isinstance(cell, str) else 0


def _records(console: Console, table: Table) -> list[Text]:
    """The lines of `table` drawn as records, in console.width: each row a block, its first column's
    "header: cell" (the cell alone under an empty header: top-k's "proponent"), then each other column's
    "header: cell" indented by `RECORD_INDENT`, empty cells left out, a blank line where the grid has a
    section line. A table of two columns (info's field and value) is already such pairs: each row is one
    "cell: cell" line, under the headers' own "header: header" line.

    This is psql's expanded display (`\\x auto`: "expanded mode when the normal output would be wider than
    the screen"), chosen over the ways other tools narrow a table: rich's own fold or ellipsis, which leave
    "pro" / "pon" / "ent" or "propo…", and gh's table printer, which cuts the widest cells with "..." (gh
    can: its scripts read tab-separated values; here the cells are the numbers a command is run for, and
    --json is what scripts read). Every cell is shown whole and no word is broken, except one longer than
    the terminal's line. Keys are bold, cells keep their own style.
    """
    headers = [Text(str(c.header)) for c in table.columns]
    key_style = table.header_style or "bold"
    for header in headers:
        header.stylize(key_style)
    rows = list(zip(*(list(c.cells) for c in table.columns), strict=True))
    cells = [[c if isinstance(c, Text) else Text(str(c)) for c in row] for row in rows]
    lines: list[Text] = []
    if len(headers) == 2:
        if any(h.plain for h in headers):
            lines += _pair(console, headers[0], headers[1], 0)
        for key, value in cells:
            lines += _pair(console, key, value, 0)
        return lines
    for i, row in enumerate(cells):
        lines += _pair(console, headers[0], row[0], 0) if headers[0].plain else _wrapped(console, row[0], console.width)
        for header, cell in zip(headers[1:], row[1:], strict=True):
            if cell.plain.strip():
                lines += _pair(console, header, cell, RECORD_INDENT)
        if table.rows[i].end_section and i + 1 < len(cells):
            lines.append(Text(""))
    return lines


def _pair(console: Console, key: Text, value: Text, indent: int) -> list[Text]:
    """"key: value" at `indent`, the value wrapped between words under its first line's start; where a word of
    it does not fit there, or the key takes more than its line (wrapped between words), the value goes below
    the key, indented `RECORD_INDENT` more (folding only a word longer than that line)."""
    heads = [Text(" " * indent).append_text(line) for line in _wrapped(console, key.copy().append(":"), console.width - indent)]
    head = heads[0]
    room = console.width - head.cell_len - 1
    if len(heads) == 1 and max((cell_len(word) for word in value.plain.split()), default=0) <= room:
        wrapped = _wrapped(console, value, room)
        rest = [Text(" " * (head.cell_len + 1)).append_text(line) for line in wrapped[1:]]
        return [head.append(" ").append_text(wrapped[0]) if wrapped[0].plain else head, *rest]
    below = " " * (indent + RECORD_INDENT)
    return heads + [Text(below).append_text(line) for line in _wrapped(console, value, console.width - len(below))]


def _wrapped(console: Console, text: Text, width: int) -> list[Text]:
    """`text`'s lines wrapped between words in `width` characters (a longer word folded), trailing spaces left out."""
    lines = list(text.wrap(console, max(width, 1), overflow="fold")) or [Text("")]
    for line in lines:
        line.rstrip()
    return lines


def record_room(table: Table, header: str) -> int | None:
    """Characters a cell under `header` (a column after the first, of more than two) has on its line where
    `table` is drawn as records at the terminal's width (`print_table`); None where it is drawn as a grid."""
    console = out_console()
    if _laid_out(console, table, keep=True) is not None:
        return None
    return console.width - RECORD_INDENT - cell_len(header) - 2  # ": "


def new_table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A table with (header, justify) columns."""
    table = Table(title=title, title_justify="left", header_style="bold")
    for header, justify in columns:  # in a narrow terminal, cells fold onto more lines instead of losing characters to "…"
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    return table


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.{1 if speed < 10 else 0}f} {task.fields.get('unit', 'ex')}/s", style="cyan")


_RUNNING: list[RichProgress] = []  # bars drawn now: a command that fails stops them (`stop_running_bars`)


def stop_running_bars() -> None:
    """Stops every bar still drawn, as a command fails: an unfinished bar is erased (the error line says what
    happened), except after Ctrl-C or SIGTERM, where it shows how far the pass got. Call it in an `except` block."""
    for bar in list(_RUNNING):
        bar.stop()


class RichProgress:
    """The core's Progress protocol, drawn as rich progress bars on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None, unit: str = "ex") -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="bold", markup=False),  # a dataset named "a:fire:" or "[x]" shows as written
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, unit=unit)
        _RUNNING.append(self)

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def stop(self) -> None:
        if self._progress is not None:
            failure = sys.exc_info()[0]
            quiet = failure is not None and not issubclass(failure, KeyboardInterrupt)  # the error line says what happened
            if quiet:
                self._progress.live.transient = True
            if quiet and not err_console.is_terminal:  # a log file: rich would still write the last frame (or an empty line)
                err_console.file = io.StringIO()
                try:
                    self._progress.stop()
                finally:
                    err_console.file = MESSAGES  # back to following sys.stderr, as constructed
            else:
                self._progress.stop()
            self._progress = None
            if self in _RUNNING:
                _RUNNING.remove(self)


def layer_label(name: str) -> str:
    """A tracked layer's name for tables; the root module (a bare nn.Linear model) has the name ''."""
    return name or "(model)"


LAYERS_SHOWN = 3  # layers named in a ranking's "layers" cell (`layer_shares`)
LAYER_NAME_KEPT = 8  # characters of a layer's name kept, at least, when a narrow terminal cuts it ("…1.conv2")


def layer_shares(parts: dict[str, float], score: float, shown: int = LAYERS_SHOWN, prefix: str = "") -> str:
    """The leading layers of a score's per-layer parts, largest |part| first: "fc2 71% · fc1 -24%".

    A share is the layer's |part| over the sum of every layer's |part|, so the shares of all layers
    add to 100% whatever their signs (a part larger than the score itself, offset by others, is
    not shown above 100%); "-" marks a part of the other sign than the score (that layer pulls the
    other way). At most `shown` layers; after the first, those under 0.5% are left out. "-" alone:
    every part is 0. `prefix`: a start of every layer's name left out, marked "…" ("…layer4.1.conv2").
    """
    return " · ".join(f"{_short_label(name, prefix)} {share}" for name, share in _leading_layers(parts, score, shown)) or "-"


def _leading_layers(parts: dict[str, float], score: float, shown: int) -> list[tuple[str, str]]:
    """(layer, its share as `layer_shares` shows it) of the leading layers; [] when every part is 0."""
    mass = sum(abs(v) for v in parts.values())
    if not mass > 0:
        return []
    leading: list[tuple[str, str]] = []
    for name, value in sorted(parts.items(), key=lambda item: -abs(item[1]))[:shown]:  # stable: ties in layer order
        share = abs(value) / mass
        if leading and share < 0.005:
            break
        against = value != 0 and (value < 0) != (score < 0)
        leading.append((name, f"{'-' if against else ''}{share:.0%}"))
    return leading


def _short_label(name: str, prefix: str) -> str:
    return f"…{name[len(prefix):]}" if prefix else layer_label(name)


def fitted_layer_shares(rows: list[tuple[dict[str, float], float]], width: int | None) -> list[str]:
    """`layer_shares` of each (parts, score) of a table's rows, all in one form, the most detailed whose
    every cell fits `width` characters (None: no limit): the leading three layers by their names, then
    without the dotted prefix every layer's name shares ("…layer4.1.conv2" for "backbone.layer4.1.conv2"),
    then fewer layers, down to the first alone, its name cut from the left to fit ("…0.downsample.0 71%",
    at dots where it can; at least `LAYER_NAME_KEPT` characters of it)."""
    if width is None:
        return [layer_shares(parts, score) for parts, score in rows]
    prefix = _shared_prefix(list(rows[0][0])) if rows else ""
    for shown in range(LAYERS_SHOWN, 0, -1):
        for cut in ("", prefix) if prefix else ("",):
            cells = [layer_shares(parts, score, shown, cut) for parts, score in rows]
            if all(Text(cell).cell_len <= width for cell in cells):
                return cells
    cells = []
    for parts, score in rows:
        leading = _leading_layers(parts, score, 1)
        if not leading:
            cells.append("-")
            continue
        name, share = layer_label(leading[0][0][len(prefix) :]), leading[0][1]
        kept = max(width - len(share) - 2, LAYER_NAME_KEPT)  # "…" and the space before the share
        cells.append(f"…{_name_end(name, kept)} {share}" if len(name) > kept else f"{_short_label(leading[0][0], prefix)} {share}")
    return cells


def _name_end(name: str, kept: int) -> str:
    """The end of a layer's name in at most `kept` characters: its last dotted components that fit, two at
    least ("0.downsample.0", "1.conv2"), else its last `kept` characters (a dot they start with left out:
    "sample.0")."""
    pieces = name.split(".")
    for i in range(1, len(pieces)):
        end = ".".join(pieces[i:])
        if len(end) <= kept:
            break
    else:
        end = ""
    return end if "." in end else name[-kept:].lstrip(".")


def _shared_prefix(names: list[str]) -> str:
    """The leading dotted components every name shares, each name keeping one of its own ("backbone." of
    "backbone.fc1" and "backbone.head"); "" when they share none, or for a single layer."""
    if len(names) < 2:
        return ""
    split = [name.split(".") for name in names]
    common: list[str] = []
    for pieces in zip(*(s[:-1] for s in split), strict=False):  # as far as the shortest
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return "".join(f"{piece}." for piece in common)


def room_beside(table: Table) -> int:
    """Characters a column added after `table`'s columns may fill (its padding and border apart) with the
    table, drawn at its natural width, still within the terminal's (a pipe's or a file's is unbounded)."""
    layout = _column_widths(out_console(10_000), table)
    natural = 10_000 if layout is None else layout[1]
    return out_console().width - natural - 3  # the new column's padding (2) and its border (1)


LABEL_VALUES_IN_FULL = 16  # a regression target or prediction of more values (a dense one, [C, H, W]) is summarised


def _flat(values: list[Any]) -> list[Any]:
    return [w for v in values for w in (_flat(v) if isinstance(v, list) else [v])]


def _shape(values: Any) -> list[int]:
    """[3, 4] of a nested list of 3 lists of 4 values (one shape: a tensor's `tolist()`)."""
    shape = []
    while isinstance(values, list):
        shape.append(len(values))
        values = values[0] if values else None
    return shape


def label_summary(label: Any, token_ids: bool | None = None) -> dict[str, Any] | None:
    """`shape`, `mean`, `min` and `max` of a regression target or prediction of more than
    LABEL_VALUES_IN_FULL values (a tensor's nested `tolist()`, integer values too: a uint8 target
    image); None for any other label: a number, a shorter list, a language model's token ids.
    `token_ids`: whether the label is a language model's (task.kind); None when unknown, where a
    list of integers is taken for token ids. A NaN makes all three NaN; +inf and -inf together make
    the mean NaN."""
    if not isinstance(label, list) or token_ids:
        return None
    flat = _flat(label)
    if len(flat) <= LABEL_VALUES_IN_FULL or (token_ids is None and not any(isinstance(v, float) for v in flat)):
        return None
    if any(math.isnan(v) for v in flat):
        return {"shape": _shape(label), "mean": math.nan, "min": math.nan, "max": math.nan}
    try:
        mean = math.fsum(v / len(flat) for v in flat)  # each term divided first: float64 values near the maximum do not overflow the sum
    except ValueError:  # +inf and -inf
        mean = math.nan
    return {"shape": _shape(label), "mean": mean, "min": float(min(flat)), "max": float(max(flat))}


def label_json(label: Any, token_ids: bool | None = None) -> Any:
    """A label or prediction as JSON gives it: as it is (a number, a list of at most LABEL_VALUES_IN_FULL
    values nested as its shape, token ids), or `label_summary` for a larger regression target
    (`token_ids` as there)."""
    summary = label_summary(label, token_ids)
    return label if summary is None else summary


def label_text(label: Any, class_names: list[str] | None = None, token_ids: bool | None = None) -> str:
    """A label for a table cell: class index (with its name, unless the name only repeats the number:
    class folders "0", "1", ...), regression value(s) to 4 digits (a target of more than
    LABEL_VALUES_IN_FULL values as its shape, mean and range), a language model's token ids at the
    counted positions (without the -100s), or '-' (`token_ids` as `label_summary`'s)."""
    if label is None:
        return "-"
    if isinstance(label, float):
        return f"{label:.4g}"
    summary = label_summary(label, token_ids)
    if summary is not None:
        shape = "×".join(str(n) for n in summary["shape"])
        return f"[{shape}] mean {summary['mean']:.4g} in [{summary['min']:.4g}, {summary['max']:.4g}]"
    if isinstance(label, list):
        from influence_cli.task import IGNORE_INDEX  # here: importing the CLI (--help, usage errors) must not import torch

        if any(v == IGNORE_INDEX and isinstance(v, int) for v in label):  # a language model's: the counted positions
            label = [v for v in label if v != IGNORE_INDEX]
        shown = 12 if all(isinstance(v, int) for v in label) else 4  # token ids: a phrase; regression targets: a few numbers
        return "[" + ", ".join(label_text(v) for v in label[:shown]) + (", …]" if len(label) > shown else "]")
    if class_names is not None and isinstance(label, int) and 0 <= label < len(class_names) and class_names[label] != str(label):
        return f"{label} ({class_names[label]})"
    return str(label)


def example_columns(view: ExampleView) -> list[tuple[str, str]]:
    """The columns `example_cells` fills for a ranked example: its input ids where its inputs are
    token ids (`ExampleView.token_inputs`), and its label but for a language model's (the same ids
    shifted by one)."""
    return [("input", "left")] * view.token_inputs + [("label", "left")] * (not view.token_data)


def example_cells(view: ExampleView, position: int, label: Any) -> list[str]:
    """A ranked example's cells (`example_columns`): its input ids without padding, its label (by
    class name where known); `position` in the view's dataset."""
    ids = [label_text(view.input_ids(position), None, True)] if view.token_inputs else []
    return ids + ([] if view.token_data else [label_text(label, view.class_names, False)])


def print_read_back(path: Path, picture: Path | None = None) -> None:
    """The stderr line of a command that showed a finished result again (`from_file`) instead of computing it."""
    also = f"; saved {picture}" if picture is not None else ""
    err_console.print(f"read from {path}, the finished result of these settings (--overwrite recomputes){also}", markup=False, highlight=False)


def print_resumed(where: str | None, which: str = "") -> None:
    """The stderr line of a run that continued saved progress (`resumed_from`; `which`: an ensemble member's prefix)."""
    if where:
        err_console.print(f"{which}resumed from {where}", markup=False, highlight=False)
