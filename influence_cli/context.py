"""What every command starts from: the config, the distributed state, the model and its layers."""

from __future__ import annotations

import inspect
import numbers
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from influence_cli import notices
from influence_cli.config import Config, DataSpec, rebuilt
from influence_cli.data import IndexedDataset, load_dataset, make_loader
from influence_cli.distributed import DistState, agree, resolve_device
from influence_cli.models import (
    BUILTIN_ARCHITECTURES,
    load_model,
    model_definition,
    model_fingerprint,
    names_a_class,
    takes_token_ids,
)
from influence_cli.tracking import TrackedModule, find_tracked_modules


def reads_of(command: str, *, self_influence: bool = False) -> tuple[str, ...]:
    """The data a command reads (of config.DATA_KEYS; spectrum.datasets names data.train when
    empty): only those files must exist, and data.train be set, where the command runs. `command`:
    a run function's name, or "top_k" / "inspect"."""
    train_and_queries = ("data.train",) if self_influence else ("data.train", "data.query")
    return {
        "fit_factors": ("data.train",),
        "compute_scores": train_and_queries,
        "top_k": train_and_queries,
        "dataset_similarity": ("similarity.datasets",),
        "spectrum": ("spectrum.datasets",),
        "edit_checkpoint": (),
        "inspect": (),
    }[command]


def checked_config(cfg: Config, caller: str, reads: tuple[str, ...] | None = None) -> Config:
    """The config a run function was given, validated and built again as `load_config` builds a
    file (`config.rebuilt`; `reads`: the data the run reads, `reads_of`); the run uses the result.

    A `Config` is a plain dataclass: a field changed after loading (`cfg.factors.strategy = ...`,
    `cfg.data.batch_size = 0`) is checked here, before anything is read or replaced.

    Raises:
        TypeError: `cfg` is not a Config (a path or a dict: load it first).
        ConfigError: a changed field is invalid.
        UsageError: called under torch.inference_mode(), where no pass can take gradients.
    """
    if not isinstance(cfg, Config):
        raise TypeError(
            f"{caller}() takes a Config (influence_cli.load_config(path) or config_from_dict(data)), not {type(cfg).__name__}"
        )
    if torch.is_inference_mode_enabled():
        from influence_cli.errors import UsageError

        raise UsageError(
            f"{caller}() was called under torch.inference_mode(), where the passes cannot take gradients",
            hint="call it outside the inference_mode block (torch.no_grad() around it is fine)",
        )
    return rebuilt(cfg, reads)


_SIMPLE_TYPES: dict[str, Callable[[object], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}


def _python_value(value: object) -> object:
    """A NumPy or torch scalar (np.True_, torch.tensor(0.5)) as the Python value it holds, an array or
    a tuple as a list; anything else as it is."""
    if isinstance(value, (str, bytes)):
        return value
    if callable(getattr(value, "tolist", None)) and hasattr(value, "shape"):
        return value.tolist()  # a 0-d array or tensor gives its scalar
    return list(value) if isinstance(value, tuple) else value


def check_arguments(run: Callable[..., object], args: tuple[object, ...], kwargs: dict[str, object]) -> inspect.BoundArguments:
    """The arguments of a run function, bound, with those of a simple declared type (made of bool,
    int, float, str, None and list[str]) checked against it (`relative="no"` would otherwise read as
    true, `rho="0.5"` fail deep inside) and given as Python values (np.True_ as True).

    Raises:
        TypeError: naming the function, the argument and the types it takes.
    """
    signature = inspect.signature(run)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{run.__name__}(): {exc}") from None
    for name, value in bound.arguments.items():
        annotation = signature.parameters[name].annotation
        arms = [a.strip() for a in annotation.split("|")] if isinstance(annotation, str) else []
        if not arms or not all(a in _SIMPLE_TYPES for a in arms):
            continue
        plain = _python_value(value)
        if not any(_SIMPLE_TYPES[a](plain) for a in arms):
            raise TypeError(f"{run.__name__}(): {name} takes {' or '.join(arms)}, not {value!r}")
        bound.arguments[name] = plain
    return bound


@dataclass
class RunContext:
    """A loaded model on its device, its tracked layers and the run's settings."""

    cfg: Config
    state: DistState
    model: nn.Module
    model_fingerprint: str
    tracked: list[TrackedModule]
    model_definition: dict[str, object]  # models.model_definition: architecture, kwargs, module tree

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def output_dir(self) -> Path:
        return self.cfg.output_path

    def provenance(self, flags: dict[str, object] | None = None) -> dict[str, object]:
        """What every output records about the run that produced it (read by `influence info`): the config
        is the effective one, with `flags`, the values a command's flags gave config keys
        ({"scores.relative": True} for --relative), in place, as --set overrides are."""
        from influence_cli import __version__

        config = self.cfg.to_dict()
        for key, value in (flags or {}).items():
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        return {
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": str(self.device),
            "device_name": device_name(self.device),
            "threads": torch.get_num_threads(),  # CPU kernels sum in an order that depends on it
            "world_size": self.state.world_size,
            "config": config,
            "base_dir": str(self.cfg.base_dir),  # absolute: the folder the config's relative paths resolve against (its file's)
        }

    def dataset(self, spec: DataSpec | None, name: str) -> IndexedDataset:
        """Loads one data spec of the config (`name` is its key, e.g. data.train)."""
        return read_dataset(self.cfg, self.state, spec, name, tokens=takes_token_ids(self.model))

    def batches(self, dataset: IndexedDataset, start_batch: int = 0, limit: int | None = None):
        """This rank's contiguous shard of `dataset` (optionally its first `limit` examples) as batches."""
        return make_loader(
            dataset,
            self.cfg.data.batch_size,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            shard=(self.state.rank, self.state.world_size),
            start_batch=start_batch,
            limit=limit,
        )

    def num_batches(self, dataset: IndexedDataset, limit: int | None = None) -> int:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        start, stop = self.state.shard(n)
        return -(-(stop - start) // self.cfg.data.batch_size)


def device_name(device: torch.device) -> str:
    """The hardware a run's bits depend on: the GPU's name, or the CPU's model where the system says it
    (/proc/cpuinfo on Linux), else its architecture ("x86_64")."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def read_dataset(cfg: Config, state: DistState, spec: DataSpec | None, name: str, *, tokens: bool) -> IndexedDataset:
    """Loads one data spec of `cfg` (`name` is its key, e.g. data.train) for a model that takes token ids
    or not (`tokens`: `models.takes_token_ids`), on every rank of `state` at once (`agree`)."""
    if spec is None:
        from influence_cli.errors import ConfigError

        raise ConfigError(f"{name}: missing in the config", source=cfg.source, hint=f"add a {name} block with a source: key")
    # every rank reads the whole spec: a refusal they all meet is printed once
    return agree(state, lambda: load_dataset(spec, cfg.base_dir, name=name, seed=cfg.seed, embedding_model=tokens))


def prepare(
    cfg: Config, state: DistState | None = None, checkpoint: str | Path | None = None, key: str = "model.checkpoint"
) -> RunContext:
    """Builds the model, loads its checkpoint (`checkpoint` instead of model.checkpoint when given,
    named `key` in errors), moves it to the device and finds its tracked layers."""
    state = state or DistState(device=resolve_device(cfg.device, source=cfg.source))
    model = load_model(cfg.model, cfg.base_dir, checkpoint=checkpoint, key=key)
    arch = cfg.model.architecture.strip()
    if checkpoint is None and cfg.model.checkpoint is None and (arch in BUILTIN_ARCHITECTURES or arch.startswith("torchvision:")):
        notices.warn(f"model.checkpoint is not set: {arch} runs with its random initial weights (seed 0), not a trained model's")
    elif checkpoint is None and cfg.model.checkpoint is None and names_a_class(arch, cfg.base_dir):
        # built as constructed, which is untrained unless its __init__ loads weights
        notices.warn(
            f"model.checkpoint is not set: {arch} is a class, so the model has the weights its __init__ gives it "
            "(random ones unless it loads trained weights): name the saved state dict in model.checkpoint"
        )
    fingerprint, definition = model_fingerprint(model), model_definition(cfg.model, model)
    model = model.to(state.device).eval()
    tracked = find_tracked_modules(model, cfg.factors.modules, trainable_only=cfg.factors.trainable_only)
    return RunContext(cfg, state, model, fingerprint, tracked, definition)
