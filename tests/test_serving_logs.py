"""Real TorchServe: logging and metrics cost per request stays bounded (no per-request debug lines,
a bounded number of backend metric lines per batch), while access log and metrics stay complete."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _png(i: int) -> bytes:
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.data import load_splits

    return encode_png(load_splits("fashion-mnist").test.images[i])


def _lines(path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


def _metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_requests_add_access_lines_but_no_server_chatter(torchserve_server):
    from concurrent.futures import ThreadPoolExecutor

    srv = torchserve_server
    logs = srv.server.cfg.work_dir / "logs"
    pngs = [_png(i) for i in range(8)]
    srv.client.predict(srv.model, pngs[0])  # warm
    time.sleep(1.0)  # async logging: let earlier lines land
    before = {name: _lines(logs / name) for name in ("ts_log.log", "access_log.log")}
    conf_before = _metric_total(srv.client.metrics(), "FlywheelPredictionConfidence_count")
    n = 120
    with ThreadPoolExecutor(8) as pool:  # concurrent: TorchServe batches them
        codes = list(pool.map(lambda i: srv.client.predict(srv.model, pngs[i % 8]).status_code, range(n)))
    assert codes == [200] * n
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _lines(logs / "access_log.log") - before["access_log.log"] < n:
        time.sleep(0.2)
    assert _lines(logs / "access_log.log") - before["access_log.log"] >= n  # every request, once
    # The built-in configuration wrote ~10 ts_log lines per request; lifecycle lines only here.
    assert _lines(logs / "ts_log.log") - before["ts_log.log"] < 10
    # Confidence is observed for every 8th prediction of the worker (handler.CONFIDENCE_SAMPLE_EVERY).
    added = _metric_total(srv.client.metrics(), "FlywheelPredictionConfidence_count") - conf_before
    assert 0 < added <= n


def test_handler_outputs_match_softmax_of_the_onnx_logits(torchserve_server):
    """The serving path runs without torch ops (numpy preprocessing + ONNX Runtime + numpy softmax):
    probabilities still sum to one and agree with the eager model's within float32 noise."""
    import torch

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model

    srv = torchserve_server
    srv.models.settings()  # points MLflow at the fixture's registry
    model, spec = load_model(f"models:/{srv.model}/{srv.version}")
    images = load_splits("fashion-mnist").test.images[:5]
    with torch.no_grad():
        expected = torch.softmax(model(to_tensor(images, spec.preprocess))[0], 1).numpy()
    for i in range(5):
        r = srv.client.predict(srv.model, _png(i))
        body = r.json()
        top = body["top_k"]
        assert body["label_index"] == int(np.argmax(expected[i]))
        for entry in top:
            assert abs(entry["probability"] - float(expected[i][entry["index"]])) < 1e-4
