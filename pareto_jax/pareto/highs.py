"""HiGHS (through scipy and highspy): the exact reference every JAX solver is tested against.

These are the whole programs solved by HiGHS on the host: `lp` (the reweighting LP, with an
optional L1 budget), `qp` (the proximal variant, through highspy), `ceiling_lp` (the exact
ceiling test). Every matrix is divided by max|P| first: HiGHS's absolute feasibility tolerance
would otherwise accept violations of 1e-9 on influence matrices of size ~1e-6 (found by the
property tests). Status codes follow `scipy.optimize.linprog` (`results.Status`).
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

from ..results import Status

SUCCESS, INFEASIBLE, NUMERICAL = int(Status.SUCCESS), int(Status.INFEASIBLE), int(Status.NUMERICAL)

OPTIONS = dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10)


def linprog(cost, **kw):
    """`scipy.optimize.linprog` with HiGHS and this module's tight tolerances."""
    return scipy.optimize.linprog(cost, method="highs", options=OPTIONS, **kw)


def lp(P, c, b, lo, hi, budget):
    """max cᵀw s.t. Pᵀw >= b, lo <= w <= hi (and Σ|w − 1| <= budget): (status, message, w, duals).

    The class duals ν are scale-free; the budget's η is in units of P.
    """
    n, K = P.shape
    s = max(float(np.abs(P).max(initial=0.0)), 1e-300)
    P, c, b = P / s, c / s, b / s
    if budget is None:
        res = linprog(-c, A_ub=-P.T, b_ub=-b, bounds=[(lo, hi)] * n)
        w = None if res.x is None else res.x
        duals = None if res.status != 0 else np.maximum(-np.asarray(res.ineqlin.marginals), 0)
        return res.status, res.message, w, duals
    # w = 1 + a − e with a ∈ [0, hi − 1], e ∈ [0, 1 − lo]; Σ (a + e) <= budget
    cost = np.concatenate([-c, c])
    A = np.vstack([np.hstack([-P.T, P.T]), np.ones((1, 2 * n))])
    rhs = np.concatenate([-(b - P.sum(0)), [budget]])
    # (when w_max < 1 every weight must move down: e >= 1 − hi)
    bounds = [(0.0, max(hi - 1.0, 0.0))] * n + [(max(1.0 - hi, 0.0), max(1.0 - lo, 0.0))] * n
    res = linprog(cost, A_ub=A, b_ub=rhs, bounds=bounds)
    if res.x is None:
        return res.status, res.message, None, None
    w = 1.0 + res.x[:n] - res.x[n:]
    duals = np.maximum(-np.asarray(res.ineqlin.marginals), 0) if res.status == 0 else None
    if duals is not None:
        duals[K] *= s  # the budget row is not scaled, the objective is
    return res.status, res.message, w, duals


def _qp_model(P, c, b, lo, hi, mu, budget, highspy):
    """The HighsModel of min −cᵀw + (μ/2)‖w − 1‖² and the map from its columns to w."""
    import scipy.sparse as sp

    n, K = P.shape
    if budget is None:
        nv = n
        cost = -c - mu * np.ones(n)
        lower, upper = np.full(n, lo), np.full(n, hi)
        A = sp.csc_matrix(P.T)
        rl, ru = b.copy(), np.full(K, highspy.kHighsInf)
        Q = sp.identity(n, format="csc") * mu
        to_w = lambda x: x  # noqa: E731
    else:
        nv = 2 * n  # u = a − e
        cost = np.concatenate([-c, c])
        lower = np.concatenate(
            [np.zeros(n), np.full(n, max(1 - hi, 0))]
        )  # (w_max < 1: e >= 1 − hi)
        upper = np.concatenate([np.full(n, max(hi - 1, 0)), np.full(n, max(1 - lo, 0))])
        A = sp.csc_matrix(np.vstack([np.hstack([P.T, -P.T]), np.ones((1, nv))]))
        rl = np.concatenate([b - P.sum(0), [-highspy.kHighsInf]])
        ru = np.concatenate([np.full(K, highspy.kHighsInf), [budget]])
        I = sp.identity(n, format="csc")
        Q = sp.bmat([[I, -I], [-I, I]], format="csc") * mu
        to_w = lambda x: 1.0 + x[:n] - x[n:]  # noqa: E731
    lp_ = highspy.HighsLp()
    lp_.num_col_, lp_.num_row_ = nv, A.shape[0]
    lp_.col_cost_, lp_.col_lower_, lp_.col_upper_ = cost, lower, upper
    lp_.row_lower_, lp_.row_upper_ = rl, ru
    lp_.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp_.a_matrix_.start_, lp_.a_matrix_.index_, lp_.a_matrix_.value_ = A.indptr, A.indices, A.data
    hess = highspy.HighsHessian()
    Qt = sp.tril(Q, format="csc")  # HiGHS takes the lower triangle, column-wise
    hess.dim_ = nv
    hess.format_ = highspy.HessianFormat.kTriangular
    hess.start_, hess.index_, hess.value_ = Qt.indptr, Qt.indices, Qt.data
    model = highspy.HighsModel()
    model.lp_, model.hessian_ = lp_, hess
    return model, to_w


def qp(P, c, b, lo, hi, mu, budget):
    """Exact QP by HiGHS (highspy): min −cᵀw + (μ/2)‖w − 1‖² subject to the program."""
    try:
        import highspy
    except ImportError as e:  # pragma: no cover - depends on extras
        raise ImportError("the HiGHS QP reference needs highspy: pip install highspy") from e

    K = P.shape[1]
    scale = max(float(np.abs(P).max()), 1e-300)  # HiGHS's QP solver stalls on badly scaled data
    model, to_w = _qp_model(P / scale, c / scale, b / scale, lo, hi, mu / scale, budget, highspy)
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("primal_feasibility_tolerance", 1e-10)
    h.setOptionValue("dual_feasibility_tolerance", 1e-10)
    h.setOptionValue("time_limit", 120.0)
    h.passModel(model)
    h.run()
    st = h.getModelStatus()
    if st == highspy.HighsModelStatus.kInfeasible:
        return INFEASIBLE, "infeasible", None, None
    if st != highspy.HighsModelStatus.kOptimal:
        return NUMERICAL, h.modelStatusToString(st), None, None
    x = np.asarray(h.getSolution().col_value)
    duals = np.abs(np.asarray(h.getSolution().row_dual))[:K]
    return SUCCESS, "optimal", to_w(x), duals  # duals are scale-free


def ceiling_lp(Ps):
    """max t s.t. Psᵀd >= t·1, −1 <= d <= 1 for a P already divided by its scale:
    (scipy result, d, t, λ) with λ >= 0, Σλ = 1 the dual certificate."""
    n, K = Ps.shape
    cost = np.zeros(n + 1)
    cost[-1] = -1.0
    A_ub = np.hstack([-Ps.T, np.ones((K, 1))])
    bounds = [(-1.0, 1.0)] * n + [(None, None)]
    res = linprog(cost, A_ub=A_ub, b_ub=np.zeros(K), bounds=bounds)
    if res.status != 0:
        return res, None, None, None
    lam = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
    lam = lam / lam.sum() if lam.sum() > 0 else np.full(K, 1.0 / K)
    return res, res.x[:n], float(res.x[-1]), lam
