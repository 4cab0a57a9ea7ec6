"""A real tracking node for tests: Postgres 15 + GCS emulator + MLflow server with basic-auth.

`tracking_stack` (session scope) is shared by every test that needs a tracking server; fault tests
that kill parts of it build their own with `launch_tracking_stack()` so they can't hurt the others.
Everything binds 127.0.0.1 on free ports, lives in one temp dir and is stopped by PID at the end.
A part that cannot start raises (the test fails loudly, never skips).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from flywheel.core.errors import FlywheelError
from flywheel.tracking.server import (
    ADMIN_USER,
    Daemon,
    MlflowServer,
    PostgresServer,
    free_port,
    start_gcs_emulator,
    start_mlflow_server,
    start_postgres,
)

BUCKET = "flywheel-test-artifacts"
PREFIX = "mlflow"


@dataclass
class TrackingStack:
    """A running tracking node and what a client needs to use it."""

    root: Path
    pg: PostgresServer
    gcs: Daemon
    mlflow: MlflowServer
    username: str
    password: str
    bucket: str = BUCKET
    prefix: str = PREFIX
    secret_key: str = ""

    @property
    def uri(self) -> str:
        return self.mlflow.tracking_uri

    @property
    def artifacts_destination(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}"

    def env(self) -> dict[str, str]:
        """Client environment variables (for subprocesses such as `flywheel train`)."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}

    def settings(self, **overrides):
        from flywheel.core.config import Settings

        given = {"tracking_uri": self.uri, "username": self.username, "password": self.password, **overrides}
        return Settings.from_env(**given)

    def gcs_client(self):
        """google-cloud-storage client talking to the emulator (anonymous, as the emulator wants)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.gcs.url})

    def restart_mlflow(self, timeout: float = 180.0) -> None:
        """Start the (stopped or killed) MLflow server again on the same port and stores."""
        self.mlflow = start_mlflow_server(self.root / "mlflow", self.mlflow.port, self.pg.uri("mlflow"),
                                          self.artifacts_destination, self.password, self.secret_key,
                                          self.pg.uri("mlflow_auth"), gcs_emulator_url=self.gcs.url,
                                          timeout=timeout, check=False)

    def stop(self) -> None:
        """Tear down a throwaway stack fast: its data is deleted next, so no graceful shutdown."""
        for stop in (self.mlflow.kill, self.gcs.kill, lambda: self.pg.stop(mode="immediate")):
            try:
                stop()
            except (OSError, RuntimeError, FlywheelError) as exc:  # keep stopping the others
                print(f"could not stop a tracking stack part: {exc}")


def launch_tracking_stack(root: Path | None = None) -> TrackingStack:
    """Start a fresh tracking node in `root` (a new temp dir when None); stops what started on failure."""
    # Not under pytest's 0700 tmp dirs: the postgres system user must traverse to its data dir.
    root = Path(root or tempfile.mkdtemp(prefix="flywheel-tracking-"))
    os.chmod(root, 0o711)
    password = secrets.token_urlsafe(18)
    secret_key = secrets.token_urlsafe(32)
    started = []
    try:
        pg = start_postgres(root / "postgres", free_port(), password=secrets.token_hex(12),
                            log=root / "postgres.log")
        started.append(pg)
        gcs = start_gcs_emulator(root / "gcs", free_port(), BUCKET, log=root / "gcs-emulator.log")
        started.append(gcs)
        ml = start_mlflow_server(root / "mlflow", free_port(), pg.uri("mlflow"), f"gs://{BUCKET}/{PREFIX}",
                                 password, secret_key, pg.uri("mlflow_auth"), gcs_emulator_url=gcs.url)
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    return TrackingStack(root=root, pg=pg, gcs=gcs, mlflow=ml, username=ADMIN_USER, password=password,
                         secret_key=secret_key)


@pytest.fixture
def forget_tracking_uri():
    """Reset MLflow's process-global tracking/registry URI after a test that called Settings.apply(),
    so a later test's bare MlflowClient() can't silently talk to this test's server."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def tracking_stack():
    """Session-wide Postgres + GCS emulator + MLflow (basic-auth). Attributes: uri, username, password,
    bucket, artifacts_destination, settings(), env(), gcs_client(), pg, gcs, mlflow."""
    stack = launch_tracking_stack()
    yield stack
    stack.stop()
    shutil.rmtree(stack.root, ignore_errors=True)
