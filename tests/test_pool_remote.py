"""Pool replicas on another host (issue 14): key file and model store reached only over SFTP.

The "other host" is a real OpenSSH server on loopback (tests/fixtures_ssh.py) that logs in as the
user running the tests, the owner of the TorchServes they start, as a serving host's own user would.
A replica's `key_file` and `model_store` in the pool description are then paths *relative to that
login's home* (sftp resolves them there), reached through symlinks in it: from this process's working
directory they name nothing, so a release or renewal that read them locally would fail, and the
sshd's log shows the SFTP sessions. What this does not show: a second physical host.

Fast: pool.json round trip with and without `ssh`, bad entries as one-line errors, and the SFTP
files (key read, atomic archive upload, exists, remove, errors naming replica and host) against the
real sshd. Reliability: a 2-replica pool whose files are only reachable over SFTP gets a rolling
release and its keys renewed (one inference key per replica, then a renewer pass) under client load,
with no failed request.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from flywheel.core.errors import FlywheelError
from flywheel.serving.pool import PoolSpec, Replica
from flywheel.serving.replica_files import ReplicaSSH, SFTPFiles
from tests.fixtures_serving import MODEL
from tests.fixtures_ssh import start_sshd

KEY_FILE = {"management": {"key": "mkey1", "expiration time": "2026-12-01T14:11:35.091394132Z"},
            "inference": {"key": "ikey1", "expiration time": "2026-12-01T14:11:35Z"}, "API": {"key": "api1"}}


def _spec(tmp_path, replicas) -> PoolSpec:
    return PoolSpec("http://127.0.0.1:1", tmp_path / "hp.sock", tmp_path / "keys.map", tmp_path / "canary.map",
                    tmp_path / "haproxy.log", tuple(replicas), None, tmp_path / "pool-token")


def test_pool_spec_round_trip_with_and_without_ssh(tmp_path):
    here = Replica("r1", "http://127.0.0.1:8080", "http://127.0.0.1:8081", tmp_path / "r1" / "key_file.json",
                   tmp_path / "store")
    there = Replica("r2", "http://10.0.0.7:8080", "http://10.0.0.7:8081", Path("/srv/ts/key_file.json"),
                    Path("/srv/ts/model-store"), ReplicaSSH("10.0.0.7", "serving", 2222, "/keys/id_ed25519",
                                                            "/keys/known_hosts"))
    spec = _spec(tmp_path, [here, there])
    path = spec.write(tmp_path / "pool.json")
    assert PoolSpec.read(path) == spec
    data = json.loads(path.read_text())
    assert "ssh" not in data["replicas"][0]  # a replica on this host is written as before
    assert data["replicas"][1]["ssh"] == {"host": "10.0.0.7", "user": "serving", "port": 2222,
                                          "identity": "/keys/id_ed25519", "known_hosts": "/keys/known_hosts"}
    # Port and key paths are optional (22, then FLYWHEEL_SSH_KEY / FLYWHEEL_SSH_KNOWN_HOSTS).
    data["replicas"][1]["ssh"] = {"host": "h", "user": "u"}
    path.write_text(json.dumps(data))
    assert PoolSpec.read(path).replica("r2").ssh == ReplicaSSH("h", "u")
    assert PoolSpec.read(path).replica("r1").ssh is None
    for bad, words in [({"host": "h"}, "needs a `host` and a `user`"), ("u@h", "must be a mapping"),
                       ({"host": "h", "user": "u", "port": "22"}, "port must be an integer"),
                       ({"host": "h", "user": "u", "port": 70000}, "port must be an integer"),
                       ({"host": "h", "user": "u", "identity_file": "k"}, "unknown `ssh` keys"),
                       ({"host": "h", "user": "u", "known_hosts": 3}, "known_hosts must be a path")]:
        data["replicas"][1]["ssh"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(FlywheelError) as info:
            PoolSpec.read(path)
        message = str(info.value)
        assert words in message and "replica r2" in message and "\n" not in message, message


@pytest.fixture(scope="module")
def serving_host(tmp_path_factory):
    """An sshd on loopback that logs in as this user (the TorchServes' owner): the replicas' host."""
    with start_sshd(tmp_path_factory.mktemp("serving-host"), login_as_self=True) as node:
        yield node


def _ssh(node) -> ReplicaSSH:
    return ReplicaSSH(node.host, node.user, node.port, str(node.key_path), str(node.known_hosts))


def _remote(node, target: Path, name: str) -> Path:
    """A path relative to the login's home (where sftp resolves it) that reaches `target` through a
    symlink there; relative to this process's working directory it names nothing."""
    link = node.workdir / name
    link.symlink_to(target)
    rel = link.relative_to(node.home)
    assert not rel.exists(), f"{rel} exists relative to {Path.cwd()}: the test would not prove SFTP is used"
    return rel


def _sftp_sessions(node) -> int:
    return node.log.read_text(errors="replace").count("subsystem 'sftp'")


def test_sftp_files_on_a_real_sshd(serving_host, tmp_path):
    store, ts_dir = tmp_path / "store", tmp_path / "ts"
    store.mkdir()
    ts_dir.mkdir()
    (ts_dir / "key_file.json").write_text(json.dumps(KEY_FILE))
    files = SFTPFiles("r7", _remote(serving_host, ts_dir, "ts-a") / "key_file.json",
                      _remote(serving_host, store, "store-a") / "sub", _ssh(serving_host))
    sessions = _sftp_sessions(serving_host)
    assert files.keys() == {"inference": "ikey1", "management": "mkey1"}
    assert files.read_key_file().api == "api1"
    archive = tmp_path / "a.mar"
    archive.write_bytes(b"first" * 1000)
    assert not files.exists("m-1.mar")
    files.put_archive(archive, "m-1.mar")  # the store's missing sub-folder is made
    assert (store / "sub" / "m-1.mar").read_bytes() == archive.read_bytes() and files.exists("m-1.mar")
    archive.write_bytes(b"second")
    files.put_archive(archive, "m-1.mar")  # replaced in one rename
    assert (store / "sub" / "m-1.mar").read_bytes() == b"second"
    assert sorted(p.name for p in (store / "sub").iterdir()) == ["m-1.mar"]  # no .part left behind
    files.remove("m-1.mar")
    files.remove("m-1.mar")  # already gone: nothing to do
    assert not files.exists("m-1.mar") and files.local_path("m-1.mar") is None
    assert _sftp_sessions(serving_host) >= sessions + 8  # one short session per operation
    # Errors name the replica and its host, on one line.
    (ts_dir / "key_file.json").unlink()
    with pytest.raises(FlywheelError, match=r"key_file.json on .*@127\.0\.0\.1:\d+ \(replica r7\) not found"):
        files.read_key_file()
    with pytest.raises(FlywheelError, match=r"copying missing.mar .*replica r7.*FileNotFoundError"):
        files.put_archive(tmp_path / "missing.mar", "m-2.mar")
    wrong_host_key = tmp_path / "known_hosts"
    wrong_host_key.write_text(f"[127.0.0.1]:{serving_host.port} ssh-ed25519 "
                              "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    other = SFTPFiles("r7", files.key_file, files.model_store, replace(_ssh(serving_host),
                                                                        known_hosts=str(wrong_host_key)))
    with pytest.raises(FlywheelError, match=r"host key mismatch for .*\(replica r7\)"):
        other.keys()
    bare = SFTPFiles("r7", files.key_file, files.model_store, ReplicaSSH(serving_host.host, serving_host.user))
    with pytest.raises(FlywheelError, match="replica r7 is on .*FLYWHEEL_SSH_KEY"):
        bare.keys()


# ------------------------------------------------------------------------------ live pool (reliability)
@pytest.fixture(scope="module")
def remote_pool(serving_models, serving_host, tmp_path_factory):
    """2 TorchServe replicas + HAProxy on this host, described with their files on `serving_host`."""
    from flywheel.contracts.preprocessing import encode_png
    from flywheel.core.models import load_spec, read_test_set
    from flywheel.serving.pool import start_pool

    root = tmp_path_factory.mktemp("remote-pool")
    v1 = serving_models.versions[0]
    store = root / "store"  # this pool's own store: what a release puts there came over SFTP
    store.mkdir()
    shutil.copy(serving_models.mars[v1], store)
    spec = load_spec(f"models:/{MODEL}/{v1}", serving_models.tracking_uri)
    images, _ = read_test_set(spec, serving_models.tracking_uri)
    pngs = [encode_png(img) for img in images[:200]]
    pool = start_pool(root / "pool", 2, store, models=(f"{MODEL}={serving_models.mars[v1].name}",),
                      renew_keys=False)
    try:
        remote_store = _remote(serving_host, store, "pool-store")
        replicas = []
        for replica, server in zip(pool.spec.replicas, pool.servers, strict=True):
            ts_dir = _remote(serving_host, server.key_file.parent, f"pool-{replica.name}")
            replicas.append(replace(replica, key_file=ts_dir / server.key_file.name, model_store=remote_store,
                                    ssh=_ssh(serving_host)))
        remote = PoolSpec.read(replace(pool.spec, replicas=tuple(replicas)).write(root / "pool-remote.json"))
        yield pool, remote, store, pngs
    finally:
        pool.stop()


@pytest.mark.reliability
def test_rolling_release_and_key_renewal_over_sftp(remote_pool, serving_models, serving_host):
    from flywheel.serving.keys import read_keys
    from flywheel.serving.pool import PoolKeyRenewer, PoolTarget, pool_release, renew_inference_key
    from tests.test_pool import Load, _alias, _failed, _lenient

    pool, spec, store, pngs = remote_pool
    settings = serving_models.settings()
    v1, v2, _ = serving_models.versions
    assert all(r.ssh is not None and not r.key_file.exists() and not r.model_store.exists() for r in spec.replicas)
    assert not (store / f"{MODEL}-{v2}.mar").exists()
    sessions = _sftp_sessions(serving_host)

    # Rolling release: the archive reaches the replicas' store over SFTP, each is drained and switched.
    with Load(pool.url, pool.spec.token(), pngs) as load:
        load.wait_for(50)
        result = pool_release(settings, MODEL, v2, "dev", PoolTarget(spec, grace_s=1.0), _lenient(), None,
                              mar_path=serving_models.mars[v2])
        load.wait_for(100)
    outcomes = load.snapshot()
    assert _failed(outcomes) == [], _failed(outcomes)[:5]
    assert result.mode == "rolling" and not result.rolled_back
    assert outcomes[-1].version == v2 and all(r.client().default_version(MODEL) == v2 for r in spec.replicas)
    assert (store / f"{MODEL}-{v2}.mar").read_bytes() == serving_models.mars[v2].read_bytes()
    assert not [p for p in store.iterdir() if p.name.endswith(".part")]
    assert _alias(settings, "dev") == v2
    after_release = _sftp_sessions(serving_host)
    assert after_release > sessions

    # Key renewal: each replica's inference key (drained), then a renewer pass that finds every key due.
    local_keys = [s.key_file for s in pool.servers]  # the test's own view of the files, to check the result
    old = [read_keys(k) for k in local_keys]
    renewer = PoolKeyRenewer(spec)
    with Load(pool.url, pool.spec.token(), pngs) as load:
        load.wait_for(50)
        for replica in spec.replicas:
            renew_inference_key(spec, replica.name)
        mid = [read_keys(k) for k in local_keys]
        renewer.renew_due(now=time.time() + 10 * 86400)  # far past half-life: inference and management due
        load.wait_for(100)
    assert _failed(load.snapshot()) == [], _failed(load.snapshot())[:5]
    new = [read_keys(k) for k in local_keys]
    for before, middle, after in zip(old, mid, new, strict=True):
        assert middle["inference"] != before["inference"] and middle["management"] == before["management"]
        assert after["inference"] != middle["inference"] and after["management"] != before["management"]
    assert renewer.renewals == 2 * len(spec.replicas)
    assert pool.runtime.show_map(spec.keys_map) == {r.name: k["inference"] for r, k in zip(spec.replicas, new,
                                                                                              strict=True)}
    assert _sftp_sessions(serving_host) > after_release
    # A release's client re-reads the renewed management key over SFTP.
    assert spec.replicas[0].client().versions(MODEL) == {v1: False, v2: True}
