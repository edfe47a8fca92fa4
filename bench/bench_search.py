"""Search benchmark: one generation three ways on the same candidates, population 32: fused (the
population's programs, weighted epochs and validation counts in one jitted call), batched in two
calls (the batched program solve, then the vmapped epochs) and sequential (one candidate at a
time).

Correctness first: both paths must give identical fitness values. Compilation is excluded
(each path first evaluates a different warm-up population); each time is the best of
`--repeats` runs (the machines are shared).

    python -m bench.bench_search [--quick] [--dataset mnist5k|digits] [--population 32]

Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument(
        "--repeats", type=int, default=5, help="each timing is the best of this many runs"
    )
    a = ap.parse_args()

    def best_of(fn, n):
        ts, out = [], None
        for _ in range(n):
            t = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t)
        return min(ts), out

    import numpy as np

    from pareto_jax import data, evaluation, influence, models, pipeline, search, train

    ds = "digits" if a.quick else a.dataset
    s = pipeline.load_data(pipeline.DataConfig(name=ds))
    noisy, _ = data.inject_label_noise(s.train, (3, 8), 0.4)
    apply, params = models.functional(models.make_model("linear", s.train.x.shape[1:], 10))
    loss_fn = models.per_sample_loss(apply)
    cfg = train.TrainConfig(epochs=10, batch_size=128, learning_rate=0.003, weight_decay=1e-3)
    st = train.train(loss_fn, params, noisy.x, noisy.y, cfg).state
    prob = search.SearchProblem(
        loss_fn, apply, st, cfg, noisy.x, noisy.y, s.val.x, s.val.y, s.test.x, s.test.y, 10
    )
    P = np.asarray(
        influence.linear_category_influence(
            st.params, noisy.x, noisy.y, s.val.x, s.val.y, num_classes=10, weight_decay=1e-3
        ).P
    )
    rng = np.random.default_rng(0)
    M = a.population
    rows = {}
    fits = {}
    for tag, batched, fused in (("fused", True, True), ("batched", True, False),
        ("sequential", False, False)):
        scfg = search.SearchConfig(population=M, batched=batched, fused=fused)
        ev = evaluation.Evaluator(prob)
        ref = np.asarray(ev.acc(st.params, ev.xv, ev.yv))
        popn = search.Population(ev, P, (3, 8), ref, scfg)
        warm = np.column_stack([rng.uniform(0.5, 1, (M, 10)), rng.uniform(0, 1, M)])
        popn.evaluate(warm)  # compile
        genome = np.column_stack(
            [np.random.default_rng(1).uniform(0.5, 1, (M, 10)),
                np.random.default_rng(2).uniform(0, 1, M)]
        )

        def generation():
            popn.cache.clear()
            return popn.evaluate(genome)

        rows[f"t_{tag}"], cands = best_of(generation, a.repeats)
        fits[tag] = [c.fitness for c in cands]
        if fused:
            assert popn.fused and ev._gen, "the fused path did not run"
            continue
        # the two halves of a generation, timed on their own: program solves, then training
        W = np.stack(
            [
                popn.solutions[g.tobytes()].w
                if popn.solutions[g.tobytes()].w is not None
                else np.ones(len(P))
                for g in genome
            ]
        )
        rows[f"t_train_{tag}"], _ = best_of(
            lambda: _util.block(ev.train_many(W, batched)[0]), a.repeats
        )
        rows[f"t_programs_{tag}"], _ = best_of(lambda: popn.solve(genome), a.repeats)
    same = all(
        all((x == y) or (np.isinf(x) and np.isinf(y)) for x, y in zip(fits["fused"], fits[t]))
        for t in ("batched", "sequential")
    )
    assert same, fits
    out = {"dataset": ds, "n_train": int(len(noisy.y)), "population": M, **rows,
        "speedup_fused": rows["t_sequential"] / rows["t_fused"],
        "speedup": rows["t_sequential"] / rows["t_batched"],
        "speedup_training": rows["t_train_sequential"] / rows["t_train_batched"],
        "speedup_programs": rows["t_programs_sequential"] / rows["t_programs_batched"],
        "identical_fitness": same, "n_finite": int(np.isfinite(fits["fused"]).sum())}
    print(
        _util.table(
            [out],
            ["dataset", "n_train", "population", "t_fused", "t_batched", "t_sequential",
                "speedup_fused", "speedup", "t_train_batched", "t_train_sequential",
                "speedup_training", "t_programs_batched", "t_programs_sequential",
                "speedup_programs", "identical_fitness", "n_finite"],
        )
    )
    p = _util.write(
        "search" + ("_quick" if a.quick else ""), {"machine": _util.machine(), "result": out}
    )
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
