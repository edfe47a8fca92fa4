import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_classification
from flax import nnx
from jax.flatten_util import ravel_pytree

from pareto_jax import data, influence, kfac, linsolve, models
from pareto_jax.checks import InputError, NumericalError


def _zero_linear(d=4, k=3):
    m = models.make_model("linear", (d,), k)
    apply, params = models.functional(m)
    params = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float64), params)
    return m, apply, params, models.per_sample_loss(apply)


def _confident_linear(dtype=np.float64):
    """A softmax layer (with bias) at W = 0, b = log p for a confident, non-uniform p: every
    sample has the same output Hessian diag p − ppᵀ, so the Gauss-Newton matrix is exactly
    E[x̃x̃ᵀ] ⊗ (diag p − ppᵀ) and K-FAC / EK-FAC must reproduce it."""
    x, y = tiny_classification(n=60, d=4, k=3, dtype=dtype)
    m = models.make_model("linear", (4,), 3)
    apply, _ = models.functional(m)
    p = np.array([0.976, 0.018, 0.006])
    params = {"head": {"bias": jnp.asarray(np.log(p), dtype), "kernel": jnp.zeros((4, 3), dtype)}}
    return m, apply, params, models.per_sample_loss(apply), x, y


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_kfac_and_ekfac_are_exact_where_the_kronecker_product_is(dtype, rtol):
    """At confident, non-uniform predictions (p ≈ (0.976, 0.018, 0.006)). The pre-fix factor
    (pseudo-gradient entry j weighted by √p_j instead of class c's √p_c) was off by a relative
    7.3 here; at zero weights (uniform p) the two formulas agree, which is why testing there
    proved nothing."""
    with jax.enable_x64(dtype == np.float64):
        m, apply, params, loss_fn, x, y = _confident_linear(dtype)
        facs = kfac.compute_factors(m, params, x, num_classes=3, weight_decay=0.0, batch_size=16)
        hvp, theta = influence.make_hvp(
            loss_fn, params, x, y, weight_decay=0.1, curvature="gauss_newton", apply=apply
        )
        G = jnp.asarray(np.random.default_rng(0).normal(size=(3, theta.size)), dtype)
        ref = linsolve.solve_dense(
            hvp, G.astype(jnp.float64) if dtype == np.float64 else G, damping=0.0
        ).value
        for ek in (True, False):
            U = kfac.solve_kfac(facs, G, damping=0.1, ekfac=ek).value
            assert (
                np.abs(np.asarray(U) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max() < rtol
            )
        if dtype == np.float32:
            return
        kw = dict(num_classes=3, weight_decay=0.1, model=m, apply=apply)
        a = influence.category_influence(
            loss_fn,
            params,
            x,
            y,
            x,
            y,
            **kw,
            config=influence.InfluenceConfig(
                solver="ekfac", damping=0.0, curvature="gauss_newton", report_residual=True
            ),
        )
        b = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
            config=influence.InfluenceConfig(solver="dense", damping=0.0, curvature="gauss_newton"))
        np.testing.assert_allclose(a.P, b.P, rtol=1e-9, atol=1e-14)
        assert np.all(a.residual < 1e-10)  # exact here, and measured against the true curvature
        # by default the residual is not measured, and an approximate solver never claims
        # convergence
        c = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
            config=influence.InfluenceConfig(solver="ekfac", damping=0.0))
        assert np.all(np.isnan(c.residual)) and not np.any(c.converged)


def _trained(kind):
    """A small MLP or CNN trained to its optimum on digits (float64): confident predictions
    (median top probability about 0.99), so the output Hessians are far from uniform."""
    from _problems import fit_exact, to64

    s = data.stratified_split(data.load_digits(), seed=0)
    x, y = s.train.x[:200].astype(np.float64), s.train.y[:200]
    m = models.make_model(
        kind, (64,), 10, hidden=(16,), image_shape=(8, 8, 1), channels=(4,), dense=16, seed=0
    )
    apply, params = models.functional(m)
    loss_fn = models.per_sample_loss(apply)
    params, _ = fit_exact(loss_fn, to64(params), x, y, weight_decay=1e-3)
    return m, apply, params, loss_fn, x, y


def _explicit_ggn(apply, params, x):
    """(1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i from explicit per-sample Jacobians (no K-FAC "
    "code)."""
    theta, unravel = ravel_pytree(params)
    jac = jax.jit(jax.vmap(jax.jacobian(lambda t, xi: apply(unravel(t), xi[None])[0]), (None, 0)))(
        theta, x
    )
    p = jax.nn.softmax(apply(params, x), -1)
    H = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    return np.asarray(jnp.einsum("ikp,ikl,ilq->pq", jac, H, jac) / x.shape[0])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_basis(x64, kind):
    """EK-FAC's corrected eigenvalues must equal diag((Q_A ⊗ Q_S)ᵀ G_ll (Q_A ⊗ Q_S)) for each
    layer's block G_ll of the explicit Gauss-Newton matrix, on trained networks with dense and
    conv layers: this checks the output-gradient weighting, the per-sample sums over conv
    positions and the rank-one shortcut for dense layers against an independent reference."""
    m, apply, params, loss_fn, x, y = _trained(kind)
    facs = kfac.compute_factors(m, params, x, num_classes=10, weight_decay=0.0, batch_size=64)
    GGN = _explicit_ggn(apply, params, x)
    for layer, lf, (k0, kshape, b0) in zip(facs.layers, facs.factors, facs.layout):
        idx = np.asarray(
            kfac.kernel_matrix(
                jnp.arange(k0, k0 + int(np.prod(kshape))).reshape(kshape), layer.kind
            )
        )
        idx = np.concatenate([idx, np.arange(b0, b0 + layer.out_features)[None]], 0).ravel()
        Q = np.kron(np.asarray(lf.QA), np.asarray(lf.QG))
        want = np.diag(Q.T @ GGN[np.ix_(idx, idx)] @ Q).reshape(lf.lam_ekfac.shape)
        np.testing.assert_allclose(lf.lam_ekfac, want, rtol=1e-7, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kfac_solves_on_trained_networks_against_the_exact_gauss_newton(x64, kind):
    """End to end on trained networks: (F̂ + δ)⁻¹g against the exact damped Gauss-Newton solve.
    K-FAC ignores cross-layer blocks, so it is an approximation; its error is reported here and
    bounded. Measured: cosine 0.84 (MLP) and 0.75–0.77 (CNN). The trivial answer U = G/δ
    (no curvature) scores 0.40 / 0.37, and the pre-fix factor 0.27 / 0.25."""
    m, apply, params, loss_fn, x, y = _trained(kind)
    wd, dmp = 1e-3, 1e-3
    hvp, theta = influence.make_hvp(
        loss_fn, params, x, y, weight_decay=wd, curvature="gauss_newton", apply=apply
    )
    G = influence.class_gradients(loss_fn, params, x, y, 10)
    ref = np.asarray(linsolve.solve_dense(hvp, G, damping=dmp).value)
    facs = kfac.compute_factors(m, params, x, num_classes=10, weight_decay=0.0)

    def cos(U):
        U = np.asarray(U)
        return float(np.sum(U * ref) / np.linalg.norm(U) / np.linalg.norm(ref))

    trivial = cos(G)
    for ek in (False, True):
        c = cos(kfac.solve_kfac(facs, G, damping=wd + dmp, ekfac=ek).value)
        print(kind, "ekfac" if ek else "kfac", "cosine", round(c, 4), "trivial", round(trivial, 4))
        assert c >= 0.7 and c >= trivial + 0.3


def test_factors_do_not_depend_on_the_batch_size_and_compile_once(x64):
    m, apply, params, loss_fn, x, y = _trained("cnn")
    G = jnp.asarray(np.random.default_rng(2).normal(size=(3, ravel_pytree(params)[0].size)))
    a = kfac.compute_factors(m, params, x, num_classes=10, weight_decay=0.0, batch_size=64)
    b = kfac.compute_factors(m, params, x, num_classes=10, weight_decay=0.0, batch_size=37)
    for ek in (False, True):
        np.testing.assert_allclose(kfac.solve_kfac(a, G, damping=1e-2, ekfac=ek).value,
            kfac.solve_kfac(b, G, damping=1e-2, ekfac=ek).value, rtol=1e-8)
    traces = []
    cls = type(m)

    class Counting(cls):
        def __call__(self, x):
            traces.append(1)
            return cls.__call__(self, x)

    m.__class__ = Counting
    try:
        kfac.compute_factors(m, params, x, num_classes=10, weight_decay=0.0, batch_size=64)
        first = len(traces)
        kfac.compute_factors(m, params, x, num_classes=10, weight_decay=0.0, batch_size=64)
        # a second call only discovers the layers (one abstract forward pass); no batch program
        # is traced again
        assert len(traces) - first == 1, (first, len(traces))
    finally:
        m.__class__ = cls


def test_preconditioned_cg_gives_the_cg_answer(x64):
    """CG preconditioned by EK-FAC solves the same system to the same tolerance (the stopping rule
    is on the unpreconditioned residual). Whether it takes fewer steps depends on the spectrum:
    on this 1.3k-parameter CNN the preconditioned condition number is 390 against 265 without,
    so it does not; `bench/bench_deep.py` reports the steps on the MNIST CNN."""
    m, apply, params, loss_fn, x, y = _trained("cnn")
    kw = dict(num_classes=10, weight_decay=1e-3, apply=apply, model=m)
    base = dict(curvature="gauss_newton", damping=1e-3, rtol=1e-8, max_steps=2000)
    plain = influence.category_influence(
        loss_fn, params, x, y, x, y, config=influence.InfluenceConfig(**base), **kw
    )
    pre = influence.category_influence(loss_fn, params, x, y, x, y,
        config=influence.InfluenceConfig(preconditioner="ekfac", **base), **kw)
    dense = influence.category_influence(loss_fn, params, x, y, x, y,
        config=influence.InfluenceConfig(solver="dense", curvature="gauss_newton", damping=1e-3),
        **kw)
    assert np.all(pre.converged) and np.all(pre.residual <= 1e-8 * 1.001)
    scale = np.abs(dense.P).max()
    assert (
        np.abs(pre.P - dense.P).max() / scale < 1e-6
        and np.abs(plain.P - dense.P).max() / scale < 1e-6
    )
    assert np.all(pre.steps > 0) and np.all(pre.steps != plain.steps)  # it did run, differently


def test_integer_inputs_give_the_factors_of_their_float_values():
    """Raw uint8 pixels fed to a Linear / Conv (flax converts them): the input moments are summed
    in the factors' float dtype, never in the inputs' integers (which wrap around)."""
    m = models.make_model("cnn", (64,), 3, image_shape=(8, 8, 1), channels=(2,), dense=4, seed=0)
    x = np.random.default_rng(0).integers(150, 256, size=(40, 64)).astype(np.uint8)
    params = models.functional(m)[1]
    for fisher in ("expected", "sampled"):
        fi, ff = (kfac.compute_factors(m, params, a, num_classes=3, weight_decay=0.0,
            fisher=fisher, batch_size=16) for a in (x, x.astype(np.float32)))
        for a, b in zip(fi.factors, ff.factors):
            np.testing.assert_allclose(a.lam_ekfac, b.lam_ekfac, rtol=1e-4,
                atol=1e-6 * float(np.abs(b.lam_ekfac).max()))


def test_parameter_reuse_counts_positions_and_loop_steps():
    """`kernels.param_reuse` (what the P stage's method choice reads): about 1 for an MLP, the
    positions for a conv, the steps for a scanned recurrence; and the choice it drives."""
    from pareto_jax import kernels

    def reuse(m, x):
        apply, params = models.functional(m)
        flat = kernels.flatten(models.per_sample_loss(apply), params)
        return kernels.param_reuse(flat.loss, flat.theta, jnp.asarray(x), jnp.asarray(0)), flat

    r_mlp, f = reuse(models.make_model("mlp", (64,), 10, hidden=(32,), seed=0), np.ones(64))
    assert 1.0 <= r_mlp < 1.2
    assert influence.choose_method(f.theta.size, 10, 256, r_mlp) == "jvp"
    m = models.make_model("cnn", (64,), 10, image_shape=(8, 8, 1), channels=(8, 8), dense=4,
        seed=0)  # (two 3×3 convs on 8×8 and 4×4 positions, the dense layers small)
    r_cnn, f = reuse(m, np.ones(64))
    assert r_cnn > 10
    assert influence.choose_method(f.theta.size, 10, 256, r_cnn) == "per_sample"
    assert influence.choose_method(10**7, 10, 256, r_cnn) == "jvp"  # a chunk would not fit
    W = jnp.ones((4, 4))
    loss = lambda th, x, y: jax.lax.scan(lambda h, _: (jnp.tanh(th @ h), None), x, None,  # noqa
        length=50)[0].sum()
    assert 45 < kernels.param_reuse(loss, W, jnp.ones(4), 0) < 55
    assert kernels.class_gradient_chunk_size(10, 10**8, 4) == 512  # K VJPs, full-size chunks
    assert kernels.class_gradient_method(10, 512, 10**8, 4) == "vjp"


def test_conv_patches_match_flax_conv():
    conv = nnx.Conv(3, 5, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 7, 3)).astype(np.float32))
    pt = kfac.patches(x, (conv.kernel_size, (1, 1), "SAME"))
    W = kfac.kernel_matrix(conv.kernel.get_value(), "conv")
    np.testing.assert_allclose(pt @ W + conv.bias.get_value(), conv(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        kfac.kernel_from_matrix(W, conv.kernel.get_value().shape, "conv"), conv.kernel.get_value()
    )


def test_factors_save_and_reuse(tmp_path, x64):
    x, y = tiny_classification(n=30, d=4, k=3)
    m = models.make_model("mlp", (4,), 3, hidden=(5,), seed=2)
    apply, params = models.functional(m)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    facs = kfac.compute_factors(m, params, x, num_classes=3, weight_decay=0.0)
    kfac.save_factors(tmp_path / "f.npz", facs)
    back = kfac.load_factors(tmp_path / "f.npz")
    G = jnp.asarray(np.random.default_rng(0).normal(size=(2, ravel_pytree(params)[0].size)))
    np.testing.assert_allclose(kfac.solve_kfac(back, G, damping=0.1).value,
        kfac.solve_kfac(facs, G, damping=0.1).value, rtol=1e-6)


def test_lissa_converges_to_cg_on_convex_problem(x64):
    x, y = tiny_classification(n=60, d=4, k=3)
    m, apply, params, loss_fn = _zero_linear()
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    kw = dict(num_classes=3, weight_decay=0.1)
    cg = influence.category_influence(
        loss_fn, params, x, y, x, y, **kw, config=influence.InfluenceConfig(damping=0.0, rtol=1e-12)
    )
    li = influence.category_influence(
        loss_fn,
        params,
        x,
        y,
        x,
        y,
        **kw,
        config=influence.InfluenceConfig(
            solver="lissa", damping=0.0, rtol=1e-11, max_steps=4000, hvp_batch_size=1000
        ),
    )
    assert np.all(li.converged) and np.all(li.residual < 1e-8)
    np.testing.assert_allclose(li.P, cg.P, rtol=1e-7, atol=1e-9 * np.abs(cg.P).max())
    # stochastic minibatch LiSSA: noisy, but close
    st = influence.category_influence(
        loss_fn,
        params,
        x,
        y,
        x,
        y,
        **kw,
        config=influence.InfluenceConfig(
            solver="lissa", damping=0.0, rtol=1e-6, max_steps=2000, hvp_batch_size=20
        ),
    )
    assert np.linalg.norm(st.P - cg.P) / np.linalg.norm(cg.P) < 0.2


def test_lissa_detects_divergence(x64):
    A = jnp.diag(jnp.array([1.0, 5.0, 10.0]))
    b = jnp.ones((2, 3))
    ok = linsolve.solve_lissa(
        lambda v, i: A @ v, b, 1, scale=12.0, damping=0.0, rtol=1e-12, max_steps=2000
    )
    np.testing.assert_allclose(
        ok.value, np.linalg.solve(A, np.ones(3))[None].repeat(2, 0), rtol=1e-8
    )
    bad = linsolve.solve_lissa(
        lambda v, i: A @ v, b, 1, scale=2.0, damping=0.0, max_steps=500
    )  # s < λ_max/2
    assert bool(np.all(bad.negative_curvature)) and not bool(np.any(bad.converged))
    assert np.all(np.isfinite(bad.value))


def test_ekfac_needs_the_model():
    x, y = tiny_classification(n=20, d=4, k=3, dtype=np.float32)
    m = models.make_model("linear", (4,), 3)
    apply, params = models.functional(m)
    with pytest.raises(InputError, match="model"):
        influence.category_influence(models.per_sample_loss(apply), params, x, y, x, y,
            num_classes=3, weight_decay=0.1, config=influence.InfluenceConfig(solver="ekfac"))


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
    assert (
        np.linalg.eigvalsh(np.asarray(linsolve.materialize(hvp, theta.size, jnp.float64))).min()
        < -1e-6
    )
    return m, apply, params, loss_fn, x, y


@pytest.mark.parametrize(
    "solver, reason",
    [("cg", "negative curvature"), ("dense", "negative curvature"), ("lissa", "negative curvature"),
        ("kfac", "non-finite solution"), ("ekfac", "non-finite solution")],
)
def test_every_estimator_escalates_damping_and_reports_it(x64, solver, reason):
    """One escalation rule for every estimator: a solve that meets negative curvature, diverges
    (LiSSA) or is not finite (K-FAC/EK-FAC with an empty direction and no damping) is retried
    with damping ×10 where allowed, warned, and each try is reported. Without escalation the same
    solve is refused, naming the cause."""
    m, apply, params, loss_fn, x, y = _indefinite_problem()
    kw = dict(num_classes=3, weight_decay=0.0, apply=apply, model=m)
    cfg = influence.InfluenceConfig(solver=solver, curvature="hessian", damping=0.0,
        max_steps=300, hvp_batch_size=40, escalate_damping=True)
    with pytest.warns(influence.DampingWarning, match="damping raised from 0 to"):
        res = influence.category_influence(loss_fn, params, x, y, x, y, config=cfg, **kw)
    assert len(res.escalations) >= 1 and res.escalations[0] == {"damping": 0.0, "reason": reason}
    assert res.damping > 0 and np.all(np.isfinite(res.P))
    assert [e["damping"] for e in res.escalations] == sorted(e["damping"] for e in res.escalations)
    # the same solve with escalation off (or left to the default, the damping being set) is
    # refused: negative curvature with its eigenvalue, or the non-finite solution
    for off in (dataclasses.replace(cfg, escalate_damping=False),
                dataclasses.replace(cfg, escalate_damping=None)):
        with pytest.raises(NumericalError, match="not replaced silently") as e:
            influence.category_influence(loss_fn, params, x, y, x, y, config=off, **kw)
        assert ("eigenvalue of about" in str(e.value)) == (reason == "negative curvature")


def test_kfac_layer_taps_leave_flax_and_the_users_model_alone():
    """K-FAC records each layer's input and output gradient through a tapping subclass set on a
    copy of the model made for the trace: flax's classes, the user's model and its layers'
    classes are untouched (the layers used to be found by patching nnx.Linear for everyone)."""
    from flax import nnx

    m = models.make_model("cnn", (8, 8, 1), 3, seed=0, channels=(2,), dense=4)
    _, params = models.functional(m)
    calls = (nnx.Linear.__call__, nnx.Conv.__call__)
    kinds = [type(sub) for _, sub in nnx.iter_graph(m)]
    x = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    facs = kfac.compute_factors(m, params, x, num_classes=3, weight_decay=0.0)
    assert len(facs.layers) == 3
    assert (nnx.Linear.__call__, nnx.Conv.__call__) == calls
    assert [type(sub) for _, sub in nnx.iter_graph(m)] == kinds
    assert type(m.head) is nnx.Linear and m(x).shape == (10, 3)
