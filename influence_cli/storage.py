"""One place for on-disk names and atomic safetensors I/O with metadata.

Every output is written to a temporary name in its folder and renamed, so a file
with a final name is always complete. Metadata values are strings (safetensors'
rule); structured values are stored as JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fnmatch
import functools
import hashlib
import io
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from influence_cli import notices
from influence_cli.errors import OutputError, UsageError, first_line
from influence_cli.user_code import keeps_training_modes

FACTORS_FILE = "factors.safetensors"
MEMBERS_DIR = "members"  # ensembles: member i >= 1 (scores.checkpoints[i - 1]) keeps its factors in <factors_dir>/members/<i>/ (factors_dir: output_dir unless set)
FACTORS_PARTIAL = "factors.partial{rank}.safetensors"
SCORES_FILE = "scores.safetensors"
SCORES_INDEX = "scores.index.json"
SCORES_SHARD = "scores.shard-{shard:05d}.safetensors"
SCORES_SHARD_GLOB = SCORES_SHARD.split("{", 1)[0] + "*" + SCORES_SHARD.rsplit("}", 1)[1]  # every shard
SCORES_PARTIAL = "scores.partial{rank}.safetensors"
SELF_INFLUENCE_FILE = "self_influence.safetensors"
SIMILARITY_FILE = "similarity.safetensors"
SIMILARITY_PARTIAL = "similarity.partial{rank}.safetensors"
SPECTRUM_FILE = "spectrum.safetensors"
SPECTRUM_PARTIAL = "spectrum.partial{rank}.safetensors"
PARTIAL_FINISHED = ".finished{index}"  # a finished dataset's result beside the progress of dataset-similarity or spectrum, or a piece of compute-scores' saved scores: its name with this before ".safetensors"
PARTIAL_PIECE = ".piece{index}"  # a piece of the per-example energies spectrum saved of the dataset in progress (beside the finished datasets' files)

FORMAT_KEY = "format"
FACTORS_FORMAT = "influence_cli.factors/1"
SCORES_FORMAT = "influence_cli.scores/1"
SELF_FORMAT = "influence_cli.self_influence/1"
SIMILARITY_FORMAT = "influence_cli.similarity/1"
SPECTRUM_FORMAT = "influence_cli.spectrum/1"
EDITED_CHECKPOINT_FORMAT = "influence_cli.edited_checkpoint/1"
PARTIAL_FORMAT = "influence_cli.partial/1"

# Per-layer parts of the scores (scores.by_layer), beside the totals; the metadata key BY_LAYER lists their layers in order.
SCORES_BY_LAYER = "scores_by_layer"  # [L, n_query, n_train] (a shard: its train range), summing over L to "scores"
SELF_BY_LAYER = "self_influence_by_layer"  # [L, n_train], summing over L to "self_influence"
SELF_LOSSES = "train_losses"  # [n_train] each example's training loss, beside "self_influence" (absent from files of earlier versions)
BY_LAYER = "by_layer"
# scores.sum_queries: the global indices [Q] of the queries summed into the one row of "scores" (in place of
# query_indices / query_labels / query_predictions, which describe one query per row)
SUMMED_QUERY_INDICES = "summed_query_indices"
# Each training position's part of the scores (scores.per_token); the metadata key PER_TOKEN records T.
SCORES_PER_TOKEN = "scores_per_token"  # [n_query, n_train, T] (a shard: its train range), summing over T to "scores"
PER_TOKEN = "per_token"

# Per-layer factor keys: "<module>.<name>".
A_EIGENVECTORS = "a_eigenvectors"
A_EIGENVALUES = "a_eigenvalues"
G_EIGENVECTORS = "g_eigenvectors"
G_EIGENVALUES = "g_eigenvalues"
EIGENVALUES = "eigenvalues"  # curvature diagonal in the eigenbasis: EKFAC-corrected, K-FAC product or diagonal
NUM_EXAMPLES = "num_examples"


def utf8_text(text: str) -> bool:
    """Whether `text` is valid UTF-8 text: a path of other bytes holds Python's surrogate escapes, which safetensors can
    neither store in its metadata nor open as a file name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_pattern(path: Path) -> str:
    """Glob of the temporary names `save_tensors`/`save_json` use for `path`."""
    return f".{Path(path).name}.*.tmp"


def remove_stale_temp_files(path: Path, older_than_s: float = 0.0) -> None:
    """Deletes temporary files a killed writer of `path` left behind (never a finished file).

    The name of `path` may be a glob (`scores*`) to cover a family of outputs. Under the output's
    exclusive lock every such file is stale; without one (pictures, edit --out), `older_than_s`
    spares the files another live run may be writing now.

    An unlocked output's stale file that cannot be removed (no permission) stays, with a warning:
    the write goes to a new name beside it.
    """
    now = time.time()
    for tmp in temp_paths(path):
        try:
            if older_than_s <= 0 or now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if older_than_s <= 0:
                raise
            notices.warn(f"cannot remove {str(tmp)!r} ({exc.strerror or exc}), a temporary file a killed writer left: remove it by hand")


def temp_files(path: Path) -> list[tuple[Path, str]]:
    """The temporary files that writers of `path` (its name may be a glob) left, each with the name of the file it was for;
    a folder of such a name is no writer's, and is left alone."""
    found = sorted(Path(path).parent.glob(_temp_pattern(path)))  # .<name>.<random>.tmp
    return [(tmp, tmp.name[1:].rsplit(".", 2)[0]) for tmp in found if tmp.is_symlink() or not tmp.is_dir()]


def temp_paths(path: Path) -> list[Path]:
    """The temporary files that writers of `path` left (`temp_files`, without the names they were for)."""
    return [tmp for tmp, _ in temp_files(path)]


UNLOCKED_TEMP_AGE_S = 600.0  # a temporary file of an unlocked output this old is a killed writer's


@contextmanager
def atomic_path(path: Path, key: str = "output_dir") -> Iterator[Path]:
    """Yields a temporary name beside `path`; on success it is fsynced, given the usual
    permissions (mkstemp makes it 0600) and renamed to `path`; on failure it is removed.

    Usage::

        with atomic_path(out) as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    tmp = _temp_beside(path, key)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{key}: cannot write {str(path)!r} ({exc.strerror or exc})", hint=write_hint(exc, key, f"set {key} to a writable place")) from None
        if type(exc).__name__ == "SafetensorError":  # safetensors' I/O errors (a full disk) are not OSErrors
            raise OutputError(f"{key}: cannot write {str(path)!r} ({exc})", hint=f"free space, or {_elsewhere(key)}") from None
        raise
    _fsync_dir(path.parent)


def write_hint(exc: OSError, key: str, hint: str) -> str:
    """The hint of a write that failed with `exc`: a full disk or an exceeded quota (ENOSPC, EDQUOT) is freed, or the
    output written elsewhere (`key`: the config key or flag that names it); any other failure gets `hint`."""
    return f"free space, or {_elsewhere(key)}" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else hint


def check_image_path(path: Path, key: str) -> str:
    """Checks, before any work, that a picture can be written at `path`; returns its image format.

    The format comes from the suffix (.png, .jpg, ...); a missing folder is created when the
    picture is written.

    Raises:
        OutputError: unknown suffix, `path` is a folder, or its folder cannot be written.
    """
    from PIL import Image

    path = Path(path)
    check_readable_dir(path.parent, key, listed=False)  # is_dir() would raise PermissionError
    if path.is_dir():
        raise OutputError(f"{key}: {str(path)!r} is a folder", hint="give a file name ending in .png")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        what = "unknown image format" if fmt is None else "an image format Pillow cannot write:"
        raise OutputError(f"{key} {str(path)!r}: {what} {path.suffix!r}", hint="use a .png file name")
    try:  # some formats Pillow writes take no colour pictures (.blp, .xbm, .msp, ...)
        Image.new("RGB", (2, 2)).save(io.BytesIO(), format=fmt)
    except Exception as exc:  # noqa: BLE001 - whatever the format's writer raises
        raise OutputError(f"{key} {str(path)!r}: Pillow cannot write colour pictures as {path.suffix!r} ({exc})", hint="use a .png file name") from None
    if path.parent.is_dir():
        _temp_beside(path, key).unlink(missing_ok=True)  # the folder can be written
    else:
        check_creatable_dir(path.parent, key, f"give {key} a path in a writable folder")  # created when the picture is written, not by a run that fails first
    return fmt


def save_picture(image: Any, path: Path, key: str) -> None:
    """Writes a PIL image at `path` atomically, in the format of its suffix (`check_image_path`),
    after removing the temporary files a killed writer of it left (`UNLOCKED_TEMP_AGE_S`: a picture
    has no lock), so a run refused before drawing removes nothing."""
    fmt = check_image_path(path, key)
    remove_stale_temp_files(path, UNLOCKED_TEMP_AGE_S)
    with atomic_path(path, key=key) as tmp:
        image.save(tmp, format=fmt)


def _temp_beside(path: Path, key: str) -> Path:
    """A new empty temporary file in `path`'s folder (created if needed), for an atomic write of `path`.

    Raises:
        OutputError: naming `key`, when `path` is a folder or its folder cannot be written.
    """
    ensure_writable_dir(path.parent, key=key)
    if path.is_dir():
        raise OutputError(f"{key}: {str(path)!r} is a folder", hint="give a file name")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{key}: cannot write in {str(path.parent)!r} ({exc.strerror})", hint=write_hint(exc, key, f"set {key} to a writable place")) from None
    os.close(fd)
    return Path(name)


def ensure_writable_dir(folder: Path, key: str = "output_dir") -> None:
    """Creates `folder` if needed; OutputError naming `key` when it cannot be written (or read)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:  # a file, or a symbolic link to nothing, in the way: of `folder` or a folder above it
        raise _blocked(folder, _nearest_existing(Path(exc.filename or folder)), key) from None
    except OSError as exc:
        raise OutputError(f"{key}: cannot create {str(folder)!r} ({exc.strerror})", hint=write_hint(exc, key, f"set {key} to a writable folder")) from None
    check_creatable_dir(folder, key)  # entered and written (an output folder is checked `listed` by guards_output_dir)


def check_creatable_dir(folder: Path, key: str = "output_dir", hint: str | None = None) -> None:
    """Checks, without creating anything, what `ensure_writable_dir` would: that `folder` is a folder that can be
    written (and entered), or can be created (the nearest existing folder above it writable and entered). For a folder
    a later step of the run creates (a later model's of an ensemble, edit's --out, a picture's), so that a run refused
    before then leaves none. `hint`: the refusal's (by default: set `key` to a writable folder).

    Raises:
        OutputError: naming `key`, when a file or a symbolic link to nothing is in the way (of `folder` or a folder
            above it), or the folder that would hold it cannot be written or entered.
    """
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise _blocked(folder, existing, key, hint)
    check_readable_dir(existing, key, listed=False)
    if not os.access(existing, os.W_OK):
        where = f"{str(folder)!r} is" if existing == folder else f"cannot create {str(folder)!r}: {str(existing)!r} is"
        raise OutputError(f"{key}: {where} not writable", hint=hint or f"set {key} to a writable folder")


def refuse_file_as_folder(folder: Path, key: str, hint: str) -> None:
    """OutputError naming `key` when `folder`, or a path above it, is a file: a folder a command reads named files
    from (the factors of factors_dir), refused as what it is rather than as a folder without those files."""
    existing = _nearest_existing(folder)
    if os.path.exists(existing) and not os.path.isdir(existing):
        where = f"{str(folder)!r} is" if existing == folder else f"{str(folder)!r} lies under {str(existing)!r}, which is"
        raise OutputError(f"{key}: {where} a file, not a folder", hint=hint)


def factors_folder_hint(key: str) -> str:
    """The fix of a factors folder that is a file (`refuse_file_as_folder`), `key` naming it (factors_dir or output_dir)."""
    return f"set {key} to the folder of the factors, the one fit-factors wrote them into"


def _nearest_existing(path: Path) -> Path:
    """`path`, or the nearest path above it, that is there (a symbolic link to nothing counts: it is in the way)."""
    return next(p for p in (path, *path.parents) if os.path.lexists(p))


def _blocked(folder: Path, blocker: Path, key: str, hint: str | None = None) -> OutputError:
    """The refusal of `folder` when `blocker` (it, or a path above it) is a file or a symbolic link to nothing."""
    what = f"a symbolic link to {os.readlink(blocker)!r}, which leads to no folder" if blocker.is_symlink() else "a file, not a folder"
    where = f"{str(folder)!r} is" if blocker == folder else f"cannot create {str(folder)!r}: {str(blocker)!r} is"
    return OutputError(f"{key}: {where} {what}", hint=hint or f"set {key} to a writable folder")


def check_readable_dir(folder: Path, key: str = "output_dir", *, listed: bool = True) -> None:
    """OutputError naming `key` when `folder`, a folder or nothing yet, cannot be reached or its files opened (no
    search permission on it or on a folder above it), or, with `listed`, its files listed (no read permission on it).
    A folder a command writes its outputs and progress into is `listed` (it finds its own files there); one it only
    reads named files from (shared factors, top-k's scores), or writes one file into (a picture, `edit --out`), need
    not be: a folder that may be entered but not listed (a drop box, a shared folder that hides its names) serves."""
    try:
        os.stat(folder)
    except PermissionError:
        reachable = False
    except (OSError, ValueError):  # nothing there (yet): the caller says so, or creates it
        return
    else:
        reachable = not os.path.isdir(folder) or os.access(folder, (os.R_OK | os.X_OK) if listed else os.X_OK)
    if not reachable:
        need = "read and search permission on it and search permission on the folders above it (chmod u+rx)" if listed else (
            "search permission on it and the folders above it (chmod u+x)")  # fmt: skip
        raise OutputError(f"{key}: {str(folder)!r} cannot be read (permission denied)", hint=f"give this user {need}, or choose another folder for {key}")


_Run = TypeVar("_Run", bound=Callable[..., Any])

LOCK_FILE = ".influence.{what}.lock"


class OutputDirBusy(OutputError):
    """Another run holds the lock of the outputs this run would write."""


def guards_output_dir(
    what: str | Callable[[dict[str, Any]], str] | None,
    reads: str | None = None,
    checks: Callable[[Any, dict[str, Any]], object] | None = None,
) -> Callable[[_Run], _Run]:
    """Decorates a command's core function `run(cfg, ...)` that writes the outputs `what` (a name,
    or a function of run's keyword arguments: compute-scores writes "scores" or "self_influence")
    into cfg.output_dir (the factors into cfg.factors_dir), reading the outputs `reads`
    ("factors") from their folder. With `what` None the command writes no outputs of a kind (edit,
    whose one file, --out, takes no lock): only what it reads is locked, and no folder is created
    or removed. `checks(cfg, arguments)` (the checked cfg; run's arguments by name, as given) checks
    the command's own flags before any lock is taken or folder created, so a usage error comes
    before a busy folder (edit).

    While it runs, its outputs are locked exclusively and what it reads is locked shared
    (`output_dir_lock`; rank 0 of a torchrun job holds the locks and tells the other ranks whether
    it got them, before any rank touches a file; every rank first checks that its machine can reach
    and write the folders, agreed with the others, so one that cannot stops every rank, named). So a second run writing the same outputs is
    refused, and so is fit-factors while factors are being read (and the reverse), while commands
    writing other outputs (compute-scores and compute-scores --self, spectrum and
    dataset-similarity) share the folder. When it fails, the folder it created (with its
    parents) is removed again if nothing was written there, so a failed first run leaves no empty
    folder behind; saved progress keeps the folder, and a folder that existed is never removed.
    """

    def decorate(run: _Run) -> _Run:
        @functools.wraps(run)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            from influence_cli.context import check_arguments, checked_config, reads_of

            bound = check_arguments(run, (cfg, *args), kwargs)  # np.True_ as True, a str where a bool belongs refused
            args, kwargs = bound.args[1:], bound.kwargs
            data_read = reads_of(run.__name__, self_influence=bool(kwargs.get("self_influence")))
            cfg = checked_config(cfg, run.__name__, data_read)  # a Config changed after loading is checked before any file is touched
            if kwargs.get("resume") and kwargs.get("overwrite"):
                raise UsageError("--resume, --overwrite: pass one (--resume continues saved progress, --overwrite starts over)")
            if checks is not None:
                checks(cfg, bound.arguments)
            name = what(kwargs) if callable(what) else what
            folder: Path | None = None  # this run's output folder; None: it writes none
            key = "output_dir"
            created: list[Path] = []  # the folders it creates, innermost first
            state = kwargs.get("state")  # the DistState the CLI (or a Python caller) passes
            main = state is None or state.rank == 0  # without a state every process runs alone (as `prepare` does) and locks
            elsewhere = False  # refused by a lock on the factors in another folder: this run's own folder is cleaned up
            try:
                with contextlib.ExitStack() as locks:

                    def take_locks() -> OutputDirBusy | None:
                        """This rank's checks of the folders (each rank's own: a machine may not see or write them)
                        and, on rank 0, the locks; a refusal by another run's lock is returned."""
                        nonlocal folder, key, created, elsewhere
                        if name is not None:
                            folder, key = _folder_of(cfg, name)
                            check_readable_dir(folder, key)  # also a folder above it: exists() below would raise
                            created = [p for p in (folder, *folder.parents) if not p.exists()]
                        try:
                            if name is not None:
                                locks.enter_context(output_dir_lock(folder, name, hold=main, key=key))
                            if reads is not None:
                                read_folder, read_key = _folder_of(cfg, reads)
                                refuse_file_as_folder(read_folder, read_key, factors_folder_hint(read_key))  # not "no factors at <file>/..."
                                check_readable_dir(read_folder, read_key, listed=False)  # only its named files are read
                                if read_folder.is_dir():  # else nothing to read: the command says so
                                    elsewhere = read_folder != folder
                                    locks.enter_context(output_dir_lock(read_folder, reads, hold=main, shared=True, key=read_key))
                                    elsewhere = False
                        except OutputDirBusy as exc:
                            return exc
                        return None

                    if state is None:
                        busy = take_locks()
                    else:  # under torchrun a folder one machine cannot write stops every rank, named
                        from influence_cli.distributed import agree

                        busy = agree(state, take_locks)
                    busy, elsewhere = refusal_of_rank_0(state, busy, elsewhere)  # every rank stops if rank 0 did not get the locks
                    if busy is not None:
                        raise busy
                    with caller_autocast_off(), notices.once_per_call(), keeps_training_modes():  # the precision is factors.amp's, as recorded in the outputs
                        return run(cfg, *args, **kwargs)
            except BaseException as exc:
                if isinstance(exc, OutputDirBusy) and not elsewhere:
                    raise  # the folder is the other run's: leave everything as it is
                if created and created[0] == folder and folder is not None and folder.is_dir():
                    for sub, _, _ in os.walk(folder, topdown=False):  # empty subfolders first (members/<i>/)
                        if Path(sub) != folder:
                            _rmdir_if_empty(Path(sub))
                    for p in created:
                        if not _rmdir_if_empty(p):
                            break
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def caller_autocast_off() -> Iterator[None]:
    """Turns off a `torch.autocast` the caller entered (a notebook cell under one) for a run: it would
    put the passes' products in its dtype, unrecorded; `factors.amp` enters its own autocast inside."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def refusal_of_rank_0(state: Any, busy: OutputDirBusy | None, detail: Any = None) -> tuple[OutputDirBusy | None, Any]:
    """Rank 0's outcome of taking the locks (`busy`: refused; None: it holds them; `detail` goes with a
    refusal) on every rank of a torchrun job, where only rank 0 takes them: the other ranks get the
    same refusal (printed once, by rank 0), so that none goes on to touch a file. Without a
    distributed `state` (None: one process), `busy` and `detail` as given."""
    if state is None or not state.distributed:
        return busy, detail
    shared = state.broadcast_object(None if busy is None else (busy.message, busy.hint, detail))
    if shared is None:
        return busy, detail
    refusal = busy or OutputDirBusy(shared[0], hint=shared[1])
    refusal.everywhere()  # the job's refusal, rank 0's too: said once, without a [rank 0] prefix
    return refusal, shared[2]


def _folder_of(cfg: Any, what: str) -> tuple[Path, str]:
    """The folder of the outputs `what` and the config key that names it: the factors live in
    factors_dir (output_dir when unset), everything else in output_dir."""
    if what == "factors":
        return Path(cfg.factors_path), cfg.factors_key
    return Path(cfg.output_path), "output_dir"


_ORPHAN_WAIT_S = 10.0  # torch's DataLoader workers check for their parent every 5 s
_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so a lock lives
    exactly as long as the run that took it (closing a copy never releases the parent's lock)."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _writer_is_dead(holder: str) -> bool:
    """Whether the lock file names a writer on this host whose process has ended (its lock then lives on
    in the data-loading workers it forked, until they exit)."""
    found = re.match(r"pid (\d+) on (\S+):", holder)
    if found is None or found[2] != socket.gethostname():
        return False
    try:
        os.kill(int(found[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


@contextmanager
def output_dir_lock(
    folder: Path, what: str = "outputs", *, hold: bool = True, shared: bool = False, key: str = "output_dir"
) -> Iterator[None]:
    """Creates `folder` and holds a lock on `folder/.influence.<what>.lock`: exclusive for a run
    that writes `what`, shared (`shared`) for runs that read it. flock: the OS releases it when the
    process ends, even by SIGKILL, so a killed run never blocks the next (forked children, the
    DataLoader's workers, close their copy of it; should one still hold it, a writer named in the
    lock that is gone from this host is waited for, up to `_ORPHAN_WAIT_S`); the last holder removes
    the file (one it cannot remove stays: the next run locks it). With `hold` False it only creates the folder. Where the filesystem cannot lock (some
    network mounts), the run goes on unlocked, with a warning; a reader of a folder it cannot
    write (factors shared read-only through factors_dir) runs unlocked without one. `key` is the
    config key that names `folder` in messages.

    Raises:
        OutputDirBusy: another run holds a conflicting lock (a writer is named by pid, host and command).
    """
    check_readable_dir(folder, key, listed=not shared)
    if shared and folder.is_dir() and not os.access(folder, os.W_OK):
        yield
        return
    ensure_writable_dir(folder, key=key)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: no lock
        hold = False
    if not hold:
        yield
        return
    path = folder / LOCK_FILE.format(what=what)
    retries = 20  # a holder releasing (a reader upgrades to remove the file) or a writer starting: busy for milliseconds
    orphans_gone = time.monotonic() + _ORPHAN_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask decides, as for the outputs
        except OSError as exc:
            notices.warn(f"{key}: cannot create the lock file {str(path)!r} ({exc.strerror or exc}); running without it")
            yield
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:  # another run holds a conflicting lock
            holder = os.pread(fd, 400, 0).decode(errors="replace").strip()  # a writer's pid, host and command; readers write nothing
            os.close(fd)
            if retries > 0:
                retries -= 1
                time.sleep(0.025)
                continue
            if _writer_is_dead(holder) and time.monotonic() < orphans_gone:
                time.sleep(0.1)  # a killed writer's data-loading workers hold its lock until they notice (seconds)
                continue
            verb = "writing" if holder or shared else "reading"
            detail = f" ({holder})" if holder else " (a run that is starting)" if shared else ""
            raise OutputDirBusy(
                f"{key}: {str(folder)!r} is in use by another run {verb} its {what.replace('_', '-')}{detail}",
                hint=f"wait for it to finish, or give this run another {key}",
            ) from None
        except OSError as exc:  # ENOLCK, ENOSYS, EOPNOTSUPP: this filesystem does not lock
            os.close(fd)
            path.unlink(missing_ok=True)
            notices.warn(f"{key}: {str(folder)!r} cannot be locked ({exc.strerror or exc}); running without the lock")
            yield
            return
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and lock: lock the new one
    try:
        os.ftruncate(fd, 0)  # a reader holds it with readers only: what a killed writer left is stale
        if not shared:  # a writer says who it is
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {_program()}".encode("utf-8", "surrogateescape"), 0)
    except OSError as exc:  # a full disk: the run could write nothing there either
        if not shared:  # this run holds the lock alone: its file goes (one it cannot remove is locked by the next run)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        os.close(fd)
        raise OutputError(
            f"{key}: cannot write the lock file {str(path)!r} ({exc.strerror or exc})", hint=write_hint(exc, key, f"set {key} to a writable folder")
        ) from None
    _HELD_LOCKS.add(fd)
    try:
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        try:  # the last holder removes the file: a reader only when it can take the lock alone
            if shared:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path.unlink(missing_ok=True)
        except OSError:  # another reader holds it (BlockingIOError), or nothing can be removed there any more: the file left is harmless
            pass
        finally:
            os.close(fd)


def writer_of(folder: Path, what: str) -> str | None:
    """Who holds the exclusive lock on `folder`'s outputs `what` right now (its pid, host and
    command, or "a run that is starting"); None when no run writes them. Reads the lock without
    creating it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        return None
    try:
        fd = os.open(folder / LOCK_FILE.format(what=what), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 400, 0).decode(errors="replace").strip() or "a run that is starting"
    except OSError:  # this filesystem does not lock
        return None
    finally:
        os.close(fd)  # releases the shared lock, if it was taken
    return None


def _program() -> str:
    """What this process runs, for the lock's holder: `influence fit-factors run.yaml`, or a script's name and first arguments."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    name = "python -m influence_cli" if name == "__main__.py" else name
    return " ".join([name, *sys.argv[1:3]])


def _rmdir_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], *, key: str = "output_dir") -> None:
    """Writes a safetensors file atomically (temporary file in the same folder + rename).

    Args:
        path: Final file name.
        tensors: Name → tensor (moved to CPU, made contiguous).
        metadata: Values that are not strings are stored as JSON, and so is a string that reads as
            JSON (a fingerprint "1234e567…" would read back as a number); see `decode_metadata`.
        key: The config key or flag that names `path`, for errors.
    """
    meta = {k: _encode(v) for k, v in metadata.items()}
    meta.setdefault("created", created_now())
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path, key) as tmp:
        save_file(cpu, str(tmp), metadata=meta)  # any bytes of a name (safetensors' readers alone need UTF-8)


def save_state_dict(path: Path, tensors: dict[str, torch.Tensor], *, key: str = "output_dir") -> None:
    """Writes a plain state dict (name → tensor, nothing else) with torch.save atomically (temporary
    file in the same folder + fsync + rename), for `torch.load(path, weights_only=True)`; tensors
    that are one object in `tensors` (tied weights) are stored once.

    Args:
        path: Final file name (.pt / .pth).
        tensors: Name → tensor (moved to CPU, made contiguous).
        key: The config key or flag that names `path`, for errors.
    """
    cpu: dict[int, torch.Tensor] = {}
    state = {k: cpu.setdefault(id(v), v.detach().to("cpu").contiguous()) for k, v in tensors.items()}
    with atomic_path(path, key) as tmp, open(tmp, "wb") as fh:
        sink = _Sink(fh)
        try:
            torch.save(state, sink)
        except RuntimeError as exc:  # torch's zip writer turns a failed write into "unexpected pos ..."
            if sink.error is not None:
                raise sink.error from None  # the OSError itself (a full disk), as atomic_path reports it
            raise OutputError(f"{key}: cannot write {str(path)!r} ({first_line(exc)})", hint=f"free space, or {_elsewhere(key)}") from None


class _Sink:
    """A file for torch.save that keeps the OSError of a failed write (torch reports only a wrong position)."""

    def __init__(self, fh: io.BufferedWriter) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


_last_created: list[datetime.datetime] = []  # the latest time created_now gave in this process
_created_lock = threading.Lock()


def created_now() -> str:
    """The `created` time every output records, local time to the microsecond with its UTC offset:
    2026-11-30T02:10:00.123456+0000.

    It is also what identifies a factors file (a refit of the same settings is told from the fit before by it),
    so no two calls give the same time: one that the clock would give again (a coarse clock, two fits in the same
    microsecond) is the one before plus a microsecond. Across processes the microseconds part them; two fits of
    one folder do not run at once (its lock). An output of an older version, to the second, compares as its
    text: unequal to every time written now."""
    with _created_lock:
        now = datetime.datetime.now().astimezone()
        if _last_created and now <= _last_created[0]:
            now = _last_created[0] + datetime.timedelta(microseconds=1)
        _last_created[:] = [now]
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f%z")


def save_json(path: Path, data: Any) -> None:
    """Writes JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


def load_json(path: Path, what: str, hint: str) -> Any:
    """The JSON an output file holds (the scores index).

    Raises:
        OutputError: naming the file: one this user may not read as such, one that does not read as JSON as no
            readable `what`, with `hint` (the command that writes it again).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except PermissionError:
        raise read_denied(path) from None
    except (OSError, ValueError) as exc:
        raise OutputError(f"{str(path)!r} is not a readable {what} ({exc})", hint=hint) from None
    except RecursionError:
        raise OutputError(f"{str(path)!r} is not a readable {what} (nested too deeply)", hint=hint) from None


def read_denied(path: Path) -> OutputError:
    """The OutputError of an output file this user may not read."""
    return OutputError(f"{str(path)!r} cannot be read (permission denied)", hint="give this user read permission on it (chmod)")


_REMAKE = (  # (file name pattern, the command that writes it again), the first match wins
    ("factors.*", "refit with `influence fit-factors CONFIG --overwrite`"),
    ("scores.partial*.self.*", "rerun `influence compute-scores CONFIG --self --overwrite`"),  # --self's progress
    ("scores.*", "rerun `influence compute-scores CONFIG --overwrite`"),
    ("self_influence.*", "rerun `influence compute-scores CONFIG --self --overwrite`"),
    ("similarity.*", "rerun `influence dataset-similarity CONFIG --overwrite`"),
    ("spectrum.*", "rerun `influence spectrum CONFIG --overwrite`"),
)


def remake_hint(path: Path) -> str:
    """How to write an unreadable output again: the command that wrote it, by the file's name."""
    name = Path(path).name
    return next((hint for pattern, hint in _REMAKE if fnmatch.fnmatch(name, pattern)), "write it again (--overwrite)")


def check_shards_present(index: Path, shards: list[Path]) -> None:
    """Refuses a scores index (`index`) whose listed shard files are not all there: the scores are incomplete.

    Raises:
        OutputError: naming the first missing shard and how many more are missing.
    """
    missing = [p for p in shards if not p.is_file()]
    if missing:
        more = f", and {len(missing) - 1} more shard(s)" if len(missing) > 1 else ""
        raise OutputError(f"{str(missing[0])!r} (listed in {index.name}) is missing{more}", hint="rerun compute-scores with --overwrite")


def is_output_name(name: str) -> bool:
    """A file name that the commands write into output_dir (factors, scores and shards, progress, reports)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern, _ in _REMAKE) or fnmatch.fnmatch(name, LOCK_FILE.format(what="*"))


def file_format(path: Path) -> str:
    """The `format` metadata of an existing safetensors file ("" when absent or unreadable, or no regular file: a FIFO
    is not opened, which would block)."""
    if not path.is_file():
        return ""
    try:
        return read_metadata(path).get(FORMAT_KEY, "")
    except OutputError:  # not a file, or not safetensors
        return ""


def canonical_json(value: Any) -> str:
    """`value` as outputs record and hash it (metadata, settings keys, data fingerprints, `source_seed`): JSON with sorted keys, anything JSON has no type for by its
    str (a set's elements in sorted order: Python's own order of strings changes with every process)."""
    return json.dumps(value, sort_keys=True, default=_as_text)


def _as_text(value: Any) -> str:
    if type(value) not in (set, frozenset) or not value:
        return str(value)
    numbers = all(isinstance(v, (int, float)) for v in value)
    items = sorted(value) if numbers or all(isinstance(v, str) for v in value) else sorted(value, key=_as_element)
    text = "{" + ", ".join(_as_element(v) for v in items) + "}"  # as str writes a set of these elements in this order
    return text if type(value) is set else f"frozenset({text})"


def _as_element(value: Any) -> str:
    return _as_text(value) if type(value) is frozenset else repr(value)


def _encode(value: Any) -> str:
    if isinstance(value, str) and utf8_text(value):
        try:
            json.loads(value)
        except ValueError:
            return value  # plain text, stored as it is: "ekfac", a path, a hex digest with a letter
    # JSON's escapes are ASCII: a path of non-UTF-8 bytes (Python's surrogate escapes) is stored, and read back, as it is
    return canonical_json(value)  # a YAML date or set in the kwargs as text


def open_safetensors(path: Path) -> Any:
    """safetensors' `safe_open` handle of `path` (framework "pt"; its tensors: views of one memory map). A path that is
    not valid UTF-8 (which safetensors cannot open by name) is opened through its descriptor's UTF-8 name
    (/proc/self/fd/N, Linux), closed again once the map is made (the handle keeps its own); where there is no
    /proc/self/fd it fails as safetensors does (`unreadable` names why). Raises what safe_open raises."""
    with _safetensors_name(path) as name:
        return safe_open(name or str(path), framework="pt")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, on the CPU, as views of safetensors' memory map of it. A path that is not
    valid UTF-8 (which safetensors cannot open by name) is opened here and mapped through its descriptor's UTF-8 name
    (/proc/self/fd/N, Linux), which is closed again once the map is made (the map lives on); where there is no
    /proc/self/fd the file is read into memory through Python, and briefly held twice."""
    from safetensors.torch import load, load_file

    with _safetensors_name(path) as name:
        if name is not None:
            return load_file(name, device="cpu")
    return load(Path(path).read_bytes())


@contextmanager
def _safetensors_name(path: Path) -> Iterator[str | None]:
    """A name safetensors can open `path` by while the context lasts: the path itself where it is valid UTF-8, else
    /proc/self/fd/N of a descriptor opened here (closed on leaving); None where /proc/self/fd is not there (not
    Linux). Opening a path that is not UTF-8 fails as reading would (OSError)."""
    if utf8_text(str(path)):
        yield str(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}" if _descriptor_names() else None
    finally:
        os.close(fd)


_TEXT_KEYS = frozenset({  # always text; files of earlier versions stored them as they are, even "1234567890123456"
    "format", "created", "tool_version", "torch_version", "device", "run_key", "result_key", "model_fingerprint",
    "dataset_fingerprint", "train_fingerprint", "query_fingerprint", "factors_dataset_fingerprint",
})  # fmt: skip


def decode_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Safetensors metadata (strings) as values: each JSON value decoded, plain text kept."""
    decoded: dict[str, Any] = {}
    for key, text in meta.items():
        if key in _TEXT_KEYS and not text.startswith('"'):
            decoded[key] = text
            continue
        try:
            decoded[key] = json.loads(text)
        except ValueError:
            decoded[key] = text
    return decoded


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 hex digest of named tensors: each one's name, shape, dtype and bytes, in name order
    (any change of a value changes it; the model fingerprint is its first 16 characters)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{list(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n".encode())
        if t.numel():
            h.update(memoryview(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))  # the bytes, not a copy
    return h.hexdigest()


def other_version(metadata: dict[str, Any]) -> str:
    """" (written by influence_cli 0.1.0; this is 0.2.0, ...)" when another version of the tool wrote
    an output (its `tool_version`), else "": for refusals that a change of version may explain."""
    from influence_cli import __version__

    written = _version_written(metadata)
    return "" if written is None else f" (written by influence_cli {written}; this is {__version__}, and versions may fingerprint data differently)"


def _version_written(metadata: dict[str, Any]) -> str | None:
    """The `tool_version` of an output that another version of influence_cli wrote, as a message shows it
    (`_shown`); None for one of this version, or one that records none."""
    from influence_cli import __version__

    written = metadata.get("tool_version")
    return _shown(written) if isinstance(written, str) and written != __version__ else None


def read_metadata(path: Path, hint: str | None = None) -> dict[str, Any]:
    """The decoded metadata of a safetensors file (OutputError naming the command that writes it again, or with `hint`)."""
    with _opened(path, hint) as fh:
        return decode_metadata(dict(fh.metadata() or {}))


def _check_format(path: Path, meta: dict[str, Any], expected_format: str | None) -> None:
    if expected_format is not None and meta.get(FORMAT_KEY) != expected_format:
        raise format_mismatch(path, meta.get(FORMAT_KEY), expected_format)


def format_mismatch(path: Path, found: Any, expected: str, hint: str | None = None) -> OutputError:
    """The OutputError of an output whose format (`found`, from its metadata) is not `expected`: one of another
    version of the same kind is to be written again, any other file is not the output looked for."""
    if isinstance(found, str) and found.isprintable() and found.split("/")[0] == expected.split("/")[0]:  # else quoted: one line
        return OutputError(
            f"{str(path)!r} holds format {found}, written by another version of influence_cli (this one reads {expected})",
            hint=hint or "run the command that wrote it again, with --overwrite",
        )
    return OutputError(
        f"{str(path)!r} is not an output of format {expected} (its format: {found!r})",
        hint=hint or "point the command at the output_dir of a matching run",
    )


def unreadable(path: Path, exc: Exception, what: str = "safetensors file", hint: str | None = None) -> OutputError:
    """The OutputError of an output `path` that safetensors failed to open (`exc`): a path that is not UTF-8 where
    there is no /proc/self/fd to open it through, and a file this user may not read, are named as such, anything else is `what` unreadable, with `hint` (by default the command
    that writes it again)."""
    if not _openable_name(path):
        return OutputError(f"{str(path)!r} cannot be opened: its path is not valid UTF-8, which safetensors needs (and "
                           "there is no /proc/self/fd to open it through)", hint="rename the file (or the folders above it) to UTF-8 names")  # fmt: skip
    if os.path.exists(path) and not os.access(path, os.R_OK):  # safetensors says "No such file or directory" of it too
        return read_denied(path)
    return OutputError(f"{str(path)!r} is not a readable {what} ({exc})", hint=hint or remake_hint(path))


def _openable_name(path: Path) -> bool:
    """Whether safetensors can open `path` (`open_safetensors`): a UTF-8 path, or any path where /proc/self/fd is."""
    return utf8_text(str(path)) or _descriptor_names()


def _descriptor_names() -> bool:
    """Whether this system names a process's open descriptors as files, /proc/self/fd/N (Linux)."""
    return os.path.isdir("/proc/self/fd")


@contextmanager
def _opened(path: Path, hint: str | None = None) -> Iterator[Any]:
    """safe_open's handle of `path` (its tensors: views of one memory map); a failure to read it, there or in the
    body, is an OutputError naming the file (`unreadable`, with `hint`), and the OutputErrors the body raises pass
    as they are."""
    try:
        with open_safetensors(path) as fh:
            yield fh
    except OutputError:
        raise
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise unreadable(path, exc, hint=hint) from None


def files_digest(paths: list[Path]) -> str:
    """`tensors_digest` of the tensors of safetensors files (not their metadata), each file's tensors named by the
    file's name and their own when there are several (a scores index's shards): two outputs holding the same bits
    have the same digest, whenever and wherever they were written. One file is read at a time (memory-mapped)."""
    if len(paths) == 1:
        return tensors_digest(load_tensors(paths[0])[0])
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}:{tensors_digest(load_tensors(path)[0])}\n".encode())
    return h.hexdigest()


def load_tensors(path: Path, expected_format: str | None = None, keys: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reads tensors (all, or `keys`) and decoded metadata; checks the `format` field when asked.

    The tensors are views of one memory map of the file (safetensors'): a page is read when first used.
    """
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"{str(path)!r} does not exist")
    with _opened(path) as fh:
        meta = decode_metadata(dict(fh.metadata() or {}))
        _check_format(path, meta, expected_format)
        names = list(fh.keys()) if keys is None else keys
        tensors = {k: fh.get_tensor(k) for k in names}
    return tensors, meta


def read_contents(path: Path, expected_format: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The decoded metadata of a safetensors file and its tensors' dtypes by name (safetensors' names:
    "F32", "I64", ...), read from its header alone; checks the `format` field when asked."""
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"{str(path)!r} does not exist")
    with _opened(path) as fh:
        meta = decode_metadata(dict(fh.metadata() or {}))
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    _check_format(path, meta, expected_format)
    return meta, dtypes


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a file from the one renamed over it, or rewritten: (device, inode, size, mtime in
    ns); None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_groups(path: Path, groups: list[list[str]], *, separate: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of a safetensors file, one group of names at a time (`read_contents` lists them).

    The tensors are views of a memory map of the file, whose pages are read when first used and
    stay resident while the map lives. With `separate`, each group comes from a map of its own,
    unmapped once the caller has dropped the group's tensors: for a caller that copies each group
    (to another dtype or device), so that the file is never resident in full beside its copies.
    Without, one map serves every group (a map per group of tensors kept as they are would hold
    the file's size of address space per group).
    """
    path = Path(path)
    if not separate:
        tensors = _read(path, [k for keys in groups for k in keys])
        for keys in groups:
            yield {k: tensors.pop(k) for k in keys}
        return
    for keys in groups:
        yield _read(path, keys)  # no reference kept here: the group's map goes with the caller's last use of it


def _read(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """`keys` of `path` through a handle (and a memory map) of their own."""
    with _opened(path) as fh:
        return {k: fh.get_tensor(k) for k in keys}


def member_dir(out_dir: Path, member: int) -> Path:
    """The folder of ensemble member `member`'s factors: output_dir itself for member 0 (model.checkpoint)."""
    return Path(out_dir) if member == 0 else Path(out_dir) / MEMBERS_DIR / str(member)


def check_can_write(path: Path, overwrite: bool, what: str, key: str | None = None, fmt: str | None = None, *, resume: bool = False) -> None:
    """Refuses to replace an existing output unless `overwrite`, saying what the file is: a finished run's output
    (`what`, in format `fmt`), one of another kind (its format's, when `fmt` is given), one of another version of
    influence_cli, a safetensors file of another program (a checkpoint, say: to keep), a file whose header does not
    read (damaged from outside), or a file that records nothing of what wrote it (edit's .pt state dict); the hint of
    a file that may be another program's, or an output of another kind, names another place first (`key`: the flag or
    config key that names `path`).
    With `resume`, an influence_cli output of `fmt`'s kind, of any version, passes: --resume compares its settings.
    Only a regular file that safetensors can open is read (a file that is not readable, or has a non-UTF-8 path where
    there is no /proc/self/fd, fails to open whatever it holds, so it is taken for a finished run's output, by its
    name); what is no regular file is
    refused as that, so no caller reads it (a FIFO would block), and a folder even with `overwrite` (never removed)."""
    if not path.exists():
        return
    refuse_irregular(path, overwrite, key)
    if overwrite:
        return
    found = _found(path, what, key, fmt, resume=resume)
    if found is None and resume:
        return
    detail, hint = found or (f"already holds {what} from a finished run", "pass --overwrite to replace it")
    raise OutputError(f"{str(path)!r} {detail}", hint=hint).everywhere()


def refuse_irregular(path: Path, overwrite: bool, key: str | None = None) -> None:
    """Refuses what is at `path` where it is no regular file, never opening it (a FIFO would block its reader): a
    folder even with `overwrite` (never removed), a FIFO, socket or device without it (`key`: as check_can_write's).
    Output paths (`check_can_write`) and progress files (snapshots, score shards, finished datasets) both use it."""
    if not path.exists() or path.is_file():
        return
    elsewhere = _elsewhere(key)
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a folder, not a file", hint=f"{elsewhere}, or move that folder away").everywhere()
    if not overwrite:
        detail = "already exists and is not a regular file (a FIFO, socket or device)"
        raise OutputError(f"{str(path)!r} {detail}", hint=f"{elsewhere}, or pass --overwrite to replace it").everywhere()


_FORMATS = frozenset({FACTORS_FORMAT, SCORES_FORMAT, SELF_FORMAT, SIMILARITY_FORMAT, SPECTRUM_FORMAT, EDITED_CHECKPOINT_FORMAT, PARTIAL_FORMAT})
_KINDS = {  # what an output of each kind (its format's name before "/") holds, in a message
    "factors": "factors", "scores": "scores", "self_influence": "self-influence scores", "similarity": "a similarity result",
    "spectrum": "a spectrum result", "edited_checkpoint": "an edited checkpoint", "partial": "the progress of an interrupted run",
}  # fmt: skip


def _elsewhere(key: str | None) -> str:
    """The hint's way to write elsewhere: by `key`, the flag or config key that names the path."""
    if not key:
        return "write to another place"
    return f"give {key} another path" if key.startswith("-") else f"set {key} to another place"


def _found(path: Path, what: str, key: str | None, fmt: str | None, *, resume: bool) -> tuple[str, str] | None:
    """(detail, hint) of check_can_write's refusal of the file at `path` where it is not (or may not be) a finished
    run's output of `what` of this version (with `resume`, of any version); None where it is, or is taken to be."""
    from influence_cli import __version__

    elsewhere = _elsewhere(key)
    if path.suffix != ".safetensors":
        if is_output_name(path.name):
            return None
        detail = f"already exists (a {path.suffix or 'file'} file records nothing of what wrote it: it may be another program's)"
        return detail, f"{elsewhere}, or pass --overwrite to replace it"
    if not (_openable_name(path) and os.access(path, os.R_OK)):
        return None
    keep = f"{elsewhere}, or pass --overwrite to replace that file"  # a file that may be another program's
    try:
        meta = read_metadata(path)
    except OutputError:
        return "already exists and is not a readable safetensors file (damaged, or not written by influence_cli)", keep
    made = meta.get(FORMAT_KEY)
    if not written_by_influence_cli(meta):
        detail = "already exists and was not written by influence_cli (a safetensors file of another program"
        return detail + (f", format {_shown(made)})" if made else ")"), keep
    kind = _kind(made)
    if fmt is not None and kind != _kind(fmt):
        held = _KINDS.get(kind, "an influence_cli output of another kind")
        return f"already holds {held} (format {_shown(made)}), not {what}", keep
    if resume:
        return None
    if (written := _version_written(meta)) is not None:
        return f"already holds {what} written by influence_cli {written} (this is {__version__})", "pass --overwrite to replace it"
    if (made != fmt) if fmt is not None else (made not in _FORMATS):
        return f"already holds {what} in format {_shown(made)}, written by another version of influence_cli (this is {__version__})", "pass --overwrite to replace it"
    return None


def _kind(fmt: str) -> str:
    """The kind of output an influence_cli format names: "scores" of "influence_cli.scores/1"."""
    return fmt.removeprefix("influence_cli.").split("/")[0]


def written_by_influence_cli(metadata: dict[str, Any]) -> bool:
    """Whether a safetensors file's decoded metadata is that of an influence_cli output (any version): every one
    records a format "influence_cli.<kind>/<n>"; another program's file has none, or its own ("pt" for Hugging Face's)."""
    made = metadata.get(FORMAT_KEY)
    return isinstance(made, str) and made.startswith("influence_cli.")


def _shown(value: Any) -> str:
    """A metadata value in a one-line message: printable text as it is, anything else quoted."""
    return value if isinstance(value, str) and value.isprintable() else repr(value)
