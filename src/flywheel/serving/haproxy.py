"""HAProxy 2.6 in front of N TorchServe replicas: its config, its process, its runtime API.

The pool's one door. Clients present ONE pool credential (`Authorization: Bearer <token>`) to
HAProxy; each replica's TorchServe 0.12 inference key stays private to that replica and is added by
HAProxy on the way in. Every keyword used here is in HAProxy 2.6's configuration manual
(/usr/share/doc/haproxy/configuration.txt.gz) and was checked with `haproxy -c` and real traffic.

Design (one config, rendered by `render_config` from a frozen `HAProxyConfig`):

* `frontend pool` (the clients' address). In order: a request whose bearer token's SHA-256 is not in
  `credentials.lst` gets 401 JSON (`req.hdr(authorization),word(2,' '),sha2(256),hex,lower -f`: only
  hashes are on disk, never the credential; several lines = rotation with overlap, `add acl` /
  `del acl` at runtime); a `Content-Length` above `max_body_bytes` gets 413 JSON (TorchServe's own
  limit answers an empty 413 and resets the connection; a chunked body, which has no `Content-Length`,
  meets that limit, and its empty 413 is answered as HAProxy's own JSON); anything but `POST /predictions/...` and
  `GET /ping` gets 404 JSON (management and metrics never go through the pool); no replica up gets
  503 JSON (`nbsrv`); `GET /ping` is answered by HAProxy itself (how many replicas are up).
* Canary: `canary.map` maps a model name to `VERSION:SHARE`. An unversioned `/predictions/M` is sent
  to `/predictions/M/VERSION` when `rand(100) < SHARE` (`set-path`); the map is changed live with
  `set map`/`add map`/`del map` (no reload). Versioned requests `/predictions/M/V` pass unchanged
  (A/B on earlier versions). Each request's arm (`stable`/`canary`/`explicit`) is logged.
* `backend replicas`: `leastconn`; health checks `GET /ping` every `check_inter_ms` (`fall`/`rise`);
  `retries` with `option redispatch 1` (every retry goes to another server) and `retry-on
  conn-failure empty-response response-timeout 502 503 504`: a request that meets a dead or dying
  replica is replayed on another one (predictions are safe to replay). `option
  http-buffer-request`: HAProxy 2.6 keeps a request for replay only if it was whole before the
  first attempt (otherwise a POST whose body arrives after its headers is never retried: measured),
  and it must fit in `tune.bufsize`. The inner proxy (below) answers a refused connection with 503
  at once (`retries 0`: no 1 s turn-around delay), which the pool replays elsewhere.
* One `listen replica_<name>` per replica, reached only over an abstract unix socket
  (`abns@<pool_id>-<name>`: not a TCP port, nothing else can dial it by accident): it replaces the
  client's `Authorization` with that replica's key, looked up in `keys.map` (mode 0600) by the
  replica's name. HAProxy cannot set a header per chosen server after load balancing; an inner
  proxy per server can. The health check goes through the same inner proxy, so it authenticates
  with the same key (TorchServe 0.12 checks keys on /ping too).

Key renewal (TorchServe 0.12 rejects the old key at once, no overlap): drain the replica (`set server
replicas/<name> state drain`), wait until it has no request in flight, renew the key, `set map` the
new key (and rewrite keys.map for a restart), `state ready`, and wait until its checks have it UP
(checks sent with the old key may have marked it DOWN) before the next replica is drained
(`flywheel.serving.pool.renew_inference_key`).

How many requests a SIGKILLed replica can fail (`kill_failure_bound`): a request fails only if every
one of its `retries + 1` attempts fails; with `redispatch 1` each retry avoids the server that just
failed, so while one replica of >= 2 is down, a retried request lands on a live one. What cannot be
replayed is a request whose response had already begun to reach the client when the replica died:
at most one per client connection in flight, so the bound during the detection interval
(`fall * inter + check timeout`, after which the server is DOWN and gets no traffic) is the number
of concurrent clients; after it, zero.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flywheel.core.errors import FlywheelError
from flywheel.core.procs import free_port, stop_process_group

HAPROXY = Path("/usr/sbin/haproxy")
BACKEND = "replicas"
FRONTEND = "pool"
LOG_TAG = "fwpool"  # first word of every request log line (parse_log_line)
MAX_BODY_BYTES = 8 * 1024 * 1024  # = TorchServe's max_request_size (serving/torchserve.py)


def _json_string(message: str) -> str:
    """A JSON object for `http-request return ... string '<here>'` (single-quoted in the config)."""
    import json

    text = json.dumps({"error": message, "source": "flywheel-pool"})
    if "'" in text:
        raise ValueError("pool error messages cannot hold a single quote")
    return text


ERRORS = {
    401: "missing or wrong pool credential: send Authorization: Bearer <pool token>",
    404: "not served by the pool: POST /predictions/MODEL[/VERSION] or GET /ping",
    413: "request body too large for the pool",
    502: "the replica gave no valid answer",
    503: "no serving replica is up",
    504: "the replica did not answer in time",
}


@dataclass(frozen=True)
class Upstream:
    """One replica as HAProxy sees it: a name (r1, ...) and its TorchServe inference address host:port."""

    name: str
    address: str


@dataclass(frozen=True)
class HAProxyConfig:
    """Everything `render_config` needs; files live in `work_dir` (see the `*_path` properties)."""

    work_dir: Path
    replicas: tuple[Upstream, ...]
    port: int = 8443
    bind_host: str = "127.0.0.1"
    pool_id: str = "flywheel"  # prefix of the abstract sockets: unique per pool on a host
    max_body_bytes: int = MAX_BODY_BYTES
    check_inter_ms: int = 500
    check_fall: int = 2
    check_rise: int = 2
    check_timeout_ms: int = 1000
    retries: int = 3
    connect_timeout_ms: int = 1000
    server_timeout_s: float = 30.0
    client_timeout_s: float = 30.0
    queue_timeout_s: float = 10.0
    balance: str = "leastconn"
    bufsize: int = 65536  # whole requests up to this size can be replayed (L7 retries)
    nbthread: int | None = None  # None: HAProxy's default (one per CPU)
    maxconn: int = 4096

    @classmethod
    def local(cls, work_dir: Path, replicas: Iterable[Upstream], **overrides) -> HAProxyConfig:
        """Loopback on a free port, with a pool id no other pool on this host uses."""
        cfg = cls(Path(work_dir), tuple(replicas), port=free_port(), pool_id=f"fw-{uuid.uuid4().hex[:10]}")
        return replace(cfg, **overrides) if overrides else cfg

    @property
    def url(self) -> str:
        return f"http://{self.bind_host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "haproxy.cfg"

    @property
    def socket_path(self) -> Path:
        return self.work_dir / "haproxy.sock"

    @property
    def keys_map(self) -> Path:
        return self.work_dir / "keys.map"

    @property
    def canary_map(self) -> Path:
        return self.work_dir / "canary.map"

    @property
    def credentials_path(self) -> Path:
        return self.work_dir / "credentials.lst"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "haproxy.log"

    def detection_s(self) -> float:
        """Longest time from a replica's death to HAProxy marking it DOWN: `fall` failed checks
        `inter` apart, the last one waiting up to its timeout, plus one interval of phase."""
        return ((self.check_fall + 1) * self.check_inter_ms + self.check_timeout_ms) / 1000.0


def kill_failure_bound(cfg: HAProxyConfig, clients: int, replicas: int) -> int | None:
    """Most client requests that can fail when one replica dies abruptly (SIGKILL) under load,
    counted over the detection interval (`cfg.detection_s()`); after it, none can (the server is DOWN).

    With `retries >= 1`, `option redispatch 1` and at least one other replica up, a request meeting
    the dead replica (refused connection, reset, empty answer, the inner proxy's 502/503) is replayed
    on another server; only a response already on its way to the client cannot be replayed: at most
    one per client connection. Without retries every request routed there during detection can fail:
    no useful bound (None).
    """
    if cfg.retries >= 1 and replicas >= 2:
        return clients
    return None


def render_config(cfg: HAProxyConfig) -> str:
    """The haproxy.cfg text for `cfg` (see the module docstring for its design)."""
    if not cfg.replicas:
        raise FlywheelError("a pool needs at least one replica")
    names = [r.name for r in cfg.replicas]
    if len(set(names)) != len(names) or not all(n.replace("-", "").replace("_", "").isalnum() for n in names):
        raise FlywheelError(f"replica names must be unique and alphanumeric (- and _ allowed): {names}")
    s = f"{cfg.server_timeout_s:g}s"
    error_lines = "".join(
        f"    http-error status {code} content-type application/json string '{_json_string(msg)}'\n"
        for code, msg in ERRORS.items() if code in (502, 503, 504))
    glob = [
        "global",
        f"    stats socket {cfg.socket_path} mode 600 level admin",
        "    log stdout format raw daemon",
        f"    tune.bufsize {cfg.bufsize}",
        f"    maxconn {cfg.maxconn}",
        *( [f"    nbthread {cfg.nbthread}"] if cfg.nbthread else []),
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        f"    timeout connect {cfg.connect_timeout_ms}ms",
        f"    timeout client {cfg.client_timeout_s:g}s",
        f"    timeout server {s}",
        f"    timeout queue {cfg.queue_timeout_s:g}s",
        f"    timeout http-request {cfg.client_timeout_s:g}s",
        "    timeout http-keep-alive 10s",
        f"    timeout check {cfg.check_timeout_ms}ms",
        error_lines.rstrip("\n"),
        "",
    ]
    ok_token = (f"{{ req.hdr(authorization),word(2,' '),sha2(256),hex,lower -m str -f {cfg.credentials_path} }}")
    bearer = "{ req.hdr(authorization) -m beg -i 'bearer ' }"
    front = [
        f"frontend {FRONTEND}",
        f"    bind {cfg.bind_host}:{cfg.port}",
        "    option http-keep-alive",
        f'    log-format "{LOG_TAG} %ST %Ta %[var(txn.arm)] %[var(txn.model)] %[var(txn.version)] %s %rc"',
        # 1. The pool credential (only its SHA-256 is stored).
        f"    http-request return status 401 content-type application/json string '{_json_string(ERRORS[401])}'"
        f" hdr WWW-Authenticate 'Bearer realm=\"flywheel-pool\"' unless {bearer} {ok_token}",
        # 2. Bodies over the limit: refused before a replica reads them.
        f"    http-request return status 413 content-type application/json string '{_json_string(ERRORS[413])}'"
        f" if {{ req.hdr_val(content-length) gt {cfg.max_body_bytes} }}",
        # 3. Only the inference API's predictions and the pool's own /ping.
        "    acl is_predict method POST",
        "    acl is_predict_path path_beg /predictions/",
        "    acl is_ping path /ping",
        f"    http-request return status 404 content-type application/json string '{_json_string(ERRORS[404])}'"
        " unless is_predict is_predict_path or is_ping",
        # 4. No replica up: say so at once.
        f"    http-request return status 503 content-type application/json string '{_json_string(ERRORS[503])}'"
        f" if {{ nbsrv({BACKEND}) eq 0 }}",
        f"    http-request return status 200 content-type application/json lf-string "
        f"'{{\"status\": \"Healthy\", \"replicas_up\": %[nbsrv({BACKEND})]}}' if is_ping",
        # 5. Canary: /predictions/M (no version) → /predictions/M/V for SHARE % of requests.
        "    http-request set-var(txn.arm) str(explicit)",
        "    http-request set-var(txn.model) path,field(3,/) if { path_reg ^/predictions/[^/]+/?$ }",
        "    http-request set-var(txn.arm) str(stable) if { var(txn.model) -m found }",
        f"    http-request set-var(txn.canary) var(txn.model),map({cfg.canary_map}) if {{ var(txn.model) -m found }}",
        "    http-request set-var(txn.share) var(txn.canary),field(2,:) if { var(txn.canary) -m found }",
        "    http-request set-var(txn.roll) rand(100),sub(txn.share) if { var(txn.share) -m found }",
        "    http-request set-var(txn.version) var(txn.canary),field(1,:) if { var(txn.roll) -m int lt 0 }",
        "    http-request set-var(txn.arm) str(canary) if { var(txn.version) -m found }",
        "    http-request set-path /predictions/%[var(txn.model)]/%[var(txn.version)] if { var(txn.version) -m found }",
        # 6. A chunked body carries no Content-Length for rule 2: TorchServe's own limit refuses it
        #    with an empty 413 (the handler's own 413s are JSON, and pass unchanged).
        f"    http-response return status 413 content-type application/json string '{_json_string(ERRORS[413])}'"
        " if { status 413 } !{ res.hdr(content-type) -m found }",
        f"    default_backend {BACKEND}",
        "",
    ]
    back = [
        f"backend {BACKEND}",
        f"    balance {cfg.balance}",
        "    option httpchk",
        "    http-check send meth GET uri /ping",
        "    http-check expect status 200",
        f"    retries {cfg.retries}",
        "    option redispatch 1",
        # L7 retries need the whole request received before the first attempt is sent (HAProxy 2.6
        # drops them for a request still streaming its body: measured, every POST's 503 passed on).
        "    option http-buffer-request",
        "    retry-on conn-failure empty-response response-timeout 502 503 504",
        f"    default-server check inter {cfg.check_inter_ms}ms fall {cfg.check_fall} rise {cfg.check_rise}",
        *[f"    server {r.name} abns@{cfg.pool_id}-{r.name}" for r in cfg.replicas],
        "",
    ]
    inner = []
    for r in cfg.replicas:
        inner += [
            f"listen replica_{r.name}",
            f"    bind abns@{cfg.pool_id}-{r.name}",
            "    no log",  # the frontend logs each request once
            "    retries 0",  # a refused connection is answered at once: the pool retries elsewhere
            f'    http-request set-header Authorization "Bearer %[str({r.name}),map({cfg.keys_map})]"',
            f"    server {r.name} {r.address}",
            "",
        ]
    return "\n".join(glob + front + back + inner)


def credential_hash(token: str) -> str:
    """What credentials.lst stores for a pool token: its SHA-256, lower-case hex."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (keys and credential hashes)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def map_text(entries: Mapping[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in entries.items())


def read_map(path: Path) -> dict[str, str]:
    """The entries of a map file `map_text` wrote (key, one space, value per line)."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        k, _, v = line.partition(" ")
        if k:
            entries[k] = v
    return entries


# ------------------------------------------------------------------------------------ runtime API
@dataclass(frozen=True)
class ServerStat:
    """One server's row of `show stat`."""

    backend: str
    name: str
    status: str  # UP, DOWN, DRAIN, MAINT, "UP 1/2" (going down), "DOWN 1/2" (coming up), no check
    weight: int
    current: int  # requests in flight (scur)
    total: int  # stot
    errors: int  # eresp + econ
    retries: int  # wretr
    redispatches: int  # wredis
    hrsp_5xx: int
    raw: Mapping[str, str] = field(repr=False, default_factory=dict)

    @property
    def up(self) -> bool:
        return self.status.startswith("UP") or self.status == "DRAIN"


class RuntimeAPI:
    """HAProxy's runtime API on its admin stats socket: one command per connection."""

    def __init__(self, socket_path: Path, timeout: float = 5.0):
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def command(self, cmd: str) -> str:
        """Send one command, return HAProxy's answer; FlywheelError if the socket is unreachable."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(str(self.socket_path))
                s.sendall(cmd.encode() + b"\n")
                chunks = []
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as exc:
            raise FlywheelError(f"cannot reach HAProxy's runtime API at {self.socket_path}: {exc} "
                                "(is the pool's HAProxy running?)") from None
        return b"".join(chunks).decode(errors="replace")

    def _ok(self, cmd: str) -> str:
        """A command whose answer is empty (or a known success line) on success."""
        out = self.command(cmd).strip()
        if out and not out.lower().startswith(("done", "new weight")) and "entry" not in out.lower():
            raise FlywheelError(f"HAProxy refused `{cmd.split()[0]} {cmd.split()[1]} ...`: {out[:200]}")
        return out

    def set_state(self, server: str, state: str, backend: str = BACKEND) -> None:
        """`ready` (takes traffic), `drain` (finishes what it has, no new traffic), `maint` (none)."""
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"unknown server state {state!r}")
        self._ok(f"set server {backend}/{server} state {state}")

    def set_weight(self, server: str, weight: int | str, backend: str = BACKEND) -> None:
        self._ok(f"set weight {backend}/{server} {weight}")

    def set_map(self, map_path: Path, key: str, value: str) -> None:
        """Set `key` to `value` in a loaded map, adding it if absent."""
        out = self.command(f"set map {map_path} {key} {value}").strip()
        if out:
            if "not found" not in out.lower() and "unknown" not in out.lower():
                raise FlywheelError(f"HAProxy refused `set map {map_path} {key}`: {out[:200]}")
            out = self.command(f"add map {map_path} {key} {value}").strip()
            if out:
                raise FlywheelError(f"HAProxy refused `add map {map_path} {key}`: {out[:200]}")

    def del_map(self, map_path: Path, key: str) -> None:
        self.command(f"del map {map_path} {key}")  # an absent key is not an error here

    def show_map(self, map_path: Path) -> dict[str, str]:
        out = self.command(f"show map {map_path}")
        found = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0].startswith("0x"):
                found[parts[1]] = parts[2]
        return found

    def add_acl(self, acl_path: Path, pattern: str) -> None:
        out = self.command(f"add acl {acl_path} {pattern}").strip()
        if out:
            raise FlywheelError(f"HAProxy refused `add acl {acl_path}`: {out[:200]}")

    def del_acl(self, acl_path: Path, pattern: str) -> None:
        self.command(f"del acl {acl_path} {pattern}")

    def show_stat(self) -> list[dict[str, str]]:
        out = self.command("show stat")
        text = out.lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def servers(self, backend: str = BACKEND) -> dict[str, ServerStat]:
        def num(row, key):
            try:
                return int(row.get(key) or 0)
            except ValueError:
                return 0

        found = {}
        for row in self.show_stat():
            if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
                continue
            found[row["svname"]] = ServerStat(
                backend, row["svname"], row.get("status", ""), num(row, "weight"), num(row, "scur"),
                num(row, "stot"), num(row, "eresp") + num(row, "econ"), num(row, "wretr"), num(row, "wredis"),
                num(row, "hrsp_5xx"), row)
        return found

    def wait_status(self, server: str, want: str, timeout: float = 30.0, backend: str = BACKEND) -> ServerStat:
        """Until `server`'s status starts with `want` (UP, DOWN, DRAIN, MAINT)."""
        deadline = time.monotonic() + timeout
        while True:
            stat = self.servers(backend).get(server)
            if stat is not None and stat.status.split()[0] == want:
                return stat
            if time.monotonic() > deadline:
                raise FlywheelError(f"HAProxy server {backend}/{server} is {stat.status if stat else 'unknown'}, "
                                    f"not {want}, after {timeout:.0f}s")
            time.sleep(0.1)

    def wait_idle(self, server: str, timeout: float = 30.0, backend: str = BACKEND) -> None:
        """Until `server` has no request in flight (after `drain`)."""
        deadline = time.monotonic() + timeout
        while True:
            stat = self.servers(backend).get(server)
            if stat is None or stat.current == 0:
                return
            if time.monotonic() > deadline:
                raise FlywheelError(f"HAProxy server {backend}/{server} still has {stat.current} request(s) in "
                                    f"flight after {timeout:.0f}s of draining")
            time.sleep(0.05)


# ------------------------------------------------------------------------------------ the process
class HAProxy:
    """A started HAProxy (foreground, own session); `stop()` ends it (also as a context manager)."""

    def __init__(self, cfg: HAProxyConfig, proc: subprocess.Popen):
        self.cfg = cfg
        self.proc = proc
        self.runtime = RuntimeAPI(cfg.socket_path)

    @property
    def url(self) -> str:
        return self.cfg.url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.cfg.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        stop_process_group(self.proc, timeout=timeout)
        self.proc.wait()
        self.cfg.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def write_files(cfg: HAProxyConfig, keys: Mapping[str, str], credential_hashes: Iterable[str],
                canary: Mapping[str, str] | None = None) -> None:
    """haproxy.cfg, keys.map (replica name → inference key), credentials.lst, canary.map; 0600 each."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    hashes = [h.strip().lower() for h in credential_hashes if h.strip()]
    if not hashes or not all(len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in hashes):
        raise FlywheelError("the pool needs at least one credential hash (64 hex characters, sha256)")
    missing = [r.name for r in cfg.replicas if r.name not in keys]
    if missing:
        raise FlywheelError(f"no TorchServe inference key for replica(s) {', '.join(missing)}")
    write_private(cfg.keys_map, map_text({r.name: keys[r.name] for r in cfg.replicas}))
    write_private(cfg.credentials_path, "".join(f"{h}\n" for h in hashes))
    write_private(cfg.canary_map, map_text(canary or {}))
    write_private(cfg.config_path, render_config(cfg))


def check_config(cfg: HAProxyConfig) -> None:
    """`haproxy -c`: FlywheelError with HAProxy's own message when the config is not valid."""
    proc = subprocess.run([str(HAPROXY), "-c", "-f", str(cfg.config_path)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise FlywheelError(f"HAProxy rejected {cfg.config_path}: {(proc.stderr or proc.stdout).strip()[-800:]}")


def start_haproxy(cfg: HAProxyConfig, keys: Mapping[str, str], credential_hashes: Iterable[str],
                  wait_s: float = 15.0, canary: Mapping[str, str] | None = None) -> HAProxy:
    """Write the files, check the config, start `haproxy -db` and wait for its runtime API and port."""
    if not HAPROXY.exists():
        raise FlywheelError(f"{HAPROXY} not found: apt-get install haproxy (2.6; scripts/system-deps.sh)")
    write_files(cfg, keys, credential_hashes, canary)
    check_config(cfg)
    cfg.socket_path.unlink(missing_ok=True)
    with open(cfg.log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([str(HAPROXY), "-db", "-f", str(cfg.config_path)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=devnull, start_new_session=True)
    server = HAProxy(cfg, proc)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            if not server.alive():
                raise FlywheelError(f"haproxy exited with {proc.returncode}; log:\n{server.log_tail()}")
            try:
                server.runtime.command("show info")
                with socket.create_connection((cfg.bind_host, cfg.port), timeout=1):
                    break
            except (FlywheelError, OSError):
                if time.monotonic() > deadline:
                    raise FlywheelError(f"haproxy not answering after {wait_s:.0f}s; log:\n{server.log_tail()}") from None
                time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    return server


# ------------------------------------------------------------------------------------ the log
@dataclass(frozen=True)
class LogLine:
    """One request as the frontend logged it (the `log-format` in render_config)."""

    status: int  # -1: the client went away before an answer
    total_ms: int  # %Ta: from the request's arrival to the end of the response
    arm: str  # stable | canary | explicit | "-" (refused before routing: 401/404/413)
    model: str
    version: str  # the canary version the request was sent to ("-" on the stable arm)
    server: str
    retries: int


def parse_log_line(line: str) -> LogLine | None:
    """A LogLine of one line of haproxy.log; None for HAProxy's other lines (start, alerts)."""
    parts = line.split()
    if len(parts) != 8 or parts[0] != LOG_TAG:
        return None
    try:
        return LogLine(int(parts[1]), int(parts[2]), parts[3], parts[4], parts[5], parts[6],
                       int(parts[7].lstrip("+")))
    except ValueError:
        return None


def read_log(path: Path, offset: int = 0) -> tuple[list[LogLine], int]:
    """Request lines of haproxy.log from byte `offset`; returns them and the offset to continue from
    (a line still being written stays for the next read)."""
    with open(path, "rb") as f:
        if offset > os.fstat(f.fileno()).st_size:  # rotated (copytruncate): start over
            offset = 0
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = [parse_log_line(x) for x in data[:end].decode(errors="replace").splitlines()]
    return [x for x in lines if x is not None], offset + end
