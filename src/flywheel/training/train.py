"""`flywheel train`: the built-in component: a dataset by name and an architecture by name.

Everything but the choice of data and network is the public component API (`flywheel.component`),
the same calls a team's own component makes: `fit` with a `TrackedRun`, `log_model` under the
contract (the network's embedding is its `features` module), then the champion/challenger gate.
Runs single-process or under `torchrun` (see flywheel.component.loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flywheel.component.loop import DistContext, fit, seed_everything, select_device  # noqa: F401 - re-exported
from flywheel.component.run import TrackedRun, git_info, refuse_mlflow_default_store  # noqa: F401 - re-exported
from flywheel.component.trainer import TrainResult, train
from flywheel.core.config import Settings
from flywheel.core.data import Splits, load_splits


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion-mnist"
    model: str = "small-cnn"  # an architecture of flywheel.training.archs
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0
    register: bool = True
    margin: float = 0.0
    extra_data: tuple[Path, ...] = ()
    max_train_samples: int | None = None
    device: str | None = None
    log_every_epoch: bool = True


def run_training(cfg: TrainConfig, settings: Settings, splits: Splits | None = None) -> TrainResult | None:
    """Train per `cfg`, log to the tracking server in `settings`; returns the result on rank 0.
    `splits`: the data already loaded for `cfg` (a search's trials share one load)."""
    from flywheel.training.archs import build_model

    refuse_mlflow_default_store(settings)
    if splits is None:
        splits = load_splits(cfg.dataset, settings.data_dir, cfg.seed, cfg.extra_data)
    seed_everything(cfg.seed)  # the initial weights follow the seed
    model = build_model(cfg.model, len(splits.class_names))
    return train(model, splits, cfg, embedding="features", register=cfg.register, margin=cfg.margin,
                 name=cfg.model, settings=settings)
