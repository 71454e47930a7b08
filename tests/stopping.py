"""Interrupted passes in tests: a progress sink that stops a run the way Ctrl-C does, and the checks around it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from influence_cli import storage
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


def progress_files(partial: Path) -> list[str]:
    """The names of the progress files beside the snapshot `partial` of dataset-similarity or spectrum: the
    snapshot and the files of the datasets it counts as finished (not the final output)."""
    return sorted(p.name for p in partial.parent.glob(partial.name.removesuffix(".safetensors") + "*.safetensors"))


class SavesSpy:
    """Records every `storage.save_tensors` (install with monkeypatch): the file's name and its tensors' bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[tuple[str, list[str], int]] = []
        save = storage.save_tensors

        def spy(path: Path, tensors: dict[str, torch.Tensor], *args: object, **kwargs: object) -> None:
            self.writes.append((Path(path).name, sorted(tensors), sum(t.numel() * t.element_size() for t in tensors.values())))
            save(path, tensors, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(storage, "save_tensors", spy)

    def of(self, name: str) -> list[tuple[list[str], int]]:
        """The writes of the file `name`: (tensor names, bytes), in order."""
        return [(keys, size) for n, keys, size in self.writes if n == name]


def as_earlier_snapshot(partial: Path) -> None:
    """Rewrites the progress at `partial` (a dataset-similarity or spectrum snapshot and the files of the datasets it
    counts as finished) as earlier versions saved it: one snapshot that holds the finished results as finished.<i>.*."""
    tensors, meta = load_tensors(partial)
    for i in range(int(meta["phase"].removeprefix("dataset:"))):
        path = partial.with_suffix(f".finished{i}.safetensors")
        finished, _ = load_tensors(path)
        tensors |= {f"finished.{i}.{k}": v for k, v in finished.items()}
        path.unlink()
    storage.save_tensors(partial, tensors, meta)
