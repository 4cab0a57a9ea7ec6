"""Benchmark: the Fashion-MNIST reference component (examples/fashion-mnist) against its goal,
>= 92.5% test accuracy with <= 60 s of training on a 2-core CPU, tracking on.

Both sides train through the real path, each an `mlflow run ... --env-manager local` CLI process
against a local sqlite store (MLflow tracking on: run, params, per-epoch metrics, system metrics,
test evaluation, model logging), alternating per seed so both see the same machine state:

* component: `mlflow run examples/fashion-mnist -e train -P seed=S -P register=false`, its own
  network (examples/fashion-mnist/model.py) and recipe (MLproject defaults, RECIPE.md);
* peer: the old reference recipe, `mlflow run . -e train -P arch=small-cnn -P register=false
  -P seed=S`: the built-in small-cnn, 3 epochs, batch 128, one-cycle AdamW at 3e-3.

Read from each run: `test_accuracy` (the frozen 10,000-image test split) and `train_seconds` (the
optimisation loop alone, as `fit()` logs it). Printed: per-seed rows, the median over seeds of each
side and the component/peer ratio of train_seconds (the figure to read on a shared machine: the
absolute seconds grow with the load average, printed with them).

    .venv/bin/python benchmarks/reference_component.py            # seeds 0 1 2, full data
    .venv/bin/python benchmarks/reference_component.py --quick    # seed 0 on a 6000-image subset

The last stdout line is `BENCH_JSON {...}` (also written to --json-out), which benchmarks/run_all.py reads.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))
from bench_io import emit  # noqa: E402 - benchmarks/ is the script's own directory

GOAL_ACCURACY, GOAL_SECONDS = 0.925, 60.0
RUN_ID = re.compile(r"=== Run \(ID '([0-9a-f]+)'\) succeeded ===")


def _mlflow_run(project: Path, params: dict[str, object], experiment: str, env: dict, log: Path) -> str:
    """One `mlflow run` CLI process; its run id (the process's output goes to `log`)."""
    cmd = [str(BIN / "mlflow"), "run", str(project), "-e", "train", "--env-manager", "local",
           "--experiment-name", experiment]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    found = RUN_ID.search(proc.stderr + proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); log: {log}\n{(proc.stdout + proc.stderr)[-2000:]}")
    return found.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=0, help="train on a seeded subset of this many images (0: all)")
    ap.add_argument("--quick", action="store_true", help="seed 0 on 6000 training images (checks the path, not the goal)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.samples = [0], 6000

    import mlflow

    from flywheel.core.config import Settings
    from flywheel.core.runlog import ensure_experiment

    work = Path(tempfile.mkdtemp(prefix="fw-refcomp-"))
    logs = work / "logs"
    logs.mkdir()
    settings = Settings.from_env(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", work_dir=work,
                                 model_name="reference-component").apply()
    ensure_experiment(settings)  # artifacts under `work`, not ./mlruns of the checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(settings.child_env(), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TERM="dumb", COLUMNS="200")
    client = mlflow.MlflowClient()
    sides = {"component": (REPO / "examples" / "fashion-mnist", {}),
             "small-cnn": (REPO, {"arch": "small-cnn"})}
    print(f"reference component vs the old small-cnn recipe: seeds {args.seeds}, "
          f"{args.samples or 'all'} training images, {os.cpu_count()} CPUs; logs in {logs}", flush=True)
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    for seed in args.seeds:
        for name, (project, extra) in sides.items():  # alternating: both sides see the same load
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            run_id = _mlflow_run(project, {**extra, "seed": seed, "register": "false", "max_train_samples": args.samples},
                                 settings.experiment, env, logs / f"{name}-seed{seed}.log")
            metrics = client.get_run(run_id).data.metrics
            row = {"seed": seed, "test_accuracy": metrics["test_accuracy"], "train_seconds": metrics["train_seconds"],
                   "wall_s": time.perf_counter() - started, "load": (load_before + os.getloadavg()[0]) / 2}
            rows[name].append(row)
            print(f"  seed {seed} {name:10s} test accuracy {row['test_accuracy']:.4f}  train {row['train_seconds']:6.1f} s"
                  f"  (mlflow run {row['wall_s']:5.1f} s, load avg {row['load']:.1f})", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    c_acc, c_sec, p_acc, p_sec = (med("component", "test_accuracy"), med("component", "train_seconds"),
                                  med("small-cnn", "test_accuracy"), med("small-cnn", "train_seconds"))
    loads = [r["load"] for side in rows.values() for r in side]
    summary = {"seeds": args.seeds, "train_samples": args.samples or "all", "cpus": os.cpu_count(),
               "component": {"test_accuracy": c_acc, "train_seconds": c_sec, "runs": rows["component"]},
               "small_cnn": {"test_accuracy": p_acc, "train_seconds": p_sec, "runs": rows["small-cnn"]},
               "train_seconds_ratio": c_sec / p_sec, "accuracy_gain": c_acc - p_acc,
               "load_avg_min": min(loads), "load_avg_max": max(loads),
               "goal": {"test_accuracy": GOAL_ACCURACY, "train_seconds": GOAL_SECONDS}}
    print(f"median over seeds: component {c_acc:.4f} in {c_sec:.1f} s; small-cnn {p_acc:.4f} in {p_sec:.1f} s; "
          f"train_seconds ratio {c_sec / p_sec:.2f}x, accuracy {100 * (c_acc - p_acc):+.2f} pt "
          f"(load avg {min(loads):.1f}-{max(loads):.1f}; goal >= {GOAL_ACCURACY:.1%} in <= {GOAL_SECONDS:.0f} s)")
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
