"""The device side of the program path: N padded to a few sizes (`bucket`, `pad_rows`) and every
row of a prepared batch solved by one compiled program (`solve_rows`, `solve_device`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import exact


def bucket(n: int) -> int:
    """The padded size for N rows: the next of 64, 96, 128, 192, 256, ... (one compile serves
    every N up to it; at most a third of the rows are padding)."""
    size = 64
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad_device(a, size, axis):
    shape = list(a.shape)
    shape[axis] = size
    return jax.lax.dynamic_update_slice(jnp.zeros(shape, a.dtype), a, (0,) * a.ndim)


def pad_rows(P, C=None):
    """P (N, K) padded with zero rows to `bucket`(N), and C (M, N) with zero columns to match:
    the shapes every device solve is compiled for (zero rows change no constraint or objective;
    `n_valid` keeps them at w = 1). Device arrays of P's dtype (padded on the device: a fresh
    host array of N·K float64 first-touches its pages, 0.11 s per 80 MB)."""
    size = bucket(P.shape[0])
    with jax.enable_x64(True):  # (float64 stays float64)
        Pp = _pad_device(jnp.asarray(P), size, 0)
        return Pp if C is None else (Pp, _pad_device(jnp.asarray(C), size, 1))


def solve_rows(P, C, B, LO, HI, budget, mu, n_valid, *, has_budget, qp, rtol, mode="vmap"):
    """`exact.solve_program` for every row of (C, B, LO, HI) on one P (pure JAX, unjitted: the
    batch path below and the evaluator's fused generation both trace it)."""

    def one(c, b, lo, hi, gram_cap=None):  # (a Hessian branch choice only pays outside vmap)
        return exact.solve_program(P, c, b, lo, hi, budget if has_budget else None,
            mu if qp else 0.0, n_valid=n_valid, gram_cap=gram_cap, rtol=rtol)

    if C.shape[0] == 1:
        # one program: no vmap, so the dual stage's lax.switch (`dual.weighted_gram`) stays a
        # branch instead of becoming a select that computes every side
        return jax.tree_util.tree_map(lambda a: a[None], one(C[0], B[0], LO[0], HI[0], "auto"))
    if mode == "vmap":
        return jax.vmap(one)(C, B, LO, HI)
    return jax.lax.map(lambda a: one(*a, "auto"), (C, B, LO, HI))


_device_batch = jax.jit(solve_rows, static_argnames=("has_budget", "qp", "rtol", "mode"))


def solve_device(batch, mode: str = "vmap"):
    """Every row of a `program.ProgramBatch` on the device in float64: an
    `exact.ProgramSolution` of numpy arrays with a leading row axis, unpadded."""
    with jax.enable_x64(True):
        args, static = batch.device_args()
        sol = _device_batch(*args, **static, mode=mode)
        sol = jax.tree_util.tree_map(np.asarray, sol)
    return sol._replace(w=sol.w[:, : batch.P.shape[0]])
