"""How the core reports progress without printing: a small callback protocol."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress of long passes; the CLI renders it, the core only calls it."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


class NullProgress:
    """Ignores progress (the default for the Python API and for ranks other than 0)."""

    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass
