"""K-FAC and EK-FAC curvature for flax nnx Dense / Conv layers (factors and their solve).

* **K-FAC** (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016): per flax
  `nnx.Linear` / `nnx.Conv` layer, the Gauss-Newton block is approximated by A ⊗ G with
  A = E[ã ãᵀ] (layer inputs with a 1 for the bias; conv patches) and G the second moment of the
  pseudo-gradients at the layer output, taken in expectation over labels y ~ p(y|x) (exactly:
  K backward passes per sample), so it targets the GGN = Fisher of the softmax cross-entropy.
* **EK-FAC** (George et al. 2018): K-FAC's eigenbasis U_A ⊗ U_G with the eigenvalues replaced by
  the exact second moments of the per-sample pseudo-gradients in that basis.

`compute_factors` fits the factors (a pytree, `Factors`, saved with `save_factors` and reused);
`solve_kfac` is the linear solve (F̂ + δI)⁻¹B with the `linsolve` signature and result.
See ``docs/method.md`` for where this sits in the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from . import checks, io
from .linsolve import SolveResult

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


def patches(x, module):
    """Conv input patches (B, H', W', Cin·kh·kw) in the (Cin, kh, kw) feature order."""
    kh, kw = module.kernel_size
    pad = module.padding if isinstance(module.padding, str) else tuple(module.padding)
    return jax.lax.conv_general_dilated_patches(
        x, (kh, kw), module.strides if isinstance(module.strides, (tuple, list)) else (module.strides,) * 2,
        pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def kernel_matrix(kernel, kind):
    """Layer weight as (in, out): conv kernels (kh, kw, Cin, Cout) -> (Cin·kh·kw, Cout)."""
    if kind == "dense":
        return kernel
    kh, kw, cin, cout = kernel.shape
    return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)


def kernel_from_matrix(m, shape, kind):
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


class _Net(NamedTuple):
    """A model's graph, its Dense/Conv layers in call order, and their output shapes."""

    merged: Any           # params -> (module, {id(layer): path})
    layer_info: list      # [(kind, path)]
    out_shapes: list


def _discover(model: nnx.Module, params, x0) -> _Net:
    graphdef, state = nnx.split(model)
    treedef = jax.tree_util.tree_structure(state)

    def merged(params):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(params)))
        return m, _module_paths(m)

    recs: list = []
    with _tapped(recs, None):
        m, ids = merged(params)
        m(jnp.asarray(x0))
    if not recs:
        raise checks.InputError("argument `model`: got a model with no nnx.Linear / nnx.Conv layers; "
                                "expected Dense or Conv layers. Fix: use solver='cg' for this model.")
    return _Net(merged, [(r.kind, ids[id(r.module)]) for r in recs], [r.out_shape[1:] for r in recs])


def _layer_stats(net: _Net, params, xb, mb, num_classes: int):
    """Per batch: (layer modules, inputs per layer, pseudo output-gradients per layer).

    The modules come from the same traced forward pass (their static settings, e.g. a conv's
    kernel size and strides, are what `_aug_inputs` needs)."""
    B = xb.shape[0]
    taps0 = [jnp.zeros((B, *s), xb.dtype) for s in net.out_shapes]
    modules: list = []

    def fwd(taps):
        rec: list = []
        with _tapped(rec, taps):
            m, _ = net.merged(params)
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


def _aug_inputs(kind, module, a):
    if kind == "dense":
        a2 = a.reshape(a.shape[0], -1)
        return jnp.concatenate([a2, jnp.ones((a2.shape[0], 1), a2.dtype)], 1)[:, None, :]  # (B, 1, in+1)
    pt = patches(a, module)
    pt = pt.reshape(pt.shape[0], -1, pt.shape[-1])
    return jnp.concatenate([pt, jnp.ones((*pt.shape[:2], 1), pt.dtype)], -1)  # (B, T, in+1)


def _out_grads(g):
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])  # (K, B, T, out)


def _covariances(net, num_classes, params, xb, mb):
    modules, acts, grads = _layer_stats(net, params, xb, mb, num_classes)
    out = []
    for (kind, _), mod, a, g in zip(net.layer_info, modules, acts, grads):
        at = _aug_inputs(kind, mod, a) * jnp.sqrt(mb)[:, None, None]
        T = at.shape[1]
        A = jnp.einsum("bti,btj->ij", at, at) / T
        gt = _out_grads(g)
        G = jnp.einsum("kbto,kbtp->op", gt, gt)
        out.append((A, G))
    return out


def _corrections(net, num_classes, params, xb, mb, QAs, QGs):
    modules, acts, grads = _layer_stats(net, params, xb, mb, num_classes)
    out = []
    for (kind, _), mod, a, g, QA, QG in zip(net.layer_info, modules, acts, grads, QAs, QGs):
        at = _aug_inputs(kind, mod, a)
        gt = _out_grads(g)
        # per-sample pseudo-gradient Σ_t ã_t g_tᵀ, rotated into the eigenbasis, squared
        per = jnp.einsum("bti,kbto->kbio", at, gt)
        rot = jnp.einsum("ia,kbio,op->kbap", QA, per, QG)
        out.append(jnp.sum(rot ** 2, axis=(0, 1)))
    return out


def _batches(x, batch_size):
    """(xb, mb) per batch; the last batch padded to `batch_size` (mask 0) when n > batch_size."""
    n = x.shape[0]
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        xb, mb = x[s:e], np.ones(e - s, np.float32)
        if e - s < batch_size and n > batch_size:
            pad = batch_size - (e - s)
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            mb = np.concatenate([mb, np.zeros(pad, np.float32)])
        yield jnp.asarray(xb), jnp.asarray(mb)


def _sum_over_batches(fn, x, batch_size):
    total = None
    for xb, mb in _batches(x, batch_size):
        cur = fn(xb, mb)
        total = cur if total is None else jax.tree_util.tree_map(jnp.add, total, cur)
    return total


def compute_factors(model: nnx.Module, params, x, *, batch_size: int = 256, num_classes: int) -> Factors:
    """K-FAC and EK-FAC factors of the softmax cross-entropy GGN over the data x.

    Two passes over x: the covariances A and G (then their eigendecompositions), and the
    per-sample second moments of the pseudo-gradients in the eigenbasis (EK-FAC's correction).
    """
    x = np.asarray(x)
    n = x.shape[0]
    net = _discover(model, params, x[:1])
    cov = jax.jit(lambda p, xb, mb: _covariances(net, num_classes, p, xb, mb))
    corr = jax.jit(lambda p, xb, mb, QA, QG: _corrections(net, num_classes, p, xb, mb, QA, QG))
    sums = _sum_over_batches(lambda xb, mb: cov(params, xb, mb), x, batch_size)
    QAs, QGs, lamA, lamG = [], [], [], []
    for A, G in sums:
        la, qa = jnp.linalg.eigh(A / n)
        lg, qg = jnp.linalg.eigh(G / n)
        QAs.append(qa)
        QGs.append(qg)
        lamA.append(jnp.maximum(la, 0.0))
        lamG.append(jnp.maximum(lg, 0.0))
    c = _sum_over_batches(lambda xb, mb: corr(params, xb, mb, QAs, QGs), x, batch_size)
    layers = tuple(LayerFactors(qa, qg, jnp.outer(la, lg), ci / n)
                   for qa, qg, la, lg, ci in zip(QAs, QGs, lamA, lamG, c))
    return Factors(tuple(p for _, p in net.layer_info), tuple(k for k, _ in net.layer_info), layers)


def _vjp_aux(fwd, taps0):
    (logits, acts) = fwd(taps0)
    _, vjp = jax.vjp(lambda t: fwd(t)[0], taps0)
    return (logits, acts), lambda c: vjp(c)[0]


def _check_covered(factors: Factors, params) -> None:
    covered = set(factors.paths)
    for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)
        if keys[:-1] not in covered:
            raise checks.InputError(
                f"argument `params`: got parameter {keys} outside any nnx.Linear / nnx.Conv layer; "
                "expected a model made of Dense and Conv layers. Fix: use solver='cg'.")


def solve_kfac(factors: Factors, params, b, *, damping: float, ekfac: bool = True) -> SolveResult:
    """(F̂ + damping·I)⁻¹ b for flat vectors b (K, P), block-diagonal over layers.

    `damping` should include the weight decay λ of the objective (H = GGN + λI). Parameters
    outside Dense / Conv layers are not covered and raise. The result's residual is NaN (the
    factored system is solved exactly); `linsolve.with_residual` sets it against the true
    curvature. `negative_curvature` is never set; a zero eigenvalue with no damping gives a
    non-finite solution, which `linsolve.solve_escalating` answers with more damping.
    """
    _check_covered(factors, params)
    _, unravel = ravel_pytree(params)

    def one(v):
        tree = unravel(v)
        out = jax.tree_util.tree_map(jnp.zeros_like, tree)
        for path, kind, lf in zip(factors.paths, factors.kinds, factors.layers):
            lt = _get(tree, path)
            W = jnp.concatenate([kernel_matrix(lt["kernel"], kind), lt["bias"][None]], 0)
            rot = lf.QA.T @ W @ lf.QG
            lam = lf.lam_ekfac if ekfac else lf.lam_kfac
            Wn = lf.QA @ (rot / (lam + damping)) @ lf.QG.T
            o = _get(out, path)
            o["kernel"] = kernel_from_matrix(Wn[:-1], lt["kernel"].shape, kind)
            o["bias"] = Wn[-1]
        return ravel_pytree(out)[0]

    U = jax.vmap(one)(b)
    K = U.shape[0]
    return SolveResult(U, jnp.zeros(K, jnp.int32), jnp.full(K, jnp.nan, U.dtype),
                       jnp.all(jnp.isfinite(U), axis=1), jnp.zeros(K, bool))
