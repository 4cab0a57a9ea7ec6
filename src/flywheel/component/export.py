"""Export a component's network for serving, and check every export against eager PyTorch.

Both exports take the `ServingModule` (one call → (logits, embedding)): TorchScript by tracing, ONNX
from that trace (the dynamo exporter when tracing-based export fails). Each file is reloaded and run
on a held batch of real images; its outputs must match the eager ones within `PARITY_TOL`, or the
artifact would serve different answers. `flywheel.component.log_model` exports at log time (so a
model that does not export fails before anything is registered) and `flywheel package` checks the
files again on the test set before it archives one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flywheel.contracts.manifest import sha256_file
from flywheel.core.errors import FlywheelError

log = logging.getLogger(__name__)
PARITY_TOL = 1e-4  # fp32 exports must match eager to this max abs diff (logits and embedding)
HELD_BATCH = 64  # the first test images every export is checked on, at log and at package time


@dataclass(frozen=True)
class ExportResult:
    format: str
    file: str | None
    sha256: str | None
    max_abs_diff: float | None
    skipped: str | None = None  # reason, when not built
    exporter: str | None = None  # how the file was produced (ONNX: torchscript or dynamo exporter)

    def to_dict(self) -> dict:
        return {"format": self.format, "file": self.file, "sha256": self.sha256,
                "max_abs_diff": self.max_abs_diff, "skipped": self.skipped, "exporter": self.exporter}


def max_diff(a: tuple, b: tuple) -> float:
    return float(max(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)).max()
                     for x, y in zip(a, b, strict=True)))


def export_torchscript(module, example, reference: tuple, directory: Path, filename: str = "model.pt"):
    """Trace, save, reload and check the TorchScript file; returns (result, the reloaded module)."""
    import torch

    path = directory / filename
    with torch.inference_mode():
        traced = torch.jit.trace(module, example[:2], check_trace=False)
    traced.save(str(path))
    loaded = torch.jit.load(str(path), map_location="cpu").eval()
    with torch.inference_mode():
        out = tuple(t.numpy() for t in loaded(example))
    return ExportResult("torchscript", path.name, sha256_file(path), max_diff(out, reference),
                        exporter="torch.jit.trace"), loaded


def _onnx_from_torchscript(scripted, example, path: Path) -> None:
    """The TorchScript-based exporter on the already traced (and parity-checked) graph: ~0.2 s,
    against ~5 s for the dynamo exporter (torch.export + onnxscript, mostly import and tracing)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # its deprecation notices; the parity check is what counts
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="no signature found for", category=UserWarning)
        torch.onnx.export(scripted, (example[:2],), str(path), input_names=["images"],
                          output_names=["logits", "embedding"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
                          dynamo=False, external_data=False)


def _onnx_dynamo(module, example, path: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    # external_data=False: TorchServe only ships the one file, not a separate .onnx.data.
    torch.onnx.export(module, (example[:2],), str(path), input_names=["images"],
                      output_names=["logits", "embedding"], dynamic_shapes={"x": {0: batch}},
                      external_data=False, dynamo=True, verbose=False)


def export_onnx(module, example, reference: tuple, directory: Path, scripted=None,
                filename: str = "model.onnx") -> ExportResult:
    """ONNX file checked with ONNX Runtime against eager PyTorch. From the TorchScript module when one
    is given (fast); the dynamo exporter when that fails or none is given (deprecated exporter gone,
    an untraceable model). Either way the parity check below decides."""
    path = directory / filename
    exporter = "dynamo"
    if scripted is not None:
        try:
            _onnx_from_torchscript(scripted, example, path)
            exporter = "torchscript"
        except Exception as exc:  # noqa: BLE001 - any failure: the other exporter gets its chance
            log.info("TorchScript-based ONNX export failed (%s: %s); using the dynamo exporter",
                     type(exc).__name__, exc)
            path.unlink(missing_ok=True)
    if exporter == "dynamo":
        _onnx_dynamo(module, example, path)
    return ExportResult("onnx", path.name, sha256_file(path), max_diff(onnx_outputs(path, example), reference),
                        exporter=exporter)


def onnx_outputs(path: Path, example) -> tuple:
    """(logits, embedding) of the ONNX file on `example` with ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(session.run(["logits", "embedding"], {"images": np.asarray(example)}))


def check_parity(result: ExportResult, tol: float = PARITY_TOL) -> None:
    if result.max_abs_diff is None or not result.max_abs_diff <= tol:
        raise FlywheelError(f"{result.format} export does not match eager PyTorch on the held batch: max abs "
                            f"diff {result.max_abs_diff} > {tol}; the artifact would serve different answers")
