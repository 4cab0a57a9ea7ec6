"""`flywheel trace PREDICTION_ID`: one served prediction back to its version, run, commit, data, params,
the archive served (as the release recorded it on the registry version), the deployment, the captured
input and the monitor window it fell into.

Real servers throughout: the serving fixture's registry (Fashion-MNIST models trained once per
session), a real TorchServe capturing to a directory, a real release (acceptance, set-default,
registry bookkeeping), predictions over HTTP, one real monitor tick, then the real CLI in a
subprocess. The window-record contract has its own server-free checks.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from flywheel.contracts.capture import iter_captures
from tests.test_monitor_once import _flywheel, _one_line


def _wait_captured(uri: str, model: str, ids: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = {c.prediction_id for c in iter_captures(uri, model)} & ids
        if got == ids:
            return
        assert time.monotonic() < deadline, f"only {len(got)} of {len(ids)} predictions were captured"
        time.sleep(0.3)


@pytest.mark.integration
def test_trace_a_served_prediction_end_to_end(serving_models, tmp_path):
    import mlflow

    from flywheel.contracts.manifest import ArchiveStamp, sha256_file
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.config import Settings
    from flywheel.monitoring.service import Monitor, MonitorConfig
    from flywheel.serving.release import AcceptanceConfig, AcceptanceData, ManagementTarget, release_version
    from tests.fixtures_monitor import start_capturing_torchserve

    name, v2 = serving_models.name, serving_models.versions[1]
    manifest = serving_models.manifests[v2]
    caps = str(tmp_path / "captures")
    server = start_capturing_torchserve(serving_models, tmp_path / "ts", caps)  # serves v1
    try:
        settings = serving_models.settings()
        target = ManagementTarget(server.cfg.inference_address, server.cfg.management_address, server.key_file,
                                  server.cfg.model_store, grace_s=0.5, keep_previous=1)
        accept = AcceptanceConfig(min_accuracy=0.3, p95_slo_ms=5000, accuracy_samples=64, latency_requests=10)
        released_from = int(time.time())
        assert release_version(settings, name, v2, "dev", target, accept, mar_path=serving_models.mars[v2]).switched
        released_by = time.time()

        # The registry version records the archive the server loads: its sha256 and format.
        served_mar = Path(server.cfg.model_store) / f"{name}-{v2}.mar"
        mar_sha = sha256_file(served_mar)
        client = mlflow.MlflowClient(serving_models.tracking_uri)
        tags = client.get_model_version(name, v2).tags
        assert tags["flywheel.archive.sha256"] == tags["flywheel.archive.dev.sha256"] == mar_sha
        assert tags["flywheel.archive.format"] == tags["flywheel.archive.dev.format"] == manifest.artifact["format"]
        assert tags["flywheel.archive.artifact_sha256"] == manifest.artifact["sha256"]
        stamp = ArchiveStamp.from_tags(tags, "dev")
        assert stamp == ArchiveStamp.from_tags(tags) == ArchiveStamp.from_bytes(served_mar.read_bytes())
        stamp.verify(served_mar)  # an auditor's check of the file against the registry

        # Users' requests over HTTP (raw PNG bodies): two groups, the second sent after the first is
        # stored, so the monitor's first window is the first group and its second the second.
        images = AcceptanceData.for_version(settings, name, v2, AcceptanceConfig(accuracy_samples=20)).images
        sent: dict[str, bytes] = {}
        groups: list[set[str]] = []
        ts_client = server.client()
        for group in (range(0, 10), range(10, 20)):
            groups.append(set())
            for i in group:
                png = encode_png(images[i])
                r = ts_client.predict(name, png)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["version"] == v2
                sent[body["prediction_id"]] = png
                groups[-1].add(body["prediction_id"])
            _wait_captured(caps, name, groups[-1])
        first_group, second_group = groups

        mon = Monitor(MonitorConfig(model=name, capture_uri=caps, env="dev", state_dir=tmp_path / "mon", window=10,
                                    settle_s=0.0, log_mlflow=False),
                      Settings.from_env(tracking_uri=serving_models.tracking_uri, work_dir=serving_models.work_dir,
                                        model_name=name))
        results = mon.tick()
        mon.close()
        assert [(r.index, r.size, r.version) for r in results] == [(1, 10, v2), (2, 10, v2)]
    finally:
        server.stop()

    pid = sorted(second_group)[0]
    env = {"MLFLOW_TRACKING_URI": serving_models.tracking_uri, "FLYWHEEL_HOME": str(tmp_path / "home"),
           "FLYWHEEL_CAPTURE_URI": caps}
    out = _flywheel("trace", pid, "--model", name, "--json", env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    mv = client.get_model_version(name, v2)
    run = client.get_run(mv.run_id)
    assert (doc["prediction_id"], doc["model"], doc["version"], doc["run_id"]) == (pid, name, v2, mv.run_id)
    assert doc["run_id"] == manifest.run_id
    assert doc["git_commit"] and doc["git_commit"] == manifest.git_commit == run.data.tags["git_commit"]
    assert doc["dataset_digest"] and doc["dataset_digest"] == manifest.dataset_digest
    assert doc["dataset"] == manifest.dataset
    assert doc["params"] == run.data.params and doc["params"]["epochs"] == "1"
    assert doc["archive"] == {"sha256": mar_sha, "format": manifest.artifact["format"],
                              "artifact_sha256": manifest.artifact["sha256"]}
    (dev,) = [d for d in doc["deployments"] if d["env"] == "dev"]
    assert dev["where"] == f"torchserve {server.cfg.inference_address}" and dev["current"] is True
    assert dev["archive"]["sha256"] == mar_sha
    assert released_from - 1 <= datetime.fromisoformat(dev["at"]).timestamp() <= released_by + 1
    cap = doc["capture"]
    assert cap["traffic"] == "live" and cap["image_bytes"] == len(sent[pid])
    assert cap["image_sha256"] == hashlib.sha256(sent[pid]).hexdigest()  # the bytes that were sent
    (window,) = doc["windows"]
    second = results[1]
    assert (window["env"], window["index"], window["version"], window["size"]) == ("dev", 2, v2, 10)
    assert (window["p_value"], window["drift"], window["alpha"]) == (second.p_value, second.drift, 0.01)
    assert datetime.fromisoformat(window["first_at"]).timestamp() <= cap["ts"] + 0.001
    assert cap["ts"] - 0.001 <= datetime.fromisoformat(window["last_at"]).timestamp()

    # Text, with the image written out: the captured bytes are the bytes sent.
    image = tmp_path / "out" / "input.png"
    out = _flywheel("trace", pid, "--model", name, "--image-out", str(image), env=env)
    assert out.returncode == 0, out.stderr
    assert image.read_bytes() == sent[pid]
    text = _one_line(out.stdout)
    for part in (f"prediction {pid}: {name} v{v2}", f"run id {mv.run_id}", f"git commit {manifest.git_commit}",
                 f"archive {manifest.artifact['format']}, sha256 {mar_sha}", "epochs=1",
                 f"deployed dev: {dev['at']} to torchserve {server.cfg.inference_address} (current)",
                 f"written to {image}", f"monitor window dev #2 (v{v2}, 10 predictions)",
                 "no drift" if not second.drift else "drift"):
        assert part in text, (part, out.stdout)

    # A prediction of the first group lies in window 1 (the Python API); an unknown id is one line, exit 2.
    from flywheel.control.trace import trace_prediction

    other = trace_prediction(serving_models.settings(), sorted(first_group)[0], name, caps)
    assert [(w.index, w.p_value) for w in other.windows] == [(1, results[0].p_value)]
    out = _flywheel("trace", "0" * 32, "--model", name, env=env)
    assert out.returncode == 2 and out.stdout == ""
    err = _one_line(out.stderr)
    assert f"no prediction {'0' * 32} of {name} in capture store {caps}" in err and "Traceback" not in out.stderr, err


# --------------------------------------------------------------------------- the window contract
def _record(index: int, first: float, ids: tuple[str, ...], **kw):
    from flywheel.contracts.window import WindowRecord

    values = dict(model="m", env="prod", version="3", monitor="abcd1234", index=index, first_ts=first,
                  last_ts=first + 5.0, tested_at=first + 6.0, size=len(ids), p_value=0.5, p_embedding=0.4,
                  p_prediction=0.9, alpha=0.01, drift=False, trigger=None, accuracy=None, labelled=0,
                  prediction_ids=ids)
    return WindowRecord(**{**values, **kw})


def test_window_records_round_trip_and_are_found_by_time_span(tmp_path):
    from flywheel.contracts.window import WindowRecord, find_windows, list_windows, read_window

    uri = str(tmp_path / "store")
    a = _record(1, 1000.25, ("p1", "p2"))
    b = _record(2, 2000.5, ("p3", "p4"), p_value=0.001, drift=True, trigger="drift")
    c = _record(1, 2001.0, ("p3", "p9"), env="dev", monitor="ffff0000")  # another monitor of the model
    for r in (a, b, c):
        r.write(uri)
    assert len(list_windows(uri, "m")) == 3
    assert read_window(uri, "m", b.name) == b
    assert WindowRecord.from_json(b.to_json()) == b
    assert find_windows(uri, "m", "p3", 2003.0) == [b, c]
    assert find_windows(uri, "m", "p1", 1000.25) == [a]  # the span's edges count
    assert find_windows(uri, "m", "p1", 2003.0) == []  # the wrong time: another window's ids
    a.write(uri)  # a window replayed after a crash: the same object again
    assert len(list_windows(uri, "m")) == 3


@pytest.mark.integration
def test_captures_and_windows_are_found_on_gcs(gcs_env):
    """The same lookups through a real GCS emulator (gs://): the capture record by id, its window."""
    from flywheel.contracts.capture import CaptureWriter
    from flywheel.contracts.window import find_windows
    from flywheel.control.trace import find_capture

    uri = f"gs://{gcs_env.bucket}/trace"
    writer = CaptureWriter(uri, flush_every=4, flush_seconds=0.1)
    for i in range(10):
        writer.submit({"prediction_id": f"id-{i}", "model": "m", "version": "3", "ts": 1000.0 + i,
                       "image_png": b"png-%d" % i, "traffic": "live"})
    writer.close()
    assert writer.written == 10, writer.last_error
    record = find_capture(uri, "m", "id-6")
    assert (record.prediction_id, record.ts, record.image_png) == ("id-6", 1006.0, b"png-6")
    assert find_capture(uri, "m", "id-66") is None
    window = _record(1, 1000.0, tuple(f"id-{i}" for i in range(10)), last_ts=1009.0)
    window.write(uri)
    assert find_windows(uri, "m", "id-6", record.ts) == [window]


@pytest.mark.parametrize("bad, message", [
    (dict(prediction_ids=("p1", "p1")), "2 prediction ids (1 distinct) for a window of 2"),
    (dict(size=3), "2 prediction ids (2 distinct) for a window of 3"),
    (dict(drift=True), "drift=True but p-value 0.5 vs alpha 0.01"),
    (dict(last_ts=999.0), "is after last_ts"),
    (dict(env=""), "env must be a non-empty string"),
])
def test_window_records_that_do_not_verify_are_refused(tmp_path, bad, message):
    from flywheel.contracts.window import WindowRecord, find_windows

    record = _record(1, 1000.0, ("p1", "p2"), **bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        record.verify()
    with pytest.raises(ValueError, match=re.escape(message)):
        WindowRecord.from_json(json.dumps({**json.loads(_record(1, 1000.0, ("p1", "p2")).to_json()), **bad}))
    # A damaged record on the store is named when a trace has to read it, never silently trusted.
    good = _record(1, 1000.0, ("p1", "p2"))
    path = tmp_path / "m" / "windows" / good.name
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**json.loads(good.to_json()), **{k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in bad.items()}}))
    with pytest.raises(ValueError, match=re.escape(f"window record {good.name}")):
        find_windows(str(tmp_path), "m", "p1", 1000.0)


def test_archive_stamp_tags_round_trip_and_refuse_damage(tmp_path):
    from flywheel.contracts.manifest import ArchiveStamp, ChecksumMismatch

    stamp = ArchiveStamp("a" * 64, "onnx", "b" * 64)
    tags = {**stamp.tags(), **stamp.tags("prod"), "deployed_prod_at": "2026-12-01T00:00:00+00:00 torchserve x"}
    assert tags["flywheel.archive.prod.sha256"] == "a" * 64 and tags["flywheel.archive.format"] == "onnx"
    assert ArchiveStamp.from_tags(tags) == ArchiveStamp.from_tags(tags, "prod") == stamp
    assert ArchiveStamp.from_tags(tags, "dev") is None and ArchiveStamp.from_tags({}) is None
    with pytest.raises(ValueError, match="flywheel.archive.sha256 is not a sha256"):
        ArchiveStamp.from_tags({**tags, "flywheel.archive.sha256": "abc"})
    f = tmp_path / "x.mar"
    f.write_bytes(b"not the archive")
    with pytest.raises(ChecksumMismatch):
        stamp.verify(f)


def test_trace_answers_help():
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, ["trace", "--help"])
    assert result.exit_code == 0 and "--image-out" in result.output, result.output
