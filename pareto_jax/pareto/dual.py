"""The structured dual solver of the reweighting program (K ≪ N coupling constraints).

Dual of the smoothed program (μ > 0), with multipliers ν >= 0 (K class constraints) and η >= 0
(the L1 budget, when present): for fixed (ν, η) each weight solves a 1-D problem in closed form,
u_i = clip(soft(r_i, η)/μ, lo − 1, hi − 1) with reduced cost r = c + Pν, and

    g(ν, η) = Σ_i [r_i (1 + u_i) − η|u_i| − (μ/2)u_i²] − νᵀb + ηB,

a convex, piecewise-quadratic function of K (+1) variables whose gradient and generalised
Hessian cost one pass over P. `dual_solve` minimises it over the box ν, η >= 0 by projected
semismooth Newton (jaxopt's BoxCDQP for each Newton subproblem, Armijo backtracking), reaching
the LP by continuation in μ. `run_dual` runs it for a population of programs in float64 on P
divided by max|P|; `verdict` reads what the duals decide on their own (a Farkas certificate of
infeasibility, or divergence). The LP's exact primal comes from `resolve`.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained", category=DeprecationWarning)
    import jaxopt

def primal_from_dual(z, P, c, lo, hi, mu, has_budget):
    """Closed-form primal u = w − 1 at duals z (works on numpy or jax arrays)."""
    xp = jnp if isinstance(P, jax.Array) else np
    nu = z[:-1]
    eta = z[-1] if has_budget else 0.0
    r = c + P @ nu
    s = xp.sign(r) * xp.maximum(xp.abs(r) - eta, 0.0)
    u = xp.clip(s / mu, lo - 1.0, hi - 1.0)
    return u, r, eta


def _dual_value(z, P, c, b, lo, hi, mu, budget, has_budget):
    u, r, eta = primal_from_dual(z, P, c, lo, hi, mu, has_budget)
    val = jnp.sum(r * (1.0 + u)) - eta * jnp.sum(jnp.abs(u)) - 0.5 * mu * jnp.sum(u * u) - z[:-1] @ b
    return val + (eta * budget if has_budget else 0.0)


def _dual_grad_hess(z, P, c, b, lo, hi, mu, budget, has_budget):
    u, r, eta = primal_from_dual(z, P, c, lo, hi, mu, has_budget)
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
    u, _, _ = primal_from_dual(z, P, c, lo, hi, mu_final, has_budget)
    return z, 1.0 + u, its, errs[-1]


def farkas_bound(P, b, nu, lo, hi):
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


def qp_gap(P, c, b, z, w, config) -> tuple[float, float]:
    """(duality gap, the gap allowed) of the QP at duals z and w = `primal_from_dual`(z).

    w maximises the Lagrangian at z, so the gap g(z) − f(w) = νᵀ(Pᵀw − b) + η(B − Σ|w − 1|)
    (float64); with w feasible, f(w) is within the gap of the optimum. The allowance is
    1e-8 of the objective's scale (|f(w)|, or 1e-3 Σ|P| when that is smaller).
    """
    P, w = np.asarray(P, np.float64), np.asarray(w, np.float64)
    K = P.shape[1]
    gap = float(np.maximum(z[:K], 0.0) @ (P.T @ w - b))
    if config.budget is not None:
        gap += float(max(z[K], 0.0) * (config.budget - np.abs(w - 1.0).sum()))
    obj = float(c @ w - 0.5 * config.mu * np.sum((w - 1.0) ** 2))
    return abs(gap), 1e-8 * max(abs(obj), 1e-3 * float(np.abs(P).sum()))


def batch_mode(mode: str) -> str:
    checks.check_choice(mode, "batch", ("auto", "vmap", "map"))
    if mode == "auto":  # lock-step vmap pays for the slowest member; on CPU a compiled loop wins
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return mode


def run_dual(P, C, B, config, mode: str = "vmap", bounds=None):
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
    if config.mu > 0:
        # a small μ is reached by continuation too (one stage per factor 100 from the scale
        # where most weights are interior): from ν = 0 straight at a tiny μ, semismooth Newton
        # can stall far from the optimum (n = 40, K = 5, μ = 1e-4: gap 0.018 on 0.021)
        width = max(float(np.min(HI - LO)), 1e-12)
        mu0 = (np.abs(C).max() + np.abs(P).sum(1).max()) / scale / width
        n_stages = int(np.clip(np.ceil(np.log10(max(mu0 / mu_final, 1.0)) / 2.0), 0, 7)) + 1
    else:
        n_stages = 3 if K <= 16 else 7
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


def certified_infeasible(P, b, z, config) -> float | None:
    """The Farkas bound of `farkas_bound` when it proves the program infeasible (no budget)."""
    if config.budget is not None:
        return None
    lo, hi = config.bounds
    v = farkas_bound(P, b, z[:P.shape[1]], lo, hi)
    return v if v is not None and v < -config.feas_tol else None


def verdict(P, b, z, config):
    """What the duals decide on their own: ("infeasible", Farkas bound), ("diverged", None), or
    None (the program goes on to its primal)."""
    finite = np.all(np.isfinite(z))
    v = certified_infeasible(P, b, z, config) if finite else None
    if v is not None:
        return "infeasible", v
    if not finite or np.abs(z[:P.shape[1]]).max() > 1e8:
        return "diverged", None
    return None


