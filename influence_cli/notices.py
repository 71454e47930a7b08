"""Warnings of the core: the results stand, but the user should know something about them.

The core never prints: it logs them on the `influence_cli` logger, which the CLI shows on stderr
(once per message and command); from Python, the logging module's defaults apply, and a run
function logs each message once per call (`once_per_call`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

logger = logging.getLogger("influence_cli")

_logged: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("influence_cli_logged", default=None)


def warn(message: str, *, per_rank: bool = False, key: str | None = None) -> None:
    """One warning (the CLI prints it as `warning: <message>` on stderr). Under torchrun rank 0 prints
    it, or, with `per_rank` (about the rank's own shard of the data), every rank that sees it. Inside
    `once_per_call`, a message already logged there is not logged again (a check run per block of
    scores would repeat it), nor one with the same `key` (the same finding, told with numbers that
    differ, e.g. for each model of an ensemble)."""
    logged = _logged.get()
    if logged is not None:
        seen = message if key is None else f"key:{key}"
        if seen in logged:
            return
        logged.add(seen)
    logger.warning(message, extra={"per_rank": per_rank})


@contextlib.contextmanager
def once_per_call() -> Iterator[None]:
    """Each message logged once until the block ends (a run function's call); nested blocks share the outer one's."""
    if _logged.get() is not None:
        yield
        return
    token = _logged.set(set())
    try:
        yield
    finally:
        _logged.reset(token)


__all__ = ["logger", "once_per_call", "warn"]
