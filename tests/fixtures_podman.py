"""Fixtures for running deploy/kubernetes's serving pod under podman (`podman kube play`).

No registry is reachable here, so every image the pod names is built locally, in a private podman
store (own --root/--runroot under /tmp, removed at the end; the host's podman store is untouched):

* the serving image: `podman build` of deploy/serving/Dockerfile (flywheel.serving.release's
  build_context, no archive baked in) on a base imported from this host's rootfs (the same tarball
  the Docker test imports: fixtures_serving.base_rootfs_tar), tagged as the manifests name it;
* `haproxy:2.6` (the gate): this host's HAProxy 2.6 binary and its shared libraries;
* the pod's infra ("pause") image: coreutils' sleep, set as infra_image in a private containers.conf
  (podman would build its own from catatonit, which is not installed).

podman 4.3 facts met here: a Secret for `secretKeyRef` must be a podman secret holding a JSON map of
base64 values (a Secret object in the played YAML is not used for it); `optional: true` secret
volumes are not honoured (a missing one fails the play); the default rlimits (nofile/nproc 1048576)
cannot be set in this VM, so containers.conf sets lower ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVING_IMAGE = "localhost/flywheel-serving:0.1.0"
HAPROXY_IMAGE = "docker.io/library/haproxy:2.6"
PAUSE_IMAGE = "localhost/flywheel-pause:local"


@dataclass(frozen=True)
class Podman:
    root: Path

    def argv(self, *args: str) -> list[str]:
        return ["podman", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", "overlay", *args]

    def env(self) -> dict[str, str]:
        import os

        return {**os.environ, "CONTAINERS_CONF": str(self.root / "containers.conf")}

    def run(self, *args: str, timeout: float = 600, check: bool = True, stdin: bytes | None = None
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), env=self.env(), input=stdin, capture_output=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])} failed ({proc.returncode}): "
                        f"{proc.stderr.decode(errors='replace')[-3000:]}")
        return proc


def _rootfs_of(binaries: list[str], dest: Path) -> None:
    """Copy binaries and every shared library `ldd` names for them under dest (same paths)."""
    for binary in binaries:
        files = [binary]
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split("=>")[-1].split()
            if parts and parts[0].startswith("/"):
                files.append(parts[0])
        for f in files:
            target = dest / f.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(f).resolve(), target)


def _import(podman: Podman, rootfs: Path, tag: str, *changes: str) -> None:
    tar = rootfs.with_suffix(".tar")
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    args = [a for c in changes for a in ("--change", c)]
    podman.run("import", *args, str(tar), tag)
    tar.unlink()


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    """A private podman store with the pause image and a containers.conf that works in this VM."""
    import resource

    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: `make system-deps` (apt-get install podman)")
    root = Path(tempfile.mkdtemp(prefix="fwp-", dir="/tmp"))
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    (root / "containers.conf").write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        f'[engine]\ninfra_image = "{PAUSE_IMAGE}"\n')
    pm = Podman(root)
    try:
        pause = root / "pause"
        _rootfs_of([shutil.which("sleep")], pause)
        (pause / "bin").mkdir(exist_ok=True)
        shutil.copy2(shutil.which("sleep"), pause / "bin" / "sleep")
        _import(pm, pause, PAUSE_IMAGE, 'ENTRYPOINT ["/bin/sleep", "infinity"]', "STOPSIGNAL SIGKILL")
        yield pm
    finally:
        # Not `podman system reset`: networks live in the host-wide /etc/cni/net.d, not in this store.
        pm.run("pod", "rm", "--force", "--all", check=False, timeout=120)
        pm.run("rm", "--force", "--all", check=False, timeout=120)
        pm.run("volume", "rm", "--force", "--all", check=False, timeout=120)
        pm.run("rmi", "--force", "--all", check=False, timeout=300)
        subprocess.run(["umount", "-R", str(root / "storage" / "overlay")], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def podman_serving_images(podman, tmp_path_factory) -> dict[str, str]:
    """The serving image and haproxy:2.6, built in the private store (a few minutes: ~3 GB base)."""
    from flywheel.serving.release import build_context
    from tests.fixtures_serving import base_rootfs_tar

    work = tmp_path_factory.mktemp("podman-images")
    tar = base_rootfs_tar(work)
    podman.run("import", "--change", "ENV PYTHONPATH=/opt/site-packages",
               "--change", "ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin", str(tar),
               "localhost/flywheel-serving-base:local", timeout=900)
    tar.unlink()
    ctx = build_context([], work / "context")
    podman.run("build", "--format", "docker", "--network", "none", "--build-arg",
               "BASE_IMAGE=localhost/flywheel-serving-base:local", "--build-arg", "PREINSTALLED=true",
               "-t", SERVING_IMAGE, str(ctx), timeout=900)
    haproxy = work / "haproxy"
    _rootfs_of([shutil.which("haproxy") or "/usr/sbin/haproxy"], haproxy)
    (haproxy / "etc").mkdir(exist_ok=True)
    (haproxy / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/false\n")
    (haproxy / "tmp").mkdir(mode=0o1777)
    _import(podman, haproxy, HAPROXY_IMAGE, "ENV PATH=/usr/local/sbin:/usr/sbin:/usr/bin")
    images = json.loads(podman.run("images", "--format", "json").stdout)
    names = {n for i in images for n in i.get("Names") or []}
    assert {SERVING_IMAGE, HAPROXY_IMAGE} <= names, names
    return {"serving": SERVING_IMAGE, "haproxy": HAPROXY_IMAGE}
