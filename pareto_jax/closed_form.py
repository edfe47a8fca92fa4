"""Closed-form influence for softmax regression and last-layer heads (no autodiff anywhere).

For logits = x·W + b the per-sample gradient is (p_i − e_{y_i}) ⊗ [x_i, 1] and the Hessian is
(1/N) Σ_i (diag p_i − p_i p_iᵀ) ⊗ [x_i, 1][x_i, 1]ᵀ + λI, so P is a batched contraction after
one Cholesky solve. This is the speed path for frozen-feature models and the oracle that the
generic autodiff path is tested against; `pareto_jax.influence.linear_category_influence` is its
validated entry point. See ``docs/method.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import NO_DAMPING
from .kernels import pad_chunks


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
    damping: float = NO_DAMPING, chunk_size: int = 4096, return_solutions: bool = False,
    weights=None):
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
    xc, yc, mc = pad_chunks(xt, yt, chunk_size)
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
    P = linear_P_chunks(jnp.asarray(xc, dt), yc, mc, Theta, U).reshape(-1, K)[:n] / n
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
def linear_P_chunks(xc, yc, mc, Theta, U):
    """Unscaled N·P in chunks: one fused matmul per chunk gives the logits and x̃ᵀU_k for all k.

    Since Σ_c r_ic = 0 (r = p − e_y), x̃ᵀU_k r = Σ_{c<K−1} r_c x̃ᵀ(U_k[:, c] − U_k[:, K−1]), so
    K + K(K−1) columns suffice; the bias row is added after the matmul (no [x, 1] copy).
    """
    K = Theta.shape[1]
    D = U[:, :, :-1] - U[:, :, -1:]  # (K, d+1, K−1)
    Df = jnp.transpose(D, (1, 0, 2)).reshape(Theta.shape[0], -1)  # (d+1, K(K−1))
    M = jnp.concatenate([Theta, Df], 1)

    def chunk(b):
        xb, yb, mb = b
        A = xb @ M[:-1] + M[-1]
        r = jax.nn.softmax(A[:, :K], -1) - jax.nn.one_hot(yb, K, dtype=xb.dtype)
        return jnp.einsum("ikc,ic->ik", A[:, K:].reshape(-1, K, K - 1), r[:, :-1]) * mb[:, None]

    return jax.lax.map(chunk, (xc, yc, mc))
