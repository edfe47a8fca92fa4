"""The unrolled estimator (`influence.unrolled_influence`) against independent references: central
finite differences of the actual retraining (`train.train`, the experiments' epochs) in random
weight directions, the implicit-function influence (closed form) as full-batch gradient descent
from the optimum runs longer, and its two executions and the mesh against each other."""

import dataclasses

import jax
import numpy as np
import pytest
from _problems import class_val_loss, digits_linear, to64

from pareto_jax import NumericalError, data, distributed, influence, models, train


@pytest.fixture(scope="module")
def mlp_checkpoint():
    """A small tanh MLP trained 3 epochs of Adam on 240 digits (float64), with its optimizer
    state: a confident, non-symmetric point (not an initialisation)."""
    with jax.enable_x64(True):
        s = data.stratified_split(data.load_digits(), seed=0)
        tr = s.train.subset(np.arange(240))
        m = models.make_model("mlp", (64,), 10, seed=3, hidden=(12,))
        apply, params = models.functional(m)
        loss = models.per_sample_loss(apply)
        tc = train.TrainConfig(
            epochs=3, batch_size=32, learning_rate=0.02, weight_decay=1e-3, seed=4
        )
        x = tr.x.astype(np.float64)
        state = train.train(loss, to64(params), x, tr.y, tc).state
        return s, tr, x, loss, tc, state


def _actual_class_losses(loss, tc, state, x, y, w, xv, yv, epochs):
    """Per-class validation loss after the actual retraining (`train.train` from `state`)."""
    p = train.train(loss, None, x, y, tc, weights=w, state=state, epochs=epochs).params
    return class_val_loss(loss, p, xv, yv, 10)


@pytest.mark.parametrize("execution", ["stepped", "compiled"])
def test_unroll_equals_finite_differences_of_the_actual_retraining(x64, mlp_checkpoint, execution):
    """Two weighted Adam epochs with minibatches (8 steps an epoch) and the Σw normaliser: the
    predicted change −P_unrollᵀ v·ε equals the central difference of the actual retraining's
    per-class validation loss, in random directions v, to 1e-5 relative."""
    s, tr, x, loss, tc, state = mlp_checkpoint
    r = influence.Retraining(loss, tc, state, epochs=2)
    res = influence.unrolled_influence(
        r, x, tr.y, s.val.x.astype(np.float64), s.val.y, num_classes=10, execution=execution
    )
    assert res.solver == res.method == "unroll" and res.details["optimizer_steps"] == 16
    P = np.asarray(res.P)
    base = _actual_class_losses(loss, tc, state, x, tr.y, np.ones(len(tr)), s.val.x, s.val.y, 2)
    np.testing.assert_allclose(res.details["class_losses_after"], base, rtol=1e-10)
    rng = np.random.default_rng(0)
    eps = 1e-5
    for _ in range(3):
        v = rng.normal(size=len(tr)) * (rng.random(len(tr)) < 0.3)
        up = _actual_class_losses(loss, tc, state, x, tr.y, 1 + eps * v, s.val.x, s.val.y, 2)
        dn = _actual_class_losses(loss, tc, state, x, tr.y, 1 - eps * v, s.val.x, s.val.y, 2)
        fd = (up - dn) / (2 * eps)
        pred = -(v @ P)  # ∂L_k/∂ε along v = −Σ_i v_i P[i, k]
        np.testing.assert_allclose(pred, fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())


def test_stepped_and_compiled_agree_and_the_prediction_keeps_the_sign_convention(
    x64, mlp_checkpoint
):
    s, tr, x, loss, tc, state = mlp_checkpoint
    r = influence.Retraining(loss, tc, state, epochs=1)
    a = influence.unrolled_influence(
        r, x, tr.y, s.val.x, s.val.y, num_classes=10, execution="stepped"
    )
    b = influence.unrolled_influence(
        r, x, tr.y, s.val.x, s.val.y, num_classes=10, execution="compiled"
    )
    np.testing.assert_allclose(np.asarray(a.P), np.asarray(b.P), rtol=1e-9, atol=1e-14)
    # predict_class_loss_change applies unchanged: ΔL ≈ −Pᵀ(w − 1) for a small up-weighting
    w = np.ones(len(tr))
    w[:20] = 1.01
    pred = influence.predict_class_loss_change(a, w)
    act = _actual_class_losses(
        loss, tc, state, x, tr.y, w, s.val.x, s.val.y, 1
    ) - _actual_class_losses(loss, tc, state, x, tr.y, np.ones(len(tr)), s.val.x, s.val.y, 1)
    np.testing.assert_allclose(pred, act, rtol=2e-3, atol=2e-3 * np.abs(act).max())


def test_unroll_tends_to_the_implicit_function_influence_as_gradient_descent_runs_longer(x64):
    """Softmax regression at its optimum θ*, then T steps of full-batch gradient descent on the
    fixed-N weighted objective: J_T = −η Σ_{s<T} g_kᵀ(I − ηH)^s ∂_w∇L → −P (closed form) as T
    grows, at the rate (1 − ηλ_min)^T."""
    s, apply, loss_fn, params = digits_linear(weight_decay=0.1)
    tr = s.train
    P = np.asarray(
        influence.linear_category_influence(
            params, tr.x, tr.y, s.val.x, s.val.y, num_classes=10, weight_decay=0.1
        ).P
    )
    tc = train.TrainConfig(optimizer="gd", learning_rate=1.0, batch_size=None, weight_decay=0.1,
        normalizer="n", epochs=1)
    errs = []
    for T in (20, 80, 320):
        state = train.init_state(params, dataclasses.replace(tc))
        r = influence.Retraining(loss_fn, tc, state, epochs=T)
        got = np.asarray(
            influence.unrolled_influence(
                r, tr.x, tr.y, s.val.x, s.val.y, num_classes=10, execution="compiled"
            ).P
        )
        errs.append(np.linalg.norm(got - P) / np.linalg.norm(P))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs


def test_unroll_on_a_mesh_matches_one_device(x64, mlp_checkpoint):
    s, tr, x, loss, tc, state = mlp_checkpoint
    tc_full = dataclasses.replace(tc, batch_size=None)  # full batch: the mesh's epoch is the same
    r = influence.Retraining(loss, tc_full, state, epochs=2)
    one = influence.unrolled_influence(
        r, x, tr.y, s.val.x, s.val.y, num_classes=10, execution="compiled"
    )
    mesh = influence.unrolled_influence(
        r, x, tr.y, s.val.x, s.val.y, num_classes=10, mesh=distributed.make_mesh(1)
    )
    np.testing.assert_allclose(np.asarray(mesh.P), np.asarray(one.P), rtol=1e-8,
        atol=1e-12 * np.abs(np.asarray(one.P)).max())


def test_unroll_refuses_bad_input(mlp_checkpoint):
    from pareto_jax.checks import InputError

    s, tr, x, loss, tc, state = mlp_checkpoint
    with pytest.raises(InputError, match="retraining"):
        influence.unrolled_influence("epochs", x, tr.y, s.val.x, s.val.y, num_classes=10)
    with pytest.raises(InputError, match="epochs"):
        influence.Retraining(loss, tc, state, epochs=0)
    with pytest.raises(InputError, match="state"):
        influence.Retraining(loss, tc, state.params)
    with pytest.raises(InputError, match="y_val"):
        influence.unrolled_influence(influence.Retraining(loss, tc, state), x, tr.y, s.val.x,
            np.zeros_like(s.val.y), num_classes=10)


def test_unroll_through_adam_with_a_parameter_that_never_moves(x64):
    """A linear model from a zero start on digits: the weights on always-blank pixels have a zero
    gradient at every Adam step, where √ν has an infinite derivative (every row of P was NaN
    before `train.ADAM_EPS_ROOT`). P is finite and equals the actual retraining's central
    difference."""
    s = data.stratified_split(data.load_digits(), seed=0)
    tr = s.train.subset(np.arange(200))
    x = tr.x.astype(np.float64)
    assert np.any(np.all(x == 0, axis=0))  # blank pixels
    apply, params = models.functional(models.make_model("linear", (64,), 10))
    assert all(np.all(np.asarray(p) == 0) for p in jax.tree_util.tree_leaves(params))
    loss = models.per_sample_loss(apply)
    tc = train.TrainConfig(epochs=2, batch_size=50, learning_rate=0.01, weight_decay=1e-3)
    state = train.train(loss, to64(params), x, tr.y, tc).state
    res = influence.unrolled_influence(influence.Retraining(loss, tc, state, epochs=1), x, tr.y,
        s.val.x.astype(np.float64), s.val.y, num_classes=10)
    P = np.asarray(res.P)
    assert np.all(np.isfinite(P)) and np.abs(P).max() > 0
    v = np.random.default_rng(1).normal(size=len(tr))
    eps = 1e-5
    up = _actual_class_losses(loss, tc, state, x, tr.y, 1 + eps * v, s.val.x, s.val.y, 1)
    dn = _actual_class_losses(loss, tc, state, x, tr.y, 1 - eps * v, s.val.x, s.val.y, 1)
    fd = (np.asarray(up) - np.asarray(dn)) / (2 * eps)
    np.testing.assert_allclose(-P.T @ v, fd, rtol=1e-5, atol=1e-9 * np.abs(fd).max())


def test_unroll_recomputes_in_float64_when_float32_overflows():
    """The same blank-pixel case in float32 with many steps: along weights the data never move,
    Adam's step has slope ≈ lr·(1 − β₁)·λ/ε per step (here ≈ 100), so the backward pass overflows
    float32 while the float64 pass is finite. "native" refuses with the fix, "auto" warns and
    recomputes in float64 (recorded), and its P equals the central difference of the actual
    retraining (in float64)."""
    s = data.stratified_split(data.load_digits(), seed=0)
    tr = s.train.subset(np.arange(200))
    blank = np.all(tr.x == 0, axis=0)
    assert np.any(s.val.x[:, blank] != 0)  # the validation loss reaches the never-moved weights
    apply, params = models.functional(models.make_model("linear", (64,), 10))
    loss = models.per_sample_loss(apply)
    tc = train.TrainConfig(epochs=2, batch_size=10, learning_rate=0.01, weight_decay=1e-3)
    state = train.train(loss, params, tr.x, tr.y, tc).state
    args = (tr.x, tr.y, s.val.x, s.val.y)
    with pytest.raises(NumericalError, match="precision='float64'"):
        influence.unrolled_influence(influence.Retraining(loss, tc, state, epochs=2,
            precision="native"), *args, num_classes=10)
    with pytest.warns(influence.PrecisionWarning, match="float64"):
        res = influence.unrolled_influence(influence.Retraining(loss, tc, state, epochs=2), *args,
            num_classes=10)
    assert res.details["precision"] == "float64 (float32 overflowed)"
    P = np.asarray(res.P, np.float64)
    assert res.P.dtype == np.float32 and np.all(np.isfinite(P)) and np.abs(P).max() > 0
    v = np.random.default_rng(2).normal(size=len(tr))
    eps = 1e-5
    with jax.enable_x64(True):
        st64 = train.TrainState(to64(state.params), to64(state.opt_state), state.epoch)
        x = tr.x.astype(np.float64)
        up = _actual_class_losses(loss, tc, st64, x, tr.y, 1 + eps * v, s.val.x, s.val.y, 2)
        dn = _actual_class_losses(loss, tc, st64, x, tr.y, 1 - eps * v, s.val.x, s.val.y, 2)
    fd = (np.asarray(up) - np.asarray(dn)) / (2 * eps)
    np.testing.assert_allclose(-P.T @ v, fd, rtol=1e-4, atol=1e-6 * np.abs(fd).max())
