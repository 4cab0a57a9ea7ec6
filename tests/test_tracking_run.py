"""A real training run logged through the tracking node (Postgres + GCS emulator + basic-auth)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.core.errors import FlywheelError

pytestmark = pytest.mark.usefixtures("forget_tracking_uri")

REPO = Path(__file__).resolve().parents[1]


def _db_rows(stack, sql: str, *args):
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=stack.pg.port, user=stack.pg.user,
                            password=stack.pg.password, dbname="mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served_run(tracking_stack, tmp_path_factory):
    """One small digits run (2 epochs) through the server, registered as the first candidate."""
    from flywheel.training.train import TrainConfig, run_training

    home = tmp_path_factory.mktemp("served-home")
    os.environ["FLYWHEEL_HOME"] = str(home)
    settings = tracking_stack.settings(model_name="served-digits", experiment="served").apply()
    result = run_training(TrainConfig(dataset="digits", epochs=2, max_train_samples=256, batch_size=64),
                          settings)
    return settings, result, home


@pytest.mark.integration
def test_run_params_and_metrics_are_in_postgres(tracking_stack, served_run):
    settings, result, home = served_run
    settings.apply()
    status = _db_rows(tracking_stack, "SELECT status FROM runs WHERE run_uuid = %s", result.run_id)
    assert status == [("FINISHED",)]
    steps = _db_rows(tracking_stack, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'val_accuracy' "
                     "ORDER BY step", result.run_id)
    assert [s for (s,) in steps] == [0, 1]  # every epoch, once
    params = dict(_db_rows(tracking_stack, "SELECT key, value FROM params WHERE run_uuid = %s", result.run_id))
    assert params["epochs"] == "2" and params["dataset"] == "digits"
    tags = dict(_db_rows(tracking_stack, "SELECT key, value FROM tags WHERE run_uuid = %s", result.run_id))
    assert {"git_commit", "dataset_digest"} <= tags.keys()
    # The spool journal is gone once everything was stored.
    assert not list(home.glob("spool/*.jsonl"))


@pytest.mark.integration
def test_model_and_plots_are_in_the_bucket(tracking_stack, served_run):
    import mlflow

    settings, result, _ = served_run
    settings.apply()
    run = mlflow.MlflowClient().get_run(result.run_id)
    exp_id = run.info.experiment_id
    names = [b.name for b in tracking_stack.gcs_client().list_blobs(tracking_stack.bucket,
                                                                    prefix=f"{tracking_stack.prefix}/{exp_id}/")]
    run_prefix = f"{tracking_stack.prefix}/{exp_id}/{result.run_id}/artifacts/"
    for rel in ("plots/loss_curve.png", "plots/confusion_matrix.png", "reference/embeddings.npy"):
        assert run_prefix + rel in names, names
    model_files = [n for n in names if "/models/" in n]
    assert any(n.endswith("/MLmodel") for n in model_files), names
    assert any(n.endswith("flywheel_component.json") for n in model_files), names
    png = tracking_stack.gcs_client().bucket(tracking_stack.bucket).blob(run_prefix + "plots/loss_curve.png")
    assert png.download_as_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_registry_and_aliases_work_through_the_server(tracking_stack, served_run):
    from flywheel.core.registry import get_version, set_alias

    settings, result, _ = served_run
    settings.apply()
    assert result.registered_version == "1"
    assert get_version(settings, "served-digits", "candidate").version == "1"
    set_alias(settings, "served-digits", "dev", "1")
    assert get_version(settings, "served-digits", "dev").run_id == result.run_id


@pytest.mark.integration
def test_a_second_client_downloads_and_loads_the_model(tracking_stack, served_run):
    """A fresh process with only the URI and a user: no GCS credentials, artifacts via the server."""
    code = (
        "import json, mlflow, tempfile, pathlib\n"
        "from flywheel.core.models import load_model\n"
        "model, spec = load_model('models:/served-digits@candidate')\n"
        "d = mlflow.artifacts.download_artifacts(artifact_uri='models:/served-digits@candidate', "
        "dst_path=tempfile.mkdtemp())\n"
        "print(json.dumps({'classes': len(spec.class_names), 'files': sorted(p.name for p in "
        "pathlib.Path(d).iterdir())}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "STORAGE_EMULATOR", "GOOGLE_"))}
    env.update(tracking_stack.env())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["classes"] == 10 and "MLmodel" in out["files"]


@pytest.mark.integration
def test_wrong_credentials_fail_before_training(tracking_stack):
    from flywheel.training.train import TrainConfig, run_training

    settings = tracking_stack.settings(password="wrong-password-123", experiment="never-created").apply()
    t0 = time.monotonic()
    with pytest.raises(FlywheelError, match=r"rejected user 'admin' \(401\)"):
        run_training(TrainConfig(dataset="digits", epochs=50), settings)
    assert time.monotonic() - t0 < 10  # no data loaded, no epoch trained
    import mlflow

    tracking_stack.settings().apply()
    assert mlflow.MlflowClient().get_experiment_by_name("never-created") is None


@pytest.mark.integration
def test_cli_train_with_wrong_password_prints_the_cause(tracking_stack):
    env = {**os.environ, **tracking_stack.env(), "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"}
    t0 = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).parent / "flywheel"), "train", "--dataset", "digits",
                           "--epochs", "50"], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "401" in proc.stderr and "MLFLOW_TRACKING_PASSWORD" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60
