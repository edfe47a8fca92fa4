"""K-FAC and EK-FAC factors of the factored layers (`layers`; see the package docstring)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checks, io, kernels
from ..config.vocabulary import FISHERS
from .layers import (
    FACTORED_TYPES,
    TYPE_NAMES,
    Layer,
    describe,
    inputs,
    refuse_unsupported,
    tapped,
)

# ----------------------------------------------------------------------------- factors


class LayerFactors(NamedTuple):
    QA: jax.Array  # (in+1, in+1) eigenvectors of A (in rows without a bias; (0, 0) for an
    # embedding, whose A is diagonal: its eigenvectors are the identity)
    QG: jax.Array  # (out, out) eigenvectors of S
    lam_kfac: jax.Array  # (in+1, out) λ_A ⊗ λ_S
    lam_ekfac: jax.Array  # (in+1, out) corrected eigenvalues


@dataclasses.dataclass(frozen=True)
class Factors:
    """K-FAC / EK-FAC factors of every factored layer, with each layer's place in the flat
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


def _tuples(v):
    """JSON lists back to (nested) tuples: a `Layer` is a static, hashable argument."""
    return tuple(_tuples(e) for e in v) if isinstance(v, (list, tuple)) else v


def load_factors(path: str | Path) -> Factors:
    meta = io.read_json(Path(path).with_suffix(".json"))
    arrays = io.load_arrays(path)

    def layer(d):
        conv = None if d["conv"] is None else _tuples(d["conv"])
        path = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in d["path"])
        axes = d.get("axes")
        return Layer(d["kind"], path, d["in_features"], d["out_features"], d["has_bias"], conv,
            tuple(d["out_shape"]), None if axes is None else tuple(axes))

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
    paths = {id(m): tuple(p) for p, m in nnx.iter_graph(copy) if isinstance(m, FACTORED_TYPES)}
    recs: list = []
    attended: list = []
    with tapped(copy, recs, None, attended) as m:
        jax.eval_shape(lambda x: m(x), jax.tree_util.tree_map(jnp.asarray, x0))
    layers = [describe(mod, paths[id(mod)], x, out_shape) for mod, x, out_shape in recs]
    for mod in attended:  # an embedding tied to an output: a second use of its weights
        layers.append(Layer("unsupported", paths[id(mod)], 0, 0, False, None, (), None,
            "an nnx.Embed also used by `attend` (weights tied to an output)"))
    if not layers:
        checks.fail("model", f"a model with no {TYPE_NAMES} layers", "layers K-FAC can factor",
            "use solver='cg' for this model")
    return graphdef, jax.tree_util.tree_structure(state), rest, tuple(layers)


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


def sampled_root(logits, key):
    """(B, K, 1): per sample, the cross-entropy's gradient at a label drawn from the model,
    r = p − e_ŷ with ŷ ~ softmax(logits), so E_ŷ[r rᵀ] = diag p − ppᵀ (`output_root`'s matrix)."""
    p = jax.nn.softmax(logits, -1)
    draw = jax.random.categorical(key, logits, axis=-1)
    return (p - jax.nn.one_hot(draw, p.shape[-1], dtype=p.dtype))[:, :, None]


@functools.lru_cache(maxsize=32)
def _forward_program(graphdef, treedef, layers, keep, output_loss=None, sampled=False):
    """jit: (params, rest, xb, yb, key) -> (R, ã per layer, the VJP of the logits with respect to
    every layer's output), R the per-sample root of the output loss's Hessian (`output_root`;
    with `sampled`, its one-column draw `sampled_root` from `key`). The VJP is a pytree (its
    residuals are the forward pass's activations), so every class's backward pass reuses this one
    forward pass across jit calls."""

    def forward(params, rest, xb, yb, key):  # rest: the non-param state, held fixed
        dt = jnp.result_type(*jax.tree_util.tree_leaves(params))  # (xb may hold token ids)
        b = jax.tree_util.tree_leaves(xb)[0].shape[0]
        taps0 = [jnp.zeros((b, *l.out_shape), dt) for l in layers]

        def fwd(taps):
            rec: list = []
            state = jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(params))
            m = nnx.merge(graphdef, state, rest)
            m.eval()  # dropout off, batch norm on its running statistics
            with tapped(m, rec, taps):
                logits = m(xb)
            return logits, [r[1] for r in rec]

        logits, vjp, acts = jax.vjp(fwd, taps0, has_aux=True)
        ins = [inputs(layers[i], acts[i]) for i in keep]  # the selected layers' inputs
        root = sampled_root(logits, key) if sampled else output_root(logits, yb, output_loss)
        return root, ins, vjp

    return jax.jit(forward)


def _class_cotangent(R, c, mb):
    """Column c of the output Hessian's root per sample, masked: H_out = Σ_c r_c r_cᵀ."""
    return R[:, :, c] * mb[:, None]


def _pseudo_gradients(vjp, p, c, mb, keep, outs):
    """Class c's pseudo-gradient at each selected layer's output (`keep`: their indices among
    every tapped layer; `outs`: their output widths), each as (B, T, out)."""
    ds = vjp(_class_cotangent(p, c, mb))[0]
    return [ds[i].reshape(ds[i].shape[0], -1, o) for i, o in zip(keep, outs)]


def _token_counts(ids, mb, vocab):
    """An embedding's diagonal input factor from one batch: Σ_b m_b Σ_t e_{id_bt} / T."""
    wt = jnp.broadcast_to(mb[:, None] / ids.shape[1], ids.shape)
    return jax.ops.segment_sum(wt.ravel(), ids.ravel(), vocab)


def _gram(a, w=None):
    """Σ_{b,t} w_b a_bt a_btᵀ for a (B, T, d): one (B·T, d)ᵀ (B·T, d) product (twice as fast
    as the same einsum over (b, t) on a 2-core CPU, measured)."""
    X = a.reshape(-1, a.shape[-1])
    Xw = X if w is None else X * jnp.repeat(w, a.shape[1])[:, None].astype(X.dtype)
    return jax.lax.dot_general(Xw, X, (((0,), (0,)), ((), ())))


@functools.partial(jax.jit, static_argnames=("embed",))
def _input_moments(A, ins, mb, embed):
    return [
        a + (_token_counts(at, mb, a.shape[0]) if e
            else _gram(at.astype(a.dtype), mb) / at.shape[1]).astype(a.dtype)
        for a, at, e in zip(A, ins, embed)
    ]


@functools.partial(jax.jit, static_argnames=("keep",))
def _output_moments(S, vjp, p, c, mb, keep):
    return [
        s + _gram(d.astype(s.dtype))
        for s, d in zip(S, _pseudo_gradients(vjp, p, c, mb, keep, [s.shape[0] for s in S]))
    ]


def _embedding_moment(ids, dr, vocab):
    """Σ_b (Σ_{t: id_bt = v} dr_bt)² per token v: the squared per-sample gradient of an embedding
    in the basis (I, Q_S). Each sample's positions are sorted by token, the positions of each
    distinct token summed (at most T groups per sample), squared, and added to that token's row:
    O(B·T·F) memory and work, whatever the vocabulary."""
    B, T, F = dr.shape
    order = jnp.argsort(ids, axis=1)
    sid = jnp.take_along_axis(ids, order, axis=1)
    sdr = jnp.take_along_axis(dr, order[:, :, None], axis=1)
    first = jnp.concatenate([jnp.ones((B, 1), bool), sid[:, 1:] != sid[:, :-1]], axis=1)
    group = (jnp.cumsum(first, axis=1) - 1 + T * jnp.arange(B)[:, None]).ravel()
    sums = jax.ops.segment_sum(sdr.reshape(-1, F), group, B * T)
    token = jax.ops.segment_max(sid.ravel(), group, B * T)  # (empty groups: a zero sum)
    return jax.ops.segment_sum(sums**2, jnp.clip(token, 0, vocab - 1), vocab)


def _rotate_first(positions: int, out: int, classes: int) -> bool:
    """Whether EK-FAC's second pass rotates a layer's inputs by Q_A before forming its per-sample
    gradients (B·T·in² multiply-adds, once per batch) or rotates those gradients after
    (B·in²·out for each of the `classes` backward passes per batch): the first where
    T < classes × out. Measured on a 2-core CPU, a batch of 256 of a 3×3 conv with 16 inputs and
    outputs on 14 × 14 positions: 10 ms the gradients first, 27 ms the inputs first."""
    return positions == 1 or positions < classes * out


@functools.partial(jax.jit, static_argnames=("embed", "classes"))
def _rotate_inputs(ins, QAs, QGs, embed, classes):
    """Q_Aᵀ a_t for the layers `_rotate_first` picks (the others' inputs as they are)."""
    return [at if e or not _rotate_first(at.shape[1], QG.shape[0], classes)
        else jnp.einsum("bti,ia->bta", at, QA) for at, QA, QG, e in zip(ins, QAs, QGs, embed)]


@functools.partial(jax.jit, static_argnames=("keep", "embed", "classes"))
def _corrected(C, vjp, p, c, mb, ins, QAs, QGs, keep, embed, classes):
    """Σ_b (Q_Aᵀ (Σ_t a_t δ_ctᵀ) Q_S)² for class c, added to C; `ins` from `_rotate_inputs`."""
    out = []
    ds = _pseudo_gradients(vjp, p, c, mb, keep, [q.shape[0] for q in QGs])
    for acc, a, d, QA, QG, e in zip(C, ins, ds, QAs, QGs, embed):
        dr = jnp.einsum("bto,op->btp", d, QG)
        if e:
            out.append(acc + _embedding_moment(a, dr, acc.shape[0]))
        elif a.shape[1] == 1:  # one position: the per-sample gradient is rank one
            out.append(acc + (a[:, 0] ** 2).T @ (dr[:, 0] ** 2))
        elif _rotate_first(a.shape[1], QG.shape[0], classes):
            out.append(acc + jnp.sum(jnp.einsum("bta,btp->bap", a, dr) ** 2, axis=0))
        else:  # the per-sample gradient first, then rotated
            g = jnp.einsum("bti,btp->bip", a, dr)
            out.append(acc + jnp.sum(jnp.einsum("bip,ia->bap", g, QA) ** 2, axis=0))
    return out


def param_keys(params) -> list[tuple]:
    """Each parameter array's path as a tuple of keys, in `ravel_pytree` order."""
    return [tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _layout(params, layers, select=None) -> tuple[tuple, ...]:
    """(weight offset, weight shape, bias offset or −1) of each layer in `ravel_pytree` order;
    every selected parameter (`select`: a set of key paths; None: all) must be in a layer."""
    where, off = {}, 0
    for keys, leaf in zip(param_keys(params), jax.tree_util.tree_leaves(params)):
        where[keys] = (off, tuple(np.shape(leaf)))
        off += int(np.size(leaf))
    covered = {l.path for l in layers}
    for keys in where:
        if keys[:-1] not in covered and (select is None or keys in select):
            checks.fail("params", f"parameter {keys} outside any factored layer ({TYPE_NAMES})",
                "a model made of those layers, or a selection of their parameters",
                "with solver='kfac' / 'ekfac' through Influence the layers are selected by "
                "default; as a CG preconditioner, use preconditioner='none' for this model")
    return tuple(
        (where[l.path + (l.weight,)][0], where[l.path + (l.weight,)][1],
            where[l.path + ("bias",)][0] if l.has_bias else -1)
        for l in layers
    ), off


def _selected(every: tuple[Layer, ...], select) -> tuple[int, ...]:
    """The indices of the selected layers (`select`: key paths, None for all): whole layers, each
    applied once per forward pass."""
    chosen = [select is None or l.path + (l.weight,) in select for l in every]
    paths = [l.path for l, c in zip(every, chosen) if c]
    for l, c in zip(every, chosen):
        if c and l.unsupported:
            refuse_unsupported(l)
    keep = tuple(i for i, (l, c) in enumerate(zip(every, chosen)) if c and l.kind != "unsupported")
    for l in every:  # a layer is selected whole or not at all
        if select is not None and l.has_bias and (
            (l.path + (l.weight,) in select) != (l.path + ("bias",) in select)
        ):
            checks.fail("select", f"the kernel or the bias of layer {l.path} alone",
                "whole layers for K-FAC / EK-FAC (kernel and bias together)",
                "select both, or neither, or use solver='cg'")
    if not keep:
        checks.fail("select", f"no {TYPE_NAMES} layer", "at least one selected layer",
            "select a factored layer's parameters, or use solver='cg'")
    for q in paths:
        if paths.count(q) > 1:
            checks.fail("model", f"layer {q} called {paths.count(q)} times per forward pass "
                "(shared weights)", "each selected layer applied once",
                "hold it fixed (select=...), or use solver='cg'")
    return keep


def default_selection(model: nnx.Module, params, x0) -> tuple[frozenset, dict]:
    """The parameters K-FAC / EK-FAC select by default (every factored layer they can answer:
    supported, and called once per forward pass), and the layers left out, each with why
    (``{path: reason}``). `x0`: one input sample (a batch of one), for the abstract forward
    pass. Selected explicitly, a left-out layer is refused (`_selected`)."""
    every = _discover(model, x0)[3]
    paths = [l.path for l in every]
    why = {l.path: l.unsupported for l in every if l.unsupported}
    for q in paths:
        if paths.count(q) > 1 and q not in why:
            why[q] = f"called {paths.count(q)} times per forward pass (shared weights)"
    keys = frozenset(k for k in param_keys(params) if k[:-1] in set(paths) and k[:-1] not in why)
    return keys, why


def _batch_token_bounds(ins, embed):
    """The (min, max) of each embedding's token ids in one batch, on the device (no host sync
    per batch); None for the other layers."""
    return [(ids.min(), ids.max()) if e else None for ids, e in zip(ins, embed)]


def _check_token_ids(layers, per_batch, embed) -> None:
    """Token ids outside an embedding's [0, V) are refused (`per_batch`: `_batch_token_bounds`
    of every batch): flax's Embed reads them as NaN (or, negative, from the end of the table),
    and the factors would count another row."""
    for j, (layer, e) in enumerate(zip(layers, embed)):
        if e:  # (reduced on the device: two host reads per embedding)
            lo = int(jnp.min(jnp.stack([b[j][0] for b in per_batch])))
            hi = int(jnp.max(jnp.stack([b[j][1] for b in per_batch])))
            if lo < 0 or hi >= layer.in_features:
                checks.fail("x", f"token ids from {lo} to {hi} reaching nnx.Embed "
                    f"{'/'.join(map(str, layer.path))}", f"ids in [0, {layer.in_features})",
                    "map unknown tokens to an id of the vocabulary (e.g. an <unk> row)")


@functools.lru_cache(maxsize=32)
def _sampled_passes(graphdef, treedef, every, keep, embed):
    """The sampled Fisher's two passes with one program per batch each (forward, moments and the
    one backward pass fused). Measured on a ResNet with BatchNorm (N = 3,000, 2 CPU cores): the
    factors 11 % faster warm and 0.5 s faster on the first call, though the forward pass is now
    compiled into both programs (0.5 s more compile)."""
    forward = _forward_program(graphdef, treedef, every, keep, None, True)

    def first(A, S, params, rest, xb, yb, mb, key):
        p, ins, vjp = forward(params, rest, xb, yb, key)
        return (_input_moments(A, ins, mb, embed), _output_moments(S, vjp, p, 0, mb, keep),
            _batch_token_bounds(ins, embed))

    def second(C, params, rest, xb, yb, mb, key, QAs, QGs):
        p, ins, vjp = forward(params, rest, xb, yb, key)
        ins = _rotate_inputs(ins, QAs, QGs, embed, 1)
        return _corrected(C, vjp, p, 0, mb, ins, QAs, QGs, keep, embed, 1)

    return jax.jit(first), jax.jit(second)


def _batches(x, y, batch_size, dt):
    """A generator factory: the batches (x, y, mask) one at a time on the device, cut as
    `kernels.pad_chunks` cuts them (balanced sizes, the last padded under mask 0:
    `kernels.padded_chunk`) but sliced, so the inputs are never copied whole; the floating
    inputs in the params' dtype (token ids stay integers)."""
    n = kernels.num_samples(x)
    y = np.zeros(n, np.int32) if y is None else np.asarray(y)
    nc, chunk = kernels.balanced_chunks(n, batch_size)
    part = lambda a, c: a[c * chunk : (c + 1) * chunk]  # noqa: E731
    return lambda: (kernels.padded_chunk(jax.tree_util.tree_map(lambda a: part(a, c), x),
        part(y, c), chunk, dt) for c in range(nc))


@functools.partial(jax.jit, static_argnames=("embed",))
def _eigen(A, S, n, embed):
    """Per layer, the (eigenvalues, eigenvectors) of A / n and of S / n (one program); an
    embedding's A is diagonal (identity eigenvectors, kept as a (0, 0) array)."""
    return [((a / n, jnp.zeros((0, 0), a.dtype)) if e else jnp.linalg.eigh(a / n),
        jnp.linalg.eigh(s / n)) for a, s, e in zip(A, S, embed)]


@jax.jit
def _finish(eig, C, n):
    """Each layer's `LayerFactors` from its eigendecompositions and EK-FAC's moment sums C."""
    return tuple(
        LayerFactors(qa, qg, jnp.outer(jnp.maximum(la, 0.0), jnp.maximum(ls, 0.0)), ci / n)
        for ((la, qa), (ls, qg)), ci in zip(eig, C)
    )


def compute_factors(model: nnx.Module, params, x, *, batch_size: int = 256, num_classes: int,
    weight_decay: float, y=None, output_loss=None, select=None, fisher: str = FISHERS[0],
    seed: int = 0) -> Factors:
    """K-FAC and EK-FAC factors of the Gauss-Newton matrix over the data x (and `weight_decay`, the
    objective's λ, which every solve with them adds; see `Factors`).

    The output side uses the softmax cross-entropy's H_out = diag p − ppᵀ (no labels needed),
    or, with ``output_loss(logits, y)`` and the labels `y`, that loss's own Hessian w.r.t. the
    logits (`output_root`). With ``fisher="sampled"`` (cross-entropy only), one label per sample
    drawn from the model instead of the K classes (`sampled_root`; the same keys in both passes,
    from `seed` and the batch index, so the same draws unless a logit rounds differently in the
    two passes' programs): one backward pass per batch instead of K.

    `x` is an input array, a pytree of them (a dict of token ids and masks), or a
    `kernels.Source` (batches from the host, never all in memory; `y` then comes with them).
    Two streamed passes over x in batches of `batch_size`: the second moments A and S (then
    their eigendecompositions), and EK-FAC's corrected eigenvalues. Per batch, one forward pass,
    then one backward pass per class from its residuals, the classes looped on the host: memory
    is one batch's activations and one class's pseudo-gradients, and what is compiled (the
    forward pass, one class's backward pass) does not grow with K. The programs are compiled
    once per model and batch shape and reused by later calls.
    """
    stream = isinstance(x, kernels.Source)
    if stream:  # a batch source: one batch in memory at a time
        n = x.n
        x0 = jax.tree_util.tree_map(lambda a: np.asarray(a)[:1], next(iter(x.batches()))[0])
    else:
        x = jax.tree_util.tree_map(np.asarray, x)
        n = kernels.num_samples(x)
        x0 = jax.tree_util.tree_map(lambda a: a[:1], x)
    graphdef, treedef, rest, every = _discover(model, x0)
    keep = _selected(every, select)
    layers = tuple(every[i] for i in keep)
    embed = tuple(l.kind == "embed" for l in layers)
    layout, num_params = _layout(params, layers, select)
    if output_loss is not None and y is None:
        checks.fail("y", "None", "the training labels when output_loss is given", "pass y=")
    checks.check_choice(fisher, "fisher", FISHERS)
    sampled = fisher == "sampled"
    if sampled and output_loss is not None:
        checks.fail("fisher", "'sampled' with an output_loss", "the softmax cross-entropy "
            "(labels are drawn from its softmax)", "use fisher='expected' for this loss")
    program = _forward_program(graphdef, treedef, every, keep, output_loss, sampled)
    nb = kernels.balanced_chunks(n, batch_size)[0]  # (a source: ceil(n / batch_size) too)
    keys = (jax.random.split(jax.random.PRNGKey(seed), nb) if sampled
        else np.zeros((nb, 2), np.uint32))  # (unused by the expected Fisher)
    dt = jnp.result_type(*jax.tree_util.tree_leaves(params))
    batches = (lambda: iter(kernels.Stream(x, batch_size, dt))) if stream else _batches(x, y,
        batch_size, dt)
    zeros = lambda *shape: jnp.asarray(np.zeros(shape, dt))  # noqa: E731 (no program compiled)
    A = [zeros(l.in_features) if e else zeros(*(l.in_features + l.has_bias,) * 2)
        for l, e in zip(layers, embed)]
    S = [zeros(l.out_features, l.out_features) for l in layers]
    fused = _sampled_passes(graphdef, treedef, every, keep, embed) if sampled else None
    per_batch = []
    for key, (xb, yb, mb) in zip(keys, batches()):
        if sampled:
            A, S, bounds = fused[0](A, S, params, rest, xb, yb, mb, key)
        else:  # one forward pass, its residuals reused by the K classes' backward passes
            p, ins, vjp = program(params, rest, xb, yb, key)
            bounds = _batch_token_bounds(ins, embed)
            A = _input_moments(A, ins, mb, embed)
            for c in range(num_classes):
                S = _output_moments(S, vjp, p, c, mb, keep)
        per_batch.append(bounds)
    _check_token_ids(layers, per_batch, embed)  # before the moments are used
    eig = _eigen(A, S, jnp.asarray(n, dt), embed)
    QAs, QGs = [e[0][1] for e in eig], [e[1][1] for e in eig]
    C = [zeros(e[0][0].shape[0], qg.shape[0]) for e, qg in zip(eig, QGs)]
    for key, (xb, yb, mb) in zip(keys, batches()):
        if sampled:
            C = fused[1](C, params, rest, xb, yb, mb, key, QAs, QGs)
            continue
        p, ins, vjp = program(params, rest, xb, yb, key)
        ins = _rotate_inputs(ins, QAs, QGs, embed, num_classes)
        for c in range(num_classes):
            C = _corrected(C, vjp, p, c, mb, ins, QAs, QGs, keep, embed, num_classes)
    return Factors(layers, _finish(eig, C, jnp.asarray(n, dt)), layout, num_params,
        float(weight_decay))
