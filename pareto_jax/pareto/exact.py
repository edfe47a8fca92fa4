"""The reweighting program solved start to finish in JAX: jittable, vmappable, exact.

    maximise    cᵀw − (μ/2)‖w − 1‖²
    subject to  Pᵀw >= b,   lo <= w <= hi,   Σ_i |w_i − 1| <= B (optional)

`solve_program` runs, on whatever device P lives on and with no host callback:

1. the structured dual stage (`dual.dual_solve`: K (+1) duals, one pass over P per step);
2. a Farkas test of the duals (`farkas_bound`): when it is negative no w satisfies the class
   constraints, and the status is infeasible with that certificate;
3. the LP (μ = 0): the exact finish. The duals' reduced costs r = c + Pν fix every clear-cut
   weight at the bound it asks for; the `m_cap` weights nearest a decision (a static size)
   form a small restricted LP, solved exactly by the bounded dual simplex (`simplex`) with
   elastic rows; its duals then certify optimality on the *whole* problem (every fixed weight
   sits where its new reduced cost asks). If the certificate fails, the violators are freed and
   the round repeats (at most `max_rounds`).
   The QP (μ > 0): the closed form w(z) at the duals, certified by its duality gap.
4. the float64 (where enabled) violation of the returned w.

Statuses come back as int32 arrays of `results.Status` codes (SUCCESS, INFEASIBLE, ITERATION_LIMIT,
NUMERICAL):
a w is only to be used when the status is `SUCCESS`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..config import ReweightConfig, weight_bounds
from ..results import Status
from . import dual, select, simplex

# plain ints on the device (JAX takes an int, not an IntEnum member, as a constant)
SUCCESS, INFEASIBLE = int(Status.SUCCESS), int(Status.INFEASIBLE)
ITERATION_LIMIT, NUMERICAL = int(Status.ITERATION_LIMIT), int(Status.NUMERICAL)

_PENALTY = 1e6  # per unit of (scaled) violation of a restricted row; duals are O(1) in these units


class ProgramSolution(NamedTuple):
    """What `solve_program` returns (all arrays, so it passes through jit and vmap).

    w: weights (N,) (meaningful when status == 0); status: int32 (linprog codes);
    objective: cᵀw − (μ/2)‖w − 1‖²; max_violation: max violation of the class, box and budget
    constraints at w (absolute, in units of P); duals: (ν, η) (K + 1,), ν scale-free, η in units
    of P; farkas: the Farkas bound of the duals (negative: infeasible, certified);
    rounds: exact-finish rounds (0 for the QP); n_free: weights in the last restricted LP;
    iterations: dual-stage Newton steps + simplex iterations; gap: the QP's duality gap (0 for
    the LP).
    """

    w: jax.Array
    status: jax.Array
    objective: jax.Array
    max_violation: jax.Array
    duals: jax.Array
    farkas: jax.Array
    rounds: jax.Array
    n_free: jax.Array
    iterations: jax.Array
    gap: jax.Array


def farkas_bound(P, b, nu, eta, lo, hi, budget, has_budget):
    """max over the box of λᵀ(Pᵀw − b) + η'(B − Σ|w − 1|) for (λ, η') = (ν, η)/Σν, plus a
    rounding margin; +inf when ν = 0. Negative: every w in the box violates a class
    constraint or the budget (weak duality), so the program is infeasible."""
    s = jnp.sum(jnp.maximum(nu, 0.0))
    lam = jnp.maximum(nu, 0.0) / jnp.where(s > 0, s, 1.0)
    e = jnp.maximum(eta, 0.0) / jnp.where(s > 0, s, 1.0) if has_budget else 0.0
    g = P @ lam
    best = jnp.maximum(g * lo - e * jnp.abs(lo - 1.0), g * hi - e * jnp.abs(hi - 1.0))
    if has_budget:
        # w = 1 costs no budget (where it is in the box: not when w_max < 1)
        best = jnp.where((lo <= 1.0) & (1.0 <= hi), jnp.maximum(best, g), best)
    v = jnp.sum(best) - lam @ b + (e * budget if has_budget else 0.0)
    margin = 1e-12 * (
        jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * jnp.sum(jnp.abs(g)) + jnp.abs(lam @ b)
    )
    return jnp.where((s > 0) & jnp.isfinite(v), v + margin, jnp.inf)


# Each weight's own problem at reduced cost r: max r·w − η|w − 1| over [lo, hi], whose slope is
# r − η above 1 and r + η below it. With 1 inside the box (w_max >= 1) the answer is hi when
# r > η, lo when r < −η and 1 between; when w_max < 1 only the slope r + η applies: hi when
# r > −η, lo when r < −η (η = 0 without a budget). Padding rows (not `valid`) stay at 1.


def _up_threshold(eta, hi):
    """The reduced cost above which a weight goes to hi: η with 1 in the box, −η without."""
    return jnp.where(hi > 1.0, eta, -eta)


def _bound_weights(r, eta, lo, hi, valid):
    up = valid & (r > _up_threshold(eta, hi))
    return jnp.where(
        up, hi, jnp.where(valid & (r < -eta), lo, jnp.where(valid, jnp.clip(1.0, lo, hi), 1.0))
    )


def _margin(r, eta, valid, hi):
    """Distance of each reduced cost from the nearest decision boundary (±η; −η alone when
    w_max < 1)."""
    m = jnp.where(
        hi > 1.0, jnp.minimum(jnp.abs(jnp.abs(r) - eta), jnp.abs(r) + eta), jnp.abs(r + eta)
    )
    return jnp.where(valid, m, jnp.inf)


def _restricted(P, c, b, lo, hi, budget, idx, fixed_w, valid, has_budget):
    """The elastic restricted LP on the weights `idx` (others fixed at `fixed_w`) in the
    simplex's form: (A, rhs, cost, l, u, basis0, number of structural columns)."""
    Pf = P[idx]
    ok = valid[idx]
    rest = b - fixed_w @ P + fixed_w[idx] @ Pf
    if not has_budget:
        G, h, cost = Pf.T, rest, -c[idx]
        l, u = jnp.where(ok, lo, 1.0), jnp.where(ok, hi, 1.0)
    else:
        # w = 1 + a − e, a ∈ [0, hi − 1], e ∈ [max(1 − hi, 0), 1 − lo] (w_max < 1 forces every
        # weight down); the budget row −Σ(a + e) >= −B'
        spent = jnp.sum(jnp.abs(fixed_w - 1.0)) - jnp.sum(jnp.abs(fixed_w[idx] - 1.0))
        ones = jnp.ones((1, idx.shape[0]), P.dtype)
        G = jnp.concatenate(
            [jnp.concatenate([Pf.T, -Pf.T], 1), jnp.concatenate([-ones, -ones], 1)], 0
        )
        h = jnp.concatenate([rest - Pf.sum(0), (spent - budget)[None]])
        cost = jnp.concatenate([-c[idx], c[idx]])
        up = jnp.concatenate(
            [jnp.where(ok, jnp.maximum(hi - 1.0, 0.0), 0.0),
                jnp.where(ok, jnp.maximum(1.0 - lo, 0.0), 0.0)]
        )
        l = jnp.concatenate(
            [jnp.zeros_like(idx, P.dtype), jnp.where(ok, jnp.maximum(1.0 - hi, 0.0), 0.0)]
        )
        u = up
    R, nx = G.shape
    eye = jnp.eye(R, dtype=P.dtype)
    A = jnp.concatenate([G, eye, -eye], 1)  # G x + s − t = h: s elastic (penalised), t surplus
    cost = jnp.concatenate([cost, jnp.full(R, _PENALTY, P.dtype), jnp.zeros(R, P.dtype)])
    l = jnp.concatenate([l, jnp.zeros(2 * R, P.dtype)])
    u = jnp.concatenate([u, jnp.full(2 * R, jnp.inf, P.dtype)])
    return A, h, cost, l, u, jnp.arange(nx + R, nx + 2 * R), nx


def _certified(w, r, eta, lo, hi, tol):
    """Each weight sits where its reduced cost asks: hi if r >= η (−η when w_max < 1), lo if
    r <= −η, 1 between (1 in the box only)."""
    return (
        ((w == hi) & (r >= _up_threshold(eta, hi) - tol))
        | ((w == lo) & (r <= -eta + tol))
        | ((w == 1.0) & (hi > 1.0) & (jnp.abs(r) <= eta + tol))
    )


def lp_finish(P, c, b, lo, hi, budget, nu, eta, valid, *, has_budget: bool, m_cap: int,
    max_rounds: int, max_iter: int):
    """The LP's exact primal and duals from approximate duals (ν, η) (module docstring, step 3).

    All inputs scaled (max|P| = 1). Returns (w, ν, η, status, rounds, n_free, simplex iterations).
    """
    n, K = P.shape
    tol = 1e-9 * jnp.maximum(jnp.max(jnp.abs(c)), 1.0)
    eta = eta if has_budget else jnp.zeros((), P.dtype)
    r = c + P @ nu
    margin = _margin(r, eta, valid, hi)

    def one_round(st):
        rnd, key, fixed_w, _, _, _, _, _, its = st
        idx = select.smallest(key, m_cap)
        A, h, cost, l, u, basis0, nx = _restricted(
            P, c, b, lo, hi, budget, idx, fixed_w, valid, has_budget
        )
        res = simplex.dual_simplex(A, h, cost, l, u, basis0, max_iter=max_iter)
        R = h.shape[0]
        x = res.x[:nx]
        wf = x if not has_budget else 1.0 + x[:m_cap] - x[m_cap:]
        wf = jnp.where(valid[idx], wf, 1.0)
        w = fixed_w.at[idx].set(wf)
        nu2 = jnp.maximum(res.y[:K], 0.0)
        eta2 = jnp.maximum(res.y[K], 0.0) if has_budget else jnp.zeros((), P.dtype)
        elastic = jnp.sum(res.x[nx : nx + R])
        r2 = c + P @ nu2
        inF = jnp.zeros(n, bool).at[idx].set(True)
        good = _certified(w, r2, eta2, lo, hi, tol) | inF | ~valid
        done = (
            (res.status == SUCCESS)
            & jnp.all(good)
            & (elastic <= 1e-9 * (1.0 + jnp.max(jnp.abs(h))))
        )
        # next round: violators first (largest reduced-cost violation times the move they
        # want), then this round's free set, then the rest by distance from a decision under
        # the new duals. Violators that do not fit are moved where the new duals want them,
        # unless the restricted LP was infeasible (its duals are then the elastic penalty's
        # direction, not prices): then every weight keeps its value and only the free set moves
        want = _bound_weights(r2, eta2, lo, hi, valid)
        viol = jnp.where(good, 0.0, jnp.abs(want - w) * (jnp.abs(r2) + eta2 + 1e-300))
        m2 = _margin(r2, eta2, valid, hi)
        m2n = m2 / (jnp.max(jnp.where(jnp.isfinite(m2), m2, 0.0)) + 1e-300)
        new_key = jnp.where(
            ~good, -1.0 - viol / (jnp.max(viol) + 1e-300), jnp.where(inF, m2n, 2.0 + m2n)
        )
        new_key = jnp.where(valid, new_key, jnp.inf)
        idx_next = select.smallest(new_key, m_cap)
        in_next = jnp.zeros(n, bool).at[idx_next].set(True)
        infeasible = elastic > 1e-9 * (1.0 + jnp.max(jnp.abs(h)))
        status = jnp.where(
            done, SUCCESS, jnp.where(res.status == NUMERICAL, NUMERICAL, ITERATION_LIMIT)
        )
        fixed_next = jnp.where(~good & ~in_next & ~infeasible, want, w)
        return (rnd + 1, jnp.where(done, key, new_key), fixed_next, w, nu2, eta2,
            status.astype(jnp.int32), jnp.sum(valid[idx]).astype(jnp.int32), its + res.iterations)

    def cond(st):
        return (st[0] < max_rounds) & (st[6] != SUCCESS) & (st[6] != NUMERICAL)

    fixed_w = _bound_weights(r, eta, lo, hi, valid)
    st = (jnp.zeros((), jnp.int32), margin, fixed_w, fixed_w, nu, eta,
        jnp.full((), ITERATION_LIMIT, jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
    )
    rnd, _, _, w, nu, eta, status, n_free, its = jax.lax.while_loop(cond, one_round, st)
    return w, nu, eta, status, rnd, n_free, its


def qp_certificate(P, c, b, mu, budget, nu, eta, w, has_budget):
    """(status, duality gap, objective) of the QP's w at duals (ν, η) (scaled units).

    w maximises the Lagrangian at (ν, η), so g(ν, η) − f(w) = νᵀ(Pᵀw − b) + η(B − Σ|w − 1|);
    with w feasible (checked after), f(w) is within the gap of the optimum. The allowance is
    1e-8 of the objective's scale (|f(w)|, or 1e-3 Σ|P| when that is smaller) plus the rounding
    of the gap's own sums (8 ε Σ_k ν_k Σ_i |P_ik w_i|: in float32 the binding constraints'
    slacks are only known to that); above it the status is 1 (the dual stage stopped short).
    """
    gap = nu @ (w @ P - b)
    if has_budget:
        gap = gap + eta * (budget - jnp.sum(jnp.abs(w - 1.0)))
    gap = jnp.abs(gap)
    obj = c @ w - 0.5 * mu * jnp.sum((w - 1.0) ** 2)
    rounding = 8 * jnp.finfo(P.dtype).eps * (nu @ (jnp.abs(w) @ jnp.abs(P)))
    if has_budget:
        rounding = rounding + 8 * jnp.finfo(P.dtype).eps * eta * (
            budget + jnp.sum(jnp.abs(w - 1.0))
        )
    bar = 1e-8 * jnp.maximum(jnp.abs(obj), 1e-3 * jnp.sum(jnp.abs(P))) + rounding
    return jnp.where(gap <= bar, SUCCESS, ITERATION_LIMIT).astype(jnp.int32), gap, obj


def default_m_cap(n: int, K: int) -> int:
    """Size of the restricted LP: the ≤ K (+1) fractional weights of a vertex and a margin wide
    enough that duals from the dual stage settle in one round (and poor ones in a few: from
    ν = 0 at N = 600, K = 4, 150 free weights settled in 4 rounds, 60 in none of 20)."""
    return int(min(n, 8 * (K + 1) + 64))


def solve_program(P, c, b, lo, hi, budget=None, mu=0.0, *, n_valid=None, m_cap: int | None = None,
    gram_cap="auto", max_rounds: int = 6, max_iter: int | None = None, rtol: float = 1e-9):
    """Solve the program (module docstring) on the device: pure JAX, jittable, vmappable.

    Args:
        P: (N, K) influence matrix. c: (N,) objective. b: (K,) class thresholds.
        lo, hi: scalar bounds of every weight (trust region already applied).
        budget: the L1 budget B (None: none; decides the program's shape, so static).
        mu: the proximal weight (a Python 0 selects the LP; anything else the QP).
        n_valid: only the first `n_valid` rows are real (the rest zero padding, see
            `solve_reweighting`, which pads N to a few sizes so that new N rarely recompile).
        m_cap, max_rounds: the exact finish's restricted size and round limit (static).
        gram_cap: how many rows the dual stage's Hessian may gather instead of a pass over every
            row (`dual.weighted_gram`; static). None: every row, which is what a `vmap` over
            programs should ask for (under vmap the branch choice becomes a select that computes
            every branch: measured 2x slower at N = 3000, M = 32).

    Returns:
        `ProgramSolution`. Under float32 the tolerances are float32's; the certificates mean
        most in float64 (``jax.config.update("jax_enable_x64", True)``).
    """
    n, K = P.shape
    dt = P.dtype
    qp = not (isinstance(mu, (int, float)) and mu == 0)
    has_budget = budget is not None
    valid = jnp.arange(n) < (n if n_valid is None else n_valid)
    scale = jnp.maximum(jnp.max(jnp.abs(P)), jnp.finfo(dt).tiny)
    Ps, cs, bs = P / scale, c / scale, b / scale
    lo, hi = jnp.asarray(lo, dt), jnp.asarray(hi, dt)
    B = jnp.asarray(budget if has_budget else 0.0, dt)
    if qp:
        mu_s = jnp.asarray(mu, dt) / scale
        n_stages, newton_iter = 12, 200
    else:
        mu_s = jnp.asarray(1e-4 if K <= 16 else 1e-6, dt)
        n_stages, newton_iter = (3 if K <= 16 else 7), 25
    # padding rows are zero rows of P, so in the dual stage each sits at the constant u = clip(0,
    # lo − 1, hi − 1): nonzero when 1 is outside the box (w_max < 1). They are not variables of
    # the program (the finish holds them at w = 1, off the budget), so the dual stage's budget
    # gets their constant Σ|u| added: the same dual, up to a constant (w_max < 1 at N = 63 or
    # 300 was refused as "numerical difficulties" before)
    n_pad = n - (n if n_valid is None else n_valid)
    B_dual = B + n_pad * jnp.abs(jnp.clip(0.0, lo - 1.0, hi - 1.0)) if has_budget else B
    z, wq, newton, _ = dual.dual_solve(Ps, cs, bs, lo, hi, mu_s, B_dual, has_budget=has_budget,
        max_iter=newton_iter, n_stages=n_stages, tol=rtol,
        gram_cap=default_m_cap(n, K) if gram_cap == "auto" else gram_cap)
    nu, eta = z[:K], z[K]
    farkas = farkas_bound(Ps, bs, nu, eta, lo, hi, B, has_budget)
    # rounding of a sum over N rows grows with the column sums of |P|
    feas_tol = 10 * simplex.tolerances(dt)[0] * (1.0 + jnp.max(jnp.sum(jnp.abs(Ps), 0)))
    if qp:
        w = jnp.where(valid, wq, 1.0)
        status, gap, obj = qp_certificate(Ps, cs, bs, mu_s, B, nu, eta, w, has_budget)
        rounds = n_free = jnp.zeros((), jnp.int32)
        its = newton
    else:
        cap = default_m_cap(n, K) if m_cap is None else int(min(m_cap, n))
        max_it = 20 * (cap + K + 1) if max_iter is None else max_iter
        w, nu, eta, status, rounds, n_free, its = lp_finish(Ps, cs, bs, lo, hi, B, nu, eta, valid,
            has_budget=has_budget, m_cap=cap, max_rounds=max_rounds, max_iter=max_it)
        its = its + newton
        gap = jnp.zeros((), dt)
        obj = cs @ w
    viol = jnp.maximum(jnp.max(bs - w @ Ps), 0.0)
    # the box on the program's rows only (padding rows sit at w = 1, which is outside it when
    # w_max < 1)
    viol = jnp.maximum(viol, jnp.max(jnp.where(valid, jnp.maximum(lo - w, w - hi), 0.0)))
    if has_budget:
        viol = jnp.maximum(viol, jnp.sum(jnp.abs(w - 1.0)) - B)
    infeasible = farkas < -feas_tol
    if has_budget:  # the box alone may need more budget than B (w_max < 1 moves every weight)
        n_real = n if n_valid is None else n_valid
        least = n_real * jnp.maximum(jnp.maximum(lo - 1.0, 1.0 - hi), 0.0)
        infeasible = infeasible | (least > B * (1.0 + 1e-12) + 1e-12)
    bad = ~jnp.all(jnp.isfinite(z))
    status = jnp.where(infeasible, INFEASIBLE, jnp.where(bad, NUMERICAL, status)).astype(jnp.int32)
    # a certified optimum must also pass the violation check (else it is not certified)
    status = jnp.where((status == SUCCESS) & (viol > feas_tol), NUMERICAL, status).astype(jnp.int32)
    # an infeasible program's duals are the dual stage's: the Farkas certificate
    nu = jnp.where(infeasible, z[:K], nu)
    eta = jnp.where(infeasible, z[K], eta)
    duals = jnp.concatenate([nu, (eta * scale)[None]])
    return ProgramSolution(w, status, obj * scale, jnp.maximum(viol, 0.0) * scale, duals,
        farkas * scale, rounds, n_free, its, gap * scale)


def reweight(P, class_weights, alpha, *, w_max=ReweightConfig.w_max, rho=None, budget=None, mu=0.0,
    gram_cap="auto") -> ProgramSolution:
    """The reweighting program from its user-facing parameters, in pure JAX (jit, vmap, on device).

    maximise Σ_k β_k Σ_i w_i P[i, k] − (μ/2)‖w − 1‖² s.t. Σ_i w_i P[i, k] >= α_k Σ_i P[i, k],
    max(0, 1 − ρ) <= w_i <= min(w_max, 1 + ρ) (and Σ|w_i − 1| <= budget).

    Every argument but `budget`'s presence and `mu == 0` may be traced: vmap over α (K,),
    class weights β (K,), ρ or w_max. No input checks happen here (they cannot under a trace):
    `solve_reweighting` is the checked host front door with the same answers. Under `vmap`,
    ``gram_cap=None`` is faster (`solve_program`).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> P = jnp.asarray(np.random.default_rng(0).normal(size=(200, 3)))
        >>> beta = jnp.array([1.0, 0.0, 0.0])
        >>> solve = jax.jit(jax.vmap(lambda a: reweight(P, beta, a, rho=0.5)))
        >>> sols = solve(jnp.linspace(0.2, 0.8, 4))
        >>> sols.status.tolist()
        [0, 0, 0, 0]
    """
    P = jnp.asarray(P)
    dt = P.dtype
    beta = jnp.asarray(class_weights, dt)
    alpha = jnp.broadcast_to(jnp.asarray(alpha, dt), (P.shape[1],))
    lo, hi = weight_bounds(jnp.asarray(w_max, dt), rho, maximum=jnp.maximum, minimum=jnp.minimum)
    return solve_program(P, P @ beta, alpha * P.sum(0), lo, hi, budget, mu, gram_cap=gram_cap)
