"""remote-train: pure parts (node specs, pool ranking, params, env file) and SSH refusals.

The end-to-end training runs through a real sshd are in test_remote_train.py.
"""

from __future__ import annotations

import subprocess

import pytest

from flywheel.core.errors import FlywheelError
from flywheel.core.ssh import SSHAuth, connect
from flywheel.training.dispatch.job import RemoteTrainConfig, _env_file, mlflow_command, parse_params
from flywheel.training.dispatch.nodes import (
    Node,
    NodeProbe,
    load_nodes,
    parse_free_memory,
    pick_node,
    rank_nodes,
)
from flywheel.training.dispatch.source import check_entry, resolve_commit
from tests.conftest import free_port


# ------------------------------------------------------------------------------------ pure parts
def test_node_spec_parsing():
    assert Node.parse("train@gpu-1") == Node(host="gpu-1", user="train", port=22)
    assert Node.parse("u@10.0.0.5:2222").port == 2222
    for bad in ("gpu-1", "u@", "u@h:port", "u@h:22:1"):
        with pytest.raises(FlywheelError, match="user@host"):
            Node.parse(bad)


def test_nodes_yaml_defaults_and_errors(tmp_path):
    path = tmp_path / "nodes.yaml"
    path.write_text("defaults:\n  user: train\n  env_activate: source /opt/v/bin/activate\n"
                    "nodes:\n  - {name: a, host: a.lan}\n  - {host: b.lan, port: 2200, user: ops,\n"
                    "     env: {FLYWHEEL_DATA_DIR: /data}}\n")
    a, b = load_nodes(str(path))
    assert (a.name, a.host, a.user, a.port, a.env_activate) == ("a", "a.lan", "train", 22, "source /opt/v/bin/activate")
    assert (b.user, b.port, b.env, b.label) == ("ops", 2200, (("FLYWHEEL_DATA_DIR", "/data"),), "ops@b.lan:2200")
    # The YAML text itself works too (CI keeps it in a secret).
    assert load_nodes(path.read_text())[1] == b
    for text, match in [("nodes: []\n", "non-empty"), ("nodes:\n  - {host: x}\n", "host` and `user"),
                        ("nodes:\n  - {host: x, user: u, gpu: 1}\n", "unknown keys"), ("a: [\n", "not valid YAML")]:
        with pytest.raises(FlywheelError, match=match):
            load_nodes(text)
    with pytest.raises(FlywheelError, match=r"is not valid YAML: while parsing a block collection: expected "
                                            r"<block end>, but found '\?' at line 3, column 3$") as err:
        load_nodes("nodes:\n  - {host: x, user: u}\n  b: 2\n")
    assert "\n" not in str(err.value)  # PyYAML's own text quotes the file over several lines
    with pytest.raises(FlywheelError, match="not found"):
        load_nodes(str(tmp_path / "missing.yaml"))


def test_example_nodes_file_parses():
    from tests.conftest import REPO

    nodes = load_nodes(str(REPO / "nodes.example.yaml"))
    assert [n.name for n in nodes] == ["gpu-a100", "gpu-spare", "cpu-fallback"]
    assert all(n.env_activate for n in nodes) and nodes[1].port == 2222


def test_nvidia_smi_parsing_and_ranking():
    # The exact shape of `nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits` on 2 GPUs.
    assert parse_free_memory("81037\n40211\n") == (81037, 40211)
    assert parse_free_memory("NVIDIA-SMI has failed because it couldn't communicate with the driver\n") == ()
    cpu = NodeProbe(Node(host="cpu", user="u"))
    small = NodeProbe(Node(host="small", user="u"), free_gpu_mib=(20000,))
    big = NodeProbe(Node(host="big", user="u"), free_gpu_mib=(70000, 1000))
    two = NodeProbe(Node(host="two", user="u"), free_gpu_mib=(40000, 40000))
    down = NodeProbe(Node(host="down", user="u"), error="timed out")
    assert [p.node.host for p in rank_nodes([cpu, small, down, big, two])] == ["big", "two", "small", "cpu"]
    # With 2 processes per node the node with two roomy GPUs wins.
    assert [p.node.host for p in rank_nodes([cpu, big, two], nproc=2)] == ["two", "big", "cpu"]


def test_params_and_command_quoting():
    assert parse_params(["dataset=digits", "note=a=b c"]) == (("dataset", "digits"), ("note", "a=b c"))
    for bad in ("novalue", "=x", "bad key=1"):
        with pytest.raises(FlywheelError, match="key=value"):
            parse_params([bad])
    cfg = RemoteTrainConfig(commit="a" * 40, params=(("note", "it's; rm -rf /"),), nproc_per_node=2)
    cmd = mlflow_command(Node(host="h", user="u", mlflow="/opt/v/bin/mlflow"), cfg)
    out = subprocess.run(["bash", "-c", f"cd /tmp && printf '%s\\n' {cmd}"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["/opt/v/bin/mlflow", "run", "/tmp/src", "-e", "train", "--env-manager", "local",
                   "-P", "note=it's; rm -rf /", "-P", "nproc_per_node=2"]
    with pytest.raises(FlywheelError, match="env-manager"):
        RemoteTrainConfig(commit="a" * 40, env_manager="venv")
    with pytest.raises(FlywheelError, match="40-character"):
        RemoteTrainConfig(commit="abc123")


def test_docker_job_script_is_valid_bash_without_secret_values():
    from flywheel.training.dispatch.job import RUNNER

    node = Node(host="h", user="u", docker_build_args="--build-arg BASE_IMAGE=python:3.11-slim")
    cfg = RemoteTrainConfig(commit="c" * 40, env_manager="docker", params=(("dataset", "digits"),))
    command = mlflow_command(node, cfg, ["MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"])
    script = RUNNER.format(activate="", sha=cfg.commit, entry="train", command=command)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # syntax only
    assert "docker build --build-arg BASE_IMAGE=python:3.11-slim -t flywheel-train:cccccccccccc src" in script
    assert "-e MLFLOW_TRACKING_PASSWORD -e MLFLOW_TRACKING_URI" in script  # by name: values stay in the env
    assert "mlflow run /project -e train --env-manager local -P dataset=digits" in script


def test_env_file_round_trips_through_bash(tmp_path):
    env = {"MLFLOW_TRACKING_PASSWORD": "p'a\"s $HOME `id` \\ s", "MLFLOW_TRACKING_URI": "http://h:5000/x?a=1&b=2"}
    path = tmp_path / "job.env"
    path.write_text(_env_file(env))
    script = f". {path}; printf '%s\\0%s' \"$MLFLOW_TRACKING_PASSWORD\" \"$MLFLOW_TRACKING_URI\""
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\0") == [env["MLFLOW_TRACKING_PASSWORD"], env["MLFLOW_TRACKING_URI"]]


def _commit_files(repo, **files: str) -> str:
    """Write `files` into `repo` (a new git repo on first use), commit them, return the SHA."""
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    if not (repo / ".git").exists():
        subprocess.run([*git, "init", "-q"], check=True)
    for name, text in files.items():
        (repo / name).write_text(text)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "test"], check=True)
    return resolve_commit(repo, "HEAD")


def test_entry_and_params_checked_against_the_commits_mlproject(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sha = _commit_files(repo, README="no project yet")
    with pytest.raises(FlywheelError, match="no MLproject"):
        check_entry(repo, sha, RemoteTrainConfig(commit=sha))
    sha = _commit_files(repo, MLproject="name: p\nentry_points:\n  train:\n    parameters:\n"
                                        "      dataset: {type: string, default: digits}\n    command: python t.py\n")
    check_entry(repo, sha, RemoteTrainConfig(commit=sha, params=(("dataset", "x"),)))
    with pytest.raises(FlywheelError, match="no entry point 'eval'; it has: train"):
        check_entry(repo, sha, RemoteTrainConfig(commit=sha, entry="eval"))
    with pytest.raises(FlywheelError, match="no parameter\\(s\\) epochs"):
        check_entry(repo, sha, RemoteTrainConfig(commit=sha, params=(("epochs", "1"),)))
    with pytest.raises(FlywheelError, match="nproc_per_node"):
        check_entry(repo, sha, RemoteTrainConfig(commit=sha, nproc_per_node=2))


def test_unknown_commit_and_not_a_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(FlywheelError, match="not a git repository"):
        resolve_commit(repo, "HEAD")
    sha = _commit_files(repo, f="x")
    assert len(sha) == 40 and resolve_commit(repo, sha[:8]) == sha
    with pytest.raises(FlywheelError, match="unknown commit"):
        resolve_commit(repo, "0" * 40)


# ------------------------------------------------------------------------------------ issue 13: projects
def test_project_names_urls_dirs_and_job_keys():
    from flywheel.training.dispatch.job import job_key, split_key
    from flywheel.training.dispatch.source import Project, normalize_project_dir, redact_url

    for url in ("https://github.com/team/model.git", "file:///tmp/x.git", "ssh://git@h:2222/t/m",
                "git@github.com:team/model.git"):
        assert Project(url).is_url, url
    for path in (".", "../model", "/srv/model", "model", "./a:b"):
        assert not Project(path).is_url, path
    assert redact_url("https://ci:s3cret@github.com/team/m.git") == "https://github.com/team/m.git"
    assert Project("https://x-access-token:tok@h.example:8443/t/m").label == "https://h.example:8443/t/m"
    assert Project("git@github.com:team/model.git").label == "git@github.com:team/model.git"
    assert [normalize_project_dir(d) for d in ("", ".", "./examples/fm/", "a/./b")] == [".", ".", "examples/fm", "a/b"]
    for bad in ("../x", "/abs", "a/../../x", "a b", "$(id)", "a;b", "~x"):
        with pytest.raises(FlywheelError, match="relative path inside the repository"):
            Project(".", bad)
    sha = "a" * 40
    assert job_key(sha) == sha and job_key(sha, ".") == sha
    keys = {job_key(sha, d) for d in ("a/b", "a-b", "a_b", "a~b".replace("~", "/"))}
    assert len(keys) == 3  # a/b given twice: one key; distinct dirs never share a job directory
    for d in (".", "examples/fashion-mnist", "a-b"):
        assert split_key(job_key(sha, d)) == (sha, d)


def test_command_runs_the_project_dir_and_env_names_the_project(tmp_path):
    from flywheel.core.config import Settings
    from flywheel.training.dispatch.job import RUNNER, remote_env

    cfg = RemoteTrainConfig(commit="a" * 40, project="file:///srv/m.git", project_dir="examples/fm")
    cmd = mlflow_command(Node(host="h", user="u", mlflow="mlflow"), cfg)
    out = subprocess.run(["bash", "-c", f"cd /tmp && printf '%s\\n' {cmd}"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[:3] == ["mlflow", "run", "/tmp/src/examples/fm"]
    docker = mlflow_command(Node(host="h", user="u"), RemoteTrainConfig(
        commit="c" * 40, env_manager="docker", project_dir="examples/fm"), ["MLFLOW_TRACKING_URI"])
    subprocess.run(["bash", "-n"], input=RUNNER.format(activate="", sha="c" * 40, entry="train",
                                                       command=docker), text=True, check=True)
    # The repository root is the build context; the component's own Dockerfile builds the image.
    assert " -f src/examples/fm/Dockerfile -t flywheel-train:cccccccccccc-" in docker
    assert "mlflow run /project/examples/fm -e train" in docker
    settings = Settings.from_env(tracking_uri="http://127.0.0.1:5000")
    env = remote_env(settings, Node(host="h", user="u"), "b" * 40, None, cfg.project, cfg.project_dir)
    assert (env["FLYWHEEL_PROJECT"], env["FLYWHEEL_PROJECT_DIR"], env["FLYWHEEL_GIT_COMMIT"]) == (
        "file:///srv/m.git", "examples/fm", "b" * 40)


def test_git_url_project_fetches_exactly_the_named_commit(tmp_path):
    """A git URL is fetched on the control side: by full SHA, branch or tag; the archive is that commit's tree."""
    import io
    import tarfile

    from flywheel.training.dispatch.source import Project, archive_commit

    work = tmp_path / "work"
    work.mkdir()
    mlproject = ("name: p\nentry_points:\n  train:\n    parameters:\n      epochs: {type: float, default: 1}\n"
                 "    command: python train.py\n")
    (work / "comp").mkdir()
    (work / "comp" / "MLproject").write_text(mlproject)
    first = _commit_files(work, **{"README": "v1"})
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "tag", "v1"], check=True)
    second = _commit_files(work, README="v2")
    bare = tmp_path / "model.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    url = f"file://{bare}"
    project = Project(url, "comp")
    for commit, want in ((first, first), ("v1", first), ("master" if _branch(work) == "master" else "main", second),
                         (second, second)):
        with project.checkout(commit) as (repo, sha):
            assert sha == want, commit
            check_entry(repo, sha, RemoteTrainConfig(commit=sha, params=(("epochs", "1"),)), project.project_dir)
            with pytest.raises(FlywheelError, match="comp/MLproject at .* no parameter\\(s\\) lr"):
                check_entry(repo, sha, RemoteTrainConfig(commit=sha, params=(("lr", "1"),)), project.project_dir)
            files = tarfile.open(fileobj=io.BytesIO(archive_commit(repo, sha)), mode="r:gz")
            assert files.extractfile("README").read().decode() == ("v1" if want == first else "v2")
        assert not repo.exists(), "the fetched repository must not outlive the call"
    with pytest.raises(FlywheelError, match="no MLproject at elsewhere"):
        with Project(url, "elsewhere").checkout("v1") as (repo, sha):
            check_entry(repo, sha, RemoteTrainConfig(commit=sha), "elsewhere")
    with pytest.raises(FlywheelError, match="unknown commit 'nope' in file://"):
        with project.checkout("nope"):
            pass
    # A URL that does not answer: the error names it without the credentials it carried.
    with pytest.raises(FlywheelError) as err:
        with Project(f"file://user:s3cret@localhost{tmp_path}/missing.git").checkout("main"):
            pass
    assert "cannot fetch" in str(err.value) and "s3cret" not in str(err.value)


def _branch(repo) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()


# ------------------------------------------------------------------------------------ SSH refusals
def _auth(ssh_node, known_hosts=None, key=None) -> SSHAuth:
    return SSHAuth.load(str(key or ssh_node.key_path), str(known_hosts or ssh_node.known_hosts), connect_timeout=5)


def _node(ssh_node) -> Node:
    return Node(host=ssh_node.host, user=ssh_node.user, port=ssh_node.port, workdir=str(ssh_node.workdir))


@pytest.mark.integration
def test_connects_with_verified_host_key(ssh_node):
    client = connect(_node(ssh_node), _auth(ssh_node))
    try:
        _, out, _ = client.exec_command("whoami")
        assert out.read().decode().strip() == ssh_node.user
    finally:
        client.close()


@pytest.mark.integration
def test_host_key_mismatch_is_refused(ssh_node, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True)
    key_type, b64 = (tmp_path / "impostor.pub").read_text().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{ssh_node.port} {key_type} {b64}\n")
    with pytest.raises(FlywheelError, match="host key mismatch"):
        connect(_node(ssh_node), _auth(ssh_node, known_hosts=wrong))
    # A host missing from known_hosts is refused too (never auto-added).
    absent = tmp_path / "known_hosts_other"
    absent.write_text(f"[127.0.0.1]:{free_port()} {key_type} {b64}\n")
    with pytest.raises(FlywheelError, match="not in known_hosts"):
        connect(_node(ssh_node), _auth(ssh_node, known_hosts=absent))


@pytest.mark.integration
def test_unauthorized_key_is_refused(ssh_node, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    with pytest.raises(FlywheelError, match="SSH key refused"):
        connect(_node(ssh_node), _auth(ssh_node, key=tmp_path / "stranger"))


@pytest.mark.integration
def test_pool_skips_unreachable_node(ssh_node):
    dead = Node(host="127.0.0.1", user=ssh_node.user, port=free_port(), name="dead")
    live = _node(ssh_node)
    warnings: list[str] = []
    chosen = pick_node([dead, live], _auth(ssh_node), "b" * 40, warn=warnings.append)
    assert chosen == live
    assert any("skipping dead" in w for w in warnings), warnings
    with pytest.raises(FlywheelError, match="none of the 1 training nodes is reachable"):
        pick_node([dead], _auth(ssh_node), "b" * 40, warn=warnings.append)


@pytest.mark.integration
def test_cli_refuses_bad_input_before_shipping(ssh_node, monkeypatch):
    from typer.testing import CliRunner

    from flywheel.cli import app
    from tests.conftest import REPO

    ssh_args = ["--repo", str(REPO), "-i", str(ssh_node.key_path), "--known-hosts", str(ssh_node.known_hosts)]
    # No tracking server configured: refused before anything is shipped.
    result = CliRunner().invoke(app, ["remote-train", "--node", ssh_node.spec, *ssh_args])
    assert result.exit_code == 2 and "tracking server the node can reach" in result.output, result.output
    port = free_port()  # nothing listens there
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI in-process; make sure it is undone after.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, ["remote-train", "--node", f"{ssh_node.user}@127.0.0.1:{port}", *ssh_args,
                                      "--connect-timeout", "3", "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert f"cannot reach {ssh_node.user}@127.0.0.1:{port}" in result.output
    # An unknown commit is refused before anything reaches the node.
    result = CliRunner().invoke(app, ["remote-train", "--node", ssh_node.spec, *ssh_args, "--commit", "f" * 40,
                                      "--workdir", str(ssh_node.workdir), "--tracking-uri", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "unknown commit" in result.output, result.output
    assert not (ssh_node.workdir / ("f" * 40)).exists()
