"""Foundation fixtures: a small real model trained on digits and registered in an embedded store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TrainedModel:
    tracking_uri: str
    model_name: str
    version: str
    run_id: str
    home: Path
    test_accuracy: float


def train_digits(home: Path, model_name: str, epochs: int = 3, seed: int = 0, **overrides):
    """Train small-cnn on digits into the embedded store under `home`; returns the TrainResult."""
    from flywheel.core.config import Settings
    from flywheel.training.train import TrainConfig, run_training

    settings = Settings.from_env(work_dir=home, model_name=model_name).apply()
    cfg = TrainConfig(dataset="digits", model="small-cnn", epochs=epochs, batch_size=32, lr=5e-3, seed=seed,
                      **overrides)
    return settings, run_training(cfg, settings)


@pytest.fixture(scope="session")
def trained_digits_model(tmp_path_factory) -> TrainedModel:
    """A real registered model version (alias `candidate`) trained on digits; ~97% test accuracy."""
    import os

    home = tmp_path_factory.mktemp("digits-model")
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    try:
        settings, result = train_digits(home, "digits-classifier")
    finally:
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    assert result.registered_version is not None
    return TrainedModel(settings.tracking_uri, "digits-classifier", result.registered_version, result.run_id,
                        home, result.metrics["test_accuracy"])
