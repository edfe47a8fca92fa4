"""Reweighting-program and ceiling-test benchmark: the device path against HiGHS's simplex and IPM.

Correctness first: every timed device solution is compared with HiGHS's objective (relative
difference reported) and its float64 constraint violation recomputed here. Times are the best of
3 after a warm-up call with other thresholds (compilation excluded, reported separately as the
first call's time; HiGHS at N = 1e6 is timed once). HiGHS runs through `scipy.optimize.linprog`
with numpy-array bounds, both as
its dual simplex ("highs-ds") and its interior point method ("highs-ipm"); the speed-up is
against the faster of the two. Cold start: a fresh process with an empty compilation cache,
then a fresh process with the cache it left (import time reported apart).

    python -m bench.bench_pareto            # N = 1e4, 1e5, 1e6 at K = 10; K = 100; population 32;
    cold
    python -m bench.bench_pareto --quick    # small sizes

Writes bench/results/pareto.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_problem(n, k, seed=0):
    """Influence-like P where the targets (classes 0, 1) trade off against the rest: a shared
    factor loads + on the targets and − on the others, so the class constraints bind."""
    import numpy as np

    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 1))
    sign = np.where(np.arange(k) < 2, 1.0, -1.0)
    return (f * sign + rng.normal(size=(n, k)) + 0.05) * 1e-3


def _best(fn, repeats=3):
    """(result, best time of `repeats` calls) — the caller has already warmed `fn` up."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = _util.block(fn())
        best = min(best, time.perf_counter() - t)
    return out, best


def highs_lp(P, c, b, lo, hi, method):
    """max cᵀw s.t. Pᵀw >= b, lo <= w <= hi by scipy's HiGHS (`method`), P scaled by max|P| as
    the package's reference does, bounds as one numpy array: (objective, w)."""
    import numpy as np
    import scipy.optimize

    s = float(np.abs(P).max())
    n = P.shape[0]
    bounds = np.empty((n, 2))
    bounds[:, 0], bounds[:, 1] = lo, hi
    res = scipy.optimize.linprog(-c / s, A_ub=-P.T / s, b_ub=-b / s, bounds=bounds, method=method,
        options=dict(primal_feasibility_tolerance=1e-10, dual_feasibility_tolerance=1e-10))
    assert res.status == 0, res.message
    return float(c @ res.x), res.x


def _check(P, c, b, w, ref_obj):
    import numpy as np

    return (abs(float(c @ w) - ref_obj) / abs(ref_obj),
        float(max(np.max(b - P.T @ w), 0.0)) / float(np.abs(P).sum(0).max()))


def single_case(n, k, targets=(0, 1), seed=0):
    import numpy as np

    from pareto_jax import pareto

    P = make_problem(n, k, seed)
    rng = np.random.default_rng(seed + 1)
    warm, alpha = rng.uniform(0.9, 1.0, k), rng.uniform(0.9, 1.0, k)  # near 1: constraints bind
    t = time.perf_counter()
    pareto.solve_reweighting(P, targets, warm)
    t_first = time.perf_counter() - t
    pareto.solve_reweighting(P, targets, warm)
    dev, t_dev = _best(lambda: pareto.solve_reweighting(P, targets, alpha))
    assert dev.status == 0 and dev.solver == "device", (dev.message, dev.notes)
    cfg = pareto.ReweightConfig()
    _, c, b = pareto.program_data(P, targets, alpha, cfg)
    lo, hi = cfg.bounds
    out = {"case": "single", "n": n, "k": k, "t_device": t_dev, "t_first_call": t_first,
        "notes": list(dev.notes)}
    reps = 3 if n < 1_000_000 else 1  # (at N = 1e6 one HiGHS solve takes minutes here)
    for method in ("highs-ds", "highs-ipm"):
        (obj, _), t_h = _best(lambda: highs_lp(P, c, b, lo, hi, method), reps)
        out[f"t_{method}"] = t_h
        out[f"obj_rel_diff_vs_{method}"], _ = _check(P, c, b, dev.w, obj)
    out["violation_rel"] = _check(P, c, b, dev.w, 1.0)[1]
    out["t_highs_best"] = min(out["t_highs-ds"], out["t_highs-ipm"])
    out["speedup_vs_faster_highs"] = out["t_highs_best"] / t_dev
    assert out["obj_rel_diff_vs_highs-ds"] <= 1e-6 and out["violation_rel"] <= 1e-9, out
    return out


def ceiling_case(n, k, seed=0):
    import numpy as np

    from pareto_jax import pareto

    P = make_problem(n, k, seed)
    t = time.perf_counter()
    pareto.ceiling_test(P)
    t_first = time.perf_counter() - t
    Q = make_problem(n, k, seed + 7)
    dev, t_dev = _best(lambda: pareto.ceiling_test(Q))
    ref, t_h = _best(lambda: pareto.ceiling_test(Q, solver="highs"))
    scale = float(np.abs(Q).sum(0).max())
    assert abs(dev.t_star - ref.t_star) <= 1e-9 * scale
    return {"case": "ceiling", "n": n, "k": k, "t_device": t_dev, "t_first_call": t_first,
        "t_highs": t_h, "speedup": t_h / t_dev,
        "t_star_rel_diff": abs(dev.t_star - ref.t_star) / scale}


def population_case(n, k, m=32, targets=(0, 1), seed=0):
    import numpy as np

    from pareto_jax import pareto

    P = make_problem(n, k, seed)
    rng = np.random.default_rng(seed + 2)
    alphas = rng.uniform(0.9, 1.0, (m, k))
    out = {"case": "population", "n": n, "k": k, "m": m}
    cfg = pareto.ReweightConfig()
    lo, hi = cfg.bounds
    data = [pareto.program_data(P, targets, a, cfg) for a in alphas]
    # the faster HiGHS method on this problem, decided on the first program
    t_ds = _best(lambda: highs_lp(P, data[0][1], data[0][2], lo, hi, "highs-ds"), 1)[1]
    t_ipm = _best(lambda: highs_lp(P, data[0][1], data[0][2], lo, hi, "highs-ipm"), 1)[1]
    method = "highs-ds" if t_ds < t_ipm else "highs-ipm"
    refs, t_seq = _best(lambda: [highs_lp(P, c, b, lo, hi, method)[0] for _, c, b in data], 1)
    out.update(t_sequential_highs=t_seq, highs_method=method)
    for mode in ("vmap", "map"):
        warm = rng.uniform(0.9, 1.0, (m, k))
        pareto.solve_reweighting_batch(P, targets, warm, batch=mode)  # compile
        batch, t = _best(lambda: pareto.solve_reweighting_batch(P, targets, alphas, batch=mode))
        assert all(s.status == 0 and s.solver == "device" for s in batch)
        out[f"t_device_{mode}"] = t
        out[f"speedup_{mode}"] = t_seq / t
        out[f"obj_rel_diff_{mode}"] = max(
            _check(P, c, b, s.w, r)[0] for (_, c, b), s, r in zip(data, batch, refs)
        )
        out[f"violation_rel_{mode}"] = max(
            _check(P, c, b, s.w, 1.0)[1] for (_, c, b), s in zip(data, batch)
        )
        assert out[f"obj_rel_diff_{mode}"] <= 1e-6 and out[f"violation_rel_{mode}"] <= 1e-9, out
    return out


COLD = """
import time
t0 = time.perf_counter()
import numpy as np
from pareto_jax import pareto
from bench.bench_pareto import make_problem, highs_lp
t_import = time.perf_counter() - t0
P = make_problem({n}, {k})
alpha = np.random.default_rng(1).uniform(0.9, 1.0, {k})
t = time.perf_counter(); r = pareto.solve_reweighting(P, (0, 1), alpha); t_first =
time.perf_counter() - t
assert r.status == 0
cfg = pareto.ReweightConfig(); _, c, b = pareto.program_data(P, (0, 1), alpha, cfg)
th = []
for m in ("highs-ds", "highs-ipm"):
    t = time.perf_counter(); highs_lp(P, c, b, 0.0, 2.0, m); th.append(time.perf_counter() - t)
print("RESULT", t_import, t_first, th[0], th[1])
"""


def cold_case(n, k):
    """First call in a fresh process: with an empty compilation cache, then with the cache the
    first process left (each compared with a first HiGHS call in the same process)."""
    out = {"case": "cold", "n": n, "k": k}
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "PARETO_JAX_COMPILATION_CACHE": "1", "PARETO_JAX_CACHE_DIR": d,
            "PYTHONPATH": str(ROOT)}
        for label in ("empty_cache", "warm_cache"):
            p = subprocess.run([sys.executable, "-c", COLD.format(n=n, k=k)], env=env,
                capture_output=True, text=True, timeout=1800, cwd=ROOT)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
            if p.returncode or not line:
                return {**out, "error": p.stderr[-2000:]}
            t_imp, t_first, t_ds, t_ipm = map(float, line[0].split()[1:])
            out.update(
                {f"t_import_{label}": t_imp, f"t_first_call_{label}": t_first,
                    f"t_highs_best_{label}": min(t_ds, t_ipm)}
            )
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        c = json.loads(a.case)
        fn = {"single": single_case, "population": population_case, "ceiling": ceiling_case}[
            c.pop("case")
        ]
        print(json.dumps(fn(**c)))
        return
    if a.quick:
        cases = [{"case": "single", "n": 10_000, "k": 10},
            {"case": "ceiling", "n": 10_000, "k": 10},
            {"case": "population", "n": 10_000, "k": 10, "m": 8}]
        colds = [(10_000, 10)]
    else:
        cases = [{"case": "single", "n": n, "k": 10} for n in (10_000, 100_000, 1_000_000)]
        cases += [{"case": "single", "n": 100_000, "k": 100},
            {"case": "ceiling", "n": 10_000, "k": 10}, {"case": "ceiling", "n": 100_000, "k": 10},
            {"case": "population", "n": 100_000, "k": 10, "m": 32}]
        colds = [(100_000, 10)]
    os.environ.setdefault(
        "PARETO_JAX_COMPILATION_CACHE", "0"
    )  # warm timings: compile excluded anyway
    rows = []
    for c in cases:
        r = _util.in_subprocess("bench.bench_pareto", dict(c))
        rows.append(r)
        print(json.dumps(r), flush=True)
    for n, k in colds:
        r = cold_case(n, k)
        rows.append(r)
        print(json.dumps(r), flush=True)
    p = _util.write(
        "pareto" + ("_quick" if a.quick else ""), {"machine": _util.machine(), "rows": rows}
    )
    print("\nsingle program, warm (best of 3, s)")
    print(
        _util.table(
            [r for r in rows if r.get("case") == "single"],
            ["n", "k", "t_device", "t_highs-ds", "t_highs-ipm", "speedup_vs_faster_highs",
                "obj_rel_diff_vs_highs-ds", "violation_rel", "t_first_call"],
        )
    )
    print("\nceiling test, warm (best of 3, s)")
    print(
        _util.table([r for r in rows if r.get("case") == "ceiling"],
            ["n", "k", "t_device", "t_highs", "speedup", "t_star_rel_diff", "t_first_call"])
    )
    print("\npopulation of α (s)")
    print(
        _util.table(
            [r for r in rows if r.get("case") == "population"],
            ["n", "k", "m", "t_device_vmap", "t_device_map", "t_sequential_highs", "highs_method",
                "speedup_vmap", "speedup_map", "obj_rel_diff_map", "violation_rel_map"],
        )
    )
    print("\ncold start, fresh process (s)")
    print(
        _util.table(
            [r for r in rows if r.get("case") == "cold"],
            ["n", "k", "t_import_empty_cache", "t_first_call_empty_cache",
                "t_highs_best_empty_cache", "t_import_warm_cache", "t_first_call_warm_cache"],
        )
    )
    for r in rows:
        if "error" in r:
            print("FAILED", r)
    print(f"\nwrote {p}")


if __name__ == "__main__":
    main()
