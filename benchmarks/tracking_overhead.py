"""Benchmark: what MLflow tracking costs a training run (goal: epoch wall time ratio on/off <= 1.01).

The same training (dataset, subset, seed, batch size, epochs, model, CPU) runs in fresh subprocesses,
alternating "on" and "off" `--repeats` times so both see the same machine state. Both sides run the
same training loop, `flywheel.training.train.fit()` (AdamW + one-cycle schedule, AMP and DDP where
they apply, the progress bar, the per-epoch validation):

* on:  `flywheel.training.train.run_training` itself (register=False): tracking preflight, then
  `fit()` with the MLflow run as its callback (`TrackedRun`): the run is created, params/tags and the
  dataset input are logged, system metrics are sampled by MLflow's background thread, each epoch's
  metrics go through `RunLogger`, and the test evaluation, model and reference artifacts are logged
  at the end.
* off: `fit()` with no callback, on the same data: no MLflow call at all.

What is compared:

* epoch wall time, measured from one epoch's end-of-epoch point to the next (on: the timestamps of
  the logged `val_accuracy` metric, taken by `RunLogger` when it logs them; off: `fit()`'s
  `epoch_ends`, `time.time()` at the same point, just before the callback would be called). This
  includes the per-epoch logging call, the validation pass and any interference of the
  system-metrics thread: everything tracking adds *during* training. Goal <= 1.01.
* train compute (`train_seconds` of `fit()` on both sides), which leaves out validation and logging.
* one-off costs of the "on" side: setup (run, params, dataset input) and the final model/artifact
  logging, reported in seconds; they do not grow with epochs (setup is reported for both sides).

    .venv/bin/python benchmarks/tracking_overhead.py                 # Fashion-MNIST 12k images, 4 epochs, 3x
    .venv/bin/python benchmarks/tracking_overhead.py --quick         # digits, 4 epochs, 2x
    .venv/bin/python benchmarks/tracking_overhead.py --tracking-uri http://user:pw@host:5000  # a server

The last stdout line is `BENCH_JSON {...}` (also written to --json-out), which benchmarks/run_all.py reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from bench_io import emit  # noqa: E402 - benchmarks/ is the script's own directory


# ------------------------------------------------------------------------------------ workers
def _config(args):
    from flywheel.training.train import TrainConfig

    return TrainConfig(dataset=args.dataset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, seed=args.seed, register=False, max_train_samples=args.samples or None,
                       device="cpu")


def _untracked_fit(args) -> dict:
    """`fit()`, the training loop of `run_training`, with no callback: no MLflow call at all."""
    from flywheel.component.loop import fit, select_device
    from flywheel.core.config import Settings
    from flywheel.core.data import load_splits

    t_start, wall_start = time.perf_counter(), time.time()
    cfg = _config(args)
    splits = load_splits(cfg.dataset, Settings.from_env().data_dir, cfg.seed, cfg.extra_data)
    # run_training imports torch._dynamo during its setup (a preload thread); without this the
    # optimizer's first step would import it inside epoch 1's train compute.
    import torch._dynamo  # noqa: F401

    from flywheel.training.archs import build_model

    fitted = fit(cfg, splits, select_device(cfg.device), model=build_model(cfg.model, len(splits.class_names)))
    ends = fitted.epoch_ends
    # Setup: from the worker's start to the start of epoch 1, as for the "on" side.
    return {"epoch_ends": ends, "train_seconds": fitted.train_seconds, "total_s": time.perf_counter() - t_start,
            "setup_s": max(0.0, ends[0] - fitted.history[0]["epoch_seconds"] - wall_start),
            "val_accuracy": fitted.history[-1]["val_accuracy"]}


def _tracked_run(args) -> dict:
    """`run_training`: `fit()` with the MLflow run (`TrackedRun`) as its callback."""
    import mlflow

    from flywheel.core.config import Settings
    from flywheel.training.train import run_training

    t_start, wall_start = time.perf_counter(), time.time()
    settings = Settings.from_env(**({"tracking_uri": args.tracking_uri} if args.tracking_uri else {})).apply()
    result = run_training(_config(args), settings)
    total = time.perf_counter() - t_start
    client = mlflow.MlflowClient()
    history = sorted(client.get_metric_history(result.run_id, "val_accuracy"), key=lambda m: m.step)
    run = client.get_run(result.run_id)
    epoch_ends = [m.timestamp / 1000.0 for m in history]
    # Setup: from the worker's start to the start of epoch 1 (first epoch end minus its duration).
    first_epoch = client.get_metric_history(result.run_id, "epoch_seconds")
    first_epoch_s = min(first_epoch, key=lambda m: m.step).value if first_epoch else 0.0
    return {"epoch_ends": epoch_ends, "train_seconds": result.train_seconds, "total_s": total,
            "setup_s": max(0.0, epoch_ends[0] - first_epoch_s - wall_start) if epoch_ends else 0.0,
            "finish_s": (run.info.end_time / 1000.0 - epoch_ends[-1]) if epoch_ends else 0.0,
            "val_accuracy": history[-1].value if history else 0.0, "run_id": result.run_id}


# ------------------------------------------------------------------------------------- driver
def _spawn(mode: str, args, home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    out = home / f"{mode}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--json-out", str(out), "--dataset", args.dataset,
           "--model", args.model, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--seed", str(args.seed), "--samples", str(args.samples)]
    env_threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.tracking_uri:
        cmd += ["--tracking-uri", args.tracking_uri]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(FLYWHEEL_HOME=str(home), PYTHONPATH=str(REPO / "src"), TERM="dumb", **env_threads)
    if args.tracking_uri is None:
        env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _epoch_walls(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="digits, 4 epochs, 2 alternations")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--samples", type=int, default=12000, help="training subset size (0: all)")
    ap.add_argument("--model", default="small-cnn")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="on/off alternations")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in both workers (1: least sensitive to other load on the box)")
    ap.add_argument("--tracking-uri", help="log to this server (default: embedded SQLite in a temp dir)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    if args.worker:
        result = (_tracked_run if args.worker == "on" else _untracked_fit)(args)
        args.json_out.write_text(json.dumps(result))
        return
    if args.quick:
        args.dataset, args.samples, args.epochs, args.repeats = "digits", 0, 4, 2
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (epoch wall time is measured between epoch ends)")

    rows = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="fw-overhead-") as tmp:
        for r in range(args.repeats):
            # Alternate which side goes first, so a drift in machine load does not favour one side.
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                res = _spawn(mode, args, Path(tmp) / f"{mode}-{r}")
                rows[mode].append(res)
                walls = _epoch_walls(res["epoch_ends"])
                print(f"round {r + 1} {mode:>3}: epoch wall {statistics.median(walls):.3f} s, train compute "
                      f"{res['train_seconds']:.2f} s, total {res['total_s']:.1f} s, val acc {res['val_accuracy']:.4f}",
                      flush=True)

    def med(mode: str, f) -> float:
        return statistics.median(f(r) for r in rows[mode])

    def spread(mode: str) -> float:
        walls = [statistics.median(_epoch_walls(r["epoch_ends"])) for r in rows[mode]]
        return (max(walls) - min(walls)) / statistics.median(walls)

    epoch_on = med("on", lambda r: statistics.median(_epoch_walls(r["epoch_ends"])))
    epoch_off = med("off", lambda r: statistics.median(_epoch_walls(r["epoch_ends"])))
    compute_on, compute_off = med("on", lambda r: r["train_seconds"]), med("off", lambda r: r["train_seconds"])
    summary = {
        "benchmark": "tracking_overhead", "dataset": args.dataset, "samples": args.samples, "epochs": args.epochs,
        "repeats": args.repeats, "store": args.tracking_uri.split("@")[-1] if args.tracking_uri else "embedded sqlite",
        "epoch_wall_on_s": epoch_on, "epoch_wall_off_s": epoch_off, "epoch_wall_ratio": epoch_on / epoch_off,
        "train_compute_on_s": compute_on, "train_compute_off_s": compute_off,
        "train_compute_ratio": compute_on / compute_off,
        "setup_on_s": med("on", lambda r: r["setup_s"]), "setup_off_s": med("off", lambda r: r["setup_s"]),
        "finish_on_s": med("on", lambda r: r["finish_s"]),
        "total_on_s": med("on", lambda r: r["total_s"]), "total_off_s": med("off", lambda r: r["total_s"]),
        "goal_epoch_wall_ratio": 1.01, "threads": args.threads,
        # (max - min) / median of one side's per-round epoch wall: what the machine's own noise was.
        "round_spread_on": spread("on"), "round_spread_off": spread("off"),
    }
    print(f"\n{args.dataset} ({args.samples or 'all'} images), {args.epochs} epochs, {args.repeats} alternations, "
          f"store: {summary['store']}")
    print(f"{'':28s} {'on':>9s} {'off':>9s} {'ratio':>7s}")
    print(f"{'epoch wall time (s)':28s} {epoch_on:9.3f} {epoch_off:9.3f} {epoch_on / epoch_off:7.3f}  (goal <= 1.01)")
    print(f"{'round-to-round spread':28s} {summary['round_spread_on']:9.1%} {summary['round_spread_off']:9.1%}"
          "  (a ratio closer to 1 than this is within the machine's noise)")
    print(f"{'train compute (s)':28s} {compute_on:9.2f} {compute_off:9.2f} {compute_on / compute_off:7.3f}")
    print(f"{'one-off: setup (s)':28s} {summary['setup_on_s']:9.2f} {summary['setup_off_s']:9.2f}")
    print(f"{'one-off: model+artifacts (s)':28s} {summary['finish_on_s']:9.2f} {'-':>9s}")
    print(f"{'whole process (s)':28s} {summary['total_on_s']:9.1f} {summary['total_off_s']:9.1f} "
          f"{summary['total_on_s'] / summary['total_off_s']:7.2f}")
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
