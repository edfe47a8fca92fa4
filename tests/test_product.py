"""The product's deep flows on the fast path: `pareto-jax run --model cnn` computes P by EK-FAC
unless told otherwise (`--influence`), on the run's own trained model."""

import json

import numpy as np
import pytest

from pareto_jax import cli, influence, models, setup, train
from pareto_jax.config import InfluenceConfig

ARGS = ["run", "--model", "cnn", "--epochs", "2", "--max-train", "200", "--retrain-epochs", "1",
    "--steps", "1", "--no-progress", "--no-baselines"]  # (the yardstick: tests/test_yardstick.py)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    rc = cli.main([*ARGS, "--out", str(out), *extra])
    assert rc == 0
    return out


def test_a_deep_run_computes_P_by_ekfac_unless_told_otherwise(tmp_path, capsys):
    r = _run(tmp_path, "r")
    assert not (r / "baselines").exists()  # --no-baselines: no yardstick stage
    assert "yardstick" not in json.loads((r / "summary.json").read_text())
    info = json.loads((r / "influence" / "influence.json").read_text())
    assert info["solver"] == "ekfac" and info["curvature"] == "gauss_newton"
    P = influence.InfluenceResult.load(r / "influence" / "P.npz").P
    # the same P from the run's trained CNN, computed here outside the pipeline
    rc = cli.run_config(cli.build_parser().parse_args(ARGS + ["--out", str(r)]))
    splits = setup.load_data(rc.data)
    built = setup.build(rc.model, splits)
    state = train.load_checkpoint(train.checkpoint_path(r / "train", 2),
        train.init_state(built.params, rc.train))
    ref = influence.category_influence(
        train.Objective.of(models.per_sample_loss(built.apply), rc.train), state.params,
        splits.train.x, splits.train.y, splits.val.x, splits.val.y, num_classes=10,
        model=built.module, config=InfluenceConfig(solver="ekfac"))
    np.testing.assert_allclose(P, ref.P, rtol=1e-4, atol=1e-6 * np.abs(ref.P).max())
    # --influence cg: the training is reused, P recomputed by Gauss-Newton CG
    capsys.readouterr()
    r2 = _run(tmp_path, "r2", "--influence", "cg")
    info = json.loads((r2 / "influence" / "influence.json").read_text())
    assert info["solver"] == "cg" and info["curvature"] == "gauss_newton"
    Pcg = influence.InfluenceResult.load(r2 / "influence" / "P.npz").P
    assert Pcg.shape == P.shape and not np.allclose(Pcg, P)


def test_influence_flag_is_refused_with_the_linear_model(capsys):
    assert cli.main(["run", "--influence", "cg", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--influence" in err and "closed form" in err
    with pytest.raises(SystemExit) as e:  # not a choice: argparse's answer
        cli.main(["run", "--model", "cnn", "--influence", "lissa"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
