import io
import json
import subprocess
import sys

import numpy as np
import pytest

from pareto_jax import reproduce


def _check_report(folder, figures):
    assert (folder / "report.md").exists()
    text = (folder / "report.md").read_text()
    for name in figures:
        png = folder / name
        assert png.exists() and png.stat().st_size > 5000, name
        assert png.with_suffix(".json").exists(), name
        assert f"]({name})" in text, name


@pytest.mark.slow  # (the suite's time budget)
def test_synthetic_quick(tmp_path):
    r = reproduce.reproduce_synthetic(str(tmp_path), quick=True, out=io.StringIO())
    _check_report(
        tmp_path,
        ["separable_boundary.png", "separable_influence.png", "separable_rounds.png",
            "overlapping_boundary.png", "overlapping_influence.png"],
    )
    sep = r["separable"]
    assert sep["ceiling"]["improvable"]
    # every joint-negative sample of the separable case is a flipped one
    assert sep["joint_negative_that_are_flipped"] == sep["regions"]["joint-negative"] > 0
    tr = np.asarray(sep["rounds_train_accuracy"])
    assert np.all(tr[-1] >= tr[0])  # removal rounds do not lower per-class training accuracy
    assert r["overlapping"]["t_star_relative"] < sep["t_star_relative"]


# both slow (a 1,000-sample retraining sweep on digits; AG News 15 s): the suite's time budget
@pytest.mark.slow  # (the suite's time budget)
@pytest.mark.parametrize("dataset", ["digits", "ag_news"])
def test_deletion_quick(tmp_path, dataset):
    r = reproduce.reproduce_deletion(dataset, str(tmp_path), quick=True, out=io.StringIO())
    _check_report(
        tmp_path,
        ["scatter.png", "influence_beneficial.png", "accuracy_beneficial.png",
            "composition_detrimental.png"],
    )
    assert r["spearman_all"] < -0.3  # removing beneficial samples costs accuracy, and the reverse
    comp = np.asarray(r["label_composition"]["beneficial"])
    assert comp.sum(1).tolist() == [comp.sum(1)[0]] * comp.shape[0]  # same set size per class


# experiment-scale (a search and its retrainings); the search itself is tested in test_search
@pytest.mark.slow
def test_frontier_quick(tmp_path):
    r = reproduce.reproduce_frontier(str(tmp_path), quick=True, out=io.StringIO())
    _check_report(tmp_path, ["direct.png", "frontier.png"])
    d = r["direct"]
    assert set(d["rows"]) >= {"search (PARETO-LP-GA)", "unweighted", "class_balanced",
        "trim_negative", "topk_upweight"}
    assert set(d["matched_t"]) == {"class_balanced", "trim_negative", "topk_upweight",
        "fixed_alpha_lp"} - (set() if "fixed_alpha_lp" in d["rows"] else {"fixed_alpha_lp"})
    for name, t in d["matched_t"].items():
        assert 0 < t <= 1 and f"{name}, val-matched" in d["rows"]
    saved = json.loads((tmp_path / "improve.json").read_text())
    assert saved["direct"]["targets"] == d["targets"]
    assert r["frontier"]["pearson_predicted_vs_actual"] > 0.9


def test_cli_reproduce_bad_arguments(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pareto_jax.cli", "reproduce", "nonsense"],
        capture_output=True, text=True)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "pareto_jax.cli", "reproduce", "deletion", "--dataset", "cifar10",
            "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "path" in p.stderr


@pytest.mark.slow  # experiment-scale: three rounds of search
def test_iterated_direct_improvement_never_gives_back_validation(tmp_path):
    from pareto_jax import checks, experiments, pipeline, search

    scfg = search.SearchConfig(
        population=6, generations=2, retrain="converge", alpha_range=(0.95, 1.0)
    )
    cfg = experiments.ImproveConfig(data=pipeline.DataConfig(name="digits"), search=scfg, rounds=2,
        course_correction=False, frontier=False, out_dir=str(tmp_path))
    r = experiments.run_improve(cfg, progress=False, out=io.StringIO())
    it = r["direct"]["iterated"]
    assert it["rounds_requested"] == 2 and len(it["log"]) >= 1
    prev = np.asarray(r["direct"]["ref_val"])
    t = r["direct"]["targets"]
    for g in it["log"]:
        if not g["kept"]:
            break
        va = np.asarray(g["val_acc"])
        assert np.all(va >= prev - 1e-12)  # no validation class worse than the round before
        assert np.all(va[t] > prev[t])  # and every target better
        prev = va
    if it["rounds_kept"]:
        assert f"search, iterated ({it['rounds_kept']} rounds)" in r["direct"]["rows"]
    with pytest.raises(checks.InputError, match="rounds"):
        experiments.run_improve(
            pipeline.dataclasses.replace(cfg, model=pipeline.ModelConfig(kind="mlp")),
            progress=False, out=io.StringIO())


def test_plot_functions_return_figures_and_leave_the_backend_alone(tmp_path):
    import matplotlib

    from pareto_jax import plots

    before = matplotlib.get_backend()
    rng = np.random.default_rng(0)
    G = rng.uniform(size=(12, 3))
    figs = [
        plots.frontier_plot(G, G.max(0), 0, 1, tmp_path / "f.png", class_names=["a", "b", "c"]),
        plots.bars(["m1", "m2"], rng.normal(size=(2, 3)), None, title="t", ylabel="y",
            class_names=list("abc")),
        plots.heatmap(rng.normal(size=(3, 3)), None, title="t", class_names=list("abc"), xlabel="x",
            ylabel="y", cbar="c"),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs)
    assert matplotlib.get_backend() == before
    assert (
        figs[0].get_label() == "f.png"
        and (tmp_path / "f.png").exists()
        and (tmp_path / "f.json").exists()
    )


def test_deletion_model_choice_is_checked(tmp_path):
    from pareto_jax import checks

    with pytest.raises(checks.InputError, match="model"):
        reproduce.reproduce_deletion("digits", str(tmp_path), model="resnet", out=io.StringIO())
    with pytest.raises(checks.InputError, match="digits and mnist5k"):
        reproduce.reproduce_deletion(
            "ag_news", str(tmp_path), model="cnn", quick=True, out=io.StringIO()
        )


@pytest.mark.slow  # a CNN, and (for "cnn") its EK-FAC influence and 2K retrainings
@pytest.mark.parametrize("model", ["cnn-features", "cnn"])
def test_deletion_with_deep_features_quick(tmp_path, model):
    r = reproduce.reproduce_deletion(
        "digits", str(tmp_path), quick=True, model=model, out=io.StringIO()
    )
    _check_report(tmp_path, ["scatter.png", "influence_beneficial.png"])
    assert r["model"] == model and r["spearman_all"] < -0.3
