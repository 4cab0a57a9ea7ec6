"""`flywheel predict`: send image files to a serving endpoint, one JSON line per file.

Either engine: TorchServe (`/predictions/<model>`) or Triton through its authenticating proxy
(KServe v2 `/v2/models/<model>/infer`, `TritonClient.predict`, which answers with the TorchServe
handler's JSON), so the output lines are the same whichever engine served them. `flywheel serve`
writes the engine into serve.env (FLYWHEEL_SERVE_ENGINE) with the endpoint and key file.

A few requests run concurrently (the server batches them); results are written in the input order
so a results file lines up with a sorted folder listing.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flywheel.core.data import IMAGE_SUFFIXES
from flywheel.core.errors import FlywheelError


@dataclass(frozen=True)
class PredictSummary:
    total: int
    ok: int
    failed: int
    out: Path | None


def collect_images(images: list[Path], directory: Path | None) -> list[Path]:
    files = [Path(p) for p in images]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FlywheelError(f"image file not found: {missing[0]}")
    if directory is not None:
        if not directory.is_dir():
            raise FlywheelError(f"--dir {directory} is not a directory")
        files += sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FlywheelError("no images to predict: pass image files or --dir with .png/.jpg files in it")
    return files


def predict_files(client, model: str, files: list[Path], version: str | None = None,
                  concurrency: int = 4) -> Iterator[dict]:
    """Yield one result dict per file, in input order: the prediction, or the error and HTTP status.

    A rejected token fails the whole run (FlywheelError: every other file would fail the same way).
    """
    import requests

    from flywheel.serving.torchserve import RequestTooLarge, token_rejected

    def one(path: Path) -> dict:
        try:
            r = client.predict(model, path.read_bytes(), version=version)
        except RequestTooLarge as exc:
            return {"file": str(path), "status": 413, "error": str(exc)}
        except (OSError, requests.RequestException) as exc:
            return {"file": str(path), "status": None, "error": f"{type(exc).__name__}: {exc}"}
        if token_rejected(r):
            raise FlywheelError(client.explain(r, "inference"))
        try:
            body = r.json()
        except ValueError:
            body = {"error": r.text[:300]}
        if not isinstance(body, dict):
            body = {"result": body}
        return {"file": str(path), "status": r.status_code, **body}

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        yield from pool.map(one, files)


ENGINES = ("torchserve", "triton")


def inference_client(engine: str, endpoint: str, key_file: Path | None, token: str | None):
    """The engine's inference client: `predict(model, bytes, version=)` and `explain(r, kind)` alike."""
    if engine not in ENGINES:
        raise FlywheelError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    name = "TorchServe" if engine == "torchserve" else "Triton's proxy"
    if key_file is None and token is None:
        raise FlywheelError(f"{name} needs a token: pass --key-file (the server's key_file.json) or --token")
    if engine == "triton":
        from flywheel.serving.triton import TritonClient

        return TritonClient(endpoint, key_file=key_file, inference_key=token)
    from flywheel.serving.torchserve import TorchServeClient

    return TorchServeClient(endpoint, key_file=key_file, inference_key=token)


def run_predict(endpoint: str, model: str, images: list[Path], directory: Path | None = None,
                out: Path | None = None, key_file: Path | None = None, token: str | None = None,
                version: str | None = None, concurrency: int = 4, progress: bool = True,
                engine: str = "torchserve") -> PredictSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    client = inference_client(engine, endpoint, key_file, token)
    files = collect_images(images, directory)
    ok = failed = 0
    bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress or out is None, transient=True)
    with (open(out, "w") if out else contextlib.nullcontext(sys.stdout)) as sink, bar:
        task = bar.add_task("predict", total=len(files))
        for result in predict_files(client, model, files, version, concurrency):
            ok += result.get("status") == 200
            failed += result.get("status") != 200
            sink.write(json.dumps(result) + "\n")
            bar.advance(task)
    return PredictSummary(len(files), ok, failed, out)
