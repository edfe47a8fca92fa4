"""Linear solves (A + δI) X = B for the K class right-hand sides, one interface for all methods.

Every solver takes the operator it needs and the right-hand sides and returns a `SolveResult`
(value, steps, residual, converged, negative_curvature):

* `solve_cg(matvec, B, *, damping, rtol, atol, max_steps)`: batched conjugate gradient, each
  right-hand side stopping on its own relative residual;
* `solve_dense(matvec, B, *, damping, ...)`: the dense reference (materialises A);
* `solve_lissa(batch_matvec, B, n_batches, *, scale, damping, ...)`: the stochastic Neumann
  recursion of LiSSA;
* `pareto_jax.kfac.solve_kfac(factors, B, *, damping)`: K-FAC / EK-FAC (Kronecker factors).

What is shared by all of them lives here once: the "auto" damping (`resolve_damping`), damping
escalation on negative curvature or non-finite solutions (`solve_escalating`), the residual
against the true operator for methods that solve an approximation (`with_residual`), and the
outside-jit check that raises (`check_solve`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import checks
from .kernels import hutchinson_damping


class SolveResult(NamedTuple):
    """Result of a (batched) linear solve (A + δI) X = B. Arrays have a leading K axis.

    Attributes:
        value: the solutions, shape (K, P).
        steps: iterations taken per right-hand side (0 for direct methods).
        residual: relative residual ‖B − (A + δI)X‖ / ‖B‖ per right-hand side, recomputed at
            the end with the true operator.
        converged: the method's own stopping rule was met (for CG: residual <= rtol).
        negative_curvature: the damped operator was found not positive definite (CG met
            pᵀ(A + δI)p <= 0, the dense matrix has an eigenvalue <= 0, LiSSA diverged).
    """

    value: jax.Array
    steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


def _squeeze(res: SolveResult, single: bool) -> SolveResult:
    return jax.tree_util.tree_map(lambda a: a[0], res) if single else res


def solve_cg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, damping: float = 0.0,
             rtol: float = 1e-6, atol: float = 0.0, max_steps: int | None = None,
             x0: jax.Array | None = None, precond: Callable[[jax.Array], jax.Array] | None = None) -> SolveResult:
    """Conjugate gradient for (A + δI) x = b, batched over the rows of b.

    Args:
        matvec: v (P,) -> A v, A symmetric positive (semi)definite; `vmap`-ed over the rows.
        b: right-hand sides, shape (K, P) (or (P,) for one).
        damping: δ added to the diagonal.
        rtol, atol: each right-hand side stops once its residual ‖b − (A + δI)x‖ (the
            recurrence's, checked against a recomputed one at the end) is <= max(rtol·‖b‖, atol).
        max_steps: iteration cap (default 10·P, at most 1000).
        x0: initial guess (default zeros).
        precond: v -> M⁻¹v, a symmetric positive definite approximation of (A + δI)⁻¹ (e.g.
            `kfac.preconditioner`): preconditioned CG. The stopping rule stays on the
            unpreconditioned residual, so the tolerance means the same with or without it.

    Returns:
        `SolveResult`. Jittable; nothing raises on values (see `check_solve`).
    """
    single = b.ndim == 1
    b = b[None] if single else b
    P = b.shape[1]
    max_steps = int(min(10 * P, 1000) if max_steps is None else max_steps)
    mv = jax.vmap(lambda v: matvec(v) + damping * v)
    pre = (lambda r: r) if precond is None else jax.vmap(precond)
    dot = lambda u, v: jnp.sum(u * v, axis=1)  # noqa: E731
    bnorm = jnp.sqrt(dot(b, b))
    tol = jnp.maximum(rtol * bnorm, atol)
    x = jnp.zeros_like(b) if x0 is None else jnp.broadcast_to(x0, b.shape)
    r = b - mv(x) if x0 is not None else b
    z = pre(r)
    rz = dot(r, z)
    active = jnp.sqrt(dot(r, r)) > tol
    init = (x, r, z, rz, active, jnp.zeros(b.shape[0], jnp.int32), jnp.zeros(b.shape[0], bool), 0)

    def cond(c):
        return jnp.any(c[4]) & (c[7] < max_steps)

    def body(c):
        x, r, p, rz, active, steps, neg, it = c
        Ap = mv(p)
        pAp = dot(p, Ap)
        bad = active & (pAp <= 0)
        ok = active & ~bad
        alpha = jnp.where(ok, rz / jnp.where(ok, pAp, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        z = pre(r)
        rz_new = dot(r, z)
        beta = jnp.where(ok, rz_new / jnp.where(ok, rz, 1.0), 0.0)
        p = jnp.where(ok[:, None], z + beta[:, None] * p, p)
        steps = steps + ok.astype(jnp.int32)
        rz = jnp.where(ok, rz_new, rz)
        active = ok & (jnp.sqrt(dot(r, r)) > tol)
        return x, r, p, rz, active, steps, neg | bad, it + 1

    x, _, _, _, _, steps, neg, _ = jax.lax.while_loop(cond, body, init)
    true_r = b - mv(x)
    rnorm = jnp.sqrt(dot(true_r, true_r))
    rel = rnorm / jnp.where(bnorm > 0, bnorm, 1.0)
    conv = (rnorm <= jnp.maximum(tol, 0.0) * (1 + 1e-3)) | (rel <= rtol * 1.001) | (bnorm == 0)
    return _squeeze(SolveResult(x, steps, rel, conv & ~neg, neg), single)


def materialize(matvec: Callable[[jax.Array], jax.Array], dim: int, dtype=jnp.float32) -> jax.Array:
    """The dense matrix of a symmetric linear operator (columns are matvec of basis vectors)."""
    return jax.lax.map(matvec, jnp.eye(dim, dtype=dtype))


def solve_dense(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, damping: float = 0.0,
                rtol: float = 1e-6, atol: float = 0.0, max_steps: int | None = None,
                x0: jax.Array | None = None) -> SolveResult:
    """Dense reference solve with the signature of `solve_cg`: materialises A, then `solve`.

    Only for small models (P up to a few thousand). `rtol`/`atol` only set `converged`.
    """
    del max_steps, x0
    single = b.ndim == 1
    b = b[None] if single else b
    P = b.shape[1]
    A = materialize(matvec, P, b.dtype)
    A = 0.5 * (A + A.T) + damping * jnp.eye(P, dtype=b.dtype)
    x = jnp.linalg.solve(A, b.T).T
    r = b - x @ A
    bnorm = jnp.linalg.norm(b, axis=1)
    rel = jnp.linalg.norm(r, axis=1) / jnp.where(bnorm > 0, bnorm, 1.0)
    evals = jnp.linalg.eigvalsh(A)
    neg = jnp.broadcast_to(evals[0] <= 0, (b.shape[0],))
    conv = ((rel <= jnp.maximum(rtol, 1e-3)) | (jnp.linalg.norm(r, axis=1) <= atol)) & ~neg
    return _squeeze(SolveResult(x, jnp.zeros(b.shape[0], jnp.int32), rel, conv, neg), single)


def power_iteration(matvec, dim: int, dtype, *, steps: int = 20, seed: int = 0) -> float:
    """Largest eigenvalue magnitude of a symmetric operator by power iteration."""
    v = jax.random.normal(jax.random.PRNGKey(seed), (dim,), dtype)
    v = v / jnp.linalg.norm(v)
    lam = 0.0
    for _ in range(steps):
        w = matvec(v)
        lam = float(jnp.vdot(v, w))
        v = w / jnp.maximum(jnp.linalg.norm(w), 1e-30)
    return abs(lam)


def solve_lissa(batch_matvec, b, n_batches: int, *, scale: float, damping: float = 0.0,
                rtol: float = 1e-6, max_steps: int = 1000, seed: int = 0) -> SolveResult:
    """LiSSA (Agarwal et al. 2017) for (A + δI) x = b with K right-hand sides.

    The Neumann recursion v ← b + (I − (A_j + δI)/s) v on minibatch operators A_j drawn with
    `seed`, x = v/s. It converges iff s > λ_max(A + δI)/2 and A + δI is positive definite.

    Args:
        batch_matvec: (v, j) -> A_j v, the operator on minibatch j (the full operator when
            there is a single batch: then this is a deterministic Richardson iteration).
        b: (K, P) right-hand sides.
        n_batches: number of minibatches to draw from.
        scale: s (see above); `pareto_jax.influence` uses 1.2·λ_max from `power_iteration`.
        rtol: stop a right-hand side once its relative update is below rtol.

    Returns:
        `SolveResult` whose residual is NaN until `with_residual` sets it with the full
        operator; `negative_curvature` marks right-hand sides whose recursion diverged (a norm
        above 1e6·‖b‖·s, or NaN).
    """
    K = b.shape[0]
    key = jax.random.PRNGKey(seed)
    bnorm = jnp.linalg.norm(b, axis=1)

    def step(carry, j):
        v, done, steps, diverged = carry
        idx = jax.random.randint(jax.random.fold_in(key, j), (), 0, n_batches)
        hv = jax.vmap(lambda x: batch_matvec(x, idx))(v) + damping * v
        v_new = b + v - hv / scale
        delta = jnp.linalg.norm(v_new - v, axis=1) / jnp.maximum(jnp.linalg.norm(v_new, axis=1), 1e-30)
        bad = ~jnp.all(jnp.isfinite(v_new), axis=1) | (jnp.linalg.norm(v_new, axis=1) > 1e6 * bnorm * scale)
        keep = done | diverged
        v_out = jnp.where(keep[:, None], v, v_new)
        diverged = diverged | (bad & ~done)
        done = done | ((delta < rtol) & ~bad)
        steps = steps + (~keep).astype(jnp.int32)
        return (v_out, done, steps, diverged), None

    init = (b, jnp.zeros(K, bool), jnp.zeros(K, jnp.int32), jnp.zeros(K, bool))
    (v, done, steps, diverged), _ = jax.lax.scan(step, init, jnp.arange(max_steps))
    x = v / scale
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    return SolveResult(x, steps, jnp.where(done, 0.0, jnp.nan), done & ~diverged, diverged)


# ----------------------------------------------------------------------------- shared by all methods


def with_residual(res: SolveResult, matvec: Callable, b: jax.Array, damping: float) -> SolveResult:
    """`res` with its residual recomputed against the true operator A + δI (for methods that
    solve an approximation of A: LiSSA's minibatches, K-FAC's factors)."""
    r = b - jax.vmap(matvec)(res.value) - damping * res.value
    rel = jnp.linalg.norm(r, axis=1) / jnp.maximum(jnp.linalg.norm(b, axis=1), 1e-30)
    return res._replace(residual=rel)


def resolve_damping(setting: float | str, matvec: Callable, theta: jax.Array, seed: int) -> float:
    """The damping to start from: a number as given, or "auto" (`kernels.hutchinson_damping`)."""
    return hutchinson_damping(matvec, theta, seed) if setting == "auto" else float(setting)


def needs_more_damping(res: SolveResult) -> bool:
    """The damped operator was not positive definite as the solver saw it (negative curvature,
    LiSSA divergence) or the solution is not finite (e.g. K-FAC with an empty eigen-direction
    and no damping)."""
    value = np.asarray(res.value)
    return bool(np.any(np.asarray(res.negative_curvature))) or not bool(np.all(np.isfinite(value)))


def solve_escalating(solve: Callable[[float], SolveResult], damping: float, *, escalate: bool = True,
                     tries: int = 7) -> tuple[SolveResult, float, list[dict]]:
    """solve(damping) -> SolveResult; while `needs_more_damping`, retry with damping ×10 (at
    least 1e-6), up to `tries` solves. Returns (result, damping used, escalations tried)."""
    escalations: list[dict] = []
    for attempt in range(tries):
        res = solve(damping)
        if not (escalate and needs_more_damping(res)) or attempt == tries - 1:
            break
        why = "negative curvature" if bool(np.any(np.asarray(res.negative_curvature))) \
            else "non-finite solution"
        escalations.append({"damping": damping, "reason": why})
        damping = max(10 * damping, 1e-6)
    return res, damping, escalations


def check_solve(res: SolveResult, *, rtol: float, stage: str = "inverse-HVP solve") -> None:
    """Raise `NumericalError` (outside jit) if a solve failed, with the residuals."""
    val = np.asarray(res.value)
    checks.check_finite_array(val, "solution", stage)
    conv = np.asarray(res.converged)
    if not conv.all():
        bad = np.flatnonzero(~conv)
        resid = np.asarray(res.residual)[bad]
        neg = np.asarray(res.negative_curvature)[bad]
        why = "negative curvature met (raise damping or use curvature='gauss_newton')" if neg.any() \
            else "tolerance not reached (raise max_steps or damping)"
        raise checks.NumericalError(
            f"{stage}: {bad.size} of {conv.size} right-hand side(s) did not converge "
            f"(class(es) {bad.tolist()}, relative residual(s) {np.round(resid, 8).tolist()}, "
            f"rtol {rtol}): {why}.")
