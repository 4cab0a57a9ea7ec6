"""Shared pytest fixtures. Each area keeps its server fixtures in its own plugin module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from flywheel.core.procs import free_port

pytest_plugins = [
    "tests.fixtures_core",
    "tests.fixtures_tracking",
    "tests.fixtures_ssh",
    "tests.fixtures_serving",
    "tests.fixtures_monitor",
    "tests.fixtures_podman",
]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


__all__ = ["REPO", "VENV_BIN", "free_port"]  # free_port: the one the servers use, re-exported for tests


@pytest.fixture
def no_google_credentials(monkeypatch, tmp_path):
    """A machine where google.auth finds no credentials: no key file, no emulator, no gcloud login and no
    GCE metadata server (a closed port, so the lookup fails at once)."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Every test starts with no tracking server configured and its own FLYWHEEL_HOME, and whatever it
    points MLflow at (Settings.apply sets MLFLOW_TRACKING_URI in os.environ) is undone afterwards."""
    import mlflow

    mlflow.set_tracking_uri(None)  # a session fixture may have pointed the client somewhere
    saved = dict(os.environ)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "FLYWHEEL_MODEL_NAME", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "flywheel-home"))
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    yield
    mlflow.set_tracking_uri(None)  # forget the module-level URIs too
    mlflow.set_registry_uri(None)
    os.environ.clear()
    os.environ.update(saved)
