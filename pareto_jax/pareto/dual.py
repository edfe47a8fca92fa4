"""The structured dual solver of the reweighting program (K ≪ N coupling constraints).

Dual of the smoothed program (μ > 0), with multipliers ν >= 0 (K class constraints) and η >= 0
(the L1 budget, when present): for fixed (ν, η) each weight solves a 1-D problem in closed form,
u_i = clip(soft(r_i, η)/μ, lo − 1, hi − 1) with reduced cost r = c + Pν, and

    g(ν, η) = Σ_i [r_i (1 + u_i) − η|u_i| − (μ/2)u_i²] − νᵀb + ηB,

a convex, piecewise-quadratic function of K (+1) variables whose gradient and generalised
Hessian cost one pass over P. `dual_solve` minimises it over the box ν, η >= 0 by projected
semismooth Newton (jaxopt's BoxCDQP for each Newton subproblem, a Levenberg-Marquardt shift,
Armijo backtracking), reaching the LP by continuation in μ. `exact.solve_program` calls it and
finishes the job (the LP's exact primal, the QP's certificate, Farkas infeasibility).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    import jaxopt

_PAIR_LIMIT = 2**23  # elements of `pair_products` (64 MiB in float64)
# the stopping bar of every continuation stage but the last (relative, like `tol`): those stages
# only warm-start the next, whose Newton steps converge from near enough anyway (population of
# 32 programs at N = 3000, K = 10: 21.5 -> 16.5 mean Newton steps, same answers)
_STAGE_TOL = 1e-2
# each Newton step's box subproblem: at most 10 coordinate-descent sweeps. From the projected-Newton
# start every sweep lowers the model, so any stopping point is a descent direction; under vmap
# the sweeps run in lock step and cost as much as the rest of the step, and 50 sweeps made no
# fewer Newton steps
_BOX_QP = jaxopt.BoxCDQP(maxiter=10, tol=1e-10, implicit_diff=False)


def primal_from_dual(z, P, c, lo, hi, mu, has_budget):
    """Closed-form primal u = w − 1 at duals z (works on numpy or jax arrays)."""
    xp = jnp if isinstance(P, jax.Array) else np
    r = c + P @ z[:-1]
    u, eta = _primal_from_r(xp, z, r, lo, hi, mu, has_budget)
    return u, r, eta


def _primal_from_r(xp, z, r, lo, hi, mu, has_budget):
    """(u, η) at duals z whose reduced costs r = c + Pν are already known."""
    eta = z[-1] if has_budget else 0.0
    s = xp.sign(r) * xp.maximum(xp.abs(r) - eta, 0.0)
    return xp.clip(s / mu, lo - 1.0, hi - 1.0), eta


def _dual_value(z, r, b, lo, hi, mu, budget, has_budget):
    """g(z) from its reduced costs r (one pass over P computes r; value and gradient share it)."""
    u, eta = _primal_from_r(jnp, z, r, lo, hi, mu, has_budget)
    val = (
        jnp.sum(r * (1.0 + u)) - eta * jnp.sum(jnp.abs(u)) - 0.5 * mu * jnp.sum(u * u) - z[:-1] @ b
    )
    return val + (eta * budget if has_budget else 0.0)


def _gram(A, B):
    """AᵀB, contracting the row axis in place (no transposed copy of a tall A)."""
    return jax.lax.dot_general(A, B, (((0,), (0,)), ((), ())))


def pair_products(P):
    """(N, K(K+1)/2): row i holds p_ik p_ij for k <= j (the upper triangle of p_i p_iᵀ)."""
    iu, ju = np.triu_indices(P.shape[1])
    return P[:, iu] * P[:, ju]


def weighted_gram(P, on, scale, live, cap, G=None, Q=None):
    """scale · Σ_{i: on_i} p_i p_iᵀ (= Pᵀ diag(d) P for the dual's generalised Hessian, whose
    d is 1/μ on the weights strictly inside their bounds and 0 elsewhere), by the cheapest exact
    route for the current interior set:

    - at most `cap` live rows on: a fixed-size gather of them (cap·K² work instead of N·K²);
      late in the continuation only a few times K weights are interior;
    - at most `cap` live rows off and G = Σ_{live} p pᵀ given (computed once per solve): G minus
      the gather of the off rows; early in the continuation almost every weight is interior;
    - else every row: with Q = `pair_products`(P) given, as the mask times Q (under a `vmap`
      over programs sharing P, one (M, N) × (N, K(K+1)/2) matrix product for all of them, half
      the work of M masked Gram products; measured 2.7x faster at N = 3072, K = 10, M = 32).

    `cap` is static (None: every row). Rows that are not `live` (zero padding) never count."""

    def every_row(_=None):  # (rows that are not live are zero: they add nothing)
        if Q is not None:
            t = scale * (on.astype(P.dtype) @ Q)
            iu, ju = np.triu_indices(P.shape[1])
            return jnp.zeros((P.shape[1],) * 2, P.dtype).at[iu, ju].set(t).at[ju, iu].set(t)
        Pm = jnp.where(on[:, None], P, 0.0)
        return scale * _gram(Pm, P)

    if cap is None or cap >= P.shape[0]:
        return every_row()
    on = on & live
    off = live & ~on
    n_on, n_off = jnp.sum(on), jnp.sum(off)

    def gram_of(mask, count):
        idx = jnp.nonzero(mask, size=cap, fill_value=0)[0]
        Pf = jnp.where((jnp.arange(cap) < count)[:, None], P[idx], 0.0)
        return _gram(Pf, Pf)

    branches = [lambda _: scale * gram_of(on, n_on), every_row]
    index = jnp.where(n_on <= cap, 0, 1)
    if G is not None:
        branches.append(lambda _: scale * (G - gram_of(off, n_off)))
        index = jnp.where((n_on > cap) & (n_off <= cap), 2, index)
    return jax.lax.switch(index, branches, None)


def _dual_grad_hess(z, r, P, b, lo, hi, mu, budget, has_budget, live, cap, G, Q=None):
    u, eta = _primal_from_r(jnp, z, r, lo, hi, mu, has_budget)
    # (v @ P, not P.T @ v: XLA:CPU materialises the transpose, measured 10x slower at N = 1e5)
    g_nu = (1.0 + u) @ P - b
    g_eta = (budget - jnp.sum(jnp.abs(u))) if has_budget else jnp.zeros((), P.dtype)
    s = jnp.sign(r) * jnp.maximum(jnp.abs(r) - eta, 0.0) / mu
    on = (s > lo - 1.0) & (s < hi - 1.0) & (jnp.abs(r) > eta)
    # H = Aᵀ diag(d) A with A = [P, −sign(r)] (the η column only with a budget), built blockwise
    # so that no N×(K+1) copy of P is made
    K = P.shape[1]
    H = (
        jnp.zeros((K + 1, K + 1), P.dtype)
        .at[:K, :K]
        .set(weighted_gram(P, on, 1.0 / mu, live, cap, G, Q))
    )
    if has_budget:
        sd = jnp.sign(r) * on.astype(P.dtype) / mu
        h = -(sd @ P)
        H = H.at[:K, K].set(h).at[K, :K].set(h).at[K, K].set(jnp.sum(jnp.sign(r) * sd))
    return jnp.concatenate([g_nu, g_eta[None]]), H


def _newton_stage(
    z, P, c, b, lo, hi, mu, budget, upper, live, G, Q, *, has_budget, max_iter, tol, cap
):
    K1 = z.shape[0]
    gscale = 1.0 + jnp.max(jnp.abs(b)) + jnp.max(jnp.abs(c))

    def at(z):  # (z, r, g(z)): one pass over P
        r = c + P @ z[:-1]
        return z, r, _dual_value(z, r, b, lo, hi, mu, budget, has_budget)

    def grad_hess(z, r):
        return _dual_grad_hess(z, r, P, b, lo, hi, mu, budget, has_budget, live, cap, G, Q)

    def proj_grad_norm(z, g):
        pg = jnp.where((z <= 0) & (g > 0), 0.0, g)
        pg = jnp.where((z >= upper) & (g < 0), 0.0, pg)
        return jnp.max(jnp.abs(pg))

    def cond(st):
        z, it, err = st[:3]
        return (it < max_iter) & (err > tol * gscale)

    def body(st):
        # (r, g, H, f0) at z are carried from the previous step: per step one gradient/Hessian
        # pass over P, plus one pass per line-search trial (whose r the accepted point keeps)
        z, it, err, g, H, f0, lam, r = st
        # under vmap every element runs the body until the last one is done: elements already
        # converged must not burn line-search passes over P
        active = (it < max_iter) & (err > tol * gscale)
        # Levenberg-Marquardt: a shift λ·‖projected gradient‖ keeps the step bounded where few
        # weights are interior (H near singular) and vanishes at the optimum; λ grows after a
        # failed line search and shrinks after a success. (Without it, semismooth Newton stalled
        # on QPs with budgets or K > N/4: its huge steps failed every halving; measured on 40
        # random QPs, 7 stalled before, 1 with a fixed λ = 1, 0 with the adaptive λ.)
        H = H + (1e-10 * (jnp.trace(H) / K1) + 1e-14 + lam * err) * jnp.eye(K1, dtype=H.dtype)
        H = jnp.where(upper > 0, 1.0, 0.0)[:, None] * H + jnp.diag(jnp.where(upper > 0, 0.0, 1.0))
        # warm start: Bertsekas' projected-Newton direction (Newton on the coordinates not held
        # at a bound), clipped to the box; BoxCDQP then settles the box QP in a few sweeps
        free = ~(((z <= 0) & (g > 0)) | ((z >= upper) & (g < 0)))
        Hf = jnp.where(free[:, None] & free[None, :], H, jnp.eye(K1, dtype=H.dtype))
        step = -jnp.linalg.solve(Hf, jnp.where(free, g, 0.0))
        d0 = jnp.clip(jnp.where(free, step, 0.0), -z, upper - z)
        # coordinate descent only ever lowers the model q(d) = ½dᵀHd + gᵀd, so from a start
        # with q <= 0 (d0, else 0) its d is a descent direction (gᵀd <= −½dᵀHd); from a d0
        # with q > 0 it could stop at an ascent direction (measured: gᵀd > 0 on a QP with
        # K = 30, N = 40, and the stage stalled)
        q0 = 0.5 * d0 @ H @ d0 + g @ d0
        d0 = jnp.where(q0 <= 0, d0, 0.0)
        d = _BOX_QP.run(d0, params_obj=(H, g), params_ineq=(-z, upper - z)).params

        def trial(t):
            return at(jnp.clip(z + t * d, 0.0, upper))

        def ls_cond(s):
            _, k, zn, _, fn = s
            # sufficient decrease, up to rounding in f (else a converged z would burn 40 halvings)
            return active & (fn > f0 + 1e-4 * g @ (zn - z) + 1e-13 * jnp.abs(f0)) & (k < 40)

        def ls_body(s):
            t = s[0] * 0.5
            return (t, s[1] + 1, *trial(t))

        one = jnp.ones((), z.dtype)
        _, k, zn, rn, fn = jax.lax.while_loop(ls_cond, ls_body, (one, 0, *trial(one)))
        ok = active & (k < 40)
        z, r, f0 = jnp.where(ok, zn, z), jnp.where(ok, rn, r), jnp.where(ok, fn, f0)
        g, H = grad_hess(z, r)
        # no sufficient decrease: keep z, raise λ; past λ = 1e8 (a gradient step of nothing)
        # the stage ends
        lam = jnp.where(ok, jnp.maximum(lam * 0.25, 1e-3), lam * 16.0)
        it = jnp.where(ok | (lam <= 1e8), it + 1, max_iter)
        return (z, it, jnp.where(active, proj_grad_norm(z, g), err), g, H, f0, lam, r)

    z, r0, f_0 = at(z)
    g0, H0 = grad_hess(z, r0)
    one = jnp.ones((), z.dtype)
    st = jax.lax.while_loop(cond, body, (z, 0, proj_grad_norm(z, g0), g0, H0, f_0, one, r0))
    return st[0], st[1], st[2]


@functools.partial(jax.jit, static_argnames=("has_budget", "max_iter", "n_stages", "gram_cap"))
def dual_solve(P, c, b, lo, hi, mu_final, budget, *, has_budget: bool, max_iter: int, n_stages: int,
    tol: float = 1e-10, z0=None, gram_cap: int | None = None):
    """The structured dual stage: minimise the (smoothed) dual over ν >= 0 (and η >= 0).

    Continuation: μ goes geometrically from a scale where most weights are interior down to
    `mu_final` in `n_stages` stages (one stage when μ is the QP's own), each warm-started and
    solved by projected semismooth Newton (jaxopt BoxCDQP subproblems). Pure and jittable;
    `vmap` it over b (a population of α) or c (targets). `gram_cap` (static): build the
    Hessian from the interior rows alone whenever at most this many rows are interior
    (`weighted_gram`); None: always from every row.

    Returns:
        (z, w, iterations, projected-gradient error) with z = (ν, η) and w the primal weights
        at the last μ.
    """
    K = P.shape[1]
    z = jnp.zeros(K + 1, P.dtype) if z0 is None else z0
    mu0 = jnp.maximum(jnp.max(jnp.abs(c)) + jnp.max(jnp.abs(P).sum(1)), 1e-30) / jnp.maximum(
        hi - lo, 1e-12
    )
    mu0 = jnp.maximum(mu0, mu_final)
    ratio = (mu_final / mu0) ** (1.0 / max(n_stages - 1, 1))
    upper = jnp.full(K + 1, jnp.inf, P.dtype)
    if not has_budget:
        upper = upper.at[-1].set(0.0)

    live = jnp.any(P != 0, axis=1)  # zero rows (padding) never enter the Hessian
    # Σ_live p pᵀ once: early stages, where almost every weight is interior, subtract the few
    # others from it (`weighted_gram`)
    G = None if gram_cap is None else _gram(P, P)
    # every row each step (gram_cap None: a vmap over programs): the rows' pair products once,
    # where they fit (`weighted_gram`)
    Q = (
        pair_products(P)
        if gram_cap is None and P.shape[0] * K * (K + 1) // 2 <= _PAIR_LIMIT
        else None
    )

    def stage(carry, j):
        z, its = carry
        mu = mu0 * ratio**j if n_stages > 1 else mu_final
        stage_tol = jnp.where(j == n_stages - 1, tol, jnp.maximum(tol, _STAGE_TOL))
        z, it, err = _newton_stage(z, P, c, b, lo, hi, mu, budget, upper, live, G, Q,
            has_budget=has_budget, max_iter=max_iter, tol=stage_tol, cap=gram_cap)
        return (z, its + it), err

    (z, its), errs = jax.lax.scan(stage, (z, 0), jnp.arange(n_stages))
    u, _, _ = primal_from_dual(z, P, c, lo, hi, mu_final, has_budget)
    return z, 1.0 + u, its, errs[-1]


def batch_mode(mode: str) -> str:
    checks.check_choice(mode, "batch", ("auto", "vmap", "map"))
    # "auto" is vmap everywhere: with the device finish, lock-step vmap was faster than a compiled
    # loop on CPU too (population of 32, N = 1e5, K = 10: 4.9 s against 6.2 s, bench_pareto)
    return "vmap" if mode == "auto" else mode
