import json
import subprocess
import sys

import pytest

from pareto_jax import cli


def test_run_writes_run_folder(tmp_path, capsys):
    rc = cli.main(["run", "--epochs", "3", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "overall test accuracy" in out and "class" in out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(m["test"]["accuracy"]) == 10 and m["test"]["overall_accuracy"] > 0.5
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["epochs"] == 3
    assert (tmp_path / "r" / "checkpoints" / "epoch_0003.npz").exists()


@pytest.mark.parametrize("args, match", [
    (["run", "--dataset", "imagenet"], "invalid choice"),
    (["run", "--epochs", "x"], "invalid int"),
    (["run", "--dataset", "cifar10"], "path"),
    (["run", "--dataset", "cifar10", "--path", "/nonexistent/dir"], "not a folder"),
    (["run", "--lr", "-1"], "learning_rate"),
])
def test_bad_arguments_exit_2_with_message(args, match, tmp_path):
    p = subprocess.run([sys.executable, "-m", "pareto_jax.cli", *args, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert match in p.stderr
