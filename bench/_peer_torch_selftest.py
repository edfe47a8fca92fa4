"""Self-test of the PyTorch / Kronfluence peer (`bench/_peer_torch.py`).

Run from the repository root, in the bench venv (see `_peer_torch`'s docstring for the install)::

    .venv-bench/bin/python -m bench._peer_torch_selftest

1. The torch port's logits equal pareto_jax's for a briefly trained CNN (channels (8, 16),
   dense 64) and MLP (hidden (64,)) on MNIST-5k images, to ~1e-5.
2. Sign and scale, independent of curvature: Kronfluence with strategy "identity" (no
   preconditioning; its damping is ignored) against P_ref = (1/N) G_val_classes @ grads.T from
   JAX per-sample gradients in float64, for the CNN and the MLP.
3. EK-FAC on 500 train / 200 validation samples: Spearman correlation of Kronfluence's P with the
   identity P, and with pareto_jax's own EK-FAC at matched damping (sanity figures, not checks).

Exits non-zero if a check fails. Small on purpose (2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

import jax

jax.config.update("jax_enable_x64", True)  # the float64 references; models stay float32

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from pareto_jax import datasets, influence, models, train  # noqa: E402

from . import _peer_torch as peer  # noqa: E402

K = 10
IMAGE = (28, 28, 1)


def _f32(params):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


def _f64(params):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)


def _subset(x, y, n, seed):
    """n samples, stratified (n/K per class)."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == k))[: n // K] for k in range(K)])
    idx = rng.permutation(idx)
    return np.asarray(x[idx], np.float32), np.asarray(y[idx], np.int32)


def _trained(kind, x, y, epochs):
    model = models.make_model(kind, (x.shape[1],), K, seed=0, image_shape=IMAGE,
                              hidden=(64,), channels=(8, 16), dense=64)
    apply, params = models.functional(model)
    params = _f32(params)
    loss_fn = models.per_sample_loss(apply)
    cfg = train.TrainConfig(epochs=epochs, batch_size=64, learning_rate=3e-3, weight_decay=1e-3)
    params = _f32(train.train(loss_fn, params, x, y, cfg, num_classes=K).params)
    return model, apply, params, loss_fn


def _spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-identity", type=int, default=300, help="train samples for the identity check")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--damping", type=float, default=1e-3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    failures = []

    s = datasets.load_splits("mnist5k", seed=0)
    xt, yt = _subset(s.train.x, s.train.y, args.n_train, 0)
    xv, yv = _subset(s.val.x, s.val.y, args.n_val, 1)
    print(f"data: train {xt.shape}, val {xv.shape}; torch {torch.__version__}, jax {jax.__version__}")

    nets = {}
    for kind in ("cnn", "mlp"):
        t0 = time.perf_counter()
        model, apply, params, loss_fn = _trained(kind, xt, yt, args.epochs)
        tm = peer.torch_model_from_jax(kind, params, image_shape=IMAGE, num_classes=K)
        nets[kind] = (model, apply, params, loss_fn, tm)
        xs = np.concatenate([xt[:100], xv[:100]])
        lj = np.asarray(apply(params, jnp.asarray(xs, jnp.float32)), np.float64)
        with torch.no_grad():
            lt = tm(torch.from_numpy(xs)).double().numpy()
        err = float(np.max(np.abs(lj - lt)))
        rel = err / float(np.max(np.abs(lj)))
        acc = float(np.mean(np.argmax(lj[100:], 1) == yv[:100]))
        ok = err < 1e-4 and rel < 1e-5
        print(f"[1] {kind}: logits max|jax - torch| = {err:.2e} (relative {rel:.2e}, |logit| max "
              f"{np.max(np.abs(lj)):.2f}); val acc {acc:.2f}; trained in {time.perf_counter() - t0:.1f}s "
              f"-> {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{kind} logits")

    with tempfile.TemporaryDirectory(prefix="peer_torch_selftest_") as work:
        # ---- 2. sign and scale with identity curvature
        ni = args.n_identity
        for kind in ("cnn", "mlp"):
            model, apply, params, loss_fn, tm = nets[kind]
            p64 = _f64(params)
            grads = np.asarray(influence.per_sample_gradients(loss_fn, p64, xt[:ni].astype(np.float64),
                                                              yt[:ni]))
            G = np.asarray(influence.class_gradients(loss_fn, p64, xv.astype(np.float64), yv, K))
            P_ref = (G @ grads.T).T / ni  # (N, K)
            r = peer.kronfluence_category_influence(tm, xt[:ni], yt[:ni], xv, yv, num_classes=K,
                                                    damping=123.0, strategy="identity", workdir=work,
                                                    repeats=1, batch_size=128)
            P = r["P"]
            rel = float(np.max(np.abs(P - P_ref)) / np.max(np.abs(P_ref)))
            rel_neg = float(np.max(np.abs(-P - P_ref)) / np.max(np.abs(P_ref)))
            sign = float(np.mean(np.sign(P) == np.sign(P_ref)))
            ok = rel < 1e-4
            print(f"[2] {kind} identity (damping=123 passed, ignored): N={ni}, params={grads.shape[1]}, "
                  f"max|P - P_ref|/max|P_ref| = {rel:.2e} (with the sign flipped: {rel_neg:.2e}); "
                  f"sign agreement {sign:.4f}; max|P_ref| {np.max(np.abs(P_ref)):.3e}; "
                  f"modules {r['tracked_modules']} -> {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{kind} identity P")

        # ---- 3. EK-FAC on the CNN (sanity figures)
        model, apply, params, loss_fn, tm = nets["cnn"]
        r_id = peer.kronfluence_category_influence(tm, xt, yt, xv, yv, num_classes=K, damping=0.0,
                                                   strategy="identity", workdir=work, repeats=1)
        r_ek = peer.kronfluence_category_influence(tm, xt, yt, xv, yv, num_classes=K,
                                                   damping=args.damping, strategy="ekfac", workdir=work,
                                                   repeats=2)
        P_id, P_ek = r_id["P"], r_ek["P"]
        ok = np.all(np.isfinite(P_ek)) and r_ek["max_run_diff"] <= 1e-6 * np.max(np.abs(P_ek))
        print(f"[3] cnn EK-FAC (N={len(xt)}, val={len(xv)}, damping={args.damping}, true Fisher): "
              f"mean EK-FAC eigenvalue {r_ek['mean_lambda']:.3e}; repeat agreement "
              f"{r_ek['max_run_diff']:.1e}; Spearman(P_ekfac, P_identity) = {_spearman(P_ek, P_id):.3f}")
        for i, run in enumerate(r_ek["runs"]):
            print(f"    call {i + 1}: covariance {run['covariance_s']:.2f}s, eigendecomposition "
                  f"{run['eigendecomposition_s']:.2f}s, lambda {run['lambda_s']:.2f}s, scores "
                  f"{run['scores_s']:.2f}s; peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB "
                  f"(+{run['peak_extra_bytes'] / 2**20:.0f} MiB)")
        if not ok:
            failures.append("cnn EK-FAC finite / repeatable")

        # the same at matched damping with pareto_jax's own EK-FAC (exact class expectation), and
        # Kronfluence with the empirical Fisher
        try:
            cfg = influence.InfluenceConfig(solver="ekfac", damping=args.damping, escalate_damping=False)
            res = influence.category_influence(loss_fn, params, xt, yt, xv, yv, num_classes=K,
                                               weight_decay=0.0, config=cfg, apply=apply, model=model)
            P_pj = np.asarray(res.P, np.float64)
            rel = float(np.linalg.norm(P_ek - P_pj) / np.linalg.norm(P_pj))
            print(f"    pareto_jax EK-FAC (damping {res.damping}): Spearman(Kronfluence, pareto_jax) = "
                  f"{_spearman(P_ek, P_pj):.3f}, relative Frobenius difference {rel:.3f}, "
                  f"Spearman(pareto_jax, identity) = {_spearman(P_pj, P_id):.3f}")
        except Exception as e:  # pragma: no cover - a sanity figure, not a check
            print(f"    pareto_jax EK-FAC comparison skipped: {type(e).__name__}: {e}")
        r_emp = peer.kronfluence_category_influence(tm, xt, yt, xv, yv, num_classes=K,
                                                    damping=args.damping, strategy="ekfac",
                                                    use_empirical_fisher=True, workdir=work, repeats=1)
        print(f"    Kronfluence EK-FAC empirical Fisher: Spearman(empirical, true) = "
              f"{_spearman(r_emp['P'], P_ek):.3f}")

    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
