"""Several models, one monitor process: each its own windows, policy, triggers and state; one /metrics
with `model`/`env` labels; a model that fails (no alias yet) does not stop the others; the retrain
request names the project and commit of the version being replaced.

Real throughout: the serving fixture's registry (a model trained on Fashion-MNIST with its logged
reference, registered under three names), captures written by the real CaptureWriter with real
embeddings (clean test images for one model, inverted ones for the other), the real Monitor and the
`flywheel monitor` process, Prometheus exposition fetched over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from flywheel.contracts.capture import CaptureWriter
from tests.conftest import REPO, free_port

ENV = "multi"  # our own alias: other tests move dev/prod/monitored on the same registry
TWIN = "fashion-twin"  # the same real run, registered under a second name
UNALIASED = "fashion-unaliased"  # registered, but no version holds ENV
SOURCE = {"flywheel.project": "https://git.example.org/vision/twin.git", "flywheel.project_dir": "models/twin",
          "git_commit": "0123456789abcdef0123456789abcdef01234567"}


def _capture(uri: str, model: str, embeddings: np.ndarray, version: str, n: int) -> None:
    # Named 5 s in the past: past the monitor's 2 s settle time without waiting for it.
    writer = CaptureWriter(uri, flush_every=32, flush_seconds=0.1, clock=lambda: time.time() - 5)
    for i in range(n):
        writer.submit({"prediction_id": f"{model}-{i:05d}", "model": model, "version": version, "ts": time.time(),
                       "embedding": embeddings[i % len(embeddings)], "label_index": i % 10, "traffic": "live"})
    writer.close()
    assert writer.written == n, writer.last_error


def _register_models(serving_models) -> dict[str, str]:
    """fashion-classifier v1, and its run registered again as TWIN (with SOURCE tags) and UNALIASED;
    ENV → v1 on the first two only. Returns model → version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    serving_models.settings()
    client = mlflow.MlflowClient()
    v1 = client.get_model_version(serving_models.name, serving_models.versions[0])
    out = {serving_models.name: v1.version}
    for name in (TWIN, UNALIASED):
        try:
            client.create_registered_model(name)
        except MlflowException:  # the other test of this module registered it already
            pass
        existing = client.search_model_versions(f"name='{name}'")
        mv = existing[0] if existing else client.create_model_version(
            name, v1.source, run_id=v1.run_id, tags=SOURCE if name == TWIN else None)
        out[name] = str(mv.version)
    client.set_registered_model_alias(serving_models.name, ENV, out[serving_models.name])
    client.set_registered_model_alias(TWIN, ENV, out[TWIN])
    try:
        client.delete_registered_model_alias(UNALIASED, ENV)
    except MlflowException:
        pass
    return out


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _series(text: str, name: str, **labels) -> float | None:
    """The value of the sample `name{labels}` (labels in Prometheus' sorted order), None when absent."""
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.integration
def test_one_monitor_two_models_drift_on_one_fires_only_its_trigger(serving_models, fashion_embeddings, tmp_path):
    from flywheel.core.config import Settings
    from flywheel.monitoring.group import MonitorGroup
    from flywheel.monitoring.service import MonitorConfig
    from flywheel.monitoring.triggers import LocalCommand, PolicyConfig

    versions = _register_models(serving_models)
    fashion = serving_models.name
    settings = Settings.from_env(tracking_uri=serving_models.tracking_uri, work_dir=serving_models.work_dir,
                                 model_name=fashion).apply()
    caps = str(tmp_path / "captures")
    _capture(caps, fashion, fashion_embeddings.clean, versions[fashion], 100)  # 2 clean windows
    _capture(caps, TWIN, fashion_embeddings.shifted["invert"], versions[TWIN], 200)  # 4 drifting windows
    requests = tmp_path / "requests"
    requests.mkdir()
    # One action for every model: the template names the model (and could name its project and commit).
    action = LocalCommand(f"sh -c 'printf %s \"$FLYWHEEL_RETRAIN_PAYLOAD\" > {requests}/$0.json' {{model}}")
    configs = [MonitorConfig(model=m, capture_uri=caps, env=ENV, state_dir=tmp_path / "state" / m, window=50,
                             settle_s=0.0, dataset="fashion-mnist") for m in (fashion, TWIN, UNALIASED)]
    group = MonitorGroup.build(configs, settings, [action], [PolicyConfig(consecutive=2, cooldown_s=3600)] * 3)
    port = free_port()
    http = group.metrics.serve(port, "127.0.0.1")
    try:
        first = {o.model: o for o in group.tick()}
        text = _scrape(port)
    finally:
        group.close()
        http[0].shutdown()
        http[0].server_close()

    # each model its own windows; only the drifting one asked for a retrain
    assert [r.index for r in first[fashion].results] == [1, 2] and first[fashion].error is None
    assert [r.index for r in first[TWIN].results] == [1, 2, 3, 4], first[TWIN].error
    assert all(r.drift for r in first[TWIN].results), [r.p_value for r in first[TWIN].results]
    assert [r.trigger for r in first[TWIN].results] == [None, "drift", None, None]  # one per episode
    assert not any(r.trigger for r in first[fashion].results)
    # the model with no alias failed alone, with the registry's reason
    assert first[UNALIASED].results == [] and f"no version '{ENV}' of registered model '{UNALIASED}'" in \
        first[UNALIASED].error
    assert sorted(p.name for p in requests.iterdir()) == [f"{TWIN}.json"]
    payload = json.loads((requests / f"{TWIN}.json").read_text())
    assert payload["model"] == TWIN and payload["reason"] == "drift" and payload["version"] == versions[TWIN]
    assert (payload["project"], payload["project_dir"], payload["commit"]) == tuple(SOURCE.values())
    assert payload["env"] == ENV and payload["details"]["window"] == 2

    # one endpoint, every model's series under its own labels
    for model, windows in ((fashion, 2), (TWIN, 4)):
        assert _series(text, "flywheel_drift_windows_total", model=model, env=ENV) == windows, text
        assert _series(text, "flywheel_captures_read_total", model=model, env=ENV, kind="monitored") == windows * 50
        assert _series(text, "flywheel_monitor_up", model=model, env=ENV) == 1.0
        assert _series(text, "flywheel_drift_window_size", model=model, env=ENV) == 50
        assert _series(text, "flywheel_drift_p_value", model=model, env=ENV, test="combined") is not None
    assert _series(text, "flywheel_retrain_triggers_total", model=TWIN, env=ENV, reason="drift") == 1.0
    assert _series(text, "flywheel_retrain_triggers_total", model=fashion, env=ENV, reason="drift") is None
    assert _series(text, "flywheel_drift_detected", model=TWIN, env=ENV) == 1.0
    assert _series(text, "flywheel_monitor_up", model=UNALIASED, env=ENV) == 0.0
    assert _series(text, "flywheel_monitor_errors_total", model=UNALIASED, env=ENV) == 1.0
    assert _series(text, "flywheel_monitor_errors_total", model=fashion, env=ENV) is None

    # each model's state in its own dir; the failing one recovers once its alias exists
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(UNALIASED, ENV, versions[UNALIASED])
    try:
        _capture(caps, UNALIASED, fashion_embeddings.clean[500:], versions[UNALIASED], 50)
        group = MonitorGroup.build(configs, settings, [action], [PolicyConfig(consecutive=2)] * 3)
        try:
            again = {o.model: o for o in group.tick()}
        finally:
            group.close()
    finally:
        mlflow.MlflowClient().delete_registered_model_alias(UNALIASED, ENV)
    assert again[UNALIASED].error is None and [r.index for r in again[UNALIASED].results] == [1]
    assert again[fashion].results == [] and again[TWIN].results == []  # nothing read twice
    runs = {json.loads((c.state_dir / "state.json").read_text())["run_id"] for c in configs}
    assert len(runs) == 3  # one MLflow run per model


@pytest.mark.integration
def test_monitor_process_with_a_config_file(serving_models, fashion_embeddings, tmp_path):
    """`flywheel monitor --config monitors.yaml` as a service: per-model windows, one /metrics, a model
    with no alias counted as failing while the others are monitored; SIGTERM stops it cleanly."""
    versions = _register_models(serving_models)
    fashion = serving_models.name
    caps, state = tmp_path / "captures", tmp_path / "state"
    _capture(str(caps), fashion, fashion_embeddings.clean, versions[fashion], 100)  # 2 windows of 50
    _capture(str(caps), TWIN, fashion_embeddings.clean[200:], versions[TWIN], 90)  # 3 windows of 30
    config = tmp_path / "monitors.yaml"
    config.write_text(f"defaults:\n  window: 50\n  env: {ENV}\nmonitors:\n  - model: {fashion}\n"
                      f"  - model: {TWIN}\n    window: 30\n    consecutive: 5\n  - model: {UNALIASED}\n")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MLFLOW_TRACKING_URI": serving_models.tracking_uri,
           "FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_MODEL_NAME": "ignored-with-config"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "monitor", "--config", str(config), "--capture-uri",
                             str(caps), "--state-dir", str(state), "--metrics-port", str(port), "--interval", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    text = ""
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, text
            try:
                text = _scrape(port)
            except OSError:
                text = ""
            if (_series(text, "flywheel_drift_windows_total", model=fashion, env=ENV) == 2
                    and _series(text, "flywheel_drift_windows_total", model=TWIN, env=ENV) == 3
                    and (_series(text, "flywheel_monitor_errors_total", model=UNALIASED, env=ENV) or 0) >= 2):
                break
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # what systemd sends
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert _series(text, "flywheel_drift_window_size", model=fashion, env=ENV) == 50
    assert _series(text, "flywheel_drift_window_size", model=TWIN, env=ENV) == 30
    assert _series(text, "flywheel_monitor_up", model=UNALIASED, env=ENV) == 0.0
    assert f"monitor of {UNALIASED}@{ENV} failed: no version '{ENV}'" in " ".join(err.split())
    for model in (fashion, TWIN):  # one state dir per model under --state-dir, each released its lock
        assert (state / f"{model}-{ENV}" / "state.json").is_file()
        assert not (state / f"{model}-{ENV}" / "monitor.lock.owner").exists()
    assert not (state / "state.json").exists()


def test_config_file_and_state_dir_errors_are_clear(tmp_path):
    from flywheel.core.errors import FlywheelError
    from flywheel.monitoring.group import monitor_state_dir
    from flywheel.monitoring.monitors_file import MonitorEntry, read_monitors_file

    base = MonitorEntry(model="default-model", window=100)
    good = tmp_path / "good.yaml"
    good.write_text("defaults: {alpha: 0.05, min-labelled: 40}\nmonitors:\n  - model: a\n  - {model: b, window: 20,"
                    " env: dev, state_dir: /var/lib/b}\n")
    a, b = read_monitors_file(good, base)
    assert (a.model, a.window, a.alpha, a.min_labelled, a.env) == ("a", 100, 0.05, 40, "prod")
    assert (b.model, b.window, b.alpha, b.env, b.state_dir) == ("b", 20, 0.05, "dev", Path("/var/lib/b"))
    for text, message in (("monitors:\n  - {model: a, windw: 3}\n", "unknown key 'windw'"),
                          ("monitors:\n  - {env: dev}\n", "monitors[0] needs `model:`"),
                          ("monitors: []\n", "needs a `monitors:` list"),
                          ("monitors:\n  - {model: a, window: many}\n", "window must be a int"),
                          ("monitors: [\n", "not valid YAML")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(FlywheelError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_monitors_file(bad, base)
    # one model keeps today's layout; several get a sub-dir each; a one-model dir is not silently shared
    assert monitor_state_dir(tmp_path / "s", tmp_path, "a", "prod", several=False) == tmp_path / "s"
    assert monitor_state_dir(None, tmp_path, "a", "prod", several=True) == tmp_path / "monitor" / "a-prod"
    assert monitor_state_dir(tmp_path / "s", tmp_path, "a", "prod", several=True) == tmp_path / "s" / "a-prod"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text("{}")
    with pytest.raises(FlywheelError, match="holds one model's monitor state"):
        monitor_state_dir(tmp_path / "s", tmp_path, "a", "prod", several=True)


def test_monitor_cli_names_every_failing_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FLYWHEEL_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "flywheel", "monitor", "--once", "--json", "--model", "nope",
                           "--model", "nada", "--capture-uri", str(tmp_path / "c")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "2 of 2 monitors failed: nope@prod: no version 'prod' of registered model 'nope'" in err, err
    doc = json.loads(proc.stdout)
    assert [(m["model"], m["windows"]) for m in doc["monitors"]] == [("nope", []), ("nada", [])]
    assert all("no version 'prod'" in m["error"] for m in doc["monitors"])
    assert sorted(p.name for p in (tmp_path / "monitor").iterdir()) == ["nada-prod", "nope-prod"]


def test_retrain_request_names_the_replaced_versions_project(github_api, tmp_path):
    """project/project_dir/commit come from the version's tags, else its run's, else ""; GitHub gets them
    at the top of a client_payload of at most 10 keys; command templates can name them."""
    from flywheel.core.config import Settings
    from flywheel.core.registry import Registry
    from flywheel.monitoring.service import version_source
    from flywheel.monitoring.triggers import GitHubDispatch, RetrainEvent, render_command

    settings = Settings.from_env(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", work_dir=tmp_path)
    registry = Registry(settings)
    client = registry.client
    exp = client.create_experiment("lineage", artifact_location=str(tmp_path / "artifacts"))
    tagged = client.create_run(exp, tags={"flywheel.project": "/srv/teams/rgb", "flywheel.project_dir": "examples/rgb",
                                          "git_commit": "feedbeef" * 5}).info.run_id
    bare = client.create_run(exp).info.run_id
    client.create_registered_model("rgb")
    for run_id, tags in ((tagged, None), (tagged, {"git_commit": "c0ffee00" * 5}), (bare, None)):
        client.create_model_version("rgb", f"runs:/{run_id}/model", run_id=run_id, tags=tags)
    assert version_source(registry, "rgb", "1") == {"project": "/srv/teams/rgb", "project_dir": "examples/rgb",
                                                    "commit": "feedbeef" * 5}
    assert version_source(registry, "rgb", "2")["commit"] == "c0ffee00" * 5  # the version's own tag first
    assert version_source(registry, "rgb", "3") == {"project": "", "project_dir": "", "commit": ""}
    assert version_source(registry, "rgb", "9") == {"project": "", "project_dir": "", "commit": ""}  # gone

    event = RetrainEvent(model="rgb", reason="drift", version="2", dataset="imagefolder", env="prod",
                         details={"window": 7}, **version_source(registry, "rgb", "2"))
    GitHubDispatch("acme/rgb", token="t0ken", api_url=github_api.url).fire(event)
    (req,) = github_api.requests
    payload = req["json"]["client_payload"]
    assert len(payload) <= 10  # GitHub caps client_payload at 10 top-level properties
    assert (payload["model"], payload["project"], payload["project_dir"], payload["commit"]) == \
        ("rgb", "/srv/teams/rgb", "examples/rgb", "c0ffee00" * 5)
    assert event.payload()["details"] == {"window": 7} and event.payload()["env"] == "prod"
    assert render_command("flywheel remote-train {project} --project-dir {project_dir} --commit {commit} "
                          "--model {model}", event) == \
        f"flywheel remote-train /srv/teams/rgb --project-dir examples/rgb --commit {'c0ffee00' * 5} --model rgb"
    blank = RetrainEvent(model="m x", reason="drift")
    assert render_command("run {project} {project_dir} {model}", blank) == "run '' . 'm x'"
