"""Ensembles over checkpoints: influence averaged over several models, each with its own factors.

Member 0 is `model.checkpoint`, with its factors in the factors' folder (`factors_dir`, by
default `output_dir`); member i ≥ 1 is `scores.checkpoints[i - 1]` (e.g. the same
architecture trained with another seed), with its factors in `<that folder>/members/<i>/`
(storage.member_dir). fit-factors fits every
member; compute-scores averages the members' scores,

    I_ens(z, x) = (1/M) Σ_m ∇L_m(z)ᵀ (F_m + λ_m)⁻¹ ∇L_m(x),

each member with its own gradients, curvature and damping, in one pass over the training
set (per batch, every member runs forward and backward and adds its own block). Averaging
over independently trained models removes part of the seed-to-seed noise of a single
model's influence (Park et al. 2023, TRAK; Bae et al. 2024), which raises the LDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from influence_cli import storage
from influence_cli.config import Config
from influence_cli.context import RunContext, prepare
from influence_cli.distributed import DistState
from influence_cli.errors import ConfigError, InfluenceError
from influence_cli.models import checkpoint_files


@dataclass(frozen=True)
class Member:
    """One model of an ensemble.

    Attributes:
        index: 0 for model.checkpoint, i for scores.checkpoints[i - 1].
        checkpoint: Its weights (None: model.checkpoint, resolved by the model loader).
        key: The config key that names it (in errors and metadata).
        out_dir: The folder of its factors.
    """

    index: int
    checkpoint: Path | None
    key: str
    out_dir: Path

    @property
    def factors_path(self) -> Path:
        return self.out_dir / storage.FACTORS_FILE


def ensemble_members(cfg: Config) -> list[Member]:
    """Member 0 (model.checkpoint) followed by one member per entry of scores.checkpoints."""
    out = [Member(0, None, "model.checkpoint", cfg.factors_path)]
    for i, ckpt in enumerate(cfg.scores.checkpoints, start=1):
        out.append(Member(i, cfg.resolve(ckpt), f"scores.checkpoints[{i - 1}]", storage.member_dir(cfg.factors_path, i)))
    return out


def prepare_member(cfg: Config, member: Member, state: DistState | None = None) -> RunContext:
    """The RunContext of one member (its model loaded from its checkpoint)."""
    return prepare(cfg, state, checkpoint=member.checkpoint, key=member.key)


def describe_member(member: Member, ctx: RunContext) -> dict[str, object]:
    """What identifies a member in metadata: index, config key, checkpoint, model fingerprint, and the
    checkpoint file's size and mtime (top-k hashes the weights again only when these changed)."""
    return {
        "member": member.index,
        "key": member.key,
        "checkpoint": str(member.checkpoint) if member.checkpoint is not None else ctx.cfg.model.checkpoint,
        "model_fingerprint": ctx.model_fingerprint,
        "checkpoint_stat": checkpoint_stat(member.checkpoint),
    }


def checkpoint_stat(path: Path | None) -> list[int] | None:
    """[size, mtime_ns] of a checkpoint file, followed by each shard's for a sharded checkpoint's index (None without one)."""
    if path is None or not Path(path).is_file():
        return None
    stats = [f.stat() for f in checkpoint_files(Path(path)) if f.is_file()]
    return [n for stat in stats for n in (stat.st_size, stat.st_mtime_ns)]


def name_member(exc: InfluenceError, member: Member, cfg: Config) -> InfluenceError:
    """Prefixes an error met while one model of an ensemble ran with its config key and checkpoint, so that a
    failure of its own (a non-finite loss or gradient from weights that diverged) says which model it was."""
    checkpoint = member.checkpoint if member.checkpoint is not None else cfg.resolve(cfg.model.checkpoint)
    exc.message = f"{member.key} ({checkpoint}): {exc.message}"
    exc.args = (exc.message,)
    return exc


def refuse_same_weights(fingerprints: list[tuple[str, str]], source: str | None = None) -> None:
    """Refuses two models of an ensemble with the same weights (copies, links): each would weigh twice.

    Args:
        fingerprints: (config key, model fingerprint) of every member, model.checkpoint first.
        source: The config file, named by the error.
    """
    seen: dict[str, str] = {}
    for key, fingerprint in fingerprints:
        if fingerprint in seen:
            raise ConfigError(f"{key}: holds the same weights as {seen[fingerprint]} (a model listed twice weighs twice in the average)", source=source)
        seen[fingerprint] = key


__all__ = ["Member", "checkpoint_stat", "describe_member", "ensemble_members", "name_member", "prepare_member", "refuse_same_weights"]
