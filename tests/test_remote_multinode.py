"""remote-train --num-nodes: one torchrun job across two training nodes, end to end on loopback.

Two real sshd "nodes" on 127.0.0.1 (`ssh_node`, `ssh_node_b`: their own ports, host keys and job
directories, one client key), the real tracking node (`tracking_stack`: MLflow with basic-auth on
Postgres + GCS emulator), a real git commit of this working tree, gloo over loopback. The nodes'
`addr` are 127.0.0.1 and 127.0.0.2 (both loopback): torch orders a job's nodes by that address, so
node-a holds rank 0 and the rendezvous store, as remote-train arranges on real hosts.

What it proves: one MLflow run for the whole job, with the world size, node count and each node's
host recorded, and the same per-epoch losses as the single-node job of the same process count
(`torchrun --standalone --nproc_per_node=2`) on the same seed; and (reliability) that losing a node
mid-run fails the job cleanly: the run ends FAILED naming the lost rank and node, no model is logged
or registered, and remote-train exits non-zero with one line saying so.

Both nodes pin OMP_NUM_THREADS=1 (torchrun's own default for the standalone job's two processes), so
both jobs run the same kernels with the same threading: then the two jobs compute the same
gradients (each rank's shard depends only on the seed, its rank and the world size) and gloo sums
the same two numbers per element, in either order, which is exact in floating point. The tolerance
(relative 1e-5) only absorbs a different but equally valid summation order inside a kernel; a real
difference (another shard, seed or world size) moves the loss by far more (percent, not ppm).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, VENV_BIN, free_port
from tests.fixtures_ssh import commit_on

# Small and quick on two shared CPU cores: 400 digits, batches of 32 per rank, 2 epochs.
TRAIN = ["-P", "dataset=digits", "-P", "arch=small-cnn", "-P", "epochs=2", "-P", "batch_size=32",
         "-P", "max_train_samples=400"]
LOCAL_TRAIN = ["train", "--dataset", "digits", "--arch", "small-cnn", "--epochs", "2", "--batch-size", "32",
               "--max-train-samples", "400", "--no-register"]


# ---------------------------------------------------------------- the plain parts, on plain data (make test)
def test_torchrun_args_are_standalone_or_the_multinode_rendezvous():
    from flywheel.component.distributed import torchrun_args, torchrun_env

    assert torchrun_args(2, {}) == ["--standalone", "--nproc_per_node=2"]
    env = {"FLYWHEEL_NNODES": "2", "FLYWHEEL_RDZV_ENDPOINT": "10.0.0.1:29400", "FLYWHEEL_RDZV_ID": "abc",
           "FLYWHEEL_RDZV_IS_HOST": "1", "FLYWHEEL_LOCAL_ADDR": "10.0.0.1"}
    assert torchrun_args(4, env) == ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d",
                                     "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=abc", "--max_restarts=0",
                                     "--rdzv_conf=is_host=true", "--local_addr=10.0.0.1"]
    assert "--rdzv_conf=is_host=false" in torchrun_args(1, {**env, "FLYWHEEL_RDZV_IS_HOST": "0"})
    assert torchrun_env(env)["TORCH_NCCL_BLOCKING_WAIT"] == "1"
    assert torchrun_env({**env, "TORCH_NCCL_BLOCKING_WAIT": "0"})["TORCH_NCCL_BLOCKING_WAIT"] == "0"  # the node's wins
    assert "TORCH_NCCL_BLOCKING_WAIT" not in torchrun_env({})
    from flywheel.core.errors import FlywheelError

    with pytest.raises(FlywheelError, match="FLYWHEEL_RDZV_ENDPOINT"):
        torchrun_args(1, {"FLYWHEEL_NNODES": "2"})


def test_process_group_timeout_is_bounded_and_configurable():
    from datetime import timedelta

    from flywheel.component.distributed import process_group_timeout
    from flywheel.core.errors import FlywheelError

    assert process_group_timeout({}) == timedelta(seconds=300)
    assert process_group_timeout({"FLYWHEEL_DIST_TIMEOUT": "45"}) == timedelta(seconds=45)
    with pytest.raises(FlywheelError, match="positive"):
        process_group_timeout({"FLYWHEEL_DIST_TIMEOUT": "0"})


def test_failure_tags_name_the_lost_ranks_and_their_nodes():
    from flywheel.component.distributed import Cluster, Member, failure_tags

    cluster = Cluster(0, (Member(0, "node-a", "host-a", "r" * 32), Member(1, "node-a", "host-a", "r" * 32),
                          Member(2, "node-b", "host-b", None), Member(3, "node-b", "host-b", None)))
    assert cluster.params() == {"num_nodes": "2"}
    assert cluster.tags() == {"flywheel.node.0": "node-a host=host-a ranks=0,1",
                              "flywheel.node.1": "node-b host=host-b ranks=2,3"}
    gloo = RuntimeError("[/src/gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:41000.")
    tags = failure_tags(cluster, gloo, [2, 3])
    assert tags["flywheel.lost_ranks"] == "2,3" and tags["flywheel.lost_nodes"] == "node-b"
    assert tags["flywheel.failure"] == ("lost rank(s) 2,3 on node(s) node-b (host host-b); rank 0 saw "
                                        "RuntimeError: Connection closed by peer [10.0.0.2]:41000.")
    assert "every rank alive" in failure_tags(cluster, gloo, [])["flywheel.failure"]
    assert "could not tell" in failure_tags(cluster, gloo, None)["flywheel.failure"]
    # A rank whose own code failed (it checked in saying so) is named as the cause, not as lost.
    own = failure_tags(cluster, gloo, [], {0: "comm|x", 1: "comm|x", 2: "own|ValueError: bad batch", 3: "comm|x"})
    assert own == {"flywheel.failure": "rank 2 on node-b failed: ValueError: bad batch; rank 0 saw RuntimeError: "
                                       "Connection closed by peer [10.0.0.2]:41000."}


def test_communication_errors_are_told_from_a_ranks_own():
    import torch.distributed as dist

    from flywheel.component.distributed import Terminated, is_communication_error

    assert is_communication_error(RuntimeError("[/x/gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert is_communication_error(dist.DistBackendError("NCCL communicator was aborted"))
    assert is_communication_error(Terminated("SIGTERM"))
    assert not is_communication_error(ValueError("bad batch"))
    assert not is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_every_node_gets_its_part_of_the_rendezvous_and_the_same_entry_command(tmp_path):
    from flywheel.training.dispatch.job import RemoteTrainConfig
    from flywheel.training.dispatch.multinode import entry_command, node_env, worker_command
    from flywheel.training.dispatch.nodes import Node, load_nodes

    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump({"nodes": [
        {"name": "gpu-1", "host": "gpu1.example.com", "user": "ci", "addr": "10.0.0.1", "rdzv_port": 29500},
        {"name": "gpu-2", "host": "gpu2.example.com", "user": "ci"}]}))
    first, second = load_nodes(str(path))
    assert (first.address, first.rdzv_port, second.address, second.rdzv_port) == ("10.0.0.1", 29500,
                                                                                  "gpu2.example.com", 29400)
    assert Node(host="h", user="u").address == "h"
    env = [dict(node_env([first, second], i, "KEY")) for i in (0, 1)]
    assert env[0] == {"FLYWHEEL_NNODES": "2", "FLYWHEEL_RDZV_ENDPOINT": "10.0.0.1:29500", "FLYWHEEL_RDZV_ID": "KEY",
                      "FLYWHEEL_RDZV_IS_HOST": "1", "FLYWHEEL_LOCAL_ADDR": "10.0.0.1", "FLYWHEEL_NODE_NAME": "gpu-1"}
    assert env[1]["FLYWHEEL_RDZV_ENDPOINT"] == "10.0.0.1:29500" and env[1]["FLYWHEEL_RDZV_IS_HOST"] == "0"
    assert env[1]["FLYWHEEL_LOCAL_ADDR"] == "gpu2.example.com" and env[1]["FLYWHEEL_NODE_NAME"] == "gpu-2"
    cfg = RemoteTrainConfig(commit="a" * 40, params=(("dataset", "digits"), ("note", "it's")), nproc_per_node=2,
                            project_dir="examples/x")
    assert worker_command(cfg) == ('python -m flywheel.training.dispatch.multinode "$PWD/src/examples/x" --entry train '
                                   "-P dataset=digits -P 'note=it'\"'\"'s' -P nproc_per_node=2")
    # The worker's command is the one `mlflow run` computes from the same MLproject and parameters.
    command = entry_command(str(REPO), "train", {"dataset": "digits", "epochs": "2", "nproc_per_node": "1"})
    assert command.startswith("python -m flywheel.cli.project train --nproc-per-node 1 --dataset digits ")
    assert "--epochs 2" in command
    from flywheel.training.dispatch.multinode import failure_grace

    assert failure_grace([first, second]) == 360.0  # the default 300 s + a minute to record
    assert failure_grace([Node(host="h", user="u", env=(("FLYWHEEL_DIST_TIMEOUT", "120"),)), second]) == 180.0
    from flywheel.core.errors import FlywheelError

    with pytest.raises(FlywheelError, match="no-such-entry"):
        entry_command(str(REPO), "no-such-entry", {})


# ---------------------------------------------------------------- two loopback nodes, end to end
def _pool(tmp_path: Path, a, b) -> Path:
    """nodes.yaml for the two loopback nodes; node-a (the lower address) is the first node."""
    env = {"OMP_NUM_THREADS": "1", "FLYWHEEL_DIST_TIMEOUT": "120"}
    nodes = [a.node_entry("node-a", addr="127.0.0.1", rdzv_port=free_port(), env=env),
             b.node_entry("node-b", addr="127.0.0.2", env=env)]
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump({"nodes": nodes}))
    return path


def _known_hosts(tmp_path: Path, a, b) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(a.known_hosts.read_text() + b.known_hosts.read_text())
    return path


def _cli(tmp_path: Path, a, b, repo: Path, sha: str, *args: str) -> list[str]:
    return [str(VENV_BIN / "flywheel"), "remote-train", "--identity", str(a.key_path),
            "--known-hosts", str(_known_hosts(tmp_path, a, b)), "--repo", str(repo), "--commit", sha,
            "--nodes", str(_pool(tmp_path, a, b)), "--num-nodes", "2", *args]


def _env(tracking, model: str) -> dict[str, str]:
    return {**os.environ, **tracking.env(), "FLYWHEEL_MODEL_NAME": model, "MLFLOW_EXPERIMENT_NAME": model,
            "COLUMNS": "400"}


def _client(tracking, monkeypatch):
    from mlflow import MlflowClient

    for key, value in tracking.env().items():
        monkeypatch.setenv(key, value)  # the MLflow client reads credentials from the environment
    return MlflowClient(tracking_uri=tracking.uri)


def _runs(client, model: str, sha: str):
    experiment = client.get_experiment_by_name(model)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.git_commit = '{sha}'")


def _losses(client, run_id: str) -> dict[str, list[float]]:
    return {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in ("train_loss", "val_loss")}


def _lock_free(node, sha: str) -> bool:
    lock = node.workdir / sha / "job.lock"
    return subprocess.run(["flock", "-n", str(lock), "true"], check=False).returncode == 0


def _standalone_losses(tmp_path: Path) -> dict[str, list[float]]:
    """The same training as one node's `torchrun --standalone --nproc_per_node=2`, in its own store."""
    import mlflow

    home = tmp_path / "standalone"
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "OMP_NUM_THREADS": "1", "FLYWHEEL_MODEL_NAME": "standalone-reference", "PYTHONPATH": str(REPO / "src")}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_EXPERIMENT_NAME", "FLYWHEEL_NNODES"):
        env.pop(key, None)
    done = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "flywheel",
                           *LOCAL_TRAIN], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["world_size"] == "2"
    return _losses(client, run.info.run_id)


@pytest.mark.integration
@pytest.mark.reliability  # ~4 min on 2 shared cores (two nodes + the standalone reference): over make test's budget
def test_two_nodes_make_one_run_with_the_single_node_loss(ssh_node, ssh_node_b, tracking_stack, project_repo,
                                                          tmp_path, monkeypatch):
    model = f"multinode-test-{secrets.token_hex(4)}"
    sha = commit_on(project_repo, "remote-train --num-nodes happy path")
    done = subprocess.run(_cli(tmp_path, ssh_node, ssh_node_b, project_repo, sha, *TRAIN), env=_env(tracking_stack, model),
                          capture_output=True, text=True, timeout=900, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "rank 0 and the MLflow run on node-a" in out, out[-3000:]
    # node-b ran the same entry point, without an MLflow run of its own (its log is streamed, prefixed).
    assert "[node-b] flywheel: this node runs entry train of its multi-node job without an MLflow run" in out
    for node in (ssh_node, ssh_node_b):
        assert (node.workdir / sha / "job.exit").read_text().strip() == "0"
        assert _lock_free(node, sha)

    client = _client(tracking_stack, monkeypatch)
    runs = _runs(client, model, sha)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run for the whole job: rank 0's
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert f"MLflow run id: {run.info.run_id}" in out
    assert run.data.params["world_size"] == "2" and run.data.params["num_nodes"] == "2"
    tags = run.data.tags
    assert tags["flywheel.node.0"].startswith("node-a host=") and tags["flywheel.node.0"].endswith(" ranks=0")
    assert tags["flywheel.node.1"].startswith("node-b host=") and tags["flywheel.node.1"].endswith(" ranks=1")
    # Rank 0 alone logged the model and went through the gate: exactly one model, one version.
    experiment_id = client.get_experiment_by_name(model).experiment_id
    logged = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(logged) == 1
    assert [v.version for v in client.search_model_versions(f"name = '{model}'")] == ["1"]

    # --attach on the pool finds the job on both nodes and follows its first node (rank 0's log).
    attach = [a for a in _cli(tmp_path, ssh_node, ssh_node_b, project_repo, sha) if a not in ("--num-nodes", "2")]
    attach = [a for a in attach if a not in ("--commit", sha)]
    again = subprocess.run([*attach, "--attach", sha], env=_env(tracking_stack, model), capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"commit {sha[:12]} on node-a: MLflow run {run.info.run_id}, exit code 0" in again.stderr

    multinode = _losses(client, run.info.run_id)
    standalone = _standalone_losses(tmp_path)
    assert len(multinode["train_loss"]) == len(standalone["train_loss"]) == 2
    for key in ("train_loss", "val_loss"):
        assert multinode[key] == pytest.approx(standalone[key], rel=1e-5), (key, multinode, standalone)


def _kill_tree(pid: int) -> int:
    """SIGKILL a job's process and all its descendants (torchrun's workers live in their own sessions)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def _kill_a_node_mid_run(victim, ssh_node, ssh_node_b, tracking_stack, project_repo, tmp_path, monkeypatch,
                         model: str, sha: str):
    """Start a 2-node remote-train (rank 0 on ssh_node), kill `victim`'s job tree once the first epoch's
    metrics are on the run; (remote-train's exit code, its output, the run id, the client)."""
    train = [*TRAIN[:4], "-P", "epochs=30", *TRAIN[6:]]  # long enough to be killed in the middle
    cmd = _cli(tmp_path, ssh_node, ssh_node_b, project_repo, sha, *train)
    client = _client(tracking_stack, monkeypatch)
    log = tmp_path / "remote-train.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=_env(tracking_stack, model), stdout=fh, stderr=subprocess.STDOUT)
    try:
        # Mid-run: the first epoch's metrics are on the run (both ranks are in training).
        deadline = time.monotonic() + 600
        run_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            runs = _runs(client, model, sha)
            if runs and client.get_metric_history(runs[0].info.run_id, "val_loss"):
                run_id = runs[0].info.run_id
                break
            time.sleep(1)
        assert run_id is not None, log.read_text()[-5000:]
        assert _kill_tree(int((victim.workdir / sha / "job.pid").read_text())) > 2  # runner, torchrun, worker
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log.read_text(), run_id, client


def _assert_nothing_logged_or_registered(client, model: str, run_id: str) -> None:
    """Nothing half-done: no model logged for the run, nothing registered."""
    experiment_id = client.get_experiment_by_name(model).experiment_id
    assert not client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert client.search_model_versions(f"name = '{model}'") == []


@pytest.mark.integration
@pytest.mark.reliability  # ~3.5 min on 2 shared cores
def test_losing_a_node_mid_run_fails_the_job_cleanly(ssh_node, ssh_node_b, tracking_stack, project_repo,
                                                     tmp_path, monkeypatch):
    model = f"multinode-loss-{secrets.token_hex(4)}"
    sha = commit_on(project_repo, "remote-train --num-nodes loses a node")
    code, out, run_id, client = _kill_a_node_mid_run(ssh_node_b, ssh_node, ssh_node_b, tracking_stack, project_repo,
                                                     tmp_path, monkeypatch, model, sha)
    assert code != 0, out[-5000:]
    last = out.strip().splitlines()[-1]
    # One line: which node failed, the run, and why rank 0 says it failed.
    assert "the 2-node job failed" in last and "node-b" in last and run_id in last, out[-5000:]
    assert "FAILED, lost rank(s) 1 on node(s) node-b" in last, out[-5000:]

    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["flywheel.lost_ranks"] == "1" and run.data.tags["flywheel.lost_nodes"] == "node-b"
    assert run.data.tags["flywheel.failure"].startswith("lost rank(s) 1 on node(s) node-b")
    assert len(_runs(client, model, sha)) == 1
    _assert_nothing_logged_or_registered(client, model, run_id)
    # The surviving node's job ended by itself (bounded), with an error, and holds nothing.
    assert int((ssh_node.workdir / sha / "job.exit").read_text()) != 0
    assert _lock_free(ssh_node, sha)


@pytest.mark.integration
@pytest.mark.reliability  # ~3.5 min on 2 shared cores
def test_losing_the_first_node_mid_run_ends_its_run_failed_from_the_client(ssh_node, ssh_node_b, tracking_stack,
                                                                          project_repo, tmp_path, monkeypatch):
    """Rank 0's node is the one lost: `mlflow run` dies with it, so remote-train itself ends the run
    FAILED, saying which node and ranks were lost; nothing is logged or registered."""
    model = f"multinode-loss0-{secrets.token_hex(4)}"
    sha = commit_on(project_repo, "remote-train --num-nodes loses its first node")
    code, out, run_id, client = _kill_a_node_mid_run(ssh_node, ssh_node, ssh_node_b, tracking_stack, project_repo,
                                                     tmp_path, monkeypatch, model, sha)
    assert code != 0, out[-5000:]
    last = out.strip().splitlines()[-1]
    assert "the 2-node job failed" in last and "node-a ended without an exit status" in last, out[-5000:]
    assert f"MLflow run {run_id}: FAILED, lost rank(s) 0 on node(s) node-a (the first node" in last, out[-5000:]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["flywheel.lost_ranks"] == "0" and run.data.tags["flywheel.lost_nodes"] == "node-a"
    _assert_nothing_logged_or_registered(client, model, run_id)
    assert _lock_free(ssh_node_b, sha)
