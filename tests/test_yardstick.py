"""The main job's yardstick: simple baselines given the job's own step rule, retrained and
reported beside the reweighting on test (`pareto_jax.yardstick`)."""

import dataclasses
import io
import json

import numpy as np
import pytest

from pareto_jax import pipeline, report, train

SMALL = pipeline.RunConfig(
    train=train.TrainConfig(epochs=4, batch_size=128, learning_rate=0.05, weight_decay=1e-3),
    retrain_epochs=2)


def test_each_baseline_is_retrained_at_its_step_and_reported_on_test(tmp_path):
    """The reported test accuracy of a baseline equals an independent retraining: its weights
    written here from their definition (class counts; the top 10 % of Σ_targets P doubled),
    scaled by the step the job recorded, retrained from the run's checkpoint; the table's target
    gains and the difference follow from it; `pareto-jax report` shows the same table."""
    cfg = dataclasses.replace(SMALL, out_dir=str(tmp_path / "run"))
    out = io.StringIO()
    summary = pipeline.run(cfg, progress=False, out=out)
    root = tmp_path / "run"
    rows = json.loads((root / "baselines" / "baselines.json").read_text())
    assert set(rows) == {"class_balanced", "topk_upweight", "trim_negative"}
    job = pipeline.make_job(cfg, io.StringIO())
    s = job.splits
    state = train.load_checkpoint(train.checkpoint_path(root / "train", cfg.train.epochs),
        train.init_state(job.params0, job.train_config))
    P = np.load(root / "influence" / "P.npz")["P"]
    names = list(s.class_names)
    targets = [names.index(t) for t in summary["targets"]]
    counts = np.bincount(s.train.y, minlength=s.num_classes)
    cb = 1.0 / counts[s.train.y]
    topk = np.ones(len(s.train.y))
    topk[np.argsort(-P[:, targets].sum(1), kind="stable")[: round(0.1 * len(topk))]] = 2.0
    after = json.loads((root / "retrain" / "metrics.json").read_text())
    plain = np.asarray(after["unweighted"]["test"]["accuracy"])
    plain_loss = np.asarray(after["unweighted"]["test"]["loss"])
    for name, w in (("class_balanced", cb * len(cb) / cb.sum()), ("topk_upweight", topk)):
        t = rows[name]["step"]
        assert t in cfg.steps
        params = train.train(job.loss_fn, None, s.train.x, s.train.y, job.train_config,
            weights=1.0 + t * (w - 1.0), state=state, epochs=cfg.retrain_epochs).params
        m = train.evaluate(job.apply, params, s.test.x, s.test.y, s.num_classes)
        ref = np.asarray(m.accuracy)
        np.testing.assert_allclose(rows[name]["test_accuracy"], ref, rtol=0, atol=1e-12)
        # (the loss tells these params apart where a few epochs change no prediction)
        np.testing.assert_allclose(rows[name]["test_loss"], m.loss, rtol=1e-6)
        assert not np.allclose(m.loss, plain_loss, rtol=1e-6), name  # the weights act
        gain = 100 * float(np.mean((ref - plain)[targets]))
        assert summary["yardstick"]["rows"][name]["target_gain"] == pytest.approx(gain)
    y = summary["yardstick"]
    best = max(rows, key=lambda n: y["rows"][n]["target_gain"])
    assert y["best_baseline"] == best
    assert y["difference"] == pytest.approx(
        y["rows"]["reweighted"]["target_gain"] - y["rows"][best]["target_gain"])
    text = out.getvalue()
    assert "yardstick" in text and f"({best}): {y['difference']:+.1f} points" in text
    md = report.write_report(root).read_text()  # `pareto-jax report`
    assert "## Yardstick" in md and f"({best}): {y['difference']:+.1f} points" in md
    # (turned off, there is no stage and no table: tests/test_product.py runs with --no-baselines)
