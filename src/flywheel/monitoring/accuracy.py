"""The accuracy alarm: a window's live accuracy on feedback labels against the version's reference accuracy.

Drift tests see the inputs and the predictions; some shifts change neither enough to be seen and still
cost accuracy. Where feedback labels come back (`flywheel data feedback`, `contracts.capture.write_feedback`),
the monitor counts, per window, the labelled predictions that were right (k of n) and tests

    H0: the version's live accuracy >= its reference accuracy p0   against   H1: it is lower

with the exact one-sided binomial test (`scipy.stats.binomtest(k, n, p0, alternative="less")`): the
p-value is P(X <= k) for X ~ Binomial(n, p0), so under H0 a window alarms with probability <= alpha
whatever n is (exact, no normal approximation: a window with 8 labels is tested as soundly as one
with 100, only with less power). The alarm is its own test at the monitor's alpha, not part of the
drift test's Bonferroni pair.

p0, the reference accuracy (`reference_accuracy`): the `test_accuracy` metric of the version's
training run (the held-out test split, every image); a run that logged none falls back to the
accuracy of the reference sample the run logged for the monitor (validation split, up to 1000
images: `contracts.reference`). What the guarantee assumes: labelled live traffic is an unbiased
sample of what the test split stood for. Labels given mostly for complaints (the wrong answers)
are not, and alarm on a model that is as good as ever; p0 is itself an estimate (about +-0.5 point
on a 10,000-image test split), which moves the false-alarm level a little either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_METRIC = "test_accuracy"  # logged by training on the test split (core.evaluate Report.metrics)


@dataclass(frozen=True)
class AccuracyTest:
    labelled: int
    correct: int
    reference: float  # p0
    p_value: float
    alarm: bool  # p_value < alpha

    @property
    def accuracy(self) -> float:
        return self.correct / self.labelled


def accuracy_test(correct: int, labelled: int, reference: float | None, alpha: float) -> AccuracyTest | None:
    """The exact one-sided binomial test of `correct` right answers out of `labelled` against accuracy
    `reference`; None when there is nothing to test (no label, or no reference accuracy)."""
    if labelled <= 0 or reference is None:
        return None
    if not 0 <= correct <= labelled:
        raise ValueError(f"{correct} correct out of {labelled} labelled predictions")
    if not 0.0 <= reference <= 1.0:
        raise ValueError(f"reference accuracy {reference} is not a fraction")
    from scipy.stats import binomtest

    p = float(binomtest(int(correct), int(labelled), float(reference), alternative="less").pvalue)
    return AccuracyTest(int(labelled), int(correct), float(reference), p, bool(p < alpha))


def reference_accuracy(run_metrics: dict, predictions: np.ndarray, labels: np.ndarray | None) -> tuple[float | None, str]:
    """(p0, where it came from): the training run's `test_accuracy`, else the reference sample's accuracy
    (its predictions against its true labels), else (None, "none")."""
    value = run_metrics.get(REFERENCE_METRIC)
    if value is not None and 0.0 <= float(value) <= 1.0:
        return float(value), f"run metric {REFERENCE_METRIC}"
    if labels is not None and len(labels) and len(labels) == len(predictions):
        return float(np.mean(np.asarray(predictions) == np.asarray(labels))), "reference sample (validation split)"
    return None, "none"
