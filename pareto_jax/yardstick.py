"""The main job's step rule and its yardstick: simple baselines given the same rule, on the same
split.

A weighting's direction w − 1 is taken a step t (w_t = 1 + t (w − 1)) chosen on validation
(`choose_step`): each t in ``RunConfig.steps`` is retrained for ``retrain_epochs`` from the
checkpoint beside as many plain epochs and scored by `evaluation.fitness` (every target must
gain on validation; then the least harm to the other classes). Test data are never looked at.

The improvement study (``docs/study/current/report.md``) measures methods by the target gain at
matched validation harm against the best baseline given the same rule, and finds that simple
baselines are often level with the influence-based weights. So the main job applies that yardstick
on the user's own split (`stage_baselines`): class-balanced, trim-negative and top-k weights
(`evaluation.simple_baselines`), each given the job's step rule, retrained like the reweighting,
and reported beside it on test. One split and one seed give no interval: the report says so, and
`pareto-jax reproduce improve` repeats over seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import evaluation, io, train

BASELINES = ("class_balanced", "topk_upweight", "trim_negative")


def _retrained(job: Any, state, weights=None):
    s = job.splits
    return train.train(job.loss_fn, None, s.train.x, s.train.y, job.train_config,
        weights=weights, state=state, epochs=job.config.retrain_epochs,
        epoch_fn=job.epoch_fn()).params


def _val_accuracy(job: Any, params):
    s = job.splits
    return train.evaluate(job.apply, params, s.val.x, s.val.y, s.num_classes).accuracy


def choose_step(job: Any, state, w, targets, plain_val=None) -> tuple[np.ndarray, dict, Any]:
    """(w_t, what was chosen and why, the params retrained with w_t) for the step t of
    ``job.config.steps`` with the best (fitness, mean target gain) on validation against the plain
    epochs (`plain_val`: their per-class validation accuracy, retrained here if None). If no step
    gains on every target, the best target gain is kept and the record says so."""
    plain = _val_accuracy(job, _retrained(job, state)) if plain_val is None else plain_val
    scored, params = {}, {}
    for t in job.config.steps:
        wt = 1.0 + t * (np.asarray(w) - 1.0)
        params[float(t)] = _retrained(job, state, wt)
        acc = _val_accuracy(job, params[float(t)])
        scored[float(t)] = evaluation.fitness(acc - plain, targets) + (acc - plain,)
    best = max(scored, key=lambda t: scored[t][:2])
    ok = np.isfinite(scored[best][0])
    return 1.0 + best * (np.asarray(w) - 1.0), {
        "step": best,
        "step_found": bool(ok),
        "step_note": (
            "every target gained on validation at this step"
            if ok
            else "no step gained on every target on validation; the step with the best mean "
            "target gain is kept"
        ),
        "step_candidates": {
            str(t): {"fitness": v[0], "target_gain": v[1], "val_change": v[2].tolist()}
            for t, v in scored.items()
        },
    }, params[best]


def stage_baselines(job: Any, state, P, targets, fp_inf: str, plain_val) -> dict:
    """The yardstick's stage: each of `BASELINES` given the job's step rule (no steps: as they
    are) against the plain epochs' per-class validation accuracy `plain_val` (the retrain
    stage's), its test accuracy and loss per class; cached in ``baselines/baselines.json``."""
    st, s, cfg = job.stages, job.splits, job.config
    fp = io.fingerprint("baselines", fp_inf, targets, cfg.steps, cfg.retrain_epochs, BASELINES)
    f = st.root / "baselines" / "baselines.json"
    if not st.done("baselines", fp):
        st.start("baselines")
        weights = evaluation.simple_baselines(P, s.train.y, targets, s.num_classes)
        plain = np.asarray(plain_val)
        rows = {}
        for name in BASELINES:
            if cfg.steps:
                _, how, params = choose_step(job, state, weights[name], targets, plain)
                how = {k: how[k] for k in ("step", "step_found")}
            else:
                params, how = _retrained(job, state, weights[name]), {"step": 1.0}
            m = train.evaluate(job.apply, params, s.test.x, s.test.y, s.num_classes)
            rows[name] = {**how, "test_accuracy": m.accuracy.tolist(), "test_loss": m.loss.tolist()}
        io.write_json(st.dir("baselines") / "baselines.json", rows)
        st.finish("baselines", fp, {"targets": targets, "steps": cfg.steps}, [f])
    return io.read_json(f)


def compare(baselines: dict, reweighted, plain, targets) -> dict:
    """Test points against the plain epochs, per method: the targets' mean gain and the worst
    other class; and the reweighting's mean target gain minus the best baseline's."""
    plain = np.asarray(plain)
    others = np.ones(plain.size, bool)
    others[list(targets)] = False

    def row(acc):
        d = 100 * (np.asarray(acc) - plain)
        return {"target_gain": float(d[list(targets)].mean()),
            "worst_other": float(d[others].min()) if others.any() else 0.0}

    rows = {"reweighted": row(reweighted), **{n: {"step": b["step"], **row(b["test_accuracy"])}
        for n, b in baselines.items()}}
    best = max(baselines, key=lambda n: rows[n]["target_gain"])
    return {"rows": rows, "best_baseline": best,
        "difference": rows["reweighted"]["target_gain"] - rows[best]["target_gain"]}
