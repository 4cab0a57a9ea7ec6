"""A drift window the monitor tested, with the prediction ids it was made of: one JSON object per window
in the capture store, so `flywheel trace` on any node can say which window a prediction fell into.

The monitor (flywheel.monitoring.service) writes one `WindowRecord` per tested window, when it applies
the window to its trigger policy (a window replayed after a crash writes the same object again: same
name, same content). `flywheel trace` (flywheel.control.trace) reads them back. Layout, beside the
captures the window was made of (same store, local directory or gs://, `contracts.capture.open_store`):

    <root>/<model>/windows/<first_ts_ns:019d>-<last_ts_ns:019d>-<env>-<monitor>-<index:06d>.json

first/last_ts are the capture times (`Capture.ts`) of the window's oldest and newest prediction, so a
reader that knows a prediction's capture time lists the names and reads only the windows whose span
holds it (`find_windows`); `monitor` is the monitor state's instance id (8 hex digits), so a monitor
started over (its state dir wiped, indices from 1 again) never overwrites another's windows.

Reading checks the record (`WindowRecord.verify`): every field has its type, the ids are as many as
the window's size and distinct, first_ts <= last_ts, and the verdicts agree with their p-values and
alpha (drift with p_value; the accuracy alarm with p_accuracy, which is None when no feedback label
came back for the window or the version has no reference accuracy). The accuracy fields came later:
a record written without them reads back with their defaults (no accuracy test).

Every version the monitor sees in live traffic has windows of its own (`version`; `index` counts
per version), so a canary's records sit beside the current version's.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields

from flywheel.contracts.capture import open_store, safe_name

WINDOWS = "windows"
SUFFIX = ".json"
_SLACK_NS = 1000  # a float second through JSON and back is exact; this only absorbs rounding to ns


def _ns(ts: float) -> int:
    return int(round(ts * 1e9))


@dataclass(frozen=True)
class WindowRecord:
    """One tested window: where it came from (model, env, monitored version, monitor instance, index),
    its span, its test results and verdict, and the ids of the predictions it was made of."""

    model: str
    env: str
    version: str
    monitor: str  # the monitor state's instance id (MonitorState.instance), 8 hex digits kept
    index: int  # 1, 2, ... per monitored version
    first_ts: float  # capture time of the window's oldest prediction (seconds since the epoch)
    last_ts: float
    tested_at: float
    size: int
    p_value: float  # combined (Bonferroni over the two tests)
    p_embedding: float
    p_prediction: float
    alpha: float
    drift: bool  # p_value < alpha
    trigger: str | None  # the retrain reason this window fired, None when it fired none
    accuracy: float | None  # on the window's predictions that feedback labels came back for
    labelled: int
    prediction_ids: tuple[str, ...]
    # The accuracy alarm (exact one-sided binomial test of the labelled predictions against the
    # version's reference accuracy); defaults: not tested.
    reference_accuracy: float | None = None
    p_accuracy: float | None = None
    accuracy_alarm: bool = False

    @property
    def name(self) -> str:
        """The object name under `<model>/windows/`."""
        return (f"{_ns(self.first_ts):019d}-{_ns(self.last_ts):019d}-{safe_name(self.env)}-{self.monitor[:8]}-"
                f"{self.index:06d}{SUFFIX}")

    def verify(self) -> WindowRecord:
        """This record when it is consistent; ValueError naming what is not."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("model", "env", "version", "monitor") and not (isinstance(value, str) and value):
                raise ValueError(f"window record: {f.name} must be a non-empty string, got {value!r}")
        if not isinstance(self.index, int) or self.index < 1 or not isinstance(self.size, int):
            raise ValueError(f"window record: index {self.index!r} / size {self.size!r} are not counts")
        numbers = (self.first_ts, self.last_ts, self.tested_at, self.p_value, self.p_embedding, self.p_prediction,
                   self.alpha)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise ValueError(f"window record {self.index}: times and p-values must be finite numbers")
        if self.first_ts > self.last_ts:
            raise ValueError(f"window record {self.index}: first_ts {self.first_ts} is after last_ts {self.last_ts}")
        if len(self.prediction_ids) != self.size or len(set(self.prediction_ids)) != self.size:
            raise ValueError(f"window record {self.index}: {len(self.prediction_ids)} prediction ids "
                             f"({len(set(self.prediction_ids))} distinct) for a window of {self.size}")
        if bool(self.drift) != (self.p_value < self.alpha):
            raise ValueError(f"window record {self.index}: drift={self.drift} but p-value {self.p_value} "
                             f"vs alpha {self.alpha}")
        for name in ("reference_accuracy", "p_accuracy", "accuracy"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"window record {self.index}: {name} {value!r} is not a fraction")
        if bool(self.accuracy_alarm) != (self.p_accuracy is not None and self.p_accuracy < self.alpha):
            raise ValueError(f"window record {self.index}: accuracy_alarm={self.accuracy_alarm} but accuracy "
                             f"p-value {self.p_accuracy} vs alpha {self.alpha}")
        return self

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "prediction_ids": list(self.prediction_ids)}).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> WindowRecord:
        """Parse and verify one record; ValueError when it is not a valid window record."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("window record is not a JSON object")
        known = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not MISSING}  # added later: older records lack them
        missing = known - optional - raw.keys()
        if missing:
            raise ValueError(f"window record lacks {', '.join(sorted(missing))}")
        values = {k: raw[k] for k in known if k in raw}
        if not isinstance(values["prediction_ids"], list):
            raise ValueError("window record: prediction_ids is not a list")
        values["prediction_ids"] = tuple(str(x) for x in values["prediction_ids"])
        return cls(**values).verify()

    def write(self, uri: str) -> str:
        """Store this record (verified) in the capture store at `uri`; returns its object name."""
        self.verify()
        name = f"{safe_name(self.model)}/{WINDOWS}/{self.name}"
        open_store(uri).put(name, self.to_json())
        return name


def list_windows(uri: str, model: str) -> list[str]:
    """Names of the window records of `model` in the store, oldest first span first."""
    store = open_store(uri)
    return [n.rsplit("/", 1)[-1] for n in store.list(f"{safe_name(model)}/{WINDOWS}", suffix=SUFFIX)]


def read_window(uri: str, model: str, name: str) -> WindowRecord:
    """One record by its name (ValueError when it does not verify)."""
    return WindowRecord.from_json(open_store(uri).get(f"{safe_name(model)}/{WINDOWS}/{name}"))


def span_of(name: str) -> tuple[int, int]:
    """(first_ts_ns, last_ts_ns) encoded in a record's name; ValueError when the name is not one."""
    first, last, _rest = name.split("-", 2)
    return int(first), int(last)


def find_windows(uri: str, model: str, prediction_id: str, ts: float) -> list[WindowRecord]:
    """Every window (of any env and monitor) made of prediction `prediction_id` captured at `ts`.

    Cost: one listing of `<model>/windows/` plus one read per window whose span holds `ts` (about
    one per monitor of the model); windows of other times are never read. A record that does not
    verify raises ValueError naming it."""
    ts_ns = _ns(ts)
    store = open_store(uri)  # one store (one GCS client) for the listing and the reads
    folder = f"{safe_name(model)}/{WINDOWS}"
    found = []
    for path in store.list(folder, suffix=SUFFIX):
        name = path.rsplit("/", 1)[-1]
        try:
            first, last = span_of(name)
        except ValueError:
            continue  # not a window record's name (a hand-placed file)
        if not first - _SLACK_NS <= ts_ns <= last + _SLACK_NS:
            continue
        try:
            record = WindowRecord.from_json(store.get(path))
        except ValueError as exc:
            raise ValueError(f"window record {name} in {uri}: {exc}") from None
        if prediction_id in record.prediction_ids:
            found.append(record)
    return found
