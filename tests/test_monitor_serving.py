"""The monitor against real served traffic: TorchServe with the flywheel handler capturing, real monitor.

Every test sends real Fashion-MNIST test images (held out from training) through TorchServe's
inference API, lets the handler's capture writer store them, and runs the real `Monitor.tick` on the
store: no-shift traffic never triggers; shifted traffic triggers (GitHub dispatch received by a
local server); 20% shifted traffic triggers; a hung or unreachable store costs no request.
"""

from __future__ import annotations

import base64
import time
import urllib.request

import numpy as np
import pytest

from flywheel.contracts.capture import iter_captures, read_writer_stats
from flywheel.contracts.preprocessing import encode_png
from flywheel.core.shifts import shift_images
from tests.conftest import free_port

pytestmark = pytest.mark.integration
ALIAS = "monitored"  # our own alias: the serving tests move dev/prod on the same registry


def _send(client, model, images, per_request=50) -> list[float]:
    latencies = []
    for i in range(0, len(images), per_request):
        body = {"images": [base64.b64encode(encode_png(img)).decode() for img in images[i:i + per_request]]}
        start = time.perf_counter()
        r = client.predict(model, body)
        latencies.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return latencies


def _wait_captured(uri, model, n, since_ts, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = sum(1 for c in iter_captures(uri, model) if c.ts >= since_ts)
        if got >= n:
            return got
        time.sleep(0.3)
    raise AssertionError(f"only {got} of {n} captures arrived in {timeout}s")


def _monitor(server, tmp_path, window, consecutive, actions=(), snapshot_dir=None):
    import mlflow

    from flywheel.core.config import Settings
    from flywheel.monitoring.service import Monitor, MonitorConfig
    from flywheel.monitoring.triggers import PolicyConfig

    settings = Settings.from_env(tracking_uri=server.tracking_uri, work_dir=server.work_dir,
                                 model_name=server.model).apply()
    mlflow.MlflowClient().set_registered_model_alias(server.model, ALIAS, server.version)
    cfg = MonitorConfig(model=server.model, capture_uri=server.capture_uri, env=ALIAS, state_dir=tmp_path / "mon",
                        window=window, settle_s=0.0, from_now=True, snapshot_dir=snapshot_dir)
    mon = Monitor(cfg, settings, list(actions), PolicyConfig(consecutive=consecutive, cooldown_s=3600))
    mon.tick()  # sets the cursor to "now": only this test's traffic counts
    return mon


def _stream(server, mon, images, chunk):
    """Serve `images` chunk by chunk, ticking the monitor after each; returns (results, served at trigger)."""
    results, fired_at = [], None
    for i in range(0, len(images), chunk):
        start = time.time() - 1
        _send(server.client, server.model, images[i:i + chunk])
        _wait_captured(server.capture_uri, server.model, len(images[i:i + chunk]), start)
        out = mon.tick()
        results += out
        if fired_at is None and any(r.trigger for r in out):
            fired_at = i + chunk
            break
    return results, fired_at


def test_no_shift_stream_never_triggers(monitored_torchserve, fashion_embeddings, tmp_path):
    from prometheus_client import generate_latest

    server = monitored_torchserve
    mon = _monitor(server, tmp_path, window=50, consecutive=3)
    clean = fashion_embeddings.clean_images[:1000]  # held-out test images: 20 windows of 50
    results, fired_at = _stream(server, mon, clean, chunk=500)
    assert len(results) == 20 and fired_at is None
    assert sum(r.drift for r in results) <= 2, [round(r.p_value, 4) for r in results]
    assert all(r.version == server.version and r.size == 50 for r in results)
    # every window logged to the `monitoring` experiment, with the drift-over-time plot
    import mlflow

    client = mlflow.MlflowClient()
    history = client.get_metric_history(mon.state.run_id, "p_value")
    assert sorted(m.step for m in history) == list(range(1, 21))
    assert [a.path for a in client.list_artifacts(mon.state.run_id, "plots")] == ["plots/drift_over_time.png"]
    assert client.get_experiment(client.get_run(mon.state.run_id).info.experiment_id).name == "monitoring"
    # Prometheus exposition, served over HTTP like Prometheus scrapes it
    port = free_port()
    server_thread = mon.metrics.serve(port, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server_thread[0].shutdown()
    for name in ("flywheel_drift_p_value", "flywheel_drift_detected", "flywheel_drift_window_size",
                 "flywheel_capture_lag_seconds", "flywheel_capture_dropped", "flywheel_prediction_class_fraction"):
        assert name in text
    assert 'flywheel_drift_windows_total{env="monitored",model="fashion-classifier"} 20.0' in text
    # every record read is counted once: 1000 monitored into 20 full windows, none left pending
    assert 'flywheel_captures_read_total{env="monitored",kind="monitored",model="fashion-classifier"} 1000.0' in text
    assert 'flywheel_captures_pending{env="monitored",model="fashion-classifier"} 0.0' in text
    assert generate_latest(mon.metrics.registry)


def test_shifted_stream_triggers_within_300_samples(monitored_torchserve, fashion_embeddings, github_api, tmp_path):
    from flywheel.monitoring.triggers import GitHubDispatch

    server = monitored_torchserve
    action = GitHubDispatch("acme/flywheel", token="t0ken", api_url=github_api.url)
    from flywheel.monitoring.snapshot import take_snapshot

    labelled = tmp_path / "labelled" / "Bag"
    labelled.mkdir(parents=True)
    (labelled / "one.png").write_bytes(encode_png(fashion_embeddings.clean_images[0]))
    snap = take_snapshot(None, server.model, tmp_path / "snaps", (tmp_path / "labelled",))
    mon = _monitor(server, tmp_path, window=50, consecutive=3, actions=[action], snapshot_dir=tmp_path / "snaps")
    inverted = shift_images(fashion_embeddings.shift_images[:300], "invert")
    results, fired_at = _stream(server, mon, inverted, chunk=50)
    assert fired_at is not None and fired_at <= 300, [round(r.p_value, 6) for r in results]
    (req,) = github_api.requests  # delivered in the same tick, exactly once
    payload = req["json"]["client_payload"]
    assert req["json"]["event_type"] == "retrain"
    assert payload["reason"] == "drift" and payload["model"] == server.model and payload["version"] == server.version
    assert payload["snapshot"] == str(snap.path) and payload["snapshot_digest"] == snap.digest


def test_twenty_percent_shifted_stream_triggers(monitored_torchserve, fashion_embeddings, tmp_path):
    server = monitored_torchserve
    mon = _monitor(server, tmp_path, window=100, consecutive=2)
    rng = np.random.default_rng(3)
    n = 800
    clean = fashion_embeddings.clean_images[1000:1000 + n]
    shifted = shift_images(fashion_embeddings.shift_images, "rotate")
    stream = clean.copy()
    idx = rng.choice(n, n // 5, replace=False)  # 20% of the traffic, spread through every window
    stream[idx] = shifted[rng.choice(len(shifted), len(idx), replace=False)]
    results, fired_at = _stream(server, mon, stream, chunk=200)
    assert fired_at is not None, [round(r.p_value, 5) for r in results]
    assert [r.trigger for r in results if r.trigger] == ["drift"] and mon.policy.state.episodes == 1


def test_unreachable_capture_store_costs_no_request(serving_models, fashion_embeddings, tmp_path):
    """Capture uploads in the background: while the store hangs (accepts, never answers) every request
    is answered, and what could not be stored is counted, in TorchServe's metrics at once and in the
    writer's published stats once the store is back."""
    import socket

    from tests.fixtures_monitor import GCSEmulator, start_capturing_torchserve

    port = free_port()
    emu = GCSEmulator(f"http://127.0.0.1:{port}", port, "caps", tmp_path / "gcs", tmp_path / "gcs.log")
    emu.start()
    uri = "gs://caps/served"
    # An upload to the hung store then hangs for the whole test rather than giving up after 5 s.
    server = start_capturing_torchserve(serving_models, tmp_path / "ts", uri,
                                        env={"STORAGE_EMULATOR_HOST": emu.host, "FLYWHEEL_CAPTURE_TIMEOUT": "600"})
    silent = None
    try:
        client = server.client()
        images = fashion_embeddings.clean_images[:400]
        for img in images[:100]:
            _predict(client, serving_models.name, img)
        _wait_captured_gcs(emu, uri, serving_models.name, 100)
        emu.stop()
        silent = socket.create_server(("127.0.0.1", port), backlog=64)  # the store now hangs
        silent.settimeout(60)
        _predict(client, serving_models.name, images[100])
        upload, _ = silent.accept()  # the writer's next upload: connected, never answered
        for img in images[101:400]:
            _predict(client, serving_models.name, img)
        # All 300 were answered while that upload still hung: none of them waited for the store.
        assert _connected_and_unanswered(upload)
        upload.close()
        silent.close()  # the store is now down: the hung upload fails, and every later one at once
        silent = None
        # While the store is down, TorchServe's Prometheus endpoint already counts the drops.
        deadline, exported = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline and exported < 50:
            _predict(client, serving_models.name, images[2])
            exported = sum(float(line.rsplit(" ", 1)[1]) for line in client.metrics().splitlines()
                           if line.startswith("FlywheelCaptureDropped{"))
            time.sleep(0.5)
        assert exported >= 50, exported
        emu.start()  # back: the writer reports what it had to drop
        _predict(client, serving_models.name, images[0])
        deadline = time.monotonic() + 60
        dropped = 0
        while time.monotonic() < deadline and dropped == 0:
            with _emulator_env(emu):
                dropped = sum(s.get("dropped", 0) for s in read_writer_stats(uri, serving_models.name))
            if dropped == 0:
                _predict(client, serving_models.name, images[1])
                time.sleep(1)
        assert dropped >= 100, dropped  # most of the 300 requests made while the store was down
    finally:
        if silent is not None:
            silent.close()
        server.stop()
        emu.stop()


def _connected_and_unanswered(conn) -> bool:
    """True while the peer of an accepted connection that was never answered still holds it open."""
    conn.setblocking(False)
    try:
        while conn.recv(65536):  # what the peer sent (its request), never read until now
            pass
        return False  # end of stream: the peer gave up and closed
    except BlockingIOError:
        return True


def _predict(client, model, image) -> None:
    r = client.predict(model, encode_png(image))
    assert r.status_code == 200, r.text


class _emulator_env:
    def __init__(self, emu):
        self.emu = emu

    def __enter__(self):
        import os

        self.old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.emu.host

    def __exit__(self, *exc):
        import os

        if self.old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = self.old


def _wait_captured_gcs(emu, uri, model, n, timeout=60.0):
    with _emulator_env(emu):
        _wait_captured(uri, model, n, 0, timeout)


def test_release_traffic_is_captured_marked_and_never_monitored(serving_models, fashion_embeddings, tmp_path):
    """A release's warm-up and acceptance requests land in the capture store marked; the monitor's
    windows are made of the users' requests only."""
    import json

    from flywheel.contracts.capture import CaptureCursor, CaptureReader
    from flywheel.serving.release import AcceptanceConfig, ManagementTarget, release_version
    from tests.fixtures_monitor import start_capturing_torchserve

    name, v2 = serving_models.name, serving_models.versions[1]
    caps = str(tmp_path / "captures")
    server = start_capturing_torchserve(serving_models, tmp_path / "ts", caps)  # serves v1
    try:
        settings = serving_models.settings()
        target = ManagementTarget(server.cfg.inference_address, server.cfg.management_address, server.key_file,
                                  server.cfg.model_store, grace_s=0.5, keep_previous=1)
        accept = AcceptanceConfig(min_accuracy=0.3, p95_slo_ms=5000, accuracy_samples=64, latency_requests=10)
        assert release_version(settings, name, v2, "dev", target, accept, mar_path=serving_models.mars[v2]).switched
        client = server.client()
        live_ids = set()
        for i in range(0, 100, 25):  # the users: 100 images after the release, no traffic header
            body = {"images": [base64.b64encode(encode_png(img)).decode()
                               for img in fashion_embeddings.clean_images[i:i + 25]]}
            r = client.predict(name, body)
            assert r.status_code == 200, r.text
            live_ids |= {p["prediction_id"] for p in r.json()["predictions"]}
        marked_expected = {"warmup": accept.warmup_requests,
                           "acceptance": accept.smoke_samples + accept.accuracy_samples + accept.latency_requests + 1}
        reader = CaptureReader(caps, name)
        deadline = time.monotonic() + 60
        while True:
            caps_read = [c for n in reader.poll(CaptureCursor()).names for c in reader.read(n)]
            if len(caps_read) >= len(live_ids) + sum(marked_expected.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        by_kind: dict[str, int] = {}
        for c in caps_read:
            by_kind[c.traffic] = by_kind.get(c.traffic, 0) + 1
        assert by_kind == {"live": 100, **marked_expected}, by_kind  # the audit trail: every request, marked
        assert {c.prediction_id for c in caps_read if c.live} == live_ids
        assert all(c.version == v2 for c in caps_read if c.traffic == "acceptance")

        import mlflow

        from flywheel.core.config import Settings
        from flywheel.monitoring.service import Monitor, MonitorConfig

        mlflow.MlflowClient().set_registered_model_alias(name, "monitored-release", v2)
        mon = Monitor(MonitorConfig(model=name, capture_uri=caps, env="monitored-release",
                                    state_dir=tmp_path / "mon", window=50, settle_s=0.0),
                      Settings.from_env(tracking_uri=serving_models.tracking_uri, work_dir=serving_models.work_dir,
                                        model_name=name).apply())
        results = mon.tick()
        mon.close()
        assert [r.size for r in results] == [50, 50] and mon.last_tick.pending == 0
        assert mon.last_tick.monitored == 100 and mon.last_tick.marked == marked_expected
        state = json.loads((tmp_path / "mon" / "state.json").read_text())
        assert state["windows"] == 2
    finally:
        server.stop()
