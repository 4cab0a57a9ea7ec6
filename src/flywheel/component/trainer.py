"""`train`: a component's whole `train` entry point in one call: fit, track, log, gate.

preflight (a dead tracking server fails now, not after training) → `fit` with a `TrackedRun` on rank
0 → `log_model` (the contract) → the champion/challenger gate, which registers the run's model as
the `candidate` of `model_name` only if it beats the champion on the test set. Under `torchrun`
every rank calls it; ranks > 0 train their shard and return None, and never touch MLflow. A
distributed job (one node or several, flywheel.component.distributed) has a bounded process-group
timeout, records its nodes on the run, and when a rank is lost rank 0 ends the run FAILED with the
reason before any model is logged (so nothing half-trained can be registered). Inside a search's trial
(flywheel.component.trial) the gate is skipped: the search gates its best trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from flywheel.component.distributed import Cluster, process_group_timeout
from flywheel.component.loop import DistContext, FitConfig, fit, select_device, start_preload
from flywheel.component.run import TrackedRun, refuse_mlflow_default_store
from flywheel.component.trial import active_trial
from flywheel.contracts.component import ComponentSpec, GateSpec
from flywheel.core.config import Settings
from flywheel.core.data import Splits
from flywheel.core.procs import skip_final_collection

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    registered_version: str | None
    train_seconds: float
    spec: ComponentSpec | None = None


def train(model: nn.Module, splits: Splits, cfg: FitConfig, *, embedding: str | None,
          gate: GateSpec = GateSpec(), register: bool = True, margin: float = 0.0, model_name: str | None = None,
          name: str | None = None, test_set_uri: str | None = None,
          settings: Settings | None = None) -> TrainResult | None:
    """Train `model` on `splits`, log it under the component contract, gate it; the result on rank 0.

    `embedding`: the submodule whose output is the monitor's embedding (None: softmax outputs).
    `model_name`: the registered model (default FLYWHEEL_MODEL_NAME). `name`: the component's name
    for its network (default: the class name). `settings`: default `Settings.from_env()`."""
    skip_final_collection()  # the process ends soon after training: spare it the exit-time collections
    settings = settings or Settings.from_env()
    if model_name:
        from dataclasses import replace

        settings = replace(settings, model_name=model_name)
    refuse_mlflow_default_store(settings)
    ctx = DistContext.from_env()
    # The optimizer's first call and the pt2 export import torch._dynamo; the plots, matplotlib.
    preload = start_preload("torch._dynamo", "matplotlib.figure", "matplotlib.backends.backend_agg")
    if ctx.is_main:
        from flywheel.core.runlog import preflight

        preflight(settings)
    device = select_device(cfg.device, ctx.local_rank)
    cluster = None
    if ctx.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's object collectives (Cluster.join) use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=process_group_timeout())
    try:
        if ctx.distributed:
            cluster = Cluster.join(ctx)  # rank 0 adopts the job's MLflow run wherever torch placed it
        tracked = TrackedRun(settings, splits, device, cluster=cluster) if ctx.is_main else None
        try:
            fitted = fit(cfg, splits, device, ctx, callback=tracked, preload=preload, model=model)
        except Exception as exc:  # a lost peer, a timeout, any rank's error: record why, then re-raise
            if cluster is not None:
                reason = cluster.on_failure(exc)
                if tracked is not None and reason is not None:
                    try:
                        tracked.fail(reason)
                    except Exception:  # noqa: BLE001 - the tracking server is down too: the training error is the one to raise
                        _log.exception("could not record the failure on the MLflow run: %s", reason)
            raise
        if tracked is None:
            return None
        report, logged = tracked.finish(fitted, embedding=embedding, gate=gate, name=name, test_set_uri=test_set_uri)
    finally:
        if cluster is not None:
            cluster.close()
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()

    decision = None
    if register and active_trial() is None:  # a search gates only its best trial, once (training/tune.py)
        from flywheel.core.registry import Registry

        decision = Registry(settings).gate(tracked.run_id, margin=margin, splits=splits,
                                           challenger_accuracy=report.metric(gate.metric))
    _print_summary(tracked.run_id, report, fitted.train_seconds, decision)
    return TrainResult(tracked.run_id, logged.model_uri, {**report.metrics(), "train_seconds": fitted.train_seconds},
                       decision.registered_version if decision else None, fitted.train_seconds, logged.spec)


def _print_summary(run_id: str, report, seconds: float, decision) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"run [bold]{run_id}[/]: test accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f}, "
                  f"{seconds:.1f} s of training")
    if decision is not None:
        console.print(decision.summary())

