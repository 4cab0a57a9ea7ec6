"""`TrackedRun`: the MLflow run of one training, as a `FitCallback` of `flywheel.component.loop`.

`on_start` creates (or, under `mlflow run`, adopts) the run and logs parameters, lineage tags and the
dataset input; `on_epoch` logs each epoch's metrics through `RunLogger` (spooled, retried); `finish`
evaluates on the test split, logs the test metrics, plots and per-class report, then `log_model`
(the contract check, exports, test set, reference sample, spec). Lineage tags every later step reads:
`git_commit`, `git_dirty`, `dataset`, `dataset_digest`, `flywheel.project` (the project as the user
named it: a path or a git URL, from FLYWHEEL_PROJECT, else the working directory) and
`flywheel.project_dir` (the MLproject's folder within it, FLYWHEEL_PROJECT_DIR, default ".").
Under a search's trial (flywheel.component.trial) the run is the trial's own, nested under the
study's run, and the pruner may end it KILLED after an epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flywheel.component.distributed import Cluster
from flywheel.component.loop import Fitted, start_preload
from flywheel.component.trial import active_trial
from flywheel.contracts.component import GateSpec
from flywheel.core.config import Settings
from flywheel.core.data import Splits
from flywheel.core.errors import FlywheelError
from flywheel.core.evaluate import EvalReport, evaluate_model


def git_info(source_dir: Path) -> dict[str, str]:
    """Commit and dirty flag of the code being trained. A shipped `git archive` has no .git, so the
    commit comes from FLYWHEEL_GIT_COMMIT (set by remote-train) when git can't tell."""
    commit = os.environ.get("FLYWHEEL_GIT_COMMIT", "")
    dirty = os.environ.get("FLYWHEEL_GIT_DIRTY", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            dirty = str(bool(status.strip())).lower()
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "unknown", "unknown"
    return {"git_commit": commit, "git_dirty": dirty or "false"}


def refuse_mlflow_default_store(settings: Settings, cwd: Path | None = None) -> None:
    """Under `mlflow run`, refuse a run that MLflow put in its own default store when Flywheel's rule
    (MLFLOW_TRACKING_URI, else $FLYWHEEL_HOME/mlflow.db) names another one.

    The `mlflow` CLI creates the run before the entry point starts, in the store it resolves itself:
    MLFLOW_TRACKING_URI, else ./mlflow.db (./mlruns when that holds an old file store) where it was
    started, and hands that URI down. A shell with only FLYWHEEL_HOME exported would so train into
    ./mlflow.db while every `flywheel` command reads $FLYWHEEL_HOME; the model would be "not found"
    one command later. `eval "$(flywheel env)"` exports the URI, and the run lands where it belongs.
    Recognised: MLflow's default in the entry point's directory (the project, as `mlflow run .`
    starts it); a store that is also $FLYWHEEL_HOME's passes."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    from flywheel.core.config import local_store_path

    here = (cwd or Path.cwd()).resolve()
    path = local_store_path(settings.tracking_uri)
    own = (settings.work_dir / "mlflow.db").resolve()
    if path is None or path.resolve() not in (here / "mlflow.db", here / "mlruns") or path.resolve() == own:
        return
    raise FlywheelError(f"`mlflow run` logged to MLflow's default store {settings.tracking_uri}, not Flywheel's "
                        f"sqlite:///{own} ($FLYWHEEL_HOME): run `eval \"$(flywheel env)\"` first, then `mlflow "
                        "run` again (or use `flywheel train`)")


class TrackedRun:
    """The MLflow run of one training (rank 0), a `FitCallback`: `on_start` creates (or, under
    `mlflow run`, adopts) the run and logs params, tags and the dataset input; `on_epoch` logs the
    epoch's metrics through `RunLogger` (spooled, retried); `finish` evaluates on the test split, logs
    the test metrics, plots, reference sample and model, and ends the run (FAILED if that raises)."""

    def __init__(self, settings: Settings, splits: Splits, device: torch.device, cluster: Cluster | None = None):
        """`cluster`: a distributed job's ranks and nodes (recorded on the run), None for one process."""
        import mlflow  # noqa: F401 - imported before fit() seeds the RNGs, so its import cannot touch them

        self.settings, self.splits, self.device, self.cluster = settings, splits, device, cluster
        self.run = None  # mlflow's ActiveRun, from on_start
        self.logger = None
        self.trial = None  # the search's TrialHook while `flywheel tune` runs this training

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def on_start(self, params: dict[str, Any]) -> None:
        import mlflow

        from flywheel.core.runlog import RunLogger, active_run_id, ensure_experiment

        self.settings.apply()  # mlflow.start_run and log_model are MLflow's fluent API: the process-global URI
        experiment_id = ensure_experiment(self.settings)
        trial = self.trial = active_trial()
        if trial is None:
            run = mlflow.start_run(run_id=active_run_id(), experiment_id=None if active_run_id() else experiment_id,
                                   log_system_metrics=True)
        else:  # a search's trial: its own run, nested under the study's (flywheel.component.trial)
            run = mlflow.start_run(experiment_id=experiment_id, tags=trial.run_tags(), log_system_metrics=True)
            trial.on_run(run.info.run_id, self.settings.model_name)
        self.run = run
        self.logger = logger = RunLogger(run.info.run_id)
        # Under `mlflow run` the project's parameters are already logged (as given); MLflow forbids
        # re-logging a key with another spelling of its value ("true" vs "True"), so skip those keys.
        logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
        if self.cluster is not None:
            params = {**params, **self.cluster.params()}
        logger.log_params({k: v for k, v in params.items() if k not in logged})
        splits = self.splits
        tags = {**git_info(Path.cwd()), **project_tags(Path.cwd()), "dataset": splits.name,
                "dataset_digest": splits.digest,
                "entry_point": os.environ.get("FLYWHEEL_ENTRY_POINT", "train"), "flywheel.device": str(self.device)}
        if self.cluster is not None:
            tags.update(self.cluster.tags())
        if event_id := os.environ.get("FLYWHEEL_EVENT_ID"):  # a monitor's retrain: dedupe key (flywheel.control.dispatches)
            tags["flywheel.event_id"] = event_id
        logger.set_tags(tags)
        _log_dataset(splits)

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.logger.log_metrics(metrics, step=epoch)
        trial = self.trial
        if trial is not None and trial.should_stop(epoch, metrics):  # pruned: the run ends KILLED
            import mlflow

            self.logger.set_tags(trial.stopped_tags())
            self.logger.flush()
            mlflow.end_run("KILLED")
            raise trial.stopped()

    def fail(self, tags: dict[str, str]) -> None:
        """End the run FAILED with `tags` saying why (a distributed job lost a rank): before any model
        is logged, so nothing of this run can be registered. The run is the one `on_start` opened or,
        if training failed before that, the one `mlflow run` opened for the job."""
        import mlflow

        from flywheel.core.runlog import active_run_id

        if self.run is None:
            run_id = active_run_id()
            if run_id is None:
                return  # no run was ever opened: nothing to record
            self.settings.apply()
            client = mlflow.MlflowClient()
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, "FAILED")
            return
        self.logger.set_tags(tags)
        self.logger.flush()
        mlflow.end_run("FAILED")

    def finish(self, fitted: Fitted, *, embedding: str | None, gate: GateSpec = GateSpec(), name: str | None = None,
               test_set_uri: str | None = None):
        """(test EvalReport, the LoggedModel); the run is ended either way (FAILED if this raises,
        e.g. a ContractError: then no model is logged and nothing can be registered)."""
        import mlflow

        from flywheel.component.log import log_model

        logger, splits = self.logger, self.splits
        start_preload("onnx", "onnxruntime")  # the export's imports, while torch evaluates (without the GIL)
        try:
            report = evaluate_model(fitted.model, splits, splits.test, f"runs:/{self.run_id}/model", splits.name,
                                    self.device)
            logger.log_metrics({**report.metrics(), "train_seconds": fitted.train_seconds})
            _log_reports(logger, splits, fitted.history, report)
            logged = log_model(fitted.model.cpu().eval(), splits, embedding=embedding, gate=gate, name=name,
                               test_set_uri=test_set_uri, logger=logger)
            logger.flush()
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run()
        return report, logged


def _log_dataset(splits: Splits) -> None:
    """Record the exact data: an MLflow dataset input whose digest is our content digest."""
    import mlflow

    sample = splits.train.images[:2].reshape(2, -1).astype(np.float32)
    with warnings.catch_warnings():
        # MLflow registers its local-path dataset source for both the "" and "file" schemes, so every
        # local path "can be interpreted in multiple ways": two copies of one class. Nothing to act on.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        ds = mlflow.data.from_numpy(sample, targets=splits.train.labels[:2], source=splits.source,
                                    name=splits.name, digest=splits.digest[:32])
    mlflow.log_input(ds, context="training", tags={"dataset_digest": splits.digest,
                                                   "train": str(len(splits.train)), "val": str(len(splits.val)),
                                                   "test": str(len(splits.test))})


def project_tags(cwd: Path) -> dict[str, str]:
    """Which project trained this run, so a retrain can run the same one (see the module docstring)."""
    return {"flywheel.project": os.environ.get("FLYWHEEL_PROJECT") or str(cwd.resolve()),
            "flywheel.project_dir": os.environ.get("FLYWHEEL_PROJECT_DIR") or "."}


def _log_reports(logger, splits: Splits, history: list[dict[str, float]], report: EvalReport) -> None:
    """The loss curve, confusion matrix and per-class report of the test evaluation."""
    from flywheel.core.plots import confusion_matrix_png, loss_curve_png

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plots = tmp / "plots"
        plots.mkdir()
        loss_curve_png(history, plots / "loss_curve.png")
        confusion_matrix_png(report.confusion, splits.class_names, plots / "confusion_matrix.png")
        logger.log_artifacts(plots, "plots")
        (tmp / "per_class_report.json").write_text(json.dumps(
            {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "per_class": report.per_class}, indent=2))
        logger.log_artifact(tmp / "per_class_report.json", "evaluation")
