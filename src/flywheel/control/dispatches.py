"""Requested releases and retrains are never dropped without a trace.

GitHub Actions keeps at most one *pending* job per concurrency group: a third release dispatched
while one runs and one waits cancels the waiting one, silently. Two answers were possible: run every
dispatch in order through a queue of our own on the tracking node, or let GitHub supersede and record
each superseded request. Flywheel records (option b), because:

* Releases and retrains are *desired state*, not work items: "dev serves v5" makes a waiting
  "dev serves v4" pointless, and a retrain of the newest commit with the newest labelled-captures
  snapshot (snapshots are cumulative) covers an older retrain request. Running them all in order
  would deploy versions nobody wants any more and train models that are stale before they finish.
* A queue of our own would hold GitHub runners idle while they wait for a ticket (the serving
  node has one self-hosted runner per environment), fight the jobs' timeouts and prod's required
  reviewers, and need leases to recover from dead holders: more moving parts than the problem has.
  GitHub stays the one scheduler; we only add bookkeeping on top of it.

The contract:

* Concurrency groups are one per **model + environment** (releases) and **model + git ref**
  (trainings), so a request is only ever superseded by a newer request for the same thing
  (a release of model A never cancels one of model B; dev never cancels prod).
* Every job that holds such a group has a *request name* (`RELEASE_NAME`, `TRAIN_NAME`) as its job
  name, so a job GitHub cancelled before it started still says what it asked for.
* The job that executes calls, as its first step, `flywheel dispatches record-superseded`, which lists the
  cancelled runs of the workflows that can hold the group (GitHub REST API, `status=cancelled`) and
  their jobs, and `find_superseded` picks the jobs of its group that were cancelled before they ran
  and were created after the previous executed request of the group (a marker on the registered
  model, see `registry_marker`) and before this one. Those were superseded by this run: it writes
  them to the job summary and tags the registered model (`superseded.<run_id>` = this run's URL,
  `superseded.<run_id>.request` = what was asked) and, for a release, the version that was not
  released (`superseded.<run_id>`). A cancelled job whose request cannot be read is listed too.
  Assumptions, from GitHub's documented behaviour: a run with a cancelled job concludes `cancelled`
  (so a train run whose `release-dev` job was superseded is found by `status=cancelled`), and a job
  cancelled while pending has no runner and no steps. A waiting job cancelled by hand looks the same
  and is reported the same way, naming the run that executed in its place: a trace either way.
* Retrain requests from the monitor carry an `event_id` (flywheel.monitoring.triggers.RetrainEvent). The
  training run records it as the tag `flywheel.event_id`; `plan_event` skips a request whose event
  already has a FINISHED run, or a RUNNING one younger than `stale_after_s` (a detached job on the
  training node may outlive its CI job), so a retried delivery never trains twice. FAILED or KILLED
  runs do not count (the request was not satisfied: train again). A run that superseded other
  requests always trains, even for a seen event: skipping it would drop the requests it replaced.

Decisions are plain functions on plain data (`Job`, `Request`, run summaries); the GitHub calls
(`GitHubActions`) and the registry calls (`record_outcome`, `event_runs`) are kept thin.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from flywheel.core.errors import FlywheelError
from flywheel.core.github import api_headers

if TYPE_CHECKING:
    from flywheel.core.config import Settings

KINDS = ("release", "train")
# Job names of the jobs that hold a concurrency group (the workflows spell them with ${{ }} values).
RELEASE_NAME = "flywheel release {model} v{version} to {env}"
TRAIN_NAME = "flywheel train {model} on {ref} for {reason}"  # + " event {event_id}" for monitor retrains
# Anywhere in the name: a called workflow's job is named "<caller job> / <job name>".
_RELEASE_RE = re.compile(r"flywheel release (?P<model>\S+) v(?P<version>\S+) to (?P<env>\S+)\s*$")
_TRAIN_RE = re.compile(r"flywheel train (?P<model>\S+) on (?P<ref>\S+) for (?P<reason>.+?)"
                       r"(?: event (?P<event>\S+))?\s*$")  # a hand-dispatched reason may have spaces
EVENT_TAG = "flywheel.event_id"
SUPERSEDED_PREFIX = "superseded."
MARKER_PREFIX = "flywheel.dispatch.last."
DEFAULT_LOOKBACK = timedelta(days=7)
DEFAULT_STALE_AFTER_S = 6 * 3600.0  # train.yml's job timeout: a RUNNING run older than that is dead
GITHUB_API = "https://api.github.com"


# ------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class Request:
    """What a job asked for. `target` is the environment of a release, the git ref of a training."""

    kind: str
    model: str
    target: str
    version: str | None = None  # releases
    reason: str | None = None  # trainings: push, drift, schedule, ...
    event_id: str | None = None  # trainings asked for by the monitor

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FlywheelError(f"unknown request kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if not self.model or not self.target:
            raise FlywheelError(f"a {self.kind} request needs a model and a "
                                f"{'environment' if self.kind == 'release' else 'git ref'}")

    @property
    def group(self) -> tuple[str, str, str]:
        """What the workflow's concurrency group is keyed on: only these supersede each other."""
        return self.kind, self.model, self.target

    def describe(self) -> str:
        if self.kind == "release":
            return f"release {self.model} v{self.version} to {self.target}"
        event = f" event {self.event_id}" if self.event_id else ""
        return f"train {self.model} on {self.target} for {self.reason or 'unknown reason'}{event}"


def parse_request(name: str) -> Request | None:
    """The request a job name (`RELEASE_NAME`, `TRAIN_NAME`) or run name states; None if unreadable.

    A name GitHub did not evaluate still holds `${{`; it parses to None (an unreadable request)."""
    if not name or "${{" in name:
        return None
    if m := _RELEASE_RE.search(name):
        return Request("release", m["model"], m["env"], version=m["version"])
    if m := _TRAIN_RE.search(name):
        return Request("train", m["model"], m["ref"], reason=m["reason"], event_id=m["event"])
    return None


def _time(text: str) -> datetime:
    """GitHub's `2024-05-01T10:00:00Z` → an aware datetime."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        raise FlywheelError(f"not an ISO 8601 time from GitHub: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Job:
    """One job of a workflow run, as far as supersession is concerned."""

    run_id: int
    job_id: int
    name: str
    status: str  # queued | in_progress | completed | waiting | pending ...
    conclusion: str | None  # success | failure | cancelled | skipped | None while not completed
    created_at: datetime
    ran: bool  # a runner picked it up (it has a runner or steps): it was not superseded while pending
    run_url: str
    run_title: str = ""  # the run's display title: the request when the job name is not readable

    @property
    def request(self) -> Request | None:
        return parse_request(self.name) or parse_request(self.run_title)

    @property
    def position(self) -> tuple[datetime, int]:
        """Creation order (job ids grow with time; they break ties within one second)."""
        return self.created_at, self.job_id

    @property
    def cancelled_before_running(self) -> bool:
        return self.status == "completed" and self.conclusion == "cancelled" and not self.ran

    @classmethod
    def from_api(cls, job: dict, run: dict) -> Job:
        """From a GitHub `GET /actions/runs/{id}/jobs` job and its `GET /actions/runs` run."""
        try:
            return cls(run_id=int(run["id"]), job_id=int(job["id"]), name=str(job.get("name") or ""),
                       status=str(job.get("status") or ""), conclusion=job.get("conclusion"),
                       created_at=_time(job.get("created_at") or job.get("started_at") or run["created_at"]),
                       ran=bool(job.get("runner_name") or job.get("steps")),
                       run_url=str(run.get("html_url") or ""), run_title=str(run.get("display_title") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise FlywheelError(f"unexpected job object from the GitHub API ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Marker:
    """The last request of a group that executed (kept on the registered model between runs)."""

    job_id: int
    created_at: datetime
    run_url: str

    @property
    def position(self) -> tuple[datetime, int]:
        return self.created_at, self.job_id

    def to_json(self) -> str:
        return json.dumps({"job_id": self.job_id, "created_at": self.created_at.isoformat(), "run_url": self.run_url})

    @classmethod
    def from_json(cls, text: str) -> Marker | None:
        try:
            data = json.loads(text)
            return cls(int(data["job_id"]), _time(data["created_at"]), str(data["run_url"]))
        except (ValueError, KeyError, TypeError, FlywheelError):
            return None  # a hand-edited or foreign tag: fall back to the lookback window


@dataclass(frozen=True)
class Supersession:
    job: Job
    request: Request


@dataclass(frozen=True)
class Outcome:
    """What the executing job `current` found: the requests it ran in place of."""

    current: Job
    request: Request
    superseded: tuple[Supersession, ...] = ()
    unreadable: tuple[Job, ...] = ()  # cancelled before running, request not readable from its name
    since: datetime | None = None  # window start: the previous executed request of the group
    previous_url: str | None = None

    def markdown(self) -> str:
        head = f"### Superseded requests: {self.request.describe()}\n\n"
        since = (f"since the previous executed request ({self.previous_url})" if self.previous_url
                 else f"since {self.since:%Y-%m-%d %H:%M} UTC" if self.since else "")
        if not self.superseded and not self.unreadable:
            return head + f"No request of this group was cancelled while waiting {since}.\n"
        lines = [head + f"GitHub cancelled these requests while they waited behind another one {since}; "
                        f"this run ({self.current.run_url}) executed in their place:", "",
                 "| request | cancelled run |", "|---|---|"]
        lines += [f"| {s.request.describe()} | {s.job.run_url} |" for s in self.superseded]
        lines += [f"| (not readable: job `{j.name}`) | {j.run_url} |" for j in self.unreadable]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {"request": asdict(self.request), "run_url": self.current.run_url,
                "since": self.since.isoformat() if self.since else None, "previous_url": self.previous_url,
                "superseded": [{"run_id": s.job.run_id, "run_url": s.job.run_url, "job": s.job.name,
                                "request": asdict(s.request)} for s in self.superseded],
                "unreadable": [{"run_id": j.run_id, "run_url": j.run_url, "job": j.name} for j in self.unreadable]}


# ------------------------------------------------------------------------------------ decisions
def find_current(jobs: Sequence[Job], request: Request) -> Job:
    """The executing job of this run that holds `request`'s group."""
    mine = [j for j in jobs if j.request is not None and j.request.group == request.group
            and j.status == "in_progress"]
    if not mine:
        names = ", ".join(repr(j.name) for j in jobs) or "none"
        raise FlywheelError(f"no running job of this workflow run is named for {request.describe()!r} "
                            f"(jobs: {names}); name the job like {RELEASE_NAME!r} / {TRAIN_NAME!r}")
    return max(mine, key=lambda j: j.position)


def find_superseded(current: Job, request: Request, jobs: Iterable[Job], marker: Marker | None = None,
                    lookback: timedelta = DEFAULT_LOOKBACK) -> Outcome:
    """Which requests `current` (now executing, holding `request`'s group) was run in place of.

    A job was superseded by `current` when it belongs to the same group, GitHub cancelled it before
    any runner took it, and it was created after the previous executed request of the group and
    before `current`. The previous executed request is the later of `marker` (recorded by that
    request's own run) and any job of the group in `jobs` that ran; without either, the window is
    `lookback` long. Jobs of `current`'s own run never count (a re-run is the same request)."""
    start: tuple[datetime, int] = (current.created_at - lookback, -1)
    previous_url = None
    if marker is not None and marker.position < current.position:
        start, previous_url = marker.position, marker.run_url
    earlier = [j for j in jobs if j.run_id != current.run_id and j.position < current.position]
    for j in earlier:
        req = j.request
        if req is not None and req.group == request.group and j.ran and j.position > start:
            start, previous_url = j.position, j.run_url
    window = [j for j in earlier if j.position > start and j.cancelled_before_running]
    superseded = tuple(sorted((Supersession(j, j.request) for j in window
                               if j.request is not None and j.request.group == request.group),
                              key=lambda s: s.job.position))
    # Unreadable: only those that could be of this kind (the job or run name says so).
    unreadable = tuple(sorted((j for j in window if j.request is None
                               and request.kind in f"{j.name} {j.run_title}".lower()), key=lambda j: j.position))
    return Outcome(current, request, superseded, unreadable, start[0], previous_url)


@dataclass(frozen=True)
class EventRun:
    """An MLflow run tagged with the event id (plain data for `plan_event`)."""

    run_id: str
    status: str  # RUNNING | SCHEDULED | FINISHED | FAILED | KILLED
    start_time: datetime


@dataclass(frozen=True)
class EventPlan:
    train: bool
    note: str
    run_id: str | None = None  # the run that already serves the event

    def as_dict(self) -> dict:
        return asdict(self)


def plan_event(event_id: str, runs: Sequence[EventRun], now: datetime, superseded: int = 0,
               stale_after_s: float = DEFAULT_STALE_AFTER_S) -> EventPlan:
    """Train for `event_id`, or skip because a run already serves it (see the module docstring)."""
    done = [r for r in runs if r.status == "FINISHED"]
    live = [r for r in runs if r.status in ("RUNNING", "SCHEDULED")
            and (now - r.start_time).total_seconds() < stale_after_s]
    serving = max(done or live, key=lambda r: r.start_time, default=None)
    if serving is None:
        failed = [r.run_id for r in runs]
        return EventPlan(True, f"event {event_id}: no finished or running training" +
                         (f" (earlier attempts {', '.join(failed)} did not finish: training again)" if failed else ""))
    state = "finished" if serving.status == "FINISHED" else "is still running"
    if superseded:
        return EventPlan(True, f"event {event_id} was already trained (run {serving.run_id} {state}), but this run "
                               f"superseded {superseded} other request(s): training in their place", serving.run_id)
    return EventPlan(False, f"event {event_id} already has training run {serving.run_id} ({state}): "
                            "skipping this retried delivery", serving.run_id)


# ------------------------------------------------------------------------------------ GitHub (thin)
@dataclass(frozen=True)
class GitHubActions:
    """The two read-only calls supersession needs (GitHub REST API, token needs `actions: read`)."""

    repo: str  # owner/name
    token: str = field(repr=False)
    api_url: str = GITHUB_API
    timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.repo.count("/") != 1 or not all(self.repo.split("/")):
            raise FlywheelError(f"GitHub repository {self.repo!r} must be owner/name (GITHUB_REPOSITORY)")
        if not self.token:
            raise FlywheelError("listing workflow runs needs a token: set GITHUB_TOKEN (permissions: actions: read)")

    def _get(self, path: str, **params: object) -> dict:
        import requests

        url = f"{self.api_url.rstrip('/')}/repos/{self.repo}/{path}"
        headers = api_headers(self.token)
        try:
            resp = requests.get(url, headers=headers, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise FlywheelError(f"GitHub API {url} failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise FlywheelError(f"GitHub API {url} answered HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()

    def run(self, run_id: int) -> dict:
        return self._get(f"actions/runs/{run_id}")

    def cancelled_runs(self, workflow: str, per_page: int = 100) -> list[dict]:
        """The newest cancelled runs of one workflow file (one page: the lookback is bounded anyway)."""
        return self._get(f"actions/workflows/{workflow}/runs", status="cancelled", per_page=per_page)["workflow_runs"]

    def jobs(self, run_id: int) -> list[dict]:
        return self._get(f"actions/runs/{run_id}/jobs", filter="latest", per_page=100)["jobs"]


def collect_jobs(gh: GitHubActions, run_id: int, workflows: Sequence[str], not_before: datetime) -> tuple[list[Job], list[Job]]:
    """(this run's jobs, the jobs of cancelled runs of `workflows` updated since `not_before`)."""
    this_run = gh.run(run_id)
    own = [Job.from_api(j, this_run) for j in gh.jobs(run_id)]
    others: list[Job] = []
    seen = {int(run_id)}
    for workflow in workflows:
        for run in gh.cancelled_runs(workflow):
            # A run last updated before the window cannot hold a job cancelled inside it.
            if int(run["id"]) in seen or _time(run.get("updated_at") or run["created_at"]) < not_before:
                continue
            seen.add(int(run["id"]))
            others += [Job.from_api(j, run) for j in gh.jobs(int(run["id"]))]
    return own, others


# ------------------------------------------------------------------------------------ registry (thin)
def _client(settings: Settings):
    from flywheel.core.registry import Registry

    return Registry(settings).client


def marker_key(request: Request) -> str:
    return f"{MARKER_PREFIX}{request.kind}.{request.target}"


def _registered_model(client, name: str, create: bool):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        if not create:
            return None
    try:
        # A first training of a new model: its registered model would be created by the gate anyway.
        return client.create_registered_model(name)
    except MlflowException:
        return client.get_registered_model(name)  # created meanwhile by someone else


def registry_marker(settings: Settings, request: Request) -> Marker | None:
    """The group's previous executed request, as recorded on the registered model (None: never)."""
    model = _registered_model(_client(settings), request.model, create=False)
    text = model.tags.get(marker_key(request)) if model is not None else None
    return Marker.from_json(text) if text else None


def record_outcome(settings: Settings, outcome: Outcome) -> list[str]:
    """Tag the registry with every superseded request and move the group's marker to `current`.

    Idempotent (tags overwrite with equal values); the marker only moves forward, so a re-run of an
    old run cannot reopen a window. Returns one line per tag written, for the log."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    req = outcome.request
    _registered_model(client, req.model, create=True)
    written = []
    for s in outcome.superseded:
        key = f"{SUPERSEDED_PREFIX}{s.job.run_id}"
        client.set_registered_model_tag(req.model, key, outcome.current.run_url)
        client.set_registered_model_tag(req.model, f"{key}.request", s.request.describe())
        written.append(f"{req.model}: {key}={outcome.current.run_url}")
        if s.request.kind == "release" and s.request.version and s.request.version.isdigit():
            try:
                client.set_model_version_tag(req.model, s.request.version, key, outcome.current.run_url)
                written.append(f"{req.model} v{s.request.version}: {key}={outcome.current.run_url}")
            except MlflowException:
                pass  # the dispatch named a version that does not exist: the model's tag is the record
    previous = registry_marker(settings, req)
    mark = Marker(outcome.current.job_id, outcome.current.created_at, outcome.current.run_url)
    if previous is None or previous.position < mark.position:
        client.set_registered_model_tag(req.model, marker_key(req), mark.to_json())
    return written


def superseded_records(settings: Settings, model: str) -> dict[str, str]:
    """`superseded.<run_id>` tags of a registered model: run id → the URL of the run that superseded it."""
    found = _registered_model(_client(settings), model, create=False)
    if found is None:
        return {}
    return {k.removeprefix(SUPERSEDED_PREFIX): v for k, v in found.tags.items()
            if k.startswith(SUPERSEDED_PREFIX) and not k.endswith(".request")}


def event_runs(settings: Settings, event_id: str) -> list[EventRun]:
    """Runs of the settings' experiment tagged `flywheel.event_id = event_id`."""
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", event_id):
        raise FlywheelError(f"event id {event_id!r} must be letters, digits, _ . : - (the monitor sends hex)")
    client = _client(settings)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{EVENT_TAG}` = '{event_id}'",
                              max_results=100)
    return [EventRun(r.info.run_id, r.info.status,
                     datetime.fromtimestamp((r.info.start_time or 0) / 1000, tz=timezone.utc)) for r in runs]


# ------------------------------------------------------------------------------------ GitHub files
def _append(env_name: str, text: str, environ: dict[str, str] | None = None) -> None:
    path = (os.environ if environ is None else environ).get(env_name)
    if path:
        with open(path, "a") as fh:
            fh.write(text)


@dataclass(frozen=True)
class SupersedeOptions:
    """`flywheel dispatches record-superseded` (see cli.py for the help texts)."""

    kind: str
    model: str
    target: str
    version: str | None = None
    workflows: tuple[str, ...] = ()
    repository: str = ""
    run_id: int = 0
    api_url: str = GITHUB_API
    lookback_days: float = 7.0

    def request(self) -> Request:
        return Request(self.kind, self.model, self.target, version=self.version)


def record_superseded(settings: Settings, opts: SupersedeOptions) -> Outcome:
    """The CLI verb: find what this run supersedes, write the job summary and outputs, tag the registry."""
    if not opts.workflows:
        raise FlywheelError("name the workflow files that can hold this group with --workflow (e.g. release.yml)")
    if not opts.run_id:
        raise FlywheelError("no workflow run id: run inside GitHub Actions or pass --run-id (GITHUB_RUN_ID)")
    request = opts.request()
    gh = GitHubActions(opts.repository, os.environ.get("GITHUB_TOKEN", ""), opts.api_url)
    marker = registry_marker(settings, request)
    lookback = timedelta(days=opts.lookback_days)
    not_before = marker.created_at if marker else datetime.now(timezone.utc) - lookback
    own, others = collect_jobs(gh, opts.run_id, opts.workflows, not_before)
    current = find_current(own, request)
    # The job's own name also says why it runs (a training's reason and event): report that.
    outcome = find_superseded(current, current.request or request, others, marker, lookback)
    record_outcome(settings, outcome)
    _append("GITHUB_STEP_SUMMARY", outcome.markdown())
    _append("GITHUB_OUTPUT", f"superseded={len(outcome.superseded) + len(outcome.unreadable)}\n")
    return outcome


def check_event(settings: Settings, event_id: str, superseded: int = 0,
                stale_after_s: float = DEFAULT_STALE_AFTER_S, now: datetime | None = None) -> EventPlan:
    """The CLI verb: decide, then write `train=true|false` to the step outputs and a summary line."""
    plan = plan_event(event_id, event_runs(settings, event_id), now or datetime.now(timezone.utc), superseded,
                      stale_after_s)
    _append("GITHUB_OUTPUT", f"train={'true' if plan.train else 'false'}\n")
    _append("GITHUB_STEP_SUMMARY", f"- retrain request: {plan.note}\n")
    return plan
