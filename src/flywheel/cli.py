"""The `flywheel` command line: one thin command per pipeline verb.

Commands import their module inside the function, so `flywheel --help` stays fast and importing
this module does no work. Errors the user can fix (FlywheelError) print one red line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Flywheel: continuous training and delivery for PyTorch models on MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: list them, snapshot labelled captures.")
app.add_typer(data_app, name="data")

TrackingOpt = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI; default: embedded SQLite store in $FLYWHEEL_HOME (./.flywheel).")]
ModelNameOpt = Annotated[Optional[str], typer.Option(
    "--model-name", envvar="FLYWHEEL_MODEL_NAME", help="Registered model name (default fashion-classifier).")]
DataDirOpt = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="FLYWHEEL_DATA_DIR", help="Where dataset files are looked up first.")]


def _settings(tracking_uri: str | None = None, model_name: str | None = None, data_dir: Path | None = None):
    from flywheel.config import Settings

    return Settings.from_env(tracking_uri=tracking_uri, model_name=model_name, data_dir=data_dir).apply()


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------ foundation
@app.command()
def train(
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | imagefolder.")] = "fashion-mnist",
    model: Annotated[str, typer.Option(help="Architecture name (see `flywheel models`).")] = "small-cnn",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Per-process batch size.")] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate of the one-cycle schedule.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed for splits, init and shuffling.")] = 0,
    register: Annotated[bool, typer.Option(help="Gate against the champion and register if better.")] = True,
    margin: Annotated[float, typer.Option(help="Accuracy the challenger must beat the champion by.")] = 0.0,
    extra_data: Annotated[Optional[list[Path]], typer.Option(
        "--extra-data", help="Labelled image folders (imagefolder layout) added to the training split.")] = None,
    max_train_samples: Annotated[Optional[int], typer.Option(
        help="Use at most this many training images (quick runs).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda | cuda:N; default: CUDA when present.")] = None,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Train a model, log it to MLflow, gate it against the champion and register it if better."""
    from flywheel.errors import FlywheelError
    from flywheel.train import TrainConfig, run_training

    cfg = TrainConfig(dataset=dataset, model=model, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      register=register, margin=margin, extra_data=tuple(extra_data or ()),
                      max_train_samples=max_train_samples, device=device)
    try:
        run_training(cfg, _settings(tracking_uri, model_name, data_dir))
    except FlywheelError as exc:
        _fail(str(exc))


@app.command()
def evaluate(
    model_uri: Annotated[str, typer.Option(help="Model URI, e.g. models:/fashion-classifier@prod or runs:/ID/model.")],
    dataset: Annotated[str, typer.Option(help="Dataset whose frozen test split is used.")] = "fashion-mnist",
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Evaluate a logged model on the frozen test split: accuracy, macro-F1, per-class."""
    from flywheel.errors import FlywheelError
    from flywheel.evaluate import evaluate_uri, print_report

    settings = _settings(tracking_uri, None, data_dir)
    try:
        print_report(evaluate_uri(model_uri, dataset, settings))
    except FlywheelError as exc:
        _fail(str(exc))


@app.command()
def register(
    run_id: Annotated[str, typer.Option(help="MLflow run whose model is gated and registered.")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset for the gate (default: the run's).")] = None,
    margin: Annotated[float, typer.Option(help="Accuracy the challenger must beat the champion by.")] = 0.0,
    data_dir: DataDirOpt = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameOpt = None,
) -> None:
    """Gate an existing run against the champion and register it as `candidate` if it wins."""
    from flywheel.errors import FlywheelError
    from flywheel.registry import gate_run

    settings = _settings(tracking_uri, model_name, data_dir)
    try:
        decision = gate_run(run_id, settings, dataset=dataset, margin=margin)
    except FlywheelError as exc:
        _fail(str(exc))
    typer.echo(decision.summary())


@app.command()
def models() -> None:
    """List the model architectures `--model` accepts."""
    from flywheel.models import ARCHITECTURES

    for name, text in ARCHITECTURES.items():
        typer.echo(f"{name:20s} {text}")


@data_app.command("list")
def data_list() -> None:
    """List the datasets `--dataset` accepts."""
    _print_datasets()


@app.command()
def datasets() -> None:
    """List the datasets `--dataset` accepts."""
    _print_datasets()


def _print_datasets() -> None:
    from flywheel.data import DATASETS

    docs = {"fashion-mnist": "Zalando Fashion-MNIST idx files (--data-dir, /usr/share/datasets/fashion-mnist)",
            "digits": "scikit-learn's built-in 8x8 digits upscaled to 28x28 (fast tests)",
            "imagefolder": "your labelled images: --data-dir ROOT/<class>/<image>"}
    for name in DATASETS:
        typer.echo(f"{name:15s} {docs[name]}")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option("--keep", envvar="KEEP", help="Leave started servers running.")] = False,
    full: Annotated[bool, typer.Option("--full", envvar="FULL",
                                       help="Use Postgres + GCS emulator + auth (flywheel stack).")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the whole flywheel on this machine: train, register, release, serve, monitor, retrain."""
    from flywheel.demo import run_demo
    from flywheel.errors import FlywheelError

    try:
        run_demo(keep=keep, full=full, data_dir=data_dir)
    except FlywheelError as exc:
        _fail(str(exc))


# --------------------------------------------------------------- commands of the other nodes
# (tracking: stack/doctor · training nodes: remote-train · serving: package/release/predict ·
#  monitor: monitor/data snapshot) are added below by their modules' owners.


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
