"""Estimator-quality benchmark: which inverse-HVP estimator tracks actual retraining best?

On an MLP and a small CNN trained on digits (real, offline), compare exact (dense Hessian),
CG (Hessian), GGN-CG, LiSSA (GGN), K-FAC, EK-FAC and the last-layer closed form against actual
retraining (same init, same seed, same epochs; removed samples get weight 0):

* deletion Spearman (docs/method.md §7): per class t, remove the top / bottom 10% by each
estimator's
  P[:, t], retrain, correlate the removed set's summed influence with the per-class validation
  accuracy change over all 2·K·K cells (each estimator picks its own sets);
* linear datamodeling score (LDS): 24 random subsets keeping 90% of the training set, retrained
  once (shared by all estimators); per class, Spearman between the predicted loss change
  Σ_{removed} P[i, k] and the actual change of the class's validation loss; mean over classes.

Also wall time (second call, compilation excluded) and the memory the estimator's state needs.
All retraining runs batched (vmap over weight vectors). Float64 throughout.

    python -m bench.bench_estimators [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import scipy.stats as ss
    from jax.flatten_util import ravel_pytree

    from pareto_jax import closed_form, data, influence, kfac, models, train

    s = data.stratified_split(data.load_digits(), seed=0)
    x, y = s.train.x.astype(np.float64), s.train.y
    xv, yv = s.val.x.astype(np.float64), s.val.y
    N, K = len(y), 10
    wd = 1e-3
    epochs = 20 if a.quick else 60
    rows = []
    for kind in ("mlp", "cnn"):
        m = models.make_model(
            kind, (64,), K, hidden=(32,), image_shape=(8, 8, 1), channels=(4, 8), dense=32, seed=0
        )
        apply, p0 = models.functional(m)
        p0 = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), p0)
        loss_fn = models.per_sample_loss(apply)
        cfg = train.TrainConfig(
            epochs=epochs, batch_size=128, learning_rate=0.01, weight_decay=wd, seed=0
        )
        ep_batch = train.make_epoch_fn(loss_fn, cfg, N, population=True)
        opt = train.make_optimizer(cfg)

        def retrain(W):
            M = W.shape[0]
            p = jax.tree_util.tree_map(lambda t: jnp.broadcast_to(t, (M, *t.shape)), p0)
            o = jax.vmap(opt.init)(p)
            for e in range(epochs):
                p, o, _ = ep_batch(p, o, x, y, jnp.asarray(W), e)
            return p

        @jax.jit
        def class_stats(params):
            logits = apply(params, xv)
            l = -jax.nn.log_softmax(logits)[jnp.arange(len(yv)), yv]
            oh = jax.nn.one_hot(yv, K)
            acc = oh.T @ (jnp.argmax(logits, -1) == yv) / oh.sum(0)
            return oh.T @ l / oh.sum(0), acc

        batch_stats = jax.jit(jax.vmap(class_stats))
        base = retrain(np.ones((1, N)))
        params = jax.tree_util.tree_map(lambda t: t[0], base)
        base_loss, base_acc = (np.asarray(v) for v in class_stats(params))
        n_params = int(ravel_pytree(params)[0].size)

        # LDS subsets (shared)
        rng = np.random.default_rng(0)
        M = 8 if a.quick else 24
        keep = np.ones((M, N))
        for j in range(M):
            keep[j, rng.choice(N, N // 10, replace=False)] = 0.0
        lds_loss, _ = (np.asarray(v) for v in batch_stats(retrain(keep)))

        def est_last_layer():
            feats = models.frozen_features(models.functional_features(m), params, x)
            fv = models.frozen_features(models.functional_features(m), params, xv)
            head = params["head"]
            return closed_form.linear_influence(feats.astype(np.float64), y, fv.astype(np.float64),
                yv, head["kernel"], head["bias"], weight_decay=wd, damping=1e-3)

        def cfgd(**k):
            return influence.InfluenceConfig(
                **{"damping": 1e-3, "rtol": 1e-8, "max_steps": 2000, **k}
            )

        ests = {
            "exact (dense Hessian)": lambda: (
                influence.category_influence(loss_fn, params, x, y, xv, yv, num_classes=K,
                    weight_decay=wd, config=cfgd(solver="dense", escalate_damping=False)).P
            ),
            "CG (Hessian)": lambda: (
                influence.category_influence(
                    loss_fn, params, x, y, xv, yv, num_classes=K, weight_decay=wd, config=cfgd()
                ).P
            ),
            "GGN-CG": lambda: (
                influence.category_influence(loss_fn, params, x, y, xv, yv, num_classes=K,
                    weight_decay=wd, apply=apply, config=cfgd(curvature="gauss_newton")).P
            ),
            "LiSSA (GGN)": lambda: (
                influence.category_influence(
                    loss_fn,
                    params,
                    x,
                    y,
                    xv,
                    yv,
                    num_classes=K,
                    weight_decay=wd,
                    apply=apply,
                    config=cfgd(solver="lissa", curvature="gauss_newton", hvp_batch_size=256,
                        max_steps=1000, rtol=1e-5),
                ).P
            ),
            "K-FAC": lambda: (
                influence.category_influence(loss_fn, params, x, y, xv, yv, num_classes=K,
                    weight_decay=wd, apply=apply, model=m, config=cfgd(solver="kfac")).P
            ),
            "EK-FAC": lambda: (
                influence.category_influence(loss_fn, params, x, y, xv, yv, num_classes=K,
                    weight_decay=wd, apply=apply, model=m, config=cfgd(solver="ekfac")).P
            ),
            "last layer (closed form)": est_last_layer,
        }
        state_bytes = {"exact (dense Hessian)": n_params**2 * 8,
            "CG (Hessian)": 4 * K * n_params * 8, "GGN-CG": 4 * K * n_params * 8,
            "LiSSA (GGN)": 3 * K * n_params * 8,
            "last layer (closed form)": ((params["head"]["kernel"].shape[0] + 1) * K) ** 2 * 8}
        for name, fn in ests.items():
            P = np.asarray(fn())  # compile / warm
            t0 = time.perf_counter()
            P = np.asarray(_util.block(fn()))
            t = time.perf_counter() - t0
            if name in ("K-FAC", "EK-FAC"):
                f = kfac.compute_factors(m, params, x, num_classes=K, weight_decay=0.0)
                state_bytes[name] = sum(
                    int(np.asarray(a).nbytes) for a in jax.tree_util.tree_leaves(f.factors)
                )
            # deletion check with this estimator's own removal sets
            k10 = N // 10
            W, sets = [], []
            for tcls in range(K):
                order = np.argsort(-P[:, tcls], kind="stable")
                for kind_, idx in (("beneficial", order[:k10]), ("detrimental", order[-k10:])):
                    w = np.ones(N)
                    w[idx] = 0.0
                    W.append(w)
                    sets.append((tcls, idx))
            _, acc = (np.asarray(v) for v in batch_stats(retrain(np.stack(W))))
            infl = np.stack([P[idx].sum(0) for _, idx in sets])  # (2K, K)
            rho_del = float(ss.spearmanr(infl.ravel(), (acc - base_acc).ravel())[0])
            pred = (1 - keep) @ P  # predicted loss increase per subset and class
            act = lds_loss - base_loss
            lds = float(np.nanmean([ss.spearmanr(pred[:, k], act[:, k])[0] for k in range(K)]))
            row = {"model": kind, "params": n_params, "estimator": name,
                "deletion_spearman": rho_del, "lds": lds, "seconds": t,
                "state_MiB": state_bytes[name] / 2**20}
            rows.append(row)
            print(row, flush=True)
    print(
        "\nestimator quality vs retraining (digits; deletion ρ: more negative is better; LDS: "
        "higher is better)"
    )
    print(
        _util.table(rows,
            ["model", "params", "estimator", "deletion_spearman", "lds", "seconds", "state_MiB"])
    )
    p = _util.write(
        "estimators" + ("_quick" if a.quick else ""), {"machine": _util.machine(), "rows": rows}
    )
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
