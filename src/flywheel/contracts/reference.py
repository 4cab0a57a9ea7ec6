"""The reference sample a training run logs for the drift monitor, and its file names in one place.

Training writes it (`ReferenceSample.save`) into the run's `reference/` artifact folder; the
monitor downloads that folder for the version it watches and reads it back (`ReferenceSample.load`):
validation-split embeddings (the drift detector's reference), the model's predicted classes and the
true labels of those samples, the training split's class priors, and per-image input statistics of
the same samples (`input_statistics` of the preprocessed tensor the model saw: the drift detector's
input channel), and the texture model with its statistics of the same samples (`TextureModel`: the
drift detector's texture channel), and the training images' principal pixel subspace with the
samples' residuals outside it (`PixelSubspace`: the residual channel), and the training images' weakest
3x3 patch direction with the samples' grain along it (`PatchGrain`: the grain channel). numpy and the
standard library only, as every contract.

Input statistics are one definition for both ends: training computes them on the reference images,
the monitor on captured images decoded and preprocessed with the version's spec. They are versioned
(`INPUT_STATS_VERSION`, stored beside them); a reference without them (logged by an older flywheel)
or of another version loads with `input_stats` None, and the monitor runs without the input channel.
The texture model is versioned the same way (`TEXTURE_VERSION`): without it, no texture channel.
The shift directions (`ShiftDirections`, with the texture model) likewise (`SHIFT_DIRECTIONS_VERSION`):
without them the texture-shift channel tests the window's mean texture alone, as before they existed.
The pixel subspace likewise (`SUBSPACE_VERSION`): without it, no residual channel. The patch grain
likewise (`GRAIN_VERSION`): without it, no grain channel.
"""

from __future__ import annotations

import functools
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
TEXTURE = "texture.npz"  # `TextureModel` (filters and Gaussian fit) and the samples' texture statistics
TEXTURE_VERSION = 1  # bump when `TextureModel.statistics` changes: older references then load without it
TEXTURE_FILTERS = 16  # 3x3 filters: 136 statistics per image
TEXTURE_FIT_SAMPLES = 5000  # training images the Gaussian is fitted on (not the reference's samples)
TEXTURE_SHRINKAGE = 1e-3  # ridge on the standardised covariance: 136 dimensions from a few thousand images
TEXTURE_SHIFT_CLIP = 2.0  # whitened units: bounds one image's pull on a window's mean (heavy-tailed statistics)
SHIFT_DIRECTIONS = "shift_directions.npz"  # `ShiftDirections`: the texture-shift channel's tuning directions
SHIFT_DIRECTIONS_VERSION = 1  # bump when `ShiftDirections.vectors` changes: older references then load without them
SHIFT_DIRECTIONS_COUNT = 10  # directions kept of the tuning corruptions' mean changes
SHIFT_DIRECTION_IMAGES = 500  # training images each tuning corruption is applied to when fitting them
SUBSPACE = "subspace.npz"  # `PixelSubspace` (training images' principal pixel subspace) and the samples' residuals
SUBSPACE_VERSION = 2  # bump when `PixelSubspace.residuals` changes: older references then load without it
SUBSPACE_RESIDUAL_VARIANCE = 1e-3  # share of the training images' pixel variance left outside the subspace
SUBSPACE_MAX_VALUES = 2048  # values per image above which images are average-pooled (2x2, 3x3, ...) first
GRAIN = "grain.npz"  # `PatchGrain` (training images' weakest 3x3 patch direction) and the samples' grain
GRAIN_VERSION = 1  # bump when `PatchGrain.scores` changes: older references then load without it
GRAIN_MIN_STD = 0.02  # share of the full pixel range under which a 3x3 patch is flat: no grain to measure
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


def robust_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and 1.4826 MAD per column (the standard deviation's robust estimate). Where the MAD is 0
    (a statistic constant on most images) the column's standard deviation + 1e-9: a statistic constant
    on all of them (the 5% quantile of images on a flat background) then makes any other value extreme."""
    centre = np.median(x, axis=0)
    scale = 1.4826 * np.median(np.abs(x - centre), axis=0)
    return centre, np.where(scale > 1e-9, scale, x.std(0) + 1e-9)


def _save_versioned(path: str | os.PathLike, version: int, **arrays) -> None:
    """One .npz file of a fitted model: its format's version, its fields and the reference samples' values."""
    np.savez(path, version=version, **arrays)


def _load_versioned(path: str | os.PathLike, version: int) -> dict[str, np.ndarray] | None:
    """A `_save_versioned` file's arrays, or None for a file of another version of its format: another
    version's values (statistics, residuals, scores, vectors) are not comparable with this one's."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files} if int(z["version"]) == version else None


@dataclass(frozen=True)
class TextureModel:
    """Texture statistics of images and a Gaussian of them fitted on training images: a label-free
    novelty score (squared Mahalanobis distance) for local structure the model's embedding and the
    global input statistics barely move: noise, spatter, thin lines, edge maps.

    The statistics are those of style transfer and texture synthesis (Gatys et al., 2015; the Gram-matrix
    OOD score of Sastry & Oore, ICML 2020): the Gram matrix, over pixel positions, of the rectified
    responses of a bank of zero-mean 3x3 filters on the channel-mean intensity, its upper triangle
    under a square root (the entries are products of magnitudes: never negative). The filters are random and fixed at fit time (stored with the fit, so
    both ends use the same bank), not the model's own layers: the statistics then need nothing but
    the image, whatever the component's architecture. The Gaussian is fitted on training images
    rather than on the reference sample, so the reference's own scores stay exchangeable with clean
    traffic's and calibrate the score (benchmarks/drift.py's design log, seventh entry)."""

    filters: np.ndarray  # float32 (F, 3, 3), each of zero mean
    mean: np.ndarray  # (T,) of the training images' statistics
    scale: np.ndarray  # (T,) their standard deviation (+ 1e-6)
    precision: np.ndarray  # (T, T) inverse of the standardised covariance + TEXTURE_SHRINKAGE * I

    @property
    def columns(self) -> int:
        return int(self.mean.shape[0])

    def statistics(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) preprocessed inputs -> (N, T) float64 texture statistics."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[2] < 3 or x.shape[3] < 3:
            raise ValueError(f"texture statistics need (N, C, H>=3, W>=3) preprocessed inputs, got shape {x.shape}")
        n, _, h, w = x.shape
        f = len(self.filters)
        iu = np.triu_indices(f)
        out = np.empty((n, len(iu[0])))
        step = max(1, int(2e7 // ((h - 2) * (w - 2) * (f + 9))))  # bounded memory on large images
        for start in range(0, n, step):
            g = x[start:start + step].mean(1)
            patches = np.lib.stride_tricks.sliding_window_view(g, (3, 3), axis=(1, 2))  # (n, H-2, W-2, 3, 3)
            r = np.abs(np.einsum("nyxij,fij->nyxf", patches, self.filters, optimize=True))
            r = r.reshape(len(g), -1, f)
            gram = np.einsum("npf,npg->nfg", r, r, optimize=True) / r.shape[1]
            out[start:start + step] = np.sqrt(gram[:, iu[0], iu[1]].astype(np.float64))
        return out

    def score(self, stats: np.ndarray) -> np.ndarray:
        """(N, T) texture statistics -> (N,) squared Mahalanobis distance to the training images' Gaussian."""
        z = (np.asarray(stats, dtype=np.float64) - self.mean) / self.scale
        return ((z @ self.precision) * z).sum(1)

    @functools.cached_property
    def _whitening(self) -> np.ndarray:
        return np.linalg.cholesky(self.precision)  # precision = L L^T, so z @ L has identity covariance

    def shift_vectors(self, stats: np.ndarray) -> np.ndarray:
        """(N, T) texture statistics -> (N, T) float32: whitened by the training images' Gaussian, each
        coordinate clipped at +-TEXTURE_SHIFT_CLIP. What the drift detector's `texture_shift` channel
        averages over a window: the clip keeps a few extreme images from dominating a mean of heavy-tailed
        statistics, which is what lets the reference's own subsets calibrate that mean."""
        z = (np.asarray(stats, dtype=np.float64) - self.mean) / self.scale
        return np.clip(z @ self._whitening, -TEXTURE_SHIFT_CLIP, TEXTURE_SHIFT_CLIP).astype(np.float32)

    @classmethod
    def fit(cls, x, seed: int = 0, filters: int = TEXTURE_FILTERS) -> TextureModel:
        """Fit on preprocessed training images (>= 2 in all): one (N, C, H, W) array, or an iterable of
        such batches (large images need not be preprocessed all at once)."""
        bank = np.random.default_rng(seed).standard_normal((filters, 3, 3)).astype(np.float32)
        bank -= bank.mean((1, 2), keepdims=True)  # zero mean: blind to brightness, which the input channel has
        t = filters * (filters + 1) // 2
        probe = cls(bank, np.zeros(t), np.ones(t), np.eye(t))
        stats = np.concatenate([probe.statistics(b) for b in ([x] if isinstance(x, np.ndarray) else x)])
        if len(stats) < 2:
            raise ValueError(f"a texture model needs at least 2 images, got {len(stats)}")
        mean, scale = stats.mean(0), stats.std(0) + 1e-6
        z = (stats - mean) / scale
        precision = np.linalg.inv(np.cov(z.T) + TEXTURE_SHRINKAGE * np.eye(t))
        return cls(bank, mean, scale, precision)

    def save(self, path: str | os.PathLike, reference_stats: np.ndarray) -> None:
        """The model and the reference samples' statistics (N, T) in one file."""
        _save_versioned(path, TEXTURE_VERSION, filters=self.filters, mean=self.mean, scale=self.scale,
                        precision=self.precision, reference=np.asarray(reference_stats, dtype=np.float64))

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[TextureModel, np.ndarray] | None:
        """(model, the reference samples' statistics), or None for another TEXTURE_VERSION's file."""
        z = _load_versioned(path, TEXTURE_VERSION)
        return None if z is None else (cls(z["filters"], z["mean"], z["scale"], z["precision"]), z["reference"])


@dataclass(frozen=True)
class PixelSubspace:
    """The principal subspace of training images' pixels, and an image's residual energy outside it: the
    squared prediction error (the Q statistic) of PCA process monitoring (Jackson & Mudholkar,
    Technometrics 1979), a label-free novelty score for what clean images never carry. The subspace keeps
    all but SUBSPACE_RESIDUAL_VARIANCE of the training images' pixel variance, so the residual lives in
    the directions clean images barely use: a background that is always dark, the fine grain a camera's
    optics never make. Paint, spatter, fog or noise put energy there even where the model's embedding and
    the images' summary statistics barely move (benchmarks/drift.py's design log, eleventh entry).
    Fitted on training images, never on the reference's samples, so the reference's own residuals
    calibrate the score. Images with more than SUBSPACE_MAX_VALUES values are average-pooled by `pool`
    (per side) first, which bounds the basis (at most D x D float32) whatever the component's input size.
    The basis stored is the smaller of the two sides: the D - k directions outside the subspace where the
    training images outnumber D (their eigenvectors then span everything; 128 rows instead of 656 on
    Fashion-MNIST), else the k inside it."""

    mean: np.ndarray  # (D,) of the training images, pooled and flattened
    basis: np.ndarray  # float32 orthonormal rows: (D - k, D) spanning the outside if `outside`, else (k, D) the subspace
    pool: int  # average-pooling factor per side before flattening (1: none)
    outside: bool  # whether `basis` spans the directions outside the subspace

    @property
    def components(self) -> int:
        """k, the subspace's dimension."""
        return len(self.mean) - len(self.basis) if self.outside else len(self.basis)

    def flatten(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) preprocessed inputs -> (N, D) float64: pooled by `pool`, flattened."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"a pixel subspace needs (N, C, H, W) preprocessed inputs, got shape {x.shape}")
        flat = _flatten_pooled(x, self.pool)
        if flat.shape[1] != len(self.mean):
            raise ValueError(f"inputs give {flat.shape[1]} values per image, the pixel subspace was fitted on "
                             f"{len(self.mean)}: not the images it was fitted on")
        return flat

    def residuals(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) preprocessed inputs -> (N,) log of the squared residual outside the subspace."""
        centred = self.flatten(x) - self.mean
        along = centred @ self.basis.T.astype(np.float64)
        energy = (along * along).sum(1)
        if not self.outside:  # Pythagoras: what the orthonormal subspace basis does not hold is outside
            energy = (centred * centred).sum(1) - energy
        return np.log(np.maximum(energy, 0.0) + 1e-12)

    @staticmethod
    def pool_for(shape: tuple[int, ...]) -> int:
        """The smallest pooling factor per side that leaves at most SUBSPACE_MAX_VALUES values of a (C, H, W) image."""
        c, h, w = shape
        f = 1
        while c * (h // f) * (w // f) > SUBSPACE_MAX_VALUES:
            f += 1
        return f

    @classmethod
    def fit(cls, x, residual_variance: float = SUBSPACE_RESIDUAL_VARIANCE) -> PixelSubspace:
        """Fit on preprocessed training images (>= 2 in all): one (N, C, H, W) array, or an iterable of such
        batches. The subspace: the fewest principal directions holding 1 - `residual_variance` of the variance."""
        pool, parts = None, []
        for batch in [x] if isinstance(x, np.ndarray) else x:  # pooled as they come: large images never all held
            batch = np.asarray(batch, dtype=np.float32)
            if batch.ndim != 4:
                raise ValueError(f"a pixel subspace needs (N, C, H, W) preprocessed training images, got {batch.shape}")
            pool = cls.pool_for(batch.shape[1:]) if pool is None else pool
            parts.append(_flatten_pooled(batch, pool))
        flat = np.concatenate(parts) if parts else np.zeros((0, 0))
        if len(flat) < 2:
            raise ValueError(f"a pixel subspace needs at least 2 images, got {len(flat)}")
        mean = flat.mean(0)
        centred = flat - mean
        complete = centred.shape[1] <= len(centred)  # eigenvectors of all D directions, the outside included
        if complete:  # the D x D scatter's eigenvectors: a tenth of an SVD's time
            variance, vectors = np.linalg.eigh(centred.T @ centred)
            variance, rows = np.maximum(variance[::-1], 0.0), vectors[:, ::-1].T
        else:
            sv, rows = np.linalg.svd(centred, full_matrices=False)[1:]
            variance = sv ** 2
        share = np.cumsum(variance) / max(float(variance.sum()), 1e-300)
        k = min(int(np.searchsorted(share, 1.0 - residual_variance)) + 1, len(rows))  # share[k - 1] >= 1 - it
        outside = complete and len(rows) - k < k
        return cls(mean, (rows[k:] if outside else rows[:k]).astype(np.float32), pool, outside)

    def save(self, path: str | os.PathLike, reference_residuals: np.ndarray) -> None:
        """The subspace and the reference samples' residuals (N,) in one file."""
        _save_versioned(path, SUBSPACE_VERSION, mean=self.mean, basis=self.basis, pool=self.pool,
                        outside=self.outside, reference=np.asarray(reference_residuals, dtype=np.float64))

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[PixelSubspace, np.ndarray] | None:
        """(subspace, the reference samples' residuals), or None for another SUBSPACE_VERSION's file."""
        z = _load_versioned(path, SUBSPACE_VERSION)
        return None if z is None else (cls(z["mean"], z["basis"], int(z["pool"]), bool(z["outside"])), z["reference"])


@dataclass(frozen=True)
class PatchGrain:
    """An image's fine grain: per textured 3x3 patch of its channel-mean intensity, the share of the patch's
    variation (its values less their mean) along `mask`, the direction in which training images' patches
    vary least (a Laplacian-like checkerboard on Fashion-MNIST); the image's score is the mean share over
    its patches whose standard deviation exceeds `min_std` (flat background and fills carry no grain;
    an image without a textured patch scores 0). Optics and downsampling make neighbouring pixels of
    clean images agree; photon (shot) noise, sensor noise and dithering put a fixed share of every
    patch's variation in each direction, the weakest included. A share, not an energy: the garment's
    own contrast cancels, which is what the residual channel (`PixelSubspace`) and the texture
    statistics, dominated by edges, cannot do. Fitted on training images, never on the reference's
    samples, so the reference's own scores calibrate it (benchmarks/drift.py's design log, twelfth and
    thirteenth entries)."""

    mask: np.ndarray  # (9,) unit vector orthogonal to the constant patch: the weakest direction, row-major 3x3
    min_std: float  # in preprocessed units: GRAIN_MIN_STD of the full pixel range

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) preprocessed inputs -> (N,) float64 mean share of the textured patches' variation along `mask`."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[2] < 3 or x.shape[3] < 3:
            raise ValueError(f"patch grain needs (N, C, H>=3, W>=3) preprocessed inputs, got shape {x.shape}")
        n, _, h, w = x.shape
        out = np.empty(n)
        step = max(1, int(2e7 // ((h - 2) * (w - 2) * 9)))  # bounded memory on large images
        for start in range(0, n, step):
            centred, textured = self._patches(x[start:start + step])
            share = (centred @ self.mask) ** 2 / np.maximum((centred * centred).sum(2), 1e-30)
            out[start:start + step] = (share * textured).sum(1) / np.maximum(textured.sum(1), 1)
        return out

    def _patches(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, C, H, W) -> (the n images' 3x3 patches of their channel-mean, each less its mean: (n, P, 9)
        float64; whether each is textured: (n, P) bool)."""
        g = x.mean(1)
        patches = np.lib.stride_tricks.sliding_window_view(g, (3, 3), axis=(1, 2)).reshape(len(g), -1, 9)
        centred = patches.astype(np.float64) - patches.mean(2, keepdims=True, dtype=np.float64)
        return centred, np.sqrt((centred * centred).mean(2)) > self.min_std

    @classmethod
    def fit(cls, x, value_range: float) -> PatchGrain:
        """Fit on preprocessed training images: one (N, C, H, W) array, or an iterable of such batches.
        `value_range`: how far apart black and white are after preprocessing, on the channel mean (1 /
        std for one channel normalised by (v - mean) / std); patches whose standard deviation is under
        GRAIN_MIN_STD of it are flat. The mask: the least-variance direction of the textured patches."""
        if not value_range > 0:
            raise ValueError(f"patch grain needs the preprocessed pixel range, a positive number, got {value_range}")
        probe = cls(np.zeros(9), GRAIN_MIN_STD * float(value_range))
        scatter, count = np.zeros((9, 9)), 0
        for batch in [x] if isinstance(x, np.ndarray) else x:  # accumulated as they come: never all held
            batch = np.asarray(batch, dtype=np.float32)
            if batch.ndim != 4 or batch.shape[2] < 3 or batch.shape[3] < 3:
                raise ValueError(f"patch grain needs (N, C, H>=3, W>=3) preprocessed training images, got {batch.shape}")
            centred, textured = probe._patches(batch)
            kept = centred[textured]
            scatter += kept.T @ kept
            count += len(kept)
        if count < 9:
            raise ValueError(f"patch grain needs at least 9 textured 3x3 patches in its training images, got {count}")
        # an orthonormal basis of the patches less their mean (orthogonal to the constant patch), then its weakest
        complement = np.linalg.qr(np.hstack([np.ones((9, 1)), np.eye(9)[:, :8]]))[0][:, 1:]
        vectors = np.linalg.eigh(complement.T @ scatter @ complement)[1]  # ascending eigenvalues
        return cls(complement @ vectors[:, 0], probe.min_std)

    def save(self, path: str | os.PathLike, reference_scores: np.ndarray) -> None:
        """The mask, the threshold and the reference samples' scores (N,) in one file."""
        _save_versioned(path, GRAIN_VERSION, mask=self.mask, min_std=self.min_std,
                        reference=np.asarray(reference_scores, dtype=np.float64))

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[PatchGrain, np.ndarray] | None:
        """(grain, the reference samples' scores), or None for another GRAIN_VERSION's file."""
        z = _load_versioned(path, GRAIN_VERSION)
        return None if z is None else (cls(z["mask"], float(z["min_std"])), z["reference"])


def _flatten_pooled(x: np.ndarray, pool: int) -> np.ndarray:
    """(N, C, H, W) -> (N, D) float64: the means of whole pool x pool blocks (the edge's remainder dropped)."""
    n, c, h, w = x.shape
    if pool > 1:
        x = x[:, :, :h // pool * pool, :w // pool * pool].reshape(n, c, h // pool, pool, w // pool, pool).mean((3, 5))
    return x.reshape(n, -1).astype(np.float64)


def image_features(x: np.ndarray, texture: TextureModel | None, subspace: PixelSubspace | None = None,
                   grain: PatchGrain | None = None) -> np.ndarray:
    """What the drift detector's image channels read per image: `input_statistics`, followed by the
    texture statistics' `texture.columns` when a texture model is given, then the residual outside
    `subspace` (one column) when one is given, and last the grain score (one column) when `grain` is."""
    parts = [input_statistics(x)] + ([texture.statistics(x)] if texture is not None else [])
    return np.hstack(parts + pixel_scores(x, subspace, grain))


def pixel_scores(x: np.ndarray, subspace: PixelSubspace | None, grain: PatchGrain | None) -> list[np.ndarray]:
    """The pixel-score columns of preprocessed images `x` (N, C, H, W): the residual outside `subspace` and
    the grain score along `grain`'s mask, those of the two given, in `pixel_score_columns`' order."""
    return pixel_score_columns(None if subspace is None else subspace.residuals(x),
                               None if grain is None else grain.scores(x))


def pixel_score_columns(residuals: np.ndarray | None, grain_scores: np.ndarray | None) -> list[np.ndarray]:
    """The (N, 1) columns that end `image_features` rows, from the samples' residuals and grain scores
    (each None where the reference has no such model): the one place that orders them."""
    return [np.asarray(v, dtype=np.float64)[:, None] for v in (residuals, grain_scores) if v is not None]


def split_pixel_scores(features: np.ndarray, subspace: PixelSubspace | None,
                       grain: PatchGrain | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(the rows without their pixel-score columns, the residuals (N,) or None, the grain scores (N,) or
    None) of `image_features` rows (N, F) computed with `subspace` and `grain` (each optional)."""
    grain_scores = None
    if grain is not None:
        features, grain_scores = features[:, :-1], features[:, -1]
    if subspace is None:
        return features, None, grain_scores
    return features[:, :-1], features[:, -1], grain_scores


def split_image_features(features: np.ndarray, texture: TextureModel | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(input statistics, texture statistics or None) of `image_features` rows (N, F) without their
    pixel-score columns (`split_pixel_scores` takes them off)."""
    if texture is None:
        return features, None
    cut = features.shape[1] - texture.columns
    return features[:, :cut], features[:, cut:]


@dataclass(frozen=True)
class ShiftDirections:
    """The directions in which the suite's TUNING corruptions (`flywheel.core.shifts.TUNING_FAMILIES`) move
    an image's statistics, for the drift detector's texture-shift channel: besides the squared length
    of a window's mean texture shift vector, it tests the squared length of the window's mean vector
    projected on these few directions. A corruption moves the statistics along a few directions; the
    full-length statistic pays for every dimension in its null, the projection only for SHIFT_DIRECTIONS_COUNT.
    Fitted on training images at log time, never on the reference's own samples, so the reference
    stays exchangeable with clean traffic (benchmarks/drift.py's design log, ninth entry).

    The vector per image: its texture shift vector (`TextureModel.shift_vectors`), then its input
    statistics standardised by the training images' median and MAD and whitened by their correlation
    (+ TEXTURE_SHRINKAGE * I), clipped at +-TEXTURE_SHIFT_CLIP."""

    input_centre: np.ndarray  # (F,) of the training images' input statistics
    input_scale: np.ndarray  # (F,) their 1.4826 MAD (`robust_scale`)
    input_whitening: np.ndarray  # (F, F): standardised statistics @ this have identity covariance
    directions: np.ndarray  # (k, T + F) orthonormal rows

    def vectors(self, features: np.ndarray, texture: TextureModel) -> np.ndarray:
        """(N, F + T) `image_features` rows -> (N, T + F) float64 vectors (see the class docstring)."""
        inp, tex = split_image_features(np.asarray(features, dtype=np.float64), texture)
        z = np.clip((inp - self.input_centre) / self.input_scale @ self.input_whitening,
                    -TEXTURE_SHIFT_CLIP, TEXTURE_SHIFT_CLIP)
        return np.hstack([texture.shift_vectors(tex).astype(np.float64), z])

    def project(self, features: np.ndarray, texture: TextureModel) -> np.ndarray:
        """(N, F + T) `image_features` rows -> (N, k) coordinates of their vectors along the directions."""
        return self.vectors(features, texture) @ self.directions.T

    @classmethod
    def fit(cls, input_stats: np.ndarray, clean: np.ndarray, corrupted: list[np.ndarray], texture: TextureModel,
            count: int = SHIFT_DIRECTIONS_COUNT) -> ShiftDirections:
        """`input_stats`: `input_statistics` of training images (N, F), which standardise and whiten that
        part; `clean`: `image_features` (M, F + T) of M training images, and `corrupted[i]` those of the same
        M images through one tuning corruption each. The directions: the top `count` right singular vectors
        of the corruptions' mean changes."""
        inp = np.asarray(input_stats, dtype=np.float64)
        if len(inp) < 2 or not corrupted or any(len(c) != len(clean) for c in corrupted):
            raise ValueError(f"shift directions need >= 2 training images and >= 1 corruption of the {len(clean)} "
                             f"clean ones, got {len(inp)} and {[len(c) for c in corrupted]}")
        centre, scale = robust_scale(inp)
        z = (inp - centre) / scale
        sd = z.std(0) + 1e-9
        corr = np.cov((z / sd).T).reshape(z.shape[1], z.shape[1]) + TEXTURE_SHRINKAGE * np.eye(z.shape[1])
        whitening = np.linalg.cholesky(np.linalg.inv(corr)) / sd[:, None]  # z @ this: identity covariance
        probe = cls(centre, scale, whitening, np.zeros((0, texture.columns + inp.shape[1])))
        clean_mean = probe.vectors(clean, texture).mean(0)
        changes = np.stack([probe.vectors(c, texture).mean(0) - clean_mean for c in corrupted])
        directions = np.linalg.svd(changes, full_matrices=False)[2][:count]
        return cls(centre, scale, whitening, directions)

    def save(self, path: str | os.PathLike) -> None:
        _save_versioned(path, SHIFT_DIRECTIONS_VERSION, input_centre=self.input_centre, input_scale=self.input_scale,
                        input_whitening=self.input_whitening, directions=self.directions)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShiftDirections | None:
        """The directions, or None for another SHIFT_DIRECTIONS_VERSION's file."""
        z = _load_versioned(path, SHIFT_DIRECTIONS_VERSION)
        return None if z is None else cls(z["input_centre"], z["input_scale"], z["input_whitening"], z["directions"])


@dataclass(frozen=True)
class ReferenceSample:
    embeddings: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    class_priors: np.ndarray
    input_stats: np.ndarray | None = None  # `input_statistics` of the same samples; None: not logged
    texture: TextureModel | None = None  # None: not logged (or another TEXTURE_VERSION)
    texture_stats: np.ndarray | None = None  # `texture.statistics` of the same samples, with `texture`
    shift_directions: ShiftDirections | None = None  # with `texture`; None: not logged (or another version)
    subspace: PixelSubspace | None = None  # None: not logged (or another SUBSPACE_VERSION)
    residuals: np.ndarray | None = None  # `subspace.residuals` of the same samples, with `subspace`
    grain: PatchGrain | None = None  # None: not logged (or another GRAIN_VERSION)
    grain_scores: np.ndarray | None = None  # `grain.scores` of the same samples, with `grain`

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
        if self.texture is not None:
            tex = np.asarray(self.texture_stats, dtype=np.float64)
            if tex.shape != (len(self.embeddings), self.texture.columns):
                raise ValueError(f"texture_stats must be (N={len(self.embeddings)}, {self.texture.columns}), "
                                 f"got shape {tex.shape}")
            self.texture.save(os.path.join(directory, TEXTURE), tex)
            if self.shift_directions is not None:
                self.shift_directions.save(os.path.join(directory, SHIFT_DIRECTIONS))
        if self.subspace is not None:
            self.subspace.save(os.path.join(directory, SUBSPACE), self._per_sample("residuals", self.residuals))
        if self.grain is not None:
            self.grain.save(os.path.join(directory, GRAIN), self._per_sample("grain_scores", self.grain_scores))

    def _per_sample(self, name: str, values) -> np.ndarray:
        """`values` as one float64 score per sample (N,), or a ValueError naming the field."""
        scores = np.asarray(values, dtype=np.float64)
        if scores.shape != (len(self.embeddings),):
            raise ValueError(f"{name} must be (N={len(self.embeddings)},), got shape {scores.shape}")
        return scores

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceSample:
        """Read a saved sample. Labels are optional; missing class priors (runs of older flywheels)
        are the predicted-class fractions; missing input statistics, texture model, shift directions,
        pixel subspace or patch grain, or those of another version, are None."""
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
        texture, texture_stats = _load_with_values(os.path.join(path, TEXTURE), TextureModel)
        directions = None
        if texture is not None and os.path.isfile(os.path.join(path, SHIFT_DIRECTIONS)):
            directions = ShiftDirections.load(os.path.join(path, SHIFT_DIRECTIONS))
        subspace, residuals = _load_with_values(os.path.join(path, SUBSPACE), PixelSubspace)
        grain, grain_scores = _load_with_values(os.path.join(path, GRAIN), PatchGrain)
        return cls(emb, preds, labels, np.asarray(priors, dtype=np.float64), stats, texture, texture_stats, directions,
                   subspace, residuals, grain, grain_scores)


def _load_with_values(path: str, model_type) -> tuple:
    """(model, the reference samples' values) of a model file `model_type.save` wrote with them, or (None,
    None) where the file is missing or of another version of its format."""
    loaded = model_type.load(path) if os.path.isfile(path) else None
    return (None, None) if loaded is None else loaded
