"""`flywheel remote-train --tune`: one `tune` worker per training node, all on one Optuna study.

`plan_tune` (pure: tested on plain data) decides which nodes get a worker (the reachable ones of the
pool, most free GPU memory first; `--workers N` takes the first N) and each worker's request: the
project's `tune` entry point with `-P study=NAME -P finalize=false`, and the study's storage URL
(it holds a database password) in the job's 0600 environment file as FLYWHEEL_TUNE_STORAGE, never
on a command line. `remote_tune` starts the workers, streams their logs prefixed with the node,
and when they are done finalizes the study once, here (flywheel.training.tune.finalize_study: best
params and plots on the study's parent run, the best trial through the gate), so N workers never
gate N times.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TextIO

from flywheel.core.errors import FlywheelError
from flywheel.training.dispatch.job import JobResult, RemoteJob, RemoteTrainConfig, job_key
from flywheel.training.dispatch.nodes import Node, NodeProbe, probe_node, rank_nodes

if TYPE_CHECKING:
    from flywheel.core.config import Settings
    from flywheel.core.ssh import SSHAuth
    from flywheel.training.tune import TuneSummary

STORAGE_ENV = "FLYWHEEL_TUNE_STORAGE"  # = flywheel.training.tune.STORAGE_ENV


@dataclass(frozen=True)
class TunePlan:
    study: str
    storage: str
    register: bool
    margin: float
    jobs: tuple[tuple[Node, RemoteTrainConfig], ...]


def plan_tune(base: RemoteTrainConfig, nodes: Sequence[Node], probes: Sequence[NodeProbe] | None, *,
              storage: str | None, model_name: str, workers: int | None = None,
              study: str | None = None) -> TunePlan:
    """The workers of a distributed search. `probes`: the pool's probes (None: use `nodes` as given,
    e.g. one --node). The study is `study`, else a `-P study=` of the request, else MODEL-COMMIT."""
    if not storage:
        raise FlywheelError("remote-train --tune needs the study's storage, reachable from every node: "
                            f"--tune-storage or {STORAGE_ENV}, e.g. postgresql+psycopg2://USER:PW@TRACKING-HOST:5432/optuna")
    if storage.startswith("sqlite:"):
        raise FlywheelError("remote-train --tune: a SQLite study lives on one machine; give the tracking node's "
                            "Postgres (postgresql+psycopg2://…/optuna) so the nodes share it")
    if probes is None:
        candidates = list(nodes)
    else:
        for p in probes:
            if p.busy:
                raise FlywheelError(f"commit {base.commit[:12]} is already running on {p.node.label}; attach to it "
                                    "or cancel it before starting a search there")
        candidates = [p.node for p in rank_nodes(probes, base.nproc_per_node or 1)]
    if not candidates:
        raise FlywheelError(f"none of the {len(nodes)} training nodes is reachable")
    count = workers or len(candidates)
    if count > len(candidates):
        raise FlywheelError(f"--workers {count}: only {len(candidates)} of the pool's {len(nodes)} nodes are "
                            "reachable (one worker per node)")
    params = dict(base.params)
    name = study or params.get("study") or f"{model_name}-{base.commit[:12]}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}", name):
        raise FlywheelError(f"bad study name {name!r}: letters, digits and _ . : -")
    params.update(study=name, finalize="false")
    cfg = replace(base, entry="tune" if base.entry == "train" else base.entry, params=tuple(params.items()),
                  env=(*base.env, (STORAGE_ENV, storage)))
    register = params.get("register", "true").lower() in ("1", "true", "yes")
    return TunePlan(name, storage, register, float(params.get("margin") or 0.0),
                    tuple((node, cfg) for node in candidates[:count]))


class _Prefixed:
    """A text sink that writes whole lines to `out` as `[label] line` (workers' logs interleave)."""

    def __init__(self, label: str, out: TextIO, lock: threading.Lock):
        self.label, self.out, self.lock, self.buf = label, out, lock, ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        if lines:
            with self.lock:
                self.out.write("".join(f"[{self.label}] {line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self.out.flush()


def remote_tune(base: RemoteTrainConfig, settings: Settings, nodes: Sequence[Node], auth: SSHAuth, archive: bytes,
                *, storage: str | None, workers: int | None = None, study: str | None = None,
                out: TextIO | None = None, warn: Callable[[str], None] | None = None
                ) -> tuple[JobResult, TuneSummary | None]:
    """Start one worker per planned node, follow them all, then finalize the study here."""
    from flywheel.training.tune import finalize_study, load_study

    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = out or sys.stdout
    key = job_key(base.commit, base.project_dir)
    probes = [probe_node(node, auth, key) for node in nodes] if len(nodes) > 1 else None
    for p in probes or ():
        if p.error:
            warn(f"skipping {p.node.label}: {p.error}")
    plan = plan_tune(base, nodes, probes, storage=storage, model_name=settings.model_name, workers=workers,
                     study=study)
    lock = threading.Lock()
    jobs = []
    for node, cfg in plan.jobs:
        job = RemoteJob(node, auth, key, out=_Prefixed(node.name or node.host, out, lock), warn=warn,
                        reconnect_timeout=cfg.reconnect_timeout, poll_interval=cfg.poll_interval)
        job.start(settings, cfg, archive)
        warn(f"started a {cfg.entry} worker of study {plan.study} on {node.label}")
        jobs.append(job)
    codes: list[int] = [1] * len(jobs)

    def follow(i: int) -> None:
        try:
            codes[i] = jobs[i].follow()
        except Exception as exc:  # noqa: BLE001 - one lost worker must not stop following the others
            warn(f"worker on {jobs[i].node.label}: {exc}")

    threads = [threading.Thread(target=follow, args=(i,), name=f"tune-worker-{i}") for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    labels = ",".join(job.node.label for job in jobs)
    for job, code in zip(jobs, codes, strict=True):
        warn(f"worker on {job.node.label} finished with exit code {code}")
    summary = None
    if 0 in codes:  # at least one worker finished its trials: the study has an outcome to record
        found, parent = load_study(plan.storage, plan.study)
        summary = finalize_study(found, settings, parent, plan.storage, register=plan.register, margin=plan.margin)
        warn(summary.text())
    code = next((c for c in codes if c != 0), 0)
    return JobResult(node=labels, commit=base.commit, exit_code=code,
                     run_id=summary.best_run_id if summary else None), summary
