"""The layers K-FAC / EK-FAC factor, as they see them: which flax nnx modules, how each call is
tapped, and each layer's input rows ã and weight matrix (see the package docstring).

Every factored layer is a matrix W (in, out) applied at T positions per sample:

* ``nnx.Linear``: ``x (B, ..., in) @ W``; the leading axes after the batch (tokens, if any)
  are the positions.
* ``nnx.LinearGeneral`` (attention's query / key / value / output projections): the contracted
  axes flattened to `in` (in increasing order, as flax pairs them with `in_features`), its output
  features to `out`, the other axes the positions; the kernel ``(*in_features, *out_features)``
  is that W reshaped.
* ``nnx.Conv`` (1-D or 2-D, not grouped or dilated): the input patches ``(Cin, *kernel)`` at
  each output position.
* ``nnx.Embed``: the one-hot of the token at each position, so the input factor is diagonal (the
  tokens' frequencies per position) and is never formed as a matrix; no bias.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import checks

FACTORED_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Embed)
TYPE_NAMES = "nnx.Linear / LinearGeneral / Conv / Embed"

_RECORDER: contextvars.ContextVar = contextvars.ContextVar("pareto_jax_kfac_recorder", default=None)


@functools.lru_cache(maxsize=None)
def _tapping_class(cls):
    """A subclass of a factored class whose call records (module, input, output shape) and adds
    the current tap to its output (`tapped`); an Embed's `attend` (weights tied to an output
    layer) is recorded apart, and refused if that embedding is selected."""

    def __call__(self, x, *a, **k):
        out = cls.__call__(self, x, *a, **k)
        rec = _RECORDER.get()
        if rec is None:
            return out
        records, taps, _ = rec
        i = len(records)
        records.append((self, x, out.shape))
        return out if taps is None else out + taps[i]

    def attend(self, query, *a, **k):
        rec = _RECORDER.get()
        if rec is not None:  # weights tied to an output: refused if this embedding is selected
            rec[2].append(self)
        return cls.attend(self, query, *a, **k)

    body = {"__call__": __call__, "__module__": __name__}
    if hasattr(cls, "attend"):
        body["attend"] = attend
    tapping = type(f"Tapped{cls.__name__}", (cls,), body)
    _TAPPING.add(tapping)
    return tapping


_TAPPING: set = set()


@contextlib.contextmanager
def tapped(module: nnx.Module, records: list, taps: list | None, attended: list | None = None):
    """Within the block, every factored layer's call in `module` (a copy made by `nnx.merge` for
    this trace, never the user's model, and never the flax classes themselves) records (module,
    input, output shape) and adds `taps[i]` to the i-th output, so a VJP with respect to the taps
    gives each layer's output gradient. Embeddings used by `attend` are appended to `attended`."""
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, FACTORED_TYPES) and type(sub) not in _TAPPING:
            sub.__class__ = _tapping_class(type(sub))
    token = _RECORDER.set((records, taps, [] if attended is None else attended))
    try:
        yield module
    finally:
        _RECORDER.reset(token)


class Layer(NamedTuple):
    """One factored layer (hashable: a static argument of the programs)."""

    kind: str  # "dense", "general", "conv" or "embed"
    path: tuple  # the module's path in the params tree
    in_features: int  # rows of the layer's weight matrix (conv: Cin·prod(kernel)), bias excluded
    out_features: int
    has_bias: bool
    conv: tuple | None  # (kernel_size, strides, padding) of a conv
    out_shape: tuple  # per-sample output shape
    axes: tuple | None = None  # a LinearGeneral's contracted input axes (non-negative, sorted)
    unsupported: str | None = None  # why this call cannot be factored (refused if selected)

    @property
    def weight(self) -> str:
        """The name of the layer's weight parameter."""
        return "embedding" if self.kind == "embed" else "kernel"


def patches(x, conv: tuple):
    """Conv input patches ``(B, *out_spatial, Cin·prod(kernel))`` in the ``(Cin, *kernel)``
    feature order, for ``conv = (kernel_size, strides, padding)`` (1-D or 2-D)."""
    ks, strides, pad = conv
    sp = "WH"[: len(ks)][::-1]  # "W" or "HW"
    return jax.lax.conv_general_dilated_patches(
        x, ks, strides, pad, dimension_numbers=(f"N{sp}C", f"{sp}IO", f"N{sp}C")
    )


def kernel_matrix(kernel, kind):
    """Layer weight as (in, out): conv kernels ``(*k, Cin, Cout) -> (Cin·prod(k), Cout)``; a
    LinearGeneral's ``(*in_features, *out_features) -> (prod(in), prod(out))``, the out_features
    given by the kind ``("general", n_out_axes)``."""
    if kind in ("dense", "embed"):
        return kernel
    if isinstance(kind, tuple):
        n_out = kind[1]
        return kernel.reshape(-1, math.prod(kernel.shape[kernel.ndim - n_out :]))
    nd = kernel.ndim - 2
    return jnp.transpose(kernel, (nd, *range(nd), nd + 1)).reshape(-1, kernel.shape[-1])


def kernel_from_matrix(m, shape, kind):
    if kind in ("dense", "embed"):
        return m
    if isinstance(kind, tuple):
        return m.reshape(shape)
    nd = len(shape) - 2
    t = m.reshape(shape[nd], *shape[:nd], shape[-1])
    return jnp.transpose(t, (*range(1, nd + 1), 0, nd + 1))


def matrix_kind(layer: Layer, kernel_shape) -> Any:
    """The `kind` argument of `kernel_matrix` for this layer's kernel."""
    if layer.kind == "general":
        return ("general", len(kernel_shape) - len(layer.axes))
    return layer.kind


def inputs(layer: Layer, a):
    """ã: the layer's input per position, (B, T, in (+1 for the bias)); for an embedding, the
    token ids (B, T)."""
    if layer.kind == "embed":
        return a.reshape(a.shape[0], -1)
    if layer.kind == "dense":
        at = a.reshape(a.shape[0], -1, layer.in_features)
    elif layer.kind == "general":
        n = len(layer.axes)
        moved = jnp.moveaxis(a, layer.axes, tuple(range(a.ndim - n, a.ndim)))
        at = moved.reshape(a.shape[0], -1, layer.in_features)
    else:
        pt = patches(a, layer.conv)
        at = pt.reshape(pt.shape[0], -1, pt.shape[-1])
    if layer.has_bias:
        at = jnp.concatenate([at, jnp.ones((*at.shape[:2], 1), at.dtype)], -1)
    return at


def refuse_unsupported(layer: Layer) -> None:
    """The error for a selected layer K-FAC cannot factor (`Layer.unsupported`)."""
    checks.fail("model", f"{layer.unsupported} at {'/'.join(map(str, layer.path))}",
        f"factored layers ({TYPE_NAMES}, plain)",
        "hold this layer fixed (select=...), or use solver='cg' for this model")


def _unsupported(what: str, path, out_shape) -> Layer:
    return Layer("unsupported", path, 0, 0, False, None, tuple(out_shape[1:]), None, what)


def _conv_layer(mod, path, x_shape, out_shape) -> Layer:
    if (
        getattr(mod, "feature_group_count", 1) != 1
        or any(d != 1 for d in np.ravel(mod.kernel_dilation or 1))
        or any(d != 1 for d in np.ravel(mod.input_dilation or 1))
    ):
        return _unsupported("a grouped or dilated nnx.Conv", path, out_shape)
    ks = tuple(mod.kernel_size)
    if len(ks) not in (1, 2) or len(x_shape) != len(ks) + 2:
        return _unsupported(f"an nnx.Conv with a {len(ks)}-D kernel on a {len(x_shape)}-D input",
            path, out_shape)
    nd = len(ks)
    strides = tuple(mod.strides) if isinstance(mod.strides, (tuple, list)) else (mod.strides,) * nd
    pad = mod.padding
    if isinstance(pad, int):
        pad = ((pad, pad),) * nd
    elif not isinstance(pad, str):
        pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
    if isinstance(pad, str) and pad not in ("SAME", "VALID"):
        return _unsupported(f"an nnx.Conv with padding {pad!r}", path, out_shape)
    return Layer("conv", path, int(mod.in_features * math.prod(ks)), int(mod.out_features),
        has_bias(mod), (ks, strides, pad), tuple(out_shape[1:]))


def has_bias(mod) -> bool:
    return getattr(mod, "bias", None) is not None and getattr(mod, "use_bias", True)


def _general_layer(mod, path, x_shape, out_shape) -> Layer:
    if getattr(mod, "batch_axis", None):
        return _unsupported("an nnx.LinearGeneral with batch axes", path, out_shape)
    nd = len(x_shape)
    axis = mod.axis if isinstance(mod.axis, (tuple, list)) else (mod.axis,)
    axes = tuple(sorted(int(a) % nd for a in axis))  # flax pairs in_features with sorted axes
    if 0 in axes:
        return _unsupported("an nnx.LinearGeneral contracting the batch axis", path, out_shape)
    fin = mod.in_features if isinstance(mod.in_features, (tuple, list)) else (mod.in_features,)
    fout = mod.out_features if isinstance(mod.out_features, (tuple, list)) else (mod.out_features,)
    return Layer("general", path, int(math.prod(fin)), int(math.prod(fout)), has_bias(mod), None,
        tuple(out_shape[1:]), axes)


def describe(mod, path, x, out_shape) -> Layer:
    """The `Layer` of one recorded call."""
    x_shape = tuple(np.shape(x))
    if isinstance(mod, nnx.Conv):
        return _conv_layer(mod, path, x_shape, out_shape)
    if isinstance(mod, nnx.LinearGeneral):
        return _general_layer(mod, path, x_shape, out_shape)
    if isinstance(mod, nnx.Embed):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            return _unsupported("an nnx.Embed called on non-integer input", path, out_shape)
        return Layer("embed", path, int(mod.num_embeddings), int(mod.features), False, None,
            tuple(out_shape[1:]))
    return Layer("dense", path, int(mod.in_features), int(mod.out_features), has_bias(mod), None,
        tuple(out_shape[1:]))
