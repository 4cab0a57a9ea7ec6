"""Benchmark: the delivery loop's own overhead, push → served in dev, minus training compute (goal <= 20 s).

What a push to main sets off, run with the real pieces on this machine (the training node is this
box, so `mlflow run` stands in for `flywheel remote-train`'s SSH hop, which adds the upload of a
`git archive` and a few SSH round trips):

1. `mlflow run . -e train --env-manager local` of this checkout: trains, logs, gates, registers `candidate`
   (what .github/workflows/train.yml runs on the training node);
2. `flywheel release --version V --env dev` (what .github/workflows/release.yml runs): packages V
   (TorchScript + ONNX export with parity checks, `.mar`) in the same process, registers it on a
   running dev TorchServe (token auth), acceptance, set-default, alias `dev` (default grace period:
   nothing to retire on a fresh server);
3. a prediction from `/predictions/MODEL` answered by version V.

`--steps separate` runs `flywheel package` and then `flywheel release --mar` as two processes
instead (one more Python + MLflow start-up). Then `flywheel release --env prod` to a second
TorchServe, which finds and verifies the archive dev's release built (push → served in prod).
Each step is a separate CLI process, as in CI. Training compute is the run's own `train_seconds` metric (the
optimisation loop); everything else is the loop's overhead: process and MLflow start-up, data
loading, validation, evaluation on the test split, model logging, the gate, export + parity,
archiving, registration, worker start, acceptance and the switch.

Tracking: by default a tracking node is up before the push, like the serving nodes: `mlflow server`
(SQLite metadata, proxied artifacts in the work dir) on a free loopback port, so each step talks
REST to it as CI's steps talk to the Postgres + GCS node. `--tracking embedded` instead gives every
process the `sqlite:///` store itself (the demo's default), which costs each of them the
SQLAlchemy store's import and schema check (~1-1.5 s per process here); `--tracking-uri` points at
any running node.

    .venv/bin/python benchmarks/loop_timing.py                 # Fashion-MNIST, 1 epoch on 10k images
    .venv/bin/python benchmarks/loop_timing.py --quick         # digits, 1 epoch
    .venv/bin/python benchmarks/loop_timing.py --tracking embedded

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
from bench_io import emit, start_http_server  # noqa: E402 - benchmarks/ is the script's own directory

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


def start_tracking_node(work: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on SQLite with proxied artifacts under `work`, on a free loopback port."""
    from flywheel.core.procs import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # GenAI job runner: nothing here uses it
    url = f"http://127.0.0.1:{port}"
    proc = start_http_server([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                              "--artifacts-destination", str(work / "mlartifacts"), "--serve-artifacts",
                              "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                             env, work / "mlflow-server.log", url, "/health", timeout=120)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, 1 epoch")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--samples", type=int, default=10000, help="max_train_samples (0: all)")
    ap.add_argument("--min-accuracy", type=float, default=0.6, help="release acceptance threshold")
    ap.add_argument("--keep-dir", action="store_true", help="keep the work dir (logs, store) for inspection")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--steps", choices=("workflow", "separate"), default="workflow",
                    help="workflow: release packages in-process, as release.yml; separate: package, then release --mar")
    ap.add_argument("--tracking", choices=("server", "embedded"), default="server",
                    help="server: start a tracking node before the push (default); embedded: sqlite:/// in every process")
    ap.add_argument("--tracking-uri", help="use this running tracking node instead (http://...)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="whole loops, each in a fresh work dir with fresh servers; the median one is reported")
    args = ap.parse_args()
    if args.quick:
        args.dataset, args.samples = "digits", 0
    runs = [run_loop(args) for _ in range(max(1, args.repeat))]
    key = "push_to_dev_minus_train_s"
    summary = sorted(runs, key=lambda r: r[key])[len(runs) // 2]
    summary = {**summary, "repeats": len(runs), "all_push_to_dev_minus_train_s": [r[key] for r in runs]}
    if len(runs) > 1:
        print(f"\nmedian of {len(runs)} loops: push → served in dev minus training {summary[key]:.1f} s "
              f"(all: {', '.join(f'{r[key]:.1f}' for r in runs)} s)")
    emit(summary, args.json_out)


def run_loop(args) -> dict:
    """One push → served loop in a fresh work dir, with fresh tracking and serving nodes."""

    import mlflow

    from flywheel.contracts.capture import TRAFFIC_HEADER
    from flywheel.core.config import Settings
    from flywheel.core.runlog import ensure_experiment
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    work = Path(tempfile.mkdtemp(prefix="fw-loop-"))
    logs = work / "logs"
    logs.mkdir()
    model = "loop-timing"
    tracking_node = None
    tracking_uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    if args.tracking == "server" and not args.tracking_uri:
        tracking_node, tracking_uri = start_tracking_node(work)
    settings = Settings.from_env(tracking_uri=tracking_uri, work_dir=work, model_name=model).apply()
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
        from flywheel.contracts.preprocessing import encode_png
        from flywheel.core.data import load_splits
        from flywheel.core.runlog import ensure_experiment

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
        mar: list[str] = []
        if args.steps == "separate":
            _step("package", [fw, "package", "--model", model, "--version", version, "--out", str(work / "mars")],
                  env, logs, timeline)
            mar = ["--mar", str(work / "mars" / f"{model}-{version}.mar")]

        def release(env_name: str) -> None:
            srv = servers[env_name]
            name = f"release {env_name}" + (" (+ package)" if env_name == "dev" and not mar else "")
            _step(name, [
                fw, "release", "--model", model, "--version", version, "--env", env_name,
                "--inference-url", srv.cfg.inference_address, "--management-url", srv.cfg.management_address,
                "--key-file", str(srv.key_file), "--model-store", str(srv.cfg.model_store), *mar,
                "--min-accuracy", str(args.min_accuracy), "--p95-slo-ms", "1000"], env, logs, timeline)
            r = srv.client().predict(model, probe, headers={TRAFFIC_HEADER: "benchmark"})  # not user traffic
            if r.status_code != 200 or str(r.json().get("version")) != version:
                raise SystemExit(f"{env_name} does not serve v{version}: {r.status_code} {r.text[:200]}")

        release("dev")
        served_dev = time.perf_counter() - t_push
        release("prod")
        served_prod = time.perf_counter() - t_push
    finally:
        for srv in servers.values():
            srv.stop()
        if tracking_node is not None:
            from flywheel.core.procs import stop_process_group

            stop_process_group(tracking_node.pid)
        if not args.keep_dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)

    steps = dict(timeline)
    summary = {
        "benchmark": "loop_timing", "dataset": args.dataset, "epochs": args.epochs, "samples": args.samples,
        "steps": args.steps, "tracking": "server" if (tracking_node or args.tracking_uri) else "embedded",
        "version": version, "train_compute_s": train_seconds,
        "push_to_dev_s": served_dev, "push_to_dev_minus_train_s": served_dev - train_seconds,
        "push_to_prod_s": served_prod, "push_to_prod_minus_train_s": served_prod - train_seconds,
        "steps_s": steps, "mlflow_run_overhead_s": steps["mlflow run (train+gate)"] - train_seconds,
        "goal_push_to_dev_minus_train_s": 20.0,
    }
    print(f"\ntracking: {summary['tracking']}")
    print(f"training compute (train_seconds)     {train_seconds:7.1f} s")
    print(f"push → served in dev                 {served_dev:7.1f} s   minus training: "
          f"{served_dev - train_seconds:6.1f} s  (goal <= 20 s)")
    print(f"push → served in prod                {served_prod:7.1f} s   minus training: "
          f"{served_prod - train_seconds:6.1f} s")
    rest = ", ".join(f"{k} {v:.1f} s" for k, v in steps.items() if k != "mlflow run (train+gate)" and "prod" not in k)
    print(f"  of which mlflow run beyond training {summary['mlflow_run_overhead_s']:6.1f} s, {rest}")
    return summary


if __name__ == "__main__":
    main()
