"""Inverse-HVP estimators for deep networks: LiSSA, K-FAC and EK-FAC (DESIGN §3, issue 9).

All give the `influence.SolveResult` of (H + (λ + δ)I)⁻¹ g for K right-hand sides, so they are
interchangeable with CG in `influence.category_influence` (``InfluenceConfig(solver=...)``).

* **LiSSA** (Agarwal et al. 2017; Koh & Liang 2017): the Neumann recursion
  v ← g + (I − (H + δI)/s) v, with H⁻¹g ≈ v/s. It converges iff s > λ_max(H + δI)/2 and the
  damped curvature is positive definite. Heuristic used here (documented default): s =
  1.2 × λ_max, λ_max from 20 power-iteration HVPs; depth until the relative update is below
  `rtol` or `max_steps`; HVPs on minibatches of `batch_size` samples drawn with the config seed
  (full batch when batch_size >= N, which makes it a deterministic Richardson iteration).
  Divergence (a norm above 1e6·‖g‖/s, or NaN) is detected and reported per class.
* **K-FAC** (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016): per flax
  `nnx.Linear` / `nnx.Conv` layer, the Gauss-Newton block is approximated by A ⊗ G with
  A = E[ã ãᵀ] (layer inputs with a 1 for the bias; conv patches) and G the second moment of the
  pseudo-gradients at the layer output, taken in expectation over labels y ~ p(y|x) (exactly:
  K backward passes per sample), so it targets the GGN = Fisher of the softmax cross-entropy.
* **EK-FAC** (George et al. 2018): K-FAC's eigenbasis U_A ⊗ U_G with the eigenvalues replaced by
  the exact second moments of the per-sample pseudo-gradients in that basis.

Factors are a pytree (`Factors`) that can be saved with `save_factors` and reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from . import _checks, io
from .influence import SolveResult, _flat, _hvp_parts, _hvp_jit

# ----------------------------------------------------------------------------- LiSSA


def power_iteration(matvec, dim: int, dtype, *, steps: int = 20, seed: int = 0) -> float:
    """Largest eigenvalue magnitude of a symmetric operator by power iteration."""
    v = jax.random.normal(jax.random.PRNGKey(seed), (dim,), dtype)
    v = v / jnp.linalg.norm(v)
    lam = 0.0
    for _ in range(steps):
        w = matvec(v)
        lam = float(jnp.vdot(v, w))
        v = w / jnp.maximum(jnp.linalg.norm(w), 1e-30)
    return abs(lam)


def solve_lissa(hvp_batch, b, n_batches: int, *, scale: float, damping: float = 0.0,
                rtol: float = 1e-6, max_steps: int = 1000, seed: int = 0) -> SolveResult:
    """LiSSA for (H + δI) x = b with K right-hand sides.

    Args:
        hvp_batch: (v, batch_index) -> H_batch v, the HVP on one minibatch (full objective
            when there is a single batch).
        b: (K, P) right-hand sides.
        n_batches: number of minibatches to sample from.
        scale: s > λ_max(H + δI)/2 (see the module docstring for the default heuristic).

    Returns:
        `SolveResult`; `negative_curvature` marks right-hand sides whose recursion diverged.
    """
    K = b.shape[0]
    key = jax.random.PRNGKey(seed)
    bnorm = jnp.linalg.norm(b, axis=1)

    def step(carry, j):
        v, done, steps, diverged = carry
        idx = jax.random.randint(jax.random.fold_in(key, j), (), 0, n_batches)
        hv = jax.vmap(lambda x: hvp_batch(x, idx))(v) + damping * v
        v_new = b + v - hv / scale
        delta = jnp.linalg.norm(v_new - v, axis=1) / jnp.maximum(jnp.linalg.norm(v_new, axis=1), 1e-30)
        bad = ~jnp.all(jnp.isfinite(v_new), axis=1) | (jnp.linalg.norm(v_new, axis=1) > 1e6 * bnorm * scale)
        keep = done | diverged
        v_out = jnp.where(keep[:, None], v, v_new)
        diverged = diverged | (bad & ~done)
        done = done | ((delta < rtol) & ~bad)
        steps = steps + (~keep).astype(jnp.int32)
        return (v_out, done, steps, diverged), None

    init = (b, jnp.zeros(K, bool), jnp.zeros(K, jnp.int32), jnp.zeros(K, bool))
    (v, done, steps, diverged), _ = jax.lax.scan(step, init, jnp.arange(max_steps))
    x = v / scale
    x = jnp.where(jnp.isfinite(x), x, 0.0)
    # residuals are recomputed by the caller with full-batch HVPs (`solve` below)
    return SolveResult(x, steps, jnp.where(done, 0.0, jnp.nan), done & ~diverged, diverged)


# ----------------------------------------------------------------------------- layer taps


class _LayerCall(NamedTuple):
    kind: str          # "dense" or "conv"
    module: Any
    x: jax.Array       # layer input
    out_shape: tuple


@contextlib.contextmanager
def _tapped(records: list, taps: list | None):
    """Record every nnx.Linear / nnx.Conv call (inputs) and add `taps[i]` to the i-th output."""
    orig_lin, orig_conv = nnx.Linear.__call__, nnx.Conv.__call__

    def wrap(orig, kind):
        def call(self, x, *a, **k):
            out = orig(self, x, *a, **k)
            i = len(records)
            records.append(_LayerCall(kind, self, x, out.shape))
            if taps is not None:
                out = out + taps[i]
            return out

        return call

    nnx.Linear.__call__ = wrap(orig_lin, "dense")
    nnx.Conv.__call__ = wrap(orig_conv, "conv")
    try:
        yield
    finally:
        nnx.Linear.__call__, nnx.Conv.__call__ = orig_lin, orig_conv


def _module_paths(model: nnx.Module) -> dict[int, tuple]:
    return {id(m): tuple(p) for p, m in nnx.iter_graph(model) if isinstance(m, (nnx.Linear, nnx.Conv))}


def _patches(x, module):
    """Conv input patches (B, H', W', Cin·kh·kw) in the (Cin, kh, kw) feature order."""
    kh, kw = module.kernel_size
    pad = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return jax.lax.conv_general_dilated_patches(
        x, (kh, kw), module.strides if isinstance(module.strides, (tuple, list)) else (module.strides,) * 2,
        pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _kernel_matrix(kernel, kind):
    """Layer weight as (in, out): conv kernels (kh, kw, Cin, Cout) -> (Cin·kh·kw, Cout)."""
    if kind == "dense":
        return kernel
    kh, kw, cin, cout = kernel.shape
    return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)


def _kernel_from_matrix(m, shape, kind):
    if kind == "dense":
        return m
    kh, kw, cin, cout = shape
    return jnp.transpose(m.reshape(cin, kh, kw, cout), (1, 2, 0, 3))


# ----------------------------------------------------------------------------- K-FAC / EK-FAC factors


class LayerFactors(NamedTuple):
    QA: jax.Array      # (in+1, in+1) eigenvectors of A
    QG: jax.Array      # (out, out) eigenvectors of G
    lam_kfac: jax.Array  # (in+1, out) λ_A ⊗ λ_G
    lam_ekfac: jax.Array  # (in+1, out) corrected eigenvalues


@dataclasses.dataclass(frozen=True)
class Factors:
    """K-FAC / EK-FAC factors for every Dense / Conv layer, keyed by the layer's param path."""

    paths: tuple[tuple, ...]
    kinds: tuple[str, ...]
    layers: tuple[LayerFactors, ...]


def save_factors(path: str | Path, f: Factors) -> None:
    io.save_pytree(path, [tuple(l) for l in f.layers])
    io.write_json(Path(path).with_suffix(".json"), {"paths": [list(map(str, p)) for p in f.paths],
                                                    "kinds": list(f.kinds),
                                                    "shapes": [[list(a.shape) for a in l] for l in f.layers]})


def load_factors(path: str | Path, paths: tuple[tuple, ...] | None = None) -> Factors:
    meta = io.read_json(Path(path).with_suffix(".json"))
    template = [tuple(np.zeros(s, np.float32) for s in shp) for shp in meta["shapes"]]
    layers, _ = io.load_pytree(path, template)
    ps = paths or tuple(tuple(int(x) if x.isdigit() else x for x in p) for p in meta["paths"])
    return Factors(ps, tuple(meta["kinds"]), tuple(LayerFactors(*map(jnp.asarray, l)) for l in layers))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def compute_factors(model: nnx.Module, params, x, *, batch_size: int = 256, num_classes: int) -> Factors:
    """K-FAC and EK-FAC factors of the softmax cross-entropy GGN over the data x.

    Two passes over x: the covariances A and G (then their eigendecompositions), and the
    per-sample second moments of the pseudo-gradients in the eigenbasis (EK-FAC's correction).
    """
    graphdef, state = nnx.split(model)
    treedef = jax.tree_util.tree_structure(state)
    x = np.asarray(x)
    n = x.shape[0]

    def merged(params):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(params)))
        return m, _module_paths(m)

    # discover layers and their order
    recs: list = []
    with _tapped(recs, None):
        m, ids = merged(params)
        m(jnp.asarray(x[:1]))
    layer_info = [(r.kind, ids[id(r.module)]) for r in recs]
    if not layer_info:
        raise _checks.InputError("argument `model`: got a model with no nnx.Linear / nnx.Conv layers; "
                                 "expected Dense or Conv layers. Fix: use solver='cg' for this model.")
    out_shapes = [r.out_shape[1:] for r in recs]

    def layer_stats(params, xb, mb):
        """Per-batch (layer modules, inputs per layer, pseudo output-grads per layer).

        The modules come from the same traced forward pass (their static settings, e.g. a
        conv's kernel size and strides, are what `aug_inputs` needs)."""
        B = xb.shape[0]
        taps0 = [jnp.zeros((B, *s), xb.dtype) for s in out_shapes]
        modules: list = []

        def fwd(taps):
            rec: list = []
            with _tapped(rec, taps):
                m, _ = merged(params)
                logits = m(xb)
            modules[:] = [r.module for r in rec]
            return logits, [r.x for r in rec]

        (logits, acts), vjp = _vjp_aux(fwd, taps0)
        p = jax.nn.softmax(logits, -1)
        # Σ_c p_c (p − e_c)(p − e_c)ᵀ = diag p − ppᵀ: K cotangents per sample
        eye = jnp.eye(num_classes, dtype=p.dtype)
        cots = jnp.sqrt(p)[None, :, :] * (p[None, :, :] - eye[:, None, :])  # (K, B, K)
        cots = cots * mb[None, :, None]
        grads = jax.vmap(lambda c: vjp(c))(cots)  # list over layers of (K, B, *out)
        return modules, acts, grads

    def aug_inputs(kind, module, a):
        if kind == "dense":
            a2 = a.reshape(a.shape[0], -1)
            return jnp.concatenate([a2, jnp.ones((a2.shape[0], 1), a2.dtype)], 1)[:, None, :]  # (B, 1, in+1)
        pt = _patches(a, module)
        pt = pt.reshape(pt.shape[0], -1, pt.shape[-1])
        return jnp.concatenate([pt, jnp.ones((*pt.shape[:2], 1), pt.dtype)], -1)  # (B, T, in+1)

    def out_grads(g):
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # (K, B, T, out)

    @jax.jit
    def cov_batch(params, xb, mb):
        modules, acts, grads = layer_stats(params, xb, mb)
        out = []
        for (kind, _), mod, a, g in zip(layer_info, modules, acts, grads):
            at = aug_inputs(kind, mod, a) * jnp.sqrt(mb)[:, None, None]
            T = at.shape[1]
            A = jnp.einsum("bti,btj->ij", at, at) / T
            gt = out_grads(g)
            G = jnp.einsum("kbto,kbtp->op", gt, gt)
            out.append((A, G))
        return out

    @jax.jit
    def correction_batch(params, xb, mb, QAs, QGs):
        modules, acts, grads = layer_stats(params, xb, mb)
        out = []
        for (kind, _), mod, a, g, QA, QG in zip(layer_info, modules, acts, grads, QAs, QGs):
            at = aug_inputs(kind, mod, a)
            gt = out_grads(g)
            # per-sample pseudo-gradient Σ_t ã_t g_tᵀ, rotated into the eigenbasis, squared
            per = jnp.einsum("bti,kbto->kbio", at, gt)
            rot = jnp.einsum("ia,kbio,op->kbap", QA, per, QG)
            out.append(jnp.sum(rot ** 2, axis=(0, 1)))
        return out

    chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]

    def padded(s, e):
        xb = x[s:e]
        mb = np.ones(e - s, np.float32)
        if e - s < batch_size and n > batch_size:
            pad = batch_size - (e - s)
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            mb = np.concatenate([mb, np.zeros(pad, np.float32)])
        return jnp.asarray(xb), jnp.asarray(mb)

    sums = None
    for s, e in chunks:
        xb, mb = padded(s, e)
        cur = cov_batch(params, xb, mb)
        sums = cur if sums is None else [(a0 + a1, g0 + g1) for (a0, g0), (a1, g1) in zip(sums, cur)]
    QAs, QGs, lamA, lamG = [], [], [], []
    for A, G in sums:
        la, qa = jnp.linalg.eigh(A / n)
        lg, qg = jnp.linalg.eigh(G / n)
        QAs.append(qa)
        QGs.append(qg)
        lamA.append(jnp.maximum(la, 0.0))
        lamG.append(jnp.maximum(lg, 0.0))
    corr = None
    for s, e in chunks:
        xb, mb = padded(s, e)
        cur = correction_batch(params, xb, mb, QAs, QGs)
        corr = cur if corr is None else [c0 + c1 for c0, c1 in zip(corr, cur)]
    layers = tuple(LayerFactors(qa, qg, jnp.outer(la, lg), c / n)
                   for qa, qg, la, lg, c in zip(QAs, QGs, lamA, lamG, corr))
    return Factors(tuple(p for _, p in layer_info), tuple(k for k, _ in layer_info), layers)


def _vjp_aux(fwd, taps0):
    (logits, acts) = fwd(taps0)
    _, vjp = jax.vjp(lambda t: fwd(t)[0], taps0)
    return (logits, acts), lambda c: vjp(c)[0]


def kfac_solve(factors: Factors, params, b, *, damping: float, ekfac: bool = True) -> jax.Array:
    """(F̂ + damping·I)⁻¹ b for flat vectors b (K, P), block-diagonal over layers.

    `damping` should include the weight decay λ of the objective (H = GGN + λI).
    Parameters outside Dense / Conv layers are not covered and raise.
    """
    _, unravel = ravel_pytree(params)
    covered = set()

    def one(v):
        tree = unravel(v)
        out = jax.tree_util.tree_map(jnp.zeros_like, tree)
        for path, kind, lf in zip(factors.paths, factors.kinds, factors.layers):
            lt = _get(tree, path)
            W = jnp.concatenate([_kernel_matrix(lt["kernel"], kind), lt["bias"][None]], 0)
            rot = lf.QA.T @ W @ lf.QG
            lam = lf.lam_ekfac if ekfac else lf.lam_kfac
            Wn = lf.QA @ (rot / (lam + damping)) @ lf.QG.T
            o = _get(out, path)
            o["kernel"] = _kernel_from_matrix(Wn[:-1], lt["kernel"].shape, kind)
            o["bias"] = Wn[-1]
        return ravel_pytree(out)[0]

    for p in factors.paths:
        covered.add(p)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for kp, _ in leaves:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)
        if keys[:-1] not in covered:
            raise _checks.InputError(
                f"argument `params`: got parameter {keys} outside any nnx.Linear / nnx.Conv layer; "
                "expected a model made of Dense and Conv layers. Fix: use solver='cg'.")
    return jax.vmap(one)(b)


# ----------------------------------------------------------------------------- dispatch


def solve(config, loss_fn, params, x, y, G, *, weight_decay: float, apply=None, num_classes: int,
          model=None):
    """Dispatch for `category_influence` with ``config.solver`` "lissa" or "ekfac" (or "kfac").

    Returns (SolveResult, damping, escalations).
    """
    theta, _, _ = _flat(loss_fn, params)
    _, f, logits_f, chunks, n = _hvp_parts(loss_fn, params, x, y, config.hvp_batch_size,
                                           config.curvature, apply)
    wd = jnp.asarray(weight_decay, theta.dtype)

    def full_hvp(v):
        return _hvp_jit(f, config.curvature, logits_f, v, theta, *chunks, n, wd)

    damping = 0.0 if config.damping == "auto" else float(config.damping)
    if config.damping == "auto":
        from .influence import _auto_damping

        damping = _auto_damping(full_hvp, theta, config.seed)
    if config.solver == "lissa":
        lam = power_iteration(lambda v: full_hvp(v) + damping * v, theta.size, theta.dtype, seed=config.seed)
        scale = 1.2 * lam
        res = _lissa_jit(f, config.curvature, logits_f, theta, *chunks, wd, G, scale, damping,
                         config.rtol, config.max_steps, config.seed)
        # report true residuals with the full HVP
        r = G - jax.vmap(full_hvp)(res.value) - damping * res.value
        rel = jnp.linalg.norm(r, axis=1) / jnp.maximum(jnp.linalg.norm(G, axis=1), 1e-30)
        res = res._replace(residual=rel)
        return res, damping, ({"lissa_scale": scale, "lambda_max": lam},)
    if model is None:
        raise _checks.InputError("argument `model`: got None; expected the nnx model (EK-FAC reads its "
                                 "Dense/Conv layers). Fix: pass model= to category_influence.")
    facs = compute_factors(model, params, x, batch_size=config.hvp_batch_size, num_classes=num_classes)
    U = kfac_solve(facs, params, G, damping=weight_decay + damping, ekfac=config.solver == "ekfac")
    r = G - jax.vmap(full_hvp)(U) - damping * U
    rel = jnp.linalg.norm(r, axis=1) / jnp.maximum(jnp.linalg.norm(G, axis=1), 1e-30)
    K = G.shape[0]
    return SolveResult(U, jnp.zeros(K, jnp.int32), rel, jnp.ones(K, bool), jnp.zeros(K, bool)), damping, ()


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 12))
def _lissa_jit(f, curvature, logits_f, theta, xc, yc, mc, wd, G, scale, damping, rtol, max_steps, seed):
    from .influence import _hvp_fn

    def hvp_batch(v, i):
        # the HVP of the objective on minibatch i alone (mean over its samples, plus λv)
        xb, yb, mb = xc[i][None], yc[i][None], mc[i][None]
        return _hvp_fn(f, theta, xb, yb, mb, jnp.maximum(jnp.sum(mb), 1.0), wd, curvature, logits_f)(v)

    return solve_lissa(hvp_batch, G, xc.shape[0], scale=scale, damping=damping, rtol=rtol,
                       max_steps=max_steps, seed=seed)
