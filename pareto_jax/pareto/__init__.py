"""Is there room for a Pareto improvement, and with which weights? (``docs/method.md``)

* `ceiling_test(P)`: the exact first-order test (an LP with a Gordan certificate) and the
  original method's PCA heuristic (`ceiling`).
* `solve_reweighting`, `solve_reweighting_batch`: the reweighting program (`program`: one path,
  `prepare` → `solve_device` → `read`, for every caller), checked on the host and solved on the
  device (`exact`: the structured dual stage of `dual`, then an exact
  finish by the bounded dual simplex of `simplex`), with HiGHS as the reference (`highs`).
* `reweight`, `solve_program`, `ceiling_program`: the same programs as pure JAX functions
  (jit, vmap over α, ρ, class weights; statuses as arrays).
* `pareto_frontier`: the first-order Pareto frontier (`frontier`).
"""

from ..config import ReweightConfig
from ..results import Status
from .ceiling import (
    CeilingResult,
    CeilingSolution,
    ceiling_program,
    ceiling_test,
    pca_explained_ratio,
)
from .device import bucket, pad_rows, solve_device, solve_rows
from .dual import dual_solve
from .exact import ProgramSolution, reweight, solve_program
from .frontier import FrontierResult, pareto_frontier
from .program import (
    ProgramBatch,
    ReweightResult,
    check_feasibility,
    prepare,
    program_data,
    read,
    result_from_solution,
    solve_batch,
    solve_reweighting,
    solve_reweighting_batch,
)

__all__ = ["CeilingResult", "ceiling_test", "pca_explained_ratio", "dual_solve", "CeilingSolution",
    "ProgramSolution", "ceiling_program", "reweight", "solve_program", "FrontierResult",
    "pareto_frontier", "Status", "ReweightConfig", "ReweightResult", "ProgramBatch", "pad_rows",
    "solve_rows", "prepare", "solve_device", "read", "solve_batch", "bucket", "check_feasibility",
    "program_data", "result_from_solution", "solve_reweighting", "solve_reweighting_batch"]
