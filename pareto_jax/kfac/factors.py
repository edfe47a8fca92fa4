"""K-FAC and EK-FAC factors of flax nnx Dense / Conv layers (see the package docstring)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checks, io, kernels

# ----------------------------------------------------------------------------- layer taps


_RECORDER: contextvars.ContextVar = contextvars.ContextVar("pareto_jax_kfac_recorder", default=None)


@functools.lru_cache(maxsize=None)
def _tapping_class(cls):
    """A subclass of a Linear / Conv class whose call records (module, input, output shape) and
    adds the current tap to its output (`_tapped`)."""

    def __call__(self, x, *a, **k):
        out = cls.__call__(self, x, *a, **k)
        rec = _RECORDER.get()
        if rec is None:
            return out
        records, taps = rec
        i = len(records)
        records.append((self, x, out.shape))
        return out if taps is None else out + taps[i]

    tapping = type(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})
    _TAPPING.add(tapping)
    return tapping


_TAPPING: set = set()


@contextlib.contextmanager
def _tapped(module: nnx.Module, records: list, taps: list | None):
    """Within the block, every nnx.Linear / nnx.Conv call of `module` (a copy made by
    `nnx.merge` for this trace, never the user's model, and never the flax classes themselves)
    records (module, input, output shape) and adds `taps[i]` to the i-th output, so a VJP with
    respect to the taps gives each layer's output gradient."""
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, (nnx.Linear, nnx.Conv)) and type(sub) not in _TAPPING:
            sub.__class__ = _tapping_class(type(sub))
    token = _RECORDER.set((records, taps))
    try:
        yield module
    finally:
        _RECORDER.reset(token)


class Layer(NamedTuple):
    """One Dense/Conv layer as K-FAC sees it (hashable: a static argument of the programs)."""

    kind: str  # "dense" or "conv"
    path: tuple  # the module's path in the params tree
    in_features: int  # rows of the layer's weight matrix (conv: Cin·kh·kw), bias excluded
    out_features: int
    has_bias: bool
    conv: tuple | None  # (kernel_size, strides, padding) of a conv
    out_shape: tuple  # per-sample output shape


def patches(x, conv: tuple):
    """Conv input patches (B, H', W', Cin·kh·kw) in the (Cin, kh, kw) feature order, for
    ``conv = (kernel_size, strides, padding)``."""
    ks, strides, pad = conv
    return jax.lax.conv_general_dilated_patches(
        x, ks, strides, pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


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


# ----------------------------------------------------------------------------- factors


class LayerFactors(NamedTuple):
    QA: jax.Array  # (in+1, in+1) eigenvectors of A (in rows without a bias)
    QG: jax.Array  # (out, out) eigenvectors of S
    lam_kfac: jax.Array  # (in+1, out) λ_A ⊗ λ_S
    lam_ekfac: jax.Array  # (in+1, out) corrected eigenvalues


@dataclasses.dataclass(frozen=True)
class Factors:
    """K-FAC / EK-FAC factors of every Dense / Conv layer, with each layer's place in the flat
    parameter vector (`layout`: (kernel offset, kernel shape, bias offset or −1) per layer).

    They approximate the curvature of the whole training objective, G + λI: `weight_decay` is
    that λ, so every solve with them takes only the damping δ on top (as every other solver
    does)."""

    layers: tuple[Layer, ...]
    factors: tuple[LayerFactors, ...]
    layout: tuple[tuple, ...]
    num_params: int
    weight_decay: float


def save_factors(path: str | Path, f: Factors) -> None:
    """Save factors as .npz (plain keys ``layer{i}/{QA,QG,lam_kfac,lam_ekfac}``) beside a JSON
    description of the layers and their layout."""
    arrays = {
        f"layer{i}/{k}": np.asarray(getattr(lf, k))
        for i, lf in enumerate(f.factors)
        for k in LayerFactors._fields
    }
    io.save_arrays(path, arrays)
    io.write_json(
        Path(path).with_suffix(".json"),
        {"layers": [l._asdict() for l in f.layers], "layout": f.layout, "num_params": f.num_params,
            "weight_decay": f.weight_decay},
    )


def load_factors(path: str | Path) -> Factors:
    meta = io.read_json(Path(path).with_suffix(".json"))
    arrays = io.load_arrays(path)

    def layer(d):
        conv = (
            None
            if d["conv"] is None
            else tuple(tuple(v) if isinstance(v, list) else v for v in d["conv"])
        )
        path = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in d["path"])
        return Layer(d["kind"], path, d["in_features"], d["out_features"], d["has_bias"], conv,
            tuple(d["out_shape"]))

    layers = tuple(layer(d) for d in meta["layers"])
    facs = tuple(
        LayerFactors(*(jnp.asarray(arrays[f"layer{i}/{k}"]) for k in LayerFactors._fields))
        for i in range(len(layers))
    )
    layout = tuple((int(k), tuple(s), int(b)) for k, s, b in meta["layout"])
    if "weight_decay" not in meta:
        checks.fail("path", f"{path} without the objective's weight decay",
            "factors saved by this version",
            "compute the factors again (their λ is part of every solve with them)")
    return Factors(layers, facs, layout, int(meta["num_params"]), float(meta["weight_decay"]))


def _discover(model: nnx.Module, x0) -> tuple[Any, Any, Any, tuple[Layer, ...]]:
    """(graphdef, the params' treedef, the state that is not a param, layers in call order) from
    an abstract forward pass. The non-param state (BatchNorm's running statistics, RNG state) is
    held fixed and the model run in evaluation mode, as `models.functional` runs it."""
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    copy = nnx.merge(graphdef, state, rest)
    copy.eval()
    paths = {
        id(m): tuple(p) for p, m in nnx.iter_graph(copy) if isinstance(m, (nnx.Linear, nnx.Conv))
    }
    recs: list = []
    with _tapped(copy, recs, None) as m:
        jax.eval_shape(lambda x: m(x), jnp.asarray(x0))
    layers = []
    for mod, _, out_shape in recs:
        has_bias = getattr(mod, "bias", None) is not None and getattr(mod, "use_bias", True)
        if isinstance(mod, nnx.Conv):
            if (
                getattr(mod, "feature_group_count", 1) != 1
                or any(d != 1 for d in np.ravel(mod.kernel_dilation or 1))
                or any(d != 1 for d in np.ravel(mod.input_dilation or 1))
            ):
                checks.fail("model", "a grouped or dilated nnx.Conv", "plain convolutions",
                    "use solver='cg' for this model")
            strides = (
                tuple(mod.strides) if isinstance(mod.strides, (tuple, list)) else (mod.strides,) * 2
            )
            pad = mod.padding
            if isinstance(pad, int):
                pad = ((pad, pad), (pad, pad))
            elif not isinstance(pad, str):
                pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
            if isinstance(pad, str) and pad not in ("SAME", "VALID"):
                checks.fail("model", f"an nnx.Conv with padding {pad!r}",
                    "SAME, VALID or explicit padding", "use solver='cg' for this model")
            kh, kw = mod.kernel_size
            layers.append(
                Layer("conv", paths[id(mod)], int(mod.in_features * kh * kw), int(mod.out_features),
                    has_bias, (tuple(mod.kernel_size), strides, pad), tuple(out_shape[1:]))
            )
        else:
            layers.append(
                Layer("dense", paths[id(mod)], int(mod.in_features), int(mod.out_features),
                    has_bias, None, tuple(out_shape[1:]))
            )
    if not layers:
        checks.fail("model", "a model with no nnx.Linear / nnx.Conv layers", "Dense or Conv layers",
            "use solver='cg' for this model")
    return graphdef, jax.tree_util.tree_structure(state), rest, tuple(layers)


def _inputs(layer: Layer, a):
    """ã: the layer's input per position, (B, T, in (+1 for the bias))."""
    if layer.kind == "dense":
        at = a.reshape(a.shape[0], -1, layer.in_features)
    else:
        pt = patches(a, layer.conv)
        at = pt.reshape(pt.shape[0], -1, pt.shape[-1])
    if layer.has_bias:
        at = jnp.concatenate([at, jnp.ones((*at.shape[:2], 1), at.dtype)], -1)
    return at


def output_root(logits, y, output_loss=None):
    """R (B, K, K) with H_out = R Rᵀ per sample: for softmax cross-entropy (None) the columns
    r_c = √p_c (p − e_c), so H_out = diag p − ppᵀ; for another output loss ``out(logits, y)``
    its Hessian w.r.t. the logits by autodiff, as Q √max(λ, 0) (a non-convex loss's negative
    curvature is clipped: K-FAC needs a PSD factor)."""
    if output_loss is None:
        p = jax.nn.softmax(logits, -1)
        eye = jnp.eye(p.shape[1], dtype=p.dtype)
        return jnp.sqrt(p)[:, None, :] * (p[:, :, None] - eye[None])
    H = jax.vmap(jax.hessian(output_loss))(logits, y)
    lam, Q = jnp.linalg.eigh(H)
    return Q * jnp.sqrt(jnp.maximum(lam, 0.0))[:, None, :]


@functools.lru_cache(maxsize=32)
def _forward_program(graphdef, treedef, layers, keep, output_loss=None):
    """jit: (params, xb, yb) -> (R, ã per layer, the VJP of the logits with respect to every
    layer's output), R the per-sample root of the output loss's Hessian (`output_root`). The VJP
    is a pytree (its residuals are the forward pass's activations), so every class's backward
    pass reuses this one forward pass across jit calls."""

    def forward(params, rest, xb, yb):  # rest: the non-param state, held fixed
        taps0 = [jnp.zeros((xb.shape[0], *l.out_shape), xb.dtype) for l in layers]

        def fwd(taps):
            rec: list = []
            state = jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(params))
            m = nnx.merge(graphdef, state, rest)
            m.eval()  # dropout off, batch norm on its running statistics
            with _tapped(m, rec, taps):
                logits = m(xb)
            return logits, [r[1] for r in rec]

        logits, vjp, acts = jax.vjp(fwd, taps0, has_aux=True)
        ins = [_inputs(layers[i], acts[i]) for i in keep]  # the selected layers' inputs
        return output_root(logits, yb, output_loss), ins, vjp

    return jax.jit(forward)


def _class_cotangent(R, c, mb):
    """Column c of the output Hessian's root per sample, masked: H_out = Σ_c r_c r_cᵀ."""
    return R[:, :, c] * mb[:, None]


def _pseudo_gradients(vjp, p, c, mb, keep):
    """Class c's pseudo-gradient at each selected layer's output (`keep`: their indices among
    every tapped layer), each as (B, T, out)."""
    ds = vjp(_class_cotangent(p, c, mb))[0]
    return [ds[i].reshape(ds[i].shape[0], -1, ds[i].shape[-1]) for i in keep]


@jax.jit
def _input_moments(A, ins, mb):
    return [
        a + jnp.einsum("bti,btj->ij", at * mb[:, None, None], at) / at.shape[1]
        for a, at in zip(A, ins)
    ]


@functools.partial(jax.jit, static_argnames=("keep",))
def _output_moments(S, vjp, p, c, mb, keep):
    return [
        s + jnp.einsum("bto,btp->op", d, d)
        for s, d in zip(S, _pseudo_gradients(vjp, p, c, mb, keep))
    ]


@jax.jit
def _rotate_inputs(ins, QAs):
    return [jnp.einsum("bti,ia->bta", at, QA) for at, QA in zip(ins, QAs)]


@functools.partial(jax.jit, static_argnames=("keep",))
def _corrected(C, vjp, p, c, mb, rot_in, QGs, keep):
    """Σ_b (Q_Aᵀ (Σ_t ã_t δ_ctᵀ) Q_S)² for class c, added to C (rank one for a dense layer)."""
    out = []
    for acc, ai, d, QG in zip(C, rot_in, _pseudo_gradients(vjp, p, c, mb, keep), QGs):
        dr = jnp.einsum("bto,op->btp", d, QG)
        if ai.shape[1] == 1:  # one position: the per-sample gradient is rank one
            out.append(acc + (ai[:, 0] ** 2).T @ (dr[:, 0] ** 2))
        else:
            out.append(acc + jnp.sum(jnp.einsum("bta,btp->bap", ai, dr) ** 2, axis=0))
    return out


def param_keys(params) -> list[tuple]:
    """Each parameter array's path as a tuple of keys, in `ravel_pytree` order."""
    return [tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _layout(params, layers, select=None) -> tuple[tuple, ...]:
    """(kernel offset, kernel shape, bias offset or −1) of each layer in `ravel_pytree` order;
    every selected parameter (`select`: a set of key paths; None: all) must be in a layer."""
    where, off = {}, 0
    for keys, leaf in zip(param_keys(params), jax.tree_util.tree_leaves(params)):
        where[keys] = (off, tuple(np.shape(leaf)))
        off += int(np.size(leaf))
    covered = {l.path for l in layers}
    for keys in where:
        if keys[:-1] not in covered and (select is None or keys in select):
            checks.fail("params", f"parameter {keys} outside any nnx.Linear / nnx.Conv layer",
                "a model made of Dense and Conv layers, or a selection of their parameters",
                "with solver='kfac' / 'ekfac' through Influence the layers are selected by "
                "default; as a CG preconditioner, use preconditioner='none' for this model")
    return tuple(
        (where[l.path + ("kernel",)][0], where[l.path + ("kernel",)][1],
            where[l.path + ("bias",)][0] if l.has_bias else -1)
        for l in layers
    ), off


def compute_factors(model: nnx.Module, params, x, *, batch_size: int = 256, num_classes: int,
    weight_decay: float, y=None, output_loss=None, select=None) -> Factors:
    """K-FAC and EK-FAC factors of the Gauss-Newton matrix over the data x (and `weight_decay`, the
    objective's λ, which every solve with them adds; see `Factors`).

    The output side uses the softmax cross-entropy's H_out = diag p − ppᵀ (no labels needed),
    or, with ``output_loss(logits, y)`` and the labels `y`, that loss's own Hessian w.r.t. the
    logits (`output_root`).

    Two streamed passes over x in batches of `batch_size`: the second moments A and S (then
    their eigendecompositions), and EK-FAC's corrected eigenvalues. Per batch, one forward pass,
    then one backward pass per class from its residuals, the classes looped on the host: memory
    is one batch's activations and one class's pseudo-gradients, and what is compiled (the
    forward pass, one class's backward pass) does not grow with K. The programs are compiled
    once per model and batch shape and reused by later calls.
    """
    x = np.asarray(x)
    n = x.shape[0]
    graphdef, treedef, rest, every = _discover(model, x[:1])
    keep = tuple(i for i, l in enumerate(every) if select is None or l.path + ("kernel",) in select)
    for l in every:  # a layer is selected whole or not at all
        if select is not None and l.has_bias and (
            (l.path + ("kernel",) in select) != (l.path + ("bias",) in select)
        ):
            checks.fail("select", f"the kernel or the bias of layer {l.path} alone",
                "whole layers for K-FAC / EK-FAC (kernel and bias together)",
                "select both, or neither, or use solver='cg'")
    if not keep:
        checks.fail("select", "no nnx.Linear / nnx.Conv layer", "at least one selected layer",
            "select a Dense or Conv layer's parameters, or use solver='cg'")
    layers = tuple(every[i] for i in keep)
    layout, num_params = _layout(params, layers, select)
    if output_loss is not None and y is None:
        checks.fail("y", "None", "the training labels when output_loss is given", "pass y=")
    program = _forward_program(graphdef, treedef, every, keep, output_loss)

    def forward(params, xb, yb):
        return program(params, rest, xb, yb)

    xc, yc, mc = kernels.pad_chunks(
        x, np.zeros(n, np.int32) if y is None else np.asarray(y), batch_size
    )
    dt = jnp.result_type(*jax.tree_util.tree_leaves(params))

    def batches():  # one batch on the device at a time, in each pass
        return (
            (jnp.asarray(xb, dt), jnp.asarray(yb), jnp.asarray(mb, dt))
            for xb, yb, mb in zip(xc, yc, mc)
        )

    A = [jnp.zeros((l.in_features + l.has_bias,) * 2, dt) for l in layers]
    S = [jnp.zeros((l.out_features,) * 2, dt) for l in layers]
    for xb, yb, mb in batches():
        p, ins, vjp = forward(params, xb, yb)
        A = _input_moments(A, ins, mb)
        for c in range(num_classes):
            S = _output_moments(S, vjp, p, c, mb, keep)
    eig = [(jnp.linalg.eigh(a / n), jnp.linalg.eigh(s / n)) for a, s in zip(A, S)]
    QAs, QGs = [e[0][1] for e in eig], [e[1][1] for e in eig]
    C = [jnp.zeros((qa.shape[0], qg.shape[0]), dt) for qa, qg in zip(QAs, QGs)]
    for xb, yb, mb in batches():
        p, ins, vjp = forward(params, xb, yb)
        rot_in = _rotate_inputs(ins, QAs)
        for c in range(num_classes):
            C = _corrected(C, vjp, p, c, mb, rot_in, QGs, keep)
    facs = tuple(
        LayerFactors(qa, qg, jnp.outer(jnp.maximum(la, 0.0), jnp.maximum(ls, 0.0)), ci / n)
        for ((la, qa), (ls, qg)), ci in zip(eig, C)
    )
    return Factors(layers, facs, layout, num_params, float(weight_decay))


# ----------------------------------------------------------------------------- the solve
