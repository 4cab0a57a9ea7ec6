"""The CLI's vocabulary and contract with scripts: exit codes (2 usage/fixable, 3 rejected), `--version`,
`--json` (one JSON document on stdout), and the hidden aliases old scripts still use. Real stores, a
real training run, real processes through the installed entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

FLYWHEEL = str(Path(sys.executable).with_name("flywheel"))


def _fw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([FLYWHEEL, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**__import__("os").environ, "COLUMNS": "200", "TERM": "dumb"})


def _invoke(*args: str):
    from flywheel.cli import app

    return CliRunner().invoke(app, list(args), terminal_width=200)


def test_version_prints_the_package_version():
    from importlib.metadata import version

    out = _fw("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"flywheel {version('flywheel')}", out


def test_root_help_documents_the_exit_codes_and_hides_the_old_verbs():
    out = _fw("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "Exit codes:" in text and "2 a usage error" in text and "3 rejected" in text
    for verb in ("archs", "data", "train", "--version"):
        assert verb in out.stdout, verb
    listed = set(re.findall(r"^\W+([a-z][a-z-]+)\s{2,}\S", out.stdout, re.M))  # a verb's row in the panels
    assert {"archs", "train", "register", "data", "monitor"} <= listed and not listed & {"models", "datasets"}


def test_a_fixable_error_is_one_red_line_and_exit_2(tmp_path):
    out = _fw("evaluate", "--model-uri", "models:/nope@prod", "--dataset", "digits", cwd=tmp_path)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()  # MLflow may log (creating the empty store) before it
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:] and "'nope'" in lines[-1]
    assert "Traceback" not in out.stderr


def test_release_with_a_wrong_key_file_stops_before_reading_the_registry_or_packaging(tmp_path):
    out = _invoke("release", "--version", "1", "--env", "dev", "--key-file", str(tmp_path / "key_file.json"),
                  "--model-store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert out.exit_code == 2, out.output
    assert f"TorchServe key file {tmp_path / 'key_file.json'} not found" in out.output
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "store").exists()  # nothing was touched


def test_serve_refuses_what_it_would_find_out_only_after_starting(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    store = tmp_path / "model-store"
    store.mkdir()
    (store / "m-1.mar").write_bytes(b"")
    for args, says in ((["serve", "--load", "m-2.mar"], f"--load m-2.mar: no m-2.mar in {store} (there: m-1.mar)"),
                       (["serve", "--load", "m=m-2.mar"], "--load m=m-2.mar: no m-2.mar in"),
                       (["serve", "--capture-uri", "s3://b/p"], "--capture-uri: capture store URI 's3://b/p': only"),
                       (["serve", "--model-store", str(store / "m-1.mar")], "is a file: give the directory"),
                       (["serve-pool", "--load", "m-2.mar"], "--load m-2.mar: no m-2.mar in"),
                       (["serve-pool", "--token-file", str(tmp_path / "t")], f"--token-file {tmp_path / 't'} not found")):
        out = _invoke(*args)
        assert out.exit_code == 2 and says in out.output, (args, out.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-store"]  # no server directory: nothing started


def test_hidden_aliases_still_work_and_stay_out_of_help():
    archs = _invoke("archs")
    assert archs.exit_code == 0 and "small-cnn" in archs.stdout
    assert _invoke("models").stdout == archs.stdout  # old name of archs
    datasets = _invoke("datasets")
    assert datasets.exit_code == 0 and datasets.stdout == _invoke("data", "list").stdout
    assert "fashion-mnist" in datasets.stdout
    train_help = _invoke("train", "--help").stdout
    assert "--arch" in train_help and "--model" in train_help and "--model-name" not in train_help
    monitor_help = _invoke("monitor", "--help").stdout
    assert "--identity" in monitor_help and "--known-hosts" in monitor_help and "--ssh-key" not in monitor_help
    # --ssh-key is still parsed: the refusal is about the node it was given for, not an unknown option.
    res = _invoke("monitor", "--once", "--ssh-node", "no-user-here", "--ssh-key", "/dev/null")
    assert res.exit_code == 2 and "must be user@host[:port]" in res.output, res.output
    res = _invoke("monitor", "--once", "--ssh-node", "no-user-here", "--identity", "/dev/null")
    assert res.exit_code == 2 and "must be user@host[:port]" in res.output, res.output
    for old in (["data", "snapshot", "--model-name", "x", "--help"], ["report", "--model-name", "x", "--help"]):
        assert _invoke(*old).exit_code == 0, old


def test_json_needs_what_keeps_stdout_one_document(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"not read: refused first")
    res = _invoke("predict", "--json", "--token", "t", str(png))
    assert res.exit_code == 2 and "--out" in res.output
    res = _invoke("monitor", "--json")
    assert res.exit_code == 2 and "--once" in res.output


def test_predict_json_is_one_document_with_the_summary(tmp_path):
    """Nothing listens on the endpoint: every request fails, the summary says so, exit 1."""
    from PIL import Image

    from flywheel.core.procs import free_port

    png = tmp_path / "a.png"
    Image.new("L", (28, 28)).save(png)
    out = _fw("predict", "--json", "--endpoint", f"http://127.0.0.1:{free_port()}", "--token", "t",
              "--model", "m", "--out", str(tmp_path / "p.jsonl"), str(png))
    assert out.returncode == 1, out
    assert json.loads(out.stdout) == {"model": "m", "total": 1, "ok": 0, "failed": 1, "out": str(tmp_path / "p.jsonl")}


def test_doctor_json_on_the_embedded_store(tmp_path):
    out = _fw("doctor", "--json", cwd=tmp_path)
    assert out.returncode == 0, out
    doc = json.loads(out.stdout)
    assert doc["ok"] is True and doc["checks"][0]["name"] == "server reachable" and doc["checks"][0]["ok"] is None


@pytest.fixture(scope="module")
def gated_store(tmp_path_factory):
    """One quick digits run trained through the CLI with the new spelling: `--model` the registered name,
    `--arch` the architecture; registered as v1 (no champion yet)."""
    import os

    home = tmp_path_factory.mktemp("cli-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYWHEEL_"))}
    env |= {"FLYWHEEL_HOME": str(home), "COLUMNS": "200"}
    out = subprocess.run([FLYWHEEL, "train", "--dataset", "digits", "--arch", "small-cnn", "--model", "cli-gate",
                          "--epochs", "1", "--batch-size", "32", "--max-train-samples", "256"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=home)
    assert out.returncode == 0, out.stderr[-3000:]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    import mlflow

    mv = mlflow.MlflowClient(uri).get_model_version("cli-gate", "1")
    assert mlflow.MlflowClient(uri).get_run(mv.run_id).data.params.get("model") == "small-cnn"
    return home, uri, mv.run_id


def test_a_rejecting_gate_exits_3_and_the_alias_names_the_same_model(gated_store, monkeypatch):
    home, uri, run_id = gated_store
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    # v1 is the champion; no run beats it by a whole accuracy point.
    res = _invoke("register", "--run-id", run_id, "--model", "cli-gate", "--dataset", "digits", "--margin", "1.0",
                  "--tracking-uri", uri)
    assert res.exit_code == 3, res.output
    assert "not registered" in res.stdout and "error: the gate rejected run" in res.output
    res = _invoke("register", "--run-id", run_id, "--model-name", "cli-gate", "--dataset", "digits", "--margin",
                  "1.0", "--tracking-uri", uri)  # the hidden alias: same model, same champion, same verdict
    assert res.exit_code == 3, res.output


def test_evaluate_report_and_monitor_once_json(gated_store, monkeypatch, tmp_path):
    home, uri, run_id = gated_store
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    res = _invoke("evaluate", "--model-uri", "models:/cli-gate/1", "--dataset", "digits", "--json",
                  "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model_uri"] == "models:/cli-gate/1" and doc["dataset"] == "digits" and 0 < doc["accuracy"] <= 1
    assert len(doc["confusion"]) == len(doc["class_names"]) == 10 and sum(map(sum, doc["confusion"])) == doc["n"]

    res = _invoke("report", "--version", "1", "--model", "cli-gate", "--json", "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model"] == "cli-gate" and doc["version"] == "1" and doc["run_id"] == run_id
    assert doc["metrics"]["test_accuracy"] > 0

    import mlflow

    mlflow.MlflowClient(uri).set_registered_model_alias("cli-gate", "prod", "1")
    captures = tmp_path / "captures"
    captures.mkdir()
    res = _invoke("monitor", "--once", "--json", "--model", "cli-gate", "--capture-uri", str(captures),
                  "--state-dir", str(tmp_path / "state"), "--tracking-uri", uri)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["model"] == "cli-gate" and doc["env"] == "prod" and doc["windows"] == []
    assert doc["read"]["version"] == "1" and "no captures of cli-gate" in doc["summary"]
