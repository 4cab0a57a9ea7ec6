"""The thirteenth design-log entry of benchmarks/drift.py, first part: is the direction channel's calibration
exchangeable with a new sample's score? A check of the detector as built, nothing here is in the product.

Why: the direction channel calibrates a new sample's kNN distance to the reference against the reference's own
leave-one-out kNN distances (each sample against the other n - 1). Those n scores are not independent draws
(two near neighbours lower each other's), so the window test's exact rank null holds only approximately.
Split conformal holds exactly: index the kNN on one part of the reference, calibrate on the other part's
distances to it, score new samples against the same index; calibration and window scores are then i.i.d.
given the index. The twelfth entry measured the direction channel at 1.2-1.9x its share on exchangeable
windows (100 draws, rank null simulated 100,000 times). This script measures both calibrations on the same
reference draws and windows, on clean windows drawn from the validation samples outside each draw (exchangeable
with it by construction), with many draws, so that the draws' spread does not decide, and a finer null, so
that the null's Monte Carlo error does not either.

Printed per W: each calibration's false-alarm rate at the channel's Bonferroni share of the product's six
channels (alpha / 6), as a multiple of that share, with its standard error over the draws.

    python benchmarks/drift_direction_calibration.py                     # about 10 minutes on 2 cores
    python benchmarks/drift_direction_calibration.py --draws 100 --windows 1000 --rank-simulations 100000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402
from drift_level import default_pools  # noqa: E402

from flywheel.component.log import REFERENCE_SIZE  # noqa: E402
from flywheel.monitoring.drift import NoveltyDriftDetector, _exceedance_p  # noqa: E402

CHANNELS = 6  # the product detector's channels: each is tested at alpha / CHANNELS


def calibrations(ref: np.ndarray, clean: np.ndarray, index_share: float, simulations: int) -> dict:
    """{name: (the clean samples' direction p-values (N,), the detector whose tail_p_values matches that
    calibration's size)} for the leave-one-out and the split calibrations of one reference draw."""
    loo = NoveltyDriftDetector(simulations=simulations).fit(ref)
    m = int(round(index_share * len(ref)))
    index = NoveltyDriftDetector(simulations=simulations).fit(ref[:m])  # the split's kNN index
    calibration = np.sort(index.scores(ref[m:])["direction"])
    # fitted on the calibration part only for its tail_p_values: the rank null of len(ref) - m scores
    split_null = NoveltyDriftDetector(simulations=simulations).fit(ref[m:])
    return {"leave-one-out": (loo.p_values(clean)["direction"], loo),
            f"split {m}/{len(ref) - m}": (_exceedance_p(calibration, index.scores(clean)["direction"]), split_null)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=2000, help="reference draws of the product's reference size")
    ap.add_argument("--windows", type=int, default=300, help="clean windows per draw and window size")
    ap.add_argument("--rank-simulations", type=int, default=1_000_000,
                    help="simulations of the tail-count rank null (the product's: 20000)")
    ap.add_argument("--index-share", type=float, default=0.5, help="share of each draw the split indexes")
    ap.add_argument("--seed", type=int, default=0, help="seeds the draws and the windows")
    args = ap.parse_args(argv)
    if not 0 < args.index_share < 1:
        raise SystemExit(f"--index-share must be in (0, 1), got {args.index_share}")
    pools = default_pools()
    share = bench.ALPHA / CHANNELS
    print(f"{pools.where}; {args.draws} reference draws of {REFERENCE_SIZE} x {args.windows} clean windows per W "
          f"from the validation samples outside each draw; rank null of {args.rank_simulations} simulations; "
          f"rates as multiples of the direction channel's share, alpha / {CHANNELS}", flush=True)
    rng, rates = np.random.default_rng(args.seed), {}
    for _ in range(args.draws):
        draw = rng.choice(len(pools.ref_emb), REFERENCE_SIZE, replace=False)
        rest = np.setdiff1d(np.arange(len(pools.ref_emb)), draw)  # exchangeable with the draw
        u = calibrations(pools.ref_emb[draw], pools.ref_emb[rest], args.index_share, args.rank_simulations)
        for w in bench.WINDOWS:
            idx = np.stack([rng.choice(len(rest), w, replace=False) for _ in range(args.windows)])
            for name, (p, det) in u.items():
                rates.setdefault((w, name), []).append(float(np.mean(det.tail_p_values(p[idx]) < share)))
    print("| W | calibration | false alarms / share | s.e. |")
    print("|---|---|---|---|")
    for (w, name), r in rates.items():
        r = np.asarray(r) / share
        print(f"| {w} | {name} | {r.mean():.2f} | {r.std(ddof=1) / np.sqrt(len(r)):.2f} |")


if __name__ == "__main__":
    main()
