"""The by-hand path's parts: one store rule under `mlflow run` (`flywheel env`, the train entry's
guard), `flywheel serve`'s defaults (work dir and model store in $FLYWHEEL_HOME, capture on, serve.env),
one-line errors for a missing registered model, and a release of the version already served."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_quickstart_docs import copy_repo

VENV_BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _exports(text: str) -> dict[str, str]:
    """The variables of `export K=V` lines, as bash would set them."""
    out = {}
    for line in text.splitlines():
        assert line.startswith("export "), line
        key, _, value = line[len("export "):].partition("=")
        out[key] = shlex.split(value)[0]
    return out


# --------------------------------------------------------------------------- one store rule
def test_env_prints_the_store_rule_and_creates_the_experiment(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flywheel.cli import app

    home = tmp_path / "rel-home"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLYWHEEL_HOME", "rel-home")  # relative: printed absolute
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-never-printed")
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    exports = _exports(result.stdout)
    assert exports["FLYWHEEL_HOME"] == str(home)
    assert exports["MLFLOW_TRACKING_URI"] == f"sqlite:///{home / 'mlflow.db'}"
    assert exports["MLFLOW_EXPERIMENT_NAME"] == "flywheel"
    assert "s3cret" not in result.stdout and "PASSWORD" not in result.stdout
    import mlflow

    experiment = mlflow.MlflowClient(exports["MLFLOW_TRACKING_URI"]).get_experiment_by_name("flywheel")
    assert experiment.artifact_location == (home / "mlartifacts").as_uri()  # not ./mlruns, where `mlflow run` puts it


def test_env_keeps_a_given_tracking_uri(monkeypatch):
    from typer.testing import CliRunner

    from flywheel.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # a server: nothing is created
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    assert _exports(result.stdout)["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"


@pytest.mark.parametrize("uri_of, refused", [
    (lambda cwd, home: f"sqlite:///{cwd / 'mlflow.db'}", True),  # MLflow's default where `mlflow run .` started
    (lambda cwd, home: (cwd / "mlruns").as_uri(), True),  # its default when ./mlruns holds a file store
    (lambda cwd, home: f"sqlite:///{home / 'mlflow.db'}", False),  # what `flywheel env` exported
    (lambda cwd, home: f"sqlite:///{cwd / 'elsewhere.db'}", False),  # chosen by the user: the rule's first half
    (lambda cwd, home: "http://127.0.0.1:5000", False),
])
def test_train_entry_refuses_mlflows_default_store_under_mlflow_run(tmp_path, monkeypatch, uri_of, refused):
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.training.train import refuse_mlflow_default_store

    home = tmp_path / "home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri_of(tmp_path, home))
    settings = Settings.from_env()
    refuse_mlflow_default_store(settings, cwd=tmp_path)  # not under `mlflow run`: never refused
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    if refused:
        with pytest.raises(FlywheelError, match=r"flywheel env") as err:
            refuse_mlflow_default_store(settings, cwd=tmp_path)
        assert "\n" not in str(err.value)
    else:
        refuse_mlflow_default_store(settings, cwd=tmp_path)


def test_train_entry_refuses_when_flywheel_home_is_the_default_too(tmp_path, monkeypatch):
    """No FLYWHEEL_HOME: Flywheel's store is ./.flywheel/mlflow.db, still not MLflow's ./mlflow.db."""
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.training.train import refuse_mlflow_default_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLYWHEEL_HOME")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")
    with pytest.raises(FlywheelError, match=r"\.flywheel/mlflow\.db"):
        refuse_mlflow_default_store(Settings.from_env())


@pytest.mark.integration
def test_mlflow_run_lands_in_flywheel_home_only_after_flywheel_env(tmp_path):
    """The real `mlflow run . -e train --env-manager local` from a copy of the repo: refused with one line
    in a shell with only FLYWHEEL_HOME; after `eval "$(flywheel env)"` the run, its model and its
    artifacts are in $FLYWHEEL_HOME and nothing is in MLflow's default places."""
    import mlflow

    repo = tmp_path / "repo"
    copy_repo(repo)
    home = repo / ".flywheel"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYWHEEL_"))}
    env.update(FLYWHEEL_HOME=str(home), PYTHONPATH=str(repo / "src"), PATH=f"{VENV_BIN}:{env['PATH']}",
               COLUMNS="400")  # rich wraps at 80 columns off a terminal unless the CLI soft-wraps
    train = ["mlflow", "run", ".", "-e", "train", "--env-manager", "local", "-P", "dataset=digits",
             "-P", "epochs=1", "-P", "max_train_samples=300"]

    refused = _run(train, repo, env)
    assert refused.returncode != 0
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "eval \"$(flywheel env)\"" in errors[0], refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert not (home / "mlflow.db").exists()  # refused before anything was written there
    (repo / "mlflow.db").unlink()  # what MLflow's own CLI made, as the troubleshooting entry says

    printed = _run([str(VENV_BIN / "flywheel"), "env"], repo, env)
    assert printed.returncode == 0, printed.stderr
    env.update(_exports(printed.stdout))
    ok = _run(train, repo, env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()
    client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("fashion-classifier", "candidate")
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((home / "mlartifacts").as_uri())


# -------------------------------------------------------------------------- missing model
def test_evaluate_of_a_missing_registered_model_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"COLUMNS": "400"}
    out = _run([str(VENV_BIN / "flywheel"), "evaluate", "--model-uri", "models:/fashion-classifier@candidate",
                "--dataset", "digits"], tmp_path, env, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in out.stderr.splitlines() if "fashion-classifier" in line], out.stderr
    assert len(errors) == 1 and "no registered model 'fashion-classifier'" in errors[0]


def test_missing_alias_and_version_and_run_are_one_line(trained_digits_model):
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.core.evaluate import evaluate_uri

    settings = Settings.from_env(tracking_uri=trained_digits_model.tracking_uri, work_dir=trained_digits_model.home,
                                 model_name=trained_digits_model.model_name).apply()
    name = trained_digits_model.model_name
    for uri, expect in ((f"models:/{name}@prod", "no version 'prod'"), (f"models:/{name}/99", "no version '99'"),
                        ("runs:/0123456789abcdef/model", "cannot load runs:/")):
        with pytest.raises(FlywheelError, match=expect) as err:
            evaluate_uri(uri, "digits", settings)
        assert "\n" not in str(err.value)
    from flywheel.core.registry import gate_run

    with pytest.raises(FlywheelError, match=r"^no MLflow run 0123456789abcdef at sqlite:") as err:
        gate_run("0123456789abcdef", settings)  # `flywheel register --run-id` of a run that is not there
    assert "\n" not in str(err.value)


def test_registered_in_reads_registry_uris():
    from flywheel.core.registry import registered_in

    assert registered_in("models:/fashion-classifier@candidate") == ("fashion-classifier", "candidate")
    assert registered_in("models:/fashion-classifier/3") == ("fashion-classifier", "3")
    assert registered_in("models:/m-0123abcd") is None  # a logged model id
    assert registered_in("models:/fashion-classifier/Production") is None  # a stage: MLflow's business
    assert registered_in("runs:/abc/model") is None


# ------------------------------------------------------------------------------------ serve
def _wait_for(path: Path, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"flywheel serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {seconds}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.integration
def test_serve_defaults_live_in_flywheel_home_capture_on_and_serve_env(serving_models, tmp_path):
    """`flywheel serve` with no flags: model store and work dir (tokens) under $FLYWHEEL_HOME, traffic
    captured into $FLYWHEEL_HOME/captures, serve.env naming all of it; Ctrl-C stops it and removes serve.env."""
    import shutil

    from flywheel.serving.release import AcceptanceConfig, ManagementTarget, release_version
    from flywheel.serving.torchserve import TorchServeClient

    home = tmp_path / "home"
    (home / "model-store").mkdir(parents=True)
    v1 = serving_models.versions[0]
    shutil.copy(serving_models.mars[v1], home / "model-store" / f"{serving_models.name}-{v1}.mar")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYWHEEL_"))}
    env.update(FLYWHEEL_HOME=str(home), PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        # preexec_fn: Ctrl-C reaches it even when pytest runs as a background job (whose children inherit
        # SIGINT ignored, and an ignored SIGINT at start-up never becomes KeyboardInterrupt in Python).
        proc = subprocess.Popen([str(VENV_BIN / "flywheel"), "serve"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    env_file = home / "serving" / "serve.env"
    before = _aliases(serving_models)
    try:
        _wait_for(env_file, proc, log)
        exports = _exports(env_file.read_text())
        assert exports["FLYWHEEL_TS_KEY_FILE"] == str(home / "serving" / "key_file.json")
        assert Path(exports["FLYWHEEL_TS_KEY_FILE"]).is_file()
        assert exports["FLYWHEEL_TS_MODEL_STORE"] == str(home / "model-store")
        assert exports["FLYWHEEL_CAPTURE_URI"] == str(home / "captures")
        assert not (tmp_path / "serving").exists()  # nothing in the directory it was started from
        assert f"source {env_file}" in log.read_text()

        # The release and the traffic use nothing but serve.env; the traffic is captured.
        settings = serving_models.settings()
        target = ManagementTarget(exports["FLYWHEEL_TS_INFERENCE_URL"], exports["FLYWHEEL_TS_MANAGEMENT_URL"],
                                  Path(exports["FLYWHEEL_TS_KEY_FILE"]), Path(exports["FLYWHEEL_TS_MODEL_STORE"]),
                                  grace_s=0.0)
        accept = AcceptanceConfig(min_accuracy=0.3, p95_slo_ms=5000, accuracy_samples=32, latency_requests=5)
        first = release_version(settings, serving_models.name, v1, "dev", target, accept)
        assert first.switched and "default switched none → " + v1 in first.events
        again = release_version(settings, serving_models.name, v1, "prod", target, accept)
        assert not again.switched and again.previous == v1
        assert f"v{v1} is already the default: nothing to switch" in again.events
        assert not any("switched" in e for e in again.events)
        client = TorchServeClient(exports["FLYWHEEL_TS_INFERENCE_URL"], key_file=Path(exports["FLYWHEEL_TS_KEY_FILE"]))
        from mlflow import MlflowClient

        assert str(MlflowClient().get_model_version_by_alias(serving_models.name, "prod").version) == v1
        r = client.predict(serving_models.name, _png())
        assert r.status_code == 200 and r.json()["version"] == v1
        captures = home / "captures" / serving_models.name / "captures"
        _wait_captured(captures)
    finally:
        _restore_aliases(serving_models, before)  # the registry is shared with other tests of the session
        _interrupt(proc)  # Ctrl-C: serve stops TorchServe's process group
    assert not env_file.exists()


@pytest.mark.integration
def test_serve_engine_triton_then_release_from_serve_env(serving_models, tmp_path):
    """`flywheel serve --engine triton`: Triton behind its proxy with its repository, work dir and serve.env
    under $FLYWHEEL_HOME; `flywheel release --engine triton` with nothing but serve.env's exports packages
    and serves a version; no key, no answer; traffic captured; Ctrl-C stops both processes."""
    import requests

    from flywheel.serving.triton import TritonClient

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYWHEEL_"))}
    env.update(FLYWHEEL_HOME=str(home), PYTHONUNBUFFERED="1")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "flywheel"), "serve", "--engine", "triton"], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    env_file = home / "serving-triton" / "serve.env"
    name, v1 = serving_models.name, serving_models.versions[0]
    before = _aliases(serving_models)
    try:
        _wait_for(env_file, proc, log)
        exports = _exports(env_file.read_text())
        assert exports["FLYWHEEL_TS_KEY_FILE"] == str(home / "serving-triton" / "key_file.json")
        assert exports["FLYWHEEL_TS_MODEL_STORE"] == str(home / "triton-repository")
        assert exports["FLYWHEEL_CAPTURE_URI"] == str(home / "captures")
        url = exports["FLYWHEEL_TS_INFERENCE_URL"]
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 401  # no key, no answer

        release_env = {**env, **exports}
        proc_release = subprocess.run(
            [str(VENV_BIN / "flywheel"), "release", "--engine", "triton", "--model", name, "--version", v1,
             "--env", "dev", "--tracking-uri", serving_models.tracking_uri, "--min-accuracy", "0.3",
             "--p95-slo-ms", "5000", "--grace", "0"],
            capture_output=True, text=True, timeout=600, env=release_env, cwd=tmp_path)
        assert proc_release.returncode == 0, proc_release.stdout[-2000:] + proc_release.stderr[-2000:]
        assert (home / "triton-repository" / name / v1).is_dir()  # packaged into the served repository
        client = TritonClient(url, key_file=Path(exports["FLYWHEEL_TS_KEY_FILE"]))
        r = client.predict(name, _png())
        assert r.status_code == 200 and r.json()["version"] == v1
        captures = home / "captures" / name / "captures"
        _wait_captured(captures)
    finally:
        _restore_aliases(serving_models, before)  # the registry is shared with other tests of the session
        _interrupt(proc)  # Ctrl-C: serve stops Triton and its proxy
    assert not env_file.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/v2/health/ready", timeout=5)


def _wait_captured(captures: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not list(captures.glob("*.jsonl")):
        assert time.monotonic() < deadline, f"nothing captured in {captures}"
        time.sleep(0.5)


def _interrupt(proc: subprocess.Popen) -> None:
    """Ctrl-C a `flywheel serve`; killed only if it has not stopped within 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _aliases(serving_models) -> dict[str, str]:
    from mlflow import MlflowClient

    serving_models.settings()
    return dict(MlflowClient().get_registered_model(serving_models.name).aliases)


def _restore_aliases(serving_models, before: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for alias in set(_aliases(serving_models)) - set(before):
        client.delete_registered_model_alias(serving_models.name, alias)
    for alias, version in before.items():
        client.set_registered_model_alias(serving_models.name, alias, version)


def _png() -> bytes:
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_test_split

    test, _ = load_test_split("fashion-mnist")
    return encode_png(test.images[0])


def test_serve_and_env_answer_help():
    from typer.testing import CliRunner

    from flywheel.cli import app

    for verb in ("serve", "env", "report"):
        result = CliRunner().invoke(app, [verb, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, result.output
    serve_help = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--capture-uri", "--no-capture", "--work-dir", "--model-store"):
        assert flag in serve_help
