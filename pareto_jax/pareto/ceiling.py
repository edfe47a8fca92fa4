"""Is there room for a first-order Pareto improvement? The ceiling test (``docs/method.md``).

A first-order Pareto improvement exists iff some weights w have Σ_i (w_i − 1) P[i, k] > 0 for
every class k. The LP ``max t s.t. Σ_i d_i P[i,k] >= t ∀k, −1 <= d_i <= 1`` decides it: t* > 0
means improvable; otherwise its dual λ >= 0, Σλ = 1, with Pλ = 0 is the certificate (Gordan's
theorem of the alternative). `ceiling_test` solves it on the device by the bounded dual simplex
(`ceiling_program`, pure JAX: jit it, vmap it over a stack of P); HiGHS is the reference
(``solver="highs"``). The original method's PCA heuristic is reported beside it, labelled as a
heuristic.

Both solve the LP on P with each column divided by its L1 norm (a positive rescaling of the
classes, which changes no verdict: some d has Pᵀd > 0 iff some d has (PD)ᵀd > 0): classes whose
influences differ in scale by 1e16, or subnormal entries, get the verdict of the exact LP instead
of being lost to the solver's tolerances. t* is therefore in units of each class's own total
|influence| (so 0 <= t* <= 1), the certificate λ is mapped back to P's columns.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from ..config import PROGRAM_SOLVERS
from ..results import message as status_message
from ..results import pytree_result, raise_for_status
from . import highs, simplex
from .device import pad_rows


@pytree_result(data=("direction", "predicted_gains", "certificate"))
@dataclasses.dataclass(frozen=True)
class CeilingResult:
    """Outcome of `ceiling_test`.

    Attributes:
        improvable: t* > tol: a first-order Pareto improvement exists.
        t_star: optimal t of the column-scaled LP (module docstring): the guaranteed predicted
            loss decrease of the worst class for the step w = 1 + d, each class's in units of
            its own Σ_i |P[i, k]| (0 <= t* <= 1).
        direction: the optimal d ∈ [−1, 1]^N.
        predicted_gains: Pᵀd, the predicted loss decrease of every class for w = 1 + d (in
            units of P).
        certificate: λ >= 0 with Σλ = 1 (the LP dual, for P's own columns). When not
            improvable, Pλ = 0: every influence vector lies on the hyperplane with non-negative
            normal λ.
        certificate_residual: ‖P D λ'‖₁ for the scaled LP's dual λ' (equals t* by LP duality).
        tol: the threshold used on t* (scale-free).
        pca_explained_ratio: first principal component's explained-variance ratio of centred P.
        pca_heuristic_improvable: pca_explained_ratio > 0.2 (the original method's
            **heuristic**; the exact answer is `improvable`).
        status, message: solver status (scipy linprog codes).

    Example:
        >>> import numpy as np
        >>> from pareto_jax import ceiling_test
        >>> r = ceiling_test(np.array([[1.0, 0.5], [-0.2, 0.3], [0.4, -0.1]]))
        >>> r.improvable, sorted(r.summary())[:3]
        (True, ['certificate', 'certificate_residual', 'improvable'])
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
        return {"improvable": self.improvable, "t_star": self.t_star, "tol": self.tol,
            "predicted_gains": self.predicted_gains.tolist(),
            "certificate": self.certificate.tolist(),
            "certificate_residual": self.certificate_residual,
            "pca_explained_ratio (heuristic)": self.pca_explained_ratio,
            "pca_heuristic_improvable": self.pca_heuristic_improvable, "status": self.status,
            "message": self.message}


def pca_explained_ratio(P) -> float:
    """Explained-variance ratio of the first principal component of the centred P (heuristic)."""
    P = np.asarray(P, np.float64)
    s = np.linalg.svd(P - P.mean(0), compute_uv=False)
    tot = float((s**2).sum())
    return float(s[0] ** 2 / tot) if tot > 0 else 0.0


def ceiling_test(
    P, *, tol: float | None = None, solver: str = "device", throw: bool = True
) -> CeilingResult:
    """Decide whether a first-order Pareto improvement exists (exact LP) and report the heuristic.

    Args:
        P: influence matrix (N, K).
        tol: threshold on t* (scale-free, see `CeilingResult.t_star`; default 1e-9).
        solver: "device" (the bounded dual simplex in JAX, `ceiling_program`) or "highs"
            (the host reference).
        throw: raise `NumericalError` when the LP fails (the default: the ceiling LP is always
            feasible, so a failure is numerical and its t* means nothing); False returns the
            result with its status, `improvable` False.

    Returns:
        `CeilingResult`.

    Example:
        >>> import numpy as np
        >>> P = np.array([[1.0, -1.0], [-2.0, 2.0], [0.5, -0.5]])   # on the line y = −x
        >>> r = ceiling_test(P)
        >>> r.improvable, np.round(r.certificate, 3).tolist()
        (False, [0.5, 0.5])
    """
    P = checks.as_influence_matrix(P)
    if P.shape[1] > P.shape[0]:
        checks.fail("P", f"shape {P.shape}: more classes than training samples",
            "an influence matrix (n_train, n_classes), one row per training sample",
            "pass P, not its transpose (P.T)")
    norms = np.abs(P).sum(0)
    if norms.max() == 0:
        checks.fail("P", "an all-zero matrix", "an influence matrix with some non-zero entry",
            "check that the model and data produced gradients")
    if tol is not None:
        checks.check_positive(tol, "tol", allow_zero=True)
    tol = 1e-9 if tol is None else float(tol)
    checks.check_choice(solver, "solver", PROGRAM_SOLVERS)
    # the columns scaled on the host, in float64: XLA:CPU flushes subnormal inputs to zero
    cn = np.where(norms > 0, norms, 1.0)
    if solver == "highs":
        res, d, t, lam_s = highs.ceiling_lp(P / cn)
        status, message = int(res.status), res.message
        if d is None:  # no answer: nothing to report but the status
            d, t, lam_s = np.zeros(P.shape[0]), float("nan"), np.full(P.shape[1], 1.0 / P.shape[1])
        lam = lam_s / (cn / cn.max())  # (relative: no overflow for tiny columns)
        lam, resid = lam / lam.sum(), float(np.abs((P / cn) @ lam_s).sum())
    else:
        n = P.shape[0]  # N padded with zero rows: one compile serves many N
        with jax.enable_x64(True):
            sol = _ceiling_jit(jnp.asarray(pad_rows(P / cn)))
            sol = jax.tree_util.tree_map(np.asarray, sol)
        status, d, t, lam = (int(sol.status), np.asarray(sol.direction[:n], np.float64),
            float(sol.t_star), np.asarray(sol.certificate, np.float64) / (cn / cn.max()))
        lam, resid, message = (lam / lam.sum(), float(sol.certificate_residual),
            status_message(status))
    if throw:
        raise_for_status(status, f"ceiling test LP ({solver})")
    ratio = pca_explained_ratio(P)
    return CeilingResult(improvable=bool(status == 0 and t > tol), t_star=float(t), direction=d,
        predicted_gains=P.T @ d, certificate=np.asarray(lam, np.float64),
        certificate_residual=resid, tol=tol, pca_explained_ratio=ratio,
        pca_heuristic_improvable=bool(ratio > 0.2), status=status, message=message)


class CeilingSolution(NamedTuple):
    """What `ceiling_program` returns (arrays): t* (of the column-scaled LP), the direction
    d ∈ [−1, 1]^N, the certificate λ (K,) (>= 0, Σλ = 1, for P's columns), ‖PDλ'‖₁ (= t*), the
    simplex status and iterations."""

    t_star: jax.Array
    direction: jax.Array
    certificate: jax.Array
    certificate_residual: jax.Array
    status: jax.Array
    iterations: jax.Array


def _ceiling_lp(Ps):
    """The ceiling LP's columns (d, t, s) in the simplex's form: (A, cost, l, u)."""
    n, K = Ps.shape
    dt = Ps.dtype
    A = jnp.concatenate([Ps.T, -jnp.ones((K, 1), dt), -jnp.eye(K, dtype=dt)], 1)
    cost = jnp.zeros(n + 1 + K, dt).at[n].set(-1.0)
    l = jnp.concatenate([-jnp.ones(n, dt), jnp.zeros(1 + K, dt)])
    u = jnp.concatenate([jnp.ones(n, dt), jnp.full(1 + K, jnp.inf, dt)])
    return A, cost, l, u


def ceiling_program(
    P, *, n_breaks: int = 4096, n_sub: int = 512, max_iter: int | None = None
) -> CeilingSolution:
    """The exact ceiling test on the device: max t s.t. (PD)ᵀd >= t·1, −1 <= d <= 1, t >= 0 (t = 0
    is always feasible; D scales each column to unit L1 norm, see the module docstring), by the
    bounded dual simplex on the whole problem (K rows).

    Columns (d, t, s) with Pᵀd − t·1 − s = 0, s >= 0; the start is the basis {t, s_k (k > 0)},
    whose duals y = e_0 are dual feasible (every d_i at the sign of P[i, 0]). For N > 4·n_sub
    the LP of every (N // n_sub)-th row is solved first and its optimal basis, whose columns
    are columns of the whole LP, starts the whole solve (dual feasible there too: its duals
    price every other d_i by its sign), which then needs a few pivots instead of hundreds.
    At the optimum the row duals, normalised, are the certificate λ: t* = min over the simplex
    of ‖Pλ‖₁ (LP duality), so t* = 0 exactly when Pλ = 0 (Gordan). Pure JAX: jit, vmap.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from pareto_jax import ceiling_program
        >>> a = np.random.default_rng(0).normal(size=(50, 1))
        >>> Ps = jnp.asarray(np.stack([np.hstack([a, -a]), np.hstack([a, 1 - a])]))  # at, off
        >>> sols = jax.jit(jax.vmap(ceiling_program))(Ps)
        >>> [bool(t > 1e-9) for t in sols.t_star]
        [False, True]
    """
    n, K = P.shape
    dt = P.dtype
    norms = jnp.sum(jnp.abs(P), 0)
    cn = jnp.where(norms > 0, norms, 1.0)  # each class in units of its own total |influence|
    Ps = P / cn
    A, cost, l, u = _ceiling_lp(Ps)
    basis0 = jnp.concatenate([jnp.array([n]), n + 1 + jnp.arange(1, K)])
    its = jnp.zeros((), jnp.int32)
    if n > 4 * n_sub:
        stride = n // n_sub
        rows = jnp.arange(n_sub) * stride
        A_s, cost_s, l_s, u_s = _ceiling_lp(Ps[rows])
        sub = simplex.dual_simplex(A_s, jnp.zeros(K, dt), cost_s, l_s, u_s,
            jnp.concatenate([jnp.array([n_sub]), n_sub + 1 + jnp.arange(1, K)]),
            max_iter=20 * K + n_sub, n_breaks=n_sub)
        mapped = jnp.where(
            sub.basis < n_sub, rows[jnp.minimum(sub.basis, n_sub - 1)], sub.basis - n_sub + n
        )
        basis0 = jnp.where(sub.status == 0, mapped, basis0)
        its = sub.iterations
    res = simplex.dual_simplex(A, jnp.zeros(K, dt), cost, l, u, basis0,
        max_iter=max_iter or 20 * K + n // 8 + 100, n_breaks=n_breaks)
    d = res.x[:n]
    lam_s = jnp.maximum(res.y, 0.0)
    lam_s = lam_s / jnp.maximum(jnp.sum(lam_s), jnp.finfo(dt).tiny)
    lam = lam_s / cn  # the scaled LP's dual mapped back to P's columns
    lam = lam / jnp.maximum(jnp.sum(lam), jnp.finfo(dt).tiny)
    t = jnp.maximum(jnp.min(d @ Ps), 0.0)
    return CeilingSolution(
        t, d, lam, jnp.sum(jnp.abs(Ps @ lam_s)), res.status, res.iterations + its
    )


_ceiling_jit = jax.jit(ceiling_program)
