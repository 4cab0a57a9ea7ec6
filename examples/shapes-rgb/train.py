"""The shapes-rgb component's `train` entry point, on Flywheel's public API only.

Its own data (data.py: a seeded synthetic RGB imagefolder, generated into --data-dir when that holds
none), its own network (model.py), then `flywheel.component`: `make_splits` with a 3-channel
48x48 centre-crop preprocessing spec, and `train` (the loop, the MLflow run, `log_model` under the
component contract with `embed` as the monitor's embedding, the champion/challenger gate).
`MLproject` runs this file; so can you: `python train.py --help`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from data import generate, load_imagefolder
from model import INPUT_SIZE, ShapesNet

import flywheel.component as fc

# Per-channel statistics of the generated training images' centre crops (seed 0), pixels in [0, 1].
MEAN = (0.493, 0.481, 0.494)
STD = (0.179, 0.151, 0.176)
PREPROCESS = dict(channels=3, height=INPUT_SIZE, width=INPUT_SIZE, mean=MEAN, std=STD, resize="crop")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fc.add_training_arguments(p, epochs=2, batch_size=32, lr=5e-3, model_name="shapes-rgb")
    p.add_argument("--data-dir", type=fc.mlflow_text, default="",
                   help="the generated imagefolder (train/ and test/); generated there if missing "
                        "(default: a temporary folder)")
    p.add_argument("--data-seed", type=fc.mlflow_int, default=0, help="seed of the generated images (data.py --seed)")
    p.add_argument("--n", type=fc.mlflow_int, default=4000, help="training images to generate (data.py --n)")
    p.add_argument("--test-n", type=fc.mlflow_int, default=1000, help="test images to generate (data.py --test-n)")
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
        splits = load_splits(data_dir, args.seed, fc.extra_data(args))
        cfg = fc.fit_config(args)
        fc.seed_everything(args.seed)  # the initial weights follow --seed
        fc.train(ShapesNet(len(splits.class_names)), splits, cfg, embedding="embed", gate=fc.GateSpec("accuracy"),
                 register=args.register == "true", margin=args.margin, model_name=args.model_name, name="shapes-net")


if __name__ == "__main__":
    main()
