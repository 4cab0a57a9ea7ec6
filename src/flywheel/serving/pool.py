"""A serving pool: N TorchServe replicas behind HAProxy, released rolling or as a canary.

What a pool is (`PoolSpec`, written as `pool.json` by `start_pool` / `front_pool` / `flywheel
serve-pool`, read by `flywheel release --target pool`): HAProxy's client URL, its runtime API socket and map files
(serving/haproxy.py has the config's design), and per replica its TorchServe inference/management
URLs, key file and model store. Replicas may be on other hosts: everything here goes through URLs
except a replica's key file and model store; a replica with an `ssh` entry (user, host, port, identity,
known_hosts) has them on that host, read and written over SFTP (serving/replica_files.py), one without
has them here. `start_pool` starts N TorchServes here and HAProxy in front; `front_pool` starts only
HAProxy, in front of replicas that already run (a replicas file of pool.json's replica entries), and
never stops them.

Release (`pool_release`), with the single-server machinery of serving/release.py per replica
(`release_version` = register, warm-up, acceptance on /predictions/M/V, the same archive checks):
* rolling (`canary=None`): replica by replica, drain it in HAProxy (no new requests; those in flight
  finish), release it (accept, `set-default`), put it back (`ready`). A replica that fails rolls
  back itself, and the replicas already switched are switched back.
* canary (default steps 10 → 50 → 100 %): every replica registers and accepts the new version beside
  the default (drained while it loads), then HAProxy sends SHARE % of unversioned requests to
  /predictions/M/NEW (`canary.map`, `set map`: no reload). Each step watches live traffic: HAProxy's
  log (status and time of every request, by arm) and, when the pool captures, the capture records
  (prediction labels, by version). `judge` (a pure function on `ArmStats`) compares the canary's
  error rate, p95 latency and prediction mix with the stable arm's and answers pass, fail or wait.
  Passing 100 %: each replica's default becomes the new version (atomic per replica), the map entry
  goes. Failing any step: the map entry goes at once (all traffic back on the default), in-flight
  canary requests get `grace_s` to finish, then the new version is unregistered everywhere.
Every step is a tag on the registry version (`pool_<env>_*`, `canary_<env>_*`); alias `env` moves
(`mark_deployed`, with the archive's stamp) only after the whole release passed. Earlier versions
stay registered up to `keep_previous` and are reachable through the pool at /predictions/M/V (A/B).

Keys: TorchServe 0.12 rejects an old key at once, so the pool (not each server) renews a replica's
inference key: drain, renew, `set map` the key HAProxy injects, ready (`renew_inference_key`);
`PoolKeyRenewer` does it for every replica at half its keys' lifetime (keys.plan_renewal).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError
from flywheel.serving.haproxy import (
    HAProxy,
    HAProxyConfig,
    LogLine,
    RuntimeAPI,
    Upstream,
    credential_hash,
    map_text,
    read_log,
    read_map,
    start_haproxy,
    write_private,
)
from flywheel.serving.keys import BackgroundRenewer
from flywheel.serving.release import (
    AcceptanceConfig,
    ManagementTarget,
    ReleaseFailed,
    ReleaseResult,
    _begin,
    _packaged_archive,
    _rollback,
    canary_plan,
    parse_canary_steps,
    release_version,
    retire_previous,
    verify_archive,
)
from flywheel.serving.replica_files import ReplicaFiles, ReplicaSSH, replica_files

log = logging.getLogger(__name__)
SPEC_FILE = "pool.json"
TOKEN_FILE = "pool-token"  # the pool credential for clients, 0600 (HAProxy holds only its hash)
UP_TIMEOUT_S = 30.0  # how long a replica put back in service may take to pass HAProxy's `rise` checks


# ------------------------------------------------------------------------------------ description
@dataclass(frozen=True)
class Replica:
    """One TorchServe of the pool, as a release reaches it."""

    name: str  # HAProxy's server name (r1, r2, ...)
    inference_url: str
    management_url: str
    key_file: Path  # on `ssh.host` when ssh is set, else here
    model_store: Path
    ssh: ReplicaSSH | None = None  # the host the two files above are on; None: this host

    def files(self) -> ReplicaFiles:
        """Its key file and model store, here or over SFTP on `ssh.host`."""
        return replica_files(self.name, self.key_file, self.model_store, self.ssh)

    def target(self, workers: int = 1, grace_s: float = 5.0, keep_previous: int = 1) -> ManagementTarget:
        return ManagementTarget(self.inference_url, self.management_url, self.key_file, self.model_store,
                                workers=workers, grace_s=grace_s, keep_previous=keep_previous,
                                files=self.files() if self.ssh else None)

    def client(self, timeout: float = 30.0):
        return self.target().client(timeout)

    def as_dict(self) -> dict:
        data = {"name": self.name, "inference_url": self.inference_url, "management_url": self.management_url,
                "key_file": str(self.key_file), "model_store": str(self.model_store)}
        return data | ({"ssh": self.ssh.as_dict()} if self.ssh else {})

    @classmethod
    def from_dict(cls, r: Mapping) -> Replica:
        ssh = ReplicaSSH.from_dict(r["ssh"], r["name"]) if r.get("ssh") is not None else None
        return cls(r["name"], r["inference_url"], r["management_url"], Path(r["key_file"]), Path(r["model_store"]),
                   ssh)


@dataclass(frozen=True)
class PoolSpec:
    """A pool's description (`pool.json`): HAProxy's address and runtime API, and its replicas."""

    url: str
    runtime_socket: Path
    keys_map: Path
    canary_map: Path
    log_path: Path
    replicas: tuple[Replica, ...]
    capture_uri: str | None = None  # where replicas capture traffic (the canary's prediction mix)
    token_file: Path | None = None  # the pool credential, for clients on this host

    def write(self, path: Path) -> Path:
        data = asdict(self)
        data["replicas"] = [r.as_dict() for r in self.replicas]  # no `ssh` key for a replica on this host
        data = json.loads(json.dumps(data, default=str))
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> PoolSpec:
        try:
            data = json.loads(Path(path).read_text())
            replicas = tuple(Replica.from_dict(r) for r in data["replicas"])
            return cls(data["url"], Path(data["runtime_socket"]), Path(data["keys_map"]), Path(data["canary_map"]),
                       Path(data["log_path"]), replicas, data.get("capture_uri"),
                       Path(data["token_file"]) if data.get("token_file") else None)
        except FileNotFoundError:
            raise FlywheelError(f"pool description {path} not found: `flywheel serve-pool` writes it") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise FlywheelError(f"{path} is not a pool description ({type(exc).__name__}: {exc})") from None

    def runtime(self) -> RuntimeAPI:
        return RuntimeAPI(self.runtime_socket)

    def replica(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name:
                return r
        raise FlywheelError(f"no replica {name!r} in the pool (replicas: {', '.join(r.name for r in self.replicas)})")

    def token(self) -> str:
        if self.token_file is None:
            raise FlywheelError("this pool description names no token file: pass the pool credential yourself")
        return self.token_file.read_text().strip()


# ------------------------------------------------------------------------------------ a local pool
class Pool:
    """A started pool: its HAProxy, its key renewer and the TorchServes it started (none when it fronts
    replicas that already ran: `front_pool`); `stop()` ends those, never a replica it did not start."""

    def __init__(self, spec: PoolSpec, spec_path: Path, servers: list, haproxy: HAProxy):
        self.spec = spec
        self.spec_path = spec_path
        self.servers = servers  # flywheel.serving.torchserve.TorchServe it started, in replica order; [] if none
        self.haproxy = haproxy
        self.renewer: PoolKeyRenewer | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def runtime(self) -> RuntimeAPI:
        return self.haproxy.runtime

    def alive(self) -> bool:
        """HAProxy runs (a dead replica is HAProxy's to route around, not a reason to stop the pool)."""
        return self.haproxy.alive()

    def server(self, name: str):
        return self.servers[[r.name for r in self.spec.replicas].index(name)]

    def stop(self) -> None:
        """Stop the renewer, HAProxy, then every replica this pool started (each by its process group)."""
        if self.renewer is not None:
            self.renewer.stop()
        errors = []
        for stop in [self.haproxy.stop, *(s.stop for s in self.servers)]:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stop the others whatever one does; re-raised below
                errors.append(exc)
        self.spec_path.unlink(missing_ok=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_pool(work_dir: Path, replicas: int, model_store: Path, *, models: tuple[str, ...] = (),
               capture_uri: str | None = None, token: str | None = None, token_expiration_min: float = 1440,
               workers: int = 1, renew_keys: bool = True, haproxy: Mapping | None = None) -> Pool:
    """Start `replicas` TorchServes (loopback, free ports, `models` loaded) and HAProxy in front;
    write `pool.json` and the pool credential (`token`, or a new random one) into `work_dir`.

    Each replica's own key renewer is stopped: the pool renews keys (drain first, PoolKeyRenewer).
    `haproxy`: overrides of HAProxyConfig (check timing, retries, ...).
    """
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    if replicas < 1:
        raise FlywheelError("a pool needs at least one replica")
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {"FLYWHEEL_CAPTURE_URI": capture_uri or ""}
    cfgs = [ServeConfig.local(work_dir / f"r{i + 1}", Path(model_store).resolve(), models=models,
                              token_expiration_min=token_expiration_min,
                              extra={"default_workers_per_model": workers}) for i in range(replicas)]
    servers: list = []
    started = []
    try:
        with ThreadPoolExecutor(replicas, thread_name_prefix="pool-start") as ex:
            futures = [ex.submit(start_torchserve, c, 180.0, env) for c in cfgs]
            for f in futures:
                try:
                    started.append(f.result())
                except Exception as exc:  # noqa: BLE001 - the others are stopped below, then this re-raised
                    started.append(exc)
        servers = [s for s in started if not isinstance(s, Exception)]
        failed = [s for s in started if isinstance(s, Exception)]
        if failed:
            raise failed[0]
        for s in servers:
            s.renewer.stop()  # the pool renews keys itself: drain first, then renew, then `set map`
            for m in models:
                s.client().wait_ready(m.partition("=")[0] if "=" in m else m.removesuffix(".mar").rsplit("-", 1)[0])
    except BaseException:
        for s in servers:
            s.stop()
        raise
    members = tuple(Replica(f"r{i + 1}", s.cfg.inference_address, s.cfg.management_address, s.key_file,
                            s.cfg.model_store) for i, s in enumerate(servers))
    return _front(work_dir, members, servers, capture_uri=capture_uri, token=token, renew_keys=renew_keys,
                  haproxy=haproxy)


def front_pool(work_dir: Path, replicas: Iterable[Replica], *, capture_uri: str | None = None,
               token: str | None = None, renew_keys: bool = True, haproxy: Mapping | None = None,
               ping_timeout_s: float = 10.0) -> Pool:
    """HAProxy in front of TorchServes that already run (here or on other hosts: `Replica.ssh`);
    `pool.json` and the pool credential into `work_dir` as `start_pool` writes them.

    Each replica must answer /ping and its inference key must be readable (`Replica.files()`), else
    a one-line FlywheelError names it and nothing is started. The returned Pool's `stop()` stops the
    key renewer and HAProxy only: the replicas are not this pool's to stop. Their own key renewers
    must be off (the pool renews their keys, draining each first; a replica renewing by itself makes
    HAProxy inject a rejected key until the next pool renewal). `capture_uri`: where the replicas
    already capture traffic (the canary's prediction mix); None: the mix is not measured.
    """
    import requests

    from flywheel.serving.torchserve import TorchServeClient

    replicas = tuple(replicas)
    if not replicas:
        raise FlywheelError("a pool needs at least one replica")
    names = [r.name for r in replicas]
    if len(set(names)) != len(names) or not all(n and n.replace("-", "").replace("_", "").isalnum() for n in names):
        raise FlywheelError(f"replica names must be unique letters, digits, '-' or '_' (got {', '.join(names)})")
    keys = {}
    for r in replicas:
        try:
            keys[r.name] = r.files().keys()["inference"]
        except FlywheelError as exc:
            raise FlywheelError(str(exc) if f"replica {r.name}" in str(exc) else f"replica {r.name}: {exc}") from None
        try:  # TorchServe 0.12 checks the inference key on /ping too (400 without it)
            answer = TorchServeClient(r.inference_url, inference_key=keys[r.name], timeout=ping_timeout_s).ping()
        except requests.RequestException as exc:
            raise FlywheelError(f"replica {r.name} is unreachable: {r.inference_url}/ping failed "
                                f"({type(exc).__name__}); is its TorchServe running?") from None
        if answer.status_code != 200:
            raise FlywheelError(f"replica {r.name} is not healthy: {r.inference_url}/ping answered "
                                f"HTTP {answer.status_code}")
    return _front(Path(work_dir).resolve(), replicas, [], capture_uri=capture_uri, token=token,
                  renew_keys=renew_keys, haproxy=haproxy, keys=keys)


def read_replicas(path: Path) -> tuple[Replica, ...]:
    """Replica entries from a JSON file: a list of pool.json's replica entries, or a pool.json itself
    (its `replicas`). Relative key_file / model_store of a replica without `ssh` are resolved against
    the file's folder (with `ssh` they stay as written: sftp resolves them in the login's home)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        entries = data["replicas"] if isinstance(data, dict) else data
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("expected a list of mappings")
        replicas = tuple(Replica.from_dict(e) for e in entries)
    except FileNotFoundError:
        raise FlywheelError(f"replicas file {path} not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FlywheelError(f"{path} is not a list of pool.json replica entries (name, inference_url, "
                            f"management_url, key_file, model_store, optional ssh): {type(exc).__name__}: {exc}"
                            ) from None
    base = path.resolve().parent
    return tuple(r if r.ssh else replace(r, key_file=base / r.key_file, model_store=base / r.model_store)
                 for r in replicas)


def _front(work_dir: Path, replicas: tuple[Replica, ...], servers: list, *, capture_uri: str | None,
           token: str | None, renew_keys: bool, haproxy: Mapping | None, keys: Mapping[str, str] | None = None
           ) -> Pool:
    """HAProxy in front of `replicas` (their inference `keys`, else read through `Replica.files()`), the
    pool credential and pool.json in `work_dir`, HAProxy's checks UP, the key renewer. `servers`: the
    TorchServes this pool started (stopped with it, and here if anything fails)."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        ups = [Upstream(r.name, urlsplit(r.inference_url).netloc) for r in replicas]
        hcfg = HAProxyConfig.local(work_dir / "haproxy", ups, **dict(haproxy or {}))
        token = token or secrets.token_urlsafe(32)
        token_file = work_dir / TOKEN_FILE
        write_private(token_file, token + "\n")
        keys = keys or {r.name: r.files().keys()["inference"] for r in replicas}
        proxy = start_haproxy(hcfg, keys, [credential_hash(token)])
    except BaseException:
        for s in servers:
            s.stop()
        raise
    spec = PoolSpec(hcfg.url, hcfg.socket_path, hcfg.keys_map, hcfg.canary_map, hcfg.log_path, replicas,
                    capture_uri or None, token_file)
    pool = Pool(spec, spec.write(work_dir / SPEC_FILE), servers, proxy)
    try:
        for r in replicas:
            proxy.runtime.wait_status(r.name, "UP", timeout=UP_TIMEOUT_S)
        if renew_keys:
            pool.renewer = PoolKeyRenewer(spec).start()
    except BaseException:
        pool.stop()
        raise
    return pool


# ------------------------------------------------------------------------------------ keys
def set_replica_key(spec: PoolSpec, name: str, key: str) -> None:
    """HAProxy's key for replica `name`, live (`set map`) and on disk (keys.map, 0600, for a restart)."""
    spec.runtime().set_map(spec.keys_map, name, key)
    entries = read_map(spec.keys_map)
    entries[name] = key
    write_private(spec.keys_map, map_text(entries))


@contextmanager
def out_of_service(rt: RuntimeAPI, name: str, drain_timeout_s: float, up_timeout_s: float = UP_TIMEOUT_S):
    """Replica `name` drained, with nothing in flight, for the body; then put back, and (when the body
    succeeded) waited for until HAProxy has it UP again, so that a caller going replica by replica
    never drains the next one into a pool with none UP.

    The wait matters because the body may have failed health checks: during a key renewal they still
    carry the old key until `set map`, and when reading the new key outlasts `fall` checks (over SFTP
    it can), HAProxy marks the replica DOWN and wants `rise` good checks after it is put back."""
    rt.set_state(name, "drain")
    try:
        rt.wait_idle(name, drain_timeout_s)
        yield
    finally:
        rt.set_state(name, "ready")
    rt.wait_status(name, "UP", timeout=up_timeout_s)


def renew_inference_key(spec: PoolSpec, name: str, drain_timeout_s: float = 60.0,
                        up_timeout_s: float = UP_TIMEOUT_S) -> None:
    """Renew replica `name`'s inference key with no failed request: out of service (`out_of_service`),
    renew through TorchServe's token API, give HAProxy the new key; returns once it is UP again."""
    replica = spec.replica(name)
    with out_of_service(spec.runtime(), name, drain_timeout_s, up_timeout_s):
        keys = _renewer(replica).renew("inference")
        set_replica_key(spec, name, keys.inference)


def _renewer(replica: Replica):
    """A KeyRenewer of the replica's TorchServe that reads its key file where it is (here or over SFTP)."""
    from flywheel.serving.keys import KeyRenewer

    files = replica.files()
    return KeyRenewer(replica.management_url, replica.key_file, reader=files.read_key_file, where=files.where)


class PoolKeyRenewer(BackgroundRenewer):
    """Renews every replica's keys at half their lifetime: inference keys through `renew_inference_key`
    (drained), management keys directly (only releases use them; their client re-reads the file)."""

    thread_name = "pool-key-renewer"
    stop_timeout_s = 30.0

    def __init__(self, spec: PoolSpec, min_interval_s: float = 1.0, max_interval_s: float = 300.0):
        super().__init__()
        self.spec = spec
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.renewals = 0

    def renew_due(self, now: float | None = None) -> float:
        """One pass over the replicas; returns seconds until the next key comes due."""
        from flywheel.serving.keys import plan_renewal

        waits = [self.max_interval_s]
        for replica in self.spec.replicas:
            keys = replica.files().read_key_file()
            t = time.time() if now is None else now
            lifetime = max(keys.lifetime_s(), max(keys.expires.values()) - t)
            due, wait = plan_renewal(t, keys.expires, lifetime, min_interval_s=self.min_interval_s,
                                     max_interval_s=self.max_interval_s)
            for kind in due:
                if kind == "inference":
                    renew_inference_key(self.spec, replica.name)
                else:
                    _renewer(replica).renew(kind)
                self.renewals += 1
                log.info("pool replica %s: renewed its %s key", replica.name, kind)
            waits.append(wait)
        return min(waits)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.renew_due()
            except FlywheelError as exc:  # a replica restarting or unreachable: look again soon
                log.warning("pool key renewal: %s", exc)
                wait = 5 * self.min_interval_s
            self._stop.wait(wait)


# ------------------------------------------------------------------------------------ canary decisions
@dataclass(frozen=True)
class ArmStats:
    """Live traffic of one arm (stable or canary) over a window, as plain numbers."""

    requests: int = 0
    errors: int = 0  # 5xx, no answer, or the version missing (404)
    latencies_ms: tuple[float, ...] = ()
    labels: Mapping[str, int] = field(default_factory=dict)  # predicted label → count (captures)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

    @property
    def labelled(self) -> int:
        return sum(self.labels.values())

    def merge(self, other: ArmStats) -> ArmStats:
        return ArmStats(self.requests + other.requests, self.errors + other.errors,
                        self.latencies_ms + other.latencies_ms, dict(Counter(self.labels) + Counter(other.labels)))

    def summary(self) -> str:
        p95 = "n/a" if self.p95_ms is None else f"{self.p95_ms:.0f} ms"
        return f"{self.requests} req, {self.error_rate:.1%} errors, p95 {p95}, {self.labelled} labelled"


@dataclass(frozen=True)
class CanaryPolicy:
    """Steps and bounds of a canary: the canary's live numbers against the stable arm's."""

    steps: tuple[int, ...] = (10, 50, 100)  # % of unversioned requests sent to the new version
    min_requests: int = 100  # canary requests a step needs before a verdict
    min_labelled: int = 100  # canary predictions with a captured label (prediction mix), when captured
    max_wait_s: float = 600.0  # a step that never gets enough traffic fails (nothing proven)
    max_error_rate_delta: float = 0.01  # canary error rate <= stable's + this
    max_errors_early: int = 5  # this many canary errors fail a step at once, before min_requests
    max_p95_ratio: float = 1.5  # canary p95 <= stable p95 * ratio + slack
    p95_slack_ms: float = 25.0
    max_label_distance: float = 0.3  # total variation distance between predicted-label distributions
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        canary_plan(self.steps)


def canary_policy(steps: str, **overrides) -> CanaryPolicy | None:
    """A CanaryPolicy from the CLI's `--canary-steps 10,50,100`; None for 'none' (a rolling release)."""
    if steps.strip().lower() in ("none", "rolling", ""):
        return None
    return CanaryPolicy(steps=parse_canary_steps(steps), **overrides)


@dataclass(frozen=True)
class Verdict:
    action: str  # "pass" | "fail" | "wait"
    reasons: tuple[str, ...] = ()

    def text(self) -> str:
        return self.action + (": " + "; ".join(self.reasons) if self.reasons else "")


def label_distance(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    """Total variation distance between two label histograms (0 same mix, 1 disjoint)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def judge(stable: ArmStats, canary: ArmStats, policy: CanaryPolicy, *, mix_measured: bool = True,
          waited_s: float = 0.0) -> Verdict:
    """Pass, fail or wait on one canary step, from plain numbers only.

    Fail at once on `max_errors_early` canary errors. Wait until the canary has `min_requests`
    requests (and `min_labelled` captured labels when the mix is measured), failing after `max_wait_s`.
    Then pass only if every bound holds: error rate, p95 latency, prediction mix vs the stable arm.
    """
    if canary.errors >= policy.max_errors_early and canary.error_rate > stable.error_rate + policy.max_error_rate_delta:
        return Verdict("fail", (f"{canary.errors} errors on the canary ({canary.error_rate:.1%}) vs "
                                f"{stable.error_rate:.1%} on the stable arm",))
    enough = canary.requests >= policy.min_requests and (not mix_measured or canary.labelled >= policy.min_labelled)
    if not enough or not stable.requests:
        if waited_s >= policy.max_wait_s:
            return Verdict("fail", (f"not enough live traffic after {waited_s:.0f} s (canary {canary.summary()}, "
                                    f"stable {stable.summary()})",))
        return Verdict("wait")
    reasons = []
    if canary.error_rate > stable.error_rate + policy.max_error_rate_delta:
        reasons.append(f"error rate {canary.error_rate:.2%} > stable {stable.error_rate:.2%} + "
                       f"{policy.max_error_rate_delta:.2%}")
    if canary.p95_ms is not None and stable.p95_ms is not None:
        bound = stable.p95_ms * policy.max_p95_ratio + policy.p95_slack_ms
        if canary.p95_ms > bound:
            reasons.append(f"p95 {canary.p95_ms:.0f} ms > bound {bound:.0f} ms (stable {stable.p95_ms:.0f} ms)")
    if mix_measured:
        distance = label_distance(stable.labels, canary.labels)
        if distance > policy.max_label_distance:
            reasons.append(f"prediction mix differs: distance {distance:.2f} > {policy.max_label_distance}")
    return Verdict("fail", tuple(reasons)) if reasons else Verdict("pass")


# ------------------------------------------------------------------------------------ live measurements
def arm_stats(lines: Iterable[LogLine], model: str, arm: str) -> ArmStats:
    """An arm's requests, errors and latencies from HAProxy's log lines."""
    picked = [x for x in lines if x.model == model and x.arm == arm]
    errors = sum(1 for x in picked if x.status < 0 or x.status >= 500 or x.status == 404)
    return ArmStats(len(picked), errors, tuple(float(x.total_ms) for x in picked))


class LiveWindow:
    """Live traffic since it was opened: HAProxy's request log by arm, captured labels by version."""

    def __init__(self, spec: PoolSpec, model: str, stable: str, canary: str):
        from flywheel.contracts.capture import CaptureCursor, CaptureReader

        self.spec, self.model, self.stable_version, self.canary_version = spec, model, stable, canary
        self.opened = time.time()
        self.offset = spec.log_path.stat().st_size if spec.log_path.exists() else 0
        self.lines: list[LogLine] = []
        self.labels = {stable: Counter(), canary: Counter()}
        self.reader = CaptureReader(spec.capture_uri, model) if spec.capture_uri else None
        self.cursor = CaptureCursor.at(self.opened - 5.0)  # batches are named before the window's records

    @property
    def mix_measured(self) -> bool:
        return self.reader is not None

    def update(self) -> None:
        lines, self.offset = read_log(self.spec.log_path, self.offset)
        self.lines += lines
        if self.reader is None:
            return
        poll = self.reader.poll(self.cursor)
        for name in poll.names:
            for rec in self.reader.read(name):
                if rec.live and rec.ts >= self.opened and rec.version in self.labels and rec.label:
                    self.labels[rec.version][rec.label] += 1
        self.cursor = self.reader.advance(self.cursor, poll)

    def stats(self) -> tuple[ArmStats, ArmStats]:
        """(stable, canary) so far."""
        stable = replace(arm_stats(self.lines, self.model, "stable"), labels=dict(self.labels[self.stable_version]))
        canary = replace(arm_stats(self.lines, self.model, "canary"), labels=dict(self.labels[self.canary_version]))
        return stable, canary


# ------------------------------------------------------------------------------------ release
@dataclass(frozen=True)
class PoolTarget:
    spec: PoolSpec
    workers: int = 1
    grace_s: float = 5.0  # in-flight requests finish before a version is unregistered
    keep_previous: int = 1
    drain_timeout_s: float = 60.0

    def describe(self) -> str:
        return f"pool {self.spec.url} ({len(self.spec.replicas)} replicas)"


@dataclass
class PoolReleaseResult:
    model: str
    version: str
    env: str
    target: str
    previous: str | None = None
    mode: str = "rolling"
    replicas: dict = field(default_factory=dict)  # name → ReleaseResult
    steps: list = field(default_factory=list)  # (share, Verdict, stable ArmStats, canary ArmStats)
    step_times: list = field(default_factory=list)  # (share, seconds the step's window lasted)
    promoted: bool = False
    rolled_back: bool = False
    events: list[str] = field(default_factory=list)

    def event(self, text: str) -> None:
        log.info("pool release %s v%s → %s: %s", self.model, self.version, self.env, text)
        self.events.append(text)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Tags:
    """Registry tags on the version for each step (`pool_<env>_...`, `canary_<env>_...`)."""

    def __init__(self, settings: Settings, model: str, version: str):
        from flywheel.core.registry import Registry

        self.client, self.model, self.version = Registry(settings).client, model, version

    def __call__(self, key: str, text: str) -> None:
        self.client.set_model_version_tag(self.model, self.version, key, f"{_now()} {text}"[:5000])


def pool_release(settings: Settings, model: str, version: str, env: str, target: PoolTarget,
                 acceptance: AcceptanceConfig = AcceptanceConfig(), canary: CanaryPolicy | None = CanaryPolicy(),
                 mar_path: Path | None = None,
                 on_step: Callable[[int, Verdict, ArmStats, ArmStats], None] | None = None) -> PoolReleaseResult:
    """Release registry version `version` of `model` to `env` across a pool (see the module doc):
    rolling with `canary=None`, else canary by `canary.steps`. ReleaseFailed after a rollback."""
    from flywheel.contracts.manifest import ArchiveStamp
    from flywheel.core.registry import mark_deployed
    from flywheel.serving.package import PackageConfig, package_version

    spec, rt = target.spec, target.spec.runtime()
    mv, first = _begin(settings, model, version, env, target.describe())
    version = first.version
    result = PoolReleaseResult(model, version, env, target.describe(), mode="canary" if canary else "rolling")
    tag = _Tags(settings, model, version)
    # The archive, once for every replica: verified, or packaged now.
    replica0 = spec.replicas[0]
    if mar_path is not None:
        manifest = verify_archive(mar_path, model, version, mv.run_id)
    else:
        mar_path, manifest = _packaged_archive(settings, replica0.target(), model, version, mv.run_id)
        if mar_path is None:
            mar_path = package_version(PackageConfig(model, version=version), settings).mar_path
            manifest = verify_archive(mar_path, model, version, mv.run_id)
    defaults = {r.name: r.client().default_version(model) for r in spec.replicas}
    result.previous = next((d for d in defaults.values() if d), None)
    if canary is not None and (result.previous is None or result.previous == version):
        result.event(f"no other version serving by default ({result.previous or 'none'}): rolling release, no canary")
        canary, result.mode = None, "rolling"
    result.event(f"{result.mode} release of v{version} over {', '.join(defaults)} (default now "
                 f"{result.previous or 'none'})")
    tag(f"pool_{env}_release", f"{result.mode} started on {target.describe()}")

    registered: dict[str, bool] = {}  # replica → this release registered the version there
    try:
        # 1. Replica by replica: drained, released (rolling) or registered + accepted (canary), back.
        for replica in spec.replicas:
            client = replica.client()
            registered[replica.name] = version not in client.versions(model)
            try:
                with out_of_service(rt, replica.name, target.drain_timeout_s):
                    r = release_version(settings, model, version, env,
                                        replica.target(target.workers, target.grace_s, target.keep_previous),
                                        acceptance, mar_path=Path(mar_path), retire=False, switch=canary is None,
                                        record=False)
            except ReleaseFailed as exc:
                if exc.result is not None:
                    result.replicas[replica.name] = exc.result
                    registered[replica.name] = False  # its own rollback unregistered it
                raise ReleaseFailed(f"replica {replica.name}: {exc}") from exc
            result.replicas[replica.name] = r
            summary = r.report.summary() if r.report else "accepted"
            what = "switched" if canary is None else "registered beside the default"
            result.event(f"replica {replica.name}: {what}; {summary}")
            tag(f"pool_{env}_{replica.name}", f"{what} ({summary})")
        # 2. Canary steps on live traffic.
        if canary is not None:
            _run_canary(spec, model, version, env, canary, result, tag, on_step)
            for replica in spec.replicas:
                r = replica.client().set_default(model, version)
                if r.status_code != 200:
                    raise ReleaseFailed(f"replica {replica.name}: set-default failed: HTTP {r.status_code} {r.text[:200]}")
                result.replicas[replica.name].switched = True
                result.replicas[replica.name].previous = defaults[replica.name]
            rt.del_map(spec.canary_map, model)
            result.promoted = True
            result.event(f"promoted: v{version} is every replica's default; canary route removed")
            tag(f"canary_{env}", f"promoted through {', '.join(f'{s}%' for s in canary.steps)}")
    except BaseException as exc:
        _rollback_pool(spec, model, version, result, registered, defaults, target.grace_s)
        tag(f"pool_{env}_release", f"rolled back: {exc}")
        if canary is not None and not result.promoted:
            tag(f"canary_{env}", f"rolled back: {exc}")
        if isinstance(exc, ReleaseFailed):
            exc.result = result
            raise
        if isinstance(exc, Exception):
            raise ReleaseFailed(f"pool release of {model} v{version} failed ({type(exc).__name__}: {exc}); "
                                "rolled back", result) from exc
        raise
    # 3. The registry moves once, after every replica serves the version.
    store, store_name = replica0.files(), f"{model}-{version}.mar"
    stamp = store.stamp(store_name, manifest) if store.exists(store_name) else ArchiveStamp.of(mar_path, manifest)
    mark_deployed(settings, model, version, env, target.describe(), archive=stamp)
    tag(f"pool_{env}_release", f"{result.mode} release done on {target.describe()}")
    result.event(f"alias {env} → v{version}")
    return result


def _run_canary(spec: PoolSpec, model: str, version: str, env: str, policy: CanaryPolicy,
                result: PoolReleaseResult, tag: _Tags, on_step) -> None:
    """Each step: route SHARE % to the new version, watch a live window until `judge` passes or fails."""
    rt = spec.runtime()
    baseline = ArmStats()  # the stable arm over all windows: the 100 % step has no stable traffic of its own
    for share in policy.steps:
        window = LiveWindow(spec, model, result.previous, version)
        rt.set_map(spec.canary_map, model, f"{version}:{share}")
        result.event(f"canary at {share}%")
        started = time.monotonic()
        while True:
            time.sleep(policy.poll_s)
            window.update()
            stable, canary = window.stats()
            reference = baseline.merge(stable)
            verdict = judge(reference, canary, policy, mix_measured=window.mix_measured,
                            waited_s=time.monotonic() - started)
            if verdict.action != "wait":
                break
        baseline = reference
        result.steps.append((share, verdict, reference, canary))
        result.step_times.append((share, time.monotonic() - started))
        text = f"{verdict.text()} (canary {canary.summary()}; stable {reference.summary()})"
        result.event(f"canary at {share}%: {text}")
        tag(f"canary_{env}_{share}pct", text)
        if on_step is not None:
            on_step(share, verdict, reference, canary)
        if verdict.action != "pass":
            raise ReleaseFailed(f"canary v{version} failed its live checks at {share}%: {'; '.join(verdict.reasons)}")


def _rollback_pool(spec: PoolSpec, model: str, version: str, result: PoolReleaseResult,
                   registered: Mapping[str, bool], defaults: Mapping[str, str | None], grace_s: float) -> None:
    """Canary route off at once; after `grace_s` (in-flight requests finish), each replica back to its
    previous default and the version unregistered where this release registered it."""
    rt = spec.runtime()
    try:
        rt.del_map(spec.canary_map, model)
        result.event("canary route removed: all unversioned traffic on the default")
    except FlywheelError as exc:
        result.event(f"could not remove the canary route: {exc}")
    time.sleep(grace_s)
    for replica in spec.replicas:
        r = result.replicas.get(replica.name)
        if r is None or r.rolled_back:
            continue  # not reached, or rolled back by its own release
        r.previous = defaults.get(replica.name)
        _rollback(replica.client(), r, registered.get(replica.name, False))
        result.event(f"replica {replica.name}: rolled back ({'; '.join(r.events[-2:])})")
    result.rolled_back = True


def retire_pool(target: PoolTarget, result: PoolReleaseResult) -> list[str]:
    """Unregister, on each replica, versions beyond `keep_previous` (after the grace period)."""
    retired = []
    for replica in target.spec.replicas:
        r = result.replicas.get(replica.name) or ReleaseResult(result.model, result.version, result.env, "")
        r.previous = r.previous or result.previous
        gone = retire_previous(replica.target(target.workers, target.grace_s, target.keep_previous), r)
        if gone:
            result.event(f"replica {replica.name}: unregistered old version(s) {', '.join(r.unregistered) or 'none'}")
        retired += gone
    return retired
