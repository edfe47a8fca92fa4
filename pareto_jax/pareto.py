"""Is there room for a Pareto improvement, and with which weights? (DESIGN §4–5)

Given the influence matrix P (N×K, P > 0 beneficial), re-weighting the training set by w moves
class k's validation loss by ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (first order).

* `ceiling_test(P)`: the PCA heuristic of the original method (labelled as such) and the exact
  first-order test, the LP ``max t s.t. Σ_i d_i P[i,k] >= t ∀k, −1 <= d_i <= 1``: t* > 0 iff a
  first-order Pareto improvement exists; otherwise its dual λ >= 0, Σλ = 1, with Pλ = 0 is the
  certificate (Gordan's theorem of the alternative).
* `solve_reweighting(P, targets, alpha, ...)`: the method's program

      maximise    Σ_{k∈targets} Σ_i w_i P[i, k]  − (μ/2)‖w − 1‖²
      subject to  Σ_i w_i P[i, k] >= α_k Σ_i P[i, k]   for every class k
                  max(0, 1−ρ) <= w_i <= min(w_max, 1+ρ),   Σ_i |w_i − 1| <= B (optional)

  solved either by HiGHS (scipy; the exact reference) or by the structured dual solver: K ≪ N
  coupling constraints, so the dual has K (+1) variables and each dual step costs one pass over
  P. It is smooth for μ > 0 (jaxopt's box-constrained L-BFGS-B), the LP is reached by
  continuation in μ, and the LP's few fractional weights are resolved exactly on a small
  restricted problem whose optimality is certified on the full problem. The dual stage is
  jittable and `vmap`s over a population of α; a population's restricted LPs go to HiGHS as
  one block-diagonal LP per round. Duals that prove infeasibility (a Farkas certificate) are
  reported as such without HiGHS. Every returned w is re-checked in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from . import _checks

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
    import jaxopt

# scipy.optimize.linprog status codes
SUCCESS, ITERATION_LIMIT, INFEASIBLE, UNBOUNDED, NUMERICAL = 0, 1, 2, 3, 4
STATUS_MESSAGES = {
    SUCCESS: "optimal", ITERATION_LIMIT: "iteration limit reached", INFEASIBLE: "infeasible",
    UNBOUNDED: "unbounded", NUMERICAL: "numerical difficulties",
}

_HIGHS_OPTIONS = dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10)


# ----------------------------------------------------------------------------- ceiling test


@dataclasses.dataclass(frozen=True)
class CeilingResult:
    """Outcome of `ceiling_test`.

    Attributes:
        improvable: t* > tol: a first-order Pareto improvement exists.
        t_star: optimal t of the LP (in units of P: the guaranteed predicted loss decrease of the
            worst class for the step w = 1 + d).
        direction: the optimal d ∈ [−1, 1]^N.
        predicted_gains: Pᵀd, the predicted loss decrease of every class for w = 1 + d.
        certificate: λ >= 0 with Σλ = 1 (the LP dual). When not improvable, Pλ = 0: every
            influence vector lies on the hyperplane with non-negative normal λ.
        certificate_residual: ‖Pλ‖₁ (equals t* by LP duality).
        tol: the threshold used on t*.
        pca_explained_ratio: first principal component's explained-variance ratio of centred P.
        pca_heuristic_improvable: pca_explained_ratio > 0.2 (the original method's
            **heuristic**; the exact answer is `improvable`).
        status, message: solver status (scipy linprog codes).
    """

    improvable: bool
    t_star: float
    direction: np.ndarray
    predicted_gains: np.ndarray
    certificate: np.ndarray
    certificate_residual: float
    tol: float
    pca_explained_ratio: float
    pca_heuristic_improvable: bool
    status: int
    message: str

    def summary(self) -> dict:
        return {
            "improvable": self.improvable, "t_star": self.t_star, "tol": self.tol,
            "predicted_gains": self.predicted_gains.tolist(),
            "certificate": self.certificate.tolist(),
            "certificate_residual": self.certificate_residual,
            "pca_explained_ratio (heuristic)": self.pca_explained_ratio,
            "pca_heuristic_improvable": self.pca_heuristic_improvable,
            "status": self.status, "message": self.message,
        }


def pca_explained_ratio(P) -> float:
    """Explained-variance ratio of the first principal component of the centred P (heuristic)."""
    P = np.asarray(P, np.float64)
    s = np.linalg.svd(P - P.mean(0), compute_uv=False)
    tot = float((s ** 2).sum())
    return float(s[0] ** 2 / tot) if tot > 0 else 0.0


def ceiling_test(P, *, tol: float | None = None) -> CeilingResult:
    """Decide whether a first-order Pareto improvement exists (exact LP) and report the heuristic.

    Args:
        P: influence matrix (N, K).
        tol: threshold on t* (default 1e-9 · max_k Σ_i |P[i, k]|).

    Returns:
        `CeilingResult`.

    Example:
        >>> import numpy as np
        >>> P = np.array([[1.0, -1.0], [-2.0, 2.0], [0.5, -0.5]])   # on the line y = −x
        >>> r = ceiling_test(P)
        >>> r.improvable, np.round(r.certificate, 3).tolist()
        (False, [0.5, 0.5])
    """
    P = _checks.as_influence_matrix(P)
    n, K = P.shape
    scale = float(np.abs(P).sum(0).max())
    if scale == 0:
        _checks.fail("P", "an all-zero matrix", "an influence matrix with some non-zero entry",
                     "check that the model and data produced gradients")
    tol = 1e-9 * scale if tol is None else float(tol)
    Ps = P / scale
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    A_ub = np.hstack([-Ps.T, np.ones((K, 1))])
    bounds = [(-1.0, 1.0)] * n + [(None, None)]
    res = scipy.optimize.linprog(cost, A_ub=A_ub, b_ub=np.zeros(K), bounds=bounds, method="highs",
                                 options=_HIGHS_OPTIONS)
    if res.status != 0:
        raise _checks.NumericalError(f"ceiling test LP: HiGHS returned status {res.status} ({res.message})")
    d = res.x[:n]
    t = float(res.x[-1]) * scale
    lam = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
    lam = lam / lam.sum() if lam.sum() > 0 else np.full(K, 1.0 / K)
    ratio = pca_explained_ratio(P)
    return CeilingResult(
        improvable=bool(t > tol), t_star=t, direction=d, predicted_gains=P.T @ d, certificate=lam,
        certificate_residual=float(np.abs(P @ lam).sum()), tol=tol, pca_explained_ratio=ratio,
        pca_heuristic_improvable=bool(ratio > 0.2), status=int(res.status), message=res.message)


# ----------------------------------------------------------------------------- the program


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
            P); above it the solution is repaired (restricted re-solve) or HiGHS takes over.
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
        _checks.check_positive(self.w_max, "w_max")
        if self.rho is not None:
            _checks.check_positive(self.rho, "rho")
        if self.budget is not None:
            _checks.check_positive(self.budget, "budget")
        _checks.check_positive(self.mu, "mu", allow_zero=True)
        _checks.check_choice(self.solver, "solver", ("dual", "highs"))
        _checks.check_positive(self.rtol, "rtol")
        _checks.check_positive(self.max_iter, "max_iter", integer=True)
        _checks.check_positive(self.feas_tol, "feas_tol")

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


def _problem(P, targets, alpha, config, class_weights=None):
    P = _checks.as_influence_matrix(P)
    n, K = P.shape
    if class_weights is not None:
        beta = np.asarray(class_weights, np.float64)
        if beta.shape != (K,) or not np.all(np.isfinite(beta)) or beta.min() < 0 or beta.sum() <= 0:
            _checks.fail("class_weights", repr(np.asarray(class_weights).tolist()),
                         f"{K} non-negative weights, not all zero", "e.g. a one-hot vector")
    else:
        t = _checks.as_class_indices(targets, K)
        beta = np.zeros(K)
        beta[list(t)] = 1.0
    a = np.broadcast_to(np.asarray(alpha, np.float64), (K,)) if np.ndim(alpha) == 0 else np.asarray(alpha, np.float64)
    if a.shape != (K,) or not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
        _checks.fail("alpha", f"{np.asarray(alpha).tolist()}", f"{K} thresholds in [0, 1] (or one scalar)",
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


def _finish(P, c, b, w, config, solver, notes, duals, status=SUCCESS, message="optimal"):
    if w is None:
        return ReweightResult(None, status, message, float("nan"), float("nan"), 0, 0,
                              np.full(P.shape[1], np.nan), solver, tuple(notes), duals)
    lo, hi = config.bounds
    w = np.clip(w, lo, hi)
    viol = check_feasibility(P, w, b, config)
    if viol > config.feas_tol:
        notes = [*notes, f"float64 violation {viol:.3g} exceeds feas_tol {config.feas_tol:g}"]
    eps = 1e-9 * max(1.0, hi)
    at_bound = (w <= lo + eps) | (w >= hi - eps)
    unchanged = np.abs(w - 1.0) <= eps
    obj = float(c @ w - 0.5 * config.mu * np.sum((w - 1) ** 2))
    return ReweightResult(w, status, message, obj, viol, int(at_bound.sum()),
                          int((~at_bound & ~unchanged).sum()), -(P.T @ (w - 1.0)), solver,
                          tuple(notes), duals, int((unchanged & ~at_bound).sum()))


# ----------------------------------------------------------------------------- HiGHS reference


def _highs_lp(P, c, b, lo, hi, budget, fixed_mask=None, fixed_w=None):
    """Exact LP by HiGHS; optional restriction to the free variables (the rest fixed).

    P, c and b are divided by max|P| first: HiGHS's absolute feasibility tolerance would
    otherwise accept violations of 1e-9 on influence matrices of size ~1e-6 (found by the
    property tests). The class duals are unchanged by this scaling; η is scaled back.
    """
    n, K = P.shape
    if fixed_mask is not None:
        free = ~fixed_mask
        b = b - P[fixed_mask].T @ fixed_w[fixed_mask]
        if budget is not None:
            budget = budget - np.abs(fixed_w[fixed_mask] - 1).sum()
        P, c = P[free], c[free]
        n = P.shape[0]
    s = max(float(np.abs(P).max(initial=0.0)), 1e-300)
    P, c, b = P / s, c / s, b / s
    if budget is None:
        res = scipy.optimize.linprog(-c, A_ub=-P.T, b_ub=-b, bounds=[(lo, hi)] * n, method="highs",
                                     options=_HIGHS_OPTIONS)
        w = None if res.x is None else res.x
        duals = None if res.status != 0 else np.maximum(-np.asarray(res.ineqlin.marginals), 0)
        return res.status, res.message, w, duals
    # w = 1 + a − e with a ∈ [0, hi − 1], e ∈ [0, 1 − lo]; Σ (a + e) <= budget
    cost = np.concatenate([-c, c])
    A = np.vstack([np.hstack([-P.T, P.T]), np.ones((1, 2 * n))])
    rhs = np.concatenate([-(b - P.sum(0)), [budget]])
    bounds = [(0.0, max(hi - 1.0, 0.0))] * n + [(0.0, max(1.0 - lo, 0.0))] * n
    res = scipy.optimize.linprog(cost, A_ub=A, b_ub=rhs, bounds=bounds, method="highs",
                                 options=_HIGHS_OPTIONS)
    if res.x is None:
        return res.status, res.message, None, None
    w = 1.0 + res.x[:n] - res.x[n:]
    duals = np.maximum(-np.asarray(res.ineqlin.marginals), 0) if res.status == 0 else None
    if duals is not None:
        duals[K] *= s  # the budget row is not scaled, the objective is
    return res.status, res.message, w, duals


def _highs_qp(P, c, b, lo, hi, mu, budget):
    """Exact QP by HiGHS (through highspy): min −cᵀw + (μ/2)‖w − 1‖² subject to the program."""
    try:
        import highspy
    except ImportError as e:  # pragma: no cover - depends on extras
        raise ImportError("the HiGHS QP reference needs highspy: pip install highspy") from e
    import scipy.sparse as sp

    n, K = P.shape
    scale = max(float(np.abs(P).max()), 1e-300)  # HiGHS's QP solver stalls on badly scaled data
    P, c, b, mu = P / scale, c / scale, b / scale, mu / scale
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("primal_feasibility_tolerance", 1e-10)
    h.setOptionValue("dual_feasibility_tolerance", 1e-10)
    h.setOptionValue("time_limit", 120.0)
    if budget is None:
        nv = n
        cost = -c - mu * np.ones(n)
        lower, upper = np.full(n, lo), np.full(n, hi)
        A = sp.csc_matrix(P.T)
        rl, ru = b.copy(), np.full(K, highspy.kHighsInf)
        Q = sp.identity(n, format="csc") * mu
        offset_map = lambda x: x  # noqa: E731
    else:
        nv = 2 * n  # u = a − e
        cost = np.concatenate([-c, c])
        lower = np.zeros(nv)
        upper = np.concatenate([np.full(n, max(hi - 1, 0)), np.full(n, max(1 - lo, 0))])
        A = sp.csc_matrix(np.vstack([np.hstack([P.T, -P.T]), np.ones((1, nv))]))
        rl = np.concatenate([b - P.sum(0), [-highspy.kHighsInf]])
        ru = np.concatenate([np.full(K, highspy.kHighsInf), [budget]])
        I = sp.identity(n, format="csc")
        Q = sp.bmat([[I, -I], [-I, I]], format="csc") * mu
        offset_map = lambda x: 1.0 + x[:n] - x[n:]  # noqa: E731
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = nv, A.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = cost, lower, upper
    lp.row_lower_, lp.row_upper_ = rl, ru
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = A.indptr, A.indices, A.data
    hess = highspy.HighsHessian()
    Qt = sp.tril(Q, format="csc")  # HiGHS takes the lower triangle, column-wise
    hess.dim_ = nv
    hess.format_ = highspy.HessianFormat.kTriangular
    hess.start_, hess.index_, hess.value_ = Qt.indptr, Qt.indices, Qt.data
    model = highspy.HighsModel()
    model.lp_, model.hessian_ = lp, hess
    h.passModel(model)
    h.run()
    st = h.getModelStatus()
    if st == highspy.HighsModelStatus.kInfeasible:
        return INFEASIBLE, "infeasible", None, None
    if st != highspy.HighsModelStatus.kOptimal:
        return NUMERICAL, h.modelStatusToString(st), None, None
    x = np.asarray(h.getSolution().col_value)
    duals = np.abs(np.asarray(h.getSolution().row_dual))[:K]
    return SUCCESS, "optimal", offset_map(x), duals  # duals are scale-free


# ----------------------------------------------------------------------------- structured dual
#
# Dual of the smoothed program (μ > 0), with multipliers ν >= 0 (K class constraints) and η >= 0
# (the L1 budget, when present): for fixed (ν, η) each weight solves a 1-D problem in closed
# form, u_i = clip(soft(r_i, η)/μ, lo − 1, hi − 1) with reduced cost r = c + Pν, and
#   g(ν, η) = Σ_i [r_i (1 + u_i) − η|u_i| − (μ/2)u_i²] − νᵀb + ηB,
# a convex, piecewise-quadratic function of K (+1) variables whose gradient and generalised
# Hessian cost one pass over P. We minimise it over the box ν, η >= 0 by projected semismooth
# Newton: each step's box-constrained Newton subproblem is solved by jaxopt's BoxCDQP, then an
# Armijo backtracking search along the projected path.


def _primal_from_dual(z, P, c, lo, hi, mu, has_budget):
    """Closed-form primal u = w − 1 at duals z (works on numpy or jax arrays)."""
    xp = jnp if isinstance(P, jax.Array) else np
    nu = z[:-1]
    eta = z[-1] if has_budget else 0.0
    r = c + P @ nu
    s = xp.sign(r) * xp.maximum(xp.abs(r) - eta, 0.0)
    u = xp.clip(s / mu, lo - 1.0, hi - 1.0)
    return u, r, eta


def _dual_value(z, P, c, b, lo, hi, mu, budget, has_budget):
    u, r, eta = _primal_from_dual(z, P, c, lo, hi, mu, has_budget)
    val = jnp.sum(r * (1.0 + u)) - eta * jnp.sum(jnp.abs(u)) - 0.5 * mu * jnp.sum(u * u) - z[:-1] @ b
    return val + (eta * budget if has_budget else 0.0)


def _dual_grad_hess(z, P, c, b, lo, hi, mu, budget, has_budget):
    u, r, eta = _primal_from_dual(z, P, c, lo, hi, mu, has_budget)
    g_nu = P.T @ (1.0 + u) - b
    g_eta = (budget - jnp.sum(jnp.abs(u))) if has_budget else jnp.zeros((), P.dtype)
    s = jnp.sign(r) * jnp.maximum(jnp.abs(r) - eta, 0.0) / mu
    d = ((s > lo - 1.0) & (s < hi - 1.0) & (jnp.abs(r) > eta)).astype(P.dtype) / mu
    # H = Aᵀ diag(d) A with A = [P, −sign(r)] (the η column only with a budget), built blockwise
    # so that no N×(K+1) copy of P is made
    K = P.shape[1]
    H = jnp.zeros((K + 1, K + 1), P.dtype).at[:K, :K].set((P * d[:, None]).T @ P)
    if has_budget:
        sd = jnp.sign(r) * d
        h = -(P.T @ sd)
        H = H.at[:K, K].set(h).at[K, :K].set(h).at[K, K].set(jnp.sum(jnp.sign(r) * sd))
    return jnp.concatenate([g_nu, g_eta[None]]), H


def _newton_stage(z, P, c, b, lo, hi, mu, budget, upper, *, has_budget, max_iter, tol):
    K1 = z.shape[0]
    gscale = 1.0 + jnp.max(jnp.abs(b)) + jnp.max(jnp.abs(c))
    qp = jaxopt.BoxCDQP(maxiter=50, tol=1e-10, implicit_diff=False)
    f = functools.partial(_dual_value, P=P, c=c, b=b, lo=lo, hi=hi, mu=mu, budget=budget,
                          has_budget=has_budget)

    def proj_grad_norm(z, g):
        pg = jnp.where((z <= 0) & (g > 0), 0.0, g)
        pg = jnp.where((z >= upper) & (g < 0), 0.0, pg)
        return jnp.max(jnp.abs(pg))

    def cond(st):
        z, it, err = st[:3]
        return (it < max_iter) & (err > tol * gscale)

    def body(st):
        # (g, H, f0) at z are carried from the previous step: one gradient/Hessian pass and
        # one value pass over P per accepted step, plus the line search's trial values
        z, it, err, g, H, f0 = st
        # under vmap every element runs the body until the last one is done: elements already
        # converged must not burn line-search passes over P
        active = (it < max_iter) & (err > tol * gscale)
        H = H + (1e-10 * (jnp.trace(H) / K1) + 1e-14) * jnp.eye(K1, dtype=H.dtype)
        H = jnp.where(upper > 0, 1.0, 0.0)[:, None] * H + jnp.diag(jnp.where(upper > 0, 0.0, 1.0))
        # warm start: Bertsekas' projected-Newton direction (Newton on the coordinates not held
        # at a bound), clipped to the box; BoxCDQP then settles the box QP in a few sweeps
        free = ~(((z <= 0) & (g > 0)) | ((z >= upper) & (g < 0)))
        Hf = jnp.where(free[:, None] & free[None, :], H, jnp.eye(K1, dtype=H.dtype))
        d0 = jnp.clip(jnp.where(free, -jnp.linalg.solve(Hf, jnp.where(free, g, 0.0)), 0.0),
                      -z, upper - z)
        d = qp.run(d0, params_obj=(H, g), params_ineq=(-z, upper - z)).params

        def ls_cond(s):
            t, k = s
            znew = jnp.clip(z + t * d, 0.0, upper)
            # sufficient decrease, up to rounding in f (else a converged z would burn 40 halvings)
            return active & (f(znew) > f0 + 1e-4 * g @ (znew - z) + 1e-13 * jnp.abs(f0)) & (k < 40)

        t, k = jax.lax.while_loop(ls_cond, lambda s: (s[0] * 0.5, s[1] + 1), (jnp.ones((), z.dtype), 0))
        ok = active & (k < 40)  # no sufficient decrease found: keep z and end the stage
        z = jnp.where(ok, jnp.clip(z + t * d, 0.0, upper), z)
        g, H = _dual_grad_hess(z, P, c, b, lo, hi, mu, budget, has_budget)
        return (z, jnp.where(ok, it + 1, max_iter), jnp.where(active, proj_grad_norm(z, g), err),
                g, H, f(z))

    g0, H0 = _dual_grad_hess(z, P, c, b, lo, hi, mu, budget, has_budget)
    st = jax.lax.while_loop(cond, body, (z, 0, proj_grad_norm(z, g0), g0, H0, f(z)))
    return st[0], st[1], st[2]


@functools.partial(jax.jit, static_argnames=("has_budget", "max_iter", "n_stages"))
def dual_solve(P, c, b, lo, hi, mu_final, budget, *, has_budget: bool, max_iter: int,
               n_stages: int, tol: float = 1e-10, z0=None):
    """The structured dual stage: minimise the (smoothed) dual over ν >= 0 (and η >= 0).

    Continuation: μ goes geometrically from a scale where most weights are interior down to
    `mu_final` in `n_stages` stages (one stage when μ is the QP's own), each warm-started and
    solved by projected semismooth Newton (jaxopt BoxCDQP subproblems). Pure and jittable;
    `vmap` it over b (a population of α) or c (targets).

    Returns:
        (z, w, iterations, projected-gradient error) with z = (ν, η) and w the primal weights
        at the last μ.
    """
    K = P.shape[1]
    z = jnp.zeros(K + 1, P.dtype) if z0 is None else z0
    mu0 = jnp.maximum(jnp.max(jnp.abs(c)) + jnp.max(jnp.abs(P).sum(1)), 1e-30) / jnp.maximum(hi - lo, 1e-12)
    mu0 = jnp.maximum(mu0, mu_final)
    ratio = (mu_final / mu0) ** (1.0 / max(n_stages - 1, 1))
    upper = jnp.full(K + 1, jnp.inf, P.dtype)
    if not has_budget:
        upper = upper.at[-1].set(0.0)

    def stage(carry, j):
        z, its = carry
        mu = mu0 * ratio ** j if n_stages > 1 else mu_final
        z, it, err = _newton_stage(z, P, c, b, lo, hi, mu, budget, upper, has_budget=has_budget,
                                   max_iter=max_iter, tol=tol)
        return (z, its + it), err

    (z, its), errs = jax.lax.scan(stage, (z, 0), jnp.arange(n_stages))
    u, _, _ = _primal_from_dual(z, P, c, lo, hi, mu_final, has_budget)
    return z, 1.0 + u, its, errs[-1]


def _resolve_lp_budget(P, c, b, lo, hi, budget, z, *, max_rounds: int = 8):
    """Exact LP with an L1 budget from approximate duals: fix clear-cut weights at their bounds
    (or at 1), solve the few ambiguous ones exactly (HiGHS on a tiny restricted LP), then
    certify optimality on the full problem with the restricted LP's duals; grow the free set
    until the certificate holds. (Without a budget: `_resolve_lp_batch`.)"""
    n, K = P.shape
    nu, eta = z[:K], z[K]
    scale = max(np.abs(c).max(), np.abs(P).max(), 1e-300)

    def bound_w(r, eta):
        return np.where(r > eta, hi, np.where(r < -eta, lo, 1.0))

    r = c + P @ nu
    margin = np.minimum(np.abs(np.abs(r) - eta), np.abs(r) + eta)
    m = min(n, 4 * (K + 1) + 16)
    free = np.zeros(n, bool)
    free[np.argsort(margin, kind="stable")[:m]] = True
    free |= margin <= 1e-6 * scale
    for _ in range(max_rounds):
        fixed_w = bound_w(r, eta)
        st, msg, w_free, duals = _highs_lp(P, c, b, lo, hi, budget, fixed_mask=~free, fixed_w=fixed_w)
        if st != SUCCESS:
            return st, msg, None, None, free.sum()
        w = fixed_w.copy()
        w[free] = w_free
        nu2, eta2 = duals[:K], duals[K]
        r2 = c + P @ nu2
        # optimal iff every fixed weight sits at the bound its reduced cost asks for
        want = bound_w(r2, eta2)
        tolr = 1e-9 * scale
        ok = (((w == hi) & (r2 >= eta2 - tolr)) | ((w == lo) & (r2 <= -eta2 + tolr))
              | ((w == 1.0) & (np.abs(r2) <= eta2 + tolr)))
        bad = ~free & ~ok
        if not bad.any():
            return SUCCESS, "optimal", w, np.concatenate([nu2, [eta2]]), int(free.sum())
        viol = np.where(bad, np.abs(want - w), 0)
        add = np.argsort(-viol, kind="stable")[: max(int(bad.sum()), m)]
        free[add[viol[add] > 0]] = True
        r, eta = r2, eta2
    return NUMERICAL, "active-set resolution did not settle", None, None, int(free.sum())


def _farkas_bound(P, b, nu, lo, hi):
    """max over the box of λᵀ(Pᵀw − b) for λ = ν/Σν, minus a rounding margin (None if ν = 0).

    For any w in the box some class constraint is violated by at least −(this value): when it
    is below −feas_tol no w can pass the float64 re-check (Farkas), and HiGHS is not needed.
    """
    nu = np.maximum(np.asarray(nu, np.float64), 0.0)
    if not np.all(np.isfinite(nu)) or nu.sum() <= 0:
        return None
    lam = nu / nu.sum()
    g = P @ lam
    v = float(np.sum(np.maximum(lo * g, hi * g)) - lam @ b)
    margin = 1e-12 * float(max(abs(lo), abs(hi)) * np.abs(g).sum() + abs(lam @ b))
    return v + margin


def _resolve_lp_batch(P, C, B, LO, HI, Z, *, max_rounds: int = 8) -> dict:
    """Exact LP (no budget) from approximate duals, for several programs at once: fix
    clear-cut weights at their bounds, solve the few ambiguous ones exactly on a restricted LP,
    certify optimality on the full problem with its duals, and grow the free set until the
    certificate holds (`_resolve_lp_budget` is the same with an L1 budget, one program).

    Every round's restricted LPs go to HiGHS as one block-diagonal LP (the blocks are
    independent, so each block's optimum is its own LP's) and the optimality certificates on the
    full problems are one matrix product. Each block is elastic (Σ_k s_k at a large cost, with
    Pᵀw + s >= b), so a block whose fixed weights leave its restricted LP infeasible cannot
    sink the others: its free set grows and it goes again. Returns {row: (status, message, w,
    duals, n_free)} for the rows it settled; the caller treats any other row as `_UNSETTLED`
    (and hands it to HiGHS whole).
    """
    import scipy.sparse

    n, K = P.shape
    M = C.shape[0]
    R = C + Z[:, :K] @ P.T
    scale = np.maximum(np.abs(C).max(1), np.abs(P).max())
    m = min(n, 4 * (K + 1) + 16)
    order = np.argsort(np.abs(R), axis=1, kind="stable")
    free = np.zeros((M, n), bool)
    np.put_along_axis(free, order[:, :m], True, axis=1)
    free |= np.abs(R) <= 1e-6 * scale[:, None]
    penalty = 1e6  # per unit of (scaled) constraint violation; duals are O(1) in these units
    out: dict = {}
    todo = list(range(M))
    for _ in range(max_rounds):
        if not todo:
            break
        fixed_w = np.where(R[todo] > 0, HI[todo, None], LO[todo, None])
        blocks, costs, rhs, bnds, sizes = [], [], [], [], []
        for j, i in enumerate(todo):
            f = free[i]
            Pf = P[f]
            s = max(float(np.abs(Pf).max(initial=0.0)), 1e-300)  # as `_highs_lp` scales
            blocks.append(scipy.sparse.hstack([scipy.sparse.csr_matrix(-Pf.T / s),
                                               -scipy.sparse.identity(K)]))
            costs += [-C[i][f] / s, np.full(K, penalty)]
            rhs.append(-(B[i] - P[~f].T @ fixed_w[j][~f]) / s)
            bnds += [(LO[i], HI[i])] * int(f.sum()) + [(0.0, None)] * K
            sizes += [int(f.sum()), K]
        res = scipy.optimize.linprog(np.concatenate(costs), A_ub=scipy.sparse.block_diag(blocks, format="csr"),
                                     b_ub=np.concatenate(rhs), bounds=bnds, method="highs",
                                     options=_HIGHS_OPTIONS)
        if res.status != SUCCESS:
            return out
        parts = np.split(res.x, np.cumsum(sizes)[:-1])
        NU = np.maximum(-np.asarray(res.ineqlin.marginals), 0).reshape(len(todo), K)
        R2 = C[todo] + NU @ P.T
        W = fixed_w.copy()
        for j, i in enumerate(todo):
            W[j, free[i]] = parts[2 * j]
        tolr = 1e-9 * scale[todo, None]
        ok = ((W == HI[todo, None]) & (R2 >= -tolr)) | ((W == LO[todo, None]) & (R2 <= tolr))
        bad = ~free[todo] & ~ok
        nxt = []
        for j, i in enumerate(todo):
            if np.any(parts[2 * j + 1] > 0):  # restricted LP infeasible: free the next-closest
                nf = int(free[i].sum())
                free[i, order[i, : min(n, nf + 2 * m)]] = True
                nxt.append(i)
                continue
            if not bad[j].any():
                out[i] = (SUCCESS, "optimal", W[j], np.concatenate([NU[j], [0.0]]), int(free[i].sum()))
                continue
            want = np.where(R2[j] > 0, HI[i], LO[i])
            viol = np.where(bad[j], np.abs(want - W[j]), 0)
            add = np.argsort(-viol, kind="stable")[: max(int(bad[j].sum()), m)]
            free[i, add[viol[add] > 0]] = True
            R[i] = R2[j]
            order[i] = np.argsort(np.abs(R[i]), kind="stable")
            nxt.append(i)
        todo = nxt
    return out


_UNSETTLED = (NUMERICAL, "the restricted LPs did not settle", None, None, 0)


def solve_reweighting(P, targets: Sequence[int] | None, alpha, config: ReweightConfig = ReweightConfig(),
                      *, class_weights=None, **overrides) -> ReweightResult:
    """Solve the reweighting program of DESIGN §5 for one threshold vector α.

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
    P, c, b = _problem(P, targets, alpha, config, class_weights)
    notes: list[str] = []
    if config.solver == "highs":
        return _highs_solve(P, c, b, config, "highs", notes)
    return _solve_dual_one(P, c, b, config, notes)


def _solve_dual_one(P, c, b, config, notes):
    z, _, _ = _run_dual(P, c[None], b[None], config)
    z = np.asarray(z)[0]
    return _finish_dual(P, c, b, z, config, notes, _dual_verdict(P, b, z, config))


def _batch_mode(mode: str) -> str:
    _checks.check_choice(mode, "batch", ("auto", "vmap", "map"))
    if mode == "auto":  # lock-step vmap pays for the slowest member; on CPU a compiled loop wins
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return mode


def _run_dual(P, C, B, config, mode: str = "vmap", bounds=None):
    """Dual stage over rows of C (targets) and B (thresholds), in float64.

    P, C, B and μ are divided by max|P| first (ν is scale-free), so tolerances mean the same
    for any magnitude of influence. `bounds` = (LO, HI) arrays give each row its own box.
    """
    M = C.shape[0]
    if bounds is None:
        lo, hi = config.bounds
        LO, HI = np.full(M, lo), np.full(M, hi)
    else:
        LO, HI = (np.asarray(a, np.float64) for a in bounds)
    has_budget = config.budget is not None
    scale = max(float(np.abs(P).max()), 1e-300)
    # the LP's duals only need to be good enough to pick the ambiguous weights; the exact
    # resolution and its optimality certificate do the rest
    # (scale-free μ: P is divided by max|P|). Measured on bench/bench_pareto.py's problems:
    # at K = 10 (N = 1e5, 32 thresholds) a final μ of 1e-6 in 7 stages, 1e-4 in 3 and 1e-3 in 2
    # all resolve exactly with the same 60 ambiguous weights (1e-2 leaves ~30,000), and 1e-4 in
    # 3 stages is 2.2× faster than 1e-6 in 7; at K = 100, 1e-4 leaves 26,000 ambiguous weights
    # (the restricted LP then costs more than the continuation saves), so large K keeps 1e-6.
    K = P.shape[1]
    mu_final = config.mu / scale if config.mu > 0 else (1e-4 if K <= 16 else 1e-6)
    n_stages = 1 if config.mu > 0 else (3 if K <= 16 else 7)
    budget = float(config.budget or 0.0)
    with jax.enable_x64(True):
        Pj = jnp.asarray(P / scale, jnp.float64)
        # LP continuation stages only steer the duals (Newton takes ~3 steps where it settles);
        # a stage that has not settled by 25 steps hands over to the next, smaller μ
        max_iter = config.max_iter if config.mu > 0 else min(config.max_iter, 25)
        z, w, its, err = _dual_batch(Pj, jnp.asarray(C / scale, jnp.float64),
                                     jnp.asarray(B / scale, jnp.float64), jnp.asarray(LO),
                                     jnp.asarray(HI), mu_final, budget,
                                     has_budget=has_budget, max_iter=max_iter, n_stages=n_stages,
                                     tol=config.rtol, mode=mode)
    z = np.array(z)
    z[:, -1] *= scale  # η is in units of P (ν is scale-free)
    return z, np.asarray(w), (np.asarray(its), np.asarray(err))


@functools.partial(jax.jit, static_argnames=("has_budget", "max_iter", "n_stages", "tol", "mode"))
def _dual_batch(P, C, B, LO, HI, mu_final, budget, *, has_budget, max_iter, n_stages, tol, mode):
    def one(c, b, lo, hi):
        return dual_solve(P, c, b, lo, hi, mu_final, budget, has_budget=has_budget,
                          max_iter=max_iter, n_stages=n_stages, tol=tol)

    if mode == "vmap":
        return jax.vmap(one)(C, B, LO, HI)
    return jax.lax.map(lambda a: one(*a), (C, B, LO, HI))


def _certified_infeasible(P, b, z, config) -> float | None:
    """The Farkas bound of `_farkas_bound` when it proves the program infeasible (no budget)."""
    if config.budget is not None:
        return None
    lo, hi = config.bounds
    v = _farkas_bound(P, b, z[:P.shape[1]], lo, hi)
    return v if v is not None and v < -config.feas_tol else None


def _dual_verdict(P, b, z, config):
    """What the duals decide on their own: ("infeasible", Farkas bound), ("diverged", None), or
    None (the program goes on to its primal)."""
    finite = np.all(np.isfinite(z))
    v = _certified_infeasible(P, b, z, config) if finite else None
    if v is not None:
        return "infeasible", v
    if not finite or np.abs(z[:P.shape[1]]).max() > 1e8:
        return "diverged", None
    return None


def _finish_dual(P, c, b, z, config, notes, verdict, resolved=None):
    """The primal of duals z: a verdict from `_dual_verdict`, else the QP's closed form or the
    LP's exact resolution (`resolved`, if the batch already did it), then the float64 re-check."""
    lo, hi = config.bounds
    if verdict is not None and verdict[0] == "infeasible":
        notes.append(f"the duals are a Farkas certificate: every w in the box violates a class "
                     f"constraint by at least {-verdict[1]:.3g}")
        return _finish(P, c, b, None, config, "dual", notes, z, INFEASIBLE,
                       "The problem is infeasible (Farkas certificate from the duals).")
    if verdict is not None:
        notes.append("dual diverged (a sign of infeasibility); HiGHS decides")
        return _fallback(P, c, b, config, notes)
    if config.mu > 0:
        u, _, _ = _primal_from_dual(z, P, c, lo, hi, config.mu, config.budget is not None)
        w, duals = 1.0 + np.asarray(u, np.float64), z
    else:
        if resolved is None:
            resolved = (_resolve_lp_batch(P, c[None], b[None], np.array([lo]), np.array([hi]),
                                          z[None]).get(0, _UNSETTLED)
                        if config.budget is None else _resolve_lp_budget(P, c, b, lo, hi, config.budget, z))
        st, msg, w, duals, n_free = resolved
        if st != SUCCESS:
            notes.append(f"exact resolution failed ({msg}); HiGHS decides")
            return _fallback(P, c, b, config, notes)
        notes.append(f"resolved {n_free} ambiguous weights exactly")
    viol = check_feasibility(P, w, b, config)
    if viol > config.feas_tol:
        notes.append(f"float64 re-check found violation {viol:.3g} > {config.feas_tol:g}; HiGHS repairs")
        return _fallback(P, c, b, config, notes)
    return _finish(P, c, b, w, config, "dual", notes, duals)


def _fallback(P, c, b, config, notes):
    return _highs_solve(P, c, b, config, "dual→highs", notes)


def _highs_solve(P, c, b, config, label, notes):
    """The whole program by HiGHS (LP, or QP when μ > 0), reported under `label`."""
    lo, hi = config.bounds
    if config.mu > 0:
        st, msg, w, duals = _highs_qp(P, c, b, lo, hi, config.mu, config.budget)
    else:
        st, msg, w, duals = _highs_lp(P, c, b, lo, hi, config.budget)
    if st != SUCCESS:
        return _finish(P, c, b, None, config, label, notes, None, st, STATUS_MESSAGES.get(st, msg))
    return _finish(P, c, b, w, config, label, notes, duals)


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
    mode = _batch_mode(batch)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    alphas = np.atleast_2d(np.asarray(alphas, np.float64))
    betas = ([None] * len(alphas) if class_weights is None
             else np.broadcast_to(np.asarray(class_weights, np.float64), alphas.shape))
    probs = [_problem(P, targets, a, config, cw) for a, cw in zip(alphas, betas)]
    P64 = probs[0][0]
    C = np.stack([p[1] for p in probs])
    B = np.stack([p[2] for p in probs])
    cfgs = [config] * len(alphas) if rhos is None else \
        [dataclasses.replace(config, rho=float(r)) for r in np.broadcast_to(rhos, (len(alphas),))]
    if config.solver == "highs":
        return [solve_reweighting(P64, targets, a, c, class_weights=cw)
                for a, c, cw in zip(alphas, cfgs, betas)]
    bounds = np.array([c.bounds for c in cfgs]).T
    Z, _, _ = _run_dual(P64, C, B, config, mode, bounds=bounds)
    verdicts = [_dual_verdict(P64, B[i], Z[i], cfgs[i]) for i in range(len(alphas))]
    resolved = {}
    rows = [i for i, v in enumerate(verdicts) if v is None]
    if config.mu == 0 and config.budget is None and rows:
        # the rows whose LP is resolved exactly: all at once, one HiGHS call per round
        got = _resolve_lp_batch(P64, C[rows], B[rows], bounds[0, rows], bounds[1, rows], Z[rows])
        resolved = {i: got.get(j, _UNSETTLED) for j, i in enumerate(rows)}
    return [_finish_dual(P64, C[i], B[i], Z[i], cfgs[i], [], verdicts[i], resolved.get(i))
            for i in range(len(alphas))]
