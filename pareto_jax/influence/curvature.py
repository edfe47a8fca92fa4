"""Which curvature of the training objective the solvers invert, decided once per fit.

`resolve` turns ``InfluenceConfig.curvature`` ("auto", "hessian", "gauss_newton") and the way
the loss was given (an `models.OutputLoss`, a plain ``loss_fn`` with or without ``apply``) into a
`Choice`: the config with its curvature decided, the `kernels.Curvature` the products use, the
logits function and output loss Gauss-Newton and K-FAC need, and a note of every default taken.
It never answers with a curvature that is not the one the loss defines.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import checks, kernels, models
from ..config import InfluenceConfig
from ..kernels import Curvature


class Choice(NamedTuple):
    """The decided curvature: `config` (its `curvature` no longer "auto"), `curvature` (what
    the products apply), `apply` (the logits, or None), `output_loss` (None = the closed-form
    softmax cross-entropy) and `note` (the defaults taken, for the result's details)."""

    config: InfluenceConfig
    curvature: Curvature
    apply: Callable | None
    output_loss: Callable | None
    note: dict


def build(loss_fn, params, kind: str, apply, output_loss=None) -> Curvature:
    """The `kernels.Curvature` of this loss: its flat per-sample loss and, for Gauss-Newton,
    its flat logits and output loss."""
    checks.check_choice(kind, "curvature", ("hessian", "gauss_newton"))
    f = kernels.flatten(loss_fn, params).loss
    if kind == "hessian":
        return Curvature(f, None, "hessian")
    if apply is None:
        checks.fail(
            "apply",
            "None",
            "the model's apply(params, x_batch) -> logits",
            "pass apply= for Gauss-Newton curvature, or write the loss as "
            "models.OutputLoss(apply, output_loss)",
        )
    return Curvature(f, kernels.flat_logits(apply, params), "gauss_newton", output_loss)


def cross_entropy_mismatch(loss_fn, params, apply, x, y, n: int = 16) -> float:
    """Max relative difference, over the first n samples, between ``loss_fn`` and the softmax
    cross-entropy of ``apply``'s logits (0 when loss_fn is that cross-entropy)."""
    xs, ys = kernels.take(x, slice(0, n)), jnp.asarray(y[:n])
    ours = jax.vmap(loss_fn, (None, 0, 0))(params, xs, ys)
    ce = optax.softmax_cross_entropy_with_integer_labels(apply(params, xs), ys)
    return float(jnp.max(jnp.abs(ours - ce) / jnp.maximum(jnp.abs(ce), 1e-6)))


def _not_cross_entropy(loss_fn, params, apply, x, y) -> str | None:
    """Why Gauss-Newton with the closed-form output Hessian, or K-FAC, would be wrong for this
    loss (None when loss_fn is the softmax cross-entropy of apply's logits, checked on 16
    training samples): they use that loss's output Hessian diag p − ppᵀ whatever the loss."""
    gap = cross_entropy_mismatch(loss_fn, params, apply, x, y)
    if gap <= 1e-4:
        return None
    return (
        "loss_fn is not the softmax cross-entropy of apply's logits (relative difference "
        f"{gap:.2g} "
        f"on 16 training samples)"
    )


def output_hessian_min_eig(output_loss, apply, params, x, y, n: int = 16) -> float:
    """The smallest eigenvalue of the output loss's Hessian (w.r.t. the logits) over the first n
    samples, relative to the largest magnitude: < 0 means Gauss-Newton is not PSD here."""
    xs, ys = kernels.take(x, slice(0, n)), jnp.asarray(y[:n])
    H = jax.vmap(jax.hessian(output_loss))(apply(params, xs), ys)
    ev = jnp.linalg.eigvalsh(H)
    return float(jnp.min(ev) / jnp.maximum(jnp.max(jnp.abs(ev)), 1e-30))


def _refuse(what: str, why: str, fix: str | None = None):
    checks.fail(
        "config",
        what,
        "a loss that is softmax cross-entropy of apply's logits for K-FAC / EK-FAC "
        "and for Gauss-Newton with a plain loss_fn",
        fix
        or f"{why}; write the loss as models.OutputLoss(apply, output_loss) for an exact "
        "Gauss-Newton, or use curvature='hessian' with solver 'cg', 'dense' or 'lissa'",
    )


def _decided(config, kind, loss_fn, params, apply, out, note) -> Choice:
    config = dataclasses.replace(config, curvature=kind) if config.curvature != kind else config
    return Choice(config, build(loss_fn, params, kind, apply, out), apply, out, note)


def resolve(config: InfluenceConfig, loss_fn, params, apply, x, y) -> Choice:
    """The curvature this config and loss call for (module docstring).

    * A loss written as `models.OutputLoss` carries its own output loss, so Gauss-Newton uses
      that loss's Hessian w.r.t. the logits (autodiff; exact for any output loss). "auto" takes
      it when that Hessian is PSD on 16 training samples, else the full Hessian (noted).
    * A plain ``loss_fn`` with ``apply``: Gauss-Newton only when loss_fn is the softmax
      cross-entropy of apply's logits; "auto" takes the Hessian otherwise (noted), an explicit
      Gauss-Newton request is refused.
    * K-FAC / EK-FAC factor the Gauss-Newton matrix with the output loss's Hessian: an
      `OutputLoss` gives its own; a plain loss_fn must be the cross-entropy (else refused).
    """
    split = isinstance(loss_fn, models.OutputLoss)
    if split and apply is None:
        apply = loss_fn.apply
    kfac_like = config.uses_factors
    if kfac_like and not split:  # an OutputLoss gives the factors its own output Hessian
        why = "apply is None" if apply is None else _not_cross_entropy(loss_fn, params, apply, x, y)
        if why is not None:
            _refuse(
                f"solver={config.solver!r}, preconditioner={config.preconditioner!r}",
                why,
                f"{why}; K-FAC / EK-FAC need the loss's output Hessian: write the loss as "
                "models.OutputLoss(apply, output_loss), or use solver='cg' with the Hessian",
            )
    def decided(kind, out, note):
        return _decided(config, kind, loss_fn, params, apply, out, {"curvature_note": note})

    if config.curvature == "hessian":
        return decided("hessian", None, "the Hessian, as requested")
    if apply is None and config.curvature == "auto":
        return decided("hessian", None, "the Hessian: the loss's logits are out of reach (pass "
            "apply= or model=, or write the loss as models.OutputLoss(apply, output_loss), for "
            "Gauss-Newton)")
    if apply is None:  # Gauss-Newton asked for without the logits: `build` says what to pass
        build(loss_fn, params, "gauss_newton", None)
    if split:
        out = None if loss_fn.is_cross_entropy else loss_fn.output_loss
        if config.curvature == "auto" and out is not None and not kfac_like:
            lo = output_hessian_min_eig(out, apply, params, x, y)
            if lo < -1e-6:
                return decided("hessian", None, "the output loss's Hessian is indefinite "
                    f"(relative min eigenvalue {lo:.2g} on 16 training samples): the Hessian is "
                    "used, not Gauss-Newton")
        return decided("gauss_newton", out, "Gauss-Newton with the OutputLoss's own output "
            "Hessian" + (" (positive semi-definite on 16 training samples)" if out is not None
                else " (the softmax cross-entropy's)"))
    why = _not_cross_entropy(loss_fn, params, apply, x, y)
    if why is None:
        return decided("gauss_newton", None, "Gauss-Newton: loss_fn is the softmax "
            "cross-entropy of the logits (checked on 16 training samples)")
    if config.curvature == "auto" and not kfac_like:
        return decided("hessian", None, f"{why}: the Hessian is used, since Gauss-Newton needs "
            "the loss's output Hessian (write the loss as models.OutputLoss(apply, output_loss) "
            "to get it)")
    _refuse(f"curvature={config.curvature!r}, solver={config.solver!r}", why)
