"""Guards against jaxlib 0.10.2's silent CPU miscompilations.

On that release (jax-ml/jax #39103) a jitted, vmapped matrix-vector product against an
in-function constant followed by a reduction returns wrong values once the batch is large
enough, which breaks conjugate gradient started from zeros. Checked: on jax/jaxlib 0.10.2 the
float32 n = 32,769 and float64 n = 16,385 cases fail; on 0.10.1 all pass. pyproject.toml excludes
0.10.2; these tests catch the bug on whatever version is installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pareto_jax import linsolve


def _rowwise_quadratic(n, dtype):
    i = np.arange(n, dtype=dtype)
    rows = np.stack([i, np.zeros_like(i), np.zeros_like(i)], 1)

    def f(rows):
        M = jnp.eye(3, dtype=dtype)  # an in-function constant
        return jax.vmap(lambda r: jnp.sum((M @ r) ** 2))(rows)

    return rows, f


@pytest.mark.parametrize("n", [100, 16_385, 32_769])
def test_vmapped_matvec_against_constant_then_reduce_float32(n):
    rows, f = _rowwise_quadratic(n, np.float32)
    got = np.asarray(jax.jit(f)(rows), np.float64)
    ref = rows[:, 0].astype(np.float64) ** 2
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@pytest.mark.parametrize("n", [100, 16_385])
def test_vmapped_matvec_against_constant_then_reduce_float64(x64, n):
    rows, f = _rowwise_quadratic(n, np.float64)
    got = np.asarray(jax.jit(f)(rows))
    np.testing.assert_allclose(got, rows[:, 0] ** 2, rtol=1e-12)


def test_cg_from_zeros_on_constant_matrix():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(30, 30)).astype(np.float32)
    A_np = B @ B.T + 30 * np.eye(30, dtype=np.float32)
    b = rng.normal(size=(2, 30)).astype(np.float32)

    def matvec(v):
        return jnp.asarray(A_np) @ v  # constant captured inside the traced function

    res = jax.jit(lambda b: linsolve.solve_cg(matvec, b, damping=0.0, rtol=1e-6, max_steps=200))(b)
    ref = np.linalg.solve(A_np.astype(np.float64), b.T.astype(np.float64)).T
    assert np.all(np.isfinite(np.asarray(res.value)))
    np.testing.assert_allclose(res.value, ref, rtol=1e-3, atol=1e-4)
