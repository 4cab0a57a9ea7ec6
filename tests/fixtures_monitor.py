"""Fixtures for the monitor tests: GCS emulator, a GitHub API stand-in, real embeddings, a capturing TorchServe.

Everything is real: the GCS emulator is the `gcp-storage-emulator` server, the GitHub stand-in is an
HTTP server that records what a real client sends, embeddings come from a real model trained on
Fashion-MNIST (`serving_models` from fixtures_serving), and TorchServe runs the real handler with the
real capture writer.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from flywheel.core.procs import stop_process_group
from tests.conftest import VENV_BIN, free_port


# ------------------------------------------------------------------------------------ GCS emulator
@dataclass
class GCSEmulator:
    host: str  # http://127.0.0.1:PORT (STORAGE_EMULATOR_HOST needs the scheme)
    port: int
    bucket: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(VENV_BIN / "gcp-storage-emulator"), "-d", str(self.data_dir), "start", "--host", "127.0.0.1",
               "--port", str(self.port), "--default-bucket", self.bucket]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gcp-storage-emulator did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc, timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs")
    emu = GCSEmulator(f"http://127.0.0.1:{(port := free_port())}", port, "flywheel-captures", root / "data",
                      root / "emulator.log")
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def gcs_env(gcs_emulator, monkeypatch):
    """Point google-cloud-storage at the emulator for this test."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
    return gcs_emulator


# ------------------------------------------------------------------------------------ GitHub API
@dataclass
class GitHubStub:
    """Records POSTs; answers `fail_first` of them with 503, then 204 like GitHub's dispatches endpoint."""

    url: str
    requests: list = field(default_factory=list)
    fail_first: int = 0
    answered: int = 0


@pytest.fixture
def github_api():
    state = GitHubStub(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                state.answered += 1
                failing = state.answered <= state.fail_first
                if not failing:
                    state.requests.append({"path": self.path, "headers": dict(self.headers),
                                           "json": json.loads(body or b"null")})
            self.send_response(503 if failing else 204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ embeddings
@dataclass(frozen=True)
class FashionEmbeddings:
    reference: np.ndarray  # the run's logged reference/embeddings.npy
    reference_predictions: np.ndarray
    clean: np.ndarray  # held-out Fashion-MNIST test images
    shifted: dict  # shift kind → embeddings of shifted test images (disjoint from `clean`)
    clean_images: np.ndarray
    shift_images: np.ndarray


@pytest.fixture(scope="session")
def fashion_embeddings(serving_models) -> FashionEmbeddings:
    """Embeddings of a real small model (serving_models v1) on real Fashion-MNIST, clean and shifted."""
    import mlflow
    import torch

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.data import load_splits
    from flywheel.core.models import load_model
    from flywheel.core.shifts import shift_images

    settings = serving_models.settings()
    version = serving_models.versions[0]
    mv = mlflow.MlflowClient().get_model_version(serving_models.name, version)
    ref_dir = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="reference"))
    model, spec = load_model(f"models:/{serving_models.name}/{version}")
    test = load_splits("fashion-mnist", data_dir=settings.data_dir).test
    order = np.random.default_rng(7).permutation(len(test))
    clean_imgs, shift_src = test.images[order[:2000]], test.images[order[2000:2600]]

    def embed(images):
        with torch.no_grad():
            return torch.cat([model(to_tensor(images[i:i + 500], spec.preprocess))[1]
                              for i in range(0, len(images), 500)]).numpy()

    return FashionEmbeddings(np.load(ref_dir / "embeddings.npy"), np.load(ref_dir / "predictions.npy"),
                             embed(clean_imgs), {k: embed(shift_images(shift_src, k)) for k in ("invert", "rotate")},
                             clean_imgs, shift_src)


# ------------------------------------------------------------------------------------ TorchServe
@dataclass(frozen=True)
class MonitoredServer:
    server: object
    client: object
    model: str
    version: str
    capture_uri: str
    tracking_uri: str
    work_dir: Path


def start_capturing_torchserve(serving_models, root: Path, capture_uri: str, env: dict | None = None):
    from flywheel.serving.torchserve import ServeConfig, start_torchserve

    v1 = serving_models.versions[0]
    cfg = ServeConfig.local(root / "server", serving_models.model_store,
                            models=(f"{serving_models.name}={serving_models.mars[v1].name}",))
    return start_torchserve(cfg, env={"FLYWHEEL_CAPTURE_URI": capture_uri, **(env or {})})


@pytest.fixture(scope="session")
def monitored_torchserve(serving_models, tmp_path_factory) -> MonitoredServer:
    """Our own TorchServe (serving tests move versions on theirs) serving v1, capturing to a directory."""
    root = tmp_path_factory.mktemp("monitored-ts")
    capture_uri = str(root / "captures")
    server = start_capturing_torchserve(serving_models, root, capture_uri)
    try:
        yield MonitoredServer(server, server.client(), serving_models.name, serving_models.versions[0],
                              capture_uri, serving_models.tracking_uri, serving_models.work_dir)
    finally:
        server.stop()
