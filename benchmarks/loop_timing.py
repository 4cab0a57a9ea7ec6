"""Benchmark: the delivery loop's own overhead, push → served in dev, minus training compute (goal <= 20 s).

What a push to main sets off, run with the real pieces on this machine (the training node is this
box, so `mlflow run` stands in for `flywheel remote-train`'s SSH hop, which adds the upload of a
`git archive` and a few SSH round trips):

1. `mlflow run . -e train --env-manager local` of this checkout: trains, logs, gates, registers `candidate`;
2. `flywheel package --version V`: TorchScript + ONNX export with parity checks, `.mar`;
3. `flywheel release --version V --env dev --mar <step 2's archive>`: verify the archive (version,
   run, sha256, recorded parity), register on a running dev TorchServe (token auth), acceptance,
   set-default, alias `dev` (default grace period: nothing to retire on a fresh server);
4. a prediction from `/predictions/MODEL` answered by version V.

Then `flywheel release --env prod` to a second TorchServe (push → served in prod). Each step is a
separate CLI process, as in CI. Training compute is the run's own `train_seconds` metric (the
optimisation loop); everything else is the loop's overhead: process and MLflow start-up, data
loading, validation, evaluation on the test split, model logging, the gate, export + parity,
archiving, registration, worker start, acceptance and the switch.

    .venv/bin/python benchmarks/loop_timing.py                 # Fashion-MNIST, 1 epoch on 10k images
    .venv/bin/python benchmarks/loop_timing.py --quick         # digits, 1 epoch

The last stdout line is `BENCH_JSON {...}` (also written to --json-out), read by benchmarks/run_all.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from bench_io import emit  # noqa: E402 - benchmarks/ is the script's own directory

BIN = Path(sys.executable).parent


def _step(name: str, cmd: list[str], env: dict, log_dir: Path, timeline: list) -> str:
    log = log_dir / f"{len(timeline) + 1:02d}-{name}.log"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"step {name!r} failed ({proc.returncode}); log: {log}\n{proc.stderr[-2000:]}")
    timeline.append((name, seconds))
    print(f"  {name:28s} {seconds:7.1f} s", flush=True)
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, 1 epoch")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=10000, help="max_train_samples (0: all)")
    ap.add_argument("--min-accuracy", type=float, default=0.6, help="release acceptance threshold")
    ap.add_argument("--keep-dir", action="store_true", help="keep the work dir (logs, store) for inspection")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.dataset, args.samples = "digits", 0

    import mlflow

    from flywheel.config import Settings
    from flywheel.serve import ServeConfig, start_torchserve
    from flywheel.tracking import ensure_experiment

    work = Path(tempfile.mkdtemp(prefix="fw-loop-"))
    logs = work / "logs"
    logs.mkdir()
    model = "loop-timing"
    settings = Settings.from_env(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", work_dir=work,
                                 model_name=model).apply()
    ensure_experiment(settings)  # artifacts under `work`, not ./mlruns of the checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(settings.child_env(), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", TERM="dumb", COLUMNS="200")

    servers = {}
    timeline: list[tuple[str, float]] = []
    try:
        for name in ("dev", "prod"):  # the serving nodes are up before the push, as in production
            store = work / f"store-{name}"
            store.mkdir()
            servers[name] = start_torchserve(ServeConfig.local(work / f"ts-{name}", store))
        from flywheel.data import load_splits
        from flywheel.preprocessing import encode_png
        from flywheel.tracking import ensure_experiment

        probe = encode_png(load_splits(args.dataset, seed=0).test.images[0])  # before the clock starts
        ensure_experiment(settings)  # artifacts under the benchmark's own FLYWHEEL_HOME, not ./mlruns
        print(f"push → served: {args.dataset}, {args.epochs} epoch(s), "
              f"{args.samples or 'all'} training images; logs in {logs}", flush=True)
        t_push = time.perf_counter()
        _step("mlflow run (train+gate)", [str(BIN / "mlflow"), "run", str(REPO), "-e", "train", "--env-manager",
                                           "local", "--experiment-name", settings.experiment, "-P",
                                           f"dataset={args.dataset}", "-P", f"epochs={args.epochs}", "-P",
                                           f"max_train_samples={args.samples}"], env, logs, timeline)
        client = mlflow.MlflowClient()
        mv = client.get_model_version_by_alias(model, "candidate")
        version = str(mv.version)
        train_seconds = client.get_run(mv.run_id).data.metrics["train_seconds"]
        fw = str(BIN / "flywheel")
        _step("package", [fw, "package", "--model", model, "--version", version, "--out", str(work / "mars")],
              env, logs, timeline)

        def release(env_name: str) -> None:
            srv = servers[env_name]
            _step(f"release {env_name}", [
                fw, "release", "--model", model, "--version", version, "--env", env_name,
                "--inference-url", srv.cfg.inference_address, "--management-url", srv.cfg.management_address,
                "--key-file", str(srv.key_file), "--model-store", str(srv.cfg.model_store),
                "--mar", str(work / "mars" / f"{model}-{version}.mar"),
                "--min-accuracy", str(args.min_accuracy), "--p95-slo-ms", "1000"], env, logs, timeline)
            r = srv.client().predict(model, probe)
            if r.status_code != 200 or str(r.json().get("version")) != version:
                raise SystemExit(f"{env_name} does not serve v{version}: {r.status_code} {r.text[:200]}")

        release("dev")
        served_dev = time.perf_counter() - t_push
        release("prod")
        served_prod = time.perf_counter() - t_push
    finally:
        for srv in servers.values():
            srv.stop()
        if not args.keep_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    steps = dict(timeline)
    summary = {
        "benchmark": "loop_timing", "dataset": args.dataset, "epochs": args.epochs, "samples": args.samples,
        "version": version, "train_compute_s": train_seconds,
        "push_to_dev_s": served_dev, "push_to_dev_minus_train_s": served_dev - train_seconds,
        "push_to_prod_s": served_prod, "push_to_prod_minus_train_s": served_prod - train_seconds,
        "steps_s": steps, "mlflow_run_overhead_s": steps["mlflow run (train+gate)"] - train_seconds,
        "goal_push_to_dev_minus_train_s": 20.0,
    }
    print(f"\ntraining compute (train_seconds)     {train_seconds:7.1f} s")
    print(f"push → served in dev                 {served_dev:7.1f} s   minus training: "
          f"{served_dev - train_seconds:6.1f} s  (goal <= 20 s)")
    print(f"push → served in prod                {served_prod:7.1f} s   minus training: "
          f"{served_prod - train_seconds:6.1f} s")
    print(f"  of which mlflow run beyond training {summary['mlflow_run_overhead_s']:6.1f} s, package "
          f"{steps['package']:.1f} s, release dev {steps['release dev']:.1f} s")
    emit(summary, args.json_out)


if __name__ == "__main__":
    main()
