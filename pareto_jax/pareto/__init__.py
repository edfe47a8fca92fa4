"""Is there room for a Pareto improvement, and with which weights? (``docs/method.md``)

* `ceiling_test(P)`: the exact first-order test (an LP with a Gordan certificate) and the
  original method's PCA heuristic (`ceiling`).
* `solve_reweighting`, `solve_reweighting_batch`: the reweighting program (`program`), checked on
  the host and solved on the device (`exact`: the structured dual stage of `dual`, then an exact
  finish by the bounded dual simplex of `simplex`), with HiGHS as the reference (`highs`).
* `reweight`, `solve_program`, `ceiling_program`: the same programs as pure JAX functions
  (jit, vmap over α, ρ, class weights; statuses as arrays).
* `pareto_frontier`: the first-order Pareto frontier (`frontier`).
"""

from .ceiling import CeilingResult, ceiling_test, pca_explained_ratio
from .dual import dual_solve
from .exact import CeilingSolution, ProgramSolution, ceiling_program, reweight, solve_program
from .frontier import FrontierResult, pareto_frontier
from .highs import INFEASIBLE, ITERATION_LIMIT, NUMERICAL, STATUS_MESSAGES, SUCCESS, UNBOUNDED
from .program import (ReweightConfig, ReweightResult, bucket, check_feasibility, program_data,
                      result_from_solution,
                      solve_reweighting, solve_reweighting_batch)

__all__ = [
    "CeilingResult", "ceiling_test", "pca_explained_ratio", "dual_solve", "CeilingSolution",
    "ProgramSolution", "ceiling_program", "reweight", "solve_program", "FrontierResult",
    "pareto_frontier", "INFEASIBLE", "ITERATION_LIMIT", "NUMERICAL", "STATUS_MESSAGES", "SUCCESS",
    "UNBOUNDED", "ReweightConfig", "ReweightResult", "bucket", "check_feasibility", "program_data",
    "result_from_solution",
    "solve_reweighting", "solve_reweighting_batch",
]
