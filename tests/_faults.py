"""Planted faults: deliberate bugs the suite must catch (run by ``python -m tests.planted``).

Each entry is (what the fault does, the tests that must fail with it planted, the function that
plants it). A fault is planted in the test process (and in the worker subprocesses that the
distributed tests start) when ``PARETO_JAX_FAULT`` names it: ``tests/conftest.py`` and the
workers call `plant` before any test runs, so every compiled program is traced with the fault.

A fault replaces a function wherever the package holds it (`_swap` rebinds every module
attribute that is the original object, so ``from .x import f`` copies are replaced too).
"""

from __future__ import annotations

import functools
import os
import sys


def _swap(module, name: str, make):
    """Replace `module.name` by make(original) in every pareto_jax module that holds it."""
    orig = getattr(module, name)
    new = make(orig)
    setattr(module, name, new)  # a class attribute (a method) is only held there
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("pareto_jax") and mod is not None:
            for attr, value in list(vars(mod).items()):
                if value is orig:
                    setattr(mod, attr, new)
    return new


def _wrap_result(module, name, post):
    def make(orig):
        @functools.wraps(orig)
        def f(*a, **k):
            return post(orig(*a, **k), *a, **k)

        return f

    _swap(module, name, make)


def _wrap_args(module, name, pre):
    def make(orig):
        @functools.wraps(orig)
        def f(*a, **k):
            a, k = pre(a, k)
            return orig(*a, **k)

        return f

    _swap(module, name, make)


# ----------------------------------------------------------------------------- influence


def _influence_sign():
    from pareto_jax import backend, closed_form

    _wrap_result(backend.Local, "influence_rows", lambda r, *a, **k: -r)
    _wrap_result(closed_form, "linear_influence",
        lambda r, *a, **k: (-r[0], r[1]) if isinstance(r, tuple) else -r)


def _one_over_n_dropped():
    from pareto_jax import backend

    _wrap_result(backend.Local, "influence_rows", lambda r, self, f, m, th, U, ch, n: r * n)


def _damping_ignored():
    from pareto_jax import linsolve

    def pre(a, k):
        return a, {**k, "damping": 0.0 * k.get("damping", 0.0)}

    for name in ("solve_cg", "solve_cg_stepped", "solve_dense"):
        _wrap_args(linsolve, name, pre)


def _gauss_newton_diagonal_output_hessian():
    import jax

    from pareto_jax import kernels

    def make(orig):
        def chunk_product(curv, theta, xb, yb, mb, v):
            if curv.kind == "hessian":
                return orig(curv, theta, xb, yb, mb, v)
            fb = lambda th: jax.vmap(curv.logits, (None, 0))(th, xb)  # noqa: E731
            logits, jv = jax.jvp(fb, (theta,), (v,))
            p = jax.nn.softmax(logits, -1)
            _, vjp = jax.vjp(fb, theta)
            return vjp(p * jv * mb[:, None])[0]  # diag(p) only: the −ppᵀ term dropped

        return chunk_product

    _swap(kernels, "chunk_product", make)


def _jvp_wrong_class():
    import jax.numpy as jnp

    from pareto_jax import kernels

    def pre(a, k):
        f, theta, U, xb, yb = a
        return (f, theta, jnp.roll(U, 1, axis=0), xb, yb), k

    _wrap_args(kernels, "jvp_chunk", pre)


def _class_gradient_wrong_class():
    from pareto_jax import kernels

    def pre(a, k):
        f, theta, xb, yb, mb, counts, K, *rest = a
        return (f, theta, xb, (yb + 1) % K, mb, counts, K, *rest), k

    _wrap_args(kernels, "class_gradient_chunk", pre)


def _cg_one_step():
    import jax.numpy as jnp

    from pareto_jax import linsolve

    orig = linsolve.cg_direction

    def cg_direction(c, ok, z, tol):
        c = orig(c, ok, z, tol)
        return c._replace(active=jnp.zeros_like(c.active))

    _swap(linsolve, "cg_direction", lambda o: cg_direction)
    import jax

    linsolve._cg_direction = jax.jit(cg_direction)


def _ekfac_correction_skipped():
    from pareto_jax.kfac import factors

    def make(orig):
        import jax

        @functools.partial(jax.jit, static_argnames=("keep",))
        def _corrected(C, vjp, p, c, mb, rot_in, QGs, keep):
            return C  # the eigenvalue correction never accumulates: K-FAC's eigenvalues stay

        return _corrected

    _swap(factors, "_corrected", make)


def _kfac_old_pseudo_gradient():
    import jax
    import jax.numpy as jnp

    from pareto_jax import kfac

    def make(orig):
        def output_root(logits, y, output_loss=None):  # the formula before the fix: entry i of
            if output_loss is not None:  # column c weighted by √p_i, not √p_c
                return orig(logits, y, output_loss)
            p = jax.nn.softmax(logits, -1)
            eye = jnp.eye(p.shape[1], dtype=p.dtype)
            return jnp.sqrt(p)[:, :, None] * (p[:, :, None] - eye[None])

        return output_root

    _swap(kfac, "output_root", make)


def _closed_form_weight_decay_ignored():
    from pareto_jax import closed_form

    def pre(a, k):
        return a, {**k, "weight_decay": 0.0}

    _wrap_args(closed_form, "linear_influence", pre)


def _cross_entropy_check_removed():
    from pareto_jax.influence import curvature

    _swap(curvature, "cross_entropy_mismatch", lambda o: lambda *a, **k: 0.0)


def _output_hessian_ignored():
    from pareto_jax.influence import curvature

    _wrap_args(curvature, "build", lambda a, k: (a[:4], {}))  # Gauss-Newton back to CE's H_out


def _adapter_not_in_eval_mode():
    from pareto_jax import models

    def make(orig):
        def module(self, params):
            import jax
            from flax import nnx

            state = jax.tree_util.tree_unflatten(self.treedef, jax.tree_util.tree_leaves(params))
            return nnx.merge(self.graphdef, state, self.rest)  # dropout on, batch statistics live

        return module

    _swap(models._Split, "module", make)


def _groups_ignored():
    from pareto_jax.influence import validation

    _wrap_args(validation, "groups", lambda a, k: ((None,) + tuple(a[1:]), k))


def _missing_psum():
    from pareto_jax import kernels

    def pre(a, k):
        return a[:2], {**k}  # curvature_matvec(curv, data, axis_name) with axis_name dropped

    _wrap_args(kernels, "curvature_matvec", pre)


# ----------------------------------------------------------------------------- program


def _zero_duals():
    from pareto_jax.pareto import dual

    def post(r, *a, **k):
        z, w, its, err = r
        return z * 0.0, w, its, err

    _wrap_result(dual, "dual_solve", post)


def _reduced_cost_sign():
    from pareto_jax.pareto import exact

    def pre(a, k):
        w, r, eta, lo, hi, tol = a
        return (w, -r, eta, lo, hi, tol), k

    _wrap_args(exact, "_certified", pre)


def _certificate_skipped():
    import jax.numpy as jnp

    from pareto_jax.pareto import exact

    _swap(
        exact, "_certified", lambda o: lambda w, r, eta, lo, hi, tol: jnp.ones(jnp.shape(w), bool)
    )


def _float64_recheck_skipped():
    from pareto_jax.pareto import program

    _swap(program, "check_feasibility", lambda o: lambda P, w, b, config: 0.0)


def _qp_gap_skipped():
    import jax.numpy as jnp

    from pareto_jax.pareto import exact

    def post(r, *a, **k):
        status, gap, obj = r
        return jnp.zeros_like(status), gap, obj

    _wrap_result(exact, "qp_certificate", post)


def _simplex_dual_sign():
    from pareto_jax.pareto import simplex

    def post(r, *a, **k):
        return r._replace(y=-r.y)

    _wrap_result(simplex, "dual_simplex", post)


def _ceiling_direction_flipped():
    import dataclasses

    from pareto_jax.pareto import ceiling

    def post(r, *a, **k):
        return dataclasses.replace(r, direction=-r.direction)

    _wrap_result(ceiling, "ceiling_test", post)


def _selection_drops_ties():
    import jax
    import jax.numpy as jnp

    from pareto_jax.pareto import select

    def make(orig):
        def smallest(
            key, k, *, cap=None
        ):  # ties at the k-th key never taken: the first keys below it, padded
            idx = orig(key, k, cap=cap)
            kth = key[idx[-1]]
            below = jnp.nonzero(key < kth, size=k, fill_value=0)[0]
            return (
                jax.lax.sort_key_val(key[below], below)[1]
                if key.shape[0] > 4 * select.default_cap(k)
                else idx
            )

        return smallest

    _swap(select, "smallest", make)


def _gram_complement_not_subtracted():
    from pareto_jax.pareto import dual

    def make(orig):
        def weighted_gram(P, on, scale, live, cap, G=None, Q=None):
            import jax.numpy as jnp

            n_off = jnp.sum(live & ~on)
            full = orig(P, on, scale, live, cap, G, Q)
            return (
                full
                if G is None
                else jnp.where((jnp.sum(on & live) > cap) & (n_off <= cap), scale * G, full)
            )

        return weighted_gram

    _swap(dual, "weighted_gram", make)


def _pair_products_wrong():
    from pareto_jax.pareto import dual

    def make(orig):
        def pair_products(P):  # p_ik p_ik instead of p_ik p_ij: the diagonal's pattern everywhere
            import numpy as np

            iu, _ = np.triu_indices(P.shape[1])
            return P[:, iu] * P[:, iu]

        return pair_products

    _swap(dual, "pair_products", make)


def _batch_rows_share_one_rho():
    import dataclasses

    from pareto_jax.pareto import program

    def post(batch, *a, **k):  # every row gets the first row's bounds
        return dataclasses.replace(
            batch, lo=batch.lo * 0 + batch.lo[0], hi=batch.hi * 0 + batch.hi[0]
        )

    _wrap_result(program, "prepare", post)


def _kfac_weight_decay_twice():
    from pareto_jax import kfac

    def pre(a, k):  # the old meaning of damping (λ + δ) with the factors' λ added again
        return a, {**k, "damping": k["damping"] + a[0].weight_decay}

    _wrap_args(kfac, "apply_inverse", pre)


def _unroll_reshuffled():
    from pareto_jax.influence import unroll

    def make(orig):
        def _fns(r, n):  # the retraining's batches drawn in another epoch's order
            fns = orig(r, n)
            return fns._replace(plan=lambda w, mask, e: fns.plan(w, mask, e + 1))

        return _fns

    _swap(unroll, "_fns", make)


def _unroll_fresh_optimizer():
    import dataclasses

    from pareto_jax import train
    from pareto_jax.influence import unroll

    def pre(
        a, k
    ):  # the retraining differentiated from a fresh optimizer state, not the checkpoint's
        r = a[0]
        fresh = train.make_optimizer(r.config).init(r.state.params)
        return (dataclasses.replace(r, state=r.state._replace(opt_state=fresh)), *a[1:]), k

    _wrap_args(unroll, "unrolled_influence", pre)


def _unroll_normaliser_held_fixed():
    import jax

    from pareto_jax.influence import unroll

    def make(orig):
        def _fns(r, n):  # the Σw normaliser treated as a constant of w
            fns = orig(r, n)

            def plan(w, mask, e):
                idx, slot, scale = fns.plan(w, mask, e)
                return idx, slot, jax.lax.stop_gradient(scale)

            return fns._replace(plan=plan)

        return _fns

    _swap(unroll, "_fns", make)


def _padding_rows_as_program_rows():
    from pareto_jax.pareto import exact

    def pre(a, k):  # the zero rows that pad N to a bucket treated as weights of the program
        return a, {**k, "n_valid": None}

    _wrap_args(exact, "solve_program", pre)


def _data_fingerprint_by_path():
    from pareto_jax import io, pipeline

    def make(orig):
        def make_job(config, out):  # the run keyed to the data's path, not its content
            job = orig(config, out)
            return job._replace(data_fp=io.fingerprint(config.data))

        return make_job

    _swap(pipeline, "make_job", make)


def _artifacts_unchecked():
    from pareto_jax import io, runs

    def make(orig):
        def done(self, name, fp):  # the marker's fingerprint trusted, its artifacts never checked
            m = self.root / name / "stage.json"
            ok = m.exists() and io.read_json(m).get("fingerprint") == fp
            if ok:
                self.skipped.append(name)
            return ok

        return done

    _swap(runs.Stages, "done", make)


def _nan_check_removed():
    import numpy as np

    from pareto_jax import checks

    def as_influence_matrix(P, name="P"):
        arr = np.asarray(P, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            checks.fail(name, f"shape {arr.shape}", "2-D", "")
        return arr

    _swap(checks, "as_influence_matrix", lambda o: as_influence_matrix)


# --------------------------------------------------------------------------- training, search, data


def _epoch_ignores_weights():
    import jax.numpy as jnp

    from pareto_jax import train

    def make(orig):
        def epoch_fns(*a, **k):
            fns = orig(*a, **k)

            def step(params, opt_state, x, y, w, mask, ib, sb, scale):
                return fns.step(params, opt_state, x, y, jnp.ones_like(w), mask, ib, sb, scale)

            def body(params, opt_state, x, y, w, mask, epoch_index):
                return fns.body(params, opt_state, x, y, jnp.ones_like(w), mask, epoch_index)

            return fns._replace(step=step, body=body)

        return epoch_fns

    _swap(train, "epoch_fns", make)


def _normaliser_n():
    import dataclasses

    from pareto_jax import train

    def pre(a, k):  # every weighted epoch built as if normalizer="n": Σ w ℓ / N, not Σ w ℓ / Σ w
        loss_fn, config, *rest = a
        return (loss_fn, dataclasses.replace(config, normalizer="n"), *rest), k

    _wrap_args(train, "epoch_fns", pre)


def _fitness_ignores_failed_target():
    import numpy as np

    from pareto_jax import evaluation

    def fitness(delta, targets):
        delta = np.asarray(delta)
        t = np.zeros(delta.shape[-1], bool)
        t[list(targets)] = True
        others = delta[~t]
        return (float(np.mean(np.minimum(others, 0.0))) if others.size else 0.0), float(
            np.mean(delta[t])
        )

    _swap(evaluation, "fitness", lambda o: fitness)


def _crossover_returns_parent():
    from pareto_jax import search

    _swap(search, "crossover", lambda o: lambda a, b, rng, rate: a.copy())


def _checkpoint_ignored():
    from pareto_jax import search

    def pre(a, k):
        config, K, rng, pop, checkpoint = a
        return (config, K, rng, pop, None), k

    _wrap_args(search, "_start", pre)


def _split_drops_a_validation_class():
    import numpy as np

    from pareto_jax import data

    def post(parts, y, fractions, seed):
        y = np.asarray(y)
        last = np.max(y)
        parts[1] = parts[1][y[parts[1]] != last]
        return parts

    _wrap_result(data, "stratified_indices", post)


# ---------------------------------------------------------------------------- the improvement study


def _mcnemar_unpaired():
    import numpy as np
    import scipy.stats

    from pareto_jax import study

    def unpaired(m, r):  # compares the two accuracies, not the discordant pairs
        b, c = int(np.sum(m)), int(np.sum(r))
        return {"gained": b, "lost": c, "net": b - c,
            "p": float(scipy.stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0}

    _swap(study, "mcnemar", lambda o: unpaired)


def _interval_uses_normal():
    import numpy as np

    from pareto_jax import study

    def normal(values, level=0.95):
        v = np.asarray(values, np.float64)
        hw = 1.96 * v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
        return {"mean": float(v.mean()), "half_width": float(hw), "n": int(v.size)}

    _swap(study, "interval", lambda o: normal)


def _study_reference_is_the_search():
    from pareto_jax import study

    study.REFERENCE_ROW = study.SEARCH_ROW  # every method tested against the search itself


def _damping_raised_silently():
    from pareto_jax import linsolve
    from pareto_jax.influence import solvers

    def make(orig):
        def f(solver, state, G, damping, config):  # the behaviour before issue 32
            res, used, esc = linsolve.solve_escalating(
                lambda d: solver.solve(state, G, d), damping, escalate=True, tries=7)
            return res, used, esc

        return f

    _swap(solvers, "solve_damped", make)


def _curvature_depends_on_wrapping():
    from pareto_jax.influence import validation

    _swap(validation, "apply_of_model", lambda orig: lambda model, params: None)


def _logit_width_unchecked():
    from pareto_jax.influence import validation

    _swap(validation, "logit_width", lambda orig: lambda *a, **k: None)


def _selection_gradients_unrestricted():
    from pareto_jax.influence import selection

    _swap(selection, "restrict_gradients", lambda orig: lambda G, mask: G)


def _adam_without_eps_root():
    import optax

    from pareto_jax import train

    def make(orig):
        def make_optimizer(config):
            if config.optimizer == "adam":
                return optax.adam(config.learning_rate)  # √ν: infinite derivative at ν = 0
            return orig(config)

        return make_optimizer

    _swap(train, "make_optimizer", make)


def _float64_recompute_in_float32():
    from pareto_jax.influence import unroll

    _swap(unroll, "_in_float64", lambda orig: (lambda state: state))


def _embedding_pairs_dropped():
    import jax

    from pareto_jax.kfac import factors

    def moment(ids, dr, vocab):  # as if no sample repeated a token
        return jax.ops.segment_sum((dr * dr).reshape(-1, dr.shape[-1]), ids.ravel(), vocab)

    _swap(factors, "_embedding_moment", lambda orig: moment)


def _general_axes_not_moved():
    import jax.numpy as jnp

    from pareto_jax.kfac import layers

    def inputs(orig):
        def f(layer, a):
            if layer.kind != "general":
                return orig(layer, a)
            at = a.reshape(a.shape[0], -1, layer.in_features)  # contracted axes left in place
            if layer.has_bias:
                at = jnp.concatenate([at, jnp.ones((*at.shape[:2], 1), at.dtype)], -1)
            return at

        return f

    _swap(layers, "inputs", inputs)


def _yardstick_baselines_unweighted():
    from pareto_jax import yardstick

    _wrap_args(yardstick, "_retrained", lambda a, k: (a[:2], {}))  # the baselines' weights dropped


def _kfac_output_loss_ignored():
    from pareto_jax.kfac import factors

    _swap(factors, "output_root", lambda o: lambda logits, y, output_loss=None: o(logits, y))


def _sampled_fisher_argmax():
    import jax

    from pareto_jax.kfac import factors

    def root(logits, key):  # the most likely label every time: no draw at all
        p = jax.nn.softmax(logits, -1)
        return (p - jax.nn.one_hot(logits.argmax(-1), p.shape[-1], dtype=p.dtype))[:, :, None]

    _swap(factors, "sampled_root", lambda orig: root)


def _auto_damping_from_kfac_eigenvalues():
    import numpy as np

    from pareto_jax.influence import selection

    def damping(factors):  # tr(A)·tr(S) per layer: not the Gauss-Newton block's trace
        size = sum(int(np.size(f.lam_kfac)) for f in factors.factors)
        trace = sum(float(np.sum(f.lam_kfac)) for f in factors.factors)
        return max(1e-4 * (trace / size + factors.weight_decay), 1e-8)

    _swap(selection, "damping_from_factors", lambda orig: damping)


FAULTS: dict[str, tuple[str, list[str], object]] = {
    "influence_sign": ("P negated (beneficial reported as harmful)",
        ["tests/test_influence.py::test_sign_and_scale_identity_against_retraining"],
        _influence_sign),
    "one_over_n_dropped": ("P not divided by N",
        ["tests/test_influence.py::test_generic_paths_agree_with_closed_form_on_digits"],
        _one_over_n_dropped),
    "damping_ignored": ("CG / dense solves drop the damping δ",
        ["tests/test_influence.py::test_cg_matches_dense_solve"], _damping_ignored),
    "damping_raised_silently": (
        "a damping the user set is raised on negative curvature, without a warning",
        ["tests/test_defaults.py::test_a_damping_you_set_is_refused_with_the_most_negative_curvature",
            "tests/test_defaults.py::test_escalation_is_warned_and_refused_when_not_allowed"],
        _damping_raised_silently),
    "curvature_depends_on_wrapping": (
        "a plain loss_fn with model= gets the Hessian (the logits not reached through the model)",
        ["tests/test_defaults.py::test_the_curvature_does_not_depend_on_how_the_loss_was_written"],
        _curvature_depends_on_wrapping),
    "num_classes_unchecked": ("num_classes not checked against the model's logits",
        ["tests/test_defaults.py::test_num_classes_must_match_the_logits"],
        _logit_width_unchecked),
    "selection_gradients_unrestricted": (
        "with a selection, the class gradients keep the held-fixed parameters' components",
        ["tests/test_selection.py::test_selected_parameters_match_the_dense_solve_on_their_subspace"],
        _selection_gradients_unrestricted),
    "adam_without_eps_root": (
        "Adam's square root without its inner ε (the unrolled influence NaN at a still parameter)",
        ["tests/test_unroll.py::test_unroll_through_adam_with_a_parameter_that_never_moves"],
        _adam_without_eps_root),
    "float64_recompute_in_float32": (
        "the unrolled estimator's float64 recompute keeps the state in float32",
        ["tests/test_unroll.py::test_unroll_recomputes_in_float64_when_float32_overflows"],
        _float64_recompute_in_float32),
    "embedding_pairs_dropped": (
        "EK-FAC's embedding moment ignores a sample's repeated tokens",
        ["tests/test_kfac_layers.py::test_an_embedding_is_factored_as_a_linear_on_one_hot_tokens"],
        _embedding_pairs_dropped),
    "general_axes_not_moved": (
        "a LinearGeneral's input reshaped without moving its contracted axes last",
        ["tests/test_kfac_layers.py::test_linear_general_is_factored_as_the_linear_it_reshapes"],
        _general_axes_not_moved),
    "sampled_fisher_argmax": (
        "the sampled Fisher takes the most likely label instead of drawing one",
        ["tests/test_kfac_layers.py::test_the_sampled_output_factor_is_unbiased_for_the_output_"
            "hessian"],
        _sampled_fisher_argmax),
    "yardstick_baselines_unweighted": (
        "the main job's yardstick retrains its baselines without their weights",
        ["tests/test_yardstick.py::test_each_baseline_is_retrained_at_its_step_and_reported_on_"
            "test"],
        _yardstick_baselines_unweighted),
    "kfac_output_loss_ignored": (
        "K-FAC / EK-FAC's output factor from the cross-entropy whatever the OutputLoss",
        ["tests/test_kfac_layers.py::test_ekfac_moments_of_every_transformer_layer_equal_the_per_"
            "sample_gradients", "tests/test_kfac_layers.py::test_transformer_ekfac_with_another_"
            "output_loss"],
        _kfac_output_loss_ignored),
    "auto_damping_from_kfac_eigenvalues": (
        "K-FAC / EK-FAC's auto damping from K-FAC's eigenvalues instead of the exact trace",
        ["tests/test_kfac_layers.py::test_auto_damping_is_read_exactly_off_the_factors"],
        _auto_damping_from_kfac_eigenvalues),
    "gauss_newton_diagonal": ("Gauss-Newton output Hessian diag(p) instead of diag(p) − ppᵀ",
        ["tests/test_influence.py::test_gauss_newton_matches_explicit_jacobian_product"],
        _gauss_newton_diagonal_output_hessian),
    "jvp_wrong_class": ("forward-mode P stage pairs class k with class k−1's solution",
        ["tests/test_reliability.py::test_property_forward_mode_equals_per_sample"],
        _jvp_wrong_class),
    "class_gradient_wrong_class": ("class gradients averaged over the next class's samples",
        ["tests/test_influence.py::test_class_gradients_match_python_loop"],
        _class_gradient_wrong_class),
    "cg_one_step": ("CG stops after its first step",
        ["tests/test_influence.py::test_cg_matches_dense_solve"], _cg_one_step),
    "ekfac_correction_skipped": (
        "EK-FAC eigenvalue correction never accumulated",
        [
            "tests/test_estimators.py::test_ekfac_eigenvalues_are_the_gauss_newton_diagonal_in_the_kronecker_basis"
        ],
        _ekfac_correction_skipped,
    ),
    "kfac_old_pseudo_gradient": ("K-FAC pseudo-gradients weighted by √p_j (the bug of issue 18)",
        ["tests/test_estimators.py::test_kfac_and_ekfac_are_exact_where_the_kronecker_product_is"],
        _kfac_old_pseudo_gradient),
    "closed_form_weight_decay_ignored": (
        "closed-form linear influence drops λ",
        [
            "tests/test_influence.py::test_weighted_closed_form_matches_dense_reference_and_retraining"
        ],
        _closed_form_weight_decay_ignored,
    ),
    "cross_entropy_check_removed": (
        "Gauss-Newton with cross-entropy's output Hessian for any loss (issue 17)",
        ["tests/test_influence.py::test_gauss_newton_is_never_applied_to_another_loss"],
        _cross_entropy_check_removed),
    "output_hessian_ignored": ("Gauss-Newton uses cross-entropy's output Hessian for an OutputLoss",
        ["tests/test_own_models.py::test_a_scaled_loss_is_not_given_cross_entropy_curvature"],
        _output_hessian_ignored),
    "adapter_not_in_eval_mode": (
        "the nnx adapter runs the module in train mode (dropout on, live batch statistics)",
        ["tests/test_own_models.py::test_nnx_adapter_holds_batch_statistics_and_rng_state_fixed"],
        _adapter_not_in_eval_mode),
    "groups_ignored": ("groups= is ignored (P by class instead)",
        ["tests/test_own_models.py::test_groups_and_a_measurement_match_the_dense_reference"],
        _groups_ignored),
    "missing_psum": ("sharded curvature product not summed over devices",
        ["tests/test_distributed.py::test_influence_stages_match_single_device"], _missing_psum),
    "zero_duals": ("the dual stage returns zeros",
        ["tests/test_pareto.py::test_device_solver_matches_highs"], _zero_duals),
    "reduced_cost_sign": ("the optimality certificate reads the reduced cost with the wrong sign",
        ["tests/test_pareto.py::test_device_solver_matches_highs"], _reduced_cost_sign),
    "certificate_skipped": ("the exact finish accepts its restricted LP without the certificate",
        ["tests/test_pareto.py::test_exact_finish_recovers_from_bad_duals"], _certificate_skipped),
    "float64_recheck_skipped": ("the float64 feasibility re-check always passes",
        ["tests/test_pareto.py::test_a_wrong_device_answer_is_caught_by_the_float64_recheck"],
        _float64_recheck_skipped),
    "qp_gap_skipped": ("the QP's duality-gap certificate always passes",
        ["tests/test_pareto.py::test_qp_certificate_refuses_inexact_duals"], _qp_gap_skipped),
    "simplex_dual_sign": (
        "the bounded dual simplex returns its row duals negated",
        ["tests/test_pareto.py::test_ceiling_device_matches_highs",
            "tests/test_pareto.py::test_device_solver_matches_highs"],
        _simplex_dual_sign,
    ),
    "ceiling_direction_flipped": ("the ceiling test returns −d",
        ["tests/test_pareto.py::test_ceiling_improvable_cases"], _ceiling_direction_flipped),
    "selection_drops_ties": ("the k-smallest selection drops the ties at the k-th key",
        ["tests/test_pareto.py::test_smallest_equals_top_k"], _selection_drops_ties),
    "gram_complement_not_subtracted": (
        "the dual Hessian's Gram-minus-others branch forgets the others",
        ["tests/test_pareto.py::test_weighted_gram_takes_a_gathered_branch_only_when_it_is_exact"],
        _gram_complement_not_subtracted),
    "pair_products_wrong": (
        "the vmapped dual Hessian's row pair products pair each entry with itself",
        ["tests/test_pareto.py::test_weighted_gram_takes_a_gathered_branch_only_when_it_is_exact"],
        _pair_products_wrong),
    "batch_rows_share_one_rho": (
        "a prepared batch of programs gives every row the first row's trust region",
        [
            "tests/test_pareto.py::test_one_batch_with_a_trust_region_per_row_equals_each_row_by_highs"
        ],
        _batch_rows_share_one_rho,
    ),
    "kfac_weight_decay_twice": (
        "K-FAC adds the objective's λ twice (damping read as λ + δ on top of the factors' λ)",
        ["tests/test_estimators.py::test_kfac_and_ekfac_are_exact_where_the_kronecker_product_is"],
        _kfac_weight_decay_twice),
    "unroll_reshuffled": ("the unrolled retraining draws its batches in another epoch's order",
        ["tests/test_unroll.py::test_unroll_equals_finite_differences_of_the_actual_retraining"],
        _unroll_reshuffled),
    "unroll_fresh_optimizer": ("the unrolled retraining starts from a fresh optimizer state",
        ["tests/test_unroll.py::test_unroll_equals_finite_differences_of_the_actual_retraining"],
        _unroll_fresh_optimizer),
    "unroll_normaliser_held_fixed": (
        "the unrolled retraining's Σw normaliser is not differentiated",
        ["tests/test_unroll.py::test_unroll_equals_finite_differences_of_the_actual_retraining"],
        _unroll_normaliser_held_fixed),
    "padding_rows_as_program_rows": (
        "the rows that pad N to a bucket count as weights (in the box, the budget)",
        ["tests/test_pareto.py::test_property_weights_below_and_above_one_at_any_n"],
        _padding_rows_as_program_rows),
    "data_fingerprint_by_path": ("a run's stages keyed to the data file's path, not its content",
        ["tests/test_run_folders.py::test_new_data_under_the_same_name_is_a_new_run"],
        _data_fingerprint_by_path),
    "artifacts_unchecked": ("a finished stage's artifacts reused without checking their hashes",
        ["tests/test_run_folders.py::test_a_damaged_artifact_is_recomputed_never_used"],
        _artifacts_unchecked),
    "nan_check_removed": ("NaN in P accepted", ["tests/test_pareto.py::test_nan_in_P_is_rejected"],
        _nan_check_removed),
    "epoch_ignores_weights": ("the weighted epoch trains with w = 1",
        ["tests/test_train.py::test_zero_weight_equals_training_without_the_samples"],
        _epoch_ignores_weights),
    "normaliser_n": ("the weighted epoch divides by N instead of Σw",
        ["tests/test_train.py::test_minibatch_weighted_training_matches_duplicated_data"],
        _normaliser_n),
    "fitness_ignores_failed_target": ("fitness finite although a target got worse",
        ["tests/test_search.py::test_fitness_definition"], _fitness_ignores_failed_target),
    "crossover_returns_parent": ("crossover returns its first parent",
        ["tests/test_search.py::test_crossover_mixes_both_parents"], _crossover_returns_parent),
    "checkpoint_ignored": ("the search starts over instead of resuming from its checkpoint",
        ["tests/test_search.py::test_search_resumes_from_its_checkpoint"], _checkpoint_ignored),
    "mcnemar_unpaired": ("the study's McNemar test counts correct answers, not discordant pairs",
        ["tests/test_study.py::test_mcnemar_matches_enumeration"], _mcnemar_unpaired),
    "interval_uses_normal": ("the study's intervals use 1.96 instead of the t quantile",
        ["tests/test_study.py::test_interval_is_the_t_interval"], _interval_uses_normal),
    "study_reference_is_the_search": (
        "the study's paired tests compare with the search, not the extra epoch",
        ["tests/test_study.py::test_summary_equals_hand_computation"],
        _study_reference_is_the_search),
    "split_drops_a_validation_class": ("the split leaves a class out of validation",
        ["tests/test_data.py::test_stratified_split_is_stratified_and_reproducible"],
        _split_drops_a_validation_class),
}


def plant(name: str | None = None) -> None:
    """Plant the fault named by `name` (default: $PARETO_JAX_FAULT; nothing if unset)."""
    name = name or os.environ.get("PARETO_JAX_FAULT")
    if not name:
        return
    if name not in FAULTS:
        raise KeyError(f"unknown fault {name!r}; known: {sorted(FAULTS)}")
    import importlib
    import pkgutil

    # every submodule imported (the package loads them lazily), so `_swap` sees all copies
    import pareto_jax

    for m in pkgutil.walk_packages(pareto_jax.__path__, "pareto_jax."):
        importlib.import_module(m.name)
    FAULTS[name][2]()
