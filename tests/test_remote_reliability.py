"""remote-train faults (make test-reliability): the SSH connection drops mid-run, the job is killed
under it (OOM killer, reboot), a running job is cancelled. Each ends with a clear status, exactly one
MLflow run and nothing left running on the node."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.fixtures_ssh import commit_on
from tests.test_remote_train import QUICK, _cli, _cli_env, _lock_held, _run, _runs_for

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


class _Reader(threading.Thread):
    """Collects a subprocess's output while the test does other things."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc, self.text = proc, ""

    def run(self) -> None:
        for line in self.proc.stdout:
            self.text += line

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"never saw {needle!r} (exit {self.proc.poll()}):\n{self.text[-5000:]}")
            time.sleep(0.2)


def _start(ssh_node, repo, sha, env) -> tuple[subprocess.Popen, _Reader]:
    proc = subprocess.Popen(_cli(ssh_node, repo, "--node", ssh_node.spec, "--commit", sha, *QUICK),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reader = _Reader(proc)
    reader.start()
    reader.wait_for("MLflow run id:", timeout=300)
    return proc, reader


def _job_processes(ssh_node, sha: str) -> list[psutil.Process]:
    jobdir = str(ssh_node.workdir / sha)
    found = []
    for p in psutil.process_iter(["cwd", "cmdline"]):
        if (p.info["cwd"] or "").startswith(jobdir) or jobdir in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def test_job_killed_on_the_node_is_reported_not_waited_for(ssh_node, tracking_stack, project_repo, tmp_path):
    sha = commit_on(project_repo, "remote-train job killed on the node")
    proc, reader = _start(ssh_node, project_repo, sha, _cli_env(tracking_stack, tmp_path))
    try:
        # What the OOM killer or a reboot does: the whole job dies at once, no exit status written.
        pgid = int((ssh_node.workdir / sha / "job.pid").read_text())
        os.killpg(pgid, signal.SIGKILL)
        assert proc.wait(timeout=120) == 2, reader.text[-3000:]
    finally:
        _stop(proc)
    reader.join(timeout=10)
    assert "ended without an exit status" in reader.text, reader.text[-3000:]
    assert not _lock_held(ssh_node, sha)
    # The commit can be trained again right away (the lock died with the job).
    assert not _job_processes(ssh_node, sha)


def test_cancel_stops_the_job_and_marks_the_run_killed(ssh_node, tracking_stack, project_repo, tmp_path,
                                                       monkeypatch):
    sha = commit_on(project_repo, "remote-train cancelled")
    env = _cli_env(tracking_stack, tmp_path)
    proc, reader = _start(ssh_node, project_repo, sha, env)
    try:
        started = time.monotonic()
        cancel = _run(_cli(ssh_node, project_repo, "--node", ssh_node.spec, "--cancel", sha[:12]), env, timeout=120)
        assert cancel.returncode == 0 and "stopped" in cancel.stderr, cancel.stderr
        code = proc.wait(timeout=120)
    finally:
        _stop(proc)
    reader.join(timeout=10)
    assert code != 0, reader.text[-3000:]
    assert int((ssh_node.workdir / sha / "job.exit").read_text()) == code
    assert not _lock_held(ssh_node, sha) and not _job_processes(ssh_node, sha)
    # SIGINT reached mlflow (not ignored as in a plain background job): it cancelled its run cleanly.
    assert "interrupted, cancelling run" in reader.text, reader.text[-3000:]
    assert time.monotonic() - started < 60
    from mlflow import MlflowClient

    run_id = re.search(r"MLflow run id: ([0-9a-f]{32})", reader.text)[1]
    for key, value in tracking_stack.env().items():
        monkeypatch.setenv(key, value)
    status = MlflowClient(tracking_uri=tracking_stack.uri).get_run(run_id).info.status
    assert status in ("KILLED", "FAILED"), status


def test_dropped_session_training_survives_and_reattaches(ssh_node, tracking_stack, project_repo, tmp_path,
                                                          monkeypatch):
    import psutil

    sha = commit_on(project_repo, "remote-train dropped session")
    env = _cli_env(tracking_stack, tmp_path)
    proc = subprocess.Popen(_cli(ssh_node, project_repo, "--node", ssh_node.spec, "--commit", sha, *QUICK,
                                 "--reconnect-timeout", "120"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reader = _Reader(proc)
    reader.start()
    try:
        reader.wait_for("MLflow run id:", timeout=300)
        assert _lock_held(ssh_node, sha)
        # The secret is in no process's command line while the job runs.
        for p in psutil.process_iter(["cmdline"]):
            assert tracking_stack.password not in " ".join(p.info["cmdline"] or []), p.info["cmdline"]
        # The network drops: every SSH session dies; the detached job must not.
        assert ssh_node.drop_sessions() >= 1
        # Meanwhile, starting the same commit again on the node is refused.
        again = _run(_cli(ssh_node, project_repo, "--node", ssh_node.spec, "--commit", sha, *QUICK),
                     env, timeout=120)
        assert again.returncode != 0 and "already training" in again.stderr, again.stderr
        assert proc.wait(timeout=600) == 0, reader.text[-5000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    reader.join(timeout=10)
    assert "lost" in reader.text and "reconnected" in reader.text, reader.text[-3000:]
    # A later client (the CI job re-run) picks the finished job up and reports its status.
    attached = _run(_cli(ssh_node, project_repo, "--node", ssh_node.spec, "--attach", sha[:10]),
                    env, timeout=120)
    assert attached.returncode == 0, attached.stderr[-3000:]
    assert "exit code 0" in attached.stderr
    runs = _runs_for(tracking_stack, sha, monkeypatch)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    assert runs[0].info.run_id in attached.stderr
    # The MLflow run id works as the handle too (what the CI log printed first).
    by_run = _run(_cli(ssh_node, project_repo, "--node", ssh_node.spec, "--attach", runs[0].info.run_id), env,
                  timeout=120)
    assert by_run.returncode == 0 and f"commit {sha[:12]}" in by_run.stderr, by_run.stderr[-3000:]
    assert not _lock_held(ssh_node, sha)
