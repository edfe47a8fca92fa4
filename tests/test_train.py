import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_classification

from pareto_jax import models, train
from pareto_jax.checks import InputError


def _linear(d, k, dtype=jnp.float64, seed=0):
    apply, params = models.functional(models.make_model("mlp", (d,), k, hidden=(4,), seed=seed))
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    return apply, params, models.per_sample_loss(apply)


def test_unit_weights_give_exactly_the_unweighted_loss(x64):
    x, y = tiny_classification()
    apply, params, loss_fn = _linear(5, 3)
    unweighted = np.mean(
        [float(loss_fn(params, x[i], y[i])) for i in range(len(y))]
    ) + 0.5 * 1e-2 * sum(float(jnp.vdot(p, p)) for p in jax.tree_util.tree_leaves(params))
    w = jnp.ones(len(y))
    for norm in ("weights", "n"):
        got = float(
            train.weighted_objective(loss_fn, params, x, y, w, weight_decay=1e-2, normalizer=norm)
        )
        assert got == pytest.approx(unweighted, rel=1e-12)


def test_weighted_objective_matches_python_loop(x64):
    x, y = tiny_classification()
    apply, params, loss_fn = _linear(5, 3)
    w = np.random.default_rng(1).uniform(0, 2, len(y))
    losses = np.array([float(loss_fn(params, x[i], y[i])) for i in range(len(y))])
    got = float(train.weighted_objective(loss_fn, params, x, y, w, weight_decay=0.0))
    assert got == pytest.approx((w * losses).sum() / w.sum(), rel=1e-12)


def test_zero_weight_equals_training_without_the_samples(x64):
    x, y = tiny_classification(n=60)
    apply, params, loss_fn = _linear(5, 3)
    cfg = train.TrainConfig(
        epochs=30, batch_size=None, optimizer="gd", learning_rate=0.5, weight_decay=1e-2
    )
    drop = np.array([3, 10, 11, 40])
    w = np.ones(len(y))
    w[drop] = 0.0
    keep = np.setdiff1d(np.arange(len(y)), drop)
    a = train.train(loss_fn, params, x, y, cfg, weights=w).params
    b = train.train(loss_fn, params, x[keep], y[keep], cfg).params
    c = train.train(loss_fn, params, x, y, cfg).params
    for pa, pb, pc in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b, c))):
        np.testing.assert_allclose(pa, pb, rtol=1e-10, atol=1e-12)
        assert not np.allclose(pa, pc, atol=1e-6)  # the removal mattered


def test_minibatch_weighted_training_matches_duplicated_data(x64):
    # integer weights == duplicated samples in expectation; full batch makes it exact
    x, y = tiny_classification(n=30)
    apply, params, loss_fn = _linear(5, 3)
    cfg = train.TrainConfig(
        epochs=20, batch_size=None, optimizer="gd", learning_rate=0.3, weight_decay=1e-3
    )
    w = np.ones(30)
    w[:5] = 2.0
    xd = np.concatenate([x, x[:5]])
    yd = np.concatenate([y, y[:5]])
    a = train.train(loss_fn, params, x, y, cfg, weights=w).params
    b = train.train(loss_fn, params, xd, yd, cfg).params
    for pa, pb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(pa, pb, rtol=1e-10, atol=1e-12)


def test_epoch_function_compiles_once():
    x, y = tiny_classification(n=50, dtype=np.float32)
    apply, params, loss_fn = _linear(5, 3, jnp.float32)
    traces = []

    def counting_loss(p, xi, yi):
        traces.append(1)
        return loss_fn(p, xi, yi)

    cfg = train.TrainConfig(epochs=3, batch_size=16)
    ep = train.make_epoch_fn(counting_loss, cfg, 50)
    r = train.train(counting_loss, params, x, y, cfg, epoch_fn=ep)
    n_after_first = len(traces)
    assert n_after_first > 0
    train.train(counting_loss, None, x, y, cfg, state=r.state, epochs=4, epoch_fn=ep,
        weights=np.linspace(0.1, 2, 50))
    assert len(traces) == n_after_first  # no retrace for more epochs, new weights, new state


def test_one_epoch_from_checkpoint_with_unit_weights_is_the_ordinary_next_epoch(tmp_path):
    x, y = tiny_classification(n=70, dtype=np.float32)
    apply, params, loss_fn = _linear(5, 3, jnp.float32)
    cfg = train.TrainConfig(epochs=5, batch_size=16, checkpoint_epochs=(3,))
    full = train.train(loss_fn, params, x, y, cfg, run_dir=tmp_path)
    assert 3 in full.checkpoints
    template = train.init_state(params, cfg)
    st3 = train.load_checkpoint(full.checkpoints[3], template)
    assert st3.epoch == 3
    st4 = train.train_one_epoch_from(loss_fn, st3, x, y, np.ones(70), cfg)
    st5 = train.train_one_epoch_from(loss_fn, st4, x, y, np.ones(70), cfg)
    for a, b in zip(jax.tree_util.tree_leaves(st5.params), jax.tree_util.tree_leaves(full.params)):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "checkpoints" / "epoch_0003.json").exists()


def test_training_is_seeded():
    x, y = tiny_classification(n=70, dtype=np.float32)
    apply, params, loss_fn = _linear(5, 3, jnp.float32)
    cfg = train.TrainConfig(epochs=3, batch_size=16, seed=1)
    a = train.train(loss_fn, params, x, y, cfg).params
    b = train.train(loss_fn, params, x, y, cfg).params
    c = train.train(loss_fn, params, x, y, dataclasses.replace(cfg, seed=2)).params
    la, lb, lc = (jax.tree_util.tree_leaves(t) for t in (a, b, c))
    assert all(np.array_equal(p, q) for p, q in zip(la, lb))
    assert not all(np.array_equal(p, q) for p, q in zip(la, lc))


def test_evaluate_matches_loop():
    x, y = tiny_classification(n=45, dtype=np.float32)
    apply, params, loss_fn = _linear(5, 3, jnp.float32, seed=2)
    m = train.evaluate(apply, params, x, y, 3, batch_size=16)
    logits = np.asarray(apply(params, x))
    pred = logits.argmax(1)
    for k in range(3):
        sel = y == k
        assert m.accuracy[k] == pytest.approx((pred[sel] == k).mean())
        lk = [float(loss_fn(params, x[i], y[i])) for i in np.flatnonzero(sel)]
        assert m.loss[k] == pytest.approx(np.mean(lk), rel=1e-5)
    assert m.counts.tolist() == [15, 15, 15]


@pytest.mark.parametrize(
    "kw, match",
    [(dict(weights=-np.ones(20)), "negative"), (dict(weights=np.ones(19)), "shape"),
        (dict(weights=np.zeros(20)), "summing to 0"), (dict(y=np.full(20, 7)), "label 7"),
        (dict(y=np.zeros(21, int)), "21 labels")],
)
def test_train_bad_input(kw, match):
    x, y = tiny_classification(n=20, dtype=np.float32)
    apply, params, loss_fn = _linear(5, 3, jnp.float32)
    args = dict(x=x, y=y)
    args.update({k: v for k, v in kw.items() if k in ("x", "y")})
    with pytest.raises(InputError, match=match):
        train.train(loss_fn, params, args["x"], args["y"], train.TrainConfig(epochs=1),
            num_classes=3, weights=kw.get("weights"))


@pytest.mark.parametrize(
    "kw, match",
    [(dict(epochs=-1), "epochs"), (dict(learning_rate=0.0), "learning_rate"),
        (dict(optimizer="rmsprop"), "optimizer"), (dict(batch_size=0), "batch_size"),
        (dict(normalizer="mean"), "normalizer"), (dict(weight_decay=float("nan")), "weight_decay")],
)
def test_train_config_validation(kw, match):
    with pytest.raises(InputError, match=match):
        train.TrainConfig(**kw)


def test_compiled_and_stepped_epochs_agree_and_population_matches_rows(x64):
    """The epoch as one compiled scan and as a host loop over the same jitted step give the same
    parameters; a population epoch equals one epoch per weighting."""
    from conftest import tiny_classification

    x, y = tiny_classification(n=70, d=16, k=3)
    apply, params = models.functional(
        models.make_model("cnn", (16,), 3, image_shape=(4, 4, 1), channels=(2,), dense=5, seed=3)
    )
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    lf = models.per_sample_loss(apply)
    cfg = train.TrainConfig(batch_size=16, learning_rate=0.01, weight_decay=1e-3)
    st = train.init_state(params, cfg)
    W = np.random.default_rng(0).uniform(0, 2, (3, 70))
    got = {}
    for ex in ("compiled", "stepped"):
        ep = train.make_epoch_fn(lf, cfg, 70, execution=ex)
        pop = train.make_epoch_fn(lf, cfg, 70, execution=ex, population=True)
        single = [ep(st.params, st.opt_state, x, y, jnp.asarray(w), 2)[0] for w in W]
        many = pop(train.broadcast_population(st.params, 3),
            train.broadcast_population(st.opt_state, 3), x, y, jnp.asarray(W), 2)[0]
        for i, p in enumerate(single):
            for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(many)):
                np.testing.assert_allclose(b[i], a, rtol=1e-10, atol=1e-13)
        got[ex] = single
    for a, b in zip(
        jax.tree_util.tree_leaves(got["compiled"]), jax.tree_util.tree_leaves(got["stepped"])
    ):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-13)
