"""pareto_jax: can a trained classifier still be improved for every class at once, just by
re-weighting its own training data, and if so with which weights? See ``docs/method.md``.

The names most users need are here; every module keeps its own (``pareto_jax.influence``,
``pareto_jax.pareto``, ``pareto_jax.search``, ...).
"""

from importlib.metadata import PackageNotFoundError, version as _version

from . import cache
from .checks import InputError, NumericalError
from .influence import (Influence, InfluenceConfig, InfluenceResult, category_influence,
                        influence_matrix, linear_category_influence, predict_class_loss_change)
from .models import OutputLoss, functional
from .pareto import (CeilingResult, ReweightConfig, ReweightResult, ceiling_program, ceiling_test,
                     pareto_frontier, reweight, solve_reweighting, solve_reweighting_batch)

cache.enable()  # compiled solvers persist across processes (``pareto_jax.cache``; opt out there)

try:
    __version__ = _version("pareto-jax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "InputError", "NumericalError", "Influence", "InfluenceConfig", "InfluenceResult", "category_influence",
    "influence_matrix", "OutputLoss", "functional",
    "linear_category_influence", "predict_class_loss_change", "CeilingResult", "ReweightConfig",
    "ReweightResult", "ceiling_program", "ceiling_test", "pareto_frontier", "reweight",
    "solve_reweighting", "solve_reweighting_batch", "__version__",
]
