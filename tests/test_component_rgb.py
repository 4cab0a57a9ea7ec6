"""The second example component (examples/shapes-rgb) the whole way, with real servers only.

`mlflow run examples/shapes-rgb -e train` against the real tracking node (MLflow + Postgres + GCS
emulator) → the gate registers a candidate → `flywheel package` → `flywheel release` to a real
TorchServe that already serves the Fashion-MNIST model (both side by side, the release of one
leaves the other alone) → RGB PNG traffic with capture on → `flywheel monitor --once`: clean traffic
opens no episode, hue-rotated traffic does → the retrain trigger (a local command that records
its payload) names the component's own model, project and commit.

Everything there runs the CLIs a user runs, as subprocesses; nothing imports the component's model.
The component's data generator makes the traffic: held-out images (other seeds than training's).
Two fast tests check the component's own parts: its generator is reproducible and its loader gives
(N, 64, 80, 3) uint8 arrays; labelled captures (decoded at the model's 48x48) join its raw images
for a retrain (`extra_data`).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flywheel.contracts.preprocessing import encode_png
from tests.conftest import REPO, VENV_BIN
from tests.fixtures_serving import MODEL as FASHION

PROJECT = REPO / "examples" / "shapes-rgb"
NAME = "shapes-rgb"
WINDOW = 50


def _component_data():
    """examples/shapes-rgb/data.py, the component's own generator (not a flywheel module)."""
    spec = importlib.util.spec_from_file_location("shapes_rgb_data", PROJECT / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{' '.join(cmd[:4])} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _send(client, model: str, images: np.ndarray, per_request: int = 25) -> list[dict]:
    preds = []
    for i in range(0, len(images), per_request):
        body = {"images": [base64.b64encode(encode_png(img)).decode() for img in images[i:i + per_request]]}
        r = client.predict(model, body)
        assert r.status_code == 200, r.text
        preds += r.json()["predictions"]
    return preds


def _monitor_once(env: dict, cwd: Path, args: list[str]) -> dict:
    out = _run([str(VENV_BIN / "flywheel"), "monitor", "--once", "--json", *args], env, cwd, timeout=300)
    # stdout is the one JSON document, even against an HTTP tracking server (whose end_run prints
    # "View run … at" lines: the CLI sends them to stderr).
    return json.loads(out.stdout)


def _component(monkeypatch, module: str):
    """A module of examples/shapes-rgb imported as its entry point sees it (its directory on sys.path)."""
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(PROJECT))
    for name in ("data", "model", "train"):  # the component's own top-level modules, fresh
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(module)


def test_generated_data_is_reproducible_and_reads_back_as_rgb_arrays(monkeypatch, tmp_path):
    data = _component(monkeypatch, "data")
    data.main(["--out", str(tmp_path / "a"), "--seed", "3", "--n", "24", "--test-n", "8"])
    data.main(["--out", str(tmp_path / "b"), "--seed", "3", "--n", "24", "--test-n", "8"])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 32
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    images, labels, classes = data.load_imagefolder(tmp_path / "a" / "train")
    assert images.shape == (24, 64, 80, 3) and images.dtype == np.uint8
    assert classes == data.CLASS_NAMES and np.bincount(labels).tolist() == [3] * 8
    other = data.make_image(4, "train", 0, 0)  # another seed, another image
    assert not np.array_equal(other, data.make_image(3, "train", 0, 0))


def test_labelled_captures_at_model_size_join_the_raw_training_images(monkeypatch, tmp_path):
    """A capture snapshot holds images decoded at the model's 48x48; the component's own are 80x64."""
    train = _component(monkeypatch, "train")
    data = _component(monkeypatch, "data")
    data.generate(tmp_path / "data", seed=0, n=40, test_n=16)
    snapshot = tmp_path / "snapshot"
    for i, name in enumerate(data.CLASS_NAMES):
        (snapshot / name).mkdir(parents=True)
        (snapshot / name / "c.png").write_bytes(encode_png(data.make_image(9, "test", i, i)[8:56, 16:64]))
    base = train.load_splits(tmp_path / "data", seed=0)
    splits = train.load_splits(tmp_path / "data", seed=0, extra=(snapshot,))
    assert splits.train.images.shape == (len(base.train) + 8, 48, 48, 3)
    assert splits.train.labels[-8:].tolist() == list(range(8))
    assert splits.test.images.shape == (16, 64, 80, 3)  # the frozen test set stays as generated
    assert splits.digest != base.digest


@pytest.mark.integration
@pytest.mark.reliability
def test_rgb_component_trains_serves_beside_fashion_and_triggers_its_own_retrain(tracking_stack, serving_models,
                                                                                  tmp_path):
    import mlflow

    from flywheel.core.data import load_test_split
    from flywheel.core.models import load_spec
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    env = {**os.environ, **tracking_stack.env(), "FLYWHEEL_MODEL_NAME": NAME,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    for var in ("FLYWHEEL_PROJECT", "FLYWHEEL_PROJECT_DIR"):  # the project is the one `mlflow run` was given
        env.pop(var, None)

    # 1. Train the component exactly as a training node does: its own MLproject, one short epoch.
    _run([str(VENV_BIN / "mlflow"), "run", str(PROJECT), "-e", "train", "--env-manager", "local",
          "--experiment-name", NAME, "-P", "epochs=1", "-P", "n=4000", "-P", "test_n=400",
          "-P", f"data_dir={tmp_path / 'data'}"], env, tmp_path)
    tracking_stack.settings(model_name=NAME).apply()
    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias(NAME, "candidate")  # the gate registered it
    run = client.get_run(mv.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] >= 0.85
    assert run.data.params["epochs"] == "1"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert run.data.tags["git_commit"] == commit
    assert mv.tags["git_commit"] == commit  # lineage copied onto the version
    spec = load_spec(f"models:/{NAME}/{mv.version}")
    pre = spec.preprocess
    assert (pre.channels, pre.height, pre.width, pre.resize) == (3, 48, 48, "crop")
    assert len(pre.mean) == len(pre.std) == 3
    assert spec.embedding.source == "layer" and spec.embedding.layer == "embed" and spec.embedding.dim == 64
    assert len(spec.class_names) == 8 and spec.test_set.n == 400
    project = Path(run.data.tags["flywheel.project"]) / run.data.tags["flywheel.project_dir"]
    assert project.resolve() == PROJECT.resolve()

    # 2. Package: TorchScript + ONNX from the registry alone, parity-checked, into the server's store.
    store = tmp_path / "model-store"
    store.mkdir()
    _run([str(VENV_BIN / "flywheel"), "package", "--model", NAME, "--version", str(mv.version), "--out", str(store)],
         env, tmp_path)
    mar = store / f"{NAME}-{mv.version}.mar"
    assert mar.is_file()

    # 3. A TorchServe already serving Fashion-MNIST (its own registry's archive), capturing traffic.
    fashion_mar = serving_models.mars[serving_models.versions[0]]
    shutil.copy(fashion_mar, store / fashion_mar.name)
    captures = tmp_path / "captures"
    cfg = ServeConfig.local(tmp_path / "server", store, models=(f"{FASHION}={fashion_mar.name}",))
    server = start_torchserve(cfg, env={"FLYWHEEL_CAPTURE_URI": str(captures)})
    try:
        ts = server.client()
        ts.wait_ready(FASHION)
        fashion_images = load_test_split("fashion-mnist")[0].images[:50]
        fashion_versions = ts.versions(FASHION)
        before = [p["label_index"] for p in _send(ts, FASHION, fashion_images)]

        # 4. Release the component next to it (acceptance on its own labelled test set).
        _run([str(VENV_BIN / "flywheel"), "release", "--model", NAME, "--version", str(mv.version), "--env", "dev",
              "--endpoint", cfg.inference_address, "--management-url", cfg.management_address,
              "--key-file", str(server.key_file), "--model-store", str(store), "--mar", str(mar),
              "--grace", "0"], env, tmp_path, timeout=600)
        assert str(client.get_model_version_by_alias(NAME, "dev").version) == str(mv.version)
        served = {m["modelName"] for m in ts.list_models().json()["models"]}
        assert {FASHION, NAME} <= served
        # The Fashion-MNIST model answers as before: the release of one model never touches another.
        assert ts.versions(FASHION) == fashion_versions
        assert [p["label_index"] for p in _send(ts, FASHION, fashion_images)] == before

        # 5. RGB traffic: raw 80x64 PNGs from held-out generator seeds; the server centre-crops them.
        data = _component_data()
        n = 4 * WINDOW
        labels = np.arange(n) % len(data.CLASS_NAMES)
        clean = np.stack([data.make_image(101, "test", i, int(y)) for i, y in enumerate(labels)])
        shifted = _rotate_hue(np.stack([data.make_image(102, "test", i, int(y)) for i, y in enumerate(labels)]))
        assert clean.shape == (n, 64, 80, 3)

        state = tmp_path / "monitor"
        payload_file = tmp_path / "payload.json"
        monitor_args = ["--model", NAME, "--env", "dev", "--capture-uri", str(captures), "--state-dir", str(state),
                        "--window", str(WINDOW), "--consecutive", "2", "--snapshot-dir", str(tmp_path / "snaps"),
                        "--local-command", f"sh -c 'printenv FLYWHEEL_RETRAIN_PAYLOAD > {payload_file}'"]
        first = _monitor_once(env, tmp_path, [*monitor_args, "--from-now"])  # only this test's traffic counts
        assert first["windows"] == []

        preds = _send(ts, NAME, clean)
        names = [data.CLASS_NAMES[y] for y in labels]
        accuracy = np.mean([p["label"] == name for p, name in zip(preds, names, strict=True)])
        assert accuracy >= 0.8, accuracy  # the served model is the trained one, preprocessing included
        _send(ts, FASHION, fashion_images)  # the other model's traffic is captured apart, never mixed in
        clean_tick = _wait_windows(env, tmp_path, monitor_args, n // WINDOW)
        # 4 windows of this model's 200 predictions: the 50 Fashion-MNIST ones are another model's captures
        assert len(clean_tick) == n // WINDOW
        assert all(w["version"] == str(mv.version) and w["size"] == WINDOW for w in clean_tick)
        assert not any(w["trigger"] for w in clean_tick) and not payload_file.exists()

        # 6. Hue-rotated traffic: drift windows, and the retrain trigger fires with its own project.
        _send(ts, NAME, shifted)
        shifted_tick = _wait_windows(env, tmp_path, monitor_args, n // WINDOW)
        assert sum(w["drift"] for w in shifted_tick) >= 2, [w["p_value"] for w in shifted_tick]
        assert len(shifted_tick) == n // WINDOW
        assert [w["trigger"] for w in shifted_tick if w["trigger"]] == ["drift"]
    finally:
        server.stop()

    payload = json.loads(payload_file.read_text())
    assert payload["reason"] == "drift" and payload["env"] == "dev"
    assert payload["model"] == NAME and payload["version"] == str(mv.version)
    assert (Path(payload["project"]) / payload["project_dir"]).resolve() == PROJECT.resolve()
    assert payload["commit"] == commit


def _rotate_hue(images: np.ndarray, turn: int = 64) -> np.ndarray:
    """Every pixel's hue turned by `turn`/256 of a circle (90 degrees): red and orange shapes become
    yellow-green, cyan and blue ones violet, colours the training data never had. (Inverting the
    colours would not do: it maps warm shapes onto cool ones, in-distribution images of another class.)"""
    from PIL import Image

    out = []
    for img in images:
        hsv = np.asarray(Image.fromarray(img, mode="RGB").convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + turn) % 256).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB")))
    return np.stack(out)


def _wait_windows(env: dict, cwd: Path, args: list[str], expected: int, attempts: int = 60) -> list[dict]:
    """`flywheel monitor --once` until `expected` windows were tested (captures land asynchronously)."""
    import time

    windows: list[dict] = []
    for _ in range(attempts):
        windows += _monitor_once(env, cwd, args)["windows"]
        if len(windows) >= expected:
            return windows
        time.sleep(1)
    raise AssertionError(f"only {len(windows)} of {expected} monitor windows after {attempts} passes")
