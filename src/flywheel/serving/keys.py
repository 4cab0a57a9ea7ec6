"""TorchServe 0.12 token keys: read `key_file.json` safely and renew the keys before they expire.

Keys stay short-lived (that is their point), so whoever owns a serving node renews them through
TorchServe's token API, and every client reads the key file instead of keeping a key.

What TorchServe 0.12.0 does (read in its frontend, `org.pytorch.serve.util.TokenAuthorization` and
`org.pytorch.serve.http.TokenAuthorizationHandler` in `ts/frontend/model-server.jar`, and measured
against a real server with `token_expiration_min` 1 and 0.25):

* At start it writes `key_file.json` into its working directory, mode 0600 (it chmods the file after
  every write): `{"management": {"key", "expiration time"}, "inference": {"key", "expiration time"},
  "API": {"key"}}`, times as ISO-8601 UTC with nanoseconds (`2026-12-01T14:11:35.091394132Z`).
* The inference and management keys expire `token_expiration_min` (a float: 0.25 is 15 s) after they
  were issued; an expired or wrong key gets `400 InvalidKeyException`, `/ping` included. The API key
  never expires and changes only when the server restarts.
* `GET` or `POST {management}/token?type=inference|management` with `Authorization: Bearer <API key>`
  issues a new key of that type with a fresh lifetime and answers 200 (body `"\\n"`). The old key of
  that type is rejected at once (no overlap); the other key is untouched. Only the management port
  serves it; a wrong key or type gets 400.
* The file is rewritten in place, not atomically (`Files.write`: truncate, then write): measured,
  7.6 % of reads during back-to-back renewals saw an empty file. The new key is in the file before the
  token API answers, and the file's mtime is when the newest key was issued, so a key's lifetime is
  `newest expiry - mtime` (no configuration needed to schedule renewals).

Hence: `read_key_file` retries briefly on an empty or half-written file; `fresh_key` re-reads until
the file shows a key other than the one just rejected (bounded: a key regenerated a moment ago may
not be on disk yet); `KeyRenewer` renews each key once half its lifetime has passed (`plan_renewal`,
a pure function), holding an flock so two renewers of one node never interleave TorchServe's
unsynchronised rewrite; the serving image's renewer also holds a gate in front (`hold_renewal`), so
that no request is sent with a key TorchServe has just replaced.

This module imports only the standard library and `flywheel.core.errors`: the serving image ships it
(with those two files) for its entrypoint and HEALTHCHECK, which have no flywheel install.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flywheel.core.errors import FlywheelError

KINDS = ("inference", "management")
READ_WAIT_S = 2.0  # how long a half-written key file is waited for
HOLD_SUFFIX = ".renewing"  # <key_file>.renewing: while it exists, a gate that reads the key per request waits
HOLD_MAX_S = 5  # the deadline written in it: a renewer that died holding stalls nothing for longer
HOLD_SETTLE_S = 0.05  # after the hold is set, requests already given the old key reach TorchServe (loopback)
FRESH_WAIT_S = 5.0  # how long a re-read may keep showing a key that was just rejected
log = logging.getLogger("flywheel.serving_keys")
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


@dataclass(frozen=True)
class KeyFile:
    """One consistent read of key_file.json."""

    inference: str
    management: str
    api: str | None
    expires: Mapping[str, float]  # kind → epoch seconds
    mtime: float  # when TorchServe last wrote the file = when its newest key was issued

    def key(self, kind: str) -> str:
        return self.inference if kind == "inference" else self.management

    def lifetime_s(self) -> float:
        """The server's key lifetime: its newest key's expiry minus the time it was written."""
        return max(self.expires.values()) - self.mtime

    def as_dict(self) -> dict[str, str]:
        return {"inference": self.inference, "management": self.management}


def parse_time(text: str) -> float:
    """Epoch seconds of Java's `Instant.toString()` (UTC, 0-9 fractional digits)."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"not an ISO-8601 UTC instant: {text!r}")
    base = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return base + (float(f"0.{m.group(2)}") if m.group(2) else 0.0)


def parse_key_file(text: str | bytes, mtime: float = 0.0) -> KeyFile:
    """A KeyFile from key_file.json's text; ValueError (or KeyError/TypeError) if it is not one (yet)."""
    data = json.loads(text)
    return KeyFile(data["inference"]["key"], data["management"]["key"], data.get("API", {}).get("key"),
                   {k: parse_time(data[k]["expiration time"]) for k in KINDS}, mtime)


def read_key_file(key_file: Path, wait_s: float = READ_WAIT_S, *,
                  read: Callable[[], tuple[bytes, float]] | None = None, where: str = "") -> KeyFile:
    """Parse key_file.json; an empty or partial file (TorchServe rewriting it) is re-read up to `wait_s`.

    `read` returns the file's bytes and mtime from elsewhere (a pool replica's host, over SFTP:
    serving/replica_files.py), `where` names that place in errors (" on user@host:22 (replica r2)").
    """
    key_file = Path(key_file)
    if read is None:
        def read() -> tuple[bytes, float]:
            mtime = key_file.stat().st_mtime
            return key_file.read_bytes(), mtime
    deadline = time.monotonic() + wait_s
    while True:
        try:
            data, mtime = read()
            return parse_key_file(data, mtime)
        except FileNotFoundError:
            raise FlywheelError(f"TorchServe key file {key_file}{where} not found: TorchServe writes it into its "
                                "working directory at start; pass --key-file with its path") from None
        except PermissionError:
            raise FlywheelError(f"cannot read TorchServe key file {key_file}{where}: it is mode 0600, readable by "
                                "the serving user only; run as that user (or one it was shared with)") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if time.monotonic() >= deadline:
                raise FlywheelError(f"TorchServe key file {key_file}{where} is not valid key_file.json "
                                    f"({exc})") from None
            time.sleep(0.02)  # TorchServe truncates, then writes: the next read sees the whole file


def read_keys(key_file: Path) -> dict[str, str]:
    """{"inference": key, "management": key} from TorchServe's key_file.json."""
    return read_key_file(key_file).as_dict()


def fresh_key(source: Callable[[], Mapping[str, str]], kind: str, rejected: str | None,
              wait_s: float = FRESH_WAIT_S) -> str | None:
    """The `kind` key from `source`, waiting up to `wait_s` for one other than `rejected`.

    A key TorchServe regenerated a moment ago is checked against before the file shows it; the wait
    is bounded, and what the source holds at the end is returned (still `rejected` if it never changed).
    """
    deadline = time.monotonic() + wait_s
    while True:
        key = source().get(kind)
        if key != rejected or time.monotonic() >= deadline:
            return key
        time.sleep(0.05)


def plan_renewal(now: float, expires: Mapping[str, float], lifetime_s: float, *, min_interval_s: float = 1.0,
                 max_interval_s: float = 300.0) -> tuple[tuple[str, ...], float]:
    """Which keys to renew now, and how long to wait before looking again.

    A key is renewed once half its lifetime has passed (remaining <= lifetime / 2): the other half is
    the margin for a node that is busy, restarting or briefly unreachable. The next look is at the
    earliest half-life still ahead (a renewed key's is `lifetime / 2` away), never sooner than
    `min_interval_s` (the floor: no busy loop, even for tiny lifetimes) and never later than
    `max_interval_s` (a restarted server writes new keys, a clock may jump).
    """
    half = lifetime_s / 2
    due = tuple(k for k in sorted(expires) if expires[k] - now <= half)
    ahead = [expires[k] - now - half for k in expires if k not in due] + ([half] if due else [])
    wait = min(ahead) if ahead else max_interval_s
    return due, min(max(wait, min_interval_s), max_interval_s)


def management_url_from_properties(path: Path, env: Mapping[str, str] | None = None) -> str:
    """The management address of a TorchServe config.properties (its TS_MANAGEMENT_ADDRESS override
    when the file enables env config), as a URL this host can call (0.0.0.0 → 127.0.0.1)."""
    env = os.environ if env is None else env
    props = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            props[key.strip()] = value.strip()
    url = props.get("management_address", "http://127.0.0.1:8081")
    if props.get("enable_envvars_config") == "true" and env.get("TS_MANAGEMENT_ADDRESS"):
        url = env["TS_MANAGEMENT_ADDRESS"]
    return url.replace("0.0.0.0", "127.0.0.1").rstrip("/")


class BackgroundRenewer:
    """A renewer's `run()` loop on a daemon thread: `start()` starts it, `stop()` sets the event `run`
    waits on and joins. Shared by this module's KeyRenewer and the serving pool's PoolKeyRenewer."""

    thread_name = "key-renewer"
    stop_timeout_s = 15.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        raise NotImplementedError

    def start(self):
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s if timeout is None else timeout)
            self._thread = None


class KeyRenewer(BackgroundRenewer):
    """Renews a TorchServe's inference and management keys through its token API before they expire.

    `renew_due()` is one pass (the systemd timer's `flywheel serve-keys renew`); `run()` loops until
    stopped (`flywheel serve`, the serving image's entrypoint); `start()`/`stop()` run it on a thread.
    """

    thread_name = "torchserve-key-renewer"

    def __init__(self, management_url: str, key_file: Path, *, lifetime_s: float | None = None,
                 timeout_s: float = 10.0, min_interval_s: float = 1.0, max_interval_s: float = 300.0,
                 reader: Callable[[], KeyFile] | None = None, where: str = "", hold: bool = False):
        super().__init__()
        self.hold = hold  # write <key_file>.renewing around an inference renewal (`hold_renewal`)
        self.management_url = management_url.rstrip("/")
        self.key_file = Path(key_file)
        # `reader`: how `renew` reads the key file when it is not on this host (a pool replica's, over
        # SFTP), `where` names that host in errors; `renew_due`'s flock is this host's only.
        self._read = reader or (lambda: read_key_file(self.key_file))
        self.where = where
        self.lifetime_s = lifetime_s  # None: derived from the key file (newest expiry - mtime)
        self.timeout_s = timeout_s
        self.min_interval_s = min_interval_s
        self.max_interval_s = max_interval_s
        self.renewals = 0

    def renew(self, kind: str) -> KeyFile:
        """Have TorchServe issue a new `kind` key now; returns the key file once it shows it. With
        `hold`, an inference renewal happens inside `hold_renewal`."""
        if self.hold and kind == "inference":
            with hold_renewal(self.key_file):
                return self._renew(kind)
        return self._renew(kind)

    def _renew(self, kind: str) -> KeyFile:
        before = self._read()
        if not before.api:
            raise FlywheelError(f"{self.key_file}{self.where} has no API key: it is not a TorchServe 0.12 "
                                "key_file.json")
        req = urllib.request.Request(f"{self.management_url}/token?type={kind}", method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {before.api}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            raise FlywheelError(f"TorchServe at {self.management_url} refused to renew the {kind} key: HTTP "
                                f"{exc.code} (the API key in {self.key_file}{self.where} is wrong if the server restarted "
                                "since it was read)") from None
        except (urllib.error.URLError, OSError) as exc:
            raise FlywheelError(f"cannot reach TorchServe's token API at {self.management_url}: {exc}") from None
        self.renewals += 1
        if fresh_key(lambda: self._read().as_dict(), kind, before.key(kind)) == before.key(kind):
            raise FlywheelError(f"TorchServe renewed the {kind} key but {self.key_file}{self.where} still shows the "
                                f"old one: is it the key file of the server at {self.management_url}?")
        return self._read()

    def renew_due(self, force: bool = False, now: float | None = None) -> tuple[tuple[str, ...], float]:
        """Renew the keys that are due (all with `force`); returns (renewed kinds, seconds to the next look).

        Holds an flock on `<key_file>.lock` so that two renewers of one node (a timer and a manual run)
        never call the token API at once: TorchServe's rewrite of the file is not synchronised.
        """
        lock = self.key_file.with_name(self.key_file.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keys = read_key_file(self.key_file)
            now = time.time() if now is None else now
            # A key lives at least as long as it has left (guards a file touched after TorchServe wrote it).
            lifetime = self.lifetime_s or max(keys.lifetime_s(), max(keys.expires.values()) - now)
            due, wait = plan_renewal(now, keys.expires, lifetime,
                                     min_interval_s=self.min_interval_s, max_interval_s=self.max_interval_s)
            due = KINDS if force else due
            for kind in due:
                keys = self.renew(kind)
                log.info("renewed the TorchServe %s key; it expires %s", kind,
                         datetime.fromtimestamp(keys.expires[kind], timezone.utc).isoformat(timespec="seconds"))
            return due, wait
        finally:
            os.close(fd)

    def run(self, stop: threading.Event | None = None) -> None:
        """Renew keys as they come due until `stop` is set; errors are logged and retried soon."""
        stop = stop or self._stop
        while not stop.is_set():
            try:
                _, wait = self.renew_due()
            except FlywheelError as exc:  # server starting, restarting or busy: look again soon
                wait = self._retry_s()
                if self.key_file.exists():  # no file yet: TorchServe is still starting, nothing to say
                    log.warning("key renewal: %s; retrying in %.0f s", exc, wait)
            stop.wait(wait)

    def run_while_alive(self, pid: int, poll_s: float = 1.0) -> None:
        """`run()` until process `pid` (the TorchServe it renews for) is gone."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(poll_s):
                if not _alive(pid):
                    stop.set()

        threading.Thread(target=watch, name="torchserve-watch", daemon=True).start()
        self.run(stop)

    def _retry_s(self) -> float:
        """A quarter of what is left of the soonest-expiring key, between the floor and 30 s."""
        try:
            left = min(read_key_file(self.key_file, wait_s=0).expires.values()) - time.time()
        except FlywheelError:
            left = 4 * self.min_interval_s
        return min(max(left / 4, self.min_interval_s), 30.0)


def hold_file(key_file: Path) -> Path:
    return Path(key_file).with_name(Path(key_file).name + HOLD_SUFFIX)


@contextmanager
def hold_renewal(key_file: Path):
    """Hold new requests of a gate that injects the key per request while the inference key changes.

    TorchServe rejects the old key the moment it issues the new one, and the gate (the Kubernetes pod's
    HAProxy, `replica_key.lua`) reads the key file per request: a request given the old key just before
    the renewal is rejected (400), measured at about 2 per renewal under 4 clients. So: write
    `<key_file>.renewing` (its content: a deadline, epoch seconds, `HOLD_MAX_S` ahead), wait
    `HOLD_SETTLE_S` for requests already given the old key to reach TorchServe (it checks keys as they
    arrive), renew, remove the file. The gate holds each new request while the file exists and its
    deadline is ahead, then reads the key: the new one."""
    path = hold_file(key_file)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{math.ceil(time.time() + HOLD_MAX_S)}\n")
    os.replace(tmp, path)  # the gate never reads a half-written deadline
    try:
        time.sleep(HOLD_SETTLE_S)
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: ask the kernel instead
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def supervise(cmd: list[str], renewer: KeyRenewer) -> int:
    """Run `cmd` (TorchServe in the foreground) in its own session with `renewer` beside it.

    SIGTERM/SIGINT go to the whole process group (the launcher, the JVM, the workers: TorchServe's
    launcher does not pass signals on). Returns the command's exit status.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    renewer.start()
    try:
        return proc.wait()
    finally:
        renewer.stop()
        try:  # workers left by a launcher that died first
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    """`python entrypoint.py [TORCHSERVE ARGS]` in the serving image: TorchServe plus its key renewer."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ts-config", type=Path, default=Path(os.environ.get(
        "FLYWHEEL_TS_CONFIG", "/opt/flywheel/config.properties")), help="TorchServe config.properties.")
    parser.add_argument("--key-file", type=Path, default=Path(os.environ.get(
        "FLYWHEEL_TS_KEY_FILE", "key_file.json")), help="Where TorchServe writes key_file.json (its cwd).")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="TorchServe command line.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("give the TorchServe command line")
    args.key_file.unlink(missing_ok=True)  # a stale file would carry the previous server's keys
    hold_file(args.key_file).unlink(missing_ok=True)  # left by a renewer that died holding
    renewer = KeyRenewer(management_url_from_properties(args.ts_config), args.key_file, hold=True)
    return supervise(cmd, renewer)


if __name__ == "__main__":
    sys.exit(main())
