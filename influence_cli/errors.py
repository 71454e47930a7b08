"""Typed errors raised by the core and formatted once by the CLI.

Each error carries a one-line message that names the file, key or flag at fault,
an optional hint (the next step), and the process exit code the CLI uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

# The keyword arguments of the Python API that the messages' command-line flags stand for.
_PYTHON_ARGUMENTS = {
    "--overwrite": "overwrite=True",
    "--resume": "resume=True",
    "--self": "self_influence=True",
    "--relative": "relative=True",
    "--by-layer": "by_layer=True",
    "--plain": "plain=True",
    "--query": "queries=",
    "--layers": "layers=",
    "--order": "order=",
    "--rho": "rho=",
    "--keep-share": "share=",
    "--method": "method=",
    "--rank-by": "self_top_k's or top_examples' rank_by=",
    "--out": "edit_checkpoint's out",
    "--set": "load_config's overrides, or a field of the Config",
    "--debug": "the traceback of the exception's __cause__",
}
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)|(?<!\w)\"[^\"]*\"(?!\w)")  # paths and values in a message: a flag-like text there is not a flag


class InfluenceError(Exception):
    """Base class of every error the tool reports to a user."""

    exit_code: int = 1
    kind: str = "error"
    same_on_every_rank: bool = False  # under torchrun every rank meets it alike (config, files): rank 0 alone says it
    alike: str | None = None  # the message less this rank's own part (its examples, its batch's length), if it has one

    def __init__(self, message: str, hint: str | None = None, *, alike: str | None = None) -> None:
        """`alike`: the message without what is this rank's own (the examples it names, its batch's length): ranks whose
        errors have the same `alike` met the same error, which `distributed.agree` then has rank 0 say once."""
        super().__init__(message)
        self.message = message
        self.hint = hint
        if alike is not None:
            self.alike = alike

    def __str__(self) -> str:
        """For Python tracebacks (the CLI prints message and hint itself): the next step too, and the
        keyword arguments that the flags it names stand for."""
        text = self.message if not self.hint else f"{self.message}\nhint: {self.hint}"
        bare = _QUOTED.sub("", text)
        named = [f"{flag} is {arg}" for flag, arg in _PYTHON_ARGUMENTS.items() if re.search(rf"(?<![\w/.-]){flag}(?![\w-])", bare)]
        return f"{text}\n(from Python: {'; '.join(named)})" if named else text

    def everywhere(self) -> InfluenceError:
        """Marks the error as one every rank of a torchrun job meets alike (the CLI prints it once)."""
        self.same_on_every_rank = True
        return self

    def __reduce__(self):  # pickled whole (a DataLoader worker's error keeps its hint and fields)
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[InfluenceError], args: tuple, state: dict) -> InfluenceError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(InfluenceError):
    """The config file or a `--set` override is invalid; lists every problem."""

    exit_code = 2
    kind = "config error"
    same_on_every_rank = True

    def __init__(self, problems: list[str] | str, source: str | None = None, hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            message = f"{where}{len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(message, hint)


class UsageError(InfluenceError):
    """A command-line flag has an impossible value."""

    exit_code = 2
    kind = "usage error"
    same_on_every_rank = True


class DataError(InfluenceError):
    """A dataset cannot be loaded or does not fit the model."""

    exit_code = 3
    kind = "data error"


class ModelError(InfluenceError):
    """The model cannot be built or its checkpoint does not match it."""

    exit_code = 4
    kind = "model error"


class OutputError(InfluenceError):
    """Outputs on disk are missing, from another run, or would be overwritten."""

    exit_code = 5
    kind = "output error"


class NumericalError(InfluenceError):
    """A NaN or Inf appeared in a loss, a gradient or an accumulator."""

    exit_code = 6
    kind = "numerical error"


class DistributedError(InfluenceError):
    """Another rank of a distributed job failed."""

    exit_code = 7
    kind = "distributed error"


class ResourceError(InfluenceError):
    """The device or the host ran out of memory."""

    exit_code = 8
    kind = "out of memory"


def message_of(exc: BaseException) -> str:
    """An exception's text for another message: a typed error's message alone (its str() adds the hint)."""
    return exc.message if isinstance(exc, InfluenceError) else str(exc)


_CPP_STACK = "Exception raised from "  # torch's C++ stack under some errors' text starts with this line
_VALIDATION_HEADING = re.compile(r"\d+ validation errors? for ")  # pydantic's: the fields and the reasons follow


def first_line(exc: BaseException, default: str = "", most: int = 400) -> str:
    """An exception's text (`message_of`) in one line: its first non-blank line, stripped; where that line only
    introduces the lines under it (it ends with ':', as torch's "Error(s) in loading state_dict for Net:" above the
    keys, or is pydantic's "1 validation error for Config"), those lines joined to it, cut to `most` characters; the
    last line of a traceback quoted in the text. A C++ stack (torch's "Exception raised from ...") is left out;
    `default` when no line is left."""
    lines: list[str] = []
    for line in message_of(exc).splitlines():
        if line.strip().startswith(_CPP_STACK):
            break
        if line.strip():
            lines.append(line.strip())
    if not lines:
        return default
    if lines[0].startswith("Traceback (most recent call last)"):
        return lines[-1]
    if not (lines[0].endswith(":") or _VALIDATION_HEADING.match(lines[0])):
        return lines[0]
    joined = " ".join(lines)
    return joined if len(joined) <= most else joined[: most - 3].rstrip() + "..."


def out_of_memory(exc: BaseException, hint: str | None = None) -> ResourceError | None:
    """A ResourceError for torch's or Python's out-of-memory errors (GPU or host), with `hint` (default: what
    the passes can lower); None for any other error."""
    first = first_line(exc)
    gpu = type(exc).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError, without importing torch
    host = isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc))
    if not (gpu or host):
        return None
    return ResourceError(
        f"the {'GPU' if gpu else 'host'} ran out of memory ({first[:200] or type(exc).__name__})",
        hint=hint
        or "lower data.batch_size (and for compute-scores scores.max_memory_mb or scores.query_chunk); "
        "fit-factors and compute-scores keep the progress they saved: rerun them with --resume",
    )


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Where a text file that is not UTF-8 fails to decode, for its message: "byte 0xe9 on line 3"."""
    data = exc.object if isinstance(exc.object, bytes) else b""
    if exc.start >= len(data):
        return "an undecodable byte"
    line = data[: exc.start].count(b"\n") + 1
    return f"byte 0x{data[exc.start]:02x} on line {line}"


def shortened(value: Any, limit: int = 80, *, quote: bool = True) -> str:
    """`value` for a one-line message: its repr (its text without `quote`), or, over `limit` characters, the head
    of that and its length ("'99999999...' (5,000 characters)"), so that a pasted file or number is not repeated."""
    try:
        text = str(value)
        shown = repr(value) if quote else text
    except ValueError:  # an int past Python's limit of digits for text (sys.get_int_max_str_digits): its head from its value
        sign, digits = "-" if value < 0 else "", int(math.log10(abs(value))) + 1
        digits += (10**digits <= abs(value)) - (10 ** (digits - 1) > abs(value))  # log10 rounds 10**k - 1 up to k
        return f"{sign}{abs(value) // 10 ** (digits - (limit - 4))}... ({len(sign) + digits:,} characters)"
    if len(shown) <= limit:
        return shown
    closing = shown[0] if quote and isinstance(value, str) else ""
    return f"{shown[: limit - 4 - len(closing)]}...{closing} ({len(text):,} characters)"


def first_few(items: Sequence[str], most: int, sep: str = ", ") -> str:
    """`items` joined by `sep` as messages list them: all of them, or the first `most` and then their number
    ("a, b, c, ... (12 in all)")."""
    return sep.join(items[:most]) + (f"{sep}... ({len(items)} in all)" if len(items) > most else "")


def human_bytes(n: float) -> str:
    """Bytes as messages and tables give them: B, then KiB, MiB, GiB or TiB to one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        text = f"{n:.0f}" if unit == "B" else f"{n:.1f}"
        if abs(float(text)) < 1024:  # as rounded: 1,048,575 B is 1.0 MiB, not 1024.0 KiB
            return f"{text} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
