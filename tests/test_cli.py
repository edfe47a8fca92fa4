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
    assert set(s["stages_run"]) == {"train", "influence", "ceiling", "program", "retrain",
        "baselines"}
    # the step: chosen on validation among the candidates by (fitness, mean target gain)
    cands = s["program"]["step_candidates"]
    best = max(cands, key=lambda t: (float(cands[t]["fitness"]), cands[t]["target_gain"]))
    assert float(best) == s["program"]["step"]
    # the report of the finished run folder
    assert cli.main(["report", str(tmp_path / "r")]) == 0
    rep = (tmp_path / "r" / "report" / "report.md").read_text()
    assert "McNemar p" in rep and "Ceiling test" in rep and "beyond noise" in rep
    figs = json.loads((tmp_path / "r" / "report" / "report.json").read_text())["figures"]
    assert {"change.png", "weights.png", "influence_correlation.png", "frontier.png"} <= set(figs)
    assert all((tmp_path / "r" / "report" / f).exists() for f in figs)
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize(
    "args, match",
    [(["run", "--dataset", "imagenet"], "invalid choice"),
        (["run", "--epochs", "x"], "invalid int"), (["run", "--dataset", "cifar10"], "path"),
        (["run", "--dataset", "cifar10", "--path", "/nonexistent/dir"], "not a folder"),
        (["run", "--lr", "-1"], "flag --lr"), (["run", "--alpha", "2"], "flag --alpha"),
        (["run", "--targets", "3,99"], "--targets"), (["run", "--rho", "-1"], "flag --rho"),
        (["run", "--dataset", "npz", "--path", "/nonexistent.npz"], "existing .npz"),
        (["run", "--dataset", "emotion", "--path", "/nonexistent/emotion"], "no file"),
        (["run", "--devices", "0"], "positive integer or 'all'"),
        (["run", "--devices", "64", "--epochs", "1"], "num_devices"),
        (["run", "--distributed", "--epochs", "1"], "PARETO_JAX_COORDINATOR=host:port")],
)
def test_bad_arguments_exit_2_with_message(args, match, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "pareto_jax.cli", *args, "--out", str(tmp_path / "o")],
        capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert match in p.stderr
    assert not (tmp_path / "o").exists(), "a bad argument must fail before any work is written"


@pytest.mark.parametrize(
    "args, match",
    [(["--alpha", "1.5"], "flag --alpha"), (["--lr", "0"], "flag --lr"),
        (["--epochs", "0"], "flag --epochs"), (["--targets", "12"], "--targets"),
        (["--batch-size", "0"], "flag --batch-size"),
        (["--weight-decay", "-1"], "flag --weight-decay"), (["--w-max", "0"], "flag --w-max"),
        (["--population", "1", "--search"], "flag --population"),
        (["--generations", "0"], "flag --generations"),
        (["--retrain-epochs", "0"], "flag --retrain-epochs"), (["--hidden", "0"], "flag --hidden"),
        (["--steps", "0,1"], "flag --steps"), (["--dataset", "npz"], "flag --path")],
)
def test_bad_flags_fail_before_any_work_in_process(args, match, tmp_path, capsys):
    """The checks in-process (fast): exit 2, the flag named, nothing trained, nothing written."""
    rc = cli.main(["run", *args, "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_version_help_defaults_and_default_run_folder(tmp_path, capsys, monkeypatch):
    from pareto_jax import __version__

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "(default: 0.05)" in capsys.readouterr().out  # --lr's default is shown
    a = cli.build_parser().parse_args(["run"])
    b = cli.build_parser().parse_args(["run", "--model", "mlp"])
    c = cli.build_parser().parse_args(["run", "--lr", "0.01"])
    names = {cli.default_out(x) for x in (a, b, c)}
    assert len(names) == 3 and cli.default_out(a) == cli.default_out(
        cli.build_parser().parse_args(["run"])
    )
    assert cli.default_out(a).startswith("runs/digits-linear-")


@pytest.mark.slow  # (the suite's time budget)
def test_npz_dataset_through_the_cli(tmp_path, capsys):
    """Your own features: x, y and class names in one .npz; and predefined splits."""
    import os
    import stat

    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    f = tmp_path / "mine.npz"
    np.savez(f, x=d.data[:600].astype(np.float32) / 16, y=d.target[:600],
        class_names=np.array([f"digit{k}" for k in range(10)]))
    rc = cli.main(
        ["run", "--dataset", "npz", "--path", str(f), "--epochs", "3", "--retrain-epochs", "1",
            "--out", str(tmp_path / "r"), "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "digit3" in out and "McNemar p" in out
    assert "beyond noise" in out
    um = os.umask(0)
    os.umask(um)
    for art in ("config.json", "summary.json", "influence/P.npz"):  # not mkstemp's 0600
        assert stat.S_IMODE(os.stat(tmp_path / "r" / art).st_mode) == 0o666 & ~um, art
    from pareto_jax import data

    g = tmp_path / "split.npz"
    np.savez(g, x_train=d.data[:300], y_train=d.target[:300], x_val=d.data[300:400],
        y_val=d.target[300:400], x_test=d.data[400:500], y_test=d.target[400:500])
    s = data.load_npz(g)
    assert (len(s.train), len(s.val), len(s.test)) == (300, 100, 100) and s.class_names[3] == "3"


def test_infeasible_program_exits_4(tmp_path, capsys):
    # with every weight at most 0.5 and α = 1, class k needs Σ_i w_i P[i, k] >= Σ_i P[i, k]:
    # impossible when the beneficial samples outweigh twice the harmful ones, as they do for
    # every class of a trained model (checked below on the P the run wrote). In process, so
    # that it reuses the compilations of the run above (a subprocess took 12-23 s)
    rc = cli.main(
        ["run", "--epochs", "3", "--alpha", "1.0", "--rho", "0", "--w-max", "0.5", "--no-progress",
            "--out", str(tmp_path / "o")]
    )
    import numpy as np

    P = np.load(tmp_path / "o" / "influence" / "P.npz")
    P = P[P.files[0]]
    pos, total = np.clip(P, 0, None).sum(0), P.sum(0)
    assert np.any(0.5 * pos < total - 1e-12)  # so the program is infeasible
    err = capsys.readouterr().err
    assert rc == 4, err
    assert "infeasible" in err
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["program"]["status"] == 2


def test_per_class_mcnemar_and_the_harm_sentence():
    """Exact McNemar per class against scipy's exact binomial test (an independent reference),
    and the sentence says WORSE exactly when a drop is beyond noise."""
    import numpy as np
    from scipy.stats import binomtest

    from pareto_jax import pipeline

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    plain = rng.uniform(size=120) < 0.8
    rew = plain.copy()
    rew[(y == 0) & ~plain] = True  # class 0: the re-weighted model fixes all of its errors
    flip = np.flatnonzero((y == 2) & plain)[:9]  # class 2: nine new errors
    rew[flip] = False
    after = {
        "test_correct": {"reweighted": rew.astype(int).tolist(),
            "unweighted": plain.astype(int).tolist()}
    }
    p = pipeline.class_mcnemar(after, y, 3)
    for k in range(3):
        m = y == k
        b, c = int((plain & ~rew & m).sum()), int((~plain & rew & m).sum())
        ref = 1.0 if b + c == 0 else binomtest(c, b + c, 0.5).pvalue
        assert p[k] == pytest.approx(ref, rel=1e-12), k
    change = np.array([(rew & (y == k)).mean() - (plain & (y == k)).mean() for k in range(3)])
    text = pipeline.harm_sentence(["a", "b", "c"], change, p, ["a"])
    assert "WORSE" in text and "class c" in text and p[2] < 0.05
    calm = pipeline.harm_sentence(
        ["a", "b", "c"], np.array([0.02, 0.0, -0.02]), [0.5, 1.0, 0.5], ["a"]
    )
    assert "No class got worse" in calm and "WORSE" not in calm


def test_improve_table_aligns_long_method_names():
    from pareto_jax import experiments

    row = {"target_test_points": [1.0, -2.5], "worst_other_test_points": -3.0}
    block = {"targets": [3, 8], "target_names": ["3", "8"],
        "rows": {"unweighted": row, "class_balanced, val-matched": row}}
    lines = experiments.format_improve_table(block, [str(k) for k in range(10)]).splitlines()[1:]
    assert len({len(line) for line in lines}) == 1, lines  # every row as wide as the header


@pytest.mark.parametrize(
    "args, flag",
    [(["--noise", "1.5"], "--noise"), (["--population", "1"], "--population"),
        (["--rounds", "0"], "--rounds")],
)
def test_improve_flags_fail_fast(args, flag, tmp_path, capsys):
    assert cli.main(["improve", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "o").exists()
