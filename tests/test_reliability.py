"""Determinism, resumable stages, a run killed mid-search, and property-based checks."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import examples, tiny_classification
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pareto_jax import influence, kernels, models, pareto, pipeline, train

SMALL = pipeline.RunConfig(
    train=train.TrainConfig(epochs=4, batch_size=128, learning_rate=0.05, weight_decay=1e-3),
    retrain_epochs=2)


def _run(cfg, out):
    return pipeline.run(
        pipeline.dataclasses.replace(cfg, out_dir=str(out)), progress=False, out=io.StringIO()
    )


def _arrays(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.npz")):
        with np.load(f) as z:
            for k in z.files:
                out[f"{f.relative_to(folder)}:{k}"] = z[k]
    return out


def _jsons(folder: Path, names) -> dict:
    return {n: json.loads((folder / n).read_text()) for n in names}


def test_same_seed_gives_bitwise_identical_results(tmp_path):
    _run(SMALL, tmp_path / "a")
    _run(SMALL, tmp_path / "b")
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    assert a.keys() == b.keys() and any("P.npz" in k for k in a) and any("weights" in k for k in a)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    names = ["train/metrics.json", "retrain/metrics.json", "program/program.json",
        "ceiling/ceiling.json", "baselines/baselines.json"]
    assert _jsons(tmp_path / "a", names) == _jsons(tmp_path / "b", names)


@pytest.mark.slow  # (the suite's time budget)
def test_rerun_skips_finished_stages_and_config_changes_invalidate_downstream(tmp_path):
    s1 = _run(SMALL, tmp_path)
    assert s1["stages_skipped"] == []
    s2 = _run(SMALL, tmp_path)
    assert s2["stages_run"] == [] and set(s2["stages_skipped"]) == {"train", "influence", "ceiling",
        "program", "retrain", "baselines"}
    assert s2["test_accuracy"] == s1["test_accuracy"]
    s3 = _run(pipeline.dataclasses.replace(SMALL, alpha=0.8), tmp_path)
    assert s3["stages_run"] == ["program", "retrain"]
    s4 = _run(pipeline.dataclasses.replace(SMALL, alpha=0.8, retrain_epochs=3), tmp_path)
    assert s4["stages_run"] == ["program", "retrain", "baselines"
    ]  # the step is chosen by retraining that many epochs (the baselines' too)
    s4b = _run(pipeline.dataclasses.replace(SMALL, alpha=0.8, retrain_epochs=3, steps=()), tmp_path)
    assert s4b["stages_run"] == ["program", "retrain", "baselines"]
    s4c = _run(pipeline.dataclasses.replace(SMALL, alpha=0.8, retrain_epochs=4, steps=()), tmp_path)
    assert s4c["stages_run"] == [
        "retrain", "baselines"
    ]  # without the step choice, only retraining depends on it
    s5 = _run(
        pipeline.dataclasses.replace(
            SMALL, train=pipeline.dataclasses.replace(SMALL.train, epochs=5)
        ),
        tmp_path,
    )
    assert s5["stages_run"] == ["train", "influence", "ceiling", "program", "retrain",
        "baselines"]


def test_interrupted_stage_is_redone(tmp_path):
    cfg = pipeline.dataclasses.replace(SMALL, steps=(1.0,))  # (one step: fewer retrainings)
    _run(cfg, tmp_path)
    (tmp_path / "influence" / "stage.json").unlink()  # as if killed before the marker was written
    s = _run(cfg, tmp_path)
    # a stage that runs again clears the markers after it: what depended on it is recomputed too
    assert s["stages_run"] == ["influence", "ceiling", "program", "retrain", "baselines"]


CMD = [sys.executable, "-m", "pareto_jax.cli", "run", "--epochs", "4", "--search", "--population",
    "6", "--generations", "6", "--retrain-epochs", "2", "--no-progress"]


# a real SIGKILL of the CLI (45 s); resumption itself: test_search_resumes_from_its_checkpoint
@pytest.mark.slow
def test_run_killed_mid_search_resumes_to_the_same_result(tmp_path):
    ref = tmp_path / "uninterrupted"
    subprocess.run(CMD + ["--out", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed"
    p = subprocess.Popen(CMD + ["--out", str(out)], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        states = list((out / "search").glob("state_*.json")) if (out / "search").exists() else []
        if states:
            try:
                g = json.loads(states[0].read_text())["next_generation"]
            except (json.JSONDecodeError, OSError):
                g = 0
            if g >= 2:
                os.killpg(p.pid, signal.SIGKILL)
                killed_at = g
                break
        time.sleep(0.05)
    p.wait()
    assert killed_at is not None and killed_at < 6, "the search was not caught mid-way"
    assert not (out / "search" / "stage.json").exists()
    # every artifact left behind parses (atomic writes: nothing half-written)
    for f in out.rglob("*.json"):
        json.loads(f.read_text())
    r = subprocess.run(CMD + ["--out", str(out)], check=True, capture_output=True, text=True)
    assert "[train] finished earlier" in r.stdout and "[influence] finished earlier" in r.stdout
    prog_ref = json.loads((ref / "search" / "program.json").read_text())
    prog = json.loads((out / "search" / "program.json").read_text())
    for p_ in (prog, prog_ref
    ):  # wall-clock seconds per generation are the only expected difference
        for h in p_["history"]:
            h.pop("seconds")
    assert prog == prog_ref
    assert len(prog["history"]) == 6
    a, b = _arrays(ref), _arrays(out)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert json.loads((ref / "retrain" / "metrics.json").read_text()) == json.loads(
        (out / "retrain" / "metrics.json").read_text()
    )


# ----------------------------------------------------------------------------- properties


@settings(max_examples=examples(4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(12, 60), d=st.integers(1, 5), k=st.integers(2, 4), seed=st.integers(0, 10_000),
    wd=st.sampled_from([1e-2, 1e-1]))
def test_property_closed_form_equals_dense_generic(n, d, k, seed, wd):
    with jax.enable_x64(True):
        x, y = tiny_classification(n=max(n, 2 * k), d=d, k=k, seed=seed)
        xv, yv = tiny_classification(n=3 * k, d=d, k=k, seed=seed + 1)
        apply, params = models.functional(models.make_model("linear", (d,), k))
        rng = np.random.default_rng(seed)
        params = jax.tree_util.tree_map(
            lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.3), params
        )
        loss_fn = models.per_sample_loss(apply)
        a = influence.linear_category_influence(
            params, x, y, xv, yv, num_classes=k, weight_decay=wd
        ).P
        b = influence.category_influence(loss_fn, params, x, y, xv, yv, num_classes=k,
            weight_decay=wd, config=influence.InfluenceConfig.exact()).P
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12 * np.abs(b).max())


@settings(max_examples=examples(4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(8, 40), hidden=st.integers(1, 6), k=st.integers(2, 4),
    seed=st.integers(0, 10_000), chunk=st.integers(1, 50))
def test_property_forward_mode_equals_per_sample(n, hidden, k, seed, chunk):
    with jax.enable_x64(True):
        x, y = tiny_classification(n=max(n, k), d=3, k=k, seed=seed)
        apply, params = models.functional(
            models.make_model("mlp", (3,), k, hidden=(hidden,), seed=seed)
        )
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        loss_fn = models.per_sample_loss(apply)
        theta = kernels.flatten(loss_fn, params).theta
        U = jnp.asarray(np.random.default_rng(seed).normal(size=(k, theta.size)))
        a = influence.influence_from_solutions(
            loss_fn, params, U, x, y, method="jvp", chunk_size=chunk
        )
        b = influence.influence_from_solutions(
            loss_fn, params, U, x, y, method="per_sample", chunk_size=7
        )
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@settings(max_examples=examples(8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.sampled_from([30, 120]), k=st.sampled_from([2, 4]), seed=st.integers(0, 10_000),
    alpha=st.floats(0.0, 1.0), rho=st.sampled_from([None, 0.1, 0.5]))
def test_property_program_is_feasible_or_reports_why(n, k, seed, alpha, rho):
    rng = np.random.default_rng(seed)
    P = rng.normal(size=(n, k)) * 10.0 ** rng.integers(-6, 1)
    r = pareto.solve_reweighting(P, [0], alpha, rho=rho)
    ref = pareto.solve_reweighting(P, [0], alpha, rho=rho, solver="highs")
    assert r.status == ref.status
    if r.status == 0:
        lo, hi = pareto.ReweightConfig(rho=rho).bounds
        assert r.w.min() >= lo and r.w.max() <= hi
        assert np.all(P.T @ r.w >= alpha * P.sum(0) - 1e-9 * np.abs(P).sum(0))
        assert r.max_violation <= 1e-9
    else:
        assert r.w is None and r.status == pareto.Status.INFEASIBLE
