"""Is there room for a Pareto improvement, and with which weights? (``docs/method.md``)

* `ceiling_test(P)`: the exact first-order test (an LP with a Gordan certificate) and the
  original method's PCA heuristic (`ceiling`).
* `solve_reweighting`, `solve_reweighting_batch`: the reweighting program (`program`), solved by
  the structured dual solver (`dual`) and the exact active-set resolution (`resolve`), with
  HiGHS as the reference (`highs`).
* `pareto_frontier`: the first-order Pareto frontier (`frontier`).
"""

from .ceiling import CeilingResult, ceiling_test, pca_explained_ratio
from .dual import dual_solve
from .frontier import FrontierResult, pareto_frontier
from .highs import INFEASIBLE, ITERATION_LIMIT, NUMERICAL, STATUS_MESSAGES, SUCCESS, UNBOUNDED
from .program import (ReweightConfig, ReweightResult, check_feasibility, program_data,
                      solve_reweighting, solve_reweighting_batch)

__all__ = [
    "CeilingResult", "ceiling_test", "pca_explained_ratio", "dual_solve", "FrontierResult",
    "pareto_frontier", "INFEASIBLE", "ITERATION_LIMIT", "NUMERICAL", "STATUS_MESSAGES", "SUCCESS",
    "UNBOUNDED", "ReweightConfig", "ReweightResult", "check_feasibility", "program_data",
    "solve_reweighting", "solve_reweighting_batch",
]
