"""The improvement experiments: Direct Improvement, Course Correction and the Pareto frontier
on a trained model, each beside its baselines (``pareto-jax improve``, and
`pareto_jax.reproduce.reproduce_frontier` for the one-seed report, `pareto_jax.study` for the
study over datasets and seeds). See ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import scipy.stats

from . import checks, data, evaluation, influence, io, models, pareto, rounds, search, train
from .config import ImproveConfig, RoundsConfig, SearchConfig
from .setup import build, load_data, product_influence


def influence_at(objective: train.Objective, apply, params, splits, K, model_kind, config=None,
    features=None, module=None):
    """P of the experiments at `params` for the training `objective`: closed form (undamped) for
    a linear model; for a deep one, `config` (an `InfluenceConfig`; default EK-FAC,
    `InfluenceConfig.for_product`, on the nnx `module`) or "last_layer" (the head alone, in
    closed form on the penultimate activations that `features(params, x)` gives)."""
    wd = objective.weight_decay
    if config == "last_layer":
        # the head alone, on the network's penultimate activations held fixed: closed form
        f = [models.frozen_features(features, params, x) for x in (splits.train.x, splits.val.x)]
        return influence.linear_category_influence(
            params, f[0], splits.train.y, f[1], splits.val.y, num_classes=K, weight_decay=wd
        )
    if model_kind == "linear":
        return influence.linear_category_influence(params, splits.train.x, splits.train.y,
            splits.val.x, splits.val.y, num_classes=K, weight_decay=wd)
    cfg = product_influence(config, model_kind)
    return influence.category_influence(objective, params, splits.train.x, splits.train.y,
        splits.val.x, splits.val.y, num_classes=K, config=cfg, apply=apply, model=module)


def bits(correct) -> str:
    """A boolean vector as a string of 0/1 (compact in JSON)."""
    return "".join("1" if c else "0" for c in np.asarray(correct, bool))


def _search_block(res, baselines, class_names, targets, matched=None) -> dict:
    rows = {
        "search (PARETO-LP-GA)": {"val_acc": res.val_acc, "test_acc": res.test_acc,
            "delta_val": res.delta_val, "delta_test": res.delta_test,
            "test_correct": res.test_correct}
    }
    rows.update(baselines)
    rows.update({f"{n}, val-matched": r for n, r in (matched or {}).items()})
    t = list(targets)
    summary = {
        name: _improve_row(r["val_acc"], r["test_acc"], r["delta_val"], res.ref_test, t)
        for name, r in rows.items()
    }
    return {
        "targets": t,
        "target_names": [class_names[i] for i in t],
        "ref_val": res.ref_val.tolist(),
        "ref_test": res.ref_test.tolist(),
        "best_alpha": res.best.alpha.tolist(),
        "best_rho": res.best.rho,
        "best_genome": res.best.genome.tolist(),
        "best_fitness": res.best.fitness,
        "found": res.found,
        "program": res.program,
        "history": list(res.history),
        "matched_t": {n: r["t"] for n, r in (matched or {}).items()},
        "rows": summary,
        # per test sample, right (1) or wrong (0): the paired tests of `study` use these
        "test_correct": {
            name: bits(r["test_correct"])
            for name, r in rows.items()
            if r.get("test_correct") is not None
        },
    }


def _improve_row(val_acc, test_acc, delta_val, ref_test, targets: list) -> dict:
    """One method's row of an improvement table: test-point changes and validation Δ."""
    dt_pts = 100 * (np.asarray(test_acc) - np.asarray(ref_test))
    others = np.delete(dt_pts, targets)
    return {"target_test_points": dt_pts[targets].tolist(),
        "min_target_test_points": float(dt_pts[targets].min()),
        "worst_other_test_points": float(others.min()) if others.size else 0.0,
        "target_val_delta_pct": np.asarray(delta_val)[targets].tolist(),
        "val_acc": np.asarray(val_acc).tolist(), "test_acc": np.asarray(test_acc).tolist()}


def format_improve_table(block: dict, class_names) -> str:
    t = block["targets"]
    w = max(
        [len("method"), *(len(str(n)) for n in block["rows"])]
    )  # the longest method name sets the column
    cw = max([7, *(len(str(class_names[i])) for i in t)])
    lines = [
        f"targets: {', '.join(block['target_names'])}   (test accuracy change, points)",
        f"{'method':{w}s} "
        + " ".join(f"{class_names[i]:>{cw}s}" for i in t)
        + f" {'worst other':>12s}",
    ]
    for name, r in block["rows"].items():
        lines.append(
            f"{name:{w}s} "
            + " ".join(f"{v:+{cw}.2f}" for v in r["target_test_points"])
            + f" {r['worst_other_test_points']:+12.2f}"
        )
    return "\n".join(lines)


class _Setting(NamedTuple):
    """The trained model of an improvement experiment: data, model, every epoch's state."""

    splits: data.Splits
    apply: Callable
    loss_fn: Callable
    states: list
    num_classes: int
    objective: train.Objective
    features: Callable | None = None
    module: Any = None  # the nnx module (K-FAC / EK-FAC read its layers)

    @property
    def refit(self) -> train.Objective:
        """The objective of retraining to convergence: the fixed-N normaliser, under which the
        first-order predictions are exact."""
        return dataclasses.replace(self.objective, normalizer="n")

    def problem_at(self, st, train_config) -> evaluation.SearchProblem:
        s = self.splits
        return evaluation.SearchProblem(self.loss_fn, self.apply, st, train_config, s.train.x,
            s.train.y, s.val.x, s.val.y, s.test.x, s.test.y, self.num_classes)

    def influence_at(self, params, config: ImproveConfig):
        return influence_at(self.objective, self.apply, params, self.splits, self.num_classes,
            config.model.kind, config.influence, self.features, self.module)


def _train_noisy(config: "ImproveConfig", out) -> tuple[_Setting, dict]:
    """Train on the label-noised training split, keeping every epoch's state."""
    splits = load_data(config.data)
    flipped = np.zeros(0, int)
    if config.noise_fraction > 0 and config.noise_classes:
        noisy, flipped = data.inject_label_noise(
            splits.train, config.noise_classes, config.noise_fraction, seed=config.data.seed
        )
        splits = data.Splits(noisy, splits.val, splits.test)
    built = build(config.model, splits)
    apply, params, features = built.apply, built.params, built.features
    loss_fn = models.per_sample_loss(apply)
    tc = config.train
    ep_fn = train.make_epoch_fn(loss_fn, tc, len(splits.train))
    state = train.init_state(params, tc)
    states = [state]
    for _ in range(tc.epochs):
        state = train.train(
            loss_fn, None, splits.train.x, splits.train.y, tc, state=state, epochs=1, epoch_fn=ep_fn
        ).state
        states.append(state)
    noise = (
        f" ({flipped.size} labels flipped in classes {list(config.noise_classes)})"
        if flipped.size
        else " (labels as given)"
    )
    print(
        f"{splits.train.name}: {len(splits.train)} train{noise}, {len(splits.val)} val, "
        f"{len(splits.test)} test",
        file=out,
    )
    report = {"config": io.to_jsonable(config), "n_flipped": int(flipped.size),
        "class_names": list(splits.class_names), "y_test": splits.test.y.tolist()}
    return _Setting(splits, apply, loss_fn, states, splits.num_classes,
        train.Objective.of(loss_fn, tc), features, built.module), report


def _direct(setting: _Setting, config: "ImproveConfig", scfg, progress, out) -> dict:
    """Direct Improvement at θ^e (or, when candidates are retrained to convergence, at the
    converged model θ* reached from θ^e: the first-order program's own setting)."""
    s, K, tc = setting.splits, setting.num_classes, config.train
    e = config.epoch if config.epoch is not None else tc.epochs
    st_e = setting.states[e]
    if scfg.retrain == "converge":
        th, _, _ = train.fit_lbfgs(
            setting.refit, st_e.params, s.train.x, s.train.y, max_iter=scfg.retrain_max_iter
        )
        st_e = train.TrainState(th, st_e.opt_state, st_e.epoch)
    inf_e = setting.influence_at(st_e.params, config)
    acc_e = train.evaluate(setting.apply, st_e.params, s.val.x, s.val.y, K).accuracy
    targets = config.targets or tuple(
        int(i) for i in np.argsort(acc_e, kind="stable")[: config.n_targets]
    )
    prob = setting.problem_at(st_e, tc)
    res = search.run_search(prob, inf_e.P, targets, mode="direct", config=scfg, progress=progress)
    extra = (
        _unroll_methods(setting, prob, st_e, targets, scfg, "direct", None, progress, out)
        if config.unroll and scfg.retrain == "epoch"
        else None
    )
    block = _with_baselines(
        res, prob, inf_e.P, st_e.params, targets, setting, config, scfg, scfg.retrain, extra
    )
    block["epoch"] = e
    if config.rounds > 1:
        _iterate_direct(block, res, config, scfg, st_e, setting, targets, progress, out)
    print(f"\nDirect Improvement at epoch {e}", file=out)
    print(format_improve_table(block, s.class_names), file=out)
    return block


UNROLL_PROGRAM = "program (unroll)"


def _unroll_methods(setting: _Setting, prob, st, targets, scfg, mode, ref, progress, out):
    """The methods driven by the unrolled estimator (the exact weight-gradient of the one weighted
    epoch every candidate gets): the search on P_unroll, the sequential re-linearised rounds, and
    (as a weighting, so that it also gets its val-matched step) the fixed-α program on P_unroll.
    Returns (rows, extra weightings)."""
    s, K = setting.splits, setting.num_classes
    r = influence.Retraining(setting.loss_fn, prob.train_config, st, epochs=1)
    res = influence.unrolled_influence(r, s.train.x, s.train.y, s.val.x, s.val.y, num_classes=K)
    P_u = np.asarray(res.P)
    print(f"unrolled influence computed in {res.details['precision']}", file=out)
    kw = dict(mode=mode, ref_params=None if mode == "direct" else ref)
    res_u = search.run_search(prob, P_u, targets, config=dataclasses.replace(scfg, retrain="epoch"),
        progress=progress, **kw)
    rnd = rounds.run_rounds(prob, targets, config=RoundsConfig(reweight=scfg.reweight), **kw)
    print(f"rounds (unroll): {len(rnd.history)} steps tried, stopped: {rnd.stop}", file=out)
    rows = {
        name: {"val_acc": x.val_acc, "test_acc": x.test_acc, "delta_val": x.delta_val,
            "delta_test": x.delta_test, "test_correct": x.test_correct}
        for name, x in (("search (unroll)", res_u), ("rounds (unroll)", rnd))
    }
    prog = pareto.solve_reweighting(P_u, targets, scfg.baselines.fixed_alpha, scfg.reweight)
    return rows, ({UNROLL_PROGRAM: prog.w} if prog.w is not None else {})


def _with_baselines(res, prob, P, ref, targets, setting, config, scfg, retrain, extra=None) -> dict:
    """The search's result beside the baselines (raw and, if asked, val-matched), and the
    unrolled estimator's methods (`extra`: rows and weightings) when they ran."""
    K = setting.num_classes
    extra_rows, extra_w = extra or ({}, {})
    bw = {
        **evaluation.baseline_weights(
            P, setting.splits.train.y, targets, K, scfg.baselines, scfg.reweight
        ),
        **extra_w,
    }
    base = evaluation.evaluate_weightings(
        prob, bw, ref, retrain=retrain, max_iter=scfg.retrain_max_iter
    )
    matched = (
        evaluation.harm_matched_baselines(
            prob, bw, ref, targets, retrain=retrain, max_iter=scfg.retrain_max_iter
        )
        if config.matched_baselines
        else {}
    )
    return _search_block(res, {**extra_rows, **base}, setting.splits.class_names, targets, matched)


def _course_correction(setting: _Setting, config: "ImproveConfig", scfg, progress, out) -> dict:
    """Course Correction at the epoch (second half of training) whose ordinary successor
    dropped some validation class the most."""
    s, K, tc, names = setting.splits, setting.num_classes, config.train, setting.splits.class_names
    accs = [
        train.evaluate(setting.apply, st.params, s.val.x, s.val.y, K).accuracy
        for st in setting.states
    ]
    # look in the second half of training: early epochs still move every class a lot
    drops = [
        (float(np.max(accs[i] - accs[i + 1])), i) for i in range(max(1, tc.epochs // 2), tc.epochs)
    ]
    drop, e_cc = max(drops)
    if drop <= 0:
        print("\nCourse Correction: no class dropped between consecutive epochs", file=out)
        return {"skipped": "no class dropped between consecutive epochs"}
    cc_targets = tuple(int(k) for k in np.flatnonzero(accs[e_cc] - accs[e_cc + 1] > 0))
    st_cc = setting.states[e_cc]
    inf_cc = setting.influence_at(st_cc.params, config)
    prob_cc = setting.problem_at(st_cc, tc)
    ref = setting.states[e_cc + 1].params
    res_cc = search.run_search(prob_cc, inf_cc.P, cc_targets, mode="course_correction",
        ref_params=ref, config=dataclasses.replace(scfg, retrain="epoch"), progress=progress)
    extra = (
        _unroll_methods(
            setting, prob_cc, st_cc, cc_targets, scfg, "course_correction", ref, progress, out
        )
        if config.unroll
        else None
    )
    block = _with_baselines(
        res_cc, prob_cc, inf_cc.P, ref, cc_targets, setting, config, scfg, "epoch", extra
    )
    block.update(
        {"epoch": e_cc, "val_drop_points": 100 * drop, "val_acc_e": accs[e_cc].tolist(),
            "val_acc_e_plus_1": accs[e_cc + 1].tolist()}
    )
    print(
        f"\nCourse Correction at epoch {e_cc} (ordinary epoch {e_cc + 1} dropped classes "
        f"{[names[k] for k in cc_targets]} by up to {100 * drop:.1f} val points)",
        file=out,
    )
    print(format_improve_table(block, names), file=out)
    return block


def run_improve(
    config: ImproveConfig = ImproveConfig(), *, progress: bool = True, out=None
) -> dict:
    """The improvement experiment: train on noisy data, then Direct Improvement, Course
    Correction and the Pareto frontier, each beside its baselines; writes ``improve.json``."""
    out = out or sys.stdout
    scfg = config.search or SearchConfig(
        alpha_range=(config.alpha_min, 1.0), reweight=config.reweight, retrain=config.retrain
    )
    if config.rounds > 1 and (config.model.kind != "linear" or scfg.retrain != "converge"):
        checks.fail("rounds", config.rounds, "1 unless the model is linear and retrain='converge'",
            "use rounds=1, or a linear model retrained to convergence")
    setting, report = _train_noisy(config, out)
    report["direct"] = _direct(setting, config, scfg, progress, out)
    if config.course_correction:
        report["course_correction"] = _course_correction(setting, config, scfg, progress, out)
    if config.frontier:
        report["frontier"] = frontier_experiment(
            setting, setting.states[-1].params, config, out=out
        )
    out_dir = Path(config.out_dir)
    io.write_json(out_dir / "improve.json", report)
    print(f"\nwrote {out_dir / 'improve.json'}", file=out)
    return report


def _iterate_direct(block, res, config, scfg, st_e, setting: _Setting, targets, progress, out):
    """Iterated Direct Improvement (see `ImproveConfig.rounds`); adds a row to `block`."""
    splits, apply = setting.splits, setting.apply
    K, wd = setting.num_classes, setting.objective.weight_decay
    base = np.ones(len(splits.train))
    st, cur, log = st_e, res, []
    for r in range(config.rounds):
        if r > 0:
            P_r = influence.linear_category_influence(st.params, splits.train.x, splits.train.y,
                splits.val.x, splits.val.y, num_classes=K, weight_decay=wd, weights=base).P
            prob = dataclasses.replace(setting.problem_at(st, config.train), base_weights=base)
            cur = search.run_search(prob, np.asarray(P_r), targets, mode="direct",
                config=dataclasses.replace(scfg, seed=scfg.seed + r), progress=progress)
        if not cur.found or cur.best.fitness < 0:
            log.append(
                {"round": r + 1, "kept": False, "found": bool(cur.found),
                    "fitness": float(cur.best.fitness)}
            )
            break
        base = base * cur.weights
        th, _, _ = train.fit_lbfgs(setting.refit, st.params, splits.train.x, splits.train.y,
            weights=base, max_iter=scfg.retrain_max_iter)
        st = train.TrainState(th, st.opt_state, st.epoch)
        va = train.evaluate(apply, th, splits.val.x, splits.val.y, K).accuracy
        te = train.evaluate(apply, th, splits.test.x, splits.test.y, K).accuracy
        log.append(
            {"round": r + 1, "kept": True, "alpha": cur.best.alpha.tolist(), "rho": cur.best.rho,
                "val_acc": va.tolist(), "test_acc": te.tolist(),
                "weights_min_max": [float(base.min()), float(base.max())]}
        )
    kept = [g for g in log if g["kept"]]
    block["iterated"] = {"rounds_requested": config.rounds, "rounds_kept": len(kept), "log": log}
    if kept:
        ref_val, ref_test = np.asarray(block["ref_val"]), np.asarray(block["ref_test"])
        va, te = kept[-1]["val_acc"], kept[-1]["test_acc"]
        block["rows"][f"search, iterated ({len(kept)} rounds)"] = _improve_row(
            va, te, evaluation.relative_change(va, ref_val), ref_test, list(targets)
        )
    print(f"iterated Direct Improvement: {len(kept)} of {config.rounds} rounds kept", file=out)


def frontier_experiment(setting: _Setting, params, config, *, out=None, n_verify: int = 4) -> dict:
    """Frontier at the converged model: predicted per-class loss decreases, then actual
    retraining (L-BFGS to convergence, fixed-N normaliser) at a few frontier points."""
    out = out or sys.stdout
    splits, apply, K = setting.splits, setting.apply, setting.num_classes
    theta, it, gn = train.fit_lbfgs(setting.refit, params, splits.train.x, splits.train.y)
    inf = influence_at(setting.objective, apply, theta, splits, K, config.model.kind,
        module=setting.module)
    fr = pareto.pareto_frontier(inf.P, rho=config.frontier_rho, n_random=8, seed=config.data.seed)
    base = train.evaluate(apply, theta, splits.val.x, splits.val.y, K)
    pts = []
    order = list(config.noise_classes)[:n_verify] + [
        K + i for i in range(max(0, n_verify - len(config.noise_classes)))
    ]
    for j in order:
        w = fr.weights[j]
        th_w, _, _ = train.fit_lbfgs(
            setting.refit, theta, splits.train.x, splits.train.y, weights=w
        )
        m = train.evaluate(apply, th_w, splits.val.x, splits.val.y, K)
        mt = train.evaluate(apply, th_w, splits.test.x, splits.test.y, K)
        pts.append(
            {"point": int(j), "class_weights": fr.class_weights[j].tolist(),
                "predicted_loss_change": (-fr.gains[j]).tolist(),
                "actual_loss_change": (m.loss - base.loss).tolist(),
                "val_acc_change_points": (100 * (m.accuracy - base.accuracy)).tolist(),
                "test_acc": mt.accuracy.tolist()}
        )
    pred = np.concatenate([p["predicted_loss_change"] for p in pts])
    act = np.concatenate([p["actual_loss_change"] for p in pts])
    res = {"rho": fr.rho, "ceiling_loss_decrease": fr.ceiling.tolist(), "gains": fr.gains.tolist(),
        "class_weights": fr.class_weights.tolist(), "verified": pts,
        "spearman_predicted_vs_actual": float(scipy.stats.spearmanr(pred, act)[0]),
        "pearson_predicted_vs_actual": float(np.corrcoef(pred, act)[0, 1]), "lbfgs_iterations": it,
        "lbfgs_grad_norm": gn, "base_val_loss": base.loss.tolist(),
        "base_val_acc": base.accuracy.tolist()}
    print(
        f"\nFrontier (trust region ρ = {fr.rho}): estimated first-order ceiling, predicted "
        "val-loss "
        "decrease per class with no class predicted worse:",
        file=out,
    )
    print(
        "  " + "  ".join(f"{n}:{g:.4f}" for n, g in zip(splits.class_names, fr.ceiling)), file=out
    )
    print(
        f"  retrained at {len(pts)} frontier points: predicted vs actual per-class loss change, "
        f"Spearman {res['spearman_predicted_vs_actual']:.3f}, Pearson "
        f"{res['pearson_predicted_vs_actual']:.3f}",
        file=out,
    )
    return res
