"""Everything a training run says to MLflow goes through here, so failures are handled in one place.

`preflight` fails fast (unreachable server, wrong credentials) before any compute is spent, and sets
the MLflow client's retry policy for the rest of the process. `RunLogger` logs params, tags, metrics
and artifacts of one run so that a tracking outage (server killed, Postgres restarted) loses nothing
and duplicates nothing:

* Retries: MLflow's HTTP client retries every method (POST too) on connection errors and on
  429/500/502/503/504 with exponential backoff. A Postgres outage reaches the client as 503
  (TEMPORARILY_UNAVAILABLE), a dead server as "connection refused". `configure_retries` sizes the
  policy so an outage of `FLYWHEEL_TRACKING_OUTAGE_S` (default 300 s) is ridden out by every call,
  including `mlflow.pytorch.log_model`'s uploads and `end_run`.
* Spool: per-epoch params/tags/metrics are written to a local journal
  (`$FLYWHEEL_HOME/spool/<run_id>.jsonl`) *before* they are sent, sent with a short retry budget so
  training does not stall, and kept pending when the server is away. Each later call replays what is
  pending first; `flush()` replays everything with the long budget and fails loudly (journal kept)
  only if the server stays away longer than that.
* No duplicates: metrics carry their client-side timestamp, so a replay of a batch the server did
  store (the answer got lost) hits MLflow's metric primary key (key, timestamp, step, value) and is
  dropped by the store; params are idempotent for equal values; tags overwrite. The run itself is
  created once, before training.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError

OUTAGE_ENV = "FLYWHEEL_TRACKING_OUTAGE_S"
DEFAULT_OUTAGE_S = 300.0
_MAX_BATCH = 1000  # MLflow's log_batch limit: 1000 metrics, 100 params, 100 tags per request
_MAX_PARAMS = 100
# MLflow refuses more retries than this (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT) and longer single
# sleeps than urllib3's backoff cap (120 s).
_RETRIES_LIMIT = 10
_BACKOFF_CAP = 120.0


def retry_window(max_retries: int, backoff_factor: float) -> float:
    """Seconds urllib3 sleeps across all retries: 0, f*2, f*4, ... each capped at 120 s."""
    return sum(0.0 if n <= 1 else min(_BACKOFF_CAP, backoff_factor * 2 ** (n - 1))
               for n in range(1, max_retries + 1))


def retry_policy(outage_s: float) -> tuple[int, int]:
    """(max_retries, backoff_factor) whose total sleep covers an outage of `outage_s` seconds."""
    for factor in (1, 2, 4, 8):
        for retries in range(1, _RETRIES_LIMIT + 1):
            if retry_window(retries, factor) >= outage_s:
                return retries, factor
    return _RETRIES_LIMIT, 8


def configure_retries(outage_s: float | None = None, timeout_s: int = 60) -> float:
    """Make every MLflow HTTP call in this process (and its children) ride out an outage of
    `outage_s` seconds; explicit MLFLOW_HTTP_REQUEST_* settings win. Returns the covered seconds."""
    outage_s = float(outage_s if outage_s is not None else os.environ.get(OUTAGE_ENV, DEFAULT_OUTAGE_S))
    retries, factor = retry_policy(outage_s)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(factor))
    # A hung connection (server frozen, not dead) must fail over to a retry, not wait 120 s.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    return retry_window(int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]),
                        float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]))


_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def quick_failure(retries: int = 1, timeout: int = 15):
    """Let MLflow's HTTP client give up after `retries` quick retries inside this block.

    MLflow reads these variables on every request, so the change is scoped to the block; other
    threads (system metrics) share the process environment and get the short budget meanwhile, which
    only costs them a logged warning.
    """
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in names}
        os.environ.update(names)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def ensure_experiment(settings: Settings, client=None) -> str:
    """Id of the settings' experiment, created on first use (embedded: artifacts in work_dir).
    `client`: an explicit MlflowClient (a Registry's); default the process-global one (training)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(settings.experiment, artifact_location=settings.artifact_root)
    except mlflow.exceptions.MlflowException as exc:
        # Another trainer (or a retried request of ours that did land) created it meanwhile.
        if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
            raise
        return client.get_experiment_by_name(settings.experiment).experiment_id


def preflight(settings: Settings) -> None:
    """Check the tracking server answers and accepts our credentials, before training starts.

    Also sets the retry policy (`configure_retries`) for the rest of the run.
    """
    if settings.embedded:
        return
    import requests

    configure_retries()
    base = settings.tracking_uri.rstrip("/")
    auth = (settings.username, settings.password) if settings.username else None
    try:
        resp = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            auth=auth, timeout=10)
    except requests.RequestException as exc:
        raise FlywheelError(f"tracking server {base} unreachable: {type(exc).__name__}: {exc}. Start it or fix "
                            "MLFLOW_TRACKING_URI; `flywheel doctor` checks the whole setup.") from None
    if resp.status_code == 401:
        who = f"user {settings.username!r}" if settings.username else "no credentials"
        raise FlywheelError(f"tracking server {base} rejected {who} (401): set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD to a valid account")
    if resp.status_code == 403:
        raise FlywheelError(f"tracking server {base}: user {settings.username!r} lacks permission (403)")
    if resp.status_code >= 400:
        raise FlywheelError(f"tracking server {base} answered {resp.status_code}: {resp.text[:200]}")


class RunLogger:
    """Logs to one MLflow run by id (the run opened by `mlflow.start_run` or `mlflow run`).

    Params, tags and metrics go through the spool journal described in the module docstring;
    artifacts are uploaded at once with the long retry budget (uploads are idempotent PUTs).
    """

    def __init__(self, run_id: str, spool_dir: Path | None = None, quick_retries: int = 1):
        import mlflow

        self.run_id = run_id
        self._client = mlflow.MlflowClient()
        self._embedded = mlflow.get_tracking_uri().startswith(("sqlite:", "file:"))
        self._quick_retries = quick_retries
        self._pending: list[dict] = []
        self._seq = 0
        self._lock = threading.Lock()
        home = Path(os.environ.get("FLYWHEEL_HOME", Path.cwd() / ".flywheel"))
        self.spool_path = Path(spool_dir or home / "spool") / f"{run_id}.jsonl"

    # ----------------------------------------------------------------------------- public API
    def log_params(self, params: dict[str, Any]) -> None:
        self._submit({"params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._submit({"tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # The timestamp is fixed here, once: a replay then sends the identical metric rows.
        ts = int(time.time() * 1000)
        self._submit({"metrics": [[k, float(v), ts, int(step or 0)] for k, v in metrics.items()]})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.flush_pending(quick=True)
        self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.flush_pending(quick=True)
        self._client.log_artifacts(self.run_id, str(directory), artifact_path=artifact_path)

    @property
    def pending(self) -> int:
        """Entries written to the journal but not yet confirmed stored by the server."""
        return len(self._pending)

    def flush(self) -> None:
        """Wait until everything logged so far is stored (long retry budget); raise if it can't be."""
        import mlflow
        from mlflow.exceptions import MlflowException

        configure_retries()
        try:
            self.flush_pending(quick=False)
        except (MlflowException, OSError) as exc:
            raise FlywheelError(f"{len(self._pending)} logged entries of run {self.run_id} could not be stored "
                                f"on the tracking server ({_short(exc)}); they are kept in {self.spool_path}. "
                                "Bring the server back (`flywheel doctor`) and run "
                                "`flywheel.core.runlog.replay_spool` on that file.") from exc
        mlflow.flush_async_logging()
        if not self._embedded:
            self.spool_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------ internals
    def _submit(self, entry: dict) -> None:
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, "run_id": self.run_id, **entry}
            if not self._embedded:
                # Write-ahead: the entry is on disk before the server has a chance to lose it.
                self.spool_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spool_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            self._pending.append(entry)
        self.flush_pending(quick=not self._embedded)

    def flush_pending(self, quick: bool) -> bool:
        """Send pending entries in order; True when none is left. `quick`: give up fast, keep them."""
        from mlflow.exceptions import MlflowException

        with self._lock:
            while self._pending:
                try:
                    with quick_failure(self._quick_retries) if quick else contextlib.nullcontext():
                        _send(self._client, self._pending[0])
                except (MlflowException, OSError) as exc:
                    if not quick or _is_client_error(exc):
                        raise
                    _warn_once(self, f"tracking server unavailable ({_short(exc)}); "
                                     f"{len(self._pending)} entries kept in {self.spool_path} and retried")
                    return False
                self._pending.pop(0)
        return True


def _send(client, entry: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    run_id = entry["run_id"]
    params = [Param(k, v) for k, v in entry.get("params", {}).items()]
    tags = [RunTag(k, v) for k, v in entry.get("tags", {}).items()]
    metrics = [Metric(k, v, ts, step) for k, v, ts, step in entry.get("metrics", [])]
    for i in range(0, max(len(params), 1), _MAX_PARAMS):
        chunk_params = params[i:i + _MAX_PARAMS]
        chunk_tags = tags[i:i + _MAX_PARAMS]
        if chunk_params or chunk_tags:
            client.log_batch(run_id, params=chunk_params, tags=chunk_tags, synchronous=True)
    for i in range(_MAX_PARAMS, len(tags), _MAX_PARAMS):
        client.log_batch(run_id, tags=tags[i:i + _MAX_PARAMS], synchronous=True)
    for i in range(0, len(metrics), _MAX_BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + _MAX_BATCH], synchronous=True)


def replay_spool(path: Path, settings: Settings | None = None) -> int:
    """Send every entry of a spool journal again (idempotent: see module docstring); returns the count."""
    import mlflow

    if settings is not None:
        settings.apply()
    configure_retries()
    client = mlflow.MlflowClient()
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for entry in lines:
        _send(client, entry)
    return len(lines)


def _is_client_error(exc: Exception) -> bool:
    """A 4xx (bad request, auth): retrying later can't help, so it must surface now."""
    code = getattr(exc, "error_code", "")
    return code in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED",
                    "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_STATE"}


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else repr(exc))[:160]


def _warn_once(logger: RunLogger, message: str) -> None:
    import logging

    if not getattr(logger, "_warned", False):
        logging.getLogger("flywheel.tracking").warning(message)
        logger._warned = True


def active_run_id() -> str | None:
    """The run `mlflow run` opened for us (MLFLOW_RUN_ID), if any."""
    return os.environ.get("MLFLOW_RUN_ID") or None
