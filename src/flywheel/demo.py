"""`flywheel demo`: the whole flywheel turning on one machine, with real parts.

tracking node → `mlflow run` trains v1 → gate → candidate → package → release to a dev TorchServe →
acceptance → prod → a client sends real images over HTTP, captured → the traffic shifts → the monitor
detects drift and triggers retraining on base + labelled captures → v2 passes the gate → released to
prod with zero downtime while the client keeps sending → timeline and accuracies.

A failing step stops the demo naming the step and its log; everything started is stopped at the end
unless `keep` (then the stop command is printed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the checkout holding MLproject (fashion-mnist: delegates to examples/fashion-mnist)


@dataclass(frozen=True)
class DemoConfig:
    work_dir: Path
    model_name: str = "fashion-classifier"
    dataset: str = "fashion-mnist"
    epochs: int = 3
    batch_size: int = 128
    shift: str = "catalogue"
    clean_samples: int = 400  # clean traffic before the shift: ≥ several monitor windows without alarm
    max_shift_samples: int = 300  # the monitor must trigger within this many shifted requests
    labelled_samples: int = 800  # shifted captures the labelling team returns before retraining
    window: int = 50  # monitor window (served samples)
    consecutive: int = 3  # drifting windows in a row that open a drift episode (one retrain each)
    request_interval_s: float = 0.02  # client pacing: ~50 req/s leaves CPU for retraining
    retrain_margin: float = -0.01  # a drift retrain may give up ≤1 pt of clean accuracy to learn the shift
    full: bool = False
    keep: bool = False
    data_dir: Path | None = None


@dataclass
class Step:
    name: str
    seconds: float
    log: str = ""


class Timeline:
    def __init__(self, console):
        self.steps: list[Step] = []
        self.console = console
        self.started = time.perf_counter()

    @contextmanager
    def step(self, name: str, log: Path | None = None):
        self.console.rule(f"[bold cyan]{name}")
        t0 = time.perf_counter()
        try:
            yield
        except FlywheelError as exc:
            raise FlywheelError(f"demo step '{name}' failed: {exc}" + (f" (log: {log})" if log else "")) from exc
        except Exception as exc:  # any failure stops the demo with the step named
            raise FlywheelError(f"demo step '{name}' failed: {type(exc).__name__}: {exc}"
                                + (f" (log: {log})" if log else "")) from exc
        self.steps.append(Step(name, time.perf_counter() - t0, str(log or "")))

    def seconds(self, name: str) -> float:
        return next((s.seconds for s in self.steps if s.name == name), 0.0)


class TrafficClient(threading.Thread):
    """One client sending real images to /predictions/M over HTTP, paced; counts every outcome."""

    def __init__(self, client, model: str, interval_s: float):
        super().__init__(daemon=True, name="demo-client")
        self.client, self.model, self.interval_s = client, model, interval_s
        self._lock = threading.Lock()
        self._source: list[tuple[bytes, int]] = []
        self._halt = threading.Event()
        self.sent = 0
        self.failed: list[str] = []
        self.versions: Counter[str] = Counter()
        self.served: list[tuple[str, int, bool, float]] = []  # (prediction_id, true label, shifted, time)
        self.shifted = False

    def set_source(self, images: list[bytes], labels: np.ndarray, shifted: bool) -> None:
        with self._lock:
            self._source = list(zip(images, labels.tolist(), strict=True))
            self.shifted = shifted

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            with self._lock:
                png, label = self._source[i % len(self._source)]
                shifted = self.shifted
            i += 1
            try:
                r = self.client.predict(self.model, png)
                body = r.json() if r.status_code == 200 else {}
                if r.status_code != 200:
                    self.failed.append(f"HTTP {r.status_code}: {r.text[:120]}")
                else:
                    with self._lock:
                        self.versions[str(body.get("version"))] += 1
                        self.served.append((body["prediction_id"], label, shifted, time.time()))
            except Exception as exc:  # a failed request is a finding, not a crash
                self.failed.append(f"{type(exc).__name__}: {exc}")
            self.sent += 1
            self._halt.wait(self.interval_s)

    def count(self, shifted: bool | None = None, before: float | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.served
                       if (shifted is None or s[2] == shifted) and (before is None or s[3] <= before))

    def wait_for(self, n: int, shifted: bool | None = None, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(shifted) < n:
            if time.monotonic() > deadline:
                raise FlywheelError(f"client served {self.count(shifted)} of {n} requests in {timeout:.0f} s; "
                                    f"last failures: {self.failed[-3:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def _mlflow_run(settings: Settings, log: Path, **params: object) -> None:
    """`mlflow run <project> -e train` exactly as a training node runs it, logging to `settings`."""
    if not (PROJECT_DIR / "MLproject").is_file():
        raise FlywheelError(f"no MLproject in {PROJECT_DIR}: run the demo from a checkout of the repo")
    from flywheel.core.runlog import ensure_experiment

    ensure_experiment(settings)  # created here, an embedded store keeps its artifacts in the demo's dir
    venv_bin = Path(sys.executable).parent
    cmd = [str(venv_bin / "mlflow"), "run", str(PROJECT_DIR), "-e", "train", "--env-manager", "local",
           "--experiment-name", settings.experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = {**os.environ, **settings.child_env(), "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    with open(log, "w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode
    if code != 0:
        raise FlywheelError(f"mlflow run exited {code}: {log.read_text()[-600:]}")


def _version_of_run(settings: Settings, name: str, log: Path) -> str:
    """The version the last `mlflow run` registered (its gate decision is in the log)."""
    from flywheel.core.registry import Registry

    client = Registry(settings).client
    runs = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    run = runs[0]
    if run.data.tags.get("gate.decision") != "accepted":
        raise FlywheelError(f"run {run.info.run_id} was not registered: gate {run.data.tags.get('gate.decision')} "
                            f"(challenger {run.data.metrics.get('gate_challenger_accuracy')}, champion "
                            f"{run.data.metrics.get('gate_champion_accuracy')})")
    [mv] = client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
    return str(mv.version)


def _accuracy_on(settings: Settings, name: str, version: str, images: np.ndarray, labels: np.ndarray) -> float:
    from flywheel.core.evaluate import predict
    from flywheel.core.models import load_model

    model, spec = load_model(f"models:/{name}/{version}")
    return float((predict(model, images, spec).argmax(1) == labels).mean())


def run_demo(keep: bool = False, full: bool = False, data_dir: Path | None = None,
             work_dir: Path | None = None, **overrides) -> dict:
    """Run the loop; returns the figures it printed (for tests and benchmarks).

    `overrides` set other DemoConfig fields (a smaller dataset, fewer samples) for quick runs."""
    from rich.console import Console

    base = Settings.from_env(data_dir=data_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = DemoConfig(work_dir=(work_dir or base.work_dir / "demo" / stamp).resolve(), full=full, keep=keep,
                     data_dir=data_dir, model_name=base.model_name, **overrides)
    console = Console()
    with ExitStack() as cleanup:
        timeline = Timeline(console)
        result = _loop(cfg, timeline, cleanup, console)
        if keep:
            cleanup.pop_all()  # leave everything running
        _print_report(cfg, timeline, result, console)
    return result


def _loop(cfg: DemoConfig, timeline: Timeline, cleanup: ExitStack, console) -> dict:
    from flywheel.contracts.capture import write_feedback
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits
    from flywheel.core.registry import Registry
    from flywheel.core.shifts import shift_images
    from flywheel.serving.package import PackageConfig, package_version
    from flywheel.serving.release import ManagementTarget, release_version
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    logs = cfg.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = cfg.model_name
    out: dict = {"work_dir": str(cfg.work_dir), "stop_commands": []}

    # 1. Tracking node.
    with timeline.step("tracking node", logs):
        settings = _tracking(cfg, cleanup, out, console)

    # 2. v1: trained exactly as a training node does it, then gated and registered.
    log = logs / "train-v1.log"
    with timeline.step("train v1 (mlflow run)", log):
        _mlflow_run(settings, log, dataset=cfg.dataset, epochs=cfg.epochs, **_data_param(cfg))
        v1 = _version_of_run(settings, name, log)
        console.print(f"registered {name} v{v1} as candidate")

    # 3. Package, dev and prod TorchServe, release to dev then prod (acceptance gates both).
    captures = cfg.work_dir / "captures"
    with timeline.step("package v1"):
        mar_v1 = package_version(PackageConfig(name, version=v1, out_dir=cfg.work_dir / "archives"), settings)
        console.print(f"{mar_v1.mar_path}")
    servers = {}
    for env in ("dev", "prod"):
        serve_dir = cfg.work_dir / f"serve-{env}"
        with timeline.step(f"start TorchServe {env}", serve_dir / "torchserve.log"):
            capture_env = {"FLYWHEEL_CAPTURE_URI": str(captures)} if env == "prod" else {}
            servers[env] = start_torchserve(ServeConfig.local(serve_dir, serve_dir / "model-store"), env=capture_env)
            cleanup.callback(servers[env].stop)
            if cfg.keep:  # left running: a renewer process keeps its keys valid, exits with the server
                servers[env].renew_in_background()
            out["stop_commands"].append(f"kill -- -{servers[env].proc.pid}  # TorchServe {env}")
    targets = {env: ManagementTarget(s.cfg.inference_address, s.cfg.management_address, s.key_file,
                                     s.cfg.model_store, grace_s=2.0) for env, s in servers.items()}
    for env in ("dev", "prod"):
        with timeline.step(f"release v1 → {env}", servers[env].log_path):
            r = release_version(settings, name, v1, env, targets[env], mar_path=mar_v1.mar_path)
            console.print(r.report.summary() if r.report else "released")

    # 4. A client sends real images (validation split: never the frozen test split) over HTTP.
    splits = load_splits(cfg.dataset, cfg.data_dir)
    # Clean and shifted traffic come from disjoint halves of the validation split.
    half = len(splits.val) // 2
    clean_images, clean_labels = splits.val.images[:half], splits.val.labels[:half]
    pool_images, pool_labels = splits.val.images[half:], splits.val.labels[half:]
    client = TrafficClient(servers["prod"].client(), name, cfg.request_interval_s)
    client.set_source([encode_png(img) for img in clean_images], clean_labels, shifted=False)
    client.start()
    cleanup.callback(client.stop)
    monitor = _Monitor(cfg, settings, captures, logs / "monitor.log")
    with timeline.step("clean traffic: monitor stays quiet", logs / "monitor.log"):
        client.wait_for(cfg.clean_samples, shifted=False)
        alarms = monitor.poll()
        if alarms:
            raise FlywheelError(f"false alarm on clean traffic: {alarms}")
        console.print(f"{client.count(False)} clean requests served, {monitor.windows} windows checked, no drift")

    # 5. The traffic shifts; the monitor must trigger within max_shift_samples served requests.
    client.set_source([encode_png(img) for img in shift_images(pool_images, cfg.shift)], pool_labels, shifted=True)
    with timeline.step(f"traffic shifts ({cfg.shift}): drift detected, retrain triggered", logs / "monitor.log"):
        event = monitor.wait_for_trigger(client, cfg.max_shift_samples)
        out["shifted_samples_to_trigger"] = monitor.trigger_samples
        console.print(f"drift after {monitor.trigger_samples} shifted requests: {event.details.get('note', '')}; "
                      f"retrain request {event.event_id} ({event.reason}) fired")

    with timeline.step("labelled captures → dataset snapshot", logs):
        client.wait_for(cfg.labelled_samples, shifted=True, timeout=600)
        with client._lock:
            labels = {pid: splits.class_names[label] for pid, label, shifted, _ in client.served if shifted}
        write_feedback(str(captures), name, labels)
        snapshot_dir = monitor.snapshot(cfg.work_dir / "datasets", splits.class_names)
        console.print(f"{len(labels)} labels returned; snapshot at {snapshot_dir}")
    monitor.close()  # its part of the loop is done: the monitoring run ends FINISHED

    log = logs / "train-v2.log"
    with timeline.step("retrain v2 on base + labelled captures (mlflow run)", log):
        _mlflow_run(settings, log, dataset=cfg.dataset, epochs=cfg.epochs, extra_data=str(snapshot_dir),
                    margin=cfg.retrain_margin, **_data_param(cfg))
        v2 = _version_of_run(settings, name, log)
        console.print(f"registered {name} v{v2} as candidate (gate margin {cfg.retrain_margin})")

    # 6. v2 to dev, then prod while the client keeps sending: zero failed requests.
    failed_before = len(client.failed)
    with timeline.step("package v2"):
        mar_v2 = package_version(PackageConfig(name, version=v2, out_dir=cfg.work_dir / "archives"), settings)
    for env in ("dev", "prod"):
        with timeline.step(f"release v2 → {env}", servers[env].log_path):
            r = release_version(settings, name, v2, env, targets[env], mar_path=mar_v2.mar_path)
            console.print(r.report.summary() if r.report else "released")
    time.sleep(1.0)
    client.stop()
    failed = client.failed[failed_before:]
    if failed:
        raise FlywheelError(f"{len(failed)} requests failed during the v2 release: {failed[:3]}")
    from flywheel.contracts.capture import TRAFFIC_HEADER

    old = servers["prod"].client().predict(name, encode_png(clean_images[0]), version=v1,
                                           headers={TRAFFIC_HEADER: "acceptance"})  # a check, not user traffic
    if old.status_code != 200 or str(old.json().get("version")) != v1:
        raise FlywheelError(f"v1 is no longer reachable at /predictions/{name}/{v1}: HTTP {old.status_code}")

    # 7. Figures: accuracy of both versions on the frozen test split, clean and shifted.
    shifted_test = shift_images(splits.test.images, cfg.shift)
    out.update(
        v1=v1, v2=v2, requests=client.sent, failed_requests=len(client.failed), versions_served=dict(client.versions),
        v1_clean=_accuracy_on(settings, name, v1, splits.test.images, splits.test.labels),
        v2_clean=_accuracy_on(settings, name, v2, splits.test.images, splits.test.labels),
        v1_shifted=_accuracy_on(settings, name, v1, shifted_test, splits.test.labels),
        v2_shifted=_accuracy_on(settings, name, v2, shifted_test, splits.test.labels),
        endpoints={env: s.cfg.inference_address for env, s in servers.items()},
        key_files={env: str(s.key_file) for env, s in servers.items()},
        tracking_uri=settings.tracking_uri, steps=[s.__dict__ for s in timeline.steps],
    )
    # push → served in dev, minus the training loop's own compute (what a faster GPU would shrink).
    registry = Registry(settings)
    v1_run = registry.run(registry.version(v1, name).run_id)
    out["train_v1_compute_s"] = v1_run.data.metrics.get("train_seconds", 0.0)
    out["push_to_dev_minus_training_s"] = sum(timeline.seconds(step) for step in (
        "train v1 (mlflow run)", "package v1", "start TorchServe dev", "release v1 → dev")) - out["train_v1_compute_s"]
    (cfg.work_dir / "demo-result.json").write_text(json.dumps(out, indent=2, default=str))
    return out


def _data_param(cfg: DemoConfig) -> dict:
    """MLproject parameters every training run of the demo shares."""
    return {"batch_size": cfg.batch_size, **({"data_dir": str(cfg.data_dir)} if cfg.data_dir else {})}


def _tracking(cfg: DemoConfig, cleanup: ExitStack, out: dict, console) -> Settings:
    if not cfg.full:
        settings = Settings.from_env(work_dir=cfg.work_dir, data_dir=cfg.data_dir, model_name=cfg.model_name)
        if not settings.embedded:
            console.print(f"using the tracking server in MLFLOW_TRACKING_URI: {settings.tracking_uri}")
        return settings.apply()
    from flywheel.tracking.server import StackConfig, stack_down, stack_up

    state_dir = cfg.work_dir / "stack"
    state = stack_up(StackConfig(state_dir=state_dir, throwaway=not cfg.keep))
    cleanup.callback(stack_down, state_dir)
    out["stop_commands"].append(f"FLYWHEEL_HOME={cfg.work_dir} flywheel stack down")
    env = state.client_env()
    console.print(f"tracking node: {state.tracking_uri} (user {state.username}, password in {state.password_file}); "
                  f"artifacts in {state.artifacts_destination}")
    return Settings.from_env(tracking_uri=env["MLFLOW_TRACKING_URI"], username=env["MLFLOW_TRACKING_USERNAME"],
                             password=env["MLFLOW_TRACKING_PASSWORD"], work_dir=cfg.work_dir,
                             data_dir=cfg.data_dir, model_name=cfg.model_name).apply()


class _RecordRetrain:
    """The demo's retrain action: hands the monitor's request to the demo, which runs the retrain the
    way a training node would (`mlflow run`), so its output lands in the timeline and its log."""

    name = "demo"

    def __init__(self) -> None:
        self.events: list = []

    def fire(self, event) -> str:
        self.events.append(event)
        return f"retrain {event.event_id} queued for the demo"


class _Monitor:
    """The monitor node's loop (`flywheel monitor`), ticked by the demo on the prod server's captures."""

    def __init__(self, cfg: DemoConfig, settings: Settings, captures: Path, log: Path):
        import logging

        from flywheel.monitoring.service import Monitor, MonitorConfig
        from flywheel.monitoring.triggers import PolicyConfig

        handler = logging.FileHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("flywheel").addHandler(handler)
        logging.getLogger("flywheel").setLevel(logging.INFO)
        self.action = _RecordRetrain()
        self.snapshot_dir = cfg.work_dir / "datasets"
        self.monitor = Monitor(MonitorConfig(model=cfg.model_name, capture_uri=str(captures), env="prod",
                                             state_dir=cfg.work_dir / "monitor", window=cfg.window, settle_s=0.5,
                                             dataset=cfg.dataset, snapshot_dir=self.snapshot_dir),
                               settings, actions=[self.action],
                               policy=PolicyConfig(consecutive=cfg.consecutive, cooldown_s=3600.0))
        self.capture_uri = str(captures)
        self.model = cfg.model_name
        self.windows = 0
        self.drifting: list = []
        self.trigger_samples: int | None = None

    def poll(self) -> list:
        """One tick; returns the retrain requests fired so far."""
        results = self.monitor.tick()
        self.windows += len(results)
        self.drifting += [r for r in results if r.drift]
        return list(self.action.events)

    def wait_for_trigger(self, client: TrafficClient, max_samples: int, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                raise FlywheelError(f"no retrain trigger within {timeout:.0f} s "
                                    f"({client.count(True)} shifted requests served)")
            time.sleep(1.0)
        fired = next(r for r in self.drifting[::-1] if r.trigger) if any(r.trigger for r in self.drifting) \
            else self.drifting[-1]
        # Shifted requests served up to the last capture of the window that fired the trigger.
        self.trigger_samples = client.count(True, before=fired.last_ts)
        if self.trigger_samples > max_samples:
            raise FlywheelError(f"drift triggered only after {self.trigger_samples} shifted requests "
                                f"(limit {max_samples})")
        return self.action.events[0]

    def snapshot(self, dest: Path, class_names: tuple[str, ...]) -> Path:
        from flywheel.monitoring.snapshot import take_snapshot

        return take_snapshot(self.capture_uri, self.model, dest, class_names=class_names).path

    def close(self) -> None:
        """End the monitoring run (FINISHED)."""
        self.monitor.close()


def _print_report(cfg: DemoConfig, timeline: Timeline, result: dict, console) -> None:
    from rich.table import Table

    table = Table(title="Flywheel demo timeline")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for s in timeline.steps:
        table.add_row(s.name, f"{s.seconds:.1f}")
    table.add_row("[bold]total", f"[bold]{time.perf_counter() - timeline.started:.1f}")
    console.print(table)
    if "v1" in result:
        acc = Table(title=f"accuracy on the frozen test split ({cfg.shift} shift applied to the same images)")
        for col in ("version", "clean", "shifted"):
            acc.add_column(col, justify="right")
        acc.add_row(f"v{result['v1']}", f"{result['v1_clean']:.4f}", f"{result['v1_shifted']:.4f}")
        acc.add_row(f"v{result['v2']}", f"{result['v2_clean']:.4f}", f"{result['v2_shifted']:.4f}")
        console.print(acc)
        console.print(f"client: {result['requests']} requests, {result['failed_requests']} failed, "
                      f"served by versions {result['versions_served']}")
    console.print("[bold]where to look")
    console.print(f"  MLflow UI:  mlflow ui --backend-store-uri {result.get('tracking_uri', '')}"
                  if str(result.get("tracking_uri", "")).startswith("sqlite")
                  else f"  MLflow UI:  {result.get('tracking_uri', '')}")
    for env, url in result.get("endpoints", {}).items():
        console.print(f"  TorchServe {env}: {url}/predictions/{cfg.model_name}[/VERSION] "
                      f"(Bearer token: inference key in {result['key_files'][env]})", markup=False)
    console.print(f"  logs and captures: {cfg.work_dir}")
    if not cfg.keep:
        console.print("every server the demo started is stopped now; `make demo KEEP=1` leaves them running")
    if cfg.keep:
        console.print("[bold]left running (KEEP=1); stop with:")
        for cmd in result.get("stop_commands", []):
            console.print(f"  {cmd}")
