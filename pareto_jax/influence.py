"""Category-wise influence functions (DESIGN §2–3).

The influence of training sample z_i on class k is

    P[i, k] = (1/N) · ∇L(S^k; θ)ᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ),

where L(S^k) is the mean loss over the validation samples of class k and H is the Hessian (or
Gauss-Newton matrix) of the training objective L_T(θ) = (1/N) Σ_i ℓ(z_i; θ) + (λ/2)‖θ‖².
**P > 0 means beneficial**: up-weighting z_i by ε changes class k's validation loss by −ε·P[i, k]
(to first order), and removing z_i raises it by about P[i, k].

Only K inverse-Hessian solves are needed (one per class). The pieces:

* `class_gradients`: g_k for all K classes in one pass over the validation set.
* `make_hvp`: (H + δI)·v of the full training objective, accumulated over minibatches
  (forward-over-reverse), or the Gauss-Newton product.
* `solve_cg` / `solve_dense`: batched conjugate gradient (each right-hand side stops on its own
  relative residual) and the dense reference, with one signature.
* `influence_from_solutions`: P from the K solutions, by forward mode (`jvp` of the per-sample
  loss vector along each u_k; never materialises per-sample gradients) or by chunked
  `vmap(grad)` per-sample gradients.
* `linear_influence`: closed form for softmax regression / a last-layer head (the oracle).
* `category_influence`: the entry point that validates input and returns P with diagnostics.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _checks

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

JOINT_POSITIVE, TRADE_OFF, JOINT_NEGATIVE = 1, 0, -1
REGION_NAMES = {JOINT_POSITIVE: "joint-positive", TRADE_OFF: "trade-off", JOINT_NEGATIVE: "joint-negative"}


# ----------------------------------------------------------------------------- linear solvers


class SolveResult(NamedTuple):
    """Result of a (batched) linear solve (H + δI) X = B. Arrays have a leading K axis.

    Attributes:
        value: the solutions, shape (K, P).
        steps: iterations taken per right-hand side (0 for the dense solve).
        residual: relative residual ‖B − (H + δI)X‖ / ‖B‖ per right-hand side, recomputed at the end.
        converged: residual <= rtol (or <= atol / ‖B‖).
        negative_curvature: CG met pᵀ(H + δI)p <= 0 (the damped curvature is not positive definite).
    """

    value: jax.Array
    steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


def _batched(matvec):
    return jax.vmap(matvec)


def solve_cg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, damping: float = 0.0,
             rtol: float = 1e-6, atol: float = 0.0, max_steps: int | None = None,
             x0: jax.Array | None = None) -> SolveResult:
    """Conjugate gradient for (A + δI) x = b, batched over the rows of b.

    Args:
        matvec: v (P,) -> A v, A symmetric positive (semi)definite. It is `vmap`-ed over the
            right-hand sides.
        b: right-hand sides, shape (K, P) (or (P,) for one).
        damping: δ added to the diagonal.
        rtol, atol: each right-hand side stops once ‖r‖ <= max(rtol·‖b‖, atol).
        max_steps: iteration cap (default 10·P, at most 1000).
        x0: initial guess (default zeros).

    Returns:
        `SolveResult`. Jittable; nothing raises on values (see `check_solve`).
    """
    single = b.ndim == 1
    b = b[None] if single else b
    P = b.shape[1]
    max_steps = int(min(10 * P, 1000) if max_steps is None else max_steps)
    mv = _batched(lambda v: matvec(v) + damping * v)
    dot = lambda u, v: jnp.sum(u * v, axis=1)  # noqa: E731
    bnorm = jnp.sqrt(dot(b, b))
    tol = jnp.maximum(rtol * bnorm, atol)
    x = jnp.zeros_like(b) if x0 is None else jnp.broadcast_to(x0, b.shape)
    r = b - mv(x) if x0 is not None else b
    rs = dot(r, r)
    active = jnp.sqrt(rs) > tol
    init = (x, r, r, rs, active, jnp.zeros(b.shape[0], jnp.int32), jnp.zeros(b.shape[0], bool), 0)

    def cond(c):
        return jnp.any(c[4]) & (c[7] < max_steps)

    def body(c):
        x, r, p, rs, active, steps, neg, it = c
        Ap = mv(p)
        pAp = dot(p, Ap)
        bad = active & (pAp <= 0)
        ok = active & ~bad
        alpha = jnp.where(ok, rs / jnp.where(ok, pAp, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rs_new = dot(r, r)
        beta = jnp.where(ok, rs_new / jnp.where(ok, rs, 1.0), 0.0)
        p = jnp.where(ok[:, None], r + beta[:, None] * p, p)
        steps = steps + ok.astype(jnp.int32)
        rs = jnp.where(ok, rs_new, rs)
        active = ok & (jnp.sqrt(rs_new) > tol)
        return x, r, p, rs, active, steps, neg | bad, it + 1

    x, _, _, _, _, steps, neg, _ = jax.lax.while_loop(cond, body, init)
    true_r = b - mv(x)
    rnorm = jnp.sqrt(dot(true_r, true_r))
    rel = rnorm / jnp.where(bnorm > 0, bnorm, 1.0)
    conv = (rnorm <= jnp.maximum(tol, 0.0) * (1 + 1e-3)) | (rel <= rtol * 1.001) | (bnorm == 0)
    res = SolveResult(x, steps, rel, conv & ~neg, neg)
    if single:
        res = jax.tree_util.tree_map(lambda a: a[0], res)
    return res


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
    res = SolveResult(x, jnp.zeros(b.shape[0], jnp.int32), rel, conv, neg)
    if single:
        res = jax.tree_util.tree_map(lambda a: a[0], res)
    return res


def check_solve(res: SolveResult, *, rtol: float, stage: str = "inverse-HVP solve") -> None:
    """Raise `NumericalError` (outside jit) if a solve failed, with the residuals."""
    val = np.asarray(res.value)
    _checks.check_finite_array(val, "solution", stage)
    conv = np.asarray(res.converged)
    if not conv.all():
        bad = np.flatnonzero(~conv)
        resid = np.asarray(res.residual)[bad]
        neg = np.asarray(res.negative_curvature)[bad]
        why = "negative curvature met (raise damping or use curvature='gauss_newton')" if neg.any() \
            else "tolerance not reached (raise max_steps or damping)"
        raise _checks.NumericalError(
            f"{stage}: {bad.size} of {conv.size} right-hand side(s) did not converge "
            f"(class(es) {bad.tolist()}, relative residual(s) {np.round(resid, 8).tolist()}, "
            f"rtol {rtol}): {why}.")


# ----------------------------------------------------------------------------- data plumbing


def _pad_chunks(x: np.ndarray, y: np.ndarray, chunk: int):
    """Reshape (n, ...) into (n_chunks, chunk, ...) with zero padding and a 0/1 mask."""
    n = x.shape[0]
    chunk = max(1, min(int(chunk), n))
    nc = -(-n // chunk)
    chunk = -(-n // nc)  # balance the chunks so padding stays below one sample per chunk
    pad = nc * chunk - n
    if pad:
        x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
    m = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    return (x.reshape(nc, chunk, *x.shape[1:]), y.reshape(nc, chunk), m.reshape(nc, chunk))


@functools.lru_cache(maxsize=256)
def _flat_fns(loss_fn, apply, treedef, spec):
    """Cached flat-θ versions of loss_fn/apply, so jitted callers see the same function each call."""
    sizes = [int(np.prod(shape)) for shape, _ in spec]
    splits = np.cumsum(sizes)[:-1].tolist()

    def unravel(theta):
        parts = jnp.split(theta, splits) if splits else [theta]
        leaves = [p.reshape(shape).astype(dt) for p, (shape, dt) in zip(parts, spec)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    f = None if loss_fn is None else (lambda theta, x, y: loss_fn(unravel(theta), x, y))
    g = None if apply is None else (lambda theta, x: apply(unravel(theta), x[None])[0])
    return f, g, unravel


def _flat(loss_fn: LossFn, params, apply=None):
    """(θ flat, unravel, f(θ, x, y)) with θ in `ravel_pytree` order; f is cached per model."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    spec = tuple((tuple(np.shape(l)), jnp.asarray(l).dtype) for l in leaves)
    theta = jnp.concatenate([jnp.ravel(jnp.asarray(l)) for l in leaves]) if leaves else jnp.zeros(0)
    f, _, unravel = _flat_fns(loss_fn, None, treedef, spec)
    return theta, unravel, f


def _flat_logits(apply, params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    spec = tuple((tuple(np.shape(l)), jnp.asarray(l).dtype) for l in leaves)
    return _flat_fns(None, apply, treedef, spec)[1]


# ----------------------------------------------------------------------------- class gradients


def class_gradients(loss_fn: LossFn, params, x_val, y_val, num_classes: int, *,
                    chunk_size: int = 512) -> jax.Array:
    """g_k = ∇_θ mean_{i: y_i = k} ℓ(z_i; θ) for every class k, as a (K, P) matrix (flat θ).

    One pass over the validation set: the vector-Jacobian product of the per-sample losses with
    the K columns of one_hot(y)/count, in chunks. Every class must be present (validated by
    `category_influence`; here an absent class gives a zero row).
    """
    theta, _, f = _flat(loss_fn, params)
    xc, yc, mc = _pad_chunks(np.asarray(x_val), np.asarray(y_val), chunk_size)
    counts = np.bincount(np.asarray(y_val), minlength=num_classes).astype(np.float64)
    return _class_gradients(f, theta, xc, yc, mc, jnp.asarray(np.maximum(counts, 1), theta.dtype),
                            num_classes)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _class_gradients(f, theta, xc, yc, mc, counts, K):
    return _class_gradients_body(f, theta, xc, yc, mc, counts, K)


def _class_gradients_body(f, theta, xc, yc, mc, counts, K, axis_name=None):
    """Σ over chunks of the class-mean VJPs; with `axis_name`, the local sums are `psum`-ed."""

    def chunk(acc, batch):
        xb, yb, mb = batch
        losses_fn = lambda th: jax.vmap(f, (None, 0, 0))(th, xb, yb)  # noqa: E731
        _, vjp = jax.vjp(losses_fn, theta)
        cot = jax.nn.one_hot(yb, K, dtype=theta.dtype) * mb[:, None].astype(theta.dtype) / counts
        g = jax.vmap(lambda c: vjp(c)[0])(cot.T)
        return acc + g, None

    g, _ = jax.lax.scan(chunk, jnp.zeros((K, theta.size), theta.dtype), (xc, yc, mc))
    return g if axis_name is None else jax.lax.psum(g, axis_name)


# ----------------------------------------------------------------------------- curvature


def _hvp_fn(f, theta, xc, yc, mc, n, weight_decay, curvature, logits_f, axis_name=None):
    """Build v -> H v for the full objective from chunked arrays (all traced arguments).

    With `axis_name` (inside `shard_map`), each device accumulates its own chunks and the data
    term is `psum`-ed over that mesh axis before the weight decay is added.
    """

    def data_term(th, xb, yb, mb):
        return jnp.sum(mb * jax.vmap(f, (None, 0, 0))(th, xb, yb))

    if curvature == "hessian":
        def chunk_hvp(v, xb, yb, mb):
            g = lambda th: jax.grad(data_term)(th, xb, yb, mb)  # noqa: E731
            return jax.jvp(g, (theta,), (v,))[1]
    else:
        def chunk_hvp(v, xb, yb, mb):
            fb = lambda th: jax.vmap(logits_f, (None, 0))(th, xb)  # noqa: E731
            logits, jv = jax.jvp(fb, (theta,), (v,))
            p = jax.nn.softmax(logits, -1)
            hjv = p * jv - p * jnp.sum(p * jv, -1, keepdims=True)
            _, vjp = jax.vjp(fb, theta)
            return vjp(hjv * mb[:, None])[0]

    def hvp(v):
        def body(acc, batch):
            return acc + chunk_hvp(v, *batch), None

        acc, _ = jax.lax.scan(body, jnp.zeros_like(v), (xc, yc, mc))
        if axis_name is not None:
            acc = jax.lax.psum(acc, axis_name)
        return acc / n + weight_decay * v

    return hvp


def make_hvp(loss_fn: LossFn, params, x_train, y_train, *, weight_decay: float,
             batch_size: int = 1024, curvature: str = "hessian", apply=None):
    """v -> ∇²L_T(θ) v (flat v), the minibatch-accumulated HVP of the full training objective.

    With ``curvature="gauss_newton"`` the product is Jᵀ H_CE J v + λv, for softmax cross-entropy
    over the logits of ``apply(params, x_batch)`` (PSD by construction).

    Returns:
        (hvp, theta): a function of v (jitted, the data passed as jit arguments, never captured
        as constants) and the flat parameter vector.
    """
    _checks.check_choice(curvature, "curvature", ("hessian", "gauss_newton"))
    theta, f, logits_f, chunks, n = _hvp_parts(loss_fn, params, x_train, y_train, batch_size,
                                               curvature, apply)
    wd = jnp.asarray(weight_decay, theta.dtype)
    return (lambda v: _hvp_jit(f, curvature, logits_f, v, theta, *chunks, n, wd)), theta


def _curvature_fns(loss_fn, params, curvature, apply):
    """(θ flat, f, logits_f): what an HVP of this curvature needs (logits_f only for Gauss-Newton)."""
    theta, _, f = _flat(loss_fn, params)
    logits_f = None
    if curvature == "gauss_newton":
        if apply is None:
            _checks.fail("apply", "None", "the model's apply(params, x_batch) -> logits",
                         "pass apply= for Gauss-Newton curvature")
        logits_f = _flat_logits(apply, params)
    return theta, f, logits_f


def _hvp_parts(loss_fn, params, x_train, y_train, batch_size, curvature, apply):
    theta, f, logits_f = _curvature_fns(loss_fn, params, curvature, apply)
    xc, yc, mc = _pad_chunks(np.asarray(x_train), np.asarray(y_train), batch_size)
    chunks = (jnp.asarray(xc, theta.dtype), jnp.asarray(yc), jnp.asarray(mc, theta.dtype))
    return theta, f, logits_f, chunks, jnp.asarray(np.asarray(x_train).shape[0], theta.dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _hvp_jit(f, curvature, logits_f, v, theta, xc, yc, mc, n, wd):
    return _hvp_fn(f, theta, xc, yc, mc, n, wd, curvature, logits_f)(v)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 13))
def _solve_jit(solver, f, curvature, logits_f, theta, xc, yc, mc, n, wd, G, damping, rtol, max_steps,
               atol):
    hvp = _hvp_fn(f, theta, xc, yc, mc, n, wd, curvature, logits_f)
    fn = solve_dense if solver == "dense" else solve_cg
    return fn(hvp, G, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps)


# ----------------------------------------------------------------------------- influence matrix


def _per_sample_chunk(f, theta, U, xb, yb):
    G = jax.vmap(jax.grad(f), (None, 0, 0))(theta, xb, yb)  # (c, P)
    return G @ U.T


def _jvp_chunk(f, theta, U, xb, yb):
    losses = lambda th: jax.vmap(f, (None, 0, 0))(th, xb, yb)  # noqa: E731
    _, lin = jax.linearize(losses, theta)
    return jax.vmap(lin)(U).T  # (c, K)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _influence_matrix(f, method, theta, U, xc, yc, mc, n):
    fn = _jvp_chunk if method == "jvp" else _per_sample_chunk
    out = jax.lax.map(lambda b: fn(f, theta, U, b[0], b[1]) * b[2][:, None], (xc, yc, mc))
    return out.reshape(-1, U.shape[0]) / n


def influence_from_solutions(loss_fn: LossFn, params, U: jax.Array, x_train, y_train, *,
                             method: str = "jvp", chunk_size: int = 256) -> jax.Array:
    """P[i, k] = (1/N) u_kᵀ ∇ℓ(z_i) from the K solutions U (K, P), for every training sample.

    Args:
        method: "jvp" (forward mode: K directional derivatives of the per-sample loss vector,
            never an N×P gradient matrix) or "per_sample" (chunked `vmap(grad)` contracted with U).
        chunk_size: samples per chunk; memory grows with it, results do not change.
    """
    _checks.check_choice(method, "method", ("jvp", "per_sample"))
    theta, _, f = _flat(loss_fn, params)
    x, y = np.asarray(x_train), np.asarray(y_train)
    xc, yc, mc = _pad_chunks(x, y, chunk_size)
    out = _influence_matrix(f, method, theta, jnp.asarray(U, theta.dtype), xc, yc,
                            jnp.asarray(mc, theta.dtype), x.shape[0])
    return out[: x.shape[0]]


def per_sample_gradients(loss_fn: LossFn, params, x, y) -> jax.Array:
    """All per-sample gradients as an (n, P) matrix (materialised; small problems and tests)."""
    theta, _, f = _flat(loss_fn, params)
    return jax.jit(jax.vmap(jax.grad(f), (None, 0, 0)))(theta, jnp.asarray(x), jnp.asarray(y))


# ----------------------------------------------------------------------------- linear closed form


def _aug(x):
    return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], -1)


@functools.partial(jax.jit, static_argnums=(5,))
def _linear_hessian(xc, yc, mc, Theta, weight_decay, K):
    d1 = Theta.shape[0]

    def body(acc, b):
        xb, _, mb = b
        xa = _aug(xb)
        p = jax.nn.softmax(xa @ Theta, -1)
        pm = p * mb[:, None]
        # Σ_i m_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ with rows/columns indexed (feature, class);
        # m_i is the 0/1 mask or a per-sample weight, so the outer-product term takes √m_i
        diag = jnp.einsum("ia,ib,ic->acb", xa, xa, pm)
        ps = p * jnp.sqrt(mb)[:, None]
        Z = (ps[:, None, :] * xa[:, :, None]).reshape(xb.shape[0], d1 * K)
        blk = jnp.einsum("acb,cd->acbd", diag, jnp.eye(K, dtype=xa.dtype)).reshape(d1 * K, d1 * K)
        return acc + blk - Z.T @ Z, None

    H, _ = jax.lax.scan(body, jnp.zeros((d1 * K, d1 * K), Theta.dtype), (xc, yc, mc))
    return H


def linear_influence(x_train, y_train, x_val, y_val, W, b, *, weight_decay: float,
                     damping: float = 0.0, chunk_size: int = 4096,
                     return_solutions: bool = False, weights=None):
    """Closed-form P for softmax regression logits = x·W + b (or a frozen-feature head).

    Per-sample gradient (p_i − e_{y_i}) ⊗ [x_i, 1]; Hessian (1/N) Σ_i (diag p_i − p_i p_iᵀ) ⊗
    [x_i, 1][x_i, 1]ᵀ + λI, built in chunks and solved by Cholesky. Then
    P[i, k] = (1/N) [x_i, 1]ᵀ U_k (p_i − e_{y_i}) with U_k the k-th solution as a (d+1, K) matrix.
    No autodiff anywhere: this is the speed path and the oracle for the generic path.

    Args:
        x_train, y_train, x_val, y_val: features (n, d) and integer labels.
        W, b: kernel (d, K) and bias (K,).
        weight_decay: λ of the training objective (applied to W and b).
        damping: δ added to the Hessian.
        weights: per-sample weights v the model was trained with, for the objective
            (1/N) Σ v_i ℓ_i + (λ/2)‖θ‖²: the Hessian is weighted by v and row i of P is
            v_i · (1/N) g_kᵀ H_v⁻¹ ∇ℓ_i, the influence of *multiplying* v_i by (1 + ε), so the
            program's weights w act multiplicatively on v (None: all ones).

    Returns:
        P (N, K) (and U as (K, d+1, K) if `return_solutions`).
    """
    W = jnp.asarray(W)
    dt = W.dtype
    Theta = jnp.concatenate([W, jnp.asarray(b, dt)[None]], 0)  # (d+1, K)
    d1, K = Theta.shape
    xt, yt = np.asarray(x_train), np.asarray(y_train)
    xv, yv = np.asarray(x_val), np.asarray(y_val)
    n = xt.shape[0]
    xc, yc, mc = _pad_chunks(xt, yt, chunk_size)
    if weights is not None:
        v = np.zeros(mc.size, np.float64)
        v[:n] = np.asarray(weights, np.float64)
        mc = mc * v.reshape(mc.shape)
    mc = jnp.asarray(mc, dt)
    H = _linear_hessian(jnp.asarray(xc, dt), yc, mc, Theta, weight_decay, K) / n
    H = H + (weight_decay + damping) * jnp.eye(d1 * K, dtype=dt)
    G = _linear_class_grads(jnp.asarray(xv, dt), jnp.asarray(yv), Theta, K)  # (K, d1*K)
    cho = jax.scipy.linalg.cho_factor(H)
    U = jax.scipy.linalg.cho_solve(cho, G.T).T.reshape(K, d1, K)
    P = _linear_P(jnp.asarray(xc, dt), yc, mc, Theta, U).reshape(-1, K)[:n] / n
    return (P, U) if return_solutions else P


@functools.partial(jax.jit, static_argnums=(3,))
def _linear_class_grads(xv, yv, Theta, K):
    xa = _aug(xv)
    r = jax.nn.softmax(xa @ Theta, -1) - jax.nn.one_hot(yv, K, dtype=xa.dtype)
    oh = jax.nn.one_hot(yv, K, dtype=xa.dtype)
    oh = oh / jnp.maximum(oh.sum(0), 1.0)
    # g_k = Σ_i oh[i,k] x̃_i r_iᵀ  -> (K, d+1, K)
    return jnp.einsum("ik,ia,ic->kac", oh, xa, r).reshape(K, -1)


@jax.jit
def _linear_P(xc, yc, mc, Theta, U):
    """Unscaled N·P in chunks: one fused matmul per chunk gives the logits and x̃ᵀU_k for all k.

    Since Σ_c r_ic = 0 (r = p − e_y), x̃ᵀU_k r = Σ_{c<K−1} r_c x̃ᵀ(U_k[:, c] − U_k[:, K−1]), so
    K + K(K−1) columns suffice; the bias row is added after the matmul (no [x, 1] copy).
    """
    K = Theta.shape[1]
    D = U[:, :, :-1] - U[:, :, -1:]                                      # (K, d+1, K−1)
    Df = jnp.transpose(D, (1, 0, 2)).reshape(Theta.shape[0], -1)        # (d+1, K(K−1))
    M = jnp.concatenate([Theta, Df], 1)

    def chunk(b):
        xb, yb, mb = b
        A = xb @ M[:-1] + M[-1]
        r = jax.nn.softmax(A[:, :K], -1) - jax.nn.one_hot(yb, K, dtype=xb.dtype)
        return jnp.einsum("ikc,ic->ik", A[:, K:].reshape(-1, K, K - 1), r[:, :-1]) * mb[:, None]

    return jax.lax.map(chunk, (xc, yc, mc))


# ----------------------------------------------------------------------------- entry point


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """Numerical choices for `category_influence` (the problem itself is passed separately).

    Attributes:
        solver: "cg" (default), "dense" (exact reference; small models), "lissa", "kfac" or
            "ekfac" (see `pareto_jax.estimators`; K-FAC/EK-FAC need `model=`).
        curvature: "auto" (default: "gauss_newton" when `apply` is given, else "hessian"),
            "hessian" or "gauss_newton" (PSD; needs `apply`). The default follows
            bench/bench_estimators.py: against actual retraining on digits, Gauss-Newton CG had
            the best linear datamodeling score on both the MLP (0.68 vs 0.42 for Hessian CG and
            0.52 for the exact Hessian) and the CNN (0.52 vs 0.46), and the best or second-best
            deletion Spearman (−0.41 MLP, −0.63 CNN), at CG's cost and memory.
        damping: δ >= 0, or "auto" = 1e-4 · tr(H)/P (Hutchinson estimate, 8 probes), i.e. a
            small fraction of the mean curvature eigenvalue.
        escalate_damping: if CG meets negative curvature, retry with damping ×10 (up to 6 times);
            every escalation is reported in the result.
        rtol, atol, max_steps: CG stopping rule per class.
        method: "auto", "jvp" or "per_sample" for the P stage.
        chunk_size: training samples per chunk in the P stage.
        hvp_batch_size: samples per minibatch inside each HVP.
        throw: raise `NumericalError` if a solve does not converge (else report it).
    """

    solver: str = "cg"
    curvature: str = "auto"
    damping: float | str = "auto"
    escalate_damping: bool = True
    rtol: float = 1e-6
    atol: float = 0.0
    max_steps: int = 1000
    method: str = "auto"
    chunk_size: int = 256
    hvp_batch_size: int = 1024
    throw: bool = False
    seed: int = 0

    def __post_init__(self):
        _checks.check_choice(self.solver, "solver", ("cg", "dense", "lissa", "kfac", "ekfac"))
        _checks.check_choice(self.curvature, "curvature", ("auto", "hessian", "gauss_newton"))
        if self.damping != "auto":
            _checks.check_positive(self.damping, "damping", allow_zero=True)
        _checks.check_positive(self.rtol, "rtol")
        _checks.check_positive(self.atol, "atol", allow_zero=True)
        _checks.check_positive(self.max_steps, "max_steps", integer=True)
        _checks.check_choice(self.method, "method", ("auto", "jvp", "per_sample"))
        _checks.check_positive(self.chunk_size, "chunk_size", integer=True)
        _checks.check_positive(self.hvp_batch_size, "hvp_batch_size", integer=True)

    @classmethod
    def exact(cls, **kw) -> "InfluenceConfig":
        """Dense Hessian solve, no damping (small models; the reference)."""
        return cls(solver="dense", damping=0.0, **kw)

    @classmethod
    def fast(cls, **kw) -> "InfluenceConfig":
        """Gauss-Newton CG with a loose tolerance (large models, exploratory use)."""
        return cls(curvature="gauss_newton", rtol=1e-4, max_steps=200, **kw)


@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """The influence matrix and how it was obtained.

    Attributes:
        P: (N, K) category-wise influence (P > 0 beneficial).
        method: "jvp", "per_sample" or "closed_form".
        solver, curvature: what computed the inverse-HVPs.
        damping: the damping finally used (after any escalation).
        escalations: damping values tried before, with the reason.
        steps, residual, converged, negative_curvature: per-class solve diagnostics.
        solutions: the K inverse-HVP solutions U (K, P), flat.
    """

    P: jax.Array
    method: str
    solver: str
    curvature: str
    damping: float
    escalations: tuple
    steps: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    negative_curvature: np.ndarray
    solutions: jax.Array | None = None

    @property
    def regions(self) -> np.ndarray:
        return influence_regions(self.P)

    def summary(self) -> dict:
        reg = self.regions
        return {
            "n_train": int(self.P.shape[0]), "num_classes": int(self.P.shape[1]),
            "method": self.method, "solver": self.solver, "curvature": self.curvature,
            "damping": float(self.damping), "escalations": list(self.escalations),
            "cg_steps": np.asarray(self.steps).tolist(),
            "relative_residual": np.asarray(self.residual).tolist(),
            "converged": bool(np.all(self.converged)),
            "regions": {REGION_NAMES[r]: int((reg == r).sum()) for r in REGION_NAMES},
        }


def influence_regions(P) -> np.ndarray:
    """+1 joint-positive (all P[i,k] > 0), −1 joint-negative (all < 0), 0 trade-off."""
    P = np.asarray(P)
    return np.where((P > 0).all(1), JOINT_POSITIVE, np.where((P < 0).all(1), JOINT_NEGATIVE, TRADE_OFF))


def _auto_damping(hvp, theta, seed: int) -> float:
    key = jax.random.PRNGKey(seed)
    z = jax.random.rademacher(key, (8, theta.size), dtype=theta.dtype)
    tr = float(jnp.mean(jax.vmap(hvp)(z) * z) )
    return max(1e-4 * abs(tr), 1e-8)


def _solve_escalating(solve, damping: float, escalate: bool, tries: int = 7):
    """solve(damping) -> SolveResult; on negative curvature retry with damping ×10 (reported)."""
    escalations = []
    for attempt in range(tries):
        res = solve(damping)
        neg = bool(np.any(np.asarray(res.negative_curvature)))
        if not (neg and escalate) or attempt == tries - 1:
            break
        escalations.append({"damping": damping, "reason": "negative curvature"})
        damping = max(10 * damping, 1e-6)
    return res, damping, escalations


def choose_method(num_params: int, num_classes: int, chunk_size: int) -> str:
    """Forward mode unless K is large and a chunk of per-sample gradients is cheap to hold.

    Measured (bench/bench_influence.py, MLP with 66k–74k params, N = 5e4, 2 CPU cores): forward
    mode was 20× faster than per-sample gradients at K = 2, 7.5× at K = 10 and 3.4× at K = 32,
    and it holds chunk × K numbers instead of chunk × P. Its cost grows with K, so per-sample
    gradients are taken only for K > 64 when a chunk of them fits in 256 MB.
    """
    if num_classes > 64 and chunk_size * num_params * 4 <= 256 * 2**20:
        return "per_sample"
    return "jvp"


def _validate(x_train, y_train, x_val, y_val, num_classes):
    xt = _checks.as_features(x_train, "x_train")
    yt = _checks.as_labels(y_train, "y_train", num_classes=num_classes, n=xt.shape[0], x_name="x_train")
    xv = _checks.as_features(x_val, "x_val")
    yv = _checks.as_labels(y_val, "y_val", num_classes=num_classes, n=xv.shape[0], x_name="x_val")
    if xt.shape[1:] != xv.shape[1:]:
        _checks.fail("x_val", f"sample shape {xv.shape[1:]}", f"the training sample shape {xt.shape[1:]}",
                     "featurise both sets the same way")
    _checks.check_all_classes_present(yv, num_classes, "y_val")
    return xt, yt, xv, yv


def category_influence(loss_fn: LossFn, params, x_train, y_train, x_val, y_val, *,
                       num_classes: int, weight_decay: float,
                       config: InfluenceConfig = InfluenceConfig(), apply=None,
                       model=None, mesh=None) -> InfluenceResult:
    """The N×K category-wise influence matrix P of a trained model (DESIGN §2–3).

    P[i, k] = (1/N) · g_kᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ), g_k = ∇ mean_{val, class k} ℓ; P > 0 is beneficial.
    For new weights w the first-order change of class k's validation loss is
    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (training objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖²).

    Args:
        loss_fn: per-sample ``loss_fn(params, x, y)`` (x unbatched); see `models.per_sample_loss`.
        params: trained parameters (any pytree).
        x_train, y_train: the training set the model was trained on, (N, ...) and (N,).
        x_val, y_val: the validation set; every class must be present.
        num_classes: K.
        weight_decay: λ used in training (it is part of the Hessian).
        config: `InfluenceConfig`.
        apply: ``apply(params, x_batch) -> logits``; needed for Gauss-Newton.
        model: the flax nnx module whose params these are; needed for K-FAC / EK-FAC.
        mesh: a `jax.sharding.Mesh` from `distributed.make_mesh` to shard the samples over
            devices (class gradients, every HVP inside CG, the P stage); None = one device.
            In a multi-process job pass this process's samples; P holds their rows.

    Returns:
        `InfluenceResult` with P (N, K) and solver diagnostics.

    Example:
        >>> from pareto_jax import data, models, train, influence
        >>> s = data.stratified_split(data.load_digits(), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (64,), 10))
        >>> loss_fn = models.per_sample_loss(apply)
        >>> params = train.train(loss_fn, params, s.train.x, s.train.y).params
        >>> res = influence.category_influence(loss_fn, params, s.train.x, s.train.y,
        ...     s.val.x, s.val.y, num_classes=10, weight_decay=1e-3)
        >>> res.P.shape
        (1078, 10)
    """
    if not isinstance(config, InfluenceConfig):
        _checks.fail("config", type(config).__name__, "an InfluenceConfig", "pass InfluenceConfig(...)")
    _checks.check_positive(num_classes, "num_classes", integer=True)
    _checks.check_positive(weight_decay, "weight_decay", allow_zero=True)
    xt, yt, xv, yv = _validate(x_train, y_train, x_val, y_val, num_classes)
    if config.curvature == "auto":
        config = dataclasses.replace(config, curvature="hessian" if apply is None else "gauss_newton")
    theta, _, _ = _flat(loss_fn, params)
    dt = theta.dtype
    xt, xv = xt.astype(dt), xv.astype(dt)
    _checks.check_finite_array(theta, "params", "influence: parameters")

    if mesh is not None:
        from . import distributed
        if config.solver not in ("cg", "dense"):
            _checks.fail("config.solver", config.solver, "'cg' or 'dense' when a mesh is given",
                         "use solver='cg' (sharded HVPs), or drop mesh= for LiSSA/K-FAC/EK-FAC")
        G = distributed.class_gradients(loss_fn, params, xv, yv, num_classes, mesh=mesh)
    else:
        G = class_gradients(loss_fn, params, xv, yv, num_classes)
    _checks.check_finite_array(G, "class gradients", "influence: class gradients")
    if mesh is not None:
        hvp, _ = distributed.make_hvp(loss_fn, params, xt, yt, mesh=mesh, weight_decay=weight_decay,
                                      batch_size=config.hvp_batch_size, curvature=config.curvature,
                                      apply=apply)
        damping = _auto_damping(hvp, theta, config.seed) if config.damping == "auto" else float(config.damping)
        solve_res, damping, escalations = _solve_escalating(
            lambda dmp: distributed.solve(
                loss_fn, params, xt, yt, G, mesh=mesh, weight_decay=weight_decay, damping=dmp,
                solver=config.solver, curvature=config.curvature, apply=apply, rtol=config.rtol,
                atol=config.atol, max_steps=config.max_steps, batch_size=config.hvp_batch_size),
            damping, config.escalate_damping)
    elif config.solver in ("lissa", "kfac", "ekfac"):
        from . import estimators

        solve_res, damping, escalations = estimators.solve(
            config, loss_fn, params, xt, yt, G, weight_decay=weight_decay, apply=apply,
            num_classes=num_classes, model=model)
    else:
        _, f, logits_f, chunks, n = _hvp_parts(loss_fn, params, xt, yt, config.hvp_batch_size,
                                               config.curvature, apply)
        wd = jnp.asarray(weight_decay, dt)
        if config.damping == "auto":
            damping = _auto_damping(lambda v: _hvp_jit(f, config.curvature, logits_f, v, theta,
                                                       *chunks, n, wd), theta, config.seed)
        else:
            damping = float(config.damping)
        solve_res, damping, escalations = _solve_escalating(
            lambda dmp: _solve_jit(config.solver, f, config.curvature, logits_f, theta, *chunks, n,
                                   wd, G, jnp.asarray(dmp, dt), jnp.asarray(config.rtol, dt),
                                   config.max_steps, jnp.asarray(config.atol, dt)),
            damping, config.escalate_damping)
    _checks.check_finite_array(solve_res.value, "inverse-HVP solutions", "influence: curvature solve")
    if config.throw:
        check_solve(solve_res, rtol=config.rtol)
    method = choose_method(theta.size, num_classes, config.chunk_size) if config.method == "auto" else config.method
    if mesh is not None:
        P = jnp.asarray(distributed.influence_from_solutions(
            loss_fn, params, solve_res.value, xt, yt, mesh=mesh, method=method,
            chunk_size=config.chunk_size))
    else:
        P = influence_from_solutions(loss_fn, params, solve_res.value, xt, yt, method=method,
                                     chunk_size=config.chunk_size)
    _checks.check_finite_array(P, "P", "influence: influence matrix")
    return InfluenceResult(P, method, config.solver, config.curvature, damping, tuple(escalations),
                           np.asarray(solve_res.steps), np.asarray(solve_res.residual),
                           np.asarray(solve_res.converged), np.asarray(solve_res.negative_curvature),
                           solve_res.value)


def linear_category_influence(params, x_train, y_train, x_val, y_val, *, num_classes: int,
                              weight_decay: float, damping: float = 0.0,
                              weights=None) -> InfluenceResult:
    """`category_influence` for a `LinearClassifier` head, by the closed form (validated).

    `weights`: the per-sample weights the model was trained with (see `linear_influence`).
    """
    xt, yt, xv, yv = _validate(x_train, y_train, x_val, y_val, num_classes)
    if weights is not None:
        weights = _checks.as_weights(weights, xt.shape[0], "weights")
    W, b = params["head"]["kernel"], params["head"]["bias"]
    dt = jnp.asarray(W).dtype
    P, U = linear_influence(xt.astype(dt), yt, xv.astype(dt), yv, W, b, weight_decay=weight_decay,
                            damping=damping, return_solutions=True, weights=weights)
    _checks.check_finite_array(P, "P", "influence: influence matrix (closed form)")
    K = num_classes
    d = W.shape[0]
    # solutions in the flat ordering of ravel_pytree(params), so they compose with the generic path
    flat_U = jax.vmap(lambda u: ravel_pytree(
        {"head": {"bias": u[d], "kernel": u[:d]}})[0])(U)
    z = np.zeros(K)
    return InfluenceResult(P, "closed_form", "cholesky", "hessian", damping, (), z.astype(int),
                           z, np.ones(K, bool), np.zeros(K, bool), flat_U)


def predict_class_loss_change(result: InfluenceResult, weights, *, params=None,
                              weight_decay: float = 0.0, normalizer: str = "n") -> np.ndarray:
    """First-order change of each class's validation loss when retraining with `weights`.

    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] for the fixed-N objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖².
    With ``normalizer="weights"`` (Σ w ℓ / Σ w) the data term is rescaled against the
    regulariser, which acts as λ → λ·Σw/N; its first-order effect −λ(Σw/N − 1)·u_kᵀθ is added
    (needs `params` and `weight_decay`).
    """
    _checks.check_choice(normalizer, "normalizer", ("n", "weights"))
    P = np.asarray(result.P, np.float64)
    w = _checks.as_weights(weights, P.shape[0])
    delta = -(w - 1.0) @ P
    if normalizer == "weights" and weight_decay:
        if params is None or result.solutions is None:
            _checks.fail("params", "None", "the trained params (and a result with solutions)",
                         "pass params= to account for the Σw normaliser")
        theta = np.asarray(ravel_pytree(params)[0], np.float64)
        delta = delta - weight_decay * (w.sum() / w.size - 1.0) * (np.asarray(result.solutions, np.float64) @ theta)
    return delta
