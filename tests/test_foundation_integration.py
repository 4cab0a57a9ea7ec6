"""Foundation end to end: `mlflow run`, the gate, torchrun, evaluation — against a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from flywheel.core.config import Settings
from tests.conftest import REPO, VENV_BIN
from tests.fixtures_core import train_digits

pytestmark = pytest.mark.integration


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def test_mlflow_run_train_entry_point_logs_everything(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    out = subprocess.run([str(VENV_BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager", "local",
                          "--experiment-name", "flywheel", "-P", "dataset=digits", "-P", "epochs=2",
                          "-P", "batch_size=32", "-P", "lr=0.005"],
                         env=_env(home, FLYWHEEL_MODEL_NAME="digits-mlproject",
                                  # sample system metrics every second: a digits run is over in seconds
                                  MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
                                  MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1"), capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)  # MLflow's default artifact root is ./mlruns
    assert out.returncode == 0, out.stderr[-3000:]
    Settings.from_env(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").apply()
    client = mlflow.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "digits" and run.data.params["epochs"] == "2"
    assert run.data.tags["entry_point"] == "train" and len(run.data.tags["git_commit"]) >= 7
    assert run.data.tags["git_dirty"] in ("true", "false") and len(run.data.tags["dataset_digest"]) == 64
    assert run.data.metrics["test_accuracy"] > 0.8
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "train_accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    assert any(k.startswith("system/") for k in run.data.metrics)  # system metrics were sampled
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "evaluation", "reference"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/confusion_matrix.png", "plots/loss_curve.png"}
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits"
    assert any(t.key == "dataset_digest" and t.value == run.data.tags["dataset_digest"] for t in dataset_input.tags)
    mv = client.get_model_version_by_alias("digits-mlproject", "candidate")
    assert mv.tags["run_id"] == run.info.run_id and mv.tags["dataset_digest"] == run.data.tags["dataset_digest"]
    assert mv.tags["git_commit"] == run.data.tags["git_commit"]
    model = mlflow.pytorch.load_model("models:/digits-mlproject@candidate")  # the pt2 MLflow model loads
    import torch

    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)  # batch dimension stayed dynamic


def test_worse_second_run_is_not_aliased(tmp_path):
    settings, first = train_digits(tmp_path, "gate-test", epochs=3)
    assert first.registered_version == "1"
    _, second = train_digits(tmp_path, "gate-test", epochs=1, max_train_samples=64, seed=1)
    assert second.registered_version is None
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("gate-test", "candidate").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='gate-test'")] == ["1"]
    run = client.get_run(second.run_id)
    assert run.data.tags["gate.decision"] == "rejected" and run.data.tags["gate.champion_version"] == "1"
    assert run.data.metrics["gate_champion_accuracy"] > run.data.metrics["gate_challenger_accuracy"]
    # Against `prod`: a negative margin lets a quick run win, and the new version records the comparison.
    client.set_registered_model_alias("gate-test", "prod", "1")
    _, third = train_digits(tmp_path, "gate-test", epochs=1, max_train_samples=64, seed=2, margin=-1.0)
    assert third.registered_version == "2"
    v2 = client.get_model_version("gate-test", "2")
    assert v2.tags["gate.champion_version"] == "1" and v2.tags["gate.decision"] == "accepted"
    assert str(client.get_model_version_by_alias("gate-test", "prod").version) == "1"  # prod never moves here


def test_torchrun_two_processes_make_one_mlflow_run(tmp_path):
    home = tmp_path / "home"
    out = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "flywheel",
                          "train", "--dataset", "digits", "--epochs", "2", "--batch-size", "32", "--lr", "0.005",
                          "--model-name", "ddp-test"],
                         env=_env(home, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    Settings.from_env(tracking_uri=f"sqlite:///{home / 'mlflow.db'}").apply()
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("flywheel").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]
    assert run.data.metrics["test_accuracy"] > 0.6
    assert str(client.get_model_version_by_alias("ddp-test", "candidate").version) == "1"


def test_evaluate_cli_on_registered_alias(trained_digits_model):
    env = _env(trained_digits_model.home)
    out = subprocess.run([sys.executable, "-m", "flywheel", "evaluate", "--model-uri",
                          f"models:/{trained_digits_model.model_name}@candidate", "--dataset", "digits"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"accuracy {trained_digits_model.test_accuracy:.4f}" in out.stdout
    assert "macro-F1" in out.stdout
    wrong = subprocess.run([sys.executable, "-m", "flywheel", "evaluate", "--model-uri",
                            f"models:/{trained_digits_model.model_name}@candidate", "--dataset", "fashion-mnist"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "evaluate it on the data it was trained for" in wrong.stderr
