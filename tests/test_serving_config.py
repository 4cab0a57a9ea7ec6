"""Serving configuration and image definition, and the handler's request parsing (no server needed)."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "serving"


def _props(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_deploy_config_is_locked_down():
    props = _props((DEPLOY / "config.properties").read_text())
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true"
    assert props["management_address"].startswith("http://127.0.0.1:")  # model API not public
    assert props["metrics_mode"] == "prometheus"
    for key in ("inference_address", "management_address", "metrics_address", "grpc_inference_address",
                "grpc_inference_port", "grpc_management_address", "grpc_management_port"):
        assert props.get(key), f"{key} must be explicit"
    assert props["grpc_management_address"] == "127.0.0.1"


def test_rendered_test_config_binds_loopback_only(tmp_path):
    from flywheel.serving.torchserve import ServeConfig, render_properties

    cfg = ServeConfig.local(tmp_path / "w", tmp_path / "s")
    props = _props(render_properties(cfg))
    deploy = _props((DEPLOY / "config.properties").read_text())
    # Same security keys as the shipped config; every address on loopback.
    for key in ("disable_token_authorization", "enable_model_api", "metrics_mode"):
        assert props[key] == deploy[key]
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert len({props[k] for k in ("inference_address", "management_address", "metrics_address")}) == 3
    assert Path(props["metrics_config"]).is_file()


def test_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), str(DEPLOY / "Dockerfile")], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "HEALTHCHECK" in text and "/ping" in (DEPLOY / "healthcheck.py").read_text()
    assert "\nUSER 10001" in text  # non-root


def test_metrics_yaml_declares_handler_metrics():
    import yaml

    from flywheel.serving.handler import CONFIDENCE_METRIC, LATENCY_METRIC

    data = yaml.safe_load((DEPLOY / "metrics.yaml").read_text())
    names = {m["name"] for kind in data["model_metrics"].values() for m in kind}
    assert {LATENCY_METRIC, CONFIDENCE_METRIC} <= names


def test_each_workers_onnx_session_asks_for_its_own_gpu_and_falls_back_to_the_cpu(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from flywheel.serving.handler import ort_providers

    assert ort_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    gpu1 = ort_providers(torch.device("cuda", 1))  # TorchServe's gpu_id 1 for this worker
    assert gpu1 == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    # The real ONNX Runtime takes that list; without the CUDA provider (this CPU build) it serves on the CPU
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, tmp_path / "id.onnx")
    session = ort.InferenceSession(str(tmp_path / "id.onnx"), providers=gpu1)
    batch = np.arange(4, dtype=np.float32).reshape(2, 2)
    assert np.array_equal(session.run(None, {"x": batch})[0], batch)
    assert "CPUExecutionProvider" in session.get_providers()


# ------------------------------------------------------------------------- handler request parsing
@pytest.fixture()
def handler():
    from flywheel.contracts.preprocessing import PreprocessSpec
    from flywheel.serving.handler import FlywheelHandler

    h = FlywheelHandler()
    h.spec = PreprocessSpec()
    h.class_names = [str(i) for i in range(10)]
    h.top_k, h.max_images = 3, 4
    return h


def _png():
    import numpy as np

    from flywheel.contracts.preprocessing import encode_png

    return encode_png(np.arange(784, dtype=np.uint8).reshape(28, 28))


@pytest.mark.parametrize("row, code, words", [
    ({"body": b""}, 400, "empty"),
    ({"body": None}, 400, "empty"),
    ({"body": b"GIF89a-not-really"}, 400, "not a decodable image"),
    ({"body": b"{\"image\": "}, 400, "malformed JSON"),
    ({"body": "plain words"}, 400, "neither JSON nor an image"),
    ({"body": {"image": "@@"}}, 400, "not valid base64"),
    ({"body": {"images": []}}, 400, "empty"),
    ({"body": {"images": ["x"] * 5}}, 413, "too many images"),
    ({"body": {"nope": 1}}, 400, "'image'"),
    ({"body": 7}, 400, "object or a list"),
    ({"body": {"image": "aGk=", "top_k": 11}}, 400, "top_k"),
])
def test_bad_requests_name_the_problem(handler, row, code, words):
    from flywheel.serving.handler import RequestError

    with pytest.raises(RequestError) as err:
        handler._decode_request(row)
    assert err.value.code == code and words in err.value.message


def test_good_requests_decode(handler):
    png = _png()
    images, single, k = handler._decode_request({"data": bytearray(png)})
    assert single and k == 3 and images[0].shape == (28, 28)
    images, single, k = handler._decode_request({"body": {"images": [base64.b64encode(png).decode()] * 2,
                                                          "top_k": 1}})
    assert not single and k == 1 and len(images) == 2
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert handler._decode_request({"body": {"image": data_url}})[1]


def test_logging_config_writes_each_line_once_and_no_request_chatter(tmp_path):
    """TorchServe's built-in log4j2 logs org.pytorch.serve at DEBUG into ts_log twice (its own logger
    plus the root's appenders); ours: every named logger non-additive, nothing below INFO, the
    per-request/per-batch loggers at WARN, and both the shipped and the rendered config use it."""
    import xml.etree.ElementTree as ET

    from flywheel.serving.torchserve import ServeConfig, render_properties

    root = ET.parse(DEPLOY / "log4j2.xml").getroot()
    loggers = {el.get("name"): el for el in root.find("Loggers") if el.tag == "Logger"}
    appenders = {el.get("name") for el in root.find("Appenders")}
    for name, el in loggers.items():
        assert el.get("level").lower() in ("info", "warn", "error", "off"), name
        refs = [r.get("ref") for r in el.findall("AppenderRef")]
        assert set(refs) <= appenders, name
        if refs:
            assert el.get("additivity") == "false", f"{name} would log its lines twice"
    for chatty in ("org.pytorch.serve.wlm.BatchAggregator", "org.pytorch.serve.job",
                   "org.pytorch.serve.wlm.WorkerThread", "org.pytorch.serve.wlm.WorkerLifeCycle"):
        assert loggers[chatty].get("level") == "warn"
    assert loggers["ACCESS_LOG"].get("level") == "info"  # one line per request stays
    deploy = _props((DEPLOY / "config.properties").read_text())
    assert "-Dlog4j.configurationFile=/opt/flywheel/log4j2.xml" in deploy["vmargs"]
    rendered = _props(render_properties(ServeConfig.local(tmp_path / "w", tmp_path / "s")))
    assert f"-Dlog4j.configurationFile={DEPLOY / 'log4j2.xml'}" in rendered["vmargs"]
    assert rendered["async_logging"] == deploy["async_logging"] == "true"
    assert "log4j2.xml" in (DEPLOY / "Dockerfile").read_text()
