"""Superseded release/train requests and retried retrain events (flywheel.control.dispatches).

The decisions are tested on plain data shaped like GitHub's REST answers (no GitHub, no fake API);
the registry bookkeeping and the event dedupe run against a real MLflow store (embedded SQLite via
Settings), and the event id is followed from a training's environment to its run's tag."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner

from flywheel.control.dispatches import (
    EVENT_TAG,
    EventRun,
    Job,
    Marker,
    Outcome,
    Request,
    find_current,
    find_superseded,
    parse_request,
    plan_event,
)
from flywheel.core.errors import FlywheelError

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
URL = "https://github.com/acme/flywheel/actions/runs/{}"


def job(run: int, name: str, minute: float, conclusion: str | None = "cancelled", ran: bool = False,
        status: str = "completed", title: str = "") -> Job:
    return Job(run_id=run, job_id=run * 10, name=name, status=status, conclusion=conclusion,
               created_at=T0 + timedelta(minutes=minute), ran=ran, run_url=URL.format(run), run_title=title)


def current(run: int, name: str, minute: float) -> Job:
    return job(run, name, minute, conclusion=None, ran=True, status="in_progress")


# ------------------------------------------------------------------------------------ names
def test_request_names_round_trip_including_called_workflow_jobs():
    release = parse_request("release-dev / flywheel release fashion-classifier v12 to dev")
    assert release == Request("release", "fashion-classifier", "dev", version="12")
    assert release.describe() == "release fashion-classifier v12 to dev"
    train = parse_request("retrain / flywheel train fashion-classifier on refs/heads/main for drift event 9f2c")
    assert train == Request("train", "fashion-classifier", "refs/heads/main", reason="drift", event_id="9f2c")
    assert train.group == ("train", "fashion-classifier", "refs/heads/main")
    assert parse_request("flywheel train m on refs/heads/main for push").event_id is None
    # Names GitHub did not evaluate, or that are not requests, are unreadable rather than misread.
    assert parse_request("flywheel release ${{ inputs.model_name }} v${{ inputs.model_version }} to dev") is None
    assert parse_request("release") is None and parse_request("") is None
    with pytest.raises(FlywheelError, match="unknown request kind"):
        Request("deploy", "m", "dev")


def test_job_from_github_api_objects():
    run = {"id": 7001, "html_url": URL.format(7001), "display_title": "flywheel release m v4 to dev",
           "created_at": "2026-03-02T10:00:00Z", "updated_at": "2026-03-02T10:05:00Z", "status": "completed",
           "conclusion": "cancelled"}
    pending = {"id": 90001, "run_id": 7001, "name": "flywheel release m v4 to dev", "status": "completed",
               "conclusion": "cancelled", "created_at": "2026-03-02T10:00:03Z", "started_at": "2026-03-02T10:00:03Z",
               "completed_at": "2026-03-02T10:05:00Z", "steps": [], "runner_id": None, "runner_name": None}
    j = Job.from_api(pending, run)
    assert j.cancelled_before_running and j.request == Request("release", "m", "dev", version="4")
    assert j.created_at == T0 + timedelta(seconds=3) and j.run_url == URL.format(7001)
    started = {**pending, "runner_name": "serving-dev-1", "steps": [{"name": "Set up job", "status": "completed"}]}
    assert Job.from_api(started, run).ran and not Job.from_api(started, run).cancelled_before_running
    with pytest.raises(FlywheelError, match="unexpected job object"):
        Job.from_api({"name": "x"}, run)


# ------------------------------------------------------------------------------------ supersession
def test_the_third_release_records_the_one_github_dropped_and_nothing_of_other_groups():
    req = Request("release", "m", "dev", version="5")
    jobs = [
        job(1, "flywheel release m v3 to dev", 0, conclusion="success", ran=True),  # A ran
        job(2, "flywheel release m v4 to dev", 1),  # B waited behind A; C's arrival cancelled it
        job(3, "release-dev / flywheel release m v6 to dev", 1.2),  # a train run's release, same group
        job(4, "flywheel release other-model v1 to dev", 1.5),  # another model: never ours
        job(5, "flywheel release m v9 to prod", 1.6),  # another environment: never ours
        job(6, "flywheel release m v2 to dev", -1),  # before A: A superseded it, not C
        job(8, "flywheel release m v7 to dev", 3),  # after C: whoever runs later reports it
        job(9, "flywheel release m v8 to dev", 1.7, conclusion="failure"),  # failed, not superseded
    ]
    me = current(7, "flywheel release m v5 to dev", 2)
    out = find_superseded(me, req, jobs)
    assert [s.job.run_id for s in out.superseded] == [2, 3]
    assert [s.request.version for s in out.superseded] == ["4", "6"]
    assert out.previous_url == URL.format(1) and not out.unreadable
    text = out.markdown()
    assert "release m v4 to dev" in text and URL.format(2) in text and URL.format(7) in text
    assert "other-model" not in text and "prod" not in text
    data = out.as_dict()
    assert [s["run_id"] for s in data["superseded"]] == [2, 3] and json.dumps(data)


def test_the_registry_marker_and_a_run_cancelled_while_running_bound_the_window():
    req = Request("release", "m", "dev", version="5")
    me = current(9, "flywheel release m v5 to dev", 10)
    jobs = [job(2, "flywheel release m v2 to dev", 1), job(3, "flywheel release m v3 to dev", 4)]
    marker = Marker(job_id=999, created_at=T0 + timedelta(minutes=3), run_url=URL.format(99))
    out = find_superseded(me, req, jobs, marker)
    assert [s.job.run_id for s in out.superseded] == [3] and out.previous_url == URL.format(99)
    # A request that ran and was then cancelled by hand executed: it is the previous one, not superseded.
    jobs.append(job(5, "flywheel release m v4 to dev", 6, ran=True))
    jobs.append(job(6, "flywheel release m v4b to dev", 7))
    out = find_superseded(me, req, jobs, marker)
    assert [s.job.run_id for s in out.superseded] == [6] and out.previous_url == URL.format(5)
    # Without any previous run the lookback bounds the window.
    out = find_superseded(me, req, [job(2, "flywheel release m v2 to dev", -60 * 24 * 8),
                                     job(3, "flywheel release m v3 to dev", 1)])
    assert [s.job.run_id for s in out.superseded] == [3] and out.previous_url is None


def test_unreadable_cancelled_jobs_are_listed_and_run_titles_are_a_fallback():
    req = Request("release", "m", "dev", version="5")
    me = current(9, "flywheel release m v5 to dev", 10)
    jobs = [
        job(2, "release", 2, title="flywheel release m v4 to dev"),  # name unevaluated: the run-name says it
        job(3, "release-dev / flywheel release ${{ inputs.model_name }} v${{ inputs.model_version }} to dev", 3),
        job(4, "flywheel train m on refs/heads/main for push", 4),  # another kind: not ours to report
        job(9, "flywheel release m v5b to dev", 5),  # this run's own jobs never count
    ]
    out = find_superseded(me, req, jobs)
    assert [s.job.run_id for s in out.superseded] == [2]
    assert [j.run_id for j in out.unreadable] == [3]
    assert "not readable" in out.markdown() and URL.format(3) in out.markdown()
    quiet = find_superseded(me, req, [])
    assert "No request of this group was cancelled" in quiet.markdown()


def test_trainings_supersede_per_model_and_ref():
    req = Request("train", "m", "refs/heads/main", reason="drift", event_id="e3")
    me = current(9, "retrain / flywheel train m on refs/heads/main for drift event e3", 10)
    jobs = [job(2, "retrain / flywheel train m on refs/heads/main for drift event e1", 2),
            job(3, "flywheel train m on refs/heads/main for push", 3),
            job(4, "flywheel train m on refs/heads/dev for push", 4),
            job(5, "flywheel train other on refs/heads/main for schedule", 5)]
    out = find_superseded(me, req, jobs)
    assert [(s.request.reason, s.request.event_id) for s in out.superseded] == [("drift", "e1"), ("push", None)]
    assert "train m on refs/heads/main for drift event e1" in out.markdown()


def test_find_current_picks_this_runs_executing_job():
    req = Request("release", "m", "dev", version="4")
    jobs = [job(5, "train", 0, conclusion="success", ran=True),
            current(5, "release-dev / flywheel release m v4 to dev", 30)]
    assert find_current(jobs, req).name.endswith("v4 to dev")
    with pytest.raises(FlywheelError, match="no running job"):
        find_current(jobs[:1], req)


# ------------------------------------------------------------------------------------ events
def test_event_plan_skips_only_a_served_event_and_never_drops_superseded_requests():
    now = T0 + timedelta(hours=1)
    assert plan_event("e1", [], now).train
    finished = EventRun("r1", "FINISHED", T0)
    plan = plan_event("e1", [finished], now)
    assert not plan.train and plan.run_id == "r1" and "skipping" in plan.note
    assert not plan_event("e1", [EventRun("r2", "RUNNING", now - timedelta(minutes=5))], now).train
    # A RUNNING run older than the stale limit is a dead job; FAILED/KILLED ones did not serve the event.
    assert plan_event("e1", [EventRun("r3", "RUNNING", now - timedelta(hours=7))], now).train
    failed = plan_event("e1", [EventRun("r4", "FAILED", T0), EventRun("r5", "KILLED", T0)], now)
    assert failed.train and "r4" in failed.note
    forced = plan_event("e1", [finished], now, superseded=2)
    assert forced.train and "superseded 2" in forced.note


# ------------------------------------------------------------------------------------ real MLflow store
@pytest.fixture
def store(tmp_path):
    from flywheel.core.config import Settings

    return Settings.from_env(work_dir=tmp_path / "home", model_name="m").apply()


def _outcome(me: Job, req: Request, jobs: list[Job], marker: Marker | None = None) -> Outcome:
    return find_superseded(me, req, jobs, marker)


def test_registry_records_superseded_releases_and_the_marker_moves_forward(store):
    import mlflow

    from flywheel.control.dispatches import marker_key, record_outcome, registry_marker, superseded_records

    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source="file:///nonexistent/model")
    req = Request("release", "m", "dev", version="2")
    me = current(30, "flywheel release m v2 to dev", 10)
    out = _outcome(me, req, [job(10, "flywheel release m v1 to dev", 5),
                             job(20, "flywheel release m v9 to dev", 6)])  # v9 was never registered
    written = record_outcome(store, out)
    assert len(written) == 3, written
    assert superseded_records(store, "m") == {"10": URL.format(30), "20": URL.format(30)}
    tags = client.get_registered_model("m").tags
    assert tags["superseded.10.request"] == "release m v1 to dev"
    assert client.get_model_version("m", "1").tags["superseded.10"] == URL.format(30)
    marker = registry_marker(store, req)
    assert marker == Marker(me.job_id, me.created_at, me.run_url)
    # Idempotent; and an older run recording later (a re-run) cannot move the marker back.
    record_outcome(store, out)
    old = current(25, "flywheel release m v1 to dev", 4)
    record_outcome(store, _outcome(old, req, []))
    assert registry_marker(store, req) == marker
    # The next release's window starts at the marker: the jobs recorded above are not reported again.
    nxt = _outcome(current(40, "flywheel release m v3 to dev", 20), req,
                   [job(10, "flywheel release m v1 to dev", 5), job(35, "flywheel release m v2b to dev", 15)],
                   registry_marker(store, req))
    assert [s.job.run_id for s in nxt.superseded] == [35]
    assert marker_key(req) in tags and registry_marker(store, Request("release", "m", "prod")) is None


def test_registry_records_a_superseded_first_training_on_a_new_model(store):
    import mlflow

    from flywheel.control.dispatches import record_outcome, superseded_records

    req = Request("train", "brand-new", "refs/heads/main", reason="push")
    out = _outcome(current(3, "flywheel train brand-new on refs/heads/main for push", 10), req,
                   [job(2, "flywheel train brand-new on refs/heads/main for drift event e1", 5)])
    record_outcome(store, out)
    assert superseded_records(store, "brand-new") == {"2": URL.format(3)}
    tags = mlflow.MlflowClient().get_registered_model("brand-new").tags
    assert tags["superseded.2.request"] == "train brand-new on refs/heads/main for drift event e1"


def _event_run(client, experiment_id: str, event_id: str, status: str) -> str:
    run = client.create_run(experiment_id, tags={EVENT_TAG: event_id})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_check_event_against_real_runs_and_the_cli_outputs(store, tmp_path, monkeypatch):
    import mlflow

    from flywheel.cli import app
    from flywheel.control.dispatches import check_event

    client = mlflow.MlflowClient()
    assert check_event(store, "e-none").train  # no experiment yet: train
    exp = client.create_experiment(store.experiment)
    failed = _event_run(client, exp, "e1", "FAILED")
    assert check_event(store, "e1").train
    done = _event_run(client, exp, "e1", "FINISHED")
    _event_run(client, exp, "e2", "FINISHED")  # another event's run never counts for e1
    plan = check_event(store, "e1")
    assert not plan.train and plan.run_id == done and failed not in plan.note
    assert check_event(store, "e3").train
    assert check_event(store, "e1", superseded=1).train
    with pytest.raises(FlywheelError, match="event id"):
        check_event(store, "x' OR 1=1")

    out, summary = tmp_path / "gh_output", tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    res = CliRunner().invoke(app, ["dispatches", "check-event", "--event-id", "e1", "--json",
                                   "--tracking-uri", store.tracking_uri])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"train": False, "note": plan.note, "run_id": done}
    res = CliRunner().invoke(app, ["dispatches", "check-event", "--event-id", "e9",
                                   "--tracking-uri", store.tracking_uri])
    assert res.exit_code == 0 and "no finished or running training" in res.output
    assert out.read_text() == "train=false\ntrain=true\n"
    assert "skipping this retried delivery" in summary.read_text()


def test_record_superseded_refuses_without_a_token(store, monkeypatch):
    from flywheel.cli import app

    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    res = CliRunner().invoke(app, ["dispatches", "record-superseded", "--kind", "release", "--model", "m",
                                   "--target", "dev", "--version", "1", "--workflow", "release.yml",
                                   "--repository", "acme/flywheel", "--run-id", "5",
                                   "--tracking-uri", store.tracking_uri], terminal_width=300)
    assert res.exit_code == 2 and "GITHUB_TOKEN" in res.output


# ------------------------------------------------------------------------------------ event id flow
def test_remote_train_hands_the_event_id_to_the_job_env():
    from flywheel.core.config import Settings
    from flywheel.training.dispatch.job import remote_env
    from flywheel.training.dispatch.nodes import Node

    settings = Settings.from_env(tracking_uri="http://tracking.internal")
    node = Node(host="gpu1", user="train")
    assert remote_env(settings, node, "a" * 40, "e7")["FLYWHEEL_EVENT_ID"] == "e7"
    assert "FLYWHEEL_EVENT_ID" not in remote_env(settings, node, "a" * 40)


def test_a_training_with_an_event_id_is_tagged_and_a_retry_is_skipped(tmp_path, monkeypatch):
    """The job env's FLYWHEEL_EVENT_ID (what remote-train writes) becomes the run's tag, and a retried
    delivery of the same event then finds it."""
    from flywheel.control.dispatches import check_event
    from tests.fixtures_core import train_digits

    monkeypatch.setenv("FLYWHEEL_EVENT_ID", "4be1c0de")
    settings, result = train_digits(tmp_path / "home", "event-model", epochs=1, register=False,
                                    max_train_samples=256)
    import mlflow

    assert mlflow.MlflowClient().get_run(result.run_id).data.tags[EVENT_TAG] == "4be1c0de"
    plan = check_event(settings, "4be1c0de")
    assert not plan.train and plan.run_id == result.run_id
    assert check_event(settings, "another-event").train


@pytest.mark.integration
def test_remote_train_carries_the_event_id_to_the_run_and_a_retry_is_skipped(ssh_node, tracking_stack, project_repo,
                                                                             tmp_path):
    """train.yml's path for a monitor's retrain: FLYWHEEL_EVENT_ID in remote-train's environment →
    the job on the node (over real SSH) → `mlflow run` → the run's tag on the real tracking node;
    then the dedupe step (`flywheel dispatches check-event`) skips a retried delivery."""
    import os
    import secrets
    import subprocess

    from tests.conftest import VENV_BIN
    from tests.fixtures_ssh import VENV_ACTIVATE, commit_on

    model, event_id = f"dispatch-event-{secrets.token_hex(4)}", secrets.token_hex(16)
    sha = commit_on(project_repo, "remote-train with a retrain event id")
    env = {**os.environ, **tracking_stack.env(), "FLYWHEEL_MODEL_NAME": model, "MLFLOW_EXPERIMENT_NAME": model,
           "FLYWHEEL_EVENT_ID": event_id, "GITHUB_OUTPUT": str(tmp_path / "gh_output"),
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    flywheel = str(VENV_BIN / "flywheel")
    done = subprocess.run([flywheel, "remote-train", "--identity", str(ssh_node.key_path), "--known-hosts",
                           str(ssh_node.known_hosts), "--repo", str(project_repo), "--node", ssh_node.spec,
                           "--env-activate", VENV_ACTIVATE, "--workdir", str(ssh_node.workdir), "--commit", sha,
                           "-P", "dataset=digits", "-P", "epochs=1", "-P", "register=false"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    check = subprocess.run([flywheel, "dispatches", "check-event", "--event-id", event_id, "--json"],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr
    plan = json.loads(check.stdout)
    assert plan["train"] is False, plan
    from mlflow import MlflowClient

    os.environ.update(tracking_stack.env())  # the client reads credentials from the environment
    run = MlflowClient(tracking_uri=tracking_stack.uri).get_run(plan["run_id"])
    assert run.data.tags[EVENT_TAG] == event_id and run.data.tags["git_commit"] == sha
    assert run.info.status == "FINISHED"
    assert "skipping this retried delivery" in (tmp_path / "summary.md").read_text()
