"""The options every component's `train` entry point shares, so MLproject parameters mean the same
in every component: `add_training_arguments(parser, epochs=..., ...)`, then `fit_config(args)` and
`extra_data(args)`.

MLflow hands parameters over as strings: floats as "3.0" (so integers are parsed through float) and
an empty parameter as the shell's `''` (read as unset).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def mlflow_int(value: str) -> int:
    """An integer MLproject parameter: MLflow hands float parameters over as "3.0"."""
    return int(float(value))


def mlflow_text(value: str) -> str:
    """A string MLproject parameter; `''` (an empty parameter, as the shell quoted it) is ""."""
    return "" if value == "''" else value


def add_training_arguments(parser: argparse.ArgumentParser, *, epochs: int = 3, batch_size: int = 128,
                           lr: float = 3e-3, weight_decay: float = 1e-4,
                           model_name: str = "fashion-classifier") -> argparse.ArgumentParser:
    """--epochs --batch-size --lr --weight-decay --seed --max-train-samples --register --margin
    --extra-data --model-name, with the component's own defaults."""
    add = parser.add_argument
    add("--epochs", type=mlflow_int, default=epochs, help="passes over the training split")
    add("--batch-size", type=mlflow_int, default=batch_size, help="images per optimiser step")
    add("--lr", type=float, default=lr, help="peak learning rate of the one-cycle schedule")
    add("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    add("--seed", type=mlflow_int, default=0, help="seed of the train/val split, init and batch order")
    add("--max-train-samples", type=mlflow_int, default=0, help="train on a seeded subset (0: all)")
    add("--register", choices=("true", "false"), default="true",
        help="gate the run against the champion and register it as candidate if it wins")
    add("--margin", type=float, default=0.0, help="score the challenger must beat the champion by")
    add("--extra-data", type=mlflow_text, default="",
        help="comma-separated imagefolders of labelled images added to train (e.g. a capture snapshot)")
    add("--model-name", default=os.environ.get("FLYWHEEL_MODEL_NAME", model_name),
        help=f"registered model name (default: $FLYWHEEL_MODEL_NAME, else {model_name})")
    return parser


def fit_config(args: argparse.Namespace):
    """The FitConfig of parsed `add_training_arguments` options."""
    from flywheel.component.loop import FitConfig

    return FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     seed=args.seed, max_train_samples=args.max_train_samples or None)


def extra_data(args: argparse.Namespace) -> tuple[Path, ...]:
    """The --extra-data folders."""
    return tuple(Path(d) for d in args.extra_data.split(",") if d.strip())
