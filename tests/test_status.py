"""`flywheel status` against a real MLflow server (Postgres + GCS emulator + basic auth): two registered
models, their aliases and deployments, and what one real monitor process logged for each.

The registered versions are a real trained model (the serving fixture's Fashion-MNIST run: its model
directory and reference copied into a run on the server); their deployments are recorded by
`Registry.mark_deployed`, the call `release` makes; the drift windows and the retrain request come
from a real `MonitorGroup` tick on real captured embeddings (inverted images for one model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_monitor_multi import _capture

A, B = "status-fashion", "status-twin"


def _status(stack, tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.env(), "PYTHONPATH": str(REPO / "src"), "FLYWHEEL_HOME": str(tmp_path / "home"),
           "COLUMNS": "220"}
    return subprocess.run([sys.executable, "-m", "flywheel", "status", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _copy_real_model(serving_models, client, tmp_path: Path) -> str:
    """A run on the server holding the serving fixture's v1: its model directory and its reference."""
    import mlflow

    serving_models.settings()
    local = mlflow.MlflowClient()
    v1 = local.get_model_version(serving_models.name, serving_models.versions[0])
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{serving_models.name}/{v1.version}",
                                                    dst_path=str(tmp_path / "model"))
    ref_dir = mlflow.artifacts.download_artifacts(run_id=v1.run_id, artifact_path="reference",
                                                  dst_path=str(tmp_path / "ref"))
    exp = client.get_experiment_by_name("status-test") or client.get_experiment(
        client.create_experiment("status-test"))
    run = client.create_run(exp.experiment_id, tags={"dataset": "fashion-mnist", "git_commit": "ab" * 20,
                                                     "flywheel.project": str(REPO), "flywheel.project_dir": "."})
    client.log_artifacts(run.info.run_id, model_dir, "model")
    client.log_artifacts(run.info.run_id, ref_dir, "reference")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.integration
def test_status_lists_models_aliases_deployments_windows_and_retrains(tracking_stack, serving_models,
                                                                     fashion_embeddings, tmp_path):
    from flywheel.core.registry import Registry
    from flywheel.monitoring.group import MonitorGroup
    from flywheel.monitoring.service import MonitorConfig
    from flywheel.monitoring.triggers import PolicyConfig

    settings = tracking_stack.settings(work_dir=tmp_path / "work", model_name=A)
    registry = Registry(settings)
    client = registry.client
    run_id = _copy_real_model(serving_models, client, tmp_path)
    for name, copies in ((A, 2), (B, 1)):
        client.create_registered_model(name)
        for _ in range(copies):
            client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id)
    registry.mark_deployed(A, "1", "prod", "torchserve http://127.0.0.1:8080")  # what release records
    registry.set_alias(A, "candidate", "2")
    registry.mark_deployed(B, "1", "dev", "docker ssh://deploy@node-1")

    before = _status(tracking_stack, tmp_path, "--json", "--model", A, "--model", B)
    assert before.returncode == 0, before.stderr[-2000:]
    models = {m["name"]: m for m in json.loads(before.stdout)["models"]}
    assert models[A]["windows"] == [] and models[A]["last_retrain"] is None  # nothing monitored yet

    caps = str(tmp_path / "captures")
    _capture(caps, A, fashion_embeddings.shifted["invert"], "1", 100)  # 2 drifting windows of 50
    _capture(caps, B, fashion_embeddings.clean, "1", 50)  # 1 window
    configs = [MonitorConfig(model=A, capture_uri=caps, env="prod", state_dir=tmp_path / "state" / A, window=50,
                             settle_s=0.0, dataset="fashion-mnist"),
               MonitorConfig(model=B, capture_uri=caps, env="dev", state_dir=tmp_path / "state" / B, window=50,
                             settle_s=0.0, dataset="fashion-mnist")]
    group = MonitorGroup.build(configs, settings, [], [PolicyConfig(consecutive=1), PolicyConfig(consecutive=3)])
    try:
        outcomes = {o.model: o for o in group.tick()}
    finally:
        group.close()
    assert [r.trigger for r in outcomes[A].results] == ["drift", None], outcomes[A]
    assert [r.index for r in outcomes[B].results] == [1], outcomes[B]

    out = _status(tracking_stack, tmp_path, "--json")  # every registered model
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    assert doc["tracking_uri"] == tracking_stack.uri
    models = {m["name"]: m for m in doc["models"]}
    assert {A, B} <= set(models)
    a, b = models[A], models[B]
    assert a["latest_version"] == "2" and b["latest_version"] == "1"
    assert [(x["alias"], x["version"], x["deployed_to"]) for x in a["aliases"]] == \
        [("candidate", "2", None), ("prod", "1", "torchserve http://127.0.0.1:8080")]
    assert a["aliases"][1]["deployed_at"].startswith("20") and a["aliases"][0]["deployed_at"] is None
    assert [(x["alias"], x["version"], x["deployed_to"]) for x in b["aliases"]] == \
        [("dev", "1", "docker ssh://deploy@node-1")]
    (wa,) = a["windows"]
    assert (wa["env"], wa["version"], wa["window"], wa["drift"]) == ("prod", "1", 2, True)
    assert wa["at"] and wa["last_drift_at"] and wa["p_value"] < 0.01
    (wb,) = b["windows"]
    assert (wb["env"], wb["version"], wb["window"]) == ("dev", "1", 1) and wb["at"]
    retrain = a["last_retrain"]
    assert (retrain["reason"], retrain["env"], retrain["version"], retrain["window"]) == ("drift", "prod", "1", 1)
    assert retrain["run_id"] == wa["run_id"] and b["last_retrain"] is None

    table = _status(tracking_stack, tmp_path, "--model", A)
    assert table.returncode == 0, table.stderr[-2000:]
    assert A in table.stdout and B not in table.stdout
    for text in ("candidate", "prod", "torchserve http://127.0.0.1:8080", "#2 v1 drift", "drift (prod v1)"):
        assert text in table.stdout, table.stdout

    missing = _status(tracking_stack, tmp_path, "--model", "no-such-model")
    assert missing.returncode == 2 and "no registered model 'no-such-model'" in " ".join(missing.stderr.split())
