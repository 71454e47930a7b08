"""influence_cli: influence functions under an EKFAC approximation of the Fisher, from the shell or Python.

The Python API mirrors the commands::

    from influence_cli import load_config, fit_factors
    cfg = load_config("configs/mnist.yaml", ["factors.strategy=kfac"])
    report = fit_factors(cfg)
"""

__version__ = "0.2.0"

from influence_cli.config import Config, config_from_dict, load_config  # noqa: E402
from influence_cli.errors import InfluenceError  # noqa: E402

_LAZY = {
    "fit_factors": "influence_cli.fit",
    "load_factors": "influence_cli.fit",
    "compute_scores": "influence_cli.scores",
    "top_k": "influence_cli.topk",
    "self_top_k": "influence_cli.topk",
    "load_scores_meta": "influence_cli.topk",
    "iter_score_blocks": "influence_cli.topk",
    "load_self_influence": "influence_cli.topk",
    "dataset_similarity": "influence_cli.similarity",
    "spectrum": "influence_cli.band_energy",  # not influence_cli.spectrum: a submodule of that name would shadow the function
    "edit_checkpoint": "influence_cli.edit",
    "load_dataset": "influence_cli.data",
    "FitReport": "influence_cli.fit",
    "ScoresReport": "influence_cli.scores",
    "SimilarityReport": "influence_cli.similarity",
    "SpectrumReport": "influence_cli.band_energy",
    "EditReport": "influence_cli.edit",
}


def __getattr__(name: str):
    # Heavy modules (torch) load on first use, so `influence --help` stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'influence_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Config", "InfluenceError", "__version__", "config_from_dict", "load_config", *_LAZY]
