"""A progress sink that stops a run the way Ctrl-C does, for tests of interrupted passes."""

from __future__ import annotations

from influence_cli.progress import NullProgress


class StopAt(NullProgress):
    """Raises KeyboardInterrupt once `after` examples of the pass titled `title` are done."""

    def __init__(self, title: str, after: int) -> None:
        self.title, self.after, self.current, self.done = title, after, "", 0

    def start(self, title: str, total: int, unit: str = "examples") -> None:
        self.current, self.done = title, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.current == self.title and self.done >= self.after:
            raise KeyboardInterrupt
