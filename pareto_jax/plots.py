"""Matplotlib figures for the reports and notebooks.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot, so the global backend and
rcParams are never touched: a notebook keeps its inline backend) and returns it; given a `path`,
it also writes the PNG and the figure's data as JSON beside it, and records the PNG's file name
as the figure's label (``fig.get_label()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import io

REGION_COLOURS = {1: "#2b8a3e", 0: "#868e96", -1: "#c92a2a"}
REGION_LABELS = {1: "joint-positive", 0: "trade-off", -1: "joint-negative"}


def _figure(figsize, ncols: int = 1):
    """(Figure, axes) without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    return fig, fig.subplots(1, ncols)


def save(fig, path, payload: dict):
    """Lay out `fig`; with a `path`, write it as PNG plus its data as JSON next to it (the PNG's
    file name becomes the figure's label). Returns the Figure."""
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight")
        io.write_json(path.with_suffix(".json"), payload)
        fig.set_label(path.name)
    return fig


def decision_boundary(x, y, predict, path, *, title: str, highlight=None):
    fig, ax = _figure((4.6, 4.2))
    lo, hi = x.min(0) - 0.4, x.max(0) + 0.4
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    z = predict(np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float32)).reshape(gx.shape)
    ax.contourf(gx, gy, z, levels=[-0.5, 0.5, 1.5], colors=["#d0ebff", "#ffe3e3"], alpha=0.8)
    ax.contour(gx, gy, z, levels=[0.5], colors="k", linewidths=1)
    for c, col in ((0, "#1c7ed6"), (1, "#e03131")):
        m = y == c
        ax.scatter(x[m, 0], x[m, 1], s=9, c=col, label=f"label {c}", edgecolors="none")
    if highlight is not None and len(highlight):
        ax.scatter(x[highlight, 0], x[highlight, 1], s=40, facecolors="none", edgecolors="k",
            linewidths=0.8, label="joint-negative")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return save(fig, path, {"x": x, "y": y, "highlight": [] if highlight is None else highlight})


def influence_scatter(P, regions, path, *, title: str, class_names=("class 0", "class 1")):
    P = np.asarray(P)
    fig, ax = _figure((4.6, 4.2))
    for r in (0, 1, -1):
        m = regions == r
        ax.scatter(P[m, 0], P[m, 1], s=9, c=REGION_COLOURS[r],
            label=f"{REGION_LABELS[r]} ({m.sum()})", edgecolors="none")
    lim = np.abs(P).max() * 1.1
    ax.plot([-lim, lim], [lim, -lim], "k--", lw=0.8, label="y = −x")
    ax.axhline(0, color="#adb5bd", lw=0.6)
    ax.axvline(0, color="#adb5bd", lw=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(f"P[:, 0] (influence on {class_names[0]})")
    ax.set_ylabel(f"P[:, 1] (influence on {class_names[1]})")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    return save(fig, path, {"P": P, "regions": regions})


def rounds_plot(
    acc, path, *, title: str, class_names=("class 0", "class 1"), ylabel: str = "test accuracy"
):
    acc = np.asarray(acc)
    fig, ax = _figure((4.6, 3.4))
    for k in range(acc.shape[1]):
        ax.plot(range(acc.shape[0]), acc[:, k], "o-", label=class_names[k])
    ax.set_xticks(range(acc.shape[0]))
    ax.set_xlabel("removal round")
    ax.set_ylabel(ylabel)
    ax.set_ylim(min(0.5, acc.min() - 0.05), 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save(fig, path, {"accuracy": acc})


def heatmap(M, path, *, title: str, class_names: Sequence[str], xlabel: str, ylabel: str, cbar: str,
    fmt: str = "{:.2g}"):
    M = np.asarray(M, np.float64)
    K = M.shape[0]
    fig, ax = _figure((0.5 * K + 2.6, 0.45 * K + 1.8))
    v = np.abs(M).max() or 1.0
    im = ax.imshow(M, cmap="RdBu", vmin=-v, vmax=v)
    ax.set_xticks(range(M.shape[1]), [str(c)[:8] for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(K), [str(c)[:8] for c in class_names])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if K <= 10:
        for i in range(K):
            for j in range(M.shape[1]):
                ax.text(j, i, fmt.format(M[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if abs(M[i, j]) > 0.6 * v else "black")
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.8)
    return save(fig, path, {"matrix": M, "class_names": list(class_names)})


def deletion_scatter(infl, acc, labels, path, *, title: str, rho: float):
    fig, ax = _figure((4.8, 3.8))
    for lab, mk, col in (("beneficial removed", "o", "#1c7ed6"),
        ("detrimental removed", "s", "#e8590c")):
        m = np.asarray(labels) == lab
        ax.scatter(np.asarray(infl)[m], 100 * np.asarray(acc)[m], s=14, marker=mk, c=col, label=lab,
            edgecolors="none", alpha=0.8)
    ax.axhline(0, color="#adb5bd", lw=0.6)
    ax.axvline(0, color="#adb5bd", lw=0.6)
    ax.set_xlabel("summed influence of removed set on class k")
    ax.set_ylabel("accuracy change of class k (points)")
    ax.set_title(f"{title}\nSpearman ρ = {rho:.3f}")
    ax.legend(fontsize=8)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    return save(fig, path,
        {"summed_influence": infl, "accuracy_change": acc, "set": list(labels), "spearman": rho})


def frontier_plot(gains, ceiling, a: int, b: int, path, *, class_names, verified=None):
    G = np.asarray(gains)
    fig, axes = _figure((9.2 if verified else 4.8, 3.9), 2 if verified else 1)
    ax = axes[0] if verified else axes
    xa, xb = G[:, a], G[:, b]
    # the points no other point beats on both classes: the frontier seen in this plane, as a curve
    top = np.array(
        [
            not np.any((xa >= xa[i]) & (xb >= xb[i]) & ((xa > xa[i]) | (xb > xb[i])))
            for i in range(len(G))
        ]
    )
    order = np.flatnonzero(top)[np.argsort(xa[top], kind="stable")]
    ax.scatter(xa[~top], xb[~top], s=12, c="#adb5bd",
        label="other frontier points (weight on other classes)")
    ax.plot(
        xa[order], xb[order], "-o", color="#1c7ed6", ms=4, lw=1.2, label="frontier in this plane"
    )
    if verified:
        idx = [int(v["point"]) for v in verified if "point" in v]
        if idx:
            ax.scatter(G[idx, a], G[idx, b], s=70, facecolors="none", edgecolors="k", lw=1.0,
                label="retrained")
    ax.axvline(ceiling[a], color="#e03131", ls="--", lw=0.8,
        label=f"ceiling of class {class_names[a]} alone")
    ax.axhline(ceiling[b], color="#2f9e44", ls="--", lw=0.8,
        label=f"ceiling of class {class_names[b]} alone")
    ax.set_xlabel(f"predicted val-loss decrease, class {class_names[a]}")
    ax.set_ylabel(f"predicted val-loss decrease, class {class_names[b]}")
    ax.set_title("first-order Pareto frontier\n(no class predicted worse)")
    ax.legend(fontsize=7)
    payload = {"gains": G, "ceiling": ceiling, "classes": [a, b]}
    if verified:
        pred = np.concatenate([p["predicted_loss_change"] for p in verified])
        act = np.concatenate([p["actual_loss_change"] for p in verified])
        ax2 = axes[1]
        ax2.scatter(pred, act, s=14, c="#7048e8")
        lim = [min(pred.min(), act.min()), max(pred.max(), act.max())]
        ax2.plot(lim, lim, "k--", lw=0.8, label="y = x")
        ax2.set_xlabel("predicted per-class val-loss change")
        ax2.set_ylabel("actual change after retraining")
        ax2.set_title("frontier points, retrained")
        ax2.legend(fontsize=8)
        payload.update({"predicted": pred, "actual": act})
    return save(fig, path, payload)


def bars(names, values, path, *, title: str, ylabel: str, class_names=None):
    """Grouped bars: rows of `values` are methods, columns classes."""
    V = np.asarray(values, np.float64)
    m, k = V.shape
    fig, ax = _figure((max(5.0, 0.9 * k + 2.5), 3.8))
    width = 0.8 / m
    for i in range(m):
        ax.bar(np.arange(k) + (i - (m - 1) / 2) * width, V[i], width, label=names[i])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(k), class_names if class_names is not None else range(k))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path, {"methods": list(names), "values": V})


def histogram(values, path, *, title: str, xlabel: str, bins: int = 40):
    """A histogram (e.g. of the program's sample weights)."""
    v = np.asarray(values, np.float64)
    fig, ax = _figure((4.8, 3.2))
    ax.hist(v, bins=bins, color="#1c7ed6")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    return save(fig, path, {"values": v})


def interval_bars(methods, values, errors, series, path, *, title: str, ylabel: str):
    """Horizontal bars with error bars: rows of `values` (M, S) are methods, columns the `series`
    (e.g. mean target gain, worst other class); `errors` the interval half-widths."""
    V, E = np.asarray(values, np.float64), np.asarray(errors, np.float64)
    m, s = V.shape
    fig, ax = _figure((7.5, 0.28 * m * s + 1.4))
    h = 0.8 / s
    colours = ("#2b8a3e", "#c92a2a", "#1c7ed6", "#868e96")
    for j in range(s):
        ax.barh(np.arange(m) + (j - (s - 1) / 2) * h, V[:, j], h, xerr=E[:, j], label=series[j],
            color=colours[j % len(colours)], capsize=2)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(m), list(methods), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save(
        fig, path, {"methods": list(methods), "series": list(series), "values": V, "half_widths": E}
    )
