"""The reference sample a training run logs for the drift monitor, and its file names in one place.

Training writes it (`ReferenceSample.save`) into the run's `reference/` artifact folder; the
monitor downloads that folder for the version it watches and reads it back (`ReferenceSample.load`):
validation-split embeddings (the drift detector's reference), the model's predicted classes and the
true labels of those samples, the training split's class priors, and per-image input statistics of
the same samples (`input_statistics` of the preprocessed tensor the model saw: the drift detector's
input channel). numpy and the standard library only, as every contract.

Input statistics are one definition for both ends: training computes them on the reference images,
the monitor on captured images decoded and preprocessed with the version's spec. They are versioned
(`INPUT_STATS_VERSION`, stored beside them); a reference without them (logged by an older flywheel)
or of another version loads with `input_stats` None, and the monitor runs without the input channel.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

ARTIFACT_DIR = "reference"  # the run's artifact folder
EMBEDDINGS = "embeddings.npy"  # float32 (N, D)
PREDICTIONS = "predictions.npy"  # predicted class index per sample (N,)
LABELS = "labels.npy"  # true class index per sample (N,); optional when read
CLASS_PRIORS = "class_priors.json"  # the training split's class fractions, a JSON list; optional when read
INPUT_STATS = "input_stats.npy"  # float32 (N, F) `input_statistics` of the same samples; optional when read
INPUT_STATS_META = "input_stats.json"  # {"version": INPUT_STATS_VERSION, "columns": F}
INPUT_STATS_VERSION = 1  # bump when `input_statistics` changes: older references then load without them
MIN_SAMPLES = 40  # fewer validation samples than this give the monitor's drift test no reference to fit


def input_statistic_names(channels: int) -> list[str]:
    """Names of the columns `input_statistics` returns for images of `channels` channels."""
    return ([f"{s}_{c}" for c in range(channels) for s in ("mean", "std")]
            + ["q05", "log_gradient", "log_laplacian", "gradient_rel", "laplacian_rel",
               "centroid_y", "centroid_x", "spread_y", "spread_x", "spread_xy"])


def input_statistics(x: np.ndarray) -> np.ndarray:
    """Per-image statistics of preprocessed inputs (N, C, H, W), as the model receives them -> (N, F)
    float64, columns named by `input_statistic_names(C)`. Any channels and size (H, W >= 3):
      * per channel: mean and standard deviation (brightness, contrast, colour casts);
      * on the channel-mean intensity: its 5% quantile (the background level: brightness, noise
        lift it), log gradient energy and log Laplacian energy (high-pass residual: noise, blur,
        overlays), each also relative to the signal (gradient / variance, Laplacian / gradient);
      * geometry: the centroid and second moments of the intensity above the image's minimum, in
        coordinates scaled to [-1, 1] (translation, scale, rotation, shear).
    Vectorised numpy, no per-image loops. Chosen on the drift benchmark's tuning families only
    (benchmarks/drift.py design log)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[2] < 3 or x.shape[3] < 3:
        raise ValueError(f"input statistics need (N, C, H>=3, W>=3) preprocessed inputs, got shape {x.shape}")
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    cols = []
    for ch in range(c):
        cols += [flat[:, ch].mean(1), flat[:, ch].std(1)]
    g = x.mean(1)
    gf = g.reshape(n, h * w)
    eps = 1e-6
    var = gf.var(1) + eps
    grad = (np.diff(g, axis=1) ** 2).mean((1, 2)) + (np.diff(g, axis=2) ** 2).mean((1, 2)) + eps
    lap = (4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]) ** 2
    lap = lap.mean((1, 2)) + eps
    cols += [np.quantile(gf, 0.05, axis=1), np.log(grad), np.log(lap), np.log(grad / var), np.log(lap / grad)]
    weight = gf - gf.min(1, keepdims=True)
    total = weight.sum(1) + eps
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    cy, cx = weight @ yy / total, weight @ xx / total
    cols += [cy, cx, weight @ (yy * yy) / total - cy * cy, weight @ (xx * xx) / total - cx * cx,
             weight @ (yy * xx) / total - cy * cx]
    return np.stack(cols, axis=1).astype(np.float64)


@dataclass(frozen=True)
class ReferenceSample:
    embeddings: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    class_priors: np.ndarray
    input_stats: np.ndarray | None = None  # `input_statistics` of the same samples; None: not logged

    @staticmethod
    def present(directory: str | os.PathLike) -> bool:
        """Whether `directory` holds a saved reference (its embeddings)."""
        return os.path.isfile(os.path.join(directory, EMBEDDINGS))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the sample's files into `directory` (created if missing)."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, EMBEDDINGS), np.asarray(self.embeddings, dtype=np.float32))
        if self.labels is not None:
            np.save(os.path.join(directory, LABELS), self.labels)
        np.save(os.path.join(directory, PREDICTIONS), self.predictions)
        with open(os.path.join(directory, CLASS_PRIORS), "w") as f:
            f.write(json.dumps(np.asarray(self.class_priors).tolist()))
        if self.input_stats is not None:
            stats = np.asarray(self.input_stats, dtype=np.float32)
            if stats.ndim != 2 or len(stats) != len(self.embeddings):
                raise ValueError(f"input_stats must be (N={len(self.embeddings)}, F), got shape {stats.shape}")
            np.save(os.path.join(directory, INPUT_STATS), stats)
            with open(os.path.join(directory, INPUT_STATS_META), "w") as f:
                f.write(json.dumps({"version": INPUT_STATS_VERSION, "columns": int(stats.shape[1])}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceSample:
        """Read a saved sample. Labels are optional; missing class priors (runs of older flywheels)
        are the predicted-class fractions; missing input statistics, or those of another
        INPUT_STATS_VERSION, are None."""
        path = os.fspath(directory)
        emb = np.load(os.path.join(path, EMBEDDINGS)).astype(np.float32)
        preds = np.load(os.path.join(path, PREDICTIONS)).astype(np.int64)
        labels_file = os.path.join(path, LABELS)
        labels = np.load(labels_file).astype(np.int64) if os.path.isfile(labels_file) else None
        priors_file = os.path.join(path, CLASS_PRIORS)
        priors = None
        if os.path.isfile(priors_file):
            with open(priors_file) as f:
                priors = json.loads(f.read())
        if not priors:
            priors = np.bincount(preds, minlength=int(preds.max()) + 1) / len(preds)
        stats = None
        meta_file = os.path.join(path, INPUT_STATS_META)
        if os.path.isfile(meta_file) and os.path.isfile(os.path.join(path, INPUT_STATS)):
            with open(meta_file) as f:
                meta = json.loads(f.read())
            if meta.get("version") == INPUT_STATS_VERSION:  # another version's statistics are not comparable
                stats = np.load(os.path.join(path, INPUT_STATS)).astype(np.float64)
        return cls(emb, preds, labels, np.asarray(priors, dtype=np.float64), stats)
