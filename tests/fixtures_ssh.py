"""A real OpenSSH server on 127.0.0.1 for the remote-train tests (and the monitor's SSH trigger).

As root the server runs privilege-separated like on a training node and logs in a dedicated
non-root user made with `useradd`; as any other user (a CI runner without root) sshd runs as that
user and only that user can log in. Each test session gets its own host key, client key, authorized
keys file, known_hosts file and jobs directory, so parallel sessions on one machine don't collide.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flywheel.core.procs import stop_process_group

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
NODE_USER = "flywheel-node"  # the dedicated login user when the tests run as root
VENV_ACTIVATE = f"source {Path(sys.executable).parent / 'activate'}"


@dataclass(frozen=True)
class SSHNode:
    """One running sshd and everything a client needs to reach it."""

    host: str
    port: int
    user: str
    home: Path
    key_path: Path  # client private key (OpenSSH format, no passphrase)
    known_hosts: Path  # `[127.0.0.1]:PORT ssh-ed25519 ...`
    host_key_pub: Path
    workdir: Path  # this session's jobs root on the "node", inside the user's home
    pid: int  # the listening sshd (foreground, own process group)
    log: Path

    @property
    def spec(self) -> str:
        """`user@host:port`, the form `flywheel remote-train --node` takes."""
        return f"{self.user}@{self.host}:{self.port}"

    def node_entry(self, name: str = "local-node", **extra: object) -> dict:
        """A `nodes.yaml` entry for this server, using the test venv on the node side."""
        entry = {"name": name, "host": self.host, "port": self.port, "user": self.user,
                 "env_activate": VENV_ACTIVATE, "workdir": str(self.workdir)}
        entry.update(extra)
        return entry

    def session_pids(self) -> list[int]:
        """PIDs of the per-connection sshd processes: killing them drops every open SSH session."""
        import psutil

        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for p in children:
            try:
                if p.name().startswith("sshd"):
                    pids.append(p.pid)
            except psutil.NoSuchProcess:  # a session that ended while we looked
                pass
        return pids

    def drop_sessions(self) -> int:
        """Kill every open SSH session (what a network drop looks like to both ends). Returns how many."""
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def _keygen(path: Path, comment: str) -> None:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path))


def _login_user(as_self: bool = False) -> tuple[str, Path, int, int]:
    """(name, home, uid, gid) of the user the client logs in as.

    As root: a dedicated `useradd` user, like a real node's service account, unless that user can't
    run this test interpreter (e.g. a pyenv under /root, mode 0700): then root itself, rather than
    loosening permissions on the machine. As anyone else, or with `as_self`: the user running the tests.
    """
    if as_self or os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return pw.pw_name, Path(pw.pw_dir), pw.pw_uid, pw.pw_gid
    try:
        pw = pwd.getpwnam(NODE_USER)
    except KeyError:
        # Another test session may create it at the same moment: tolerate "already exists".
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", NODE_USER],
                       check=False, capture_output=True, text=True)
        pw = pwd.getpwnam(NODE_USER)
    usable = subprocess.run(["runuser", "-u", NODE_USER, "--", sys.executable, "-c", "import mlflow"],
                            check=False, capture_output=True).returncode == 0
    if not usable:
        root = pwd.getpwuid(0)
        return root.pw_name, Path(root.pw_dir), 0, 0
    # Under `UsePAM no` a useradd'ed account is "locked" (password `!`) and sshd refuses even keys.
    _run("usermod", "-p", "*", NODE_USER)
    return pw.pw_name, Path(pw.pw_dir), pw.pw_uid, pw.pw_gid


def _wait_for_banner(port: int, proc: subprocess.Popen, log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    text = log.read_text(errors="replace") if log.exists() else ""
    pytest.fail(f"sshd did not start on 127.0.0.1:{port} (exit {proc.poll()}):\n{text[-3000:]}")


@pytest.fixture(scope="session")
def ssh_node(tmp_path_factory) -> SSHNode:
    """A real sshd on 127.0.0.1:<random port> that accepts one client key, for the whole session."""
    with start_sshd(tmp_path_factory.mktemp("sshd")) as node:
        yield node


@pytest.fixture(scope="session")
def ssh_node_b(tmp_path_factory, request) -> SSHNode:
    """A second sshd "node" (its own port, host key and jobs directory) that accepts `ssh_node`'s client
    key: with `ssh_node`, a two-node pool on loopback for remote-train --num-nodes."""
    ssh_node = request.getfixturevalue("ssh_node")
    with start_sshd(tmp_path_factory.mktemp("sshd-b"), client_key=ssh_node.key_path) as node:
        yield node


@contextmanager
def start_sshd(base: Path, client_key: Path | None = None, login_as_self: bool = False) -> Iterator[SSHNode]:
    """Run one sshd (its files under `base`) until the block ends; then stop it and its jobs.
    `client_key`: the client key it accepts (default: a new one). `login_as_self`: the client logs in as
    the user running the tests (a serving host's user, who owns the TorchServes the tests start)."""
    from tests.conftest import free_port

    if not os.path.exists(SSHD):
        pytest.fail("sshd not found: install openssh-server (make system-deps)")
    token = secrets.token_hex(4)
    user, home, uid, gid = _login_user(login_as_self)

    host_key = base / "ssh_host_ed25519_key"
    _keygen(host_key, "flywheel-test-host")
    if client_key is None:
        client_key = base / "id_ed25519"
        _keygen(client_key, "flywheel-test-client")

    # Keys live in the user's own ~/.ssh (sshd's StrictModes wants root/user-owned, non-writable
    # parents); a per-session file name keeps concurrent sessions from overwriting each other.
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    auth_keys = ssh_dir / f"authorized_keys.{token}"
    auth_keys.write_text((client_key.with_suffix(".pub")).read_text())
    workdir = home / f"flywheel-jobs-{token}"
    workdir.mkdir(mode=0o700)
    for path in (ssh_dir, auth_keys, workdir):
        os.chown(path, uid, gid)
    auth_keys.chmod(0o600)

    port = free_port()
    log = base / "sshd.log"
    config = base / "sshd_config"
    lines = [
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {base / 'sshd.pid'}",
        "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes", f"AuthorizedKeysFile .ssh/authorized_keys.{token}",
        f"AllowUsers {user}", f"PermitRootLogin {'prohibit-password' if uid == 0 else 'no'}", "X11Forwarding no", "AllowTcpForwarding no",
        "Subsystem sftp internal-sftp", "LogLevel VERBOSE",
    ]
    config.write_text("\n".join(lines) + "\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation chroot
    # -D: stay in the foreground so we own the PID; -e + -E: log to our file.
    proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for_banner(port, proc, log)
        known_hosts = base / "known_hosts"
        key_type, key_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
        known_hosts.write_text(f"[127.0.0.1]:{port} {key_type} {key_b64}\n")
        yield SSHNode(host="127.0.0.1", port=port, user=user, home=home, key_path=client_key,
                      known_hosts=known_hosts, host_key_pub=host_key.with_suffix(".pub"), workdir=workdir,
                      pid=proc.pid, log=log)
    finally:
        _stop_jobs(workdir)
        sessions = _session_children(proc.pid)
        stop_process_group(proc, timeout=5)
        # Sessions run as the node user outside sshd's process group; kill what's left by PID.
        for pid in sessions:
            _kill(pid)
        shutil.rmtree(workdir, ignore_errors=True)
        auth_keys.unlink(missing_ok=True)


def _session_children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_jobs(workdir: Path) -> None:
    """Training jobs a test left running on the node: kill their process groups (pid = pgid) and every
    descendant (torchrun starts each worker in a session of its own, outside the job's group)."""
    for pid_file in workdir.glob("*/job.pid"):
        try:
            pgid = int(pid_file.read_text().strip())
        except ValueError:
            continue
        descendants = _session_children(pgid)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in descendants:
            _kill(pid)




def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), "-c", "user.name=flywheel-test",
                           "-c", "user.email=test@flywheel.invalid", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="session")
def project_repo(tmp_path_factory) -> Path:
    """A git repo whose HEAD is this working tree (tracked + new, unignored files).

    In CI's fresh clone that is exactly HEAD; on a dev box it includes uncommitted work, which is
    what the tests should exercise. The node gets it through `git archive`, like a real commit.
    """
    from tests.conftest import REPO

    repo = tmp_path_factory.mktemp("project") / "repo"
    repo.mkdir()
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO / rel
        if src.is_file():  # skip files deleted in the work tree
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "flywheel working tree under test")
    return repo


def commit_on(repo: Path, message: str) -> str:
    """A fresh commit (so each test's runs can be told apart by their git_commit tag)."""
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")
