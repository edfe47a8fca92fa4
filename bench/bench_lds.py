"""Per-class linear datamodeling score for weightings: does −Pᵀ(w − 1) predict re-weighting?

For each dataset (the improvement study's settings: digits and MNIST-5k with the CNN, Emotion and
AG News with MiniLM embeddings and the MLP head), the model is trained to its checkpoint θ^e and
the procedure Direct Improvement applies is fixed: one weighted epoch of the same optimizer from
θ^e (its Adam state, its batch order). Then:

1. every estimator computes P at θ^e, each in a fresh process (wall time of the first call and of
   a second one, and the process's peak RSS): the last-layer closed form, Gauss-Newton CG,
   EK-FAC, K-FAC (whole network, the implicit-function influence) and the unrolled estimator
   (the exact weight-gradient of that one epoch, `influence.unrolled_influence`);
2. M weightings are drawn where the program acts: random subsets (10–30 % of the samples) moved
   up and down within trust regions ρ ∈ {0.1, 0.3, 0.6}, and the program's own answers
   (`pareto.solve_reweighting`, targets the two weakest validation classes) at α ∈ {0.9, 0.97,
   0.995} and ρ ∈ {0.2, 0.5} for the unrolled and the Gauss-Newton P;
3. each weighting is retrained by that procedure (the whole population in one vmapped epoch) and
   the actual change of every class's mean validation (and test) loss is measured against w = 1;
4. per estimator and class: Spearman and Pearson correlation over the M weightings between the
   predicted change (−Pᵀ(w − 1); for the implicit-function estimators with the Σw normaliser's
   first-order term, `influence.predict_class_loss_change(normalizer="weights")`) and the actual
   one; the median and the worst class are reported.

    python -m bench.bench_lds                       # the four datasets
    python -m bench.bench_lds --datasets digits     # some of them
    python -m bench.bench_lds --quick               # small sizes (a smoke run)

Writes bench/results/lds.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402

ESTIMATORS = ("last_layer", "gn_cg", "ekfac", "kfac", "unroll")
LABELS = {"last_layer": "last-layer (closed form)", "gn_cg": "Gauss-Newton CG", "ekfac": "EK-FAC",
    "kfac": "K-FAC", "unroll": "unroll (this epoch)"}
DATASETS = ("digits", "mnist5k", "emotion", "ag_news")


def _setting(name: str, quick: bool):
    """(DataConfig, ModelConfig, TrainConfig) of the study's setting for `name`."""
    import dataclasses

    from pareto_jax import config, study_settings

    st = study_settings.SETTINGS[name]
    tc = st.train if not quick else dataclasses.replace(st.train, epochs=min(st.train.epochs, 4))
    features = st.features if not quick else "tfidf"
    max_train = None if not quick else 600
    return (config.DataConfig(name=st.dataset, seed=0, features=features, max_train=max_train),
        st.model, tc)


def _problem(name: str, quick: bool, ckpt: Path | None = None):
    """The splits, model, loss and the checkpoint θ^e (trained, or read from `ckpt`)."""
    from pareto_jax import models, setup, train

    dcfg, mcfg, tc = _setting(name, quick)
    splits = setup.load_data(dcfg)
    shape = setup.IMAGE_SHAPES.get(splits.train.name.split("/")[0])
    m = models.make_model(mcfg.kind, splits.train.x.shape[1:], splits.num_classes, seed=mcfg.seed,
        hidden=mcfg.hidden, channels=mcfg.channels, dense=mcfg.dense, image_shape=shape)
    apply, params = models.functional(m)
    loss = models.per_sample_loss(apply)
    template = train.init_state(params, tc)
    if ckpt is not None and ckpt.exists():
        return splits, m, apply, loss, tc, train.load_checkpoint(ckpt, template)
    state = train.train(loss, params, splits.train.x, splits.train.y, tc).state
    if ckpt is not None:
        from pareto_jax import io

        io.save_pytree(
            ckpt, {"params": state.params, "opt_state": state.opt_state}, epoch=state.epoch
        )
    return splits, m, apply, loss, tc, state


def _estimate(est: str, splits, m, apply, loss, tc, state):
    """P of one estimator at θ^e (an `InfluenceResult`)."""
    from pareto_jax import influence, models, train

    K, wd = splits.num_classes, tc.weight_decay
    s = splits
    obj = train.Objective.of(loss, tc)
    if est == "last_layer":
        feats = models.functional_features(m)
        f = [models.frozen_features(feats, state.params, x) for x in (s.train.x, s.val.x)]
        return influence.linear_category_influence(
            state.params, f[0], s.train.y, f[1], s.val.y, num_classes=K, weight_decay=wd
        )
    if est == "unroll":
        r = influence.Retraining(loss, tc, state, epochs=1)
        return influence.unrolled_influence(
            r, s.train.x, s.train.y, s.val.x, s.val.y, num_classes=K
        )
    cfg = {"gn_cg": influence.InfluenceConfig(curvature="gauss_newton", rtol=1e-3, max_steps=300),
        "ekfac": influence.InfluenceConfig(solver="ekfac"),
        "kfac": influence.InfluenceConfig(solver="kfac")}[est]
    return influence.category_influence(obj, state.params, s.train.x, s.train.y, s.val.x, s.val.y,
        num_classes=K, config=cfg, apply=apply, model=m)


def worker(name: str, est: str, quick: bool, tmp: Path) -> None:
    """One estimator in its own process: P (saved), the first and the second call's times, the
    process's peak RSS."""
    splits, m, apply, loss, tc, state = _problem(name, quick, tmp / "ckpt.npz")
    t0 = time.perf_counter()
    res = _estimate(est, splits, m, apply, loss, tc, state)
    _util.block(res.P)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    _util.block(_estimate(est, splits, m, apply, loss, tc, state).P)
    warm = time.perf_counter() - t0
    res.save(tmp / f"P_{est}.npz")
    (tmp / f"P_{est}.json").write_text(
        json.dumps(
            {"cold_s": cold, "warm_s": warm, "peak_rss_MiB": _util.peak() / 2**20,
                "converged": bool(all(res.converged)), "damping": float(res.damping)}
        )
    )


def _weightings(P_by: dict, y_train, val_acc, quick: bool, rng):
    """M weightings where the program acts: random moves within trust regions, and program "
    "answers."""
    import numpy as np

    from pareto_jax import pareto

    n = len(y_train)
    W, kinds = [], []
    per = 4 if quick else 14
    for rho in (0.1, 0.3, 0.6):
        for _ in range(per):
            w = np.ones(n)
            pick = rng.random(n) < rng.uniform(0.1, 0.3)
            w[pick] += rng.uniform(-rho, rho, pick.sum())
            W.append(w)
            kinds.append(f"random ρ={rho}")
    targets = [int(t) for t in np.argsort(val_acc, kind="stable")[:2]]
    for est in ("unroll", "gn_cg"):
        for alpha in (0.9, 0.97, 0.995):
            for rho in (0.2, 0.5):
                r = pareto.solve_reweighting(
                    np.asarray(P_by[est].P, np.float64), targets, alpha, rho=rho
                )
                if r.w is not None:
                    W.append(r.w)
                    kinds.append(f"program ({est}) α={alpha} ρ={rho}")
    return np.stack(W), kinds, targets


def _actual_changes(W, splits, apply, loss, tc, state):
    """(ΔL_val, ΔL_test): per-class mean-loss change after the weighted epoch, each row of W
    against w = 1 (the whole population, base included, in one vmapped epoch)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pareto_jax import train

    n, K = len(splits.train), splits.num_classes
    Wb = np.vstack([np.ones((1, n)), W])
    M = Wb.shape[0]
    ep = train.make_epoch_fn(loss, tc, n, population=True)
    p, _, _ = ep(train.broadcast_population(state.params, M),
        train.broadcast_population(state.opt_state, M), jnp.asarray(splits.train.x, jnp.float32),
        jnp.asarray(splits.train.y), jnp.asarray(Wb, jnp.float32), state.epoch)
    out = []
    for d in (splits.val, splits.test):
        L = np.stack(
            [
                train.evaluate(apply, jax.tree_util.tree_map(lambda a: a[i], p), d.x, d.y, K).loss
                for i in range(M)
            ]
        )
        out.append(L[1:] - L[0])
    return out


def _scores(pred, actual):
    """Per class Spearman and Pearson over the weightings; (median, worst) of each."""
    import numpy as np
    import scipy.stats

    sp = np.array(
        [scipy.stats.spearmanr(pred[:, k], actual[:, k])[0] for k in range(pred.shape[1])]
    )
    pe = np.array([np.corrcoef(pred[:, k], actual[:, k])[0, 1] for k in range(pred.shape[1])])
    return {"spearman_per_class": sp.tolist(), "pearson_per_class": pe.tolist(),
        "spearman_median": float(np.median(sp)), "spearman_worst": float(np.min(sp)),
        "pearson_median": float(np.median(pe)), "pearson_worst": float(np.min(pe))}


def run_dataset(name: str, quick: bool, estimators, tmp: Path) -> dict:
    import numpy as np

    from pareto_jax import influence, train

    splits, m, apply, loss, tc, state = _problem(name, quick, tmp / "ckpt.npz")
    K = splits.num_classes
    P_by, cost = {}, {}
    for est in estimators:
        r = subprocess.run(
            [sys.executable, "-m", "bench.bench_lds", "--worker", name, est, str(tmp)]
            + (["--quick"] if quick else []),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            print(f"  {est}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        P_by[est] = influence.InfluenceResult.load(tmp / f"P_{est}.npz")
        cost[est] = json.loads((tmp / f"P_{est}.json").read_text())
        print(
            f"  {LABELS[est]}: first call {cost[est]['cold_s']:.1f} s, second "
            f"{cost[est]['warm_s']:.1f} s, "
            f"peak RSS {cost[est]['peak_rss_MiB']:.0f} MiB",
            flush=True,
        )
    val_acc = train.evaluate(apply, state.params, splits.val.x, splits.val.y, K).accuracy
    W, kinds, targets = _weightings(P_by, splits.train.y, val_acc, quick, np.random.default_rng(0))
    t0 = time.perf_counter()
    d_val, d_test = _actual_changes(W, splits, apply, loss, tc, state)
    t_retrain = time.perf_counter() - t0
    flat = np.concatenate(
        [np.ravel(a) for a in __import__("jax").tree_util.tree_leaves(state.params)]
    )
    rows = {}
    for est, res in P_by.items():
        if est == "unroll":
            pred = np.stack([influence.predict_class_loss_change(res, w) for w in W])
        else:  # with the Σw normaliser's first-order term (last layer: the head's solutions)
            params = {"head": state.params["head"]} if est == "last_layer" else state.params
            pred = np.stack(
                [
                    influence.predict_class_loss_change(
                        res, w, params=params, weight_decay=tc.weight_decay, normalizer="weights"
                    )
                    for w in W
                ]
            )
        rows[est] = {"val": _scores(pred, d_val), "test": _scores(pred, d_test), **cost[est]}
    return {
        "dataset": name,
        "n_train": len(splits.train),
        "num_classes": K,
        "n_params": int(flat.size),
        "weightings": len(W),
        "kinds": kinds,
        "targets": targets,
        "retrain_seconds": t_retrain,
        "procedure": f"one weighted epoch of {tc.optimizer} (lr {tc.learning_rate}, "
        f"batch {tc.batch_size}) from epoch {state.epoch}",
        "estimators": rows,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs=3, metavar=("DATASET", "ESTIMATOR", "TMP"))
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.quick, Path(a.worker[2]))
    import tempfile

    results = []
    for name in a.datasets.split(","):
        print(f"\n{name}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_dataset(name, a.quick, a.estimators.split(","), Path(tmp)))
    print(
        "\nper-class LDS for weightings: Spearman (median / worst class) of predicted vs actual "
        "change "
        "of each class's mean loss"
    )
    print(
        f"{'dataset':10s} {'estimator':26s} {'val median':>10s} {'val worst':>9s} "
        f"{'test median':>11s} "
        f"{'test worst':>10s} {'1st call s':>10s} {'2nd call s':>10s} {'peak MiB':>8s}"
    )
    for r in results:
        for est, row in r["estimators"].items():
            print(
                f"{r['dataset']:10s} {LABELS[est]:26s} {row['val']['spearman_median']:10.3f} "
                f"{row['val']['spearman_worst']:9.3f} {row['test']['spearman_median']:11.3f} "
                f"{row['test']['spearman_worst']:10.3f} {row['cold_s']:10.1f} "
                f"{row['warm_s']:10.1f} "
                f"{row['peak_rss_MiB']:8.0f}"
            )
    _util.write(
        "lds" + ("_quick" if a.quick else ""), {"results": results, "machine": _util.machine()}
    )


if __name__ == "__main__":
    main()
