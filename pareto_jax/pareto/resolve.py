"""The LP's exact primal from approximate duals: one active-set resolution for every variant.

From duals z = (ν, η) each weight's reduced cost r_i = c_i + (Pν)_i says where it belongs: at
its upper bound if r_i > η, at its lower bound if r_i < −η, at 1 otherwise (η = 0 without an L1
budget). `resolve_lp` fixes the clear-cut weights there, solves the few ambiguous ones exactly on
a small restricted LP (HiGHS), certifies optimality on the full problem with the restricted LP's
duals (every fixed weight sits where its new reduced cost asks), and grows the free set until
the certificate holds.

Several programs are resolved at once: each round's restricted LPs go to HiGHS as one
block-diagonal LP (the blocks are independent, so each block's optimum is its own LP's), and the
certificates are one matrix product. Each block is elastic (Pᵀw + s >= b with slacks s at a
large cost), so a block whose fixed weights leave its restricted LP infeasible cannot sink the
others: its free set grows and it goes again.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse

from . import highs

_PENALTY = 1e6  # per unit of (scaled) constraint violation; duals are O(1) in these units


class Resolved(NamedTuple):
    """An exactly resolved program: w, duals (ν, η) and how many weights were free."""

    w: np.ndarray
    duals: np.ndarray
    n_free: int


def _bound_weights(R, ETA, LO, HI):
    return np.where(R > ETA[:, None], HI[:, None], np.where(R < -ETA[:, None], LO[:, None], 1.0))


def _block(P, c, b, lo, hi, free, fixed_w, budget):
    """One elastic restricted LP: (A block, cost, rhs, bounds, column count)."""
    K = P.shape[1]
    Pf = P[free]
    nf = int(free.sum())
    s = max(float(np.abs(Pf).max(initial=0.0)), 1e-300)
    rhs = -(b - P[~free].T @ fixed_w[~free]) / s
    slack = -scipy.sparse.identity(K)
    if budget is None:
        A = scipy.sparse.hstack([scipy.sparse.csr_matrix(-Pf.T / s), slack])
        return A, [-c[free] / s, np.full(K, _PENALTY)], [rhs], [(lo, hi)] * nf + [(0.0, None)] * K, nf + K
    # w = 1 + a − e with a ∈ [0, hi − 1], e ∈ [0, 1 − lo]; Σ (a + e) <= what the fixed ones
    # leave, elastic too (the fixed weights alone may spend more than the budget)
    slack = -scipy.sparse.identity(K + 1)
    A = scipy.sparse.hstack([scipy.sparse.vstack([
        scipy.sparse.csr_matrix(np.hstack([-Pf.T, Pf.T]) / s),
        scipy.sparse.csr_matrix(np.ones((1, 2 * nf)))]), slack])
    rhs = [rhs + Pf.sum(0) / s, [budget - np.abs(fixed_w[~free] - 1).sum()]]
    bounds = [(0.0, max(hi - 1.0, 0.0))] * nf + [(0.0, max(1.0 - lo, 0.0))] * nf + [(0.0, None)] * (K + 1)
    return A, [-c[free] / s, c[free] / s, np.full(K + 1, _PENALTY)], rhs, bounds, 2 * nf + K + 1


def _restricted(P, C, B, LO, HI, free, fixed_w, budget):
    """All blocks as one HiGHS LP; per block (w, ν, η, infeasible) or None if HiGHS failed."""
    K = P.shape[1]
    blocks = [_block(P, C[j], B[j], LO[j], HI[j], free[j], fixed_w[j], budget) for j in range(len(C))]
    res = highs.linprog(np.concatenate([x for bl in blocks for x in bl[1]]),
                        A_ub=scipy.sparse.block_diag([bl[0] for bl in blocks], format="csr"),
                        b_ub=np.concatenate([x for bl in blocks for x in bl[2]]),
                        bounds=[x for bl in blocks for x in bl[3]])
    if res.status != highs.SUCCESS:
        return None
    cols = np.split(res.x, np.cumsum([bl[4] for bl in blocks])[:-1])
    marg = np.maximum(-np.asarray(res.ineqlin.marginals), 0)
    rows = np.split(marg, np.cumsum([K + (budget is not None)] * len(blocks))[:-1])
    out = []
    for j, (x, dual) in enumerate(zip(cols, rows)):
        f = free[j]
        nf = int(f.sum())
        w = fixed_w[j].copy()
        w[f] = x[:nf] if budget is None else 1.0 + x[:nf] - x[nf:2 * nf]
        s = max(float(np.abs(P[f]).max(initial=0.0)), 1e-300)
        eta = 0.0 if budget is None else dual[K] * s  # the budget row is not scaled, the objective is
        n_slack = K + (budget is not None)
        out.append((w, dual[:K], eta, bool(np.any(x[-n_slack:] > 0))))
    return out


def resolve_lp(P, C, B, LO, HI, Z, *, budget: float | None = None, max_rounds: int = 8) -> dict:
    """Exact LPs from approximate duals Z (M, K + 1), for M programs at once (see the module
    docstring). Rows of C, B, LO, HI are the programs' objectives, thresholds and bounds.

    Returns:
        {row: `Resolved`} for the rows it settled; a row missing from the result did not
        settle in `max_rounds` rounds (or HiGHS failed), and the caller solves it whole.
    """
    n, K = P.shape
    R = C + Z[:, :K] @ P.T
    ETA = Z[:, K] if budget is not None else np.zeros(len(C))
    scale = np.maximum(np.abs(C).max(1), np.abs(P).max())
    m = min(n, 4 * (K + 1) + 16)
    margin = np.minimum(np.abs(np.abs(R) - ETA[:, None]), np.abs(R) + ETA[:, None])
    order = np.argsort(margin, axis=1, kind="stable")
    free = np.zeros(R.shape, bool)
    np.put_along_axis(free, order[:, :m], True, axis=1)
    free |= margin <= 1e-6 * scale[:, None]
    out: dict = {}
    todo = list(range(len(C)))
    for _ in range(max_rounds):
        if not todo:
            break
        fixed_w = _bound_weights(R[todo], ETA[todo], LO[todo], HI[todo])
        got = _restricted(P, C[todo], B[todo], LO[todo], HI[todo], free[todo], fixed_w, budget)
        if got is None:
            return out
        nxt = []
        for j, i in enumerate(todo):
            w, nu, eta, infeasible = got[j]
            if infeasible:  # free the next-closest weights and try again
                free[i, order[i, : min(n, int(free[i].sum()) + 2 * m)]] = True
                nxt.append(i)
                continue
            r2 = C[i] + P @ nu
            bad = ~free[i] & ~_certified(w, r2, eta, LO[i], HI[i], 1e-9 * scale[i])
            if not bad.any():
                out[i] = Resolved(w, np.concatenate([nu, [eta]]), int(free[i].sum()))
                continue
            want = _bound_weights(r2[None], np.array([eta]), LO[i:i + 1], HI[i:i + 1])[0]
            viol = np.where(bad, np.abs(want - w), 0)
            add = np.argsort(-viol, kind="stable")[: max(int(bad.sum()), m)]
            free[i, add[viol[add] > 0]] = True
            R[i], ETA[i] = r2, eta
            order[i] = np.argsort(np.abs(np.abs(r2) - eta), kind="stable")
            nxt.append(i)
        todo = nxt
    return out


def _certified(w, r, eta, lo, hi, tol):
    """Each weight sits where its reduced cost asks: at hi if r >= η, lo if r <= −η, 1 between."""
    return (((w == hi) & (r >= eta - tol)) | ((w == lo) & (r <= -eta + tol))
            | ((w == 1.0) & (np.abs(r) <= eta + tol)))
