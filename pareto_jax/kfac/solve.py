"""The solve with K-FAC / EK-FAC factors: (F̂ + (λ + δ)I)⁻¹ on flat vectors, layer by layer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from ..linsolve import SolveResult
from ..results import Status
from .factors import Factors
from .layers import Layer, kernel_from_matrix, kernel_matrix, matrix_kind


def _layer_matrix(v, layer: Layer, place):
    k0, kshape, b0 = place
    kernel = v[k0 : k0 + int(np.prod(kshape))].reshape(kshape)
    W = kernel_matrix(kernel, matrix_kind(layer, kshape))
    return jnp.concatenate([W, v[b0 : b0 + layer.out_features][None]], 0) if layer.has_bias else W


def _precondition(factors: Factors, v, damping, ekfac: bool):
    out = jnp.zeros_like(v)
    for layer, lf, place in zip(factors.layers, factors.factors, factors.layout):
        W = _layer_matrix(v, layer, place)
        lam = lf.lam_ekfac if ekfac else lf.lam_kfac
        if layer.kind == "embed":  # A diagonal: its eigenvectors are the identity
            Wn = ((W @ lf.QG) / (lam + damping)) @ lf.QG.T
        else:
            Wn = lf.QA @ ((lf.QA.T @ W @ lf.QG) / (lam + damping)) @ lf.QG.T
        k0, kshape, b0 = place
        kn = Wn[:-1] if layer.has_bias else Wn
        out = out.at[k0 : k0 + int(np.prod(kshape))].set(
            kernel_from_matrix(kn, kshape, matrix_kind(layer, kshape)).ravel()
        )
        if layer.has_bias:
            out = out.at[b0 : b0 + layer.out_features].set(Wn[-1])
    return out


@functools.partial(jax.jit, static_argnames=("layers", "layout", "ekfac"))
def _solve_all(factors_arrays, *, b, damping, layers, layout, ekfac):
    f = Factors(layers, factors_arrays, layout, b.shape[-1], 0.0)  # (`damping` holds λ + δ here)
    return jax.vmap(lambda v: _precondition(f, v, damping, ekfac))(b)


def apply_inverse(factors: Factors, b, *, damping, ekfac: bool = True) -> jax.Array:
    """(F̂ + (λ + δ)·I)⁻¹ b for the rows of b (K, P), λ the factors' weight decay and δ the
    `damping`: the bare array (see `solve_kfac`)."""
    b = jnp.asarray(b)
    if b.shape[-1] != factors.num_params:
        checks.fail("b", f"vectors of size {b.shape[-1]}",
            f"size {factors.num_params} (the flat params)",
            "compute the factors for the same model and parameters")
    return _solve_all(factors.factors, b=b,
        damping=jnp.asarray(factors.weight_decay + damping, b.dtype), layers=factors.layers,
        layout=factors.layout, ekfac=ekfac)


def solve_kfac(factors: Factors, b, *, damping: float, ekfac: bool = True) -> SolveResult:
    """(F̂ + (λ + δ)·I)⁻¹ b for flat vectors b (K, P), block-diagonal over layers: F̂ + λI
    approximates the objective's curvature G + λI (λ the factors' `weight_decay`), and
    `damping` δ is added on top, as for every solver.

    The result's residual is NaN (the factored system is solved exactly; `linsolve.with_residual`
    sets it against the true curvature), `converged` is False and the status APPROXIMATE:
    K-FAC/EK-FAC solve an approximation of the curvature, so no tolerance on the true system was
    met. `negative_curvature` is never set; a zero eigenvalue with no damping gives a non-finite
    solution, which `linsolve.solve_escalating` answers with more damping.
    """
    U = apply_inverse(factors, b, damping=damping, ekfac=ekfac)
    K = U.shape[0]
    return SolveResult(U, jnp.zeros(K, jnp.int32), jnp.full(K, jnp.nan, U.dtype),
        jnp.zeros(K, bool), jnp.zeros(K, bool), jnp.full(K, int(Status.APPROXIMATE), jnp.int32))


def preconditioner(factors: Factors, damping, *, ekfac: bool = True):
    """v -> (F̂ + (λ + δ)·I)⁻¹ v, for use as a CG preconditioner "
    "(`linsolve.solve_cg(precond=...)`)."""
    return lambda v: _precondition(factors, v, factors.weight_decay + damping, ekfac)
