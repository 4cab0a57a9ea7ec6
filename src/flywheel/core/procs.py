"""Process plumbing shared by the long-running commands.

`flywheel serve`, `stack up`, `demo` and `monitor` start servers in sessions of their own (so one
signal to a process group stops a server with all its children). Ctrl-C reaches the command as
KeyboardInterrupt and its `finally` blocks stop what it started; SIGTERM — what systemd,
supervisors, CI runners and `kill` send — would end Python at once and leave those servers running
(measured: TorchServe's JVM kept its ports). `sigterm_raises_keyboard_interrupt()` makes SIGTERM
take the Ctrl-C path.

Those servers are stopped one way (`stop_process_group`: SIGTERM to the group, a grace period, SIGKILL
to what is left) and their ports picked one way (`free_port`), here, for the tracking server,
TorchServe, the demo, benchmarks and tests alike. `skip_final_collection` spares a short-lived
command the garbage collections CPython runs at exit.
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import socket
import subprocess
import threading
import time

HOST = "127.0.0.1"
_final_collection_skipped = False


def skip_final_collection() -> None:
    """At exit CPython's last garbage collections walk the whole heap that torch, MLflow and friends
    left (0.5-2 s per process on this project's 2-core VMs) only to free memory the OS takes back anyway.
    Registered early (the CLI's first call; a component's `train`), this runs after every atexit handler
    registered later (MLflow's flushes included) and freezes what is left, so those collections skip it;
    reference counting still frees and flushes. Once per process."""
    global _final_collection_skipped
    if not _final_collection_skipped:
        _final_collection_skipped = True
        atexit.register(gc.freeze)


def free_port(host: str = HOST) -> int:
    """A free TCP port on `host` (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process_group(proc: int | subprocess.Popen, timeout: float = 15.0, kill_timeout: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads, wait up to `timeout` s for all of it to exit, SIGKILL what is left.

    `proc` is the leader (started with `start_new_session=True`, so its pid is the group id): a Popen,
    reaped through Popen so its returncode stays right, or a pid, reaped with waitpid when it is our
    child. Waits for the whole group, not only the leader: servers' workers outlive their launcher.
    """
    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, kill_timeout)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            _reap(proc)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(proc)  # a zombie leader still counts as a member of its group
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _reap(proc: int | subprocess.Popen) -> None:
    if isinstance(proc, subprocess.Popen):
        proc.poll()
        return
    try:
        os.waitpid(proc, os.WNOHANG)
    except ChildProcessError:  # not our child (or already reaped): nothing to collect
        pass


def _raise_interrupt(signum, _frame) -> None:
    # A second SIGTERM must not interrupt the cleanup itself. A no-op handler, not SIG_IGN: children
    # started during the cleanup would inherit an ignored SIGTERM across exec.
    signal.signal(signum, _ignore)
    raise KeyboardInterrupt(f"signal {signum}")


def _ignore(_signum, _frame) -> None:
    return None


def sigterm_raises_keyboard_interrupt() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C.

    Call it at the start of a command that starts servers, from the main thread (a no-op elsewhere:
    Python only delivers signals to the main thread).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
