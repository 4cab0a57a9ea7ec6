"""SSH to another host: the client key and trusted host keys (`SSHAuth`), an authenticated
connection, and the exec/SFTP helpers. Training uses it to reach its nodes (training/dispatch), the
serving pool to reach a replica's key file and model store on another host (serving/replica_files.py):
both nodes need it, so it lives in core.

Never prompts, never uses an agent, never adds a host key: an unknown or changed host key is a
FlywheelError saying how to verify it. Errors are sorted here into what is worth reconnecting for
(`NodeUnreachable`, the network) and what is not (bad keys, refused auth, missing files).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    import paramiko


class SSHHost(Protocol):
    """Where to log in: a training node (training/dispatch/nodes.py) or a pool replica's host."""

    host: str
    port: int
    user: str

    @property
    def label(self) -> str: ...


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


TRANSIENT = (OSError, EOFError)  # a dropped connection, as the socket reports it


def is_transient(exc: BaseException) -> bool:
    """Worth reconnecting for: the network or sshd went away. Not: bad keys, missing files, our errors."""
    import paramiko

    if isinstance(exc, NodeUnreachable):
        return True
    if isinstance(exc, (FlywheelError, paramiko.BadHostKeyException, paramiko.AuthenticationException,
                        FileNotFoundError, PermissionError)):
        return False
    return isinstance(exc, (*TRANSIENT, paramiko.SSHException))


def connect(node: SSHHost, auth: SSHAuth) -> paramiko.SSHClient:
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


def exec_command(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run `command` on the node: (exit status, stdout, stderr), decoded leniently."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace")
    err = stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out, err


def put_file(sftp: paramiko.SFTPClient, path: str, data: str | bytes, mode: int) -> None:
    """Write `data` to `path` over SFTP with permissions `mode`."""
    # chmod before writing: the secret content never sits in a file with looser permissions.
    with sftp.open(path, "wb") as fh:
        fh.chmod(mode)
        fh.write(data.encode() if isinstance(data, str) else data)


def remote_exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    """Whether `path` exists on the node."""
    try:
        sftp.stat(path)
        return True
    except FileNotFoundError:
        return False
