"""Influence over chosen parameters (`Influence(select=...)`): gradients and curvature restricted
to the selected arrays, everything else held fixed; checked against dense float64 references
built here on the subspace (the held-fixed parameters closed over as constants), at a trained,
confident model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import subspace_P
from conftest import tiny_classification
from flax import nnx
from jax.flatten_util import ravel_pytree

from pareto_jax import InputError, influence, models, train
from pareto_jax.influence import Influence, InfluenceConfig

WD, DAMP = 1e-3, 1e-4


class NormMLP(nnx.Module):
    """Linear -> LayerNorm -> tanh -> Linear: a layer K-FAC cannot factor (LayerNorm's scale and
    bias sit outside any Linear)."""

    def __init__(self, d, k, rngs):
        self.inp = nnx.Linear(d, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, k, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.norm(self.inp(x))))


def _trained(model_fn, seed=0):
    x, y = tiny_classification(n=90, d=5, k=3, seed=seed)
    m = model_fn()
    apply, params = models.functional(m)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
    loss = models.per_sample_loss(apply)
    params = train.train(loss, params, x, y, train.TrainConfig(epochs=60, batch_size=30,
        learning_rate=0.03, weight_decay=WD)).params
    p = jax.nn.softmax(apply(params, jnp.asarray(x)))
    assert float(jnp.mean(jnp.max(p, -1))) > 0.85  # confident, far from uniform
    return m, apply, params, loss, x, y


def _subspace_reference(apply, params, keys, x, y, curvature):
    return subspace_P(apply, params, keys, x, y, 3, weight_decay=WD, damping=DAMP,
        curvature=curvature)[0]


@pytest.mark.parametrize("solver, curvature", [("cg", "gauss_newton"), ("dense", "hessian"),
    ("cg", "hessian")])
def test_selected_parameters_match_the_dense_solve_on_their_subspace(x64, solver, curvature):
    m, apply, params, loss, x, y = _trained(
        lambda: models.make_model("mlp", (5,), 3, hidden=(7,), seed=1))
    cfg = InfluenceConfig(solver=solver, curvature=curvature, damping=DAMP, rtol=1e-11,
        escalate_damping=False)
    res = influence.category_influence(loss, params, x, y, x, y, num_classes=3, weight_decay=WD,
        apply=apply, config=cfg, select="head")
    ref = _subspace_reference(apply, params, ["head"], x, y, curvature)
    np.testing.assert_allclose(res.P, ref, atol=1e-7 * np.abs(ref).max())
    assert "held fixed" in res.details["selection"]
    # and it is another question than the whole network's (not the unrestricted P relabelled)
    whole = influence.category_influence(loss, params, x, y, x, y, num_classes=3,
        weight_decay=WD, apply=apply, config=InfluenceConfig(damping=DAMP, rtol=1e-11))
    assert np.abs(whole.P - res.P).max() > 0.05 * np.abs(ref).max()
    # the same selection written as a function or a module type list gives the same P
    by_fn = influence.category_influence(loss, params, x, y, x, y, num_classes=3,
        weight_decay=WD, apply=apply, config=cfg, select=lambda path, a: path[0] == "head")
    np.testing.assert_allclose(by_fn.P, res.P, rtol=1e-9, atol=1e-14)


def test_kfac_holds_the_layers_it_cannot_factor_fixed_and_says_so(x64):
    """A LayerNorm network: K-FAC / EK-FAC used to refuse it; now they answer over the Linear
    layers with LayerNorm held fixed, and are measured against the exact Gauss-Newton solve on
    that subspace (closer to it than the trivial answer, the identity curvature)."""
    m, apply, params, loss, x, y = _trained(lambda: NormMLP(5, 3, nnx.Rngs(0)))
    ref, trivial = subspace_P(apply, params, ["inp", "head"], x, y, 3, weight_decay=WD,
        damping=DAMP)
    for solver in ("ekfac", "kfac"):
        res = influence.category_influence(loss, params, x, y, x, y, num_classes=3,
            weight_decay=WD, apply=apply, model=m,
            config=InfluenceConfig(solver=solver, damping=DAMP))
        assert "norm/scale" in res.details["selection"] and "held fixed" in res.details["selection"]
        for k in range(3):
            r_fac = np.corrcoef(res.P[:, k], ref[:, k])[0, 1]
            r_triv = np.corrcoef(trivial[:, k], ref[:, k])[0, 1]
            # (measured: EK-FAC 0.87-0.93, K-FAC 0.84-0.99, the identity 0.51-0.76)
            assert r_fac > 0.8 and r_fac > r_triv + 0.05, (solver, k, r_fac, r_triv)


def test_selection_errors_name_the_fix(x64):
    m, apply, params, loss, x, y = _trained(
        lambda: models.make_model("mlp", (5,), 3, hidden=(7,), seed=1))
    kw = dict(num_classes=3, weight_decay=WD, apply=apply, model=m)
    with pytest.raises(InputError, match="matching none"):
        influence.category_influence(loss, params, x, y, x, y, select="nothing", **kw)
    with pytest.raises(InputError, match="kernel and bias together"):
        influence.category_influence(loss, params, x, y, x, y, **kw,
            select=lambda path, a: path[-1] == "kernel", config=InfluenceConfig(solver="ekfac"))
    from pareto_jax import distributed

    with pytest.raises(InputError, match="mesh"):
        influence.category_influence(loss, params, x, y, x, y, select="head",
            mesh=distributed.make_mesh(1), **kw)


def test_a_saved_selection_is_loaded_with_it(x64, tmp_path):
    m, apply, params, loss, x, y = _trained(
        lambda: models.make_model("mlp", (5,), 3, hidden=(7,), seed=1))
    obj = train.Objective(loss, WD)
    fit = Influence(obj, params, x, y, num_classes=3, apply=apply, select="head",
        config=InfluenceConfig(damping=DAMP, rtol=1e-11))
    P = fit.influence(x, y).P
    back = Influence.load(fit.save(tmp_path / "s"), obj, params, x, y, apply=apply)
    np.testing.assert_allclose(back.influence(x, y).P, P, rtol=1e-9, atol=1e-14)


def test_lissa_on_a_selection_scales_by_the_selected_block(x64):
    """LiSSA's scale is the top eigenvalue of H_SS + (λ + δ)I (not the identity that the
    held-fixed coordinates see), checked against a dense eigendecomposition of the block."""
    m, apply, params, loss, x, y = _trained(
        lambda: models.make_model("mlp", (5,), 3, hidden=(7,), seed=1))
    cfg = InfluenceConfig(solver="lissa", curvature="hessian", damping=DAMP, max_steps=50)
    res = influence.category_influence(loss, params, x, y, x, y, num_classes=3, weight_decay=WD,
        apply=apply, config=cfg, select="head")
    flat, unravel = ravel_pytree({"head": params["head"]})

    def mean_loss(t):
        return jnp.mean(jax.vmap(lambda xi, yi: loss({**params, **unravel(t)}, xi, yi))(
            jnp.asarray(x), jnp.asarray(y)))

    top = float(np.linalg.eigvalsh(np.asarray(jax.hessian(mean_loss)(flat)))[-1]) + WD + DAMP
    assert res.details["lambda_max"] == pytest.approx(top, rel=0.05)


def test_a_module_type_selects_everything_inside_it(x64):
    """select=<a module type> takes every parameter inside those modules, sub-modules included:
    the whole network's type selects all of it (the unrestricted answer), LayerNorm its own."""
    m, apply, params, loss, x, y = _trained(lambda: NormMLP(5, 3, nnx.Rngs(0)))
    kw = dict(num_classes=3, weight_decay=WD, apply=apply, model=m,
        config=InfluenceConfig(damping=DAMP, rtol=1e-11))
    whole = influence.category_influence(loss, params, x, y, x, y, **kw)
    by_type = influence.category_influence(loss, params, x, y, x, y, select=NormMLP, **kw)
    assert "selection" not in by_type.details
    np.testing.assert_allclose(by_type.P, whole.P, rtol=1e-9, atol=1e-14)
    norm = influence.category_influence(loss, params, x, y, x, y, select=nnx.LayerNorm, **kw)
    assert "influence over 16 of" in norm.details["selection"]
