"""The improvement reproductions: the one-seed label-noise report (`reproduce_frontier`) and the
study over datasets and seeds (`reproduce_improve`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import io, plots
from ..config import DataConfig, ImproveConfig, ReweightConfig, SearchConfig
from .common import write


def reproduce_frontier(out_dir: str = "reports/frontier", *, quick: bool = False, seed: int = 0,
    dataset: str | None = None, retrain: str = "converge", out=None) -> dict:
    """The controlled label-noise case in one seed: Direct Improvement, Course Correction (with
    baselines) and the first-order Pareto frontier checked by retraining, as a report. The
    improvement study over datasets and seeds is `reproduce_improve`."""
    out = out or sys.stdout
    from .. import experiments

    out_dir = Path(out_dir)
    ds = dataset or ("digits" if quick else "mnist5k")
    alpha_min = 0.95
    scfg = SearchConfig(population=8 if quick else 16, generations=3 if quick else 6, seed=seed,
        retrain=retrain, alpha_range=(alpha_min, 1.0), reweight=ReweightConfig.downweight_only())
    cfg = ImproveConfig(data=DataConfig(name=ds, seed=seed), search=scfg, out_dir=str(out_dir),
        alpha_min=alpha_min, rounds=1 if quick or retrain != "converge" else 3)
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
    figs: dict = {}
    for key, title in (("direct", "Direct Improvement"), ("course_correction", "Course Correction")
    ):
        md += _block_markdown(rep, key, title, names, out_dir, figs)
    md += _frontier_markdown(rep, cfg, names, out_dir, figs)
    rep["figures"] = figs
    write(out_dir, "improve_report", rep, md, out)
    return rep


def reproduce_improve(out_dir: str = "reports/improve", *, datasets=None, seeds: int | None = None,
    quick: bool = False, resume: bool = False, out=None) -> dict:
    """The improvement study (`pareto_jax.study`): every dataset of `study.SETTINGS` (or the
    given ones) over `seeds` seeds (5; 1 with `quick`), written as one report."""
    from .. import study

    datasets = tuple(datasets) if datasets else tuple(study.SETTINGS)
    return study.reproduce_study(datasets, seeds=seeds or (1 if quick else 5), quick=quick,
        out_dir=out_dir, resume=resume, out=out)


def _block_markdown(rep, key, title, names, out_dir, figs) -> list[str]:
    """One improvement block's table, best program and figure (into `figs`)."""
    blk = rep.get(key)
    if not blk or "skipped" in blk:
        return [f"## {title}", "", "skipped: " + (blk or {}).get("skipped", "not run"), ""]
    md, rows = [], []
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
            + [f"class {io.md_escape(names[t])} (test, points)" for t in blk["targets"]]
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
    figs[key] = plots.bars(list(blk["rows"]), M, out_dir / f"{key}.png",
        title=f"{title}: test accuracy change per class", ylabel="points", class_names=names
    ).get_label()
    md += [f"![]({key}.png)", ""]
    return md


def _frontier_markdown(rep, cfg, names, out_dir, figs) -> list[str]:
    """The frontier section: the estimated ceiling per class and the retrained points' check."""
    md: list[str] = []
    fr = rep.get("frontier")
    if not fr:
        return []
    a, b = cfg.noise_classes[:2]
    figs["frontier"] = plots.frontier_plot(np.asarray(fr["gains"]),
        np.asarray(fr["ceiling_loss_decrease"]), a, b, out_dir / "frontier.png", class_names=names,
        verified=fr["verified"]).get_label()
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
    return md
