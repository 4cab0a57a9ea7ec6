"""The monitor per version, from several replicas, with the accuracy alarm on feedback labels.

The integration test runs real TorchServe replicas (the real handler and capture writer) that all
serve two versions of one model (A/B at /predictions/M/V) into one capture store, and the real
`flywheel monitor --once` on it: each version has windows, MLflow run, metrics and window records
of its own, every served prediction is read exactly once, and feedback labels that are wrong for a
share of one version's predictions raise that version's accuracy alarm (and its retrain, when the
version is the alias's) while true labels raise none. The fast tests check the window contract's
new fields and the state of an older flywheel.
"""

from __future__ import annotations

import json

import pytest


def _record(**kw):
    from flywheel.contracts.window import WindowRecord

    values = dict(model="m", env="prod", version="3", monitor="abcd1234", index=1, first_ts=1000.0, last_ts=1005.0,
                  tested_at=1006.0, size=2, p_value=0.5, p_embedding=0.4, p_prediction=0.9, alpha=0.01, drift=False,
                  trigger=None, accuracy=0.5, labelled=2, prediction_ids=("p1", "p2"))
    return WindowRecord(**{**values, **kw})


def test_window_record_accuracy_fields_verify_and_older_records_read():
    from flywheel.contracts.window import WindowRecord

    alarmed = _record(reference_accuracy=0.9, p_accuracy=0.001, accuracy_alarm=True)
    assert WindowRecord.from_json(alarmed.to_json()) == alarmed
    older = json.loads(_record().to_json())
    for key in ("reference_accuracy", "p_accuracy", "accuracy_alarm"):
        del older[key]  # written before the accuracy alarm existed
    back = WindowRecord.from_json(json.dumps(older))
    assert back.p_accuracy is None and back.accuracy_alarm is False
    with pytest.raises(ValueError, match="accuracy_alarm=True but accuracy p-value 0.5 vs alpha 0.01"):
        _record(reference_accuracy=0.9, p_accuracy=0.5, accuracy_alarm=True).verify()
    with pytest.raises(ValueError, match="accuracy_alarm=True but accuracy p-value None"):
        _record(accuracy_alarm=True).verify()
    with pytest.raises(ValueError, match="reference_accuracy 1.5 is not a fraction"):
        _record(reference_accuracy=1.5).verify()



def test_state_of_an_older_flywheel_becomes_the_alias_versions_track(tmp_path):
    """An older state (one version's windows, run and partial window in pending.npz) loads as that
    version's track; written back, every version's partial window is kept under its own name."""
    import numpy as np

    from flywheel.core.config import Settings
    from flywheel.monitoring.service import Monitor, MonitorConfig

    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(json.dumps({"version": "3", "cursor": "0001700000000000000", "windows": 7,
                                                  "run_id": "r3", "labelled_total": 5, "last_capture_ts": 1.0,
                                                  "pending_file": None, "journal": [], "instance": "ab" * 16}))
    old = {"emb": np.ones((4, 8), np.float32), "pred": np.arange(4), "ts": np.arange(4.0),
           "ids": np.asarray(["a", "b", "c", "d"], dtype="<U64")}
    np.savez(state / "pending.npz", **old)
    mon = Monitor(MonitorConfig(model="m", capture_uri=str(tmp_path / "caps"), state_dir=state), Settings.from_env())
    assert mon.state.tracks == {"3": {"windows": 7, "run_id": "r3"}}
    pending = mon._load_pending()
    assert list(pending) == ["3"] and (pending["3"]["ids"] == old["ids"]).all()
    canary = {"emb": np.zeros((2, 16), np.float32), "pred": np.zeros(2, np.int64), "ts": np.zeros(2),
              "ids": np.asarray(["x", "y"], dtype="<U64")}  # another version, another embedding dimension
    mon._track_state("4")["windows"] = 2
    mon._commit({**pending, "4": canary})
    again = Monitor(MonitorConfig(model="m", capture_uri=str(tmp_path / "caps"), state_dir=state), Settings.from_env())
    back = again._load_pending()
    assert back["3"]["emb"].shape == (4, 8) and back["4"]["emb"].shape == (2, 16)
    assert list(back["4"]["ids"]) == ["x", "y"]
    written = json.loads((state / "state.json").read_text())
    assert (written["windows"], written["run_id"]) == (7, "r3")  # the alias's version's, where older readers look
    assert written["tracks"]["4"] == {"windows": 2, "run_id": None}
    assert sorted(f.name for f in state.glob("pending*")) == [written["pending_file"]]

# ------------------------------------------------------------------------ replicas, A/B, accuracy
REPLICAS = 3
WINDOW = 50
PER_VERSION = 150  # 3 windows of each version in the first pass
WRONG_SHARE = 0.5  # of v2's feedback labels


def _flywheel(*args: str, env: dict, timeout: float = 300):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    full = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}
    out = subprocess.run([sys.executable, "-m", "flywheel", *args], capture_output=True, text=True, timeout=timeout,
                         env=full, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"flywheel {' '.join(args[:2])} exited {out.returncode}:\n{out.stdout[-2000:]}\n" \
                                f"{out.stderr[-3000:]}"
    return out


def _serve(clients, name, version, images, per_request=10) -> list[dict]:
    """`images` through the replicas in turn at /predictions/NAME/VERSION; the answers in order."""
    import base64

    from flywheel.contracts.preprocessing import encode_png

    answers = []
    for n, i in enumerate(range(0, len(images), per_request)):
        body = {"images": [base64.b64encode(encode_png(img)).decode() for img in images[i:i + per_request]]}
        r = clients[n % len(clients)].predict(name, body, version=version)
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    assert {a["version"] for a in answers} == {version}
    return answers


def _labels(answers, truth, class_names, wrong_share, rng) -> list[str]:
    """PREDICTION_ID=LABEL pairs: the true class, or for `wrong_share` of them a class that is neither
    the true one nor the one predicted (so the model counts as wrong there, whatever it answered)."""
    pairs = []
    wrong = set(rng.permutation(len(answers))[:int(round(wrong_share * len(answers)))].tolist())
    for i, (a, t) in enumerate(zip(answers, truth, strict=True)):
        label = class_names[t]
        if i in wrong:
            label = next(c for c in rng.permutation(class_names) if c not in (label, a["label"]))
        pairs.append(f"{a['prediction_id']}={label}")
    return pairs


def _wait_stored(uri, name, ids, timeout=90.0):
    import time

    from flywheel.contracts.capture import iter_captures

    deadline = time.monotonic() + timeout
    while True:
        stored = [c.prediction_id for c in iter_captures(uri, name)]
        if set(ids) <= set(stored) or time.monotonic() > deadline:
            return stored
        time.sleep(0.5)


@pytest.mark.integration
def test_replicas_serving_two_versions_are_monitored_per_version_with_an_accuracy_alarm(serving_models, gcs_env,
                                                                                         tmp_path):
    import time
    from collections import Counter

    import mlflow
    import numpy as np
    from prometheus_client import generate_latest

    from flywheel.contracts.capture import key_time, list_batches, read_writer_stats
    from flywheel.contracts.window import list_windows, read_window
    from flywheel.core.data import load_splits
    from flywheel.monitoring.service import Monitor, MonitorConfig
    from flywheel.monitoring.triggers import LocalCommand, PolicyConfig
    from tests.fixtures_monitor import start_capturing_torchserve

    name = serving_models.name
    v1, v2 = serving_models.versions[:2]
    caps = f"gs://{gcs_env.bucket}/ab-{time.time_ns()}"
    emulator = {"STORAGE_EMULATOR_HOST": gcs_env.host}
    settings = serving_models.settings()
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "monitored-ab", v1)
    splits = load_splits("fashion-mnist", data_dir=settings.data_dir)
    test, names = splits.test, list(splits.class_names)
    order = np.random.default_rng(11).permutation(len(test))
    rng = np.random.default_rng(5)
    servers = []
    try:
        for i in range(REPLICAS):  # N replicas of one model, each serving v1 and v2, one capture store
            server = start_capturing_torchserve(serving_models, tmp_path / f"replica{i}", caps, env=emulator)
            servers.append(server)
            mgmt = server.client()
            r = mgmt.register(serving_models.mars[v2].name)
            assert r.status_code == 200, r.text
            mgmt.wait_ready(name, v2)
        clients = [s.client() for s in servers]

        # -- pass 1: v1 (the alias's) and v2 (the canary) side by side; v2's feedback is wrong for half
        pick = {v1: order[:PER_VERSION], v2: order[PER_VERSION:2 * PER_VERSION]}
        answers = {v: _serve(clients, name, v, test.images[pick[v]]) for v in (v1, v2)}
        home = {"MLFLOW_TRACKING_URI": settings.tracking_uri, "FLYWHEEL_HOME": str(tmp_path / "home"), **emulator}
        for v, share in ((v1, 0.0), (v2, WRONG_SHARE)):
            _flywheel("data", "feedback", "--model", name, "--capture-uri", caps,
                      *_labels(answers[v], test.labels[pick[v]], names, share, rng), env=home)
        served = [a["prediction_id"] for v in (v1, v2) for a in answers[v]]
        stored = _wait_stored(caps, name, served)
        assert Counter(stored) == Counter(served)  # every prediction stored once, whichever replica served it
        batches = list_batches(caps, name)
        writers = {b.split("-")[1] for b in batches}
        stats = read_writer_stats(caps, name)
        assert len(writers) == 2 * REPLICAS  # one writer per worker process (a version's on each replica)
        assert {s["writer"] for s in stats} >= writers and sum(s["dropped"] for s in stats) == 0
        time.sleep(max(0.0, key_time(max(batches)) + 2.5 - time.time()))  # past the monitor's 2 s settle time

        payloads = tmp_path / "retrain"
        state = tmp_path / "state"
        args = ["monitor", "--once", "--json", "--model", name, "--env", "monitored-ab", "--capture-uri", caps,
                "--state-dir", str(state), "--window", str(WINDOW), "--accuracy-consecutive", "2",
                "--local-command", f"sh -c 'mkdir -p {payloads} && printf %s \"$FLYWHEEL_RETRAIN_PAYLOAD\" > "
                                   f"{payloads}/{{event_id}}.json'"]
        doc = json.loads(_flywheel(*args, env=home).stdout)
        read = doc["read"]
        assert read["read"] == 2 * PER_VERSION and read["other_version"] == 0 and read["malformed"] == 0
        assert (read["version"], read["monitored"], read["windows"], read["pending"]) == (v1, PER_VERSION, 3, 0)
        assert read["versions"] == {v2: {"monitored": PER_VERSION, "pending": 0, "windows": 3}}
        by_version = {v: [w for w in doc["windows"] if w["version"] == v] for v in (v1, v2)}
        for v, windows in by_version.items():
            assert [w["index"] for w in windows] == [1, 2, 3] and all(w["size"] == WINDOW for w in windows)
            assert all(w["labelled"] == WINDOW for w in windows)
            assert all(w["reference_accuracy"] == pytest.approx(serving_models.accuracy[v]) for w in windows)
            assert all(w["primary"] == (v == v1) for w in windows)
        # true labels: the live accuracy is the reference's; half of them wrong: far below it, alarm
        assert not any(w["accuracy_alarm"] for w in by_version[v1]), by_version[v1]
        assert all(w["accuracy_alarm"] and w["p_accuracy"] < 0.01 for w in by_version[v2]), by_version[v2]
        assert all(w["trigger"] is None for w in doc["windows"])  # the canary's alarm is reported, never a retrain
        assert not payloads.exists()
        records = [read_window(caps, name, n) for n in list_windows(caps, name)]
        assert Counter(r.version for r in records) == {v1: 3, v2: 3}
        assert {r.accuracy_alarm for r in records if r.version == v2} == {True}
        assert sorted(p for r in records for p in r.prediction_ids) == sorted(served)  # each prediction in one window
        st = json.loads((state / "state.json").read_text())
        runs = {v: st["tracks"][v]["run_id"] for v in (v1, v2)}
        assert st["run_id"] == runs[v1] and runs[v1] != runs[v2]  # one MLflow run per version
        for v, run_id in runs.items():
            run = client.get_run(run_id)
            assert run.data.tags["version"] == v and run.info.status == "FINISHED"
            alarms = client.get_metric_history(run_id, "accuracy_alarm")
            assert sorted((m.step, m.value) for m in alarms) == [(i, float(v == v2)) for i in (1, 2, 3)]

        # -- pass 2: the canary is promoted (the alias moves to v2); its alarms now fire a retrain
        client.set_registered_model_alias(name, "monitored-ab", v2)
        more = {v1: order[300:300 + WINDOW], v2: order[400:400 + 2 * WINDOW]}
        answers = {v: _serve(clients, name, v, test.images[more[v]]) for v in (v1, v2)}
        for v, share in ((v1, 0.0), (v2, WRONG_SHARE)):
            _flywheel("data", "feedback", "--model", name, "--capture-uri", caps,
                      *_labels(answers[v], test.labels[more[v]], names, share, rng), env=home)
        served2 = [a["prediction_id"] for v in (v1, v2) for a in answers[v]]
        _wait_stored(caps, name, served2)
        time.sleep(2.5)
        mon = Monitor(MonitorConfig(model=name, capture_uri=caps, env="monitored-ab", state_dir=state, window=WINDOW),
                      settings, [LocalCommand(f"sh -c 'mkdir -p {payloads} && printf %s \"$FLYWHEEL_RETRAIN_PAYLOAD\""
                                              f" > {payloads}/{{event_id}}.json'")],
                      PolicyConfig(consecutive=3, accuracy_consecutive=2))
        try:
            results = mon.tick()
        finally:
            mon.close()
        assert [(r.version, r.index, r.primary) for r in results] == [(v2, 4, True), (v2, 5, True), (v1, 4, False)]
        assert [r.trigger for r in results] == [None, "accuracy", None]
        (payload,) = [json.loads(p.read_text()) for p in payloads.iterdir()]
        assert payload["reason"] == "accuracy" and payload["version"] == v2 and payload["model"] == name
        assert payload["details"]["p_accuracy"] < 0.01 and payload["details"]["window"] == 5
        assert mon.state.run_id == runs[v2]  # the promoted version goes on in its own run
        text = generate_latest(mon.metrics.registry).decode()
        lab = f'env="monitored-ab",model="{name}"'
        assert f"flywheel_accuracy_alarm{{{lab}}} 1.0" in text
        assert f'flywheel_retrain_triggers_total{{{lab},reason="accuracy"}} 1.0' in text
        assert f'flywheel_version_accuracy_alarm{{{lab},version="{v1}"}} 0.0' in text
        assert f'flywheel_version_accuracy_alarm{{{lab},version="{v2}"}} 1.0' in text
        assert f'flywheel_version_windows_total{{{lab},version="{v2}"}} 2.0' in text
        assert f"flywheel_drift_windows_total{{{lab}}} 2.0" in text  # the alias's version's windows only
        assert f'flywheel_reference_accuracy{{{lab}}} {serving_models.accuracy[v2]}' in text
    finally:
        for server in servers:
            server.stop()

