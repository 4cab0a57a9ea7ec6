"""`flywheel init NAME`: the scaffolded component has every file, with its names substituted, valid
YAML, an MLproject MLflow loads, workflows actionlint accepts that call Flywheel's reusable ones with
inputs they declare, a train.py on the public API only and a model that maps images to logits; a
non-empty target is refused; the template ships in the wheel."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO, VENV_BIN

FILES = {"MLproject", "conda.yaml", "Dockerfile", "README.md", "train.py", "model.py", ".gitignore",
         "tests/test_component.py", ".github/workflows/train.yml", ".github/workflows/release.yml",
         ".github/workflows/retrain.yml"}


def _init(tmp_path, *args: str, name: str = "shape-sorter"):
    from flywheel.cli import app

    target = tmp_path / name
    result = CliRunner().invoke(app, ["init", name, "--dir", str(target), *args], terminal_width=300)
    return target, result


@pytest.fixture
def component(tmp_path):
    target, result = _init(tmp_path, "--model-name", "shape-classifier", "--flywheel-repo", "acme/flywheel",
                           "--flywheel-ref", "v1.2")
    assert result.exit_code == 0, result.output
    return target


def _workflow(path) -> dict:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))
    return doc


def test_init_writes_every_file_with_names_substituted(component):
    written = {str(p.relative_to(component)) for p in component.rglob("*") if p.is_file()}
    assert written == FILES
    for rel in FILES:
        text = (component / rel).read_text()
        assert not re.search(r"__[A-Z_]+__", text), f"{rel} has a placeholder left"
    assert "name: shape-sorter" in (component / "MLproject").read_text()
    assert "flywheel[train] @ git+https://github.com/acme/flywheel@v1.2" in (component / "conda.yaml").read_text()
    assert "acme/flywheel@v1.2" in (component / "Dockerfile").read_text()


def test_mlproject_loads_in_mlflow_with_the_train_parameters(component):
    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(component))
    assert project.name == "shape-sorter"
    entry = project.get_entry_point("train")
    # What every Flywheel component's train takes (the workflows pass epochs, extra_data and dataset).
    assert {"epochs", "batch_size", "lr", "seed", "register", "margin", "dataset", "extra_data",
            "max_train_samples", "data_dir"} <= set(entry.parameters)
    command = entry.compute_command({"epochs": "1", "extra_data": ""}, storage_dir=None)
    assert command.startswith("python train.py --dataset fashion-mnist --epochs 1 ")
    assert yaml.safe_load((component / "conda.yaml").read_text())["name"] == "shape-sorter"


def test_train_py_uses_only_the_public_component_api(component):
    tree = ast.parse((component / "train.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    flywheel = {m for m in imported if m == "flywheel" or m.startswith("flywheel.")}
    assert flywheel == {"flywheel.component"}, flywheel
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "fc"}
    assert {"load_dataset", "FitConfig", "train"} <= calls
    train_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "train")
    assert {k.arg for k in train_call.keywords} >= {"embedding", "register", "margin"}
    compile((component / "tests" / "test_component.py").read_text(), "test_component.py", "exec")


def test_model_maps_images_to_logits_and_names_an_embedding(component):
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); from model import Net\n"
            "for c in (1, 3):\n"
            "    net = Net(num_classes=5, channels=c).eval()\n"
            "    x = torch.rand(4, c, 28, 28)\n"
            "    feats = []\n"
            "    net.get_submodule('features').register_forward_hook(lambda m, i, o: feats.append(o))\n"
            "    assert net(x).shape == (4, 5) and feats[0].shape[0] == 4 and feats[0].ndim == 2\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code, str(component)], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_calling_workflows_are_short_valid_and_match_flywheels_inputs(component):
    workflows = component / ".github" / "workflows"
    done = subprocess.run([str(VENV_BIN / "actionlint"), *map(str, sorted(workflows.glob("*.yml")))],
                          capture_output=True, text=True, check=False, cwd=component)
    assert done.returncode == 0, done.stdout + done.stderr
    for path in sorted(workflows.glob("*.yml")):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(lines) <= 40, f"{path.name}: a caller should be a few lines, has {len(lines)}"
        for job_id, job in _workflow(path)["jobs"].items():
            prefix, _, ref = job["uses"].partition("@")
            assert prefix.startswith("acme/flywheel/.github/workflows/") and ref == "v1.2", job["uses"]
            called = _workflow(REPO / ".github" / "workflows" / prefix.rsplit("/", 1)[1])["on"]["workflow_call"]
            declared = called["inputs"]
            assert set(job["with"]) <= set(declared), f"{path.name}/{job_id}: unknown inputs"
            required = {k for k, v in declared.items() if v.get("required")}
            assert required <= set(job["with"]), f"{path.name}/{job_id}: missing {required - set(job['with'])}"
            assert job["secrets"] == "inherit"
            assert job["with"]["model_name"].count("shape-classifier") == 1


def test_retrain_caller_trains_the_payloads_model_project_and_commit(component):
    job = _workflow(component / ".github" / "workflows" / "retrain.yml")["jobs"]["retrain"]
    assert _workflow(component / ".github" / "workflows" / "retrain.yml")["on"]["repository_dispatch"]["types"] == ["retrain"]
    for key, field in (("model_name", "model"), ("project", "project"), ("project_dir", "project_dir"),
                       ("commit", "commit"), ("event_id", "event_id")):
        assert f"github.event.client_payload.{field}" in job["with"][key], key
    assert "client_payload.snapshot" in job["with"]["extra_params"]
    train = _workflow(component / ".github" / "workflows" / "train.yml")["jobs"]
    assert train["train"]["with"]["release_dev"] == "false" and train["release-dev"]["needs"] == "train"


def test_init_refuses_a_non_empty_target_and_bad_names(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    _, result = _init(tmp_path, name="taken")
    assert result.exit_code == 2 and "already exists and is not empty" in result.output, result.output
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _, result = _init(tmp_path, name="empty")
    assert result.exit_code == 0, result.output
    for bad in ("My Model", "1abc", "a/b"):
        _, result = _init(tmp_path, name=bad)
        assert result.exit_code == 2 and "component name" in result.output, (bad, result.output)
    _, result = _init(tmp_path, "--flywheel-repo", "not-a-repo", name="okay")
    assert result.exit_code == 2 and "OWNER/NAME" in result.output


def test_the_template_ships_in_the_wheel(tmp_path):
    from flywheel.training.scaffold import _walk, output_path, template_root

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("flywheel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("flywheel/templates/component/")}
    expected = {"flywheel/templates/component/" + "/".join(parts) for parts, _ in _walk(template_root())}
    assert shipped == expected
    assert {str(output_path(tuple(n.split("/")[3:]))) for n in shipped} == FILES


@pytest.mark.integration
def test_scaffolded_component_trains_end_to_end(tmp_path):
    """The scaffold's own test, run as its team would: `mlflow run . -e train` (1 epoch, digits sample)
    on a SQLite store, gated, registered, and loaded back from the registry through the contract."""
    import os

    target, result = _init(tmp_path, name="fresh-component")
    assert result.exit_code == 0, result.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=target,
                          env=env, capture_output=True, text=True, timeout=1500, check=False)
    assert done.returncode == 0 and "1 passed" in done.stdout, (done.stdout + done.stderr)[-5000:]
