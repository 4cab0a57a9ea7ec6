"""Monitor node's verb: monitor (drift against the version's reference, retrain triggers); its data
verbs (snapshot, feedback) are in cli/data.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import (
    CaptureUriOpt,
    ModelNameAlias,
    TrackingOpt,
    emit_json,
    fail,
    settings_for,
    stop_on_sigterm,
)

PANEL = "Monitor node"
app = typer.Typer()
# Repeatable: one process watches every model named (FLYWHEEL_MODEL_NAME may list several, space-separated).
ModelsOpt = Annotated[Optional[list[str]], typer.Option(
    "--model", envvar="FLYWHEEL_MODEL_NAME",
    help="Registered model to watch; repeat for several models in one process (default fashion-classifier).")]


@app.command(rich_help_panel=PANEL)
def monitor(
    ctx: typer.Context,
    model: ModelsOpt = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="YAML listing the models to watch, each with its own env/window/alpha/policy (see "
                         "docs/runbooks/monitor.md); the options here are their defaults.")] = None,
    env: Annotated[str, typer.Option(help="Alias whose served traffic is monitored: prod | dev.")] = "prod",
    capture_uri: CaptureUriOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Process what is there, then exit (cron).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: print the windows tested and what was "
                                                         "read as one JSON document on stdout.")] = False,
    from_now: Annotated[bool, typer.Option("--from-now", help="First run: skip captures already stored.")] = False,
    capture_horizon: Annotated[float, typer.Option(
        min=1, help="Seconds a capture batch may take from being named to being stored, plus the largest clock "
                    "difference between serving replicas and this node: batches later than that are not read.")] = 600.0,
    window: Annotated[int, typer.Option(min=10, help="Captured predictions per drift test.")] = 100,
    alpha: Annotated[float, typer.Option(help="False-alarm budget per window.")] = 0.01,
    interval: Annotated[float, typer.Option(help="Seconds between ticks of the service.")] = 30.0,
    consecutive: Annotated[int, typer.Option(min=1, help="Drifting windows in a row that open an episode.")] = 3,
    accuracy_consecutive: Annotated[int, typer.Option(
        min=0, help="Labelled windows in a row whose accuracy is below the version's reference (exact binomial "
                    "test at --alpha) that open an accuracy episode; 0: report the alarm, never retrain on it.")] = 3,
    cooldown: Annotated[float, typer.Option(help="Seconds after a retrain before drift may trigger again.")] = 3600.0,
    schedule: Annotated[Optional[float], typer.Option(help="Also retrain every this many seconds.")] = None,
    min_labelled: Annotated[Optional[int], typer.Option(help="Also retrain after this many new labels.")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(
        help="Cursor, policy, outbox (default $FLYWHEEL_HOME/monitor/<model>-<env>); with several models, "
             "each keeps its state in a <model>-<env> sub-dir of it.")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(envvar="FLYWHEEL_MONITOR_PORT",
                                                        help="Serve Prometheus /metrics on this port.")] = None,
    metrics_addr: Annotated[str, typer.Option(help="Address for /metrics.")] = "127.0.0.1",
    snapshot_dir: Annotated[Optional[Path], typer.Option(
        help="Where `data snapshot` writes; its latest snapshot goes with retrains (default $FLYWHEEL_HOME/snapshots).")] = None,
    github_repo: Annotated[Optional[str], typer.Option(envvar="FLYWHEEL_GITHUB_REPO",
                                                       help="owner/name: retrain by repository_dispatch.")] = None,
    github_api: Annotated[str, typer.Option(envvar="GITHUB_API_URL", help="GitHub API base URL.")] = "https://api.github.com",
    ssh_node: Annotated[Optional[str], typer.Option(help="user@host[:port]: retrain by running --ssh-command there.")] = None,
    ssh_command: Annotated[Optional[str], typer.Option(help="Command template for --ssh-node.")] = None,
    identity: Annotated[Optional[str], typer.Option("--identity", "-i", help="SSH private key file for --ssh-node.")
                        ] = None,
    ssh_key: Annotated[Optional[str], typer.Option("--ssh-key", hidden=True)] = None,  # --identity's old name
    known_hosts: Annotated[Optional[str], typer.Option(
        "--known-hosts", help="known_hosts pinning --ssh-node's host key.")] = None,
    local_command: Annotated[Optional[str], typer.Option(help="Retrain by running this command here.")] = None,
    tracking_uri: TrackingOpt = None,
    model_name: ModelNameAlias = None,
) -> None:
    """Watch captured traffic for drift against the version's reference and trigger retraining.

    Several models: repeat --model, or list them in --config; one process, one /metrics endpoint whose
    series carry `model` and `env` labels; a model that fails (no alias yet) does not stop the others."""
    stop_on_sigterm()
    import logging
    import os
    from dataclasses import replace

    from click.core import ParameterSource

    from flywheel.monitoring.group import MonitorGroup, describe_tick, monitor_state_dir
    from flywheel.monitoring.monitors_file import MonitorEntry, read_monitors_file
    from flywheel.monitoring.service import MonitorConfig
    from flywheel.monitoring.triggers import PolicyConfig, build_actions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if as_json and not once:
        fail("--json reports one pass: use it with --once")
    named = [model_name] if model_name else list(model or [])
    if config is not None and ctx.get_parameter_source("model") == ParameterSource.COMMANDLINE:
        fail("name the models with --model or in --config, not both")
    settings = settings_for(tracking_uri, named[0] if named and config is None else None)
    base = MonitorEntry(model=settings.model_name, env=env, window=window, alpha=alpha, interval=interval,
                        consecutive=consecutive, cooldown=cooldown, schedule=schedule, min_labelled=min_labelled,
                        accuracy_consecutive=accuracy_consecutive or None, from_now=from_now)
    entries = (read_monitors_file(config, base) if config is not None
               else [base] if not named else [replace(base, model=m) for m in named])
    actions = build_actions(github_repo, os.environ.get("GITHUB_TOKEN"), github_api, ssh_node, ssh_command,
                            identity or ssh_key, known_hosts, local_command)
    several = len(entries) > 1
    configs = [MonitorConfig(model=e.model, capture_uri=e.capture_uri or capture_uri or settings.capture_uri,
                             env=e.env, state_dir=e.state_dir or monitor_state_dir(state_dir, settings.work_dir,
                                                                                   e.model, e.env, several),
                             window=e.window, alpha=e.alpha, interval_s=e.interval, dataset=e.dataset,
                             snapshot_dir=snapshot_dir or settings.work_dir / "snapshots", from_now=e.from_now,
                             horizon_s=capture_horizon) for e in entries]
    policies = [PolicyConfig(consecutive=e.consecutive, cooldown_s=e.cooldown, schedule_s=e.schedule,
                             min_labelled=e.min_labelled, accuracy_consecutive=e.accuracy_consecutive or None)
                for e in entries]
    group = MonitorGroup.build(configs, settings, actions, policies, metrics_port, metrics_addr)
    if not once:
        return group.serve_forever()
    import contextlib
    import sys

    # MLflow prints "View run … at …" on stdout when a run against a server ends: with --json, stdout
    # carries the one JSON document only, so anything else said during the pass goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        try:
            outcomes = group.tick()
        finally:
            group.close()
    reports = [{"model": o.model, "env": o.env, "windows": o.results, "read": o.summary,
                "summary": describe_tick(o.summary, c.capture_uri, c.model) if o.error is None else None,
                "error": o.error} for o, c in zip(outcomes, configs, strict=True)]
    failed = [o for o in outcomes if o.error is not None]
    if as_json:
        if not several:  # one model: the document `--once --json` always printed
            if not failed:
                emit_json({k: v for k, v in reports[0].items() if k != "error"})
        else:
            emit_json({"monitors": reports})
    else:
        for o, report in zip(outcomes, reports, strict=True):
            prefix = f"{o.model}@{o.env}: " if several else ""
            for r in o.results:
                typer.echo(f"{prefix}window {r.index} v{r.version}: p={r.p_value:.3g} (embedding "
                           f"{r.p_embedding:.3g}, prediction {r.p_prediction:.3g}) drift={r.drift}"
                           + (f" accuracy={r.accuracy:.3f}" if r.accuracy is not None else "")
                           + (f" (reference {r.reference_accuracy:.3f}, p={r.p_accuracy:.3g}) "
                              f"accuracy_alarm={r.accuracy_alarm}" if r.p_accuracy is not None else "")
                           + (f" -> retrain ({r.trigger})" if r.trigger else ""))
            if o.error is None:
                typer.echo(prefix + report["summary"])
    if failed:
        fail(failed[0].error if not several else f"{len(failed)} of {len(outcomes)} monitors failed: "
             + "; ".join(f"{o.model}@{o.env}: {o.error}" for o in failed))

