"""Drift detector benchmark: false alarms, detection under partial contamination, delay, compute time.

Compares, on the same embeddings and the very same windows:
  flywheel  - flywheel.monitoring.drift.NoveltyDriftDetector, what the monitor runs: per-sample conformal p-values of
              two novelty channels (cosine kNN direction, low feature magnitude), a multi-level tail-count
              statistic per channel with an exact rank null, Bonferroni over the channels
  ks-bonf   - plain KS per whitened PCA component (16) + Bonferroni (the baseline the issue names)
  evidently - Evidently's EmbeddingsDrift default (classifier method), run in a separate venv because it
              needs pandas<3 (benchmark-only; skipped with a note when it cannot be installed)

Embeddings come from a real model. By default that is the model the monitor sees in practice: the
pipeline's default (`flywheel train` defaults: small-cnn, 3 epochs on full Fashion-MNIST, ~91% test
accuracy), trained once here through the real pipeline and cached under ~/.cache/flywheel/drift-bench
(keyed by a digest of the training code, so a change to it retrains). --train-samples N uses a quick
model instead (1 epoch on N images, ~0.8 test accuracy at 6000); --model-uri any registered model;
--cache DIR reads or writes the embeddings there.
Reference = 1000 validation embeddings per trial (what training logs); clean traffic = Fashion-MNIST
test images 3000-9999; shifted traffic = test images 0-2999 through flywheel.core.shifts (the demo's shifts).
False alarms: --clean-per-ref clean windows per reference draw (3000 at the defaults); detection: one
contaminated window per reference draw. Evidently sees one clean and one contaminated window per draw
(it is ~20x slower per window). The detector has no tuned constant fitted to these windows: its choices were
made on windows drawn with another seed (12345) from the same embedding pools.

    python benchmarks/drift.py                       # the default model (trains once, ~1-5 min of CPU)
    python benchmarks/drift.py --train-samples 6000  # the quick model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices: threading only adds contention
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np  # noqa: E402

EVIDENTLY_VENV = Path.home() / ".cache" / "flywheel" / "evidently-venv"
EVIDENTLY_WORKER = r"""
import json, sys, time, os
os.environ.setdefault("DO_NOT_TRACK", "1")
import numpy as np, pandas as pd
from evidently.legacy.metrics.data_drift.embedding_drift_methods import model
z = np.load(sys.argv[1])
ref, pool, refsets, windows = z["reference_pool"], z["pool"], z["refsets"], z["windows"]
cols = [f"e{i}" for i in range(ref.shape[1])]
out, times = [], []
for r, w in zip(refsets, windows):
    reference = pd.DataFrame(ref[r], columns=cols)
    current = pd.DataFrame(pool[w], columns=cols)
    method = model(bootstrap=len(reference) < 1000)  # what EmbeddingsDrift uses when none is given
    t = time.perf_counter()
    _, drift, _ = method(current, reference)
    times.append(time.perf_counter() - t)
    out.append(bool(drift))
json.dump({"detected": out, "seconds": times}, open(sys.argv[2], "w"))
"""


CACHE_ROOT = Path.home() / ".cache" / "flywheel" / "drift-bench"
SHIFTS = ("blur-jpeg", "catalogue", "rotate", "invert")
SETTINGS = ((100, 0.2, "blur-jpeg"), (300, 0.1, "blur-jpeg"), (100, 1.0, "blur-jpeg"),
            (100, 0.2, "catalogue"), (100, 0.2, "rotate"))


def embeddings_from_model(model_uri: str, shifts, seed: int = 0) -> dict[str, np.ndarray]:
    import torch

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model
    from flywheel.core.shifts import shift_images

    model, spec = load_model(model_uri)
    splits = load_splits("fashion-mnist", seed=seed)

    def embed(images):
        with torch.no_grad():
            return torch.cat([model(to_tensor(images[i:i + 500], spec.preprocess))[1]
                              for i in range(0, len(images), 500)]).numpy()

    test = splits.test.images
    out = {"val": embed(splits.val.images), "test": embed(test[3000:])}
    for kind in shifts:
        out[kind] = embed(shift_images(test[:3000], kind))
    return out


def train_model(samples: int | None) -> str:
    """The pipeline's default model (samples None) or a quick one (1 epoch on `samples` images)."""
    from flywheel.core.config import Settings
    from flywheel.training.train import TrainConfig, run_training

    home = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    settings = Settings.from_env(work_dir=home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}").apply()
    cfg = (TrainConfig(dataset="fashion-mnist", register=False) if samples is None else
           TrainConfig(dataset="fashion-mnist", epochs=1, max_train_samples=samples, register=False))
    result = run_training(cfg, settings)
    what = "the default model" if samples is None else f"a {samples}-image model"
    print(f"trained {what} ({cfg.model}, {cfg.epochs} epoch(s)): "
          f"test accuracy {result.metrics.get('test_accuracy', float('nan')):.3f}")
    return result.model_uri


def default_cache(samples: int | None) -> Path:
    """Cache directory keyed by the code that determines the embeddings (training, model, data, shifts)."""
    import torch

    src = Path(__file__).resolve().parents[1] / "src" / "flywheel"
    h = hashlib.sha256(f"{torch.__version__} {samples} {SHIFTS}".encode())
    for name in ("core/models.py", "training/train.py", "core/data.py", "contracts/preprocessing.py", "core/shifts.py"):
        h.update((src / name).read_bytes())
    return CACHE_ROOT / f"{'default' if samples is None else f'quick{samples}'}-{h.hexdigest()[:12]}"


def make_windows(rng, emb, shift: str, trials: int, window: int, frac: float, ref_size: int, clean_per_ref: int):
    """Index plans shared by every detector: reference sets, clean windows (clean_per_ref per reference
    set), one contaminated window per reference set. Pool indices: test first, then the shifted set."""
    n_val, n_test, n_shift = len(emb["val"]), len(emb["test"]), len(emb[shift])
    refsets = np.stack([rng.choice(n_val, ref_size, replace=False) for _ in range(trials)])
    clean = np.stack([[rng.choice(n_test, window, replace=False) for _ in range(clean_per_ref)]
                      for _ in range(trials)])
    k = int(round(frac * window))
    mixed = np.stack([np.concatenate([rng.choice(n_test, window - k, replace=False),
                                      n_test + rng.choice(n_shift, k, replace=False)]) for _ in range(trials)])
    return refsets, clean, mixed


def run_native(detector_cls, emb, shift, plan, alpha) -> dict:
    refsets, clean, mixed = plan
    pool = np.concatenate([emb["test"], emb[shift]])
    fa, det, seconds = [], [], []
    for r, cs, m in zip(refsets, clean, mixed, strict=True):
        d = detector_cls().fit(emb["val"][r])
        d.test(pool[m[:len(cs[0])]])  # warm-up: one-off per window size (NoveltyDriftDetector's rank null)
        for c in cs:
            t = time.perf_counter()
            fa.append(d.test(pool[c]).p_value < alpha)
            seconds.append(time.perf_counter() - t)
        det.append(d.test(pool[m]).p_value < alpha)
    return {"false_alarm": float(np.mean(fa)), "detection": float(np.mean(det)),
            "ms_per_window": 1000 * float(np.median(seconds)), "clean_windows": len(fa),
            "shifted_windows": len(det)}


def run_evidently(python: Path, emb, shift, plan) -> dict | str:
    refsets, clean, mixed = plan
    pool = np.concatenate([emb["test"], emb[shift]])
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "plan.npz", Path(tmp) / "out.json"
        windows = np.concatenate([clean[:, 0], mixed])
        np.savez(data, reference_pool=emb["val"], pool=pool, refsets=np.concatenate([refsets, refsets]),
                 windows=windows)
        script = Path(tmp) / "worker.py"
        script.write_text(EVIDENTLY_WORKER)
        proc = subprocess.run([str(python), str(script), str(data), str(out)], capture_output=True, text=True,
                              env={**os.environ, "DO_NOT_TRACK": "1"})
        if proc.returncode != 0:
            return f"evidently failed: {proc.stderr.strip()[-300:]}"
        res = json.loads(out.read_text())
    n = len(clean)
    return {"false_alarm": float(np.mean(res["detected"][:n])), "detection": float(np.mean(res["detected"][n:])),
            "ms_per_window": 1000 * float(np.median(res["seconds"][:n])), "clean_windows": n,
            "shifted_windows": len(mixed)}


def evidently_python(create: bool) -> Path | str:
    py = EVIDENTLY_VENV / "bin" / "python"
    if not py.exists() and create:
        try:
            subprocess.run([sys.executable, "-m", "venv", str(EVIDENTLY_VENV)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "evidently==0.7.23", "pandas<3"], check=True)
        except (subprocess.CalledProcessError, OSError) as exc:
            return f"could not install evidently into {EVIDENTLY_VENV}: {exc}"
    if not py.exists():
        return f"no evidently venv at {EVIDENTLY_VENV} (run with --install-evidently)"
    return py


def detection_delay(detector_cls, emb, shift, rng, window, frac, alpha, runs=50, max_windows=20) -> str:
    """Median samples served after the shift starts until a window is flagged, and how often it ever is."""
    delays = []
    for _ in range(runs):
        d = detector_cls().fit(emb["val"][rng.choice(len(emb["val"]), 1000, replace=False)])
        k = int(round(frac * window))
        for i in range(max_windows):
            w = np.concatenate([emb["test"][rng.choice(len(emb["test"]), window - k, replace=False)],
                                emb[shift][rng.choice(len(emb[shift]), k, replace=False)]])
            if d.test(w).p_value < alpha:
                delays.append((i + 1) * window)
                break
        else:
            delays.append(np.inf)
    found = np.isfinite(delays)
    median = f"{np.median(np.asarray(delays)[found]):6.0f}" if found.any() else "     -"
    return f"median {median} samples; flagged within {max_windows * window} in {found.mean():.0%} of {runs} streams"


def per_sample_auc(emb, rng) -> str:
    """AUC of each channel's per-sample score, shifted vs clean test embeddings, for one reference draw."""
    from scipy import stats

    from flywheel.monitoring.drift import NoveltyDriftDetector

    d = NoveltyDriftDetector().fit(emb["val"][rng.choice(len(emb["val"]), 1000, replace=False)])
    clean = d.scores(emb["test"])
    out = []
    for shift in SHIFTS:
        shifted = d.scores(emb[shift])
        aucs = {name: stats.mannwhitneyu(shifted[name], clean[name]).statistic / (len(shifted[name]) * len(clean[name]))
                for name in d.CHANNELS}
        out.append(f"{shift} " + " ".join(f"{k} {v:.3f}" for k, v in aucs.items()))
    return "; ".join(out)


def main() -> None:
    from flywheel.monitoring.drift import KSBonferroni, NoveltyDriftDetector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-uri")
    ap.add_argument("--train-samples", type=int, help="quick model: 1 epoch on this many images "
                    "(default: the pipeline's default model, trained once and cached)")
    ap.add_argument("--cache", type=Path, help="directory with val.npy, test.npy, <shift>.npy (read or written)")
    ap.add_argument("--trials", type=int, default=300, help="reference draws (one contaminated window each)")
    ap.add_argument("--clean-per-ref", type=int, default=10, help="clean windows per reference draw")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--install-evidently", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cache = args.cache or (None if args.model_uri else default_cache(args.train_samples))
    if cache and all((cache / f"{k}.npy").is_file() for k in ("val", "test", *SHIFTS)):
        emb = {k: np.load(cache / f"{k}.npy") for k in ("val", "test", *SHIFTS)}
        print(f"embeddings from {cache}")
    else:
        emb = embeddings_from_model(args.model_uri or train_model(args.train_samples), SHIFTS)
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            for k, v in emb.items():
                np.save(cache / f"{k}.npy", v)
    ev_py = evidently_python(args.install_evidently)
    detectors = {"flywheel": NoveltyDriftDetector, "ks-bonf": lambda: KSBonferroni(16)}
    print(f"embeddings: reference pool {emb['val'].shape}, clean {emb['test'].shape}, shifted "
          f"{', '.join(f'{k} {emb[k].shape}' for k in SHIFTS)}; alpha={args.alpha}; per row {args.trials} "
          f"reference draws, {args.trials * args.clean_per_ref} clean and {args.trials} contaminated windows "
          f"(evidently: {args.trials} clean)")
    if isinstance(ev_py, str):
        print(f"evidently column skipped: {ev_py}")
    print(f"{'setting':26s} {'detector':10s} {'false alarm':>11s} {'detection':>10s} {'ms/window':>10s}")
    rows = {}
    for i, (window, frac, shift) in enumerate(SETTINGS):
        rng = np.random.default_rng([args.seed, i])  # each setting its own windows, shared by all detectors
        plan = make_windows(rng, emb, shift, args.trials, window, frac, 1000, args.clean_per_ref)
        for name, cls in detectors.items():
            rows[(window, frac, shift, name)] = run_native(cls, emb, shift, plan, args.alpha)
        if not isinstance(ev_py, str):
            rows[(window, frac, shift, "evidently")] = run_evidently(ev_py, emb, shift, plan)
        for (w, f, sh, name), r in rows.items():
            if (w, f, sh) != (window, frac, shift):
                continue
            label = f"W={w} {int(f * 100)}% {sh}"
            if isinstance(r, str):
                print(f"{label:26s} {name:10s} {r}")
            else:
                print(f"{label:26s} {name:10s} {r['false_alarm']:11.4f} {r['detection']:10.3f} "
                      f"{r['ms_per_window']:10.2f}", flush=True)
    print(f"\nper-sample AUC, shifted vs clean: {per_sample_auc(emb, np.random.default_rng(args.seed + 2))}")
    rng = np.random.default_rng(args.seed + 1)
    print("\ndetection delay (samples after the shift starts; windows of 100, alpha per window):")
    for frac in (1.0, 0.2):
        for name, cls in detectors.items():
            print(f"  {int(frac * 100):3d}% shifted  {name:10s} "
                  f"{detection_delay(cls, emb, 'blur-jpeg', rng, 100, frac, args.alpha)}")
    ours, ks = rows[(100, 0.2, "blur-jpeg", "flywheel")], rows[(100, 0.2, "blur-jpeg", "ks-bonf")]
    print(f"\nratios at W=100, 20% blur-jpeg: detection flywheel/ks-bonf = "
          f"{ours['detection'] / max(ks['detection'], 1e-9):.2f}x")
    ev = rows.get((100, 0.2, "blur-jpeg", "evidently"))
    if isinstance(ev, dict):
        print(f"  detection flywheel/evidently = {ours['detection'] / max(ev['detection'], 1e-9):.2f}x; "
              f"compute per window flywheel/evidently = {ours['ms_per_window'] / ev['ms_per_window']:.2f} "
              f"(goal <= 0.33); false alarms {ours['false_alarm']:.4f} ({ours['clean_windows']} windows) "
              f"vs {ev['false_alarm']:.4f} ({ev['clean_windows']})")
    fa = [(r["false_alarm"] * r["clean_windows"], r["clean_windows"])
          for (_, _, _, name), r in rows.items() if name == "flywheel"]
    alarms, windows = (sum(x) for x in zip(*fa, strict=True))
    print(f"  flywheel false alarms over the {len(fa)} settings' clean windows: {alarms / windows:.4f} "
          f"({alarms:.0f} of {windows}; goal <= 0.01)")


if __name__ == "__main__":
    main()
