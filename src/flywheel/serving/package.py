"""`flywheel package`: a registry version → parity-checked serving artifacts → a TorchServe .mar.

The served network returns (logits, embedding) so the handler can answer top-k and hand the
embedding to the capture writer. The component logged both serving files (TorchScript and ONNX,
each checked against eager PyTorch then: flywheel.component.log); packaging needs neither the
component's code nor its data loader. It loads them from the registry, checks the ONNX file against
the TorchScript one again on a held batch of the version's own labelled test set, and builds a
TensorRT FP16 engine from the ONNX file only where `tensorrt` and CUDA exist. The artifact served is
recorded in the archive's manifest (contracts/manifest.py) together with its sha256, which the
handler verifies on load.

`package_triton` (`flywheel package --engine triton`) runs the same download and checks
(`prepare_version`) and writes Triton version folders instead of a .mar (serving/triton.py).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from flywheel.component.export import HELD_BATCH, PARITY_TOL, ExportResult, max_diff, onnx_outputs
from flywheel.contracts.manifest import MANIFEST_FILE, Manifest, sha256_file
from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError

log = logging.getLogger(__name__)
__all__ = ["PARITY_TOL", "sha256_file", "package_version"]  # PARITY_TOL, sha256_file: re-exported for callers
TRT_PARITY_TOL = 5e-2  # fp16 engine: probabilities within this max abs diff
FORMATS = ("auto", "onnx", "torchscript", "tensorrt")


@dataclass(frozen=True)
class PackageConfig:
    """What to package and how it is served (written into model-config.yaml)."""

    model_name: str
    version: str | None = None
    alias: str | None = None
    out_dir: Path | None = None  # default: $FLYWHEEL_HOME/model-store
    artifact_format: str = "auto"  # auto: tensorrt when built, else onnx (fastest on CPU, measured)
    batch_size: int = 16
    max_batch_delay_ms: int = 1  # short: a lone client waits little, batching stays on (benchmarks/README.md)
    workers: int = 1
    response_timeout_s: int = 30
    top_k: int = 3
    ort_threads: int = 1  # per worker; see the handler's _ort_session
    capture_uri: str | None = None  # baked default; env FLYWHEEL_CAPTURE_URI on the server wins
    capture_sample: float = 1.0


@dataclass(frozen=True)
class PackageResult:
    mar_path: Path
    manifest: Manifest = field(repr=False)

    @property
    def version(self) -> str:
        return self.manifest.model_version


def resolve_version(settings: Settings, name: str, version: str | None = None, alias: str | None = None):
    """The registry ModelVersion named by exactly one of version or alias."""
    from flywheel.core.registry import Registry

    return Registry(settings).resolve(name, version, alias)


def held_batch(spec, settings: Settings, n: int = HELD_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """The first n images of the version's labelled test set: the same held batch for every export."""
    from flywheel.core.models import read_test_set

    images, labels = read_test_set(spec, settings.tracking_uri)
    return images[:n], labels[:n]


def tensorrt_unavailable() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    import torch

    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def export_tensorrt(onnx_path: Path, example, reference_probs: np.ndarray, directory: Path) -> ExportResult:
    """Build an FP16 engine from the ONNX file with TensorRT's builder and check its probabilities."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FlywheelError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = tuple(example.shape[1:])
    profile.set_shape("images", (1, *shape), (16, *shape), (max(64, example.shape[0]), *shape))
    config.add_optimization_profile(profile)
    engine_bytes = builder.build_serialized_network(network, config)
    if engine_bytes is None:
        raise FlywheelError("TensorRT failed to build an engine (see its log above)")
    path = directory / "model.engine"
    path.write_bytes(bytes(engine_bytes))
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    ctx = engine.create_execution_context()
    x = example.cuda().contiguous()
    ctx.set_input_shape("images", tuple(x.shape))
    outs = {n: torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=torch.float32, device="cuda")
            for n in ("logits", "embedding")}
    ctx.set_tensor_address("images", x.data_ptr())
    for n, t in outs.items():
        ctx.set_tensor_address(n, t.data_ptr())
    stream = torch.cuda.current_stream()
    ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    probs = torch.softmax(outs["logits"].float(), 1).cpu().numpy()
    diff = float(np.abs(probs - reference_probs).max())
    return ExportResult("tensorrt", path.name, sha256_file(path), diff)


def _check(result: ExportResult, tol: float) -> None:
    if result.max_abs_diff is None or not result.max_abs_diff <= tol:
        raise FlywheelError(f"{result.format} export does not match eager PyTorch on the held batch: max abs "
                            f"diff {result.max_abs_diff} > {tol}; the artifact would serve different answers, "
                            "so nothing was packaged")


def choose_artifact(requested: str, exports: dict[str, ExportResult]) -> ExportResult:
    if requested not in FORMATS:
        raise FlywheelError(f"unknown artifact format {requested!r}; choose one of {', '.join(FORMATS)}")
    if requested == "auto":
        # ONNX Runtime answers single images far sooner than TorchScript on the CPU.
        requested = "tensorrt" if exports.get("tensorrt") and not exports["tensorrt"].skipped else "onnx"
    chosen = exports.get(requested)
    if chosen is None or chosen.skipped:
        reason = chosen.skipped if chosen else "not exported"
        raise FlywheelError(f"artifact format {requested!r} is not available here ({reason}); use --format onnx")
    return chosen


def model_config_yaml(cfg: PackageConfig) -> str:
    import yaml

    handler = {"top_k": cfg.top_k, "max_images_per_request": 64, "ort_threads": cfg.ort_threads}
    if cfg.capture_uri:
        handler.update(capture_uri=cfg.capture_uri, capture_sample=cfg.capture_sample)
    return yaml.safe_dump({
        "minWorkers": cfg.workers, "maxWorkers": cfg.workers, "batchSize": cfg.batch_size,
        "maxBatchDelay": cfg.max_batch_delay_ms, "responseTimeout": cfg.response_timeout_s,
        "handler": handler,
    }, sort_keys=False)


def _archiver() -> str:
    exe = Path(sys.executable).with_name("torch-model-archiver")
    found = str(exe) if exe.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise FlywheelError("torch-model-archiver not found: pip install torch-model-archiver==0.12.0")
    return found


def build_mar(staging: Path, artifact: str, name: str, version: str, out_dir: Path) -> Path:
    """Run torch-model-archiver over the staged files; the archive is named NAME-VERSION.mar."""
    extra = sorted(p.name for p in staging.iterdir()
                   if p.name not in (artifact, "handler.py", "model-config.yaml") and p.is_file())
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        export = Path(tmp) / "export"
        export.mkdir()
        cmd = [_archiver(), "--model-name", name, "--version", version,
               "--serialized-file", str(staging / artifact), "--handler", str(staging / "handler") + ":handle",
               "--extra-files", ",".join(str(staging / e) for e in extra),
               "--config-file", str(staging / "model-config.yaml"), "--export-path", str(export), "--force"]
        # The archiver stages files in $TMPDIR/<model-name>: a private TMPDIR lets packagings run at once.
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if proc.returncode != 0:
            raise FlywheelError(f"torch-model-archiver failed: {proc.stderr.strip() or proc.stdout.strip()}")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{name}-{version}.mar"
        shutil.move(str(export / f"{name}.mar"), target)
    return target


def stage_files(staging: Path, manifest: Manifest | dict, class_names: list[str], cfg: PackageConfig) -> None:
    """Handler, shared serving-safe modules, class names, manifest and model-config beside the artifact.
    (A plain dict manifest is written as given: the layout test stages the Python files only.)"""
    from flywheel.serving import CONTRACTS_DIR, HANDLER_FILE, MAR_CONTRACTS

    shutil.copy(HANDLER_FILE, staging / "handler.py")
    for name in MAR_CONTRACTS:  # the contracts the handler imports, beside it in the archive
        shutil.copy(CONTRACTS_DIR / name, staging / name)
    (staging / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(class_names)}))
    if isinstance(manifest, Manifest):
        manifest.write(staging)
    else:
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    (staging / "model-config.yaml").write_text(model_config_yaml(cfg))


def prepare_version(cfg: PackageConfig, settings: Settings, staging: Path,
                    keep: tuple[str, ...] = ()) -> tuple[Manifest, dict[str, ExportResult]]:
    """Download one registry version's serving files into `staging`, parity-check them on the held
    batch, build a TensorRT engine where possible, and describe the chosen artifact in a Manifest.
    Only the chosen artifact (and the formats in `keep`, when exported) stays in `staging`. Shared
    by the TorchServe archive (`package_version`) and the Triton repository (`package_triton`)."""
    import torch

    from flywheel.contracts.preprocessing import to_tensor
    from flywheel.core.models import load_local, model_dir
    from flywheel.core.registry import Registry

    registry = Registry(settings)
    mv = registry.resolve(cfg.model_name, cfg.version, cfg.alias)
    tags = registry.lineage(mv)
    uri = f"models:/{cfg.model_name}/{mv.version}"
    local = model_dir(uri, settings.tracking_uri)  # downloaded once: the TorchScript to check and both files to ship
    scripted, spec = load_local(local, uri)
    images, _ = held_batch(spec, settings)
    example = to_tensor(images, spec.preprocess)
    with torch.inference_mode():
        reference = tuple(t.numpy() for t in scripted(example))
    ref_probs = torch.softmax(torch.from_numpy(reference[0]), 1).numpy()

    started = time.perf_counter()
    exports = {}
    for fmt, target in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        found = next(local.rglob(spec.serving[fmt]), None)
        if found is None:
            raise FlywheelError(f"{uri} has no {spec.serving[fmt]}: it was not logged by flywheel.component")
        shutil.copy(found, staging / target)
    # TorchScript: its log-time diff from eager; ONNX: the worse of that and today's check against TorchScript.
    exports["torchscript"] = ExportResult("torchscript", "model.pt", sha256_file(staging / "model.pt"),
                                          spec.parity.get("torchscript", 0.0), exporter="torch.jit.trace")
    onnx_diff = max(spec.parity.get("onnx", 0.0), max_diff(onnx_outputs(staging / "model.onnx", example), reference))
    exports["onnx"] = ExportResult("onnx", "model.onnx", sha256_file(staging / "model.onnx"), onnx_diff)
    for result in exports.values():
        _check(result, PARITY_TOL)
    reason = tensorrt_unavailable()
    if reason is None:
        exports["tensorrt"] = export_tensorrt(staging / "model.onnx", example, ref_probs, staging)
        _check(exports["tensorrt"], TRT_PARITY_TOL)
    else:
        log.info("TensorRT engine skipped: %s", reason)
        exports["tensorrt"] = ExportResult("tensorrt", None, None, None, skipped=reason)
    chosen = choose_artifact(cfg.artifact_format, exports)
    for other in exports.values():  # only the served artifact (and those kept) goes into the archive
        if other.file and other.file != chosen.file and other.format not in keep:
            (staging / other.file).unlink(missing_ok=True)
    manifest = Manifest(
        model_name=cfg.model_name, model_version=str(mv.version), run_id=mv.run_id,
        git_commit=tags["git_commit"], git_dirty=tags["git_dirty"],
        dataset=tags["dataset"] or spec.dataset, dataset_digest=tags["dataset_digest"] or spec.dataset_digest,
        architecture=spec.name, class_names=list(spec.class_names),
        preprocess=spec.preprocess.to_dict(), embedding_dim=spec.embedding_dim,
        artifact={"file": chosen.file, "format": chosen.format, "sha256": chosen.sha256,
                  "requested": cfg.artifact_format},
        exports=[e.to_dict() for e in exports.values()],
        parity={"held_batch": f"{spec.test_set.uri}[:{len(images)}]", "tolerance": PARITY_TOL,
                "tensorrt_tolerance": TRT_PARITY_TOL},
        serving={"batch_size": cfg.batch_size, "max_batch_delay_ms": cfg.max_batch_delay_ms,
                 "workers": cfg.workers},
        packaged_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        export_seconds=round(time.perf_counter() - started, 2),
        embedding=asdict(spec.embedding),
    )
    return manifest, exports


def package_version(cfg: PackageConfig, settings: Settings) -> PackageResult:
    """Parity-check and archive one registry version's serving files; returns the .mar and its manifest."""
    staging = Path(tempfile.mkdtemp(prefix="flywheel-package-"))
    try:
        manifest, _ = prepare_version(cfg, settings, staging)
        stage_files(staging, manifest, list(manifest.class_names), cfg)
        out_dir = cfg.out_dir or settings.work_dir / "model-store"
        mar = build_mar(staging, manifest.artifact["file"], cfg.model_name, manifest.model_version, Path(out_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("packaged %s v%s as %s (%s)", cfg.model_name, manifest.model_version, mar, manifest.artifact["format"])
    return PackageResult(mar, manifest)


@dataclass(frozen=True)
class TritonPackageResult:
    repository: Path
    models: dict  # Triton model name → the version folder written
    manifest: Manifest = field(repr=False)

    @property
    def version(self) -> str:
        return self.manifest.model_version


def package_triton(cfg: PackageConfig, settings: Settings, repository: Path | None = None,
                   triton: object | None = None) -> TritonPackageResult:
    """`flywheel package --engine triton`: the same download and parity checks as the .mar, written
    as Triton version folders (serving/triton.py: Python backend, onnxruntime_onnx and, with a
    TensorRT engine, tensorrt_plan) into `repository` (default $FLYWHEEL_HOME/triton-repository).
    `triton` is a serving.triton.TritonModelConfig (batching, instances; default from `cfg`)."""
    from flywheel.serving.triton import TritonModelConfig, write_repository

    if cfg.artifact_format not in ("auto", "onnx"):
        raise FlywheelError(f"the Triton repository serves the ONNX file (and a TensorRT plan where one is built); "
                            f"--format {cfg.artifact_format} is for TorchServe archives")
    triton = triton or TritonModelConfig(max_queue_delay_us=cfg.max_batch_delay_ms * 1000, instances=cfg.workers,
                                         top_k=cfg.top_k, ort_threads=cfg.ort_threads,
                                         capture_uri=cfg.capture_uri, capture_sample=cfg.capture_sample)
    repository = Path(repository or settings.work_dir / "triton-repository")
    staging = Path(tempfile.mkdtemp(prefix="flywheel-package-"))
    try:
        manifest, exports = prepare_version(replace(cfg, artifact_format="onnx"), settings, staging, keep=("tensorrt",))
        engine = exports.get("tensorrt")
        models = write_repository(staging, manifest, repository, triton,
                                  engine_file=engine.file if engine is not None and not engine.skipped else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("packaged %s v%s into Triton repository %s (%s)", cfg.model_name, manifest.model_version, repository,
             ", ".join(models))
    return TritonPackageResult(repository, models, manifest)
