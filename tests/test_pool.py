"""The serving pool (issue 14): real HAProxy 2.6 in front of real TorchServe replicas on loopback.

Fast (make test): the canary's decision function on plain numbers, and HAProxy's own JSON answers
(401 without the pool credential, 413 over the body limit, 503 with no replica up) from a real
HAProxy whose replicas are not running; a chunked body over the limit, which only TorchServe can
measure, answered with the same JSON 413 by a pool in front of a real TorchServe.

Reliability (make test-reliability): 3 TorchServe replicas + HAProxy, 8 clients sending live traffic:
a canary at 10 % gets 10 ± 3 % of the responses; a canary release promoted to 100 % with no failed
request; a bad version (trained on 32 images: it passes a lenient acceptance but its live prediction
mix is far from the stable version's) rolled back by its live checks with no failed request; a key
renewal through the pool with no failed request, and one that returns only once HAProxy has the
replica UP again even when a slow key hand-off got it marked DOWN; one replica SIGKILLed under load fails at most
`kill_failure_bound` requests, and none once HAProxy marks it DOWN.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests

from flywheel.serving.haproxy import (
    HAProxyConfig,
    Upstream,
    credential_hash,
    kill_failure_bound,
    start_haproxy,
)
from flywheel.serving.pool import ArmStats, CanaryPolicy, judge, label_distance
from tests.conftest import free_port
from tests.fixtures_serving import MODEL

CLIENTS = 8


# ------------------------------------------------------------------------------ decisions (plain data)
def _arm(n, errors=0, ms=10.0, labels=None):
    return ArmStats(n, errors, tuple([ms] * n), labels or {})


def test_judge_on_plain_numbers():
    policy = CanaryPolicy(min_requests=100, min_labelled=100)
    mix = {"a": 50, "b": 30, "c": 20}
    stable = _arm(900, 0, 10.0, {k: 9 * v for k, v in mix.items()})
    # Same errors, latency and mix: pass.
    assert judge(stable, _arm(100, 0, 11.0, mix), policy).action == "pass"
    # Too little traffic yet: wait; past max_wait_s: fail.
    assert judge(stable, _arm(40, 0, 11.0, mix), policy).action == "wait"
    assert judge(stable, _arm(40, 0, 11.0, mix), policy, waited_s=policy.max_wait_s).action == "fail"
    # Labels not captured yet: wait, unless the pool measures no mix.
    assert judge(stable, _arm(100, 0, 11.0, {}), policy).action == "wait"
    assert judge(stable, _arm(100, 0, 11.0, {}), policy, mix_measured=False).action == "pass"
    # Errors: five fail a step at once; a rate above stable + 1 % fails it.
    assert judge(stable, _arm(20, 5, 11.0, mix), policy).action == "fail"
    verdict = judge(stable, _arm(200, 4, 11.0, {k: 2 * v for k, v in mix.items()}), policy)
    assert verdict.action == "fail" and "error rate" in verdict.reasons[0]
    # Latency: p95 above stable x 1.5 + 25 ms fails.
    verdict = judge(stable, _arm(100, 0, 41.0, mix), policy)
    assert verdict.action == "fail" and "p95" in verdict.reasons[0]
    assert judge(stable, _arm(100, 0, 39.0, mix), policy).action == "pass"
    # Prediction mix: a version that answers one class fails.
    verdict = judge(stable, _arm(100, 0, 10.0, {"a": 100}), policy)
    assert verdict.action == "fail" and "prediction mix" in verdict.reasons[0]
    assert label_distance({"a": 1}, {"a": 5}) == 0.0
    assert label_distance({"a": 1}, {"b": 1}) == 1.0


def test_canary_policy_rejects_bad_steps():
    from flywheel.core.errors import FlywheelError

    for steps in ((), (50, 10, 100), (10, 50), (0, 100)):
        with pytest.raises(FlywheelError):
            CanaryPolicy(steps=steps)


def test_haproxy_answers_json_401_413_503(tmp_path):
    """A real HAProxy whose replicas are not running: every refusal is HAProxy's own JSON."""
    ups = [Upstream(f"r{i}", f"127.0.0.1:{free_port()}") for i in (1, 2)]
    cfg = HAProxyConfig.local(tmp_path / "hp", ups, max_body_bytes=1024, check_inter_ms=200)
    with start_haproxy(cfg, {"r1": "k1", "r2": "k2"}, [credential_hash("pool-secret")]) as hp:
        assert oct(cfg.keys_map.stat().st_mode & 0o777) == "0o600"
        assert "pool-secret" not in cfg.config_path.read_text() + cfg.credentials_path.read_text()
        url = f"{hp.url}/predictions/{MODEL}"
        r = requests.post(url, data=b"x", timeout=10)
        assert r.status_code == 401 and r.headers["content-type"] == "application/json"
        assert "pool credential" in r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")
        assert requests.post(url, data=b"x", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        auth = {"Authorization": "Bearer pool-secret"}
        r = requests.post(url, data=b"x" * 2048, headers=auth, timeout=10)
        assert r.status_code == 413 and "too large" in r.json()["error"]
        r = requests.get(f"{hp.url}/models", headers=auth, timeout=10)  # management never through the pool
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        hp.runtime.wait_status("r1", "DOWN", timeout=20)
        hp.runtime.wait_status("r2", "DOWN", timeout=20)
        r = requests.post(url, data=b"x", headers=auth, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "no serving replica is up"
        r = requests.get(f"{hp.url}/ping", headers=auth, timeout=10)
        assert r.status_code == 503
        hp.runtime.set_state("r1", "drain")
        assert hp.runtime.servers()["r1"].status.startswith("DRAIN") or hp.runtime.servers()["r1"].status == "DOWN"


@pytest.mark.integration
def test_chunked_body_over_the_limit_gets_the_pools_json_413(torchserve_server, tmp_path):
    """A chunked body carries no Content-Length for HAProxy's own 413: TorchServe's limit refuses it
    with an empty 413, which the pool answers as its JSON. The handler's own JSON 413 (too many
    images) passes unchanged, and the pool serves the next request."""
    import base64

    from flywheel.contracts.preprocessing import encode_png
    from flywheel.serving.haproxy import ERRORS, MAX_BODY_BYTES
    from flywheel.serving.pool import Replica, front_pool

    ts = torchserve_server.server
    replica = Replica("r1", ts.cfg.inference_address, ts.cfg.management_address, ts.key_file, ts.cfg.model_store)
    pool = front_pool(tmp_path / "pool", [replica], renew_keys=False)
    try:
        auth = {"Authorization": f"Bearer {pool.spec.token()}"}
        url = f"{pool.url}/predictions/{MODEL}"
        chunk = b"x" * 65536
        r = requests.post(url, data=(chunk for _ in range(MAX_BODY_BYTES // len(chunk) + 2)), headers=auth, timeout=60)
        assert r.status_code == 413 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"] == ERRORS[413]
        png = encode_png(np.arange(784, dtype=np.uint8).reshape(28, 28))
        r = requests.post(url, json={"images": [base64.b64encode(png).decode()] * 65}, headers=auth, timeout=60)
        assert r.status_code == 413 and "too many images" in r.text, r.text
        r = requests.post(url, data=png, headers={**auth, "Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == torchserve_server.version, r.text
    finally:
        pool.stop()


def test_request_log_lines_by_arm(tmp_path):
    from flywheel.serving.haproxy import read_log
    from flywheel.serving.pool import arm_stats

    log = tmp_path / "haproxy.log"
    log.write_text("[WARNING] (1) : Server replicas/r1 is DOWN\n"
                   "fwpool 200 12 stable m - r1 0\nfwpool 503 3 canary m 7 r2 +1\nfwpool 200 30 canary m 7 r1 0\n"
                   "fwpool 401 0 - - - <NOSRV> 0\nfwpool 200 5 stab")  # the last line is still being written
    lines, offset = read_log(log)
    assert [(x.status, x.arm, x.version, x.retries) for x in lines] == [
        (200, "stable", "-", 0), (503, "canary", "7", 1), (200, "canary", "7", 0), (401, "-", "-", 0)]
    canary = arm_stats(lines, "m", "canary")
    assert (canary.requests, canary.errors, canary.latencies_ms) == (2, 1, (3.0, 30.0))
    with open(log, "a") as f:
        f.write("le m - r3 0\n")
    more, offset = read_log(log, offset)
    assert [(x.status, x.total_ms, x.server) for x in more] == [(200, 5, "r3")]
    log.write_text("fwpool 200 1 stable m - r1 0\n")  # rotated (copytruncate): read from the start
    assert len(read_log(log, offset)[0]) == 1


def test_kill_failure_bound():
    cfg = HAProxyConfig.local("/tmp", [Upstream("r1", "127.0.0.1:1")])
    assert kill_failure_bound(cfg, clients=8, replicas=3) == 8
    assert kill_failure_bound(HAProxyConfig.local("/tmp", [], retries=0), clients=8, replicas=3) is None
    assert kill_failure_bound(cfg, clients=8, replicas=1) is None
    assert cfg.detection_s() == pytest.approx((3 * 500 + 1000) / 1000)


# ------------------------------------------------------------------------------ live pool (reliability)
@dataclass
class Outcome:
    started: float
    done: float
    status: int  # -1: no HTTP answer
    version: str | None
    error: str = ""


@dataclass
class Load:
    """`clients` threads POSTing single PNGs to the pool back to back, each outcome recorded."""

    url: str
    token: str
    pngs: list
    clients: int = CLIENTS
    outcomes: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/octet-stream"}
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = session.post(f"{self.url}/predictions/{MODEL}", data=rng.choice(self.pngs), headers=headers,
                                 timeout=30)
                version = r.json().get("version") if r.status_code == 200 else None
                out = Outcome(t0, time.monotonic(), r.status_code, version, "" if r.ok else r.text[:200])
            except (requests.RequestException, ValueError) as exc:
                out = Outcome(t0, time.monotonic(), -1, None, str(exc)[:200])
            with self._lock:
                self.outcomes.append(out)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.outcomes)

    def wait_for(self, n: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.snapshot())
        while len(self.snapshot()) - start < n:
            assert time.monotonic() < deadline, f"load made fewer than {n} requests in {timeout:.0f}s"
            time.sleep(0.2)


def _failed(outcomes):
    return [o for o in outcomes if o.status != 200]


@dataclass(frozen=True)
class LivePool:
    pool: object
    models: object
    pngs: list
    capture_dir: object


@pytest.fixture(scope="module")
def live_pool(serving_models, tmp_path_factory):
    yield from _live_pool(serving_models, tmp_path_factory.mktemp("pool"))


@pytest.fixture
def doomed_pool(serving_models, tmp_path_factory):
    """A pool of its own for the test that kills a replica, so the module's pool stays whole in any order."""
    yield from _live_pool(serving_models, tmp_path_factory.mktemp("doomed-pool"))


def _live_pool(serving_models, root):
    """3 TorchServe replicas of v1 behind HAProxy, capturing into `root`, and 300 test PNGs to send them."""
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.models import load_spec, read_test_set
    from flywheel.serving.pool import start_pool

    v1 = serving_models.versions[0]
    spec = load_spec(f"models:/{MODEL}/{v1}", serving_models.tracking_uri)
    images, _ = read_test_set(spec, serving_models.tracking_uri)
    pngs = [encode_png(img) for img in images[:300]]
    capture_dir = root / "captures"
    pool = start_pool(root / "pool", 3, serving_models.model_store, models=(f"{MODEL}={serving_models.mars[v1].name}",),
                      capture_uri=str(capture_dir))
    try:
        yield LivePool(pool, serving_models, pngs, capture_dir)
    finally:
        pool.stop()


def _alias(settings, alias):
    from flywheel.core.errors import FlywheelError
    from flywheel.core.registry import Registry

    try:
        return str(Registry(settings).version(alias, MODEL).version)
    except FlywheelError:
        return None


def _policy(**kw) -> CanaryPolicy:
    return CanaryPolicy(**{"min_requests": 100, "min_labelled": 100, "max_wait_s": 240.0, **kw})


def _lenient():
    from flywheel.serving.release import AcceptanceConfig

    # The fixture's models are small (v1/v2 ~0.6 accuracy, v3 near chance) and the box is shared:
    # acceptance here proves the machinery, the canary's live checks are what is under test.
    return AcceptanceConfig(min_accuracy=0.0, p95_slo_ms=5000.0, accuracy_samples=64, latency_requests=10)


@pytest.mark.reliability
def test_canary_promoted_to_100_with_no_failed_request(live_pool):
    from flywheel.core.registry import Registry
    from flywheel.serving.pool import PoolTarget, pool_release

    settings = live_pool.models.settings()
    v1, v2, _ = live_pool.models.versions
    target = PoolTarget(live_pool.pool.spec, grace_s=2.0)
    with Load(live_pool.pool.url, live_pool.pool.spec.token(), live_pool.pngs) as load:
        load.wait_for(50)
        result = pool_release(settings, MODEL, v2, "dev", target, _lenient(), _policy(),
                              mar_path=live_pool.models.mars[v2])
        load.wait_for(100)
    outcomes = load.snapshot()
    assert _failed(outcomes) == [], _failed(outcomes)[:5]
    assert result.promoted and [s for s, *_ in result.steps] == [10, 50, 100]
    assert all(v.action == "pass" for _, v, *_ in result.steps)
    assert {o.version for o in outcomes} == {v1, v2}
    assert outcomes[-1].version == v2
    for replica in live_pool.pool.spec.replicas:  # v2 default everywhere, v1 kept for A/B
        assert replica.client().versions(MODEL) == {v1: False, v2: True}
    reg = Registry(settings)
    mv = reg.version(v2, MODEL)
    assert str(reg.version("dev", MODEL).version) == v2
    assert {"canary_dev_10pct", "canary_dev_50pct", "canary_dev_100pct", "canary_dev", "pool_dev_r1",
            "pool_dev_release", "deployed_dev_at"} <= set(mv.tags)
    assert "promoted" in mv.tags["canary_dev"] and mv.tags["canary_dev_10pct"].split()[1] == "pass"
    # A/B: an earlier version stays addressable through the pool.
    r = requests.post(f"{live_pool.pool.url}/predictions/{MODEL}/{v1}", data=live_pool.pngs[0],
                      headers={"Authorization": f"Bearer {live_pool.pool.spec.token()}"}, timeout=30)
    assert r.status_code == 200 and r.json()["version"] == v1


def _another_version_on_every_replica(live_pool, default: str) -> tuple[str, list]:
    """(a version other than `default`, the clients of the replicas it was loaded on here): the one replica
    0 has besides `default` (a release earlier in the module leaves its previous version loaded), else v1 or
    v2 (a run of the canary test alone finds v1 only), loaded on every replica that lacks it."""
    models = live_pool.models
    replicas = live_pool.pool.spec.replicas
    other = next((v for v in replicas[0].client().versions(MODEL) if v != default),
                 next(v for v in models.versions[:2] if v != default))
    loaded_on = []
    for replica in replicas:
        client = replica.client()
        if other not in client.versions(MODEL):
            client.register(models.mars[other].name, initial_workers=1)
            client.wait_ready(MODEL, other)
            loaded_on.append(client)
    return other, loaded_on


@pytest.mark.reliability
def test_canary_share_at_10_percent(live_pool):
    """HAProxy's canary route at 10 %: 10 ± 3 % of 1000+ responses come from the canary version."""
    spec, rt = live_pool.pool.spec, live_pool.pool.runtime
    default = spec.replicas[0].client().default_version(MODEL)
    other, loaded_on = _another_version_on_every_replica(live_pool, default)
    rt.set_map(spec.canary_map, MODEL, f"{other}:10")
    try:
        with Load(live_pool.pool.url, spec.token(), live_pool.pngs) as load:
            load.wait_for(1000)
    finally:
        rt.del_map(spec.canary_map, MODEL)
        for client in loaded_on:  # the module's pool as this test found it
            client.unregister(MODEL, other)
    outcomes = load.snapshot()
    assert _failed(outcomes) == []
    share = sum(o.version == other for o in outcomes) / len(outcomes)
    assert 0.07 <= share <= 0.13, f"canary share {share:.3f} of {len(outcomes)}"


@pytest.mark.reliability
def test_bad_canary_rolled_back_with_no_failed_request(live_pool):
    from flywheel.core.registry import Registry
    from flywheel.serving.pool import PoolTarget, pool_release
    from flywheel.serving.release import ReleaseFailed

    settings = live_pool.models.settings()
    bad = live_pool.models.versions[2]
    spec = live_pool.pool.spec
    before = {r.name: r.client().versions(MODEL) for r in spec.replicas}
    dev_before = _alias(settings, "dev")
    with Load(live_pool.pool.url, spec.token(), live_pool.pngs) as load:
        load.wait_for(50)
        with pytest.raises(ReleaseFailed, match="failed its live checks at 10%") as info:
            pool_release(settings, MODEL, bad, "dev", PoolTarget(spec, grace_s=2.0), _lenient(), _policy(),
                         mar_path=live_pool.models.mars[bad])
        load.wait_for(100)
    outcomes = load.snapshot()
    assert _failed(outcomes) == [], _failed(outcomes)[:5]
    result = info.value.result
    assert result.rolled_back and not result.promoted
    assert "prediction mix" in " ".join(result.steps[0][1].reasons)
    assert any(o.version == bad for o in outcomes)  # it did take live traffic before the verdict
    assert {r.name: r.client().versions(MODEL) for r in spec.replicas} == before
    assert live_pool.pool.runtime.show_map(spec.canary_map) == {}
    reg = Registry(settings)
    assert _alias(settings, "dev") == dev_before  # the alias never moved
    tags = reg.version(bad, MODEL).tags
    assert "rolled back" in tags["canary_dev"] and tags["canary_dev_10pct"].split()[1].rstrip(":") == "fail"
    assert "deployed_dev_at" not in tags


@pytest.mark.reliability
def test_key_renewal_through_the_pool_fails_no_request(live_pool):
    from flywheel.serving.keys import read_keys
    from flywheel.serving.pool import renew_inference_key

    spec = live_pool.pool.spec
    old = {r.name: read_keys(r.key_file)["inference"] for r in spec.replicas}
    with Load(live_pool.pool.url, spec.token(), live_pool.pngs) as load:
        load.wait_for(50)
        for replica in spec.replicas:
            renew_inference_key(spec, replica.name)
        load.wait_for(100)
    assert _failed(load.snapshot()) == []
    new = {r.name: read_keys(r.key_file)["inference"] for r in spec.replicas}
    assert all(new[n] != old[n] for n in old)
    assert live_pool.pool.runtime.show_map(spec.keys_map) == new


@pytest.mark.reliability
def test_key_renewal_returns_only_once_the_replica_is_up_again(live_pool, monkeypatch):
    """A slow key hand-off (over SFTP, reading the new key can outlast HAProxy's `fall` checks, which
    still carry the old key) gets the replica marked DOWN; renewal returns only after `rise` checks
    have it UP again, so renewing replica after replica never leaves the pool without one."""
    from flywheel.serving import pool as pool_module

    spec = live_pool.pool.spec
    real_set_key = pool_module.set_replica_key
    marked_down = []

    def slow_set_key(spec_, name, key):
        deadline = time.monotonic() + 30
        while not live_pool.pool.runtime.servers()[name].status.startswith("DOWN"):  # checks fail on the old key
            assert time.monotonic() < deadline, f"HAProxy never marked {name} DOWN on its old key"
            time.sleep(0.05)
        marked_down.append(name)
        real_set_key(spec_, name, key)

    monkeypatch.setattr(pool_module, "set_replica_key", slow_set_key)
    with Load(live_pool.pool.url, spec.token(), live_pool.pngs) as load:
        load.wait_for(50)
        for replica in spec.replicas:
            pool_module.renew_inference_key(spec, replica.name)
            assert live_pool.pool.runtime.servers()[replica.name].status == "UP"
        load.wait_for(100)
    assert marked_down == [r.name for r in spec.replicas]
    assert _failed(load.snapshot()) == []


@pytest.mark.reliability
def test_rolling_release_with_no_failed_request(live_pool):
    """`canary=None`: replica by replica drained, switched (v1, kept registered for A/B), put back."""
    from flywheel.serving.pool import PoolTarget, pool_release

    settings = live_pool.models.settings()
    v1 = live_pool.models.versions[0]
    spec = live_pool.pool.spec
    with Load(live_pool.pool.url, spec.token(), live_pool.pngs) as load:
        load.wait_for(50)
        result = pool_release(settings, MODEL, v1, "prod", PoolTarget(spec, grace_s=1.0), _lenient(), None,
                              mar_path=live_pool.models.mars[v1])
        load.wait_for(100)
    outcomes = load.snapshot()
    assert _failed(outcomes) == [], _failed(outcomes)[:5]
    assert result.mode == "rolling" and not result.rolled_back and result.steps == []
    assert outcomes[-1].version == v1 and all(r.client().default_version(MODEL) == v1 for r in spec.replicas)
    assert _alias(settings, "prod") == v1


@pytest.mark.reliability
def test_replica_killed_under_load(doomed_pool):
    """SIGKILL one replica's whole process group mid-load: at most `kill_failure_bound` failed
    requests while HAProxy detects it, none after it is DOWN. (A pool of its own: the replica stays dead.)"""
    pool = doomed_pool.pool
    victim = pool.spec.replicas[-1].name
    bound = kill_failure_bound(pool.haproxy.cfg, CLIENTS, len(pool.spec.replicas))
    assert bound is not None
    with Load(pool.url, pool.spec.token(), doomed_pool.pngs) as load:
        load.wait_for(100)
        killed_at = time.monotonic()
        os.killpg(pool.server(victim).proc.pid, signal.SIGKILL)
        pool.runtime.wait_status(victim, "DOWN", timeout=30)
        down_at = time.monotonic()
        load.wait_for(300)
    outcomes = load.snapshot()
    during = [o for o in outcomes if o.done >= killed_at and o.started < down_at]
    after = [o for o in outcomes if o.started >= down_at]
    assert len(_failed(during)) <= bound, _failed(during)
    assert _failed(after) == [] and len(after) >= 300
    assert _failed(outcomes) == _failed(during)
    stat = pool.runtime.servers()
    assert stat[victim].status.startswith("DOWN") and all(s.up for n, s in stat.items() if n != victim)
    print(f"replica {victim} killed: detected DOWN after {down_at - killed_at:.2f}s "
          f"(bound {pool.haproxy.cfg.detection_s():.2f}s); {len(_failed(during))} failed of {len(during)} "
          f"in that interval (bound {bound}); 0 of {len(after)} after")
