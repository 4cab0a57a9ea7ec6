"""The by-hand path, executed as written: docs/quickstart.md section 2 and the runbooks' local walks.

Convention (for anyone editing the docs): a fenced ```bash block whose previous non-blank line is

    <!-- docs-test: run -->

is run by this test; every other block is prose only (production commands, `make demo`, the MLflow UI).
The marked blocks run in document order - docs/quickstart.md first, then docs/runbooks/*.md by name - as
ONE script in ONE `bash` session under `set -euo pipefail`, so what a block exports or starts (`eval
"$(flywheel env)"`, `source …/serve.env`, `$SERVE_PID`) is there for the next, as for a reader typing
them into one terminal. Every command must succeed.

Where: a fresh temporary directory holding a copy of the repository's files (tracked and not ignored, as
they are in the working tree, so uncommitted doc edits are what is tested), `.venv` linked to the venv
running the tests, `PYTHONPATH` on the copy's `src/`. No MLFLOW_*/FLYWHEEL_* variable of the caller gets
through (FLYWHEEL_DATA_DIR excepted: it says where Fashion-MNIST is).

Short settings come only through variables the docs themselves use, with their defaults written there:
    EPOCHS=1         `-P epochs=${EPOCHS:-3}`, `--epochs ${EPOCHS:-3}`
    MONITOR_PORT     a free port for `flywheel monitor --metrics-port ${MONITOR_PORT:-9108}`

Background servers the docs start (`flywheel serve &`) are stopped here afterwards: every process
whose environment carries this run's marker variable, `flywheel serve` first with SIGTERM (it stops
its TorchServe), then SIGTERM and SIGKILL to each marked process group that is left.

It trains Fashion-MNIST (twice, one epoch each) and starts TorchServe: minutes, so `reliability`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- docs-test: run -->"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
DOC_ORDER = ("docs/quickstart.md", "docs/runbooks/*.md")
CALLER_VARS = re.compile(r"^(MLFLOW_|FLYWHEEL_(?!DATA_DIR$)|VIRTUAL_ENV$|PYTHONHOME$)")


def marked_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, body) of every ```bash block right after a docs-test marker, in order."""
    text = path.read_text()
    blocks = []
    for m in BLOCK.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        if before == MARKER:
            blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def docs_script(root: Path) -> tuple[str, list[str]]:
    """The bash script of every marked block under `root`, and the blocks' `file:line` names."""
    files = [root / DOC_ORDER[0]] + sorted(root.glob(DOC_ORDER[1]))
    parts = ["set -euo pipefail",
             "trap 'echo \"docs-test: exit $? at script line $LINENO: $BASH_COMMAND\" >&2' ERR"]
    names = []
    for path in files:
        for line, body in marked_blocks(path):
            name = f"{path.relative_to(root)}:{line}"
            names.append(name)
            parts += [f"echo '::: docs-test block {name}'", body.rstrip("\n")]
    return "\n".join(parts) + "\n", names


def copy_repo(dest: Path) -> None:
    """The repository's files as a fresh clone of this working tree would have them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _marked_pids(marker: str) -> list[int]:
    needle = marker.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
    return alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def stop_marked(marker: str) -> list[str]:
    """Stop what the docs left running (see the module doc); returns what had to be killed."""
    serve = [p for p in _marked_pids(marker) if " serve" in _cmdline(p) and "flywheel" in _cmdline(p)]
    for pid in serve:
        os.kill(pid, signal.SIGTERM)
    _wait_gone(serve, 30)
    killed = []
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        left = [p for p in _marked_pids(marker) if _state(p) != "Z"]
        for pid in left:
            killed.append(_cmdline(pid)[:80] or str(pid))
            try:
                os.killpg(os.getpgid(pid), sig)
            except ProcessLookupError:
                pass
        _wait_gone(left, grace)
    return killed


def _remove_worker_sockets(home: Path) -> None:
    """TorchServe killed by a signal leaves /tmp/.ts.sock.<port> behind (see docs/troubleshooting.md)."""
    props = home / "serving" / "config.properties"
    if props.is_file():
        m = re.search(r"^initial_worker_port=(\d+)$", props.read_text(), re.M)
        for port in range(int(m.group(1)), int(m.group(1)) + 100) if m else ():
            for suffix in ("", ".lock"):
                Path(f"/tmp/.ts.sock.{port}{suffix}").unlink(missing_ok=True)


def test_docs_markers_parse():
    """The marked blocks exist where the docs say (quick start section 2, the monitor runbook's local walk)."""
    script, names = docs_script(REPO)
    assert any(n.startswith("docs/quickstart.md:") for n in names), names
    assert any(n.startswith("docs/runbooks/monitor.md:") for n in names), names
    quick = (REPO / "docs/quickstart.md").read_text()
    section2 = quick[quick.index("## 2."):quick.index("## 3.")]
    assert quick.count(MARKER) == section2.count(MARKER)  # only section 2 of the quick start runs here
    for must in ("eval \"$(flywheel env)\"", "mlflow run . -e train --env-manager local", "flywheel serve &",
                 "serve.env", "flywheel monitor --once", "flywheel data feedback", "flywheel data snapshot",
                 "${EPOCHS:-3}"):
        assert must in script, must
    assert "PORT_I" not in quick and "--work-dir ./serving" not in quick  # placeholders and secrets in the repo


@pytest.mark.integration
@pytest.mark.reliability
@pytest.mark.timeout(2400)
def test_quickstart_and_local_runbooks_run_as_written(tmp_path):
    repo = tmp_path / "flywheel"
    copy_repo(repo)
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    script, names = docs_script(repo)
    (tmp_path / "docs.sh").write_text(script)
    marker = f"FLYWHEEL_DOCS_TEST={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not CALLER_VARS.match(k)}
    env.update({"EPOCHS": "1", "MONITOR_PORT": str(free_port()), "PYTHONPATH": str(repo / "src"),
                marker.split("=")[0]: marker.split("=")[1], "COLUMNS": "200"})
    before = {p.name for p in repo.iterdir()}
    log = tmp_path / "docs.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(tmp_path / "docs.sh")], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=2100)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        killed = stop_marked(marker)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _remove_worker_sockets(repo / ".flywheel")
    output = log.read_text(errors="replace")
    assert rc == 0, f"docs failed (rc {rc}; blocks {names}):\n{output[-6000:]}"
    # The one store rule held: nothing in MLflow's own default places, no server dir (tokens) in the repo.
    created = {p.name for p in repo.iterdir()} - before
    assert created == {".flywheel"}, created
    keys = [Path(d, "key_file.json") for d, _, files in os.walk(repo) if "key_file.json" in files]
    assert keys and all(k.is_relative_to(repo / ".flywheel") for k in keys), keys
    home = repo / ".flywheel"
    assert (home / "mlflow.db").is_file() and list((home / "mlartifacts").iterdir())
    assert list((home / "captures" / "fashion-classifier" / "captures").glob("*.jsonl")), "serve captured nothing"
    assert "already the default" in output  # the prod release on the dev server says so
    assert (home / "snapshots" / "fashion-classifier" / "v0001").is_dir()
    print("stopped after the docs:", killed or "nothing")
