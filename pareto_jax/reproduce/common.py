"""What the reproductions share: the reference figures, the linear refit, the report writer."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import io, models, train

REFERENCE = {"synthetic_rounds": "0.92/0.84 → 0.99/0.98 → 0.99/0.99 → 1.0/1.0",
    "deletion_spearman": "−0.75 to −0.92 (CIFAR-10, STL-10, Emotion, AG News)"}


@functools.lru_cache(maxsize=8)
def linear_model(shape, K):
    """(apply, loss_fn, initial params) of a linear softmax model, one per shape: the refits of
    a sweep share one loss function, hence one compiled L-BFGS program."""
    apply, params = models.functional(models.make_model("linear", shape, K))
    return apply, models.per_sample_loss(apply), params


def fit_linear(x, y, K, wd, *, weights=None, init=None, normalizer="weights"):
    apply, loss_fn, params = linear_model(tuple(x.shape[1:]), K)
    params = jax.tree_util.tree_map(
        lambda p: jnp.asarray(p, jnp.float64), params if init is None else init
    )
    p, it, gn = train.fit_lbfgs(train.Objective(loss_fn, wd, normalizer), params,
        x.astype(np.float64), y, weights=weights, max_iter=2000, tol=1e-8)
    return apply, loss_fn, p


def write(out_dir: Path, name: str, res: dict, md: list[str], out) -> None:
    io.write_json(out_dir / f"{name}.json", res)
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    print(text, file=out)
    print(f"wrote {out_dir / 'report.md'}", file=out)
