"""Scale-out benchmark: throughput vs device count, and peak memory vs N.

1. Throughput. For D = 1, 2, 4 devices (forced CPU devices via
   ``XLA_FLAGS=--xla_force_host_platform_device_count=D``, one fresh process each; on a GPU/TPU
   machine the real devices), time the sharded stages against the single-device path *in the same
   process*: the P stage (jvp, MLP), one batch of Gauss-Newton HVPs (the body of CG), and a
   weighted training epoch. Correctness is checked first (sharded == single device). Honest
   caveat: forced CPU devices share the host's cores (2 here), so on CPU the ratio measures the
   overhead of the sharded program, not a speed-up; real speed-ups need real devices.
2. Memory vs N. Peak RSS of a fresh process computing P (MLP with 38k params) for N = 2e3 … 1e5,
   next to what N×P per-sample gradients would need, and XLA's compiled scratch size of the P stage.
3. A CIFAR-10-shaped workload (``--cifar``): 32×32×3 inputs, K = 10, the ResNet with BatchNorm
   of ``bench/_nets.py`` (BatchNorm calibrated on 512 inputs, weights at initialisation: time
   and memory do not depend on training), EK-FAC influence (factors streamed in batches, then P
   streamed in chunks) for several N, each in a fresh process: the time of the factors and of P,
   and the peak RSS beside the bytes that must be held anyway (the factors, the N × K output, and
   the inputs when they are arrays). By default the training inputs come from a batch source
   (1,000 at a time, never all in memory); ``--arrays`` holds them in memory instead. The inputs
   are random: no dataset is downloaded.

    python -m bench.bench_scale [--quick]
    python -m bench.bench_scale --cifar [--cifar-n 2000,10000,50000] [--fisher sampled] [--arrays]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _util  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def case(c: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pareto_jax import distributed, influence, kernels, models, train

    D, N, H = c["devices"], c["N"], c["hidden"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 64)).astype(np.float32)
    y = rng.integers(0, 10, N)
    apply, params = models.functional(models.make_model("mlp", (64,), 10, hidden=(H,), seed=0))
    lf = models.per_sample_loss(apply)
    mesh = distributed.make_mesh(D)
    theta = kernels.flatten(lf, params).theta
    U = jax.random.normal(jax.random.PRNGKey(0), (10, theta.size)) * 1e-2
    V = jax.random.normal(jax.random.PRNGKey(1), (10, theta.size))
    out = {**c, "platform": jax.devices()[0].platform, "num_params": int(theta.size)}

    # P stage
    p1 = lambda: influence.influence_from_solutions(
        lf, params, U, x, y, method="jvp", chunk_size=256
    )  # noqa: E731
    pD = lambda: influence.influence_from_solutions(
        lf,
        params,
        U,
        x,
        y,
        mesh=mesh,
        method="jvp",  # noqa: E731
        chunk_size=256,
    )
    out["P_max_rel_diff"] = float(
        np.max(np.abs(np.asarray(p1()) - pD())) / np.max(np.abs(np.asarray(p1())))
    )
    out["P_single_s"] = _util.timeit(p1, repeats=3)
    out["P_sharded_s"] = _util.timeit(pD, repeats=3)
    # HVPs (the work inside every CG step), K right-hand sides at once
    h1, _ = influence.make_hvp(
        lf, params, x, y, weight_decay=1e-3, batch_size=1024, curvature="gauss_newton", apply=apply
    )
    hD, _ = influence.make_hvp(lf, params, x, y, mesh=mesh, weight_decay=1e-3, batch_size=1024,
        curvature="gauss_newton", apply=apply)
    b1, bD = jax.jit(jax.vmap(h1)), jax.jit(jax.vmap(hD))
    out["hvp_max_rel_diff"] = float(jnp.max(jnp.abs(b1(V) - bD(V))) / jnp.max(jnp.abs(b1(V))))
    out["hvp_single_s"] = _util.timeit(lambda: b1(V), repeats=3)
    out["hvp_sharded_s"] = _util.timeit(lambda: bD(V), repeats=3)
    # a full-batch weighted training epoch (identical to one device) and a minibatch one
    for name, bs in (("epoch_fullbatch", None), ("epoch_minibatch", 512)):
        cfg = train.TrainConfig(epochs=1, batch_size=bs, optimizer="sgd", learning_rate=0.1, seed=0)
        e1 = train.make_epoch_fn(lf, cfg, N)
        eD = distributed.make_epoch_fn(lf, cfg, N, mesh)
        o = train.make_optimizer(cfg).init(params)
        xd, yd, wd = jnp.asarray(x), jnp.asarray(y), jnp.ones(N)
        if bs is None:
            a, b = e1(params, o, xd, yd, wd, 0)[0], eD(params, o, xd, yd, wd, 0)[0]
            out[f"{name}_max_abs_diff"] = max(
                float(jnp.max(jnp.abs(u - v)))
                for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
            )
        out[f"{name}_single_s"] = _util.timeit(lambda: e1(params, o, xd, yd, wd, 0), repeats=3)
        out[f"{name}_sharded_s"] = _util.timeit(lambda: eD(params, o, xd, yd, wd, 0), repeats=3)
    for k in ("P", "hvp", "epoch_fullbatch", "epoch_minibatch"):
        out[f"{k}_speedup"] = out[f"{k}_single_s"] / out[f"{k}_sharded_s"]
    return out


def cifar_case(c: dict) -> dict:
    """One CIFAR-shaped EK-FAC influence run of N training inputs (module docstring, 3)."""
    import jax
    import numpy as np
    from flax import nnx

    from bench import _nets
    from pareto_jax import models
    from pareto_jax.influence import Influence, InfluenceConfig

    N, K, n_val, B = c["N"], 10, 1000, 1000
    rng = np.random.default_rng(0)
    xv, yv = rng.normal(size=(n_val, 32 * 32 * 3)).astype(np.float32), np.arange(n_val) % K

    def batch(i):  # the same inputs on every pass, made batch by batch
        r = np.random.default_rng(1000 + i)
        n = min(B, N - i * B)
        return r.normal(size=(n, 32 * 32 * 3)).astype(np.float32), r.integers(0, K, n)

    def source():
        return (batch(i) for i in range(-(-N // B)))

    if c["source"]:
        x, y = source, None
    else:
        parts = list(source())
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    m = _nets.calibrate_batchnorm(_nets.ResNet(K, image_shape=(32, 32, 3), rngs=nnx.Rngs(0)),
        batch(0)[0][:512])
    apply, params = models.functional(m)
    loss = models.per_sample_loss(apply)
    base = _util.rss()
    _util.reset_peak()
    t0 = time.perf_counter()
    fit = Influence(loss, params, x, y, num_classes=K, weight_decay=1e-4, apply=apply, model=m,
        config=InfluenceConfig(solver="ekfac", fisher=c["fisher"], hvp_batch_size=256))
    t_factors = time.perf_counter() - t0
    t0 = time.perf_counter()
    P = np.asarray(_util.block(fit.influence(xv, yv).P))
    t_P = time.perf_counter() - t0
    assert P.shape == (N, K) and np.all(np.isfinite(P))
    mib = 2.0**-20
    f_bytes = sum(int(np.asarray(a).nbytes) for f in fit.factors.factors for a in f)
    return {**c, "platform": jax.devices()[0].platform,
        "num_params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
        "t_factors_s": t_factors, "t_P_s": t_P, "rss_before_MiB": base * mib,
        "rss_peak_MiB": _util.peak() * mib, "peak_over_start_MiB": (_util.peak() - base) * mib,
        "inputs_MiB": (0 if c["source"] else x.nbytes) * mib + xv.nbytes * mib,
        "factors_MiB": f_bytes * mib,
        "output_MiB": P.nbytes * mib}


def cifar(a) -> None:
    ns = [int(n) for n in a.cifar_n.split(",")]
    rows = []
    for n in ns:
        r = _spawn({"N": n, "fisher": a.fisher, "kind": "cifar", "source": not a.arrays},
            force_cpu=False)
        print(r if "error" in r else {k: round(v, 2) if isinstance(v, float) else v
            for k, v in r.items()}, flush=True)
        rows.append(r)
    ok = [r for r in rows if "error" not in r]
    print("\nCIFAR-10-shaped EK-FAC influence (ResNet with BatchNorm, K = 10, 1,000 validation "
        "inputs)")
    print(_util.table(ok, ["N", "source", "fisher", "num_params", "t_factors_s", "t_P_s",
        "rss_peak_MiB", "peak_over_start_MiB", "inputs_MiB", "factors_MiB", "output_MiB"]))
    name = f"scale_cifar_{a.fisher}{'_arrays' if a.arrays else ''}"
    path = _util.write(name, {"machine": _util.machine(), "rows": rows})
    print(f"wrote {path}")


def _spawn(c: dict, force_cpu: bool) -> dict:
    env = dict(os.environ)
    if force_cpu:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={c['devices']}"
        env["JAX_PLATFORMS"] = "cpu"
    p = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--case", json.dumps(c)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**c, "error": (p.stderr or p.stdout)[-1500:]}
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", default=None)
    ap.add_argument("--cifar", action="store_true", help="the CIFAR-10-shaped workload only")
    ap.add_argument("--cifar-n", default="2000,10000,50000")
    ap.add_argument("--fisher", default="expected", choices=("expected", "sampled"))
    ap.add_argument("--arrays", action="store_true",
        help="--cifar: the training inputs as arrays in memory (default: a batch source)")
    a = ap.parse_args()
    if a.case:
        c = json.loads(a.case)
        print(json.dumps(cifar_case(c) if c.get("kind") == "cifar" else case(c)))
        return
    if a.cifar:
        cifar(a)
        return
    import jax

    N = 4000 if a.quick else 20000
    rows = []
    for D in (1, 2, 4):
        r = _spawn({"devices": D, "N": N, "hidden": 256}, force_cpu=True)
        rows.append(r)
        print(
            r
            if "error" in r
            else {
                k: r[k] for k in ("devices", "P_speedup", "hvp_speedup", "epoch_fullbatch_speedup")
            },
            flush=True,
        )
    gpu = []
    if jax.default_backend() != "cpu":
        for D in sorted({1, jax.device_count()}):
            gpu.append(_spawn({"devices": D, "N": 10 * N, "hidden": 256}, force_cpu=False))
    mem = []
    for n in (2000, 20000) if a.quick else (2000, 20000, 100000):
        out = _util.RESULTS / f"_mem_{n}.json"
        _util.RESULTS.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, str(ROOT / "tests" / "_memory_worker.py"), str(n), str(out)],
            check=True, cwd=ROOT, capture_output=True)
        mem.append(json.loads(out.read_text()))
        out.unlink()
    print(
        "\nthroughput vs forced CPU devices (ratio single-device time / sharded time; 2 physical "
        "cores)"
    )
    print(
        _util.table(
            [r for r in rows if "error" not in r],
            ["devices", "N", "P_max_rel_diff", "P_speedup", "hvp_max_rel_diff", "hvp_speedup",
                "epoch_fullbatch_max_abs_diff", "epoch_fullbatch_speedup", "epoch_minibatch_speedup"
            ],
        )
    )
    if gpu:
        print("\naccelerator")
        print(
            _util.table(gpu,
                ["devices", "platform", "N", "P_speedup", "hvp_speedup", "epoch_fullbatch_speedup"])
        )
    print("\npeak memory vs N (P stage through category_influence, MLP)")
    print(
        _util.table(
            mem,
            ["N", "num_params", "rss_peak_MiB", "P_stage_temp_MiB", "solve_temp_MiB",
                "N_by_P_gradients_MiB"],
        )
    )
    path = _util.write(
        "scale_quick" if a.quick else "scale",
        {"machine": _util.machine(), "throughput_cpu_forced": rows, "throughput_accelerator": gpu,
            "memory": mem},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
