"""The ninth design-log entry of benchmarks/drift.py: the texture-shift channel also tests a window's mean
along the directions the TUNING corruptions move image statistics in (`contracts.reference.ShiftDirections`,
in the product), against the channel before it and against a class-centred variant that was not built.
Nothing here is imported by the product.

Why: the texture-shift channel tested a window's mean over 136 whitened texture statistics by its squared
length. A shift that moves the mean along a few directions pays for all 136 in that statistic's null
(its spread grows with the dimension). Told the direction, a one-dimensional test needs about half the
effect. A label-free test is not told it, but the corruptions of the tuning half show which directions
corruptions in general take; the held-out families never enter the fit.

Compared, each fitted on training images only (the texture model's pick, never the reference's samples):
  * "before": the channel as the eighth entry built it (no directions);
  * "built": the product, `ShiftDirections` as `component.log.fit_shift_directions` fits them (texture
    shift vectors and whitened input statistics, pooled over classes; the top 10 directions of the 27
    TUNING pairs' mean changes on 500 training images), the channel's p-value the min of the mean
    texture's and the projected mean's, calibrated by its own null;
  * "class-centred": the same, but every vector centred on the mean of its predicted class (the model's
    prediction, at fit time on the training images) and whitened by the within-class covariance, shrunk
    towards its diagonal (0.3 for the texture part, 0.05 for the input part).

Printed: (1) detection at W=100, 20% shifted, of the pairs costing >= 3 points, per half, on the very
windows of `drift.py --seed S` (10 reference draws x 100 windows per pair, 10,000 clean windows); (2) with
--level, the class-centred candidate's level over --draws reference draws x 1000 clean windows per W (the
built design's level: benchmarks/drift_level.py).

    python benchmarks/drift_shift_directions.py --seed 0   # about 5 minutes on 2 shared cores
    python benchmarks/drift_shift_directions.py --seed 1 --level --draws 30
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402
from drift_level import default_pools, print_halves, print_rates  # noqa: E402

from flywheel.contracts.reference import (  # noqa: E402
    SHIFT_DIRECTION_IMAGES,
    SHIFT_DIRECTIONS_COUNT,
    TEXTURE_FIT_SAMPLES,
    TEXTURE_SHIFT_CLIP,
    image_features,
    robust_scale,
    split_image_features,
)
from flywheel.monitoring.drift import SHIFT_CHANNEL, NoveltyDriftDetector, _exceedance_p, _min_p_p_value  # noqa: E402

CLASSES = 10


@dataclass(frozen=True)
class VectorSpace:
    """The class-centred candidate: per-image vectors and the tuning directions in them."""

    input_centre: np.ndarray
    input_scale: np.ndarray
    class_means: np.ndarray  # (classes, d) before whitening
    whitening: np.ndarray  # (d, d)
    directions: np.ndarray  # (SHIFT_DIRECTIONS_COUNT, d)

    def vectors(self, features: np.ndarray, texture, classes: np.ndarray) -> np.ndarray:
        v = _raw(features, texture, self.input_centre, self.input_scale) - self.class_means[classes]
        return np.clip(v @ self.whitening, -TEXTURE_SHIFT_CLIP, TEXTURE_SHIFT_CLIP)


def _raw(features: np.ndarray, texture, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Texture shift vectors followed by the robust-standardised input statistics."""
    inp, tex = split_image_features(np.asarray(features, np.float64), texture)
    return np.hstack([texture.shift_vectors(tex).astype(np.float64), (inp - centre) / scale])


def _inputs(det: NoveltyDriftDetector, emb: np.ndarray, inp: np.ndarray) -> dict[str, np.ndarray]:
    """`det.window_inputs` of a whole pool, in chunks (what drift.py's Batch computes once per draw)."""
    chunks = [det.window_inputs(emb[i:i + 4000], inp[i:i + 4000]) for i in range(0, len(emb), 4000)]
    return {c: np.concatenate([ch[c] for ch in chunks]) for c in chunks[0]}


def _whitening(v: np.ndarray, tex_columns: int, shrink: tuple[float, float]) -> np.ndarray:
    """Block-diagonal: texture part and input part each whitened by its (shrunk) covariance."""
    blocks = []
    for part, s in ((v[:, :tex_columns], shrink[0]), (v[:, tex_columns:], shrink[1])):
        cov = np.cov(part.T)
        cov = (1 - s) * cov + s * np.diag(np.diag(cov)) + 1e-9 * np.eye(len(cov))
        blocks.append(np.linalg.cholesky(np.linalg.inv(cov)))
    out = np.zeros((v.shape[1], v.shape[1]))
    out[:tex_columns, :tex_columns], out[tex_columns:, tex_columns:] = blocks
    return out


def fit_class_centred(pools) -> VectorSpace:
    """The class-centred candidate, from the training images the texture model was fitted on."""
    from flywheel.contracts.preprocessing import to_array
    from flywheel.core.data import load_splits
    from flywheel.core.evaluate import predict
    from flywheel.core.models import load_model
    from flywheel.core.shifts import SEVERITIES, corrupt_images

    model_uri, tracking_uri, _ = bench.cached_fashion_model(None)
    model, spec = load_model(model_uri, tracking_uri=tracking_uri)
    train = load_splits("fashion-mnist", seed=0).train
    images = train.images[np.sort(np.random.default_rng(0).permutation(len(train.images))[:TEXTURE_FIT_SAMPLES])]
    texture = pools.texture

    def feats(x):
        return np.concatenate([image_features(to_array(x[i:i + 1000], spec.preprocess), texture)
                               for i in range(0, len(x), 1000)])

    fit, classes = feats(images), predict(model, images, spec).argmax(1)
    base = images[:SHIFT_DIRECTION_IMAGES]
    corrupted = [(feats(c), predict(model, c, spec).argmax(1))
                 for f in bench.TUNING for s in SEVERITIES for c in [corrupt_images(base, f, s)]]
    centre, scale = robust_scale(split_image_features(fit, texture)[0])
    raw = _raw(fit, texture, centre, scale)
    means = np.stack([raw[classes == k].mean(0) for k in range(CLASSES)])
    white = _whitening(raw - means[classes], texture.columns, (0.3, 0.05))
    space = VectorSpace(centre, scale, means, white, np.zeros((0, raw.shape[1])))
    clean = space.vectors(fit[:SHIFT_DIRECTION_IMAGES], texture, classes[:SHIFT_DIRECTION_IMAGES]).mean(0)
    changes = np.stack([space.vectors(f, texture, c).mean(0) - clean for f, c in corrupted])
    return VectorSpace(centre, scale, means, white,
                       np.linalg.svd(changes, full_matrices=False)[2][:SHIFT_DIRECTIONS_COUNT])


def subset_null(parts: list[np.ndarray], w: int, simulations: int, seed) -> list[np.ndarray]:
    """Each statistic's null from the same random w-subsets of the reference against the other n - w."""
    n = len(parts[0])
    rng, out = np.random.default_rng(seed), [[] for _ in parts]
    totals = [p.sum(0) for p in parts]
    for start in range(0, simulations, 1000):
        b = min(1000, simulations - start)
        pick = np.argpartition(rng.random((b, n)), w - 1, axis=1)[:, :w]
        for i, (p, total) in enumerate(zip(parts, totals, strict=True)):
            sums = p[pick].sum(1)
            out[i].append(((sums / w - (total - sums) / (n - w)) ** 2).sum(1))
    return [np.concatenate(o) for o in out]


class Channel:
    """The candidate texture-shift channel for one reference draw: min-p of the full and the projected test."""

    def __init__(self, det: NoveltyDriftDetector, space: VectorSpace, ref_features, ref_classes, w: int):
        self.det, self.space = det, space
        proj = space.vectors(ref_features, det.texture, ref_classes) @ space.directions.T
        self.centre = proj.mean(0)
        full_null, proj_null = subset_null([det.shift_reference, proj], w, det.simulations, [det.seed, w])
        self.full_null, self.proj_null = np.sort(full_null), np.sort(proj_null)
        nulls = np.minimum(_exceedance_p(self.full_null, full_null), _exceedance_p(self.proj_null, proj_null))
        self.min_null = np.sort(nulls)

    def projected(self, features, classes) -> np.ndarray:
        return self.space.vectors(features, self.det.texture, classes) @ self.space.directions.T

    def p(self, shift: np.ndarray, proj: np.ndarray) -> np.ndarray:
        """(B, W, T) shift vectors and (B, W, k) projections -> (B,) the channel's p-values."""
        full = _exceedance_p(self.full_null, ((shift.mean(1) - self.det.shift_centre) ** 2).sum(1))
        pr = _exceedance_p(self.proj_null, ((proj.mean(1) - self.centre) ** 2).sum(1))
        return _min_p_p_value(self.min_null, np.minimum(full, pr))


def _detectors(pools, draw: np.ndarray, seed: int) -> tuple[NoveltyDriftDetector, NoveltyDriftDetector]:
    """(the channel before the directions, the built one) fitted on one reference draw."""
    fit = dict(input_reference=pools.ref_inp[draw], texture=pools.texture)
    return (NoveltyDriftDetector(seed=seed).fit(pools.ref_emb[draw], **fit),
            NoveltyDriftDetector(seed=seed).fit(pools.ref_emb[draw], **fit, directions=pools.directions))


def _bonferroni(per: dict[str, np.ndarray]) -> np.ndarray:
    return np.minimum(1, len(per) * np.min(list(per.values()), 0))


def detection(pools, space: VectorSpace, seed: int, w: int = 100) -> dict:
    """{decision: {pair or "clean": flags}} on drift.py's own windows of `seed` at W=w, 20% shifted."""
    keys = list(pools.shifted)
    offsets, off = {}, len(pools.clean_emb)
    for k in keys:
        offsets[k] = (off, len(pools.shifted[k][0]))
        off += len(pools.shifted[k][0])
    emb = np.concatenate([pools.clean_emb] + [pools.shifted[k][0] for k in keys])
    prob = np.concatenate([pools.clean_prob] + [pools.shifted[k][1] for k in keys])
    inp = np.concatenate([pools.clean_inp] + [pools.shifted_inp[k] for k in keys])
    counts, n_clean = bench.FULL, len(pools.clean_emb)
    rng = np.random.default_rng([seed, 1])
    draws = np.stack([rng.choice(len(pools.ref_emb), 1000, replace=False) for _ in range(counts.refs)])
    plan = bench.make_plan(np.random.default_rng([seed, w]), n_clean, offsets, w, counts)
    out = {d: {k: [] for k in ["clean", *keys]} for d in ("before", "built", "class-centred")}
    for r, draw in enumerate(draws):
        before, built = _detectors(pools, draw, seed)
        u, u_built = _inputs(before, emb, inp), _inputs(built, emb, inp)
        candidate = Channel(before, space, pools.ref_inp[draw], pools.ref_prob[draw].argmax(1), w)
        proj = candidate.projected(inp, prob.argmax(1))
        sets = [("clean", plan.clean[np.arange(r, len(plan.clean), counts.refs)])]
        sets += [(k, plan.shifted[(*k, 0.2)][np.arange(r, counts.shifted, counts.refs)]) for k in keys]
        for name, idx in sets:
            p, per = before.window_p_values({c: v[idx] for c, v in u.items()})
            out["before"][name] += list(p < bench.ALPHA)
            out["built"][name] += list(built.window_p_values({c: v[idx] for c, v in u_built.items()})[0] < bench.ALPHA)
            per[SHIFT_CHANNEL] = candidate.p(u[SHIFT_CHANNEL][idx], proj[idx])
            out["class-centred"][name] += list(_bonferroni(per) < bench.ALPHA)
        print(f"draw {r + 1} of {len(draws)}", flush=True)
    return out


def level(pools, space: VectorSpace, draws: int, windows: int, seed: int) -> None:
    """The class-centred candidate's false alarms over `draws` reference draws x `windows` clean windows
    per W, and its texture-shift channel's alone against its Bonferroni share."""
    rng = np.random.default_rng(seed)
    classes = pools.clean_prob.argmax(1)
    rates: dict[tuple[int, str], list[float]] = {}
    for _ in range(draws):
        draw = rng.choice(len(pools.ref_emb), 1000, replace=False)
        before = _detectors(pools, draw, seed)[0]
        u = before.window_inputs(pools.clean_emb, pools.clean_inp)
        for w in bench.WINDOWS:
            if 2 * w > len(draw):  # the channel's own bound: tested without it
                continue
            idx = np.stack([rng.choice(len(pools.clean_emb), w, replace=False) for _ in range(windows)])
            per = before.window_p_values({c: v[idx] for c, v in u.items()})[1]
            ch = Channel(before, space, pools.ref_inp[draw], pools.ref_prob[draw].argmax(1), w)
            per[SHIFT_CHANNEL] = ch.p(u[SHIFT_CHANNEL][idx], ch.projected(pools.clean_inp, classes)[idx])
            for name, values in (("class-centred", _bonferroni(per)),
                                 (f"its texture-shift channel x {len(per)}", len(per) * per[SHIFT_CHANNEL])):
                rates.setdefault((w, name), []).append(float(np.mean(values < bench.ALPHA)))
    print_rates(rates)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="drift.py's windows of this seed (0 reports, 1 tunes)")
    ap.add_argument("--level", action="store_true", help="also the candidate's level over --draws reference draws")
    ap.add_argument("--draws", type=int, default=100, help="reference draws for --level")
    args = ap.parse_args(argv)
    pools = default_pools()
    space = fit_class_centred(pools)
    goal = [k for k in pools.shifted if pools.accuracy_cost[k] >= bench.GOAL["accuracy_cost"]]
    for d, flags in detection(pools, space, args.seed).items():
        print_halves(flags, goal, f"seed {args.seed} {d:13s}")
    if args.level:
        print(f"level: {args.draws} reference draws x 1000 clean windows per W")
        level(pools, space, args.draws, 1000, args.seed)


if __name__ == "__main__":
    main()
