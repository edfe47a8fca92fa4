"""The reweighting program: its public API (``docs/method.md``).

Given the influence matrix P (N×K, P > 0 beneficial), re-weighting the training set by w moves
class k's validation loss by ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (first order). The method's program:

    maximise    Σ_{k∈targets} Σ_i w_i P[i, k]  − (μ/2)‖w − 1‖²
    subject to  Σ_i w_i P[i, k] >= α_k Σ_i P[i, k]   for every class k
                max(0, 1−ρ) <= w_i <= min(w_max, 1+ρ),   Σ_i |w_i − 1| <= B (optional)

`solve_reweighting` (one α) and `solve_reweighting_batch` (a population of α) are the host
front doors: they validate, pad N to a few sizes (`bucket`), and run `exact.solve_program` on
the device in float64 (the structured dual stage, then the LP's exact finish by a bounded dual
simplex with an optimality certificate on the whole problem, or the QP's duality-gap
certificate), with no host solver. HiGHS (`highs`) is the exact reference, used only when asked
(``solver="highs"``) and by the tests. Every returned w is re-checked in float64; an infeasible
program gives status 2 and no w, an uncertified one status 1 or 4 and no w: never a silently
wrong w. `exact.solve_program` itself is pure JAX (jit, vmap over α, ρ, class weights).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from . import dual, exact, highs
from .highs import INFEASIBLE, NUMERICAL, STATUS_MESSAGES, SUCCESS


@dataclasses.dataclass(frozen=True)
class ReweightConfig:
    """Options of the reweighting program (the problem data P, targets, α come separately).

    Attributes:
        w_max: upper bound on every weight.
        rho: trust region |w_i − 1| <= ρ (None: off).
        budget: L1 budget Σ_i |w_i − 1| <= B (None: off).
        mu: proximal term (μ/2)‖w − 1‖² in units of P (0: the LP). Smooth, interior weights.
        solver: "dual" (on the device: the structured dual stage and the exact finish) or
            "highs" (the host reference: scipy's HiGHS for the LP, highspy for the QP).
        rtol: relative optimality tolerance of the dual solver.
        max_iter: Newton iterations per continuation stage.
        feas_tol: allowed constraint violation after the float64 re-check (absolute, in units of
            P); above it the status is 4 (numerical).
    """

    w_max: float = 2.0
    rho: float | None = None
    budget: float | None = None
    mu: float = 0.0
    solver: str = "dual"
    rtol: float = 1e-9
    max_iter: int = 100
    feas_tol: float = 1e-9

    def __post_init__(self):
        checks.check_positive(self.w_max, "w_max")
        if self.rho is not None:
            checks.check_positive(self.rho, "rho")
        if self.budget is not None:
            checks.check_positive(self.budget, "budget")
        checks.check_positive(self.mu, "mu", allow_zero=True)
        checks.check_choice(self.solver, "solver", ("dual", "highs"))
        checks.check_positive(self.rtol, "rtol")
        checks.check_positive(self.max_iter, "max_iter", integer=True)
        checks.check_positive(self.feas_tol, "feas_tol")

    @property
    def bounds(self) -> tuple[float, float]:
        lo, hi = 0.0, float(self.w_max)
        if self.rho is not None:
            lo, hi = max(lo, 1.0 - self.rho), min(hi, 1.0 + self.rho)
        return lo, hi


@dataclasses.dataclass(frozen=True)
class ReweightResult:
    """Solution of the reweighting program.

    Attributes:
        w: weights (N,), or None when no feasible w exists.
        status, message: scipy linprog status code and text.
        objective: Σ_{targets} Σ_i w_i P[i, k] − (μ/2)‖w − 1‖².
        max_violation: max over constraints of the float64 violation (coupling, box, budget).
        n_saturated: weights at a bound (0 / w_max / trust-region edge).
        n_fractional: weights strictly between their bounds, other than those left at 1.
        predicted_loss_change: −Pᵀ(w − 1) per class (negative = predicted improvement).
        solver: what produced w ("dual": the device path, or "highs").
        notes: what the solver did (the exact finish's size and rounds, the QP's gap, a
            Farkas certificate).
        duals: ν (K,) multipliers of the class constraints (and the budget's, if any).
        n_unchanged: weights left at exactly 1 (strictly inside the bounds).
    """

    w: np.ndarray | None
    status: int
    message: str
    objective: float
    max_violation: float
    n_saturated: int
    n_fractional: int
    predicted_loss_change: np.ndarray
    solver: str
    notes: tuple[str, ...] = ()
    duals: np.ndarray | None = None
    n_unchanged: int = 0

    @property
    def success(self) -> bool:
        return self.status == SUCCESS

    def summary(self) -> dict:
        return {"status": self.status, "message": self.message, "objective": self.objective,
                "max_violation": self.max_violation, "n_saturated": self.n_saturated,
                "n_fractional": self.n_fractional, "n_unchanged": self.n_unchanged, "solver": self.solver, "notes": list(self.notes),
                "predicted_loss_change": None if self.w is None else self.predicted_loss_change.tolist()}


jax.tree_util.register_dataclass(
    ReweightResult, data_fields=["w", "predicted_loss_change", "duals"],
    meta_fields=["status", "message", "objective", "max_violation", "n_saturated", "n_fractional", "solver",
                 "notes", "n_unchanged"])


def program_data(P, targets, alpha, config, class_weights=None):
    """Validated (P in float64, objective c = Pβ, thresholds b = α ⊙ Σ_i P[i, :]) of one program."""
    P = checks.as_influence_matrix(P)
    n, K = P.shape
    if class_weights is not None:
        beta = np.asarray(class_weights, np.float64)
        if beta.shape != (K,) or not np.all(np.isfinite(beta)) or beta.min() < 0 or beta.sum() <= 0:
            checks.fail("class_weights", repr(np.asarray(class_weights).tolist()),
                         f"{K} non-negative weights, not all zero", "e.g. a one-hot vector")
    else:
        t = checks.as_class_indices(targets, K)
        beta = np.zeros(K)
        beta[list(t)] = 1.0
    a = np.broadcast_to(np.asarray(alpha, np.float64), (K,)) if np.ndim(alpha) == 0 else np.asarray(alpha, np.float64)
    if a.shape != (K,) or not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        checks.fail("alpha", f"{np.asarray(alpha).tolist()}", f"{K} thresholds in [0, 1] (or one scalar)",
                     "keep at least a fraction α_k ∈ [0, 1] of each class's total influence")
    c = P @ beta
    b = a * P.sum(0)
    return P, c, b


def check_feasibility(P, w, b, config: ReweightConfig) -> float:
    """Max violation (float64) of the coupling and box constraints at w, and of the budget
    relative to max(1, B)."""
    P = np.asarray(P, np.float64)
    w = np.asarray(w, np.float64)
    lo, hi = config.bounds
    v = [np.max(b - P.T @ w, initial=0.0), np.max(lo - w, initial=0.0), np.max(w - hi, initial=0.0)]
    if config.budget is not None:  # in units of the budget (a sum of N weights' moves)
        v.append(max(np.abs(w - 1).sum() - config.budget, 0.0) / max(1.0, config.budget))
    return float(max(v))


def _result(P, c, b, w, config, solver, notes, duals, status=SUCCESS, message="optimal") -> ReweightResult:
    """The `ReweightResult` of w (None: no solution) with its float64 re-check."""
    if w is None:
        return ReweightResult(None, status, message, float("nan"), float("nan"), 0, 0,
                              np.full(P.shape[1], np.nan), solver, tuple(notes), duals)
    lo, hi = config.bounds
    w = np.clip(w, lo, hi)
    viol = check_feasibility(P, w, b, config)
    if viol > config.feas_tol:
        notes = (*notes, f"float64 violation {viol:.3g} exceeds feas_tol {config.feas_tol:g}")
    eps = 1e-9 * max(1.0, hi)
    at_bound = (w <= lo + eps) | (w >= hi - eps)
    unchanged = np.abs(w - 1.0) <= eps
    obj = float(c @ w - 0.5 * config.mu * np.sum((w - 1) ** 2))
    return ReweightResult(w, status, message, obj, viol, int(at_bound.sum()),
                          int((~at_bound & ~unchanged).sum()), -(P.T @ (w - 1.0)), solver,
                          tuple(notes), duals, int((unchanged & ~at_bound).sum()))


def _highs_solve(P, c, b, config, label, notes=()) -> ReweightResult:
    """The whole program by HiGHS (LP, or QP when μ > 0), reported under `label`."""
    lo, hi = config.bounds
    if config.mu > 0:
        st, msg, w, duals = highs.qp(P, c, b, lo, hi, config.mu, config.budget)
    else:
        st, msg, w, duals = highs.lp(P, c, b, lo, hi, config.budget)
    if st != SUCCESS:
        return _result(P, c, b, None, config, label, notes, None, st, STATUS_MESSAGES.get(st, msg))
    return _result(P, c, b, w, config, label, notes, duals)


def bucket(n: int) -> int:
    """The padded size for N rows: the next of 64, 96, 128, 192, 256, ... (one compile serves
    every N up to it; at most a third of the rows are padding)."""
    size = 64
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad_device(a, size, axis):
    shape = list(a.shape)
    shape[axis] = size
    return jax.lax.dynamic_update_slice(jnp.zeros(shape, a.dtype), a, (0,) * a.ndim)


def pad_rows(P, C=None):
    """P (N, K) padded with zero rows to `bucket`(N), and C (M, N) with zero columns to match:
    the shapes every device solve is compiled for (zero rows change no constraint or objective;
    `n_valid` keeps them at w = 1). Device arrays of P's dtype (padded on the device: a fresh
    host array of N·K float64 first-touches its pages, 0.11 s per 80 MB)."""
    size = bucket(P.shape[0])
    with jax.enable_x64(True):  # (float64 stays float64)
        Pp = _pad_device(jnp.asarray(P), size, 0)
        return Pp if C is None else (Pp, _pad_device(jnp.asarray(C), size, 1))


def solve_rows(P, C, B, LO, HI, budget, mu, n_valid, *, has_budget, qp, mode="vmap"):
    """`exact.solve_program` for every row of (C, B, LO, HI) on one P (pure JAX, unjitted: the
    batch front door and the fused search generation both trace it)."""
    def one(c, b, lo, hi, gram_cap=None):  # (a Hessian branch choice only pays outside vmap)
        return exact.solve_program(P, c, b, lo, hi, budget if has_budget else None, mu if qp else 0.0,
                                   n_valid=n_valid, gram_cap=gram_cap)

    if C.shape[0] == 1:
        # one program: no vmap, so the dual stage's lax.switch (`dual.weighted_gram`) stays a
        # branch instead of becoming a select that computes every side
        return jax.tree_util.tree_map(lambda a: a[None], one(C[0], B[0], LO[0], HI[0], "auto"))
    if mode == "vmap":
        return jax.vmap(one)(C, B, LO, HI)
    return jax.lax.map(lambda a: one(*a, "auto"), (C, B, LO, HI))


_device_batch = jax.jit(solve_rows, static_argnames=("has_budget", "qp", "mode"))


def _device_solve(P, C, B, bounds, config, mode):
    """All rows on the device in float64, N padded to `bucket`(N): a `ProgramSolution` of numpy
    arrays with a leading row axis, unpadded."""
    n = P.shape[0]
    Pp, Cp = pad_rows(P, C)
    with jax.enable_x64(True):
        sol = _device_batch(jnp.asarray(Pp), jnp.asarray(Cp),
                            jnp.asarray(B), jnp.asarray(bounds[0]), jnp.asarray(bounds[1]),
                            float(config.budget or 0.0), float(config.mu), n,
                            has_budget=config.budget is not None, qp=config.mu > 0, mode=mode)
        sol = jax.tree_util.tree_map(np.asarray, sol)
    return sol._replace(w=sol.w[:, :n])


def result_from_solution(P, c, b, sol, config) -> ReweightResult:
    """The `ReweightResult` of one row of a device solve (with the host's float64 re-check)."""
    st = int(sol.status)
    duals = np.asarray(sol.duals, np.float64)
    if config.mu > 0:
        notes = [f"duality gap {float(sol.gap):.3g} after {int(sol.iterations)} Newton steps"]
    else:
        notes = [f"exact finish: {int(sol.n_free)} weights free in the restricted LP, "
                 f"{int(sol.rounds)} round(s), {int(sol.iterations)} iterations"]
    if st == INFEASIBLE:
        notes.append(f"the duals are a Farkas certificate: every w in the box violates a class "
                     f"constraint (or the budget) by at least {-float(sol.farkas):.3g}")
        return _result(P, c, b, None, config, "dual", notes, duals, INFEASIBLE,
                       "The problem is infeasible (Farkas certificate from the duals).")
    if st != SUCCESS:
        why = ("the restricted LPs did not settle" if config.mu == 0
               else "the dual stage did not close the duality gap")
        notes.append(f"{why}; solver='highs' solves this program exactly on the host")
        return _result(P, c, b, None, config, "dual", notes, duals, st,
                       f"{STATUS_MESSAGES[st]}: no certified optimum ({why})")
    r = _result(P, c, b, np.asarray(sol.w, np.float64), config, "dual", notes, duals)
    if r.max_violation > config.feas_tol:  # certified on the device, refused by the host's re-check
        return dataclasses.replace(r, status=NUMERICAL, message=f"{STATUS_MESSAGES[NUMERICAL]}: the float64 "
                                   f"re-check found violation {r.max_violation:.3g} > feas_tol {config.feas_tol:g}")
    return r


def solve_reweighting(P, targets: Sequence[int] | None, alpha, config: ReweightConfig = ReweightConfig(),
                      *, class_weights=None, **overrides) -> ReweightResult:
    """Solve the reweighting program (module docstring) for one threshold vector α.

    Args:
        P: influence matrix (N, K), P > 0 beneficial.
        targets: class indices whose total influence is maximised.
        alpha: per-class thresholds in [0, 1] (K values, or one for all).
        config: `ReweightConfig` (bounds, trust region, budget, μ, solver); keyword `overrides`
            replace its fields, e.g. ``solve_reweighting(P, [3], 0.9, rho=0.5)``.
        class_weights: instead of `targets`, maximise Σ_k β_k Σ_i w_i P[i, k] for these β >= 0
            (used to trace the Pareto frontier).

    Returns:
        `ReweightResult` (status codes follow `scipy.optimize.linprog`). An infeasible program
        (α too high) gives status 2 and w None, never a silently wrong w.

    Example:
        >>> import numpy as np
        >>> P = np.random.default_rng(0).normal(size=(200, 3))
        >>> r = solve_reweighting(P, targets=[0], alpha=0.5, w_max=2.0)
        >>> r.status, r.max_violation <= 1e-9
        (0, True)
    """
    if overrides:
        config = dataclasses.replace(config, **overrides)
    P, c, b = program_data(P, targets, alpha, config, class_weights)
    if config.solver == "highs":
        return _highs_solve(P, c, b, config, "highs")
    sol = _device_solve(P, c[None], b[None], np.array(config.bounds)[:, None], config, "vmap")
    return result_from_solution(P, c, b, jax.tree_util.tree_map(lambda a: a[0], sol), config)


def solve_reweighting_batch(P, targets, alphas, config: ReweightConfig = ReweightConfig(), *,
                            batch: str = "auto", rhos=None, class_weights=None,
                            **overrides) -> list[ReweightResult]:
    """Solve the program for a population of α at once: one compiled device solve
    (`exact.solve_program`) over all rows of `alphas` (shape (M, K)), then each solution's
    float64 re-check on the host. Same solutions as one `solve_reweighting` per row.

    Args:
        batch: "vmap" (lock-step over the population), "map" (one compiled loop over it) or
            "auto" (vmap: measured faster on CPU too). Both give the same solutions.
        rhos: optional per-row trust regions (M,), overriding `config.rho` row by row.
        class_weights: optional per-row objective weights β (M, K) (or one row for all),
            replacing `targets` as in `solve_reweighting`.
    """
    mode = dual.batch_mode(batch)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    alphas = np.atleast_2d(np.asarray(alphas, np.float64))
    betas = ([None] * len(alphas) if class_weights is None
             else np.broadcast_to(np.asarray(class_weights, np.float64), alphas.shape))
    probs = [program_data(P, targets, a, config, cw) for a, cw in zip(alphas, betas)]
    P64 = probs[0][0]
    C = np.stack([p[1] for p in probs])
    B = np.stack([p[2] for p in probs])
    cfgs = [config] * len(alphas) if rhos is None else \
        [dataclasses.replace(config, rho=float(r)) for r in np.broadcast_to(rhos, (len(alphas),))]
    if config.solver == "highs":
        return [solve_reweighting(P64, targets, a, c, class_weights=cw)
                for a, c, cw in zip(alphas, cfgs, betas)]
    bounds = np.array([c.bounds for c in cfgs]).T
    sol = _device_solve(P64, C, B, bounds, config, mode)
    return [result_from_solution(P64, C[i], B[i], jax.tree_util.tree_map(lambda a: a[i], sol), cfgs[i])
            for i in range(len(alphas))]
