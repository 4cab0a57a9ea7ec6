"""Benchmark: one registry version served by TorchServe (flywheel handler, batching on) vs
`mlflow models serve --env-manager local` (1 worker, as shipped).

N concurrent clients send single-image requests for T seconds; servers alternate per round so
both see the same machine state. Both are first warmed with the largest client count for --warmup
seconds: steady state is what a serving node spends its life in, and the JVM behind TorchServe
needs ~10 s of traffic before its request path is compiled (per-request frontend CPU fell ~2x
over the first 15 s here). Prints req/s, p50, p99 per server and the ratios, at 16 clients
and at 1 client. Goal at 16 clients: >=3x throughput and <=0.4x p99; at 1 client: p50 no worse.

Both servers get the same image: TorchServe as PNG bytes (the handler decodes and normalises),
MLflow as the normalised float tensor its signature takes (its pyfunc has no image decoding).
`mlflow models serve --workers 2` is not used: uvicorn adds ~45 ms per reused connection there.

    python benchmarks/serving.py                      # trains a small Fashion-MNIST model first
    python benchmarks/serving.py --tracking-uri URI --model NAME --version V --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_io  # benchmarks/ is the script's own directory: BENCH_JSON output, peer servers
import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def load(url: str, body: bytes, headers: dict, clients: int, seconds: float) -> dict:
    """`clients` threads POST `body` back to back for `seconds` on keep-alive connections.

    http.client, not requests: on 2 cores the client's own CPU per request must stay far below the
    servers', or both servers measure the load generator (requests costs ~1 ms of GIL per call).
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        mine, bad = [], 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                conn.request("POST", parts.path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            if ok:
                mine.append(time.perf_counter() - t0)
            else:
                bad += 1
        conn.close()
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    arr = np.asarray(lat) * 1000.0
    return {"rps": len(lat) / elapsed, "p50": float(np.percentile(arr, 50)) if len(arr) else float("nan"),
            "p99": float(np.percentile(arr, 99)) if len(arr) else float("nan"), "n": len(lat), "errors": errors[0]}


def merge(runs: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in runs])) for k in ("rps", "p50", "p99")} | {
        "n": sum(r["n"] for r in runs), "errors": sum(r["errors"] for r in runs)}


def start_mlflow(model_uri: str, tracking_uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    from flywheel.core.procs import free_port

    port = free_port()
    # mlflow serve execs `uvicorn` by name: this venv's bin must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    url = f"http://127.0.0.1:{port}"
    proc = bench_io.start_http_server([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", model_uri,
                              "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
                             env, workdir / "mlflow-serve.log", url, "/ping")
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--model", default="fashion-classifier")
    ap.add_argument("--version")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="seconds of load on each server before measuring (TorchServe's JVM JIT-compiles its "
                         "request path during the first ~10 s; MLflow gets the same warm-up)")
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-delay", type=int, default=1)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    from flywheel.contracts.capture import TRAFFIC_HEADER
    from flywheel.contracts.preprocessing import encode_png, to_tensor
    from flywheel.core.config import Settings
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model
    from flywheel.core.procs import stop_process_group
    from flywheel.serving.keys import read_keys
    from flywheel.serving.package import PackageConfig, package_version
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    settings = Settings.from_env(tracking_uri=args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}",
                                 work_dir=work, model_name=args.model).apply()
    version = args.version
    if version is None:
        import mlflow

        from flywheel.training.train import TrainConfig, run_training

        print("training a small Fashion-MNIST model (1 epoch, 5000 images)...", flush=True)
        result = run_training(TrainConfig(dataset="fashion-mnist", epochs=1, max_train_samples=5000,
                                          register=False), settings)
        version = str(mlflow.register_model(result.model_uri, args.model).version)
    pkg = package_version(PackageConfig(args.model, version=version, out_dir=work / "store",
                                        batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay),
                          settings)
    _, spec = load_model(f"models:/{args.model}/{version}")
    image = load_splits("fashion-mnist", settings.data_dir).test.images[0]
    png = encode_png(image)
    tensor_json = json.dumps({"inputs": to_tensor(image[None], spec.preprocess).numpy().tolist()})

    ts = start_torchserve(ServeConfig.local(work / "ts", work / "store", models=(f"{args.model}={pkg.mar_path.name}",)))
    ml_proc = None
    try:
        ml_proc, ml_url = start_mlflow(f"models:/{args.model}/{version}", settings.tracking_uri, work)
        key = read_keys(ts.key_file)["inference"]  # valid for the run: renewed at half of 1440 min
        ts_req = (f"{ts.cfg.inference_address}/predictions/{args.model}", png,
                  {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream",
                   TRAFFIC_HEADER: "benchmark"})  # captured (if capture is on) marked, never monitored
        ml_req = (f"{ml_url}/invocations", tensor_json.encode(), {"Content-Type": "application/json"})
        assert requests.post(ts_req[0], data=png, headers=ts_req[2], timeout=30).status_code == 200
        assert requests.post(ml_req[0], data=ml_req[1], headers=ml_req[2], timeout=30).status_code == 200
        for req in (ts_req, ml_req):  # steady state for both: JIT-compiled frontend, warm caches
            load(*req, max(args.clients), args.warmup)
        results = {}
        for clients in args.clients:
            runs = {"torchserve": [], "mlflow": []}
            for r in range(args.rounds):
                order = [("torchserve", ts_req), ("mlflow", ml_req)]
                for name, req in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                    runs[name].append(load(*req, clients, args.seconds))
            results[clients] = {k: merge(v) for k, v in runs.items()}
    finally:
        ts.stop()
        if ml_proc is not None:
            stop_process_group(ml_proc, timeout=30)

    print(f"\n{args.model} v{version}, {args.seconds:.0f} s x {args.rounds} rounds per point, "
          f"TorchServe batch {args.batch_size} / {args.max_batch_delay} ms, 1 worker each, {os.cpu_count()} CPUs")
    print(f"{'clients':>7} {'server':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for clients, res in results.items():
        for name in ("torchserve", "mlflow"):
            r = res[name]
            print(f"{clients:>7} {name:>11} {r['rps']:>9.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['errors']:>6}")
        t, m = res["torchserve"], res["mlflow"]
        print(f"{clients:>7} {'ratio':>11} {t['rps'] / m['rps']:>8.2f}x {t['p50'] / m['p50']:>7.2f}x "
              f"{t['p99'] / m['p99']:>7.2f}x   (torchserve / mlflow)")
    bench_io.emit({str(k): v for k, v in results.items()}, args.json_out)


if __name__ == "__main__":
    main()
