"""The validation experiments of docs/method.md as report-writing pipeline functions.

Each writes a folder with ``report.md`` (tables), PNG figures and the JSON of every figure.
The CLI (``pareto-jax reproduce ...``) and the notebooks call these functions.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from . import checks, data, datasets, influence, io, models, pareto, plots, train
from .config import (
    DataConfig,
    ImproveConfig,
    InfluenceConfig,
    ModelConfig,
    ReweightConfig,
    SearchConfig,
    TrainConfig,
)

REFERENCE = {
    "synthetic_rounds": "0.92/0.84 → 0.99/0.98 → 0.99/0.99 → 1.0/1.0",
    "deletion_spearman": "−0.75 to −0.92 (CIFAR-10, STL-10, Emotion, AG News)",
}


@functools.lru_cache(maxsize=8)
def _linear_model(shape, K):
    """(apply, loss_fn, initial params) of a linear softmax model, one per shape: the refits of
    a sweep share one loss function, hence one compiled L-BFGS program."""
    apply, params = models.functional(models.make_model("linear", shape, K))
    return apply, models.per_sample_loss(apply), params


def _fit_linear(x, y, K, wd, *, weights=None, init=None, normalizer="weights"):
    apply, loss_fn, params = _linear_model(tuple(x.shape[1:]), K)
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(p, jnp.float64), params if init is None else init
    )
    p, it, gn = train.fit_lbfgs(
        train.Objective(loss_fn, wd, normalizer),
        params,
        x.astype(np.float64),
        y,
        weights=weights,
        max_iter=2000,
        tol=1e-8,
    )
    return apply, loss_fn, p


# ----------------------------------------------------------------------------- synthetic


def _synthetic_case(case, n, seed, weight_decay, out_dir) -> dict:
    """One 2-D case: fit, influence against validation (and the training set), ceiling test,
    figures; in the separable case, three rounds of removing joint-negative samples."""
    ds = data.make_disks(case, n_per_class=n, flipped_per_class=(0, 0), seed=seed)
    s = data.stratified_split(ds, val_fraction=0.25, test_fraction=0.25, seed=seed)
    tr = s.train
    flipped = np.zeros(0, int)
    if case == "separable":
        # label noise in training only: 8% of disk 0 and 16% of disk 1 flipped
        tr, f0 = data.inject_label_noise(tr, [0], 0.08, seed=seed)
        tr, f1 = data.inject_label_noise(tr, [1], 0.16, seed=seed + 1)
        flipped = np.union1d(f0, f1)
    apply, loss_fn, params = _fit_linear(tr.x, tr.y, 2, weight_decay)

    def infl(params, trs, ref_x, ref_y):
        return np.asarray(
            influence.linear_category_influence(
                params,
                trs.x.astype(np.float64),
                trs.y,
                ref_x.astype(np.float64),
                ref_y,
                num_classes=2,
                weight_decay=weight_decay,
            ).P
        )

    # influence against the clean validation split (the method); against the training set
    # itself (reported beside it) every case sits near y = −x, since at the optimum
    # Σ_k n_k g_k = N∇L_train = −Nλθ ≈ 0 whatever the data
    P = infl(params, tr, s.val.x, s.val.y)
    P_self = infl(params, tr, tr.x, tr.y)
    reg = influence.influence_regions(P)
    ceil, ceil_self = pareto.ceiling_test(P), pareto.ceiling_test(P_self)
    cos = np.abs(P @ np.array([1.0, 1.0]) / np.sqrt(2)) / np.maximum(
        np.linalg.norm(P, axis=1), 1e-300
    )
    acc = train.evaluate(apply, params, s.test.x.astype(np.float64), s.test.y, 2).accuracy
    tr_acc = train.evaluate(apply, params, tr.x.astype(np.float64), tr.y, 2).accuracy

    def predict(z, params=params, apply=apply):
        return np.asarray(jnp.argmax(apply(params, jnp.asarray(z, jnp.float64)), -1))

    figs = {
        "boundary": plots.decision_boundary(
            tr.x,
            tr.y,
            predict,
            out_dir / f"{case}_boundary.png",
            title=f"{case} disks: training data",
            highlight=np.flatnonzero(reg == -1),
        ).get_label(),
        "influence": plots.influence_scatter(
            P, reg, out_dir / f"{case}_influence.png", title=f"{case}: influence vectors"
        ).get_label(),
    }
    entry = {
        "n_train": len(tr),
        "n_flipped": int(flipped.size),
        "test_accuracy": acc.tolist(),
        "train_accuracy": tr_acc.tolist(),
        "ceiling_train_reference": ceil_self.summary(),
        "t_star_relative_train_reference": ceil_self.t_star / float(np.abs(P_self).sum(0).max()),
        "regions": {plots.REGION_LABELS[r]: int((reg == r).sum()) for r in (1, 0, -1)},
        "ceiling": ceil.summary(),
        "t_star_relative": ceil.t_star / float(np.abs(P).sum(0).max()),
        "median_abs_cos_to_y_eq_x": float(np.median(cos)),
        "joint_negative_that_are_flipped": int(np.isin(np.flatnonzero(reg == -1), flipped).sum()),
        "figures": figs,
    }
    if case == "separable":
        entry.update(_removal_rounds(tr, s, apply, infl, acc, tr_acc, flipped, weight_decay))
        figs["rounds"] = plots.rounds_plot(
            entry["rounds_train_accuracy"],
            out_dir / "separable_rounds.png",
            title="removing joint-negative samples",
            ylabel="training accuracy (given labels)",
        ).get_label()
    return entry


def _removal_rounds(
    tr, s, apply, infl, acc, tr_acc, flipped, weight_decay, n_rounds: int = 3
) -> dict:
    """Remove the joint-negative samples (influence recomputed each round), refit, record."""
    rounds, rounds_train, removed = [acc.tolist()], [tr_acc.tolist()], []
    keep = np.arange(len(tr))
    for _ in range(n_rounds):
        trk = tr.subset(keep)
        _, _, pr = _fit_linear(trk.x, trk.y, 2, weight_decay)
        neg = influence.influence_regions(infl(pr, trk, s.val.x, s.val.y)) == -1
        removed.append(int(neg.sum()))
        keep = keep[~neg]
        trk = tr.subset(keep)
        _, _, pr = _fit_linear(trk.x, trk.y, 2, weight_decay)
        rounds.append(
            train.evaluate(apply, pr, s.test.x.astype(np.float64), s.test.y, 2).accuracy.tolist()
        )
        rounds_train.append(
            train.evaluate(apply, pr, trk.x.astype(np.float64), trk.y, 2).accuracy.tolist()
        )
    return {
        "rounds_test_accuracy": rounds,
        "rounds_train_accuracy": rounds_train,
        "rounds_removed": removed,
        "removed_that_are_flipped": int(
            np.isin(np.setdiff1d(np.arange(len(tr)), keep), flipped).sum()
        ),
    }


def _synthetic_markdown(res: dict) -> list[str]:
    sep = res["separable"]
    return [
        "## Ceiling test",
        "",
        "Influence on the clean validation split. t* is the exact LP's value (relative: divided "
        "by max_k Σ_i |P[i,k]|); |cos| is the cosine between an influence vector and (1, 1): 0 "
        "means on the line y = −x.",
        "",
        io.md_table(
            [
                "case",
                "exact test: improvable",
                "t*",
                "t* relative",
                "certificate λ",
                "PCA ratio (heuristic)",
                "PCA says improvable",
                "median |cos(P_i, (1,1))|",
            ],
            [
                [
                    c,
                    res[c]["ceiling"]["improvable"],
                    f"{res[c]['ceiling']['t_star']:.3g}",
                    f"{res[c]['t_star_relative']:.3g}",
                    np.round(res[c]["ceiling"]["certificate"], 3).tolist(),
                    f"{res[c]['ceiling']['pca_explained_ratio (heuristic)']:.3f}",
                    res[c]["ceiling"]["pca_heuristic_improvable"],
                    f"{res[c]['median_abs_cos_to_y_eq_x']:.3f}",
                ]
                for c in ("separable", "overlapping")
            ],
        ),
        "",
        "Against the training set itself instead: "
        + "; ".join(
            f"{c}: t* relative {res[c]['t_star_relative_train_reference']:.3g}"
            for c in ("separable", "overlapping")
        )
        + " (near zero in both cases: at the training optimum the class gradients of the "
        "training set cancel up to the weight-decay term, so that reference cannot tell the cases "
        "apart).",
        "",
        "Regions: " + "; ".join(f"{c}: {res[c]['regions']}" for c in ("separable", "overlapping")),
        "",
        f"Separable case: {sep['n_flipped']} training labels flipped; "
        f"{sep['joint_negative_that_are_flipped']} of the {sep['regions']['joint-negative']} "
        "joint-negative "
        "samples are flipped ones.",
        "",
        "## Removing joint-negative samples (separable case)",
        "",
        io.md_table(
            [
                "round",
                "removed",
                "train acc class 0",
                "train acc class 1",
                "test acc class 0",
                "test acc class 1",
            ],
            [
                [
                    i,
                    "-" if i == 0 else sep["rounds_removed"][i - 1],
                    f"{a[0]:.3f}",
                    f"{a[1]:.3f}",
                    f"{b[0]:.3f}",
                    f"{b[1]:.3f}",
                ]
                for i, (a, b) in enumerate(
                    zip(sep["rounds_train_accuracy"], sep["rounds_test_accuracy"])
                )
            ],
        ),
        "",
        f"Reference (per-class accuracy on the training labels): {REFERENCE['synthetic_rounds']}. "
        "Training accuracy is measured on the given (noisy) labels of the samples still in the "
        "training set; test labels are clean.",
        "",
        "![](separable_boundary.png) ![](separable_influence.png)",
        "",
        "![](separable_rounds.png)",
        "",
        "![](overlapping_boundary.png) ![](overlapping_influence.png)",
    ]


def reproduce_synthetic(
    out_dir: str = "reports/synthetic",
    *,
    quick: bool = False,
    seed: int = 0,
    weight_decay: float = TrainConfig.weight_decay,
    out=None,
) -> dict:
    """Both 2-D cases with logistic regression (``docs/method.md``), and three rounds of removing
    the joint-negative samples in the improvable case."""
    out = out or sys.stdout
    out_dir = Path(out_dir)
    n = 100 if quick else 200
    res: dict = {"reference_rounds": REFERENCE["synthetic_rounds"]}
    md = [
        "# Synthetic 2-D experiments",
        "",
        f"Logistic regression (2-logit softmax, L2 λ = {weight_decay}) fitted to convergence with "
        f"L-BFGS in float64; {n} points per disk; splits 50/25/25, stratified, seed {seed}. "
        "Influence by the closed form on the validation split.",
        "",
    ]
    with jax.enable_x64(True):
        for case in ("separable", "overlapping"):
            res[case] = _synthetic_case(case, n, seed, weight_decay, out_dir)
    _write(out_dir, "synthetic", res, md + _synthetic_markdown(res), out)
    return res


def _write(out_dir: Path, name: str, res: dict, md: list[str], out) -> None:
    io.write_json(out_dir / f"{name}.json", res)
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    print(text, file=out)
    print(f"wrote {out_dir / 'report.md'}", file=out)


# ----------------------------------------------------------------------------- deletion check


DELETION_MODELS = ("linear", "cnn-features", "cnn")


def _train_cnn(s: data.Splits, tc: train.TrainConfig):
    """The study's CNN (`setup.build_model`, init seed = `tc.seed`) trained on the training
    split: (apply, its final `TrainState`, features)."""
    from .setup import build_model

    apply, params, feats = build_model(ModelConfig("cnn", seed=tc.seed), s, with_features=True)
    state = train.train(models.per_sample_loss(apply), params, s.train.x, s.train.y, tc).state
    return apply, state, feats


def _deletion_linear(xt, s, K, weight_decay, xv, xte):
    """Linear head fitted to convergence (float64): P in closed form, removal = refit."""
    apply, _, params = _fit_linear(xt, s.train.y, K, weight_decay)
    P = np.asarray(
        influence.linear_category_influence(
            params, xt, s.train.y, xv, s.val.y, num_classes=K, weight_decay=weight_decay
        ).P
    )
    base = train.evaluate(apply, params, xte, s.test.y, K).accuracy

    def removed(W):
        """(per-class test accuracy of each refit, of the model without removal)."""
        accs = []
        for w in W:
            _, _, pr = _fit_linear(xt, s.train.y, K, weight_decay, weights=w, init=params)
            accs.append(train.evaluate(apply, pr, xte, s.test.y, K).accuracy)
        return np.stack(accs), base

    return P, removed


def _deletion_cnn(s, K, tc: train.TrainConfig, retrain_epochs: int):
    """The whole CNN: P by Gauss-Newton CG at the trained params; a removal is `retrain_epochs`
    more epochs from the trained state (params and Adam's moments) with the removed samples at
    weight 0, compared with the same epochs with every weight 1 (the base, trained in the same
    vmapped population as the removals, so both see the same batch order and arithmetic)."""
    apply, state, _ = _train_cnn(s, tc)
    loss_fn = models.per_sample_loss(apply)
    cfg = InfluenceConfig(curvature="gauss_newton", damping="auto")
    P = np.asarray(
        influence.category_influence(
            train.Objective.of(loss_fn, tc),
            state.params,
            s.train.x,
            s.train.y,
            s.val.x,
            s.val.y,
            num_classes=K,
            config=cfg,
            apply=apply,
        ).P
    )
    n = len(s.train)
    ep = train.make_epoch_fn(loss_fn, tc, n, population=True)
    x, y = jnp.asarray(s.train.x), jnp.asarray(s.train.y)

    def removed(W):
        """(per-class test accuracy after each removal's epochs, after the same epochs without)."""
        W = np.vstack([np.ones((1, n)), W])  # row 0: the base
        M = W.shape[0]
        p, o = (
            train.broadcast_population(state.params, M),
            train.broadcast_population(state.opt_state, M),
        )
        for e in range(retrain_epochs):
            p, o, _ = ep(p, o, x, y, jnp.asarray(W, jnp.float32), tc.epochs + e)
        acc = np.stack(
            [
                train.evaluate(
                    apply, jax.tree_util.tree_map(lambda a: a[i], p), s.test.x, s.test.y, K
                ).accuracy
                for i in range(M)
            ]
        )
        return acc[1:], acc[0]

    return P, removed


def reproduce_deletion(
    dataset: str = "digits",
    out_dir: str | None = None,
    *,
    quick: bool = False,
    seed: int = 0,
    features: str | None = None,
    weight_decay: float = TrainConfig.weight_decay,
    fraction: float = 0.1,
    path: str | None = None,
    model: str = "linear",
    retrain_epochs: int = 3,
    out=None,
) -> dict:
    """Per class t, remove the top `fraction` (beneficial) or the bottom `fraction`
    (detrimental) of training samples by P[:, t], retrain, and correlate the removed set's
    summed influence with the actual per-class test-accuracy change over all K×K cells.

    `model` (digits, mnist5k): "linear" (softmax on pixels, refit to convergence), "cnn-features"
    (a trained CNN's penultimate layer as fixed features, a linear head on them: last-layer
    influence) or "cnn" (the whole CNN: Gauss-Newton CG influence, removals retrained for
    `retrain_epochs` epochs from the trained CNN against the same epochs without removal)."""
    out = out or sys.stdout
    text = dataset in ("emotion", "ag_news")
    checks.check_choice(model, "model", DELETION_MODELS)
    if model != "linear" and dataset not in ("digits", "mnist5k"):
        checks.fail(
            "model",
            model,
            "'linear' for this dataset (the CNN variants are for digits and mnist5k)",
            "drop --model, or use --dataset digits / mnist5k",
        )
    out_dir = Path(
        out_dir or f"reports/deletion_{dataset}" + ("" if model == "linear" else f"_{model}")
    )
    feats = features or ("tfidf" if quick else "minilm") if text else "tfidf"
    max_train = (600 if quick else None) if dataset != "emotion" else (1200 if quick else 6000)
    s = datasets.load_splits(dataset, seed=seed, features=feats, max_train=max_train, path=path)
    K, names = s.num_classes, s.class_names
    from .study import CNN_TRAIN

    tc = dataclasses.replace(CNN_TRAIN, epochs=4 if quick else CNN_TRAIN.epochs, seed=seed)
    what = {
        "linear": f"Linear softmax head on {'pixels' if not text else feats + ' features'} "
        f"({s.train.x.shape[1]} dims), L2 λ = {weight_decay}, fitted to convergence with L-BFGS "
        "(float64); influence in closed form; a removal is a refit",
        "cnn-features": f"A CNN (conv 8-16, dense 64) trained {tc.epochs} epochs (Adam); its "
        "penultimate "
        f"layer (64 features) fixed, a linear softmax head on it (L2 λ = {weight_decay}) "
        "fitted to convergence (float64): last-layer influence in closed form; a removal "
        "refits the head",
        "cnn": f"The whole CNN (conv 8-16, dense 64) trained {tc.epochs} epochs (Adam, L2 λ = "
        f"{tc.weight_decay}); influence by Gauss-Newton CG at the trained params; a removal is "
        f"{retrain_epochs} more epochs from the trained state (params and Adam's moments) with the "
        f"removed samples at weight 0, against the same {retrain_epochs} epochs with every sample "
        "(the base), all in one vmapped population",
    }[model]
    md = [
        f"# Deletion check: {dataset}" + ("" if model == "linear" else f" ({model})"),
        "",
        f"{what}. {len(s.train)} train / {len(s.val)} val / {len(s.test)} test. Influence on the "
        f"validation split; accuracy changes on the held-out test split. "
        f"Removed sets: {fraction:.0%} of the training set per class and direction.",
        "",
    ]
    m = max(1, int(round(fraction * len(s.train))))
    with jax.enable_x64(model != "cnn"):
        if model == "cnn":
            P, removed = _deletion_cnn(s, K, tc, retrain_epochs)
        else:
            xs_ = (s.train.x, s.val.x, s.test.x)
            if model == "cnn-features":
                with jax.enable_x64(False):
                    _, cnn_state, feats_fn = _train_cnn(s, tc)
                    xs_ = [
                        np.asarray(models.frozen_features(feats_fn, cnn_state.params, x_))
                        for x_ in xs_
                    ]
            xt, xv, xte = (np.asarray(x_, np.float64) for x_ in xs_)
            P, removed = _deletion_linear(xt, s, K, weight_decay, xv, xte)
        orders = [np.argsort(-P[:, t], kind="stable") for t in range(K)]
        sets = {"beneficial": [o[:m] for o in orders], "detrimental": [o[-m:] for o in orders]}
        W = np.ones((2 * K, len(s.train)))
        for j, idx in enumerate(sets["beneficial"] + sets["detrimental"]):
            W[j, idx] = 0.0
        acc, base = removed(W)
    infl, dacc, comp = {}, {}, {}
    for j, kind in enumerate(("beneficial", "detrimental")):
        infl[kind] = np.stack([P[idx].sum(0) for idx in sets[kind]])
        dacc[kind] = acc[j * K : (j + 1) * K] - base
        comp[kind] = np.stack([np.bincount(s.train.y[idx], minlength=K) for idx in sets[kind]])
    xs = np.concatenate([infl["beneficial"].ravel(), infl["detrimental"].ravel()])
    ys = np.concatenate([dacc["beneficial"].ravel(), dacc["detrimental"].ravel()])
    rho = float(scipy.stats.spearmanr(xs, ys)[0])
    rho_b = float(scipy.stats.spearmanr(infl["beneficial"].ravel(), dacc["beneficial"].ravel())[0])
    rho_d = float(
        scipy.stats.spearmanr(infl["detrimental"].ravel(), dacc["detrimental"].ravel())[0]
    )
    figs = _deletion_figures(dataset, names, infl, dacc, comp, rho, out_dir)
    res = {
        "dataset": dataset,
        "model": model,
        "features": feats if text else "pixels",
        "n_train": len(s.train),
        "spearman_all": rho,
        "spearman_beneficial": rho_b,
        "spearman_detrimental": rho_d,
        "reference": REFERENCE["deletion_spearman"],
        "base_test_accuracy": np.asarray(base).tolist(),
        "summed_influence": {k: v.tolist() for k, v in infl.items()},
        "accuracy_change": {k: v.tolist() for k, v in dacc.items()},
        "label_composition": {k: v.tolist() for k, v in comp.items()},
        "figures": figs,
    }
    _write(out_dir, "deletion", res, md + _deletion_markdown(res, dacc), out)
    return res


def _deletion_figures(dataset, names, infl, dacc, comp, rho, out_dir) -> dict:
    K = len(names)
    xs = np.concatenate([infl["beneficial"].ravel(), infl["detrimental"].ravel()])
    ys = np.concatenate([dacc["beneficial"].ravel(), dacc["detrimental"].ravel()])
    labels = ["beneficial removed"] * K * K + ["detrimental removed"] * K * K
    figs = {
        "scatter": plots.deletion_scatter(
            xs,
            ys,
            labels,
            out_dir / "scatter.png",
            title=f"{dataset}: removal vs accuracy change",
            rho=rho,
        ).get_label()
    }
    for kind in ("beneficial", "detrimental"):
        figs[f"influence_{kind}"] = plots.heatmap(
            infl[kind],
            out_dir / f"influence_{kind}.png",
            title=f"summed influence, {kind} removed",
            class_names=names,
            xlabel="class k",
            ylabel="removal targeted at class t",
            cbar="Σ P[i, k]",
        ).get_label()
        figs[f"accuracy_{kind}"] = plots.heatmap(
            100 * dacc[kind],
            out_dir / f"accuracy_{kind}.png",
            title=f"test accuracy change, {kind} removed",
            class_names=names,
            xlabel="class k",
            ylabel="removal targeted at class t",
            cbar="points",
            fmt="{:.0f}",
        ).get_label()
        figs[f"composition_{kind}"] = plots.heatmap(
            comp[kind],
            out_dir / f"composition_{kind}.png",
            title=f"labels of the {kind} removed sets",
            class_names=names,
            xlabel="label of removed sample",
            ylabel="removal targeted at class t",
            cbar="samples",
            fmt="{:.0f}",
        ).get_label()
    return figs


def _deletion_markdown(res: dict, dacc: dict) -> list[str]:
    rho, rho_b, rho_d = res["spearman_all"], res["spearman_beneficial"], res["spearman_detrimental"]
    diag_b = np.diag(dacc["beneficial"]).mean() * 100
    diag_d = np.diag(dacc["detrimental"]).mean() * 100
    return [
        "## Result",
        "",
        io.md_table(
            ["cells", "Spearman ρ (summed influence vs accuracy change)"],
            [
                ["all 2·K·K", f"{rho:.3f}"],
                ["beneficial removed (K·K)", f"{rho_b:.3f}"],
                ["detrimental removed (K·K)", f"{rho_d:.3f}"],
            ],
        ),
        "",
        f"Reference: {REFERENCE['deletion_spearman']}.",
        "",
        f"Mean accuracy change of the targeted class itself: {diag_b:+.1f} points when its most "
        f"beneficial samples are removed, {diag_d:+.1f} points when its most detrimental are "
        "removed.",
        "",
        "![](scatter.png)",
        "",
        "![](influence_beneficial.png) ![](accuracy_beneficial.png)",
        "",
        "![](influence_detrimental.png) ![](accuracy_detrimental.png)",
        "",
        "![](composition_beneficial.png) ![](composition_detrimental.png)",
    ]


# ----------------------------------------------------------------------------- improvement


def reproduce_frontier(
    out_dir: str = "reports/frontier",
    *,
    quick: bool = False,
    seed: int = 0,
    dataset: str | None = None,
    retrain: str = "converge",
    out=None,
) -> dict:
    """The controlled label-noise case in one seed: Direct Improvement, Course Correction (with
    baselines) and the first-order Pareto frontier checked by retraining, as a report. The
    improvement study over datasets and seeds is `reproduce_improve`."""
    out = out or sys.stdout
    from . import experiments

    out_dir = Path(out_dir)
    ds = dataset or ("digits" if quick else "mnist5k")
    alpha_min = 0.95
    scfg = SearchConfig(
        population=8 if quick else 16,
        generations=3 if quick else 6,
        seed=seed,
        retrain=retrain,
        alpha_range=(alpha_min, 1.0),
        reweight=ReweightConfig.downweight_only(),
    )
    cfg = ImproveConfig(
        data=DataConfig(name=ds, seed=seed),
        search=scfg,
        out_dir=str(out_dir),
        alpha_min=alpha_min,
        rounds=1 if quick or retrain != "converge" else 3,
    )
    rep = experiments.run_improve(cfg, progress=not quick, out=out)
    names = rep["class_names"]
    md = [
        f"# Improvement: {ds}",
        "",
        f"Label noise: {cfg.noise_fraction:.0%} of the training samples of classes "
        f"{list(cfg.noise_classes)} flipped to random other classes (validation and test clean). "
        f"Linear softmax, {cfg.train.epochs} epochs of Adam (lr {cfg.train.learning_rate}). "
        f"Search: population {scfg.population}, {scfg.generations} generations, genome = α "
        f"(initial population drawn from [{alpha_min}, 1]^K, mutation may leave it) and a trust "
        "region ρ, weights in [1 − ρ, 1] (down-weighting only); candidates retrained by "
        f"'{retrain}' (Direct "
        "Improvement) and one weighted epoch (Course Correction); selection on validation, "
        "changes below on test. 'iterated' = up to "
        f"{cfg.rounds} rounds of Direct Improvement, each from the previous round's refitted "
        "model with P recomputed for its weighted objective, kept only while no validation "
        "class gets worse. 'val-matched' = the baseline's weights scaled toward 1, "
        "w_t = 1 + t·(w − 1), with t picked on validation by the search's own rule (no other "
        "class worse, then the largest target gain): the baselines at the search's validation "
        "harm.",
        "",
    ]
    figs = {}
    for key, title in (
        ("direct", "Direct Improvement"),
        ("course_correction", "Course Correction"),
    ):
        blk = rep.get(key)
        if not blk or "skipped" in blk:
            md += [f"## {title}", "", "skipped: " + (blk or {}).get("skipped", "not run"), ""]
            continue
        rows = []
        for name, r in blk["rows"].items():
            rows.append(
                [name]
                + [f"{v:+.1f}" for v in r["target_test_points"]]
                + [f"{r['worst_other_test_points']:+.1f}"]
            )
        md += [
            f"## {title} (epoch {blk['epoch']})",
            "",
            io.md_table(
                ["method"]
                + [f"class {names[t]} (test, points)" for t in blk["targets"]]
                + ["worst other class (points)"],
                rows,
            ),
            "",
            f"Best α: {np.round(blk['best_alpha'], 3).tolist()}, ρ = {blk['best_rho']}; "
            f"validation fitness {blk['best_fitness']:.3f}; found = {blk['found']}. "
            "Matched steps t: "
            + ", ".join(f"{n} {t:g}" for n, t in blk.get("matched_t", {}).items())
            + ".",
            "",
        ]
        M = [
            100 * (np.asarray(r["test_acc"]) - np.asarray(blk["ref_test"]))
            for r in blk["rows"].values()
        ]
        figs[key] = plots.bars(
            list(blk["rows"]),
            M,
            out_dir / f"{key}.png",
            title=f"{title}: test accuracy change per class",
            ylabel="points",
            class_names=names,
        ).get_label()
        md += [f"![]({key}.png)", ""]
    fr = rep.get("frontier")
    if fr:
        a, b = cfg.noise_classes[:2]
        figs["frontier"] = plots.frontier_plot(
            np.asarray(fr["gains"]),
            np.asarray(fr["ceiling_loss_decrease"]),
            a,
            b,
            out_dir / "frontier.png",
            class_names=names,
            verified=fr["verified"],
        ).get_label()
        md += [
            "## Pareto frontier (first order, trust region ρ = %s)" % fr["rho"],
            "",
            io.md_table(
                ["class"] + list(names),
                [
                    ["estimated ceiling (val-loss decrease)"]
                    + [f"{v:.3f}" for v in fr["ceiling_loss_decrease"]]
                ],
            ),
            "",
            f"Retrained at {len(fr['verified'])} frontier points: predicted vs actual per-class "
            f"validation-loss change, Spearman {fr['spearman_predicted_vs_actual']:.3f}, Pearson "
            f"{fr['pearson_predicted_vs_actual']:.3f}.",
            "",
            "![](frontier.png)",
        ]
    rep["figures"] = figs
    _write(out_dir, "improve_report", rep, md, out)
    return rep


def reproduce_improve(
    out_dir: str = "reports/improve",
    *,
    datasets=None,
    seeds: int | None = None,
    quick: bool = False,
    resume: bool = False,
    out=None,
) -> dict:
    """The improvement study (`pareto_jax.study`): every dataset of `study.SETTINGS` (or the
    given ones) over `seeds` seeds (5; 1 with `quick`), written as one report."""
    from . import study

    datasets = tuple(datasets) if datasets else tuple(study.SETTINGS)
    return study.reproduce_study(
        datasets,
        seeds=seeds or (1 if quick else 5),
        quick=quick,
        out_dir=out_dir,
        resume=resume,
        out=out,
    )
