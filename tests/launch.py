"""The environment of the CLI and torchrun subprocesses the tests start."""

from __future__ import annotations

import os

_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict[str, str]:
    """This process's environment without launcher or debug variables; one thread, 120 columns."""
    env = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER, "INFLUENCE_DEBUG") and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="120", PYTHONUNBUFFERED="1")
    return env
