"""benchmarks/drift.py's quick version on the second example component (examples/shapes-rgb): the
benchmark takes the embedding dimension, the preprocessing (RGB, 48x48 centre crop) and the images
(its logged test set) from the model version alone, runs every cheap detector and the MMD peer on the
same windows, and writes one row per (detector, family, severity, window, contamination).

Trains the component for one short epoch through its own train.py (real MLflow store), so it is a
reliability test (about a minute of CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flywheel.monitoring.drift import NoveltyDriftDetector, prediction_drift, window_decision_p
from tests.conftest import REPO

ROW_FIELDS = {"detector", "family", "severity", "window", "contamination", "held_out", "detection", "false_alarms"}


def _bench():
    spec = importlib.util.spec_from_file_location("drift_bench", REPO / "benchmarks" / "drift.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["drift_bench"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.reliability
def test_quick_benchmark_runs_on_the_rgb_component(tmp_path):
    import mlflow

    from flywheel.core.shifts import FAMILIES, SEVERITIES

    home = tmp_path / "home"
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "FLYWHEEL_MODEL_NAME": "shapes-rgb"}
    env.pop("MLFLOW_RUN_ID", None)
    out = subprocess.run([sys.executable, "train.py", "--epochs", "1", "--n", "400", "--test-n", "600",
                          "--register", "false", "--data-dir", str(tmp_path / "data")],
                         cwd=REPO / "examples" / "shapes-rgb", env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    tracking = env["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    models = client.search_logged_models(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    assert len(models) == 1
    uri = f"models:/{models[0].model_id}"

    bench = _bench()
    result = bench.main(["--quick", "--model-uri", uri, "--tracking-uri", tracking, "--windows", "50",
                         "--detectors", "flywheel", "ks-bonf", "bbsd", "mmd",
                         "--json-out", str(tmp_path / "drift.json"), "--no-readme"])
    saved = json.loads((tmp_path / "drift.json").read_text())["figures"]
    assert saved["meta"]["embedding_dim"] == 64  # ShapesNet's `embed`, from the component spec
    rows = saved["rows"]
    assert rows == result["rows"] and all(ROW_FIELDS <= set(r) for r in rows)
    keys = {(r["detector"], r["family"], r["severity"], r["window"], r["contamination"]) for r in rows}
    assert len(keys) == len(rows) == 4 * len(FAMILIES) * len(SEVERITIES) * len(bench.CONTAMINATION)
    assert {r["held_out"] for r in rows if r["family"] in bench.HELD_OUT} == {True}
    assert {r["held_out"] for r in rows if r["family"] in bench.TUNING} == {False}
    assert all(0 <= r["detection"] <= 1 and 0 <= r["false_alarms"] <= 1 for r in rows)
    # The one-epoch model is weak, so this checks the pipeline, not detection quality: with every sample
    # shifted at the strongest severity most families are flagged in every window by some detector, and
    # the detector the monitor runs stays near its level on clean windows.
    strongest = {}
    for r in rows:
        if r["contamination"] == 1.0 and r["severity"] == 3:
            strongest[r["family"]] = max(strongest.get(r["family"], 0.0), r["detection"])
    assert sum(v == 1.0 for v in strongest.values()) >= len(FAMILIES) // 2, strongest
    # Its clean windows all come from one pool of 180 images against reference draws of 120, so a few pool
    # images beyond every reference draw's scores (3 beyond the whole reference pool's grain, expected 1.5)
    # move whole windows: a loose bound here, and the level itself on windows drawn from the reference pool
    # outside each draw (exchangeable with it), over many draws and windows.
    assert max(r["false_alarms"] for r in rows if r["detector"] == "flywheel") <= 0.1
    pools, rng, alarms = bench.build_pools(uri, tracking, None, bench.QUICK), np.random.default_rng(0), []
    for _ in range(20):
        draw = rng.choice(len(pools.ref_emb), len(pools.ref_emb) // 2, replace=False)
        rest = np.setdiff1d(np.arange(len(pools.ref_emb)), draw)
        det = NoveltyDriftDetector().fit(pools.ref_emb[draw], input_reference=bench._ref_features(pools, draw),
                                         texture=pools.texture, directions=pools.directions,
                                         subspace=pools.subspace, grain=pools.grain)
        assert det.CHANNELS[-1] == "grain"  # every image channel, as the monitor fits this version's reference
        u = det.window_inputs(pools.ref_emb[rest], bench._ref_features(pools, rest))
        windows = np.stack([rng.choice(len(rest), 50, replace=False) for _ in range(200)])
        alarms.append(np.mean(det.window_p_values({c: v[windows] for c, v in u.items()})[0] < bench.ALPHA))
    assert np.mean(alarms) <= 0.02, alarms  # alpha 0.01; 0.007 when written
    section = bench.render(saved)
    assert "held-out" in section and "| canny-edges |" in section


def test_the_monitor_row_is_what_the_monitor_computes():
    """The benchmark's `flywheel-monitor` row is service.py `_test_window`'s decision: the embedding
    p-value and the prediction-drift chi-square p-value combined by `window_decision_p`, in the batch
    path as in the one-window path."""
    bench = _bench()
    rng = np.random.default_rng(5)

    def probs(n, shift=0.0):
        logits = rng.normal(size=(n, 4)) * 2
        logits[:, 0] += shift
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    ref_emb, ref_prob = np.abs(rng.normal(size=(300, 8))) + 0.1, probs(300)
    pool_emb = np.concatenate([np.abs(rng.normal(size=(200, 8))) + 0.1, np.abs(rng.normal(size=(60, 8))) * 2])
    pool_prob = np.concatenate([probs(200), probs(60, shift=4.0)])
    adapter = bench.Adapter("flywheel-monitor", seed=0)
    adapter.fit(ref_emb, ref_prob)
    windows = np.stack([rng.choice(len(pool_emb), 50, replace=False) for _ in range(5)])
    expected = [window_decision_p(adapter.det.test(pool_emb[w]).p_value,
                                  prediction_drift(np.bincount(pool_prob[w].argmax(1), minlength=4),
                                                   np.bincount(ref_prob.argmax(1), minlength=4)).p_value)
                for w in windows]
    np.testing.assert_allclose([adapter.p(pool_emb[w], pool_prob[w]) for w in windows], expected)
    np.testing.assert_allclose(bench.Batch(adapter, pool_emb, pool_prob).p(windows), expected)


def test_the_monitor_row_with_the_input_channel_is_what_the_monitor_computes():
    """With input statistics (the detector's third channel) the batch path and the one-window path
    still give `_test_window`'s p-value: `test(embeddings, input statistics)` and the chi-square."""
    bench = _bench()
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(4), size=560).astype(np.float32)
    ref_emb, ref_inp = np.abs(rng.normal(size=(300, 8))) + 0.1, rng.normal(size=(300, 5))
    pool_emb = np.abs(rng.normal(size=(260, 8))) + 0.1  # the embedding does not move ...
    pool_inp = np.concatenate([rng.normal(size=(200, 5)), rng.normal(size=(60, 5)) + 3])  # ... the inputs do
    adapter = bench.Adapter("flywheel-monitor", seed=0)
    adapter.fit(ref_emb, probs[:300], ref_inp)
    assert adapter.det.CHANNELS == ("direction", "magnitude", "input")
    windows = np.stack([rng.choice(len(pool_emb), 50, replace=False) for _ in range(5)])
    pool_prob = probs[300:]
    expected = [window_decision_p(adapter.det.test(pool_emb[w], pool_inp[w]).p_value,
                                  prediction_drift(np.bincount(pool_prob[w].argmax(1), minlength=4),
                                                   np.bincount(probs[:300].argmax(1), minlength=4)).p_value)
                for w in windows]
    np.testing.assert_allclose([adapter.p(pool_emb[w], pool_prob[w], pool_inp[w]) for w in windows], expected)
    np.testing.assert_allclose(bench.Batch(adapter, pool_emb, pool_prob, pool_inp).p(windows), expected)


def test_level_check_scores_an_extra_channel_as_the_detector_scores_its_own():
    """benchmarks/drift_level.py (and drift_noise_channel.py) decide a candidate channel with the
    detector's own statistic and null: given a channel's conformal p-values, `channel_p_values` is
    what `window_p_values` gives that channel."""
    spec = importlib.util.spec_from_file_location("drift_level", REPO / "benchmarks" / "drift_level.py")
    level = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(level)
    from flywheel.monitoring.drift import NoveltyDriftDetector

    rng = np.random.default_rng(7)
    ref_emb, ref_inp = np.abs(rng.normal(size=(300, 8))) + 0.1, rng.normal(size=(300, 5))
    det = NoveltyDriftDetector(simulations=2000).fit(ref_emb, input_reference=ref_inp)
    emb, inp = np.abs(rng.normal(size=(200, 8))) + 0.1, np.concatenate([rng.normal(size=(150, 5)),
                                                                        rng.normal(size=(50, 5)) + 2])
    u = det.p_values(emb, inp)
    idx = np.stack([rng.choice(200, 50, replace=False) for _ in range(20)])
    _, per = det.window_p_values({c: v[idx] for c, v in u.items()})
    for channel in det.CHANNELS:
        np.testing.assert_array_equal(level.channel_p_values(det, u[channel][idx]), per[channel])
    assert (per["input"] < 0.01).any() and (per["direction"] > 0.01).all()
