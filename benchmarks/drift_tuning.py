"""Tuning-half comparison of magnitude-channel variants of `NoveltyDriftDetector`, and of the monitor's
combined test, on the windows of benchmarks/drift.py (--seed 1 by the protocol; W=100, 20% shifted).

It scores only the TUNING families (and clean windows for false alarms) and prints nothing about the
held-out half, so it can be run before a design decision without seeing held-out results. Variants:
  design         the detector as shipped: direction + one-sided magnitude (short embeddings are novel)
  two-sided      magnitude scored as |log-norm - the reference's median log-norm|
  three-channel  direction, short-norm and long-norm channels, Bonferroni over three
  input          the design plus the input channel (kNN novelty of `contracts.reference.input_statistics`
                 of the preprocessed images), Bonferroni over three: what ships since the third
                 2026-12-02 entry (the variants of that channel: benchmarks/drift_tuning_input.py)
each also as the monitor combines it (`monitor`: Bonferroni with the prediction-drift chi-square p-value).
Used for the 2026-12-02 entries of the design log in benchmarks/drift.py:

    python benchmarks/drift_tuning.py --seed 1 [--variants design input]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402

from flywheel.monitoring.drift import NoveltyDriftDetector, _log_norm, prediction_drift  # noqa: E402


class TwoSided(NoveltyDriftDetector):
    def fit(self, reference, classes=None, input_reference=None, texture=None):
        super().fit(reference, classes)
        self.median = float(np.median(_log_norm(reference)))
        self.calibration["magnitude"] = np.sort(np.abs(_log_norm(reference) - self.median))
        return self

    def scores(self, x, inputs=None):
        return {"direction": super().scores(x)["direction"], "magnitude": np.abs(_log_norm(x) - self.median)}


class ThreeChannel(NoveltyDriftDetector):
    EMBEDDING_CHANNELS = ("direction", "magnitude", "magnitude_high")

    def fit(self, reference, classes=None, input_reference=None, texture=None):
        super().fit(reference, classes)
        self.calibration["magnitude_high"] = np.sort(_log_norm(reference))
        return self

    def scores(self, x, inputs=None):
        return {**super().scores(x), "magnitude_high": _log_norm(x)}


class Design(NoveltyDriftDetector):
    """The two embedding channels alone (the detector before the input channel)."""

    def fit(self, reference, classes=None, input_reference=None, texture=None):
        return super().fit(reference, classes)


VARIANTS = {"design": Design, "two-sided": TwoSided, "three-channel": ThreeChannel, "input": NoveltyDriftDetector}


def tuning_windows(pools, seed: int, window: int, counts):
    """(offsets, reference draws, window plan, tuning pairs): the same reference draws and windows as
    bench.run at this seed, and the TUNING (family, severity) pairs costing >= 3 points, the only
    shifted ones a tuning script scores."""
    from flywheel.core.shifts import FAMILIES, SEVERITIES

    offsets, off = {}, len(pools.clean_emb)
    for k in [(f, s) for f in FAMILIES for s in SEVERITIES]:
        offsets[k] = (off, len(pools.shifted[k][0]))
        off += len(pools.shifted[k][0])
    rng = np.random.default_rng([seed, 1])
    ref_size = min(1000, len(pools.ref_emb) // 2)
    draws = np.stack([rng.choice(len(pools.ref_emb), ref_size, replace=False) for _ in range(counts.refs)])
    plan = bench.make_plan(np.random.default_rng([seed, window]), len(pools.clean_emb), offsets, window, counts)
    tune = [k for k in offsets if k[0] in bench.TUNING and pools.accuracy_cost[k] >= bench.GOAL["accuracy_cost"]]
    return offsets, draws, plan, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants}
    counts, seed, window, contamination = bench.FULL, args.seed, 100, 0.2
    model_uri, tracking_uri, key = bench.cached_fashion_model(None)
    shifts_key = bench._digest((bench.SRC / "core/shifts.py").read_bytes(), str(counts.source).encode())
    pools = bench.build_pools(model_uri, tracking_uri, bench.CACHE_ROOT / f"{key}-emb-{shifts_key}", counts,
                              fashion=True)
    offsets, draws, plan, tune = tuning_windows(pools, seed, window, counts)
    n_clean = len(pools.clean_emb)
    emb, prob, inp, local = [pools.clean_emb], [pools.clean_prob], [pools.clean_inp], {}
    at = n_clean
    for k in tune:
        local[k] = at
        emb.append(pools.shifted[k][0])
        prob.append(pools.shifted[k][1])
        inp.append(pools.shifted_inp[k])
        at += len(pools.shifted[k][0])
    emb, pred, inp = np.concatenate(emb), np.concatenate(prob).argmax(1), np.concatenate(inp)
    n_classes = pools.ref_prob.shape[1]

    def windows_of(k):
        w = plan.shifted[(*k, contamination)].copy()
        w[w >= n_clean] += local[k] - offsets[k][0]
        return w

    settings = {"clean": plan.clean, **{k: windows_of(k) for k in tune}}
    flags = {(v, m): {s: np.zeros(len(w), bool) for s, w in settings.items()}
             for v in variants for m in ("embedding", "monitor")}
    t0 = time.perf_counter()
    for r in range(counts.refs):
        ref_counts = np.bincount(pools.ref_prob[draws[r]].argmax(1), minlength=n_classes)
        p_pred = {s: np.array([prediction_drift(np.bincount(pred[x], minlength=n_classes)[:n_classes],
                                                ref_counts).p_value for x in w[r::counts.refs]])
                  for s, w in settings.items()}
        for v, cls in variants.items():
            det = cls(seed=seed).fit(pools.ref_emb[draws[r]], input_reference=pools.ref_inp[draws[r]],
                                    texture=pools.texture)
            u = {c: np.concatenate([det.p_values(emb[i:i + 4000], inp[i:i + 4000])[c] for i in range(0, len(emb), 4000)])
                 for c in det.CHANNELS}
            for s, w in settings.items():
                p = det.window_p_values({c: x[w[r::counts.refs]] for c, x in u.items()})[0]
                flags[(v, "embedding")][s][r::counts.refs] = p < bench.ALPHA
                flags[(v, "monitor")][s][r::counts.refs] = np.minimum(1, 2 * np.minimum(p, p_pred[s])) < bench.ALPHA
        print(f"reference draw {r + 1}/{counts.refs}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"tuning half, seed {seed}, W={window}, {contamination:.0%} shifted, {len(tune)} pairs costing >= 3 points:")
    for (v, m), f in flags.items():
        det = {k: f[k].mean() for k in tune}
        missed = ", ".join(f"{k[0]}-{k[1]} {d:.2f}" for k, d in det.items() if d < bench.GOAL["detection"])
        print(f"{v:13s} {m:9s} {sum(d >= bench.GOAL['detection'] for d in det.values())} of {len(tune)} pairs >= 0.95, "
              f"mean {np.mean(list(det.values())):.3f}, false alarms {f['clean'].mean():.4f} of {len(f['clean'])}; "
              f"missed: {missed}")


if __name__ == "__main__":
    main()
