"""Interrupted passes in tests: a progress sink that stops a run the way Ctrl-C does, and the checks around it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import Result

from influence_cli import storage
from influence_cli.errors import OutputError
from influence_cli.progress import NullProgress
from influence_cli.resume import PassCheckpoint
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


class Streamed(NullProgress):
    """Records the passes a run streams: [title, examples], in order (a resumed pass counts its saved examples too)."""

    def __init__(self) -> None:
        self.passes: list[list] = []

    def start(self, title: str, total: int, unit: str = "examples") -> None:
        self.passes.append([title, 0])

    def advance(self, n: int = 1) -> None:
        self.passes[-1][1] += n


def killed_before_the_snapshot(monkeypatch: pytest.MonkeyPatch, phase: str) -> None:
    """Stops every run (as a kill would) once it has written the files of the datasets it finished and before its
    snapshot of `phase` ("dataset:<i>": dataset-similarity's or spectrum's after dataset i - 1)."""
    save = PassCheckpoint.save

    def killed(self, phase_: str, batches_done: int, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        if path is None and phase_ == phase:
            raise KeyboardInterrupt
        save(self, phase_, batches_done, tensors, path)

    monkeypatch.setattr(PassCheckpoint, "save", killed)


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
    """Rewrites the progress at `partial` (a dataset-similarity or spectrum snapshot, the files of the datasets it
    counts as finished and spectrum's pieces of the dataset in progress) as earlier versions saved it: one snapshot
    that holds the finished results as finished.<i>.* and the dataset in progress's energies so far as state.<k>."""
    tensors, meta = load_tensors(partial)
    for i in range(int(meta["phase"].removeprefix("dataset:"))):
        path = partial.with_suffix(f".finished{i}.safetensors")
        finished, _ = load_tensors(path)
        tensors |= {f"finished.{i}.{k}": v for k, v in finished.items()}
        path.unlink()
    if "state.pieces" in tensors:
        pieces = [partial.with_suffix(f".piece{i}.safetensors") for i in range(int(tensors.pop("state.pieces")))]
        rows = [load_tensors(piece)[0] for piece in pieces]
        assert sum(len(next(iter(r.values()))) for r in rows) == int(tensors.pop("state.rows"))
        tensors |= {f"state.{k}": torch.cat([r[k] for r in rows]) for k in rows[0]}
        for piece in partial.parent.glob(partial.with_suffix(".piece*.safetensors").name):
            piece.unlink()
    storage.save_tensors(partial, tensors, meta)


class PassesStart(Exception):
    """Raised by a stand-in for a command's passes: the command is stopped where they start."""


class MetaDeviceRun:
    """A command of `lib` (a module that calls `prepare`) run on the `meta` device (no GPU needed), every
    tensor read from a safetensors file (`storage._read`, the factors file's memory map) watched by a weak
    reference: `alive()` counts those still referenced, to show that none outlives its copy on the device."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, lib: object) -> None:
        self.mapped: list[weakref.ref] = []
        real_read, real_prepare = storage._read, lib.prepare  # type: ignore[attr-defined]

        def read(path, keys):
            tensors = real_read(path, keys)
            self.mapped.extend(weakref.ref(t) for t in tensors.values())
            return tensors

        def prepare(cfg, state):
            ctx = real_prepare(cfg, state)
            ctx.state = dataclasses.replace(ctx.state, device=torch.device("meta"))
            return ctx

        monkeypatch.setattr(storage, "_read", read)
        monkeypatch.setattr(lib, "prepare", prepare)

    def alive(self) -> int:
        """How many tensors read from a file are still referenced (none read: -1, which no test expects)."""
        return sum(r() is not None for r in self.mapped) if self.mapped else -1


def device_types(layers: dict) -> set[str]:
    """The device types of the floating-point tensors of {layer: LayerFactors}."""
    return {t.device.type for lf in layers.values() for t in lf.tensors().values() if t.is_floating_point()}


def interrupt_after(monkeypatch, method: str, calls: int) -> None:
    """KeyboardInterrupt on the `calls`-th call of ScoreKernel.<method> (after `calls` batches were scored);
    the pairwise methods are static."""
    from influence_cli.kernel import ScoreKernel

    real = getattr(ScoreKernel, method)
    seen = [0]

    def wrapped(*args, **kwargs):
        if seen[0] == calls:
            raise KeyboardInterrupt
        seen[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ScoreKernel, method, staticmethod(wrapped) if method.startswith("pairwise") else wrapped)


def make_irregular(path: Path, kind: str) -> None:
    """A FIFO (`kind` "fifo") or an empty folder ("folder") at `path`, in place of the file there."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def never_open_fifos(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test where a command opens a FIFO to read it (it would block for good): as a safetensors file
    (`storage.open_safetensors`, which every read of an output goes through) or as text (a JSON index)."""
    opened, read_text = storage.open_safetensors, Path.read_text
    monkeypatch.setattr(storage, "open_safetensors", lambda p, *a, **kw: pytest.fail(f"{p} was opened") if Path(p).is_fifo() else opened(p, *a, **kw))
    monkeypatch.setattr(Path, "read_text", lambda p, *a, **kw: pytest.fail(f"{p} was opened") if p.is_fifo() else read_text(p, *a, **kw))


def check_irregular_progress(
    invoke: Callable[..., Result], command: str, config: Path, overrides: list[str], cases: dict[str, tuple[Path | None, str]],
    output: str, kind: str, runs: Path,
) -> None:
    """dataset-similarity or spectrum (`command`, writing `output`) over a FIFO or folder (`kind`) at a progress path:
    for each case (an output_dir copied from its template, or empty, and the name of the path made irregular there)
    without a flag, with --resume and with --overwrite. A folder is always refused, a FIFO too except by --overwrite
    and beside a finished result, where it goes with the progress and only the output stays."""
    for case, (template, name) in cases.items():
        for flags in ((), ("--resume",), ("--overwrite",)):
            out = runs / f"{case}{''.join(flags)}"
            shutil.copytree(template, out) if template else out.mkdir(parents=True)
            make_irregular(out / name, kind)
            result = invoke(command, str(config), *[a for s in [*overrides, f"output_dir={out}"] for a in ("--set", s)], *flags)
            if kind == "folder" or (flags != ("--overwrite",) and case != "finished"):
                assert_refused_as_irregular(result, out / name, kind)
                continue
            assert result.exit_code == 0, (case, flags, result.output)
            assert sorted(p.name for p in out.iterdir()) == [output], (case, flags)  # the FIFO gone, no progress left


def assert_refused_as_irregular(result: Result, path: Path, kind: str) -> None:
    """`result` (a CLI run) is the one-line refusal of the FIFO or folder (`kind`, as `make_irregular`'s) at the progress
    path `path`, with its one-line hint naming output_dir and the fix, and `path` is left as it is."""
    detail, fix = {
        "fifo": ("already exists and is not a regular file (a FIFO, socket or device)", "pass --overwrite to replace it"),
        "folder": ("is a folder, not a file", "move that folder away"),
    }[kind]
    assert (result.exit_code, result.stdout, "Traceback" in result.stderr) == (5, "", False), (result.exit_code, result.output)
    assert result.stderr.splitlines() == [f"output error: {str(path)!r} {detail}", f"hint: set output_dir to another place, or {fix}"]
    assert path.is_fifo() if kind == "fifo" else path.is_dir()
