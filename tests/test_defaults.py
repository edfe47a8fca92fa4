"""Honest defaults (issue 32): a damping you set is never replaced silently, the curvature does
not depend on how the loss was wrapped, `num_classes` matches the logits, labels are never
silently reduced, and the default tolerance is one the dtype reaches. Checked at trained models
against dense references computed here."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_classification

from pareto_jax import influence, linsolve, models, train
from pareto_jax.checks import InputError, NumericalError
from pareto_jax.influence import DampingWarning, InfluenceConfig


def _trained_indefinite():
    """A tanh MLP trained a few epochs with no weight decay: a model users have (confident on
    most samples, not at a minimum), whose Hessian has negative eigenvalues (asserted against a
    dense eigen-decomposition). Returns the problem and the Hessian's smallest eigenvalue."""
    x, y = tiny_classification(n=60, d=4, k=3, seed=1)
    apply, params = models.functional(models.make_model("mlp", (4,), 3, hidden=(6,), seed=2))
    loss_fn = models.per_sample_loss(apply)
    params = train.train(loss_fn, params, x, y, train.TrainConfig(epochs=30, batch_size=20,
        learning_rate=0.05, weight_decay=0.0)).params
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    hvp, theta = influence.make_hvp(loss_fn, params, x, y, weight_decay=0.0)
    ev = np.linalg.eigvalsh(np.asarray(linsolve.materialize(hvp, theta.size, jnp.float64)))
    p = jax.nn.softmax(apply(params, jnp.asarray(x)))
    assert ev[0] < -1e-4 * ev[-1] and float(jnp.median(p.max(-1))) > 0.8, (ev[0], ev[-1])
    return apply, params, loss_fn, x, y, float(ev[0])


def test_a_damping_you_set_is_refused_with_the_most_negative_curvature(x64):
    apply, params, loss_fn, x, y, lam_min = _trained_indefinite()
    kw = dict(num_classes=3, weight_decay=0.0)
    cfg = InfluenceConfig(curvature="hessian", damping=1e-6, max_steps=500)
    with pytest.raises(NumericalError, match="not replaced silently") as e:
        influence.category_influence(loss_fn, params, x, y, x, y, config=cfg, **kw)
    est = float(re.search(r"eigenvalue of about (\S+) ", str(e.value)).group(1))
    # a Ritz value: never below the true smallest eigenvalue (of H + δI), and close to it here
    assert lam_min + 1e-6 - 1e-9 <= est <= 0.5 * (lam_min + 1e-6), (est, lam_min)
    need = float(re.search(r"set damping above (\S+) ", str(e.value)).group(1))
    assert need > -lam_min * 0.5
    # the fix works: that damping, doubled, is accepted as it is, with no escalation
    ok = influence.category_influence(loss_fn, params, x, y, x, y, config=InfluenceConfig(
        curvature="hessian", damping=2 * need, max_steps=500), **kw)
    assert ok.escalations == () and ok.damping == 2 * need and bool(np.all(ok.converged))


def test_escalation_is_warned_and_refused_when_not_allowed(x64):
    apply, params, loss_fn, x, y, _ = _trained_indefinite()
    kw = dict(num_classes=3, weight_decay=0.0)
    # damping "auto" may be raised: with a warning that says from what to what
    with pytest.warns(DampingWarning, match="damping raised from"):
        r = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
            config=InfluenceConfig(curvature="hessian", max_steps=500))
    assert len(r.escalations) >= 1 and r.damping > r.escalations[0]["damping"]
    # an explicit damping with escalation allowed: raised, warned
    with pytest.warns(DampingWarning):
        r2 = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
            config=InfluenceConfig(curvature="hessian", damping=0.0, escalate_damping=True))
    assert r2.damping > 0 and r2.escalations[0]["damping"] == 0.0
    # escalation refused even for the automatic damping
    with pytest.raises(NumericalError, match="negative curvature at the automatic damping"):
        influence.category_influence(loss_fn, params, x, y, x, y, **kw,
            config=InfluenceConfig(curvature="hessian", escalate_damping=False))
    # Gauss-Newton (positive semi-definite) never needs it: no warning at a small damping
    with warnings.catch_warnings():
        warnings.simplefilter("error", DampingWarning)
        r3 = influence.category_influence(loss_fn, params, x, y, x, y, apply=apply, **kw,
            config=InfluenceConfig(curvature="gauss_newton", damping=1e-6))
    assert r3.escalations == () and r3.damping == 1e-6


def test_the_curvature_does_not_depend_on_how_the_loss_was_written(x64):
    """The same cross-entropy as a plain loss_fn with model=, with apply=, or as an OutputLoss:
    the same Gauss-Newton P (the issue measured 96 % apart); without any way to the logits, the
    Hessian, and the note says how to get Gauss-Newton."""
    x, y = tiny_classification(n=60, d=4, k=3, seed=3)
    m = models.make_model("mlp", (4,), 3, hidden=(6,), seed=0)
    apply, params = models.functional(m)
    plain = models.per_sample_loss(apply)
    params = train.train(plain, params, x, y, train.TrainConfig(epochs=20, batch_size=20,
        learning_rate=0.05, weight_decay=1e-3)).params
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    kw = dict(num_classes=3, weight_decay=1e-3,
        config=InfluenceConfig(damping=1e-4, rtol=1e-10))

    def hand_ce(p, xi, yi):  # written by hand, so nothing marks it as cross-entropy
        z = apply(p, xi[None])[0]
        return jax.nn.logsumexp(z) - z[yi]

    out_loss = models.OutputLoss(apply, lambda z, yi: jax.nn.logsumexp(z) - z[yi])
    with_model = influence.category_influence(hand_ce, params, x, y, x, y, model=m, **kw)
    with_apply = influence.category_influence(hand_ce, params, x, y, x, y, apply=apply, **kw)
    split = influence.category_influence(out_loss, params, x, y, x, y, **kw)
    with pytest.raises(NumericalError, match="apply=, model= or a models.OutputLoss"):
        influence.category_influence(hand_ce, params, x, y, x, y, **kw)  # Hessian, indefinite
    esc = dict(kw, config=InfluenceConfig(damping=1e-4, rtol=1e-10, escalate_damping=True))
    with pytest.warns(DampingWarning):
        blind = influence.category_influence(hand_ce, params, x, y, x, y, **esc)
    assert {with_model.curvature, with_apply.curvature, split.curvature} == {"gauss_newton"}
    scale = np.abs(split.P).max()
    for r in (with_model, with_apply):
        np.testing.assert_allclose(r.P, split.P, atol=1e-7 * scale)
        assert "Gauss-Newton" in r.details["curvature_note"]
    assert blind.curvature == "hessian" and "apply= or model=" in blind.details["curvature_note"]
    # and the Gauss-Newton P is the dense Σ Jᵀ H_out J solve (independent reference)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    J = jax.vmap(lambda xi: jax.jacrev(lambda t: apply(unravel(t), xi[None])[0])(flat))(
        jnp.asarray(x))
    pr = jax.nn.softmax(apply(params, jnp.asarray(x)))
    Hout = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(pr)
    G = jnp.einsum("nkp,nkl,nlq->pq", J, Hout, J) / len(y) + (1e-3 + 1e-4) * jnp.eye(flat.size)
    g = jax.vmap(lambda xi, yi: jax.grad(lambda t: hand_ce(unravel(t), xi, yi))(flat))(
        jnp.asarray(x), jnp.asarray(y))
    gk = jnp.stack([g[y == k].mean(0) for k in range(3)])
    ref = g @ jnp.linalg.solve(G, gk.T) / len(y)
    np.testing.assert_allclose(split.P, ref, atol=1e-6 * np.abs(ref).max())


def test_num_classes_must_match_the_logits():
    x, y = tiny_classification(n=30, d=4, k=3, dtype=np.float32)
    apply, params = models.functional(models.make_model("linear", (4,), 3))
    loss_fn = models.per_sample_loss(apply)
    for K in (2, 8):  # fewer: a logit silently dropped; more: factors built for the wrong width
        with pytest.raises(InputError, match="pass num_classes=3"):
            influence.category_influence(loss_fn, params, x, y % K, x, y % K, num_classes=K,
                weight_decay=1e-3, apply=apply)


def test_one_hot_and_multi_hot_labels_are_refused_with_a_fix_that_loses_nothing():
    x, _ = tiny_classification(n=30, d=4, k=3, dtype=np.float32)
    apply, params = models.functional(models.make_model("linear", (4,), 3))
    one_hot = np.eye(3, dtype=np.int32)[np.arange(30) % 3]
    multi = one_hot.copy()
    multi[0, 1] = multi[0, 2] = 1
    args = dict(num_classes=3, weight_decay=1e-3, apply=apply)
    with pytest.raises(InputError, match=r"one-hot .*argmax"):
        influence.category_influence(models.per_sample_loss(apply), params, x, one_hot, x,
            one_hot, **args)
    with pytest.raises(InputError, match="multi-hot.*not supported.*per label") as e:
        influence.category_influence(models.per_sample_loss(apply), params, x, multi, x, multi,
            **args)
    assert "argmax" not in str(e.value)


def test_the_default_tolerance_is_one_float32_reaches():
    """float32 at the default rtol: every class converged (the old 1e-6 was not reached here),
    and the answer agrees with a float64 solve to float32's precision."""
    assert linsolve.resolve_rtol("auto", jnp.float64) == 1e-6
    assert linsolve.resolve_rtol("auto", jnp.float32) == pytest.approx(1000 * 2.0**-23)
    assert linsolve.resolve_rtol(1e-3, jnp.float32) == 1e-3
    x, y = tiny_classification(n=200, d=8, k=4, seed=5, dtype=np.float32)
    apply, params = models.functional(models.make_model("mlp", (8,), 4, hidden=(16,), seed=1))
    loss_fn = models.per_sample_loss(apply)
    params = train.train(loss_fn, params, x, y, train.TrainConfig(epochs=40, batch_size=50,
        learning_rate=0.05, weight_decay=1e-4)).params
    kw = dict(num_classes=4, weight_decay=1e-4, apply=apply)
    r32 = influence.category_influence(loss_fn, params, x, y, x, y, **kw,
        config=InfluenceConfig(damping=1e-5))
    assert bool(np.all(r32.converged)) and np.max(r32.residual) <= 1.2e-4
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        r64 = influence.category_influence(loss_fn, p64, x.astype(np.float64), y,
            x.astype(np.float64), y, **kw, config=InfluenceConfig(damping=1e-5, rtol=1e-12))
    err = np.abs(np.asarray(r32.P, np.float64) - r64.P).max() / np.abs(r64.P).max()
    assert err < 1e-2, err


def test_a_params_subset_is_answered_by_cg_and_refused_by_kfac_with_the_fix():
    """Influence over the head alone by a loss over that subset of the params: CG answers
    (Gauss-Newton through the OutputLoss); K-FAC / EK-FAC need the model's whole params, so they
    refuse, naming select= (instead of the KeyError they used to raise)."""
    x, y = tiny_classification(n=60, d=4, k=3, seed=2, dtype=np.float32)
    m = models.make_model("mlp", (4,), 3, hidden=(5,), seed=0)
    apply, params = models.functional(m)
    head = {"head": params["head"]}
    loss = models.OutputLoss(lambda sub, xb: apply({**params, **sub}, xb),
        lambda z, yi: jax.nn.logsumexp(z) - z[yi])
    kw = dict(num_classes=3, weight_decay=1e-3, model=m)
    r = influence.category_influence(loss, head, x, y, x, y, **kw)
    assert r.P.shape == (60, 3) and r.curvature == "gauss_newton"
    for solver in ("kfac", "ekfac"):
        with pytest.raises(InputError, match="subset of its parameters") as e:
            influence.category_influence(loss, head, x, y, x, y, **kw,
                config=InfluenceConfig(solver=solver))
        assert "select=" in str(e.value)
