"""The user's own code (model and data factories, measurements), imported from the config file's folder."""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import importlib.util
import os
import random
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from influence_cli.errors import InfluenceError, first_few, first_line


def seed_generators(seed: int, *, torch_only: bool = False) -> None:
    """Seeds torch's CPU generator (and each CUDA device's, where CUDA is initialized: an uninitialized CUDA is not
    seeded, as `torch.manual_seed` would queue a seed that reseeds the caller's CUDA generators once CUDA starts) and,
    unless `torch_only`, NumPy's global generator and Python's `random`, from `seed` (an int >= 0) taken into each
    one's seed range. Used inside `keeps_random_state`, which puts the caller's state back afterwards."""
    import numpy as np  # here: the CLI imports this module, and answers --help without loading torch
    import torch

    torch.default_generator.manual_seed(seed % 2**64)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed % 2**64)
    if not torch_only:
        np.random.seed(seed % 2**32)
        random.seed(seed)


@contextlib.contextmanager
def keeps_random_state() -> Iterator[None]:
    """Leaves the global random generators as they were before the block, whatever the user's code in it draws:
    torch's (the CPU's, and every CUDA device's where CUDA is initialized), NumPy's and Python's `random`."""
    import numpy as np  # here: the CLI imports this module, and answers --help without loading torch
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


_training_modes: contextvars.ContextVar[list[tuple[weakref.ref, bool]] | None] = contextvars.ContextVar("influence_cli_training_modes", default=None)


def note_training_modes(model: object) -> None:
    """Inside `keeps_training_modes`, notes the `training` flag of every module of `model` (a factory's result, before
    the run puts it in eval mode), to be put back when the block ends; outside it, nothing."""
    noted = _training_modes.get()
    if noted is not None:
        noted.extend((weakref.ref(m), m.training) for m in model.modules())  # weak: a model the run drops is freed


@contextlib.contextmanager
def keeps_training_modes() -> Iterator[None]:
    """Puts back, when the block ends (an error and Ctrl-C too), the `training` flag of every module of each model a
    factory returned in it (`note_training_modes`): a factory may hand over the user's own model object, whose mode is
    the user's. Nested blocks share the outer one's."""
    if _training_modes.get() is not None:
        yield
        return
    token = _training_modes.set([])
    try:
        yield
    finally:
        noted = _training_modes.get() or []
        _training_modes.reset(token)
        for ref, training in reversed(noted):  # the first note of a module (a model built twice) is put back last
            module = ref()
            if module is not None:
                module.training = training


@contextlib.contextmanager
def on_sys_path(folder: Path) -> Iterator[None]:
    """`folder` first on sys.path for the duration (removed again unless it was there before)."""
    entry = str(Path(folder).resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def forget_stale_module(module_name: str, folder: Path) -> None:
    """Drops a cached module of the same name that was imported from another folder than `folder`."""
    top = module_name.split(".")[0]
    local = folder / f"{top}.py"
    if not (local.is_file() or (folder / top).is_dir()):
        return
    cached = sys.modules.get(top)
    cached_file = getattr(cached, "__file__", None) if cached is not None else None
    if cached is None or cached_file is None:
        return
    try:
        if Path(cached_file).resolve().is_relative_to(folder.resolve()):
            return
    except OSError:  # pragma: no cover - unreadable paths
        return
    for name in list(sys.modules):
        if name == top or name.startswith(top + "."):
            del sys.modules[name]


def import_from(module_name: str, folder: Path) -> ModuleType:
    """Imports `module_name` with `folder` first on sys.path, dropping a module of the same name
    cached from another folder (two configs in two folders may both name `my_model`).

    Raises:
        Whatever the import raises: callers report it under their config key.
    """
    with on_sys_path(folder):
        forget_stale_module(module_name, folder)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def import_attribute(module_name: str, name: str, folder: Path, key: str, error: type[InfluenceError], missing: str = "function") -> Any:
    """What `module_name:name` names (a dotted `name` walks attributes), the module imported beside `folder` first.

    Raises:
        error: naming the config `key`, for a module that does not import (with `import_failure_hint`) or a name it
            lacks (`missing`: what the name should be, in words; with `missing_function_hint`).
    """
    try:
        module = import_from(module_name, folder)
    except ModuleNotFoundError as exc:
        raise error(f"{key}: cannot import {module_name!r} ({exc})", hint=import_failure_hint(module_name, folder, exc, name)) from None
    except Exception as exc:  # any import-time failure is reported the same way
        raise error(
            f"{key}: importing {module_name!r} failed: {type(exc).__name__}: {first_line(exc)}",
            hint=import_failure_hint(module_name, folder, exc, name) or getattr(exc, "hint", None),
        ) from exc
    found: Any = module
    for part in name.split("."):
        if not hasattr(found, part):
            raise error(f"{key}: module {module_name!r} has no {missing} {name!r}", hint=missing_function_hint(module, name))
        found = getattr(found, part)
    return found


def import_failure_hint(module_name: str, folder: Path, exc: BaseException, function: str = "<function>") -> str | None:
    """A hint for the failed import of the user's `module_name` (the part of `package.module:function`
    before the colon), or None when there is nothing to add to the error itself.

    A file path (`models.py`, `pkg/models.py`, an absolute one) is not a module name; a module missing from
    `folder` and the Python path is to be put there; a module that was found but imports a package that is not
    installed names that package."""
    if module_name.endswith(".py") or any(sep in module_name for sep in ("/", "\\")):
        file = Path(os.path.abspath(folder / module_name.removesuffix(".py").replace("\\", "/")))  # an absolute path stays itself
        try:
            dotted = ".".join(file.relative_to(os.path.abspath(folder)).parts)
        except ValueError:  # outside the config's folder: importable by its name with its folder on PYTHONPATH
            return f"name the module as Python imports it, without its folder and .py: {file.name}:{function}, with {file.parent} on PYTHONPATH"
        return f"name the module as Python imports it, with dots and without .py: {dotted}:{function} (looked up beside the config, in {folder}, then on PYTHONPATH)"
    if isinstance(exc, ModuleNotFoundError):
        missing = exc.name or ""
        if missing and not (module_name == missing or module_name.startswith(missing + ".")):
            return f"{module_name} imports {missing!r}, which is not installed in this Python environment"
        return f"put {module_name.replace('.', '/')}.py beside the config ({folder}) or on PYTHONPATH"
    return None


def missing_function_hint(module: ModuleType, name: str) -> str:
    """A hint for `name` missing from the user's `module`: the closest of its public callables, or their list."""
    own = module.__name__
    public = getattr(module, "__all__", None)

    def offered(name: str, value: object) -> bool:  # its own functions and classes, those of its submodules (a package's re-exports), or __all__
        if name.startswith("_") or not callable(value) or isinstance(value, ModuleType):
            return False
        origin = getattr(value, "__module__", None) or ""
        return origin == own or origin.startswith(own + ".") or (public is not None and name in public)

    found = sorted(n for n, v in vars(module).items() if offered(n, v))
    close = difflib.get_close_matches(name, found, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = first_few(found, 10)
    return f"{module.__name__} defines {shown}" if found else f"{module.__name__} defines no function ({getattr(module, '__file__', None) or 'no file'})"


def _findable(top: str, folder: Path) -> bool:
    """Whether the top-level module `top` is beside the config (a file or a package folder) or on the Python
    path, found without importing it."""
    if (folder / f"{top}.py").is_file() or (folder / top).is_dir():
        return True
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def colon_form_hint(spec: str, folder: Path) -> str | None:
    """A hint for a `model.architecture` or data `source` that names the user's code without the colon of
    `package.module:function` (`my_model.Net` whose module `my_model` is beside the config or on the Python
    path, or a bare `my_model` whose file is beside the config), else None: a dotted name of no module
    (`mlp.v2`, `cifar10.train`) is no one's code."""
    spec = spec.strip()
    if not spec or ":" in spec or any(sep in spec for sep in ("/", "\\")):
        return None
    if "." in spec and not spec.endswith(".py"):
        module, _, name = spec.rpartition(".")
        if all(part.isidentifier() for part in spec.split(".")) and _findable(spec.split(".")[0], folder):
            return f"your own code is named module:function, a colon before the function or class: {module}:{name}"
        return None
    module = spec.removesuffix(".py")
    if module.isidentifier() and (folder / f"{module}.py").is_file():
        return f"name the function or class of {module}.py after a colon: {module}:<function>"
    return None
