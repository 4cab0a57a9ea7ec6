"""Control verbs: the CI's bookkeeping (dispatches record-superseded | check-event), `status` (every
registered model, its aliases, deployments, drift and retrains), `trace` (one prediction's
provenance) and `demo`, the whole flywheel on one machine (it combines every node, like the CI does)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import (
    CaptureUriOpt,
    DataDirOpt,
    JsonOpt,
    ModelNameAlias,
    ModelOpt,
    TrackingOpt,
    emit_json,
    model_of,
    settings_for,
    stop_on_sigterm,
)

PANEL = "Control (CI, demo)"
app = typer.Typer()


@app.command(rich_help_panel=PANEL)
def demo(
    keep: Annotated[bool, typer.Option("--keep", envvar="KEEP", help="Leave started servers running.")] = False,
    full: Annotated[bool, typer.Option("--full", envvar="FULL",
                                       help="Use Postgres + GCS emulator + auth (flywheel stack).")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the whole flywheel on this machine: train, register, release, serve, monitor, retrain."""
    stop_on_sigterm()
    from flywheel.demo import run_demo

    run_demo(keep=keep, full=full, data_dir=data_dir)


@app.command(rich_help_panel=PANEL)
def status(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", help="Only this registered model (repeatable); default: every registered model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
                       ] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Every registered model: its aliases, where each is deployed, its last drift window and last retrain."""
    from flywheel.control.status import collect_status, render_table

    settings = settings_for(tracking_uri)
    statuses = collect_status(settings, model)
    if as_json:
        return emit_json({"tracking_uri": settings.tracking_uri, "models": statuses})
    if not statuses:
        return typer.echo(f"no registered model at {settings.tracking_uri}: train one first (`flywheel train`), or "
                          "point MLFLOW_TRACKING_URI / FLYWHEEL_HOME at the store that has them")
    from rich.console import Console

    Console().print(render_table(statuses, settings.tracking_uri))


@app.command(rich_help_panel=PANEL)
def trace(
    prediction_id: Annotated[str, typer.Argument(help="The prediction_id a response carried.")],
    model: ModelOpt = None,
    capture_uri: CaptureUriOpt = None,
    image_out: Annotated[Optional[Path], typer.Option(
        "--image-out", help="Write the captured input image (PNG) to this file.")] = None,
    as_json: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Where one prediction came from: version, run, commit, data, params, archive, deployment, input, window."""
    from flywheel.control.trace import render_text, trace_prediction

    settings = settings_for(tracking_uri, model)
    result = trace_prediction(settings, prediction_id, settings.model_name, capture_uri, image_out)
    if as_json:
        return emit_json(result)
    typer.echo(render_text(result))


dispatches_app = typer.Typer(no_args_is_help=True, help="CI bookkeeping: superseded release/train requests, "
                                                        "retried retrain events (see flywheel.control.dispatches).")
app.add_typer(dispatches_app, name="dispatches", rich_help_panel=PANEL)


@dispatches_app.command("record-superseded")
def dispatches_record_superseded(
    kind: Annotated[str, typer.Option(help="What this job does: release | train.")],
    model: Annotated[str, typer.Option(help="Registered model the request is for.")],
    target: Annotated[str, typer.Option(help="The environment of a release (dev|prod), the git ref of a training.")],
    version: Annotated[Optional[str], typer.Option(help="Registry version being released (releases).")] = None,
    workflow: Annotated[Optional[list[str]], typer.Option(
        "--workflow", help="Workflow file whose runs can hold this concurrency group (repeatable).")] = None,
    repository: Annotated[str, typer.Option(envvar="GITHUB_REPOSITORY", help="owner/name of the repository.")] = "",
    run_id: Annotated[int, typer.Option(envvar="GITHUB_RUN_ID", help="This workflow run's id.")] = 0,
    api_url: Annotated[str, typer.Option(envvar="GITHUB_API_URL", help="GitHub REST API base URL.")
                       ] = "https://api.github.com",
    lookback_days: Annotated[float, typer.Option(
        min=0.0, help="How far back to look when the group has no recorded previous run.")] = 7.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Record the requests GitHub cancelled while they waited behind this one: job summary and registry tags.

    The token comes from GITHUB_TOKEN (needs `actions: read`); never pass it on a command line."""
    import json

    from flywheel.control.dispatches import SupersedeOptions, record_superseded

    opts = SupersedeOptions(kind=kind, model=model, target=target, version=version, workflows=tuple(workflow or ()),
                            repository=repository, run_id=run_id, api_url=api_url, lookback_days=lookback_days)
    outcome = record_superseded(settings_for(tracking_uri, model), opts)
    typer.echo(json.dumps(outcome.as_dict(), indent=2) if as_json else outcome.markdown(), nl=as_json)


@dispatches_app.command("check-event")
def dispatches_check_event(
    event_id: Annotated[str, typer.Option(help="The monitor's event_id (repository_dispatch client_payload).")],
    superseded: Annotated[int, typer.Option(
        min=0, help="Requests this run superseded (record-superseded's output); > 0 always trains.")] = 0,
    stale_after_hours: Annotated[float, typer.Option(
        min=0.0, help="A RUNNING run with this event older than this counts as dead.")] = 6.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
    tracking_uri: TrackingOpt = None,
    model: ModelOpt = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Train for a retrain event, or skip it because a run tagged flywheel.event_id already serves it."""
    import json

    from flywheel.control.dispatches import check_event

    plan = check_event(settings_for(tracking_uri, model_of(model, model_name)), event_id, superseded, stale_after_hours * 3600)
    typer.echo(json.dumps(plan.as_dict()) if as_json else plan.note)

