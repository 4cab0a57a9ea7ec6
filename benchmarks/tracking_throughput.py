"""Metrics logged per second: tracking node (MLflow + basic-auth + Postgres + GCS emulator) vs the
embedded SQLite store, with single `log_metric` calls and with `log_batch`.

Both stores are measured in the same run on the same machine; the ratios are what to read.

    .venv/bin/python benchmarks/tracking_throughput.py [--single 300] [--batches 10] [--batch-size 1000]

The last stdout line is `BENCH_JSON {...}` (also written to --json-out), read by benchmarks/run_all.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import bench_io


def _measure(client, run_id: str, single: int, batches: int, batch_size: int) -> dict[str, float]:
    from mlflow.entities import Metric

    # Warm-up: connection pool, auth cache, first insert into a fresh table.
    client.log_metric(run_id, "warmup", 0.0, step=0)
    t0 = time.perf_counter()
    for i in range(single):
        client.log_metric(run_id, "single", float(i), step=i)
    single_rate = single / (time.perf_counter() - t0)
    ts = int(time.time() * 1000)
    t0 = time.perf_counter()
    for b in range(batches):
        metrics = [Metric(f"batch_{i % 10}", float(i), ts, b * batch_size + i) for i in range(batch_size)]
        client.log_batch(run_id, metrics=metrics, synchronous=True)
    batch_rate = batches * batch_size / (time.perf_counter() - t0)
    # Read-back check: everything measured was really stored.
    stored = sum(len(client.get_metric_history(run_id, f"batch_{k}")) for k in range(10))
    assert stored == batches * batch_size, (stored, batches * batch_size)
    assert len(client.get_metric_history(run_id, "single")) == single
    return {"single": single_rate, "batch": batch_rate}


def _embedded(root: Path, args) -> dict[str, float]:
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bench", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp)
    return _measure(client, run.info.run_id, args.single, args.batches, args.batch_size)


def _server(root: Path, args) -> dict[str, float]:
    import mlflow

    from flywheel.tracking.server import StackConfig, stack_down, stack_up

    state = stack_up(StackConfig(state_dir=root / "stack", throwaway=True))
    try:
        os.environ.update(state.client_env())
        client = mlflow.MlflowClient(state.tracking_uri)
        run = client.create_run(client.create_experiment("bench"))
        return _measure(client, run.info.run_id, args.single, args.batches, args.batch_size)
    finally:
        stack_down(root / "stack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--single", type=int, default=300, help="single log_metric calls per store")
    parser.add_argument("--batches", type=int, default=10, help="log_batch calls per store")
    parser.add_argument("--batch-size", type=int, default=1000, help="metrics per log_batch (MLflow max 1000)")
    parser.add_argument("--json-out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(var, None)
    root = Path(tempfile.mkdtemp(prefix="flywheel-bench-tracking-"))
    os.chmod(root, 0o711)  # the postgres system user must reach its data dir
    try:
        embedded = _embedded(root / "embedded", args)
        server = _server(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'store':44s} {'single calls/s':>15s} {'log_batch metrics/s':>20s}")
    print(f"{'embedded SQLite (in-process)':44s} {embedded['single']:15.1f} {embedded['batch']:20.1f}")
    print(f"{'server: basic-auth + Postgres 15 + GCS emu':44s} {server['single']:15.1f} {server['batch']:20.1f}")
    print(f"ratio server/embedded: single {server['single'] / embedded['single']:.2f}x, "
          f"log_batch {server['batch'] / embedded['batch']:.2f}x")
    print(f"log_batch vs single calls: embedded {embedded['batch'] / embedded['single']:.0f}x, "
          f"server {server['batch'] / server['single']:.0f}x")
    bench_io.emit({"benchmark": "tracking_throughput", "single_calls": args.single, "batches": args.batches,
                   "batch_size": args.batch_size, "embedded": embedded, "server": server,
                   "server_vs_embedded_single": server["single"] / embedded["single"],
                   "server_vs_embedded_batch": server["batch"] / embedded["batch"]}, args.json_out)


if __name__ == "__main__":
    main()
