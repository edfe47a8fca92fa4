import dataclasses

import numpy as np
import pytest

from pareto_jax import data, evaluation, influence, models, pareto, search, train
from pareto_jax.checks import InputError


@pytest.fixture(scope="module")
def digits_problem():
    s = data.stratified_split(data.load_digits(), seed=0)
    noisy, _ = data.inject_label_noise(s.train, (3, 8), 0.4, seed=0)
    apply, params = models.functional(models.make_model("linear", (64,), 10))
    loss_fn = models.per_sample_loss(apply)
    cfg = train.TrainConfig(epochs=15, batch_size=128, learning_rate=0.01, weight_decay=1e-3)
    st = train.train(loss_fn, params, noisy.x, noisy.y, cfg).state
    prob = search.SearchProblem(
        loss_fn, apply, st, cfg, noisy.x, noisy.y, s.val.x, s.val.y, s.test.x, s.test.y, 10
    )
    P = influence.linear_category_influence(
        st.params, noisy.x, noisy.y, s.val.x, s.val.y, num_classes=10, weight_decay=1e-3
    ).P
    return prob, np.asarray(P)


def test_fitness_definition():
    assert evaluation.fitness([1.0, -2.0, 0.0, -4.0], [0]) == (pytest.approx(-2.0), 1.0)
    assert evaluation.fitness([1.0, 2.0, 0.0], [0])[0] == 0.0
    assert evaluation.fitness([0.0, 2.0, 3.0], [0])[0] == float("-inf")  # target did not improve
    assert evaluation.fitness([1.0, 2.0], [0, 1])[0] == 0.0  # no non-target classes
    np.testing.assert_allclose(evaluation.relative_change([0.5, 0.0], [0.25, 0.0]), [100.0, 0.0])


def test_batched_and_sequential_generations_agree(digits_problem):
    """The fused generation (one jitted call), the two-call batched one and the sequential one
    evaluate the same candidates with the same fitness. (One generation: a second one only
    recompiles every path for its smaller count of new candidates; the generations' evolution is
    host code that the three paths share.)"""
    prob, P = digits_problem
    cfg = search.SearchConfig(population=6, generations=1, seed=3)
    a = search.run_search(prob, P, [3, 8], config=cfg)
    b = search.run_search(prob, P, [3, 8], config=dataclasses.replace(cfg, batched=False))
    c = search.run_search(prob, P, [3, 8], config=dataclasses.replace(cfg, fused=False))
    fa = [(c.genome.tolist(), c.fitness) for c in a.evaluations]
    for other in (b, c):
        fb = [(c.genome.tolist(), c.fitness) for c in other.evaluations]
        assert len(fa) == len(fb)
        for (ga, xa), (gb, xb) in zip(fa, fb):
            assert ga == gb
            assert xa == pytest.approx(xb, abs=1e-9) or (xa == xb == float("-inf"))
        np.testing.assert_allclose(a.val_acc, other.val_acc)


def test_fused_generation_is_one_call_with_the_two_call_answers(digits_problem):
    """`Population.generation` (programs, epochs, counts in one jitted call) gives the weights
    and validation accuracies of `solve` + `train_many` + `accuracies`; the fused path is the
    one a default batched search takes."""
    prob, P = digits_problem
    cfg = search.SearchConfig(population=5, seed=1)
    ev = evaluation.Evaluator(prob)
    pop = search.Population(
        ev,
        P,
        [3, 8],
        ev.accuracies(__import__("jax").tree_util.tree_map(lambda a: a[None], prob.state.params))[
            0
        ],
        cfg,
    )
    assert pop.fused
    genomes = np.random.default_rng(0).uniform(0.6, 1.0, (5, 10 + search.Genome(cfg).n_extra))
    sols, acc = pop.generation(genomes)
    assert len(ev._gen) == 1  # the jitted generation ran
    ref = pop.solve(genomes)
    for s, r in zip(sols, ref):
        assert s.status == r.status
        if r.w is not None:
            np.testing.assert_allclose(s.w, r.w, atol=1e-12)
    W = np.stack([r.w if r.w is not None else np.ones(P.shape[0]) for r in ref])
    params, _ = ev.train_many(W, True)
    np.testing.assert_allclose(acc, ev.accuracies(params, "val", True))


# (the suite's time budget; test_reliability checks bitwise determinism by default)
@pytest.mark.slow
def test_search_is_deterministic_and_reports_consistently(digits_problem):
    prob, P = digits_problem
    cfg = search.SearchConfig(population=6, generations=3, seed=1)
    a = search.run_search(prob, P, [3, 8], config=cfg)
    b = search.run_search(prob, P, [3, 8], config=cfg)
    assert [c.fitness for c in a.evaluations] == [c.fitness for c in b.evaluations]
    np.testing.assert_array_equal(a.weights, b.weights)
    assert len(a.history) == 3
    # the reported best is the best evaluated candidate, and its Δ is recomputed from scratch
    assert a.best.fitness == max(c.fitness for c in a.evaluations)
    np.testing.assert_allclose(a.delta_val, a.best.delta_val)
    # "found" means exactly that every target improved on validation
    assert a.found == bool(np.all(a.delta_val[[3, 8]] > 0))


def test_crossover_mixes_both_parents():
    rng = np.random.default_rng(0)
    a, b = np.zeros(40), np.ones(40)
    kids = np.stack([search.crossover(a, b, rng, 1.0) for _ in range(20)])
    # each gene from either parent with probability 1/2: 800 draws, mean 0.5 ± 0.018 (1 sd)
    assert 0.42 < kids.mean() < 0.58
    assert np.all((kids.sum(1) > 0) & (kids.sum(1) < 40))  # every child has genes of both
    np.testing.assert_array_equal(search.crossover(a, b, rng, 0.0), a)


@pytest.mark.slow  # (the suite's time budget; the planted-fault check still runs it)
def test_search_resumes_from_its_checkpoint(digits_problem, tmp_path):
    """Killed after generation 1, the search must start again at generation 2 (not at 0) and
    end where an uninterrupted run ends."""
    prob, P = digits_problem
    cfg = search.SearchConfig(population=4, generations=4, seed=2)
    full = search.run_search(prob, P, [3, 8], config=cfg)
    ckpt = tmp_path / "state.json"

    class Killed(Exception):
        pass

    def kill_after_1(g, state):
        if g == 1:
            raise Killed

    with pytest.raises(Killed):
        search.run_search(
            prob, P, [3, 8], config=cfg, checkpoint=str(ckpt), on_generation=kill_after_1
        )
    seen = []
    resumed = search.run_search(
        prob, P, [3, 8], config=cfg, checkpoint=str(ckpt), on_generation=lambda g, s: seen.append(g)
    )
    assert seen == [2]  # generation 3 is the last (no callback); 0 and 1 were not redone
    assert [h["generation"] for h in resumed.history] == [0, 1, 2, 3]
    assert [c.fitness for c in resumed.evaluations] == [c.fitness for c in full.evaluations]
    np.testing.assert_array_equal(resumed.weights, full.weights)


@pytest.mark.slow  # (the suite's time budget)
def test_all_minus_infinity_population_is_handled(digits_problem):
    prob, P = digits_problem
    ev_acc = train.evaluate(prob.apply, prob.state.params, prob.x_val, prob.y_val, 10).accuracy
    perfect = int(np.argmax(ev_acc))
    assert ev_acc[perfect] == 1.0  # a class at 100%: it cannot improve
    res = search.run_search(
        prob, P, [perfect], config=search.SearchConfig(population=4, generations=2)
    )
    assert not res.found and res.best.fitness == float("-inf")
    assert all(h["n_finite"] == 0 for h in res.history)


def test_course_correction_needs_reference(digits_problem):
    prob, P = digits_problem
    with pytest.raises(InputError, match="ref_params"):
        search.run_search(prob, P, [3], mode="course_correction")


def test_baselines(digits_problem):
    prob, P = digits_problem
    b = evaluation.baseline_weights(P, prob.y_train, [3, 8], 10)
    assert set(b) == {"unweighted", "class_balanced", "trim_negative", "topk_upweight",
        "fixed_alpha_lp"}
    assert np.all(b["unweighted"] == 1)
    assert b["class_balanced"].mean() == pytest.approx(1.0)
    counts = np.bincount(prob.y_train, minlength=10)
    np.testing.assert_allclose(
        b["class_balanced"] * counts[prob.y_train], b["class_balanced"][0] * counts[prob.y_train[0]]
    )
    np.testing.assert_array_equal(b["trim_negative"] == 0, P.sum(1) < 0)
    assert (b["topk_upweight"] == 2.0).sum() == round(0.1 * len(P))
    res = evaluation.evaluate_weightings(prob, {"unweighted": b["unweighted"]}, prob.state.params)
    # the unweighted epoch from θ^e is exactly ordinary training's next epoch
    nxt = train.train_one_epoch_from(
        prob.loss_fn, prob.state, prob.x_train, prob.y_train, np.ones(len(P)), prob.train_config
    )
    acc = train.evaluate(prob.apply, nxt.params, prob.x_val, prob.y_val, 10).accuracy
    np.testing.assert_allclose(res["unweighted"]["val_acc"], acc, atol=1e-6)


def test_frontier_against_highs():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 1))
    P = (f * np.array([1.0, -1.0, 0.5]) + rng.normal(size=(300, 3)) + 0.1) * 1e-3
    fr = pareto.pareto_frontier(P, rho=0.3, n_random=3)
    assert fr.gains.shape == (6, 3)
    assert np.all(fr.gains >= -1e-12)  # no class predicted worse anywhere on the frontier
    assert np.all(np.abs(fr.weights - 1) <= 0.3 + 1e-12)
    for k in range(3):  # the ceiling of class k is the optimum of its own LP (checked by HiGHS)
        ref = pareto.solve_reweighting(P, [k], 1.0, rho=0.3, w_max=1.3, solver="highs")
        assert fr.ceiling[k] == pytest.approx(ref.objective - P[:, k].sum(), rel=1e-7)
        assert fr.ceiling[k] >= fr.gains[:, k].max() - 1e-12


def test_harm_matched_baselines_follow_the_search_rule(digits_problem):
    """Each matched baseline is the step t whose retrained w_t ranks best by the search's own
    (fitness, tie-break) on validation; checked by retraining every step on its own (a loop over
    single epochs and single accuracy evaluations, not the batched path)."""
    prob, P = digits_problem
    bw = evaluation.baseline_weights(P, prob.y_train, [3, 8], 10)
    bw = {k: bw[k] for k in ("unweighted", "trim_negative", "class_balanced")}
    steps = (1.0, 0.5, 0.2)
    got = evaluation.harm_matched_baselines(prob, bw, prob.state.params, [3, 8], steps=steps)
    assert set(got) == {"trim_negative", "class_balanced"}  # w = 1 has nothing to scale
    ev = evaluation.Evaluator(prob)
    ref = ev.acc(prob.state.params, ev.xv, ev.yv)
    for name, r in got.items():
        scores = []
        for t in steps:
            p, _ = ev.train_one(1.0 + t * (bw[name] - 1.0))
            f, tb = evaluation.fitness(
                evaluation.relative_change(ev.acc(p, ev.xv, ev.yv), ref), [3, 8]
            )
            scores.append(((f, tb if np.isfinite(tb) else float("-inf")), t, p))
        best = max(scores, key=lambda s: s[0])
        assert r["t"] == best[1] and r["fitness"] == best[0][0]
        np.testing.assert_allclose(r["test_acc"], ev.acc(best[2], ev.xt, ev.yt))
    with pytest.raises(InputError, match="steps"):
        evaluation.harm_matched_baselines(prob, bw, prob.state.params, [3, 8], steps=(0.0,))


@pytest.mark.slow  # (the suite's time budget)
def test_others_weight_gene(digits_problem):
    """The extra objective gene: β = 0 is the method's program exactly; with the gene searched,
    the batched and sequential generations still agree, and the winner's weights are those of
    the program its genome describes (re-solved by HiGHS, independently)."""
    prob, P = digits_problem
    zero = search.SearchConfig(others_weight=(0.0, 0.0))
    g = np.r_[np.full(10, 0.97), 0.5, 0.3]
    a, rcfg, beta = search.Genome(zero).program_of(g, [3, 8], 10)
    assert beta.tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    w0 = pareto.solve_reweighting(P, None, a, rcfg, class_weights=beta).w
    np.testing.assert_array_equal(w0, pareto.solve_reweighting(P, [3, 8], a, rcfg).w)

    cfg = search.SearchConfig(population=6, generations=2, seed=5, others_weight=(0.0, 1.0),
        reweight=pareto.ReweightConfig(w_max=1.0))
    r1 = search.run_search(prob, P, [3, 8], config=cfg)
    r2 = search.run_search(prob, P, [3, 8], config=dataclasses.replace(cfg, batched=False))
    assert [c.genome.tolist() for c in r1.evaluations] == [
        c.genome.tolist() for c in r2.evaluations
    ]
    for x, y in zip(r1.evaluations, r2.evaluations):
        assert x.fitness == pytest.approx(y.fitness, abs=1e-9) or x.fitness == y.fitness == float(
            "-inf"
        )
    assert r1.best.genome.shape == (12,)
    a, rcfg, beta = search.Genome(cfg).program_of(r1.best.genome, [3, 8], 10)
    assert 0 <= beta.min() <= 1 and beta[3] == beta[8] == 1
    if r1.weights is not None:
        ref = pareto.solve_reweighting(
            P, None, a, dataclasses.replace(rcfg, solver="highs"), class_weights=beta
        )
        c = P @ beta
        assert c @ r1.weights == pytest.approx(c @ ref.w, rel=1e-9)
