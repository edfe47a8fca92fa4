"""An exact bounded-variable dual simplex in JAX (``docs/method.md``, "The exact finish").

    minimise cᵀx  subject to  A x = b,  l <= x <= u      (A: m×n, l finite, u may be +inf)

m is small (the K class rows, one more for a budget) and n is the restricted program's columns
(a few hundred) or, for the ceiling test, the whole training set. Each iteration refactors the
m×m basis from scratch (no drift from product-form updates), prices the rows by exact dual
steepest edge (the rows of B⁻¹ are at hand), and takes a long dual step: the bound-flipping
ratio test walks the breakpoints of the dual objective along the chosen edge, flipping boxed
columns while the slope stays positive (limited to the `n_breaks` nearest breakpoints, which
is still a valid, shorter dual step). Everything is a `lax.while_loop` over static shapes, so it
jits and vmaps; the status comes back as an array.

The start must be dual feasible: `basis0` names m columns with an invertible B, and every
nonbasic column without an upper bound must have a reduced cost >= 0 there (the callers start
from slack/surplus bases where this holds by construction). Boxed columns are placed at the
bound their reduced cost asks for, so for them any basis is dual feasible.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from ..results import Status
from . import select

# plain ints on the device (JAX takes an int, not an IntEnum member, as a constant)
SUCCESS, INFEASIBLE = int(Status.SUCCESS), int(Status.INFEASIBLE)
ITERATION_LIMIT, NUMERICAL = int(Status.ITERATION_LIMIT), int(Status.NUMERICAL)

RUNNING = -1


class SimplexResult(NamedTuple):
    """x (n,), row duals y (m,) with reduced costs d = c − Aᵀy, status (linprog codes, an
    int32 array), iterations, the ray ρ (m,) of the last pivot row (a Farkas ray when the
    status is infeasible: ρᵀA x stays on one side of ρᵀb for every x in the box) and the final
    basis (m,) (a warm start for a larger problem with the same rows)."""

    x: jax.Array
    y: jax.Array
    d: jax.Array
    status: jax.Array
    iterations: jax.Array
    ray: jax.Array
    basis: jax.Array


def tolerances(dtype):
    """(primal, dual) feasibility tolerances, relative to the problem's scale, for this dtype."""
    return (1e-10, 1e-10) if jnp.finfo(dtype).bits == 64 else (2e-5, 2e-5)


def _ratio_test(alpha, d, isb, at_upper, width, delta, above, k_br):
    """The bound-flipping ratio test along pivot row α (leaving variable `above` its upper bound
    or below its lower one by `delta` > 0): (entering column, columns to flip, dual unbounded).

    Moving the duals by θ along the row changes d_j by −θα_j (signs folded into a_s); column j
    has a breakpoint where its d_j reaches 0, and crossing it lowers the dual slope by
    width_j·|α_j|. Walk the `k_br` nearest breakpoints until the slope, starting at `delta`,
    would turn negative: that column enters, the ones passed flip to their other bound.
    """
    n = alpha.shape[0]
    a_s = jnp.where(above, alpha, -alpha)
    piv = 1e-9 * jnp.maximum(1.0, jnp.max(jnp.abs(alpha)))
    elig = ~isb & ((~at_upper & (a_s > piv)) | (at_upper & (a_s < -piv)))
    bp = jnp.where(elig, jnp.maximum(d / jnp.where(elig, a_s, 1.0), 0.0), jnp.inf)
    # the k_br nearest breakpoints, ties broken towards the larger pivot
    key = bp - 1e-14 * jnp.abs(alpha) / (1.0 + jnp.max(jnp.abs(alpha)))
    order = select.smallest(key, k_br)  # (= top_k(−key): without sorting all n when n is large)
    drop = jnp.where(elig[order], width[order] * jnp.abs(alpha[order]), 0.0)
    cum = jnp.cumsum(drop)
    n_elig = jnp.sum(elig[order])
    reach = (cum >= delta) & elig[order]
    pos = jnp.where(jnp.any(reach), jnp.argmax(reach), n_elig - 1)
    # no breakpoint turns the slope, and every eligible one was seen: the dual is unbounded
    unbounded = ~jnp.any(reach) & ((n_elig < k_br) | (k_br == n))
    q = order[jnp.maximum(pos, 0)]
    flip = jnp.zeros(n, bool).at[order].set(jnp.arange(k_br) < pos) & elig
    return q, flip, unbounded


def dual_simplex(A, b, c, l, u, basis0, *, max_iter: int, n_breaks: int = 128, ptol=None, dtol=None,
    at_upper0=None) -> SimplexResult:
    """Solve min cᵀx s.t. Ax = b, l <= x <= u from the dual-feasible basis `basis0`.

    Args:
        A, b, c, l, u: the problem (dense; u may hold +inf, l must be finite).
        basis0: int (m,) column indices of the starting basis.
        max_iter: iteration cap (static); reaching it gives status 1.
        n_breaks: how many breakpoints the ratio test sorts (static).
        ptol, dtol: absolute primal / dual tolerances (default: `tolerances` × the data's scale).
        at_upper0: optional starting bound positions of the boxed columns where d = 0.
    """
    m, n = A.shape
    dt = A.dtype
    p_rel, d_rel = tolerances(dt)
    if ptol is None:
        ptol = p_rel * (1.0 + jnp.max(jnp.abs(b)))
    if dtol is None:
        dtol = d_rel * (1.0 + jnp.max(jnp.where(jnp.abs(c) < 1e5, jnp.abs(c), 0.0)))
    boxed = jnp.isfinite(u)
    u_fin = jnp.where(boxed, u, l)
    width = jnp.where(boxed, u - l, jnp.inf)
    k_br = min(n_breaks, n)
    eye = jnp.eye(m, dtype=dt)

    def factor(basis, at_upper):
        lu = jsl.lu_factor(A[:, basis])
        isb = jnp.zeros(n, bool).at[basis].set(True)
        y = jsl.lu_solve(lu, c[basis], trans=1)
        d = jnp.where(isb, 0.0, c - y @ A)  # (not A.T @ y: XLA:CPU copies the transpose)
        # boxed nonbasic columns sit at the bound their reduced cost asks for (ties keep theirs)
        at_upper = ~isb & boxed & jnp.where(d < -dtol, True, jnp.where(d > dtol, False, at_upper))
        xN = jnp.where(isb, 0.0, jnp.where(at_upper, u_fin, l))
        xB = jsl.lu_solve(lu, b - A @ xN)
        return lu, isb, y, d, at_upper, xN, xB

    def body(st):
        basis, at_upper, it, status, _ = st
        lu, isb, y, d, at_upper, xN, xB = factor(basis, at_upper)
        lB, uB = l[basis], u[basis]
        infeas = jnp.maximum(lB - xB, xB - uB)
        binv = jsl.lu_solve(lu, eye)  # B⁻¹; its rows are the pivot rows ρ_r = B⁻ᵀe_r
        score = jnp.where(infeas > ptol, infeas**2 / jnp.sum(binv**2, axis=1), -1.0)
        r = jnp.argmax(score)
        optimal = score[r] < 0
        above = xB[r] > uB[r]
        delta = jnp.where(above, xB[r] - uB[r], lB[r] - xB[r])
        rho = binv[r]
        alpha = rho @ A
        q, flip, unbounded = _ratio_test(alpha, d, isb, at_upper, width, delta, above, k_br)
        leaving = basis[r]
        new_upper = jnp.where(flip, ~at_upper, at_upper).at[leaving].set(above & boxed[leaving])
        new_basis = basis.at[r].set(q)
        bad = ~jnp.all(jnp.isfinite(xB)) | ~jnp.all(jnp.isfinite(y))
        status = jnp.where(
            bad, NUMERICAL, jnp.where(optimal, SUCCESS, jnp.where(unbounded, INFEASIBLE, RUNNING))
        ).astype(jnp.int32)
        go = status == RUNNING
        return (jnp.where(go, new_basis, basis), jnp.where(go, new_upper, at_upper),
            it + go.astype(jnp.int32), status, jnp.where(above, rho, -rho))

    def cond(st):
        return (st[3] == RUNNING) & (st[2] < max_iter)

    at_upper = jnp.zeros(n, bool) if at_upper0 is None else at_upper0
    st = (basis0.astype(jnp.int32), at_upper, jnp.zeros((), jnp.int32),
        jnp.full((), RUNNING, jnp.int32), jnp.zeros(m, dt))
    basis, at_upper, it, status, ray = jax.lax.while_loop(cond, body, st)
    _, isb, y, d, at_upper, xN, xB = factor(basis, at_upper)
    status = jnp.where(status == RUNNING, ITERATION_LIMIT, status)
    x = xN.at[basis].set(jnp.clip(xB, l[basis], u[basis]))
    return SimplexResult(x, y, d, status.astype(jnp.int32), it, ray, basis)
