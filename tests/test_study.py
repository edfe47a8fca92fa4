"""The improvement study (`pareto_jax.study`): its statistics against independent references,
the summary against numbers computed by hand, and a quick study run end to end."""

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from pareto_jax import reproduce, study


def _mcnemar_by_enumeration(m, r):
    """Two-sided exact McNemar by summing binomial(b + c, 1/2) probabilities no likelier than b."""
    b = sum(1 for x, y in zip(m, r) if x and not y)
    c = sum(1 for x, y in zip(m, r) if y and not x)
    n = b + c
    if n == 0:
        return b, c, 1.0
    pmf = [math.comb(n, i) / 2**n for i in range(n + 1)]
    p = sum(q for q in pmf if q <= pmf[b] * (1 + 1e-12))
    return b, c, min(1.0, p)


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    ref = rng.random(n) < 0.7
    flip = rng.random(n) < rng.uniform(0.02, 0.3)
    m = np.where(flip, rng.random(n) < 0.6, ref)  # paired: most samples agree
    got = study.mcnemar(m, ref)
    b, c, p = _mcnemar_by_enumeration(m.tolist(), ref.tolist())
    assert (got["gained"], got["lost"], got["net"]) == (b, c, b - c)
    assert got["p"] == pytest.approx(p, rel=1e-9)


def test_mcnemar_is_paired():
    # every answer swapped, same accuracy: 10 vs 10 discordant pairs, p = 1
    ref = np.array([True] * 10 + [False] * 10)
    assert study.mcnemar(~ref, ref) == {"gained": 10, "lost": 10, "net": 0, "p": 1.0}
    # 14 gained, 6 lost among 50 samples, 30 right in both: only the 20 discordant ones count
    r = np.array([True] * 6 + [False] * 14 + [True] * 30)
    m = np.array([False] * 6 + [True] * 14 + [True] * 30)
    got = study.mcnemar(m, r)
    assert (got["gained"], got["lost"]) == (14, 6)
    assert got["p"] == pytest.approx(scipy.stats.binomtest(14, 20).pvalue)


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_interval_is_the_t_interval(n):
    v = np.random.default_rng(n).normal(1.0, 2.0, n)
    lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=v.mean(), scale=scipy.stats.sem(v))
    iv = study.interval(v)
    assert iv["mean"] == pytest.approx(v.mean()) and iv["n"] == n
    assert iv["half_width"] == pytest.approx((hi - lo) / 2, rel=1e-10)
    assert study.interval([3.0])["half_width"] == 0.0


def _fake_run(seed, y, targets, rows):
    """One seed's report as `experiments.run_improve` writes it; rows: name -> (test_correct)."""
    K = 3
    counts = np.bincount(y, minlength=K)
    ref_ok = rows.pop("theta_e")
    ref_test = np.bincount(y[ref_ok], minlength=K) / counts
    block = {"targets": targets, "target_names": [str(t) for t in targets], "found": seed == 0,
        "ref_test": ref_test.tolist(), "rows": {}, "test_correct": {}}
    for name, ok in rows.items():
        acc = np.bincount(y[ok], minlength=K) / counts
        pts = 100 * (acc - ref_test)
        block["rows"][name] = {"target_test_points": pts[targets].tolist(),
            "worst_other_test_points": float(np.delete(pts, targets).min()),
            "test_acc": acc.tolist()}
        block["test_correct"][name] = "".join("1" if o else "0" for o in ok)
    return {"seed": seed, "y_test": y.tolist(), "direct": block}


def test_summary_equals_hand_computation():
    rng = np.random.default_rng(0)
    runs, hand = [], {"gain": [], "worst": [], "b": 0, "c": 0, "bo": 0, "co": 0, "b1": 0, "c1": 0}
    for seed, targets in ((0, [0]), (1, [2]), (2, [0])):
        y = rng.integers(0, 3, 60)
        base = rng.random(60) < 0.6
        extra = np.where(rng.random(60) < 0.2, ~base, base)
        srch = np.where(rng.random(60) < 0.2, ~extra, extra)
        rows = {"theta_e": base, "unweighted": extra, study.SEARCH_ROW: srch,
            "topk_upweight, val-matched": extra.copy()}
        if seed == 1:  # a baseline whose program failed in one seed
            rows["fixed_alpha_lp, val-matched"] = np.ones(60, bool)
        runs.append(_fake_run(seed, y, targets, rows))
        cnt = np.bincount(y, minlength=3)
        pts = [100 * (np.sum(srch & (y == k)) - np.sum(base & (y == k))) / cnt[k] for k in range(3)]
        hand["gain"].append(np.mean([pts[t] for t in targets]))
        hand["worst"].append(min(pts[k] for k in range(3) if k not in targets))
        on_t = np.isin(y, targets)
        hand["b"] += int(np.sum(srch & ~extra & on_t))
        hand["c"] += int(np.sum(~srch & extra & on_t))
        hand["bo"] += int(np.sum(srch & ~extra & ~on_t))
        hand["co"] += int(np.sum(~srch & extra & ~on_t))
        hand["b1"] += int(np.sum(srch & ~extra & (y == 1)))
        hand["c1"] += int(np.sum(~srch & extra & (y == 1)))
    s = study.summarize(runs, "direct", ["a", "b", "c"])
    m = s["methods"][study.SEARCH_ROW]
    assert s["n_seeds"] == 3 and s["found"] == 1
    assert m["target_gain"]["mean"] == pytest.approx(np.mean(hand["gain"]))
    sd = np.std(hand["gain"], ddof=1)
    assert m["target_gain"]["half_width"] == pytest.approx(
        scipy.stats.t.ppf(0.975, 2) * sd / np.sqrt(3)
    )
    assert m["worst_other"]["mean"] == pytest.approx(np.mean(hand["worst"]))
    t = m["mcnemar_vs_extra_epoch"]["targets"]
    assert (t["gained"], t["lost"]) == (hand["b"], hand["c"])
    assert t["p"] == pytest.approx(scipy.stats.binomtest(hand["b"], hand["b"] + hand["c"]).pvalue)
    o = m["mcnemar_vs_extra_epoch"]["others"]
    assert (o["gained"], o["lost"]) == (hand["bo"], hand["co"])
    c1 = m["mcnemar_vs_extra_epoch"]["per_class"][1]
    assert (c1["gained"], c1["lost"]) == (hand["b1"], hand["c1"])
    assert s["methods"]["unweighted"]["mcnemar_vs_extra_epoch"] is None
    # a method answered in one seed of three: its n says so, and it cannot be "best at matched
    # harm" (its mean is over another set of seeds), though its one seed gains most
    assert s["methods"]["fixed_alpha_lp, val-matched"]["n"] == 1
    best = s["best_at_matched_harm"]
    assert best["method"] in (study.SEARCH_ROW, "topk_upweight, val-matched")
    assert best["best_baseline"] == "topk_upweight, val-matched"
    diff = np.subtract(
        hand["gain"], s["methods"]["topk_upweight, val-matched"]["per_seed"]["target_gain"]
    )
    assert best["search_minus_best_baseline"]["mean"] == pytest.approx(diff.mean())


# one seed by default (the intervals and pooling are tested above on synthetic seeds); two with -m
# slow
# (about 90 s: the suite's 15-minute budget; every piece is tested on its own above)
@pytest.mark.slow
@pytest.mark.parametrize("n_seeds", [1, 2])
def test_quick_study_end_to_end_and_resume(tmp_path, n_seeds, monkeypatch):
    out = io.StringIO()
    released = []  # compiled programs are dropped after every seed run (memory maps)
    monkeypatch.setattr(study, "release_compiled_programs", lambda: released.append(1))
    r = study.reproduce_study(
        ("mnist5k-noisy",), seeds=n_seeds, quick=True, out_dir=str(tmp_path), out=out
    )
    res = r["mnist5k-noisy"]
    assert len(released) == n_seeds
    text = (tmp_path / "report.md").read_text()
    for fig in res["figures"].values():
        png = tmp_path / fig
        assert png.exists() and png.stat().st_size > 5000 and f"]({fig})" in text
    assert "CIFAR-10 (paper" in text and "McNemar" in text
    d = res["summary"]["direct"]
    assert d["n_seeds"] == n_seeds and {study.SEARCH_ROW, "unweighted", "trim_negative"} <= set(
        d["methods"]
    )
    # the paired counts agree with the accuracies the search computed (per class, over seeds):
    # gained − lost = (method hits − extra-epoch hits)
    runs = [
        json.loads((tmp_path / "mnist5k-noisy" / f"seed_{s}" / "seed.json").read_text())
        for s in range(n_seeds)
    ]
    for name in (study.SEARCH_ROW, "trim_negative"):
        per_class = d["methods"][name]["mcnemar_vs_extra_epoch"]["per_class"]
        for k, pc in enumerate(per_class):
            hits = sum(
                round(
                    (
                        np.asarray(r_["direct"]["rows"][name]["test_acc"][k])
                        - np.asarray(r_["direct"]["rows"]["unweighted"]["test_acc"][k])
                    )
                    * np.sum(np.asarray(r_["y_test"]) == k)
                )
                for r_ in runs
            )
            assert pc["net"] == hits, (name, k)
    # resuming reads every seed back and rebuilds the same summary
    log = io.StringIO()
    again = study.reproduce_study(
        ("mnist5k-noisy",), seeds=n_seeds, quick=True, out_dir=str(tmp_path), resume=True, out=log
    )
    assert log.getvalue().count("read back") == n_seeds
    assert again["mnist5k-noisy"]["summary"] == json.loads(json.dumps(res["summary"]))


@pytest.mark.slow  # experiment-scale: a CNN, its Gauss-Newton influence and the searches
@pytest.mark.parametrize("dataset", ["digits", "mnist5k", "emotion", "ag_news"])
def test_quick_study_other_datasets(tmp_path, dataset):
    r = reproduce.reproduce_improve(
        str(tmp_path), datasets=[dataset], quick=True, out=io.StringIO()
    )
    assert r[dataset]["summary"]["direct"]["n_seeds"] == 1


def test_cli_improve_rejects_bad_arguments(tmp_path):
    for args, word in ((["--dataset", "nonsense"], "dataset"), (["--seeds", "0"], "seeds")):
        p = subprocess.run(
            [sys.executable, "-m", "pareto_jax.cli", "reproduce", "improve", *args, "--out",
                str(tmp_path)],
            capture_output=True,
            text=True,
        )
        assert p.returncode == 2 and word in p.stderr, p.stderr


def test_last_layer_influence_is_the_head_alone(x64):
    """`ImproveConfig(influence="last_layer")` (the MNIST-5k CNN setting): P equals the influence
    of a linear model on the network's penultimate activations with the head's weights, computed
    by the generic dense solver (autodiff Hessian of that linear model)."""
    import jax
    import jax.numpy as jnp

    from pareto_jax import data, experiments, influence, models, train

    s = data.stratified_split(data.load_digits(), seed=0)
    s = data.Splits(s.train.subset(np.arange(120)), s.val, s.test)
    m = models.make_model("mlp", (64,), 10, seed=1, hidden=(16,))
    apply, params = models.functional(m)
    feats = models.functional_features(m)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    loss = models.per_sample_loss(apply)
    params = train.train(loss, params, s.train.x.astype(np.float64), s.train.y,
        train.TrainConfig(epochs=30, learning_rate=0.01, weight_decay=1e-2)).params
    got = experiments.influence_at(
        train.Objective(loss, 1e-2), apply, params, s, 10, "mlp", "last_layer", feats
    )
    F = [np.asarray(feats(params, jnp.asarray(x, jnp.float64))) for x in (s.train.x, s.val.x)]
    head = models.make_model("linear", (16,), 10)
    happly, _ = models.functional(head)
    hp = models.linear_head_params(params["head"]["kernel"], params["head"]["bias"])
    ref = influence.category_influence(models.per_sample_loss(happly), hp, F[0], s.train.y, F[1],
        s.val.y, num_classes=10, weight_decay=1e-2, apply=happly,
        config=influence.InfluenceConfig(solver="dense", curvature="hessian", damping=0.0))
    np.testing.assert_allclose(
        np.asarray(got.P), np.asarray(ref.P), rtol=1e-6, atol=1e-9 * np.abs(np.asarray(ref.P)).max()
    )
