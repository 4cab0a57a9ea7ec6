"""Fault tests against a real tracking node: the MLflow server killed for 20 s, Postgres restarted,
both in the middle of a training run. The run must finish with every epoch's metrics (once each)
and the model in the store, and must not be duplicated.

These take minutes (a private stack, a training run, a 20 s outage and a server restart each), so
they are `reliability` tests: `make test-reliability`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_tracking import launch_tracking_stack

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
OUTAGE_S = 20

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.usefixtures("forget_tracking_uri")]


@pytest.fixture(scope="module")
def fault_stack():
    """A private tracking node: these tests kill its parts, which must not hurt other tests."""
    stack = launch_tracking_stack()
    yield stack
    stack.stop()
    shutil.rmtree(stack.root, ignore_errors=True)


def _client(stack):
    import mlflow

    stack.settings().apply()
    return mlflow.MlflowClient(stack.uri)


def _start_training(stack, tmp_path: Path, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "train.log"
    env = {**os.environ, **stack.env(), "FLYWHEEL_HOME": str(tmp_path / "home"), "MLFLOW_EXPERIMENT_NAME": name,
           "FLYWHEEL_MODEL_NAME": name}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "flywheel"), "train", "--dataset", "digits",
                                 "--epochs", str(EPOCHS), "--max-train-samples", "600", "--batch-size", "64"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def _wait_for_first_epoch(stack, name: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """The run id, once epoch 0's metrics are stored and the run is still going."""
    client = _client(stack)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "val_accuracy"):
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no epoch logged within {timeout} s:\n{log.read_text()[-3000:]}")


def _assert_complete(stack, name: str, run_id: str, proc: subprocess.Popen, log: Path) -> None:
    """Training succeeded; one run; each epoch metric exactly once; model stored and loadable."""
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    client = _client(stack)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "the run was duplicated"
    assert runs[0].info.status == "FINISHED"
    for key in EPOCH_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(EPOCHS)), (key, steps)
    assert "test_accuracy" in runs[0].data.metrics or "accuracy" in " ".join(runs[0].data.metrics)
    # The model: registered as candidate (first of its name), loadable by a fresh load, in the bucket.
    from flywheel.core.models import load_model

    version = client.get_model_version_by_alias(name, "candidate")
    assert version.run_id == run_id
    _model, spec = load_model(f"models:/{name}@candidate")
    assert len(spec.class_names) == 10
    blobs = [b.name for b in stack.gcs_client().list_blobs(stack.bucket, prefix=f"{stack.prefix}/{exp.experiment_id}/")]
    assert any(b.endswith("/MLmodel") and "/models/" in b for b in blobs), blobs
    assert any(b.endswith(f"{run_id}/artifacts/plots/loss_curve.png") for b in blobs), blobs


def test_mlflow_server_killed_for_20s_mid_run(fault_stack, tmp_path):
    name = "fault-server-kill"
    proc, log = _start_training(fault_stack, tmp_path, name)
    run_id = _wait_for_first_epoch(fault_stack, name, proc, log)
    fault_stack.mlflow.kill()  # SIGKILL uvicorn and all its workers: a crash, no goodbye
    time.sleep(OUTAGE_S)
    assert proc.poll() is None, f"training died during the outage:\n{log.read_text()[-4000:]}"
    fault_stack.restart_mlflow()
    _assert_complete(fault_stack, name, run_id, proc, log)
    # The outage was really felt by the trainer: entries were held in the spool and replayed.
    assert "tracking server unavailable" in log.read_text()


def test_mlflow_server_killed_while_artifacts_and_model_upload(fault_stack, tmp_path):
    """The outage starts as the first artifacts (plots) land, so the reference files and
    `log_model`'s uploads (logged-model record, MLmodel, weights, extra files) meet a dead server."""
    name = "fault-kill-at-upload"
    proc, log = _start_training(fault_stack, tmp_path, name)
    run_id = _wait_for_first_epoch(fault_stack, name, proc, log)
    bucket = fault_stack.gcs_client().bucket(fault_stack.bucket)
    deadline = time.monotonic() + 600
    while not any(b.name.endswith("plots/loss_curve.png") for b in bucket.list_blobs(prefix=fault_stack.prefix)
                  if run_id in b.name):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    fault_stack.mlflow.kill()
    time.sleep(OUTAGE_S)
    assert proc.poll() is None, f"training died during the outage:\n{log.read_text()[-4000:]}"
    fault_stack.restart_mlflow()
    _assert_complete(fault_stack, name, run_id, proc, log)


def test_postgres_restarted_mid_run(fault_stack, tmp_path):
    name = "fault-postgres-restart"
    proc, log = _start_training(fault_stack, tmp_path, name)
    run_id = _wait_for_first_epoch(fault_stack, name, proc, log)
    fault_stack.pg.stop(mode="fast")  # terminates every server connection
    time.sleep(OUTAGE_S)
    assert proc.poll() is None, f"training died during the outage:\n{log.read_text()[-4000:]}"
    fault_stack.pg.start()
    _assert_complete(fault_stack, name, run_id, proc, log)
    assert "tracking server unavailable" in log.read_text()  # the 503s reached the trainer
