"""The Fashion-MNIST reference component's `train` entry point, on Flywheel's public API only.

Fashion-MNIST (Flywheel's built-in loader: the Debian package, or the idx files in --data-dir),
the component's own network (model.py), then `flywheel.component.trainer`: the training loop, the
MLflow run, `log_model` under the component contract (embedding: the `features` module) and the
champion/challenger gate. `MLproject` runs this file; so can you: `python train.py --help`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model import FashionCNN

import flywheel.component as fc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fc.add_training_arguments(p, epochs=5, batch_size=128, lr=5e-3, model_name="fashion-classifier")
    p.add_argument("--data-dir", type=fc.mlflow_text, default="",
                   help="folder holding the Fashion-MNIST idx files (default: system)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits = fc.load_dataset("fashion-mnist", data_dir=Path(args.data_dir) if args.data_dir else None,
                             seed=args.seed, extra_data=fc.extra_data(args))
    cfg = fc.fit_config(args)
    fc.seed_everything(args.seed)  # the initial weights follow --seed
    fc.train(FashionCNN(len(splits.class_names)), splits, cfg, embedding="features", gate=fc.GateSpec("accuracy"),
             register=args.register == "true", margin=args.margin, model_name=args.model_name, name="fashion-cnn")


if __name__ == "__main__":
    main()
