"""The tracking node itself: auth, fail-fast on bad stores, doctor, `flywheel stack`, deploy files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from flywheel.tracking.doctor import DoctorTargets, run_doctor
from flywheel.tracking.server import (
    StackError,
    check_database,
    check_gcs_bucket,
    free_port,
    start_mlflow_server,
    write_auth_ini,
)

pytestmark = pytest.mark.usefixtures("forget_tracking_uri")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "tracking"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


# ------------------------------------------------------------------------------ no servers needed
def test_auth_ini_has_no_password(tmp_path):
    ini = write_auth_ini(tmp_path / "a.ini", "postgresql+psycopg2://u:p@h/db")
    text = ini.read_text()
    assert "admin_password" not in text and "NO_PERMISSIONS" in text
    assert oct(ini.stat().st_mode & 0o777) == "0o600"


def test_short_admin_password_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(StackError, match="at least 12 characters"):
        start_mlflow_server(tmp_path, free_port(), "sqlite:///x.db", "gs://b/p", "short", "k" * 32,
                            "sqlite:///a.db")


def test_wrong_db_uri_names_the_cause():
    port = free_port()  # nothing listens there
    with pytest.raises(StackError, match=r"backend database .*127\.0\.0\.1:\d+.* is not usable"):
        check_database(f"postgresql+psycopg2://mlflow:pw@127.0.0.1:{port}/mlflow", timeout=3)


def test_unreachable_gcs_names_the_cause():
    with pytest.raises(StackError, match="GCS is unreachable"):
        check_gcs_bucket("gs://bucket/prefix", f"http://127.0.0.1:{free_port()}", timeout=3)


def test_gcs_without_credentials_says_which_two_settings_fix_it(no_google_credentials):
    with pytest.raises(StackError, match=r"^GCS bucket 'bucket': no Google credentials found; set "
                                         r"GOOGLE_APPLICATION_CREDENTIALS .* or STORAGE_EMULATOR_HOST for a GCS emulator\.$"):
        check_gcs_bucket("gs://bucket/prefix", None, timeout=3)


def test_deploy_compose_file_is_valid(tmp_path):
    compose = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    env = {**os.environ, "GCS_BUCKET": "team-mlflow"}
    for profile in ([], ["--profile", "gcs-emulator"]):
        proc = subprocess.run([compose, "-f", str(DEPLOY / "docker-compose.yml"), *profile, "config", "-q"],
                              capture_output=True, text=True, env=env, check=False)
        assert proc.returncode == 0, proc.stderr
    # Without the bucket the file refuses to render, naming the variable.
    env.pop("GCS_BUCKET")
    proc = subprocess.run([compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode != 0 and "GCS_BUCKET" in proc.stderr
    # Secrets reach the services only as files: no password value in the rendered environment.
    env["GCS_BUCKET"] = "team-mlflow"
    rendered = yaml.safe_load(subprocess.run(
        [compose, "-f", str(DEPLOY / "docker-compose.yml"), "config"], capture_output=True, text=True,
        env=env, check=True).stdout)
    for name in ("postgres", "mlflow"):
        environment = rendered["services"][name]["environment"]
        assert not [k for k in environment if "PASSWORD" in k and not k.endswith("_FILE")], environment
    assert rendered["services"]["mlflow"]["environment"]["ARTIFACTS_DESTINATION"] == "gs://team-mlflow/mlflow"
    assert "--app-name basic-auth" in (DEPLOY / "entrypoint.sh").read_text()


def test_systemd_unit_verifies_cleanly(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check deploy/tracking/systemd (apt-get install systemd)"
    unit = (DEPLOY / "systemd" / "mlflow-tracking.service").read_text()
    # Point ExecStart at the repo's script (the unit expects it installed in /usr/local/bin).
    (tmp_path / "mlflow-tracking.service").write_text(
        unit.replace("/usr/local/bin/mlflow-entrypoint", str(DEPLOY / "entrypoint.sh")))
    proc = subprocess.run([analyze, "verify", str(tmp_path / "mlflow-tracking.service")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert "LoadCredential=admin_password:" in unit and "PASSWORD=" not in unit.replace("_FILE=", "")


def test_entrypoint_refuses_to_start_without_secrets(tmp_path):
    env = {"PATH": os.environ["PATH"], "POSTGRES_HOST": "127.0.0.1", "ARTIFACTS_DESTINATION": "gs://b/p"}
    proc = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh")], capture_output=True, text=True, env=env,
                          check=False)
    assert proc.returncode == 2 and "no default" in proc.stderr


def test_doctor_on_the_embedded_store_keeps_artifacts_in_flywheel_home(tmp_path):
    import mlflow

    from flywheel.core.config import Settings

    settings = Settings.from_env(work_dir=tmp_path / "home")
    assert [c.ok for c in run_doctor(settings)] == [None, None]  # nothing created yet: nothing to check
    settings.apply()
    mlflow.MlflowClient().search_experiments()  # creates the store
    checks = run_doctor(settings)
    assert [(c.name, c.ok) for c in checks] == [("server reachable", None), ("database schema", True),
                                                 ("artifact round-trip", True)]
    assert str((tmp_path / "home" / "mlartifacts").resolve()) in checks[-1].detail


# --------------------------------------------------------------------------- against the real stack
@pytest.mark.integration
def test_unauthenticated_and_wrong_password_get_401(tracking_stack):
    url = tracking_stack.uri + SEARCH
    assert requests.get(tracking_stack.uri + "/health", timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, auth=("admin", "not-the-password"), timeout=10).status_code == 401
    assert requests.get(url, auth=("nobody", tracking_stack.password), timeout=10).status_code == 401
    assert requests.get(url, auth=(tracking_stack.username, tracking_stack.password), timeout=10).status_code == 200
    # Artifact proxy and registry are behind auth too.
    assert requests.get(tracking_stack.uri + "/api/2.0/mlflow-artifacts/artifacts", timeout=10).status_code == 401
    assert requests.get(tracking_stack.uri + "/api/2.0/mlflow/registered-models/search",
                        timeout=10).status_code == 401


def _group_cmdlines(pid: int) -> list[str]:
    import psutil

    pgid = os.getpgid(pid)
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid:
                out.append(" ".join(p.info["cmdline"] or []))
        except (ProcessLookupError, psutil.Error):
            pass
    return out


@pytest.mark.integration
def test_no_secret_in_server_command_lines_or_auth_ini(tracking_stack):
    cmdlines = _group_cmdlines(tracking_stack.mlflow.pid)
    assert any("mlflow" in c for c in cmdlines) and any("uvicorn" in c for c in cmdlines), cmdlines
    for secret in (tracking_stack.pg.password, tracking_stack.password, tracking_stack.secret_key):
        assert not [c for c in cmdlines if secret in c]
    ini = (tracking_stack.root / "mlflow" / "basic_auth.ini").read_text()
    assert tracking_stack.pg.password not in ini and "postgresql+psycopg2://postgres@" in ini
    assert oct((tracking_stack.root / "mlflow" / "pgpass").stat().st_mode & 0o777) == "0o600"


@pytest.mark.integration
def test_doctor_passes_on_a_healthy_stack(tracking_stack):
    targets = DoctorTargets(backend_store_uri=tracking_stack.pg.uri("mlflow"),
                            artifacts_destination=tracking_stack.artifacts_destination,
                            gcs_emulator_url=tracking_stack.gcs.url)
    checks = run_doctor(tracking_stack.settings(), targets)
    assert [c.name for c in checks] == ["server reachable", "auth enforced", "credentials accepted",
                                        "database schema", "artifact bucket", "artifact round-trip"]
    assert all(c.ok for c in checks), checks
    # The round-trip object really is in the emulator's bucket, under the configured prefix.
    blobs = [b.name for b in tracking_stack.gcs_client().list_blobs(tracking_stack.bucket,
                                                                    prefix=tracking_stack.prefix)]
    assert any(n.endswith("doctor/roundtrip.txt") for n in blobs), blobs


@pytest.mark.integration
def test_doctor_names_wrong_credentials_missing_bucket_and_down_server(tracking_stack):
    bad = run_doctor(tracking_stack.settings(password="wrong-password-123"))
    assert bad[-1].name == "credentials accepted" and bad[-1].ok is False and "401" in bad[-1].detail

    missing = run_doctor(tracking_stack.settings(), DoctorTargets(
        artifacts_destination="gs://no-such-bucket/x", gcs_emulator_url=tracking_stack.gcs.url))
    assert missing[-1].ok is False and "no-such-bucket" in missing[-1].detail
    assert "does not exist" in missing[-1].detail

    down = run_doctor(tracking_stack.settings(tracking_uri=f"http://127.0.0.1:{free_port()}"))
    assert down[0].ok is False and "cannot connect" in down[0].detail


@pytest.mark.integration
def test_doctor_cli_names_the_cause_without_traceback(tracking_stack):
    # The passing path is test_doctor_passes_on_a_healthy_stack (in-process: one import less).
    env = {**os.environ, **tracking_stack.env(), "MLFLOW_TRACKING_PASSWORD": "wrong-password-123"}
    bad = subprocess.run([str(Path(sys.executable).parent / "flywheel"), "doctor"], capture_output=True,
                         text=True, env=env, check=False)
    assert bad.returncode == 1 and "wrong username or password" in bad.stdout
    assert "server reachable" in bad.stdout and "Traceback" not in bad.stdout + bad.stderr


@pytest.mark.integration
def test_server_with_wrong_db_password_fails_fast_naming_the_cause(tracking_stack, tmp_path):
    wrong = tracking_stack.pg.uri("mlflow").replace(tracking_stack.pg.password, "wrong-pg-password")
    t0 = time.monotonic()
    with pytest.raises(StackError, match="password authentication failed"):
        start_mlflow_server(tmp_path, free_port(), wrong, tracking_stack.artifacts_destination,
                            "admin-password-123", "k" * 32, wrong, gcs_emulator_url=tracking_stack.gcs.url)
    assert time.monotonic() - t0 < 15


@pytest.mark.integration
def test_server_with_missing_bucket_fails_fast(tracking_stack, tmp_path):
    with pytest.raises(StackError, match="bucket 'missing-bucket' does not exist"):
        start_mlflow_server(tmp_path, free_port(), tracking_stack.pg.uri("mlflow"), "gs://missing-bucket/p",
                            "admin-password-123", "k" * 32, tracking_stack.pg.uri("mlflow_auth"),
                            gcs_emulator_url=tracking_stack.gcs.url)


@pytest.mark.integration
@pytest.mark.reliability  # a full MLflow import in a server process (~15 s on a busy box)
def test_server_crashing_at_start_reports_its_log(tracking_stack, tmp_path):
    """Even without our pre-checks, a server that dies while starting is reported with its log tail."""
    wrong = "nosuchdb://mlflow"  # MLflow rejects the scheme at once (a dead DB it retries ~100 s)
    with pytest.raises(StackError, match=r"mlflow-server exited with code \d+.*\n(.*\n)*.*nosuchdb"):
        start_mlflow_server(tmp_path, free_port(), wrong, tracking_stack.artifacts_destination,
                            "admin-password-123", "k" * 32, tracking_stack.pg.uri("mlflow_auth"), check=False,
                            timeout=120)


def test_stack_cli_without_a_stack(tmp_path):
    flywheel = str(Path(sys.executable).parent / "flywheel")
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")}
    status = subprocess.run([flywheel, "stack", "status"], capture_output=True, text=True, env=env, check=False)
    assert status.returncode == 1 and "no stack in" in status.stdout and "flywheel stack up" in status.stdout
    emb = subprocess.run([flywheel, "stack", "up", "--embedded"], capture_output=True, text=True, env=env,
                         check=False)
    assert emb.returncode == 0 and f"sqlite:///{(tmp_path / 'home' / 'mlflow.db').resolve()}" in emb.stdout
    down = subprocess.run([flywheel, "stack", "down"], capture_output=True, text=True, env=env, check=False)
    assert down.returncode == 0 and "nothing running" in down.stdout


@pytest.mark.integration
@pytest.mark.reliability  # its own Postgres + emulator + MLflow start (~40-60 s on a busy box)
def test_stack_cli_up_status_down(tmp_path):
    # Not under pytest's 0700 tmp dir: the postgres system user must reach its data dir.
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="flywheel-stack-cli-"))
    os.chmod(state, 0o711)
    flywheel = str(Path(sys.executable).parent / "flywheel")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}

    def run(*args):
        return subprocess.run([flywheel, "stack", *args, "--state-dir", str(state / "s")], capture_output=True,
                              text=True, env=env, check=False, timeout=300)
    try:
        up = run("up", "--throwaway")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "tracking URI: http://127.0.0.1:" in up.stdout and "password in" in up.stdout
        password = (state / "s" / "secrets" / "admin_password").read_text().strip()
        assert len(password) >= 12
        assert oct((state / "s" / "secrets" / "admin_password").stat().st_mode & 0o777) == "0o600"
        status = run("status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("running (pid") == 3
        uri = status.stdout.splitlines()[0].split()[-1]
        assert requests.get(uri + SEARCH, auth=("admin", password), timeout=10).status_code == 200
        assert requests.get(uri + SEARCH, timeout=10).status_code == 401
        again = run("up")  # idempotent: same stack, nothing new started
        assert again.returncode == 0 and uri in again.stdout
    finally:
        down = run("down")
    assert down.returncode == 0 and "mlflow-server" in down.stdout and "postgres" in down.stdout
    assert not (state / "s").exists()  # throwaway
    with pytest.raises(requests.ConnectionError):
        requests.get(uri + "/health", timeout=5)
    shutil.rmtree(state, ignore_errors=True)


@pytest.mark.integration
def test_users_see_nothing_until_granted_and_rotate_their_password(tracking_stack, monkeypatch):
    """The runbook's user procedures, against the real server."""
    import mlflow
    from mlflow.server import get_app_client

    tracking_stack.settings().apply()
    admin = get_app_client("basic-auth", tracking_uri=tracking_stack.uri)
    exp_id = mlflow.MlflowClient(tracking_stack.uri).create_experiment("granted-only")
    admin.create_user("rotator", "first-password-123")
    url = f"{tracking_stack.uri}/api/2.0/mlflow/experiments/get?experiment_id={exp_id}"
    assert requests.get(url, auth=("rotator", "first-password-123"), timeout=10).status_code == 403
    admin.grant_user_permission("rotator", "experiment", exp_id, "READ")
    assert requests.get(url, auth=("rotator", "first-password-123"), timeout=10).status_code == 200
    # Self-service rotation, as documented: logged in as the user, with the current password.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rotator")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "first-password-123")
    get_app_client("basic-auth", tracking_uri=tracking_stack.uri).update_user_password(
        "rotator", "second-password-456", current_password="first-password-123")
    assert requests.get(url, auth=("rotator", "second-password-456"), timeout=10).status_code == 200


@pytest.mark.integration
@pytest.mark.reliability  # three server starts: ~1.5 min
def test_persistent_stack_keeps_data_password_and_uri_across_down_up(monkeypatch):
    import tempfile

    import mlflow

    from flywheel.tracking.server import StackConfig, stack_down, stack_status, stack_up, stop_process_group

    root = Path(tempfile.mkdtemp(prefix="flywheel-stack-persist-")) / "s"
    os.chmod(root.parent, 0o711)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "first-admin-password")
    try:
        first = stack_up(StackConfig(state_dir=root))
        assert first.client_env()["MLFLOW_TRACKING_PASSWORD"] == "first-admin-password"
        for k, v in first.client_env().items():
            monkeypatch.setenv(k, v)
        exp_id = mlflow.MlflowClient(first.tracking_uri).create_experiment("persisted")
        assert len(stack_down(root)) == 3
        # A different env password is ignored once the stack exists: the auth DB holds the first one.
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "another-admin-password")
        second = stack_up(StackConfig(state_dir=root))
        assert second.tracking_uri == first.tracking_uri
        assert second.client_env() == first.client_env()
        assert mlflow.MlflowClient(second.tracking_uri).get_experiment_by_name("persisted").experiment_id == exp_id
        # Only the dead part is restarted.
        stop_process_group(second.mlflow_pid)
        third = stack_up(StackConfig(state_dir=root))
        assert (third.pg_pid, third.gcs_pid) == (second.pg_pid, second.gcs_pid)
        assert third.mlflow_pid != second.mlflow_pid
        assert all(v.startswith("running") for v in stack_status(root).values())
    finally:
        stack_down(root)
        shutil.rmtree(root.parent, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.reliability  # a second MLflow server start (~25 s): kept out of `make test`'s budget
def test_production_entrypoint_serves_with_auth_on_postgres_and_gcs(tracking_stack, tmp_path):
    """deploy/tracking/entrypoint.sh + basic_auth.ini, as the container and the systemd unit run them,
    against the real Postgres and GCS emulator: secrets from files, auth on, artifacts proxied."""
    from flywheel.tracking.server import stop_process_group

    (tmp_path / "secrets").mkdir(mode=0o700)
    for name, value in (("pg", tracking_stack.pg.password), ("admin", tracking_stack.password),
                        ("flask", "f" * 40)):
        (tmp_path / "secrets" / name).write_text(value)
    port = free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(tracking_stack.pg.port),
           "POSTGRES_USER": tracking_stack.pg.user, "POSTGRES_PASSWORD_FILE": str(tmp_path / "secrets" / "pg"),
           "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(tmp_path / "secrets" / "admin"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(tmp_path / "secrets" / "flask"),
           "ARTIFACTS_DESTINATION": f"gs://{tracking_stack.bucket}/entrypoint",
           "STORAGE_EMULATOR_HOST": tracking_stack.gcs.url, "AUTH_INI_TEMPLATE": str(DEPLOY / "basic_auth.ini"),
           "RUNTIME_DIRECTORY": str(tmp_path / "run"), "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(["sh", str(DEPLOY / "entrypoint.sh")], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        assert requests.get(url + SEARCH, timeout=10).status_code == 401
        assert requests.get(url + SEARCH, auth=("admin", tracking_stack.password), timeout=10).status_code == 200
        ini = (tmp_path / "run" / "basic_auth.ini")
        assert oct(ini.stat().st_mode & 0o777) == "0o600" and "@AUTH_DATABASE_URI@" not in ini.read_text()
        assert tracking_stack.pg.password not in ini.read_text()
        for secret in (tracking_stack.pg.password, tracking_stack.password, "f" * 40):
            assert not [c for c in _group_cmdlines(proc.pid) if secret in c]
        # An artifact put through this server lands under its destination prefix in the bucket.
        put = requests.put(url + "/api/2.0/mlflow-artifacts/artifacts/probe/hello.txt", data=b"hi",
                           auth=("admin", tracking_stack.password), timeout=30)
        assert put.status_code == 200, put.text
        blob = tracking_stack.gcs_client().bucket(tracking_stack.bucket).blob("entrypoint/probe/hello.txt")
        assert blob.download_as_bytes() == b"hi"
        assert tracking_stack.password not in (tmp_path / "server.log").read_text()
    finally:
        stop_process_group(proc.pid, timeout=5)
