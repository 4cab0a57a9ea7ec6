"""`flywheel remote-train`: ship one commit to a training node over SSH and `mlflow run` it there.

The job runs detached on the node (`setsid nohup`, its own log, pid and exit-status files in a
per-commit directory), so a dropped SSH connection or a cancelled CI job doesn't kill training:
the client reconnects with backoff, or `--attach COMMIT` picks the job up later. An `flock` held by
the job for its whole life means one commit never trains twice at once on a node.

Secrets (tracking URI, credentials) reach the job through a 0600 env file written over SFTP inside
a 0700 directory and deleted by the job as soon as it has read it: never on a command line (`ps`
shows those) and never in a log. Host keys are checked against a known_hosts file and never added.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    import paramiko

    from flywheel.core.config import Settings

ENV_MANAGERS = ("local", "conda", "docker")
RUN_ID_RE = re.compile(r"run with ID '([0-9a-f]{32})'")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
BUSY_EXIT = 75  # EX_TEMPFAIL: the commit's lock is held by a running job
GPU_QUERY = "nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits"


# ------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class Node:
    """A training node: where to log in and how to run `mlflow` there."""

    host: str
    user: str
    port: int = 22
    name: str = ""
    env_activate: str = ""  # shell snippet run before mlflow, e.g. `source /opt/flywheel/.venv/bin/activate`
    mlflow: str = "mlflow"
    workdir: str = "flywheel-jobs"  # jobs root; relative paths are relative to the login's home
    env: tuple[tuple[str, str], ...] = ()  # non-secret extras, e.g. FLYWHEEL_DATA_DIR
    docker_build_args: str = ""  # --env-manager docker, e.g. `--build-arg BASE_IMAGE=python:3.11-slim`

    @property
    def label(self) -> str:
        return self.name or f"{self.user}@{self.host}:{self.port}"

    @classmethod
    def parse(cls, spec: str, **defaults: object) -> Node:
        """`user@host[:port]` → Node."""
        m = re.fullmatch(r"([^@\s]+)@([^:@\s]+)(?::(\d+))?", spec.strip())
        if not m:
            raise FlywheelError(f"bad --node {spec!r}: expected user@host or user@host:port")
        return cls(**{**defaults, "user": m[1], "host": m[2], "port": int(m[3] or 22)})


_NODE_KEYS = {"name", "host", "user", "port", "env_activate", "mlflow", "workdir", "env", "docker_build_args"}


def load_nodes(source: str) -> list[Node]:
    """Nodes from a nodes.yaml path, or from the YAML text itself (a CI secret holds the text)."""
    import yaml

    path = Path(source).expanduser()
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif "\n" in source:
        text, where = source, "the nodes YAML text"
    else:
        raise FlywheelError(f"nodes file {source!r} not found: pass a nodes.yaml path "
                            "(see nodes.example.yaml) or its YAML text")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FlywheelError(f"{where} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not doc["nodes"]:
        raise FlywheelError(f"{where}: expected a mapping with a non-empty `nodes:` list (see nodes.example.yaml)")
    defaults = doc.get("defaults") or {}
    nodes = []
    for i, raw in enumerate(doc["nodes"]):
        entry = {**defaults, **raw} if isinstance(raw, dict) else None
        if entry is None or "host" not in entry or "user" not in entry:
            raise FlywheelError(f"{where}: node #{i + 1} needs at least `host` and `user`")
        unknown = set(entry) - _NODE_KEYS
        if unknown:
            raise FlywheelError(f"{where}: node #{i + 1} has unknown keys {sorted(unknown)}; "
                                f"allowed: {sorted(_NODE_KEYS)}")
        env = entry.pop("env", None) or {}
        if not isinstance(env, dict):
            raise FlywheelError(f"{where}: node #{i + 1} `env` must be a mapping")
        try:
            nodes.append(Node(**{k: (int(v) if k == "port" else str(v)) for k, v in entry.items()},
                              env=tuple((str(k), str(v)) for k, v in env.items())))
        except ValueError as exc:
            raise FlywheelError(f"{where}: node #{i + 1}: {exc}") from exc
    return nodes


@dataclass(frozen=True)
class SSHAuth:
    """Client key + trusted host keys. Never prompts, never uses an agent, never trusts new hosts."""

    key: paramiko.PKey = field(repr=False)
    known_hosts: paramiko.HostKeys = field(repr=False)
    connect_timeout: float = 10.0

    @classmethod
    def load(cls, identity: str | None, known_hosts: str | None, passphrase: str | None = None,
             connect_timeout: float = 10.0) -> SSHAuth:
        """`identity`/`known_hosts` are file paths or the file contents (as CI secrets hold them)."""
        if not identity:
            raise FlywheelError("no SSH key: pass --identity PATH or set FLYWHEEL_SSH_KEY (path or key text)")
        if not known_hosts:
            raise FlywheelError("no known_hosts: pass --known-hosts PATH or set FLYWHEEL_SSH_KNOWN_HOSTS "
                                "(path or text; get a node's line with `ssh-keyscan -p PORT HOST`)")
        return cls(key=_load_key(identity, passphrase), known_hosts=_load_host_keys(known_hosts),
                   connect_timeout=connect_timeout)


def _load_key(identity: str, passphrase: str | None) -> paramiko.PKey:
    import paramiko

    try:
        if "PRIVATE KEY-----" in identity:
            errors = []
            for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
                try:
                    return key_class.from_private_key(io.StringIO(identity), password=passphrase)
                except paramiko.PasswordRequiredException:
                    raise
                except (paramiko.SSHException, ValueError) as exc:
                    errors.append(f"{key_class.__name__}: {exc}")
            raise FlywheelError("the SSH key text is not an Ed25519, ECDSA or RSA private key")
        path = Path(identity).expanduser()
        if not path.is_file():
            raise FlywheelError(f"SSH key file {identity} not found")
        return paramiko.PKey.from_path(path, password=passphrase)
    except paramiko.PasswordRequiredException as exc:
        raise FlywheelError("the SSH key is encrypted: set FLYWHEEL_SSH_KEY_PASSPHRASE") from exc
    except (paramiko.SSHException, ValueError) as exc:
        raise FlywheelError(f"cannot load the SSH key: {exc}") from exc


def _load_host_keys(known_hosts: str) -> paramiko.HostKeys:
    import paramiko

    keys = paramiko.HostKeys()
    path = Path(known_hosts).expanduser()
    text = path.read_text() if path.is_file() else known_hosts
    if not path.is_file() and " " not in known_hosts.strip():
        raise FlywheelError(f"known_hosts file {known_hosts} not found")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
        except paramiko.SSHException as exc:
            raise FlywheelError(f"known_hosts line {lineno} is invalid: {exc}") from exc
        if entry is not None:
            for host in entry.hostnames:
                keys.add(host, entry.key.get_name(), entry.key)
    if not keys:
        raise FlywheelError("known_hosts has no host keys; add the node's with `ssh-keyscan -p PORT HOST`")
    return keys


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

    def __post_init__(self) -> None:
        if self.env_manager not in ENV_MANAGERS:
            raise FlywheelError(f"--env-manager must be one of {', '.join(ENV_MANAGERS)}")
        if not SHA_RE.match(self.commit):
            raise FlywheelError(f"commit {self.commit!r} must be a full 40-character SHA (resolve_commit)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.entry):
            raise FlywheelError(f"bad entry point name {self.entry!r}")


def parse_params(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`-P key=value` strings → pairs, rejecting malformed ones."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise FlywheelError(f"bad -P {pair!r}: expected key=value with a plain key")
        out.append((key, value))
    return tuple(out)


# ------------------------------------------------------------------------------------ the commit
def _git(repo: Path, *args: str, binary: bool = False) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], check=False, capture_output=True, text=not binary)
    except FileNotFoundError as exc:
        raise FlywheelError("git is not installed; remote-train ships commits with `git archive`") from exc


def resolve_commit(repo: Path, commit: str) -> str:
    """Full SHA of `commit` (SHA, prefix, branch or tag) in `repo`; clear error if unknown."""
    done = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if done.returncode != 0:
        if _git(repo, "rev-parse", "--git-dir").returncode != 0:
            raise FlywheelError(f"{repo} is not a git repository: pass --repo with the project's checkout")
        raise FlywheelError(f"unknown commit {commit!r} in {repo}: check the SHA, or `git fetch` it first")
    return done.stdout.strip()


def archive_commit(repo: Path, sha: str) -> bytes:
    """The commit's tree as a .tar.gz (no .git: the node needs no repository credentials)."""
    done = _git(repo, "archive", "--format=tar.gz", sha, binary=True)
    if done.returncode != 0:
        raise FlywheelError(f"git archive {sha} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def check_entry(repo: Path, sha: str, cfg: RemoteTrainConfig) -> None:
    """Fail here, not on the node, if the commit's MLproject lacks the entry point or a -P parameter."""
    import yaml

    done = _git(repo, "show", f"{sha}:MLproject")
    if done.returncode != 0:
        raise FlywheelError(f"commit {sha[:12]} has no MLproject at its root; remote-train runs `mlflow run`")
    try:
        entries = (yaml.safe_load(done.stdout) or {}).get("entry_points") or {}
    except yaml.YAMLError as exc:
        raise FlywheelError(f"MLproject at {sha[:12]} is not valid YAML: {exc}") from exc
    if cfg.entry not in entries:
        raise FlywheelError(f"MLproject at {sha[:12]} has no entry point {cfg.entry!r}; it has: "
                            f"{', '.join(entries) or 'none'}")
    declared = set((entries[cfg.entry] or {}).get("parameters") or {})
    wanted = [k for k, _ in cfg.params] + (["nproc_per_node"] if cfg.nproc_per_node is not None else [])
    # MLflow would append undeclared parameters as extra --flags, which the entry then rejects.
    unknown = [k for k in wanted if k not in declared]
    if unknown:
        raise FlywheelError(f"entry point {cfg.entry!r} of MLproject at {sha[:12]} has no parameter(s) "
                            f"{', '.join(unknown)}; it takes: {', '.join(sorted(declared)) or 'none'}")


# ------------------------------------------------------------------------------------ SSH
_TRANSIENT = (OSError, EOFError)


def _is_transient(exc: BaseException) -> bool:
    """Worth reconnecting for: the network or sshd went away. Not: bad keys, missing files, our errors."""
    import paramiko

    if isinstance(exc, NodeUnreachable):
        return True
    if isinstance(exc, (FlywheelError, paramiko.BadHostKeyException, paramiko.AuthenticationException,
                        FileNotFoundError, PermissionError)):
        return False
    return isinstance(exc, (*_TRANSIENT, paramiko.SSHException))


def connect(node: Node, auth: SSHAuth) -> paramiko.SSHClient:
    """An authenticated SSH client, host key verified; FlywheelError saying what to fix otherwise."""
    import paramiko

    client = paramiko.SSHClient()
    keys = client.get_host_keys()
    for host in auth.known_hosts:
        for key_type, key in auth.known_hosts[host].items():
            keys.add(host, key_type, key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(node.host, port=node.port, username=node.user, pkey=auth.key, look_for_keys=False,
                       allow_agent=False, timeout=auth.connect_timeout, banner_timeout=auth.connect_timeout,
                       auth_timeout=auth.connect_timeout, channel_timeout=auth.connect_timeout)
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise FlywheelError(
            f"host key mismatch for {node.label}: the node presented {exc.key.get_name()} "
            f"{exc.key.get_fingerprint().hex()}, known_hosts has another key. Refusing to connect: verify the "
            "node's key out of band, then update known_hosts") from exc
    except paramiko.AuthenticationException as exc:
        client.close()
        raise FlywheelError(f"SSH key refused by {node.label}: add the public key to "
                            f"~{node.user}/.ssh/authorized_keys on the node ({exc})") from exc
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc):
            raise FlywheelError(f"{node.label} is not in known_hosts: add its line "
                                f"(`ssh-keyscan -p {node.port} {node.host}`, verified out of band)") from exc
        raise NodeUnreachable(f"SSH to {node.label} failed: {exc}") from exc
    except (OSError, EOFError) as exc:
        client.close()
        raise NodeUnreachable(f"cannot reach {node.label}: {exc}") from exc
    return client


class NodeUnreachable(FlywheelError):
    """The node did not answer (network, sshd down). Other nodes in a pool may still be used."""


def _exec(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def _workdir(node: Node) -> str:
    """The jobs root as a path a login shell (which starts in $HOME) resolves correctly."""
    workdir = node.workdir.removeprefix("~/")
    return workdir.rstrip("/") or "."


def _jobs_root(sftp: paramiko.SFTPClient, node: Node) -> str:
    workdir = _workdir(node)
    return workdir if workdir.startswith("/") else f"{sftp.normalize('.').rstrip('/')}/{workdir}"


# ------------------------------------------------------------------------------------ node pool
@dataclass(frozen=True)
class NodeProbe:
    node: Node
    free_gpu_mib: tuple[int, ...] = ()  # one entry per GPU; empty = CPU-only node
    busy: bool = False  # this commit is already training there
    error: str | None = None  # set when the node was unreachable

    def score(self, nproc: int) -> int:
        """Free memory on the `nproc` emptiest GPUs; CPU-only nodes score -1 so they rank last."""
        if not self.free_gpu_mib:
            return -1
        return sum(sorted(self.free_gpu_mib, reverse=True)[:max(nproc, 1)])


def parse_free_memory(text: str) -> tuple[int, ...]:
    """`nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits` output → MiB per GPU."""
    values = []
    for line in text.splitlines():
        line = line.strip()
        if line.isdigit():
            values.append(int(line))
    return tuple(values)


def probe_node(node: Node, auth: SSHAuth, sha: str | None = None) -> NodeProbe:
    """Reachability, free GPU memory and whether `sha` is running there, in one SSH exec."""
    try:
        client = connect(node, auth)
    except NodeUnreachable as exc:
        return NodeProbe(node, error=str(exc))
    try:
        script = f"{GPU_QUERY} 2>/dev/null || true\n"
        if sha:
            lock = shlex.quote(f"{_workdir(node)}/{sha}/job.lock")
            script += f"if [ -e {lock} ] && ! flock -n {lock} true; then echo FLYWHEEL_BUSY; fi\n"
        _, out, _ = _exec(client, script)
        return NodeProbe(node, free_gpu_mib=parse_free_memory(out), busy="FLYWHEEL_BUSY" in out)
    except _TRANSIENT as exc:
        return NodeProbe(node, error=f"{node.label}: {exc}")
    finally:
        client.close()


def rank_nodes(probes: Sequence[NodeProbe], nproc: int = 1) -> list[NodeProbe]:
    """Reachable nodes, most free GPU memory first (stable: ties keep nodes.yaml order)."""
    return sorted((p for p in probes if p.error is None), key=lambda p: -p.score(nproc))


def pick_node(nodes: Sequence[Node], auth: SSHAuth, sha: str, nproc: int = 1,
              warn: Callable[[str], None] = print) -> Node:
    """The reachable node with the most free GPU memory; unreachable ones are skipped with a warning."""
    probes = [probe_node(node, auth, sha) for node in nodes]
    for p in probes:
        if p.error:
            warn(f"skipping {p.node.label}: {p.error}")
        if p.busy:
            raise FlywheelError(f"commit {sha[:12]} is already training on {p.node.label}; follow it with "
                                f"`flywheel remote-train --attach {sha}` instead of starting it twice")
    ranked = rank_nodes(probes, nproc)
    if not ranked:
        raise FlywheelError(f"none of the {len(nodes)} training nodes is reachable: " +
                            "; ".join(p.error or "" for p in probes))
    best = ranked[0]
    gpus = f"{len(best.free_gpu_mib)} GPU(s), {best.score(nproc)} MiB free" if best.free_gpu_mib else "CPU only"
    warn(f"using {best.node.label} ({gpus})")
    return best.node


# ------------------------------------------------------------------------------------ the job
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


def remote_env(settings: Settings, node: Node, sha: str, event_id: str | None = None) -> dict[str, str]:
    """What the job needs in its environment: where to log, as whom, which commit it is and, for a
    retrain the monitor asked for, its event id (train tags the run with it)."""
    env = dict(node.env)
    env.update({"MLFLOW_TRACKING_URI": settings.tracking_uri, "MLFLOW_EXPERIMENT_NAME": settings.experiment,
                "FLYWHEEL_MODEL_NAME": settings.model_name, "FLYWHEEL_GIT_COMMIT": sha})
    if event_id:
        env["FLYWHEEL_EVENT_ID"] = event_id
    if settings.username is not None:
        env["MLFLOW_TRACKING_USERNAME"] = settings.username
    if settings.password is not None:
        env["MLFLOW_TRACKING_PASSWORD"] = settings.password
    return env


def mlflow_command(node: Node, cfg: RemoteTrainConfig, env_names: Sequence[str] = ()) -> str:
    """The job's shell command. `env_names` (docker only) are passed into the container by name."""
    params = list(cfg.params)
    if cfg.nproc_per_node is not None:
        params.append(("nproc_per_node", str(cfg.nproc_per_node)))
    p_args = [a for key, value in params for a in ("-P", f"{key}={value}")]
    if cfg.env_manager != "docker":
        args = [node.mlflow, "run", "$PWD/src", "-e", cfg.entry, "--env-manager", cfg.env_manager, *p_args]
        # $PWD must expand on the node; everything else is quoted literally.
        return " ".join('"$PWD/src"' if a == "$PWD/src" else shlex.quote(a) for a in args)
    # docker: build the commit's own Dockerfile (its flywheel installed inside), run `mlflow run`
    # in it on the host network. `-e NAME` without a value copies the variable from this shell,
    # so secrets stay off the docker command line too.
    tag = f"flywheel-train:{cfg.commit[:12]}"
    name = f"flywheel-train-{cfg.commit[:12]}"
    env_args = " ".join(f"-e {shlex.quote(n)}" for n in sorted(env_names))
    run_args = " ".join(shlex.quote(a) for a in ["mlflow", "run", "/project", "-e", cfg.entry,
                                                  "--env-manager", "local", *p_args])
    return (f"docker build {node.docker_build_args} -t {tag} src || exit $?\n"
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

    def __init__(self, node: Node, auth: SSHAuth, sha: str, out: TextIO | None = None,
                 warn: Callable[[str], None] | None = None, reconnect_timeout: float = 300.0,
                 poll_interval: float = 0.5) -> None:
        self.node, self.auth, self.sha = node, auth, sha
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
            jobdir = f"{_jobs_root(sftp, self.node)}/{self.sha}"
            yield client, sftp, jobdir
        finally:
            client.close()

    def start(self, settings: Settings, cfg: RemoteTrainConfig, archive: bytes) -> None:
        """Upload the commit and start it detached; FlywheelError if it is already running here."""
        with self._session() as (client, sftp, jobdir):
            # 0700: the env file inside is 0600 too, but nobody else should even list the job.
            code, _, err = _exec(client, f"mkdir -p {shlex.quote(jobdir)} && chmod 700 {shlex.quote(jobdir)}")
            if code != 0:
                raise FlywheelError(f"cannot create {jobdir} on {self.node.label}: {err.strip()}")
            self._refuse_if_busy(client, jobdir)
            tag = secrets.token_hex(6)
            upload, envfile = f"upload-{tag}.tar.gz", f"job.env.{tag}"
            try:
                env = remote_env(settings, self.node, self.sha, cfg.event_id)
                _put(sftp, f"{jobdir}/{envfile}", _env_file(env), 0o600)
                _put(sftp, f"{jobdir}/{upload}", archive, 0o600)
                runner = RUNNER.format(activate=self.node.env_activate, sha=self.sha, entry=cfg.entry,
                                       command=mlflow_command(self.node, cfg, list(env)))
                _put(sftp, f"{jobdir}/run.sh", runner, 0o700)
                code, out, err = _exec(client, STARTER.format(jobdir=shlex.quote(jobdir), upload=upload,
                                                              envfile=envfile, busy=BUSY_EXIT))
            except BaseException:
                # Don't leave secrets or half uploads behind on the node (best effort: the
                # connection may be what failed).
                with suppress(Exception):
                    _exec(client, f"cd {shlex.quote(jobdir)} && rm -f {upload} {envfile}")
                raise
            if code == BUSY_EXIT:
                raise self._busy_error()
            if code != 0 or "started" not in out:
                raise FlywheelError(f"starting the job on {self.node.label} failed (exit {code}): {err.strip()}")

    def _refuse_if_busy(self, client: paramiko.SSHClient, jobdir: str) -> None:
        if self._lock_held(client, jobdir):
            raise self._busy_error()

    def _busy_error(self) -> FlywheelError:
        return FlywheelError(f"commit {self.sha[:12]} is already training on {self.node.label}; follow it with "
                             f"`flywheel remote-train --attach {self.sha}` instead of starting it twice")

    @staticmethod
    def _lock_held(client: paramiko.SSHClient, jobdir: str) -> bool:
        lock = shlex.quote(f"{jobdir}/job.lock")
        code, _, _ = _exec(client, f"[ -e {lock} ] || exit 0; flock -n {lock} true")
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
                if not _is_transient(exc):
                    raise
                error = exc
            lost_at = lost_at or time.monotonic()
            if time.monotonic() - lost_at > self.reconnect_timeout:
                raise FlywheelError(
                    f"lost {self.node.label} for over {self.reconnect_timeout:.0f}s ({error}); the job keeps "
                    f"running there: follow it later with `flywheel remote-train --attach {self.sha}`") from error
            self.warn(f"connection to {self.node.label} lost ({error or type(error).__name__}); "
                      f"retrying in {delay:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 15.0)

    def _follow_once(self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient, jobdir: str) -> int:
        if not _exists(sftp, f"{jobdir}/run.sh"):
            raise FlywheelError(f"no job for commit {self.sha[:12]} on {self.node.label}")
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
                raise FlywheelError(f"the job for {self.sha[:12]} on {self.node.label} ended without an exit "
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
            script = CANCEL.format(jobdir=shlex.quote(jobdir), container=f"flywheel-train-{self.sha[:12]}")
            code, _, err = _exec(client, script, timeout=120)
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


def _put(sftp: paramiko.SFTPClient, path: str, data: str | bytes, mode: int) -> None:
    # chmod before writing: the secret content never sits in a file with looser permissions.
    with sftp.open(path, "wb") as fh:
        fh.chmod(mode)
        fh.write(data.encode() if isinstance(data, str) else data)


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
        return True
    except FileNotFoundError:
        return False


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
    if len(nodes) == 1:
        node = nodes[0]
    else:
        node = pick_node(nodes, auth, cfg.commit, cfg.nproc_per_node or 1, warn)
    job = RemoteJob(node, auth, cfg.commit, out=out, warn=warn, reconnect_timeout=cfg.reconnect_timeout,
                    poll_interval=cfg.poll_interval)
    job.start(settings, cfg, archive)
    warn(f"started commit {cfg.commit[:12]} on {node.label}; if this client goes away, reattach with "
         f"`flywheel remote-train --attach {cfg.commit}`")
    code = job.follow()
    return JobResult(node=node.label, commit=cfg.commit, exit_code=code, run_id=job.run_id)


def find_job(nodes: Sequence[Node], auth: SSHAuth, commit: str,
             warn: Callable[[str], None] | None = None) -> tuple[Node, str]:
    """The node and full SHA of the job directory matching `commit` (a full SHA or a prefix)."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not re.fullmatch(r"[0-9a-f]{4,40}", commit):
        raise FlywheelError(f"--attach takes the commit SHA (or a prefix of it) of a job, got {commit!r}")
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
                names = sftp.listdir(_jobs_root(sftp, node))
            except FileNotFoundError:
                names = []
            matches += [(node, n) for n in names if SHA_RE.match(n) and n.startswith(commit)]
        finally:
            client.close()
    if not matches:
        raise FlywheelError(f"no remote-train job for commit {commit} on {', '.join(n.label for n in nodes)}")
    if len(matches) > 1:
        raise FlywheelError(f"commit prefix {commit} is ambiguous: " +
                            ", ".join(f"{sha[:12]} on {n.label}" for n, sha in matches))
    return matches[0]


def attach(nodes: Sequence[Node], auth: SSHAuth, commit: str, reconnect_timeout: float = 300.0,
           out: TextIO | None = None, warn: Callable[[str], None] | None = None) -> JobResult:
    """Follow an already started job (replaying its log) and report how it ended."""
    node, sha = find_job(nodes, auth, commit, warn)
    job = RemoteJob(node, auth, sha, out=out, warn=warn, reconnect_timeout=reconnect_timeout)
    code = job.follow()
    return JobResult(node=node.label, commit=sha, exit_code=code, run_id=job.run_id)


def _commit_of_run(settings: Settings, run_id: str) -> str | None:
    """The `git_commit` tag of an MLflow run, or None if there is no such run (then it's a SHA prefix)."""
    from mlflow.exceptions import MlflowException

    from flywheel.core.registry import Registry

    try:
        return Registry(settings).run(run_id).data.tags.get("git_commit")
    except MlflowException:
        return None


# ------------------------------------------------------------------------------------ reporting
@dataclass(frozen=True)
class RunReport:
    run_id: str
    metrics: dict[str, float]
    champion: str | None  # "name vN" of the version aliased prod, when there is one
    champion_metrics: dict[str, float]
    candidate_version: str | None  # set when this run was registered as `candidate`
    plots: tuple[Path, ...] = ()

    def markdown(self, title: str, status: str = "") -> str:
        lines = [f"### {title}", "",
                 f"MLflow run `{self.run_id}`{status}. " +
                 (f"Registered as **candidate version {self.candidate_version}**."
                  if self.candidate_version else "Not the `candidate` (did not beat the champion)."),
                 "", f"| metric | this model | champion {self.champion or '(none)'} | change |",
                 "|---|---:|---:|---:|"]
        for key in sorted(self.metrics):
            new, old = self.metrics[key], self.champion_metrics.get(key)
            change = f"{new - old:+.4f}" if old is not None else ""
            lines.append(f"| {key} | {new:.4f} | {'' if old is None else f'{old:.4f}'} | {change} |")
        if self.plots:
            lines += ["", "Plots (in this workflow run's artifacts): " + ", ".join(f"`{p.name}`" for p in self.plots)]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        """The report as JSON-able data (`flywheel report --json`)."""
        return {"run_id": self.run_id, "metrics": self.metrics, "champion": self.champion,
                "champion_metrics": self.champion_metrics, "candidate_version": self.candidate_version,
                "plots": [str(p) for p in self.plots]}


def report_run(settings: Settings, run_id: str, plots_dir: Path | None = None) -> RunReport:
    """The run's metrics next to the champion's, whether it became `candidate`, and its plots."""
    from mlflow.exceptions import MlflowException

    from flywheel.core.registry import Registry

    client = Registry(settings).client
    run = client.get_run(run_id)
    champion, champion_metrics = None, {}
    try:
        prod = client.get_model_version_by_alias(settings.model_name, "prod")
        champion = f"{settings.model_name} v{prod.version}"
        if prod.run_id:
            champion_metrics = dict(client.get_run(prod.run_id).data.metrics)
    except MlflowException:
        pass  # no champion yet
    candidate = None
    try:
        mv = client.get_model_version_by_alias(settings.model_name, "candidate")
        candidate = str(mv.version) if mv.run_id == run_id else None
    except MlflowException:
        pass  # nothing is candidate
    plots: list[Path] = []
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for path in _png_artifacts(client, run_id):
            plots.append(Path(client.download_artifacts(run_id, path, str(plots_dir))))
    return RunReport(run_id=run_id, metrics=dict(run.data.metrics), champion=champion,
                     champion_metrics=champion_metrics, candidate_version=candidate, plots=tuple(plots))


def _png_artifacts(client, run_id: str, path: str = "", depth: int = 2) -> list[str]:
    found = []
    for info in client.list_artifacts(run_id, path or None):
        if info.is_dir and depth > 0:
            found += _png_artifacts(client, run_id, info.path, depth - 1)
        elif info.path.endswith(".png"):
            found.append(info.path)
    return found


def write_github_outputs(result: JobResult, report: RunReport | None,
                         environ: dict[str, str] | None = None) -> None:
    """Step outputs and the job summary, when running inside GitHub Actions (no-op elsewhere)."""
    env = os.environ if environ is None else environ
    if output := env.get("GITHUB_OUTPUT"):
        with open(output, "a") as fh:
            fh.write(f"run_id={result.run_id or ''}\nnode={result.node}\nexit_code={result.exit_code}\n"
                     f"candidate_version={(report.candidate_version if report else None) or ''}\n")
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        with open(summary, "a") as fh:
            title = f"remote-train: commit `{result.commit[:12]}` on `{result.node}`"
            if report is not None:
                fh.write(report.markdown(title, f", exit code {result.exit_code}"))
            else:
                fh.write(f"### {title}\n\nExit code {result.exit_code}; MLflow run `{result.run_id or 'unknown'}`.\n")


# ------------------------------------------------------------------------------------ the CLI verb
@dataclass(frozen=True)
class CommandOptions:
    """Everything `flywheel remote-train` was given (see cli.remote_train for the help texts)."""

    node: str | None = None
    nodes: str | None = None
    commit: str = "HEAD"
    repo: Path = Path(".")
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


def run_command(opts: CommandOptions, settings: Settings, tracking_given: bool) -> int:
    """`flywheel remote-train`: returns the exit code to exit with (the remote job's)."""
    def warn(msg: str) -> None:
        print(f"flywheel: {msg}", file=sys.stderr, flush=True)

    if bool(opts.node) == bool(opts.nodes):
        raise FlywheelError("give exactly one of --node user@host[:port] or --nodes nodes.yaml")
    nodes = ([Node.parse(opts.node, env_activate=opts.env_activate, workdir=opts.workdir)] if opts.node else load_nodes(str(opts.nodes)))
    known_hosts = opts.known_hosts or str(Path("~/.ssh/known_hosts").expanduser())
    auth = SSHAuth.load(opts.identity, known_hosts, os.environ.get("FLYWHEEL_SSH_KEY_PASSPHRASE") or None,
                        opts.connect_timeout)
    if opts.cancel:
        node, sha = find_job(nodes, auth, opts.cancel, warn)
        stopped = RemoteJob(node, auth, sha, warn=warn).cancel()
        warn(f"{'stopped' if stopped else 'nothing running for'} commit {sha[:12]} on {node.label}")
        return 0
    if opts.attach:
        target = opts.attach
        if re.fullmatch(r"[0-9a-f]{32}", target) and tracking_given:
            target = _commit_of_run(settings, target) or target  # an MLflow run id names its commit
        result = attach(nodes, auth, target, opts.reconnect_timeout, warn=warn)
    else:
        if not tracking_given:
            raise FlywheelError("remote-train needs a tracking server the node can reach: set MLFLOW_TRACKING_URI "
                                "or pass --tracking-uri (the embedded SQLite store lives on this machine)")
        sha = resolve_commit(opts.repo, opts.commit)
        cfg = RemoteTrainConfig(commit=sha, entry=opts.entry, params=parse_params(opts.params),
                                nproc_per_node=opts.nproc_per_node, env_manager=opts.env_manager,
                                reconnect_timeout=opts.reconnect_timeout,
                                # Set by train.yml for a monitor's retrain (like the passphrase, env only).
                                event_id=os.environ.get("FLYWHEEL_EVENT_ID") or None)
        check_entry(opts.repo, sha, cfg)
        result = remote_train(cfg, settings, nodes, auth, archive_commit(opts.repo, sha), warn=warn)
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
    return result.exit_code


def report_version(settings: Settings, version: str, plots_dir: Path | None = None, as_json: bool = False) -> str:
    """Markdown for a registry version (or alias) against the champion; appended to the CI job summary.
    With `as_json`, returns the same facts as one JSON document instead (the summary still gets Markdown)."""
    from flywheel.core.registry import Registry

    mv = Registry(settings).version(version)
    if not mv.run_id:
        raise FlywheelError(f"{settings.model_name} v{mv.version} has no source run to report on")
    report = report_run(settings, mv.run_id, plots_dir)
    text = report.markdown(f"{settings.model_name} v{mv.version}", f", aliases {', '.join(mv.aliases) or 'none'}")
    if summary := os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(summary, "a") as fh:
            fh.write(text)
    if as_json:
        return json.dumps({"model": settings.model_name, "version": str(mv.version), "aliases": list(mv.aliases),
                           **report.as_dict()}, indent=2)
    return text
