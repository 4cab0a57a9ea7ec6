"""The training-node inventory and the choice among it: `Node` (where to log in, how to run `mlflow`
there), nodes.yaml loading, and the pool's probe → rank → pick by free GPU memory.

Picking asks each node over SSH once (`nvidia-smi` and the commit's job lock); an unreachable node
is skipped with a warning rather than failing the pool, and a node already training the commit
refuses a second start.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.core.errors import FlywheelError
from flywheel.core.files import yaml_problem
from flywheel.core.ssh import TRANSIENT, NodeUnreachable, connect, exec_command

if TYPE_CHECKING:
    import paramiko

    from flywheel.core.ssh import SSHAuth

GPU_QUERY = "nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits"


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
    # remote-train --num-nodes: the address the other nodes reach this one at (rendezvous, gloo/NCCL;
    # default `host`; e.g. the cluster network's address when SSH goes through a public name), and the
    # port its rendezvous store listens on when it is the job's first node (torch's default 29400).
    addr: str = ""
    rdzv_port: int = 29400

    @property
    def address(self) -> str:
        """Where the other nodes of a multi-node job reach this one."""
        return self.addr or self.host

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


_NODE_KEYS = {"name", "host", "user", "port", "env_activate", "mlflow", "workdir", "env", "docker_build_args",
              "addr", "rdzv_port"}


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
        raise FlywheelError(f"{where} is not valid YAML: {yaml_problem(exc)}") from None
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
            nodes.append(Node(**{k: (int(v) if k in ("port", "rdzv_port") else str(v)) for k, v in entry.items()},
                              env=tuple((str(k), str(v)) for k, v in env.items())))
        except ValueError as exc:
            raise FlywheelError(f"{where}: node #{i + 1}: {exc}") from exc
    return nodes


def _workdir(node: Node) -> str:
    """The jobs root as a path a login shell (which starts in $HOME) resolves correctly."""
    workdir = node.workdir.removeprefix("~/")
    return workdir.rstrip("/") or "."


def jobs_root(sftp: paramiko.SFTPClient, node: Node) -> str:
    """The jobs root as an absolute path on the node, resolved over SFTP."""
    workdir = _workdir(node)
    return workdir if workdir.startswith("/") else f"{sftp.normalize('.').rstrip('/')}/{workdir}"


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
        _, out, _ = exec_command(client, script)
        return NodeProbe(node, free_gpu_mib=parse_free_memory(out), busy="FLYWHEEL_BUSY" in out)
    except TRANSIENT as exc:
        return NodeProbe(node, error=f"{node.label}: {exc}")
    finally:
        client.close()


def rank_nodes(probes: Sequence[NodeProbe], nproc: int = 1) -> list[NodeProbe]:
    """Reachable nodes, most free GPU memory first (stable: ties keep nodes.yaml order)."""
    return sorted((p for p in probes if p.error is None), key=lambda p: -p.score(nproc))


def probe_pool(nodes: Sequence[Node], auth: SSHAuth, key: str, what: str, nproc: int = 1,
               warn: Callable[[str], None] = print) -> tuple[list[NodeProbe], list[NodeProbe]]:
    """(every node's probe, the reachable ones ranked by `rank_nodes`) for job `key`. Unreachable nodes
    are skipped with a warning; a node already running the job (`what`, e.g. "commit abc123") is an error."""
    probes = [probe_node(node, auth, key) for node in nodes]
    for p in probes:
        if p.error:
            warn(f"skipping {p.node.label}: {p.error}")
        if p.busy:
            raise FlywheelError(f"{what} is already training on {p.node.label}; follow it with "
                                f"`flywheel remote-train --attach {key}` instead of starting it twice")
    return probes, rank_nodes(probes, nproc)


def pick_node(nodes: Sequence[Node], auth: SSHAuth, sha: str, nproc: int = 1,
              warn: Callable[[str], None] = print) -> Node:
    """The reachable node with the most free GPU memory; unreachable ones are skipped with a warning."""
    probes, ranked = probe_pool(nodes, auth, sha, f"commit {sha[:12]}", nproc, warn)
    if not ranked:
        raise FlywheelError(f"none of the {len(nodes)} training nodes is reachable: " +
                            "; ".join(p.error or "" for p in probes))
    best = ranked[0]
    gpus = f"{len(best.free_gpu_mib)} GPU(s), {best.score(nproc)} MiB free" if best.free_gpu_mib else "CPU only"
    warn(f"using {best.node.label} ({gpus})")
    return best.node
