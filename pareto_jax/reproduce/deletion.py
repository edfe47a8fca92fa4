"""The deletion check: remove the most beneficial / detrimental samples per class, retrain, and
correlate the removed influence with the actual per-class change (``docs/method.md`` §7)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from .. import checks, data, datasets, influence, io, models, plots, train
from ..config import InfluenceConfig, ModelConfig, TrainConfig
from .common import REFERENCE, fit_linear, write

DELETION_MODELS = ("linear", "cnn-features", "cnn")


def _train_cnn(s: data.Splits, tc: train.TrainConfig):
    """The study's CNN (`setup.build`, init seed = `tc.seed`) trained on the training split:
    (apply, its final `TrainState`, features, the nnx module)."""
    from ..setup import build

    b = build(ModelConfig("cnn", seed=tc.seed), s)
    state = train.train(models.per_sample_loss(b.apply), b.params, s.train.x, s.train.y, tc).state
    return b.apply, state, b.features, b.module


def _deletion_linear(xt, s, K, weight_decay, xv, xte):
    """Linear head fitted to convergence (float64): P in closed form, removal = refit."""
    apply, _, params = fit_linear(xt, s.train.y, K, weight_decay)
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
            _, _, pr = fit_linear(xt, s.train.y, K, weight_decay, weights=w, init=params)
            accs.append(train.evaluate(apply, pr, xte, s.test.y, K).accuracy)
        return np.stack(accs), base

    return P, removed


def _deletion_cnn(s, K, tc: train.TrainConfig, retrain_epochs: int):
    """The whole CNN: P by EK-FAC (`InfluenceConfig.for_product`) at the trained params; a
    removal is `retrain_epochs` more epochs from the trained state (params and Adam's moments)
    with the removed samples at weight 0, compared with the same epochs with every weight 1 (the
    base, trained in the same vmapped population as the removals, so both see the same batch
    order and arithmetic)."""
    apply, state, _, module = _train_cnn(s, tc)
    loss_fn = models.per_sample_loss(apply)
    P = np.asarray(
        influence.category_influence(train.Objective.of(loss_fn, tc), state.params, s.train.x,
            s.train.y, s.val.x, s.val.y, num_classes=K, config=InfluenceConfig.for_product(),
            apply=apply, model=module).P
    )
    n = len(s.train)
    ep = train.make_epoch_fn(loss_fn, tc, n, population=True)
    x, y = jnp.asarray(s.train.x), jnp.asarray(s.train.y)

    def removed(W):
        """(per-class test accuracy after each removal's epochs, after the same epochs without)."""
        W = np.vstack([np.ones((1, n)), W])  # row 0: the base
        M = W.shape[0]
        p, o = (train.broadcast_population(state.params, M),
            train.broadcast_population(state.opt_state, M))
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


def _setting_text(model, text, feats, s, weight_decay, tc, retrain_epochs) -> str:
    """The report's description of the model and of what a removal is."""
    return {
        "linear": f"Linear softmax head on {'pixels' if not text else feats + ' features'} "
        f"({s.train.x.shape[1]} dims), L2 λ = {weight_decay}, fitted to convergence with L-BFGS "
        "(float64); influence in closed form; a removal is a refit",
        "cnn-features": f"A CNN (conv 8-16, dense 64) trained {tc.epochs} epochs (Adam); its "
        "penultimate "
        f"layer (64 features) fixed, a linear softmax head on it (L2 λ = {weight_decay}) "
        "fitted to convergence (float64): last-layer influence in closed form; a removal "
        "refits the head",
        "cnn": f"The whole CNN (conv 8-16, dense 64) trained {tc.epochs} epochs (Adam, L2 λ = "
        f"{tc.weight_decay}); influence by EK-FAC at the trained params; a removal is "
        f"{retrain_epochs} more epochs from the trained state (params and Adam's moments) with the "
        f"removed samples at weight 0, against the same {retrain_epochs} epochs with every sample "
        "(the base), all in one vmapped population",
    }[model]


def _removals(model, s, K, tc, retrain_epochs, weight_decay, m):
    """(P, the removed sets per class and direction, per-class test accuracy after each removal,
    the base's): the influence and the 2K retrainings of the chosen model."""
    with jax.enable_x64(model != "cnn"):
        if model == "cnn":
            P, removed = _deletion_cnn(s, K, tc, retrain_epochs)
        else:
            xs_ = (s.train.x, s.val.x, s.test.x)
            if model == "cnn-features":
                with jax.enable_x64(False):
                    _, cnn_state, feats_fn, _ = _train_cnn(s, tc)
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
    return P, sets, acc, base


def reproduce_deletion(dataset: str = "digits", out_dir: str | None = None, *, quick: bool = False,
    seed: int = 0, features: str | None = None, weight_decay: float = TrainConfig.weight_decay,
    fraction: float = 0.1, path: str | None = None, model: str = "linear", retrain_epochs: int = 3,
    out=None) -> dict:
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
        checks.fail("model", model,
            "'linear' for this dataset (the CNN variants are for digits and mnist5k)",
            "drop --model, or use --dataset digits / mnist5k")
    out_dir = Path(
        out_dir or f"reports/deletion_{dataset}" + ("" if model == "linear" else f"_{model}")
    )
    feats = features or ("tfidf" if quick else "minilm") if text else "tfidf"
    max_train = (600 if quick else None) if dataset != "emotion" else (1200 if quick else 6000)
    s = datasets.load_splits(dataset, seed=seed, features=feats, max_train=max_train, path=path)
    K, names = s.num_classes, s.class_names
    from ..study_settings import CNN_TRAIN

    tc = dataclasses.replace(CNN_TRAIN, epochs=4 if quick else CNN_TRAIN.epochs, seed=seed)
    what = _setting_text(model, text, feats, s, weight_decay, tc, retrain_epochs)
    md = [
        f"# Deletion check: {dataset}" + ("" if model == "linear" else f" ({model})"),
        "",
        f"{what}. {len(s.train)} train / {len(s.val)} val / {len(s.test)} test. Influence on the "
        f"validation split; accuracy changes on the held-out test split. "
        f"Removed sets: {fraction:.0%} of the training set per class and direction.",
        "",
    ]
    m = max(1, int(round(fraction * len(s.train))))
    P, sets, acc, base = _removals(model, s, K, tc, retrain_epochs, weight_decay, m)
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
    res = {"dataset": dataset, "model": model, "features": feats if text else "pixels",
        "n_train": len(s.train), "spearman_all": rho, "spearman_beneficial": rho_b,
        "spearman_detrimental": rho_d, "reference": REFERENCE["deletion_spearman"],
        "base_test_accuracy": np.asarray(base).tolist(),
        "summed_influence": {k: v.tolist() for k, v in infl.items()},
        "accuracy_change": {k: v.tolist() for k, v in dacc.items()},
        "label_composition": {k: v.tolist() for k, v in comp.items()}, "figures": figs}
    write(out_dir, "deletion", res, md + _deletion_markdown(res, dacc), out)
    return res


def _deletion_figures(dataset, names, infl, dacc, comp, rho, out_dir) -> dict:
    K = len(names)
    xs = np.concatenate([infl["beneficial"].ravel(), infl["detrimental"].ravel()])
    ys = np.concatenate([dacc["beneficial"].ravel(), dacc["detrimental"].ravel()])
    labels = ["beneficial removed"] * K * K + ["detrimental removed"] * K * K
    figs = {
        "scatter": plots.deletion_scatter(xs, ys, labels, out_dir / "scatter.png",
            title=f"{dataset}: removal vs accuracy change", rho=rho).get_label()
    }
    for kind in ("beneficial", "detrimental"):
        figs[f"influence_{kind}"] = plots.heatmap(infl[kind], out_dir / f"influence_{kind}.png",
            title=f"summed influence, {kind} removed", class_names=names, xlabel="class k",
            ylabel="removal targeted at class t", cbar="Σ P[i, k]").get_label()
        figs[f"accuracy_{kind}"] = plots.heatmap(100 * dacc[kind], out_dir / f"accuracy_{kind}.png",
            title=f"test accuracy change, {kind} removed", class_names=names, xlabel="class k",
            ylabel="removal targeted at class t", cbar="points", fmt="{:.0f}").get_label()
        figs[f"composition_{kind}"] = plots.heatmap(comp[kind], out_dir / f"composition_{kind}.png",
            title=f"labels of the {kind} removed sets", class_names=names,
            xlabel="label of removed sample", ylabel="removal targeted at class t", cbar="samples",
            fmt="{:.0f}").get_label()
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
            [["all 2·K·K", f"{rho:.3f}"], ["beneficial removed (K·K)", f"{rho_b:.3f}"],
                ["detrimental removed (K·K)", f"{rho_d:.3f}"]],
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
