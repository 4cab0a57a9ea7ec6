"""Triton as the second engine (issue 17), with real `tritonserver` processes from the nvidia-pytriton
wheel behind the real authenticating proxy, on free loopback ports, stopped by process group.

The registry versions are the session's `serving_models` (v1, v2 good; v3 fails acceptance), packaged
once more here as Triton version folders. Only the Python-backend configuration runs (the wheel has
no onnxruntime or TensorRT backend); the onnxruntime_onnx configuration is checked as text.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration


def _fashion_test():
    from flywheel.core.data import load_splits

    return load_splits("fashion-mnist").test


def _png(image) -> bytes:
    from flywheel.contracts.preprocessing import encode_png

    return encode_png(image)


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.fixture(scope="session")
def triton_repository(serving_models, tmp_path_factory) -> Path:
    """All three registry versions packaged by `package_triton` into one repository (copied per server)."""
    from flywheel.serving.package import PackageConfig, package_triton

    settings = serving_models.settings()
    repo = tmp_path_factory.mktemp("triton") / "repository"
    for version in serving_models.versions:
        package_triton(PackageConfig(serving_models.name, version=version), settings, repo)
    return repo


def _server(repository: Path, tmp_path: Path, model: str | None = None, serve: tuple[str, ...] = (), **env):
    """A Triton + proxy on a copy of `repository`, serving versions `serve` of `model` from the start."""
    from flywheel.serving.triton import TritonServeConfig, set_versions, start_triton

    repo = tmp_path / "repository"
    shutil.copytree(repository, repo)
    models = ()
    if model:
        set_versions(repo / model / "config.pbtxt", list(serve))
        models = (model,)
    cfg = TritonServeConfig.local(tmp_path / "server", repo, models=models)
    return start_triton(cfg, env=env)


@pytest.fixture(scope="module")
def triton_v1(triton_repository, serving_models, tmp_path_factory):
    """Triton serving v1 through its proxy, capturing into a directory of its own."""
    root = tmp_path_factory.mktemp("triton-v1")
    server = _server(triton_repository, root, serving_models.name, (serving_models.versions[0],),
                     FLYWHEEL_CAPTURE_URI=str(root / "captures"))
    try:
        yield server, root / "captures"
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- repository
def test_repository_layout_and_configs(triton_repository, serving_models):
    from flywheel.contracts.manifest import Manifest
    from flywheel.serving import TRITON_CONTRACTS
    from flywheel.serving.triton import served_versions

    name = serving_models.name
    versions = serving_models.versions
    assert sorted(p.name for p in triton_repository.iterdir()) == sorted([name, f"{name}-onnx"])  # no TensorRT here
    for model in (name, f"{name}-onnx"):
        assert sorted((p.name for p in (triton_repository / model).iterdir() if p.is_dir()), key=int) == list(versions)
        assert served_versions(triton_repository / model / "config.pbtxt") == list(versions)
    v1 = triton_repository / name / versions[0]
    assert sorted(p.name for p in v1.iterdir()) == sorted(["model.py", "model.onnx", "flywheel_manifest.json",
                                                           *TRITON_CONTRACTS])
    manifest = Manifest.read(v1)
    manifest.verify(v1)
    assert manifest.model_version == versions[0] and manifest.artifact["format"] == "onnx"
    assert manifest.run_id == serving_models.manifests[versions[0]]["run_id"]
    assert (triton_repository / f"{name}-onnx" / versions[0] / "model.onnx").read_bytes() == (v1 / "model.onnx").read_bytes()

    py = (triton_repository / name / "config.pbtxt").read_text()
    assert f'name: "{name}"' in py and 'backend: "python"' in py and "max_batch_size: 64" in py
    assert "dynamic_batching { max_queue_delay_microseconds: 1000 }" in py
    assert '{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }' in py
    classes = len(manifest.class_names)
    assert f'{{ name: "probabilities" data_type: TYPE_FP32 dims: [ {classes} ] }}' in py
    for out in ("label", "prediction_id", "version", "prediction"):
        assert f'{{ name: "{out}" data_type: TYPE_STRING dims: [ 1 ] }}' in py
    assert "version_policy: { specific: { versions: [ 1, 2, 3 ] } }" in py
    assert 'parameters { key: "top_k" value: { string_value: "3" } }' in py

    onnx = (triton_repository / f"{name}-onnx" / "config.pbtxt").read_text()
    c, h, w = manifest.preprocess["channels"], manifest.preprocess["height"], manifest.preprocess["width"]
    assert 'platform: "onnxruntime_onnx"' in onnx and "KIND_GPU" in onnx
    assert f'{{ name: "images" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }}' in onnx
    assert f'{{ name: "logits" data_type: TYPE_FP32 dims: [ {classes} ] }}' in onnx
    assert f'{{ name: "embedding" data_type: TYPE_FP32 dims: [ {manifest.embedding_dim} ] }}' in onnx


def test_staged_model_imports_with_flywheel_unimportable(triton_repository, serving_models):
    """model.py and its contracts import from the version folder alone, as the Python backend's stub
    runs them (an isolated interpreter in which any `flywheel` import fails)."""
    from flywheel.serving.triton import wheel_paths

    _, _, root = wheel_paths()
    folder = triton_repository / serving_models.name / serving_models.versions[0]
    code = """
import importlib.abc, importlib.util, json, sys
class NoFlywheel(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flywheel" or name.startswith("flywheel."):
            raise ImportError(f"{name} is not in the repository")
sys.meta_path.insert(0, NoFlywheel())
sys.path.append(sys.argv[2])  # triton_python_backend_utils, as the stub provides it
spec = importlib.util.spec_from_file_location("model", sys.argv[1] + "/model.py")
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)
print(json.dumps({"pp": model._pp.__file__, "flywheel": [m for m in sys.modules if m.startswith("flywheel")]}))
"""
    # -B: no __pycache__ written into the session's shared repository (the layout test lists its folders)
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", code, str(folder), str(root / "backends" / "python")],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"pp": str(folder / "preprocessing.py"), "flywheel": []}


# ------------------------------------------------------------------------------------ auth, ports
def test_nothing_answers_without_the_key_and_triton_is_loopback_only(triton_v1, serving_models):
    server, _ = triton_v1
    url, name, v1 = server.url, serving_models.name, serving_models.versions[0]
    png = _png(_fashion_test().images[0])
    for method, path in (("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", f"/v2/models/{name}"),
                         ("POST", f"/v2/models/{name}/infer"), ("POST", f"/v2/models/{name}/versions/{v1}/infer"),
                         ("POST", "/v2/repository/index"), ("POST", f"/v2/repository/models/{name}/unload"),
                         ("GET", "/metrics"), ("PUT", f"/flywheel/models/{name}/default"), ("POST", "/token")):
        for auth in (None, "Bearer not-the-key", "Basic abc"):
            r = requests.request(method, url + path, headers={"Authorization": auth} if auth else {}, data=png,
                                 timeout=30)
            assert r.status_code == 401, (method, path, auth, r.status_code, r.text[:200])
            assert r.json()["code"] == 401 and "authentication failed" in r.json()["error"]
    keys = json.loads(server.key_file.read_text())
    assert oct(server.key_file.stat().st_mode & 0o777) == "0o600"
    inference = {"Authorization": f"Bearer {keys['inference']['key']}"}
    # The inference key does not open the model-control API; the management key does.
    r = requests.post(f"{url}/v2/repository/models/{name}/unload", headers=inference, timeout=30)
    assert r.status_code == 401
    assert server.client().model_ready(name, v1)
    # Triton's own ports listen on 127.0.0.1 only: not on this host's other addresses.
    cfg = server.cfg
    ports = (cfg.http_port, cfg.grpc_port, cfg.metrics_port)
    listening = _listening_addresses(ports)
    assert listening and set(listening.values()) == {"127.0.0.1"}, listening
    assert set(listening) == set(ports)


def _listening_addresses(ports: tuple[int, ...]) -> dict[int, str]:
    """{port: local IPv4 address} of the listening TCP sockets on `ports` (from /proc/net/tcp{,6}; an
    IPv4-mapped IPv6 address such as gRPC's ::ffff:127.0.0.1 is given as its IPv4 address)."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:  # 0A: LISTEN
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))  # host-order words
                ip = ipaddress.ip_address(raw)
                ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
                found[int(port, 16)] = str(ip)
    return found


def test_keys_renew_through_the_token_api(triton_v1, serving_models):
    """The proxy speaks TorchServe's token API, so serving/keys.py's renewer works for Triton unchanged."""
    from flywheel.serving.keys import KeyRenewer, read_keys

    server, _ = triton_v1
    before = read_keys(server.key_file)
    KeyRenewer(server.url, server.key_file).renew("inference")
    after = read_keys(server.key_file)
    assert after["inference"] != before["inference"] and after["management"] == before["management"]
    stale = requests.get(f"{server.url}/v2/health/ready", headers={"Authorization": f"Bearer {before['inference']}"},
                         timeout=30)
    assert stale.status_code == 401
    assert server.client().ready().status_code == 200  # the client reads the new key


# ------------------------------------------------------------------------------------- inference
def test_predictions_equal_onnxruntime_and_torchserve(triton_v1, torchserve_server, serving_models, triton_repository):
    """Held images: Triton's probabilities equal ONNX Runtime's on the same file within the parity
    tolerance, and its answers equal TorchServe's for the same registry version."""
    import onnxruntime as ort

    from flywheel.contracts.manifest import Manifest
    from flywheel.contracts.preprocessing import PreprocessSpec, to_array
    from flywheel.serving.package import PARITY_TOL
    from flywheel.serving.triton import decode_outputs

    server, _ = triton_v1
    name, v1 = serving_models.name, serving_models.versions[0]
    assert torchserve_server.version == v1
    folder = triton_repository / name / v1
    manifest = Manifest.read(folder)
    images = _fashion_test().images[200:216]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": to_array(images, PreprocessSpec.from_dict(manifest.preprocess))})[0]
    z = np.exp(logits - logits.max(1, keepdims=True))
    expected = z / z.sum(1, keepdims=True)

    client = server.client()
    r = client.infer(name, [_png(im) for im in images], version=v1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == name and body["model_version"] == v1
    out = decode_outputs(body)
    probs = np.asarray(out["probabilities"], np.float32).reshape(len(images), -1)
    assert np.abs(probs - expected).max() <= PARITY_TOL
    assert out["label_index"] == [int(p.argmax()) for p in expected]
    assert out["version"] == [v1] * len(images) and len(set(out["prediction_id"])) == len(images)

    for image in images[:6]:
        ts = torchserve_server.client.predict(name, _png(image)).json()
        tr = client.predict(name, _png(image))
        assert tr.status_code == 200, tr.text
        got = tr.json()
        assert set(got) == set(ts)  # the same fields as the TorchServe handler's answer
        assert got["label"] == ts["label"] and got["version"] == ts["version"] == v1
        assert abs(got["confidence"] - ts["confidence"]) <= PARITY_TOL
        assert [k["index"] for k in got["top_k"]] == [k["index"] for k in ts["top_k"]]
    many = client.predict(name, {"images": [base64.b64encode(_png(im)).decode() for im in images[:4]], "top_k": 1})
    assert many.status_code == 200 and [p["label_index"] for p in many.json()["predictions"]] == out["label_index"][:4]
    assert all(len(p["top_k"]) == 1 for p in many.json()["predictions"])


def test_bad_input_gets_4xx_json_and_the_model_keeps_serving(triton_v1, serving_models):
    from PIL import Image

    server, _ = triton_v1
    name = serving_models.name
    client = server.client()
    good = _png(_fashion_test().images[7])
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, format="PNG")
    cases = {"random bytes": [b"not an image at all"], "empty": [b""], "truncated png": [good[:40]],
             "one bad of two": [good, b"\x89PNG broken"], "too many pixels": [huge.getvalue()],
             "too many images": [good] * 65}
    for kind, images in cases.items():
        r = client.infer(name, images)
        assert r.status_code == 400, (kind, r.status_code, r.text[:300])
        assert r.json()["error"], kind
    r = client.infer(name, [good], parameters={"top_k": 99})
    assert r.status_code == 400 and "top_k" in r.json()["error"]
    # Malformed KServe requests (Triton itself answers 500) and bodies over the limit are the proxy's 400 / 413.
    for body, length in ((b"{", None), (b"[1, 2]", None), (b'{"inputs": 1}', None), (b"{}xyz", "99"), (b"{", "1")):
        r = client._call("inference", "POST", f"/v2/models/{name}/infer", data=body,
                         headers={"Inference-Header-Content-Length": length} if length else {})
        assert r.status_code == 400 and r.json()["code"] == 400, (body, r.status_code, r.text[:200])
    big = client.infer(name, [good + bytes(9 * 1024 * 1024)])
    assert big.status_code == 413 and big.json()["code"] == 413
    assert client.predict(name, good).status_code == 200


# --------------------------------------------------------------------------------------- release
def test_release_ab_rollback_and_capture(triton_repository, serving_models, tmp_path):
    """Release v1 then v2 (A/B: both loaded, default moves, alias moves); v3 fails acceptance and is
    rolled back (never loaded afterwards, default and alias unchanged); every prediction is captured
    in the capture contract's format, release traffic marked, clients' traffic live."""
    from mlflow import MlflowClient

    from flywheel.contracts.capture import LIVE, iter_captures
    from flywheel.serving.release import AcceptanceConfig, ReleaseFailed, TritonTarget, triton_release
    from flywheel.serving.triton import served_versions

    name = serving_models.name
    v1, v2, v3 = serving_models.versions
    acc = serving_models.accuracy
    threshold = (min(acc[v1], acc[v2]) + acc[v3]) / 2
    settings = serving_models.settings()
    captures = tmp_path / "captures"
    server = _server(triton_repository, tmp_path, FLYWHEEL_CAPTURE_URI=str(captures))
    try:
        target = TritonTarget(server.url, server.key_file, server.cfg.repository, grace_s=0.5, keep_previous=1)
        accept = AcceptanceConfig(min_accuracy=threshold, p95_slo_ms=3000, accuracy_samples=96, latency_requests=20)
        first = triton_release(settings, name, v1, "dev", target, accept)
        assert first.switched and first.previous is None and first.report.passed
        endpoint = target.client()
        assert endpoint.versions(name) == {v1: True}
        png = _png(_fashion_test().images[3])
        assert endpoint.predict(name, png).json()["version"] == v1

        second = triton_release(settings, name, v2, "dev", target, accept)
        assert second.switched and second.previous == v1 and second.report.passed
        assert endpoint.versions(name) == {v1: False, v2: True}  # A/B: v1 kept (keep_previous=1)
        assert served_versions(server.cfg.repository / name / "config.pbtxt") == [v1, v2]
        assert endpoint.predict(name, png).json()["version"] == v2
        assert endpoint.predict(name, png, version=v1).json()["version"] == v1

        with pytest.raises(ReleaseFailed) as failed:
            triton_release(settings, name, v3, "dev", target, accept)
        assert failed.value.result.rolled_back and "accuracy" in str(failed.value)
        assert endpoint.versions(name) == {v1: False, v2: True}
        assert not endpoint.client.model_ready(name, v3)
        assert endpoint.predict(name, png).json()["version"] == v2
        reg = MlflowClient()
        assert str(reg.get_model_version_by_alias(name, "dev").version) == v2
        assert "deployed_dev_at" not in reg.get_model_version(name, v3).tags

        live = endpoint.predict(name, png)
        assert live.status_code == 200
        live_id = live.json()["prediction_id"]
        deadline = time.monotonic() + 30
        records = []
        while time.monotonic() < deadline:
            records = list(iter_captures(str(captures), name))
            if any(r.prediction_id == live_id for r in records):
                break
            time.sleep(0.3)
        mine = [r for r in records if r.prediction_id == live_id]
        assert len(mine) == 1, len(records)
        record = mine[0]
        assert record.traffic == LIVE and record.version == v2 and record.model == name
        assert record.embedding is not None and record.embedding.shape == (128,)
        assert (_decode(record.image_png) == _decode(png)).all() and record.probs is not None and abs(record.probs.sum() - 1) < 1e-4
        kinds = {r.traffic for r in records}
        assert {"acceptance", "warmup", LIVE} <= kinds  # release checks are marked, not live
        assert {r.version for r in records if r.traffic == "acceptance"} >= {v1, v2, v3}

        # Rolling back is a release of the old version, here through the CLI: v1 is still loaded.
        from tests.conftest import VENV_BIN

        proc = subprocess.run([str(VENV_BIN / "flywheel"), "release", "--engine", "triton", "--model", name,
                               "--version", v1, "--env", "prod", "--endpoint", server.url, "--key-file",
                               str(server.key_file), "--model-store", str(server.cfg.repository),
                               "--tracking-uri", serving_models.tracking_uri, "--min-accuracy", str(threshold),
                               "--p95-slo-ms", "3000", "--grace", "0.5"],
                              capture_output=True, text=True, timeout=600, env=os.environ)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "version already loaded" in proc.stdout and f"default switched {v2} → {v1}" in proc.stdout
        assert endpoint.versions(name) == {v1: True, v2: False}
        assert endpoint.predict(name, png).json()["version"] == v1
        assert str(reg.get_model_version_by_alias(name, "prod").version) == v1
    finally:
        server.stop()


def test_metrics_through_the_proxy(triton_v1, serving_models):
    server, _ = triton_v1
    client = server.client()
    assert client.predict(serving_models.name, _png(_fashion_test().images[0])).status_code == 200
    text = client.metrics()
    assert "nv_inference_request_success" in text and f'model="{serving_models.name}"' in text


def test_package_cli_engine_triton(serving_models, tmp_path):
    """`flywheel package --engine triton` writes the version folders; an unknown engine is a usage error."""
    from tests.conftest import VENV_BIN

    env = {**os.environ, "MLFLOW_TRACKING_URI": serving_models.tracking_uri}
    cmd = [str(VENV_BIN / "flywheel"), "package", "--model", serving_models.name, "--version",
           serving_models.versions[1], "--tracking-uri", serving_models.tracking_uri]
    proc = subprocess.run([*cmd, "--engine", "triton", "--out", str(tmp_path / "repo")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, version = serving_models.name, serving_models.versions[1]
    assert (tmp_path / "repo" / name / version / "model.py").is_file()
    assert (tmp_path / "repo" / f"{name}-onnx" / version / "model.onnx").is_file()
    assert str(tmp_path / "repo") in proc.stdout
    bad = subprocess.run([*cmd, "--engine", "nope"], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "unknown --engine" in bad.stderr


def test_predict_cli_engine_triton(triton_v1, serving_models, tmp_path):
    """`flywheel predict` against Triton's proxy with the exports `serve --engine triton` writes
    (FLYWHEEL_SERVE_ENGINE=triton): one JSON line per file, in order, the TorchServe handler's answer
    fields; a broken file fails alone (exit 1); an unknown engine is a usage error."""
    from tests.conftest import VENV_BIN

    server, _ = triton_v1
    name, v1 = serving_models.name, serving_models.versions[0]
    images = _fashion_test().images[300:303]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"img{i}.png").write_bytes(_png(image))
    (folder / "img3.png").write_bytes(b"not an image")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FLYWHEEL_"))}
    env.update(FLYWHEEL_SERVE_ENGINE="triton", FLYWHEEL_TS_INFERENCE_URL=server.url,
               FLYWHEEL_TS_KEY_FILE=str(server.key_file))
    out = tmp_path / "predictions.jsonl"
    cmd = [str(VENV_BIN / "flywheel"), "predict", "--model", name, "--dir", str(folder), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # one file failed
    assert "3/4 predicted, 1 failed" in proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    client = server.client()
    for r, image in zip(lines[:3], images, strict=True):
        assert r["status"] == 200 and r["version"] == v1 and r["model"] == name
        assert {"prediction_id", "label", "label_index", "confidence", "top_k"} <= set(r)
        direct = client.predict(name, _png(image)).json()
        assert (r["label"], r["label_index"], r["top_k"]) == (direct["label"], direct["label_index"], direct["top_k"])
    assert lines[3]["status"] == 400 and "img3.png" in lines[3]["file"] and lines[3]["error"]
    bad = subprocess.run([*cmd, "--engine", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "unknown --engine" in bad.stderr
