"""Training across processes and nodes under `torchrun`: how a job is launched, who talks to MLflow,
and what rank 0 records when a peer is lost.

Launch. `flywheel remote-train --num-nodes N` (flywheel.training.dispatch.multinode) exports the
FLYWHEEL_* variables below into every node's job; the entry point (flywheel.cli.project) turns them
into one `torchrun` command line with `torchrun_args`: a multi-node c10d rendezvous (the endpoint on
the first node, which hosts the store: `is_host`; the id from the job key; `--max-restarts 0`, so a
lost node fails the job instead of re-forming a smaller one) or, without them, `--standalone` as
before. `--local-addr` is the node's own address: torch numbers the nodes in the order of that
string, and remote-train sorts its nodes the same way, so the first node, whose `mlflow run`
created the job's run, holds rank 0.

Run. `Cluster.join` (every rank, right after the process group is up) gathers each rank's node, host
and MLflow run id (only the first node's processes have one): rank 0 adopts that run even if torch
placed it elsewhere, so a job is exactly one run, and no other rank ever opens one. The run records
the node count and each node's host and ranks (`params`, `tags`).

Loss. The process group's timeout is bounded (`FLYWHEEL_DIST_TIMEOUT`, default 300 s; torch's own is
10 to 30 min) so a rank whose peer vanished raises instead of hanging; a killed peer's TCP reset
makes gloo raise at once. NCCL gets `TORCH_NCCL_BLOCKING_WAIT=1` (see `torchrun_env`) so its errors
and timeouts raise in the training thread rather than aborting the process before rank 0 can record
them. On a failure every rank that is still alive checks in to the rendezvous store (`on_failure`),
saying whether a collective failed or its own code did; rank 0 waits `LOST_GRACE_S` for the others,
and the ranks that never check in are the lost ones: `failure_tags` names them with their nodes (or
the rank whose own code failed), and the trainer ends the run FAILED with those tags before any
model is logged. While rank 0 records this it ignores the SIGTERM torchrun sends when
another local rank has already exited (torchrun waits 30 s before SIGKILL).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    import torch.distributed as dist

    from flywheel.component.loop import DistContext

NNODES = "FLYWHEEL_NNODES"  # nodes in the job; unset or 1: single node (`--standalone`)
RDZV_ENDPOINT = "FLYWHEEL_RDZV_ENDPOINT"  # host:port of the first node's rendezvous store
RDZV_ID = "FLYWHEEL_RDZV_ID"  # the job's rendezvous id (remote-train derives it from the job key)
RDZV_IS_HOST = "FLYWHEEL_RDZV_IS_HOST"  # "1" on the first node: its torchrun agent hosts the store
LOCAL_ADDR = "FLYWHEEL_LOCAL_ADDR"  # this node's address as the others reach it (and its rank order)
NODE_NAME = "FLYWHEEL_NODE_NAME"  # the node's name in nodes.yaml, recorded on the run
DIST_TIMEOUT = "FLYWHEEL_DIST_TIMEOUT"  # seconds a collective may wait for a peer before it raises
DEFAULT_TIMEOUT_S = 300.0
LOST_GRACE_S = 5.0  # how long rank 0 waits for the surviving ranks to check in after a failure


def num_nodes(env: Mapping[str, str] = os.environ) -> int:
    """Nodes in this job (1 when not launched by a multi-node remote-train)."""
    try:
        return max(1, int(env.get(NNODES) or 1))
    except ValueError as exc:
        raise FlywheelError(f"{NNODES}={env.get(NNODES)!r} must be a whole number of nodes") from exc


def torchrun_args(nproc: int, env: Mapping[str, str] = os.environ) -> list[str]:
    """`torchrun`'s options for `nproc` processes on this node: the multi-node rendezvous the FLYWHEEL_*
    variables describe, else `--standalone` (one node, a private rendezvous)."""
    nnodes = num_nodes(env)
    if nnodes == 1:
        return ["--standalone", f"--nproc_per_node={nproc}"]
    endpoint, rdzv_id = env.get(RDZV_ENDPOINT, ""), env.get(RDZV_ID, "")
    if not endpoint or not rdzv_id:
        raise FlywheelError(f"{NNODES}={nnodes} needs {RDZV_ENDPOINT} and {RDZV_ID}: start multi-node jobs with "
                            "`flywheel remote-train --num-nodes N`")
    is_host = "true" if env.get(RDZV_IS_HOST) == "1" else "false"
    args = [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}", "--max_restarts=0",
            f"--rdzv_conf=is_host={is_host}"]
    if local := env.get(LOCAL_ADDR):
        args.append(f"--local_addr={local}")
    return args


def torchrun_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment torchrun starts with: for a multi-node job NCCL's errors and timeouts raise in
    the training thread (TORCH_NCCL_BLOCKING_WAIT=1) instead of its watchdog aborting the process, so
    rank 0 can still record the loss. A value the node already sets wins."""
    out = dict(env)
    if num_nodes(env) > 1:
        out.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    return out


def process_group_timeout(env: Mapping[str, str] = os.environ) -> timedelta:
    """How long a collective waits for a peer before raising (FLYWHEEL_DIST_TIMEOUT seconds)."""
    raw = env.get(DIST_TIMEOUT) or ""
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise FlywheelError(f"{DIST_TIMEOUT}={raw!r} must be a number of seconds") from exc
    if seconds <= 0:
        raise FlywheelError(f"{DIST_TIMEOUT} must be positive, got {raw}")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Member:
    """One rank as it reported itself when the job formed."""

    rank: int
    node: str  # nodes.yaml name (FLYWHEEL_NODE_NAME), else the host name
    host: str
    run_id: str | None  # MLFLOW_RUN_ID: set on the node whose `mlflow run` created the job's run


class Terminated(Exception):
    """SIGTERM from torchrun (another local rank exited): ends training like a failed collective."""


@dataclass
class Cluster:
    """The job's ranks (gathered once, every rank holds the same view) and the store they check in to."""

    rank: int
    members: tuple[Member, ...]
    store: dist.Store | None = field(default=None, repr=False)
    recording: bool = False  # rank 0 is recording a failure: a SIGTERM must not interrupt it
    _previous_sigterm: object = field(default=None, repr=False)

    @classmethod
    def join(cls, ctx: DistContext) -> Cluster:
        """Every rank, right after init_process_group: gather who is where; rank 0 adopts the job's
        MLflow run (MLFLOW_RUN_ID) from whichever rank has it; SIGTERM becomes `Terminated`."""
        import torch.distributed as dist

        host = socket.gethostname()
        me = Member(ctx.rank, os.environ.get(NODE_NAME) or host, host, os.environ.get("MLFLOW_RUN_ID") or None)
        gathered: list[Member | None] = [None] * ctx.world_size
        dist.all_gather_object(gathered, me)
        cluster = cls(ctx.rank, tuple(m for m in gathered if m is not None), _store())
        run_ids = {m.run_id for m in cluster.members if m.run_id}
        if len(run_ids) > 1:
            raise FlywheelError(f"the job's ranks name {len(run_ids)} MLflow runs ({', '.join(sorted(run_ids))}): "
                                "one multi-node job must have been started by one `mlflow run`")
        if ctx.is_main and run_ids and not os.environ.get("MLFLOW_RUN_ID"):
            os.environ["MLFLOW_RUN_ID"] = run_ids.pop()  # torch put rank 0 off the first node: adopt its run
        cluster._trap_sigterm()
        return cluster

    def _trap_sigterm(self) -> None:
        def on_term(signum, frame) -> None:
            if self.recording:
                return  # finish recording the failure; torchrun SIGKILLs after its own grace
            raise Terminated("stopped by torchrun (SIGTERM): another rank on this node exited")

        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (a notebook's worker thread): keep the default
            pass

    def close(self) -> None:
        """The distributed part is over: SIGTERM gets its previous handler back."""
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    # ------------------------------------------------------------------ what the run records
    def nodes(self) -> list[tuple[str, str, list[int]]]:
        """(node, host, ranks) per node, in rank order."""
        out: dict[str, tuple[str, list[int]]] = {}
        for m in sorted(self.members, key=lambda m: m.rank):
            out.setdefault(m.node, (m.host, []))[1].append(m.rank)
        return [(node, host, ranks) for node, (host, ranks) in out.items()]

    def params(self) -> dict[str, str]:
        """Run parameters: how many nodes (world_size is the loop's own parameter)."""
        return {"num_nodes": str(len(self.nodes()))}

    def tags(self) -> dict[str, str]:
        """Run tags: `flywheel.node.<i>` = "<node> host=<host> ranks=<a,b>" for every node."""
        return {f"flywheel.node.{i}": f"{node} host={host} ranks={','.join(map(str, ranks))}"
                for i, (node, host, ranks) in enumerate(self.nodes())}

    # ------------------------------------------------------------------ a failure
    def on_failure(self, exc: BaseException, grace: float = LOST_GRACE_S) -> dict[str, str] | None:
        """Every rank: check in as still alive, saying whether its own code failed or a collective did.
        Rank 0: wait up to `grace` seconds for the others (not at all when its own code failed: then the
        others only learn of it when its process exits) and return the run's failure tags
        (`failure_tags`); other ranks return None."""
        own = not is_communication_error(exc)
        if self.rank == 0:
            self.recording = True
        checked_in: dict[int, str] = {}
        if self.store is not None:
            try:
                self.store.set(f"alive/{self.rank}", f"{'own' if own else 'comm'}|{_describe(exc)}")
                if self.rank == 0 and not own:
                    checked_in = self._wait_for_checkins(grace)
            except Exception:  # noqa: BLE001 - the store lives on the first node; if it is gone we can't tell who else is
                self.store = None
        if self.rank != 0:
            return None
        if own:
            return failure_tags(self, exc, [], {0: f"own|{_describe(exc)}"})
        lost = None if self.store is None else sorted(m.rank for m in self.members if m.rank not in checked_in)
        return failure_tags(self, exc, lost, checked_in)

    def _wait_for_checkins(self, grace: float) -> dict[int, str]:
        """rank → what it checked in with, for the ranks that did within `grace` seconds."""
        keys = {m.rank: f"alive/{m.rank}" for m in self.members}
        found: dict[int, str] = {}
        deadline = time.monotonic() + grace
        while True:
            for rank, key in keys.items():
                if rank not in found and self.store.check([key]):
                    found[rank] = self.store.get(key).decode(errors="replace")
            if len(found) == len(keys) or time.monotonic() >= deadline:
                return found
            time.sleep(0.2)


def is_communication_error(exc: BaseException) -> bool:
    """Whether `exc` is the process group failing (a peer gone, a timeout, torchrun stopping this
    rank) rather than this rank's own code: torch's DistError family, gloo's RuntimeErrors (they name
    their gloo source file), NCCL's."""
    import torch.distributed as dist

    if isinstance(exc, (Terminated, dist.DistError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("gloo" in text or "nccl" in text)


def _describe(exc: BaseException) -> str:
    """`Type: message` on one line, without gloo's C++ source location prefix, at most 300 characters."""
    text = re.sub(r"^\[[^\]]+\.(?:cc|cpp|h|hpp):\d+\]\s*", "", str(exc).strip())
    return " ".join(f"{type(exc).__name__}: {text}".split())[:300]


def failure_tags(cluster: Cluster, exc: BaseException, lost: list[int] | None,
                 checked_in: dict[int, str] | None = None) -> dict[str, str]:
    """The run's record of why the job failed: `flywheel.failure` (one line: the lost ranks and their
    nodes, else the ranks whose own code failed, and what rank 0 saw) and, when ranks never checked in,
    `flywheel.lost_ranks` and `flywheel.lost_nodes`. `checked_in`: rank → "own|error" or "comm|error"."""
    by_rank = {m.rank: m for m in cluster.members}
    failed = {r: v.split("|", 1)[1] for r, v in (checked_in or {}).items() if v.startswith("own|")}
    parts, tags = [], {}
    if lost:
        nodes = sorted({by_rank[r].node for r in lost})
        hosts = sorted({by_rank[r].host for r in lost})
        ranks = ",".join(map(str, lost))
        parts.append(f"lost rank(s) {ranks} on node(s) {', '.join(nodes)} (host {', '.join(hosts)})")
        tags = {"flywheel.lost_ranks": ranks, "flywheel.lost_nodes": ",".join(nodes)}
    for rank, error in sorted(failed.items()):
        parts.append(f"rank {rank} on {by_rank[rank].node} failed: {error}")
    if lost is None:
        parts.append("could not tell which rank was lost (the rendezvous store is unreachable)")
    elif not parts:
        parts.append("distributed training failed with every rank alive")
    if 0 not in failed:
        parts.append(f"rank 0 saw {_describe(exc)}")
    return {"flywheel.failure": "; ".join(parts)[:1000], **tags}


def _store() -> dist.Store | None:
    """A client of the job's store (torchrun's MASTER_ADDR/MASTER_PORT), for the failure check-ins;
    None when there is none to reach (not under torchrun)."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    scope = f"flywheel/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30))
    return dist.PrefixStore(scope, store)
