"""`mlflow deployments -t flywheel`: the real `mlflow` CLI against a real TorchServe and a real registry.

The serving fixtures' models (tests/fixtures_serving.py: good v1 = v2, bad v3) and their archives, on
this module's own TorchServe and a copy of their registry (the other serving tests move `dev`/`prod`
on the original), driven through the installed entry point exactly as a user would: create (a
failing one first: rolled back, one `Error:` line, exit 3), get, list, predict (the served labels are
the registry model's), update, delete, and the one-line refusals.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN

pytestmark = pytest.mark.integration
MLFLOW = VENV_BIN / "mlflow"
NOT_REGISTERED = "the mlflow.deployments entry point `flywheel` is not registered: pip install -e . to register " \
                 "the flywheel deployments target"


@dataclass(frozen=True)
class Node:
    env: dict  # what the `mlflow` subprocesses see: the node's FLYWHEEL_TS_* and the registry copy
    tracking_uri: str
    client: object  # TorchServeClient of the node
    root: Path


@pytest.fixture(scope="module")
def node(serving_models, tmp_path_factory):
    from importlib.metadata import entry_points

    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    if not any(ep.value == "flywheel.serving.deployments" for ep in entry_points(group="mlflow.deployments",
                                                                                  name="flywheel")):
        pytest.fail(NOT_REGISTERED)
    root = tmp_path_factory.mktemp("deployments")
    shutil.copy(serving_models.work_dir / "mlflow.db", root / "mlflow.db")  # artifacts stay where they are
    store = root / "model-store"
    store.mkdir()
    for mar in serving_models.mars.values():  # what `flywheel package` left: reused after verification
        shutil.copy(mar, store / mar.name)
    server = start_torchserve(ServeConfig.local(root / "ts", store))
    try:
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME",
                                                                 "MLFLOW_TRACKING_PASSWORD", "FLYWHEEL_MODEL_NAME")}
        env = {**env, "MLFLOW_TRACKING_URI": tracking_uri, "FLYWHEEL_HOME": str(root / "home"),
               "FLYWHEEL_TS_INFERENCE_URL": server.cfg.inference_address,
               "FLYWHEEL_TS_MANAGEMENT_URL": server.cfg.management_address,
               "FLYWHEEL_TS_KEY_FILE": str(server.key_file), "FLYWHEEL_TS_MODEL_STORE": str(store)}
        yield Node(env, tracking_uri, server.client(), root)
    finally:
        server.stop()


def deployments(node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MLFLOW), "deployments", *args], env=node.env, capture_output=True, text=True,
                          timeout=600, check=False)


def one_line_error(proc: subprocess.CompletedProcess, code: int, text: str) -> str:
    """The single `Error: ...` line of a refused command (no traceback), containing `text`."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode == code and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert text in errors[0], errors[0]
    return errors[0]


def test_mlflow_deployments_lifecycle(node, serving_models, tmp_path):
    import torch
    from mlflow import MlflowClient

    from flywheel.contracts.preprocessing import encode_png, to_tensor
    from flywheel.core.config import Settings
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model

    name = serving_models.name
    v1, v2, v3 = serving_models.versions
    acc = serving_models.accuracy
    threshold = (min(acc[v1], acc[v2]) + acc[v3]) / 2  # the good versions pass, the bad one cannot
    accept = ["-C", f"min_accuracy={threshold:.3f}", "-C", "p95_slo_ms=3000", "-C", "accuracy_samples=96",
              "-C", "latency_requests=10", "-C", "grace_s=0"]
    registry = MlflowClient(tracking_uri=node.tracking_uri, registry_uri=node.tracking_uri)

    def aliases() -> dict:
        return {k: str(v) for k, v in registry.get_registered_model(name).aliases.items()}

    # The target is installed and documents itself.
    helped = deployments(node, "help", "-t", "flywheel")
    assert helped.returncode == 0 and "FLYWHEEL_TS_KEY_FILE" in helped.stdout and "min_accuracy" in helped.stdout

    # A failing create (v3 is below the threshold): rolled back, nothing served, no alias, one line, exit 3.
    failed = deployments(node, "create", "-t", "flywheel", "--name", name, "-m", f"models:/{name}/{v3}", *accept)
    line = one_line_error(failed, 3, f"{name} v{v3} failed acceptance: accuracy")
    assert "rolled back" in line and "alias 'dev' unchanged" in line
    assert node.client.versions(name) == {} and "dev" not in aliases()
    assert "deployed_dev_at" not in registry.get_model_version(name, v3).tags

    # create v1: acceptance passes, the server serves it by default, alias dev moves.
    created = deployments(node, "create", "-t", "flywheel", "--name", name, "-m", f"models:/{name}/{v1}", *accept)
    assert created.returncode == 0, created.stderr[-3000:]
    assert f"onnx deployment {name} is created" in created.stdout
    assert "acceptance passed" in created.stderr and f"alias dev → v{v1}" in created.stderr
    assert node.client.versions(name) == {v1: True}
    assert aliases()["dev"] == v1 and "deployed_dev_at" in registry.get_model_version(name, v1).tags

    again = deployments(node, "create", "-t", "flywheel", "--name", name, "-m", f"models:/{name}/{v2}")
    one_line_error(again, 2, "already exists")

    got = deployments(node, "get", "-t", "flywheel", "--name", name)
    assert got.returncode == 0, got.stderr[-3000:]
    fields = dict(line.split(": ", 1) for line in got.stdout.splitlines() if ": " in line)
    assert fields["name"] == name and fields["default_version"] == v1 and fields["flavor"] == "onnx"
    assert f"'dev': '{v1}'" in fields["aliases"] and fields["warnings"] == "[]"

    listed = deployments(node, "list", "-t", "flywheel")
    assert listed.returncode == 0 and f"'name': '{name}'" in listed.stdout and f"'default_version': '{v1}'" \
        in listed.stdout, listed.stdout + listed.stderr[-2000:]

    # predict: rows by file path and by base64 PNG; the labels are what the registry's v1 answers.
    test = load_splits("fashion-mnist").test
    images = test.images[200:216]
    rows = []
    for i, image in enumerate(images):
        png = encode_png(image)
        if i % 2:
            rows.append({"image": base64.b64encode(png).decode()})
        else:
            (tmp_path / f"img{i}.png").write_bytes(png)
            rows.append({"path": str(tmp_path / f"img{i}.png")})
    inputs = tmp_path / "input.json"
    inputs.write_text(json.dumps(rows))
    out = tmp_path / "out.json"
    predicted = deployments(node, "predict", "-t", "flywheel", "--name", name, "-I", str(inputs), "-O", str(out))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    answer = json.loads(out.read_text())
    Settings.from_env(tracking_uri=node.tracking_uri).apply()  # models:/ is resolved through the global registry URI
    model, spec = load_model(f"models:/{name}/{v1}", tracking_uri=node.tracking_uri)
    with torch.inference_mode():
        expected = model(to_tensor(images, spec.preprocess))[0].argmax(1).tolist()
    assert [p["label_index"] for p in answer["predictions"]] == expected
    assert [p["label"] for p in answer["predictions"]] == [spec.class_names[i] for i in expected]
    assert answer["versions"] == [v1]

    # update to v2 with the prod-style URI form: switch, alias moves, v1 kept for A/B (keep_previous=1).
    updated = deployments(node, "update", "-t", "flywheel:/dev", "--name", name, "-m", f"models:/{name}/{v2}", *accept)
    assert updated.returncode == 0, updated.stderr[-3000:]
    assert f"Deployment {name} is updated (with flavor onnx)" in updated.stdout
    assert node.client.versions(name) == {v1: False, v2: True} and aliases()["dev"] == v2
    ab = deployments(node, "predict", "-t", "flywheel", "--name", f"{name}/{v1}", "-I", str(inputs))
    assert ab.returncode == 0 and json.loads(ab.stdout)["versions"] == [v1], ab.stderr[-3000:]

    # Refusals, one line each: explain, removing the serving default alone, another environment's alias.
    one_line_error(deployments(node, "explain", "-t", "flywheel", "--name", name, "-I", str(inputs)), 2,
                   "explain is not supported")
    one_line_error(deployments(node, "delete", "-t", "flywheel", "--name", name, "-C", f"version={v2}"), 2,
                   f"v{v2} is the serving default")
    one_line_error(deployments(node, "update", "-t", "flywheel:/prod", "--name", name, "-C", "env=dev"), 2,
                   "contradicts target")

    # delete: every version goes; alias dev is kept (and said to serve nothing here); idempotent.
    deleted = deployments(node, "delete", "-t", "flywheel", "--name", name)
    assert deleted.returncode == 0 and f"Deployment {name} is deleted" in deleted.stdout, deleted.stderr[-3000:]
    assert f"alias 'dev' still names {name} v{v2}" in deleted.stderr
    assert node.client.versions(name) == {} and aliases()["dev"] == v2
    assert "undeployed_dev_at" in registry.get_model_version(name, v2).tags
    assert deployments(node, "delete", "-t", "flywheel", "--name", name).returncode == 0
    one_line_error(deployments(node, "get", "-t", "flywheel", "--name", name), 2, f"no deployment {name}")


def test_target_needs_the_serving_node(tmp_path):
    """Without FLYWHEEL_TS_* and without a serve.env the target says what it needs, in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_TS_")}
    env["FLYWHEEL_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([str(MLFLOW), "deployments", "list", "-t", "flywheel"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    if "No plugin found" in proc.stderr:
        pytest.fail(NOT_REGISTERED)
    one_line_error(proc, 2, "FLYWHEEL_TS_KEY_FILE")
