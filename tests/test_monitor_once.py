"""The monitor as an operator runs it: one process per state dir, `--once` says what it saw and ends
its MLflow run, restarts read every capture exactly once, and the capture-store default is shared.

Real processes throughout: `python -m flywheel monitor` against the serving fixture's real registry
(models trained on Fashion-MNIST, their logged references), captures written by the real
CaptureWriter (in-process, or by tests/capture_procs.py writer processes) with real embeddings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flywheel.contracts.capture import CaptureWriter
from tests.conftest import REPO
from tests.test_capture_once import BEHIND, PLAIN, SLOW, _finish_writers, _kill, _writers


def _flywheel(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m flywheel ARGS` on this checkout; env values of None remove that variable."""
    full = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flywheel", *args], capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in full.items() if v is not None})


def _one_line(text: str) -> str:
    return " ".join(text.split())  # the console wraps long lines; compare the words


def _capture(uri: str, embeddings: np.ndarray, version: str, start: int, n: int, traffic: str = "live") -> None:
    # Named 5 s in the past: past the monitor's 2 s settle time without waiting for it.
    writer = CaptureWriter(uri, flush_every=32, flush_seconds=0.1, clock=lambda: time.time() - 5)
    for i in range(start, start + n):
        writer.submit({"prediction_id": f"{traffic}-{i:05d}", "model": "fashion-classifier", "version": version,
                       "ts": time.time(), "embedding": embeddings[i % len(embeddings)], "label_index": i % 10,
                       "traffic": traffic})
    writer.close()
    assert writer.written == n, writer.last_error


# ----------------------------------------------------------------------------------- the lock
@pytest.mark.integration
def test_second_monitor_on_the_same_state_dir_exits(tmp_path):
    state, caps = tmp_path / "state", tmp_path / "captures"
    env = {"FLYWHEEL_HOME": str(tmp_path / "home")}
    first = subprocess.Popen([sys.executable, "-m", "flywheel", "monitor", "--state-dir", str(state), "--capture-uri",
                              str(caps), "--interval", "1"], env={**os.environ, "PYTHONPATH": str(REPO / "src"),
                                                                  **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (state / "monitor.lock.owner").is_file():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first monitor never took its lock"
            time.sleep(0.2)
        second = _flywheel("monitor", "--once", "--state-dir", str(state), "--capture-uri", str(caps), env=env)
        assert second.returncode == 2, second.stderr
        err = _one_line(second.stderr)
        assert f"another flywheel monitor (pid {first.pid} " in err and f"holds state dir {state}" in err, err
        assert "Traceback" not in second.stderr
        os.killpg(first.pid, signal.SIGTERM)  # what systemd sends: the service stops and lets go
        first.communicate(timeout=60)
        assert first.returncode == 0
        assert not (state / "monitor.lock.owner").exists()
        third = _flywheel("monitor", "--once", "--state-dir", str(state), "--capture-uri", str(caps), env=env)
        assert "another flywheel monitor" not in third.stderr  # the lock is free again (no model: fails later)
    finally:
        _kill(first)


# ----------------------------------------------------------------------------------- --once
@pytest.mark.integration
def test_once_reports_pending_and_finishes_its_run(serving_models, fashion_embeddings, tmp_path):
    import mlflow

    name, v1 = serving_models.name, serving_models.versions[0]
    settings = serving_models.settings()
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "monitored-cli", v1)
    caps, state = tmp_path / "captures", tmp_path / "state"
    env = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "FLYWHEEL_HOME": str(tmp_path / "home")}
    args = ("monitor", "--once", "--env", "monitored-cli", "--capture-uri", str(caps), "--state-dir", str(state))
    emb = fashion_embeddings.clean

    out = _flywheel(*args, env=env)
    assert out.returncode == 0, out.stderr
    assert f"no captures of {name} in {caps}" in _one_line(out.stdout), out.stdout

    _capture(str(caps), emb, v1, 0, 74)
    out = _flywheel(*args, env=env)
    assert out.returncode == 0, out.stderr
    assert f"74 captured predictions pending of a 100 window (v{v1}); no window tested" in out.stdout, out.stdout

    _capture(str(caps), emb, v1, 74, 226)
    _capture(str(caps), emb, v1, 0, 20, traffic="acceptance")  # a release's own requests: never monitored
    out = _flywheel(*args, env=env)
    assert out.returncode == 0, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("window ")] == \
        [f"window {i} v{v1}" for i in (1, 2, 3)]
    assert ("read 246 new captures (skipped 20 acceptance); 0 captured predictions pending of a 100 window "
            f"(v{v1}); 3 windows tested") in out.stdout, out.stdout
    run_id = json.loads((state / "state.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"

    _capture(str(caps), emb, v1, 300, 100)
    out = _flywheel(*args, env=env)
    assert out.returncode == 0 and f"window 4 v{v1}" in out.stdout, out.stdout + out.stderr
    assert json.loads((state / "state.json").read_text())["run_id"] == run_id  # one run per version
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "p_value")) == [1, 2, 3, 4]


def test_capture_store_default_is_shared_and_snapshot_says_what_is_missing(tmp_path):
    home = tmp_path / "home"
    env = {"FLYWHEEL_HOME": str(home), "FLYWHEEL_CAPTURE_URI": None}  # the default: $FLYWHEEL_HOME/captures
    stored = _flywheel("data", "feedback", "p1=Bag", "p2=Coat", env=env)
    assert stored.returncode == 0, stored.stderr
    captures = (home / "captures").resolve()
    assert f"stored 2 labels in {captures}" in stored.stdout
    snap = _flywheel("data", "snapshot", env=env)
    assert snap.returncode == 2
    err = _one_line(snap.stderr)
    assert f"2 feedback labels but no captures at all in {captures}" in err, err
    # the same store: captures that the labels do not name
    _capture(str(captures), np.zeros((1, 4), np.float32), "1", 0, 3)
    snap = _flywheel("data", "snapshot", env=env)
    err = _one_line(snap.stderr)
    assert snap.returncode == 2 and "2 feedback labels but none matches one of the 3 captured prediction ids" in err, err


# ----------------------------------------------------------------------------------- restarts
@pytest.mark.integration
def test_monitor_restarts_read_every_capture_once(serving_models, fashion_embeddings, tmp_path):
    """3 writer processes (one 30 s behind, one with 10 s uploads); a new Monitor every ~second."""
    import mlflow

    from flywheel.core.config import Settings
    from flywheel.monitoring.service import Monitor, MonitorConfig

    name, v1 = serving_models.name, serving_models.versions[0]
    settings = Settings.from_env(tracking_uri=serving_models.tracking_uri, work_dir=serving_models.work_dir,
                                 model_name=name).apply()
    mlflow.MlflowClient().set_registered_model_alias(name, "monitored-restarts", v1)
    emb_file = tmp_path / "emb.npy"
    np.save(emb_file, fashion_embeddings.clean[:500])
    caps = str(tmp_path / "captures")
    cfg = MonitorConfig(model=name, capture_uri=caps, env="monitored-restarts", state_dir=tmp_path / "state",
                        window=30, settle_s=0.0, horizon_s=45.0)
    writers = _writers(caps, emb_file, v1)
    results, restarts = [], 0
    try:
        while any(w.poll() is None for w in writers):
            mon = Monitor(cfg, settings)  # a restart: everything comes from the state dir
            try:
                results += mon.tick()
            finally:
                mon.close()
            restarts += 1
            time.sleep(0.5)
        _finish_writers(writers)
    finally:
        for w in writers:
            _kill(w)
    mon = Monitor(cfg, settings)
    results += mon.tick()
    mon.close()
    total = PLAIN + BEHIND + SLOW
    assert restarts >= 3
    assert [r.index for r in results] == list(range(1, len(results) + 1))
    assert sum(r.size for r in results) + mon.last_tick.pending == total  # nothing lost, nothing twice
    assert len(results) == total // 30
    run_id = mon.state.run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, "p_value")
    assert sorted(m.step for m in history) == list(range(1, len(results) + 1))
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert Path(cfg.state_dir, mon.state.pending_file).is_file() and len(list(Path(cfg.state_dir).glob("pending*"))) == 1


def test_windows_replayed_after_a_crash_ask_for_one_retrain(tmp_path):
    """The journal: a crash after the policy and outbox were written but before the journal commit
    replays those windows from the recorded policy state: same decision, same event id, one request."""
    from dataclasses import asdict

    from flywheel.core.config import Settings
    from flywheel.monitoring.service import Monitor, MonitorConfig, WindowResult
    from flywheel.monitoring.triggers import LocalCommand, PolicyConfig, PolicyState

    cfg = MonitorConfig(model="m", capture_uri=str(tmp_path / "captures"), state_dir=tmp_path / "state",
                        dataset="fashion-mnist")
    drifting = [WindowResult(i, "1", 100, 1e-9, 1e-9, 1e-9, True, None, 0, 0.0, 1.0, tested_at=1000.0 + i)
                for i in (1, 2, 3)]
    journal = [{"window": asdict(r), "policy_before": asdict(PolicyState()) if r.index == 1 else None}
               for r in drifting]
    action = LocalCommand("true")
    for attempt in range(2):  # the second: the state.json of before the crash, policy/outbox of after it
        mon = Monitor(cfg, Settings.from_env(), actions=[action], policy=PolicyConfig(consecutive=3))
        with mon.locked():
            mon.state.journal = [dict(e) for e in journal]
            applied = mon._apply_journal()
        assert [r.trigger for r in applied] == [None, None, "drift"]
        assert mon.state.journal == []
        (pending,) = mon.outbox.pending()
        if attempt == 0:
            first_id = pending.event["event_id"]
        assert pending.event["event_id"] == first_id
