"""`flywheel data`: list the datasets (any node), snapshot labelled captures and send feedback (monitor node).

`datasets`, the old duplicate of `data list`, stays as a hidden alias so scripts keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import CaptureUriOpt, ModelNameAlias, ModelOpt, fail, model_of

app = typer.Typer()
data_app = typer.Typer(no_args_is_help=True, help="Datasets: list them, snapshot labelled captures, send feedback.")
app.add_typer(data_app, name="data", rich_help_panel="Monitor node")


@data_app.command("list")
def data_list() -> None:
    """List the datasets `--dataset` accepts."""
    _print_datasets()


@app.command(hidden=True)
def datasets() -> None:
    """Old name of `data list`."""
    _print_datasets()


def _print_datasets() -> None:
    from flywheel.core.data import DATASETS

    docs = {"fashion-mnist": "Zalando Fashion-MNIST idx files (--data-dir, /usr/share/datasets/fashion-mnist)",
            "digits": "scikit-learn's built-in 8x8 digits upscaled to 28x28 (fast tests)",
            "imagefolder": "your labelled images: --data-dir ROOT/<class>/<image>"}
    for name in DATASETS:
        typer.echo(f"{name:15s} {docs[name]}")


@data_app.command("snapshot")
def data_snapshot(
    model: ModelOpt = None,
    capture_uri: CaptureUriOpt = None,
    labelled: Annotated[Optional[list[Path]], typer.Option(
        "--labelled", help="Labelling export in imagefolder layout (<dir>/<class>/<image>); repeatable.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Snapshot root (default $FLYWHEEL_HOME/snapshots).")] = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Turn labelled captures into a new versioned imagefolder dataset (prints its path and digest)."""
    from flywheel.core.config import Settings
    from flywheel.monitoring.snapshot import take_snapshot

    settings = Settings.from_env(model_name=model_of(model, model_name))  # no tracking needed: no MLflow import
    snap = take_snapshot(capture_uri or settings.capture_uri, settings.model_name,
                         out or settings.work_dir / "snapshots",
                         tuple(labelled or ()))
    state = "new" if snap.new else "unchanged, existing"
    typer.echo(f"snapshot v{snap.version} ({state}): {snap.path}\ndigest {snap.digest}\n{snap.images} images "
               f"{snap.per_class}\ntrain with: flywheel train --extra-data {snap.path}")


@data_app.command("feedback")
def data_feedback(
    labels: Annotated[list[str], typer.Argument(help="PREDICTION_ID=LABEL pairs (the class name).")],
    model: ModelOpt = None,
    capture_uri: CaptureUriOpt = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Send ground-truth labels for served predictions (joined with captures by `data snapshot`)."""
    from flywheel.contracts.capture import write_feedback

    pairs = []
    for item in labels:
        pid, sep, label = item.partition("=")
        if not sep or not pid or not label:
            fail(f"{item!r} is not PREDICTION_ID=LABEL")
        pairs.append((pid, label))
    from flywheel.core.config import Settings

    settings = Settings.from_env(model_name=model_of(model, model_name))
    capture_uri = capture_uri or settings.capture_uri
    try:
        name = write_feedback(capture_uri, settings.model_name, pairs)
    except (OSError, ValueError) as exc:
        fail(f"could not store feedback in {capture_uri}: {exc}")
    typer.echo(f"stored {len(pairs)} labels in {capture_uri} ({name})")

