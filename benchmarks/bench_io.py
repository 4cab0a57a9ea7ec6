"""The one convention benchmark scripts and run_all.py share: figures as a `BENCH_JSON {...}` last line."""

from __future__ import annotations

import json
from pathlib import Path

PREFIX = "BENCH_JSON "


def emit(summary: dict, json_out: Path | None = None) -> None:
    """Write the figures to `json_out` (if given) and print them as the last stdout line."""
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2))
    print(PREFIX + json.dumps(summary), flush=True)


def parse(stdout: str) -> dict | None:
    """The figures of the last `BENCH_JSON` line of a script's output, or None."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    return None
