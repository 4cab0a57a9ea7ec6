"""The Fashion-MNIST reference component's `train` entry point, on Flywheel's public API only.

Fashion-MNIST (Flywheel's built-in loader: the Debian package, or the idx files in --data-dir),
the component's own network (model.py), then `flywheel.component.trainer`: the training loop, the
MLflow run, `log_model` under the component contract (embedding: the `features` module) and the
champion/challenger gate. `MLproject` runs this file; so can you: `python train.py --help`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from model import FashionCNN

import flywheel.component as fc


def _int(value: str) -> int:
    return int(float(value))  # MLflow hands float parameters over as "3.0"


def _text(value: str) -> str:
    return "" if value == "''" else value  # an empty MLproject parameter, as the shell quoted it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=_int, default=5, help="passes over the training split")
    p.add_argument("--batch-size", type=_int, default=128, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--seed", type=_int, default=0, help="seed of the train/val split, init and batch order")
    p.add_argument("--max-train-samples", type=_int, default=0, help="train on a seeded subset (0: all)")
    p.add_argument("--register", choices=("true", "false"), default="true",
                   help="gate the run against the champion and register it as candidate if it wins")
    p.add_argument("--margin", type=float, default=0.0, help="accuracy the challenger must beat the champion by")
    p.add_argument("--extra-data", type=_text, default="", help="comma-separated imagefolders of labelled images added to train")
    p.add_argument("--data-dir", type=_text, default="", help="folder holding the Fashion-MNIST idx files (default: system)")
    p.add_argument("--model-name", default=os.environ.get("FLYWHEEL_MODEL_NAME", "fashion-classifier"),
                   help="registered model name (default: $FLYWHEEL_MODEL_NAME)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    extra = tuple(Path(d) for d in args.extra_data.split(",") if d.strip())
    splits = fc.load_dataset("fashion-mnist", data_dir=Path(args.data_dir) if args.data_dir else None,
                             seed=args.seed, extra_data=extra)
    cfg = fc.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       seed=args.seed, max_train_samples=args.max_train_samples or None)
    fc.seed_everything(args.seed)  # the initial weights follow --seed
    fc.train(FashionCNN(len(splits.class_names)), splits, cfg, embedding="features", gate=fc.GateSpec("accuracy"),
             register=args.register == "true", margin=args.margin, model_name=args.model_name, name="fashion-cnn")


if __name__ == "__main__":
    main()
