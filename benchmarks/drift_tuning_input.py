# ruff: noqa: E402, E702, B023  -- the exploration script as it was run for the design log, kept verbatim
"""Tuning-half comparison of input-channel variants for `NoveltyDriftDetector` (benchmarks/drift.py's third
2026-12-02 design-log entry): per-image statistics of the preprocessed images, robust-standardised
against the reference draw, kNN novelty with leave-one-out calibration, the same tail-count window
test; shown alone (`input-only`) and with the two embedding channels, Bonferroni over three (`3ch`).

Seed 1, W=100, 20% shifted, the TUNING pairs costing >= 3 points and 10,000 clean windows, the same
reference draws and windows as benchmarks/drift.py and drift_tuning.py; nothing of the held-out half is
scored or printed (the reference draws and windows come from drift_tuning.tuning_windows, which this
script built inline when it was run). Statistic sets (columns of `statistics` below):
  moments   per-channel mean and std, 5/25/50/75/95% intensity quantiles
  texture   log gradient and Laplacian energy, each relative to the signal
  geometry  intensity-weighted centroid and second moments
and unions of those; `robust` scales by median / MAD (std + 1e-9 where the MAD is 0), `std` by mean / std.
The chosen set, `noq+q05` (no quantile but the 5%), k=3, robust, is what
`flywheel.contracts.reference.input_statistics` computes (same formulas, other column order) and
`NoveltyDriftDetector(...).fit(..., input_reference=...)` scores.

    python benchmarks/drift_tuning_input.py         # about 8 minutes on 2 shared cores
    python benchmarks/drift_tuning_input.py noise   # the fourth design-log round: median-filter residuals
                                                    # and max-|z| scoring (also prints the tuning pairs
                                                    # costing < 3 points); a few minutes
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402
from drift_tuning import tuning_windows  # noqa: E402

from flywheel.contracts.preprocessing import to_array  # noqa: E402
from flywheel.monitoring.drift import (  # noqa: E402
    NoveltyDriftDetector,
    _exceedance_p,
)


def statistics(x):
    """x: (N, C, H, W) float preprocessed -> (N, F) float64 per-image statistics, names."""
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    feats, names = [], []
    flat = x.reshape(n, c, h * w)
    for ch in range(c):
        feats += [flat[:, ch].mean(1), flat[:, ch].std(1)]
        names += [f"mean{ch}", f"std{ch}"]
    g = x.mean(1)  # (N, H, W) intensity
    gf = g.reshape(n, -1)
    q = np.quantile(gf, (0.05, 0.25, 0.5, 0.75, 0.95), axis=1)
    feats += list(q)
    names += ["q05", "q25", "q50", "q75", "q95"]
    var = gf.var(1) + 1e-6
    dy, dx = np.diff(g, axis=1), np.diff(g, axis=2)
    grad = (dy ** 2).mean((1, 2)) + (dx ** 2).mean((1, 2))
    lap = g[:, 1:-1, 1:-1] * 4 - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    lap = (lap ** 2).mean((1, 2))
    feats += [np.log(grad + 1e-6), np.log(lap + 1e-6), np.log((grad + 1e-6) / var), np.log((lap + 1e-6) / (grad + 1e-6))]
    names += ["log_grad", "log_lap", "grad_rel", "lap_rel"]
    wgt = gf - gf.min(1, keepdims=True)
    tot = wgt.sum(1) + 1e-6
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    cy, cx = wgt @ yy / tot, wgt @ xx / tot
    vy = wgt @ (yy ** 2) / tot - cy ** 2
    vx = wgt @ (xx ** 2) / tot - cx ** 2
    cxy = wgt @ (yy * xx) / tot - cx * cy
    feats += [cy, cx, vy, vx, cxy]
    names += ["cy", "cx", "vy", "vx", "cxy"]
    # median-filter residual: what a 3x3 median removes (isolated pixels, thin lines), edges kept
    pad = np.pad(g, ((0, 0), (1, 1), (1, 1)), mode="edge")
    nb = np.stack([pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
    res = np.abs(g - np.median(nb, -1)).reshape(n, -1)
    rng_ = gf.max(1) - gf.min(1) + 1e-6
    feats += [np.log(res.mean(1) + 1e-6), np.log(res.mean(1) / rng_ + 1e-6), (res > 0.1 * rng_[:, None]).mean(1),
              np.log(np.quantile(res, 0.9, axis=1) + 1e-6)]
    names += ["medres", "medres_rel", "medfrac", "medres_q90"]
    return np.stack(feats, 1).astype(np.float64), names


ROUND = sys.argv[1] if len(sys.argv) > 1 else "sets"  # "noise": the second round
seed, window, contamination, counts = 1, 100, 0.2, bench.FULL
model_uri, tracking_uri, key = bench.cached_fashion_model(None)
shifts_key = bench._digest((bench.SRC / "core/shifts.py").read_bytes(), str(counts.source).encode())
pools = bench.build_pools(model_uri, tracking_uri, bench.CACHE_ROOT / f"{key}-emb-{shifts_key}", counts, fashion=True)
from flywheel.core.models import load_model

spec = load_model(model_uri, tracking_uri=tracking_uri)[1].preprocess
ref_img, clean_img, source, labels, _ = bench._images(None, None, None)
images_cache = bench.CACHE_ROOT / f"images-{bench._digest((bench.SRC / 'core/shifts.py').read_bytes(), source.tobytes())}"
def st(imgs):
    return np.concatenate([statistics(to_array(imgs[i:i + 5000], spec))[0] for i in range(0, len(imgs), 5000)])
names = statistics(to_array(ref_img[:2], spec))[1]
offsets, draws, plan, tune = tuning_windows(pools, seed, window, counts)
n_clean = len(pools.clean_emb)
t0 = time.time()
ref_st = st(ref_img)
emb, stat, local, at = [pools.clean_emb], [st(clean_img)], {}, n_clean
extra = [k for k in offsets if k[0] in bench.TUNING and k not in tune]
for k in tune + extra:
    local[k] = at; emb.append(pools.shifted[k][0])
    stat.append(st(bench.corrupted(source, k[0], k[1], images_cache))); at += len(pools.shifted[k][0])
emb, stat = np.concatenate(emb), np.concatenate(stat)
print(f"stats {stat.shape} in {time.time() - t0:.0f} s", flush=True)

def windows_of(k):
    w = plan.shifted[(*k, contamination)].copy(); w[w >= n_clean] += local[k] - offsets[k][0]; return w
settings = {"clean": plan.clean, **{k: windows_of(k) for k in tune + extra}}

SETS = {
    "moments": ["mean0", "std0", "q05", "q25", "q50", "q75", "q95"],
    "texture": ["log_grad", "log_lap", "grad_rel", "lap_rel"],
    "geometry": ["cy", "cx", "vy", "vx", "cxy"],
}
SETS["moments+texture"] = SETS["moments"] + SETS["texture"]
SETS["all"] = SETS["moments"] + SETS["texture"] + SETS["geometry"]
SETS["all-noq"] = ["mean0", "std0"] + SETS["texture"] + SETS["geometry"]

def knn_loo(r, k):
    d = ((r[:, None, :] - r[None]) ** 2).sum(-1); np.fill_diagonal(d, np.inf)
    return np.sqrt(np.partition(d, k - 1, axis=1)[:, k - 1])
def knn(r, x, k):
    out = []
    rr = (r ** 2).sum(1)
    for i in range(0, len(x), 4000):
        xx = x[i:i + 4000]
        d = (xx ** 2).sum(1)[:, None] + rr[None] - 2 * xx @ r.T
        out.append(np.sqrt(np.maximum(np.partition(d, k - 1, axis=1)[:, k - 1], 0)))
    return np.concatenate(out)
def conformal(cal, s):
    return _exceedance_p(np.sort(cal), s)

SETS["noq+q05"] = SETS["all-noq"] + ["q05"]
SETS["noq+q05+q95"] = SETS["all-noq"] + ["q05", "q95"]
SETS["noq+q05+q50+q95"] = SETS["all-noq"] + ["q05", "q50", "q95"]
SETS["noq+q05+medres"] = SETS["noq+q05"] + ["medres"]
SETS["noq+q05+medres_rel"] = SETS["noq+q05"] + ["medres_rel"]
SETS["noq+q05+medfrac"] = SETS["noq+q05"] + ["medfrac"]
SETS["noq+q05+medres_q90"] = SETS["noq+q05"] + ["medres_q90"]
SETS["noq+q05+med2"] = SETS["noq+q05"] + ["medres", "medres_rel"]
SETS["noq+q05+med4"] = SETS["noq+q05"] + ["medres", "medres_rel", "medfrac", "medres_q90"]
SETS["all+med"] = SETS["all"] + ["medres"]
if ROUND == "noise":  # the second round (design log, 2026-12-02 afternoon): median-filter residuals, max |z| scoring
    VARIANTS = [(s, 3, "robust", "knn") for s in ("noq+q05", "noq+q05+medres", "noq+q05+medres_rel", "noq+q05+medfrac",
                                                 "noq+q05+medres_q90", "noq+q05+med2", "noq+q05+med4")] + [
        ("noq+q05", 3, "robust", "maxz"), ("noq+q05+medres", 3, "robust", "maxz"),
        ("noq+q05", 3, "robust", "both"), ("noq+q05+medres", 3, "robust", "both"),
        ("all", 3, "robust", "maxz"), ("all+med", 3, "robust", "maxz")]
else:  # the first round, as it was run
    VARIANTS = [(s, 3, "robust") for s in ("moments", "texture", "geometry", "moments+texture", "all")] + [
    ("all", 10, "robust"), ("all", 1, "robust"), ("all", 3, "std"),
    ("all-noq", 3, "robust"), ("noq+q05", 3, "robust"), ("noq+q05", 3, "std"), ("noq+q05+q95", 3, "robust"),
            ("noq+q05+q50+q95", 3, "robust"), ("all-noq", 5, "robust"), ("noq+q05", 5, "robust"), ("all-noq", 3, "std")]
    VARIANTS = [(*v, "knn") for v in VARIANTS]
cols = {s: [names.index(n) for n in v] for s, v in SETS.items()}
flags = {v: {s: np.zeros(len(w), bool) for s, w in settings.items()} for v in ["design"] + VARIANTS}
only = {v: {s: np.zeros(len(w), bool) for s, w in settings.items()} for v in VARIANTS}
for r in range(counts.refs):
    det = NoveltyDriftDetector(seed=seed).fit(pools.ref_emb[draws[r]])
    u = {c: np.concatenate([det.p_values(emb[i:i + 4000])[c] for i in range(0, len(emb), 4000)]) for c in det.CHANNELS}
    chan_p = det.tail_p_values
    for s, w in settings.items():
        p = det.window_p_values({c: x[w[r::counts.refs]] for c, x in u.items()})[0]
        flags["design"][s][r::counts.refs] = p < bench.ALPHA
    for v in VARIANTS:
        sset, k, norm, score = v
        R = ref_st[draws[r]][:, cols[sset]]; X = stat[:, cols[sset]]
        if norm == "robust":
            med = np.median(R, 0); sc = 1.4826 * np.median(np.abs(R - med), 0); sc = np.where(sc > 1e-9, sc, R.std(0) + 1e-9)
        else:
            med, sc = R.mean(0), R.std(0) + 1e-9
        Rz, Xz = (R - med) / sc, (X - med) / sc
        if score == "maxz":
            ui = conformal(np.abs(Rz).max(1), np.abs(Xz).max(1))
        else:
            ui = conformal(knn_loo(Rz, k), knn(Rz, Xz, k))
        if score == "both":
            ui2 = conformal(np.abs(Rz).max(1), np.abs(Xz).max(1))
        for s, w in settings.items():
            sel = w[r::counts.refs]
            pe = {c: chan_p(x[sel]) for c, x in u.items()}
            pi = chan_p(ui[sel])
            nch = 3
            if score == "both":
                pi = np.minimum(pi, chan_p(ui2[sel])); nch = 4
            flags[v][s][r::counts.refs] = np.minimum(1, nch * np.minimum(np.minimum(pe["direction"], pe["magnitude"]), pi)) < bench.ALPHA
            only[v][s][r::counts.refs] = np.minimum(1, (nch - 2) * pi) < bench.ALPHA
    print(f"draw {r + 1}: {time.time() - t0:.0f} s", flush=True)
print(f"tuning half, seed {seed}, W={window}, 20% shifted, {len(tune)} pairs costing >= 3 points")
for tag, F in (("3ch", flags), ("input-only", only)):
    for v, f in F.items():
        det_ = {k: f[k].mean() for k in tune}
        missed = ", ".join(f"{k[0]}-{k[1]} {d:.2f}" for k, d in det_.items() if d < 0.95)
        ex = ", ".join(f"{k[0]}-{k[1]} {f[k].mean():.2f}" for k in extra if f[k].mean() < 0.95)
        print(f"    extra tuning pairs (< 3 pt) below 0.95: {ex}")
        print(f"{tag:10s} {str(v):44s} {sum(d >= 0.95 for d in det_.values())} of {len(tune)}, mean {np.mean(list(det_.values())):.3f}, "
              f"fa {f['clean'].mean():.4f}; missed: {missed}", flush=True)
