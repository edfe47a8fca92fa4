"""Guards against jaxlib 0.10.2's CPU miscompilation (jax-ml/jax #39103).

On that release a jitted matmul against an in-function constant followed by a reduction
silently returns NaN or huge values, which breaks conjugate gradient started from zeros.
These tests fail on any installed version with the bug.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pareto_jax import influence


def test_matmul_against_in_function_constant_then_reduce():
    rng = np.random.default_rng(0)
    A_np = rng.normal(size=(64, 64)).astype(np.float32)
    v = rng.normal(size=(64,)).astype(np.float32)

    @jax.jit
    def f(v):
        A = jnp.asarray(A_np)  # an in-function constant
        r = A @ v
        return jnp.sum(r * r), jnp.max(jnp.abs(r))

    s, m = f(v)
    r = A_np.astype(np.float64) @ v
    assert np.isfinite(s) and np.isfinite(m)
    np.testing.assert_allclose(s, (r * r).sum(), rtol=1e-4)
    np.testing.assert_allclose(m, np.abs(r).max(), rtol=1e-5)


def test_cg_from_zeros_on_constant_matrix():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(30, 30)).astype(np.float32)
    A_np = B @ B.T + 30 * np.eye(30, dtype=np.float32)
    b = rng.normal(size=(2, 30)).astype(np.float32)

    def matvec(v):
        return v @ jnp.asarray(A_np)  # constant captured inside the traced function

    res = jax.jit(lambda b: influence.solve_cg(matvec, b, rtol=1e-6, max_steps=200))(b)
    ref = np.linalg.solve(A_np.astype(np.float64), b.T.astype(np.float64)).T
    assert np.all(np.isfinite(res.value))
    np.testing.assert_allclose(res.value, ref, rtol=1e-3, atol=1e-4)
