"""Soak: days of uptime compressed into minutes — short-lived keys, a killed replica, a monitor reading.

Two TorchServe replicas of one registry version, keys that expire after --token-expiry-minutes (1:
a rotation every ~30 s per key, ~2 880 a day of the shipped 1 440-minute keys compressed into 30
minutes), both capturing into one store, a `flywheel monitor` service (a real subprocess) reading
that store, and --clients threads sending Fashion-MNIST test images for --minutes. Halfway through,
one replica is SIGKILLed (JVM, workers and all) and started again on the same ports.

Clients spread requests over the replicas and fail over to the other one when a replica does not
answer, as the load balancer in front of a pool does; a request counts as failed only when no
replica answered it with 200 (auth rejections, 4xx and 5xx included).

Prints requests, failures (goal 0), failovers, key rotations seen, /ping results, captures stored vs
read by the monitor (goal: equal — exactly-once reading), and monitor windows; the last line is
BENCH_JSON. The peer here is the goal itself (0 failed, stored == read); timings are not claimed.

    python benchmarks/soak.py                         # 30 minutes, as in benchmarks/README.md
    python benchmarks/soak.py --minutes 3             # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_io  # benchmarks/ is the script's own directory: BENCH_JSON output

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def stored_records(capture_uri: str, model: str) -> int:
    """Records in every capture batch of `model` in the store (what the monitor must read, once)."""
    from flywheel.contracts.capture import list_batches, read_batch

    return sum(len(read_batch(capture_uri, model, name)) for name in list_batches(capture_uri, model))


def scrape(url: str) -> dict[str, float]:
    """Prometheus text → {metric{labels}: value} (only the lines this benchmark reads)."""
    import requests

    out = {}
    for line in requests.get(url, timeout=5).text.splitlines():
        m = re.match(r"^(flywheel_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def read_total(metrics: dict[str, float]) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith("flywheel_captures_read_total")))


class Load:
    """`clients` threads, round-robin over replicas, failover to the next replica on no answer."""

    def __init__(self, replicas: list, model: str, bodies: list[bytes], clients: int):
        self.replicas, self.model, self.bodies = replicas, model, bodies
        self.ok = self.failed = self.failovers = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)

    def _worker(self, index: int) -> None:
        import requests

        clients = {}  # replica index → its TorchServeClient (one session per thread and replica)
        bodies = itertools.cycle(self.bodies[index::len(self.threads)] or self.bodies)
        turn = index
        while not self.stop_event.is_set():
            body = next(bodies)
            answered, why = False, ""
            for attempt in range(len(self.replicas)):
                r_index = (turn + attempt) % len(self.replicas)
                server = self.replicas[r_index]
                if r_index not in clients or clients[r_index][0] is not server:
                    clients[r_index] = (server, server.client(timeout=30))
                try:
                    r = clients[r_index][1].predict(self.model, body)
                except (requests.RequestException, OSError) as exc:  # replica down: the next one answers
                    why = f"{type(exc).__name__}"
                    continue
                if r.status_code == 200:
                    answered = True
                    break
                why = f"HTTP {r.status_code} {r.text[:120]}"
                if r.status_code < 500:
                    break  # a 4xx is the request's fault or an auth failure: another replica won't help
            turn += 1
            with self.lock:
                if answered:
                    self.ok += 1
                    self.failovers += attempt
                else:
                    self.failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(why)


class KeyWatch(threading.Thread):
    """Counts distinct inference keys each replica's key file holds, and pings every replica."""

    def __init__(self, replicas: list, down: set):
        super().__init__(daemon=True)
        self.replicas, self.down = replicas, down
        self.keys: list[set] = [set() for _ in replicas]
        self.pings_ok = self.pings_bad = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        from flywheel.serving.keys import read_keys

        while not self.stop_event.wait(1.0):
            for i, server in enumerate(self.replicas):
                if i in self.down:
                    continue
                try:
                    self.keys[i].add(read_keys(server.key_file)["inference"])
                    healthy = server.client(timeout=5).ping().status_code == 200
                except Exception:  # noqa: BLE001 - any failure of a live replica's ping is what we count
                    healthy = False
                if i in self.down:  # killed while we asked
                    continue
                if healthy:
                    self.pings_ok += 1
                else:
                    self.pings_bad += 1

    def rotations(self) -> int:
        return sum(max(0, len(k) - 1) for k in self.keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="length of the load")
    ap.add_argument("--clients", type=int, default=8, help="client threads")
    ap.add_argument("--replicas", type=int, default=2, help="TorchServe replicas (one is killed mid-run)")
    ap.add_argument("--token-expiry-minutes", type=float, default=1.0, help="TorchServe token_expiration_min")
    ap.add_argument("--window", type=int, default=100, help="monitor window")
    ap.add_argument("--down-seconds", type=float, default=20.0, help="how long the killed replica stays down")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    import mlflow

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.config import Settings
    from flywheel.core.data import load_splits
    from flywheel.core.procs import free_port, stop_process_group
    from flywheel.serving.package import PackageConfig, package_version
    from flywheel.serving.torchserve import ServeConfig, start_torchserve
    from flywheel.training.train import TrainConfig, run_training

    work = Path(tempfile.mkdtemp(prefix="flywheel-soak-"))
    model = "fashion-classifier"
    settings = Settings.from_env(tracking_uri=f"sqlite:///{work / 'mlflow.db'}", work_dir=work,
                                 model_name=model).apply()
    print(f"work dir {work}; training a small Fashion-MNIST model (1 epoch, 5000 images)...", flush=True)
    result = run_training(TrainConfig(dataset="fashion-mnist", epochs=1, max_train_samples=5000, register=False),
                          settings)
    version = str(mlflow.register_model(result.model_uri, model).version)
    mlflow.MlflowClient().set_registered_model_alias(model, "prod", version)
    pkg = package_version(PackageConfig(model, version=version, out_dir=work / "store"), settings)
    images = load_splits("fashion-mnist", settings.data_dir).test.images[:2000]
    bodies = [encode_png(img) for img in images]
    captures = str(work / "captures")

    configs = [ServeConfig.local(work / f"replica-{i}", work / "store", models=(f"{model}={pkg.mar_path.name}",),
                                 token_expiration_min=args.token_expiry_minutes) for i in range(args.replicas)]
    serve_env = {"FLYWHEEL_CAPTURE_URI": captures}
    replicas = [start_torchserve(cfg, env=serve_env) for cfg in configs]
    metrics_port = free_port()
    monitor_log = open(work / "monitor.log", "wb")
    monitor = subprocess.Popen(
        [str(Path(sys.executable).with_name("flywheel")), "monitor", "--model", model, "--env", "prod",
         "--capture-uri", captures, "--interval", "10", "--window", str(args.window),
         "--metrics-port", str(metrics_port), "--state-dir", str(work / "monitor")],
        env={**os.environ, **settings.child_env()}, stdout=monitor_log, stderr=subprocess.STDOUT,
        start_new_session=True)
    down: set[int] = set()
    load = Load(replicas, model, bodies, args.clients)
    watch = KeyWatch(replicas, down)
    kill_at = time.monotonic() + args.minutes * 30.0
    end_at = time.monotonic() + args.minutes * 60.0
    killed = restarted = False
    started = time.monotonic()
    try:
        load.start()
        watch.start()
        while time.monotonic() < end_at:
            time.sleep(1.0)
            if not killed and time.monotonic() >= kill_at:
                victim = replicas[-1]
                down.add(len(replicas) - 1)
                os.killpg(victim.proc.pid, signal.SIGKILL)  # JVM and workers, no goodbye
                victim.stop()  # reaps it, stops its renewer thread, removes its worker sockets
                killed = True
                print(f"[{time.monotonic() - started:6.0f} s] killed replica {len(replicas) - 1}", flush=True)
                time.sleep(args.down_seconds)
                replicas[-1] = start_torchserve(configs[-1], env=serve_env)
                down.discard(len(replicas) - 1)
                restarted = True
                print(f"[{time.monotonic() - started:6.0f} s] replica {len(replicas) - 1} back", flush=True)
            if int(time.monotonic() - started) % 60 == 0:
                print(f"[{time.monotonic() - started:6.0f} s] ok {load.ok} failed {load.failed} "
                      f"failovers {load.failovers} rotations {watch.rotations()}", flush=True)
        load.stop()
        watch.stop_event.set()
        time.sleep(3.0)  # the workers' capture writers flush every second
        stored = stored_records(captures, model)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 120.0  # the monitor's next ticks read the rest
        metrics = scrape(url)
        while read_total(metrics) < stored and time.monotonic() < deadline:
            time.sleep(2.0)
            metrics = scrape(url)
    finally:
        load.stop_event.set()
        for server in replicas:
            server.stop()
        if monitor.poll() is None:
            stop_process_group(monitor, timeout=60)
        monitor_log.close()

    read = read_total(metrics)
    windows = int(sum(v for k, v in metrics.items() if k.startswith("flywheel_drift_windows_total")))
    summary = {
        "minutes": args.minutes, "clients": args.clients, "replicas": args.replicas,
        "token_expiry_minutes": args.token_expiry_minutes, "requests": load.ok + load.failed, "ok": load.ok,
        "failed": load.failed, "failovers": load.failovers, "rotations": watch.rotations(),
        "pings_ok": watch.pings_ok, "pings_bad": watch.pings_bad, "replica_killed": killed,
        "replica_restarted": restarted, "captures_stored": stored, "captures_read": read, "monitor_windows": windows,
        # answered but never stored: what the SIGKILLed replica still held in its capture queue
        "captures_lost_with_killed_replica": load.ok - stored,
        "errors": load.errors[:5],
    }
    print(f"\n{args.minutes:g} min, {args.clients} clients, {args.replicas} replicas, keys expire every "
          f"{args.token_expiry_minutes:g} min, one replica SIGKILLed and restarted mid-run")
    print(f"requests {summary['requests']}  failed {load.failed} (goal 0)  failovers {load.failovers}")
    print(f"key rotations seen {summary['rotations']}  /ping ok {watch.pings_ok} bad {watch.pings_bad}")
    print(f"captures stored {stored}  read by the monitor {read} (goal equal)  windows {windows}  "
          f"answered but not stored {load.ok - stored} (the killed replica's queue)")
    if load.errors:
        print("first errors:", load.errors[:5])
    bench_io.emit(summary, args.json_out)


if __name__ == "__main__":
    main()
