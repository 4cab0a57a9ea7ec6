"""A pool replica's files: TorchServe's `key_file.json` and its model store, on this host or another.

A release copies the version's .mar into the replica's model store and reads its keys; the pool's
key renewal reads the key file before and after TorchServe's token API renews a key. Everything else
of a replica (inference, management, HAProxy) goes through URLs. So a replica on another host needs
exactly this: its `ssh` entry in pool.json (`ReplicaSSH`: user, host, port, identity, known_hosts,
as a training node's nodes.yaml entry has them) makes `key_file` and `model_store` paths on that host,
reached over SFTP (`SFTPFiles`, paramiko through core/ssh.py: host key verified, never prompts).
Without it they are paths here (`LocalFiles`), as before.

Both implement `ReplicaFiles`: read the key file (the half-written-file retry of serving/keys.py
included), put an archive into the store, check or remove one, stamp one. An archive lands
atomically: written as `.NAME.<random>.part` in the store, then renamed to NAME (POSIX rename within
a directory; over SFTP OpenSSH's posix-rename), so TorchServe never registers a half-written .mar and
a replica that shares the store keeps reading the old file it opened.

SFTP connections are short-lived: one per operation (a key read with its retries, an upload), closed
when it ends. Reads happen at a client's start, on a rejected key and around a renewal, so a
connection kept open would idle most of its life and break on the network's terms instead of ours.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from flywheel.core.errors import FlywheelError

if TYPE_CHECKING:
    import paramiko

    from flywheel.contracts.manifest import ArchiveStamp, Manifest
    from flywheel.core.ssh import SSHAuth
    from flywheel.serving.keys import KeyFile

_SSH_KEYS = {"host", "user", "port", "identity", "known_hosts"}


@dataclass(frozen=True)
class ReplicaSSH:
    """Where a replica's files live when not on this host: pool.json's `ssh` entry of the replica."""

    host: str
    user: str
    port: int = 22
    identity: str | None = None  # client private key (path here); None: $FLYWHEEL_SSH_KEY (path or text)
    known_hosts: str | None = None  # path here; None: $FLYWHEEL_SSH_KNOWN_HOSTS (path or text)

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def as_dict(self) -> dict:
        return {k: v for k, v in (("host", self.host), ("user", self.user), ("port", self.port),
                                  ("identity", self.identity), ("known_hosts", self.known_hosts)) if v is not None}

    @classmethod
    def from_dict(cls, data: object, replica: str) -> ReplicaSSH:
        """The entry, checked; ValueError naming the replica and what to fix."""
        if not isinstance(data, Mapping):
            raise ValueError(f"replica {replica}: `ssh` must be a mapping with host, user and optionally port, "
                             "identity, known_hosts")
        unknown = set(data) - _SSH_KEYS
        if unknown:
            raise ValueError(f"replica {replica}: unknown `ssh` keys {sorted(unknown)}; allowed: {sorted(_SSH_KEYS)}")
        if not all(isinstance(data.get(k), str) and data[k].strip() for k in ("host", "user")):
            raise ValueError(f"replica {replica}: `ssh` needs a `host` and a `user` (strings)")
        port = data.get("port", 22)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"replica {replica}: `ssh` port must be an integer 1..65535, not {port!r}")
        for k in ("identity", "known_hosts"):
            if data.get(k) is not None and not isinstance(data[k], str):
                raise ValueError(f"replica {replica}: `ssh` {k} must be a path (string)")
        return cls(data["host"], data["user"], port, data.get("identity"), data.get("known_hosts"))


class ReplicaFiles(Protocol):
    """What a release and the key renewal do with a replica's files (see the module doc)."""

    key_file: PurePosixPath | Path
    model_store: PurePosixPath | Path
    where: str  # "" here; " on user@host:port (replica NAME)" elsewhere, for messages

    def read_key_file(self) -> KeyFile: ...

    def keys(self) -> dict[str, str]: ...

    def put_archive(self, source: Path, name: str) -> None: ...

    def exists(self, name: str) -> bool: ...

    def remove(self, name: str) -> None: ...

    def stamp(self, name: str, manifest: Manifest) -> ArchiveStamp: ...

    def local_path(self, name: str) -> Path | None: ...


def replica_files(name: str, key_file: Path, model_store: Path, ssh: ReplicaSSH | None) -> ReplicaFiles:
    """The replica's files: on this host without `ssh`, on `ssh.host` over SFTP with it."""
    if ssh is None:
        return LocalFiles(Path(key_file), Path(model_store))
    return SFTPFiles(name, PurePosixPath(key_file), PurePosixPath(model_store), ssh)


def _part_name(name: str) -> str:
    """A temporary name in the store that TorchServe never takes for an archive (no .mar suffix)."""
    return f".{name}.{secrets.token_hex(4)}.part"


@dataclass(frozen=True)
class LocalFiles:
    """The replica's files on this host (pathlib)."""

    key_file: Path
    model_store: Path
    where: str = ""

    def read_key_file(self) -> KeyFile:
        from flywheel.serving.keys import read_key_file

        return read_key_file(self.key_file)

    def keys(self) -> dict[str, str]:
        return self.read_key_file().as_dict()

    def put_archive(self, source: Path, name: str) -> None:
        dest = self.model_store / name
        self.model_store.mkdir(parents=True, exist_ok=True)
        if Path(source).resolve() == dest.resolve():
            return  # already the store's file (released from the store itself)
        part = self.model_store / _part_name(name)
        try:
            shutil.copyfile(source, part)
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        return (self.model_store / name).is_file()

    def remove(self, name: str) -> None:
        (self.model_store / name).unlink(missing_ok=True)

    def stamp(self, name: str, manifest: Manifest) -> ArchiveStamp:
        from flywheel.contracts.manifest import ArchiveStamp

        return ArchiveStamp.of(self.model_store / name, manifest)

    def local_path(self, name: str) -> Path | None:
        return self.model_store / name


class SFTPFiles:
    """The replica's files on another host, over SFTP; one connection per operation (module doc).
    Relative paths are relative to the login's home directory, as sftp resolves them."""

    def __init__(self, replica: str, key_file: PurePosixPath, model_store: PurePosixPath, ssh: ReplicaSSH):
        self.replica, self.key_file, self.model_store, self.ssh = replica, key_file, model_store, ssh
        # core.ssh.connect's login: these three and `label`, which names the replica in its errors.
        self.host, self.port, self.user = ssh.host, ssh.port, ssh.user
        self.label = f"{ssh.label} (replica {replica})"
        self.where = f" on {self.label}"
        self._auth: SSHAuth | None = None

    def _load_auth(self) -> SSHAuth:
        from flywheel.core.ssh import SSHAuth

        if self._auth is None:
            identity = self.ssh.identity or os.environ.get("FLYWHEEL_SSH_KEY")
            known_hosts = self.ssh.known_hosts or os.environ.get("FLYWHEEL_SSH_KNOWN_HOSTS")
            if not identity or not known_hosts:
                raise FlywheelError(f"replica {self.replica} is on {self.ssh.label}: give its `ssh` entry in pool.json "
                                    "`identity` and `known_hosts` paths, or set FLYWHEEL_SSH_KEY and "
                                    "FLYWHEEL_SSH_KNOWN_HOSTS")
            self._auth = SSHAuth.load(identity, known_hosts, os.environ.get("FLYWHEEL_SSH_KEY_PASSPHRASE") or None)
        return self._auth

    @contextmanager
    def _sftp(self, doing: str) -> Iterator[paramiko.SFTPClient]:
        """One SFTP session for one operation; its failures become one FlywheelError naming the replica
        and host (a FlywheelError raised inside, e.g. serving/keys.py's, passes unchanged)."""
        import paramiko

        from flywheel.core.ssh import connect

        client = connect(self, self._load_auth())
        try:
            yield client.open_sftp()
        except FlywheelError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise FlywheelError(f"{doing}{self.where} failed ({type(exc).__name__}: {exc})") from exc
        finally:
            client.close()  # closes the SFTP channel with it

    def read_key_file(self) -> KeyFile:
        from flywheel.serving.keys import read_key_file

        with self._sftp(f"reading {self.key_file}") as sftp:
            def read() -> tuple[bytes, float]:
                mtime = sftp.stat(str(self.key_file)).st_mtime
                with sftp.open(str(self.key_file), "rb") as fh:
                    return fh.read(), float(mtime or 0)

            return read_key_file(Path(self.key_file), read=read, where=self.where)

    def keys(self) -> dict[str, str]:
        return self.read_key_file().as_dict()

    def put_archive(self, source: Path, name: str) -> None:
        dest, part = str(self.model_store / name), str(self.model_store / _part_name(name))
        with self._sftp(f"copying {Path(source).name} into {self.model_store}") as sftp:
            _makedirs(sftp, self.model_store)
            try:
                sftp.put(str(source), part, confirm=True)  # confirm: the remote size is the local one
                sftp.posix_rename(part, dest)  # replaces an existing NAME atomically
            except BaseException:
                try:
                    sftp.remove(part)
                except OSError:  # never written, or the connection is gone: the original error matters
                    pass
                raise

    def exists(self, name: str) -> bool:
        with self._sftp(f"looking for {name} in {self.model_store}") as sftp:
            try:
                return stat.S_ISREG(sftp.stat(str(self.model_store / name)).st_mode or 0)
            except FileNotFoundError:
                return False

    def remove(self, name: str) -> None:
        with self._sftp(f"removing {name} from {self.model_store}") as sftp:
            try:
                sftp.remove(str(self.model_store / name))
            except FileNotFoundError:
                pass

    def stamp(self, name: str, manifest: Manifest) -> ArchiveStamp:
        """The stamp of the bytes the replica loads, read back from its store."""
        from flywheel.contracts.manifest import ArchiveStamp

        with self._sftp(f"reading {name} in {self.model_store}") as sftp:
            with sftp.open(str(self.model_store / name), "rb") as fh:
                fh.prefetch()
                return ArchiveStamp.from_bytes(fh.read(), manifest)

    def local_path(self, name: str) -> Path | None:
        return None  # not on this host


def _makedirs(sftp: paramiko.SFTPClient, path: PurePosixPath) -> None:
    """`mkdir -p` over SFTP."""
    for i in range(1, len(path.parts) + 1):
        part = str(PurePosixPath(*path.parts[:i]))
        try:
            sftp.stat(part)
        except FileNotFoundError:
            sftp.mkdir(part)


def key_options(key_file: Path, files: ReplicaFiles | None) -> dict:
    """TorchServeClient's key arguments: the key file on this host, or a source reading it where it is
    (re-read, like the file, whenever TorchServe rejects a key)."""
    if files is None:
        return {"key_file": key_file}
    return {"key_source": files.keys, "key_source_name": f"key file {files.key_file}{files.where}"}
