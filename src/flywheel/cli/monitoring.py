"""Monitor node's verb: monitor (drift against the version's reference, retrain triggers); its data
verbs (snapshot, feedback) are in cli/data.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flywheel.cli._common import (
    CaptureUriOpt,
    ModelNameAlias,
    ModelOpt,
    TrackingOpt,
    emit_json,
    fail,
    model_of,
    settings_for,
    stop_on_sigterm,
)

PANEL = "Monitor node"
app = typer.Typer()


@app.command(rich_help_panel=PANEL)
def monitor(
    model: ModelOpt = None,
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
    cooldown: Annotated[float, typer.Option(help="Seconds after a retrain before drift may trigger again.")] = 3600.0,
    schedule: Annotated[Optional[float], typer.Option(help="Also retrain every this many seconds.")] = None,
    min_labelled: Annotated[Optional[int], typer.Option(help="Also retrain after this many new labels.")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Cursor, policy, outbox (default $FLYWHEEL_HOME/monitor).")] = None,
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
    """Watch captured traffic for drift against the version's reference and trigger retraining."""
    stop_on_sigterm()
    import logging
    import os

    from flywheel.monitoring.service import Monitor, MonitorConfig, describe_tick
    from flywheel.monitoring.triggers import PolicyConfig, build_actions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_for(tracking_uri, model_of(model, model_name))
    if as_json and not once:
        fail("--json reports one pass: use it with --once")
    actions = build_actions(github_repo, os.environ.get("GITHUB_TOKEN"), github_api, ssh_node, ssh_command,
                            identity or ssh_key, known_hosts, local_command)
    cfg = MonitorConfig(model=settings.model_name, capture_uri=capture_uri or settings.capture_uri, env=env,
                        state_dir=state_dir or settings.work_dir / "monitor" / f"{settings.model_name}-{env}",
                        window=window, alpha=alpha, interval_s=interval, metrics_port=metrics_port,
                        metrics_addr=metrics_addr, snapshot_dir=snapshot_dir or settings.work_dir / "snapshots",
                        from_now=from_now, horizon_s=capture_horizon)
    policy = PolicyConfig(consecutive=consecutive, cooldown_s=cooldown, schedule_s=schedule,
                          min_labelled=min_labelled)
    mon = Monitor(cfg, settings, actions, policy)
    if once:
        try:
            results = mon.tick()
            if as_json:
                return emit_json({"model": cfg.model, "env": env, "windows": results, "read": mon.last_tick,
                                  "summary": describe_tick(mon.last_tick, cfg.capture_uri, cfg.model)})
            for r in results:
                typer.echo(f"window {r.index} v{r.version}: p={r.p_value:.3g} (embedding {r.p_embedding:.3g}, "
                           f"prediction {r.p_prediction:.3g}) drift={r.drift}"
                           + (f" accuracy={r.accuracy:.3f}" if r.accuracy is not None else "")
                           + (f" -> retrain ({r.trigger})" if r.trigger else ""))
            typer.echo(describe_tick(mon.last_tick, cfg.capture_uri, cfg.model))
        finally:
            mon.close()
    else:
        mon.serve_forever()

