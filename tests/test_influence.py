import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as ss
from _problems import class_val_loss, digits_linear, fit_exact, to64
from conftest import tiny_classification
from jax.flatten_util import ravel_pytree

from pareto_jax import data, influence, kernels, linsolve, models, train
from pareto_jax.checks import InputError, NumericalError


def _mlp_problem(n=40, d=4, k=3, hidden=(5,), seed=0):
    x, y = tiny_classification(n=n, d=d, k=k, seed=seed)
    xv, yv = tiny_classification(n=18, d=d, k=k, seed=seed + 1)
    apply, params = models.functional(models.make_model("mlp", (d,), k, hidden=hidden, seed=seed))
    params = to64(params)
    loss_fn = models.per_sample_loss(apply)
    params, _ = fit_exact(loss_fn, params, x, y, weight_decay=0.05)
    return x, y, xv, yv, apply, loss_fn, params


def test_per_sample_gradients_match_python_loop(x64):
    x, y, _, _, _, loss_fn, params = _mlp_problem()
    G = influence.per_sample_gradients(loss_fn, params, x, y)
    for i in (0, 7, 39):
        g = ravel_pytree(jax.grad(loss_fn)(params, jnp.asarray(x[i]), jnp.asarray(y[i])))[0]
        np.testing.assert_allclose(G[i], g, rtol=1e-12, atol=1e-14)


def test_class_gradients_match_python_loop(x64):
    x, y, xv, yv, _, loss_fn, params = _mlp_problem()
    G = influence.class_gradients(loss_fn, params, xv, yv, 3, chunk_size=5)
    for k in range(3):
        idx = np.flatnonzero(yv == k)
        g = sum(ravel_pytree(jax.grad(loss_fn)(params, xv[i], yv[i]))[0] for i in idx) / idx.size
        np.testing.assert_allclose(G[k], g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["per_sample", "vjp"])
def test_class_gradient_kernels_agree_with_a_python_loop(x64, method):
    """Both ways of taking the class gradients (per-sample gradients, K VJPs) against a loop,
    on a chunk with padding; and which one `class_gradient_method` picks."""
    _, _, xv, yv, _, loss_fn, params = _mlp_problem()
    flat = kernels.flatten(loss_fn, params)
    c = kernels.pad_chunks(xv, yv, 8, xp=jnp)
    counts = jnp.asarray(np.bincount(yv, minlength=3), jnp.float64)
    G = sum(kernels.class_gradient_chunk(flat.loss, flat.theta, c.x[j], c.y[j],
        c.mask[j].astype(jnp.float64), counts, 3, method) for j in range(c.mask.shape[0]))
    for k in range(3):
        idx = np.flatnonzero(yv == k)
        g = sum(ravel_pytree(jax.grad(loss_fn)(params, xv[i], yv[i]))[0] for i in idx) / idx.size
        np.testing.assert_allclose(G[k], g, rtol=1e-10, atol=1e-13)
    P = flat.theta.size
    assert kernels.class_gradient_method(3, 512, P, 8) == "per_sample"
    assert kernels.class_gradient_method(2, 512, P, 8) == "vjp"
    assert kernels.class_gradient_method(10, 512, 10**6, 4) == "vjp"  # 2 GB: over the budget
    assert kernels.class_gradient_chunk_size(10, 10**6, 4) * 10**6 * 4 <= kernels.PER_SAMPLE_BYTES


def test_hvp_matches_dense_hessian_and_is_batch_invariant(x64):
    x, y, _, _, _, loss_fn, params = _mlp_problem()
    theta, unravel = ravel_pytree(params)
    H = jax.hessian(
        lambda t: jnp.mean(jax.vmap(loss_fn, (None, 0, 0))(unravel(t), x, y)) + 0.5 * 0.05 * t @ t
    )(theta)
    v = jnp.asarray(np.random.default_rng(0).normal(size=theta.size))
    for bs in (7, 40, 1000):
        hvp, _ = influence.make_hvp(loss_fn, params, x, y, weight_decay=0.05, batch_size=bs)
        np.testing.assert_allclose(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_gauss_newton_matches_explicit_jacobian_product(x64):
    x, y, _, _, apply, loss_fn, params = _mlp_problem()
    theta, unravel = ravel_pytree(params)
    GN = np.zeros((theta.size, theta.size))
    for i in range(x.shape[0]):
        J = jax.jacobian(lambda t: apply(unravel(t), x[i : i + 1])[0])(theta)  # (K, P)
        p = jax.nn.softmax(apply(params, x[i : i + 1])[0])
        GN += J.T @ (jnp.diag(p) - jnp.outer(p, p)) @ J
    GN = GN / x.shape[0] + 0.05 * np.eye(theta.size)
    hvp, _ = influence.make_hvp(loss_fn, params, x, y, weight_decay=0.05, batch_size=16,
        curvature="gauss_newton", apply=apply)
    v = jnp.asarray(np.random.default_rng(1).normal(size=theta.size))
    np.testing.assert_allclose(hvp(v), GN @ v, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(GN).min() > 0


def test_cg_matches_dense_solve(x64):
    x, y, xv, yv, apply, loss_fn, params = _mlp_problem()
    hvp, theta = influence.make_hvp(
        loss_fn, params, x, y, weight_decay=0.05, curvature="gauss_newton", apply=apply
    )
    G = influence.class_gradients(loss_fn, params, xv, yv, 3)
    ref = linsolve.solve_dense(hvp, G, damping=1e-3)
    H = np.asarray(linsolve.materialize(hvp, theta.size, jnp.float64)) + 1e-3 * np.eye(theta.size)
    np.testing.assert_allclose(ref.value, np.linalg.solve(H, np.asarray(G).T).T, rtol=1e-9)
    cg = linsolve.solve_cg(hvp, G, damping=1e-3, rtol=1e-10, max_steps=500)
    assert bool(np.all(cg.converged)) and np.all(cg.residual < 1e-10)
    rel = np.linalg.norm(cg.value - ref.value, axis=1) / np.linalg.norm(ref.value, axis=1)
    assert rel.max() < 1e-6
    # jit == no-jit
    cg_jit = jax.jit(lambda g: linsolve.solve_cg(hvp, g, damping=1e-3, rtol=1e-10, max_steps=500))(
        G
    )
    np.testing.assert_allclose(cg_jit.value, cg.value, rtol=1e-9, atol=1e-12)


def test_cg_stops_each_rhs_on_its_own_residual(x64):
    A = np.diag(np.arange(1.0, 21.0))
    b = np.zeros((2, 20))
    b[0, 0] = 1.0  # an eigenvector: one step
    b[1] = 1.0  # needs many steps
    res = linsolve.solve_cg(lambda v: jnp.asarray(A) @ v, jnp.asarray(b), damping=0.0, rtol=1e-12)
    assert int(res.steps[0]) == 1 and int(res.steps[1]) > 5
    np.testing.assert_allclose(res.value, np.linalg.solve(A, b.T).T, rtol=1e-10)


def test_cg_detects_negative_curvature(x64):
    A = jnp.diag(jnp.array([1.0, -2.0, 3.0]))
    res = linsolve.solve_cg(lambda v: A @ v, jnp.ones((1, 3)), damping=0.0, rtol=1e-10)
    assert bool(res.negative_curvature[0]) and not bool(res.converged[0])
    with pytest.raises(NumericalError, match="negative curvature"):
        linsolve.check_solve(res, rtol=1e-10)


# (the suite's time budget; test_reliability's property test compares the same paths)
@pytest.mark.slow
def test_generic_paths_agree_with_closed_form_on_digits(x64):
    s, apply, loss_fn, params = digits_linear()
    kw = dict(num_classes=10, weight_decay=1e-2)
    ref = influence.linear_category_influence(params, s.train.x, s.train.y, s.val.x, s.val.y, **kw)
    scale = np.abs(ref.P).max()
    for cfg in (
        influence.InfluenceConfig(damping=0.0, rtol=1e-10, method="jvp", chunk_size=100),
        influence.InfluenceConfig(
            damping=0.0, rtol=1e-10, method="per_sample", chunk_size=333, hvp_batch_size=250
        ),
        influence.InfluenceConfig(solver="dense", damping=0.0, curvature="gauss_newton"),
    ):
        res = influence.category_influence(
            loss_fn, params, s.train.x, s.train.y, s.val.x, s.val.y, apply=apply, config=cfg, **kw
        )
        assert np.abs(res.P - ref.P).max() / scale < 1e-6, cfg
    # the closed form's solutions are in the generic flat ordering
    G = influence.class_gradients(loss_fn, params, s.val.x, s.val.y, 10)
    hvp, _ = influence.make_hvp(loss_fn, params, s.train.x, s.train.y, weight_decay=1e-2)
    np.testing.assert_allclose(jax.vmap(hvp)(ref.solutions), G, rtol=1e-8, atol=1e-12)


def test_chunk_size_does_not_change_P(x64):
    x, y, xv, yv, apply, loss_fn, params = _mlp_problem()
    G = influence.class_gradients(loss_fn, params, xv, yv, 3)
    U = jnp.asarray(np.random.default_rng(0).normal(size=G.shape))
    outs = [
        influence.influence_from_solutions(loss_fn, params, U, x, y, method=m, chunk_size=c)
        for m in ("jvp", "per_sample")
        for c in (1, 7, 40, 64)
    ]
    # independent reference: per-sample gradients from a Python loop
    ref = (
        np.stack([ravel_pytree(jax.grad(loss_fn)(params, x[i], y[i]))[0] for i in range(len(y))])
        @ np.asarray(U).T
        / len(y)
    )
    for o in outs:
        np.testing.assert_allclose(o, ref, rtol=1e-10, atol=1e-14)


def test_sign_and_scale_identity_against_retraining(x64):
    """docs/method.md §2: up-weighting z_i by ε changes class-k validation loss by −ε·P[i,k]."""
    s, apply, loss_fn, params = digits_linear()
    res = influence.linear_category_influence(
        params, s.train.x, s.train.y, s.val.x, s.val.y, num_classes=10, weight_decay=1e-2
    )
    P = np.asarray(res.P)
    base = class_val_loss(loss_fn, params, s.val.x, s.val.y, 10)
    i = int(np.argmax(np.abs(P).sum(1)))
    for eps in (0.5, -0.5):
        w = np.ones(len(s.train.y))
        w[i] += eps
        new, _ = fit_exact(
            loss_fn, params, s.train.x, s.train.y, weight_decay=1e-2, weights=w, init=params
        )
        actual = class_val_loss(loss_fn, new, s.val.x, s.val.y, 10) - base
        pred = -eps * P[i]
        assert np.all(
            np.sign(actual[np.abs(pred) > 1e-3 * np.abs(pred).max()])
            == np.sign(pred[np.abs(pred) > 1e-3 * np.abs(pred).max()])
        )
        assert np.linalg.norm(actual - pred) / np.linalg.norm(pred) < 0.1


def test_agreement_with_retraining_removals_and_reweightings(x64):
    """≥100 single-sample removals (Spearman ≥ 0.95) and small re-weightings (rel. err < 10%)."""
    s, apply, loss_fn, params = digits_linear()
    n = len(s.train.y)
    res = influence.linear_category_influence(
        params, s.train.x, s.train.y, s.val.x, s.val.y, num_classes=10, weight_decay=1e-2
    )
    P = np.asarray(res.P)
    base = class_val_loss(loss_fn, params, s.val.x, s.val.y, 10)
    rng = np.random.default_rng(0)
    idx = rng.choice(n, 100, replace=False)
    actual = []
    for i in idx:
        w = np.ones(n)
        w[i] = 0.0
        new, _ = fit_exact(
            loss_fn, params, s.train.x, s.train.y, weight_decay=1e-2, weights=w, init=params
        )
        actual.append(class_val_loss(loss_fn, new, s.val.x, s.val.y, 10) - base)
    actual = np.array(actual)
    rho = ss.spearmanr(P[idx].ravel(), actual.ravel())[0]
    assert rho >= 0.95, rho
    for k in range(10):
        assert ss.spearmanr(P[idx, k], actual[:, k])[0] >= 0.95
    for eps in (0.05, 0.2):
        w = 1 + eps * rng.uniform(-1, 1, n)
        new, _ = fit_exact(
            loss_fn, params, s.train.x, s.train.y, weight_decay=1e-2, weights=w, init=params
        )
        act = class_val_loss(loss_fn, new, s.val.x, s.val.y, 10) - base
        pred = influence.predict_class_loss_change(res, w)
        assert np.linalg.norm(pred - act) / np.linalg.norm(act) < 0.1
        # the Σw normaliser: accounted for, the prediction still holds
        new_w, _ = fit_exact(loss_fn, params, s.train.x, s.train.y, weight_decay=1e-2, weights=w,
            normalizer="weights", init=params)
        act_w = class_val_loss(loss_fn, new_w, s.val.x, s.val.y, 10) - base
        pred_w = influence.predict_class_loss_change(
            res, w, params=params, weight_decay=1e-2, normalizer="weights"
        )
        assert np.linalg.norm(pred_w - act_w) / np.linalg.norm(act_w) < 0.1


def test_regions():
    P = np.array([[1.0, 2.0], [-1.0, -0.5], [1.0, -1.0], [0.0, 1.0]])
    assert influence.influence_regions(P).tolist() == [1, -1, 0, 0]


def test_errors(x64):
    x, y, xv, yv, apply, loss_fn, params = _mlp_problem()
    kw = dict(num_classes=3, weight_decay=0.05)
    with pytest.raises(InputError, match=r"y_val.*class\(es\) \[2\]"):
        influence.category_influence(loss_fn, params, x, y, xv[yv < 2], yv[yv < 2], **kw)
    with pytest.raises(InputError, match="x_val"):
        influence.category_influence(loss_fn, params, x, y, xv[:, :3], yv, **kw)
    with pytest.raises(InputError, match="y_train"):
        influence.category_influence(loss_fn, params, x, y[:-1], xv, yv, **kw)
    with pytest.raises(InputError, match="x_train"):
        influence.category_influence(
            loss_fn, params, np.where(np.eye(40, 4) > 0, np.nan, x), y, xv, yv, **kw
        )
    bad = jax.tree_util.tree_map(lambda p: p * np.nan, params)
    with pytest.raises(NumericalError, match="params"):
        influence.category_influence(loss_fn, bad, x, y, xv, yv, **kw)

    def nan_grad_loss(p, xi, yi):  # finite loss, NaN gradient (d sqrt(u)/du at u = 0)
        return loss_fn(p, xi, yi) + jnp.sqrt(0.0 * jnp.sum(p["head"]["bias"] ** 2))

    with pytest.raises(NumericalError, match="class gradients.*non-finite"):
        influence.category_influence(nan_grad_loss, params, x, y, xv, yv, **kw)
    with pytest.raises(NumericalError, match="residual"):
        influence.category_influence(loss_fn, params, x, y, xv, yv, **kw,
            config=influence.InfluenceConfig(max_steps=2, rtol=1e-12, throw=True, damping=0.0))
    with pytest.raises(InputError, match="damping"):
        influence.InfluenceConfig(damping=-1.0)


def test_second_call_does_not_recompile():
    x, y = tiny_classification(n=30, d=4, k=3, dtype=np.float32)
    apply, params = models.functional(models.make_model("linear", (4,), 3))
    traces = []
    base = models.per_sample_loss(apply)

    def loss_fn(p, xi, yi):
        traces.append(1)
        return base(p, xi, yi)

    kw = dict(num_classes=3, weight_decay=0.1, config=influence.InfluenceConfig(damping=0.0))
    influence.category_influence(loss_fn, params, x, y, x, y, **kw)
    n1 = len(traces)
    params2 = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    influence.category_influence(loss_fn, params2, x, y, x, y, **kw)
    assert len(traces) == n1


def test_weighted_closed_form_matches_dense_reference_and_retraining(x64):
    """P for a model trained with weights v (the iterated Direct Improvement setting): the
    closed form against a dense float64 Hessian of the weighted objective, and the predicted
    effect of multiplying the weights by (1 + ε·d) against actual refitting."""
    from jax.flatten_util import ravel_pytree

    s = data.stratified_split(data.load_digits(), seed=0)
    x, y = s.train.x[:300].astype(np.float64), s.train.y[:300]
    apply, params = models.functional(models.make_model("linear", (64,), 10))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    lf = models.per_sample_loss(apply)
    v = np.random.default_rng(0).uniform(0, 2, len(y))
    th, _, _ = train.fit_lbfgs(train.Objective(lf, 1e-2, "n"), params, x, y, weights=v, tol=1e-10)
    r = influence.linear_category_influence(
        th, x, y, s.val.x, s.val.y, num_classes=10, weight_decay=1e-2, weights=v
    )
    flat, unr = ravel_pytree(th)
    H = jax.hessian(
        lambda f: train.weighted_objective(
            lf, unr(f), x, y, jnp.asarray(v), weight_decay=1e-2, normalizer="n"
        )
    )(flat)
    G = influence.class_gradients(lf, th, s.val.x, s.val.y, 10)
    g = np.asarray(influence.per_sample_gradients(lf, th, x, y))
    ref = v[:, None] * (g @ np.linalg.solve(np.asarray(H), np.asarray(G).T)) / len(y)
    assert np.abs(np.asarray(r.P) - ref).max() / np.abs(ref).max() < 1e-10
    # multiplicative re-weighting v -> v ⊙ (1 + ε d): predicted −ε Σ d_i P[i, k] vs refit
    d = np.random.default_rng(1).uniform(-1, 1, len(y))
    eps = 0.05
    th2, _, _ = train.fit_lbfgs(
        train.Objective(lf, 1e-2, "n"), th, x, y, weights=v * (1 + eps * d), tol=1e-10
    )
    base = train.evaluate(apply, th, s.val.x, s.val.y, 10).loss
    actual = train.evaluate(apply, th2, s.val.x, s.val.y, 10).loss - base
    pred = -eps * d @ np.asarray(r.P)
    assert np.abs(pred - actual).max() / np.abs(actual).max() < 0.1


@pytest.mark.parametrize(
    "cfg",
    [dict(curvature="gauss_newton", method="jvp"),
        # (the Hessian here has eigenvalues near -2.5: a damping above them, since a damping
        # that is set is never raised silently)
        dict(curvature="hessian", method="per_sample", chunk_size=7, hvp_batch_size=9,
            damping=10.0),
        dict(curvature="gauss_newton", preconditioner="ekfac")],
)
def test_compiled_and_stepped_execution_agree(x64, cfg):
    """The two ways a stage can run on one device (one compiled program, or its loops on the
    host: the CPU default) give the same P, and the result says which one ran."""
    x, y = tiny_classification(n=40, d=16, k=3)
    m = models.make_model("cnn", (16,), 3, image_shape=(4, 4, 1), channels=(2,), dense=5, seed=1)
    apply, params = models.functional(m)
    params = to64(params)
    loss_fn = models.per_sample_loss(apply)
    out = {}
    for ex in ("compiled", "stepped"):
        c = influence.InfluenceConfig(**{"damping": 1e-2, "rtol": 1e-10, "execution": ex, **cfg})
        r = influence.category_influence(loss_fn, params, x, y, x, y, num_classes=3,
            weight_decay=0.1, apply=apply, model=m, config=c)
        assert r.details["execution"] == ex and np.all(r.converged)
        out[ex] = r
    a, b = out["compiled"], out["stepped"]
    np.testing.assert_allclose(b.P, a.P, rtol=1e-8, atol=1e-12 * np.abs(a.P).max())
    # the stepped CG multiplies only the still-active rows (other batch shapes, other rounding):
    # a row whose residual lands on the tolerance may take one step more or less
    assert np.abs(a.steps - b.steps).max() <= 1


def test_gauss_newton_is_never_applied_to_another_loss(x64):
    """Gauss-Newton (and K-FAC) use cross-entropy's output Hessian diag p − ppᵀ. For a loss that
    is not cross-entropy of apply's logits (here 10·CE on a trained, confident MLP) the old
    default silently used it anyway (P off by a median factor 6.6, issue 17): "auto" must now
    take the Hessian, say so, and give the P of a dense solve with that loss's own Hessian; an
    explicit Gauss-Newton / EK-FAC request must be refused; plain CE keeps Gauss-Newton."""
    x, y, xv, yv, apply, ce, params = _mlp_problem(n=60)
    loss10 = lambda p, xi, yi: 10.0 * ce(p, xi, yi)  # noqa: E731
    params, _ = fit_exact(loss10, params, x, y, weight_decay=0.05, init=params)
    assert float(jnp.mean(jnp.max(jax.nn.softmax(apply(params, x)), 1))) > 0.8  # confident
    kw = dict(num_classes=3, weight_decay=0.05, apply=apply)
    res = influence.category_influence(loss10, params, x, y, xv, yv, **kw,
        config=influence.InfluenceConfig(damping=0.0, rtol=1e-12))
    assert res.curvature == "hessian" and "cross-entropy" in res.details["curvature_note"]
    # reference: the dense Hessian of (1/N) Σ 10·CE + (λ/2)‖θ‖², per-sample and class gradients
    theta, unravel = ravel_pytree(params)
    f = lambda t, xi, yi: loss10(unravel(t), xi, yi)  # noqa: E731
    H = jax.hessian(lambda t: jnp.mean(jax.vmap(f, (None, 0, 0))(t, x, y)) + 0.025 * t @ t)(theta)
    assert np.linalg.eigvalsh(np.asarray(H)).min() > 0
    G = np.stack(
        [
            jax.grad(lambda t: jnp.mean(jax.vmap(f, (None, 0, 0))(t, xv[yv == k], yv[yv == k])))(
                theta
            )
            for k in range(3)
        ]
    )
    Gi = np.asarray(jax.vmap(jax.grad(f), (None, 0, 0))(theta, x, y))
    P_ref = Gi @ np.linalg.solve(np.asarray(H), G.T) / len(y)
    np.testing.assert_allclose(res.P, P_ref, rtol=1e-6, atol=1e-9 * np.abs(P_ref).max())
    for cfg in (influence.InfluenceConfig(curvature="gauss_newton"),
        influence.InfluenceConfig(solver="ekfac")):
        with pytest.raises(InputError, match="cross-entropy"):
            influence.category_influence(loss10, params, x, y, xv, yv, **kw, config=cfg)
    with pytest.raises(InputError, match="cross-entropy"):  # the lower-level product too
        influence.make_hvp(
            loss10, params, x, y, weight_decay=0.05, curvature="gauss_newton", apply=apply
        )
    assert influence.category_influence(ce, params, x, y, xv, yv, **kw).curvature == "gauss_newton"


def test_closed_form_takes_image_shaped_inputs_as_the_linear_model_does(x64):
    """A linear classifier flattens each sample, so 8×8 digit images are a valid input: the
    closed form answers as the generic dense solve on the same images (the CLI crashed here)."""
    d = data.load_digits()
    s = data.stratified_split(
        data.Dataset(d.x[:400].reshape(-1, 8, 8), d.y[:400], d.class_names), seed=0
    )
    apply, params = models.functional(models.make_model("linear", (8, 8), 10))
    loss_fn = models.per_sample_loss(apply)
    params = train.train(
        loss_fn, params, s.train.x, s.train.y, train.TrainConfig(epochs=30, weight_decay=1e-2)
    ).params
    params = to64(params)
    kw = dict(num_classes=10, weight_decay=1e-2)
    got = influence.linear_category_influence(params, s.train.x, s.train.y, s.val.x, s.val.y, **kw)
    ref = influence.category_influence(loss_fn, params, s.train.x, s.train.y, s.val.x, s.val.y,
        config=influence.InfluenceConfig(solver="dense", damping=0.0, curvature="hessian"), **kw)
    assert got.P.shape == (len(s.train), 10)
    np.testing.assert_allclose(got.P, ref.P, rtol=1e-7, atol=1e-9 * np.abs(ref.P).max())
    with pytest.raises(InputError, match="features per sample"):
        influence.linear_category_influence(
            params, s.train.x[:, :4], s.train.y, s.val.x[:, :4], s.val.y, **kw
        )
