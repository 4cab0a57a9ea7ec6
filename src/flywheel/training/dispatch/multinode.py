"""`flywheel remote-train --num-nodes N`: one training job across N nodes of the pool.

The same commit is shipped to every node with the single-node machinery (`job.RemoteJob`: upload,
detached runner, per-commit lock, secrets in a 0600 env file); what differs is each node's job
environment and the first node's role:

* the nodes are the N reachable ones with the most free GPU memory (`nodes.probe_pool`),
  then ordered by their `address` (the order torch numbers nodes in, see
  flywheel.component.distributed), so the first one holds rank 0;
* the first node runs `mlflow run` as a single-node job does (that creates the job's one MLflow run)
  and hosts the c10d rendezvous store on its `rdzv_port`; the others run the same entry point's
  command computed from the same MLproject (`python -m flywheel.training.dispatch.multinode ...`),
  with no `mlflow run` and no MLflow run of their own;
* every node's entry point (flywheel.cli.project) starts `torchrun` with the multi-node rendezvous
  from FLYWHEEL_NNODES / FLYWHEEL_RDZV_* (the rendezvous id is the job key: one job, one rendezvous).

The client follows every node's log (the first on stdout, the others on stderr, prefixed) until all
have ended. A job succeeds only when every node exits 0; otherwise `remote_train_multinode` returns
the first node's result with a one-line failure naming the nodes that failed and, from the run, the
reason rank 0 recorded (flywheel.component.distributed's `flywheel.failure` tag).

Limits: `--env-manager local` only (a conda or docker multi-node job has never run); one multi-node
job at a time per first node and `rdzv_port` (the second one's store cannot bind the port and fails).
"""

from __future__ import annotations

import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TextIO

from flywheel.core.errors import FlywheelError
from flywheel.training.dispatch.job import JobResult, JobVanished, RemoteJob, RemoteTrainConfig, job_key
from flywheel.training.dispatch.nodes import probe_pool

if TYPE_CHECKING:
    from flywheel.core.config import Settings
    from flywheel.core.ssh import SSHAuth
    from flywheel.training.dispatch.nodes import Node

# The variables flywheel.component.distributed reads (kept literal here: the node side owns them).
NNODES, RDZV_ENDPOINT, RDZV_ID = "FLYWHEEL_NNODES", "FLYWHEEL_RDZV_ENDPOINT", "FLYWHEEL_RDZV_ID"
RDZV_IS_HOST, LOCAL_ADDR, NODE_NAME = "FLYWHEEL_RDZV_IS_HOST", "FLYWHEEL_LOCAL_ADDR", "FLYWHEEL_NODE_NAME"


def choose_nodes(nodes: Sequence[Node], auth: SSHAuth, key: str, count: int, nproc: int = 1,
                 warn: Callable[[str], None] = print) -> list[Node]:
    """The `count` reachable nodes with the most free GPU memory, first node (rank 0, rendezvous host)
    first: ordered by `Node.address` as torch orders them."""
    if count > len(nodes):
        raise FlywheelError(f"--num-nodes {count} but the pool has {len(nodes)} node(s)")
    _, ranked = probe_pool(nodes, auth, key, f"job {key}", nproc, warn)
    if len(ranked) < count:
        raise FlywheelError(f"--num-nodes {count} but only {len(ranked)} of the {len(nodes)} nodes are reachable")
    chosen = sorted((p.node for p in ranked[:count]), key=lambda n: n.address)
    addresses = [n.address for n in chosen]
    if len(set(addresses)) != len(addresses):
        raise FlywheelError("two chosen nodes share the address " + ", ".join(sorted(
            {a for a in addresses if addresses.count(a) > 1})) + ": give each node its own `addr` in nodes.yaml "
            "(torch orders a job's nodes by it)")
    return chosen


def node_env(chosen: Sequence[Node], index: int, key: str) -> tuple[tuple[str, str], ...]:
    """Node `index`'s part of the rendezvous, for its job environment."""
    first = chosen[0]
    return ((NNODES, str(len(chosen))), (RDZV_ENDPOINT, f"{first.address}:{first.rdzv_port}"), (RDZV_ID, key),
            (RDZV_IS_HOST, "1" if index == 0 else "0"), (LOCAL_ADDR, chosen[index].address),
            (NODE_NAME, chosen[index].label))


def worker_command(cfg: RemoteTrainConfig) -> str:
    """A non-first node's shell command: the entry point exactly as `mlflow run` would run it, without
    the run (`main` below computes it from the shipped MLproject with MLflow's own loader)."""
    params = list(cfg.params)
    if cfg.nproc_per_node is not None:
        params.append(("nproc_per_node", str(cfg.nproc_per_node)))
    sub = "" if cfg.project_dir == "." else "/" + cfg.project_dir  # normalize_project_dir: no shell specials
    args = ["-m", "flywheel.training.dispatch.multinode", "$PWD/src", "--entry", cfg.entry,
            *[a for k, v in params for a in ("-P", f"{k}={v}")]]
    return "python " + " ".join(f'"$PWD/src{sub}"' if a == "$PWD/src" else shlex.quote(a) for a in args)


class _Prefixed:
    """A text stream writing each line to `out` with `prefix` (the other nodes' logs on stderr)."""

    def __init__(self, out: TextIO, prefix: str) -> None:
        self.out, self.prefix, self._partial = out, prefix, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.out.write(f"{self.prefix}{line}\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


@dataclass(frozen=True)
class NodeOutcome:
    node: str
    exit_code: int | None  # None: the job ended without an exit status (killed) or could not be followed
    error: str | None = None
    vanished: bool = False  # known to have ended without an exit status (not merely unreachable)


def remote_train_multinode(cfg: RemoteTrainConfig, settings: Settings, nodes: Sequence[Node], auth: SSHAuth,
                           archive: bytes, num_nodes: int, out: TextIO | None = None,
                           warn: Callable[[str], None] | None = None) -> tuple[JobResult, str | None]:
    """Start the commit on `num_nodes` nodes as one torchrun job and follow it to the end. Returns the
    first node's result (its exit code, the run id) and, if any node failed, a one-line reason."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = out or sys.stdout
    if cfg.env_manager != "local":
        raise FlywheelError(f"--num-nodes needs --env-manager local (a multi-node {cfg.env_manager} job has "
                            "never run; see docs/runbooks/training-node.md)")
    key = job_key(cfg.commit, cfg.project_dir)
    chosen = choose_nodes(nodes, auth, key, num_nodes, cfg.nproc_per_node or 1, warn)
    warn(f"{num_nodes} nodes: {', '.join(n.label for n in chosen)}; rendezvous {key} at "
         f"{chosen[0].address}:{chosen[0].rdzv_port} (rank 0 and the MLflow run on {chosen[0].label})")
    jobs: list[RemoteJob] = []
    try:
        for i, node in enumerate(chosen):
            job = RemoteJob(node, auth, key, out=out if i == 0 else _Prefixed(sys.stderr, f"[{node.label}] "),
                            warn=warn, reconnect_timeout=cfg.reconnect_timeout, poll_interval=cfg.poll_interval)
            node_cfg = replace(cfg, env=(*cfg.env, *node_env(chosen, i, key)))
            job.start(settings, node_cfg, archive, command=None if i == 0 else worker_command(node_cfg))
            jobs.append(job)
    except BaseException:
        for job in jobs:  # the started nodes would wait for the rest until torch's join timeout
            with suppress(FlywheelError, OSError):
                job.cancel()
        raise
    warn(f"started {jobs[0].what} on {num_nodes} nodes; if this client goes away, follow the first node with "
         f"`flywheel remote-train --attach {key}` (--cancel {key} stops every node)")
    outcomes = _follow_all(jobs, failure_grace(chosen), warn)
    result = JobResult(node=chosen[0].label, commit=cfg.commit, exit_code=outcomes[0].exit_code or 0,
                       run_id=jobs[0].run_id)
    failed = [o for o in outcomes if o.exit_code != 0]
    if not failed:
        return result, None
    if result.exit_code == 0:
        result = replace(result, exit_code=1)
    parts = [f"{o.node} exited {o.exit_code}" if o.exit_code is not None else str(o.error) for o in failed]
    reason = _run_failure(settings, result.run_id, outcomes[0] if outcomes[0].vanished else None,
                          cfg.nproc_per_node or 1)
    return result, (f"the {num_nodes}-node job failed: {'; '.join(parts)}"
                    + (f"; MLflow run {result.run_id}: {reason}" if reason else ""))


def _follow_all(jobs: Sequence[RemoteJob], grace: float, warn: Callable[[str], None]) -> list[NodeOutcome]:
    """Follow every node's job at once (one thread each) until all have ended. Once one node has
    failed the others get `grace` seconds to fail by themselves (rank 0 records why; a vanished peer
    takes the process-group timeout), then the ones still running are cancelled: a node that never
    reached the rendezvous would otherwise wait for torch's join timeout (10 min)."""
    outcomes: list[NodeOutcome | None] = [None] * len(jobs)

    def follow(i: int) -> None:
        job = jobs[i]
        try:
            outcomes[i] = NodeOutcome(job.node.label, job.follow())
        except JobVanished as exc:
            outcomes[i] = NodeOutcome(job.node.label, None, str(exc).split("; ")[0], vanished=True)
        except FlywheelError as exc:  # "ended without an exit status" (killed), or the node stayed unreachable
            outcomes[i] = NodeOutcome(job.node.label, None, str(exc).split("; ")[0])
        except Exception as exc:  # noqa: BLE001 - any other error following one node must not hide the others
            outcomes[i] = NodeOutcome(job.node.label, None, f"could not be followed: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=follow, args=(i,), name=f"follow-{j.node.label}", daemon=True)
               for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    deadline = None
    while any(t.is_alive() for t in threads):
        if deadline is None and any(o is not None and o.exit_code != 0 for o in outcomes):
            deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            for job, t in zip(jobs, threads, strict=True):
                if t.is_alive():
                    warn(f"another node failed {grace:.0f}s ago and {job.node.label} is still running: cancelling it")
                    with suppress(FlywheelError, OSError):
                        job.cancel()
            deadline = float("inf")  # cancel once; the follow threads see the jobs end
        time.sleep(0.5)
    return [o or NodeOutcome(j.node.label, None, "not followed") for o, j in zip(outcomes, jobs, strict=True)]


def failure_grace(chosen: Sequence[Node]) -> float:
    """How long the other nodes of a failed job may take to end by themselves: the longest process-group
    timeout among the nodes' env (FLYWHEEL_DIST_TIMEOUT, default 300 s) plus a minute for rank 0 to
    record the failure."""
    timeouts = []
    for node in chosen:
        value = dict(node.env).get("FLYWHEEL_DIST_TIMEOUT")
        with suppress(TypeError, ValueError):
            timeouts.append(float(value))
    return max(timeouts or [300.0]) + 60.0


def _run_failure(settings: Settings, run_id: str | None, lost_first: NodeOutcome | None = None,
                 nproc: int = 1) -> str | None:
    """The run's status and rank 0's recorded reason (`flywheel.failure`), if the tracking server says.

    `lost_first`: the first node's job was killed (or its host rebooted), so `mlflow run` died with
    rank 0 and nothing there can end the run. If it is still RUNNING (rank 0 may have ended it before
    it went), it is ended FAILED here, with the tags rank 0 writes for a lost peer."""
    if run_id is None:
        return None
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    from flywheel.core.registry import Registry

    try:
        registry = Registry(settings)
        run = registry.run(run_id)
        if lost_first is not None and run.info.status == "RUNNING":
            ranks = ",".join(str(r) for r in range(nproc))
            why = (f"lost rank(s) {ranks} on node(s) {lost_first.node} (the first node, which ran `mlflow run`): "
                   f"{lost_first.error}")[:5000]
            registry.client.log_batch(run_id, tags=[RunTag("flywheel.failure", why), RunTag("flywheel.lost_ranks", ranks),
                                                    RunTag("flywheel.lost_nodes", lost_first.node)])
            registry.client.set_terminated(run_id, "FAILED")
            return f"FAILED, {why}"
    except (MlflowException, OSError) as exc:  # the tracking server is down too: said, the run stays as it is
        return f"could not read it ({type(exc).__name__})"
    why = run.data.tags.get("flywheel.failure")
    return f"{run.info.status}" + (f", {why}" if why else "")


# ------------------------------------------------------------------------------ on a non-first node
def entry_command(project_dir: str, entry: str, params: dict[str, str]) -> str:
    """The shell command `mlflow run <project_dir> -e <entry> -P ...` would run, computed by MLflow's own
    MLproject loader, so every node runs the same thing the first node's `mlflow run` does."""
    from mlflow.exceptions import ExecutionException
    from mlflow.projects.utils import get_entry_point_command, load_project

    try:
        (command,) = get_entry_point_command(load_project(project_dir), entry, params, None)
    except ExecutionException as exc:  # no such entry point, a missing or mistyped parameter
        raise FlywheelError(f"{project_dir}: {exc}") from exc
    return command


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m flywheel.training.dispatch.multinode PROJECT_DIR --entry E -P k=v ...`: run the entry
    point's command in PROJECT_DIR (bash, as `mlflow run --env-manager local` does), replacing this process."""
    import argparse
    import os

    from flywheel.training.dispatch.job import parse_params

    parser = argparse.ArgumentParser(prog="flywheel.training.dispatch.multinode", description=main.__doc__)
    parser.add_argument("project_dir")
    parser.add_argument("--entry", default="main")
    parser.add_argument("-P", dest="params", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        command = entry_command(args.project_dir, args.entry, dict(parse_params(args.params)))
    except FlywheelError as exc:
        sys.exit(f"flywheel: {exc}")
    print(f"flywheel: this node runs entry {args.entry} of its multi-node job without an MLflow run of its own: "
          f"{command}", flush=True)
    os.chdir(args.project_dir)
    os.execvp("bash", ["bash", "-c", command])


if __name__ == "__main__":
    main()
