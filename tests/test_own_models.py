"""Bring your own model: user nnx modules (BatchNorm, Dropout, Embed on token IDs), a plain-JAX
model, losses other than cross-entropy, against dense float64 references formed independently
(the full Hessian by `jax.hessian`, Gauss-Newton as an explicit Σ Jᵀ H_out J from `jax.jacrev`).

Every model is trained first (confident, non-uniform softmax) before influence is computed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _problems import subspace_P
from flax import nnx
from jax.flatten_util import ravel_pytree

from pareto_jax import InputError, NumericalError, influence, models
from pareto_jax.influence import Influence, InfluenceConfig, InfluenceResult

K, N, NV, WD, DAMP = 3, 40, 30, 1e-2, 1e-2


# ----------------------------------------------------------------------------- models


class ConvBNDrop(nnx.Module):
    """conv 3×3 → BatchNorm → tanh → avg pool → Dropout → dense head, on 6×6×1 images."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), padding="SAME", rngs=rngs, param_dtype=jnp.float64)
        self.bn = nnx.BatchNorm(3, rngs=rngs, param_dtype=jnp.float64)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(27, K, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.conv(x)))
        h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
        return self.head(self.drop(h.reshape(h.shape[0], -1)))


class TokenClassifier(nnx.Module):
    """Embedding of integer token IDs, masked mean over the sequence, tanh dense, head. Inputs
    are a dict {"ids": int (L,), "mask": float (L,)}."""

    def __init__(self, rngs, vocab=11, dim=4):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs, param_dtype=jnp.float64)
        self.dense = nnx.Linear(dim, 5, rngs=rngs, param_dtype=jnp.float64)
        self.head = nnx.Linear(5, K, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        e = self.embed(x["ids"]) * x["mask"][..., None]
        h = e.sum(1) / jnp.maximum(x["mask"].sum(1, keepdims=True), 1.0)
        return self.head(jnp.tanh(self.dense(h)))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(5, 6, rngs=rngs, param_dtype=jnp.float64)
        self.b = nnx.Linear(6, K, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def plain_apply(params, x):  # a plain-JAX model: no flax at all
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def linear_apply(params, x):
    return x @ params["w"] + params["b"]


def _data(kind, seed=0):
    rng = np.random.default_rng(seed)
    n = N + NV
    y = np.arange(n) % K
    rng.shuffle(y)
    if kind == "cnn":
        x = (
            rng.normal(size=(n, 6, 6, 1))
            + y[:, None, None, None] * np.linspace(-1, 1, 6)[None, :, None, None]
        )
    elif kind == "text":
        ids = rng.integers(1, 11, size=(n, 5))
        ids[:, 0] = 1 + 3 * y + rng.integers(0, 3, n)  # the first token is informative
        mask = (rng.uniform(size=(n, 5)) < 0.8).astype(np.float64)
        mask[:, 0] = 1.0
        x = {"ids": ids.astype(np.int32), "mask": mask}
    else:
        centres = rng.normal(size=(K, 5)) * 1.5
        x = centres[y] + rng.normal(size=(n, 5))
    tr = lambda a: a[:N]  # noqa: E731
    va = lambda a: a[N:]  # noqa: E731
    return (jax.tree_util.tree_map(tr, x), y[:N].astype(np.int32), jax.tree_util.tree_map(va, x),
        y[N:].astype(np.int32))


def _build(kind):
    if kind == "mlp":
        return models.functional(MLP(nnx.Rngs(0)))
    if kind == "cnn":
        return models.functional(ConvBNDrop(nnx.Rngs(0)))
    if kind == "text":
        return models.functional(TokenClassifier(nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    if kind == "plain":
        return plain_apply, {"w1": rng.normal(size=(5, 6)) * 0.5, "b1": np.zeros(6),
            "w2": rng.normal(size=(6, K)) * 0.5, "b2": np.zeros(K)}
    return linear_apply, {"w": rng.normal(size=(5, K)) * 0.1, "b": np.zeros(K)}


def _train(apply, params, x, y, steps=150):
    """Full-batch Adam on cross-entropy + weight decay, so the softmax is confident."""
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    opt = optax.adam(0.05)

    def obj(p):
        ce = optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
        return ce + 0.5 * WD * sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, s):
        g = jax.grad(obj)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = opt.init(params)
    for _ in range(steps):
        params, s = step(params, s)
    return params


@pytest.fixture(scope="module")
def trained():
    cache = {}

    def get(kind):
        if kind not in cache:
            with jax.enable_x64(True):
                apply, p = _build(kind)
                xt, yt, xv, yv = _data(kind)
                p = _train(apply, p, xt, yt)
                prob = jax.nn.softmax(apply(p, xt))
                cache[kind] = (apply, p, xt, yt, xv, yv, np.asarray(prob))
        return cache[kind]

    return get


# ----------------------------------------------------------------------------- losses


def ce(z, y):
    return optax.softmax_cross_entropy_with_integer_labels(z, y)


def ce10(z, y):
    return 10.0 * optax.softmax_cross_entropy_with_integer_labels(z, y)


def smoothed(z, y):
    return optax.softmax_cross_entropy(z, optax.smooth_labels(jax.nn.one_hot(y, z.shape[-1]), 0.1))


def focal(z, y):
    logp = jax.nn.log_softmax(z)[y]
    return -((1.0 - jnp.exp(logp)) ** 2) * logp


LOSSES = {"ce": models.cross_entropy, "10ce": ce10, "smoothed": smoothed, "focal": focal}


# ----------------------------------------------------------------------------- the dense reference


def dense_curvature(apply, out, params, xt, yt, curvature):
    """The objective's Hessian, or Σ Jᵀ H_out J / N + λI, as a dense matrix."""
    theta, unravel = ravel_pytree(params)
    logits = lambda th, x: apply(unravel(th), x)  # noqa: E731
    if curvature == "hessian":  # (jitted: eager dispatch of a dense Hessian is slow, not wrong)
        return jax.jit(
            jax.hessian(lambda th: jax.vmap(out)(logits(th, xt), yt).mean() + 0.5 * WD * th @ th)
        )(theta)
    J = jax.jit(jax.jacrev(logits))(theta, xt)  # (N, K, P)
    Hout = jax.jit(jax.vmap(jax.hessian(out)))(apply(params, xt), yt)  # (N, K, K)
    return jnp.einsum("nkp,nkl,nlq->pq", J, Hout, J) / N + WD * jnp.eye(theta.size)


def safe_damping(apply, out, params, xt, yt, curvature):
    """DAMP, raised past the most negative eigenvalue where the curvature is indefinite (a
    focal loss, a scaled loss far from its own optimum), so that CG has a positive system."""
    lo = float(jnp.linalg.eigvalsh(dense_curvature(apply, out, params, xt, yt, curvature))[0])
    return DAMP + max(0.0, -1.5 * lo)


def dense_reference(
    apply, out, params, xt, yt, xv, yv, curvature, damping, groups=None, measure=None
):
    """P from dense float64 algebra, written without the package's kernels."""
    theta, unravel = ravel_pytree(params)
    logits = lambda th, x: apply(unravel(th), x)  # noqa: E731
    losses = lambda th, x, y: jax.vmap(out)(logits(th, x), y)  # noqa: E731
    H = dense_curvature(apply, out, params, xt, yt, curvature)
    g = groups if groups is not None else yv
    G_ = int(g.max()) + 1
    meas = (
        (lambda th: losses(th, xv, yv))
        if measure is None
        else (lambda th: jax.vmap(lambda x, y: measure(unravel(th), x, y))(xv, yv))
    )
    Gm = jax.jit(jax.jacrev(lambda th: (jax.nn.one_hot(g, G_).T @ meas(th)) / np.bincount(g)))(
        theta
    )  # (G, P)
    U = jnp.linalg.solve(H + damping * jnp.eye(theta.size), Gm.T)  # (P, G)
    per_sample = jax.jit(jax.jacrev(lambda th: losses(th, xt, yt)))(theta)  # (N, P)
    return np.asarray(per_sample @ U / N)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


MODELS = ["mlp", "cnn", "text", "plain"]
# the full matrix with -m slow; by default every model with cross-entropy (both curvatures),
# every loss on the MLP with Gauss-Newton, and the focal loss's Gauss-Newton on the CNN: each
# axis covered in 12 of the 32 cases
MATRIX = [
    pytest.param(
        m,
        lo,
        c,
        marks=()
        if (
            lo == "ce"
            or (m == "mlp" and c == "gauss_newton")
            or (m == "cnn" and lo == "focal" and c == "gauss_newton")
        )
        else pytest.mark.slow,
    )
    for m in MODELS
    for lo in LOSSES
    for c in ("hessian", "gauss_newton")
]


@pytest.mark.parametrize("kind, loss, curvature", MATRIX)
def test_influence_matches_the_dense_reference(trained, kind, loss, curvature):
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, prob = trained(kind)
        assert prob.max(1).mean() > 0.7, "the model must be trained (confident), not at its init"
        out = LOSSES[loss]
        loss_fn = models.OutputLoss(apply, out)
        damp = safe_damping(apply, out, params, xt, yt, curvature)
        cfg = InfluenceConfig(
            curvature=curvature, damping=damp, rtol=1e-12, max_steps=2000, escalate_damping=False
        )
        res = influence.category_influence(
            loss_fn, params, xt, yt, xv, yv, num_classes=K, weight_decay=WD, config=cfg
        )
        assert res.curvature == curvature and res.damping == damp and np.all(res.converged)
        ref = dense_reference(apply, out, params, xt, yt, xv, yv, curvature, damp)
        assert _rel(res.P, ref) < 1e-7, (kind, loss, curvature)


@pytest.mark.parametrize("kind, loss", [("mlp", "10ce"), ("plain", "focal"), ("text", "focal")])
def test_float32_gauss_newton_of_another_loss_matches_the_float64_reference(trained, kind, loss):
    """The same trained model in float32 (params and float inputs; token IDs stay int32): Gauss-
    Newton with the loss's own output Hessian, against the float64 dense reference. The token
    model's nnx.Embed was built with param_dtype float64 and computes in it whatever its params:
    its losses come out float64 while θ is float32 (the class-gradient cotangent must follow the
    losses' dtype), so its P is float64; the other two compute in float32 throughout."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained(kind)
        out = LOSSES[loss]
        damp = safe_damping(apply, out, params, xt, yt, "gauss_newton")
        ref = dense_reference(apply, out, params, xt, yt, xv, yv, "gauss_newton", damp)
        f32 = lambda t: jax.tree_util.tree_map(  # noqa: E731
            lambda a: (
                np.asarray(a, np.float32) if np.issubdtype(np.asarray(a).dtype, np.floating) else a
            ),
            t,
        )
        res = influence.category_influence(
            models.OutputLoss(apply, out),
            f32(params),
            f32(xt),
            yt,
            f32(xv),
            yv,
            num_classes=K,
            weight_decay=WD,
            config=InfluenceConfig(
                curvature="gauss_newton", damping=damp, rtol=1e-5, escalate_damping=False
            ),
        )
        assert (
            res.P.dtype == (jnp.float64 if kind == "text" else jnp.float32)
            and res.curvature == "gauss_newton"
        )
        assert _rel(res.P, ref) < 2e-3, _rel(res.P, ref)


@pytest.mark.parametrize("loss", ["ce", "10ce", "smoothed"])
def test_gauss_newton_equals_the_hessian_on_a_linear_model(trained, loss):
    """Convex output loss on a linear model: J is constant, so the Gauss-Newton matrix is the
    Hessian exactly; both paths must give the same P, and the dense reference's."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("linear")
        loss_fn = models.OutputLoss(apply, LOSSES[loss])
        P = {}
        for c in ("hessian", "gauss_newton"):
            cfg = InfluenceConfig(curvature=c, damping=DAMP, rtol=1e-12, escalate_damping=False)
            P[c] = np.asarray(
                influence.category_influence(
                    loss_fn, params, xt, yt, xv, yv, num_classes=K, weight_decay=WD, config=cfg
                ).P
            )
        ref = dense_reference(apply, LOSSES[loss], params, xt, yt, xv, yv, "hessian", DAMP)
        assert _rel(P["gauss_newton"], P["hessian"]) < 1e-8
        assert _rel(P["hessian"], ref) < 1e-8


def test_a_scaled_loss_is_not_given_cross_entropy_curvature(trained):
    """10·CE: Gauss-Newton must use 10·H_CE. Answering with the cross-entropy output Hessian
    (the old silent error) differs from the reference by a factor ~10 on P."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        cfg = InfluenceConfig(
            curvature="gauss_newton", damping=DAMP, rtol=1e-12, escalate_damping=False
        )
        res = influence.category_influence(models.OutputLoss(apply, ce10), params, xt, yt, xv, yv,
            num_classes=K, weight_decay=WD, config=cfg)
        right = dense_reference(apply, ce10, params, xt, yt, xv, yv, "gauss_newton", DAMP)
        theta, unravel = ravel_pytree(params)
        J = jax.jit(jax.jacrev(lambda th, x: apply(unravel(th), x)))(theta, xt)
        Hce = jax.jit(jax.vmap(jax.hessian(ce)))(apply(params, xt), yt)
        H_wrong = jnp.einsum("nkp,nkl,nlq->pq", J, Hce, J) / N + (WD + DAMP) * jnp.eye(theta.size)
        Gm = jax.jit(
            jax.jacrev(
                lambda th: (
                    (jax.nn.one_hot(yv, K).T @ jax.vmap(ce10)(apply(unravel(th), xv), yv))
                    / np.bincount(yv)
                )
            )
        )(theta)
        per = jax.jit(jax.jacrev(lambda th: jax.vmap(ce10)(apply(unravel(th), xt), yt)))(theta)
        wrong = np.asarray(per @ jnp.linalg.solve(H_wrong, Gm.T) / N)
        assert _rel(res.P, right) < 1e-7
        assert _rel(wrong, right) > 1.0


def ce_minus_square(z, y):  # a non-convex output loss: H_out = H_CE − e_y e_yᵀ is indefinite
    return ce(z, y) - 0.5 * z[y] ** 2


def test_auto_curvature_takes_the_hessian_when_the_output_loss_is_indefinite(trained):
    """The PSD check decides on the output Hessians themselves, computed here independently
    (numpy eigenvalues of `jax.hessian`): an indefinite one gets the Hessian with a note, a PSD one
    (10·CE; the focal loss at this trained model) Gauss-Newton."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")

        def min_eig(out):
            H = np.asarray(jax.vmap(jax.hessian(out))(apply(params, xt[:16]), yt[:16]))
            return min(np.linalg.eigvalsh(h).min() for h in H)

        cfg = InfluenceConfig(damping=DAMP, rtol=1e-10)
        run = lambda out: influence.category_influence(
            models.OutputLoss(apply, out),
            params,
            xt,
            yt,
            xv,
            yv,  # noqa: E731
            num_classes=K,
            weight_decay=WD,
            config=cfg,
        )
        assert min_eig(ce_minus_square) < -0.1
        with pytest.raises(NumericalError, match="not replaced silently"):
            run(ce_minus_square)  # the Hessian is indefinite at the damping set: refused
        cfg = dataclasses.replace(cfg, escalate_damping=True)
        with pytest.warns(influence.DampingWarning):
            res = run(ce_minus_square)
        assert res.curvature == "hessian" and "indefinite" in res.details["curvature_note"]
        for out in (ce10, focal):
            assert min_eig(out) > -1e-12
            res = run(out)
            assert res.curvature == "gauss_newton"
            assert "Gauss-Newton with the OutputLoss" in res.details["curvature_note"]


# ----------------------------------------------------------------------------- adapters


def test_nnx_adapter_holds_batch_statistics_and_rng_state_fixed():
    m = ConvBNDrop(nnx.Rngs(0))
    m.bn.mean.value = jnp.asarray([0.3, -0.2, 0.1])  # as if trained
    apply, params = models.functional(m)
    names = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any("mean" in n or "var" in n or "rngs" in n for n in names), names
    assert any("bn" in n and "scale" in n for n in names)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 6, 1)))
    a, b = apply(params, x), apply(params, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # dropout off: deterministic
    m.eval()
    np.testing.assert_allclose(np.asarray(a), np.asarray(m(x)), rtol=1e-6)  # the running statistics


def test_a_model_with_no_param_is_refused():
    class NoParams(nnx.Module):
        def __init__(self):
            self.scale = nnx.BatchStat(jnp.ones(3))

        def __call__(self, x):
            return x * self.scale.value

    with pytest.raises(InputError, match="nnx.Param"):
        models.functional(NoParams())


def test_kfac_answers_a_batchnorm_model_with_the_norm_held_fixed(trained):
    """BatchNorm (running statistics, eval mode) and Dropout: K-FAC / EK-FAC used to refuse the
    model; now they factor its Conv and Linear layers with BatchNorm's scale and bias held fixed
    (stated), measured against the exact Gauss-Newton solve on that subspace."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("cnn")
        m = ConvBNDrop(nnx.Rngs(0))
        ref, trivial = subspace_P(apply, params, ["conv", "head"], xt, yt, K, weight_decay=WD,
            damping=DAMP)
        for solver in ("ekfac", "kfac"):
            res = influence.category_influence(models.OutputLoss(apply), params, xt, yt, xt, yt,
                num_classes=K, weight_decay=WD, model=m,
                config=InfluenceConfig(solver=solver, damping=DAMP))
            assert "bn/scale" in res.details["selection"]
            for k in range(K):
                r = np.corrcoef(res.P[:, k], ref[:, k])[0, 1]
                r0 = np.corrcoef(trivial[:, k], ref[:, k])[0, 1]
                # measured: EK-FAC 0.86-0.93, K-FAC 0.82-0.87; on this small network the
                # identity curvature already reaches 0.87-0.92, so no bar above it here (the
                # LayerNorm MLP of test_selection has one)
                assert r > (0.85 if solver == "ekfac" else 0.8), (solver, k, r, r0)


# -------------------------------------------------------------------------- groups and measurements


def test_groups_and_a_measurement_match_the_dense_reference(trained):
    """Fit once, then ask by class, by an arbitrary partition, and for another measurement."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("text")
        cfg = InfluenceConfig(curvature="hessian", damping=DAMP, rtol=1e-12, escalate_damping=False)
        fit = Influence(models.OutputLoss(apply), params, xt, yt, num_classes=K, weight_decay=WD,
            config=cfg, class_names=("a", "b", "c"))
        by_class = fit.influence(xv, yv)
        assert by_class.names == ("a", "b", "c")
        np.testing.assert_allclose(np.asarray(by_class.P),
            dense_reference(apply, ce, params, xt, yt, xv, yv, "hessian", DAMP), rtol=0,
            atol=1e-9 * float(np.abs(by_class.P).max()))
        groups = (np.arange(NV) % 2).astype(np.int32)  # a partition that is not the classes
        by_group = fit.influence(xv, yv, groups=groups, group_names=("even", "odd"))
        assert by_group.P.shape == (N, 2) and by_group.names == ("even", "odd")
        ref = dense_reference(apply, ce, params, xt, yt, xv, yv, "hessian", DAMP, groups=groups)
        assert _rel(by_group.P, ref) < 1e-7

        def margin(p, x, y):  # a measurement other than the loss: the negative logit margin
            z = apply(p, jax.tree_util.tree_map(lambda a: a[None], x))[0]
            return jnp.max(jnp.where(jnp.arange(K) == y, -jnp.inf, z)) - z[y]

        by_margin = fit.influence(xv, yv, measure_fn=margin)
        ref = dense_reference(apply, ce, params, xt, yt, xv, yv, "hessian", DAMP, measure=margin)
        assert _rel(by_margin.P, ref) < 1e-7
        assert (
            _rel(by_margin.P, np.asarray(by_class.P)) > 1e-2
        )  # a different question, a different P


# ----------------------------------------------------------------------------- jit, vmap, pytrees


def test_the_core_jits_and_vmaps_over_checkpoints(trained):
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        loss_fn = models.OutputLoss(apply)
        kw = dict(num_classes=K, weight_decay=WD, damping=DAMP, rtol=1e-12, max_steps=500)
        core = jax.jit(lambda p: influence.influence_matrix(loss_fn, p, xt, yt, xv, yv, **kw)[0])
        cfg = InfluenceConfig(curvature="hessian", damping=DAMP, rtol=1e-12, escalate_damping=False)
        front = influence.category_influence(
            loss_fn, params, xt, yt, xv, yv, num_classes=K, weight_decay=WD, config=cfg
        )
        assert _rel(core(params), np.asarray(front.P)) < 1e-8
        # two checkpoints stacked: vmap gives each one's P
        early = _train(apply, _build("mlp")[1], xt, yt, steps=20)
        stack = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), params, early)
        Ps = jax.jit(
            jax.vmap(lambda p: influence.influence_matrix(loss_fn, p, xt, yt, xv, yv, **kw)[0])
        )(stack)
        assert _rel(Ps[0], core(params)) < 1e-8 and _rel(Ps[1], core(early)) < 1e-8
        assert _rel(Ps[1], Ps[0]) > 1e-2
        # Gauss-Newton inside jit too, against the dense reference with a non-CE loss
        P_gn = jax.jit(
            lambda p: influence.influence_matrix(
                models.OutputLoss(apply, ce10), p, xt, yt, xv, yv, curvature="gauss_newton", **kw
            )[0]
        )(params)
        assert (
            _rel(P_gn, dense_reference(apply, ce10, params, xt, yt, xv, yv, "gauss_newton", DAMP))
            < 1e-7
        )


def test_results_are_pytrees_and_save_and_load(trained, tmp_path):
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        ids = np.arange(100, 100 + N)
        res = influence.category_influence(models.OutputLoss(apply), params, xt, yt, xv, yv,
            num_classes=K, weight_decay=WD, class_names=["x", "y", "z"], sample_ids=ids)
        leaves, tree = jax.tree_util.tree_flatten(res)
        back = jax.tree_util.tree_unflatten(tree, leaves)
        assert back.names == ("x", "y", "z") and back.details == res.details
        np.testing.assert_array_equal(np.asarray(back.P), np.asarray(res.P))
        doubled = jax.jit(lambda r: jax.tree_util.tree_map(lambda a: a * 2, r))(res)  # through jit
        np.testing.assert_allclose(np.asarray(doubled.P), 2 * np.asarray(res.P))
        path = res.save(tmp_path / "influence.npz")
        with np.load(path) as z:
            assert {"P", "names", "sample_ids", "solutions", "meta"} <= set(z.files)
        loaded = InfluenceResult.load(path)
        np.testing.assert_array_equal(np.asarray(loaded.P), np.asarray(res.P))
        np.testing.assert_array_equal(loaded.sample_ids, ids)
        assert loaded.names == ("x", "y", "z") and loaded.curvature == res.curvature
        assert loaded.summary() == res.summary()


# ----------------------------------------------------------------------------- bad inputs


def _mlp_problem(trained):
    apply, params, xt, yt, xv, yv, _ = trained("mlp")
    return apply, params, xt, yt, xv, yv


@pytest.mark.parametrize(
    "case", ["batched loss", "leading axes", "empty group", "nan measure", "x_val structure"]
)
def test_bad_inputs_name_the_argument(trained, case):
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv = _mlp_problem(trained)
        kw = dict(num_classes=K, weight_decay=WD)
        loss_fn = models.OutputLoss(apply)
        if case == "batched loss":
            call = lambda: influence.category_influence(  # noqa: E731
                lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
                    apply(p, x[None]), y[None]
                ),
                params,
                xt,
                yt,
                xv,
                yv,
                **kw,
            )
            match = "loss_fn.*shape \\(1,\\)"
        elif case == "leading axes":
            call = (
                lambda: influence.category_influence(  # noqa: E731
                    loss_fn, params, {"a": xt, "b": xt[:-1]}, yt, {"a": xv, "b": xv}, yv, **kw
                )
            )
            match = "x_train.*leading axes"
        elif case == "empty group":
            call = lambda: influence.category_influence(  # noqa: E731
                loss_fn, params, xt, yt, xv, yv, groups=np.where(np.arange(NV) < 10, 0, 2), **kw
            )
            match = "groups.*group\\(s\\) \\[1\\]"
        elif case == "nan measure":
            call = lambda: influence.category_influence(  # noqa: E731
                loss_fn,
                params,
                xt,
                yt,
                xv,
                yv,
                measure_fn=lambda p, x, y: jnp.log(-jnp.abs(loss_fn(p, x, y))),
                **kw,
            )
            match = "measure_fn"
        else:
            call = lambda: influence.category_influence(
                loss_fn, params, xt, yt, {"a": xv}, yv, **kw
            )  # noqa: E731
            match = "x_val"
        with pytest.raises(InputError, match=match):
            call()


def test_ceiling_and_program_results_are_pytrees(trained):
    from pareto_jax import pareto

    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        P = np.asarray(
            influence.category_influence(
                models.OutputLoss(apply), params, xt, yt, xv, yv, num_classes=K, weight_decay=WD
            ).P
        )
    for r in (pareto.ceiling_test(P), pareto.solve_reweighting(P, targets=[0], alpha=0.9, rho=0.5)):
        leaves, tree = jax.tree_util.tree_flatten(r)
        assert leaves, type(r).__name__
        back = jax.tree_util.tree_unflatten(tree, leaves)
        assert back.summary() == r.summary()


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_a_batch_source_gives_the_same_P_as_arrays(trained, curvature):
    """The training set as a function yielding uneven batches (7 samples, token dicts): the same
    P as from the arrays, and the rows in the source's order."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("text")
        cfg = InfluenceConfig(curvature=curvature, damping=DAMP, rtol=1e-12, escalate_damping=False,
            hvp_batch_size=16, chunk_size=8)

        def batches():
            for i in range(0, N, 7):
                yield jax.tree_util.tree_map(lambda a: a[i : i + 7], xt), yt[i : i + 7]

        lf = models.OutputLoss(apply)
        ref = influence.category_influence(
            lf, params, xt, yt, xv, yv, num_classes=K, weight_decay=WD, config=cfg
        )
        got = influence.category_influence(
            lf, params, batches, None, xv, yv, num_classes=K, weight_decay=WD, config=cfg
        )
        assert "streamed" in got.details["execution"] and got.P.shape == (N, K)
        assert _rel(got.P, np.asarray(ref.P)) < 1e-9
        # the chunks differ (fixed 16 streamed, balanced 14 from arrays): sums round differently
        assert np.abs(np.asarray(got.steps) - np.asarray(ref.steps)).max() <= 1


def test_a_bad_batch_source_is_named(trained):
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        lf = models.OutputLoss(apply)

        def labels_out_of_range():
            yield xt[:10], yt[:10]
            yield xt[10:20], yt[10:20] + K

        with pytest.raises(InputError, match="y_train batch 1"):
            influence.category_influence(
                lf, params, labels_out_of_range, None, xv, yv, num_classes=K, weight_decay=WD
            )
        with pytest.raises(InputError, match="y_train"):
            influence.category_influence(
                lf, params, lambda: iter([(xt, yt)]), yt, xv, yv, num_classes=K, weight_decay=WD
            )


@pytest.mark.slow  # two subprocesses streaming 250,000 samples (about 30 s)
def test_streamed_peak_memory_is_flat_in_n(tmp_path):
    """4× the samples (50,000 → 200,000 of 512 features) from a batch source: the peak grows by a
    few copies of the N×K output (host P, its device copy, the finiteness check), far less than
    the 293 MiB more the inputs would take in memory (measured: +15 MiB; from 100,000 to 400,000,
    +37 MiB against 586 MiB of inputs)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(
        os.environ, PYTHONPATH=str(here.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    res = {}
    for n in (50000, 200000):
        out = tmp_path / f"s{n}.json"
        r = subprocess.run([sys.executable, str(here / "_stream_worker.py"), str(n), str(out)],
            env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res[n] = json.loads(out.read_text())
    a, b = res[50000], res[200000]
    assert b["P_shape"] == [200000, 10] and "streamed" in b["execution"]
    growth = b["rss_peak_MiB"] - a["rss_peak_MiB"]
    output = (200000 - 50000) * 10 * 4 / 2**20
    assert growth < 5 * output + 16, (a, b)
    assert growth < 0.1 * (b["x_in_memory_MiB"] - a["x_in_memory_MiB"]), (a, b)


@pytest.mark.parametrize("solver", ["cg", "ekfac"])
def test_a_fitted_state_saves_and_loads(trained, tmp_path, solver):
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        lf = models.OutputLoss(apply)
        kw = dict(model=MLP(nnx.Rngs(0))) if solver == "ekfac" else {}
        fit = Influence(lf, params, xt, yt, num_classes=K, weight_decay=WD,
            config=InfluenceConfig(solver=solver), class_names=("a", "b", "c"), **kw)
        assert (fit.factors is not None) == (solver == "ekfac")
        fit.save(tmp_path / "fit")
        back = Influence.load(tmp_path / "fit", lf, params, xt, yt, **kw)
        assert back.damping == fit.damping and back.class_names == ("a", "b", "c")
        np.testing.assert_allclose(np.asarray(back.influence(xv, yv).P),
            np.asarray(fit.influence(xv, yv).P), rtol=1e-12, atol=0)
        other = jax.tree_util.tree_map(lambda a: a * 1.01, params)
        with pytest.raises(InputError, match="fingerprint"):
            Influence.load(tmp_path / "fit", lf, other, xt, yt, **kw)


class Lin(nnx.Module):
    def __init__(self, rngs):
        self.head = nnx.Linear(5, K, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.head(x)


@pytest.mark.parametrize(
    "loss",
    ["ce", pytest.param("10ce", marks=pytest.mark.slow),
        pytest.param("smoothed", marks=pytest.mark.slow), "focal"],
)
def test_kfac_output_factor_is_the_loss_own(loss):
    """One dense layer: K-FAC is A ⊗ S with A = mean ããᵀ (ã = [x, 1]) and S = mean H_out (the
    output loss's Hessian w.r.t. the logits, negative eigenvalues clipped), formed densely here
    from `jax.hessian`; P from solver='kfac' must equal P from that Kronecker matrix."""
    with jax.enable_x64(True):
        m = Lin(nnx.Rngs(0))
        apply, params = models.functional(m)
        xt, yt, xv, yv = _data("mlp")
        params = _train(apply, params, xt, yt)
        out = LOSSES[loss]
        res = influence.category_influence(models.OutputLoss(apply, out), params, xt, yt, xv, yv,
            num_classes=K, weight_decay=WD, model=m,
            config=InfluenceConfig(solver="kfac", damping=DAMP, escalate_damping=False))
        W, b = params["head"]["kernel"], params["head"]["bias"]
        at = np.concatenate([xt, np.ones((N, 1))], 1)  # ã (N, d+1)
        z = xt @ W + b
        lam, Q = np.linalg.eigh(np.asarray(jax.vmap(jax.hessian(out))(z, yt)))
        Hout = np.einsum("nij,nj,nkj->nik", Q, np.maximum(lam, 0), Q)
        M = np.kron(at.T @ at / N, Hout.mean(0)) + (WD + DAMP) * np.eye(at.shape[1] * K)
        g = np.asarray(jax.vmap(jax.grad(out))(z, yt))  # dℓ/dz per training sample
        per = np.einsum("ni,nk->nik", at, g).reshape(N, -1)  # vec of ã gᵀ, row-major (d+1, K)
        zv = xv @ W + b
        gv = np.asarray(jax.vmap(jax.grad(out))(zv, yv))
        av = np.concatenate([xv, np.ones((NV, 1))], 1)
        onehot = np.eye(K)[yv] / np.bincount(yv)
        Gk = np.einsum("nc,ni,nk->cik", onehot, av, gv).reshape(K, -1)  # class-mean gradients
        ref = per @ np.linalg.solve(M, Gk.T) / N
        assert _rel(res.P, ref) < 1e-8, loss


def test_the_core_is_differentiable(trained):
    """Reverse mode through the core (the CG solve by implicit differentiation): d(ΣP)/d(damping)
    and d(ΣP)/dθ along a random direction against central finite differences."""
    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        lf = models.OutputLoss(apply)
        damp = safe_damping(apply, ce, params, xt, yt, "hessian")

        @jax.jit
        def total(p, d):
            return influence.influence_matrix(lf, p, xt, yt, xv, yv, num_classes=K, weight_decay=WD,
                damping=d, rtol=1e-13, max_steps=500)[0].sum()

        gp, gd = jax.jit(jax.grad(total, argnums=(0, 1)))(params, damp)
        h = 1e-5
        fd_d = (total(params, damp + h) - total(params, damp - h)) / (2 * h)
        assert abs(float(gd) - float(fd_d)) < 1e-5 * abs(float(fd_d))
        rng = np.random.default_rng(3)
        v = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
        shift = lambda t: jax.tree_util.tree_map(lambda a, b: a + t * b, params, v)  # noqa: E731
        fd_p = (total(shift(h), damp) - total(shift(-h), damp)) / (2 * h)
        dot = sum(
            float(jnp.vdot(a, b))
            for a, b in zip(jax.tree_util.tree_leaves(gp), jax.tree_util.tree_leaves(v))
        )
        assert abs(dot - float(fd_p)) < 1e-4 * abs(float(fd_p)), (dot, float(fd_p))


def test_host_entry_points_under_jit_say_what_to_use(trained):
    from pareto_jax import pareto

    with jax.enable_x64(True):
        apply, params, xt, yt, xv, yv, _ = trained("mlp")
        lf = models.OutputLoss(apply)
        with pytest.raises(InputError, match="influence_matrix"):
            jax.jit(
                lambda p: (
                    influence.category_influence(
                        lf, p, xt, yt, xv, yv, num_classes=K, weight_decay=WD
                    ).P
                )
            )(params)
        with pytest.raises(InputError, match="ceiling_program"):
            jax.jit(lambda P: pareto.ceiling_test(P).t_star)(jnp.ones((5, 2)))
