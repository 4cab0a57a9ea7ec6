"""The authenticating front of a Triton server: bearer keys, the default-version route, body limit.

Triton has no authentication of its own, so `start_triton` binds every Triton port (HTTP, gRPC,
metrics) to 127.0.0.1 and runs this proxy as the only way in. It is TorchServe's token scheme
rebuilt, so clients, key renewal (serving/keys.py: `KeyRenewer`, `flywheel serve-keys`) and the
key file's readers work unchanged for both engines:

* keys live in `key_file.json` in TorchServe's format (`{"inference": {"key", "expiration time"},
  "management": {...}, "API": {"key"}}`, mode 0600), written at start; an expired or wrong key is
  answered 401 `{"error": ..., "code": 401}`, as is a request without one;
* `POST /token?type=inference|management` with the API key issues a new key of that kind (the
  renewal call `KeyRenewer` makes to TorchServe's management API);
* the inference key opens the KServe v2 inference, health and metadata routes and `/metrics`
  (Triton's Prometheus metrics, for the monitor's scrape); the management key opens the model
  repository API (`/v2/repository/...`: load, unload, index), shared memory, trace and logging, and
  `/flywheel/models/<model>/default`;
* the default version: Triton answers `/v2/models/<model>/infer` (no version) with the highest loaded
  version, so a release could not accept a new version before clients reach it. The proxy keeps a
  route per model (`PUT /flywheel/models/<m>/default?version=V`, saved to `routes.json`) and sends
  unversioned inference, readiness and metadata requests to `/versions/V/`: the release's atomic
  switch, as TorchServe's set-default is;
* bodies above `max_request_bytes` are answered 413 JSON before they reach Triton.

Run as its own process: `python -m flywheel.serving.triton_proxy --listen 127.0.0.1:P --triton
http://127.0.0.1:Q --metrics http://127.0.0.1:M --key-file F --routes R`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("flywheel.triton_proxy")
MAX_REQUEST_BYTES = 8 * 1024 * 1024  # as TorchServe's max_request_size (serving/torchserve.py)
KINDS = ("inference", "management")
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
        "transfer-encoding", "upgrade", "host", "authorization", "content-length"}
_UNVERSIONED = re.compile(r"^/v2/models/(?P<model>[^/]+)(?P<rest>/infer|/ready|/config|/stats)?$")
_MANAGEMENT = re.compile(r"^/(v2/repository|v2/systemsharedmemory|v2/cudasharedmemory|v2/logging|v2/trace"
                         r"|v2/models/[^/]+(/versions/[^/]+)?/trace|flywheel/)")
_INFERENCE = re.compile(r"^/(v2|v2/health/(live|ready)|v2/models/[^/]+(/versions/[^/]+)?"
                        r"(/infer|/ready|/config|/stats)?|metrics)$")
_DEFAULT = re.compile(r"^/flywheel/models/(?P<model>[^/]+)/default$")


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    triton_url: str  # Triton's loopback HTTP address
    metrics_url: str  # Triton's loopback metrics address
    key_file: Path
    routes_file: Path
    token_expiration_min: float = 1440.0
    max_request_bytes: int = MAX_REQUEST_BYTES


def _instant(ts: float) -> str:
    """Java's Instant.toString() (what TorchServe writes; serving/keys.parse_time reads it)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Keys:
    """The proxy's keys: issued, checked (constant time, expiry) and written to the key file."""

    def __init__(self, key_file: Path, lifetime_s: float):
        self.key_file = Path(key_file)
        self.lifetime_s = lifetime_s
        self.api = secrets.token_urlsafe(24)
        self.keys: dict[str, tuple[str, float]] = {}
        for kind in KINDS:
            self.keys[kind] = (secrets.token_urlsafe(24), time.time() + lifetime_s)
        self.write()

    def renew(self, kind: str) -> None:
        self.keys[kind] = (secrets.token_urlsafe(24), time.time() + self.lifetime_s)
        self.write()

    def check(self, kind: str, presented: str | None) -> str | None:
        """None when `presented` is the live `kind` key, else why not (for the 401 body)."""
        if not presented:
            return f"no bearer token: send 'Authorization: Bearer <{kind} key>' from {self.key_file}"
        key, expires = self.keys[kind]
        if not hmac.compare_digest(presented.encode(), key.encode()):
            return f"wrong {kind} key: use the current one from {self.key_file}"
        if time.time() >= expires:
            return f"the {kind} key expired: renew it (flywheel serve-keys renew) and re-read {self.key_file}"
        return None

    def write(self) -> None:
        data = {kind: {"key": key, "expiration time": _instant(exp)} for kind, (key, exp) in self.keys.items()}
        data["API"] = {"key": self.api}
        tmp = self.key_file.with_name(f".{self.key_file.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self.key_file)


def _error(status: int, message: str, **headers):
    from aiohttp import web

    return web.json_response({"error": message, "code": status}, status=status, headers=headers or None)


def _infer_header_problem(body: bytes, header_length: str | None) -> str | None:
    """Why a KServe v2 infer body is malformed (its JSON part is not a JSON object), or None."""
    try:
        size = len(body) if header_length is None else int(header_length)
        if not 0 < size <= len(body):
            return f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes"
        header = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        return f"the inference request is not valid KServe v2 JSON: {exc}"
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        return "the inference request must be a JSON object with an 'inputs' list (KServe v2)"
    return None


async def _read_body(request, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it exceeds `limit` bytes (the rest stays unread)."""
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request, limit: int) -> None:
    """Read and drop up to `limit` more bytes of an over-limit body (a bigger one gets its connection closed)."""
    seen = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        seen += len(chunk)
        if seen > limit:
            break


def _bearer(request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Proxy:
    def __init__(self, cfg: ProxyConfig):
        self.cfg = cfg
        self.keys = Keys(cfg.key_file, cfg.token_expiration_min * 60.0)
        self.routes: dict[str, str] = {}
        if cfg.routes_file.is_file():
            self.routes = {str(k): str(v) for k, v in json.loads(cfg.routes_file.read_text()).items()}
        self.session = None

    def _save_routes(self) -> None:
        tmp = self.cfg.routes_file.with_name(f".{self.cfg.routes_file.name}.tmp")
        tmp.write_text(json.dumps(self.routes, indent=2, sort_keys=True))
        os.replace(tmp, self.cfg.routes_file)

    async def handle(self, request):
        import aiohttp
        from aiohttp import web

        path = request.path
        if path == "/token" and request.method == "POST":
            return self._token(request)
        kind = "management" if _MANAGEMENT.match(path) else "inference" if _INFERENCE.match(path) else None
        if kind is None:
            return _error(404, f"no such route: {path}")
        problem = self.keys.check(kind, _bearer(request))
        if problem:
            return _error(401, f"authentication failed: {problem}", **{"WWW-Authenticate": "Bearer"})
        match = _DEFAULT.match(path)
        if match:
            return self._default(request, match["model"])
        body = await _read_body(request, self.cfg.max_request_bytes)
        if body is None:
            await _drain(request, self.cfg.max_request_bytes * 8)  # the client reads the 413, not a reset
            return _error(413, f"request body exceeds the limit of {self.cfg.max_request_bytes} bytes: send "
                               "smaller images or fewer per request")
        base = self.cfg.metrics_url if path == "/metrics" else self.cfg.triton_url
        unversioned = _UNVERSIONED.match(path)
        if unversioned and unversioned["model"] in self.routes:
            path = (f"/v2/models/{unversioned['model']}/versions/{self.routes[unversioned['model']]}"
                    f"{unversioned['rest'] or ''}")
        if request.method == "POST" and path.endswith("/infer"):
            problem = _infer_header_problem(body, request.headers.get("Inference-Header-Content-Length"))
            if problem:  # Triton answers 500 to an unparsable request: a client error is a 400
                return _error(400, problem)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self.session.request(request.method, base + path, params=request.query, data=body,
                                            headers=headers, allow_redirects=False) as upstream:
                data = await upstream.read()
                out = {k: v for k, v in upstream.headers.items()
                       if k.lower() not in _HOP and k.lower() != "content-encoding"}
                return web.Response(status=upstream.status, body=data, headers=out)
        except aiohttp.ClientError as exc:  # Triton starting, stopping or gone: the client may retry
            return _error(503, f"Triton is not reachable behind this proxy ({type(exc).__name__})")

    def _token(self, request):
        from aiohttp import web

        presented = _bearer(request)
        if not presented or not hmac.compare_digest(presented.encode(), self.keys.api.encode()):
            return _error(401, f"authentication failed: the token API needs the API key from {self.keys.key_file}",
                          **{"WWW-Authenticate": "Bearer"})
        kind = request.query.get("type", "")
        if kind not in KINDS:
            return _error(400, f"type must be one of {', '.join(KINDS)}")
        self.keys.renew(kind)
        return web.json_response({"message": f"{kind} key renewed", "expiration time":
                                  _instant(self.keys.keys[kind][1])})

    def _default(self, request, model: str):
        from aiohttp import web

        if request.method == "PUT":
            version = request.query.get("version", "")
            if not version.isdigit():
                return _error(400, "give ?version=N (a Triton version folder)")
            self.routes[model] = version
            self._save_routes()
        elif request.method == "DELETE":
            self.routes.pop(model, None)
            self._save_routes()
        elif request.method != "GET":
            return _error(405, "GET, PUT ?version=N or DELETE")
        return web.json_response({"model": model, "default": self.routes.get(model)})

    async def start(self, app) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                             connector=aiohttp.TCPConnector(limit=256))

    async def close(self, app) -> None:
        if self.session is not None:
            await self.session.close()


def build_app(cfg: ProxyConfig):
    from aiohttp import web

    proxy = Proxy(cfg)
    app = web.Application(client_max_size=cfg.max_request_bytes + 1)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.close)
    return app


def main(argv: list[str] | None = None) -> int:
    from aiohttp import web

    parser = argparse.ArgumentParser(description="Authenticating proxy in front of a loopback Triton.")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve on.")
    parser.add_argument("--triton", required=True, help="Triton's HTTP URL (loopback).")
    parser.add_argument("--metrics", required=True, help="Triton's metrics URL (loopback).")
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--routes", type=Path, required=True)
    parser.add_argument("--token-expiration-min", type=float, default=1440.0)
    parser.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    cfg = ProxyConfig(host, int(port), args.triton.rstrip("/"), args.metrics.rstrip("/"), args.key_file,
                      args.routes, args.token_expiration_min, args.max_request_bytes)
    web.run_app(build_app(cfg), host=host, port=int(port), access_log=None, print=None,
                handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
