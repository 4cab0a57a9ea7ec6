"""`flywheel trace PREDICTION_ID`: where one served prediction came from, end to end.

Every response carries a `prediction_id` (serving/handler.py). From it, trace answers: the model and
version that served it, that version's training run, git commit, dataset and digest, training
params, the archive served (its sha256 and format, which `release` wrote back to the registry
version: `contracts.manifest.ArchiveStamp`), where and when that version was deployed
(`deployed_<env>_at` tags, `Registry.mark_deployed`), and, from the capture store, the input image
and the monitor window the prediction fell into (`contracts.window`).

Sources, all readable from any node:
- the capture store (a directory or gs://, `contracts.capture`): the captured record names the
  version and holds the image. Finding it costs a scan: the ids are random (uuid4), so trace lists
  the model's capture batches and reads them newest first until one holds the id; an unknown id
  reads every batch of the model (one GET per batch: seconds for thousands of batches on a local
  disk, longer on gs://). A prediction that was not captured (capture off, sampled out, dropped)
  cannot be traced: its id names nothing else.
- the registry (one explicit client, `core.registry.Registry`): version, run, lineage, params,
  archive and deployment tags.
- the window records the monitor stores beside the captures: only those whose time span holds the
  capture's time are read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from flywheel.contracts.manifest import ArchiveStamp
from flywheel.core.config import Settings
from flywheel.core.errors import FlywheelError


@dataclass(frozen=True)
class Deployment:
    env: str
    at: str  # ISO time of the release
    where: str  # the endpoint (`ReleaseResult.target`)
    current: bool  # the alias `env` still points at this version
    archive: ArchiveStamp | None = None  # what that release served (None: released by an older flywheel)


@dataclass(frozen=True)
class CapturedInput:
    captured_at: str  # ISO time the handler answered
    ts: float
    traffic: str  # "live", or the mark of a release check / load test
    label: str | None
    confidence: float | None
    batch: str  # the capture batch that holds the record
    image_bytes: int | None  # size of the captured PNG (None: the record holds no image)
    image_sha256: str | None
    image_path: str | None = None  # where `--image-out` wrote it


@dataclass(frozen=True)
class Window:
    env: str
    index: int
    version: str
    first_at: str
    last_at: str
    tested_at: str
    size: int
    p_value: float
    p_embedding: float
    p_prediction: float
    alpha: float
    drift: bool
    trigger: str | None

    @property
    def verdict(self) -> str:
        return "drift" + (f", retrain requested ({self.trigger})" if self.trigger else "") if self.drift \
            else "no drift"


@dataclass(frozen=True)
class Trace:
    prediction_id: str
    model: str
    version: str
    run_id: str
    git_commit: str | None
    git_dirty: str | None
    dataset: str | None
    dataset_digest: str | None
    params: dict
    archive: ArchiveStamp | None  # the latest release of this version
    deployments: list[Deployment]
    capture: CapturedInput
    windows: list[Window] = field(default_factory=list)  # empty: not in a tested window (yet)
    capture_uri: str = ""


def find_capture(capture_uri: str, model: str, prediction_id: str):
    """The captured record (`contracts.capture.Capture`) of `prediction_id`, newest batch first; None
    when no batch holds it. See the module docstring for the cost."""
    from flywheel.contracts.capture import CAPTURES, decode_record, open_store, safe_name

    store = open_store(capture_uri)  # one store (one GCS client) for the whole scan
    needle = f'"{prediction_id}"'
    for path in reversed(store.list(f"{safe_name(model)}/{CAPTURES}")):
        text = store.get(path).decode()
        if needle not in text:  # a cheap test before decoding records with their images and embeddings
            continue
        for line in text.splitlines():
            if needle not in line:
                continue
            try:
                record = decode_record(line, batch=path.rsplit("/", 1)[-1])
            except (ValueError, TypeError, KeyError):
                continue  # a corrupt line: the store may hold anything a hand put there
            if record.prediction_id == prediction_id:
                return record
    return None


def trace_prediction(settings: Settings, prediction_id: str, model: str | None = None,
                     capture_uri: str | None = None, image_out: Path | None = None) -> Trace:
    """The provenance of one prediction (see the module docstring). FlywheelError when the id is not
    in the capture store or its version is not in the registry."""
    from flywheel.contracts.window import find_windows
    from flywheel.core.registry import Registry

    model = model or settings.model_name
    capture_uri = capture_uri or settings.capture_uri
    prediction_id = prediction_id.strip()
    if not prediction_id:
        raise FlywheelError("give the prediction_id a response carried (flywheel trace PREDICTION_ID)")
    try:
        record = find_capture(capture_uri, model, prediction_id)
    except (OSError, ValueError) as exc:
        raise FlywheelError(f"capture store {capture_uri} unreadable ({type(exc).__name__}: {exc})") from None
    if record is None:
        raise FlywheelError(f"no prediction {prediction_id} of {model} in capture store {capture_uri}: not captured "
                            "(capture off or sampled out), another model (--model) or another store (--capture-uri)")
    registry = Registry(settings)
    mv = registry.version(record.version, model)
    lineage = registry.lineage(mv)
    run = registry.run(mv.run_id)
    tags = mv.tags or {}
    aliases = set(getattr(mv, "aliases", None) or ())
    try:
        archive = ArchiveStamp.from_tags(tags)
        deployments = [Deployment(env, at, where, env in aliases, ArchiveStamp.from_tags(tags, env))
                       for env, (at, where) in sorted(registry.deployments(mv).items())]
    except ValueError as exc:
        raise FlywheelError(f"{model} v{mv.version}: {exc}; the registry's archive record is damaged") from None

    image_path = None
    if image_out is not None:
        if record.image_png is None:
            raise FlywheelError(f"prediction {prediction_id} was captured without its image: nothing to write to "
                                f"{image_out}")
        image_out = Path(image_out)
        image_out.parent.mkdir(parents=True, exist_ok=True)
        image_out.write_bytes(record.image_png)
        image_path = str(image_out)
    captured = CapturedInput(
        captured_at=_iso(record.ts), ts=record.ts, traffic=record.traffic, label=record.label,
        confidence=record.confidence, batch=record.batch,
        image_bytes=None if record.image_png is None else len(record.image_png),
        image_sha256=None if record.image_png is None else hashlib.sha256(record.image_png).hexdigest(),
        image_path=image_path)
    try:
        found = find_windows(capture_uri, model, prediction_id, record.ts)
    except (OSError, ValueError) as exc:
        raise FlywheelError(f"monitor windows in {capture_uri} unreadable ({exc})") from None
    windows = [Window(w.env, w.index, w.version, _iso(w.first_ts), _iso(w.last_ts), _iso(w.tested_at), w.size,
                      w.p_value, w.p_embedding, w.p_prediction, w.alpha, w.drift, w.trigger)
               for w in sorted(found, key=lambda w: (w.env, w.tested_at))]
    return Trace(prediction_id, model, str(mv.version), mv.run_id, lineage.get("git_commit"),
                 lineage.get("git_dirty"), lineage.get("dataset"), lineage.get("dataset_digest"),
                 dict(run.data.params), archive, deployments, captured, windows, capture_uri)


def render_text(t: Trace) -> str:
    """The trace as aligned lines for a terminal."""
    c = t.capture
    lines = [f"prediction {t.prediction_id}: {t.model} v{t.version}, {c.label} ({_pct(c.confidence)}), "
             f"captured {c.captured_at} ({c.traffic})",
             f"  run id          {t.run_id}",
             f"  git commit      {t.git_commit or 'not recorded'}"
             + (" (dirty working tree)" if str(t.git_dirty).lower() == "true" else ""),
             f"  dataset         {t.dataset or 'not recorded'}, digest {t.dataset_digest or 'not recorded'}",
             "  params          " + (", ".join(f"{k}={v}" for k, v in sorted(t.params.items())) or "none logged")]
    a = t.archive
    lines.append(f"  archive         {a.format}, sha256 {a.sha256} (served file sha256 {a.artifact_sha256})" if a
                 else "  archive         not recorded (never released, or released by an older flywheel)")
    if not t.deployments:
        lines.append("  deployed        never released")
    for d in t.deployments:
        note = "current" if d.current else f"alias {d.env} moved on since"
        lines.append(f"  deployed        {d.env}: {d.at} to {d.where} ({note})")
    if c.image_bytes is None:
        lines.append("  input image     not captured")
    else:
        where = f", written to {c.image_path}" if c.image_path else " (--image-out PATH writes it)"
        lines.append(f"  input image     PNG, {c.image_bytes} bytes, sha256 {c.image_sha256}{where}")
    if not t.windows:
        lines.append("  monitor window  none yet (not monitored, or its window is not full yet)")
    for w in t.windows:
        lines.append(f"  monitor window  {w.env} #{w.index} (v{w.version}, {w.size} predictions), {w.first_at} to "
                     f"{w.last_at}: p-value {w.p_value:.3g} (embedding {w.p_embedding:.3g}, prediction "
                     f"{w.p_prediction:.3g}, alpha {w.alpha}): {w.verdict}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "confidence unknown" if value is None else f"{value:.1%}"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")
