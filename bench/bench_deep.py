"""Deep networks: category-wise influence on a trained CNN, ours against Kronfluence, and training
at the floor.

For each network (the library's CNN: conv 8 → conv 16 → dense 64 → 10, 52k params; and a wider
one: conv 16 → conv 32 → dense 128, 207k params; on request, ``--networks resnet,transformer``,
the small ResNet with BatchNorm (38k params) and the row-token vision transformer (19k params)
of ``bench/_nets.py``, and two shapes the bench was not tuned on: ``deep``, three conv blocks
16 → 32 → 32 from a full-resolution first layer, dense 96, 42k params; ``k100``, the CNN on
K = 100 classes, two MNIST digits side by side labelled 10·left + right), trained by the
library on MNIST-5k (3,000 train / 1,000 val / 1,000 test):

* training speed: one weighted epoch (`train.make_epoch_fn`) against a minimal jitted Adam step
  loop over the same minibatches (checked to give the same parameters first);
* category-wise influence P (N × K) by our EK-FAC (exact class expectation, and with one sampled
  label per sample), K-FAC, EK-FAC-preconditioned Gauss-Newton CG,
  plain Gauss-Newton CG and the last-layer closed form, and by **Kronfluence's EK-FAC on the same
  network** (weights ported to PyTorch, logits checked equal first), all at the same damping of
  the curvature (ours: weight decay + δ = Kronfluence's δ); time of a first and a second call,
  peak extra memory, and Spearman agreement between methods (flattened N × K), with Kronfluence
  against itself under another label-sampling seed as the noise floor. For the ResNet and the
  transformer every method is over the Linear / Conv layers with the norm layers and the
  positional parameter held fixed (our K-FAC / EK-FAC by default, our CG by ``select=``,
  Kronfluence because it tracks nothing else);
* agreement with actual retraining: for a few classes t, remove the 10% of training samples with
  the largest (beneficial) or smallest (detrimental) P[:, t], retrain from the same
  initialisation with the same batch order (removed samples get weight 0), and correlate the
  predicted change of every class's validation loss (Σ_{removed} P[i, k]) with the actual one.

The PyTorch side needs the ``peers`` extra in its own venv (see ``bench/_peer_torch.py``); without
it the Kronfluence rows are reported as not installed and everything else runs.

    python -m bench.bench_deep                 # both networks (about 20 minutes on 2 CPU cores)
    python -m bench.bench_deep --quick         # small N, one network (CI-sized)
    python -m bench.bench_deep --networks resnet,transformer,deep,k100   # the others (--quick too)
    .venv-bench/bin/python -m bench.bench_deep # with Kronfluence

Writes bench/results/deep.json (deep_quick.json) and prints the tables.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

from bench import _nets, _util  # noqa: E402

NETWORKS = {"cnn": dict(channels=(8, 16), dense=64), "wide": dict(channels=(16, 32), dense=128),
    # shapes the bench was not tuned on: three conv blocks from a full-resolution first layer
    # (42k params), and the CNN on 100 classes (two-digit MNIST, `_two_digits`)
    "deep": dict(channels=(16, 32, 32), dense=96), "k100": dict(channels=(8, 16), dense=64)}
SHAPES = {"k100": ((28, 56, 1), 100)}  # (image shape, K); the others MNIST's ((28, 28, 1), 10)
# bench/_nets.py: layers K-FAC does not factor (BatchNorm, LayerNorm, a positional parameter) are
# held fixed by every method here (ours by K-FAC's default selection and CG's select=, Kronfluence
# because it tracks only nn.Linear / nn.Conv2d)
OTHER_NETWORKS = ("resnet", "transformer")


def _peer():
    try:
        from bench import _peer_torch
    except ImportError as e:  # torch / kronfluence not installed in this venv
        return None, str(e)
    return _peer_torch, None


def _timed(fn):
    """(first-call seconds, second-call seconds, peak extra bytes of the second call, output)."""
    t0 = time.perf_counter()
    _util.block(fn())
    first = time.perf_counter() - t0
    base = _util.rss()
    _util.reset_peak()
    t0 = time.perf_counter()
    out = _util.block(fn())
    second = time.perf_counter() - t0
    return first, second, max(_util.peak() - base, 0), out


def _two_digits(s, seed):
    """MNIST-5k's splits as 100-class data: each image beside another of the same split drawn at
    random (28 × 56), labelled 10·(left digit) + (right digit)."""
    import types

    import numpy as np

    rng = np.random.default_rng(seed + 100)

    def pair(part):
        j = rng.permutation(len(part.y))
        x = np.concatenate([part.x.reshape(-1, 28, 28), part.x[j].reshape(-1, 28, 28)], axis=2)
        return types.SimpleNamespace(x=x.reshape(len(j), -1), y=(10 * part.y + part.y[j]))

    return types.SimpleNamespace(train=pair(s.train), val=pair(s.val), test=pair(s.test))


def _setup(kind, n_train, epochs, seed=0):
    import numpy as np

    from pareto_jax import datasets, models, train

    s = datasets.load_splits("mnist5k", seed=seed)
    shape, K = SHAPES.get(kind, ((28, 28, 1), 10))
    if K == 100:
        s = _two_digits(s, seed)
    keep = np.sort(np.random.default_rng(seed).permutation(len(s.train.y))[:n_train])
    xt, yt = s.train.x[keep], s.train.y[keep]
    if kind in NETWORKS:
        m = models.make_model(
            "cnn", (int(np.prod(shape)),), K, image_shape=shape, seed=seed, **NETWORKS[kind]
        )
    else:  # BatchNorm statistics set once from training rows, then fixed (bench/_nets.py)
        m = _nets.make_net(kind, num_classes=K, seed=seed, calibration=xt[:512])
    apply, params0 = models.functional(m)
    lf = models.per_sample_loss(apply)
    cfg = train.TrainConfig(
        epochs=epochs, batch_size=128, learning_rate=3e-3, weight_decay=1e-4, seed=seed
    )
    params = train.train(lf, params0, xt, yt, cfg).params
    acc = train.evaluate(apply, params, s.val.x, s.val.y, K)
    return dict(s=s, xt=xt, yt=yt, m=m, apply=apply, params0=params0, params=params, lf=lf, cfg=cfg,
        val_acc=acc.overall_accuracy, n_params=int(sum(np.size(p) for p in _leaves(params))),
        K=K, shape=shape)


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def epoch_speed(st) -> dict:
    """Our weighted epoch vs a minimal jitted Adam step loop on the same minibatches."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from pareto_jax import train

    lf, apply, cfg = st["lf"], st["apply"], st["cfg"]
    x, y = jnp.asarray(st["xt"]), jnp.asarray(st["yt"])
    n = x.shape[0]
    w = jnp.ones(n)
    state = train.init_state(st["params0"], cfg)
    ours = train.make_epoch_fn(lf, cfg, n)
    fns = train.epoch_fns(lf, cfg, n, *train.batches_per_epoch(n, cfg.batch_size))
    idx, slot, _ = jax.jit(lambda w: fns.plan(w, None, 0))(w)
    batches = [
        (x[np.asarray(i)[np.asarray(s) > 0]], y[np.asarray(i)[np.asarray(s) > 0]])
        for i, s in zip(idx, slot)
    ]
    opt = optax.adam(cfg.learning_rate)

    @jax.jit
    def step(p, o, xb, yb):
        def loss(p):
            ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb))
            return ce + 0.5 * cfg.weight_decay * sum(
                jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(p)
            )

        u, o = opt.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, u), o

    def minimal():
        p, o = state.params, state.opt_state
        for xb, yb in batches:
            p, o = step(p, o, xb, yb)
        return p

    def our_epoch():
        return ours(state.params, state.opt_state, x, y, w, 0)[0]

    a, b = our_epoch(), minimal()
    err = max(
        float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
        for u, v in zip(_leaves(a), _leaves(b))
    )
    assert err < 1e-3, f"our epoch and the minimal loop disagree ({err})"
    t_ours, t_min = _util.timeit(our_epoch, repeats=5), _util.timeit(minimal, repeats=5)
    return {"t_epoch_ours": t_ours, "t_epoch_minimal": t_min, "ratio_epoch": t_ours / t_min,
        "params_rel_diff": err, "execution": "stepped" if hasattr(ours, "plan") else "compiled"}


def influence_rows(st, damping_total: float, *, pcg_rtol: float, max_steps: int,
    cg_rows: bool = True) -> dict:
    """P by each of our methods, timed (first and second call) with peak memory (`cg_rows` False:
    without the two Gauss-Newton CG rows, which take minutes)."""
    import numpy as np
    from flax import nnx

    from pareto_jax import closed_form, influence, models

    FACTORED = (nnx.Linear, nnx.Conv)  # = kfac.FACTORED_TYPES for these networks (no Embed)
    s, xt, yt, lf, apply, m, params = (st["s"], st["xt"], st["yt"], st["lf"], st["apply"], st["m"],
        st["params"])
    wd = st["cfg"].weight_decay
    dmp = damping_total - wd
    kw = dict(num_classes=st["K"], weight_decay=wd, apply=apply, model=m)
    cg = dict(curvature="gauss_newton", damping=dmp, rtol=pcg_rtol, max_steps=max_steps,
        hvp_batch_size=256)
    # every method over the Linear / Conv layers, the rest (norm layers, a positional parameter)
    # held fixed: K-FAC / EK-FAC's default selection, and CG's select= (all the CNNs' params)
    select = {"EK-FAC": None, "EK-FAC, sampled Fisher": None, "K-FAC": None}
    configs = {"EK-FAC": influence.InfluenceConfig(solver="ekfac", damping=dmp),
        # one label drawn per sample (Kronfluence's default): one backward pass per batch, not K
        "EK-FAC, sampled Fisher": influence.InfluenceConfig(solver="ekfac", damping=dmp,
            fisher="sampled"),
        "K-FAC": influence.InfluenceConfig(solver="kfac", damping=dmp),
        "GGN-CG, EK-FAC preconditioned": influence.InfluenceConfig(preconditioner="ekfac", **cg),
        "GGN-CG": influence.InfluenceConfig(**cg)}
    if not cg_rows:
        configs = {k: v for k, v in configs.items() if "CG" not in k}
    rows = {}
    for name, cfg in configs.items():
        sel = select.get(name, FACTORED)
        first, second, peak, res = _timed(
            lambda cfg=cfg, sel=sel: influence.category_influence(
                lf, params, xt, yt, s.val.x, s.val.y, config=cfg, select=sel, **kw
            )
        )
        rows[name] = {"P": np.asarray(res.P), "t_first": first, "t_second": second,
            "peak_extra_bytes": peak, "cg_steps_max": int(np.max(res.steps)),
            "residual_max": float(np.max(res.residual)), "converged": bool(np.all(res.converged)),
            "execution": res.details.get("execution"), "damping_total": wd + res.damping,
            "selection": res.details.get("selection", "every parameter")}
        print(
            f"  {name}: {second:.1f} s (first {first:.1f} s), steps {rows[name]['cg_steps_max']}, "
            f"residual {rows[name]['residual_max']:.3g}",
            flush=True,
        )
        if name == "GGN-CG" and "selection" in res.details:
            print(f"    {res.details['selection']}", flush=True)

    def last_layer():
        feat = models.functional_features(m)
        ft = models.frozen_features(feat, params, xt).astype(np.float64)
        fv = models.frozen_features(feat, params, s.val.x).astype(np.float64)
        head = params["head"]
        return closed_form.linear_influence(
            ft, yt, fv, s.val.y, head["kernel"], head["bias"], weight_decay=wd, damping=dmp
        )

    first, second, peak, P = _timed(last_layer)
    rows["last layer (closed form)"] = {"P": np.asarray(P), "t_first": first, "t_second": second,
        "peak_extra_bytes": peak, "damping_total": damping_total}
    return rows


def ported_model(kind, st, peer):
    """The torch port of network `kind` with the trained weights, and its logits' max abs and
    relative (to the largest |logit|) difference from ours on 256 validation rows."""
    import numpy as np
    import torch
    from flax import nnx

    stats = nnx.to_pure_dict(nnx.state(st["m"], nnx.BatchStat)) if kind == "resnet" else None
    tm = peer.torch_model_from_jax("cnn" if kind in NETWORKS else kind, st["params"],
        image_shape=st["shape"], num_classes=st["K"], batch_stats=stats)
    x = np.asarray(st["s"].val.x[:256], np.float32)
    with torch.no_grad():
        tl = tm(torch.from_numpy(x)).numpy()
    jl = np.asarray(st["apply"](st["params"], x))
    abs_err = float(np.abs(tl - jl).max())
    return tm, abs_err, abs_err / float(np.abs(jl).max())


def kronfluence_rows(kind, st, damping_total: float, peer) -> dict:
    s = st["s"]
    tm, logit_abs_err, logit_err = ported_model(kind, st, peer)
    print(f"  ported logits: max abs diff {logit_abs_err:.2e} (relative {logit_err:.2e})",
        flush=True)
    assert logit_err < 1e-4, f"ported logits differ ({logit_err})"
    rows = {}
    with tempfile.TemporaryDirectory() as wdir:
        for seed in (0, 1):
            r = peer.kronfluence_category_influence(tm, st["xt"], st["yt"], s.val.x, s.val.y,
                num_classes=st["K"], damping=damping_total, seed=seed, workdir=wdir,
                repeats=2 if seed == 0 else 1)
            t1 = r["factors_s_first"] + r["scores_s_first"]
            t2 = (
                (r["factors_s_second"] + r["scores_s_second"])
                if r["factors_s_second"] is not None
                else None
            )
            rows[f"Kronfluence EK-FAC (seed {seed})"] = {"P": r["P"], "t_first": t1, "t_second": t2,
                "peak_extra_bytes": max(x["peak_extra_bytes"] for x in r["runs"]),
                "logit_rel_err": logit_err, "logit_abs_err": logit_abs_err,
                "damping_total": damping_total, "fisher": r["fisher"],
                "tracked_modules": len(r["tracked_modules"])}
            print(f"  Kronfluence seed {seed}: first {t1:.1f} s, second {t2}", flush=True)
    return rows


def spearman_table(rows: dict) -> dict:
    import numpy as np
    import scipy.stats

    names = list(rows)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa, pb = rows[a]["P"], rows[b]["P"]
            per_class = [scipy.stats.spearmanr(pa[:, k], pb[:, k])[0] for k in range(pa.shape[1])]
            out[f"{a} | {b}"] = {
                "spearman": float(scipy.stats.spearmanr(pa.ravel(), pb.ravel())[0]),
                "worst_class": float(np.min(per_class))}
    return out


def retraining_check(st, rows: dict, classes, fraction: float = 0.1) -> dict:
    """Spearman between predicted and actual per-class validation-loss changes after removing
    each method's top/bottom `fraction` of P[:, t] for t in `classes`, retrained from scratch."""
    import jax.numpy as jnp
    import numpy as np
    import scipy.stats

    from pareto_jax import train

    s, lf, apply, cfg = st["s"], st["lf"], st["apply"], st["cfg"]
    x, y = jnp.asarray(st["xt"]), jnp.asarray(st["yt"])
    n = x.shape[0]
    K = st["K"]
    base = train.evaluate(apply, st["params"], s.val.x, s.val.y, K).loss
    pop = train.make_epoch_fn(lf, cfg, n, population=True)
    k = max(1, int(round(fraction * n)))
    out = {}
    for name, r in rows.items():
        P = r["P"]
        W, pred = [], []
        for t in classes:
            order = np.argsort(-P[:, t], kind="stable")
            for idx in (order[:k], order[-k:]):
                w = np.ones(n)
                w[idx] = 0.0
                W.append(w)
                pred.append(P[idx].sum(0))  # removal raises class k's loss by about Σ P[i, k]
        state = train.init_state(st["params0"], cfg)
        p, o = (train.broadcast_population(t, len(W)) for t in (state.params, state.opt_state))
        Wd = jnp.asarray(np.stack(W), x.dtype)
        for e in range(cfg.epochs):
            p, o, _ = pop(p, o, x, y, Wd, e)
        actual = np.stack(
            [
                train.evaluate(apply, _row(p, i), s.val.x, s.val.y, K).loss - base
                for i in range(len(W))
            ]
        )
        pred = np.stack(pred)
        out[name] = {"spearman": float(scipy.stats.spearmanr(pred.ravel(), actual.ravel())[0]),
            "pearson": float(np.corrcoef(pred.ravel(), actual.ravel())[0, 1]),
            "cells": int(pred.size)}
        print(f"  retraining agreement, {name}: Spearman {out[name]['spearman']:.3f}", flush=True)
    return out


def _row(tree, i):
    import jax

    return jax.tree_util.tree_map(lambda a: a[i], tree)


def run_network(kind, a, peer, peer_error) -> dict:
    import numpy as np

    st = _setup(kind, a.n_train, a.epochs)
    print(
        f"{kind}: {st['n_params']} params, {len(st['yt'])} train, val accuracy {st['val_acc']:.3f}",
        flush=True)
    out = {"network": kind, "n_params": st["n_params"], "n_train": len(st["yt"]),
        "val_accuracy": st["val_acc"], "damping_total": a.damping}
    out["epoch"] = epoch_speed(st)
    print(
        f"  epoch {out['epoch']['t_epoch_ours']:.3f} s vs minimal loop "
        f"{out['epoch']['t_epoch_minimal']:.3f} s "
        f"(ratio {out['epoch']['ratio_epoch']:.2f})",
        flush=True,
    )
    rows = influence_rows(st, a.damping, pcg_rtol=a.pcg_rtol, max_steps=a.max_steps,
        cg_rows=not a.skip_cg)
    if peer is not None:
        rows.update(kronfluence_rows(kind, st, a.damping, peer))
    else:
        out["kronfluence"] = f"not installed ({peer_error}); see bench/_peer_torch.py for the venv"
    out["spearman"] = spearman_table(rows)
    kr = rows.get("Kronfluence EK-FAC (seed 0)")
    if kr is not None:  # how many times faster than Kronfluence (> 1: ours is faster), and memory
        out["vs_kronfluence"] = {
            ours: {"cold": kr["t_first"] / rows[ours]["t_first"],
                "warm": kr["t_second"] / rows[ours]["t_second"],
                "peak_memory_ratio":
                    rows[ours]["peak_extra_bytes"] / max(kr["peak_extra_bytes"], 1),
                "spearman": out["spearman"][f"{ours} | Kronfluence EK-FAC (seed 0)"]["spearman"]}
            for ours in ("EK-FAC", "EK-FAC, sampled Fisher")}
        for ours, v in out["vs_kronfluence"].items():
            print(f"  {ours} vs Kronfluence: {v['cold']:.2f}x cold, {v['warm']:.2f}x warm "
                f"(> 1: faster), peak memory {v['peak_memory_ratio']:.2f}x, Spearman "
                f"{v['spearman']:.3f}", flush=True)
    if a.retrain_classes:
        val_acc = _class_val_acc(st)
        classes = [int(c) for c in np.argsort(val_acc, kind="stable")[: a.retrain_classes]]
        out["retraining_classes"] = classes
        out["retraining"] = retraining_check(
            st, {k: v for k, v in rows.items() if "seed 1" not in k}, classes
        )
    out["methods"] = {k: {kk: vv for kk, vv in v.items() if kk != "P"} for k, v in rows.items()}
    return out


def _class_val_acc(st):
    from pareto_jax import train

    return train.evaluate(st["apply"], st["params"], st["s"].val.x, st["s"].val.y,
        st["K"]).accuracy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--networks", default=None, help="comma-separated, of "
        f"{', '.join([*NETWORKS, *OTHER_NETWORKS])} (default cnn,wide; with --quick, cnn)")
    ap.add_argument(
        "--damping", type=float, default=1e-3, help="curvature damping (ours: weight decay + δ)"
    )
    ap.add_argument("--pcg-rtol", type=float, default=0.1)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--retrain-classes", type=int, default=3)
    ap.add_argument("--skip-cg", action="store_true", help="leave out the two Gauss-Newton CG "
        "rows (minutes per network; not part of the comparison with Kronfluence)")
    ap.add_argument("--tag", default="", help="suffix of the results file (deep_TAG.json)")
    a = ap.parse_args()
    a.n_train, a.epochs = (600, 4) if a.quick else (3000, 15)
    if a.quick:
        a.retrain_classes, a.max_steps = 1, 10
    a.networks = a.networks or ("cnn" if a.quick else "cnn,wide")
    unknown = set(a.networks.split(",")) - {*NETWORKS, *OTHER_NETWORKS}
    if unknown:
        ap.error(f"unknown networks {sorted(unknown)}")
    peer, err = _peer()
    name = "deep" + ("_quick" if a.quick else "") + (f"_{a.tag}" if a.tag else "")
    results = []
    for kind in a.networks.split(","):  # written after each network (a long run keeps its part)
        results.append(run_network(kind, a, peer, err))
        _util.write(name, {"machine": _util.machine(), "results": results, "partial": True})
    for r in results:
        print(
            f"\n{r['network']} ({r['n_params']} params, N = {r['n_train']}, val accuracy "
            f"{r['val_accuracy']:.3f}); "
            f"epoch {r['epoch']['t_epoch_ours']:.3f} s, minimal loop "
            f"{r['epoch']['t_epoch_minimal']:.3f} s, "
            f"ratio {r['epoch']['ratio_epoch']:.2f}"
        )
        rows = [
            {"method": k,
                **{kk: v.get(kk) for kk in ("t_first", "t_second", "cg_steps_max", "residual_max")},
                "peak_MB": v["peak_extra_bytes"] / 2**20,
                "retrain_spearman": r.get("retraining", {}).get(k, {}).get("spearman")}
            for k, v in r["methods"].items()
        ]
        print(
            _util.table(
                rows,
                ["method", "t_first", "t_second", "peak_MB", "cg_steps_max", "residual_max",
                    "retrain_spearman"],
            )
        )
        print(
            _util.table([{"pair": k, **v} for k, v in r["spearman"].items()],
                ["pair", "spearman", "worst_class"])
        )
        if "kronfluence" in r:
            print(r["kronfluence"])
    p = _util.write(name, {"machine": _util.machine(), "results": results})
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
