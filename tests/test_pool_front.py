"""`flywheel serve-pool --replicas-file` (issue 14): HAProxy alone, in front of TorchServes that already run.

The replicas are started by the test (as an operator starts them on their hosts), one of them
declared behind a real loopback sshd (its key file and model store reachable only over SFTP, as in
tests/test_pool_remote.py). serve-pool runs as a real process; the pool answers with the pool
credential, a canary release goes through it, and stopping serve-pool leaves both replicas serving.

Fast: the replicas file's errors (bad entries, --replicas with --replicas-file, a replica that does
not answer) are one-line errors naming what to fix, and nothing is started for them.
Reliability (~2-3 min with the trained-model fixture): the live front, canary 50 → 100 % under light
load with no failed request.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from flywheel.core.errors import FlywheelError
from flywheel.serving.pool import Replica, front_pool, read_replicas
from tests.conftest import free_port
from tests.fixtures_serving import MODEL
from tests.fixtures_ssh import start_sshd
from tests.test_pool_remote import KEY_FILE, _remote, _sftp_sessions, _ssh


def _entry(name: str, port: int, tmp_path: Path) -> dict:
    return {"name": name, "inference_url": f"http://127.0.0.1:{port}", "management_url": f"http://127.0.0.1:{port + 1}",
            "key_file": str(tmp_path / name / "key_file.json"), "model_store": str(tmp_path / "store")}


# ------------------------------------------------------------------------------ errors (fast)
def test_replicas_file_is_pool_json_entries(tmp_path):
    path = tmp_path / "replicas.json"
    entries = [_entry("a", 8080, tmp_path),
               {"name": "b", "inference_url": "http://10.0.0.7:8080", "management_url": "http://10.0.0.7:8081",
                "key_file": "ts/key_file.json", "model_store": "ts/store", "ssh": {"host": "10.0.0.7", "user": "u"}},
               {**_entry("c", 9090, tmp_path), "key_file": "rel/key_file.json"}]
    path.write_text(json.dumps(entries))
    a, b, c = read_replicas(path)
    assert a == Replica.from_dict(entries[0])
    assert b.ssh is not None and b.key_file == Path("ts/key_file.json")  # on the other host: as written
    assert c.key_file == tmp_path / "rel" / "key_file.json"  # here: relative to the file
    path.write_text(json.dumps({"url": "http://x", "replicas": entries[:1]}))  # a pool.json works too
    assert read_replicas(path) == (a,)
    for bad, words in [("[{\"name\": \"a\"}]", "KeyError"), ("{\"x\": 1}", "KeyError"), ("not json", "JSONDecodeError"),
                       ("[1]", "TypeError")]:
        path.write_text(bad)
        with pytest.raises(FlywheelError) as info:
            read_replicas(path)
        assert words in str(info.value) and "replica entries" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(FlywheelError, match="not found"):
        read_replicas(tmp_path / "missing.json")


def test_front_refuses_a_replica_that_does_not_answer(tmp_path):
    """Nothing listens on r2's port, r3 has no key file, ...: a one-line error naming it; no HAProxy,
    no pool.json."""
    from flywheel.serving.haproxy import HAProxyConfig, Upstream, credential_hash, start_haproxy

    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "key_file.json").write_text(json.dumps(KEY_FILE))
    down = free_port()
    for replicas, words in [
        ((Replica.from_dict(_entry("r2", down, tmp_path)),),
         rf"replica r2 is unreachable: http://127.0.0.1:{down}/ping failed \(ConnectionError\)"),
        ((Replica.from_dict(_entry("r1", down, tmp_path)), Replica.from_dict(_entry("r1", down, tmp_path))),
         "replica names must be unique"),
        ((), "at least one replica"),
        ((Replica.from_dict(_entry("r3", down, tmp_path)),), r"replica r3: .*key_file\.json"),  # no key file
    ]:
        with pytest.raises(FlywheelError, match=words) as info:
            front_pool(tmp_path / "pool", replicas)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "pool" / "pool.json").exists()
    # A server that answers /ping, but not 200: a real HAProxy with no replica up (its own JSON 401/503).
    hp_cfg = HAProxyConfig.local(tmp_path / "hp", [Upstream("x", f"127.0.0.1:{free_port()}")])
    with start_haproxy(hp_cfg, {"x": "k"}, [credential_hash("t")]) as hp:
        with pytest.raises(FlywheelError, match=r"replica r1 is not healthy: .*/ping answered HTTP \d{3}$"):
            front_pool(tmp_path / "pool", (Replica("r1", hp.url, hp.url, tmp_path / "r1" / "key_file.json",
                                                   tmp_path / "store"),))
    assert not (tmp_path / "pool" / "pool.json").exists()


def test_replicas_and_replicas_file_together_is_one_line_error(tmp_path):
    from flywheel.cli import app

    (tmp_path / "r.json").write_text("[]")
    res = CliRunner().invoke(app, ["serve-pool", "--replicas", "2", "--replicas-file", str(tmp_path / "r.json"),
                                   "--work-dir", str(tmp_path / "pool")], terminal_width=200)
    assert res.exit_code == 2 and "--replicas-file fronts replicas that already run" in res.output, res.output
    assert not (tmp_path / "pool").exists()


# ------------------------------------------------------------------------------ live front (reliability)
@pytest.fixture(scope="module")
def serving_host(tmp_path_factory):
    with start_sshd(tmp_path_factory.mktemp("front-host"), login_as_self=True) as node:
        yield node


@pytest.mark.reliability
def test_serve_pool_fronts_running_replicas(serving_models, serving_host, tmp_path):
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.models import load_spec, read_test_set
    from flywheel.core.procs import stop_process_group
    from flywheel.serving.pool import CanaryPolicy, PoolSpec, PoolTarget, pool_release
    from flywheel.serving.torchserve import ServeConfig, start_torchserve
    from tests.test_pool import Load, _failed, _lenient

    v1, v2, _ = serving_models.versions
    spec = load_spec(f"models:/{MODEL}/{v1}", serving_models.tracking_uri)
    images, _ = read_test_set(spec, serving_models.tracking_uri)
    pngs = [encode_png(img) for img in images[:200]]
    servers, proc, log = [], None, open(tmp_path / "serve-pool.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        # Two TorchServes, each with its own store holding v1, as on two hosts.
        for i in (1, 2):
            store = tmp_path / f"store{i}"
            store.mkdir()
            shutil.copy(serving_models.mars[v1], store)
            server = start_torchserve(ServeConfig.local(tmp_path / f"ts{i}", store,
                                                        models=(f"{MODEL}={serving_models.mars[v1].name}",)))
            servers.append(server)
            server.renewer.stop()  # the pool renews their keys (drained first)
            server.client().wait_ready(MODEL)
        local, remote = servers
        entries = [{"name": "here", "inference_url": local.cfg.inference_address,
                    "management_url": local.cfg.management_address, "key_file": str(local.key_file),
                    "model_store": str(local.cfg.model_store)},
                   {"name": "there", "inference_url": remote.cfg.inference_address,
                    "management_url": remote.cfg.management_address,
                    "key_file": str(_remote(serving_host, remote.key_file.parent, "front-ts") / "key_file.json"),
                    "model_store": str(_remote(serving_host, remote.cfg.model_store, "front-store")),
                    "ssh": _ssh(serving_host).as_dict()}]
        replicas_file = tmp_path / "replicas.json"
        replicas_file.write_text(json.dumps(entries, indent=2))
        sessions = _sftp_sessions(serving_host)

        work = tmp_path / "front"
        proc = subprocess.Popen([sys.executable, "-m", "flywheel", "serve-pool", "--replicas-file", str(replicas_file),
                                 "--work-dir", str(work)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")})
        deadline = time.monotonic() + 120
        while not (work / "serve.env").exists():
            assert proc.poll() is None, (tmp_path / "serve-pool.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve-pool.log").read_text()[-3000:]
            time.sleep(0.5)
        pool = PoolSpec.read(work / "pool.json")
        assert [r.name for r in pool.replicas] == ["here", "there"] and pool.replica("there").ssh == _ssh(serving_host)
        assert _sftp_sessions(serving_host) > sessions  # "there"'s inference key came over SFTP
        assert f"export FLYWHEEL_POOL={work / 'pool.json'}\n" in (work / "serve.env").read_text()

        # Predictions through the pool with the pool credential (and none without it).
        r = requests.post(f"{pool.url}/predictions/{MODEL}", data=pngs[0],
                          headers={"Authorization": f"Bearer {pool.token()}"}, timeout=30)
        assert r.status_code == 200 and r.json()["version"] == v1, r.text
        assert requests.post(f"{pool.url}/predictions/{MODEL}", data=pngs[0], timeout=30).status_code == 401

        # A canary release through the fronted pool, under light load: no failed request.
        # Bounds loose on latency: the box is shared; the machinery through the front is under test.
        policy = CanaryPolicy(steps=(50, 100), min_requests=20, min_labelled=0, max_wait_s=240.0,
                              max_p95_ratio=3.0, p95_slack_ms=250.0)
        with Load(pool.url, pool.token(), pngs, clients=2) as load:
            load.wait_for(20)
            result = pool_release(serving_models.settings(), MODEL, v2, "dev", PoolTarget(pool, grace_s=1.0),
                                  _lenient(), policy, mar_path=serving_models.mars[v2])
            load.wait_for(20)
        outcomes = load.snapshot()
        assert _failed(outcomes) == [], _failed(outcomes)[:5]
        assert result.mode == "canary" and result.promoted and [s for s, *_ in result.steps] == [50, 100]
        assert {o.version for o in outcomes} == {v1, v2} and outcomes[-1].version == v2
        assert all(s.client().default_version(MODEL) == v2 for s in servers)
        assert (remote.cfg.model_store / f"{MODEL}-{v2}.mar").exists()  # put there over SFTP

        # Stopping serve-pool stops HAProxy only: both replicas still serve (with their own keys).
        stop_process_group(proc, timeout=30)
        assert proc.returncode is not None and not (work / "pool.json").exists()
        assert not (work / "serve.env").exists()
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{pool.url}/ping", timeout=5)
        for s in servers:
            assert s.alive()
            assert s.client().default_version(MODEL) == v2
    finally:
        if proc is not None and proc.poll() is None:
            stop_process_group(proc, timeout=30)
        log.close()
        for s in servers:
            s.stop()
