"""TorchServe handler for Flywheel models: image bytes or base64 JSON in, top-k JSON out.

Shipped inside every .mar beside `preprocessing.py`, `manifest.py` (and `capture.py` when present),
so it imports only stdlib, numpy, torch, onnxruntime, Pillow, TorchServe and those modules.

Request forms (one request may carry one image, or a list of images in JSON):
  * raw PNG/JPEG bytes (any Content-Type but JSON/text)
  * JSON {"image": "<base64>"}  or  {"images": ["<base64>", ...], "top_k": 3}

Each request in a TorchServe batch succeeds or fails on its own: a bad request gets a 4xx JSON
error `{"error": ..., "code": ...}` while the rest of the batch is served, and the worker never
raises because of input.

Configuration (env wins over the archive's model-config.yaml `handler:` section):
  FLYWHEEL_CAPTURE_URI / capture_uri       where served traffic is captured (off when unset)
  FLYWHEEL_CAPTURE_SAMPLE / capture_sample fraction of predictions captured (default 1.0)
  FLYWHEEL_CAPTURE_TIMEOUT / capture_timeout seconds one upload may take before its batch is dropped (5)
A request with header `X-Flywheel-Traffic: acceptance|warmup|benchmark` (release checks, load tests)
is captured with that mark in its record's `traffic` field (absent header: "live"); the monitor and
`data snapshot` read live traffic only, and the store keeps the rest as an audit trail.
  FLYWHEEL_TOP_K / top_k                   default number of labels returned (default 3)
  FLYWHEEL_ORT_THREADS / ort_threads       ONNX Runtime threads per worker (default 1)
  max_images_per_request                   JSON list limit (default 64)
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

try:  # inside a .mar the shared modules sit beside this file
    import manifest as _manifest
    import preprocessing as _pp
except ImportError:  # in the repository (unit tests) they live in the flywheel package
    from flywheel.contracts import manifest as _manifest
    from flywheel.contracts import preprocessing as _pp

try:
    import capture as _capture
except ImportError:
    try:
        from flywheel.contracts import capture as _capture
    except ImportError:  # capture is optional: serving works without it
        _capture = None

logger = logging.getLogger(__name__)

LATENCY_METRIC = "FlywheelInferenceLatency"
CONFIDENCE_METRIC = "FlywheelPredictionConfidence"
# Each backend metric value is a log line (a write to the worker's stdout, carrying the batch's
# request ids) that the Java frontend parses: one per prediction cost the worker more than the model
# at 16 clients, and <=4 per batch still cost ~a tenth of the worker's CPU per request (benchmarks/README.md). The
# histogram gets every CONFIDENCE_SAMPLE_EVERY-th prediction the worker answers, the first one
# included (systematic sampling: uniform over predictions whatever the batch sizes, so its shape is
# unbiased); counts come from TorchServe's request metrics.
CONFIDENCE_SAMPLE_EVERY = 8
# The per-batch metrics (TorchServe's HandlerTime gauge and FlywheelInferenceLatency's histogram) come
# from every BATCH_METRICS_EVERY-th batch of the worker, the first included: they were most of the
# metric lines this handler added per batch, each one a log line the frontend parses. The gauge still
# shows a recent batch's value and the histogram an unbiased sample of batches; TorchServe's own
# PredictionTime gauge (the worker's time per batch) still comes from every batch.
BATCH_METRICS_EVERY = 8
CAPTURE_DROPPED_METRIC = "FlywheelCaptureDropped"  # captures lost (queue full, store failing)
CAPTURE_WRITTEN_METRIC = "FlywheelCaptureWritten"


def ort_providers(device: torch.device) -> list:
    """ONNX Runtime's providers for a worker on `device`. On a GPU, the CUDA provider on the worker's own
    GPU: TorchServe gives each worker a `gpu_id` round-robin, and a provider without `device_id` would put
    every worker's session on GPU 0 (as TorchServe's own `setup_ort_session` does). CPU as the fallback."""
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class RequestError(Exception):
    """A client error in one request of a batch: becomes that request's 4xx JSON response."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Batch:
    """Preprocessed batch: valid images stacked, per-request slices, and per-request errors."""

    images: list = field(default_factory=list)  # decoded uint8 (H, W) or (H, W, 3) arrays (spec's layout)
    pngs: list = field(default_factory=list)  # per image: its request bytes if already a PNG of it, else None
    slices: list = field(default_factory=list)  # per request: (start, stop, single, top_k) or RequestError
    inputs: np.ndarray | None = None  # normalised float32 (N, C, H, W), the model's input


def _image_bytes_from_b64(value, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"{where} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:  # tolerate data URLs
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where} is not valid base64") from None


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class FlywheelHandler(BaseHandler):
    """BaseHandler loads the TorchScript/ONNX artifact; this adds checksum, decoding, top-k, capture."""

    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        self.fw_manifest = _manifest.Manifest.read(model_dir)
        artifact = self.fw_manifest.artifact
        path = os.path.join(model_dir, artifact["file"])
        # Refuse to serve bytes that are not the ones packaged and parity-checked.
        try:
            self.fw_manifest.verify(model_dir)
        except _manifest.ChecksumMismatch as exc:
            raise RuntimeError(f"refusing to serve: {exc} (archive corrupted or tampered with)") from None
        self.format = artifact["format"]
        if self.format == "tensorrt":
            self._init_tensorrt(context, path)
        else:
            super().initialize(context)  # .pt → torch.jit.load, .onnx → onnxruntime session
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        threads = int(os.environ.get("FLYWHEEL_ORT_THREADS") or cfg.get("ort_threads", 1))
        if getattr(self, "map_location", "cpu") != "cuda":
            # Workers share the box with the Java frontend and each other: torch's default pool (one
            # spinning thread per core) burnt more CPU than the model (measured in benchmarks/serving.py).
            torch.set_num_threads(threads)
        if self.format == "onnx":
            self.model = self._ort_session(path, threads)
        self._predictions_seen = 0  # the confidence metric samples every CONFIDENCE_SAMPLE_EVERY-th
        self._batches_seen = 0  # the per-batch metrics sample every BATCH_METRICS_EVERY-th
        self._batch_metrics = True  # whether this batch reports them
        self.class_names = list(self.fw_manifest.class_names)
        self.spec = _pp.PreprocessSpec.from_dict(self.fw_manifest.preprocess)
        self.top_k = int(os.environ.get("FLYWHEEL_TOP_K") or cfg.get("top_k", 3))
        self.max_images = int(cfg.get("max_images_per_request", 64))
        self.model_label = self.fw_manifest.model_name
        self.version = self.fw_manifest.model_version
        self.capture = None
        self._capture_reported: dict[str, int] = {}
        if _capture is not None:
            self.capture = _capture.writer_from_config(cfg)
        elif os.environ.get("FLYWHEEL_CAPTURE_URI") or cfg.get("capture_uri"):
            logger.warning("capture URI set but capture.py is not in this archive; not capturing")
        logger.info("flywheel handler ready: %s v%s (%s, sha256 ok)", self.model_label, self.version, self.format)
        self.initialized = True

    def _ort_session(self, path: str, threads: int):
        """BaseHandler's session uses every core with spinning threads, which starve the Java frontend;
        one non-spinning thread per worker measured 104 vs 52 req/s at 16 clients and p50 8.0 vs
        11.7 ms at 1 client (2 busy cores)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, options, providers=ort_providers(self.device))

    def _init_tensorrt(self, context, path):
        """Deserialize a TensorRT engine (only packaged when tensorrt + CUDA were present)."""
        import tensorrt as trt

        gpu = context.system_properties.get("gpu_id") or 0
        self.device = torch.device(f"cuda:{gpu}")
        self.manifest = context.manifest
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(path, "rb") as f:
            self.model = runtime.deserialize_cuda_engine(f.read())
        self.trt_context = self.model.create_execution_context()

    def handle(self, data, context):
        """BaseHandler.handle, whose HandlerTime metric (one log line the frontend parses) now comes
        from every BATCH_METRICS_EVERY-th batch; describe, explain and the profiler go to it as before."""
        seen = getattr(self, "_batches_seen", 0)
        self._batch_metrics, self._batches_seen = seen % BATCH_METRICS_EVERY == 0, seen + 1
        self.context = context
        if self._batch_metrics or os.environ.get("ENABLE_TORCH_PROFILER") or self._is_describe() or self._is_explain():
            return super().handle(data, context)
        return self.postprocess(self.inference(self.preprocess(data)))

    # ------------------------------------------------------------------------------- preprocess
    def _decode_request(self, row, pngs: list | None = None) -> tuple[list, bool, int]:
        """One request → (images, single, top_k); raises RequestError naming the problem. `pngs`, when
        given, receives each image's request bytes if they already are a PNG of it, else None."""
        value = row.get("data") if isinstance(row, dict) else None
        if value is None and isinstance(row, dict):
            value = row.get("body")
            if value is None and row:
                value = next(iter(row.values()))
        if value is None or (isinstance(value, (bytes, bytearray, str)) and len(value) == 0):
            raise RequestError(400, "empty request: send PNG/JPEG bytes or JSON {\"image\": \"<base64>\"}")
        if isinstance(value, (bytes, bytearray)):
            head = bytes(value[:64]).lstrip()
            if head[:1] in (b"{", b"["):  # TorchServe forwards undecodable JSON as bytes
                try:
                    value = json.loads(bytes(value).decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise RequestError(400, f"malformed JSON body: {exc}") from None
            else:
                return [self._decode_image(bytes(value), "body", pngs)], True, self.top_k
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise RequestError(400, "text body is neither JSON nor an image: send PNG/JPEG bytes or "
                                        "JSON {\"image\": \"<base64>\"}") from None
        top_k = self.top_k
        if isinstance(value, dict):
            if "top_k" in value:
                k = value["top_k"]
                if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(self.class_names):
                    raise RequestError(400, f"top_k must be an integer in 1..{len(self.class_names)}")
                top_k = k
            if "image" in value:
                data = _image_bytes_from_b64(value["image"], "'image'")
                return [self._decode_image(data, "'image'", pngs)], True, top_k
            if "images" in value:
                value = value["images"]
            else:
                raise RequestError(400, "JSON must have 'image' (base64 string) or 'images' (list of base64 "
                                        f"strings); got keys {sorted(value)[:5]}")
        if not isinstance(value, list):
            raise RequestError(400, f"JSON must be an object or a list of base64 strings, not {type(value).__name__}")
        if not value:
            raise RequestError(400, "'images' is empty")
        if len(value) > self.max_images:
            raise RequestError(413, f"too many images: {len(value)} > limit {self.max_images} per request")
        images = [self._decode_image(_image_bytes_from_b64(v, f"images[{i}]"), f"images[{i}]", pngs)
                  for i, v in enumerate(value)]
        return images, False, top_k

    def _decode_image(self, data: bytes, where: str, pngs: list | None = None) -> np.ndarray:
        try:
            pixels, png = _pp.decode_image_and_png(data, self.spec)
        except _pp.InvalidImage as exc:
            raise RequestError(exc.status, f"{where}: {exc}") from None
        if pngs is not None:
            pngs.append(png)
        return pixels

    def preprocess(self, data):
        batch = _Batch()
        for row in data:
            pngs: list = []  # this request's; kept only if all of its images decode
            try:
                images, single, top_k = self._decode_request(row, pngs)
            except RequestError as exc:
                batch.slices.append(exc)
                continue
            except Exception as exc:
                logger.warning("unexpected error decoding a request", exc_info=True)
                batch.slices.append(RequestError(400, f"could not read request: {type(exc).__name__}"))
                continue
            start = len(batch.images)
            batch.images.extend(images)
            batch.pngs.extend(pngs)
            batch.slices.append((start, len(batch.images), single, top_k))
        if batch.images:
            batch.inputs = _pp.to_array(np.stack(batch.images), self.spec)
        return batch

    # -------------------------------------------------------------------------------- inference
    def inference(self, batch, *args, **kwargs):
        if batch.inputs is None:
            return batch, None, None
        start = time.perf_counter()
        if self.format == "onnx":  # numpy in, numpy out: no torch op on the hot path
            logits, emb = self.model.run(None, {self.model.get_inputs()[0].name: batch.inputs})
        else:
            with torch.inference_mode():
                x = torch.from_numpy(batch.inputs)
                if self.format == "tensorrt":
                    logits, emb = self._run_tensorrt(x)
                else:
                    logits, emb = self.model(x.to(self.device))
                logits, emb = logits.float().cpu().numpy(), emb.float().cpu().numpy()
        probs = _softmax(logits.astype(np.float32, copy=False))
        if getattr(self, "_batch_metrics", True):
            self._metric(LATENCY_METRIC, (time.perf_counter() - start) * 1000.0, "ms")
        return batch, probs, emb

    def _run_tensorrt(self, x: torch.Tensor):
        engine, ctx = self.model, self.trt_context
        x = x.to(self.device).contiguous()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ctx.set_input_shape(names[0], tuple(x.shape))
        outputs = {}
        for name in names[1:]:
            shape = tuple(ctx.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        ctx.set_tensor_address(names[0], x.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        ctx.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return outputs["logits"], outputs["embedding"]

    # ------------------------------------------------------------------------------ postprocess
    def postprocess(self, result):
        batch, probs, emb = result
        out = []
        owners, ks = [], []  # per prediction row: the batch index of the request it answers, its top_k
        for idx, item in enumerate(batch.slices):
            if not isinstance(item, RequestError):
                start, stop, _, top_k = item
                owners.extend([idx] * (stop - start))
                ks.extend([top_k] * (stop - start))
        # One answer per image (row i answers batch.images[i]), built for the whole batch at once.
        preds = _capture.answers(self.model_label, self.version, self.class_names, probs, ks) if ks else []
        for idx, item in enumerate(batch.slices):
            if isinstance(item, RequestError):
                self._respond(idx, item.code)
                out.append(json.dumps({"error": item.message, "code": item.code}))
                continue
            start, stop, single, _ = item
            if self.capture is not None:
                traffic = self._traffic(idx)
                for i in range(start, stop):
                    self._capture_answer(preds[i], batch.images[i], emb[i], probs[i], traffic, batch.pngs[i])
            self._respond(idx, 200)
            if single:
                out.append(json.dumps(preds[start]))
            else:
                out.append(json.dumps({"model": self.model_label, "version": self.version,
                                       "predictions": preds[start:stop]}))
        self._confidence_metrics(probs, owners)
        self._capture_metrics()
        return out

    def _confidence_metrics(self, probs: np.ndarray | None, owners: list[int]) -> None:
        """Observe the top-1 probability of every CONFIDENCE_SAMPLE_EVERY-th prediction, each tagged
        with its own request's id (not the whole batch's)."""
        if probs is None or not len(probs):
            return
        first = -self._predictions_seen % CONFIDENCE_SAMPLE_EVERY
        self._predictions_seen += len(probs)
        for row in range(first, len(probs), CONFIDENCE_SAMPLE_EVERY):
            self._metric(CONFIDENCE_METRIC, float(probs[row].max()), "ratio", MetricTypes.HISTOGRAM,
                         idx=owners[row] if row < len(owners) else None)

    def _capture_metrics(self) -> None:
        """Publish the capture writer's new drops/writes as counters, so a failing store shows up in
        Prometheus at once rather than when the writer's own stats reach the store again."""
        if getattr(self, "capture", None) is None:
            return
        stats = self.capture.stats()
        for name, key in ((CAPTURE_DROPPED_METRIC, "dropped"), (CAPTURE_WRITTEN_METRIC, "written")):
            delta = stats[key] - self._capture_reported.get(key, 0)
            if delta > 0:
                self._metric(name, float(delta), "count", MetricTypes.COUNTER)
                self._capture_reported[key] = stats[key]

    def _respond(self, idx: int, code: int) -> None:
        if self.context is None:
            return
        self.context.set_response_content_type(idx, "application/json")
        if code != 200:
            self.context.set_response_status(code, "Bad Request" if code == 400 else "Client Error", idx)

    def _traffic(self, idx: int) -> str | None:
        """The request's traffic mark (X-Flywheel-Traffic), looked up only when capturing."""
        if self.capture is None or self.context is None:
            return None
        try:
            headers = self.context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, KeyError, TypeError):  # no request context (unit tests)
            return None
        wanted = _capture.TRAFFIC_HEADER.lower()
        value = next((v for k, v in headers.items() if str(k).lower() == wanted), None)
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        return _capture.traffic_kind(value if isinstance(value, str) else None)  # a dict: a body part's headers

    def _capture_answer(self, pred: dict, image: np.ndarray, emb: np.ndarray, probs: np.ndarray,
                        traffic: str | None, png: bytes | None = None) -> None:
        """Capture one answer; `png`: the request's own bytes when already a PNG of `image`, else it is
        encoded, and only if the writer keeps the record (submit calls the builder after sampling)."""
        if self.capture is not None:  # submit never blocks or raises
            self.capture.submit(lambda: _capture.record_of(pred, _pp.capture_png(image, png), emb, probs,
                                                           traffic or _capture.LIVE))

    def _metric(self, name: str, value: float, unit: str, kind=MetricTypes.HISTOGRAM, idx: int | None = None) -> None:
        """One backend metric value; `idx` (a request's index in the batch) tags it with that request's
        id, else it carries the whole batch's ids."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        try:
            dims = [Dimension("ModelName", self.model_label), Dimension("Level", "Model")]
            metrics.add_metric(name, value, unit, idx, dims, kind)
        except Exception:
            logger.debug("metric %s not recorded", name, exc_info=True)


_service: FlywheelHandler | None = None


def handle(data, context):
    """Archive entry point (`--handler handler.py:handle`): a module-level function, because
    TorchServe's class lookup wants exactly one class per handler module and this one has helpers."""
    global _service
    if _service is None:
        service = FlywheelHandler()
        service.initialize(context)  # raises (worker refuses to load) on a checksum mismatch
        _service = service
    if data is None:  # TorchServe's load-time call
        return None
    return _service.handle(data, context)
