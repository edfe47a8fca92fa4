"""The program that re-linearises (`pareto_jax.rounds`): every accepted step ranks higher on
validation than the one before, the weights respect the trust region and w_max, and the reported
model is the actual retraining with the reported weights (an independent `train.train`)."""

import numpy as np
import pytest

from pareto_jax import data, evaluation, models, rounds, train
from pareto_jax.config import ReweightConfig, RoundsConfig


@pytest.fixture(scope="module")
def mlp_problem():
    s = data.stratified_split(data.load_digits(), seed=0)
    tr = s.train.subset(np.arange(400))
    m = models.make_model("mlp", (64,), 10, seed=0, hidden=(16,))
    apply, params = models.functional(m)
    loss = models.per_sample_loss(apply)
    tc = train.TrainConfig(epochs=4, batch_size=50, learning_rate=0.01, weight_decay=1e-3)
    state = train.train(loss, params, tr.x, tr.y, tc).state
    prob = evaluation.SearchProblem(
        loss, apply, state, tc, tr.x, tr.y, s.val.x, s.val.y, s.test.x, s.test.y, 10
    )
    acc = train.evaluate(apply, state.params, s.val.x, s.val.y, 10).accuracy
    return prob, tuple(int(t) for t in np.argsort(acc, kind="stable")[:2])


def test_rounds_accept_only_improvements_and_report_the_actual_retraining(mlp_problem):
    prob, targets = mlp_problem
    cfg = RoundsConfig(rounds=3, rho=0.4, reweight=ReweightConfig(w_max=1.0))
    r = rounds.run_rounds(prob, targets, config=cfg)
    assert r.history and r.stop
    accepted = [h for h in r.history if h.get("accepted")]
    ranks = [(h["fitness"], h["tiebreak"]) for h in accepted]
    assert ranks == sorted(ranks)  # each accepted step ranks above the one before
    assert (
        r.weights.min() >= 0 and r.weights.max() <= 1.0 + 1e-12
    )  # w_max = 1: weights only go down
    for h in r.history:
        assert cfg.min_rho <= h["rho"] <= cfg.rho
    # the reported model is one weighted epoch from θ^e with the reported weights
    p = train.train(prob.loss_fn, None, prob.x_train, prob.y_train, prob.train_config,
        weights=r.weights, state=prob.state, epochs=1).params
    acc = train.evaluate(prob.apply, p, prob.x_val, prob.y_val, 10).accuracy
    np.testing.assert_allclose(acc, r.val_acc, atol=1e-12)
    f, _ = evaluation.fitness(evaluation.relative_change(acc, r.ref_val), targets)
    assert r.found == np.isfinite(f) and (f == r.fitness or not r.found)
    if not accepted:
        np.testing.assert_array_equal(r.weights, np.ones(len(r.weights)))
