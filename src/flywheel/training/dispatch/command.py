"""`flywheel remote-train`'s plumbing: turn the verb's options into nodes, SSH auth and a job
request, then start, attach to or cancel the job, and report how it ended (stderr, the run report,
GitHub outputs). cli/training.py only declares the options; the logic lives here.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.core.errors import FlywheelError
from flywheel.core.ssh import SSHAuth
from flywheel.training.dispatch.job import (
    RemoteJob,
    RemoteTrainConfig,
    attach,
    find_jobs,
    parse_params,
    pick_job,
    remote_train,
)
from flywheel.training.dispatch.nodes import Node, load_nodes
from flywheel.training.dispatch.report import report_run, write_github_outputs
from flywheel.training.dispatch.source import Project, archive_commit, check_entry

if TYPE_CHECKING:
    from flywheel.core.config import Settings


@dataclass(frozen=True)
class CommandOptions:
    """Everything `flywheel remote-train` was given (see cli.remote_train for the help texts)."""

    node: str | None = None
    nodes: str | None = None
    commit: str = "HEAD"
    project: str = "."  # a git checkout's path or a git URL (--repo is its old name)
    project_dir: str | None = None  # the MLproject's directory in the repository; None: "." (any, for --attach)
    entry: str = "train"
    params: tuple[str, ...] = ()
    nproc_per_node: int | None = None
    env_manager: str = "local"
    env_activate: str = ""  # for --node; nodes.yaml sets it per node
    workdir: str = Node.workdir
    attach: str | None = None
    cancel: str | None = None
    identity: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = 10.0
    reconnect_timeout: float = 300.0
    plots_dir: Path | None = None
    tune: bool = False  # one `tune` worker per node on one study (flywheel.training.dispatch.tune)
    workers: int | None = None  # --tune: this many nodes (default: every reachable one)
    study: str | None = None  # --tune: the study name (default MODEL-COMMIT)
    tune_storage: str | None = None  # --tune: the study's storage URL (FLYWHEEL_TUNE_STORAGE)
    num_nodes: int = 1  # >1: one torchrun job across this many nodes of --nodes (dispatch.multinode)


def run_command(opts: CommandOptions, settings: Settings, tracking_given: bool) -> int:
    """`flywheel remote-train`: returns the exit code to exit with (the remote job's)."""
    def warn(msg: str) -> None:
        print(f"flywheel: {msg}", file=sys.stderr, flush=True)

    if bool(opts.node) == bool(opts.nodes):
        raise FlywheelError("give exactly one of --node user@host[:port] or --nodes nodes.yaml")
    if opts.num_nodes > 1 and (opts.tune or opts.attach or opts.cancel or not opts.nodes):
        raise FlywheelError("--num-nodes starts one job across several nodes of --nodes nodes.yaml; it does not "
                            "combine with --node, --tune, --attach or --cancel (those find a multi-node job by itself)")
    if opts.tune and (opts.attach or opts.cancel):
        raise FlywheelError("--tune starts a search; --attach/--cancel follow or stop one node's job (without --tune)")
    nodes = ([Node.parse(opts.node, env_activate=opts.env_activate, workdir=opts.workdir)] if opts.node else load_nodes(str(opts.nodes)))
    known_hosts = opts.known_hosts or str(Path("~/.ssh/known_hosts").expanduser())
    auth = SSHAuth.load(opts.identity, known_hosts, os.environ.get("FLYWHEEL_SSH_KEY_PASSPHRASE") or None,
                        opts.connect_timeout)
    if opts.cancel:
        # A multi-node job (--num-nodes) is one job key on several nodes: stop it on every one of them.
        matches = find_jobs(nodes, auth, opts.cancel, warn, _dir_filter(opts.project_dir))
        pick_job(matches, opts.cancel)  # refuses a prefix matching jobs of several keys
        for node, key in matches:
            job = RemoteJob(node, auth, key, warn=warn)
            stopped = job.cancel()
            warn(f"{'stopped' if stopped else 'nothing running for'} {job.what} on {node.label}")
        return 0
    failure = None  # a multi-node job's one-line reason when a node failed
    if opts.attach:
        target = opts.attach
        if re.fullmatch(r"[0-9a-f]{32}", target) and tracking_given:
            target = _job_of_run(settings, target) or target  # an MLflow run id names its commit (and dir)
        result = attach(nodes, auth, target, opts.reconnect_timeout, warn=warn,
                        project_dir=_dir_filter(opts.project_dir))
    else:
        if not tracking_given:
            raise FlywheelError("remote-train needs a tracking server the node can reach: set MLFLOW_TRACKING_URI "
                                "or pass --tracking-uri (the embedded SQLite store lives on this machine)")
        project = Project(opts.project, opts.project_dir or ".")
        with project.checkout(opts.commit) as (repo, sha):
            # A multi-node entry point must start torchrun itself: it takes nproc_per_node (check_entry).
            nproc = opts.nproc_per_node or (1 if opts.num_nodes > 1 else None)
            cfg = RemoteTrainConfig(commit=sha, entry=opts.entry, params=parse_params(opts.params),
                                    nproc_per_node=nproc, env_manager=opts.env_manager,
                                    reconnect_timeout=opts.reconnect_timeout,
                                    # Set by train.yml for a monitor's retrain (like the passphrase, env only).
                                    event_id=os.environ.get("FLYWHEEL_EVENT_ID") or None,
                                    project=project.label, project_dir=project.project_dir)
            check_entry(repo, sha, cfg, project.project_dir)
            archive = archive_commit(repo, sha)
        if project.is_url or project.project_dir != ".":
            warn(f"project {project.label}, directory {project.project_dir}, commit {sha[:12]}")
        if opts.num_nodes > 1:
            from flywheel.training.dispatch.multinode import remote_train_multinode

            result, failure = remote_train_multinode(cfg, settings, nodes, auth, archive, opts.num_nodes, warn=warn)
        elif opts.tune:
            from flywheel.training.dispatch.tune import remote_tune

            result, _ = remote_tune(cfg, settings, nodes, auth, archive, storage=opts.tune_storage,
                                    workers=opts.workers, study=opts.study, warn=warn)
        else:
            result = remote_train(cfg, settings, nodes, auth, archive, warn=warn)
    warn(f"commit {result.commit[:12]} on {result.node}: MLflow run {result.run_id or 'unknown'}, "
         f"exit code {result.exit_code}")
    report = None
    if result.run_id and result.exit_code == 0 and tracking_given:
        try:
            report = report_run(settings, result.run_id, opts.plots_dir)
        except Exception as exc:  # noqa: BLE001 - the training succeeded; a report failure must not turn it red
            warn(f"could not build the run report: {exc}")
        if report and report.candidate_version:
            warn(f"registered {settings.model_name} version {report.candidate_version} as candidate")
    write_github_outputs(result, report)
    if failure:
        raise FlywheelError(failure)
    return result.exit_code


def _dir_filter(project_dir: str | None) -> str | None:
    """--project-dir for --attach/--cancel: None (not given) matches a commit's job of any directory."""
    from flywheel.training.dispatch.source import normalize_project_dir

    return None if project_dir is None else normalize_project_dir(project_dir)


def _job_of_run(settings: Settings, run_id: str) -> str | None:
    """The job of an MLflow run (its `git_commit` and `flywheel.project_dir` tags), or None if there is
    no such run (then it's a SHA prefix)."""
    from mlflow.exceptions import MlflowException

    from flywheel.core.registry import Registry
    from flywheel.training.dispatch.job import SHA_RE, job_key

    try:
        tags = Registry(settings).run(run_id).data.tags
    except MlflowException:
        return None
    commit = tags.get("git_commit") or ""
    return job_key(commit, tags.get("flywheel.project_dir") or ".") if SHA_RE.match(commit) else (commit or None)
