"""Flax nnx classifiers and their pure functional form.

Numerics never see an nnx module: `functional(model)` splits it into a pure
``apply(params, x_batch) -> logits`` and a params pytree of plain arrays, and
`per_sample_loss(apply)` gives the ``loss_fn(params, x, y)`` (one sample, no batch axis) that
`pareto_jax.influence` and `pareto_jax.train` take.

Example:
    >>> from pareto_jax import models
    >>> apply, params = models.functional(models.make_model("linear", (64,), 10, seed=0))
    >>> loss_fn = models.per_sample_loss(apply)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import checks, kernels
from .config import MODEL_KINDS, ModelConfig

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class LinearClassifier(nnx.Module):
    """Softmax regression: logits = x·W + b (the convex case; closed-form influence applies)."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.head = nnx.Linear(
            in_features, num_classes, rngs=rngs, kernel_init=nnx.initializers.zeros_init()
        )

    def features(self, x):
        return x.reshape(x.shape[0], -1)

    def __call__(self, x):
        return self.head(self.features(x))


class MLP(nnx.Module):
    """Fully connected network with tanh hidden layers (smooth, so Hessians are well defined)."""

    def __init__(self, in_features: int, num_classes: int, *,
        hidden: Sequence[int] = ModelConfig.hidden, rngs: nnx.Rngs):
        sizes = [in_features, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def features(self, x):
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = jnp.tanh(layer(h))
        return h

    def __call__(self, x):
        return self.head(self.features(x))


class CNN(nnx.Module):
    """Small convnet: conv(3×3)-tanh-avgpool blocks, then a dense tanh layer and a linear head."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, *,
        channels: Sequence[int] = ModelConfig.channels, dense: int = ModelConfig.dense,
        rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        convs = []
        for ch in channels:
            convs.append(nnx.Conv(c, ch, (3, 3), padding="SAME", rngs=rngs))
            c = ch
            h, w = max(h // 2, 1), max(w // 2, 1)
        self.convs = nnx.List(convs)
        self.fc = nnx.Linear(h * w * c, dense, rngs=rngs)
        self.head = nnx.Linear(dense, num_classes, rngs=rngs)

    def features(self, x):
        h = x.reshape((x.shape[0], *self.image_shape))
        for conv in self.convs:
            h = jnp.tanh(conv(h))
            if h.shape[1] > 1 and h.shape[2] > 1:
                h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
        return jnp.tanh(self.fc(h.reshape(h.shape[0], -1)))

    def __call__(self, x):
        return self.head(self.features(x))


def make_model(kind: str, input_shape: Sequence[int], num_classes: int, *, seed: int = 0,
    hidden: Sequence[int] = ModelConfig.hidden, image_shape: Sequence[int] | None = None,
    channels: Sequence[int] = ModelConfig.channels, dense: int = ModelConfig.dense) -> nnx.Module:
    """Build a classifier by name ("linear", "mlp" or "cnn") for inputs of `input_shape`."""
    checks.check_choice(kind, "model", MODEL_KINDS)
    checks.check_positive(num_classes, "num_classes", integer=True)
    rngs = nnx.Rngs(seed)
    d = int(np.prod(input_shape))
    if kind == "linear":
        return LinearClassifier(d, num_classes, rngs=rngs)
    if kind == "mlp":
        return MLP(d, num_classes, hidden=hidden, rngs=rngs)
    shape = tuple(image_shape) if image_shape is not None else tuple(input_shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or int(np.prod(shape)) != d:
        checks.fail("image_shape", repr(shape), f"(height, width, channels) with {d} pixels",
            "pass image_shape=(8, 8, 1) for digits, (28, 28, 1) for MNIST")
    return CNN(shape, num_classes, channels=channels, dense=dense, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class _Split:
    graphdef: Any
    treedef: Any
    rest: Any  # the nnx state that is not an nnx.Param (batch statistics, RNG state), held fixed

    def module(self, params):
        state = jax.tree_util.tree_unflatten(self.treedef, jax.tree_util.tree_leaves(params))
        m = nnx.merge(self.graphdef, state, self.rest)
        m.eval()  # deterministic: dropout off, batch norm on its running statistics
        return m


def _split(model: nnx.Module) -> tuple[_Split, Params]:
    if not isinstance(model, nnx.Module):
        checks.fail(
            "model",
            type(model).__name__,
            "a flax nnx.Module",
            "pass an nnx module; for linen, equinox or plain JAX pass apply(params, x) and "
            "loss_fn directly",
        )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if not jax.tree_util.tree_leaves(params):
        checks.fail("model", f"an {type(model).__name__} with no nnx.Param",
            "a module with trainable nnx.Param variables (the parameters influence differentiates)",
            "wrap trainable arrays in nnx.Param (nnx.Linear, nnx.Conv, nnx.Embed do)")
    return _Split(graphdef, jax.tree_util.tree_structure(params), rest), nnx.to_pure_dict(params)


def functional(model: nnx.Module) -> tuple[ApplyFn, Params]:
    """Split an nnx module into a pure ``apply(params, x_batch) -> logits`` and its params.

    Only the `nnx.Param` variables are params (a nested dict of arrays, `nnx.to_pure_dict`), so
    optax, `ravel_pytree`, `vmap`, `jvp` and checkpoints all see plain pytrees. Everything else
    the module holds (BatchNorm's running statistics, Dropout's RNG state, other variables) is
    held fixed at its current value, and `apply` runs the module in evaluation mode (dropout
    off, batch norm on its running statistics): influence is a property of the trained model as
    it predicts. Training through `apply` (`pareto_jax.train`) therefore also runs in
    evaluation mode; train a model with live batch statistics or dropout with your own loop.
    `x_batch` may be an array or any pytree of arrays the module accepts (integer token IDs
    stay integers).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from pareto_jax import functional
        >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
        ...                        nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
        >>> apply, params = functional(model)
        >>> apply(params, jnp.ones((5, 4))).shape
        (5, 3)
    """
    sp, params = _split(model)

    def apply(params, x):
        return sp.module(params)(x)

    return apply, params


def functional_features(model: nnx.Module) -> ApplyFn:
    """Pure ``features(params, x_batch)`` giving the penultimate-layer activations."""
    sp, _ = _split(model)

    def features(params, x):
        return sp.module(params).features(x)

    return features


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy of one sample's logits (K,) with an integer label."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """A per-sample loss written through the model's logits: ``output_loss(apply(params, x), y)``.

    Called as ``loss_fn(params, x, y)`` (one sample, no batch axis; x may be a pytree), so it
    goes wherever a loss function goes. Because the split is known, Gauss-Newton curvature
    uses this loss's own Hessian with respect to the logits (by autodiff), which makes it exact
    for any output loss: a scaled, label-smoothed or focal cross-entropy, a per-class weighted
    one, a squared error on the logits. Hashable, so jitted callers cache on it.

    Attributes:
        apply: ``apply(params, x_batch) -> logits (batch, K)``.
        output_loss: ``output_loss(logits (K,), y) -> scalar`` for one sample.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from pareto_jax import OutputLoss, models
        >>> apply, params = models.functional(models.make_model("linear", (2,), 3))
        >>> def smoothed(z, y):  # label-smoothed cross-entropy: Gauss-Newton uses its own H_out
        ...     target = optax.smooth_labels(jax.nn.one_hot(y, 3), 0.1)
        ...     return optax.softmax_cross_entropy(z, target)
        >>> loss_fn = OutputLoss(apply, smoothed)
        >>> round(float(loss_fn(params, jnp.ones(2), 1)), 4)   # log 3 at the zero head
        1.0986
    """

    apply: ApplyFn
    output_loss: Callable = cross_entropy

    def __call__(self, params, x, y):
        logits = self.apply(params, jax.tree_util.tree_map(lambda a: a[None], x))[0]
        return self.output_loss(logits, y)

    @property
    def is_cross_entropy(self) -> bool:
        return self.output_loss is cross_entropy


def per_sample_loss(apply: ApplyFn, output_loss: Callable = cross_entropy) -> OutputLoss:
    """``loss_fn(params, x, y)`` of one sample (x unbatched, y a scalar int): `output_loss`
    (default softmax cross-entropy) of ``apply``'s logits, as an `OutputLoss`."""
    return OutputLoss(apply, output_loss)


def linear_head_params(W: jax.Array, b: jax.Array) -> Params:
    """Params of `LinearClassifier` from a kernel (d, K) and bias (K,)."""
    return {"head": {"bias": jnp.asarray(b), "kernel": jnp.asarray(W)}}


def frozen_features(
    features_fn: ApplyFn, params: Params, x: np.ndarray, *, batch_size: int = 512
) -> np.ndarray:
    """Penultimate activations of a trained network, for a "frozen features + linear head" model.

    Feed the result to a `LinearClassifier`: influence on the head then has a closed form
    (`pareto_jax.closed_form.linear_influence`).
    """
    f = jax.jit(features_fn)
    xc, _, mc = kernels.pad_chunks(np.asarray(x), np.zeros(len(x), np.int32), batch_size)
    return np.concatenate([np.asarray(f(params, xb))[mb > 0] for xb, mb in zip(xc, mc)]).astype(
        np.float32
    )
