"""Warnings of the core: the results stand, but the user should know something about them.

The core never prints: it logs them on the `influence_cli` logger, which the CLI shows on stderr
(once per message and command); from Python, the logging module's defaults apply.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("influence_cli")


def warn(message: str, *, per_rank: bool = False) -> None:
    """One warning (the CLI prints it as `warning: <message>` on stderr). Under torchrun rank 0 prints
    it, or, with `per_rank` (about the rank's own shard of the data), every rank that sees it."""
    logger.warning(message, extra={"per_rank": per_rank})


__all__ = ["logger", "warn"]
