"""Interrupted passes in tests: a progress sink that stops a run the way Ctrl-C does, and the checks around it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from influence_cli.errors import OutputError
from influence_cli.progress import NullProgress
from influence_cli.storage import load_tensors


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


def interrupt(run: Callable[..., object], title: str, after: int, partial: Path, output: Path) -> None:
    """Stops `run` (a command's core function) in its pass `title` after `after` examples, and checks what that
    leaves: progress at `partial`, no `output`, and a rerun without --resume refused (the progress is never dropped)."""
    with pytest.raises(KeyboardInterrupt):
        run(progress=StopAt(title, after))
    assert partial.is_file() and not output.exists()
    with pytest.raises(OutputError, match="progress of an interrupted run"):
        run()


def assert_same_tensors(got: Path, expected: Path) -> None:
    """The two safetensors files hold the same tensors, bit for bit."""
    a, _ = load_tensors(got)
    b, _ = load_tensors(expected)
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name
