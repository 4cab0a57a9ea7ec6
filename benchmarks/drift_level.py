"""The false-alarm level of `NoveltyDriftDetector` over many reference draws: a validity check, not a tuning.

Why: the detector's p-values are conformal, so their level holds on average over the draw of the
reference as well as of the windows, and only where reference and traffic are exchangeable. For one
fixed draw of 1000 samples a channel's rate can sit a few times above or below its share (the 0.995
tail level rests on 5 reference samples), and benchmarks/drift.py averages its clean windows over
10 draws only. This script measures the detector on the same pools (the default model's validation
split as reference pool, test images 3000-9999 as clean traffic) over --draws reference draws and
--windows clean windows per draw and window size: the combined rate, its standard error over the
draws, the share of draws above alpha, and each channel's rate against its share of alpha (p < share x
alpha; `flywheel.monitoring.drift.channel_weights`). A channel whose rate stays above its share over many
draws is not exchangeable between the validation split and clean traffic: that is a finding, not noise.

    python benchmarks/drift_level.py                 # 100 draws x 1000 windows per W, about 7 minutes
    python benchmarks/drift_level.py --rank-simulations 100000           # the same with a finer null
    python benchmarks/drift_level.py --clean validation --draws 60       # the exchangeable control
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift as bench  # noqa: E402

from flywheel.component.log import REFERENCE_SIZE  # noqa: E402
from flywheel.monitoring.drift import NoveltyDriftDetector, channel_weights, weighted_bonferroni  # noqa: E402

# extra channels: given a reference draw (indices into the pool), each extra channel's per-sample
# conformal p-values of the clean pool
Extra = Callable[[np.ndarray], dict[str, np.ndarray]]


def default_pools():
    """The default model's pools, as benchmarks/drift.py builds and caches them."""
    counts = bench.FULL
    model_uri, tracking_uri, key = bench.cached_fashion_model(None)
    shifts_key = bench._digest((bench.SRC / "core/shifts.py").read_bytes(), str(counts.source).encode())
    return bench.build_pools(model_uri, tracking_uri, bench.CACHE_ROOT / f"{key}-emb-{shifts_key}", counts,
                             fashion=True)


def channel_p_values(det: NoveltyDriftDetector, u: np.ndarray) -> np.ndarray:
    """A channel's window p-values from its samples' conformal p-values (B, W), with the detector's own
    tail-count statistic and rank null: for a channel the detector does not have itself."""
    return det.tail_p_values(u)


def detector(seed: int, rank_simulations: int | None = None) -> NoveltyDriftDetector:
    """The product's detector; with `rank_simulations`, its tail-count rank null simulated that many times
    and the texture-shift channel's null kept at the product's count. The null's Monte Carlo resolution at
    a channel's Bonferroni share (alpha / 6) is ~1 / sqrt(share x simulations): +-17% at the product's
    20000, +-8% at 100000. This measures how much of the level is that draw of the null."""
    if rank_simulations is None:
        return NoveltyDriftDetector(seed=seed)
    return NoveltyDriftDetector(seed=seed, simulations=rank_simulations,
                                shift_simulations=NoveltyDriftDetector().simulations)


def level_rates(pools, draws: int, windows: int, seed: int, extra: Extra | None = None,
                reference_size: int = REFERENCE_SIZE, clean: str = "test",
                rank_simulations: int | None = None) -> dict:
    """{(W, decision): [false-alarm rate per draw]}; decisions: "detector" (Bonferroni over its channels),
    with `extra` also "detector + extra" (Bonferroni over all), and each channel against its share.
    `clean`: "test" draws the clean windows from the test images (the benchmark's clean traffic);
    "validation" from the reference pool's samples outside the draw, which are exchangeable with it by
    construction (a control: there the level holds unless the test itself is off; not with `extra`).
    `rank_simulations`: the tail-count channels' rank null simulated that many times (`detector`)."""
    if clean not in ("test", "validation") or (clean == "validation" and extra is not None):
        raise ValueError(f"clean must be 'test', or 'validation' without an extra channel, got {clean!r}")
    rng = np.random.default_rng(seed)
    rates: dict[tuple[int, str], list[float]] = {}
    for _ in range(draws):
        draw = rng.choice(len(pools.ref_emb), min(reference_size, len(pools.ref_emb)), replace=False)
        rest = np.setdiff1d(np.arange(len(pools.ref_emb)), draw)  # the pool's samples outside the draw
        det = detector(seed, rank_simulations).fit(
            pools.ref_emb[draw], input_reference=pools.features(pools.ref_inp[draw], bench._rows(pools.ref_pix, draw)),
            texture=pools.texture, directions=pools.directions, subspace=pools.subspace, grain=pools.grain)
        if clean == "test":
            u = det.window_inputs(pools.clean_emb, pools.features(pools.clean_inp, pools.clean_pix))
        else:
            u = det.window_inputs(pools.ref_emb[rest],
                                  pools.features(pools.ref_inp[rest], bench._rows(pools.ref_pix, rest)))
        u_extra = extra(draw) if extra is not None else {}
        for w in bench.WINDOWS:
            idx = np.stack([rng.choice(len(u["direction"]), w, replace=False) for _ in range(windows)])
            p, per = det.window_p_values({c: v[idx] for c, v in u.items()})
            per |= {c: channel_p_values(det, v[idx]) for c, v in u_extra.items()}
            weights = channel_weights(tuple(per))
            decisions = {"detector": p}
            if u_extra:
                decisions["detector + " + " + ".join(u_extra)] = weighted_bonferroni(per.values(),
                                                                                     [weights[c] for c in per])
            decisions |= {c: v / weights[c] for c, v in per.items()}  # each channel against its share
            for name, values in decisions.items():
                rates.setdefault((w, name), []).append(float(np.mean(values < bench.ALPHA)))
    return rates


def print_halves(flags: dict, goal: list, label: str) -> None:
    """One line per half: pairs of `goal` detected >= the goal's rate, their mean, the clean windows' false
    alarms and the pairs below; `flags` holds each pair's and "clean"'s flagged windows."""
    for half, fams in (("tuning", bench.TUNING), ("held-out", bench.HELD_OUT)):
        rates = {k: float(np.mean(flags[k])) for k in goal if k[0] in fams}
        below = ", ".join(f"{k[0]}-{k[1]} {r:.2f}" for k, r in rates.items() if r < bench.GOAL["detection"])
        print(f"{label} {half:8s} {sum(r >= bench.GOAL['detection'] for r in rates.values())} of {len(rates)}, "
              f"mean {np.mean(list(rates.values())):.3f}, false alarms {np.mean(flags['clean']):.4f}; "
              f"below {bench.GOAL['detection']}: {below}", flush=True)


def print_rates(rates: dict) -> None:
    print("| W | decision | false alarms | s.e. over draws | draws above alpha |")
    print("|---|---|---|---|---|")
    for (w, name), r in rates.items():
        r = np.asarray(r)
        print(f"| {w} | {name} | {r.mean():.4f} | {r.std(ddof=1) / np.sqrt(len(r)):.4f} | "
              f"{np.mean(r > bench.ALPHA):.2f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=100, help="reference draws (of --reference-size samples)")
    ap.add_argument("--windows", type=int, default=1000, help="clean windows per draw and window size")
    ap.add_argument("--seed", type=int, default=0, help="seeds the draws and the windows")
    ap.add_argument("--reference-size", type=int, default=REFERENCE_SIZE,
                    help="samples per reference draw (default: what the product logs, component/log.py REFERENCE_SIZE)")
    ap.add_argument("--clean", choices=("test", "validation"), default="test",
                    help="where clean windows come from: the test images (the benchmark's clean traffic), or the "
                         "validation samples outside each reference draw (exchangeable with it: a control)")
    ap.add_argument("--rank-simulations", type=int, default=None,
                    help="simulations of the tail-count channels' rank null (default: the detector's own, "
                         "20000); the texture-shift channel keeps its own null")
    args = ap.parse_args(argv)
    pools = default_pools()
    print(f"{pools.where}; {args.draws} reference draws of {args.reference_size} x {args.windows} clean windows "
          f"per W from the {args.clean} images, alpha {bench.ALPHA}, rank null of "
          f"{args.rank_simulations or 'the detector default'} simulations")
    print_rates(level_rates(pools, args.draws, args.windows, args.seed, reference_size=args.reference_size,
                            clean=args.clean, rank_simulations=args.rank_simulations))


if __name__ == "__main__":
    main()
