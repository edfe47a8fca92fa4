"""The validation experiments of ``docs/method.md`` as report-writing functions.

Each writes a folder with ``report.md`` (tables), PNG figures and the JSON of every figure. The
CLI (``pareto-jax reproduce ...``) and the notebooks call these functions: `reproduce_synthetic`
(`synthetic`), `reproduce_deletion` (`deletion`), `reproduce_frontier` and `reproduce_improve`
(`improve`); `common` holds what they share.
"""

from .common import REFERENCE, fit_linear
from .deletion import DELETION_MODELS, reproduce_deletion
from .improve import reproduce_frontier, reproduce_improve
from .synthetic import reproduce_synthetic

__all__ = ["REFERENCE", "fit_linear", "DELETION_MODELS", "reproduce_deletion", "reproduce_frontier",
    "reproduce_improve", "reproduce_synthetic"]
