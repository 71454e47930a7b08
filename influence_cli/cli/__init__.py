"""The `influence` command: thin Typer commands over the core.

Each command parses its options, calls one core function and renders the result.
Errors from the core are typed (errors.py) and formatted here once.
"""

from __future__ import annotations

from influence_cli.cli import fit_factors as _fit_factors  # noqa: F401  (registers commands)
from influence_cli.cli import info as _info  # noqa: F401
from influence_cli.cli import init as _init  # noqa: F401
from influence_cli.cli import scores as _scores  # noqa: F401
from influence_cli.cli import similarity as _similarity  # noqa: F401
from influence_cli.cli import spectrum as _spectrum  # noqa: F401
from influence_cli.cli.app import app, main

__all__ = ["app", "main"]
