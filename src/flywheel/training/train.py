"""Train a model, log everything to MLflow, then gate and register it.

Three parts, so that the training itself can run with or without tracking:
* `fit()`: the training (model, data, optimizer + one-cycle schedule, AMP, DDP, progress bar,
  per-epoch validation). It knows nothing of MLflow; an optional `FitCallback` hears the run's
  parameters before the first step and each epoch's metrics. benchmarks/tracking_overhead.py calls
  it without one, so its "tracking off" side is this very loop.
* `TrackedRun`: the MLflow run of a training (a `FitCallback`): params, tags and the dataset input
  before training, per-epoch metrics through `RunLogger`, then test evaluation, plots, the monitor's
  reference sample and the model at the end.
* `run_training`: preflight, data, `fit()` with a `TrackedRun` on rank 0, then the gate.

Runs single-process or under `torchrun` (DistributedDataParallel: NCCL on GPUs, gloo on CPU).
Only rank 0 talks to MLflow; the other ranks train their shard and meet rank 0 at barriers.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flywheel.core.config import Settings
from flywheel.core.data import Splits, load_splits
from flywheel.core.errors import FlywheelError
from flywheel.core.evaluate import EvalReport, evaluate_model, predict
from flywheel.core.models import ModelSpec, build_model, save_extras

_log = logging.getLogger(__name__)

REFERENCE_SIZE = 1000  # validation embeddings kept as the monitor's drift reference


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion-mnist"
    model: str = "small-cnn"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0
    register: bool = True
    margin: float = 0.0
    extra_data: tuple[Path, ...] = ()
    max_train_samples: int | None = None
    device: str | None = None
    log_every_epoch: bool = True


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    registered_version: str | None
    train_seconds: float


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistContext:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(requested: str | None, local_rank: int = 0) -> torch.device:
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FlywheelError(f"--device {requested}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _amp(device: torch.device):
    """bf16 autocast on GPUs that support it, fp16 (+ grad scaling) on older ones, none on CPU."""
    if device.type != "cuda":
        return nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def progress_bar(enabled: bool):
    """The training progress bar (rich), shown on the main rank only."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), disable=not enabled,
                    transient=False)


def _preload(*modules: str) -> threading.Thread:
    """Import `modules` on a daemon thread while the caller waits on the network and on zlib/sha256
    (both release the GIL): their import overlaps the tracking preflight, the data load and the run's
    creation instead of following them (benchmarks/README.md, loop timing)."""
    def work() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the real import later raises with its own traceback
                _log.debug("preloading %s failed", name, exc_info=True)

    thread = threading.Thread(target=work, name="flywheel-preload", daemon=True)
    thread.start()
    return thread


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


def run_training(cfg: TrainConfig, settings: Settings) -> TrainResult | None:
    """Train per `cfg`, log to the tracking server in `settings`; returns the result on rank 0."""
    refuse_mlflow_default_store(settings)
    ctx = DistContext.from_env()
    # The optimizer's first call and the pt2 export import torch._dynamo; the plots, matplotlib.
    preload = _preload("torch._dynamo", "matplotlib.figure", "matplotlib.backends.backend_agg")
    if ctx.is_main:
        from flywheel.core.runlog import preflight

        preflight(settings)  # wrong credentials / dead server fail here, not after training
    splits = load_splits(cfg.dataset, settings.data_dir, cfg.seed, cfg.extra_data)
    device = select_device(cfg.device, ctx.local_rank)
    if ctx.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(cfg, settings, splits, device, ctx, preload)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def training_tensors(splits: Splits, seed: int, max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split preprocessed once (it fits in memory), optionally a seeded subset."""
    from flywheel.contracts.preprocessing import to_tensor

    x_all, y_all = splits.train.images, splits.train.labels
    if max_samples:
        pick = np.sort(np.random.default_rng(seed).permutation(len(y_all))[:max_samples])
        x_all, y_all = x_all[pick], y_all[pick]
    return to_tensor(x_all, splits.preprocess), torch.from_numpy(y_all)


class FitCallback(Protocol):
    """What `fit()` tells an observer (rank 0 only): the run's parameters before the first step and
    each epoch's metrics after its validation. `TrackedRun` is the MLflow one."""

    def on_start(self, params: dict[str, Any]) -> None: ...

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class Fitted:
    """What `fit()` trained. `model` is the bare module (not the DDP wrapper), still on the device;
    `history` and `epoch_ends` are filled on rank 0 only."""

    model: nn.Module
    spec: ModelSpec
    history: list[dict[str, float]]
    train_seconds: float  # the optimisation loop alone: no validation, no callback
    epoch_ends: list[float]  # time.time() at each epoch's end, after validation, before the callback


def fit(cfg: TrainConfig, splits: Splits, device: torch.device, ctx: DistContext = DistContext(),
        callback: FitCallback | None = None, preload: threading.Thread | None = None,
        model: nn.Module | None = None) -> Fitted:
    """Train `cfg.model` on `splits` for `cfg.epochs`: AdamW + one-cycle schedule, AMP on GPUs,
    DDP when `ctx` is distributed, a validation pass per epoch on rank 0. `callback` (rank 0 only)
    hears the parameters and each epoch's metrics; without one, nothing outside this process is
    touched. `preload` (an import thread) is joined before the first step."""
    seed_everything(cfg.seed)
    x_train, y_train = training_tensors(splits, cfg.seed, cfg.max_train_samples)
    model = (model if model is not None else build_model(cfg.model, len(splits.class_names))).to(device)
    spec = ModelSpec(cfg.model, splits.class_names, splits.preprocess, getattr(model, "embedding_dim", 0))
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if ctx.distributed else model)

    # Each rank takes every world_size-th batch of one shared permutation; the last partial batch is dropped
    # so all ranks step the same number of times (DDP all-reduces every step).
    steps_per_epoch = max(1, len(y_train) // (cfg.batch_size * ctx.world_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch)
    autocast, scaler = _amp(device)
    if ctx.is_main and callback is not None:
        callback.on_start({**asdict(cfg), "extra_data": ",".join(map(str, cfg.extra_data)),
                           "world_size": ctx.world_size, "device": device.type, "train_samples": len(y_train),
                           "val_samples": len(splits.val), "test_samples": len(splits.test),
                           "steps_per_epoch": steps_per_epoch,
                           "parameters": sum(p.numel() for p in model.parameters())})

    history: list[dict[str, float]] = []
    epoch_ends: list[float] = []
    train_seconds = 0.0
    if preload is not None:
        preload.join()  # nothing else competes with the optimisation loop for the CPU
    # MLflow, torch and friends leave a large heap of long-lived objects; freezing it keeps the
    # cyclic GC, which the training loop's many short-lived objects trigger, from rescanning it.
    gc.collect()
    gc.freeze()
    loss_fn = nn.CrossEntropyLoss()
    try:
        with progress_bar(ctx.is_main) as progress:
            task = progress.add_task("train", total=cfg.epochs * steps_per_epoch, status="")
            for epoch in range(cfg.epochs):
                ddp.train()
                started = time.perf_counter()
                perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
                loss_sum = correct = seen = 0.0
                for step in range(steps_per_epoch):
                    begin = (step * ctx.world_size + ctx.rank) * cfg.batch_size
                    idx = perm[begin:begin + cfg.batch_size]
                    xb = x_train[idx].to(device, non_blocking=True)
                    yb = y_train[idx].to(device, non_blocking=True)
                    if device.type == "cpu":
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    with autocast():
                        logits = ddp(xb)
                        loss = loss_fn(logits, yb)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    scheduler.step()
                    batch_loss = loss.item()
                    loss_sum += batch_loss * len(yb)
                    correct += (logits.argmax(1) == yb).sum().item()
                    seen += len(yb)
                    if step % 20 == 0 or step == steps_per_epoch - 1:  # the bar needs no per-step redraw
                        progress.update(task, completed=epoch * steps_per_epoch + step + 1,
                                        status=f"epoch {epoch + 1}/{cfg.epochs} loss {batch_loss:.3f}")
                totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
                if ctx.distributed:
                    dist.all_reduce(totals)
                train_seconds += time.perf_counter() - started
                if ctx.is_main:
                    val_loss, val_acc = val_metrics(model, splits, spec, device)
                    row = {"train_loss": totals[0].item() / totals[2].item(),
                           "train_accuracy": totals[1].item() / totals[2].item(),
                           "val_loss": val_loss, "val_accuracy": val_acc, "lr": scheduler.get_last_lr()[0],
                           "epoch_seconds": time.perf_counter() - started}
                    history.append(row)
                    epoch_ends.append(time.time())
                    if callback is not None:
                        callback.on_epoch(epoch, row)
                    progress.update(task, status=f"epoch {epoch + 1}/{cfg.epochs} val acc {val_acc:.4f}")
                if ctx.distributed:
                    dist.barrier()
    finally:
        gc.unfreeze()  # long-lived callers (tests, notebooks) get normal collection back
    return Fitted(model, spec, history, train_seconds, epoch_ends)


class TrackedRun:
    """The MLflow run of one training (rank 0), a `FitCallback`: `on_start` creates (or, under
    `mlflow run`, adopts) the run and logs params, tags and the dataset input; `on_epoch` logs the
    epoch's metrics through `RunLogger` (spooled, retried); `finish` evaluates on the test split, logs
    the test metrics, plots, reference sample and model, and ends the run (FAILED if that raises)."""

    def __init__(self, settings: Settings, splits: Splits, device: torch.device):
        import mlflow  # noqa: F401 - imported before fit() seeds the RNGs, so its import cannot touch them

        self.settings, self.splits, self.device = settings, splits, device
        self.run = None  # mlflow's ActiveRun, from on_start
        self.logger = None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def on_start(self, params: dict[str, Any]) -> None:
        import mlflow

        from flywheel.core.runlog import RunLogger, active_run_id, ensure_experiment

        experiment_id = ensure_experiment(self.settings)
        run = mlflow.start_run(run_id=active_run_id(), experiment_id=None if active_run_id() else experiment_id,
                               log_system_metrics=True)
        self.run = run
        self.logger = logger = RunLogger(run.info.run_id)
        # Under `mlflow run` the project's parameters are already logged (as given); MLflow forbids
        # re-logging a key with another spelling of its value ("true" vs "True"), so skip those keys.
        logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
        logger.log_params({k: v for k, v in params.items() if k not in logged})
        splits = self.splits
        tags = {**git_info(Path.cwd()), "dataset": splits.name, "dataset_digest": splits.digest,
                "entry_point": os.environ.get("FLYWHEEL_ENTRY_POINT", "train"), "flywheel.device": str(self.device)}
        if event_id := os.environ.get("FLYWHEEL_EVENT_ID"):  # a monitor's retrain: dedupe key (flywheel.control.dispatches)
            tags["flywheel.event_id"] = event_id
        logger.set_tags(tags)
        _log_dataset(splits)

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.logger.log_metrics(metrics, step=epoch)

    def finish(self, fitted: Fitted):
        """(test EvalReport, the logged model's ModelInfo); the run is ended either way."""
        import mlflow

        logger, splits = self.logger, self.splits
        try:
            report = evaluate_model(fitted.model, fitted.spec, splits.test, f"runs:/{self.run_id}/model", splits.name,
                                    self.device)
            logger.log_metrics({**report.metrics(), "train_seconds": fitted.train_seconds})
            model_info = _log_model_and_artifacts(logger, fitted.model.cpu().eval(), fitted.spec, splits,
                                                  fitted.history, report)
            logger.flush()
        except BaseException:
            mlflow.end_run("FAILED")
            raise
        mlflow.end_run()
        return report, model_info


def _train(cfg: TrainConfig, settings: Settings, splits: Splits, device: torch.device,
           ctx: DistContext, preload: threading.Thread | None = None) -> TrainResult | None:
    """`fit()` with the MLflow run on rank 0, then the gate; None on the other ranks."""
    tracked = TrackedRun(settings, splits, device) if ctx.is_main else None
    fitted = fit(cfg, splits, device, ctx, callback=tracked, preload=preload)
    if tracked is None:
        return None
    report, model_info = tracked.finish(fitted)
    run, train_seconds = tracked.run, fitted.train_seconds

    decision = None
    if cfg.register:
        from flywheel.core.registry import gate_run

        decision = gate_run(run.info.run_id, settings, dataset=splits.name, margin=cfg.margin, splits=splits,
                            challenger_accuracy=report.accuracy)
    _print_summary(run.info.run_id, report, train_seconds, decision)
    return TrainResult(run.info.run_id, model_info.model_uri, {**report.metrics(), "train_seconds": train_seconds},
                       decision.registered_version if decision else None, train_seconds)


@torch.no_grad()
def val_metrics(model: nn.Module, splits: Splits, spec: ModelSpec, device: torch.device) -> tuple[float, float]:
    """(loss, accuracy) on the validation split: the per-epoch check of the training loop."""
    logits = torch.from_numpy(predict(model, splits.val.images, spec, device=device))
    labels = torch.from_numpy(splits.val.labels)
    return nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def _log_dataset(splits: Splits) -> None:
    """Record the exact data: an MLflow dataset input whose digest is our content digest."""
    import mlflow

    sample = splits.train.images[:2].reshape(2, -1).astype(np.float32)
    ds = mlflow.data.from_numpy(sample, targets=splits.train.labels[:2], source=splits.source,
                                name=splits.name, digest=splits.digest[:32])
    mlflow.log_input(ds, context="training", tags={"dataset_digest": splits.digest,
                                                   "train": str(len(splits.train)), "val": str(len(splits.val)),
                                                   "test": str(len(splits.test))})


def _log_model_and_artifacts(logger, model, spec: ModelSpec, splits: Splits, history: list[dict[str, float]],
                             report: EvalReport):
    import mlflow
    from mlflow.models import infer_signature

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.contracts.reference import ARTIFACT_DIR as REFERENCE_DIR
    from flywheel.contracts.reference import ReferenceSample
    from flywheel.core.plots import confusion_matrix_png, loss_curve_png

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plots = tmp / "plots"
        plots.mkdir()
        loss_curve_png(history, plots / "loss_curve.png")
        confusion_matrix_png(report.confusion, spec.class_names, plots / "confusion_matrix.png")
        logger.log_artifacts(plots, "plots")
        (tmp / "per_class_report.json").write_text(json.dumps(
            {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "per_class": report.per_class}, indent=2))
        logger.log_artifact(tmp / "per_class_report.json", "evaluation")

        reference = tmp / REFERENCE_DIR
        n = min(REFERENCE_SIZE, len(splits.val))
        pick = np.sort(np.random.default_rng(0).permutation(len(splits.val))[:n])
        logits, embeddings = predict(model, splits.val.images[pick], spec, with_embeddings=True)
        priors = np.bincount(splits.train.labels, minlength=len(spec.class_names)) / len(splits.train)
        ReferenceSample(embeddings, logits.argmax(1), splits.val.labels[pick], priors).save(reference)
        logger.log_artifacts(reference, REFERENCE_DIR)

        extras = save_extras(model, spec, tmp / "extras")
        example = to_tensor(splits.val.images[:2], spec.preprocess).numpy()  # batch 2: batch dim stays dynamic
        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
        return mlflow.pytorch.log_model(model, name="model", input_example=example, signature=signature,
                                        extra_files=extras, serialization_format="pt2",
                                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                          f"mlflow=={mlflow.__version__}"])


def _print_summary(run_id: str, report: EvalReport, seconds: float, decision) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"run [bold]{run_id}[/]: test accuracy {report.accuracy:.4f}, macro-F1 {report.macro_f1:.4f}, "
                  f"{seconds:.1f} s of training")
    if decision is not None:
        console.print(decision.summary())
