"""`flywheel monitor`: read captured traffic, test each window for drift, trigger retraining, export metrics.

One tick (`Monitor.tick`, which `--once` runs a single time for cron):
1. resolve the alias (`prod`, `dev`) to a model version; a new version starts a new reference and run;
2. load that version's own reference (the `reference/` artifacts its training run logged);
3. read the capture batches not read before (`flywheel.contracts.capture.CaptureReader`: exactly once, from any
   number of writers, so from every serving replica, within its horizon); traffic marked as release
   acceptance, warm-up or benchmark (not live) is skipped;
4. separate live records by the version that answered them: every registered version with live traffic
   has a track of its own (`Track`: its reference, detector, class names, reference accuracy; its
   partial window, window index and MLflow run), so a canary's windows are never mixed with the
   current version's; a version with no registry entry or no reference is skipped and counted;
5. for every full window of a version: embedding drift (`flywheel.monitoring.drift`; with the input
   channel where the version's reference carries input statistics: each captured image is decoded and
   preprocessed with the version's spec and its `input_statistics`, and its texture statistics where
   the reference has a texture model, are tested too), prediction drift
   (chi-square on class counts), accuracy where feedback labels came back and its alarm
   (`flywheel.monitoring.accuracy`: exact one-sided binomial test against the version's test accuracy);
   log it to the version's run in the MLflow `monitoring` experiment and to Prometheus;
6. feed the alias's version's windows to the trigger policy (K drifting, or K accuracy-alarming, windows
   in a row → one retrain per episode; other versions' windows are reported, never trigger) and
   deliver the outbox (retried with backoff until the action succeeds).

All state (cursor, partial windows, policy, outbox, MLflow run ids) lives under `state_dir`, so a crash
or a cron schedule loses nothing and re-reads nothing: the records read, the partial window, the
windows tested and the advanced cursor are committed in one atomic write of `state.json` (the partial
window goes to a fresh `pending-<id>.npz` that the commit names). Windows are tested before that
commit and applied to the trigger policy after it, from a journal in the same file that keeps the
policy state each window starts from, so a crash between the two replays a window's decision with
the same outcome and the same event id (the outbox keeps one request per event id). Applying a window
also stores it, with the ids of its predictions, in the capture store (`flywheel.contracts.window`:
`<model>/windows/`), where `flywheel trace` finds the window a prediction fell into.

Several models in one process: `flywheel.monitoring.group.MonitorGroup`, one `Monitor` each.

One process per state dir: a monitor holds `state_dir/monitor.lock` (filelock) for as long as it
runs (a service) or ticks (`--once`); a second one stops with an error naming the holder. The
monitor's MLflow run (one per model, env and version) is RUNNING while a monitor writes to it and
FINISHED when the service stops or `--once` returns; the next one reopens it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from flywheel.contracts.reference import ARTIFACT_DIR as REFERENCE_DIR
from flywheel.contracts.reference import ReferenceSample, pixel_score_columns
from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError
from flywheel.monitoring.metrics import Metrics

log = logging.getLogger("flywheel.monitor")
EXPERIMENT = "monitoring"
LOCK_FILE = "monitor.lock"  # held by the one monitor process using this state dir
LOCK_OWNER = "monitor.lock.owner"  # who holds it (pid, host, since): for the second one's error


@dataclass(frozen=True)
class MonitorConfig:
    model: str
    capture_uri: str
    env: str = "prod"  # the alias whose traffic is monitored
    state_dir: Path = Path(".flywheel/monitor")
    window: int = 100
    alpha: float = 0.01  # per-window false-alarm budget, shared by the embedding and prediction tests
    interval_s: float = 30.0
    settle_s: float = 2.0  # captures younger than this wait for the next tick (keeps windows in time order)
    horizon_s: float = 600.0  # capture reader horizon: >= longest capture upload + largest clock difference
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    log_mlflow: bool = True
    dataset: str | None = None  # base dataset of retrains (default: the version's `dataset` tag)
    snapshot_dir: Path | None = None  # where `data snapshot` writes, for the retrain payload
    seed: int = 0
    from_now: bool = False  # a fresh monitor skips captures already stored at its first tick
    # The drift_over_time.png of a version's run is redrawn at most this often: each drawing re-reads
    # the run's whole p-value history from MLflow, which grows by every window for as long as it runs.
    plot_every_s: float = 60.0


@dataclass
class WindowResult:
    index: int  # 1, 2, ... per version
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
    labelled_total: int = 0  # labelled captures seen up to and including this window (for the policy)
    tested_at: float = 0.0
    # The accuracy alarm (flywheel.monitoring.accuracy); None/False where nothing was tested.
    reference_accuracy: float | None = None
    p_accuracy: float | None = None
    accuracy_alarm: bool = False
    primary: bool = True  # of the version the alias named when tested (it feeds the trigger policy)


@dataclass(frozen=True)
class TickSummary:
    """What one tick read and kept: for `--once`'s report and the logs. `monitored`, `pending` and
    `windows` are the alias's version's; `versions` has the same three for every other version
    whose traffic the monitor windows on its own (a canary, a version still draining)."""

    version: str
    window: int
    read: int  # records in the batches read this tick
    monitored: int  # of them, added to the alias's version's windows
    marked: dict  # traffic mark → records skipped as not live (acceptance, warmup, benchmark)
    other_version: int  # records of versions that cannot be monitored (not registered, no reference)
    malformed: int
    pending: int  # monitored records waiting for a full window
    windows: int  # windows tested this tick
    store_has_captures: bool | None = None  # None: not checked (something was read or is pending)
    versions: dict = field(default_factory=dict)  # other version → {"monitored", "pending", "windows"}


@dataclass
class MonitorState:
    version: str | None = None  # the alias's version at the last tick
    cursor: dict | str | None = None  # CaptureCursor.to_json(); a str is an older flywheel's batch name
    windows: int = 0  # the alias's version's (a copy of tracks[version]["windows"], as older flywheels kept it)
    run_id: str | None = None  # the alias's version's MLflow run (likewise a copy)
    labelled_total: int = 0
    last_capture_ts: float | None = None
    pending_file: str | None = None  # the partial windows committed with this state (None: pending.npz, older)
    journal: list = field(default_factory=list)  # tested windows not yet applied to the trigger policy
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this state's retrain events
    tracks: dict = field(default_factory=dict)  # version → {"windows": n, "run_id": id}: every version windowed


class Reference:
    """A model version's reference sample (contracts.reference), as its training run logged it."""

    def __init__(self, sample: ReferenceSample, run_id: str):
        self.embeddings, self.predictions, self.labels = sample.embeddings, sample.predictions, sample.labels
        self.class_priors, self.run_id, self.input_stats = sample.class_priors, run_id, sample.input_stats
        self.texture = sample.texture if sample.input_stats is not None else None  # the texture channel's model
        self.shift_directions = sample.shift_directions if self.texture is not None else None
        self.subspace = sample.subspace if sample.input_stats is not None else None  # the residual channel's
        self.grain = sample.grain if sample.input_stats is not None else None  # the grain channel's
        # what the detector's image channels read per sample: input statistics, texture statistics, residual, grain
        parts = [sample.input_stats] if sample.input_stats is not None else []
        parts += [sample.texture_stats] if self.texture is not None else []
        parts += pixel_score_columns(sample.residuals if self.subspace is not None else None,
                                     sample.grain_scores if self.grain is not None else None)
        self.image_features = np.hstack(parts) if parts else None

    @classmethod
    def load(cls, run_id: str, cache: Path, tracking_uri: str | None = None) -> Reference:
        import mlflow

        local = cache / run_id
        ref = local / REFERENCE_DIR
        if not ReferenceSample.present(ref):
            try:
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_DIR, dst_path=str(local),
                                                    tracking_uri=tracking_uri)
            except Exception as exc:  # noqa: BLE001 - say what is missing and why it matters
                raise FlywheelError(f"run {run_id} has no reference/ artifacts ({type(exc).__name__}: {exc}); "
                                    "retrain with this flywheel version so the model carries its reference") from None
        return cls(ReferenceSample.load(ref), run_id)


@dataclass
class Track:
    """One monitored version in memory: its reference and fitted detector, and what its component spec
    and training run say (class names, embedding source, reference accuracy). Every version has its
    own: a canary's embedding dimension, classes and accuracy need not be the current version's."""

    version: str
    reference: Reference
    detector: object
    embedding_source: str  # "layer", "softmax" or "unknown" (the spec was unreadable)
    class_names: list[str] | None  # None: the spec was unreadable, so no accuracy
    reference_accuracy: float | None
    accuracy_source: str
    preprocess: object = None  # the version's PreprocessSpec when the input channel is on, else None

    @property
    def dim(self) -> int:
        return int(self.reference.embeddings.shape[1])

    @property
    def input_columns(self) -> int:
        """Image features per capture (`contracts.reference.image_features`: input statistics, then
        texture statistics, the residual and the grain where the reference has their models) with the
        input channel on, else 0."""
        return 0 if self.preprocess is None else int(self.reference.image_features.shape[1])

    def input_statistics(self, images: list[bytes | None]) -> np.ndarray:
        """(N, input_columns) image features of captured PNGs, decoded and preprocessed with the version's
        spec; a NaN row for a capture without a usable image (its window is tested without the channel)."""
        from flywheel.contracts.preprocessing import InvalidImage, decode_image, to_array
        from flywheel.contracts.reference import image_features

        out = np.full((len(images), self.input_columns), np.nan)
        if self.preprocess is None:
            return out
        for start in range(0, len(images), 256):  # in chunks: a tick may read many large images
            decoded, where = [], []
            for i, png in enumerate(images[start:start + 256], start):
                if png is None:
                    continue
                try:
                    decoded.append(decode_image(png, self.preprocess))
                except InvalidImage:  # an unreadable capture image: its window goes without the channel
                    continue
                where.append(i)
            if decoded:
                out[where] = image_features(to_array(np.stack(decoded), self.preprocess), self.reference.texture,
                                            self.reference.subspace, self.reference.grain)
        return out


def _empty_pending() -> dict[str, np.ndarray]:
    return {"emb": np.zeros((0, 0), np.float32), "pred": np.zeros(0, np.int64), "ts": np.zeros(0),
            "ids": np.zeros(0, dtype="<U64")}


class MonitorBusy(FlywheelError):
    """Another monitor process holds this state dir."""


class Monitor:
    def __init__(self, cfg: MonitorConfig, settings: Settings, actions: list | None = None, policy=None,
                 metrics: Metrics | None = None):
        from filelock import FileLock

        from flywheel.contracts.capture import CaptureReader
        from flywheel.monitoring.triggers import Outbox, PolicyConfig, TriggerPolicy

        if cfg.window < 10:
            raise FlywheelError(f"--window {cfg.window} is too small for a drift test; use at least 10")
        if not 0 < cfg.alpha < 1:
            raise FlywheelError(f"--alpha {cfg.alpha} must be within (0, 1)")
        if not 0 <= cfg.settle_s < cfg.horizon_s:
            raise FlywheelError(f"capture horizon {cfg.horizon_s}s must exceed the settle time {cfg.settle_s}s")
        self.cfg, self.settings = cfg, settings
        self.dir = Path(cfg.state_dir)
        self.actions = list(actions or [])
        self._policy_config = policy or PolicyConfig()
        self.policy = TriggerPolicy(self._policy_config, self.dir / "policy.json")
        self.outbox = Outbox(self.dir / "outbox")
        # Given: the group's shared registry, under this model's labels (one /metrics for all).
        self.metrics = metrics.bound(cfg.model, cfg.env) if metrics is not None else Metrics(cfg.model, cfg.env)
        self.reader = CaptureReader(cfg.capture_uri, cfg.model, horizon_s=cfg.horizon_s, settle_s=cfg.settle_s)
        self.state = self._load_state()
        self.last_tick: TickSummary | None = None
        self._lock = FileLock(self.dir / LOCK_FILE, timeout=0)
        self._open_runs: set[str] = set()  # MLflow runs this process set RUNNING and must end
        self._tracks: dict[str, Track] = {}  # version → its reference etc. (loaded once per process)
        self._untracked: dict[str, str] = {}  # version → why it cannot be monitored (this tick)
        self._registry = None
        self._sources: dict[str, dict[str, str]] = {}  # version → where it came from (for retrain requests)
        self._plotted: dict[str, float] = {}  # version → when its drift plot was last drawn (monotonic)

    @property
    def registry(self):
        """The Registry (one explicit MLflow client) for version lookups and the monitoring run."""
        if self._registry is None:
            from flywheel.core.registry import Registry

            self._registry = Registry(self.settings)
        return self._registry

    # -- one process per state dir ----------------------------------------------------------------
    @contextmanager
    def locked(self):
        """Hold the state dir's lock (reentrant). The first acquisition re-reads the state from disk:
        another monitor may have moved it on since this one was constructed."""
        from filelock import Timeout

        from flywheel.monitoring.triggers import TriggerPolicy

        outermost = not self._lock.is_locked
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise MonitorBusy(f"another flywheel monitor ({_lock_owner(self.dir)}) holds state dir {self.dir}: "
                              "stop it first, or give this one its own --state-dir") from None
        try:
            if outermost:
                (self.dir / LOCK_OWNER).write_text(f"pid {os.getpid()} on {socket.gethostname()} since "
                                                   f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
                self.state = self._load_state()
                self.policy = TriggerPolicy(self._policy_config, self.dir / "policy.json")
            yield self
        finally:
            if outermost:
                (self.dir / LOCK_OWNER).unlink(missing_ok=True)
            self._lock.release()

    # -- state ---------------------------------------------------------------------------------
    def _load_state(self) -> MonitorState:
        from flywheel.contracts.capture import CaptureCursor

        path = self.dir / "state.json"
        if not path.is_file():
            return MonitorState()
        try:
            state = MonitorState(**json.loads(path.read_text()))
            CaptureCursor.from_json(state.cursor)  # validate (an older flywheel saved one batch name)
        except (ValueError, TypeError) as exc:
            raise FlywheelError(f"monitor state {path} is corrupt ({exc}); move it aside to start over") from None
        if state.version is not None and state.version not in state.tracks:  # an older flywheel's state
            state.tracks[state.version] = {"windows": state.windows, "run_id": state.run_id}
        return state

    @property
    def cursor(self):
        from flywheel.contracts.capture import CaptureCursor

        return CaptureCursor.from_json(self.state.cursor)

    def _track_state(self, version: str) -> dict:
        """The persisted part of a version's track: its window count and MLflow run."""
        return self.state.tracks.setdefault(version, {"windows": 0, "run_id": None})

    def _commit(self, pending: dict[str, dict[str, np.ndarray]] | None = None) -> None:
        """One atomic write of state.json; new partial windows (one per version) are written first,
        under a fresh name that the new state names, so the state on disk always goes with its own
        partial windows."""
        from flywheel.core.files import atomic_write_json

        if pending is not None:
            name = f"pending-{uuid.uuid4().hex[:12]}.npz"
            tmp = self.dir / f".{name}.tmp.npz"
            versions = sorted(v for v, p in pending.items() if len(p["ids"]))
            arrays = {f"{key}.{i}": pending[v][key] for i, v in enumerate(versions)
                      for key in ("emb", "pred", "ts", "ids", "inp") if key in pending[v]}
            np.savez(tmp, versions=np.asarray(versions, dtype="<U64"), **arrays)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.replace(self.dir / name)
            self.state.pending_file = name
        if self.state.version is not None:  # the alias's version's, where older flywheels kept them
            primary = self._track_state(self.state.version)
            self.state.windows, self.state.run_id = primary["windows"], primary["run_id"]
        atomic_write_json(self.dir / "state.json", asdict(self.state))
        if pending is not None:
            for old in self.dir.glob("pending*.npz"):  # superseded partial windows (and the old pending.npz)
                if old.name != self.state.pending_file:
                    old.unlink(missing_ok=True)

    def _load_pending(self) -> dict[str, dict[str, np.ndarray]]:
        """version → its partial window (emb, pred, ts, ids)."""
        name = self.state.pending_file or "pending.npz"  # pending.npz: state saved by an older flywheel
        path = self.dir / name
        if not path.is_file() or self.state.version is None:
            return {}
        with np.load(path) as z:
            if "versions" not in z:  # an older flywheel's: one partial window, of the alias's version
                return {self.state.version: {k: z[k] for k in ("emb", "pred", "ts", "ids")}}
            # "inp" (input statistics) is absent from an older flywheel's file: `_ingest` fills it with NaN
            return {str(v): {k: z[f"{k}.{i}"] for k in ("emb", "pred", "ts", "ids", "inp") if f"{k}.{i}" in z}
                    for i, v in enumerate(z["versions"])}

    # -- references ------------------------------------------------------------------------------
    def _resolve(self) -> tuple[str, str]:
        mv = self.registry.version(self.cfg.env, self.cfg.model)
        return str(mv.version), mv.run_id

    def _prepare(self, version: str, run_id: str) -> None:
        """Load the alias's version's track (its failure fails the tick); a new version becomes the
        one whose windows feed the trigger policy. Its windows and run go on where they were when it
        was windowed before (as a canary, say): one run and one index sequence per version."""
        track = self._tracks.get(version)
        if track is None or track.reference.run_id != run_id:
            self._tracks[version] = self._load_track(version, run_id)
        if self.state.version != version:
            log.info("monitoring %s@%s = version %s (reference from run %s)", self.cfg.model, self.cfg.env, version,
                     run_id)
            pending = self._load_pending()  # read while the state still says whose an older file's window is
            self.state = replace(self.state, version=version)
            self._track_state(version)
            self._commit(pending)

    def _load_track(self, version: str, run_id: str) -> Track:
        from flywheel.monitoring.drift import NoveltyDriftDetector

        reference = Reference.load(run_id, self.dir / "references", self.settings.tracking_uri)
        source, names, preprocess = self._spec_of(version)
        if reference.input_stats is None or preprocess is None:
            preprocess = None
            log.warning("%s v%s: input drift channel off (%s); drift is tested on the embedding alone",
                        self.cfg.model, version, "its reference has no input statistics: logged by an older flywheel "
                        "or another statistics version; retrain to turn it on" if reference.input_stats is None
                        else "its component spec, which holds the preprocessing, is unavailable")
        if preprocess is not None and reference.texture is None:
            log.warning("%s v%s: texture drift channel off (its reference has no texture model: logged by an older "
                        "flywheel or another texture version; retrain to turn it on)", self.cfg.model, version)
        if preprocess is not None and reference.subspace is None:
            log.warning("%s v%s: residual drift channel off (its reference has no pixel subspace: logged by an older "
                        "flywheel or another subspace version; retrain to turn it on)", self.cfg.model, version)
        if preprocess is not None and reference.grain is None:
            log.warning("%s v%s: grain drift channel off (its reference has no patch grain: logged by an older "
                        "flywheel or another grain version; retrain to turn it on)", self.cfg.model, version)
        detector = NoveltyDriftDetector(seed=self.cfg.seed).fit(
            reference.embeddings, input_reference=None if preprocess is None else reference.image_features,
            texture=None if preprocess is None else reference.texture,
            directions=None if preprocess is None else reference.shift_directions,
            subspace=None if preprocess is None else reference.subspace,
            grain=None if preprocess is None else reference.grain)
        accuracy, where = self._reference_accuracy(run_id, reference)
        if accuracy is None:
            log.warning("%s v%s: no reference accuracy (no test_accuracy on run %s, no labels in its reference); "
                        "no accuracy alarm for it", self.cfg.model, version, run_id)
        return Track(version, reference, detector, source, names, accuracy, where, preprocess)

    def _spec_of(self, version: str) -> tuple[str, list[str] | None, object]:
        """(embedding source, class names, preprocessing spec) of the version's component spec. The embedding source is a
        label ("layer", or "softmax" when the component named no embedding, which the monitor says,
        since softmax outputs see less of a shift in the inputs than a penultimate layer does); the
        class names turn feedback labels into accuracy; the preprocessing spec turns captured images into
        the input channel's statistics (None when unreadable). Drift works from the reference alone."""
        from flywheel.core.models import load_spec

        try:
            spec = load_spec(f"models:/{self.cfg.model}/{version}", self.settings.tracking_uri)
        except FlywheelError as exc:
            log.warning("%s v%s: component spec unavailable (%s); embedding source unknown, accuracy not computed",
                        self.cfg.model, version, exc)
            return "unknown", None, None
        if spec.embedding.source == "softmax":
            log.warning("%s v%s names no embedding layer: drift is tested on its softmax outputs (a weaker signal "
                        "than a penultimate layer; name one in log_model(embedding=...))", self.cfg.model, version)
        return spec.embedding.source, list(spec.class_names), spec.preprocess

    def _reference_accuracy(self, run_id: str, reference: Reference) -> tuple[float | None, str]:
        from mlflow.exceptions import MlflowException

        from flywheel.monitoring.accuracy import reference_accuracy

        try:
            metrics = self.registry.client.get_run(run_id).data.metrics
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise FlywheelError(f"tracking server unreadable for run {run_id}'s test_accuracy: {exc.message}") \
                    from None
            metrics = {}  # the run is gone: the reference sample's own accuracy
        return reference_accuracy(metrics, reference.predictions, reference.labels)

    def _track(self, version: str) -> Track | None:
        """The track of a version seen in live traffic, loaded on first sight; None (counted as not
        monitorable, retried next tick) when it is no registered version or has no reference."""
        if version in self._tracks:
            return self._tracks[version]
        if version in self._untracked:
            return None
        try:
            if not version.isdigit():
                raise FlywheelError(f"version {version!r} is not a registry version number")
            mv = self.registry.version(version, self.cfg.model)
            self._tracks[version] = self._load_track(version, mv.run_id)
        except FlywheelError as exc:
            self._untracked[version] = str(exc)
            log.warning("%s v%s has live traffic but is not monitored: %s", self.cfg.model, version, exc)
            return None
        log.info("monitoring %s v%s's traffic on its own (reference from run %s)", self.cfg.model, version,
                 self._tracks[version].reference.run_id)
        return self._tracks[version]

    # -- one tick --------------------------------------------------------------------------------
    def tick(self) -> list[WindowResult]:
        """Process every complete window of new captures; returns their results (see `last_tick`)."""
        with self.locked():
            return self._tick()

    def _tick(self) -> list[WindowResult]:
        # Reading and testing is its own call so that its records (every capture batch of the tick)
        # are freed when it returns, before MLflow logging and plotting: the drift plot's text
        # layout raises and catches exceptions, whose tracebacks hold the frames below them in
        # reference cycles, so anything still on this frame would live until a full collection.
        results = self._ingest()
        self._deliver()
        self._log_mlflow(results)
        self._export(results)
        return results

    def _ingest(self) -> list[WindowResult]:
        """Read the new captures, test every full window, commit, apply the journal; the windows."""
        from flywheel.contracts.capture import CaptureCursor, read_feedback

        results = self._apply_journal()  # a crash after the last commit left windows to apply
        version, run_id = self._resolve()
        self._prepare(version, run_id)
        self._untracked = {}
        self.metrics.version.labels(**self.metrics.labels).set(float(version) if version.isdigit() else 0)
        cursor = self.cursor
        try:
            if self.cfg.from_now and not cursor.watermark and not cursor.seen:
                # Skip what is stored now; keep the horizon, so a late batch named before now still counts.
                start = CaptureCursor.at(time.time() - self.cfg.horizon_s)
                cursor = CaptureCursor(start.watermark, frozenset(self.reader.poll(start).names))
            poll = self.reader.poll(cursor)
            batches = [self.reader.read(name) for name in poll.names]
        except OSError as exc:
            raise FlywheelError(f"capture store {self.cfg.capture_uri} unreadable: {exc}") from None
        pending = self._load_pending()
        rows: dict[str, dict[str, list]] = {}  # version → its partial window's arrays, then this tick's records
        for v, p in pending.items():
            track = self._track(v)
            if track is not None:  # a version pending before and unmonitorable now waits for it
                rows[v] = {k: [p[k]] for k in ("emb", "pred", "ts", "ids")}
                inp = p.get("inp")
                if inp is None or inp.shape[1:] != (track.input_columns,):  # older file, or the channel changed
                    inp = np.full((len(p["ids"]), track.input_columns), np.nan)
                rows[v]["inp"] = [inp]
                rows[v]["png"] = []
        kept = {v: p for v, p in pending.items() if v not in rows}
        read = other_version = malformed = 0
        monitored: dict[str, int] = {}
        marked: dict[str, int] = {}
        for batch in batches:
            for cap in batch:
                read += 1
                if not cap.live:  # a release's acceptance/warm-up or a benchmark: not what users send
                    marked[cap.traffic] = marked.get(cap.traffic, 0) + 1
                    continue
                track = self._track(cap.version)
                if track is None:  # no registered version or no reference: nothing to test it against
                    other_version += 1
                elif cap.embedding is None or cap.embedding.shape != (track.dim,):
                    malformed += 1
                else:
                    monitored[cap.version] = monitored.get(cap.version, 0) + 1
                    r = rows.setdefault(cap.version, {k: [] for k in ("emb", "pred", "ts", "ids", "inp", "png")})
                    r["png"].append(cap.image_png if track.input_columns else None)
                    r["emb"].append(cap.embedding[None])
                    r["pred"].append(np.asarray([-1 if cap.label_index is None else cap.label_index]))
                    r["ts"].append(np.asarray([cap.ts]))
                    r["ids"].append(np.asarray([cap.prediction_id], dtype="<U64"))
        w = self.cfg.window
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for v, r in rows.items():
            track = self._tracks[v]
            dim = track.dim
            r["inp"].append(track.input_statistics(r["png"]))  # this tick's captures, decoded in one batch
            arrays[v] = {"emb": np.concatenate([e.reshape(-1, dim) for e in r["emb"]]).astype(np.float32),
                         "inp": np.concatenate(r["inp"]).astype(np.float64),
                         "pred": np.concatenate(r["pred"]).astype(np.int64),
                         "ts": np.concatenate(r["ts"]).astype(np.float64),
                         "ids": np.concatenate(r["ids"]).astype("<U64")}
        full = any(len(a["ids"]) >= w for a in arrays.values())
        feedback = read_feedback(self.cfg.capture_uri, self.cfg.model) if full else {}
        tested = []  # the alias's version's windows first (their order is the policy's), then the others'
        for v in sorted(arrays, key=lambda x: (x != version, int(x) if x.isdigit() else 0, x)):
            a = arrays[v]
            while len(a["ids"]) >= w:
                res = self._test_window(a["emb"][:w], a["pred"][:w], a["ts"][:w], a["ids"][:w], v, feedback,
                                        primary=v == version, inputs=a["inp"][:w])
                tested.append((res, [str(x) for x in a["ids"][:w]]))
                a = {k: x[w:] for k, x in a.items()}
            arrays[v] = a
            if len(a["ts"]):
                self.state.last_capture_ts = float(max(a["ts"].max(), self.state.last_capture_ts or 0))
        self.state.cursor = self.reader.advance(cursor, poll).to_json()
        self.state.journal = [{"window": asdict(r), "policy_before": None, "prediction_ids": ids, "policy": r.primary}
                              for r, ids in tested]
        self._commit({**kept, **arrays})  # records, windows, cursor: one write
        results += self._apply_journal()
        pending_of = {v: len(a["ids"]) for v, a in arrays.items()}
        has_any = None
        if not read and not sum(pending_of.values()) and not results:
            try:
                has_any = self.reader.any()
            except OSError:
                has_any = None
        others = {}
        for v in sorted(set(monitored) | set(pending_of) | {r.version for r in results}):
            if v != version and (monitored.get(v) or pending_of.get(v) or any(r.version == v for r in results)):
                others[v] = {"monitored": monitored.get(v, 0), "pending": pending_of.get(v, 0),
                             "windows": sum(1 for r in results if r.version == v)}
        self.last_tick = TickSummary(version, w, read, monitored.get(version, 0), marked, other_version, malformed,
                                     pending_of.get(version, 0), sum(1 for r in results if r.version == version),
                                     has_any, others)
        if marked:
            log.info("skipped %d captures not marked live: %s", sum(marked.values()), marked)
        self._count_read(self.last_tick, pending_of)
        return results

    def _count_read(self, summary: TickSummary, pending_of: dict[str, int]) -> None:
        m, lab = self.metrics, self.metrics.labels
        kinds = {"monitored": summary.monitored, "other_version": summary.other_version,
                 "monitored_other_version": sum(v["monitored"] for v in summary.versions.values()),
                 "malformed": summary.malformed, **{f"marked_{k}": n for k, n in summary.marked.items()}}
        for kind, n in kinds.items():
            if n:
                m.read.labels(**lab, kind=kind).inc(n)
        m.pending.labels(**lab).set(summary.pending)
        for v, n in pending_of.items():
            m.v_pending.labels(**lab, version=v).set(n)

    def _test_window(self, emb, pred, ts, pid, version, feedback, primary: bool = True,
                     inputs: np.ndarray | None = None) -> WindowResult:
        from flywheel.monitoring.accuracy import accuracy_test
        from flywheel.monitoring.drift import prediction_drift, window_decision_p

        track = self._tracks[version]
        # the input channel where the version has it and every capture of the window had its image
        usable = inputs is not None and track.input_columns and inputs.shape[1] == track.input_columns \
            and np.isfinite(inputs).all()
        p_emb = track.detector.test(emb, inputs if usable else None).p_value
        n_classes = len(track.reference.class_priors)
        ref_counts = np.bincount(track.reference.predictions, minlength=n_classes)
        counts = np.bincount(pred[pred >= 0], minlength=n_classes)[:n_classes]
        p_pred = prediction_drift(counts, ref_counts).p_value
        p = window_decision_p(p_emb, p_pred)  # weighted Bonferroni: the chi-square at a twentieth
        labelled = [(i, feedback[str(x)]) for i, x in enumerate(pid) if str(x) in feedback]
        accuracy, tested = None, None
        names = track.class_names
        if labelled and names is not None:
            hits = [names[pred[i]] == lab if 0 <= pred[i] < len(names) else False for i, lab in labelled]
            accuracy = float(np.mean(hits))
            tested = accuracy_test(int(sum(hits)), len(hits), track.reference_accuracy, self.cfg.alpha)
        self.state.labelled_total += len(labelled)
        kept = self._track_state(version)
        kept["windows"] += 1
        return WindowResult(kept["windows"], version, len(emb), p_emb, p_pred, p, bool(p < self.cfg.alpha),
                            accuracy, len(labelled), float(ts.min()), float(ts.max()),
                            (counts / max(1, counts.sum())).tolist(), labelled_total=self.state.labelled_total,
                            tested_at=time.time(), reference_accuracy=track.reference_accuracy,
                            p_accuracy=None if tested is None else tested.p_value,
                            accuracy_alarm=tested is not None and tested.alarm, primary=primary)

    def _apply_journal(self) -> list[WindowResult]:
        """Feed tested windows to the trigger policy, in order, each exactly once: the policy state a
        window starts from is committed first, so a replay after a crash decides the same way. Windows
        of another version than the alias's are recorded and reported, and never fire a retrain."""
        from flywheel.monitoring.triggers import PolicyState

        applied = []
        while self.state.journal:
            entry = self.state.journal[0]
            res = WindowResult(**entry["window"])
            decision = None
            if entry.get("policy", True):  # journals of older flywheels: every window fed the policy
                if entry.get("policy_before") is None:
                    entry["policy_before"] = asdict(self.policy.state)
                    self._commit()
                self.policy.state = PolicyState(**entry["policy_before"])
                labelled = res.p_accuracy is not None
                decision = self.policy.observe(res.drift, labelled_total=res.labelled_total, now=res.tested_at,
                                               accuracy_alarm=res.accuracy_alarm if labelled else None)
                if decision.fire:
                    res.trigger = decision.reason
            self._record_window(res, entry.get("prediction_ids"))
            if decision is not None and decision.fire:
                self._queue_retrain(decision, res)
            log.info("window %d v%s: p_emb=%.3g p_pred=%.3g drift=%s%s %s", res.index, res.version, res.p_embedding,
                     res.p_prediction, res.drift,
                     "" if res.p_accuracy is None else f" accuracy={res.accuracy:.3f} (reference "
                     f"{res.reference_accuracy:.3f}, p={res.p_accuracy:.3g}) alarm={res.accuracy_alarm}",
                     decision.note if decision is not None else "(not the alias's version: no trigger)")
            self.state.journal = self.state.journal[1:]
            self._commit()
            applied.append(res)
        return applied

    def _record_window(self, res: WindowResult, prediction_ids: list | None) -> None:
        """Store the window with its prediction ids beside the captures (contracts.window), for
        `flywheel trace`. Before the journal entry is dropped: a failed write fails the tick and the
        next tick replays the window (same decision, same record name). A journal written by an older
        flywheel has no ids: that window is not recorded."""
        from flywheel.contracts.window import WindowRecord

        if not prediction_ids:
            return
        record = WindowRecord(model=self.cfg.model, env=self.cfg.env, version=res.version,
                              monitor=self.state.instance[:8], index=res.index, first_ts=res.first_ts,
                              last_ts=res.last_ts, tested_at=res.tested_at, size=res.size, p_value=res.p_value,
                              p_embedding=res.p_embedding, p_prediction=res.p_prediction, alpha=self.cfg.alpha,
                              drift=res.drift, trigger=res.trigger, accuracy=res.accuracy, labelled=res.labelled,
                              prediction_ids=tuple(str(x) for x in prediction_ids),
                              reference_accuracy=res.reference_accuracy, p_accuracy=res.p_accuracy,
                              accuracy_alarm=res.accuracy_alarm)
        try:
            record.write(self.cfg.capture_uri)
        except Exception as exc:  # noqa: BLE001 - any store error (OSError, google.api_core): retried next tick
            raise FlywheelError(f"could not record window {res.index} in capture store {self.cfg.capture_uri} "
                                f"({type(exc).__name__}: {exc}); the next tick retries it") from None

    # -- triggers ----------------------------------------------------------------------------------
    def _queue_retrain(self, decision, res: WindowResult) -> None:
        from flywheel.monitoring.triggers import RetrainEvent

        snapshot, digest = self._latest_snapshot()
        # The same window replayed after a crash asks with the same id, which the outbox keeps once.
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"flywheel-monitor/{self.state.instance}/{res.version}/"
                              f"{res.index}").hex
        details = {"episode": decision.episode, "window": res.index, "p_embedding": res.p_embedding,
                   "p_prediction": res.p_prediction, "note": decision.note}
        if res.p_accuracy is not None:
            details.update(accuracy=res.accuracy, reference_accuracy=res.reference_accuracy,
                           p_accuracy=res.p_accuracy, labelled=res.labelled)
        event = RetrainEvent(model=self.cfg.model, reason=decision.reason, event_id=event_id, env=self.cfg.env,
                             version=res.version,
                             dataset=self.cfg.dataset or self._dataset_tag(res.version), snapshot=snapshot,
                             snapshot_digest=digest, details=details, **self._source_of(res.version))
        self.outbox.enqueue(event, self.actions)
        self.metrics.triggers.labels(**self.metrics.labels, reason=decision.reason).inc()
        log.warning("retrain requested for %s: %s", self.cfg.model, decision.note)
        if not self.actions:
            log.warning("no trigger action configured (--github-repo, --ssh-node, --local-command): retrain "
                        "request %s is only logged and counted in flywheel_retrain_triggers_total", event.event_id)

    def _source_of(self, version: str) -> dict[str, str]:
        """Where `version` came from: project, project_dir, commit (see `version_source`). A registry
        that cannot answer fails the tick: the journal replays the window next tick with the same event
        id, so the request goes out once, naming the right project, rather than now naming none."""
        if version not in self._sources:
            self._sources[version] = version_source(self.registry, self.cfg.model, version)
        return self._sources[version]

    def _dataset_tag(self, version: str) -> str | None:
        try:
            return self.registry.dataset_of(self.registry.version(version, self.cfg.model))
        except FlywheelError:
            return None

    def _latest_snapshot(self) -> tuple[str | None, str | None]:
        if self.cfg.snapshot_dir is None:
            return None, None
        from flywheel.contracts.capture import safe_name
        from flywheel.monitoring.snapshot import latest_snapshot

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
        from flywheel.contracts.capture import read_writer_stats

        m, lab = self.metrics, self.metrics.labels
        m.window_size.labels(**lab).set(self.cfg.window)
        if self.state.last_capture_ts:
            m.lag.labels(**lab).set(max(0.0, time.time() - self.state.last_capture_ts))
        try:
            m.dropped.labels(**lab).set(sum(s.get("dropped", 0) for s in
                                            read_writer_stats(self.cfg.capture_uri, self.cfg.model)))
        except Exception:  # noqa: BLE001 - stats are advisory
            log.debug("capture writer stats unreadable", exc_info=True)
        if self.state.version in self._tracks:
            ref = self._tracks[self.state.version].reference_accuracy
            if ref is not None:
                m.reference_accuracy.labels(**lab).set(ref)
        for r in results:
            vlab = {**lab, "version": r.version}
            m.v_windows.labels(**vlab).inc()
            m.v_p_value.labels(**vlab, test="embedding").set(r.p_embedding)
            m.v_p_value.labels(**vlab, test="prediction").set(r.p_prediction)
            m.v_p_value.labels(**vlab, test="combined").set(r.p_value)
            m.v_detected.labels(**vlab).set(1.0 if r.drift else 0.0)
            if r.drift:
                m.v_drifted.labels(**vlab).inc()
            if r.accuracy is not None:
                m.v_accuracy.labels(**vlab).set(r.accuracy)
            if r.p_accuracy is not None:
                m.v_accuracy_p.labels(**vlab).set(r.p_accuracy)
                m.v_accuracy_alarm.labels(**vlab).set(1.0 if r.accuracy_alarm else 0.0)
                if r.accuracy_alarm:
                    m.v_accuracy_alarms.labels(**vlab).inc()
        primary = [r for r in results if r.primary]
        for r in primary:
            m.windows.labels(**lab).inc()
            if r.drift:
                m.drifted.labels(**lab).inc()
            if r.accuracy_alarm:
                m.accuracy_alarms.labels(**lab).inc()
        if primary:
            last = primary[-1]
            m.p_value.labels(**lab, test="embedding").set(last.p_embedding)
            m.p_value.labels(**lab, test="prediction").set(last.p_prediction)
            m.p_value.labels(**lab, test="combined").set(last.p_value)
            m.detected.labels(**lab).set(1.0 if last.drift else 0.0)
            for i, frac in enumerate(last.class_fractions):
                m.class_fraction.labels(**lab, class_index=str(i)).set(frac)
        labelled = [r for r in primary if r.accuracy is not None]
        if labelled:
            m.accuracy.labels(**lab).set(labelled[-1].accuracy)
        tested = [r for r in primary if r.p_accuracy is not None]
        if tested:
            m.accuracy_p.labels(**lab).set(tested[-1].p_accuracy)
            m.accuracy_alarm.labels(**lab).set(1.0 if tested[-1].accuracy_alarm else 0.0)

    def _run_of(self, version: str) -> str:
        """The version's MLflow run in the `monitoring` experiment: created on its first window, reopened
        (RUNNING) when an earlier --once finished it. One run per model, env and version."""
        from mlflow.entities import Param

        from flywheel.core.runlog import ensure_experiment

        client = self.registry.client
        kept = self._track_state(version)
        if kept["run_id"] is None:
            track = self._tracks.get(version)
            exp = ensure_experiment(replace(self.settings, experiment=EXPERIMENT), client)
            tags = {"model": self.cfg.model, "env": self.cfg.env, "version": version,
                    "capture_uri": self.cfg.capture_uri}
            if track is not None:
                tags.update(reference_run_id=track.reference.run_id, embedding_source=track.embedding_source,
                            accuracy_reference=track.accuracy_source)
            run = client.create_run(exp, run_name=f"monitor-{self.cfg.model}-{self.cfg.env}-v{version}", tags=tags)
            params = [Param("window", str(self.cfg.window)), Param("alpha", str(self.cfg.alpha))]
            if track is not None and track.reference_accuracy is not None:
                params.append(Param("reference_accuracy", f"{track.reference_accuracy:.6g}"))
            client.log_batch(run.info.run_id, params=params)
            kept["run_id"] = run.info.run_id
            self._open_runs.add(run.info.run_id)
            self._commit()
        elif kept["run_id"] not in self._open_runs:
            client.update_run(kept["run_id"], status="RUNNING")
            self._open_runs.add(kept["run_id"])
        return kept["run_id"]

    def _log_mlflow(self, results: list[WindowResult]) -> None:
        if not self.cfg.log_mlflow or not results:
            return
        for version in dict.fromkeys(r.version for r in results):
            self._log_version(version, [r for r in results if r.version == version])

    def _log_version(self, version: str, results: list[WindowResult]) -> None:
        from mlflow.entities import Metric, RunTag

        client = self.registry.client
        run_id = self._run_of(version)
        now = int(time.time() * 1000)
        metrics = []
        for r in results:
            values = {"p_value": r.p_value, "p_embedding": r.p_embedding, "p_prediction": r.p_prediction,
                      "drift_detected": float(r.drift), "window_size": r.size, "labelled": r.labelled,
                      "retrain_triggered": float(r.trigger is not None)}
            if r.accuracy is not None:
                values["accuracy"] = r.accuracy
            if r.p_accuracy is not None:
                values.update(p_accuracy=r.p_accuracy, accuracy_alarm=float(r.accuracy_alarm))
            metrics += [Metric(k, float(v), now, r.index) for k, v in values.items()]
        for i in range(0, len(metrics), 900):  # log_batch caps at 1000 metrics per call
            client.log_batch(run_id, metrics=metrics[i:i + 900])
        primary = [r for r in results if r.primary]
        if primary:  # `flywheel status` shows an env's latest window: the alias's version's, not a canary's
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _status_tags(primary).items()])
        if time.monotonic() - self._plotted.get(version, -float("inf")) < self.cfg.plot_every_s:
            return
        self._plotted[version] = time.monotonic()
        history = client.get_metric_history(run_id, "p_value")
        drift = {m.step: m.value for m in client.get_metric_history(run_id, "drift_detected")}
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = drift_plot(history, drift, self.cfg.alpha, Path(tmp) / "drift_over_time.png",
                              f"{self.cfg.model}@{self.cfg.env} v{version}")
            client.log_artifact(run_id, str(path), "plots")

    def _end_run(self) -> None:
        """Mark the MLflow runs this process opened FINISHED (the next writer reopens them)."""
        opened, self._open_runs = self._open_runs, set()
        for run_id in sorted(opened):
            try:
                self.registry.client.set_terminated(run_id, "FINISHED")
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not fail stopping; the run reopens later
                log.warning("could not mark monitoring run %s finished: %s", run_id, exc)

    def close(self) -> None:
        """End what this monitor opened: its MLflow runs go FINISHED (`--once` returning, a service stopping)."""
        self._end_run()

    # -- service ---------------------------------------------------------------------------------
    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Tick every `interval_s` until SIGTERM/SIGINT (or `stop` is set); a failing tick is logged
        and retried next interval, so a tracking-server or store outage does not kill the service.
        Holds the state dir's lock throughout (MonitorBusy if another monitor has it). A group of one."""
        from flywheel.monitoring.group import MonitorGroup  # it imports this module

        MonitorGroup([self], self.cfg.metrics_port, self.cfg.metrics_addr).serve_forever(stop)


SOURCE_TAGS = {"project": "flywheel.project", "project_dir": "flywheel.project_dir", "commit": "git_commit"}


def version_source(registry, model: str, version: str) -> dict[str, str]:
    """project, project_dir and commit of a registered version, for its retrain request: the version's
    own lineage tags (SOURCE_TAGS) first, then its training run's; "" where neither records one (a
    version or run deleted since counts as recording none). A tracking server that does not answer
    raises, so the caller retries rather than sending a request that names no project."""
    from mlflow.exceptions import MlflowException

    def gone(exc: MlflowException) -> bool:
        return exc.error_code == "RESOURCE_DOES_NOT_EXIST"

    try:
        mv = registry.client.get_model_version(model, str(version))
    except MlflowException as exc:
        if not gone(exc):
            raise FlywheelError(f"registry unreadable for {model} v{version}'s lineage: {exc.message}") from None
        log.warning("%s v%s is no longer registered: its retrain request names no project", model, version)
        return dict.fromkeys(SOURCE_TAGS, "")
    tags = {k: v for k, v in (mv.tags or {}).items() if v}
    if not all(tags.get(t) for t in SOURCE_TAGS.values()) and mv.run_id:
        try:
            run_tags = registry.client.get_run(mv.run_id).data.tags
        except MlflowException as exc:
            if not gone(exc):
                raise FlywheelError(f"tracking server unreadable for run {mv.run_id}'s lineage: {exc.message}") \
                    from None
            run_tags = {}
        tags = {**run_tags, **tags}
    return {key: tags.get(tag) or "" for key, tag in SOURCE_TAGS.items()}


def _iso(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _status_tags(results: list[WindowResult]) -> dict[str, str]:
    """Tags on the monitoring run that `flywheel status` reads: the latest window, the latest drifting
    window, the latest retrain request (the metrics hold every window; tags answer without a history)."""
    last = results[-1]
    tags = {"last_window": str(last.index), "last_window_at": _iso(last.tested_at or last.last_ts),
            "last_window_drift": str(last.drift).lower(), "last_window_p_value": f"{last.p_value:.6g}"}
    drifted = [r for r in results if r.drift]
    if drifted:
        tags["last_drift_at"] = _iso(drifted[-1].tested_at or drifted[-1].last_ts)
    fired = [r for r in results if r.trigger]
    if fired:
        tags.update(last_retrain_at=_iso(fired[-1].tested_at or fired[-1].last_ts),
                    last_retrain_reason=fired[-1].trigger, last_retrain_window=str(fired[-1].index))
    return tags


def _lock_owner(state_dir: Path) -> str:
    try:
        return (Path(state_dir) / LOCK_OWNER).read_text().strip() or "owner unknown"
    except OSError:
        return "owner unknown"


def drift_plot(history, drift: dict, alpha: float, path: Path, title: str) -> Path:
    """p-value per window on a log axis, alpha line, drifting windows in red."""
    from flywheel.core.plots import figure

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
