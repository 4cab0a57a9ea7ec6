"""`flywheel report` on a pull request's run (issue 16): real runs logged by a real (tiny) training,
a champion registered by the real gate and aliased `prod`, the report rendered by the real CLI and
checked against what MLflow holds; and the guarantee that a report never moves an alias."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from tests.fixtures_core import train_digits

MODEL = "digits-classifier"  # the session's trained_digits_model (tests/fixtures_core.py)

MLFLOW_URL = "http://mlflow.example:5000"  # only the links' base: nothing is fetched from it


@dataclass(frozen=True)
class PullRequestRuns:
    home: Path
    tracking_uri: str
    champion_run: str  # the run of v1: the champion (no `prod` in this store: the best registered version)
    pr_run: str  # trained with another seed (another train/val split: another dataset digest), not registered


@pytest.fixture(scope="module")
def pr_runs(trained_digits_model) -> PullRequestRuns:
    """The session's digits model is the champion; a quick run of the same code is the pull request's.
    The PR run is not registered: the session store's registry stays exactly as other tests expect."""
    home = trained_digits_model.home
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    try:
        _, pr = train_digits(home, MODEL, epochs=1, seed=1, max_train_samples=300, register=False)
        assert pr.registered_version is None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return PullRequestRuns(home, trained_digits_model.tracking_uri, trained_digits_model.run_id, pr.run_id)


def _report(runs: PullRequestRuns, *args: str):
    from flywheel.cli import app

    result = CliRunner().invoke(app, ["report", "--model", MODEL, "--tracking-uri", runs.tracking_uri, *args],
                                env={"FLYWHEEL_HOME": str(runs.home)}, terminal_width=200)
    assert result.exit_code == 0, result.output
    return result


def _registry_state(uri: str) -> tuple[list[str], dict[str, str]]:
    client = mlflow.MlflowClient(uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    return versions, {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def test_report_compares_the_run_with_the_champion(pr_runs, tmp_path):
    client = mlflow.MlflowClient(pr_runs.tracking_uri)
    run, champ = client.get_run(pr_runs.pr_run), client.get_run(pr_runs.champion_run)
    before = _registry_state(pr_runs.tracking_uri)
    out = tmp_path / "flywheel-report"
    _report(pr_runs, "--run", pr_runs.pr_run, "--out", str(out), "--mlflow-url", MLFLOW_URL, "--margin", "1.0")
    # Nothing registered, no alias moved, nothing recorded on the run.
    assert _registry_state(pr_runs.tracking_uri) == before == (["1"], {"candidate": "1"})
    assert "gate.decision" not in client.get_run(pr_runs.pr_run).data.tags

    doc = json.loads((out / "report.json").read_text())
    assert doc["run"]["run_id"] == pr_runs.pr_run and doc["champion"]["run_id"] == pr_runs.champion_run
    assert doc["champion"]["version"] == "1"
    # The metrics table holds exactly the runs' logged values (system metrics left out), with deltas.
    rows = {r["metric"]: r for r in doc["metrics"]}
    assert doc["metrics"][0]["metric"] == "test_accuracy"
    logged = {k for k in (*run.data.metrics, *champ.data.metrics) if not k.startswith("system/")}
    assert set(rows) == logged
    for key, row in rows.items():
        assert row["run"] == run.data.metrics.get(key) and row["champion"] == champ.data.metrics.get(key), key
        if row["run"] is not None and row["champion"] is not None:
            assert row["delta"] == pytest.approx(row["run"] - row["champion"]), key

    # The gate: both models on the PR run's test set; a 1.0 margin can never be beaten.
    gate = doc["gate"]
    assert gate["accepted"] is False and gate["registered_version"] is None and gate["champion_version"] == "1"
    assert gate["metric"] == "accuracy" and gate["margin"] == 1.0
    n = doc["n_test"]
    assert gate["challenger_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"], abs=1.5 / n)
    assert gate["champion_accuracy"] == pytest.approx(champ.data.metrics["test_accuracy"], abs=1.5 / n)

    # Per class: every digit, recall weighted by support is the accuracy the gate measured.
    classes = doc["classes"]
    assert [c["name"] for c in classes] == [str(d) for d in range(10)]
    assert sum(c["support"] for c in classes) == n
    assert sum(c["recall"] * c["support"] for c in classes) / n == pytest.approx(gate["challenger_accuracy"])
    assert sum(c["champion_recall"] * c["support"] for c in classes) / n == pytest.approx(gate["champion_accuracy"])

    md = (out / "report.md").read_text()
    assert "**would not register** this run as `candidate`" in md and "Nothing was registered" in md
    test_acc = rows["test_accuracy"]
    assert (f"| test_accuracy | {test_acc['run']:.4f} | {test_acc['champion']:.4f} | {test_acc['delta']:+.4f}"
            in md)
    for c in classes:
        assert f"| {c['name']} | {c['support']} | {c['recall']:.4f} | {c['champion_recall']:.4f} | " in md
    # Data: another seed is another train/val split, so another digest; same commit, same dataset.
    digest, champ_digest = run.data.tags["dataset_digest"], champ.data.tags["dataset_digest"]
    assert digest != champ_digest
    assert f"| dataset digest | `{digest[:12]}` | `{champ_digest[:12]}` | **changed** |" in md
    assert "| dataset | `digits` | `digits` | unchanged |" in md
    # Links to both runs and the champion's version in the MLflow UI.
    for r in (run, champ):
        assert f"{MLFLOW_URL}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}" in md
    assert f"{MLFLOW_URL}/#/models/{MODEL}/versions/1" in md

    # The images: real PNGs, embedded in report.md by relative path, named (not embedded) in the comment.
    from PIL import Image

    assert sorted(doc["images"]) == ["champion_confusion_matrix.png", "confusion_matrix.png", "loss_curves.png"]
    for name in doc["images"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG" and min(img.size) > 100
        assert f"]({name})" in md
    comment = (out / "comment.md").read_text()
    assert comment.splitlines()[0] == f"<!-- flywheel-report model={MODEL} -->"
    assert "](confusion_matrix.png)" not in comment and "`confusion_matrix.png`" in comment
    assert pr_runs.pr_run in comment and "**would not register**" in comment


def test_gate_decision_the_other_way_and_json_on_stdout(pr_runs):
    before = _registry_state(pr_runs.tracking_uri)
    doc = json.loads(_report(pr_runs, "--run", pr_runs.pr_run, "--margin", "-1.0", "--json").stdout)
    assert doc["gate"]["accepted"] is True and doc["gate"]["registered_version"] is None
    assert doc["images"] == [] and doc["tracking_url"] is None  # no --out: no images; a sqlite store: no links
    assert _registry_state(pr_runs.tracking_uri) == before  # "would register" registers nothing
    text = _report(pr_runs, "--run", pr_runs.pr_run, "--margin", "-1.0").stdout
    assert "**would register** this run as `candidate`: it beats champion v1" in text
    assert f"runs:/{pr_runs.pr_run}" in text


def test_report_finds_the_newest_run_of_a_commit(pr_runs, tmp_path):
    from flywheel.core.config import Settings
    from flywheel.core.errors import FlywheelError
    from flywheel.training.report import find_run

    settings = Settings.from_env(work_dir=pr_runs.home, tracking_uri=pr_runs.tracking_uri, model_name=MODEL)
    sha = mlflow.MlflowClient(pr_runs.tracking_uri).get_run(pr_runs.pr_run).data.tags["git_commit"]
    # Both runs trained this commit; the PR run is the newer one. A prefix works outside a git checkout.
    assert find_run(settings, sha) == pr_runs.pr_run
    assert find_run(settings, sha[:10], cwd=tmp_path) == pr_runs.pr_run
    with pytest.raises(FlywheelError, match="no finished MLflow run of commit"):
        find_run(settings, "0123456789abcdef", cwd=tmp_path)
    with pytest.raises(FlywheelError, match="is not a commit here"):
        find_run(settings, "no-such-branch", cwd=tmp_path)
    doc = json.loads(_report(pr_runs, "--commit", sha, "--json").stdout)
    assert doc["run"]["run_id"] == pr_runs.pr_run


def test_a_report_names_exactly_one_run(pr_runs):
    from flywheel.cli import app

    base = ["report", "--model", MODEL, "--tracking-uri", pr_runs.tracking_uri]
    for args in (["--out", "x"], ["--run", pr_runs.pr_run, "--version", "1"]):
        result = CliRunner().invoke(app, [*base, *args], env={"FLYWHEEL_HOME": str(pr_runs.home)})
        assert result.exit_code == 2 and "exactly one of --run, --commit or --version" in result.output, result.output


# ------------------------------------------------------------------ the workflow side (train.yml on PRs)
FORK_GUARD = "github.event.pull_request.head.repo.full_name == github.repository"


def _workflows() -> dict[str, dict]:
    import yaml

    from tests.conftest import REPO

    docs = {}
    for path in sorted((REPO / ".github" / "workflows").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads a bare `on:` key as True
        docs[path.stem] = doc
    return docs


def _reads_secrets(job: dict) -> bool:
    text = json.dumps({k: v for k, v in job.items() if k != "if"})
    return job.get("secrets") == "inherit" or any(
        f"secrets.{name}" in text for name in ("FLYWHEEL_", "MLFLOW_"))


def test_no_pull_request_target_and_every_job_with_secrets_is_closed_to_forks():
    for name, doc in _workflows().items():
        assert "pull_request_target" not in doc["on"], f"{name}.yml: pull_request_target runs forks' code with secrets"
        if "pull_request" not in doc["on"]:
            continue  # release.yml and retrain.yml: a pull request reaches them only through a guarded job
        for job_id, job in doc["jobs"].items():
            if not _reads_secrets(job):
                continue
            cond = " ".join(str(job.get("if", "")).split())
            # A pull request never carries a retrain event id, and release-dev never runs for one.
            closed = (FORK_GUARD in cond or cond == "inputs.event_id != ''"
                      or "github.event_name != 'pull_request'" in cond)
            assert closed, f"{name}.yml/{job_id} reads secrets but a fork's pull request could start it"


def test_a_pull_request_trains_short_never_registers_and_comments_once():
    doc = _workflows()["train"]
    assert "pull_request" in doc["on"] and set(doc["on"]["pull_request"]["paths"]) == set(doc["on"]["push"]["paths"])
    assert "pr_params" in doc["on"]["workflow_call"]["inputs"]
    (step,) = [s for s in doc["jobs"]["train"]["steps"] if "remote-train" in s.get("run", "")]
    params = " ".join(step["env"]["FLYWHEEL_TRAIN_PARAMS"].split())
    assert "github.event_name == 'pull_request'" in params and "register=false" in params
    assert "inputs.pr_params || vars.FLYWHEEL_PR_PARAMS" in params and params.endswith("|| env.FLYWHEEL_TRAIN_PARAMS }}")
    assert "github.event_name != 'pull_request'" in doc["jobs"]["release-dev"]["if"]
    # Only the report job may write, and only to pull requests.
    assert all(v == "read" for v in doc["permissions"].values())
    report = doc["jobs"]["report"]
    assert report["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert report["needs"] == "train" and "github.event_name == 'pull_request'" in report["if"]
    runs = [s["run"] for s in report["steps"] if "run" in s]
    assert any(r.startswith('flywheel report --run "$RUN_ID" --out flywheel-report') for r in runs)
    assert report["env"]["RUN_ID"] == "${{ needs.train.outputs.run_id }}"
    upload = next(s for s in report["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "flywheel-report"
    script = next(s for s in report["steps"] if str(s.get("uses", "")).startswith("actions/github-script"))
    code = script["with"]["script"]
    # The comment's first line (flywheel.training.report.marker) finds the one comment to edit in place.
    assert "flywheel-report/comment.md" in code and "startsWith(marker)" in code
    assert "updateComment" in code and "createComment" in code and "steps.artifact.outputs" in script["env"]["ARTIFACT_URL"]


def test_callers_of_train_yml_grant_what_its_report_job_asks():
    """A called workflow's job may not ask for more than the caller grants: GitHub would refuse the run."""
    import yaml

    from tests.conftest import REPO

    retrain = _workflows()["retrain"]["jobs"]["retrain"]
    assert retrain["permissions"]["pull-requests"] == "write"
    templates = REPO / "src" / "flywheel" / "templates" / "component" / "dot-github" / "workflows"
    for name in ("train", "retrain"):
        doc = yaml.safe_load((templates / f"{name}.yml.tmpl").read_text())
        assert doc["permissions"]["pull-requests"] == "write", name
