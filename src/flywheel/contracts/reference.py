"""The reference sample a training run logs for the drift monitor, and its file names in one place.

Training writes it (`ReferenceSample.save`) into the run's `reference/` artifact folder; the
monitor downloads that folder for the version it watches and reads it back (`ReferenceSample.load`):
validation-split embeddings (the drift detector's reference), the model's predicted classes and the
true labels of those samples, and the training split's class priors. numpy and the standard library
only, as every contract.
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
MIN_SAMPLES = 40  # fewer validation samples than this give the monitor's drift test no reference to fit


@dataclass(frozen=True)
class ReferenceSample:
    embeddings: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    class_priors: np.ndarray

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

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceSample:
        """Read a saved sample. Labels are optional; missing class priors (runs of older flywheels)
        are the predicted-class fractions."""
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
        return cls(emb, preds, labels, np.asarray(priors, dtype=np.float64))
