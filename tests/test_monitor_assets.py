"""Monitor node assets parse and agree with the metric names the code exports; snapshot and CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, VENV_BIN

MONITOR = REPO / "deploy" / "monitor"


def _exported_metric_names() -> set[str]:
    from prometheus_client import generate_latest

    from flywheel.monitoring.metrics import Metrics

    m = Metrics("m", "prod")
    m.p_value.labels(model="m", env="prod", test="embedding").set(0.5)
    for g in (m.detected, m.window_size, m.lag, m.dropped, m.outbox, m.accuracy, m.version, m.up):
        g.labels(model="m", env="prod").set(1)
    m.class_fraction.labels(model="m", env="prod", class_index="0").set(0.1)
    m.windows.labels(model="m", env="prod").inc()
    m.triggers.labels(model="m", env="prod", reason="drift").inc()
    for g in (m.accuracy_alarm, m.accuracy_p, m.reference_accuracy):
        g.labels(model="m", env="prod").set(1)
    for g in (m.v_accuracy_alarm, m.v_detected, m.v_accuracy, m.v_accuracy_p, m.v_pending):
        g.labels(model="m", env="prod", version="1").set(1)
    text = generate_latest(m.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_prometheus_config_scrapes_torchserve_and_monitor():
    cfg = yaml.safe_load((MONITOR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert {"torchserve", "flywheel-monitor"} <= set(jobs)
    assert jobs["torchserve"]["authorization"]["type"] == "Bearer"  # TorchServe token auth stays on
    assert jobs["triton"]["metrics_path"] == "/metrics"  # Triton through its authenticating proxy
    assert jobs["triton"]["authorization"]["type"] == "Bearer"
    rules = yaml.safe_load((MONITOR / "alerts.yml").read_text())
    exported = _exported_metric_names()
    for rule in rules["groups"][0]["rules"]:
        assert any(name in rule["expr"] for name in exported), rule["expr"]


def test_grafana_dashboard_and_provisioning():
    dash = json.loads((MONITOR / "grafana/dashboards/flywheel.json").read_text())
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "errors", "drift p-value", "prediction distribution"):
        assert topic in titles
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    exported = _exported_metric_names()
    used = {name for name in exported if name in exprs}
    assert {"flywheel_drift_p_value", "flywheel_prediction_class_fraction", "flywheel_drift_detected"} <= used
    assert "ts_inference_requests_total" in exprs and "Requests5XX" in exprs
    for triton_metric in ("nv_inference_request_success", "nv_inference_request_failure",
                          "nv_inference_request_duration_us"):  # Triton's own names (tests/test_triton.py)
        assert triton_metric in exprs
    ds = yaml.safe_load((MONITOR / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])
    prov = yaml.safe_load((MONITOR / "grafana/provisioning/dashboards/flywheel.yml").read_text())
    assert prov["providers"][0]["options"]["path"]


def test_dockerfile_lints_clean():
    hadolint = VENV_BIN / "hadolint"
    proc = subprocess.run([str(hadolint), str(MONITOR / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_feedback_and_snapshot_roundtrip(tmp_path):
    from flywheel.contracts.capture import CaptureWriter
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import read_imagefolder

    store = str(tmp_path / "captures")
    writer = CaptureWriter(store, flush_seconds=0.1)
    rng = np.random.default_rng(0)
    for i in range(6):
        writer.submit({"prediction_id": f"p{i}", "model": "fashion-classifier", "version": "1", "ts": 0.0,
                       "image_png": encode_png(rng.integers(0, 255, (28, 28), dtype=np.uint8)),
                       "embedding": [0.0], "label_index": 0})
    writer.close()
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "PATH": str(VENV_BIN)}
    flywheel = str(VENV_BIN / "flywheel")

    def cli(*args):
        return subprocess.run([flywheel, *args], capture_output=True, text=True, env=env)

    from flywheel.contracts.capture import write_feedback
    from flywheel.core.errors import FlywheelError
    from flywheel.monitoring.snapshot import take_snapshot

    with pytest.raises(FlywheelError, match="nothing to snapshot"):
        take_snapshot(store, "fashion-classifier", tmp_path / "snaps")
    fb = cli("data", "feedback", "--capture-uri", store, "--model", "fashion-classifier", "p0=Bag", "p1=Coat", "p2=Bag")
    assert fb.returncode == 0, fb.stderr
    export = tmp_path / "export" / "Sandal"
    export.mkdir(parents=True)
    (export / "x.png").write_bytes(encode_png(np.zeros((28, 28), np.uint8)))
    first = cli("data", "snapshot", "--capture-uri", store, "--model", "fashion-classifier",
                "--labelled", str(tmp_path / "export"))
    assert first.returncode == 0, first.stderr
    assert "v1 (new)" in first.stdout
    snap_dir = Path(first.stdout.split(": ", 1)[1].splitlines()[0])
    meta = json.loads((snap_dir / "snapshot.json").read_text())
    assert meta["images"] == 4 and meta["per_class"] == {"Bag": 2, "Coat": 1, "Sandal": 1}
    images, labels, _, names = read_imagefolder(snap_dir, ("Bag", "Coat", "Sandal"))
    assert images.shape == (4, 28, 28) and sorted(labels.tolist()) == [0, 0, 1, 2]
    root = tmp_path / "home" / "snapshots"
    again = take_snapshot(store, "fashion-classifier", root, (tmp_path / "export",))
    assert not again.new and again.digest == meta["digest"] and again.version == 1  # same content, same version
    write_feedback(store, "fashion-classifier", {"p4": "Coat"})
    third = take_snapshot(store, "fashion-classifier", root, (tmp_path / "export",))
    assert third.new and third.version == 2 and third.images == 5
    with pytest.raises(FlywheelError, match="not classes"):
        take_snapshot(store, "fashion-classifier", root, class_names=("Bag",))


def test_monitor_cli_errors_are_clear(tmp_path):
    env = {"FLYWHEEL_HOME": str(tmp_path), "PATH": str(VENV_BIN)}
    proc = subprocess.run([str(VENV_BIN / "flywheel"), "monitor", "--once", "--model", "nope",
                           "--capture-uri", str(tmp_path / "c")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "no version 'prod' of registered model 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_monitor_once_cli_on_real_captures(monitored_torchserve, fashion_embeddings, tmp_path):
    """`flywheel monitor --once` as cron runs it, on traffic served by the real TorchServe."""
    import base64
    import time

    import mlflow

    from flywheel.contracts.preprocessing import encode_png

    server = monitored_torchserve
    mlflow.set_tracking_uri(server.tracking_uri)
    mlflow.MlflowClient().set_registered_model_alias(server.model, "monitored", server.version)
    start = time.time() - 1
    images = fashion_embeddings.clean_images[1900:2000]
    body = {"images": [base64.b64encode(encode_png(i)).decode() for i in images[:50]]}
    assert server.client.predict(server.model, body).status_code == 200
    body = {"images": [base64.b64encode(encode_png(i)).decode() for i in images[50:]]}
    assert server.client.predict(server.model, body).status_code == 200
    from tests.test_monitor_serving import _wait_captured

    _wait_captured(server.capture_uri, server.model, 100, start)
    state = tmp_path / "state"
    # first run: only this test's traffic (cursor from a key just before it)
    from flywheel.contracts.capture import batch_key
    from flywheel.core.files import atomic_write_json

    atomic_write_json(state / "state.json", {"cursor": batch_key(start)})
    env = {"FLYWHEEL_HOME": str(server.work_dir), "PATH": str(VENV_BIN), "MLFLOW_TRACKING_URI": server.tracking_uri,
           "HOME": str(tmp_path)}
    proc = subprocess.run([str(VENV_BIN / "flywheel"), "monitor", "--once", "--model", server.model, "--env",
                           "monitored", "--capture-uri", server.capture_uri, "--window", "50", "--state-dir",
                           str(state)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("window ")]
    assert len(lines) == 2, proc.stdout
