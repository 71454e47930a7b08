"""One object that knows the distributed state: rank, world size and device.

Under `torchrun` the environment names the rank and world size; the process
group uses nccl on GPUs and gloo on the CPU. Only rank 0 writes files; every
rank meets at a barrier after a write.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from influence_cli.errors import ConfigError, DistributedError, InfluenceError, first_line

_T = TypeVar("_T")


def resolve_device(preference: str, local_rank: int = 0, source: str | None = None) -> torch.device:
    """`auto` → cuda:<local_rank> when a GPU is visible, else cpu; a GPU this machine lacks is a ConfigError."""
    if preference == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not preference.startswith("cuda") and preference != "auto":
        return torch.device(preference)
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {preference!r} requested but no CUDA device is visible", source=source, hint="use --set device=cpu")
    device = torch.device(f"cuda:{local_rank}") if preference in ("auto", "cuda") else torch.device(preference)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        visible = f"{count} CUDA device{'s' if count > 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})"
        if preference in ("auto", "cuda"):
            raise ConfigError(
                f"device: {preference!r} gives LOCAL_RANK={local_rank} GPU cuda:{local_rank}, but this machine has {visible}",
                source=source,
                hint=f"launch at most {count} process{'es' if count > 1 else ''} per machine (torchrun --nproc_per_node={count})",
            )
        raise ConfigError(
            f"device: {preference!r} requested but this machine has {visible}",
            source=source,
            hint="use --set device=cuda (cuda:0), or choose the GPU with CUDA_VISIBLE_DEVICES",
        )
    return device


@contextlib.contextmanager
def _collective(what: str, rank: int) -> Iterator[None]:
    """Turns a collective that fails because another rank died into a DistributedError."""
    try:
        yield
    except RuntimeError as exc:  # gloo/nccl report a lost peer as RuntimeError (DistBackendError)
        reason = first_line(exc, type(exc).__name__)
        raise DistributedError(
            f"rank {rank}: {what} failed, another rank probably stopped ({reason})",
            hint="the failing rank's own message is above ([rank N] ...); fix that and rerun",
        ) from exc


@dataclass
class DistState:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over ranks in place (no-op in one process)."""
        if self.distributed:
            with _collective("all-reduce", self.rank):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj: object) -> list[object]:
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        with _collective("all-gather", self.rank):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """`obj` of rank `src` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with _collective("broadcast", self.rank):
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            with _collective("barrier", self.rank):
                dist.barrier()

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block [start, stop) of n items."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size


def init_distributed(device_preference: str = "auto", source: str | None = None) -> DistState:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1).

    Raises:
        DistributedError: RANK / WORLD_SIZE / LOCAL_RANK that are not whole numbers, or a RANK
            outside the world (e.g. RANK set by hand without WORLD_SIZE: this rank would write nothing).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)  # ranks on this machine (torchrun sets it)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(
            f"RANK={rank} and WORLD_SIZE={world} in the environment: the rank must be in 0..WORLD_SIZE-1",
            hint="launch with torchrun (it sets both), or unset RANK and WORLD_SIZE for one process",
        )
    if local_world > 1 and device_preference.startswith("cuda:"):
        raise ConfigError(
            f"device: {device_preference!r} would put all {local_world} ranks of this machine on one GPU",
            source=source,
            hint="use device: cuda or auto under torchrun (each rank takes cuda:<LOCAL_RANK>); choose GPUs with CUDA_VISIBLE_DEVICES",
        )
    device = resolve_device(device_preference, local_rank, source)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} in the environment is not a whole number", hint=f"unset {name}, or launch with torchrun") from None


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_before_the_other_ranks(code: int) -> None:
    """A rank that failed under torchrun leaves at once, its process group intact: the other ranks see
    the closed connection only when it is gone, so torchrun records this rank's own exit code
    (destroying the group first let rank 0 fail first and torchrun SIGTERM this rank). Outputs
    are already safe: the core writes under temporary names and cleans them up as the error rises.
    Returns (does nothing) outside a process group of two or more ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def agree(state: DistState, fn: Callable[[], _T]) -> _T:
    """Runs a step that every rank takes at the same point (a start-up check, loading a dataset spec).

    When any rank fails with a typed error, every rank raises, so none waits in a later collective:
    the same error on every rank (the same message, or the same `alike`: a label outside the classes
    in every rank's own examples) is marked to be printed once (by rank 0, its own message); a failure of
    some ranks only is printed by those (with its hint, even one marked as met alike, such as a rank's own
    progress file refused), and each other rank stops with a DistributedError naming it.
    """
    failure: InfluenceError | None = None
    result = None
    try:
        result = fn()
    except InfluenceError as exc:
        failure = exc
    if state.distributed:
        alike = None if failure is None else failure.alike or failure.message
        said = state.all_gather_object(None if failure is None else (failure.message, alike))  # each rank's (message, alike)
        if failure is None:
            for rank, other in enumerate(said):
                if isinstance(other, tuple):
                    raise DistributedError(f"rank {rank} stopped: {other[0]}")
        elif all(isinstance(other, tuple) and other[1] == alike for other in said):
            failure.everywhere()
        else:
            failure.same_on_every_rank = False  # else no rank says it with its hint: the others say "rank N stopped: ..."
    if failure is not None:
        raise failure
    return result  # type: ignore[return-value]
