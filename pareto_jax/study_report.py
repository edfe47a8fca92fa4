"""The improvement study's report: per-dataset Markdown tables, the paper table and figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import io, plots
from .study_settings import PAPER_CIFAR10, SEARCH_ROW, SETTINGS


def _fmt(iv: dict, digits: int = 1) -> str:
    if not iv or iv.get("n", 0) == 0:
        return "–"
    if iv["n"] == 1:
        return f"{iv['mean']:+.{digits}f}"
    return f"{iv['mean']:+.{digits}f} ± {iv['half_width']:.{digits}f}"


def _fmt_test(t: dict | None) -> str:
    if not t:
        return "(reference)"
    star = " *" if t["p"] < 0.05 else ""
    return f"{t['net']:+d} (p = {t['p']:.2g}){star}"


INTRO = (
    "Direct Improvement (one weighted epoch from the last checkpoint θ^e against θ^e) and Course "
    "Correction (one weighted epoch from the checkpoint whose ordinary successor dropped some "
    "validation classes, against that successor), each beside the baselines of "
    "`evaluation.baseline_weights` and the same baselines scaled to the search's validation harm "
    '("val-matched"). Targets: the classes weakest on validation. Every change is on the held-out '
    "test split, in accuracy points, as mean ± the half-width of the 95 % t-interval over seeds "
    "(each seed changes the split where the dataset has none of its own, the initialisation, the "
    "batch order and the search). 'net (p)': test samples a method gets right that the plain extra "
    "epoch (the unweighted baseline) gets wrong, minus the reverse, pooled over seeds, with the "
    "exact McNemar p-value; * marks p < 0.05. The null hypothesis is that, in every seed, a test "
    "sample that only one of the two models gets right is equally likely to be either's (a fair "
    "coin), which makes the pooled test exact; it speaks of these test samples under the training "
    "randomness (on Emotion every seed scores the same test file), not of new data. The per-class "
    "tests are many (classes × methods) and not corrected for multiplicity: read them as pointers, "
    "and the targets' and other classes' pooled tests as the answer."
)


def dataset_markdown(name: str, res: dict) -> list[str]:
    st = SETTINGS[name]
    md = [f"## {name}", "", st.description + ".", "",
        f"Seeds: {res['seeds']}; run time {res['seconds']:.0f} s (sum over seeds, 2 CPU cores).", ""
    ]
    for mode, title in (("direct", "Direct Improvement"), ("course_correction", "Course Correction")
    ):
        md += _mode_markdown(res, mode, title)
    return md


def _mode_markdown(res: dict, mode: str, title: str) -> list[str]:
    """One mode's section of a dataset (Direct Improvement or Course Correction)."""
    md: list[str] = []
    s = res["summary"].get(mode)
    if s is None:
        return md + [f"### {title}", "", "skipped in every seed (no class dropped between epochs).",
            ""]
    md += [
        f"### {title} ({s['n_seeds']} seeds; improving every target on validation in {s['found']})",
        "",
        (
            "Targets per seed (the classes weakest on validation at θ^e): "
            if mode == "direct"
            else "Targets per seed (the classes whose validation accuracy the ordinary epoch "
            "lowered): "
        )
        + "; ".join(f"seed {sd}: {', '.join(t)}" for sd, t in zip(s["seeds"], s["targets"]))
        + ".",
        "",
    ]
    rows = []
    for m, v in s["methods"].items():
        mc = v["mcnemar_vs_extra_epoch"]
        rows.append(
            [
                m
                + (
                    ""
                    if v["n"] == s["n_seeds"]
                    else f" (answered in {v['n']} of {s['n_seeds']} seeds)"
                ),
                _fmt(v["target_gain"]),
                _fmt(v["least_target_gain"]),
                _fmt(v["worst_other"]),
                _fmt_test(mc and mc["targets"]),
                _fmt_test(mc and mc["others"]),
            ]
        )
    md += [
        io.md_table(
            ["method", "mean target gain (points)", "least target gain", "worst other class",
                "targets vs extra epoch: net samples (McNemar p)", "other classes: net (p)"],
            rows,
        ),
        "",
    ]
    if SEARCH_ROW in s["methods"] and s["methods"][SEARCH_ROW]["mcnemar_vs_extra_epoch"]:
        pc = s["methods"][SEARCH_ROW]["mcnemar_vs_extra_epoch"]["per_class"]
        md += [
            "Search against the plain extra epoch, per class (test samples gained − lost, "
            "pooled over seeds; exact McNemar p):",
            "",
            io.md_table(["class"] + [io.md_escape(c) for c in res["class_names"]],
                [["net (p)"] + [_fmt_test(t) for t in pc]]),
            "",
        ]
    md += _matched_harm_markdown(s, res)
    fig = res["figures"].get(mode)
    if fig:
        md += [f"![]({fig})", ""]
    return md


def _matched_harm_markdown(s: dict, res: dict) -> list[str]:
    """The best method at matched validation harm, each influence-based method against the best
    val-matched baseline, and (where that baseline beats the search beyond the interval) why."""
    b = s["best_at_matched_harm"]
    if not b:
        return []
    md = [
        f"Best at matched validation harm: **{b['method']}**, mean target gain "
        f"{_fmt(b['target_gain'])} points, worst other class {_fmt(b['worst_other'])}.",
        "",
    ]
    vs = b.get("vs_best_baseline") or (
        {SEARCH_ROW: b["search_minus_best_baseline"]} if "search_minus_best_baseline" in b else {}
    )
    if vs:
        rows = []
        for m, d in vs.items():
            where = (
                "" if d["n"] < 2 else ("beyond" if abs(d["mean"]) > d["half_width"] else "within")
            )
            rows.append(
                [m, _fmt(d), where and f"{where} (a {'gain' if d['mean'] > 0 else 'loss'})"]
            )
        md += [
            f"Target gain minus that of the best val-matched baseline ({b['best_baseline']}), "
            "paired "
            "over seeds (points; the 95 % interval):",
            "",
            io.md_table(["method", "difference", "beyond the interval?"], rows),
            "",
        ]
    d = b.get("search_minus_best_baseline")
    if d and d["n"] > 1 and d["mean"] < -d["half_width"]:
        md += _why_lost(s, b["best_baseline"], [io.md_escape(c) for c in res["class_names"]])
    return md


def _why_lost(s: dict, winner: str, class_names) -> list[str]:
    """Where a baseline beats the search at matched harm: per class, the mean test change of
    both and what the search's program predicted (first-order validation-loss change)."""
    a, w = s["methods"][SEARCH_ROW]["per_class_points"], s["methods"][winner]["per_class_points"]
    pred = s.get("search_predicted_loss_change")
    rows = [
        [c, f"{x:+.1f}", f"{y:+.1f}", "–" if pred is None else f"{p:+.4f}"]
        for c, x, y, p in zip(class_names, a, w, pred or [None] * len(a))
    ]
    pays = [class_names[k] for k in range(len(a)) if a[k] < w[k] - 1.0]
    return [
        f"The search loses to {winner} here (beyond the interval). Per class, mean over seeds "
        "(test points against the "
        "reference, and the search program's predicted change of the validation loss, negative = "
        "predicted better; the targets differ between seeds):",
        "",
        io.md_table(["class", "search", winner, "search: predicted val-loss change"], rows),
        "",
        (
            "Classes where the search ends more than a point below it: " + ", ".join(pays) + "."
            if pays
            else "No class is more than a point below it; the difference is spread thin."
        ),
        "",
    ]


def paper_table(results: dict) -> list[str]:
    """Method × dataset, Direct Improvement: mean target gain / worst other class as relative
    per-class changes (the paper's unit, %), with the paper's CIFAR-10 figures in their own
    column."""
    names = list(results)
    methods = list(
        dict.fromkeys(
            m
            for r in results.values()
            for m in (r["summary"].get("direct") or {"methods": {}})["methods"]
        )
    )
    rows = []
    for m in methods:
        row = [m]
        for n in names:
            v = (results[n]["summary"].get("direct") or {"methods": {}})["methods"].get(m)
            row.append(
                "–"
                if v is None
                else f"{_fmt(v['target_gain_relative_pct'])} / "
                f"{_fmt(v['worst_other_relative_pct'])}"
            )
        g = PAPER_CIFAR10["target_gain_relative_pct"]
        row.append(
            f"+{np.mean(g):.1f} (targets +{g[0]:.0f}, +{g[1]:.0f}) / "
            f"{PAPER_CIFAR10['worst_other_relative_pct']:+.1f}"
            if m == SEARCH_ROW
            else "–"
        )
        rows.append(row)
    return [
        "## Direct Improvement, every dataset (relative change per class, %: mean target gain / "
        "worst other class, mean ± 95 % interval over seeds)",
        "",
        io.md_table(["method"] + names + [PAPER_CIFAR10["dataset"]], rows),
        "",
        "The last column is the original paper's CIFAR-10 result (targets 0 and 2, epoch 10 → 11): "
        "another dataset and a much larger model, shown for scale only.",
        "",
    ]


def figure(name: str, mode: str, summary: dict, out_dir: Path) -> str:
    ms = list(summary["methods"])
    vals = np.array(
        [
            [summary["methods"][m]["target_gain"]["mean"],
                summary["methods"][m]["worst_other"]["mean"]]
            for m in ms
        ]
    )
    err = np.array(
        [
            [summary["methods"][m]["target_gain"]["half_width"],
                summary["methods"][m]["worst_other"]["half_width"]]
            for m in ms
        ]
    )
    fig = plots.interval_bars(
        ms,
        vals,
        err,
        ["mean target gain", "worst other class"],
        out_dir / f"{name}_{mode}.png",
        title=f"{name}, {mode.replace('_', ' ')}: test points, 95 % intervals "
        f"over {summary['n_seeds']} seeds",
        ylabel="points",
    )
    return fig.get_label()
