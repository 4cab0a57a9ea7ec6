"""Exactly-once reading of captures: several writer processes, a clock behind, a slow store, restarts.

Three real writer processes (tests/capture_procs.py, the real CaptureWriter) write to one store: one
plain, one whose clock runs 30 s behind, one whose uploads wait 10 s after the batch was named. A
real reader process (the CaptureReader driven the way the monitor drives it, committing ids and
cursor in one atomic write) is killed with SIGKILL and started again every 0.5-2.5 s while they
write. Afterwards every record was read exactly once, counted by prediction_id. A second reader with
a horizon below the clock skew runs beside it and misses batches: the bound in capture.py is real.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from flywheel.contracts.capture import (
    CaptureCursor,
    CaptureReader,
    CaptureWriter,
    Poll,
    batch_key,
    list_batches,
)
from tests.conftest import REPO

PROCS = REPO / "tests" / "capture_procs.py"
PLAIN, BEHIND, SLOW = 150, 150, 60  # records per writer
HORIZON = 45.0  # > 10 s upload + 30 s skew, as capture.py's contract asks


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(PROCS), *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)


def _writers(uri: str, embeddings: Path | None = None, version: str = "1") -> list[subprocess.Popen]:
    extra = ["--embeddings", str(embeddings), "--version", version] if embeddings else []
    return [
        _popen("writer", uri, "plain", "--records", str(PLAIN), "--seconds", "10", *extra),
        _popen("writer", uri, "behind", "--records", str(BEHIND), "--seconds", "10", "--clock-offset", "-30",
               *extra),
        # One batch, named when the writer closes (~3 s in), visible ~10 s later: the others' batches
        # named after it are read first.
        _popen("writer", uri, "slow", "--records", str(SLOW), "--seconds", "3", "--put-delay", "10",
               "--flush-every", "1000", "--flush-seconds", "30", *extra),
    ]


def _finish_writers(writers: list[subprocess.Popen]) -> None:
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err[-2000:]
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["dropped"] == 0 and stats["written"] in (PLAIN, BEHIND, SLOW), stats


def _exactly_once(uri: str, tmp_path: Path) -> None:
    state, tight = tmp_path / "reader.json", tmp_path / "tight.json"
    writers = _writers(uri)
    tight_reader = _popen("reader", uri, str(tight), "--horizon", "5")
    restarts = 0
    rng = random.Random(11)
    try:
        while any(w.poll() is None for w in writers) or restarts < 4:
            reader = _popen("reader", uri, str(state), "--horizon", str(HORIZON))
            time.sleep(rng.uniform(0.5, 2.5))
            _kill(reader)  # SIGKILL: no chance to tidy up, like a crash or an OOM kill
            restarts += 1
        _finish_writers(writers)
    finally:
        for proc in (*writers, tight_reader):
            _kill(proc)
    for path, horizon in ((state, HORIZON), (tight, 5)):
        final = subprocess.run([sys.executable, str(PROCS), "reader", uri, str(path), "--horizon", str(horizon),
                                "--once"], env=_env(), capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr[-2000:]
    expected = {f"{name}-{i:05d}" for name, n in (("plain", PLAIN), ("behind", BEHIND), ("slow", SLOW))
                for i in range(n)}
    ids = json.loads(state.read_text())["ids"]
    counts = Counter(ids)
    assert restarts >= 4
    assert not [i for i, c in counts.items() if c > 1], "records read twice"
    missing = expected - set(ids)
    assert not missing, f"{len(missing)} records never read, e.g. {sorted(missing)[:5]}"
    assert len(ids) == len(expected)
    # The bound is real: a horizon shorter than the skew and the upload time skips batches (never twice).
    tight_ids = json.loads(tight.read_text())["ids"]
    assert len(tight_ids) == len(set(tight_ids))
    assert expected - set(tight_ids), "a 5 s horizon should have missed the late batches"


@pytest.mark.integration
def test_exactly_once_on_a_directory(tmp_path):
    _exactly_once(str(tmp_path / "captures"), tmp_path)


@pytest.mark.integration
def test_exactly_once_on_gcs(gcs_env, tmp_path):
    _exactly_once(f"gs://{gcs_env.bucket}/once-{tmp_path.name}", tmp_path)


# ----------------------------------------------------------------------------------- cursor contract
def _write(uri: str, name: str, ts: float) -> str:
    """One record in its own batch, named at `ts`; returns the batch name."""
    before = set(list_batches(uri, "m"))
    writer = CaptureWriter(uri, flush_every=1, clock=lambda: ts)
    writer.submit({"prediction_id": name, "model": "m", "version": "1", "ts": ts})
    writer.close()
    assert writer.written == 1
    (batch,) = set(list_batches(uri, "m")) - before
    return batch


def test_cursor_reads_late_and_behind_batches_once_and_prunes(tmp_path):
    uri = str(tmp_path)
    now = 2_000_000_000.0
    clock = [now]
    reader = CaptureReader(uri, "m", horizon_s=60, clock=lambda: clock[0])
    a = _write(uri, "a", now - 1)
    b = _write(uri, "b", now)
    poll = reader.poll(CaptureCursor())
    assert poll.names == (a, b) and poll.listed_at == now
    cur = reader.advance(CaptureCursor(), poll)
    assert cur.seen == {a, b} and cur.watermark == batch_key(now - 60)
    # named before b but stored after it was read (slow upload), and a writer 40 s behind
    late, behind = _write(uri, "late", now - 0.5), _write(uri, "behind", now - 40)
    clock[0] = now + 10
    poll = reader.poll(cur)
    assert set(poll.names) == {late, behind}
    cur = reader.advance(cur, poll)
    assert reader.poll(cur).names == ()
    # far later: the watermark passes the old names, which leave the set
    c = _write(uri, "c", now + 300)
    clock[0] = now + 300
    poll = reader.poll(cur)
    assert poll.names == (c,)
    cur = reader.advance(cur, poll)
    assert cur.seen == {c} and cur.watermark == batch_key(now + 240)
    assert reader.poll(cur).names == ()
    # the watermark never follows a clock far ahead of the reader's
    ahead = _write(uri, "ahead", now + 3600)
    cur2 = reader.advance(cur, reader.poll(cur))
    assert ahead in cur2.seen and cur2.watermark == batch_key(now + 240)
    assert CaptureCursor.from_json(json.loads(json.dumps(cur2.to_json()))) == cur2


def test_old_single_name_cursor_migrates(tmp_path):
    uri = str(tmp_path)
    t = time.time()
    first, second = _write(uri, "x", t - 5), _write(uri, "y", t - 4)
    cur = CaptureCursor.from_json(first)  # what an older monitor saved: everything up to `first` read
    assert cur == CaptureCursor(watermark=first) and CaptureCursor.from_json(None) == CaptureCursor()
    reader = CaptureReader(uri, "m")
    assert reader.poll(cur).names == (second,)
    with pytest.raises(ValueError):
        CaptureCursor.from_json({"watermark": 3})
    with pytest.raises(ValueError):
        CaptureReader(uri, "m", horizon_s=1, settle_s=2)
    assert Poll((), 0.0).names == ()


def test_traffic_marks_round_trip(tmp_path):
    from flywheel.contracts.capture import iter_captures, traffic_kind

    assert traffic_kind(None) == "live" and traffic_kind(" Acceptance ") == "acceptance"
    writer = CaptureWriter(str(tmp_path), flush_every=3)
    for i, mark in enumerate(("live", "warmup", "acceptance")):
        writer.submit({"prediction_id": f"p{i}", "model": "m", "version": "1", "ts": 1.0, "traffic": mark})
    writer.submit({"prediction_id": "old", "model": "m", "version": "1", "ts": 1.0})  # written before marks
    writer.close()
    caps = {c.prediction_id: c for c in iter_captures(str(tmp_path), "m")}
    assert [caps[k].traffic for k in ("p0", "p1", "p2", "old")] == ["live", "warmup", "acceptance", "live"]
    assert caps["p0"].live and not caps["p2"].live
