"""Small file helpers every node shares.

`atomic_write_json` is how state files (the monitor's state.json, the trigger outbox) are written:
a temp file beside the target, then `os.replace`, so a reader or a crash never sees half a file.
`yaml_problem` is how a user's YAML file that does not parse is named in a one-line error.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def atomic_write_json(path: Path, data: dict) -> None:
    """Write `data` as indented, key-sorted JSON to `path` in one atomic replace (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def yaml_problem(exc: Exception) -> str:
    """A PyYAML error as one line: what was wrong and where (PyYAML's own text spans several lines and
    quotes the file)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context + ': ' if context else ''}{problem}{where}"
