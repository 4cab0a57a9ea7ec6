"""Triton as Flywheel's second serving engine: the model repository, the server, and its client.

Repository (`write_repository`, called by `flywheel package --engine triton`): one registry version
becomes version folder N of three Triton models, all from the same parity-checked ONNX file:
  <repo>/<model>/config.pbtxt          backend "python": serving/triton_model.py (as model.py) runs
  <repo>/<model>/<N>/                  the ONNX file with ONNX Runtime plus the shared preprocessing;
                                       image bytes in (BYTES), the TorchServe handler's fields out.
                                       The configuration that runs on this CPU machine.
  <repo>/<model>-onnx/config.pbtxt     platform "onnxruntime_onnx": the bare network (float tensors
  <repo>/<model>-onnx/<N>/model.onnx   in, logits and embedding out) for GPU nodes and production
                                       images, whose Triton has the onnxruntime backend.
  <repo>/<model>-trt/...               platform "tensorrt_plan", only where a TensorRT engine was built.
Both other configurations are written and checked as text here; neither ever ran on this machine
(the nvidia-pytriton wheel ships only the Python backend). `version_policy` names the versions a
load serves (`set_versions`); `flywheel release --engine triton` edits it.

Server (`start_triton`): the wheel's `tritonserver` in explicit model-control mode with every port
(HTTP, gRPC, metrics) on 127.0.0.1, the wheel's libraries on LD_LIBRARY_PATH and a backend
directory holding the Python backend and the stub for this interpreter; then the authenticating
proxy (serving/triton_proxy.py), the only address clients use. Both run in sessions of their own
and stop by process group.

Client (`TritonClient`): the KServe v2 protocol through the proxy with the proxy's keys (re-read
from the key file when one is rejected), the model-control API, and `predict`, which speaks the
TorchServe client's language (image bytes or {"image"}/{"images", "top_k"} in; a response whose
JSON is the TorchServe handler's answer out), so release acceptance and `flywheel predict` work on
both engines unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flywheel.core.errors import FlywheelError
from flywheel.core.procs import free_port, stop_process_group

KEY_FILE = "key_file.json"
ROUTES_FILE = "routes.json"
PYTHON_MODEL_FILE = Path(__file__).with_name("triton_model.py")
ONNX_SUFFIX, TRT_SUFFIX = "-onnx", "-trt"
_ONNX_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
               "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(uint8)": "TYPE_UINT8",
               "tensor(int8)": "TYPE_INT8", "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}
_POLICY = re.compile(r"^version_policy: .*$", re.MULTILINE)


# ------------------------------------------------------------------------------------- repository
@dataclass(frozen=True)
class TritonModelConfig:
    """How the repository's models are served (rendered into each config.pbtxt)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 1000  # dynamic batching: a lone request waits at most this long
    instances: int = 1  # per version
    top_k: int = 3
    ort_threads: int = 1
    max_images_per_request: int = 64
    capture_uri: str | None = None  # baked default; FLYWHEEL_CAPTURE_URI on the server wins
    capture_sample: float = 1.0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # TYPE_FP32, TYPE_STRING, ...
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable


def _tensor(spec: TensorSpec) -> str:
    return f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {", ".join(map(str, spec.dims))} ] }}'


def _policy(versions: list[str] | tuple[str, ...]) -> str:
    if not versions:
        raise FlywheelError("a Triton model needs at least one version in its version_policy")
    listed = ", ".join(str(v) for v in sorted({int(v) for v in versions}))
    return f"version_policy: {{ specific: {{ versions: [ {listed} ] }} }}"


def render_config(name: str, *, inputs: list[TensorSpec], outputs: list[TensorSpec], versions: list[str],
                  cfg: TritonModelConfig, backend: str | None = None, platform: str | None = None,
                  kind: str = "KIND_CPU", parameters: Mapping[str, str] | None = None) -> str:
    """One config.pbtxt: batching, inputs/outputs, instances, the versions served, parameters."""
    head = f'backend: "{backend}"' if backend else f'platform: "{platform}"'
    lines = [f'name: "{name}"', head, f"max_batch_size: {cfg.max_batch_size}",
             "input [", ",\n".join(_tensor(t) for t in inputs), "]",
             "output [", ",\n".join(_tensor(t) for t in outputs), "]",
             f"dynamic_batching {{ max_queue_delay_microseconds: {cfg.max_queue_delay_us} }}",
             f"instance_group [ {{ count: {cfg.instances} kind: {kind} }} ]",
             _policy(versions)]
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {json.dumps(str(value))} }} }}')
    return "\n".join(lines) + "\n"


def python_model_io(num_classes: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The Python-backend model's signature (see serving/triton_model.py)."""
    one = (1,)
    return ([TensorSpec("image", "TYPE_STRING", one)],
            [TensorSpec("label", "TYPE_STRING", one), TensorSpec("label_index", "TYPE_INT64", one),
             TensorSpec("confidence", "TYPE_FP32", one), TensorSpec("probabilities", "TYPE_FP32", (num_classes,)),
             TensorSpec("prediction_id", "TYPE_STRING", one), TensorSpec("version", "TYPE_STRING", one),
             TensorSpec("prediction", "TYPE_STRING", one)])


def onnx_io(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The ONNX file's own signature: names, element types and shapes after the batch dimension."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def spec(arg) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape[1:])
        if arg.type not in _ONNX_TYPES:
            raise FlywheelError(f"{onnx_path.name}: {arg.name} has type {arg.type}, which Triton's config lacks")
        return TensorSpec(arg.name, _ONNX_TYPES[arg.type], dims)

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def served_versions(config_path: Path) -> list[str]:
    """The versions a config.pbtxt's version_policy names (its `specific` list)."""
    match = _POLICY.search(config_path.read_text())
    if not match:
        return []
    return re.findall(r"\d+", match.group(0))


def set_versions(config_path: Path, versions: list[str]) -> None:
    """Rewrite a config.pbtxt's version_policy to serve exactly `versions` (atomic replace)."""
    text = config_path.read_text()
    new = _POLICY.sub(_policy(versions), text) if _POLICY.search(text) else text + _policy(versions) + "\n"
    tmp = config_path.with_name(f".{config_path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, config_path)


def write_repository(staging: Path, manifest, repository: Path, cfg: TritonModelConfig = TritonModelConfig(),
                     engine_file: str | None = None) -> dict[str, Path]:
    """Put one parity-checked version (the ONNX file and manifest in `staging`) into `repository` as
    version folder N of `<model>` (Python backend), `<model>-onnx` and, with an engine, `<model>-trt`.
    Existing versions stay; a config's version_policy keeps its versions and gains N. Returns
    {Triton model name: its version folder}."""
    from flywheel.serving import CONTRACTS_DIR, TRITON_CONTRACTS

    name, version = manifest.model_name, str(manifest.model_version)
    onnx_file = staging / manifest.artifact["file"]
    if manifest.artifact.get("format") != "onnx":
        raise FlywheelError(f"the Triton repository serves the ONNX file; {name} v{version} was prepared as "
                            f"{manifest.artifact.get('format')}")
    written: dict[str, Path] = {}

    def version_dir(model: str, files: dict[str, Path], config: Callable[[list[str]], str]) -> None:
        model_dir = repository / model
        target = model_dir / version
        tmp = model_dir / f".{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for dest, src in files.items():
            shutil.copy(src, tmp / dest)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        config_path = model_dir / "config.pbtxt"
        versions = served_versions(config_path) if config_path.is_file() else []
        tmp_config = model_dir / ".config.pbtxt.tmp"
        tmp_config.write_text(config(sorted({*versions, version}, key=int)))
        os.replace(tmp_config, config_path)
        written[model] = target

    manifest_path = staging / "flywheel_manifest.json"
    manifest.write(staging)
    py_in, py_out = python_model_io(len(manifest.class_names))
    params = {"top_k": cfg.top_k, "ort_threads": cfg.ort_threads, "max_images_per_request": cfg.max_images_per_request}
    if cfg.capture_uri:
        params.update(capture_uri=cfg.capture_uri, capture_sample=cfg.capture_sample)
    files = {"model.py": PYTHON_MODEL_FILE, onnx_file.name: onnx_file, manifest_path.name: manifest_path,
             **{n: CONTRACTS_DIR / n for n in TRITON_CONTRACTS}}
    version_dir(name, files, lambda vs: render_config(name, inputs=py_in, outputs=py_out, versions=vs, cfg=cfg,
                                                      backend="python", parameters=params))
    ort_in, ort_out = onnx_io(onnx_file)
    onnx_name = name + ONNX_SUFFIX
    version_dir(onnx_name, {"model.onnx": onnx_file},
                lambda vs: render_config(onnx_name, inputs=ort_in, outputs=ort_out, versions=vs, cfg=cfg,
                                         platform="onnxruntime_onnx", kind="KIND_GPU"))
    if engine_file:
        trt_name = name + TRT_SUFFIX
        version_dir(trt_name, {"model.plan": staging / engine_file},
                    lambda vs: render_config(trt_name, inputs=ort_in, outputs=ort_out, versions=vs, cfg=cfg,
                                             platform="tensorrt_plan", kind="KIND_GPU"))
    return written


# ------------------------------------------------------------------------------------------ server
def wheel_paths() -> tuple[Path, Path, Path]:
    """(tritonserver binary, its library folder, the wheel's tritonserver folder) from nvidia-pytriton."""
    for site in dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path)):
        root = Path(site) / "pytriton" / "tritonserver"
        exe, libs = root / "bin" / "tritonserver", Path(site) / "nvidia_pytriton.libs"
        if exe.is_file() and libs.is_dir():
            return exe, libs, root
    raise FlywheelError("tritonserver not found: pip install --no-deps nvidia-pytriton==0.7.0 (its wheel "
                        "bundles the server; see docs/runbooks/serving.md#triton)")


def backend_directory(work_dir: Path) -> Path:
    """A backend folder for this interpreter: the wheel's Python backend plus the stub built for this
    Python version (the wheel keeps stubs per version apart from the backend)."""
    _, _, root = wheel_paths()
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise FlywheelError(f"the nvidia-pytriton wheel has no Python backend stub for Python "
                            f"{sys.version_info[0]}.{sys.version_info[1]}")
    backends = work_dir / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (*(root / "backends" / "python").glob("*.*"), stub):
        if src.is_file() and src.suffix in (".so", ".py", ""):
            dest = python / src.name
            if not dest.exists() or dest.stat().st_size != src.stat().st_size:
                shutil.copy2(src, dest)
    return backends


@dataclass(frozen=True)
class TritonServeConfig:
    """One Triton behind its proxy. Triton's own ports are loopback only; the proxy is the way in."""

    work_dir: Path  # key_file.json, routes.json, logs, the backend folder
    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    proxy_host: str = "127.0.0.1"  # production: the address clients reach
    proxy_port: int = 8010
    models: tuple[str, ...] = ()  # Triton models loaded at start (explicit mode loads nothing else)
    token_expiration_min: float = 1440.0
    extra_args: tuple[str, ...] = ()

    @classmethod
    def local(cls, work_dir: Path, repository: Path, **overrides) -> TritonServeConfig:
        """Loopback-only config on free random ports (tests, several servers side by side)."""
        ports = [free_port() for _ in range(4)]
        cfg = cls(Path(work_dir), Path(repository), http_port=ports[0], grpc_port=ports[1],
                  metrics_port=ports[2], proxy_port=ports[3])
        return replace(cfg, **overrides) if overrides else cfg

    @property
    def url(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"

    @property
    def triton_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


def triton_command(cfg: TritonServeConfig, backends: Path) -> list[str]:
    exe, _, _ = wheel_paths()
    cmd = [str(exe), "--model-repository", str(cfg.repository), "--model-control-mode", "explicit",
           "--http-address", "127.0.0.1", "--http-port", str(cfg.http_port),
           "--grpc-address", "127.0.0.1", "--grpc-port", str(cfg.grpc_port),
           "--metrics-address", "127.0.0.1", "--metrics-port", str(cfg.metrics_port),
           "--allow-gpu-metrics", "false", "--backend-directory", str(backends),
           # the capture mark reaches the model as a request parameter (serving/triton_model.py)
           "--http-header-forward-pattern", "(?i)x-flywheel-traffic",
           "--strict-readiness", "true", "--exit-timeout-secs", "10"]
    for model in cfg.models:
        cmd += ["--load-model", model]
    return cmd + list(cfg.extra_args)


STUB_NUMPY = "numpy==1.26.4"  # the Python backend's stub needs numpy 1 (see stub_python)


def stub_python() -> Path:
    """The bin/ folder of the Python backend's own virtualenv, put first on tritonserver's PATH.

    The wheel's stub embeds libpython and takes its sys.path from the `python3` it finds on PATH (its
    venv, .pth files included; PYTHONPATH is ignored). It hands tensors to Python as numpy arrays
    laid out for numpy 1: under this venv's numpy 2 it reads them wrong (measured: an FP32 [1.5, 2.5]
    arrived as [1.5, 1.5]; a BYTES tensor failed to deserialize), which is why nvidia-pytriton pins
    numpy<2. So the stub gets a venv of its own, `<venv>/triton-python-backend`, with numpy 1.26 and
    a .pth naming this venv's site-packages (onnxruntime, Pillow; they accept numpy 1): the venv keeps
    numpy 2, and flywheel itself is not importable in the stub (its editable .pth is not read)."""
    venv = Path(sys.prefix) / "triton-python-backend"
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    if not (venv / "bin" / "python3").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    if not (site / "numpy").is_dir():
        raise FlywheelError(f"{site} has no numpy: pip install --no-deps --target {site} {STUB_NUMPY} (Triton's "
                            "Python backend needs numpy 1; `make venv` does this)")
    pth = site / "flywheel-serving-packages.pth"
    lines = "".join(f"{p}\n" for p in dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])))
    if not pth.is_file() or pth.read_text() != lines:
        pth.write_text(lines)
    return venv / "bin"


def triton_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """tritonserver's environment: the wheel's libraries, and the stub's python first on PATH."""
    _, libs, _ = wheel_paths()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(stub_python()), env.get("PATH", "")))
    env.pop("PYTHONPATH", None)  # the stub ignores it; keep it from meaning anything to anyone else
    env.update(extra or {})
    return env


class TritonServer:
    """A started Triton and its proxy (two process groups); `stop()` ends both."""

    def __init__(self, cfg: TritonServeConfig, triton: subprocess.Popen, proxy: subprocess.Popen | None,
                 log_path: Path):
        self.cfg, self.triton, self.proxy, self.log_path = cfg, triton, proxy, log_path

    @property
    def key_file(self) -> Path:
        return self.cfg.work_dir / KEY_FILE

    @property
    def url(self) -> str:
        return self.cfg.url

    def client(self, timeout: float = 60.0) -> TritonClient:
        return TritonClient(self.cfg.url, key_file=self.key_file, timeout=timeout)

    def alive(self) -> bool:
        return self.triton.poll() is None and (self.proxy is None or self.proxy.poll() is None)

    def log_tail(self, n: int = 40, which: str = "triton") -> str:
        path = self.log_path if which == "triton" else self.cfg.work_dir / "proxy.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        for proc in (self.proxy, self.triton):
            if proc is not None:
                stop_process_group(proc, timeout=timeout)
                proc.wait()

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_triton(cfg: TritonServeConfig, wait_s: float = 120.0, env: Mapping[str, str] | None = None) -> TritonServer:
    """Start tritonserver (loopback) and its proxy; wait until /v2/health/ready answers through the proxy."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    cfg.repository.mkdir(parents=True, exist_ok=True)
    (cfg.work_dir / KEY_FILE).unlink(missing_ok=True)  # a stale file would carry dead keys
    backends = backend_directory(cfg.work_dir)
    log_path = cfg.work_dir / "triton.log"
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        triton = subprocess.Popen(triton_command(cfg, backends), cwd=cfg.work_dir, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=devnull, start_new_session=True,
                                  env=triton_env(env))
    server = TritonServer(cfg, triton, None, log_path)
    try:
        with open(cfg.work_dir / "proxy.log", "ab") as log, open(os.devnull, "rb") as devnull:
            server.proxy = subprocess.Popen(
                [sys.executable, "-m", "flywheel.serving.triton_proxy", "--listen", f"{cfg.proxy_host}:{cfg.proxy_port}",
                 "--triton", cfg.triton_url, "--metrics", cfg.metrics_url, "--key-file", str(server.key_file),
                 "--routes", str(cfg.work_dir / ROUTES_FILE), "--token-expiration-min", str(cfg.token_expiration_min)],
                cwd=cfg.work_dir, stdout=log, stderr=subprocess.STDOUT, stdin=devnull, start_new_session=True)
        _wait_ready(server, wait_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: TritonServer, wait_s: float) -> None:
    import requests

    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        if server.triton.poll() is not None:
            raise FlywheelError(f"tritonserver exited with {server.triton.returncode}; log:\n{server.log_tail()}")
        if server.proxy is not None and server.proxy.poll() is not None:
            raise FlywheelError(f"the Triton proxy exited with {server.proxy.returncode}; log:\n"
                                f"{server.log_tail(which='proxy')}")
        if server.key_file.exists():
            try:
                r = server.client(timeout=5).ready()
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except (requests.RequestException, FlywheelError, ValueError) as exc:
                last = str(exc)
        time.sleep(0.25)
    raise FlywheelError(f"triton not ready after {wait_s:.0f}s ({last}); log:\n{server.log_tail()}")


# ------------------------------------------------------------------------------------------ client
@dataclass
class PredictResponse:
    """What `TritonClient.predict` returns: a status and the TorchServe handler's JSON answer."""

    status_code: int
    body: object
    raw: object = field(default=None, repr=False)  # the KServe v2 response (requests.Response)

    def json(self):
        return self.body

    @property
    def text(self) -> str:
        return json.dumps(self.body)

    @property
    def content(self) -> bytes:
        return self.text.encode()


def encode_infer_request(images: list[bytes], parameters: Mapping[str, object] | None = None,
                         outputs: tuple[str, ...] = ()) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-extension request: a JSON header, then `images` as one BYTES tensor [n, 1]
    (each element a 4-byte little-endian length and the bytes). Returns (body, headers)."""
    blob = b"".join(len(b).to_bytes(4, "little") + b for b in images)
    header = {"inputs": [{"name": "image", "shape": [len(images), 1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(blob)}}]}
    if outputs:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": False}} for o in outputs]
    if parameters:
        header["parameters"] = dict(parameters)
    head = json.dumps(header).encode()
    return head + blob, {"Content-Type": "application/octet-stream",
                         "Inference-Header-Content-Length": str(len(head))}


def decode_outputs(body: dict) -> dict[str, list]:
    """{output name: its flat data list} of a KServe v2 JSON response."""
    return {o["name"]: o.get("data", []) for o in body.get("outputs", [])}


class TritonClient:
    """Authenticated client of a Triton behind the proxy: KServe v2 inference, model control, routes.

    Keys come from `key_file` (the proxy's key_file.json, re-read when a key is rejected, like
    TorchServeClient) or are given once (`inference_key`/`management_key`)."""

    def __init__(self, url: str, *, key_file: Path | None = None, inference_key: str | None = None,
                 management_key: str | None = None, timeout: float = 60.0):
        import requests

        self.url = url.rstrip("/")
        self.inference_url = self.url
        self.key_file = Path(key_file) if key_file else None
        self._keys = {"inference": inference_key, "management": management_key}
        self._lock = threading.Lock()
        self.timeout = timeout
        self.session = requests.Session()

    def _key(self, kind: str, reload: bool = False) -> str | None:
        from flywheel.serving.keys import read_keys

        if self.key_file is None:
            return self._keys.get(kind)
        with self._lock:
            if reload or self._keys.get(kind) is None:
                self._keys.update(read_keys(self.key_file))
            return self._keys.get(kind)

    def _call(self, kind: str, method: str, path: str, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        extra = dict(kwargs.pop("headers", None) or {})
        key = self._key(kind)
        for attempt in range(2):  # a key renewed since it was read: re-read the file once
            headers = {**extra, **({"Authorization": f"Bearer {key}"} if key else {})}
            r = self.session.request(method, f"{self.url}{path}", headers=headers, **kwargs)
            if r.status_code != 401 or self.key_file is None or attempt:
                return r
            fresh = self._key(kind, reload=True)
            if fresh == key:
                return r
            key = fresh
        return r

    def explain(self, r, kind: str = "inference") -> str:
        if r.status_code == 401:
            source = f"key file {self.key_file}" if self.key_file else "the token given"
            return (f"authentication failed: the Triton proxy rejected the {kind} key (HTTP 401) from {source}; "
                    "use the server's current key_file.json")
        try:
            message = r.json().get("error", r.text)
        except (ValueError, AttributeError):
            message = r.text
        return f"HTTP {r.status_code} {str(message)[:300]}"

    def _raise_for(self, r, what: str, kind: str = "management") -> None:
        if r.status_code >= 400:
            raise FlywheelError(f"triton {what} failed: {self.explain(r, kind)}")

    # health and inference (inference key)
    def ready(self):
        return self._call("inference", "GET", "/v2/health/ready")

    def model_ready(self, model: str, version: str | None = None) -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        return self._call("inference", "GET", path).status_code == 200

    def infer(self, model: str, images: list[bytes], version: str | None = None,
              parameters: Mapping[str, object] | None = None, headers: dict | None = None,
              outputs: tuple[str, ...] = ()):
        """POST a KServe v2 request with `images` as the BYTES input; the raw response."""
        body, base = encode_infer_request(images, parameters, outputs)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        return self._call("inference", "POST", path, data=body, headers={**base, **(headers or {})})

    def predict(self, model: str, data: bytes | dict | list, version: str | None = None,
                headers: dict | None = None, **kwargs) -> PredictResponse:
        """TorchServeClient.predict's contract over KServe v2: raw image bytes → one prediction;
        {"image": b64} → one; {"images": [b64, ...], "top_k": k} or a list → {"model", "version",
        "predictions"}. Errors come back as {"error", "code"} with Triton's status."""
        import base64
        import binascii

        single, top_k = True, None
        try:
            if isinstance(data, (bytes, bytearray)):
                images = [bytes(data)]
            elif isinstance(data, dict) and "image" in data:
                images = [base64.b64decode(data["image"], validate=True)]
                top_k = data.get("top_k")
            else:
                values = data.get("images") if isinstance(data, dict) else data
                top_k = data.get("top_k") if isinstance(data, dict) else None
                if not isinstance(values, list) or not values:
                    return PredictResponse(400, {"error": "'images' must be a non-empty list of base64 strings",
                                                 "code": 400})
                images, single = [base64.b64decode(v, validate=True) for v in values], False
        except (binascii.Error, TypeError, ValueError):
            return PredictResponse(400, {"error": "images must be base64 strings", "code": 400})
        params = {"top_k": top_k} if top_k is not None else None
        r = self.infer(model, images, version, params, headers, outputs=("prediction",))
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:300]}
        if r.status_code != 200:
            message = body.get("error", r.text[:300]) if isinstance(body, dict) else r.text[:300]
            return PredictResponse(r.status_code, {"error": message, "code": r.status_code}, r)
        preds = [json.loads(p) for p in decode_outputs(body).get("prediction", [])]
        if single:
            return PredictResponse(200, preds[0], r)
        return PredictResponse(200, {"model": model, "version": str(body.get("model_version", "")),
                                     "predictions": preds}, r)

    def metrics(self) -> str:
        r = self._call("inference", "GET", "/metrics")
        self._raise_for(r, "metrics", "inference")
        return r.text

    # model control (management key)
    def index(self) -> list[dict]:
        r = self._call("management", "POST", "/v2/repository/index", json={})
        self._raise_for(r, "repository index")
        return r.json()

    def load(self, model: str):
        return self._call("management", "POST", f"/v2/repository/models/{model}/load", json={}, timeout=300)

    def unload(self, model: str):
        return self._call("management", "POST", f"/v2/repository/models/{model}/unload", json={}, timeout=120)

    def loaded_versions(self, model: str) -> list[str]:
        """Versions of `model` Triton serves now (READY), ascending."""
        ready = {str(m.get("version")) for m in self.index()
                 if m.get("name") == model and m.get("state") == "READY" and m.get("version")}
        return sorted(ready, key=int)

    def default(self, model: str) -> str | None:
        r = self._call("management", "GET", f"/flywheel/models/{model}/default")
        self._raise_for(r, f"default of {model}")
        return r.json().get("default")

    def set_default(self, model: str, version: str):
        """Route unversioned requests for `model` to `version` (the proxy's atomic switch)."""
        return self._call("management", "PUT", f"/flywheel/models/{model}/default", params={"version": version})

    def clear_default(self, model: str):
        return self._call("management", "DELETE", f"/flywheel/models/{model}/default")


class TritonEndpoint:
    """A Triton (through its proxy) plus its model repository on this filesystem, with the management
    verbs a release uses on TorchServe (`versions`, `register`, `set_default`, `unregister`), in
    Triton's terms: a version is served when the model's version_policy names it and a load of the
    model made it READY; the default is the proxy's route (Triton's own: the highest version)."""

    def __init__(self, client: TritonClient, repository: Path, load_timeout_s: float = 300.0):
        self.client = client
        self.repository = Path(repository)
        self.load_timeout_s = load_timeout_s
        self.inference_url = client.url

    def _config(self, model: str) -> Path:
        return self.repository / model / "config.pbtxt"

    def versions(self, model: str) -> dict[str, bool]:
        """{version: is_default} for every READY version of `model` ({} when none)."""
        loaded = self.client.loaded_versions(model)
        default = self.client.default(model)
        if default not in loaded:  # no route (or a stale one): Triton's own default, the highest
            default = loaded[-1] if loaded else None
        return {v: v == default for v in loaded}

    def _serve(self, model: str, versions: list[str]) -> PredictResponse:
        """Make exactly `versions` of `model` served: version_policy, then a load (or an unload)."""
        if not versions:
            r = self.client.unload(model)
            return PredictResponse(r.status_code, _body(r), r)
        set_versions(self._config(model), versions)
        r = self.client.load(model)
        if r.status_code != 200:
            return PredictResponse(r.status_code, _body(r), r)
        missing = [v for v in versions if not self.client.model_ready(model, v)]
        if missing:
            return PredictResponse(503, {"error": f"{model} version(s) {', '.join(missing)} not ready after load"}, r)
        return PredictResponse(200, {"model": model, "versions": versions}, r)

    def register(self, model: str, version: str) -> PredictResponse:
        """Load `version` beside the versions served now (their clients are not interrupted)."""
        if not (self.repository / model / str(version)).is_dir():
            return PredictResponse(404, {"error": f"{self.repository / model / str(version)} does not exist: "
                                                  "flywheel package --engine triton first"})
        return self._serve(model, sorted({*self.client.loaded_versions(model), str(version)}, key=int))

    def unregister(self, model: str, version: str) -> PredictResponse:
        """Stop serving `version` (and drop the route to it); the other versions stay."""
        if self.client.default(model) == str(version):
            self.client.clear_default(model)
        return self._serve(model, [v for v in self.client.loaded_versions(model) if v != str(version)])

    def set_default(self, model: str, version: str):
        return self.client.set_default(model, version)

    def predict(self, *args, **kwargs) -> PredictResponse:
        return self.client.predict(*args, **kwargs)

    def explain(self, r, kind: str = "inference") -> str:
        return self.client.explain(r, kind)


def _body(r) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {"error": r.text[:300]}
    return body if isinstance(body, dict) else {"result": body}
