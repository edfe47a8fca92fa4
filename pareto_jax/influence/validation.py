"""Every check of the influence front door's inputs, run once on the host before any work.

`check_request` (config, sizes, mesh), `train_set` / `source` (the training samples), `val_set`
(the validation samples, same kind as the training ones), `groups` (a partition of the
validation set), `loss` (a per-sample loss on one sample) and `finite_measure`. Each error names
the argument, what was got, what was expected and the fix (`pareto_jax.checks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks, kernels, models
from ..config import InfluenceConfig


def check_request(config, num_classes, mesh) -> None:
    """The config and the class count (the objective is checked where it is built)."""
    if not isinstance(config, InfluenceConfig):
        checks.fail(
            "config", type(config).__name__, "an InfluenceConfig", "pass InfluenceConfig(...)"
        )
    checks.check_positive(num_classes, "num_classes", integer=True)
    del mesh  # every solver runs on a mesh too (the backends offer the same set)


def is_source(x) -> bool:
    """Whether `x_train` is a batch source (a function returning an iterator of batches)."""
    return callable(x) and not hasattr(x, "shape") and not isinstance(x, (dict, list, tuple))


def train_set(x_train, y_train, num_classes):
    xt = checks.as_inputs(x_train, "x_train")
    yt = checks.as_labels(
        y_train, "y_train", num_classes=num_classes, n=checks.num_inputs(xt), x_name="x_train"
    )
    return xt, yt


def source(batches, y_train, num_classes):
    """One pass over a batch source: every batch validated on the host (inputs, labels, the
    same structure and sample shape throughout); returns (`kernels.Source`, the first batch)."""
    if y_train is not None:
        checks.fail("y_train", "labels beside a batch source",
            "None (the labels come with each batch)",
            "yield (x_batch, y_batch) from x_train() and pass y_train=None")
    n, first = 0, None
    for i, item in enumerate(batches()):
        if not (isinstance(item, tuple) and len(item) == 2):
            checks.fail("x_train", f"a batch source whose batch {i} is a {type(item).__name__}",
                "(x_batch, y_batch) pairs", "make x_train() yield (inputs, labels) tuples")
        xb = checks.as_inputs(item[0], f"x_train batch {i}")
        yb = checks.as_labels(item[1], f"y_train batch {i}", num_classes=num_classes,
            n=checks.num_inputs(xb), x_name=f"x_train batch {i}")
        if first is None:
            first = (xb, yb)
        else:
            same_kind(first[0], xb, f"x_train batch {i}", "the first batch's")
        n += yb.shape[0]
    if first is None:
        checks.fail("x_train", "a batch source that yielded nothing",
            "at least one (x_batch, y_batch)",
            "check that x_train() returns a fresh iterator on every call")
    return kernels.Source(batches, n), first


def same_kind(ref, x, name, what) -> None:
    sr, sx = jax.tree_util.tree_structure(ref), jax.tree_util.tree_structure(x)
    if sr != sx:
        checks.fail(name, f"inputs structured as {sx}", f"{what} structure {sr}",
            "pass inputs of the same kind everywhere")
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(x)):
        if a.shape[1:] != b.shape[1:]:
            checks.fail(name, f"sample shape {b.shape[1:]}", f"{what} sample shape {a.shape[1:]}",
                "featurise every set the same way")


def val_set(xt, x_val, y_val, num_classes):
    xv = checks.as_inputs(x_val, "x_val")
    yv = checks.as_labels(
        y_val, "y_val", num_classes=num_classes, n=checks.num_inputs(xv), x_name="x_val"
    )
    same_kind(xt, xv, "x_val", "the training inputs'")
    return xv, yv


def groups(g, yv, num_classes, group_names, class_names):
    """(group id per validation sample, number of groups, column names)."""
    if g is None:
        checks.check_all_classes_present(yv, num_classes, "y_val")
        return yv, num_classes, class_names
    g = checks.as_labels(g, "groups", n=yv.shape[0], x_name="x_val")
    G = int(g.max()) + 1 if group_names is None else len(group_names)
    if g.max() >= G:
        checks.fail("groups", f"group id {int(g.max())} with {G} group_names", f"ids in [0, {G})",
            "give one name per group")
    counts = np.bincount(g, minlength=G)
    if (counts == 0).any():
        checks.fail("groups",
            f"no validation samples in group(s) {np.flatnonzero(counts == 0).tolist()}",
            "at least one validation sample in every group 0..G-1",
            "renumber the groups to 0..G-1 without gaps, or drop the empty group's name")
    return g, G, tuple(group_names) if group_names is not None else None


def loss_callable(loss_fn, name: str = "loss_fn") -> None:
    if not callable(loss_fn):
        checks.fail(name, type(loss_fn).__name__, "a function (params, x, y) -> scalar",
            "pass e.g. models.per_sample_loss(apply)")


def loss(loss_fn, params, x, y, name: str = "loss_fn") -> None:
    """The loss must map one sample (no batch axis) to a finite scalar (abstract evaluation
    first, so a batched loss is named before any compilation)."""
    loss_callable(loss_fn, name)
    x0, y0 = kernels.take(x, 0), jnp.asarray(y[0])
    try:
        out = jax.eval_shape(loss_fn, params, x0, y0)
    except Exception as e:  # the user's function failed on one sample
        checks.fail(
            name,
            f"a function that raised {type(e).__name__}: {str(e)[:200]} on one sample",
            "a per-sample function (params, x, y) -> scalar, x without a batch axis",
            "write the loss for one sample; the library vmaps it (models.per_sample_loss "
            "turns an apply(params, x_batch) into one)",
        )
    if getattr(out, "shape", None) != ():
        checks.fail(
            name,
            f"an output of shape {getattr(out, 'shape', type(out).__name__)} for one sample",
            "a scalar per sample",
            "return the loss of the one sample given (do not average a "
            "batch, do not keep a batch axis); the library vmaps it over samples",
        )


def class_names_and_ids(class_names, sample_ids, num_classes: int, n: int) -> None:
    if class_names is not None and len(class_names) != num_classes:
        checks.fail("class_names", f"{len(class_names)} names", f"{num_classes}, one per class",
            "pass one name per class, in label order")
    if sample_ids is not None and np.shape(sample_ids) != (n,):
        checks.fail("sample_ids", f"shape {np.shape(sample_ids)}",
            f"shape ({n},), one id per training sample", "pass one id per row of x_train")


@functools.partial(jax.jit, static_argnums=0)
def _measure_chunk(measure, params, xb, yb):
    return jax.vmap(measure, (None, 0, 0))(params, xb, yb)


def finite_measure(measure, params, xv, yv) -> None:
    """A user measurement must be finite on every validation sample (its mean is what P is the
    influence on; a NaN there has a finite gradient and would pass unseen)."""
    for xb, yb, mb in kernels.iter_chunks(kernels.pad_chunks(xv, yv, 512)):
        vals = np.asarray(_measure_chunk(measure, params, xb, yb))[np.asarray(mb) > 0]
        if not np.all(np.isfinite(vals)):
            checks.fail("measure_fn",
                f"{int((~np.isfinite(vals)).sum())} non-finite value(s) on the validation set",
                "a finite measurement on every validation sample",
                "guard logs and divisions in measure_fn (e.g. clip probabilities)")


def apply_of_model(model, params):
    """The model's ``apply(params, x_batch) -> logits`` when `params` are its parameters
    (`models.functional`'s split: the same tree), else None: so a plain loss_fn with model= gets
    the curvature its logits allow, as with apply=."""
    if model is None:
        return None
    try:
        apply, own = models.functional(model)
    except Exception:  # noqa: BLE001 - not an nnx model: nothing to reach
        return None
    if jax.tree_util.tree_structure(own) != jax.tree_util.tree_structure(params):
        return None
    return apply


def reachable_apply(loss_fn, apply, model, params):
    """The way to the logits the curvature will use: `apply` as given, else an `OutputLoss`'s
    own, else the model's (`apply_of_model`); None when nothing reaches them."""
    loss_fn = getattr(loss_fn, "loss_fn", loss_fn)  # a train.Objective's own loss
    if apply is not None:
        return apply
    if isinstance(loss_fn, models.OutputLoss):
        return loss_fn.apply
    return apply_of_model(model, params)


def logit_width(apply, params, x, num_classes: int) -> None:
    """`num_classes` must be the model's number of logits (a mismatch would build the output
    factor and the class gradients for the wrong width, or drop a logit)."""
    if apply is None:
        return
    try:
        out = jax.eval_shape(apply, params, kernels.take(x, slice(0, 1)))
    except Exception:  # noqa: BLE001 - the loss check already named a broken model
        return
    width = int(out.shape[-1]) if getattr(out, "ndim", 0) >= 1 else None
    if getattr(out, "ndim", 0) != 2 or width != num_classes:
        checks.fail(
            "num_classes",
            f"{num_classes} for a model whose logits have shape {tuple(out.shape)} per batch",
            "one logit per class: logits of shape (batch, num_classes)",
            f"pass num_classes={width}"
            if getattr(out, "ndim", 0) == 2
            else "make apply return (batch, num_classes) logits",
        )
