"""The tracking node on one box: Postgres + GCS emulator + MLflow server with basic-auth.

Used three ways: `flywheel stack up|down|status` on a developer box and for the demo, the test
fixtures (`tests/fixtures_tracking.py`), and the fault tests that kill and restart single parts.
Every part binds 127.0.0.1, is started as its own process group (or, for Postgres, by `pg_ctl`)
and is stopped by PID; all state of `flywheel stack` lives under one directory.

Production runs the same three parts from `deploy/tracking/` (docker-compose or systemd); this
module is the developer/test twin of that, not a replacement.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from flywheel.core.config import redact_uri
from flywheel.core.errors import FlywheelError
from flywheel.core.procs import free_port, stop_process_group

DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
HOST = "127.0.0.1"
ADMIN_USER = "admin"
MIN_ADMIN_PASSWORD = 12  # MLflow's basic-auth refuses shorter admin passwords
STACK_FILE = "stack.json"


class StackError(FlywheelError):
    """A part of the tracking stack did not start, stop or answer; the message names which and why."""


def _port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def pg_bin() -> Path:
    """Postgres server binaries (FLYWHEEL_PG_BIN overrides, e.g. another major version's bin dir)."""
    return Path(os.environ.get("FLYWHEEL_PG_BIN") or DEFAULT_PG_BIN)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); look at its state so a crashed server reads as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def write_secret(path: Path, value: str) -> None:
    """Write a secret file readable by its owner only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def read_or_create_secret(path: Path, nbytes: int = 18) -> str:
    """The secret in `path`, generated (random, never a default) on first use."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(nbytes)
    write_secret(path, value)
    return value


# ------------------------------------------------------------------------------------------ Postgres
@dataclass
class PostgresServer:
    """A Postgres 15 cluster in `data_dir`, password auth (scram) on 127.0.0.1:`port`."""

    data_dir: Path
    port: int
    password: str = field(repr=False)
    user: str = "postgres"
    log: Path | None = None

    @property
    def pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def uri(self, database: str) -> str:
        """SQLAlchemy URI for `database` (psycopg2 driver: SQLAlchemy 2.1 would pick psycopg 3)."""
        return f"postgresql+psycopg2://{self.user}:{quote(self.password, safe='')}@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.uri("postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(pg_bin() / args[0]), *args[1:]]
        # Postgres refuses to run as root; run its tools as the `postgres` system user then.
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise StackError(f"Postgres `{' '.join(args[:2])}` failed in {self.data_dir}: "
                             f"{(proc.stderr or proc.stdout).strip()[-800:]}"
                             + (f"\nlog:\n{_tail(self.log)}" if self.log else ""))
        return proc

    def init(self) -> None:
        """initdb once: password (scram) auth for every connection, the password in a 0600 file."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        if not (pg_bin() / "initdb").exists():
            raise StackError(f"Postgres 15 binaries not found in {pg_bin()}: install postgresql-15 "
                             "(apt-get install postgresql-15) or set FLYWHEEL_PG_BIN.")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwdir = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        pwfile = pwdir / "pw"
        write_secret(pwfile, self.password + "\n")
        if os.geteuid() == 0:
            for path in (self.data_dir, pwdir, pwfile):
                shutil.chown(path, "postgres", "postgres")
            os.chmod(self.data_dir, 0o700)
            probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.data_dir)],
                                   check=False, capture_output=True)
            if probe.returncode != 0:
                shutil.rmtree(pwdir, ignore_errors=True)
                raise StackError(f"the postgres system user cannot reach {self.data_dir}: a parent directory "
                                 "is not searchable (mode 0700?). Put the stack under a directory others can "
                                 "traverse (chmod o+x on its parents) or set FLYWHEEL_HOME elsewhere.")
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", self.user, "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")
        finally:
            shutil.rmtree(pwdir, ignore_errors=True)

    def start(self, timeout: float = 60.0) -> PostgresServer:
        self.init()
        if self.log is None:
            self.log = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        if os.geteuid() == 0:
            shutil.chown(self.log, "postgres", "postgres")
        if _port_open(self.port):
            raise StackError(f"port {self.port} on {HOST} is already in use; pick another Postgres port.")
        # The unix socket goes into the data dir so parallel clusters never fight over /var/run.
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                  "-o", f"-c listen_addresses={HOST} -p {self.port} -k {self.data_dir}", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.pid is None or not pid_alive(self.pid):
            return
        proc = self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)
        if proc.returncode != 0 and pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` unless it exists."""
        import psycopg2

        conn = psycopg2.connect(host=HOST, port=self.port, user=self.user, password=self.password,
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()


def start_postgres(data_dir: Path, port: int, password: str | None = None,
                   databases: tuple[str, ...] = ("mlflow", "mlflow_auth", "optuna"), log: Path | None = None) -> PostgresServer:
    """Start (initdb on first use) a Postgres cluster and create `databases` (`optuna`: the studies of
    `flywheel tune`, apart from MLflow's because both keep an `alembic_version` table)."""
    data_dir = Path(data_dir).resolve()
    password = password or read_or_create_secret(data_dir.parent / "secrets" / "postgres_password")
    server = PostgresServer(data_dir=data_dir, port=port, password=password, log=log).start()
    for db in databases:
        server.create_database(db)
    return server


# ----------------------------------------------------------------------------------- GCS emulator
@dataclass
class Daemon:
    """A server started by us in its own process group; stopped by PID (the whole group)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log: Path
    port: int
    health_path: str
    pid: int | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def start(self, timeout: float = 120.0) -> Daemon:
        import requests

        if _port_open(self.port):
            raise StackError(f"{self.name}: port {self.port} on {HOST} is already in use; pick another port.")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # start_new_session: the server and all its workers form one process group we can stop.
            self._popen = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        self.pid = self._popen.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                raise StackError(f"{self.name} exited with code {self._popen.returncode} while starting; "
                                 f"last lines of {self.log}:\n{_tail(self.log)}")
            try:
                if requests.get(self.url + self.health_path, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise StackError(f"{self.name} did not answer {self.url}{self.health_path} within {timeout:.0f} s; "
                         f"last lines of {self.log}:\n{_tail(self.log)}")

    def stop(self, grace: float = 5.0) -> None:
        # uvicorn waits for idle keep-alive clients on SIGTERM; a few seconds, then SIGKILL.
        if self.pid:
            stop_process_group(self.pid, timeout=grace)
        if self._popen is not None:
            self._popen.poll()

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, not a shutdown (fault tests)."""
        if self.pid:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            stop_process_group(self.pid, timeout=5)


def _venv_bin(name: str) -> str:
    """A console script of this interpreter's environment (PATH may not contain the venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def start_gcs_emulator(data_dir: Path, port: int, bucket: str, log: Path | None = None) -> Daemon:
    """Start `gcp-storage-emulator` persisting to `data_dir`, with `bucket` created."""
    data_dir = Path(data_dir).resolve()
    daemon = Daemon(
        name="gcs-emulator",
        argv=[_venv_bin("gcp-storage-emulator"), "-d", str(data_dir), "start", "--host", HOST,
              "--port", str(port), "--default-bucket", bucket],
        env={**os.environ}, cwd=data_dir, log=Path(log or data_dir.parent / "gcs-emulator.log"),
        port=port, health_path=f"/storage/v1/b/{bucket}")
    return daemon.start(timeout=60)


# ----------------------------------------------------------------------------------- MLflow server
def write_auth_ini(path: Path, database_uri: str, default_permission: str = "NO_PERMISSIONS",
                   auth_cache_ttl: int = 60) -> Path:
    """basic-auth config; the admin password is deliberately NOT in it (env/secret file only).

    default_permission NO_PERMISSIONS: a new user sees nothing until granted, the safe default for a
    node that holds every model of the team. auth_cache_ttl_seconds: without it every request
    re-runs PBKDF2 on the password (~0.5-1 s per call on a busy 2-core box, so an epoch's metrics or a
    model upload of a dozen files crawl); the price is that a changed password keeps working on
    other workers for up to a minute.
    """
    write_secret(path, "[mlflow]\n"
                       f"default_permission = {default_permission}\n"
                       f"database_uri = {database_uri}\n"
                       f"admin_username = {ADMIN_USER}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                       f"auth_cache_ttl_seconds = {auth_cache_ttl}\n")
    return path


def check_gcs_bucket(destination: str, emulator_host: str | None = None, timeout: float = 10.0) -> None:
    """Fail fast when the artifact bucket is unreachable or missing (MLflow would only fail at upload)."""
    parts = urlsplit(destination)
    if parts.scheme != "gs":
        return
    import requests

    bucket = parts.netloc
    if emulator_host:
        try:
            resp = requests.get(f"{emulator_host.rstrip('/')}/storage/v1/b/{bucket}", timeout=timeout)
        except requests.RequestException as exc:
            raise StackError(f"GCS is unreachable at {emulator_host} (STORAGE_EMULATOR_HOST): {exc}. "
                             "Start the emulator (`flywheel stack up`) or fix the address.") from exc
        if resp.status_code == 404:
            raise StackError(f"GCS bucket '{bucket}' does not exist on {emulator_host}; create it "
                             "(gcp-storage-emulator create_bucket) or fix --artifacts-destination.")
        if resp.status_code != 200:
            raise StackError(f"GCS at {emulator_host} answered {resp.status_code} for bucket '{bucket}'.")
        return
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    from flywheel.contracts.capture import GCS_CREDENTIALS_FIX

    try:
        if not storage.Client().bucket(bucket).exists(timeout=timeout):
            raise StackError(f"GCS bucket '{bucket}' does not exist; create it (gcloud storage buckets "
                             "create) or fix --artifacts-destination.")
    except DefaultCredentialsError:
        raise StackError(f"GCS bucket '{bucket}': no Google credentials found; {GCS_CREDENTIALS_FIX}.") from None
    except gexc.GoogleAPIError as exc:
        raise StackError(f"GCS bucket '{bucket}' is not reachable with these credentials: {exc}") from exc


def check_database(uri: str, timeout: int = 10) -> None:
    """Fail fast naming the cause when the backend DB cannot be reached or logged into."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": timeout}
                                          if uri.startswith("postgresql") else {})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any driver error: its message is what we show
        safe = redact_uri(uri)
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise StackError(f"backend database {safe} is not usable: {reason}. Check host, port, user, "
                         "password and that the database exists.") from exc


def move_passwords_to_pgpass(uris: list[str], pgpass: Path) -> tuple[list[str], Path]:
    """The URIs without their passwords, and a 0600 libpq password file that holds them.

    libpq (psycopg2) reads PGPASSFILE, so the server connects as before while no password appears in
    its command line or config files.
    """
    lines, stripped = [], []
    for uri in uris:
        parts = urlsplit(uri)
        if not parts.scheme.startswith("postgresql") or parts.password is None:
            stripped.append(uri)
            continue
        fields = [parts.hostname or "localhost", str(parts.port or 5432), parts.path.lstrip("/") or "*",
                  unquote(parts.username or "*"), unquote(parts.password)]
        lines.append(":".join(f.replace("\\", "\\\\").replace(":", "\\:") for f in fields))
        netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        stripped.append(parts._replace(netloc=netloc).geturl())
    write_secret(pgpass, "".join(line + "\n" for line in lines))
    return stripped, pgpass


@dataclass
class MlflowServer(Daemon):
    """`mlflow server --app-name basic-auth` as a restartable daemon."""

    backend_uri: str = ""
    admin_password: str = field(default="", repr=False)

    @property
    def tracking_uri(self) -> str:
        return self.url


def start_mlflow_server(state_dir: Path, port: int, backend_uri: str, artifacts_destination: str,
                        admin_password: str, secret_key: str, auth_db_uri: str,
                        gcs_emulator_url: str | None = None, workers: int = 1,
                        timeout: float = 180.0, check: bool = True) -> MlflowServer:
    """Start the MLflow server with basic-auth; raises StackError naming the cause if it can't.

    `check` verifies the DB and the bucket first, so a wrong URI fails in seconds with a clear reason
    instead of a crashed server and a traceback in its log.
    """
    if len(admin_password or "") < MIN_ADMIN_PASSWORD:
        raise StackError(f"the MLflow admin password must have at least {MIN_ADMIN_PASSWORD} characters; "
                         "set MLFLOW_AUTH_ADMIN_PASSWORD or its secret file (there is no default).")
    state_dir = Path(state_dir).resolve()
    if check:
        check_database(backend_uri)
        if auth_db_uri != backend_uri:
            check_database(auth_db_uri)
        check_gcs_bucket(artifacts_destination, gcs_emulator_url)
    # DB passwords go to a pgpass file, not into argv (world-readable in `ps`) or the auth ini.
    (backend_arg, auth_arg), pgpass = move_passwords_to_pgpass([backend_uri, auth_db_uri], state_dir / "pgpass")
    ini = write_auth_ini(state_dir / "basic_auth.ini", auth_arg)
    env = {**os.environ,
           "PGPASSFILE": str(pgpass),
           "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
           # Only read when the admin user does not exist yet (first start on an empty auth DB).
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
           # The job runner (~9 huey processes) serves GenAI evaluation jobs Flywheel never submits.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(var, None)
    if gcs_emulator_url:
        env["STORAGE_EMULATOR_HOST"] = gcs_emulator_url
    server = MlflowServer(
        name="mlflow-server",
        argv=[_venv_bin("mlflow"), "server", "--backend-store-uri", backend_arg,
              "--artifacts-destination", artifacts_destination, "--serve-artifacts",
              "--app-name", "basic-auth", "--host", HOST, "--port", str(port), "--workers", str(workers)],
        env=env, cwd=state_dir, log=state_dir / "mlflow-server.log", port=port, health_path="/health",
        backend_uri=backend_uri, admin_password=admin_password)
    return server.start(timeout=timeout)


# ----------------------------------------------------------------------------- flywheel stack
@dataclass(frozen=True)
class StackConfig:
    """Where `flywheel stack` keeps its state and which ports it binds (0: pick a free one)."""

    state_dir: Path
    bucket: str = "flywheel-artifacts"
    prefix: str = "mlflow"
    pg_port: int = 0
    gcs_port: int = 0
    mlflow_port: int = 0
    throwaway: bool = False  # delete all data on `down`

    @classmethod
    def from_settings(cls, settings, **overrides) -> StackConfig:
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(state_dir=Path(given.pop("state_dir", settings.work_dir / "stack")).resolve(), **given)


@dataclass
class StackState:
    """What `stack up` started; persisted as stack.json so `down`/`status` work from another shell."""

    state_dir: str
    tracking_uri: str
    username: str
    password_file: str
    bucket: str
    artifacts_destination: str
    gcs_url: str
    pg_port: int
    pg_data: str
    pg_pid: int | None
    gcs_pid: int | None
    mlflow_pid: int | None
    throwaway: bool

    def client_env(self) -> dict[str, str]:
        """MLFLOW_TRACKING_URI/USERNAME/PASSWORD for a client of this stack (e.g. the demo)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": Path(self.password_file).read_text().strip()}

    def save(self) -> None:
        write_secret(Path(self.state_dir) / STACK_FILE, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = Path(state_dir) / STACK_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def admin_password_from_env(secret_file: Path) -> str:
    """The stack's admin password. Once a stack exists its secret file wins (the auth DB holds that
    password; MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD only when it creates the admin). For a new stack:
    MLFLOW_AUTH_ADMIN_PASSWORD, else FLYWHEEL_ADMIN_PASSWORD_FILE, else a random one. Never a default."""
    if secret_file.exists():
        return secret_file.read_text().strip()
    value = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    if not value and (path := os.environ.get("FLYWHEEL_ADMIN_PASSWORD_FILE")):
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise StackError(f"FLYWHEEL_ADMIN_PASSWORD_FILE={path} cannot be read: {exc}") from exc
    value = value or secrets.token_urlsafe(18)
    if len(value) < MIN_ADMIN_PASSWORD:
        raise StackError(f"the admin password must have at least {MIN_ADMIN_PASSWORD} characters.")
    write_secret(secret_file, value)
    return value


def stack_up(cfg: StackConfig) -> StackState:
    """Start Postgres, the GCS emulator (bucket created) and MLflow with auth; idempotent.

    A part still running from an earlier `up` is kept; a persistent stack keeps its ports, bucket
    and data across `down`/`up`.
    """
    prev = StackState.load(cfg.state_dir)
    if prev is not None and pid_alive(prev.mlflow_pid):
        return prev
    root = cfg.state_dir
    root.mkdir(parents=True, exist_ok=True)
    # 0711: the postgres system user must traverse into its data dir; secrets/ itself is 0700.
    os.chmod(root, 0o711)
    secrets_dir = root / "secrets"
    admin_pw = admin_password_from_env(secrets_dir / "admin_password")
    secret_key = read_or_create_secret(secrets_dir / "flask_secret_key", 32)
    bucket = prev.bucket if prev else cfg.bucket
    destination = prev.artifacts_destination if prev else f"gs://{cfg.bucket}/{cfg.prefix}"
    pg_port = cfg.pg_port or (prev.pg_port if prev else 0) or free_port()
    gcs_port = cfg.gcs_port or (int(prev.gcs_url.rsplit(":", 1)[1]) if prev else 0) or free_port()
    ml_port = cfg.mlflow_port or (int(prev.tracking_uri.rsplit(":", 1)[1]) if prev else 0) or free_port()
    started: list = []
    try:
        pg = PostgresServer(data_dir=(root / "postgres").resolve(), port=pg_port,
                            password=read_or_create_secret(secrets_dir / "postgres_password"),
                            log=root / "logs" / "postgres.log")
        if not pid_alive(pg.pid):
            pg = start_postgres(pg.data_dir, pg_port, pg.password, log=pg.log)
            started.append(pg)
        if prev is not None and pid_alive(prev.gcs_pid) and _http_ok(f"{prev.gcs_url}/storage/v1/b/{bucket}"):
            gcs_url, gcs_pid = prev.gcs_url, prev.gcs_pid
        else:
            gcs = start_gcs_emulator(root / "gcs", gcs_port, bucket, log=root / "logs" / "gcs-emulator.log")
            started.append(gcs)
            gcs_url, gcs_pid = gcs.url, gcs.pid
        ml = start_mlflow_server(root / "mlflow", ml_port, pg.uri("mlflow"), destination, admin_pw, secret_key,
                                 pg.uri("mlflow_auth"), gcs_emulator_url=gcs_url)
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    state = StackState(state_dir=str(root), tracking_uri=ml.tracking_uri, username=ADMIN_USER,
                       password_file=str(secrets_dir / "admin_password"), bucket=bucket,
                       artifacts_destination=destination, gcs_url=gcs_url, pg_port=pg_port,
                       pg_data=str(pg.data_dir), pg_pid=pg.pid, gcs_pid=gcs_pid, mlflow_pid=ml.pid,
                       throwaway=cfg.throwaway)
    state.save()
    (root / "env").write_text(
        f"export MLFLOW_TRACKING_URI={state.tracking_uri}\n"
        f"export MLFLOW_TRACKING_USERNAME={ADMIN_USER}\n"
        f"export MLFLOW_TRACKING_PASSWORD=\"$(cat {state.password_file})\"\n")
    return state


def stack_down(state_dir: Path) -> list[str]:
    """Stop everything `stack up` started, by PID; returns what was stopped."""
    state = StackState.load(state_dir)
    if state is None:
        return []
    stopped = []
    for name, pid in (("mlflow-server", state.mlflow_pid), ("gcs-emulator", state.gcs_pid)):
        if pid_alive(pid):
            stop_process_group(pid)
            stopped.append(f"{name} (pid {pid})")
    pg = PostgresServer(data_dir=Path(state.pg_data), port=state.pg_port, password="")
    if pid_alive(pg.pid):
        pid = pg.pid
        pg.stop()
        stopped.append(f"postgres (pid {pid})")
    if state.throwaway:
        shutil.rmtree(state.state_dir, ignore_errors=True)
    else:
        state.mlflow_pid = state.gcs_pid = state.pg_pid = None
        state.save()
    return stopped


def stack_status(state_dir: Path) -> dict[str, str]:
    """Each part: running (pid, answering) or stopped."""
    state = StackState.load(state_dir)
    if state is None:
        return {}
    pg_pid = PostgresServer(data_dir=Path(state.pg_data), port=state.pg_port, password="").pid
    out = {}
    for name, pid, url in (("postgres", pg_pid, None),
                           ("gcs-emulator", state.gcs_pid, f"{state.gcs_url}/storage/v1/b/{state.bucket}"),
                           ("mlflow-server", state.mlflow_pid, f"{state.tracking_uri}/health")):
        if not pid_alive(pid):
            out[name] = "stopped"
            continue
        ok = _port_open(state.pg_port) if url is None else _http_ok(url)
        out[name] = f"running (pid {pid}){'' if ok else ', NOT answering'}"
    return out


def _http_ok(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=3).status_code == 200
    except requests.RequestException:
        return False
