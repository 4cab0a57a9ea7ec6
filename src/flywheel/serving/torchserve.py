"""Run a real TorchServe (token auth on) and talk to it: inference, management and metrics.

`start_torchserve` writes a config.properties with every address explicit (HTTP and gRPC), starts
`torchserve --foreground` in its own session (so stopping the process group takes the Java frontend
and its Python workers down together), and waits for /ping. Several servers can run side by side:
each has its own ports, work dir (key_file.json, logs), model store and worker socket range.

Keys expire (`token_expiration_min`), so a started `TorchServe` owns a `KeyRenewer`
(flywheel.serving.keys) that renews both keys through TorchServe's token API at half their lifetime,
stopped with the server. `TorchServeClient` never keeps a key for good: it reads the key file (or
another key source), and when TorchServe rejects a key (400 InvalidKeyException in 0.12, 401 in
later releases) it re-reads until the source shows a different key (bounded: a key renewed a moment
ago may not be on disk yet) and retries, so a renewal costs a client no failed request. A key that
is still rejected after that is an authentication failure, and `explain` says so.

Request bodies: TorchServe answers a body above `max_request_size` with an empty 413 and closes the
connection without reading the rest (clients that give up at the write error, like urllib, see a
reset; requests reads the 413). The client checks a body against the shipped limit before sending
it and turns TorchServe's 413 into `RequestTooLarge`, a one-line error.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flywheel.core.errors import FlywheelError
from flywheel.core.procs import free_port, stop_process_group

REPO_DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "serving"
KEY_FILE = "key_file.json"
TOKEN_EXPIRATION_MIN = 1440  # deploy/serving/config.properties' token_expiration_min
# TorchServe's body limits, set explicitly (its defaults are 6553500): a 4 MiB image (the handler's
# per-image limit) fits raw and as base64 JSON. deploy/serving/config.properties has the same values.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class RequestTooLarge(FlywheelError):
    """A request body above the server's max_request_size (TorchServe answers an empty 413 or resets)."""


@dataclass(frozen=True)
class ServeConfig:
    """One TorchServe instance. Addresses default to loopback; production binds inference publicly."""

    work_dir: Path  # cwd of the server: key_file.json, logs/, config.properties
    model_store: Path
    inference_address: str = "http://127.0.0.1:8080"
    management_address: str = "http://127.0.0.1:8081"  # model API: never on a public address
    metrics_address: str = "http://127.0.0.1:8082"
    grpc_inference_address: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_address: str = "127.0.0.1"
    grpc_management_port: int = 7071
    worker_port_base: int = 9000  # workers use unix sockets /tmp/.ts.sock.<port>: distinct per server
    token_expiration_min: float = TOKEN_EXPIRATION_MIN  # key lifetime; TorchServe takes fractions (0.25 = 15 s)
    max_request_size: int = MAX_REQUEST_BYTES
    max_response_size: int = MAX_RESPONSE_BYTES
    models: tuple[str, ...] = ()  # archives to load at start: "file.mar" or "name=file.mar"
    extra: dict = field(default_factory=dict)  # any other config.properties keys

    @classmethod
    def local(cls, work_dir: Path, model_store: Path, **overrides) -> ServeConfig:
        """Loopback-only config on free random ports (tests, demo, several servers side by side)."""
        ports = [free_port() for _ in range(5)]
        cfg = cls(Path(work_dir), Path(model_store),
                  inference_address=f"http://127.0.0.1:{ports[0]}",
                  management_address=f"http://127.0.0.1:{ports[1]}",
                  metrics_address=f"http://127.0.0.1:{ports[2]}",
                  grpc_inference_port=ports[3], grpc_management_port=ports[4],
                  worker_port_base=random.randrange(20000, 60000, 100))
        return replace(cfg, **overrides) if overrides else cfg


def render_properties(cfg: ServeConfig, metrics_config: Path | None = None) -> str:
    """config.properties for this instance (same keys as deploy/serving/config.properties)."""
    metrics_config = metrics_config or REPO_DEPLOY / "metrics.yaml"
    props = {
        "inference_address": cfg.inference_address,
        "management_address": cfg.management_address,
        "metrics_address": cfg.metrics_address,
        "grpc_inference_address": cfg.grpc_inference_address,
        "grpc_inference_port": cfg.grpc_inference_port,
        "grpc_management_address": cfg.grpc_management_address,
        "grpc_management_port": cfg.grpc_management_port,
        "enable_model_api": "true",  # releases register versions; management stays on loopback
        "disable_token_authorization": "false",
        "token_expiration_min": cfg.token_expiration_min,
        "max_request_size": cfg.max_request_size,
        "max_response_size": cfg.max_response_size,
        "metrics_mode": "prometheus",
        "metrics_config": str(metrics_config),
        "model_store": str(cfg.model_store),
        "initial_worker_port": cfg.worker_port_base,
        "default_workers_per_model": 1,
        "install_py_dep_per_model": "false",
        # deploy/serving/log4j2.xml: each line once, no per-request chatter; see config.properties.
        "vmargs": f"-Xmx1g -XX:+ExitOnOutOfMemoryError -Dlog4j.configurationFile={REPO_DEPLOY / 'log4j2.xml'}",
        "async_logging": "true",
        **cfg.extra,
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


class TorchServe:
    """A started TorchServe process group and its key renewer; `stop()` ends both (also as a context manager)."""

    def __init__(self, cfg: ServeConfig, proc: subprocess.Popen, log_path: Path):
        from flywheel.serving.keys import KeyRenewer

        self.cfg = cfg
        self.proc = proc
        self.log_path = log_path
        self.renewer = KeyRenewer(cfg.management_address, cfg.work_dir / KEY_FILE)
        self._background: subprocess.Popen | None = None  # renew_in_background's process

    @property
    def key_file(self) -> Path:
        return self.cfg.work_dir / KEY_FILE

    def client(self, timeout: float = 30.0) -> TorchServeClient:
        return TorchServeClient(self.cfg.inference_address, self.cfg.management_address,
                                metrics_url=self.cfg.metrics_address, key_file=self.key_file, timeout=timeout)

    def renew_in_background(self) -> subprocess.Popen:
        """Hand key renewal from this process's thread to a `flywheel serve-keys renew --watch` process
        that outlives this one (servers left running, e.g. the demo's --keep) and exits when the
        TorchServe launcher does (`kill -- -PGID`) or when `stop()` is called."""
        self.renewer.stop()
        cmd = [sys.executable, "-m", "flywheel", "serve-keys", "renew", "--watch", "--key-file", str(self.key_file),
               "--management-url", self.cfg.management_address, "--while-pid", str(self.proc.pid)]
        with open(self.cfg.work_dir / "key-renewer.log", "ab") as log, open(os.devnull, "rb") as devnull:
            self._background = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=devnull,
                                                start_new_session=True)  # Ctrl-C on the parent spares it
        return self._background

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the key renewer, SIGTERM the whole process group (frontend + workers), SIGKILL what is left."""
        self.renewer.stop()
        if self._background is not None and self._background.poll() is None:
            self._background.terminate()
            self._background.wait(timeout)
        # The whole group: workers may outlive the launcher for a moment.
        stop_process_group(self.proc, timeout=timeout)
        self.proc.wait()
        # Worker sockets (/tmp/.ts.sock.<port>, Java's tmpdir) are not removed on a signal.
        for port in range(self.cfg.worker_port_base, self.cfg.worker_port_base + 100):
            for suffix in ("", ".lock"):
                Path(f"/tmp/.ts.sock.{port}{suffix}").unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_torchserve(cfg: ServeConfig, wait_s: float = 120.0, env: dict | None = None) -> TorchServe:
    """Start TorchServe with `cfg` and wait until /ping answers Healthy with the inference token."""
    exe = Path(sys.executable).with_name("torchserve")
    if not exe.exists():
        raise FlywheelError("torchserve not found beside this Python: pip install torchserve==0.12.0 (needs Java 17)")
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    cfg.model_store.mkdir(parents=True, exist_ok=True)
    (cfg.work_dir / KEY_FILE).unlink(missing_ok=True)  # a stale file would carry dead tokens
    props = cfg.work_dir / "config.properties"
    props.write_text(render_properties(cfg))
    cmd = [str(exe), "--foreground", "--ts-config", str(props), "--model-store", str(cfg.model_store), "--ncs"]
    if cfg.models:
        cmd += ["--models", *cfg.models]
    log_path = cfg.work_dir / "torchserve.log"
    # TMPDIR: the launcher keeps its pid file in $TMPDIR/.model_server.pid and refuses to start a
    # second server while it exists; a private one lets servers run side by side.
    (cfg.work_dir / "tmp").mkdir(exist_ok=True)
    child_env = {**os.environ, "LOG_LOCATION": str(cfg.work_dir / "logs"), "TMPDIR": str(cfg.work_dir / "tmp"),
                 "METRICS_LOCATION": str(cfg.work_dir / "logs"), **(env or {})}
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, cwd=cfg.work_dir, stdout=log, stderr=subprocess.STDOUT, stdin=devnull,
                                start_new_session=True, env=child_env)
    server = TorchServe(cfg, proc, log_path)
    try:
        _wait_healthy(server, wait_s)
        server.renewer.start()
    except BaseException:
        server.stop()
        raise
    return server


def _wait_healthy(server: TorchServe, wait_s: float) -> None:
    import requests

    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not server.alive():
            raise FlywheelError(f"torchserve exited with {server.proc.returncode}; log:\n{server.log_tail()}")
        if server.key_file.exists():
            try:
                r = server.client(timeout=5).ping()
                if r.status_code == 200 and r.json().get("status") == "Healthy":
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except (requests.RequestException, ValueError, KeyError, FlywheelError) as exc:
                last = str(exc)  # FlywheelError: key file seen while still being written
        time.sleep(0.25)
    raise FlywheelError(f"torchserve not healthy after {wait_s:.0f}s ({last}); log:\n{server.log_tail()}")


class TorchServeClient:
    """Authenticated client for TorchServe's inference, management and metrics APIs.

    Keys come from `key_file` (TorchServe's key_file.json, re-read whenever a key is rejected), or
    from `key_source` (any callable returning {"inference": key, "management": key}, e.g. a file in a
    container), or are given once (`inference_key`/`management_key`: nothing to re-read).
    """

    def __init__(self, inference_url: str, management_url: str | None = None, *, metrics_url: str | None = None,
                 key_file: Path | None = None, inference_key: str | None = None,
                 management_key: str | None = None, timeout: float = 30.0,
                 key_source: Callable[[], Mapping[str, str]] | None = None, key_source_name: str | None = None,
                 max_request_bytes: int | None = MAX_REQUEST_BYTES):
        import requests

        from flywheel.serving.keys import read_keys

        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/") if management_url else None
        self.metrics_url = metrics_url.rstrip("/") if metrics_url else None
        self.key_file = Path(key_file) if key_file else None
        if key_source is None and self.key_file is not None:
            key_file_path = self.key_file
            key_source = lambda: read_keys(key_file_path)  # noqa: E731 - re-read on every rejection
        self.key_source = key_source
        self.key_source_name = key_source_name or (f"key file {self.key_file}" if self.key_file else
                                                   "the token given (no key file to re-read)")
        self._keys = {"inference": inference_key, "management": management_key}
        self._lock = threading.Lock()
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes  # None: leave the limit to the server
        self.session = requests.Session()

    def _key(self, kind: str, rejected: str | None = None, reload: bool = False) -> str | None:
        from flywheel.serving.keys import fresh_key

        if self.key_source is None:
            return self._keys.get(kind)
        with self._lock:  # one re-read for all threads that hit the same rejected key
            current = self._keys.get(kind)
            if reload and current == rejected:
                current = fresh_key(self.key_source, kind, rejected)
            elif current is None:
                current = self.key_source().get(kind)
            self._keys[kind] = current
            return current

    def _call(self, kind: str, method: str, url: str, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        extra_headers = dict(kwargs.pop("headers", None) or {})
        key = self._key(kind)
        for _attempt in range(3):  # a key rejected because it was just renewed: the fresh one is tried
            headers = dict(extra_headers)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            r = self.session.request(method, url, headers=headers, **kwargs)
            if not token_rejected(r) or self.key_source is None:
                return r
            fresh = self._key(kind, rejected=key, reload=True)
            if fresh == key:  # the source still holds the rejected key: a real authentication failure
                return r
            key = fresh
        return r

    def explain(self, r, kind: str = "inference") -> str:
        """One line for a failed response; a rejected token is named as an authentication failure."""
        if token_rejected(r):
            return (f"authentication failed: TorchServe rejected the {kind} token (HTTP {r.status_code}: wrong or "
                    f"expired) from {self.key_source_name}; use the serving node's current key_file.json and "
                    "check that its keys are renewed (flywheel serve-keys)")
        return f"HTTP {r.status_code} {_message(r)}"

    def _raise_for(self, r, what: str, kind: str = "management") -> None:
        if r.status_code >= 400:
            raise FlywheelError(f"torchserve {what} failed: {self.explain(r, kind)}")

    def _mgmt(self, method: str, path: str, **kwargs):
        if not self.management_url:
            raise FlywheelError("no management URL given: management calls need --management-url")
        return self._call("management", method, f"{self.management_url}{path}", **kwargs)

    # inference API
    def ping(self):
        return self._call("inference", "GET", f"{self.inference_url}/ping")

    def predict(self, model: str, data: bytes | dict | list, version: str | None = None,
                headers: dict | None = None, **kwargs):
        """POST /predictions/MODEL[/VERSION]; raises RequestTooLarge for a body above max_request_size."""
        url = f"{self.inference_url}/predictions/{model}" + (f"/{version}" if version else "")
        if isinstance(data, (dict, list)):
            body, ctype = json.dumps(data).encode(), "application/json"
        else:
            body, ctype = data, "application/octet-stream"
        size_mb = len(body) / 2**20
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes:
            raise RequestTooLarge(f"request body of {size_mb:.1f} MB exceeds the server's max_request_size "
                                  f"{self.max_request_bytes / 2**20:.1f} MB: send smaller images (the handler "
                                  "takes <= 4 MiB each) or fewer per request")
        r = self._call("inference", "POST", url, data=body, headers={"Content-Type": ctype, **(headers or {})},
                       **kwargs)
        if r.status_code == 413 and not r.content:  # TorchServe's own answer (the handler's 413 has JSON)
            raise RequestTooLarge(f"request body of {size_mb:.1f} MB exceeds the server's max_request_size "
                                  "(TorchServe answered 413): send smaller images or fewer per request")
        return r

    # management API
    def register(self, url: str, *, model_name: str | None = None, initial_workers: int = 1,
                 synchronous: bool = True, timeout_s: int = 120):
        params = {"url": url, "initial_workers": initial_workers, "synchronous": str(synchronous).lower()}
        if model_name:
            params["model_name"] = model_name
        return self._mgmt("POST", "/models", params=params, timeout=timeout_s + 10)

    def scale(self, model: str, version: str, min_worker: int, max_worker: int | None = None):
        params = {"min_worker": min_worker, "max_worker": max_worker or min_worker, "synchronous": "true"}
        return self._mgmt("PUT", f"/models/{model}/{version}", params=params, timeout=120)

    def set_default(self, model: str, version: str):
        return self._mgmt("PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str):
        return self._mgmt("DELETE", f"/models/{model}/{version}", timeout=120)

    def describe(self, model: str, version: str | None = None):
        return self._mgmt("GET", f"/models/{model}" + (f"/{version}" if version else ""))

    def list_models(self, limit: int | None = None, next_page_token: str | None = None):
        """GET /models: one page ({"models": [...], "nextPageToken": ...} while more remain)."""
        params = {k: v for k, v in (("limit", limit), ("next_page_token", next_page_token)) if v is not None}
        return self._mgmt("GET", "/models", params=params or None)

    def versions(self, model: str) -> dict[str, bool]:
        """{version: is_default} for every registered version of `model` ({} when none)."""
        r = self.describe(model, "all")
        if r.status_code == 404:
            return {}
        self._raise_for(r, f"describe {model}")
        d = self.describe(model)  # without a version TorchServe describes the default one
        self._raise_for(d, f"describe {model}")
        default = str(d.json()[0]["modelVersion"])
        return {str(m["modelVersion"]): str(m["modelVersion"]) == default for m in r.json()}

    def wait_ready(self, model: str, version: str | None = None, timeout: float = 120.0) -> list[dict]:
        """Block until every worker of the model (version) is READY; returns the workers."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.describe(model, version)
            workers = r.json()[0].get("workers", []) if r.status_code == 200 else []
            if workers and all(w.get("status") == "READY" for w in workers):
                return workers
            if time.monotonic() > deadline:
                raise FlywheelError(f"workers of {model} {version or ''} not READY after {timeout:.0f}s: "
                                    + (str(workers) if workers else self.explain(r, "management")))
            time.sleep(0.25)

    def default_version(self, model: str) -> str | None:
        return next((v for v, d in self.versions(model).items() if d), None)

    def metrics(self) -> str:
        if not self.metrics_url:
            raise FlywheelError("no metrics URL given")
        return self._call("management", "GET", f"{self.metrics_url}/metrics").text


def token_rejected(r) -> bool:
    """TorchServe 0.12 answers a wrong or expired token with 400 InvalidKeyException, not 401."""
    return r.status_code == 401 or (r.status_code == 400 and "InvalidKeyException" in r.text)


def _message(r) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    return str(body.get("message") or body.get("error") or body)[:300] if isinstance(body, dict) else r.text[:300]
