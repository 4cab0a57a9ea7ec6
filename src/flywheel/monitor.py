"""`flywheel monitor`: read captured traffic, test each window for drift, trigger retraining, export metrics.

One tick (`Monitor.tick`, which `--once` runs a single time for cron):
1. resolve the alias (`prod`, `dev`) to a model version; a new version starts a new reference and run;
2. load that version's own reference (the `reference/` artifacts its training run logged);
3. read captures newer than the persisted cursor; records of other versions are skipped;
4. for every full window: embedding drift (`flywheel.drift`), prediction drift (chi-square on class
   counts), accuracy where feedback labels came back; log it to the MLflow `monitoring` experiment and
   to Prometheus;
5. feed the decision to the trigger policy (K windows in a row → one retrain per episode) and deliver
   the outbox (retried with backoff until the action succeeds).

All state (cursor, partial window, policy, outbox, MLflow run id) lives under `state_dir`, so a crash
or a cron schedule loses nothing and re-reads nothing.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from flywheel.config import Settings
from flywheel.errors import FlywheelError

log = logging.getLogger("flywheel.monitor")
EXPERIMENT = "monitoring"


@dataclass(frozen=True)
class MonitorConfig:
    model: str
    capture_uri: str
    env: str = "prod"  # the alias whose traffic is monitored
    state_dir: Path = Path(".flywheel/monitor")
    window: int = 100
    alpha: float = 0.01  # per-window false-alarm budget, shared by the embedding and prediction tests
    interval_s: float = 30.0
    settle_s: float = 2.0  # captures younger than this are read next tick (concurrent writers)
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log_mlflow: bool = True
    dataset: str | None = None  # base dataset of retrains (default: the version's `dataset` tag)
    snapshot_dir: Path | None = None  # where `data snapshot` writes, for the retrain payload
    seed: int = 0
    from_now: bool = False  # a fresh monitor skips captures older than its first tick


@dataclass
class WindowResult:
    index: int
    version: str
    size: int
    p_embedding: float
    p_prediction: float
    p_value: float  # combined (Bonferroni over the two tests)
    drift: bool
    accuracy: float | None
    labelled: int
    first_ts: float
    last_ts: float
    class_fractions: list[float] = field(default_factory=list)
    trigger: str | None = None


@dataclass
class MonitorState:
    version: str | None = None
    cursor: str | None = None
    windows: int = 0
    run_id: str | None = None
    labelled_total: int = 0
    last_capture_ts: float | None = None


class Reference:
    """A model version's reference sample, as its training run logged it."""

    def __init__(self, embeddings: np.ndarray, predictions: np.ndarray, labels: np.ndarray | None,
                 class_priors: np.ndarray, run_id: str):
        self.embeddings, self.predictions, self.labels = embeddings, predictions, labels
        self.class_priors, self.run_id = class_priors, run_id

    @classmethod
    def load(cls, run_id: str, cache: Path) -> Reference:
        import mlflow

        local = cache / run_id
        if not (local / "reference" / "embeddings.npy").is_file():
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reference", dst_path=str(local))
            except Exception as exc:  # noqa: BLE001 - say what is missing and why it matters
                raise FlywheelError(f"run {run_id} has no reference/ artifacts ({type(exc).__name__}: {exc}); "
                                    "retrain with this flywheel version so the model carries its reference") from None
        ref = local / "reference"
        priors = json.loads((ref / "class_priors.json").read_text()) if (ref / "class_priors.json").is_file() else None
        emb = np.load(ref / "embeddings.npy").astype(np.float32)
        preds = np.load(ref / "predictions.npy").astype(np.int64)
        labels = np.load(ref / "labels.npy").astype(np.int64) if (ref / "labels.npy").is_file() else None
        n_classes = len(priors) if priors else int(preds.max()) + 1
        return cls(emb, preds, labels, np.asarray(priors if priors else np.bincount(preds, minlength=n_classes)
                                                  / len(preds), dtype=np.float64), run_id)


class Metrics:
    """Prometheus metrics in the monitor's own registry (no global state)."""

    def __init__(self, model: str, env: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        labels = ["model", "env"]
        self.labels = {"model": model, "env": env}
        r = self.registry
        self.p_value = Gauge("flywheel_drift_p_value", "p-value of the latest window's drift test", labels + ["test"],
                             registry=r)
        self.detected = Gauge("flywheel_drift_detected", "1 when the latest window drifted", labels, registry=r)
        self.window_size = Gauge("flywheel_drift_window_size", "samples per drift window", labels, registry=r)
        self.lag = Gauge("flywheel_capture_lag_seconds", "age of the newest capture processed", labels, registry=r)
        self.dropped = Gauge("flywheel_capture_dropped", "captures dropped by serving writers (as they report)",
                             labels, registry=r)
        self.windows = Counter("flywheel_drift_windows", "windows tested", labels, registry=r)
        self.drifted = Counter("flywheel_drift_windows_drifted", "windows that drifted", labels, registry=r)
        self.triggers = Counter("flywheel_retrain_triggers", "retrain requests queued", labels + ["reason"],
                                registry=r)
        self.outbox = Gauge("flywheel_trigger_outbox_pending", "retrain requests not yet delivered", labels,
                            registry=r)
        self.accuracy = Gauge("flywheel_live_accuracy", "accuracy on windows with feedback labels", labels,
                              registry=r)
        self.class_fraction = Gauge("flywheel_prediction_class_fraction", "share of the latest window per class",
                                    labels + ["class_index"], registry=r)
        self.version = Gauge("flywheel_monitored_version", "model version behind the alias", labels, registry=r)

    def serve(self, port: int, addr: str):
        from prometheus_client import start_http_server

        return start_http_server(port, addr=addr, registry=self.registry)


class Monitor:
    def __init__(self, cfg: MonitorConfig, settings: Settings, actions: list | None = None, policy=None):
        from flywheel.triggers import Outbox, PolicyConfig, TriggerPolicy

        if cfg.window < 10:
            raise FlywheelError(f"--window {cfg.window} is too small for a drift test; use at least 10")
        if not 0 < cfg.alpha < 1:
            raise FlywheelError(f"--alpha {cfg.alpha} must be within (0, 1)")
        self.cfg, self.settings = cfg, settings
        self.dir = Path(cfg.state_dir)
        self.actions = list(actions or [])
        self.policy = TriggerPolicy(policy or PolicyConfig(), self.dir / "policy.json")
        self.outbox = Outbox(self.dir / "outbox")
        self.metrics = Metrics(cfg.model, cfg.env)
        self.state = self._load_state()
        self._detector = None
        self._reference: Reference | None = None
        self._class_names: list[str] | None = None

    # -- state ---------------------------------------------------------------------------------
    def _load_state(self) -> MonitorState:
        path = self.dir / "state.json"
        if not path.is_file():
            return MonitorState()
        try:
            return MonitorState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise FlywheelError(f"monitor state {path} is corrupt ({exc}); move it aside to start over") from None

    def _save_state(self) -> None:
        from flywheel.triggers import _atomic_write

        _atomic_write(self.dir / "state.json", asdict(self.state))

    def _pending_path(self) -> Path:
        return self.dir / "pending.npz"

    def _load_pending(self) -> dict[str, np.ndarray]:
        path = self._pending_path()
        if not path.is_file() or self.state.version is None:
            return {"emb": np.zeros((0, 0), np.float32), "pred": np.zeros(0, np.int64),
                    "ts": np.zeros(0), "ids": np.zeros(0, dtype="<U64")}
        with np.load(path) as z:
            return {k: z[k] for k in ("emb", "pred", "ts", "ids")}

    def _save_pending(self, pending: dict[str, np.ndarray]) -> None:
        tmp = self.dir / ".pending.tmp.npz"
        np.savez(tmp, **pending)
        tmp.replace(self._pending_path())

    # -- reference -------------------------------------------------------------------------------
    def _resolve(self) -> tuple[str, str]:
        from flywheel.registry import get_version

        mv = get_version(self.settings, self.cfg.model, self.cfg.env)
        return str(mv.version), mv.run_id

    def _prepare(self, version: str, run_id: str) -> None:
        from flywheel.drift import NoveltyDriftDetector

        if self._detector is not None and self._reference is not None and self._reference.run_id == run_id:
            return
        self._reference = Reference.load(run_id, self.dir / "references")
        self._detector = NoveltyDriftDetector(seed=self.cfg.seed).fit(self._reference.embeddings)
        if self.state.version != version:
            log.info("monitoring %s@%s = version %s (new reference from run %s)", self.cfg.model, self.cfg.env,
                     version, run_id)
            self.state = replace(self.state, version=version, windows=0, run_id=None)
            self._pending_path().unlink(missing_ok=True)

    # -- one tick --------------------------------------------------------------------------------
    def tick(self) -> list[WindowResult]:
        """Process every complete window of new captures; returns their results."""
        from flywheel.capture import iter_captures, read_feedback

        self.dir.mkdir(parents=True, exist_ok=True)
        version, run_id = self._resolve()
        self._prepare(version, run_id)
        self.metrics.version.labels(**self.metrics.labels).set(float(version) if version.isdigit() else 0)
        if self.cfg.from_now and self.state.cursor is None:
            from flywheel.capture import batch_key

            self.state.cursor = batch_key()
        pending = self._load_pending()
        embs, preds, tss, ids = [pending["emb"]], [pending["pred"]], [pending["ts"]], [pending["ids"]]
        cursor = self.state.cursor
        dim = self._reference.embeddings.shape[1]
        try:
            for cap in iter_captures(self.cfg.capture_uri, self.cfg.model, since=self.state.cursor,
                                     settle_seconds=self.cfg.settle_s):
                cursor = cap.batch
                if cap.version != version or cap.embedding is None or cap.embedding.shape != (dim,):
                    continue  # another version's traffic (a canary, the old one draining), or malformed
                embs.append(cap.embedding[None])
                preds.append(np.asarray([-1 if cap.label_index is None else cap.label_index]))
                tss.append(np.asarray([cap.ts]))
                ids.append(np.asarray([cap.prediction_id], dtype="<U64"))
        except OSError as exc:
            raise FlywheelError(f"capture store {self.cfg.capture_uri} unreadable: {exc}") from None
        emb = np.concatenate([e.reshape(-1, dim) for e in embs]).astype(np.float32)
        pred, ts = np.concatenate(preds).astype(np.int64), np.concatenate(tss).astype(np.float64)
        pid = np.concatenate(ids).astype("<U64")
        feedback = read_feedback(self.cfg.capture_uri, self.cfg.model) if len(emb) >= self.cfg.window else {}
        results = []
        w = self.cfg.window
        while len(emb) >= w:
            results.append(self._window(emb[:w], pred[:w], ts[:w], pid[:w], version, feedback))
            emb, pred, ts, pid = emb[w:], pred[w:], ts[w:], pid[w:]
        if len(ts):
            self.state.last_capture_ts = float(max(ts.max(), self.state.last_capture_ts or 0))
        self.state.cursor = cursor
        self._save_pending({"emb": emb, "pred": pred, "ts": ts, "ids": pid})
        self._save_state()
        self._deliver()
        self._log_mlflow(results)
        self._export(results)
        return results

    def _window(self, emb, pred, ts, pid, version, feedback) -> WindowResult:
        from flywheel.drift import combine_p_values, prediction_drift

        p_emb = self._detector.test(emb).p_value
        n_classes = len(self._reference.class_priors)
        ref_counts = np.bincount(self._reference.predictions, minlength=n_classes)
        counts = np.bincount(pred[pred >= 0], minlength=n_classes)[:n_classes]
        p_pred = prediction_drift(counts, ref_counts).p_value
        p = combine_p_values([p_emb, p_pred])
        labelled = [(i, feedback[str(x)]) for i, x in enumerate(pid) if str(x) in feedback]
        accuracy = None
        if labelled:
            names = self._class_names_for(version)
            if names is not None:
                hits = [names[pred[i]] == lab if 0 <= pred[i] < len(names) else False for i, lab in labelled]
                accuracy = float(np.mean(hits))
        self.state.labelled_total += len(labelled)
        self.state.windows += 1
        res = WindowResult(self.state.windows, version, len(emb), p_emb, p_pred, p, bool(p < self.cfg.alpha),
                           accuracy, len(labelled), float(ts.min()), float(ts.max()),
                           (counts / max(1, counts.sum())).tolist())
        decision = self.policy.observe(res.drift, labelled_total=self.state.labelled_total)
        if decision.fire:
            res.trigger = decision.reason
            self._queue_retrain(decision, res)
        log.info("window %d v%s: p_emb=%.3g p_pred=%.3g drift=%s %s", res.index, version, p_emb, p_pred,
                 res.drift, decision.note)
        return res

    def _class_names_for(self, version: str) -> list[str] | None:
        if self._class_names is None:
            try:
                import mlflow

                from flywheel.models import SPEC_FILE, ModelSpec

                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.cfg.model}/{version}/{SPEC_FILE}")
                self._class_names = list(ModelSpec.from_json(Path(path).read_text()).class_names)
            except Exception:  # noqa: BLE001 - accuracy is optional; drift does not need names
                log.warning("class names of %s v%s unavailable; accuracy not computed", self.cfg.model, version)
                return None
        return self._class_names

    # -- triggers ----------------------------------------------------------------------------------
    def _queue_retrain(self, decision, res: WindowResult) -> None:
        from flywheel.triggers import RetrainEvent

        snapshot, digest = self._latest_snapshot()
        event = RetrainEvent(model=self.cfg.model, reason=decision.reason, env=self.cfg.env, version=res.version,
                             dataset=self.cfg.dataset or self._dataset_tag(res.version), snapshot=snapshot,
                             snapshot_digest=digest,
                             details={"episode": decision.episode, "window": res.index,
                                      "p_embedding": res.p_embedding, "p_prediction": res.p_prediction,
                                      "note": decision.note})
        self.outbox.enqueue(event, self.actions)
        self.metrics.triggers.labels(**self.metrics.labels, reason=decision.reason).inc()
        log.warning("retrain requested for %s: %s", self.cfg.model, decision.note)
        if not self.actions:
            log.warning("no trigger action configured (--github-repo, --ssh-node, --local-command): retrain "
                        "request %s is only logged and counted in flywheel_retrain_triggers_total", event.event_id)

    def _dataset_tag(self, version: str) -> str | None:
        try:
            from flywheel.registry import get_version

            return get_version(self.settings, self.cfg.model, version).tags.get("dataset")
        except FlywheelError:
            return None

    def _latest_snapshot(self) -> tuple[str | None, str | None]:
        if self.cfg.snapshot_dir is None:
            return None, None
        from flywheel.capture import safe_name
        from flywheel.snapshot import latest_snapshot

        snap = latest_snapshot(self.cfg.snapshot_dir, safe_name(self.cfg.model))  # layout of `data snapshot`
        return (str(snap.path), snap.digest) if snap else (None, None)

    def _deliver(self) -> None:
        self.outbox.clean()
        for d, ok in self.outbox.deliver(self.actions):
            if ok:
                log.info("retrain request %s delivered via %s: %s", d.key, d.action, d.receipt)
            else:
                log.warning("retrain request %s via %s failed (attempt %d, retrying): %s", d.key, d.action,
                            d.attempts, d.last_error)
        self.metrics.outbox.labels(**self.metrics.labels).set(len(self.outbox.pending()))

    # -- outputs -------------------------------------------------------------------------------
    def _export(self, results: list[WindowResult]) -> None:
        from flywheel.capture import read_writer_stats

        m, lab = self.metrics, self.metrics.labels
        m.window_size.labels(**lab).set(self.cfg.window)
        if self.state.last_capture_ts:
            m.lag.labels(**lab).set(max(0.0, time.time() - self.state.last_capture_ts))
        try:
            m.dropped.labels(**lab).set(sum(s.get("dropped", 0) for s in
                                            read_writer_stats(self.cfg.capture_uri, self.cfg.model)))
        except Exception:  # noqa: BLE001 - stats are advisory
            log.debug("capture writer stats unreadable", exc_info=True)
        for r in results:
            m.windows.labels(**lab).inc()
            if r.drift:
                m.drifted.labels(**lab).inc()
        if results:
            last = results[-1]
            m.p_value.labels(**lab, test="embedding").set(last.p_embedding)
            m.p_value.labels(**lab, test="prediction").set(last.p_prediction)
            m.p_value.labels(**lab, test="combined").set(last.p_value)
            m.detected.labels(**lab).set(1.0 if last.drift else 0.0)
            for i, frac in enumerate(last.class_fractions):
                m.class_fraction.labels(**lab, class_index=str(i)).set(frac)
            if last.accuracy is not None:
                m.accuracy.labels(**lab).set(last.accuracy)

    def _log_mlflow(self, results: list[WindowResult]) -> None:
        if not self.cfg.log_mlflow or not results:
            return
        import mlflow
        from mlflow.entities import Metric, Param

        from flywheel.tracking import ensure_experiment

        client = mlflow.MlflowClient()
        if self.state.run_id is None:
            exp = ensure_experiment(replace(self.settings, experiment=EXPERIMENT))
            run = client.create_run(exp, run_name=f"monitor-{self.cfg.model}-{self.cfg.env}-v{results[0].version}",
                                    tags={"model": self.cfg.model, "env": self.cfg.env,
                                          "version": results[0].version, "reference_run_id": self._reference.run_id,
                                          "capture_uri": self.cfg.capture_uri})
            client.log_batch(run.info.run_id, params=[Param("window", str(self.cfg.window)),
                                                      Param("alpha", str(self.cfg.alpha))])
            self.state.run_id = run.info.run_id
            self._save_state()
        run_id = self.state.run_id
        now = int(time.time() * 1000)
        metrics = []
        for r in results:
            values = {"p_value": r.p_value, "p_embedding": r.p_embedding, "p_prediction": r.p_prediction,
                      "drift_detected": float(r.drift), "window_size": r.size, "labelled": r.labelled,
                      "retrain_triggered": float(r.trigger is not None)}
            if r.accuracy is not None:
                values["accuracy"] = r.accuracy
            metrics += [Metric(k, float(v), now, r.index) for k, v in values.items()]
        for i in range(0, len(metrics), 900):  # log_batch caps at 1000 metrics per call
            client.log_batch(run_id, metrics=metrics[i:i + 900])
        history = client.get_metric_history(run_id, "p_value")
        drift = {m.step: m.value for m in client.get_metric_history(run_id, "drift_detected")}
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = drift_plot(history, drift, self.cfg.alpha, Path(tmp) / "drift_over_time.png",
                              f"{self.cfg.model}@{self.cfg.env} v{results[0].version}")
            client.log_artifact(run_id, str(path), "plots")

    # -- service ---------------------------------------------------------------------------------
    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Tick every `interval_s` until SIGTERM/SIGINT (or `stop` is set); a failing tick is logged
        and retried next interval, so a tracking-server or store outage does not kill the service."""
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        if self.cfg.metrics_port is not None:
            self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_addr)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics_addr, self.cfg.metrics_port)
        while not stop.is_set():
            try:
                self.tick()
            except FlywheelError as exc:
                log.error("monitor tick failed: %s", exc)
            except Exception:  # noqa: BLE001 - keep serving; the next tick retries
                log.exception("monitor tick failed")
            stop.wait(self.cfg.interval_s)


def drift_plot(history, drift: dict, alpha: float, path: Path, title: str) -> Path:
    """p-value per window on a log axis, alpha line, drifting windows in red."""
    from flywheel.plots import figure

    steps = [m.step for m in sorted(history, key=lambda m: m.step)]
    values = [max(m.value, 1e-12) for m in sorted(history, key=lambda m: m.step)]
    fig = figure((8, 3.2))
    ax = fig.subplots()
    ax.plot(steps, values, "-", color="tab:blue", lw=1, label="combined p-value")
    red = [(s, v) for s, v in zip(steps, values, strict=True) if drift.get(s)]
    if red:
        ax.scatter(*zip(*red, strict=True), color="tab:red", s=14, zorder=3, label="drift")
    ax.axhline(alpha, color="tab:red", ls="--", lw=0.8, label=f"alpha={alpha}")
    ax.set_yscale("log")
    ax.set_xlabel("window")
    ax.set_ylabel("p-value")
    ax.set_title(f"drift over time: {title}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
