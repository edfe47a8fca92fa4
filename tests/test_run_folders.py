"""Run folders under a careful user and hostile input (issue 30): new data under the same name,
damaged, edited or missing artifacts, a folder of the user's own files, a run that failed, a
read-only finished folder. Each answers with a recompute (the log says which file and why), a
clear error naming the argument and the fix, or the right answer: never a stale result, a raw
traceback or lost user files."""

import io
import json
import re

import numpy as np
import pytest

from pareto_jax import checks, cli, pipeline, train
from pareto_jax.config import DataConfig, ReweightConfig, RunConfig

TC = train.TrainConfig(epochs=3, batch_size=64, learning_rate=0.05, weight_decay=1e-3)


def _npz(path, seed, n=150, **extra):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 4)) + y[:, None]
    np.savez(path, x=x, y=y, **extra)


def _run(tmp_path, data_path, **kw):
    cfg = RunConfig(data=DataConfig(name="npz", path=str(data_path)), train=TC, retrain_epochs=1,
        steps=(), out_dir=str(tmp_path / "run"), **kw)
    log = io.StringIO()
    s = pipeline.run(cfg, progress=False, out=log)
    return s, log.getvalue()


def test_new_data_under_the_same_name_is_a_new_run(tmp_path):
    f = tmp_path / "data.npz"
    _npz(f, 0)
    a, _ = _run(tmp_path, f)
    _npz(f, 1, n=210)  # other samples, another N, the same file name
    b, log = _run(tmp_path, f)
    assert "skipped" not in log and set(b["stages_run"]) == {"train", "influence", "ceiling",
        "program", "retrain", "baselines"}
    assert b["influence"]["n_train"] != a["influence"]["n_train"]
    c, log = _run(tmp_path, f)  # and unchanged data is reused
    assert c["stages_run"] == [] and c["test_accuracy"] == b["test_accuracy"]


@pytest.mark.parametrize(
    "artifact, damage",
    [("influence/P.npz", "truncate"), ("influence/P.npz", "edit"), ("ceiling/ceiling.json", "edit"),
        ("program/weights.npz", "edit"), ("program/weights.npz", "delete"),
        ("train/metrics.json", "truncate"), ("program/stage.json", "truncate")],
)
def test_a_damaged_artifact_is_recomputed_never_used(tmp_path, artifact, damage):
    f = tmp_path / "data.npz"
    _npz(f, 0)
    ref, _ = _run(tmp_path, f)
    p = tmp_path / "run" / artifact
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])
    elif damage == "delete":
        p.unlink()
    elif p.suffix == ".json":  # an edit that keeps the file valid JSON
        d = json.loads(p.read_text())
        d["edited"] = True
        if "t_star" in d:
            d["t_star"], d["improvable"] = -1.0, not d["improvable"]
        p.write_text(json.dumps(d))
    else:
        z = dict(np.load(p))
        z = {k: (v * -7.0 if v.dtype.kind == "f" else v) for k, v in z.items()}  # sign-flipped, 7x
        np.savez(p, **z)
    got, log = _run(tmp_path, f)
    stage = artifact.split("/")[0]
    if not (artifact.endswith("stage.json") and damage == "edit"):  # (an extra key in the marker
        assert stage in got["stages_run"], (
            log
        )  # leaves every artifact intact: reusing them is right)
    assert got["test_accuracy"] == ref["test_accuracy"] and got["ceiling"] == ref["ceiling"]
    assert "running the stage again" in log or damage == "delete" or artifact.endswith("stage.json")


def test_out_refuses_a_folder_of_the_users_own_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "summary.json").write_text('{"my": "results"}')
    with pytest.raises(checks.InputError, match="not a pareto-jax run"):
        pipeline.run(RunConfig(train=TC, out_dir=str(mine)), progress=False, out=io.StringIO())
    assert json.loads((mine / "config.json").read_text()) == {"my": "settings"}
    assert json.loads((mine / "summary.json").read_text()) == {"my": "results"}
    assert cli.main(["run", "--out", ""]) == 2 and "--out" in capsys.readouterr().err


def test_report_refuses_a_run_that_failed_and_never_shows_an_older_chain(tmp_path, capsys):
    f = tmp_path / "data.npz"
    _npz(f, 0)
    _run(tmp_path, f)
    run_dir = str(tmp_path / "run")
    assert cli.main(["report", run_dir]) == 0
    # every weight must drop by 0.5 on a budget of 1: infeasible (certified)
    with pytest.raises(pipeline.ProgramFailed):
        _run(tmp_path, f, reweight=ReweightConfig(w_max=0.5, rho=0.6, budget=1.0))
    capsys.readouterr()
    assert cli.main(["report", run_dir]) == 2
    assert "status" in capsys.readouterr().err  # not the previous run's table


def test_class_names_are_shown_as_written_in_the_report(tmp_path):
    """Names holding Markdown and HTML neither break report.md's table nor inject markup."""
    f = tmp_path / "data.npz"
    names = ["a|b", "<script>x</script>", "**c**_[d](e)"]
    _npz(f, 0, class_names=np.array(names))
    _run(tmp_path, f, targets=(0, 2))
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    per_class = md.split("## Yardstick")[0]  # (the yardstick's table is one row per method)
    rows = [line for line in per_class.splitlines() if line.startswith("| ")]
    bars = [len(re.findall(r"(?<!\\)\|", r)) for r in rows]  # unescaped bars: the cell borders
    assert len(rows) == 2 + 3 and set(bars) == {7}, rows  # header, rule, one row per class
    assert "<script>" not in md and "&lt;script&gt;x&lt;/script&gt;" in md
    assert r"a\|b" in md and r"\*\*c\*\*\_\[d\](e)" in md


def test_a_read_only_finished_run_folder_reruns(tmp_path, monkeypatch):
    """A rerun of a finished run writes nothing: every write into the folder raises (as in a
    read-only folder, which the suite's root user cannot make), and the run still answers."""
    from pareto_jax import io as pio

    f = tmp_path / "data.npz"
    _npz(f, 0)
    ref, _ = _run(tmp_path, f)
    root = str(tmp_path / "run")
    for name in ("write_json", "save_pytree", "save_arrays"):
        orig = getattr(pio, name)

        def refuse(path, *a, _orig=orig, **k):
            if str(path).startswith(root):
                raise PermissionError(13, "Permission denied", str(path))
            return _orig(path, *a, **k)

        monkeypatch.setattr(pio, name, refuse)
    got, log = _run(tmp_path, f)
    assert got["stages_run"] == [] and got["test_accuracy"] == ref["test_accuracy"]
