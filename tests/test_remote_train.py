"""remote-train end to end: a real sshd on 127.0.0.1 is the training node, the real tracking node
(MLflow with basic-auth on Postgres + GCS emulator, `tracking_stack`) takes the runs, and the
commit is a real git commit of this working tree, trained on digits.

The runs go to their own experiment and registered model name so the shared stack's other users
never see them. The tracking password doubles as the secret that must never reach a log or `ps`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import VENV_BIN, free_port
from tests.fixtures_ssh import commit_on

pytestmark = pytest.mark.integration
TRAIN = ["-P", "dataset=digits", "-P", "epochs=1"]
QUICK = [*TRAIN, "-P", "register=false"]  # where the gate isn't what the test is about
MODEL = f"remote-train-test-{secrets.token_hex(4)}"


def _cli_env(tracking, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(tracking.env(), FLYWHEEL_MODEL_NAME=MODEL, MLFLOW_EXPERIMENT_NAME=MODEL, COLUMNS="400",
               GITHUB_OUTPUT=str(tmp_path / "gh_output"), GITHUB_STEP_SUMMARY=str(tmp_path / "gh_summary.md"))
    return env


def _cli(ssh_node, repo: Path, *args: str) -> list[str]:
    from tests.fixtures_ssh import VENV_ACTIVATE

    return [str(VENV_BIN / "flywheel"), "remote-train", "--identity", str(ssh_node.key_path),
            "--known-hosts", str(ssh_node.known_hosts), "--repo", str(repo), *args,
            *(["--env-activate", VENV_ACTIVATE, "--workdir", str(ssh_node.workdir)] if "--node" in args else [])]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _runs_for(tracking, sha: str, monkeypatch):
    from mlflow import MlflowClient

    for key, value in tracking.env().items():
        monkeypatch.setenv(key, value)  # the MLflow client reads credentials from the environment
    client = MlflowClient(tracking_uri=tracking.uri)
    experiment = client.get_experiment_by_name(MODEL)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.git_commit = '{sha}'")


def _job_files_clean(ssh_node, sha: str, secret: str) -> None:
    job = ssh_node.workdir / sha
    leftovers = sorted(p.name for p in job.iterdir() if p.name.startswith(("job.env", "upload-")))
    assert leftovers == [], f"secrets or uploads left on the node: {leftovers}"
    for name in ("job.log", "run.sh"):
        assert secret not in (job / name).read_text(errors="replace"), f"secret leaked into {name}"


def _lock_held(ssh_node, sha: str) -> bool:
    lock = ssh_node.workdir / sha / "job.lock"
    return lock.exists() and subprocess.run(["flock", "-n", str(lock), "true"], check=False).returncode != 0


def test_remote_train_through_pool_logs_the_commit(ssh_node, tracking_stack, project_repo, tmp_path, monkeypatch):
    sha = commit_on(project_repo, "remote-train happy path")
    dead = {"name": "dead-node", "host": "127.0.0.1", "port": free_port(), "user": ssh_node.user}
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"nodes": [dead, ssh_node.node_entry("live-node")]}))
    done = _run(_cli(ssh_node, project_repo, "--nodes", str(nodes), "--commit", sha, *TRAIN,
                               "--plots-dir", str(tmp_path / "plots")),
                _cli_env(tracking_stack, tmp_path), timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "skipping dead-node" in out and "using live-node" in out, out[-3000:]
    runs = _runs_for(tracking_stack, sha, monkeypatch)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert f"MLflow run id: {run.info.run_id}" in out
    assert run.data.tags["git_commit"] == sha
    _job_files_clean(ssh_node, sha, tracking_stack.password)
    assert not _lock_held(ssh_node, sha)
    outputs = (tmp_path / "gh_output").read_text()
    assert f"run_id={run.info.run_id}\n" in outputs and "exit_code=0\n" in outputs
    # A fresh model name has no champion: the gate registers version 1 as candidate, which the
    # workflow's release-dev job keys on; the summary's plots were downloaded for upload.
    assert "candidate_version=1\n" in outputs
    summary = (tmp_path / "gh_summary.md").read_text()
    assert run.info.run_id in summary and "candidate version 1" in summary
    assert list((tmp_path / "plots").rglob("*.png")), "no plots downloaded for the job summary"
    # release.yml's summary step: the same report for a registry version, by alias here.
    env = _cli_env(tracking_stack, tmp_path)
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "release_summary.md")
    report = _run([str(VENV_BIN / "flywheel"), "report", "--version", "candidate"], env, timeout=120)
    assert report.returncode == 0, report.stderr
    assert f"### {MODEL} v1" in report.stdout and run.info.run_id in report.stdout
    assert (tmp_path / "release_summary.md").read_text() == report.stdout


def test_failing_run_propagates_exit_code(ssh_node, tracking_stack, project_repo, tmp_path):
    sha = commit_on(project_repo, "remote-train failing run")
    done = _run(_cli(ssh_node, project_repo, "--node", ssh_node.spec, "--commit", sha,
                               "-P", "dataset=no-such-dataset", "-P", "epochs=1"),
                _cli_env(tracking_stack, tmp_path), timeout=600)
    out = done.stdout + done.stderr
    remote_code = int((ssh_node.workdir / sha / "job.exit").read_text())
    assert remote_code != 0, out[-3000:]
    assert done.returncode == remote_code, out[-3000:]
    assert "unknown dataset 'no-such-dataset'" in out, out[-3000:]  # the node's error reached the client
    assert not _lock_held(ssh_node, sha), "the failed job must not keep running"
    _job_files_clean(ssh_node, sha, tracking_stack.password)


def test_remote_train_ships_a_git_url_projects_subdirectory_and_tags_the_run(
        ssh_node, tracking_stack, project_repo, tmp_path, monkeypatch):
    """Issue 13: a component named by git URL + commit + project dir; the control side fetches that
    commit, the node runs `mlflow run <dir> -e train`, and the run names the project it came from."""
    bare = tmp_path / "component.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(project_repo), str(bare)], check=True)
    work = tmp_path / "component"
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
    # A component in a subdirectory: this tree's MLproject, moved (the node runs the commit's flywheel).
    (work / "components" / "digits").mkdir(parents=True)
    text = (work / "MLproject").read_text().replace("conda_env: conda.yaml\n", "")
    (work / "components" / "digits" / "MLproject").write_text(text.replace("name: flywheel", "name: digits-component"))
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "a component in a subdirectory"], check=True)
    subprocess.run([*git, "tag", "component-v1"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD", "component-v1"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    url = f"file://{bare}"
    # The project is the URL (no --repo checkout here): `--commit` is a tag of that repository.
    cmd = [arg for arg in _cli(ssh_node, Path("/nonexistent"), "--node", ssh_node.spec, "--commit", "component-v1",
                                 "--project-dir", "components/digits", *QUICK) if arg not in ("--repo", "/nonexistent")]
    done = _run([*cmd, "--project", url], _cli_env(tracking_stack, tmp_path), timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert f"commit {sha} entry train of components/digits" in out, out[-3000:]
    (run,) = _runs_for(tracking_stack, sha, monkeypatch)
    assert run.data.tags["git_commit"] == sha
    assert run.data.tags["flywheel.project"] == url
    assert run.data.tags["flywheel.project_dir"] == "components/digits"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    # One job directory per commit *and* project dir: the root project of the same commit is another job.
    assert (ssh_node.workdir / f"{sha}-components~digits" / "job.exit").read_text().strip() == "0"
    assert not (ssh_node.workdir / sha).exists()
    _job_files_clean(ssh_node, f"{sha}-components~digits", tracking_stack.password)
