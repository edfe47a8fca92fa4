"""The reweighting program: its public API (``docs/method.md``).

Given the influence matrix P (N×K, P > 0 beneficial), re-weighting the training set by w moves
class k's validation loss by ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (first order). The method's program:

    maximise    Σ_{k∈targets} Σ_i w_i P[i, k]  − (μ/2)‖w − 1‖²
    subject to  Σ_i w_i P[i, k] >= α_k Σ_i P[i, k]   for every class k
                max(0, 1−ρ) <= w_i <= min(w_max, 1+ρ),   Σ_i |w_i − 1| <= B (optional)

`solve_reweighting` (one α) and `solve_reweighting_batch` (a population of α) solve it with the
structured dual solver (`dual`: K ≪ N coupling constraints, so the dual has K (+1) variables)
followed, for the LP, by the exact active-set resolution (`resolve`); HiGHS (`highs`) is the
exact reference (``solver="highs"``) and the fallback when the dual path cannot certify its
answer, which the result reports (``solver="dual→highs"`` and its notes). Every returned w is
re-checked in float64; an infeasible program gives status 2 and no w, never a silently wrong w.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from .. import checks
from . import dual, highs, resolve
from .highs import INFEASIBLE, NUMERICAL, STATUS_MESSAGES, SUCCESS


@dataclasses.dataclass(frozen=True)
class ReweightConfig:
    """Options of the reweighting program (the problem data P, targets, α come separately).

    Attributes:
        w_max: upper bound on every weight.
        rho: trust region |w_i − 1| <= ρ (None: off).
        budget: L1 budget Σ_i |w_i − 1| <= B (None: off).
        mu: proximal term (μ/2)‖w − 1‖² in units of P (0: the LP). Smooth, interior weights.
        solver: "dual" (structured, jaxopt-based) or "highs" (exact reference; LP only, or QP
            through highspy when μ > 0).
        rtol: relative optimality tolerance of the dual solver.
        max_iter: Newton iterations per continuation stage.
        feas_tol: allowed constraint violation after the float64 re-check (absolute, in units of
            P); above it HiGHS solves the whole program (reported as "dual→highs").
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
        solver: what produced w ("dual", "highs", or "dual→highs" after a fallback).
        notes: what the solver did beyond the plain solve (repairs, fallbacks).
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
    """Max violation (float64) of the coupling, box and budget constraints at w."""
    P = np.asarray(P, np.float64)
    w = np.asarray(w, np.float64)
    lo, hi = config.bounds
    v = [np.max(b - P.T @ w, initial=0.0), np.max(lo - w, initial=0.0), np.max(w - hi, initial=0.0)]
    if config.budget is not None:
        v.append(max(np.abs(w - 1).sum() - config.budget, 0.0))
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


_UNSETTLED = (NUMERICAL, "the restricted LPs did not settle")


def from_duals(P, c, b, z, config, verdict, resolved=None) -> ReweightResult:
    """The program's answer from duals z: a verdict of `dual.verdict`, else the QP's closed
    form or the LP's exact resolution (`resolved`, if the batch already did it), then the
    float64 re-check. Falls back to HiGHS (reported) when the duals cannot decide."""
    lo, hi = config.bounds
    if verdict is not None and verdict[0] == "infeasible":
        note = (f"the duals are a Farkas certificate: every w in the box violates a class "
                f"constraint by at least {-verdict[1]:.3g}")
        return _result(P, c, b, None, config, "dual", (note,), z, INFEASIBLE,
                       "The problem is infeasible (Farkas certificate from the duals).")
    if verdict is not None:
        return _highs_solve(P, c, b, config, "dual→highs", ("dual diverged (a sign of infeasibility); HiGHS decides",))
    if config.mu > 0:
        u, _, _ = dual.primal_from_dual(z, P, c, lo, hi, config.mu, config.budget is not None)
        w, duals, notes = 1.0 + np.asarray(u, np.float64), z, ()
        gap, bar = dual.qp_gap(P, c, b, z, w, config)
        if not gap <= bar:  # duals short of the optimum: w is feasible at best, not optimal
            return _highs_solve(P, c, b, config, "dual→highs",
                                (f"duality gap {gap:.3g} > {bar:.3g} (the dual stage stopped short); HiGHS decides",))
    else:
        if resolved is None:
            resolved = resolve.resolve_lp(P, c[None], b[None], np.array([lo]), np.array([hi]), z[None],
                                          budget=config.budget).get(0, _UNSETTLED)
        if not isinstance(resolved, resolve.Resolved):
            return _highs_solve(P, c, b, config, "dual→highs", (f"exact resolution failed ({resolved[1]}); HiGHS decides",))
        w, duals = resolved.w, resolved.duals
        notes = (f"resolved {resolved.n_free} ambiguous weights exactly",)
    viol = check_feasibility(P, w, b, config)
    if viol > config.feas_tol:
        return _highs_solve(P, c, b, config, "dual→highs",
                            (*notes, f"float64 re-check found violation {viol:.3g} > {config.feas_tol:g}; HiGHS repairs"))
    return _result(P, c, b, w, config, "dual", notes, duals)


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
    z, _, _ = dual.run_dual(P, c[None], b[None], config)
    z = np.asarray(z)[0]
    return from_duals(P, c, b, z, config, dual.verdict(P, b, z, config))


def solve_reweighting_batch(P, targets, alphas, config: ReweightConfig = ReweightConfig(), *,
                            batch: str = "auto", rhos=None, class_weights=None,
                            **overrides) -> list[ReweightResult]:
    """Solve the program for a population of α at once: one compiled dual stage for all rows of
    `alphas` (shape (M, K)), then all rows' exact resolutions together (one block-diagonal
    HiGHS LP per round) and each solution's float64 re-check. Same solutions as one
    `solve_reweighting` per row.

    Args:
        batch: "vmap" (lock-step over the population: best on accelerators), "map" (one compiled
            loop over the population: best on CPU, where lock-step pays for the slowest member)
            or "auto" (map on CPU, vmap elsewhere). Both give the same solutions.
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
    Z, _, _ = dual.run_dual(P64, C, B, config, mode, bounds=bounds)
    verdicts = [dual.verdict(P64, B[i], Z[i], cfgs[i]) for i in range(len(alphas))]
    resolved = {}
    rows = [i for i, v in enumerate(verdicts) if v is None]
    if config.mu == 0 and rows:
        # the rows whose LP is resolved exactly: all at once, one HiGHS call per round
        got = resolve.resolve_lp(P64, C[rows], B[rows], bounds[0, rows], bounds[1, rows], Z[rows],
                                 budget=config.budget)
        resolved = {i: got.get(j, _UNSETTLED) for j, i in enumerate(rows)}
    return [from_duals(P64, C[i], B[i], Z[i], cfgs[i], verdicts[i], resolved.get(i))
            for i in range(len(alphas))]
