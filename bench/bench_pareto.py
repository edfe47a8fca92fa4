"""Reweighting-program benchmark: the structured dual solver vs HiGHS, single and population.

Correctness first: every timed dual solution is compared with HiGHS's objective (relative
difference reported) and its float64 constraint violation. Compilation is excluded (a warm-up
solve with the same shapes but other thresholds runs first).

    python -m bench.bench_pareto            # N = 1e4, 1e5, 1e6 (K = 10), N = 1e5 (K = 100), population 32
    python -m bench.bench_pareto --quick    # small sizes

Writes bench/results/pareto.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402


def make_problem(n, k, seed=0):
    """Influence-like P where the targets (classes 0, 1) trade off against the rest: a shared
    factor loads + on the targets and − on the others, so the class constraints bind."""
    import numpy as np

    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 1))
    sign = np.where(np.arange(k) < 2, 1.0, -1.0)
    return (f * sign + rng.normal(size=(n, k)) + 0.05) * 1e-3


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def single_case(n, k, targets=(0, 1), seed=0):
    import numpy as np

    from pareto_jax import pareto

    P = make_problem(n, k, seed)
    rng = np.random.default_rng(seed + 1)
    warm = rng.uniform(0.9, 1.0, k)
    alpha = rng.uniform(0.9, 1.0, k)  # near 1: several class constraints bind
    pareto.solve_reweighting(P, targets, warm)  # compile
    dual, t_dual = _timed(lambda: pareto.solve_reweighting(P, targets, alpha))
    ref, t_highs = _timed(lambda: pareto.solve_reweighting(P, targets, alpha, solver="highs"))
    assert dual.status == ref.status == 0, (dual.message, ref.message)
    rel = abs(dual.objective - ref.objective) / abs(ref.objective)
    return {"case": "single", "n": n, "k": k, "t_dual": t_dual, "t_highs": t_highs,
            "speedup": t_highs / t_dual, "objective_rel_diff": rel,
            "max_violation_dual": dual.max_violation, "max_violation_highs": ref.max_violation,
            "n_fractional": dual.n_fractional, "active_constraints": int((ref.duals > 1e-12).sum()),
            "solver": dual.solver, "notes": list(dual.notes)}


def population_case(n, k, m=32, targets=(0, 1), seed=0):
    import numpy as np

    from pareto_jax import pareto

    P = make_problem(n, k, seed)
    rng = np.random.default_rng(seed + 2)
    alphas = rng.uniform(0.9, 1.0, (m, k))
    out = {"case": "population", "n": n, "k": k, "m": m}
    for mode in ("vmap", "map"):
        pareto.solve_reweighting_batch(P, targets, rng.uniform(0.9, 1.0, (m, k)), batch=mode)  # compile
        batch, t = _timed(lambda: pareto.solve_reweighting_batch(P, targets, alphas, batch=mode))
        out[f"t_batched_dual_{mode}"] = t
        out[f"batch_{mode}"] = batch
    refs, t_seq = _timed(lambda: [pareto.solve_reweighting(P, targets, a, solver="highs") for a in alphas])
    out["t_sequential_highs"] = t_seq
    for mode in ("vmap", "map"):
        batch = out.pop(f"batch_{mode}")
        assert all(b.status == r.status == 0 for b, r in zip(batch, refs))
        out[f"speedup_{mode}"] = t_seq / out[f"t_batched_dual_{mode}"]
        out[f"objective_rel_diff_{mode}"] = max(abs(b.objective - r.objective) / abs(r.objective)
                                                for b, r in zip(batch, refs))
        out[f"max_violation_{mode}"] = max(b.max_violation for b in batch)
        out[f"fallbacks_{mode}"] = sum(b.solver != "dual" for b in batch)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        c = json.loads(a.case)
        out = single_case(c["n"], c["k"]) if c["case"] == "single" else population_case(c["n"], c["k"], c["m"])
        print(json.dumps(out))
        return
    if a.quick:
        cases = [{"case": "single", "n": 10_000, "k": 10}, {"case": "population", "n": 10_000, "k": 10, "m": 32}]
    else:
        cases = [{"case": "single", "n": n, "k": 10} for n in (10_000, 100_000, 1_000_000)]
        cases += [{"case": "single", "n": 100_000, "k": 100},
                  {"case": "population", "n": 100_000, "k": 10, "m": 32}]
    rows = []
    for c in cases:
        r = _util.in_subprocess("bench.bench_pareto", c)
        rows.append(r)
        print(json.dumps(r), flush=True)
    p = _util.write("pareto" + ("_quick" if a.quick else ""), {"machine": _util.machine(), "rows": rows})
    print("\nsingle program (times in s)")
    print(_util.table([r for r in rows if r.get("case") == "single"],
                      ["n", "k", "t_dual", "t_highs", "speedup", "objective_rel_diff",
                       "max_violation_dual", "n_fractional", "active_constraints"]))
    print("\npopulation of α (times in s)")
    print(_util.table([r for r in rows if r.get("case") == "population"],
                      ["n", "k", "m", "t_batched_dual_vmap", "t_batched_dual_map", "t_sequential_highs",
                       "speedup_vmap", "speedup_map", "objective_rel_diff_map", "max_violation_map",
                       "fallbacks_vmap", "fallbacks_map"]))
    for r in rows:
        if "error" in r:
            print("FAILED", r)
    print(f"\nwrote {p}")


if __name__ == "__main__":
    main()
