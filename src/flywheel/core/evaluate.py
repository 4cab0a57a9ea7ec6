"""Evaluate a model on a labelled test set: accuracy, macro-F1 and a per-class report.

A model here is anything that maps a float (N, C, H, W) batch to logits or to (logits, embedding):
an eager component network during training, a `ServingModule`, or the TorchScript file loaded back
from the registry (flywheel.core.models.load_model). `spec` is anything with `class_names` and
`preprocess` (a ComponentSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flywheel.contracts.preprocessing import to_tensor
from flywheel.core.config import Settings
from flywheel.core.data import Split, load_splits
from flywheel.core.models import load_model


@dataclass(frozen=True)
class EvalReport:
    model_uri: str
    dataset: str
    n: int
    accuracy: float
    macro_f1: float
    class_names: tuple[str, ...]
    per_class: dict[str, dict[str, float]] = field(repr=False)
    confusion: np.ndarray = field(repr=False)

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        return {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}

    def metric(self, name: str) -> float:
        """A gate metric by name (contracts.component.GATE_METRICS)."""
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}[name]


CPU_BATCH = 256  # small enough that activations stay in the CPU's cache (1024 was slower)


@torch.no_grad()
def predict(model, images: np.ndarray, spec, batch_size: int | None = None,
            device: str | torch.device = "cpu", with_embeddings: bool = False):
    """Logits (and optionally embeddings) for uint8 images, in batches, as numpy arrays. Embeddings
    need a model that returns (logits, embedding)."""
    batch_size = batch_size or (1024 if torch.device(device).type == "cuda" else CPU_BATCH)
    model.eval()
    logits, embeddings = [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size], spec.preprocess).to(device)
        out = model(x)
        logit, emb = out if isinstance(out, tuple) else (out, None)
        logits.append(logit.float().cpu())
        if with_embeddings:
            if emb is None:
                raise TypeError(f"{type(model).__name__} returns logits only: wrap it in ServingModule for embeddings")
            embeddings.append(emb.float().cpu())
    out = torch.cat(logits).numpy()
    return (out, torch.cat(embeddings).numpy()) if with_embeddings else out


def evaluate_model(model, spec, split: Split, model_uri: str = "", dataset: str = "",
                   device: str | torch.device = "cpu") -> EvalReport:
    pred = predict(model, split.images, spec, device=device).argmax(axis=1)
    confusion = confusion_counts(split.labels, pred, len(spec.class_names))
    precision, recall, f1, support = per_class_scores(confusion)
    per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(spec.class_names, precision, recall, f1, support, strict=True)}
    return EvalReport(model_uri=model_uri, dataset=dataset, n=len(split),
                      accuracy=float((pred == split.labels).mean()), macro_f1=float(f1.mean()),
                      class_names=spec.class_names, per_class=per_class, confusion=confusion)


def confusion_counts(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """confusion[i, j]: images of class i predicted as j (sklearn's confusion_matrix layout)."""
    return np.bincount(np.asarray(labels, dtype=np.int64) * n_classes + np.asarray(pred, dtype=np.int64),
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix; 0 where undefined
    (sklearn's precision_recall_fscore_support with zero_division=0, without importing sklearn)."""
    tp = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    return precision, recall, f1, support


def cpu_layout(model):
    """A model on the CPU in channels-last layout (the one training uses there): the conv stack runs
    faster than in the default layout a loaded model has; the answers differ only in rounding."""
    if next(model.parameters()).device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model


def evaluate_uri(model_uri: str, dataset: str | None, settings: Settings, seed: int = 0,
                 data_dir: Path | None = None) -> EvalReport:
    """Load a logged model by URI and evaluate it on `dataset`'s frozen test split, or (no dataset)
    on the labelled test set its component spec names."""
    from mlflow.exceptions import MlflowException

    from flywheel.core.errors import FlywheelError
    from flywheel.core.registry import get_version, registered_in

    if (named := registered_in(model_uri)) is not None:
        get_version(settings, *named)  # a missing model or alias: one line, before the data is read
    try:
        model, spec = load_model(model_uri, tracking_uri=settings.tracking_uri)
    except MlflowException as exc:
        raise FlywheelError(f"cannot load {model_uri} from {settings.tracking_uri}: {exc.message}") from None
    model = cpu_layout(model)
    if dataset:
        splits = load_splits(dataset, data_dir or settings.data_dir, seed)
        check_compatible(spec, splits.class_names, model_uri, dataset)
        return evaluate_model(model, spec, splits.test, model_uri, dataset)
    from flywheel.core.models import read_test_set

    images, labels = read_test_set(spec, settings.tracking_uri)
    return evaluate_model(model, spec, Split(images, labels), model_uri, spec.dataset or spec.test_set.uri)


def check_compatible(spec, class_names: tuple[str, ...], model_uri: str, dataset: str) -> None:
    from flywheel.core.errors import FlywheelError

    if tuple(spec.class_names) != tuple(class_names):
        raise FlywheelError(f"{model_uri} predicts classes {list(spec.class_names)[:4]}…, but dataset "
                            f"{dataset!r} has {list(class_names)[:4]}…: evaluate it on the data it was trained for")


def print_report(report: EvalReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report.model_uri} on {report.dataset} test split (n={report.n})")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in report.per_class.items():
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    console = Console()
    console.print(table)
    console.print(f"accuracy [bold]{report.accuracy:.4f}[/]   macro-F1 [bold]{report.macro_f1:.4f}[/]")
