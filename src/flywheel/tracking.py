"""Everything a training run says to MLflow goes through here, so failures are handled in one place.

`preflight` fails fast (unreachable server, wrong credentials) before any compute is spent;
`RunLogger` logs params/metrics/artifacts for one run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flywheel.config import Settings
from flywheel.errors import FlywheelError


def ensure_experiment(settings: Settings) -> str:
    """Id of the settings' experiment, created on first use (embedded: artifacts in work_dir)."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(settings.experiment, artifact_location=settings.artifact_root)


def preflight(settings: Settings) -> None:
    """Check the tracking server answers and accepts our credentials, before training starts."""
    if settings.embedded:
        return
    import requests

    base = settings.tracking_uri.rstrip("/")
    auth = (settings.username, settings.password) if settings.username else None
    try:
        resp = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            auth=auth, timeout=10)
    except requests.RequestException as exc:
        raise FlywheelError(f"tracking server {base} unreachable: {type(exc).__name__}: {exc}") from None
    if resp.status_code == 401:
        who = f"user {settings.username!r}" if settings.username else "no credentials"
        raise FlywheelError(f"tracking server {base} rejected {who} (401): set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD to a valid account")
    if resp.status_code == 403:
        raise FlywheelError(f"tracking server {base}: user {settings.username!r} lacks permission (403)")
    if resp.status_code >= 400:
        raise FlywheelError(f"tracking server {base} answered {resp.status_code}: {resp.text[:200]}")


class RunLogger:
    """Logs to one MLflow run by id (the run opened by `mlflow.start_run` or `mlflow run`)."""

    def __init__(self, run_id: str):
        import mlflow

        self.run_id = run_id
        self._client = mlflow.MlflowClient()

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def flush(self) -> None:
        """Wait until everything logged so far is stored."""
        import mlflow

        mlflow.flush_async_logging()


def active_run_id() -> str | None:
    """The run `mlflow run` opened for us (MLFLOW_RUN_ID), if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None
