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

Triton (issue 17) is the third server: the same registry version packaged by `package_triton`, its
Python-backend model (the configuration that runs on CPU) behind the authenticating proxy, sent the
same PNG as a KServe v2 BYTES tensor. Each engine also serves a no-op model on the same server
with the same batching (TorchServe: a handler that answers a constant; Triton: a Python-backend
model that does the same), the engine's floor; the report gives Flywheel's model as a share of it
(goal: >=0.8x the floor's req/s at 16 clients on both engines). `--engines` picks the servers;
`--workers N` gives Flywheel's model and the floor alike N TorchServe workers / N Triton instances.
That share counts the served network's forward as well as Flywheel's handler; `--arch mlp` serves a
network whose forward is near free, so what is left above the floor is the handler.

Each point also reports CPU per answered request: the server's whole process tree (TorchServe's Java
frontend and Python workers; tritonserver, its Python-backend stubs and the proxy; MLflow's uvicorn)
and this load generator, from /proc while that point ran. On a box shared with other jobs req/s
measures the share of the cores the servers got; CPU per request is what each answer cost.

    python benchmarks/serving.py                      # trains a small Fashion-MNIST model first
    python benchmarks/serving.py --tracking-uri URI --model NAME --version V --seconds 10
    python benchmarks/serving.py --engines torchserve triton   # no MLflow
    python benchmarks/serving.py --arch mlp --engines torchserve triton --clients 16   # the handler's share
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by `pids` and all their descendants alive now."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # exited between listing and reading: its CPU is no longer counted
                pass
    return total


def load(url: str, body: bytes, headers: dict, clients: int, seconds: float, pids: list[int] = ()) -> dict:
    """`clients` threads POST `body` back to back for `seconds` on keep-alive connections; with
    `pids`, also the CPU ms per answered request of their process trees and of this process.

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
    server0, client0 = tree_cpu(list(pids)), time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    server_s, client_s = tree_cpu(list(pids)) - server0, time.process_time() - client0
    arr = np.asarray(lat) * 1000.0
    n = max(len(lat), 1)
    return {"rps": len(lat) / elapsed, "p50": float(np.percentile(arr, 50)) if len(arr) else float("nan"),
            "p99": float(np.percentile(arr, 99)) if len(arr) else float("nan"), "n": len(lat), "errors": errors[0],
            "server_cpu_ms": server_s / n * 1000.0, "client_cpu_ms": client_s / n * 1000.0}


def merge(runs: list[dict]) -> dict:
    return {k: float(np.median([r[k] for r in runs])) for k in ("rps", "p50", "p99", "server_cpu_ms", "client_cpu_ms")
            } | {"n": sum(r["n"] for r in runs), "errors": sum(r["errors"] for r in runs)}


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


NOOP_HANDLER = """
def handle(data, context):
    if data is None:  # load-time call
        return None
    return ['{"label": "noop"}'] * len(data)
"""

NOOP_TRITON_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            n = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().shape[0]
            value = np.array([b'{"label": "noop"}'] * n, dtype=np.object_).reshape(n, 1)
            out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("prediction", value)]))
        return out
"""


def noop_mar(store: Path, batch_size: int, delay_ms: int, workers: int = 1) -> str:
    """A .mar whose handler answers a constant: TorchServe's floor with the same batching and workers."""
    import yaml

    from flywheel.serving.package import _archiver

    src = store.parent / "noop-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "noop.py").write_text(NOOP_HANDLER)
    (src / "model-config.yaml").write_text(yaml.safe_dump({"minWorkers": workers, "maxWorkers": workers, "batchSize": batch_size,
                                                           "maxBatchDelay": delay_ms, "responseTimeout": 30}))
    subprocess.run([_archiver(), "--model-name", "noop", "--version", "1", "--handler", str(src / "noop.py"),
                    "--config-file", str(src / "model-config.yaml"), "--export-path", str(store), "--force"],
                   check=True, env={**os.environ, "TMPDIR": str(src)})
    return "noop.mar"


def noop_triton(repository: Path, max_queue_delay_us: int, instances: int = 1) -> str:
    """A Python-backend model answering a constant, same input/batching/instances as Flywheel's: Triton's floor."""
    from flywheel.serving.triton import TensorSpec, TritonModelConfig, render_config

    (repository / "noop" / "1").mkdir(parents=True, exist_ok=True)
    (repository / "noop" / "1" / "model.py").write_text(NOOP_TRITON_MODEL)
    (repository / "noop" / "config.pbtxt").write_text(render_config(
        "noop", inputs=[TensorSpec("image", "TYPE_STRING", (1,))], outputs=[TensorSpec("prediction", "TYPE_STRING", (1,))],
        versions=["1"], cfg=TritonModelConfig(max_queue_delay_us=max_queue_delay_us, instances=instances), backend="python"))
    return "noop"


def model_to_serve(tracking_uri: str | None, model: str, version: str | None, prefix: str, arch: str = "small-cnn"):
    """(work dir, applied Settings, version) for a benchmark: `version` of `model` in `tracking_uri`,
    or, without a version, a small Fashion-MNIST model of the built-in architecture `arch` (1 epoch,
    5000 images) trained and registered in a fresh SQLite store in the work dir."""
    from flywheel.core.config import Settings

    work = Path(tempfile.mkdtemp(prefix=prefix))
    settings = Settings.from_env(tracking_uri=tracking_uri or f"sqlite:///{work / 'mlflow.db'}",
                                 work_dir=work, model_name=model).apply()
    if version is None:
        import mlflow

        from flywheel.training.train import TrainConfig, run_training

        print(f"training a small Fashion-MNIST {arch} (1 epoch, 5000 images)...", flush=True)
        result = run_training(TrainConfig(dataset="fashion-mnist", model=arch, epochs=1, max_train_samples=5000,
                                          register=False), settings)
        version = str(mlflow.register_model(result.model_uri, model).version)
    return work, settings, version


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--model", default="fashion-classifier")
    ap.add_argument("--version")
    ap.add_argument("--arch", default="small-cnn",
                    help="built-in architecture trained when no --version is given; `mlp` (a forward ~25x "
                         "cheaper than small-cnn's) measures the handler and engine rather than the network")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="seconds of load on each server before measuring (TorchServe's JVM JIT-compiles its "
                         "request path during the first ~10 s; MLflow gets the same warm-up)")
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 1])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-batch-delay", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1,
                    help="TorchServe workers / Triton instances, for Flywheel's model and the floor alike")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--engines", nargs="+", default=["torchserve", "triton", "mlflow"],
                    choices=["torchserve", "triton", "mlflow"])
    ap.add_argument("--no-floor", action="store_true", help="skip the engines' no-op models")
    args = ap.parse_args()

    from flywheel.contracts.capture import TRAFFIC_HEADER
    from flywheel.contracts.preprocessing import encode_png, to_tensor
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model
    from flywheel.core.procs import stop_process_group
    from flywheel.serving.keys import read_keys
    from flywheel.serving.package import PackageConfig, package_triton, package_version
    from flywheel.serving.torchserve import ServeConfig, start_torchserve
    from flywheel.serving.triton import TritonServeConfig, encode_infer_request, start_triton

    work, settings, version = model_to_serve(args.tracking_uri, args.model, args.version, "flywheel-bench-", args.arch)
    engines = args.engines
    store = work / "store"
    if "torchserve" in engines:
        pkg = package_version(PackageConfig(args.model, version=version, out_dir=store, batch_size=args.batch_size,
                                            max_batch_delay_ms=args.max_batch_delay, workers=args.workers), settings)
    if "triton" in engines:
        package_triton(PackageConfig(args.model, version=version, max_batch_delay_ms=args.max_batch_delay,
                                     workers=args.workers),
                       settings, work / "triton-repository")
    _, spec = load_model(f"models:/{args.model}/{version}")
    image = load_splits("fashion-mnist", settings.data_dir).test.images[0]
    png = encode_png(image)
    tensor_json = json.dumps({"inputs": to_tensor(image[None], spec.preprocess).numpy().tolist()})

    servers: dict[str, tuple] = {}  # name → (url, body, headers, server pids)
    stops = []
    try:
        if "torchserve" in engines:
            models = [f"{args.model}={pkg.mar_path.name}"]
            if not args.no_floor:
                models.append(f"noop={noop_mar(store, args.batch_size, args.max_batch_delay, args.workers)}")
            ts = start_torchserve(ServeConfig.local(work / "ts", store, models=tuple(models)))
            stops.append(ts.stop)
            key = read_keys(ts.key_file)["inference"]  # valid for the run: renewed at half of 1440 min
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream",
                       TRAFFIC_HEADER: "benchmark"}  # captured (if capture is on) marked, never monitored
            pids = [ts.proc.pid]
            servers["torchserve"] = (f"{ts.cfg.inference_address}/predictions/{args.model}", png, headers, pids)
            if not args.no_floor:
                servers["torchserve-floor"] = (f"{ts.cfg.inference_address}/predictions/noop", png, headers, pids)
        if "triton" in engines:
            repo = work / "triton-repository"
            models = [args.model] + ([] if args.no_floor else [noop_triton(repo, args.max_batch_delay * 1000, args.workers)])
            tr = start_triton(TritonServeConfig.local(work / "triton", repo, models=tuple(models)))
            stops.append(tr.stop)
            body, base = encode_infer_request([png], outputs=("prediction",))
            headers = {**base, "Authorization": f"Bearer {read_keys(tr.key_file)['inference']}",
                       TRAFFIC_HEADER: "benchmark"}
            pids = [tr.triton.pid, tr.proxy.pid]
            servers["triton"] = (f"{tr.url}/v2/models/{args.model}/infer", body, headers, pids)
            if not args.no_floor:
                servers["triton-floor"] = (f"{tr.url}/v2/models/noop/infer", body, headers, pids)
        if "mlflow" in engines:
            ml_proc, ml_url = start_mlflow(f"models:/{args.model}/{version}", settings.tracking_uri, work)
            stops.append(lambda: stop_process_group(ml_proc, timeout=30))
            servers["mlflow"] = (f"{ml_url}/invocations", tensor_json.encode(), {"Content-Type": "application/json"},
                                 [ml_proc.pid])
        for name, req in servers.items():
            r = requests.post(req[0], data=req[1], headers=req[2], timeout=30)
            assert r.status_code == 200, (name, r.status_code, r.text[:300])
        for req in servers.values():  # steady state for all: JIT-compiled frontend, warm caches
            load(*req[:3], max(args.clients), args.warmup)
        results = {}
        for clients in args.clients:
            runs = {name: [] for name in servers}
            for r in range(args.rounds):
                order = list(servers.items())
                for name, req in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                    runs[name].append(load(*req[:3], clients, args.seconds, req[3]))
            results[clients] = {k: merge(v) for k, v in runs.items()}
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(work, ignore_errors=True)  # the temp work dir: store, servers' dirs, a trained model's db

    print(f"\n{args.model} v{version}{'' if args.version else f' ({args.arch})'}, {args.seconds:.0f} s x {args.rounds} rounds per point, batch "
          f"{args.batch_size} / {args.max_batch_delay} ms, {args.workers} worker(s)/instance(s) each, {os.cpu_count()} CPUs")
    print("cpu ms/req: CPU of the server's process tree (client: this load generator) per answered request; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'clients':>7} {'server':>16} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'cpu ms/req':>10} "
          f"{'client':>7}")
    for clients, res in results.items():
        for name, r in res.items():
            print(f"{clients:>7} {name:>16} {r['rps']:>9.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['errors']:>6} "
                  f"{r['server_cpu_ms']:>10.3f} {r['client_cpu_ms']:>7.3f}")
        for a, b in (("torchserve", "mlflow"), ("triton", "mlflow"), ("triton", "torchserve"),
                     ("torchserve", "torchserve-floor"), ("triton", "triton-floor")):
            if a in res and b in res:
                t, m = res[a], res[b]
                print(f"{clients:>7} {'ratio':>16} {t['rps'] / m['rps']:>8.2f}x {t['p50'] / m['p50']:>7.2f}x "
                      f"{t['p99'] / m['p99']:>7.2f}x {'':>6} {t['server_cpu_ms'] / m['server_cpu_ms']:>9.2f}x   ({a} / {b})")
    bench_io.emit({str(k): v for k, v in results.items()}, args.json_out)


if __name__ == "__main__":
    main()
