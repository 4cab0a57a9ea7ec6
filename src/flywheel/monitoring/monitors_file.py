"""`flywheel monitor --config monitors.yaml`: the models one monitor process watches, each with its own settings.

The file lists the monitors; each entry names a registered `model` and may set any of the per-model
keys below (the CLI options of the same name, `-` or `_`), and `defaults:` sets them for every entry:

```yaml
defaults:            # optional: for every model below
  window: 100
  consecutive: 3
  accuracy_consecutive: 2   # labelled windows in a row below the reference accuracy (null: never retrain on it)
monitors:
  - model: fashion-classifier           # required: the registered model
    env: prod
  - model: rgb-shapes
    alpha: 0.005
    cooldown: 7200
    dataset: imagefolder
```

Precedence: an entry's own key, then `defaults:`, then the command line (its options, or their
defaults). Process-wide things stay on the command line: the trigger actions (their command
templates take `{model}`, `{project}`, `{commit}`... per request), `--metrics-port`, `--tracking-uri`.
An unknown key is refused by name, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from flywheel.core.errors import FlywheelError
from flywheel.core.files import yaml_problem


@dataclass(frozen=True)
class MonitorEntry:
    """One model's monitor settings, before they become a MonitorConfig and a PolicyConfig."""

    model: str
    env: str = "prod"
    capture_uri: str | None = None  # None: the command line's (or the settings' default store)
    state_dir: Path | None = None  # None: the command line's rule (monitor_state_dir)
    window: int = 100
    alpha: float = 0.01
    interval: float = 30.0
    consecutive: int = 3
    cooldown: float = 3600.0
    schedule: float | None = None
    min_labelled: int | None = None
    accuracy_consecutive: int | None = 3
    dataset: str | None = None
    from_now: bool = False


KEYS = tuple(f.name for f in fields(MonitorEntry))
_TYPES = {"window": int, "consecutive": int, "min_labelled": int, "accuracy_consecutive": int, "alpha": float, "interval": float,
          "cooldown": float, "schedule": float, "from_now": bool, "state_dir": Path}


def _entry(base: MonitorEntry, values: dict, where: str) -> MonitorEntry:
    if not isinstance(values, dict):
        raise FlywheelError(f"{where} must be a mapping of keys ({', '.join(KEYS)})")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in KEYS:
            raise FlywheelError(f"{where}: unknown key {key!r}; known: {', '.join(KEYS)}")
        kind = _TYPES.get(name, str)
        if value is not None:
            if kind is bool and not isinstance(value, bool):
                raise FlywheelError(f"{where}: {key} must be true or false, not {value!r}")
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise FlywheelError(f"{where}: {key} must be a {kind.__name__}, not {value!r}") from None
        out[name] = value
    return replace(base, **out)


def read_monitors_file(path: Path, base: MonitorEntry) -> list[MonitorEntry]:
    """The entries of a monitors file, each completed from `defaults:` and then from `base` (the CLI)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise FlywheelError(f"cannot read monitors file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise FlywheelError(f"monitors file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("monitors"), list) or not doc["monitors"]:
        raise FlywheelError(f"monitors file {path} needs a `monitors:` list with one entry per model (see "
                            "docs/runbooks/monitor.md#several-models-one-monitor)")
    unknown = set(doc) - {"monitors", "defaults"}
    if unknown:
        raise FlywheelError(f"monitors file {path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                            "known: defaults, monitors")
    defaults = _entry(base, doc.get("defaults") or {}, f"{path} defaults")
    entries = []
    for i, item in enumerate(doc["monitors"]):
        where = f"{path} monitors[{i}]"
        if not isinstance(item, dict) or not item.get("model"):
            raise FlywheelError(f"{where} needs `model:` (the registered model name)")
        entries.append(_entry(defaults, item, where))
    return entries
