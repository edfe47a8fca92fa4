"""pareto_jax: can a trained classifier still be improved for every class at once, just by
re-weighting its own training data, and if so with which weights? See ``docs/method.md``.

The names most users need are here; every module keeps its own (``pareto_jax.influence``,
``pareto_jax.pareto``, ``pareto_jax.search``, ...). Importing the package loads nothing heavy and
changes no global state: each name below (and each submodule) is imported on first use, and the
persistent compilation cache is switched on by the entry points (the CLI, `pipeline.run`) or by
you (`pareto_jax.cache.enable()`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("pareto-jax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

# public name -> the submodule that defines it
_NAMES = {"InputError": "checks", "NumericalError": "checks", "Status": "results",
    "InfluenceConfig": "config", "ReweightConfig": "config", "TrainConfig": "config",
    "SearchConfig": "config", "RunConfig": "config", "Objective": "train", "Influence": "influence",
    "InfluenceResult": "influence", "category_influence": "influence",
    "influence_matrix": "influence", "linear_category_influence": "influence",
    "predict_class_loss_change": "influence", "OutputLoss": "models", "functional": "models",
    "CeilingResult": "pareto", "ReweightResult": "pareto", "ceiling_program": "pareto",
    "ceiling_test": "pareto", "pareto_frontier": "pareto", "reweight": "pareto",
    "solve_reweighting": "pareto", "solve_reweighting_batch": "pareto"}
_SUBMODULES = {"backend", "cache", "checks", "cli", "closed_form", "config", "data", "datasets",
    "distributed", "evaluation", "experiments", "influence", "io", "kernels", "kfac", "linsolve",
    "models", "pareto", "pipeline", "plots", "reproduce", "results", "search", "setup", "stats",
    "study", "text", "train"}

__all__ = [*_NAMES, "__version__"]


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | _SUBMODULES)
