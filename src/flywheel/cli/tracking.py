"""Tracking node's verbs: stack up|down|status (Postgres + GCS emulator + MLflow), doctor, env."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import JsonOpt, TrackingOpt, emit_json, settings_for, stop_on_sigterm

PANEL = "Tracking node"
app = typer.Typer()


@app.command("env", rich_help_panel=PANEL)
def env_(tracking_uri: TrackingOpt = None) -> None:
    """Print the exports that put plain `mlflow` commands on Flywheel's store: eval "$(flywheel env)".

    The store is MLFLOW_TRACKING_URI, else the embedded one in $FLYWHEEL_HOME (created here, with the
    experiment keeping its artifacts in $FLYWHEEL_HOME/mlartifacts)."""
    from flywheel.core.runlog import ensure_experiment

    settings = settings_for(tracking_uri)
    if settings.embedded:  # else `mlflow run` would create the experiment with artifacts in ./mlruns
        ensure_experiment(settings)
    typer.echo(settings.shell_exports(), nl=False)


stack_app = typer.Typer(no_args_is_help=True,
                        help="The tracking node on this box: Postgres + GCS emulator + MLflow with basic-auth.")
app.add_typer(stack_app, name="stack", rich_help_panel=PANEL)
StackDirOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", envvar="FLYWHEEL_STACK_DIR", help="Where the stack keeps data, logs, secrets (default "
                                                     "$FLYWHEEL_HOME/stack).")]


@stack_app.command("up")
def stack_up(
    embedded: Annotated[bool, typer.Option("--embedded", help="Start nothing: keep the SQLite store.")] = False,
    throwaway: Annotated[bool, typer.Option("--throwaway", help="Delete all data on `stack down`.")] = False,
    bucket: Annotated[str, typer.Option(help="GCS bucket (created in the emulator).")] = "flywheel-artifacts",
    mlflow_port: Annotated[int, typer.Option(help="MLflow port; 0: a free one (kept across restarts).")] = 0,
    pg_port: Annotated[int, typer.Option(help="Postgres port; 0: a free one.")] = 0,
    gcs_port: Annotated[int, typer.Option(help="GCS emulator port; 0: a free one.")] = 0,
    state_dir: StackDirOpt = None,
) -> None:
    """Start Postgres, the GCS emulator and the MLflow server with auth on 127.0.0.1."""
    stop_on_sigterm()
    from flywheel.core.config import Settings
    from flywheel.tracking.server import StackConfig
    from flywheel.tracking.server import stack_up as up

    settings = Settings.from_env()
    if embedded:
        typer.echo(f"embedded store, nothing to start: MLFLOW_TRACKING_URI={settings.tracking_uri}")
        return
    cfg = StackConfig.from_settings(settings, state_dir=state_dir, bucket=bucket, mlflow_port=mlflow_port,
                                    pg_port=pg_port, gcs_port=gcs_port, throwaway=throwaway)
    state = up(cfg)
    typer.echo(f"tracking URI: {state.tracking_uri}  (artifacts: {state.artifacts_destination})\n"
               f"log in as '{state.username}', password in {state.password_file}; in a shell:\n"
               f"  source {Path(state.state_dir) / 'env'}\n"
               f"stop with: flywheel stack down --state-dir {state.state_dir}")


@stack_app.command("down")
def stack_down(state_dir: StackDirOpt = None) -> None:
    """Stop what `stack up` started (by PID); data stays unless it was --throwaway."""
    from flywheel.core.config import Settings
    from flywheel.tracking.server import StackConfig
    from flywheel.tracking.server import stack_down as down

    cfg = StackConfig.from_settings(Settings.from_env(), state_dir=state_dir)
    stopped = down(cfg.state_dir)
    typer.echo("stopped: " + ", ".join(stopped) if stopped else f"nothing running in {cfg.state_dir}")


@stack_app.command("status")
def stack_status(state_dir: StackDirOpt = None) -> None:
    """Show each part of the stack: running (pid) and answering, or stopped. Exit 1 if any is down."""
    from flywheel.core.config import Settings
    from flywheel.tracking.server import StackConfig, StackState
    from flywheel.tracking.server import stack_status as status

    cfg = StackConfig.from_settings(Settings.from_env(), state_dir=state_dir)
    parts = status(cfg.state_dir)
    if not parts:
        typer.echo(f"no stack in {cfg.state_dir} (start one with `flywheel stack up`)")
        raise typer.Exit(1)
    state = StackState.load(cfg.state_dir)
    typer.echo(f"tracking URI: {state.tracking_uri}")
    for name, text in parts.items():
        typer.echo(f"{name:15s} {text}")
    if any(not t.startswith("running") or "NOT" in t for t in parts.values()):
        raise typer.Exit(1)


@app.command(rich_help_panel=PANEL)
def doctor(
    backend_store_uri: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_BACKEND_STORE_URI", help="Also check this DB's schema (on the tracking node).")] = None,
    artifacts_destination: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_ARTIFACTS_DESTINATION", help="Also check this gs:// bucket exists.")] = None,
    gcs_emulator: Annotated[Optional[str], typer.Option(
        envvar="STORAGE_EMULATOR_HOST", help="GCS emulator URL for the bucket check.")] = None,
    state_dir: StackDirOpt = None,
    tracking_uri: TrackingOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the tracking setup end to end: server, auth, DB schema, bucket, artifact round-trip.

    Exits 1 when a check fails."""
    from dataclasses import replace

    from flywheel.core.config import redact_uri
    from flywheel.tracking.doctor import print_checks, run_doctor, targets_from_stack
    from flywheel.tracking.server import StackConfig

    settings = settings_for(tracking_uri)
    targets = targets_from_stack(StackConfig.from_settings(settings, state_dir=state_dir).state_dir,
                                 settings.tracking_uri)
    given = {k: v for k, v in (("backend_store_uri", backend_store_uri), ("gcs_emulator_url", gcs_emulator),
                               ("artifacts_destination", artifacts_destination)) if v}
    checks = run_doctor(settings, replace(targets, **given))
    ok = all(c.ok is not False for c in checks)
    if as_json:  # ok: null for a skipped check
        emit_json({"ok": ok, "tracking_uri": redact_uri(settings.tracking_uri), "checks": checks})
    else:
        print_checks(checks)
    if not ok:
        raise typer.Exit(1)

