"""The twelfth design-log entry of benchmarks/drift.py and the second part of the thirteenth: a patch-grain score
for shot noise, measured as a seventh channel of `NoveltyDriftDetector`, merged into the residual channel two
ways, in place of each of the six channels, and as a window-mean statistic of the texture-shift channel, on both
halves and on the level; and with weighted Bonferroni at smaller shares of alpha. The last, at alpha / 20, is what
the product adopted (`PatchGrain`, scored on preprocessed images); the rest were rejected. Kept so the entries
can be re-run.

The score: per image (raw pixels scaled to [0, 1]), the mean over its 3x3 patches with a standard deviation
above 0.02 of the share of each patch's variation (less the patch's mean) along the direction in which the
textured patches of 2000 of the texture model's training images vary least (a Laplacian-like checkerboard).
A share, not an energy: the garment's contrast cancels; photon noise puts a fixed share in every direction.
Per sample it separates shot-noise-1 from clean test images with AUC 0.95.

Variants, each with the built detector's six channels on the same reference draws and windows:
  +grain   the score as a seventh tail-count channel (conformal p-values against the reference draw's own
           scores), Bonferroni over seven;
  merged   one pixel channel in place of the residual channel: per sample, minus the smaller of its
           residual's and its grain's conformal p-values, calibrated on the reference draw's own values of
           that (each against the other n - 1), Bonferroni over six;
  fisher   the same with Fisher's combination (minus the log of the product of the two p-values).
With --variants swaps (thirteenth entry): "grain for C", the grain channel in place of channel C, Bonferroni over
six. With --variants window-mean (thirteenth entry): the texture-shift channel with a third statistic, the
window's mean grain less the reference's (one-sided), raw or standardised by training images' and clipped at
+-3 or +-2 standard deviations, calibrated with the channel's own two statistics by one reference-subset null.
With --variants weighted (thirteenth entry): the seventh channel with weighted Bonferroni, the grain channel at
alpha / 7, / 20, / 50 or / 100 and the six sharing the rest equally (at alpha / 7 it is "+grain").

Printed: (1) with --seeds, detection at W=100, 20% shifted, of the pairs costing >= 3 points, per half,
and clean windows' false alarms at W = 50 / 100 / 300, on drift.py's own windows and reference draws of each
seed; (2) with --draws, the level over that many reference draws x 1000 clean windows per W, the detector
and each variant; --rank-simulations sets the tail-count rank null's simulations (the detector's own: 20000).

    python benchmarks/drift_grain_channel.py --seeds 0 1          # about 5 minutes per seed on 2 cores
    python benchmarks/drift_grain_channel.py --draws 100 --rank-simulations 100000   # about 7 minutes
    python benchmarks/drift_grain_channel.py --seeds 0 1 --variants swaps         # about 6 minutes per seed
    python benchmarks/drift_grain_channel.py --seeds 0 1 --variants window-mean   # about 8 minutes per seed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402
from drift_level import default_pools, detector, print_halves  # noqa: E402
from drift_shift_directions import _inputs  # noqa: E402

from flywheel.component.log import _texture_fit_pick  # noqa: E402
from flywheel.core.data import load_splits  # noqa: E402
from flywheel.monitoring.drift import (  # noqa: E402
    SHIFT_CHANNEL,
    NoveltyDriftDetector,
    _exceedance_p,
    _min_exceedance_p,
    _min_p_p_value,
    _split_squares,
)

MIN_STD = 0.02  # of the [0, 1] pixel range: flatter patches carry no grain


def _patches(images: np.ndarray) -> np.ndarray:
    return sliding_window_view(images.astype(np.float64) / 255, (3, 3), axis=(1, 2)).reshape(len(images), -1, 9)


def grain_mask(train_images: np.ndarray) -> np.ndarray:
    """The least-variance direction of the textured 3x3 patches of 2000 of the texture model's training images."""
    p = _patches(train_images[_texture_fit_pick(train_images)][:2000]).reshape(-1, 9)
    p = p[p.std(1) > MIN_STD]
    p = p - p.mean(1, keepdims=True)
    return np.linalg.eigh(p.T @ p / len(p))[1][:, 1]  # [:, 0] is the constant patch, which centring removed


def grain_scores(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(images), 2000):
        p = _patches(images[i:i + 2000])
        textured = p.std(2) > MIN_STD
        centred = p - p.mean(2, keepdims=True)
        share = (centred @ mask) ** 2 / ((centred ** 2).sum(2) + 1e-12)
        out.append((share * textured).sum(1) / np.maximum(textured.sum(1), 1))
    return np.concatenate(out)


def _leave_one_out_p(values: np.ndarray) -> np.ndarray:
    """Each value's conformal p-value against the other n - 1: (1 + #others >= it) / n."""
    s = np.sort(values)
    return (len(s) - np.searchsorted(s, values, side="left")) / len(s)


def _fit(pools, draw: np.ndarray, seed: int, rank_simulations: int | None) -> NoveltyDriftDetector:
    """The six-channel detector these entries start from: the residual column of the pools' pixel scores
    only, not the product's grain channel, which the variants here add by hand."""
    return detector(seed, rank_simulations).fit(
        pools.ref_emb[draw], input_reference=pools.features(pools.ref_inp[draw], pools.ref_pix[draw, :1]),
        texture=pools.texture, directions=pools.directions, subspace=pools.subspace)


SWAPPED = ("direction", "magnitude", "input", "texture", SHIFT_CHANNEL, "residual")
WINDOW_MEAN_CLIPS = (None, 3.0, 2.0)  # training standard deviations; None: the raw score
GRAIN_SHARES = (7, 20, 50, 100)  # the grain channel tested at alpha / this, the six at the rest of alpha


def decisions(det: NoveltyDriftDetector, u: dict, ref_grain: np.ndarray, ref_res: np.ndarray,
              grain_all: np.ndarray, idx: np.ndarray, variants: str = "entry12",
              train_grain: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
    """Window p-values (B,) of the built detector and of `variants`' detectors for windows `idx` (B, W) of the
    pool: "entry12", the seventh channel and the two merges; "swaps", the grain channel in place of each of
    the six channels in turn; "window-mean", the grain's window mean as a third statistic of the texture-shift
    channel (`train_grain`: the training images' grain mean and standard deviation, for the clip); "weighted",
    the seventh channel with weighted Bonferroni: at alpha / s for s in GRAIN_SHARES, the six sharing the rest.
    Rows ending in "alone" are one channel at its Bonferroni share, for the level."""
    p, per = det.window_p_values({c: v[idx] for c, v in u.items()})

    def bonferroni(d):
        return np.minimum(1.0, len(d) * np.min(list(d.values()), axis=0))

    out = {"built": p}
    if variants == "window-mean":
        for clip in WINDOW_MEAN_CLIPS:
            name = "window mean" + (f", clip {clip:g}" if clip else "")
            shift = window_mean_p_values(det, ref_grain, u[SHIFT_CHANNEL][idx], grain_all[idx], clip, train_grain)
            out[name] = bonferroni({**per, SHIFT_CHANNEL: shift})
            out[name + " alone (x6)"] = 6 * shift
        out["texture_shift alone (x6)"] = 6 * per[SHIFT_CHANNEL]
        return out
    u_grain = _exceedance_p(np.sort(ref_grain), grain_all)
    grain = det.tail_p_values(u_grain[idx])
    if variants == "weighted":
        six = np.min(np.stack(list(per.values())), axis=0) * len(per)  # Bonferroni over the six, as built
        for share in GRAIN_SHARES:
            out[f"grain at alpha/{share}"] = np.minimum(1.0, np.minimum(six / (1 - 1 / share), grain * share))
            out[f"grain at alpha/{share} alone"] = np.minimum(1.0, grain * share)
        return out
    if variants == "swaps":
        for c in SWAPPED:
            out[f"grain for {c}"] = bonferroni({**{k: v for k, v in per.items() if k != c}, "grain": grain})
        return out
    ref_p = _leave_one_out_p(ref_res), _leave_one_out_p(ref_grain)
    u_merged = _exceedance_p(np.sort(-np.minimum(*ref_p)), -np.minimum(u["residual"], u_grain))
    u_fisher = _exceedance_p(np.sort(-np.log(ref_p[0] * ref_p[1])), -np.log(u["residual"] * u_grain))
    seven = {**per, "grain": grain}
    others = {c: v for c, v in per.items() if c != "residual"}
    merged = {**others, "pixel": det.tail_p_values(u_merged[idx])}
    fisher = {**others, "pixel": det.tail_p_values(u_fisher[idx])}
    return out | {"+grain": bonferroni(seven), "merged": bonferroni(merged), "fisher": bonferroni(fisher),
                  "grain alone (x7)": 7 * seven["grain"], "merged pixel alone (x6)": 6 * merged["pixel"],
                  "fisher pixel alone (x6)": 6 * fisher["pixel"]}


def window_mean_p_values(det: NoveltyDriftDetector, ref_grain: np.ndarray, vectors: np.ndarray,
                         grain: np.ndarray, clip: float | None, train_grain: tuple[float, float]) -> np.ndarray:
    """The texture-shift channel with a third statistic, the window's mean grain less the reference's (one-sided:
    noise adds grain; standardised by the training images' and clipped at +-`clip` where given): its p-value
    is the min of the three statistics' p-values, calibrated by the null of that min from random w-subsets of
    the reference against the rest, as the channel's own two (`NoveltyDriftDetector._shift_null`)."""
    def scaled(g):
        z = (g - train_grain[0]) / train_grain[1]
        return z if clip is None else np.clip(z, -clip, clip)

    ref_grain, grain, w = scaled(ref_grain), scaled(grain), vectors.shape[1]
    nulls = det.__dict__.setdefault("_window_mean_nulls", {})  # per reference draw, like the channel's own
    if (w, clip) not in nulls:
        ref = np.hstack([det.shift_reference, ref_grain[:, None]])
        n, total, rng, null = len(ref), ref.sum(0), np.random.default_rng([det.seed, w, 3]), []
        for start in range(0, det.shift_simulations, 1000):
            b = min(1000, det.shift_simulations - start)
            sums = ref[np.argpartition(rng.random((b, n)), w - 1, axis=1)[:, :w]].sum(1)
            d = sums / w - (total - sums) / (n - w)
            null.append(np.column_stack([_split_squares(d[:, :-1], det.texture.columns), d[:, -1]]))
        null = np.concatenate(null)
        sorted_null = np.sort(null, axis=0)
        nulls[w, clip] = sorted_null, np.sort(_min_exceedance_p(sorted_null, null))
    sorted_null, null_min_p = nulls[w, clip]
    d = np.asarray(vectors, dtype=np.float64).mean(1) - det.shift_centre
    stats = np.column_stack([_split_squares(d, det.texture.columns), grain.mean(1) - ref_grain.mean()])
    return _min_p_p_value(null_min_p, _min_exceedance_p(sorted_null, stats))


def _train_grain(images, mask: np.ndarray) -> tuple[float, float]:
    """The mean and standard deviation of the last 20000 training images' grain (the window-mean clip's unit)."""
    g = grain_scores(images.train[-20000:], mask)
    return float(g.mean()), float(g.std())


def detection(pools, images, seed: int, rank_simulations: int | None = None, variants: str = "entry12") -> None:
    keys = list(pools.shifted)
    mask = grain_mask(images.train)
    train_grain = _train_grain(images, mask) if variants == "window-mean" else (0.0, 1.0)
    ref_grain = grain_scores(images.val, mask)
    shifted_grain = {k: grain_scores(bench.corrupted(images.source, *k, images.cache), mask) for k in keys}
    offsets, off = {}, len(pools.clean_emb)
    for k in keys:
        offsets[k] = (off, len(shifted_grain[k]))
        off += len(shifted_grain[k])
    emb = np.concatenate([pools.clean_emb] + [pools.shifted[k][0] for k in keys])
    inp = np.concatenate([pools.features(pools.clean_inp, pools.clean_pix[:, :1])]
                         + [pools.features(pools.shifted_inp[k], pools.shifted_pix[k][:, :1]) for k in keys])
    grain_all = np.concatenate([grain_scores(images.clean, mask)] + [shifted_grain[k] for k in keys])
    counts = bench.FULL
    rng = np.random.default_rng([seed, 1])  # drift.py's reference draws of this seed
    draws = np.stack([rng.choice(len(pools.ref_emb), 1000, replace=False) for _ in range(counts.refs)])
    goal = [k for k in keys if pools.accuracy_cost[k] >= bench.GOAL["accuracy_cost"]]
    for w in bench.WINDOWS:
        plan = bench.make_plan(np.random.default_rng([seed, w]), len(pools.clean_emb), offsets, w, counts)
        flags: dict[str, dict] = {}
        for r, draw in enumerate(draws):
            det = _fit(pools, draw, seed, rank_simulations)
            u = _inputs(det, emb, inp)
            sets = [("clean", plan.clean[np.arange(r, len(plan.clean), counts.refs)])]
            if w == 100:
                sets += [(k, plan.shifted[(*k, 0.2)][np.arange(r, counts.shifted, counts.refs)]) for k in keys]
            for name, idx in sets:
                for d, p in decisions(det, u, ref_grain[draw], pools.ref_pix[draw, 0], grain_all, idx, variants,
                                      train_grain).items():
                    if variants != "entry12" or "alone" not in d:  # entry 12 printed its channels alone for the level only
                        flags.setdefault(d, {k: [] for k in ["clean", *keys]})[name] += list(p < bench.ALPHA)
        for d, f in flags.items():
            if w == 100:
                print_halves(f, goal, f"seed {seed} W={w} {d:6s}")
            else:
                print(f"seed {seed} W={w} {d:6s} false alarms {np.mean(f['clean']):.4f} of {len(f['clean'])}",
                      flush=True)


def level(pools, images, draws: int, seed: int = 0, rank_simulations: int | None = None,
          variants: str = "entry12") -> None:
    mask = grain_mask(images.train)
    train_grain = _train_grain(images, mask) if variants == "window-mean" else (0.0, 1.0)
    ref_grain, clean_grain = grain_scores(images.val, mask), grain_scores(images.clean, mask)
    rng, rates = np.random.default_rng(seed), {}
    for _ in range(draws):
        draw = rng.choice(len(pools.ref_emb), 1000, replace=False)
        det = _fit(pools, draw, seed, rank_simulations)
        u = det.window_inputs(pools.clean_emb, pools.features(pools.clean_inp, pools.clean_pix[:, :1]))
        for w in bench.WINDOWS:
            idx = np.stack([rng.choice(len(pools.clean_emb), w, replace=False) for _ in range(1000)])
            for d, p in decisions(det, u, ref_grain[draw], pools.ref_pix[draw, 0], clean_grain, idx, variants,
                                  train_grain).items():
                rates.setdefault((w, d), []).append(float(np.mean(p < bench.ALPHA)))
    print("| W | decision | false alarms | s.e. over draws |")
    print("|---|---|---|---|")
    for (w, d), r in rates.items():
        r = np.asarray(r)
        print(f"| {w} | {d} | {r.mean():.4f} | {r.std(ddof=1) / np.sqrt(len(r)):.4f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[], help="detection and false alarms on drift.py's "
                    "windows of these seeds")
    ap.add_argument("--draws", type=int, default=0, help="the level over this many reference draws (0: skip)")
    ap.add_argument("--rank-simulations", type=int, default=None,
                    help="simulations of the tail-count channels' rank null (default: the detector's own, 20000)")
    ap.add_argument("--variants", choices=("entry12", "swaps", "window-mean", "weighted"), default="entry12",
                    help="entry12: the seventh channel and the two merges (the twelfth entry); swaps: the grain "
                         "channel in place of each channel; window-mean: the grain's window mean in the "
                         "texture-shift channel; weighted: the seventh channel at a smaller share of alpha "
                         "(the last three, the thirteenth)")
    args = ap.parse_args(argv)
    pools = default_pools()
    s = load_splits("fashion-mnist", seed=0)
    source = s.test.images[:3000]  # drift.py's shift source, and its corrupted copies' cache
    cache = bench.CACHE_ROOT / f"images-{bench._digest((bench.SRC / 'core/shifts.py').read_bytes(), source.tobytes())}"
    images = argparse.Namespace(train=s.train.images, val=s.val.images, clean=s.test.images[3000:], source=source,
                                cache=cache)
    for seed in args.seeds:
        detection(pools, images, seed, args.rank_simulations, args.variants)
    if args.draws:
        level(pools, images, args.draws, rank_simulations=args.rank_simulations, variants=args.variants)


if __name__ == "__main__":
    main()
