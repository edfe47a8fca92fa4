"""Linear solves (A + δI) X = B for the K class right-hand sides, one interface for all methods.

Every solver takes the operator it needs and the right-hand sides and returns a `SolveResult`
(value, steps, residual, converged, negative_curvature, status):

* `solve_cg(matvec, B, *, damping, rtol, atol, max_steps, precond)`: batched (preconditioned)
  conjugate gradient, each right-hand side stopping on its own relative residual, as one
  compiled loop; `solve_cg_stepped` runs the same steps from the host (for XLA:CPU);
* `solve_dense(matvec, B, *, damping, ...)`: the dense reference (materialises A);
* `solve_lissa(batch_matvec, B, n_batches, *, scale, damping, ...)`: the stochastic Neumann
  recursion of LiSSA;
* `pareto_jax.kfac.solve_kfac(factors, B, *, damping)`: K-FAC / EK-FAC (Kronecker factors).

`damping` is δ everywhere: the system is (A + δI) with A the curvature of the training objective,
which already holds the weight decay λ. The solver objects users choose between
(`pareto_jax.influence.solvers`) are built on these functions. What is shared by all of them
lives here once: the "auto" damping (`resolve_damping`), damping
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
from .results import Status


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
        status: `results.Status` per right-hand side: SUCCESS (converged), ITERATION_LIMIT,
            NUMERICAL (negative curvature, divergence) or APPROXIMATE (K-FAC / EK-FAC: their
            factored system solved exactly, which bounds nothing on the true one).
    """

    value: jax.Array
    steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array
    status: jax.Array


def status_of(converged, negative_curvature):
    """The per-right-hand-side status of an iterative or direct solve."""
    return jnp.where(converged, int(Status.SUCCESS),
        jnp.where(negative_curvature, int(Status.NUMERICAL), int(Status.ITERATION_LIMIT))
    ).astype(jnp.int32)


def _squeeze(res: SolveResult, single: bool) -> SolveResult:
    return jax.tree_util.tree_map(lambda a: a[0], res) if single else res


class CGState(NamedTuple):
    """Batched CG state (leading K axis): iterate, residual, direction, rᵀz, still active,
    steps taken, negative curvature met, iteration count."""

    x: jax.Array
    r: jax.Array
    p: jax.Array
    rz: jax.Array
    active: jax.Array
    steps: jax.Array
    neg: jax.Array
    it: jax.Array


def _dot(u, v):
    return jnp.sum(u * v, axis=1)


def _tolerance(b, rtol, atol):
    bnorm = jnp.sqrt(_dot(b, b))
    return bnorm, jnp.maximum(rtol * bnorm, atol)


def cg_start(b, x, r, z, tol) -> CGState:
    """The state before the first step, from x, its residual r = b − (A + δI)x and z = M⁻¹r."""
    K = b.shape[0]
    return CGState(x, r, z, _dot(r, z), jnp.sqrt(_dot(r, r)) > tol, jnp.zeros(K, jnp.int32),
        jnp.zeros(K, bool), jnp.zeros((), jnp.int32))


def cg_advance(c: CGState, Ap):
    """First half of a step, given Ap = (A + δI)p: the step length, x and r. Returns the new
    state (direction not yet updated) and which right-hand sides took the step."""
    pAp = _dot(c.p, Ap)
    bad = c.active & (pAp <= 0)
    ok = c.active & ~bad
    alpha = jnp.where(ok, c.rz / jnp.where(ok, pAp, 1.0), 0.0)
    return c._replace(
        x=c.x + alpha[:, None] * c.p, r=c.r - alpha[:, None] * Ap, neg=c.neg | bad
    ), ok


def cg_direction(c: CGState, ok, z, tol) -> CGState:
    """Second half of a step, given z = M⁻¹r for the new r: the new direction and who stays
    active (each right-hand side stops on its own unpreconditioned residual)."""
    rz_new = _dot(c.r, z)
    beta = jnp.where(ok, rz_new / jnp.where(ok, c.rz, 1.0), 0.0)
    return c._replace(p=jnp.where(ok[:, None], z + beta[:, None] * c.p, c.p),
        rz=jnp.where(ok, rz_new, c.rz), steps=c.steps + ok.astype(jnp.int32),
        active=ok & (jnp.sqrt(_dot(c.r, c.r)) > tol), it=c.it + 1)


def cg_result(b, x, true_r, steps, neg, rtol, atol) -> SolveResult:
    """The `SolveResult` of a finished CG run, judged on the recomputed residual true_r."""
    bnorm, tol = _tolerance(b, rtol, atol)
    rnorm = jnp.sqrt(_dot(true_r, true_r))
    rel = rnorm / jnp.where(bnorm > 0, bnorm, 1.0)
    conv = (rnorm <= jnp.maximum(tol, 0.0) * (1 + 1e-3)) | (rel <= rtol * 1.001) | (bnorm == 0)
    return SolveResult(x, steps, rel, conv & ~neg, neg, status_of(conv & ~neg, neg))


def solve_cg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, damping: float,
    rtol: float = 1e-6, atol: float = 0.0, max_steps: int | None = None,
    x0: jax.Array | None = None, precond: Callable[[jax.Array], jax.Array] | None = None
) -> SolveResult:
    """Conjugate gradient for (A + δI) x = b, batched over the rows of b (one compiled loop).

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
        `SolveResult`. Jittable; nothing raises on values (see `check_solve`). `solve_cg_stepped`
        runs the same steps with the loop on the host.
    """
    single = b.ndim == 1
    b = b[None] if single else b
    max_steps = int(min(10 * b.shape[1], 1000) if max_steps is None else max_steps)
    mv = jax.vmap(lambda v: matvec(v) + damping * v)
    pre = (lambda r: r) if precond is None else jax.vmap(precond)
    _, tol = _tolerance(b, rtol, atol)
    x = jnp.zeros_like(b) if x0 is None else jnp.broadcast_to(x0, b.shape)
    r = b - mv(x) if x0 is not None else b
    init = cg_start(b, x, r, pre(r), tol)

    def body(c):
        c, ok = cg_advance(c, mv(c.p))
        return cg_direction(c, ok, pre(c.r), tol)

    c = jax.lax.while_loop(lambda c: jnp.any(c.active) & (c.it < max_steps), body, init)
    res = cg_result(b, c.x, b - mv(c.x), c.steps, c.neg, rtol, atol)
    return _squeeze(res, single)


_cg_start = jax.jit(cg_start)
_cg_advance = jax.jit(cg_advance)
_cg_direction = jax.jit(cg_direction)
_cg_result = jax.jit(cg_result)


def _bucket(count: int, total: int) -> int:
    """The smallest power of two >= count, capped at total (few distinct shapes to compile)."""
    return min(total, 1 << max(count - 1, 0).bit_length())


def solve_cg_stepped(matvec_batched: Callable[[jax.Array], jax.Array], b: jax.Array, *,
    damping: float, rtol: float = 1e-6, atol: float = 0.0, max_steps: int | None = None,
    precond_batched: Callable[[jax.Array], jax.Array] | None = None, progress: bool = False
) -> SolveResult:
    """`solve_cg` with the iterations driven from the host: the same steps (`cg_advance`,
    `cg_direction`, jitted), with ``matvec_batched(V) -> A V`` (itself free to loop over data
    chunks on the host). Only the right-hand sides still active are multiplied (padded to a
    power of two, so at most log2(K) + 1 shapes compile): a converged row costs nothing more.
    For XLA:CPU, where model gradients inside a compiled loop are slow (see
    `pareto_jax.kernels`). Not jittable; b is (K, P)."""
    b = jnp.asarray(b)
    K = b.shape[0]
    max_steps = int(min(10 * b.shape[1], 1000) if max_steps is None else max_steps)
    dt = b.dtype
    dmp, rt, at = (jnp.asarray(v, dt) for v in (damping, rtol, atol))
    mv = lambda V: matvec_batched(V) + dmp * V  # noqa: E731
    pre = (lambda r: r) if precond_batched is None else precond_batched
    _, tol = _tolerance(b, rt, at)
    c = _cg_start(b, jnp.zeros_like(b), b, pre(b), tol)
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        bar = tqdm(total=max_steps, desc="influence CG", unit="step", leave=False,
            mininterval=0.1 if tty else 10.0, ascii=not tty)
    while int(c.it) < max_steps:
        active = np.flatnonzero(np.asarray(c.active))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(unsolved=f"{active.size}/{K}", refresh=False)
        if active.size == 0:
            break
        rows = np.concatenate(
            [active, np.repeat(active[:1], _bucket(active.size, K) - active.size)]
        )
        Ap = jnp.zeros_like(c.p).at[active].set(mv(c.p[rows])[: active.size])
        c, ok = _cg_advance(c, Ap)
        c = _cg_direction(c, ok, pre(c.r), tol)
    if bar is not None:
        bar.close()
    return _cg_result(b, c.x, b - mv(c.x), c.steps, c.neg, rt, at)


def materialize(matvec: Callable[[jax.Array], jax.Array], dim: int, dtype=jnp.float32) -> jax.Array:
    """The dense matrix of a symmetric linear operator (columns are matvec of basis vectors)."""
    return jax.lax.map(matvec, jnp.eye(dim, dtype=dtype))


def solve_dense(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, damping: float,
    rtol: float = 1e-6, atol: float = 0.0, max_steps: int | None = None, x0: jax.Array | None = None
) -> SolveResult:
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
    return _squeeze(
        SolveResult(x, jnp.zeros(b.shape[0], jnp.int32), rel, conv, neg, status_of(conv, neg)),
        single)


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


def solve_lissa(batch_matvec, b, n_batches: int, *, scale: float, damping: float,
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
        delta = jnp.linalg.norm(v_new - v, axis=1) / jnp.maximum(
            jnp.linalg.norm(v_new, axis=1), 1e-30
        )
        bad = ~jnp.all(jnp.isfinite(v_new), axis=1) | (
            jnp.linalg.norm(v_new, axis=1) > 1e6 * bnorm * scale
        )
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
    return SolveResult(x, steps, jnp.where(done, 0.0, jnp.nan), done & ~diverged, diverged,
        status_of(done & ~diverged, diverged))


# ---------------------------------------------------------------------------- shared by all methods


def with_residual(res: SolveResult, matvec: Callable, b: jax.Array, damping: float) -> SolveResult:
    """`res` with its residual recomputed against the true operator A + δI (for methods that
    solve an approximation of A: LiSSA's minibatches, K-FAC's factors). `matvec` is batched:
    V (K, P) -> A V."""
    r = b - matvec(res.value) - damping * res.value
    rel = jnp.linalg.norm(r, axis=1) / jnp.maximum(jnp.linalg.norm(b, axis=1), 1e-30)
    return res._replace(residual=rel)


def resolve_rtol(setting: float | str, dtype) -> float:
    """The stopping tolerance: a number as given, or "auto": 1e-6, or 1000 machine epsilons where
    the dtype cannot reach that (float32: 1.2e-4; a float32 CG's recomputed residual stalls near
    1e-5 on ill-conditioned systems, so 1e-6 would report good answers as unconverged)."""
    if not isinstance(setting, str):
        return setting  # (a number, or a traced scalar in `influence_matrix`)
    return float(min(1e-2, max(1e-6, 1000 * float(jnp.finfo(dtype).eps))))


def resolve_damping(setting: float | str, matvec: Callable, theta: jax.Array, seed: int) -> float:
    """The damping to start from: a number as given, or "auto" (`kernels.hutchinson_damping`;
    `matvec` batched)."""
    return hutchinson_damping(matvec, theta, seed) if setting == "auto" else float(setting)


def smallest_eigenvalue(
    matvec: Callable, dim: int, dtype, *, steps: int = 40, seed: int = 0
) -> float:
    """An estimate of the smallest eigenvalue of the symmetric operator `matvec` (one vector ->
    one vector): the smallest Ritz value of `steps` Lanczos steps from a random start, with full
    re-orthogonalisation. It converges to the extreme eigenvalues first and is never below the
    true smallest eigenvalue (a Ritz value lies inside the spectrum), so a negative answer proves
    the operator indefinite. Host-stepped; used to explain a refused solve."""
    steps = int(min(steps, dim))
    v = jax.random.normal(jax.random.PRNGKey(seed), (dim,), dtype)
    v = v / jnp.linalg.norm(v)
    basis, alphas, betas = [v], [], []
    for j in range(steps):
        w = matvec(basis[-1])  # (not jitted here: that would bake the data in as constants)
        a = jnp.vdot(basis[-1], w)
        V = jnp.stack(basis)
        w = w - V.T @ (V @ w)  # full re-orthogonalisation (twice is enough)
        w = w - V.T @ (V @ w)
        alphas.append(float(a))
        b = float(jnp.linalg.norm(w))
        if j == steps - 1 or b <= 1e-12 * max(1.0, abs(float(a))):
            break
        betas.append(b)
        basis.append(w / b)
    T = (
        np.diag(alphas)
        + np.diag(betas[: len(alphas) - 1], 1)
        + np.diag(betas[: len(alphas) - 1], -1)
    )
    return float(np.linalg.eigvalsh(T)[0])


def needs_more_damping(res: SolveResult) -> bool:
    """The damped operator was not positive definite as the solver saw it (negative curvature,
    LiSSA divergence) or the solution is not finite (e.g. K-FAC with an empty eigen-direction
    and no damping)."""
    value = np.asarray(res.value)
    return bool(np.any(np.asarray(res.negative_curvature))) or not bool(np.all(np.isfinite(value)))


def solve_escalating(
    solve: Callable[[float], SolveResult], damping: float, *, escalate: bool = True, tries: int = 7
) -> tuple[SolveResult, float, list[dict]]:
    """solve(damping) -> SolveResult; while `needs_more_damping`, retry with damping ×10 (at
    least 1e-6), up to `tries` solves. Returns (result, damping used, escalations tried)."""
    escalations: list[dict] = []
    for attempt in range(tries):
        res = solve(damping)
        if not (escalate and needs_more_damping(res)) or attempt == tries - 1:
            break
        why = (
            "negative curvature"
            if bool(np.any(np.asarray(res.negative_curvature)))
            else "non-finite solution"
        )
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
        why = (
            "negative curvature met (raise damping or use curvature='gauss_newton')"
            if neg.any()
            else "tolerance not reached (raise max_steps or damping)"
        )
        raise checks.NumericalError(
            f"{stage}: {bad.size} of {conv.size} right-hand side(s) did not converge "
            f"(class(es) {bad.tolist()}, relative residual(s) {np.round(resid, 8).tolist()}, "
            f"rtol {rtol}): {why}."
        )
