"""Fixtures for the serving tests (and the monitor's): real models, real .mar files, a real TorchServe.

`serving_models` trains two Fashion-MNIST models in an embedded store (session scope, ~1-2 min)
and registers three versions: v1 and v2 (the same small but real model, registered twice) and v3,
trained on 32 images, so it fails any sensible accuracy acceptance. Each is packaged into a model store. `torchserve_server` runs TorchServe with token
auth on loopback with v1 loaded, capturing served traffic into a session directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL = "fashion-classifier"
GOOD_SAMPLES = 2000  # 1 epoch on this many images: ~0.5-0.7 test accuracy, ~30 s on 2 cores
BAD_SAMPLES = 32  # a model that is barely better than chance


@dataclass(frozen=True)
class ServingModels:
    tracking_uri: str
    work_dir: Path
    name: str
    versions: tuple[str, ...]  # (good v1, good v2, bad v3)
    accuracy: dict  # version → test accuracy recorded by training
    mars: dict  # version → .mar path
    manifests: dict  # version → flywheel manifest
    model_store: Path

    def settings(self):
        from flywheel.core.config import Settings

        return Settings.from_env(tracking_uri=self.tracking_uri, work_dir=self.work_dir,
                                 model_name=self.name).apply()


@dataclass(frozen=True)
class ServingServer:
    server: object  # flywheel.serving.torchserve.TorchServe
    client: object  # flywheel.serving.torchserve.TorchServeClient
    models: ServingModels
    model: str
    version: str
    capture_dir: Path

    @property
    def inference_url(self) -> str:
        return self.server.cfg.inference_address

    @property
    def key_file(self) -> Path:
        return self.server.key_file


@pytest.fixture(scope="session")
def serving_models(tmp_path_factory) -> ServingModels:
    import mlflow

    from flywheel.core.config import Settings
    from flywheel.serving.package import PackageConfig, package_version
    from flywheel.training.train import TrainConfig, run_training

    root = tmp_path_factory.mktemp("serving-registry")
    settings = Settings.from_env(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", work_dir=root,
                                 model_name=MODEL).apply()
    versions, accuracy, mars, manifests = [], {}, {}, {}
    store = root / "model-store"
    good = run_training(TrainConfig(dataset="fashion-mnist", epochs=1, batch_size=32, seed=0,
                                    max_train_samples=GOOD_SAMPLES, register=False), settings)
    bad = run_training(TrainConfig(dataset="fashion-mnist", epochs=1, batch_size=32, seed=2,
                                   max_train_samples=BAD_SAMPLES, register=False), settings)
    # v1 and v2 are two registrations of the good run (training is the slow part of this fixture;
    # a release is about versions, and v2's archive says v2). Registered directly, not through the
    # gate, because the test needs the bad v3 to be a real registry version.
    for result in (good, good, bad):
        mv = mlflow.register_model(result.model_uri, MODEL)
        version = str(mv.version)
        versions.append(version)
        accuracy[version] = result.metrics.get("test_accuracy")
        packaged = package_version(PackageConfig(MODEL, version=version, out_dir=store), settings)
        mars[version], manifests[version] = packaged.mar_path, packaged.manifest
    return ServingModels(settings.tracking_uri, root, MODEL, tuple(versions), accuracy, mars, manifests, store)


@pytest.fixture(scope="session")
def torchserve_server(serving_models, tmp_path_factory) -> ServingServer:
    """TorchServe (token auth, loopback, random ports) serving v1 of `serving_models`, capturing."""
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    root = tmp_path_factory.mktemp("torchserve")
    capture_dir = root / "captures"
    v1 = serving_models.versions[0]
    cfg = ServeConfig.local(root / "server", serving_models.model_store,
                            models=(f"{MODEL}={serving_models.mars[v1].name}",))
    server = start_torchserve(cfg, env={"FLYWHEEL_CAPTURE_URI": str(capture_dir)})
    try:
        server.client().wait_ready(MODEL)
        yield ServingServer(server, server.client(), serving_models, MODEL, v1, capture_dir)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ Docker
@dataclass(frozen=True)
class Dockerd:
    base_url: str
    root: Path


@pytest.fixture(scope="session")
def dockerd():
    """A private dockerd (no bridge, no iptables, own data/exec roots and socket), stopped by PID."""
    import shutil
    import subprocess
    import tempfile
    import time

    import docker

    from flywheel.core.procs import stop_process_group

    exe = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(exe).exists():
        pytest.fail("dockerd is not installed: `make system-deps` (apt-get install docker.io)")
    root = Path(tempfile.mkdtemp(prefix="fwd-", dir="/tmp"))  # short: unix socket paths are limited
    sock = root / "d.sock"
    with open(root / "dockerd.log", "wb") as log:
        proc = subprocess.Popen([exe, "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
                                 "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                                 "-H", f"unix://{sock}", "--pidfile", str(root / "d.pid")],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    base_url = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                docker.DockerClient(base_url=base_url).ping()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dockerd did not start: {(root / 'dockerd.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield Dockerd(base_url, root)
    finally:
        try:
            client = docker.DockerClient(base_url=base_url)
            for c in client.containers.list(all=True):
                c.remove(force=True)
        except Exception as exc:  # noqa: BLE001 - best effort before stopping the daemon
            print(f"dockerd fixture: could not remove containers: {exc}")
        stop_process_group(proc, timeout=30)
        proc.wait()
        subprocess.run(["umount", "-R", str(root / "exec")], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# What the serving image needs from this machine's venv (Debian has no torch 2.13 CPU wheel offline).
_BASE_PACKAGES = (
    "torch", "torch.libs", "torchgen", "onnxruntime", "ts", "numpy", "numpy.libs", "PIL", "pillow.libs", "yaml",
    "_yaml", "psutil", "packaging", "sympy", "mpmath", "filelock", "fsspec", "jinja2", "markupsafe", "networkx",
    "typing_extensions.py", "google", "flatbuffers", "requests", "urllib3", "certifi", "idna",
    "charset_normalizer", "cryptography", "bcrypt", "cffi", "opentelemetry", "google_crc32c",
)
_BASE_HOST_PATHS = (
    "bin", "lib", "lib64", "sbin", "usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu", "usr/lib64", "usr/lib/jvm",
    "usr/lib/locale", "usr/share/ca-certificates", "etc/alternatives", "etc/java-17-openjdk", "etc/ssl",
    "etc/ld.so.cache", "etc/ld.so.conf", "etc/ld.so.conf.d", "etc/nsswitch.conf", "etc/login.defs", "etc/default",
)


def base_rootfs_tar(work: Path) -> Path:
    """A rootfs tarball of this host's Java 17, Python 3.11 and serving packages (the serving image's
    base when no registry is reachable): `docker import` or `podman import` it with
    ENV PYTHONPATH=/opt/site-packages and ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin."""
    import subprocess
    import sys
    import sysconfig

    stage = work / "stage"
    for d in ("etc", "usr/local/bin", "root"):
        (stage / d).mkdir(parents=True)
    (stage / "tmp").mkdir(mode=0o1777)
    (stage / "tmp").chmod(0o1777)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n")
    (stage / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (stage / "etc/shadow").write_text("root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n")
    (stage / "etc/gshadow").write_text("root:*::\nnogroup:*::\n")
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for name in ("python", "python3"):
        (stage / "usr/local/bin" / name).symlink_to(python)
    script = stage / "usr/local/bin/torchserve"
    script.write_text("#!/usr/local/bin/python\nimport sys\nfrom ts.model_server import start\nsys.exit(start())\n")
    script.chmod(0o755)
    site = Path(sysconfig.get_paths()["purelib"])
    pkgs = [str((site / p).relative_to("/")) for p in _BASE_PACKAGES if (site / p).exists()]
    pkgs += [str(p.relative_to("/")) for p in site.glob("*.dist-info")
             if p.name.split("-")[0].lower().replace("_", "-") in {"torch", "onnxruntime", "torchserve", "numpy",
                                                                      "pillow", "pyyaml", "psutil", "packaging"}]
    pkgs += [str(p.relative_to("/")) for p in site.glob("_cffi_backend*.so")]
    tar = work / "base.tar"
    base = str(Path(sys.base_prefix).relative_to("/"))
    cmd = ["tar", "-C", "/", "--mode=a+rX", "-cf", str(tar), "--exclude=*/__pycache__",
           f"--exclude={base}/lib/python3.11/site-packages", f"--exclude={base}/lib/python3.11/test",
           "--exclude=torch/include", "--exclude=torch/test",
           f"--transform=s,^{site.relative_to('/')!s},opt/site-packages,",
           *[p for p in _BASE_HOST_PATHS if Path("/", p).exists()], base, *pkgs]
    for step in (cmd, ["tar", "-C", str(stage), "--mode=a+rX", "-rf", str(tar), "etc/passwd", "etc/group", "tmp",
                       "usr/local/bin", "root"],
                 ["tar", "-C", str(stage), "-rf", str(tar), "etc/shadow", "etc/gshadow"]):
        proc = subprocess.run(step, check=False, capture_output=True, text=True)
        if proc.returncode not in (0, 1):  # 1: "file changed as we read it" on a live system
            pytest.fail(f"building the base rootfs failed: {proc.stderr[-2000:]}")
    return tar


@pytest.fixture(scope="session")
def serving_base_image(dockerd, tmp_path_factory) -> str:
    """A local base image (no registry here): this host's Java 17, Python 3.11 and serving packages.

    `docker import` of a rootfs tarball cut from this machine; the serving Dockerfile builds on it
    with PREINSTALLED=true. ~3 GB, a few minutes: only the reliability container test uses it.
    """
    import subprocess

    import docker

    tag = "flywheel-serving-base:local"
    client = docker.DockerClient(base_url=dockerd.base_url)
    tar = base_rootfs_tar(tmp_path_factory.mktemp("base-image"))
    # The docker CLI, not the SDK: the SDK's streamed import fails with "header line too long" here.
    proc = subprocess.run(["docker", "-H", dockerd.base_url, "import",
                           "--change", "ENV PYTHONPATH=/opt/site-packages",
                           "--change", "ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin", str(tar), tag],
                          check=False, capture_output=True, text=True)
    tar.unlink()
    if proc.returncode != 0:
        pytest.fail(f"docker import of the base rootfs failed: {proc.stderr[-2000:]}")
    out = client.containers.run(tag, ["python", "-c", "import torch, onnxruntime, ts; print('ok')"],
                                network_mode="none", remove=True)
    assert b"ok" in out
    return tag
