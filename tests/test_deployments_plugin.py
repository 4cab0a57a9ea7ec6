"""`mlflow deployments -t flywheel`: the real `mlflow` CLI against a real TorchServe and a real registry.

The serving fixtures' models (tests/fixtures_serving.py: good v1 = v2, bad v3) and their archives, on
this module's own TorchServe and a copy of their registry (the other serving tests move `dev`/`prod`
on the original), driven through the installed entry point exactly as a user would: create (a
failing one first: rolled back, one `Error:` line, exit 3), get, list, predict (the served labels are
the registry model's), update, delete; the one-line refusals and A/B run in `make test-reliability`
(every `mlflow` invocation costs seconds of imports).
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


@pytest.fixture(scope="session")
def flywheel_target() -> None:
    """Fails at once (before the models are trained) when the entry point is not installed."""
    from importlib.metadata import entry_points

    if not any(ep.value == "flywheel.serving.deployments" for ep in entry_points(group="mlflow.deployments",
                                                                                  name="flywheel")):
        pytest.fail(NOT_REGISTERED)


@pytest.fixture(scope="module")
def node(flywheel_target, serving_models, tmp_path_factory):
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

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


def acceptance(serving_models) -> list[str]:
    """-C options: the good versions pass, the bad one cannot; generous latency on a shared CPU box."""
    acc = serving_models.accuracy
    v1, v2, v3 = serving_models.versions
    threshold = (min(acc[v1], acc[v2]) + acc[v3]) / 2
    return ["-C", f"min_accuracy={threshold:.3f}", "-C", "p95_slo_ms=3000", "-C", "accuracy_samples=96",
            "-C", "latency_requests=10", "-C", "grace_s=0"]


def empty_node(node: Node, name: str) -> None:
    """Start from a node that serves nothing of `name` (a failed earlier test may have left versions) and
    a registry where alias dev names no version (the registry is the session's: another test file that
    ran first may have released to dev)."""
    served = node.client.versions(name)
    for version in sorted(served, key=lambda v: served[v]):  # the default last: TorchServe refuses it earlier
        assert node.client.unregister(name, version).status_code == 200
    if "dev" in aliases(node, name):
        registry_of(node).delete_registered_model_alias(name, "dev")


def registry_of(node: Node):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=node.tracking_uri, registry_uri=node.tracking_uri)


def aliases(node: Node, name: str) -> dict:
    return {k: str(v) for k, v in registry_of(node).get_registered_model(name).aliases.items()}


def test_mlflow_deployments_lifecycle(node, serving_models, tmp_path):
    """A failing create rolls back (one line, exit 3); create, get, list, predict, update, delete."""
    import torch

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.config import Settings
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model

    name = serving_models.name
    v1, v2, v3 = serving_models.versions
    accept = acceptance(serving_models)
    registry = registry_of(node)
    empty_node(node, name)

    # A failing create (v3 is below the threshold): rolled back, nothing served, no alias, one line, exit 3.
    failed = deployments(node, "create", "-t", "flywheel", "--name", name, "-m", f"models:/{name}/{v3}", *accept)
    line = one_line_error(failed, 3, f"{name} v{v3} failed acceptance: accuracy")
    assert "rolled back" in line and "alias 'dev' unchanged" in line
    assert node.client.versions(name) == {} and aliases(node, name).get("dev") is None
    assert "deployed_dev_at" not in registry.get_model_version(name, v3).tags

    # create v1: acceptance passes, the server serves it by default, alias dev moves.
    created = deployments(node, "create", "-t", "flywheel", "--name", name, "-m", f"models:/{name}/{v1}", *accept)
    assert created.returncode == 0, created.stderr[-3000:]
    assert f"onnx deployment {name} is created" in created.stdout
    assert "acceptance passed" in created.stderr and f"alias dev → v{v1}" in created.stderr
    assert node.client.versions(name) == {v1: True}
    assert aliases(node, name)["dev"] == v1 and "deployed_dev_at" in registry.get_model_version(name, v1).tags

    got = deployments(node, "get", "-t", "flywheel", "--name", name)
    assert got.returncode == 0, got.stderr[-3000:]
    fields = dict(line.split(": ", 1) for line in got.stdout.splitlines() if ": " in line)
    assert fields["name"] == name and fields["default_version"] == v1 and fields["flavor"] == "onnx"
    assert f"'dev': '{v1}'" in fields["aliases"] and fields["warnings"] == "[]"

    listed = deployments(node, "list", "-t", "flywheel")
    assert listed.returncode == 0 and f"'name': '{name}'" in listed.stdout and f"'default_version': '{v1}'" \
        in listed.stdout, listed.stdout + listed.stderr[-2000:]

    # predict: rows by file path and by base64 PNG; the labels are what the registry's v1 answers.
    images = load_splits("fashion-mnist").test.images[200:216]
    inputs = _predict_input(images, tmp_path)
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

    # update to v2: switch, alias moves, v1 kept for A/B (keep_previous=1).
    updated = deployments(node, "update", "-t", "flywheel:/dev", "--name", name, "-m", f"models:/{name}/{v2}", *accept)
    assert updated.returncode == 0, updated.stderr[-3000:]
    assert f"Deployment {name} is updated (with flavor onnx)" in updated.stdout
    assert node.client.versions(name) == {v1: False, v2: True} and aliases(node, name)["dev"] == v2

    # delete: every version goes; alias dev is kept (and said to serve nothing here), the version tagged.
    deleted = deployments(node, "delete", "-t", "flywheel", "--name", name)
    assert deleted.returncode == 0 and f"Deployment {name} is deleted" in deleted.stdout, deleted.stderr[-3000:]
    assert f"alias 'dev' still names {name} v{v2}" in deleted.stderr
    assert node.client.versions(name) == {} and aliases(node, name)["dev"] == v2
    assert "undeployed_dev_at" in registry.get_model_version(name, v2).tags


@pytest.mark.reliability
def test_mlflow_deployments_refusals_and_ab(node, serving_models, tmp_path):
    """help; each refusal is one `Error:` line; A/B predict of the kept version; deleting one version,
    then everything with remove_alias; a second delete is a no-op; get of nothing says so."""
    from flywheel.core.data import load_splits

    name = serving_models.name
    v1, v2, _v3 = serving_models.versions
    accept = acceptance(serving_models)
    empty_node(node, name)

    helped = deployments(node, "help", "-t", "flywheel")
    assert helped.returncode == 0 and "FLYWHEEL_TS_KEY_FILE" in helped.stdout and "min_accuracy" in helped.stdout
    created = deployments(node, "create", "-t", "flywheel:/prod", "--name", name, "-m", f"models:/{name}/{v1}",
                          *accept)
    assert created.returncode == 0 and aliases(node, name)["prod"] == v1, created.stderr[-3000:]
    one_line_error(deployments(node, "create", "-t", "flywheel:/prod", "--name", name, "-m", f"models:/{name}/{v2}"),
                   2, "already exists")
    one_line_error(deployments(node, "create", "-t", "flywheel", "--name", "other", "-m", f"models:/{name}/{v2}"),
                   2, "differs from the model")
    updated = deployments(node, "update", "-t", "flywheel", "--name", name, "-m", f"models:/{name}/{v2}",
                          "-C", "env=prod", *accept)
    assert updated.returncode == 0 and aliases(node, name)["prod"] == v2, updated.stderr[-3000:]

    inputs = _predict_input(load_splits("fashion-mnist").test.images[:4], tmp_path)
    ab = deployments(node, "predict", "-t", "flywheel", "--name", f"{name}/{v1}", "-I", str(inputs))
    assert ab.returncode == 0 and json.loads(ab.stdout)["versions"] == [v1], ab.stderr[-3000:]
    one_line_error(deployments(node, "explain", "-t", "flywheel", "--name", name, "-I", str(inputs)), 2,
                   "explain is not supported")
    one_line_error(deployments(node, "delete", "-t", "flywheel:/prod", "--name", name, "-C", f"version={v2}"), 2,
                   f"v{v2} is the serving default")
    one_line_error(deployments(node, "update", "-t", "flywheel:/prod", "--name", name, "-C", "env=dev"), 2,
                   "contradicts target")
    one_line_error(deployments(node, "update", "-t", "flywheel:/prod", "--name", name, "-C", "workers=x"), 2,
                   "expected an integer")

    one = deployments(node, "delete", "-t", "flywheel:/prod", "--name", name, "-C", f"version={v1}")
    assert one.returncode == 0 and node.client.versions(name) == {v2: True}, one.stderr[-3000:]
    gone = deployments(node, "delete", "-t", "flywheel:/prod", "--name", name, "-C", "remove_alias=true")
    assert gone.returncode == 0 and "removed alias 'prod'" in gone.stderr, gone.stderr[-3000:]
    assert node.client.versions(name) == {} and "prod" not in aliases(node, name)
    assert deployments(node, "delete", "-t", "flywheel", "--name", name).returncode == 0
    one_line_error(deployments(node, "get", "-t", "flywheel", "--name", name), 2, f"no deployment {name}")


def _predict_input(images, tmp_path: Path) -> Path:
    """`mlflow deployments predict -I` rows: even images as files (`path`), odd ones as base64 (`image`)."""
    from flywheel.contracts.preprocessing import encode_png

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
    return inputs


def test_target_reads_serve_env(node, serving_models, tmp_path):
    """No FLYWHEEL_TS_* set: the node is the one `flywheel serve` wrote into $FLYWHEEL_HOME/serving/serve.env."""
    from flywheel.core.config import export_lines

    home = tmp_path / "home"
    (home / "serving").mkdir(parents=True)
    (home / "serving" / "serve.env").write_text(export_lines({k: v for k, v in node.env.items()
                                                              if k.startswith("FLYWHEEL_TS_")}))
    env = {k: v for k, v in node.env.items() if not k.startswith("FLYWHEEL_TS_")}
    proc = subprocess.run([str(MLFLOW), "deployments", "list", "-t", "flywheel"], env={**env, "FLYWHEEL_HOME": str(home)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("List of all deployments:"), proc.stderr[-3000:]


def test_target_needs_the_serving_node(flywheel_target, tmp_path):
    """Without FLYWHEEL_TS_* and without a serve.env the target says what it needs, in one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_TS_")}
    env["FLYWHEEL_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([str(MLFLOW), "deployments", "list", "-t", "flywheel"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    one_line_error(proc, 2, "FLYWHEEL_TS_KEY_FILE")
