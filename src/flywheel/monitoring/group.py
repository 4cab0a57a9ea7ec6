"""Several monitors in one process (`flywheel monitor --model a --model b`, or `--config`).

Each model (and env) is its own `Monitor` with its own reference, windows, policy, triggers and state
dir; they share one Prometheus registry, so one /metrics endpoint serves every model's series, told
apart by their `model` and `env` labels. A model whose tick fails (no `prod` alias yet, its reference
missing, a store error) is logged and counted in `flywheel_monitor_errors_total{model,env}`
(`flywheel_monitor_up` goes 0); the others go on.

Kept apart from `service.py`, which is one model's monitor: this module only builds, ticks and
serves a list of them, and says where each keeps its state (`monitor_state_dir`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError
from flywheel.monitoring.metrics import Metrics
from flywheel.monitoring.service import Monitor, MonitorConfig, TickSummary, WindowResult

log = logging.getLogger("flywheel.monitor")


def monitor_state_dir(state_dir: Path | None, work_dir: Path, model: str, env: str, several: bool) -> Path:
    """Where one model's monitor keeps its state. Default `work_dir/monitor/<model>-<env>` (one per
    model and env, as always). An explicit `state_dir` is used as it is for one model (today's layout)
    and holds a `<model>-<env>` sub-dir per model for several; a state dir that already holds one
    model's state is refused for several (whose state would it be?) rather than guessed."""
    if state_dir is None:
        return Path(work_dir) / "monitor" / f"{model}-{env}"
    if not several:
        return Path(state_dir)
    if (Path(state_dir) / "state.json").is_file():
        raise FlywheelError(f"{state_dir} holds one model's monitor state (state.json); with several models each "
                            f"keeps its state in {state_dir}/<model>-<env>/: move those files into the sub-dir of "
                            f"the model they belong to (e.g. {Path(state_dir) / f'{model}-{env}'}), or give another "
                            "--state-dir")
    return Path(state_dir) / f"{model}-{env}"


@dataclass(frozen=True)
class TickOutcome:
    """One model's part of a group tick: its windows, or the error that stopped it (the rest went on)."""

    model: str
    env: str
    results: list[WindowResult]
    summary: TickSummary | None
    error: str | None = None


class MonitorGroup:
    """Several monitors (model, env) in one process: one Prometheus registry and endpoint, each model
    ticked on its own interval, a failing model logged and counted while the others go on."""

    def __init__(self, monitors: list[Monitor], metrics_port: int | None = None, metrics_addr: str = "127.0.0.1"):
        if not monitors:
            raise FlywheelError("no model to monitor: name one with --model (or list them in --config)")
        seen: dict = {}
        for m in monitors:
            key = (m.cfg.model, m.cfg.env)
            if key in seen:
                raise FlywheelError(f"{m.cfg.model}@{m.cfg.env} is listed twice: monitor each model and env once")
            where = Path(m.cfg.state_dir).resolve()
            if where in seen.values():
                raise FlywheelError(f"two monitors share state dir {m.cfg.state_dir}: give each model its own")
            seen[key] = where
        if len({id(m.metrics.registry) for m in monitors}) != 1 and metrics_port is not None:
            raise FlywheelError("the monitors of one group must share one Metrics registry (MonitorGroup.build)")
        self.monitors = list(monitors)
        self.metrics_port, self.metrics_addr = metrics_port, metrics_addr

    @classmethod
    def build(cls, configs: list[MonitorConfig], settings: Settings, actions: list | None = None,
              policies: list | None = None, metrics_port: int | None = None,
              metrics_addr: str = "127.0.0.1") -> MonitorGroup:
        """One Monitor per config (with `policies[i]`, default PolicyConfig()), all on one Metrics registry."""
        if not configs:
            raise FlywheelError("no model to monitor: name one with --model (or list them in --config)")
        shared = Metrics(configs[0].model, configs[0].env)
        policies = policies or [None] * len(configs)
        return cls([Monitor(c, settings, actions, p, metrics=shared) for c, p in zip(configs, policies, strict=True)],
                   metrics_port, metrics_addr)

    @property
    def metrics(self) -> Metrics:
        return self.monitors[0].metrics

    def tick_one(self, mon: Monitor) -> TickOutcome:
        """One model's tick; its failure is logged, counted (`flywheel_monitor_errors_total`) and returned."""
        cfg, m = mon.cfg, mon.metrics
        try:
            results = mon.tick()
        except FlywheelError as exc:
            error = str(exc)
            log.error("monitor of %s@%s failed: %s", cfg.model, cfg.env, error)
        except Exception as exc:  # noqa: BLE001 - one model's fault must not stop the others; next tick retries
            error = f"{type(exc).__name__}: {exc}"
            log.exception("monitor of %s@%s failed", cfg.model, cfg.env)
        else:
            m.up.labels(**m.labels).set(1)
            return TickOutcome(cfg.model, cfg.env, results, mon.last_tick)
        m.errors.labels(**m.labels).inc()
        m.up.labels(**m.labels).set(0)
        return TickOutcome(cfg.model, cfg.env, [], None, error)

    def tick(self) -> list[TickOutcome]:
        """Every model once, in order (what `--once` runs)."""
        return [self.tick_one(mon) for mon in self.monitors]

    def close(self) -> None:
        for mon in self.monitors:
            mon.close()

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Tick each model every its `interval_s` until SIGTERM/SIGINT (or `stop`); holds every model's
        state dir lock throughout (MonitorBusy if another process has one: nothing starts)."""
        from contextlib import ExitStack

        stop = stop or threading.Event()
        with ExitStack() as held:
            for mon in self.monitors:
                held.enter_context(mon.locked())
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: stop.set())
            http = None
            if self.metrics_port is not None:
                http = self.metrics.serve(self.metrics_port, self.metrics_addr)
                log.info("metrics of %d model(s) on http://%s:%d/metrics", len(self.monitors), self.metrics_addr,
                         self.metrics_port)
            due = [0.0] * len(self.monitors)
            try:
                while not stop.is_set():
                    for i, mon in enumerate(self.monitors):
                        if stop.is_set():
                            break
                        if time.monotonic() >= due[i]:
                            self.tick_one(mon)
                            due[i] = time.monotonic() + mon.cfg.interval_s
                    stop.wait(max(0.0, min(due) - time.monotonic()))
            finally:
                self.close()
                if isinstance(http, tuple):  # prometheus_client >= 0.17 returns (server, thread)
                    http[0].shutdown()
                    http[0].server_close()


def describe_tick(summary: TickSummary | None, capture_uri: str, model: str) -> str:
    """One line for `flywheel monitor --once`: what was read, what waits, what was skipped."""
    if summary is None:
        return "no tick ran"
    if summary.store_has_captures is False:
        from flywheel.contracts.capture import CAPTURES, safe_name

        return (f"no captures of {model} in {capture_uri} (looked in {capture_uri.rstrip('/')}/{safe_name(model)}/"
                f"{CAPTURES}/): is serving capturing there (FLYWHEEL_CAPTURE_URI)? no window tested")
    skipped = []
    for kind, n in sorted(summary.marked.items()):
        skipped.append(f"{n} {kind}")
    if summary.other_version:
        skipped.append(f"{summary.other_version} of versions without a reference")
    if summary.malformed:
        skipped.append(f"{summary.malformed} malformed")
    read = f"read {summary.read} new captures" + (f" (skipped {', '.join(skipped)})" if skipped else "")
    tested = (f"{summary.windows} window{'s' if summary.windows != 1 else ''} tested" if summary.windows
              else "no window tested")
    others = "".join(f"; v{v}: {c['monitored']} read, {c['pending']} pending, {c['windows']} window"
                     f"{'s' if c['windows'] != 1 else ''} tested" for v, c in sorted(summary.versions.items()))
    return (f"{read}; {summary.pending} captured predictions pending of a {summary.window} window "
            f"(v{summary.version}); {tested}{others}")
