"""Influence-matrix benchmark: closed-form last layer vs plain matmul vs per-sample gradients,
and forward-mode (jvp) vs per-sample gradients on an MLP.

Every case runs in its own process (so peak memory is its own), checks correctness on a slice
against an independent path before timing, excludes compilation, and blocks on results.

    python -m bench.bench_influence            # N = 1e4, 1e5, 1e6 (d = 512, K = 10) + MLP N = 5e4
    python -m bench.bench_influence --quick    # small sizes, a minute

Writes bench/results/influence.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402


def _linear_case(n: int, d: int, k: int, materialise: bool, full: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from pareto_jax import closed_form, influence, kernels, models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32) / np.sqrt(d)
    y = rng.integers(0, k, n).astype(np.int32)
    W = jnp.asarray(rng.normal(size=(d, k)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(k,)).astype(np.float32) * 0.1)
    U = jnp.asarray(rng.normal(size=(k, d + 1, k)).astype(np.float32))
    Theta = jnp.concatenate([W, b[None]], 0)
    chunk = 8192
    xc, yc, mc = kernels.pad_chunks(x, y, chunk)
    xc, mc = jnp.asarray(xc), jnp.asarray(mc)
    yc = jnp.asarray(yc)
    xd = jnp.asarray(x)

    def closed_p():
        return closed_form.linear_P_chunks(xc, yc, mc, Theta, U)

    matmul = jax.jit(lambda x, W: x @ W)

    def plain():
        return matmul(xd, W)

    # correctness on a slice: closed-form P stage == generic autodiff per-sample path
    params = models.linear_head_params(W, b)
    loss_fn = models.per_sample_loss(models.functional(models.make_model("linear", (d,), k))[0])
    flat_U = jax.vmap(lambda u: ravel_pytree({"head": {"bias": u[d], "kernel": u[:d]}})[0])(U)
    m = min(n, 2000)
    ref = (
        influence.influence_from_solutions(
            loss_fn, params, flat_U, x[:m], y[:m], method="per_sample"
        )
        * m
    )
    got = np.asarray(closed_p()).reshape(-1, k)[:m]
    err = float(np.abs(got - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())
    assert err < 1e-4, err

    out = {"case": "linear", "n": n, "d": d, "k": k, "check_rel_err": err}
    out["t_matmul"] = _util.timeit(plain, repeats=5)
    Mw = jnp.asarray(rng.normal(size=(d, k + k * (k - 1))).astype(np.float32))

    def wide():
        return matmul(xd, Mw)

    out["t_matmul_same_width"] = _util.timeit(wide, repeats=3)
    out["t_closed_form_P"] = _util.timeit(closed_p, repeats=3)
    out["ratio_closed_form_P_vs_same_width_matmul"] = (
        out["t_closed_form_P"] / out["t_matmul_same_width"]
    )
    out["ratio_closed_form_P_vs_matmul"] = out["t_closed_form_P"] / out["t_matmul"]
    out["mem_matmul"] = _util.xla_memory(matmul, xd, W)
    out["mem_closed_form_P"] = _util.xla_memory(closed_form.linear_P_chunks, xc, yc, mc, Theta, U)
    if full:
        xv = x[: 20 * k]
        yv = (np.arange(20 * k) % k).astype(np.int32)

        def full_closed():
            return closed_form.linear_influence(
                x, y, xv, yv, W, b, weight_decay=1e-3, chunk_size=chunk
            )

        out["t_closed_form_total"] = _util.timeit(full_closed, repeats=1)
        out["rss_closed_form_total"] = _util.measure_peak(full_closed) if n <= 100_000 else -1
    if materialise:
        flat = kernels.flatten(loss_fn, params)
        theta, f = flat.theta, flat.loss
        grads = jax.jit(lambda th, x, y, U: jax.vmap(jax.grad(f), (None, 0, 0))(th, x, y) @ U.T)
        yd = jnp.asarray(y)

        def per_sample():
            return grads(theta, xd, yd, flat_U)

        out["t_materialised_per_sample"] = _util.timeit(per_sample, repeats=1)
        out["speedup_closed_form_vs_per_sample"] = (
            out["t_materialised_per_sample"] / out["t_closed_form_P"]
        )
        out["mem_materialised_per_sample"] = _util.xla_memory(grads, theta, xd, yd, flat_U)
    return out


def _mlp_case(n: int, d: int, hidden: int, k: int, chunk: int) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from pareto_jax import backend, influence, kernels, models

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, n).astype(np.int32)
    apply, params = models.functional(models.make_model("mlp", (d,), k, hidden=(hidden,)))
    loss_fn = models.per_sample_loss(apply)
    flat = kernels.flatten(loss_fn, params)
    theta, f = flat.theta, flat.loss
    U = jnp.asarray(rng.normal(size=(k, theta.size)).astype(np.float32))
    a = influence.influence_from_solutions(loss_fn, params, U, x[:512], y[:512], method="jvp")
    bb = influence.influence_from_solutions(
        loss_fn, params, U, x[:512], y[:512], method="per_sample"
    )
    err = float(np.abs(np.asarray(a) - np.asarray(bb)).max() / np.abs(np.asarray(bb)).max())
    assert err < 1e-4, err
    out = {"case": "mlp", "n": n, "d": d, "hidden": hidden, "k": k, "params": int(theta.size),
        "chunk": chunk, "check_rel_err": err}
    for method in ("jvp", "per_sample"):
        fn = lambda: influence.influence_from_solutions(
            loss_fn,
            params,
            U,
            x,
            y,
            method=method,  # noqa: E731
            chunk_size=chunk,
        )
        out[f"t_{method}"] = _util.timeit(fn, repeats=2)
        chunks = backend.Local().chunks(x, y, chunk, theta.dtype)
        out[f"mem_{method}"] = _util.xla_memory(
            backend.influence_rows_program, f, method, theta, U, chunks, x.shape[0]
        )
    out["ratio_per_sample_over_jvp"] = out["t_per_sample"] / out["t_jvp"]
    return out


def run_case(case: dict) -> dict:
    if case["case"] == "linear":
        return _linear_case(case["n"], case["d"], case["k"], case["materialise"], case["full"])
    return _mlp_case(case["n"], case["d"], case["hidden"], case["k"], case["chunk"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(run_case(json.loads(a.case))))
        return
    ns = (10_000, 30_000) if a.quick else (10_000, 100_000, 1_000_000)
    cases = [
        {"case": "linear", "n": n, "d": 512, "k": 10, "materialise": n <= 100_000,
            "full": n <= 100_000}
        for n in ns
    ]
    mlp_n = 5_000 if a.quick else 50_000
    cases += [
        {"case": "mlp", "n": mlp_n, "d": 256, "hidden": 256, "k": k, "chunk": 256}
        for k in (2, 10, 32)
    ]
    rows = []
    for c in cases:
        r = _util.in_subprocess("bench.bench_influence", c)
        rows.append(r)
        print(json.dumps(r), flush=True)
    p = _util.write(
        "influence" + ("_quick" if a.quick else ""), {"machine": _util.machine(), "rows": rows}
    )
    lin = [r for r in rows if r.get("case") == "linear" and "error" not in r]
    for r in lin:
        for key in [k for k in r if k.startswith("mem_")]:
            r[key] = r[key] / 2**20 if r[key] > 0 else r[key]
    print("\nlast layer, d = 512, K = 10 (times in s, memory in MiB above baseline)")
    print(
        _util.table(
            lin,
            ["n", "t_matmul", "t_matmul_same_width", "t_closed_form_P",
                "ratio_closed_form_P_vs_matmul", "ratio_closed_form_P_vs_same_width_matmul",
                "t_closed_form_total", "t_materialised_per_sample",
                "speedup_closed_form_vs_per_sample", "mem_matmul", "mem_closed_form_P",
                "mem_materialised_per_sample"],
        )
    )
    mlp = [r for r in rows if r.get("case") == "mlp" and "error" not in r]
    for r in mlp:
        for key in ("mem_jvp", "mem_per_sample"):
            r[key] = r[key] / 2**20 if r[key] > 0 else r[key]
    print("\nMLP P stage (times in s, memory in MiB)")
    print(
        _util.table(
            mlp,
            ["n", "params", "k", "t_jvp", "t_per_sample", "ratio_per_sample_over_jvp", "mem_jvp",
                "mem_per_sample"],
        )
    )
    errs = [r for r in rows if "error" in r]
    for r in errs:
        print("FAILED", r)
    print(f"\nwrote {p}")


if __name__ == "__main__":
    main()
