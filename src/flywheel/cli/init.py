"""`flywheel init NAME`: scaffold a component (logic: flywheel.training.scaffold)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer()


@app.command("init", rich_help_panel="Training node")
def init(
    name: Annotated[str, typer.Argument(help="Component name: the MLflow project and registered model name.")],
    directory: Annotated[Optional[Path], typer.Option(
        "--dir", help="Where to write it (default ./NAME); refused if it exists and is not empty.")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="Registered model name, if not NAME.")] = None,
    flywheel_repo: Annotated[str, typer.Option(
        help="OWNER/NAME of the Flywheel repository whose reusable workflows the component calls.")
                             ] = "OWNER/flywheel",
    flywheel_ref: Annotated[str, typer.Option(help="Ref of that repository the workflows pin.")] = "main",
) -> None:
    """Scaffold a component: MLproject, conda.yaml, Dockerfile, train.py, model.py, workflows, a test."""
    from flywheel.training.scaffold import ScaffoldConfig, scaffold

    cfg = ScaffoldConfig(name=name, target=directory or Path(name), model_name=model_name or "",
                         flywheel_repo=flywheel_repo, flywheel_ref=flywheel_ref)
    for rel in scaffold(cfg):
        typer.echo(f"  {cfg.target / rel}")
    typer.echo(f"component {name} written to {cfg.target}; next: its README.md")
