"""What every command starts from: the config, the distributed state, the model and its layers."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from influence_cli import notices
from influence_cli.config import Config, DataSpec, rebuilt
from influence_cli.data import IndexedDataset, load_dataset, make_loader
from influence_cli.distributed import DistState, agree, resolve_device
from influence_cli.models import BUILTIN_ARCHITECTURES, load_model, model_definition, model_fingerprint, takes_token_ids
from influence_cli.tracking import TrackedModule, find_tracked_modules


def checked_config(cfg: Config, caller: str) -> Config:
    """The config a run function was given, validated and built again as `load_config` builds a
    file (`config.rebuilt`); the run uses the result.

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
    return rebuilt(cfg)


_Run = TypeVar("_Run", bound=Callable[..., Any])

_SIMPLE_TYPES: dict[str, Callable[[object], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "list[str]": lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
}


def check_arguments(run: Callable[..., object], args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    """Refuses an argument of a run function whose value is not of its declared type, where that type
    is made of bool, int, float, str, None and list[str] (`relative="no"` would otherwise read as true,
    `rho="0.5"` fail deep inside).

    Raises:
        TypeError: naming the function, the argument and the types it takes.
    """
    try:
        bound = inspect.signature(run).bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{run.__name__}(): {exc}") from None
    parameters = inspect.signature(run).parameters
    for name, value in bound.arguments.items():
        annotation = parameters[name].annotation
        arms = [a.strip() for a in annotation.split("|")] if isinstance(annotation, str) else []
        if arms and all(a in _SIMPLE_TYPES for a in arms) and not any(_SIMPLE_TYPES[a](value) for a in arms):
            raise TypeError(f"{run.__name__}(): {name} takes {' or '.join(arms)}, not {value!r}")


def typed_arguments(run: _Run) -> _Run:
    """Decorates a run function so that its arguments are checked (`check_arguments`) before it starts."""

    @functools.wraps(run)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_arguments(run, args, kwargs)
        return run(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


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

    def provenance(self) -> dict[str, object]:
        """What every output records about the run that produced it (read by `influence info`)."""
        from influence_cli import __version__

        return {
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "device": str(self.device),
            "world_size": self.state.world_size,
            "config": self.cfg.to_dict(),
        }

    def dataset(self, spec: DataSpec | None, name: str) -> IndexedDataset:
        """Loads one data spec of the config (`name` is its key, e.g. data.train)."""
        if spec is None:
            from influence_cli.errors import ConfigError

            raise ConfigError(f"{name}: missing in the config", source=self.cfg.source, hint=f"add a {name} block with a source: key")
        embedding = takes_token_ids(self.model)  # every rank reads the whole spec: a refusal they all meet is printed once
        return agree(self.state, lambda: load_dataset(spec, self.cfg.base_dir, name=name, seed=self.cfg.seed, embedding_model=embedding))

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
    fingerprint, definition = model_fingerprint(model), model_definition(cfg.model, model)
    model = model.to(state.device).eval()
    tracked = find_tracked_modules(model, cfg.factors.modules)
    return RunContext(cfg, state, model, fingerprint, tracked, definition)
