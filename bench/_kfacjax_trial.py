"""Trial: can kfac-jax (google-deepmind/kfac-jax) compute pareto_jax's K-FAC factor statistics?

Run from the repository root, in a separate venv holding kfac-jax (never the project's .venv):

    python3 -m venv .venv-kfacjax
    .venv-kfacjax/bin/pip install -e . "jax==0.10.1" "jaxlib==0.10.1"
    .venv-kfacjax/bin/pip install kfac-jax "jax==0.10.1" "jaxlib==0.10.1"   # pulls its deps
    # kfac-jax 0.0.8 from PyPI (Feb 2026) fails with jax >= 0.9.2 at the first curvature update
    # (tag_graph_matcher.eval_jaxpr_eqn unpacks `Primitive.get_bind_params`, which now returns
    # one dict): install the GitHub source over it (fixed upstream; tested at babd853, 2026-08-19)
    .venv-kfacjax/bin/pip install --no-deps "kfac-jax @ git+https://github.com/google-deepmind/kfac-jax"
    # (the trial was run with `pip install --no-deps <dir>` of a source snapshot at babd853)
    .venv-kfacjax/bin/python -m bench._kfacjax_trial [--n-timing 3000] [--skip-ours]

What it checks (prints one block per part):

1. versions; kfac-jax's automatic layer tagging of the nnx CNN behind `models.functional`;
2. a tiny dense softmax layer at W = 0, b = log p, where the exact GGN is
   E[x̃x̃ᵀ] ⊗ (diag p − ppᵀ): kfac-jax's A and G against that closed form;
3. the CNN (conv-tanh-avgpool ×2, dense-tanh, head): kfac-jax's A and G per layer against a
   direct computation (own forward pass with taps on each layer output, jax.vjp of the logits
   with the K cotangents √p_c (e_c − p), patches built by slicing the padded input);
   optionally against `pareto_jax.kfac.compute_factors` (its K-FAC eigenvalues);
4. a rough cost of one pass over 3,000 MNIST-sized inputs (first call, second call) and whether
   the jitted update recompiles on the second pass.

The plain average over N samples (not an optimizer's moving average) is obtained with
``update_curvature_matrix_estimate(state, ema_old=1, ema_new=B, batch_size=B, ...)`` per batch
of B samples: each factor is a `WeightedMovingAverage` whose weight grows by B per batch, so the
value is Σ_batches B·(batch mean)/N, the mean over all N samples (equal batch sizes, or one
compile per distinct size: padded rows would still enter A).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import kfac_jax
except ImportError:  # pragma: no cover - the trial needs its own venv
    sys.exit("kfac-jax is not installed here; use .venv-kfacjax (see the module docstring)")

from absl import logging as absl_logging

from pareto_jax import models

absl_logging.set_verbosity(absl_logging.WARNING)  # kfac-jax logs its registrations at INFO

MODES = ("ggn_exact", "fisher_exact")


# ----------------------------------------------------------------------------- kfac-jax side


def ce_loss_with_tag(apply):
    """`func(params, x)` for kfac-jax: the mean softmax CE with its logits registered.

    The targets only matter for the loss value (and the empirical-Fisher modes); the exact modes
    use the model's own p(y|x). Class 0 is used as a placeholder label.
    """

    def loss(params, x):
        logits = apply(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

    return loss


def make_estimator(apply, mode):
    return kfac_jax.BlockDiagonalCurvature(func=ce_loss_with_tag(apply),
                                           default_estimation_mode=mode)


def make_update(est, batch_size, mode):
    """One jitted step adding a batch of `batch_size` samples into the plain running average."""

    def update(state, params, xb, rng):
        return est.update_curvature_matrix_estimate(
            state, ema_old=1.0, ema_new=float(batch_size), identity_weight=0.0,
            batch_size=batch_size, rng=rng, func_args=(params, xb), estimation_mode=mode)

    return jax.jit(update)


def kfacjax_factors(apply, params, x, *, batch_size, mode, est=None, update=None,
                    exact_powers=None):
    """(estimator, state, [(A, G, scale)] per block) over all of x (len(x) % batch_size == 0).

    The block's curvature is ``scale · A ⊗ G`` (scale = number of output positions for conv).
    """
    n = x.shape[0]
    assert n % batch_size == 0, "equal batches, or the last batch compiles a second time"
    if est is None:
        est = make_estimator(apply, mode)
    state = est.init(jax.random.PRNGKey(0), (params, jnp.asarray(x[:batch_size])),
                     exact_powers_to_cache=exact_powers, approx_powers_to_cache=None,
                     cache_eigenvalues=exact_powers is not None)
    if update is None:
        update = make_update(est, batch_size, mode)
    key = jax.random.PRNGKey(1)
    for s in range(0, n, batch_size):
        key, sub = jax.random.split(key)
        state = update(state, params, jnp.asarray(x[s:s + batch_size]), sub)
    out = []
    for block, bs in zip(est.blocks, state.blocks_states):
        A, G = (f.value for f in bs.factors)
        out.append((A, G, float(block.scale(bs, False))))
    return est, state, out


# ----------------------------------------------------------------------------- direct reference


def _conv(h, k):
    return jax.lax.conv_general_dilated(h, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _pool(h):
    B, H, W, C = h.shape
    if H > 1 and W > 1:
        h = h[:, :H // 2 * 2, :W // 2 * 2].reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))
    return h


def cnn_forward_with_taps(params, x, taps, image_shape):
    """Own CNN forward from the params dict; taps[i] is added to layer i's output (pre-tanh).

    Returns (logits, inputs per layer) in the order conv0, conv1, fc, head.
    """
    h = x.reshape((x.shape[0], *image_shape))
    ins = []
    for i in range(len(params["convs"])):
        p = params["convs"][i]
        ins.append(h)
        h = _pool(jnp.tanh(_conv(h, p["kernel"]) + p["bias"] + taps[i]))
    h = h.reshape(h.shape[0], -1)
    nc = len(params["convs"])
    ins.append(h)
    h = jnp.tanh(h @ params["fc"]["kernel"] + params["fc"]["bias"] + taps[nc])
    ins.append(h)
    logits = h @ params["head"]["kernel"] + params["head"]["bias"] + taps[nc + 1]
    return logits, ins


def patches_hwc(h, kh, kw):
    """SAME-padded 3×3 patches by slicing: (B, H·W, kh·kw·C) in (kh, kw, C) order + a 1."""
    B, H, W, C = h.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    hp = jnp.pad(h, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    cols = [hp[:, i:i + H, j:j + W, :] for i in range(kh) for j in range(kw)]
    pt = jnp.stack(cols, 3).reshape(B, H * W, kh * kw * C)
    return jnp.concatenate([pt, jnp.ones((B, H * W, 1), pt.dtype)], -1)


def direct_cnn_factors(params, x, image_shape):
    """Exact-GGN K-FAC factors per layer, KFC-normalised as kfac-jax stores them.

    Dense: A = E[x̃x̃ᵀ], G = E[Σ_c g_c g_cᵀ].  Conv (T output positions):
    A = Σ_{n,t} ã ãᵀ / (N T), G = Σ_{c,n,t} g g ᵀ / (N T), block = T · A ⊗ G.
    g_c = ∂(logits · v_c)/∂(layer output), v_c = √p_c (e_c − p)  (Σ_c v_c v_cᵀ = diag p − ppᵀ).
    """
    x = jnp.asarray(x)
    N = x.shape[0]

    def shapes():
        _, ins = cnn_forward_with_taps(params, x[:1], [0.0] * 4, image_shape)
        outs = []
        for i, h in enumerate(ins[:2]):
            outs.append((h.shape[1], h.shape[2], params["convs"][i]["kernel"].shape[-1]))
        outs.append((params["fc"]["kernel"].shape[1],))
        outs.append((params["head"]["kernel"].shape[1],))
        return outs

    zeros = [jnp.zeros((N, *s)) for s in shapes()]
    logits, vjp, ins = jax.vjp(lambda t: cnn_forward_with_taps(params, x, t, image_shape), zeros,
                               has_aux=True)
    p = jax.nn.softmax(logits, -1)
    K = p.shape[-1]
    # cotangent c of sample n: √p_{n,c} (e_c − p_n)  — the weight is the class's own √p_c
    cots = jnp.sqrt(p).T[:, :, None] * (jnp.eye(K)[:, None, :] - p[None])  # (K, N, K)
    grads = jax.vmap(lambda c: vjp(c)[0])(cots)  # per layer (K, N, *out)
    out = []
    for i, (a, g) in enumerate(zip(ins, grads)):
        if i < 2:
            kh, kw = params["convs"][i]["kernel"].shape[:2]
            at = patches_hwc(a, kh, kw)
            T = at.shape[1]
            A = jnp.einsum("nti,ntj->ij", at, at) / (N * T)
            gt = g.reshape(K, N, T, g.shape[-1])
            G = jnp.einsum("kntp,kntq->pq", gt, gt) / (N * T)
            out.append((A, G, float(T)))
        else:
            at = jnp.concatenate([a, jnp.ones((N, 1))], 1)
            out.append((at.T @ at / N, jnp.einsum("knp,knq->pq", g, g) / N, 1.0))
    return logits, out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------- parts


def part_versions():
    import flax

    print("== 1. versions")
    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}, "
          f"flax {flax.__version__}, kfac-jax {kfac_jax.__version__}, backend {jax.default_backend()}")


def check_kfacjax_works_with_this_jax():
    import inspect

    from kfac_jax._src import tag_graph_matcher as tgm

    src = inspect.getsource(tgm.eval_jaxpr_eqn)
    if "subfuns, bind_params = eqn.primitive.get_bind_params" in src and "jax_version" not in src:
        print("kfac-jax here is the PyPI 0.0.8 release, whose eval_jaxpr_eqn expects the old "
              "(subfuns, params) = Primitive.get_bind_params(...) API; with jax "
              f"{jax.__version__} its first curvature update raises 'ValueError: too many values "
              "to unpack'. Install the GitHub source (see the module docstring).")
        sys.exit(2)


def part_tiny():
    print("\n== 2. tiny dense softmax layer at W = 0, b = log p (exact GGN = E[x̃x̃ᵀ] ⊗ (diag p − ppᵀ))")
    p = np.array([0.976, 0.018, 0.007])
    p = p / p.sum()
    d, N, B = 4, 64, 32
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, d)) + rng.normal(size=d)).astype(np.float32)
    model = models.make_model("linear", (d,), 3)
    apply, _ = models.functional(model)
    params = models.linear_head_params(jnp.zeros((d, 3)), jnp.log(jnp.asarray(p, jnp.float32)))
    xt = np.concatenate([x, np.ones((N, 1), np.float32)], 1).astype(np.float64)
    A_ref = xt.T @ xt / N
    H_ref = np.diag(p) - np.outer(p, p)
    unweighted = sum(np.outer(p - e, p - e) for e in np.eye(3))  # Σ_c (p − e_c)(p − e_c)ᵀ
    q = np.sqrt(p)
    per_component = sum(np.outer(q * (p - e), q * (p - e)) for e in np.eye(3))  # √p ⊙ (p − e_c)
    print(f"p = {np.round(p, 4)}; reference H = diag p − ppᵀ.  Wrong weightings, for scale: "
          f"Σ_c (p−e_c)(p−e_c)ᵀ rel err {rel(unweighted, H_ref):.3g}; "
          f"Σ_c (√p⊙(p−e_c))(…)ᵀ rel err {rel(per_component, H_ref):.3g}")
    for mode in (*MODES, "ggn_curvature_prop"):
        est, state, fac = kfacjax_factors(apply, params, x, batch_size=B, mode=mode)
        (A, G, s), = fac
        kron = s * np.kron(np.asarray(A, np.float64), np.asarray(G, np.float64))
        print(f"{mode:19s} rel err A {rel(A, A_ref):.2e}  G {rel(G, H_ref):.2e}  "
              f"scale·A⊗G vs exact {rel(kron, np.kron(A_ref, H_ref)):.2e}  (scale {s:g})")
        if mode == MODES[0]:
            # to_dense_matrix follows the flattened params order: {'bias', 'kernel'} -> bias
            # first, i.e. x̃ = [1, x] ⊗ classes
            perm = np.r_[d, :d]
            dense = est.to_dense_matrix(state)
            print(f"{'':19s} estimator.to_dense_matrix (bias rows first) vs exact GGN: "
                  f"{rel(dense, np.kron(A_ref[np.ix_(perm, perm)], H_ref)):.2e}")


def part_cnn(skip_ours: bool):
    print("\n== 3. CNN (channels (8, 16), dense 64, 10 classes): kfac-jax factors vs direct computation")
    image_shape = (28, 28, 1)
    model = models.make_model("cnn", (784,), 10, image_shape=image_shape)
    apply, params = models.functional(model)
    N, B = 64, 32
    x = np.random.default_rng(1).normal(size=(N, 784)).astype(np.float32)
    logits_ref, ref = direct_cnn_factors(params, x, image_shape)
    print(f"own forward vs models.functional apply: max |Δlogits| = "
          f"{float(jnp.max(jnp.abs(logits_ref - apply(params, jnp.asarray(x))))):.1e}")
    names = ("convs.0", "convs.1", "fc", "head")
    for mode in MODES:
        est, _, fac = kfacjax_factors(apply, params, x, batch_size=B, mode=mode)
        if mode == MODES[0]:
            print("blocks: " + "; ".join(f"{type(b).__name__} {b.parameters_shapes}" for b in est.blocks))
        for name, (A, G, s), (Ar, Gr, sr) in zip(names, fac, ref):
            kr = rel(s * np.kron(np.asarray(A, np.float64), np.asarray(G, np.float64)),
                     sr * np.kron(np.asarray(Ar, np.float64), np.asarray(Gr, np.float64))) \
                if A.shape[0] * G.shape[0] <= 4096 else float("nan")
            print(f"{mode:13s} {name:8s} A {tuple(A.shape)} rel err {rel(A, Ar):.2e}  "
                  f"G {tuple(G.shape)} rel err {rel(G, Gr):.2e}  scale {s:g} (ref {sr:g})"
                  + (f"  block {kr:.2e}" if np.isfinite(kr) else ""))
    if skip_ours:
        return
    try:
        from pareto_jax import kfac as ours

        f = ours.compute_factors(model, params, x, batch_size=B, num_classes=10)
        lfs = getattr(f, "factors", None) or f.layers  # the module's API is in flux
        print("pareto_jax.kfac.compute_factors (working tree), sorted K-FAC eigenvalues λ_A⊗λ_G "
              "vs kfac-jax's scale·λ_A⊗λ_G:")
        for name, lf, (A, G, s) in zip(names, lfs, fac):
            lam_kj = np.sort(np.asarray(s * np.outer(np.linalg.eigvalsh(np.asarray(A, np.float64)),
                                                     np.linalg.eigvalsh(np.asarray(G, np.float64)))).ravel())
            lam_ours = np.sort(np.asarray(lf.lam_kfac, np.float64).ravel())
            print(f"  {name:8s} rel err {rel(lam_ours, lam_kj):.2e}  (top {lam_ours[-1]:.4g} vs {lam_kj[-1]:.4g})")
    except Exception as e:  # noqa: BLE001 - the module is edited separately; report, don't fail
        print(f"  (skipped the comparison with pareto_jax.kfac: {type(e).__name__}: {e})")


class _CompileCounter:
    def __init__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


def part_timing(n: int, batch_size: int, skip_ours: bool):
    print(f"\n== 4. rough cost: one factor pass over {n} inputs 28×28×1, batch {batch_size}, "
          f"{jax.device_count()} CPU device(s)")
    counter = _CompileCounter()
    model = models.make_model("cnn", (784,), 10, image_shape=(28, 28, 1))
    apply, params = models.functional(model)
    x = np.random.default_rng(2).normal(size=(n, 784)).astype(np.float32)
    mode = "ggn_exact"

    def block(fac):
        jax.block_until_ready([(A, G) for A, G, _ in fac])

    t = time.perf_counter()
    c0 = counter.n
    est = make_estimator(apply, mode)
    update = make_update(est, batch_size, mode)
    est, state, fac = kfacjax_factors(apply, params, x, batch_size=batch_size, mode=mode,
                                      est=est, update=update)
    block(fac)
    t1 = time.perf_counter() - t
    c1 = counter.n - c0
    t = time.perf_counter()
    c0 = counter.n
    _, state, fac = kfacjax_factors(apply, params, x, batch_size=batch_size, mode=mode,
                                    est=est, update=update)
    block(fac)
    t2 = time.perf_counter() - t
    c2 = counter.n - c0
    print(f"kfac-jax {mode}: first pass {t1:.2f} s ({c1} XLA compiles, incl. tracing/graph "
          f"matching), second pass {t2:.2f} s ({c2} compiles; jitted update cache size "
          f"{update._cache_size()})")
    # eigendecompositions of the factors (K-FAC eigenbasis) via the estimator's cache: the state
    # must be initialised with exact_powers_to_cache for the eigenvector slots to exist
    _, state_e, _ = kfacjax_factors(apply, params, x[:batch_size], batch_size=batch_size,
                                    mode=mode, est=est, exact_powers=-1)
    state_e = dataclasses.replace(state_e, blocks_states=tuple(
        dataclasses.replace(se, factors=s.factors)
        for se, s in zip(state_e.blocks_states, state.blocks_states)))
    t = time.perf_counter()
    cache = jax.jit(lambda s: est.update_cache(s, identity_weight=0.0, exact_powers=-1,
                                               approx_powers=None, eigenvalues=True,
                                               pmap_axis_name=None))(state_e)
    jax.block_until_ready(cache)
    print(f"update_cache(exact_powers=-1, eigenvalues=True) (eigh of every A and G): "
          f"{time.perf_counter() - t:.2f} s incl. compile; conv block cache keys "
          f"{sorted(cache.blocks_states[1].cache)}")
    if skip_ours:
        return
    try:
        from pareto_jax import kfac as ours

        for k in range(2):
            t = time.perf_counter()
            c0 = counter.n
            f = ours.compute_factors(model, params, x, batch_size=batch_size, num_classes=10)
            jax.block_until_ready([tuple(l) for l in (getattr(f, "factors", None) or f.layers)])
            print(f"pareto_jax.kfac.compute_factors (K-FAC + eigh + EK-FAC pass), call {k + 1}: "
                  f"{time.perf_counter() - t:.2f} s ({counter.n - c0} compiles)")
    except Exception as e:  # noqa: BLE001
        print(f"  (skipped pareto_jax.kfac timing: {type(e).__name__}: {e})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-timing", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--skip-ours", action="store_true",
                    help="do not compare with / time pareto_jax.kfac (e.g. while it is being edited)")
    ap.add_argument("--skip-timing", action="store_true")
    a = ap.parse_args(argv)
    part_versions()
    check_kfacjax_works_with_this_jax()
    part_tiny()
    part_cnn(a.skip_ours)
    if not a.skip_timing:
        part_timing(a.n_timing, a.batch_size, a.skip_ours)


if __name__ == "__main__":
    main()
