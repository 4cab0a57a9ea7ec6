"""The training loop a component can use: `fit(cfg, splits, device, model=...)`.

AdamW with a one-cycle schedule, bf16/fp16 autocast on GPUs, DistributedDataParallel under
`torchrun` (NCCL on GPUs, gloo on CPU), a rich progress bar and a validation pass per epoch on rank
0. It knows nothing of MLflow: an optional `FitCallback` (`flywheel.component.TrackedRun`) hears the
run's parameters before the first step and each epoch's metrics, so the benchmark's "tracking off"
side (benchmarks/tracking_overhead.py) is this very loop. A component with its own loop skips this
module and calls `log_model` itself.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from flywheel.core.data import Splits
from flywheel.core.errors import FlywheelError
from flywheel.core.evaluate import predict

_log = logging.getLogger(__name__)
PRELOAD_EXIT_WAIT = 30.0  # seconds an exiting process waits for start_preload's imports


@dataclass(frozen=True)
class FitConfig:
    """The loop's knobs. Any object with these attributes works (the built-in trainer's TrainConfig);
    all of its fields are logged as the run's parameters."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0
    max_train_samples: int | None = None
    device: str | None = None
    # Regularisers, all off by default (the loop is then unchanged); a config without these fields
    # (the built-in trainer's TrainConfig) gets the defaults:
    label_smoothing: float = 0.0  # CrossEntropyLoss(label_smoothing=...)
    hflip: bool = False  # mirror a random half of each batch left-right (only where classes are mirror-symmetric)
    shift: int = 0  # translate each training image by up to `shift` pixels in x and y (edge pixels repeat)


def _params(cfg) -> dict[str, Any]:
    """A config's fields as MLflow parameters: sequences joined with commas."""
    return {k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v for k, v in asdict(cfg).items()}


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
    """The process's device: `requested` as given, except that plain `cuda` means this process's own
    GPU (its local rank's, as with no request) so that torchrun's processes spread over the node's GPUs."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:  # torch's message lists every device type it was built with
            raise FlywheelError(f"--device {requested} is not a device: use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FlywheelError(f"--device {requested}: CUDA is not available on this machine")
        if device.type != "cuda":
            return device
        if device.index is not None:
            if local_rank > 0:  # every process of the node would take that one GPU: NCCL's "Duplicate GPU"
                raise FlywheelError(f"--device {requested} names one GPU for every process of this node; use "
                                    f"--device cuda (each process its own GPU) with torchrun")
            return device
    if not torch.cuda.is_available():
        return torch.device("cpu")
    gpus = torch.cuda.device_count()
    if local_rank >= gpus:  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") at its first collective
        raise FlywheelError(f"process {local_rank} of this node has no GPU of its own ({gpus} visible): NCCL needs "
                            f"one GPU per process, so use --nproc-per-node {gpus} or fewer on this node")
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def start_preload(*modules: str) -> threading.Thread:
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
    # A process that fails before it needs these (the tracking store at the run's start) must not end
    # inside one of the thread's imports: interpreter shutdown beside a running import of torch's
    # compiler took a GPU node's training process down with SIGSEGV instead of its error. Daemon, so a
    # hung import cannot hold the process; joined at exit, bounded.
    atexit.register(thread.join, PRELOAD_EXIT_WAIT)
    return thread


def augment(xb: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """The batch `xb` (N, C, H, W) with `cfg`'s augmentation applied per image, drawn from `generator`
    (seeded by the run's seed, so a run repeats): a left-right mirror of a random half (`hflip`), a
    random translation by up to `shift` pixels in each axis with the uncovered border repeating the
    edge pixels (`shift`). Two gathers on the preprocessed float batch: no per-image Python, no PIL,
    no worker processes; well under 1% of a training step on a CPU."""
    hflip, shift = getattr(cfg, "hflip", False), getattr(cfg, "shift", 0)
    if not hflip and not shift:
        return xb
    n, c, h, w = xb.shape
    rows = torch.arange(h).expand(n, h)
    cols = torch.arange(w).expand(n, w)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    if shift:
        dy, dx = torch.randint(-shift, shift + 1, (2, n, 1), generator=generator)
        rows = (rows + dy).clamp_(0, h - 1)
        cols = (cols + dx).clamp_(0, w - 1)
    xb = xb.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return xb.gather(3, cols[:, None, None, :].expand(n, c, h, w))


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
    history: list[dict[str, float]]
    train_seconds: float  # the optimisation loop alone: no validation, no callback
    epoch_ends: list[float]  # time.time() at each epoch's end, after validation, before the callback


def check_fit_values(cfg) -> None:
    """A FitConfig (or the built-in trainer's TrainConfig) whose numbers cannot train: one line naming the
    option, before the first step. (A negative subset size would silently drop that many images.)"""
    for option, value, least in (("epochs", cfg.epochs, 1), ("batch-size", cfg.batch_size, 1),
                                 ("max-train-samples", cfg.max_train_samples or 1, 1)):
        if value < least:
            raise FlywheelError(f"--{option} {value}: must be at least {least}")
    if not cfg.lr > 0:
        raise FlywheelError(f"--lr {cfg.lr}: must be above 0")


def fit(cfg: FitConfig, splits: Splits, device: torch.device, ctx: DistContext = DistContext(),
        callback: FitCallback | None = None, preload: threading.Thread | None = None, *,
        model: nn.Module) -> Fitted:
    """Train `model` on `splits` for `cfg.epochs`: AdamW + one-cycle schedule, AMP on GPUs,
    DDP when `ctx` is distributed, a validation pass per epoch on rank 0. `callback` (rank 0 only)
    hears the parameters and each epoch's metrics; without one, nothing outside this process is
    touched. `preload` (an import thread) is joined before the first step."""
    check_fit_values(cfg)
    seed_everything(cfg.seed)
    x_train, y_train = training_tensors(splits, cfg.seed, cfg.max_train_samples)
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if ctx.distributed else model)

    # Each rank takes every world_size-th batch of one shared permutation; the last partial batch is dropped
    # so all ranks step the same number of times (DDP all-reduces every step).
    steps_per_epoch = max(1, len(y_train) // (cfg.batch_size * ctx.world_size))
    # fused: one kernel for every parameter's update instead of a Python loop over them (CPU and CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch)
    autocast, scaler = _amp(device)
    if ctx.is_main and callback is not None:
        callback.on_start({**_params(cfg),
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
    loss_fn = nn.CrossEntropyLoss(label_smoothing=getattr(cfg, "label_smoothing", 0.0))
    augment_rng = torch.Generator().manual_seed(cfg.seed)
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
                    xb = augment(x_train[idx], cfg, augment_rng).to(device, non_blocking=True)
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
                # On the step's device: NCCL reduces CUDA tensors only (gloo, CPU ones)
                totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
                if ctx.distributed:
                    dist.all_reduce(totals)
                train_seconds += time.perf_counter() - started
                if ctx.is_main:
                    val_loss, val_acc = val_metrics(model, splits, device)
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
    return Fitted(model, history, train_seconds, epoch_ends)


@torch.no_grad()
def val_metrics(model: nn.Module, splits: Splits, device: torch.device) -> tuple[float, float]:
    """(loss, accuracy) on the validation split: the per-epoch check of the training loop."""
    logits = torch.from_numpy(predict(model, splits.val.images, splits, device=device))
    labels = torch.from_numpy(splits.val.labels)
    return nn.functional.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()
