"""The run's report: the per-class table, the McNemar test per class, the sentence on harm, and
`write_report` (``pareto-jax report RUN_DIR``: report.md with figures from a finished run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import checks, influence, io, pareto, plots, stats


def format_table(class_names, columns: dict[str, Any], *, fmt: str = "{:.3f}",
    label: str = "class") -> str:
    """A plain-text table: one row per class (or per `label`), one column per named array."""
    names = [str(c) for c in class_names]
    w0 = max(len(label), *(len(n) for n in names))
    heads = list(columns)
    widths = [max(8, len(h)) for h in heads]
    lines = [label.ljust(w0) + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for i, n in enumerate(names):
        cells = []
        for h, w in zip(heads, widths):
            v = columns[h][i]
            cells.append(
                (fmt.format(v) if isinstance(v, (float, np.floating)) else str(v)).rjust(w)
            )
        lines.append(n.ljust(w0) + "  " + "  ".join(cells))
    return "\n".join(lines)


def fmt_value(v) -> str:
    return "off" if v is None else (f"{v:.3g}" if isinstance(v, (int, float)) else str(v))


def class_mcnemar(after: dict, y_test, num_classes: int) -> list[float]:
    """Per class, the exact two-sided McNemar p-value (`stats.mcnemar`) of the reweighted against
    the plain extra-epoch model on the test samples of that class (paired: the same images)."""
    return stats.class_mcnemar(after["test_correct"]["reweighted"],
        after["test_correct"]["unweighted"], y_test, num_classes)


def harm_sentence(names, change, pvals, targets, level: float = 0.05) -> str:
    """One plain sentence: did any class get worse than the plain extra epochs beyond noise?"""
    worse = [(n, 100 * d, p) for n, d, p in zip(names, change, pvals) if d < 0 and p < level]
    better = [(n, 100 * d, p) for n, d, p in zip(names, change, pvals) if d > 0 and p < level]
    if worse:
        s = "; ".join(f"class {n} {d:+.1f} points (p = {p:.3f})" for n, d, p in worse)
        head = (
            f"Beyond noise (exact McNemar p < {level}), re-weighting made some classes WORSE than "
            f"plain training: {s}."
        )
    else:
        head = (
            "No class got worse than plain training beyond noise (every drop has McNemar p >= "
            f"{level} "
            "on this test split)."
        )
    gains = "; ".join(f"class {n} {d:+.1f} points (p = {p:.3f})" for n, d, p in better)
    tail = f" Gains beyond noise: {gains}." if better else " No gain is beyond noise either."
    return head + tail + f" Targets: {', '.join(map(str, targets))}."


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _finished_summary(root: Path) -> dict:
    """The summary of the run's last completed chain, or a clear refusal: no summary, a run that
    ended before retraining, or stages rerun or damaged since the summary was written."""
    from .runs import Stages

    f = root / "summary.json"
    try:
        summary = io.read_json(f)
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or "chain" not in summary:
        checks.fail("RUN_DIR", str(root), "a run folder whose last run finished (its summary.json)",
            "run `pareto-jax run --out RUN_DIR` to the end first")
    if not summary.get("finished"):
        prog = summary.get("program", {})
        checks.fail(
            "RUN_DIR",
            f"{root}, whose last run ended at the weights stage with status "
            f"{prog.get('status')} ({prog.get('message')})",
            "a run that retrained with its weights",
            "lower --alpha or widen --rho / --w-max, and run again",
        )
    st = Stages(root)
    names = [n for n in summary["chain"] if summary["chain"][n]]
    current = st.fingerprints()
    stale = [
        n for n in names if current.get(n) != summary["chain"][n] or not st.done(n, current.get(n))
    ]
    if stale:
        checks.fail("RUN_DIR",
            f"{root}, whose stages {stale} changed or were damaged since its summary",
            "the artifacts of the run the summary describes",
            "run `pareto-jax run` again with the same --out")
    return summary


def _markdown(root, cfg, summary, names, table, w, wdir) -> list[str]:
    """report.md's text above the figures: the per-class table, the harm sentence, the ceiling
    test and the weights."""
    b, u, a, pv = table
    ceil, prog = summary["ceiling"], summary["program"]
    esc = io.md_escape  # class and dataset names are the user's: shown as written, never markup
    md = [
        f"# pareto-jax run: {esc(cfg['data']['name'])}, model {cfg['model']['kind']}",
        "",
        f"Run folder {esc(root)}; targets {', '.join(map(esc, summary['targets']))}.",
        "",
        _md_row(
            ["class", "test before", "plain extra epochs", "re-weighted", "change (points)",
                "McNemar p"]
        ),
        _md_row(["---"] * 6),
    ]
    md += [
        _md_row([esc(n), f"{x:.3f}", f"{y:.3f}", f"{z:.3f}", f"{100 * (z - y):+.1f}", f"{p:.3f}"])
        for n, x, y, z, p in zip(names, b, u, a, pv)
    ]
    md += [
        "",
        harm_sentence(list(map(esc, names)), a - u, pv, list(map(esc, summary["targets"]))),
        "",
        "**Ceiling test**: a first-order Pareto improvement "
        f"{'exists' if ceil['improvable'] else 'does not exist'}"
        f" (t* = {ceil['t_star']:.3g}).",
        "",
        f"**Weights** ({wdir}): status {prog.get('status')} ({prog.get('message')}), "
        f"alpha {fmt_value(prog.get('alpha'))}"
        + (f", found {prog['found']}" if "found" in prog else "")
        + f"; {int((np.abs(w - 1) > 1e-9).sum())} of {len(w)} weights changed.",
        "",
    ]
    return md


def _yardstick_markdown(y) -> list[str]:
    """The yardstick's table (`pareto_jax.yardstick.compare`), if the run has one."""
    if not y:
        return []
    md = ["", "## Yardstick: simple baselines given the same step rule", "",
        "Test accuracy points against the plain extra epochs; each baseline's step chosen on "
        "validation by the rule the program's step was chosen by. One split and one seed: no "
        "interval (`pareto-jax reproduce improve` repeats over seeds).", "",
        "| method | step | mean target gain | worst other class |", "|---|---|---|---|"]
    for n, r in y["rows"].items():
        step = "" if "step" not in r else format(r["step"], "g")
        md.append(f"| {n} | {step} | {r['target_gain']:+.1f} | {r['worst_other']:+.1f} |")
    md += ["", f"The reweighting's mean target gain minus the best baseline's "
        f"({y['best_baseline']}): {y['difference']:+.1f} points.", ""]
    return md


def write_report(run_dir) -> Path:
    """`pareto-jax report RUN_DIR`: ``report.md`` with its PNG figures in ``RUN_DIR/report/``,
    from a finished run folder: the per-class table (before, plain extra epochs, re-weighted,
    change, McNemar p) and the sentence on harm, the ceiling test, the program or search, and
    figures of the per-class change, the weights, the influence between classes and the
    first-order frontier of the targets."""
    root = Path(run_dir)
    summary, cfg = _finished_summary(root), io.read_json(root / "config.json")
    after = io.read_json(root / "retrain" / "metrics.json")
    before = io.read_json(root / "train" / "metrics.json")
    res = influence.InfluenceResult.load(root / "influence" / "P.npz")
    names = list(res.names or [str(k) for k in range(res.P.shape[1])])
    P = np.asarray(res.P, np.float64)
    wdir = summary["weights_stage"]  # the weights of this run's own chain, not a stale stage's
    w = np.asarray(io.load_pytree(root / wdir / "weights.npz", {"w": np.zeros(P.shape[0])})[0]["w"])
    out = root / "report"
    b = np.asarray(before["test"]["accuracy"])
    u = np.asarray(after["unweighted"]["test"]["accuracy"])
    a = np.asarray(after["reweighted"]["test"]["accuracy"])
    pv = summary.get("test_mcnemar_p") or [float("nan")] * len(names)
    figs = [
        plots.bars(["plain extra epochs", "re-weighted"], 100 * np.stack([u - b, a - b]),
            out / "change.png", title="test accuracy change from the trained model",
            ylabel="points", class_names=names),
        plots.histogram(w, out / "weights.png", title=f"sample weights ({wdir})", xlabel="w"),
        plots.heatmap(np.corrcoef(P.T), out / "influence_correlation.png",
            title="correlation of P's columns", class_names=names, xlabel="class", ylabel="class",
            cbar="correlation"),
    ]
    tg = [names.index(t) for t in summary["targets"] if t in names]
    if len(tg) >= 2:
        fr = pareto.pareto_frontier(P, n_random=8, seed=0)
        figs.append(
            plots.frontier_plot(
                fr.gains, fr.ceiling, tg[0], tg[1], out / "frontier.png", class_names=names
            )
        )
    md = _markdown(root, cfg, summary, names, (b, u, a, pv), w, wdir)
    md += _yardstick_markdown(summary.get("yardstick"))
    md += [f"![]({f.get_label()})" for f in figs]
    chain = {n: fp for n, fp in summary["chain"].items() if fp}
    md += [
        "",
        "Made from the stages (fingerprints) "
        + ", ".join(f"{n} ({str(fp)[:12]})" for n, fp in chain.items())
        + f"; weights from {wdir}.",
    ]
    io.write_json(
        out / "report.json",
        {"figures": [f.get_label() for f in figs], "targets": summary["targets"], "chain": chain,
            "weights_stage": wdir},
    )
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"
