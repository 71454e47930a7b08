"""influence_cli: influence functions under an EKFAC approximation of the Fisher, from the shell or Python.

The Python API mirrors the commands::

    from influence_cli import load_config, fit_factors
    cfg = load_config("configs/mnist.yaml", ["factors.strategy=kfac"])
    report = fit_factors(cfg)
"""

__version__ = "0.1.0"

from influence_cli.config import Config, load_config  # noqa: E402
from influence_cli.errors import InfluenceError  # noqa: E402


def __getattr__(name: str):
    # Heavy modules load on first use, so `influence --help` stays fast.
    if name in ("fit_factors", "load_factors"):
        from influence_cli import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'influence_cli' has no attribute {name!r}")


__all__ = ["Config", "InfluenceError", "__version__", "fit_factors", "load_config", "load_factors"]
