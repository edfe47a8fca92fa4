"""The improvement study: Direct Improvement and Course Correction on several datasets, over
seeds, with intervals and paired tests (``pareto-jax reproduce improve``; ``docs/method.md``,
"The improvement study").

Each dataset has a fixed setting (`SETTINGS`): the real corpora with the labels as given
(Emotion and AG News: MiniLM sentence embeddings and an MLP head; digits and MNIST-5k: a small
CNN), plus the controlled case (MNIST-5k with 40 % of the labels of classes 3 and 8 flipped,
linear model). For every seed the data split (where the dataset has no fixed split), the
initialisation, the training order and the search change together; the targets are the
classes weakest on validation at θ^e. One seed runs `experiments.run_improve` (search,
baselines, baselines at matched validation harm, Course Correction); `summarize` turns the
seeds into means with 95 % t-intervals, and paired exact McNemar tests of every method against
the plain extra epoch (the unweighted baseline), pooled over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import checks, evaluation, experiments, io, plots
from .config import (
    DataConfig,
    ImproveConfig,
    InfluenceConfig,
    ModelConfig,
    ReweightConfig,
    SearchConfig,
    TrainConfig,
)
from .stats import interval, mcnemar

SEARCH_ROW = "search (PARETO-LP-GA)"
REFERENCE_ROW = "unweighted"

# The original paper's Direct Improvement on CIFAR-10 (epoch 10 → 11, targets 0 and 2; relative
# per-class accuracy change, %). A different dataset and model: shown beside ours, never compared.
PAPER_CIFAR10 = {
    "dataset": "CIFAR-10 (paper, ResNet; a different dataset)",
    "target_gain_relative_pct": [16.0, 11.0],
    "worst_other_relative_pct": -2.9,
}


@dataclasses.dataclass(frozen=True)
class StudySetting:
    """One dataset's experiment: data, model, training, label noise and number of targets."""

    dataset: str
    model: ModelConfig
    train: TrainConfig
    features: str = "tfidf"
    noise_classes: tuple[int, ...] = ()
    noise_fraction: float = 0.0
    n_targets: int = 2
    max_train: int | None = None
    influence: InfluenceConfig | str | None = None
    description: str = ""


# deep models: Gauss-Newton CG, automatic damping, stopped at a relative residual of 1e-3 (on the
# digits CNN, P then differs from P at 1e-6 by 0.5 % in norm, for half the CG steps)
INFLUENCE = InfluenceConfig(curvature="gauss_newton", rtol=1e-3)

_TEXT_TRAIN = TrainConfig(epochs=12, batch_size=128, learning_rate=1e-3, weight_decay=1e-4)
# the CNN's training, also the deletion check's (`reproduce.reproduce_deletion`, model "cnn*")
CNN_TRAIN = TrainConfig(epochs=15, batch_size=64, learning_rate=3e-3, weight_decay=1e-4)

SETTINGS: dict[str, StudySetting] = {
    "emotion": StudySetting(
        "emotion",
        ModelConfig("mlp", hidden=(64,)),
        _TEXT_TRAIN,
        features="minilm",
        description="Emotion (6 classes; its own train/val/test files), MiniLM "
        "embeddings (384), MLP head (64 tanh units)",
    ),
    "ag_news": StudySetting(
        "ag_news",
        ModelConfig("mlp", hidden=(64,)),
        _TEXT_TRAIN,
        features="minilm",
        n_targets=1,
        description="AG News (4 classes; its 7,600-text test file split 60/20/20), "
        "MiniLM embeddings (384), MLP head (64 tanh units); target: "
        "the class weakest on validation",
    ),
    "digits": StudySetting(
        "digits",
        ModelConfig("cnn", channels=(8, 16), dense=64),
        CNN_TRAIN,
        description="scikit-learn digits (8×8, 10 classes), CNN (conv 8-16, dense 64)",
    ),
    # the whole-network Gauss-Newton CG took over 7 minutes per influence matrix here (2 CPU
    # cores, 3,000 28×28 images, 330 CG steps per class): MNIST-5k uses last-layer influence
    "mnist5k": StudySetting(
        "mnist5k",
        ModelConfig("cnn", channels=(8, 16), dense=64),
        CNN_TRAIN,
        influence="last_layer",
        description="MNIST-5k (28×28, 10 classes), CNN (conv 8-16, dense 64); "
        "influence through the last layer (closed form on the CNN's "
        "penultimate activations)",
    ),
    "mnist5k-noisy": StudySetting(
        "mnist5k",
        ModelConfig("linear"),
        TrainConfig(epochs=20, batch_size=128, learning_rate=0.003, weight_decay=1e-3),
        noise_classes=(3, 8),
        noise_fraction=0.4,
        description="controlled case: MNIST-5k with 40 % of the training "
        "labels of classes 3 and 8 flipped, linear softmax",
    ),
}


def _quick(st: StudySetting) -> StudySetting:
    """CI sizes: a few epochs, a subsample, TF-IDF instead of MiniLM for text."""
    tc = dataclasses.replace(st.train, epochs=min(st.train.epochs, 6))
    return dataclasses.replace(st, train=tc, features="tfidf", max_train=600)


def search_config(seed: int, quick: bool) -> SearchConfig:
    """The study's search: α from [0.95, 1], trust region searched, down-weighting only, one
    weighted epoch per candidate (the method's Direct Improvement and Course Correction)."""
    return SearchConfig(
        population=6 if quick else 16,
        generations=2 if quick else 6,
        seed=seed,
        retrain="epoch",
        alpha_range=(0.95, 1.0),
        reweight=ReweightConfig.downweight_only(),
    )


def seed_config(name: str, seed: int, out_dir: Path, *, quick: bool = False) -> ImproveConfig:
    """The `experiments.ImproveConfig` of one seed of one dataset."""
    st = SETTINGS[name]
    st = _quick(st) if quick else st
    return ImproveConfig(
        data=DataConfig(name=st.dataset, seed=seed, features=st.features, max_train=st.max_train),
        model=dataclasses.replace(st.model, seed=seed),
        train=dataclasses.replace(st.train, seed=seed),
        noise_classes=st.noise_classes,
        noise_fraction=st.noise_fraction,
        n_targets=st.n_targets,
        search=search_config(seed, quick),
        frontier=False,
        out_dir=str(out_dir / f"seed_{seed}"),
        influence=st.influence or INFLUENCE,
    )


def _same_config(saved: dict, cfg: ImproveConfig) -> bool:
    """Whether a saved seed ran with `cfg` (compared as JSON, the output folder aside)."""
    want = json.loads(json.dumps(io.to_jsonable(cfg), sort_keys=True, default=str))
    got = dict(saved)
    want.pop("out_dir", None), got.pop("out_dir", None)
    return got == want


def run_seed(name: str, seed: int, out_dir: Path, *, quick: bool = False, out=None) -> dict:
    """One seed of one dataset: train, Direct Improvement and Course Correction with baselines."""
    cfg = seed_config(name, seed, out_dir, quick=quick)
    t0 = time.perf_counter()
    rep = experiments.run_improve(cfg, progress=False, out=out)
    rep["seconds"] = time.perf_counter() - t0
    rep["seed"] = seed
    return rep


# ----------------------------------------------------------------------------- statistics


def _unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8) == ord("1")


def _check_bits(ok, y, test_acc, where: str) -> None:
    """The per-sample outcomes must give the per-class accuracies the run reported (else the bit
    strings and the labels are misaligned, and every paired test would be silently wrong)."""
    K = len(test_acc)
    if ok.shape != y.shape:
        raise RuntimeError(f"{where}: {ok.size} test outcomes for {y.size} test labels")
    acc = np.bincount(y[ok], minlength=K) / np.maximum(np.bincount(y, minlength=K), 1)
    if not np.allclose(acc, test_acc, atol=1e-12):
        raise RuntimeError(
            f"{where}: per-sample outcomes give accuracies {acc.round(4).tolist()}, "
            f"the run reported {np.round(test_acc, 4).tolist()}"
        )


def summarize(seeds: list[dict], mode: str, class_names) -> dict | None:
    """Per method over seeds: mean target gain, least target gain and worst other class (test
    points vs θ^e, or vs epoch e+1 in Course Correction), with 95 % intervals; the mean relative
    changes (the paper's unit); McNemar against the plain extra epoch on the targets' and the
    other classes' test samples and per class, pooled over seeds; and the best method at
    matched validation harm (`best_at_matched_harm`). Every seed's per-sample outcomes are
    first checked against its reported accuracies."""
    blocks = [(r, r[mode]) for r in seeds if mode in r and "skipped" not in r[mode]]
    if not blocks:
        return None
    K = len(class_names)
    for r, b in blocks:
        for m, ok in b["test_correct"].items():
            _check_bits(
                _unbits(ok),
                np.asarray(r["y_test"]),
                b["rows"][m]["test_acc"],
                f"{mode}/{m}, seed {r.get('seed')}",
            )
    methods = sorted(dict.fromkeys(m for _, b in blocks for m in b["rows"]), key=_order)
    out = {
        "n_seeds": len(blocks),
        "targets": [b["target_names"] for _, b in blocks],
        "seeds": [r.get("seed") for r, _ in blocks],
        "found": sum(bool(b["found"]) for _, b in blocks),
        "methods": {},
    }
    for m in methods:
        gain, least, worst, rel_gain, rel_worst, per_class_pts = [], [], [], [], [], []
        pooled = {"targets": ([], []), "others": ([], [])}
        per_class = [([], []) for _ in range(K)]
        for r, b in blocks:
            if m not in b["rows"]:
                continue
            row, t = b["rows"][m], b["targets"]
            pts = np.asarray(row["target_test_points"])
            gain.append(pts.mean())
            least.append(pts.min())
            worst.append(row["worst_other_test_points"])
            per_class_pts.append(100 * (np.asarray(row["test_acc"]) - np.asarray(b["ref_test"])))
            rel = evaluation.relative_change(row["test_acc"], b["ref_test"])
            rel_gain.append(rel[t].mean())
            rel_worst.append(np.delete(rel, t).min() if K > len(t) else 0.0)
            ok, ref = b["test_correct"].get(m), b["test_correct"].get(REFERENCE_ROW)
            if ok is None or ref is None:
                continue
            ok, ref, y = _unbits(ok), _unbits(ref), np.asarray(r["y_test"])
            is_t = np.isin(y, t)
            pooled["targets"][0].append(ok[is_t]), pooled["targets"][1].append(ref[is_t])
            pooled["others"][0].append(ok[~is_t]), pooled["others"][1].append(ref[~is_t])
            for k in range(K):
                per_class[k][0].append(ok[y == k]), per_class[k][1].append(ref[y == k])
        cat = lambda a: np.concatenate(a) if a else np.zeros(0, bool)  # noqa: E731
        out["methods"][m] = {
            "n": len(gain),
            "target_gain": interval(gain),
            "least_target_gain": interval(least),
            "worst_other": interval(worst),
            "target_gain_relative_pct": interval(rel_gain),
            "worst_other_relative_pct": interval(rel_worst),
            "per_seed": {
                "target_gain": [float(v) for v in gain],
                "worst_other": [float(v) for v in worst],
            },
            "per_class_points": np.mean(per_class_pts, 0).tolist(),
            "mcnemar_vs_extra_epoch": None
            if m == REFERENCE_ROW or not pooled["targets"][0]
            else {
                "targets": mcnemar(cat(pooled["targets"][0]), cat(pooled["targets"][1])),
                "others": mcnemar(cat(pooled["others"][0]), cat(pooled["others"][1])),
                "per_class": [mcnemar(cat(a), cat(c)) for a, c in per_class],
            },
        }
    out["best_at_matched_harm"] = best_at_matched_harm(out["methods"])
    pred = [
        b["program"]["predicted_loss_change"]
        for _, b in blocks
        if (b.get("program") or {}).get("predicted_loss_change") is not None
    ]
    out["search_predicted_loss_change"] = np.mean(pred, 0).tolist() if pred else None
    return out


def best_at_matched_harm(methods: dict) -> dict:
    """Among the search and the baselines scaled to its validation harm ("val-matched"), present
    in every seed, the method with the highest mean target gain; and the search's paired
    difference (over seeds) to the best val-matched baseline."""
    n = max(v["n"] for v in methods.values())
    matched = [m for m in methods if m.endswith(", val-matched") and methods[m]["n"] == n]
    cands = matched + (
        [SEARCH_ROW] if SEARCH_ROW in methods and methods[SEARCH_ROW]["n"] == n else []
    )
    if not cands:
        return {}
    gain = lambda m: methods[m]["target_gain"]["mean"]  # noqa: E731
    best = max(cands, key=gain)
    res = {
        "method": best,
        "target_gain": methods[best]["target_gain"],
        "worst_other": methods[best]["worst_other"],
    }
    if matched and SEARCH_ROW in cands:
        rival = max(matched, key=gain)
        a = methods[SEARCH_ROW]["per_seed"]["target_gain"]
        b = methods[rival]["per_seed"]["target_gain"]
        if len(a) == len(b):
            res["best_baseline"] = rival
            res["search_minus_best_baseline"] = interval(np.subtract(a, b))
    return res


def _order(name: str) -> tuple:
    """Report order: the search, the plain extra epoch, the raw baselines, the val-matched ones."""
    return (
        0
        if name == SEARCH_ROW
        else 1
        if name == REFERENCE_ROW
        else 3
        if name.endswith("val-matched")
        else 2,
        name,
    )


# ----------------------------------------------------------------------------- report


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


def dataset_markdown(name: str, res: dict) -> list[str]:
    st = SETTINGS[name]
    md = [
        f"## {name}",
        "",
        st.description + ".",
        "",
        f"Seeds: {res['seeds']}; run time {res['seconds']:.0f} s (sum over seeds, 2 CPU cores).",
        "",
    ]
    for mode, title in (
        ("direct", "Direct Improvement"),
        ("course_correction", "Course Correction"),
    ):
        s = res["summary"].get(mode)
        if s is None:
            md += [
                f"### {title}",
                "",
                "skipped in every seed (no class dropped between epochs).",
                "",
            ]
            continue
        md += [
            f"### {title} ({s['n_seeds']} seeds; improving every target on validation in "
            f"{s['found']})",
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
                [
                    "method",
                    "mean target gain (points)",
                    "least target gain",
                    "worst other class",
                    "targets vs extra epoch: net samples (McNemar p)",
                    "other classes: net (p)",
                ],
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
                io.md_table(
                    ["class"] + list(res["class_names"]), [["net (p)"] + [_fmt_test(t) for t in pc]]
                ),
                "",
            ]
        b = s["best_at_matched_harm"]
        if b:
            line = (
                f"Best at matched validation harm: **{b['method']}**, mean target gain "
                f"{_fmt(b['target_gain'])} points, worst other class {_fmt(b['worst_other'])}."
            )
            if "search_minus_best_baseline" in b:
                d = b["search_minus_best_baseline"]
                beyond = d["n"] > 1 and abs(d["mean"]) > d["half_width"]
                line += (
                    f" The search's target gain minus that of the best val-matched baseline "
                    f"({b['best_baseline']}), paired over seeds: {_fmt(d)} points"
                    + (
                        ""
                        if d["n"] < 2
                        else f" ({'beyond' if beyond else 'within'} its 95 % interval)"
                    )
                    + "."
                )
            md += [line, ""]
        d = b.get("search_minus_best_baseline") if b else None
        if d and d["n"] > 1 and d["mean"] < -d["half_width"]:
            md += _why_lost(s, b["best_baseline"], res["class_names"])
        fig = res["figures"].get(mode)
        if fig:
            md += [f"![]({fig})", ""]
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


def _figure(name: str, mode: str, summary: dict, out_dir: Path) -> str:
    ms = list(summary["methods"])
    vals = np.array(
        [
            [
                summary["methods"][m]["target_gain"]["mean"],
                summary["methods"][m]["worst_other"]["mean"],
            ]
            for m in ms
        ]
    )
    err = np.array(
        [
            [
                summary["methods"][m]["target_gain"]["half_width"],
                summary["methods"][m]["worst_other"]["half_width"],
            ]
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


def reproduce_study(
    datasets=("emotion", "ag_news", "digits", "mnist5k", "mnist5k-noisy"),
    *,
    seeds: int = 5,
    quick: bool = False,
    out_dir: str = "reports/improve",
    resume: bool = False,
    out=None,
) -> dict:
    """Run every dataset over `seeds` seeds and write ``report.md`` + ``study.json`` + figures.

    Each finished seed is saved as ``<out_dir>/<dataset>/seed_<s>/seed.json``; with `resume`, a
    seed whose file exists (same seed, `quick` and config) is read back instead of rerun, so an
    interrupted study continues where it stopped and the report can be rebuilt from the runs."""
    out = out or sys.stdout
    out_dir = Path(out_dir)
    for name in datasets:
        checks.check_choice(name, "dataset", tuple(SETTINGS))
    checks.check_positive(seeds, "seeds", integer=True)
    results = {}
    for name in datasets:
        runs = []
        for s in range(seeds):
            f = out_dir / name / f"seed_{s}" / "seed.json"
            if resume and f.exists():
                saved = io.read_json(f)
                if (
                    saved.get("seed") == s
                    and saved.get("quick") == quick
                    and _same_config(
                        saved["config"], seed_config(name, s, out_dir / name, quick=quick)
                    )
                ):
                    print(f"{name}, seed {s}: read back from {f}", file=out)
                    runs.append(saved)
                    continue
                print(f"{name}, seed {s}: {f} ran with other settings; running it again", file=out)
            print(f"\n=== {name}, seed {s} ===", file=out)
            runs.append(run_seed(name, s, out_dir / name, quick=quick, out=out))
            runs[-1]["quick"] = quick
            io.write_json(f, runs[-1])
        names = runs[0]["class_names"]
        res = {
            "seeds": list(range(seeds)),
            "class_names": names,
            "seconds": float(sum(r["seconds"] for r in runs)),
            "summary": {m: summarize(runs, m, names) for m in ("direct", "course_correction")},
            "figures": {},
        }
        for m, s_ in res["summary"].items():
            if s_ is not None:
                res["figures"][m] = _figure(name, m, s_, out_dir)
        results[name] = res
    md = [
        "# Improvement study",
        "",
        "Direct Improvement (one weighted epoch from the last checkpoint θ^e against θ^e) and "
        "Course Correction (one weighted epoch from the checkpoint whose ordinary successor "
        "dropped "
        "some validation classes, against that successor), each beside the baselines of "
        "`evaluation.baseline_weights` and the same baselines scaled to the search's validation "
        'harm ("val-matched"). Targets: the classes weakest on validation. Every change is on '
        "the held-out test split, in accuracy points, as mean ± the half-width of the 95 % "
        "t-interval "
        "over seeds (each seed changes the split where the dataset has none of its own, the "
        "initialisation, the batch order and the search). 'net (p)': test samples a method gets "
        "right "
        "that the plain extra epoch (the unweighted baseline) gets wrong, minus the reverse, "
        "pooled over "
        "seeds, with the exact McNemar p-value; * marks p < 0.05. The null hypothesis is that, in "
        "every "
        "seed, a test sample that only one of the two models gets right is equally likely to be "
        "either's "
        "(a fair coin), which makes the pooled test exact; it speaks of these test samples under "
        "the "
        "training randomness (on Emotion every seed scores the same test file), not of new data. "
        "The "
        "per-class tests are many (classes × methods) and not corrected for multiplicity: read "
        "them as "
        "pointers, and the targets' and other classes' pooled tests as the answer.",
        "",
    ]
    md += paper_table(results)
    for name, res in results.items():
        md += dataset_markdown(name, res)
    io.write_json(
        out_dir / "study.json", {"results": results, "paper_cifar10": PAPER_CIFAR10, "quick": quick}
    )
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / 'report.md'}", file=out)
    return results
