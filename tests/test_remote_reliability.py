"""remote-train faults on the node (make test-reliability): the job is killed under it (OOM killer,
reboot), and a running job is cancelled. Both must end with a clear status and nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.fixtures_ssh import commit_on
from tests.test_remote_train import QUICK, _cli, _cli_env, _lock_held, _Reader, _run

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


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
