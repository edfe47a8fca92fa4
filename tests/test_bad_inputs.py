"""Bad inputs at every public boundary: each gets a clear error naming the argument, what was
got, what was expected and the fix (or, for an infeasible program, a status, never a wrong w).

`python tests/test_bad_inputs.py` prints the table of cases and messages.
"""

import numpy as np
import pytest

from pareto_jax import data, distributed, influence, models, pareto, search, train
from pareto_jax.checks import InputError, NumericalError

X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
Y = np.arange(30) % 3
APPLY, PARAMS = models.functional(models.make_model("linear", (4,), 3))
LOSS = models.per_sample_loss(APPLY)
PM = np.random.default_rng(1).normal(size=(40, 3))


def _plain_loss(p, x, y):  # the same loss, not written as an OutputLoss: no logits known
    return LOSS(p, x, y)


def _nan_grad_loss(p, x, y):
    import jax.numpy as jnp

    return LOSS(p, x, y) + jnp.sqrt(0.0 * jnp.sum(p["head"]["bias"] ** 2))


def _write(tmp, name, content):
    f = tmp / name
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return f


CASES = [
    ("labels out of range", lambda t: data.Dataset(X, Y + 5, ("a", "b", "c")), InputError, "label 7"
    ),
    ("negative labels", lambda t: data.Dataset(X, Y - 1, ("a", "b", "c")), InputError, "label -1"),
    ("NaN in features", lambda t: data.Dataset(np.where(X > 2, np.nan, X), Y, ("a", "b", "c")),
        InputError, "non-finite"),
    ("mismatched lengths", lambda t: data.Dataset(X, Y[:-1], ("a", "b", "c")), InputError,
        "29 labels"),
    ("one-hot labels", lambda t: data.Dataset(X, np.eye(3)[Y], ("a", "b", "c")), InputError, "1-D"),
    ("text features", lambda t: data.Dataset(np.array(["a"] * 30), Y, ("a", "b", "c")), InputError,
        "numeric"),
    (
        "negative sample weights",
        lambda t: train.train(
            LOSS, PARAMS, X, Y, train.TrainConfig(epochs=1), weights=-np.ones(30)
        ),
        InputError,
        "negative",
    ),
    ("weights of wrong length",
        lambda t: train.train(LOSS, PARAMS, X, Y, train.TrainConfig(epochs=1), weights=np.ones(3)),
        InputError, "shape"),
    (
        "weights all zero",
        lambda t: train.train(
            LOSS, PARAMS, X, Y, train.TrainConfig(epochs=1), weights=np.zeros(30)
        ),
        InputError,
        "summing to 0",
    ),
    (
        "NaN weights",
        lambda t: train.train(
            LOSS, PARAMS, X, Y, train.TrainConfig(epochs=1), weights=np.full(30, np.nan)
        ),
        InputError,
        "non-finite",
    ),
    ("learning rate <= 0", lambda t: train.TrainConfig(learning_rate=0.0), InputError,
        "learning_rate"),
    ("unknown optimizer", lambda t: train.TrainConfig(optimizer="rmsprop"), InputError, "optimizer"
    ),
    (
        "class absent from validation",
        lambda t: influence.category_influence(
            LOSS, PARAMS, X, Y, X[Y < 2], Y[Y < 2], num_classes=3, weight_decay=0.1
        ),
        InputError,
        r"class\(es\) \[2\]",
    ),
    (
        "validation features of another shape",
        lambda t: influence.category_influence(
            LOSS, PARAMS, X, Y, X[:, :2], Y, num_classes=3, weight_decay=0.1
        ),
        InputError,
        "x_val",
    ),
    (
        "NaN in gradients",
        lambda t: influence.category_influence(
            _nan_grad_loss, PARAMS, X, Y, X, Y, num_classes=3, weight_decay=0.1
        ),
        NumericalError,
        "class gradients",
    ),
    (
        "CG does not converge (throw=True)",
        lambda t: influence.category_influence(LOSS, PARAMS, X, Y, X, Y, num_classes=3,
            weight_decay=0.0,
            config=influence.InfluenceConfig(damping=0.0, max_steps=1, rtol=1e-12, throw=True)),
        NumericalError,
        "residual",
    ),
    ("negative damping", lambda t: influence.InfluenceConfig(damping=-1.0), InputError, "damping"),
    (
        "Gauss-Newton without apply",
        lambda t: influence.make_hvp(
            _plain_loss, PARAMS, X, Y, weight_decay=0.1, curvature="gauss_newton"
        ),
        InputError,
        "apply",
    ),
    ("NaN in P (ceiling test)", lambda t: pareto.ceiling_test(np.where(PM > 2, np.nan, PM)),
        InputError, "non-finite"),
    ("all-zero P", lambda t: pareto.ceiling_test(np.zeros((5, 2))), InputError, "all-zero"),
    ("alpha > 1", lambda t: pareto.solve_reweighting(PM, [0], 1.5), InputError, "alpha"),
    ("alpha of wrong length", lambda t: pareto.solve_reweighting(PM, [0], [0.5, 0.5]), InputError,
        "alpha"),
    ("target class out of range", lambda t: pareto.solve_reweighting(PM, [3], 0.5), InputError,
        "targets"),
    ("duplicate targets", lambda t: pareto.solve_reweighting(PM, [1, 1], 0.5), InputError,
        "distinct"),
    ("negative trust region", lambda t: pareto.ReweightConfig(rho=-0.1), InputError, "rho"),
    ("unknown LP solver", lambda t: pareto.ReweightConfig(solver="osqp"), InputError, "solver"),
    ("elite >= population", lambda t: search.SearchConfig(population=4, elite=4), InputError,
        "elite"),
    ("missing CIFAR-10 folder", lambda t: data.load_cifar10(t / "nope"), InputError, "path"),
    (
        "truncated STL-10 file",
        lambda t: (_write(t, "train_X.bin", b"\0" * 11), _write(t, "train_y.bin", b"\1"),
            data.load_stl10(t)),
        InputError,
        "multiple",
    ),
    ("AG News label 9", lambda t: data.load_ag_news(_write(t, "ag.csv", "9,a,b\n")), InputError,
        "labels 1..4"),
    ("Emotion unknown label", lambda t: data.load_emotion(_write(t, "e.txt", "hi;grumpy\n")),
        InputError, "grumpy"),
    ("split fractions leave no training data",
        lambda t: data.stratified_split(data.load_digits(), val_fraction=0.5, test_fraction=0.5),
        InputError, "training"),
    ("more devices than JAX sees", lambda t: distributed.make_mesh(10_000), InputError,
        "num_devices"),
    (
        "K-FAC without the model",
        lambda t: influence.category_influence(LOSS, PARAMS, X, Y, X, Y, num_classes=3,
            weight_decay=1e-3, config=influence.InfluenceConfig(solver="ekfac"),
            mesh=distributed.make_mesh(1)),
        InputError,
        "model",
    ),
]


@pytest.mark.parametrize("name, fn, err, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, fn, err, match, tmp_path):
    with pytest.raises(err, match=match) as e:
        fn(tmp_path)
    if err is InputError:
        msg = str(e.value)
        assert msg.startswith("argument `") and "expected" in msg and "Fix:" in msg, msg


def test_infeasible_program_is_a_status_not_a_wrong_w():
    P = -np.abs(PM)
    r = pareto.solve_reweighting(P, [0], 0.5, rho=0.1)
    assert r.status == pareto.Status.INFEASIBLE and r.w is None


if __name__ == "__main__":  # the table for the issue note
    import tempfile
    from pathlib import Path

    print("| bad input | error | message |\n|---|---|---|")
    for name, fn, err, _ in CASES:
        with tempfile.TemporaryDirectory() as d:
            try:
                fn(Path(d))
                msg = "(no error)"
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {e}"
        print(f"| {name} | {err.__name__} | {msg.splitlines()[0][:160].replace('|', '/')} |")
