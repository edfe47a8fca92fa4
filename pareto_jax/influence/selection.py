"""Influence over chosen parameters: which parameter arrays count, everything else held fixed.

A selection S restricts the question to the parameters in S: the class gradients and the
per-sample gradients are their S components, and the curvature is the S×S block of the training
objective's curvature, H_SS + λI (`docs/method.md`, "Influence over chosen parameters"). It is
what the influence would be if the unselected parameters were constants of the model; it
approximates the full answer as the parameters outside S matter less to the change that a
reweighting makes. K-FAC / EK-FAC select every layer they can factor by default
(`kfac.FACTORED_TYPES`: Linear, LinearGeneral, Conv, Embed, each called once per forward
pass), so a model with norm layers is answered with their scales and biases held fixed, and a
layer they cannot factor (shared weights, an embedding tied to the output, a grouped conv) is
held fixed too; both are said in ``details["selection"]``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import nnx

from .. import checks, kfac, linsolve
from ..config.vocabulary import AUTO_DAMPING_FLOOR, AUTO_DAMPING_FRACTION


class Selection(NamedTuple):
    """The chosen parameter arrays (`keys`, key paths as `kfac.param_keys` writes them), the 0/1
    mask over the flat parameters, and a sentence for the result's details."""

    keys: frozenset
    mask: np.ndarray
    note: str


def _layer_keys(model, all_keys, types=kfac.FACTORED_TYPES, *, whole: bool = False) -> set:
    """The parameters of the modules of these types: their own (K-FAC's layers), or with
    `whole` every parameter inside them (a block holding sub-modules)."""
    paths = [tuple(p) for p, m in nnx.iter_graph(model) if isinstance(m, types)]
    if whole:
        return {k for k in all_keys if any(k[: len(p)] == p for p in paths)}
    return {k for k in all_keys if k[:-1] in set(paths)}


def _as_path(prefix) -> tuple:
    if isinstance(prefix, str):
        return tuple(int(p) if p.isdigit() else p for p in prefix.split("/") if p)
    return tuple(prefix)


def _chosen(select, params, model, all_keys) -> set:
    leaves = jax.tree_util.tree_leaves(params)
    if isinstance(select, type) or (
        isinstance(select, tuple) and select and all(isinstance(t, type) for t in select)
    ):
        if model is None:
            checks.fail("select", f"module types {select}", "model= to find those modules in",
                "pass model=, or select by parameter path")
        return _layer_keys(model, all_keys, select, whole=True)
    if callable(select):
        return {k for k, leaf in zip(all_keys, leaves) if bool(select(k, leaf))}
    if isinstance(select, (str, tuple, list)):
        prefixes = [_as_path(p) for p in ([select] if isinstance(select, str) else select)]
        return {k for k in all_keys if any(k[: len(p)] == p for p in prefixes if p)}
    checks.fail("select", repr(select)[:80], "None, a path prefix ('head', 'layers/0'), a list "
        "of them, an nnx module type (or a tuple of types), or a function (path, array) -> bool",
        "see Influence's select argument")


def resolve(select: Any, params, model, uses_factors: bool, x0=None) -> Selection | None:
    """The `Selection` for `select` (None: every parameter, or for K-FAC / EK-FAC every
    parameter of a layer they can factor, `kfac.default_selection` on the one-sample input `x0`,
    the others held fixed and named); None when every parameter is selected (the unrestricted
    problem, with no mask)."""
    all_keys = kfac.param_keys(params)
    if select is None and not (uses_factors and model is not None):
        return None
    left_out: dict = {}
    if select is not None:
        chosen = _chosen(select, params, model, all_keys)
    elif x0 is None:
        chosen = _layer_keys(model, all_keys)
    else:
        chosen, left_out = kfac.default_selection(model, params, x0)
    if not chosen:
        checks.fail("select", f"{select!r} matching none of the {len(all_keys)} parameter arrays",
            "a selection of at least one parameter array", f"choose among e.g. {all_keys[:4]}")
    if len(chosen) == len(all_keys):
        return None
    leaves = jax.tree_util.tree_leaves(params)
    mask = np.concatenate([np.full(np.size(leaf), k in chosen, np.float64)
        for k, leaf in zip(all_keys, leaves)])
    fixed = [k for k in all_keys if k not in chosen]
    how = f"every {kfac.TYPE_NAMES} layer (K-FAC / EK-FAC's default)" if select is None else (
        "as selected")
    note = (f"influence over {int(mask.sum())} of {mask.size} parameters ({len(chosen)} of "
        f"{len(all_keys)} arrays, {how}); held fixed: "
        + ", ".join("/".join(map(str, k)) for k in fixed[:8])
        + (f" and {len(fixed) - 8} more" if len(fixed) > 8 else "")
        + "".join(f"; layer {'/'.join(map(str, p))} held fixed: K-FAC cannot factor {why}"
            for p, why in left_out.items()))
    return Selection(frozenset(chosen), mask, note)


def block(matvec: Callable, mask) -> Callable:
    """The batched `matvec` of the restricted operator (`kernels.restrict`) with the identity on
    the held-fixed coordinates taken out: the selected block H_SS + λI alone, zero elsewhere."""
    return matvec if mask is None else (lambda V: matvec(V) - (1 - mask) * V)


def damping(setting, matvec, theta, seed: int, mask) -> float:
    """`linsolve.resolve_damping` on the selected block: "auto" is 1e-4 of the mean eigenvalue
    of H_SS + λI (`block`)."""
    if mask is None or setting != "auto":
        return linsolve.resolve_damping(setting, matvec, theta, seed)
    d = linsolve.resolve_damping(setting, block(matvec, mask), theta, seed)
    return max(d * mask.size / max(float(mask.sum()), 1.0), AUTO_DAMPING_FLOOR)  # (after scaling)


def damping_from_factors(factors: kfac.Factors) -> float:
    """"auto" for K-FAC / EK-FAC, read off their factors exactly, with no probes: EK-FAC's
    corrected eigenvalues are the per-sample gradients' second moments in an orthonormal basis,
    so each layer's sum is the trace of its Gauss-Newton block, and their total over the factored
    (selected) layers is tr(G_SS). The mean eigenvalue of G_SS + λI is then that trace over the
    selected parameter count, plus λ."""
    size = sum(int(np.size(f.lam_ekfac)) for f in factors.factors)
    trace = sum(float(np.asarray(f.lam_ekfac).sum()) for f in factors.factors)
    return max(AUTO_DAMPING_FRACTION * (trace / size + factors.weight_decay), AUTO_DAMPING_FLOOR)


def restrict_gradients(G, mask):
    """The class gradients' components on the selected parameters (the rest zero, so the
    solutions are zero there and P's rows are the selected parameters' inner products)."""
    return G if mask is None else G * mask
