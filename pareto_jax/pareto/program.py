"""The reweighting program: its public API (``docs/method.md``).

Given the influence matrix P (N×K, P > 0 beneficial), re-weighting the training set by w moves
class k's validation loss by ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (first order). The method's program::

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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from ..config import ReweightConfig
from ..results import Status, message, pytree_result
from . import dual, highs
from .device import pad_rows, solve_device


@pytree_result(data=("w", "predicted_loss_change", "duals"))
@dataclasses.dataclass(frozen=True)
class ReweightResult:
    """Solution of the reweighting program.

    Attributes:
        w: weights (N,), or None when no feasible w exists.
        status, message: the `results.Status` code (scipy linprog's) and its text.
        objective: Σ_{targets} Σ_i w_i P[i, k] − (μ/2)‖w − 1‖².
        max_violation: max over constraints of the float64 violation (coupling, box, budget).
        n_saturated: weights at a bound (0 / w_max / trust-region edge).
        n_fractional: weights strictly between their bounds, other than those left at 1.
        predicted_loss_change: −Pᵀ(w − 1) per class (negative = predicted improvement).
        solver: what produced w ("device" or "highs").
        notes: what the solver did (the exact finish's size and rounds, the QP's gap, a
            Farkas certificate).
        duals: ν (K,) multipliers of the class constraints (and the budget's, if any).
        n_unchanged: weights left at exactly 1 (strictly inside the bounds).

    Example:
        >>> import numpy as np
        >>> from pareto_jax import solve_reweighting
        >>> r = solve_reweighting(np.random.default_rng(1).normal(size=(100, 3)), [0], 0.8, rho=0.5)
        >>> r.success, r.w.shape, r.max_violation <= 1e-9
        (True, (100,), True)
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
        return self.status == Status.SUCCESS

    def summary(self) -> dict:
        return {
            "status": self.status,
            "message": self.message,
            "objective": self.objective,
            "max_violation": self.max_violation,
            "n_saturated": self.n_saturated,
            "n_fractional": self.n_fractional,
            "n_unchanged": self.n_unchanged,
            "solver": self.solver,
            "notes": list(self.notes),
            "predicted_loss_change": None
            if self.w is None
            else self.predicted_loss_change.tolist(),
        }


def program_data(P, targets, alpha, config, class_weights=None):
    """Validated (P in float64, objective c = Pβ, thresholds b = α ⊙ Σ_i P[i, :]) of one program."""
    del config  # (the bounds are `ReweightConfig.bounds`; kept for the callers' signature)
    P = checks.as_influence_matrix(P)
    return (P, *_row_data(P, targets, alpha, class_weights))


def _row_data(P, targets, alpha, class_weights):
    """(c, b) of one program on an already validated float64 P."""
    K = P.shape[1]
    if class_weights is not None:
        beta = np.asarray(class_weights, np.float64)
        if beta.shape != (K,) or not np.all(np.isfinite(beta)) or beta.min() < 0 or beta.sum() <= 0:
            checks.fail("class_weights", repr(np.asarray(class_weights).tolist()),
                f"{K} non-negative weights, not all zero", "e.g. a one-hot vector")
    else:
        t = checks.as_class_indices(targets, K)
        beta = np.zeros(K)
        beta[list(t)] = 1.0
    a = (
        np.broadcast_to(np.asarray(alpha, np.float64), (K,))
        if np.ndim(alpha) == 0
        else np.asarray(alpha, np.float64)
    )
    if a.shape != (K,) or not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        checks.fail("alpha", f"{np.asarray(alpha).tolist()}",
            f"{K} thresholds in [0, 1] (or one scalar)",
            "keep at least a fraction α_k ∈ [0, 1] of each class's total influence")
    return P @ beta, a * P.sum(0)


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


def _result(
    P, c, b, w, config, solver, notes, duals, status=Status.SUCCESS, message_="optimal"
) -> ReweightResult:
    """The `ReweightResult` of w (None: no solution) with its float64 re-check."""
    if w is None:
        return ReweightResult(None, int(status), message_, float("nan"), float("nan"), 0, 0,
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
    return ReweightResult(w, int(status), message_, obj, viol, int(at_bound.sum()),
        int((~at_bound & ~unchanged).sum()), -(P.T @ (w - 1.0)), solver, tuple(notes), duals,
        int((unchanged & ~at_bound).sum()))


def _highs_solve(P, c, b, config) -> ReweightResult:
    """The whole program by HiGHS (LP, or QP when μ > 0)."""
    lo, hi = config.bounds
    if config.mu > 0:
        st, msg, w, duals = highs.qp(P, c, b, lo, hi, config.mu, config.budget)
    else:
        st, msg, w, duals = highs.lp(P, c, b, lo, hi, config.budget)
    if st != Status.SUCCESS:
        return _result(P, c, b, None, config, "highs", (), None, st,
            message(st) if st in Status._value2member_map_ else msg)
    return _result(P, c, b, w, config, "highs", (), duals)


# ----------------------------------------------------------------------------- the one program path
#
# prepare (validate; the rows' objectives, thresholds and bounds)  ->  solve on the device (one
# compiled program for every row, N padded to a bucket)  ->  read (each row's float64 re-check
# and status). `solve_reweighting`, `solve_reweighting_batch`, the search's population and the
# evaluator's fused generation all go through these three steps.


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramBatch:
    """M programs on one P, prepared for the device (`prepare`).

    Attributes:
        P: (N, K) float64. C: (M, N) objectives (Pβ). B: (M, K) thresholds (α ⊙ Σ_i P[i, :]).
        lo, hi: (M,) each row's weight bounds (`ReweightConfig.bounds`, the trust region applied).
        configs: each row's `ReweightConfig` (they differ at most in ρ).
    """

    P: np.ndarray
    C: np.ndarray
    B: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    configs: tuple[ReweightConfig, ...]

    @property
    def config(self) -> ReweightConfig:
        """The settings every row shares (budget, μ, solver, tolerances)."""
        return self.configs[0]

    def device_args(self):
        """(P padded, C padded, B, lo, hi, budget, μ, N) as the device solve takes them (P and C
        padded to ``bucket(N)`` on the device), and its static keywords."""
        cfg = self.config
        Pp, Cp = pad_rows(self.P, self.C)
        args = (Pp, Cp, jnp.asarray(self.B), jnp.asarray(self.lo), jnp.asarray(self.hi),
            float(cfg.budget or 0.0), float(cfg.mu), self.P.shape[0])
        return args, {"has_budget": cfg.budget is not None, "qp": cfg.mu > 0,
            "rtol": float(cfg.rtol)}


def prepare(
    P, targets, alphas, config: ReweightConfig, *, rhos=None, class_weights=None
) -> ProgramBatch:
    """Validate M programs on one P and prepare them for the device.

    Args:
        P: (N, K) influence matrix. targets: class indices maximised (or None with
            `class_weights`). alphas: (M, K) thresholds (or one row, or one scalar).
        config: the settings every row shares. rhos: optional per-row trust regions (M,),
            replacing `config.rho` row by row. class_weights: optional objective weights β,
            one row for all or (M, K).
    """
    P = checks.as_influence_matrix(P)
    K = P.shape[1]
    alphas = np.asarray(alphas, np.float64)
    alphas = np.full((1, K), float(alphas)) if alphas.ndim == 0 else np.atleast_2d(alphas)
    M = alphas.shape[0]
    if class_weights is None:
        betas = [None] * M
    else:
        cw = np.asarray(class_weights, np.float64)
        betas = list(cw) if cw.ndim == 2 and cw.shape[0] == M else [cw] * M
    rows = [_row_data(P, targets, a, cw) for a, cw in zip(alphas, betas)]
    cfgs = tuple(
        [config] * M
        if rhos is None
        else [dataclasses.replace(config, rho=float(r)) for r in np.broadcast_to(rhos, (M,))]
    )
    bounds = np.array([c.bounds for c in cfgs], np.float64).reshape(M, 2)
    return ProgramBatch(P, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]),
        bounds[:, 0], bounds[:, 1], cfgs)


def read(batch: ProgramBatch, sol) -> list[ReweightResult]:
    """Each row's `ReweightResult` from a device solve (`solve_device`, or a fused generation's
    program stage): the float64 re-check on the host, and the status."""
    return [
        result_from_solution(batch.P, batch.C[i], batch.B[i],
            jax.tree_util.tree_map(lambda a: a[i], sol), batch.configs[i])
        for i in range(batch.C.shape[0])
    ]


def result_from_solution(P, c, b, sol, config) -> ReweightResult:
    """The `ReweightResult` of one row of a device solve (with the host's float64 re-check)."""
    st = int(sol.status)
    duals = np.asarray(sol.duals, np.float64)
    if config.mu > 0:
        notes = [f"duality gap {float(sol.gap):.3g} after {int(sol.iterations)} Newton steps"]
    else:
        notes = [
            f"exact finish: {int(sol.n_free)} weights free in the restricted LP, "
            f"{int(sol.rounds)} round(s), {int(sol.iterations)} iterations"
        ]
    if st == Status.INFEASIBLE:
        if np.isfinite(float(sol.farkas)) and float(sol.farkas) < 0:
            notes.append(
                f"the duals are a Farkas certificate: every w in the box violates a class "
                f"constraint (or the budget) by at least {-float(sol.farkas):.3g}"
            )
            why = "The problem is infeasible (Farkas certificate from the duals)."
        else:
            lo, hi = config.bounds
            need = P.shape[0] * max(lo - 1.0, 1.0 - hi, 0.0)
            why = (
                f"The problem is infeasible: the box [{lo:g}, {hi:g}] moves every weight off 1, "
                f"which needs a budget of at least {need:.4g} > {config.budget:g}."
            )
            notes.append(why)
        return _result(P, c, b, None, config, "device", notes, duals, Status.INFEASIBLE, why)
    if st != Status.SUCCESS:
        why = (
            "the restricted LPs did not settle"
            if config.mu == 0
            else "the dual stage did not close the duality gap"
        )
        notes.append(f"{why}; solver='highs' solves this program exactly on the host")
        return _result(P, c, b, None, config, "device", notes, duals, st,
            f"{message(st)}: no certified optimum ({why})")
    r = _result(P, c, b, np.asarray(sol.w, np.float64), config, "device", notes, duals)
    if r.max_violation > config.feas_tol:  # certified on the device, refused by the host's re-check
        return dataclasses.replace(
            r,
            status=int(Status.NUMERICAL),
            message=f"{message(Status.NUMERICAL)}: the "
            f"float64 re-check found violation {r.max_violation:.3g} > feas_tol "
            f"{config.feas_tol:g}",
        )
    return r


def solve_batch(batch: ProgramBatch, mode: str = "vmap") -> list[ReweightResult]:
    """Every program of a prepared batch: on the device (`solve_device`, `read`), or row by row
    by HiGHS when the batch's solver is "highs"."""
    if batch.config.solver == "highs":
        return [
            _highs_solve(batch.P, batch.C[i], batch.B[i], batch.configs[i])
            for i in range(batch.C.shape[0])
        ]
    return read(batch, solve_device(batch, mode))


def solve_reweighting(P, targets: Sequence[int] | None, alpha,
    config: ReweightConfig = ReweightConfig(), *, class_weights=None, throw: bool = False,
    **overrides) -> ReweightResult:
    """Solve the reweighting program (module docstring) for one threshold vector α.

    Args:
        P: influence matrix (N, K), P > 0 beneficial.
        targets: class indices whose total influence is maximised.
        alpha: per-class thresholds in [0, 1] (K values, or one for all).
        config: `ReweightConfig` (bounds, trust region, budget, μ, solver); keyword `overrides`
            replace its fields, e.g. ``solve_reweighting(P, [3], 0.9, rho=0.5)``.
        class_weights: instead of `targets`, maximise Σ_k β_k Σ_i w_i P[i, k] for these β >= 0
            (used to trace the Pareto frontier).
        throw: raise `NumericalError` unless the status is optimal (else the status says it).

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
    alpha = np.asarray(alpha, np.float64)
    (r,) = solve_batch(
        prepare(P, targets, alpha if alpha.ndim == 0 else alpha[None], config,
            class_weights=class_weights)
    )
    if throw:
        from ..results import raise_for_status

        raise_for_status(r.status, "reweighting program", r.message)
    return r


def solve_reweighting_batch(P, targets, alphas, config: ReweightConfig = ReweightConfig(), *,
    batch: str = "auto", rhos=None, class_weights=None, **overrides) -> list[ReweightResult]:
    """Solve the program for a population of α at once: one compiled device solve
    (`exact.solve_program`) over all rows of `alphas` (shape (M, K)), then each solution's
    float64 re-check on the host. Same solutions as one `solve_reweighting` per row.

    Args:
        batch: "vmap" (lock-step over the population), "map" (one compiled loop over it) or
            "auto" (vmap: measured faster on CPU too). Both give the same solutions.
        rhos: optional per-row trust regions (M,), overriding `config.rho` row by row.
        class_weights: optional per-row objective weights β (M, K) (or one row for all),
            replacing `targets` as in `solve_reweighting`.

    Example:
        >>> import numpy as np
        >>> from pareto_jax import solve_reweighting_batch
        >>> P = np.random.default_rng(2).normal(size=(200, 3))
        >>> alphas = np.linspace(0.5, 0.9, 4)[:, None] * np.ones(3)
        >>> [r.status for r in solve_reweighting_batch(P, [0], alphas, rho=0.5)]
        [0, 0, 0, 0]
    """
    mode = dual.batch_mode(batch)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return solve_batch(
        prepare(P, targets, alphas, config, rhos=rhos, class_weights=class_weights), mode
    )
