"""Triton Python-backend model for Flywheel models: image bytes (a BYTES tensor) in, top-k out.

`flywheel package --engine triton` copies this file as `<repository>/<model>/<version>/model.py`,
with the ONNX file, the manifest and the contracts it imports (serving.TRITON_CONTRACTS) beside it.
Triton's Python backend runs it in a stub process per version with no flywheel installed, so it
imports only the standard library, numpy, onnxruntime, Pillow (through preprocessing), Triton's
`triton_python_backend_utils` and the contracts beside it. It is the TorchServe handler's twin:
the same checksum check on load, the same decoding and normalisation (contracts/preprocessing.py),
the same answer fields and the same capture records (contracts/capture.py), so clients and the
monitor see no difference between the engines.

Protocol (KServe v2, `/v2/models/<model>[/versions/<v>]/infer`):
  input  `image`          BYTES [n, 1]  PNG/JPEG bytes, one image per row (n <= max_batch_size)
  outputs `label` BYTES, `label_index` INT64, `confidence` FP32, `prediction_id` BYTES, `version` BYTES
          (each [n, 1]), `probabilities` FP32 [n, classes], `prediction` BYTES [n, 1]: the JSON the
          TorchServe handler answers for one image (prediction_id, model, version, label, label_index,
          confidence, top_k).
  request parameters: `top_k` (int, labels in `prediction`), `x-flywheel-traffic` (the capture
          mark; Triton forwards the X-Flywheel-Traffic header as this parameter).
A request with an undecodable, empty or oversized image fails alone with INVALID_ARG (HTTP 400,
`{"error": ...}`); the other requests of the dynamic batch are served.

Configuration: config.pbtxt `parameters` (top_k, ort_threads, max_images_per_request, capture_uri,
capture_sample, capture_timeout); FLYWHEEL_CAPTURE_URI / FLYWHEEL_CAPTURE_SAMPLE / FLYWHEEL_CAPTURE_TIMEOUT /
FLYWHEEL_TOP_K / FLYWHEEL_ORT_THREADS in the server's environment win, as for the TorchServe handler.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the contracts staged beside this file
import capture as _capture  # noqa: E402
import manifest as _manifest  # noqa: E402
import preprocessing as _pp  # noqa: E402

logger = logging.getLogger("flywheel.triton")
IMAGE_INPUT = "image"
TRAFFIC_PARAMETER = _capture.TRAFFIC_HEADER.lower()
OUTPUTS = ("label", "label_index", "confidence", "probabilities", "prediction_id", "version", "prediction")


class RequestError(Exception):
    """A client error in one request of a batch: that request's INVALID_ARG (HTTP 400)."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _invalid(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _requested(request) -> frozenset[str] | tuple[str, ...]:
    """The outputs a request names (KServe v2 `outputs`), or all of them when it names none."""
    try:
        names = request.requested_output_names()
    except AttributeError:  # a stub without the call: answer every output, as before
        return OUTPUTS
    return frozenset(names) if names else OUTPUTS


def _strings(values: list[str], n: int) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(n, 1)


class TritonPythonModel:
    """One served version: verifies its ONNX file, then answers batches of image requests."""

    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.fw_manifest = _manifest.Manifest.read(version_dir)
        try:  # refuse to serve bytes that are not the ones packaged and parity-checked
            self.fw_manifest.verify(version_dir)
        except _manifest.ChecksumMismatch as exc:
            raise RuntimeError(f"refusing to serve: {exc} (repository corrupted or tampered with)") from None
        threads = int(os.environ.get("FLYWHEEL_ORT_THREADS") or params.get("ort_threads") or 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see handler._ort_session
        path = os.path.join(version_dir, self.fw_manifest.artifact["file"])
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.spec = _pp.PreprocessSpec.from_dict(self.fw_manifest.preprocess)
        self.class_names = list(self.fw_manifest.class_names)
        self.model_label = self.fw_manifest.model_name
        self.version = str(self.fw_manifest.model_version)
        self.top_k = int(os.environ.get("FLYWHEEL_TOP_K") or params.get("top_k") or 3)
        self.max_images = int(params.get("max_images_per_request") or 64)
        self.capture = _capture.writer_from_config(params)
        logger.info("flywheel triton model ready: %s v%s (sha256 ok)", self.model_label, self.version)

    # ------------------------------------------------------------------------------------ requests
    def _parameters(self, request) -> dict:
        try:
            raw = request.parameters()
            params = json.loads(raw) if isinstance(raw, str) and raw else (raw or {})
        except (AttributeError, ValueError):  # a backend without request parameters: defaults
            return {}
        return {str(k).lower(): v for k, v in params.items()} if isinstance(params, dict) else {}

    def _decode(self, request) -> tuple[list[tuple[np.ndarray, bytes | None]], int, str]:
        """One request → ((pixels, png) per image, top_k, traffic mark); raises RequestError naming the problem."""
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
        if tensor is None:
            raise RequestError(f"input '{IMAGE_INPUT}' is missing: send image bytes as a BYTES tensor [n, 1]")
        values = tensor.as_numpy().reshape(-1)
        if not len(values):
            raise RequestError(f"input '{IMAGE_INPUT}' is empty")
        if len(values) > self.max_images:
            raise RequestError(f"too many images: {len(values)} > limit {self.max_images} per request")
        params = self._parameters(request)
        top_k = params.get("top_k", self.top_k)
        if isinstance(top_k, str) and top_k.isdigit():
            top_k = int(top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(self.class_names):
            raise RequestError(f"top_k must be an integer in 1..{len(self.class_names)}")
        images = []
        for i, value in enumerate(values):
            data = value if isinstance(value, bytes) else bytes(value)
            try:
                images.append(_pp.decode_image_and_png(data, self.spec))
            except _pp.InvalidImage as exc:
                raise RequestError(f"image[{i}]: {exc}") from None
        return images, top_k, _capture.traffic_kind(params.get(TRAFFIC_PARAMETER))

    def execute(self, requests):
        responses: list = [None] * len(requests)
        images: list[np.ndarray] = []
        pngs: list[bytes | None] = []  # per image: its request bytes if already a PNG of it
        slices: dict[int, tuple[int, int, int, str]] = {}
        for idx, request in enumerate(requests):
            try:
                decoded, top_k, traffic = self._decode(request)
            except RequestError as exc:
                responses[idx] = _invalid(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - one unreadable request must not fail the batch
                logger.warning("unexpected error decoding a request: %s", exc)
                responses[idx] = _invalid(f"could not read request: {type(exc).__name__}")
                continue
            slices[idx] = (len(images), len(images) + len(decoded), top_k, traffic)
            images.extend(pixels for pixels, _ in decoded)
            pngs.extend(png for _, png in decoded)
        if images:
            inputs = _pp.to_array(np.stack(images), self.spec)
            logits, emb = self.session.run(None, {self.input_name: inputs})[:2]
            probs = _softmax(logits.astype(np.float32, copy=False))
            ks = [0] * len(images)  # each image's top_k: its request's
            for start, stop, top_k, _ in slices.values():
                ks[start:stop] = [top_k] * (stop - start)
            # One answer per image (row i answers images[i]), built for the whole batch at once.
            answered = _capture.answers(self.model_label, self.version, self.class_names, probs, ks)
            for idx, (start, stop, _, traffic) in slices.items():
                if self.capture is not None:
                    for i in range(start, stop):
                        self._capture_answer(answered[i], images[i], emb[i], probs[i], traffic, pngs[i])
                responses[idx] = self._response(answered[start:stop], probs[start:stop], _requested(requests[idx]))
        return responses

    def _response(self, preds: list[dict], probs: np.ndarray, requested=OUTPUTS):
        """One request's response (`preds`: its images' answers, `probs` their rows) with the outputs
        it asked for (all when it named none, as Triton does): Triton drops the rest anyway, and
        building all seven cost more than the model."""
        n = len(preds)
        build = {
            "label": lambda: _strings([p["label"] for p in preds], n),
            "label_index": lambda: np.array([p["label_index"] for p in preds], np.int64).reshape(n, 1),
            "confidence": lambda: np.array([p["confidence"] for p in preds], np.float32).reshape(n, 1),
            "probabilities": lambda: np.ascontiguousarray(probs, dtype=np.float32),
            "prediction_id": lambda: _strings([p["prediction_id"] for p in preds], n),
            "version": lambda: _strings([self.version] * n, n),
            "prediction": lambda: _strings([json.dumps(p) for p in preds], n),
        }
        outputs = [pb_utils.Tensor(name, build[name]()) for name in OUTPUTS if name in requested]
        return pb_utils.InferenceResponse(output_tensors=outputs)

    def _capture_answer(self, pred: dict, image: np.ndarray, emb: np.ndarray, probs: np.ndarray, traffic: str,
                        png: bytes | None = None) -> None:
        """Capture one answer as the TorchServe handler does (handler._capture_answer): the PNG is
        encoded only if the writer keeps the record."""
        self.capture.submit(lambda: _capture.record_of(pred, _pp.capture_png(image, png), emb, probs, traffic))

    def finalize(self):
        if self.capture is not None:
            self.capture.close()
