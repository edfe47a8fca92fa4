"""The numerical kernels under every influence computation (pure JAX over padded chunks).

Nothing here validates input or chooses an algorithm; `pareto_jax.influence` does both. Each
kernel works on the samples it is given and takes an optional ``axis_name``: inside
`jax.shard_map` (see `pareto_jax.distributed`) the same function reduces its local sums with
`psum` over that mesh axis, so the single-device and the sharded paths run the same code.

* `pad_chunks`: (n, ...) samples as a `Chunks` record (x, y, mask) of fixed-size chunks.
* `flatten` / `flat_logits`: a model's per-sample loss and logits as functions of one flat θ.
* `class_gradients`: the K class-mean validation gradients in one pass (per-sample gradients or
  K VJPs per chunk).
* `Curvature` + `ObjectiveData` + `curvature_matvec`: (H + λI)·v of the full training
  objective, the Hessian (forward-over-reverse) or the Gauss-Newton product, accumulated over
  the chunks inside every call.
* `influence_rows`: P's rows from the K solutions, by forward mode (`jvp_chunk`) or by
  per-sample gradients (`per_sample_chunk`).
* `hutchinson_damping`: the "auto" damping, a small fraction of the mean curvature eigenvalue.
* `loops_on_host`: whether loops around model evaluations should run on the host (XLA:CPU)
  rather than inside one compiled program.

Each loop over chunks is written twice in effect: a compiled `lax.scan` over the chunk function
(one XLA program; what accelerators and `jax.jit` users want), and the chunk function alone
(`class_gradient_chunk`, `chunk_product`, `jvp_chunk`, `per_sample_chunk`), which
`pareto_jax.backend` calls in a host loop on CPU: XLA:CPU runs the backward convolutions of a
model about ten times slower inside a while loop than at the top level of a program
(jax-ml/jax#12868; measured here: a filter-gradient conv 7×, a data-gradient conv 12×).

The method these pieces implement is described in ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config.vocabulary import AUTO_DAMPING_FLOOR, AUTO_DAMPING_FRACTION

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class Chunks(NamedTuple):
    """Samples reshaped to (num_chunks, chunk, ...) with a 0/1 mask marking the real ones."""

    x: Any
    y: Any
    mask: Any


def pad_chunks(x, y, chunk: int, xp=np) -> Chunks:
    """Reshape (n, ...) into (n_chunks, chunk, ...) with padding and a 0/1 mask (host arrays).

    `x` (and `y`) may be an array or any pytree of arrays sharing the leading sample axis (e.g.
    a dict of token IDs and attention masks); every leaf is chunked the same way and keeps its
    dtype. The chunk size is balanced (``ceil(n / n_chunks)``) so padding stays below one
    sample per chunk; padded rows repeat the first sample and carry mask 0. ``xp=jax.numpy``
    does the same on traced arrays (inside `jax.jit`; the shapes are static).
    """
    n = num_samples(x)
    nc, chunk = balanced_chunks(n, chunk)
    pad = nc * chunk - n

    def split(a):
        a = xp.asarray(a)
        if pad:
            a = xp.concatenate([a, xp.repeat(a[:1], pad, 0)])
        return a.reshape(nc, chunk, *a.shape[1:])

    m = xp.concatenate([xp.ones(n, np.float32), xp.zeros(pad, np.float32)])
    return Chunks(
        jax.tree_util.tree_map(split, x), jax.tree_util.tree_map(split, y), m.reshape(nc, chunk)
    )


def balanced_chunks(n: int, chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk size) for n samples in chunks of at most `chunk`, the size
    balanced (``ceil(n / n_chunks)``) so padding stays below one sample per chunk."""
    nc = -(-n // max(1, min(int(chunk), n)))
    return nc, -(-n // nc)


def num_samples(x) -> int:
    """The leading (sample) axis of an array or of the first leaf of a pytree of arrays."""
    return int(np.shape(jax.tree_util.tree_leaves(x)[0])[0])


def take(x, index):
    """``x[index]`` on every leaf of an array or pytree of arrays (the sample axis first)."""
    return jax.tree_util.tree_map(lambda a: a[index], x)


def iter_chunks(chunks):
    """(x, y, mask) of each chunk in turn (x and y may be pytrees); a `Stream` yields its own."""
    if isinstance(chunks, Stream):
        yield from chunks
        return
    for i in range(chunks.mask.shape[0]):
        yield take(chunks.x, i), take(chunks.y, i), chunks.mask[i]


@dataclasses.dataclass(frozen=True)
class Source:
    """Training samples that never sit in memory at once: ``batches()`` returns a fresh iterator
    of (x_batch, y_batch) host arrays (x may be a pytree) on every call; ``n`` samples in all."""

    batches: Callable
    n: int


class Stream:
    """A `Source` re-cut into fixed-size chunks, one chunk on the device at a time (so every
    chunk program compiles once, whatever the source's batch sizes). Iterating yields
    (x, y, mask) like `iter_chunks`; the last chunk is padded with mask 0."""

    def __init__(self, source: Source, chunk: int, dtype):
        self.source, self.chunk, self.dtype = source, max(1, int(chunk)), dtype

    def __iter__(self):
        cat = lambda parts: jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts)  # noqa: E731
        xs, ys, have = [], [], 0
        for xb, yb in self.source.batches():
            xs.append(jax.tree_util.tree_map(np.asarray, xb))
            ys.append(np.asarray(yb))
            have += num_samples(xb)
            while have >= self.chunk:
                X, Y = cat(xs), cat(ys)
                yield padded_chunk(take(X, slice(0, self.chunk)), Y[: self.chunk], self.chunk,
                    self.dtype)
                xs, ys, have = ([take(X, slice(self.chunk, None))], [Y[self.chunk :]],
                    have - self.chunk)
        if have:
            yield padded_chunk(cat(xs), cat(ys), self.chunk, self.dtype)


def padded_chunk(xs, ys, chunk: int, dtype):
    """Host arrays of at most `chunk` samples as one device chunk (x, y, mask): padded to `chunk`
    with copies of its first sample under mask 0, the floating inputs in `dtype`."""
    real = num_samples(xs)
    pad = chunk - real

    def fill(a):
        return np.concatenate([a, np.repeat(a[:1], pad, 0)]) if pad else a

    mb = np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])
    return (cast_floats(jax.tree_util.tree_map(fill, xs), dtype),
        jax.tree_util.tree_map(lambda a: jnp.asarray(fill(a)), ys), jnp.asarray(mb, dtype))


def cast_floats(x, dtype):
    """Floating leaves of `x` as `dtype` (device arrays); integer leaves (token IDs) unchanged."""

    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree_util.tree_map(cast, x)


def loops_on_host(setting: str = "auto") -> bool:
    """True when loops over chunks, CG iterations and training steps should be driven from the
    host ("stepped"), False for one compiled program ("compiled"). "auto": stepped on XLA:CPU
    (see the module docstring), compiled elsewhere; the environment variable
    ``PARETO_JAX_EXECUTION`` (compiled | stepped) overrides "auto"."""
    if setting == "auto":
        setting = os.environ.get("PARETO_JAX_EXECUTION", "auto")
    if setting not in ("auto", "compiled", "stepped"):
        raise ValueError(f"execution {setting!r}: expected 'auto', 'compiled' or 'stepped'")
    return jax.default_backend() == "cpu" if setting == "auto" else setting == "stepped"


# ----------------------------------------------------------------------------- flat parameters


class Flat(NamedTuple):
    """A model seen through one flat parameter vector θ (`ravel_pytree` order)."""

    theta: jax.Array
    unravel: Callable
    loss: Callable  # f(θ, x, y): the per-sample loss of one sample


@functools.lru_cache(maxsize=256)
def _flat_fns(loss_fn, apply, treedef, spec):
    """Flat-θ versions of loss_fn/apply, cached per model so jitted callers see the same
    function object on every call (no recompilation)."""
    sizes = [int(np.prod(shape)) for shape, _ in spec]
    splits = np.cumsum(sizes)[:-1].tolist()

    def unravel(theta):
        parts = jnp.split(theta, splits) if splits else [theta]
        leaves = [p.reshape(shape).astype(dt) for p, (shape, dt) in zip(parts, spec)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    f = None if loss_fn is None else (lambda theta, x, y: loss_fn(unravel(theta), x, y))
    g = None if apply is None else (lambda theta, x: apply(unravel(theta), take(x, None))[0])
    return f, g, unravel


def _structure(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    spec = tuple((tuple(np.shape(l)), jnp.asarray(l).dtype) for l in leaves)
    return leaves, treedef, spec


def flatten(loss_fn: LossFn, params) -> Flat:
    """(θ flat, unravel, f(θ, x, y)); f is cached per (loss_fn, parameter structure)."""
    leaves, treedef, spec = _structure(params)
    theta = jnp.concatenate([jnp.ravel(jnp.asarray(l)) for l in leaves]) if leaves else jnp.zeros(0)
    f, _, unravel = _flat_fns(loss_fn, None, treedef, spec)
    return Flat(theta, unravel, f)


def flat_logits(apply, params) -> Callable:
    """g(θ, x): the logits of one (unbatched) sample as a function of flat θ (cached)."""
    _, treedef, spec = _structure(params)
    return _flat_fns(None, apply, treedef, spec)[1]


# ----------------------------------------------------------------------------- class gradients


PER_SAMPLE_BYTES = 256 * 2**20  # the most a chunk of per-sample gradients may hold


def per_sample_fits(chunk: int, num_params: int, itemsize: int = 4) -> bool:
    """Whether a chunk of per-sample gradients (chunk × P numbers) fits `PER_SAMPLE_BYTES`."""
    return chunk * num_params * itemsize <= PER_SAMPLE_BYTES


def class_gradient_method(num_classes: int, chunk: int, num_params: int, itemsize: int) -> str:
    """"per_sample" (one backward pass per sample, then a (K, c) × (c, P) product) for K > 2
    when a chunk of per-sample gradients fits, else "vjp" (K backward passes of the chunk).

    Measured (a ResNet with BatchNorm, 38k params, and a small transformer, K = 10, 1,000
    validation samples, 2 CPU cores): the K VJPs took 2.9 s and 0.82 s where one pass of
    per-sample gradients takes about a tenth of that (their cost does not grow with K).
    """
    if num_classes > 2 and per_sample_fits(chunk, num_params, itemsize):
        return "per_sample"
    return "vjp"


def class_gradient_chunk_size(num_classes: int, num_params: int, itemsize: int,
    preferred: int = 512) -> int:
    """The validation chunk for `class_gradients`: `preferred`, made smaller (down to 8) where
    K > 2 so that a chunk of per-sample gradients fits (`class_gradient_method`)."""
    if num_classes <= 2 or per_sample_fits(preferred, num_params, itemsize):
        return preferred
    if not per_sample_fits(8, num_params, itemsize):  # K VJPs then, on full-size chunks
        return preferred
    return PER_SAMPLE_BYTES // (num_params * itemsize)


def per_sample_grads(f, theta, xb, yb):
    """(c, P): the gradient of each sample's loss in a chunk (materialised)."""
    return jax.vmap(jax.grad(f), (None, 0, 0))(theta, xb, yb)


def class_gradient_chunk(f, theta, xb, yb, mb, counts, num_classes: int, method=None):
    """One chunk's share of the K class-mean gradients, (K, P): the per-sample losses weighted
    by the K columns of one_hot(y)·mask/count, either as K VJPs of the chunk's loss vector
    (``method="vjp"``) or as those weights times the chunk's per-sample gradients
    (``"per_sample"``); None: `class_gradient_method`'s choice for the chunk's shapes. The same
    sums in another order."""
    if method is None:
        method = class_gradient_method(num_classes, mb.shape[0], theta.size, theta.dtype.itemsize)
    cot = jax.nn.one_hot(yb, num_classes, dtype=theta.dtype) * mb[:, None].astype(
        theta.dtype) / counts
    if method == "per_sample":  # (summed in at least float32, as the VJPs' cotangents are)
        G = per_sample_grads(f, theta, xb, yb)
        acc = jnp.promote_types(G.dtype, jnp.float32)
        return (cot.T.astype(acc) @ G.astype(acc)).astype(theta.dtype)
    losses_fn = lambda th: jax.vmap(f, (None, 0, 0))(th, xb, yb)  # noqa: E731
    losses, vjp = jax.vjp(losses_fn, theta)
    # the cotangent takes the losses' dtype: a model may compute in a wider type than its params
    return jax.vmap(lambda c: vjp(c)[0])(cot.T.astype(losses.dtype))


def class_gradients(f, theta, chunks: Chunks, counts, num_classes: int, axis_name=None):
    """g_k = ∇_θ mean_{i: y_i = k} ℓ(z_i; θ) for every class, as a (K, P) matrix: the sum of
    `class_gradient_chunk` over the chunks (one pass). With `axis_name`, the local sums are
    `psum`-ed over that axis."""
    K = num_classes

    def chunk(acc, batch):
        return acc + class_gradient_chunk(f, theta, *batch, counts, K), None

    g, _ = jax.lax.scan(chunk, jnp.zeros((K, theta.size), theta.dtype), tuple(chunks))
    return g if axis_name is None else jax.lax.psum(g, axis_name)


# ----------------------------------------------------------------------------- curvature


@dataclasses.dataclass(frozen=True)
class Curvature:
    """What curvature of the training objective a matvec applies (hashable: a static argument).

    Attributes:
        loss: flat per-sample loss f(θ, x, y).
        logits: flat per-sample logits g(θ, x) (needed for Gauss-Newton, else None).
        kind: "hessian" (∇²L_T) or "gauss_newton" (Jᵀ H_out J, H_out the Hessian of the output
            loss with respect to the logits).
        output_loss: the per-sample output loss ``output_loss(logits, y)`` whose Hessian H_out is
            (autodiff, exact for any such loss); None = softmax cross-entropy, whose H_out is
            diag(p) − ppᵀ in closed form (positive semi-definite).
    """

    loss: Callable
    logits: Callable | None
    kind: str
    output_loss: Callable | None = None


class ObjectiveData(NamedTuple):
    """The arrays of the training objective (1/n) Σ_i m_i ℓ(z_i; θ) + (λ/2)‖θ‖² at θ, and the
    parameters the influence is over: `mask` (1 selected, 0 held fixed; None: every one)."""

    theta: jax.Array
    chunks: Chunks
    n: jax.Array
    weight_decay: jax.Array
    mask: jax.Array | None = None


def restrict(product: jax.Array, v: jax.Array, mask) -> jax.Array:
    """The curvature restricted to the selected parameters: M (H + λI) M v + (I − M) v (M the
    diagonal 0/1 `mask`; `product` = (H + λI)(M v)). The held-fixed coordinates see the identity,
    so the system stays positive definite there and a right-hand side that is zero there (the
    masked class gradients) has a solution that is zero there."""
    return product if mask is None else product * mask + (1 - mask) * v


def chunk_product(curv: Curvature, theta, xb, yb, mb, v):
    """One chunk's unnormalised data-term curvature product Σ_{i in chunk} m_i H_i v (the
    Hessian by forward-over-reverse, or the Gauss-Newton product Jᵀ H_out J v)."""
    f = curv.loss
    if curv.kind == "hessian":

        def data_term(th):
            return jnp.sum(mb * jax.vmap(f, (None, 0, 0))(th, xb, yb))

        return jax.jvp(jax.grad(data_term), (theta,), (v,))[1]
    fb = lambda th: jax.vmap(curv.logits, (None, 0))(th, xb)  # noqa: E731
    logits, jv = jax.jvp(fb, (theta,), (v,))
    if curv.output_loss is None:  # softmax cross-entropy: H_out = diag(p) − ppᵀ
        p = jax.nn.softmax(logits, -1)
        hjv = p * jv - p * jnp.sum(p * jv, -1, keepdims=True)
    else:
        out = curv.output_loss

        def h_out(z, y, t):  # H_out t for one sample, forward-over-reverse on the output loss
            return jax.jvp(jax.grad(lambda zz: out(zz, y)), (z,), (t,))[1]

        hjv = jax.vmap(h_out)(logits, yb, jv)
    _, vjp = jax.vjp(fb, theta)
    return vjp(hjv * mb[:, None])[0]


def curvature_matvec(curv: Curvature, data: ObjectiveData, axis_name=None) -> Callable:
    """v -> (H + λI) v (H the Hessian or Gauss-Newton matrix of the data term), accumulated
    over the chunks (`chunk_product`) on every call. With `axis_name` the data term is
    `psum`-ed over that mesh axis (``data.n`` must then be the global sample count) before λv
    is added."""

    def matvec(v):
        u = v if data.mask is None else v * data.mask

        def body(acc, batch):
            return acc + chunk_product(curv, data.theta, *batch, u), None

        acc, _ = jax.lax.scan(body, jnp.zeros_like(v), tuple(data.chunks))
        if axis_name is not None:
            acc = jax.lax.psum(acc, axis_name)
        return restrict(acc / data.n + data.weight_decay * u, v, data.mask)

    return matvec


def hutchinson_damping(matvec: Callable, theta: jax.Array, seed: int) -> float:
    """ "auto" damping: 1e-4 · tr(H)/P, the trace by Hutchinson's estimator with 8 Rademacher
    probes (at least 1e-8). `matvec` is batched: V (8, P) -> H V."""
    key = jax.random.PRNGKey(seed)
    z = jax.random.rademacher(key, (8, theta.size), dtype=theta.dtype)
    tr = float(jnp.mean(matvec(z) * z))
    return max(AUTO_DAMPING_FRACTION * abs(tr), AUTO_DAMPING_FLOOR)


# ----------------------------------------------------------------------------- influence rows


def _jaxpr_flops(jaxpr) -> float:
    """Multiply-add flops (×2) of the dot products and convolutions in a jaxpr, loops counted
    as many times as they run (a while loop once), other primitives not counted."""
    total = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name == "dot_general":
            (contract, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            total += 2.0 * np.prod(e.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        elif name == "conv_general_dilated":
            rhs = e.invars[1].aval.shape
            out_feat = rhs[e.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(e.outvars[0].aval.shape) * np.prod(rhs) / out_feat
        times = e.params.get("length", 1) if name == "scan" else 1
        for sub in _subjaxprs(e):
            total += times * _jaxpr_flops(sub)
    return total


def _subjaxprs(eqn):
    """The jaxprs inside an equation's parameters (a jit, a scan's body, a custom rule...)."""
    for v in eqn.params.values():
        for j in v if isinstance(v, (list, tuple)) else (v,):
            if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):  # a ClosedJaxpr
                yield j.jaxpr
            elif hasattr(j, "eqns"):
                yield j


def param_reuse(f, theta, x1, y1) -> float:
    """Multiply-adds of one sample's loss per parameter: about 1 for a dense network, more where
    a weight is applied at many positions (convolutions, tokens, a scanned recurrence). Counted
    from the traced program's dot products and convolutions (`jax.make_jaxpr`: no compile, the
    same on every backend); at least 1."""
    jaxpr = jax.make_jaxpr(f)(theta, x1, y1).jaxpr
    return max(_jaxpr_flops(jaxpr) / (2.0 * max(int(theta.size), 1)), 1.0)


def per_sample_chunk(f, theta, U, xb, yb):
    """(c, K): per-sample gradients of one chunk (materialised, c × P) contracted with U."""
    G = per_sample_grads(f, theta, xb, yb)
    return G @ U.T


def jvp_chunk(f, theta, U, xb, yb):
    """(c, K): the K directional derivatives of the chunk's loss vector along the rows of U
    (forward mode; never forms a per-sample gradient)."""
    losses = lambda th: jax.vmap(f, (None, 0, 0))(th, xb, yb)  # noqa: E731
    _, lin = jax.linearize(losses, theta)
    return jax.vmap(lin)(U).T


def influence_rows(f, method: str, theta, U, chunks: Chunks):
    """(num_chunks, chunk, K): u_kᵀ∇ℓ(z_i) for every (padded) sample, 0 on padding (the
    caller divides by N)."""
    fn = jvp_chunk if method == "jvp" else per_sample_chunk
    return jax.lax.map(lambda b: fn(f, theta, U, b[0], b[1]) * b[2][:, None], tuple(chunks))
