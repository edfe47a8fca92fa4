"""The influence front door: `Influence` (fit once on the training side) and `category_influence`.

Fitting validates the training set once, decides the curvature (`curvature.resolve`), places the
training chunks on a backend (`backend.Local` for one device, `sharded.Sharded` for a mesh),
resolves the damping and initialises the solver object (`solvers`: K-FAC's factors are made
here). Each `Influence.influence` call then validates its validation set, computes the K class
gradients, solves (escalating the damping only where allowed, every escalation reported), and
forms P's rows. `category_influence` is one fit and one query with the same single validation
pass.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks, io, kernels, kfac, linsolve, train
from ..config import InfluenceConfig
from . import curvature, selection, solvers, validation
from .result import InfluenceResult
from .stages import backend_for, choose_method, on_pairs


class Influence:
    """The training side of influence, fitted once; `influence` then answers for any
    validation set, any grouping of it and any measurement.

    Fitting validates the training set, decides the curvature (`InfluenceConfig.curvature`),
    places the training chunks, resolves the damping and, for K-FAC / EK-FAC, computes the
    factors. Each `influence` call costs one pass over its validation set, K solves and one
    pass over the training set for P's rows.

    Args:
        loss_fn: the training objective, a `train.Objective` (its loss, weight decay λ and
            normaliser), or a per-sample ``loss_fn(params, x, y)`` (x unbatched; any pytree of
            arrays) with `weight_decay`. A `models.OutputLoss` (``output_loss(apply(params, x),
            y)``) gives an exact Gauss-Newton for any output loss.
        params: trained parameters (any pytree).
        x_train, y_train: the training set the model was trained on: inputs (N, ...) (an array,
            or a pytree of arrays with a shared leading axis; integer token IDs stay integers)
            and integer labels (N,). Or, to stream a training set that does not fit in memory:
            ``x_train`` a function returning a fresh iterator of (x_batch, y_batch) on every
            call, and ``y_train=None``; each pass puts one chunk on the device at a time and P's
            rows are written to the host as they are computed (CG, K-FAC or EK-FAC on one
            device).
        num_classes: K.
        weight_decay: λ used in training (part of the curvature); None when `loss_fn` is a
            `train.Objective`, which carries it.
        config, apply, model, mesh: as for `category_influence`.
        class_names: names of the K classes (carried into results).
        sample_ids: (N,) ids of the training samples (carried into results; default 0..N-1).
        select: the parameters the influence is over, the others held fixed (gradients and
            curvature restricted to them; `pareto_jax.influence.selection`): a path prefix
            ("head", "blocks/0/mlp") or a list of them, an nnx module type or a tuple of types
            (with `model=`), or ``select(path, array) -> bool``. None: every parameter, or for
            K-FAC / EK-FAC every layer they can factor (`kfac.FACTORED_TYPES`, each called once
            per forward pass; stated in the result's ``details["selection"]`` when that leaves
            parameters out). One device only.

    Example:
        >>> import numpy as np
        >>> from pareto_jax import data, influence, models, train
        >>> s = data.stratified_split(data.make_disks("separable", n_per_class=40), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (2,), 2))
        >>> obj = train.Objective(models.per_sample_loss(apply), weight_decay=1e-2)
        >>> params = train.train(obj.loss_fn, params, s.train.x, s.train.y).params
        >>> fit = influence.Influence(obj, params, s.train.x, s.train.y, num_classes=2)
        >>> fit.influence(s.val.x, s.val.y).P.shape              # one fit, then any query
        (48, 2)
        >>> halves = (np.arange(len(s.val)) % 2).astype(int)    # e.g. two domains
        >>> fit.influence(s.val.x, s.val.y, groups=halves, group_names=("a", "b")).names
        ('a', 'b')
    """

    def __init__(self, loss_fn, params, x_train, y_train, *, num_classes: int,
        weight_decay: float | None = None, config: InfluenceConfig = InfluenceConfig(), apply=None,
        model=None, mesh=None, class_names=None, sample_ids=None, progress: bool = False,
        select=None, _checked=None, _saved=None):
        objective = train.as_objective(loss_fn, weight_decay)
        loss_fn = objective.loss_fn
        validation.check_request(config, num_classes, mesh)
        checks.check_not_traced((params, None if validation.is_source(x_train) else x_train),
            "params", "influence.influence_matrix (pure JAX: jit, vmap and grad work)")
        if validation.is_source(x_train):
            xt, (x_ex, y_ex) = validation.source(x_train, y_train, num_classes)
            yt, n = None, xt.n
            streamable = config.factored or config.solver == InfluenceConfig.solver  # (CG)
            if not streamable or mesh is not None:
                checks.fail(
                    "config",
                    f"solver={config.solver!r}, mesh={'set' if mesh is not None else None}",
                    "solver='cg', 'kfac' or 'ekfac' on one device for a batch source",
                    "use InfluenceConfig(solver='ekfac' or 'cg') without a mesh, or pass arrays",
                )
        else:
            xt, yt = (
                _checked
                if _checked is not None
                else validation.train_set(x_train, y_train, num_classes)
            )
            x_ex, y_ex, n = xt, yt, checks.num_inputs(xt)
        validation.loss(loss_fn, params, x_ex, y_ex)
        validation.class_names_and_ids(class_names, sample_ids, num_classes, n)
        apply = validation.reachable_apply(loss_fn, apply, model, params)  # model= reaches too
        choice = curvature.resolve(config, loss_fn, params, apply, x_ex, y_ex)
        if choice.curvature == "gauss_newton" or config.uses_factors:  # (the logits are used)
            validation.logit_width(choice.apply, params, x_ex, num_classes)
        if config.uses_factors:
            _check_factor_inputs(model, params, xt)
        config = choice.config
        one = None if model is None else jax.tree_util.tree_map(lambda a: np.asarray(a)[:1], x_ex)
        sel = selection.resolve(select, params, model, config.factored, one)
        flat = kernels.flatten(loss_fn, params)
        theta = flat.theta
        checks.check_finite_array(theta, "params", "influence: parameters")
        be = backend_for(mesh, config.execution, progress)
        self.objective, self.loss_fn, self.params, self.config = objective, loss_fn, params, config
        self.apply, self.curvature = choice.apply, choice.curvature
        self.num_classes, self.weight_decay, self.mesh = (int(num_classes), objective.weight_decay,
            mesh)
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.sample_ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        self._x, self._y, self._n, self._flat, self._be, self._example = xt, yt, n, flat, be, x_ex
        self._example_y, self._param_reuse = y_ex, None
        self._mask = None if sel is None else jnp.asarray(sel.mask, theta.dtype)
        self._select = None if sel is None else sorted(sel.keys, key=str)
        data = be.objective(theta, be.chunks(xt, yt, config.hvp_batch_size, theta.dtype), n,
            self.weight_decay, mask=self._mask)
        matvec = be.matvec(self.curvature, data)
        make_factors = None if model is None else functools.partial(be.factors, model, params,
            xt, yt, batch_size=config.hvp_batch_size, num_classes=num_classes,
            output_loss=choice.output_loss, weight_decay=self.weight_decay,
            select=None if sel is None else sel.keys, fisher=config.fisher, seed=config.seed)
        self.solver = solvers.from_config(config)
        saved = _saved or {}
        self._state = self.solver.init(
            solvers.Operator(be, self.curvature, data, matvec, make_factors),
            factors=saved.get("factors"))
        self.factors = self._state.factors
        if "damping" in saved:
            self.damping = saved["damping"]
        elif config.factored and config.damping == "auto":  # exact, from the factors
            self.damping = selection.damping_from_factors(self.factors)
        else:
            self.damping = selection.damping(config.damping, matvec, theta, config.seed, self._mask)
        self._details = {
            **choice.note,
            **({} if sel is None else {"selection": sel.note}),
            "execution": be.execution
            if yt is not None
            else "stepped (streamed from a batch source)",
        }

    def _fingerprint(self) -> str:
        """The params' bytes, N, the training set's content and the objective's λ."""
        data = (
            [self._n]
            if self._y is None
            else [self._n, *jax.tree_util.tree_leaves(self._x), self._y]
        )
        mask = [] if self._mask is None else [self._mask]
        return io.fingerprint(self._flat.theta, *data, self.weight_decay, *mask)

    def save(self, folder):
        """Write the fitted state to `folder`: ``state.json`` (the resolved config, damping,
        curvature, sizes, class names and a fingerprint of the params, the training set and λ),
        ``sample_ids.npy`` and, for K-FAC / EK-FAC, ``factors.npz``. Returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        io.write_json(
            folder / "state.json",
            {"config": dataclasses.asdict(self.config), "damping": self.damping,
                "num_classes": self.num_classes, "weight_decay": self.weight_decay,
                "class_names": self.class_names, "fingerprint": self._fingerprint(),
                "select": self._select},
        )
        np.save(folder / "sample_ids.npy", self.sample_ids)
        if self.factors is not None:
            kfac.save_factors(folder / "factors.npz", self.factors)
        return folder

    @classmethod
    def load(
        cls, folder, loss_fn, params, x_train, y_train, *, apply=None, model=None, mesh=None
    ) -> "Influence":
        """The `Influence` saved in `folder`, for the same model, params and training set (checked
        by fingerprint): the damping and any K-FAC / EK-FAC factors are read, not recomputed."""
        folder = Path(folder)
        st = io.read_json(folder / "state.json")
        damping = st.get("damping")
        if (
            not isinstance(damping, (int, float))
            or not np.isfinite(damping)
            or not 0 <= damping <= 1e12
        ):
            checks.fail("folder", f"{folder} with damping {damping!r}",
                "a finite damping >= 0 as saved", "fit again: the saved state was edited or damaged"
            )
        saved = {"damping": float(damping)}
        if (folder / "factors.npz").exists():
            saved["factors"] = kfac.load_factors(folder / "factors.npz")
        objective = (
            loss_fn
            if isinstance(loss_fn, train.Objective)
            else train.Objective(loss_fn, st["weight_decay"], "n")
        )
        fit = cls(objective, params, x_train, y_train, num_classes=st["num_classes"],
            config=InfluenceConfig(**st["config"]), apply=apply, model=model, mesh=mesh,
            class_names=st["class_names"], sample_ids=np.load(folder / "sample_ids.npy"),
            select=st.get("select"), _saved=saved)
        if fit._fingerprint() != st["fingerprint"]:
            checks.fail(
                "params",
                f"parameters / a training set with fingerprint {fit._fingerprint()}",
                f"the ones saved in {folder} (fingerprint {st['fingerprint']} of the params, the "
                "training "
                "set and λ)",
                "load with the params and training set the state was fitted on, or fit again",
            )
        return fit

    def _reuse(self) -> float:
        """`kernels.param_reuse` of one training sample (computed once per fit)."""
        if self._param_reuse is None:
            x1 = kernels.cast_floats(jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]),
                self._example), self._flat.theta.dtype)
            y1 = jnp.asarray(np.asarray(self._example_y)[0])
            self._param_reuse = kernels.param_reuse(self._flat.loss, self._flat.theta, x1, y1)
        return self._param_reuse

    def influence(
        self, x_val, y_val, *, groups=None, group_names=None, measure_fn=None, _checked=None
    ) -> InfluenceResult:
        """P (N, K) for this validation set: column k is the influence of every training sample
        on the mean measurement of validation group k (by default: class k's mean loss).

        Args:
            x_val, y_val: validation inputs (same structure as the training inputs) and labels.
            groups: (n_val,) integer group ids 0..G-1 partitioning the validation set (a domain,
                a demographic group, ...); default: the classes (every class must be present).
            group_names: the G group names (default: the class names for classes).
            measure_fn: per-sample ``measure_fn(params, x, y)`` to lower, averaged per group
                (default: the training loss_fn); e.g. a margin loss or a calibration term.
                P > 0 still means "up-weighting the sample lowers the group's measurement".
        """
        config, be, flat = self.config, self._be, self._flat
        theta = flat.theta
        xv, yv = (
            _checked
            if _checked is not None
            else validation.val_set(self._example, x_val, y_val, self.num_classes)
        )
        g, K, names = validation.groups(groups, yv, self.num_classes, group_names, self.class_names)
        measure = self.loss_fn if measure_fn is None else measure_fn
        if measure_fn is not None:
            validation.loss(measure_fn, self.params, xv, yv, "measure_fn")
            validation.finite_measure(measure_fn, self.params, xv, yv)
        fv = kernels.flatten(on_pairs(measure), self.params).loss
        c = kernels.class_gradient_chunk_size(K, theta.size, theta.dtype.itemsize)
        G = be.class_gradients(fv, theta, be.chunks((xv, yv), g, c, theta.dtype), g, K)
        if measure_fn is not None and not np.all(np.isfinite(np.asarray(G))):
            checks.fail("measure_fn", "non-finite gradients of the mean measurement of some group",
                "a measurement with finite values and gradients on the validation set",
                "guard logs and divisions in measure_fn (e.g. clip probabilities)")
        checks.check_finite_array(G, "class gradients", "influence: class gradients")
        G = selection.restrict_gradients(G, self._mask)
        res, damping, escalations = solvers.solve_damped(
            self.solver, self._state, G, self.damping, config
        )
        checks.check_finite_array(res.value, "inverse-HVP solutions", "influence: curvature solve")
        if config.throw:
            linsolve.check_solve(res, rtol=linsolve.resolve_rtol(config.rtol, G.dtype))
        method = (
            choose_method(theta.size, K, config.chunk_size, self._reuse(), theta.dtype.itemsize)
            if config.method == "auto"
            else config.method
        )
        P = jnp.asarray(
            be.influence_rows(flat.loss, method, theta, res.value,
                be.chunks(self._x, self._y, config.chunk_size, theta.dtype), self._n)
        )
        checks.check_finite_array(P, "P", "influence: influence matrix")
        details = {**(self._state.details or {}), **self._details}
        return InfluenceResult(P, method, config.solver, config.curvature, damping,
            tuple(escalations), np.asarray(res.steps), np.asarray(res.residual),
            np.asarray(res.converged), np.asarray(res.negative_curvature), np.asarray(res.status),
            res.value, details, names, self.sample_ids)


def _check_factor_inputs(model, params, xt) -> None:
    if model is None:
        checks.fail("model", "None", "the nnx model (K-FAC/EK-FAC read its Dense/Conv layers)",
            "pass model= to category_influence")
    if validation.apply_of_model(model, params) is None:  # not the model's own parameter tree
        checks.fail("params",
            f"{len(jax.tree_util.tree_leaves(params))} arrays that are not the parameter tree of "
            f"the {type(model).__name__} passed as model= (a subset of its parameters?)",
            "all of the model's nnx.Param, as models.functional(model) splits them: K-FAC / "
            "EK-FAC factor every Linear / LinearGeneral / Conv / Embed layer of the model",
            "pass the model's whole params (models.functional(model)); for influence over a "
            "subset of the parameters pass select= with them (the rest held fixed)")


def category_influence(loss_fn, params, x_train, y_train, x_val, y_val, *, num_classes: int,
    weight_decay: float | None = None, config: InfluenceConfig = InfluenceConfig(), apply=None,
    model=None, mesh=None, groups=None, group_names=None, measure_fn=None, class_names=None,
    sample_ids=None, progress: bool = False, select=None) -> InfluenceResult:
    """The N×K category-wise influence matrix P of a trained model (``docs/method.md``).

    P[i, k] = (1/N) · g_kᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ), g_k = ∇ mean_{val, class k} ℓ; P > 0 is
    beneficial.
    For new weights w the first-order change of class k's validation loss is
    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (training objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖²).
    `Influence(...).influence(...)`: one fit and one query, the inputs validated once; keep an
    `Influence` to ask again for other validation sets, groupings or measurements without
    refitting.

    Args:
        loss_fn: a `train.Objective` (loss, λ, normaliser: what training used), or a per-sample
            ``loss_fn(params, x, y)`` (x unbatched; see `models.per_sample_loss` and
            `models.OutputLoss`) with `weight_decay`.
        params: trained parameters (any pytree).
        x_train, y_train: the training set the model was trained on, (N, ...) and (N,); inputs
            may be a pytree of arrays with a shared leading axis (integer token IDs stay integers).
        x_val, y_val: the validation set; every class must be present (unless `groups` is given).
        num_classes: K.
        weight_decay: λ used in training (it is part of the Hessian); None with an Objective.
        config: `InfluenceConfig`.
        apply: ``apply(params, x_batch) -> logits``; needed for Gauss-Newton with a plain
            loss_fn (an `OutputLoss` carries its own).
        model: the flax nnx module whose params these are; needed for K-FAC / EK-FAC.
        mesh: a `jax.sharding.Mesh` from `distributed.make_mesh` to shard the samples over
            devices (class gradients, every curvature product, the P stage); None = one device.
            In a multi-process job pass this process's samples; P holds their rows.
        groups, group_names, measure_fn: see `Influence.influence`.
        class_names, sample_ids: carried into the result (see `Influence`).
        progress: a progress bar over the CG iterations (host-stepped solves, the CPU default).
        select: the parameters the influence is over, the rest held fixed (see `Influence`).

    Returns:
        `InfluenceResult` with P (N, K) and solver diagnostics.

    Example:
        >>> from pareto_jax import data, models, train, influence
        >>> s = data.stratified_split(data.load_digits(), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (64,), 10))
        >>> loss_fn = models.per_sample_loss(apply)
        >>> params = train.train(loss_fn, params, s.train.x, s.train.y).params
        >>> res = influence.category_influence(loss_fn, params, s.train.x, s.train.y,
        ...     s.val.x, s.val.y, num_classes=10, weight_decay=1e-3)
        >>> res.P.shape
        (1078, 10)
    """
    validation.check_request(config, num_classes, mesh)  # every input checked before any work
    checks.check_not_traced((params, None if validation.is_source(x_train) else x_train, x_val),
        "params", "influence.influence_matrix (pure JAX: jit, vmap and grad work)")
    source = validation.is_source(x_train)
    train_checked = None if source else validation.train_set(x_train, y_train, num_classes)
    if source:
        val_checked = None
    else:
        reach = validation.reachable_apply(loss_fn, apply, model, params)
        if config.curvature != "hessian":  # (the logits are used) checked before the classes
            validation.logit_width(reach, params, train_checked[0], num_classes)
        val_checked = validation.val_set(train_checked[0], x_val, y_val, num_classes)
        validation.groups(groups, val_checked[1], num_classes, group_names, class_names)
    fit = Influence(loss_fn, params, x_train, y_train, num_classes=num_classes,
        weight_decay=weight_decay, config=config, apply=apply, model=model, mesh=mesh,
        class_names=class_names, sample_ids=sample_ids, progress=progress, select=select,
        _checked=train_checked)
    return fit.influence(x_val, y_val, groups=groups, group_names=group_names,
        measure_fn=measure_fn, _checked=val_checked)
