"""Input validation shared by every public entry point.

Every check runs on concrete (non-traced) values before anything is jitted, and every error
says which argument was wrong, what was got, what was expected, and how to fix it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class InputError(ValueError):
    """A public function received an argument it cannot use. `argument` names it (the command
    line maps a config field's name to its flag).

    Example:
        >>> from pareto_jax import ReweightConfig, InputError
        >>> try:
        ...     ReweightConfig(w_max=-1.0)
        ... except InputError as e:
        ...     print(e.argument)
        w_max
    """

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class NumericalError(FloatingPointError):
    """A numerical stage produced NaN/Inf or failed to reach its tolerance.

    Example:
        >>> import numpy as np
        >>> from pareto_jax import NumericalError, checks
        >>> try:
        ...     checks.check_finite_array(np.array([1.0, np.nan]), "P", "influence")
        ... except NumericalError as e:
        ...     print(str(e).split(":")[0])
        influence
    """


def fail(name: str, got: str, expected: str, fix: str) -> None:
    raise InputError(f"argument `{name}`: got {got}; expected {expected}. Fix: {fix}", name)


def _shape(a: Any) -> tuple:
    return tuple(np.shape(a))


def as_features(x: Any, name: str = "x", *, min_ndim: int = 2) -> np.ndarray:
    """Float array with a leading sample axis, finite everywhere."""
    try:
        arr = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic inputs
        fail(name, f"an object of type {type(x).__name__}", "an array",
            f"pass a numpy/jax array ({e})")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        fail(name, f"dtype {arr.dtype}", "a numeric array", "convert the features to float32")
    if np.iscomplexobj(arr):
        fail(name, f"dtype {arr.dtype}",
            "real features (a complex value would lose its imaginary part)",
            "pass real features, e.g. np.concatenate([x.real, x.imag], axis=-1)")
    if arr.ndim < min_ndim:
        fail(name, f"shape {arr.shape}", f"at least {min_ndim} dimensions (samples first)",
            "add a feature axis, e.g. x.reshape(len(x), -1)")
    if arr.shape[0] == 0:
        fail(name, "0 samples", "at least one sample", "check the split or filter that produced it")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        n_bad = int((~finite).sum())
        fail(name, f"{n_bad} non-finite value(s) (first at index {tuple(int(i) for i in bad)})",
            "finite features", "impute or drop the NaN/Inf entries before calling")
    return arr


def check_not_traced(tree: Any, name: str, core: str) -> None:
    """A host-validated entry point called under `jax.jit` / `vmap` / `grad` gets tracers: say
    so, and name the pure function to use inside transforms, instead of a conversion error."""
    import jax

    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree)):
        fail(name, "traced values (this function was called inside jax.jit, vmap or grad)",
            "concrete arrays: it validates its input on the host", f"inside transforms call {core}")


def as_inputs(x: Any, name: str = "x", *, min_ndim: int = 2):
    """Model inputs: one array, or any pytree of arrays (a dict of token IDs and masks, a tuple
    of modalities) whose leaves share the leading sample axis. Floating leaves must be finite;
    integer leaves (token IDs) keep their integer dtype; booleans become float32. A single
    array needs `min_ndim` dimensions (samples first), a pytree leaf at least one."""
    import jax  # the base layer's only use of JAX: walking the pytree

    leaves, treedef = jax.tree_util.tree_flatten(x)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:  # a bare array
        arr = (
            as_features(leaves[0], name, min_ndim=min_ndim)
            if np.asarray(leaves[0]).dtype.kind == "f"
            else _as_leaf(leaves[0], name, min_ndim)
        )
        return arr
    if not leaves:
        fail(name, f"an empty {type(x).__name__}", "an array or a pytree of arrays",
            "pass the model's inputs")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(x)[0]]
    arrs = [_as_leaf(a, f"{name}{p}", 1) for a, p in zip(leaves, paths)]
    n = {a.shape[0] for a in arrs}
    if len(n) > 1:
        fail(
            name,
            "leaves with leading axes "
            + ", ".join(f"{p}: {a.shape[0]}" for p, a in zip(paths, arrs)),
            "one leading sample axis shared by every leaf",
            "slice every input array to the same samples",
        )
    return jax.tree_util.tree_unflatten(treedef, arrs)


def _as_leaf(a: Any, name: str, min_ndim: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind in "iu":
        if arr.ndim < min_ndim:
            fail(name, f"shape {arr.shape}", f"at least {min_ndim} dimension(s) (samples first)",
                "add a sample axis")
        if arr.shape[0] == 0:
            fail(name, "0 samples", "at least one sample",
                "check the split or filter that produced it")
        return arr
    return as_features(arr, name, min_ndim=min_ndim)


def num_inputs(x: Any) -> int:
    """Samples in validated inputs (`as_inputs`): the leading axis of any leaf."""
    import jax

    return int(np.shape(jax.tree_util.tree_leaves(x)[0])[0])


def as_labels(y: Any, name: str = "y", *, num_classes: int | None = None, n: int | None = None,
    x_name: str = "x") -> np.ndarray:
    """1-D integer labels in [0, num_classes)."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] > 1 and arr.size and np.isin(arr, (0, 1)).all():
        hot = arr.sum(axis=1)
        if (hot == 1).all():  # one-hot: argmax loses nothing
            fail(name, f"one-hot labels of shape {arr.shape}",
                "a 1-D array of integer class labels", "pass y.argmax(-1)")
        fail(
            name,
            f"multi-hot labels of shape {arr.shape} ({int((hot != 1).sum())} rows with "
            "no label or several)",
            "one class per sample (multi-label targets are not supported)",
            "ask per label: for label j, a two-class problem with y[:, j] as its "
            "labels (a model with one logit pair per label), or group the validation samples "
            "with groups= and a measure_fn of the label's loss",
        )
    if arr.ndim != 1:
        fail(name, f"shape {arr.shape}", "a 1-D array of integer class labels",
            "pass one integer class label per sample")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            fail(
                name, "non-integer float labels", "integer class labels", "cast with y.astype(int)"
            )
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        fail(name, f"dtype {arr.dtype}", "integer class labels", "map class names to 0..K-1 first")
    if n is not None and arr.shape[0] != n:
        fail(name, f"{arr.shape[0]} labels", f"{n} labels, one per row of `{x_name}`",
            "pass labels and features of the same length")
    if arr.size and arr.min() < 0:
        fail(name, f"label {int(arr.min())}", "labels >= 0", "map labels to 0..K-1")
    if num_classes is not None and arr.size and arr.max() >= num_classes:
        fail(name, f"label {int(arr.max())} with num_classes={num_classes}",
            f"labels in [0, {num_classes})", "raise num_classes or remap the labels")
    return arr.astype(np.int32)


def check_all_classes_present(y: np.ndarray, num_classes: int, name: str) -> None:
    counts = np.bincount(y, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        fail(name, f"no samples of class(es) {missing.tolist()}",
            f"at least one sample of each of the {num_classes} classes",
            "use a stratified split (pareto_jax.data.stratified_split) or drop the empty class")


def as_weights(w: Any, n: int, name: str = "weights", *, upper: float | None = None) -> np.ndarray:
    arr = np.asarray(w, dtype=np.float64)
    if arr.shape != (n,):
        fail(name, f"shape {arr.shape}", f"shape ({n},), one weight per training sample",
            "pass a 1-D weight vector aligned with the training set")
    if not np.all(np.isfinite(arr)):
        fail(name, "non-finite weights", "finite weights", "replace NaN/Inf weights")
    if arr.min() < 0:
        fail(name, f"a negative weight ({arr.min():.4g} at index {int(arr.argmin())})",
            "weights >= 0", "clip the weights at 0")
    if upper is not None and arr.max() > upper:
        fail(name, f"weight {arr.max():.4g}", f"weights <= {upper}", "clip or rescale the weights")
    if arr.sum() <= 0:
        fail(name, "weights summing to 0", "a positive total weight",
            "give some sample a positive weight")
    return arr


def check_positive(
    value: Any, name: str, *, allow_zero: bool = False, integer: bool = False
) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value) == int(value)
    if ok:
        ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        fail(name, repr(value), f"{kind} {bound}", f"set `{name}` to {kind} {bound}")


SEED_MAX = 2**32 - 1


def check_seed(value: Any, name: str = "seed") -> None:
    """A seed: an integer in [0, 2**32 − 1] (what JAX's and NumPy's generators both take)."""
    ok = (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and 0 <= value <= SEED_MAX
    )
    if not ok:
        fail(name, repr(value), f"an integer in [0, {SEED_MAX}]", f"set `{name}` to e.g. 0")


def check_in_range(value: Any, name: str, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or not (lo <= value <= hi):
        fail(name, repr(value), f"a number in [{lo}, {hi}]", f"set `{name}` inside [{lo}, {hi}]")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        fail(name, repr(value), f"one of {list(choices)}", f"pick one of {list(choices)}")


def check_same_length(a: Any, b: Any, name_a: str, name_b: str) -> None:
    if _shape(a)[:1] != _shape(b)[:1]:
        fail(name_b, f"length {_shape(b)[:1]}", f"the length of `{name_a}` ({_shape(a)[:1]})",
            f"pass `{name_a}` and `{name_b}` with one row per sample")


def check_finite_array(arr: Any, name: str, stage: str) -> None:
    """Raise NumericalError naming the stage if `arr` has NaN/Inf (concrete values only)."""
    a = np.asarray(arr)
    if not np.all(np.isfinite(a)):
        n_bad = int((~np.isfinite(a)).sum())
        raise NumericalError(
            f"{stage}: `{name}` has {n_bad} non-finite value(s) out of {a.size}. "
            "Fix: check the model's loss for overflow, lower the learning rate, or raise damping."
        )


def as_influence_matrix(P: Any, name: str = "P") -> np.ndarray:
    check_not_traced(
        P,
        name,
        "pareto.reweight / pareto.ceiling_program (the same solvers as pure JAX, "
        "statuses as arrays, no input checks)",
    )
    arr = np.asarray(P, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        fail(name, f"shape {arr.shape}", "a 2-D influence matrix of shape (n_train, n_classes)",
            "pass the P returned by pareto_jax.influence.category_influence")
    if not np.all(np.isfinite(arr)):
        fail(name, f"{int((~np.isfinite(arr)).sum())} non-finite entries", "a finite matrix",
            "recompute the influence with more damping; NaN in P usually means NaN in gradients")
    return arr


def as_class_indices(targets: Any, num_classes: int, name: str = "targets") -> tuple[int, ...]:
    if targets is None:
        fail(name, "None", "a non-empty list of class indices", "name the classes to improve")
    t = np.atleast_1d(np.asarray(targets))
    if t.size == 0 or t.dtype.kind not in "iu":
        fail(name, repr(targets), "a non-empty list of integer class indices",
            "pass e.g. targets=[3, 8]")
    if t.min() < 0 or t.max() >= num_classes:
        fail(name, repr(t.tolist()), f"class indices in [0, {num_classes})",
            "use valid class indices")
    if len(set(t.tolist())) != t.size:
        fail(name, repr(t.tolist()), "distinct class indices", "remove duplicates")
    return tuple(int(i) for i in t)
