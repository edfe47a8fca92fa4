import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from pareto_jax import influence, kfac, linsolve, models
from pareto_jax.checks import InputError, NumericalError

from conftest import tiny_classification


def _zero_linear(d=4, k=3):
    m = models.make_model("linear", (d,), k)
    apply, params = models.functional(m)
    params = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float64), params)
    return m, apply, params, models.per_sample_loss(apply)


def test_ekfac_equals_exact_ggn_inverse_where_kronecker_is_exact(x64):
    # a single-layer softmax network at zero weights: every sample's output Hessian is the same
    # S = diag(1/K) − 11ᵀ/K², so the GGN is exactly E[x̃x̃ᵀ] ⊗ S
    x, y = tiny_classification(n=50, d=4, k=3)
    m, apply, params, loss_fn = _zero_linear()
    facs = kfac.compute_factors(m, params, x, num_classes=3, batch_size=16)
    hvp, theta = influence.make_hvp(loss_fn, params, x, y, weight_decay=0.1, curvature="gauss_newton",
                                    apply=apply)
    G = jnp.asarray(np.random.default_rng(0).normal(size=(3, theta.size)))
    ref = linsolve.solve_dense(hvp, G).value
    for ek in (True, False):
        U = kfac.solve_kfac(facs, params, G, damping=0.1, ekfac=ek).value
        np.testing.assert_allclose(U, ref, rtol=1e-10, atol=1e-12)
    # and through category_influence
    a = influence.category_influence(loss_fn, params, x, y, x, y, num_classes=3, weight_decay=0.1,
                                     config=influence.InfluenceConfig(solver="ekfac", damping=0.0),
                                     model=m)
    b = influence.category_influence(loss_fn, params, x, y, x, y, num_classes=3, weight_decay=0.1,
                                     config=influence.InfluenceConfig(solver="dense", damping=0.0,
                                                                      curvature="gauss_newton"), apply=apply)
    np.testing.assert_allclose(a.P, b.P, rtol=1e-9, atol=1e-14)
    assert np.all(a.residual < 1e-10)


def test_ekfac_is_a_reasonable_approximation_on_mlp_and_cnn(x64):
    x, y = tiny_classification(n=40, d=16, k=3)
    for kind in ("mlp", "cnn"):
        m = models.make_model(kind, (16,), 3, hidden=(6,), image_shape=(4, 4, 1), channels=(2,), dense=5, seed=1)
        apply, params = models.functional(m)
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        loss_fn = models.per_sample_loss(apply)
        facs = kfac.compute_factors(m, params, x, num_classes=3)
        hvp, theta = influence.make_hvp(loss_fn, params, x, y, weight_decay=0.1,
                                        curvature="gauss_newton", apply=apply)
        G = jnp.asarray(np.random.default_rng(1).normal(size=(3, theta.size)))
        ref = linsolve.solve_dense(hvp, G).value
        U = kfac.solve_kfac(facs, params, G, damping=0.1).value
        cos = np.sum(U * ref) / np.linalg.norm(U) / np.linalg.norm(ref)
        assert cos > 0.8, (kind, cos)


def test_conv_patches_match_flax_conv():
    conv = nnx.Conv(3, 5, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 7, 3)).astype(np.float32))
    pt = kfac.patches(x, conv)
    W = kfac.kernel_matrix(conv.kernel.get_value(), "conv")
    np.testing.assert_allclose(pt @ W + conv.bias.get_value(), conv(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kfac.kernel_from_matrix(W, conv.kernel.get_value().shape, "conv"),
                                  conv.kernel.get_value())


def test_factors_save_and_reuse(tmp_path, x64):
    x, y = tiny_classification(n=30, d=4, k=3)
    m = models.make_model("mlp", (4,), 3, hidden=(5,), seed=2)
    apply, params = models.functional(m)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    facs = kfac.compute_factors(m, params, x, num_classes=3)
    kfac.save_factors(tmp_path / "f.npz", facs)
    back = kfac.load_factors(tmp_path / "f.npz", facs.paths)
    G = jnp.asarray(np.random.default_rng(0).normal(size=(2, ravel_pytree(params)[0].size)))
    np.testing.assert_allclose(kfac.solve_kfac(back, params, G, damping=0.1).value,
                               kfac.solve_kfac(facs, params, G, damping=0.1).value, rtol=1e-6)


def test_lissa_converges_to_cg_on_convex_problem(x64):
    x, y = tiny_classification(n=60, d=4, k=3)
    m, apply, params, loss_fn = _zero_linear()
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    kw = dict(num_classes=3, weight_decay=0.1)
    cg = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
                                      config=influence.InfluenceConfig(damping=0.0, rtol=1e-12))
    li = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
                                      config=influence.InfluenceConfig(solver="lissa", damping=0.0, rtol=1e-11,
                                                                       max_steps=4000, hvp_batch_size=1000))
    assert np.all(li.converged) and np.all(li.residual < 1e-8)
    np.testing.assert_allclose(li.P, cg.P, rtol=1e-7, atol=1e-9 * np.abs(cg.P).max())
    # stochastic minibatch LiSSA: noisy, but close
    st = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
                                      config=influence.InfluenceConfig(solver="lissa", damping=0.0, rtol=1e-6,
                                                                       max_steps=2000, hvp_batch_size=20))
    assert np.linalg.norm(st.P - cg.P) / np.linalg.norm(cg.P) < 0.2


def test_lissa_detects_divergence(x64):
    A = jnp.diag(jnp.array([1.0, 5.0, 10.0]))
    b = jnp.ones((2, 3))
    ok = linsolve.solve_lissa(lambda v, i: A @ v, b, 1, scale=12.0, rtol=1e-12, max_steps=2000)
    np.testing.assert_allclose(ok.value, np.linalg.solve(A, np.ones(3))[None].repeat(2, 0), rtol=1e-8)
    bad = linsolve.solve_lissa(lambda v, i: A @ v, b, 1, scale=2.0, max_steps=500)  # s < λ_max/2
    assert bool(np.all(bad.negative_curvature)) and not bool(np.any(bad.converged))
    assert np.all(np.isfinite(bad.value))


def test_ekfac_needs_the_model():
    x, y = tiny_classification(n=20, d=4, k=3, dtype=np.float32)
    m = models.make_model("linear", (4,), 3)
    apply, params = models.functional(m)
    with pytest.raises(InputError, match="model"):
        influence.category_influence(models.per_sample_loss(apply), params, x, y, x, y, num_classes=3,
                                     weight_decay=0.1, config=influence.InfluenceConfig(solver="ekfac"))


def _indefinite_problem():
    """A tanh MLP at its random initialisation with no weight decay: far from a minimum, its
    Hessian has negative eigenvalues (asserted), and one input feature is always 0, so the
    K-FAC input factor has an empty direction (a zero eigenvalue)."""
    x, y = tiny_classification(n=40, d=4, k=3)
    x[:, 3] = 0.0
    m = models.make_model("mlp", (4,), 3, hidden=(5,), seed=3)
    apply, params = models.functional(m)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64) * 3.0, params)
    loss_fn = models.per_sample_loss(apply)
    hvp, theta = influence.make_hvp(loss_fn, params, x, y, weight_decay=0.0)
    assert np.linalg.eigvalsh(np.asarray(linsolve.materialize(hvp, theta.size, jnp.float64))).min() < -1e-6
    return m, apply, params, loss_fn, x, y


@pytest.mark.parametrize("solver, reason", [("cg", "negative curvature"), ("dense", "negative curvature"),
                                            ("lissa", "negative curvature"), ("kfac", "non-finite solution"),
                                            ("ekfac", "non-finite solution")])
def test_every_estimator_escalates_damping_and_reports_it(x64, solver, reason):
    """One escalation rule for every estimator: a solve that meets negative curvature, diverges
    (LiSSA) or is not finite (K-FAC/EK-FAC with an empty direction and no damping) is retried
    with damping ×10, and each try is reported. Without escalation the same solve fails."""
    m, apply, params, loss_fn, x, y = _indefinite_problem()
    kw = dict(num_classes=3, weight_decay=0.0, apply=apply, model=m)
    cfg = influence.InfluenceConfig(solver=solver, curvature="hessian", damping=0.0, max_steps=300,
                                    hvp_batch_size=40)
    res = influence.category_influence(loss_fn, params, x, y, x, y, config=cfg, **kw)
    assert len(res.escalations) >= 1 and res.escalations[0] == {"damping": 0.0, "reason": reason}
    assert res.damping > 0 and np.all(np.isfinite(res.P))
    assert [e["damping"] for e in res.escalations] == sorted(e["damping"] for e in res.escalations)
    # the same solve with escalation off does not come back usable: a non-finite solution
    # (the singular dense matrix, K-FAC's empty direction) raises, CG and LiSSA flag it
    off = dataclasses.replace(cfg, escalate_damping=False)
    if solver in ("dense", "kfac", "ekfac"):
        with pytest.raises(NumericalError, match="non-finite"):
            influence.category_influence(loss_fn, params, x, y, x, y, config=off, **kw)
    else:
        r = influence.category_influence(loss_fn, params, x, y, x, y, config=off, **kw)
        assert r.escalations == () and np.any(r.negative_curvature)
