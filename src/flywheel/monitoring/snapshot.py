"""`flywheel data snapshot`: labelled captures → a new, versioned `imagefolder` dataset with a digest.

Labels come back two ways: the feedback call (`flywheel data feedback`, stored beside the captures as
{"prediction_id", "label"} lines) and labelling exports already in imagefolder layout (`--labelled DIR`).
A snapshot is written as `<out>/<model>/v0001/<class>/<image>.png` plus `snapshot.json` (digest, counts,
sources). Image bytes are copied as captured or exported, never re-encoded: a captured PNG is in the
model's layout (greyscale, or RGB for a 3-channel model; see flywheel.contracts.preprocessing), so an
RGB model's snapshot stays RGB. The digest covers the content only (class + image bytes), so re-running with no new labels
writes nothing and returns the existing snapshot; the next training run uses it with
`flywheel train --extra-data <snapshot dir>` (base data + labelled captures).

Only live traffic is snapshotted: captures marked as release acceptance, warm-up or benchmark
traffic (`X-Flywheel-Traffic`, see flywheel.contracts.capture) are not what users send. When nothing can be
snapshotted the error says why, from what the store holds (no captures, no labels, labels that match
no capture, matches that are all marked traffic).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flywheel.core.data import IMAGE_SUFFIXES
from flywheel.core.data import class_folder as class_dir  # the layout `flywheel train --extra-data` reads
from flywheel.core.errors import FlywheelError

MANIFEST = "snapshot.json"


@dataclass(frozen=True)
class Snapshot:
    path: Path
    version: int
    digest: str
    images: int
    per_class: dict
    created: str
    new: bool = True  # False when the content equalled the latest snapshot's


def latest_snapshot(root: Path, model: str | None = None) -> Snapshot | None:
    """The highest-numbered snapshot under root (or root/<model>); None when there is none."""
    base = Path(root) / model if model else Path(root)
    if not base.is_dir():
        return None
    versions = sorted((int(p.name[1:]), p) for p in base.iterdir()
                      if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit() and (p / MANIFEST).is_file())
    if not versions:
        return None
    meta = json.loads((versions[-1][1] / MANIFEST).read_text())
    return Snapshot(versions[-1][1], versions[-1][0], meta["digest"], meta["images"], meta["per_class"],
                    meta["created"], new=False)


@dataclass
class _Seen:
    """What the capture store held for a snapshot, to say why nothing could be taken."""

    labels: int = 0
    captures: int = 0
    no_image: int = 0
    marked: dict = field(default_factory=dict)

    def diagnosis(self, capture_uri: str | None, model: str) -> str:
        if not capture_uri:
            return "no capture store given and no --labelled folder"
        where = f"{capture_uri} (model {model})"
        if not self.captures and not self.labels:
            return f"no captures and no feedback labels in {where}"
        if not self.captures:
            return (f"{self.labels} feedback labels but no captures at all in {where}: is serving capturing "
                    "there (FLYWHEEL_CAPTURE_URI, same store as `data feedback`)?")
        if not self.labels:
            return f"{self.captures} captured predictions in {where} but no feedback labels yet"
        if self.marked:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.marked.items()))
            return (f"the labelled captures in {where} are release/benchmark traffic, not live ({kinds}); "
                    f"{self.labels} labels, {self.captures} captures")
        if self.no_image:
            return f"{self.no_image} labelled captures in {where} carry no image"
        return (f"{self.labels} feedback labels but none matches one of the {self.captures} captured "
                f"prediction ids in {where}")


def _labelled_from_folder(folder: Path) -> list[tuple[str, str, bytes]]:
    if not folder.is_dir():
        raise FlywheelError(f"labelled folder {folder} does not exist (expected <dir>/<class>/<image>)")
    items = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for img in sorted(cls.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                data = img.read_bytes()
                items.append((cls.name, f"{hashlib.sha256(data).hexdigest()[:16]}{img.suffix.lower()}", data))
    return items


def take_snapshot(capture_uri: str | None, model: str, out_root: Path, labelled_dirs: tuple[Path, ...] = (),
                  class_names: tuple[str, ...] | None = None) -> Snapshot:
    """Join captures with their feedback labels (+ labelled folders) into a new snapshot version."""
    from flywheel.contracts.capture import StoreError, iter_captures, read_feedback, safe_name

    items: list[tuple[str, str, bytes]] = []  # (class folder, file name, bytes)
    seen = _Seen()
    if capture_uri:
        try:
            labels = read_feedback(capture_uri, model)
            seen.labels = len(labels)
            for cap in iter_captures(capture_uri, model):
                seen.captures += 1
                label = labels.get(cap.prediction_id)
                if label is None:
                    continue
                if not cap.live:
                    seen.marked[cap.traffic] = seen.marked.get(cap.traffic, 0) + 1
                    continue
                if not cap.image_png:
                    seen.no_image += 1
                    continue
                items.append((class_dir(label), f"{safe_name(cap.prediction_id)}.png", cap.image_png))
        except (OSError, StoreError) as exc:
            raise FlywheelError(f"capture store {capture_uri} unreadable: {exc}") from None
    for folder in labelled_dirs:
        items.extend(_labelled_from_folder(Path(folder)))
    if not items:
        raise FlywheelError(f"nothing to snapshot: {seen.diagnosis(capture_uri, model)}; send labels for "
                            "captured prediction ids with `flywheel data feedback` or pass a labelling export "
                            "with --labelled DIR")
    if class_names is not None:
        allowed = {class_dir(c) for c in class_names}
        unknown = sorted({c for c, _, _ in items} - allowed)
        if unknown:
            raise FlywheelError(f"labels {unknown} are not classes of {model}: {sorted(allowed)}")
    # Dedupe by (class, content): the same image labelled twice counts once.
    unique = {}
    for cls, name, data in items:
        unique.setdefault((cls, hashlib.sha256(data).hexdigest()), (cls, name, data))
    items = sorted(unique.values())
    h = hashlib.sha256()
    for cls, _, data in items:
        h.update(cls.encode() + b"\0" + hashlib.sha256(data).digest())
    digest = h.hexdigest()
    base = Path(out_root) / safe_name(model)
    latest = latest_snapshot(base)
    if latest is not None and latest.digest == digest:
        return latest
    version = (latest.version if latest else 0) + 1
    per_class: dict[str, int] = {}
    base.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir beside the target, then rename: a half-written snapshot is never visible.
    staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=base))
    try:
        for cls, name, data in items:
            (staging / cls).mkdir(exist_ok=True)
            (staging / cls / name).write_bytes(data)
            per_class[cls] = per_class.get(cls, 0) + 1
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        snap = Snapshot(base / f"v{version:04d}", version, digest, len(items), per_class, created)
        meta = {k: v for k, v in asdict(snap).items() if k not in ("path", "new")}
        meta.update(model=model, capture_uri=capture_uri, labelled_dirs=[str(d) for d in labelled_dirs])
        (staging / MANIFEST).write_text(json.dumps(meta, indent=2))
        os.rename(staging, snap.path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return snap
