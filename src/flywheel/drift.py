"""Drift detectors for the monitor (numpy/scipy only; no BSL-licensed libraries).

Embedding drift, `EmbeddingDriftDetector`: built for partial contamination, where only a fraction of a
window comes from the new distribution. Plain KS + Bonferroni on PCA components averages the shifted
samples away; instead every sample gets a novelty score against the reference and the window is
tested on how many scores land in the reference's own tail:

1. Score: 1 - cosine similarity to the k-th nearest reference embedding (k=3), after a signed
   square root of each activation. Embeddings of a trained
   classifier live on a few class-shaped manifolds; blurred, rotated or inverted inputs fall between
   them, which a single Gaussian (global Mahalanobis) misses and a local neighbour distance sees.
   Measured on Fashion-MNIST blur+JPEG (benchmarks/drift.py): per-sample TPR at 5% FPR 0.38 vs 0.10
   for Mahalanobis on 32 PCA dims.
2. Calibrate leave-one-out: each reference embedding is scored against the others; the threshold t
   is their q-quantile (q=0.9).
3. Test: c = #window scores > t. Under no drift, t's exceedance probability is Beta-distributed (an
   order statistic of n calibration scores), so c is Beta-Binomial(W, n-r, r+1) — calibration noise
   included — and p = P(C >= c). One-sided: contamination can only add tail mass.

Prediction drift: chi-square test of homogeneity between the window's predicted-class counts and the
reference's (sparse classes pooled so the chi-square approximation holds).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class TestResult:
    p_value: float
    statistic: float
    details: dict


def combine_p_values(p_values: list[float]) -> float:
    """Bonferroni: valid under any dependence between the tests."""
    return float(min(1.0, len(p_values) * min(p_values)))


# ---------------------------------------------------------------------------------------- embeddings
class PCAWhitener:
    """Centre, project on the top `dims` principal components, scale each to unit variance."""

    def __init__(self, dims: int = 16):
        self.dims = dims

    def fit(self, x: np.ndarray) -> PCAWhitener:
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        k = int(min(self.dims, vt.shape[0], np.sum(s > s[0] * 1e-6)))
        self.components = vt[:k]
        self.scale = s[:k] / np.sqrt(max(1, len(x) - 1))
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T) / self.scale


def _unit(x: np.ndarray) -> np.ndarray:
    """Signed square root, then unit length. Penultimate activations are (mostly) post-ReLU and
    heavy-tailed: a few large units dominate raw cosine similarity; the square root evens them out
    (measured: 20%-contamination detection 0.85 → 0.93 on blur+JPEG)."""
    x = np.asarray(x, dtype=np.float64)
    x = np.sign(x) * np.sqrt(np.abs(x))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EmbeddingDriftDetector:
    """Tail-count test on per-sample cosine kNN novelty scores (see the module docstring)."""

    def __init__(self, k: int = 3, quantile: float = 0.9, seed: int = 0):
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile must be within [0.5, 1), got {quantile}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.quantile, self.seed = k, quantile, seed

    def fit(self, reference: np.ndarray, classes: np.ndarray | None = None) -> EmbeddingDriftDetector:
        """`classes` is accepted for interface symmetry and unused: the kNN score needs no labels."""
        ref = np.asarray(reference)
        if ref.ndim != 2 or len(ref) < max(40, 2 * self.k):
            raise ValueError(f"reference must be (N>=40, D) embeddings, got shape {ref.shape}")
        self.reference = _unit(ref)
        # Leave-one-out calibration: each reference sample scored against all the others, so the
        # whole reference serves both as the neighbour set and as the null score distribution.
        sim = self.reference @ self.reference.T
        np.fill_diagonal(sim, -np.inf)
        self.calibration = np.sort(1.0 - np.partition(sim, -self.k, axis=1)[:, -self.k])
        n = len(self.calibration)
        self.rank = min(n - 1, int(np.ceil(self.quantile * (n + 1))) - 1)
        self.threshold = float(self.calibration[self.rank])
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """Per-sample novelty: 1 - cosine similarity (of square-rooted embeddings) to the k-th nearest reference."""
        sim = _unit(x) @ self.reference.T
        return 1.0 - np.partition(sim, -self.k, axis=1)[:, -self.k]

    def test(self, window: np.ndarray) -> TestResult:
        window = np.asarray(window)
        if window.ndim != 2 or window.shape[1] != self.reference.shape[1]:
            raise ValueError(f"window must be (W, {self.reference.shape[1]}) embeddings, got {window.shape}")
        scores = self.score(window)
        n, w = len(self.calibration), len(scores)
        count = int((scores > self.threshold).sum())
        # P(C >= count), C ~ BetaBinomial(w, n - rank, rank + 1): the exceedance probability of an
        # order statistic of n calibration scores is Beta(n - rank, rank + 1).
        p = float(stats.betabinom.sf(count - 1, w, n - self.rank, self.rank + 1))
        return TestResult(p, float(count), {"tail_count": count, "expected": w * (n - self.rank) / (n + 1),
                                            "threshold": self.threshold})


class KSBonferroni:
    """The plain baseline: two-sample KS per whitened PCA component, Bonferroni over components."""

    def __init__(self, dims: int = 16):
        self.dims = dims

    def fit(self, reference: np.ndarray, classes: np.ndarray | None = None) -> KSBonferroni:
        self.pca = PCAWhitener(self.dims).fit(reference)
        self.ref = np.sort(self.pca.transform(reference), axis=0)  # sorted once: ECDFs by searchsorted
        return self

    def test(self, window: np.ndarray) -> TestResult:
        ps = ks_2samp_columns(self.ref, self.pca.transform(window))
        return TestResult(combine_p_values(list(ps)), float(ps.min()), {"min_p": float(ps.min())})


def ks_2samp_columns(ref_sorted: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Two-sided two-sample KS p-value per column (Kolmogorov's asymptotic distribution).

    ~10x faster than one `scipy.stats.ks_2samp` call per column: the reference is sorted once and the
    statistic is a max over searchsorted ECDFs; the p-values agree with scipy's to ~1e-2 absolute."""
    n, m = len(ref_sorted), len(window)
    win = np.sort(window, axis=0)
    d = np.empty(win.shape[1])
    for j in range(win.shape[1]):
        points = np.concatenate([ref_sorted[:, j], win[:, j]])
        gap = (np.searchsorted(ref_sorted[:, j], points, side="right") / n
               - np.searchsorted(win[:, j], points, side="right") / m)
        d[j] = np.abs(gap).max()
    return stats.kstwobign.sf(d * np.sqrt(n * m / (n + m)))  # Kolmogorov limit: fast, and close at these sizes


class CombinedDriftDetector:
    """The monitor's embedding test: kNN-tail count and KS+Bonferroni, Bonferroni over the two.

    Each catches what the other misses: the tail count sees a minority of off-manifold samples when
    the embeddings separate them well; KS on whitened PCA components sees a coherent shift of the
    whole window when they don't (measured in benchmarks/drift.py on a weaker embedding model: KS 53%
    vs kNN-tail 31% at 20% contamination). The union stays valid at alpha under any dependence."""

    def __init__(self, k: int = 3, quantile: float = 0.9, dims: int = 16, seed: int = 0):
        self.knn = EmbeddingDriftDetector(k=k, quantile=quantile, seed=seed)
        self.ks = KSBonferroni(dims)

    def fit(self, reference: np.ndarray, classes: np.ndarray | None = None) -> CombinedDriftDetector:
        self.knn.fit(reference)
        self.ks.fit(reference)
        return self

    def test(self, window: np.ndarray) -> TestResult:
        knn, ks = self.knn.test(window), self.ks.test(window)
        return TestResult(combine_p_values([knn.p_value, ks.p_value]), knn.statistic,
                          {**knn.details, "p_knn_tail": knn.p_value, "p_ks": ks.p_value})


# ---------------------------------------------------------------------------------------- predictions
def prediction_drift(counts: np.ndarray, reference_counts: np.ndarray, min_expected: float = 5.0) -> TestResult:
    """Chi-square test of homogeneity: window class counts vs the reference's predicted-class counts."""
    counts = np.asarray(counts, dtype=np.float64)
    ref = np.asarray(reference_counts, dtype=np.float64)
    if counts.shape != ref.shape or counts.sum() == 0 or ref.sum() == 0:
        return TestResult(1.0, 0.0, {"reason": "no predictions"})
    expected = ref / ref.sum() * counts.sum()
    # Pool classes the window is expected to see fewer than `min_expected` times into one bin.
    sparse = expected < min_expected
    table = np.stack([counts[~sparse], ref[~sparse]], axis=0)
    if sparse.any():
        table = np.concatenate([table, np.array([[counts[sparse].sum()], [ref[sparse].sum()]])], axis=1)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return TestResult(1.0, 0.0, {"reason": "one class only"})
    chi2, p, dof, _ = stats.chi2_contingency(table, correction=False)
    return TestResult(float(p), float(chi2), {"dof": int(dof)})


# ---------------------------------------------------------------------------------------- simulation
SHIFTS = ("blur-jpeg", "invert", "rotate", "noise")


def shift_images(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """Simulated production shifts of uint8 (N, H, W) images, for tests, benchmarks and the demo."""
    from PIL import Image, ImageFilter  # lazy: the detectors themselves need only numpy/scipy

    images = np.asarray(images, dtype=np.uint8)
    if kind == "invert":
        return 255 - images
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(images + rng.normal(0, 40, images.shape), 0, 255).astype(np.uint8)
    out = []
    for img in images:
        im = Image.fromarray(img)
        if kind == "blur-jpeg":
            buf = io.BytesIO()
            im.filter(ImageFilter.GaussianBlur(1.0)).save(buf, "JPEG", quality=30)
            im = Image.open(io.BytesIO(buf.getvalue())).convert("L")
        elif kind == "rotate":
            im = im.rotate(30)
        else:
            raise ValueError(f"unknown shift {kind!r}; choose one of: {', '.join(SHIFTS)}")
        out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out)
