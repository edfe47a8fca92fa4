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

from . import checks, evaluation, experiments, io
from .config import DataConfig, ImproveConfig, ReweightConfig, SearchConfig
from .stats import interval, mcnemar
from .study_report import INTRO, dataset_markdown, figure, paper_table
from .study_settings import (  # noqa: F401  (the study's settings, re-exported)
    CNN_TRAIN,
    INFLUENCE,
    INFLUENCE_ROWS,
    PAPER_CIFAR10,
    REFERENCE_ROW,
    SEARCH_ROW,
    SETTINGS,
    StudySetting,
)


def _quick(st: StudySetting) -> StudySetting:
    """CI sizes: a few epochs, a subsample, TF-IDF instead of MiniLM for text."""
    tc = dataclasses.replace(st.train, epochs=min(st.train.epochs, 6))
    return dataclasses.replace(st, train=tc, features="tfidf", max_train=600)


def search_config(seed: int, quick: bool) -> SearchConfig:
    """The study's search: α from [0.95, 1], trust region searched, down-weighting only, one
    weighted epoch per candidate (the method's Direct Improvement and Course Correction)."""
    return SearchConfig(population=6 if quick else 16, generations=2 if quick else 6, seed=seed,
        retrain="epoch", alpha_range=(0.95, 1.0), reweight=ReweightConfig.downweight_only())


def seed_config(name: str, seed: int, out_dir: Path, *, quick: bool = False) -> ImproveConfig:
    """The `experiments.ImproveConfig` of one seed of one dataset."""
    st = SETTINGS[name]
    st = _quick(st) if quick else st
    return ImproveConfig(
        data=DataConfig(name=st.dataset, seed=seed, features=st.features, max_train=st.max_train),
        model=dataclasses.replace(st.model, seed=seed),
        train=dataclasses.replace(st.train, seed=seed), noise_classes=st.noise_classes,
        noise_fraction=st.noise_fraction, n_targets=st.n_targets, search=search_config(seed, quick),
        frontier=False, out_dir=str(out_dir / f"seed_{seed}"), influence=st.influence or INFLUENCE)


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
            _check_bits(_unbits(ok), np.asarray(r["y_test"]), b["rows"][m]["test_acc"],
                f"{mode}/{m}, seed {r.get('seed')}")
    methods = sorted(dict.fromkeys(m for _, b in blocks for m in b["rows"]), key=_order)
    out = {"n_seeds": len(blocks), "targets": [b["target_names"] for _, b in blocks],
        "seeds": [r.get("seed") for r, _ in blocks],
        "found": sum(bool(b["found"]) for _, b in blocks), "methods": {}}
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
            "per_seed": {"target_gain": [float(v) for v in gain],
                "worst_other": [float(v) for v in worst]},
            "per_class_points": np.mean(per_class_pts, 0).tolist(),
            "mcnemar_vs_extra_epoch": None
            if m == REFERENCE_ROW or not pooled["targets"][0]
            else {"targets": mcnemar(cat(pooled["targets"][0]), cat(pooled["targets"][1])),
                "others": mcnemar(cat(pooled["others"][0]), cat(pooled["others"][1])),
                "per_class": [mcnemar(cat(a), cat(c)) for a, c in per_class]},
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
    """Among the influence-based methods (the search, and the unrolled estimator's methods when
    they ran) and the baselines scaled to the search's validation harm ("val-matched"), present in
    every seed, the method with the highest mean target gain; and each influence-based method's
    paired difference (over seeds) to the best val-matched baseline (``vs_best_baseline``; the
    search's also as ``search_minus_best_baseline``)."""
    n = max(v["n"] for v in methods.values())
    ours = [m for m in INFLUENCE_ROWS if m in methods and methods[m]["n"] == n]
    matched = [
        m
        for m in methods
        if m.endswith(", val-matched") and methods[m]["n"] == n and m not in INFLUENCE_ROWS
    ]
    cands = matched + ours
    if not cands:
        return {}
    gain = lambda m: methods[m]["target_gain"]["mean"]  # noqa: E731
    best = max(cands, key=gain)
    res = {"method": best, "target_gain": methods[best]["target_gain"],
        "worst_other": methods[best]["worst_other"]}
    if matched and ours:
        rival = max(matched, key=gain)
        res["best_baseline"] = rival
        b = methods[rival]["per_seed"]["target_gain"]
        res["vs_best_baseline"] = {
            m: interval(np.subtract(methods[m]["per_seed"]["target_gain"], b))
            for m in ours
            if len(methods[m]["per_seed"]["target_gain"]) == len(b)
        }
        if SEARCH_ROW in res["vs_best_baseline"]:
            res["search_minus_best_baseline"] = res["vs_best_baseline"][SEARCH_ROW]
    return res


def _order(name: str) -> tuple:
    """Report order: the search, the plain extra epoch, the raw baselines, the val-matched ones."""
    rank = (
        0
        if name in INFLUENCE_ROWS or name.startswith("program (unroll)")
        else 1
        if name == REFERENCE_ROW
        else 3
        if name.endswith("val-matched")
        else 2
    )
    return (rank, INFLUENCE_ROWS.index(name) if name in INFLUENCE_ROWS else len(INFLUENCE_ROWS),
        name)


# ----------------------------------------------------------------------------- report


def release_compiled_programs() -> None:
    """Drop every compiled program (`jax.clear_caches`). XLA:CPU maps memory for each program and
    keeps it while the program is cached; one seed compiles about 4,000 maps' worth, so a study in
    one process passed Linux's default limit of 65,530 maps (vm.max_map_count) and segfaulted in a
    compile. Each seed recompiles what it needs (seconds)."""
    import jax

    jax.clear_caches()


def _seed_runs(name: str, seeds: int, out_dir: Path, quick: bool, resume: bool, out) -> list[dict]:
    """Every seed of one dataset: read back (with `resume`, when it ran with the same settings) or
    run and saved as ``<out_dir>/<dataset>/seed_<s>/seed.json``."""
    runs = []
    for s in range(seeds):
        f = out_dir / name / f"seed_{s}" / "seed.json"
        if resume and f.exists():
            saved = io.read_json(f)
            same = _same_config(saved["config"], seed_config(name, s, out_dir / name, quick=quick))
            if saved.get("seed") == s and saved.get("quick") == quick and same:
                print(f"{name}, seed {s}: read back from {f}", file=out)
                runs.append(saved)
                continue
            print(f"{name}, seed {s}: {f} ran with other settings; running it again", file=out)
        print(f"\n=== {name}, seed {s} ===", file=out)
        runs.append(run_seed(name, s, out_dir / name, quick=quick, out=out))
        runs[-1]["quick"] = quick
        io.write_json(f, runs[-1])
        release_compiled_programs()
    return runs


def reproduce_study(datasets=("emotion", "ag_news", "digits", "mnist5k", "mnist5k-noisy"), *,
    seeds: int = 5, quick: bool = False, out_dir: str = "reports/improve", resume: bool = False,
    out=None) -> dict:
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
        runs = _seed_runs(name, seeds, out_dir, quick, resume, out)
        names = runs[0]["class_names"]
        res = {"seeds": list(range(seeds)), "class_names": names,
            "seconds": float(sum(r["seconds"] for r in runs)),
            "summary": {m: summarize(runs, m, names) for m in ("direct", "course_correction")},
            "figures": {}}
        for m, s_ in res["summary"].items():
            if s_ is not None:
                res["figures"][m] = figure(name, m, s_, out_dir)
        results[name] = res
    md = ["# Improvement study", "", INTRO, ""] + paper_table(results)
    for name, res in results.items():
        md += dataset_markdown(name, res)
    io.write_json(
        out_dir / "study.json", {"results": results, "paper_cifar10": PAPER_CIFAR10, "quick": quick}
    )
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out_dir / 'report.md'}", file=out)
    return results
