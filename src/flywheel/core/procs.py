"""Process plumbing shared by the long-running commands.

`flywheel serve`, `stack up`, `demo` and `monitor` start servers in sessions of their own (so one
signal to a process group stops a server with all its children). Ctrl-C reaches the command as
KeyboardInterrupt and its `finally` blocks stop what it started; SIGTERM — what systemd,
supervisors, CI runners and `kill` send — would end Python at once and leave those servers running
(measured: TorchServe's JVM kept its ports). `sigterm_raises_keyboard_interrupt()` makes SIGTERM
take the Ctrl-C path.
"""

from __future__ import annotations

import signal
import threading


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
