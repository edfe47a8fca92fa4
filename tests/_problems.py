"""Small trained models shared by the influence, pareto and search tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize as so
from jax.flatten_util import ravel_pytree

from pareto_jax import data, models, train


def to64(tree):
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), tree)


def fit_exact(loss_fn, params, x, y, *, weight_decay, weights=None, normalizer="n", init=None):
    """Minimise the weighted objective to tight tolerance with scipy L-BFGS-B (float64)."""
    theta0, unravel = ravel_pytree(to64(params))
    if init is not None:
        theta0 = jnp.asarray(ravel_pytree(to64(init))[0])
    x = jnp.asarray(x, jnp.float64)
    y = jnp.asarray(y)
    w = jnp.ones(x.shape[0]) if weights is None else jnp.asarray(weights, jnp.float64)
    vg = _vg(loss_fn, unravel, weight_decay, normalizer)
    r = so.minimize(lambda t: tuple(np.asarray(a, np.float64) for a in vg(t, x, y, w)),
        np.asarray(theta0), jac=True, method="L-BFGS-B",
        options=dict(gtol=1e-13, ftol=0.0, maxiter=20000, maxcor=30))
    return unravel(jnp.asarray(r.x)), r


@functools.lru_cache(maxsize=None)
def _vg(loss_fn, unravel, weight_decay, normalizer):
    def obj(t, x, y, w):
        return train.weighted_objective(
            loss_fn, unravel(t), x, y, w, weight_decay=weight_decay, normalizer=normalizer
        )

    return jax.jit(jax.value_and_grad(obj))


@functools.lru_cache(maxsize=None)
def digits_linear(weight_decay=1e-2, seed=0):
    """Softmax regression on digits trained to the optimum in float64 (inside enable_x64)."""
    s = data.stratified_split(data.load_digits(), seed=seed)
    apply, params = models.functional(models.make_model("linear", (64,), 10))
    loss_fn = models.per_sample_loss(apply)
    params, _ = fit_exact(loss_fn, params, s.train.x, s.train.y, weight_decay=weight_decay)
    return s, apply, loss_fn, params


def class_val_loss(loss_fn, params, x, y, K):
    l = jax.vmap(loss_fn, (None, 0, 0))(params, jnp.asarray(x, jnp.float64), jnp.asarray(y))
    oh = jax.nn.one_hot(y, K)
    return np.asarray(oh.T @ l / oh.sum(0))


def subspace_P(apply, params, keys, x, y, K, *, weight_decay, damping, curvature="gauss_newton",
    output_loss=None):
    """P on the parameter arrays `keys` (top-level names) by a dense float64 solve, the rest of
    `params` closed over as constants: (1/N) g_i,Sᵀ (H_SS + (λ + δ)I)⁻¹ g_k,S, H the Gauss-Newton
    matrix Σ Jᵀ H_out J / N (or the Hessian) of the cross-entropy (or `output_loss`)."""
    out = output_loss or (lambda z, yi: jax.nn.logsumexp(z) - z[yi])
    flat, unravel = ravel_pytree({k: params[k] for k in keys})

    def full(t):
        return {**params, **unravel(t)}

    def loss(t, xi, yi):
        return out(apply(full(t), xi[None])[0], yi)

    xs, ys = jnp.asarray(x), jnp.asarray(y)
    if curvature == "hessian":
        H = jax.hessian(lambda t: jnp.mean(jax.vmap(loss, (None, 0, 0))(t, xs, ys)))(flat)
    else:
        J = jax.vmap(lambda xi: jax.jacrev(lambda t: apply(full(t), xi[None])[0])(flat))(xs)
        Hout = jax.vmap(jax.hessian(out))(apply(params, xs), ys)
        H = jnp.einsum("nkp,nkl,nlq->pq", J, Hout, J) / len(y)
    g = jax.vmap(jax.grad(loss), (None, 0, 0))(flat, xs, ys)
    gk = jnp.stack([g[ys == k].mean(0) for k in range(K)])
    A = H + (weight_decay + damping) * jnp.eye(flat.size)
    trivial = g @ gk.T / len(y)  # the identity curvature: the bar to clear
    return np.asarray(g @ jnp.linalg.solve(A, gk.T) / len(y)), np.asarray(trivial)
