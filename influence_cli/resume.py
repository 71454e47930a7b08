"""Resumable progress of long passes: periodic snapshots of accumulators.

A snapshot records the pass (phase), how many batches of this rank are done, the
accumulators, and a run key (hash of everything the result depends on), so that
`--resume` continues only the exact run that was interrupted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from influence_cli import storage
from influence_cli.errors import OutputError


def run_key(fields: dict[str, Any]) -> str:
    """A short hash of the settings a result depends on."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Snapshot:
    phase: str
    batches_done: int
    tensors: dict[str, torch.Tensor]


class PassCheckpoint:
    """Saves and restores one rank's progress to `path` (atomic writes)."""

    def __init__(self, path: Path, key: str, every: int) -> None:
        self.path = path
        self.key = key
        self.every = every

    def exists(self) -> bool:
        return self.path.exists()

    def check_start(self, resume: bool, overwrite: bool) -> Snapshot | None:
        """The snapshot to resume from, None to start fresh; refuses to silently drop progress."""
        storage.remove_stale_temp_files(self.path)
        if not self.path.exists():
            return None
        if overwrite and not resume:
            self.clear()
            return None
        if not resume:
            raise OutputError(
                f"{str(self.path)!r} holds progress of an interrupted run",
                hint="pass --resume to continue it, or --overwrite to start over",
            )
        tensors, meta = storage.load_tensors(self.path, storage.PARTIAL_FORMAT)
        if meta.get("run_key") != self.key:
            raise OutputError(
                f"{str(self.path)!r} is progress of a run with other settings (model, data, strategy or batch size changed)",
                hint="pass --overwrite to start over with the current settings",
            )
        return Snapshot(meta["phase"], int(meta["batches_done"]), tensors)

    def due(self, batches_done: int) -> bool:
        return self.every > 0 and batches_done % self.every == 0

    def save(self, phase: str, batches_done: int, tensors: dict[str, torch.Tensor]) -> None:
        meta = {storage.FORMAT_KEY: storage.PARTIAL_FORMAT, "run_key": self.key, "phase": phase, "batches_done": str(batches_done)}
        storage.save_tensors(self.path, tensors, meta)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
