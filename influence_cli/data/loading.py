"""In-order DataLoaders over a rank's contiguous block of an IndexedDataset."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from influence_cli.data.dataset import Batch, IndexedDataset, WorkerFailure


def collate_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader collate_fn: passes batches pre-collated by `IndexedDataset.__getitems__` through.

    Returns:
        (x [B, ...] float32, y [B] (int64 or float32), global_index int64 [B]).
    """
    if isinstance(batch, (Batch, WorkerFailure)):
        return batch if isinstance(batch, WorkerFailure) else tuple(batch)  # type: ignore[return-value]
    x, y, gi = default_collate(batch)
    return x, y, gi


class _Loader(DataLoader):
    """A DataLoader that raises a worker's InfluenceError as it was (`WorkerFailure`), hint included."""

    def __iter__(self):  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, WorkerFailure):
                raise batch.error
            yield batch


class _BlockBatchSampler(Sampler[list[int]]):
    """Batches of consecutive positions [start, stop), in order."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self):
        for s in range(self.start, self.stop, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


def shard_bounds(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """The contiguous block [rank*n//world, (rank+1)*n//world) of positions of one rank."""
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    return rank * n // world, (rank + 1) * n // world


def make_loader(
    dataset: IndexedDataset,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    shard: tuple[int, int] = (0, 1),
    start_batch: int = 0,
    limit: int | None = None,
) -> DataLoader:
    """An in-order DataLoader over this rank's contiguous block of the dataset.

    Batches are (x [B, *input_shape] float32, y [B], global_index int64 [B]); positions
    [rank*n//world, (rank+1)*n//world) for shard=(rank, world), where n is the dataset
    size or `limit` (its first examples) if smaller. Never shuffles, and never draws from torch's global
    random state: worker processes get the same seeds every run (a dataset that draws random numbers
    draws the same ones). `start_batch` skips this rank's first batches without loading them
    (resumed passes).
    `pin_memory` is only used when CUDA is available.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    start, stop = shard_bounds(n, shard)
    start = min(stop, start + start_batch * batch_size)
    return _Loader(
        dataset,
        batch_sampler=_BlockBatchSampler(start, stop, batch_size),
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=collate_batch,
        generator=torch.Generator(),  # the workers' base seed from its own generator: the caller's global RNG is left as it was
    )
