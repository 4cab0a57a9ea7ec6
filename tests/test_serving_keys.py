"""TorchServe keys expire: the renewal schedule, the key-file reader, and renewal against real servers.

Fast tests check `plan_renewal` and the reader as plain functions. Integration tests renew the keys of
a real TorchServe (forced, and on schedule with `token_expiration_min` 0.25 and 1) while clients keep
working, run the serving image's entrypoint and HEALTHCHECK natively, and check what a client sees
for a wrong token, an oversize body and a SIGTERM to `flywheel serve`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "serving"
FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _key_file_text(inference="inf-1", management="mgmt-1", api="api-1", inf_exp="2026-12-01T12:00:30.5Z",
                   mgmt_exp="2026-12-01T12:00:10.123456789Z") -> str:
    return json.dumps({"management": {"key": management, "expiration time": mgmt_exp},
                       "inference": {"key": inference, "expiration time": inf_exp}, "API": {"key": api}}, indent=2)


# ------------------------------------------------------------------------------------------ fast
def test_plan_renewal_renews_each_key_at_half_its_lifetime():
    from flywheel.serving.keys import plan_renewal

    life = 60.0
    # Fresh keys: nothing due; look again when the sooner one reaches half-life.
    assert plan_renewal(0.0, {"inference": 60.0, "management": 50.0}, life) == ((), 20.0)
    # One past half-life: renew it; next look at the other's half-life.
    assert plan_renewal(25.0, {"inference": 60.0, "management": 50.0}, life) == (("management",), 5.0)
    # Both due (or already expired: the token API still answers, with the never-expiring API key).
    assert plan_renewal(100.0, {"inference": 60.0, "management": 90.0}, life) == (("inference", "management"), 30.0)
    # The floor: never a busy loop, however short the lifetime or close the half-life.
    assert plan_renewal(0.0, {"inference": 1.0, "management": 50.0}, 2.0, min_interval_s=1.0) == (("inference",), 1.0)
    assert plan_renewal(0.0, {"inference": 30.2, "management": 30.3}, life, min_interval_s=1.0) == ((), 1.0)
    # The ceiling: a day-long key is still looked at every few minutes (restarts, clock jumps).
    day = 86400.0
    assert plan_renewal(0.0, {"inference": day, "management": day}, day, max_interval_s=300.0) == ((), 300.0)
    due, wait = plan_renewal(day / 2 + 1, {"inference": day, "management": day}, day, max_interval_s=300.0)
    assert due == ("inference", "management") and wait == 300.0


def test_key_file_parse_times_and_lifetime(tmp_path):
    from flywheel.serving.keys import parse_key_file, parse_time, read_key_file, read_keys

    assert parse_time("1970-01-01T00:01:00Z") == 60.0
    assert abs(parse_time("1970-01-01T00:00:01.123456789Z") - 1.123456789) < 1e-6
    with pytest.raises(ValueError):
        parse_time("yesterday")
    kf = parse_key_file(_key_file_text(), mtime=parse_time("2026-12-01T12:00:00.5Z"))
    assert kf.api == "api-1" and kf.key("management") == "mgmt-1"
    assert kf.lifetime_s() == pytest.approx(30.0)  # newest expiry - file write time
    path = tmp_path / "key_file.json"
    path.write_text(_key_file_text())
    assert read_keys(path) == {"inference": "inf-1", "management": "mgmt-1"}
    assert read_key_file(path).expires["inference"] == pytest.approx(parse_time("2026-12-01T12:00:30.5Z"))


def test_reader_waits_out_torchserves_in_place_rewrite_but_not_forever(tmp_path):
    """TorchServe truncates key_file.json, then writes it: an empty file is re-read, a bad one fails."""
    from flywheel.core.errors import FlywheelError
    from flywheel.serving.keys import fresh_key, read_keys

    path = tmp_path / "key_file.json"
    path.write_text("")
    writer = threading.Timer(0.3, lambda: path.write_text(_key_file_text(inference="inf-2")))
    writer.start()
    assert read_keys(path)["inference"] == "inf-2"
    writer.join()
    path.write_text("{not json")
    with pytest.raises(FlywheelError, match="not valid key_file.json"):
        read_keys(path)
    with pytest.raises(FlywheelError, match="not found"):
        read_keys(tmp_path / "missing.json")
    # A rejected key: re-read until the file shows another one, bounded.
    path.write_text(_key_file_text(inference="old"))
    threading.Timer(0.3, lambda: path.write_text(_key_file_text(inference="new"))).start()
    assert fresh_key(lambda: read_keys(path), "inference", "old", wait_s=5) == "new"
    assert fresh_key(lambda: read_keys(path), "inference", "new", wait_s=0.2) == "new"  # gives up, unchanged


def test_management_url_from_properties_follows_torchserve(tmp_path):
    from flywheel.serving.keys import management_url_from_properties

    props = tmp_path / "config.properties"
    props.write_text("# comment=ignored\nmanagement_address=http://0.0.0.0:8081\nenable_envvars_config=true\n")
    assert management_url_from_properties(props, env={}) == "http://127.0.0.1:8081"
    assert management_url_from_properties(props, env={"TS_MANAGEMENT_ADDRESS": "http://127.0.0.1:8091"}) \
        == "http://127.0.0.1:8091"
    props.write_text("management_address=http://127.0.0.1:9081\n")  # env config off: the file wins
    assert management_url_from_properties(props, env={"TS_MANAGEMENT_ADDRESS": "http://x:1"}) \
        == "http://127.0.0.1:9081"


def test_shipped_config_keeps_keys_finite_and_limits_bodies(tmp_path):
    from flywheel.serving.torchserve import (
        MAX_REQUEST_BYTES,
        MAX_RESPONSE_BYTES,
        TOKEN_EXPIRATION_MIN,
        ServeConfig,
        render_properties,
    )

    deploy = dict(line.split("=", 1) for line in (DEPLOY / "config.properties").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    assert deploy["disable_token_authorization"] == "false"
    assert float(deploy["token_expiration_min"]) == TOKEN_EXPIRATION_MIN  # `flywheel serve`'s default too
    assert int(deploy["max_request_size"]) == MAX_REQUEST_BYTES >= 4 * 2**20 * 4 // 3  # a 4 MiB image as base64
    assert int(deploy["max_response_size"]) == MAX_RESPONSE_BYTES
    rendered = render_properties(ServeConfig.local(tmp_path, tmp_path, token_expiration_min=0.5))
    assert "token_expiration_min=0.5\n" in rendered and f"max_request_size={MAX_REQUEST_BYTES}\n" in rendered
    # The image runs the renewer beside TorchServe and ships what it imports.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "entrypoint.py" in dockerfile and "COPY --chown=root:root flywheel/" in dockerfile


def test_build_context_ships_the_key_renewer(tmp_path):
    """The image's entrypoint and HEALTHCHECK import flywheel.serving.keys with the standard library only."""
    from flywheel.serving.release import build_context

    ctx = build_context([], tmp_path / "ctx")
    assert sorted(str(p.relative_to(ctx / "flywheel")) for p in (ctx / "flywheel").rglob("*.py")) == [
        "__init__.py", "core/__init__.py", "core/errors.py", "serving/__init__.py", "serving/keys.py"]
    code = "import sys; sys.path[:0] = [sys.argv[1]]; import flywheel.serving.keys as k; " \
           "print(sorted(m for m in sys.modules if m.startswith('flywheel')))"
    proc = subprocess.run([sys.executable, "-S", "-c", code, str(ctx)], capture_output=True, text=True, check=False,
                          env={"PATH": os.environ["PATH"]})  # -S: no site-packages, as in a bare image
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['flywheel', 'flywheel.core', 'flywheel.core.errors', 'flywheel.serving', 'flywheel.serving.keys']"


def test_systemd_units_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check deploy/serving/systemd (apt-get install systemd)"
    for name in ("flywheel-serving-keys.service", "flywheel-serving-keys.timer"):
        text = (DEPLOY / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/flywheel/bin/flywheel", FLYWHEEL))
    service = (DEPLOY / "systemd" / "flywheel-serving-keys.service").read_text()
    assert "serve-keys renew" in service
    proc = subprocess.run([analyze, "verify", *(str(p) for p in sorted(tmp_path.iterdir()))], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# ----------------------------------------------------------------------------------- real servers
def _png(i: int = 0) -> bytes:
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits

    return encode_png(load_splits("fashion-mnist").test.images[i])


def _keys(path: Path) -> dict:
    from flywheel.serving.keys import read_keys

    return read_keys(path)


@pytest.mark.integration
def test_forced_renewal_keeps_a_client_working(torchserve_server):
    """Both keys renewed through the token API: the old ones die at once, a client that held them
    recovers on its next request without a failed one, and the file stays owner-only."""
    from flywheel.serving.torchserve import TorchServeClient

    srv = torchserve_server
    png = _png()
    client = TorchServeClient(srv.inference_url, srv.server.cfg.management_address, key_file=srv.key_file)
    assert client.predict(srv.model, png).status_code == 200 and client.list_models().status_code == 200
    before = _keys(srv.key_file)
    renewed, _ = srv.server.renewer.renew_due(force=True)
    assert renewed == ("inference", "management")
    after = _keys(srv.key_file)
    assert after["inference"] != before["inference"] and after["management"] != before["management"]
    assert stat.S_IMODE(srv.key_file.stat().st_mode) == 0o600
    stale = TorchServeClient(srv.inference_url, srv.server.cfg.management_address, **{
        "inference_key": before["inference"], "management_key": before["management"]})
    assert stale.predict(srv.model, png).status_code == 400  # no overlap: the old key is dead at once
    assert stale.list_models().status_code == 400
    r = client.predict(srv.model, png)  # still holds the old key: re-reads, retries, succeeds
    assert r.status_code == 200 and r.json()["version"] == srv.version
    assert client.list_models().status_code == 200


@pytest.mark.integration
def test_wrong_token_is_reported_as_an_authentication_failure(torchserve_server, tmp_path):
    from flywheel.serving.torchserve import TorchServeClient

    srv = torchserve_server
    wrong = tmp_path / "key_file.json"
    wrong.write_text(_key_file_text(inference="not-the-key", mgmt_exp="2126-01-01T00:00:00Z",
                                    inf_exp="2126-01-01T00:00:00Z"))
    client = TorchServeClient(srv.inference_url, key_file=wrong)
    r = client.ping()
    assert r.status_code == 400  # TorchServe 0.12 says 400, not 401
    message = client.explain(r)
    assert message.startswith("authentication failed") and "wrong or expired" in message and str(wrong) in message
    image = tmp_path / "one.png"
    image.write_bytes(_png())
    proc = subprocess.run([FLYWHEEL, "predict", "--endpoint", srv.inference_url, "--model", srv.model,
                           "--key-file", str(wrong), str(image)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert "authentication failed" in proc.stderr and "key_file.json" in proc.stderr


@pytest.mark.integration
def test_oversize_body_gets_a_clear_error(torchserve_server, tmp_path):
    """40 MB to /predictions: the client refuses it with the limit; past the client, TorchServe answers
    an empty 413 (and closes the connection without reading the rest), which becomes the same error."""
    import requests

    from flywheel.serving.torchserve import MAX_REQUEST_BYTES, RequestTooLarge, TorchServeClient

    srv = torchserve_server
    body = b"\0" * (40 * 2**20)
    with pytest.raises(RequestTooLarge, match=r"request body of 40\.0 MB exceeds the server's max_request_size "
                                              r"8\.0 MB"):
        srv.client.predict(srv.model, body)
    unlimited = TorchServeClient(srv.inference_url, key_file=srv.key_file, max_request_bytes=None)
    with pytest.raises(RequestTooLarge, match=r"40\.0 MB exceeds the server's max_request_size \(TorchServe "
                                              r"answered 413\)"):
        unlimited.predict(srv.model, body)
    key = _keys(srv.key_file)["inference"]
    raw = requests.post(f"{srv.inference_url}/predictions/{srv.model}", data=body, timeout=60,
                        headers={"Authorization": f"Bearer {key}"})
    assert raw.status_code == 413 and raw.content == b""  # the frontend's answer: no JSON body
    just_under = TorchServeClient(srv.inference_url, key_file=srv.key_file, max_request_bytes=None)
    r = just_under.predict(srv.model, b"\0" * (MAX_REQUEST_BYTES - 1024))  # passes the frontend: the
    assert r.status_code == 413 and "error" in r.json(), r.text[:200]  # handler's own 413 (> 4 MiB), with JSON
    assert srv.client.predict(srv.model, _png()).status_code == 200  # the server is unharmed


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.integration
def test_serve_stops_everything_on_sigterm(tmp_path):
    """`flywheel serve` gets SIGTERM (systemd, supervisors, kill): TorchServe's JVM and workers go
    too, and the ports it printed are free again."""
    import psutil

    store = tmp_path / "store"
    store.mkdir()
    proc = subprocess.Popen([FLYWHEEL, "serve", "--model-store", str(store), "--work-dir", str(tmp_path / "srv"),
                             "--token-expiry-minutes", "5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("key file"):
                break
        text = "".join(lines)
        assert "inference http://127.0.0.1:" in text, text
        ports = [int(word.rsplit(":", 1)[1]) for word in text.split() if word.startswith("http://127.0.0.1:")]
        assert len(ports) == 3 and not any(_port_free(p) for p in ports)
        children = _descendants(proc.pid)
        assert any("java" in (c.name() or "") for c in children), [c.name() for c in children]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert all(_port_free(p) for p in ports), ports
        assert proc.returncode != 0  # interrupted, like Ctrl-C (130)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.integration
def test_image_entrypoint_renews_keys_and_healthcheck_follows(tmp_path):
    """deploy/serving/entrypoint.py and healthcheck.py, run natively as the image runs them: keys
    living 15 s are renewed on schedule, every health check passes, SIGTERM leaves no process."""
    import psutil

    from flywheel.serving.torchserve import ServeConfig, render_properties

    run = tmp_path / "run"
    (run / "tmp").mkdir(parents=True)
    cfg = ServeConfig.local(run, tmp_path / "store", token_expiration_min=0.25)
    cfg.model_store.mkdir()
    props = tmp_path / "config.properties"
    props.write_text(render_properties(cfg))
    env = {**os.environ, "FLYWHEEL_TS_KEY_FILE": str(run / "key_file.json"), "TMPDIR": str(run / "tmp"),
           "LOG_LOCATION": str(run / "logs"), "METRICS_LOCATION": str(run / "logs"),
           "TS_INFERENCE_ADDRESS": cfg.inference_address}
    cmd = [sys.executable, str(DEPLOY / "entrypoint.py"), "--ts-config", str(props), "--",
           str(Path(sys.executable).with_name("torchserve")), "--foreground", "--ncs", "--ts-config", str(props),
           "--model-store", str(cfg.model_store)]
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, cwd=run, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthcheck() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True,
                              text=True, timeout=30, check=False)

    try:
        deadline = time.monotonic() + 120
        while healthcheck().returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "entrypoint.log").read_text()
            time.sleep(1)
        seen = {_keys(run / "key_file.json")["inference"]}
        checks = []
        end = time.monotonic() + 40  # ~5 renewals of each key
        while time.monotonic() < end:
            hc = healthcheck()
            checks.append((hc.returncode, hc.stderr.strip()))
            seen.add(_keys(run / "key_file.json")["inference"])
            time.sleep(0.5)
        assert all(code == 0 for code, _ in checks), [c for c in checks if c[0]][:3]
        assert len(seen) >= 4, (seen, (tmp_path / "entrypoint.log").read_text()[-2000:])
        assert "renewed the TorchServe inference key" in (tmp_path / "entrypoint.log").read_text()
        children = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # docker stop
        proc.wait(60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.integration
def test_background_renewer_keeps_renewing_and_exits_with_the_server(tmp_path):
    """`demo --keep` leaves servers running after the demo exits: a `serve-keys renew --watch` process
    keeps renewing, and exits when TorchServe's process group is killed (the printed stop command)."""
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    server = start_torchserve(ServeConfig.local(tmp_path / "ts", tmp_path / "store", token_expiration_min=0.25))
    try:
        renewer = server.renew_in_background()
        first = _keys(server.key_file)["inference"]
        seen = {first}
        deadline = time.monotonic() + 40
        while len(seen) < 3 and time.monotonic() < deadline:
            seen.add(_keys(server.key_file)["inference"])
            time.sleep(0.5)
        assert len(seen) >= 3, (tmp_path / "ts" / "key-renewer.log").read_text()
        assert server.client().ping().status_code == 200
        os.killpg(server.proc.pid, signal.SIGTERM)  # the demo's printed stop command: kill -- -PGID
        assert renewer.wait(30) == 0
    finally:
        server.stop()


# ----------------------------------------------------------------------------------- reliability
LOAD_S = 245.0  # >= 4 minutes of 1-minute keys: each key renewed ~8 times


@pytest.mark.integration
@pytest.mark.reliability
def test_keys_rotate_under_load_without_a_failed_request(serving_models, tmp_path):
    """Keys living 1 minute, 8 clients for 4 minutes (6 threads through TorchServeClient, 2 looping
    `flywheel predict` subprocesses with the key file), /ping polled throughout, a release of v2 in
    the middle: 0 failed requests, the key file changed at least 3 times, every ping Healthy."""
    from flywheel.serving.release import AcceptanceConfig, ManagementTarget, release_version
    from flywheel.serving.torchserve import ServeConfig, TorchServeClient, start_torchserve

    v1, v2, v3 = serving_models.versions
    acc = serving_models.accuracy
    settings = serving_models.settings()
    name = serving_models.name
    server = start_torchserve(ServeConfig.local(tmp_path / "ts", tmp_path / "store", token_expiration_min=1))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(_png(10 + i))
    png = _png(3)
    stop = threading.Event()
    lock = threading.Lock()
    failures: list = []
    answered: list[str] = []
    pings: list[tuple[int, str]] = []
    key_versions: list[tuple[str, str]] = []

    def client_loop():
        client = TorchServeClient(server.cfg.inference_address, key_file=server.key_file, timeout=60)
        while not stop.is_set():
            try:
                r = client.predict(name, png)
                ok = r.status_code == 200
                with lock:
                    (answered.append(str(r.json()["version"])) if ok else failures.append((r.status_code,
                                                                                           r.text[:200])))
            except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                with lock:
                    failures.append(repr(exc))
            stop.wait(0.02)

    def cli_loop():
        while not stop.is_set():
            proc = subprocess.run([FLYWHEEL, "predict", "--endpoint", server.cfg.inference_address, "--model", name,
                                   "--key-file", str(server.key_file), "--dir", str(images)],
                                  capture_output=True, text=True, timeout=300, check=False)
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            with lock:
                if proc.returncode != 0 or len(rows) != 3 or any(r["status"] != 200 for r in rows):
                    failures.append(("flywheel predict", proc.returncode, proc.stderr[-300:], rows))
                else:
                    answered.extend(str(r["version"]) for r in rows)

    def ping_loop():
        client = TorchServeClient(server.cfg.inference_address, key_file=server.key_file, timeout=30)
        while not stop.is_set():
            try:
                r = client.ping()
                item = (r.status_code, r.json().get("status") if r.status_code == 200 else r.text[:100])
            except Exception as exc:  # noqa: BLE001 - an unanswered ping is a finding
                item = (None, repr(exc))
            with lock:
                pings.append(item)
            stop.wait(0.5)

    def key_watch():
        while not stop.is_set():
            keys = _keys(server.key_file)
            current = (keys["inference"], keys["management"])
            if not key_versions or key_versions[-1] != current:
                key_versions.append(current)
            stop.wait(0.25)

    try:
        target = ManagementTarget(server.cfg.inference_address, server.cfg.management_address, server.key_file,
                                  server.cfg.model_store, grace_s=1.0, keep_previous=1)
        accept = AcceptanceConfig(min_accuracy=(min(acc[v1], acc[v2]) + acc[v3]) / 2, p95_slo_ms=5000,
                                  accuracy_samples=96, latency_requests=20)
        assert release_version(settings, name, v1, "dev", target, accept, mar_path=serving_models.mars[v1]).switched
        threads = ([threading.Thread(target=client_loop) for _ in range(6)]
                   + [threading.Thread(target=cli_loop) for _ in range(2)]
                   + [threading.Thread(target=ping_loop), threading.Thread(target=key_watch)])
        start = time.monotonic()
        for t in threads:
            t.start()
        try:
            time.sleep(LOAD_S / 2)
            done = release_version(settings, name, v2, "dev", target, accept, mar_path=serving_models.mars[v2])
            assert done.switched and done.previous == v1 and done.report.passed
            time.sleep(max(0.0, LOAD_S - (time.monotonic() - start)))
        finally:
            stop.set()
            for t in threads:
                t.join(300)
        assert time.monotonic() - start >= 240
        print(f"{len(answered)} predictions, {len(failures)} failed, {len(pings)} pings, "
              f"{len(key_versions) - 1} key-file changes seen, {server.renewer.renewals} renewals")
        assert not failures, (len(failures), failures[:5])
        assert len(answered) > 1000 and set(answered) == {v1, v2} and answered[-1] == v2
        assert len(key_versions) - 1 >= 3, key_versions  # changes of the file's keys seen
        assert server.renewer.renewals >= 6
        bad_pings = [p for p in pings if p != (200, "Healthy")]
        assert len(pings) > 200 and not bad_pings, bad_pings[:5]
        assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600
    finally:
        server.stop()
