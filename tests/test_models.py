import jax
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from pareto_jax import models
from pareto_jax.checks import InputError


@pytest.mark.parametrize("kind", ["linear", "mlp", "cnn"])
def test_functional_matches_module_and_per_sample_loss(kind):
    m = models.make_model(kind, (64,), 10, image_shape=(8, 8, 1), seed=1)
    apply, params = models.functional(m)
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    y = np.array([0, 3, 9, 2])
    np.testing.assert_allclose(apply(params, x), m(x), rtol=1e-6)
    lf = models.per_sample_loss(apply)
    got = jax.vmap(lf, (None, 0, 0))(params, x, y)
    ref = optax.softmax_cross_entropy_with_integer_labels(m(x), y)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # params are plain arrays in nested dicts: ravel/unravel round-trips
    flat, unravel = ravel_pytree(params)
    np.testing.assert_allclose(apply(unravel(flat), x), m(x), rtol=1e-6)


def test_frozen_features_then_linear_head():
    m = models.make_model("mlp", (64,), 10, hidden=(16,), seed=0)
    apply, params = models.functional(m)
    feats = models.functional_features(m)
    x = np.random.default_rng(0).normal(size=(37, 64)).astype(np.float32)
    f = models.frozen_features(feats, params, x, batch_size=8)
    assert f.shape == (37, 16)
    head = models.linear_head_params(params["head"]["kernel"], params["head"]["bias"])
    lin_apply, _ = models.functional(models.make_model("linear", (16,), 10))
    np.testing.assert_allclose(lin_apply(head, f), apply(params, x), rtol=1e-5, atol=1e-6)


def test_bad_model_arguments():
    with pytest.raises(InputError, match="model"):
        models.make_model("resnet", (4,), 2)
    with pytest.raises(InputError, match="image_shape"):
        models.make_model("cnn", (10,), 2)
