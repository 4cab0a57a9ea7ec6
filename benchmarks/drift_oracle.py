"""What a detector could do on the monitor's own signals if it knew the shift in advance: a bound for the
held-out misses of benchmarks/drift.py, not a detector.

For each (family, severity) costing >= 3 points: a gradient-boosted classifier (scikit-learn's
HistGradientBoostingClassifier) is trained on 1500 labelled clean and 1500 labelled shifted samples
and scored on another 1500 of each, on three sets of per-sample signals the monitor has: the model's
embedding (and its log norm) with its softmax outputs; the input statistics
(`flywheel.contracts.reference.input_statistics`); both. Its per-sample AUC is what a detector told
the family, and which way it moves these signals, can reach; `NoveltyDriftDetector` is told
neither, and its best channel's per-sample AUC (novelty score, shifted against clean) is printed
beside it. Then the Neyman-Pearson window test: the classifier's likelihood ratio turned into the
80/20 mixture's log-likelihood ratio, summed over a window of W=100 with 20 shifted samples, its
threshold the 99% quantile of clean windows: its detection rate bounds every window test on those
signals at alpha 0.01 (up to the classifier's estimation error).

    python benchmarks/drift_oracle.py                # the held-out half; about 10 minutes on 2 cores
    python benchmarks/drift_oracle.py --half tuning
    python benchmarks/drift_oracle.py --patch        # + a local-patch novelty score's AUC (~3 more minutes)
    python benchmarks/drift_oracle.py --exposure     # + classifiers told the tuning half (~2 more minutes)

`--patch` adds one more label-free score, not in the detector: each 5x5 patch of the preprocessed image
against its nearest patch of the reference images (PatchCore's memory bank, Roth et al., CVPR 2022,
on pixels rather than CNN features, a random 10,000 of the reference's patches), the image scored by
its three most novel patches; per-sample AUC on the first 1500 clean and 1500 shifted images. It is
the standard label-free detector of local defects, tried for the held-out families that are local
(lines, spatter, noise).

`--exposure` adds the label-free version of the told-the-shift classifier: the same gradient boosting, trained
to tell clean training images (the texture model's 5000) from 1500 other training images through each of the
27 TUNING (family, severity) pairs, never a held-out family (outlier exposure, Hendrycks et al., ICLR 2019,
with the tuning corruptions as the outliers), on `ShiftDirections.vectors`, on the embedding and softmax, or
on both; its score's per-sample AUC, clean test images against the first 3000 shifted ones. What a channel
trained on the tuning corruptions could add on the held-out half.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402
from drift_level import default_pools  # noqa: E402

from flywheel.contracts.reference import split_image_features  # noqa: E402
from flywheel.monitoring.drift import NoveltyDriftDetector  # noqa: E402


def signals(emb: np.ndarray, prob: np.ndarray, inp: np.ndarray, texture=None) -> dict[str, np.ndarray]:
    """`inp`: image features; the input statistics are those before the texture model's columns."""
    inp = split_image_features(inp, texture)[0]
    model = np.hstack([emb, np.log(np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9), np.log(prob + 1e-9)])
    return {"embedding+softmax": model, "input statistics": inp, "all": np.hstack([model, inp])}


def auc(clean: np.ndarray, shifted: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(shifted))], np.r_[clean, shifted]))


def patch_novelty(reference: np.ndarray, images: np.ndarray, spec, size: int = 5, stride: int = 2,
                  bank: int = 10_000, seed: int = 0) -> np.ndarray:
    """Per image: the mean of its 3 largest nearest-reference-patch distances (see the module docstring)."""
    from flywheel.contracts.preprocessing import to_array

    def patches(x: np.ndarray) -> np.ndarray:
        a = to_array(x, spec)[:, 0]  # (N, H, W) normalised, the model's input
        w = np.lib.stride_tricks.sliding_window_view(a, (size, size), axis=(1, 2))[:, ::stride, ::stride]
        return np.ascontiguousarray(w.reshape(len(a), -1, size * size), dtype=np.float32)

    pool = patches(reference).reshape(-1, size * size)
    memory = pool[np.random.default_rng(seed).choice(len(pool), min(bank, len(pool)), replace=False)]
    norms = (memory ** 2).sum(1)
    out = []
    for i in range(0, len(images), 200):
        q = patches(images[i:i + 200])
        flat = q.reshape(-1, q.shape[2])
        d2 = (flat ** 2).sum(1)[:, None] - 2 * flat @ memory.T + norms[None]
        nearest = np.sqrt(np.maximum(d2.min(1), 0)).reshape(len(q), -1)
        out.append(np.sort(nearest, 1)[:, -3:].mean(1))
    return np.concatenate(out)


def exposure(pools, per_pair: int = 1500):
    """`--exposure`: classifiers trained to tell clean training images from training images through the
    TUNING corruptions (outlier exposure, Hendrycks et al., ICLR 2019, with the tuning half as the outliers),
    never told a held-out family. Returns score(emb, prob, inp) -> {signal: per-sample score}."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from flywheel.contracts.preprocessing import to_array
    from flywheel.contracts.reference import TEXTURE_FIT_SAMPLES, image_features
    from flywheel.core.data import load_splits
    from flywheel.core.evaluate import predict
    from flywheel.core.models import load_model
    from flywheel.core.shifts import SEVERITIES, TUNING_FAMILIES, corrupt_images

    model_uri, tracking_uri, _ = bench.cached_fashion_model(None)
    model, spec = load_model(model_uri, tracking_uri=tracking_uri)
    train = load_splits("fashion-mnist", seed=0).train.images
    order = np.random.default_rng(0).permutation(len(train))
    clean = train[np.sort(order[:TEXTURE_FIT_SAMPLES])]  # the texture model's pick (component.log)
    base = train[np.sort(order[TEXTURE_FIT_SAMPLES:TEXTURE_FIT_SAMPLES + per_pair])]  # other images

    def signal_sets(images: np.ndarray) -> dict[str, np.ndarray]:
        logits, emb = predict(model, images, spec, with_embeddings=True)
        inp = np.concatenate([image_features(to_array(images[i:i + 1000], spec.preprocess), pools.texture)
                              for i in range(0, len(images), 1000)])
        return vectors(emb, bench._softmax(logits), inp)

    def vectors(emb, prob, inp) -> dict[str, np.ndarray]:
        model_part = signals(emb, prob, inp, pools.texture)["embedding+softmax"]
        image_part = pools.directions.vectors(inp, pools.texture)
        return {"shift vectors": image_part, "embedding+softmax": model_part, "both": np.hstack([image_part, model_part])}

    shifted = [signal_sets(corrupt_images(base, f, s, seed=1)) for f in TUNING_FAMILIES for s in SEVERITIES]
    ok = signal_sets(clean)
    fitted = {}
    for name in ok:
        x = np.vstack([ok[name]] + [s[name] for s in shifted])
        y = np.r_[np.zeros(len(ok[name])), np.ones(len(x) - len(ok[name]))]
        weight = np.where(y == 1, len(ok[name]) / (len(x) - len(ok[name])), 1.0)  # balanced classes
        fitted[name] = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, random_state=0).fit(
            x, y, sample_weight=weight)
    return lambda emb, prob, inp: {n: fitted[n].decision_function(v) for n, v in vectors(emb, prob, inp).items()}


def oracle(clean: np.ndarray, shifted: np.ndarray, rng: np.random.Generator, half: int = 1500) -> tuple[float, float]:
    """(per-sample AUC, Neyman-Pearson window detection at W=100, 20 shifted, alpha 0.01)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    x = np.vstack([clean[:half], shifted[:half]])
    y = np.r_[np.zeros(half), np.ones(half)]
    clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, random_state=0).fit(x, y)
    pc, ps = (np.clip(clf.predict_proba(z[half:2 * half])[:, 1], 1e-4, 1 - 1e-4) for z in (clean, shifted))
    # balanced classes: p / (1 - p) is the per-sample likelihood ratio; the window's is of 0.8 clean + 0.2 shifted
    lc, ls = np.log(0.8 + 0.2 * pc / (1 - pc)), np.log(0.8 + 0.2 * ps / (1 - ps))
    null = rng.choice(lc, (20000, 100)).sum(1)
    alt = rng.choice(lc, (5000, 80)).sum(1) + rng.choice(ls, (5000, 20)).sum(1)
    return auc(pc, ps), float(np.mean(alt > np.quantile(null, 1 - bench.ALPHA)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", choices=("held-out", "tuning"), default="held-out", help="which families")
    ap.add_argument("--patch", action="store_true", help="also the local-patch novelty score's per-sample AUC")
    ap.add_argument("--exposure", action="store_true",
                    help="also the per-sample AUC of classifiers trained on the TUNING corruptions (outlier exposure)")
    args = ap.parse_args(argv)
    pools = default_pools()
    families = bench.HELD_OUT if args.half == "held-out" else bench.TUNING
    rng = np.random.default_rng(0)
    draw = rng.choice(len(pools.ref_emb), 1000, replace=False)
    det = NoveltyDriftDetector().fit(pools.ref_emb[draw], input_reference=pools.ref_inp[draw], texture=pools.texture)
    clean_scores = det.scores(pools.clean_emb, pools.clean_inp)
    clean_signals = signals(pools.clean_emb[:3000], pools.clean_prob[:3000], pools.clean_inp[:3000], pools.texture)
    print(f"{pools.where}; {args.half} pairs costing >= 3 points; per-sample AUC, and in brackets the "
          "window detection at W=100, 20% shifted, alpha 0.01")
    if args.patch:
        from flywheel.contracts.preprocessing import PreprocessSpec
        from flywheel.core.data import load_splits

        splits, spec = load_splits("fashion-mnist", seed=0), PreprocessSpec()  # the pools' images (drift.py)
        source = splits.test.images[:3000]
        images_cache = bench.CACHE_ROOT / f"images-{bench._digest((bench.SRC / 'core/shifts.py').read_bytes(), source.tobytes())}"
        reference = splits.val.images[draw]
        clean_patch = patch_novelty(reference, splits.test.images[3000:4500], spec)
    if args.exposure:
        exposed = exposure(pools)
        clean_exposed = exposed(pools.clean_emb[:3000], pools.clean_prob[:3000], pools.clean_inp[:3000])
    print("| pair | cost | flywheel's best channel, told nothing: AUC | told the shift: embedding+softmax | "
          "input statistics | all |" + (" local patches, told nothing: AUC |" if args.patch else "")
          + (" told the tuning half: shift vectors | embedding+softmax | both |" if args.exposure else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.patch else "") + ("---|---|---|" if args.exposure else ""))
    for key, (emb, prob) in pools.shifted.items():
        if key[0] not in families or pools.accuracy_cost[key] < bench.GOAL["accuracy_cost"]:
            continue
        inp = pools.shifted_inp[key]
        scores = det.scores(emb, inp)
        best = max(((auc(clean_scores[c], scores[c]), c) for c in scores))
        told = {name: oracle(clean_signals[name], s, rng) for name, s in signals(emb, prob, inp, pools.texture).items()}
        patch = ""
        if args.patch:
            shifted_images = bench.corrupted(source, key[0], key[1], images_cache)[:1500]
            patch = f" {auc(clean_patch, patch_novelty(reference, shifted_images, spec)):.2f} |"
        if args.exposure:
            patch += "".join(f" {auc(clean_exposed[n], v):.2f} |" for n, v in exposed(emb, prob, inp).items())
        print(f"| {key[0]}-{key[1]} | {100 * pools.accuracy_cost[key]:.1f} | {best[0]:.2f} ({best[1]}) | "
              + " | ".join(f"{a:.2f} ({d:.2f})" for a, d in told.values()) + " |" + patch, flush=True)


if __name__ == "__main__":
    main()
