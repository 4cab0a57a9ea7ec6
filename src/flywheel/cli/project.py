"""Adapter from MLproject parameters to the `flywheel` CLI.

MLflow passes every parameter as a string (floats as "3.0", empty strings for "unset"); this
normalises them and hands over to the real CLI, so the project's entry points and the CLI
can never drift apart. `--nproc-per-node N` (N > 1) re-executes the command under `torchrun`.
"""

from __future__ import annotations

import os
import sys

INT_FLAGS = {"--epochs", "--batch-size", "--seed", "--max-train-samples"}
BOOL_FLAGS = {"--register": ("--register", "--no-register")}


def translate(argv: list[str]) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for token in it:
        if not token.startswith("--"):
            out.append(token)
            continue
        value = next(it, "")
        if value in ("", "''") or (token == "--max-train-samples" and float(value) == 0):
            continue  # unset optional parameter
        if token in BOOL_FLAGS:
            yes, no = BOOL_FLAGS[token]
            out.append(yes if value.lower() in ("1", "true", "yes") else no)
        elif token == "--extra-data":
            for path in value.split(","):
                out += ["--extra-data", path]
        elif token in INT_FLAGS:
            out += [token, str(int(float(value)))]
        else:
            out += [token, value]
    return out


def split_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """(processes per node, the remaining arguments) from `--nproc-per-node N`."""
    if "--nproc-per-node" not in argv:
        return 1, argv
    i = argv.index("--nproc-per-node")
    value = argv[i + 1] if i + 1 < len(argv) else "1"
    return max(1, int(float(value or 1))), argv[:i] + argv[i + 2:]


def main() -> None:
    from pathlib import Path

    os.environ.setdefault("FLYWHEEL_ENTRY_POINT", sys.argv[1] if len(sys.argv) > 1 else "")
    nproc, argv = split_nproc(translate(sys.argv[1:]))
    if nproc > 1:  # one process per GPU (gloo on CPU); rank 0 alone talks to MLflow
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        os.execv(torchrun, [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "flywheel", *argv])
    from flywheel.cli import main as cli_main

    sys.argv = [sys.argv[0], *argv]
    cli_main()


if __name__ == "__main__":
    main()
