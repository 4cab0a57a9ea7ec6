"""`flywheel status`: every registered model, its aliases, where each is deployed, its monitor's last
drift window and last retrain request, read from the tracking server alone.

Sources (nothing is kept beside the registry, so the answer is the same from any machine):
- aliases: the registered model's aliases (`candidate`, `dev`, `prod`, and any other one set);
- deployments: the `deployed_<alias>_at` tag `release` writes on the version it put behind an
  endpoint ("<ISO time> <where>", `Registry.mark_deployed`);
- monitoring: the runs of the MLflow `monitoring` experiment tagged `model=<name>` (one per model,
  env and version, `flywheel.monitoring.service`), whose `last_window*`, `last_drift_at` and
  `last_retrain*` tags the monitor updates after every tick that tested a window. Runs written by an
  older monitor (no such tags) still give their latest `p_value` and `drift_detected` metrics.

Read through one explicit client (`Registry(settings).client`), never the process-global URI.
"""

from __future__ import annotations

from dataclasses import dataclass

from flywheel.core.config import ALIASES, Settings
from flywheel.core.errors import FlywheelError

MONITORING_EXPERIMENT = "monitoring"  # flywheel.monitoring.service.EXPERIMENT (a node package: not imported)
MAX_MONITOR_RUNS = 500  # newest monitoring runs read per model (one run per model, env and version)


@dataclass(frozen=True)
class AliasStatus:
    alias: str
    version: str
    deployed_at: str | None = None  # when `release` moved this alias there (None: never released, e.g. candidate)
    deployed_to: str | None = None  # the endpoint it was released to ("torchserve http://...", "docker ...")


@dataclass(frozen=True)
class WindowStatus:
    """The newest drift window one monitor (model, env) tested."""

    env: str
    version: str
    run_id: str
    window: int | None
    at: str | None  # ISO time the window was tested (None: an older monitor's run: its end time is `run_end`)
    drift: bool | None
    p_value: float | None
    last_drift_at: str | None = None
    run_end: str | None = None


@dataclass(frozen=True)
class RetrainStatus:
    """The newest retrain request a monitor queued for the model."""

    at: str
    reason: str
    env: str
    version: str
    window: int | None
    run_id: str


@dataclass(frozen=True)
class ModelStatus:
    name: str
    latest_version: str | None
    aliases: tuple[AliasStatus, ...]
    windows: tuple[WindowStatus, ...]  # one per monitored env, newest first
    last_retrain: RetrainStatus | None


def collect_status(settings: Settings, models: list[str] | None = None) -> list[ModelStatus]:
    """The status of `models` (default: every registered model), in name order."""
    from mlflow.exceptions import MlflowException

    from flywheel.core.registry import Registry

    client = Registry(settings).client
    try:
        registered = {m.name: m for m in _all_registered(client)}
        experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    except MlflowException as exc:
        raise FlywheelError(f"tracking server {settings.tracking_uri} unreadable: {exc.message}") from None
    names = sorted(registered) if not models else list(models)
    missing = [n for n in names if n not in registered]
    if missing:
        raise FlywheelError(f"no registered model {', '.join(map(repr, missing))} at {settings.tracking_uri}; "
                            f"registered: {', '.join(sorted(registered)) or 'none'}")
    out = []
    for name in names:
        rm = registered[name]
        runs = _monitor_runs(client, experiment.experiment_id, name) if experiment is not None else []
        windows, retrain = _monitoring(runs)
        out.append(ModelStatus(name, _latest_version(client, name), _aliases(client, rm), windows, retrain))
    return out


def _all_registered(client) -> list:
    found, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def _latest_version(client, name: str) -> str | None:
    versions = client.search_model_versions(f"name='{_quote(name)}'")
    return max((str(v.version) for v in versions), key=int, default=None)


def _aliases(client, rm) -> tuple[AliasStatus, ...]:
    aliases = dict(rm.aliases or {})
    order = [a for a in ALIASES if a in aliases] + sorted(a for a in aliases if a not in ALIASES)
    out = []
    for alias in order:
        version = str(aliases[alias])
        tags = client.get_model_version(rm.name, version).tags or {}
        stamp, _, where = (tags.get(f"deployed_{alias}_at") or "").partition(" ")
        out.append(AliasStatus(alias, version, stamp or None, where or None))
    return tuple(out)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _monitor_runs(client, experiment_id: str, name: str) -> list:
    return list(client.search_runs([experiment_id], filter_string=f"tags.model = '{_quote(name)}'",
                                   order_by=["attributes.start_time DESC"], max_results=MAX_MONITOR_RUNS))


def _iso_ms(ms: int | None) -> str | None:
    from datetime import datetime, timezone

    return None if not ms else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def _monitoring(runs: list) -> tuple[tuple[WindowStatus, ...], RetrainStatus | None]:
    """Newest window per env (by the tested-at tag, else the run's start) and the newest retrain."""
    by_env: dict[str, WindowStatus] = {}
    retrain: RetrainStatus | None = None
    for run in runs:  # newest run first
        tags, metrics = run.data.tags, run.data.metrics
        env, version = tags.get("env", "?"), tags.get("version", "?")
        window = WindowStatus(
            env, version, run.info.run_id,
            int(tags["last_window"]) if tags.get("last_window", "").isdigit() else None,
            tags.get("last_window_at"),
            {"true": True, "false": False}.get(tags.get("last_window_drift", ""),
                                               None if "drift_detected" not in metrics
                                               else bool(metrics["drift_detected"])),
            float(tags["last_window_p_value"]) if tags.get("last_window_p_value") else metrics.get("p_value"),
            tags.get("last_drift_at"), _iso_ms(run.info.end_time))
        if window.p_value is None and window.window is None:
            continue  # a run that never logged a window
        known = by_env.get(env)
        if known is None or (window.at or "") > (known.at or ""):
            by_env[env] = window
        if tags.get("last_retrain_at") and (retrain is None or tags["last_retrain_at"] > retrain.at):
            retrain = RetrainStatus(tags["last_retrain_at"], tags.get("last_retrain_reason", "?"), env, version,
                                    int(tags["last_retrain_window"]) if tags.get("last_retrain_window", "").isdigit()
                                    else None, run.info.run_id)
    windows = sorted(by_env.values(), key=lambda w: (w.at or w.run_end or ""), reverse=True)
    return tuple(windows), retrain


def render_table(statuses: list[ModelStatus], tracking_uri: str):
    """A rich Table: one row per alias (a model with none gets one row), monitor columns on the row
    of the env it watches, the last retrain on the model's first row."""
    from rich.table import Table

    table = Table(title=f"models at {tracking_uri}", show_lines=True)
    for col in ("model", "alias", "version", "deployed", "last drift window", "last retrain"):
        table.add_column(col)
    for s in statuses:
        windows = {w.env: w for w in s.windows}
        rows = list(s.aliases) or [None]
        shown: set[str] = set()
        for i, a in enumerate(rows):
            w = windows.get(a.alias) if a is not None else None
            if w is not None:
                shown.add(w.env)
            table.add_row(s.name if i == 0 else "", a.alias if a else "-",
                          f"v{a.version}" if a else (f"latest v{s.latest_version}" if s.latest_version else "-"),
                          f"{a.deployed_at}\n{a.deployed_to}" if a and a.deployed_at else "-",
                          _window_text(w), _retrain_text(s.last_retrain) if i == 0 else "")
        for w in s.windows:  # monitors of an env no alias names (any more)
            if w.env not in shown:
                table.add_row("", f"({w.env})", f"v{w.version}", "-", _window_text(w), "")
    return table


def _window_text(w: WindowStatus | None) -> str:
    if w is None:
        return "-"
    verdict = "drift" if w.drift else "no drift" if w.drift is not None else "?"
    p = f" p={w.p_value:.3g}" if w.p_value is not None else ""
    when = w.at or (f"run ended {w.run_end}" if w.run_end else "")
    return (f"#{w.window} " if w.window is not None else "") + f"v{w.version} {verdict}{p}\n{when}".rstrip()


def _retrain_text(r: RetrainStatus | None) -> str:
    return "-" if r is None else f"{r.at}\n{r.reason} ({r.env} v{r.version})"
