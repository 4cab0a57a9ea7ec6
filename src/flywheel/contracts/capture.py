"""Capture served traffic to a store (local directory or gs://bucket/prefix), off the request path,
and read it back exactly once.

This module is copied into every TorchServe archive next to the handler, so it imports only the
standard library and numpy at module level (google-cloud-storage lazily, for gs:// only) and never
other flywheel modules.

Writer: `CaptureWriter.submit(record)` puts the record (or what a function given instead builds, called
only once the record is kept) on a bounded queue and returns at once; a
daemon thread batches records into one JSON-lines object per flush. A slow, full or unreachable store
therefore never fails a request or delays it: records that do not fit are counted in `dropped`.

Store layout (one layout for both backends; object names sort by the time their writer named them):
    <root>/<model>/captures/<ts_ns:019d>-<writer>-<seq:08d>.jsonl   one line per captured request
    <root>/<model>/feedback/<ts_ns:019d>-<writer>-<seq:08d>.jsonl   {"prediction_id", "label"} lines
Every record carries `traffic`: "live" for real clients; requests marked with the `X-Flywheel-Traffic`
header ("acceptance", "warmup", "benchmark": release checks and load tests) are stored with that mark,
so the store keeps an audit trail, and the monitor and `data snapshot` read live traffic only.

Reading exactly once (`CaptureReader`, `CaptureCursor`). A batch is named (its writer's clock) before
its upload, which takes up to the store timeout, and writers' clocks disagree, so the order in which
batches become visible is not the order of their names: a cursor that is one name ("everything up
to here is read") skips a batch named earlier but stored later. The cursor is therefore a watermark
plus the set of batch names already read above it:
  * a poll lists every batch named above the watermark and returns those not in the set;
  * after the caller has processed them, `advance` adds them to the set, moves the watermark to
    min(reader's clock, newest name read) − `horizon_s` (never backwards), and forgets the names at
    or below it, so the cursor holds about one horizon of names.
Guarantee: with a horizon at least the longest upload (from naming a batch to its being listed)
plus the largest difference between any two clocks (every writer's and the reader's), every batch
is returned by exactly one poll-advance, however many writers there are. A batch that becomes
visible later than that bound, measured against the watermark, is never read (it is counted by
nobody; size the horizon generously: the default is 10 minutes). Records of one batch are returned
together; exactly-once holds across restarts when the caller persists what it derived from a poll
and the advanced cursor in one atomic write (the monitor keeps both in one state file).
A cursor saved by an older flywheel, a single batch name, loads as a watermark with an empty set:
the same position, with the new guarantee from then on.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

CAPTURES = "captures"
FEEDBACK = "feedback"
STATS = "stats"  # <root>/<model>/stats/<writer>.json: each writer's counters, for the monitor's metrics
STATS_EVERY_S = 10.0
_SENTINEL = object()
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
DEFAULT_HORIZON_S = 600.0  # the reader's horizon: longest upload + largest clock difference, generously
# Traffic marks: clients that are not real users say so in this request header; the handler stores
# the mark in the record and readers of the monitored stream keep LIVE only.
TRAFFIC_HEADER = "X-Flywheel-Traffic"
LIVE = "live"
TRAFFIC_KINDS = (LIVE, "acceptance", "warmup", "benchmark")
_TRAFFIC_SAFE = re.compile(r"[^a-z0-9_-]+")


def traffic_kind(value: str | None) -> str:
    """The traffic mark of a request from its header value: LIVE when absent, else the (sanitised,
    lower-case) mark as sent. A mark outside TRAFFIC_KINDS is kept as sent: it is still not live."""
    if value is None or not str(value).strip():
        return LIVE
    return _TRAFFIC_SAFE.sub("_", str(value).strip().lower())[:32] or LIVE


def safe_name(model: str) -> str:
    """A model name usable as one path segment in a directory or a bucket."""
    cleaned = _SAFE.sub("_", model).strip("._")
    if not cleaned:
        raise ValueError(f"model name {model!r} has no usable characters for a capture path")
    return cleaned


def batch_key(ts: float | None = None, writer: str = "", seq: int = 0) -> str:
    """Sortable object name: nanosecond timestamp first, so lexical order is time order."""
    ns = int((time.time() if ts is None else ts) * 1e9)
    return f"{ns:019d}-{writer}-{seq:08d}.jsonl" if writer else f"{ns:019d}"


def key_time(key: str) -> float:
    """Seconds since the epoch encoded in a batch key (inverse of `batch_key`)."""
    return int(key.split("-", 1)[0].split(".", 1)[0]) / 1e9


# ---------------------------------------------------------------------------------------- stores
class LocalStore:
    """A directory; writes go to a temp file then `os.replace`, so readers never see half a batch."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def put(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def list(self, prefix: str, after: str | None = None, suffix: str = ".jsonl") -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        names = sorted(p.name for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith("."))
        return [f"{prefix}/{n}" for n in names if after is None or n > after]

    def get(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def any(self, prefix: str, suffix: str = ".jsonl") -> bool:
        folder = self.root / prefix
        return folder.is_dir() and any(p.suffix == suffix and not p.name.startswith(".") for p in folder.iterdir())


class StoreError(ValueError):
    """A capture store that cannot be used as given: a URI of an unknown kind, or GCS without credentials."""


# What to do when google.auth finds no credentials (its own message is a paragraph); `flywheel stack` says it too.
GCS_CREDENTIALS_FIX = ("set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or STORAGE_EMULATOR_HOST "
                       "for a GCS emulator")


STORE_TIMEOUT_S = 5.0  # one store call's bound: a capture upload gives up (and drops its batch) after this


class GCSStore:
    """gs://bucket/prefix through google-cloud-storage (honours STORAGE_EMULATOR_HOST)."""

    def __init__(self, bucket: str, prefix: str = "", timeout: float = STORE_TIMEOUT_S):
        self.bucket_name, self.prefix, self.timeout = bucket, prefix.strip("/"), timeout
        self.uri = f"gs://{bucket}/{self.prefix}".rstrip("/")
        self._bucket = None

    def _b(self):
        if self._bucket is None:
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import storage  # lazy: serving without gs:// never imports it

            try:
                self._bucket = storage.Client().bucket(self.bucket_name)
            except DefaultCredentialsError:
                raise StoreError(f"{self.uri}: no Google credentials found; {GCS_CREDENTIALS_FIX}") from None
        return self._bucket

    def _full(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes) -> None:
        # No client-side retry loop: a failing store must cost one bounded attempt, then count as dropped.
        self._b().blob(self._full(name)).upload_from_string(
            data, content_type="application/x-ndjson", timeout=self.timeout, retry=None)

    def list(self, prefix: str, after: str | None = None, suffix: str = ".jsonl") -> list[str]:
        full = self._full(prefix) + "/"
        start = full + after + "\x00" if after else None  # start_offset is inclusive; skip `after` itself
        blobs = self._b().client.list_blobs(self.bucket_name, prefix=full, start_offset=start,
                                            timeout=self.timeout)
        strip = len(self.prefix) + 1 if self.prefix else 0
        names = (b.name[strip:] for b in blobs if b.name.endswith(suffix))
        # Filter again here: start_offset is an optimisation some servers (the emulator) ignore.
        return sorted(n for n in names if after is None or n.rsplit("/", 1)[-1] > after)

    def get(self, name: str) -> bytes:
        return self._b().blob(self._full(name)).download_as_bytes(timeout=self.timeout)

    def any(self, prefix: str, suffix: str = ".jsonl") -> bool:
        blobs = self._b().client.list_blobs(self.bucket_name, prefix=self._full(prefix) + "/", timeout=self.timeout)
        return any(b.name.endswith(suffix) for b in blobs)


def open_store(uri: str, timeout: float = STORE_TIMEOUT_S) -> LocalStore | GCSStore:
    """`gs://bucket/prefix` or a local directory (plain path or file:// URI); `timeout` bounds each GCS call."""
    if not uri:
        raise StoreError("capture store URI is empty: give a directory or gs://bucket/prefix")
    if uri.startswith("gs://"):
        bucket, _, prefix = uri[len("gs://"):].partition("/")
        if not bucket:
            raise StoreError(f"capture store URI {uri!r} names no bucket: use gs://bucket/prefix")
        return GCSStore(bucket, prefix, timeout)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StoreError(f"capture store URI {uri!r}: only local directories and gs://bucket/prefix are supported")
    return LocalStore(uri)


# ---------------------------------------------------------------------------------------- records
def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32).round(6).tolist() if value.dtype.kind == "f" else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def encode_record(record: dict) -> str:
    """One JSON line; image bytes as base64, arrays as lists.

    `image_png` is a PNG of the image as the model saw it after decoding, greyscale "L" for a
    1-channel model, "RGB" for a 3-channel one, at the model's size: the request's own bytes where
    they already are one, else preprocessing's `encode_png` (`capture_png`); stored as is."""
    out = {}
    for key, value in record.items():
        if key == "image_png" and isinstance(value, (bytes, bytearray)):
            out["image_png_b64"] = base64.b64encode(bytes(value)).decode("ascii")
        else:
            out[key] = _jsonable(value)
    return json.dumps(out, separators=(",", ":"))


def answer(model: str, version: str, class_names: list[str], probs: np.ndarray, top_k: int) -> dict:
    """One image's prediction as every serving engine answers it (the TorchServe handler and Triton's
    Python-backend model): a fresh `prediction_id`, the version, the best class and the top k
    (`answers` for a batch of one)."""
    return answers(model, version, class_names, np.asarray(probs)[None], top_k)[0]


def answers(model: str, version: str, class_names: list[str], probs: np.ndarray, top_k) -> list[dict]:
    """`answer` for every row of `probs` (N, classes) at once, `top_k` one int or one per row: a
    fresh `prediction_id` each, the version, the best class and the top k, with the sort and the
    float conversions done once for the batch."""
    probs = np.asarray(probs)
    if not len(probs):
        return []
    ks = [top_k] * len(probs) if isinstance(top_k, (int, np.integer)) else list(top_k)
    orders = np.argsort(-probs, axis=1)[:, :max(ks)].tolist()
    rows = probs.tolist()
    out = []
    for order, row, k in zip(orders, rows, ks, strict=True):
        best = order[0]
        out.append({
            "prediction_id": uuid.uuid4().hex,
            "model": model,
            "version": version,
            "label": class_names[best],
            "label_index": best,
            "confidence": row[best],
            "top_k": [{"label": class_names[i], "index": i, "probability": row[i]} for i in order[:k]],
        })
    return out


def record_of(answered: dict, image_png: bytes, embedding: np.ndarray, probs: np.ndarray, traffic: str) -> dict:
    """The capture record of an `answer`: what the monitor reads back as a `Capture` (no top k: the
    probabilities hold it)."""
    record = dict(answered, ts=time.time(), image_png=image_png, embedding=embedding, probs=probs.tolist(),
                  traffic=traffic)
    record.pop("top_k")
    return record


@dataclass(frozen=True)
class Capture:
    """One captured request, as the monitor and `data snapshot` read it back."""

    prediction_id: str
    model: str
    version: str
    ts: float
    embedding: np.ndarray | None
    label: str | None
    label_index: int | None
    confidence: float | None
    probs: np.ndarray | None
    image_png: bytes | None = field(repr=False)
    batch: str = ""  # the store object it came from
    traffic: str = LIVE  # LIVE, or the mark a release check / load test sent (see TRAFFIC_HEADER)

    @property
    def live(self) -> bool:
        return self.traffic == LIVE


def decode_record(line: str, batch: str = "") -> Capture:
    raw = json.loads(line)
    emb = raw.get("embedding")
    probs = raw.get("probs")
    img = raw.get("image_png_b64")
    return Capture(
        prediction_id=str(raw.get("prediction_id", "")),
        model=str(raw.get("model", "")),
        version=str(raw.get("version", "")),
        ts=float(raw.get("ts") or 0.0),
        embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
        label=raw.get("label"),
        label_index=None if raw.get("label_index") is None else int(raw["label_index"]),
        confidence=None if raw.get("confidence") is None else float(raw["confidence"]),
        probs=None if probs is None else np.asarray(probs, dtype=np.float32),
        image_png=None if img is None else base64.b64decode(img),
        batch=batch,
        traffic=traffic_kind(raw.get("traffic")),
    )


# ---------------------------------------------------------------------------------------- writer
class CaptureWriter:
    """Bounded, sampled, batched capture writer. `submit` never blocks and never raises."""

    def __init__(self, uri: str, sample_rate: float = 1.0, max_queue: int = 1024, flush_every: int = 64,
                 flush_seconds: float = 1.0, model: str | None = None, clock: Callable[[], float] = time.time,
                 store_timeout: float = STORE_TIMEOUT_S):
        """`clock` names batches (seconds since the epoch, default `time.time`): a test gives a
        skewed one to play a replica whose clock runs behind; readers tolerate skew up to their horizon.
        `store_timeout` bounds each upload (GCS): past it the batch is dropped and counted."""
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"capture sample_rate must be within [0, 1], got {sample_rate}")
        if max_queue < 1 or flush_every < 1 or flush_seconds <= 0:
            raise ValueError("capture max_queue and flush_every must be >= 1 and flush_seconds > 0")
        if not store_timeout > 0:
            raise ValueError(f"capture store_timeout must be > 0 seconds, got {store_timeout}")
        self.store = open_store(uri, store_timeout)
        self.uri = uri
        self.sample_rate = float(sample_rate)
        self.flush_every = int(flush_every)
        self.flush_seconds = float(flush_seconds)
        self.model = model  # default folder when a record carries no "model"
        self.clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=int(max_queue))
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._writer_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._closed = False
        self.submitted = 0  # accepted onto the queue
        self.sampled_out = 0
        self.dropped = 0  # queue full, store failure or unencodable record
        self.written = 0
        self.errors = 0  # failed store writes (each drops its whole batch)
        self.last_error: str | None = None
        self._processed = 0  # taken off the queue and written or dropped (for flush)
        self._stats_at = 0.0
        self._folders: set[str] = set()

    # -- request path ------------------------------------------------------------------------
    def submit(self, record: dict | Callable[[], dict]) -> bool:
        """Queue one record for capture. False when sampled out, closed, or the queue is full.

        `record` may be a function that builds it: it is called only for a record that is kept, so a
        request sampled out (or met by a full queue) costs no image encoding on the request path."""
        try:
            if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
                with self._lock:
                    self.sampled_out += 1
                return False
            if self._closed or self._queue.full():
                self._count_dropped(1)
                return False
            self._ensure_thread()
            self._queue.put_nowait(record() if callable(record) else record)
            with self._lock:
                self.submitted += 1
            return True
        except queue.Full:
            self._count_dropped(1)
            return False
        except Exception as exc:  # noqa: BLE001 - capture must never fail a request
            self._count_dropped(1, f"{type(exc).__name__}: {exc}")
            return False

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"submitted": self.submitted, "written": self.written, "dropped": self.dropped,
                    "sampled_out": self.sampled_out, "errors": self.errors, "pending": self.pending}

    # -- background ----------------------------------------------------------------------------
    def _count_dropped(self, n: int, error: str | None = None) -> None:
        with self._lock:
            self.dropped += n
            if error is not None:
                self.errors += 1
                self.last_error = error

    def _ensure_thread(self) -> None:
        # Started lazily (and again after a fork): constructing a writer does no work.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="flywheel-capture", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        batch: list[dict] = []
        deadline = None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _SENTINEL:
                self._write(batch)
                self._write_stats(force=True)
                return
            if item is not None:
                if not batch:
                    deadline = time.monotonic() + self.flush_seconds
                batch.append(item)
            if batch and (len(batch) >= self.flush_every or time.monotonic() >= deadline):
                self._write(batch)
                batch, deadline = [], None

    def _write(self, batch: list[dict]) -> None:
        if not batch:
            return
        try:
            self._write_groups(batch)
        finally:
            with self._lock:
                self._processed += len(batch)
        self._write_stats()

    def _write_stats(self, force: bool = False) -> None:
        """Publish this writer's counters to the store (rate-limited), so the monitor can export
        dropped captures even though it never talks to the serving workers."""
        now = time.monotonic()
        if not force and now - self._stats_at < STATS_EVERY_S:
            return
        self._stats_at = now
        data = json.dumps({**self.stats(), "writer": self._writer_id, "pid": os.getpid(), "ts": time.time()}).encode()
        for folder in self._folders:
            try:
                self.store.put(f"{folder}/{STATS}/{self._writer_id}.json", data)
            except Exception:  # noqa: BLE001 - the store being down is exactly what these stats report
                return

    def _write_groups(self, batch: list[dict]) -> None:
        groups: dict[str, list[str]] = {}
        for record in batch:
            try:
                folder = safe_name(str(record.get("model") or self.model or "model"))
                self._folders.add(folder)
                groups.setdefault(folder, []).append(encode_record(record))
            except Exception as exc:  # noqa: BLE001 - one bad record must not lose the batch
                self._count_dropped(1, f"unencodable record: {type(exc).__name__}: {exc}")
        for folder, lines in groups.items():
            self._seq += 1
            name = f"{folder}/{CAPTURES}/{batch_key(self.clock(), writer=self._writer_id, seq=self._seq)}"
            try:
                self.store.put(name, ("\n".join(lines) + "\n").encode())
            except Exception as exc:  # noqa: BLE001 - store down: count, never raise
                self._count_dropped(len(lines), f"{type(exc).__name__}: {exc}")
                continue
            with self._lock:
                self.written += len(lines)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or dropped). True when the queue drained."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                done = self._processed >= self.submitted
            if done:
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued and stop the thread (waits at most `timeout` seconds)."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        try:
            self._queue.put(_SENTINEL, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def writer_from_config(config: Mapping[str, Any]) -> CaptureWriter | None:
    """The serving engines' writer, or None where capture is off: the environment's FLYWHEEL_CAPTURE_URI,
    FLYWHEEL_CAPTURE_SAMPLE and FLYWHEEL_CAPTURE_TIMEOUT win over the model's own `capture_uri`,
    `capture_sample` and `capture_timeout` (TorchServe's model-config.yaml handler section, Triton's
    config.pbtxt parameters), so one server's operator can change them without repackaging."""
    def setting(env: str, key: str, default=None):
        for value in (os.environ.get(env), config.get(key)):  # an empty value counts as unset
            if value not in (None, ""):
                return value
        return default

    uri = setting("FLYWHEEL_CAPTURE_URI", "capture_uri")
    if uri is None:
        return None
    return CaptureWriter(str(uri), sample_rate=float(setting("FLYWHEEL_CAPTURE_SAMPLE", "capture_sample", 1.0)),
                         store_timeout=float(setting("FLYWHEEL_CAPTURE_TIMEOUT", "capture_timeout", STORE_TIMEOUT_S)))


# ---------------------------------------------------------------------------------------- readers
def list_batches(uri: str, model: str, since: str | None = None, settle_seconds: float = 0.0,
                 kind: str = CAPTURES) -> list[str]:
    """Batch names (e.g. `0001700000000000000-abcd-00000001.jsonl`) named after `since`, oldest first.

    For whole-store reads and listings. `since` as a resume point is not safe with several writers
    (a batch named earlier can be stored later): incremental readers use `CaptureReader`.
    `settle_seconds` leaves out batches named less than that ago.
    """
    store = open_store(uri)
    prefix = f"{safe_name(model)}/{kind}"
    names = [n.rsplit("/", 1)[-1] for n in store.list(prefix, after=since)]
    if settle_seconds > 0:
        horizon = time.time() - settle_seconds
        names = [n for n in names if key_time(n) <= horizon]
    return names


def read_batch(uri: str, model: str, name: str, kind: str = CAPTURES) -> list[str]:
    store = open_store(uri)
    text = store.get(f"{safe_name(model)}/{kind}/{name}").decode()
    return [line for line in text.splitlines() if line.strip()]


def iter_captures(uri: str, model: str, since: str | None = None, settle_seconds: float = 0.0,
                  limit_batches: int | None = None) -> Iterator[Capture]:
    """Captured records of `model` (every traffic mark) in batches named after `since`, in name order.

    Each record's `.batch` is its batch name. For reading a whole store (`data snapshot`); an
    incremental reader that must see every batch once uses `CaptureReader`. Corrupt lines are skipped
    (a crash mid-write cannot happen with atomic puts, but hand-edited stores can hold anything).
    """
    names = list_batches(uri, model, since, settle_seconds)
    if limit_batches is not None:
        names = names[:limit_batches]
    for name in names:
        for line in read_batch(uri, model, name):
            try:
                yield decode_record(line, batch=name)
            except (ValueError, TypeError, KeyError):
                continue


@dataclass(frozen=True)
class CaptureCursor:
    """How far a reader got: every batch named at or below `watermark`, and the names in `seen` above it.

    Saved as JSON (`to_json`); `from_json` also takes the single batch name older versions saved.
    """

    watermark: str = ""  # a batch name or a bare 19-digit timestamp; "" = nothing read yet
    seen: frozenset[str] = frozenset()

    def to_json(self) -> dict:
        return {"watermark": self.watermark, "seen": sorted(self.seen)}

    @classmethod
    def from_json(cls, data: Any) -> CaptureCursor:
        if data is None:
            return cls()
        if isinstance(data, str):  # the old cursor: the last batch name read, everything before it read too
            return cls(watermark=data)
        if isinstance(data, dict) and isinstance(data.get("watermark", ""), str) \
                and isinstance(data.get("seen", []), list):
            return cls(str(data.get("watermark") or ""), frozenset(str(n) for n in data.get("seen") or ()))
        raise ValueError(f"not a capture cursor: {str(data)[:80]!r}")

    @classmethod
    def at(cls, ts: float) -> CaptureCursor:
        """A cursor that has read everything named before `ts` (seconds since the epoch)."""
        return cls(watermark=batch_key(max(0.0, ts)))


@dataclass(frozen=True)
class Poll:
    """Batch names a poll found unread (oldest name first) and the reader's clock when it listed them."""

    names: tuple[str, ...]
    listed_at: float


@dataclass(frozen=True)
class CaptureReader:
    """Exactly-once reader of one model's capture batches (the contract is in the module docstring).

        poll = reader.poll(cursor)
        records = [r for name in poll.names for r in reader.read(name)]
        ... process records ...
        cursor = reader.advance(cursor, poll)   # persist it together with what was derived
    """

    uri: str
    model: str
    horizon_s: float = DEFAULT_HORIZON_S  # >= longest upload + largest clock difference
    settle_s: float = 0.0  # leave batches younger than this to a later poll (they stay unread, not skipped)
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.horizon_s <= 0 or self.settle_s < 0 or self.settle_s >= self.horizon_s:
            raise ValueError(f"capture reader needs 0 <= settle_s ({self.settle_s}) < horizon_s ({self.horizon_s})")

    @property
    def prefix(self) -> str:
        return f"{safe_name(self.model)}/{CAPTURES}"

    def poll(self, cursor: CaptureCursor) -> Poll:
        """Every unread batch above the cursor's watermark, oldest name first. (No limit: advancing
        past part of a poll could move the watermark over names left for later.)"""
        listed_at = self.clock()  # before listing: whatever is visible now is in the listing
        names = [n.rsplit("/", 1)[-1] for n in open_store(self.uri).list(self.prefix, after=cursor.watermark or None)]
        names = [n for n in names if n not in cursor.seen]
        if self.settle_s > 0:
            names = [n for n in names if key_time(n) <= listed_at - self.settle_s]
        return Poll(tuple(names), listed_at)

    def read(self, name: str) -> list[Capture]:
        """The records of one batch (corrupt lines skipped), each with `.batch` = name."""
        out = []
        for line in read_batch(self.uri, self.model, name):
            try:
                out.append(decode_record(line, batch=name))
            except (ValueError, TypeError, KeyError):
                continue
        return out

    def advance(self, cursor: CaptureCursor, poll: Poll) -> CaptureCursor:
        """The cursor after `poll`'s batches were processed: names added, watermark moved, set pruned."""
        seen = cursor.seen | frozenset(poll.names)
        watermark = cursor.watermark
        if seen:
            newest = key_time(max(seen))  # names sort by time
            candidate = batch_key(max(0.0, min(poll.listed_at, newest) - self.horizon_s))
            watermark = max(watermark, candidate)
        return CaptureCursor(watermark, frozenset(n for n in seen if n > watermark))

    def any(self) -> bool:
        """Whether the store holds any capture batch of this model at all."""
        return open_store(self.uri).any(self.prefix)


def write_feedback(uri: str, model: str, labels: list[tuple[str, str]] | dict[str, str]) -> str:
    """Store ground-truth labels for captured predictions: (prediction_id, class name) pairs.

    Returns the batch name written. Labels are joined with captures by `flywheel data snapshot`.
    """
    pairs = list(labels.items()) if isinstance(labels, dict) else list(labels)
    if not pairs:
        raise ValueError("no labels given")
    lines = []
    now = time.time()
    for pid, label in pairs:
        if not str(pid) or not str(label):
            raise ValueError(f"feedback needs a prediction id and a label, got {pid!r}: {label!r}")
        lines.append(json.dumps({"prediction_id": str(pid), "label": str(label), "ts": now}))
    name = batch_key(writer=uuid.uuid4().hex[:8], seq=0)
    open_store(uri).put(f"{safe_name(model)}/{FEEDBACK}/{name}", ("\n".join(lines) + "\n").encode())
    return name


def read_feedback(uri: str, model: str) -> dict[str, str]:
    """prediction_id → latest label given for it."""
    out: dict[str, str] = {}
    for name in list_batches(uri, model, kind=FEEDBACK):
        for line in read_batch(uri, model, name, kind=FEEDBACK):
            try:
                raw = json.loads(line)
                out[str(raw["prediction_id"])] = str(raw["label"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def read_writer_stats(uri: str, model: str) -> list[dict]:
    """The latest counters each capture writer published (one dict per writer)."""
    store = open_store(uri)
    out = []
    for name in store.list(f"{safe_name(model)}/{STATS}", suffix=".json"):
        try:
            out.append(json.loads(store.get(name)))
        except (ValueError, OSError):
            continue
    return out
