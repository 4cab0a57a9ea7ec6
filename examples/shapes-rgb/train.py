"""The shapes-rgb component's `train` entry point, on Flywheel's public API only.

Its own data (data.py: a seeded synthetic RGB imagefolder, generated into --data-dir when that holds
none), its own network (model.py), then `flywheel.component`: `make_splits` with a 3-channel
48x48 centre-crop preprocessing spec, and `train` (the loop, the MLflow run, `log_model` under the
component contract with `embed` as the monitor's embedding, the champion/challenger gate).
`MLproject` runs this file; so can you: `python train.py --help`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from data import generate, load_imagefolder
from model import INPUT_SIZE, ShapesNet

import flywheel.component as fc

# Per-channel statistics of the generated training images' centre crops (seed 0), pixels in [0, 1].
MEAN = (0.493, 0.481, 0.494)
STD = (0.179, 0.151, 0.176)
PREPROCESS = dict(channels=3, height=INPUT_SIZE, width=INPUT_SIZE, mean=MEAN, std=STD, resize="crop")


def _int(value: str) -> int:
    return int(float(value))  # MLflow hands float parameters over as "3.0"


def _text(value: str) -> str:
    return "" if value == "''" else value  # an empty MLproject parameter, as the shell quoted it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=_int, default=2, help="passes over the training split")
    p.add_argument("--batch-size", type=_int, default=32, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--seed", type=_int, default=0, help="seed of the train/val split, init and batch order")
    p.add_argument("--max-train-samples", type=_int, default=0, help="train on a seeded subset (0: all)")
    p.add_argument("--register", choices=("true", "false"), default="true",
                   help="gate the run against the champion and register it as candidate if it wins")
    p.add_argument("--margin", type=float, default=0.0, help="accuracy the challenger must beat the champion by")
    p.add_argument("--data-dir", type=_text, default="",
                   help="the generated imagefolder (train/ and test/); generated there if missing "
                        "(default: a temporary folder)")
    p.add_argument("--data-seed", type=_int, default=0, help="seed of the generated images (data.py --seed)")
    p.add_argument("--n", type=_int, default=4000, help="training images to generate (data.py --n)")
    p.add_argument("--test-n", type=_int, default=1000, help="test images to generate (data.py --test-n)")
    p.add_argument("--extra-data", type=_text, default="",
                   help="comma-separated imagefolders of labelled images added to train (e.g. a capture snapshot)")
    p.add_argument("--model-name", default=os.environ.get("FLYWHEEL_MODEL_NAME", "shapes-rgb"),
                   help="registered model name (default: $FLYWHEEL_MODEL_NAME, else shapes-rgb)")
    return p.parse_args(argv)


def load_splits(data_dir: Path, seed: int, extra: tuple[Path, ...] = ()):
    """The component's data as Flywheel Splits: train/ split into train+val by `seed`, test/ frozen."""
    images, labels, classes = load_imagefolder(data_dir / "train")
    test_images, test_labels, test_classes = load_imagefolder(data_dir / "test")
    if test_classes != classes:
        raise SystemExit(f"{data_dir}: test classes {test_classes} differ from train classes {classes}")
    splits = fc.make_splits("shapes-rgb", images, labels, classes, preprocess=fc.PreprocessSpec(**PREPROCESS),
                            seed=seed, source=str(data_dir), test_images=test_images, test_labels=test_labels)
    return fc.add_labelled(splits, extra) if extra else splits


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shapes-rgb-") as tmp:
        data_dir = Path(args.data_dir or tmp)
        if not (data_dir / "train").is_dir():
            generate(data_dir, seed=args.data_seed, n=args.n, test_n=args.test_n)
        extra = tuple(Path(d) for d in args.extra_data.split(",") if d.strip())
        splits = load_splits(data_dir, args.seed, extra)
        cfg = fc.FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, seed=args.seed,
                           max_train_samples=args.max_train_samples or None)
        fc.seed_everything(args.seed)  # the initial weights follow --seed
        fc.train(ShapesNet(len(splits.class_names)), splits, cfg, embedding="embed", gate=fc.GateSpec("accuracy"),
                 register=args.register == "true", margin=args.margin, model_name=args.model_name, name="shapes-net")


if __name__ == "__main__":
    main()
