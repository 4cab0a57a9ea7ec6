"""Serving against a real TorchServe: packaging parity, predictions, bad input, checksums, releases."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _fashion_test():
    from flywheel.core.data import load_splits

    return load_splits("fashion-mnist").test


def _png(image) -> bytes:
    from flywheel.contracts.preprocessing import encode_png

    return encode_png(image)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------ package + predict
def test_served_label_matches_mlflow_model(torchserve_server):
    """Real Fashion-MNIST images: TorchServe's answer equals the MLflow-loaded model's, raw and base64."""
    import torch

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.models import load_model

    srv = torchserve_server
    srv.models.settings()
    model, spec = load_model(f"models:/{srv.model}/{srv.version}")
    test = _fashion_test()
    images = test.images[100:116]
    with torch.inference_mode():
        expected = torch.softmax(model(to_tensor(images, spec.preprocess))[0], 1).numpy()
    for i, image in enumerate(images):
        r = srv.client.predict(srv.model, _png(image))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label_index"] == int(expected[i].argmax())
        assert body["label"] == spec.class_names[body["label_index"]]
        assert body["version"] == srv.version and len(body["prediction_id"]) == 32
        assert abs(body["confidence"] - float(expected[i].max())) < 1e-4
        assert len(body["top_k"]) == 3 and body["top_k"][0]["index"] == body["label_index"]
    r = srv.client.predict(srv.model, {"images": [_b64(_png(im)) for im in images[:4]], "top_k": 1})
    assert r.status_code == 200, r.text
    assert [p["label_index"] for p in r.json()["predictions"]] == [int(p.argmax()) for p in expected[:4]]
    # Prometheus metrics carry the handler's custom metrics.
    metrics = srv.client.metrics()
    assert "FlywheelInferenceLatency_bucket" in metrics and "FlywheelPredictionConfidence_count" in metrics
    # Served traffic reaches the capture store (written off the request path, flushed each second).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not list(srv.capture_dir.rglob("*.jsonl")):
        time.sleep(0.2)
    lines = [json.loads(line) for f in srv.capture_dir.rglob("*.jsonl") for line in f.read_text().splitlines()]
    assert lines and lines[0]["version"] == srv.version and len(lines[0]["embedding"]) == 128


def test_manifest_and_onnx_parity(serving_models):
    """The archive records lineage and checksums; its ONNX file matches eager PyTorch on other images."""
    import onnxruntime as ort
    import torch
    from mlflow import MlflowClient

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.models import load_model
    from flywheel.serving.package import PARITY_TOL, sha256_file

    serving_models.settings()
    version = serving_models.versions[0]
    mar = serving_models.mars[version]
    manifest = serving_models.manifests[version]
    mv = MlflowClient().get_model_version(serving_models.name, version)
    run = MlflowClient().get_run(mv.run_id)
    assert manifest["run_id"] == mv.run_id and manifest["model_version"] == version
    assert manifest["git_commit"] == run.data.tags["git_commit"]
    assert manifest["dataset_digest"] == run.data.tags["dataset_digest"]
    assert manifest["artifact"]["format"] == "onnx"
    exports = {e["format"]: e for e in manifest["exports"]}
    assert exports["torchscript"]["max_abs_diff"] <= PARITY_TOL and exports["onnx"]["max_abs_diff"] <= PARITY_TOL
    assert exports["tensorrt"]["skipped"]  # no tensorrt/CUDA here: skipped with its reason

    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        assert {"model.onnx", "handler.py", "preprocessing.py", "flywheel_manifest.json",
                "index_to_name.json", "model-config.yaml"} <= names
        onnx_bytes = zf.read("model.onnx")
        handler_src = zf.read("handler.py").decode()
    assert "import flywheel" not in handler_src and "flywheel.training.train" not in handler_src
    path = serving_models.work_dir / "parity.onnx"
    path.write_bytes(onnx_bytes)
    assert sha256_file(path) == manifest["artifact"]["sha256"]

    model, spec = load_model(f"models:/{serving_models.name}/{version}")
    x = to_tensor(_fashion_test().images[500:564], spec.preprocess)
    with torch.inference_mode():
        logits, emb = model(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_logits, out_emb = session.run(["logits", "embedding"], {"images": x.numpy()})
    assert np.abs(out_logits - logits.numpy()).max() <= PARITY_TOL
    assert np.abs(out_emb - emb.numpy()).max() <= PARITY_TOL


def test_checksum_mismatch_refuses_to_serve(torchserve_server, tmp_path):
    """An archive whose artifact no longer matches its manifest's sha256 never serves a prediction."""
    srv = torchserve_server
    src = srv.models.mars[srv.version]
    bad = srv.models.model_store / "tampered.mar"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, data + b"\0" if item.filename == "model.onnx" else data)
    try:
        r = srv.client.register(bad.name, model_name="tampered")
        assert r.status_code >= 500, r.text
        p = srv.client.predict("tampered", _png(_fashion_test().images[0]))
        assert p.status_code != 200
        log = "".join(f.read_text(errors="replace") for f in (srv.server.cfg.work_dir / "logs").glob("*.log"))
        assert "refusing to serve" in log and "does not match the manifest" in log
    finally:
        srv.client.unregister("tampered", srv.version)
        bad.unlink()
    assert srv.client.predict(srv.model, _png(_fashion_test().images[0])).status_code == 200


# ----------------------------------------------------------------------------------- bad input
def _malformed_payloads(good_png: bytes, count: int) -> list[tuple[str, bytes | dict | list | None, str]]:
    """`count` (≥ the ~110 listed) (kind, body, content type) requests that must each get a 4xx JSON error."""
    from PIL import Image

    rng = random.Random(5)
    out = [("empty", b"", "application/octet-stream")]
    for n in range(1, 41):
        out.append(("random-bytes", bytes(rng.getrandbits(8) for _ in range(n * 7)), "application/octet-stream"))
    # Cuts inside the compressed pixels (Pillow tolerates a missing adler32/IEND trailer: pixels complete).
    idat = good_png.find(b"IDAT")
    pixels_end = idat + 4 + int.from_bytes(good_png[idat - 4:idat], "big") - 8
    for cut in range(8, pixels_end, max(1, (pixels_end - 8) // 40)):
        out.append(("truncated-png", good_png[:cut], "image/png"))
    jpeg = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(jpeg, format="JPEG")
    for cut in (20, 100, 200, len(jpeg.getvalue()) // 2):
        out.append(("truncated-jpeg", jpeg.getvalue()[:cut], "image/jpeg"))
    huge = io.BytesIO()
    Image.new("1", (5000, 5000)).save(huge, format="PNG")  # 25 Mpx: over the pixel limit, ~3 KB
    out.append(("too-many-pixels", huge.getvalue(), "image/png"))
    out.append(("too-many-bytes", good_png + bytes(4_300_000), "image/png"))
    for text in ("{", "{\"image\":", "[1,", "{'image': 1}", "{\"image\": \"x\"", "nul", "{]", "[[[", "{\"a\":}",
                 "{\"images\": [\"", "\"unterminated", "{\"image\": tru}", "{,}", "[,]", "{\"\\u\": 1}"):
        out.append(("bad-json", text.encode(), "application/json"))
    wrong = [{"foo": 1}, {"image": 123}, {"image": None}, {"image": "!!!not base64!!!"},
             {"image": _b64(b"not an image at all")}, {"image": _b64(good_png[:30])}, {"images": []},
             {"images": "abc"}, {"images": [1]}, {"images": [_b64(good_png), "%%%"]}, {"images": [None]},
             {"image": _b64(good_png), "top_k": 0}, {"image": _b64(good_png), "top_k": 99},
             {"image": _b64(good_png), "top_k": "3"}, {"image": _b64(good_png), "top_k": True},
             {"images": [_b64(good_png)] * 65}, {}, 42, "just a string", True, [], [1, 2], [{"image": 1}],
             {"image": ["nested"]}, {"image": {"b64": "x"}}, {"image": "data:image/png;base64,@@@"}]
    for body in wrong:
        out.append(("wrong-json", body, "application/json"))
    for text in ("hello", "not an image", "0" * 100, "<html></html>"):
        out.append(("text", text.encode(), "text/plain"))
    # Random mutations of the kinds above until there are well over 200.
    while len(out) < count:
        kind, body, ctype = rng.choice(out[:41])
        out.append((kind + "+mutated", bytes(b ^ 0x5A for b in body) if body else b"", ctype))
    return out


def _send(session_client, model, body, ctype):
    url = f"{session_client.inference_url}/predictions/{model}"
    data = json.dumps(body).encode() if not isinstance(body, (bytes, bytearray)) else body
    return session_client._call("inference", "POST", url, data=data, headers={"Content-Type": ctype})


@pytest.mark.parametrize("count, clients", [(240, 8), pytest.param(1500, 16, marks=pytest.mark.reliability)])
def test_malformed_payloads_get_4xx_and_workers_survive(torchserve_server, count, clients):
    srv = torchserve_server
    test = _fashion_test()
    good = _png(test.images[7])
    payloads = _malformed_payloads(good, count)
    assert len(payloads) >= count >= 200
    before = {w["pid"] for w in srv.client.wait_ready(srv.model)}

    def one(i):
        from flywheel.serving.torchserve import TorchServeClient

        client = TorchServeClient(srv.inference_url, key_file=srv.key_file)
        kind, body, ctype = payloads[i]
        r = _send(client, srv.model, body, ctype)
        good_r = client.predict(srv.model, good) if i % 10 == 0 else None  # batched beside bad ones
        return kind, body, r, good_r

    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(len(payloads))))
    for kind, body, r, good_r in results:
        assert 400 <= r.status_code < 500, (kind, str(body)[:80], r.status_code, r.text[:200])
        payload = r.json()
        assert payload.get("error") or payload.get("message"), (kind, r.text[:200])
        if good_r is not None:
            assert good_r.status_code == 200, good_r.text
    kinds = {k.split("+")[0] for k, *_ in results}
    assert {"empty", "truncated-png", "too-many-pixels", "too-many-bytes", "bad-json", "wrong-json"} <= kinds
    workers = srv.client.describe(srv.model).json()[0]["workers"]
    assert {w["pid"] for w in workers} == before and all(w["status"] == "READY" for w in workers)
    r = srv.client.predict(srv.model, good)
    assert r.status_code == 200 and r.json()["version"] == srv.version


# -------------------------------------------------------------------------------------- release
@pytest.mark.parametrize("cycles", [1, pytest.param(3, marks=pytest.mark.reliability)])
def test_zero_downtime_release_and_rollback(serving_models, tmp_path, cycles):
    """8 clients hammer /predictions/M while v2 is released and a failing v3 is rolled back: 0 errors.

    The reliability variant repeats release v1 / fail v3 / release v2 / fail v3 `cycles - 1` more times.
    """
    from mlflow import MlflowClient

    from flywheel.serving.release import AcceptanceConfig, ManagementTarget, ReleaseFailed, release_version
    from flywheel.serving.torchserve import ServeConfig, TorchServeClient, start_torchserve

    v1, v2, v3 = serving_models.versions
    acc = serving_models.accuracy
    assert min(acc[v1], acc[v2]) >= acc[v3] + 0.2, acc  # the fixture's bad model really is worse
    threshold = (min(acc[v1], acc[v2]) + acc[v3]) / 2
    settings = serving_models.settings()
    server = start_torchserve(ServeConfig.local(tmp_path / "ts", tmp_path / "store"))
    try:
        target = ManagementTarget(server.cfg.inference_address, server.cfg.management_address, server.key_file,
                                  server.cfg.model_store, grace_s=1.0, keep_previous=1)
        accept = AcceptanceConfig(min_accuracy=threshold, p95_slo_ms=3000, accuracy_samples=96,
                                  latency_requests=20)
        name = serving_models.name
        first = release_version(settings, name, v1, "dev", target, accept, mar_path=serving_models.mars[v1])
        assert first.switched and first.previous is None

        png = _png(_fashion_test().images[3])
        stop = threading.Event()
        seen: list[tuple[int | None, str | None]] = []
        lock = threading.Lock()

        def client_loop():
            client = TorchServeClient(server.cfg.inference_address, key_file=server.key_file, timeout=30)
            while not stop.is_set():
                try:
                    r = client.predict(name, png)
                    item = (r.status_code, r.json().get("version") if r.status_code == 200 else r.text[:100])
                except Exception as exc:  # noqa: BLE001 - any failure is what the test counts
                    item = (None, repr(exc))
                with lock:
                    seen.append(item)

        threads = [threading.Thread(target=client_loop) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            current = v1
            for version in [v2, v3] + [v1, v3, v2, v3] * (cycles - 1):
                if version == v3:
                    with pytest.raises(ReleaseFailed) as failed:
                        release_version(settings, name, v3, "dev", target, accept, mar_path=serving_models.mars[v3])
                    assert failed.value.result.rolled_back and "accuracy" in str(failed.value)
                    continue
                done = release_version(settings, name, version, "dev", target, accept,
                                       mar_path=serving_models.mars[version])
                assert done.switched and done.previous == current and done.report.passed
                current = version
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        failures = [s for s in seen if s[0] != 200]
        assert len(seen) > 100 and not failures, (len(seen), failures[:5])
        versions_seen = [v for _, v in seen]
        assert set(versions_seen) == {v1, v2}  # never v3
        assert versions_seen[-1] == v2

        client = target.client()
        assert client.default_version(name) == v2
        assert set(client.versions(name)) == {v1, v2}  # v3 removed, v1 kept for A/B
        ab = client.predict(name, png, version=v1)
        assert ab.status_code == 200 and ab.json()["version"] == v1
        reg = MlflowClient()
        assert str(reg.get_model_version_by_alias(name, "dev").version) == v2
        assert "deployed_dev_at" in reg.get_model_version(name, v2).tags
        assert "deployed_dev_at" not in reg.get_model_version(name, v3).tags

        # An archive naming another run than the registry's for that version: registered while the
        # registry is asked (release overlaps the two), then rolled back; nothing else changes.
        forged = tmp_path / "forged" / f"{name}-{v3}.mar"
        forged.parent.mkdir()
        _rewrite_manifest(serving_models.mars[v3], forged, run_id=serving_models.manifests[v1]["run_id"])
        with pytest.raises(ReleaseFailed) as refused:
            release_version(settings, name, v3, "dev", target, accept, mar_path=forged)
        assert refused.value.result.rolled_back and "packaged from run" in str(refused.value)
        assert client.default_version(name) == v2 and set(client.versions(name)) == {v1, v2}
    finally:
        server.stop()


def _rewrite_manifest(src, dest, **changes) -> None:
    """A copy of the .mar `src` whose flywheel manifest has `changes` (its artifact untouched)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "flywheel_manifest.json":
                data = json.dumps({**json.loads(data), **changes}).encode()
            zout.writestr(item, data)


def test_release_verifies_the_archive_it_is_given(serving_models, tmp_path):
    """`release --mar` takes package's archive only for exactly that version and run, intact and parity-checked."""
    from mlflow import MlflowClient

    from flywheel.core.errors import FlywheelError
    from flywheel.serving.release import verify_archive

    serving_models.settings()
    v1, v2, v3 = serving_models.versions
    name, mars = serving_models.name, serving_models.mars
    run_v1 = MlflowClient().get_model_version(name, v1).run_id
    assert verify_archive(mars[v1], name, v1, run_v1)["run_id"] == run_v1
    with pytest.raises(FlywheelError, match="holds"):
        verify_archive(mars[v2], name, v1)  # v2's archive is not v1's
    with pytest.raises(FlywheelError, match="packaged from run"):
        verify_archive(mars[v3], name, v3, run_v1)
    tampered = tmp_path / "tampered.mar"
    with zipfile.ZipFile(mars[v1]) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, data + b"\0" if item.filename == "model.onnx" else data)
    with pytest.raises(FlywheelError, match="sha256"):
        verify_archive(tampered, name, v1)
    unchecked = tmp_path / "unchecked.mar"
    exports = [{**e, "max_abs_diff": None} for e in serving_models.manifests[v1]["exports"]]
    _rewrite_manifest(mars[v1], unchecked, exports=exports)
    with pytest.raises(FlywheelError, match="parity"):
        verify_archive(unchecked, name, v1)


# --------------------------------------------------------------------------------------- predict
def test_predict_cli_over_a_folder(torchserve_server, tmp_path):
    """`flywheel predict --dir` writes one JSON line per file, in order; a broken file fails alone."""
    import subprocess
    import sys
    from pathlib import Path

    srv = torchserve_server
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    test = _fashion_test()
    for i in range(6):
        (folder / ("sub" if i % 2 else ".") / f"img{i}.png").write_bytes(_png(test.images[200 + i]))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "results.jsonl"
    cmd = [str(Path(sys.executable).with_name("flywheel")), "predict", "--endpoint", srv.inference_url,
           "--model", srv.model, "--key-file", str(srv.key_file), "--dir", str(folder), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # one file failed
    assert "6/7 predicted, 1 failed" in proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in lines] == [str(p) for p in sorted(folder.rglob("*.png"))]
    broken = next(r for r in lines if r["file"].endswith("broken.png"))
    assert broken["status"] == 400 and "image" in broken["error"]
    assert all(r["status"] == 200 and r["version"] == srv.version for r in lines if r is not broken)


def test_client_with_a_stale_key_rereads_the_key_file(torchserve_server):
    """TorchServe answers a wrong token with 400 InvalidKeyException; the client re-reads key_file.json."""
    from flywheel.serving.torchserve import TorchServeClient

    srv = torchserve_server
    png = _png(_fashion_test().images[0])
    stale = TorchServeClient(srv.inference_url, inference_key="not-the-key")
    rejected = stale.predict(srv.model, png)
    assert rejected.status_code in (400, 401) and "InvalidKeyException" in rejected.text
    recovering = TorchServeClient(srv.inference_url, inference_key="not-the-key", key_file=srv.server.key_file)
    r = recovering.predict(srv.model, png)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == srv.version
