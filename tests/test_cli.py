import json
import subprocess
import sys

import pytest

from pareto_jax import cli


def test_run_writes_run_folder(tmp_path, capsys):
    rc = cli.main(["run", "--epochs", "3", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "overall test accuracy" in out and "ceiling test" in out
    m = json.loads((tmp_path / "r" / "train" / "metrics.json").read_text())
    assert len(m["test"]["accuracy"]) == 10 and m["test"]["overall_accuracy"] > 0.5
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["epochs"] == 3
    assert (tmp_path / "r" / "train" / "checkpoints" / "epoch_0003.npz").exists()
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["program"]["status"] == 0 and s["program"]["max_violation"] <= 1e-9
    assert set(s["stages_run"]) == {"train", "influence", "ceiling", "program", "retrain"}


@pytest.mark.parametrize("args, match", [
    (["run", "--dataset", "imagenet"], "invalid choice"),
    (["run", "--epochs", "x"], "invalid int"),
    (["run", "--dataset", "cifar10"], "path"),
    (["run", "--dataset", "cifar10", "--path", "/nonexistent/dir"], "not a folder"),
    (["run", "--lr", "-1"], "learning_rate"),
    (["run", "--alpha", "2"], "alpha"),
    (["run", "--targets", "3,99"], "targets"),
    (["run", "--rho", "-1"], "rho"),
    (["run", "--dataset", "emotion", "--path", "/nonexistent/emotion"], "no file"),
    (["run", "--devices", "0"], "positive integer or 'all'"),
    (["run", "--devices", "64", "--epochs", "1"], "num_devices"),
])
def test_bad_arguments_exit_2_with_message(args, match, tmp_path):
    p = subprocess.run([sys.executable, "-m", "pareto_jax.cli", *args, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert match in p.stderr


def test_infeasible_program_exits_4(tmp_path):
    # with every weight at most 0.5 and α = 1, class k needs Σ_i w_i P[i, k] >= Σ_i P[i, k]:
    # impossible when the beneficial samples outweigh twice the harmful ones, as they do for
    # every class of a trained model (checked below on the P the run wrote)
    p = subprocess.run([sys.executable, "-m", "pareto_jax.cli", "run", "--epochs", "2", "--alpha", "1.0",
                        "--rho", "0", "--w-max", "0.5", "--no-progress", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    import numpy as np
    P = np.load(tmp_path / "o" / "influence" / "P.npz")
    P = P[P.files[0]]
    pos, total = np.clip(P, 0, None).sum(0), P.sum(0)
    assert np.any(0.5 * pos < total - 1e-12)  # so the program is infeasible
    assert p.returncode == 4, p.stderr
    assert "infeasible" in p.stderr
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["program"]["status"] == 2
