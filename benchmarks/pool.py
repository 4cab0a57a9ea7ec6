"""Benchmark: the serving pool (issue 14), TorchServe replicas behind HAProxy on this one host.

One registry version served by 3 TorchServe replicas (1 worker each) behind HAProxy
(`flywheel.serving.pool.start_pool`, the config `flywheel serve-pool` runs). At 16 clients,
alternating per round so every configuration sees the same machine state:
  * direct: the clients talk to replica r1 itself (its own key, no HAProxy);
  * pool-1, pool-2, pool-3: the clients talk to HAProxy with the pool credential, 1, 2 or 3 replicas
    in service (the others put in `maint` through the runtime API).
Reports req/s, p50, p99 of each, HAProxy's overhead as pool-1 / direct (req/s and p99), and the
per-replica efficiency rps(N) / (N x rps(pool-1)). On a 2-core box the replicas share the same
cores, so more replicas cannot add throughput: the efficiency figure says what they cost.
Then the canary promotion time: `pool_release` of a second registry version (same model) with steps
10 → 50 → 100 % under the same 16-client load (min 100 canary requests per step; the pool runs
without capture here, so the prediction-mix check is off and each step waits only for traffic).

    python benchmarks/pool.py                         # trains a small Fashion-MNIST model first
    python benchmarks/pool.py --seconds 8 --rounds 2 --warmup 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bench_io  # benchmarks/ is the script's own directory
import numpy as np
from serving import (  # the same keep-alive http.client load generator as benchmarks/serving.py
    load,
    model_to_serve,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri")
    ap.add_argument("--model", default="fashion-classifier")
    ap.add_argument("--version", help="registry version to serve (default: train one); the canary "
                                      "registers the same run again as the next version")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load on each replica first (JVM JIT)")
    ap.add_argument("--no-canary", action="store_true")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import mlflow

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits
    from flywheel.serving.keys import read_keys
    from flywheel.serving.package import PackageConfig, package_version
    from flywheel.serving.pool import CanaryPolicy, PoolTarget, pool_release, start_pool
    from flywheel.serving.release import AcceptanceConfig

    work, settings, version = model_to_serve(args.tracking_uri, args.model, args.version, "flywheel-bench-pool-")
    store = work / "store"
    pkg = package_version(PackageConfig(args.model, version=version, out_dir=store), settings)
    png = encode_png(load_splits("fashion-mnist", settings.data_dir).test.images[0])

    pool = start_pool(work / "pool", args.replicas, store, models=(f"{args.model}={pkg.mar_path.name}",))
    try:
        rt, spec = pool.runtime, pool.spec
        names = [r.name for r in spec.replicas]
        direct_key = read_keys(spec.replicas[0].key_file)["inference"]
        configs = {"direct": (f"{spec.replicas[0].inference_url}/predictions/{args.model}",
                              {"Authorization": f"Bearer {direct_key}"}, None)}
        pool_headers = {"Authorization": f"Bearer {spec.token()}"}
        for n in range(1, args.replicas + 1):
            configs[f"pool-{n}"] = (f"{pool.url}/predictions/{args.model}", pool_headers, n)
        headers_ct = {"Content-Type": "application/octet-stream"}

        def serve_with(n: int | None) -> None:
            for i, name in enumerate(names):
                rt.set_state(name, "ready" if n is None or i < n else "maint")
            for i, name in enumerate(names):
                if n is None or i < n:
                    rt.wait_status(name, "UP", timeout=30)

        print(f"warm-up: {args.warmup:.0f} s of {args.clients} clients through the pool", flush=True)
        serve_with(None)
        load(configs[f"pool-{args.replicas}"][0], png, {**pool_headers, **headers_ct}, args.clients, args.warmup)
        runs: dict[str, list[dict]] = {k: [] for k in configs}
        for rnd in range(args.rounds):
            for name, (url, headers, n) in configs.items():
                serve_with(n)
                res = load(url, png, {**headers, **headers_ct}, args.clients, args.seconds)
                runs[name].append(res)
                print(f"round {rnd + 1} {name:8s} {res['rps']:7.0f} req/s  p50 {res['p50']:6.1f} ms  "
                      f"p99 {res['p99']:6.1f} ms  errors {res['errors']}", flush=True)
        serve_with(None)
        med = {k: {m: float(np.median([r[m] for r in v])) for m in ("rps", "p50", "p99")} |
               {"errors": sum(r["errors"] for r in v), "n": sum(r["n"] for r in v)} for k, v in runs.items()}
        one = med["pool-1"]["rps"]
        summary = {
            "clients": args.clients, "replicas": args.replicas, "seconds": args.seconds, "rounds": args.rounds,
            "results": med,
            "haproxy_overhead_rps_ratio": one / med["direct"]["rps"],
            "haproxy_overhead_p99_ratio": med["pool-1"]["p99"] / med["direct"]["p99"],
            "efficiency": {n: med[f"pool-{n}"]["rps"] / (n * one) for n in range(1, args.replicas + 1)},
            "scaling": {n: med[f"pool-{n}"]["rps"] / one for n in range(1, args.replicas + 1)},
        }
        if not args.no_canary:
            import threading

            client = mlflow.MlflowClient(settings.tracking_uri)
            mv1 = client.get_model_version(args.model, version)  # the same run again: the next version
            v2 = str(client.create_model_version(args.model, mv1.source, run_id=mv1.run_id).version)
            pkg2 = package_version(PackageConfig(args.model, version=v2, out_dir=store), settings)
            stop = threading.Event()
            bg = threading.Thread(target=lambda: [load(configs[f"pool-{args.replicas}"][0], png,
                                                       {**pool_headers, **headers_ct}, args.clients, 2.0)
                                                  for _ in iter(stop.is_set, True)], daemon=True)
            bg.start()
            t0 = time.perf_counter()
            result = pool_release(settings, args.model, v2, "dev", PoolTarget(spec, grace_s=1.0),
                                  AcceptanceConfig(min_accuracy=0.0, p95_slo_ms=5000.0),
                                  CanaryPolicy(min_requests=100, min_labelled=0), mar_path=pkg2.mar_path)
            total = time.perf_counter() - t0
            stop.set()
            bg.join(30)
            canary_s = sum(t for _, t in result.step_times)
            summary["canary"] = {"promoted": result.promoted, "release_s": total, "canary_steps_s": canary_s,
                                 "staging_s": total - canary_s, "steps": dict(result.step_times)}
        print()
        print(f"{'config':9s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
        for k, v in med.items():
            print(f"{k:9s} {v['rps']:8.0f} {v['p50']:8.1f} {v['p99']:8.1f}   errors {v['errors']}")
        print(f"HAProxy overhead (pool-1 / direct): req/s {summary['haproxy_overhead_rps_ratio']:.2f}x, "
              f"p99 {summary['haproxy_overhead_p99_ratio']:.2f}x")
        print("per-replica efficiency rps(N)/(N*rps(1)): "
              + ", ".join(f"{n}: {e:.2f}" for n, e in summary["efficiency"].items()))
        if "canary" in summary:
            c = summary["canary"]
            print(f"canary release 10→50→100%: {c['release_s']:.1f} s in all "
                  f"({'promoted' if c['promoted'] else 'NOT promoted'}): staging (register + accept on "
                  f"{args.replicas} replicas, drained one by one) {c['staging_s']:.1f} s, live steps "
                  + ", ".join(f"{k}% {v:.1f} s" for k, v in c["steps"].items()))
        bench_io.emit(summary, args.json_out)
    finally:
        pool.stop()


if __name__ == "__main__":
    main()
