"""`flywheel doctor`: check a tracking setup end to end and say exactly what is wrong.

Checks, in order (later ones are skipped when an earlier one makes them meaningless):
server reachable → auth enforced and our credentials accepted → DB schema at MLflow's head revision
(when the DB URI is known: embedded store, `--backend-store-uri`, or a `flywheel stack` state) →
the artifact bucket exists (when known) → an artifact round-trip through the server, read back by a
second, fresh client.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.config import Settings

DOCTOR_EXPERIMENT = "flywheel-doctor"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: skipped
    detail: str


@dataclass(frozen=True)
class DoctorTargets:
    """What doctor may check beyond the tracking URI (all optional)."""

    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    gcs_emulator_url: str | None = None
    timeout: float = 10.0


def _api(settings: Settings, path: str, auth: bool, timeout: float):
    import requests

    creds = (settings.username, settings.password) if auth and settings.username else None
    return requests.get(f"{settings.tracking_uri.rstrip('/')}{path}", auth=creds, timeout=timeout)


def check_server(settings: Settings, timeout: float = 10.0) -> list[Check]:
    """Reachability and auth of an HTTP tracking server."""
    import requests

    checks = []
    try:
        resp = _api(settings, "/health", auth=False, timeout=timeout)
        ok = resp.status_code == 200
        checks.append(Check("server reachable", ok, f"{settings.tracking_uri}/health → {resp.status_code}"
                            + ("" if ok else " (is this an MLflow server? check MLFLOW_TRACKING_URI)")))
    except requests.RequestException as exc:
        checks.append(Check("server reachable", False,
                            f"cannot connect to {settings.tracking_uri}: {type(exc).__name__}. Start it "
                            "(`flywheel stack up`, systemctl start mlflow) or fix MLFLOW_TRACKING_URI."))
        return checks
    if not ok:
        return checks
    probe = "/api/2.0/mlflow/experiments/search?max_results=1"
    anon = _api(settings, probe, auth=False, timeout=timeout)
    checks.append(Check("auth enforced", anon.status_code == 401,
                        "anonymous request → 401" if anon.status_code == 401 else
                        f"anonymous request → {anon.status_code}: the server runs WITHOUT authentication; "
                        "start it with --app-name basic-auth"))
    if not settings.username or not settings.password:
        checks.append(Check("credentials accepted", anon.status_code != 401,
                            "no credentials set: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"))
        return checks
    mine = _api(settings, probe, auth=True, timeout=timeout)
    if mine.status_code == 200:
        checks.append(Check("credentials accepted", True, f"user '{settings.username}' → 200"))
    elif mine.status_code == 401:
        checks.append(Check("credentials accepted", False,
                            f"user '{settings.username}' → 401: wrong username or password "
                            "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"))
    elif mine.status_code == 403:
        checks.append(Check("credentials accepted", False,
                            f"user '{settings.username}' → 403: logged in but lacks permission to read "
                            "experiments; ask the admin to grant it"))
    else:
        checks.append(Check("credentials accepted", False,
                            f"user '{settings.username}' → {mine.status_code}: {mine.text[:200]}"))
    return checks


def check_schema(db_uri: str) -> Check:
    """The backend DB is reachable and at MLflow's head alembic revision."""
    import sqlalchemy
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version

    from flywheel.core.config import redact_uri
    from flywheel.tracking.server import StackError, check_database

    try:
        check_database(db_uri)
    except StackError as exc:
        return Check("database schema", False, str(exc))
    engine = sqlalchemy.create_engine(db_uri)
    try:
        current = _get_schema_version(engine)
    finally:
        engine.dispose()
    head = _get_latest_schema_revision()
    if current == head:
        return Check("database schema", True, f"{redact_uri(db_uri)} at head revision {head}")
    if current is None:
        return Check("database schema", False, f"{redact_uri(db_uri)} has no MLflow tables: start the server "
                     "once (it creates them) or run `mlflow db upgrade <uri>`")
    return Check("database schema", False, f"{redact_uri(db_uri)} is at {current}, MLflow {head}: back up the "
                 "database, then run `mlflow db upgrade <uri>` (the server refuses to start until then)")


def check_bucket(destination: str, emulator_url: str | None, timeout: float) -> Check:
    from flywheel.tracking.server import StackError, check_gcs_bucket

    try:
        check_gcs_bucket(destination, emulator_url, timeout=timeout)
    except StackError as exc:
        return Check("artifact bucket", False, str(exc))
    return Check("artifact bucket", True, f"{destination} exists")


def check_artifact_roundtrip(settings: Settings) -> Check:
    """Upload a small artifact through the server and read it back with a second, fresh client."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flywheel.core.runlog import quick_failure

    payload = f"flywheel doctor {uuid.uuid4()}\n"
    settings.export_credentials()  # explicit clients below; the REST client reads credentials from env only
    # Doctor must answer in seconds, not after MLflow's ~4 minutes of retries.
    with quick_failure():
        writer = MlflowClient(settings.tracking_uri)
        run_id = None
        try:
            exp = writer.get_experiment_by_name(DOCTOR_EXPERIMENT)
            exp_id = exp.experiment_id if exp else writer.create_experiment(
                DOCTOR_EXPERIMENT, artifact_location=settings.artifact_root)  # embedded: inside FLYWHEEL_HOME
            run_id = writer.create_run(exp_id, run_name="doctor").info.run_id
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "roundtrip.txt"
                src.write_text(payload)
                writer.log_artifact(run_id, str(src), "doctor")
            reader = MlflowClient(settings.tracking_uri)
            with tempfile.TemporaryDirectory() as tmp:
                got = Path(mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path="doctor/roundtrip.txt", dst_path=tmp,
                    tracking_uri=settings.tracking_uri)).read_text()
            location = reader.get_run(run_id).info.artifact_uri
            if got != payload:
                return Check("artifact round-trip", False, f"read back different bytes from {location}")
            return Check("artifact round-trip", True, f"wrote and read back {location}/doctor/roundtrip.txt")
        except (MlflowException, OSError) as exc:
            msg = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else repr(exc)
            return Check("artifact round-trip", False,
                         f"{msg} — the server's artifact store (--artifacts-destination: bucket exists? "
                         "credentials / STORAGE_EMULATOR_HOST on the server?) is not usable")
        finally:
            if run_id:
                try:
                    writer.delete_run(run_id)
                except MlflowException:
                    pass


def run_doctor(settings: Settings, targets: DoctorTargets | None = None) -> list[Check]:
    """All checks for `settings`' tracking URI; stop at the first failure that makes the rest moot."""
    targets = targets or DoctorTargets()
    checks: list[Check] = []
    if settings.embedded:
        checks.append(Check("server reachable", None, f"embedded store {settings.tracking_uri} (no server)"))
        db_uri = targets.backend_store_uri or settings.tracking_uri
        if not Path(settings.tracking_uri.removeprefix("sqlite:///")).exists():
            checks.append(Check("database schema", None, "embedded store not created yet (first run creates it)"))
            return checks
    else:
        checks += check_server(settings, targets.timeout)
        if not all(c.ok for c in checks if c.ok is not None) or not checks[-1].ok:
            return checks
        db_uri = targets.backend_store_uri
    if db_uri:
        checks.append(check_schema(db_uri))
    else:
        checks.append(Check("database schema", None, "DB URI not given (--backend-store-uri); a server that "
                            "answers has passed MLflow's own schema check at start"))
    if targets.artifacts_destination:
        checks.append(check_bucket(targets.artifacts_destination, targets.gcs_emulator_url, targets.timeout))
        if not checks[-1].ok:
            return checks
    checks.append(check_artifact_roundtrip(settings))
    return checks


def targets_from_stack(state_dir: Path, tracking_uri: str) -> DoctorTargets:
    """Targets of the `flywheel stack` on this box serving `tracking_uri` (empty when there is none)."""
    from flywheel.tracking.server import PostgresServer, StackState

    state = StackState.load(state_dir)
    if state is None or state.tracking_uri.rstrip("/") != tracking_uri.rstrip("/"):
        return DoctorTargets()
    pw_file = Path(state.state_dir) / "secrets" / "postgres_password"
    pg = PostgresServer(data_dir=Path(state.pg_data), port=state.pg_port,
                        password=pw_file.read_text().strip() if pw_file.exists() else "")
    return DoctorTargets(backend_store_uri=pg.uri("mlflow"), artifacts_destination=state.artifacts_destination,
                         gcs_emulator_url=state.gcs_url)


def print_checks(checks: list[Check]) -> bool:
    """Print a table; True when nothing failed."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    marks = {True: "[green]ok[/]", False: "[bold red]FAIL[/]", None: "[yellow]skipped[/]"}
    for c in checks:
        table.add_row(c.name, marks[c.ok], c.detail)
    Console(width=int(os.environ.get("COLUMNS", "140"))).print(table)
    return all(c.ok is not False for c in checks)
