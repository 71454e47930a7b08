"""How the core reports progress without printing: a small callback protocol."""

from __future__ import annotations

import inspect
from typing import Protocol


class Progress(Protocol):
    """Receives progress of long passes; the CLI renders it, the core only calls it. `unit`: what
    `total` counts ("ex" for examples, the default; "layers" for the eigendecomposition)."""

    def start(self, description: str, total: int | None, unit: str = "ex") -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class NullProgress:
    """Ignores progress (the default for the Python API and for ranks other than 0)."""

    def start(self, description: str, total: int | None, unit: str = "ex") -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass


class _ShardProgress:
    """Rank 0's bars under torchrun, labelled as its shard (every rank streams an equal share)."""

    def __init__(self, inner: Progress, world_size: int) -> None:
        self.inner = inner
        self.world_size = world_size

    def start(self, description: str, total: int | None, unit: str = "ex") -> None:
        start(self.inner, f"{description} (rank 0 of {self.world_size})", total, unit)  # short: logs of batch jobs are often 80 columns

    def advance(self, n: int) -> None:
        self.inner.advance(n)

    def stop(self) -> None:
        self.inner.stop()


def start(progress: Progress, description: str, total: int | None, unit: str = "ex") -> None:
    """progress.start, passing `unit` only where it is not examples and the object takes it (a Progress
    written before `unit` existed takes (description, total))."""
    if unit == "ex":
        progress.start(description, total)
        return
    try:
        params = inspect.signature(progress.start).parameters
    except (TypeError, ValueError):
        params = {}
    takes_unit = "unit" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_unit:
        progress.start(description, total, unit=unit)
    else:
        progress.start(description, total)


def for_rank(progress: Progress | None, rank: int, world_size: int) -> Progress:
    """What a rank reports to: rank 0 draws (its shard, under torchrun), the others stay silent."""
    if progress is None or rank != 0:
        return NullProgress()
    return progress if world_size == 1 else _ShardProgress(progress, world_size)
