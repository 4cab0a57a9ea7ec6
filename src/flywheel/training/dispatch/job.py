"""One commit's training job on a node: the request (`RemoteTrainConfig`), its environment and bash
scripts, and its lifecycle: start detached, follow the log to the end, reattach, cancel.

The job runs detached on the node (`setsid nohup`, its own log, pid and exit-status files in a
per-commit directory), so a dropped SSH connection or a cancelled CI job doesn't kill training:
the client reconnects with backoff, or `--attach COMMIT` picks the job up later. An `flock` held by
the job for its whole life means one commit never trains twice at once on a node.

A job is one commit of one project directory (`job_key`: the SHA, plus the MLproject's directory
when it is not the repository root), so two components of one repository train side by side at the
same commit, while one component's commit still never trains twice at once.

Secrets (tracking URI, credentials) reach the job through a 0600 env file written over SFTP inside
a 0700 directory and deleted by the job as soon as it has read it: never on a command line (`ps`
shows those) and never in a log.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from flywheel.core.errors import FlywheelError
from flywheel.core.ssh import (
    NodeUnreachable,
    connect,
    exec_command,
    is_transient,
    put_file,
    remote_exists,
)
from flywheel.training.dispatch.nodes import jobs_root, pick_node

if TYPE_CHECKING:
    import paramiko

    from flywheel.core.config import Settings
    from flywheel.core.ssh import SSHAuth
    from flywheel.training.dispatch.nodes import Node

ENV_MANAGERS = ("local", "conda", "docker")
RUN_ID_RE = re.compile(r"run with ID '([0-9a-f]{32})'")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
JOB_RE = re.compile(r"^([0-9a-f]{40})(?:-([A-Za-z0-9._~-]+))?$")  # job_key's shape
BUSY_EXIT = 75  # EX_TEMPFAIL: the commit's lock is held by a running job



class JobVanished(FlywheelError):
    """The job is known to have ended (its node's lock is free) but left no exit status: killed."""

@dataclass(frozen=True)
class RemoteTrainConfig:
    """One remote training request."""

    commit: str  # full SHA (see resolve_commit)
    entry: str = "train"
    params: tuple[tuple[str, str], ...] = ()
    nproc_per_node: int | None = None
    env_manager: str = "local"
    reconnect_timeout: float = 300.0  # give up re-attaching after this long without a connection
    poll_interval: float = 0.5
    event_id: str | None = None  # the monitor's retrain event: the run is tagged with it (flywheel.control.dispatches)
    project: str = "."  # the project as the user named it (path or URL, credentials stripped): a run tag
    project_dir: str = "."  # the MLproject's directory inside the shipped tree (source.normalize_project_dir)
    env: tuple[tuple[str, str], ...] = ()  # more job environment, e.g. remote-train --tune's study storage (a secret)

    def __post_init__(self) -> None:
        from flywheel.training.dispatch.source import normalize_project_dir

        object.__setattr__(self, "project_dir", normalize_project_dir(self.project_dir))
        if self.env_manager not in ENV_MANAGERS:
            raise FlywheelError(f"--env-manager must be one of {', '.join(ENV_MANAGERS)}")
        if not SHA_RE.match(self.commit):
            raise FlywheelError(f"commit {self.commit!r} must be a full 40-character SHA (resolve_commit)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.entry):
            raise FlywheelError(f"bad entry point name {self.entry!r}")


def job_key(sha: str, project_dir: str = ".") -> str:
    """The job's directory name on the node: the SHA for a project at the repository root, else
    `SHA-dir~sub` ('/' becomes '~', which a project dir never contains, so keys never collide)."""
    return sha if project_dir in ("", ".") else f"{sha}-{project_dir.replace('/', '~')}"


def split_key(key: str) -> tuple[str, str]:
    """(sha, project_dir) of a job_key."""
    m = JOB_RE.match(key)
    if not m:
        raise FlywheelError(f"{key!r} is not a remote-train job name")
    return m[1], (m[2] or ".").replace("~", "/")


def _container(key: str) -> str:
    """A docker name/tag part for a job (docker names allow no '~'): SHA prefix + the dir's hash."""
    sha, project_dir = split_key(key)
    suffix = "" if project_dir == "." else "-" + hashlib.sha256(project_dir.encode()).hexdigest()[:8]
    return f"{sha[:12]}{suffix}"


def parse_params(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`-P key=value` strings → pairs, rejecting malformed ones."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise FlywheelError(f"bad -P {pair!r}: expected key=value with a plain key")
        out.append((key, value))
    return tuple(out)


RUNNER = """#!/usr/bin/env bash
# Written by `flywheel remote-train`: one training job, detached from the SSH session that started it.
cd "$(dirname "$0")" || exit 1
echo $$ > job.pid
# Secrets arrive in a 0600 file rather than on a command line; read it, then remove it at once.
if ! . ./job.env; then echo "flywheel: job.env missing: start jobs with remote-train" >&2; exit 1; fi
rm -f job.env
{activate}
export FLYWHEEL_HOME="$PWD/home"
# Ship-exactly-this-commit: the archive's package wins over whatever flywheel the node has installed.
export PYTHONPATH="$PWD/src/src${{PYTHONPATH:+:$PYTHONPATH}}"
echo "flywheel: commit {sha} entry {entry} on $(hostname) started $(date -u +%FT%TZ)"
{command}
code=$?
echo "flywheel: finished with exit code $code at $(date -u +%FT%TZ)"
echo $code > job.exit.tmp && mv job.exit.tmp job.exit
exit $code
"""

# Runs over SSH with the job dir's lock on fd 9; the detached runner inherits fd 9, so the lock is
# held exactly as long as the job (or any of its children) lives.
STARTER = """set -e
cd {jobdir}
trap 'rm -f {upload} {envfile}' EXIT
exec 9>>job.lock
if ! flock -n 9; then echo "commit already training here" >&2; exit {busy}; fi
rm -rf src job.exit job.exit.tmp job.pid
# Leftovers of attempts whose connection died mid-upload (may hold secrets): remove them.
for f in job.env.* upload-*.tar.gz; do
  if [ -e "$f" ] && [ "$f" != {envfile} ] && [ "$f" != {upload} ]; then rm -f -- "$f"; fi
done
mkdir src
tar -xzf {upload} -C src
if [ -f job.log ]; then mv job.log job.log.previous; fi
mv {envfile} job.env
# Job control on: without it bash starts background jobs with SIGINT ignored, and then neither
# the job nor mlflow could be interrupted cleanly by --cancel.
set -m
setsid nohup bash run.sh >job.log 2>&1 </dev/null &
echo started
"""


def _env_file(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))


def remote_env(settings: Settings, node: Node, sha: str, event_id: str | None = None, project: str = ".",
               project_dir: str = ".") -> dict[str, str]:
    """What the job needs in its environment: where to log, as whom, which project, directory and
    commit it is (the run's `flywheel.project`, `flywheel.project_dir` and `git_commit` tags) and,
    for a retrain the monitor asked for, its event id (train tags the run with it)."""
    env = dict(node.env)
    env.update({"MLFLOW_TRACKING_URI": settings.tracking_uri, "MLFLOW_EXPERIMENT_NAME": settings.experiment,
                "FLYWHEEL_MODEL_NAME": settings.model_name, "FLYWHEEL_GIT_COMMIT": sha,
                "FLYWHEEL_PROJECT": project, "FLYWHEEL_PROJECT_DIR": project_dir})
    if event_id:
        env["FLYWHEEL_EVENT_ID"] = event_id
    if settings.username is not None:
        env["MLFLOW_TRACKING_USERNAME"] = settings.username
    if settings.password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = settings.password
    return env


def job_env(settings: Settings, node: Node, cfg: RemoteTrainConfig) -> dict[str, str]:
    """The job's whole environment file: `remote_env` plus the request's own `env` entries."""
    return {**remote_env(settings, node, cfg.commit, cfg.event_id, cfg.project, cfg.project_dir), **dict(cfg.env)}


def mlflow_command(node: Node, cfg: RemoteTrainConfig, env_names: Sequence[str] = ()) -> str:
    """The job's shell command. `env_names` (docker only) are passed into the container by name."""
    params = list(cfg.params)
    if cfg.nproc_per_node is not None:
        params.append(("nproc_per_node", str(cfg.nproc_per_node)))
    p_args = [a for key, value in params for a in ("-P", f"{key}={value}")]
    sub = "" if cfg.project_dir == "." else "/" + cfg.project_dir  # normalize_project_dir: no shell specials
    if cfg.env_manager != "docker":
        args = [node.mlflow, "run", "$PWD/src", "-e", cfg.entry, "--env-manager", cfg.env_manager, *p_args]
        # $PWD must expand on the node; everything else is quoted literally.
        return " ".join(f'"$PWD/src{sub}"' if a == "$PWD/src" else shlex.quote(a) for a in args)
    # docker: build the project's own Dockerfile (its flywheel installed inside; the build context
    # is the repository root, so a component in a subdirectory can COPY the files next to it), run
    # `mlflow run` in it on the host network. `-e NAME` without a value copies the variable from
    # this shell, so secrets stay off the docker command line too.
    key = _container(job_key(cfg.commit, cfg.project_dir))
    tag = f"flywheel-train:{key}"
    name = f"flywheel-train-{key}"
    dockerfile = f" -f src{sub}/Dockerfile" if sub else ""
    env_args = " ".join(f"-e {shlex.quote(n)}" for n in sorted(env_names))
    run_args = " ".join(shlex.quote(a) for a in ["mlflow", "run", f"/project{sub}", "-e", cfg.entry,
                                                  "--env-manager", "local", *p_args])
    return (f"docker build {node.docker_build_args}{dockerfile} -t {tag} src || exit $?\n"
            "gpus=(); if command -v nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all); fi\n"
            # The node's datasets, read-only at the same paths the job's env names.
            "data=(); for d in \"${FLYWHEEL_DATA_DIR:-}\" /usr/share/datasets; do "
            "if [ -n \"$d\" ] && [ -d \"$d\" ]; then data+=(-v \"$d:$d:ro\"); fi; done\n"
            f"docker rm -f {name} >/dev/null 2>&1\n"
            f"docker run --rm --name {name} --network host \"${{gpus[@]}}\" \"${{data[@]}}\" {env_args} -e FLYWHEEL_HOME=/tmp/flywheel "
            f"-v \"$PWD/src:/project:ro\" --entrypoint \"\" {tag} {run_args}")


@dataclass(frozen=True)
class JobResult:
    node: str
    commit: str
    exit_code: int
    run_id: str | None


class RemoteJob:
    """One commit's job directory on one node: start it, follow its log, report how it ended."""

    def __init__(self, node: Node, auth: SSHAuth, key: str, out: TextIO | None = None,
                 warn: Callable[[str], None] | None = None, reconnect_timeout: float = 300.0,
                 poll_interval: float = 0.5) -> None:
        """`key`: the job_key (a commit's SHA, plus its project dir when that is not the root)."""
        self.node, self.auth, self.key = node, auth, key
        self.sha, self.project_dir = split_key(key)
        self.what = f"commit {self.sha[:12]}" + ("" if self.project_dir == "." else f" of {self.project_dir}")
        self.reconnect_timeout, self.poll_interval = reconnect_timeout, poll_interval
        self.out = out or sys.stdout
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.run_id: str | None = None
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = ""

    @contextmanager
    def _session(self) -> Iterator[tuple[paramiko.SSHClient, paramiko.SFTPClient, str]]:
        client = connect(self.node, self.auth)
        try:
            sftp = client.open_sftp()
            jobdir = f"{jobs_root(sftp, self.node)}/{self.key}"
            yield client, sftp, jobdir
        finally:
            client.close()

    def start(self, settings: Settings, cfg: RemoteTrainConfig, archive: bytes, command: str | None = None) -> None:
        """Upload the commit and start it detached; FlywheelError if it is already running here.
        `command`: the job's shell command, default `mlflow_command` (a multi-node job's other nodes
        run the entry point without `mlflow run`: flywheel.training.dispatch.multinode)."""
        with self._session() as (client, sftp, jobdir):
            # 0700: the env file inside is 0600 too, but nobody else should even list the job.
            code, _, err = exec_command(client, f"mkdir -p {shlex.quote(jobdir)} && chmod 700 {shlex.quote(jobdir)}")
            if code != 0:
                raise FlywheelError(f"cannot create {jobdir} on {self.node.label}: {err.strip()}")
            self._refuse_if_busy(client, jobdir)
            tag = secrets.token_hex(6)
            upload, envfile = f"upload-{tag}.tar.gz", f"job.env.{tag}"
            try:
                env = job_env(settings, self.node, cfg)
                put_file(sftp, f"{jobdir}/{envfile}", _env_file(env), 0o600)
                put_file(sftp, f"{jobdir}/{upload}", archive, 0o600)
                entry = cfg.entry if self.project_dir == "." else f"{cfg.entry} of {self.project_dir}"
                runner = RUNNER.format(activate=self.node.env_activate, sha=self.sha, entry=entry,
                                       command=command or mlflow_command(self.node, cfg, list(env)))
                put_file(sftp, f"{jobdir}/run.sh", runner, 0o700)
                code, out, err = exec_command(client, STARTER.format(jobdir=shlex.quote(jobdir), upload=upload,
                                                              envfile=envfile, busy=BUSY_EXIT))
            except BaseException:
                # Don't leave secrets or half uploads behind on the node (best effort: the
                # connection may be what failed).
                with suppress(Exception):
                    exec_command(client, f"cd {shlex.quote(jobdir)} && rm -f {upload} {envfile}")
                raise
            if code == BUSY_EXIT:
                raise self._busy_error()
            if code != 0 or "started" not in out:
                raise FlywheelError(f"starting the job on {self.node.label} failed (exit {code}): {err.strip()}")

    def _refuse_if_busy(self, client: paramiko.SSHClient, jobdir: str) -> None:
        if self._lock_held(client, jobdir):
            raise self._busy_error()

    def _busy_error(self) -> FlywheelError:
        return FlywheelError(f"{self.what} is already training on {self.node.label}; follow it with "
                             f"`flywheel remote-train --attach {self.key}` instead of starting it twice")

    @staticmethod
    def _lock_held(client: paramiko.SSHClient, jobdir: str) -> bool:
        lock = shlex.quote(f"{jobdir}/job.lock")
        code, _, _ = exec_command(client, f"[ -e {lock} ] || exit 0; flock -n {lock} true")
        return code != 0

    def follow(self) -> int:
        """Stream the job's log until it ends and return its exit code, reconnecting with backoff."""
        delay, lost_at = 1.0, None
        while True:
            try:
                with self._session() as (client, sftp, jobdir):
                    if lost_at is not None:
                        self.warn(f"reconnected to {self.node.label}; resuming the log")
                    return self._follow_once(client, sftp, jobdir)
            except Exception as exc:  # sorted into transient / fatal right here
                if not is_transient(exc):
                    raise
                error = exc
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > self.reconnect_timeout:
                raise FlywheelError(
                    f"lost {self.node.label} for over {self.reconnect_timeout:.0f}s ({error}); the job keeps "
                    f"running there: follow it later with `flywheel remote-train --attach {self.key}`") from error
            self.warn(f"connection to {self.node.label} lost ({error or type(error).__name__}); "
                      f"retrying in {delay:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 15.0)

    def _follow_once(self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient, jobdir: str) -> int:
        if not remote_exists(sftp, f"{jobdir}/run.sh"):
            raise FlywheelError(f"no job for {self.what} on {self.node.label}")
        while True:
            self._drain(sftp, jobdir)
            code = _read_exit(sftp, jobdir)
            if code is not None:
                self._drain(sftp, jobdir)
                return code
            if not self._lock_held(client, jobdir):
                # The lock is free but no exit status: re-check once (it may have just been written).
                code = _read_exit(sftp, jobdir)
                self._drain(sftp, jobdir)
                if code is not None:
                    return code
                raise JobVanished(f"the job for {self.what} on {self.node.label} ended without an exit "
                                  "status (killed, or the node rebooted); see job.log in its directory")
            time.sleep(self.poll_interval)

    def _drain(self, sftp: paramiko.SFTPClient, jobdir: str) -> None:
        try:
            with sftp.open(f"{jobdir}/job.log", "rb") as fh:
                fh.seek(self._offset)
                while chunk := fh.read(65536):
                    self._offset += len(chunk)
                    self._emit(self._decoder.decode(chunk))
        except FileNotFoundError:
            return

    def _emit(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        if self.run_id is None:
            self._tail = (self._tail + text)[-4096:]
            if m := RUN_ID_RE.search(self._tail):
                self.run_id = m[1]
                self.warn(f"MLflow run id: {self.run_id}")

    def cancel(self) -> bool:
        """Stop a running job: SIGINT first (mlflow marks the run KILLED), then TERM, then KILL."""
        with self._session() as (client, _, jobdir):
            if not self._lock_held(client, jobdir):
                return False
            script = CANCEL.format(jobdir=shlex.quote(jobdir), container=f"flywheel-train-{_container(self.key)}")
            code, _, err = exec_command(client, script, timeout=120)
            if code != 0:
                raise FlywheelError(f"could not stop the job on {self.node.label}: {err.strip()}")
            return True


# The lock is held by every process of the job, so "lock free" means "all of it is gone".
CANCEL = """cd {jobdir} || exit 1
pg=$(cat job.pid)
gone() {{ flock -n job.lock true; }}
kill -INT -- "-$pg" 2>/dev/null
for _ in $(seq 40); do gone && break; sleep 0.5; done
if ! gone; then kill -TERM -- "-$pg" 2>/dev/null; sleep 5; kill -KILL -- "-$pg" 2>/dev/null; fi
# A docker job's container belongs to dockerd, not to the job's process group.
if grep -q 'docker run' run.sh; then docker rm -f {container} >/dev/null 2>&1; fi
for _ in $(seq 20); do gone && break; sleep 0.5; done
[ -f job.exit ] || echo 130 > job.exit
gone
"""


def _read_exit(sftp: paramiko.SFTPClient, jobdir: str) -> int | None:
    try:
        with sftp.open(f"{jobdir}/job.exit", "r") as fh:
            return int(fh.read().decode().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------ entry points
def remote_train(cfg: RemoteTrainConfig, settings: Settings, nodes: Sequence[Node], auth: SSHAuth,
                 archive: bytes, out: TextIO | None = None,
                 warn: Callable[[str], None] | None = None) -> JobResult:
    """Pick a node, start the commit there detached, stream it to the end. Returns its exit code."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    key = job_key(cfg.commit, cfg.project_dir)
    if len(nodes) == 1:
        node = nodes[0]
    else:
        node = pick_node(nodes, auth, key, cfg.nproc_per_node or 1, warn)
    job = RemoteJob(node, auth, key, out=out, warn=warn, reconnect_timeout=cfg.reconnect_timeout,
                    poll_interval=cfg.poll_interval)
    job.start(settings, cfg, archive)
    warn(f"started {job.what} on {node.label}; if this client goes away, reattach with "
         f"`flywheel remote-train --attach {key}`")
    code = job.follow()
    return JobResult(node=node.label, commit=cfg.commit, exit_code=code, run_id=job.run_id)


def find_job(nodes: Sequence[Node], auth: SSHAuth, commit: str,
             warn: Callable[[str], None] | None = None, project_dir: str | None = None) -> tuple[Node, str]:
    """The node and job_key of the job directory matching `commit` (a full SHA or a prefix, or a
    whole job_key), of the project directory `project_dir` when one is given. A multi-node job
    (remote-train --num-nodes: one key on several nodes) is found on its first node (lowest address)."""
    return pick_job(find_jobs(nodes, auth, commit, warn, project_dir), commit)


def pick_job(matches: Sequence[tuple[Node, str]], commit: str) -> tuple[Node, str]:
    """The one job among find_jobs' `matches` (its first node, for a multi-node job); FlywheelError
    if they are jobs of several keys."""
    if len({key for _, key in matches}) > 1:
        raise FlywheelError(f"commit prefix {commit} is ambiguous (give the whole job name, or --project-dir): " +
                            ", ".join(f"{key} on {n.label}" for n, key in matches))
    return min(matches, key=lambda m: m[0].address)


def find_jobs(nodes: Sequence[Node], auth: SSHAuth, commit: str,
              warn: Callable[[str], None] | None = None, project_dir: str | None = None) -> list[tuple[Node, str]]:
    """Every (node, job_key) whose job directory matches (see find_job); FlywheelError if none does."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if JOB_RE.match(commit) and not SHA_RE.match(commit):  # a whole job key, as remote-train prints it
        commit, project_dir = split_key(commit)
    if not re.fullmatch(r"[0-9a-f]{4,40}", commit):
        raise FlywheelError(f"--attach takes the commit SHA (or a prefix of it) of a job, got {commit!r}")

    def wanted(name: str) -> bool:
        m = JOB_RE.match(name)
        return bool(m and m[1].startswith(commit)
                    and (project_dir is None or split_key(name)[1] == project_dir))
    matches: list[tuple[Node, str]] = []
    for node in nodes:
        try:
            client = connect(node, auth)
        except NodeUnreachable as exc:
            warn(f"skipping {node.label}: {exc}")
            continue
        try:
            sftp = client.open_sftp()
            try:
                names = sftp.listdir(jobs_root(sftp, node))
            except FileNotFoundError:
                names = []
            matches += [(node, n) for n in names if wanted(n)]
        finally:
            client.close()
    if not matches:
        raise FlywheelError(f"no remote-train job for commit {commit} on {', '.join(n.label for n in nodes)}")
    return matches


def attach(nodes: Sequence[Node], auth: SSHAuth, commit: str, reconnect_timeout: float = 300.0,
           out: TextIO | None = None, warn: Callable[[str], None] | None = None,
           project_dir: str | None = None) -> JobResult:
    """Follow an already started job (replaying its log) and report how it ended."""
    node, key = find_job(nodes, auth, commit, warn, project_dir)
    job = RemoteJob(node, auth, key, out=out, warn=warn, reconnect_timeout=reconnect_timeout)
    code = job.follow()
    return JobResult(node=node.label, commit=job.sha, exit_code=code, run_id=job.run_id)
