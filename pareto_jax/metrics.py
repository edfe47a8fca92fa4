"""Per-class metrics of a model: accuracy and mean loss per class (`evaluate`), predictions."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checks, io, kernels
from .results import pytree_result


@pytree_result(data=("accuracy", "loss", "counts"))
@dataclasses.dataclass(frozen=True)
class ClassMetrics:
    """Per-class accuracy and mean loss on one split (numpy arrays of length K)."""

    accuracy: np.ndarray
    loss: np.ndarray
    counts: np.ndarray
    overall_accuracy: float
    overall_loss: float

    def to_dict(self) -> dict:
        return io.to_jsonable(self)


@functools.lru_cache(maxsize=64)
def _eval_fn(apply, num_classes: int):
    def f(params, x, y, m):
        logits = apply(params, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        onehot = jax.nn.one_hot(y, num_classes) * m[:, None]
        return onehot.T @ correct, onehot.T @ losses, onehot.sum(0)

    return jax.jit(f)


@functools.lru_cache(maxsize=64)
def _predict_fn(apply):
    return jax.jit(lambda params, xb: jnp.argmax(apply(params, xb), -1))


def predict(apply, params, x, *, batch_size: int = 1024) -> np.ndarray:
    """The predicted class of every sample of x (an array or a pytree of arrays), in chunks."""
    f = _predict_fn(apply)
    x = checks.as_inputs(x, "x")
    n = checks.num_inputs(x)
    chunks = kernels.pad_chunks(x, np.zeros(n, np.int32), batch_size)
    out = [
        np.asarray(f(params, xb))[np.asarray(mb) > 0] for xb, _, mb in kernels.iter_chunks(chunks)
    ]
    return np.concatenate(out)


def evaluate(apply, params, x, y, num_classes: int, *, batch_size: int = 1024) -> ClassMetrics:
    """Per-class accuracy and loss of ``apply(params, ·)`` on (x, y), in fixed-size chunks."""
    f = _eval_fn(apply, num_classes)
    chunks = kernels.pad_chunks(checks.as_inputs(x, "x"), np.asarray(y), batch_size)
    acc = np.zeros(num_classes)
    loss = np.zeros(num_classes)
    cnt = np.zeros(num_classes)
    for xb, yb, m in kernels.iter_chunks(chunks):
        a, l_, c = f(params, xb, yb, m)
        acc += np.asarray(a, np.float64)
        loss += np.asarray(l_, np.float64)
        cnt += np.asarray(c, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ClassMetrics(acc / cnt, loss / cnt, cnt.astype(int), float(acc.sum() / cnt.sum()),
            float(loss.sum() / cnt.sum()))
