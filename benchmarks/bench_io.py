"""What benchmark scripts and run_all.py share: figures as a `BENCH_JSON {...}` last line, and
starting a peer HTTP server for a benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
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


def start_http_server(argv: list[str], env: dict, log: Path, url: str, health_path: str,
                      timeout: float = 180.0) -> subprocess.Popen:
    """Start `argv` in its own session, output to `log`, and wait until GET url+health_path is 200.

    Raises SystemExit with the log's tail when it exits or does not answer in `timeout` s (its
    process group is killed then); the caller stops it with os.killpg(proc.pid, SIGTERM)."""
    import requests

    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{Path(argv[0]).name} {argv[1]} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if requests.get(url + health_path, timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise SystemExit(f"{Path(argv[0]).name} {argv[1]} did not answer {health_path} in {timeout:.0f} s; log: {log}")
