"""The fifth design-log entry of benchmarks/drift.py: a noise channel for `NoveltyDriftDetector`, measured
on both halves and on its level, and rejected. Kept so the entry can be re-run; nothing here is in
the product.

The candidate: Immerkaer's fast noise estimate (CVIU 1996): |g * N| with N the 3x3 kernel
[[1,-2,1],[-2,4,-2],[1,-2,1]], which cancels local planes and ridges, so what is left is mostly pixel
noise, isolated pixels and thin lines; on each preprocessed image's channel-mean intensity scaled
to its own [min, max], over its signal pixels (3x3 mean above 10% of the range): log mean and log
90% quantile. Scored as a fourth channel exactly as the input channel is (median/MAD standardisation
against the reference draw, Euclidean kNN k=3, leave-one-out calibration, the detector's tail-count
statistic and rank null), Bonferroni over four channels.

Printed: (1) detection at W=100, 20% shifted, of the pairs costing >= 3 points, per half, with and
without the channel, windows of seeds 0 and 1 (10 reference draws x 10 windows per pair each; 2000
clean windows per seed; this script's own windows, not drift.py's); (2) the level over 100 reference
draws x 1000 clean windows per W (benchmarks/drift_level.py's check).

    python benchmarks/drift_noise_channel.py         # about 10 minutes on 2 shared cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402
from drift_level import channel_p_values, default_pools, level_rates, print_halves, print_rates  # noqa: E402

from flywheel.contracts.reference import robust_scale  # noqa: E402
from flywheel.monitoring.drift import NoveltyDriftDetector, _euclid_knn, _euclid_knn_loo  # noqa: E402

KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


def noise_statistics(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) preprocessed images -> (N, 2): log mean and log 90% quantile of |g * KERNEL| over the
    signal pixels of g, the channel-mean intensity scaled to its own [min, max]."""
    g = np.asarray(x, np.float32).mean(1)
    n, h, w = g.shape
    lo, hi = g.min((1, 2), keepdims=True), g.max((1, 2), keepdims=True)
    g = (g - lo) / (hi - lo + 1e-6)
    shifted = [g[:, i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3)]
    residual = np.abs(sum(k * v for k, v in zip(KERNEL.ravel(), shifted, strict=True)))
    signal = sum(shifted) / 9 > 0.1
    count = np.maximum(signal.sum((1, 2)), 1)
    mean = np.where(signal, residual, 0).sum((1, 2)) / count
    masked = np.where(signal, residual, np.nan).reshape(n, -1)
    masked[~signal.reshape(n, -1).any(1)] = 0.0  # an image without signal pixels: the floor
    return np.stack([np.log(mean + 1e-4), np.log(np.nanquantile(masked, 0.9, axis=1) + 1e-4)], axis=1)


def noise_pools(pools) -> dict:
    """Noise statistics of every pool's images (the default model's preprocessing)."""
    from flywheel.contracts.preprocessing import to_array
    from flywheel.core.models import load_model

    model_uri, tracking_uri, _ = bench.cached_fashion_model(None)
    spec = load_model(model_uri, tracking_uri=tracking_uri)[1].preprocess
    ref, clean, source, _, _ = bench._images(None, None, None)
    images_cache = bench.CACHE_ROOT / f"images-{bench._digest((bench.SRC / 'core/shifts.py').read_bytes(), source.tobytes())}"

    def stats(images):
        return np.concatenate([noise_statistics(to_array(images[i:i + 5000], spec))
                               for i in range(0, len(images), 5000)])

    out = {"ref": stats(ref), "clean": stats(clean)}
    for key in pools.shifted:
        out[key] = stats(bench.corrupted(source, key[0], key[1], images_cache))
    return out


def noise_u(noise: dict, draw: np.ndarray, parts) -> dict:
    """Per-sample conformal p-values of the noise channel, fitted on the reference draw, for `parts`."""
    ref = noise["ref"][draw]
    centre, scale = robust_scale(ref)
    z = (ref - centre) / scale
    cal = np.sort(_euclid_knn_loo(z, 3))
    return {p: (1 + len(cal) - np.searchsorted(cal, _euclid_knn(z, (noise[p] - centre) / scale, 3), side="left"))
            / (len(cal) + 1) for p in parts}


def detection(pools, noise: dict, seed: int, draws: int = 10, per_draw: int = 10, clean_windows: int = 2000,
              window: int = 100, shifted: int = 20) -> dict:
    """{decision: {pair or "clean": [flagged per window]}} at W=window with `shifted` shifted samples."""
    rng = np.random.default_rng(100 + seed)
    pairs = list(pools.shifted)
    out = {d: {k: [] for k in [*pairs, "clean"]} for d in ("design", "design + noise")}
    n_clean = len(pools.clean_emb)
    for _ in range(draws):
        draw = rng.choice(len(pools.ref_emb), 1000, replace=False)
        det = NoveltyDriftDetector(seed=seed).fit(pools.ref_emb[draw], input_reference=pools.ref_inp[draw],
                                                  texture=pools.texture)
        u_clean = det.p_values(pools.clean_emb, pools.clean_inp)
        nu = noise_u(noise, draw, ["clean", *pairs])
        cases = {"clean": (np.stack([rng.choice(n_clean, window, replace=False)
                                     for _ in range(clean_windows // draws)]), None)}
        for k in pairs:
            cases[k] = (np.stack([rng.choice(n_clean, window - shifted, replace=False) for _ in range(per_draw)]),
                        np.stack([rng.choice(len(pools.shifted[k][0]), shifted, replace=False) for _ in range(per_draw)]))
        for k, (ci, si) in cases.items():
            if si is None:
                u = {c: v[ci] for c, v in u_clean.items()}
                un = nu["clean"][ci]
            else:
                u_k = det.p_values(pools.shifted[k][0], pools.shifted_inp[k])
                u = {c: np.concatenate([u_clean[c][ci], u_k[c][si]], 1) for c in u_clean}
                un = np.concatenate([nu["clean"][ci], nu[k][si]], 1)
            p, per = det.window_p_values(u)
            out["design"][k] += list(p < bench.ALPHA)
            four = np.minimum(1.0, 4 * np.minimum(np.min(list(per.values()), 0), channel_p_values(det, un)))
            out["design + noise"][k] += list(four < bench.ALPHA)
    return out


def main() -> None:
    pools = default_pools()
    noise = noise_pools(pools)
    goal = [k for k in pools.shifted if pools.accuracy_cost[k] >= bench.GOAL["accuracy_cost"]]
    for seed in (1, 0):
        res = detection(pools, noise, seed)
        for d, flags in res.items():
            print_halves(flags, goal, f"seed {seed} {d:15s}")
    print("level: 100 reference draws x 1000 clean windows per W")
    print_rates(level_rates(pools, 100, 1000, 0, extra=lambda draw: {"noise": noise_u(noise, draw, ["clean"])["clean"]}))


if __name__ == "__main__":
    main()
